//! The write-ahead log as a node drives it: records a mutation produced are appended in apply
//! order, their fsync is requested, and the replica's durable state advances once the log is
//! synced past them ([`advance_synced`]). Only durable state is sent to peers or acked.
//!
//! Requests waiting for their write to be durable wait in [`DurableWaiters`], which the
//! durability pump completes: the log thread wakes that one task per commit (a wake-up from
//! another thread costs the runtime a system call), and the pump wakes, on the runtime thread,
//! exactly the requests the commit covers.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Mutex;

use tokio::sync::oneshot;

use crate::clock::{Timestamp, VClock};
use crate::replica::Replica;
use crate::storage::MemStore;
use crate::storage::wal::{StorageError, Wal};

/// Requests waiting for the log to be durable up to their LSN, in LSN order.
pub(crate) struct DurableWaiters(Mutex<Waiting>);

struct Waiting {
    /// The synced LSN as last completed.
    durable: u64,
    /// The log stopped: waiting fails.
    stopped: bool,
    /// Tells apart waiters for the same LSN.
    seq: u64,
    by_lsn: BTreeMap<(u64, u64), oneshot::Sender<()>>,
}

impl DurableWaiters {
    /// No waiters; the log is synced up to `durable`.
    pub fn new(durable: u64) -> Self {
        Self(Mutex::new(Waiting {
            durable,
            stopped: false,
            seq: 0,
            by_lsn: BTreeMap::new(),
        }))
    }

    /// Waits until [`complete`](Self::complete) has been called with `lsn` or more.
    pub async fn wait(&self, lsn: u64) -> Result<(), StorageError> {
        let rx = {
            let mut w = self.0.lock().expect("waiters lock");
            if w.durable >= lsn {
                return Ok(());
            }
            if w.stopped {
                return Err(StorageError::SyncStopped);
            }
            let (tx, rx) = oneshot::channel();
            w.seq += 1;
            let seq = w.seq;
            w.by_lsn.insert((lsn, seq), tx);
            rx
        };
        rx.await.map_err(|_| StorageError::SyncStopped)
    }

    /// The log is synced up to `synced`: wakes every waiter at or below it. Returns how many.
    pub fn complete(&self, synced: u64) -> usize {
        let done = {
            let mut w = self.0.lock().expect("waiters lock");
            if synced <= w.durable {
                return 0;
            }
            w.durable = synced;
            let later = w.by_lsn.split_off(&(synced.saturating_add(1), 0));
            std::mem::replace(&mut w.by_lsn, later)
        };
        let n = done.len();
        for tx in done.into_values() {
            let _ = tx.send(());
        }
        n
    }

    /// The log stopped: every waiter, present and future, fails.
    pub fn stop(&self) {
        let mut w = self.0.lock().expect("waiters lock");
        w.stopped = true;
        w.by_lsn.clear();
    }
}

/// The write-ahead log plus the durable points waiting for its fsync.
pub(crate) struct WalState {
    pub wal: Wal,
    /// `(lsn, applied, lease)`: once the log is synced to `lsn`, `applied` and `lease` are
    /// durable.
    pub pending: VecDeque<(u64, VClock, Timestamp)>,
}

/// Appends the replica's pending records to the log and requests their fsync; queues the
/// durable point for [`durability_pump`] (or advances at once when it is already durable).
/// Returns the LSN to wait for, or `u64::MAX` when the log has failed.
pub(crate) fn append_ready(r: &mut Replica<MemStore>, w: &mut WalState, sync: bool) -> u64 {
    loop {
        let ready = r.take_ready();
        let lsn = if ready.records.is_empty() {
            w.wal.end_lsn()
        } else {
            match w.wal.append(&ready.records) {
                Ok(lsn) => lsn,
                Err(e) => {
                    // The log refuses everything from now on; waiters see SyncStopped.
                    tracing::error!(error = %e, "write-ahead log append failed");
                    return u64::MAX;
                }
            }
        };
        if sync {
            w.wal.request_sync(lsn);
        }
        if w.wal.synced_lsn() >= lsn && w.pending.is_empty() {
            // Already durable (nothing new, or fsync=never): advance now. On a partitioned
            // site that can make buffered updates visible: log those too.
            r.advance(&ready.applied, ready.lease);
            if r.has_records() {
                continue;
            }
        } else {
            w.pending.push_back((lsn, ready.applied, ready.lease));
        }
        return lsn;
    }
}

/// Advances the replica's durable state past every pending point the log has synced (up to
/// `synced`). Returns whether anything moved. On a partitioned site, durability can raise the
/// stable vector and make buffered updates visible: those are logged too, and their fsync asked
/// for at once, for the next hop.
pub(crate) fn advance_synced(r: &mut Replica<MemStore>, w: &mut WalState, synced: u64) -> bool {
    let mut moved = false;
    while let Some((lsn, _, _)) = w.pending.front() {
        if *lsn > synced {
            break;
        }
        let (_, applied, lease) = w.pending.pop_front().expect("front");
        r.advance(&applied, lease);
        moved = true;
    }
    if moved && r.has_records() {
        append_ready(r, w, true);
    }
    moved
}
