//! A joining site's snapshot: the data a site added to the cluster starts from.
//!
//! A site added with `causalkv sites add` starts empty with `join_from = "<site>"` in its file.
//! Before it serves or links with anyone ([`fetch`], called by [`Node::start`](super::Node::start)
//! before recovery), it dials that site on a connection of its own and sends a
//! [`PeerControl::SnapshotRequest`] in place of a hello: the same checks apply (cluster, a site
//! the source counts and has not removed, a certificate naming it). The source
//! ([`serve_snapshot`]) captures its state as its snapshotter does, but writes no file:
//! it answers with a [`PeerControl::SnapshotHeader`] (the WAL LSN the copy covers and the
//! source's `applied` vector once the copy had ended), then streams the archive on the same
//! QUIC stream as a thread serialises it, raw, no framing per record, up to the stream's end.
//! Serialising, sending, receiving and writing overlap, instead of the source writing and
//! fsyncing a file before the first byte leaves.
//!
//! The joining site writes the archive into its data directory as it arrives (into the page
//! cache only, one fsync once it is whole, rename, directory fsync, then validated like any
//! snapshot it loads) and records the join in `join.state` (the floor
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

use bytes::Bytes;
use quinn::{Connection, Endpoint, SendStream, VarInt};
use tracing::{info, warn};

use super::credentials::LoadedTls;
use super::error::NodeError;
use super::metrics::Metrics;
use super::shared::Shared;
use super::tasks::{background, capture_snapshot};
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
/// captures the state as the snapshotter does, sends the header, then streams the archive as
/// it is serialised.
pub(crate) async fn serve_snapshot(
    shared: Arc<Shared>,
    conn: Connection,
    mut send: SendStream,
    site: SiteId,
) {
    let name = shared.site_name(site);
    let started = Instant::now();
    info!(joiner = %name, "a joining site asks for a snapshot");
    let data = match capture_snapshot(&shared).await {
        Ok(data) => data,
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
    let captured_ms = started.elapsed().as_millis() as u64;
    if shared.changes.hold_floor {
        hold_floor(&shared).await;
    }
    // Everything in the copy is covered by `applied` now.
    let floor = shared.read(|r| r.applied().as_slice().to_vec());
    let header = wire::encode(&PeerControl::SnapshotHeader {
        wal_lsn: data.wal_lsn,
        floor,
    });
    if write_frame(&mut send, &header).await.is_err() {
        return;
    }
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Bytes>(STREAM_CHUNKS);
    // The copy goes back with the result and is dropped after the stream has ended: dropping
    // a million cold entries takes a while, and the joining site waits for the stream's end.
    let serialise = background("snapshot-stream", move || {
        let written = snapshot::write_archive(&data, ChunkWriter::new(tx))
            .and_then(|mut w| std::io::Write::flush(&mut w));
        (written, data)
    });
    let stream = async {
        let mut sent = 0u64;
        while let Some(chunk) = rx.recv().await {
            sent += chunk.len() as u64;
            send.write_chunk(chunk).await.map_err(|e| e.to_string())?;
        }
        // Dropping the receiver on an error stops the serialiser at its next chunk.
        Ok::<_, String>(sent)
    };
    let (serialised, sent) = tokio::join!(serialise, stream);
    let serialised = serialised.map(|(written, data)| {
        // Not awaited: the stream's end does not wait for the drop.
        tokio::spawn(background("snapshot-drop", move || drop(data)));
        written
    });
    let outcome = match (serialised, sent) {
        (Ok(Ok(())), Ok(sent)) => Ok(sent),
        (Ok(Err(e)), _) => Err(format!("serialising: {e}")),
        (Err(e), _) => Err(e.to_string()),
        (_, Err(e)) => Err(format!("sending: {e}")),
    };
    match outcome {
        Ok(bytes) => {
            let _ = send.finish();
            let _ = send.stopped().await;
            Metrics::bump(&shared.metrics.snapshots_served);
            info!(joiner = %name, bytes, captured_ms, ms = started.elapsed().as_millis() as u64,
                "snapshot sent to a joining site");
        }
        Err(e) => {
            // Not a finished stream: the joining site must not take a partial archive.
            let _ = send.reset(VarInt::from_u32(close_code::SHUTDOWN));
            conn.close(
                VarInt::from_u32(close_code::SHUTDOWN),
                b"snapshot stream failed",
            );
            warn!(joiner = %name, error = %e, "streaming a snapshot to a joining site failed");
        }
    }
}

/// Test-only ([`NodeOptions::hold_sites`](super::NodeOptions::hold_sites)): waits while
/// [`HOLD_FLOOR_FILE`](super::HOLD_FLOOR_FILE) is in the data directory, polled (the test
/// removes it).
async fn hold_floor(shared: &Shared) {
    let mut logged = false;
    while shared.held(super::HOLD_FLOOR_FILE).await {
        if !logged {
            info!("holding a joining site's snapshot before its floor (test switch)");
            logged = true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Chunks in flight between the serialiser and the stream (of [`STREAM_CHUNK`] bytes each).
const STREAM_CHUNKS: usize = 8;

/// The size of a streamed snapshot's chunks, at the source and at the joining site.
const STREAM_CHUNK: usize = 1 << 20;

/// Reused [`STREAM_CHUNK`]-byte buffers. A chunk handed on as [`Bytes`] comes back to its pool
/// when the last holder drops it (quinn, once the peer has acknowledged it; the joining site's
/// writer, once it is in the file), so a streamed snapshot allocates only as many buffers as
/// are in flight at once. Fresh ones would cost a page fault per 4 KiB on first touch, for
/// every megabyte of the archive, at both ends.
#[derive(Clone, Default)]
struct ChunkPool(Arc<std::sync::Mutex<Vec<Vec<u8>>>>);

impl ChunkPool {
    /// An empty buffer, reused when one is back.
    fn take(&self) -> Vec<u8> {
        let mut buf = self
            .0
            .lock()
            .expect("chunk pool")
            .pop()
            .unwrap_or_else(|| Vec::with_capacity(STREAM_CHUNK));
        buf.clear();
        buf
    }

    /// `buf` as [`Bytes`] that return it to the pool when dropped.
    fn share(&self, buf: Vec<u8>) -> Bytes {
        Bytes::from_owner(Pooled {
            buf,
            pool: self.clone(),
        })
    }
}

/// A buffer on loan from a [`ChunkPool`].
struct Pooled {
    buf: Vec<u8>,
    pool: ChunkPool,
}

impl AsRef<[u8]> for Pooled {
    fn as_ref(&self) -> &[u8] {
        &self.buf
    }
}

impl Drop for Pooled {
    fn drop(&mut self) {
        let buf = std::mem::take(&mut self.buf);
        self.pool.0.lock().expect("chunk pool").push(buf);
    }
}

/// A [`std::io::Write`] that hands [`STREAM_CHUNK`]-byte chunks to an async receiver, blocking
/// while [`STREAM_CHUNKS`] are in flight: the serialiser runs on a thread of its own, ahead of
/// the network by at most that much. A chunk is filled exactly, so its buffer never grows.
struct ChunkWriter {
    tx: tokio::sync::mpsc::Sender<Bytes>,
    pool: ChunkPool,
    buf: Vec<u8>,
}

impl ChunkWriter {
    fn new(tx: tokio::sync::mpsc::Sender<Bytes>) -> Self {
        let pool = ChunkPool::default();
        Self {
            tx,
            buf: pool.take(),
            pool,
        }
    }

    fn hand_over(&mut self) -> std::io::Result<()> {
        let full = std::mem::replace(&mut self.buf, self.pool.take());
        self.tx
            .blocking_send(self.pool.share(full))
            .map_err(|_| std::io::Error::other("the snapshot stream stopped"))
    }
}

impl std::io::Write for ChunkWriter {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        let n = data.len().min(STREAM_CHUNK - self.buf.len());
        self.buf.extend_from_slice(&data[..n]);
        if self.buf.len() == STREAM_CHUNK {
            self.hand_over()?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            self.hand_over()
        }
    }
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
    // File work off the runtime: the endpoint this fetch uses is driven on it.
    let d = dir.clone();
    let joined = tokio::task::spawn_blocking(move || -> Result<bool, NodeError> {
        if recorded_floor(&d)?.is_some() {
            return Ok(true);
        }
        std::fs::create_dir_all(&d)
            .map_err(|e| NodeError::Recovery(format!("{}: {e}", d.display())))?;
        Ok(false)
    })
    .await
    .map_err(|e| NodeError::Recovery(format!("checking {JOIN_STATE}: {e}")))??;
    if joined {
        return Ok(());
    }
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
            Ok(Received {
                bytes,
                transfer_ms,
                floor,
            }) => {
                let secs = started.elapsed().as_secs_f64();
                info!(
                    from = %source.name,
                    bytes,
                    ms = (secs * 1000.0) as u64,
                    mb_per_s = bytes as f64 / secs.max(1e-6) / 1e6,
                    transfer_ms = transfer_ms as u64,
                    transfer_mb_per_s = bytes as f64 / (transfer_ms / 1000.0).max(1e-6) / 1e6,
                    "joined: snapshot loaded; catching up from every site"
                );
                let text: String = floor.iter().map(|v| format!("{v}\n")).collect();
                let d = dir.clone();
                tokio::task::spawn_blocking(move || write_durably(&d, JOIN_STATE, text.as_bytes()))
                    .await
                    .map_err(std::io::Error::other)
                    .and_then(|r| r)
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

/// One snapshot request: the snapshot received, written durably and installed.
async fn fetch_once(
    cfg: &SiteConfig,
    endpoint: &Endpoint,
    creds: &LoadedTls,
    transport: &tls::TransportLimits,
    source: &crate::config::SiteEntry,
) -> Result<Received, String> {
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
    let (wal_lsn, floor) = match wire::decode::<PeerControl>(&frame) {
        Ok(PeerControl::SnapshotHeader { wal_lsn, floor }) => (wal_lsn, floor),
        Ok(PeerControl::Reject { reason }) => return Err(format!("refused: {reason}")),
        Ok(other) => return Err(format!("unexpected answer {other:?}")),
        Err(e) => return Err(format!("malformed answer: {e}")),
    };
    wire::check_vector(&floor, cfg.n(), "snapshot floor").map_err(|e| e.to_string())?;
    // The archive runs to the stream's end. A thread writes it into the page cache as it
    // arrives; the disk gets it all at once, in the fsync after the last byte. Starting each
    // megabyte's write-back as it arrived (Linux `sync_file_range`) made the join slower on
    // every measure here: the write-back's submissions take CPU that the transfer needs
    // (results/membership/README.md).
    let tmp = cfg.data_dir.join(JOIN_TMP);
    let transfer = Instant::now();
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(STREAM_CHUNKS);
    let writer = background("snapshot-receive", {
        let tmp = tmp.clone();
        move || write_received(&tmp, rx)
    });
    let pool = ChunkPool::default();
    let receive = async move {
        let mut got = 0u64;
        loop {
            let mut buf = pool.take();
            buf.resize(STREAM_CHUNK, 0);
            let mut filled = 0;
            let mut ended = false;
            while filled < buf.len() {
                match recv.read(&mut buf[filled..]).await {
                    Ok(Some(n)) => filled += n,
                    Ok(None) => {
                        ended = true;
                        break;
                    }
                    Err(e) => return Err(format!("receiving the snapshot after {got} bytes: {e}")),
                }
            }
            buf.truncate(filled);
            got += filled as u64;
            if !buf.is_empty() && tx.send(pool.share(buf)).await.is_err() {
                return Err("the snapshot writer stopped".to_string());
            }
            if ended {
                // The empty chunk says the archive is whole: only then is it fsynced.
                let _ = tx.send(Bytes::new()).await;
                return Ok(got);
            }
        }
    };
    // Both run to their end (the receiver's sender goes with it), so a retry never writes the
    // file while this writer still does.
    let (received, written) = tokio::join!(
        async {
            let r = receive.await;
            (r, transfer.elapsed().as_secs_f64() * 1000.0)
        },
        writer
    );
    let (received, transfer_ms) = received;
    let got = received?;
    written
        .map_err(|e| e.to_string())?
        .map_err(|e| format!("{}: {e}", tmp.display()))?;
    conn.close(VarInt::from_u32(close_code::SHUTDOWN), b"snapshot received");
    let dir = cfg.data_dir.clone();
    tokio::task::spawn_blocking(move || snapshot::install_received(&dir, &tmp, wal_lsn))
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| format!("installing the snapshot: {e}"))?;
    Ok(Received {
        bytes: got,
        transfer_ms,
        floor,
    })
}

/// What [`fetch_once`] received.
struct Received {
    /// The archive's size.
    bytes: u64,
    /// From the header to the archive's last byte.
    transfer_ms: f64,
    /// The source's `applied` vector once its copy had ended.
    floor: Vec<u64>,
}

/// Writes a streamed snapshot's chunks to `tmp` as they come, and fsyncs the file once an
/// empty chunk says the archive is whole. A stream that stops without it leaves the file
/// unsynced and is an error.
fn write_received(tmp: &Path, mut rx: tokio::sync::mpsc::Receiver<Bytes>) -> std::io::Result<()> {
    use std::io::Write;
    let mut file = std::fs::File::create(tmp)?;
    while let Some(chunk) = rx.blocking_recv() {
        if chunk.is_empty() {
            file.sync_all()?;
            return Ok(());
        }
        file.write_all(&chunk)?;
    }
    Err(std::io::Error::other("the snapshot stream stopped early"))
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs [`write_received`] on its own thread over `chunks`, as the fetch does.
    fn write(tmp: &Path, chunks: Vec<&'static [u8]>) -> std::io::Result<()> {
        let (tx, rx) = tokio::sync::mpsc::channel(STREAM_CHUNKS);
        let tmp = tmp.to_path_buf();
        let writer = std::thread::spawn(move || write_received(&tmp, rx));
        for c in chunks {
            tx.blocking_send(Bytes::from_static(c)).unwrap();
        }
        drop(tx);
        writer.join().unwrap()
    }

    #[test]
    fn a_received_snapshot_is_whole_only_after_its_end_marker() {
        let dir = tempfile::tempdir().unwrap();
        let tmp = dir.path().join(JOIN_TMP);
        write(&tmp, vec![b"abc", b"def", b""]).unwrap();
        assert_eq!(std::fs::read(&tmp).unwrap(), b"abcdef");
        // The stream stopped (source gone, stream reset) before the marker: an error, so the
        // fetch retries instead of installing a partial archive.
        let err = write(&tmp, vec![b"abc", b"def"]).unwrap_err();
        assert!(err.to_string().contains("stopped early"), "{err}");
    }

    #[test]
    fn a_chunk_writer_hands_over_whole_chunks_and_the_rest_on_flush() {
        let (tx, mut rx) = tokio::sync::mpsc::channel(STREAM_CHUNKS);
        let producer = std::thread::spawn(move || {
            let mut w = ChunkWriter::new(tx);
            let piece = vec![7u8; STREAM_CHUNK / 2 + 1];
            for _ in 0..3 {
                std::io::Write::write_all(&mut w, &piece).unwrap();
            }
            std::io::Write::flush(&mut w).unwrap();
        });
        producer.join().unwrap();
        let mut sizes = Vec::new();
        while let Ok(chunk) = rx.try_recv() {
            sizes.push(chunk.len());
        }
        let piece = STREAM_CHUNK / 2 + 1;
        assert_eq!(sizes, vec![STREAM_CHUNK, 3 * piece - STREAM_CHUNK]);
    }

    #[test]
    fn a_chunk_comes_back_to_its_pool_when_its_last_holder_drops_it() {
        let pool = ChunkPool::default();
        let mut buf = pool.take();
        buf.extend_from_slice(b"chunk");
        let at = buf.as_ptr();
        let chunk = pool.share(buf);
        let held = chunk.clone();
        drop(chunk);
        // Still held: a second buffer is a new one.
        let other = pool.take();
        assert_ne!(other.as_ptr(), at);
        assert_eq!(&held[..], b"chunk");
        drop(held);
        let again = pool.take();
        assert_eq!(again.as_ptr(), at, "the buffer is reused");
        assert!(again.is_empty());
    }
}
