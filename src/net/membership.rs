//! Removing sites from a running cluster, as a node carries it out: the live reaction to a
//! site becoming removed, the decommission of this site (`causalkv sites remove NAME`), the
//! removal of a dead site (`causalkv sites remove NAME --dead`) with the cut the survivors
//! agree on and the relay of its updates between them, and the `Lost` refusal of a session
//! that saw updates which died with it.
//!
//! The design is the one [`crate::consensus::members`] describes, with these choices:
//!
//! - **Reaction.** Every node of partition index 0 follows the replicated configuration
//!   ([`follow`], called by the node's follower of [`Strong::watch_sites`]). A removed site
//!   stops being a peer of the replica at once ([`Replica::set_removed`]): retention no
//!   longer keeps updates for it, the stable vector, tombstone collection and synchronous
//!   replication leave it out, the outbound link to it ends and its hello is refused. The
//!   leader of the Raft group drops it from the voters (`change_membership`, joint consensus;
//!   [`Strong`] retries on every tick while the voters still hold a removed site, which also
//!   finishes a joint configuration a crashed leader left behind).
//! - **Cut.** The node that takes the `--dead` request asks every survivor for its
//!   `applied[dead]` ([`Rpc::Applied`] over the peer links) and proposes
//!   [`SitesOp::RemoveDead`] with the maximum, against the epoch it read: the cut is agreed
//!   through Raft, and a survivor that does not answer blocks it with an error naming it.
//! - **Relay.** Pull, not push: every survivor whose `applied[dead]` is below the cut asks
//!   the other survivors for the dead origin's updates after what it has received
//!   ([`Rpc::Relay`]), in ordered batches that end with a marker at the answering survivor's
//!   `applied[dead]`. They come from the answering replica's relay log, where each site keeps
//!   other origins' updates until every other member has them ([`Replica::relay_batch`]), so
//!   they carry their dependency vectors and go through the dependency buffer like any
//!   update. A relayed update is kept for relaying again, so a site that never heard from the
//!   dead origin directly gets its updates from whoever did. The cost: while a member lags
//!   (down, cut off), every other site keeps every origin's updates it has not acked, not only
//!   its own, so retention during an outage is up to `sites - 1` times what it was; once the
//!   member catches up (or is removed) it is all let go. After a restart from a snapshot a
//!   site's relay log starts at the snapshot ([`Rpc::Relay`] then answers `None` for earlier
//!   points, and the asking site tries the other survivors). A test-only switch
//!   ([`NodeOptions::relay`](super::NodeOptions::relay)) turns the relay off.
//! - **Decommission.** The leaving site refuses writes with `SHUTTING_DOWN` (checked under
//!   the replica lock, so no write slips in after the drain is measured), keeps serving reads
//!   and replication, waits until every peer has acked its whole retained log, and then
//!   proposes its own [`SitesOp::Remove`]. Once removed, it refuses every request, so its
//!   clients fail over, and can be stopped.
//!
//! Partitioned sites are not covered yet: only partition index 0's group holds the
//! configuration, and a dead site's cut would be per partition. Removal is refused there.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tracing::{debug, info, warn};

use super::shared::Shared;
use crate::clock::{SiteId, VClock, Version};
use crate::consensus::members::{
    MEMBERSHIP_CLIENT, MemberState, Membership, SitesOp, internal_serial,
};
use crate::consensus::{Command, Forwarded, NodeId, Outcome, Reply, Rpc, RpcReply, WriteOp};
use crate::replica::Removal;
use crate::wire::{ResponseBody, error_code};

#[cfg(doc)]
use super::strong::Strong;
#[cfg(doc)]
use crate::replica::Replica;

/// Most updates in one relay answer.
const RELAY_BATCH: u32 = 512;

fn refusal(code: u16, message: impl Into<String>) -> ResponseBody {
    ResponseBody::Error {
        code,
        message: message.into(),
        version: None,
    }
}

/// The refusal of a client write while this site is leaving (the client fails over on it).
pub(crate) fn leaving_refusal() -> ResponseBody {
    refusal(
        error_code::SHUTTING_DOWN,
        "site is leaving the cluster (being decommissioned): writes go to another site",
    )
}

/// Answers the RPCs about this node's replica: how far it has applied an origin, the
/// updates of an origin it holds after a point, and what it still lacks of its join floor.
pub(crate) fn answer(shared: &Shared, rpc: &Rpc) -> Option<RpcReply> {
    match *rpc {
        Rpc::Floor => Some(RpcReply::Floor(shared.read(|r| r.floor_gaps()))),
        Rpc::Applied { origin } => {
            Some(RpcReply::Applied(shared.read(|r| r.applied().get(origin))))
        }
        Rpc::Relay {
            origin,
            after,
            max_items,
        } => {
            let max = max_items.clamp(1, RELAY_BATCH) as usize;
            let frame = shared.read(|r| {
                r.relay_batch(origin, after, max).map(|items| {
                    let marker = match items.last() {
                        Some(crate::replica::Item::Marker(ts)) => Some(*ts),
                        _ => None,
                    };
                    let updates = items.iter().filter_map(|i| match i {
                        crate::replica::Item::Update(u) => Some(u),
                        crate::replica::Item::Marker(_) => None,
                    });
                    crate::peer_wire::encode_updates(&Default::default(), updates, marker)
                        .frame
                        .to_vec()
                })
            });
            Some(RpcReply::Relay(frame))
        }
        _ => None,
    }
}

/// Takes a configuration as this node's group applied it: reacts to sites that became
/// removed or leaving (see the module docs).
pub(crate) fn follow(shared: &Arc<Shared>, m: &Membership) {
    let me = shared.site();
    let n = shared.n();
    for s in m.sites.iter().filter(|s| (s.id as usize) < n) {
        let how = match s.state {
            MemberState::Removed => Some(Removal::Drained),
            MemberState::RemovedDead { cut } => Some(Removal::Dead { cut }),
            _ => None,
        };
        if s.id == me {
            let leaving = s.state == MemberState::Leaving;
            let was = shared.changes.leaving.swap(leaving, Ordering::SeqCst);
            if leaving && !was {
                warn!(
                    epoch = m.epoch,
                    "this site is leaving the cluster: it refuses writes (its clients fail over) \
                     and drains its updates to every peer"
                );
                tokio::spawn(decommission(shared.clone()));
            }
            if how.is_some() && !shared.changes.removed.swap(true, Ordering::SeqCst) {
                warn!(
                    epoch = m.epoch,
                    "this site was removed from the cluster configuration: it no longer serves \
                     clients; stop it"
                );
                shared.draining.store(true, Ordering::SeqCst);
            }
            continue;
        }
        let Some(how) = how else { continue };
        if shared.read(|r| r.removed(s.id)).is_some() {
            continue;
        }
        shared.mutate(|r| r.set_removed(s.id, how));
        // Its outbound link notices at its next attempt; wake it now.
        shared.peer_redial[s.id as usize].notify_waiters();
        info!(site = %s.name, state = s.state.as_str(), epoch = m.epoch, "site removed: no longer a peer");
        if let Removal::Dead { cut } = how {
            shared.changes.has_dead.store(true, Ordering::SeqCst);
            if shared.changes.relay {
                tokio::spawn(relay(shared.clone(), s.id, cut));
            } else {
                warn!(site = %s.name, cut, "relay of a removed dead site's updates switched off (test-only)");
            }
        }
    }
}

/// The refusal of a request whose context names updates lost with a site removed while dead.
pub(crate) fn lost(shared: &Shared, ctx: &VClock) -> Option<ResponseBody> {
    if !shared.changes.has_dead.load(Ordering::Relaxed) {
        return None;
    }
    let l = shared.read(|r| r.lost(ctx))?;
    Some(ResponseBody::Error {
        code: error_code::LOST,
        message: format!(
            "{l}; continue with the context capped at the cut (Client::accept_loss, \
             `--accept-loss`) or start a new session"
        ),
        version: Some(Version::new(l.have, l.site).into()),
    })
}

/// The state of site `id` as status shows it: its state with the phase of a change in
/// progress (`leaving: draining`, `removed-dead: relaying up to the cut`).
pub(crate) fn state_text(shared: &Shared, id: SiteId, state: MemberState) -> String {
    match state {
        MemberState::Leaving if id == shared.site() => {
            let unacked: usize = shared.read(|r| r.peers().map(|p| r.unacked_by(p)).sum());
            format!("leaving: draining ({unacked} updates not acked by every peer)")
        }
        MemberState::Leaving => "leaving: draining".into(),
        MemberState::RemovedDead { cut } if (id as usize) < shared.n() => {
            let have = shared.read(|r| r.applied().get(id));
            if have < cut {
                format!("removed-dead: relaying up to the cut {cut} (here {have})")
            } else {
                format!("removed-dead: cut {cut} reached")
            }
        }
        s => s.as_str().into(),
    }
}

/// Maps the outcome of a configuration change through the Raft group to the client's answer.
pub(crate) fn changed(outcome: Outcome) -> ResponseBody {
    match outcome {
        Outcome::Applied(Reply::Membership(Ok(epoch))) => ResponseBody::SitesChanged { epoch },
        Outcome::Applied(Reply::Membership(Err(why))) => refusal(error_code::BAD_REQUEST, why),
        Outcome::Applied(Reply::Forgotten) | Outcome::Unknown(_) => refusal(
            error_code::OUTCOME_UNKNOWN,
            "the change may or may not have been applied: run `causalkv sites list`",
        ),
        Outcome::Unavailable(m) => refusal(error_code::UNAVAILABLE, m),
        other => refusal(
            error_code::UNAVAILABLE,
            format!("the change was not applied: {other:?}"),
        ),
    }
}

/// Proposes a change of the configuration through partition index 0's Raft group.
async fn propose(
    shared: &Shared,
    op: SitesOp,
    (client, serial): (u64, u64),
    timeout: Duration,
) -> Outcome {
    let cmd = Command {
        client,
        serial,
        ctx: Vec::new(),
        op: WriteOp::Sites(op),
    };
    shared
        .strong
        .execute(Forwarded::Write(cmd), timeout, true)
        .await
}

/// `causalkv sites remove NAME [--dead]`: starts the decommission of a live site, or removes
/// a dead one with the cut the survivors agree on.
pub(crate) async fn remove(
    shared: &Shared,
    name: &str,
    dead: bool,
    expected_epoch: u64,
    ids: (u64, u64),
    timeout: Duration,
) -> ResponseBody {
    let bad = |m: String| refusal(error_code::BAD_REQUEST, m);
    if shared.cfg.partition != 0 {
        return bad(format!(
            "this node serves partition {}; the cluster configuration is kept by partition 0",
            shared.cfg.partition
        ));
    }
    if shared.cfg.partitions > 1 {
        return bad(
            "removing a site from a cluster of partitioned sites is not supported yet".into(),
        );
    }
    let Some(m) = shared.strong.membership() else {
        return bad("this site holds no replicated cluster configuration yet".into());
    };
    // The same checks the state machine makes, for a clear answer before asking anyone.
    let id = match m.removable(expected_epoch, name) {
        Ok(id) => id,
        Err(e) => return bad(e),
    };
    if !dead {
        return changed(
            propose(
                shared,
                SitesOp::Leave {
                    expected_epoch,
                    name: name.to_owned(),
                },
                ids,
                timeout,
            )
            .await,
        );
    }
    if id == shared.site() {
        return bad(format!(
            "site {name:?} is this site, which is running: ask another site to remove it, or \
             decommission it with `sites remove {name}` (without --dead)"
        ));
    }
    // Judged by the failure detector, as status shows it.
    if let Some(peer) = shared
        .status()
        .peers
        .into_iter()
        .find(|p| p.site == id && p.state == "up")
    {
        return bad(format!(
            "site {name:?} is up as seen from here ({}): it is not dead; decommission it \
             with `sites remove {name}` (without --dead)",
            peer.reason
        ));
    }
    // The cut: the most of its stream any survivor holds. Every survivor must answer.
    let started = Instant::now();
    let mut cut = shared.read(|r| r.applied().get(id));
    let mut held = vec![format!("{}={cut}", shared.cfg.me().name)];
    for s in m.members().filter(|s| s.id != id && s.id != shared.site()) {
        let left = timeout.saturating_sub(started.elapsed());
        let answer = shared
            .strong
            .ask(s.id as NodeId, &Rpc::Applied { origin: id }, left)
            .await;
        match answer {
            Ok(RpcReply::Applied(have)) => {
                held.push(format!("{}={have}", s.name));
                cut = cut.max(have);
            }
            Ok(other) => {
                return refusal(
                    error_code::UNAVAILABLE,
                    format!(
                        "survivor {:?} answered the cut request with {other:?}; nothing changed",
                        s.name
                    ),
                );
            }
            Err(e) => {
                return refusal(
                    error_code::UNAVAILABLE,
                    format!(
                        "survivor {:?} did not say how much of site {name:?}'s updates it holds \
                         ({e}); the cut needs every survivor, nothing changed: retry once it is \
                         reachable",
                        s.name
                    ),
                );
            }
        }
    }
    info!(
        site = name,
        cut,
        ?held,
        "cut agreed by the survivors; proposing the removal"
    );
    changed(
        propose(
            shared,
            SitesOp::RemoveDead {
                expected_epoch,
                name: name.to_owned(),
                cut,
            },
            ids,
            timeout,
        )
        .await,
    )
}

/// Relays the updates of `origin` (removed while dead) from the other survivors until this
/// node has applied its stream up to `cut`.
async fn relay(shared: Arc<Shared>, origin: SiteId, cut: u64) {
    let name = shared.site_name(origin).to_owned();
    let n = shared.n();
    let timeout = Duration::from_millis(shared.cfg.timeouts.request_ms);
    let mut shutdown = shared.shutdown.clone();
    let mut backoff = Duration::from_millis(50);
    let start = shared.read(|r| r.applied().get(origin));
    if start < cut {
        info!(site = %name, cut, have = start, "relaying the removed site's updates from the survivors up to the cut");
    }
    loop {
        let (have, received) = shared.read(|r| (r.applied().get(origin), r.received().get(origin)));
        if have >= cut {
            if start < cut {
                info!(site = %name, cut, "relay complete: this site holds the removed site's updates up to the cut");
            }
            return;
        }
        let mut progressed = false;
        if received < cut {
            let survivors: Vec<SiteId> = shared.read(|r| r.peers().collect());
            for p in survivors {
                let after = shared.read(|r| r.received().get(origin));
                if after >= cut {
                    break;
                }
                let rpc = Rpc::Relay {
                    origin,
                    after,
                    max_items: RELAY_BATCH,
                };
                match shared.strong.ask(p as NodeId, &rpc, timeout).await {
                    Ok(RpcReply::Relay(Some(frame))) => {
                        let frame = Bytes::from(frame);
                        match crate::peer_wire::decode_batch(
                            &frame,
                            &mut Default::default(),
                            origin,
                            n,
                            &shared.cfg.limits,
                        ) {
                            Ok(items) if !items.is_empty() => {
                                shared.mutate(|r| r.receive(origin, items));
                                progressed |= shared.read(|r| r.received().get(origin)) > after;
                            }
                            Ok(_) => {}
                            Err(e) => {
                                warn!(peer = %shared.site_name(p), error = %e, "malformed relay answer")
                            }
                        }
                    }
                    Ok(RpcReply::Relay(None)) => debug!(
                        peer = %shared.site_name(p), after,
                        "survivor cannot relay from there (its relay log starts later)"
                    ),
                    Ok(other) => {
                        debug!(peer = %shared.site_name(p), ?other, "unexpected relay answer")
                    }
                    Err(e) => {
                        debug!(peer = %shared.site_name(p), error = %e, "relay request failed")
                    }
                }
            }
        }
        if progressed {
            backoff = Duration::from_millis(50);
            continue;
        }
        // Waiting on dependencies (they arrive on their origins' streams) or on a survivor
        // that cannot serve yet: ask again after a backoff, not at every change of the replica
        // (under load that would be an RPC per write).
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = shutdown.changed() => return,
        }
        backoff = (backoff * 2).min(Duration::from_secs(2));
    }
}

/// Decommissions this site once it is leaving: waits until every peer has acked all of its
/// updates, then proposes its removal.
async fn decommission(shared: Arc<Shared>) {
    let mut changed = shared.changed.subscribe();
    let mut shutdown = shared.shutdown.clone();
    loop {
        changed.borrow_and_update();
        // Writes are refused under the replica lock once leaving is set, so this count only
        // falls from here.
        let unacked: usize = shared.read(|r| r.peers().map(|p| r.unacked_by(p)).sum());
        if unacked == 0 {
            break;
        }
        tokio::select! {
            r = changed.changed() => if r.is_err() { return },
            _ = shutdown.changed() => return,
        }
    }
    info!("every peer acked this site's updates: proposing its removal");
    let me = shared.cfg.me().name.clone();
    let timeout = Duration::from_millis(shared.cfg.timeouts.request_ms);
    let mut backoff = Duration::from_millis(100);
    loop {
        let Some(m) = shared.strong.membership() else {
            return;
        };
        if m.by_name(&me)
            .is_none_or(|s| s.state != MemberState::Leaving)
        {
            return;
        }
        let op = SitesOp::Remove {
            expected_epoch: m.epoch,
            name: me.clone(),
        };
        let serial = internal_serial(m.epoch, &op);
        match propose(&shared, op, (MEMBERSHIP_CLIENT, serial), timeout).await {
            Outcome::Applied(Reply::Membership(Ok(epoch))) => {
                info!(epoch, "this site is removed from the cluster configuration");
                return;
            }
            Outcome::Applied(Reply::Membership(Err(why))) => {
                debug!(%why, "removal of this site refused; checking the configuration again")
            }
            other => debug!(?other, "removal of this site to be retried"),
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = shutdown.changed() => return,
        }
        backoff = (backoff * 2).min(Duration::from_secs(2));
    }
}
