//! The data a site replicates and logs: an [`Update`] (one write as it travels between sites),
//! the [`Item`]s of an origin's ordered stream, and the [`Record`]s a replica asks to make
//! durable.
//!
//! These are plain values shared by the replication core (`replica`), storage (the write-ahead
//! log and snapshots) and the peer protocol (`peer_wire`); they live below all three so that
//! none of them imports another for its types.

use bytes::Bytes;

use crate::clock::{SiteId, Timestamp, VClock, Version};

/// One write as it travels between sites.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Update {
    /// The key.
    pub key: Bytes,
    /// The value, or `None` for a delete.
    pub value: Option<Bytes>,
    /// Origin timestamp and origin site.
    pub version: Version,
    /// The writer's causal context: what must be applied before this update is visible.
    pub deps: VClock,
}

impl Update {
    /// Key and value bytes.
    pub fn payload_len(&self) -> usize {
        self.key.len() + self.value.as_ref().map_or(0, Bytes::len)
    }
}

/// An item on an origin's ordered update stream.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Item {
    /// A write from the origin.
    Update(Update),
    /// A clock marker: the origin will send no later update with a timestamp at or below this.
    Marker(Timestamp),
}

impl Item {
    /// The item's timestamp in its origin's order.
    pub fn ts(&self) -> Timestamp {
        match self {
            Item::Update(u) => u.version.ts,
            Item::Marker(ts) => *ts,
        }
    }

    /// Key and value bytes (0 for a marker).
    pub fn payload_len(&self) -> usize {
        match self {
            Item::Update(u) => u.payload_len(),
            Item::Marker(_) => 0,
        }
    }

    /// Fits an update's dependency vector to the `n` sites the receiver counts. One from a
    /// peer that counts fewer sites (it has not learned of the ones added since) depends on
    /// nothing from them and is padded with zeros. One from a peer that counts more has its
    /// trailing zeros past `n` cut; if it still names a site past `n` (the peer applied that
    /// site's addition before the receiver did, and the update depends on something the new
    /// site wrote), it is kept as it is: the receiver buffers the update until it counts that
    /// site and has applied what the update depends on
    /// ([`Replica::receive`](crate::replica::Replica::receive)). Refusing it instead would cut
    /// a receiver that lags on the change off from that peer.
    ///
    /// A vector longer than `max` (the most sites a cluster can have) is garbage: an error.
    pub fn fit_deps(&mut self, n: usize, max: usize) -> Result<(), String> {
        if let Item::Update(u) = self
            && u.deps.len() != n
        {
            if u.deps.len() > max {
                return Err(format!(
                    "update {} has a dependency vector of {} entries; a cluster has at most {max} \
                     sites",
                    u.version,
                    u.deps.len()
                ));
            }
            let named = u
                .deps
                .as_slice()
                .iter()
                .rposition(|&e| e > 0)
                .map_or(0, |i| i + 1);
            u.deps = u.deps.resized(n.max(named));
        }
        Ok(())
    }
}

/// What a replica asks the driver to make durable, in order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Record {
    /// An update applied here (local or remote).
    Update(Update),
    /// `applied[origin]` moved to `ts` through a clock marker.
    Marker {
        /// The origin whose entry moved.
        origin: SiteId,
        /// The marker's timestamp.
        ts: Timestamp,
    },
    /// The local clock may issue timestamps up to here; after a restart it starts above it, so a
    /// marker that was sent is never undercut by a new write.
    ClockLease(Timestamp),
}
