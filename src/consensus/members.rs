//! The cluster configuration as replicated state: which sites the cluster has, with their ids,
//! names and addresses, under an epoch that every change raises.
//!
//! It lives in the state machine of partition index 0's Raft group ([`super::sm`]), changed
//! only by committed log entries ([`SitesOp`] in a [`WriteOp::Sites`](super::WriteOp::Sites)),
//! and carried in that group's snapshots. The `[[sites]]` list of the TOML file seeds it once:
//! while the group holds no configuration, its leader proposes [`SitesOp::Bootstrap`] with the
//! list of its own file, and the first such entry committed wins; the later ones are refused
//! and change nothing. From then on the replicated configuration is the truth: a node of
//! partition 0 that restarts takes the sites (names, addresses) from it, not from its file.
//!
//! Site ids are never reused: the configuration keeps the next id to give ([`Membership::next_id`]),
//! and a site that leaves keeps its entry (as [`MemberState::Removed`]), so its id and name stay
//! taken (its certificate, signed by the cluster CA, names it). Vectors are indexed by site id,
//! so a vector written before a site was added is shorter than the current site count: its
//! missing entries read as zeros (see [`crate::wire::check_vector`] and the replica's rules).
//!
//! Changes are compare-and-set on the epoch: a change names the epoch it was made against, and
//! is refused when the configuration has moved on, so a retried or concurrent change never
//! applies twice or on a configuration its author did not see.
//!
//! Encoding: these types travel in Raft log entries and snapshots with postcard, which has no
//! schema evolution: a field can never be added to a struct here. New kinds of change are new
//! variants appended to [`SitesOp`] (and states to [`MemberState`]); a new shape of the whole
//! configuration is a new variant of [`Versioned`], the form snapshots store.
//!
//! # The remaining steps of membership changes (design)
//!
//! What exists: the configuration, its bootstrap, `causalkv sites list`, the epoch and member
//! count in `/status` and the metrics; adding a site online for partition index 0
//! (`causalkv sites add NAME --addr HOST:PORT`, [`SitesOp::Add`], steps 1 to 4 below,
//! [`SitesOp::Activate`]; the node's side is `net::join` and the follower of the configuration
//! in `net::node`); and both removals below (`sites remove NAME [--dead]`, [`SitesOp::Leave`],
//! [`SitesOp::Remove`], [`SitesOp::RemoveDead`]; the node's side is `net::membership`). Not
//! built yet: partition nodes `p > 0` following the configuration (sites of several
//! partitions can neither join nor be removed). What follows is how it fits openraft 0.9 and
//! the replication protocol, with what the build changed against the first design:
//!
//! - The snapshot a joining site loads is the source's own snapshot file (taken as the
//!   snapshotter takes one, one snapshot at a time), streamed raw after a header on one QUIC
//!   stream, and installed as the joining site's snapshot: no second format. The copy runs
//!   while the source keeps applying, so it may hold entries newer than its `applied` vector
//!   whose dependencies are not in it: the joining site answers clients only once it covers
//!   the source's `applied` at the end of the copy (the floor, kept in `join.state`).
//! - Dependency vectors on the update stream carry their length (peer protocol 4): a site that
//!   starts counting one more site mid-connection sends longer vectors from then on.
//! - The leader adds the learner only once its link to the joining site is up, and makes it a
//!   voter only once the learner has matched the log (openraft's blocking `add_learner`
//!   returned for a learner that had never answered).
//! - A dead site's cut is gathered by the node that takes the request, not by the leader (any
//!   site can ask every survivor over its links), and the relay pulls: a survivor below the
//!   cut asks the others until it reaches it.
//!
//! **One Raft group per partition index, one configuration.** Each partition index `p` has its
//! own group whose voters are the nodes `(i, p)`; only group 0 holds the site configuration.
//! The nodes of partition `p > 0` learn it from their own site's partition 0 (the sibling link
//! already connects them; a sibling message carrying the epoch and the configuration when it
//! changes), and each group's own voter set follows the configuration: group 0's leader drives
//! the change of group 0, and every group's leader, on seeing a configuration with a site that
//! is not yet in its group, drives the same steps in its group.
//!
//! **Adding a site `s`** (`sites add`, then the new site started with `join = true` and a
//! certificate from `causalkv certs add-site NAME`):
//! 1. The entry `Add` commits: `s` is `Joining` at epoch `e`. Every site that applies it widens
//!    its vectors to the new site count live (a vector grows at the end; ids are never reused:
//!    the replica's vectors, the dependency buffer's queues, the peer tables, the Raft link
//!    slots, which already have room for [`MAX_SITES`]), dials
//!    `s`, and keeps in its retained log whatever `s` has not acked: `s` acks nothing yet, so
//!    retention holds every update from the moment `s` was added (what a snapshot does not
//!    carry, `s` will need). Tombstone collection waits for `s` too (its `applied` is zero).
//! 2. `s` starts empty, knowing only the addresses in its file, dials a nearby site `d` and asks
//!    for a snapshot (a new peer-protocol request on its own stream): `d` streams its store
//!    (keys, values, versions, the deps of each value) and the `applied` vector `V` the contents
//!    reflect (taken under the replica lock, as the snapshot task does). `s` loads it, sets
//!    `applied = V`, and then says hello to every site with `V`: each origin resends its stream
//!    from `V[origin]` on, which its retained log still holds since step 1 (an origin that
//!    applies step 1 late prunes nothing once a peer counts `s`: see the replica's *Retention
//!    while a site is added*, `crate::replica`). The snapshot stream
//!    is a plain QUIC stream at full window (the benchmark's rate against the bare QUIC floor).
//! 3. Raft: group 0's leader adds `s` as a learner (`Raft::add_learner(s, node, blocking =
//!    true)`: it returns once the learner's log has caught up), then makes it a voter with
//!    `Raft::change_membership(voters + s, retain = false)`. openraft 0.9 runs that as joint
//!    consensus (old and new voter sets both must agree until the second membership entry
//!    commits), so a majority is never lost during the change. The Raft node id stays the site
//!    id. Then, once `s` reports that its `applied` covers its floor (`Rpc::Floor`: its Raft
//!    log having caught up says nothing of its causal state, and an origin that has not
//!    applied step 1 yet does not send it its stream), an entry
//!    `Activate { id: s, expected_epoch }` marks `s` `Active`.
//! 4. Reads at `s` honour tokens issued before it existed: a token is shorter than the new site
//!    count, and `s` answers a read only once its `applied` covers it, as any site does; after
//!    step 2 it covers everything the snapshot reflects and catches up from the streams.
//!
//! **Decommissioning a live site `s`** (`sites remove NAME`):
//! 1. An entry `Leave { id: s }` makes `s` `Leaving`: `s` refuses client writes with a
//!    retryable error, so clients fail over to another site (the client library already fails
//!    over on `SHUTTING_DOWN`), and keeps serving reads and replication.
//! 2. `s` waits until every peer has acked its whole retained log (`unacked_by(p) == 0` for
//!    every peer, what a graceful shutdown already waits for) and then proposes its own removal
//!    from the group (`change_membership` without it, again joint) and `Remove { id: s }`: the
//!    entry becomes `Removed`, its vector entry stays (ids are not reused) and no one waits on
//!    it any more: retention and the stable vector count only non-removed sites.
//!
//! **Removing a dead site `s`** (`sites remove NAME --dead`, disk gone):
//! 1. The survivors agree on a cut through Raft: group 0's leader asks every survivor for its
//!    `applied[s]` and commits `Cut { id: s, cut }` with `cut = max` over survivors (a survivor
//!    that does not answer blocks the cut; the operator can retry). `s` becomes `Removed` with
//!    that cut, and leaves the Raft groups (`change_membership` without it; a dead voter is
//!    what joint consensus tolerates as long as a majority of both sets answers).
//! 2. Relay: each survivor that holds updates from `s` beyond another survivor's `applied[s]`
//!    sends them on, from its store (the latest version of each key whose version's origin is
//!    `s`) or from a log of `s`'s updates it kept (retention of relayed origins), on an ordered
//!    stream tagged with origin `s`, until every survivor's `applied[s]` reaches the cut. A site
//!    that never heard from `s` directly gets them from whoever did.
//! 3. A session whose context has `ctx[s] > cut` saw an update that died with `s`: a read or
//!    write that would wait on it gets a typed error `Lost { site, have: cut, need: ctx[s] }`
//!    instead of waiting forever; the client can cap its context at the cut and continue
//!    (`Client::accept_loss`, and a CLI flag). At or below the cut, sessions simply proceed.
//!
//! Status and metrics then show, besides the epoch and the members, a change in progress and
//! its phase (`joining: snapshot | catching-up | learner | voter`, `leaving: draining`,
//! `removed-dead: relaying up to the cut`).

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

use crate::clock::SiteId;
use crate::config::SiteEntry;

/// Most sites a cluster can have (the configuration file's limit as well).
pub const MAX_SITES: usize = 64;

/// The client id under which the sites propose changes of their own (bootstrap, activation,
/// a drained site's removal), with [`internal_serial`] as the serial.
pub const MEMBERSHIP_CLIENT: u64 = u64::MAX;

/// The deduplication serial of a change a site proposes itself against `epoch`: the epoch in
/// the high half, a checksum of the change in the low half. A retry of the same change is the
/// same serial, so it gets the first one's reply; another change against the same epoch (an
/// activation and a drained site's removal, two joining sites' activations) is another serial,
/// so it is applied, and refused if the epoch moved on, instead of being answered with the
/// other's reply.
pub fn internal_serial(epoch: u64, op: &SitesOp) -> u64 {
    let bytes = postcard::to_allocvec(op).expect("a change encodes");
    (epoch << 32) | u64::from(crc32fast::hash(&bytes))
}

/// Where a site is in its life in the cluster.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum MemberState {
    /// A full member: it replicates, serves and votes.
    Active,
    /// Added by `sites add`, not yet caught up (it has no data yet).
    Joining,
    /// Gone; its id and name stay taken. A live site that was decommissioned ends here,
    /// after its updates reached every peer.
    Removed,
    /// Being decommissioned (`sites remove NAME`): refuses client writes (its clients fail
    /// over), drains its retained updates to every peer, then leaves the Raft groups and
    /// becomes [`MemberState::Removed`].
    Leaving,
    /// Removed while dead (`sites remove NAME --dead`): its disk is gone. The survivors agreed
    /// on `cut`, the most of its stream any of them held; they relay its updates to each other
    /// up to there, and a session that saw more of it gets a `Lost` error.
    RemovedDead {
        /// Per this origin, the highest timestamp any survivor had applied.
        cut: u64,
    },
}

impl MemberState {
    /// The state's name, as `sites list` shows it.
    pub fn as_str(self) -> &'static str {
        match self {
            MemberState::Active => "active",
            MemberState::Joining => "joining",
            MemberState::Removed => "removed",
            MemberState::Leaving => "leaving",
            MemberState::RemovedDead { .. } => "removed-dead",
        }
    }

    /// Removed, live or dead: no longer a member (its id stays taken).
    pub fn is_removed(self) -> bool {
        matches!(self, MemberState::Removed | MemberState::RemovedDead { .. })
    }

    /// The cut of a site removed while dead.
    pub fn cut(self) -> Option<u64> {
        match self {
            MemberState::RemovedDead { cut } => Some(cut),
            _ => None,
        }
    }
}

/// One site in the configuration.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    /// Site id: its index in every vector. Never reused.
    pub id: SiteId,
    /// Site name; its certificate must carry it.
    pub name: String,
    /// Address of its partition 0 (peers and clients).
    pub addr: SocketAddr,
    /// Addresses of all its partitions, when listed explicitly (see
    /// [`SiteEntry::partition_addrs`]).
    pub partition_addrs: Vec<SocketAddr>,
    /// Where it is in its life in the cluster.
    pub state: MemberState,
}

/// The cluster configuration: the sites, under an epoch.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Membership {
    /// Raised by one on every change; 1 for the bootstrapped configuration.
    pub epoch: u64,
    /// The id the next added site gets: ids below it are taken forever.
    pub next_id: SiteId,
    /// Every site ever in the configuration, in id order (entry `i` has id `i`).
    pub sites: Vec<Member>,
}

/// A change to the configuration, proposed through the Raft log.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum SitesOp {
    /// Seed the configuration (the first start): refused if there already is one.
    Bootstrap(Membership),
    /// Add a site with the next id, as [`MemberState::Joining`], iff the configuration is at
    /// `expected_epoch`.
    Add {
        /// The epoch the change was made against.
        expected_epoch: u64,
        /// The new site's name.
        name: String,
        /// Its address.
        addr: SocketAddr,
    },
    /// Start decommissioning the live site `name` (it becomes [`MemberState::Leaving`]), iff
    /// the configuration is at `expected_epoch`.
    Leave {
        /// The epoch the change was made against.
        expected_epoch: u64,
        /// The site.
        name: String,
    },
    /// End a decommission: the leaving site `name` has drained its updates to every peer and
    /// becomes [`MemberState::Removed`]. Proposed by the leaving site itself.
    Remove {
        /// The epoch the change was made against.
        expected_epoch: u64,
        /// The site.
        name: String,
    },
    /// Remove the dead site `name` with the cut the survivors agreed on (it becomes
    /// [`MemberState::RemovedDead`]).
    RemoveDead {
        /// The epoch the change was made against.
        expected_epoch: u64,
        /// The site.
        name: String,
        /// The most of its stream any survivor holds.
        cut: u64,
    },
    /// Mark joining site `id` [`MemberState::Active`] (group 0's leader proposes it once the
    /// site is a Raft voter), iff the configuration is at `expected_epoch`.
    Activate {
        /// The epoch the change was made against.
        expected_epoch: u64,
        /// The joining site.
        id: SiteId,
    },
}

/// The configuration as snapshots store it: one variant per shape it has had.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Versioned {
    /// The first shape.
    V1(Membership),
}

/// Checks a site name: non-empty ASCII letters, digits or `-` (it goes into a certificate's
/// DNS name).
pub fn check_name(name: &str) -> Result<(), String> {
    if name.is_empty()
        || name.len() > 63
        || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
    {
        return Err(format!(
            "site name {name:?} must be 1 to 63 ASCII letters, digits or '-'"
        ));
    }
    Ok(())
}

impl Membership {
    /// The configuration a `[[sites]]` list seeds (epoch 1, every site active).
    pub fn from_entries(entries: &[SiteEntry]) -> Membership {
        Membership {
            epoch: 1,
            next_id: entries.len() as SiteId,
            sites: entries
                .iter()
                .map(|e| Member {
                    id: e.id,
                    name: e.name.clone(),
                    addr: e.addr,
                    partition_addrs: e.partition_addrs.clone(),
                    state: MemberState::Active,
                })
                .collect(),
        }
    }

    /// The sites as `[[sites]]` entries, in id order (removed ones included: their ids still
    /// index the vectors).
    pub fn site_entries(&self) -> Vec<SiteEntry> {
        self.sites
            .iter()
            .map(|m| SiteEntry {
                id: m.id,
                name: m.name.clone(),
                addr: m.addr,
                partition_addrs: m.partition_addrs.clone(),
            })
            .collect()
    }

    /// Sites not removed.
    pub fn members(&self) -> impl Iterator<Item = &Member> {
        self.sites.iter().filter(|m| !m.state.is_removed())
    }

    /// The site named `name`.
    pub fn by_name(&self, name: &str) -> Option<&Member> {
        self.sites.iter().find(|m| m.name == name)
    }

    /// The change in progress, if any, as `(site, phase)`: a site leaving (draining its
    /// updates) or joining.
    pub fn in_progress(&self) -> Option<(&Member, &'static str)> {
        self.sites.iter().find_map(|m| match m.state {
            MemberState::Leaving => Some((m, "leaving: draining")),
            MemberState::Joining => Some((m, "joining")),
            _ => None,
        })
    }

    /// Checks the configuration is well formed: ids in order from 0, below `next_id`, names
    /// valid and unique, addresses unique among the sites not removed.
    pub fn check(&self) -> Result<(), String> {
        if self.sites.is_empty() || self.sites.len() > MAX_SITES {
            return Err(format!(
                "a configuration has 1 to {MAX_SITES} sites, this one {}",
                self.sites.len()
            ));
        }
        if (self.next_id as usize) < self.sites.len() {
            return Err(format!(
                "next id {} is below the {} sites listed",
                self.next_id,
                self.sites.len()
            ));
        }
        for (i, m) in self.sites.iter().enumerate() {
            if m.id as usize != i {
                return Err(format!("entry {i} has id {}, sites go in id order", m.id));
            }
            check_name(&m.name)?;
            if self.sites[..i].iter().any(|o| o.name == m.name) {
                return Err(format!("site name {:?} is listed twice", m.name));
            }
            // A removed site's address may be taken by a later one.
            let live = |o: &&Member| !o.state.is_removed();
            if !m.state.is_removed()
                && self.sites[..i]
                    .iter()
                    .filter(live)
                    .any(|o| o.addr == m.addr)
            {
                return Err(format!("address {} is listed twice", m.addr));
            }
        }
        Ok(())
    }

    /// Applies a change to the configuration `current` (`None`: not bootstrapped yet). Pure:
    /// every node applies the same committed entries to the same state and gets the same
    /// result. Returns the new epoch, or why the change was refused (then nothing changed).
    pub fn apply(current: &mut Option<Membership>, op: &SitesOp) -> Result<u64, String> {
        match (op, current.as_mut()) {
            (SitesOp::Bootstrap(_), Some(c)) => Err(format!(
                "the cluster configuration already exists (epoch {})",
                c.epoch
            )),
            (SitesOp::Bootstrap(seed), None) => {
                seed.check()?;
                if seed.epoch != 1 {
                    return Err(format!("a bootstrap starts at epoch 1, not {}", seed.epoch));
                }
                *current = Some(seed.clone());
                Ok(1)
            }
            (SitesOp::Add { .. }, None) => {
                Err("the cluster configuration is not bootstrapped yet".into())
            }
            (
                SitesOp::Add {
                    expected_epoch,
                    name,
                    addr,
                },
                Some(c),
            ) => {
                c.at_epoch(*expected_epoch)?;
                check_name(name)?;
                // Names of removed sites stay taken: their certificates still verify.
                if let Some(m) = c.sites.iter().find(|m| &m.name == name) {
                    return Err(format!(
                        "site name {name:?} is taken (site {}, {})",
                        m.id,
                        m.state.as_str()
                    ));
                }
                if let Some(m) = c.members().find(|m| m.addr == *addr) {
                    return Err(format!("address {addr} is site {:?}'s", m.name));
                }
                if let Some((m, _)) = c.in_progress() {
                    return Err(format!(
                        "site {:?} is {}: one change at a time",
                        m.name,
                        m.state.as_str()
                    ));
                }
                if c.sites.len() >= MAX_SITES || c.next_id as usize >= MAX_SITES {
                    return Err(format!("a cluster has at most {MAX_SITES} sites"));
                }
                let id = c.next_id;
                // Ids index vectors, so they stay dense: the next id is the next entry.
                debug_assert_eq!(id as usize, c.sites.len());
                c.sites.push(Member {
                    id,
                    name: name.clone(),
                    addr: *addr,
                    partition_addrs: Vec::new(),
                    state: MemberState::Joining,
                });
                c.next_id += 1;
                c.epoch += 1;
                Ok(c.epoch)
            }
            (SitesOp::Leave { .. } | SitesOp::Remove { .. } | SitesOp::RemoveDead { .. }, None) => {
                Err("the cluster configuration is not bootstrapped yet".into())
            }
            (
                SitesOp::Leave {
                    expected_epoch,
                    name,
                },
                Some(c),
            ) => {
                let id = c.removable(*expected_epoch, name)?;
                if let Some((m, _)) = c.in_progress() {
                    return Err(format!(
                        "site {:?} is {}: one change at a time",
                        m.name,
                        m.state.as_str()
                    ));
                }
                c.sites[id as usize].state = MemberState::Leaving;
                c.epoch += 1;
                Ok(c.epoch)
            }
            (
                SitesOp::Remove {
                    expected_epoch,
                    name,
                },
                Some(c),
            ) => {
                let id = c.removable(*expected_epoch, name)?;
                if c.sites[id as usize].state != MemberState::Leaving {
                    return Err(format!(
                        "site {name:?} is {}, not leaving: run `sites remove {name}` first",
                        c.sites[id as usize].state.as_str()
                    ));
                }
                c.sites[id as usize].state = MemberState::Removed;
                c.epoch += 1;
                Ok(c.epoch)
            }
            (
                SitesOp::RemoveDead {
                    expected_epoch,
                    name,
                    cut,
                },
                Some(c),
            ) => {
                let id = c.removable(*expected_epoch, name)?;
                c.sites[id as usize].state = MemberState::RemovedDead { cut: *cut };
                c.epoch += 1;
                Ok(c.epoch)
            }
            (SitesOp::Activate { .. }, None) => {
                Err("the cluster configuration is not bootstrapped yet".into())
            }
            (SitesOp::Activate { expected_epoch, id }, Some(c)) => {
                c.at_epoch(*expected_epoch)?;
                let Some(m) = c.sites.get_mut(*id as usize) else {
                    return Err(format!("there is no site {id}"));
                };
                if m.state != MemberState::Joining {
                    return Err(format!(
                        "site {:?} is {}, not joining",
                        m.name,
                        m.state.as_str()
                    ));
                }
                m.state = MemberState::Active;
                c.epoch += 1;
                Ok(c.epoch)
            }
        }
    }

    /// Checks that a change made against `expected_epoch` meets the configuration it was made
    /// against (changes are compare-and-set on the epoch).
    fn at_epoch(&self, expected_epoch: u64) -> Result<(), String> {
        if expected_epoch != self.epoch {
            return Err(format!(
                "the configuration moved on: it is at epoch {}, the change was made against \
                 epoch {expected_epoch}",
                self.epoch
            ));
        }
        Ok(())
    }

    /// Checks that the site `name` may be removed from this configuration by a change made
    /// against `expected_epoch`: the epoch is current, the site exists and is not removed, and
    /// a majority of the sites not removed remains. Returns its id.
    pub fn removable(&self, expected_epoch: u64, name: &str) -> Result<SiteId, String> {
        self.at_epoch(expected_epoch)?;
        let Some(m) = self.by_name(name) else {
            let known: Vec<&str> = self.sites.iter().map(|m| m.name.as_str()).collect();
            return Err(format!("no site is named {name:?} (sites: {known:?})"));
        };
        if m.state.is_removed() {
            return Err(format!(
                "site {name:?} (id {}) is already {}",
                m.id,
                m.state.as_str()
            ));
        }
        let members = self.members().count();
        if members <= 2 {
            return Err(format!(
                "removing site {name:?} would leave {} of the {members} voters, not a majority \
                 of them: the Raft groups could not commit the change; a cluster keeps at least \
                 2 sites",
                members - 1
            ));
        }
        Ok(m.id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seed(n: u16) -> Membership {
        let entries: Vec<SiteEntry> = (0..n)
            .map(|i| {
                SiteEntry::new(
                    i,
                    format!("s{i}"),
                    format!("127.0.0.1:{}", 7000 + i).parse().unwrap(),
                )
            })
            .collect();
        Membership::from_entries(&entries)
    }

    fn add(epoch: u64, name: &str, port: u16) -> SitesOp {
        SitesOp::Add {
            expected_epoch: epoch,
            name: name.into(),
            addr: format!("127.0.0.1:{port}").parse().unwrap(),
        }
    }

    #[test]
    fn bootstrap_seeds_once_and_round_trips_to_site_entries() {
        let mut c = None;
        assert_eq!(
            Membership::apply(&mut c, &add(1, "d", 9000)).unwrap_err(),
            "the cluster configuration is not bootstrapped yet"
        );
        assert_eq!(
            Membership::apply(&mut c, &SitesOp::Bootstrap(seed(3))),
            Ok(1)
        );
        let m = c.clone().unwrap();
        assert_eq!((m.epoch, m.next_id, m.sites.len()), (1, 3, 3));
        assert!(m.members().all(|s| s.state == MemberState::Active));
        // The first bootstrap committed wins; a later one (another site's file) changes nothing.
        let e = Membership::apply(&mut c, &SitesOp::Bootstrap(seed(2))).unwrap_err();
        assert!(e.contains("already exists (epoch 1)"), "{e}");
        assert_eq!(c.as_ref(), Some(&m));
        let entries = m.site_entries();
        assert_eq!(Membership::from_entries(&entries), m);
        // A malformed seed is refused.
        let mut bad = seed(2);
        bad.sites[1].name = "s0".into();
        let mut none = None;
        let e = Membership::apply(&mut none, &SitesOp::Bootstrap(bad)).unwrap_err();
        assert!(e.contains("listed twice"), "{e}");
        assert_eq!(none, None);
    }

    #[test]
    fn add_takes_the_next_id_raises_the_epoch_and_is_checked_against_the_epoch() {
        let mut c = Some(seed(3));
        assert_eq!(Membership::apply(&mut c, &add(1, "d", 9000)), Ok(2));
        let m = c.clone().unwrap();
        assert_eq!((m.epoch, m.next_id), (2, 4));
        let d = &m.sites[3];
        assert_eq!(
            (d.id, d.name.as_str(), d.state),
            (3, "d", MemberState::Joining)
        );
        // The same change again (a retry made against epoch 1) is refused: it applied once.
        let e = Membership::apply(&mut c, &add(1, "d", 9000)).unwrap_err();
        assert!(e.contains("epoch 2") && e.contains("epoch 1"), "{e}");
        // Taken names and addresses, bad names: refused, nothing changes.
        for (op, why) in [
            (add(2, "d", 9001), "taken"),
            (add(2, "s0", 9001), "taken"),
            (add(2, "e", 7001), "site \"s1\"'s"),
            (add(2, "e_f", 9001), "ASCII"),
            (add(2, "", 9001), "ASCII"),
        ] {
            let e = Membership::apply(&mut c, &op).unwrap_err();
            assert!(e.contains(why), "{op:?}: {e}");
            assert_eq!(c.as_ref(), Some(&m));
        }
        // One change at a time: e waits until d is active.
        let e = Membership::apply(&mut c, &add(2, "e", 9001)).unwrap_err();
        assert!(
            e.contains("site \"d\" is joining: one change at a time"),
            "{e}"
        );
        let activate = SitesOp::Activate {
            expected_epoch: 2,
            id: 3,
        };
        assert_eq!(Membership::apply(&mut c, &activate), Ok(3));
        assert_eq!(Membership::apply(&mut c, &add(3, "e", 9001)), Ok(4));
        assert_eq!(c.as_ref().unwrap().sites[4].id, 4);
    }

    #[test]
    fn activate_marks_a_joining_site_active_once() {
        let mut c = Some(seed(3));
        assert_eq!(Membership::apply(&mut c, &add(1, "d", 9000)), Ok(2));
        let act = |epoch, id| SitesOp::Activate {
            expected_epoch: epoch,
            id,
        };
        let e = Membership::apply(&mut c, &act(1, 3)).unwrap_err();
        assert!(e.contains("moved on"), "{e}");
        let e = Membership::apply(&mut c, &act(2, 0)).unwrap_err();
        assert!(e.contains("is active, not joining"), "{e}");
        let e = Membership::apply(&mut c, &act(2, 9)).unwrap_err();
        assert!(e.contains("no site 9"), "{e}");
        assert_eq!(Membership::apply(&mut c, &act(2, 3)), Ok(3));
        let m = c.clone().unwrap();
        assert_eq!(m.sites[3].state, MemberState::Active);
        // Once only: a retry against the old epoch changes nothing.
        assert!(Membership::apply(&mut c, &act(2, 3)).is_err());
        assert_eq!(c, Some(m));
    }

    #[test]
    fn ids_are_never_reused_even_after_a_removal() {
        let mut c = Some(seed(2));
        c.as_mut().unwrap().sites[1].state = MemberState::Removed;
        assert_eq!(c.as_ref().unwrap().members().count(), 1);
        // The removed site's name stays taken; its address is free again; the id moves on.
        let e = Membership::apply(&mut c, &add(1, "s1", 9000)).unwrap_err();
        assert!(e.contains("removed"), "{e}");
        assert_eq!(Membership::apply(&mut c, &add(1, "t", 7001)), Ok(2));
        let m = c.unwrap();
        assert_eq!((m.sites[2].id, m.next_id), (2, 3));
        m.check().unwrap();
    }

    #[test]
    fn removals_are_checked_and_keep_ids_and_names() {
        let leave = |e, n: &str| SitesOp::Leave {
            expected_epoch: e,
            name: n.into(),
        };
        let mut c = Some(seed(3));
        for (op, why) in [
            (leave(1, "x"), "no site is named \"x\""),
            (leave(2, "s1"), "moved on"),
            (
                SitesOp::Remove {
                    expected_epoch: 1,
                    name: "s1".into(),
                },
                "not leaving",
            ),
        ] {
            let e = Membership::apply(&mut c, &op).unwrap_err();
            assert!(e.contains(why), "{op:?}: {e}");
        }
        assert_eq!(Membership::apply(&mut c, &leave(1, "s1")), Ok(2));
        let m = c.as_ref().unwrap();
        assert_eq!(
            m.in_progress().map(|(m, p)| (m.id, p)),
            Some((1, "leaving: draining"))
        );
        let e = Membership::apply(&mut c, &leave(2, "s2")).unwrap_err();
        assert!(e.contains("one change at a time"), "{e}");
        // An addition waits too: a joining site and a leaving one at once would each wait on
        // the other (the drain on the joiner's acks, the joiner's floor on the drain).
        let e = Membership::apply(&mut c, &add(2, "d", 9000)).unwrap_err();
        assert!(e.contains("one change at a time"), "{e}");
        let remove = SitesOp::Remove {
            expected_epoch: 2,
            name: "s1".into(),
        };
        assert_eq!(Membership::apply(&mut c, &remove), Ok(3));
        let e = Membership::apply(&mut c, &leave(3, "s1")).unwrap_err();
        assert!(e.contains("already removed"), "{e}");
        // Two sites left: removing one would leave no majority of the voters.
        let dead = |e, n: &str| SitesOp::RemoveDead {
            expected_epoch: e,
            name: n.into(),
            cut: 42,
        };
        let e = Membership::apply(&mut c, &dead(3, "s2")).unwrap_err();
        assert!(e.contains("not a majority"), "{e}");
        let mut c = Some(seed(3));
        assert_eq!(Membership::apply(&mut c, &dead(1, "s2")), Ok(2));
        let m = c.unwrap();
        assert_eq!(m.sites[2].state, MemberState::RemovedDead { cut: 42 });
        assert_eq!(m.sites[2].state.cut(), Some(42));
        assert_eq!(m.members().count(), 2);
        m.check().unwrap();
        // The new states survive the codec snapshots use.
        let back: Versioned =
            postcard::from_bytes(&postcard::to_stdvec(&Versioned::V1(m.clone())).unwrap()).unwrap();
        assert_eq!(back, Versioned::V1(m));
    }

    #[test]
    fn a_full_cluster_refuses_another_site() {
        let mut c = Some(seed(MAX_SITES as u16));
        let e = Membership::apply(&mut c, &add(1, "extra", 1)).unwrap_err();
        assert!(e.contains("at most 64"), "{e}");
    }
}
