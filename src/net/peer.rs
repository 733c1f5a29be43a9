//! Peer links: the connections between sites.
//!
//! Each site dials every peer ([`run_outbound`]) and sends its own update stream on that
//! connection; it receives each peer's stream on the connection that peer dialed
//! ([`run_inbound`]). So every pair of sites has two connections, each carrying one origin's
//! ordered stream, and a reconnect of one never disturbs the other direction.
//!
//! On every connection:
//! 1. the dialer opens a bidirectional control stream and both sides send a [`PeerHello`]
//!    (protocol version, cluster id, claimed site id, durable `applied` vector; a peer of
//!    another [`PROTOCOL_VERSION`](crate::peer_wire::PROTOCOL_VERSION) is refused with both
//!    versions named). The acceptor checks the claim
//!    against the certificate: the client certificate must name the site it claims
//!    (`site-<name>.causalkv`), or the hello is refused with a reason and the connection closed.
//!    The dialer already checked the server certificate names the site it dialed. A peer counts
//!    as connected only after this exchange: TLS 1.3 reports a refused client certificate only
//!    at the first stream.
//! 2. the dialer opens one unidirectional stream and sends [`UpdateBatch`](crate::peer_wire::UpdateBatch)
//!    frames from the receiver's `applied` entry on (the replica's retained log is the backlog:
//!    a slow peer costs log space, not memory in a channel).
//! 3. the acceptor sends its durable `applied` vector on the control stream: within
//!    `ACK_EVERY` of a change to the peer's own entry, else folded into the next such ack or
//!    into the heartbeat an idle link carries every `idle_every`. That is the ack (retention,
//!    synchronous replication) and the heartbeat: each arrival feeds the peer's phi-accrual
//!    failure detector ([`super::failure`]), which decides whether the peer is `up`, `suspect`
//!    or `down`.
//!
//! A malformed frame closes the connection with [`close_code::MALFORMED`] and bumps a counter;
//! the dialer reconnects with exponential backoff. A dialer whose link has heard nothing from
//! the peer for three idle intervals (`idle_every`: an idle link still carries a heartbeat
//! that often; three heartbeats with several partitions) dials again alongside it, and carries the link on over the new
//! connection if that gets through first (see `replace_when_silent`).
//!
//! With several partitions per site, a node links only with the nodes of its own partition at
//! the other sites (one ordered stream per origin and partition), and with the other partitions
//! of its own site ([`run_sibling`]): over those sibling links, on the same hello and mutual
//! TLS, each node sends its contribution to the site's stable vector every
//! `replication.stable_exchange_ms` (see [`crate::sharding`]).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use quinn::{Connection, Endpoint, RecvStream, SendStream, VarInt};
use tracing::{debug, info, warn};

use super::metrics::{Metrics, WireKind};
use super::shared::{Shared, now_micros};
use crate::clock::{SiteId, VClock};
use crate::config::Redundancy;
use crate::peer_wire::{self, PeerControl, PeerHello};
use crate::tls;
use crate::wire::{self, WireError, close_code, read_frame, write_frame};

/// Why a link failed.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    /// Connecting failed.
    #[error("connect: {0}")]
    Connect(#[from] quinn::ConnectError),
    /// The connection failed or was closed.
    #[error("connection: {0}")]
    Connection(#[from] quinn::ConnectionError),
    /// Writing failed.
    #[error("write: {0}")]
    Write(#[from] quinn::WriteError),
    /// A frame was malformed or the stream failed.
    #[error(transparent)]
    Wire(#[from] WireError),
    /// The hello exchange failed.
    #[error("hello refused: {0}")]
    Hello(String),
    /// TLS configuration.
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    /// The link heard nothing from the peer for several heartbeats while a new connection got
    /// through: it was replaced by that connection.
    #[error("replaced: the link was silent while a new connection got through")]
    Replaced,
    /// The peer was removed from the cluster configuration: the link is not kept up any more.
    #[error("the peer was removed from the cluster")]
    Removed,
}

/// Who a hello says is at the other end of a link.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Remote {
    /// The node of this node's partition at another site.
    Peer(SiteId),
    /// Another partition node of this node's own site.
    Sibling(u32),
    /// The node of this node's partition at a joining site, asking for a snapshot
    /// ([`PeerControl::SnapshotRequest`]).
    Joiner(SiteId),
}

/// Payload bytes (keys and values) up to which a batch is serialised under the replica lock.
const LOCKED_ENCODE_MAX: usize = 1 << 20;

/// Shortest gap between two acks on a control stream: a peer's own entry (what its retention
/// and synchronous writes wait for) is acked at most this late; acks in between are folded
/// into the next.
const ACK_EVERY: Duration = Duration::from_millis(20);

/// How often an idle link carries something: a heartbeat (an unchanged ack) on each control
/// stream, and a clock marker on each update stream (markers issued in between are folded into
/// the next; with several partitions, a marker that passes a sibling's write goes out at once). Two and a half heartbeat intervals: 250 ms by default,
/// a few hundred bytes per second per link. The failure detector learns this interval.
fn idle_every(shared: &Shared) -> Duration {
    Duration::from_millis(shared.cfg.timeouts.heartbeat_ms * 5 / 2)
}

/// Frames a sibling link may send within one `stable_exchange_ms`: a burst of a few lets the
/// frame that answers a sibling's wait go out at once even when the one that announced this
/// partition's own wait just went.
const SIBLING_BURST: usize = 3;

/// Most dials to one peer outstanding at once (see `dial_racing` and `replace_when_silent`).
const MAX_DIALS: usize = 3;

/// A dialled connection after its hellos: the connection, the remote's durable `applied`
/// vector and the control stream.
type Dialled = (Connection, (VClock, ControlStream));

/// Keeps an outbound link to `peer` up, reconnecting with exponential backoff.
pub(crate) async fn run_outbound(shared: Arc<Shared>, endpoint: Endpoint, peer: SiteId) {
    let name = shared.site_name(peer);
    // The connection that replaced a silent link, for the next attempt to run on.
    let replacement = Mutex::new(None);
    keep_up(
        &shared,
        &name,
        Some(&shared.peer_redial[peer as usize]),
        || outbound_once(&shared, &endpoint, peer, &replacement),
        |result| {
            let mut st = shared.peers[peer as usize].lock().expect("peer lock");
            let was_up = std::mem::replace(&mut st.outbound_up, false);
            if let Err(e) = result {
                st.reason = e.to_string();
            }
            was_up
        },
    )
    .await
}

/// Keeps the link to sibling partition `partition` of this site up: sends this node's
/// contribution to the site's stable vector every `stable_exchange_ms` (and at least every
/// heartbeat).
pub(crate) async fn run_sibling(shared: Arc<Shared>, endpoint: Endpoint, partition: u32) {
    let name = format!("{}/p{partition}", shared.site_name(shared.site()));
    keep_up(
        &shared,
        &name,
        Some(&shared.sibling_redial[partition as usize]),
        || sibling_once(&shared, &endpoint, partition),
        |_| false,
    )
    .await
}

/// Runs `attempt` again and again until shutdown, with exponential backoff between failures.
/// `ended` says whether the attempt had brought the link up. After an attempt that never did
/// (the peer was unreachable), a notification on `redial` (the peer has dialled in: it is back)
/// ends the wait at once. After a link that was up and failed, the peer was reachable and
/// something else went wrong, so the full backoff applies: two sites whose links keep failing
/// after their hellos cannot wake each other into a tight reconnection loop.
async fn keep_up<F, Fut>(
    shared: &Arc<Shared>,
    name: &str,
    redial: Option<&tokio::sync::Notify>,
    mut attempt: F,
    mut ended: impl FnMut(&Result<(), LinkError>) -> bool,
) where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<(), LinkError>>,
{
    let mut shutdown = shared.shutdown.clone();
    let max_backoff = Duration::from_millis(shared.cfg.timeouts.max_backoff_ms);
    let mut backoff = Duration::from_millis(20);
    loop {
        let started = Instant::now();
        let result = attempt().await;
        let was_up = ended(&result);
        if shared.is_shutting_down() {
            return;
        }
        if matches!(result, Err(LinkError::Removed)) {
            info!(peer = %name, "peer removed from the cluster; its link stops");
            return;
        }
        if matches!(result, Err(LinkError::Replaced)) {
            // The replacement is connected already: carry on over it at once.
            info!(peer = %name, "link was silent; carrying on over a new connection");
            continue;
        }
        if let Err(e) = result {
            warn!(peer = %name, error = %e, "link failed; reconnecting");
        }
        if started.elapsed() > Duration::from_secs(5) {
            backoff = Duration::from_millis(20); // the link had been up: start over
        }
        let redialled = async {
            match redial {
                Some(n) if !was_up => n.notified().await,
                _ => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = redialled => debug!(peer = %name, "peer dialled in; redialling before the backoff ends"),
            _ = shutdown.changed() => return,
        }
        backoff = (backoff * 2).min(max_backoff);
    }
}

async fn outbound_once(
    shared: &Arc<Shared>,
    endpoint: &Endpoint,
    peer: SiteId,
    replacement: &Mutex<Option<Dialled>>,
) -> Result<(), LinkError> {
    let name = shared.site_name(peer);
    if shared.read(|r| r.removed(peer)).is_some() {
        return Err(LinkError::Removed);
    }
    let carried = replacement.lock().expect("replacement lock").take();
    let (conn, (their, (send, recv))) = match carried {
        Some(d) => d,
        None => dial_racing(shared, endpoint, Remote::Peer(peer)).await?,
    };
    shared.mutate(|r| r.on_peer_connected(peer, &their));
    {
        let mut st = shared.peers[peer as usize].lock().expect("peer lock");
        st.outbound_up = true;
        st.connected(Instant::now());
        st.reason = "connected".into();
    }
    info!(peer = %name, "link to peer up");
    // Raft RPCs to the peer ride this connection, each on a stream of its own.
    shared.strong.set_link(peer as u64, Some(&conn));
    let heard = Arc::new(AtomicU64::new(now_micros()));
    let control = tokio::spawn(run_control(
        shared.clone(),
        peer,
        conn.clone(),
        send,
        recv,
        heard.clone(),
        false,
    ));
    let result = tokio::select! {
        r = send_updates(shared, &conn, peer) => r,
        next = replace_when_silent(shared, endpoint, peer, &conn, &heard) => {
            conn.close(VarInt::from_u32(close_code::SUPERSEDED), b"replaced: the link was silent");
            *replacement.lock().expect("replacement lock") = Some(next);
            Err(LinkError::Replaced)
        }
    };
    control.abort();
    shared.strong.set_link(peer as u64, None);
    result
}

/// Dials `remote`, racing a new dial against the old ones when it dials in meanwhile.
async fn dial_racing(
    shared: &Arc<Shared>,
    endpoint: &Endpoint,
    remote: Remote,
) -> Result<Dialled, LinkError> {
    // A handshake sent while the peer was down is only retransmitted on QUIC's probe timer
    // (about 1 s, then doubling). When the peer dials in while no dial of ours has heard from
    // it yet, it is back: a new dial starts at once, racing the old ones (whichever completes
    // first is the link; the others are closed with SUPERSEDED when they complete, so the peer
    // never sees a stray close, and cancelled at shutdown). Only dial-ins that arrive while we
    // wait count (notify_waiters), so a stale one can never cancel a fresh dial.
    let (redial, name) = match remote {
        Remote::Peer(peer) | Remote::Joiner(peer) => {
            (&shared.peer_redial[peer as usize], shared.site_name(peer))
        }
        Remote::Sibling(p) => (&shared.sibling_redial[p as usize], "sibling".to_owned()),
    };
    let mut dials = tokio::task::JoinSet::new();
    let mut answered: Vec<Arc<AtomicBool>> = Vec::new();
    let spawn_dial = |dials: &mut tokio::task::JoinSet<_>| {
        let (shared, endpoint) = (shared.clone(), endpoint.clone());
        let flag = Arc::new(AtomicBool::new(false));
        let answered = flag.clone();
        dials.spawn(async move { dial(&shared, &endpoint, remote, Some(&flag)).await });
        answered
    };
    let mut notified = std::pin::pin!(redial.notified());
    notified.as_mut().enable();
    answered.push(spawn_dial(&mut dials));
    let won = loop {
        tokio::select! {
            Some(r) = dials.join_next() => {
                match r.map_err(|e| LinkError::Hello(format!("dial task failed: {e}"))).and_then(|r| r) {
                    Ok(won) => break won,
                    Err(e) if dials.is_empty() => return Err(e),
                    Err(_) => {}
                }
            }
            _ = notified.as_mut() => {
                notified.set(redial.notified());
                notified.as_mut().enable();
                let heard = answered.iter().any(|a| a.load(Ordering::Acquire));
                if !heard && dials.len() < MAX_DIALS {
                    debug!(peer = %name, ?remote, "it dialled in before our dial heard from it; redialling");
                    answered.push(spawn_dial(&mut dials));
                }
            }
        }
    };
    set_aside(shared, dials);
    Ok(won)
}

/// Lets the dials still running in `dials` finish in the background and closes each that
/// completes with SUPERSEDED, so the peer never sees a stray close; they are cancelled at
/// shutdown.
fn set_aside(shared: &Shared, mut dials: tokio::task::JoinSet<Result<Dialled, LinkError>>) {
    if dials.is_empty() {
        return;
    }
    let mut shutdown = shared.shutdown.clone();
    tokio::spawn(async move {
        loop {
            tokio::select! {
                r = dials.join_next() => match r {
                    Some(Ok(Ok((conn, _)))) => {
                        conn.close(VarInt::from_u32(close_code::SUPERSEDED), b"superseded");
                    }
                    Some(_) => {}
                    None => return,
                },
                // Dropping the set cancels the dials still running.
                _ = shutdown.changed() => return,
            }
        }
    });
}

/// Completes with a new connection to `peer` (hellos exchanged) once the link on `conn` has
/// heard nothing from the peer (`heard`, the time in µs of the last ack or heartbeat on it)
/// for three idle intervals (`idle_every`) and a new dial got through while it still was silent.
///
/// A link that loses every packet for a while (a cut, an isolation) is not closed before the
/// idle timeout, but QUIC doubles its retransmission timeout at every probe that goes
/// unanswered: after a loss of a second or two, the next probe, and with it the updates and
/// acks stuck in the connection, can come seconds after the path is back, and the peer's view
/// of this origin stands still until then. So while the link is silent, new dials go out (one
/// every two round trips, at most [`MAX_DIALS`] at once): the first that completes while the
/// link is still silent carries it on, resending from the peer's durable `applied` entry. The
/// same covers a peer that restarted without this side seeing a close. A dial is never
/// cancelled mid-handshake (the peer would count a refused handshake); one that completes
/// after the link was heard again is closed.
async fn replace_when_silent(
    shared: &Arc<Shared>,
    endpoint: &Endpoint,
    peer: SiteId,
    conn: &Connection,
    heard: &AtomicU64,
) -> Dialled {
    let hb = Duration::from_millis(shared.cfg.timeouts.heartbeat_ms);
    // An idle link hears from the peer once per `idle_every`.
    let silence = 3 * idle_every(shared);
    let silent_for =
        || Duration::from_micros(now_micros().saturating_sub(heard.load(Ordering::Acquire)));
    let mut dials = tokio::task::JoinSet::new();
    let mut last_dial: Option<Instant> = None;
    let won = loop {
        let quiet = silent_for();
        let every = hb.max(2 * conn.rtt());
        let wait = if quiet < silence {
            silence - quiet
        } else {
            if dials.len() < MAX_DIALS && last_dial.is_none_or(|t| t.elapsed() >= every) {
                debug!(peer = %shared.site_name(peer), "link silent; dialling alongside it");
                let (shared, endpoint) = (shared.clone(), endpoint.clone());
                dials
                    .spawn(async move { dial(&shared, &endpoint, Remote::Peer(peer), None).await });
                last_dial = Some(Instant::now());
            }
            every
        };
        tokio::select! {
            Some(r) = dials.join_next(), if !dials.is_empty() => {
                if let Ok(Ok((new, rest))) = r {
                    if silent_for() >= silence {
                        break (new, rest);
                    }
                    new.close(VarInt::from_u32(close_code::SUPERSEDED), b"superseded");
                }
            }
            _ = tokio::time::sleep(wait) => {}
        }
    };
    set_aside(shared, dials);
    won
}

type ControlStream = (SendStream, RecvStream);

/// Connects to `remote`, opens the control stream and exchanges hellos: returns the connection,
/// the remote's durable `applied` vector and the control stream.
/// `answered`, when given, is set once the remote has answered the handshake.
async fn dial(
    shared: &Arc<Shared>,
    endpoint: &Endpoint,
    remote: Remote,
    answered: Option<&AtomicBool>,
) -> Result<Dialled, LinkError> {
    let (site, addr) = match remote {
        Remote::Peer(peer) | Remote::Joiner(peer) => (peer, shared.peer_addr(peer)),
        Remote::Sibling(p) => (shared.site(), shared.cfg.me().partition_addr(p)),
    };
    let name = shared.site_name(site);
    // The credentials in force now: a reload applies to the next dial.
    let client = tls::client_config(&shared.tls().identity, &shared.transport, tls::ALPN_PEER)?;
    let mut connecting = endpoint.connect_with(client, addr, &tls::site_server_name(&name))?;
    connecting.handshake_data().await?;
    if let Some(a) = answered {
        a.store(true, Ordering::Release);
    }
    let conn = connecting.await?;
    let (mut send, mut recv) = conn.open_bi().await?;
    send_hello(shared, &mut send).await?;
    let (said, their, width) = read_hello_raw(shared, &mut recv).await?;
    if said != remote {
        return Err(LinkError::Hello(format!(
            "dialed {remote:?} at {addr} but it says it is {said:?}"
        )));
    }
    if let Remote::Peer(_) = said {
        // Before its vector prunes anything (see `Replica::on_peer_counts`).
        shared.mutate(|r| r.on_peer_counts(width));
    }
    Ok((conn, (their, (send, recv))))
}

/// One connection to a sibling partition: hello, then contributions until it fails.
async fn sibling_once(
    shared: &Arc<Shared>,
    endpoint: &Endpoint,
    partition: u32,
) -> Result<(), LinkError> {
    let (conn, (_, (mut send, _recv))) =
        dial_racing(shared, endpoint, Remote::Sibling(partition)).await?;
    debug!(partition, "sibling link up");
    // What needs the sibling soon goes at once (at most SIBLING_BURST frames per
    // `stable_exchange_ms`): a local write made durable (the sibling passes it on its streams
    // with a marker, and remote readers wait for that), a change while the sibling waits on the
    // stable vector, and a change of whether this partition waits. Anything else (clock markers moving entries
    // along) waits for the heartbeat, so an idle partitioned site exchanges ten small
    // messages a second per sibling rather than hundreds.
    let every = Duration::from_millis(shared.cfg.replication.stable_exchange_ms);
    let hb = Duration::from_millis(shared.cfg.timeouts.heartbeat_ms);
    let mut changed = shared.changed.subscribe();
    let mut shutdown = shared.shutdown.clone();
    let mut last: Option<VClock> = None;
    let mut last_write = 0;
    let mut last_waiting = false;
    let mut last_at = Instant::now();
    // When the frames before this one went: at most SIBLING_BURST per `every`.
    let mut recent: std::collections::VecDeque<Instant> = Default::default();
    loop {
        let kick = shared.sibling_kick.notified();
        tokio::pin!(kick);
        kick.as_mut().enable();
        changed.borrow_and_update();
        let (contribution, write, blocked) =
            shared.read(|r| (r.contribution(), r.durable_write(), r.waits_on_siblings()));
        let waiting = blocked || shared.waiting_requests.load(Ordering::Relaxed) > 0;
        let moved = last.as_ref() != Some(&contribution);
        let wanted = shared.sibling_waiting[partition as usize].load(Ordering::Relaxed);
        let since = last_at.elapsed();
        if since >= hb || write > last_write || waiting != last_waiting || (moved && wanted) {
            let frame = peer_wire::encode_contribution(
                last.as_ref().map(VClock::as_slice),
                contribution.as_slice(),
                waiting,
                (write > last_write).then_some(write),
            );
            write_frame(&mut send, &frame)
                .await
                .map_err(|e| LinkError::Wire(WireError::Io(e)))?;
            let m = &shared.metrics;
            Metrics::bump(&m.contributions_out);
            m.contribution_bytes_out
                .fetch_add(wire::framed_len(frame.len()) as u64, Ordering::Relaxed);
            m.wire.add(WireKind::Sibling, wire::framed_len(frame.len()));
            last = Some(contribution);
            last_write = write;
            last_waiting = waiting;
            last_at = Instant::now();
            recent.push_back(last_at);
            if recent.len() >= SIBLING_BURST {
                let oldest = recent.pop_front().expect("a frame");
                tokio::select! {
                    _ = tokio::time::sleep_until((oldest + every).into()) => {}
                    _ = shutdown.changed() => return Ok(()),
                    e = conn.closed() => return Err(e.into()),
                }
            }
            continue;
        }
        tokio::select! {
            r = changed.changed() => if r.is_err() { return Ok(()) },
            _ = &mut kick => {}
            _ = tokio::time::sleep(hb - since) => {}
            _ = shutdown.changed() => return Ok(()),
            e = conn.closed() => return Err(e.into()),
        }
    }
}

/// Reads a sibling's contributions and feeds them to the replica until the stream ends.
async fn receive_contributions(
    shared: &Arc<Shared>,
    conn: &Connection,
    partition: u32,
    mut recv: RecvStream,
) {
    let mut prev = None;
    let mut write = 0;
    loop {
        match read_vector(&mut recv, || shared.n(), "contribution vector", &mut prev).await {
            Ok(Some((v, ack))) => {
                write = ack.write.unwrap_or(write);
                let was =
                    shared.sibling_waiting[partition as usize].swap(ack.waiting, Ordering::Relaxed);
                if ack.waiting && !was {
                    // It waits now: the link to it sends this partition's contribution at once.
                    shared.sibling_kick.notify_waiters();
                }
                shared.mutate(|r| r.on_sibling(partition, &v, write));
            }
            Ok(None) => return,
            Err(e) => {
                malformed(
                    shared,
                    conn,
                    &format!("partition {partition}"),
                    "control frame",
                    &e.to_string(),
                );
                return;
            }
        }
    }
}

/// Reads the next ack ([`peer_wire::decode_ack`]) from a control stream, decoded against
/// `prev`, the previous ack read from the same stream (updated here): `None` when the stream
/// ends or fails; an error for a malformed frame.
async fn read_vector(
    recv: &mut RecvStream,
    n: impl Fn() -> usize,
    what: &str,
    prev: &mut Option<Vec<u64>>,
) -> Result<Option<(VClock, peer_wire::Ack)>, WireError> {
    let frame = match read_frame(recv, 64 * 1024).await {
        Ok(Some(f)) => f,
        Ok(None) | Err(WireError::Io(_)) => return Ok(None),
        Err(e) => return Err(e),
    };
    let mut ack = peer_wire::decode_ack(prev.as_deref(), &frame)?;
    let clock = fit_peer_vector(&ack.v, n(), what)?;
    *prev = Some(std::mem::take(&mut ack.v));
    Ok(Some((clock, ack)))
}

/// Fits a peer's `applied` vector (hello, ack, heartbeat) or a sibling's contribution to the
/// `n` sites this node counts. A shorter one (written before a site was added) reads as zeros
/// past its end. A longer one comes from a node that already counts a site added since, which
/// this node has not applied yet: its entries past `n` are dropped, whatever they are (the new
/// site starts issuing clock markers as soon as it runs, so they are soon above zero). They
/// speak of a site this node neither sends to nor waits on yet; the width itself is what
/// matters here, and the caller passes it on ([`Replica::on_peer_counts`]). Refusing such a
/// vector instead would cut a node that lags on the change off from every peer, Raft included
/// (its RPCs ride the same connections), so it could never catch up.
///
/// [`Replica::on_peer_counts`]: crate::replica::Replica::on_peer_counts
fn fit_peer_vector(v: &[u64], n: usize, what: &str) -> Result<VClock, WireError> {
    wire::check_vector(&v[..v.len().min(n)], n, what)
}

/// Streams this site's updates to `peer` until the connection fails or the node stops.
async fn send_updates(
    shared: &Arc<Shared>,
    conn: &Connection,
    peer: SiteId,
) -> Result<(), LinkError> {
    let mut stream = conn.open_uni().await?;
    let max = shared.cfg.replication.batch_max_items;
    // Update frames go out at most every `linger`: at once on a link that has been quiet that
    // long, else that long after the previous one, carrying everything that became durable in
    // between (fewer, fuller packets at a bounded cost in latency).
    let linger = Duration::from_millis(shared.cfg.replication.linger_ms);
    // A frame must stay under the frame limit (the config keeps max_frame above one largest
    // update plus 4096 bytes, so a single update always fits).
    let max_bytes = shared.cfg.limits.max_frame - 4096;
    let mut shutdown = shared.shutdown.clone();
    let idle = idle_every(shared);
    // The newest marker sent on this link: an urgent one (passing a sibling's write, see
    // `Replica::urgent_marker`) goes at once, once durable.
    let mut marker_sent: u64 = 0;
    let mut last_sent = Instant::now()
        .checked_sub(idle)
        .unwrap_or_else(Instant::now);
    // What the last frame sent on this stream left: the next one is written against it (see
    // `peer_wire::StreamBase`).
    let mut base = peer_wire::StreamBase::default();
    let mut copies = Copies::new(shared, conn);
    loop {
        let notified = shared.peer_wake[peer as usize].notified();
        let since = last_sent.elapsed();
        if since < linger {
            tokio::time::sleep(linger - since).await;
        }
        // Room for a datagram copy of this frame, if the link sends copies now (none for the
        // first frame of a stream: a copy names the item it follows).
        let copy_room = if base.ts != 0 { copies.room(conn) } else { 0 };
        // A batch of small updates is serialised straight from the retained log under the lock
        // (tens of µs). A batch carrying more than LOCKED_ENCODE_MAX bytes is copied out by
        // reference count first and serialised after the lock is released, so that large
        // values never hold client requests up for a multi-megabyte copy.
        let (batch, held) = {
            let mut r = shared.replica.lock().expect("replica lock");
            let urgent = r.urgent_marker();
            let cursor = r.sent_to(peer);
            let batch = r
                .poll_batch_refs(peer, max, max_bytes)
                .map(|(updates, marker)| {
                    let payload: usize = updates
                        .clone()
                        .map(crate::replica::Update::payload_len)
                        .sum();
                    // A copy reads on its own: written against no base.
                    let copy = (payload < copy_room).then(|| {
                        let none = peer_wire::StreamBase::default();
                        peer_wire::encode_updates(&none, updates.clone(), marker).frame
                    });
                    let b = if payload <= LOCKED_ENCODE_MAX {
                        Ok(peer_wire::encode_updates(&base, updates, marker))
                    } else {
                        Err((updates.cloned().collect::<Vec<_>>(), marker))
                    };
                    (b, payload, marker, copy)
                });
            // Markers alone on an idle link: at most one per `idle`; the next carries the
            // newest timestamp anyway. Except a marker that passes a sibling's write: remote
            // readers of that write wait for it. A marker held back stays in the stream.
            let held = batch.as_ref().is_some_and(|&(_, payload, marker, _)| {
                payload == 0
                    && last_sent.elapsed() < idle
                    && !(urgent > marker_sent && marker.is_some_and(|m| m >= urgent))
            });
            if held {
                r.rewind_sent(peer, cursor);
            }
            (batch, held)
        };
        let batch = batch.map(|(b, payload, marker, copy)| {
            let b = b.unwrap_or_else(|(updates, marker)| {
                peer_wire::encode_updates(&base, updates.iter(), marker)
            });
            (b, payload, marker, copy)
        });
        match batch {
            Some((b, _, _, _)) if held => {
                debug_assert_eq!(b.deps_bytes, 0);
                let left = idle.saturating_sub(last_sent.elapsed());
                tokio::select! {
                    _ = notified => {}
                    _ = tokio::time::sleep(left) => {}
                    _ = shutdown.changed() => return Ok(()),
                    e = conn.closed() => return Err(e.into()),
                }
            }
            Some((b, payload, marker, copy)) => {
                last_sent = Instant::now();
                marker_sent = marker_sent.max(marker.unwrap_or(0));
                let prev = base.ts;
                base.clone_from(&b.next);
                let frame = &b.frame;
                write_frame(&mut stream, frame)
                    .await
                    .map_err(|e| LinkError::Wire(WireError::Io(e)))?;
                Metrics::bump(&shared.metrics.batches_out);
                let total = wire::framed_len(frame.len());
                shared
                    .metrics
                    .bytes_out
                    .fetch_add(total as u64, std::sync::atomic::Ordering::Relaxed);
                count_batch(&shared.metrics, &b, payload, total);
                if let Some(copy) = copy {
                    copies.send(shared, conn, prev, &copy, copy_room).await;
                }
            }
            None => {
                tokio::select! {
                    _ = notified => {}
                    _ = shutdown.changed() => return Ok(()),
                    e = conn.closed() => return Err(e.into()),
                }
            }
        }
    }
}

/// Whether a link sends datagram copies of its update frames (`replication.redundancy`), and
/// sending them.
struct Copies {
    mode: Redundancy,
    window: Duration,
    /// The connection's lost packets when last looked at, and when that count last grew.
    lost: u64,
    lost_at: Option<Instant>,
}

impl Copies {
    fn new(shared: &Shared, conn: &Connection) -> Self {
        Self {
            mode: shared.cfg.replication.redundancy,
            window: Duration::from_millis(shared.cfg.replication.redundancy_window_ms),
            lost: conn.stats().path.lost_packets,
            lost_at: None,
        }
    }

    /// The largest payload (keys and values) a frame may carry to be copied now: 0 when the
    /// link sends no copies (`auto` on a link that lost nothing within the window).
    fn room(&mut self, conn: &Connection) -> usize {
        let on = match self.mode {
            Redundancy::Off => false,
            Redundancy::Always => true,
            Redundancy::Auto => {
                let lost = conn.stats().path.lost_packets;
                if lost > self.lost {
                    self.lost = lost;
                    self.lost_at = Some(Instant::now());
                }
                self.lost_at.is_some_and(|at| at.elapsed() < self.window)
            }
        };
        if on {
            conn.max_datagram_size().unwrap_or(0)
        } else {
            0
        }
    }

    /// Sends `frame` (written against no base), the frame after the stream's item at `prev`,
    /// as a datagram if it fits in `room`. The stream's frame was just written: the copy waits
    /// for the connection to send that first, so that the two never share a packet (a packet
    /// lost would take both).
    async fn send(&self, shared: &Shared, conn: &Connection, prev: u64, frame: &[u8], room: usize) {
        let copy = peer_wire::encode_copy(prev, frame);
        if copy.len() > room {
            return;
        }
        tokio::task::yield_now().await;
        let n = copy.len();
        match conn.send_datagram(bytes::Bytes::from(copy)) {
            Ok(()) => {
                Metrics::bump(&shared.metrics.copies_out);
                shared.metrics.wire.add(WireKind::Copy, n);
            }
            // Too large after all (the path's MTU shrank), or the connection is closing: the
            // stream carries the frame anyway.
            Err(e) => debug!(error = %e, "datagram copy not sent"),
        }
    }
}

/// Counts an update frame of `total` bytes (length prefix included) by what it carries.
fn count_batch(m: &Metrics, b: &peer_wire::EncodedBatch, payload: usize, total: usize) {
    if payload == 0 && b.deps_bytes == 0 {
        // Markers only: the whole frame is their cost.
        m.wire.add(WireKind::Marker, total);
        return;
    }
    m.wire.add(WireKind::Payload, payload);
    m.wire.add(WireKind::Deps, b.deps_bytes);
    m.wire.add(WireKind::Marker, b.marker_bytes);
    m.wire.add(
        WireKind::Framing,
        total.saturating_sub(payload + b.deps_bytes + b.marker_bytes),
    );
}

/// Serves a connection another site dialed: hello, then its update stream.
pub(crate) async fn run_inbound(shared: Arc<Shared>, conn: Connection) {
    let remote = conn.remote_address();
    let (mut send, mut recv) = match conn.accept_bi().await {
        Ok(s) => s,
        Err(e) => {
            // A client certificate the TLS layer refused surfaces here, at the first stream.
            Metrics::bump(&shared.metrics.tls_failures);
            warn!(%remote, error = %e, "peer connection failed before its hello");
            return;
        }
    };
    let claimed = match read_hello_from(&shared, &conn, &mut recv).await {
        Ok(v) => v,
        Err(reason) => {
            Metrics::bump(&shared.metrics.hellos_rejected);
            warn!(%remote, %reason, "peer refused");
            let reject = wire::encode(&PeerControl::Reject {
                reason: reason.clone(),
            });
            let _ = write_frame(&mut send, &reject).await;
            let _ = send.finish();
            tokio::time::sleep(Duration::from_millis(50)).await;
            conn.close(
                VarInt::from_u32(close_code::HELLO_REJECTED),
                reason.as_bytes(),
            );
            return;
        }
    };
    let (remote, their, width) = claimed;
    if let Remote::Joiner(site) = remote {
        // Answered with the snapshot, not a hello.
        super::join::serve_snapshot(shared, conn, send, site).await;
        return;
    }
    if send_hello(&shared, &mut send).await.is_err() {
        return;
    }
    let peer = match remote {
        Remote::Peer(peer) => peer,
        Remote::Joiner(_) => unreachable!("answered above"),
        Remote::Sibling(partition) => {
            debug!(partition, "inbound sibling link up");
            // It is up: if our link to it hangs in a dial sent before it listened, dial now.
            shared.sibling_redial[partition as usize].notify_waiters();
            receive_contributions(&shared, &conn, partition, recv).await;
            return;
        }
    };
    shared.mutate(|r| {
        // The sites it counts first: a site it counts and this node does not may need what
        // its vector would prune (see `Replica::on_peer_counts`).
        r.on_peer_counts(width);
        r.on_peer_applied(peer, &their)
    });
    // It is back: if our link to it is waiting out a backoff or hanging in a dial sent while
    // it was down, dial now.
    shared.peer_redial[peer as usize].notify_waiters();
    shared.peers[peer as usize]
        .lock()
        .expect("peer lock")
        .connected(Instant::now());
    debug!(peer = %shared.site_name(peer), "inbound link up");
    // The peer's Raft RPCs and forwarded strong requests: each a bidirectional stream of its
    // own on this connection, after the control stream.
    let rpcs = tokio::spawn(shared.strong.clone().serve_connection(conn.clone()));
    let heard = Arc::new(AtomicU64::new(0));
    let control = tokio::spawn(run_control(
        shared.clone(),
        peer,
        conn.clone(),
        send,
        recv,
        heard,
        true,
    ));
    let copies = tokio::spawn(receive_copies(shared.clone(), conn.clone(), peer));
    let result = receive_updates(&shared, &conn, peer).await;
    control.abort();
    rpcs.abort();
    copies.abort();
    if let Err(e) = result {
        let name = shared.site_name(peer);
        if matches!(
            e,
            LinkError::Wire(WireError::Io(_)) | LinkError::Connection(_)
        ) {
            debug!(peer = %name, error = %e, "inbound link closed");
        } else {
            malformed(&shared, &conn, &name, "update stream", &e.to_string());
        }
    }
}

/// Receives `peer`'s datagram copies of its update frames (see `Copies`) until the connection
/// ends. A copy is only ever early: one that arrives while the dependency buffer is over its
/// limit is dropped, and the stream carries its items anyway.
async fn receive_copies(shared: Arc<Shared>, conn: Connection, peer: SiteId) {
    let limits = shared.cfg.limits;
    let max_buffered = shared.cfg.replication.max_buffered;
    while let Ok(datagram) = conn.read_datagram().await {
        let copy = peer_wire::decode_copy(
            &datagram,
            peer,
            crate::consensus::members::MAX_SITES,
            &limits,
        )
        .and_then(|(prev, mut items)| {
            fit_to_sites(&shared, &mut items)?;
            Ok((prev, items))
        });
        match copy {
            Ok(_) if shared.read(|r| r.buffer().len_from(peer)) > max_buffered => {}
            Ok((prev, items)) => {
                shared.mutate_deferred(|r| r.receive_copy(peer, prev, items));
            }
            Err(e) => {
                let name = shared.site_name(peer);
                malformed(&shared, &conn, &name, "datagram copy", &e.to_string());
                return;
            }
        }
    }
}

/// Fits received items' dependency vectors to the sites this node counts now
/// ([`Item::fit_deps`](crate::update::Item::fit_deps)), for the stream and its copies alike.
fn fit_to_sites(shared: &Shared, items: &mut [crate::update::Item]) -> Result<(), WireError> {
    let n = shared.n();
    for it in items {
        it.fit_deps(n, crate::consensus::members::MAX_SITES)
            .map_err(WireError::Semantic)?;
    }
    Ok(())
}

/// Receives `peer`'s update stream. Each dependency vector is as long as the sites the peer
/// counted when the update was written: shorter ones are padded with zeros; a longer one that
/// names a site this node does not count yet waits in the dependency buffer until this node
/// counts that site and covers the dependency ([`Item::fit_deps`](crate::update::Item::fit_deps)).
async fn receive_updates(
    shared: &Arc<Shared>,
    conn: &Connection,
    peer: SiteId,
) -> Result<(), LinkError> {
    let mut stream = conn.accept_uni().await?;
    let limits = shared.cfg.limits;
    let max_buffered = shared.cfg.replication.max_buffered;
    let mut changed = shared.changed.subscribe();
    // What the last frame read on this stream left (see `peer_wire::StreamBase`).
    let mut base = peer_wire::StreamBase::default();
    loop {
        let Some(frame) = read_frame(&mut stream, limits.max_frame).await? else {
            return Ok(());
        };
        shared.metrics.bytes_in.fetch_add(
            wire::framed_len(frame.len()) as u64,
            std::sync::atomic::Ordering::Relaxed,
        );
        Metrics::bump(&shared.metrics.batches_in);
        let mut items = peer_wire::decode_batch(
            &frame,
            &mut base,
            peer,
            crate::consensus::members::MAX_SITES,
            &limits,
        )?;
        // Vectors are as long as the sites the sender counted when it wrote each update
        // (shorter before a site was added): fitted to the sites this node counts now. One that
        // names a site this node does not count yet waits in the dependency buffer.
        fit_to_sites(shared, &mut items)?;
        shared.mutate_deferred(|r| r.receive(peer, items));
        // Back-pressure: stop reading while this peer's updates in the dependency buffer are
        // over the limit; QUIC flow control then slows the sender, whose backlog stays in its
        // log. Per origin: updates that wait on another origin's stream never stop that stream
        // (with one count for the whole buffer they could, for good). The causally earliest
        // update held always has what it waits for applied or still to come on a stream that
        // is read, since everything held from its origin comes before it.
        while shared.read(|r| r.buffer().len_from(peer)) > max_buffered {
            if changed.changed().await.is_err() {
                return Ok(());
            }
        }
    }
}

async fn send_hello(shared: &Shared, send: &mut SendStream) -> Result<(), LinkError> {
    let hello = PeerHello {
        cluster: shared.cfg.cluster_id.clone(),
        site: shared.site(),
        sites: shared.n() as u16,
        partition: shared.cfg.partition as u16,
        partitions: shared.cfg.partitions as u16,
        applied: shared.read(|r| r.durable().as_slice().to_vec()),
    };
    let frame = peer_wire::encode_hello(&hello);
    shared
        .metrics
        .wire
        .add(WireKind::Hello, wire::framed_len(frame.len()));
    write_frame(send, &frame)
        .await
        .map_err(|e| LinkError::Wire(WireError::Io(e)))
}

/// Reads a dialing peer's hello and checks its certificate names the site it claims.
async fn read_hello_from(
    shared: &Shared,
    conn: &Connection,
    recv: &mut RecvStream,
) -> Result<(Remote, VClock, usize), String> {
    let (remote, applied, width) = tokio::time::timeout(
        Duration::from_millis(shared.cfg.timeouts.request_ms),
        read_hello_raw(shared, recv),
    )
    .await
    .map_err(|_| "no hello within the request timeout".to_string())?
    .map_err(|e| e.to_string())?;
    let site = match remote {
        Remote::Peer(site) | Remote::Joiner(site) => site,
        Remote::Sibling(_) => shared.site(),
    };
    let expected = shared.site_name(site);
    let ident = tls::peer_identity(conn);
    let cert_site = ident.as_ref().and_then(|i| i.site_name());
    if cert_site != Some(expected.as_str()) {
        return Err(format!(
            "certificate names site {:?} but the hello claims site {site} ({expected})",
            cert_site.unwrap_or("<none>")
        ));
    }
    Ok((remote, applied, width))
}

/// Reads a hello and checks it against this node's configuration: same cluster and
/// partitions; a peer must be this node's partition at another site this node counts, a
/// sibling another partition of this site. Returns the remote, its applied vector (fitted to
/// this node's sites) and the number of sites it counts: the width of the vectors it sends.
///
/// Nodes may count different numbers of sites while a site added to the cluster
/// configuration is adopted (at a restart, so far): a peer that counts fewer sends shorter
/// vectors, whose missing entries are zeros; one that counts more sends longer ones, whose
/// entries past this node's count are dropped ([`fit_peer_vector`]).
async fn read_hello_raw(
    shared: &Shared,
    recv: &mut RecvStream,
) -> Result<(Remote, VClock, usize), LinkError> {
    let frame = read_frame(recv, 64 * 1024)
        .await?
        .ok_or_else(|| LinkError::Hello("stream closed before the hello".into()))?;
    let (h, joiner) = match peer_wire::decode_hello(&frame)? {
        PeerControl::Hello(h) => (h, false),
        PeerControl::SnapshotRequest(h) => (h, true),
        PeerControl::Reject { reason } => {
            return Err(LinkError::Hello(format!("peer refused us: {reason}")));
        }
        _ => return Err(LinkError::Hello("expected a hello".into())),
    };
    {
        {
            if h.cluster != shared.cfg.cluster_id {
                return Err(LinkError::Hello(format!(
                    "peer is in cluster {:?}, this site in {:?}",
                    h.cluster, shared.cfg.cluster_id
                )));
            }
            let n = shared.n();
            if h.site >= h.sites || h.sites as usize > crate::consensus::members::MAX_SITES {
                return Err(LinkError::Hello(format!(
                    "peer claims site {} of {} sites",
                    h.site, h.sites
                )));
            }
            if h.site as usize >= n {
                return Err(LinkError::Hello(format!(
                    "site {} is not in this node's cluster configuration ({n} sites): a site \
                     joins once `causalkv sites add` has added it",
                    h.site
                )));
            }
            if let Some(m) = shared.strong.membership()
                && let Some(s) = m.sites.get(h.site as usize)
                && s.state.is_removed()
            {
                return Err(LinkError::Hello(format!(
                    "site {} ({}) was removed from the cluster (epoch {}); its id is never reused",
                    h.site, s.name, m.epoch
                )));
            }
            let (parts, me) = (shared.cfg.partitions, shared.cfg.partition);
            let (site, partition) = (h.site, h.partition as u32);
            if h.partitions as u32 != parts {
                return Err(LinkError::Hello(format!(
                    "peer is configured with {} partitions per site; this node with {parts}",
                    h.partitions
                )));
            }
            let remote = if site == shared.site() {
                if partition == me || partition >= parts {
                    return Err(LinkError::Hello(format!(
                        "peer claims this site's own id {site} with partition {partition} \
                         (this node is partition {me} of {parts})"
                    )));
                }
                Remote::Sibling(partition)
            } else if partition != me {
                return Err(LinkError::Hello(format!(
                    "peer at site {site} is partition {partition}; this node replicates partition {me}"
                )));
            } else if shared.read(|r| r.removed(site)).is_some() {
                // Whether it asks for a snapshot or replicates: a removed site's certificate
                // stays valid (nothing revokes it), so its id is what refuses it.
                return Err(LinkError::Hello(format!(
                    "site {site} ({}) was removed from the cluster configuration; a removed \
                     site cannot rejoin (ids are never reused: add it again under a new name)",
                    shared.site_name(site)
                )));
            } else if joiner {
                Remote::Joiner(site)
            } else {
                Remote::Peer(site)
            };
            if h.applied.len() > h.sites as usize {
                return Err(LinkError::Hello(format!(
                    "hello applied vector has {} entries, the peer counts {} sites",
                    h.applied.len(),
                    h.sites
                )));
            }
            let applied = fit_peer_vector(&h.applied, n, "hello applied vector")?;
            Ok((remote, applied, h.sites as usize))
        }
    }
}

/// Both directions of the control stream after the hello: acks and heartbeats out (when `acks`),
/// the peer's acks in. `heard` is set to the time (µs) of each ack that arrives.
///
/// A site acks a peer's stream on the connection that carries it (the one the peer dialled):
/// those acks are what the peer's link hears (`replace_when_silent`). The control stream of
/// the connection a site dialled carries only the peer's acks.
async fn run_control(
    shared: Arc<Shared>,
    peer: SiteId,
    conn: Connection,
    mut send: SendStream,
    mut recv: RecvStream,
    heard: Arc<AtomicU64>,
    acks: bool,
) {
    let reader = {
        let shared = shared.clone();
        let conn = conn.clone();
        async move {
            let mut prev = None;
            loop {
                match read_vector(&mut recv, || shared.n(), "ack vector", &mut prev).await {
                    Ok(None) => return,
                    Ok(Some((v, _))) => {
                        // Every ack is a heartbeat: it feeds the peer's failure detector.
                        let now = Instant::now();
                        heard.store(now_micros(), Ordering::Release);
                        // The vector's length is the number of sites the peer counts, which
                        // `v` (fitted to this node's count) no longer shows.
                        let width = prev.as_ref().map_or(0, Vec::len);
                        shared.mutate(|r| {
                            r.on_peer_counts(width);
                            r.on_peer_applied(peer, &v)
                        });
                        shared.peers[peer as usize]
                            .lock()
                            .expect("peer lock")
                            .heard(now);
                    }
                    Err(e) => {
                        let name = shared.site_name(peer);
                        malformed(&shared, &conn, &name, "control frame", &e.to_string());
                        return;
                    }
                }
            }
        }
    };
    let writer = async {
        if !acks {
            // Hold the stream open: the peer reads its end as this link leaving.
            return std::future::pending::<()>().await;
        }
        let mut changed = shared.changed.subscribe();
        let idle = idle_every(&shared);
        let mut last: Option<VClock> = None;
        let mut last_at = Instant::now();
        loop {
            let durable = shared.read(|r| r.durable().clone());
            let moved = last.as_ref() != Some(&durable);
            // The peer waits on its own entry (retention, synchronous writes): that goes out
            // within ACK_EVERY. The rest (the stable vector's inputs) waits for the next ack
            // or heartbeat, at most `idle` away.
            let theirs = last
                .as_ref()
                .is_none_or(|l| l.get(peer) != durable.get(peer));
            let wait = if theirs { ACK_EVERY } else { idle };
            let since = last_at.elapsed();
            if since < wait {
                tokio::select! {
                    r = changed.changed() => if r.is_err() { return },
                    _ = tokio::time::sleep(wait - since) => {}
                }
                continue;
            }
            {
                let frame =
                    peer_wire::encode_ack(last.as_ref().map(VClock::as_slice), durable.as_slice());
                let kind = if moved {
                    WireKind::Ack
                } else {
                    WireKind::Heartbeat
                };
                shared.metrics.wire.add(kind, wire::framed_len(frame.len()));
                if write_frame(&mut send, &frame).await.is_err() {
                    return;
                }
                last = Some(durable);
                last_at = Instant::now();
            }
        }
    };
    tokio::select! {
        _ = reader => {}
        _ = writer => {}
        _ = count_udp(&shared, &conn) => {}
    }
}

/// Adds the UDP payload bytes `conn` sends to the node's count, every quarter second, for as
/// long as it runs (QUIC's overhead is that count less the bytes counted per kind).
async fn count_udp(shared: &Shared, conn: &Connection) {
    let mut last = 0;
    loop {
        let now = conn.stats().udp_tx.bytes;
        shared
            .metrics
            .wire
            .udp_tx
            .fetch_add(now.saturating_sub(last), Ordering::Relaxed);
        last = now;
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Counts and logs a malformed frame (`what`: "control frame", "update stream", "datagram
/// copy") from `peer`, and closes the connection with [`close_code::MALFORMED`].
fn malformed(shared: &Shared, conn: &Connection, peer: &str, what: &str, why: &str) {
    Metrics::bump(&shared.metrics.malformed_frames);
    warn!(peer = %peer, error = %why, "malformed {what}; closing the connection");
    conn.close(VarInt::from_u32(close_code::MALFORMED), b"malformed frame");
}
