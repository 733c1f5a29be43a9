//! Storage: the live key/value state behind a small interface.
//!
//! The replication core ([`crate::replica`]) only talks to the [`Store`] trait: look a key up,
//! merge an entry by last-writer-wins, drop a collected tombstone, and walk the contents. Today the
//! one implementation is [`MemStore`], a `DashMap` from key bytes to the latest [`Entry`]. Durability
//! (write-ahead log, snapshots) is layered beside it by the node driver, which persists the
//! [`Record`](crate::update::Record)s the replica hands out, so the protocol code does not change
//! when storage does.
//!
//! - [`wal`]: the segmented write-ahead log with CRCs, group commit and an fsync policy.
//! - [`snapshot`]: rkyv snapshots of the whole state, loaded zero-copy through mmap.

mod mem;
pub mod snapshot;
pub mod wal;

pub use mem::MemStore;

use bytes::Bytes;

use crate::clock::{VClock, Version};

/// The latest version of one key: a value, or a tombstone for a delete.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    /// The version of the write that produced this entry.
    pub version: Version,
    /// The value; `None` is a tombstone.
    pub value: Option<Bytes>,
    /// The causal context the write was issued under, which a read hands to its session so
    /// that session contexts stay closed under dependencies. Kept by partitioned sites only
    /// (see [`crate::replica`]); empty otherwise.
    pub deps: VClock,
}

impl Entry {
    /// An entry without dependencies (an unpartitioned site's, or one built by hand).
    pub fn new(version: Version, value: Option<Bytes>) -> Self {
        Self {
            version,
            value,
            deps: VClock::default(),
        }
    }

    /// True for a delete's tombstone.
    pub fn is_tombstone(&self) -> bool {
        self.value.is_none()
    }
}

/// The live state of a site: the latest entry per key.
///
/// Implementations must make [`Store::merge`] atomic per key (concurrent merges of the same key
/// must keep the greatest version), because reads run concurrently with the single writer.
pub trait Store: Send + Sync {
    /// The entry for `key`, tombstones included.
    fn get(&self, key: &[u8]) -> Option<Entry>;
    /// Last-writer-wins merge: installs `entry` if its version is greater than the current one.
    /// Returns true when it was installed.
    fn merge(&self, key: Bytes, entry: Entry) -> bool;
    /// Removes `key` if its current entry is a tombstone of exactly `version`. Returns true when
    /// it removed something.
    fn remove_tombstone(&self, key: &[u8], version: Version) -> bool;
    /// Number of keys held, tombstones included.
    fn len(&self) -> usize;
    /// True when the store holds nothing.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Calls `f` for every key and entry, in no particular order.
    fn for_each(&self, f: &mut dyn FnMut(&[u8], &Entry));
    /// Every key and entry, in no particular order: what a snapshot copies. The default copies
    /// each key; a store that holds its keys as [`Bytes`] hands out references to them instead,
    /// so a copy taken while the store is being written holds each part of it only briefly.
    fn entries(&self) -> Vec<(Bytes, Entry)> {
        let mut out = Vec::with_capacity(self.len());
        self.for_each(&mut |k, e| out.push((Bytes::copy_from_slice(k), e.clone())));
        out
    }
}

/// The live values of a store (tombstones left out), sorted by key: what convergence compares.
pub fn live_contents(store: &dyn Store) -> std::collections::BTreeMap<Vec<u8>, (Version, Bytes)> {
    let mut out = std::collections::BTreeMap::new();
    store.for_each(&mut |k, e| {
        if let Some(v) = &e.value {
            out.insert(k.to_vec(), (e.version, v.clone()));
        }
    });
    out
}
