//! The node: one site's server, driving the sans-IO [`Replica`] with tokio and quinn.
//!
//! [`Node::start`] binds one QUIC endpoint that serves peers (ALPN `causalkv-peer/1`) and clients
//! (ALPN `causalkv-client/1`) and dials every peer. Tasks:
//!
//! - the accept loop, which hands each connection to [`super::peer`] or [`super::service`];
//! - one outbound link per peer ([`super::peer::run_outbound`]), which sends this site's update
//!   stream, pulled from the replica's retained log;
//! - the ticker, which passes time to the replica (clock markers, tombstone collection);
//! - the admin HTTP server ([`super::admin`]), when `admin_addr` is configured.
//!
//! Peer state (`up`, `suspect`, `down`, each with a reason) comes from a phi-accrual detector
//! per peer ([`super::failure`]) fed by the heartbeats and acks of the peer's control streams,
//! combined with the state of the outbound link.
//!
//! All replica mutations go through [`Shared::mutate`], the one place that persists the records a
//! mutation produced, marks them durable, wakes the peer senders and tells waiting requests that
//! `applied` moved.
//!
//! Shutdown follows mini-redis: a `watch` flag tells every task to stop; in-flight client requests
//! are drained (bounded by `timeouts.drain_ms`), state is flushed, and the endpoint closes every
//! connection with [`close_code::SHUTDOWN`].

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use quinn::{Endpoint, VarInt};
use tokio::sync::{Notify, watch};
use tracing::{Instrument, debug, info, info_span, warn};

use super::failure::PhiAccrual;
use super::metrics::OpMetrics;
use super::tls::{self, Identity, TlsFiles, TransportLimits};
use crate::clock::{SiteId, Timestamp};
use crate::config::SiteConfig;
use crate::replica::{Replica, ReplicaConfig};
use crate::storage::snapshot::{self, SnapshotData};
use crate::storage::wal::{self, StorageError, Wal};
use crate::storage::{MemStore, Store};
use crate::wire::{PeerStatus, StatusInfo};

/// QUIC application close codes.
pub mod close_code {
    /// Graceful shutdown.
    pub const SHUTDOWN: u32 = 0;
    /// A malformed frame was received.
    pub const MALFORMED: u32 = 0x10;
    /// The peer's hello was refused (wrong cluster, wrong site, certificate mismatch).
    pub const HELLO_REJECTED: u32 = 0x11;
    /// The ALPN is not one this node serves.
    pub const BAD_ALPN: u32 = 0x12;
    /// A link dial that was given up for a newer one, closed when it completed late.
    pub const SUPERSEDED: u32 = 0x13;
}

/// Errors starting a node.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    /// TLS files or settings.
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    /// Binding the UDP socket.
    #[error("cannot bind {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// Configuration.
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    /// Durable storage could not be opened or recovered.
    #[error("storage in {dir}: {source}")]
    Storage {
        /// The data directory.
        dir: std::path::PathBuf,
        /// Why.
        source: StorageError,
    },
}

/// Counters of one node, readable at any time.
#[derive(Debug, Default)]
pub struct Metrics {
    /// Frames that failed validation.
    pub malformed_frames: AtomicU64,
    /// Peer hellos refused.
    pub hellos_rejected: AtomicU64,
    /// Connections whose TLS handshake failed.
    pub tls_failures: AtomicU64,
    /// Client requests served.
    pub requests: AtomicU64,
    /// Client requests refused for size.
    pub too_large: AtomicU64,
    /// Update batches received from peers.
    pub batches_in: AtomicU64,
    /// Update batches sent to peers.
    pub batches_out: AtomicU64,
    /// Bytes of update frames received.
    pub bytes_in: AtomicU64,
    /// Bytes of update frames sent.
    pub bytes_out: AtomicU64,
    /// Per client operation: counts and latency histograms.
    pub ops: OpMetrics,
}

impl Metrics {
    /// Reads one counter.
    pub fn get(c: &AtomicU64) -> u64 {
        c.load(Ordering::Relaxed)
    }

    pub(crate) fn bump(c: &AtomicU64) {
        c.fetch_add(1, Ordering::Relaxed);
    }
}

/// What this node knows of one peer.
#[derive(Debug, Clone)]
pub(crate) struct PeerState {
    /// Whether this site's link to the peer is up (hello exchanged).
    pub outbound_up: bool,
    /// Heartbeat and ack arrivals, from the control streams of both connections.
    pub detector: PhiAccrual,
    /// Why the outbound link is in its state ("connected", or the last error).
    pub reason: String,
}

impl PeerState {
    /// A heartbeat (or ack) arrived.
    pub fn heard(&mut self, now: Instant) {
        self.detector.heartbeat(now);
    }

    /// A connection to the peer came up: the silence before it says nothing about the link's
    /// rhythm, so the detector starts over (seeded with the heartbeat period).
    pub fn connected(&mut self, now: Instant) {
        self.detector.reset();
        self.detector.heartbeat(now);
    }
}

/// A peer's state and the reason for it, from the suspicion level `phi` after `silence`
/// (`None` before any heartbeat) and the state of the outbound link.
fn judge(
    st: &PeerState,
    phi: f64,
    silence: Option<Duration>,
    f: &crate::config::FailureConfig,
) -> (&'static str, String) {
    let link = if st.outbound_up {
        String::new()
    } else {
        format!("; link down: {}", st.reason)
    };
    let Some(silence) = silence else {
        return if st.outbound_up {
            ("suspect", "connected, no heartbeat yet".into())
        } else {
            ("down", format!("no heartbeat yet{link}"))
        };
    };
    let silent = format!("phi {phi:.1} after {} ms of silence", silence.as_millis());
    if phi >= f.phi_down {
        ("down", format!("{silent}{link}"))
    } else if phi >= f.phi_suspect {
        ("suspect", format!("{silent}{link}"))
    } else if !st.outbound_up {
        (
            "suspect",
            format!(
                "link down: {}; heartbeats still arriving (phi {phi:.1})",
                st.reason
            ),
        )
    } else {
        (
            "up",
            format!(
                "phi {phi:.1}, last heartbeat {} ms ago",
                silence.as_millis()
            ),
        )
    }
}

/// Options that no configuration file can set.
#[derive(Clone, Debug)]
pub struct NodeOptions {
    /// Whether remote updates wait for their dependencies (see
    /// [`ReplicaConfig::check_deps`]). Only the eventual-consistency benchmark mode and tests
    /// switch it off.
    pub check_deps: bool,
    /// Whether a partitioned node checks deps against the site's stable vector (see
    /// [`ReplicaConfig::check_stable`]). Only tests switch it off, to show the bug it guards.
    pub check_stable: bool,
}

impl Default for NodeOptions {
    fn default() -> Self {
        Self {
            check_deps: true,
            check_stable: true,
        }
    }
}

/// State shared by a node's tasks.
pub(crate) struct Shared {
    pub cfg: SiteConfig,
    /// The replica. A std mutex: it is never held across an await, and critical sections are
    /// short (one request or one batch).
    pub replica: Mutex<Replica<MemStore>>,
    /// Bumped whenever `applied` or a peer's acked vector moves; requests waiting for causal
    /// readiness or synchronous replication watch it.
    pub changed: watch::Sender<u64>,
    /// Per peer: wakes the outbound sender when there is something new to send.
    pub peer_wake: Vec<Notify>,
    /// Per peer: cuts the outbound link's reconnection backoff short. A peer that dials in has
    /// come back, so the link to it is redialled at once rather than after up to
    /// `max_backoff_ms`: a returning site starts catching up as soon as it is reachable.
    pub peer_redial: Vec<Notify>,
    pub peers: Vec<Mutex<PeerState>>,
    pub metrics: Metrics,
    pub shutdown: watch::Receiver<bool>,
    pub inflight: AtomicUsize,
    /// Set when a graceful shutdown begins: new requests are refused (clients fail over) while
    /// in-flight ones finish and the update streams drain to peers.
    pub draining: std::sync::atomic::AtomicBool,
    pub drained: Notify,
    pub identity: Identity,
    pub transport: TransportLimits,
    /// The write-ahead log and the commits waiting for its fsync. Locked only while the replica
    /// lock is held (lock order: replica, then wal), so log order is apply order.
    pub wal: Mutex<WalState>,
    /// The log's synced LSN.
    pub synced: watch::Receiver<u64>,
}

/// The write-ahead log plus the durable points waiting for its fsync.
pub(crate) struct WalState {
    pub wal: Wal,
    /// `(lsn, applied, lease)`: once the log is synced to `lsn`, `applied` and `lease` are
    /// durable.
    pub pending: std::collections::VecDeque<(u64, crate::clock::VClock, Timestamp)>,
}

/// Physical time for the hybrid logical clock, in microseconds since the Unix epoch.
pub fn now_micros() -> Timestamp {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as Timestamp)
}

impl Shared {
    pub fn site(&self) -> SiteId {
        self.cfg.site_id
    }

    /// Runs `f` on the replica, then appends the records it produced to the write-ahead log and
    /// asks for an fsync under the configured policy. The one place replica state changes.
    ///
    /// Returns `f`'s result and the LSN to wait for ([`Shared::wait_durable`]) before telling
    /// anyone the effect is durable. The replica's durable state (what peers are sent and what
    /// is acked) advances in [`durability_pump`] once the fsync is done.
    pub fn mutate<T>(&self, f: impl FnOnce(&mut Replica<MemStore>) -> T) -> (T, u64) {
        self.mutate_with(true, f)
    }

    /// [`Shared::mutate`] without asking for an fsync now: the records are group-committed by
    /// the next fsync anyone asks for, at the latest the ticker's (every marker interval). Used
    /// for remote batches, so that a steady stream of replicated updates does not put an fsync
    /// in front of every local write; the origin's ack waits for that group commit.
    ///
    /// On a partitioned site it asks for the fsync at once: a partition's contribution to the
    /// stable vector counts durable state only, so updates that wait on other partitions are
    /// released one fsync after they arrive rather than one tick.
    pub fn mutate_deferred<T>(&self, f: impl FnOnce(&mut Replica<MemStore>) -> T) -> (T, u64) {
        self.mutate_with(self.cfg.partitions > 1, f)
    }

    fn mutate_with<T>(&self, sync: bool, f: impl FnOnce(&mut Replica<MemStore>) -> T) -> (T, u64) {
        let mut r = self.replica.lock().expect("replica lock poisoned");
        let out = f(&mut r);
        let mut w = self.wal.lock().expect("wal lock poisoned");
        let lsn = Self::append_ready(&mut r, &mut w, sync);
        drop(w);
        drop(r);
        self.changed.send_modify(|v| *v = v.wrapping_add(1));
        self.wake_peers();
        (out, lsn)
    }

    /// Appends the replica's pending records to the log and requests their fsync; queues the
    /// durable point for [`durability_pump`] (or advances at once when it is already durable).
    /// Returns the LSN to wait for, or `u64::MAX` when the log has failed.
    fn append_ready(r: &mut Replica<MemStore>, w: &mut WalState, sync: bool) -> u64 {
        loop {
            let ready = r.take_ready();
            let lsn = if ready.records.is_empty() {
                w.wal.end_lsn()
            } else {
                match w.wal.append(&ready.records) {
                    Ok(lsn) => lsn,
                    Err(e) => {
                        // The log refuses everything from now on; waiters see SyncStopped.
                        tracing::error!(error = %e, "write-ahead log append failed");
                        return u64::MAX;
                    }
                }
            };
            if sync {
                w.wal.request_sync(lsn);
            }
            if w.wal.synced_lsn() >= lsn && w.pending.is_empty() {
                // Already durable (nothing new, or fsync=never): advance now. On a partitioned
                // site that can make buffered updates visible: log those too.
                r.advance(&ready.applied, ready.lease);
                if r.has_records() {
                    continue;
                }
            } else {
                w.pending.push_back((lsn, ready.applied, ready.lease));
            }
            return lsn;
        }
    }

    /// Waits until the write-ahead log is durable up to `lsn`.
    pub async fn wait_durable(&self, lsn: u64) -> Result<(), StorageError> {
        if lsn == u64::MAX {
            return Err(StorageError::SyncStopped);
        }
        let mut rx = self.synced.clone();
        wal::wait_synced(&mut rx, lsn).await
    }

    fn wake_peers(&self) {
        for w in &self.peer_wake {
            w.notify_one();
        }
    }

    /// Reads the replica.
    pub fn read<T>(&self, f: impl FnOnce(&Replica<MemStore>) -> T) -> T {
        f(&self.replica.lock().expect("replica lock poisoned"))
    }

    pub fn is_shutting_down(&self) -> bool {
        self.draining.load(Ordering::SeqCst) || *self.shutdown.borrow()
    }

    pub fn site_name(&self, id: SiteId) -> &str {
        &self.cfg.sites[id as usize].name
    }

    /// Write-ahead log figures: `(fsyncs, bytes on disk)`.
    pub fn wal_stats(&self) -> (u64, u64) {
        let w = self.wal.lock().expect("wal lock");
        (w.wal.fsyncs(), w.wal.disk_bytes())
    }

    /// The site's status.
    pub fn status(&self) -> StatusInfo {
        let me = self.site();
        let site_stable = self.read(|r| r.site_stable().as_slice().to_vec());
        let (applied, stable, buffered, retained, keys, peer_vecs, unacked) = self.read(|r| {
            let peer_vecs: Vec<_> = (0..self.cfg.n() as SiteId)
                .map(|p| r.peer_applied(p).as_slice().to_vec())
                .collect();
            let unacked: Vec<_> = (0..self.cfg.n() as SiteId)
                .map(|p| r.unacked_by(p) as u64)
                .collect();
            (
                r.applied().as_slice().to_vec(),
                r.stable().as_slice().to_vec(),
                r.buffer().len() as u64,
                r.retained_len() as u64,
                r.store().len() as u64,
                peer_vecs,
                unacked,
            )
        });
        let (fsyncs, wal_bytes) = self.wal_stats();
        let now = Instant::now();
        let peers = self
            .cfg
            .peers()
            .map(|p| {
                let st = self.peers[p.id as usize].lock().expect("peer lock");
                let phi = st.detector.phi(now);
                let silence = st
                    .detector
                    .last_heartbeat()
                    .map(|_| st.detector.silence(now));
                let (state, reason) = judge(&st, phi, silence, &self.cfg.failure);
                drop(st);
                let theirs = peer_vecs[p.id as usize]
                    .get(me as usize)
                    .copied()
                    .unwrap_or(0);
                PeerStatus {
                    site: p.id,
                    name: p.name.clone(),
                    addr: self.cfg.peer_addr(p.id).to_string(),
                    state: state.into(),
                    reason,
                    phi,
                    silence_ms: silence.map_or(0, |d| d.as_millis() as u64),
                    applied: peer_vecs[p.id as usize].clone(),
                    lag_updates: unacked[p.id as usize],
                    lag_ms: applied[me as usize].saturating_sub(theirs) / 1000,
                }
            })
            .collect();
        StatusInfo {
            site: me,
            name: self.cfg.me().name.clone(),
            applied,
            stable,
            buffered,
            retained,
            keys,
            wal_bytes,
            fsyncs,
            peers,
            partition: self.cfg.partition as u16,
            partitions: self.cfg.partitions as u16,
            site_stable,
        }
    }
}

/// A running site.
pub struct Node {
    shared: Arc<Shared>,
    endpoint: Endpoint,
    admin: Option<SocketAddr>,
    shutdown_tx: watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    /// Completes once the endpoint's UDP socket is closed.
    released: super::socket::Released,
}

impl Node {
    /// Loads the certificates, binds the endpoint and starts serving and replicating.
    pub async fn start(cfg: SiteConfig) -> Result<Node, NodeError> {
        Self::start_with(cfg, NodeOptions::default()).await
    }

    /// [`Node::start`] with options no configuration file can set.
    pub async fn start_with(cfg: SiteConfig, opts: NodeOptions) -> Result<Node, NodeError> {
        cfg.validate()?;
        tls::install_crypto_provider();
        let identity = Identity::load(&TlsFiles {
            ca: cfg.tls.ca.clone(),
            cert: cfg.tls.cert.clone(),
            key: cfg.tls.key.clone(),
        })?;
        let transport = cfg.transport_limits();
        let server = tls::server_config(&identity, &transport, cfg.tls.require_client_cert)?;
        // Before the UDP endpoint: if this fails, nothing is left bound.
        let admin_listener = match cfg.admin_addr {
            Some(addr) => Some(
                super::admin::bind(addr)
                    .await
                    .map_err(|source| NodeError::Bind { addr, source })?,
            ),
            None => None,
        };
        let addr = cfg.listen_addr();
        let socket =
            super::socket::bind_udp(addr).map_err(|source| NodeError::Bind { addr, source })?;
        let (runtime, released) = super::socket::tracked_runtime();
        let endpoint = Endpoint::new(transport.endpoint_config()?, Some(server), socket, runtime)
            .map_err(|source| NodeError::Bind { addr, source })?;
        let mut rc =
            ReplicaConfig::new(cfg.site_id, cfg.n()).with_partition(cfg.partition, cfg.partitions);
        rc.marker_interval = cfg.replication.marker_interval_ms * 1000;
        rc.check_deps = opts.check_deps;
        rc.check_stable = opts.check_stable;
        let (replica, wal) = recover(&cfg, rc)?;
        let synced = wal.synced();
        let (shutdown_tx, shutdown) = watch::channel(false);
        let n = cfg.n();
        let shared = Arc::new(Shared {
            replica: Mutex::new(replica),
            changed: watch::channel(0).0,
            peer_wake: (0..n).map(|_| Notify::new()).collect(),
            peer_redial: (0..n).map(|_| Notify::new()).collect(),
            peers: (0..n)
                .map(|_| {
                    let f = &cfg.failure;
                    Mutex::new(PeerState {
                        outbound_up: false,
                        detector: PhiAccrual::new(
                            f.window,
                            Duration::from_millis(f.min_std_dev_ms),
                        )
                        .with_first_interval(Duration::from_millis(cfg.timeouts.heartbeat_ms)),
                        reason: "not connected yet".into(),
                    })
                })
                .collect(),
            metrics: Metrics::default(),
            shutdown,
            inflight: AtomicUsize::new(0),
            draining: std::sync::atomic::AtomicBool::new(false),
            drained: Notify::new(),
            identity,
            transport,
            wal: Mutex::new(WalState {
                wal,
                pending: Default::default(),
            }),
            synced,
            cfg,
        });
        let span = if shared.cfg.partitions > 1 {
            info_span!("site", name = %shared.cfg.me().name, partition = shared.cfg.partition)
        } else {
            info_span!("site", name = %shared.cfg.me().name)
        };
        info!(parent: &span, %addr, sites = n, partitions = shared.cfg.partitions, "site listening");
        let mut tasks = vec![
            tokio::spawn(accept_loop(shared.clone(), endpoint.clone()).instrument(span.clone())),
            tokio::spawn(ticker(shared.clone()).instrument(span.clone())),
            tokio::spawn(durability_pump(shared.clone()).instrument(span.clone())),
            tokio::spawn(snapshotter(shared.clone()).instrument(span.clone())),
        ];
        for p in shared.cfg.peers() {
            tasks.push(tokio::spawn(
                super::peer::run_outbound(shared.clone(), endpoint.clone(), p.id)
                    .instrument(span.clone()),
            ));
        }
        for q in (0..shared.cfg.partitions).filter(|&q| q != shared.cfg.partition) {
            tasks.push(tokio::spawn(
                super::peer::run_sibling(shared.clone(), endpoint.clone(), q)
                    .instrument(span.clone()),
            ));
        }
        let mut admin = None;
        if let Some(listener) = admin_listener {
            let addr = listener.local_addr().ok();
            info!(parent: &span, admin = ?addr, "admin endpoints: GET /metrics, GET /status");
            admin = addr;
            tasks.push(tokio::spawn(
                super::admin::serve(shared.clone(), listener).instrument(span.clone()),
            ));
        }
        Ok(Node {
            shared,
            endpoint,
            admin,
            shutdown_tx,
            tasks,
            released,
        })
    }

    /// Serves until `signal` completes, then shuts down gracefully.
    pub async fn run_until(self, signal: impl Future<Output = ()>) {
        signal.await;
        self.shutdown().await;
    }

    /// The address the endpoint is bound to.
    pub fn local_addr(&self) -> SocketAddr {
        self.endpoint.local_addr().expect("bound endpoint")
    }

    /// The address the admin HTTP server is bound to (`GET /metrics`, `GET /status`), if one
    /// is configured (`admin_addr`).
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin
    }

    /// The metrics in the Prometheus text format, as `GET /metrics` serves them.
    pub fn metrics_text(&self) -> String {
        super::admin::render_metrics(&self.shared)
    }

    /// The counters.
    pub fn metrics(&self) -> &Metrics {
        &self.shared.metrics
    }

    /// The site's status, as `causalkv status` shows it.
    pub fn status(&self) -> StatusInfo {
        self.shared.status()
    }

    /// The live contents (tombstones left out), sorted: what convergence checks compare.
    pub fn contents(
        &self,
    ) -> std::collections::BTreeMap<Vec<u8>, (crate::clock::Version, bytes::Bytes)> {
        self.shared
            .read(|r| crate::storage::live_contents(r.store() as &dyn Store))
    }

    /// Writes directly through this node, as a client with an empty causal context would
    /// (embedded use, bulk loading, benchmarks). `None` deletes.
    /// The write is applied when this returns; it is durable (and sent to peers) once the
    /// log's fsync covers it, as for client writes.
    pub fn put_local(
        &self,
        key: bytes::Bytes,
        value: Option<bytes::Bytes>,
    ) -> crate::clock::Version {
        self.shared
            .mutate(|r| {
                r.put(now_micros(), key, value, &crate::clock::VClock::default())
                    .expect("an empty context is always covered")
            })
            .0
    }

    /// Write-ahead log figures: `(fsyncs, bytes on disk)`.
    pub fn wal_stats(&self) -> (u64, u64) {
        self.shared.wal_stats()
    }

    /// Takes a snapshot now and prunes the log it covers (normally periodic).
    pub async fn snapshot(&self) -> Result<std::path::PathBuf, StorageError> {
        take_snapshot(&self.shared).await
    }

    /// The `applied` vector.
    pub fn applied(&self) -> crate::clock::VClock {
        self.shared.read(|r| r.applied().clone())
    }

    /// Waits until this site has applied `version` (it is visible here), up to `timeout`.
    /// Returns false on timeout.
    pub async fn wait_visible(&self, version: crate::clock::Version, timeout: Duration) -> bool {
        let mut rx = self.shared.changed.subscribe();
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            rx.borrow_and_update();
            if self.shared.read(|r| r.applied().get(version.site)) >= version.ts {
                return true;
            }
            if tokio::time::timeout_at(deadline, rx.changed())
                .await
                .is_err()
            {
                return false;
            }
        }
    }

    /// Stops accepting, drains in-flight requests (bounded), flushes, and closes every
    /// connection with [`close_code::SHUTDOWN`].
    pub async fn shutdown(self) {
        let span = info_span!("site", name = %self.shared.cfg.me().name);
        let shared = &self.shared;
        shared.draining.store(true, Ordering::SeqCst);
        let drain = Duration::from_millis(shared.cfg.timeouts.drain_ms);
        let deadline = tokio::time::Instant::now() + drain;
        // 1. Let in-flight requests finish (new ones are refused, so clients fail over).
        let _ = tokio::time::timeout_at(deadline, async {
            loop {
                let notified = shared.drained.notified();
                if shared.inflight.load(Ordering::SeqCst) == 0 {
                    break;
                }
                notified.await;
            }
        })
        .await;
        // 2. Make everything durable, then let connected peers receive and ack this site's
        //    updates, so that a planned stop leaves nothing only here.
        shared.mutate(|_| ());
        if let Err(e) = shared.wal.lock().expect("wal lock").wal.sync_now() {
            tracing::error!(parent: &span, error = %e, "final fsync failed");
        }
        let mut rx = shared.changed.subscribe();
        let _ = tokio::time::timeout_at(deadline, async {
            loop {
                rx.borrow_and_update();
                let pending: usize = shared.read(|r| {
                    r.peers()
                        .filter(|&p| {
                            shared.peers[p as usize]
                                .lock()
                                .expect("peer lock")
                                .outbound_up
                        })
                        .map(|p| r.unacked_by(p))
                        .sum()
                });
                if pending == 0 || rx.changed().await.is_err() {
                    break;
                }
            }
        })
        .await;
        // 3. Stop every task and close the connections.
        let _ = self.shutdown_tx.send(true);
        self.endpoint.close(
            VarInt::from_u32(close_code::SHUTDOWN),
            b"site shutting down",
        );
        for t in &self.tasks {
            t.abort();
        }
        for t in self.tasks {
            let _ = t.await; // drops the tasks' endpoint handles
        }
        let _ = tokio::time::timeout(Duration::from_secs(1), self.endpoint.wait_idle()).await;
        // The endpoint's driver closes the UDP socket once the last endpoint handle and
        // connection are gone (on a multi-threaded runtime, on another worker): wait for it, so
        // that a restart on the same address can bind at once.
        drop(self.endpoint);
        drop(self.shared);
        if tokio::time::timeout(Duration::from_secs(10), self.released)
            .await
            .is_err()
        {
            warn!(parent: &span, "the UDP socket was still open 10 s after the stop");
        }
        info!(parent: &span, "site stopped");
    }
}

/// Accepts connections and routes them by ALPN.
async fn accept_loop(shared: Arc<Shared>, endpoint: Endpoint) {
    let mut shutdown = shared.shutdown.clone();
    loop {
        let incoming = tokio::select! {
            i = endpoint.accept() => match i { Some(i) => i, None => return },
            _ = shutdown.changed() => return,
        };
        let shared = shared.clone();
        tokio::spawn(
            async move {
                let remote = incoming.remote_address();
                let conn = match incoming.await {
                    Ok(c) => c,
                    // The dialling application gave up mid-handshake (a dial set aside for a
                    // newer one, a client's connect timeout): nothing was refused.
                    Err(quinn::ConnectionError::ApplicationClosed(e)) => {
                        debug!(%remote, reason = %e, "connection abandoned by the peer during the handshake");
                        return;
                    }
                    Err(e) => {
                        Metrics::bump(&shared.metrics.tls_failures);
                        warn!(%remote, error = %e, "connection refused during TLS handshake");
                        return;
                    }
                };
                match tls::negotiated_alpn(&conn).as_deref() {
                    Some(a) if a == tls::ALPN_PEER => super::peer::run_inbound(shared, conn).await,
                    Some(a) if a == tls::ALPN_CLIENT => super::service::serve(shared, conn).await,
                    other => {
                        warn!(%remote, alpn = ?other, "unknown ALPN, closing");
                        conn.close(VarInt::from_u32(close_code::BAD_ALPN), b"unknown ALPN");
                    }
                }
            }
            .in_current_span(),
        );
    }
}

/// Passes time to the replica: clock markers and tombstone collection.
async fn ticker(shared: Arc<Shared>) {
    let mut shutdown = shared.shutdown.clone();
    let period = Duration::from_millis(shared.cfg.replication.marker_interval_ms);
    let mut iv = tokio::time::interval(period);
    iv.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = iv.tick() => {}
            _ = shutdown.changed() => return,
        }
        shared.mutate(|r| r.tick(now_micros()));
    }
}

/// Recovers a site's state from its data directory: the newest snapshot (memory-mapped), then
/// the write-ahead log after it. A torn tail is truncated with a warning; a corrupt record stops
/// start-up with an error that names the repair command.
fn recover(cfg: &SiteConfig, rc: ReplicaConfig) -> Result<(Replica<MemStore>, Wal), NodeError> {
    let dir = &cfg.data_dir;
    let err = |source| NodeError::Storage {
        dir: dir.clone(),
        source,
    };
    std::fs::create_dir_all(dir).map_err(|e| {
        err(StorageError::Io {
            path: dir.clone(),
            source: e,
        })
    })?;
    let started = Instant::now();
    let snap = snapshot::load(dir).map_err(err)?;
    let store = MemStore::with_capacity(snap.as_ref().map_or(0, |s| s.len()));
    let (from_lsn, prefix, keys) = match &snap {
        Some(s) => (s.wal_lsn(), s.replay_prefix(), s.load_into(&store)),
        None => (0, Vec::new(), 0),
    };
    let (wal, rec) = Wal::open(dir, cfg.storage.wal(), from_lsn).map_err(err)?;
    if let Some(t) = &rec.torn_tail {
        warn!(segment = %t.segment.display(), offset = t.offset, bytes = t.bytes_dropped,
            "truncated a torn write at the end of the write-ahead log");
    }
    let records = rec.records.len();
    let replica = Replica::recover(rc, store, prefix.into_iter().chain(rec.records));
    if keys > 0 || records > 0 {
        info!(
            snapshot_keys = keys,
            log_records = records,
            ms = started.elapsed().as_millis() as u64,
            "recovered"
        );
    }
    Ok((replica, wal))
}

/// Advances the replica's durable state as the write-ahead log's fsyncs complete; only then are
/// updates sent to peers and acked.
async fn durability_pump(shared: Arc<Shared>) {
    let mut rx = shared.synced.clone();
    loop {
        let synced = *rx.borrow_and_update();
        let mut moved = false;
        {
            let mut r = shared.replica.lock().expect("replica lock");
            let mut w = shared.wal.lock().expect("wal lock");
            while let Some((lsn, _, _)) = w.pending.front() {
                if *lsn > synced {
                    break;
                }
                let (_, applied, lease) = w.pending.pop_front().expect("front");
                r.advance(&applied, lease);
                moved = true;
            }
            if moved && r.has_records() {
                // Partitioned: durability raised the stable vector and buffered updates became
                // visible; log them and make them durable soon, for the next hop.
                Shared::append_ready(&mut r, &mut w, true);
            }
        }
        if moved {
            shared.changed.send_modify(|v| *v = v.wrapping_add(1));
            shared.wake_peers();
        }
        if rx.changed().await.is_err() {
            tracing::error!(
                "write-ahead log sync stopped: this site can no longer make writes durable"
            );
            return;
        }
    }
}

/// Takes a snapshot when the log has grown past the configured size, then drops the log
/// segments it covers, so disk use stays bounded under steady load.
async fn snapshotter(shared: Arc<Shared>) {
    let mut shutdown = shared.shutdown.clone();
    let period = Duration::from_millis(shared.cfg.storage.snapshot_interval_ms);
    loop {
        tokio::select! {
            _ = tokio::time::sleep(period) => {}
            _ = shutdown.changed() => return,
        }
        let due = shared.wal.lock().expect("wal lock").wal.disk_bytes()
            >= shared.cfg.storage.snapshot_log_bytes;
        if due && let Err(e) = take_snapshot(&shared).await {
            warn!(error = %e, "snapshot failed; the log keeps growing until one succeeds");
        }
    }
}

/// Captures the state under the lock (after appending every pending record to the log),
/// writes it outside the lock, then prunes the log segments it covers.
pub(crate) async fn take_snapshot(
    shared: &Arc<Shared>,
) -> Result<std::path::PathBuf, StorageError> {
    let (data, lsn) = {
        let mut r = shared.replica.lock().expect("replica lock");
        let mut w = shared.wal.lock().expect("wal lock");
        let lsn = Shared::append_ready(&mut r, &mut w, true);
        if lsn == u64::MAX {
            return Err(StorageError::SyncStopped);
        }
        let data = SnapshotData::capture(
            r.store(),
            r.applied(),
            r.lease(),
            lsn,
            r.retained().cloned(),
        );
        (data, lsn)
    };
    let dir = shared.cfg.data_dir.clone();
    let path = tokio::task::spawn_blocking(move || snapshot::write(&dir, &data))
        .await
        .map_err(|e| StorageError::Failed(e.to_string()))??;
    shared.wal.lock().expect("wal lock").wal.prune_before(lsn)?;
    info!(path = %path.display(), "snapshot written; log pruned");
    Ok(path)
}
