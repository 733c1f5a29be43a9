//! The node: one site's server, driving the sans-IO [`Replica`](crate::replica::Replica) with tokio and quinn.
//!
//! [`Node::start`] binds one QUIC endpoint that serves peers (ALPN `causalkv-peer/2`) and clients
//! (ALPN `causalkv-client/2`) and dials every peer. Tasks:
//!
//! - the accept loop, which hands each connection to [`super::peer`] or [`super::service`];
//! - one outbound link per peer ([`super::peer::run_outbound`]), which sends this site's update
//!   stream, pulled from the replica's retained log;
//! - the ticker, the durability pump and the snapshotter ([`super::tasks`]);
//! - the follower of the replicated cluster configuration, which takes each committed change
//!   as it applies;
//! - the admin HTTP server ([`super::admin`]), when `admin_addr` is configured;
//! - the RESP listener ([`super::resp`]), when `[resp]` is configured.
//!
//! Peer state (`up`, `suspect`, `down`, each with a reason) comes from a phi-accrual detector
//! per peer ([`super::failure`]) fed by the heartbeats and acks of the peer's control streams,
//! combined with the state of the outbound link.
//!
//! All replica mutations go through [`Shared::mutate`](super::shared::Shared::mutate), the one place that persists the records a
//! mutation produced, marks them durable, wakes the peer senders and tells waiting requests that
//! `applied` moved.
//!
//! Shutdown follows mini-redis: a `watch` flag tells every task to stop; in-flight client requests
//! are drained (bounded by `timeouts.drain_ms`), state is flushed, and the endpoint closes every
//! connection with [`close_code::SHUTDOWN`].

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use quinn::{Endpoint, VarInt};
use tokio::sync::{Notify, watch};
use tracing::{Instrument, debug, info, info_span, warn};

use super::credentials::{LoadedCert, LoadedTls, ReloadError};
use super::durability::{DurableWaiters, WalState};
use super::error::NodeError;
use super::failure::PhiAccrual;
use super::metrics::Metrics;
use super::peer_state::PeerState;
use super::recovery::recover;
use super::shared::{Shared, now_micros};
use super::tasks::{durability_pump, snapshotter, take_snapshot, ticker};
use crate::config::SiteConfig;
use crate::consensus::members::MAX_SITES;
use crate::replica::ReplicaConfig;
use crate::storage::Store;
use crate::storage::wal::StorageError;
use crate::tls;
use crate::wire::{StatusInfo, close_code};

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
    /// Whether reads hand back the context their value was written under (see
    /// [`ReplicaConfig::close_contexts`]). Only tests switch it off, to show the bug it guards.
    pub close_contexts: bool,
    /// Test-only switches of the strong operations, to plant the bugs their tests catch
    /// (reads from a follower's local state, strong reads without their causal context).
    pub strong: super::strong::StrongOptions,
    /// Whether the survivors of a site removed while dead relay its updates to each other up
    /// to the cut. Only tests switch it off, to show the survivors then miss them.
    pub relay: bool,
    /// Whether pruning waits while a peer counts a site this node does not count yet (see
    /// [`ReplicaConfig::hold_for_added`]). Only tests switch it off, to show that a site added
    /// to the cluster then misses updates of an origin that applied the change late.
    pub hold_for_added: bool,
    /// Test-only: while a file named [`HOLD_SITES_FILE`] is in the data directory, this node
    /// applies no configuration that adds sites (it lags on the change as a node cut off from
    /// the Raft leader would). Tests use it to stage the join's retention race. Likewise,
    /// while a file named [`HOLD_FLOOR_FILE`] is there, a snapshot this node serves to a
    /// joining site waits after its copy before taking the floor (so that updates applied
    /// meanwhile put the floor past the snapshot, as a long copy under load does).
    pub hold_sites: bool,
}

/// The file whose presence in the data directory holds back added sites when
/// [`NodeOptions::hold_sites`] is set (tests only).
pub const HOLD_SITES_FILE: &str = "test-hold-sites";

/// The file whose presence in the data directory holds a snapshot served to a joining site
/// before it takes the floor, when [`NodeOptions::hold_sites`] is set (tests only).
pub const HOLD_FLOOR_FILE: &str = "test-hold-floor";

impl Default for NodeOptions {
    fn default() -> Self {
        Self {
            check_deps: true,
            check_stable: true,
            close_contexts: true,
            strong: Default::default(),
            relay: true,
            hold_for_added: true,
            hold_sites: false,
        }
    }
}

/// A running site.
pub struct Node {
    shared: Arc<Shared>,
    endpoint: Endpoint,
    admin: Option<SocketAddr>,
    resp: Option<SocketAddr>,
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
    pub async fn start_with(mut cfg: SiteConfig, opts: NodeOptions) -> Result<Node, NodeError> {
        cfg.validate()?;
        tls::install_crypto_provider();
        // The strong-operation voter first: partition index 0's group holds the cluster
        // configuration, and once it has one, that (not the file's `[[sites]]`) says which
        // sites there are and where.
        let strong = super::strong::Strong::start(&cfg, opts.strong)
            .await
            .map_err(|e| NodeError::Recovery(format!("consensus: {e}")))?;
        let stop_on_error = StopOnError(Some(strong.clone()));
        if let Some(m) = strong.membership() {
            adopt_sites(&mut cfg, &m)?;
            strong.set_names(cfg.sites.iter().map(|s| s.name.clone()).collect());
        }
        let transport = cfg.transport_limits();
        // No site-name check at start: a misnamed certificate is refused by the peers' hello
        // check instead, with the reason logged there.
        let (loaded, server) = match LoadedTls::load(&cfg, &transport, None) {
            Ok(l) => l,
            Err(ReloadError::Tls(e)) => return Err(e.into()),
            // Without a site check only TLS errors arise; anything else is still a failed start.
            Err(e) => return Err(NodeError::Recovery(e.to_string())),
        };
        // Before the UDP endpoint: if this fails, nothing is left bound.
        let admin_listener = match cfg.admin_addr {
            Some(addr) => Some(
                super::admin::bind(addr)
                    .await
                    .map_err(|source| NodeError::Bind { addr, source })?,
            ),
            None => None,
        };
        let resp_listener = match &cfg.resp {
            Some(r) => Some(
                super::resp::bind(r.addr)
                    .await
                    .map_err(|source| NodeError::Bind {
                        addr: r.addr,
                        source,
                    })?,
            ),
            None => None,
        };
        let addr = cfg.listen_addr();
        let socket =
            super::socket::bind_udp(addr).map_err(|source| NodeError::Bind { addr, source })?;
        let (runtime, released) = super::socket::tracked_runtime();
        let mut endpoint_config = transport.endpoint_config()?;
        // After a crash and restart, a packet of a connection the previous run had is answered
        // with a reset the sender accepts, so peers, siblings and clients redial at once.
        endpoint_config.reset_key(loaded.identity.stateless_reset_key());
        let endpoint = Endpoint::new(endpoint_config, Some(server), socket, runtime)
            .map_err(|source| NodeError::Bind { addr, source })?;
        // A site joining a running cluster fetches its first state from another site before
        // it recovers from it (see `super::join`).
        if let Err(e) = super::join::fetch(&cfg, &endpoint, &loaded).await {
            endpoint.close(VarInt::from_u32(close_code::SHUTDOWN), b"join failed");
            return Err(e);
        }
        let floor = super::join::recorded_floor(&cfg.data_dir)?;
        let mut rc =
            ReplicaConfig::new(cfg.site_id, cfg.n()).with_partition(cfg.partition, cfg.partitions);
        rc.marker_interval = cfg.replication.marker_interval_ms * 1000;
        rc.check_deps = opts.check_deps;
        rc.check_stable = opts.check_stable;
        rc.close_contexts = opts.close_contexts;
        rc.hold_for_added = opts.hold_for_added;
        // Recovery reads the snapshot and scans the whole log: blocking work, kept off the
        // runtime's threads (on a `current_thread` runtime it would stall every other task).
        let (cfg, (mut replica, wal)) = tokio::task::spawn_blocking(move || {
            let recovered = recover(&cfg, rc);
            recovered.map(|r| (cfg, r))
        })
        .await
        .map_err(|e| NodeError::Recovery(e.to_string()))??;
        if let Some(floor) = floor {
            replica.set_floor(floor);
        }
        let synced = wal.synced();
        let wal_stats = wal.stats();
        let durable_waiters = DurableWaiters::new(wal.synced_lsn());
        stop_on_error.disarm();
        let (shutdown_tx, shutdown) = watch::channel(false);
        let n = cfg.n();
        let shared = Arc::new(Shared {
            replica: Mutex::new(replica),
            changed: watch::channel(0).0,
            // Room for every site the cluster may add while this node runs.
            peer_wake: (0..MAX_SITES).map(|_| Notify::new()).collect(),
            peer_redial: (0..MAX_SITES).map(|_| Notify::new()).collect(),
            sibling_redial: (0..cfg.partitions).map(|_| Notify::new()).collect(),
            sibling_waiting: (0..cfg.partitions).map(|_| Default::default()).collect(),
            sibling_kick: Notify::new(),
            waiting_requests: AtomicUsize::new(0),
            peers: (0..MAX_SITES)
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
            tls: RwLock::new(Arc::new(loaded)),
            reloading: tokio::sync::Mutex::new(()),
            transport,
            wal: Mutex::new(WalState {
                wal,
                pending: Default::default(),
            }),
            synced,
            wal_stats,
            durable_waiters,
            strong,
            changes: super::shared::Changes {
                hold_floor: opts.hold_sites,
                ..super::shared::Changes::new(opts.relay)
            },
            sites: RwLock::new(Arc::new(cfg.sites.clone())),
            snapshotting: tokio::sync::Mutex::new(()),
            cfg,
        });
        {
            // The RPCs about the replica (a dead site's cut, relaying its updates).
            let weak = Arc::downgrade(&shared);
            shared.strong.set_local(Box::new(move |rpc| {
                weak.upgrade()
                    .and_then(|s| super::membership::answer(&s, rpc))
            }));
        }
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
            tokio::spawn(
                shared
                    .strong
                    .clone()
                    .watch(shared.shutdown.clone())
                    .instrument(span.clone()),
            ),
            tokio::spawn(
                follow_sites(shared.clone(), endpoint.clone(), opts.hold_sites)
                    .instrument(span.clone()),
            ),
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
            info!(parent: &span, admin = ?addr, "admin endpoints: GET /metrics, GET /status, POST /reload");
            admin = addr;
            tasks.push(tokio::spawn(
                super::admin::serve(shared.clone(), listener, endpoint.clone())
                    .instrument(span.clone()),
            ));
        }
        let mut resp = None;
        if let Some(listener) = resp_listener {
            resp = listener.local_addr().ok();
            let require = shared
                .cfg
                .resp
                .as_ref()
                .is_some_and(|r| r.require_client_cert);
            if require {
                info!(parent: &span, resp = ?resp, "RESP listener (TLS, client certificates required)");
            } else {
                warn!(parent: &span, resp = ?resp, "RESP listener (TLS) accepts clients WITHOUT a certificate (resp.require_client_cert = false)");
            }
            tasks.push(tokio::spawn(
                super::resp::serve(shared.clone(), listener).instrument(span.clone()),
            ));
        }
        Ok(Node {
            shared,
            endpoint,
            admin,
            resp,
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

    /// The address the RESP listener is bound to, if one is configured (`[resp]`).
    pub fn resp_addr(&self) -> Option<SocketAddr> {
        self.resp
    }

    /// The metrics in the Prometheus text format, as `GET /metrics` serves them.
    pub fn metrics_text(&self) -> String {
        super::admin::render_metrics(&self.shared)
    }

    /// Reloads the site's CA, certificate and key from the configured files (what `SIGHUP` and
    /// `POST /reload` do): new connections, inbound and outbound, use them; established ones
    /// continue. A certificate or CA that fails to load, does not verify against the CA or
    /// names another site is rejected (logged and returned) and the previous ones stay in
    /// force. Returns the site certificate now in force.
    pub async fn reload_tls(&self) -> Result<LoadedCert, ReloadError> {
        super::reload::reload(&self.shared, &self.endpoint).await
    }

    /// The certificates in force (the site's own, the first CA certificate).
    pub fn certificates(&self) -> Vec<LoadedCert> {
        self.shared.tls().certs.clone()
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
        let handle = shared.wal.lock().expect("wal lock").wal.sync_handle();
        let synced = tokio::task::spawn_blocking(move || handle.sync()).await;
        match synced {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => tracing::error!(parent: &span, error = %e, "final fsync failed"),
            Err(e) => tracing::error!(parent: &span, error = %e, "final fsync did not run"),
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
        // 3. Stop the Raft voter, every task, and close the connections.
        shared.strong.shutdown().await;
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

/// Follows the replicated cluster configuration as this node's group applies it: takes the
/// site names live, counts every added site at once (site table, replica vectors, retention)
/// and starts the link to it, and logs each change. This is the one place where a node reacts
/// to a committed change of the site set while it runs.
async fn follow_sites(shared: Arc<Shared>, endpoint: Endpoint, hold_sites: bool) {
    let mut sites = shared.strong.watch_sites();
    let mut shutdown = shared.shutdown.clone();
    loop {
        let now = sites.borrow_and_update().clone();
        if let Some(m) = &now
            && hold_sites
            && m.sites.len() > shared.n()
            && shared.held(HOLD_SITES_FILE).await
        {
            // Test-only (NodeOptions::hold_sites): lag on a change that adds sites until the
            // file is gone, polled (the test removes it).
            info!(
                epoch = m.epoch,
                "holding back a configuration that adds sites (test switch)"
            );
            while shared.held(HOLD_SITES_FILE).await {
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(50)) => {}
                    _ = shutdown.changed() => return,
                }
            }
            continue;
        }
        if let Some(m) = now {
            adopt_added(&shared, &endpoint, &m);
            shared
                .strong
                .set_names(m.sites.iter().map(|s| s.name.clone()).collect());
            let members: Vec<String> = m
                .sites
                .iter()
                .map(|s| format!("{}={}", s.name, s.state.as_str()))
                .collect();
            info!(epoch = m.epoch, ?members, "cluster configuration applied");
            super::membership::follow(&shared, &m);
        }
        tokio::select! {
            r = sites.changed() => if r.is_err() { return },
            _ = shutdown.changed() => return,
        }
    }
}

/// Counts the sites of `m` this node does not count yet (added since it started) and dials
/// each. A site this node's file lists under the same id and name is reached at the file's
/// address (as at a restart, see [`adopt_sites`]), any other at its replicated address.
fn adopt_added(
    shared: &Arc<Shared>,
    endpoint: &Endpoint,
    m: &crate::consensus::members::Membership,
) {
    let mut entries = m.site_entries();
    for e in &mut entries {
        if let Some(f) = shared
            .cfg
            .sites
            .iter()
            .find(|f| f.id == e.id && f.name == e.name)
        {
            e.addr = f.addr;
            e.partition_addrs = f.partition_addrs.clone();
        }
    }
    for added in shared.add_sites(&entries) {
        info!(epoch = m.epoch, site = %added.name, id = added.id, addr = %added.addr,
            "site added to the cluster: counting it and linking to it");
        if added.id != shared.site() {
            tokio::spawn(
                super::peer::run_outbound(shared.clone(), endpoint.clone(), added.id)
                    .in_current_span(),
            );
        }
    }
}

/// Stops the strong-operation voter of a start that fails after it was started.
struct StopOnError(Option<Arc<super::strong::Strong>>);

impl StopOnError {
    fn disarm(mut self) {
        self.0 = None;
    }
}

impl Drop for StopOnError {
    fn drop(&mut self) {
        if let Some(s) = self.0.take() {
            tokio::spawn(async move { s.shutdown().await });
        }
    }
}

/// Takes the sites of the replicated cluster configuration `m` over the file's `[[sites]]`
/// (which seed only the very first start), and checks the result.
///
/// The configuration says which sites there are (ids, names, states) and where each listens.
/// A site the file lists under the same id and name keeps the file's addresses: they are how
/// this node reaches it (a private address, a relay in front of it), which may differ from
/// site to site. A site the file does not list (added since) is reached at its replicated
/// address.
fn adopt_sites(
    cfg: &mut SiteConfig,
    m: &crate::consensus::members::Membership,
) -> Result<(), NodeError> {
    let mut sites = m.site_entries();
    let mut differ = sites.len() != cfg.sites.len();
    for s in &mut sites {
        match cfg.sites.iter().find(|f| f.id == s.id && f.name == s.name) {
            Some(f) => {
                s.addr = f.addr;
                s.partition_addrs = f.partition_addrs.clone();
            }
            None => differ = true,
        }
    }
    if differ {
        warn!(
            epoch = m.epoch,
            replicated = sites.len(),
            file = cfg.sites.len(),
            "the configuration file's [[sites]] differ from the replicated cluster configuration; \
             the replicated one is the truth (the file's list seeds only the first start)"
        );
    }
    cfg.sites = sites;
    let removed: Vec<u16> = m
        .sites
        .iter()
        .filter(|s| s.state.is_removed())
        .map(|s| s.id)
        .collect();
    cfg.validate_removed(&removed).map_err(|e| {
        NodeError::Recovery(format!(
            "the replicated cluster configuration (epoch {}) does not fit this node's file: {e}",
            m.epoch
        ))
    })
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::SiteEntry;
    use crate::consensus::members::{Membership, SitesOp};

    /// A removed site keeps its id and name, but its address is free again: a site added there
    /// afterwards must not stop the nodes that know both from starting.
    #[test]
    fn a_site_added_at_a_removed_sites_address_does_not_stop_a_restart() {
        let addr = |port: u16| std::net::SocketAddr::from(([127, 0, 0, 1], port));
        let mut cfg: SiteConfig = toml::from_str(
            r#"
cluster_id = "t"
site_id = 0
data_dir = "d"
[[sites]]
id = 0
name = "a"
addr = "127.0.0.1:7000"
[[sites]]
id = 1
name = "b"
addr = "127.0.0.1:7001"
[[sites]]
id = 2
name = "c"
addr = "127.0.0.1:7002"
[tls]
ca = "ca.pem"
cert = "a.pem"
key = "a.key"
"#,
        )
        .unwrap();
        let entries: Vec<SiteEntry> = cfg.sites.clone();
        let mut m = Some(Membership::from_entries(&entries));
        for op in [
            SitesOp::Leave {
                expected_epoch: 1,
                name: "c".into(),
            },
            SitesOp::Remove {
                expected_epoch: 2,
                name: "c".into(),
            },
            SitesOp::Add {
                expected_epoch: 3,
                name: "e".into(),
                addr: addr(7002),
            },
        ] {
            Membership::apply(&mut m, &op).unwrap();
        }
        let m = m.unwrap();
        adopt_sites(&mut cfg, &m).expect("a removed site's address is free again");
        assert_eq!(cfg.sites.len(), 4);
        assert_eq!(
            (cfg.sites[3].name.as_str(), cfg.sites[3].addr),
            ("e", addr(7002))
        );
        // Two sites that are members at one address are still refused.
        cfg.sites[1].addr = addr(7000);
        assert!(adopt_sites(&mut cfg, &m).is_err());
    }
}
