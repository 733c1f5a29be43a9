//! [`Shared`]: the state a node's tasks share, and [`Shared::mutate`], the one place replica
//! state changes (apply, log, ask for the fsync, wake senders and waiting requests).

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{SystemTime, UNIX_EPOCH};

use tokio::sync::{Notify, watch};

use super::credentials::LoadedTls;
use super::durability::{DurableWaiters, WalState, append_ready};
use super::metrics::Metrics;
use super::peer_state::PeerState;
use crate::clock::{SiteId, Timestamp};
use crate::config::{SiteConfig, SiteEntry};
use crate::consensus::members::MAX_SITES;
use crate::replica::Replica;
use crate::storage::MemStore;
use crate::storage::wal::{self, StorageError};
use crate::tls::TransportLimits;

/// State shared by a node's tasks.
pub(crate) struct Shared {
    /// The configuration this node started with. Its `sites` are the sites at the start; the
    /// live table is [`Shared::sites`], which grows as sites are added.
    pub cfg: SiteConfig,
    /// The sites this node counts now, in id order: the start's, then every site the
    /// replicated cluster configuration added since ([`Shared::add_sites`]). Per-peer tables
    /// below have room for [`MAX_SITES`], so a site added live needs no reallocation.
    pub sites: RwLock<Arc<Vec<SiteEntry>>>,
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
    /// Per partition of this site: the same for the link to that sibling. Partitions of a
    /// restarting site start one after another, so the first dials a sibling that is not
    /// listening yet; without this its handshake waits for QUIC's first probe (about 1 s),
    /// and the site's stable vector with it.
    pub sibling_redial: Vec<Notify>,
    /// Per partition of this site: that sibling's latest contribution said it waits on the
    /// site's stable vector, so the link to it sends each change of this partition's
    /// contribution at once (otherwise only writes go at once, the rest at the heartbeat).
    pub sibling_waiting: Vec<std::sync::atomic::AtomicBool>,
    /// Wakes the sibling links: a sibling started waiting, or a request here did.
    pub sibling_kick: Notify,
    /// Requests waiting for causal readiness ([`super::service::wait_for`]): while above zero,
    /// this partition tells its siblings it waits.
    pub waiting_requests: AtomicUsize,
    pub peers: Vec<Mutex<PeerState>>,
    pub metrics: Metrics,
    pub shutdown: watch::Receiver<bool>,
    pub inflight: AtomicUsize,
    /// Set when a graceful shutdown begins: new requests are refused (clients fail over) while
    /// in-flight ones finish and the update streams drain to peers.
    pub draining: std::sync::atomic::AtomicBool,
    pub drained: Notify,
    /// The TLS credentials in force. Read (one `Arc` clone under a read lock) on every peer
    /// dial and metrics render; replaced as a whole by a reload ([`super::reload`]).
    pub tls: RwLock<Arc<LoadedTls>>,
    /// Held for the duration of a reload, so that concurrent reloads install in load order.
    pub reloading: tokio::sync::Mutex<()>,
    pub transport: TransportLimits,
    /// The write-ahead log and the commits waiting for its fsync. Locked only while the replica
    /// lock is held (lock order: replica, then wal), so log order is apply order.
    pub wal: Mutex<WalState>,
    /// The log's synced LSN.
    pub synced: watch::Receiver<u64>,
    /// The log's group-commit figures (readable without the wal lock).
    pub wal_stats: Arc<wal::WalStats>,
    /// Requests waiting for durability, completed by the durability pump.
    pub durable_waiters: DurableWaiters,
    /// Held while a snapshot is taken (the snapshotter, [`crate::Node::snapshot`], a joining
    /// site's request): one at a time.
    pub snapshotting: tokio::sync::Mutex<()>,
    /// This node's voter in its partition's Raft group (strong operations).
    pub strong: Arc<super::strong::Strong>,
    /// The removals of sites this node takes part in (see `super::membership`).
    pub changes: Changes,
}

/// Physical time for the hybrid logical clock, in microseconds since the Unix epoch.
pub fn now_micros() -> Timestamp {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as Timestamp)
}

impl Shared {
    /// The TLS credentials in force now.
    pub fn tls(&self) -> Arc<LoadedTls> {
        self.tls.read().expect("tls lock poisoned").clone()
    }

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
    /// in front of every local write; the origin's ack waits for that group commit. (A
    /// partition's contribution to the stable vector counts received updates, so visibility
    /// across partitions does not wait for it either.)
    pub fn mutate_deferred<T>(&self, f: impl FnOnce(&mut Replica<MemStore>) -> T) -> (T, u64) {
        self.mutate_with(false, f)
    }

    fn mutate_with<T>(&self, sync: bool, f: impl FnOnce(&mut Replica<MemStore>) -> T) -> (T, u64) {
        let mut r = self.replica.lock().expect("replica lock poisoned");
        let out = f(&mut r);
        let mut w = self.wal.lock().expect("wal lock poisoned");
        let lsn = append_ready(&mut r, &mut w, sync);
        drop(w);
        drop(r);
        self.changed.send_modify(|v| *v = v.wrapping_add(1));
        self.wake_peers();
        (out, lsn)
    }

    /// Waits until the write-ahead log is durable up to `lsn`.
    pub async fn wait_durable(&self, lsn: u64) -> Result<(), StorageError> {
        if lsn == u64::MAX {
            return Err(StorageError::SyncStopped);
        }
        // Already durable (always so under `never`): no need to wait for the pump.
        if *self.synced.borrow() >= lsn {
            return Ok(());
        }
        self.durable_waiters.wait(lsn).await
    }

    pub fn wake_peers(&self) {
        for w in self.peer_wake.iter().take(self.n()) {
            w.notify_one();
        }
    }

    /// Reads the replica.
    pub fn read<T>(&self, f: impl FnOnce(&Replica<MemStore>) -> T) -> T {
        f(&self.replica.lock().expect("replica lock poisoned"))
    }

    /// Test-only ([`NodeOptions::hold_sites`](super::NodeOptions::hold_sites)): whether the
    /// data directory holds the hold file `name` ([`HOLD_SITES_FILE`](super::HOLD_SITES_FILE)
    /// or [`HOLD_FLOOR_FILE`](super::HOLD_FLOOR_FILE)).
    pub async fn held(&self, name: &str) -> bool {
        tokio::fs::try_exists(self.cfg.data_dir.join(name))
            .await
            .unwrap_or(false)
    }

    pub fn is_shutting_down(&self) -> bool {
        self.draining.load(Ordering::SeqCst) || *self.shutdown.borrow()
    }

    /// The name of site `id` (`?` for an id this node does not count).
    pub fn site_name(&self, id: SiteId) -> String {
        self.sites
            .read()
            .expect("sites lock")
            .get(id as usize)
            .map_or_else(|| "?".into(), |s| s.name.clone())
    }

    /// The sites this node counts now.
    pub fn site_table(&self) -> Arc<Vec<SiteEntry>> {
        self.sites.read().expect("sites lock").clone()
    }

    /// Number of sites this node counts now.
    pub fn n(&self) -> usize {
        self.sites.read().expect("sites lock").len()
    }

    /// The address of `site`'s node for this node's partition.
    pub fn peer_addr(&self, site: SiteId) -> std::net::SocketAddr {
        self.sites.read().expect("sites lock")[site as usize].partition_addr(self.cfg.partition)
    }

    /// Counts the sites `entries` adds after the ones counted now (ids go on from the current
    /// count; entries this node counts already are left as they are): the site table, then the
    /// replica's vectors. Returns the added sites. Never shrinks, never beyond [`MAX_SITES`].
    ///
    /// The replica counts them before the table does: a joining site's hello (and its snapshot
    /// request) is checked against the table, so by the time this node serves the new site a
    /// snapshot, every vector it acks with is of the new length, which is what keeps an origin
    /// that has not applied the change yet from pruning what the snapshot lacks (see
    /// [`Replica::on_peer_counts`](crate::replica::Replica::on_peer_counts)). Only the
    /// configuration follower calls this, one change at a time.
    pub fn add_sites(&self, entries: &[SiteEntry]) -> Vec<SiteEntry> {
        let have = self.n();
        let added: Vec<SiteEntry> = entries
            .iter()
            .filter(|e| e.id as usize >= have && (e.id as usize) < MAX_SITES)
            .cloned()
            .collect();
        if added.is_empty() {
            return added;
        }
        let n = have + added.len();
        self.mutate(|r| r.add_sites(n));
        let mut table = self.sites.write().expect("sites lock");
        let mut next = (**table).clone();
        next.extend(added.iter().cloned());
        *table = Arc::new(next);
        added
    }

    /// Write-ahead log figures: `(fsyncs, bytes on disk)`.
    pub fn wal_stats(&self) -> (u64, u64) {
        let w = self.wal.lock().expect("wal lock");
        (w.wal.fsyncs(), w.wal.disk_bytes())
    }
}

/// What a node keeps about the removals it takes part in.
pub(crate) struct Changes {
    /// Whether this node relays removed dead sites' updates (only tests switch it off).
    pub relay: bool,
    /// This site is leaving: client writes are refused.
    pub leaving: AtomicBool,
    /// This site was removed: it serves no one any more.
    pub removed: AtomicBool,
    /// Some site was removed while dead: requests check their context for lost updates.
    pub has_dead: AtomicBool,
    /// Test-only ([`NodeOptions::hold_sites`](super::NodeOptions::hold_sites)): a snapshot
    /// served to a joining site waits before taking its floor while
    /// [`HOLD_FLOOR_FILE`](super::HOLD_FLOOR_FILE) is in the data directory.
    pub hold_floor: bool,
}

impl Changes {
    pub fn new(relay: bool) -> Changes {
        Changes {
            relay,
            leaving: AtomicBool::new(false),
            removed: AtomicBool::new(false),
            has_dead: AtomicBool::new(false),
            hold_floor: false,
        }
    }
}
