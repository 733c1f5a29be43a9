//! The write-ahead log as a node drives it: records a mutation produced are appended in apply
//! order, their fsync is requested, and the replica's durable state advances once the log is
//! synced past them ([`advance_synced`]). Only durable state is sent to peers or acked.

use std::collections::VecDeque;

use crate::clock::{Timestamp, VClock};
use crate::replica::Replica;
use crate::storage::MemStore;
use crate::storage::wal::Wal;

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
