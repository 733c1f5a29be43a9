//! A node's background tasks that are not links or requests: the ticker (clock markers,
//! tombstone collection), the durability pump (durable state advances as fsyncs complete) and
//! the snapshotter (snapshot, then prune the log it covers).

use std::sync::Arc;
use std::time::Duration;

use tracing::{info, warn};

use super::durability::{advance_synced, append_ready};
use super::shared::{Shared, now_micros};
use crate::storage::snapshot::{self, SnapshotData};
use crate::storage::wal::StorageError;

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

/// Captures the state under the lock (after appending every pending record to the log),
/// writes it outside the lock, then prunes the log segments it covers.
pub(crate) async fn take_snapshot(
    shared: &Arc<Shared>,
) -> Result<std::path::PathBuf, StorageError> {
    let (data, lsn) = {
        let mut r = shared.replica.lock().expect("replica lock");
        let mut w = shared.wal.lock().expect("wal lock");
        let lsn = append_ready(&mut r, &mut w, true);
        if lsn == u64::MAX {
            return Err(StorageError::SyncStopped);
        }
        let data = SnapshotData::capture(
            r.store(),
            r.applied(),
            r.lease(),
            lsn,
            r.retained().cloned(),
        );
        (data, lsn)
    };
    let dir = shared.cfg.data_dir.clone();
    let path = tokio::task::spawn_blocking(move || snapshot::write(&dir, &data))
        .await
        .map_err(|e| StorageError::Failed(e.to_string()))??;
    shared.wal.lock().expect("wal lock").wal.prune_before(lsn)?;
    info!(path = %path.display(), "snapshot written; log pruned");
    Ok(path)
}
