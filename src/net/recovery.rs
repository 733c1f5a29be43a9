//! Start-up recovery: the newest snapshot (memory-mapped), then the write-ahead log after it.

use std::time::Instant;

use tracing::{info, warn};

use super::error::NodeError;
use crate::config::SiteConfig;
use crate::replica::{Replica, ReplicaConfig};
use crate::storage::MemStore;
use crate::storage::snapshot;
use crate::storage::wal::{StorageError, Wal};

/// Recovers a site's state from its data directory: the newest snapshot (memory-mapped), then
/// the write-ahead log after it. A torn tail is truncated with a warning; a corrupt record stops
/// start-up with an error that names the repair command.
pub(crate) fn recover(
    cfg: &SiteConfig,
    rc: ReplicaConfig,
) -> Result<(Replica<MemStore>, Wal), NodeError> {
    let dir = &cfg.data_dir;
    let err = |source| NodeError::Storage {
        dir: dir.clone(),
        source,
    };
    std::fs::create_dir_all(dir).map_err(|e| {
        err(StorageError::Io {
            path: dir.clone(),
            source: e,
        })
    })?;
    let started = Instant::now();
    let snap = snapshot::load(dir).map_err(err)?;
    let store = MemStore::with_capacity(snap.as_ref().map_or(0, |s| s.len()));
    let (from_lsn, prefix, keys) = match &snap {
        Some(s) => (s.wal_lsn(), s.replay_prefix(), s.load_into(&store)),
        None => (0, Vec::new(), 0),
    };
    let (wal, rec) = Wal::open(dir, cfg.storage.wal(), from_lsn).map_err(err)?;
    if let Some(t) = &rec.torn_tail {
        warn!(segment = %t.segment.display(), offset = t.offset, bytes = t.bytes_dropped,
            "truncated a torn write at the end of the write-ahead log");
    }
    let records = rec.records.len();
    let replica = Replica::recover(rc, store, prefix.into_iter().chain(rec.records));
    if keys > 0 || records > 0 {
        info!(
            snapshot_keys = keys,
            log_records = records,
            ms = started.elapsed().as_millis() as u64,
            "recovered"
        );
    }
    Ok((replica, wal))
}
