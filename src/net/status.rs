//! The site's status as `causalkv status`, `GET /status` and [`Node::status`](super::Node::status)
//! show it: vectors, buffer and log figures (and whether pruning is held for a site a peer
//! counts and this node does not yet), each peer's state with its reason and lag, and the
//! cluster configuration (epoch and sites) this node holds.

use std::time::Instant;

use super::peer_state::judge;
use super::shared::Shared;
use crate::clock::SiteId;
use crate::consensus::members::{Member, MemberState, Membership};
use crate::storage::Store;
use crate::wire::{MemberStatus, MembershipStatus, PeerStatus, StatusInfo};

impl Shared {
    /// The site's status.
    pub fn status(&self) -> StatusInfo {
        let me = self.site();
        let (site_stable, retention_held) = self.read(|r| {
            let held = if r.retention_held() {
                r.peers_count() as u16
            } else {
                0
            };
            (r.site_stable().as_slice().to_vec(), held)
        });
        let (applied, stable, buffered, retained, keys, peer_vecs, unacked) = self.read(|r| {
            let peer_vecs: Vec<_> = (0..self.n() as SiteId)
                .map(|p| r.peer_applied(p).as_slice().to_vec())
                .collect();
            let unacked: Vec<_> = (0..self.n() as SiteId)
                .map(|p| r.unacked_by(p) as u64)
                .collect();
            (
                r.applied().as_slice().to_vec(),
                r.stable().as_slice().to_vec(),
                r.buffer().len() as u64,
                r.retained_len() as u64,
                r.store().len() as u64,
                peer_vecs,
                unacked,
            )
        });
        let (fsyncs, wal_bytes) = self.wal_stats();
        let now = Instant::now();
        let table = self.site_table();
        let peers = table
            .iter()
            .filter(|p| p.id != me)
            .map(|p| {
                let st = self.peers[p.id as usize].lock().expect("peer lock");
                let phi = st.detector.phi(now);
                let silence = st
                    .detector
                    .last_heartbeat()
                    .map(|_| st.detector.silence(now));
                let (state, reason) = judge(&st, phi, silence, &self.cfg.failure);
                drop(st);
                let theirs = peer_vecs[p.id as usize]
                    .get(me as usize)
                    .copied()
                    .unwrap_or(0);
                PeerStatus {
                    site: p.id,
                    name: p.name.clone(),
                    addr: self.peer_addr(p.id).to_string(),
                    state: state.into(),
                    reason,
                    phi,
                    silence_ms: silence.map_or(0, |d| d.as_millis() as u64),
                    applied: peer_vecs[p.id as usize].clone(),
                    lag_updates: unacked[p.id as usize],
                    lag_ms: applied[me as usize].saturating_sub(theirs) / 1000,
                }
            })
            .collect();
        StatusInfo {
            site: me,
            name: self.cfg.me().name.clone(),
            applied,
            stable,
            buffered,
            retained,
            keys,
            wal_bytes,
            fsyncs,
            peers,
            partition: self.cfg.partition as u16,
            partitions: self.cfg.partitions as u16,
            site_stable,
            consensus: Some(Box::new(self.strong.status())),
            membership: Some(Box::new(self.membership_status())),
            retention_held,
        }
    }

    /// The cluster configuration this node holds: the replicated one (partition index 0, once
    /// bootstrapped), else the sites of its file with epoch 0.
    pub fn membership_status(&self) -> MembershipStatus {
        let me = self.site();
        let catching_up = self.cfg.join_from.is_some() && !self.read(|r| r.caught_up_to_floor());
        // A joining site's phase: `snapshot` until it is in the Raft group (it fetches its
        // snapshot, then the leader adds it), `catching-up` at the site itself until it covers
        // the end of the snapshot's copy, then `learner` and `voter` as the group's membership
        // says; at the leader, `voter, catching-up (...)` with the entries it is behind on
        // while the leader waits for it to cover its floor before making it active.
        let show = |m: &Member| MemberStatus {
            site: m.id,
            name: m.name.clone(),
            addr: m.addr.to_string(),
            state: match m.state {
                MemberState::Joining if m.id == me && catching_up => "joining: catching-up".into(),
                MemberState::Joining => match self.strong.role_of(m.id as u64) {
                    Some(role) => match self.strong.join_behind(m.id as u64) {
                        // At the leader, waiting for it to cover its floor before activating.
                        Some(behind) => format!("joining: {role}, catching-up ({behind})"),
                        None => format!("joining: {role}"),
                    },
                    None => "joining: snapshot".into(),
                },
                s => super::membership::state_text(self, m.id, s),
            },
        };
        match self.strong.membership() {
            Some(m) => MembershipStatus {
                epoch: m.epoch,
                source: "replicated".into(),
                next_id: m.next_id,
                sites: m.sites.iter().map(show).collect(),
            },
            None => {
                let mut m = Membership::from_entries(&self.cfg.sites);
                if self.cfg.join_from.is_some() {
                    // Not in the group yet: this site knows only that it joins.
                    m.sites[me as usize].state = MemberState::Joining;
                }
                MembershipStatus {
                    epoch: 0,
                    source: "file".into(),
                    next_id: m.next_id,
                    sites: m.sites.iter().map(show).collect(),
                }
            }
        }
    }
}
