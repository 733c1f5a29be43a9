//! Snapshots: the whole durable state of a site as one rkyv archive, loaded zero-copy via mmap.
//!
//! A snapshot holds the `applied` vector, the clock lease, the WAL LSN it covers (replay the log
//! from there), every key's latest [`Entry`] (tombstones included) and the site's own updates that
//! are not yet acked by every peer (they must survive pruning of the log).
//!
//! [`write`] streams the archive into `snapshot.tmp`, fsyncs it, renames it to
//! `snapshot-<20-digit wal lsn>.rkyv`, fsyncs the directory and deletes older snapshots, so a crash
//! at any point leaves either the old or the new snapshot. [`load`] maps the newest snapshot
//! (memmap2; the mapping is page aligned, as rkyv requires), validates it once with bytecheck and
//! then reads it in place: keys and values handed to the store by [`LoadedSnapshot::load_into`]
//! are slices of the mapping, not copies. A snapshot that fails validation is an error naming the
//! file; it is never skipped silently.

use std::fs::{self, File};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use bytes::Bytes;
use memmap2::Mmap;
use rkyv::rancor;
use rkyv::ser::writer::IoWriter;

use super::wal::twin::UpdateRef;
use super::wal::{StorageError, io_err, sync_dir};
use super::{Entry, Store};
use crate::clock::{Timestamp, VClock, Version};
use crate::update::{Record, Update};

use format::{ArchivedSnapshotRef, EntryRef, FORMAT, SnapshotRef};

/// The state to put in a snapshot.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SnapshotData {
    /// The `applied` vector of the state.
    pub applied: Vec<u64>,
    /// The clock lease.
    pub lease: Timestamp,
    /// The WAL LSN the state covers: every record before it is reflected, none after.
    pub wal_lsn: u64,
    /// Every key's latest entry, tombstones included, in any order.
    pub entries: Vec<(Bytes, Entry)>,
    /// The site's own updates not yet acked by every peer, oldest first.
    pub retained: Vec<Update>,
}

impl SnapshotData {
    /// Captures a store's contents through [`Store::entries`] (reference-counted where the
    /// store allows), with `applied`, `lease` and `retained` as they stood when the log ended
    /// at `wal_lsn`. The store may keep changing during the copy: recovery replays the log
    /// from `wal_lsn` over it, and the caller must hold tombstone collection meanwhile and make
    /// the log durable past everything copied before writing the snapshot (see the node's
    /// snapshotter, `net::tasks::take_snapshot`).
    pub fn capture(
        store: &dyn Store,
        applied: &VClock,
        lease: Timestamp,
        wal_lsn: u64,
        retained: impl IntoIterator<Item = Update>,
    ) -> Self {
        let entries = store.entries();
        Self {
            applied: applied.as_slice().to_vec(),
            lease,
            wal_lsn,
            entries,
            retained: retained.into_iter().collect(),
        }
    }
}

/// The archived layout. Written from borrowed data; read in place.
#[allow(missing_docs)]
mod format {
    use rkyv::with::{InlineAsBox, Map};
    use rkyv::{Archive, Serialize};

    use super::UpdateRef;

    /// Layout version, checked on load. 2: entries carry their dependency vector.
    pub const FORMAT: u32 = 2;

    #[derive(Archive, Serialize)]
    pub struct EntryRef<'a> {
        /// Not archived (a zero-sized field): serialising it prefetches the data of an entry
        /// further on, see [`Prefetch`](super::Prefetch).
        #[rkyv(with = super::Prefetch)]
        pub ahead: super::Ahead<'a>,
        #[rkyv(with = InlineAsBox)]
        pub key: &'a [u8],
        pub ts: u64,
        pub site: u16,
        #[rkyv(with = Map<InlineAsBox>)]
        pub value: Option<&'a [u8]>,
        #[rkyv(with = InlineAsBox)]
        pub deps: &'a [u64],
    }

    #[derive(Archive, Serialize)]
    pub struct SnapshotRef<'a> {
        pub format: u32,
        #[rkyv(with = InlineAsBox)]
        pub applied: &'a [u64],
        pub lease: u64,
        pub wal_lsn: u64,
        pub entries: Vec<EntryRef<'a>>,
        pub retained: Vec<UpdateRef<'a>>,
    }
}

const TMP: &str = "snapshot.tmp";

fn snapshot_path(dir: &Path, lsn: u64) -> PathBuf {
    dir.join(format!("snapshot-{lsn:020}.rkyv"))
}

/// The snapshots in `dir` as `(wal lsn, path)`, oldest first.
fn list(dir: &Path) -> Result<Vec<(u64, PathBuf)>, StorageError> {
    let mut out = Vec::new();
    for ent in fs::read_dir(dir).map_err(io_err(dir))? {
        let ent = ent.map_err(io_err(dir))?;
        let name = ent.file_name();
        let Some(digits) = name
            .to_str()
            .and_then(|n| n.strip_prefix("snapshot-"))
            .and_then(|n| n.strip_suffix(".rkyv"))
        else {
            continue;
        };
        if digits.len() == 20
            && digits.bytes().all(|b| b.is_ascii_digit())
            && let Ok(lsn) = digits.parse()
        {
            out.push((lsn, ent.path()));
        }
    }
    out.sort();
    Ok(out)
}

/// Writes `data` as the newest snapshot of `dir` (crash-safe: temporary file, fsync, rename,
/// directory fsync), then deletes older snapshots. Returns the snapshot's path.
pub fn write(dir: &Path, data: &SnapshotData) -> Result<PathBuf, StorageError> {
    fs::create_dir_all(dir).map_err(io_err(dir))?;
    let tmp = dir.join(TMP);
    let file = File::create(&tmp).map_err(io_err(&tmp))?;
    let file = write_archive(data, BufWriter::with_capacity(1 << 20, file))
        .and_then(|w| w.into_inner().map_err(|e| e.into_error()))
        .map_err(io_err(&tmp))?;
    file.sync_all().map_err(io_err(&tmp))?;
    drop(file);
    let path = snapshot_path(dir, data.wal_lsn);
    fs::rename(&tmp, &path).map_err(io_err(&path))?;
    sync_dir(dir)?;
    for (_, old) in list(dir)? {
        if old != path {
            fs::remove_file(&old).map_err(io_err(&old))?;
        }
    }
    Ok(path)
}

/// Serialises `data` as a snapshot archive into `out`, front to back as it goes (rkyv writes
/// every child before its parent, the root last), and returns `out`. [`write`] puts it in a
/// file; a joining site's snapshot streams it onto the network as it is produced, with no
/// file at the source. Errors are `out`'s.
pub fn write_archive<W: Write>(data: &SnapshotData, out: W) -> std::io::Result<W> {
    write_archive_ahead(data, out, PREFETCH_AHEAD)
}

fn write_archive_ahead<W: Write>(data: &SnapshotData, out: W, dist: usize) -> std::io::Result<W> {
    let ahead = |i: usize| match data.entries.get(i + dist) {
        Some((k, e)) if dist > 0 => Ahead(Some((k, e.value.as_deref()))),
        _ => Ahead(None),
    };
    let archive = SnapshotRef {
        format: FORMAT,
        applied: &data.applied,
        lease: data.lease,
        wal_lsn: data.wal_lsn,
        entries: data
            .entries
            .iter()
            .enumerate()
            .map(|(i, (k, e))| EntryRef {
                ahead: ahead(i),
                key: k,
                ts: e.version.ts,
                site: e.version.site,
                value: e.value.as_deref(),
                deps: e.deps.as_slice(),
            })
            .collect(),
        retained: data.retained.iter().map(UpdateRef::new).collect(),
    };
    let writer = rkyv::api::high::to_bytes_in::<_, rancor::Error>(&archive, IoWriter::new(out))
        .map_err(|e| std::io::Error::other(e.to_string()))?;
    Ok(writer.into_inner())
}

/// How many entries ahead of the one being serialised [`write_archive`] prefetches. A store's
/// keys and values sit wherever they were allocated, in no order, so copying them one at a
/// time waits on a cache miss for each; a prefetch lets several misses run at once.
const PREFETCH_AHEAD: usize = 8;

/// The key and value of an entry further on (see [`Prefetch`]).
#[derive(Clone, Copy)]
pub struct Ahead<'a>(Option<(&'a [u8], Option<&'a [u8]>)>);

/// An rkyv wrapper that archives nothing: serialising an [`Ahead`] prefetches its key and
/// value into the cache, so that the serialiser finds them there when it reaches that entry.
pub struct Prefetch;

impl rkyv::with::ArchiveWith<Ahead<'_>> for Prefetch {
    type Archived = ();
    type Resolver = ();

    fn resolve_with(_: &Ahead<'_>, _: (), _: rkyv::Place<()>) {}
}

impl<S: rkyv::rancor::Fallible + ?Sized> rkyv::with::SerializeWith<Ahead<'_>, S> for Prefetch {
    fn serialize_with(field: &Ahead<'_>, _: &mut S) -> Result<(), S::Error> {
        if let Some((key, value)) = field.0 {
            prefetch(key);
            if let Some(v) = value {
                prefetch(v);
            }
        }
        Ok(())
    }
}

/// Asks the CPU to bring the cache lines of `bytes` in (up to 256 bytes; a hint, no effect on
/// the result).
#[inline]
fn prefetch(bytes: &[u8]) {
    #[cfg(target_arch = "x86_64")]
    for off in (0..bytes.len().min(256)).step_by(64) {
        // SAFETY: a prefetch reads nothing the program sees and cannot fault; the address is
        // inside `bytes`. SSE is part of the x86_64 baseline.
        unsafe {
            std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(
                bytes.as_ptr().add(off).cast(),
            )
        };
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = bytes;
}

/// Installs a snapshot file received whole from another site (a joining site's start): `tmp`,
/// already written and fsynced in `dir`, becomes `dir`'s snapshot for WAL LSN `lsn` (rename,
/// directory fsync), and is then loaded to validate it. An invalid one is removed again and
/// reported; nothing is installed.
pub fn install_received(dir: &Path, tmp: &Path, lsn: u64) -> Result<PathBuf, StorageError> {
    let path = snapshot_path(dir, lsn);
    fs::rename(tmp, &path).map_err(io_err(&path))?;
    sync_dir(dir)?;
    match load(dir) {
        Ok(Some(s)) if s.path() == path => Ok(path),
        Ok(_) => Err(StorageError::Snapshot {
            path,
            reason: "a newer snapshot is already in the data directory".into(),
        }),
        Err(e) => {
            let _ = fs::remove_file(&path);
            Err(e)
        }
    }
}

/// Loads the newest snapshot of `dir`, or `None` when there is none (or no directory). The file
/// is mapped and validated; an invalid snapshot is [`StorageError::Snapshot`] naming the file.
pub fn load(dir: &Path) -> Result<Option<LoadedSnapshot>, StorageError> {
    if !dir.exists() {
        return Ok(None);
    }
    let Some((lsn, path)) = list(dir)?.pop() else {
        return Ok(None);
    };
    let file = File::open(&path).map_err(io_err(&path))?;
    // SAFETY: snapshot files are never modified after the rename that publishes them (a new
    // snapshot is a new file; old ones are unlinked, which keeps the mapping valid). Another
    // process truncating or rewriting the file in place would be undefined behaviour, as for any
    // mmap.
    let map = unsafe { Mmap::map(&file) }.map_err(io_err(&path))?;
    let data = Bytes::from_owner(map);
    let bad = |reason: String| StorageError::Snapshot {
        path: path.clone(),
        reason,
    };
    let root = rkyv::access::<ArchivedSnapshotRef<'_>, rancor::Error>(&data)
        .map_err(|e| bad(format!("archive fails validation: {e}")))?;
    if root.format.to_native() != FORMAT {
        return Err(bad(format!(
            "format version {} (this build reads version {FORMAT})",
            root.format
        )));
    }
    if root.wal_lsn.to_native() != lsn {
        return Err(bad(format!(
            "covers WAL LSN {} but the file name says {lsn}",
            root.wal_lsn
        )));
    }
    Ok(Some(LoadedSnapshot { path, data }))
}

/// A mapped, validated snapshot. Accessors read the archive in place.
pub struct LoadedSnapshot {
    path: PathBuf,
    /// The mapping (owner of the bytes); validated in [`load`].
    data: Bytes,
}

impl std::fmt::Debug for LoadedSnapshot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoadedSnapshot")
            .field("path", &self.path)
            .field("bytes", &self.data.len())
            .field("wal_lsn", &self.wal_lsn())
            .finish_non_exhaustive()
    }
}

impl LoadedSnapshot {
    fn root(&self) -> &ArchivedSnapshotRef<'static> {
        // SAFETY: `data` was validated as this archive type by `rkyv::access` in `load` and is
        // immutable (a read-only mapping that this value keeps alive).
        unsafe { rkyv::access_unchecked::<ArchivedSnapshotRef<'static>>(&self.data) }
    }

    /// The snapshot file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Size of the file.
    pub fn file_bytes(&self) -> usize {
        self.data.len()
    }

    /// The `applied` vector.
    pub fn applied(&self) -> VClock {
        VClock::from_vec(self.root().applied.iter().map(|v| v.to_native()).collect())
    }

    /// The clock lease.
    pub fn lease(&self) -> Timestamp {
        self.root().lease.to_native()
    }

    /// The WAL LSN the snapshot covers: pass it to [`Wal::open`](super::wal::Wal::open).
    pub fn wal_lsn(&self) -> u64 {
        self.root().wal_lsn.to_native()
    }

    /// Number of keys (tombstones included).
    pub fn len(&self) -> usize {
        self.root().entries.len()
    }

    /// True when the snapshot holds no keys.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Calls `f` with every key, its version and its value (`None` for a tombstone), read in
    /// place.
    pub fn for_each_entry(&self, mut f: impl FnMut(&[u8], Version, Option<&[u8]>)) {
        for e in self.root().entries.iter() {
            f(
                &e.key,
                Version::new(e.ts.to_native(), e.site.to_native()),
                e.value.as_ref().map(|v| &**v),
            );
        }
    }

    /// Merges every entry into `store` without copying: keys and values are slices of the
    /// mapping (which stays mapped while any of them lives; the file may be deleted meanwhile).
    /// Returns the number of entries.
    pub fn load_into(&self, store: &dyn Store) -> usize {
        let entries = self.root().entries.as_slice();
        for e in entries {
            let value = e.value.as_ref().map(|v| self.data.slice_ref(v));
            store.merge(
                self.data.slice_ref(&e.key),
                Entry {
                    version: Version::new(e.ts.to_native(), e.site.to_native()),
                    value,
                    deps: VClock::from_vec(e.deps.iter().map(|d| d.to_native()).collect()),
                },
            );
        }
        entries.len()
    }

    /// The retained own updates, oldest first (copied out).
    pub fn retained(&self) -> Vec<Update> {
        self.root().retained.iter().map(|u| u.to_update()).collect()
    }

    /// Records that rebuild the replica's non-store state from this snapshot when replayed before
    /// the WAL tail (for `Replica::recover` over a store filled by [`load_into`](Self::load_into)):
    /// the retained updates (which put them back in the retained log), then a marker per site
    /// raising `applied` to the snapshot's vector, then the clock lease.
    pub fn replay_prefix(&self) -> Vec<Record> {
        let mut out: Vec<Record> = self.retained().into_iter().map(Record::Update).collect();
        for (origin, ts) in self.applied().as_slice().iter().enumerate() {
            out.push(Record::Marker {
                origin: origin as u16,
                ts: *ts,
            });
        }
        out.push(Record::ClockLease(self.lease()));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::MemStore;
    use crate::storage::wal::{Wal, WalOptions};
    use std::time::Instant;

    fn update(ts: u64, key: &str, value: Option<&str>) -> Update {
        Update {
            key: Bytes::copy_from_slice(key.as_bytes()),
            value: value.map(|v| Bytes::copy_from_slice(v.as_bytes())),
            version: Version::new(ts, 1),
            deps: VClock::from_vec(vec![3, ts - 1, 0]),
        }
    }

    fn entry(ts: u64, site: u16, value: Option<&str>) -> Entry {
        Entry {
            version: Version::new(ts, site),
            value: value.map(|v| Bytes::copy_from_slice(v.as_bytes())),
            deps: VClock::from_vec(vec![ts - 1, 0, u64::from(site)]),
        }
    }

    fn sample(wal_lsn: u64) -> SnapshotData {
        SnapshotData {
            applied: vec![7, 9, 4],
            lease: 1_000_009,
            wal_lsn,
            entries: vec![
                (Bytes::from_static(b"a"), entry(3, 0, Some("x"))),
                (Bytes::from_static(b"gone"), entry(9, 1, None)),
                (Bytes::from_static(b"empty"), entry(4, 2, Some(""))),
            ],
            retained: vec![update(8, "b", Some("y")), update(9, "gone", None)],
        }
    }

    #[test]
    fn roundtrip_with_tombstones_and_retained() {
        let dir = tempfile::tempdir().unwrap();
        assert!(load(dir.path()).unwrap().is_none());
        assert!(load(&dir.path().join("nope")).unwrap().is_none());
        let first = write(dir.path(), &sample(100)).unwrap();
        let data = sample(250);
        let path = write(dir.path(), &data).unwrap();
        assert!(!first.exists(), "older snapshot deleted");
        assert!(!dir.path().join(TMP).exists());
        let snap = load(dir.path()).unwrap().unwrap();
        assert_eq!(snap.path(), path);
        assert_eq!(snap.wal_lsn(), 250);
        assert_eq!(snap.lease(), data.lease);
        assert_eq!(snap.applied().as_slice(), &data.applied[..]);
        assert_eq!(snap.retained(), data.retained);
        assert_eq!(snap.len(), 3);
        let mut seen = Vec::new();
        snap.for_each_entry(|k, v, val| seen.push((k.to_vec(), v, val.map(<[u8]>::to_vec))));
        let expect: Vec<_> = data
            .entries
            .iter()
            .map(|(k, e)| (k.to_vec(), e.version, e.value.as_ref().map(|v| v.to_vec())))
            .collect();
        assert_eq!(seen, expect);
        let store = MemStore::new();
        assert_eq!(snap.load_into(&store), 3);
        drop(snap);
        assert!(store.get(b"gone").unwrap().is_tombstone());
        assert_eq!(store.get(b"a").unwrap(), data.entries[0].1);
        assert_eq!(store.get(b"empty").unwrap().value.unwrap(), Bytes::new());
    }

    #[test]
    fn replay_prefix_restores_applied_lease_and_retained() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), &sample(0)).unwrap();
        let snap = load(dir.path()).unwrap().unwrap();
        let prefix = snap.replay_prefix();
        assert_eq!(prefix.len(), 2 + 3 + 1);
        assert_eq!(prefix[0], Record::Update(sample(0).retained[0].clone()));
        assert_eq!(prefix[3], Record::Marker { origin: 1, ts: 9 });
        assert_eq!(prefix[5], Record::ClockLease(1_000_009));
    }

    #[test]
    fn capture_copies_the_store() {
        let store = MemStore::new();
        store.merge(Bytes::from_static(b"k"), entry(5, 0, Some("v")));
        store.merge(Bytes::from_static(b"t"), entry(6, 0, None));
        let d = SnapshotData::capture(&store, &VClock::from_vec(vec![6, 0]), 10, 42, Vec::new());
        assert_eq!(d.entries.len(), 2);
        assert_eq!(d.wal_lsn, 42);
    }

    #[test]
    fn corrupted_snapshot_is_an_error_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(dir.path(), &sample(7)).unwrap();
        let good = fs::read(&path).unwrap();
        // Damage the root (at the end of the archive): an out-of-range relative pointer.
        let mut bad = good.clone();
        let n = bad.len();
        for b in &mut bad[n - 40..n - 8] {
            *b = 0xff;
        }
        fs::write(&path, &bad).unwrap();
        let err = load(dir.path()).unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, StorageError::Snapshot { .. }), "{msg}");
        assert!(msg.contains(&path.display().to_string()), "{msg}");
        // A truncated file too.
        fs::write(&path, &good[..good.len() / 2]).unwrap();
        assert!(matches!(
            load(dir.path()),
            Err(StorageError::Snapshot { .. })
        ));
        // An empty file too.
        fs::write(&path, b"").unwrap();
        assert!(load(dir.path()).is_err());
        // A file renamed to the wrong LSN.
        fs::write(&path, &good).unwrap();
        fs::rename(&path, snapshot_path(dir.path(), 8)).unwrap();
        let err = load(dir.path()).unwrap_err();
        assert!(err.to_string().contains("file name"), "{err}");
    }

    #[test]
    fn prefetching_changes_no_byte_of_the_archive() {
        let mut data = sample(3);
        for i in 0..40u64 {
            data.entries
                .push((Bytes::from(format!("k{i}")), entry(i + 10, 1, Some("v"))));
        }
        let plain = write_archive_ahead(&data, Vec::new(), 0).unwrap();
        for dist in [1, PREFETCH_AHEAD, 100] {
            assert_eq!(write_archive_ahead(&data, Vec::new(), dist).unwrap(), plain);
        }
    }

    /// Serialising speed over entries scattered in memory, as a long-running store's are:
    /// 880k entries of 100 B values in shuffled order, without and with the prefetch,
    /// alternating. Run with `cargo test --release --lib snapshot -- --ignored --nocapture`.
    #[test]
    #[ignore]
    fn serialising_scattered_entries_with_and_without_prefetch() {
        let mut entries: Vec<(Bytes, Entry)> = (0..880_000u64)
            .map(|i| {
                let key = Bytes::from(format!("key-{i:012}").into_bytes());
                let value = Bytes::from(vec![(i % 251) as u8; 100]);
                (key, Entry::new(Version::new(i + 1, 0), Some(value)))
            })
            .collect();
        let mut x = 12345u64;
        for i in (1..entries.len()).rev() {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            entries.swap(i, (x >> 33) as usize % (i + 1));
        }
        let data = SnapshotData {
            applied: vec![5, 5, 5, 5],
            entries,
            ..SnapshotData::default()
        };
        let mut buf = Vec::with_capacity(200 << 20);
        for dist in [0, PREFETCH_AHEAD, 0, PREFETCH_AHEAD, 0, PREFETCH_AHEAD] {
            buf.clear();
            let t = Instant::now();
            buf = write_archive_ahead(&data, buf, dist).unwrap();
            println!(
                "prefetch {dist:>2} ahead: {:?} for {} MB",
                t.elapsed(),
                buf.len() >> 20
            );
        }
        assert!(buf.len() > 880_000 * 100);
    }

    /// Recovery speed: a 1M-key snapshot (16 B keys, 100 B values) loaded into a `MemStore`, then
    /// a 100k-record WAL tail replayed. Run with
    /// `cargo test --release --lib snapshot -- --ignored --nocapture`.
    #[test]
    #[ignore]
    fn recovery_of_a_million_keys_and_a_100k_tail() {
        const KEYS: u64 = 1_000_000;
        const TAIL: u64 = 100_000;
        let dir = tempfile::tempdir().unwrap();
        let key = |i: u64| Bytes::from(format!("key-{i:012}").into_bytes());
        let value = |i: u64| Bytes::from(vec![(i % 251) as u8; 100]);
        let t = Instant::now();
        let data = SnapshotData {
            applied: vec![KEYS, 5, 5],
            lease: KEYS + 1_000_000,
            wal_lsn: 0,
            entries: (0..KEYS)
                .map(|i| {
                    (
                        key(i),
                        Entry::new(Version::new(i + 1, 0), (i % 50 != 0).then(|| value(i))),
                    )
                })
                .collect(),
            retained: Vec::new(),
        };
        let (mut wal, _) = Wal::open(dir.path(), WalOptions::default(), 0).unwrap();
        let recs: Vec<Record> = (0..TAIL)
            .map(|i| {
                Record::Update(Update {
                    key: key(KEYS - TAIL / 2 + i),
                    value: Some(value(i)),
                    version: Version::new(KEYS + 1 + i, 0),
                    deps: VClock::from_vec(vec![KEYS + i, 5, 5]),
                })
            })
            .collect();
        // The snapshot covers nothing of the tail: write the tail after an initial LSN.
        for c in recs.chunks(100) {
            wal.append(c).unwrap();
        }
        wal.sync_now().unwrap();
        drop(wal);
        write(dir.path(), &data).unwrap();
        drop(data);
        println!("setup (build + write snapshot and WAL): {:?}", t.elapsed());

        let t = Instant::now();
        let snap = load(dir.path()).unwrap().unwrap();
        let t_validate = t.elapsed();
        let store = MemStore::new();
        let n = snap.load_into(&store);
        let t_load = t.elapsed();
        let (_wal, rec) = Wal::open(dir.path(), WalOptions::default(), snap.wal_lsn()).unwrap();
        let t_read = t.elapsed();
        let mut replayed = 0;
        for r in rec.records {
            if let Record::Update(u) = r {
                store.merge(
                    u.key,
                    Entry {
                        version: u.version,
                        value: u.value,
                        deps: u.deps,
                    },
                );
                replayed += 1;
            }
        }
        let total = t.elapsed();
        assert_eq!(n as u64, KEYS);
        assert_eq!(replayed, TAIL);
        assert_eq!(store.len() as u64, KEYS + TAIL / 2);
        println!(
            "recovery of {n} keys ({} MB snapshot) + {replayed} WAL records: {total:?} in all \
             (map+validate {t_validate:?}, load into MemStore {:?}, read WAL {:?}, replay {:?})",
            snap.file_bytes() >> 20,
            t_load - t_validate,
            t_read - t_load,
            total - t_read,
        );
    }
}
