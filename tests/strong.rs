//! Strong operations end to end, over real QUIC and mutual TLS: three sites, one Raft group,
//! every inter-site link behind the WAN emulator ([`Wan`]: delay each way, cuts, isolation).
//!
//! - Concurrent clients at every site run put, get, cas and delete on a few hot keys; the
//!   recorded history must be linearizable ([`lincheck`]).
//! - The planted bug: with the test-only switch that serves strong reads from a follower's
//!   local state, the same checker must report violations.
//! - Split brain: the leader's site is cut off; there strong operations fail with
//!   `Unavailable` while causal ones succeed; the majority elects a new leader and serves both.
//! - Failover: the leader's node stops; the others elect a new one and strong writes resume;
//!   the old leader comes back as a follower with every acknowledged write.
//!
//! - Real `causalkv serve` processes behind the WAN emulator (10 ms each way): concurrent
//!   clients at every site while the leader's process is killed with `kill -9` (and
//!   restarted), the leader is cut off from the majority, and a follower is isolated; the
//!   history, closed by final reads at every site, must be linearizable, so no acknowledged
//!   write was lost. It prints the failover times (kill to the next successful strong write).
//!
//! - The cluster configuration: the `[[sites]]` of the files seed it once, through the Raft
//!   group; `causalkv sites list` shows it at every site, `/metrics` and the status its epoch;
//!   `causalkv sites add` raises the epoch and adds a joining site with the next id; a site
//!   restarted from its unchanged file loads the replicated configuration (four sites) and
//!   still replicates with the sites that count three, and tokens from before the change
//!   work at it.
//!
//! `STRONG_SEED` replays the random operation mix; `STRONG_OPS` sets the operations per client
//! of the in-process test; `STRONG_KILLS` (default 10) and `STRONG_MIN_OPS` (default 10,000)
//! size the process test.

use crate::common;

use std::time::Duration;

use crate::common::{BIN, Cluster, bounded, env_u64, eventually, ms, sites_cli};
use causalkv::client::CasOutcome;
use causalkv::config::ConsensusConfig;
use causalkv::net::{NodeOptions, StrongOptions};
use causalkv::tools::lincheck::{self, Command, Recorder, Response, Verdict};
use causalkv::tools::wan::{LinkParams, Wan};
use causalkv::{Client, ClientError};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Three sites laid out behind the WAN emulator, every link delayed by `delay` each way, with
/// consensus timeouts for loopback plus that delay.
fn relayed(delay: Duration) -> (common::Prepared, Wan) {
    let mut prep = Cluster::prepare(3);
    for c in &mut prep.configs {
        c.consensus = ConsensusConfig {
            heartbeat_ms: 300,
            election_min_ms: 1_200,
            election_max_ms: 2_400,
            ..Default::default()
        };
    }
    let one_way = delay.as_secs_f64() * 1000.0;
    let wan = prep.behind_wan(|_, _| LinkParams::default().with_delay_ms(one_way));
    (prep, wan)
}

/// Three in-process sites behind [`relayed`] links, started with `opts` and connected.
async fn cluster(delay: Duration, opts: NodeOptions) -> (Cluster, Wan) {
    let (prep, wan) = relayed(delay);
    let c = prep.start_with(opts).await;
    c.wait_connected().await;
    (c, wan)
}

/// The leader, one of `sites`, that every site in `sites` agrees on.
async fn leader(c: &Cluster, sites: &[usize]) -> usize {
    let mut found = None;
    eventually(ms(20_000), "the sites agree on a leader", async || {
        let leaders: Vec<Option<u16>> = sites
            .iter()
            .map(|&i| c.node(i).status().consensus.and_then(|s| s.leader))
            .collect();
        found = leaders[0]
            .filter(|l| sites.contains(&(*l as usize)) && leaders.iter().all(|m| *m == leaders[0]));
        found.is_some()
    })
    .await;
    found.expect("leader") as usize
}

/// Runs one recorded strong operation.
async fn run(client: &Client, rec: &Recorder, id: u64, cmd: Command) -> Result<(), ClientError> {
    let pending = rec.invoke(id, cmd.clone());
    let result = match cmd {
        Command::Put { key, value } => client
            .put_strong(&key, &value)
            .await
            .map(|()| Response::Ack),
        Command::Delete { key } => client.delete_strong(&key).await.map(|()| Response::Ack),
        Command::Get { key } => client
            .get_strong(&key)
            .await
            .map(|v| Response::Value(v.map(|b| b.to_vec()))),
        Command::Cas { key, expected, new } => client
            .cas(&key, expected.as_deref(), new.as_deref())
            .await
            .map(|o| match o {
                CasOutcome::Swapped => Response::CasOk,
                CasOutcome::Failed { current } => Response::CasFailed {
                    current: current.map(|b| b.to_vec()),
                },
            }),
    };
    match result {
        Ok(r) => {
            pending.complete(r);
            Ok(())
        }
        Err(e) => {
            match e {
                // Certainly not applied.
                ClientError::Unavailable(_) => pending.fail(),
                _ => pending.unknown(),
            }
            Err(e)
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_strong_operations_are_linearizable() {
    bounded(ms(240_000), async {
        let seed = env_u64("STRONG_SEED", 0x5742_0001);
        let per_client = env_u64("STRONG_OPS", 120);
        println!("seed {seed:#x} (STRONG_SEED), {per_client} ops per client (STRONG_OPS)");
        let (c, _wan) = cluster(ms(5), NodeOptions::default()).await;
        leader(&c, &[0, 1, 2]).await;
        let rec = Recorder::new();
        let keys: Vec<Vec<u8>> = (0..3).map(|k| format!("hot{k}").into_bytes()).collect();
        let mut tasks = tokio::task::JoinSet::new();
        for site in 0..3 {
            for k in 0..2u64 {
                let id = site as u64 * 10 + k;
                let client = c.client(site).await;
                let (rec, keys) = (rec.clone(), keys.clone());
                tasks.spawn(async move {
                    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ id);
                    let mut seen: Option<Vec<u8>> = None;
                    let mut errors = 0;
                    for n in 0..per_client {
                        let key = keys[rng.gen_range(0..keys.len())].clone();
                        let value = format!("{id}-{n}").into_bytes();
                        let cmd = match rng.gen_range(0..100) {
                            0..35 => Command::get(key),
                            35..65 => Command::put(key, value),
                            65..95 => Command::cas(key, seen.clone(), Some(value)),
                            _ => Command::delete(key),
                        };
                        match run(&client, &rec, id, cmd.clone()).await {
                            Ok(()) => {}
                            Err(e) => {
                                errors += 1;
                                println!("client {id}: {cmd}: {e}");
                            }
                        }
                        if let Command::Put { value, .. } = cmd {
                            seen = Some(value);
                        }
                    }
                    errors
                });
            }
        }
        let mut errors = 0;
        while let Some(r) = tasks.join_next().await {
            errors += r.expect("client task");
        }
        let history = rec.snapshot();
        let report = lincheck::check(&history);
        println!("{report}");
        assert_eq!(report.verdict(), Verdict::Ok, "{report}");
        assert!(
            errors * 10 <= history.len(),
            "{errors} of {} operations failed without faults",
            history.len()
        );
        c.shutdown().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn follower_local_reads_are_caught_by_the_checker() {
    bounded(ms(120_000), async {
        // Followers learn of a commit one append after the leader: with 100 ms links, a
        // follower's local state lags every acknowledged write by about that much.
        let opts = NodeOptions {
            strong: StrongOptions {
                local_reads: true,
                ..Default::default()
            },
            ..Default::default()
        };
        let (c, _wan) = cluster(ms(50), opts).await;
        let l = leader(&c, &[0, 1, 2]).await;
        let f = (l + 1) % 3;
        let (writer, reader) = (c.client(l).await, c.client(f).await);
        let rec = Recorder::new();
        for n in 0..10 {
            let v = format!("v{n}").into_bytes();
            run(&writer, &rec, 1, Command::put("k", v))
                .await
                .expect("put at the leader");
            run(&reader, &rec, 2, Command::get("k"))
                .await
                .expect("local read");
        }
        let report = lincheck::check(&rec.snapshot());
        println!("{report}");
        assert_eq!(
            report.verdict(),
            Verdict::Violation,
            "reads from a follower's local state must be caught: {report}"
        );
        c.shutdown().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_cut_off_leader_is_unavailable_for_strong_operations_but_serves_causal_ones() {
    bounded(ms(180_000), async {
        let (c, wan) = cluster(ms(2), NodeOptions::default()).await;
        let old = leader(&c, &[0, 1, 2]).await;
        let others: Vec<usize> = (0..3).filter(|&i| i != old).collect();
        let minority = c
            .client_builder(old)
            .timeout(ms(3_000))
            .connect()
            .await
            .expect("client of the old leader");
        let majority = c.client(others[0]).await;
        majority
            .put_strong("s", "before")
            .await
            .expect("strong put before the cut");
        wan.isolate(old, true);
        // The majority elects a new leader and serves strong and causal operations.
        let new = leader(&c, &others).await;
        assert_ne!(
            new, old,
            "the cut-off leader cannot stay the majority's leader"
        );
        majority
            .put_strong("s", "during")
            .await
            .expect("strong put on the majority side");
        assert_eq!(
            majority
                .get_strong("s")
                .await
                .expect("strong get")
                .as_deref(),
            Some(&b"during"[..])
        );
        majority
            .put("x", "1")
            .await
            .expect("causal put on the majority side");
        // The minority side: strong operations are refused with Unavailable, causal ones work.
        for attempt in ["get", "put", "cas"] {
            let r = match attempt {
                "get" => minority.get_strong("s").await.map(|_| ()),
                "put" => minority.put_strong("s", "minority").await,
                _ => minority
                    .cas(
                        "s",
                        Some(b"before".as_slice()),
                        Some(b"minority".as_slice()),
                    )
                    .await
                    .map(|_| ()),
            };
            match r {
                Err(ClientError::Unavailable(m)) => {
                    println!("minority {attempt}: {m}");
                    assert!(m.contains("majority") || m.contains("leader"), "{m}");
                }
                other => panic!("strong {attempt} on the minority side: {other:?}"),
            }
        }
        minority
            .put("y", "2")
            .await
            .expect("causal put on the minority side");
        assert_eq!(
            minority.get("y").await.expect("causal get").as_deref(),
            Some(&b"2"[..])
        );
        // Heal: the old leader follows the new one and sees the majority's write.
        wan.isolate(old, false);
        let healed = c.client(old).await;
        eventually(
            ms(30_000),
            "the old leader's site serves strong reads again",
            async || healed.get_strong("s").await.ok().flatten().as_deref() == Some(&b"during"[..]),
        )
        .await;
        c.shutdown().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stopped_leader_is_replaced_and_keeps_every_acknowledged_write() {
    bounded(ms(180_000), async {
        let (mut c, _wan) = cluster(ms(2), NodeOptions::default()).await;
        let old = leader(&c, &[0, 1, 2]).await;
        let others: Vec<usize> = (0..3).filter(|&i| i != old).collect();
        let client = c.client(others[0]).await;
        for n in 0..20 {
            client
                .put_strong(format!("k{n}"), format!("v{n}"))
                .await
                .expect("put");
        }
        c.stop(old).await;
        let new = leader(&c, &others).await;
        assert_ne!(new, old);
        eventually(ms(20_000), "strong writes resume", async || {
            client.put_strong("after", "1").await.is_ok()
        })
        .await;
        assert_eq!(
            client
                .cas("after", Some(b"1".as_slice()), Some(b"2".as_slice()))
                .await
                .expect("cas"),
            CasOutcome::Swapped
        );
        c.restart(old).await;
        let back = c.client(old).await;
        for n in 0..20 {
            let got = back.get_strong(format!("k{n}")).await.expect("strong get");
            assert_eq!(got.as_deref(), Some(format!("v{n}").as_bytes()));
        }
        assert_eq!(
            back.get_strong("after")
                .await
                .expect("strong get")
                .as_deref(),
            Some(&b"2"[..])
        );
        c.shutdown().await;
    })
    .await;
}

/// The mixed-levels scenario: `x` written causally at site A, then `s` strongly at A, with the
/// link A → C delayed by 300 ms; a session at C reads `s` strongly, then `x` causally. Returns
/// whether that session saw `x`. A and C are the two followers, so that the strong operations
/// themselves never cross the delayed link.
async fn mixed_levels(opts: NodeOptions) -> bool {
    let (c, wan) = cluster(ms(2), opts).await;
    let l = leader(&c, &[0, 1, 2]).await;
    let (a, cc) = ((l + 1) % 3, (l + 2) % 3);
    let slow = wan.link(a, cc);
    slow.set_params(slow.params().with_delay_ms(300.0));
    let writer = c.client(a).await;
    writer.put("x", "1").await.expect("causal put of x at A");
    writer
        .put_strong("s", "1")
        .await
        .expect("strong put of s at A");
    let reader = c.client(cc).await;
    assert_eq!(
        reader
            .get_strong("s")
            .await
            .expect("strong get of s at C")
            .as_deref(),
        Some(&b"1"[..])
    );
    let x = reader.get("x").await.expect("causal get of x at C");
    c.shutdown().await;
    x.as_deref() == Some(&b"1"[..])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_strong_read_carries_the_writers_causal_context() {
    bounded(ms(120_000), async {
        assert!(
            mixed_levels(NodeOptions::default()).await,
            "a causal read after a strong read must see what the strong writer had seen"
        );
        // The planted bug: strong results without their context. The causal read at C then
        // does not wait for x, which is still on the delayed link.
        let dropped = NodeOptions {
            strong: StrongOptions {
                drop_context: true,
                ..Default::default()
            },
            ..Default::default()
        };
        assert!(
            !mixed_levels(dropped).await,
            "without the context the causal read must miss x (the test must catch the bug)"
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_cli_runs_strong_operations_and_a_failed_cas_exits_1() {
    bounded(ms(120_000), async {
        let (c, _wan) = cluster(ms(2), NodeOptions::default()).await;
        leader(&c, &[0, 1, 2]).await;
        let certs = c.certs.to_str().expect("utf-8 path").to_owned();
        let cli = async |args: &[&str], site: usize| {
            let out = tokio::process::Command::new(common::BIN)
                .args(args)
                .args(["--site", &c.addr(site).to_string(), "--certs", &certs])
                .output()
                .await
                .expect("run the CLI");
            let text = String::from_utf8_lossy(&out.stdout).into_owned();
            (out.status.code(), text)
        };
        assert_eq!(
            cli(&["put", "--strong", "lock", "alice"], 0).await.0,
            Some(0)
        );
        let (code, text) = cli(&["get", "--strong", "lock"], 1).await;
        assert_eq!((code, text.trim()), (Some(0), "alice"));
        // A compare-and-set that does not match: exit 1 and the current value.
        let (code, text) = cli(&["cas", "lock", "bob", "--expect", "carol"], 2).await;
        assert_eq!(code, Some(1), "{text}");
        assert!(text.contains("alice"), "{text}");
        let (code, _) = cli(&["cas", "lock", "bob", "--expect", "alice"], 2).await;
        assert_eq!(code, Some(0));
        let (code, text) = cli(&["cas", "free", "me", "--expect-absent"], 0).await;
        assert_eq!(code, Some(0), "{text}");
        let (code, _) = cli(&["cas", "free", "--expect", "me", "--delete"], 1).await;
        assert_eq!(code, Some(0));
        assert_eq!(cli(&["get", "--strong", "free"], 0).await.0, Some(1));
        assert_eq!(cli(&["del", "--strong", "lock"], 1).await.0, Some(0));
        assert_eq!(cli(&["get", "--strong", "lock"], 2).await.0, Some(1));
        // The strong keyspace is separate: a causal get does not see strong keys.
        assert_eq!(
            cli(&["put", "--strong", "only-strong", "1"], 0).await.0,
            Some(0)
        );
        assert_eq!(cli(&["get", "only-strong"], 0).await.0, Some(1));
        let (code, text) = cli(&["status"], 1).await;
        assert_eq!(code, Some(0));
        assert!(
            text.contains("consensus:") && text.contains("match index"),
            "{text}"
        );
        c.shutdown().await;
    })
    .await;
}

/// Runs random strong operations on `keys` until `stop`, recording them; returns how many were
/// acknowledged.
async fn load(
    client: Client,
    rec: Recorder,
    id: u64,
    seed: u64,
    keys: Vec<Vec<u8>>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> usize {
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ id);
    let mut acked = 0;
    let mut seen: Option<Vec<u8>> = None;
    let mut n = 0u64;
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        n += 1;
        let key = keys[rng.gen_range(0..keys.len())].clone();
        let value = format!("{id}-{n}").into_bytes();
        let cmd = match rng.gen_range(0..100) {
            0..40 => Command::get(key),
            40..70 => Command::put(key, value),
            _ => Command::cas(key, seen.clone(), Some(value)),
        };
        match run(&client, &rec, id, cmd.clone()).await {
            Ok(()) => acked += 1,
            Err(_) => tokio::time::sleep(ms(20)).await,
        }
        if let Command::Put { value, .. } = cmd {
            seen = Some(value);
        }
    }
    acked
}

/// The leader that the running sites' status answers agree on, one of `sites`.
async fn process_leader(clients: &[Client], sites: &[usize]) -> usize {
    let mut found = None;
    eventually(
        ms(30_000),
        "the running sites agree on a leader",
        async || {
            let mut leaders = Vec::new();
            for &i in sites {
                match clients[i].status().await {
                    Ok(s) => leaders.push(s.consensus.and_then(|c| c.leader)),
                    Err(_) => return false,
                }
            }
            found = leaders[0].filter(|l| {
                sites.contains(&(*l as usize)) && leaders.iter().all(|m| *m == leaders[0])
            });
            found.is_some()
        },
    )
    .await;
    found.expect("leader") as usize
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn processes_under_leader_kills_cuts_and_isolation_stay_linearizable() {
    bounded(ms(600_000), async {
        let seed = env_u64("STRONG_SEED", 0x5742_0002);
        let kills = env_u64("STRONG_KILLS", 10) as usize;
        let min_ops = env_u64("STRONG_MIN_OPS", 10_000) as usize;
        println!(
            "seed {seed:#x} (STRONG_SEED), {kills} leader kills (STRONG_KILLS), \
             at least {min_ops} operations (STRONG_MIN_OPS)"
        );
        let (prep, wan) = relayed(ms(10));
        let mut p = prep.spawn().await;
        p.wait_connected().await;
        let status: Vec<Client> = {
            let mut v = Vec::new();
            for i in 0..3 {
                v.push(
                    p.client_builder(i)
                        .timeout(ms(1_000))
                        .connect()
                        .await
                        .expect("client"),
                );
            }
            v
        };
        process_leader(&status, &[0, 1, 2]).await;
        let rec = Recorder::new();
        let keys: Vec<Vec<u8>> = (0..3).map(|k| format!("hot{k}").into_bytes()).collect();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let mut workers = tokio::task::JoinSet::new();
        for site in 0..3 {
            for k in 0..3u64 {
                let id = site as u64 * 10 + k;
                let client = p
                    .client_builder(site)
                    .timeout(ms(3_000))
                    .connect()
                    .await
                    .expect("client");
                workers.spawn(load(
                    client,
                    rec.clone(),
                    id,
                    seed,
                    keys.clone(),
                    stop.clone(),
                ));
            }
        }
        let acked_since = |n: usize| {
            let rec = rec.clone();
            async move {
                let start = rec.snapshot().len();
                eventually(ms(60_000), "the load makes progress", async || {
                    rec.snapshot().len() >= start + n
                })
                .await;
            }
        };
        acked_since(100).await;
        // kill -9 of the leader's process, then its restart.
        let mut failovers = Vec::new();
        for k in 0..kills {
            let l = process_leader(&status, &[0, 1, 2]).await;
            let other = (l + 1) % 3;
            let probe = p
                .client_builder(other)
                .timeout(ms(1_000))
                .connect()
                .await
                .expect("probe");
            let t0 = std::time::Instant::now();
            p.kill(l);
            eventually(
                ms(60_000),
                "a strong write succeeds after the leader's kill",
                async || probe.put_strong("probe", format!("{k}")).await.is_ok(),
            )
            .await;
            failovers.push(t0.elapsed());
            println!(
                "kill {k}: leader {l} killed; strong writes resumed after {:?}",
                t0.elapsed()
            );
            p.start(l);
            p.wait_listening(l, ms(10_000)).await;
            process_leader(&status, &[0, 1, 2]).await;
            acked_since(50).await;
        }
        // The leader cut off from the majority, then healed.
        let l = process_leader(&status, &[0, 1, 2]).await;
        wan.isolate(l, true);
        let others: Vec<usize> = (0..3).filter(|&i| i != l).collect();
        process_leader(&status, &others).await;
        acked_since(50).await;
        wan.isolate(l, false);
        // An isolated follower, then healed.
        let l = process_leader(&status, &[0, 1, 2]).await;
        let f = (l + 1) % 3;
        wan.isolate(f, true);
        acked_since(50).await;
        wan.isolate(f, false);
        process_leader(&status, &[0, 1, 2]).await;
        acked_since(50).await;
        let more = min_ops.saturating_sub(rec.snapshot().len());
        if more > 0 {
            let start = rec.snapshot().len();
            eventually(
                ms(1_800_000),
                "the load reaches STRONG_MIN_OPS",
                async || rec.snapshot().len() >= start + more,
            )
            .await;
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let mut acked = 0;
        while let Some(r) = workers.join_next().await {
            acked += r.expect("worker");
        }
        // Final reads at every site: an acknowledged write that was lost shows up as a
        // violation here.
        for site in 0..3 {
            let c = p.client(site).await;
            for key in &keys {
                eventually(ms(30_000), "a final strong read succeeds", async || {
                    run(&c, &rec, 100 + site as u64, Command::get(key.clone()))
                        .await
                        .is_ok()
                })
                .await;
            }
        }
        let history = rec.snapshot();
        let report = lincheck::check(&history);
        println!("{report}");
        println!(
            "{acked} acknowledged of {} strong operations",
            history.len()
        );
        let mut sorted = failovers.clone();
        sorted.sort();
        if let (Some(p50), Some(max)) = (sorted.get(sorted.len() / 2), sorted.last()) {
            println!(
                "failover after kill -9 of the leader: p50 {p50:?}, max {max:?} over {} kills",
                sorted.len()
            );
        }
        assert_eq!(report.verdict(), Verdict::Ok, "{report}");
        assert!(
            acked >= 300,
            "only {acked} strong operations were acknowledged"
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn leadership_moves_back_to_the_preferred_site_when_it_is_healthy() {
    bounded(ms(180_000), async {
        let mut prep = Cluster::prepare_strong(3);
        for cfg in &mut prep.configs {
            cfg.consensus.preferred_leader = Some("c".into());
        }
        let mut c = prep.start().await;
        c.wait_connected().await;
        leader(&c, &[0, 1, 2]).await;
        // Take the preferred site away: another site leads meanwhile.
        c.stop(2).await;
        let interim = leader(&c, &[0, 1]).await;
        let client = c.client(interim).await;
        client
            .put_strong("k", "1")
            .await
            .expect("strong put without c");
        c.restart(2).await;
        eventually(
            ms(60_000),
            "leadership is back at the preferred site",
            async || (0..3).all(|i| c.node(i).status().consensus.and_then(|s| s.leader) == Some(2)),
        )
        .await;
        assert_eq!(
            client.get_strong("k").await.expect("get").as_deref(),
            Some(&b"1"[..])
        );
        c.shutdown().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_site_list_seeds_one_replicated_configuration_shown_in_status_and_metrics() {
    bounded(ms(120_000), async {
        let prep = Cluster::prepare_strong(3);
        let c = prep.start().await;
        c.wait_connected().await;
        eventually(
            ms(20_000),
            "every site holds the bootstrapped configuration",
            async || {
                (0..3).all(|i| {
                    let m = c.node(i).status().membership.expect("membership");
                    m.source == "replicated" && m.epoch == 1
                })
            },
        )
        .await;
        for i in 0..3 {
            let m = c.node(i).status().membership.expect("membership");
            let names: Vec<&str> = m.sites.iter().map(|s| s.name.as_str()).collect();
            assert_eq!(names, ["a", "b", "c"], "site {i}");
            assert_eq!(m.next_id, 3);
            assert!(m.sites.iter().all(|s| s.state == "active"), "{m:?}");
            let text = c.node(i).metrics_text();
            assert!(text.contains("causalkv_membership_epoch 1\n"), "{text}");
            assert!(text.contains("causalkv_membership_sites 3\n"), "{text}");
        }
        c.shutdown().await;
    })
    .await;
}

/// `causalkv sites list --json` at `addr`: the membership it shows.
fn sites_list(certs: &std::path::Path, addr: std::net::SocketAddr) -> serde_json::Value {
    let out = std::process::Command::new(BIN)
        .args(["sites", "list", "--json", "--timeout-ms", "2000", "--site"])
        .arg(addr.to_string())
        .arg("--certs")
        .arg(certs)
        .output()
        .expect("run the CLI");
    let text = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str::<serde_json::Value>(text.trim())
        .map(|v| v["membership"].clone())
        .unwrap_or(serde_json::Value::Null)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_restarted_site_loads_the_replicated_configuration_not_its_file() {
    bounded(ms(180_000), async {
        let prep = Cluster::prepare_strong(3);
        let mut p = prep.spawn().await;
        p.wait_connected().await;
        let certs = p.certs.clone();
        // `sites list` at every site: epoch 1, replicated, the three sites as the files list them.
        for i in 0..3 {
            let mut seen = serde_json::Value::Null;
            eventually(
                ms(20_000),
                "sites list shows the replicated configuration",
                async || {
                    seen = sites_list(&certs, p.addr(i));
                    seen["source"] == "replicated"
                },
            )
            .await;
            assert_eq!(seen["epoch"], 1, "site {i}: {seen}");
            let sites = seen["sites"].as_array().expect("sites");
            assert_eq!(sites.len(), 3, "{seen}");
            for (j, s) in sites.iter().enumerate() {
                assert_eq!(s["site"], j, "{seen}");
                assert_eq!(s["name"], ["a", "b", "c"][j], "{seen}");
                assert_eq!(s["addr"], p.addr(j).to_string(), "{seen}");
                assert_eq!(s["state"], "active", "{seen}");
            }
        }
        // A fourth site is added to the configuration (at a); the files still list three.
        let d_addr = common::free_addr();
        let out = sites_cli(
            &certs,
            &[
                "add",
                "d",
                "--addr",
                &d_addr.to_string(),
                "--site",
                &p.addr(0).to_string(),
            ],
        );
        common::assert_success(&out);
        for i in 0..3 {
            eventually(ms(20_000), "every site lists d", async || {
                let seen = sites_list(&certs, p.addr(i));
                seen["epoch"] == 2 && seen["sites"][3]["name"] == "d"
            })
            .await;
        }
        // c restarts from its unchanged file (three sites) and loads the replicated
        // configuration: four sites, d joining at its replicated address.
        p.stop(2, ms(20_000)).await;
        p.start(2);
        p.wait_listening(2, ms(20_000)).await;
        let listed = sites_list(&certs, p.addr(2));
        assert_eq!(listed["source"], "replicated", "{listed}");
        assert_eq!(listed["epoch"], 2, "{listed}");
        assert_eq!(listed["sites"][3]["addr"], d_addr.to_string(), "{listed}");
        // Joining, in its first phase: it has not fetched its snapshot (it is not running).
        assert_eq!(listed["sites"][3]["state"], "joining: snapshot", "{listed}");
        assert!(
            p.log(2)
                .contains("differ from the replicated cluster configuration"),
            "{}",
            p.log(2)
        );
        let client = p.client(2).await;
        let status = client.status().await.expect("status of c");
        assert_eq!(status.applied.len(), 4, "c counts four sites: {status:?}");
        assert!(
            status
                .peers
                .iter()
                .any(|x| x.name == "d" && x.addr == d_addr.to_string()),
            "c dials d at its replicated address: {status:?}"
        );
        // c (four sites) and a, b (three) still replicate with each other.
        eventually(ms(20_000), "c's links to a and b are up", async || {
            client.status().await.is_ok_and(|s| {
                s.peers
                    .iter()
                    .filter(|x| x.name != "d")
                    .all(|x| x.state == "up")
            })
        })
        .await;
        client.put("after-restart", "1").await.expect("put at c");
        let at_b = p.client(1).await;
        at_b.set_session_token(&client.session_token())
            .expect("token");
        assert_eq!(
            at_b.get("after-restart")
                .await
                .expect("get at b")
                .as_deref(),
            Some(&b"1"[..]),
            "c's write is read at b"
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sites_add_raises_the_epoch_and_a_site_counting_the_new_one_still_serves_old_tokens() {
    bounded(ms(180_000), async {
        let prep = Cluster::prepare_strong(3);
        let mut c = prep.start().await;
        c.wait_connected().await;
        c.wait_bootstrapped().await;
        // A session from before the change: its token counts three sites.
        let before = c.client(0).await;
        before.put("before", "1").await.expect("put at a");
        let old_token = before.session_token();
        // `sites add d` at b: epoch 2, d gets id 3 and is joining, at every site.
        let d_addr = common::free_addr();
        let b_addr = c.addr(1).to_string();
        let out = sites_cli(
            &c.certs,
            &[
                "add",
                "d",
                "--addr",
                &d_addr.to_string(),
                "--site",
                &b_addr,
                "--json",
            ],
        );
        let added: serde_json::Value =
            serde_json::from_str(common::assert_success(&out).trim()).expect("json");
        assert_eq!(added["epoch"], 2, "{added}");
        eventually(ms(20_000), "every site holds epoch 2", async || {
            (0..3).all(|i| c.node(i).status().membership.is_some_and(|m| m.epoch == 2))
        })
        .await;
        for i in 0..3 {
            let m = c.node(i).status().membership.expect("membership");
            assert_eq!((m.next_id, m.sites.len()), (4, 4), "site {i}: {m:?}");
            let d = &m.sites[3];
            assert_eq!(
                (d.site, d.name.as_str(), d.addr.clone(), d.state.as_str()),
                (3, "d", d_addr.to_string(), "joining: snapshot"),
                "site {i}"
            );
        }
        // The same name again: refused with the reason, nothing changes.
        let again = sites_cli(
            &c.certs,
            &["add", "d", "--addr", "127.0.0.1:1", "--site", &b_addr],
        );
        assert_ne!(again.status.code(), Some(0), "{again:?}");
        let why = String::from_utf8_lossy(&again.stderr).into_owned()
            + &String::from_utf8_lossy(&again.stdout);
        assert!(why.contains("\"d\" is taken"), "{why}");
        // A change made against an epoch that moved on: refused.
        let e = before
            .add_site("e", "127.0.0.1:2".parse().unwrap(), 1)
            .await
            .unwrap_err();
        assert!(e.to_string().contains("moved on"), "{e}");
        assert_eq!(c.node(0).status().membership.unwrap().epoch, 2);
        // c restarts and takes the replicated configuration: it counts four sites, as a and b
        // do since they applied the change. They still replicate both ways, and the old token
        // works.
        c.stop(2).await;
        c.restart(2).await;
        assert_eq!(c.node(2).status().applied.len(), 4);
        eventually(ms(20_000), "c's links to a and b are up", async || {
            let s = c.node(2).status();
            s.peers
                .iter()
                .filter(|p| p.name == "a" || p.name == "b")
                .all(|p| p.state == "up")
        })
        .await;
        let at_c = c.client(2).await;
        at_c.set_session_token(&old_token).expect("old token");
        assert_eq!(
            at_c.get("before").await.expect("get at c").as_deref(),
            Some(&b"1"[..])
        );
        at_c.put("from-c", "2").await.expect("put at c");
        let at_a = c.client(0).await;
        at_a.set_session_token(&at_c.session_token())
            .expect("c's token at a");
        assert_eq!(
            at_a.get("from-c").await.expect("get at a").as_deref(),
            Some(&b"2"[..])
        );
        at_a.put("from-a", "3").await.expect("put at a");
        // A context that saw something from a site a does not count (a fifth) cannot be served
        // there:
        // refused with the entry named, and a keeps serving.
        let beyond = c.client(0).await;
        beyond
            .set_session_token(&causalkv::client::encode_session_token(
                &causalkv::clock::VClock::from_vec(vec![0, 0, 0, 0, 5]),
            ))
            .expect("token");
        let e = beyond.get("from-c").await.unwrap_err().to_string();
        assert!(e.contains("entry 4 is not zero"), "{e}");
        at_c.set_session_token(&at_a.session_token())
            .expect("a's token at c");
        assert_eq!(
            at_c.get("from-a").await.expect("get at c").as_deref(),
            Some(&b"3"[..])
        );
        c.shutdown().await;
    })
    .await;
}
