//! Membership changes on a running cluster, on real `causalkv serve` processes over QUIC and
//! mutual TLS (and in-process sites for some refusals), with the causal checker (and the
//! linearizability checker for strong operations) judging the histories.
//!
//! Adding a site (`join_*`):
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
//! - The join's retention race: an origin that lags on the change that adds a site (a
//!   test-only switch) must not prune what the joining site's snapshot lacks once the old
//!   members ack it; the joining site gets every one of its writes (and does not, with the
//!   fix switched off by `MEMBERSHIP_PRUNE_AHEAD=1`).
//! - A site that lags on the change (a test-only switch) while its peers count the new site
//!   holds pruning back, and shows it in `causalkv status` and `/metrics` until it applies the
//!   change.
//! - Activation waits for the joining site to cover its floor: with an origin holding the
//!   change back (a test-only switch), the joining site cannot get that origin's stream, and
//!   the leader shows it catching up and does not make it active until the origin applies
//!   the change. Meanwhile that origin receives an update that depends on the new site, and
//!   keeps it in its dependency buffer with its link up until it counts the site.
//! - A leader crash in joint consensus: group 0's leader is paused (a test-only switch)
//!   between the two steps of making the joining site a voter, killed with `kill -9` and
//!   restarted; the cluster finishes the change (an active voter, a uniform configuration) and
//!   the strong operations pass the linearizability checker.
//!
//!
//! Removing sites (`remove_*`):
//!
//! - A dead site: the link a–c is cut, so a gets c's updates only through b; c is killed with
//!   `kill -9`, its data directory deleted, and `causalkv sites remove c --dead` runs. a and b
//!   converge on everything b had from c, a session at a waiting on c's updates resumes, a
//!   session that saw an update only c had gets `Lost` (and continues once it accepts the
//!   loss, with the client call and with the CLI flag), the checker passes, the Raft group
//!   drops c, and old tokens still work. With the relay switched off (a test-only switch), a
//!   never gets those updates.
//! - Decommission under load: `causalkv sites remove c` while sessions write at c; c drains,
//!   leaves the Raft group and becomes removed; its clients fail over without an error; no
//!   acknowledged write is lost; the checker passes.
//! - Bad input: an unknown site, a stale epoch, `--dead` on a reachable site, a survivor that
//!   does not answer the cut, and removing the last voters' majority are refused with clear
//!   errors, and nothing changes.

use crate::common;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::common::{
    BIN, Cluster, Logged, Processes, bounded, env_u64, eventually, eventually_ok, ms, sites_cli,
};
use causalkv::config::{SiteConfig, SiteEntry};
use causalkv::tools::checker::{self, History, Op};
use causalkv::tools::lincheck::{self, Command, Recorder, Response, Verdict};
use causalkv::tools::wan::LinkParams;
use causalkv::{Client, ClientError};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Three sites with consensus timeouts for loopback, as processes, connected, with the
/// configuration bootstrapped.
async fn three_sites() -> Processes {
    let prep = Cluster::prepare_strong(3);
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

/// The operator's procedure for a new site `name` up to its start: its certificate
/// ([`joiner`]'s configuration, joining from `from`), then `causalkv sites add` at site `via`.
fn add_joiner(p: &Processes, name: &str, from: &str, via: usize) -> SiteConfig {
    let cfg = joiner(p, name, from);
    let out = sites_cli(
        &p.certs,
        &[
            "add",
            name,
            "--addr",
            &cfg.me().addr.to_string(),
            "--site",
            &p.addr(via).to_string(),
        ],
    );
    common::assert_success(&out);
    cfg
}

/// [`add_joiner`] while site `held` holds the change back (its hold file, which the caller
/// removes to release it): returns the joiner's configuration and the hold file, once `held`
/// says it holds the change.
async fn add_joiner_held_at(
    p: &Processes,
    name: &str,
    from: &str,
    via: usize,
    held: usize,
) -> (SiteConfig, std::path::PathBuf) {
    let hold = p.configs[held]
        .data_dir
        .join(causalkv::net::HOLD_SITES_FILE);
    std::fs::write(&hold, b"").expect("create the hold file");
    let cfg = add_joiner(p, name, from, via);
    eventually(ms(20_000), "the site holds the change back", async || {
        p.log(held).contains("holding back a configuration")
    })
    .await;
    (cfg, hold)
}

/// Entry `site` of the floor a joined site `d` recorded (its `join.state`).
fn floor_entry(p: &Processes, d: usize, site: usize) -> u64 {
    let state =
        std::fs::read_to_string(p.configs[d].data_dir.join("join.state")).expect("join.state");
    state
        .lines()
        .nth(site)
        .expect("the site's entry")
        .parse()
        .expect("an entry")
}

/// Closes the strong history with a final strong read of every key at every site (`clients`,
/// one per site), then asserts the linearizability checker passes it.
async fn assert_linearizable(rec: &Recorder, clients: &[Client], keys: &[Vec<u8>]) {
    for (i, c) in clients.iter().enumerate() {
        for key in keys {
            let pending = rec.invoke(200 + i as u64, Command::get(key.clone()));
            let v = c.get_strong(key).await.expect("final strong read");
            pending.complete(Response::Value(v.map(|b| b.to_vec())));
        }
    }
    let history = rec.snapshot();
    let lin = lincheck::check(&history);
    println!("strong: {} operations; {lin}", history.len());
    assert_eq!(lin.verdict(), Verdict::Ok, "{lin}");
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
        let cfg = add_joiner(&p, "d", "a", 1);
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
        assert_linearizable(&rec, &status, &strong_keys).await;
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

/// The join's retention race, staged: c lags on the change that adds d (a test-only switch
/// holds it back while a file is in its data directory); d loads its snapshot from a, and then
/// c writes. a and b ack the writes (a and b, counting d already, with vectors of four
/// entries); then c applies the change and d asks c to resend from the snapshot's vector. d
/// must get every one of c's writes.
///
/// `MEMBERSHIP_PRUNE_AHEAD=1` runs it with the fix switched off (c prunes as soon as the old
/// members ack), to show that the assertion then fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn join_while_an_origin_lags_on_the_change_loses_none_of_its_writes() {
    bounded(ms(180_000), async {
        let prune_ahead = env_u64("MEMBERSHIP_PRUNE_AHEAD", 0) == 1;
        let mut env = vec![("CAUSALKV_TEST_HOLD_SITES", "1")];
        if prune_ahead {
            println!("MEMBERSHIP_PRUNE_AHEAD=1: the fix is switched off at every site");
            env.push(("CAUSALKV_TEST_PRUNE_AHEAD", "1"));
        }
        let mut p = Cluster::prepare_strong(3).spawn_with_env(&env).await;
        p.wait_connected().await;
        let admin = p.client(0).await;
        eventually(
            ms(20_000),
            "the configuration is bootstrapped",
            async || {
                admin
                    .status()
                    .await
                    .is_ok_and(|s| s.membership.is_some_and(|m| m.epoch == 1))
            },
        )
        .await;
        // c will lag on the change that adds d, until the file is gone.
        // d is added: a and b apply it, c holds it back; d loads a's snapshot.
        let (cfg, hold) = add_joiner_held_at(&p, "d", "a", 1, 2).await;
        let d = p.add(cfg);
        p.wait_listening(d, ms(60_000)).await;
        assert!(p.log(d).contains("joined: snapshot loaded"), "{}", p.log(d));
        // c writes: nothing of it is in the snapshot, and c does not count d yet.
        const N: usize = 10;
        let keys: Vec<String> = (0..N).map(|k| format!("x-{k}")).collect();
        let at_c = p.client(2).await;
        for (k, key) in keys.iter().enumerate() {
            at_c.put(key, format!("v-{k}")).await.expect("write at c");
        }
        let c_has = at_c.context().get(2);
        let floor_c = floor_entry(&p, d, 2);
        assert!(
            floor_c < c_has,
            "the snapshot has c's writes: {floor_c} >= {c_has}"
        );
        // a and b ack them, counting d already.
        eventually_ok(ms(30_000), "a and b ack c's writes to c", async || {
            let s = at_c.status().await.map_err(|e| e.to_string())?;
            let acked = [0u16, 1].iter().all(|&site| {
                s.peers
                    .iter()
                    .any(|q| q.site == site && q.applied.get(2).is_some_and(|&v| v >= c_has))
            });
            if acked {
                return Ok(());
            }
            let warnings: Vec<String> = p
                .log(2)
                .lines()
                .filter(|l| l.contains("WARN"))
                .map(str::to_owned)
                .collect();
            Err(format!(
                "c wrote up to {c_has}; c's peers: {:?}; c's warnings: {warnings:?}",
                s.peers
                    .iter()
                    .map(|q| (q.site, q.applied.clone()))
                    .collect::<Vec<_>>()
            ))
        })
        .await;
        let retained = at_c.status().await.expect("status of c").retained;
        println!("c retains {retained} updates once a and b acked its {N} writes");
        if !prune_ahead {
            assert!(
                retained >= N as u64,
                "c must keep its writes for d, which it does not count yet: {retained} retained"
            );
        }
        // c applies the change: it counts d, and d asks it to resend from the snapshot's vector.
        std::fs::remove_file(&hold).expect("remove the hold file");
        let at_d = p.client(d).await;
        eventually_ok(ms(30_000), "d has every one of c's writes", async || {
            let mut seen = Vec::new();
            for key in &keys {
                let v = at_d.get(key).await.map_err(|e| e.to_string())?;
                seen.push(v.map(|b| String::from_utf8_lossy(&b).into_owned()));
            }
            let all = seen
                .iter()
                .enumerate()
                .all(|(k, v)| v.as_deref() == Some(format!("v-{k}").as_str()));
            if all {
                Ok(())
            } else {
                let applied = at_d.status().await.map(|s| s.applied);
                Err(format!(
                    "d reads {seen:?} (d's applied {applied:?}, c wrote up to {c_has})"
                ))
            }
        })
        .await;
        // Every site holds the same.
        let mut states = Vec::new();
        for i in 0..4 {
            let c = p.client(i).await;
            let mut state = BTreeMap::new();
            for key in &keys {
                let r = c.get_versioned(key).await.expect("read");
                state.insert(key.clone(), (r.value.map(|b| b.to_vec()), r.version));
            }
            states.push((i as u16, state));
        }
        checker::check_convergence(&states).expect("the four sites converge");
    })
    .await;
}

/// A site that lags on the change that adds d (a test-only switch holds it back) while its
/// peers count d prunes nothing from its retained log, and says so: `causalkv status` (the
/// status struct and the CLI's text) and `/metrics` (`causalkv_retention_held`) show it while
/// held, and neither once the site applies the change. The peers that count d are not held.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_site_holding_retention_for_an_added_site_shows_it_in_status_and_metrics() {
    bounded(ms(120_000), async {
        let c = Cluster::prepare_strong(3)
            .start_with(causalkv::net::NodeOptions {
                hold_sites: true,
                ..Default::default()
            })
            .await;
        c.wait_connected().await;
        c.wait_bootstrapped().await;
        let held = |i: usize| {
            let s = c.node(i).status();
            let metric = c
                .node(i)
                .metrics_text()
                .lines()
                .find_map(|l| {
                    l.strip_prefix("causalkv_retention_held ")
                        .map(str::to_owned)
                })
                .expect("causalkv_retention_held in /metrics");
            (s.retention_held, metric)
        };
        for i in 0..3 {
            assert_eq!(held(i), (0, "0".to_owned()), "site {i} before the change");
        }
        // c will lag on the change that adds d; a and b apply it and ack c with vectors of
        // four entries.
        let hold = c.configs[2].data_dir.join(causalkv::net::HOLD_SITES_FILE);
        std::fs::write(&hold, b"").expect("create the hold file");
        let a = c.client(0).await;
        let epoch = a
            .add_site("d", common::free_addr(), 1)
            .await
            .expect("sites add d");
        assert_eq!(epoch, 2);
        let at_c = c.client(2).await;
        eventually(ms(20_000), "c shows retention held", async || {
            // c's writes keep acks from a and b coming.
            at_c.put("c-writes", "x").await.expect("write at c");
            held(2) == (4, "1".to_owned())
        })
        .await;
        assert_eq!(c.node(2).status().applied.len(), 3, "c does not count d");
        for i in 0..2 {
            assert_eq!(held(i), (0, "0".to_owned()), "site {i} counts d");
        }
        let certs = c.certs.to_string_lossy().into_owned();
        let status_text = async || {
            let out = tokio::process::Command::new(common::BIN)
                .args([
                    "status",
                    "--site",
                    &c.addr(2).to_string(),
                    "--certs",
                    &certs,
                ])
                .output()
                .await
                .expect("run the CLI");
            assert_eq!(out.status.code(), Some(0), "{out:?}");
            String::from_utf8_lossy(&out.stdout).into_owned()
        };
        let text = status_text().await;
        assert!(
            text.contains("retention held: a peer counts 4 sites, this site 3"),
            "{text}"
        );
        // c applies the change: it counts d, and nothing holds pruning any more.
        std::fs::remove_file(&hold).expect("remove the hold file");
        eventually(ms(20_000), "c's retention is no longer held", async || {
            held(2) == (0, "0".to_owned())
        })
        .await;
        assert_eq!(c.node(2).status().applied.len(), 4, "c counts d");
        let text = status_text().await;
        assert!(!text.contains("retention held"), "{text}");
        c.shutdown().await;
    })
    .await;
}

/// Activation waits for the joining site to cover its floor. c lags on the change that adds
/// d (a test-only switch), so c refuses d's hello and d cannot get c's stream. a, the source,
/// holds d's snapshot before taking its floor (the same switch) while c writes, so the floor
/// needs c's write, which the snapshot lacks: d stays behind on c while the leader, a, makes
/// it a learner and a voter. The leader must not make d active meanwhile: its status shows
/// `joining: voter, catching-up (c at .., needs ..)`. Meanwhile a session at a that depends on
/// d writes: c, which does not count d yet, must keep that update in its dependency buffer
/// (not cut its link from a over it). The leader's wait is one join step (`join_step_ms`, set
/// short here): it must run out with a warning that names the entries d lacks, and the leader
/// must wait again at a later tick. Once c applies the change, d catches up and becomes
/// active at every site, and c applies a's update.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn join_activates_a_site_only_once_it_covers_its_floor() {
    bounded(ms(180_000), async {
        let mut prep = Cluster::prepare_strong(3);
        for cfg in &mut prep.configs {
            cfg.consensus.preferred_leader = Some("a".into());
            cfg.consensus.join_step_ms = 3_000;
        }
        let mut p = prep
            .spawn_with_env(&[("CAUSALKV_TEST_HOLD_SITES", "1")])
            .await;
        p.wait_connected().await;
        let at_a = p.client(0).await;
        eventually(
            ms(30_000),
            "the configuration is bootstrapped and a leads",
            async || {
                at_a.status().await.is_ok_and(|s| {
                    s.membership.is_some_and(|m| m.epoch == 1)
                        && s.consensus
                            .is_some_and(|c| c.leader_name.as_deref() == Some("a"))
                })
            },
        )
        .await;
        // c will lag on the change that adds d, and a will hold d's snapshot before its floor,
        // until the files are gone.
        let hold_floor = p.configs[0].data_dir.join(causalkv::net::HOLD_FLOOR_FILE);
        std::fs::write(&hold_floor, b"").expect("create the floor hold file");
        let (cfg, hold_sites) = add_joiner_held_at(&p, "d", "a", 0, 2).await;
        let d = p.add(cfg);
        eventually(ms(60_000), "a holds d's snapshot", async || {
            p.log(0).contains("holding a joining site's snapshot")
        })
        .await;
        // c writes; once a has it, the floor a takes needs it.
        let at_c = p.client(2).await;
        let w = at_c.put("from-c", "1").await.expect("write at c");
        eventually(ms(20_000), "a applies c's write", async || {
            at_a.status().await.is_ok_and(|s| s.applied[2] >= w.ts)
        })
        .await;
        std::fs::remove_file(&hold_floor).expect("remove the floor hold file");
        p.wait_listening(d, ms(60_000)).await;
        assert!(p.log(d).contains("joined: snapshot loaded"), "{}", p.log(d));
        let floor_c = floor_entry(&p, d, 2);
        let at_d = p.client(d).await;
        let d_has_c = at_d.status().await.expect("status of d").applied[2];
        println!("d has c up to {d_has_c}, its floor needs {floor_c} (c's write: {w})");
        assert!(d_has_c < w.ts && floor_c >= w.ts, "{d_has_c} {floor_c} {w}");
        // a makes d a learner, then a voter, and waits for it to cover its floor.
        let state_of_d = async |c: &Client| {
            c.status()
                .await
                .ok()
                .and_then(|s| s.membership)
                .and_then(|m| m.sites.get(3).map(|s| s.state.clone()))
                .unwrap_or_default()
        };
        let waiting = format!("joining: voter, catching-up (c at {d_has_c}, needs {floor_c})");
        eventually(
            ms(60_000),
            "a waits for d to cover its floor before making it active",
            async || state_of_d(&at_a).await == waiting,
        )
        .await;
        assert_eq!(state_of_d(&at_d).await, "joining: catching-up");
        assert!(
            p.log(0)
                .contains("joining site: waiting until it covers its floor"),
            "{}",
            p.log(0)
        );
        // The step runs out: a warning naming what d lacks, then the leader waits again.
        let ran_out = format!(
            "site d does not cover its floor yet, behind on: c at {d_has_c}, needs {floor_c}"
        );
        eventually(
            ms(30_000),
            "the leader's wait runs out with a warning and starts again",
            async || {
                let log = p.log(0);
                log.contains(&ran_out)
                    && log.contains("joining site not made active yet; retried at a later tick")
                    && log
                        .matches("joining site: waiting until it covers its floor")
                        .count()
                        >= 2
            },
        )
        .await;
        assert_eq!(
            state_of_d(&at_a).await,
            waiting,
            "still waiting after a retry"
        );
        // A session at a that depends on d (a counts d and has its clock markers) writes: its
        // update names d in its dependency vector, and reaches c, which does not count d yet.
        // c keeps it in its dependency buffer, and its link from a stays up.
        let mut d_at_a = 0;
        eventually(ms(20_000), "a has some of d's stream", async || {
            d_at_a = at_a
                .status()
                .await
                .ok()
                .and_then(|s| s.applied.get(3).copied())
                .unwrap_or(0);
            d_at_a > 0
        })
        .await;
        let dependent = p.client(0).await;
        let mut ctx = causalkv::clock::VClock::zero(4);
        ctx.raise(3, d_at_a);
        dependent
            .set_session_token(&causalkv::client::encode_session_token(&ctx))
            .expect("token");
        dependent
            .put("after-d", "1")
            .await
            .expect("write at a after d");
        eventually(
            ms(20_000),
            "c buffers a's update that depends on d",
            async || at_c.status().await.is_ok_and(|s| s.buffered > 0),
        )
        .await;
        assert_eq!(at_c.get("after-d").await.expect("get at c"), None);
        let c_log = p.log(2);
        assert!(
            !c_log.contains("malformed update stream"),
            "c cut its link from a: {c_log}"
        );
        // c applies the change: d gets c's stream, covers its floor and becomes active, and
        // c gets d's stream and applies a's update.
        std::fs::remove_file(&hold_sites).expect("remove the hold file");
        let clients = [at_a, p.client(1).await, at_c, at_d];
        eventually(ms(60_000), "d is active at every site", async || {
            for c in &clients {
                if state_of_d(c).await != "active" {
                    return false;
                }
            }
            true
        })
        .await;
        assert_eq!(
            clients[3].get("from-c").await.expect("get at d").as_deref(),
            Some(&b"1"[..]),
            "d serves once it covers its floor"
        );
        eventually(
            ms(20_000),
            "c applies a's update that depends on d",
            async || {
                clients[2]
                    .get("after-d")
                    .await
                    .is_ok_and(|v| v.as_deref() == Some(&b"1"[..]))
            },
        )
        .await;
        assert!(!p.log(2).contains("malformed update stream"));
    })
    .await;
}

/// A leader crash in the middle of joint consensus: while d is made a voter, group 0's leader
/// is paused (a test-only switch) between the two steps of the change, with the joint
/// configuration committed and the uniform one not yet written, then killed with `kill -9` and
/// restarted. The cluster must finish the change (d an active voter, the configuration uniform)
/// and the strong operations run meanwhile must pass the linearizability checker.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn join_finishes_when_the_leader_crashes_in_joint_consensus() {
    bounded(ms(240_000), async {
        let seed = env_u64("MEMBERSHIP_SEED", 0x6a02);
        println!("seed {seed:#x} (MEMBERSHIP_SEED)");
        let mut p = Cluster::prepare_strong(3)
            .spawn_with_env(&[("CAUSALKV_TEST_PAUSE_JOINT", "1")])
            .await;
        p.wait_connected().await;
        let admin = p.client(0).await;
        let mut leader = 0usize;
        eventually(
            ms(20_000),
            "the configuration is bootstrapped and group 0 has a leader",
            async || {
                let Ok(s) = admin.status().await else {
                    return false;
                };
                let boot = s.membership.is_some_and(|m| m.epoch == 1);
                match s.consensus.and_then(|c| c.leader) {
                    Some(l) if boot => {
                        leader = l as usize;
                        true
                    }
                    _ => false,
                }
            },
        )
        .await;
        let from = (leader + 1) % 3;
        let names: Vec<String> = p.configs.iter().map(|c| c.me().name.clone()).collect();
        println!(
            "leader of group 0: {}; d joins from {}",
            names[leader], names[from]
        );
        // The leader will stop between the two steps of the change.
        let pause = p.configs[leader]
            .data_dir
            .join(causalkv::net::strong::PAUSE_JOINT_FILE);
        std::fs::write(&pause, b"").expect("create the pause file");
        // Strong operations at every site, recorded for the linearizability checker.
        let rec = Recorder::new();
        let keys: Vec<Vec<u8>> = (0..3).map(|k| format!("hot{k}").into_bytes()).collect();
        let stop = Arc::new(AtomicBool::new(false));
        let stop_leader = Arc::new(AtomicBool::new(false));
        let mut strong = tokio::task::JoinSet::new();
        for site in 0..3usize {
            let client = p
                .client_builder(site)
                .timeout(ms(5_000))
                .connect()
                .await
                .expect("client");
            let stop = if site == leader {
                stop_leader.clone()
            } else {
                stop.clone()
            };
            strong.spawn(strong_session(
                client,
                rec.clone(),
                100 + site as u64,
                seed,
                keys.clone(),
                stop,
            ));
        }
        eventually(ms(30_000), "the strong load makes progress", async || {
            rec.snapshot().len() >= 20
        })
        .await;
        let cfg = add_joiner(&p, "d", &names[from], from);
        let d = p.add(cfg);
        p.wait_listening(d, ms(60_000)).await;
        eventually(
            ms(60_000),
            "the leader pauses in joint consensus",
            async || {
                p.log(leader)
                    .contains("pausing before appending the uniform")
            },
        )
        .await;
        let at_leader = p.client(leader).await;
        let phase = at_leader
            .status()
            .await
            .ok()
            .and_then(|s| s.membership)
            .and_then(|m| m.sites.get(3).map(|s| s.state.clone()));
        assert_eq!(
            phase.as_deref(),
            Some("joining: voter (joint)"),
            "d's phase at the paused leader"
        );
        // kill -9 in the middle of joint consensus, then restart.
        stop_leader.store(true, Ordering::Relaxed);
        p.kill(leader);
        // Another site takes over (a majority of the old voters and of the new ones is left)
        // before the crashed one is back.
        let survivor = p.client(from).await;
        eventually(ms(30_000), "another site leads group 0", async || {
            survivor.status().await.is_ok_and(|s| {
                s.consensus
                    .and_then(|c| c.leader)
                    .is_some_and(|l| l as usize != leader)
            })
        })
        .await;
        std::fs::remove_file(&pause).expect("remove the pause file");
        p.start(leader);
        p.wait_listening(leader, ms(60_000)).await;
        // The change is finished: d is an active voter everywhere, the configuration uniform.
        let status: Vec<Client> = {
            let mut v = Vec::new();
            for i in 0..4 {
                v.push(p.client(i).await);
            }
            v
        };
        eventually_ok(
            ms(90_000),
            "d is an active voter and the configuration uniform at every site",
            async || {
                for (i, c) in status.iter().enumerate() {
                    let s = c.status().await.map_err(|e| format!("site {i}: {e}"))?;
                    let states: Vec<String> = s
                        .membership
                        .as_ref()
                        .map(|m| m.sites.iter().map(|x| x.state.clone()).collect())
                        .unwrap_or_default();
                    let voters: Vec<u16> = s
                        .consensus
                        .as_ref()
                        .map(|c| c.voters.iter().map(|v| v.site).collect())
                        .unwrap_or_default();
                    if states.len() != 4
                        || states.iter().any(|x| x != "active")
                        || voters != [0, 1, 2, 3]
                    {
                        return Err(format!("site {i}: members {states:?}, voters {voters:?}"));
                    }
                }
                Ok(())
            },
        )
        .await;
        // The leader after the crash finished the joint configuration the crashed one left.
        let finisher = (0..4).find(|&i| p.log(i).contains("finishing the joint configuration"));
        println!(
            "finished by {:?}",
            finisher.map(|i| p.configs[i].me().name.clone())
        );
        assert!(
            finisher.is_some(),
            "no leader finished the joint configuration"
        );
        // Strong operations go on with d, then final reads close the history.
        let at_d = p
            .client_builder(d)
            .timeout(ms(5_000))
            .connect()
            .await
            .expect("client");
        strong.spawn(strong_session(
            at_d,
            rec.clone(),
            103,
            seed,
            keys.clone(),
            stop.clone(),
        ));
        let mark = rec.snapshot().len();
        eventually(ms(30_000), "the strong load goes on with d", async || {
            rec.snapshot().len() >= mark + 30
        })
        .await;
        stop.store(true, Ordering::Relaxed);
        let mut failures = Vec::new();
        while let Some(r) = strong.join_next().await {
            failures.extend(r.expect("strong session"));
        }
        println!(
            "{} strong operations failed (unknown outcome) around the crash",
            failures.len()
        );
        assert_linearizable(&rec, &status, &keys).await;
    })
    .await;
}

/// What the dead-site scenario saw, for the two tests to judge.
struct DeadSiteRun {
    /// Values the session at a (carrying b's token) read for c's keys, after the removal.
    a_read: Vec<Option<String>>,
    /// What b had of them.
    b_had: Vec<Option<String>>,
    /// The history of every acknowledged operation.
    history: History,
    /// c's state as a's status shows it at the end (with the phase of the change).
    a_state: String,
}

/// The dead-site scenario: three processes behind the WAN emulator, a–c cut, c writes, b gets
/// it, c writes once more while cut off from b too, c is killed and its disk deleted, and
/// `sites remove c --dead` runs at a. With `relay` false, the survivors run with the relay
/// switched off. Asserts what must hold either way (among it, that c, started again with its
/// still valid certificate to join from a, is refused and gets no snapshot), and returns what
/// the tests judge.
async fn remove_dead_site_run(relay: bool) -> DeadSiteRun {
    let mut prep = Cluster::prepare_strong(3);
    let wan = prep.behind_wan(|_, _| LinkParams::default());
    let env: &[(&str, &str)] = if relay {
        &[]
    } else {
        &[("CAUSALKV_TEST_NO_RELAY", "1")]
    };
    let mut p = prep.spawn_with_env(env).await;
    p.wait_connected().await;
    let certs = p.certs.clone();
    let cli = |args: &[&str]| {
        std::process::Command::new(BIN)
            .args(args)
            .arg("--certs")
            .arg(&certs)
            .output()
            .expect("run the CLI")
    };
    let admin = p.client(0).await;
    eventually(
        ms(20_000),
        "the configuration is bootstrapped",
        async || {
            admin.status().await.is_ok_and(|s| {
                s.membership
                    .is_some_and(|m| m.epoch == 1 && m.source == "replicated")
            })
        },
    )
    .await;
    let mut history = History::new();
    const N: usize = 10;
    let keys: Vec<String> = (0..N).map(|k| format!("c-{k}")).collect();
    // a gets c's updates only through b from now on.
    wan.cut(0, 2, true);
    let at_c = p.client(2).await;
    for (k, key) in keys.iter().enumerate() {
        let v = format!("v-{k}");
        at_c.put(key, &v).await.expect("write at c");
        history.record(Op::write(1, 2, key.as_str(), v.as_str()));
    }
    let c_has = at_c.context().get(2);
    let at_b = p.client(1).await;
    eventually(ms(20_000), "b has c's writes", async || {
        at_b.status().await.is_ok_and(|s| s.applied[2] >= c_has)
    })
    .await;
    // A session at b reads them all: its token names c's updates that b holds.
    let mut b_had = Vec::new();
    for key in &keys {
        let v = at_b.get(key).await.expect("read at b");
        let v = v.map(|b| String::from_utf8_lossy(&b).into_owned());
        history.record(Op::read(
            2,
            1,
            key.as_str(),
            v.clone().map(String::into_bytes),
        ));
        b_had.push(v);
    }
    assert!(
        b_had.iter().all(Option::is_some),
        "b has c's writes: {b_had:?}"
    );
    let b_token = at_b.session_token();
    // c writes once more, cut off from b as well: only c ever has it, and its session's token
    // names it.
    wan.cut(1, 2, true);
    at_c.put("c-late", "only-at-c").await.expect("write at c");
    history.record(Op::write(1, 2, "c-late", "only-at-c"));
    let c_token = at_c.session_token();
    // c dies for good, disk included.
    drop(at_c);
    p.kill(2);
    std::fs::remove_dir_all(&p.configs[2].data_dir).expect("delete c's data directory");
    // A session at a carrying b's token waits on c's updates (a has none of them).
    let waiting = {
        let session = p
            .client_builder(0)
            .timeout(ms(2_000))
            .connect()
            .await
            .expect("client of a");
        session.set_session_token(&b_token).expect("b's token");
        let keys = keys.clone();
        let deadline = Duration::from_secs(if relay { 60 } else { 15 });
        tokio::spawn(async move {
            let started = Instant::now();
            let mut out = Vec::new();
            for key in &keys {
                let v = loop {
                    match session.get(key).await {
                        Ok(v) => break Some(v.map(|b| String::from_utf8_lossy(&b).into_owned())),
                        Err(ClientError::NotReady { .. }) if started.elapsed() < deadline => {}
                        Err(e) => {
                            eprintln!("the waiting session at a gave up on {key}: {e}");
                            break None;
                        }
                    }
                };
                match v {
                    Some(v) => out.push(v),
                    None => return None,
                }
            }
            Some(out)
        })
    };
    eventually(ms(20_000), "a judges c down", async || {
        admin
            .status()
            .await
            .is_ok_and(|s| s.peers.iter().any(|x| x.name == "c" && x.state == "down"))
    })
    .await;
    let out = cli(&[
        "sites",
        "remove",
        "c",
        "--dead",
        "--site",
        &p.addr(0).to_string(),
    ]);
    let said = common::assert_success(&out);
    assert!(said.contains("removed as dead"), "{said}");
    // Both survivors hold the change; the Raft group drops c (a dead voter: joint consensus
    // with a majority of both sets).
    for i in 0..2 {
        let c = p.client(i).await;
        eventually(
            ms(20_000),
            "the survivors drop c from the Raft group",
            async || {
                c.status().await.is_ok_and(|s| {
                    let m = s.membership.expect("membership");
                    let voters = s.consensus.expect("consensus").voters;
                    m.epoch == 2
                        && m.sites[2].state.starts_with("removed-dead")
                        && voters.iter().all(|v| v.site != 2)
                })
            },
        )
        .await;
    }
    // The session that saw c's last write: Lost, with the cut; it continues once it accepts.
    let lost = p.client(0).await;
    lost.set_session_token(&c_token).expect("c's token");
    match lost.get("c-0").await {
        Err(ClientError::Lost {
            site, have, need, ..
        }) => {
            assert_eq!(site, 2);
            assert!(
                have >= c_has && need > have,
                "cut {have}, context {need}, c had {c_has}"
            );
            lost.accept_loss(site, have);
        }
        other => panic!("a session beyond the cut must get Lost, got {other:?}"),
    }
    if relay && let Err(e) = lost.get("b-none").await {
        panic!(
            "the session proceeds after accepting the loss: {e}\n--- a:\n{}\n--- b:\n{}",
            p.log(0),
            p.log(1)
        );
    }
    // The CLI: refused with the Lost error, then continues with --accept-loss.
    let get = |extra: &[&str]| {
        let mut args = vec!["get", "c-0", "--token", &c_token, "--site"];
        let a = p.addr(0).to_string();
        args.push(&a);
        args.extend_from_slice(extra);
        cli(&args)
    };
    let refused = get(&[]);
    let text = String::from_utf8_lossy(&refused.stderr).into_owned()
        + &String::from_utf8_lossy(&refused.stdout);
    assert!(!refused.status.success() && text.contains("Lost"), "{text}");
    if relay {
        let accepted = get(&["--accept-loss"]);
        assert_eq!(
            String::from_utf8_lossy(&accepted.stdout).trim(),
            "v-0",
            "get --accept-loss: {}",
            String::from_utf8_lossy(&accepted.stderr)
        );
    }
    // The session at a, waiting on c's updates.
    let a_read: Vec<Option<String>> = match waiting.await.expect("waiting session") {
        Some(vals) => vals,
        None => vec![None; N],
    };
    for (key, v) in keys.iter().zip(&a_read) {
        if let Some(v) = v {
            history.record(Op::read(3, 0, key.as_str(), Some(v.clone().into_bytes())));
        }
    }
    // Old tokens: b's session token from before the change still works at b.
    let old = p.client(1).await;
    old.set_session_token(&b_token).expect("b's token");
    assert_eq!(
        old.get("c-0")
            .await
            .expect("an old token works after the change"),
        Some("v-0".into())
    );
    let a_state = admin
        .status()
        .await
        .expect("status of a")
        .membership
        .expect("membership")
        .sites[2]
        .state
        .clone();
    // Nothing revokes c's certificate. Started again on an empty data directory to join from
    // a, c is refused by its id, and a sends it no snapshot of the store.
    wan.cut(0, 2, false);
    wan.cut(1, 2, false);
    let mut again = p.configs[2].clone();
    again.join_from = Some("a".into());
    let c_again = p.add(again);
    eventually(
        ms(30_000),
        "the removed site's join is refused",
        async || p.log(c_again).contains("joining: snapshot request failed"),
    )
    .await;
    let (c_log, a_log) = (p.log(c_again), p.log(0));
    assert!(c_log.contains("was removed from the cluster"), "{c_log}");
    assert!(
        !a_log.contains("snapshot sent to a joining site") && !c_log.contains("joined:"),
        "a removed site got a snapshot:\n--- a:\n{a_log}\n--- c:\n{c_log}"
    );
    p.kill(c_again);
    drop(wan);
    DeadSiteRun {
        a_read,
        b_had,
        history,
        a_state,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn remove_dead_site_survivors_relay_its_updates_up_to_the_cut() {
    bounded(ms(240_000), async {
        let run = remove_dead_site_run(true).await;
        assert_eq!(
            run.a_read, run.b_had,
            "a converges on everything b had from c (through the relay)"
        );
        let report = checker::check(&run.history);
        assert!(report.is_ok(), "{report}");
        assert!(
            run.a_state.starts_with("removed-dead: cut"),
            "{}",
            run.a_state
        );
        // The planted-bug half is `remove_dead_site_without_the_relay_a_never_gets_them`.
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn remove_dead_site_without_the_relay_a_never_gets_them() {
    bounded(ms(240_000), async {
        let run = remove_dead_site_run(false).await;
        // The outcome the relay test requires does not hold: a never gets c's updates.
        assert_ne!(
            run.a_read, run.b_had,
            "without the relay a must miss c's updates"
        );
        assert!(run.a_read.iter().all(Option::is_none), "{:?}", run.a_read);
        // Status shows the change stuck in its relay phase.
        assert!(
            run.a_state
                .starts_with("removed-dead: relaying up to the cut"),
            "{}",
            run.a_state
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn remove_live_site_under_load_drains_and_its_clients_fail_over() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    bounded(ms(240_000), async {
        let prep = Cluster::prepare_strong(3);
        let p = prep.spawn().await;
        p.wait_connected().await;
        let certs = p.certs.clone();
        let admin = p.client(0).await;
        eventually(
            ms(20_000),
            "the configuration is bootstrapped",
            async || {
                admin.status().await.is_ok_and(|s| {
                    s.membership
                        .is_some_and(|m| m.epoch == 1 && m.source == "replicated")
                })
            },
        )
        .await;
        // Writers: three sessions at c (failing over to a, then b) and one at a. Every key is
        // written once; each session reads its previous write back before the next.
        let recorder = checker::Recorder::new();
        let stop = Arc::new(AtomicBool::new(false));
        let removed = Arc::new(AtomicBool::new(false));
        let after_removal = Arc::new(AtomicUsize::new(0));
        let mut writers = Vec::new();
        for s in 0..4u64 {
            let order = if s < 3 {
                vec![p.addr(2), p.addr(0), p.addr(1)]
            } else {
                vec![p.addr(0), p.addr(1)]
            };
            let client = common::cli_client_builder(&certs, order)
                .connect()
                .await
                .expect("writer connects");
            let (recorder, stop) = (recorder.clone(), stop.clone());
            let (removed, after_removal) = (removed.clone(), after_removal.clone());
            writers.push(tokio::spawn(async move {
                let mut errors = Vec::new();
                let mut prev: Option<String> = None;
                let mut i = 0u64;
                while !stop.load(Ordering::SeqCst) {
                    if let Some(k) = &prev {
                        match client.get(k).await {
                            Ok(got) => {
                                let got = got.map(|b| b.to_vec());
                                recorder.record(Op::read(s, 0, k.as_str(), got));
                            }
                            Err(e) => errors.push(format!("read {k}: {e}")),
                        }
                    }
                    let (k, v) = (format!("w{s}-{i}"), format!("{s}:{i}"));
                    match client.put(&k, &v).await {
                        Ok(_) => {
                            recorder.record(Op::write(s, 0, k.as_str(), v.as_str()));
                            if removed.load(Ordering::SeqCst) {
                                after_removal.fetch_add(1, Ordering::SeqCst);
                            }
                            prev = Some(k);
                        }
                        Err(e) => errors.push(format!("write {k}: {e}")),
                    }
                    i += 1;
                }
                errors
            }));
        }
        eventually(ms(20_000), "the writers are under way", async || {
            recorder.snapshot().len() > 200
        })
        .await;
        // A session from before the change, with a write at c in its token.
        let old = p.client(2).await;
        old.put("old-token", "before").await.expect("write at c");
        recorder.record(Op::write(10, 2, "old-token", "before"));
        let old_token = old.session_token();
        drop(old);
        let out = std::process::Command::new(BIN)
            .args(["sites", "remove", "c", "--site", &p.addr(0).to_string()])
            .arg("--certs")
            .arg(&certs)
            .output()
            .expect("run the CLI");
        let said = common::assert_success(&out);
        assert!(said.contains("is leaving"), "{said}");
        // c drains, proposes its own removal and leaves the Raft group.
        for i in 0..2 {
            let c = p.client(i).await;
            eventually(
                ms(30_000),
                "c is removed and out of the Raft group",
                async || {
                    c.status().await.is_ok_and(|s| {
                        let m = s.membership.expect("membership");
                        let voters = s.consensus.expect("consensus").voters;
                        m.epoch == 3
                            && m.sites[2].state == "removed"
                            && voters.iter().all(|v| v.site != 2)
                    })
                },
            )
            .await;
        }
        removed.store(true, Ordering::SeqCst);
        eventually(
            ms(30_000),
            "the writers go on after the removal",
            async || after_removal.load(Ordering::SeqCst) >= 100,
        )
        .await;
        // The token from before the change works after it, at a site that remains.
        let later = p.client(1).await;
        later.set_session_token(&old_token).expect("old token");
        let got = later
            .get("old-token")
            .await
            .expect("an old token works after the change");
        assert_eq!(got, Some("before".into()));
        recorder.record(Op::read(10, 1, "old-token", Some(b"before".to_vec())));
        stop.store(true, Ordering::SeqCst);
        for w in writers {
            let errors = w.await.expect("writer");
            assert!(
                errors.is_empty(),
                "the clients fail over without an error: {errors:?}"
            );
        }
        assert!(
            p.log(2).contains("this site is leaving the cluster")
                && p.log(2).contains("removed from the cluster configuration"),
            "{}",
            p.log(2)
        );
        // No acknowledged write is lost: a and b both hold every one.
        let history = recorder.snapshot();
        let writes: Vec<(Vec<u8>, Vec<u8>)> = history
            .ops()
            .iter()
            .filter_map(|op| match &op.kind {
                checker::OpKind::Write { key, value } => Some((key.clone(), value.clone())),
                _ => None,
            })
            .collect();
        for i in 0..2 {
            let reader = p.client(i).await;
            for (k, v) in &writes {
                let mut got = None;
                eventually(
                    ms(20_000),
                    "every acknowledged write is at the survivors",
                    async || {
                        got = reader.get(k).await.ok().flatten().map(|b| b.to_vec());
                        got.as_ref() == Some(v)
                    },
                )
                .await;
            }
        }
        let report = checker::check(&history);
        assert!(report.is_ok(), "{report}");
        println!(
            "decommission under load: {} operations, {} writes, {} after the removal",
            history.len(),
            writes.len(),
            after_removal.load(Ordering::SeqCst)
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn remove_refuses_bad_input_with_clear_errors_and_keeps_serving() {
    bounded(ms(180_000), async {
        let prep = Cluster::prepare_strong(3);
        let mut c = prep.start().await;
        c.wait_connected().await;
        c.wait_bootstrapped().await;
        let a = c.client(0).await;
        let refused = |r: Result<u64, ClientError>, code: u16, why: &str| match r {
            Err(ClientError::Server { code: got, message }) if got == code => {
                assert!(message.contains(why), "{message:?} should say {why:?}")
            }
            Err(ClientError::Unavailable(message)) if code == 8 => {
                assert!(message.contains(why), "{message:?} should say {why:?}")
            }
            other => panic!("expected error {code} saying {why:?}, got {other:?}"),
        };
        // An unknown site, a stale epoch, --dead on a site that is up.
        refused(
            a.remove_site("zz", false, 1).await,
            3,
            "no site is named \"zz\"",
        );
        refused(
            a.remove_site("c", true, 0).await,
            3,
            "moved on: it is at epoch 1",
        );
        refused(
            a.remove_site("c", true, 1).await,
            3,
            "is up as seen from here",
        );
        // c stops; b as well: the cut needs every survivor, so b's silence blocks it.
        c.stop(2).await;
        c.stop(1).await;
        eventually(ms(20_000), "a judges b and c down", async || {
            c.node(0).status().peers.iter().all(|p| p.state == "down")
        })
        .await;
        refused(
            a.remove_site("c", true, 1).await,
            8,
            "survivor \"b\" did not say",
        );
        // Nothing changed, and a still serves.
        assert_eq!(c.node(0).status().membership.unwrap().epoch, 1);
        a.put("still", "serving")
            .await
            .expect("a serves after the refusals");
        // b is back: the removal goes through.
        c.restart(1).await;
        let mut epoch = Err(ClientError::Config("not tried".into()));
        eventually(
            ms(30_000),
            "c is removed as dead once b answers",
            async || {
                epoch = a.remove_site("c", true, 1).await;
                epoch.is_ok()
            },
        )
        .await;
        assert_eq!(epoch.unwrap(), 2);
        // Two sites left: removing one of them would leave no majority of the voters.
        refused(a.remove_site("b", true, 2).await, 3, "not a majority");
        refused(a.remove_site("c", true, 2).await, 3, "already removed-dead");
        assert_eq!(c.node(0).status().membership.unwrap().epoch, 2);
        a.put("still", "serving-2")
            .await
            .expect("a serves after the refusals");
        c.shutdown().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn membership_changes_on_partitioned_sites_are_refused_with_a_clear_error() {
    bounded(ms(60_000), async {
        // 2 sites x 2 partitions: node 0 is site a's partition 0, which keeps the configuration.
        let c = Cluster::prepare_partitioned(2, 2).start().await;
        c.wait_connected().await;
        let a = c.client(0).await;
        let new_site: std::net::SocketAddr = "127.0.0.1:9".parse().unwrap();
        for (what, r) in [
            ("adding", a.add_site("c", new_site, 1).await),
            ("removing", a.remove_site("b", false, 1).await),
        ] {
            match r {
                Err(ClientError::Server { code: 3, message }) => assert!(
                    message.starts_with(what)
                        && message.ends_with("a cluster of partitioned sites is not supported yet"),
                    "{message:?}"
                ),
                other => panic!("{what}: expected a refusal, got {other:?}"),
            }
        }
        a.put("still", "serving")
            .await
            .expect("the site serves after the refusals");
        // Dropped with the test's runtime: a graceful stop of a partitioned cluster takes
        // seconds and shows nothing here.
        drop(c);
    })
    .await;
}
