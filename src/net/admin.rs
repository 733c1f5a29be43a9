//! The admin endpoints: metrics in the Prometheus text format and the status as JSON, over a
//! deliberately tiny HTTP/1.1 responder on plain TCP (`admin_addr`; bind it to loopback or a
//! management network).
//!
//! - `GET /metrics`: every metric is named `causalkv_*` with `# HELP` and `# TYPE` lines
//!   (text exposition format 0.0.4).
//! - `GET /status`: what `causalkv status --json` shows, plus the certificates in force
//!   (`certificates`: role, serial, `not_after`) and the reload counts.
//! - `POST /reload`: reloads the site's CA, certificate and key from their files (as `SIGHUP`
//!   does, see [`super::reload`]); `200` with the new certificate's serial, or `500` with the
//!   reason it was rejected (the previous certificates stay in force).
//!
//! The responder serves exactly one request per connection and then closes it
//! (`Connection: close`). It is strict: the request head must arrive within
//! [`IO_TIMEOUT`] and fit in [`MAX_HEAD`] bytes, the request line must be
//! `GET|HEAD|POST <path> HTTP/1.x`, every header line must be `name: value`, and a request body is
//! refused; anything else gets a 4xx answer. At most [`MAX_CONNECTIONS`] are served at once;
//! further connections are closed at once.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use quinn::Endpoint;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tracing::{debug, warn};

use super::metrics::{BUCKETS_MICROS, Histogram, Metrics, Op, PutStage, WireKind};
use super::shared::Shared;

/// Longest a connection may take to send its request and receive the answer.
pub const IO_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest request head (request line and headers), in bytes.
pub const MAX_HEAD: usize = 8 * 1024;
/// Most connections served at once.
pub const MAX_CONNECTIONS: usize = 16;

/// Binds the admin listener.
pub(crate) async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}

/// Serves admin requests until the node shuts down.
/// `endpoint` is the site's, for `POST /reload` to install a new server configuration on.
pub(crate) async fn serve(shared: Arc<Shared>, listener: TcpListener, endpoint: Endpoint) {
    let mut shutdown = shared.shutdown.clone();
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let (stream, remote) = tokio::select! {
            r = listener.accept() => match r {
                Ok(s) => s,
                Err(e) => {
                    // Out of file descriptors and the like: back off rather than spin.
                    warn!(error = %e, "admin accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = shutdown.changed() => return,
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            debug!(%remote, "admin connection refused: too many at once");
            continue;
        };
        let (shared, endpoint) = (shared.clone(), endpoint.clone());
        tokio::spawn(async move {
            let _permit = permit;
            match tokio::time::timeout(IO_TIMEOUT, handle(&shared, &endpoint, stream)).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => debug!(%remote, error = %e, "admin connection failed"),
                Err(_) => debug!(%remote, "admin connection timed out"),
            }
        });
    }
}

/// Reads one request head, answers it and closes the connection.
async fn handle(
    shared: &Shared,
    endpoint: &Endpoint,
    mut stream: TcpStream,
) -> std::io::Result<()> {
    let mut buf = Vec::with_capacity(1024);
    // Where the search for the head's end resumes: each byte is looked at once, however the
    // head is split across reads.
    let mut searched = 0;
    let head_len = loop {
        if let Some(i) = buf[searched..].windows(4).position(|w| w == b"\r\n\r\n") {
            break searched + i;
        }
        searched = buf.len().saturating_sub(3);
        if buf.len() >= MAX_HEAD {
            return reply(
                &mut stream,
                431,
                "text/plain",
                b"request head too large\n",
                true,
            )
            .await;
        }
        let mut chunk = [0u8; 1024];
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Ok(()); // closed before a complete request
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let text = "text/plain";
    let (status, content_type, body, head_only) = match parse(&buf[..head_len]) {
        Err((status, why)) => (status, text, format!("{why}\n"), false),
        Ok((Method::Post, "/reload")) => match super::reload::reload(shared, endpoint).await {
            Ok(cert) => (
                200,
                text,
                format!(
                    "reloaded: site certificate serial {}, not after {} (Unix seconds)\n",
                    cert.serial, cert.not_after
                ),
                false,
            ),
            Err(e) => (
                500,
                text,
                format!("reload rejected, the previous certificates stay in force: {e}\n"),
                false,
            ),
        },
        Ok((Method::Post, _)) => (405, text, "only /reload takes POST\n".into(), false),
        Ok((method, path)) => {
            let head_only = method == Method::Head;
            match path {
                "/metrics" => (
                    200,
                    "text/plain; version=0.0.4; charset=utf-8",
                    render_metrics(shared),
                    head_only,
                ),
                "/status" => (200, "application/json", status_json(shared), head_only),
                "/reload" => (405, text, "/reload takes POST\n".into(), head_only),
                _ => (
                    404,
                    text,
                    "not found: try /metrics, /status or POST /reload\n".into(),
                    head_only,
                ),
            }
        }
    };
    let with_body = !head_only;
    reply(
        &mut stream,
        status,
        content_type,
        body.as_bytes(),
        with_body,
    )
    .await
}

/// `GET /status`: the status, the certificates in force and the reload counts.
fn status_json(shared: &Shared) -> String {
    let mut json = serde_json::to_value(shared.status()).expect("status serialises");
    let certs: Vec<_> = shared
        .tls()
        .certs
        .iter()
        .map(|c| serde_json::json!({"cert": c.role, "serial": c.serial, "not_after": c.not_after}))
        .collect();
    json["certificates"] = certs.into();
    json["certificate_reloads"] = Metrics::get(&shared.metrics.tls_reloads).into();
    json["certificate_reloads_rejected"] = Metrics::get(&shared.metrics.tls_reload_failures).into();
    json.to_string() + "\n"
}

/// The request methods served.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Method {
    Get,
    Head,
    Post,
}

/// Checks a request head; returns the method and the path (query dropped).
fn parse(head: &[u8]) -> Result<(Method, &str), (u16, &'static str)> {
    let head = std::str::from_utf8(head).map_err(|_| (400, "request head is not UTF-8"))?;
    let mut lines = head.split("\r\n");
    let request_line = lines.next().unwrap_or_default();
    let mut parts = request_line.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err((400, "malformed request line"));
    };
    if version != "HTTP/1.1" && version != "HTTP/1.0" {
        return Err((505, "only HTTP/1.0 and HTTP/1.1 are served"));
    }
    for line in lines {
        let Some((name, _)) = line.split_once(':') else {
            return Err((400, "malformed header line"));
        };
        let name = name.trim();
        if name.is_empty() || name.contains(char::is_whitespace) {
            return Err((400, "malformed header name"));
        }
        if name.eq_ignore_ascii_case("transfer-encoding")
            || (name.eq_ignore_ascii_case("content-length")
                && line.split_once(':').is_some_and(|(_, v)| v.trim() != "0"))
        {
            return Err((400, "request bodies are not accepted"));
        }
    }
    let method = match method {
        "GET" => Method::Get,
        "HEAD" => Method::Head,
        "POST" => Method::Post,
        _ => return Err((405, "only GET, HEAD and POST are served")),
    };
    if !target.starts_with('/') {
        return Err((400, "the request target must be a path"));
    }
    let path = target.split_once('?').map_or(target, |(p, _)| p);
    Ok((method, path))
}

async fn reply(
    stream: &mut TcpStream,
    status: u16,
    content_type: &str,
    body: &[u8],
    with_body: bool,
) -> std::io::Result<()> {
    let reason = match status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        _ => "HTTP Version Not Supported",
    };
    let allow = if status == 405 {
        "Allow: GET, HEAD, POST\r\n"
    } else {
        ""
    };
    let head = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\
         {allow}Cache-Control: no-store\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    if with_body {
        stream.write_all(body).await?;
    }
    stream.shutdown().await
}

/// Writes metric families in the text exposition format.
struct Exposition(String);

impl Exposition {
    /// Starts a family: its `# HELP` and `# TYPE` lines.
    fn family(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.0, "# HELP {name} {help}");
        let _ = writeln!(self.0, "# TYPE {name} {kind}");
    }

    /// One sample; `labels` are `(name, value)` pairs, values escaped here.
    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: impl std::fmt::Display) {
        self.0.push_str(name);
        if !labels.is_empty() {
            self.0.push('{');
            for (i, (k, v)) in labels.iter().enumerate() {
                if i > 0 {
                    self.0.push(',');
                }
                let _ = write!(self.0, "{k}=\"{}\"", escape(v));
            }
            self.0.push('}');
        }
        let _ = writeln!(self.0, " {value}");
    }

    /// A family with a single unlabelled sample.
    fn single(&mut self, name: &str, kind: &str, help: &str, value: impl std::fmt::Display) {
        self.family(name, kind, help);
        self.sample(name, &[], value);
    }

    /// The samples of one histogram with `labels`.
    fn histogram(&mut self, name: &str, labels: &[(&str, &str)], h: &Histogram) {
        let (cumulative, sum_micros) = h.snapshot();
        let bucket = format!("{name}_bucket");
        for (i, count) in cumulative.iter().enumerate() {
            let le = BUCKETS_MICROS
                .get(i)
                .map_or("+Inf".to_string(), |us| (*us as f64 / 1e6).to_string());
            let mut l = labels.to_vec();
            l.push(("le", &le));
            self.sample(&bucket, &l, count);
        }
        self.sample(&format!("{name}_sum"), labels, sum_micros as f64 / 1e6);
        let total = cumulative.last().copied().unwrap_or(0);
        self.sample(&format!("{name}_count"), labels, total);
    }
}

/// Escapes a label value (backslash, double quote, newline).
fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// A peer state as a gauge value: 0 up, 1 suspect, 2 down.
fn state_value(state: &str) -> u8 {
    match state {
        "up" => 0,
        "suspect" => 1,
        _ => 2,
    }
}

/// Renders every metric of the node in the Prometheus text format.
/// The bytes sent over peer links per kind, and the UDP payload bytes behind them.
fn render_wire_bytes(e: &mut Exposition, shared: &Shared) {
    let w = &shared.metrics.wire;
    let name = "causalkv_peer_bytes_out_total";
    e.family(
        name,
        "counter",
        "Bytes sent over peer links, by what they carry: payload (keys and values), deps, \
         marker, framing (frame and item headers), ack, heartbeat, hello, sibling, raft, copy \
         (datagram copies of update frames); quic is \
         the UDP payload of peer connections less the other kinds except sibling.",
    );
    let mut app = 0;
    for kind in WireKind::ALL {
        let v = if kind == WireKind::Raft {
            shared.strong.rpc_bytes_out()
        } else {
            w.get(kind)
        };
        if kind != WireKind::Sibling {
            app += v;
        }
        e.sample(name, &[("kind", kind.name())], v);
    }
    let udp = Metrics::get(&w.udp_tx);
    e.sample(name, &[("kind", "quic")], udp.saturating_sub(app));
    e.single(
        "causalkv_peer_udp_tx_bytes_total",
        "counter",
        "UDP payload bytes sent on peer connections (sampled every 250 ms).",
        udp,
    );
}

pub(crate) fn render_metrics(shared: &Shared) -> String {
    let status = shared.status();
    let m = &shared.metrics;
    let get = Metrics::get;
    let mut e = Exposition(String::with_capacity(8 * 1024));

    e.family(
        "causalkv_site_info",
        "gauge",
        "This site's name and id (always 1).",
    );
    let id = status.site.to_string();
    e.sample(
        "causalkv_site_info",
        &[("site", &status.name), ("id", &id)],
        1,
    );

    e.family(
        "causalkv_certificate_expiry_seconds",
        "gauge",
        "Seconds until each loaded certificate (the site's own, the CA) expires; negative once \
         expired.",
    );
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    let tls = shared.tls();
    for c in &tls.certs {
        e.sample(
            "causalkv_certificate_expiry_seconds",
            &[("cert", c.role)],
            c.not_after - now,
        );
    }
    e.family(
        "causalkv_certificate_info",
        "gauge",
        "The certificates in force (always 1): serial number and notAfter (Unix seconds).",
    );
    for c in &tls.certs {
        let not_after = c.not_after.to_string();
        e.sample(
            "causalkv_certificate_info",
            &[
                ("cert", c.role),
                ("serial", &c.serial),
                ("not_after", &not_after),
            ],
            1,
        );
    }
    e.family(
        "causalkv_certificate_reloads_total",
        "counter",
        "Certificate reloads (SIGHUP, POST /reload), by result: ok (in force) or rejected (the \
         previous certificates stayed in force).",
    );
    e.sample(
        "causalkv_certificate_reloads_total",
        &[("result", "ok")],
        get(&m.tls_reloads),
    );
    e.sample(
        "causalkv_certificate_reloads_total",
        &[("result", "rejected")],
        get(&m.tls_reload_failures),
    );

    e.family(
        "causalkv_requests_total",
        "counter",
        "Client requests answered, by operation and result.",
    );
    for op in Op::ALL {
        let s = m.ops.get(op);
        for (result, c) in [("ok", &s.ok), ("error", &s.errors)] {
            e.sample(
                "causalkv_requests_total",
                &[("op", op.name()), ("result", result)],
                get(c),
            );
        }
    }
    e.family(
        "causalkv_request_duration_seconds",
        "histogram",
        "Time from a valid request frame to its response, by operation.",
    );
    for op in Op::ALL {
        e.histogram(
            "causalkv_request_duration_seconds",
            &[("op", op.name())],
            &m.ops.get(op).latency,
        );
    }
    e.single(
        "causalkv_requests_in_flight",
        "gauge",
        "Client requests being served.",
        shared.inflight.load(Ordering::Relaxed),
    );
    e.single(
        "causalkv_requests_too_large_total",
        "counter",
        "Client requests refused for the size of a key, value or frame.",
        get(&m.too_large),
    );
    e.single(
        "causalkv_malformed_frames_total",
        "counter",
        "Frames (client or peer) that failed validation.",
        get(&m.malformed_frames),
    );
    let sm = &shared.strong.metrics;
    e.single(
        "causalkv_consensus_elections_total",
        "counter",
        "Elections seen by this node's Raft voter (term changes).",
        get(&sm.elections),
    );
    e.single(
        "causalkv_consensus_leader_changes_total",
        "counter",
        "Changes of the strong-operation leader this node knows of.",
        get(&sm.leader_changes),
    );
    e.family(
        "causalkv_consensus_commit_duration_seconds",
        "histogram",
        "Time from a strong write's proposal at the leader to its commit and apply.",
    );
    e.histogram(
        "causalkv_consensus_commit_duration_seconds",
        &[],
        &sm.commit,
    );
    e.single(
        "causalkv_consensus_unavailable_total",
        "counter",
        "Strong requests that failed with Unavailable (no leader or no majority in time).",
        get(&sm.unavailable),
    );
    e.single(
        "causalkv_consensus_outcome_unknown_total",
        "counter",
        "Strong writes whose outcome was unknown at their deadline.",
        get(&sm.unknown),
    );
    e.single(
        "causalkv_consensus_forwarded_total",
        "counter",
        "Strong requests forwarded to the leader's site.",
        get(&sm.forwarded),
    );
    e.single(
        "causalkv_consensus_malformed_total",
        "counter",
        "Malformed consensus frames received from peers.",
        get(&sm.malformed),
    );
    let cs = shared.strong.status();
    e.single(
        "causalkv_consensus_term",
        "gauge",
        "The current Raft term of this node's partition group.",
        cs.term,
    );
    e.single(
        "causalkv_consensus_is_leader",
        "gauge",
        "1 if this node leads its partition's Raft group.",
        u8::from(cs.state == "Leader"),
    );
    e.single(
        "causalkv_consensus_commit_index",
        "gauge",
        "The Raft commit index.",
        cs.commit_index.unwrap_or(0),
    );
    let ms = shared.membership_status();
    e.single(
        "causalkv_membership_epoch",
        "gauge",
        "The epoch of the cluster configuration this node holds (0: not bootstrapped yet).",
        ms.epoch,
    );
    e.single(
        "causalkv_membership_sites",
        "gauge",
        "Sites in the cluster configuration this node holds, removed ones left out.",
        ms.sites
            .iter()
            .filter(|s| !s.state.starts_with("removed"))
            .count(),
    );
    // Membership changes in progress, by site and phase (`leaving: draining`,
    // `removed-dead: relaying up to the cut`): 1 while under way.
    e.family(
        "causalkv_membership_change",
        "gauge",
        "A membership change in progress at this node, by site and phase (1 while under way).",
    );
    for s in &ms.sites {
        let phase = if s.state.starts_with("leaving") {
            Some("leaving: draining")
        } else if s.state.starts_with("removed-dead: relaying") {
            Some("removed-dead: relaying up to the cut")
        } else if s.state == "joining" {
            Some("joining")
        } else {
            None
        };
        if let Some(phase) = phase {
            e.sample(
                "causalkv_membership_change",
                &[("site", &s.name), ("phase", phase)],
                1,
            );
        }
    }
    e.single(
        "causalkv_retention_held",
        "gauge",
        "1 while this node prunes nothing from its retained log because a peer counts a site \
         it has not applied the addition of yet.",
        u8::from(shared.read(|r| r.retention_held())),
    );
    e.single(
        "causalkv_membership_joining",
        "gauge",
        "Sites in the cluster configuration still joining (added, not yet active).",
        ms.sites
            .iter()
            .filter(|s| s.state.starts_with("joining"))
            .count(),
    );
    e.single(
        "causalkv_join_snapshots_served_total",
        "counter",
        "Snapshots this node sent to joining sites.",
        get(&m.snapshots_served),
    );
    e.single(
        "causalkv_hellos_rejected_total",
        "counter",
        "Peer hellos refused (wrong cluster, wrong site, certificate mismatch).",
        get(&m.hellos_rejected),
    );
    e.single(
        "causalkv_tls_handshake_failures_total",
        "counter",
        "Connections whose TLS handshake or certificate check failed.",
        get(&m.tls_failures),
    );
    e.single(
        "causalkv_replication_batches_in_total",
        "counter",
        "Update batches received from peers.",
        get(&m.batches_in),
    );
    e.single(
        "causalkv_replication_batches_out_total",
        "counter",
        "Update batches sent to peers.",
        get(&m.batches_out),
    );
    e.single(
        "causalkv_replication_bytes_in_total",
        "counter",
        "Bytes of update frames received from peers.",
        get(&m.bytes_in),
    );
    e.single(
        "causalkv_replication_bytes_out_total",
        "counter",
        "Bytes of update frames sent to peers.",
        get(&m.bytes_out),
    );
    e.single(
        "causalkv_replication_copies_out_total",
        "counter",
        "Datagram copies of update frames sent to peers (replication.redundancy).",
        get(&m.copies_out),
    );
    e.single(
        "causalkv_replication_copies_used_total",
        "counter",
        "Datagram copies from peers that delivered an update or marker before its stream did.",
        shared.read(|r| r.stats().copies_used),
    );
    e.single(
        "causalkv_sibling_contributions_out_total",
        "counter",
        "Stable-vector contributions sent to the site's other partitions.",
        get(&m.contributions_out),
    );
    e.single(
        "causalkv_sibling_bytes_out_total",
        "counter",
        "Bytes of stable-vector contribution frames sent to the site's other partitions.",
        get(&m.contribution_bytes_out),
    );
    render_wire_bytes(&mut e, shared);
    e.single(
        "causalkv_wal_fsyncs_total",
        "counter",
        "Write-ahead log fsyncs.",
        status.fsyncs,
    );
    let w = &shared.wal_stats;
    e.single(
        "causalkv_wal_commits_total",
        "counter",
        "Group commits: fsyncs of the log thread that made newly written records durable.",
        get(&w.commits),
    );
    e.single(
        "causalkv_wal_committed_records_total",
        "counter",
        "Records made durable by group commits (records per fsync = this / \
         causalkv_wal_commits_total).",
        get(&w.committed_records),
    );
    e.family(
        "causalkv_wal_fsync_duration_seconds",
        "histogram",
        "Time each write-ahead log fsync took.",
    );
    e.histogram(
        "causalkv_wal_fsync_duration_seconds",
        &[],
        &w.fsync_duration,
    );
    e.family(
        "causalkv_wal_commit_wait_seconds",
        "histogram",
        "Per group commit: from its oldest record queued to its fsync started.",
    );
    e.histogram("causalkv_wal_commit_wait_seconds", &[], &w.commit_wait);
    e.family(
        "causalkv_wal_write_duration_seconds",
        "histogram",
        "Time each write(2) of queued log records took.",
    );
    e.histogram(
        "causalkv_wal_write_duration_seconds",
        &[],
        &w.write_duration,
    );
    e.family(
        "causalkv_put_stage_seconds",
        "histogram",
        "Client writes, stage by stage: apply (request to log record queued), log (queued to \
         durable under the fsync policy), wake (durable to the request running again), reply \
         (to the response written).",
    );
    for stage in PutStage::ALL {
        e.histogram(
            "causalkv_put_stage_seconds",
            &[("stage", stage.name())],
            m.put_stages.get(stage),
        );
    }
    e.single(
        "causalkv_wal_bytes",
        "gauge",
        "Bytes of write-ahead log on disk.",
        status.wal_bytes,
    );
    e.single(
        "causalkv_keys",
        "gauge",
        "Keys held, tombstones included.",
        status.keys,
    );
    e.single(
        "causalkv_buffered_updates",
        "gauge",
        "Remote updates in the dependency buffer, waiting for their dependencies.",
        status.buffered,
    );
    e.single(
        "causalkv_retained_updates",
        "gauge",
        "Own updates retained until every peer acks them.",
        status.retained,
    );

    let peers: Vec<(&str, &crate::wire::PeerStatus)> =
        status.peers.iter().map(|p| (p.name.as_str(), p)).collect();
    e.family(
        "causalkv_peer_state",
        "gauge",
        "Peer state from the failure detector: 0 up, 1 suspect, 2 down.",
    );
    for (name, p) in &peers {
        e.sample(
            "causalkv_peer_state",
            &[("peer", name)],
            state_value(&p.state),
        );
    }
    e.family(
        "causalkv_peer_phi",
        "gauge",
        "Phi-accrual suspicion level of the peer (0 before any heartbeat).",
    );
    for (name, p) in &peers {
        e.sample("causalkv_peer_phi", &[("peer", name)], p.phi);
    }
    e.family(
        "causalkv_peer_silence_seconds",
        "gauge",
        "Time since the peer's last heartbeat or ack.",
    );
    for (name, p) in &peers {
        e.sample(
            "causalkv_peer_silence_seconds",
            &[("peer", name)],
            p.silence_ms as f64 / 1e3,
        );
    }
    e.family(
        "causalkv_replication_lag_updates",
        "gauge",
        "Own updates the peer has not acked yet.",
    );
    for (name, p) in &peers {
        e.sample(
            "causalkv_replication_lag_updates",
            &[("peer", name)],
            p.lag_updates,
        );
    }
    e.family(
        "causalkv_replication_lag_seconds",
        "gauge",
        "How far the peer's acked entry for this site is behind this site's clock.",
    );
    for (name, p) in &peers {
        e.sample(
            "causalkv_replication_lag_seconds",
            &[("peer", name)],
            p.lag_ms as f64 / 1e3,
        );
    }
    e.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_heads_are_parsed_strictly() {
        fn ok(h: &str) -> Result<(Method, &str), (u16, &'static str)> {
            parse(h.as_bytes())
        }
        assert_eq!(
            ok("GET /metrics HTTP/1.1\r\nHost: x"),
            Ok((Method::Get, "/metrics"))
        );
        assert_eq!(
            ok("HEAD /status?x=1 HTTP/1.0"),
            Ok((Method::Head, "/status"))
        );
        assert_eq!(ok("POST /reload HTTP/1.1"), Ok((Method::Post, "/reload")));
        assert_eq!(
            ok("GET /metrics HTTP/1.1\r\nContent-Length: 0"),
            Ok((Method::Get, "/metrics"))
        );
        assert_eq!(ok("PUT /metrics HTTP/1.1").unwrap_err().0, 405);
        assert_eq!(ok("GET /metrics HTTP/2").unwrap_err().0, 505);
        assert_eq!(ok("GET  /metrics HTTP/1.1").unwrap_err().0, 400);
        assert_eq!(ok("GET /metrics").unwrap_err().0, 400);
        assert_eq!(ok("GET http://x/ HTTP/1.1").unwrap_err().0, 400);
        assert_eq!(ok("GET / HTTP/1.1\r\nbroken").unwrap_err().0, 400);
        assert_eq!(ok("GET / HTTP/1.1\r\nbad name: v").unwrap_err().0, 400);
        assert_eq!(
            ok("GET / HTTP/1.1\r\nContent-Length: 5").unwrap_err().0,
            400
        );
        assert_eq!(
            ok("GET / HTTP/1.1\r\nTransfer-Encoding: chunked")
                .unwrap_err()
                .0,
            400
        );
        assert_eq!(parse(b"GET /\xff HTTP/1.1").unwrap_err().0, 400);
    }

    #[test]
    fn exposition_lines_are_well_formed() {
        let mut e = Exposition(String::new());
        e.family("causalkv_x", "gauge", "An x.");
        e.sample("causalkv_x", &[("peer", "a\"b\\c\nd")], 1.5);
        let h = Histogram::default();
        h.record(Duration::from_micros(300));
        e.histogram("causalkv_h", &[("op", "get")], &h);
        let text = e.0;
        assert!(text.starts_with("# HELP causalkv_x An x.\n# TYPE causalkv_x gauge\n"));
        assert!(
            text.contains("causalkv_x{peer=\"a\\\"b\\\\c\\nd\"} 1.5\n"),
            "{text}"
        );
        assert!(
            text.contains("causalkv_h_bucket{op=\"get\",le=\"0.00025\"} 0\n"),
            "{text}"
        );
        assert!(
            text.contains("causalkv_h_bucket{op=\"get\",le=\"0.0005\"} 1\n"),
            "{text}"
        );
        assert!(
            text.contains("causalkv_h_bucket{op=\"get\",le=\"+Inf\"} 1\n"),
            "{text}"
        );
        assert!(
            text.contains("causalkv_h_sum{op=\"get\"} 0.0003\n"),
            "{text}"
        );
        assert!(text.contains("causalkv_h_count{op=\"get\"} 1\n"), "{text}");
    }
}
