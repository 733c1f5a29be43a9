//! Membership changes online, on real `causalkv serve` processes over QUIC and mutual TLS.
//!
//! - Adding a site under load: three sites serve causal sessions (recorded for the causal
//!   checker) and strong operations (recorded for the linearizability checker) while a fourth
//!   site gets its certificate (`causalkv certs add-site`), is added (`causalkv sites add`),
//!   starts with `join_from`, loads a snapshot from a running site and catches up from every
//!   site. It becomes a Raft voter and an active member; sessions carrying tokens from before
//!   the change read their own writes there; no operation fails at the other sites; every
//!   site converges and both checkers pass.
//! - A join request from a site the cluster does not count is refused with a clear error, and
//!   the site asked keeps serving.
//!
//! `MEMBERSHIP_SEED` replays the random operation mix.

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use causalkv::Client;
use causalkv::config::{ConsensusConfig, SiteConfig, SiteEntry};
use causalkv::tools::checker::{self, Op};
use causalkv::tools::lincheck::{self, Command, Recorder, Response, Verdict};
use common::{BIN, Cluster, Logged, Processes, bounded, env_u64, eventually, ms};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Three sites with consensus timeouts for loopback, as processes, connected, with the
/// configuration bootstrapped.
async fn three_sites() -> Processes {
    let mut prep = Cluster::prepare(3);
    for cfg in &mut prep.configs {
        cfg.consensus = ConsensusConfig {
            heartbeat_ms: 200,
            election_min_ms: 800,
            election_max_ms: 1_600,
            ..Default::default()
        };
    }
    let p = prep.spawn().await;
    p.wait_connected().await;
    let c = p.client(0).await;
    eventually(
        ms(20_000),
        "the configuration is bootstrapped",
        async || {
            c.status()
                .await
                .is_ok_and(|s| s.membership.is_some_and(|m| m.epoch == 1))
        },
    )
    .await;
    p
}

/// The configuration of site `name`, joining the sites of `p` from `from`, listening on a
/// free port, with a certificate made by `causalkv certs add-site`.
fn joiner(p: &Processes, name: &str, from: &str) -> SiteConfig {
    let out = std::process::Command::new(BIN)
        .args(["certs", "add-site", name, "--ca-dir"])
        .arg(&p.certs)
        .output()
        .expect("run the CLI");
    common::assert_success(&out);
    let mut cfg = p.configs[2].clone();
    let id = p.configs[0].sites.len() as u16;
    cfg.site_id = id;
    cfg.sites
        .push(SiteEntry::new(id, name, common::free_addr()));
    cfg.data_dir = p.dir.path().join(format!("site-{name}"));
    let paths = causalkv::tools::certs::site_paths(&p.certs, name);
    cfg.tls.cert = paths.cert;
    cfg.tls.key = paths.key;
    cfg.admin_addr = None;
    cfg.resp = None;
    cfg.join_from = Some(from.into());
    cfg
}

/// `causalkv sites ARGS --certs CERTS`.
fn sites_cli(certs: &std::path::Path, args: &[&str]) -> std::process::Output {
    std::process::Command::new(BIN)
        .arg("sites")
        .args(args)
        .arg("--certs")
        .arg(certs)
        .output()
        .expect("run the CLI")
}

/// One causal session's log and its failures.
#[derive(Default)]
struct SessionLog {
    ops: Vec<Logged>,
    failures: Vec<String>,
}

/// A causal session at one site until `stop`: unique writes to a few keys and reads.
async fn causal_session(
    client: Client,
    sid: u64,
    site: u16,
    seed: u64,
    stop: Arc<AtomicBool>,
) -> SessionLog {
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ sid);
    let mut log = SessionLog::default();
    let mut n = 0u64;
    while !stop.load(Ordering::Relaxed) {
        n += 1;
        let key = format!("k{}", rng.gen_range(0..8));
        if rng.gen_bool(0.5) {
            let value = format!("{sid}-{n}");
            match client.put(&key, &value).await {
                Ok(_) => log
                    .ops
                    .push(Logged::Acked(Op::write(sid, site, key, value))),
                Err(e) => {
                    log.ops
                        .push(Logged::Unknown(Op::write(sid, site, key, value)));
                    log.failures.push(e.to_string());
                    // A write of unknown outcome ends the session (see common::history).
                    break;
                }
            }
        } else {
            match client.get(&key).await {
                Ok(v) => log.ops.push(Logged::Acked(Op::read(
                    sid,
                    site,
                    key,
                    v.map(|b| b.to_vec()),
                ))),
                Err(e) => log.failures.push(e.to_string()),
            }
        }
        tokio::time::sleep(ms(2)).await;
    }
    log
}

/// Random strong operations on `keys` at one site until `stop`, recorded; returns the errors.
async fn strong_session(
    client: Client,
    rec: Recorder,
    id: u64,
    seed: u64,
    keys: Vec<Vec<u8>>,
    stop: Arc<AtomicBool>,
) -> Vec<String> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ (id << 32));
    let mut failures = Vec::new();
    let mut n = 0u64;
    while !stop.load(Ordering::Relaxed) {
        n += 1;
        let key = keys[rng.gen_range(0..keys.len())].clone();
        let value = format!("{id}-{n}").into_bytes();
        let (cmd, result) = if rng.gen_bool(0.5) {
            let cmd = Command::get(key.clone());
            let pending = rec.invoke(id, cmd.clone());
            let r = client.get_strong(&key).await;
            match r {
                Ok(v) => {
                    pending.complete(Response::Value(v.map(|b| b.to_vec())));
                    (cmd, Ok(()))
                }
                Err(e) => {
                    pending.unknown();
                    (cmd, Err(e))
                }
            }
        } else {
            let cmd = Command::put(key.clone(), value.clone());
            let pending = rec.invoke(id, cmd.clone());
            match client.put_strong(&key, &value).await {
                Ok(()) => {
                    pending.complete(Response::Ack);
                    (cmd, Ok(()))
                }
                Err(e) => {
                    pending.unknown();
                    (cmd, Err(e))
                }
            }
        };
        if let Err(e) = result {
            failures.push(format!("{cmd:?}: {e}"));
        }
        tokio::time::sleep(ms(5)).await;
    }
    failures
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn join_a_fourth_site_under_load_catches_up_becomes_a_voter_and_old_tokens_work() {
    bounded(ms(300_000), async {
        let seed = env_u64("MEMBERSHIP_SEED", 0x6a01);
        println!("seed {seed:#x} (MEMBERSHIP_SEED)");
        let mut p = three_sites().await;
        // Data from before the change, and a session token per site that saw its own write.
        let bulk = p.client(0).await;
        for k in 0..2_000 {
            bulk.put(format!("bulk{k}"), format!("v{k}"))
                .await
                .expect("bulk put");
        }
        let mut old_tokens = Vec::new();
        for i in 0..3 {
            let c = p.client(i).await;
            c.put(format!("old{i}"), format!("from {i}"))
                .await
                .expect("put before the change");
            old_tokens.push(c.session_token());
        }
        // Load at a, b and c: causal sessions and strong operations.
        let stop = Arc::new(AtomicBool::new(false));
        let rec = Recorder::new();
        let strong_keys: Vec<Vec<u8>> = (0..3).map(|k| format!("hot{k}").into_bytes()).collect();
        let mut causal = tokio::task::JoinSet::new();
        let mut strong = tokio::task::JoinSet::new();
        for site in 0..3usize {
            for s in 0..2u64 {
                let client = p
                    .client_builder(site)
                    .timeout(ms(10_000))
                    .connect()
                    .await
                    .expect("client");
                causal.spawn(causal_session(
                    client,
                    site as u64 * 10 + s,
                    site as u16,
                    seed,
                    stop.clone(),
                ));
            }
            let client = p
                .client_builder(site)
                .timeout(ms(10_000))
                .connect()
                .await
                .expect("client");
            strong.spawn(strong_session(
                client,
                rec.clone(),
                100 + site as u64,
                seed,
                strong_keys.clone(),
                stop.clone(),
            ));
        }
        let before = rec.snapshot().len();
        eventually(ms(30_000), "the strong load makes progress", async || {
            rec.snapshot().len() >= before + 20
        })
        .await;
        // The operator's procedure: certificate, `sites add`, then start the site.
        let cfg = joiner(&p, "d", "a");
        let d_addr = cfg.me().addr;
        let out = sites_cli(
            &p.certs,
            &[
                "add",
                "d",
                "--addr",
                &d_addr.to_string(),
                "--site",
                &p.addr(1).to_string(),
            ],
        );
        common::assert_success(&out);
        let d = p.add(cfg);
        p.wait_listening(d, ms(60_000)).await;
        assert!(p.log(d).contains("joined: snapshot loaded"), "{}", p.log(d));
        let at_d = p
            .client_builder(d)
            .timeout(ms(10_000))
            .connect()
            .await
            .expect("client of d");
        // d becomes a voter and an active member, at every site.
        let status: Vec<Client> = {
            let mut v = Vec::new();
            for i in 0..4 {
                v.push(p.client(i).await);
            }
            v
        };
        eventually(
            ms(90_000),
            "d is an active member and a voter",
            async || {
                for c in &status {
                    let Ok(s) = c.status().await else {
                        return false;
                    };
                    let active = s
                        .membership
                        .as_ref()
                        .is_some_and(|m| m.sites.len() == 4 && m.sites[3].state == "active");
                    let voter = s
                        .consensus
                        .as_ref()
                        .is_some_and(|c| c.voters.iter().any(|v| v.site == 3));
                    if !(active && voter) {
                        return false;
                    }
                }
                true
            },
        )
        .await;
        // Old tokens, issued before d existed, read their own writes at d.
        for (i, token) in old_tokens.iter().enumerate() {
            let c = p.client(d).await;
            c.set_session_token(token).expect("old token");
            assert_eq!(
                c.get(format!("old{i}")).await.expect("get at d").as_deref(),
                Some(format!("from {i}").as_bytes()),
                "the write of site {i}'s old session, read at d"
            );
        }
        assert_eq!(
            at_d.get("bulk1999").await.expect("bulk at d").as_deref(),
            Some(&b"v1999"[..])
        );
        // d serves causal sessions and strong operations of its own.
        for s in 0..2u64 {
            let client = p
                .client_builder(d)
                .timeout(ms(10_000))
                .connect()
                .await
                .expect("client");
            causal.spawn(causal_session(client, 30 + s, 3, seed, stop.clone()));
        }
        let strong_at_d = p
            .client_builder(d)
            .timeout(ms(10_000))
            .connect()
            .await
            .expect("client");
        strong.spawn(strong_session(
            strong_at_d,
            rec.clone(),
            103,
            seed,
            strong_keys.clone(),
            stop.clone(),
        ));
        let mark = rec.snapshot().len();
        eventually(ms(30_000), "the load goes on with d", async || {
            rec.snapshot().len() >= mark + 50
        })
        .await;
        stop.store(true, Ordering::Relaxed);
        let mut logs = Vec::new();
        let mut failures = Vec::new();
        while let Some(r) = causal.join_next().await {
            let log = r.expect("causal session");
            failures.extend(log.failures.iter().cloned());
            logs.push(log.ops);
        }
        while let Some(r) = strong.join_next().await {
            failures.extend(r.expect("strong session"));
        }
        assert!(failures.is_empty(), "operations failed: {failures:?}");
        // Every site converges on the same contents.
        let keys: Vec<String> = (0..8).map(|k| format!("k{k}")).collect();
        let mut fin: BTreeMap<String, String> = BTreeMap::new();
        eventually(ms(60_000), "the four sites converge", async || {
            let mut states = Vec::new();
            for (i, c) in status.iter().enumerate() {
                let mut state = BTreeMap::new();
                for k in &keys {
                    match c.get_versioned(k).await {
                        Ok(r) => {
                            state.insert(k.clone(), (r.value.map(|b| b.to_vec()), r.version));
                        }
                        Err(_) => return false,
                    }
                }
                states.push((i as u16, state));
            }
            if checker::check_convergence(&states).is_err() {
                return false;
            }
            fin = states[0]
                .1
                .iter()
                .filter_map(|(k, (v, _))| {
                    v.as_ref()
                        .map(|v| (k.clone(), String::from_utf8(v.clone()).expect("utf-8")))
                })
                .collect();
            true
        })
        .await;
        let built = common::history(
            logs.iter().map(Vec::as_slice),
            fin.iter().map(|(k, v)| (k.as_str(), v.as_str())),
        );
        let report = checker::check(&built.history);
        println!(
            "causal: {} writes, {} reads; {report}",
            built.writes, built.reads
        );
        assert!(report.is_ok(), "{report}");
        // Final strong reads at every site close the linearizability history.
        for (i, c) in status.iter().enumerate() {
            for key in &strong_keys {
                let cmd = Command::get(key.clone());
                let pending = rec.invoke(200 + i as u64, cmd);
                let v = c.get_strong(key).await.expect("final strong read");
                pending.complete(Response::Value(v.map(|b| b.to_vec())));
            }
        }
        let history = rec.snapshot();
        let lin = lincheck::check(&history);
        println!("strong: {} operations; {lin}", history.len());
        assert_eq!(lin.verdict(), Verdict::Ok, "{lin}");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn join_request_from_a_site_the_cluster_does_not_count_is_refused_with_a_clear_error() {
    bounded(ms(120_000), async {
        let mut p = three_sites().await;
        // A site with a valid certificate starts to join without `sites add`.
        let cfg = joiner(&p, "d", "a");
        let d = p.add(cfg);
        eventually(
            ms(30_000),
            "the joining site logs the refusal",
            async || {
                p.log(d)
                    .contains("not in this node's cluster configuration")
            },
        )
        .await;
        assert!(
            p.log(d).contains("joining: snapshot request failed"),
            "{}",
            p.log(d)
        );
        assert!(
            p.log(0).contains("peer refused"),
            "a logs the refusal: {}",
            p.log(0)
        );
        assert!(!p.log(d).contains("site listening"), "{}", p.log(d));
        // a keeps serving.
        let c = p.client(0).await;
        c.put("still", "serving").await.expect("put at a");
        assert_eq!(
            c.get("still").await.expect("get at a").as_deref(),
            Some(&b"serving"[..])
        );
        p.kill(d);
    })
    .await;
}
