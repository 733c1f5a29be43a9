//! The peer protocol's messages: the hello, acks and heartbeats of a control stream, and the
//! update batches of an origin's ordered stream.
//!
//! They travel in the same length-prefixed frames as client messages
//! ([`write_frame`](crate::wire::write_frame), [`read_frame`](crate::wire::read_frame)). Control
//! messages are rkyv archives validated the same way (bytecheck, then meaning); hellos carry the
//! [`PROTOCOL_VERSION`] ahead of theirs. Update batches are packed by hand, a few bytes of
//! metadata per update, and every field is checked as it is unpacked. They live in the server,
//! not in the client library: a client never speaks this protocol.
//!
//! - control stream (bidirectional): a [`PeerControl`] hello (or reject) each way, then packed
//!   acks ([`encode_ack`]), which double as heartbeats; sibling partitions exchange their
//!   stable-vector contributions in the same form;
//! - update stream (unidirectional, one per origin and connection): [`UpdateBatch`];
//! - datagrams on the same connection: copies of update frames ([`encode_copy`]), sent while
//!   the link loses packets, so that one lost packet does not hold the updates behind it up for
//!   a retransmission.

use bytes::Bytes;
use rkyv::util::AlignedVec;
use rkyv::{Archive, Deserialize, Serialize};

use crate::clock::{SiteId, Timestamp, VClock, Version};
use crate::update::{Item, Update};
use crate::wire::{Limits, WireError, check_sizes, encode, put_varint, varint_len};
#[cfg(test)]
use crate::wire::{read_frame, write_frame};

pub use messages::*;

/// The version of the peer protocol this build speaks. Every hello carries it ahead of the
/// archive (see [`encode_hello`]), and a hello of another version is refused with both versions
/// named. Bump it with every change to the peer wire format.
///
/// Version 1 (no version in the hello) was the first; 2 added the version; 3 packs update
/// batches (timestamp deltas, varint lengths, dependency vectors as deltas or left out); 4
/// packs acks the same way ([`encode_ack`]: each a delta against the previous one on its
/// stream), gives each written dependency vector its length (a site added live makes vectors
/// longer mid-stream) and adds the snapshot request of a joining site
/// ([`PeerControl::SnapshotRequest`]); 5 streams a joining site's snapshot as it is serialised
/// (its header no longer carries a size); 6 writes a batch's first timestamp against the last
/// one of the previous batch on the same stream (a signed delta of a byte or two, where the
/// whole timestamp took eight) and its first dependency vector against the last one of the
/// previous batch (see [`StreamBase`]), the origin as a varint, and no item count (the items
/// run to the end of the frame); 7 adds copies of update frames as QUIC datagrams
/// ([`encode_copy`]); 8 leaves the origin out of update frames (the stream says whose they
/// are) and a dependency vector's length out when it equals the previous one's ([`SAME_LEN`]);
/// 9 leaves out a key's length, and a value's, when it equals the previous update's on the
/// same stream ([`SAME_KEY_LEN`], [`SAME_VALUE_LEN`]).
pub const PROTOCOL_VERSION: u32 = 9;

/// The first byte of a datagram that carries a copy of an update frame ([`encode_copy`]).
/// Datagrams of any other kind are malformed.
pub const DATAGRAM_COPY: u8 = 1;

/// Encodes a copy of an update frame as a datagram: [`DATAGRAM_COPY`], the timestamp of the
/// item the frame follows on its stream (a varint), then `frame`, which must be written
/// against the default [`StreamBase`] so that it reads on its own.
pub fn encode_copy(prev: Timestamp, frame: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(frame.len() + 11);
    out.push(DATAGRAM_COPY);
    put_varint(&mut out, prev);
    out.extend_from_slice(frame);
    out
}

/// Decodes a datagram of [`encode_copy`] from `expected_origin`: the timestamp of the item the
/// frame follows, and the frame's items, checked as [`decode_batch`] checks a stream's.
pub fn decode_copy(
    datagram: &Bytes,
    expected_origin: SiteId,
    sites: usize,
    limits: &Limits,
) -> Result<(Timestamp, Vec<Item>), WireError> {
    match datagram.first() {
        Some(&DATAGRAM_COPY) => {}
        Some(&kind) => {
            return Err(WireError::Semantic(format!("unknown datagram kind {kind}")));
        }
        None => return Err(WireError::Semantic("empty datagram".into())),
    }
    let mut at = 1;
    let prev = get_varint(datagram, &mut at)?;
    let items = decode_batch(
        &datagram.slice(at..),
        &mut StreamBase::default(),
        expected_origin,
        sites,
        limits,
    )?;
    if items.first().is_some_and(|i| i.ts() <= prev) {
        return Err(WireError::Semantic(
            "a copied frame starts at or before the item it follows".into(),
        ));
    }
    Ok((prev, items))
}

/// The first bytes of a versioned hello frame, before the version (`u32`, little endian).
const HELLO_MAGIC: [u8; 4] = *b"CKVP";

/// Encodes a hello frame: [`HELLO_MAGIC`], [`PROTOCOL_VERSION`], then the
/// [`PeerControl::Hello`] archive. The version sits at a fixed place, so any later version can
/// still read it and refuse the peer by name, whatever its archive looks like.
pub fn encode_hello(hello: &PeerHello) -> Vec<u8> {
    encode_hello_as(hello, PROTOCOL_VERSION)
}

/// [`encode_hello`] claiming protocol `version` (tests use it to play a peer of another
/// version).
pub fn encode_hello_as(hello: &PeerHello, version: u32) -> Vec<u8> {
    encode_versioned(&PeerControl::Hello(hello.clone()), version)
}

/// Encodes a joining site's [`PeerControl::SnapshotRequest`], versioned like a hello.
pub fn encode_snapshot_request(hello: &PeerHello) -> Vec<u8> {
    encode_versioned(
        &PeerControl::SnapshotRequest(hello.clone()),
        PROTOCOL_VERSION,
    )
}

fn encode_versioned(msg: &PeerControl, version: u32) -> Vec<u8> {
    let archive = encode(msg);
    let mut out = Vec::with_capacity(8 + archive.len());
    out.extend_from_slice(&HELLO_MAGIC);
    out.extend_from_slice(&version.to_le_bytes());
    out.extend_from_slice(&archive);
    out
}

/// Decodes the first frame of a control stream: a versioned hello of this
/// [`PROTOCOL_VERSION`], or a [`PeerControl::Reject`]. A hello of another version (or of
/// version 1, which carried none) is an error naming both versions.
pub fn decode_hello(frame: &[u8]) -> Result<PeerControl, WireError> {
    if frame.len() >= 8 && frame[..4] == HELLO_MAGIC {
        let version = u32::from_le_bytes(frame[4..8].try_into().expect("4 bytes"));
        if version != PROTOCOL_VERSION {
            return Err(version_mismatch(version));
        }
        let mut archive = AlignedVec::<16>::with_capacity(frame.len() - 8);
        archive.extend_from_slice(&frame[8..]);
        return match crate::wire::decode::<PeerControl>(&archive)? {
            hello @ (PeerControl::Hello(_) | PeerControl::SnapshotRequest(_)) => Ok(hello),
            _ => Err(WireError::Semantic(
                "a versioned hello frame holds another message".into(),
            )),
        };
    }
    match crate::wire::decode::<PeerControl>(frame)? {
        PeerControl::Hello(_) | PeerControl::SnapshotRequest(_) => Err(version_mismatch(1)),
        other => Ok(other),
    }
}

fn version_mismatch(theirs: u32) -> WireError {
    WireError::Semantic(format!(
        "peer speaks peer protocol version {theirs}, this node speaks version {PROTOCOL_VERSION}"
    ))
}

/// The message types. rkyv generates an archived twin of each type; the lint for missing docs is
/// relaxed here only because those generated twins of documented fields carry no docs.
#[allow(missing_docs)]
mod messages {
    use super::*;

    /// A peer's hello on the control stream: who it claims to be and what it has applied.
    #[derive(Archive, Serialize, Deserialize, Clone, Debug, PartialEq)]
    pub struct PeerHello {
        /// Cluster id; both sides must agree.
        pub cluster: String,
        /// The site id the sender claims; its certificate must name that site.
        pub site: u16,
        /// Number of sites the sender is configured with.
        pub sites: u16,
        /// The sender's partition of its site: peers replicate partition with like partition;
        /// the partitions of one site exchange stable-vector contributions.
        pub partition: u16,
        /// Number of partitions per site the sender is configured with.
        pub partitions: u16,
        /// The sender's durable `applied` vector.
        pub applied: Vec<u64>,
    }

    /// Messages on a peer control stream.
    #[derive(Archive, Serialize, Deserialize, Clone, Debug, PartialEq)]
    pub enum PeerControl {
        /// The first message in each direction.
        Hello(PeerHello),
        /// The hello was refused; the connection closes after this.
        Reject {
            /// Why.
            reason: String,
        },
        /// The first message of a joining site on a connection of its own: in place of a
        /// hello (checked the same way: cluster, site, certificate), it asks for a snapshot.
        /// Sent versioned like a hello ([`encode_snapshot_request`]).
        SnapshotRequest(PeerHello),
        /// The answer to a [`PeerControl::SnapshotRequest`]: the snapshot archive follows the
        /// frame on the stream, raw, up to the stream's end (it is streamed as it is
        /// serialised, so its size is not known up front; a reset stream is a failed one).
        SnapshotHeader {
            /// The WAL LSN the snapshot covers (its file name carries it).
            wal_lsn: u64,
            /// The sender's `applied` vector once the copy had ended: the joining site serves
            /// clients only once it covers this (the copy may hold entries newer than the
            /// snapshot's own `applied` vector).
            floor: Vec<u64>,
        },
    }

    /// Item kinds in an [`UpdateBatch`] (the low two bits of an item's tag byte).
    pub mod item_kind {
        /// A put.
        pub const PUT: u8 = 0;
        /// A delete (tombstone).
        pub const DELETE: u8 = 1;
        /// A clock marker.
        pub const MARKER: u8 = 2;
    }
}

/// The layout of an update frame (not an rkyv archive: its header would cost more than the
/// items it carries): the packed items up to the end of the frame (see [`encode_wire_batch`]),
/// with no origin (the stream, or the request a relayed frame answers, says whose they are):
/// timestamps as deltas (the first one a zigzag varint
/// against the stream's [`StreamBase`]), lengths as varints, and each dependency vector as a
/// delta against the previous update's (the first one's against the base's), or left out when
/// it equals that one.
pub struct UpdateBatch;

/// One item of an origin's update stream, borrowing its key, value and dependencies from the
/// sender's log, so a batch is packed without copying them first.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct WireItem<'a> {
    /// Origin timestamp.
    pub ts: u64,
    /// One of [`item_kind`].
    pub kind: u8,
    /// Key (empty for markers).
    pub key: &'a [u8],
    /// Value (empty for deletes and markers).
    pub value: &'a [u8],
    /// Dependencies, one entry per site (empty for markers).
    pub deps: &'a [u64],
}

/// Bit 4 of an update's tag byte: its dependency vector (in a mode that writes one) has as
/// many entries as the previous update's, so its length is not written.
const SAME_LEN: u8 = 0x10;

/// Bit 5 of an update's tag byte: its key is as long as the previous update's on the stream
/// ([`StreamBase::key_len`]), so its length is not written.
const SAME_KEY_LEN: u8 = 0x20;

/// Bit 6 of a put's tag byte: its value is as long as the previous put's on the stream
/// ([`StreamBase::value_len`]), so its length is not written.
const SAME_VALUE_LEN: u8 = 0x40;

/// How an update's dependency vector is written (bits 2-3 of its tag byte).
mod deps_mode {
    /// Equal to the previous update's in the batch (empty before the first): nothing
    /// written. The other modes write the vector's length first.
    pub const SAME: u8 = 0;
    /// One varint per entry: 0 when the entry equals the previous update's, else the entry's
    /// distance below the update's own timestamp (`ts - dep`, at least 1).
    pub const DELTA: u8 = 1;
    /// One varint per entry: the entry itself.
    pub const FULL: u8 = 2;
    /// One varint per entry: how much the entry grew since the previous update's (0 when
    /// unchanged). A session's context only grows, so an origin's successive updates mostly
    /// qualify, and an entry's growth (the remote writes its session saw since) is often
    /// smaller than its distance below the timestamp.
    pub const GROWTH: u8 = 3;
}

/// The wire form of a replica item, borrowing from it.
pub fn wire_item(item: &Item) -> WireItem<'_> {
    match item {
        Item::Update(u) => wire_update(u),
        Item::Marker(ts) => wire_marker(*ts),
    }
}

/// The wire form of a clock marker.
pub fn wire_marker(ts: Timestamp) -> WireItem<'static> {
    WireItem {
        ts,
        kind: item_kind::MARKER,
        key: &[],
        value: &[],
        deps: &[],
    }
}

/// The wire form of an update, borrowing from it.
pub fn wire_update(u: &Update) -> WireItem<'_> {
    WireItem {
        ts: u.version.ts,
        kind: if u.value.is_some() {
            item_kind::PUT
        } else {
            item_kind::DELETE
        },
        key: &u.key,
        value: u.value.as_deref().unwrap_or(&[]),
        deps: u.deps.as_slice(),
    }
}

/// An encoded [`UpdateBatch`] and what its bytes carry.
#[derive(Debug)]
pub struct EncodedBatch {
    /// The archive, ready for [`write_frame`](crate::wire::write_frame).
    pub frame: AlignedVec,
    /// Bytes spent on dependency vectors (tag bytes not included).
    pub deps_bytes: usize,
    /// Bytes spent on clock markers (tag and timestamp).
    pub marker_bytes: usize,
    /// The base of the next frame on the same stream, once this one is sent: the last item's
    /// timestamp and the last update's dependency vector (the given base's where the batch
    /// has none).
    pub next: StreamBase,
}

/// What a frame on an origin's stream is written against: the timestamp of the last item and
/// the dependency vector of the last update of the previous frame on the same stream (both sides
/// keep it; a stream delivers frames in order). The default (0, no vector) for the first frame
/// of a stream, or a frame read on its own.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StreamBase {
    /// The last timestamp sent.
    pub ts: Timestamp,
    /// The last dependency vector sent.
    pub deps: Vec<u64>,
    /// The length of the last key sent (none before the first update).
    pub key_len: Option<u64>,
    /// The length of the last put's value sent (none before the first put).
    pub value_len: Option<u64>,
}

/// Encodes one origin's items as an [`UpdateBatch`] frame after `base` (see
/// [`encode_updates`]).
pub fn encode_batch(base: &StreamBase, items: &[Item]) -> AlignedVec {
    encode_wire_batch(base, items.iter().map(wire_item)).frame
}

/// Encodes an origin's updates, then an optional clock marker, as one [`UpdateBatch`] frame,
/// packing straight from the updates. `base` is the [`EncodedBatch::next`] of the previous
/// frame sent on the same stream (the default for the first, or for a frame read on its own);
/// the receiver decodes with the same base.
pub fn encode_updates<'a>(
    base: &StreamBase,
    updates: impl Iterator<Item = &'a Update>,
    marker: Option<Timestamp>,
) -> EncodedBatch {
    encode_wire_batch(
        base,
        updates.map(wire_update).chain(marker.map(wire_marker)),
    )
}

/// The zigzag varint form of `ts - base` (a batch's first timestamp against its stream's base).
fn put_first_ts(out: &mut Vec<u8>, base: u64, ts: u64) {
    let d = ts.wrapping_sub(base) as i64;
    put_varint(out, ((d << 1) ^ (d >> 63)) as u64);
}

fn get_varint(body: &[u8], at: &mut usize) -> Result<u64, WireError> {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let b = *body
            .get(*at)
            .ok_or_else(|| WireError::Semantic("frame ends inside a number".into()))?;
        *at += 1;
        if shift == 63 && b > 1 {
            break;
        }
        v |= u64::from(b & 0x7f) << shift;
        if b < 0x80 {
            return Ok(v);
        }
    }
    Err(WireError::Semantic("number too long in frame".into()))
}

/// The most entries a packed ack may carry (the most sites a cluster can have).
const ACK_MAX_ENTRIES: u64 = 64;

/// Tag bits of a packed ack ([`encode_ack`]).
mod ack_tag {
    /// The entries are changes against the previous ack on the stream.
    pub const DELTA: u8 = 1;
    /// (Siblings) the sender waits on the site's stable vector.
    pub const WAITING: u8 = 2;
    /// (Siblings) the sender's newest durable local update follows the entries.
    pub const WRITE: u8 = 4;
}

/// A decoded ack ([`decode_ack`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Ack {
    /// The vector: a site's durable `applied`, or a partition's stable-vector contribution.
    pub v: Vec<u64>,
    /// A partition's contribution only: the sender has something waiting on the site's stable
    /// vector, so it wants its siblings' contributions as soon as they change.
    pub waiting: bool,
    /// A partition's contribution only: the timestamp of the sender's newest durable local
    /// update, when it changed since the sender's previous contribution.
    pub write: Option<u64>,
}

/// Encodes an ack: the sender's durable `applied` vector, which also serves as the heartbeat.
///
/// A control stream carries acks in order, so each is encoded against the previous one on the
/// same stream, `prev`: a tag byte with bit 0 set, the entry count (varint), then each entry's
/// change as a zigzag varint (an idle link's ack is a byte or two per site). The first ack on a
/// stream, or one whose length differs from `prev`, is sent whole: bit 0 clear, the count, then
/// the entries. [`decode_ack`] reverses it with the same `prev`.
pub fn encode_ack(prev: Option<&[u64]>, v: &[u64]) -> Vec<u8> {
    encode_contribution(prev, v, false, None)
}

/// Encodes a partition's stable-vector contribution for its siblings: an ack
/// ([`encode_ack`]) whose tag also says whether the sender is `waiting` on the stable vector
/// (bit 1), and, when given, the timestamp of its newest durable local `write` after the
/// entries (bit 2; a varint).
pub fn encode_contribution(
    prev: Option<&[u64]>,
    v: &[u64],
    waiting: bool,
    write: Option<u64>,
) -> Vec<u8> {
    let mut out = Vec::with_capacity(12 + 3 * v.len());
    let delta = |now: u64, was: u64| {
        let d = now.wrapping_sub(was) as i64;
        (was.checked_add_signed(d) == Some(now)).then_some(d)
    };
    let flags = if waiting { ack_tag::WAITING } else { 0 }
        | if write.is_some() { ack_tag::WRITE } else { 0 };
    match prev
        .filter(|p| p.len() == v.len() && v.iter().zip(*p).all(|(&n, &w)| delta(n, w).is_some()))
    {
        Some(p) => {
            out.push(ack_tag::DELTA | flags);
            put_varint(&mut out, v.len() as u64);
            for (&now, &was) in v.iter().zip(p) {
                let d = delta(now, was).expect("checked above");
                put_varint(&mut out, ((d << 1) ^ (d >> 63)) as u64);
            }
        }
        None => {
            out.push(flags);
            put_varint(&mut out, v.len() as u64);
            for &e in v {
                put_varint(&mut out, e);
            }
        }
    }
    if let Some(w) = write {
        put_varint(&mut out, w);
    }
    out
}

/// Decodes an ack or contribution frame ([`encode_ack`], [`encode_contribution`]) against the
/// previous one decoded from the same stream. Errors name what is wrong: an unknown tag, too
/// many entries, a delta without a previous ack of the same length, an entry out of range, or
/// bytes left over.
pub fn decode_ack(prev: Option<&[u64]>, frame: &[u8]) -> Result<Ack, WireError> {
    let bad = |m: String| WireError::Semantic(format!("ack: {m}"));
    let (&tag, _) = frame
        .split_first()
        .ok_or_else(|| bad("empty frame".into()))?;
    if tag & !(ack_tag::DELTA | ack_tag::WAITING | ack_tag::WRITE) != 0 {
        return Err(bad(format!("unknown tag {tag}")));
    }
    let mut at = 1;
    let n = get_varint(frame, &mut at)?;
    if n > ACK_MAX_ENTRIES {
        return Err(bad(format!(
            "{n} entries, at most {ACK_MAX_ENTRIES} sites exist"
        )));
    }
    let mut v = Vec::with_capacity(n as usize);
    if tag & ack_tag::DELTA == 0 {
        for _ in 0..n {
            v.push(get_varint(frame, &mut at)?);
        }
    } else {
        let p = prev
            .filter(|p| p.len() as u64 == n)
            .ok_or_else(|| bad("a delta without a previous ack of the same length".into()))?;
        for &was in p {
            let z = get_varint(frame, &mut at)?;
            let d = ((z >> 1) as i64) ^ -((z & 1) as i64);
            let now = was
                .checked_add_signed(d)
                .ok_or_else(|| bad(format!("entry {was} changed by {d} is out of range")))?;
            v.push(now);
        }
    }
    let write = if tag & ack_tag::WRITE != 0 {
        Some(get_varint(frame, &mut at)?)
    } else {
        None
    };
    if at != frame.len() {
        return Err(bad(format!("{} bytes left over", frame.len() - at)));
    }
    Ok(Ack {
        v,
        waiting: tag & ack_tag::WAITING != 0,
        write,
    })
}

/// Encodes wire items (see [`wire_item`], [`wire_update`]) as one [`UpdateBatch`] frame.
///
/// Each item: a tag byte (kind in bits 0-1, dependency mode in bits 2-3, [`SAME_LEN`],
/// [`SAME_KEY_LEN`], [`SAME_VALUE_LEN`]), the timestamp's increase over the previous item's
/// (varint; the first item's over 0), and for an update the key's length (varint, left out when
/// it equals the previous update's on the stream) and key, for a put the value's length (the
/// same way) and value, then the
/// dependency vector in its mode: left out when equal to the previous update's, else its length
/// (unless [`SAME_LEN`]) and one varint
/// per entry, 0 for an entry equal to the previous update's and `ts - dep` otherwise (or the
/// entries themselves when some changed entry is not below `ts`).
pub fn encode_wire_batch<'a>(
    base: &StreamBase,
    items: impl IntoIterator<Item = WireItem<'a>>,
) -> EncodedBatch {
    let mut body = Vec::new();
    let (mut count, mut last_ts) = (0u32, base.ts);
    let put_ts = |body: &mut Vec<u8>, count: u32, last_ts: u64, ts: u64| {
        if count == 1 {
            put_first_ts(body, base.ts, ts);
        } else {
            put_varint(body, ts.wrapping_sub(last_ts));
        }
    };
    let (mut deps_bytes, mut marker_bytes) = (0, 0);
    let mut prev: Vec<u64> = base.deps.clone();
    let (mut key_len, mut value_len) = (base.key_len, base.value_len);
    for it in items {
        count += 1;
        let start = body.len();
        if it.kind == item_kind::MARKER {
            body.push(item_kind::MARKER);
            put_ts(&mut body, count, last_ts, it.ts);
            last_ts = it.ts;
            marker_bytes += body.len() - start;
            continue;
        }
        let same = it.deps == prev.as_slice();
        let same_len = !prev.is_empty() && prev.len() == it.deps.len();
        if !same_len {
            prev = vec![0; it.deps.len()];
        }
        // The cheapest of the modes that can write this vector.
        let pairs = || it.deps.iter().zip(&prev).map(|(&d, &p)| (d, p));
        let cost = |f: &dyn Fn(u64, u64) -> u64| -> usize {
            pairs()
                .map(|(d, p)| varint_len(if d == p { 0 } else { f(d, p) }))
                .sum()
        };
        let mode = if same {
            deps_mode::SAME
        } else {
            let mut best = (cost(&|d, _| d), deps_mode::FULL);
            if pairs().all(|(d, p)| d == p || d < it.ts) {
                best = best.min((cost(&|d, _| it.ts - d), deps_mode::DELTA));
            }
            if pairs().all(|(d, p)| d >= p) {
                best = best.min((cost(&|d, p| d - p), deps_mode::GROWTH));
            }
            best.1
        };
        let flag = if same_len && mode != deps_mode::SAME {
            SAME_LEN
        } else {
            0
        };
        let (klen, vlen) = (it.key.len() as u64, it.value.len() as u64);
        let same_key = key_len == Some(klen);
        let same_value = it.kind == item_kind::PUT && value_len == Some(vlen);
        let lens =
            if same_key { SAME_KEY_LEN } else { 0 } | if same_value { SAME_VALUE_LEN } else { 0 };
        body.push(it.kind | (mode << 2) | flag | lens);
        put_ts(&mut body, count, last_ts, it.ts);
        last_ts = it.ts;
        if !same_key {
            put_varint(&mut body, klen);
        }
        key_len = Some(klen);
        body.extend_from_slice(it.key);
        if it.kind == item_kind::PUT {
            if !same_value {
                put_varint(&mut body, vlen);
            }
            value_len = Some(vlen);
            body.extend_from_slice(it.value);
        }
        let before = body.len();
        if mode != deps_mode::SAME && flag == 0 {
            put_varint(&mut body, it.deps.len() as u64);
        }
        match mode {
            deps_mode::DELTA => {
                for (d, p) in it.deps.iter().zip(&prev) {
                    put_varint(&mut body, if d == p { 0 } else { it.ts - d });
                }
            }
            deps_mode::FULL => it.deps.iter().for_each(|d| put_varint(&mut body, *d)),
            deps_mode::GROWTH => {
                for (d, p) in pairs() {
                    put_varint(&mut body, d - p);
                }
            }
            _ => {}
        }
        deps_bytes += body.len() - before;
        prev.copy_from_slice(it.deps);
    }
    let mut frame = AlignedVec::with_capacity(body.len());
    frame.extend_from_slice(&body);
    EncodedBatch {
        frame,
        deps_bytes,
        marker_bytes,
        next: StreamBase {
            ts: last_ts,
            deps: prev,
            key_len,
            value_len,
        },
    }
}

/// Validates an [`UpdateBatch`] frame and turns it into replica items. `base` is what the
/// previous frame decoded from the same stream left (the default for the first, or for a frame
/// on its own), as the sender encoded it; it becomes what this frame leaves once the frame
/// decodes (an error leaves it as it was).
/// Dependency vectors carry their length (the sites the sender counted when it wrote the
/// update: a site added meanwhile makes later ones longer), at most `sites`. Keys and values are
/// slices of `frame`: they reach the store without being copied or re-encoded.
///
/// The items are `expected_origin`'s. Checks, beyond structure: the body is whole well-formed
/// items; kinds and dependency modes are known; keys and values respect `limits`;
/// timestamps are non-zero and strictly increasing along the batch; every dependency vector
/// has one entry per site (`sites`).
pub fn decode_batch(
    frame: &Bytes,
    base: &mut StreamBase,
    expected_origin: SiteId,
    sites: usize,
    limits: &Limits,
) -> Result<Vec<Item>, WireError> {
    let origin = expected_origin;
    let body: &[u8] = frame;
    // Sized for a frame of small updates; a frame of large values has few items (the frame
    // itself bounds how many there can be: every item takes at least two bytes).
    let mut out = Vec::with_capacity((body.len() / 64).clamp(1, 1024));
    let (mut at, mut last) = (0usize, base.ts);
    let mut prev: Vec<u64> = base.deps.clone();
    let (mut key_len, mut value_len) = (base.key_len, base.value_len);
    let take = |at: &mut usize, len: u64, what: &str| -> Result<Bytes, WireError> {
        let len = usize::try_from(len).unwrap_or(usize::MAX);
        let end = at
            .checked_add(len)
            .filter(|&e| e <= body.len())
            .ok_or_else(|| WireError::Semantic(format!("{what} runs past the batch body")))?;
        let b = frame.slice_ref(&body[*at..end]);
        *at = end;
        Ok(b)
    };
    while at < body.len() {
        let first = out.is_empty();
        let tag = body[at];
        at += 1;
        let (kind, mode, same_len) = (tag & 3, (tag >> 2) & 3, tag & SAME_LEN != 0);
        let (same_key, same_value) = (tag & SAME_KEY_LEN != 0, tag & SAME_VALUE_LEN != 0);
        if tag & !(SAME_LEN | SAME_KEY_LEN | SAME_VALUE_LEN | 0x0f) != 0
            || (same_value && kind != item_kind::PUT)
        {
            return Err(WireError::Semantic(format!("unknown item tag {tag}")));
        }
        let delta = get_varint(body, &mut at)?;
        let ts = if first {
            let d = ((delta >> 1) as i64) ^ -((delta & 1) as i64);
            base.ts
                .checked_add_signed(d)
                .filter(|&t| t > 0)
                .ok_or_else(|| {
                    WireError::Semantic(format!(
                        "the first timestamp, {} changed by {d}, is out of range",
                        base.ts
                    ))
                })?
        } else {
            last.checked_add(delta)
                .filter(|&t| t > last)
                .ok_or_else(|| {
                    WireError::Semantic(format!(
                        "timestamps must increase along a batch (+{delta} after {last})"
                    ))
                })?
        };
        last = ts;
        match kind {
            item_kind::MARKER if mode == 0 && !same_len && !same_key => out.push(Item::Marker(ts)),
            item_kind::PUT | item_kind::DELETE => {
                let no_previous = |what: &str| {
                    WireError::Semantic(format!(
                        "a {what} as long as a previous one that is not there"
                    ))
                };
                let klen = if same_key {
                    key_len.ok_or_else(|| no_previous("key"))?
                } else {
                    get_varint(body, &mut at)?
                };
                key_len = Some(klen);
                let key = take(&mut at, klen.min(limits.max_key as u64 + 1), "key")?;
                let value = if kind == item_kind::PUT {
                    let vlen = if same_value {
                        value_len.ok_or_else(|| no_previous("value"))?
                    } else {
                        get_varint(body, &mut at)?
                    };
                    value_len = Some(vlen);
                    check_sizes(key.len(), vlen.min(u32::MAX as u64) as usize, limits)?;
                    Some(take(&mut at, vlen, "value")?)
                } else {
                    check_sizes(key.len(), 0, limits)?;
                    None
                };
                if same_len && (mode == deps_mode::SAME || prev.is_empty()) {
                    return Err(WireError::Semantic(
                        "a dependency vector as long as a previous one that is not there".into(),
                    ));
                }
                if matches!(mode, deps_mode::DELTA | deps_mode::FULL | deps_mode::GROWTH) {
                    let len = if same_len {
                        prev.len() as u64
                    } else {
                        get_varint(body, &mut at)?
                    };
                    if len > sites as u64 {
                        return Err(WireError::Semantic(format!(
                            "dependency vector of {len} entries; at most {sites} sites"
                        )));
                    }
                    if prev.len() as u64 != len {
                        prev = vec![0; len as usize];
                    }
                }
                match mode {
                    deps_mode::SAME => {}
                    deps_mode::DELTA => {
                        for p in prev.iter_mut() {
                            match get_varint(body, &mut at)? {
                                0 => {}
                                c if c <= ts => *p = ts - c,
                                c => {
                                    return Err(WireError::Semantic(format!(
                                        "dependency {c} below timestamp {ts} is negative"
                                    )));
                                }
                            }
                        }
                    }
                    deps_mode::FULL => {
                        for p in prev.iter_mut() {
                            *p = get_varint(body, &mut at)?;
                        }
                    }
                    deps_mode::GROWTH => {
                        for p in prev.iter_mut() {
                            let c = get_varint(body, &mut at)?;
                            *p = p.checked_add(c).ok_or_else(|| {
                                WireError::Semantic(format!(
                                    "dependency {p} grown by {c} overflows"
                                ))
                            })?;
                        }
                    }
                    m => return Err(WireError::Semantic(format!("unknown dependency mode {m}"))),
                }
                out.push(Item::Update(Update {
                    key,
                    value,
                    version: Version::new(ts, origin),
                    deps: VClock::from_vec(prev.clone()),
                }));
            }
            _ => return Err(WireError::Semantic(format!("unknown item tag {tag}"))),
        }
    }
    *base = StreamBase {
        ts: last,
        deps: prev,
        key_len,
        value_len,
    };
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rkyv::util::AlignedVec;

    #[test]
    fn acks_are_deltas_against_the_previous_one_and_bad_ones_are_refused() {
        let first = vec![1_000_000_000_000, 5, 0, 7];
        let whole = encode_ack(None, &first);
        assert_eq!(decode_ack(None, &whole).unwrap().v, first);
        // An idle link's next ack: entries moved a little or not at all. The tag, the count,
        // +250 in two bytes and one byte for each other entry.
        let next = vec![1_000_000_000_250, 5, 0, 6];
        let delta = encode_ack(Some(&first), &next);
        assert_eq!(delta, vec![1, 4, 244, 3, 0, 0, 1]);
        assert!(
            delta.len() < whole.len(),
            "{} vs {}",
            delta.len(),
            whole.len()
        );
        assert_eq!(decode_ack(Some(&first), &delta).unwrap().v, next);
        // A vector of another length goes whole, and decodes without the previous one.
        let wider = vec![1, 2, 3, 4, 5];
        let w = encode_ack(Some(&first), &wider);
        assert_eq!(decode_ack(Some(&first), &w).unwrap().v, wider);
        assert_eq!(decode_ack(None, &w).unwrap().v, wider);
        // Refused, each with a clear error.
        let err = |prev: Option<&[u64]>, f: &[u8]| decode_ack(prev, f).unwrap_err().to_string();
        assert!(err(None, &delta).contains("without a previous ack"));
        assert!(err(Some(&[1, 2]), &delta).contains("without a previous ack"));
        assert!(err(None, &[]).contains("empty frame"));
        assert!(err(None, &[9, 0]).contains("unknown tag 9"));
        assert!(err(None, &[0, 65]).contains("65 entries"));
        assert!(err(None, &[0, 2, 1]).contains("ends inside a number"));
        assert!(err(None, &[0, 1, 1, 9]).contains("1 bytes left over"));
        // Entry 0 would go below zero: zigzag 3 is -2.
        assert!(err(Some(&[1]), &[1, 1, 3]).contains("out of range"));
        // A change too large for a signed delta goes whole.
        let far = encode_ack(Some(&[0]), &[u64::MAX]);
        assert_eq!(far[0], 0);
        assert_eq!(decode_ack(Some(&[0]), &far).unwrap().v, vec![u64::MAX]);
        // A sibling's contribution: the waiting flag and its newest write ride along.
        let c = encode_contribution(Some(&first), &next, true, Some(1_000_000_000_100));
        let back = decode_ack(Some(&first), &c).unwrap();
        assert_eq!(
            back,
            Ack {
                v: next.clone(),
                waiting: true,
                write: Some(1_000_000_000_100)
            }
        );
        let plain = decode_ack(
            Some(&first),
            &encode_contribution(Some(&first), &next, false, None),
        );
        assert_eq!(
            (
                plain.unwrap().waiting,
                decode_ack(None, &whole).unwrap().write
            ),
            (false, None)
        );
        // The newest write announced but missing.
        assert!(err(None, &[4, 1, 1]).contains("ends inside a number"));
    }

    fn update(ts: u64, key: &str, value: Option<&str>) -> Item {
        Item::Update(Update {
            key: Bytes::copy_from_slice(key.as_bytes()),
            value: value.map(|v| Bytes::copy_from_slice(v.as_bytes())),
            version: Version::new(ts, 1),
            deps: VClock::from_vec(vec![3, 0, 0]),
        })
    }

    async fn roundtrip(payload: &[u8], max: usize) -> Result<Option<Bytes>, WireError> {
        let mut buf = Vec::new();
        write_frame(&mut buf, payload).await.unwrap();
        read_frame(&mut &buf[..], max).await
    }

    #[tokio::test]
    async fn batch_roundtrips_and_values_are_slices_of_the_frame() {
        let items = vec![
            update(5, "a", Some("x")),
            update(6, "b", None),
            Item::Marker(9),
        ];
        let frame = roundtrip(&encode_batch(&StreamBase::default(), &items), 1 << 20)
            .await
            .unwrap()
            .unwrap();
        let got =
            decode_batch(&frame, &mut StreamBase::default(), 1, 3, &Limits::default()).unwrap();
        assert_eq!(got, items);
        if let Item::Update(u) = &got[0] {
            let v = u.value.as_ref().unwrap();
            let range = frame.as_ptr() as usize..frame.as_ptr() as usize + frame.len();
            assert!(range.contains(&(v.as_ptr() as usize)), "value was copied");
        }
    }

    #[test]
    fn a_copy_reads_on_its_own_and_bad_ones_are_refused() {
        let items = vec![update(5, "a", Some("x")), Item::Marker(9)];
        let frame = encode_batch(&StreamBase::default(), &items);
        let copy = Bytes::from(encode_copy(4, &frame));
        let limits = Limits::default();
        assert_eq!(decode_copy(&copy, 1, 3, &limits).unwrap(), (4, items));
        let err = |d: &[u8]| {
            decode_copy(&Bytes::copy_from_slice(d), 1, 3, &limits)
                .unwrap_err()
                .to_string()
        };
        assert!(err(&[]).contains("empty datagram"));
        assert!(err(&[7, 0]).contains("unknown datagram kind 7"));
        assert!(err(&[DATAGRAM_COPY, 0x80]).contains("ends inside a number"));
        // A frame whose item has an unknown tag, and one that does not follow the item it
        // claims to.
        assert!(err(&encode_copy(4, &[0x80, 9])).contains("unknown item tag 128"));
        assert!(err(&encode_copy(5, &frame)).contains("at or before the item it follows"));
    }

    #[test]
    fn key_and_value_lengths_are_left_out_when_they_repeat_and_checked_when_they_are() {
        let limits = Limits::default();
        let items = vec![
            update(5, "ka", Some("v1")),
            update(6, "kb", Some("v2")),
            update(7, "kc", None),
            update(8, "kd", Some("longer")),
        ];
        let out = encode_wire_batch(&StreamBase::default(), items.iter().map(wire_item));
        // Item i starts where the frame of the items before it ends.
        let tags: Vec<u8> = (0..items.len())
            .map(|i| {
                let before =
                    encode_wire_batch(&StreamBase::default(), items[..i].iter().map(wire_item));
                out.frame[before.frame.len()]
            })
            .collect();
        assert_eq!(
            tags[0] & (SAME_KEY_LEN | SAME_VALUE_LEN),
            0,
            "nothing before the first"
        );
        assert_eq!(
            tags[1] & (SAME_KEY_LEN | SAME_VALUE_LEN),
            SAME_KEY_LEN | SAME_VALUE_LEN
        );
        assert_eq!(
            tags[2] & (SAME_KEY_LEN | SAME_VALUE_LEN),
            SAME_KEY_LEN,
            "a delete"
        );
        assert_eq!(
            tags[3] & (SAME_KEY_LEN | SAME_VALUE_LEN),
            SAME_KEY_LEN,
            "a longer value"
        );
        assert_eq!(out.next.key_len, Some(2));
        assert_eq!(out.next.value_len, Some(6));
        let mut base = StreamBase::default();
        let frame = aligned(&out.frame);
        assert_eq!(
            decode_batch(&frame, &mut base, 1, 3, &limits).unwrap(),
            items
        );
        assert_eq!(base, out.next);
        // The next frame's first update is written against the stream's lengths.
        let next = encode_wire_batch(&out.next, [wire_item(&update(9, "ke", Some("value!")))]);
        assert_eq!(
            next.frame[0] & (SAME_KEY_LEN | SAME_VALUE_LEN),
            SAME_KEY_LEN | SAME_VALUE_LEN
        );
        let got = decode_batch(&aligned(&next.frame), &mut base, 1, 3, &limits).unwrap();
        assert_eq!(got, vec![update(9, "ke", Some("value!"))]);
        // Bad input (timestamps 5 after the default base): a repeated length with nothing
        // before it, a value length on a delete or a marker's key length.
        let bad = |body: &[u8]| {
            decode_batch(&aligned(body), &mut StreamBase::default(), 1, 3, &limits)
                .unwrap_err()
                .to_string()
        };
        assert!(bad(&[SAME_KEY_LEN, 10, b'k']).contains("a key as long as a previous one"));
        assert!(
            bad(&[SAME_VALUE_LEN, 10, 1, b'k', b'v']).contains("a value as long as a previous")
        );
        assert!(
            bad(&[item_kind::DELETE | SAME_VALUE_LEN, 10, 1, b'k']).contains("unknown item tag")
        );
        assert!(bad(&[item_kind::MARKER | SAME_KEY_LEN, 10]).contains("unknown item tag"));
    }

    #[test]
    fn dependency_vectors_take_the_cheapest_mode() {
        let now = 1_764_600_000_000_000;
        let with = |ts: u64, deps: Vec<u64>| {
            Item::Update(Update {
                key: Bytes::from_static(b"k"),
                value: None,
                version: Version::new(ts, 1),
                deps: VClock::from_vec(deps),
            })
        };
        let items = vec![
            // Against no vector: distances below the timestamp (3 + 3 + 1 bytes).
            with(now, vec![now - 50_000, now - 40_000, now - 1]),
            // Grown by 1,000, 1,000 and 1: growth (2 + 2 + 1) beats distances (3 + 3 + 2).
            with(now + 2_000, vec![now - 49_000, now - 39_000, now]),
            // A smaller entry than before: distances again.
            with(now + 4_000, vec![now - 60_000, now - 39_000, now]),
        ];
        let b = encode_wire_batch(&StreamBase::default(), items.iter().map(wire_item));
        // The first vector also writes its length (a byte); the others are as long (SAME_LEN).
        assert_eq!(b.deps_bytes, (1 + 7) + 5 + (3 + 1 + 1));
        let frame = aligned(&b.frame);
        let mut base = StreamBase::default();
        assert_eq!(
            decode_batch(&frame, &mut base, 1, 3, &Limits::default()).unwrap(),
            items
        );
        // Growth past the largest entry is refused.
        let mut near = StreamBase {
            ts: now,
            deps: vec![u64::MAX, 0, 0],
            ..StreamBase::default()
        };
        let grown = encode_wire_batch(
            &StreamBase {
                ts: now,
                deps: vec![200, 0, 0],
                ..StreamBase::default()
            },
            [wire_item(&with(now + 1, vec![201, 0, 0]))],
        );
        let e = decode_batch(&aligned(&grown.frame), &mut near, 1, 3, &Limits::default());
        assert!(e.unwrap_err().to_string().contains("overflows"));
    }

    #[test]
    fn a_frame_is_written_against_the_previous_frame_on_its_stream() {
        let limits = Limits::default();
        let now = 1_764_600_000_000_000; // microseconds: eight bytes as a varint
        let (mut tx, mut rx) = (StreamBase::default(), StreamBase::default());
        let first = encode_wire_batch(&tx, [wire_item(&update(now, "a", Some("x")))]);
        assert_eq!(first.next.ts, now);
        assert_eq!(first.next.deps, vec![3, 0, 0]);
        decode_batch(&aligned(&first.frame), &mut rx, 1, 3, &limits).unwrap();
        assert_eq!(rx, first.next);
        tx = first.next;
        let next_items = vec![
            update(now + 2_000, "b", Some("y")),
            Item::Marker(now + 2_100),
        ];
        let next = encode_wire_batch(&tx, next_items.iter().map(wire_item));
        assert_eq!(next.next.ts, now + 2_100);
        // 2,000 µs later, the same dependencies and lengths: a two-byte zigzag delta where the
        // whole timestamp took eight, no vector where the vector took four bytes (its length,
        // then its three entries whole), and neither the key's length nor the value's.
        let alone = encode_batch(&StreamBase::default(), &next_items);
        assert_eq!(alone.len() - next.frame.len(), 6 + 4 + 2);
        let frame = aligned(&next.frame);
        let mut other = rx.clone();
        assert_eq!(
            decode_batch(&frame, &mut rx, 1, 3, &limits).unwrap(),
            next_items
        );
        assert_eq!(rx, next.next);
        // Read against another base, the same frame means other timestamps.
        other.ts -= 1;
        assert_ne!(
            decode_batch(&frame, &mut other, 1, 3, &limits).unwrap(),
            next_items
        );
        // A stream's timestamps may also step back between frames (a signed delta)...
        let ahead = StreamBase {
            ts: now + 10,
            deps: vec![],
            ..StreamBase::default()
        };
        let back = aligned(&encode_batch(&ahead, &[update(now, "c", None)]));
        assert_eq!(
            decode_batch(&back, &mut ahead.clone(), 1, 3, &limits).unwrap(),
            vec![update(now, "c", None)]
        );
        // ... but not below zero: refused, and the base stays.
        let mut zero = StreamBase::default();
        let e = decode_batch(&back, &mut zero, 1, 3, &limits).unwrap_err();
        assert!(e.to_string().contains("out of range"), "{e}");
        assert_eq!(zero, StreamBase::default());
        // An empty batch leaves the base where it was.
        assert_eq!(encode_wire_batch(&ahead, []).next, ahead);
    }

    #[test]
    fn hellos_carry_the_protocol_version() {
        let hello = PeerHello {
            cluster: "c".into(),
            site: 1,
            sites: 3,
            partition: 0,
            partitions: 1,
            applied: vec![0, 1, 2],
        };
        let frame = aligned(&encode_hello(&hello));
        assert_eq!(
            decode_hello(&frame).unwrap(),
            PeerControl::Hello(hello.clone())
        );
        let other = aligned(&encode_hello_as(&hello, PROTOCOL_VERSION + 1));
        let e = decode_hello(&other).unwrap_err().to_string();
        let want = format!(
            "peer speaks peer protocol version {}, this node speaks version {PROTOCOL_VERSION}",
            PROTOCOL_VERSION + 1
        );
        assert!(e.contains(&want), "{e}");
        let unversioned = aligned(&encode(&PeerControl::Hello(hello)));
        let e = decode_hello(&unversioned).unwrap_err().to_string();
        assert!(e.contains("version 1,"), "{e}");
        let reject = aligned(&encode(&PeerControl::Reject {
            reason: "no".into(),
        }));
        assert!(matches!(
            decode_hello(&reject),
            Ok(PeerControl::Reject { .. })
        ));
    }

    #[test]
    fn garbage_fails_validation() {
        let frame = Bytes::from_static(&[0xff; 64]);
        assert!(
            decode_batch(&frame, &mut StreamBase::default(), 1, 3, &Limits::default()).is_err()
        );
        assert!(
            decode_batch(
                &frame,
                &mut StreamBase::default(),
                0xffff,
                3,
                &Limits::default()
            )
            .is_err()
        );
    }

    #[test]
    fn semantic_checks_catch_wrong_lengths_ids_and_sizes() {
        let limits = Limits {
            max_key: 4,
            max_value: 4,
            max_frame: 1 << 20,
        };
        let items = vec![update(5, "a", Some("x"))];
        let frame = Bytes::from(encode_batch(&StreamBase::default(), &items).to_vec());
        let frame = aligned(&frame);
        // The frame names no origin: the stream's is the items'.
        match &decode_batch(&frame, &mut StreamBase::default(), 2, 3, &limits).unwrap()[0] {
            Item::Update(u) => assert_eq!(u.version.site, 2),
            other => panic!("{other:?}"),
        }
        // The length of a vector as long as a previous one that is not there, and a marker
        // with the flag.
        let mut orphan = frame.to_vec();
        orphan[0] |= SAME_LEN;
        assert!(
            decode_batch(&aligned(&orphan), &mut StreamBase::default(), 1, 3, &limits)
                .unwrap_err()
                .to_string()
                .contains("not there")
        );
        assert!(
            decode_batch(
                &aligned(&[item_kind::MARKER | SAME_LEN, 18]),
                &mut StreamBase::default(),
                1,
                3,
                &limits
            )
            .unwrap_err()
            .to_string()
            .contains("unknown item tag")
        );
        assert!(
            decode_batch(&frame, &mut StreamBase::default(), 1, 2, &limits).is_err(),
            "vector longer than the sites"
        );
        assert!(
            decode_batch(
                &aligned(&frame[..frame.len() - 1]),
                &mut StreamBase::default(),
                1,
                3,
                &limits
            )
            .is_err(),
            "a frame cut short"
        );
        let big = aligned(&encode_batch(
            &StreamBase::default(),
            &[update(5, "a", Some("toolong"))],
        ));
        assert!(
            decode_batch(&big, &mut StreamBase::default(), 1, 3, &limits).is_err(),
            "value too large"
        );
        let back = aligned(&encode_batch(
            &StreamBase::default(),
            &[update(5, "a", Some("x")), update(5, "b", Some("y"))],
        ));
        assert!(
            decode_batch(&back, &mut StreamBase::default(), 1, 3, &limits).is_err(),
            "ts not increasing"
        );
    }

    fn aligned(b: &[u8]) -> Bytes {
        let mut v = AlignedVec::<16>::new();
        v.extend_from_slice(b);
        Bytes::from_owner(v)
    }
}
