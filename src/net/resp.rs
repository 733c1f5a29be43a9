//! The RESP listener (`[resp]`): Redis clients over TCP and TLS, each connection a causal
//! session at this site.
//!
//! The protocol itself is the sans-IO [`crate::resp`]; this file reads requests off a TLS
//! stream, runs them and writes the replies. Reads and writes go through the same functions as
//! the QUIC client service ([`super::service::read`], [`super::service::write`]) under the
//! connection's causal context, so a connection has read-your-writes and monotonic reads like
//! a [`Client`](crate::Client) session. `CAUSAL.TOKEN` exports that context as the client
//! library's session token, and adopts one, so a session can move between sites and between
//! the two protocols.
//!
//! - TLS (tokio-rustls) with the site's certificate and the cluster CA, from the credentials
//!   in force ([`super::credentials`]): a reload applies to new connections. Client
//!   certificates are required unless `resp.require_client_cert = false`.
//! - One task per connection; past `resp.max_connections` a new connection is told `ERR max
//!   number of clients reached` and closed.
//! - Pipelining: the requests taken from one read (at most [`READ_CHUNK`] bytes) run in order;
//!   their writes are applied one by one and share one fsync, and the replies are sent
//!   together once every write among them is durable. Past `resp.max_pipeline` requests in one
//!   read, the rest are answered with an error and not run.
//! - A protocol error (garbage, an argument over `resp.max_arg_bytes`) is answered with an
//!   error and the connection closed, as Redis does; other connections are not affected.
//!
//! `WAIT n timeout` waits until `n` remote sites hold the connection's last write at this site
//! durably (their acks, as for [`Client::put_sync`](crate::Client::put_sync)), or the timeout
//! passes, and returns how many do.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tracing::{Instrument, debug, warn};

use super::metrics::{Metrics, Op};
use super::service;
use super::shared::Shared;
use crate::client::{decode_session_token, encode_session_token};
use crate::clock::VClock;
use crate::config::RespConfig;
use crate::consensus::{self, Forwarded, WriteOp};
use crate::resp::command::{self, CommandQuery, TABLE};
use crate::resp::{Command, Frame, Limits, Protocol, RequestParser};
use crate::wire::{ResponseBody, error_code};

/// Most bytes taken from the stream per read: what one batch of pipelined requests comes from.
pub const READ_CHUNK: usize = 16 << 10;

/// How long a client has to complete the TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Binds the listener (before the node's other sockets, so that a failure leaves nothing bound).
pub(crate) async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}

/// What every connection of a listener shares.
struct Listener {
    shared: Arc<Shared>,
    cfg: RespConfig,
    local: SocketAddr,
    connections: Arc<Semaphore>,
    next_id: AtomicU64,
    started: Instant,
}

/// Accepts connections until the node stops.
pub(crate) async fn serve(shared: Arc<Shared>, listener: TcpListener) {
    let cfg = shared
        .cfg
        .resp
        .clone()
        .expect("a RESP listener is configured");
    let local = listener.local_addr().unwrap_or(cfg.addr);
    let l = Arc::new(Listener {
        connections: Arc::new(Semaphore::new(cfg.max_connections)),
        cfg,
        local,
        next_id: AtomicU64::new(1),
        started: Instant::now(),
        shared,
    });
    let mut shutdown = l.shared.shutdown.clone();
    loop {
        let (tcp, remote) = tokio::select! {
            a = listener.accept() => match a {
                Ok(a) => a,
                Err(e) => {
                    // Out of descriptors and the like: back off rather than spin.
                    warn!(error = %e, "RESP accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = shutdown.changed() => return,
        };
        let _ = tcp.set_nodelay(true);
        let l = l.clone();
        let permit = l.connections.clone().try_acquire_owned();
        tokio::spawn(
            async move {
                let Some(stream) = handshake(&l, tcp, remote).await else {
                    return;
                };
                match permit {
                    Ok(_permit) => connection(&l, stream, remote).await,
                    Err(_) => {
                        warn!(%remote, max = l.cfg.max_connections, "RESP connection refused: resp.max_connections reached");
                        let mut stream = stream;
                        let mut out = BytesMut::new();
                        Frame::err("ERR max number of clients reached (resp.max_connections)")
                            .encode(Protocol::Resp2, &mut out);
                        let _ = stream.write_all(&out).await;
                        let _ = stream.shutdown().await;
                    }
                }
            }
            .in_current_span(),
        );
    }
}

async fn handshake(
    l: &Listener,
    tcp: TcpStream,
    remote: SocketAddr,
) -> Option<tokio_rustls::server::TlsStream<TcpStream>> {
    let config = l.shared.tls().resp.clone()?;
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
        Ok(Ok(s)) => Some(s),
        Ok(Err(e)) => {
            Metrics::bump(&l.shared.metrics.tls_failures);
            warn!(%remote, error = %e, "RESP connection refused during TLS handshake");
            None
        }
        Err(_) => {
            Metrics::bump(&l.shared.metrics.tls_failures);
            warn!(%remote, "RESP connection closed: no TLS handshake within 10 s");
            None
        }
    }
}

/// One connection's session.
struct Session {
    id: u64,
    remote: SocketAddr,
    name: Option<Bytes>,
    proto: Protocol,
    /// The causal context: everything this session wrote or read, or adopted with
    /// `CAUSAL.TOKEN`.
    ctx: VClock,
    /// The timestamp of the last write of this connection at this site (0: none): what `WAIT`
    /// waits for.
    last_write: u64,
    /// The connection's client id for strong writes (random), and the serial of its last
    /// one: what deduplicates a write the consensus layer retries.
    client: u64,
    serial: u64,
    connected: Instant,
    last_command: Instant,
}

/// A reply, and the log position that must be durable before it is sent (0: none).
struct Reply {
    frame: Frame,
    lsn: u64,
    /// Whether this reply acknowledges a write (replaced by an error if the fsync fails).
    write: bool,
}

impl From<Frame> for Reply {
    fn from(frame: Frame) -> Self {
        Reply {
            frame,
            lsn: 0,
            write: false,
        }
    }
}

/// Counts a batch as in flight, so that a graceful shutdown waits for it.
struct InFlight<'a>(&'a Shared);

impl<'a> InFlight<'a> {
    fn new(shared: &'a Shared) -> Self {
        shared.inflight.fetch_add(1, Ordering::SeqCst);
        InFlight(shared)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        if self.0.inflight.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.0.drained.notify_waiters();
        }
    }
}

async fn connection<S: AsyncRead + AsyncWrite + Unpin>(
    l: &Listener,
    mut stream: S,
    remote: SocketAddr,
) {
    let shared = &*l.shared;
    let limits = Limits {
        max_arg_bytes: l.cfg.max_arg_bytes,
        max_request_bytes: shared.cfg.limits.max_frame.max(l.cfg.max_arg_bytes + 1024),
        ..Limits::default()
    };
    let now = Instant::now();
    let mut s = Session {
        id: l.next_id.fetch_add(1, Ordering::Relaxed),
        remote,
        name: None,
        proto: Protocol::Resp2,
        ctx: VClock::zero(shared.n()),
        last_write: 0,
        client: crate::client::random_id(),
        serial: 0,
        connected: now,
        last_command: now,
    };
    debug!(%remote, id = s.id, "RESP connection");
    let mut shutdown = shared.shutdown.clone();
    let mut buf = BytesMut::with_capacity(READ_CHUNK);
    let mut parser = RequestParser::new(limits);
    let mut out = BytesMut::new();
    loop {
        let mut batch = Vec::new();
        let mut fatal = None;
        loop {
            match parser.next(&mut buf) {
                Ok(Some(args)) => batch.push(args),
                Ok(None) => break,
                Err(e) => {
                    fatal = Some(e);
                    break;
                }
            }
        }
        if batch.is_empty() && fatal.is_none() {
            let mut chunk = (&mut stream).take(READ_CHUNK as u64);
            let n = tokio::select! {
                r = chunk.read_buf(&mut buf) => r,
                _ = shutdown.changed() => return,
            };
            match n {
                Ok(0) | Err(_) => return,
                Ok(_) => continue,
            }
        }
        let in_flight = InFlight::new(shared);
        let mut replies: Vec<Reply> = Vec::with_capacity(batch.len());
        let mut close = false;
        for (i, args) in batch.iter().enumerate() {
            if i >= l.cfg.max_pipeline {
                replies.push(
                    Frame::err(format!(
                        "ERR pipeline deeper than {} requests in one read (resp.max_pipeline): request not run; \
                         wait for replies before sending more",
                        l.cfg.max_pipeline
                    ))
                    .into(),
                );
                continue;
            }
            s.last_command = Instant::now();
            let (reply, quit) = run(l, &mut s, args, &mut shutdown).await;
            replies.push(reply);
            if quit {
                close = true;
                break;
            }
        }
        // One fsync covers the whole batch: reply only once every write in it is durable.
        let lsn = replies.iter().map(|r| r.lsn).max().unwrap_or(0);
        if lsn > 0
            && let Err(e) = shared.wait_durable(lsn).await
        {
            for r in replies.iter_mut().filter(|r| r.lsn > 0) {
                r.frame = Frame::err(if r.write {
                    format!("ERR the write is applied but could not be made durable: {e}")
                } else {
                    format!("ERR storage failed: {e}")
                });
            }
        }
        // Every reply is decided: a graceful shutdown need not wait for them to be sent.
        drop(in_flight);
        for r in &replies {
            r.frame.encode(s.proto, &mut out);
            // Large replies go out as they are encoded: a batch holds one encoded at a time.
            if out.len() >= READ_CHUNK {
                if stream.write_all(&out).await.is_err() {
                    return;
                }
                out.clear();
            }
        }
        if let Some(e) = &fatal {
            warn!(%remote, id = s.id, error = %e, "RESP protocol error; closing the connection");
            Metrics::bump(&shared.metrics.malformed_frames);
            Frame::err(format!("ERR {e}")).encode(s.proto, &mut out);
            close = true;
        }
        if stream.write_all(&out).await.is_err() || stream.flush().await.is_err() {
            return;
        }
        out.clear();
        if close {
            let _ = stream.shutdown().await;
            return;
        }
    }
}

/// Runs one request. Returns its reply and whether to close the connection after it.
async fn run(
    l: &Listener,
    s: &mut Session,
    args: &[Bytes],
    shutdown: &mut tokio::sync::watch::Receiver<bool>,
) -> (Reply, bool) {
    let shared = &*l.shared;
    let cmd = match command::parse(args) {
        Ok(c) => c,
        Err(refusal) => return (Frame::err(refusal).into(), false),
    };
    let data = matches!(
        cmd,
        Command::Get(_)
            | Command::Set { .. }
            | Command::Del(_)
            | Command::Exists(_)
            | Command::MGet(_)
            | Command::MSet(_)
            | Command::SetIf { .. }
            | Command::Cas { .. }
            | Command::StrongGet(_)
            | Command::StrongSet { .. }
            | Command::StrongDel(_)
    );
    if data && shared.is_shutting_down() {
        return (Frame::err("ERR site is shutting down").into(), false);
    }
    let timeout = Duration::from_millis(shared.cfg.timeouts.request_ms);
    let deadline = Instant::now() + timeout;
    let reply: Reply = match cmd {
        Command::Get(key) => {
            let started = Instant::now();
            let r = get(shared, s, &key, deadline, timeout).await;
            shared
                .metrics
                .ops
                .record(Op::Get, r.is_ok(), started.elapsed());
            match r {
                Ok((value, lsn)) => Reply {
                    frame: value.map_or(Frame::Null, Frame::Bulk),
                    lsn,
                    write: false,
                },
                Err(e) => Frame::err(e).into(),
            }
        }
        Command::Set { key, value } => {
            match put(shared, s, key, Some(value), deadline, timeout).await {
                Ok(lsn) => Reply {
                    frame: Frame::ok(),
                    lsn,
                    write: true,
                },
                Err(e) => Frame::err(e).into(),
            }
        }
        Command::MSet(pairs) => {
            // Each key is its own write, in order, each depending on the ones before: a
            // session that sees one sees those before it. Not atomic across keys.
            let mut lsn = 0;
            for (key, value) in pairs {
                match put(shared, s, key, Some(value), deadline, timeout).await {
                    Ok(l) => lsn = lsn.max(l),
                    Err(e) => return failed_write(e, lsn),
                }
            }
            Reply {
                frame: Frame::ok(),
                lsn,
                write: true,
            }
        }
        Command::Del(keys) => {
            // Deletes what this session sees: the keys present are tombstoned and counted.
            let mut lsn = 0;
            let mut removed = 0;
            for key in keys {
                let present = match get(shared, s, &key, deadline, timeout).await {
                    Ok((v, l)) => {
                        lsn = lsn.max(l);
                        v.is_some()
                    }
                    Err(e) => return (Frame::err(e).into(), false),
                };
                if present {
                    match put(shared, s, key, None, deadline, timeout).await {
                        Ok(l) => lsn = lsn.max(l),
                        Err(e) => return failed_write(e, lsn),
                    }
                    removed += 1;
                }
            }
            Reply {
                frame: Frame::Integer(removed),
                lsn,
                write: true,
            }
        }
        Command::Exists(keys) => match get_many(shared, s, keys, None, deadline, timeout).await {
            Ok((values, lsn)) => Reply {
                frame: Frame::Integer(values.iter().filter(|v| v.is_some()).count() as i64),
                lsn,
                write: false,
            },
            Err(e) => Frame::err(e).into(),
        },
        Command::MGet(keys) => match get_many(
            shared,
            s,
            keys,
            Some(l.cfg.max_reply_bytes),
            deadline,
            timeout,
        )
        .await
        {
            Ok((values, lsn)) => Reply {
                frame: Frame::Array(
                    values
                        .into_iter()
                        .map(|v| v.map_or(Frame::Null, Frame::Bulk))
                        .collect(),
                ),
                lsn,
                write: false,
            },
            Err(e) => Frame::err(e).into(),
        },
        Command::SetIf {
            key,
            value,
            present,
        } => {
            let op = if present {
                WriteOp::PutIfPresent {
                    key: key.to_vec(),
                    value: value.to_vec(),
                }
            } else {
                WriteOp::Cas {
                    key: key.to_vec(),
                    expected: None,
                    new: Some(value.to_vec()),
                }
            };
            match strong(shared, s, StrongOp::Write(op), timeout).await {
                Ok(ResponseBody::CasResult { ok: true, .. }) => Frame::ok().into(),
                Ok(_) => Frame::Null.into(),
                Err(e) => Frame::err(e).into(),
            }
        }
        Command::Cas { key, expected, new } => {
            let op = WriteOp::Cas {
                key: key.to_vec(),
                expected: expected.map(|v| v.to_vec()),
                new: new.clone().map(|v| v.to_vec()),
            };
            let value = |v: Option<Bytes>| v.map_or(Frame::Null, Frame::Bulk);
            match strong(shared, s, StrongOp::Write(op), timeout).await {
                Ok(ResponseBody::CasResult { ok: true, .. }) => {
                    Frame::Array(vec![Frame::Integer(1), value(new)]).into()
                }
                Ok(ResponseBody::CasResult { current, .. }) => {
                    Frame::Array(vec![Frame::Integer(0), value(current.map(Bytes::from))]).into()
                }
                Ok(other) => Frame::err(message(other)).into(),
                Err(e) => Frame::err(e).into(),
            }
        }
        Command::StrongGet(key) => {
            match strong(shared, s, StrongOp::Read(key.to_vec()), timeout).await {
                Ok(ResponseBody::StrongValue { value, .. }) => {
                    value.map_or(Frame::Null, |v| Frame::Bulk(v.into())).into()
                }
                Ok(other) => Frame::err(message(other)).into(),
                Err(e) => Frame::err(e).into(),
            }
        }
        Command::StrongSet { key, value } => {
            let op = WriteOp::Put {
                key: key.to_vec(),
                value: value.to_vec(),
            };
            strong_written(strong(shared, s, StrongOp::Write(op), timeout).await)
        }
        Command::StrongDel(key) => {
            let op = WriteOp::Delete { key: key.to_vec() };
            strong_written(strong(shared, s, StrongOp::Write(op), timeout).await)
        }
        Command::Ping(None) => Frame::Simple("PONG".into()).into(),
        Command::Ping(Some(m)) | Command::Echo(m) => Frame::Bulk(m).into(),
        Command::Hello { version, setname } => {
            if let Some(v) = version {
                s.proto = if v == 3 {
                    Protocol::Resp3
                } else {
                    Protocol::Resp2
                };
            }
            if let Some(n) = setname {
                // An empty name clears it, as `CLIENT SETNAME ""` does.
                s.name = (!n.is_empty()).then_some(n);
            }
            hello(s).into()
        }
        Command::Select | Command::ClientSetInfo => Frame::ok().into(),
        Command::ClientSetName(n) => {
            s.name = (!n.is_empty()).then_some(n);
            Frame::ok().into()
        }
        Command::ClientGetName => s.name.clone().map_or(Frame::Null, Frame::Bulk).into(),
        Command::ClientId => Frame::Integer(s.id as i64).into(),
        Command::ClientInfo => Frame::bulk(client_info(l, s)).into(),
        Command::Command(q) => command_reply(q).into(),
        Command::Info(sections) => Frame::bulk(info(l, &sections)).into(),
        Command::DbSize => {
            Frame::Integer(shared.read(|r| crate::storage::Store::len(r.store())) as i64).into()
        }
        Command::Quit => return (Frame::ok().into(), true),
        Command::Reset => {
            s.proto = Protocol::Resp2;
            s.name = None;
            s.ctx = VClock::zero(shared.n());
            s.last_write = 0;
            Frame::Simple("RESET".into()).into()
        }
        Command::Wait {
            replicas,
            timeout_ms,
        } => Frame::Integer(wait(shared, s, replicas, timeout_ms, shutdown).await as i64).into(),
        Command::CausalToken(None) => Frame::bulk(encode_session_token(&s.ctx)).into(),
        Command::CausalToken(Some(t)) => {
            let t = String::from_utf8_lossy(&t);
            match decode_session_token(&t) {
                Some(ctx) => {
                    match crate::wire::check_vector(ctx.as_slice(), shared.n(), "the token") {
                        Ok(ctx) => {
                            s.ctx.merge(&ctx);
                            Frame::ok().into()
                        }
                        Err(e) => Frame::err(format!("ERR {e}")).into(),
                    }
                }
                None => Frame::err(format!(
                    "ERR not a session token: {:?} (CAUSAL.TOKEN returns one)",
                    t.chars().take(64).collect::<String>()
                ))
                .into(),
            }
        }
    };
    (reply, false)
}

/// A strong operation, as the connection asks for it.
enum StrongOp {
    Write(WriteOp),
    Read(Vec<u8>),
}

/// Runs a strong operation under the session's causal context: a write carries the context
/// (stored with its value), and the context a read or a failed compare-and-set returns joins
/// the session, so a causal read after it sees what the strong value's writer had seen.
/// Errors keep the consensus layer's type as their code: `UNAVAILABLE` (no leader or no
/// majority within the timeout) and `OUTCOMEUNKNOWN` (a write that timed out once proposed).
async fn strong(
    shared: &Shared,
    s: &mut Session,
    op: StrongOp,
    timeout: Duration,
) -> Result<ResponseBody, String> {
    let (fwd, metric) = match op {
        StrongOp::Read(key) => (Forwarded::Read { key }, Op::StrongGet),
        StrongOp::Write(op) => {
            let metric = match op {
                // A RESP connection never proposes configuration changes.
                WriteOp::Put { .. } | WriteOp::PutIfPresent { .. } | WriteOp::Sites(_) => {
                    Op::StrongPut
                }
                WriteOp::Delete { .. } => Op::StrongDelete,
                WriteOp::Cas { .. } => Op::Cas,
            };
            s.serial += 1;
            let cmd = consensus::Command {
                client: s.client,
                serial: s.serial,
                ctx: s.ctx.as_slice().to_vec(),
                op,
            };
            (Forwarded::Write(cmd), metric)
        }
    };
    let started = Instant::now();
    let body = service::execute_strong(shared, fwd, timeout).await;
    let ok = !matches!(body, ResponseBody::Error { .. });
    shared.metrics.ops.record(metric, ok, started.elapsed());
    match body {
        ResponseBody::Error { code, message, .. } => Err(match code {
            error_code::UNAVAILABLE => format!("UNAVAILABLE {message}"),
            error_code::OUTCOME_UNKNOWN => format!("OUTCOMEUNKNOWN {message}"),
            _ => message,
        }),
        ResponseBody::StrongValue { ref ctx, .. } | ResponseBody::CasResult { ref ctx, .. } => {
            let n = shared.n();
            if ctx.len() <= n {
                s.ctx.merge(&VClock::from_vec(ctx.clone()).resized(n));
            }
            Ok(body)
        }
        other => Ok(other),
    }
}

/// The reply to a strong put or delete.
fn strong_written(r: Result<ResponseBody, String>) -> Reply {
    match r {
        Ok(ResponseBody::StrongWritten) => Frame::ok().into(),
        Ok(other) => Frame::err(message(other)).into(),
        Err(e) => Frame::err(e).into(),
    }
}

/// The message of a refusal from the shared read and write paths.
fn message(body: ResponseBody) -> String {
    match body {
        ResponseBody::Error { message, .. } => message,
        other => format!("unexpected response {other:?}"),
    }
}

/// The reply to a command of several writes that failed part-way: the error, sent once the
/// writes before it (up to `lsn`) are durable; the connection stays open.
fn failed_write(e: String, lsn: u64) -> (Reply, bool) {
    (
        Reply {
            frame: Frame::err(e),
            lsn,
            write: true,
        },
        false,
    )
}

/// A read under the session's context; the version read joins the context, with what it
/// depends on (a partitioned site needs sessions' contexts closed under dependencies).
async fn get(
    shared: &Shared,
    s: &mut Session,
    key: &[u8],
    deadline: Instant,
    timeout: Duration,
) -> Result<(Option<Bytes>, u64), String> {
    let (res, lsn) = service::read(shared, key, &s.ctx, deadline, timeout)
        .await
        .map_err(message)?;
    if let Some(v) = res.version {
        s.ctx.raise(v.site, v.ts);
        s.ctx.merge(&res.deps);
    }
    Ok((res.value, lsn.unwrap_or(0)))
}

/// Reads of several keys, in order, under the session's context; refused once the values
/// would take a reply past `max_reply` bytes. Gives other connections their turn every so
/// many keys (a request may name a million).
async fn get_many(
    shared: &Shared,
    s: &mut Session,
    keys: Vec<Bytes>,
    max_reply: Option<usize>,
    deadline: Instant,
    timeout: Duration,
) -> Result<(Vec<Option<Bytes>>, u64), String> {
    let mut lsn = 0;
    let mut values = Vec::with_capacity(keys.len());
    let mut reply = 0usize;
    for key in keys {
        tokio::task::coop::consume_budget().await;
        let (v, l) = get(shared, s, &key, deadline, timeout).await?;
        lsn = lsn.max(l);
        // A value's bytes and its header.
        reply = reply.saturating_add(v.as_ref().map_or(0, Bytes::len) + REPLY_HEADER);
        if let Some(max) = max_reply
            && reply > max
        {
            return Err(format!(
                "ERR reply of more than {max} bytes (resp.max_reply_bytes): ask for fewer keys at a time"
            ));
        }
        values.push(v);
    }
    Ok((values, lsn))
}

/// What a reply's element adds to its value's bytes, at most: a bulk string's header and
/// line ends.
const REPLY_HEADER: usize = 16;

/// A write under the session's context (`None` deletes); its version joins the context.
async fn put(
    shared: &Shared,
    s: &mut Session,
    key: Bytes,
    value: Option<Bytes>,
    deadline: Instant,
    timeout: Duration,
) -> Result<u64, String> {
    let started = Instant::now();
    let op = if value.is_some() { Op::Put } else { Op::Delete };
    tokio::task::coop::consume_budget().await;
    // Stored for good: copied off the connection's receive buffer, which a slice would keep
    // whole (a 16 MiB buffer behind a 1-byte value).
    let key = Bytes::copy_from_slice(&key);
    let value = value.map(|v| Bytes::copy_from_slice(&v));
    let r = service::write(shared, key, value, &s.ctx, deadline, timeout).await;
    shared.metrics.ops.record(op, r.is_ok(), started.elapsed());
    let (version, lsn) = r.map_err(message)?;
    s.ctx.raise(version.site, version.ts);
    s.last_write = version.ts;
    Ok(lsn)
}

/// `WAIT`: how many remote sites hold the session's last write here durably, waiting until
/// `replicas` do or `timeout_ms` passes (0: no limit, as in Redis).
async fn wait(
    shared: &Shared,
    s: &Session,
    replicas: i64,
    timeout_ms: i64,
    shutdown: &mut tokio::sync::watch::Receiver<bool>,
) -> usize {
    let ts = s.last_write;
    let want = replicas.max(0) as usize;
    let count = || shared.read(|r| r.acked_by(ts));
    let limit = if timeout_ms == 0 {
        Duration::from_secs(365 * 86_400)
    } else {
        Duration::from_millis(timeout_ms as u64)
    };
    let deadline = Instant::now() + limit;
    let waited = service::wait_for(shared, deadline, || {
        let k = count();
        if k >= want { Ok(k) } else { Err(k) }
    });
    tokio::select! {
        r = waited => r.unwrap_or_else(|k| k),
        _ = shutdown.changed() => count(),
    }
}

fn hello(s: &Session) -> Frame {
    let kv = |k: &str, v: Frame| (Frame::bulk(k.to_owned()), v);
    // `version` is the Redis protocol level served (clients read it to pick features); the
    // server's own version is `causalkv_version`.
    Frame::Map(vec![
        kv("server", Frame::bulk("causalkv")),
        kv("version", Frame::bulk("7.0.0")),
        kv("causalkv_version", Frame::bulk(env!("CARGO_PKG_VERSION"))),
        kv("proto", Frame::Integer(s.proto.number())),
        kv("id", Frame::Integer(s.id as i64)),
        kv("mode", Frame::bulk("standalone")),
        kv("role", Frame::bulk("master")),
        kv("modules", Frame::Array(Vec::new())),
    ])
}

fn client_info(l: &Listener, s: &Session) -> String {
    let now = Instant::now();
    format!(
        "id={} addr={} laddr={} name={} age={} idle={} db=0 resp={} site={} token={}\n",
        s.id,
        s.remote,
        l.local,
        s.name
            .as_ref()
            .map(|n| String::from_utf8_lossy(n).into_owned())
            .unwrap_or_default(),
        now.duration_since(s.connected).as_secs(),
        now.duration_since(s.last_command).as_secs(),
        s.proto.number(),
        l.shared.cfg.me().name,
        encode_session_token(&s.ctx),
    )
}

fn command_reply(q: CommandQuery) -> Frame {
    match q {
        CommandQuery::All => Frame::Array(TABLE.iter().map(|c| c.frame()).collect()),
        CommandQuery::Count => Frame::Integer(TABLE.len() as i64),
        CommandQuery::List => Frame::Array(TABLE.iter().map(|c| Frame::bulk(c.name)).collect()),
        CommandQuery::Info(names) => Frame::Array(
            names
                .iter()
                .map(|n| command::lookup(n).map_or(Frame::Null, |c| c.frame()))
                .collect(),
        ),
        CommandQuery::Docs => Frame::Map(Vec::new()),
    }
}

/// `INFO`: the sections asked for (all when none), in Redis's `key:value` text format.
fn info(l: &Listener, sections: &[String]) -> String {
    let shared = &l.shared;
    let all = sections.is_empty()
        || sections
            .iter()
            .any(|s| matches!(s.as_str(), "all" | "default" | "everything"));
    let want = |name: &str| all || sections.iter().any(|s| s == name);
    let mut out = String::new();
    let status = shared.status();
    if want("server") {
        out += &format!(
            "# Server\r\nredis_version:7.0.0\r\ncausalkv_version:{}\r\nredis_mode:standalone\r\n\
             process_id:{}\r\ntcp_port:{}\r\nuptime_in_seconds:{}\r\ncluster_id:{}\r\nsite:{}\r\nsite_id:{}\r\n\r\n",
            env!("CARGO_PKG_VERSION"),
            std::process::id(),
            l.local.port(),
            l.started.elapsed().as_secs(),
            shared.cfg.cluster_id,
            status.name,
            status.site,
        );
    }
    if want("clients") {
        let connected = l.cfg.max_connections - l.connections.available_permits();
        out += &format!(
            "# Clients\r\nconnected_clients:{connected}\r\nmaxclients:{}\r\n\r\n",
            l.cfg.max_connections
        );
    }
    if want("replication") {
        let up = status.peers.iter().filter(|p| p.state == "up").count();
        out += &format!(
            "# Replication\r\nrole:master\r\nconnected_slaves:{up}\r\nsites:{}\r\n",
            shared.n()
        );
        for (i, p) in status.peers.iter().enumerate() {
            let clean = |t: &str| t.replace([',', ':', '\r', '\n'], " ");
            out += &format!(
                "peer{i}:site={},id={},addr={},state={},lag_updates={},lag_ms={},reason={}\r\n",
                p.name,
                p.site,
                p.addr,
                p.state,
                p.lag_updates,
                p.lag_ms,
                clean(&p.reason)
            );
        }
        out += "\r\n";
    }
    if want("keyspace") {
        out += &format!(
            "# Keyspace\r\ndb0:keys={},expires=0,avg_ttl=0\r\n\r\n",
            status.keys
        );
    }
    out
}
