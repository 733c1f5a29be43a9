//! Load generation for the benchmark scripts (`causalkv bench ...`).
//!
//! [`run_load`] drives one [`Client`] (one QUIC connection, requests pipelined as streams) with a
//! number of concurrent workers in closed loop, or at a target rate in open loop, and records
//! per-operation latency in HDR histograms. Latency in open loop is measured from each
//! operation's *scheduled* start, so a stalled server cannot hide queueing delay (no
//! coordinated omission).
//!
//! [`replication_throughput`] measures how fast one site's backlog streams to a peer: it fills
//! a site's log while the peer is down, restarts the peer and times the catch-up.

use std::sync::Arc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use rand::{Rng, SeedableRng};
use serde::Serialize;

use crate::client::{Client, ClientError};

/// Key choice.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub enum KeyDist {
    /// Every key equally likely.
    Uniform,
    /// Zipfian with this exponent (popular keys hot).
    Zipf(f64),
}

/// Which consistency level a load's operations use.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub enum Level {
    /// Causal `get` / `put` (the default).
    #[default]
    Causal,
    /// Strong (linearizable) `get_strong` / `put_strong`.
    Strong,
    /// Compare-and-set only: each worker owns one key (`cas-<seed>-<worker>`), writes it once,
    /// then swaps it from the value it wrote last to the next (every swap should succeed;
    /// a failed one counts as an error). Latencies are reported as `put`.
    Cas,
}

/// What load to apply.
#[derive(Clone, Debug)]
pub struct LoadOptions {
    /// Consistency level of the operations.
    pub level: Level,
    /// Concurrent requests in flight (closed loop), or workers (open loop).
    pub concurrency: usize,
    /// How long to run.
    pub duration: Duration,
    /// Fraction of operations that are reads.
    pub read_ratio: f64,
    /// Value size in bytes.
    pub value_size: usize,
    /// Number of distinct keys.
    pub keys: u64,
    /// Key distribution.
    pub dist: KeyDist,
    /// Open loop at this many operations per second (`None`: closed loop).
    pub rate: Option<f64>,
    /// Synchronous replication for puts.
    pub sync: u8,
    /// RNG seed.
    pub seed: u64,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            level: Level::Causal,
            concurrency: 1,
            duration: Duration::from_secs(5),
            read_ratio: 0.5,
            value_size: 100,
            keys: 10_000,
            dist: KeyDist::Uniform,
            rate: None,
            sync: 0,
            seed: 1,
        }
    }
}

/// Latency summary of one operation kind, in microseconds.
#[derive(Clone, Debug, Default, Serialize)]
pub struct LatencyStats {
    /// Operations recorded.
    pub count: u64,
    /// Median.
    pub p50_us: u64,
    /// 99th percentile.
    pub p99_us: u64,
    /// 99.9th percentile.
    pub p999_us: u64,
    /// Maximum.
    pub max_us: u64,
    /// Mean.
    pub mean_us: f64,
}

impl LatencyStats {
    fn from(h: &Histogram<u64>) -> Self {
        if h.is_empty() {
            return Self::default();
        }
        Self {
            count: h.len(),
            p50_us: h.value_at_quantile(0.5),
            p99_us: h.value_at_quantile(0.99),
            p999_us: h.value_at_quantile(0.999),
            max_us: h.max(),
            mean_us: h.mean(),
        }
    }
}

/// What a load run measured.
#[derive(Clone, Debug, Serialize)]
pub struct LoadReport {
    /// Operations completed.
    pub ops: u64,
    /// Operations that failed.
    pub errors: u64,
    /// Wall time.
    pub seconds: f64,
    /// Completed operations per second.
    pub throughput: f64,
    /// Puts.
    pub put: LatencyStats,
    /// Gets.
    pub get: LatencyStats,
    /// Throughput per second of the run, for plots.
    pub per_second: Vec<u64>,
    /// The first error seen, if any.
    pub first_error: Option<String>,
    /// Put latency distribution as `(quantile, µs)` points, for CDF plots.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub put_cdf: Vec<(f64, u64)>,
    /// Get latency distribution as `(quantile, µs)` points, for CDF plots.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub get_cdf: Vec<(f64, u64)>,
}

/// `(quantile, value)` points of a histogram: every percent, then finer in the tail.
pub fn cdf_points(h: &Histogram<u64>) -> Vec<(f64, u64)> {
    if h.is_empty() {
        return Vec::new();
    }
    let mut qs: Vec<f64> = (0..100).map(|i| i as f64 / 100.0).collect();
    qs.extend((0..10).map(|i| 0.99 + i as f64 / 1000.0));
    qs.extend([0.9995, 0.9999, 1.0]);
    qs.into_iter()
        .map(|q| (q, h.value_at_quantile(q)))
        .collect()
}

fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("histogram bounds")
}

/// Zipfian sampler over `0..n` (rejection-free inverse CDF over a precomputed table).
struct Zipf {
    cdf: Vec<f64>,
}

impl Zipf {
    fn new(n: u64, s: f64) -> Self {
        let n = n.min(1_000_000) as usize;
        let mut cdf = Vec::with_capacity(n);
        let mut acc = 0.0;
        for k in 1..=n {
            acc += 1.0 / (k as f64).powf(s);
            cdf.push(acc);
        }
        for c in &mut cdf {
            *c /= acc;
        }
        Self { cdf }
    }

    fn sample(&self, r: f64) -> u64 {
        self.cdf.partition_point(|&c| c < r) as u64
    }
}

struct Worker {
    put: Histogram<u64>,
    get: Histogram<u64>,
    errors: u64,
    first_error: Option<String>,
    done_at: Vec<u64>,
}

/// Open-loop pacing: a thread that sleeps with a fine timer (tokio's ticks are about 1 ms, which
/// would add up to a millisecond to every open-loop latency) and sends each send time, every
/// `interval` from `start` until `end`, to the workers in turn.
fn pace(
    start: Instant,
    end: Instant,
    interval: Duration,
    workers: usize,
) -> Vec<tokio::sync::mpsc::UnboundedReceiver<Instant>> {
    let (txs, rxs): (Vec<_>, Vec<_>) = (0..workers)
        .map(|_| tokio::sync::mpsc::unbounded_channel())
        .unzip();
    std::thread::spawn(move || {
        crate::tools::wan::precise_timers();
        let mut next = start;
        for w in (0..workers).cycle() {
            next += interval;
            if next > end {
                return;
            }
            let now = Instant::now();
            if next > now {
                std::thread::sleep(next - now);
            }
            if txs[w].send(next).is_err() {
                return;
            }
        }
    });
    rxs
}

/// One step of a [`Level::Cas`] worker: the first writes its key, every later one swaps the
/// value it wrote last for the next.
async fn cas_step(
    client: &Client,
    last: &mut Option<u64>,
    seed: u64,
    worker: usize,
) -> Result<(), ClientError> {
    let key = format!("cas-{seed}-{worker}");
    let Some(n) = *last else {
        client.put_strong(&key, "0").await?;
        *last = Some(0);
        return Ok(());
    };
    let (old, new) = (n.to_string(), (n + 1).to_string());
    match client
        .cas(&key, Some(old.as_bytes()), Some(new.as_bytes()))
        .await?
    {
        crate::client::CasOutcome::Swapped => {
            *last = Some(n + 1);
            Ok(())
        }
        crate::client::CasOutcome::Failed { current } => {
            // Resynchronise with what the key holds, and report the surprise.
            *last = None;
            Err(ClientError::Server {
                code: 0,
                message: format!("cas on {key} expected {old}, found {current:?}"),
            })
        }
    }
}

/// Runs the load against `client` and reports.
pub async fn run_load(client: Arc<Client>, opts: &LoadOptions) -> LoadReport {
    let start = Instant::now();
    let end = start + opts.duration;
    let zipf = match opts.dist {
        KeyDist::Zipf(s) => Some(Arc::new(Zipf::new(opts.keys, s))),
        KeyDist::Uniform => None,
    };
    let value = Arc::new(vec![b'x'; opts.value_size]);
    let workers = opts.concurrency.max(1);
    // Open loop: a pacing thread hands each worker its scheduled send times.
    let mut schedules = match opts.rate {
        Some(rate) => pace(start, end, Duration::from_secs_f64(1.0 / rate), workers),
        None => Vec::new(),
    };
    let mut tasks = Vec::new();
    for w in 0..workers {
        let client = client.clone();
        let opts = opts.clone();
        let zipf = zipf.clone();
        let value = value.clone();
        let mut schedule = schedules.pop();
        tasks.push(tokio::spawn(async move {
            let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(opts.seed * 1000 + w as u64);
            let mut me = Worker {
                put: histogram(),
                get: histogram(),
                errors: 0,
                first_error: None,
                done_at: vec![0; opts.duration.as_secs() as usize + 2],
            };
            // Compare-and-set: the value this worker's key holds (`None`: not written yet).
            let mut cas: Option<u64> = None;
            loop {
                let scheduled = match &mut schedule {
                    // Open loop: latency counts from the scheduled send time, so a send that
                    // waits for this worker's previous request is charged for the wait.
                    Some(rx) => match rx.recv().await {
                        Some(at) => at,
                        None => break,
                    },
                    None => {
                        let now = Instant::now();
                        if now >= end {
                            break;
                        }
                        now
                    }
                };
                let k = match &zipf {
                    Some(z) => z.sample(rng.r#gen::<f64>()),
                    None => rng.gen_range(0..opts.keys),
                };
                let key = format!("key{k:08}");
                let read = opts.level != Level::Cas && rng.r#gen::<f64>() < opts.read_ratio;
                let result: Result<(), ClientError> = match (opts.level, read) {
                    (Level::Causal, true) => client.get(&key).await.map(|_| ()),
                    (Level::Causal, false) => client
                        .put_sync(&key, &value[..], opts.sync)
                        .await
                        .map(|_| ()),
                    (Level::Strong, true) => client.get_strong(&key).await.map(|_| ()),
                    (Level::Strong, false) => client.put_strong(&key, &value[..]).await,
                    (Level::Cas, _) => cas_step(&client, &mut cas, opts.seed, w).await,
                };
                let us = scheduled.elapsed().as_micros().max(1) as u64;
                match result {
                    Ok(()) => {
                        let h = if read { &mut me.get } else { &mut me.put };
                        let _ = h.record(us);
                        let sec = start.elapsed().as_secs() as usize;
                        if let Some(c) = me.done_at.get_mut(sec) {
                            *c += 1;
                        }
                    }
                    Err(e) => {
                        me.errors += 1;
                        me.first_error.get_or_insert_with(|| e.to_string());
                    }
                }
            }
            me
        }));
    }
    let mut put = histogram();
    let mut get = histogram();
    let mut errors = 0;
    let mut first_error = None;
    let mut per_second = vec![0u64; opts.duration.as_secs() as usize + 2];
    for t in tasks {
        let w = t.await.expect("load worker panicked");
        put.add(&w.put).expect("same bounds");
        get.add(&w.get).expect("same bounds");
        errors += w.errors;
        if first_error.is_none() {
            first_error = w.first_error;
        }
        for (a, b) in per_second.iter_mut().zip(&w.done_at) {
            *a += b;
        }
    }
    let seconds = start.elapsed().as_secs_f64();
    let ops = put.len() + get.len();
    per_second.truncate(opts.duration.as_secs() as usize);
    LoadReport {
        ops,
        errors,
        seconds,
        throughput: ops as f64 / seconds,
        put: LatencyStats::from(&put),
        get: LatencyStats::from(&get),
        per_second,
        first_error,
        put_cdf: cdf_points(&put),
        get_cdf: cdf_points(&get),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zipf_prefers_small_ranks() {
        let z = Zipf::new(1000, 1.0);
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
        let hits = (0..10_000)
            .filter(|_| z.sample(rng.r#gen::<f64>()) < 10)
            .count();
        assert!(hits > 3_000, "top 10 of 1000 keys get {hits} of 10000");
        assert!((0..1000).all(|_| z.sample(rng.r#gen::<f64>()) < 1000));
    }
}

/// Starts `sites` sites in this process on free loopback ports, laid out in `dir`.
async fn local_cluster(
    dir: &std::path::Path,
    sites: usize,
) -> Result<crate::tools::dev::LocalCluster, String> {
    crate::tools::dev::LocalCluster::start(&crate::tools::dev::DevOptions::new(sites, dir, 0))
        .await
        .map_err(|e| e.to_string())
}

/// What [`replication_throughput`] measured.
#[derive(Clone, Debug, Serialize)]
pub struct ReplicationReport {
    /// Updates streamed.
    pub updates: u64,
    /// Value size in bytes.
    pub value_size: usize,
    /// Catch-up time, from the restart of the receiver until it applied everything.
    pub seconds: f64,
    /// Updates per second.
    pub updates_per_s: f64,
    /// Payload (key + value) megabytes per second.
    pub mb_per_s: f64,
    /// Frame bytes on the wire per update.
    pub wire_bytes_per_update: f64,
}

impl ReplicationReport {
    /// The rates for `updates` updates of `value_size`-byte values (15-byte keys) streamed in
    /// `seconds`.
    fn new(updates: u64, value_size: usize, seconds: f64, wire_bytes_per_update: f64) -> Self {
        let payload = updates as f64 * (value_size as f64 + 15.0);
        Self {
            updates,
            value_size,
            seconds,
            updates_per_s: updates as f64 / seconds,
            mb_per_s: payload / seconds / 1e6,
            wire_bytes_per_update,
        }
    }
}

/// Lays out `sites` sites in `dir` and returns the layout with site a's configuration set for
/// loading data fast: no fsync, and snapshots only when asked (TOML integers are i64).
fn unsynced_layout(
    dir: &std::path::Path,
    sites: usize,
) -> Result<(crate::tools::dev::DevCluster, crate::SiteConfig), String> {
    use crate::tools::dev::{DevOptions, prepare};
    let layout = prepare(&DevOptions::new(sites, dir, 0)).map_err(|e| e.to_string())?;
    let mut cfg = layout.configs[0].clone();
    cfg.storage.fsync = crate::storage::wal::FsyncPolicy::Never;
    cfg.storage.snapshot_log_bytes = i64::MAX as u64;
    Ok((layout, cfg))
}

/// Writes `updates` values of `value_size` bytes through `node`, cycling over `keys` keys
/// (`key000000000000`, ...); returns the last version.
fn fill(
    node: &crate::Node,
    updates: u64,
    keys: u64,
    value_size: usize,
) -> Result<crate::clock::Version, String> {
    let value = bytes::Bytes::from(vec![b'v'; value_size]);
    let mut last = None;
    for i in 0..updates {
        let key = bytes::Bytes::from(format!("key{:012}", i % keys.max(1)));
        last = Some(node.put_local(key, Some(value.clone())));
    }
    last.ok_or_else(|| "no updates".to_string())
}

/// Fills site a's log with `updates` writes while site b is down, restarts b and times the
/// catch-up over real QUIC on loopback.
pub async fn replication_throughput(
    dir: &std::path::Path,
    updates: u64,
    value_size: usize,
    keys: u64,
) -> Result<ReplicationReport, String> {
    let mut cluster = local_cluster(dir, 2).await?;
    cluster.stop(1).await;
    let a = cluster.node(0).expect("site a runs");
    let last = fill(a, updates, keys, value_size)?;
    let bytes_before = crate::net::Metrics::get(&a.metrics().bytes_out);
    let t0 = Instant::now();
    cluster.restart(1).await.map_err(|e| e.to_string())?;
    let b = cluster.node(1).expect("site b runs");
    if !b.wait_visible(last, Duration::from_secs(300)).await {
        return Err("site b did not catch up within 300 s".into());
    }
    let seconds = t0.elapsed().as_secs_f64();
    let a = cluster.node(0).expect("site a runs");
    let wire = crate::net::Metrics::get(&a.metrics().bytes_out) - bytes_before;
    cluster.shutdown().await;
    Ok(ReplicationReport::new(
        updates,
        value_size,
        seconds,
        wire as f64 / updates as f64,
    ))
}

/// Remote visibility latency on loopback: the time from a write's commit at site a (the moment
/// a would acknowledge it) until it is applied at site b, for `writes` writes one at a time.
pub async fn visibility_latency(
    dir: &std::path::Path,
    writes: u64,
    value_size: usize,
) -> Result<LatencyStats, String> {
    let cluster = local_cluster(dir, 3).await?;
    let a = cluster.node(0).expect("site a runs");
    let b = cluster.node(1).expect("site b runs");
    // Let the links come up before measuring.
    let first = a.put_local(
        bytes::Bytes::from_static(b"warmup"),
        Some(bytes::Bytes::new()),
    );
    if !b.wait_visible(first, Duration::from_secs(10)).await {
        return Err("sites did not connect within 10 s".into());
    }
    let value = bytes::Bytes::from(vec![b'v'; value_size]);
    let mut h = histogram();
    for i in 0..writes {
        let v = a.put_local(bytes::Bytes::from(format!("vis{i}")), Some(value.clone()));
        let committed = Instant::now();
        if !b.wait_visible(v, Duration::from_secs(10)).await {
            return Err(format!("write {v} not visible at b within 10 s"));
        }
        let _ = h.record(committed.elapsed().as_micros().max(1) as u64);
    }
    cluster.shutdown().await;
    Ok(LatencyStats::from(&h))
}

/// [`replication_throughput`] with the two sites as separate `causalkv serve` processes (`bin`),
/// each with its own runtime and core: site a's log is filled in this process first (site b
/// down), then a is started and, once it listens, b; the sample is the time from starting b
/// until b's status reports a's last write applied (polled every 2 ms over the client
/// protocol; b's process start and handshakes are included).
pub async fn replication_throughput_processes(
    dir: &std::path::Path,
    bin: &std::path::Path,
    updates: u64,
    value_size: usize,
    keys: u64,
) -> Result<ReplicationReport, String> {
    let (layout, a_cfg) = unsynced_layout(dir, 2)?; // the sender's log is not measured
    let a_file = dir.join("site-a.toml");
    std::fs::write(
        &a_file,
        toml::to_string_pretty(&a_cfg).map_err(|e| e.to_string())?,
    )
    .map_err(|e| e.to_string())?;
    let last = {
        let node = crate::Node::start(a_cfg.clone())
            .await
            .map_err(|e| e.to_string())?;
        let last = fill(&node, updates, keys, value_size);
        node.shutdown().await;
        last?
    };
    struct Kill(Vec<std::process::Child>);
    impl Drop for Kill {
        fn drop(&mut self) {
            for c in &mut self.0 {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }
    let serve = |file: &std::path::Path| {
        std::process::Command::new(bin)
            .arg("serve")
            .arg("--config")
            .arg(file)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .map_err(|e| format!("start {}: {e}", bin.display()))
    };
    let mut children = Kill(vec![serve(&a_file)?]);
    let id = crate::tools::certs::client_paths(&layout.certs, crate::tools::dev::CLI_CLIENT);
    let connect = |addr: std::net::SocketAddr, timeout: Duration| {
        crate::Client::builder()
            .sites([addr.to_string()])
            .identity(id.cert.clone(), id.key.clone())
            .ca(crate::tools::certs::ca_paths(&layout.certs).cert)
            .timeout(timeout)
            .connect()
    };
    // Polls `addr` until a client connects: the process is up and serving. Each probe gives up
    // after `poll`: a handshake sent before the process listens is only retransmitted on
    // QUIC's probe timer (~1 s), which would add that second to the measurement.
    let serving =
        |addr: std::net::SocketAddr, name: &'static str, since: Instant, poll: Duration| {
            let connect = &connect;
            async move {
                loop {
                    let probe = connect(addr, poll.max(Duration::from_millis(50))).await;
                    let serving = match probe {
                        Ok(_) => connect(addr, Duration::from_secs(2)).await,
                        Err(e) => Err(e),
                    };
                    match serving {
                        Ok(c) => return Ok(c),
                        Err(_) if since.elapsed() < Duration::from_secs(60) => {
                            tokio::time::sleep(poll).await
                        }
                        Err(e) => return Err(format!("site {name} does not serve: {e}")),
                    }
                }
            }
        };
    let a = serving(
        layout.configs[0].listen_addr(),
        "a",
        Instant::now(),
        Duration::from_millis(20),
    )
    .await?;
    a.status().await.map_err(|e| e.to_string())?;
    let t0 = Instant::now();
    children.0.push(serve(&dir.join("site-b.toml"))?);
    let b = serving(
        layout.configs[1].listen_addr(),
        "b",
        t0,
        Duration::from_millis(2),
    )
    .await?;
    loop {
        let st = b.status().await.map_err(|e| e.to_string())?;
        if st.applied.get(last.site as usize).copied().unwrap_or(0) >= last.ts {
            break;
        }
        if t0.elapsed() > Duration::from_secs(300) {
            return Err("site b did not catch up within 300 s".into());
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let seconds = t0.elapsed().as_secs_f64();
    Ok(ReplicationReport::new(updates, value_size, seconds, 0.0))
}

/// What [`recovery`] measured.
#[derive(Clone, Debug, Serialize)]
pub struct RecoveryReport {
    /// Keys in the snapshot.
    pub snapshot_keys: u64,
    /// Records in the log tail after the snapshot.
    pub tail_records: u64,
    /// Log bytes on disk before the snapshot.
    pub log_bytes_before_snapshot: u64,
    /// Log bytes on disk after the snapshot pruned the log (the tail included).
    pub log_bytes_after_pruning: u64,
    /// Snapshot file size.
    pub snapshot_bytes: u64,
    /// Time for `Node::start` to recover and serve.
    pub recovery_seconds: f64,
}

/// Writes `keys` keys through a one-site node, snapshots, writes a `tail` of further records,
/// stops the node and times its restart (snapshot load + log replay).
pub async fn recovery(
    dir: &std::path::Path,
    keys: u64,
    tail: u64,
    value_size: usize,
) -> Result<RecoveryReport, String> {
    let (_layout, cfg) = unsynced_layout(dir, 1)?;
    let node = crate::Node::start(cfg.clone())
        .await
        .map_err(|e| e.to_string())?;
    fill(&node, keys, keys, value_size)?;
    let before = node.wal_stats().1;
    let path = node.snapshot().await.map_err(|e| e.to_string())?;
    let snapshot_bytes = std::fs::metadata(&path).map_err(|e| e.to_string())?.len();
    if tail > 0 {
        fill(&node, tail, keys, value_size)?;
    }
    let after = node.wal_stats().1;
    node.shutdown().await;
    let t0 = Instant::now();
    let node = crate::Node::start(cfg).await.map_err(|e| e.to_string())?;
    let recovery_seconds = t0.elapsed().as_secs_f64();
    let n = node.status().keys;
    node.shutdown().await;
    if n != keys {
        return Err(format!("recovered {n} keys, expected {keys}"));
    }
    Ok(RecoveryReport {
        snapshot_keys: keys,
        tail_records: tail,
        log_bytes_before_snapshot: before,
        log_bytes_after_pruning: after,
        snapshot_bytes,
        recovery_seconds,
    })
}

/// What [`visibility_wan`] measured at one remote site.
#[derive(Clone, Debug, Serialize)]
pub struct SiteVisibility {
    /// The remote site's address.
    pub site: String,
    /// Ack → visible latency.
    pub latency: LatencyStats,
    /// Distribution as `(quantile, µs)` points.
    pub cdf: Vec<(f64, u64)>,
    /// Writes not visible within the timeout.
    pub timeouts: u64,
    /// The slowest writes, slowest first (at most [`SLOWEST_KEPT`]): when each was acknowledged
    /// and how long it took, to match a tail against the sites' logs.
    pub slowest: Vec<SlowWrite>,
}

/// How many of the slowest writes [`SiteVisibility::slowest`] keeps.
pub const SLOWEST_KEPT: usize = 10;

/// One write of [`visibility_wan`] and how long a remote site took to show it.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct SlowWrite {
    /// The write's number (0 for the first).
    pub write: u64,
    /// When the origin acknowledged it, in milliseconds since the Unix epoch.
    pub acked_unix_ms: u64,
    /// Acknowledgement → visible at this site, µs.
    pub us: u64,
}

/// What [`visibility_wan`] measured.
#[derive(Clone, Debug, Serialize)]
pub struct VisibilityReport {
    /// Writes made at the origin.
    pub writes: u64,
    /// Pause between two polls of a remote site, in microseconds (the measurement's
    /// resolution, plus one local read); 0 when each read waited for the write
    /// ([`VisibilityProbe::Wait`]).
    pub poll_interval_us: u64,
    /// Per remote site.
    pub sites: Vec<SiteVisibility>,
}

/// How [`visibility_wan`] learns that a remote site shows a write.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VisibilityProbe {
    /// A get of the key in a fresh session (so it never waits on a causal context) every
    /// interval, paced by a thread with a fine timer, until the value is there. The sample
    /// overstates the true figure by up to one interval plus one local read, and the polls are a
    /// load of their own (dozens of reads per write on a long link).
    Poll(Duration),
    /// One get per write and remote site, in a session that adopted the origin's token right
    /// after the write: the site answers as soon as it covers the write (its own causal wait,
    /// woken by the apply), so the sample overstates the true figure by one local round trip.
    /// Each read in flight uses a client of its own from the site's pool (a session's context
    /// only grows, so sharing one would make a read wait for later writes).
    Wait,
}

/// Remote visibility latency between separate processes over a (possibly emulated) WAN.
///
/// Method: every `interval`, a write of a fresh key goes to the origin through `origin`; when
/// its acknowledgement arrives at the client (the "ack" instant), a task per remote site asks
/// that site, through clients that never write, whether it shows the write, as `probe` says,
/// until it does. The sample is the time from the ack to that answer. `remotes` names each
/// remote site and its clients: one is enough to poll; [`VisibilityProbe::Wait`] uses one per
/// read in flight (a read waits for a free one, and the wait counts in its sample).
pub async fn visibility_wan(
    origin: Arc<Client>,
    remotes: Vec<(String, Vec<Arc<Client>>)>,
    writes: u64,
    interval: Duration,
    probe: VisibilityProbe,
    value_size: usize,
) -> Result<VisibilityReport, String> {
    let value = vec![b'v'; value_size];
    let run = std::process::id();
    /// A remote site as the probe sees it.
    struct Remote {
        name: String,
        /// The client the polls share.
        first: Arc<Client>,
        /// Its clients free for a waiting read, and as many permits.
        free: std::sync::Mutex<Vec<Arc<Client>>>,
        permits: tokio::sync::Semaphore,
        /// The latency histogram, the count of timeouts and every write's time.
        seen: std::sync::Mutex<(Histogram<u64>, u64, Vec<SlowWrite>)>,
    }
    let mut sites = Vec::new();
    for (name, clients) in remotes {
        let Some(first) = clients.first().cloned() else {
            return Err(format!("no client for remote site {name}"));
        };
        sites.push(Arc::new(Remote {
            name,
            first,
            permits: tokio::sync::Semaphore::new(clients.len()),
            free: std::sync::Mutex::new(clients),
            seen: std::sync::Mutex::new((histogram(), 0, Vec::new())),
        }));
    }
    let mut tasks = tokio::task::JoinSet::new();
    // Poll ticks from a thread with a fine timer: tokio's ~1 ms timer would make every poll
    // interval at least a millisecond, which is the resolution of this measurement.
    let (tick_tx, ticks) = tokio::sync::watch::channel(0u64);
    let ticking = Arc::new(std::sync::atomic::AtomicBool::new(true));
    if let VisibilityProbe::Poll(poll) = probe {
        let ticking = ticking.clone();
        std::thread::spawn(move || {
            crate::tools::wan::precise_timers();
            let mut n = 0;
            while ticking.load(std::sync::atomic::Ordering::Relaxed) {
                std::thread::sleep(poll);
                n += 1;
                if tick_tx.send(n).is_err() {
                    return;
                }
            }
        });
    }
    let mut next = Instant::now();
    for w in 0..writes {
        next += interval;
        tokio::time::sleep_until(next.into()).await;
        let key = format!("vis-{run}-{w}");
        origin
            .put(&key, &value)
            .await
            .map_err(|e| format!("put at the origin: {e}"))?;
        let acked = Instant::now();
        let acked_unix_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        // The origin's session right after this write: it covers the write and what it saw.
        let token = origin.session_token();
        for site in &sites {
            let (site, key, token) = (site.clone(), key.clone(), token.clone());
            let mut ticks = ticks.clone();
            tasks.spawn(async move {
                let deadline = acked + Duration::from_secs(30);
                // Polls share the site's first client (each poll is a fresh session); a
                // waiting read takes a client of its own.
                let (_permit, c) = match probe {
                    VisibilityProbe::Poll(_) => (None, site.first.clone()),
                    VisibilityProbe::Wait => {
                        let permit = site.permits.acquire().await.map_err(|e| e.to_string())?;
                        let c = site.free.lock().expect("pool").pop();
                        (Some(permit), c.expect("a free client per permit"))
                    }
                };
                let seen = loop {
                    c.new_session();
                    if probe == VisibilityProbe::Wait {
                        c.set_session_token(&token).map_err(|e| e.to_string())?;
                    }
                    match c.get(&key).await {
                        Ok(Some(_)) => break true,
                        Ok(None) if probe == VisibilityProbe::Wait => {
                            return Err(format!(
                                "site {} answered a read carrying write {w}'s session \
                                 token without the write",
                                site.name
                            ));
                        }
                        // Not there yet, or the site's wait for the context ran out.
                        Ok(None) | Err(_) => {}
                    }
                    if Instant::now() > deadline {
                        break false;
                    }
                    if let VisibilityProbe::Poll(_) = probe {
                        ticks.borrow_and_update();
                        if ticks.changed().await.is_err() {
                            break false;
                        }
                    }
                };
                if probe == VisibilityProbe::Wait {
                    site.free.lock().expect("pool").push(c);
                }
                let mut h = site.seen.lock().expect("histogram");
                if !seen {
                    h.1 += 1;
                    return Ok(());
                }
                let us = acked.elapsed().as_micros().max(1) as u64;
                let _ = h.0.record(us);
                h.2.push(SlowWrite {
                    write: w,
                    acked_unix_ms,
                    us,
                });
                Ok::<(), String>(())
            });
        }
    }
    let mut failed = None;
    while let Some(r) = tasks.join_next().await {
        if let Err(e) = r.map_err(|e| e.to_string()).and_then(|r| r) {
            failed.get_or_insert(e);
        }
    }
    ticking.store(false, std::sync::atomic::Ordering::Relaxed);
    if let Some(e) = failed {
        return Err(e);
    }
    let sites = sites
        .iter()
        .map(|site| {
            let mut h = site.seen.lock().expect("histogram");
            h.2.sort_by_key(|s| std::cmp::Reverse(s.us));
            h.2.truncate(SLOWEST_KEPT);
            SiteVisibility {
                site: site.name.clone(),
                latency: LatencyStats::from(&h.0),
                cdf: cdf_points(&h.0),
                timeouts: h.1,
                slowest: std::mem::take(&mut h.2),
            }
        })
        .collect();
    Ok(VisibilityReport {
        writes,
        poll_interval_us: match probe {
            VisibilityProbe::Poll(poll) => poll.as_micros() as u64,
            VisibilityProbe::Wait => 0,
        },
        sites,
    })
}

/// One sample of [`sample_status`].
#[derive(Clone, Debug, Serialize)]
pub struct StatusSample {
    /// Seconds since the start of sampling.
    pub t: f64,
    /// Site address.
    pub site: String,
    /// Updates held in the dependency buffer.
    pub buffered: u64,
    /// Updates retained in the log for peers.
    pub retained: u64,
    /// Keys stored.
    pub keys: u64,
}

/// Samples each site's status (dependency-buffer occupancy, retention) every `interval` for
/// `duration`, one client per site.
pub async fn sample_status(
    sites: Vec<(String, Arc<Client>)>,
    interval: Duration,
    duration: Duration,
) -> Vec<StatusSample> {
    let start = Instant::now();
    let mut out = Vec::new();
    let mut next = start;
    while start.elapsed() < duration {
        for (name, c) in &sites {
            if let Ok(s) = c.status().await {
                out.push(StatusSample {
                    t: start.elapsed().as_secs_f64(),
                    site: name.clone(),
                    buffered: s.buffered,
                    retained: s.retained,
                    keys: s.keys,
                });
            }
        }
        next += interval;
        tokio::time::sleep_until(next.into()).await;
    }
    out
}

/// What [`transport_floor`] measured: bare QUIC between two endpoints with the product's TLS
/// setup and framing, each on its own thread and `current_thread` runtime (like two
/// processes), with no store, log or replica behind them.
#[derive(Clone, Debug, Serialize)]
pub struct FloorReport {
    /// Messages sent one way on one unidirectional stream.
    pub messages: u64,
    /// Bytes per message.
    pub message_size: usize,
    /// Messages per frame.
    pub batch: usize,
    /// One-way messages per second (until the receiver has read the last frame).
    pub messages_per_s: f64,
    /// One-way megabytes per second.
    pub mb_per_s: f64,
    /// Request/response round trips of `message_size` bytes on one long-lived bidirectional
    /// stream.
    pub ping_one_stream: LatencyStats,
    /// Request/response round trips with a new bidirectional stream per request.
    pub ping_stream_per_request: LatencyStats,
}

/// The current-thread runtime each end of the transport floor runs on.
fn floor_runtime() -> Result<tokio::runtime::Runtime, String> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())
}

/// A QUIC endpoint on a fresh loopback port (a server when `server` is given), its socket
/// bound as a site's is.
fn floor_endpoint(server: Option<quinn::ServerConfig>) -> Result<quinn::Endpoint, String> {
    let socket = crate::net::socket::bind_udp("127.0.0.1:0".parse().expect("loopback address"))
        .map_err(|e| e.to_string())?;
    let config = crate::tls::TransportLimits::default()
        .endpoint_config()
        .map_err(|e| e.to_string())?;
    quinn::Endpoint::new(config, server, socket, Arc::new(quinn::TokioRuntime))
        .map_err(|e| e.to_string())
}

const FLOOR_MAX_FRAME: usize = 64 << 20;

/// The serving end of [`transport_floor`], as site b of the certificates in `certs`: tells
/// `on_addr` where it listens, then serves one connection until the client closes it (echoes
/// every bidirectional stream's frames, reads the unidirectional stream to its end and
/// answers "done"). Runs its own runtime on the calling thread.
pub fn floor_server(
    certs: &std::path::Path,
    on_addr: impl FnOnce(std::net::SocketAddr),
) -> Result<(), String> {
    use crate::tls::{self, Identity, TlsFiles, TransportLimits};
    use crate::wire::{read_frame, write_frame};
    tls::install_crypto_provider();
    let b = Identity::load(&TlsFiles::site(certs, "b")).map_err(|e| e.to_string())?;
    let server =
        tls::server_config(&b, &TransportLimits::default(), true).map_err(|e| e.to_string())?;
    floor_runtime()?.block_on(async move {
        let endpoint = floor_endpoint(Some(server))?;
        on_addr(endpoint.local_addr().map_err(|e| e.to_string())?);
        let conn = endpoint
            .accept()
            .await
            .ok_or("no connection")?
            .await
            .map_err(|e| e.to_string())?;
        let echo = conn.clone();
        tokio::spawn(async move {
            while let Ok((mut send, mut recv)) = echo.accept_bi().await {
                tokio::spawn(async move {
                    while let Ok(Some(f)) = read_frame(&mut recv, FLOOR_MAX_FRAME).await {
                        if write_frame(&mut send, &f).await.is_err() {
                            break;
                        }
                    }
                    let _ = send.finish();
                });
            }
        });
        let mut uni = conn.accept_uni().await.map_err(|e| e.to_string())?;
        let mut ack = conn.open_uni().await.map_err(|e| e.to_string())?;
        while read_frame(&mut uni, FLOOR_MAX_FRAME)
            .await
            .map_err(|e| e.to_string())?
            .is_some()
        {}
        write_frame(&mut ack, b"done")
            .await
            .map_err(|e| e.to_string())?;
        let _ = ack.finish();
        conn.closed().await;
        Ok(())
    })
}

/// A `floor-server` child process, killed when dropped unless it was waited for.
struct FloorChild(Option<std::process::Child>);

impl Drop for FloorChild {
    fn drop(&mut self) {
        if let Some(c) = &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Starts `bin bench floor-server` as site b of `certs` with `count` serving ends (threads)
/// and returns it with the addresses they listen on.
fn spawn_floor_server(
    bin: &std::path::Path,
    certs: &std::path::Path,
    count: usize,
) -> Result<(FloorChild, Vec<std::net::SocketAddr>), String> {
    use std::io::BufRead;
    let mut c = std::process::Command::new(bin)
        .args([
            "bench",
            "floor-server",
            "--count",
            &count.to_string(),
            "--certs",
        ])
        .arg(certs)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .map_err(|e| format!("start {}: {e}", bin.display()))?;
    let stdout = c.stdout.take();
    let child = FloorChild(Some(c));
    let mut lines = std::io::BufReader::new(stdout.ok_or("no stdout")?).lines();
    let mut addrs = Vec::new();
    for _ in 0..count {
        let line = lines
            .next()
            .ok_or("the floor server exited before it listened")?
            .map_err(|e| e.to_string())?;
        addrs.push(
            line.trim()
                .parse::<std::net::SocketAddr>()
                .map_err(|e| format!("floor server said {line:?}: {e}"))?,
        );
    }
    Ok((child, addrs))
}

/// One request/response of the floor, on a new bidirectional stream as the client sends them.
async fn floor_request(conn: &quinn::Connection, msg: &[u8]) -> Result<(), String> {
    use crate::wire::{read_frame, write_frame};
    let (mut send, mut recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
    write_frame(&mut send, msg)
        .await
        .map_err(|e| e.to_string())?;
    send.finish().map_err(|e| e.to_string())?;
    read_frame(&mut recv, FLOOR_MAX_FRAME)
        .await
        .map_err(|e| e.to_string())?
        .ok_or("echo stream ended")?;
    Ok(())
}

/// The transport's floor on this machine: one-way batched throughput and request/response
/// latency of bare QUIC with mutual TLS (certificates from a fresh layout in `dir`). The
/// serving end runs on a thread of this process, or, given `server_bin`, as a separate
/// `server_bin bench floor-server` process (as a client and a site are).
pub fn transport_floor(
    dir: &std::path::Path,
    messages: u64,
    message_size: usize,
    batch: usize,
    pings: u64,
    server_bin: Option<&std::path::Path>,
) -> Result<FloorReport, String> {
    use crate::tls::{self, Identity, TlsFiles, TransportLimits};
    use crate::wire::{read_frame, write_frame};
    tls::install_crypto_provider();
    let layout = crate::tools::dev::prepare(&crate::tools::dev::DevOptions::new(2, dir, 0))
        .map_err(|e| e.to_string())?;
    let a = Identity::load(&TlsFiles::site(&layout.certs, "a")).map_err(|e| e.to_string())?;
    let client = tls::client_config(&a, &TransportLimits::default(), tls::ALPN_PEER)
        .map_err(|e| e.to_string())?;
    let max_frame = FLOOR_MAX_FRAME;
    let mut child = FloorChild(None);
    let (addr, server_thread) = match server_bin {
        Some(bin) => {
            let (c, addrs) = spawn_floor_server(bin, &layout.certs, 1)?;
            child = c;
            (addrs[0], None)
        }
        None => {
            let (addr_tx, addr_rx) = std::sync::mpsc::channel();
            let certs = layout.certs.clone();
            let t = std::thread::spawn(move || {
                floor_server(&certs, |a| {
                    let _ = addr_tx.send(a);
                })
            });
            let addr = addr_rx
                .recv_timeout(Duration::from_secs(10))
                .map_err(|e| format!("server did not start: {e}"))?;
            (addr, Some(t))
        }
    };
    let client_rt = floor_runtime()?;
    let client_thread = std::thread::spawn(move || {
        client_rt.block_on(async move {
            let mut endpoint = floor_endpoint(None)?;
            endpoint.set_default_client_config(client);
            let conn = endpoint
                .connect(addr, &tls::site_server_name("b"))
                .map_err(|e| e.to_string())?
                .await
                .map_err(|e| e.to_string())?;
            let msg = vec![b'v'; message_size];
            let mut pings_one = histogram();
            let (mut send, mut recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
            for _ in 0..pings {
                let t = Instant::now();
                write_frame(&mut send, &msg)
                    .await
                    .map_err(|e| e.to_string())?;
                read_frame(&mut recv, max_frame)
                    .await
                    .map_err(|e| e.to_string())?
                    .ok_or("echo stream ended")?;
                let _ = pings_one.record(t.elapsed().as_micros().max(1) as u64);
            }
            let mut pings_new = histogram();
            for _ in 0..pings {
                let t = Instant::now();
                floor_request(&conn, &msg).await?;
                let _ = pings_new.record(t.elapsed().as_micros().max(1) as u64);
            }
            let frame = vec![b'v'; message_size * batch.max(1)];
            let frames = messages.div_ceil(batch.max(1) as u64);
            let t0 = Instant::now();
            let mut uni = conn.open_uni().await.map_err(|e| e.to_string())?;
            let done = conn.accept_uni();
            for _ in 0..frames {
                write_frame(&mut uni, &frame)
                    .await
                    .map_err(|e| e.to_string())?;
            }
            uni.finish().map_err(|e| e.to_string())?;
            let mut done = done.await.map_err(|e| e.to_string())?;
            read_frame(&mut done, 16).await.map_err(|e| e.to_string())?;
            let seconds = t0.elapsed().as_secs_f64();
            conn.close(0u32.into(), b"done");
            endpoint.wait_idle().await;
            let sent = frames * batch.max(1) as u64;
            Ok::<_, String>(FloorReport {
                messages: sent,
                message_size,
                batch,
                messages_per_s: sent as f64 / seconds,
                mb_per_s: (sent as f64 * message_size as f64) / seconds / 1e6,
                ping_one_stream: LatencyStats::from(&pings_one),
                ping_stream_per_request: LatencyStats::from(&pings_new),
            })
        })
    });
    let report = client_thread
        .join()
        .map_err(|_| "client thread panicked".to_string())??;
    if let Some(t) = server_thread {
        t.join()
            .map_err(|_| "server thread panicked".to_string())??;
    }
    if let Some(mut c) = child.0.take() {
        let status = c.wait().map_err(|e| e.to_string())?;
        if !status.success() {
            return Err(format!("floor server exited with {status}"));
        }
    }
    Ok(report)
}

/// What [`partition_floor`] runs (also the `causalkv bench partition-floor` arguments).
#[derive(Clone, Copy, Debug, Serialize, clap::Args)]
pub struct PartitionFloorOptions {
    /// Serving ends to spread the requests over.
    #[arg(long, default_value_t = 1)]
    pub servers: usize,
    /// Requests per second offered.
    #[arg(long, default_value_t = 20_000.0)]
    pub rate: f64,
    /// Workers (requests in flight at most).
    #[arg(long, default_value_t = 64)]
    pub concurrency: usize,
    /// How long to run, in seconds.
    #[arg(long, default_value_t = 5)]
    pub seconds: u64,
    /// Bytes per request and per answer (176 is what one 100-byte update takes on the wire).
    #[arg(long, default_value_t = 176)]
    pub message_size: usize,
    /// Run the serving ends as threads of one process (each with its own runtime and
    /// endpoint) instead of a process each.
    #[arg(long)]
    pub threads: bool,
}

/// What [`partition_floor`] measured: the bare transport's CPU cost per request when the same
/// paced load is spread over `servers` serving processes, as a client spreads a site's requests
/// over its partition nodes.
#[derive(Clone, Debug, Serialize)]
pub struct PartitionFloorReport {
    /// Serving ends (each with its own runtime, endpoint and one connection from the client).
    pub servers: usize,
    /// Whether the serving ends were threads of one process (else one process each).
    pub threads: bool,
    /// Requests per second offered.
    pub rate: f64,
    /// Requests answered.
    pub requests: u64,
    /// Requests that failed.
    pub errors: u64,
    /// Wall time of the load, in seconds.
    pub seconds: f64,
    /// User and system CPU time of every serving process during the load, in seconds.
    pub server_cpu_seconds: f64,
    /// Requests per server CPU-second.
    pub requests_per_server_cpu_s: f64,
    /// Request/response latency, from each request's scheduled send time.
    pub latency: LatencyStats,
}

/// User plus system CPU time of process `pid` so far, in seconds (`/proc/PID/stat`).
fn process_cpu_seconds(pid: u32) -> Result<f64, String> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map_err(|e| format!("read /proc/{pid}/stat: {e}"))?;
    // The fields after the command name, which is in parentheses and may hold spaces: state
    // is field 3, so utime (field 14) and stime (field 15) are the 12th and 13th of these.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .ok_or("no command name in /proc stat")?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| -> Result<u64, String> {
        fields
            .get(i)
            .and_then(|f| f.parse().ok())
            .ok_or_else(|| format!("no CPU time in /proc/{pid}/stat"))
    };
    // SAFETY: sysconf only reads a configuration value.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    Ok((ticks(11)? + ticks(12)?) as f64 / hz)
}

/// The transport's floor for partitioning: `opts.rate` requests per second of
/// `opts.message_size` bytes for `opts.seconds`, each on a new bidirectional stream as the
/// client sends them, with `opts.concurrency` workers, spread uniformly at random over
/// `opts.servers` serving ends of `bin bench floor-server` (echo only, no store behind them;
/// separate processes, or with `opts.threads` the threads of one process), and the CPU time the
/// serving processes spent. Run with 1 and then 2 servers, the ratio of [`PartitionFloorReport::requests_per_server_cpu_s`]
/// is what a second partition process costs in the transport alone.
pub fn partition_floor(
    dir: &std::path::Path,
    bin: &std::path::Path,
    opts: &PartitionFloorOptions,
) -> Result<PartitionFloorReport, String> {
    use crate::tls::{self, Identity, TlsFiles, TransportLimits};
    tls::install_crypto_provider();
    let PartitionFloorOptions {
        servers,
        rate,
        concurrency,
        seconds,
        message_size,
        threads,
    } = *opts;
    if servers == 0 || rate.is_nan() || rate <= 0.0 {
        return Err("partition-floor needs at least one server and a positive rate".into());
    }
    let layout = crate::tools::dev::prepare(&crate::tools::dev::DevOptions::new(2, dir, 0))
        .map_err(|e| e.to_string())?;
    let a = Identity::load(&TlsFiles::site(&layout.certs, "a")).map_err(|e| e.to_string())?;
    let client = tls::client_config(&a, &TransportLimits::default(), tls::ALPN_PEER)
        .map_err(|e| e.to_string())?;
    let mut children = Vec::new();
    let mut addrs = Vec::new();
    let (processes, per_process) = if threads { (1, servers) } else { (servers, 1) };
    for _ in 0..processes {
        let (c, a) = spawn_floor_server(bin, &layout.certs, per_process)?;
        children.push(c);
        addrs.extend(a);
    }
    let pids: Vec<u32> = children
        .iter()
        .filter_map(|c| c.0.as_ref().map(|c| c.id()))
        .collect();
    let cpu = |pids: &[u32]| -> Result<f64, String> {
        pids.iter().map(|p| process_cpu_seconds(*p)).sum()
    };
    floor_runtime()?.block_on(async move {
        let mut endpoint = floor_endpoint(None)?;
        endpoint.set_default_client_config(client);
        let mut conns = Vec::new();
        for addr in &addrs {
            let conn = endpoint
                .connect(*addr, &tls::site_server_name("b"))
                .map_err(|e| e.to_string())?
                .await
                .map_err(|e| e.to_string())?;
            conns.push(conn);
        }
        let conns = Arc::new(conns);
        let msg = Arc::new(vec![b'v'; message_size]);
        // One request to each server first, so handshakes and first touches stay out of it.
        for conn in conns.iter() {
            floor_request(conn, &msg).await?;
        }
        let cpu0 = cpu(&pids)?;
        let start = Instant::now();
        let end = start + Duration::from_secs(seconds);
        let workers = concurrency.max(1);
        let schedules = pace(start, end, Duration::from_secs_f64(1.0 / rate), workers);
        let mut tasks = Vec::new();
        for (w, mut schedule) in schedules.into_iter().enumerate() {
            let conns = conns.clone();
            let msg = msg.clone();
            tasks.push(tokio::spawn(async move {
                let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(w as u64);
                let mut latency = histogram();
                let mut errors = 0u64;
                while let Some(at) = schedule.recv().await {
                    let conn = &conns[rng.gen_range(0..conns.len())];
                    match floor_request(conn, &msg).await {
                        Ok(()) => {
                            let _ = latency.record(at.elapsed().as_micros().max(1) as u64);
                        }
                        Err(_) => errors += 1,
                    }
                }
                (latency, errors)
            }));
        }
        let mut latency = histogram();
        let mut errors = 0;
        for t in tasks {
            let (h, e) = t.await.map_err(|_| "a floor worker panicked".to_string())?;
            latency.add(&h).expect("same bounds");
            errors += e;
        }
        let elapsed = start.elapsed().as_secs_f64();
        let server_cpu_seconds = cpu(&pids)? - cpu0;
        for conn in conns.iter() {
            conn.close(0u32.into(), b"done");
        }
        endpoint.wait_idle().await;
        drop(children);
        let requests = latency.len();
        Ok(PartitionFloorReport {
            servers,
            threads,
            rate,
            requests,
            errors,
            seconds: elapsed,
            server_cpu_seconds,
            requests_per_server_cpu_s: requests as f64 / server_cpu_seconds.max(1e-9),
            latency: LatencyStats::from(&latency),
        })
    })
}

/// A storage setting of the site [`stalls`] measures.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum StallVariant {
    /// No segment roll and no snapshot during the run (huge segments and thresholds).
    Quiet,
    /// Small segments (rolls), no snapshot.
    Rolls,
    /// Snapshots (huge segments, so no roll and no segment deletion).
    Snapshots,
    /// Small segments and snapshots: rolls, snapshots and segment deletion.
    Busy,
}

impl StallVariant {
    /// The variant's name, as `--variants` takes it.
    pub fn name(self) -> &'static str {
        match self {
            Self::Quiet => "quiet",
            Self::Rolls => "rolls",
            Self::Snapshots => "snapshots",
            Self::Busy => "busy",
        }
    }
}

impl std::str::FromStr for StallVariant {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        [Self::Quiet, Self::Rolls, Self::Snapshots, Self::Busy]
            .into_iter()
            .find(|v| v.name() == s)
            .ok_or_else(|| format!("unknown variant {s:?}: quiet, rolls, snapshots or busy"))
    }
}

/// What [`stalls`] runs (also the `causalkv bench stalls` arguments).
#[derive(Clone, Debug, Serialize, clap::Args)]
pub struct StallOptions {
    /// Variants, comma-separated, run in this order in every round: quiet (no roll, no
    /// snapshot; the baseline of the ratios), rolls, snapshots, busy (rolls and snapshots).
    #[arg(long, value_delimiter = ',', default_value = "quiet,busy")]
    pub variants: Vec<StallVariant>,
    /// Interleaved rounds.
    #[arg(long, default_value_t = 3)]
    pub rounds: usize,
    /// Seconds of load per variant and round.
    #[arg(long, default_value_t = 5.0)]
    pub seconds: f64,
    /// Keys preloaded (`key00000000`, ...): the keys the reader gets.
    #[arg(long = "keys", default_value_t = 100_000)]
    pub preload_keys: u64,
    /// Value size of the preloaded keys, bytes.
    #[arg(long = "key-value-size", default_value_t = 512)]
    pub preload_value_size: usize,
    /// Gets per second (open loop, uniform over the preloaded keys).
    #[arg(long, default_value_t = 2000.0)]
    pub get_rate: f64,
    /// Reader workers (each takes its share of the scheduled gets).
    #[arg(long, default_value_t = 32)]
    pub readers: usize,
    /// Puts in flight (closed loop).
    #[arg(long, default_value_t = 16)]
    pub writers: usize,
    /// Keys the writer overwrites (`w00000000`, ...), disjoint from the reader's keys.
    #[arg(long, default_value_t = 5_000)]
    pub write_keys: u64,
    /// Smallest value put, bytes.
    #[arg(long, default_value_t = 1024)]
    pub write_value_min: usize,
    /// Largest value put, bytes (sizes uniform in between).
    #[arg(long, default_value_t = 4096)]
    pub write_value_max: usize,
    /// `segment_bytes` of the variants that roll (rolls, busy).
    #[arg(long, default_value_t = 2 << 20)]
    pub segment_bytes: u64,
    /// `snapshot_interval_ms` of the variants that snapshot (snapshots, busy).
    #[arg(long, default_value_t = 1000)]
    pub snapshot_interval_ms: u64,
    /// `snapshot_log_bytes` of the variants that snapshot (snapshots, busy).
    #[arg(long, default_value_t = 16 << 20)]
    pub snapshot_log_bytes: u64,
}

/// One variant in one round of [`stalls`].
#[derive(Clone, Debug, Serialize)]
pub struct StallRun {
    /// Round, from 1.
    pub round: usize,
    /// Variant.
    pub variant: StallVariant,
    /// The site's `[storage] segment_bytes`.
    pub segment_bytes: u64,
    /// The site's `[storage] snapshot_interval_ms`.
    pub snapshot_interval_ms: u64,
    /// The site's `[storage] snapshot_log_bytes`.
    pub snapshot_log_bytes: u64,
    /// Get latency from each get's scheduled start (open loop).
    pub get: LatencyStats,
    /// Gets completed per second.
    pub gets_per_s: f64,
    /// Gets that failed.
    pub get_errors: u64,
    /// Put latency (closed loop; each put is acknowledged after its fsync).
    pub put: LatencyStats,
    /// Puts completed per second.
    pub puts_per_s: f64,
    /// Puts that failed.
    pub put_errors: u64,
    /// The first error seen, if any.
    pub first_error: Option<String>,
    /// Log segments created during the load (one per roll), seen in the data directory.
    pub rolls: u64,
    /// Snapshots written during the load, seen in the data directory.
    pub snapshots: u64,
    /// About how long a snapshot file was being written during the load (`snapshot.tmp`
    /// present), ms.
    pub snapshot_write_ms: u64,
    /// Share of the load's wall time during which some task of the machine waited for a CPU
    /// (Linux pressure stall information, `/proc/pressure/cpu`), percent: how much other work
    /// competed for the cores.
    pub cpu_pressure_pct: Option<f64>,
    /// The same for I/O (`/proc/pressure/io`).
    pub io_pressure_pct: Option<f64>,
    /// Get latency distribution as `(quantile, µs)` points.
    pub get_cdf: Vec<(f64, u64)>,
}

/// A variant's get latency against `quiet` in the same round.
#[derive(Clone, Debug, Serialize)]
pub struct StallRatio {
    /// The variant.
    pub variant: StallVariant,
    /// Its get p99 over quiet's, per round.
    pub p99: Vec<f64>,
    /// Median of `p99`.
    pub median_p99: f64,
    /// Its get p99.9 over quiet's, per round.
    pub p999: Vec<f64>,
    /// Median of `p999`.
    pub median_p999: f64,
}

/// What [`stalls`] measured.
#[derive(Clone, Debug, Serialize)]
pub struct StallReport {
    /// The settings.
    pub options: StallOptions,
    /// Every run, in the order run.
    pub runs: Vec<StallRun>,
    /// Every variant but `quiet` against `quiet`.
    pub ratios: Vec<StallRatio>,
}

impl StallReport {
    /// The runs and ratios as a Markdown table.
    pub fn table(&self) -> String {
        let mut t = String::from(
            "| round | variant | get p50 µs | get p99 µs | get p99.9 µs | get max µs | gets/s | puts/s | put p99 µs | rolls | snapshots | get p99 / quiet |\n\
             |---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
        );
        for r in &self.runs {
            let ratio = self
                .ratios
                .iter()
                .find(|x| x.variant == r.variant)
                .and_then(|x| x.p99.get(r.round - 1))
                .map_or("".to_string(), |v| format!("{v:.2}"));
            t.push_str(&format!(
                "| {} | {} | {} | {} | {} | {} | {:.0} | {:.0} | {} | {} | {} | {} |\n",
                r.round,
                r.variant.name(),
                r.get.p50_us,
                r.get.p99_us,
                r.get.p999_us,
                r.get.max_us,
                r.gets_per_s,
                r.puts_per_s,
                r.put.p99_us,
                r.rolls,
                r.snapshots,
                ratio
            ));
        }
        for x in &self.ratios {
            t.push_str(&format!(
                "\n{}: get p99 / quiet p99, median {:.2} (rounds: {}); p99.9, median {:.2}",
                x.variant.name(),
                x.median_p99,
                x.p99
                    .iter()
                    .map(|v| format!("{v:.2}"))
                    .collect::<Vec<_>>()
                    .join(", "),
                x.median_p999
            ));
        }
        t
    }
}

/// Client GET latency at one site while its write-ahead log rolls segments and its snapshotter
/// runs, against the same load without either.
///
/// Method: one site is laid out in `dir` and preloaded in this process (`preload_keys` keys,
/// log fsync off, then a snapshot); the result is kept as a seed. For every round and variant,
/// the seed is copied into the site's data directory (and fsynced), the site is started as a
/// separate `bin serve` process (its own `current_thread` runtime, as deployed) with the
/// variant's `[storage]` settings and `fsync = "always"`, and two clients load it for
/// `seconds`: a writer thread (own runtime and connection) with `writers` puts in flight on
/// keys disjoint from the reader's, values of `write_value_min..=write_value_max` bytes, and a
/// reader doing gets of the preloaded keys open loop at `get_rate` per second ([`run_load`]:
/// latency from each get's scheduled start). The reader's keys are never written during the
/// load, so a get never waits for an fsync: its latency is the site's responsiveness. Rolls
/// and snapshots are counted by polling the data directory every 5 ms for new segment and
/// snapshot files.
pub async fn stalls(
    dir: &std::path::Path,
    bin: &std::path::Path,
    opts: &StallOptions,
) -> Result<StallReport, String> {
    use std::collections::HashSet;
    use std::path::Path;
    use std::sync::atomic::{AtomicBool, Ordering};

    use crate::storage::wal::FsyncPolicy;

    fn io(what: impl std::fmt::Display) -> impl FnOnce(std::io::Error) -> String {
        move |e| format!("{what}: {e}")
    }
    /// Replaces `data` with a copy of `seed`, fsynced, so every run starts from the same state
    /// with nothing left to write back.
    fn restore(seed: &Path, data: &Path) -> std::io::Result<()> {
        if data.exists() {
            std::fs::remove_dir_all(data)?;
        }
        std::fs::create_dir_all(data)?;
        for ent in std::fs::read_dir(seed)? {
            let ent = ent?;
            if ent.file_type()?.is_file() {
                let to = data.join(ent.file_name());
                std::fs::copy(ent.path(), &to)?;
                std::fs::File::open(&to)?.sync_all()?;
            }
        }
        std::fs::File::open(data)?.sync_all()
    }
    /// A client of the site at `addr` with the `cli` identity.
    async fn connect(
        addr: std::net::SocketAddr,
        certs: &Path,
        timeout: Duration,
    ) -> Result<Client, ClientError> {
        let id = crate::tools::certs::client_paths(certs, crate::tools::dev::CLI_CLIENT);
        Client::builder()
            .sites([addr.to_string()])
            .identity(id.cert, id.key)
            .ca(crate::tools::certs::ca_paths(certs).cert)
            .timeout(timeout)
            .connect()
            .await
    }
    /// The names of the files in `dir`.
    fn names(dir: &Path) -> HashSet<String> {
        std::fs::read_dir(dir)
            .map(|it| {
                it.filter_map(|e| e.ok()?.file_name().into_string().ok())
                    .collect()
            })
            .unwrap_or_default()
    }
    /// The `some` stall total (µs) of a Linux pressure file, if there is one.
    fn pressure(resource: &str) -> Option<u64> {
        let text = std::fs::read_to_string(format!("/proc/pressure/{resource}")).ok()?;
        let line = text.lines().find(|l| l.starts_with("some"))?;
        line.split_whitespace()
            .find_map(|f| f.strip_prefix("total="))?
            .parse()
            .ok()
    }
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    /// Sets the flag that stops the writer and the directory watcher when dropped, so that
    /// they stop on every way out of a run.
    struct StopOnDrop(Arc<AtomicBool>);
    impl Drop for StopOnDrop {
        fn drop(&mut self) {
            self.0.store(true, Ordering::Relaxed);
        }
    }
    /// What the writer thread measured.
    struct Written {
        hist: Histogram<u64>,
        seconds: f64,
        errors: u64,
        first_error: Option<String>,
    }

    if !opts.variants.contains(&StallVariant::Quiet) {
        return Err("the variants must include quiet, the baseline".into());
    }
    if opts.write_value_min == 0 || opts.write_value_min > opts.write_value_max {
        return Err("write value sizes: 0 < min <= max".into());
    }
    let layout = crate::tools::dev::prepare(&crate::tools::dev::DevOptions::new(1, dir, 0))
        .map_err(|e| e.to_string())?;
    let base = layout.configs[0].clone();
    let addr = base.listen_addr();
    let data = base.data_dir.clone();
    let seed = dir.join("seed");

    // The seed: the preloaded keys in a snapshot, the log pruned to its last segment.
    {
        let mut cfg = base.clone();
        cfg.storage.fsync = FsyncPolicy::Never;
        cfg.storage.segment_bytes = opts.segment_bytes;
        cfg.storage.snapshot_log_bytes = i64::MAX as u64;
        let node = crate::Node::start(cfg).await.map_err(|e| e.to_string())?;
        let value = bytes::Bytes::from(vec![b'p'; opts.preload_value_size]);
        for k in 0..opts.preload_keys {
            node.put_local(
                bytes::Bytes::from(format!("key{k:08}")),
                Some(value.clone()),
            );
        }
        let snap = node.snapshot().await;
        node.shutdown().await;
        snap.map_err(|e| format!("preload snapshot: {e}"))?;
        std::fs::rename(&data, &seed).map_err(io(seed.display()))?;
    }

    let mut runs = Vec::new();
    for round in 1..=opts.rounds {
        for &variant in &opts.variants {
            let mut cfg = base.clone();
            cfg.admin_addr = None;
            cfg.storage.fsync = FsyncPolicy::Always;
            let rolls = matches!(variant, StallVariant::Rolls | StallVariant::Busy);
            let snaps = matches!(variant, StallVariant::Snapshots | StallVariant::Busy);
            cfg.storage.segment_bytes = if rolls { opts.segment_bytes } else { 1 << 40 };
            (
                cfg.storage.snapshot_interval_ms,
                cfg.storage.snapshot_log_bytes,
            ) = if snaps {
                (opts.snapshot_interval_ms, opts.snapshot_log_bytes)
            } else {
                (3_600_000, i64::MAX as u64)
            };
            let file = dir.join(format!("site-a-{}.toml", variant.name()));
            let text = toml::to_string_pretty(&cfg).map_err(|e| e.to_string())?;
            std::fs::write(&file, text).map_err(io(file.display()))?;
            restore(&seed, &data).map_err(io(data.display()))?;
            let log = dir.join(format!("site-a-{}-{round}.log", variant.name()));
            let stderr = std::fs::File::create(&log).map_err(io(log.display()))?;
            let mut site = Kill(
                std::process::Command::new(bin)
                    .arg("serve")
                    .arg("--config")
                    .arg(&file)
                    .env_remove("CAUSALKV_THREADS")
                    .stdin(std::process::Stdio::null())
                    .stdout(std::process::Stdio::null())
                    .stderr(stderr)
                    .spawn()
                    .map_err(io(bin.display()))?,
            );
            // Probe until the site serves: a short timeout per probe, as a handshake sent
            // before the process listens is only retransmitted after QUIC's probe timeout.
            let since = Instant::now();
            loop {
                if let Ok(Some(status)) = site.0.try_wait() {
                    return Err(format!(
                        "the site exited with {status}; see {}",
                        log.display()
                    ));
                }
                match connect(addr, &layout.certs, Duration::from_millis(100)).await {
                    Ok(_) => break,
                    Err(_) if since.elapsed() < Duration::from_secs(60) => {
                        tokio::time::sleep(Duration::from_millis(20)).await
                    }
                    Err(e) => return Err(format!("the site does not serve after 60 s: {e}")),
                }
            }
            let timeout = Duration::from_secs(30);
            let reader = Arc::new(
                connect(addr, &layout.certs, timeout)
                    .await
                    .map_err(|e| e.to_string())?,
            );
            if reader
                .get("key00000000")
                .await
                .map_err(|e| e.to_string())?
                .is_none()
                && opts.preload_keys > 0
            {
                return Err("the preloaded keys are missing".into());
            }

            // The writer: its own thread, runtime and connection.
            let stop = Arc::new(AtomicBool::new(false));
            let _stop = StopOnDrop(stop.clone());
            let (ready_tx, ready_rx) = tokio::sync::oneshot::channel::<()>();
            let (done_tx, done_rx) = tokio::sync::oneshot::channel::<Result<Written, String>>();
            let writer = {
                let (stop, certs, opts) = (stop.clone(), layout.certs.clone(), opts.clone());
                std::thread::spawn(move || {
                    let written = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                        .map_err(|e| e.to_string())
                        .and_then(|rt| {
                            rt.block_on(async move {
                                let c = Arc::new(
                                    connect(addr, &certs, timeout)
                                        .await
                                        .map_err(|e| e.to_string())?,
                                );
                                c.put("w-ready", b"1").await.map_err(|e| e.to_string())?;
                                let _ = ready_tx.send(());
                                let t0 = Instant::now();
                                let value = Arc::new(vec![b'w'; opts.write_value_max]);
                                let mut tasks = tokio::task::JoinSet::new();
                                for w in 0..opts.writers.max(1) {
                                    let (c, stop, value) = (c.clone(), stop.clone(), value.clone());
                                    let opts = opts.clone();
                                    tasks.spawn(async move {
                                        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(
                                            (round * 1000 + w) as u64,
                                        );
                                        let mut out = Written {
                                            hist: histogram(),
                                            seconds: 0.0,
                                            errors: 0,
                                            first_error: None,
                                        };
                                        while !stop.load(Ordering::Relaxed) {
                                            let key = format!(
                                                "w{:08}",
                                                rng.gen_range(0..opts.write_keys.max(1))
                                            );
                                            let len = rng.gen_range(
                                                opts.write_value_min..=opts.write_value_max,
                                            );
                                            let t = Instant::now();
                                            match c.put(&key, &value[..len]).await {
                                                Ok(_) => {
                                                    let us = t.elapsed().as_micros().max(1);
                                                    let _ = out.hist.record(us as u64);
                                                }
                                                Err(e) => {
                                                    out.errors += 1;
                                                    out.first_error.get_or_insert(e.to_string());
                                                }
                                            }
                                        }
                                        out
                                    });
                                }
                                let mut all = Written {
                                    hist: histogram(),
                                    seconds: 0.0,
                                    errors: 0,
                                    first_error: None,
                                };
                                while let Some(w) = tasks.join_next().await {
                                    let w = w.map_err(|e| e.to_string())?;
                                    all.hist.add(&w.hist).expect("same bounds");
                                    all.errors += w.errors;
                                    all.first_error = all.first_error.or(w.first_error);
                                }
                                all.seconds = t0.elapsed().as_secs_f64();
                                Ok(all)
                            })
                        });
                    let _ = done_tx.send(written);
                })
            };
            if ready_rx.await.is_err() {
                let why = done_rx.await.map_err(|e| e.to_string())?.err();
                let _ = writer.join();
                return Err(format!("the writer did not start: {why:?}"));
            }

            // Rolls and snapshots: new files in the data directory.
            let watcher = {
                let (stop, data) = (stop.clone(), data.clone());
                std::thread::spawn(move || {
                    let before = names(&data);
                    let mut seen = before.clone();
                    let mut writing = 0u64;
                    let poll = Duration::from_millis(5);
                    while !stop.load(Ordering::Relaxed) {
                        let now = names(&data);
                        if now.contains("snapshot.tmp") {
                            writing += poll.as_millis() as u64;
                        }
                        seen.extend(now);
                        std::thread::sleep(poll);
                    }
                    let new: Vec<&String> = seen.difference(&before).collect();
                    let count = |p: &str, s: &str| {
                        new.iter()
                            .filter(|n| n.starts_with(p) && n.ends_with(s))
                            .count() as u64
                    };
                    (count("wal-", ".log"), count("snapshot-", ".rkyv"), writing)
                })
            };

            let stalled = (pressure("cpu"), pressure("io"));
            let load = run_load(
                reader,
                &LoadOptions {
                    level: Level::Causal,
                    concurrency: opts.readers,
                    duration: Duration::from_secs_f64(opts.seconds),
                    read_ratio: 1.0,
                    value_size: 0,
                    keys: opts.preload_keys.max(1),
                    dist: KeyDist::Uniform,
                    rate: Some(opts.get_rate),
                    sync: 0,
                    seed: round as u64,
                },
            )
            .await;
            let share = |before: Option<u64>, resource: &str| {
                let us = pressure(resource)?.checked_sub(before?)?;
                Some(us as f64 / (load.seconds * 1e4))
            };
            let (cpu_pressure_pct, io_pressure_pct) =
                (share(stalled.0, "cpu"), share(stalled.1, "io"));
            stop.store(true, Ordering::Relaxed);
            let written = done_rx.await.map_err(|e| e.to_string())??;
            let _ = writer.join();
            let (rolls, snapshots, snapshot_write_ms) = watcher
                .join()
                .map_err(|_| "the directory watcher panicked".to_string())?;
            drop(site);
            let get_cdf = load.get_cdf;
            runs.push(StallRun {
                round,
                variant,
                segment_bytes: cfg.storage.segment_bytes,
                snapshot_interval_ms: cfg.storage.snapshot_interval_ms,
                snapshot_log_bytes: cfg.storage.snapshot_log_bytes,
                gets_per_s: load.get.count as f64 / load.seconds,
                get: load.get,
                get_errors: load.errors,
                puts_per_s: written.hist.len() as f64 / written.seconds,
                put: LatencyStats::from(&written.hist),
                put_errors: written.errors,
                first_error: load.first_error.or(written.first_error),
                rolls,
                snapshots,
                snapshot_write_ms,
                cpu_pressure_pct,
                io_pressure_pct,
                get_cdf,
            });
            let r = runs.last().expect("just pushed");
            tracing::info!(
                round,
                variant = variant.name(),
                get_p99_us = r.get.p99_us,
                get_max_us = r.get.max_us,
                puts_per_s = r.puts_per_s as u64,
                rolls,
                snapshots,
                "stalls run done"
            );
        }
    }

    let median = |v: &[f64]| {
        let mut s = v.to_vec();
        s.sort_by(f64::total_cmp);
        match s.len() {
            0 => f64::NAN,
            n if n % 2 == 1 => s[n / 2],
            n => (s[n / 2 - 1] + s[n / 2]) / 2.0,
        }
    };
    let run = |round: usize, v: StallVariant| {
        runs.iter()
            .find(|r| r.round == round && r.variant == v)
            .expect("every variant runs every round")
    };
    let ratios = opts
        .variants
        .iter()
        .filter(|&&v| v != StallVariant::Quiet)
        .map(|&v| {
            let per = |f: fn(&LatencyStats) -> u64| -> Vec<f64> {
                (1..=opts.rounds)
                    .map(|n| f(&run(n, v).get) as f64 / f(&run(n, StallVariant::Quiet).get) as f64)
                    .collect()
            };
            let (p99, p999) = (per(|s| s.p99_us), per(|s| s.p999_us));
            StallRatio {
                variant: v,
                median_p99: median(&p99),
                median_p999: median(&p999),
                p99,
                p999,
            }
        })
        .collect();
    Ok(StallReport {
        options: opts.clone(),
        runs,
        ratios,
    })
}
