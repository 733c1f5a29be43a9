//! Consensus for the strong operations: the types of the Raft group (openraft), its durable log,
//! its state machine (the strong keyspace) and the messages its RPCs travel in.
//!
//! With P partitions per site there is one Raft group per partition index `p`: its voters are
//! the nodes `(i, p)` of every site `i`, and a voter's Raft node id is its site id. Strong keys
//! are routed to partitions like causal ones, so each group holds the strong keys of its
//! partition.
//!
//! Why openraft 0.9 (0.9.25, pinned): it is the newest stable line and runs on tokio 1, as the
//! node does; 0.10 is still in alpha, with API changes between alphas. Features: `serde` for the
//! RPC types, `storage-v2` for a separate log store ([`log::LogStore`]) and state machine
//! ([`sm::StateMachine`]), and `generic-snapshot-data`, so that a snapshot is sent whole in one
//! RPC (one QUIC stream of its own, bounded by `consensus.install_snapshot_timeout_ms`) instead
//! of openraft's chunked transfer, whose per-chunk timeout is LAN-tuned and which restarts from
//! the first chunk after a timeout.
//!
//! WAN notes on openraft 0.9 (they set the defaults of [`ConsensusConfig`]):
//! - the timeout of an append-entries RPC (heartbeats included) *is* the heartbeat interval, so
//!   the interval must exceed the longest round trip plus an fsync, or every append times out;
//! - an election needs a vote round trip to a majority after a randomised timeout, so the
//!   election timeout is 10-20 round trips, not openraft's 150-300 ms;
//! - openraft backs off only after [`Unreachable`](openraft::error::Unreachable) errors, so a peer
//!   without a connection is reported unreachable (not as a timeout) to avoid a busy loop.
//!
//! Codec: openraft's types are serde types, not rkyv ones, so an RPC ([`Rpc`], [`RpcReply`])
//! is encoded with postcard (compact, not self-describing, no schema evolution needed between
//! the nodes of one version) and carried in the project's one frame format
//! ([`write_frame`](crate::wire::write_frame)). Our own client and peer messages stay rkyv.
//!
//! - [`log`]: the durable Raft log and vote (an fsynced, CRC-checked record file).
//! - [`sm`]: the state machine: the strong keyspace, deduplication of retried writes, snapshots.
//! - [`members`]: the cluster configuration (epoch, sites), replicated in partition index 0's
//!   group, and the design of the membership changes still to build.

pub mod log;
pub mod members;
pub mod sm;

use serde::{Deserialize, Serialize};

pub use crate::config::ConsensusConfig;

/// Raft node ids: the site id.
pub type NodeId = u64;

openraft::declare_raft_types!(
    /// The openraft type configuration of the strong-operation groups.
    pub TypeConfig:
        D = Batch,
        R = Vec<Reply>,
        NodeId = NodeId,
        Node = openraft::EmptyNode,
        SnapshotData = Vec<u8>,
);

/// The Raft instance of one group.
pub type Raft = openraft::Raft<TypeConfig>;

/// The last log id the snapshot on disk covers, as the state machine stored it (after its
/// fsync and rename). The log records no purge past it ([`log::LogStore::bound_purges_by`]):
/// openraft asks for the purge that follows a received snapshot without waiting for the state
/// machine to store that snapshot, and a crash between the two would leave the log purged past
/// the snapshot on disk.
#[derive(Clone, Debug, Default)]
pub struct SnapshotPoint(std::sync::Arc<std::sync::Mutex<Option<openraft::LogId<NodeId>>>>);

impl SnapshotPoint {
    /// The last log id of the snapshot on disk (`None`: no snapshot).
    pub fn get(&self) -> Option<openraft::LogId<NodeId>> {
        *self.0.lock().expect("snapshot point lock")
    }

    /// A snapshot up to `id` is on disk.
    pub fn set(&self, id: Option<openraft::LogId<NodeId>>) {
        *self.0.lock().expect("snapshot point lock") = id;
    }
}

/// A strong write, as it is proposed to the group's log.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Command {
    /// The issuing client (random per client instance).
    pub client: u64,
    /// The client's serial number for this request; a retry reuses it, so the write is
    /// applied once.
    pub serial: u64,
    /// The causal context the write was issued under, stored with the value.
    pub ctx: Vec<u64>,
    /// The operation.
    pub op: WriteOp,
}

/// The payload of one Raft log entry: the strong writes the leader gathered into it, applied
/// in order, one [`Reply`] each. Writes that reach the leader together share an entry, so they
/// travel in one append-entries RPC even though openraft 0.9 has only one in flight per
/// follower (see `Strong::propose` in the node).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Batch(pub Vec<Command>);

/// What a strong write does.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum WriteOp {
    /// Set a key.
    Put {
        /// Key.
        key: Vec<u8>,
        /// Value.
        value: Vec<u8>,
    },
    /// Remove a key.
    Delete {
        /// Key.
        key: Vec<u8>,
    },
    /// Set (or remove, `new: None`) a key iff it holds `expected` (`None`: absent).
    Cas {
        /// Key.
        key: Vec<u8>,
        /// The value expected; `None` expects the key absent.
        expected: Option<Vec<u8>>,
        /// The new value; `None` deletes.
        new: Option<Vec<u8>>,
    },
    /// Set a key iff it holds a value, whatever it is (Redis's `SET key value XX`). Replies
    /// like a compare-and-set: [`Reply::CasOk`], or [`Reply::CasFailed`] with the key absent.
    PutIfPresent {
        /// Key.
        key: Vec<u8>,
        /// Value.
        value: Vec<u8>,
    },
    /// A change to the cluster configuration (partition index 0's group only; see
    /// [`members`]). Replies [`Reply::Membership`]. Appended last, so that log entries and
    /// snapshots written before it existed still decode.
    Sites(members::SitesOp),
}

impl WriteOp {
    /// The key written.
    pub fn key(&self) -> &[u8] {
        match self {
            WriteOp::Put { key, .. }
            | WriteOp::Delete { key }
            | WriteOp::Cas { key, .. }
            | WriteOp::PutIfPresent { key, .. } => key,
            WriteOp::Sites(_) => &[],
        }
    }

    /// The length of the longest value it carries (0: none): what the size limits check.
    pub fn value_len(&self) -> usize {
        let len = |v: &Option<Vec<u8>>| v.as_ref().map_or(0, Vec::len);
        match self {
            WriteOp::Put { value, .. } | WriteOp::PutIfPresent { value, .. } => value.len(),
            WriteOp::Delete { .. } | WriteOp::Sites(_) => 0,
            WriteOp::Cas { expected, new, .. } => len(expected).max(len(new)),
        }
    }
}

/// The result of applying a [`Command`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Reply {
    /// A put or delete was applied (also the reply to entries that carry no command).
    Written,
    /// The compare-and-set matched and was applied.
    CasOk,
    /// The compare-and-set did not match; nothing changed.
    CasFailed {
        /// The value found.
        current: Option<Vec<u8>>,
        /// The causal context stored with it.
        ctx: Vec<u64>,
    },
    /// A retry of a request so old that its reply is no longer remembered: whether it was
    /// applied is unknown.
    Forgotten,
    /// A configuration change ([`WriteOp::Sites`]): the new epoch, or why it was refused
    /// (nothing changed).
    Membership(Result<u64, String>),
}

/// A strong operation forwarded from a follower's site to the leader's.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Forwarded {
    /// A write, to propose.
    Write(Command),
    /// A linearizable read of a key.
    Read {
        /// Key.
        key: Vec<u8>,
    },
}

/// The outcome of a strong operation, as a leader answers a forwarded one.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Outcome {
    /// A write was applied with this reply.
    Applied(Reply),
    /// A read: the value and the causal context stored with it.
    Value {
        /// The value (`None`: absent).
        value: Option<Vec<u8>>,
        /// The causal context stored with it.
        ctx: Vec<u64>,
    },
    /// Certainly not applied (no leader, no majority); says what is missing.
    Unavailable(String),
    /// A write that may or may not have been applied (it timed out after being proposed).
    Unknown(String),
    /// The node asked is not the leader (any more); `leader` is the one it knows of.
    NotLeader {
        /// The leader it knows of.
        leader: Option<NodeId>,
    },
}

/// A Raft RPC, or a forwarded strong operation, on its own peer stream.
#[derive(Debug, Serialize, Deserialize)]
#[allow(clippy::large_enum_variant)]
pub enum Rpc {
    /// Append entries (heartbeats too).
    Append(openraft::raft::AppendEntriesRequest<TypeConfig>),
    /// Request a vote.
    Vote(openraft::raft::VoteRequest<NodeId>),
    /// Install a whole snapshot.
    Snapshot {
        /// The leader's vote.
        vote: openraft::Vote<NodeId>,
        /// The snapshot's metadata.
        meta: openraft::SnapshotMeta<NodeId, openraft::EmptyNode>,
        /// The snapshot's bytes.
        data: Vec<u8>,
    },
    /// A strong operation forwarded to the leader, with the time it may take (ms).
    Forward {
        /// The operation.
        op: Forwarded,
        /// How long the leader may take.
        timeout_ms: u64,
    },
    /// How far the asked site has applied `origin`'s stream (removing a dead site: the
    /// survivors' answers make the cut).
    Applied {
        /// The origin (the site being removed).
        origin: u16,
    },
    /// The updates of `origin` the asked site holds after `after` (relaying a removed dead
    /// site's stream between survivors), at most `max_items` of them.
    Relay {
        /// The origin (the removed site).
        origin: u16,
        /// What the asking site has received of it.
        after: u64,
        /// Most updates in the answer.
        max_items: u32,
    },
    /// Which entries of its join floor (the vector it must cover before it serves, see
    /// [`Replica::set_floor`](crate::replica::Replica::set_floor)) the asked site does not
    /// cover yet: the leader asks a joining site before it makes it active.
    Floor,
}

/// The answer to an [`Rpc`].
#[derive(Debug, Serialize, Deserialize)]
pub enum RpcReply {
    /// To [`Rpc::Append`].
    Append(
        Result<openraft::raft::AppendEntriesResponse<NodeId>, openraft::error::RaftError<NodeId>>,
    ),
    /// To [`Rpc::Vote`].
    Vote(Result<openraft::raft::VoteResponse<NodeId>, openraft::error::RaftError<NodeId>>),
    /// To [`Rpc::Snapshot`].
    Snapshot(Result<openraft::raft::SnapshotResponse<NodeId>, String>),
    /// To [`Rpc::Forward`].
    Forward(Outcome),
    /// To [`Rpc::Applied`]: the asked site's `applied` entry of the origin.
    Applied(u64),
    /// To [`Rpc::Relay`]: an update frame of the peer protocol (the origin's updates, then a
    /// marker at the asked site's `applied` entry once it has sent all it holds), or `None`
    /// when the asked site cannot serve from `after` (a gap in its relay log).
    Relay(Option<Vec<u8>>),
    /// The request could not be decoded.
    Malformed(String),
    /// To [`Rpc::Floor`]: the entries of the asked site's floor its `applied` vector falls
    /// short of, as `(site, have, need)`; empty once it covers the floor (or has none).
    Floor(Vec<(u16, u64, u64)>),
}

/// How the error of a message that does not decode begins (in [`RpcReply::Malformed`] too):
/// a node of an older version answers so to a request it does not know.
pub const MALFORMED: &str = "malformed consensus message";

/// Encodes a message with the RPC codec (postcard; see the module docs).
pub fn encode<T: Serialize>(msg: &T) -> Vec<u8> {
    postcard::to_stdvec(msg).expect("serialising into memory cannot fail")
}

/// Decodes a message of the RPC codec.
pub fn decode<'a, T: Deserialize<'a>>(bytes: &'a [u8]) -> Result<T, String> {
    postcard::from_bytes(bytes).map_err(|e| format!("{MALFORMED}: {e}"))
}

/// The openraft configuration of a group, from the `[consensus]` table.
pub fn raft_config(c: &ConsensusConfig, cluster: &str, partition: u32) -> openraft::Config {
    openraft::Config {
        cluster_name: format!("{cluster}/p{partition}"),
        heartbeat_interval: c.heartbeat_ms,
        election_timeout_min: c.election_min_ms,
        election_timeout_max: c.election_max_ms,
        install_snapshot_timeout: c.install_snapshot_timeout_ms,
        max_payload_entries: c.max_payload_entries,
        snapshot_policy: openraft::SnapshotPolicy::LogsSinceLast(c.snapshot_every),
        max_in_snapshot_log_to_keep: 1000,
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rpcs_roundtrip_and_garbage_is_refused() {
        let entry = openraft::Entry::<TypeConfig> {
            log_id: openraft::LogId::new(openraft::CommittedLeaderId::new(3, 1), 7),
            payload: openraft::EntryPayload::Normal(Batch(vec![Command {
                client: 9,
                serial: 2,
                ctx: vec![1, 2, 3],
                op: WriteOp::Cas {
                    key: b"k".to_vec(),
                    expected: None,
                    new: Some(b"v".to_vec()),
                },
            }])),
        };
        let rpc = Rpc::Append(openraft::raft::AppendEntriesRequest {
            vote: openraft::Vote::new_committed(3, 1),
            prev_log_id: None,
            leader_commit: None,
            entries: vec![entry.clone()],
        });
        let back: Rpc = decode(&encode(&rpc)).unwrap();
        match back {
            Rpc::Append(a) => assert_eq!(a.entries, vec![entry]),
            other => panic!("{other:?}"),
        }
        let e = openraft::error::RaftError::<NodeId>::Fatal(openraft::error::Fatal::Stopped);
        let reply: RpcReply = decode(&encode(&RpcReply::Vote(Err(e)))).unwrap();
        assert!(matches!(reply, RpcReply::Vote(Err(_))));
        let err = decode::<Rpc>(&[0xff, 0xff, 0xff, 0xff, 0x0f, 1]).unwrap_err();
        assert!(err.contains("malformed consensus message"), "{err}");
    }
}
