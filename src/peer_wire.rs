//! The peer protocol's messages: the hello, acks and heartbeats of a control stream, and the
//! update batches of an origin's ordered stream.
//!
//! They travel in the same length-prefixed frames as client messages
//! ([`write_frame`](crate::wire::write_frame), [`read_frame`](crate::wire::read_frame)) and are
//! validated the same way (bytecheck, then meaning). They live in the server, not in the client
//! library: a client never speaks this protocol.
//!
//! - control stream (bidirectional): [`PeerControl`] — hello, ack/heartbeat, reject;
//! - update stream (unidirectional, one per origin and connection): [`UpdateBatch`].

use bytes::Bytes;
use rkyv::util::AlignedVec;
use rkyv::with::InlineAsBox;
use rkyv::{Archive, Deserialize, Serialize};

use crate::clock::{SiteId, Timestamp, VClock, Version};
use crate::update::{Item, Update};
use crate::wire::{Limits, WireError, access, check_sizes, encode};
#[cfg(test)]
use crate::wire::{read_frame, write_frame};

pub use messages::*;

/// The version of the peer protocol this build speaks. Every hello carries it ahead of the
/// archive (see [`encode_hello`]), and a hello of another version is refused with both versions
/// named. Bump it with every change to the peer wire format.
///
/// Version 1 (no version in the hello) was the first; 2 added the version.
pub const PROTOCOL_VERSION: u32 = 2;

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
    let archive = encode(&PeerControl::Hello(hello.clone()));
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
            hello @ PeerControl::Hello(_) => Ok(hello),
            _ => Err(WireError::Semantic(
                "a versioned hello frame holds another message".into(),
            )),
        };
    }
    match crate::wire::decode::<PeerControl>(frame)? {
        PeerControl::Hello(_) => Err(version_mismatch(1)),
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
        /// The sender's durable `applied` vector; doubles as the heartbeat.
        Ack {
            /// Durable `applied` vector.
            applied: Vec<u64>,
            /// The sender's HLC reading.
            hlc: u64,
        },
        /// The hello was refused; the connection closes after this.
        Reject {
            /// Why.
            reason: String,
        },
    }

    /// Item kinds in an [`UpdateBatch`].
    pub mod item_kind {
        /// A put.
        pub const PUT: u8 = 0;
        /// A delete (tombstone).
        pub const DELETE: u8 = 1;
        /// A clock marker.
        pub const MARKER: u8 = 2;
    }

    /// One item of an origin's update stream. It borrows its key, value and dependencies from
    /// the sender's log, so a batch is serialised without copying them first.
    #[derive(Archive, Serialize, Clone, Copy, Debug, PartialEq)]
    pub struct WireItem<'a> {
        /// Origin timestamp.
        pub ts: u64,
        /// One of [`item_kind`].
        pub kind: u8,
        /// Key (empty for markers).
        #[rkyv(with = InlineAsBox)]
        pub key: &'a [u8],
        /// Value (empty for deletes and markers).
        #[rkyv(with = InlineAsBox)]
        pub value: &'a [u8],
        /// Dependencies, one entry per site (empty for markers).
        #[rkyv(with = InlineAsBox)]
        pub deps: &'a [u64],
    }

    /// Many items of one origin's stream in one frame.
    #[derive(Archive, Serialize, Clone, Debug, PartialEq)]
    pub struct UpdateBatch<'a> {
        /// The origin site.
        pub origin: u16,
        /// Items in stream order.
        pub items: Vec<WireItem<'a>>,
    }
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

/// Encodes one origin's items as an [`UpdateBatch`] archive.
pub fn encode_batch(origin: SiteId, items: &[Item]) -> AlignedVec {
    encode_wire_batch(origin, items.iter().map(wire_item))
}

/// Encodes an origin's updates, then an optional clock marker, as one [`UpdateBatch`] archive,
/// serialising straight from the updates.
pub fn encode_updates<'a>(
    origin: SiteId,
    updates: impl Iterator<Item = &'a Update>,
    marker: Option<Timestamp>,
) -> AlignedVec {
    encode_wire_batch(
        origin,
        updates.map(wire_update).chain(marker.map(wire_marker)),
    )
}

/// Encodes wire items (see [`wire_item`], [`wire_update`]) as one [`UpdateBatch`] archive. The
/// sender serialises straight from its log this way: keys, values and dependency vectors are
/// copied once, into the frame.
pub fn encode_wire_batch<'a>(
    origin: SiteId,
    items: impl IntoIterator<Item = WireItem<'a>>,
) -> AlignedVec {
    encode(&UpdateBatch {
        origin,
        items: items.into_iter().collect(),
    })
}

/// Validates an [`UpdateBatch`] frame and turns it into replica items. Keys and values are
/// slices of `frame`: they reach the store without being copied or re-encoded.
///
/// Checks, beyond structure: the origin is `expected_origin`; every dependency vector has one
/// entry per site; kinds are known; keys and values respect `limits`; timestamps are non-zero and
/// strictly increasing along the batch.
pub fn decode_batch(
    frame: &Bytes,
    expected_origin: SiteId,
    sites: usize,
    limits: &Limits,
) -> Result<Vec<Item>, WireError> {
    let batch = access::<ArchivedUpdateBatch>(frame)?;
    let origin = batch.origin.to_native();
    if origin != expected_origin {
        return Err(WireError::Semantic(format!(
            "batch claims origin {origin} on the stream of site {expected_origin}"
        )));
    }
    let mut out = Vec::with_capacity(batch.items.len());
    let mut last = 0u64;
    for it in batch.items.iter() {
        let ts = it.ts.to_native();
        if ts <= last {
            return Err(WireError::Semantic(format!(
                "timestamps must increase along a batch ({ts} after {last})"
            )));
        }
        last = ts;
        match it.kind {
            item_kind::MARKER => out.push(Item::Marker(ts)),
            item_kind::PUT | item_kind::DELETE => {
                if it.deps.len() != sites {
                    return Err(WireError::Semantic(format!(
                        "dependency vector has {} entries, the cluster has {sites} sites",
                        it.deps.len()
                    )));
                }
                check_sizes(it.key.len(), it.value.len(), limits)?;
                let key = frame.slice_ref(it.key.get());
                let value = (it.kind == item_kind::PUT).then(|| {
                    if it.value.is_empty() {
                        Bytes::new()
                    } else {
                        frame.slice_ref(it.value.get())
                    }
                });
                let deps = VClock::from_vec(it.deps.iter().map(|d| d.to_native()).collect());
                out.push(Item::Update(Update {
                    key,
                    value,
                    version: Version::new(ts, origin),
                    deps,
                }));
            }
            k => return Err(WireError::Semantic(format!("unknown item kind {k}"))),
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rkyv::util::AlignedVec;

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
        let frame = roundtrip(&encode_batch(1, &items), 1 << 20)
            .await
            .unwrap()
            .unwrap();
        let got = decode_batch(&frame, 1, 3, &Limits::default()).unwrap();
        assert_eq!(got, items);
        if let Item::Update(u) = &got[0] {
            let v = u.value.as_ref().unwrap();
            let range = frame.as_ptr() as usize..frame.as_ptr() as usize + frame.len();
            assert!(range.contains(&(v.as_ptr() as usize)), "value was copied");
        }
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
        assert!(matches!(
            decode_batch(&frame, 1, 3, &Limits::default()),
            Err(WireError::Invalid(_))
        ));
    }

    #[test]
    fn semantic_checks_catch_wrong_lengths_ids_and_sizes() {
        let limits = Limits {
            max_key: 4,
            max_value: 4,
            max_frame: 1 << 20,
        };
        let items = vec![update(5, "a", Some("x"))];
        let frame = Bytes::from(encode_batch(1, &items).to_vec());
        let frame = aligned(&frame);
        assert!(decode_batch(&frame, 2, 3, &limits).is_err(), "wrong origin");
        assert!(
            decode_batch(&frame, 1, 4, &limits).is_err(),
            "wrong vector length"
        );
        let big = aligned(&encode_batch(1, &[update(5, "a", Some("toolong"))]));
        assert!(
            decode_batch(&big, 1, 3, &limits).is_err(),
            "value too large"
        );
        let back = aligned(&encode_batch(
            1,
            &[update(5, "a", Some("x")), update(5, "b", Some("y"))],
        ));
        assert!(
            decode_batch(&back, 1, 3, &limits).is_err(),
            "ts not increasing"
        );
    }

    fn aligned(b: &[u8]) -> Bytes {
        let mut v = AlignedVec::<16>::new();
        v.extend_from_slice(b);
        Bytes::from_owner(v)
    }
}
