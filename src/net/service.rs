//! The client service: one bidirectional QUIC stream per request.
//!
//! A request frame is validated (bytecheck, then sizes and vector lengths) before anything is
//! done with it. Keys and values are sliced out of the received frame and stored as they are.
//! A request whose causal context this site has not applied yet waits, bounded by the smaller
//! of the request's and the site's timeout, and then gets [`error_code::NOT_READY`] saying which
//! entry is missing. A put that asks for synchronous replication waits until that many peers
//! have acked it durably.
//!
//! Bad input closes only that stream (`STOP_SENDING` / `RESET_STREAM` with
//! [`close_code::MALFORMED`](super::node::close_code::MALFORMED)), after a clear error response
//! where one can still be sent; the connection and every other client keep being served.
//!
//! Every answered request is counted and timed by operation ([`super::metrics`]).

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use bytes::Bytes;
use quinn::{Connection, RecvStream, SendStream, VarInt};
use tracing::{Instrument, debug, warn};

use super::metrics::{Metrics, Op, PutStage};
use super::shared::{Shared, now_micros};
use crate::clock::{VClock, Version};
use crate::consensus::members::SitesOp;
use crate::consensus::{Command, Forwarded, Outcome, Reply, WriteOp};
use crate::replica::{NotReady, ReadResult};
use crate::wire::{
    self, ArchivedClientOp, ArchivedRequest, Response, ResponseBody, WireError, close_code,
    error_code, read_frame, write_frame,
};

/// Serves one client connection until it closes or the node stops.
pub(crate) async fn serve(shared: Arc<Shared>, conn: Connection) {
    let mut shutdown = shared.shutdown.clone();
    loop {
        let (send, recv) = tokio::select! {
            s = conn.accept_bi() => match s {
                Ok(s) => s,
                Err(e) => {
                    debug!(remote = %conn.remote_address(), error = %e, "client connection ended");
                    if matches!(e, quinn::ConnectionError::TransportError(_) | quinn::ConnectionError::ConnectionClosed(_)) {
                        Metrics::bump(&shared.metrics.tls_failures);
                        warn!(remote = %conn.remote_address(), error = %e, "client connection failed");
                    }
                    return;
                }
            },
            _ = shutdown.changed() => return,
        };
        shared.inflight.fetch_add(1, Ordering::SeqCst);
        let shared = shared.clone();
        tokio::spawn(
            async move {
                handle(&shared, send, recv).await;
                if shared.inflight.fetch_sub(1, Ordering::SeqCst) == 1 {
                    shared.drained.notify_waiters();
                }
            }
            .in_current_span(),
        );
    }
}

/// The refusal of a key or value over a limit: the check's own message, which names the limit.
fn too_large(e: WireError) -> ResponseBody {
    let message = match e {
        WireError::Semantic(m) => m,
        other => other.to_string(),
    };
    error(error_code::TOO_LARGE, message)
}

pub(crate) fn error(code: u16, message: impl Into<String>) -> ResponseBody {
    ResponseBody::Error {
        code,
        message: message.into(),
        version: None,
    }
}

async fn handle(shared: &Shared, mut send: SendStream, mut recv: RecvStream) {
    let limits = shared.cfg.limits;
    let frame = match read_frame(&mut recv, limits.max_frame).await {
        Ok(Some(f)) => f,
        Ok(None) => return,
        Err(WireError::Io(_)) => return,
        Err(e) => {
            Metrics::bump(&shared.metrics.malformed_frames);
            if matches!(e, WireError::FrameTooLarge { .. }) {
                Metrics::bump(&shared.metrics.too_large);
            }
            warn!(error = %e, "malformed client frame; closing the stream");
            let code = if matches!(e, WireError::FrameTooLarge { .. }) {
                error_code::TOO_LARGE
            } else {
                error_code::BAD_REQUEST
            };
            let message = if matches!(e, WireError::FrameTooLarge { .. }) {
                format!("{e} (limits.max_frame)")
            } else {
                e.to_string()
            };
            respond(shared, &mut send, error(code, message)).await;
            let _ = recv.stop(VarInt::from_u32(close_code::MALFORMED));
            return;
        }
    };
    let started = Instant::now();
    // When a write became durable and its task resumed, for the reply stage of its timeline.
    let mut durable_at = None;
    let (op, body) = match wire::access::<ArchivedRequest>(&frame) {
        Ok(req) => (
            op_of(req),
            execute(shared, &frame, req, started, &mut durable_at).await,
        ),
        Err(e) => {
            Metrics::bump(&shared.metrics.malformed_frames);
            warn!(error = %e, "malformed client request; closing the stream");
            respond(
                shared,
                &mut send,
                error(error_code::BAD_REQUEST, e.to_string()),
            )
            .await;
            let _ = send.reset(VarInt::from_u32(close_code::MALFORMED));
            return;
        }
    };
    Metrics::bump(&shared.metrics.requests);
    let ok = !matches!(body, ResponseBody::Error { .. });
    respond(shared, &mut send, body).await;
    shared.metrics.ops.record(op, ok, started.elapsed());
    if let Some(t) = durable_at {
        shared
            .metrics
            .put_stages
            .record(PutStage::Reply, t.elapsed());
    }
}

fn op_of(req: &ArchivedRequest) -> Op {
    match req.op {
        ArchivedClientOp::Get { .. } => Op::Get,
        ArchivedClientOp::Put { .. } => Op::Put,
        ArchivedClientOp::Delete { .. } => Op::Delete,
        ArchivedClientOp::Status => Op::Status,
        ArchivedClientOp::StrongWrite { ref value, .. } if value.is_some() => Op::StrongPut,
        ArchivedClientOp::StrongWrite { .. } => Op::StrongDelete,
        ArchivedClientOp::StrongGet { .. } => Op::StrongGet,
        ArchivedClientOp::Cas { .. } => Op::Cas,
        // A write through the Raft group, as strong puts are.
        ArchivedClientOp::SitesAdd { .. } | ArchivedClientOp::SitesRemove { .. } => Op::StrongPut,
    }
}

async fn respond(shared: &Shared, send: &mut SendStream, body: ResponseBody) {
    let applied = shared.read(|r| r.applied().as_slice().to_vec());
    let resp = wire::encode(&Response { body, applied });
    if write_frame(send, &resp).await.is_ok() {
        let _ = send.finish();
    }
}

/// Runs one request. For a write, records the stages of its timeline up to the moment it is
/// durable (`durable_at`, from which [`handle`] times the reply).
async fn execute(
    shared: &Shared,
    frame: &Bytes,
    req: &ArchivedRequest,
    started: Instant,
    durable_at: &mut Option<Instant>,
) -> ResponseBody {
    if shared.is_shutting_down() {
        return error(error_code::SHUTTING_DOWN, "site is shutting down");
    }
    let n = shared.n();
    let ctx: Vec<u64> = req.ctx.iter().map(|x| x.to_native()).collect();
    // A new session's context may be shorter than the cluster (entries it never saw are 0),
    // or longer with zeros for sites added that this site does not count yet.
    let ctx = match crate::wire::check_vector(&ctx, n, "causal context") {
        Ok(ctx) => ctx,
        Err(e) => return error(error_code::BAD_REQUEST, e.to_string()),
    };
    let timeout = Duration::from_millis(
        (req.timeout_ms.to_native() as u64).min(shared.cfg.timeouts.request_ms),
    );
    let deadline = Instant::now() + timeout;
    let (key, value, sync) = match &req.op {
        ArchivedClientOp::Status => return ResponseBody::Status(shared.status()),
        ArchivedClientOp::SitesAdd {
            name,
            addr,
            expected_epoch,
            client,
            serial,
        } => {
            return sites_add(
                shared,
                name.as_str(),
                addr.as_str(),
                expected_epoch.to_native(),
                (client.to_native(), serial.to_native()),
                timeout,
            )
            .await;
        }
        ArchivedClientOp::SitesRemove {
            name,
            dead,
            expected_epoch,
            client,
            serial,
        } => {
            return super::membership::remove(
                shared,
                name.as_str(),
                *dead,
                expected_epoch.to_native(),
                (client.to_native(), serial.to_native()),
                timeout,
            )
            .await;
        }
        ArchivedClientOp::Get { key } => {
            return match read(shared, key.as_slice(), &ctx, deadline, timeout).await {
                Ok((res, lsn)) => {
                    if let Some(lsn) = lsn
                        && let Err(e) = shared.wait_durable(lsn).await
                    {
                        return error(error_code::STORAGE, format!("storage failed: {e}"));
                    }
                    ResponseBody::Value {
                        value: res.value.map(|v| v.to_vec()),
                        version: res.version.map(Into::into),
                        deps: res.deps.into_vec(),
                    }
                }
                Err(refusal) => refusal,
            };
        }
        ArchivedClientOp::Put { key, value, sync } => (key, Some(value), *sync),
        ArchivedClientOp::Delete { key, sync } => (key, None, *sync),
        op @ (ArchivedClientOp::StrongWrite { .. }
        | ArchivedClientOp::Cas { .. }
        | ArchivedClientOp::StrongGet { .. }) => return strong(shared, op, ctx, timeout).await,
    };
    if sync as usize >= n {
        return error(
            error_code::BAD_REQUEST,
            format!(
                "synchronous replication to {sync} sites asked, the cluster has {} other sites",
                n - 1
            ),
        );
    }
    // Keys and values are slices of the received frame: stored without a copy.
    let key_b = frame.slice_ref(key.as_slice());
    let value_b = value.map(|v| {
        if v.is_empty() {
            Bytes::new()
        } else {
            frame.slice_ref(v.as_slice())
        }
    });
    let (version, lsn) = match write(shared, key_b, value_b, &ctx, deadline, timeout).await {
        Ok(w) => w,
        Err(refusal) => return refusal,
    };
    let queued = Instant::now();
    // Acknowledge only once the write is durable under the fsync policy in force.
    if let Err(e) = shared.wait_durable(lsn).await {
        return error(
            error_code::STORAGE,
            format!("write {version} is applied but could not be made durable: {e}"),
        );
    }
    let resumed = Instant::now();
    let published = shared.wal_stats.last_published().clamp(queued, resumed);
    let stages = &shared.metrics.put_stages;
    stages.record(PutStage::Apply, queued - started);
    stages.record(PutStage::Log, published - queued);
    stages.record(PutStage::Wake, resumed - published);
    *durable_at = Some(resumed);
    if sync > 0 {
        let acked = wait_for(shared, deadline, || {
            let k = shared.read(|r| r.acked_by(version.ts));
            if k >= sync as usize { Ok(()) } else { Err(k) }
        })
        .await;
        if let Err(k) = acked {
            return ResponseBody::Error {
                code: error_code::SYNC_TIMEOUT,
                message: format!(
                    "write {version} is durable here but only {k} of the {sync} requested remote sites acked it within {} ms",
                    timeout.as_millis()
                ),
                version: Some(version.into()),
            };
        }
    }
    ResponseBody::Written {
        version: version.into(),
    }
}

/// A read of `key` at this site under the causal context `ctx`: what the QUIC service and the
/// RESP listener both serve a read with. Waits (until `deadline`) for `ctx` to be applied here.
///
/// Returns the value read and, when it is a local write not yet durable, the LSN to wait for
/// ([`Shared::wait_durable`]) before showing it; the caller waits, so that a pipeline of reads
/// and writes shares one fsync.
pub(crate) async fn read(
    shared: &Shared,
    key: &[u8],
    ctx: &VClock,
    deadline: Instant,
    timeout: Duration,
) -> Result<(ReadResult, Option<u64>), ResponseBody> {
    if let Err(e) = wire::check_sizes(key.len(), 0, &shared.cfg.limits) {
        Metrics::bump(&shared.metrics.too_large);
        return Err(too_large(e));
    }
    if let Some(refusal) = wrong_partition(shared, key) {
        return Err(refusal);
    }
    if let Some(refusal) = super::membership::lost(shared, ctx) {
        return Err(refusal);
    }
    wait_for(shared, deadline, || {
        shared.read(|r| {
            r.get(key, ctx).map(|res| {
                // Never show a value that a crash could still take back. A remote update
                // is durable at its origin before it is sent, and the origin resends it
                // until this site acks it durably; a session that saw it carries its
                // version in its context, so after a crash here its reads wait until it
                // is back. A local write is only on this site's disk: if the durable
                // `applied` vector does not cover the version read yet, fsync now and wait
                // until the log is durable as far as it was when the value was read.
                // Waiting only for the version read, not for the log's tail, keeps reads
                // off the path of unrelated writes.
                let lsn = res
                    .version
                    .filter(|v| v.site == r.site() && r.durable().get(v.site) < v.ts)
                    .map(|_| {
                        let w = shared.wal.lock().expect("wal lock");
                        let lsn = w.wal.end_lsn();
                        w.wal.request_sync(lsn);
                        lsn
                    });
                (res, lsn)
            })
        })
    })
    .await
    .map_err(|nr| not_ready(nr, timeout))
}

/// A write (`None` deletes) at this site under the causal context `ctx`: what the QUIC service
/// and the RESP listener both serve a write with. Waits (until `deadline`) for `ctx` to be
/// applied here, then applies the write.
///
/// Returns its version and the LSN to wait for ([`Shared::wait_durable`]) before
/// acknowledging it.
pub(crate) async fn write(
    shared: &Shared,
    key: Bytes,
    value: Option<Bytes>,
    ctx: &VClock,
    deadline: Instant,
    timeout: Duration,
) -> Result<(Version, u64), ResponseBody> {
    let vlen = value.as_ref().map_or(0, |v| v.len());
    if let Err(e) = wire::check_sizes(key.len(), vlen, &shared.cfg.limits) {
        Metrics::bump(&shared.metrics.too_large);
        return Err(too_large(e));
    }
    if let Some(refusal) = wrong_partition(shared, &key) {
        return Err(refusal);
    }
    if let Some(refusal) = super::membership::lost(shared, ctx) {
        return Err(refusal);
    }
    let leaving = &shared.changes.leaving;
    wait_for(shared, deadline, || {
        let (res, lsn) = shared.mutate(|r| {
            // Checked under the replica lock: once a leaving site has measured its drain, no
            // write can still enter its log.
            if leaving.load(Ordering::SeqCst) {
                return Ok(None);
            }
            r.put(now_micros(), key.clone(), value.clone(), ctx)
                .map(Some)
        });
        res.map(|v| v.map(|v| (v, lsn)))
    })
    .await
    .map_err(|nr| not_ready(nr, timeout))?
    .ok_or_else(super::membership::leaving_refusal)
}

/// Turns a strong request off the wire into the operation [`execute_strong`] runs.
async fn strong(
    shared: &Shared,
    op: &ArchivedClientOp,
    ctx: VClock,
    timeout: Duration,
) -> ResponseBody {
    let opt = |v: &rkyv::option::ArchivedOption<rkyv::vec::ArchivedVec<u8>>| {
        v.as_ref().map(|v| v.as_slice().to_vec())
    };
    let command = |client: u64, serial: u64, op: WriteOp| Command {
        client,
        serial,
        ctx: ctx.as_slice().to_vec(),
        op,
    };
    let fwd = match op {
        ArchivedClientOp::StrongWrite {
            key,
            value,
            client,
            serial,
        } => Forwarded::Write(command(
            client.to_native(),
            serial.to_native(),
            match opt(value) {
                Some(value) => WriteOp::Put {
                    key: key.to_vec(),
                    value,
                },
                None => WriteOp::Delete { key: key.to_vec() },
            },
        )),
        ArchivedClientOp::Cas {
            key,
            expected,
            new,
            client,
            serial,
        } => Forwarded::Write(command(
            client.to_native(),
            serial.to_native(),
            WriteOp::Cas {
                key: key.to_vec(),
                expected: opt(expected),
                new: opt(new),
            },
        )),
        ArchivedClientOp::StrongGet { key } => Forwarded::Read { key: key.to_vec() },
        _ => return error(error_code::BAD_REQUEST, "not a strong operation"),
    };
    execute_strong(shared, fwd, timeout).await
}

/// Adds a site to the cluster configuration through partition index 0's Raft group
/// (forwarded to its leader): the site gets the next id, as `joining`.
async fn sites_add(
    shared: &Shared,
    name: &str,
    addr: &str,
    expected_epoch: u64,
    (client, serial): (u64, u64),
    timeout: Duration,
) -> ResponseBody {
    if shared.cfg.partition != 0 {
        return error(
            error_code::BAD_REQUEST,
            format!(
                "this node serves partition {}; the cluster configuration is kept by partition 0",
                shared.cfg.partition
            ),
        );
    }
    if shared.cfg.partitions > 1 {
        // Partition nodes above 0 do not follow the configuration yet: refused, rather than
        // a site that partition 0 counts and the others do not.
        return error(
            error_code::BAD_REQUEST,
            "adding a site to a cluster of partitioned sites is not supported yet".to_owned(),
        );
    }
    let addr = match addr.parse() {
        Ok(a) => a,
        Err(e) => {
            return error(
                error_code::BAD_REQUEST,
                format!("site address {addr:?} is not IP:PORT: {e}"),
            );
        }
    };
    let cmd = Command {
        client,
        serial,
        ctx: Vec::new(),
        op: WriteOp::Sites(SitesOp::Add {
            expected_epoch,
            name: name.to_owned(),
            addr,
        }),
    };
    super::membership::changed(
        shared
            .strong
            .execute(Forwarded::Write(cmd), timeout, true)
            .await,
    )
}

/// Executes a strong operation through the partition's Raft group ([`super::strong`]), after
/// the size limits and the partition check; shared by the client service and the RESP
/// listener.
pub(super) async fn execute_strong(
    shared: &Shared,
    fwd: Forwarded,
    timeout: Duration,
) -> ResponseBody {
    let (key, vlen) = match &fwd {
        Forwarded::Write(c) => (c.op.key(), c.op.value_len()),
        Forwarded::Read { key } => (key.as_slice(), 0),
    };
    if let Err(e) = wire::check_sizes(key.len(), vlen, &shared.cfg.limits) {
        Metrics::bump(&shared.metrics.too_large);
        return too_large(e);
    }
    if let Some(refusal) = wrong_partition(shared, key) {
        return refusal;
    }
    let strong = &shared.strong;
    let drop_ctx = |ctx: Vec<u64>| {
        if strong.opts.drop_context {
            Vec::new()
        } else {
            ctx
        }
    };
    match strong.execute(fwd, timeout, true).await {
        Outcome::Applied(Reply::Written) => ResponseBody::StrongWritten,
        Outcome::Applied(Reply::CasOk) => ResponseBody::CasResult {
            ok: true,
            current: None,
            ctx: Vec::new(),
        },
        Outcome::Applied(Reply::CasFailed { current, ctx }) => ResponseBody::CasResult {
            ok: false,
            current,
            ctx: drop_ctx(ctx),
        },
        Outcome::Applied(Reply::Forgotten) => error(
            error_code::OUTCOME_UNKNOWN,
            "a retry of a strong write whose reply is no longer remembered: it may or may not \
             have been applied",
        ),
        // A configuration change: applied, or refused with the reason (nothing changed).
        Outcome::Applied(Reply::Membership(Ok(_))) => ResponseBody::StrongWritten,
        Outcome::Applied(Reply::Membership(Err(why))) => error(error_code::BAD_REQUEST, why),
        Outcome::Value { value, ctx } => ResponseBody::StrongValue {
            value,
            ctx: drop_ctx(ctx),
        },
        Outcome::Unavailable(m) => error(error_code::UNAVAILABLE, m),
        Outcome::Unknown(m) => error(error_code::OUTCOME_UNKNOWN, m),
        Outcome::NotLeader { leader } => error(
            error_code::UNAVAILABLE,
            format!("no leader reachable (last known: {leader:?})"),
        ),
    }
}

fn not_ready(nr: NotReady, timeout: Duration) -> ResponseBody {
    error(
        error_code::NOT_READY,
        format!("{nr} (waited {} ms)", timeout.as_millis()),
    )
}

/// Refuses a key that another partition node of this site holds.
fn wrong_partition(shared: &Shared, key: &[u8]) -> Option<ResponseBody> {
    let (me, parts) = (shared.cfg.partition, shared.cfg.partitions);
    let p = crate::sharding::partition_of(key, parts);
    (p != me).then(|| {
        error(
            error_code::WRONG_PARTITION,
            format!(
                "key belongs to partition {p} of {parts} (crc32(key) mod {parts}); this node is partition {me}: \
                 route by partition, e.g. --partitions {parts}"
            ),
        )
    })
}

/// Counts a request waiting for causal readiness while it lives ([`Shared::waiting_requests`]).
struct Waiting<'a>(&'a Shared);

impl<'a> Waiting<'a> {
    fn new(shared: &'a Shared) -> Self {
        if shared.waiting_requests.fetch_add(1, Ordering::Relaxed) == 0 {
            shared.sibling_kick.notify_waiters();
        }
        Waiting(shared)
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.waiting_requests.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Retries `f` each time replica state changes, until it succeeds or `deadline` passes; then
/// returns its last error.
pub(crate) async fn wait_for<T, E>(
    shared: &Shared,
    deadline: Instant,
    mut f: impl FnMut() -> Result<T, E>,
) -> Result<T, E> {
    let mut rx = shared.changed.subscribe();
    let mut waiting = None;
    loop {
        rx.borrow_and_update();
        let err = match f() {
            Ok(t) => return Ok(t),
            Err(e) => e,
        };
        // A partitioned site's siblings send their contributions at once while it waits.
        if waiting.is_none() && shared.cfg.partitions > 1 {
            waiting = Some(Waiting::new(shared));
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() || tokio::time::timeout(left, rx.changed()).await.is_err() {
            return Err(err);
        }
    }
}
