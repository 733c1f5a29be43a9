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

/// Advances the replica's durable state as the write-ahead log's fsyncs complete; only then are
/// updates sent to peers and acked.
pub(crate) async fn durability_pump(shared: Arc<Shared>) {
    let mut rx = shared.synced.clone();
    loop {
        let synced = *rx.borrow_and_update();
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
    let data = tokio::task::spawn_blocking(move || {
        SnapshotData::capture(&store, &applied, lease, lsn, retained)
    })
    .await
    .map_err(|e| StorageError::Failed(e.to_string()))?;
    drop(hold);
    let end = {
        let mut r = shared.replica.lock().expect("replica lock");
        let mut w = shared.wal.lock().expect("wal lock");
        append_ready(&mut r, &mut w, true)
    };
    shared.wait_durable(end).await?;
    let dir = shared.cfg.data_dir.clone();
    let path = tokio::task::spawn_blocking(move || snapshot::write(&dir, &data))
        .await
        .map_err(|e| StorageError::Failed(e.to_string()))??;
    let covered = shared.wal.lock().expect("wal lock").wal.detach_before(lsn);
    tokio::task::spawn_blocking(move || remove_segments(&covered))
        .await
        .map_err(|e| StorageError::Failed(e.to_string()))??;
    info!(path = %path.display(), "snapshot written; log pruned");
    Ok(path)
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
