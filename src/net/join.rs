//! A joining site's snapshot: the data a site added to the cluster starts from.
//!
//! A site added with `causalkv sites add` starts empty with `join_from = "<site>"` in its file.
//! Before it serves or links with anyone ([`fetch`], called by [`Node::start`](super::Node::start)
//! before recovery), it dials that site on a connection of its own and sends a
//! [`PeerControl::SnapshotRequest`] in place of a hello: the same checks apply (cluster, a site
//! the source counts and has not removed, a certificate naming it). The source
//! ([`serve_snapshot`]) takes a snapshot as its snapshotter does, answers with a
//! [`PeerControl::SnapshotHeader`] (the WAL LSN it covers, its size, and the source's
//! `applied` vector once the copy had ended), then streams the snapshot file raw on the same
//! QUIC stream: a full-window stream with no framing per record, so the transfer runs near the
//! bare QUIC rate.
//!
//! The joining site writes the file into its data directory (fsync, rename, directory fsync,
//! then validated like any snapshot it loads) and records the join in `join.state` (the floor
//! vector), so a restart neither fetches again nor forgets the floor. Recovery then loads the
//! snapshot as if this site had written it: its `applied` vector is the snapshot's, and the
//! hello it sends every site asks each origin to resend from there, which their retained logs
//! still hold (retention keeps every update from the moment the site was added, and an origin
//! that applies the addition late prunes nothing meanwhile once a peer counts the new site:
//! see [`Replica::on_peer_counts`](crate::replica::Replica::on_peer_counts)).
//!
//! The floor: the source copies its store while it keeps applying, so the copy may hold
//! entries newer than the snapshot's `applied` vector, whose dependencies may not be in it.
//! The joining site answers clients only once its `applied` covers the source's vector at
//! the end of the copy ([`Replica::set_floor`](crate::replica::Replica::set_floor)); it is
//! then a consistent replica like any other.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use quinn::{Connection, Endpoint, SendStream, VarInt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tracing::{info, warn};

use super::credentials::LoadedTls;
use super::error::NodeError;
use super::metrics::Metrics;
use super::shared::Shared;
use super::tasks::take_snapshot_locked;
use crate::clock::{SiteId, VClock};
use crate::config::SiteConfig;
use crate::peer_wire::{self, PeerControl, PeerHello};
use crate::storage::snapshot;
use crate::tls;
use crate::wire::{self, close_code, read_frame, write_frame};

/// The file that records a completed join in the data directory: the floor vector, one
/// decimal entry per line.
const JOIN_STATE: &str = "join.state";

/// Where a received snapshot is written before it is installed.
const JOIN_TMP: &str = "join-snapshot.tmp";

/// Serves a joining site's snapshot request on `conn` (the request was checked like a hello):
/// takes a snapshot, sends its header, then the file.
pub(crate) async fn serve_snapshot(
    shared: Arc<Shared>,
    conn: Connection,
    mut send: SendStream,
    site: SiteId,
) {
    let name = shared.site_name(site);
    let started = Instant::now();
    info!(joiner = %name, "a joining site asks for a snapshot");
    let taken = async {
        let _one_at_a_time = shared.snapshotting.lock().await;
        let path = take_snapshot_locked(&shared).await?;
        // Opened under the lock: the next snapshot cannot delete it first (an open file stays
        // readable after it is unlinked).
        let file = tokio::fs::File::open(&path).await.map_err(|e| {
            crate::storage::wal::StorageError::Io {
                path: path.clone(),
                source: e,
            }
        })?;
        let loaded = tokio::task::spawn_blocking({
            let dir = shared.cfg.data_dir.clone();
            move || snapshot::load(&dir)
        })
        .await
        .map_err(|e| crate::storage::wal::StorageError::Failed(e.to_string()))??;
        let lsn = loaded.map_or(0, |s| s.wal_lsn());
        Ok::<_, crate::storage::wal::StorageError>((file, lsn))
    }
    .await;
    // Everything in the copy is covered by `applied` now.
    let floor = shared.read(|r| r.applied().as_slice().to_vec());
    let (mut file, wal_lsn) = match taken {
        Ok(t) => t,
        Err(e) => {
            warn!(joiner = %name, error = %e, "snapshot for a joining site failed");
            let reject = wire::encode(&PeerControl::Reject {
                reason: format!("the snapshot failed: {e}"),
            });
            let _ = write_frame(&mut send, &reject).await;
            let _ = send.finish();
            return;
        }
    };
    let bytes = match file.metadata().await {
        Ok(m) => m.len(),
        Err(e) => {
            warn!(joiner = %name, error = %e, "snapshot file vanished");
            return;
        }
    };
    let header = wire::encode(&PeerControl::SnapshotHeader {
        wal_lsn,
        bytes,
        floor,
    });
    if write_frame(&mut send, &header).await.is_err() {
        return;
    }
    let mut buf = vec![0u8; 1 << 20];
    let mut sent = 0u64;
    while sent < bytes {
        let n = match file.read(&mut buf).await {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) => {
                warn!(joiner = %name, error = %e, "reading the snapshot failed");
                conn.close(
                    VarInt::from_u32(close_code::SHUTDOWN),
                    b"snapshot read failed",
                );
                return;
            }
        };
        if send.write_all(&buf[..n]).await.is_err() {
            return;
        }
        sent += n as u64;
    }
    let _ = send.finish();
    let _ = send.stopped().await;
    Metrics::bump(&shared.metrics.snapshots_served);
    info!(joiner = %name, bytes, ms = started.elapsed().as_millis() as u64, "snapshot sent to a joining site");
}

/// The floor a completed join recorded in `dir`, if this site joined from a snapshot.
pub(crate) fn recorded_floor(dir: &Path) -> Result<Option<VClock>, NodeError> {
    let path = dir.join(JOIN_STATE);
    match std::fs::read_to_string(&path) {
        Ok(text) => {
            let v: Result<Vec<u64>, _> = text.lines().map(|l| l.trim().parse()).collect();
            v.map(|v| Some(VClock::from_vec(v)))
                .map_err(|e| NodeError::Recovery(format!("{} is damaged: {e}", path.display())))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(NodeError::Recovery(format!("{}: {e}", path.display()))),
    }
}

/// Before a joining site's first start: fetches a snapshot from the site its file names
/// (`join_from`), installs it in the data directory and records the join. Does nothing when
/// the data directory records a completed join already. A refusal (the source has not applied
/// the `sites add` yet, or refuses this site) or an unreachable source is retried, each time
/// logged with the reason, until it succeeds.
pub(crate) async fn fetch(
    cfg: &SiteConfig,
    endpoint: &Endpoint,
    creds: &LoadedTls,
) -> Result<(), NodeError> {
    let Some(from) = &cfg.join_from else {
        return Ok(());
    };
    let dir = &cfg.data_dir;
    if recorded_floor(dir)?.is_some() {
        return Ok(());
    }
    std::fs::create_dir_all(dir)
        .map_err(|e| NodeError::Recovery(format!("{}: {e}", dir.display())))?;
    let source = cfg
        .sites
        .iter()
        .find(|s| &s.name == from)
        .ok_or_else(|| NodeError::Recovery(format!("join_from names no listed site: {from}")))?
        .clone();
    let transport = cfg.transport_limits();
    let mut backoff = Duration::from_millis(100);
    let mut attempt = 0u32;
    loop {
        attempt += 1;
        let started = Instant::now();
        match fetch_once(cfg, endpoint, creds, &transport, &source).await {
            Ok((bytes, floor)) => {
                let secs = started.elapsed().as_secs_f64();
                info!(
                    from = %source.name,
                    bytes,
                    ms = (secs * 1000.0) as u64,
                    mb_per_s = bytes as f64 / secs.max(1e-6) / 1e6,
                    "joined: snapshot loaded; catching up from every site"
                );
                let text: String = floor.iter().map(|v| format!("{v}\n")).collect();
                write_durably(dir, JOIN_STATE, text.as_bytes())
                    .map_err(|e| NodeError::Recovery(format!("writing {JOIN_STATE}: {e}")))?;
                return Ok(());
            }
            Err(e) => {
                warn!(from = %source.name, attempt, error = %e,
                    "joining: snapshot request failed; retrying");
            }
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(2));
    }
}

/// One snapshot request: returns the bytes received and the floor.
async fn fetch_once(
    cfg: &SiteConfig,
    endpoint: &Endpoint,
    creds: &LoadedTls,
    transport: &tls::TransportLimits,
    source: &crate::config::SiteEntry,
) -> Result<(u64, Vec<u64>), String> {
    let client = tls::client_config(&creds.identity, transport, tls::ALPN_PEER)
        .map_err(|e| e.to_string())?;
    let addr = source.partition_addr(cfg.partition);
    let conn = endpoint
        .connect_with(client, addr, &tls::site_server_name(&source.name))
        .map_err(|e| e.to_string())?
        .await
        .map_err(|e| format!("connect to {addr}: {e}"))?;
    let (mut send, mut recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
    let hello = PeerHello {
        cluster: cfg.cluster_id.clone(),
        site: cfg.site_id,
        sites: cfg.n() as u16,
        partition: cfg.partition as u16,
        partitions: cfg.partitions as u16,
        applied: Vec::new(),
    };
    write_frame(&mut send, &peer_wire::encode_snapshot_request(&hello))
        .await
        .map_err(|e| e.to_string())?;
    let frame = read_frame(&mut recv, 64 * 1024)
        .await
        .map_err(|e| e.to_string())?
        .ok_or("the source closed the stream before answering")?;
    let (wal_lsn, bytes, floor) = match wire::decode::<PeerControl>(&frame) {
        Ok(PeerControl::SnapshotHeader {
            wal_lsn,
            bytes,
            floor,
        }) => (wal_lsn, bytes, floor),
        Ok(PeerControl::Reject { reason }) => return Err(format!("refused: {reason}")),
        Ok(other) => return Err(format!("unexpected answer {other:?}")),
        Err(e) => return Err(format!("malformed answer: {e}")),
    };
    wire::check_vector(&floor, cfg.n(), "snapshot floor").map_err(|e| e.to_string())?;
    let tmp = cfg.data_dir.join(JOIN_TMP);
    let mut file = tokio::fs::File::create(&tmp)
        .await
        .map_err(|e| format!("{}: {e}", tmp.display()))?;
    let mut buf = vec![0u8; 1 << 20];
    let mut got = 0u64;
    while got < bytes {
        let want = buf.len().min((bytes - got) as usize);
        let n = recv
            .read(&mut buf[..want])
            .await
            .map_err(|e| format!("receiving the snapshot: {e}"))?
            .ok_or_else(|| format!("the snapshot ended after {got} of {bytes} bytes"))?;
        file.write_all(&buf[..n])
            .await
            .map_err(|e| format!("{}: {e}", tmp.display()))?;
        got += n as u64;
    }
    file.sync_all()
        .await
        .map_err(|e| format!("{}: {e}", tmp.display()))?;
    drop(file);
    conn.close(VarInt::from_u32(close_code::SHUTDOWN), b"snapshot received");
    let dir = cfg.data_dir.clone();
    tokio::task::spawn_blocking(move || snapshot::install_received(&dir, &tmp, wal_lsn))
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| format!("installing the snapshot: {e}"))?;
    Ok((got, floor))
}

/// Writes `name` in `dir` crash-safely (temporary file, fsync, rename, directory fsync).
fn write_durably(dir: &Path, name: &str, data: &[u8]) -> std::io::Result<PathBuf> {
    let tmp = dir.join(format!("{name}.tmp"));
    let path = dir.join(name);
    let mut f = std::fs::File::create(&tmp)?;
    std::io::Write::write_all(&mut f, data)?;
    f.sync_all()?;
    drop(f);
    std::fs::rename(&tmp, &path)?;
    std::fs::File::open(dir)?.sync_all()?;
    Ok(path)
}
