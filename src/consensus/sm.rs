//! The state machine of a group: the strong keyspace, separate from the causal store (a causal
//! last-writer-wins write can never touch it, so it can never undo a compare-and-set), with the
//! replies remembered per client for deduplication, and its snapshots.
//!
//! Each key holds a value or a tombstone, with the causal context its writer was issued under
//! (a strong read returns that context, and the client merges it into its session).
//!
//! Deduplication: a write carries `(client, serial)`. The state machine remembers the reply of
//! each client's last [`REMEMBERED`] serials; a retry of one of those gets the first reply and
//! changes nothing, a retry of an older one gets [`Reply::Forgotten`] (its outcome is unknown).
//!
//! A snapshot is the whole state (postcard), written to `snapshot.bin` in the group's
//! directory (temporary file, fsync, rename) on a blocking thread; the node loads it at start
//! and openraft applies the log entries after it. The cluster configuration
//! ([`super::members`]) follows the keyspace in the same bytes, as a trailing section
//! ([`StrongState::to_bytes`]): a snapshot written before it existed has no such section and
//! still loads (no configuration yet).

use std::collections::BTreeMap;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};

use openraft::storage::RaftStateMachine;
use openraft::{
    Entry, EntryPayload, LogId, OptionalSend, RaftSnapshotBuilder, Snapshot, SnapshotMeta,
    StorageError, StorageIOError, StoredMembership,
};
use serde::{Deserialize, Serialize};

use super::members::{Membership, Versioned};
use super::{Command, NodeId, Reply, SnapshotPoint, TypeConfig, WriteOp};

/// Replies remembered per client.
pub const REMEMBERED: usize = 1024;

/// A key's content.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stored {
    /// The value; `None`: deleted.
    pub value: Option<Vec<u8>>,
    /// The causal context of the write.
    pub ctx: Vec<u64>,
}

/// What one client's recent writes answered.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
struct Session {
    /// Serials below this are forgotten.
    floor: u64,
    replies: BTreeMap<u64, Reply>,
}

/// The whole state of the strong keyspace of a group.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct StrongState {
    /// The last log entry applied.
    pub last_applied: Option<LogId<NodeId>>,
    /// The membership last applied.
    pub membership: StoredMembership<NodeId, openraft::EmptyNode>,
    /// Keys.
    pub data: BTreeMap<Vec<u8>, Stored>,
    sessions: BTreeMap<u64, Session>,
    /// The cluster configuration (partition index 0's group; `None` elsewhere and until
    /// bootstrapped). Not part of the serde form: [`StrongState::to_bytes`] appends it.
    #[serde(skip)]
    pub sites: Option<Membership>,
}

impl StrongState {
    /// The state's bytes: the keyspace and sessions, then (if there is one) the configuration
    /// as a [`Versioned`] section.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = super::encode(self);
        if let Some(m) = &self.sites {
            out.extend_from_slice(&super::encode(&Versioned::V1(m.clone())));
        }
        out
    }

    /// Reads [`StrongState::to_bytes`]'s form (and the form before the configuration existed:
    /// no trailing section).
    pub fn from_bytes(bytes: &[u8]) -> Result<StrongState, String> {
        let (mut state, rest): (StrongState, _) = postcard::take_from_bytes(bytes)
            .map_err(|e| format!("malformed consensus state: {e}"))?;
        if !rest.is_empty() {
            let (section, tail): (Versioned, _) = postcard::take_from_bytes(rest)
                .map_err(|e| format!("malformed cluster configuration: {e}"))?;
            if !tail.is_empty() {
                return Err(format!(
                    "{} bytes after the cluster configuration",
                    tail.len()
                ));
            }
            state.sites = Some(match section {
                Versioned::V1(m) => m,
            });
        }
        Ok(state)
    }

    /// A key's value and context (`None` value, empty context: never written).
    pub fn read(&self, key: &[u8]) -> (Option<Vec<u8>>, Vec<u64>) {
        match self.data.get(key) {
            Some(s) => (s.value.clone(), s.ctx.clone()),
            None => (None, Vec::new()),
        }
    }

    /// Applies one command (deduplicated).
    pub fn apply(&mut self, cmd: &Command) -> Reply {
        let session = self.sessions.entry(cmd.client).or_default();
        if let Some(r) = session.replies.get(&cmd.serial) {
            return r.clone();
        }
        if cmd.serial < session.floor {
            return Reply::Forgotten;
        }
        let key = cmd.op.key().to_vec();
        let reply = match &cmd.op {
            WriteOp::Sites(op) => Reply::Membership(Membership::apply(&mut self.sites, op)),
            WriteOp::Put { value, .. } => {
                self.data.insert(
                    key,
                    Stored {
                        value: Some(value.clone()),
                        ctx: cmd.ctx.clone(),
                    },
                );
                Reply::Written
            }
            WriteOp::Delete { .. } => {
                self.data.insert(
                    key,
                    Stored {
                        value: None,
                        ctx: cmd.ctx.clone(),
                    },
                );
                Reply::Written
            }
            WriteOp::Cas { expected, new, .. } => {
                let (current, ctx) = self.read(&key);
                if &current == expected {
                    self.data.insert(
                        key,
                        Stored {
                            value: new.clone(),
                            ctx: cmd.ctx.clone(),
                        },
                    );
                    Reply::CasOk
                } else {
                    Reply::CasFailed { current, ctx }
                }
            }
            WriteOp::PutIfPresent { value, .. } => {
                let (current, ctx) = self.read(&key);
                if current.is_some() {
                    self.data.insert(
                        key,
                        Stored {
                            value: Some(value.clone()),
                            ctx: cmd.ctx.clone(),
                        },
                    );
                    Reply::CasOk
                } else {
                    Reply::CasFailed { current, ctx }
                }
            }
        };
        let session = self.sessions.entry(cmd.client).or_default();
        session.replies.insert(cmd.serial, reply.clone());
        while session.replies.len() > REMEMBERED {
            let (oldest, _) = session.replies.pop_first().expect("non-empty");
            session.floor = session.floor.max(oldest + 1);
        }
        reply
    }
}

/// A snapshot as stored on disk.
#[derive(Serialize, Deserialize)]
struct SnapshotFile {
    meta: SnapshotMeta<NodeId, openraft::EmptyNode>,
    data: Vec<u8>,
}

fn sm_err(e: impl std::fmt::Display) -> StorageError<NodeId> {
    StorageIOError::write_state_machine(openraft::AnyError::error(e.to_string())).into()
}

/// The current snapshot: its metadata and bytes.
type Current = (SnapshotMeta<NodeId, openraft::EmptyNode>, Vec<u8>);

/// The state machine of a group. Clones share one state.
#[derive(Clone)]
pub struct StateMachine {
    /// The strong keyspace; the node reads it for linearizable reads.
    pub state: Arc<RwLock<StrongState>>,
    dir: PathBuf,
    current: Arc<Mutex<Option<Current>>>,
    /// The cluster configuration as last applied: sent whenever an applied entry or an
    /// installed snapshot changes it, so the node adopts a change live
    /// ([`StateMachine::watch_sites`]).
    sites: Arc<tokio::sync::watch::Sender<Option<Membership>>>,
    /// What the snapshot on disk covers, for the log ([`StateMachine::snapshot_point`]).
    point: SnapshotPoint,
}

impl StateMachine {
    /// The last log id the snapshot on disk covers, kept up to date as snapshots are stored:
    /// the log bounds its purges by it.
    pub fn snapshot_point(&self) -> SnapshotPoint {
        self.point.clone()
    }

    /// Opens the state machine in `dir`, loading its snapshot if there is one. Blocking.
    pub fn open(dir: &Path) -> io::Result<StateMachine> {
        std::fs::create_dir_all(dir)?;
        let path = dir.join("snapshot.bin");
        let (state, current) = match std::fs::read(&path) {
            Ok(bytes) => {
                let bad = |m: String| {
                    io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!("{}: {m}", path.display()),
                    )
                };
                if bytes.len() < 4 {
                    return Err(bad("too short".into()));
                }
                let (crc, body) = bytes.split_at(4);
                if crc32fast::hash(body) != u32::from_le_bytes(crc.try_into().expect("4 bytes")) {
                    return Err(bad("checksum mismatch".into()));
                }
                let f: SnapshotFile = super::decode(body).map_err(bad)?;
                let state = StrongState::from_bytes(&f.data).map_err(bad)?;
                (state, Some((f.meta, f.data)))
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => (StrongState::default(), None),
            Err(e) => return Err(e),
        };
        let sites = Arc::new(tokio::sync::watch::Sender::new(state.sites.clone()));
        let point = SnapshotPoint::default();
        point.set(current.as_ref().and_then(|(meta, _)| meta.last_log_id));
        Ok(StateMachine {
            state: Arc::new(RwLock::new(state)),
            dir: dir.to_owned(),
            current: Arc::new(Mutex::new(current)),
            sites,
            point,
        })
    }

    /// The cluster configuration, as applied: the current one, then every change (an
    /// applied [`WriteOp::Sites`] entry or an installed snapshot that holds another one).
    pub fn watch_sites(&self) -> tokio::sync::watch::Receiver<Option<Membership>> {
        self.sites.subscribe()
    }

    /// Tells the watchers of [`StateMachine::watch_sites`] the configuration `now`, if it
    /// differs from the last one sent.
    fn publish_sites(&self, now: &Option<Membership>) {
        self.sites.send_if_modified(|last| {
            let changed = last != now;
            if changed {
                last.clone_from(now);
            }
            changed
        });
    }

    /// Stores a snapshot durably (on a blocking thread) and makes it the current one.
    async fn store(
        &self,
        meta: SnapshotMeta<NodeId, openraft::EmptyNode>,
        data: Vec<u8>,
    ) -> Result<(), StorageError<NodeId>> {
        let file = SnapshotFile {
            meta: meta.clone(),
            data,
        };
        let body = super::encode(&file);
        let path = self.dir.join("snapshot.bin");
        tokio::task::spawn_blocking(move || -> io::Result<()> {
            let tmp = path.with_extension("tmp");
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(&crc32fast::hash(&body).to_le_bytes())?;
            f.write_all(&body)?;
            f.sync_all()?;
            std::fs::rename(&tmp, &path)?;
            if let Some(d) = path.parent() {
                std::fs::File::open(d)?.sync_all()?;
            }
            Ok(())
        })
        .await
        .map_err(sm_err)?
        .map_err(sm_err)?;
        self.point.set(meta.last_log_id);
        *self.current.lock().expect("snapshot lock") = Some((meta, file.data));
        Ok(())
    }
}

impl RaftSnapshotBuilder<TypeConfig> for StateMachine {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StorageError<NodeId>> {
        let (data, last, membership) = {
            let st = self.state.read().expect("state lock");
            (st.to_bytes(), st.last_applied, st.membership.clone())
        };
        let id = match last {
            Some(l) => format!("{}-{}", l.leader_id, l.index),
            None => "empty".into(),
        };
        let meta = SnapshotMeta {
            last_log_id: last,
            last_membership: membership,
            snapshot_id: id,
        };
        self.store(meta.clone(), data.clone()).await?;
        Ok(Snapshot {
            meta,
            snapshot: Box::new(data),
        })
    }
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotBuilder = StateMachine;

    async fn applied_state(
        &mut self,
    ) -> Result<
        (
            Option<LogId<NodeId>>,
            StoredMembership<NodeId, openraft::EmptyNode>,
        ),
        StorageError<NodeId>,
    > {
        let st = self.state.read().expect("state lock");
        Ok((st.last_applied, st.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<Vec<Reply>>, StorageError<NodeId>>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut st = self.state.write().expect("state lock");
        let mut out = Vec::new();
        let mut touched_sites = false;
        for e in entries {
            st.last_applied = Some(e.log_id);
            out.push(match e.payload {
                EntryPayload::Blank => Vec::new(),
                EntryPayload::Normal(batch) => {
                    touched_sites |= batch.0.iter().any(|c| matches!(c.op, WriteOp::Sites(_)));
                    batch.0.iter().map(|cmd| st.apply(cmd)).collect()
                }
                EntryPayload::Membership(m) => {
                    st.membership = StoredMembership::new(Some(e.log_id), m);
                    Vec::new()
                }
            });
        }
        if touched_sites {
            let sites = st.sites.clone();
            drop(st);
            self.publish_sites(&sites);
        }
        Ok(out)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<Vec<u8>>, StorageError<NodeId>> {
        Ok(Box::default())
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<NodeId, openraft::EmptyNode>,
        snapshot: Box<Vec<u8>>,
    ) -> Result<(), StorageError<NodeId>> {
        let state = StrongState::from_bytes(&snapshot).map_err(sm_err)?;
        self.store(meta.clone(), *snapshot).await?;
        let sites = state.sites.clone();
        *self.state.write().expect("state lock") = state;
        self.publish_sites(&sites);
        Ok(())
    }

    async fn get_current_snapshot(
        &mut self,
    ) -> Result<Option<Snapshot<TypeConfig>>, StorageError<NodeId>> {
        Ok(self
            .current
            .lock()
            .expect("snapshot lock")
            .clone()
            .map(|(meta, data)| Snapshot {
                meta,
                snapshot: Box::new(data),
            }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cmd(client: u64, serial: u64, op: WriteOp) -> Command {
        Command {
            client,
            serial,
            ctx: vec![serial],
            op,
        }
    }

    #[test]
    fn cas_and_retries_apply_once() {
        let mut st = StrongState::default();
        let k = b"k".to_vec();
        let cas = |expected: Option<&str>, new: Option<&str>| WriteOp::Cas {
            key: k.clone(),
            expected: expected.map(|v| v.as_bytes().to_vec()),
            new: new.map(|v| v.as_bytes().to_vec()),
        };
        assert_eq!(st.apply(&cmd(1, 1, cas(None, Some("a")))), Reply::CasOk);
        // A retry of the same serial gets the same reply, even though the state moved on.
        assert_eq!(st.apply(&cmd(1, 1, cas(None, Some("a")))), Reply::CasOk);
        assert_eq!(
            st.apply(&cmd(2, 1, cas(None, Some("b")))),
            Reply::CasFailed {
                current: Some(b"a".to_vec()),
                ctx: vec![1]
            }
        );
        assert_eq!(
            st.apply(&cmd(2, 2, WriteOp::Delete { key: k.clone() })),
            Reply::Written
        );
        assert_eq!(st.read(&k), (None, vec![2]));
        for s in 3..(3 + REMEMBERED as u64 + 1) {
            st.apply(&cmd(
                2,
                s,
                WriteOp::Put {
                    key: k.clone(),
                    value: b"x".to_vec(),
                },
            ));
        }
        assert_eq!(
            st.apply(&cmd(2, 2, WriteOp::Delete { key: k.clone() })),
            Reply::Forgotten
        );
        assert_eq!(st.read(&k).0, Some(b"x".to_vec()));
    }

    #[test]
    fn put_if_present_needs_a_value() {
        let mut st = StrongState::default();
        let xx = |v: &str| WriteOp::PutIfPresent {
            key: b"k".to_vec(),
            value: v.as_bytes().to_vec(),
        };
        assert_eq!(
            st.apply(&cmd(1, 1, xx("a"))),
            Reply::CasFailed {
                current: None,
                ctx: Vec::new()
            }
        );
        assert_eq!(st.read(b"k").0, None);
        st.apply(&cmd(
            1,
            2,
            WriteOp::Put {
                key: b"k".to_vec(),
                value: b"b".to_vec(),
            },
        ));
        assert_eq!(st.apply(&cmd(1, 3, xx("c"))), Reply::CasOk);
        assert_eq!(st.read(b"k"), (Some(b"c".to_vec()), vec![3]));
    }

    fn sites_cmd(serial: u64, op: crate::consensus::members::SitesOp) -> Command {
        Command {
            client: crate::consensus::members::MEMBERSHIP_CLIENT,
            serial,
            ctx: Vec::new(),
            op: WriteOp::Sites(op),
        }
    }

    fn seed() -> Membership {
        let entries: Vec<crate::config::SiteEntry> = ["a", "b", "c"]
            .iter()
            .enumerate()
            .map(|(i, n)| {
                crate::config::SiteEntry::new(
                    i as u16,
                    *n,
                    format!("127.0.0.1:{}", 7100 + i).parse().unwrap(),
                )
            })
            .collect();
        Membership::from_entries(&entries)
    }

    #[test]
    fn configuration_changes_apply_through_commands_once() {
        use crate::consensus::members::SitesOp;
        let mut st = StrongState::default();
        let boot = sites_cmd(0, SitesOp::Bootstrap(seed()));
        assert_eq!(st.apply(&boot), Reply::Membership(Ok(1)));
        let add = sites_cmd(
            2,
            SitesOp::Add {
                expected_epoch: 1,
                name: "d".into(),
                addr: "127.0.0.1:7200".parse().unwrap(),
            },
        );
        assert_eq!(st.apply(&add), Reply::Membership(Ok(2)));
        // A retry of the same command gets its first reply and changes nothing.
        assert_eq!(st.apply(&add), Reply::Membership(Ok(2)));
        let m = st.sites.clone().unwrap();
        assert_eq!((m.epoch, m.next_id, m.sites.len()), (2, 4, 4));
        // Another site's bootstrap, committed later, is refused.
        let again = Command {
            serial: 1,
            ..boot.clone()
        };
        assert!(matches!(st.apply(&again), Reply::Membership(Err(e)) if e.contains("already")));
        assert_eq!(st.sites.as_ref(), Some(&m));
        // The strong keyspace is untouched by configuration commands.
        assert!(st.data.is_empty());
    }

    /// The sites' own changes against one epoch are told apart: the one applied second is
    /// judged on its own (refused, the epoch moved on), not answered with the first's reply.
    #[test]
    fn the_sites_own_changes_against_one_epoch_do_not_share_a_reply() {
        use crate::consensus::members::{MEMBERSHIP_CLIENT, SitesOp, internal_serial};
        let own = |op: SitesOp, epoch| Command {
            client: MEMBERSHIP_CLIENT,
            serial: internal_serial(epoch, &op),
            ctx: Vec::new(),
            op: WriteOp::Sites(op),
        };
        let mut st = StrongState::default();
        let boot = SitesOp::Bootstrap(seed());
        assert_eq!(st.apply(&own(boot, 0)), Reply::Membership(Ok(1)));
        let leave = SitesOp::Leave {
            expected_epoch: 1,
            name: "c".into(),
        };
        assert_eq!(st.apply(&sites_cmd(7, leave)), Reply::Membership(Ok(2)));
        let remove = own(
            SitesOp::Remove {
                expected_epoch: 2,
                name: "c".into(),
            },
            2,
        );
        assert_eq!(st.apply(&remove), Reply::Membership(Ok(3)));
        // A retry of the removal: its own first reply.
        assert_eq!(st.apply(&remove), Reply::Membership(Ok(3)));
        let activate = own(
            SitesOp::Activate {
                expected_epoch: 2,
                id: 1,
            },
            2,
        );
        assert_ne!(activate.serial, remove.serial);
        assert!(
            matches!(st.apply(&activate), Reply::Membership(Err(e)) if e.contains("moved on")),
            "an activation against epoch 2 after the removal is refused on its own"
        );
        assert_eq!(st.sites.as_ref().map(|m| m.epoch), Some(3));
    }

    #[test]
    fn state_bytes_carry_the_configuration_and_old_bytes_still_load() {
        let mut st = StrongState::default();
        st.apply(&cmd(
            1,
            1,
            WriteOp::Put {
                key: b"k".to_vec(),
                value: b"v".to_vec(),
            },
        ));
        // The form before the configuration existed is the serde form alone.
        let old = crate::consensus::encode(&st);
        let back = StrongState::from_bytes(&old).unwrap();
        assert_eq!((back.read(b"k").0, back.sites), (Some(b"v".to_vec()), None));
        st.sites = Some(seed());
        let back = StrongState::from_bytes(&st.to_bytes()).unwrap();
        assert_eq!(back.sites, Some(seed()));
        assert_eq!(back.read(b"k").0, Some(b"v".to_vec()));
        let mut bytes = st.to_bytes();
        bytes.push(0xff);
        assert!(StrongState::from_bytes(&bytes).is_err(), "trailing garbage");
    }

    #[test]
    fn log_entries_written_before_the_configuration_existed_still_decode() {
        // A put command as it was encoded before `WriteOp::Sites` was appended: client 1,
        // serial 2, ctx [3], variant 0 (Put), key "k", value "v".
        let frozen = [1u8, 2, 1, 3, 0, 1, b'k', 1, b'v'];
        let c: Command = crate::consensus::decode(&frozen).unwrap();
        assert_eq!(
            c,
            cmd_with(
                1,
                2,
                vec![3],
                WriteOp::Put {
                    key: b"k".to_vec(),
                    value: b"v".to_vec()
                }
            )
        );
        assert_eq!(crate::consensus::encode(&c), frozen);
    }

    fn cmd_with(client: u64, serial: u64, ctx: Vec<u64>, op: WriteOp) -> Command {
        Command {
            client,
            serial,
            ctx,
            op,
        }
    }

    #[tokio::test]
    async fn the_state_machine_applies_the_configuration_and_its_snapshot_keeps_it() {
        use crate::consensus::members::SitesOp;
        let dir = tempfile::tempdir().unwrap();
        let mut sm = StateMachine::open(dir.path()).unwrap();
        let mut watch = sm.watch_sites();
        assert_eq!(*watch.borrow_and_update(), None);
        let entry = Entry::<TypeConfig> {
            log_id: LogId::new(openraft::CommittedLeaderId::new(1, 0), 1),
            payload: EntryPayload::Normal(super::super::Batch(vec![sites_cmd(
                0,
                SitesOp::Bootstrap(seed()),
            )])),
        };
        let replies = RaftStateMachine::apply(&mut sm, [entry]).await.unwrap();
        assert_eq!(replies, vec![vec![Reply::Membership(Ok(1))]]);
        // The watchers see the change as it is applied.
        assert!(watch.has_changed().unwrap());
        assert_eq!(*watch.borrow_and_update(), Some(seed()));
        assert_eq!(sm.snapshot_point().get(), None, "no snapshot on disk yet");
        RaftSnapshotBuilder::build_snapshot(&mut sm).await.unwrap();
        // What the log bounds its purges by: the snapshot on disk, as stored and as reopened.
        assert_eq!(sm.snapshot_point().get().map(|l| l.index), Some(1));
        // A restart loads the configuration from the snapshot file.
        let reopened = StateMachine::open(dir.path()).unwrap();
        assert_eq!(reopened.snapshot_point().get().map(|l| l.index), Some(1));
        {
            let st = reopened.state.read().unwrap();
            assert_eq!(st.sites, Some(seed()));
            assert_eq!(st.last_applied.map(|l| l.index), Some(1));
        }
        // And a snapshot installed from a leader carries it too.
        let dir2 = tempfile::tempdir().unwrap();
        let mut other = StateMachine::open(dir2.path()).unwrap();
        let mut other_watch = other.watch_sites();
        let snap = RaftStateMachine::get_current_snapshot(&mut sm)
            .await
            .unwrap()
            .unwrap();
        RaftStateMachine::install_snapshot(&mut other, &snap.meta, snap.snapshot)
            .await
            .unwrap();
        assert_eq!(other.state.read().unwrap().sites, Some(seed()));
        assert_eq!(other.snapshot_point().get().map(|l| l.index), Some(1));
        assert!(other_watch.has_changed().unwrap());
        assert_eq!(*other_watch.borrow_and_update(), Some(seed()));
    }
}
