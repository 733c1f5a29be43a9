//! Durability end to end: real processes, real files, real fsync.
//!
//! - `kill -9` of a site under load, twenty times at seeded random points: no acknowledged write
//!   is lost, the recorded history stays causally consistent and the sites converge;
//! - a torn tail of the write-ahead log is truncated with a warning;
//! - a corrupt record stops start-up with an error naming the segment, the offset and
//!   `causalkv repair`, and the repair command gets the site going again;
//! - snapshots with log pruning bound disk use, and a restart recovers from snapshot + log tail;
//! - a site acks a peer's updates only once they are durable: killed and restarted, it still has
//!   everything the peer stopped retaining.
//!
//! `DURABILITY_SEED` (default below) picks the kill points; `DURABILITY_KILLS` the number of kills;
//! `DURABILITY_FSYNC` the fsync policy of the kill test (`always`, the default, `batch` or
//! `never`). A killed process loses no acknowledged write under any policy (the ones that do not
//! fsync acknowledge after the `write(2)`, and the kernel keeps what was written); only a machine
//! crash tells them apart, which this suite does not simulate.

use crate::common;

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::common::{
    BIN, Cluster, Logged, Processes, bounded, env_u64, eventually, ms, wait_until,
};
use causalkv::client::ClientBuilder;
use causalkv::storage::wal::FsyncPolicy;
use causalkv::tools::checker::{self, Op};
use causalkv::tools::{certs, dev};
use causalkv::{Client, ClientError, Node};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tokio::sync::watch;

const DEFAULT_SEED: u64 = 0xD0_5EED;

// ---------------------------------------------------------------------------------------------
// Write-ahead log files

/// The `wal-*.log` segments of a data directory, oldest first.
fn wal_segments(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = fs::read_dir(dir)
        .expect("read data dir")
        .map(|e| e.expect("dir entry").path())
        .filter(|p| {
            let n = p.file_name().unwrap().to_string_lossy();
            n.starts_with("wal-") && n.ends_with(".log")
        })
        .collect();
    v.sort();
    v
}

/// The start LSN in a `wal-<lsn>.log` or `snapshot-<lsn>.rkyv` file name.
fn lsn_of(p: &Path) -> u64 {
    let n = p.file_stem().unwrap().to_string_lossy();
    n.rsplit('-')
        .next()
        .unwrap()
        .parse()
        .expect("lsn in file name")
}

fn snapshots(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = fs::read_dir(dir)
        .expect("read data dir")
        .map(|e| e.expect("dir entry").path())
        .filter(|p| {
            let n = p.file_name().unwrap().to_string_lossy();
            n.starts_with("snapshot-") && n.ends_with(".rkyv")
        })
        .collect();
    v.sort();
    v
}

/// The frames of a segment as `(offset, payload length)`, read independently of the crate:
/// `[u32 LE length][u32 LE crc32][payload]`. `Err(offset)` at the first frame that is not whole
/// with a matching CRC.
fn frames(data: &[u8]) -> Result<Vec<(usize, usize)>, usize> {
    let mut out = Vec::new();
    let mut off = 0;
    while off < data.len() {
        if data.len() - off < 8 {
            return Err(off);
        }
        let len = u32::from_le_bytes(data[off..off + 4].try_into().unwrap()) as usize;
        let crc = u32::from_le_bytes(data[off + 4..off + 8].try_into().unwrap());
        if len == 0
            || data.len() - off - 8 < len
            || crc32fast::hash(&data[off + 8..off + 8 + len]) != crc
        {
            return Err(off);
        }
        out.push((off, len));
        off += 8 + len;
    }
    Ok(out)
}

fn find(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

fn key(i: usize) -> String {
    format!("dur-key-{i:04}")
}

fn value(i: usize) -> String {
    format!("value-{i:04}-{}", "x".repeat(i % 17))
}

// ---------------------------------------------------------------------------------------------
// 1. kill -9 under load

/// Whether site A is serving, as the sessions are told by the test: `epoch` grows with every
/// restart, so a session knows its connection belongs to a dead process.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Phase {
    up: bool,
    epoch: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Outcome {
    /// Sent, no answer yet.
    Pending,
    /// Acknowledged: must survive any crash.
    Acked,
    /// Failed or cancelled by a kill: may or may not have taken effect.
    Unknown,
}

/// Every write ever issued. Each key is written by one session only, so a key's writes are in
/// that session's order, which the store's timestamps must follow.
#[derive(Default)]
struct Model {
    /// Per key: `(value, outcome)` in issue order.
    keys: HashMap<String, Vec<(String, Outcome)>>,
    /// Value → `(key, index in that key's writes)`. Values are unique.
    values: HashMap<String, (String, usize)>,
}

impl Model {
    fn issue(&mut self, key: &str, value: &str) -> usize {
        let w = self.keys.entry(key.to_owned()).or_default();
        w.push((value.to_owned(), Outcome::Pending));
        let i = w.len() - 1;
        assert!(
            self.values
                .insert(value.to_owned(), (key.to_owned(), i))
                .is_none(),
            "value {value} written twice"
        );
        i
    }

    fn settle(&mut self, key: &str, i: usize, o: Outcome) {
        self.keys.get_mut(key).expect("issued")[i].1 = o;
    }

    /// Per key: the index of its last acknowledged write.
    fn floors(&self) -> HashMap<String, usize> {
        self.keys
            .iter()
            .filter_map(|(k, w)| {
                w.iter()
                    .rposition(|(_, o)| *o == Outcome::Acked)
                    .map(|i| (k.clone(), i))
            })
            .collect()
    }

    /// Checks what a site returned for `key` against the floors taken before the read: the last
    /// write acknowledged by then, or a write issued after it (acknowledged later, or of
    /// unknown outcome). `None` only if nothing was acknowledged.
    fn judge(
        &self,
        floors: &HashMap<String, usize>,
        key: &str,
        got: Option<&str>,
    ) -> Result<(), String> {
        let floor = floors.get(key).copied();
        match (got, floor) {
            (None, None) => Ok(()),
            (None, Some(f)) => Err(format!(
                "{key}: absent, but {:?} was acknowledged",
                self.keys[key][f].0
            )),
            (Some(v), floor) => match self.values.get(v) {
                None => Err(format!("{key}: {v:?} was never written")),
                Some((k, _)) if k != key => Err(format!("{key}: {v:?} belongs to {k}")),
                Some((_, i)) if floor.is_some_and(|f| *i < f) => Err(format!(
                    "{key}: returned {v:?} (write #{i}, {:?}), older than the acknowledged {:?} \
                     (write #{})",
                    self.keys[key][*i].1,
                    self.keys[key][floor.unwrap()].0,
                    floor.unwrap()
                )),
                Some(_) => Ok(()),
            },
        }
    }
}

/// What a session did.
#[derive(Default)]
struct SessionLog {
    ops: Vec<Logged>,
    errors: BTreeMap<String, usize>,
    cancelled: usize,
    reconnects: usize,
}

impl SessionLog {
    fn error(&mut self, e: &ClientError) {
        let kind = format!("{e:?}");
        let kind = kind.split(['(', ' ', '{']).next().unwrap_or("?").to_owned();
        *self.errors.entry(kind).or_default() += 1;
    }
}

/// Connection settings of one site (a [`ClientBuilder`] is not `Clone`).
#[derive(Clone)]
struct Conn {
    addr: String,
    cert: PathBuf,
    key: PathBuf,
    ca: PathBuf,
}

impl Conn {
    fn of(p: &Processes, i: usize) -> Conn {
        let id = certs::client_paths(&p.certs, dev::CLI_CLIENT);
        Conn {
            addr: p.addr(i).to_string(),
            cert: id.cert,
            key: id.key,
            ca: p.ca(),
        }
    }

    fn builder(&self) -> ClientBuilder {
        Client::builder()
            .sites([self.addr.clone()])
            .identity(&self.cert, &self.key)
            .ca(&self.ca)
            .timeout(ms(3_000))
    }
}

/// What a session task needs.
struct SessionCtx {
    id: u64,
    site: u16,
    conn: Conn,
    /// Keys this session writes (no other session writes them).
    own: Vec<String>,
    /// Keys it reads.
    all: Arc<Vec<String>>,
    seed: u64,
    model: Arc<Mutex<Model>>,
    /// Bumped on every acknowledged operation.
    progress: Arc<watch::Sender<u64>>,
    stop: watch::Receiver<bool>,
}

enum Step {
    Read(String),
    Write(String, String),
}

/// A session: 60 % writes of unique values to its own keys, 40 % reads of any key. When the
/// site dies under it (the phase says so), the operation in flight is abandoned (a write's
/// outcome becomes unknown) and the session continues on a new connection once the site is back,
/// carrying its causal context over with its session token: it is the same session.
async fn session(cx: SessionCtx, mut phase: watch::Receiver<Phase>) -> SessionLog {
    let SessionCtx {
        id,
        site,
        conn,
        own,
        all,
        seed,
        model,
        progress,
        mut stop,
    } = cx;
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ (id.wrapping_mul(0x9E37_79B9_7F4A_7C15)));
    let mut log = SessionLog::default();
    let mut token: Option<String> = None;
    let mut n = 0u64;
    'connect: loop {
        let epoch = tokio::select! {
            p = phase.wait_for(|p| p.up) => p.expect("phase sender lives").epoch,
            _ = stop.wait_for(|s| *s) => break 'connect,
        };
        let connected = tokio::select! {
            c = conn.builder().connect() => c,
            _ = phase.wait_for(|p| p.epoch != epoch || !p.up) => continue 'connect,
        };
        let client = match connected {
            Ok(c) => c,
            Err(e) => {
                log.error(&e);
                continue 'connect;
            }
        };
        log.reconnects += 1;
        if let Some(t) = &token {
            client.set_session_token(t).expect("own token");
        }
        loop {
            if *stop.borrow() {
                break 'connect;
            }
            let step = if rng.gen_bool(0.6) {
                n += 1;
                let k = own[rng.gen_range(0..own.len())].clone();
                let v = format!("{k}={id}.{n}");
                Step::Write(k, v)
            } else {
                Step::Read(all[rng.gen_range(0..all.len())].clone())
            };
            let issued = match &step {
                Step::Write(k, v) => Some(model.lock().unwrap().issue(k, v)),
                Step::Read(_) => None,
            };
            let op = async {
                match &step {
                    Step::Write(k, v) => client.put(k, v).await.map(|_| None),
                    Step::Read(k) => client.get(k).await.map(Some),
                }
            };
            let res = tokio::select! {
                biased;
                r = op => Some(r),
                _ = phase.wait_for(|p| p.epoch != epoch || !p.up) => None,
            };
            match (res, &step) {
                (Some(Ok(_)), Step::Write(k, v)) => {
                    model
                        .lock()
                        .unwrap()
                        .settle(k, issued.unwrap(), Outcome::Acked);
                    log.ops
                        .push(Logged::Acked(Op::write(id, site, k.clone(), v.clone())));
                }
                (Some(Ok(got)), Step::Read(k)) => {
                    let got = got.unwrap().map(|b| b.to_vec());
                    log.ops
                        .push(Logged::Acked(Op::read(id, site, k.clone(), got)));
                }
                (failed, _) => {
                    match &failed {
                        Some(Err(e)) => log.error(e),
                        _ => log.cancelled += 1,
                    }
                    if let Step::Write(k, v) = &step {
                        model
                            .lock()
                            .unwrap()
                            .settle(k, issued.unwrap(), Outcome::Unknown);
                        log.ops
                            .push(Logged::Unknown(Op::write(id, site, k.clone(), v.clone())));
                    }
                    // A new connection (the old one may belong to a dead process).
                    continue 'connect;
                }
            }
            token = Some(client.session_token());
            progress.send_modify(|p| *p += 1);
        }
    }
    log
}

/// Reads every key of `keys` at site `i` with a fresh client (a few reads in flight).
async fn read_all(p: &Processes, i: usize, keys: &[String]) -> BTreeMap<String, Option<String>> {
    let client = Arc::new(p.client(i).await);
    let mut set = tokio::task::JoinSet::new();
    for chunk in keys.chunks(keys.len().div_ceil(8).max(1)) {
        let (client, chunk) = (client.clone(), chunk.to_vec());
        set.spawn(async move {
            let mut out = Vec::new();
            for k in chunk {
                let v = client
                    .get(&k)
                    .await
                    .unwrap_or_else(|e| panic!("read of {k} at site {i}: {e}"));
                out.push((k, v.map(|b| String::from_utf8(b.to_vec()).expect("utf-8"))));
            }
            out
        });
    }
    let mut all = BTreeMap::new();
    while let Some(r) = set.join_next().await {
        all.extend(r.expect("reader task"));
    }
    all
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_dash_nine_loses_no_acknowledged_write() {
    let seed = env_u64("DURABILITY_SEED", DEFAULT_SEED);
    let kills = env_u64("DURABILITY_KILLS", 20) as usize;
    let policy = std::env::var("DURABILITY_FSYNC").unwrap_or_else(|_| "always".into());
    let fsync = match policy.as_str() {
        "always" => FsyncPolicy::Always,
        "batch" => FsyncPolicy::Batch,
        "never" => FsyncPolicy::Never,
        other => panic!("DURABILITY_FSYNC={other:?}: always, batch or never"),
    };
    println!("DURABILITY_SEED={seed} DURABILITY_KILLS={kills} DURABILITY_FSYNC={policy}");
    bounded(ms(150_000), async {
        let started = Instant::now();
        let mut prepared = Cluster::prepare(3);
        for c in &mut prepared.configs {
            assert_eq!(c.storage.fsync, FsyncPolicy::Always, "the default");
            c.storage.fsync = fsync;
            // Small segments and frequent snapshots, so kills also land in segment rolls,
            // snapshot writes and log pruning, and restarts recover from snapshot + log.
            c.storage.segment_bytes = 8 << 10;
            c.storage.snapshot_log_bytes = 32 << 10;
            c.storage.snapshot_interval_ms = 20;
        }
        let mut procs = prepared.spawn().await;
        procs.wait_connected().await;

        // Sessions 0 and 1 at site A (0) write disjoint key ranges; session 2 at site B (1)
        // writes its own keys. Everyone reads every key.
        let a_keys: Vec<String> = (0..300).map(|i| format!("a{i:03}")).collect();
        let b_keys: Vec<String> = (0..50).map(|i| format!("b{i:02}")).collect();
        let all: Arc<Vec<String>> = Arc::new(a_keys.iter().chain(&b_keys).cloned().collect());
        let model = Arc::new(Mutex::new(Model::default()));
        let progress = Arc::new(watch::Sender::new(0u64));
        let (stop_tx, stop_rx) = watch::channel(false);
        let (phase_tx, phase_rx) = watch::channel(Phase { up: true, epoch: 0 });
        // Site B is never killed: its session's phase stays up.
        let (_b_phase_tx, b_phase_rx) = watch::channel(Phase { up: true, epoch: 0 });
        let mut tasks = tokio::task::JoinSet::new();
        let sessions = [
            (0u64, 0u16, a_keys[..200].to_vec(), phase_rx.clone()),
            (1, 0, a_keys[200..].to_vec(), phase_rx.clone()),
            (2, 1, b_keys.clone(), b_phase_rx),
        ];
        for (id, site, own, phase) in sessions {
            let cx = SessionCtx {
                id,
                site,
                conn: Conn::of(&procs, site as usize),
                own,
                all: all.clone(),
                seed,
                model: model.clone(),
                progress: if site == 0 {
                    progress.clone()
                } else {
                    Arc::new(watch::Sender::new(0))
                },
                stop: stop_rx.clone(),
            };
            tasks.spawn(async move { (id, session(cx, phase).await) });
        }

        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut progress_rx = progress.subscribe();
        let mut restarts = Vec::new();
        for kill in 1..=kills {
            // Load is running at A: acknowledged operations since the last restart.
            let base = *progress_rx.borrow_and_update();
            // (The watch guard `wait_for` returns is dropped at once: the sessions bump it.)
            let moving = tokio::time::timeout(ms(15_000), async {
                progress_rx.wait_for(|&p| p >= base + 10).await.is_ok()
            })
            .await;
            assert!(
                moving == Ok(true),
                "no progress at site A after restart {}; log:\n{}",
                kill - 1,
                procs.log(0)
            );
            tokio::time::sleep(ms(rng.gen_range(50..=300))).await;

            let t0 = Instant::now();
            procs.kill(0);
            // Epoch `kill - 1` is the process just killed; the restarted one is epoch `kill`.
            phase_tx.send_replace(Phase {
                up: false,
                epoch: kill as u64 - 1,
            });
            procs.start(0);
            procs.wait_listening(0, ms(10_000)).await;
            let took = t0.elapsed();
            restarts.push(took);
            phase_tx.send_replace(Phase {
                up: true,
                epoch: kill as u64,
            });

            // Every acknowledged write so far is at A.
            let floors = model.lock().unwrap().floors();
            let got = read_all(&procs, 0, &a_keys).await;
            let bad: Vec<String> = {
                let m = model.lock().unwrap();
                got.iter()
                    .filter_map(|(k, v)| m.judge(&floors, k, v.as_deref()).err())
                    .collect()
            };
            assert!(
                bad.is_empty(),
                "after kill {kill} (seed {seed}) site A lost acknowledged writes:\n  {}\nlog:\n{}",
                bad.join("\n  "),
                procs.log(0)
            );
        }

        stop_tx.send_replace(true);
        let mut logs = BTreeMap::new();
        while let Some(r) = tasks.join_next().await {
            let (id, log) = r.expect("session task");
            logs.insert(id, log);
        }

        // Healed: every site acks every other's updates, then all hold the same contents.
        let clients = [procs.client(0).await, procs.client(1).await, procs.client(2).await];
        eventually(ms(20_000), "every site is caught up with every other", async || {
            for c in &clients {
                match c.status().await {
                    Ok(s)
                        if s.buffered == 0
                            && s.peers
                                .iter()
                                .all(|p| p.state == "up" && p.lag_updates == 0) => {}
                    _ => return false,
                }
            }
            true
        })
        .await;
        let mut states = Vec::new();
        let deadline = Instant::now() + ms(20_000);
        loop {
            states.clear();
            for i in 0..3 {
                states.push((i as u16, read_all(&procs, i, &all).await));
            }
            match checker::check_convergence(&states) {
                Ok(()) => break,
                Err(e) if Instant::now() >= deadline => panic!("sites do not converge: {e}"),
                Err(_) => tokio::time::sleep(ms(50)).await,
            }
        }
        // And what they hold is every acknowledged write (or a later one).
        {
            let bad: Vec<String> = {
                let m = model.lock().unwrap();
                let floors = m.floors();
                states[0]
                    .1
                    .iter()
                    .filter_map(|(k, v)| m.judge(&floors, k, v.as_deref()).err())
                    .collect()
            };
            assert!(bad.is_empty(), "final state misses acknowledged writes:\n  {}", bad.join("\n  "));
        }

        // The history (see `common::history`): acknowledged ops, plus the unknown-outcome writes
        // some read or the final state observed, where they were issued.
        let common::Built {
            history,
            writes,
            reads,
            unknown,
            kept: unknown_kept,
        } = common::history(
            logs.values().map(|l| l.ops.as_slice()),
            states[0]
                .1
                .iter()
                .filter_map(|(k, v)| v.as_deref().map(|v| (k.as_str(), v))),
        );
        let report = checker::check(&history);
        let mut sorted = restarts.clone();
        sorted.sort();
        let mean = sorted.iter().sum::<Duration>() / sorted.len().max(1) as u32;
        println!(
            "kill -9: {kills} kills of site A (seed {seed}); restart (kill to listening) mean {:?}, \
             median {:?}, max {:?}",
            mean,
            sorted.get(sorted.len() / 2).copied().unwrap_or_default(),
            sorted.last().copied().unwrap_or_default()
        );
        println!(
            "history: {} ops ({writes} acknowledged writes, {reads} reads, {unknown} writes of \
             unknown outcome, {unknown_kept} of them observed and kept); {report}",
            history.len()
        );
        for (id, l) in &logs {
            println!(
                "session {id}: {} ops, {} connections, {} cancelled by kills, errors {:?}",
                l.ops.len(),
                l.reconnects,
                l.cancelled,
                l.errors
            );
        }
        // Site A's own account, from the logs of its starts: snapshots taken, and recovery
        // (snapshot load + log replay) times.
        let a_logs: Vec<String> = (1..=kills + 1)
            .map(|n| {
                let p = procs.dir.path().join(format!("site-a.{n}.log"));
                fs::read_to_string(p).unwrap_or_default()
            })
            .collect();
        let snaps: usize = a_logs
            .iter()
            .map(|l| l.matches("snapshot written").count())
            .sum();
        let recovery_ms: Vec<u64> = a_logs
            .iter()
            .flat_map(|l| l.lines())
            .filter(|l| l.contains(" recovered "))
            .filter_map(|l| l.split(" ms=").nth(1)?.split(' ').next()?.parse().ok())
            .collect();
        println!(
            "site A took {snaps} snapshots; recoveries logged {} (max {} ms); restarts (ms): {:?}; \
             total {:?}",
            recovery_ms.len(),
            recovery_ms.iter().max().copied().unwrap_or(0),
            restarts.iter().map(|d| d.as_millis()).collect::<Vec<_>>(),
            started.elapsed()
        );
        assert!(report.is_ok(), "seed {seed}: {report}");
        assert_eq!(report.ops_checked, history.len());
        assert!(
            writes >= 20 * kills,
            "too little load to mean anything: {writes} acknowledged writes"
        );
        assert!(snaps > 0, "no snapshot was taken at site A: kills never hit one");
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// 2. Torn tail

/// One site holding keys `0..n` (written through a client), then stopped gracefully.
async fn written_and_stopped(n: usize) -> Cluster {
    let mut cluster = Cluster::prepare(1).start().await;
    let c = cluster.client(0).await;
    for i in 0..n {
        c.put(key(i), value(i)).await.expect("put");
    }
    drop(c);
    cluster.stop(0).await;
    cluster
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn torn_tail_is_truncated_with_a_warning() {
    bounded(ms(60_000), async {
        const N: usize = 100;
        let mut cluster = written_and_stopped(N).await;
        let dir = cluster.configs[0].data_dir.clone();
        let seg = wal_segments(&dir).pop().expect("a segment");
        let before = fs::read(&seg).unwrap();
        frames(&before).expect("a clean log after a graceful stop");
        // A write cut short by a crash: a header announcing 300 bytes, then only 37 of them.
        let mut torn = Vec::new();
        torn.extend_from_slice(&300u32.to_le_bytes());
        torn.extend_from_slice(&0x1234_5678u32.to_le_bytes());
        torn.extend_from_slice(&[0xAB; 37]);
        fs::OpenOptions::new()
            .append(true)
            .open(&seg)
            .unwrap()
            .write_all(&torn)
            .unwrap();

        cluster.restart(0).await;
        let contents = cluster.node(0).contents();
        for i in 0..N {
            let (_, v) = contents
                .get(key(i).as_bytes())
                .unwrap_or_else(|| panic!("{} lost", key(i)));
            assert_eq!(&v[..], value(i).as_bytes());
        }
        assert_eq!(contents.len(), N);
        let seg_name = seg.display().to_string();
        let offset = format!("offset={}", before.len());
        assert!(
            common::log_line_contains_all(&[
                "truncated a torn write",
                &seg_name,
                &offset,
                "bytes=45"
            ]),
            "no warning naming {seg_name} at {offset}"
        );
        // It serves new writes, appended after the cut.
        let c = cluster.client(0).await;
        c.put("after-torn", "yes")
            .await
            .expect("put after recovery");
        assert_eq!(
            c.get("after-torn").await.unwrap().as_deref(),
            Some(&b"yes"[..])
        );
        drop(c);
        cluster.stop(0).await;
        let after = fs::read(&seg).unwrap();
        assert!(after.starts_with(&before), "records before the tear kept");
        let f = frames(&after).unwrap_or_else(|o| panic!("garbage left at offset {o}"));
        assert!(f.len() > frames(&before).unwrap().len());

        cluster.restart(0).await;
        let contents = cluster.node(0).contents();
        assert_eq!(contents.len(), N + 1);
        assert_eq!(&contents[&b"after-torn"[..]].1[..], b"yes");
        cluster.shutdown().await;
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// 3. Corrupt record

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupt_record_stops_startup_with_a_clear_error() {
    bounded(ms(60_000), async {
        const N: usize = 60;
        let mut cluster = written_and_stopped(N).await;
        let cfg = cluster.configs[0].clone();
        let seg = wal_segments(&cfg.data_dir).pop().expect("a segment");
        let mut data = fs::read(&seg).unwrap();
        // Which frame holds which key (updates are logged in write order, with clock-lease
        // records in between).
        let framed = frames(&data).expect("clean log");
        let holding = |off: usize, len: usize| -> Option<usize> {
            (0..N).find(|&i| find(&data[off + 8..off + 8 + len], key(i).as_bytes()))
        };
        let located: Vec<(usize, usize, Option<usize>)> = framed
            .iter()
            .map(|&(off, len)| (off, len, holding(off, len)))
            .collect();
        let &(bad_off, bad_len, bad_key) = located
            .iter()
            .find(|(_, _, k)| *k == Some(8))
            .expect("a frame holds key 8");
        let kept: Vec<usize> = located
            .iter()
            .filter(|(o, _, _)| *o < bad_off)
            .filter_map(|(_, _, k)| *k)
            .collect();
        assert_eq!(
            kept,
            (0..8).collect::<Vec<_>>(),
            "keys logged in write order"
        );
        // Flip a byte in the middle of that record's payload.
        data[bad_off + 8 + bad_len / 2] ^= 0x20;
        fs::write(&seg, &data).unwrap();

        let err = match Node::start(cfg.clone()).await {
            Ok(_) => panic!("a site with a corrupt log started"),
            Err(e) => e.to_string(),
        };
        println!("start-up refused: {err}");
        assert!(
            err.contains(&seg.display().to_string()),
            "names the segment: {err}"
        );
        assert!(
            err.contains(&format!("offset {bad_off}")),
            "names the offset: {err}"
        );
        assert!(
            err.contains("causalkv repair --config"),
            "names the way out: {err}"
        );
        assert_eq!(
            fs::read(&seg).unwrap(),
            data,
            "refusing to start changes nothing"
        );

        let toml = cluster
            .dir
            .path()
            .join(format!("site-{}.toml", cfg.me().name));
        let out = std::process::Command::new(BIN)
            .arg("repair")
            .arg("--config")
            .arg(&toml)
            .output()
            .expect("run causalkv repair");
        let stdout = common::assert_success(&out);
        println!("repair: {stdout}");
        assert!(stdout.contains("repaired"), "{stdout}");
        assert!(stdout.contains(&format!("offset {bad_off}")), "{stdout}");
        assert_eq!(
            fs::metadata(&seg).unwrap().len(),
            bad_off as u64,
            "cut at the bad record"
        );

        cluster.restart(0).await;
        let contents = cluster.node(0).contents();
        for i in 0..N {
            let got = contents.get(key(i).as_bytes()).map(|(_, v)| v.to_vec());
            if i < bad_key.unwrap() {
                assert_eq!(
                    got,
                    Some(value(i).into_bytes()),
                    "{} before the cut",
                    key(i)
                );
            } else {
                assert_eq!(got, None, "{} was after the cut", key(i));
            }
        }
        let c = cluster.client(0).await;
        c.put("after-repair", "ok")
            .await
            .expect("writes after repair");
        drop(c);
        cluster.stop(0).await;
        // A second repair finds nothing to do.
        let out = std::process::Command::new(BIN)
            .arg("repair")
            .arg("--config")
            .arg(&toml)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(0));
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(stdout.contains("intact"), "{stdout}");
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// 4. Snapshots and pruning

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_and_pruning_bound_disk_use() {
    bounded(ms(60_000), async {
        const LOG_BYTES: u64 = 64 << 10;
        const SEGMENT: u64 = 16 << 10;
        const KEYS: usize = 16;
        let mut prepared = Cluster::prepare(1);
        let st = &mut prepared.configs[0].storage;
        st.snapshot_log_bytes = LOG_BYTES;
        st.snapshot_interval_ms = 10;
        st.segment_bytes = SEGMENT;
        let mut cluster = prepared.start().await;
        let dir = cluster.configs[0].data_dir.clone();
        let node = cluster.node(0);
        // Disk use is back under the bound once the snapshotter has run after each batch: the
        // log never keeps more than a snapshot's worth plus the current segment.
        let bound = LOG_BYTES + SEGMENT;
        let mut last = vec![String::new(); KEYS];
        let mut n = 0usize;
        let mut peak = 0;
        for batch in 0..100 {
            for _ in 0..200 {
                let k = n % KEYS;
                last[k] = format!("v{n:06}-{}", "y".repeat(40));
                node.put_local(format!("snap-{k:02}").into(), Some(last[k].clone().into()));
                n += 1;
            }
            peak = peak.max(node.wal_stats().1);
            wait_until(
                ms(10_000),
                &format!("the log is pruned to under {bound} bytes after batch {batch}"),
                || node.wal_stats().1 < bound,
            )
            .await;
        }
        // The log forgets pruned segments at once and deletes their files just after, off the
        // runtime: await the files too before counting them.
        let max_segs = (bound / SEGMENT + 1) as usize;
        wait_until(
            ms(10_000),
            &format!("one snapshot and at most {max_segs} log segments on disk"),
            || snapshots(&dir).len() == 1 && wal_segments(&dir).len() <= max_segs,
        )
        .await;
        let snaps = snapshots(&dir);
        assert_eq!(snaps.len(), 1, "older snapshots deleted: {snaps:?}");
        let snap_lsn = lsn_of(&snaps[0]);
        let segs = wal_segments(&dir);
        println!(
            "{n} overwrites of {KEYS} keys: log {snap_lsn}+ bytes written, on disk now {} in {} \
             segments, peak seen {peak}",
            node.wal_stats().1,
            segs.len()
        );
        assert!(
            snap_lsn > 20 * bound,
            "the log grew to {snap_lsn} bytes: far past the bound, so pruning mattered"
        );
        assert!(segs.len() <= max_segs, "{segs:?}");
        assert!(lsn_of(&segs[0]) > 0, "the start of the log was pruned");

        // A tail after the last snapshot, then restart: snapshot + tail.
        for i in 0..50 {
            let k = i % KEYS;
            last[k] = format!("tail-{i}");
            node.put_local(format!("snap-{k:02}").into(), Some(last[k].clone().into()));
        }
        let want = node.contents();
        cluster.stop(0).await;
        let snap_lsn = lsn_of(&snapshots(&dir)[0]);
        let segs = wal_segments(&dir);
        let log_end = {
            let s = segs.last().unwrap();
            lsn_of(s) + fs::metadata(s).unwrap().len()
        };
        assert!(log_end > snap_lsn, "a log tail after the snapshot");
        assert!(
            lsn_of(&segs[0]) > 0,
            "the log alone cannot rebuild the state"
        );
        cluster.restart(0).await;
        let got = cluster.node(0).contents();
        assert!(got == want, "recovered state differs");
        for (k, v) in last.iter().enumerate() {
            assert_eq!(&got[format!("snap-{k:02}").as_bytes()].1[..], v.as_bytes());
        }
        cluster.shutdown().await;
    })
    .await;
}

/// On a multi-threaded runtime the endpoint's socket is closed on another worker after the stop;
/// the stop waits for it, so a site restarts on its own address at once (no retry), while its
/// peer and a client are connected and with requests in flight.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_site_restarts_on_its_address_at_once() {
    bounded(ms(60_000), async {
        let mut c = Cluster::start(2).await;
        // Stopped while its links are still being set up.
        c.stop(1).await;
        c.restart(1).await;
        c.wait_connected().await;
        for round in 0..5 {
            let client = c.client(0).await;
            client.put(key(0), value(round)).await.expect("put at a");
            // Puts keep going until the stop refuses or cuts them.
            let load = tokio::spawn(async move {
                let mut i = 1;
                while client.put(key(i), value(round)).await.is_ok() {
                    i += 1;
                }
            });
            let peer = c.client(1).await;
            peer.put(key(1_000 + round), value(round))
                .await
                .expect("put at b");
            c.stop(0).await;
            load.await.unwrap();
            c.restart(0).await;
            let again = c.client(0).await;
            again
                .put(key(2_000 + round), value(round))
                .await
                .expect("put after restart");
        }
        c.shutdown().await;
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// 5. Remote updates

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_remote_updates_are_durable_before_ack() {
    bounded(ms(60_000), async {
        const N: usize = 200;
        let mut procs = Cluster::prepare(2).spawn().await;
        procs.wait_connected().await;
        let a = procs.client(0).await;
        let mut last = None;
        for i in 0..N {
            last = Some(a.put(key(i), value(i)).await.expect("put at a"));
        }
        let last = last.unwrap();
        // b acked everything and a dropped its copy: nobody will resend these updates to b.
        eventually(ms(10_000), "b acked every update of a", async || {
            let s = a.status().await.unwrap();
            s.retained == 0 && s.peers[0].lag_updates == 0
        })
        .await;
        procs.kill(1);
        procs.start(1);
        procs.wait_listening(1, ms(10_000)).await;
        let b = procs.client(1).await;
        let s = b.status().await.unwrap();
        assert!(
            s.applied[0] >= last.ts,
            "b restarted with applied {:?}, below a's last write {last}",
            s.applied
        );
        let keys: Vec<String> = (0..N).map(key).collect();
        let got = read_all(&procs, 1, &keys).await;
        for (i, k) in keys.iter().enumerate() {
            assert_eq!(got[k].as_deref(), Some(value(i).as_str()), "{k} lost at b");
        }
    })
    .await;
}
