//! The strong operations as the node runs them: this node's voter in its partition's Raft group
//! ([`crate::consensus`]), the group's RPCs over the peer links, and the execution of client
//! requests (forwarded to the leader's site when this site does not lead).
//!
//! Transport: every Raft RPC (append entries and heartbeats, votes, whole snapshots) and every
//! forwarded strong request is a bidirectional QUIC stream of its own, opened on the mutually
//! authenticated connection this node dialled to the peer (the one that carries this site's
//! update stream, [`super::peer`]). The peer serves such streams after the connection's hello.
//! So a heartbeat or a vote never waits behind replication traffic or another RPC: QUIC
//! streams are independent. A peer with no connection is reported
//! [`Unreachable`](openraft::error::Unreachable), which makes openraft back off rather than
//! retry at once.
//!
//! Requests: a write is proposed at the leader (`client_write`), a read is linearizable by
//! read-index (`ensure_linearizable`: the leader confirms its leadership with a majority, then
//! waits until its state machine has applied the read index) and is then served from the
//! state machine. At a follower, the request is forwarded to the leader's site over the peer
//! link; a retry after a failed forward reuses the write's `(client, serial)`, so the write
//! is applied at most once. With no leader or no majority before the deadline, a request fails
//! with `Unavailable` naming what is missing; a write that was proposed but not committed by
//! the deadline reports an unknown outcome.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use openraft::error::{
    CheckIsLeaderError, ClientWriteError, Fatal, NetworkError, RPCError, RaftError, RemoteError,
    ReplicationClosed, StreamingError, Unreachable,
};
use openraft::network::RPCOption;
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, SnapshotResponse, VoteRequest, VoteResponse,
};
use openraft::{RaftNetwork, RaftNetworkFactory, ServerState};
use quinn::{Connection, RecvStream, SendStream, VarInt};
use tracing::{debug, info, warn};

use super::metrics::{Histogram, Metrics};
use crate::config::SiteConfig;
use crate::consensus::log::LogStore;
use crate::consensus::members::{
    MAX_SITES, MEMBERSHIP_CLIENT, Membership, SitesOp, internal_serial,
};
use crate::consensus::sm::{StateMachine, StrongState};
use crate::consensus::{self, Forwarded, NodeId, Outcome, Raft, Rpc, RpcReply, TypeConfig};
use crate::wire::{ConsensusStatus, VoterStatus, close_code, read_frame, write_frame};

/// Largest Raft RPC frame accepted (a whole snapshot travels in one).
const MAX_RPC_FRAME: usize = 1 << 30;

/// How often a leader asks a joining site whether it covers its floor yet
/// ([`Strong::drive_joins`]).
const FLOOR_POLL: Duration = Duration::from_millis(100);

/// The longest the batcher holds a write back to gather concurrent ones into its entry.
const GATHER: Duration = Duration::from_millis(2);

/// The error of a proposed write.
type WriteError = RaftError<NodeId, ClientWriteError<NodeId, openraft::EmptyNode>>;

/// A write waiting in the batcher, with where its reply goes.
type Proposal = (
    consensus::Command,
    tokio::sync::oneshot::Sender<Result<consensus::Reply, WriteError>>,
);

/// Options that only tests set, to plant bugs the strong tests must catch.
#[derive(Clone, Copy, Debug, Default)]
pub struct StrongOptions {
    /// Serve strong reads from this node's local state machine, without read-index or
    /// forwarding (not linearizable).
    pub local_reads: bool,
    /// Answer strong reads without the causal context stored with the value.
    pub drop_context: bool,
    /// Test-only: while a file [`PAUSE_JOINT_FILE`] is in the data directory, this node's Raft
    /// log holds back the entry that ends a joint configuration
    /// ([`LogStore::pause_before_uniform`]), so that a test can kill a leader in the middle of
    /// joint consensus.
    pub pause_joint: bool,
}

/// The file whose presence in the data directory pauses a membership change in joint
/// consensus when [`StrongOptions::pause_joint`] is set (tests only).
pub const PAUSE_JOINT_FILE: &str = "test-pause-joint";

/// Counters and histograms of the consensus layer.
#[derive(Debug, Default)]
pub struct StrongMetrics {
    /// Elections this node has seen start (term changes).
    pub elections: AtomicU64,
    /// Changes of the known leader.
    pub leader_changes: AtomicU64,
    /// Latency of a proposal to its commit and apply at the leader.
    pub commit: Histogram,
    /// Strong requests that failed with `Unavailable`.
    pub unavailable: AtomicU64,
    /// Strong writes whose outcome was unknown at their deadline.
    pub unknown: AtomicU64,
    /// Requests forwarded to the leader's site.
    pub forwarded: AtomicU64,
    /// Malformed consensus frames received (the stream is closed; the node keeps serving).
    pub malformed: AtomicU64,
}

/// The peer connections Raft RPCs ride: per site, the connection this node dialled to it.
#[derive(Default)]
pub(crate) struct Links {
    conns: Vec<Mutex<Option<Connection>>>,
    /// Per site: when (ms since `epoch`) an RPC to it last got a reply.
    answered: Vec<AtomicU64>,
    epoch: Option<Instant>,
    /// Bytes of RPC frames sent and replies written (length prefixes included).
    bytes_out: AtomicU64,
    /// The failure detector's inputs (see [`Strong::watch`]).
    detector: Detector,
    /// Signalled whenever a connection comes up ([`Links::get_within`]).
    up: tokio::sync::Notify,
}

/// What the failure detector of [`Strong::watch`] learns from the RPCs, in ms since the
/// epoch of [`Links`].
#[derive(Default)]
struct Detector {
    /// When an append-entries (heartbeats included) of a committed leader was last accepted.
    heard_leader: AtomicU64,
    /// Until when this node should not stand: a voter answered its vote request with a longer
    /// log, so that voter (not this node) can win the next election.
    shorter_until: AtomicU64,
    /// How long (ms) a candidate that met a longer log holds back: the longest election
    /// timeout, as openraft's own timer does (it adds twice that).
    hold_ms: u64,
}

impl Links {
    /// Slots for every site a cluster can have: site ids grow as sites are added, and the
    /// majority is counted over the group's voters, not over these slots.
    fn new(hold_ms: u64) -> Links {
        Links {
            conns: (0..MAX_SITES).map(|_| Mutex::new(None)).collect(),
            answered: (0..MAX_SITES).map(|_| AtomicU64::new(0)).collect(),
            epoch: Some(Instant::now()),
            bytes_out: AtomicU64::new(0),
            detector: Detector {
                heard_leader: AtomicU64::new(1),
                hold_ms,
                ..Detector::default()
            },
            up: tokio::sync::Notify::new(),
        }
    }

    /// The connection to `site`, waiting up to `within` for one to come up. A node's voter
    /// starts before its peer links, so its first vote requests would otherwise find no
    /// connection and fail at once (and openraft logs each such failure as an error).
    async fn get_within(&self, site: NodeId, within: Duration) -> Option<Connection> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let up = self.up.notified();
            tokio::pin!(up);
            up.as_mut().enable();
            if let Some(c) = self.get(site) {
                return Some(c);
            }
            if tokio::time::timeout_at(deadline, up).await.is_err() {
                return None;
            }
        }
    }

    /// An append-entries of a committed leader was accepted.
    fn heard_leader(&self) {
        self.detector
            .heard_leader
            .store(self.now_ms(), Ordering::Relaxed);
    }

    /// Learns from the answer to this node's vote request with last log `last`.
    fn vote_answered(&self, last: Option<openraft::LogId<NodeId>>, resp: &VoteResponse<NodeId>) {
        if resp.vote_granted {
            return;
        }
        if resp.last_log_id > last {
            // The other voter has a longer log: it will not vote for us, and we will for it.
            let hold = self.now_ms() + self.detector_hold_ms();
            self.detector
                .shorter_until
                .fetch_max(hold, Ordering::Relaxed);
        }
    }

    /// How long a candidate that met a longer log holds back before standing again.
    fn detector_hold_ms(&self) -> u64 {
        self.detector.hold_ms
    }

    fn now_ms(&self) -> u64 {
        self.epoch.map_or(0, |e| e.elapsed().as_millis() as u64 + 1)
    }

    fn answered_by(&self, site: NodeId) {
        if let Some(a) = self.answered.get(site as usize) {
            a.store(self.now_ms(), Ordering::Relaxed);
        }
    }

    /// Whether a majority of `voters` (counting `me`) answered an RPC within `window`.
    fn majority_heard_within(
        &self,
        me: NodeId,
        window: Duration,
        voters: &BTreeSet<NodeId>,
    ) -> bool {
        let now = self.now_ms();
        let heard = voters
            .iter()
            .filter(|&&s| {
                s == me
                    || self.answered.get(s as usize).is_some_and(|a| {
                        let t = a.load(Ordering::Relaxed);
                        t > 0 && now.saturating_sub(t) <= window.as_millis() as u64
                    })
            })
            .count();
        heard > voters.len() / 2
    }

    fn get(&self, site: NodeId) -> Option<Connection> {
        let c = self.conns.get(site as usize)?.lock().expect("links lock");
        c.as_ref().filter(|c| c.close_reason().is_none()).cloned()
    }
}

/// Why an RPC failed.
#[derive(Debug, thiserror::Error)]
enum CallError {
    /// Nothing reached the peer.
    #[error("site {0} unreachable: {1}")]
    NotSent(NodeId, String),
    /// The request may have reached the peer; no answer came.
    #[error("site {0}: {1}")]
    AfterSend(NodeId, String),
    /// No answer within the time allowed.
    #[error("site {0}: no answer within {1:?}")]
    Timeout(NodeId, Duration),
}

/// Sends `rpc` to `target` on a stream of its own and reads the reply, within `ttl`.
async fn call(
    links: &Links,
    target: NodeId,
    rpc: &Rpc,
    ttl: Duration,
) -> Result<RpcReply, CallError> {
    let conn = links
        .get(target)
        .ok_or_else(|| CallError::NotSent(target, "no connection".into()))?;
    let bytes = consensus::encode(rpc);
    let sent = std::sync::atomic::AtomicBool::new(false);
    let exchange = async {
        let (mut send, mut recv) = conn
            .open_bi()
            .await
            .map_err(|e| CallError::NotSent(target, e.to_string()))?;
        sent.store(true, Ordering::Relaxed);
        links.bytes_out.fetch_add(
            crate::wire::framed_len(bytes.len()) as u64,
            Ordering::Relaxed,
        );
        write_frame(&mut send, &bytes)
            .await
            .map_err(|e| CallError::AfterSend(target, e.to_string()))?;
        let _ = send.finish();
        let frame = read_frame(&mut recv, MAX_RPC_FRAME)
            .await
            .map_err(|e| CallError::AfterSend(target, e.to_string()))?
            .ok_or_else(|| CallError::AfterSend(target, "stream closed without a reply".into()))?;
        let reply =
            consensus::decode::<RpcReply>(&frame).map_err(|e| CallError::AfterSend(target, e))?;
        links.answered_by(target);
        Ok(reply)
    };
    match tokio::time::timeout(ttl, exchange).await {
        Ok(r) => r,
        Err(_) if !sent.load(Ordering::Relaxed) => Err(CallError::NotSent(
            target,
            format!("no stream within {ttl:?}"),
        )),
        Err(_) => Err(CallError::Timeout(target, ttl)),
    }
}

/// The network factory openraft uses: RPC clients over [`Links`].
#[derive(Clone)]
pub(crate) struct Network {
    links: Arc<Links>,
}

/// An RPC client to one peer.
///
/// Commit-index heartbeats do not hold up the next entries. openraft 0.9 keeps one
/// append-entries RPC in flight per follower, and after every commit it sends an empty append
/// that only carries the new commit index; a write that arrives meanwhile waits a whole round
/// trip for it, so a lone writer paid two round trips per write. So on a client that has
/// replicated entries (a replication stream's, not the fresh clients of a read-index check,
/// which must hear real answers), an empty append is sent on its own stream and answered at
/// once with `Success`: an empty append whose `prev_log_id` is the follower's acknowledged
/// match changes nothing the leader relies on (a follower never truncates for an empty
/// append, and applies a commit index only up to what it holds). Its real answer is kept: a
/// higher vote (this leader was deposed) is returned by the next call, one heartbeat later.
pub(crate) struct PeerClient {
    links: Arc<Links>,
    target: NodeId,
    /// Whether this client has sent entries (then it is a replication stream's).
    replicates: bool,
    /// A higher vote answered to a heartbeat acknowledged early, for the next call.
    deferred: Arc<Mutex<Option<AppendEntriesResponse<NodeId>>>>,
}

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = PeerClient;

    async fn new_client(&mut self, target: NodeId, _node: &openraft::EmptyNode) -> PeerClient {
        PeerClient {
            links: self.links.clone(),
            target,
            replicates: false,
            deferred: Arc::default(),
        }
    }
}

fn rpc_error<E: std::error::Error>(
    target: NodeId,
    e: CallError,
    action: openraft::RPCTypes,
    me: NodeId,
) -> RPCError<NodeId, openraft::EmptyNode, E> {
    match e {
        CallError::NotSent(..) => RPCError::Unreachable(Unreachable::new(&e)),
        CallError::AfterSend(..) => RPCError::Network(NetworkError::new(&e)),
        CallError::Timeout(_, timeout) => RPCError::Timeout(openraft::error::Timeout {
            action,
            id: me,
            target,
            timeout,
        }),
    }
}

fn unexpected(target: NodeId, what: &str, got: &RpcReply) -> NetworkError {
    let e = std::io::Error::other(format!("site {target} answered {what} with {got:?}"));
    NetworkError::new(&e)
}

impl RaftNetwork<TypeConfig> for PeerClient {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<
        AppendEntriesResponse<NodeId>,
        RPCError<NodeId, openraft::EmptyNode, RaftError<NodeId>>,
    > {
        let me = rpc.vote.leader_id().voted_for().unwrap_or_default();
        if let Some(higher) = self.deferred.lock().expect("deferred lock").take() {
            return Ok(higher);
        }
        if rpc.entries.is_empty() && self.replicates {
            let (links, target, deferred) =
                (self.links.clone(), self.target, self.deferred.clone());
            let ttl = option.hard_ttl();
            tokio::spawn(async move {
                if let Ok(RpcReply::Append(Ok(r @ AppendEntriesResponse::HigherVote(_)))) =
                    call(&links, target, &Rpc::Append(rpc), ttl).await
                {
                    *deferred.lock().expect("deferred lock") = Some(r);
                }
            });
            return Ok(AppendEntriesResponse::Success);
        }
        self.replicates |= !rpc.entries.is_empty();
        // As for votes: a link still being dialled gets half the time to come up.
        self.links
            .get_within(self.target, option.hard_ttl() / 2)
            .await;
        match call(
            &self.links,
            self.target,
            &Rpc::Append(rpc),
            option.hard_ttl(),
        )
        .await
        {
            Ok(RpcReply::Append(r)) => {
                r.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
            }
            Ok(other) => Err(RPCError::Network(unexpected(self.target, "append", &other))),
            Err(e) => Err(rpc_error(
                self.target,
                e,
                openraft::RPCTypes::AppendEntries,
                me,
            )),
        }
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RPCError<NodeId, openraft::EmptyNode, RaftError<NodeId>>>
    {
        let me = rpc.vote.leader_id().voted_for().unwrap_or_default();
        let last = rpc.last_log_id;
        // A link still being dialled (this node just started): wait for it, within half the
        // time the request has, rather than fail it at once.
        self.links
            .get_within(self.target, option.hard_ttl() / 2)
            .await;
        match call(&self.links, self.target, &Rpc::Vote(rpc), option.hard_ttl()).await {
            Ok(RpcReply::Vote(r)) => {
                if let Ok(resp) = &r {
                    self.links.vote_answered(last, resp);
                }
                r.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
            }
            Ok(other) => Err(RPCError::Network(unexpected(self.target, "vote", &other))),
            Err(e) => Err(rpc_error(self.target, e, openraft::RPCTypes::Vote, me)),
        }
    }

    async fn full_snapshot(
        &mut self,
        vote: openraft::Vote<NodeId>,
        snapshot: openraft::Snapshot<TypeConfig>,
        cancel: impl std::future::Future<Output = ReplicationClosed> + openraft::OptionalSend + 'static,
        option: RPCOption,
    ) -> Result<SnapshotResponse<NodeId>, StreamingError<TypeConfig, Fatal<NodeId>>> {
        let rpc = Rpc::Snapshot {
            vote,
            meta: snapshot.meta,
            data: *snapshot.snapshot,
        };
        let me = vote.leader_id().voted_for().unwrap_or_default();
        let sending = call(&self.links, self.target, &rpc, option.hard_ttl());
        let result = tokio::select! {
            r = sending => r,
            closed = cancel => return Err(StreamingError::Closed(closed)),
        };
        match result {
            Ok(RpcReply::Snapshot(Ok(r))) => Ok(r),
            Ok(RpcReply::Snapshot(Err(e))) => {
                let e = std::io::Error::other(e);
                Err(StreamingError::Network(NetworkError::new(&e)))
            }
            Ok(other) => Err(StreamingError::Network(unexpected(
                self.target,
                "snapshot",
                &other,
            ))),
            Err(e) => Err(
                match rpc_error::<Fatal<NodeId>>(
                    self.target,
                    e,
                    openraft::RPCTypes::InstallSnapshot,
                    me,
                ) {
                    RPCError::Unreachable(u) => StreamingError::Unreachable(u),
                    RPCError::Timeout(t) => StreamingError::Timeout(t),
                    RPCError::Network(n) => StreamingError::Network(n),
                    other => {
                        let e = std::io::Error::other(other.to_string());
                        StreamingError::Network(NetworkError::new(&e))
                    }
                },
            ),
        }
    }
}

/// This node's voter in its partition's Raft group.
pub(crate) struct Strong {
    pub raft: Raft,
    pub state: Arc<RwLock<StrongState>>,
    /// The cluster configuration as the state machine applies it ([`Strong::watch_sites`]).
    sites: tokio::sync::watch::Receiver<Option<Membership>>,
    log: LogStore,
    links: Arc<Links>,
    me: NodeId,
    /// Site names by id (the replicated configuration's once the node has adopted it).
    names: RwLock<Vec<String>>,
    /// Partition index 0's node: the cluster configuration its file's `[[sites]]` seed, which
    /// it proposes while leading a group that holds none ([`Strong::bootstrap_sites`]).
    seed: Option<Membership>,
    /// A bootstrap proposal is under way.
    bootstrapping: std::sync::atomic::AtomicBool,
    /// This node serves partition index 0: its group holds the cluster configuration.
    partition0: bool,
    /// This leader is bringing a joining site into the group ([`Strong::drive_joins`]).
    joining: std::sync::atomic::AtomicBool,
    /// While this leader waits for a joining site to cover its floor before making it
    /// active: the site and the entries it last reported behind ([`Strong::join_behind`]).
    floor_wait: std::sync::Mutex<Option<(NodeId, String)>>,
    pub opts: StrongOptions,
    pub metrics: StrongMetrics,
    election_max: Duration,
    /// Longest one step of bringing a joining site in may take (`join_step_ms`), then it is
    /// retried at a later tick ([`Strong::drive_joins`]).
    join_step: Duration,
    heartbeat: Duration,
    /// A leader whose last majority ack is older than this refuses new writes.
    quorum_stale_ms: u64,
    preferred: Option<NodeId>,
    /// Writes for the batcher ([`Strong::batcher`]).
    proposals: tokio::sync::mpsc::UnboundedSender<Proposal>,
    /// Answers the RPCs about the replica's state ([`Rpc::Applied`], [`Rpc::Relay`]), which
    /// ride the same peer streams ([`Strong::set_local`]).
    local: std::sync::OnceLock<LocalAnswer>,
    /// A change of the group's voters (dropping removed sites) is under way.
    changing_voters: std::sync::atomic::AtomicBool,
}

/// Answers an RPC about the node's replica; `None` for one it does not serve.
pub(crate) type LocalAnswer = Box<dyn Fn(&Rpc) -> Option<RpcReply> + Send + Sync>;

impl Strong {
    /// Opens the group's log and state machine under `<data_dir>/raft` and starts the voter.
    /// Every voter of a pristine group initialises it with the same membership (all sites),
    /// which openraft allows.
    pub async fn start(cfg: &SiteConfig, opts: StrongOptions) -> std::io::Result<Arc<Strong>> {
        let dir = cfg.data_dir.join("raft");
        let pause = opts
            .pause_joint
            .then(|| cfg.data_dir.join(PAUSE_JOINT_FILE));
        let (log, sm) = tokio::task::spawn_blocking(move || {
            let mut log = LogStore::open(&dir.join("raft.log"))?;
            if let Some(flag) = pause {
                log.pause_before_uniform(flag);
            }
            let sm = StateMachine::open(&dir)?;
            log.bound_purges_by(sm.snapshot_point());
            Ok::<_, std::io::Error>((log, sm))
        })
        .await
        .map_err(std::io::Error::other)??;
        let rc = consensus::raft_config(&cfg.consensus, &cfg.cluster_id, cfg.partition)
            .validate()
            .map_err(std::io::Error::other)?;
        let links = Arc::new(Links::new(cfg.consensus.election_max_ms));
        let network = Network {
            links: links.clone(),
        };
        let me = cfg.site_id as NodeId;
        let state = sm.state.clone();
        let sites = sm.watch_sites();
        let raft = Raft::new(me, Arc::new(rc), network, log.clone(), sm)
            .await
            .map_err(std::io::Error::other)?;
        // A joining site never initialises a group: the running cluster's leader adds it as a
        // learner, then as a voter, and its log and state come from that leader.
        if cfg.join_from.is_none() && !raft.is_initialized().await.map_err(std::io::Error::other)? {
            let members: BTreeSet<NodeId> = (0..cfg.n() as NodeId).collect();
            if let Err(e) = raft.initialize(members).await {
                debug!(error = %e, "raft group already initialised");
            }
        }
        let preferred = cfg
            .consensus
            .preferred_leader
            .as_ref()
            .and_then(|p| cfg.sites.iter().find(|s| &s.name == p))
            .map(|s| s.id as NodeId);
        let (proposals, queued) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(Self::batcher(raft.clone(), queued));
        Ok(Arc::new(Strong {
            proposals,
            raft,
            state,
            sites,
            log,
            links,
            me,
            names: RwLock::new(cfg.sites.iter().map(|s| s.name.clone()).collect()),
            seed: (cfg.partition == 0 && cfg.join_from.is_none())
                .then(|| Membership::from_entries(&cfg.sites)),
            bootstrapping: Default::default(),
            partition0: cfg.partition == 0,
            joining: Default::default(),
            floor_wait: Default::default(),
            opts,
            metrics: StrongMetrics::default(),
            election_max: Duration::from_millis(cfg.consensus.election_max_ms),
            join_step: Duration::from_millis(cfg.consensus.join_step_ms),
            heartbeat: Duration::from_millis(cfg.consensus.heartbeat_ms),
            quorum_stale_ms: cfg.consensus.election_min_ms,
            preferred,
            local: std::sync::OnceLock::new(),
            changing_voters: Default::default(),
        }))
    }

    /// Sets what answers the RPCs about the node's replica (once).
    pub fn set_local(&self, answer: LocalAnswer) {
        let _ = self.local.set(answer);
    }

    /// Sends `rpc` to `site` over the peer link and waits (up to `timeout`) for its answer.
    pub async fn ask(
        &self,
        site: NodeId,
        rpc: &Rpc,
        timeout: Duration,
    ) -> Result<RpcReply, String> {
        call(&self.links, site, rpc, timeout)
            .await
            .map_err(|e| e.to_string())
    }

    /// While this node leads its group: drops the sites the cluster configuration says are
    /// removed from the group's voters (and learners) with `change_membership`, which openraft
    /// runs as joint consensus (a majority of the old voters and of the new ones must agree,
    /// so a dead voter is tolerated). A joint configuration left behind by a leader that
    /// crashed mid-change is finished the same way: the change is retried on every tick of
    /// the watcher until the voters are exactly the sites not removed.
    fn drop_removed_voters(self: &Arc<Self>) {
        let Some(m) = self.membership() else { return };
        let removed: BTreeSet<NodeId> = m
            .sites
            .iter()
            .filter(|s| s.state.is_removed())
            .map(|s| s.id as NodeId)
            .collect();
        if removed.is_empty() {
            return;
        }
        let mc = self.raft.metrics().borrow().membership_config.clone();
        let joint = mc.membership().get_joint_config().len() > 1;
        let voters: BTreeSet<NodeId> = mc.membership().voter_ids().collect();
        let learners = mc.membership().learner_ids().any(|l| removed.contains(&l));
        if voters.is_disjoint(&removed) && !joint && !learners {
            return;
        }
        if self.changing_voters.swap(true, Ordering::SeqCst) {
            return;
        }
        let keep: BTreeSet<NodeId> = voters.difference(&removed).copied().collect();
        // Voters first (replacing the voter set drops removed voters from the nodes too);
        // once none is left, removed learners (a joining site removed as dead before it became
        // a voter), which replacing the voters would keep, and so propose again and again.
        let change: openraft::ChangeMembers<NodeId, openraft::EmptyNode> =
            if voters.is_disjoint(&removed) && !joint {
                openraft::ChangeMembers::RemoveNodes(
                    mc.membership()
                        .learner_ids()
                        .filter(|l| removed.contains(l))
                        .collect(),
                )
            } else {
                openraft::ChangeMembers::ReplaceAllVoters(keep.clone())
            };
        let this = self.clone();
        tokio::spawn(async move {
            let names: Vec<String> = removed.iter().map(|&s| this.name(s)).collect();
            match this.raft.change_membership(change, false).await {
                Ok(_) => info!(
                    removed = ?names,
                    voters = ?keep.iter().map(|&s| this.name(s)).collect::<Vec<_>>(),
                    "removed sites dropped from the Raft group"
                ),
                Err(e) => {
                    debug!(error = %e, "dropping removed sites from the Raft group: to be retried")
                }
            }
            this.changing_voters.store(false, Ordering::SeqCst);
        });
    }

    /// Bytes of Raft RPC frames and replies this node has sent over peer links.
    pub fn rpc_bytes_out(&self) -> u64 {
        self.links.bytes_out.load(Ordering::Relaxed)
    }

    /// The connection this node dialled to `site` is up (`Some`) or gone (`None`, only if it
    /// is still the one registered).
    pub fn set_link(&self, site: NodeId, conn: Option<&Connection>) {
        let Some(slot) = self.links.conns.get(site as usize) else {
            return;
        };
        let mut slot = slot.lock().expect("links lock");
        match conn {
            Some(c) => {
                *slot = Some(c.clone());
                drop(slot);
                self.links.up.notify_waiters();
            }
            None => *slot = None,
        }
    }

    fn name(&self, site: NodeId) -> String {
        let names = self.names.read().expect("names lock");
        names.get(site as usize).map_or("?".into(), Clone::clone)
    }

    /// Takes the site names by id (from the replicated configuration).
    pub fn set_names(&self, names: Vec<String>) {
        *self.names.write().expect("names lock") = names;
    }

    /// The cluster configuration this node's group holds: partition index 0's, once
    /// bootstrapped (`None` before, and at every other partition).
    pub fn membership(&self) -> Option<Membership> {
        self.state.read().expect("state lock").sites.clone()
    }

    /// The cluster configuration as this node's group applies it: the current one, then each
    /// change as it commits here (partition index 0's group; always `None` at the others).
    /// A node adopts changes live from this.
    pub fn watch_sites(&self) -> tokio::sync::watch::Receiver<Option<Membership>> {
        self.sites.clone()
    }

    /// Where site `id` stands in this group's membership: `voter`, `voter (joint)` (a voter of
    /// the new set while the change is in joint consensus), `learner`, or `None`.
    pub fn role_of(&self, id: NodeId) -> Option<&'static str> {
        let m = self.raft.metrics().borrow().membership_config.clone();
        if m.membership().get_joint_config().len() > 1
            && m.membership().voter_ids().any(|v| v == id)
        {
            // Between the two steps of joint consensus (old and new voter sets both decide).
            Some("voter (joint)")
        } else if m.membership().voter_ids().any(|v| v == id) {
            Some("voter")
        } else if m.membership().learner_ids().any(|v| v == id) {
            Some("learner")
        } else {
            None
        }
    }

    /// The group's voters, as its membership stands.
    fn voters(&self) -> BTreeSet<NodeId> {
        let m = self.raft.metrics().borrow().membership_config.clone();
        m.membership().voter_ids().collect()
    }

    /// While this node leads partition index 0's group and the group holds no cluster
    /// configuration, proposes the one its file's `[[sites]]` seed (once at a time; the
    /// watcher calls this on every tick). The first bootstrap committed wins; a later one, from
    /// another leader, is refused by the state machine and changes nothing.
    fn bootstrap_sites(self: &Arc<Self>) {
        let Some(seed) = &self.seed else { return };
        if self.state.read().expect("state lock").sites.is_some()
            || self.bootstrapping.swap(true, Ordering::SeqCst)
        {
            return;
        }
        let this = self.clone();
        let op = SitesOp::Bootstrap(seed.clone());
        let cmd = consensus::Command {
            client: MEMBERSHIP_CLIENT,
            serial: internal_serial(0, &op),
            ctx: Vec::new(),
            op: consensus::WriteOp::Sites(op),
        };
        tokio::spawn(async move {
            match this
                .execute(Forwarded::Write(cmd), this.election_max, false)
                .await
            {
                Outcome::Applied(consensus::Reply::Membership(Ok(epoch))) => {
                    info!(
                        epoch,
                        "cluster configuration bootstrapped from this site's [[sites]]"
                    );
                }
                Outcome::Applied(consensus::Reply::Membership(Err(why))) => {
                    debug!(%why, "cluster configuration not bootstrapped");
                }
                other => debug!(?other, "cluster configuration bootstrap to be retried"),
            }
            this.bootstrapping.store(false, Ordering::SeqCst);
        });
    }

    /// While this node leads partition index 0's group and the configuration has a joining
    /// site: brings it into the group, one step at a time, each step skipped when done already
    /// (so a leader that takes over from one that failed mid-way finishes the change):
    /// 1. `add_learner(site, blocking)`: returns once the learner's log has caught up;
    /// 2. `change_membership(voters + site)`: joint consensus (old and new voter sets must
    ///    both agree until the second membership entry commits); a joint configuration left by
    ///    a leader that failed is completed by the same call;
    /// 3. once the site reports that it covers its floor (the vector it must reach before it
    ///    serves, [`Rpc::Floor`]), [`SitesOp::Activate`]: the site is a full member.
    ///
    /// One change at a time; each step is bounded by `join_step_ms`, then retried at a later
    /// tick (a learner that is not reachable yet must not hold the driver forever).
    fn drive_joins(self: &Arc<Self>) {
        if !self.partition0 {
            return;
        }
        let Some(m) = self.membership() else { return };
        let Some(j) = m
            .sites
            .iter()
            .find(|s| s.state == crate::consensus::members::MemberState::Joining)
        else {
            return;
        };
        if self.joining.swap(true, Ordering::SeqCst) {
            return;
        }
        let (id, name, epoch) = (j.id, j.name.clone(), m.epoch);
        let this = self.clone();
        tokio::spawn(async move {
            match this.join_steps(id as NodeId, epoch).await {
                Ok(epoch) => info!(site = %name, epoch, "site joined: a voter and active"),
                Err(e) => debug!(site = %name, error = %e, "join step to be retried"),
            }
            this.joining.store(false, Ordering::SeqCst);
        });
    }

    /// The steps of [`Strong::drive_joins`] for site `node` at configuration `epoch`.
    async fn join_steps(&self, node: NodeId, epoch: u64) -> Result<u64, String> {
        let step = |what: &'static str| move |e: String| format!("{what}: {e}");
        let mem = self.raft.metrics().borrow().membership_config.clone();
        let voters: BTreeSet<NodeId> = mem.membership().voter_ids().collect();
        let learners: BTreeSet<NodeId> = mem.membership().learner_ids().collect();
        if !voters.contains(&node) {
            if !learners.contains(&node) {
                // Not before it is up: a learner that is not there yet would only hold the
                // driver (and show a phase it has not reached).
                if self.links.get(node).is_none() {
                    return Err("the joining site is not connected yet".into());
                }
                info!(site = %self.name(node), "joining site: adding it as a Raft learner");
            }
            // Blocking: returns once the learner's log has caught up (also when it is one
            // already, which is how a new leader finds out).
            self.bounded_step(
                "add_learner",
                "the learner has not caught up yet",
                self.raft.add_learner(node, openraft::EmptyNode {}, true),
            )
            .await?;
            // openraft's blocking add_learner may return before the learner has answered
            // (an unreachable learner counts as caught up while the leader's log is short):
            // the learner must have matched the log up to the commit index of now.
            let target = self.log.committed().map(|l| l.index);
            let mut rx = self.raft.metrics();
            let caught_up = async {
                loop {
                    let matched = rx
                        .borrow_and_update()
                        .replication
                        .as_ref()
                        .and_then(|r| r.get(&node).copied().flatten())
                        .map(|l| l.index);
                    if (matched.is_some() && matched >= target) || rx.changed().await.is_err() {
                        return Ok::<(), String>(());
                    }
                }
            };
            self.bounded_step(
                "add_learner",
                "the learner has not caught up with the log yet",
                caught_up,
            )
            .await?;
            info!(site = %self.name(node), "joining site: making it a voter (joint consensus)");
            let mut next = voters.clone();
            next.insert(node);
            self.bounded_step(
                "change_membership",
                "timed out",
                self.raft.change_membership(next, false),
            )
            .await?;
        } else if mem.membership().get_joint_config().len() > 1 {
            // A joint configuration left behind by a leader that failed mid-change: finish it.
            info!(site = %self.name(node), "joining site: finishing the joint configuration a \
                failed leader left");
            self.bounded_step(
                "finishing a joint configuration",
                "timed out",
                self.raft.change_membership(voters, false),
            )
            .await?;
        }
        self.wait_for_floor(node).await.map_err(step("activate"))?;
        let op = SitesOp::Activate {
            expected_epoch: epoch,
            id: node as u16,
        };
        let cmd = consensus::Command {
            client: MEMBERSHIP_CLIENT,
            serial: internal_serial(epoch, &op),
            ctx: Vec::new(),
            op: consensus::WriteOp::Sites(op),
        };
        match self
            .execute(Forwarded::Write(cmd), self.election_max, false)
            .await
        {
            Outcome::Applied(consensus::Reply::Membership(Ok(epoch))) => {
                *self.floor_wait.lock().expect("floor wait lock") = None;
                Ok(epoch)
            }
            Outcome::Applied(consensus::Reply::Membership(Err(why))) => {
                Err(format!("activate: {why}"))
            }
            other => Err(format!("activate: {other:?}")),
        }
    }

    /// Runs one step of [`Strong::join_steps`] under `join_step_ms`. The error is the step's
    /// own, or `late` when it runs out, after `what`.
    async fn bounded_step<T, E: std::fmt::Display>(
        &self,
        what: &str,
        late: &str,
        step: impl std::future::Future<Output = Result<T, E>>,
    ) -> Result<(), String> {
        match tokio::time::timeout(self.join_step, step).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(format!("{what}: {e}")),
            Err(_) => Err(format!("{what}: {late}")),
        }
    }

    /// Waits (up to `join_step_ms`) until the joining site `node` reports that its `applied`
    /// vector covers its floor, asking it every [`FLOOR_POLL`]. The learner's Raft log having
    /// caught up says nothing about its causal state: a site that cannot reach some origin
    /// yet (one that has not applied its addition) would be made active while it still
    /// refuses every client. The error names the entries still behind.
    async fn wait_for_floor(&self, node: NodeId) -> Result<(), String> {
        let name = self.name(node);
        let deadline = tokio::time::Instant::now() + self.join_step;
        let mut logged = false;
        loop {
            let reply = if node == self.me {
                // This site leads the group it is joining: its own replica answers.
                self.local
                    .get()
                    .and_then(|answer| answer(&Rpc::Floor))
                    .ok_or_else(|| "the replica does not answer yet".to_string())
            } else {
                self.ask(node, &Rpc::Floor, self.election_max).await
            };
            let behind = match reply {
                Ok(RpcReply::Floor(gaps)) if gaps.is_empty() => return Ok(()),
                Ok(RpcReply::Floor(gaps)) => gaps
                    .iter()
                    .map(|&(site, have, need)| {
                        format!("{} at {have}, needs {need}", self.name(site as NodeId))
                    })
                    .collect::<Vec<_>>()
                    .join("; "),
                Ok(RpcReply::Malformed(why)) if why.starts_with(consensus::MALFORMED) => {
                    // A site that does not know the question (an older version): it serves
                    // once it covers its floor all the same; only the phase shown is early.
                    warn!(site = %name, %why, "joining site cannot report its floor; \
                        making it active without waiting");
                    return Ok(());
                }
                Ok(other) => format!("unexpected answer {other:?}"),
                Err(e) => format!("no answer ({e})"),
            };
            if !logged {
                info!(site = %name, behind = %behind, "joining site: waiting until it covers \
                    its floor before making it active");
                logged = true;
            }
            *self.floor_wait.lock().expect("floor wait lock") = Some((node, behind.clone()));
            if tokio::time::Instant::now() + FLOOR_POLL > deadline {
                let e = format!("site {name} does not cover its floor yet, behind on: {behind}");
                warn!(error = %e, "joining site not made active yet; retried at a later tick");
                return Err(e);
            }
            tokio::time::sleep(FLOOR_POLL).await;
        }
    }

    /// While this leader waits for joining site `id` to cover its floor before making it
    /// active: the entries it last reported behind (`site at have, needs need; ...`).
    pub fn join_behind(&self, id: NodeId) -> Option<String> {
        if self.raft.metrics().borrow().current_leader != Some(self.me) {
            // A former leader's report is stale; the current leader shows its own.
            return None;
        }
        match &*self.floor_wait.lock().expect("floor wait lock") {
            Some((node, behind)) if *node == id => Some(behind.clone()),
            _ => None,
        }
    }

    /// What is missing for the group to serve: no leader, or which voters cannot be reached.
    fn missing(&self) -> String {
        let m = self.raft.metrics().borrow().clone();
        let n = self.voters().len();
        let majority = n / 2 + 1;
        let reachable: Vec<String> = self
            .voters()
            .into_iter()
            .filter(|&s| s == self.me || self.links.get(s).is_some())
            .map(|s| self.name(s))
            .collect();
        match m.current_leader {
            None => format!(
                "no leader elected (term {}); this site ({}) is connected to {:?}; a leader needs \
                 a majority of {majority} of the {n} sites",
                m.current_term,
                self.name(self.me),
                reachable
            ),
            Some(l) if l == self.me => format!(
                "this site ({}) leads term {} but cannot reach a majority: connected to {:?}, \
                 needs {majority} of {n} sites",
                self.name(self.me),
                m.current_term,
                reachable
            ),
            Some(l) => format!(
                "leader is site {} (term {}); this site ({}) is connected to {:?}",
                self.name(l),
                m.current_term,
                self.name(self.me),
                reachable
            ),
        }
    }

    fn read_local(&self, key: &[u8]) -> Outcome {
        let (value, ctx) = self.state.read().expect("state lock").read(key);
        Outcome::Value { value, ctx }
    }

    /// Waits (up to `max`) for the group's metrics to change: a new term or leader.
    async fn settle(&self, max: Duration) {
        let mut rx = self.raft.metrics();
        rx.borrow_and_update();
        let _ = tokio::time::timeout(max.min(Duration::from_millis(100)), rx.changed()).await;
    }

    /// Proposes one write through the batcher ([`Strong::batcher`]) and waits for its reply.
    async fn propose(&self, cmd: consensus::Command) -> Result<consensus::Reply, WriteError> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        if self.proposals.send((cmd, tx)).is_err() {
            return Err(RaftError::Fatal(Fatal::Stopped));
        }
        rx.await.unwrap_or(Err(RaftError::Fatal(Fatal::Stopped)))
    }

    /// Gathers the writes proposed at this node into log entries ([`consensus::Batch`]).
    ///
    /// openraft 0.9 keeps one append-entries RPC in flight per follower, and starts one as soon
    /// as an entry is appended while none is: so of writes that arrive a few hundred
    /// microseconds apart (clients answered by the same commit come back at about the same
    /// time), the first leaves alone and the rest wait a whole round trip for it. So the
    /// batcher waits, after the first write of a batch, until as many writes as in its previous
    /// batch have arrived, or [`GATHER`] has passed: a lone writer (previous batch of one) is
    /// never held back, a wave of `n` concurrent writers travels in one entry.
    async fn batcher(raft: Raft, mut rx: tokio::sync::mpsc::UnboundedReceiver<Proposal>) {
        let mut expect = 1;
        while let Some(first) = rx.recv().await {
            let mut batch = vec![first];
            let deadline = tokio::time::Instant::now() + GATHER;
            loop {
                while let Ok(p) = rx.try_recv() {
                    batch.push(p);
                }
                if batch.len() >= expect {
                    break;
                }
                match tokio::time::timeout_at(deadline, rx.recv()).await {
                    Ok(Some(p)) => batch.push(p),
                    _ => break,
                }
            }
            expect = batch.len();
            let (cmds, txs): (Vec<_>, Vec<_>) = batch.into_iter().unzip();
            let raft = raft.clone();
            tokio::spawn(async move {
                match raft.client_write(consensus::Batch(cmds)).await {
                    Ok(resp) => {
                        let mut replies = resp.data.into_iter();
                        for tx in txs {
                            let r = replies.next().unwrap_or(consensus::Reply::Forgotten);
                            let _ = tx.send(Ok(r));
                        }
                    }
                    Err(e) => {
                        for tx in txs {
                            let _ = tx.send(Err(e.clone()));
                        }
                    }
                }
            });
        }
    }

    /// Returns once this node's known leader is no longer `l` (never if it stays `l`).
    async fn leader_moves_from(&self, l: NodeId) {
        let mut rx = self.raft.metrics();
        loop {
            if rx.borrow_and_update().current_leader != Some(l) {
                return;
            }
            if rx.changed().await.is_err() {
                return std::future::pending().await;
            }
        }
    }

    /// Executes a strong operation within `timeout`. `may_forward`: whether a follower may
    /// forward it to the leader (false for requests that were forwarded already).
    pub async fn execute(&self, op: Forwarded, timeout: Duration, may_forward: bool) -> Outcome {
        let started = Instant::now();
        let deadline = started + timeout;
        let is_write = matches!(op, Forwarded::Write(_));
        // Whether a write may have been proposed (then its outcome is unknown on timeout).
        let mut proposed = false;
        let mut why = String::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                let missing = self.missing();
                let detail = if why.is_empty() {
                    missing
                } else {
                    format!("{why}; {missing}")
                };
                return if is_write && proposed {
                    Metrics::bump(&self.metrics.unknown);
                    Outcome::Unknown(format!(
                        "not committed within {} ms, it may or may not be applied: {detail}",
                        timeout.as_millis()
                    ))
                } else {
                    Metrics::bump(&self.metrics.unavailable);
                    Outcome::Unavailable(format!(
                        "no majority within {} ms: {detail}",
                        timeout.as_millis()
                    ))
                };
            }
            if let (Forwarded::Read { key }, true) = (&op, self.opts.local_reads) {
                return self.read_local(key);
            }
            let leader = self.raft.metrics().borrow().current_leader;
            match leader {
                Some(l) if l == self.me => match &op {
                    Forwarded::Write(cmd) => {
                        // A leader that has not heard from a majority for an election timeout
                        // is most likely cut off: refuse (certainly not applied) rather than
                        // propose a write that will time out with an unknown outcome.
                        let stale = !self.links.majority_heard_within(
                            self.me,
                            Duration::from_millis(self.quorum_stale_ms),
                            &self.voters(),
                        );
                        if stale && !proposed {
                            why = format!(
                                "the leader has not heard from a majority for {} ms",
                                self.quorum_stale_ms
                            );
                            self.settle(left).await;
                            continue;
                        }
                        proposed = true;
                        let t = Instant::now();
                        match tokio::time::timeout(left, self.propose(cmd.clone())).await {
                            Ok(Ok(reply)) => {
                                self.metrics.commit.record(t.elapsed());
                                return Outcome::Applied(reply);
                            }
                            Ok(Err(RaftError::APIError(ClientWriteError::ForwardToLeader(_)))) => {
                                why = "leadership moved during the write".into();
                                self.settle(left).await;
                            }
                            Ok(Err(e)) => return Outcome::Unknown(e.to_string()),
                            Err(_) => continue,
                        }
                    }
                    Forwarded::Read { key } => {
                        match tokio::time::timeout(left, self.raft.ensure_linearizable()).await {
                            Ok(Ok(_)) => return self.read_local(key),
                            Ok(Err(RaftError::APIError(CheckIsLeaderError::ForwardToLeader(
                                _,
                            )))) => {
                                why = "leadership moved during the read".into();
                                self.settle(left).await;
                            }
                            Ok(Err(e)) => {
                                why = e.to_string();
                                self.settle(left).await;
                            }
                            Err(_) => continue,
                        }
                    }
                },
                Some(l) if may_forward => {
                    Metrics::bump(&self.metrics.forwarded);
                    let rpc = Rpc::Forward {
                        op: op.clone(),
                        timeout_ms: left.as_millis() as u64,
                    };
                    // A little longer than the leader's own deadline, so that its answer
                    // (Unavailable, Unknown) arrives rather than our timeout. If the leader
                    // changes meanwhile (the one asked died), ask the new one at once: a retried
                    // write keeps its (client, serial), so it is applied once.
                    let forwarding = call(&self.links, l, &rpc, left + Duration::from_millis(200));
                    let answer = tokio::select! {
                        r = forwarding => r,
                        () = self.leader_moves_from(l) => {
                            proposed |= is_write;
                            why = format!("site {} stopped leading while it had the request", self.name(l));
                            continue;
                        }
                    };
                    match answer {
                        Ok(RpcReply::Forward(Outcome::NotLeader { .. })) => {
                            why = format!("site {} no longer leads", self.name(l));
                            self.settle(left).await;
                        }
                        // An earlier attempt may have reached a leader: then a refusal now
                        // does not mean the write was not applied.
                        Ok(RpcReply::Forward(Outcome::Unavailable(m))) if is_write && proposed => {
                            Metrics::bump(&self.metrics.unknown);
                            return Outcome::Unknown(format!(
                                "{m} (an earlier attempt may have been applied)"
                            ));
                        }
                        Ok(RpcReply::Forward(o)) => return o,
                        Ok(other) => why = format!("unexpected reply {other:?}"),
                        Err(e) => {
                            proposed |= !matches!(e, CallError::NotSent(..));
                            why = format!("forwarding to the leader failed: {e}");
                            self.settle(left).await;
                        }
                    }
                }
                Some(l) => return Outcome::NotLeader { leader: Some(l) },
                None if !may_forward => return Outcome::NotLeader { leader: None },
                None => {
                    why = "no leader".into();
                    self.settle(left).await;
                }
            }
        }
    }

    /// Serves one RPC stream a peer opened.
    async fn serve_stream(self: Arc<Self>, mut send: SendStream, mut recv: RecvStream) {
        let frame = match read_frame(&mut recv, MAX_RPC_FRAME).await {
            Ok(Some(f)) => f,
            Ok(None) => return,
            Err(e) => {
                Metrics::bump(&self.metrics.malformed);
                warn!(error = %e, "malformed consensus frame; closing the stream");
                let _ = recv.stop(VarInt::from_u32(close_code::MALFORMED));
                return;
            }
        };
        let reply = match consensus::decode::<Rpc>(&frame) {
            Err(e) => {
                Metrics::bump(&self.metrics.malformed);
                warn!(error = %e, "malformed consensus request");
                RpcReply::Malformed(e)
            }
            Ok(Rpc::Append(r)) => {
                let committed = r.vote.is_committed();
                let reply = self.raft.append_entries(r).await;
                if committed
                    && matches!(&reply, Ok(a) if !matches!(a, AppendEntriesResponse::HigherVote(_)))
                {
                    self.links.heard_leader();
                }
                RpcReply::Append(reply)
            }
            Ok(Rpc::Vote(r)) => RpcReply::Vote(self.raft.vote(r).await),
            Ok(Rpc::Snapshot { vote, meta, data }) => {
                let snapshot = openraft::Snapshot {
                    meta,
                    snapshot: Box::new(data),
                };
                RpcReply::Snapshot(
                    self.raft
                        .install_full_snapshot(vote, snapshot)
                        .await
                        .map_err(|e| e.to_string()),
                )
            }
            Ok(Rpc::Forward { op, timeout_ms }) => RpcReply::Forward(
                self.execute(op, Duration::from_millis(timeout_ms.min(60_000)), false)
                    .await,
            ),
            Ok(rpc @ (Rpc::Applied { .. } | Rpc::Relay { .. } | Rpc::Floor)) => {
                match self.local.get().and_then(|answer| answer(&rpc)) {
                    Some(reply) => reply,
                    None => RpcReply::Malformed("this node does not serve that request yet".into()),
                }
            }
        };
        let reply = consensus::encode(&reply);
        self.links.bytes_out.fetch_add(
            crate::wire::framed_len(reply.len()) as u64,
            Ordering::Relaxed,
        );
        if write_frame(&mut send, &reply).await.is_ok() {
            let _ = send.finish();
        }
    }

    /// Serves the RPC streams of a connection a peer dialled, until it closes.
    pub async fn serve_connection(self: Arc<Self>, conn: Connection) {
        loop {
            match conn.accept_bi().await {
                Ok((send, recv)) => {
                    tokio::spawn(self.clone().serve_stream(send, recv));
                }
                Err(e) => {
                    debug!(error = %e, "consensus streams of a peer connection ended");
                    return;
                }
            }
        }
    }

    /// A random delay in `0..max` (std's per-instance random hasher keys; no RNG needed).
    fn jitter(max: Duration) -> Duration {
        use std::hash::{BuildHasher, Hasher};
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u64(Instant::now().elapsed().as_nanos() as u64);
        let max_us = max.as_micros().max(1) as u64;
        Duration::from_micros(h.finish() % max_us)
    }

    /// Watches the group: counts elections and leader changes, stands for election as soon as
    /// the leader's lease has run out without a heartbeat (the failure detector below), and
    /// (with a preferred leader site) has that site stand when it is up to date and not leading.
    ///
    /// Failure detector. openraft 0.9's own timer has a follower stand only after the lease
    /// (`election_max_ms`) plus its election timeout (drawn once per node, between
    /// `election_min_ms` and `election_max_ms`), plus 2 x `election_max_ms` more after a voter
    /// answered it with a longer log: 4.5 to 12 s with the defaults. A voter refuses every vote
    /// while its lease runs, so nothing can win before the lease ends; this detector stands at
    /// the lease's end plus a jitter of up to one heartbeat (none at the preferred site), so a
    /// dead leader is replaced after about `election_max_ms` + a heartbeat + one vote round
    /// trip. A refused candidacy backs off (doubling from one heartbeat, up to
    /// `election_max_ms`), and holds back for `election_max_ms` when a voter has a longer log
    /// (that voter stands instead). Two candidates of one term need no retry: openraft's votes
    /// are ordered by (term, node id), so the lower grants the higher one's vote. Leading restarts
    /// the timer. openraft's own timer stays on as a fallback.
    pub async fn watch(self: Arc<Self>, mut shutdown: tokio::sync::watch::Receiver<bool>) {
        let mut rx = self.raft.metrics();
        let (mut term, mut leader) = {
            let m = rx.borrow_and_update();
            (m.current_term, m.current_leader)
        };
        let mut last_nudge = Instant::now();
        let tick = (self.heartbeat / 5).max(Duration::from_millis(10));
        let lease_ms = self.election_max.as_millis() as u64;
        let heartbeat_ms = self.heartbeat.as_millis() as u64;
        let spread = if self.preferred == Some(self.me) {
            Duration::ZERO
        } else {
            self.heartbeat
        };
        let d = &self.links.detector;
        let mut jitter = Self::jitter(spread).as_millis() as u64;
        let mut heard_seen = 0;
        let mut attempts = 0u32;
        let mut next_try = 0u64;
        loop {
            tokio::select! {
                r = rx.changed() => if r.is_err() { return },
                _ = tokio::time::sleep(tick) => {}
                _ = shutdown.changed() => return,
            }
            let m = rx.borrow_and_update().clone();
            let now = self.links.now_ms();
            // A leader restarts the timer, as hearing a leader does, so that a leader that
            // steps down does not stand at once on a silence measured while it led. (A vote
            // moving to another node must not: a refused candidate adopts the refusing
            // voter's vote, and restarting then kept two candidates waiting on each other.)
            if m.state == ServerState::Leader {
                self.links.heard_leader();
                self.bootstrap_sites();
                self.drop_removed_voters();
                self.drive_joins();
            }
            let heard = d.heard_leader.load(Ordering::Relaxed);
            if heard != heard_seen {
                heard_seen = heard;
                attempts = 0;
                next_try = 0;
            }
            if m.state != ServerState::Leader
                && now >= heard + lease_ms + jitter
                && now >= next_try
                && now >= d.shorter_until.load(Ordering::Relaxed)
            {
                attempts += 1;
                let backoff = (heartbeat_ms << attempts.min(8)).min(lease_ms);
                jitter = Self::jitter(spread).as_millis() as u64;
                next_try = now + backoff + jitter;
                info!(
                    silent_ms = now - heard,
                    attempt = attempts,
                    term = m.current_term,
                    "no heartbeat from a leader for its lease; standing for election"
                );
                let _ = self.raft.trigger().elect().await;
            }
            if m.current_term != term {
                Metrics::bump(&self.metrics.elections);
                term = m.current_term;
            }
            if m.current_leader != leader {
                Metrics::bump(&self.metrics.leader_changes);
                info!(
                    leader = ?m.current_leader.map(|l| self.name(l)),
                    term = m.current_term,
                    "strong-operation leader changed"
                );
                leader = m.current_leader;
            }
            // The preferred site stands for election when a leader elsewhere has been stable
            // for a while and this site's log is caught up.
            if self.preferred == Some(self.me)
                && m.state == ServerState::Follower
                && m.current_leader.is_some_and(|l| l != self.me)
                && last_nudge.elapsed() >= 2 * self.election_max
                && m.last_applied.map(|l| l.index) >= self.log.committed().map(|l| l.index)
            {
                last_nudge = Instant::now();
                info!("preferred leader site is healthy; standing for election");
                let _ = self.raft.trigger().elect().await;
            }
        }
    }

    /// The group's status.
    pub fn status(&self) -> ConsensusStatus {
        let m = self.raft.metrics().borrow().clone();
        let matched = m.replication.clone().unwrap_or_default();
        let voters = self
            .voters()
            .into_iter()
            .map(|s| VoterStatus {
                site: s as u16,
                name: self.name(s),
                match_index: if s == self.me {
                    m.last_log_index
                } else {
                    matched.get(&s).copied().flatten().map(|l| l.index)
                },
            })
            .collect();
        ConsensusStatus {
            term: m.current_term,
            state: format!("{:?}", m.state),
            leader: m.current_leader.map(|l| l as u16),
            leader_name: m.current_leader.map(|l| self.name(l)),
            commit_index: self.log.committed().map(|l| l.index),
            applied_index: m.last_applied.map(|l| l.index),
            last_log_index: m.last_log_index,
            voters,
        }
    }

    /// Stops the voter.
    pub async fn shutdown(&self) {
        let _ = self.raft.shutdown().await;
    }
}
