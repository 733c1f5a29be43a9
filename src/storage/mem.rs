//! [`MemStore`]: the in-memory store, a `DashMap` from key bytes to the latest entry.

use std::sync::Arc;

use bytes::Bytes;
use dashmap::DashMap;
use dashmap::mapref::entry::Entry as MapEntry;

use super::{Entry, Store};
use crate::clock::Version;

/// The in-memory store. Sharded locking (`DashMap`) lets reads proceed while the replica's single
/// writer merges updates. Keys are hashed with aHash (randomly seeded per process, so still
/// resistant to hash flooding): SipHash showed up as the top cost of applying replicated batches.
///
/// A clone is a handle to the same map: the snapshotter copies the entries through one while the
/// replica keeps writing through its own, so no lock is held for the whole copy.
#[derive(Clone, Debug, Default)]
pub struct MemStore {
    map: Arc<DashMap<Bytes, Entry, ahash::RandomState>>,
}

impl MemStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    /// An empty store with room for `n` keys (recovery knows the count from the snapshot).
    pub fn with_capacity(n: usize) -> Self {
        Self {
            map: Arc::new(DashMap::with_capacity_and_hasher(
                n,
                ahash::RandomState::new(),
            )),
        }
    }
}

impl Store for MemStore {
    fn get(&self, key: &[u8]) -> Option<Entry> {
        self.map.get(key).map(|e| e.value().clone())
    }

    fn merge(&self, key: Bytes, entry: Entry) -> bool {
        match self.map.entry(key) {
            MapEntry::Occupied(mut o) => {
                if entry.version > o.get().version {
                    o.insert(entry);
                    true
                } else {
                    false
                }
            }
            MapEntry::Vacant(v) => {
                v.insert(entry);
                true
            }
        }
    }

    fn remove_tombstone(&self, key: &[u8], version: Version) -> bool {
        self.map
            .remove_if(key, |_, e| e.is_tombstone() && e.version == version)
            .is_some()
    }

    fn len(&self) -> usize {
        self.map.len()
    }

    fn for_each(&self, f: &mut dyn FnMut(&[u8], &Entry)) {
        for r in self.map.iter() {
            f(r.key(), r.value());
        }
    }

    /// Reference-count bumps, no copies: a shard's read lock (which a writer to that shard
    /// waits for) is held for a few nanoseconds per entry.
    fn entries(&self) -> Vec<(Bytes, Entry)> {
        let mut out = Vec::with_capacity(self.map.len());
        for r in self.map.iter() {
            out.push((r.key().clone(), r.value().clone()));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn e(ts: u64, site: u16, v: Option<&'static str>) -> Entry {
        Entry::new(
            Version::new(ts, site),
            v.map(|s| Bytes::from_static(s.as_bytes())),
        )
    }

    #[test]
    fn merge_keeps_greatest_version_in_any_order() {
        let a = MemStore::new();
        let b = MemStore::new();
        let writes = [e(3, 0, Some("x")), e(5, 1, Some("y")), e(5, 0, None)];
        for w in &writes {
            a.merge(Bytes::from_static(b"k"), w.clone());
        }
        for w in writes.iter().rev() {
            b.merge(Bytes::from_static(b"k"), w.clone());
        }
        assert_eq!(a.get(b"k"), b.get(b"k"));
        assert_eq!(a.get(b"k").unwrap().version, Version::new(5, 1));
    }

    #[test]
    fn remove_tombstone_only_removes_that_tombstone() {
        let s = MemStore::new();
        s.merge(Bytes::from_static(b"k"), e(4, 0, None));
        assert!(!s.remove_tombstone(b"k", Version::new(3, 0)));
        assert!(s.remove_tombstone(b"k", Version::new(4, 0)));
        s.merge(Bytes::from_static(b"k"), e(6, 0, Some("v")));
        assert!(!s.remove_tombstone(b"k", Version::new(6, 0)));
        assert_eq!(s.len(), 1);
    }
}
