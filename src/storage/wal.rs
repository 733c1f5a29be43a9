//! The write-ahead log: segmented, CRC-checked, with group commit and an fsync policy.
//!
//! # Layout
//!
//! The log lives in one directory as segment files named `wal-<start lsn, 20 digits>.log`. An LSN
//! is a byte offset in the logical log, across segments: a segment's records occupy
//! `start .. start + their length`, and the next segment starts exactly where the previous one
//! ends. With [`WalOptions::preallocate`] a segment is allocated whole when it is created and
//! its records are followed by zeros; it is cut to its records when it is closed (a roll, or
//! the log closed in order), so only the last segment keeps zeros, after a crash. Each record
//! is framed as
//!
//! ```text
//! [u32 LE payload length][u32 LE crc32 of payload][payload]
//! ```
//!
//! where the payload is an rkyv archive of the log's twin of [`Record`]. On reading, the payload
//! is copied into a 16-byte aligned buffer, validated with bytecheck and converted back.
//!
//! # Recovery
//!
//! [`Wal::open`] scans the segments from the one holding `from_lsn` (the LSN a snapshot covers;
//! earlier records are skipped, earlier whole segments are not even read). Where a segment's
//! records are followed only by zeros (preallocated space), they simply end there. Otherwise a
//! bad record is either:
//!
//! - a **torn tail**: it is in the *last* segment and no complete record with a valid CRC starts
//!   anywhere after it (a crash interrupted the last write), or it starts a run of zeros to the
//!   end of its page (a page whose write never reached the disk before a machine crash, while a
//!   later one did: past the last completed fsync, so nothing after it was acknowledged under
//!   `always`; see `unwritten_page_in`). The
//!   segment is truncated at the bad record (`set_len` + fsync), a warning is logged and
//!   [`Recovery::torn_tail`] reports it;
//! - **corruption**: anything else (valid data follows the bad record, the bad record is in an
//!   earlier segment, a record whose CRC matches fails validation, segments do not join up).
//!   [`Wal::open`] then fails with [`StorageError::Corrupt`], whose message names the segment and
//!   offset and the way out: `causalkv repair --config FILE`, which calls [`repair`].
//!
//! # Group commit
//!
//! [`Wal::append`] only queues (or, under `never`, writes). Durability is asked for with
//! [`Wal::request_sync`] and observed on a `tokio::sync::watch` channel ([`Wal::synced`],
//! [`wait_synced`]). A dedicated thread (`wal-sync`) owns the commit: under `always` it syncs
//! once for every request pending at that moment, so concurrent writers share one `fdatasync`,
//! and the records queued while that fsync runs are the next group, written and fsynced when it
//! returns; the group is held back (at most half an fsync) only while the writers that fsync
//! acknowledged can still join it (see `Gather`). The synced LSN is published from that thread, which wakes the waiting requests.
//! Under `batch` the LSN published is the one written, and a second thread (`wal-flush`)
//! fsyncs every `batch_ms`. [`FsyncPolicy`] states what each policy promises after a crash, and
//! [`WalStats`] counts and times the commits (fsyncs, records per fsync, fsync latency, the
//! wait of a group).
//!
//! # The log thread does the I/O
//!
//! Under `always` and `batch`, [`Wal::append`] does no I/O at all: it serialises the records and
//! queues the bytes for the same thread, which writes them (`write(2)`), rolls segments and
//! fsyncs. The appending thread (a node's runtime thread, under the replica lock) therefore
//! never waits for the disk: neither for a roll's fsyncs nor for a `write(2)` that the file
//! system holds up behind a journal commit (another file's large fsync, a snapshot's, is
//! enough). Queued bytes are written whenever the thread wakes: for a sync request, a roll, the
//! `batch` timer or shutdown. A roll fsyncs the old segment, creates the new one and fsyncs the
//! directory before a byte reaches the new segment, so the order on disk is that of a roll in
//! place and recovery's rule (only the last segment can have a torn tail) holds. Under `never`
//! the appender writes in place, as before (no fsync is promised, and a written record
//! survives the process being killed).

use std::collections::VecDeque;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bytes::Bytes;
use rkyv::rancor;
use rkyv::util::AlignedVec;
use tokio::sync::watch;

use crate::clock::{VClock, Version};
use crate::histogram::Histogram;
use crate::update::{Record, Update};

use twin::{ArchivedUpdateRef, ArchivedWalRecord, UpdateRef, WalRecord};

/// Size of a record header: payload length and CRC.
const HEADER: usize = 8;

/// The unit in which a write can fail to reach the disk: a page of the page cache (and a file
/// system block), 4 KiB.
const PAGE: usize = 4096;

/// What can go wrong in durable storage.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    /// A file operation failed.
    #[error("storage i/o error on {path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The error.
        source: io::Error,
    },
    /// The write-ahead log holds a damaged record that is not a torn tail.
    #[error(
        "write-ahead log segment {segment} is corrupt at offset {offset}: {reason}. This is not \
         a torn write from a crash, so the node refuses to start rather than silently drop data. \
         To truncate the log at this record (the records after it are lost at this site; peers \
         resend their own updates, but this site's updates after that point survive only where \
         peers already have them), stop the node and run `causalkv repair --config FILE`"
    )]
    Corrupt {
        /// The segment file.
        segment: PathBuf,
        /// Byte offset of the bad record inside the segment.
        offset: u64,
        /// What is wrong.
        reason: String,
    },
    /// The log and the snapshot do not fit together (records are missing in between).
    #[error("write-ahead log in {dir} does not match the snapshot: {reason}")]
    Inconsistent {
        /// The log directory.
        dir: PathBuf,
        /// What does not match.
        reason: String,
    },
    /// A snapshot file failed to load or validate.
    #[error("snapshot {path} is invalid: {reason}")]
    Snapshot {
        /// The snapshot file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// An earlier write or fsync failed; the log accepts nothing more (restart the node).
    #[error("write-ahead log is unusable after an earlier failure: {0}")]
    Failed(String),
    /// The sync thread stopped (an fsync failed, or the log was closed) before the LSN waited
    /// for became durable.
    #[error("write-ahead log stopped before the data became durable (fsync failed or log closed)")]
    SyncStopped,
}

pub(super) fn io_err(path: &Path) -> impl FnOnce(io::Error) -> StorageError + '_ {
    move |source| StorageError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// When the log is fsynced, and so what an acknowledged write survives.
///
/// | policy | acknowledged after | a killed process (`kill -9`) | a machine crash or power loss |
/// |---|---|---|---|
/// | `always` | its group's fsync | loses nothing | loses nothing |
/// | `batch` | its `write(2)` | loses nothing | loses at most the last `batch_ms` (plus the fsync in progress) |
/// | `never` | its `write(2)` | loses nothing | loses what the OS had not written back |
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FsyncPolicy {
    /// Group commit: every sync request is fsynced as soon as the previous fsync finishes
    /// (requests pending meanwhile share the next one). Nothing acknowledged is lost in a crash.
    #[default]
    Always,
    /// Like Redis's `appendfsync everysec`, with a shorter period: a request is acknowledged once
    /// the log thread has written it (`write(2)`, so a killed process loses nothing) and a thread
    /// of its own fsyncs what was written every `batch_ms`. A crash of the machine can lose the
    /// writes acknowledged in the last `batch_ms` plus the duration of one fsync.
    Batch,
    /// Never fsync (the OS writes back eventually): requests are marked synced once written. A
    /// crash of the machine (not just the process) can lose acknowledged writes.
    Never,
}

/// Write-ahead log settings (the `[storage]` table of the site configuration).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WalOptions {
    /// When to fsync.
    pub fsync: FsyncPolicy,
    /// Interval between fsyncs under [`FsyncPolicy::Batch`], in milliseconds: the most a
    /// machine crash can take back of what was acknowledged (plus one fsync's duration).
    pub batch_ms: u64,
    /// A segment is closed and a new one started once it would grow past this many bytes.
    pub segment_bytes: u64,
    /// Under [`FsyncPolicy::Always`], how many fsyncs of the log may run at once. With 1, one
    /// thread writes and commits, and holds the next group back briefly for the writers the
    /// last commit acknowledged (see `Gather`). With more, that many commit threads each write
    /// what is queued and start an fsync as soon as a sync request is not covered by one
    /// already running: a group never waits for the previous fsync to end, which pays off on
    /// disks that complete concurrent flushes in parallel.
    pub fsync_threads: u32,
    /// Allocate each segment's `segment_bytes` on disk when it is created (`fallocate`), so
    /// that appends overwrite blocks the file already owns. An `fdatasync` then flushes the
    /// data alone, without the journal commit that growing the file costs (about 1.5× faster
    /// on ext4). The space past the last record reads as zeros, which recovery takes for the
    /// end of the log; a segment is cut to its records when it is closed.
    pub preallocate: bool,
}

impl Default for WalOptions {
    fn default() -> Self {
        Self {
            fsync: FsyncPolicy::Always,
            batch_ms: 5,
            segment_bytes: 64 << 20,
            fsync_threads: 2,
            preallocate: true,
        }
    }
}

/// A torn tail that recovery truncated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TornTail {
    /// The segment file.
    pub segment: PathBuf,
    /// Offset inside the segment where the file was cut.
    pub offset: u64,
    /// Bytes dropped.
    pub bytes_dropped: u64,
}

/// What [`Wal::open`] recovered.
#[derive(Debug)]
pub struct Recovery {
    /// The records at or after `from_lsn`, in log order.
    pub records: Vec<Record>,
    /// The LSN after the last valid record: where the next append goes.
    pub end_lsn: u64,
    /// The torn tail that was truncated, if any.
    pub torn_tail: Option<TornTail>,
}

/// What [`repair`] did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RepairReport {
    /// Why the log was cut (`None` when nothing was wrong).
    pub reason: Option<String>,
    /// The segment that was truncated and the offset it was cut at.
    pub truncated: Option<(PathBuf, u64)>,
    /// Later segments that were deleted.
    pub deleted_segments: Vec<PathBuf>,
    /// Bytes dropped in total (truncated tail plus deleted segments).
    pub bytes_dropped: u64,
    /// Valid records kept (from `from_lsn` on).
    pub records_kept: u64,
    /// The end of the log after the repair.
    pub end_lsn: u64,
}

impl std::fmt::Display for RepairReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (&self.reason, &self.truncated) {
            (None, _) => write!(
                f,
                "write-ahead log is intact: {} records, ends at LSN {}",
                self.records_kept, self.end_lsn
            ),
            (Some(reason), truncated) => {
                write!(f, "write-ahead log repaired: {reason}; ")?;
                if let Some((seg, off)) = truncated {
                    write!(f, "truncated {} at offset {off}; ", seg.display())?;
                }
                if !self.deleted_segments.is_empty() {
                    write!(
                        f,
                        "deleted {} later segment(s); ",
                        self.deleted_segments.len()
                    )?;
                }
                write!(
                    f,
                    "dropped {} bytes; kept {} records, log ends at LSN {}. Records after the cut \
                     are lost at this site: peers resend their own updates, this site's own \
                     updates after the cut survive only where peers already received them",
                    self.bytes_dropped, self.records_kept, self.end_lsn
                )
            }
        }
    }
}

/// The log's archived twins of the replica's records. Keys, values and dependency vectors are
/// borrowed when writing (no copies) and archived as boxed slices.
#[allow(missing_docs)]
pub(super) mod twin {
    use rkyv::with::{InlineAsBox, Map};
    use rkyv::{Archive, Serialize};

    /// An update, borrowed.
    #[derive(Archive, Serialize)]
    pub struct UpdateRef<'a> {
        #[rkyv(with = InlineAsBox)]
        pub key: &'a [u8],
        #[rkyv(with = Map<InlineAsBox>)]
        pub value: Option<&'a [u8]>,
        pub ts: u64,
        pub site: u16,
        #[rkyv(with = InlineAsBox)]
        pub deps: &'a [u64],
    }

    /// A log record, borrowed.
    #[derive(Archive, Serialize)]
    pub enum WalRecord<'a> {
        Update(UpdateRef<'a>),
        Marker { origin: u16, ts: u64 },
        ClockLease(u64),
    }
}

impl<'a> UpdateRef<'a> {
    pub(super) fn new(u: &'a Update) -> Self {
        Self {
            key: &u.key,
            value: u.value.as_deref(),
            ts: u.version.ts,
            site: u.version.site,
            deps: u.deps.as_slice(),
        }
    }
}

impl ArchivedUpdateRef<'_> {
    /// Converts back to an owned update (copies key, value and deps).
    pub(super) fn to_update(&self) -> Update {
        Update {
            key: Bytes::copy_from_slice(&self.key),
            value: self.value.as_ref().map(|v| Bytes::copy_from_slice(v)),
            version: Version::new(self.ts.to_native(), self.site.to_native()),
            deps: VClock::from_vec(self.deps.iter().map(|d| d.to_native()).collect()),
        }
    }
}

/// An rkyv writer appending to the log's batch buffer, with positions counted from the start of
/// the record being written.
struct RecordWriter<'a> {
    buf: &'a mut Vec<u8>,
    start: usize,
}

impl rkyv::ser::Positional for RecordWriter<'_> {
    fn pos(&self) -> usize {
        self.buf.len() - self.start
    }
}

impl<E> rkyv::ser::Writer<E> for RecordWriter<'_> {
    fn write(&mut self, bytes: &[u8]) -> Result<(), E> {
        self.buf.extend_from_slice(bytes);
        Ok(())
    }
}

fn to_twin(r: &Record) -> WalRecord<'_> {
    match r {
        Record::Update(u) => WalRecord::Update(UpdateRef::new(u)),
        Record::Marker { origin, ts } => WalRecord::Marker {
            origin: *origin,
            ts: *ts,
        },
        Record::ClockLease(ts) => WalRecord::ClockLease(*ts),
    }
}

fn from_twin(a: &ArchivedWalRecord<'_>) -> Record {
    match a {
        ArchivedWalRecord::Update(u) => Record::Update(u.to_update()),
        ArchivedWalRecord::Marker { origin, ts } => Record::Marker {
            origin: origin.to_native(),
            ts: ts.to_native(),
        },
        ArchivedWalRecord::ClockLease(ts) => Record::ClockLease(ts.to_native()),
    }
}

/// One segment file.
#[derive(Clone, Debug)]
struct Segment {
    start: u64,
    len: u64,
    path: PathBuf,
}

impl Segment {
    fn end(&self) -> u64 {
        self.start + self.len
    }
}

fn segment_path(dir: &Path, start: u64) -> PathBuf {
    dir.join(format!("wal-{start:020}.log"))
}

/// The segments in `dir`, sorted by start LSN.
fn list_segments(dir: &Path) -> Result<Vec<Segment>, StorageError> {
    let mut out = Vec::new();
    for ent in fs::read_dir(dir).map_err(io_err(dir))? {
        let ent = ent.map_err(io_err(dir))?;
        let name = ent.file_name();
        let Some(name) = name.to_str() else { continue };
        let Some(digits) = name
            .strip_prefix("wal-")
            .and_then(|n| n.strip_suffix(".log"))
        else {
            continue;
        };
        if digits.len() != 20 || !digits.bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        let Ok(start) = digits.parse::<u64>() else {
            continue;
        };
        let path = ent.path();
        let len = ent.metadata().map_err(io_err(&path))?.len();
        out.push(Segment { start, len, path });
    }
    out.sort_by_key(|s| s.start);
    Ok(out)
}

pub(super) fn sync_dir(dir: &Path) -> Result<(), StorageError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err(dir))
}

/// Why a frame could not be read.
pub(crate) enum BadFrame {
    /// Incomplete header, length past the end of the file, empty payload or CRC mismatch: what a
    /// torn write looks like (it is torn if nothing valid follows).
    Damaged(String),
    /// The CRC matches but the payload is not a valid record: never a torn write.
    Invalid(String),
}

/// Reads the frame at `off`: `Ok(Some((payload, next offset)))`, `Ok(None)` at the end. The
/// Raft log ([`crate::consensus::log`]) frames its records the same way and reads them here.
pub(crate) fn frame_at(data: &[u8], off: usize) -> Result<Option<(&[u8], usize)>, BadFrame> {
    let rest = &data[off..];
    if rest.is_empty() {
        return Ok(None);
    }
    if rest.len() < HEADER {
        return Err(BadFrame::Damaged(format!(
            "incomplete record header ({} of {HEADER} bytes)",
            rest.len()
        )));
    }
    let len = u32::from_le_bytes(rest[0..4].try_into().expect("4 bytes")) as usize;
    let crc = u32::from_le_bytes(rest[4..8].try_into().expect("4 bytes"));
    if len == 0 {
        return Err(BadFrame::Damaged("record with an empty payload".into()));
    }
    if rest.len() - HEADER < len {
        return Err(BadFrame::Damaged(format!(
            "record of {len} bytes runs past the end of the file ({} bytes left)",
            rest.len() - HEADER
        )));
    }
    let payload = &rest[HEADER..HEADER + len];
    let actual = crc32fast::hash(payload);
    if actual != crc {
        return Err(BadFrame::Damaged(format!(
            "CRC mismatch (stored {crc:#010x}, computed {actual:#010x}) in a record of {len} bytes"
        )));
    }
    Ok(Some((payload, off + HEADER + len)))
}

/// Where a complete frame with a valid CRC starts after `bad` (the start of a bad frame), if
/// anywhere. Tries the position the bad frame's own length points to first, then every byte.
pub(crate) fn valid_frame_after(data: &[u8], bad: usize) -> Option<usize> {
    let check = |p: usize| -> bool {
        if p + HEADER > data.len() {
            return false;
        }
        let len = u32::from_le_bytes(data[p..p + 4].try_into().expect("4 bytes")) as usize;
        let crc = u32::from_le_bytes(data[p + 4..p + 8].try_into().expect("4 bytes"));
        len > 0
            && data.len() - p - HEADER >= len
            && crc32fast::hash(&data[p + HEADER..][..len]) == crc
    };
    if bad + HEADER <= data.len() {
        let len = u32::from_le_bytes(data[bad..bad + 4].try_into().expect("4 bytes")) as usize;
        let next = bad.saturating_add(HEADER).saturating_add(len);
        if next > bad + HEADER && check(next) {
            return Some(next);
        }
    }
    (bad + 1..data.len().saturating_sub(HEADER - 1)).find(|&p| check(p))
}

/// Whether the damaged frame at `bad` looks like a page whose write never reached the disk: its
/// header and the rest of its page are all zeros. In a preallocated segment the space past the
/// records is zeros until written. After a machine crash a page written back late keeps its
/// older content while a later page may already hold newer records; that older content ends
/// where a `write(2)` ended (a page's share of a write is copied in whole, under the page's
/// lock, before writeback can take it), so at a record boundary, followed by zeros to the
/// page's end. Such a gap lies past the last completed fsync (an fsync makes every page before
/// its end durable), so nothing after it was acknowledged under `always`.
///
/// The damaged frame's own length is not trusted, and zeros that start inside a record do not
/// count: records hold zero bytes of their own, and a flipped bit in such a record, with valid
/// records after it, is corruption. What this cannot tell apart from a lost page is a device
/// that zeroes the end of a page from exactly a record boundary on.
fn unwritten_page_in(data: &[u8], bad: usize) -> bool {
    let page_end = ((bad / PAGE + 1) * PAGE).min(data.len());
    page_end >= bad + HEADER && data[bad..page_end].iter().all(|&b| b == 0)
}

/// Validates a payload (copied into `aligned`) and converts it.
fn decode(payload: &[u8], aligned: &mut AlignedVec<16>) -> Result<Record, String> {
    aligned.clear();
    aligned.extend_from_slice(payload);
    let a = rkyv::access::<ArchivedWalRecord<'_>, rancor::Error>(aligned)
        .map_err(|e| format!("record fails validation: {e}"))?;
    Ok(from_twin(a))
}

/// A damaged spot found by [`scan`].
struct Problem {
    /// Index into the scanned segment list.
    seg: usize,
    offset: u64,
    reason: String,
    /// Whether it qualifies as a torn tail.
    torn: bool,
}

/// The result of scanning the log.
struct Scan {
    segments: Vec<Segment>,
    records: Vec<Record>,
    /// Valid records read (from `from_lsn` on), whether collected or not.
    records_seen: u64,
    /// The first damaged spot, where the scan stopped.
    problem: Option<Problem>,
}

/// Scans the segments of `dir` from the one holding `from_lsn`, stopping at the first problem.
fn scan(dir: &Path, from_lsn: u64, collect: bool) -> Result<Scan, StorageError> {
    let segments = list_segments(dir)?;
    let mut out = Scan {
        records: Vec::new(),
        records_seen: 0,
        problem: None,
        segments,
    };
    if out.segments.is_empty() {
        return Ok(out);
    }
    // The first segment to read: the last one starting at or before `from_lsn`.
    let first = out
        .segments
        .iter()
        .rposition(|s| s.start <= from_lsn)
        .unwrap_or(0);
    if out.segments[first].start > from_lsn {
        return Err(StorageError::Inconsistent {
            dir: dir.to_path_buf(),
            reason: format!(
                "the log starts at LSN {} but the snapshot covers only up to LSN {from_lsn}: the \
                 records in between are missing (was the snapshot file removed?)",
                out.segments[first].start
            ),
        });
    }
    let last = out.segments.len() - 1;
    // The segments before `first` are not read: their records end where the next one starts.
    // (Their file length can be larger, if a preallocated segment's cut at its roll never
    // reached the disk.)
    for i in 0..first {
        let next = out.segments[i + 1].start;
        let seg = &mut out.segments[i];
        seg.len = seg.len.min(next.saturating_sub(seg.start));
    }
    let mut aligned = AlignedVec::<16>::new();
    for i in first..=last {
        let seg = out.segments[i].clone();
        if i > first {
            let prev = &out.segments[i - 1];
            if prev.end() != seg.start {
                out.problem = Some(Problem {
                    seg: i - 1,
                    offset: prev.len,
                    reason: format!(
                        "the segment ends at LSN {} but the next segment {} starts at LSN {}",
                        prev.end(),
                        seg.path.display(),
                        seg.start
                    ),
                    torn: false,
                });
                return Ok(out);
            }
        }
        if seg.end() <= from_lsn {
            // Wholly covered by the snapshot (the log ends before it, see `Wal::open`).
            continue;
        }
        let data = read_segment(&seg.path)?;
        out.segments[i].len = data.len() as u64;
        let mut off = 0usize;
        loop {
            let bad = match frame_at(&data, off) {
                Ok(None) => break,
                Ok(Some((payload, next))) => {
                    let lsn = seg.start + off as u64;
                    let end = seg.start + next as u64;
                    if lsn >= from_lsn {
                        match decode(payload, &mut aligned) {
                            Ok(rec) => {
                                out.records_seen += 1;
                                if collect {
                                    out.records.push(rec);
                                }
                                off = next;
                                continue;
                            }
                            Err(reason) => BadFrame::Invalid(reason),
                        }
                    } else if end > from_lsn {
                        return Err(StorageError::Inconsistent {
                            dir: dir.to_path_buf(),
                            reason: format!(
                                "the snapshot covers the log up to LSN {from_lsn}, which falls \
                                 inside the record at LSN {lsn}..{end} in {}",
                                seg.path.display()
                            ),
                        });
                    } else {
                        off = next;
                        continue;
                    }
                }
                Err(b) => b,
            };
            if matches!(bad, BadFrame::Damaged(_)) && data[off..].iter().all(|&b| b == 0) {
                // Preallocated space never written: the segment's records end here.
                out.segments[i].len = off as u64;
                break;
            }
            let (reason, torn) = match bad {
                BadFrame::Invalid(r) => (r, false),
                BadFrame::Damaged(r) if i < last => {
                    (format!("{r}, in a segment that is not the last one"), false)
                }
                BadFrame::Damaged(r) if valid_frame_after(&data, off).is_some() => {
                    if unwritten_page_in(&data, off) {
                        let why = "the rest of its page is zeros: a write that never reached \
                                   the disk, so the records after it go with the torn tail";
                        (format!("{r}; {why}"), true)
                    } else {
                        (format!("{r}, and valid records follow it"), false)
                    }
                }
                BadFrame::Damaged(r) => (r, true),
            };
            out.problem = Some(Problem {
                seg: i,
                offset: off as u64,
                reason,
                torn,
            });
            return Ok(out);
        }
    }
    Ok(out)
}

/// Truncates `path` to `len` bytes and fsyncs it.
fn truncate(path: &Path, len: u64) -> Result<(), StorageError> {
    let f = OpenOptions::new()
        .write(true)
        .open(path)
        .map_err(io_err(path))?;
    f.set_len(len).map_err(io_err(path))?;
    f.sync_all().map_err(io_err(path))
}

/// Cuts the log at the first damaged record, corrupt or torn: truncates that segment there and
/// deletes every later segment. Run it offline (no [`Wal`] open on `dir`) when [`Wal::open`]
/// reports [`StorageError::Corrupt`]; `from_lsn` is the snapshot's LSN as for [`Wal::open`]
/// (segments wholly covered by the snapshot are left alone).
///
/// **This loses data at this site**: every record after the cut. Peers resend their own updates
/// (they keep them until this site acks them, and this site's durable state now acks less), but
/// this site's own updates after the cut are lost unless peers already received them.
pub fn repair(dir: &Path, from_lsn: u64) -> Result<RepairReport, StorageError> {
    let scan = scan(dir, from_lsn, false)?;
    let mut report = RepairReport {
        records_kept: scan.records_seen,
        end_lsn: scan.segments.last().map_or(from_lsn, Segment::end),
        ..RepairReport::default()
    };
    let Some(p) = scan.problem else {
        return Ok(report);
    };
    let seg = &scan.segments[p.seg];
    if p.offset < seg.len {
        truncate(&seg.path, p.offset)?;
        report.truncated = Some((seg.path.clone(), p.offset));
        report.bytes_dropped += seg.len - p.offset;
    }
    for later in &scan.segments[p.seg + 1..] {
        fs::remove_file(&later.path).map_err(io_err(&later.path))?;
        report.bytes_dropped += later.len;
        report.deleted_segments.push(later.path.clone());
    }
    sync_dir(dir)?;
    report.end_lsn = seg.start + p.offset;
    tracing::warn!(
        dir = %dir.display(),
        segment = %seg.path.display(),
        offset = p.offset,
        bytes_dropped = report.bytes_dropped,
        reason = %p.reason,
        "write-ahead log repaired: records after the cut are lost at this site"
    );
    report.reason = Some(format!(
        "{} at offset {}: {}",
        seg.path.display(),
        p.offset,
        p.reason
    ));
    Ok(report)
}

/// State shared with the sync thread.
struct Shared {
    policy: FsyncPolicy,
    /// Bytes to allocate for each new segment (0: none), see [`WalOptions::preallocate`].
    prealloc: u64,
    batch: Duration,
    state: Mutex<SyncState>,
    cv: Condvar,
    /// Wakes the `batch` flush thread (at shutdown).
    flush_cv: Condvar,
    /// Several commit threads ([`WalOptions::fsync_threads`] > 1 under `always`): they write and
    /// commit ([`commit_loop`]), and there is no log thread.
    overlap: bool,
    /// Wakes the commit threads: a sync request, a roll, a flush, shutdown.
    commit_cv: Condvar,
    /// The LSN everything written to segment files so far ends at (stored after the write;
    /// queued appends count once the sync thread has written them).
    appended: AtomicU64,
    /// Signalled when the queue has been written out (or the log fails), for
    /// [`SyncHandle::sync`].
    drained: Condvar,
    stats: Arc<WalStats>,
    failed: AtomicBool,
    /// Publishes the synced LSN; dropped when an fsync fails, which wakes waiters with an error.
    /// Apart from the state, so that waking waiters never holds up an appender.
    tx: Mutex<Option<watch::Sender<u64>>>,
}

struct SyncState {
    requested: u64,
    /// The LSN published to waiters: fsynced under `always`, written under `batch` and `never`.
    synced: u64,
    /// The LSN the last fsync covered (under `always`, the same as `synced`).
    fsynced: u64,
    /// The highest LSN an fsync already started covers (several commit threads: a request at or
    /// below it needs no fsync of its own).
    started: u64,
    /// What the log thread has written since the last commit started.
    unsynced: Unsynced,
    /// A [`SyncHandle`] asked the log thread to write out the queue.
    flush_asked: bool,
    /// Sync requests since the last commit's fsync started (see [`Gather`]).
    asked: u64,
    /// The current segment (earlier segments were fsynced when they were closed).
    current: Arc<File>,
    /// Appends waiting for the sync thread to write them, oldest first.
    queue: VecDeque<Chunk>,
    /// The sync thread is writing a chunk it took from the queue (`Some(true)`: with a roll,
    /// whose segment may not exist yet), or an appender is writing in place ([`Wal::append`]).
    writing: Option<bool>,
    /// Fsyncs running now (commits, the `batch` flush, a roll's): an appender writes in place
    /// only while none runs, so that its `write(2)` never waits behind one.
    fsyncing: u32,
    /// The log thread waits on `cv`: only then does waking it cost a system call worth making.
    log_waiting: bool,
    /// Commit threads waiting on `commit_cv`.
    commit_waiting: u32,
    /// [`SyncHandle::sync`] calls waiting on `drained`.
    drain_waiting: u32,
    shutdown: bool,
}

/// Queued appends for the sync thread: serialised records, in log order, behind a roll to a new
/// segment when `roll_to` is set.
struct Chunk {
    /// Start this segment file (after fsyncing the current one) before writing `bytes`.
    roll_to: Option<PathBuf>,
    bytes: Vec<u8>,
    /// Records in `bytes`.
    records: u64,
    /// When the oldest of them was queued.
    queued: Instant,
}

/// Group-commit figures of a log, recorded by its threads with relaxed atomic adds and read at
/// any time ([`Wal::stats`]); a node's `/metrics` renders them. Together with the request
/// path's own stages they give the timeline of a durable write: queued, written, fsync started,
/// fsync done, acknowledged.
#[derive(Debug)]
pub struct WalStats {
    /// Every fsync of the log: commits, segment rolls and explicit syncs.
    pub fsyncs: AtomicU64,
    /// Commits: fsyncs of the sync thread that made newly written records durable.
    pub commits: AtomicU64,
    /// Records those commits made durable (records per commit = this / `commits`).
    pub committed_records: AtomicU64,
    /// How long each fsync took.
    pub fsync_duration: Histogram,
    /// Per commit: from the moment its oldest record was queued to the moment its fsync started
    /// (the wait for the disk, and for the write of the group).
    pub commit_wait: Histogram,
    /// Per write of queued records by the log thread: the `write(2)`.
    pub write_duration: Histogram,
    epoch: Instant,
    /// When the synced LSN last moved, in nanoseconds since `epoch`.
    published: AtomicU64,
}

impl Default for WalStats {
    fn default() -> Self {
        Self {
            fsyncs: AtomicU64::new(0),
            commits: AtomicU64::new(0),
            committed_records: AtomicU64::new(0),
            fsync_duration: Histogram::default(),
            commit_wait: Histogram::default(),
            write_duration: Histogram::default(),
            epoch: Instant::now(),
            published: AtomicU64::new(0),
        }
    }
}

impl WalStats {
    /// When the synced LSN last moved (waiters were told then).
    pub fn last_published(&self) -> Instant {
        self.epoch + Duration::from_nanos(self.published.load(Ordering::Relaxed))
    }

    fn mark_published(&self) {
        let ns = self.epoch.elapsed().as_nanos().min(u64::MAX as u128) as u64;
        self.published.fetch_max(ns, Ordering::Relaxed);
    }

    /// Runs one fsync of `file`, counted and timed.
    fn fsync(&self, file: &File) -> io::Result<()> {
        let t = Instant::now();
        let res = file.sync_data();
        self.fsync_duration.record(t.elapsed());
        self.fsyncs.fetch_add(1, Ordering::Relaxed);
        res
    }
}

/// Longest the log thread holds a group back for the writers the previous commit acknowledged.
const MAX_GATHER: Duration = Duration::from_micros(500);

/// After a commit under `always`: the next group is held back (until `until` at the latest)
/// while it has fewer than `expect` sync requests, those the commit just acknowledged plus those
/// already waiting. Started the moment the previous fsync ends, the next fsync would carry only
/// what arrived during it, and the writers just acknowledged, whose next requests arrive a round
/// trip later, would wait for all of it and then their own: in a steady closed loop every writer
/// waits about two fsyncs and groups hold half the writers. Held back for at most half an fsync
/// (and [`MAX_GATHER`]), a group takes them along: one fsync for nearly every writer. Requests
/// are counted, not records, so that records nobody waits for (replicated batches, which join
/// whatever group is next) do not hold a group back; a lone writer is never held back, its next
/// request meets `expect` at once.
struct Gather {
    expect: u64,
    until: Instant,
}

/// What the sync thread has written since its last commit.
#[derive(Default)]
struct Unsynced {
    records: u64,
    oldest: Option<Instant>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, SyncState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Wakes the thread that writes queued appends, the log thread or (with several commit
    /// threads) a waiting commit thread, if it waits, after releasing the state. Every check
    /// that decides whether a thread waits runs under the lock, so a thread not waiting sees
    /// the change; a signal nobody waits for would still cost a system call per append.
    fn wake_writer(&self, st: MutexGuard<'_, SyncState>) {
        let (waiting, cv) = if self.overlap {
            (st.commit_waiting > 0, &self.commit_cv)
        } else {
            (st.log_waiting, &self.cv)
        };
        drop(st);
        if waiting {
            cv.notify_one();
        }
    }

    /// The log thread waits on `cv` (at most `timeout`), marked as waiting meanwhile.
    fn log_wait<'a>(
        &self,
        mut st: MutexGuard<'a, SyncState>,
        timeout: Option<Duration>,
    ) -> MutexGuard<'a, SyncState> {
        st.log_waiting = true;
        let mut st = match timeout {
            Some(t) => {
                self.cv
                    .wait_timeout(st, t)
                    .unwrap_or_else(|e| e.into_inner())
                    .0
            }
            None => self.cv.wait(st).unwrap_or_else(|e| e.into_inner()),
        };
        st.log_waiting = false;
        st
    }

    /// Runs one fsync of `file` outside the lock, counted in [`SyncState::fsyncing`] while it
    /// runs. Returns the state locked again with the result.
    fn fsync_unlocked<'a>(
        &'a self,
        mut st: MutexGuard<'a, SyncState>,
        file: &File,
    ) -> (MutexGuard<'a, SyncState>, io::Result<()>) {
        st.fsyncing += 1;
        drop(st);
        let res = self.stats.fsync(file);
        let mut st = self.lock();
        st.fsyncing -= 1;
        (st, res)
    }

    /// Raises the synced LSN to `lsn` and tells waiters, after releasing the state: a wake-up
    /// can cost a system call per waiter, and the appenders must not wait for those.
    fn publish(&self, mut st: MutexGuard<'_, SyncState>, lsn: u64) {
        if lsn > st.synced {
            st.synced = lsn;
        }
        drop(st);
        let tx = self.tx.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(tx) = &*tx {
            // Stamped before waiters are woken, so that a waiter reading it sees this publish.
            self.stats.mark_published();
            tx.send_if_modified(|v| {
                if *v < lsn {
                    *v = lsn;
                    true
                } else {
                    false
                }
            });
        }
    }

    /// The log thread waits to be woken (a sync request, a roll, a flush, shutdown). Under
    /// `batch` it wakes after `batch_ms` anyway: appends nobody asked a sync for (remote
    /// batches) are written within `batch_ms` too, for the flush thread to fsync.
    fn idle<'a>(&self, st: MutexGuard<'a, SyncState>) -> MutexGuard<'a, SyncState> {
        let timeout = (self.policy == FsyncPolicy::Batch).then_some(self.batch);
        self.log_wait(st, timeout)
    }

    /// Commits everything written up to `target`, which the caller read under the lock
    /// together with the current segment: fsyncs that segment outside the lock, counts the
    /// commit and raises `fsynced`. Returns the state locked again (not yet published) and how
    /// long the fsync took, or `None` when it failed and the log is marked failed.
    fn commit<'a>(
        &'a self,
        mut st: MutexGuard<'a, SyncState>,
        target: u64,
    ) -> Option<(MutexGuard<'a, SyncState>, Duration)> {
        let file = st.current.clone();
        let records = self.take_unsynced(&mut st);
        let started = Instant::now();
        let (mut st, res) = self.fsync_unlocked(st, &file);
        let took = started.elapsed();
        match res {
            Ok(()) => {
                self.stats.commits.fetch_add(1, Ordering::Relaxed);
                self.stats
                    .committed_records
                    .fetch_add(records, Ordering::Relaxed);
                st.fsynced = st.fsynced.max(target);
                Some((st, took))
            }
            Err(e) => {
                self.fail(&mut st, format!("write-ahead log fsync failed: {e}"));
                None
            }
        }
    }

    /// Takes the count of records written since the last commit started, for a commit about
    /// to start, and records how long the oldest of them waited.
    fn take_unsynced(&self, st: &mut SyncState) -> u64 {
        let u = std::mem::take(&mut st.unsynced);
        if let Some(oldest) = u.oldest {
            self.stats.commit_wait.record(oldest.elapsed());
        }
        u.records
    }

    /// Marks the log failed; called with the state locked, so that threads waiting on
    /// `drained` see it when they re-check.
    fn fail(&self, _st: &mut SyncState, what: String) {
        tracing::error!("{what}; the write-ahead log accepts no more writes");
        self.failed.store(true, Ordering::SeqCst);
        *self.tx.lock().unwrap_or_else(|e| e.into_inner()) = None;
        self.drained.notify_all();
        self.commit_cv.notify_all();
    }
}

/// The log thread (`wal-sync`): writes queued appends as soon as it is woken, and commits them.
///
/// Under `always` it fsyncs as soon as a sync is requested and the previous fsync is over.
/// Appends queued while an fsync runs form the next group: the appender only queues them in
/// memory (it never waits for the disk), and when that fsync returns this thread writes the
/// whole group with one `write(2)` and fsyncs it, after holding it back briefly for the
/// writers just acknowledged ([`Gather`]). The synced LSN is published from this thread, after
/// it releases its state; the node's durability pump wakes the waiting requests.
///
/// Under `batch` it publishes each write as it completes (an acknowledgement follows the
/// `write(2)`, as with Redis's `appendfsync everysec`), and the `wal-flush` thread
/// ([`flush_loop`]) fsyncs what was written every `batch_ms`, so that writes never wait behind
/// that fsync.
fn sync_loop(shared: Arc<Shared>) {
    let mut gather: Option<Gather> = None;
    let mut st = shared.lock();
    // Appends queued before this thread first took the lock wait like any others: for a sync
    // request, a roll, the `batch` timer or shutdown.
    let woken = st.requested > st.fsynced
        || st.shutdown
        || st.flush_asked
        || st.queue.iter().any(|c| c.roll_to.is_some());
    if !woken {
        st = shared.idle(st);
    }
    loop {
        if shared.failed.load(Ordering::SeqCst) {
            return;
        }
        if let Some(g) = &gather {
            let have = st.asked;
            let now = Instant::now();
            let roll = st.queue.iter().any(|c| c.roll_to.is_some());
            if have > 0 && have < g.expect && now < g.until && !st.shutdown && !roll {
                st = shared.log_wait(st, Some(g.until - now));
                continue;
            }
            if have > 0 {
                gather = None;
            }
        }
        if let Some(chunk) = st.queue.pop_front() {
            // Before any fsync or shutdown: queued appends are not in a file yet.
            let Some(guard) = write_popped(&shared, st, chunk) else {
                return;
            };
            st = guard;
            if shared.policy == FsyncPolicy::Batch && st.queue.is_empty() {
                let appended = shared.appended.load(Ordering::Acquire);
                shared.publish(st, appended);
                st = shared.lock();
            }
            continue;
        }
        // Read `appended` while holding the lock, before reading `current`: a segment roll sets
        // `current` (under the lock) before writing, so everything below `appended` is in
        // `current` or in a closed segment that was fsynced when it was closed.
        let appended = shared.appended.load(Ordering::Acquire);
        let pending = shared.policy == FsyncPolicy::Always && st.requested > st.fsynced;
        if !pending {
            if st.shutdown {
                return;
            }
            st = shared.idle(st);
            continue;
        }
        // Everything written is covered by this fsync. A request beyond it is for bytes queued
        // since the queue was drained: the next round writes and syncs them.
        let asks = std::mem::take(&mut st.asked);
        let Some((guard, took)) = shared.commit(st, appended) else {
            return;
        };
        let waiting = guard.asked;
        shared.publish(guard, appended);
        gather = Some(Gather {
            expect: asks + waiting,
            until: Instant::now() + (took / 2).min(MAX_GATHER),
        });
        st = shared.lock();
    }
}

/// Under `batch`, the `wal-flush` thread: every `batch_ms`, fsyncs what the log thread has
/// written since the last fsync. It only reads the current segment and the written LSN (under
/// the lock, together, as the commit does); a roll fsyncs the segment it closes itself.
fn flush_loop(shared: Arc<Shared>) {
    let mut st = shared.lock();
    loop {
        if shared.failed.load(Ordering::SeqCst) || st.shutdown {
            return;
        }
        st = shared
            .flush_cv
            .wait_timeout(st, shared.batch)
            .unwrap_or_else(|e| e.into_inner())
            .0;
        if shared.failed.load(Ordering::SeqCst) || st.shutdown {
            return;
        }
        let appended = shared.appended.load(Ordering::Acquire);
        if appended <= st.fsynced {
            continue;
        }
        let file = st.current.clone();
        let res;
        (st, res) = shared.fsync_unlocked(st, &file);
        match res {
            Ok(()) => {
                shared.stats.commits.fetch_add(1, Ordering::Relaxed);
                st.fsynced = st.fsynced.max(appended);
            }
            Err(e) => {
                shared.fail(&mut st, format!("write-ahead log fsync failed: {e}"));
                return;
            }
        }
    }
}

/// Writes `chunk`, just taken off the queue, marked in progress meanwhile ([`write_chunk`]).
/// Returns the state locked again, or `None` once the failure is recorded (the log accepts no
/// more writes).
fn write_popped<'a>(
    shared: &'a Shared,
    mut st: MutexGuard<'a, SyncState>,
    chunk: Chunk,
) -> Option<MutexGuard<'a, SyncState>> {
    let current = st.current.clone();
    st.writing = Some(chunk.roll_to.is_some());
    drop(st);
    match write_chunk(shared, &current, chunk) {
        Ok(guard) => Some(guard),
        Err(what) => {
            let mut st = shared.lock();
            shared.fail(&mut st, what);
            None
        }
    }
}

/// The sync thread writes one chunk of queued appends: first, for a roll, it fsyncs the current
/// segment, creates the new one and fsyncs the directory, and the new segment becomes current.
/// Returns with the state locked, or the reason it failed.
fn write_chunk<'a>(
    shared: &'a Shared,
    current: &Arc<File>,
    chunk: Chunk,
) -> Result<MutexGuard<'a, SyncState>, String> {
    let mut file = current.clone();
    if let Some(path) = &chunk.roll_to {
        let res = trim(current).and_then(|()| shared.stats.fsync(current));
        res.map_err(|e| format!("fsync of the segment before {} failed: {e}", path.display()))?;
        let dir = path.parent().unwrap_or(Path::new("."));
        file = Arc::new(open_segment(path, true, shared.prealloc).map_err(|e| e.to_string())?);
        sync_dir(dir).map_err(|e| e.to_string())?;
    }
    let t = Instant::now();
    (&*file)
        .write_all(&chunk.bytes)
        .map_err(|e| format!("write-ahead log write failed: {e}"))?;
    shared.stats.write_duration.record(t.elapsed());
    let mut st = shared.lock();
    st.unsynced.records += chunk.records;
    st.unsynced.oldest = Some(
        st.unsynced
            .oldest
            .map_or(chunk.queued, |o| o.min(chunk.queued)),
    );
    // `appended` and `current` change together, under the lock, so the fsync that reads both
    // never misses a byte below `appended`.
    st.current = file;
    st.writing = None;
    shared
        .appended
        .fetch_add(chunk.bytes.len() as u64, Ordering::Release);
    if st.queue.is_empty() && st.drain_waiting > 0 {
        shared.drained.notify_all();
    }
    Ok(st)
}

/// With several commit threads ([`WalOptions::fsync_threads`] > 1 under `always`) there is no
/// separate log thread: each commit thread runs this loop. Queued appends are written first, by
/// one thread at a time and in order; then, when a sync request is not covered by an fsync
/// already started, the thread fsyncs everything written so far. An fsync covers every byte
/// written before it started, so fsyncs that overlap and end out of order are fine: the synced
/// LSN published is the highest any finished fsync covered ([`Shared::publish`] keeps the
/// maximum). The thread that wrote a group fsyncs it itself, so a group costs one wake-up of a
/// waiting thread (none while both are busy): appends still never wait for the disk, they only
/// queue while a write or an fsync runs.
fn commit_loop(shared: Arc<Shared>) {
    let mut st = shared.lock();
    loop {
        if shared.failed.load(Ordering::SeqCst) {
            return;
        }
        if st.writing.is_none()
            && let Some(chunk) = st.queue.pop_front()
        {
            let Some(guard) = write_popped(&shared, st, chunk) else {
                return;
            };
            st = guard;
            continue;
        }
        let appended = shared.appended.load(Ordering::Acquire);
        let due = st.requested > st.started && appended > st.started;
        if !due {
            if st.shutdown && st.queue.is_empty() && st.writing.is_none() {
                // Another commit thread may wait for the write this one just finished.
                shared.commit_cv.notify_all();
                return;
            }
            st.commit_waiting += 1;
            st = shared.commit_cv.wait(st).unwrap_or_else(|e| e.into_inner());
            st.commit_waiting -= 1;
            continue;
        }
        // `appended` was read under the lock, with `current`: see `sync_loop`.
        st.started = appended;
        let Some((guard, _)) = shared.commit(st, appended) else {
            return;
        };
        shared.publish(guard, appended);
        st = shared.lock();
    }
}

/// An open write-ahead log.
///
/// [`append`](Wal::append) and [`request_sync`](Wal::request_sync) are cheap (serialising into
/// memory, a mutex and a condvar signal; under `never`, one `write(2)`) and meant to be called
/// under the lock that orders the records; waiting for durability ([`wait_synced`]) happens
/// outside it.
pub struct Wal {
    dir: PathBuf,
    opts: WalOptions,
    /// Every segment on disk, oldest first; the last one is current.
    segments: Vec<Segment>,
    file: Arc<File>,
    end_lsn: u64,
    buf: Vec<u8>,
    /// Scratch space for serialising records (kept, so no per-record setup).
    arena: rkyv::ser::allocator::Arena,
    shared: Arc<Shared>,
    synced_rx: watch::Receiver<u64>,
    thread: Option<JoinHandle<()>>,
    /// The `batch` policy's flush thread.
    flush: Option<JoinHandle<()>>,
    /// The commit threads, when there are several ([`WalOptions::fsync_threads`]).
    committers: Vec<JoinHandle<()>>,
}

impl std::fmt::Debug for Wal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Wal")
            .field("dir", &self.dir)
            .field("opts", &self.opts)
            .field("segments", &self.segments.len())
            .field("end_lsn", &self.end_lsn)
            .finish_non_exhaustive()
    }
}

/// Opens a segment file for writing at its start (creating it: it must not exist) and
/// allocates `prealloc` bytes for it. Writes go through the file's own offset, not `O_APPEND`:
/// the allocated space past the records is part of the file.
fn open_segment(path: &Path, create: bool, prealloc: u64) -> Result<File, StorageError> {
    let mut o = OpenOptions::new();
    o.write(true);
    if create {
        o.create_new(true);
    }
    let file = o.open(path).map_err(io_err(path))?;
    preallocate(&file, path, prealloc);
    Ok(file)
}

/// The most [`preallocate`] allocates for one segment; a segment configured larger grows past
/// it by appends.
const MAX_PREALLOC: u64 = 256 << 20;

/// Allocates the first `len` bytes of `file` (at most [`MAX_PREALLOC`]) on disk, extending it
/// with zeros, so that writes into them change no file metadata. Only an optimisation: a
/// failure is logged, and what a failed allocation kept (on a full disk, ext4 keeps the blocks
/// it got and grows the file) is given back.
fn preallocate(file: &File, path: &Path, len: u64) {
    let len = len.min(MAX_PREALLOC);
    if len == 0 {
        return;
    }
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::AsRawFd;
        let Ok(before) = file.metadata().map(|m| m.len()) else {
            return;
        };
        let Ok(want) = libc::off_t::try_from(len) else {
            return;
        };
        if before >= len {
            return;
        }
        // SAFETY: `fallocate` on a descriptor `file` owns; mode 0 only allocates blocks and
        // extends the size, the bytes read as zeros.
        if unsafe { libc::fallocate(file.as_raw_fd(), 0, 0, want) } != 0 {
            let error = io::Error::last_os_error();
            let undone = file.set_len(before);
            tracing::warn!(
                segment = %path.display(),
                %error,
                undone = undone.is_ok(),
                "could not preallocate the log segment; appends will grow it"
            );
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = (file, path);
}

/// Cuts a segment being closed to the records written into it (its own write offset), leaving
/// out the space [`preallocate`] reserved past them: only the last segment may end in zeros.
fn trim(file: &File) -> io::Result<()> {
    use std::io::Seek;
    let end = (&*file).stream_position()?;
    if file.metadata()?.len() != end {
        file.set_len(end)?;
    }
    Ok(())
}

/// Reads a segment file. Past its last written block a preallocated segment is allocated but
/// unwritten space, a hole to `SEEK_HOLE`, and reads as zeros: when nothing but such space
/// follows the first hole, the read stops there (recovery takes zeros for the end of the log),
/// instead of reading up to `segment_bytes` of zeros.
fn read_segment(path: &Path) -> Result<Vec<u8>, StorageError> {
    use std::io::{Read, Seek};
    let mut file = File::open(path).map_err(io_err(path))?;
    let len = file.metadata().map_err(io_err(path))?.len();
    let end = data_end(&file, len);
    file.rewind().map_err(io_err(path))?;
    let mut data = Vec::with_capacity(usize::try_from(end).unwrap_or(0));
    file.take(end)
        .read_to_end(&mut data)
        .map_err(io_err(path))?;
    Ok(data)
}

/// Where the data of `file` (of `len` bytes) ends: its first hole, if no data follows it.
/// Moves the file's offset.
fn data_end(file: &File, len: u64) -> u64 {
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::AsRawFd;
        let fd = file.as_raw_fd();
        // SAFETY: `lseek` on a descriptor `file` owns moves only its offset.
        let hole = unsafe { libc::lseek(fd, 0, libc::SEEK_HOLE) };
        match u64::try_from(hole) {
            Ok(h) if h < len => {
                // SAFETY: as above.
                let data = unsafe { libc::lseek(fd, hole, libc::SEEK_DATA) };
                let none_after =
                    data < 0 && io::Error::last_os_error().raw_os_error() == Some(libc::ENXIO);
                if none_after { h } else { len }
            }
            _ => len,
        }
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = file;
        len
    }
}

fn create_segment(dir: &Path, start: u64, prealloc: u64) -> Result<(Segment, File), StorageError> {
    let path = segment_path(dir, start);
    let file = open_segment(&path, true, prealloc)?;
    sync_dir(dir)?;
    Ok((
        Segment {
            start,
            len: 0,
            path,
        },
        file,
    ))
}

impl Wal {
    /// Opens (or creates) the log in `dir` and recovers the records at or after `from_lsn`, the
    /// LSN a snapshot covers (0 without one). A torn tail is truncated; any other damage is
    /// [`StorageError::Corrupt`]. If the log ends before `from_lsn` (its unsynced tail was lost
    /// but the snapshot had it), the old segments are deleted and the log restarts at `from_lsn`.
    pub fn open(
        dir: &Path,
        opts: WalOptions,
        from_lsn: u64,
    ) -> Result<(Wal, Recovery), StorageError> {
        fs::create_dir_all(dir).map_err(io_err(dir))?;
        let Scan {
            mut segments,
            records,
            problem,
            ..
        } = scan(dir, from_lsn, true)?;
        let mut torn_tail = None;
        if let Some(p) = problem {
            let seg = &mut segments[p.seg];
            if !p.torn {
                return Err(StorageError::Corrupt {
                    segment: seg.path.clone(),
                    offset: p.offset,
                    reason: p.reason,
                });
            }
            let dropped = seg.len - p.offset;
            tracing::warn!(
                segment = %seg.path.display(),
                offset = p.offset,
                bytes_dropped = dropped,
                reason = %p.reason,
                "write-ahead log has a torn tail (interrupted write); truncating it"
            );
            truncate(&seg.path, p.offset)?;
            seg.len = p.offset;
            torn_tail = Some(TornTail {
                segment: seg.path.clone(),
                offset: p.offset,
                bytes_dropped: dropped,
            });
        }
        let prealloc = if opts.preallocate {
            opts.segment_bytes
        } else {
            0
        };
        let end = segments.last().map(Segment::end);
        let file = match end {
            Some(end) if end >= from_lsn => {
                use std::io::Seek;
                let seg = segments.last().expect("non-empty");
                let mut file = open_segment(&seg.path, false, prealloc)?;
                file.seek(io::SeekFrom::Start(seg.len))
                    .map_err(io_err(&seg.path))?;
                file
            }
            _ => {
                if let Some(end) = end {
                    tracing::warn!(
                        dir = %dir.display(),
                        log_end = end,
                        snapshot_lsn = from_lsn,
                        "write-ahead log ends before the snapshot; restarting it at the snapshot"
                    );
                    // Delete before creating, so that a crash in between never leaves a gap.
                    for s in segments.drain(..) {
                        fs::remove_file(&s.path).map_err(io_err(&s.path))?;
                    }
                }
                let (seg, file) = create_segment(dir, from_lsn, prealloc)?;
                segments.push(seg);
                file
            }
        };
        let end_lsn = segments.last().expect("non-empty").end();
        let file = Arc::new(file);
        let (tx, synced_rx) = watch::channel(end_lsn);
        let shared = Arc::new(Shared {
            policy: opts.fsync,
            prealloc,
            batch: Duration::from_millis(opts.batch_ms.max(1)),
            state: Mutex::new(SyncState {
                requested: end_lsn,
                synced: end_lsn,
                fsynced: end_lsn,
                started: end_lsn,
                unsynced: Unsynced::default(),
                flush_asked: false,
                asked: 0,
                current: file.clone(),
                queue: VecDeque::new(),
                writing: None,
                fsyncing: 0,
                log_waiting: false,
                commit_waiting: 0,
                drain_waiting: 0,
                shutdown: false,
            }),
            cv: Condvar::new(),
            flush_cv: Condvar::new(),
            overlap: opts.fsync == FsyncPolicy::Always && opts.fsync_threads > 1,
            commit_cv: Condvar::new(),
            drained: Condvar::new(),
            appended: AtomicU64::new(end_lsn),
            stats: Arc::new(WalStats::default()),
            failed: AtomicBool::new(false),
            tx: Mutex::new(Some(tx)),
        });
        // With several commit threads, they write the queue themselves ([`commit_loop`]).
        let thread = if shared.overlap {
            None
        } else {
            let shared = shared.clone();
            Some(
                std::thread::Builder::new()
                    .name("wal-sync".into())
                    .spawn(move || sync_loop(shared))
                    .map_err(io_err(dir))?,
            )
        };
        let flush = if opts.fsync == FsyncPolicy::Batch {
            let shared = shared.clone();
            Some(
                std::thread::Builder::new()
                    .name("wal-flush".into())
                    .spawn(move || flush_loop(shared))
                    .map_err(io_err(dir))?,
            )
        } else {
            None
        };
        let mut committers = Vec::new();
        if shared.overlap {
            for i in 0..opts.fsync_threads {
                let shared = shared.clone();
                committers.push(
                    std::thread::Builder::new()
                        .name(format!("wal-commit-{i}"))
                        .spawn(move || commit_loop(shared))
                        .map_err(io_err(dir))?,
                );
            }
        }
        let wal = Wal {
            dir: dir.to_path_buf(),
            opts,
            segments,
            file,
            end_lsn,
            buf: Vec::new(),
            arena: rkyv::ser::allocator::Arena::new(),
            shared,
            synced_rx,
            thread,
            flush,
            committers,
        };
        Ok((
            wal,
            Recovery {
                records,
                end_lsn,
                torn_tail,
            },
        ))
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The settings.
    pub fn options(&self) -> &WalOptions {
        &self.opts
    }

    /// The LSN after the last appended record.
    pub fn end_lsn(&self) -> u64 {
        self.end_lsn
    }

    fn check_failed(&self) -> Result<(), StorageError> {
        if self.shared.failed.load(Ordering::SeqCst) {
            return Err(StorageError::Failed(
                "an earlier write or fsync failed".into(),
            ));
        }
        Ok(())
    }

    /// Appends `records` and returns the LSN after them. Under `never` they are written here
    /// with one `write(2)`. Under `always` and `batch` too when the log is idle (nothing queued,
    /// no write and no fsync running), so that a lone writer's record is written without waking
    /// the log thread; otherwise the bytes are queued for the log thread, which writes them (and
    /// rolls to a new segment when the current one would grow past `segment_bytes`), and this
    /// call does no I/O. Either way an append never waits behind an fsync. After a failed write
    /// the log refuses further appends.
    pub fn append(&mut self, records: &[Record]) -> Result<u64, StorageError> {
        self.check_failed()?;
        if records.is_empty() {
            return Ok(self.end_lsn);
        }
        self.buf.clear();
        for r in records {
            // Serialised in place after a header that is filled in afterwards: positions (and
            // so rkyv's alignment padding) count from the record's first byte, exactly as when
            // it is serialised on its own, so the bytes are the same.
            let header = self.buf.len();
            self.buf.extend_from_slice(&[0; HEADER]);
            let start = self.buf.len();
            rkyv::api::low::to_bytes_in_with_alloc::<_, _, rancor::Error>(
                &to_twin(r),
                RecordWriter {
                    buf: &mut self.buf,
                    start,
                },
                self.arena.acquire(),
            )
            .expect("serialising into memory cannot fail");
            let body = &self.buf[start..];
            let len = u32::try_from(body.len()).map_err(|_| {
                StorageError::Failed(format!("record of {} bytes is too large", body.len()))
            })?;
            let crc = crc32fast::hash(body);
            self.buf[header..header + 4].copy_from_slice(&len.to_le_bytes());
            self.buf[header + 4..start].copy_from_slice(&crc.to_le_bytes());
        }
        if self.opts.fsync != FsyncPolicy::Never {
            return self.queue(records.len() as u64);
        }
        if self.segment_full() {
            self.roll_in_place()?;
        }
        let cur = self.segments.last_mut().expect("a current segment");
        if let Err(e) = (&*self.file).write_all(&self.buf) {
            let mut st = self.shared.lock();
            self.shared.fail(
                &mut st,
                format!(
                    "write-ahead log write to {} failed: {e}",
                    cur.path.display()
                ),
            );
            return Err(StorageError::Io {
                path: cur.path.clone(),
                source: e,
            });
        }
        cur.len += self.buf.len() as u64;
        self.end_lsn += self.buf.len() as u64;
        self.shared.appended.store(self.end_lsn, Ordering::Release);
        Ok(self.end_lsn)
    }

    /// Whether the records in `buf` would take the current segment past `segment_bytes`.
    fn segment_full(&self) -> bool {
        let cur = self.segments.last().expect("a current segment");
        cur.len > 0 && cur.len + self.buf.len() as u64 > self.opts.segment_bytes
    }

    /// Queues the serialised records in `buf` for the sync thread, behind a roll to a new
    /// segment when the current one is full (the sync thread is woken for a roll; plain bytes
    /// wait for the next sync request or the `batch` timer), or writes them here when the log is
    /// idle ([`Wal::append`]). Returns the LSN after them.
    fn queue(&mut self, records: u64) -> Result<u64, StorageError> {
        let shared = self.shared.clone();
        let now = Instant::now();
        let mut st = shared.lock();
        let len = self.buf.len() as u64;
        let idle = st.queue.is_empty() && st.writing.is_none() && st.fsyncing == 0;
        if idle && !self.segment_full() {
            let file = st.current.clone();
            st.writing = Some(false);
            drop(st);
            let t = Instant::now();
            let res = (&*file).write_all(&self.buf);
            shared.stats.write_duration.record(t.elapsed());
            let mut st = shared.lock();
            st.writing = None;
            if st.drain_waiting > 0 {
                shared.drained.notify_all();
            }
            let cur = self.segments.last_mut().expect("a current segment");
            if let Err(e) = res {
                let what = format!(
                    "write-ahead log write to {} failed: {e}",
                    cur.path.display()
                );
                shared.fail(&mut st, what);
                return Err(StorageError::Io {
                    path: cur.path.clone(),
                    source: e,
                });
            }
            cur.len += len;
            self.end_lsn += len;
            st.unsynced.records += records;
            st.unsynced.oldest = Some(st.unsynced.oldest.map_or(now, |o| o.min(now)));
            let appended = shared.appended.fetch_add(len, Ordering::Release) + len;
            if shared.policy == FsyncPolicy::Batch {
                // Acknowledged once written, as the log thread does for what it writes.
                shared.publish(st, appended);
            }
            return Ok(self.end_lsn);
        }
        if self.segment_full() {
            let start = self.end_lsn;
            let path = segment_path(&self.dir, start);
            st.queue.push_back(Chunk {
                roll_to: Some(path.clone()),
                bytes: self.buf.clone(),
                records,
                queued: now,
            });
            self.segments.push(Segment {
                start,
                len: 0,
                path,
            });
            self.shared.wake_writer(st);
        } else {
            match st.queue.back_mut() {
                Some(back) => {
                    back.bytes.extend_from_slice(&self.buf);
                    back.records += records;
                }
                None => st.queue.push_back(Chunk {
                    roll_to: None,
                    bytes: self.buf.clone(),
                    records,
                    queued: now,
                }),
            }
        }
        self.segments.last_mut().expect("a current segment").len += len;
        self.end_lsn += len;
        Ok(self.end_lsn)
    }

    /// Under [`FsyncPolicy::Never`]: starts the next segment in place (no fsync promised, none
    /// made).
    fn roll_in_place(&mut self) -> Result<(), StorageError> {
        let start = self.end_lsn;
        let path = segment_path(&self.dir, start);
        let old = self.segments.last().expect("a current segment");
        trim(&self.file).map_err(io_err(&old.path))?;
        let file = Arc::new(open_segment(&path, true, self.shared.prealloc)?);
        self.shared.lock().current = file.clone();
        self.file = file;
        self.segments.push(Segment {
            start,
            len: 0,
            path,
        });
        Ok(())
    }

    /// Asks for everything up to `lsn` (an LSN returned by [`Wal::append`]) to become durable
    /// under the policy in force. Does not block. Under [`FsyncPolicy::Never`] the LSN is
    /// marked synced at once; under [`FsyncPolicy::Batch`], once it is written (at once if it
    /// already is).
    pub fn request_sync(&self, lsn: u64) {
        let lsn = lsn.min(self.end_lsn);
        let mut st = self.shared.lock();
        let written = self.opts.fsync == FsyncPolicy::Never
            || (self.opts.fsync == FsyncPolicy::Batch
                && self.shared.appended.load(Ordering::Acquire) >= lsn);
        if written {
            self.shared.publish(st, lsn);
            return;
        }
        if lsn > st.requested {
            st.requested = lsn;
            st.asked += 1;
            self.shared.wake_writer(st);
        }
    }

    /// A receiver of the synced LSN (everything below it is durable).
    pub fn synced(&self) -> watch::Receiver<u64> {
        self.synced_rx.clone()
    }

    /// The synced LSN now.
    pub fn synced_lsn(&self) -> u64 {
        *self.synced_rx.borrow()
    }

    /// Fsyncs the log now, from the calling thread (blocking), and publishes the synced LSN.
    /// For shutdown; see [`Wal::sync_handle`] to do it without holding the log.
    pub fn sync_now(&self) -> Result<u64, StorageError> {
        self.sync_handle().sync()
    }

    /// What [`SyncHandle::sync`] needs to make everything appended so far durable, taken so
    /// that the blocking fsync can run on another thread without the log (or the lock around it).
    pub fn sync_handle(&self) -> SyncHandle {
        SyncHandle {
            shared: self.shared.clone(),
            target: self.end_lsn,
            dir: self.dir.clone(),
        }
    }

    /// Number of fsyncs issued so far (sync thread, segment rolls and [`Wal::sync_now`]).
    pub fn fsyncs(&self) -> u64 {
        self.shared.stats.fsyncs.load(Ordering::Relaxed)
    }

    /// The log's group-commit figures, shared with its threads (readable without the log).
    pub fn stats(&self) -> Arc<WalStats> {
        self.shared.stats.clone()
    }

    /// Deletes the closed segments that end at or before `lsn` (a snapshot covers them). The
    /// current segment is never deleted. Returns the number of segments deleted.
    pub fn prune_before(&mut self, lsn: u64) -> Result<usize, StorageError> {
        let paths = self.detach_before(lsn);
        remove_segments(&paths)?;
        Ok(paths.len())
    }

    /// Forgets the closed segments that end at or before `lsn` and returns their files, for
    /// [`remove_segments`] to delete without holding the log. Left on disk, they are harmless:
    /// recovery starts at the snapshot's LSN and skips them.
    pub fn detach_before(&mut self, lsn: u64) -> Vec<PathBuf> {
        // The current segment and those of queued rolls (not created yet) stay.
        let st = self.shared.lock();
        let pending = st.queue.iter().filter(|c| c.roll_to.is_some()).count()
            + usize::from(st.writing == Some(true));
        drop(st);
        let n = self.segments.len() - 1 - pending;
        let k = self.segments[..n]
            .iter()
            .take_while(|s| s.end() <= lsn)
            .count();
        self.segments.drain(..k).map(|s| s.path).collect()
    }

    /// Bytes on disk across all segments.
    pub fn disk_bytes(&self) -> u64 {
        self.segments.iter().map(|s| s.len).sum()
    }

    /// Number of segment files.
    pub fn segment_count(&self) -> usize {
        self.segments.len()
    }
}

impl Drop for Wal {
    fn drop(&mut self) {
        self.shared.lock().shutdown = true;
        self.shared.cv.notify_one();
        self.shared.flush_cv.notify_one();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        if let Some(t) = self.flush.take() {
            let _ = t.join();
        }
        // The log thread has written everything queued (with several commit threads, they
        // write it themselves): the commit threads sync what was requested of it and stop.
        self.shared.commit_cv.notify_all();
        for t in self.committers.drain(..) {
            let _ = t.join();
        }
        // Everything queued is written: a log closed in order ends at its last record, as one
        // that never preallocated. (After a crash recovery finds the zeros instead.)
        if !self.shared.failed.load(Ordering::SeqCst) {
            let current = self.shared.lock().current.clone();
            if let Err(e) = trim(&current) {
                tracing::warn!(dir = %self.dir.display(), error = %e, "could not trim the log's last segment");
            }
        }
    }
}

/// Deletes log segments (oldest first) that [`Wal::detach_before`] let go. Blocking: call it
/// from a blocking thread.
pub fn remove_segments(paths: &[PathBuf]) -> Result<(), StorageError> {
    for p in paths {
        fs::remove_file(p).map_err(io_err(p))?;
    }
    Ok(())
}

/// Makes everything appended before it was taken durable ([`Wal::sync_handle`]).
pub struct SyncHandle {
    shared: Arc<Shared>,
    target: u64,
    dir: PathBuf,
}

impl SyncHandle {
    /// Waits until the sync thread has written every queued append, fsyncs the current segment
    /// and publishes the synced LSN. Blocking.
    pub fn sync(self) -> Result<u64, StorageError> {
        let failed = || StorageError::Failed("an earlier write or fsync failed".into());
        let mut st = self.shared.lock();
        if !st.queue.is_empty() {
            st.flush_asked = true;
            self.shared.cv.notify_one();
            self.shared.commit_cv.notify_one();
        }
        while (!st.queue.is_empty() || st.writing.is_some())
            && !self.shared.failed.load(Ordering::SeqCst)
        {
            st.drain_waiting += 1;
            st = self
                .shared
                .drained
                .wait(st)
                .unwrap_or_else(|e| e.into_inner());
            st.drain_waiting -= 1;
        }
        if self.shared.failed.load(Ordering::SeqCst) {
            return Err(failed());
        }
        let file = st.current.clone();
        drop(st);
        let res = self.shared.stats.fsync(&file);
        let mut st = self.shared.lock();
        match res {
            Ok(()) => {
                st.fsynced = st.fsynced.max(self.target);
                self.shared.publish(st, self.target);
                Ok(self.target)
            }
            Err(e) => {
                self.shared.fail(
                    &mut st,
                    format!(
                        "fsync of the write-ahead log in {} failed: {e}",
                        self.dir.display()
                    ),
                );
                Err(StorageError::Io {
                    path: self.dir,
                    source: e,
                })
            }
        }
    }
}

/// Waits until everything up to `lsn` is durable. Fails with [`StorageError::SyncStopped`] when
/// the sync thread stopped (failed fsync, or the log was dropped) first.
pub async fn wait_synced(rx: &mut watch::Receiver<u64>, lsn: u64) -> Result<(), StorageError> {
    rx.wait_for(|&v| v >= lsn)
        .await
        .map(|_| ())
        .map_err(|_| StorageError::SyncStopped)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    fn upd(ts: u64, key: &str, value: Option<&str>) -> Record {
        Record::Update(Update {
            key: Bytes::copy_from_slice(key.as_bytes()),
            value: value.map(|v| Bytes::copy_from_slice(v.as_bytes())),
            version: Version::new(ts, (ts % 3) as u16),
            deps: VClock::from_vec(vec![ts, ts / 2, 0]),
        })
    }

    fn sample(n: u64) -> Vec<Record> {
        (1..=n)
            .map(|i| match i % 5 {
                0 => Record::Marker {
                    origin: 1,
                    ts: i * 10,
                },
                4 => Record::ClockLease(i * 100),
                3 => upd(i, &format!("k{i}"), None),
                _ => upd(i, &format!("key-{i}"), Some(&"v".repeat(i as usize % 40))),
            })
            .collect()
    }

    fn opts(segment_bytes: u64) -> WalOptions {
        WalOptions {
            segment_bytes,
            ..WalOptions::default()
        }
    }

    fn last_segment(dir: &Path) -> PathBuf {
        list_segments(dir).unwrap().last().unwrap().path.clone()
    }

    /// Where the records on disk end (a preallocated segment is longer than that).
    fn written(dir: &Path) -> u64 {
        let scan = scan(dir, 0, false).unwrap();
        assert!(scan.problem.is_none());
        scan.segments.last().map_or(0, Segment::end)
    }

    #[test]
    fn options_parse_from_toml_with_defaults() {
        let o: WalOptions = toml::from_str("fsync = \"batch\"\nbatch_ms = 2").unwrap();
        assert_eq!(o.fsync, FsyncPolicy::Batch);
        assert_eq!(o.batch_ms, 2);
        assert_eq!(o.segment_bytes, 64 << 20);
        let d: WalOptions = toml::from_str("").unwrap();
        assert_eq!(d, WalOptions::default());
        assert!(toml::from_str::<WalOptions>("fsynk = \"never\"").is_err());
        assert!(toml::from_str::<WalOptions>("fsync = \"sometimes\"").is_err());
    }

    #[test]
    fn roundtrip_across_segment_rolls_and_from_lsn() {
        let dir = tempfile::tempdir().unwrap();
        let recs = sample(200);
        let mut lsns = Vec::new();
        {
            let (mut wal, rec) = Wal::open(dir.path(), opts(512), 0).unwrap();
            assert!(rec.records.is_empty());
            assert_eq!(rec.end_lsn, 0);
            let mut last = 0;
            for chunk in recs.chunks(3) {
                let lsn = wal.append(chunk).unwrap();
                assert!(lsn > last, "LSNs grow");
                last = lsn;
                lsns.push(lsn);
            }
            assert!(wal.segment_count() > 5, "rolled: {}", wal.segment_count());
            assert_eq!(wal.disk_bytes(), last);
            wal.request_sync(last);
            let mut rx = wal.synced();
            tokio::runtime::Builder::new_current_thread()
                .build()
                .unwrap()
                .block_on(wait_synced(&mut rx, last))
                .unwrap();
        }
        let (mut wal, rec) = Wal::open(dir.path(), opts(512), 0).unwrap();
        assert_eq!(rec.records, recs);
        assert_eq!(rec.end_lsn, *lsns.last().unwrap());
        assert!(rec.torn_tail.is_none());
        // Appending after reopen continues the LSN sequence.
        let more = sample(3);
        let end = wal.append(&more).unwrap();
        assert!(end > rec.end_lsn);
        drop(wal);
        // Skipping: from an LSN returned by append, only later chunks come back.
        let cut = 20; // chunks
        let (_, rec) = Wal::open(dir.path(), opts(512), lsns[cut - 1]).unwrap();
        let mut expect = recs[cut * 3..].to_vec();
        expect.extend(more);
        assert_eq!(rec.records, expect);
    }

    #[test]
    fn records_are_serialised_in_place_exactly_as_on_their_own() {
        let dir = tempfile::tempdir().unwrap();
        let recs = sample(40);
        let (mut wal, _) = Wal::open(dir.path(), opts(64 << 20), 0).unwrap();
        wal.append(&recs).unwrap();
        drop(wal);
        let file = std::fs::read(last_segment(dir.path())).unwrap();
        let mut at = 0;
        for r in &recs {
            let alone = rkyv::to_bytes::<rancor::Error>(&to_twin(r)).unwrap();
            let len = u32::from_le_bytes(file[at..at + 4].try_into().unwrap()) as usize;
            let crc = u32::from_le_bytes(file[at + 4..at + HEADER].try_into().unwrap());
            let body = &file[at + HEADER..at + HEADER + len];
            assert_eq!(body, &alone[..], "record {r:?}");
            assert_eq!(crc, crc32fast::hash(&alone));
            at += HEADER + len;
        }
        assert_eq!(at, file.len());
    }

    #[test]
    fn prune_deletes_covered_segments_only() {
        let dir = tempfile::tempdir().unwrap();
        let (mut wal, _) = Wal::open(dir.path(), opts(256), 0).unwrap();
        let mut lsns = Vec::new();
        for r in sample(100).chunks(2) {
            lsns.push(wal.append(r).unwrap());
        }
        // As after a snapshot, which waits until the log is durable: every roll is done.
        wal.sync_now().unwrap();
        let before = wal.segment_count();
        let mid = lsns[lsns.len() / 2];
        let deleted = wal.prune_before(mid).unwrap();
        assert!(deleted > 0 && deleted < before);
        assert_eq!(wal.segment_count(), before - deleted);
        drop(wal);
        let (_, rec) = Wal::open(dir.path(), opts(256), mid).unwrap();
        assert_eq!(
            rec.records,
            sample(100)[(lsns.len() / 2 + 1) * 2..].to_vec()
        );
        // Without the snapshot's LSN the missing prefix is reported.
        let err = Wal::open(dir.path(), opts(256), 0).unwrap_err();
        assert!(matches!(err, StorageError::Inconsistent { .. }), "{err}");
    }

    #[test]
    fn log_behind_snapshot_restarts_at_the_snapshot() {
        let dir = tempfile::tempdir().unwrap();
        let (mut wal, _) = Wal::open(dir.path(), opts(1 << 20), 0).unwrap();
        let end = wal.append(&sample(10)).unwrap();
        drop(wal);
        // Damage inside the part the snapshot covers does not matter.
        let seg = last_segment(dir.path());
        let mut data = fs::read(&seg).unwrap();
        data[20] ^= 1;
        fs::write(&seg, &data).unwrap();
        let (mut wal, rec) = Wal::open(dir.path(), opts(1 << 20), end + 1000).unwrap();
        assert!(!seg.exists(), "old segment deleted");
        assert!(rec.records.is_empty());
        assert_eq!(rec.end_lsn, end + 1000);
        let e2 = wal.append(&sample(2)).unwrap();
        drop(wal);
        let (_, rec) = Wal::open(dir.path(), opts(1 << 20), end + 1000).unwrap();
        assert_eq!(rec.records, sample(2));
        assert_eq!(rec.end_lsn, e2);
    }

    #[test]
    fn torn_tail_is_truncated_and_appends_continue() {
        for chop in [1u64, 5, 13] {
            let dir = tempfile::tempdir().unwrap();
            let recs = sample(30);
            let (mut wal, _) = Wal::open(dir.path(), opts(1024), 0).unwrap();
            for r in recs.chunks(1) {
                wal.append(r).unwrap();
            }
            wal.sync_now().unwrap();
            drop(wal);
            let seg = last_segment(dir.path());
            let len = fs::metadata(&seg).unwrap().len();
            OpenOptions::new()
                .write(true)
                .open(&seg)
                .unwrap()
                .set_len(len - chop)
                .unwrap();
            let (mut wal, rec) = Wal::open(dir.path(), opts(1024), 0).unwrap();
            let torn = rec.torn_tail.expect("torn tail reported");
            assert_eq!(torn.segment, seg);
            assert_eq!(rec.records, recs[..29].to_vec(), "chop {chop}");
            assert_eq!(torn.offset + torn.bytes_dropped, len - chop);
            let after = fs::read(&seg).unwrap().split_off(torn.offset as usize);
            assert!(after.iter().all(|&b| b == 0), "cut at the torn record");
            wal.append(&recs[29..]).unwrap();
            drop(wal);
            let (_, rec) = Wal::open(dir.path(), opts(1024), 0).unwrap();
            assert!(rec.torn_tail.is_none());
            assert_eq!(rec.records, recs);
        }
    }

    #[test]
    fn preallocated_segments_end_at_their_zeros_after_a_crash() {
        let dir = tempfile::tempdir().unwrap();
        let recs = sample(60);
        let seg_bytes = 1024;
        let (mut wal, _) = Wal::open(dir.path(), opts(seg_bytes), 0).unwrap();
        for r in recs[..40].chunks(2) {
            wal.append(r).unwrap();
        }
        let end = wal.sync_now().unwrap();
        let segs = list_segments(dir.path()).unwrap();
        assert!(segs.len() >= 3, "rolled: {segs:?}");
        // Closed segments were cut to their records; the current one owns its space.
        for pair in segs.windows(2) {
            assert_eq!(pair[0].end(), pair[1].start, "{segs:?}");
        }
        let last = segs.last().unwrap();
        assert_eq!(last.len, seg_bytes, "the current segment is preallocated");
        assert!(last.start < end && end < last.start + seg_bytes);
        // A crash: the log is never closed, its last segment keeps its zeros. And a closed
        // segment whose cut at the roll never reached the disk ends in zeros too.
        std::mem::forget(wal);
        let first = OpenOptions::new().write(true).open(&segs[0].path).unwrap();
        first.set_len(seg_bytes).unwrap();
        assert!(segs[0].len < seg_bytes);
        // Not read when recovery starts past it, it still counts only its records.
        let (wal, _) = Wal::open(dir.path(), opts(seg_bytes), segs[1].start).unwrap();
        assert_eq!(wal.segments[0].end(), segs[1].start);
        std::mem::forget(wal);
        let (mut wal, rec) = Wal::open(dir.path(), opts(seg_bytes), 0).unwrap();
        assert!(rec.torn_tail.is_none(), "zeros are not a torn tail");
        assert_eq!(rec.records, recs[..40].to_vec());
        assert_eq!(rec.end_lsn, end);
        // Appends continue at the end of the records, not past the zeros.
        for r in recs[40..50].chunks(2) {
            wal.append(r).unwrap();
        }
        let end = wal.sync_now().unwrap();
        std::mem::forget(wal);
        // A write torn inside the zeros: a header whose payload never made it.
        let seg = last_segment(dir.path());
        let mut f = OpenOptions::new().write(true).open(&seg).unwrap();
        use std::io::{Seek, SeekFrom};
        f.seek(SeekFrom::Start(end - lsn_of(&seg))).unwrap();
        f.write_all(&90u32.to_le_bytes()).unwrap();
        f.write_all(&0x0bad_cafeu32.to_le_bytes()).unwrap();
        f.write_all(&[0x55; 30]).unwrap();
        drop(f);
        let (wal, rec) = Wal::open(dir.path(), opts(seg_bytes), 0).unwrap();
        let torn = rec.torn_tail.expect("the torn record is reported");
        assert_eq!(lsn_of(&seg) + torn.offset, end);
        assert_eq!(rec.records, recs[..50].to_vec());
        assert_eq!(
            fs::metadata(&seg).unwrap().len(),
            seg_bytes,
            "preallocated again after the cut"
        );
        // Closed in order, the log ends at its last record, as one never preallocated.
        drop(wal);
        assert_eq!(fs::metadata(&seg).unwrap().len(), end - lsn_of(&seg));
        let (_, rec) = Wal::open(dir.path(), opts(seg_bytes), 0).unwrap();
        assert_eq!(rec.records, recs[..50].to_vec());
        // Without preallocation a new segment holds only what was written.
        let plain = tempfile::tempdir().unwrap();
        let o = WalOptions {
            preallocate: false,
            ..opts(seg_bytes)
        };
        let (mut wal, _) = Wal::open(plain.path(), o, 0).unwrap();
        let end = wal.append(&recs[..3]).unwrap();
        wal.sync_now().unwrap();
        assert_eq!(fs::metadata(last_segment(plain.path())).unwrap().len(), end);
    }

    /// The start LSN of the segment file `seg`, as the log itself reads it from the name.
    fn lsn_of(seg: &Path) -> u64 {
        let segs = list_segments(seg.parent().unwrap()).unwrap();
        segs.iter().find(|s| s.path == seg).unwrap().start
    }

    #[test]
    fn a_page_lost_in_a_crash_is_a_torn_tail_but_damage_inside_records_is_not() {
        let recs = sample(300);
        let setup = || {
            let dir = tempfile::tempdir().unwrap();
            let (mut wal, _) = Wal::open(dir.path(), opts(1 << 20), 0).unwrap();
            let mut lsns = Vec::new();
            for r in recs.chunks(1) {
                lsns.push(wal.append(r).unwrap());
            }
            wal.sync_now().unwrap();
            // A machine crash: the segment keeps its preallocated space.
            std::mem::forget(wal);
            let seg = last_segment(dir.path());
            let data = fs::read(&seg).unwrap();
            // A record that starts inside the second page, with more than a page after it.
            let k = lsns.iter().position(|&l| l as usize > PAGE + 100).unwrap() + 1;
            assert!(
                lsns[recs.len() - 1] as usize > 3 * PAGE,
                "records span pages"
            );
            (dir, seg, data, lsns, k)
        };
        // The second page's write was lost from record k on: zeros to the page's end, while
        // the third page holds later records.
        let (dir, seg, mut data, lsns, k) = setup();
        let at = lsns[k - 1] as usize;
        data[at..2 * PAGE].fill(0);
        fs::write(&seg, &data).unwrap();
        let (_, rec) = Wal::open(dir.path(), opts(1 << 20), 0).unwrap();
        let torn = rec.torn_tail.expect("a torn tail, not corruption");
        assert_eq!(torn.offset, at as u64);
        assert_eq!(rec.records, recs[..k].to_vec());
        // Zeros that start inside a record are not a lost page (a page keeps whole writes):
        // with valid records after them, that is corruption.
        let (dir, seg, mut data, lsns, k) = setup();
        let at = lsns[k - 1] as usize;
        data[at + HEADER + 3..2 * PAGE].fill(0);
        fs::write(&seg, &data).unwrap();
        let err = Wal::open(dir.path(), opts(1 << 20), 0).unwrap_err();
        assert!(matches!(err, StorageError::Corrupt { .. }), "{err}");
        // Nor is a length flipped in an acknowledged record, whatever zeros follow later.
        let (dir, seg, mut data, lsns, _) = setup();
        data[lsns[9] as usize + 3] ^= 1;
        fs::write(&seg, &data).unwrap();
        let err = Wal::open(dir.path(), opts(1 << 20), 0).unwrap_err();
        assert!(matches!(err, StorageError::Corrupt { .. }), "{err}");
        // A flipped byte in the same record, with no zeros reaching the page's end, is
        // corruption: valid records follow it.
        let (dir, seg, mut data, lsns, k) = setup();
        data[lsns[k - 1] as usize + HEADER + 3] ^= 0x40;
        fs::write(&seg, &data).unwrap();
        let err = Wal::open(dir.path(), opts(1 << 20), 0).unwrap_err();
        assert!(matches!(err, StorageError::Corrupt { .. }), "{err}");
    }

    #[test]
    fn half_header_and_garbage_tail_are_torn() {
        let dir = tempfile::tempdir().unwrap();
        let recs = sample(10);
        let (mut wal, _) = Wal::open(dir.path(), opts(1 << 20), 0).unwrap();
        let end = wal.append(&recs).unwrap();
        drop(wal);
        let seg = last_segment(dir.path());
        // Half a header.
        let mut f = OpenOptions::new().append(true).open(&seg).unwrap();
        f.write_all(&[7, 0]).unwrap();
        drop(f);
        let (wal, rec) = Wal::open(dir.path(), opts(1 << 20), 0).unwrap();
        assert_eq!(rec.torn_tail.unwrap().bytes_dropped, 2);
        assert_eq!(rec.records, recs);
        drop(wal);
        // A full-length record whose payload never made it (zeros): CRC mismatch at the end.
        let mut f = OpenOptions::new().append(true).open(&seg).unwrap();
        f.write_all(&40u32.to_le_bytes()).unwrap();
        f.write_all(&0xdead_beefu32.to_le_bytes()).unwrap();
        f.write_all(&[0u8; 40]).unwrap();
        // And zero-filled blocks after it.
        f.write_all(&[0u8; 100]).unwrap();
        drop(f);
        let (_, rec) = Wal::open(dir.path(), opts(1 << 20), 0).unwrap();
        let torn = rec.torn_tail.unwrap();
        assert_eq!(torn.offset, end);
        assert_eq!(torn.bytes_dropped, 148);
        assert_eq!(rec.records, recs);
    }

    #[test]
    fn corrupt_record_in_the_middle_fails_and_repair_cuts_there() {
        let dir = tempfile::tempdir().unwrap();
        let recs = sample(40);
        let (mut wal, _) = Wal::open(dir.path(), opts(1 << 20), 0).unwrap();
        let mut lsns = Vec::new();
        for r in recs.chunks(1) {
            lsns.push(wal.append(r).unwrap());
        }
        drop(wal);
        let seg = last_segment(dir.path());
        let mut data = fs::read(&seg).unwrap();
        // Flip a payload byte of record #5 (starts at lsns[4]).
        let at = lsns[4] as usize + HEADER + 3;
        data[at] ^= 0x40;
        fs::write(&seg, &data).unwrap();
        let err = Wal::open(dir.path(), opts(1 << 20), 0).unwrap_err();
        let msg = err.to_string();
        assert!(
            matches!(&err, StorageError::Corrupt { segment, offset, .. }
                if *segment == seg && *offset == lsns[4]),
            "{msg}"
        );
        assert!(msg.contains(&seg.display().to_string()), "{msg}");
        assert!(msg.contains(&format!("offset {}", lsns[4])), "{msg}");
        assert!(msg.contains("causalkv repair --config"), "{msg}");
        assert!(msg.contains("CRC mismatch"), "{msg}");

        let report = repair(dir.path(), 0).unwrap();
        println!("{report}");
        assert_eq!(report.truncated, Some((seg.clone(), lsns[4])));
        assert_eq!(report.records_kept, 5);
        assert_eq!(report.end_lsn, lsns[4]);
        let (mut wal, rec) = Wal::open(dir.path(), opts(1 << 20), 0).unwrap();
        assert_eq!(rec.records, recs[..5].to_vec());
        assert!(rec.torn_tail.is_none());
        wal.append(&recs[5..6]).unwrap();
        // A second repair finds nothing to do.
        drop(wal);
        let again = repair(dir.path(), 0).unwrap();
        assert!(again.reason.is_none(), "{again}");
        assert_eq!(again.records_kept, 6);
    }

    #[test]
    fn corruption_in_an_earlier_segment_is_not_torn_and_repair_drops_later_segments() {
        let dir = tempfile::tempdir().unwrap();
        let recs = sample(60);
        let (mut wal, _) = Wal::open(dir.path(), opts(400), 0).unwrap();
        for r in recs.chunks(2) {
            wal.append(r).unwrap();
        }
        drop(wal);
        let segs = list_segments(dir.path()).unwrap();
        assert!(segs.len() >= 3);
        // Cut the tail of the first segment: it is not the last one, so this is corruption.
        let first = &segs[0];
        OpenOptions::new()
            .write(true)
            .open(&first.path)
            .unwrap()
            .set_len(first.len - 3)
            .unwrap();
        let err = Wal::open(dir.path(), opts(400), 0).unwrap_err();
        assert!(matches!(err, StorageError::Corrupt { .. }), "{err}");
        let report = repair(dir.path(), 0).unwrap();
        assert_eq!(report.deleted_segments.len(), segs.len() - 1);
        let (_, rec) = Wal::open(dir.path(), opts(400), 0).unwrap();
        assert!(!rec.records.is_empty());
        assert_eq!(rec.records, recs[..rec.records.len()].to_vec());
    }

    #[test]
    fn appends_never_write_while_an_fsync_runs() {
        // Under `always`, while an fsync runs the appending thread only queues: the segment does
        // not grow until the log thread writes (a sync asked for). An idle log is written in
        // place, as under `never` always is. One commit thread: the log thread writes the queue
        // only when asked (commit threads write whatever is queued whenever they are awake, a
        // startup race for this test).
        let dir = tempfile::tempdir().unwrap();
        let one = WalOptions {
            fsync_threads: 1,
            ..opts(1 << 20)
        };
        let (mut wal, _) = Wal::open(dir.path(), one, 0).unwrap();
        let on_disk = || written(dir.path());
        let first = wal.append(&sample(3)).unwrap();
        assert_eq!(on_disk(), first, "an idle log is written by the appender");
        wal.shared.lock().fsyncing += 1;
        let lsn = wal.append(&sample(10)).unwrap();
        assert!(lsn > first);
        assert_eq!(on_disk(), first, "the appender wrote while an fsync ran");
        // Queued bytes stay queued after the fsync ends: the next append goes behind them.
        wal.shared.lock().fsyncing -= 1;
        let last = wal.append(&sample(2)).unwrap();
        assert_eq!(on_disk(), first, "an append overtook queued bytes");
        assert_eq!(wal.sync_now().unwrap(), last);
        assert_eq!(on_disk(), last);
        drop(wal);
        let (_, rec) = Wal::open(dir.path(), one, 0).unwrap();
        assert_eq!(rec.records.len(), 15);

        let never = tempfile::tempdir().unwrap();
        let o = WalOptions {
            fsync: FsyncPolicy::Never,
            ..opts(1 << 20)
        };
        let (mut wal, _) = Wal::open(never.path(), o, 0).unwrap();
        let lsn = wal.append(&sample(10)).unwrap();
        assert_eq!(written(never.path()), lsn);
    }

    #[test]
    fn group_commit_shares_fsyncs() {
        group_commit(1);
        group_commit(WalOptions::default().fsync_threads);
    }

    #[test]
    fn overlapping_fsyncs_commit_every_write_and_recover_it() {
        let dir = group_commit(4);
        let (_, rec) = Wal::open(dir.path(), WalOptions::default(), 0).unwrap();
        assert_eq!(rec.records.len(), 400);
        let mut ids: Vec<u64> = rec
            .records
            .iter()
            .map(|r| match r {
                Record::Update(u) => u.version.ts,
                other => panic!("unexpected record {other:?}"),
            })
            .collect();
        ids.sort_unstable();
        ids.dedup();
        assert_eq!(
            ids.len(),
            400,
            "every acknowledged write is in the log once"
        );
    }

    /// 16 writers × 25 durable writes with `fsync_threads` commit threads; checks that writes
    /// share fsyncs and every record was committed. Returns the log's directory.
    fn group_commit(fsync_threads: u32) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        let o = WalOptions {
            fsync_threads,
            ..WalOptions::default()
        };
        let (wal, _) = Wal::open(dir.path(), o, 0).unwrap();
        let wal = Arc::new(Mutex::new(wal));
        let writes = Arc::new(AtomicUsize::new(0));
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(4)
            .build()
            .unwrap();
        rt.block_on(async {
            let mut tasks = Vec::new();
            for t in 0..16u64 {
                let wal = wal.clone();
                let writes = writes.clone();
                tasks.push(tokio::spawn(async move {
                    for i in 0..25u64 {
                        let (lsn, mut rx) = {
                            let mut w = wal.lock().unwrap();
                            let lsn = w.append(&[upd(t * 1000 + i, "k", Some("v"))]).unwrap();
                            w.request_sync(lsn);
                            (lsn, w.synced())
                        };
                        wait_synced(&mut rx, lsn).await.unwrap();
                        writes.fetch_add(1, Ordering::Relaxed);
                    }
                }));
            }
            for t in tasks {
                t.await.unwrap();
            }
        });
        let w = Arc::try_unwrap(wal).ok().unwrap().into_inner().unwrap();
        assert_eq!(w.synced_lsn(), w.end_lsn());
        // Once the log is closed its threads are done: an fsync that overlapped a later one can
        // finish (and count) after the waiters it covers were woken by the later one.
        let stats = w.stats();
        drop(w);
        let (n, f) = (
            writes.load(Ordering::Relaxed) as u64,
            stats.fsyncs.load(Ordering::Relaxed),
        );
        println!(
            "group commit, {fsync_threads} commit thread(s): {n} writes, {f} fsyncs, {:.2} writes \
             per fsync",
            n as f64 / f as f64
        );
        assert_eq!(n, 400);
        assert!(f < n, "{f} fsyncs for {n} writes");
        // Every record was committed by some group; every fsync was timed.
        assert_eq!(stats.committed_records.load(Ordering::Relaxed), 400);
        let commits = stats.commits.load(Ordering::Relaxed);
        assert!(
            commits >= 1 && commits <= f,
            "{commits} commits, {f} fsyncs"
        );
        assert_eq!(stats.fsync_duration.count(), f);
        assert_eq!(stats.commit_wait.count(), commits);
        dir
    }

    #[test]
    fn batch_acknowledges_after_the_write_and_fsyncs_on_its_timer() {
        // A period far longer than the test: the acknowledgement cannot have waited for it.
        let dir = tempfile::tempdir().unwrap();
        let o = WalOptions {
            fsync: FsyncPolicy::Batch,
            batch_ms: 3_600_000,
            ..WalOptions::default()
        };
        let (mut wal, _) = Wal::open(dir.path(), o, 0).unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let recs = sample(5);
        let lsn = wal.append(&recs).unwrap();
        wal.request_sync(lsn);
        rt.block_on(wait_synced(&mut wal.synced(), lsn)).unwrap();
        assert_eq!(wal.fsyncs(), 0, "batch waited for an fsync");
        // Acknowledged means written: what a killed process leaves on disk has the records.
        let seg = last_segment(dir.path());
        assert_eq!(written(dir.path()), lsn);
        let copy = tempfile::tempdir().unwrap();
        fs::copy(&seg, copy.path().join(seg.file_name().unwrap())).unwrap();
        let (_, rec) = Wal::open(copy.path(), WalOptions::default(), 0).unwrap();
        assert_eq!(rec.records, recs);
        drop(wal);

        // With a short period the flush thread fsyncs what was written, unasked.
        let dir = tempfile::tempdir().unwrap();
        let o = WalOptions {
            fsync: FsyncPolicy::Batch,
            batch_ms: 2,
            ..WalOptions::default()
        };
        let (mut wal, _) = Wal::open(dir.path(), o, 0).unwrap();
        let lsn = wal.append(&sample(3)).unwrap();
        wal.request_sync(lsn);
        rt.block_on(wait_synced(&mut wal.synced(), lsn)).unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while wal.stats().commits.load(Ordering::Relaxed) == 0 {
            assert!(
                Instant::now() < deadline,
                "no fsync within 10 s under batch"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    #[test]
    fn batch_and_never_policies_complete_requests() {
        for fsync in [FsyncPolicy::Batch, FsyncPolicy::Never] {
            let dir = tempfile::tempdir().unwrap();
            let o = WalOptions {
                fsync,
                batch_ms: 2,
                ..WalOptions::default()
            };
            let (mut wal, _) = Wal::open(dir.path(), o, 0).unwrap();
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_time()
                .build()
                .unwrap();
            for i in 0..5 {
                let lsn = wal.append(&[upd(i + 1, "k", Some("v"))]).unwrap();
                wal.request_sync(lsn);
                let mut rx = wal.synced();
                rt.block_on(wait_synced(&mut rx, lsn)).unwrap();
            }
            if fsync == FsyncPolicy::Never {
                assert_eq!(wal.fsyncs(), 0);
            } else {
                // Unrequested appends are written (and so acknowledged) on the timer too.
                let lsn = wal.append(&[upd(99, "k", None)]).unwrap();
                let mut rx = wal.synced();
                rt.block_on(wait_synced(&mut rx, lsn)).unwrap();
            }
        }
    }

    #[test]
    fn waiters_fail_when_the_log_is_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let (mut wal, _) = Wal::open(dir.path(), WalOptions::default(), 0).unwrap();
        let lsn = wal.append(&sample(1)).unwrap();
        let mut rx = wal.synced();
        drop(wal);
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        // Nothing requested the sync, so the LSN is never published.
        assert!(matches!(
            rt.block_on(wait_synced(&mut rx, lsn)),
            Err(StorageError::SyncStopped)
        ));
    }
}
