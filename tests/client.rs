//! End-to-end tests of the client library and the CLI over real QUIC with real certificates:
//! causal failover, the readiness timeout, session tokens shared between processes, and the
//! `causalkv dev` deployment driven by the CLI from another process (binary values, logs,
//! completions, version, client certificates).

use crate::common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::common::{Cluster, Relay, ms};
use causalkv::Client;
use causalkv::client::ClientError;
use causalkv::tools::dev;

const BIN: &str = env!("CARGO_BIN_EXE_causalkv");

/// A client of the given sites, in failover order.
async fn client_of(cluster: &Cluster, sites: &[usize], timeout: Duration) -> Client {
    cluster
        .client_builder_of(sites)
        .timeout(timeout)
        .connect()
        .await
        .expect("client connects")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failover_keeps_read_your_writes() {
    common::bounded(ms(60_000), async {
        let mut cluster = Cluster::start(3).await;
        let client = client_of(&cluster, &[0, 1, 2], ms(10_000)).await;
        for i in 0..20 {
            client.put("k", format!("v{i}")).await.unwrap();
        }
        assert_eq!(client.current_site().await, Some(cluster.addr(0)));
        cluster.stop(0).await;
        // The first request after the stop fails over to b and waits until b has applied the
        // session's context: it must return the session's own last write, never an older one.
        let got = client.get("k").await.unwrap();
        assert_eq!(got.as_deref(), Some(&b"v19"[..]));
        assert_eq!(client.current_site().await, Some(cluster.addr(1)));
        // Writes continue at b, after the session's earlier writes.
        let v = client.put("k", "after-failover").await.unwrap();
        assert_eq!(v.site, 1);
        let other = cluster.client(2).await;
        common::eventually(
            ms(10_000),
            "c sees the write made after failover",
            async || other.get("k").await.unwrap().as_deref() == Some(&b"after-failover"[..]),
        )
        .await;
        cluster.shutdown().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn all_partitions_fail_over_together_when_one_partition_node_stops() {
    common::bounded(ms(60_000), async {
        // 2 sites × 2 partitions; node index = site * 2 + partition.
        let mut cluster = Cluster::prepare_partitioned(2, 2).start().await;
        cluster.wait_connected().await;
        let client = common::cli_client_builder(&cluster.certs, [])
            .site_partitions([cluster.site_addrs(0), cluster.site_addrs(1)])
            .timeout(ms(3_000))
            .connect()
            .await
            .expect("client connects");
        let part = |k: &str| causalkv::sharding::partition_of(k.as_bytes(), 2) as usize;
        let k0 = (0..)
            .map(|i| format!("k{i}"))
            .find(|k| part(k) == 0)
            .unwrap();
        let k1 = (0..)
            .map(|i| format!("k{i}"))
            .find(|k| part(k) == 1)
            .unwrap();
        client.put(&k0, "a0").await.unwrap();
        client.put(&k1, "a1").await.unwrap();
        // Site a's partition 1 stops; its partition 0 keeps running.
        cluster.stop(1).await;
        let v = client.put(&k1, "b1").await.unwrap();
        assert_eq!(v.site, 1, "partition 1 failed over to b");
        // Partition 0 follows the session to b: a's partition 0 could not cover the session's
        // context (it depends on a write at b that a's stopped partition 1 never reports).
        let got = client
            .get(&k0)
            .await
            .expect("partition 0 is served after the failover");
        assert_eq!(got.as_deref(), Some(&b"a0"[..]), "read your writes at b");
        assert_eq!(client.current_site().await, Some(cluster.site_addrs(1)[0]));
        cluster.shutdown().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failover_skips_sites_the_failure_detector_reports_down() {
    common::bounded(ms(60_000), async {
        let mut cluster = Cluster::start(3).await;
        cluster.stop(2).await;
        common::wait_until(ms(10_000), "a reports c down", || {
            cluster
                .node(0)
                .status()
                .peers
                .iter()
                .any(|p| p.site == 2 && p.state == "down")
        })
        .await;
        // Failover order a, c, b: c is next in line, but a reported it down.
        let client = client_of(&cluster, &[0, 2, 1], ms(5_000)).await;
        assert_eq!(client.known_down(), vec![cluster.addr(2)]);
        client.put("k", "v").await.unwrap();
        cluster.stop(0).await;
        let started = std::time::Instant::now();
        assert_eq!(client.get("k").await.unwrap().as_deref(), Some(&b"v"[..]));
        assert_eq!(client.current_site().await, Some(cluster.addr(1)));
        // Trying c first would have cost its whole 5 s connect timeout (nothing answers there).
        assert!(
            started.elapsed() < ms(4_000),
            "failover went to b without trying c first ({:?})",
            started.elapsed()
        );
        cluster.shutdown().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failover_to_a_site_that_lacks_the_write_waits_then_times_out() {
    common::bounded(ms(60_000), async {
        let mut cluster = Cluster::start(2).await;
        cluster.stop(1).await;
        let client = client_of(&cluster, &[0, 1], ms(1_500)).await;
        client.put("k", "only-at-a").await.unwrap();
        cluster.stop(0).await;
        cluster.restart(1).await; // b never received the write, and a is gone
        let started = std::time::Instant::now();
        let err = client.get("k").await.unwrap_err();
        let waited = started.elapsed();
        match &err {
            ClientError::NotReady { site, message } => {
                assert_eq!(*site, cluster.addr(1));
                assert!(
                    message.contains("entry 0"),
                    "names the missing entry: {message}"
                );
            }
            other => panic!("expected NotReady, got {other:?}"),
        }
        assert!(
            waited >= ms(1_000),
            "the site waited for the context before giving up ({waited:?})"
        );
        // A fresh session (empty context) is served at once: the site stays available.
        let fresh = cluster.client(1).await;
        assert_eq!(fresh.get("k").await.unwrap(), None);
        cluster.shutdown().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_token_carries_guarantees_to_another_process() {
    common::bounded(ms(60_000), async {
        // Updates from a to b take 400 ms: b lags behind a.
        let mut prepared = Cluster::prepare(2);
        let b_addr = prepared.configs[1].me().addr;
        let relay = Relay::start(b_addr, ms(400));
        prepared.configs[0].sites[1].addr = relay.addr();
        let cluster = prepared.start().await;
        cluster.wait_connected().await;
        let writer = cluster.client(0).await;
        let certs_dir = cluster.certs.to_str().unwrap().to_owned();
        let cli_get = |key: &str, token: Option<&str>| {
            let mut cmd = Command::new(BIN);
            cmd.args(["get", key, "--site", &cluster.addr(1).to_string()])
                .args(["--certs", &certs_dir, "--json", "--timeout-ms", "5000"]);
            if let Some(t) = token {
                cmd.args(["--token", t]);
            }
            cmd.output().expect("run causalkv get")
        };

        // Without the token, a read at b right after the write misses it (b lags): this shows
        // the check below is not vacuous.
        writer.put("t1", "one").await.unwrap();
        let out = cli_get("t1", None);
        assert_eq!(out.status.code(), Some(1), "b has not applied t1 yet");

        // With the session's token, the second process reads the session's write at b.
        writer.put("t2", "two").await.unwrap();
        let out = cli_get("t2", Some(&writer.session_token()));
        let stdout = common::assert_success(&out);
        assert!(stdout.contains("\"value\":\"two\""), "{stdout}");
        // And it hands back a token that covers everything it saw.
        assert!(stdout.contains("\"token\":\"ckv1."), "{stdout}");
        cluster.shutdown().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_session_tokens_are_refused() {
    common::bounded(ms(30_000), async {
        let cluster = Cluster::start(1).await;
        let c = cluster.client(0).await;
        for bad in ["", "nope", "ckv1.***", "ckv1.AAA"] {
            assert!(
                matches!(c.set_session_token(bad), Err(ClientError::Config(_))),
                "{bad:?} must be refused"
            );
        }
        cluster.shutdown().await;
    })
    .await;
}

/// Kills the child on drop, so a failing test leaves no process behind.
struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

type Lines = std::io::Lines<BufReader<std::process::ChildStdout>>;

/// Starts `causalkv dev` with `extra` arguments in `dir` on a free base port; returns the
/// child, the rest of its output, its banner and the base port.
fn spawn_dev(dir: &std::path::Path, extra: &[&str]) -> (Child, Lines, String, u16) {
    spawn_dev_logging(dir, extra, Stdio::null())
}

/// [`spawn_dev`] with its stderr (the logs, at `RUST_LOG=info`) going to `stderr`.
fn spawn_dev_logging(
    dir: &std::path::Path,
    extra: &[&str],
    stderr: Stdio,
) -> (Child, Lines, String, u16) {
    // Room for every node of the largest layout the tests start.
    let base = dev::free_udp_ports(16).unwrap();
    let mut child = Child(
        Command::new(BIN)
            .args([
                "dev",
                "--dir",
                dir.to_str().unwrap(),
                "--port",
                &base.to_string(),
            ])
            .args(extra)
            .env("RUST_LOG", "info")
            .env_remove("NO_COLOR")
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .expect("start causalkv dev"),
    );
    let mut lines = BufReader::new(child.0.stdout.take().unwrap()).lines();
    let mut banner = String::new();
    for line in lines.by_ref() {
        let line = line.unwrap();
        banner.push_str(&line);
        banner.push('\n');
        if line.starts_with("(with cargo") {
            break;
        }
    }
    (child, lines, banner, base)
}

/// Runs the CLI with `--certs DIR`.
fn cli_in(certs_dir: &std::path::Path, args: &[&str]) -> std::process::Output {
    Command::new(BIN)
        .args(args)
        .args(["--certs", certs_dir.to_str().unwrap()])
        .output()
        .expect("run the CLI")
}

#[test]
fn dev_deployment_and_cli_from_another_process() {
    // Exactly what the README says: `causalkv dev`, then the CLI from another shell.
    let dir = tempfile::tempdir().unwrap();
    let (mut child, lines, banner, base) = spawn_dev(dir.path(), &[]);
    assert!(banner.contains("3 sites up"), "{banner}");
    let certs_dir = dir.path().join("certs");
    let site = |i: u16| format!("127.0.0.1:{}", base + i);
    assert!(banner.contains(&format!("--site {}", site(0))), "{banner}");
    let cli = |args: &[&str]| cli_in(&certs_dir, args);
    let put = cli(&["put", "greeting", "hello", "--site", &site(0)]);
    assert_eq!(put.status.code(), Some(0), "{put:?}");
    // The put's session token makes the read at b wait until b has the write.
    let token = {
        let out = cli(&["put", "greeting2", "hello2", "--site", &site(0), "--json"]);
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        v["token"].as_str().unwrap().to_owned()
    };
    let get = cli(&["get", "greeting2", "--site", &site(1), "--token", &token]);
    assert_eq!(get.status.code(), Some(0), "{get:?}");
    assert_eq!(String::from_utf8_lossy(&get.stdout).trim(), "hello2");
    // Eventually visible at b without a token too.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let get = cli(&["get", "greeting", "--site", &site(1)]);
        if get.status.code() == Some(0) {
            assert_eq!(String::from_utf8_lossy(&get.stdout).trim(), "hello");
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "b never showed the write"
        );
    }
    let missing = cli(&["get", "nothing-here", "--site", &site(2)]);
    assert_eq!(missing.status.code(), Some(1));
    let status = cli(&["status", "--site", &site(2), "--json"]);
    assert_eq!(status.status.code(), Some(0));
    let s: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    assert_eq!(s["peers"].as_array().unwrap().len(), 2);
    // The banner's redis-cli line, run as printed, reads the CLI's write over RESP.
    let redis_line = banner
        .lines()
        .find(|l| l.trim_start().starts_with("redis-cli --tls"))
        .unwrap_or_else(|| panic!("no redis-cli line in the banner: {banner}"));
    if common::have_tool("redis-cli", &["--version"], "redis-tools (apt)") {
        let words: Vec<&str> = redis_line.split_whitespace().collect();
        let out = Command::new(words[0])
            .args(&words[1..])
            .args(["GET", "greeting"])
            .output()
            .expect("run redis-cli");
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).trim(),
            "hello",
            "{out:?}"
        );
    }
    let unreachable = cli(&["get", "x", "--site", "127.0.0.1:9", "--timeout-ms", "500"]);
    assert_eq!(unreachable.status.code(), Some(2));
    // Ctrl-C stops it cleanly.
    send_sigint(child.0.id());
    let status = child.0.wait().unwrap();
    assert!(status.success(), "dev exits cleanly on SIGINT: {status:?}");
    let rest: Vec<String> = lines.map_while(Result::ok).collect();
    assert!(rest.iter().any(|l| l.contains("stopped")), "{rest:?}");
}

fn send_sigint(pid: u32) {
    let ok = Command::new("kill")
        .args(["-INT", &pid.to_string()])
        .status()
        .unwrap();
    assert!(ok.success());
}

#[test]
fn dev_with_partitions_routes_keys_and_refuses_the_wrong_partition() {
    // `causalkv dev --partitions 2`: site i's partition p listens on port + 2i + p.
    let dir = tempfile::tempdir().unwrap();
    let (mut child, _lines, banner, base) = spawn_dev(dir.path(), &["--partitions", "2"]);
    assert!(
        banner.contains("3 sites x 2 partitions up (6 nodes)"),
        "{banner}"
    );
    assert!(banner.contains("--partitions 2"), "{banner}");
    let certs_dir = dir.path().join("certs");
    let site = |i: u16| format!("127.0.0.1:{}", base + 2 * i);
    let cli = |args: &[&str]| cli_in(&certs_dir, args);
    // Keys of both partitions, written at a in one session, read at b with its token.
    let keys: Vec<String> = (0..8).map(|i| format!("key{i}")).collect();
    assert!(
        keys.iter()
            .map(|k| causalkv::sharding::partition_of(k.as_bytes(), 2))
            .collect::<std::collections::BTreeSet<_>>()
            .len()
            == 2
    );
    let (a, b_, c) = (site(0), site(1), site(2));
    let mut token = String::new();
    for k in &keys {
        let mut args = vec!["put", k, "v", "--site", &a, "--partitions", "2", "--json"];
        if !token.is_empty() {
            args.extend(["--token", &token]);
        }
        let out = cli(&args);
        assert_eq!(out.status.code(), Some(0), "{out:?}");
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        token = v["token"].as_str().unwrap().to_owned();
    }
    for k in &keys {
        let args = [
            "get",
            k,
            "--site",
            &b_,
            "--partitions",
            "2",
            "--token",
            &token,
        ];
        let out = cli(&args);
        assert_eq!(out.status.code(), Some(0), "{k}: {out:?}");
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "v");
    }
    // A key sent to a node that does not hold it: a clear error, exit 2, nothing stored.
    let k1 = keys
        .iter()
        .find(|k| causalkv::sharding::partition_of(k.as_bytes(), 2) == 1)
        .unwrap();
    let wrong = cli(&["put", k1, "other", "--site", &a]);
    assert_eq!(wrong.status.code(), Some(2), "{wrong:?}");
    let err = String::from_utf8_lossy(&wrong.stderr);
    assert!(err.contains("belongs to partition 1 of 2"), "{err}");
    let again = cli(&[
        "get",
        k1,
        "--site",
        &c,
        "--partitions",
        "2",
        "--token",
        &token,
    ]);
    assert_eq!(String::from_utf8_lossy(&again.stdout).trim(), "v");
    send_sigint(child.0.id());
    let status = child.0.wait().unwrap();
    assert!(status.success(), "dev exits cleanly on SIGINT: {status:?}");
}

/// Stops a `causalkv dev` child with SIGINT and checks it exits cleanly.
fn stop_dev(mut child: Child) {
    send_sigint(child.0.id());
    let status = child.0.wait().unwrap();
    assert!(status.success(), "dev exits cleanly on SIGINT: {status:?}");
}

#[test]
fn dev_logs_redirected_to_a_file_have_no_escape_codes() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("dev.log");
    let file = std::fs::File::create(&log).unwrap();
    let (child, _lines, banner, _) = spawn_dev_logging(&dir.path().join("dev"), &[], file.into());
    assert!(banner.contains("3 sites up"), "{banner}");
    stop_dev(child);
    let bytes = std::fs::read(&log).unwrap();
    let text = String::from_utf8_lossy(&bytes);
    assert!(
        text.contains("site listening"),
        "no logs in the file: {text}"
    );
    assert!(text.contains("site stopped"), "{text}");
    assert!(
        !bytes.contains(&0x1b),
        "escape byte in logs written to a file: {text}"
    );
}

#[test]
fn dev_json_logs_parse_line_by_line() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("dev.json");
    let file = std::fs::File::create(&log).unwrap();
    let (child, _lines, banner, _) = spawn_dev_logging(
        &dir.path().join("dev"),
        &["--log-format", "json", "--sites", "2"],
        file.into(),
    );
    assert!(banner.contains("2 sites up"), "{banner}");
    stop_dev(child);
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(!text.contains('\u{1b}'), "{text}");
    let mut messages = Vec::new();
    for line in text.lines() {
        let v: serde_json::Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("not a JSON log line ({e}): {line:?}"));
        assert!(v["level"].is_string(), "{line}");
        assert!(v["timestamp"].is_string(), "{line}");
        messages.push(
            v["fields"]["message"]
                .as_str()
                .unwrap_or_default()
                .to_owned(),
        );
    }
    let listening = messages.iter().filter(|m| *m == "site listening").count();
    assert_eq!(listening, 2, "{messages:?}");
    assert!(messages.iter().any(|m| m == "site stopped"), "{messages:?}");
}

#[test]
fn text_logs_are_coloured_on_a_terminal_unless_no_color_is_set() {
    // `script` runs the command on a pseudo-terminal; the recovery benchmark logs at info and
    // exits by itself.
    let run = |no_color: Option<&str>| {
        let cmd = format!("{BIN} bench recovery --keys 10 --tail 10");
        let mut c = Command::new("script");
        c.args(["-qec", &cmd, "/dev/null"])
            .env("RUST_LOG", "info")
            .env_remove("NO_COLOR");
        if let Some(v) = no_color {
            c.env("NO_COLOR", v);
        }
        let out = c.output().expect("run script");
        assert!(out.status.success(), "{out:?}");
        out.stdout
    };
    let coloured = run(None);
    assert!(
        coloured.contains(&0x1b),
        "a terminal gets colour: {}",
        String::from_utf8_lossy(&coloured)
    );
    let plain = run(Some("1"));
    assert!(
        String::from_utf8_lossy(&plain).contains("INFO"),
        "{}",
        String::from_utf8_lossy(&plain)
    );
    assert!(
        !plain.contains(&0x1b),
        "NO_COLOR=1 on a terminal: {}",
        String::from_utf8_lossy(&plain)
    );
}

/// Runs the CLI with `--certs DIR`, feeding `stdin` to it.
fn cli_with_stdin(
    certs_dir: &std::path::Path,
    args: &[&str],
    stdin: &[u8],
) -> std::process::Output {
    use std::io::Write;
    let mut child = Command::new(BIN)
        .args(args)
        .args(["--certs", certs_dir.to_str().unwrap()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run the CLI");
    let mut input = child.stdin.take().unwrap();
    input.write_all(stdin).unwrap();
    drop(input);
    child.wait_with_output().unwrap()
}

#[test]
fn binary_values_round_trip_through_value_file_stdin_and_out() {
    use rand::{RngCore, SeedableRng};
    const MAX_VALUE: usize = 11 << 20;
    let dir = tempfile::tempdir().unwrap();
    let max = MAX_VALUE.to_string();
    let (child, _lines, banner, base) = spawn_dev(
        &dir.path().join("dev"),
        &["--sites", "1", "--max-value", &max],
    );
    assert!(banner.contains("1 sites up"), "{banner}");
    let certs_dir = dir.path().join("dev/certs");
    let site = format!("127.0.0.1:{base}");
    let cli = |args: &[&str]| {
        let mut all = args.to_vec();
        all.extend(["--site", &site, "--timeout-ms", "30000"]);
        cli_in(&certs_dir, &all)
    };
    let file = |name: &str, bytes: &[u8]| {
        let p = dir.path().join(name);
        std::fs::write(&p, bytes).unwrap();
        p.to_str().unwrap().to_owned()
    };
    let all_bytes: Vec<u8> = (0..=255u8).collect();
    let mut big = vec![0u8; 10_000_000];
    rand_chacha::ChaCha8Rng::seed_from_u64(21).fill_bytes(&mut big);
    for (key, value) in [("all-bytes", &all_bytes), ("ten-mb", &big)] {
        let input = file(&format!("{key}.in"), value);
        let put = cli(&["put", key, "--value-file", &input]);
        assert_eq!(put.status.code(), Some(0), "{put:?}");
        let out = dir.path().join(format!("{key}.out"));
        let get = cli(&["get", key, "--out", out.to_str().unwrap()]);
        assert_eq!(get.status.code(), Some(0), "{get:?}");
        assert!(get.stdout.is_empty(), "--out prints no value");
        let back = std::fs::read(&out).unwrap();
        assert_eq!(back.len(), value.len(), "{key}");
        assert!(back == *value, "{key}: bytes differ");
    }
    // Without --out, a non-UTF-8 value is printed escaped, nothing replaced.
    let get = cli(&["get", "all-bytes"]);
    assert_eq!(get.status.code(), Some(0), "{get:?}");
    let printed = String::from_utf8(get.stdout).unwrap();
    assert_eq!(
        printed.trim_end_matches('\n'),
        all_bytes.escape_ascii().to_string()
    );
    assert!(!printed.contains('\u{fffd}'));
    let json = cli(&["get", "all-bytes", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
    assert_eq!(v["escaped"], true);
    assert_eq!(v["value"], all_bytes.escape_ascii().to_string());
    // A UTF-8 value is printed as it is.
    assert_eq!(cli(&["put", "text", "grüße"]).status.code(), Some(0));
    let get = cli(&["get", "text"]);
    assert_eq!(String::from_utf8(get.stdout).unwrap(), "grüße\n");
    // `--value-file -` reads standard input; `--out -` writes raw bytes to standard output.
    let stdin_value = [0xff, 0x00, b'\n', 0xc3, 0x28, b'x'];
    let site_args = ["--site", site.as_str()];
    let mut put_args = vec!["put", "from-stdin", "--value-file", "-"];
    put_args.extend(site_args);
    let put = cli_with_stdin(&certs_dir, &put_args, &stdin_value);
    assert_eq!(put.status.code(), Some(0), "{put:?}");
    let get = cli(&["get", "from-stdin", "--out", "-"]);
    assert_eq!(get.status.code(), Some(0), "{get:?}");
    assert_eq!(get.stdout, stdin_value);
    // A missing key writes no file.
    let nowhere = dir.path().join("absent.out");
    let get = cli(&["get", "absent", "--out", nowhere.to_str().unwrap()]);
    assert_eq!(get.status.code(), Some(1), "{get:?}");
    assert!(!nowhere.exists());
    // Over the value limit, and over the frame limit: the site's error, naming the limit.
    let over_value = file("over-value", &vec![7u8; MAX_VALUE + 1]);
    let put = cli(&["put", "too-big", "--value-file", &over_value]);
    assert_eq!(put.status.code(), Some(2), "{put:?}");
    let err = String::from_utf8_lossy(&put.stderr);
    assert!(
        err.contains(&format!(
            "exceeds the limit of {MAX_VALUE} bytes (limits.max_value)"
        )),
        "{err}"
    );
    let over_frame = file("over-frame", &vec![7u8; 20_000_000]);
    let put = cli(&["put", "too-big", "--value-file", &over_frame]);
    assert_eq!(put.status.code(), Some(2), "{put:?}");
    let err = String::from_utf8_lossy(&put.stderr);
    assert!(err.contains("too large"), "{err}");
    assert!(err.contains("(limits.max_frame)"), "{err}");
    assert_eq!(cli(&["get", "too-big"]).status.code(), Some(1));
    // A missing value file is a clear local error.
    let put = cli(&["put", "k", "--value-file", "/nonexistent/value"]);
    assert_eq!(put.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&put.stderr).contains("/nonexistent/value"));
    stop_dev(child);
}

#[test]
fn completions_scripts_are_valid() {
    let dir = tempfile::tempdir().unwrap();
    for shell in ["bash", "zsh", "fish"] {
        let out = Command::new(BIN)
            .args(["completions", shell])
            .output()
            .unwrap();
        assert!(out.status.success(), "{shell}: {out:?}");
        let script = String::from_utf8(out.stdout).unwrap();
        assert!(script.contains("causalkv"), "{shell}");
        assert!(
            script.contains("add-client"),
            "{shell}: subcommands completed"
        );
        let path = dir.path().join(format!("causalkv.{shell}"));
        std::fs::write(&path, &script).unwrap();
        if shell == "bash" {
            let check = Command::new("bash").arg("-n").arg(&path).output().unwrap();
            assert!(check.status.success(), "bash -n: {check:?}");
        }
    }
    let bad = Command::new(BIN)
        .args(["completions", "tcsh"])
        .output()
        .unwrap();
    assert_eq!(bad.status.code(), Some(2), "{bad:?}");
}

#[test]
fn version_names_the_crate_and_the_wire_protocol() {
    let out = Command::new(BIN).arg("--version").output().unwrap();
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8(out.stdout).unwrap();
    let want = format!(
        "causalkv {} (wire protocol {}: causalkv-client/{2}, causalkv-peer/{2}; peer protocol {3})\n",
        env!("CARGO_PKG_VERSION"),
        causalkv::tls::PROTOCOL_VERSION,
        causalkv::tls::PROTOCOL_VERSION,
        causalkv::peer_wire::PROTOCOL_VERSION,
    );
    assert_eq!(text, want);
    assert!(causalkv::tls::ALPN_CLIENT.ends_with(b"/2"));
}

#[test]
fn certs_add_client_issues_a_client_that_connects() {
    let dir = tempfile::tempdir().unwrap();
    let (child, _lines, banner, base) = spawn_dev(&dir.path().join("dev"), &["--sites", "1"]);
    assert!(banner.contains("1 sites up"), "{banner}");
    let certs_dir = dir.path().join("dev/certs");
    let site = format!("127.0.0.1:{base}");
    let certs = certs_dir.to_str().unwrap();
    // Before: the CLI has no certificate for `ops`.
    let before = cli_in(
        &certs_dir,
        &["put", "k", "v", "--site", &site, "--client", "ops"],
    );
    assert_eq!(before.status.code(), Some(2), "{before:?}");
    let add = Command::new(BIN)
        .args(["certs", "add-client", "ops", "--ca-dir", certs])
        .output()
        .unwrap();
    assert!(add.status.success(), "{add:?}");
    let printed = String::from_utf8_lossy(&add.stdout);
    assert!(printed.contains("client-ops.pem"), "{printed}");
    assert!(certs_dir.join("client-ops.key").exists());
    let put = cli_in(
        &certs_dir,
        &["put", "k", "v", "--site", &site, "--client", "ops"],
    );
    assert_eq!(put.status.code(), Some(0), "{put:?}");
    let get = cli_in(
        &certs_dir,
        &["get", "k", "--site", &site, "--client", "ops"],
    );
    assert_eq!(String::from_utf8_lossy(&get.stdout), "v\n");
    // Not twice without --force; not without a CA.
    let again = Command::new(BIN)
        .args(["certs", "add-client", "ops", "--ca-dir", certs])
        .output()
        .unwrap();
    assert_eq!(again.status.code(), Some(2), "{again:?}");
    assert!(String::from_utf8_lossy(&again.stderr).contains("refusing to overwrite"));
    let empty = dir.path().join("empty");
    let no_ca = Command::new(BIN)
        .args([
            "certs",
            "add-client",
            "ops",
            "--ca-dir",
            empty.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert_eq!(no_ca.status.code(), Some(2), "{no_ca:?}");
    assert!(String::from_utf8_lossy(&no_ca.stderr).contains("no CA certificate"));
    stop_dev(child);
}

/// `GET path` on a site's admin endpoint; returns the body.
fn admin_get(port: u16, path: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let (head, body) = out.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    body.to_owned()
}

#[test]
fn certificate_expiry_is_in_metrics_and_status() {
    let dir = tempfile::tempdir().unwrap();
    let (child, _lines, banner, base) = spawn_dev(&dir.path().join("dev"), &["--sites", "1"]);
    assert!(banner.contains("1 sites up"), "{banner}");
    let year = 365.0 * 24.0 * 3600.0;
    let metrics = admin_get(dev::admin_port(base, 0).unwrap(), "/metrics");
    assert!(
        metrics.contains("# TYPE causalkv_certificate_expiry_seconds gauge"),
        "{metrics}"
    );
    let gauge = |cert: &str| -> f64 {
        let prefix = format!("causalkv_certificate_expiry_seconds{{cert=\"{cert}\"}} ");
        let line = metrics
            .lines()
            .find(|l| l.starts_with(&prefix))
            .unwrap_or_else(|| panic!("no {prefix}in {metrics}"));
        line[prefix.len()..].parse().unwrap()
    };
    // `causalkv dev` issues sites five years and the CA ten years of validity.
    let site = gauge("site");
    assert!(site > 4.99 * year && site <= 5.0 * year, "{site}");
    let ca = gauge("ca");
    assert!(ca > 9.99 * year && ca <= 10.0 * year, "{ca}");
    let certs_dir = dir.path().join("dev/certs");
    let site_addr = format!("127.0.0.1:{base}");
    let status = cli_in(&certs_dir, &["status", "--site", &site_addr, "--json"]);
    assert_eq!(status.status.code(), Some(0), "{status:?}");
    let v: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    let listed = v["certificates"].as_array().unwrap();
    assert_eq!(listed.len(), 3, "{v}");
    assert_eq!(listed[0]["cert"], "certificate of site a");
    let left = listed[0]["expires_in_seconds"].as_f64().unwrap();
    assert!((left - site).abs() < 60.0, "{left} vs {site}");
    assert_eq!(v["warnings"].as_array().unwrap().len(), 0, "{v}");
    stop_dev(child);
}

// ---------------------------------------------------------------------------------------------
// Redis clients (RESP over TLS), with clients we did not write: redis-cli and redis-py.

/// `redis-cli --tls` against RESP listener `addr`, with the `cli` certificate, `commands` one
/// per line on stdin (one connection). Returns stdout.
fn redis_cli(certs: &std::path::Path, addr: std::net::SocketAddr, commands: &str) -> String {
    use std::io::Write;
    let c = certs.display();
    let mut child = Command::new("redis-cli")
        .args(["--tls", "--cacert", &format!("{c}/ca.pem")])
        .args(["--cert", &format!("{c}/client-cli.pem")])
        .args(["--key", &format!("{c}/client-cli.key")])
        .args(["-h", &addr.ip().to_string(), "-p", &addr.port().to_string()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run redis-cli");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(commands.as_bytes())
        .unwrap();
    // Off the runtime's worker (the sites run on the same runtime).
    let out = tokio::task::block_in_place(|| child.wait_with_output()).expect("redis-cli output");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    tracing::info!(%addr, commands, stdout, stderr = %String::from_utf8_lossy(&out.stderr), "redis-cli");
    stdout
}

/// Runs a scenario of `tests/resp_clients.py` (redis-py) against RESP listener `port`.
fn redis_py(certs: &std::path::Path, port: u16, scenario: &str, extra: &[String]) -> String {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/resp_clients.py");
    let mut cmd = Command::new("python3");
    cmd.arg(script)
        .arg(scenario)
        .args([
            "--certs",
            certs.to_str().unwrap(),
            "--port",
            &port.to_string(),
        ])
        .args(extra);
    // Off the runtime's worker (the sites run on the same runtime).
    let out = tokio::task::block_in_place(|| cmd.output()).expect("run python3");
    let stdout = common::assert_success(&out);
    assert!(stdout.contains(&format!("ok {scenario}")), "{stdout}");
    stdout
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_cli_writes_at_one_site_and_hands_its_session_to_another() {
    if !common::have_tool("redis-cli", &["--version"], "redis-tools (apt)") {
        return;
    }
    common::bounded(ms(60_000), async {
        // a's updates reach b through a relay that can hold them.
        let mut prep = Cluster::prepare(2);
        let relay = Relay::start(prep.configs[1].me().addr, Duration::ZERO);
        prep.configs[0].sites[1].addr = relay.addr();
        for c in &mut prep.configs {
            c.timeouts.request_ms = 1_000;
        }
        let cluster = prep.start().await;
        cluster.wait_connected().await;
        let (a, b) = (cluster.resp_addr(0), cluster.resp_addr(1));
        let certs = cluster.certs.clone();

        // A write at a is read at b.
        assert_eq!(redis_cli(&certs, a, "SET greeting hello\n").trim(), "OK");
        common::eventually(ms(10_000), "b reads what a wrote", async || {
            redis_cli(&certs, b, "GET greeting\n").trim() == "hello"
        })
        .await;

        // Hand-over: with a's updates held, a session writes at a and takes its token to b.
        relay.hold(true);
        let out = redis_cli(&certs, a, "SET handed over\nGET handed\nCAUSAL.TOKEN\n");
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines[..2], ["OK", "over"], "{out}");
        let token = lines[2];
        assert!(token.starts_with("ckv1."), "{out}");
        // A fresh session at b does not see the write (b has not received it)...
        assert_eq!(
            redis_cli(&certs, b, "GET handed\n").trim(),
            "",
            "b has the write already"
        );
        // ...a session that adopted the token waits for it and says why when it cannot have it.
        let out = redis_cli(&certs, b, &format!("CAUSAL.TOKEN {token}\nGET handed\n"));
        assert!(out.starts_with("OK\n"), "{out}");
        assert!(out.contains("waited 1000 ms"), "{out}");
        // Once the link flows again, the adopting session reads the session's write at b.
        relay.hold(false);
        common::eventually(
            ms(20_000),
            "the adopting session reads the write at b",
            async || {
                redis_cli(&certs, b, &format!("CAUSAL.TOKEN {token}\nGET handed\n")) == "OK\nover\n"
            },
        )
        .await;
        // An adopted token is the session's context: CAUSAL.TOKEN hands it back unchanged.
        let out = redis_cli(&certs, b, &format!("CAUSAL.TOKEN {token}\nCAUSAL.TOKEN\n"));
        assert!(out.lines().nth(1).is_some_and(|t| t == token), "{out}");
        cluster.shutdown().await;
        drop(relay);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_py_wait_pipelining_and_bad_input() {
    let have = common::have_tool(
        "python3",
        &["-c", "import redis"],
        "redis-py (pip install redis)",
    );
    if !have {
        return;
    }
    common::bounded(ms(120_000), async {
        // a reaches c through a relay that can cut the link.
        let mut prep = Cluster::prepare(3);
        let relay = Relay::start(prep.configs[2].me().addr, Duration::ZERO);
        prep.configs[0].sites[2].addr = relay.addr();
        let (max_value, max_arg_bytes, max_pipeline, max_connections) = (16 << 10, 64 << 10, 32, 8);
        let max_reply_bytes = 256 << 10;
        for c in &mut prep.configs {
            c.limits = dev::limits_for_max_value(max_value);
            let r = c.resp.as_mut().expect("test sites have a RESP listener");
            r.max_arg_bytes = max_arg_bytes;
            r.max_pipeline = max_pipeline;
            r.max_connections = max_connections;
            r.max_reply_bytes = max_reply_bytes;
        }
        let cluster = prep.start().await;
        cluster.wait_connected().await;
        let certs = cluster.certs.clone();
        let a = cluster.resp_addr(0).port();

        // WAIT returns 2 with both remote sites up, over RESP2 and RESP3.
        for proto in ["2", "3"] {
            let args = [
                "--replicas",
                "2",
                "--timeout-ms",
                "10000",
                "--expect",
                "2",
                "--protocol",
                proto,
            ];
            redis_py(&certs, a, "wait", &args.map(String::from));
        }
        // With c cut off, WAIT 2 returns 1 within its timeout.
        relay.cut(true);
        redis_py(
            &certs,
            a,
            "wait-cut",
            &["--timeout-ms", "300"].map(String::from),
        );
        relay.cut(false);
        // Pipelining, refused options, oversized arguments, garbage, the connection limit.
        let limits = [
            format!("--max-value={max_value}"),
            format!("--max-arg-bytes={max_arg_bytes}"),
            format!("--max-pipeline={max_pipeline}"),
            format!("--max-connections={max_connections}"),
            format!("--max-reply-bytes={max_reply_bytes}"),
        ];
        redis_py(&certs, a, "misc", &limits);
        assert!(
            cluster
                .node(0)
                .metrics()
                .malformed_frames
                .load(std::sync::atomic::Ordering::Relaxed)
                >= 2
        );
        // The site still serves QUIC clients and replicates.
        let quic = cluster.client(0).await;
        quic.put("after", "bad input").await.unwrap();
        let at_c = cluster.client(2).await;
        common::eventually(
            ms(10_000),
            "c has a's write after the cut healed",
            async || at_c.get("after").await.ok().flatten().is_some(),
        )
        .await;
        // The RESP pipeline's writes are there for QUIC clients.
        assert_eq!(quic.get("pk3").await.unwrap().as_deref(), Some(&b"pv3"[..]));
        cluster.shutdown().await;
        drop(relay);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_cli_conditional_writes_and_cas_use_the_strong_keyspace() {
    if !common::have_tool("redis-cli", &["--version"], "redis-tools (apt)") {
        return;
    }
    common::bounded(ms(90_000), async {
        let cluster = Cluster::prepare(3).start().await;
        cluster.wait_connected().await;
        let (a, b, c) = (
            cluster.resp_addr(0),
            cluster.resp_addr(1),
            cluster.resp_addr(2),
        );
        let certs = cluster.certs.clone();
        common::eventually(ms(30_000), "the strong group elects a leader", async || {
            (0..3).all(|i| {
                cluster
                    .node(i)
                    .status()
                    .consensus
                    .is_some_and(|s| s.leader.is_some())
            })
        })
        .await;

        // SET NX: one site takes the lock, a second NX elsewhere gets nil, and every site reads
        // the holder linearizably at once.
        assert_eq!(redis_cli(&certs, a, "SET lock owner-a NX\n"), "OK\n");
        assert_eq!(redis_cli(&certs, b, "SET lock owner-b NX\n"), "\n");
        assert_eq!(redis_cli(&certs, c, "STRONG.GET lock\n"), "owner-a\n");
        // SET XX writes only a key that holds a value.
        assert_eq!(
            redis_cli(&certs, b, "SET nobody v XX\nSTRONG.GET nobody\n"),
            "\n\n"
        );
        assert_eq!(redis_cli(&certs, b, "SET lock owner-b XX\n"), "OK\n");
        // CAS: a stale expectation fails and returns the current value; a fresh one swaps.
        assert_eq!(
            redis_cli(&certs, a, "CAS lock EXPECT owner-a SET owner-c\n"),
            "0\nowner-b\n"
        );
        assert_eq!(
            redis_cli(
                &certs,
                c,
                "CAS lock EXPECT owner-b DELETE\nCAS lock ABSENT SET owner-c\n"
            ),
            "1\n\n1\nowner-c\n"
        );
        assert_eq!(
            redis_cli(&certs, a, "STRONG.SET s 1\nSTRONG.DEL s\nSTRONG.GET s\n"),
            "OK\nOK\n\n"
        );
        // The keyspaces are apart: a causal GET does not see the strong key, nor a causal SET
        // the strong read.
        assert_eq!(
            redis_cli(&certs, a, "GET lock\nSET lock causal\nSTRONG.GET lock\n"),
            "\nOK\nowner-c\n"
        );

        // Causality across levels: a session writes x causally, then s strongly; a session at
        // b that reads s strongly has x in its context (so a causal read there waits for x).
        let out = redis_cli(&certs, a, "SET x 1\nSTRONG.SET s after-x\nCAUSAL.TOKEN\n");
        let writer = causalkv::client::decode_session_token(out.lines().nth(2).unwrap())
            .unwrap_or_else(|| panic!("no token: {out}"));
        let out = redis_cli(&certs, b, "CAUSAL.TOKEN\nSTRONG.GET s\nCAUSAL.TOKEN\n");
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines[1], "after-x", "{out}");
        let before = causalkv::client::decode_session_token(lines[0]).unwrap();
        let after = causalkv::client::decode_session_token(lines[2]).unwrap();
        assert_eq!(before.get(0), 0, "a fresh session has an empty context");
        assert!(
            after.get(0) >= writer.get(0) && writer.get(0) > 0,
            "the strong read did not carry the writer's context: {after:?} vs {writer:?}"
        );
        cluster.shutdown().await;
    })
    .await;
}

/// Runs the redis-py causal chain across three sites (a's updates reach c 500 ms late) and
/// returns the checker's report on the history it recorded, and how many probe sessions at c
/// read y_i and then found x_i absent.
async fn resp_causal_chain(
    opts: causalkv::net::NodeOptions,
) -> (causalkv::tools::checker::Report, usize) {
    use causalkv::tools::checker::{self, History, Op};
    let mut prep = Cluster::prepare(3);
    let relay = Relay::start(prep.configs[2].me().addr, ms(500));
    prep.configs[0].sites[2].addr = relay.addr();
    let cluster = prep.start_with(opts).await;
    cluster.wait_connected().await;
    let ports: Vec<String> = (0..3)
        .map(|i| cluster.resp_addr(i).port().to_string())
        .collect();
    let out = redis_py(
        &cluster.certs,
        0,
        "chain",
        &[format!("--ports={}", ports.join(",")), "--rounds=8".into()],
    );
    let mut history = History::new();
    let mut last_y: std::collections::HashMap<u64, bool> = Default::default();
    let mut y_without_x = 0;
    for line in out.lines().filter(|l| l.starts_with('{')) {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        let (s, site) = (v["s"].as_u64().unwrap(), v["site"].as_u64().unwrap() as u16);
        let key = v["k"].as_str().unwrap().to_owned();
        let value = v["v"].as_str().map(|x| x.as_bytes().to_vec());
        if v["op"] == "w" {
            history.record(Op::write(s as _, site, key, value.unwrap()));
        } else {
            if site == 2 {
                if key.starts_with('y') {
                    last_y.insert(s, value.is_some());
                } else if value.is_none() && last_y.get(&s) == Some(&true) {
                    y_without_x += 1;
                }
            }
            history.record(Op::read(s as _, site, key, value));
        }
    }
    assert!(
        history.len() > 8 * 4,
        "the chain recorded {} operations",
        history.len()
    );
    cluster.shutdown().await;
    drop(relay);
    (checker::check(&history), y_without_x)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resp_sessions_keep_a_causal_chain_across_three_sites() {
    if !common::have_tool(
        "python3",
        &["-c", "import redis"],
        "redis-py (pip install redis)",
    ) {
        return;
    }
    common::bounded(ms(180_000), async {
        let (report, y_without_x) = resp_causal_chain(Default::default()).await;
        assert!(report.is_ok(), "causal violations through RESP: {report:?}");
        assert_eq!(y_without_x, 0);
        // The same chain with c applying updates without waiting for their dependencies (a
        // planted bug): the checker must catch what the probes saw.
        let planted = causalkv::net::NodeOptions {
            check_deps: false,
            ..Default::default()
        };
        let (report, y_without_x) = resp_causal_chain(planted).await;
        assert!(
            y_without_x > 0,
            "the delayed link never showed y before x at c"
        );
        assert!(
            !report.is_ok(),
            "the checker missed {y_without_x} reads of y without x"
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resp_client_certificates_are_required_unless_opted_out_and_the_opt_out_is_logged() {
    if !common::have_tool("redis-cli", &["--version"], "redis-tools (apt)") {
        return;
    }
    common::bounded(ms(60_000), async {
        let mut prep = Cluster::prepare(2);
        prep.configs[1].resp.as_mut().unwrap().require_client_cert = false;
        let cluster = prep.start().await;
        let ca = cluster.ca();
        let no_cert_ping = |i: usize| {
            let addr = cluster.resp_addr(i);
            let mut cmd = Command::new("redis-cli");
            cmd.args(["--tls", "--cacert", ca.to_str().unwrap()]).args([
                "-h",
                "127.0.0.1",
                "-p",
                &addr.port().to_string(),
                "PING",
            ]);
            let out = tokio::task::block_in_place(|| cmd.output()).expect("run redis-cli");
            String::from_utf8_lossy(&out.stdout).into_owned()
                + &String::from_utf8_lossy(&out.stderr)
        };
        // Site a requires a client certificate (the default): no certificate, no service.
        let out = no_cert_ping(0);
        assert!(!out.contains("PONG"), "{out}");
        assert!(
            cluster
                .node(0)
                .metrics()
                .tls_failures
                .load(std::sync::atomic::Ordering::Relaxed)
                >= 1
        );
        // Site b opted out, and said so when it started.
        assert_eq!(no_cert_ping(1).trim(), "PONG");
        assert!(common::log_line_contains_all(&[
            "site{name=b}",
            "WITHOUT a certificate",
            "require_client_cert = false"
        ]));
        assert!(!common::log_line_contains_all(&[
            "site{name=a}",
            "WITHOUT a certificate"
        ]));
        // With the certificate, site a serves.
        assert_eq!(
            redis_cli(&cluster.certs, cluster.resp_addr(0), "PING\n").trim(),
            "PONG"
        );
        cluster.shutdown().await;
    })
    .await;
}

/// The checked workload of the benchmark scripts (`causalkv bench checked`) over a real 3-site
/// cluster: its sessions hop between sites with their tokens and read each other's writes, the
/// recorded history passes the causal checker, and the sites converge.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_checked_workload_hops_between_sites_and_its_history_passes_the_checker() {
    use causalkv::tools::checked::{self, CheckedOptions};
    common::bounded(ms(60_000), async {
        let cluster = Cluster::start(3).await;
        cluster.wait_connected().await;
        let certs = cluster.certs.clone();
        let addrs: Vec<_> = (0..3).map(|i| cluster.addr(i)).collect();
        let connect: checked::Connect = std::sync::Arc::new(move |i| {
            let builder = common::cli_client_builder(&certs, [addrs[i]]);
            Box::pin(builder.connect())
        });
        let seed = common::env_u64("CHECK_SEED", causalkv::client::random_id());
        eprintln!("seed {seed} (replay: CHECK_SEED={seed})");
        let opts = CheckedOptions {
            sites: 3,
            sessions_per_site: 2,
            duration: ms(1_500),
            keys: 16,
            read_ratio: 0.5,
            hop_every: 5,
            settle: ms(20_000),
            seed,
        };
        let r = checked::run_checked(connect, &opts).await;
        assert!(r.ok, "{r:?}");
        assert_eq!((r.sessions, r.violations, r.errors), (6, 0, 0), "{r:?}");
        assert!(r.ops > 100 && r.reads > 0 && r.hops > 0, "{r:?}");
        assert!(
            r.remote_reads > 0,
            "no read saw another site's write: {r:?}"
        );
        cluster.shutdown().await;
    })
    .await;
}
