//! The durable Raft log and vote of one group: an append-only record file, fsynced on a thread
//! of its own, and an in-memory index of the entries the log still holds.
//!
//! Each record is `u32` length (little-endian), `u32` CRC-32 of the payload, payload (a
//! postcard [`Record`]); on open, a torn or corrupt tail is cut at the last good record, as the
//! write-ahead log does. Records: appended entries, the vote, the commit point, a truncation
//! (conflicting entries removed) and a purge (entries covered by a snapshot removed). When the
//! file has grown to several times what it still describes, the writer thread rewrites it
//! whole (temporary file, fsync, rename).
//!
//! The writer thread takes jobs in submission order (they are submitted under the index lock,
//! so file order is index order), writes a batch of them, fsyncs once, and then completes
//! them: an append's flush callback runs only after its fsync (group commit), and
//! [`LogStore::save_vote`] returns only once the vote is durable. No file I/O happens on the
//! async runtime.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::ops::RangeBounds;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, mpsc};

use openraft::storage::{LogFlushed, RaftLogStorage};
use openraft::{
    Entry, LogId, LogState, OptionalSend, RaftLogReader, StorageError, StorageIOError, Vote,
};
use serde::{Deserialize, Serialize};

use super::{NodeId, SnapshotPoint, TypeConfig};
use crate::storage::wal::{BadFrame, frame_at, valid_frame_after};

/// One record of the log file.
#[derive(Serialize, Deserialize)]
enum Record {
    Entries(Vec<Entry<TypeConfig>>),
    Vote(Vote<NodeId>),
    Committed(Option<LogId<NodeId>>),
    /// Entries from this index on were removed.
    Truncate(u64),
    /// Entries up to this log id were removed.
    Purge(LogId<NodeId>),
}

/// What the log holds, in memory.
#[derive(Default)]
struct Index {
    entries: BTreeMap<u64, Entry<TypeConfig>>,
    vote: Option<Vote<NodeId>>,
    committed: Option<LogId<NodeId>>,
    purged: Option<LogId<NodeId>>,
    /// Bytes in the file, and what they were at the last rewrite.
    file_bytes: u64,
    rewritten_bytes: u64,
}

impl Index {
    fn apply(&mut self, r: Record) {
        match r {
            Record::Entries(es) => {
                for e in es {
                    self.entries.insert(e.log_id.index, e);
                }
            }
            Record::Vote(v) => self.vote = Some(v),
            Record::Committed(c) => self.committed = c,
            Record::Truncate(i) => {
                self.entries.split_off(&i);
            }
            Record::Purge(id) => {
                self.entries = self.entries.split_off(&(id.index + 1));
                self.purged = Some(id);
            }
        }
    }

    /// Records that describe the whole state (for a rewrite).
    fn records(&self) -> Vec<Record> {
        let mut out = Vec::new();
        if let Some(v) = self.vote {
            out.push(Record::Vote(v));
        }
        if let Some(p) = self.purged {
            out.push(Record::Purge(p));
        }
        out.push(Record::Committed(self.committed));
        let all: Vec<_> = self.entries.values().cloned().collect();
        for chunk in all.chunks(1024) {
            out.push(Record::Entries(chunk.to_vec()));
        }
        out
    }
}

fn frame(r: &Record) -> Vec<u8> {
    let payload = super::encode(r);
    let mut out = Vec::with_capacity(8 + payload.len());
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(&payload).to_le_bytes());
    out.extend_from_slice(&payload);
    out
}

/// Reads every good record of `file`; returns them and the length of the good prefix. A
/// damaged record with nothing valid after it is a torn tail, the end of a write a crash
/// interrupted (the caller cuts it). One with a valid record after it is corruption: cutting
/// there would drop acknowledged entries or votes, so it is an error.
fn read_records(file: &mut File) -> io::Result<(Vec<Record>, u64)> {
    let mut buf = Vec::new();
    file.seek(SeekFrom::Start(0))?;
    file.read_to_end(&mut buf)?;
    let mut out = Vec::new();
    let mut at = 0usize;
    loop {
        // The write-ahead log's framing: a length, a CRC, the payload.
        let why = match frame_at(&buf, at) {
            Ok(None) => break,
            Ok(Some((payload, next))) => match super::decode::<Record>(payload) {
                Ok(r) => {
                    out.push(r);
                    at = next;
                    continue;
                }
                Err(_) => "a record that does not decode".to_owned(),
            },
            Err(BadFrame::Damaged(why) | BadFrame::Invalid(why)) => why,
        };
        if let Some(next) = valid_frame_after(&buf, at) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "corrupt at byte {at} ({why}) with a valid record at byte {next} after it: \
                     not a torn tail, and cutting it would drop acknowledged entries or votes"
                ),
            ));
        }
        break;
    }
    Ok((out, at as u64))
}

/// A job for the writer thread.
enum Job {
    Write {
        bytes: Vec<u8>,
        done: Done,
    },
    /// Replace the file with these bytes.
    Rewrite {
        bytes: Vec<u8>,
    },
}

enum Done {
    None,
    Flushed(LogFlushed<TypeConfig>),
    Reply(tokio::sync::oneshot::Sender<io::Result<()>>),
}

impl Done {
    fn complete(self, r: &io::Result<()>) {
        let again = || match r {
            Ok(()) => Ok(()),
            Err(e) => Err(io::Error::new(e.kind(), e.to_string())),
        };
        match self {
            Done::None => {}
            Done::Flushed(cb) => cb.log_io_completed(again()),
            Done::Reply(tx) => {
                let _ = tx.send(again());
            }
        }
    }
}

/// The writer thread: writes jobs in order, one fsync per batch.
fn writer(path: PathBuf, mut file: File, rx: mpsc::Receiver<Job>) {
    let mut failed: Option<String> = None;
    while let Ok(first) = rx.recv() {
        let mut batch = vec![first];
        while let Ok(j) = rx.try_recv() {
            batch.push(j);
        }
        let mut dones = Vec::new();
        let mut result: io::Result<()> = Ok(());
        for job in batch {
            if failed.is_none() && result.is_ok() {
                result = match &job {
                    Job::Write { bytes, .. } => file.write_all(bytes),
                    Job::Rewrite { bytes } => rewrite(&path, bytes).map(|f| file = f),
                };
            }
            if let Job::Write { done, .. } = job {
                dones.push(done);
            }
        }
        if failed.is_none() && result.is_ok() {
            result = file.sync_data();
        }
        if let Err(e) = &result {
            failed.get_or_insert_with(|| e.to_string());
        }
        let result = match &failed {
            Some(e) => Err(io::Error::other(format!(
                "raft log {} failed: {e}",
                path.display()
            ))),
            None => Ok(()),
        };
        for d in dones {
            d.complete(&result);
        }
    }
}

/// The directory holding `path` (`.` for a bare file name).
fn parent_dir(path: &Path) -> &Path {
    match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    }
}

fn rewrite(path: &Path, bytes: &[u8]) -> io::Result<File> {
    let tmp = path.with_extension("rewrite");
    {
        let mut f = File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    File::open(parent_dir(path))?.sync_all()?;
    let mut f = OpenOptions::new().read(true).append(true).open(path)?;
    f.seek(SeekFrom::End(0))?;
    Ok(f)
}

fn io_err(e: impl std::fmt::Display) -> StorageError<NodeId> {
    StorageIOError::write_logs(openraft::AnyError::error(e.to_string())).into()
}

/// The durable log and vote of one group. Clones share the same log.
#[derive(Clone)]
pub struct LogStore {
    index: Arc<Mutex<Index>>,
    jobs: mpsc::Sender<Job>,
    /// Test-only ([`LogStore::pause_before_uniform`]).
    pause: Option<PathBuf>,
    /// What the snapshot on disk covers ([`LogStore::bound_purges_by`]).
    snapshot: Option<SnapshotPoint>,
}

impl LogStore {
    /// Records purges only up to what the snapshot on disk covers (`point`, from the state
    /// machine); what openraft asks for past it stays in the log until a later purge, once a
    /// snapshot covers it. Without this, a crash after the purge reached the disk but before
    /// the snapshot that covers it did would leave the entries between them nowhere.
    pub fn bound_purges_by(&mut self, point: SnapshotPoint) {
        self.snapshot = Some(point);
    }

    /// Opens (or creates) the log file at `path` and starts its writer thread. Blocking: call
    /// it off the async runtime.
    pub fn open(path: &Path) -> io::Result<LogStore> {
        let dir = parent_dir(path);
        let dir_existed = dir.exists();
        std::fs::create_dir_all(dir)?;
        let existed = path.exists();
        let mut file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .open(path)?;
        if !existed {
            // A new file's name, and a new directory's, are durable only once the directory
            // holding them is: without this a machine crash could take the log, and the votes
            // fsynced into it, away with them.
            File::open(dir)?.sync_all()?;
            if !dir_existed {
                File::open(parent_dir(dir))?.sync_all()?;
            }
        }
        let (records, good) = read_records(&mut file)
            .map_err(|e| io::Error::new(e.kind(), format!("raft log {}: {e}", path.display())))?;
        if file.metadata()?.len() > good {
            tracing::warn!(path = %path.display(), at = good, "raft log has a torn tail; cutting it");
            file.set_len(good)?;
            file.sync_all()?;
        }
        file.seek(SeekFrom::End(0))?;
        let mut index = Index::default();
        for r in records {
            index.apply(r);
        }
        index.file_bytes = good;
        index.rewritten_bytes = good;
        let (jobs, rx) = mpsc::channel();
        let p = path.to_owned();
        std::thread::Builder::new()
            .name("raft-log".into())
            .spawn(move || writer(p, file, rx))?;
        Ok(LogStore {
            index: Arc::new(Mutex::new(index)),
            jobs,
            pause: None,
            snapshot: None,
        })
    }

    /// Test-only: while the file `flag` exists, an append that would end a joint configuration
    /// (a uniform membership entry after a joint one) waits, before anything of it is written.
    /// At a leader that is the moment between the two steps of `change_membership`: the joint
    /// configuration is committed and the uniform one not yet written anywhere. The tests kill
    /// the leader there and check that the cluster finishes the change.
    pub fn pause_before_uniform(&mut self, flag: PathBuf) {
        self.pause = Some(flag);
    }

    /// Whether appending `entries` ends a joint configuration (see
    /// [`LogStore::pause_before_uniform`]).
    fn ends_joint(&self, entries: &[Entry<TypeConfig>]) -> bool {
        let joint = |e: &Entry<TypeConfig>| match &e.payload {
            openraft::EntryPayload::Membership(m) => Some(m.get_joint_config().len() > 1),
            _ => None,
        };
        let mut was_joint = {
            let ix = self.index.lock().expect("raft log lock");
            ix.entries.values().rev().find_map(joint).unwrap_or(false)
        };
        for e in entries {
            match joint(e) {
                Some(false) if was_joint => return true,
                Some(j) => was_joint = j,
                None => {}
            }
        }
        false
    }

    /// The commit point last saved.
    pub fn committed(&self) -> Option<LogId<NodeId>> {
        self.index.lock().expect("raft log lock").committed
    }

    /// Applies `r` to the index and queues it for the file, under the index lock. (The error
    /// type is openraft's, whatever its size.)
    #[allow(clippy::result_large_err)]
    fn submit(&self, r: Record, done: Done) -> Result<(), StorageError<NodeId>> {
        let bytes = frame(&r);
        let mut ix = self.index.lock().expect("raft log lock");
        ix.apply(r);
        ix.file_bytes += bytes.len() as u64;
        self.jobs
            .send(Job::Write { bytes, done })
            .map_err(|_| io_err("raft log writer stopped"))?;
        // Rewrite once the file is four times what it was at the last rewrite (and 64 MiB).
        if ix.file_bytes > (64 << 20).max(4 * ix.rewritten_bytes) {
            let bytes: Vec<u8> = ix.records().iter().flat_map(frame).collect();
            ix.file_bytes = bytes.len() as u64;
            ix.rewritten_bytes = bytes.len() as u64;
            self.jobs
                .send(Job::Rewrite { bytes })
                .map_err(|_| io_err("raft log writer stopped"))?;
        }
        Ok(())
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + std::fmt::Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry<TypeConfig>>, StorageError<NodeId>> {
        let ix = self.index.lock().expect("raft log lock");
        Ok(ix.entries.range(range).map(|(_, e)| e.clone()).collect())
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError<NodeId>> {
        let ix = self.index.lock().expect("raft log lock");
        let last = ix
            .entries
            .values()
            .next_back()
            .map(|e| e.log_id)
            .or(ix.purged);
        Ok(LogState {
            last_purged_log_id: ix.purged,
            last_log_id: last,
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> Result<(), StorageError<NodeId>> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.submit(Record::Vote(*vote), Done::Reply(tx))?;
        rx.await
            .map_err(|_| io_err("raft log writer stopped"))?
            .map_err(io_err)
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<NodeId>>, StorageError<NodeId>> {
        Ok(self.index.lock().expect("raft log lock").vote)
    }

    async fn save_committed(
        &mut self,
        committed: Option<LogId<NodeId>>,
    ) -> Result<(), StorageError<NodeId>> {
        // Not waited for: a commit point that is lost in a crash only means more entries are
        // applied again from the snapshot after the restart.
        self.submit(Record::Committed(committed), Done::None)
    }

    async fn read_committed(&mut self) -> Result<Option<LogId<NodeId>>, StorageError<NodeId>> {
        Ok(self.committed())
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: LogFlushed<TypeConfig>,
    ) -> Result<(), StorageError<NodeId>>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let entries: Vec<_> = entries.into_iter().collect();
        if let Some(flag) = &self.pause
            && tokio::fs::try_exists(flag).await.unwrap_or(false)
            && self.ends_joint(&entries)
        {
            tracing::warn!(
                "test switch: pausing before appending the uniform configuration that ends a \
                 joint one (until {} is removed)",
                flag.display()
            );
            while tokio::fs::try_exists(flag).await.unwrap_or(false) {
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
        self.submit(Record::Entries(entries), Done::Flushed(callback))
    }

    async fn truncate(&mut self, log_id: LogId<NodeId>) -> Result<(), StorageError<NodeId>> {
        self.submit(Record::Truncate(log_id.index), Done::None)
    }

    async fn purge(&mut self, log_id: LogId<NodeId>) -> Result<(), StorageError<NodeId>> {
        let upto = match self.snapshot.as_ref().map(SnapshotPoint::get) {
            None => log_id,
            Some(Some(on_disk)) if on_disk.index >= log_id.index => log_id,
            Some(Some(on_disk)) => on_disk,
            Some(None) => return Ok(()),
        };
        let purged = self.index.lock().expect("raft log lock").purged;
        if purged.is_some_and(|p| p.index >= upto.index) {
            return Ok(());
        }
        self.submit(Record::Purge(upto), Done::None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use openraft::{CommittedLeaderId, EntryPayload};

    fn entry(term: u64, index: u64) -> Entry<TypeConfig> {
        Entry {
            log_id: LogId::new(CommittedLeaderId::new(term, 0), index),
            payload: EntryPayload::Blank,
        }
    }

    /// Appends entries `indexes` of `term`, durably. Appends are completed through openraft's
    /// callback; this goes through `submit` directly.
    async fn append(s: &LogStore, term: u64, indexes: std::ops::RangeInclusive<u64>) {
        let (tx, rx) = tokio::sync::oneshot::channel();
        s.submit(
            Record::Entries(indexes.map(|i| entry(term, i)).collect()),
            Done::Reply(tx),
        )
        .unwrap();
        rx.await.unwrap().unwrap();
    }

    /// The indexes of every entry the log holds.
    async fn indexes(s: &mut LogStore) -> Vec<u64> {
        s.try_get_log_entries(0..100)
            .await
            .unwrap()
            .iter()
            .map(|e| e.log_id.index)
            .collect()
    }

    #[tokio::test]
    async fn the_log_survives_a_reopen_and_a_torn_tail_is_cut() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("raft.log");
        {
            let mut s = LogStore::open(&path).unwrap();
            s.save_vote(&Vote::new(2, 1)).await.unwrap();
            append(&s, 2, 1..=5).await;
            s.truncate(LogId::new(CommittedLeaderId::new(2, 0), 4))
                .await
                .unwrap();
            s.purge(LogId::new(CommittedLeaderId::new(2, 0), 1))
                .await
                .unwrap();
            s.save_vote(&Vote::new(3, 2)).await.unwrap();
        }
        // A torn record at the end.
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(&[40, 0, 0, 0, 1, 2, 3]).unwrap();
        drop(f);
        let mut s = LogStore::open(&path).unwrap();
        assert_eq!(s.read_vote().await.unwrap(), Some(Vote::new(3, 2)));
        assert_eq!(indexes(&mut s).await, vec![2, 3]);
        let st = s.get_log_state().await.unwrap();
        assert_eq!(st.last_purged_log_id.map(|l| l.index), Some(1));
        assert_eq!(st.last_log_id.map(|l| l.index), Some(3));
    }

    /// Found in review: openraft asks for the purge that follows a received snapshot without
    /// waiting for the state machine to store that snapshot, so a crash between the two could
    /// leave the log purged past the snapshot on disk. Purges stop at what the snapshot on disk
    /// covers.
    #[tokio::test]
    async fn purges_stop_at_the_snapshot_on_disk() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("raft.log");
        let id = |i| LogId::new(CommittedLeaderId::new(2, 0), i);
        let point = SnapshotPoint::default();
        {
            let mut s = LogStore::open(&path).unwrap();
            s.bound_purges_by(point.clone());
            append(&s, 2, 1..=6).await;
            // No snapshot on disk: nothing is purged.
            s.purge(id(5)).await.unwrap();
            assert_eq!(s.get_log_state().await.unwrap().last_purged_log_id, None);
            // A snapshot up to 3 on disk: the purge up to 5 stops at 3.
            point.set(Some(id(3)));
            s.purge(id(5)).await.unwrap();
            let st = s.get_log_state().await.unwrap();
            assert_eq!(st.last_purged_log_id, Some(id(3)));
            assert_eq!(indexes(&mut s).await, vec![4, 5, 6]);
            // Durable before the log is reopened.
            s.save_vote(&Vote::new(2, 1)).await.unwrap();
        }
        let mut s = LogStore::open(&path).unwrap();
        s.bound_purges_by(point.clone());
        assert_eq!(
            s.get_log_state().await.unwrap().last_purged_log_id,
            Some(id(3))
        );
        // Once a snapshot covers 5, the purge goes through.
        point.set(Some(id(5)));
        s.purge(id(5)).await.unwrap();
        assert_eq!(
            s.get_log_state().await.unwrap().last_purged_log_id,
            Some(id(5))
        );
    }

    /// Found in review: any damaged record was taken for a torn tail and the log cut there,
    /// dropping every entry and vote after it with only a warning. Damage with a valid record
    /// after it is now an error that names where; damage at the end is still cut.
    #[tokio::test]
    async fn damage_with_valid_records_after_it_is_corruption_not_a_torn_tail() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("raft.log");
        {
            let mut s = LogStore::open(&path).unwrap();
            for term in 1..=3 {
                s.save_vote(&Vote::new(term, 1)).await.unwrap();
            }
        }
        let bytes = std::fs::read(&path).unwrap();
        let first = 8 + u32::from_le_bytes(bytes[..4].try_into().unwrap()) as usize;
        // A flipped bit in the first vote's payload, and a flipped bit in its length.
        for flip in [10, 1] {
            let mut bad = bytes.clone();
            bad[flip] ^= 0x10;
            std::fs::write(&path, &bad).unwrap();
            let e = LogStore::open(&path).err().expect("corruption is refused");
            assert_eq!(e.kind(), io::ErrorKind::InvalidData);
            let msg = e.to_string();
            assert!(msg.contains("corrupt at byte 0"), "{msg}");
            assert!(
                msg.contains(&format!("valid record at byte {first}")),
                "{msg}"
            );
            assert_eq!(std::fs::read(&path).unwrap(), bad, "nothing was cut");
        }
        // The same damage in the last record is a torn tail: cut, and the votes before it kept.
        let mut torn = bytes.clone();
        let last = torn.len() - 1;
        torn[last] ^= 0x10;
        std::fs::write(&path, &torn).unwrap();
        let mut s = LogStore::open(&path).unwrap();
        assert_eq!(s.read_vote().await.unwrap(), Some(Vote::new(2, 1)));
    }
}
