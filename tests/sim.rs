//! Deterministic simulation of the sans-IO replicas.
//!
//! Clock, network and disk are simulated; one seed decides every delay, reordering, loss,
//! duplication, partition and crash, so a failing seed replays exactly:
//!
//! ```text
//! SIM_SEED=1234 cargo test --release --test sim -- --nocapture    # replay one seed
//! SIM_SEEDS=2000 cargo test --release --test sim                  # many seeds
//! ```
//!
//! The model: 3 to 5 sites of `P` partition nodes each (`P` = 1, 2 or 4), every node a
//! [`Replica`] whose records are "fsynced" to a simulated disk after every step. Every pair of
//! nodes of the same partition at two sites shares a connection that carries each side's ordered
//! update stream and its control messages (hello, acks); each has its own delay, so one
//! partition's stream can run far behind another's. The partitions of a site exchange their
//! stable-vector contributions every tick, with a small delay, and some of those messages are
//! lost. A connection delivers in order, after a
//! per-link delay of 0 to 300 ms plus jitter, so messages reorder across links. A lost message
//! breaks the connection (as a QUIC connection dies when its path does), and after a backoff the
//! sides reconnect, exchange hellos and resend from each other's `applied` entry. Batches are
//! sometimes delivered twice. Partitions cut one or both directions of a link, or isolate a
//! site. A crash loses the replica's memory (buffer included) and keeps its disk; the restart
//! recovers from the disk.
//!
//! Client sessions hop between sites, send each operation to the partition that holds its key,
//! wait (bounded) for it to cover their causal context, and write unique values. Every acknowledged operation is recorded, and at the end the causal
//! checker runs over the history; after the network heals, every site must hold identical live
//! contents and have collected every tombstone.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use bytes::Bytes;
use causalkv::clock::{SiteId, Timestamp, VClock, Version};
use causalkv::replica::{Item, Record, Replica, ReplicaConfig};
use causalkv::sharding::partition_of;
use causalkv::storage::{MemStore, Store, live_contents};
use causalkv::tools::checker::{self, History, Op, OpKind};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

const MS: u64 = 1_000;

/// A site's live contents, as convergence compares them.
type Contents = BTreeMap<Vec<u8>, (Version, Bytes)>;
const SEC: u64 = 1_000_000;

/// A node: site `i`'s partition `p` is node `i * P + p`.
type NodeId = usize;

/// Knobs of one simulation run.
#[derive(Clone, Debug)]
struct SimConfig {
    seed: u64,
    check_deps: bool,
    /// Partitions per site.
    partitions: usize,
    /// Partitioned sites check deps against the stable vector (off: a planted bug).
    check_stable: bool,
    /// Reads hand back the context their value was written under (off: a planted bug).
    close_contexts: bool,
    /// The pipeline workload (see [`Sim::pipeline_step`]) instead of hopping sessions.
    pipeline: bool,
    /// Copies of stream frames wait for their place in the stream (off: a planted bug).
    check_copy_order: bool,
    /// Simulated time with clients and faults running.
    active: u64,
    faults: bool,
}

#[derive(Debug)]
enum Msg {
    Hello(VClock),
    Batch(Vec<Item>),
    /// A copy of a batch, sent apart from the stream as a QUIC datagram is: it may be lost
    /// (without breaking the connection) or overtake the stream. It follows the stream's item
    /// at the given timestamp.
    Copy(Timestamp, Vec<Item>),
    Ack(VClock),
}

#[derive(Debug)]
enum Event {
    Deliver {
        from: NodeId,
        to: NodeId,
        epoch: u64,
        msg: Msg,
    },
    /// A sibling partition's stable-vector contribution arrives.
    Contribution {
        to: NodeId,
        from_partition: u32,
        v: VClock,
        /// The sender's newest durable local update.
        w: u64,
    },
    Tick(NodeId),
    Client(usize),
    Fault,
    Heal(Fault),
    Reconnect(NodeId, NodeId),
    Restart(NodeId),
}

/// Faults between sites (every partition's link) or between two nodes.
#[derive(Clone, Copy, Debug)]
enum Fault {
    Cut(SiteId, SiteId),
    Isolate(SiteId),
    Loss(NodeId, NodeId),
    Slow(NodeId, NodeId),
    SlowSiblings(SiteId),
}

/// One direction of a connection.
struct Link {
    delay: u64,
    /// Extra delay while a slow-link fault lasts.
    extra: u64,
    jitter: u64,
    last_delivery: u64,
    cut: u32,
    loss_ppm: u32,
}

struct Site {
    replica: Option<Replica<MemStore>>,
    disk: Vec<Record>,
    skew: i64,
    /// Per node: hello received on the current connection epoch.
    greeted: Vec<bool>,
    /// Extra delay on this site's sibling exchange (a fault).
    sibling_delay: u64,
    /// When the node last restarted after a crash (simulated µs).
    restarted_at: Option<u64>,
    /// What the node had received when it last crashed (lost with its memory, and claimed to
    /// its siblings before).
    received_at_crash: VClock,
}

struct Session {
    /// The id recorded in the history; a session that ends is replaced by a fresh one.
    id: u64,
    ctx: VClock,
    site: SiteId,
    writes: u64,
    waiting_since: Option<u64>,
    /// The dependencies of the value this session read last.
    last_deps: VClock,
}

struct Sim {
    cfg: SimConfig,
    rng: ChaCha8Rng,
    now: u64,
    seq: u64,
    /// Number of sites.
    n: usize,
    /// Partitions per site.
    parts: usize,
    /// Nodes, site by site (`n * parts`); named `sites` from the unpartitioned model.
    sites: Vec<Site>,
    /// Per ordered pair of nodes (only pairs of the same partition at two sites are used).
    links: Vec<Vec<Link>>,
    /// Connection epoch per unordered pair of nodes (indexed [min][max]).
    epoch: Vec<Vec<u64>>,
    connected: Vec<Vec<bool>>,
    /// Per ordered pair of nodes: the timestamp of the last item sent on the current
    /// connection's stream (none before its first batch), which a copy of the next batch follows.
    stream_last: Vec<Vec<Option<Timestamp>>>,
    events: BTreeMap<(u64, u64), Event>,
    sessions: Vec<Session>,
    history: History,
    /// The unique value each delete stands for in the history, by key and version (versions are
    /// unique per key; two partitions of a site may issue the same timestamp).
    delete_values: HashMap<(Vec<u8>, Version), Vec<u8>>,
    deleted_keys: BTreeSet<Vec<u8>>,
    /// The last session id handed out.
    next_session: u64,
    /// Per node: the timestamp of its last write.
    last_write: Vec<Timestamp>,
    healing: bool,
    stats: SimStats,
    last_tick: Vec<u64>,
}

#[derive(Debug, Default)]
struct SimStats {
    ops: u64,
    not_ready_waits: u64,
    crashes: u64,
    partitions: u64,
    lost_messages: u64,
    duplicated: u64,
    /// Batches also sent as copies, and copies lost.
    copies: u64,
    copies_lost: u64,
    /// Copies that delivered an item before the stream did.
    copies_used: u64,
    max_buffered: usize,
    contributions: u64,
    /// Pipeline reads at site 2 that, right after reading an update at the same site, had to
    /// wait for one of its dependencies that had not reached the node: the stable vector exists
    /// to make this impossible (a node that restarted in the last 2 s is left out: it lost what
    /// it had received, and what it had told its siblings stands until it is back).
    network_waits: u64,
}

/// What one run found.
#[derive(Debug)]
struct Outcome {
    report: checker::Report,
    converged: Result<(), String>,
    stats: SimStats,
}

impl Sim {
    fn new(cfg: SimConfig) -> Self {
        let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed);
        let n = if cfg.pipeline {
            3
        } else {
            rng.gen_range(3..=5)
        };
        let parts = cfg.partitions;
        let nodes = n * parts;
        let sites = (0..nodes)
            .map(|x| Site {
                replica: Some(Replica::new(
                    Self::replica_config(&cfg, n, x),
                    MemStore::new(),
                )),
                disk: Vec::new(),
                skew: rng.gen_range(-50_000..50_000),
                greeted: vec![false; nodes],
                sibling_delay: 0,
                restarted_at: None,
                received_at_crash: VClock::default(),
            })
            .collect();
        let links = (0..nodes)
            .map(|_| {
                (0..nodes)
                    .map(|_| Link {
                        delay: rng.gen_range(0..300 * MS),
                        extra: 0,
                        jitter: rng.gen_range(0..20 * MS),
                        last_delivery: 0,
                        cut: 0,
                        loss_ppm: if cfg.faults { 2_000 } else { 0 },
                    })
                    .collect()
            })
            .collect();
        let sessions = (0..if cfg.pipeline {
            12
        } else {
            rng.gen_range(3..=8)
        })
            .enumerate()
            .map(|(id, _)| Session {
                id: id as u64,
                ctx: VClock::zero(n),
                site: if cfg.pipeline {
                    (id % 3) as SiteId
                } else {
                    rng.gen_range(0..n) as SiteId
                },
                writes: 0,
                waiting_since: None,
                last_deps: VClock::default(),
            })
            .collect();
        let mut sim = Sim {
            cfg,
            rng,
            now: 0,
            seq: 0,
            n,
            parts,
            sites,
            links,
            epoch: vec![vec![0; nodes]; nodes],
            connected: vec![vec![false; nodes]; nodes],
            stream_last: vec![vec![None; nodes]; nodes],
            events: BTreeMap::new(),
            sessions,
            history: History::new(),
            delete_values: HashMap::new(),
            deleted_keys: BTreeSet::new(),
            last_write: vec![0; nodes],
            next_session: 1_000,
            healing: false,
            stats: SimStats::default(),
            last_tick: vec![0; nodes],
        };
        for x in 0..nodes {
            let at = sim.rng.gen_range(0..5 * MS);
            sim.schedule(at, Event::Tick(x));
            for y in sim.peers_of(x).filter(|&y| y > x) {
                sim.schedule(0, Event::Reconnect(x, y));
            }
        }
        for s in 0..sim.sessions.len() {
            let at = sim.rng.gen_range(0..50 * MS);
            sim.schedule(at, Event::Client(s));
        }
        if sim.cfg.faults {
            sim.schedule(200 * MS, Event::Fault);
        }
        sim
    }

    fn replica_config(cfg: &SimConfig, n: usize, x: NodeId) -> ReplicaConfig {
        let p = cfg.partitions;
        let mut rc =
            ReplicaConfig::new((x / p) as SiteId, n).with_partition((x % p) as u32, p as u32);
        rc.check_deps = cfg.check_deps;
        rc.check_stable = cfg.check_stable;
        rc.close_contexts = cfg.close_contexts;
        rc.check_copy_order = cfg.check_copy_order;
        rc
    }

    fn site_of(&self, x: NodeId) -> SiteId {
        (x / self.parts) as SiteId
    }

    fn node(&self, site: SiteId, partition: usize) -> NodeId {
        site as usize * self.parts + partition
    }

    /// The nodes `x` replicates with: its partition at every other site.
    fn peers_of(&self, x: NodeId) -> impl Iterator<Item = NodeId> + use<> {
        let (p, i, n) = (self.parts, x / self.parts, self.n);
        (0..n).filter(move |&j| j != i).map(move |j| j * p + x % p)
    }

    /// The other partitions of `x`'s site.
    fn siblings_of(&self, x: NodeId) -> impl Iterator<Item = NodeId> + use<> {
        let (p, base) = (self.parts, x - x % self.parts);
        (base..base + p).filter(move |&y| y != x)
    }

    fn schedule(&mut self, after: u64, ev: Event) {
        self.seq += 1;
        self.events.insert((self.now + after, self.seq), ev);
    }

    fn pair(a: NodeId, b: NodeId) -> (usize, usize) {
        (a.min(b), a.max(b))
    }

    fn site_now(&self, x: NodeId) -> Timestamp {
        (self.now as i64 + self.sites[x].skew).max(0) as u64
    }

    /// Persists the replica's records (a simulated fsync) and marks them durable.
    fn flush(&mut self, x: NodeId) {
        let site = &mut self.sites[x];
        if let Some(r) = site.replica.as_mut() {
            let ready = r.take_ready();
            site.disk.extend(ready.records);
            r.advance(&ready.applied, ready.lease);
            self.stats.max_buffered = self.stats.max_buffered.max(r.buffer().len());
        }
    }

    /// Sends one message on the connection between `from` and `to`, if it is up.
    fn send(&mut self, from: NodeId, to: NodeId, msg: Msg) {
        let (a, b) = Self::pair(from, to);
        if !self.connected[a][b] {
            return;
        }
        let epoch = self.epoch[a][b];
        let link = &self.links[from][to];
        if link.cut > 0 || self.rng.gen_range(0..1_000_000) < link.loss_ppm {
            // The message is lost: the connection breaks, and the sides reconnect later.
            self.stats.lost_messages += 1;
            self.break_connection(from, to);
            return;
        }
        let delay = link.delay + link.extra + self.rng.gen_range(0..=link.jitter);
        let at = (self.now + delay).max(link.last_delivery);
        self.links[from][to].last_delivery = at;
        let dup = matches!(msg, Msg::Batch(_)) && self.rng.gen_range(0..100) == 0;
        if dup && let Msg::Batch(items) = &msg {
            self.stats.duplicated += 1;
            let copy = Msg::Batch(items.clone());
            self.deliver_at(at, from, to, epoch, copy);
        }
        self.deliver_at(at, from, to, epoch, msg);
    }

    /// Sends a copy of a batch that follows the stream's item at `prev`, apart from the stream:
    /// lost 1 time in 10 without harm to the connection, and never queued behind the stream,
    /// so it may arrive before the batch itself, or after a later copy.
    fn send_copy(&mut self, from: NodeId, to: NodeId, prev: Timestamp, items: Vec<Item>) {
        let (a, b) = Self::pair(from, to);
        self.stats.copies += 1;
        let link = &self.links[from][to];
        if !self.connected[a][b] || link.cut > 0 || self.rng.gen_range(0..10) == 0 {
            self.stats.copies_lost += 1;
            return;
        }
        let delay = link.delay + link.extra + self.rng.gen_range(0..=link.jitter + 5 * MS);
        let epoch = self.epoch[a][b];
        self.deliver_at(self.now + delay, from, to, epoch, Msg::Copy(prev, items));
    }

    fn deliver_at(&mut self, at: u64, from: NodeId, to: NodeId, epoch: u64, msg: Msg) {
        self.seq += 1;
        let ev = Event::Deliver {
            from,
            to,
            epoch,
            msg,
        };
        self.events.insert((at, self.seq), ev);
    }

    fn break_connection(&mut self, x: NodeId, y: NodeId) {
        let (a, b) = Self::pair(x, y);
        if !self.connected[a][b] {
            return;
        }
        self.connected[a][b] = false;
        self.epoch[a][b] += 1;
        self.stream_last[a][b] = None;
        self.stream_last[b][a] = None;
        self.sites[a].greeted[b] = false;
        self.sites[b].greeted[a] = false;
        let backoff = self.rng.gen_range(10 * MS..200 * MS);
        self.schedule(backoff, Event::Reconnect(a, b));
    }

    /// Pushes every pending batch from node `x` to its greeted peers.
    fn pump(&mut self, x: NodeId) {
        self.flush(x);
        for y in self.peers_of(x) {
            if !self.sites[x].greeted[y] {
                continue;
            }
            let peer = self.site_of(y);
            loop {
                let Some(r) = self.sites[x].replica.as_mut() else {
                    return;
                };
                let Some(batch) = r.poll_batch(peer, 16) else {
                    break;
                };
                let last = batch.last().map(Item::ts);
                if let Some(prev) = self.stream_last[x][y]
                    && self.rng.gen_range(0..2) == 0
                {
                    self.send_copy(x, y, prev, batch.clone());
                }
                self.stream_last[x][y] = last.or(self.stream_last[x][y]);
                self.send(x, y, Msg::Batch(batch));
                if !self.sites[x].greeted[y] {
                    break;
                }
            }
        }
    }

    /// Sends node `x`'s stable-vector contribution to its sibling partitions: a few ms late,
    /// sometimes much later (a fault), sometimes lost (contributions only grow, so a lost one
    /// is made up by the next).
    fn exchange(&mut self, x: NodeId) {
        if self.parts == 1 {
            return;
        }
        let Some((v, w)) = self.sites[x]
            .replica
            .as_ref()
            .map(|r| (r.contribution(), r.durable_write()))
        else {
            return;
        };
        let from_partition = (x % self.parts) as u32;
        for y in self.siblings_of(x) {
            if self.cfg.faults && self.rng.gen_range(0..100) < 2 {
                continue;
            }
            let delay = self.rng.gen_range(0..3 * MS) + self.sites[x].sibling_delay;
            self.stats.contributions += 1;
            self.schedule(
                delay,
                Event::Contribution {
                    to: y,
                    from_partition,
                    v: v.clone(),
                    w,
                },
            );
        }
    }

    fn run(mut self) -> Outcome {
        let end_active = self.cfg.active;
        let deadline = end_active + 120 * SEC;
        while let Some(((t, _), ev)) = self.events.pop_first() {
            self.now = t;
            if !self.healing && t >= end_active {
                self.heal_all();
            }
            if t > deadline {
                break;
            }
            self.step(ev);
            // Checked after the step, so that no popped event (a site's tick chain) is lost.
            if self.healing && self.quiescent() {
                break;
            }
        }
        // Let markers move every entry past the last tombstones, then compare.
        let settle = self.now + 2 * SEC;
        while let Some(((t, _), ev)) = self.events.pop_first() {
            if t > settle {
                break;
            }
            self.now = t;
            self.step(ev);
        }
        let report = checker::check(&self.history);
        let converged = self.convergence();
        Outcome {
            report,
            converged,
            stats: self.stats,
        }
    }

    fn convergence(&self) -> Result<(), String> {
        if !self.quiescent() {
            return Err(format!(
                "no quiescence by t={}s: connected {:?}, greeted {:?}, applied {:?}, last writes {:?}",
                self.now / SEC,
                self.connected,
                self.sites
                    .iter()
                    .map(|s| s.greeted.clone())
                    .collect::<Vec<_>>(),
                self.sites
                    .iter()
                    .map(|s| s.replica.as_ref().map(|r| r.applied().clone()))
                    .collect::<Vec<_>>(),
                self.last_write
            ));
        }
        // A site's contents: the union of its partitions' (each key lives in one partition).
        let states: Vec<(u16, Contents)> = self
            .sites
            .chunks(self.parts)
            .enumerate()
            .map(|(i, nodes)| {
                let mut all = Contents::new();
                for s in nodes {
                    all.extend(live_contents(s.replica.as_ref().expect("healed").store()));
                }
                (i as u16, all)
            })
            .collect();
        checker::check_convergence(&states).map_err(|e| e.to_string())?;
        for (i, s) in self.sites.iter().enumerate() {
            let r = s.replica.as_ref().expect("healed");
            let mut tombs = 0;
            r.store()
                .for_each(&mut |_, e| tombs += e.is_tombstone() as usize);
            if tombs > 0 {
                let mut versions = Vec::new();
                r.store().for_each(&mut |_, e| {
                    if e.is_tombstone() {
                        versions.push(e.version);
                    }
                });
                return Err(format!(
                    "site {i} still holds {tombs} tombstones after heal: {versions:?}, applied {:?}, last tick {:?} now {} pending {}",
                    r.applied(),
                    self.last_tick,
                    self.now,
                    r.tombstones_pending()
                ));
            }
        }
        Ok(())
    }

    /// Every node is up, has applied every write of its partition at every origin and
    /// buffers nothing.
    fn quiescent(&self) -> bool {
        self.sites.iter().enumerate().all(|(x, s)| {
            s.replica.as_ref().is_some_and(|r| {
                r.buffer().is_empty()
                    && (0..self.n).all(|o| {
                        r.applied().get(o as SiteId)
                            >= self.last_write[self.node(o as SiteId, x % self.parts)]
                    })
            })
        })
    }

    fn heal_all(&mut self) {
        self.healing = true;
        for row in &mut self.links {
            for l in row {
                l.cut = 0;
                l.extra = 0;
                l.loss_ppm = 0;
            }
        }
        for s in &mut self.sites {
            s.sibling_delay = 0;
        }
        for x in 0..self.sites.len() {
            if self.sites[x].replica.is_none() {
                self.schedule(0, Event::Restart(x));
            }
        }
    }

    fn step(&mut self, ev: Event) {
        match ev {
            Event::Tick(x) => {
                let now = self.site_now(x);
                if let Some(r) = self.sites[x].replica.as_mut() {
                    self.last_tick[x] = now;
                    r.tick(now);
                    self.flush(x);
                    let ack = self.sites[x].replica.as_ref().map(|r| r.durable().clone());
                    if let Some(ack) = ack
                        && self.rng.gen_range(0..4) == 0
                    {
                        for y in self.peers_of(x) {
                            if self.sites[x].greeted[y] {
                                self.send(x, y, Msg::Ack(ack.clone()));
                            }
                        }
                    }
                    self.pump(x);
                    self.exchange(x);
                    self.schedule(5 * MS, Event::Tick(x));
                }
            }
            Event::Contribution {
                to,
                from_partition,
                v,
                w,
            } => {
                if let Some(r) = self.sites[to].replica.as_mut() {
                    r.on_sibling(from_partition, &v, w);
                    self.pump(to);
                }
            }
            Event::Reconnect(a, b) => {
                let (x, y) = Self::pair(a, b);
                if self.connected[x][y] {
                    return;
                }
                let up = self.sites[x].replica.is_some() && self.sites[y].replica.is_some();
                let cut = self.links[x][y].cut > 0 || self.links[y][x].cut > 0;
                if !up {
                    return; // the restart reconnects
                }
                if cut {
                    let backoff = self.rng.gen_range(50 * MS..300 * MS);
                    self.schedule(backoff, Event::Reconnect(a, b));
                    return;
                }
                self.connected[x][y] = true;
                for (from, to) in [(x, y), (y, x)] {
                    let hello = self.sites[from]
                        .replica
                        .as_ref()
                        .expect("up")
                        .durable()
                        .clone();
                    self.send(from, to, Msg::Hello(hello));
                }
            }
            Event::Deliver {
                from,
                to,
                epoch,
                msg,
            } => {
                let (a, b) = Self::pair(from, to);
                if epoch != self.epoch[a][b] || !self.connected[a][b] {
                    return; // sent on a connection that has since broken
                }
                let origin = self.site_of(from);
                let Some(r) = self.sites[to].replica.as_mut() else {
                    return;
                };
                match msg {
                    Msg::Hello(applied) => {
                        r.on_peer_connected(origin, &applied);
                        self.sites[to].greeted[from] = true;
                    }
                    Msg::Batch(items) => r.receive(origin, items),
                    Msg::Copy(prev, items) => {
                        let used = r.stats().copies_used;
                        r.receive_copy(origin, prev, items);
                        self.stats.copies_used += r.stats().copies_used - used;
                    }
                    Msg::Ack(applied) => r.on_peer_applied(origin, &applied),
                }
                self.pump(to);
            }
            Event::Client(s) => self.client_step(s),
            Event::Restart(x) => {
                let rc = Self::replica_config(&self.cfg, self.n, x);
                let nodes = self.sites.len();
                let site = &mut self.sites[x];
                if site.replica.is_some() {
                    return;
                }
                site.replica = Some(Replica::recover(
                    rc,
                    MemStore::new(),
                    site.disk.iter().cloned(),
                ));
                site.greeted = vec![false; nodes];
                site.restarted_at = Some(self.now);
                self.schedule(MS, Event::Tick(x));
                for y in self.peers_of(x) {
                    self.schedule(0, Event::Reconnect(x, y));
                }
            }
            Event::Fault => self.inject_fault(),
            Event::Heal(f) => match f {
                Fault::Cut(x, y) => self.cut_sites(x, y, false),
                Fault::Isolate(x) => {
                    for j in 0..self.n as SiteId {
                        if j != x {
                            self.cut_sites(x, j, false);
                            self.cut_sites(j, x, false);
                        }
                    }
                }
                Fault::Loss(x, y) => self.links[x][y].loss_ppm = 2_000,
                Fault::Slow(x, y) => self.links[x][y].extra = 0,
                Fault::SlowSiblings(i) => {
                    for p in 0..self.parts {
                        let x = self.node(i, p);
                        self.sites[x].sibling_delay = 0;
                    }
                }
            },
        }
    }

    /// Cuts (or heals one cut of) the direction `x → y` of every partition's link between two
    /// sites.
    fn cut_sites(&mut self, x: SiteId, y: SiteId, cut: bool) {
        for p in 0..self.parts {
            let (a, b) = (self.node(x, p), self.node(y, p));
            let l = &mut self.links[a][b];
            l.cut = if cut {
                l.cut + 1
            } else {
                l.cut.saturating_sub(1)
            };
        }
    }

    fn inject_fault(&mut self) {
        if self.healing {
            return;
        }
        let n = self.n as SiteId;
        let x = self.rng.gen_range(0..n);
        let y = (x + self.rng.gen_range(1..n)) % n;
        let p = self.rng.gen_range(0..self.parts);
        let dur = self.rng.gen_range(100 * MS..3 * SEC);
        match self.rng.gen_range(0..8) {
            0 => {
                // One-way partition.
                self.stats.partitions += 1;
                self.cut_sites(x, y, true);
                self.schedule(dur, Event::Heal(Fault::Cut(x, y)));
            }
            1 => {
                // Two-way partition.
                self.stats.partitions += 1;
                self.cut_sites(x, y, true);
                self.cut_sites(y, x, true);
                self.schedule(dur, Event::Heal(Fault::Cut(x, y)));
                self.schedule(dur, Event::Heal(Fault::Cut(y, x)));
            }
            2 => {
                self.stats.partitions += 1;
                for j in 0..n {
                    if j != x {
                        self.cut_sites(x, j, true);
                        self.cut_sites(j, x, true);
                    }
                }
                self.schedule(dur, Event::Heal(Fault::Isolate(x)));
            }
            // Crash of one partition node: memory lost, disk kept.
            3 if self.sites[self.node(x, p)].replica.is_some() => {
                let node = self.node(x, p);
                let site = &mut self.sites[node];
                if let Some(r) = site.replica.take() {
                    site.received_at_crash.merge(r.received());
                }
                self.stats.crashes += 1;
                for y in self.peers_of(node) {
                    self.break_connection(node, y);
                }
                self.schedule(dur, Event::Restart(node));
            }
            4 => {
                // Heavy loss on one partition's link: only that stream stalls and reconnects.
                let (a, b) = (self.node(x, p), self.node(y, p));
                self.links[a][b].loss_ppm = 200_000;
                self.schedule(dur / 4, Event::Heal(Fault::Loss(a, b)));
            }
            6 => {
                // One partition's stream from one site to another falls far behind (a slow
                // path): its updates arrive long after causally later ones on other links.
                let (a, b) = (self.node(x, p), self.node(y, p));
                self.links[a][b].extra = self.rng.gen_range(300 * MS..1_500 * MS);
                self.schedule(dur, Event::Heal(Fault::Slow(a, b)));
            }
            5 if self.parts > 1 => {
                // The site's partitions hear of each other late.
                let extra = self.rng.gen_range(20 * MS..300 * MS);
                for q in 0..self.parts {
                    let node = self.node(x, q);
                    self.sites[node].sibling_delay = extra;
                }
                self.schedule(dur, Event::Heal(Fault::SlowSiblings(x)));
            }
            _ => {}
        }
        let next = self.rng.gen_range(100 * MS..800 * MS);
        self.schedule(next, Event::Fault);
    }

    /// Session `s` (history id `sid`) reads `key` at `node` of `site`; false when the node is
    /// not ready for the session's context.
    fn read_op(&mut self, s: usize, sid: u64, site: SiteId, node: NodeId, key: &[u8]) -> bool {
        let r = self.sites[node].replica.as_ref().expect("up");
        let sess = &mut self.sessions[s];
        match r.get(key, &sess.ctx) {
            Ok(res) => {
                sess.waiting_since = None;
                if let Some(v) = res.version {
                    sess.ctx.raise(v.site, v.ts);
                    // Closed under dependencies: what the value depends on (see
                    // `causalkv::replica`).
                    sess.ctx.merge(&res.deps);
                    sess.last_deps = res.deps.clone();
                }
                let value = match (res.value, res.version) {
                    (Some(v), _) => Some(Some(v.to_vec())),
                    (None, Some(ver)) => Some(Some(
                        self.delete_values
                            .get(&(key.to_vec(), ver))
                            .expect("tombstone of a known delete")
                            .clone(),
                    )),
                    // Absent: either never written, or a collected tombstone. Only the first
                    // is a checkable "initial value" read.
                    (None, None) => (!self.deleted_keys.contains(key)).then_some(None),
                };
                if let Some(value) = value {
                    self.history.record(Op {
                        session: sid,
                        site,
                        kind: OpKind::Read {
                            key: key.to_vec(),
                            value,
                        },
                    });
                    self.stats.ops += 1;
                }
                true
            }
            Err(_) => {
                self.stats.not_ready_waits += 1;
                sess.waiting_since.get_or_insert(self.now);
                false
            }
        }
    }

    /// The pipeline workload, for 3 sites: sessions stay at one site each. At site 0 they
    /// read and overwrite keys of partition 0; at site 1 they read a key of partition 0 and then
    /// write a key of partition 1 (so that write depends on a site-0 write in another
    /// partition); at site 2 fresh sessions read a key of partition 1 and then a key of
    /// partition 0. A site-2 session that sees a site-1 write must then see the site-0 write it
    /// depends on: exactly what the stable vector guards when partition 0's stream from site 0
    /// runs behind.
    fn pipeline_step(&mut self, s: usize) {
        let keys = |p: usize| -> Vec<Vec<u8>> {
            (0..12)
                .map(|i| format!("k{i}").into_bytes())
                .filter(|k| partition_of(k, 2) as usize == p)
                .collect()
        };
        let site = self.sessions[s].site;
        let next = self.rng.gen_range(MS..20 * MS);
        let pick = |sim: &mut Sim, p: usize| {
            let ks = keys(p);
            let i = sim.rng.gen_range(0..ks.len());
            ks[i].clone()
        };
        let (first, second) = match site {
            0 => {
                let k = pick(self, 0);
                ((k.clone(), false), (k, true))
            }
            1 => ((pick(self, 0), false), (pick(self, 1), true)),
            _ => {
                // A fresh session every time.
                self.next_session += 1;
                let sess = &mut self.sessions[s];
                sess.id = self.next_session;
                sess.ctx = VClock::zero(self.n);
                ((pick(self, 1), false), (pick(self, 0), false))
            }
        };
        let sid = self.sessions[s].id;
        for (i, (key, write)) in [first, second].into_iter().enumerate() {
            let node = self.node(site, partition_of(&key, 2) as usize);
            if self.sites[node].replica.is_none() {
                break;
            }
            let done = if write {
                self.write_op(s, sid, site, node, key, false)
            } else {
                let deps = std::mem::take(&mut self.sessions[s].last_deps);
                let done = self.read_op(s, sid, site, node, &key);
                if !done && i == 1 && site == 2 {
                    self.count_network_wait(node, &deps);
                }
                done
            };
            if !done {
                break;
            }
        }
        self.schedule(next, Event::Client(s));
    }

    /// A fresh session at site 2 read an update that depends on `deps` and then could not read
    /// at `node`: counts it in `network_waits` when one of those dependencies had not even
    /// reached the node (and not because the node lost it in a crash after its siblings
    /// relied on it).
    fn count_network_wait(&mut self, node: NodeId, deps: &VClock) {
        let recent = self.sites[node]
            .restarted_at
            .is_some_and(|t| self.now < t + 2 * SEC);
        let site = &self.sites[node];
        let r = site.replica.as_ref().expect("up");
        let me = r.site();
        let missing = deps.as_slice().iter().enumerate().any(|(k, &need)| {
            let k = k as SiteId;
            k != me && r.received().get(k) < need && site.received_at_crash.get(k) < need
        });
        if missing && !recent {
            self.stats.network_waits += 1;
        }
    }

    /// Session `s` writes (or deletes) `key` at `node` of `site`; false when the node is not
    /// ready for the session's context.
    fn write_op(
        &mut self,
        s: usize,
        sid: u64,
        site: SiteId,
        node: NodeId,
        key: Vec<u8>,
        is_delete: bool,
    ) -> bool {
        let now = self.site_now(node);
        let r = self.sites[node].replica.as_mut().expect("up");
        let sess = &mut self.sessions[s];
        sess.writes += 1;
        let value = format!("s{s}-w{}", sess.writes).into_bytes();
        let stored = (!is_delete).then(|| Bytes::from(value.clone()));
        match r.put(now, Bytes::from(key.clone()), stored, &sess.ctx) {
            Ok(v) => {
                sess.ctx.raise(v.site, v.ts);
                sess.waiting_since = None;
                self.last_write[node] = v.ts;
                if is_delete {
                    self.delete_values.insert((key.clone(), v), value.clone());
                    self.deleted_keys.insert(key.clone());
                }
                self.history.record(Op {
                    session: sid,
                    site,
                    kind: OpKind::Write { key, value },
                });
                self.stats.ops += 1;
                self.pump(node);
                true
            }
            Err(_) => {
                self.stats.not_ready_waits += 1;
                sess.waiting_since.get_or_insert(self.now);
                false
            }
        }
    }

    fn client_step(&mut self, s: usize) {
        if self.healing {
            return;
        }
        if self.cfg.pipeline {
            return self.pipeline_step(s);
        }
        let n = self.n as SiteId;
        // Hop to another site now and then, or when the current one is down or stuck.
        let stuck = self.sessions[s]
            .waiting_since
            .is_some_and(|t| self.now - t > 1_500 * MS);
        // Now and then a session ends and a fresh one, with an empty context, takes its place:
        // fresh sessions are the ones that see whatever a site shows first.
        if self.rng.gen_range(0..20) == 0 {
            self.next_session += 1;
            let sess = &mut self.sessions[s];
            sess.id = self.next_session;
            sess.ctx = VClock::zero(self.n);
            sess.waiting_since = None;
            sess.site = self.rng.gen_range(0..n);
        }
        let sid = self.sessions[s].id;
        let key = format!("k{}", self.rng.gen_range(0..6)).into_bytes();
        let part = partition_of(&key, self.parts as u32) as usize;
        if stuck
            || self.sites[self.node(self.sessions[s].site, part)]
                .replica
                .is_none()
            || self.rng.gen_range(0..10) < 3
        {
            self.sessions[s].site = self.rng.gen_range(0..n);
            self.sessions[s].waiting_since = None;
        }
        let site = self.sessions[s].site;
        let node = self.node(site, part);
        let roll = self.rng.gen_range(0..10);
        let next = self.rng.gen_range(5 * MS..60 * MS);
        if self.sites[node].replica.is_none() {
            self.schedule(next, Event::Client(s));
            return;
        }
        if roll < 5 {
            // Half the writes read the key first (read-modify-write), so the value they replace
            // is in their causal past.
            if self.rng.gen_range(0..2) == 0 && !self.read_op(s, sid, site, node, &key) {
                self.schedule(next, Event::Client(s));
                return;
            }
            self.write_op(s, sid, site, node, key, roll == 0);
        } else {
            self.read_op(s, sid, site, node, &key);
        }
        self.schedule(next, Event::Client(s));
    }
}

/// What varies between the tests: partitions per site and the planted bugs.
#[derive(Clone, Copy, Debug)]
struct Variant {
    partitions: usize,
    pipeline: bool,
    check_deps: bool,
    check_stable: bool,
    close_contexts: bool,
    check_copy_order: bool,
}

const CORRECT: Variant = Variant {
    partitions: 1,
    pipeline: false,
    check_deps: true,
    check_stable: true,
    close_contexts: true,
    check_copy_order: true,
};

fn run_seed(seed: u64, v: Variant) -> Outcome {
    Sim::new(SimConfig {
        seed,
        check_deps: v.check_deps,
        partitions: v.partitions,
        check_stable: v.check_stable,
        close_contexts: v.close_contexts,
        pipeline: v.pipeline,
        check_copy_order: v.check_copy_order,
        active: 8 * SEC,
        faults: true,
    })
    .run()
}

/// The seeds to run: `SIM_SEED` replays one; `SIM_SEEDS` sets how many (default 16).
fn seeds(default: u64) -> Vec<u64> {
    if let Ok(s) = std::env::var("SIM_SEED") {
        return vec![s.parse().expect("SIM_SEED must be a number")];
    }
    let n = std::env::var("SIM_SEEDS")
        .ok()
        .map(|s| s.parse().expect("SIM_SEEDS must be a number"))
        .unwrap_or(default);
    (0..n).collect()
}

/// Runs `seeds` on all cores, returning `(seed, outcome)` in seed order.
fn run_many(seeds: &[u64], v: Variant) -> Vec<(u64, Outcome)> {
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
    let next = std::sync::atomic::AtomicUsize::new(0);
    let results = std::sync::Mutex::new(Vec::new());
    std::thread::scope(|sc| {
        for _ in 0..threads {
            sc.spawn(|| {
                loop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let Some(&seed) = seeds.get(i) else { break };
                    let out = run_seed(seed, v);
                    results.lock().unwrap().push((seed, out));
                }
            });
        }
    });
    let mut r = results.into_inner().unwrap();
    r.sort_by_key(|(s, _)| *s);
    r
}

/// Runs the correct replicas with `partitions` per site over the seeds and asserts a clean
/// history and convergence on every one.
fn check_all_seeds(partitions: usize) {
    let seeds = seeds(16);
    let v = Variant {
        partitions,
        ..CORRECT
    };
    let results = run_many(&seeds, v);
    let mut failed = Vec::new();
    let (mut ops, mut crashes, mut parts, mut lost, mut maxbuf, mut contrib) = (0, 0, 0, 0, 0, 0);
    let (mut copies, mut copies_used) = (0, 0);
    for (seed, out) in &results {
        ops += out.stats.ops;
        copies += out.stats.copies;
        copies_used += out.stats.copies_used;
        crashes += out.stats.crashes;
        parts += out.stats.partitions;
        lost += out.stats.lost_messages;
        contrib += out.stats.contributions;
        maxbuf = maxbuf.max(out.stats.max_buffered);
        if !out.report.is_ok() || out.converged.is_err() {
            eprintln!(
                "seed {seed} with {partitions} partitions FAILED (replay: SIM_SEED={seed} cargo test --release --test sim)\n{}\n{:?}\n{:?}",
                out.report, out.converged, out.stats
            );
            failed.push(*seed);
        }
    }
    println!(
        "{} seeds, {partitions} partition(s) per site: {ops} ops checked, {crashes} crashes, {parts} partitions, {lost} lost messages, {contrib} stable-vector exchanges, max buffered {maxbuf}, {copies} batch copies ({copies_used} delivered an item first)",
        results.len()
    );
    assert!(failed.is_empty(), "failing seeds: {failed:?}");
    assert!(ops > 0);
    assert!(copies_used > 0, "no copy ever overtook its stream");
}

#[test]
fn causal_consistency_and_convergence_under_faults() {
    check_all_seeds(1);
}

#[test]
fn two_partitions_per_site() {
    check_all_seeds(2);
}

#[test]
fn four_partitions_per_site() {
    check_all_seeds(4);
}

/// Runs a planted bug over 64 seeds and asserts the checker reports violations.
fn assert_caught(v: Variant, what: &str) {
    let seeds: Vec<u64> = (0..64).collect();
    let results = run_many(&seeds, v);
    let violations: usize = results.iter().map(|(_, o)| o.report.violations.len()).sum();
    let caught = results
        .iter()
        .filter(|(_, o)| !o.report.violations.is_empty())
        .count();
    for (seed, out) in &results {
        println!("seed {seed} {what}: {}", out.report);
    }
    println!("{what}: {violations} violations reported in {caught} of 64 seeds");
    assert!(violations > 0, "the checker must report violations {what}");
}

#[test]
fn checker_catches_missing_dependency_checks() {
    // The planted bug: remote updates are applied without waiting for their dependencies.
    let v = Variant {
        check_deps: false,
        ..CORRECT
    };
    assert_caught(v, "without dependency checks");
}

#[test]
fn checker_catches_copies_taken_out_of_stream_order() {
    // The planted bug: a copy of a stream frame is taken as it arrives, even when the frames
    // before it have not: the items in the gap then count as received and are dropped as
    // duplicates when the stream brings them, so the site never applies them.
    let v = Variant {
        check_copy_order: false,
        ..CORRECT
    };
    let results = run_many(&(0..64).collect::<Vec<_>>(), v);
    let caught: Vec<u64> = results
        .iter()
        .filter(|(_, o)| !o.report.is_ok() || o.converged.is_err())
        .map(|(seed, _)| *seed)
        .collect();
    for (seed, out) in &results {
        println!(
            "seed {seed} copies out of order: {} {:?}",
            out.report, out.converged
        );
    }
    println!(
        "copies out of order: caught in {} of 64 seeds",
        caught.len()
    );
    assert!(
        !caught.is_empty(),
        "the simulation must catch copies taken out of order"
    );
}

/// The pipeline workload at two partitions per site, on 64 seeds, with every fault kind.
fn pipeline(v: Variant) -> Vec<(u64, Outcome)> {
    run_many(&(0..64).collect::<Vec<_>>(), v)
}

const PIPELINE: Variant = Variant {
    partitions: 2,
    pipeline: true,
    ..CORRECT
};

#[test]
fn skipped_stable_vector_check_makes_sessions_wait_on_the_network() {
    // The planted bug: a partition checks deps against its own `applied` only, not against the
    // site's stable vector, so it exposes updates whose dependencies have not reached the other
    // partitions. Sessions stay safe (their contexts are closed, and the next partition waits
    // for what it lacks), but a session that follows what it read must wait on the network,
    // which the stable vector exists to prevent. The pipeline workload makes cross-partition
    // chains through a third site.
    let mut waits = 0;
    for (seed, out) in pipeline(PIPELINE) {
        assert!(
            out.report.is_ok() && out.converged.is_ok() && out.stats.network_waits == 0,
            "seed {seed}, pipeline workload, stable-vector check on: {} network waits\n{}\n{:?}",
            out.stats.network_waits,
            out.report,
            out.converged
        );
    }
    let buggy = Variant {
        check_stable: false,
        ..PIPELINE
    };
    for (seed, out) in pipeline(buggy) {
        assert!(
            out.report.is_ok(),
            "seed {seed}: without the stable-vector check sessions must still be safe: {}",
            out.report
        );
        waits += out.stats.network_waits;
    }
    println!("without the stable-vector check: {waits} reads waited on the network");
    assert!(
        waits > 0,
        "the skipped stable-vector check must show as reads waiting on the network"
    );
}

#[test]
fn checker_catches_open_session_contexts() {
    // The planted bug: reads do not hand back the context their value was written under, so a
    // session's context names what it read but not what that depends on, and a partition
    // whose copy of a dependency is still waiting in its buffer answers without it.
    let buggy = Variant {
        close_contexts: false,
        ..PIPELINE
    };
    assert_caught(buggy, "without closed session contexts");
}

#[test]
fn same_seed_replays_exactly() {
    for partitions in [1, 2] {
        let v = Variant {
            partitions,
            ..CORRECT
        };
        let a = run_seed(7, v);
        let b = run_seed(7, v);
        assert_eq!(a.stats.ops, b.stats.ops);
        assert_eq!(a.stats.lost_messages, b.stats.lost_messages);
        assert_eq!(format!("{}", a.report), format!("{}", b.report));
    }
}
