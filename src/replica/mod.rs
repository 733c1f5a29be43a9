//! The sans-IO replication core: one site's protocol state, with no tokio, no sockets, no wall
//! clock and no randomness inside.
//!
//! A [`Replica`] is driven by calls and hands its side effects back as values, in the manner of
//! raft-rs's `Ready`:
//!
//! - [`Replica::put`], [`Replica::get`] serve clients under a causal context: they answer
//!   [`NotReady`] until `applied` covers the context, and a write gets a timestamp above every
//!   entry of the context, so a causally later write also wins last-writer-wins.
//! - [`Replica::receive`] takes items from an origin's ordered update stream. An update waits in
//!   the [`DependencyBuffer`] until `applied` covers its deps; then it is merged by LWW (a losing
//!   update still advances `applied[origin]`). Duplicates (`ts <= received[origin]`) are dropped,
//!   so a resend after a reconnect is harmless.
//! - [`Replica::tick`] passes time in: an idle site issues a clock marker so receivers can advance
//!   its entry, and stable tombstones are collected.
//! - [`Replica::poll_batch`] pulls the next batch for one peer from the retained log, starting at
//!   the peer's `applied` entry for this site (learnt from its hello), so a lagging peer costs log
//!   space, never an unbounded queue.
//! - [`Replica::take_ready`] returns the [`Record`]s to persist; the driver makes them durable and
//!   calls [`Replica::advance`]. Only durable state is acked to peers or sent to them.
//! - [`Replica::on_peer_applied`] takes a peer's durable `applied` vector (hello, ack, heartbeat):
//!   it feeds retention (the site's own updates are kept until every peer has them), the stable
//!   vector and synchronous replication.
//! - [`Replica::on_peer_counts`] takes how many sites a peer counts (the length of the vectors
//!   it sends): while some peer counts a site this replica does not count yet, nothing is
//!   pruned (see *Retention while a site is added* below).
//!
//! # Retention while a site is added
//!
//! A site `d` added to the cluster loads a snapshot of a source site `S` and then asks every
//! origin `X` to resend its stream from the snapshot's `applied[X]` on; `X` keeps its updates
//! for `d` from the moment it counts `d` ([`Replica::add_sites`]). Each site applies the
//! configuration change that adds `d` on its own schedule, and `X` may lag (cut off from the
//! Raft leader): if `S` took its snapshot before applying an update `u` of `X`, and `X` did
//! not count `d` yet when the old members acked `u`, `X` would prune `u` and `d` would never
//! get it. So a replica prunes nothing while any peer reports counting more sites than it
//! does, and once it counts them too the new site's acks (zero so far) hold the log.
//!
//! Why that is enough: `S` serves a snapshot only once it counts `d` (the hello check), so
//! any update `u` the snapshot lacks, `S` applies -- and acks -- after it counts `d`, with a
//! vector of the new length. `X` prunes `u` only once `S` acked it, so by then `X` has either
//! counted `d` itself (and keeps `u` until `d` acks it) or has seen `S` count more sites than
//! it does (and holds every pruning until it counts them too). Updates the snapshot holds
//! need no retention for `d`. No wire change was needed: acks and hellos already carry their
//! vector's length (and a hello its site count) since protocol 4. The other choices were
//! worse: a source that waits until every member applied the change before serving needs a
//! round of questions and still races with acks in flight; an origin that refuses a hello
//! asking below what it pruned makes the joiner fetch a whole snapshot again, possibly many
//! times under load. The cost here is a retained log that grows while a site lags on the
//! configuration, which it does for the same reason while the new site catches up.
//!
//! Tombstones are dropped once every entry of the stable vector (durable here, acked by every
//! peer) is at or past their timestamp: per-origin FIFO plus markers guarantee that no older
//! write to the key can still arrive, and every site has applied the delete.
//!
//! A site split into partitions ([`ReplicaConfig::partitions`] > 1) runs one replica per
//! partition, each with its own per-origin streams, and `applied` only speaks for this
//! partition's keys. Visibility across partitions follows Cure (Akkoorath et al., ICDCS 2016):
//!
//! - A partition's [`Replica::contribution`] is, per origin, how far it has *received* that
//!   origin's stream; the site's stable vector ([`Replica::site_stable`]) is the entry-wise
//!   minimum of every partition's contribution, which the driver exchanges between partitions
//!   as it changes ([`Replica::on_sibling`]).
//! - A remote update becomes visible only once the stable vector covers its deps: everything it
//!   depends on has reached every partition of the site, and so has the origin's stream up to
//!   the update itself (its commit vector, in Cure's terms). The origin's partitions issue a
//!   clock marker as soon as a sibling reports a newer local write, so an idle partition's
//!   stream passes it at once rather than after the marker interval.
//! - Session contexts are closed under dependencies: each stored entry keeps the context it was
//!   written under ([`Entry::deps`](crate::storage::Entry)), a read returns it
//!   ([`ReadResult::deps`]), and the session merges it. [`Replica::ready_for`] then waits until
//!   both this partition's `applied` and the stable vector cover the context.
//!
//! Safety: whatever a session depends on is named in its context (closure), and a partition
//! answers only once its own `applied` covers that context, so it never returns a state older
//! than something the session depends on. The stable vector adds availability: a visible
//! update's dependencies are already at every partition, so following them never waits on the
//! network. Earlier versions counted *applied and durable* state in the contribution instead;
//! that needs no closure, but an update whose dependency sat in a sibling held the stable
//! vector until the sibling applied it, so a chain of cross-partition dependencies moved one
//! fsync and one exchange per hop, and a site replaying a backlog after a heal stalled for
//! seconds. A received claim need not be durable: after a crash the partition's `applied`
//! (what recovery rebuilt) is lower, and the reads that need what was lost wait for it.

mod buffer;

pub use buffer::DependencyBuffer;

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use bytes::Bytes;

use crate::clock::{Hlc, SiteId, Timestamp, VClock, Version};
use crate::storage::{Entry, Store};
pub use crate::update::{Item, Record, Update};

/// Copies of stream frames held per origin while they wait for their place in the stream
/// ([`Replica::receive_copy`]). Copies arrive out of order only by jitter between datagrams, a
/// few frames; a copy that finds no room is dropped, and the stream still delivers its items.
pub const COPIES_HELD: usize = 64;

/// Bytes a batch frame spends on one update besides its key, value and dependency vector (a
/// bound on the archived item's fixed fields and padding), for [`Replica::poll_batch_refs`].
pub const ITEM_OVERHEAD: usize = 64;

/// Side effects to persist, handed out by [`Replica::take_ready`].
#[derive(Debug, Default)]
pub struct Ready {
    /// Records to append to durable storage, in order.
    pub records: Vec<Record>,
    /// The `applied` vector these records bring the durable state to; pass it to
    /// [`Replica::advance`] once they are durable.
    pub applied: VClock,
    /// The clock lease these records make durable.
    pub lease: Timestamp,
}

/// A local request cannot be served yet: this site has not applied everything in the causal
/// context.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("site not causally ready: entry {site} is at {have}, the context needs {need}")]
pub struct NotReady {
    /// The first vector entry that falls short.
    pub site: SiteId,
    /// This site's `applied` entry.
    pub have: Timestamp,
    /// What the context needs.
    pub need: Timestamp,
}

/// The answer to a read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReadResult {
    /// The value, or `None` when the key is absent or deleted.
    pub value: Option<Bytes>,
    /// The version read (`None` when the key was never written, or its tombstone was collected).
    pub version: Option<Version>,
    /// The causal context the read value was written under (partitioned sites; empty
    /// otherwise). The session merges it, with `version`, into its context.
    pub deps: VClock,
}

/// Static settings of a replica.
#[derive(Clone, Debug)]
pub struct ReplicaConfig {
    /// This site's id.
    pub site: SiteId,
    /// Number of sites in the cluster.
    pub sites: usize,
    /// How long an idle site waits before sending a clock marker (microseconds).
    pub marker_interval: Timestamp,
    /// How far ahead of the last issued timestamp a clock lease reaches (microseconds).
    pub clock_lease: Timestamp,
    /// Whether remote updates wait for their dependencies. Always true in production; switching
    /// it off turns causal+ into eventual consistency, for tests that prove the checker can fail
    /// and for the eventual-mode benchmark. No configuration file can set it.
    pub check_deps: bool,
    /// Which partition of its site this replica is (`0..partitions`).
    pub partition: u32,
    /// Number of partitions per site. With more than one, a remote update waits until the
    /// site's stable vector (the entry-wise minimum over the partitions, see
    /// [`Replica::on_sibling`]) covers its deps, not just this partition's `applied`.
    pub partitions: u32,
    /// Whether a partitioned replica checks deps against the site's stable vector. Always true
    /// in production; tests switch it off to show the bug it guards (a partition then checks
    /// only its own `applied`, and exposes updates whose dependencies have not reached the
    /// site, so a session that follows them waits on the network). No configuration file can
    /// set it.
    pub check_stable: bool,
    /// Whether a read hands back the context its value was written under
    /// ([`ReadResult::deps`]). Always true in production; tests switch it off to show the
    /// checker catching the resulting bug on partitioned sites. No configuration file can set
    /// it.
    pub close_contexts: bool,
    /// Whether pruning waits while a peer counts sites this replica does not count yet
    /// ([`Replica::on_peer_counts`]). Always true in production; tests switch it off to show
    /// the race it guards (a site added to the cluster misses updates an origin that applied
    /// the change late pruned). No configuration file can set it.
    pub hold_for_added: bool,
    /// Whether a copy of a stream frame waits for its place in the stream
    /// ([`Replica::receive_copy`]). Always true in production; tests switch it off (copies are
    /// then taken as they arrive, past any gap in front of them) to show the simulation's
    /// checks catching it. No configuration file can set it.
    pub check_copy_order: bool,
}

impl ReplicaConfig {
    /// Settings for site `site` of `sites`, with defaults for the rest.
    pub fn new(site: SiteId, sites: usize) -> Self {
        Self {
            site,
            sites,
            marker_interval: 5_000,
            clock_lease: 1_000_000,
            check_deps: true,
            partition: 0,
            partitions: 1,
            check_stable: true,
            close_contexts: true,
            hold_for_added: true,
            check_copy_order: true,
        }
    }

    /// The same settings for partition `partition` of `partitions`.
    pub fn with_partition(mut self, partition: u32, partitions: u32) -> Self {
        assert!(
            partition < partitions,
            "partition {partition} out of range for {partitions} partitions"
        );
        self.partition = partition;
        self.partitions = partitions;
        self
    }

    /// True when the site is split into more than one partition.
    pub fn partitioned(&self) -> bool {
        self.partitions > 1
    }
}

/// How a site left the cluster ([`Replica::set_removed`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Removal {
    /// Decommissioned while live: every peer had acked its updates first; nothing was lost.
    Drained,
    /// Removed while dead: the survivors hold (or relay to each other) its stream up to `cut`,
    /// and whatever it wrote after that is lost.
    Dead {
        /// The most of its stream any survivor held.
        cut: Timestamp,
    },
}

impl Removal {
    /// The timestamp past which nothing of the removed site can arrive anywhere.
    pub fn cut(self) -> Timestamp {
        match self {
            Removal::Drained => 0,
            Removal::Dead { cut } => cut,
        }
    }
}

/// A session's context names updates of a site removed while dead beyond what the survivors
/// held: they died with it, and no site will ever cover the context.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error(
    "Lost {{ site: {site}, have: {have}, need: {need} }}: the session saw updates of site {site} \
     up to {need}, but that site was removed while dead and the survivors hold its updates only \
     up to {have}"
)]
pub struct Lost {
    /// The removed site.
    pub site: SiteId,
    /// The cut: the most of its stream the survivors hold.
    pub have: Timestamp,
    /// What the context names.
    pub need: Timestamp,
}

/// Counters a replica keeps about itself.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ReplicaStats {
    /// Remote updates applied.
    pub remote_applied: u64,
    /// Remote updates that lost LWW against what was already stored.
    pub remote_lost_lww: u64,
    /// Remote items dropped as duplicates.
    pub duplicates: u64,
    /// Items that had to wait in the dependency buffer.
    pub buffered_total: u64,
    /// Tombstones collected.
    pub tombstones_collected: u64,
    /// Own updates pruned from the retained log after every peer acked them.
    pub pruned: u64,
    /// Copies of stream frames ([`Replica::receive_copy`]) that delivered an item before its
    /// stream did.
    pub copies_used: u64,
    /// Copies held because they arrived ahead of their place in the stream.
    pub copies_held: u64,
}

/// One site's replication state.
pub struct Replica<S: Store> {
    cfg: ReplicaConfig,
    store: S,
    hlc: Hlc,
    /// Every update from `j` with `ts <= applied[j]` is applied here.
    applied: VClock,
    /// Highest timestamp received (buffered or applied) per origin, for duplicate detection.
    received: VClock,
    /// The `applied` vector as of the last [`Replica::advance`]: what is durable.
    durable: VClock,
    lease: Timestamp,
    durable_lease: Timestamp,
    buffer: DependencyBuffer,
    /// This site's own updates, oldest first, kept until every peer has acked them.
    retained: VecDeque<Update>,
    /// Per peer: the last timestamp of this site sent on the current connection.
    sent: Vec<Timestamp>,
    /// Per peer: its latest durable `applied` vector.
    peer_applied: Vec<VClock>,
    /// The most sites any peer reported counting ([`Replica::on_peer_counts`]): while above
    /// `cfg.sites`, nothing is pruned.
    peers_count: usize,
    /// Per partition of this site: its latest reported contribution to the stable vector
    /// ([`Replica::contribution`]); this partition's own slot is unused.
    siblings: Vec<VClock>,
    tombstones: BTreeSet<(Version, Bytes)>,
    /// Per site: how it was removed from the cluster, if it was ([`Replica::set_removed`]).
    /// It is no longer a peer (retention, the stable vector and synchronous replication leave
    /// it out); its entry stops counting for tombstone collection once the stable vector has
    /// reached its cut.
    gone: Vec<Option<Removal>>,
    /// Per remote origin: its updates applied here, oldest first, kept until every other
    /// member has them, so that if the origin dies its updates can be relayed to the members
    /// that missed them ([`Replica::relay_batch`]).
    relayed: Vec<VecDeque<Update>>,
    /// Per remote origin: `relayed` holds every update of it applied here above this timestamp
    /// (below it, a restart from a snapshot may have left gaps).
    relayed_from: Vec<Timestamp>,
    /// Per remote origin: copies of its stream frames that arrived ahead of their place
    /// ([`Replica::receive_copy`]), by the timestamp of the item they follow; at most
    /// [`COPIES_HELD`] each.
    copies: Vec<BTreeMap<Timestamp, Vec<Item>>>,
    /// While above zero, tombstones are not collected (a snapshot is copying the store).
    tombstone_holds: u32,
    pending: Vec<Record>,
    last_marker_at: Timestamp,
    /// The timestamp of this site's newest durable update (not marker): what a sibling
    /// partition must pass on its streams at once ([`Replica::durable_write`]).
    durable_write: Timestamp,
    /// The newest marker issued to pass a sibling's write ([`Replica::urgent_marker`]).
    urgent_marker: Timestamp,
    stats: ReplicaStats,
    /// A vector every answer to a client waits for, whatever its context: a site that joined
    /// from another site's snapshot holds entries newer than the snapshot's `applied` vector
    /// (the copy ran while that site kept applying), whose dependencies may not have arrived
    /// yet; it serves only once it has caught up past the end of the copy
    /// ([`Replica::set_floor`]).
    floor: VClock,
}

impl<S: Store> Replica<S> {
    /// A fresh replica over an empty `store`.
    pub fn new(cfg: ReplicaConfig, store: S) -> Self {
        let n = cfg.sites;
        assert!(
            (cfg.site as usize) < n,
            "site id {} out of range for {n} sites",
            cfg.site
        );
        Self {
            hlc: Hlc::new(),
            applied: VClock::zero(n),
            received: VClock::zero(n),
            durable: VClock::zero(n),
            lease: 0,
            durable_lease: 0,
            buffer: DependencyBuffer::new(n),
            copies: vec![BTreeMap::new(); n],
            retained: VecDeque::new(),
            sent: vec![0; n],
            peer_applied: vec![VClock::zero(n); n],
            peers_count: n,
            siblings: vec![VClock::zero(n); cfg.partitions.max(1) as usize],
            tombstones: BTreeSet::new(),
            gone: vec![None; n],
            relayed: vec![VecDeque::new(); n],
            relayed_from: vec![0; n],
            tombstone_holds: 0,
            pending: Vec::new(),
            last_marker_at: 0,
            durable_write: 0,
            urgent_marker: 0,
            stats: ReplicaStats::default(),
            floor: VClock::default(),
            cfg,
            store,
        }
    }

    /// Rebuilds a replica from its durable records, in the order they were persisted.
    /// The records are applied to `store` (which should start empty, or hold a snapshot that the
    /// records follow).
    pub fn recover(
        cfg: ReplicaConfig,
        store: S,
        records: impl IntoIterator<Item = Record>,
    ) -> Self {
        let mut r = Self::new(cfg, store);
        for rec in records {
            r.replay(rec);
        }
        // Tombstones that came with a snapshot did not pass through a merge: register them.
        let mut tombs = Vec::new();
        r.store.for_each(&mut |k, e| {
            if e.is_tombstone() {
                tombs.push((e.version, Bytes::copy_from_slice(k)));
            }
        });
        r.tombstones.extend(tombs);
        r.received = r.applied.clone();
        r.durable = r.applied.clone();
        r.durable_lease = r.lease;
        // The newest own write still retained may not have reached the siblings' streams
        // before the crash: they are told again at once (see `durable_write`).
        r.durable_write = r.retained.back().map_or(0, |u| u.version.ts);
        r.hlc = Hlc::starting_after(r.lease.max(r.applied.get(r.cfg.site)));
        // Collected at the first tick, once peers have reported (see `tick`).
        r
    }

    /// Applies one durable record during recovery.
    pub fn replay(&mut self, rec: Record) {
        match rec {
            Record::Update(u) => {
                let origin = u.version.site;
                self.applied.raise(origin, u.version.ts);
                self.merge_into_store(&u);
                if origin == self.cfg.site && self.cfg.sites > 1 {
                    self.retained.push_back(u);
                } else if origin != self.cfg.site && self.cfg.sites > 2 {
                    self.relayed[origin as usize].push_back(u);
                }
            }
            Record::Marker { origin, ts } => {
                self.applied.raise(origin, ts);
                // Remote markers are not logged: this is a snapshot's `applied`, whose
                // updates are in the store, not in the relay log.
                if origin != self.cfg.site && (origin as usize) < self.cfg.sites {
                    let from = &mut self.relayed_from[origin as usize];
                    *from = (*from).max(ts);
                    let q = &mut self.relayed[origin as usize];
                    while q.front().is_some_and(|u| u.version.ts <= ts) {
                        q.pop_front();
                    }
                }
            }
            Record::ClockLease(ts) => self.lease = self.lease.max(ts),
        }
    }

    /// Counts `n` sites from now on (a site was added to the cluster configuration). Vectors
    /// grow at the end (ids are never reused); the new site has applied nothing, so the
    /// retained log keeps every own update from now until it acks them, and tombstones wait
    /// for it too. A count at or below the current one changes nothing.
    pub fn add_sites(&mut self, n: usize) {
        if n <= self.cfg.sites {
            return;
        }
        self.cfg.sites = n;
        self.applied = self.applied.resized(n);
        self.received = self.received.resized(n);
        self.durable = self.durable.resized(n);
        self.buffer.grow(n);
        self.copies.resize(n, BTreeMap::new());
        self.sent.resize(n, 0);
        for v in &mut self.peer_applied {
            *v = v.resized(n);
        }
        self.peer_applied.resize(n, VClock::zero(n));
        for v in &mut self.siblings {
            *v = v.resized(n);
        }
        self.gone.resize(n, None);
        self.relayed.resize(n, VecDeque::new());
        self.relayed_from.resize(n, 0);
    }

    /// Sets the vector every client request waits for besides its context (see the `floor`
    /// field): a joining site's catch-up point.
    pub fn set_floor(&mut self, floor: VClock) {
        self.floor = floor;
    }

    /// True when `applied` covers the floor ([`Replica::set_floor`]): a joined site has caught
    /// up with the snapshot it started from.
    pub fn caught_up_to_floor(&self) -> bool {
        self.applied.covers(&self.floor)
    }

    /// The entries of the floor ([`Replica::set_floor`]) that `applied` falls short of, as
    /// `(site, have, need)`; empty once [`Replica::caught_up_to_floor`].
    pub fn floor_gaps(&self) -> Vec<(SiteId, Timestamp, Timestamp)> {
        self.floor
            .as_slice()
            .iter()
            .enumerate()
            .filter_map(|(i, &need)| {
                let have = self.applied.get(i as SiteId);
                (have < need).then_some((i as SiteId, have, need))
            })
            .collect()
    }

    /// The settings.
    pub fn config(&self) -> &ReplicaConfig {
        &self.cfg
    }

    /// This site's id.
    pub fn site(&self) -> SiteId {
        self.cfg.site
    }

    /// The store.
    pub fn store(&self) -> &S {
        &self.store
    }

    /// The `applied` vector.
    pub fn applied(&self) -> &VClock {
        &self.applied
    }

    /// Per origin, the highest timestamp received (applied or waiting in the dependency
    /// buffer).
    pub fn received(&self) -> &VClock {
        &self.received
    }

    /// The durable `applied` vector: what this site acks to its peers.
    pub fn durable(&self) -> &VClock {
        &self.durable
    }

    /// The latest durable `applied` vector a peer reported.
    pub fn peer_applied(&self, peer: SiteId) -> &VClock {
        &self.peer_applied[peer as usize]
    }

    /// The stable vector: entry-wise minimum of every site's durable `applied`, i.e. what every
    /// site is known to have.
    pub fn stable(&self) -> VClock {
        let mut s = self.durable.clone();
        for p in self.peers() {
            s.meet(&self.peer_applied[p as usize]);
        }
        s
    }

    /// The dependency buffer.
    pub fn buffer(&self) -> &DependencyBuffer {
        &self.buffer
    }

    /// This site's own updates retained until every peer acks them, oldest first.
    pub fn retained(&self) -> impl Iterator<Item = &Update> {
        self.retained.iter()
    }

    /// The clock lease (see [`Record::ClockLease`]).
    pub fn lease(&self) -> Timestamp {
        self.lease
    }

    /// Number of own updates retained until every peer acks them.
    pub fn retained_len(&self) -> usize {
        self.retained.len()
    }

    /// Counters.
    pub fn stats(&self) -> &ReplicaStats {
        &self.stats
    }

    /// The other sites, removed ones left out.
    pub fn peers(&self) -> impl Iterator<Item = SiteId> + use<S> {
        let me = self.cfg.site;
        let gone: u64 = self
            .gone
            .iter()
            .enumerate()
            .filter(|(_, g)| g.is_some())
            .fold(0, |m, (i, _)| m | (1 << i));
        (0..self.cfg.sites as SiteId).filter(move |&p| p != me && gone & (1 << p) == 0)
    }

    /// Site `site` was removed from the cluster: a decommissioned one (`cut` 0, it drained
    /// its updates to every peer first) or a dead one (`cut`: the most of its stream any
    /// survivor held). From now on it is no longer a peer: retention does not keep updates
    /// for it, the stable vector and synchronous replication leave it out, and its entry stops
    /// holding tombstone collection once the stable vector reaches `cut`.
    pub fn set_removed(&mut self, site: SiteId, how: Removal) {
        if site == self.cfg.site || site as usize >= self.cfg.sites {
            return;
        }
        self.gone[site as usize] = Some(how);
        self.relayed[site as usize].shrink_to_fit();
        // The peers that still hold retention back are the others.
        self.prune();
    }

    /// How `site` was removed (`None`: it was not).
    pub fn removed(&self, site: SiteId) -> Option<Removal> {
        self.gone.get(site as usize).copied().flatten()
    }

    /// The first entry of `ctx` that names updates lost with a site removed while dead (beyond
    /// its cut): no site will ever cover such a context.
    pub fn lost(&self, ctx: &VClock) -> Option<Lost> {
        ctx.as_slice().iter().enumerate().find_map(|(i, &need)| {
            match self.gone.get(i).copied().flatten() {
                Some(Removal::Dead { cut }) if need > cut => Some(Lost {
                    site: i as SiteId,
                    have: cut,
                    need,
                }),
                _ => None,
            }
        })
    }

    /// The next batch of `origin`'s updates that this site holds after `after` (what another
    /// site has applied of `origin`): up to `max_items` of them from the relay log, oldest
    /// first, followed by a marker at this site's `applied[origin]` once nothing it holds is
    /// left. `None` when the relay log cannot serve from `after` (a restart from a snapshot
    /// left a gap there). Used to relay a dead site's updates to the survivors that missed them.
    pub fn relay_batch(
        &self,
        origin: SiteId,
        after: Timestamp,
        max_items: usize,
    ) -> Option<Vec<Item>> {
        let o = origin as usize;
        if origin == self.cfg.site || o >= self.cfg.sites {
            return Some(Vec::new());
        }
        let have = self.applied.get(origin);
        if after >= have {
            return Some(Vec::new());
        }
        if after < self.relayed_from[o] {
            return None;
        }
        let q = &self.relayed[o];
        let start = q.partition_point(|u| u.version.ts <= after);
        let end = q.len().min(start.saturating_add(max_items));
        let mut items: Vec<Item> = q.range(start..end).cloned().map(Item::Update).collect();
        let last = items.last().map_or(after, Item::ts);
        if end == q.len() && have > last {
            items.push(Item::Marker(have));
        }
        Some(items)
    }

    /// Number of remote updates kept for relaying.
    pub fn relayed_len(&self) -> usize {
        self.relayed.iter().map(VecDeque::len).sum()
    }

    /// Drops from the retained log what every peer has applied, and from the relay log what
    /// every other member has.
    fn prune(&mut self) {
        if self.retention_held() {
            // A site this replica does not count yet may need any of it (see the module doc).
            return;
        }
        let me = self.cfg.site;
        let everyone = self
            .peers()
            .map(|p| self.peer_applied[p as usize].get(me))
            .min()
            .unwrap_or(Timestamp::MAX);
        while self
            .retained
            .front()
            .is_some_and(|u| u.version.ts <= everyone)
        {
            self.retained.pop_front();
            self.stats.pruned += 1;
        }
        buffer::release_spare(&mut self.retained);
        let peers: Vec<SiteId> = self.peers().collect();
        for o in 0..self.cfg.sites {
            if o == me as usize || self.relayed[o].is_empty() {
                continue;
            }
            let floor = peers
                .iter()
                .filter(|&&p| p as usize != o)
                .map(|&p| self.peer_applied[p as usize].get(o as SiteId))
                .min()
                .unwrap_or(Timestamp::MAX);
            let q = &mut self.relayed[o];
            while q.front().is_some_and(|u| u.version.ts <= floor) {
                q.pop_front();
            }
            buffer::release_spare(q);
        }
    }

    /// Checks that this site has applied everything in `ctx`.
    pub fn ready_for(&self, ctx: &VClock) -> Result<(), NotReady> {
        if let Some((site, have, need)) = self.applied.first_gap(&self.floor) {
            return Err(NotReady { site, have, need });
        }
        if ctx.len() > self.cfg.sites {
            // Entries beyond the cluster can never be covered; report the first non-zero one.
            if let Some((i, &need)) = ctx
                .as_slice()
                .iter()
                .enumerate()
                .skip(self.cfg.sites)
                .find(|(_, v)| **v > 0)
            {
                return Err(NotReady {
                    site: i as SiteId,
                    have: 0,
                    need,
                });
            }
        }
        if self.cfg.partitioned() {
            // Every remote entry against this partition's `applied` (everything from that origin
            // up to there that belongs here is visible here) and against the site's stable
            // vector (every partition has received that much, so what the session reads next
            // anywhere at this site never waits on the network). Contexts are closed under
            // dependencies (a read hands the session the context its value was written under),
            // so together they cover what the context's updates depend on. The site's own entry
            // is always covered: a local write is applied in its partition when it is issued.
            let stable = self.site_stable();
            let me = self.cfg.site as usize;
            let gap = ctx.as_slice().iter().enumerate().find_map(|(k, &need)| {
                let have = stable.get(k as SiteId).min(self.applied.get(k as SiteId));
                (k != me && have < need).then_some(NotReady {
                    site: k as SiteId,
                    have,
                    need,
                })
            });
            return gap.map_or(Ok(()), Err);
        }
        match self.applied.first_gap(ctx) {
            None => Ok(()),
            Some((site, have, need)) => Err(NotReady { site, have, need }),
        }
    }

    /// Partitioned: the session's entry for this site, which [`Replica::ready_for`] leaves
    /// unchecked (a sibling may have issued it), names a write some partition here could have
    /// made: at most `clock_lease` past the physical clock, this partition's clock and every
    /// sibling's reported own entry. A later one (a corrupt or forged context) waits as an
    /// entry not reached yet does, and times out, rather than pushing this partition's clock,
    /// and through its markers its siblings' and peers' clocks, toward overflow. (Unpartitioned,
    /// `ready_for` holds the entry to what this replica applied.)
    fn own_entry_known(&self, now: Timestamp, ctx: &VClock) -> Result<(), NotReady> {
        if !self.cfg.partitioned() {
            return Ok(());
        }
        let me = self.cfg.site;
        let need = ctx.get(me);
        let have = self
            .siblings
            .iter()
            .map(|v| v.get(me))
            .fold(self.hlc.last().max(now), Timestamp::max);
        if need > have.saturating_add(self.cfg.clock_lease) {
            return Err(NotReady {
                site: me,
                have,
                need,
            });
        }
        Ok(())
    }

    /// This partition's contribution to its site's stable vector: per origin, the timestamp up
    /// to which every update from it that belongs to this partition has been *received* here
    /// (applied, or waiting in the dependency buffer: the stream is ordered, so nothing from
    /// that origin up to there can still arrive). The own site's entry is the durable own
    /// entry. Partitions exchange it as it changes ([`Replica::on_sibling`]).
    ///
    /// It counts received updates, not applied ones, so that no partition's claim waits on
    /// the dependencies of what it holds: with applied state, an update whose dependency sits in
    /// another partition held the stable vector until that partition applied it, and a chain of
    /// such dependencies moved one sibling exchange (and one fsync) per hop. A receiver after a
    /// heal took seconds to replay a backlog hop by hop. A claim need not be durable either: a
    /// read checks this partition's own `applied` as well as the stable vector
    /// ([`Replica::ready_for`]), so what a crash takes back is waited for, never skipped.
    pub fn contribution(&self) -> VClock {
        let me = self.cfg.site as usize;
        let mut v = self.received.resized(self.cfg.sites).into_vec();
        v[me] = self.durable.get(self.cfg.site);
        VClock::from_vec(v)
    }

    /// The site's stable vector as this partition knows it: the entry-wise minimum of every
    /// partition's contribution (this one's current, the others' latest reported). A remote
    /// update is visible only once this covers its deps. On an unpartitioned site it is
    /// `applied`.
    pub fn site_stable(&self) -> VClock {
        if !self.cfg.partitioned() {
            return self.applied.clone();
        }
        let mut s = self.contribution();
        for (q, v) in self.siblings.iter().enumerate() {
            if q != self.cfg.partition as usize {
                s.meet(v);
            }
        }
        s
    }

    /// Another partition of this site reported its contribution ([`Replica::contribution`]).
    /// Applies what the raised stable vector makes visible.
    ///
    /// The report replaces the previous one rather than being merged with it: a sibling that
    /// crashed lost what it had received, and its first report after the restart says so, so
    /// this partition stops exposing updates on the strength of what the sibling no longer has.
    /// (A report that arrives late only lowers the stable vector for a moment, which is safe.)
    ///
    /// `write`: the timestamp of the sibling's newest durable local update
    /// ([`Replica::durable_write`]). Its receivers wait until every partition's stream from here
    /// passed that update, so a partition that has not passed it yet does so now with a clock
    /// marker, rather than at its next idle marker. An advance of the sibling's own entry by
    /// markers alone asks for no such marker.
    pub fn on_sibling(&mut self, partition: u32, contribution: &VClock, write: Timestamp) {
        if partition == self.cfg.partition || partition >= self.cfg.partitions {
            return;
        }
        self.siblings[partition as usize] = contribution.resized(self.cfg.sites);
        if write > self.urgent_marker {
            let own = self.applied.get(self.cfg.site);
            // This partition's own entry may already be past the write through clock markers
            // of its own, which the links fold into their next idle marker: then that entry is
            // what must go at once, with no new marker.
            self.urgent_marker = if write > own {
                self.issue_marker(0, write.max(contribution.get(self.cfg.site)))
            } else {
                own
            };
        }
        self.wake_stable();
    }

    /// The newest clock marker issued to pass a sibling's write ([`Replica::on_sibling`]):
    /// remote readers wait for it, so a link sends it as soon as it is durable, where other
    /// markers alone wait for the link's idle interval.
    pub fn urgent_marker(&self) -> Timestamp {
        self.urgent_marker
    }

    /// The timestamp of this site's newest durable update (clock markers aside): what a
    /// sibling partition must pass on its streams ([`Replica::on_sibling`]).
    pub fn durable_write(&self) -> Timestamp {
        self.durable_write
    }

    /// Partitioned: something here waits on the site's stable vector (an update in the
    /// dependency buffer), so the siblings' contributions are wanted as soon as they change.
    pub fn waits_on_siblings(&self) -> bool {
        self.cfg.partitioned() && !self.buffer.is_empty()
    }

    /// Advances this site's own entry with a clock marker at or above `floor` (and at physical
    /// time `now` or later); its receivers learn that nothing from this partition up to there
    /// is still to come.
    fn issue_marker(&mut self, now: Timestamp, floor: Timestamp) -> Timestamp {
        let ts = self.hlc.tick(now, floor);
        if ts > self.lease {
            self.lease = ts + self.cfg.clock_lease;
            self.pending.push(Record::ClockLease(self.lease));
        }
        self.advance_entry(self.cfg.site, ts);
        ts
    }

    /// Partitioned: wakes every buffered head the current stable vector may have unblocked.
    fn wake_stable(&mut self) {
        if !self.cfg.partitioned() || self.buffer.is_empty() {
            return;
        }
        let stable = self.site_stable();
        let mut work = Vec::new();
        for k in 0..self.cfg.sites as SiteId {
            self.buffer.wake(k, stable.get(k), &mut work);
        }
        if !work.is_empty() {
            self.drain(work);
        }
    }

    /// The first entry the dependency check finds missing for update `u` from `origin`, as
    /// `(entry, need)`.
    fn missing(
        &self,
        stable: Option<&VClock>,
        u: &Update,
        origin: SiteId,
    ) -> Option<(SiteId, Timestamp)> {
        match stable {
            // Partitioned: every entry of its deps but the site's own (its writes are applied
            // when issued) against the site's stable vector, and the update's own timestamp
            // too (its commit vector, in Cure's terms): a session that reads it carries
            // `origin: ts` in its context, which every partition of the site must then have
            // received for the session's next read there not to wait on the network. The
            // origin's other partitions pass that timestamp at once: a partition that learns of
            // a sibling's write issues a marker past it (see `on_sibling`).
            Some(s) => u
                .deps
                .as_slice()
                .iter()
                .enumerate()
                .find_map(|(k, &need)| {
                    let k = k as SiteId;
                    (k != self.cfg.site && s.get(k) < need).then_some((k, need))
                })
                .or_else(|| (s.get(origin) < u.version.ts).then_some((origin, u.version.ts))),
            None => DependencyBuffer::first_missing(&self.applied, &u.deps, origin),
        }
    }

    /// Reads `key` under the causal context `ctx`.
    pub fn get(&self, key: &[u8], ctx: &VClock) -> Result<ReadResult, NotReady> {
        self.ready_for(ctx)?;
        Ok(match self.store.get(key) {
            Some(e) => ReadResult {
                value: e.value,
                version: Some(e.version),
                deps: if self.cfg.close_contexts {
                    e.deps
                } else {
                    VClock::default()
                },
            },
            None => ReadResult {
                value: None,
                version: None,
                deps: VClock::default(),
            },
        })
    }

    /// Writes `value` (or deletes, with `None`) under the causal context `ctx`, at physical time
    /// `now`. Returns the new version; the client raises `ctx[site]` to its timestamp.
    pub fn put(
        &mut self,
        now: Timestamp,
        key: Bytes,
        value: Option<Bytes>,
        ctx: &VClock,
    ) -> Result<Version, NotReady> {
        self.ready_for(ctx)?;
        self.own_entry_known(now, ctx)?;
        let ts = self.hlc.tick(now, ctx.max_entry().saturating_add(1));
        let version = Version::new(ts, self.cfg.site);
        let deps = ctx.resized(self.cfg.sites);
        let u = Update {
            key,
            value,
            version,
            deps,
        };
        self.merge_into_store(&u);
        if self.cfg.sites > 1 {
            // Kept until every peer has acked it (a lone site has no one to send it to).
            self.retained.push_back(u.clone());
        }
        self.pending.push(Record::Update(u));
        self.advance_entry(self.cfg.site, ts);
        Ok(version)
    }

    /// Takes items from `origin`'s ordered update stream. Applies what is applicable, buffers
    /// the rest, drops duplicates.
    ///
    /// An update's dependency vector may name a site this replica does not count yet (the
    /// origin applied that site's addition first; see [`Item::fit_deps`]): it waits in the
    /// buffer until [`Replica::add_sites`] counts the site and `applied` covers the
    /// dependency, like any other. Vectors grow with the configuration, so no site's entry can
    /// be covered before the site is counted.
    pub fn receive(&mut self, origin: SiteId, items: impl IntoIterator<Item = Item>) {
        if origin == self.cfg.site || origin as usize >= self.cfg.sites {
            return;
        }
        let (start, _) = self.take(origin, items);
        self.settle(origin, start);
    }

    /// Takes a copy of one frame of `origin`'s ordered update stream that came another way (a
    /// QUIC datagram, so that a packet lost on the stream does not hold up the updates behind
    /// it for a retransmission): `items` follow, on that stream, the item with timestamp
    /// `prev` directly, with nothing in between.
    ///
    /// If everything from `origin` up to `prev` has been received, the items are taken as if
    /// the stream had delivered them (those received already are duplicates). If not, the copy
    /// is held until the stream, or another copy, reaches `prev`: at most [`COPIES_HELD`] per
    /// origin, the ones furthest ahead dropped first. A copy that is never used costs nothing
    /// but its memory: the stream delivers everything anyway.
    pub fn receive_copy(&mut self, origin: SiteId, prev: Timestamp, items: Vec<Item>) {
        if origin == self.cfg.site
            || origin as usize >= self.cfg.sites
            || items
                .last()
                .is_none_or(|last| last.ts() <= self.received.get(origin))
        {
            return;
        }
        if prev > self.received.get(origin) && self.cfg.check_copy_order {
            let held = &mut self.copies[origin as usize];
            held.insert(prev, items);
            while held.len() > COPIES_HELD {
                held.pop_last();
            }
            self.stats.copies_held += 1;
            return;
        }
        let (start, new) = self.take(origin, items);
        self.stats.copies_used += u64::from(new);
        self.settle(origin, start);
    }

    /// After items from `origin` were taken (`start`: a queue that was empty got a head): takes
    /// the held copies they reached, applies what became applicable, and raises this
    /// partition's contribution to the stable vector (a new head).
    fn settle(&mut self, origin: SiteId, start: bool) {
        let start = self.take_copies(origin) | start;
        if start {
            self.drain(vec![origin]);
        }
        self.wake_stable();
    }

    /// Copies of `origin`'s stream frames held until the stream reaches their place.
    pub fn held_copies(&self, origin: SiteId) -> usize {
        self.copies.get(origin as usize).map_or(0, BTreeMap::len)
    }

    /// Takes `origin`'s items that follow what was received from it, in order, into the
    /// dependency buffer; returns whether a queue that was empty got a head, and whether any
    /// item was new.
    fn take(&mut self, origin: SiteId, items: impl IntoIterator<Item = Item>) -> (bool, bool) {
        let (mut start, mut new) = (false, false);
        for item in items {
            let ts = item.ts();
            if ts <= self.received.get(origin) {
                self.stats.duplicates += 1;
                continue;
            }
            new = true;
            self.received.raise(origin, ts);
            self.hlc.observe(ts);
            start |= self.buffer.push(origin, item);
        }
        (start, new)
    }

    /// Takes the held copies of `origin`'s frames that what was received has reached, in
    /// order, and drops those it has passed.
    fn take_copies(&mut self, origin: SiteId) -> bool {
        let mut start = false;
        while let Some(entry) = self.copies[origin as usize].first_entry() {
            if *entry.key() > self.received.get(origin) {
                break;
            }
            let items = entry.remove();
            let (s, new) = self.take(origin, items);
            self.stats.copies_used += u64::from(new);
            start |= s;
        }
        start
    }

    /// Applies every applicable head, starting from the origins in `work`, following wake-ups.
    fn drain(&mut self, mut work: Vec<SiteId>) {
        // Applying here never raises the stable vector (the contribution counts what was
        // received), so it is computed once per drain.
        let stable = (self.cfg.partitioned() && self.cfg.check_stable).then(|| self.site_stable());
        while let Some(origin) = work.pop() {
            while let Some(head) = self.buffer.ready_head(origin) {
                if let Item::Update(u) = head
                    && self.cfg.check_deps
                    && let Some((entry, need)) = self.missing(stable.as_ref(), u, origin)
                {
                    self.stats.buffered_total += 1;
                    self.buffer.block(origin, entry, need);
                    break;
                }
                let item = self.buffer.pop(origin).expect("head exists");
                let ts = item.ts();
                match item {
                    Item::Update(mut u) => {
                        if u.deps.len() > self.cfg.sites {
                            // Only with dependency checks off (tests): an applied update's
                            // vector is covered by `applied`, so it is zero past the sites
                            // counted here, and the store and the log hold vectors of that
                            // length.
                            u.deps = u.deps.resized(self.cfg.sites);
                        }
                        self.stats.remote_applied += 1;
                        if !self.merge_into_store(&u) {
                            self.stats.remote_lost_lww += 1;
                        }
                        if self.cfg.sites > 2 {
                            // Kept until every other member has it (see `relay_batch`).
                            self.relayed[origin as usize].push_back(u.clone());
                        }
                        self.pending.push(Record::Update(u));
                    }
                    // Remote markers are not logged: after a restart the origin resends from
                    // the recovered entry, and a marker covers no update, so nothing acked or
                    // collected on its strength can be missing. Logging them would grow an idle
                    // site's log by hundreds of records a second.
                    Item::Marker(_) => {}
                }
                self.applied.raise(origin, ts);
                self.buffer.wake(origin, ts, &mut work);
            }
        }
    }

    /// Raises `applied[entry]` and wakes what waited on it.
    fn advance_entry(&mut self, entry: SiteId, ts: Timestamp) {
        self.applied.raise(entry, ts);
        let mut work = Vec::new();
        self.buffer.wake(entry, self.applied.get(entry), &mut work);
        if !work.is_empty() {
            self.drain(work);
        }
    }

    /// LWW merge into the store; tracks winning tombstones for collection. Returns true when the
    /// update won.
    fn merge_into_store(&mut self, u: &Update) -> bool {
        let deps = if self.cfg.partitioned() {
            u.deps.clone()
        } else {
            VClock::default()
        };
        let won = self.store.merge(
            u.key.clone(),
            Entry {
                version: u.version,
                value: u.value.clone(),
                deps,
            },
        );
        if won && u.value.is_none() {
            self.tombstones.insert((u.version, u.key.clone()));
        }
        won
    }

    /// Passes time in: issues a clock marker when this site has been idle for the marker
    /// interval, and collects stable tombstones.
    pub fn tick(&mut self, now: Timestamp) {
        if now >= self.last_marker_at + self.cfg.marker_interval {
            self.last_marker_at = now;
            self.issue_marker(now, 0);
        }
        // Against the stable vector (durable here and acked by every peer): collected on the
        // strength of non-durable state, a tombstone could leave a reader seeing "absent" and,
        // after a crash, the old value again; collected before every site applied the delete,
        // a reader that saw "absent" here (which carries no version into its context) could
        // fail over and read the deleted value there.
        if self.tombstone_holds == 0 {
            let floor = self.tombstone_floor();
            self.collect_tombstones(floor);
        }
    }

    /// The timestamp up to which tombstones may be collected: the stable vector's smallest
    /// entry, leaving out removed sites whose entry has reached their cut (nothing more of
    /// theirs can arrive anywhere).
    fn tombstone_floor(&self) -> Timestamp {
        let stable = self.stable();
        stable
            .as_slice()
            .iter()
            .enumerate()
            .filter(|&(i, &v)| self.gone[i].is_none_or(|g| v < g.cut()))
            .map(|(_, &v)| v)
            .min()
            .unwrap_or(Timestamp::MAX)
    }

    /// Holds tombstone collection until the matching [`Replica::release_tombstones`]. A snapshot
    /// copies the store while the replica keeps applying: recovery then replays the log from
    /// where the copy began, and an older write in that stretch that lost to a tombstone must
    /// lose again, so the tombstone has to be in the copy.
    pub fn hold_tombstones(&mut self) {
        self.tombstone_holds += 1;
    }

    /// Ends one [`Replica::hold_tombstones`]; collection resumes at the next tick.
    pub fn release_tombstones(&mut self) {
        self.tombstone_holds = self.tombstone_holds.saturating_sub(1);
    }

    fn collect_tombstones(&mut self, floor: Timestamp) {
        while let Some(first) = self.tombstones.first() {
            if first.0.ts > floor {
                break;
            }
            let (version, key) = self.tombstones.pop_first().expect("non-empty");
            if self.store.remove_tombstone(&key, version) {
                self.stats.tombstones_collected += 1;
            }
        }
    }

    /// Number of tombstones waiting to become collectable.
    pub fn tombstones_pending(&self) -> usize {
        self.tombstones.len()
    }

    /// Hands out the records to persist. Call [`Replica::advance`] with the returned `applied`
    /// once they are durable.
    pub fn take_ready(&mut self) -> Ready {
        Ready {
            records: std::mem::take(&mut self.pending),
            applied: self.applied.clone(),
            lease: self.lease,
        }
    }

    /// True when there are records waiting to be handed out by [`Replica::take_ready`].
    pub fn has_records(&self) -> bool {
        !self.pending.is_empty()
    }

    /// True when there are records waiting to be persisted.
    pub fn has_ready(&self) -> bool {
        !self.pending.is_empty() || self.durable != self.applied
    }

    /// Marks the state handed out by a [`Ready`] as durable.
    pub fn advance(&mut self, applied: &VClock, lease: Timestamp) {
        self.durable.merge(applied);
        self.durable_lease = self.durable_lease.max(lease);
        // The newest own update now durable: still retained, since no peer can have acked
        // what was not yet sent, and only durable updates are sent.
        let own = self.durable.get(self.cfg.site);
        if let Some(u) = self.retained.iter().rev().find(|u| u.version.ts <= own) {
            self.durable_write = self.durable_write.max(u.version.ts);
        }
        // Partitioned: the contribution counts durable state, so the stable vector may rise.
        self.wake_stable();
    }

    /// A (re)connected peer reported its durable `applied` vector in its hello: resend this
    /// site's updates from there.
    pub fn on_peer_connected(&mut self, peer: SiteId, applied: &VClock) {
        self.sent[peer as usize] = applied.get(self.cfg.site);
        self.on_peer_applied(peer, applied);
    }

    /// A peer reported counting `sites` sites (the length of the vector of its hello, ack or
    /// heartbeat). While that is more than this replica counts, a site was added that this
    /// replica has not applied yet, and which may need any of its updates: pruning waits until
    /// [`Replica::add_sites`] counts it too (see the module doc).
    pub fn on_peer_counts(&mut self, sites: usize) {
        self.peers_count = self.peers_count.max(sites);
    }

    /// True while pruning waits for this replica to count a site some peer counts
    /// ([`Replica::on_peer_counts`]).
    pub fn retention_held(&self) -> bool {
        self.cfg.hold_for_added && self.peers_count > self.cfg.sites
    }

    /// The most sites any peer reported counting ([`Replica::on_peer_counts`]), this
    /// replica's own count included: above [`ReplicaConfig::sites`] while some peer applied a
    /// site's addition this replica has not.
    pub fn peers_count(&self) -> usize {
        self.peers_count.max(self.cfg.sites)
    }

    /// A peer reported its durable `applied` vector (ack or heartbeat). Prunes the retained log.
    pub fn on_peer_applied(&mut self, peer: SiteId, applied: &VClock) {
        if peer == self.cfg.site || peer as usize >= self.cfg.sites {
            return;
        }
        self.peer_applied[peer as usize].merge(applied);
        self.prune();
    }

    /// Number of this site's retained updates that `peer` has not acked yet.
    pub fn unacked_by(&self, peer: SiteId) -> usize {
        if peer == self.cfg.site || peer as usize >= self.cfg.sites {
            return 0;
        }
        let acked = self.peer_applied[peer as usize].get(self.cfg.site);
        self.retained.len() - self.retained.partition_point(|u| u.version.ts <= acked)
    }

    /// Number of peers whose durable state covers this site's write at `ts` (synchronous
    /// replication waits on this).
    pub fn acked_by(&self, ts: Timestamp) -> usize {
        let me = self.cfg.site;
        self.peers()
            .filter(|&p| self.peer_applied[p as usize].get(me) >= ts)
            .count()
    }

    /// The next batch for `peer`: up to `max_items` of this site's durable updates after what was
    /// last sent on this connection, followed by a clock marker when everything durable has been
    /// sent. Returns `None` when there is nothing new.
    pub fn poll_batch(&mut self, peer: SiteId, max_items: usize) -> Option<Vec<Item>> {
        let (updates, marker) = self.poll_batch_refs(peer, max_items, usize::MAX)?;
        let mut items: Vec<Item> = updates.cloned().map(Item::Update).collect();
        items.extend(marker.map(Item::Marker));
        Some(items)
    }

    /// [`Replica::poll_batch`] without copying: the batch's updates, borrowed from the retained
    /// log, and the marker that follows them, if any. The node serialises these straight into
    /// a frame. The batch also stops before its updates' keys, values and dependency vectors
    /// (plus [`ITEM_OVERHEAD`] each) pass `max_bytes`, but always holds at least one update.
    pub fn poll_batch_refs(
        &mut self,
        peer: SiteId,
        max_items: usize,
        max_bytes: usize,
    ) -> Option<(impl Iterator<Item = &Update> + Clone, Option<Timestamp>)> {
        let p = peer as usize;
        let cursor = self.sent[p];
        let limit = self.durable.get(self.cfg.site);
        if cursor >= limit {
            return None;
        }
        let start = self.retained.partition_point(|u| u.version.ts <= cursor);
        let below_limit = self.retained.partition_point(|u| u.version.ts <= limit);
        let mut end = below_limit.min(start.saturating_add(max_items));
        if max_bytes != usize::MAX {
            let mut bytes = 0usize;
            for (i, u) in self.retained.range(start..end).enumerate() {
                bytes += u.payload_len() + 8 * u.deps.len() + ITEM_OVERHEAD;
                if bytes > max_bytes && i > 0 {
                    end = start + i;
                    break;
                }
            }
        }
        let mut last = match end.checked_sub(1) {
            Some(i) if i >= start => self.retained[i].version.ts,
            _ => cursor,
        };
        let mut marker = None;
        if end == below_limit && end - start < max_items && last < limit {
            // Everything durable up to `limit` is in this batch or was sent before (not when
            // the byte budget cut the batch short: the marker would skip the rest): a marker
            // lets the peer advance this site's entry past the idle gap.
            last = limit;
            marker = Some(limit);
        }
        self.sent[p] = last;
        Some((self.retained.range(start..end), marker))
    }

    /// How far the stream to `peer` has been polled: the next batch starts after this.
    pub fn sent_to(&self, peer: SiteId) -> Timestamp {
        self.sent[peer as usize]
    }

    /// The link did not send the markers-only batch it just polled (an idle link sends one
    /// marker per idle interval): the stream to `peer` goes back to `cursor`, what
    /// [`Replica::sent_to`] said before that poll, so that the next poll carries the marker
    /// again, with whatever came since. Without this, the stream would count that marker as
    /// sent, and a marker that must go at once ([`Replica::urgent_marker`]) at or below it
    /// would wait for the next update.
    pub fn rewind_sent(&mut self, peer: SiteId, cursor: Timestamp) {
        let p = peer as usize;
        self.sent[p] = self.sent[p].min(cursor);
    }

    /// True when `peer` has been sent everything durable.
    pub fn caught_up(&self, peer: SiteId) -> bool {
        self.sent[peer as usize] >= self.durable.get(self.cfg.site)
    }
}

#[cfg(test)]
mod tests;
