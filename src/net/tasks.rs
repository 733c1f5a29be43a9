//! A node's background tasks that are not links or requests: the ticker (clock markers,
//! tombstone collection), the durability pump (durable state advances as fsyncs complete) and
//! the snapshotter (snapshot, then prune the log it covers).

use std::sync::Arc;
use std::time::Duration;

use tracing::{info, warn};

use super::durability::{advance_synced, append_ready};
use super::shared::{Shared, now_micros};
use crate::storage::snapshot::{self, SnapshotData};
use crate::storage::wal::{StorageError, remove_segments};

/// Passes time to the replica: clock markers and tombstone collection.
pub(crate) async fn ticker(shared: Arc<Shared>) {
    let mut shutdown = shared.shutdown.clone();
    let period = Duration::from_millis(shared.cfg.replication.marker_interval_ms);
    let mut iv = tokio::time::interval(period);
    iv.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = iv.tick() => {}
            _ = shutdown.changed() => return,
        }
        shared.mutate(|r| r.tick(now_micros()));
    }
}

/// Completes the requests waiting for durability and advances the replica's durable state as
/// the write-ahead log's commits complete; only then are updates sent to peers and acked. The
/// one task the log thread wakes per commit.
pub(crate) async fn durability_pump(shared: Arc<Shared>) {
    let mut rx = shared.synced.clone();
    loop {
        let synced = *rx.borrow_and_update();
        // Acknowledgements first: the requests this commit covers run before the rest of this
        // iteration (the replica lock, waking peer senders).
        if shared.durable_waiters.complete(synced) > 0 {
            tokio::task::yield_now().await;
        }
        let moved = {
            let mut r = shared.replica.lock().expect("replica lock");
            let mut w = shared.wal.lock().expect("wal lock");
            advance_synced(&mut r, &mut w, synced)
        };
        if moved {
            shared.changed.send_modify(|v| *v = v.wrapping_add(1));
            shared.wake_peers();
        }
        if rx.changed().await.is_err() {
            shared.durable_waiters.stop();
            tracing::error!(
                "write-ahead log sync stopped: this site can no longer make writes durable"
            );
            return;
        }
    }
}

/// Takes a snapshot when the log has grown past the configured size, then drops the log
/// segments it covers, so disk use stays bounded under steady load.
pub(crate) async fn snapshotter(shared: Arc<Shared>) {
    let mut shutdown = shared.shutdown.clone();
    let period = Duration::from_millis(shared.cfg.storage.snapshot_interval_ms);
    loop {
        tokio::select! {
            _ = tokio::time::sleep(period) => {}
            _ = shutdown.changed() => return,
        }
        let due = shared.wal.lock().expect("wal lock").wal.disk_bytes()
            >= shared.cfg.storage.snapshot_log_bytes;
        if due && let Err(e) = take_snapshot(&shared).await {
            warn!(error = %e, "snapshot failed; the log keeps growing until one succeeds");
        }
    }
}

/// Takes a snapshot without copying the store under the replica lock, then prunes the log
/// segments it covers. Every step that blocks runs on a blocking thread.
///
/// 1. Under the lock, only what is cheap: every pending record is logged, the log position
///    `lsn`, the `applied` vector, the lease and the retained updates are noted, and a handle to
///    the store is taken. Tombstone collection is held.
/// 2. The entries are copied through that handle on a blocking thread while the site keeps
///    serving. The copy is fuzzy: it may hold writes applied after `lsn`. Recovery replays the
///    log from `lsn` over it, and last-writer-wins makes the result the same as a copy taken
///    at `lsn` plus the replay (a merge is idempotent and commutative per key). The hold keeps
///    every tombstone that was live at `lsn` in the copy, so an older write that lost to it
///    after `lsn` loses again on replay.
/// 3. The log is made durable up to its end before the file is written: the copy never holds a
///    write that a crash could take back.
pub(crate) async fn take_snapshot(
    shared: &Arc<Shared>,
) -> Result<std::path::PathBuf, StorageError> {
    let _one_at_a_time = shared.snapshotting.lock().await;
    take_snapshot_locked(shared).await
}

/// Steps 1 to 3 of [`take_snapshot`]: a copy of the site's state, with every write in it
/// durable here, ready to be written ([`snapshot::write`]) or streamed to a joining site
/// ([`snapshot::write_archive`]). It needs no [`Shared::snapshotting`]: it touches no file.
pub(crate) async fn capture_snapshot(shared: &Arc<Shared>) -> Result<SnapshotData, StorageError> {
    let (store, applied, lease, lsn, retained) = {
        let mut r = shared.replica.lock().expect("replica lock");
        let mut w = shared.wal.lock().expect("wal lock");
        let lsn = append_ready(&mut r, &mut w, true);
        if lsn == u64::MAX {
            return Err(StorageError::SyncStopped);
        }
        r.hold_tombstones();
        let retained: Vec<_> = r.retained().cloned().collect();
        (
            r.store().clone(),
            r.applied().clone(),
            r.lease(),
            lsn,
            retained,
        )
    };
    let hold = TombstoneHold(shared);
    let data = background("snapshot-copy", move || {
        SnapshotData::capture(&store, &applied, lease, lsn, retained)
    })
    .await?;
    drop(hold);
    let end = {
        let mut r = shared.replica.lock().expect("replica lock");
        let mut w = shared.wal.lock().expect("wal lock");
        append_ready(&mut r, &mut w, true)
    };
    shared.wait_durable(end).await?;
    Ok(data)
}

/// [`take_snapshot`], for a caller that holds [`Shared::snapshotting`] (two snapshots at once
/// would write the same temporary file).
pub(crate) async fn take_snapshot_locked(
    shared: &Arc<Shared>,
) -> Result<std::path::PathBuf, StorageError> {
    let data = capture_snapshot(shared).await?;
    let lsn = data.wal_lsn;
    let dir = shared.cfg.data_dir.clone();
    let path = background("snapshot-write", move || snapshot::write(&dir, &data)).await??;
    let covered = shared.wal.lock().expect("wal lock").wal.detach_before(lsn);
    tokio::task::spawn_blocking(move || remove_segments(&covered))
        .await
        .map_err(|e| StorageError::Failed(e.to_string()))??;
    info!(path = %path.display(), "snapshot written; log pruned");
    Ok(path)
}

/// Runs `f` on a thread of its own at a lower CPU priority (nice 10 on Linux) and awaits its
/// result. Snapshot work (copying the store, serialising and writing the file) is long and
/// CPU-bound: on a site with few cores, at normal priority it competes with the runtime thread
/// that serves requests, and requests wait. At lower priority the scheduler gives the runtime
/// thread the core as soon as it is runnable (as database engines do with their background
/// compaction threads). A fresh thread, not the blocking pool: a lowered priority cannot be
/// raised again without privileges, and pooled threads serve other work later.
pub(crate) async fn background<T: Send + 'static>(
    name: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, StorageError> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name(name.into())
        .spawn(move || {
            lower_priority();
            let _ = tx.send(f());
        })
        .map_err(|e| StorageError::Failed(format!("cannot start the {name} thread: {e}")))?;
    rx.await
        .map_err(|_| StorageError::Failed(format!("the {name} thread stopped without a result")))
}

/// Lowers the calling thread's CPU priority (Linux: a thread's nice value is its own).
fn lower_priority() {
    #[cfg(target_os = "linux")]
    {
        // SAFETY: gettid takes no arguments; setpriority with PRIO_PROCESS and a thread id
        // only changes that thread's nice value.
        let rc = unsafe {
            let tid = libc::syscall(libc::SYS_gettid) as libc::id_t;
            libc::setpriority(libc::PRIO_PROCESS, tid, 10)
        };
        if rc != 0 {
            tracing::debug!("could not lower the snapshot thread's priority");
        }
    }
}

/// Holds tombstone collection while a snapshot copies the store; released when dropped, on
/// every path out of [`take_snapshot`].
struct TombstoneHold<'a>(&'a Shared);

impl Drop for TombstoneHold<'_> {
    fn drop(&mut self) {
        self.0
            .replica
            .lock()
            .expect("replica lock")
            .release_tombstones();
    }
}
