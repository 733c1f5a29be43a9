//! Wire format: rkyv messages, the one framing function, validation and limits.
//!
//! Every message is an rkyv archive in a length-prefixed frame: the length as a varint (one or
//! two bytes for most frames, at most five), then the archive. [`read_frame`] checks the length
//! against the configured maximum *before* allocating, reads the archive into an aligned
//! buffer, and hands it out as [`Bytes`] so that
//! values can later be sliced out of the frame and stored without re-encoding. Each archive is
//! validated with bytecheck (`rkyv::access`) before any field is read, and then checked for
//! meaning ([`check_sizes`], [`check_vector`]): vectors have one entry per site (a shorter
//! one, from before sites were added, reads as zeros for the missing entries; a longer one
//! may only add zeros, for sites added that this node does not count yet), ids are in range,
//! keys and values respect the limits, timestamps grow along a batch.
//!
//! Messages here: client streams (one bidirectional stream per request), [`Request`] /
//! [`Response`]. The peer protocol's messages (hello, acks, update batches) are the server's
//! and live in its `peer_wire` module, framed by the same [`write_frame`] / [`read_frame`].

use bytes::Bytes;
use rkyv::rancor;
use rkyv::util::AlignedVec;
use rkyv::{Archive, Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::clock::{VClock, Version};

/// Limits on what a peer or client may send.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    /// Largest key, in bytes.
    pub max_key: usize,
    /// Largest value, in bytes.
    pub max_value: usize,
    /// Largest frame, in bytes (checked before any allocation).
    pub max_frame: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_key: 1024,
            max_value: 1 << 20,
            max_frame: 16 << 20,
        }
    }
}

/// What can go wrong reading or checking a frame.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    /// The transport failed.
    #[error("i/o error: {0}")]
    Io(#[from] std::io::Error),
    /// The length prefix exceeds the limit.
    #[error("frame of {len} bytes exceeds the limit of {max} bytes")]
    FrameTooLarge {
        /// Announced length.
        len: usize,
        /// Configured maximum.
        max: usize,
    },
    /// The stream ended inside a frame.
    #[error("stream ended inside a frame")]
    Truncated,
    /// The archive failed structural validation.
    #[error("invalid archive: {0}")]
    Invalid(String),
    /// The archive is well formed but its content is not acceptable.
    #[error("invalid message: {0}")]
    Semantic(String),
}

pub use messages::*;

/// The message types. rkyv generates an archived twin of each type; the lint for missing docs is
/// relaxed here only because those generated twins of documented fields carry no docs.
#[allow(missing_docs)]
mod messages {
    use super::*;

    /// The version of a write on the wire.
    #[derive(Archive, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
    pub struct WireVersion {
        /// HLC timestamp.
        pub ts: u64,
        /// Origin site.
        pub site: u16,
    }

    impl From<Version> for WireVersion {
        fn from(v: Version) -> Self {
            Self {
                ts: v.ts,
                site: v.site,
            }
        }
    }

    impl From<WireVersion> for Version {
        fn from(v: WireVersion) -> Self {
            Version::new(v.ts, v.site)
        }
    }

    /// A client operation.
    #[derive(Archive, Serialize, Deserialize, Clone, Debug, PartialEq)]
    pub enum ClientOp {
        /// Read a key.
        Get {
            /// Key.
            key: Vec<u8>,
        },
        /// Write a key.
        Put {
            /// Key.
            key: Vec<u8>,
            /// Value.
            value: Vec<u8>,
            /// Wait until this many remote sites have the write durably (0 = async).
            sync: u8,
        },
        /// Delete a key.
        Delete {
            /// Key.
            key: Vec<u8>,
            /// As for `Put`.
            sync: u8,
        },
        /// The site's replication status.
        Status,
        /// A strong (linearizable) write through the partition's Raft group: put (`value`
        /// `Some`) or delete (`None`).
        StrongWrite {
            /// Key.
            key: Vec<u8>,
            /// Value; `None` deletes.
            value: Option<Vec<u8>>,
            /// The client's id; with `serial`, a retry is applied once.
            client: u64,
            /// The client's serial number for this write.
            serial: u64,
        },
        /// A strong compare-and-set: set `key` to `new` (`None` deletes) iff it holds
        /// `expected` (`None`: absent).
        Cas {
            /// Key.
            key: Vec<u8>,
            /// Expected value; `None` expects the key absent.
            expected: Option<Vec<u8>>,
            /// New value; `None` deletes.
            new: Option<Vec<u8>>,
            /// As for `StrongWrite`.
            client: u64,
            /// As for `StrongWrite`.
            serial: u64,
        },
        /// A linearizable read of the strong keyspace.
        StrongGet {
            /// Key.
            key: Vec<u8>,
        },
        /// Add a site to the cluster configuration (`causalkv sites add`): it gets the next
        /// site id and starts as `joining`. Served by partition 0 of a site, through its Raft
        /// group; answered [`ResponseBody::SitesChanged`].
        SitesAdd {
            /// The new site's name (its certificate must carry it).
            name: String,
            /// Its address, `IP:PORT`.
            addr: String,
            /// The configuration epoch the change is made against: refused if it moved on.
            expected_epoch: u64,
            /// As for `StrongWrite`.
            client: u64,
            /// As for `StrongWrite`.
            serial: u64,
        },
        /// Remove a site from the cluster configuration (`causalkv sites remove`): a live
        /// site is decommissioned (it becomes `leaving`, drains its updates to every peer, then
        /// `removed`); a dead one (`dead`) is removed at once with the cut the survivors agree
        /// on, and they relay its updates to each other up to there. Served by partition 0 of
        /// a site; answered [`ResponseBody::SitesChanged`].
        SitesRemove {
            /// The site's name.
            name: String,
            /// The site is gone for good, disk included.
            dead: bool,
            /// The configuration epoch the change is made against: refused if it moved on.
            expected_epoch: u64,
            /// As for `StrongWrite`.
            client: u64,
            /// As for `StrongWrite`.
            serial: u64,
        },
    }

    /// A client request: one per bidirectional stream.
    #[derive(Archive, Serialize, Deserialize, Clone, Debug, PartialEq)]
    pub struct Request {
        /// How long the site may wait for causal readiness or synchronous replication (ms).
        pub timeout_ms: u32,
        /// The session's causal context.
        pub ctx: Vec<u64>,
        /// The operation.
        pub op: ClientOp,
    }

    /// Error codes in [`ResponseBody::Error`].
    pub mod error_code {
        /// The site has not applied the session's context within the timeout.
        pub const NOT_READY: u16 = 1;
        /// A key or value is over the limit.
        pub const TOO_LARGE: u16 = 2;
        /// The request is malformed.
        pub const BAD_REQUEST: u16 = 3;
        /// Synchronous replication did not complete within the timeout (the write itself is
        /// applied and durable locally).
        pub const SYNC_TIMEOUT: u16 = 4;
        /// The site is shutting down.
        pub const SHUTTING_DOWN: u16 = 5;
        /// Durable storage failed.
        pub const STORAGE: u16 = 6;
        /// The key belongs to another partition node of the site (see
        /// [`crate::sharding::partition_of`]).
        pub const WRONG_PARTITION: u16 = 7;
        /// A strong operation found no leader or no majority within the timeout; it was not
        /// applied. The message names what is missing.
        pub const UNAVAILABLE: u16 = 8;
        /// A strong write timed out after it was proposed: it may or may not be applied.
        pub const OUTCOME_UNKNOWN: u16 = 9;
        /// The session's context names updates of a site that was removed while dead beyond
        /// what the survivors held (the cut): they were lost with it, and no site will ever
        /// cover the context. The error's `version` carries the removed site and the cut; the
        /// session may continue with its context capped at the cut
        /// ([`Client::accept_loss`](crate::Client::accept_loss)).
        pub const LOST: u16 = 10;
    }

    /// One voter of a partition's Raft group, in a status answer.
    #[derive(Archive, Serialize, Deserialize, Clone, Debug, PartialEq, serde::Serialize)]
    pub struct VoterStatus {
        /// Site id (the voter's Raft node id).
        pub site: u16,
        /// Site name.
        pub name: String,
        /// The highest log index known to match the leader's (as the leader reports it; this
        /// node's own last log index for itself).
        pub match_index: Option<u64>,
    }

    /// The strong-operation Raft group of a node's partition, in a status answer.
    #[derive(Archive, Serialize, Deserialize, Clone, Debug, PartialEq, serde::Serialize)]
    pub struct ConsensusStatus {
        /// Current term.
        pub term: u64,
        /// This node's role: `Leader`, `Follower`, `Candidate` or `Learner`.
        pub state: String,
        /// The leader's site id, if known.
        pub leader: Option<u16>,
        /// The leader's site name, if known.
        pub leader_name: Option<String>,
        /// The commit index.
        pub commit_index: Option<u64>,
        /// The last log index applied to the strong keyspace.
        pub applied_index: Option<u64>,
        /// The last log index.
        pub last_log_index: Option<u64>,
        /// Each voter's match index (known at the leader only).
        pub voters: Vec<VoterStatus>,
    }

    /// One site of the cluster configuration, in a status answer.
    #[derive(Archive, Serialize, Deserialize, Clone, Debug, PartialEq, serde::Serialize)]
    pub struct MemberStatus {
        /// Site id (never reused).
        pub site: u16,
        /// Site name.
        pub name: String,
        /// Address (of its partition 0).
        pub addr: String,
        /// `active`, `joining` or `removed`.
        pub state: String,
    }

    /// The cluster configuration a node holds, in a status answer.
    #[derive(Archive, Serialize, Deserialize, Clone, Debug, PartialEq, serde::Serialize)]
    pub struct MembershipStatus {
        /// The configuration's epoch (raised by every change; 0: not bootstrapped yet).
        pub epoch: u64,
        /// Where it comes from: `replicated` (the Raft group's state) or `bootstrap` (the
        /// configuration file's `[[sites]]`, until the group has committed its first
        /// configuration).
        pub source: String,
        /// The id the next added site gets.
        pub next_id: u16,
        /// Every site, removed ones included, in id order.
        pub sites: Vec<MemberStatus>,
    }

    /// One peer's line in a status answer.
    #[derive(Archive, Serialize, Deserialize, Clone, Debug, PartialEq, serde::Serialize)]
    pub struct PeerStatus {
        /// Site id.
        pub site: u16,
        /// Site name.
        pub name: String,
        /// Address.
        pub addr: String,
        /// `up`, `suspect` or `down`.
        pub state: String,
        /// Why the peer is in that state.
        pub reason: String,
        /// The failure detector's suspicion level (phi accrual; 0 before any heartbeat).
        pub phi: f64,
        /// Milliseconds since the peer's last heartbeat or ack (0 before any).
        pub silence_ms: u64,
        /// The peer's durable `applied` vector as last reported.
        pub applied: Vec<u64>,
        /// Own updates the peer has not acked yet.
        pub lag_updates: u64,
        /// How far behind this site's clock the peer's entry for this site is (ms).
        pub lag_ms: u64,
    }

    /// A site's status.
    #[derive(Archive, Serialize, Deserialize, Clone, Debug, PartialEq, serde::Serialize)]
    pub struct StatusInfo {
        /// Site id.
        pub site: u16,
        /// Site name.
        pub name: String,
        /// The `applied` vector.
        pub applied: Vec<u64>,
        /// The stable vector (what every site has).
        pub stable: Vec<u64>,
        /// Updates in the dependency buffer.
        pub buffered: u64,
        /// Own updates retained until every peer acks.
        pub retained: u64,
        /// Keys held (tombstones included).
        pub keys: u64,
        /// Bytes of write-ahead log on disk (what the next snapshot lets go).
        pub wal_bytes: u64,
        /// Write-ahead log fsyncs since the site started.
        pub fsyncs: u64,
        /// Peers.
        pub peers: Vec<PeerStatus>,
        /// This node's partition of its site, and the number of partitions per site.
        pub partition: u16,
        /// Number of partitions per site (1: one node per site).
        pub partitions: u16,
        /// With several partitions: the site's stable vector as this partition knows it (how far
        /// every partition of the site has received each origin's stream); else the `applied`
        /// vector.
        pub site_stable: Vec<u64>,
        /// The partition's Raft group (strong operations).
        pub consensus: Option<Box<ConsensusStatus>>,
        /// The cluster configuration (sites and epoch) as this node holds it.
        pub membership: Option<Box<MembershipStatus>>,
        /// 0, or while this node prunes nothing from its retained log because a peer counts
        /// more sites than it does (the peer applied a site's addition this node has not
        /// applied yet, and the new site may need any of its updates): the number of sites
        /// that peer counts. It clears once this node applies the change.
        pub retention_held: u16,
    }

    /// The body of a response.
    #[derive(Archive, Serialize, Deserialize, Clone, Debug, PartialEq)]
    pub enum ResponseBody {
        /// The answer to a get.
        Value {
            /// The value, if present.
            value: Option<Vec<u8>>,
            /// The version read, if any (tombstones have one too).
            version: Option<WireVersion>,
            /// The causal context the value was written under (partitioned sites; empty
            /// otherwise): the session merges it into its own, so that its context names
            /// everything the value depends on.
            deps: Vec<u64>,
        },
        /// The answer to a put or delete.
        Written {
            /// The new version.
            version: WireVersion,
        },
        /// The answer to a status request.
        Status(StatusInfo),
        /// The answer to a strong write: applied.
        StrongWritten,
        /// The answer to a strong read: the value and the causal context of its write.
        StrongValue {
            /// The value, if present.
            value: Option<Vec<u8>>,
            /// The causal context the value's writer was issued under; the client merges it.
            ctx: Vec<u64>,
        },
        /// The answer to a compare-and-set.
        CasResult {
            /// Whether it matched and was applied.
            ok: bool,
            /// When it did not match: the value found.
            current: Option<Vec<u8>>,
            /// When it did not match: the causal context of the value found.
            ctx: Vec<u64>,
        },
        /// The answer to a configuration change: applied, at this epoch.
        SitesChanged {
            /// The configuration's new epoch.
            epoch: u64,
        },
        /// The request failed.
        Error {
            /// One of [`error_code`].
            code: u16,
            /// A human-readable explanation.
            message: String,
            /// For a write whose synchronous replication timed out: the version written.
            version: Option<WireVersion>,
        },
    }

    /// A response on a client stream.
    #[derive(Archive, Serialize, Deserialize, Clone, Debug, PartialEq)]
    pub struct Response {
        /// The body.
        pub body: ResponseBody,
        /// The serving site's `applied` vector when it answered.
        pub applied: Vec<u64>,
    }
}

/// QUIC application close codes (on connections and streams). Error codes inside a response
/// are [`error_code`].
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

/// Encodes a message as an rkyv archive.
pub fn encode<T>(msg: &T) -> AlignedVec
where
    T: for<'a> Serialize<
        rkyv::api::high::HighSerializer<
            AlignedVec,
            rkyv::ser::allocator::ArenaHandle<'a>,
            rancor::Error,
        >,
    >,
{
    rkyv::to_bytes::<rancor::Error>(msg).expect("serialising into memory cannot fail")
}

/// Appends `v` as a LEB128 varint (seven bits a byte, low first): one byte up to 127, two up
/// to 16,383. The frame's length prefix, and the numbers of hand-packed frames, use it.
pub fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// Bytes of `v` as a varint ([`put_varint`]).
pub fn varint_len(v: u64) -> usize {
    (64 - (v | 1).leading_zeros() as usize).div_ceil(7)
}

/// Bytes a frame of `payload` bytes takes on the wire, length prefix included.
pub fn framed_len(payload: usize) -> usize {
    varint_len(payload as u64) + payload
}

/// One frame as it goes on the wire: the length of `payload` as a varint, then `payload`.
/// Most frames are small (an update, a request, an ack), so the prefix is one or two bytes.
pub fn encode_frame(payload: &[u8]) -> std::io::Result<Vec<u8>> {
    let len = u32::try_from(payload.len())
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidInput, "frame too large"))?;
    let mut buf = Vec::with_capacity(framed_len(payload.len()));
    put_varint(&mut buf, u64::from(len));
    buf.extend_from_slice(payload);
    Ok(buf)
}

/// Writes one frame ([`encode_frame`]). With [`read_frame`], the one framing function of the
/// project.
pub async fn write_frame<W: AsyncWrite + Unpin>(w: &mut W, payload: &[u8]) -> std::io::Result<()> {
    w.write_all(&encode_frame(payload)?).await
}

/// The first allocation for a frame's body; see [`read_frame`].
const FIRST_CHUNK: usize = 64 << 10;

/// Reads one frame. Returns `Ok(None)` at a clean end of stream (between frames). The length is
/// checked against `max` before anything is allocated, and the buffer grows only as the bytes
/// arrive; the payload lands in a 16-byte aligned buffer, as rkyv requires.
pub async fn read_frame<R: AsyncRead + Unpin>(
    r: &mut R,
    max: usize,
) -> Result<Option<Bytes>, WireError> {
    // The prefix a byte at a time: reading ahead would take bytes of the payload.
    let mut len = 0usize;
    for i in 0..5 {
        let mut byte = [0u8; 1];
        if r.read(&mut byte).await? == 0 {
            return if i == 0 {
                Ok(None)
            } else {
                Err(WireError::Truncated)
            };
        }
        len |= usize::from(byte[0] & 0x7f) << (7 * i);
        if byte[0] < 0x80 {
            break;
        }
        if i == 4 {
            // Longer than any u32's prefix.
            return Err(WireError::FrameTooLarge {
                len: usize::MAX,
                max,
            });
        }
    }
    if len > max {
        return Err(WireError::FrameTooLarge { len, max });
    }
    // The buffer grows with the bytes that arrive (doubling from 64 KiB) rather than to the
    // announced length at once: a sender that announces a large frame and then sends little
    // makes the reader hold about what it sent, not `max`.
    let mut buf = AlignedVec::<16>::with_capacity(len.min(FIRST_CHUNK));
    while buf.len() < len {
        let from = buf.len();
        let to = len.min((from * 2).max(FIRST_CHUNK));
        // Exactly: values sliced out of a frame keep its whole buffer alive.
        buf.reserve_exact(to - from);
        buf.resize(to, 0);
        r.read_exact(&mut buf[from..to]).await.map_err(|e| {
            if e.kind() == std::io::ErrorKind::UnexpectedEof {
                WireError::Truncated
            } else {
                WireError::Io(e)
            }
        })?;
    }
    Ok(Some(Bytes::from_owner(buf)))
}

/// Validates `frame` as an archive of `T` (bytecheck) and returns the archived view.
pub fn access<T>(frame: &[u8]) -> Result<&T, WireError>
where
    T: rkyv::Portable
        + for<'a> rkyv::bytecheck::CheckBytes<rkyv::api::high::HighValidator<'a, rancor::Error>>,
{
    rkyv::access::<T, rancor::Error>(frame).map_err(|e| WireError::Invalid(e.to_string()))
}

/// Validates and fully deserialises a `T` (for small control messages and client responses).
pub fn decode<T>(frame: &[u8]) -> Result<T, WireError>
where
    T: Archive,
    T::Archived: rkyv::Portable
        + for<'a> rkyv::bytecheck::CheckBytes<rkyv::api::high::HighValidator<'a, rancor::Error>>
        + Deserialize<T, rkyv::api::high::HighDeserializer<rancor::Error>>,
{
    let archived = access::<T::Archived>(frame)?;
    rkyv::deserialize::<T, rancor::Error>(archived).map_err(|e| WireError::Invalid(e.to_string()))
}

/// Checks a key and value size against the limits.
pub fn check_sizes(key: usize, value: usize, limits: &Limits) -> Result<(), WireError> {
    if key == 0 {
        return Err(WireError::Semantic("empty key".into()));
    }
    if key > limits.max_key {
        return Err(WireError::Semantic(format!(
            "key of {key} bytes exceeds the limit of {} bytes (limits.max_key)",
            limits.max_key
        )));
    }
    if value > limits.max_value {
        return Err(WireError::Semantic(format!(
            "value of {value} bytes exceeds the limit of {} bytes (limits.max_value)",
            limits.max_value
        )));
    }
    Ok(())
}

/// Checks a vector received from the wire against the `sites` this node counts, and returns
/// it with exactly one entry per site: a shorter one is padded with zeros, a longer one must
/// have only zeros past `sites`.
pub fn check_vector(v: &[u64], sites: usize, what: &str) -> Result<VClock, WireError> {
    // Site ids are never reused and only ever added, so a vector written before the cluster
    // grew is shorter: its missing entries are zeros (nothing seen from those sites yet). A
    // vector from a node that already counts a site added since, which this node does not
    // count yet, is longer: harmless while that site has written nothing (its entry is zero).
    if let Some(i) = v.iter().skip(sites).position(|&e| e > 0) {
        return Err(WireError::Semantic(format!(
            "{what} has {} entries, the cluster has {sites} sites (entry {} is not zero)",
            v.len(),
            sites + i
        )));
    }
    Ok(VClock::from_vec(v.to_vec()).resized(sites))
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn roundtrip(payload: &[u8], max: usize) -> Result<Option<Bytes>, WireError> {
        let mut buf = Vec::new();
        write_frame(&mut buf, payload).await.unwrap();
        read_frame(&mut &buf[..], max).await
    }

    #[tokio::test]
    async fn oversized_length_is_refused_before_allocation() {
        let mut buf = Vec::new();
        put_varint(&mut buf, u32::MAX.into());
        assert_eq!(buf, [0xff, 0xff, 0xff, 0xff, 0x0f]);
        let err = read_frame(&mut &buf[..], 1024).await.unwrap_err();
        assert!(matches!(err, WireError::FrameTooLarge { .. }), "{err}");
        // A prefix that never ends.
        let err = read_frame(&mut &[0x80u8; 8][..], 1024).await.unwrap_err();
        assert!(matches!(err, WireError::FrameTooLarge { .. }), "{err}");
    }

    #[tokio::test]
    async fn the_length_prefix_is_as_short_as_the_frame_allows() {
        for (len, prefix) in [(0, 1), (127, 1), (128, 2), (16_383, 2), (16_384, 3)] {
            let payload = vec![7u8; len];
            let frame = encode_frame(&payload).unwrap();
            assert_eq!(frame.len(), len + prefix, "{len}");
            assert_eq!(framed_len(len), len + prefix, "{len}");
            let got = read_frame(&mut &frame[..], 1 << 20).await.unwrap().unwrap();
            assert_eq!(&got[..], &payload[..]);
        }
        assert_eq!(framed_len(u32::MAX as usize), 5 + u32::MAX as usize);
    }

    #[tokio::test]
    async fn truncated_frame_is_an_error_and_clean_eof_is_not() {
        assert!(roundtrip(b"", 10).await.unwrap().unwrap().is_empty());
        assert!(read_frame(&mut &b""[..], 10).await.unwrap().is_none());
        let err = read_frame(&mut &[5u8, 1][..], 10).await.unwrap_err();
        assert!(matches!(err, WireError::Truncated));
        // Cut inside the length prefix.
        let err = read_frame(&mut &[0x85u8][..], 10).await.unwrap_err();
        assert!(matches!(err, WireError::Truncated));
    }

    #[tokio::test]
    async fn frames_across_the_growth_steps_arrive_whole() {
        for len in [
            FIRST_CHUNK - 1,
            FIRST_CHUNK,
            FIRST_CHUNK + 1,
            5 * FIRST_CHUNK + 7,
        ] {
            let payload: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
            let got = roundtrip(&payload, 1 << 30).await.unwrap().unwrap();
            assert_eq!(&got[..], &payload[..], "{len}");
            assert_eq!(got.as_ptr() as usize % 16, 0, "aligned for rkyv");
            assert_eq!(got.len(), len);
        }
        // A large announcement followed by a few bytes is truncated, having held only those.
        let mut buf = Vec::new();
        put_varint(&mut buf, (1u64 << 30) - 1);
        buf.extend_from_slice(&[7; 100]);
        let err = read_frame(&mut &buf[..], 1 << 30).await.unwrap_err();
        assert!(matches!(err, WireError::Truncated), "{err}");
    }

    #[test]
    fn garbage_fails_validation() {
        assert!(decode::<Request>(&[1, 2, 3]).is_err());
        assert!(decode::<Response>(&[0xff; 64]).is_err());
    }

    #[test]
    fn requests_and_responses_roundtrip() {
        let req = Request {
            timeout_ms: 10,
            ctx: vec![1, 2],
            op: ClientOp::Put {
                key: b"k".to_vec(),
                value: b"v".to_vec(),
                sync: 1,
            },
        };
        assert_eq!(decode::<Request>(&encode(&req)).unwrap(), req);
        let resp = Response {
            body: ResponseBody::Value {
                value: Some(b"v".to_vec()),
                version: Some(WireVersion { ts: 3, site: 1 }),
                deps: vec![2, 0],
            },
            applied: vec![1, 2],
        };
        assert_eq!(decode::<Response>(&encode(&resp)).unwrap(), resp);
    }

    #[test]
    fn a_shorter_vector_reads_as_zeros_and_a_longer_one_is_refused() {
        // A vector written before a site was added has no entry for it: zero, not an error.
        let v = check_vector(&[5, 7], 3, "ack").unwrap();
        assert_eq!(v.as_slice(), &[5, 7, 0]);
        assert_eq!(check_vector(&[], 2, "ack").unwrap().as_slice(), &[0, 0]);
        assert_eq!(
            check_vector(&[1, 2, 3], 3, "ack").unwrap().as_slice(),
            &[1, 2, 3]
        );
        let e = check_vector(&[1, 2, 3, 4], 3, "ack vector").unwrap_err();
        assert!(e.to_string().contains("ack vector has 4 entries"), "{e}");
        // Past the sites counted here, zeros only: a site added that this node has not
        // adopted yet, and that has written nothing.
        let v = check_vector(&[1, 2, 3, 0, 0], 3, "ack").unwrap();
        assert_eq!(v.as_slice(), &[1, 2, 3]);
    }
}
