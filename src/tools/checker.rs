//! Causal-consistency checker over recorded histories.
//!
//! The deterministic simulation and the end-to-end suites record every *acknowledged* client
//! operation into a [`History`] (or, from async code, a [`Recorder`]) and then call [`check`],
//! which decides whether the history is causally consistent (CC) for a key-value store, and
//! [`check_convergence`], which compares the sites' final states (the "+" of causal+).
//!
//! # Model
//!
//! A history is a set of sessions; each session is a sequence of operations in the order they were
//! recorded (session order, `so`). Every write writes a value no other write of the same key
//! writes (a *differentiated* history), so the write a read observed (reads-from, `wr`) is
//! inferred from the value. A read returning `None` observed the initial (absent) value.
//! Causal order is `co = (so ∪ wr)+`.
//!
//! For differentiated histories, Bouajjani, Enea, Guerraoui and Hamza ("On verifying causal
//! consistency", POPL 2017, §4) show that a history is CC iff it contains none of four *bad
//! patterns*, each of which this checker reports:
//!
//! - **CyclicCO**: `co` is cyclic ([`ViolationKind::CyclicCausalOrder`]).
//! - **ThinAirRead**: a read returns a value no write wrote ([`ViolationKind::ThinAirRead`]).
//! - **WriteCOInitRead**: a read of `x` returns the initial value although a write of `x` is in
//!   its causal past ([`ViolationKind::WriteCoInitRead`]).
//! - **WriteCORead**: a read `r` of `x` returns write `w1` although another write `w2` of `x`
//!   satisfies `w1 <co w2 <co r`: under LWW with timestamps that respect causality, `w2` (or
//!   something later) must win. We split this pattern into five kinds by *where* `w2` comes
//!   from, named after the session guarantees of Terry et al. (PDIS 1994); see
//!   [`ViolationKind`] for the precise definitions.
//!
//! Two writes of the same value to the same key break the differentiated-history assumption and
//! are reported as an input error ([`ViolationKind::DuplicateWrite`]); reads of such a value are
//! ambiguous and are skipped rather than guessed.
//!
//! # Algorithm (near-linear)
//!
//! Let `n` be the number of operations and `S` the number of sessions.
//!
//! 1. **Index** (`O(n)` expected): dense session and key ids, each op's 1-based position in its
//!    session, reads-from by `(key, value)`, and for each key the positions of its writes (and
//!    reads) grouped per session, already sorted because positions grow.
//! 2. **Causal clocks** (`O(n·S)`): each op gets a vector clock over sessions; entry `t` is the
//!    number of ops of session `t` in the op's causal past, itself included, so
//!    `a ≼co b ⟺ clock(b)[session(a)] ≥ pos(a)`. Ops are placed in a topological order of
//!    `so ∪ wr`, Kahn-style with one cursor per session: a session advances until it reaches a
//!    read whose write is not placed yet, then parks on that write and is woken when it is
//!    placed. An op's clock is the entry-wise max of its session predecessor's clock and (for a
//!    read) its write's clock, with its own entry set to its position. If some sessions are still
//!    parked at the end, each waits on a write of another parked session (a write is placed
//!    before its session's cursor moves past it), so following "waits on" must close a cycle of
//!    `so ∪ wr`; every such cycle is reported as a witness. Ops outside the cycles' reach keep
//!    their clocks and are still checked.
//! 3. **Reads** (`O(S·log n)` per read): for a read `r` of `x` and each session `t` that writes
//!    `x`, binary-search the *last* write `w2` of `x` in `t` with position `≤ clock(r)[t]`: the
//!    latest write of `x` by `t` in `r`'s past. If any write of `x` in `t` is causally after `w1`
//!    and before `r`, this one is too (it follows that write in `so`), so testing this single
//!    candidate per session, `w2 ≠ w1 ∧ clock(w2)[session(w1)] ≥ pos(w1)`, is complete. A read of
//!    the initial value is bad iff any candidate exists at all.
//! 4. **Classification** (only for bad reads): the session-guarantee kinds ask whether a session
//!    had *observed* (read) a newer write of `x` before some point. For a (session, key) pair we
//!    build, lazily and once, the prefix maxima of the clocks of the writes its reads of `x`
//!    returned; a query is then a binary search plus a lookup. Witness ops (e.g. which earlier
//!    read) are recovered by a scan, only for the capped number of stored witnesses.
//!
//! Total: `O(n·S + reads·S·log n)` time and `O(n·S)` memory (`u32` clock entries). A
//! 100 000-op history over 30 sessions and 200 keys checks in about 0.1 s in a release build
//! (see the `large_history_is_fast` test).
//!
//! # Scope
//!
//! This checks CC, not causal *convergence* (CCv): CC allows two sessions to see concurrent
//! writes in different orders, and even one session to alternate between them, so a store that
//! resolves conflicts inconsistently can pass [`check`]. Convergence of the final states after
//! healing is checked separately by [`check_convergence`]. Only acknowledged operations belong in
//! a history: a write whose outcome is unknown (timed out) must not be recorded, but a read that
//! later returns its value will then be reported as [`ViolationKind::ThinAirRead`].

use std::collections::hash_map::Entry;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt::{self, Debug, Display};
use std::sync::{Arc, Mutex, PoisonError};

/// Identifies a client session: one sequential thread of operations carrying one causal context.
pub type SessionId = u64;

/// What an operation did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum OpKind {
    /// `put(key, value)`. Every write of a key must write a value no other write of that key writes.
    Write {
        /// The key written.
        key: Vec<u8>,
        /// The value written.
        value: Vec<u8>,
    },
    /// `get(key)` and what it returned.
    Read {
        /// The key read.
        key: Vec<u8>,
        /// The value returned; `None` is the initial (absent) value.
        value: Option<Vec<u8>>,
    },
}

impl OpKind {
    /// The key the operation touched.
    pub fn key(&self) -> &[u8] {
        match self {
            OpKind::Write { key, .. } | OpKind::Read { key, .. } => key,
        }
    }
}

/// One acknowledged client operation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Op {
    /// The session that issued it.
    pub session: SessionId,
    /// What it did.
    pub kind: OpKind,
    /// The site that served it. Not used by the check; it is printed in witnesses.
    pub site: u16,
}

impl Op {
    /// A write of `value` to `key` by `session`, served by `site`.
    pub fn write(
        session: SessionId,
        site: u16,
        key: impl Into<Vec<u8>>,
        value: impl Into<Vec<u8>>,
    ) -> Op {
        let kind = OpKind::Write {
            key: key.into(),
            value: value.into(),
        };
        Op {
            session,
            kind,
            site,
        }
    }

    /// A read of `key` by `session`, served by `site`, that returned `value` (`None`: absent).
    pub fn read(
        session: SessionId,
        site: u16,
        key: impl Into<Vec<u8>>,
        value: Option<Vec<u8>>,
    ) -> Op {
        let kind = OpKind::Read {
            key: key.into(),
            value,
        };
        Op {
            session,
            kind,
            site,
        }
    }
}

/// A recorded history: operations in recording order. The check only relies on each session's
/// operations being recorded in the order the session issued them; how sessions interleave in
/// the recording does not matter.
#[derive(Clone, Debug, Default)]
pub struct History {
    ops: Vec<Op>,
}

impl History {
    /// An empty history.
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends an acknowledged operation.
    pub fn record(&mut self, op: Op) {
        self.ops.push(op);
    }

    /// Number of recorded operations.
    pub fn len(&self) -> usize {
        self.ops.len()
    }

    /// Whether nothing was recorded.
    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }

    /// The operations in recording order.
    pub fn ops(&self) -> &[Op] {
        &self.ops
    }
}

impl FromIterator<Op> for History {
    fn from_iter<I: IntoIterator<Item = Op>>(iter: I) -> Self {
        History {
            ops: iter.into_iter().collect(),
        }
    }
}

impl Extend<Op> for History {
    fn extend<I: IntoIterator<Item = Op>>(&mut self, iter: I) {
        self.ops.extend(iter);
    }
}

/// A shareable, thread-safe [`History`] for async end-to-end tests: clone it into every client
/// task, record after each acknowledged operation, [`snapshot`](Recorder::snapshot) at the end.
///
/// A std `Mutex` (not tokio's) because the lock is held only for a `Vec::push`, never across an
/// `.await`.
#[derive(Clone, Debug, Default)]
pub struct Recorder {
    history: Arc<Mutex<History>>,
}

impl Recorder {
    /// An empty recorder.
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends an acknowledged operation. A session must record its operations in issue order.
    pub fn record(&self, op: Op) {
        self.lock().record(op);
    }

    /// A copy of everything recorded so far.
    pub fn snapshot(&self) -> History {
        self.lock().clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, History> {
        // A client task that panicked must not hide the history from the check.
        self.history.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The kinds of violation [`check`] reports.
///
/// The first five split the WriteCORead bad pattern of Bouajjani et al. (POPL 2017): a read `r`
/// of key `x` returns write `w1` although some write `w2` of `x` has `w1 <co w2 <co r`. Each such
/// read is counted once, as the first of these kinds whose condition holds (`r'`, `r''` range
/// over reads of `x`; `wr(r')` is the write `r'` returned):
///
/// 1. [`ReadYourWrites`](Self::ReadYourWrites): `∃ w2. w1 <co w2 ∧ w2 <so r`.
/// 2. [`MonotonicReads`](Self::MonotonicReads): `∃ r'. r' <so r ∧ w1 <co wr(r')`.
/// 3. [`MonotonicWrites`](Self::MonotonicWrites): `∃ w2. w1 <so w2 ∧ w2 <co r`.
/// 4. [`WritesFollowReads`](Self::WritesFollowReads):
///    `∃ w2, r''. r'' <so w2 ∧ w1 ≼co wr(r'') ∧ w2 <co r`.
/// 5. [`CausalVisibility`](Self::CausalVisibility): none of the above.
///
/// Each of 1–4 implies the WriteCORead condition (its `w2`, or `wr(r')` for 2, is a causal
/// successor of `w1` in `r`'s past).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ViolationKind {
    /// WriteCORead where `w2` is the reading session's own earlier write: the session wrote a
    /// newer version of `x` (newer than `w1`, causally) and then read `w1`.
    ReadYourWrites = 0,
    /// WriteCORead where an earlier read of `x` in the same session already returned a write
    /// causally after `w1`: the session's view of `x` went backwards.
    MonotonicReads = 1,
    /// WriteCORead where `w1` and `w2` were written by one session, `w1` first, and `w2` is in
    /// `r`'s causal past: the later write of a session was visible, the earlier one won.
    MonotonicWrites = 2,
    /// WriteCORead where `w2`'s session read `w1` (or a causal successor of `w1` on `x`) before
    /// writing `w2`, and `w2` is in `r`'s causal past.
    WritesFollowReads = 3,
    /// Any other WriteCORead: `r` returns `w1` while `w2`, a causal successor of `w1` writing the
    /// same key, is in `r`'s causal past through other keys or sessions.
    CausalVisibility = 4,
    /// WriteCOInitRead (Bouajjani et al.): a read of `x` returns the initial (absent) value
    /// although some write of `x` is in its causal past.
    WriteCoInitRead = 5,
    /// ThinAirRead (Bouajjani et al.): a read of `x` returns a value no write of `x` wrote.
    ThinAirRead = 6,
    /// CyclicCO (Bouajjani et al.): session order and reads-from form a cycle, e.g. a read returns
    /// a write its own session issues later.
    CyclicCausalOrder = 7,
    /// Input error: two writes of one key wrote the same value, so reads-from is ambiguous. Reads
    /// of that value are not checked.
    DuplicateWrite = 8,
}

impl ViolationKind {
    /// Every kind, in report order.
    pub const ALL: [ViolationKind; 9] = [
        ViolationKind::ReadYourWrites,
        ViolationKind::MonotonicReads,
        ViolationKind::MonotonicWrites,
        ViolationKind::WritesFollowReads,
        ViolationKind::CausalVisibility,
        ViolationKind::WriteCoInitRead,
        ViolationKind::ThinAirRead,
        ViolationKind::CyclicCausalOrder,
        ViolationKind::DuplicateWrite,
    ];

    /// The kind's name, as printed.
    pub fn name(self) -> &'static str {
        match self {
            ViolationKind::ReadYourWrites => "ReadYourWrites",
            ViolationKind::MonotonicReads => "MonotonicReads",
            ViolationKind::MonotonicWrites => "MonotonicWrites",
            ViolationKind::WritesFollowReads => "WritesFollowReads",
            ViolationKind::CausalVisibility => "CausalVisibility",
            ViolationKind::WriteCoInitRead => "WriteCoInitRead",
            ViolationKind::ThinAirRead => "ThinAirRead",
            ViolationKind::CyclicCausalOrder => "CyclicCausalOrder",
            ViolationKind::DuplicateWrite => "DuplicateWrite",
        }
    }
}

impl Display for ViolationKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One operation named in a witness.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WitnessOp {
    /// Its part in the pattern: `"r"` the offending read, `"w1"` the write it returned, `"w2"`
    /// the newer write it should have seen, `"r'"` an earlier read of the session (or of `w2`'s
    /// session), `"w'"` the write that read returned, `"w"` a write in a cycle or duplicate.
    pub role: &'static str,
    /// Index in [`History::ops`].
    pub index: usize,
    /// The issuing session.
    pub session: SessionId,
    /// 1-based position in the session.
    pub seq: usize,
    /// The site that served it.
    pub site: u16,
    /// What it did.
    pub kind: OpKind,
}

impl Display for WitnessOp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:>3} op #{} (session {} #{}, site {}): ",
            self.role, self.index, self.session, self.seq, self.site
        )?;
        match &self.kind {
            OpKind::Write { key, value } => {
                write!(f, "write {} = {}", show(key), show(value))
            }
            OpKind::Read {
                key,
                value: Some(v),
            } => write!(f, "read {} -> {}", show(key), show(v)),
            OpKind::Read { key, value: None } => write!(f, "read {} -> <initial>", show(key)),
        }
    }
}

/// Why a violation was reported: the operations involved and a one-line explanation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Witness {
    /// A human-readable explanation.
    pub explanation: String,
    /// The operations involved.
    pub ops: Vec<WitnessOp>,
}

impl Display for Witness {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.explanation)?;
        for op in &self.ops {
            write!(f, "\n    {op}")?;
        }
        Ok(())
    }
}

/// One reported violation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Violation {
    /// Which bad pattern.
    pub kind: ViolationKind,
    /// The evidence.
    pub witness: Witness,
}

impl Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "[{}] {}", self.kind, self.witness)
    }
}

/// How many witnesses of each kind a [`Report`] keeps; all violations are counted.
pub const WITNESSES_PER_KIND: usize = 16;

/// The result of [`check`].
#[derive(Clone, Debug)]
pub struct Report {
    /// Operations placed in causal order and checked: all of them unless the causal order is
    /// cyclic, in which case the ops after the cycle in their sessions are not checked.
    pub ops_checked: usize,
    /// Stored witnesses, at most [`WITNESSES_PER_KIND`] per kind, in detection order.
    pub violations: Vec<Violation>,
    counts: [usize; ViolationKind::ALL.len()],
}

impl Report {
    /// Whether no violation of any kind was found.
    pub fn is_ok(&self) -> bool {
        self.total() == 0
    }

    /// How many violations of `kind` were found (including those without a stored witness).
    pub fn count(&self, kind: ViolationKind) -> usize {
        self.counts[kind as usize]
    }

    /// How many violations were found in all.
    pub fn total(&self) -> usize {
        self.counts.iter().sum()
    }
}

impl Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_ok() {
            return write!(f, "causal check of {} ops: ok", self.ops_checked);
        }
        write!(
            f,
            "causal check of {} ops: {} violation(s)",
            self.ops_checked,
            self.total()
        )?;
        for kind in ViolationKind::ALL {
            if self.count(kind) > 0 {
                write!(f, "\n  {kind}: {}", self.count(kind))?;
            }
        }
        const SHOWN_PER_KIND: usize = 2;
        for kind in ViolationKind::ALL {
            for v in self
                .violations
                .iter()
                .filter(|v| v.kind == kind)
                .take(SHOWN_PER_KIND)
            {
                write!(f, "\n{v}")?;
            }
        }
        Ok(())
    }
}

/// Checks `history` for causal consistency (see the module documentation for the algorithm).
pub fn check(history: &History) -> Report {
    let mut sink = Sink::default();
    let mut graph = Graph::build(history.ops(), &mut sink);
    let ops_checked = graph.place_all(&mut sink);
    graph.check_reads(&mut sink);
    Report {
        ops_checked,
        violations: sink.violations,
        counts: sink.counts,
    }
}

/// The sites' final states differ (see [`check_convergence`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConvergenceError {
    /// How many keys do not have the same value at every site.
    pub differing_keys: usize,
    /// The smallest differing key, `Debug`-formatted.
    pub first_key: String,
    /// Each site's value for `first_key`, `Debug`-formatted; `None` where the key is absent.
    pub values: Vec<(u16, Option<String>)>,
}

impl Display for ConvergenceError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "sites diverge on {} key(s); first {}:",
            self.differing_keys, self.first_key
        )?;
        for (site, value) in &self.values {
            match value {
                Some(v) => write!(f, " site {site} = {v};")?,
                None => write!(f, " site {site} absent;")?,
            }
        }
        Ok(())
    }
}

impl std::error::Error for ConvergenceError {}

/// Checks that every site ended in the same state: each key present at one site is present with
/// an equal value at every other. `states` pairs a site id with its final key/value map.
pub fn check_convergence<K: Ord + Debug, V: PartialEq + Debug>(
    states: &[(u16, BTreeMap<K, V>)],
) -> Result<(), ConvergenceError> {
    let keys: BTreeSet<&K> = states.iter().flat_map(|(_, state)| state.keys()).collect();
    let mut differing_keys = 0;
    let mut first = None;
    for key in keys {
        let values: Vec<Option<&V>> = states.iter().map(|(_, state)| state.get(key)).collect();
        if values.windows(2).any(|pair| pair[0] != pair[1]) {
            differing_keys += 1;
            first.get_or_insert((key, values));
        }
    }
    match first {
        None => Ok(()),
        Some((key, values)) => Err(ConvergenceError {
            differing_keys,
            first_key: format!("{key:?}"),
            values: states
                .iter()
                .zip(values)
                .map(|((site, _), value)| (*site, value.map(|v| format!("{v:?}"))))
                .collect(),
        }),
    }
}

// ---------------------------------------------------------------------------------------------
// Implementation. Op, session and key ids are dense `u32`s (indices), positions are 1-based.

/// Collects violations: counts all, keeps the first [`WITNESSES_PER_KIND`] witnesses per kind.
#[derive(Default)]
struct Sink {
    counts: [usize; ViolationKind::ALL.len()],
    violations: Vec<Violation>,
}

impl Sink {
    /// Counts a violation; builds its witness only if it will be stored.
    fn add(&mut self, kind: ViolationKind, witness: impl FnOnce() -> Witness) {
        let count = &mut self.counts[kind as usize];
        *count += 1;
        if *count <= WITNESSES_PER_KIND {
            let witness = witness();
            self.violations.push(Violation { kind, witness });
        }
    }
}

/// Where a read's value came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Source {
    /// The op is a write.
    NotARead,
    /// The initial (absent) value.
    Initial,
    /// This write (op index).
    Write(u32),
    /// No write of the key wrote the value.
    ThinAir,
    /// Several writes of the key wrote the value.
    Ambiguous,
}

/// The ops of one session that touch one key, in session order.
#[derive(Clone)]
struct Run {
    session: u32,
    /// 1-based positions in the session, ascending.
    seqs: Vec<u32>,
    /// The matching op indices.
    ops: Vec<u32>,
}

/// Prefix maxima over a [`Run`] of reads: row `j` is the entry-wise max of the clocks of the
/// writes returned by reads `0..=j` of the run. `full` uses the writes' clocks (for `w1 ≼co w'`),
/// `strict` the clocks of their strict past (own entry minus one, for `w1 <co w'`).
struct Observed {
    full: Vec<u32>,
    strict: Vec<u32>,
}

struct Graph<'h> {
    ops: &'h [Op],
    /// Dense session index to session id.
    sessions: Vec<SessionId>,
    /// Op indices of each session, in session order.
    session_ops: Vec<Vec<u32>>,
    session_of: Vec<u32>,
    seq_of: Vec<u32>,
    key_of: Vec<u32>,
    source: Vec<Source>,
    /// Per key, its writes grouped by session (ascending session index).
    writes_of_key: Vec<Vec<Run>>,
    /// Per key, its reads grouped by session (ascending session index).
    reads_of_key: Vec<Vec<Run>>,
    /// `n × sessions.len()` clock entries; row `o` is op `o`'s clock once `placed[o]`.
    clocks: Vec<u32>,
    placed: Vec<bool>,
}

impl<'h> Graph<'h> {
    /// Indexes the history and reports duplicate writes and thin-air reads.
    fn build(ops: &'h [Op], sink: &mut Sink) -> Self {
        assert!(
            ops.len() < u32::MAX as usize,
            "history too long for the checker"
        );
        let n = ops.len();
        let mut session_index: HashMap<SessionId, u32> = HashMap::new();
        let mut sessions = Vec::new();
        let mut session_ops: Vec<Vec<u32>> = Vec::new();
        let mut session_of = Vec::with_capacity(n);
        let mut seq_of = Vec::with_capacity(n);
        let mut key_index: HashMap<&[u8], u32> = HashMap::new();
        let mut key_of = Vec::with_capacity(n);
        for (i, op) in ops.iter().enumerate() {
            let s = *session_index.entry(op.session).or_insert_with(|| {
                sessions.push(op.session);
                session_ops.push(Vec::new());
                (sessions.len() - 1) as u32
            });
            let list = &mut session_ops[s as usize];
            list.push(i as u32);
            session_of.push(s);
            seq_of.push(list.len() as u32);
            let next_key = key_index.len() as u32;
            key_of.push(*key_index.entry(op.kind.key()).or_insert(next_key));
        }

        // Reads-from by (key, value): the first writer, and whether another one wrote it too.
        let mut writer_of: HashMap<(u32, &[u8]), (u32, bool)> = HashMap::new();
        for (i, op) in ops.iter().enumerate() {
            let OpKind::Write { value, .. } = &op.kind else {
                continue;
            };
            match writer_of.entry((key_of[i], value.as_slice())) {
                Entry::Vacant(e) => {
                    e.insert((i as u32, false));
                }
                Entry::Occupied(mut e) => {
                    let first = e.get().0 as usize;
                    e.get_mut().1 = true;
                    sink.add(ViolationKind::DuplicateWrite, || Witness {
                        explanation: format!(
                            "two writes of {} wrote the same value {}; reads of it are ambiguous \
                             and not checked",
                            show(op.kind.key()),
                            show(value)
                        ),
                        ops: vec![
                            witness_op(ops, &seq_of, "w", first),
                            witness_op(ops, &seq_of, "w", i),
                        ],
                    });
                }
            }
        }
        let mut source = Vec::with_capacity(n);
        for (i, op) in ops.iter().enumerate() {
            source.push(match &op.kind {
                OpKind::Write { .. } => Source::NotARead,
                OpKind::Read { value: None, .. } => Source::Initial,
                OpKind::Read {
                    key,
                    value: Some(value),
                } => match writer_of.get(&(key_of[i], value.as_slice())) {
                    Some(&(w, false)) => Source::Write(w),
                    Some(&(_, true)) => Source::Ambiguous,
                    None => {
                        sink.add(ViolationKind::ThinAirRead, || Witness {
                            explanation: format!(
                                "read of {} returned {}, which no write of that key wrote",
                                show(key),
                                show(value)
                            ),
                            ops: vec![witness_op(ops, &seq_of, "r", i)],
                        });
                        Source::ThinAir
                    }
                },
            });
        }

        // Session-major iteration appends each session's ops on a key contiguously, so each
        // key's runs come out grouped by session and sorted by position without a sort.
        let mut writes_of_key: Vec<Vec<Run>> = vec![Vec::new(); key_index.len()];
        let mut reads_of_key: Vec<Vec<Run>> = vec![Vec::new(); key_index.len()];
        for (s, list) in session_ops.iter().enumerate() {
            for &o in list {
                let table = match source[o as usize] {
                    Source::NotARead => &mut writes_of_key,
                    _ => &mut reads_of_key,
                };
                let runs = &mut table[key_of[o as usize] as usize];
                if runs.last().is_none_or(|run| run.session != s as u32) {
                    runs.push(Run {
                        session: s as u32,
                        seqs: Vec::new(),
                        ops: Vec::new(),
                    });
                }
                if let Some(run) = runs.last_mut() {
                    run.seqs.push(seq_of[o as usize]);
                    run.ops.push(o);
                }
            }
        }

        Graph {
            ops,
            sessions,
            session_ops,
            session_of,
            seq_of,
            key_of,
            source,
            writes_of_key,
            reads_of_key,
            clocks: Vec::new(),
            placed: vec![false; n],
        }
    }

    fn width(&self) -> usize {
        self.sessions.len()
    }

    /// Op `o`'s vector clock (valid once placed).
    fn clock(&self, o: u32) -> &[u32] {
        let w = self.width();
        &self.clocks[o as usize * w..(o as usize + 1) * w]
    }

    /// Whether `a ≼co b` (both placed).
    fn co_le(&self, a: u32, b: u32) -> bool {
        self.clock(b)[self.session_of[a as usize] as usize] >= self.seq_of[a as usize]
    }

    /// Computes every op's clock in a topological order of `so ∪ wr`; reports each cycle.
    /// Returns how many ops were placed.
    fn place_all(&mut self, sink: &mut Sink) -> usize {
        let n = self.ops.len();
        let sessions = self.width();
        self.clocks = vec![0; n * sessions];
        let mut cursor = vec![0usize; sessions];
        // Sessions parked on a write that is not placed yet, keyed by that write.
        let mut parked: HashMap<u32, Vec<u32>> = HashMap::new();
        let mut ready: Vec<u32> = (0..sessions as u32).rev().collect();
        let mut placed = 0;
        while let Some(s) = ready.pop() {
            let s = s as usize;
            while let Some(&o) = self.session_ops[s].get(cursor[s]) {
                if let Source::Write(w) = self.source[o as usize]
                    && !self.placed[w as usize]
                {
                    parked.entry(w).or_default().push(s as u32);
                    break;
                }
                self.place(o);
                placed += 1;
                cursor[s] += 1;
                if let Some(woken) = parked.remove(&o) {
                    ready.extend(woken);
                }
            }
        }
        if placed < n {
            self.report_cycles(&cursor, sink);
        }
        placed
    }

    fn place(&mut self, o: u32) {
        let w = self.width();
        let (o, s, seq) = (
            o as usize,
            self.session_of[o as usize] as usize,
            self.seq_of[o as usize],
        );
        let row = o * w;
        if seq > 1 {
            let prev = self.session_ops[s][seq as usize - 2] as usize * w;
            self.clocks.copy_within(prev..prev + w, row);
        }
        if let Source::Write(src) = self.source[o] {
            let src = src as usize * w;
            // `src != row`: a read is not a write. Split to borrow both rows.
            let (dst, from) = if src < row {
                let (lo, hi) = self.clocks.split_at_mut(row);
                (&mut hi[..w], &lo[src..src + w])
            } else {
                let (lo, hi) = self.clocks.split_at_mut(src);
                (&mut lo[row..row + w], &hi[..w])
            };
            for (d, &f) in dst.iter_mut().zip(from) {
                *d = (*d).max(f);
            }
        }
        self.clocks[row + s] = seq;
        self.placed[o] = true;
    }

    /// Every session left with ops is parked on a read whose write belongs to another parked
    /// session (ahead of that session's cursor), so "waits on" is a function on parked sessions
    /// and each of its cycles is a cycle of `so ∪ wr`.
    fn report_cycles(&self, cursor: &[usize], sink: &mut Sink) {
        let blocked = |s: usize| self.session_ops[s].get(cursor[s]).copied();
        let waits_on = |s: usize| match blocked(s).map(|r| self.source[r as usize]) {
            Some(Source::Write(w)) => self.session_of[w as usize] as usize,
            _ => unreachable!("a parked session is blocked on a read of an unplaced write"),
        };
        const UNSEEN: u8 = 0;
        const ON_PATH: u8 = 1;
        const DONE: u8 = 2;
        let mut state = vec![UNSEEN; self.width()];
        for start in 0..self.width() {
            if blocked(start).is_none() || state[start] != UNSEEN {
                continue;
            }
            let mut path = Vec::new();
            let mut s = start;
            while state[s] == UNSEEN {
                state[s] = ON_PATH;
                path.push(s);
                s = waits_on(s);
            }
            if state[s] == ON_PATH {
                let cycle_start = path.iter().position(|&p| p == s).unwrap_or(0);
                let cycle = &path[cycle_start..];
                sink.add(ViolationKind::CyclicCausalOrder, || {
                    let mut ops = Vec::new();
                    for &c in cycle {
                        if let Some(r) = blocked(c)
                            && let Source::Write(w) = self.source[r as usize]
                        {
                            ops.push(self.witness_op("r", r));
                            ops.push(self.witness_op("w", w));
                        }
                    }
                    let ids: Vec<String> = cycle
                        .iter()
                        .map(|&c| self.sessions[c].to_string())
                        .collect();
                    Witness {
                        explanation: format!(
                            "session order and reads-from form a cycle through session(s) {}: \
                             each read returns the write listed after it, which its session \
                             issues after the next listed read (cyclically)",
                            ids.join(", ")
                        ),
                        ops,
                    }
                });
            }
            for p in path {
                state[p] = DONE;
            }
        }
    }

    /// Checks every placed read against the WriteCORead and WriteCOInitRead patterns.
    fn check_reads(&self, sink: &mut Sink) {
        let mut observed: HashMap<(u32, u32), Observed> = HashMap::new();
        let mut candidates = Vec::new();
        for r in 0..self.ops.len() as u32 {
            if !self.placed[r as usize] {
                continue;
            }
            match self.source[r as usize] {
                Source::Initial => {
                    self.latest_writes_before(r, &mut candidates);
                    self.report_init_read(r, &candidates, sink);
                }
                Source::Write(w1) => {
                    self.latest_writes_before(r, &mut candidates);
                    candidates.retain(|&w2| w2 != w1 && self.co_le(w1, w2));
                    if !candidates.is_empty() {
                        self.report_stale_read(r, w1, &candidates, &mut observed, sink);
                    }
                }
                _ => {}
            }
        }
    }

    /// Fills `out` with, for each session writing `r`'s key, its last write of the key in `r`'s
    /// causal past (if any).
    fn latest_writes_before(&self, r: u32, out: &mut Vec<u32>) {
        out.clear();
        let clock = self.clock(r);
        for run in &self.writes_of_key[self.key_of[r as usize] as usize] {
            let seen = clock[run.session as usize];
            let i = run.seqs.partition_point(|&q| q <= seen);
            if i > 0 {
                out.push(run.ops[i - 1]);
            }
        }
    }

    fn report_init_read(&self, r: u32, candidates: &[u32], sink: &mut Sink) {
        let Some(&first) = candidates.first() else {
            return;
        };
        let own = self.session_of[r as usize];
        let w2 = candidates
            .iter()
            .copied()
            .find(|&w| self.session_of[w as usize] == own)
            .unwrap_or(first);
        sink.add(ViolationKind::WriteCoInitRead, || {
            let key = show(self.ops[r as usize].kind.key());
            let explanation = if self.session_of[w2 as usize] == own {
                format!("session read {key} as absent after writing it itself")
            } else {
                format!("read of {key} returned the initial value although w2, a write of that key, is in its causal past")
            };
            Witness {
                explanation,
                ops: vec![self.witness_op("w2", w2), self.witness_op("r", r)],
            }
        });
    }

    /// Classifies and reports a read `r` returning `w1` whose `candidates` are the writes `w2`
    /// with `w1 <co w2 <co r` (the latest per session).
    fn report_stale_read(
        &self,
        r: u32,
        w1: u32,
        candidates: &[u32],
        observed: &mut HashMap<(u32, u32), Observed>,
        sink: &mut Sink,
    ) {
        let (ri, w1i) = (r as usize, w1 as usize);
        let own = self.session_of[ri];
        let key = self.key_of[ri];
        let (s1, p1) = (self.session_of[w1i] as usize, self.seq_of[w1i]);
        let key_text = show(self.ops[ri].kind.key());
        let in_session = |t: u32| {
            candidates
                .iter()
                .copied()
                .find(|&w| self.session_of[w as usize] == t)
        };

        // 1. ReadYourWrites: the session's own newer write.
        if let Some(w2) = in_session(own) {
            sink.add(ViolationKind::ReadYourWrites, || Witness {
                explanation: format!(
                    "session read {key_text} = w1 after its own write w2, a causal successor of w1"
                ),
                ops: self.witness_ops(&[("w1", w1), ("w2", w2), ("r", r)]),
            });
            return;
        }
        // 2. MonotonicReads: an earlier read of the key in the session returned a successor of w1.
        if self.observed_before(observed, (own, key), self.seq_of[ri], s1, true) >= p1 {
            sink.add(ViolationKind::MonotonicReads, || {
                let earlier = self
                    .find_read_before(own, key, self.seq_of[ri], |w| w != w1 && self.co_le(w1, w));
                let mut ops = vec![("w1", w1)];
                if let Some((r_earlier, w2)) = earlier {
                    ops.extend([("w2", w2), ("r'", r_earlier)]);
                }
                ops.push(("r", r));
                Witness {
                    explanation: format!(
                        "session read {key_text} = w1 after an earlier read r' of it returned w2, \
                         a causal successor of w1"
                    ),
                    ops: self.witness_ops(&ops),
                }
            });
            return;
        }
        // 3. MonotonicWrites: a later write of the key by w1's own session.
        if let Some(w2) = in_session(s1 as u32) {
            sink.add(ViolationKind::MonotonicWrites, || Witness {
                explanation: format!(
                    "read of {key_text} returned w1 although w2, a later write of it by the same \
                     session, is in the read's causal past"
                ),
                ops: self.witness_ops(&[("w1", w1), ("w2", w2), ("r", r)]),
            });
            return;
        }
        // 4. WritesFollowReads: w2's session had read w1 (or a successor) before writing w2.
        // The latest candidate of a session has the longest prefix, so it is the one to test.
        let follows = candidates.iter().copied().find(|&w2| {
            let t = self.session_of[w2 as usize];
            self.observed_before(observed, (t, key), self.seq_of[w2 as usize], s1, false) >= p1
        });
        if let Some(w2) = follows {
            sink.add(ViolationKind::WritesFollowReads, || {
                let t = self.session_of[w2 as usize];
                let earlier =
                    self.find_read_before(t, key, self.seq_of[w2 as usize], |w| self.co_le(w1, w));
                let mut ops = vec![("w1", w1)];
                if let Some((r_earlier, w_read)) = earlier {
                    if w_read != w1 {
                        ops.push(("w'", w_read));
                    }
                    ops.push(("r'", r_earlier));
                }
                ops.extend([("w2", w2), ("r", r)]);
                Witness {
                    explanation: format!(
                        "read of {key_text} returned w1 although w2 is in its causal past, and \
                         w2's session had read w1 (or a causal successor of it) before writing w2"
                    ),
                    ops: self.witness_ops(&ops),
                }
            });
            return;
        }
        // 5. CausalVisibility: anything else.
        let w2 = candidates[0];
        sink.add(ViolationKind::CausalVisibility, || Witness {
            explanation: format!(
                "read of {key_text} returned w1 while w2, a causal successor of w1 writing the \
                 same key, is in the read's causal past"
            ),
            ops: self.witness_ops(&[("w1", w1), ("w2", w2), ("r", r)]),
        });
    }

    /// Entry `entry` of the prefix-max clock of the writes returned by session `t`'s reads of
    /// `key` at positions `< before` (0 if there are none). The table is built once per
    /// (session, key).
    fn observed_before(
        &self,
        observed: &mut HashMap<(u32, u32), Observed>,
        (t, key): (u32, u32),
        before: u32,
        entry: usize,
        strict: bool,
    ) -> u32 {
        let Some(run) = self.read_run(t, key) else {
            return 0;
        };
        let j = run.seqs.partition_point(|&q| q < before);
        if j == 0 {
            return 0;
        }
        let table = observed
            .entry((t, key))
            .or_insert_with(|| self.build_observed(run));
        let rows = if strict { &table.strict } else { &table.full };
        rows[(j - 1) * self.width() + entry]
    }

    fn build_observed(&self, run: &Run) -> Observed {
        let w = self.width();
        // Only placed reads have placed writes; they form a prefix of the run.
        let k = run
            .ops
            .iter()
            .take_while(|&&o| self.placed[o as usize])
            .count();
        let mut full = vec![0; k * w];
        let mut strict = vec![0; k * w];
        for j in 0..k {
            if j > 0 {
                full.copy_within((j - 1) * w..j * w, j * w);
                strict.copy_within((j - 1) * w..j * w, j * w);
            }
            if let Source::Write(src) = self.source[run.ops[j] as usize] {
                let own = self.session_of[src as usize] as usize;
                for (i, &c) in self.clock(src).iter().enumerate() {
                    let f = &mut full[j * w + i];
                    *f = (*f).max(c);
                    let s = &mut strict[j * w + i];
                    *s = (*s).max(if i == own { c - 1 } else { c });
                }
            }
        }
        Observed { full, strict }
    }

    fn read_run(&self, t: u32, key: u32) -> Option<&Run> {
        let runs = &self.reads_of_key[key as usize];
        runs.binary_search_by_key(&t, |run| run.session)
            .ok()
            .map(|i| &runs[i])
    }

    /// The latest read of `key` by session `t` before position `before` whose write satisfies
    /// `pred`, with that write. Linear; used only to build stored witnesses.
    fn find_read_before(
        &self,
        t: u32,
        key: u32,
        before: u32,
        pred: impl Fn(u32) -> bool,
    ) -> Option<(u32, u32)> {
        let run = self.read_run(t, key)?;
        let j = run.seqs.partition_point(|&q| q < before);
        run.ops[..j]
            .iter()
            .rev()
            .find_map(|&r| match self.source[r as usize] {
                Source::Write(w) if pred(w) => Some((r, w)),
                _ => None,
            })
    }

    fn witness_op(&self, role: &'static str, o: u32) -> WitnessOp {
        witness_op(self.ops, &self.seq_of, role, o as usize)
    }

    fn witness_ops(&self, roles: &[(&'static str, u32)]) -> Vec<WitnessOp> {
        roles
            .iter()
            .map(|&(role, o)| self.witness_op(role, o))
            .collect()
    }
}

fn witness_op(ops: &[Op], seq_of: &[u32], role: &'static str, i: usize) -> WitnessOp {
    let op = &ops[i];
    WitnessOp {
        role,
        index: i,
        session: op.session,
        seq: seq_of[i] as usize,
        site: op.site,
        kind: op.kind.clone(),
    }
}

/// Bytes as a quoted, escaped, length-capped string for witnesses.
fn show(bytes: &[u8]) -> String {
    const MAX: usize = 40;
    let shown = &bytes[..bytes.len().min(MAX)];
    let more = if bytes.len() > MAX { "..." } else { "" };
    format!("\"{}{more}\"", shown.escape_ascii())
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    fn w(session: SessionId, key: &str, value: &str) -> Op {
        Op::write(session, session as u16 % 3, key, value)
    }

    fn r(session: SessionId, key: &str, value: &str) -> Op {
        Op::read(session, session as u16 % 3, key, Some(value.into()))
    }

    fn r0(session: SessionId, key: &str) -> Op {
        Op::read(session, session as u16 % 3, key, None)
    }

    /// Asserts that `ops` yields exactly one violation, of `kind`, and returns the report.
    fn only(kind: ViolationKind, ops: Vec<Op>) -> Report {
        let report = check(&ops.into_iter().collect());
        assert_eq!(report.total(), 1, "{report}");
        assert_eq!(report.count(kind), 1, "{report}");
        assert_eq!(report.violations[0].kind, kind);
        // Display must name the kind and print the witness.
        let text = report.to_string();
        assert!(text.contains(kind.name()), "{text}");
        assert!(text.contains("op #"), "{text}");
        report
    }

    #[test]
    fn read_your_writes() {
        // Session 1 writes x twice, then reads its first write back.
        only(
            ViolationKind::ReadYourWrites,
            vec![w(1, "x", "a"), w(1, "x", "b"), r(1, "x", "a")],
        );
    }

    #[test]
    fn read_your_writes_after_reading_other_session() {
        // Session 1 reads 2's write, overwrites it, then reads 2's write again.
        let report = only(
            ViolationKind::ReadYourWrites,
            vec![
                w(2, "x", "b1"),
                r(1, "x", "b1"),
                w(1, "x", "a1"),
                r(1, "x", "b1"),
            ],
        );
        let roles: Vec<_> = report.violations[0]
            .witness
            .ops
            .iter()
            .map(|op| (op.role, op.index))
            .collect();
        assert_eq!(roles, [("w1", 0), ("w2", 2), ("r", 3)]);
    }

    #[test]
    fn monotonic_reads() {
        let report = only(
            ViolationKind::MonotonicReads,
            vec![
                w(2, "x", "1"),
                w(2, "x", "2"),
                r(1, "x", "2"),
                r(1, "x", "1"),
            ],
        );
        let roles: Vec<_> = report.violations[0]
            .witness
            .ops
            .iter()
            .map(|op| (op.role, op.index))
            .collect();
        assert_eq!(roles, [("w1", 0), ("w2", 1), ("r'", 2), ("r", 3)]);
    }

    #[test]
    fn monotonic_reads_through_another_session() {
        // The newer write is by a third session that had read the older one.
        only(
            ViolationKind::MonotonicReads,
            vec![
                w(2, "x", "1"),
                r(3, "x", "1"),
                w(3, "x", "2"),
                r(1, "x", "2"),
                r(1, "x", "1"),
            ],
        );
    }

    #[test]
    fn rereading_the_same_write_is_fine() {
        let report = check(&History::from_iter([
            w(2, "x", "1"),
            r(1, "x", "1"),
            r(1, "x", "1"),
        ]));
        assert!(report.is_ok(), "{report}");
    }

    #[test]
    fn monotonic_writes() {
        // Session 1 sees session 2's second write of x through y, then reads 2's first write.
        only(
            ViolationKind::MonotonicWrites,
            vec![
                w(2, "x", "1"),
                w(2, "x", "2"),
                w(2, "y", "1"),
                r(1, "y", "1"),
                r(1, "x", "1"),
            ],
        );
    }

    #[test]
    fn writes_follow_reads() {
        // Session 3 reads x=1 and overwrites it; session 1 sees that through y, then reads x=1.
        let report = only(
            ViolationKind::WritesFollowReads,
            vec![
                w(2, "x", "1"),
                r(3, "x", "1"),
                w(3, "x", "2"),
                w(3, "y", "1"),
                r(1, "y", "1"),
                r(1, "x", "1"),
            ],
        );
        let roles: Vec<_> = report.violations[0]
            .witness
            .ops
            .iter()
            .map(|op| (op.role, op.index))
            .collect();
        assert_eq!(roles, [("w1", 0), ("r'", 1), ("w2", 2), ("r", 5)]);
    }

    #[test]
    fn causal_visibility() {
        // Session 3 overwrites x after seeing x=1 only through z; session 1 sees that through y.
        only(
            ViolationKind::CausalVisibility,
            vec![
                w(2, "x", "1"),
                w(2, "z", "1"),
                r(3, "z", "1"),
                w(3, "x", "2"),
                w(3, "y", "1"),
                r(1, "y", "1"),
                r(1, "x", "1"),
            ],
        );
    }

    #[test]
    fn thin_air_read() {
        only(
            ViolationKind::ThinAirRead,
            vec![w(1, "x", "1"), r(2, "x", "42")],
        );
        // Reads-from is by key and value: a value written only to another key is thin air too.
        only(
            ViolationKind::ThinAirRead,
            vec![w(1, "x", "1"), r(2, "y", "1")],
        );
    }

    #[test]
    fn cyclic_causal_order() {
        // Each session reads the other's write before that write is issued.
        let report = only(
            ViolationKind::CyclicCausalOrder,
            vec![
                r(1, "x", "b"),
                w(1, "y", "a"),
                r(2, "y", "a"),
                w(2, "x", "b"),
                // A session outside the cycle is still checked.
                w(3, "z", "1"),
                w(3, "z", "2"),
                r(3, "z", "2"),
            ],
        );
        assert_eq!(report.ops_checked, 3);
        assert_eq!(report.violations[0].witness.ops.len(), 4);
    }

    #[test]
    fn reading_own_future_write_is_cyclic() {
        only(
            ViolationKind::CyclicCausalOrder,
            vec![r(1, "x", "a"), w(1, "x", "a")],
        );
    }

    #[test]
    fn sessions_stuck_behind_a_cycle_report_it_once() {
        // Session 3 waits on the cycle between 1 and 2 but is not part of it.
        only(
            ViolationKind::CyclicCausalOrder,
            vec![
                r(1, "x", "b"),
                w(1, "y", "a"),
                r(2, "y", "a"),
                w(2, "x", "b"),
                r(3, "y", "a"),
            ],
        );
    }

    #[test]
    fn duplicate_write() {
        only(
            ViolationKind::DuplicateWrite,
            vec![w(1, "x", "1"), w(2, "x", "1"), r(3, "x", "1")],
        );
        // The same value under different keys is unambiguous.
        let report = check(&History::from_iter([w(1, "x", "1"), w(2, "y", "1")]));
        assert!(report.is_ok(), "{report}");
    }

    #[test]
    fn write_co_init_read() {
        only(
            ViolationKind::WriteCoInitRead,
            vec![w(1, "x", "1"), r0(1, "x")],
        );
        // Through another session and key.
        only(
            ViolationKind::WriteCoInitRead,
            vec![w(2, "x", "1"), w(2, "y", "1"), r(1, "y", "1"), r0(1, "x")],
        );
    }

    #[test]
    fn concurrent_writes_allow_either_outcome() {
        // x=1 and x=2 are concurrent: any session may return either, in any order (CC, unlike
        // CCv, even lets one session alternate; convergence is checked on final states).
        let report = check(&History::from_iter([
            w(1, "x", "1"),
            w(2, "x", "2"),
            r(3, "x", "1"),
            r(3, "x", "1"),
            r(4, "x", "2"),
            r(4, "x", "2"),
            r0(5, "x"),
            r(5, "x", "2"),
            r(5, "x", "1"),
            r(1, "x", "2"),
            r(2, "x", "2"),
        ]));
        assert!(report.is_ok(), "{report}");
        assert_eq!(report.ops_checked, 11);
        assert_eq!(report.to_string(), "causal check of 11 ops: ok");
    }

    #[test]
    fn causally_ordered_chain_is_fine() {
        let report = check(&History::from_iter([
            w(1, "x", "1"),
            r(2, "x", "1"),
            w(2, "x", "2"),
            w(2, "y", "1"),
            r(3, "y", "1"),
            r(3, "x", "2"),
            r0(3, "z"),
            r(1, "x", "1"), // session 1 has not seen x=2: stale but causal
        ]));
        assert!(report.is_ok(), "{report}");
    }

    #[test]
    fn empty_history_is_fine() {
        let report = check(&History::new());
        assert!(report.is_ok());
        assert_eq!(report.ops_checked, 0);
    }

    #[test]
    fn witnesses_are_capped_but_all_counted() {
        let mut history = History::new();
        history.record(w(1, "x", "a"));
        history.record(w(1, "x", "b"));
        for _ in 0..100 {
            history.record(r(1, "x", "a"));
        }
        let report = check(&history);
        assert_eq!(report.count(ViolationKind::ReadYourWrites), 100);
        assert_eq!(report.violations.len(), WITNESSES_PER_KIND);
        assert!(!report.is_ok());
    }

    /// A causally consistent store model: writes are appended to one global log (which extends
    /// causal order and doubles as the LWW arbitration); each session sees a prefix of the log
    /// that only grows and includes its own writes, and a read returns the last write of the key
    /// in that prefix. With `stale`, a session's prefix advances by a random amount before each
    /// operation (so reads can be stale); without it, the model is sequentially consistent.
    fn model_history(seed: u64, ops: usize, sessions: u64, keys: usize, stale: bool) -> History {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut log_len = 0usize;
        let mut writes_of_key: Vec<Vec<(usize, String)>> = vec![Vec::new(); keys];
        let mut seen = vec![0usize; sessions as usize];
        let mut history = History::new();
        for i in 0..ops {
            let s = rng.gen_range(0..sessions);
            let key = rng.gen_range(0..keys);
            let view = &mut seen[s as usize];
            *view = if stale {
                rng.gen_range(*view..=log_len)
            } else {
                log_len
            };
            let site = rng.gen_range(0..3);
            let key_name = format!("k{key}");
            if rng.gen_bool(0.4) {
                let value = format!("v{i}");
                writes_of_key[key].push((log_len, value.clone()));
                log_len += 1;
                *view = log_len;
                history.record(Op::write(s, site, key_name, value));
            } else {
                let visible = &writes_of_key[key];
                let n = visible.partition_point(|(at, _)| *at < *view);
                let value = n.checked_sub(1).map(|j| visible[j].1.clone().into_bytes());
                history.record(Op::read(s, site, key_name, value));
            }
        }
        history
    }

    #[test]
    fn random_valid_histories_pass() {
        for seed in 0..20 {
            for stale in [false, true] {
                let history = model_history(seed, 2_000, 8, 10, stale);
                let report = check(&history);
                assert!(report.is_ok(), "seed {seed} stale {stale}: {report}");
                assert_eq!(report.ops_checked, history.len());
            }
        }
    }

    #[test]
    fn random_history_with_injected_stale_read_fails() {
        // Session 99 writes a key twice and reads the first value back at the end.
        for seed in 0..5 {
            let mut history = model_history(seed, 2_000, 8, 10, true);
            history.record(w(99, "k1", "first"));
            history.record(w(99, "k1", "second"));
            history.record(r(99, "k1", "first"));
            let report = check(&history);
            assert_eq!(report.total(), 1, "{report}");
            assert_eq!(report.count(ViolationKind::ReadYourWrites), 1, "{report}");
        }
    }

    /// 100k ops, 30 sessions, 200 keys. Prints the time; the release figure is the one that
    /// matters (`cargo test --release --lib checker -- --nocapture large_history`).
    #[test]
    fn large_history_is_fast() {
        let history = model_history(7, 100_000, 30, 200, true);
        let start = std::time::Instant::now();
        let report = check(&history);
        let elapsed = start.elapsed();
        println!(
            "checked {} ops (30 sessions, 200 keys) in {elapsed:?}",
            history.len()
        );
        assert!(report.is_ok(), "{report}");
    }

    #[test]
    fn recorder_collects_from_threads() {
        let recorder = Recorder::new();
        let handles: Vec<_> = (0..4u64)
            .map(|s| {
                let recorder = recorder.clone();
                std::thread::spawn(move || {
                    for i in 0..100 {
                        let value = format!("{s}-{i}");
                        recorder.record(w(s, "x", &value));
                        recorder.record(r(s, "x", &value));
                    }
                })
            })
            .collect();
        for handle in handles {
            handle.join().expect("recording thread panicked");
        }
        let history = recorder.snapshot();
        assert_eq!(history.len(), 800);
        let report = check(&history);
        assert!(report.is_ok(), "{report}");
    }

    #[test]
    fn convergence() {
        let a: BTreeMap<&str, u32> = [("a", 1), ("b", 2)].into();
        assert_eq!(check_convergence(&[(0, a.clone()), (1, a.clone())]), Ok(()));
        assert_eq!(check_convergence::<&str, u32>(&[]), Ok(()));

        let b: BTreeMap<&str, u32> = [("a", 1), ("b", 3), ("c", 4)].into();
        let err = check_convergence(&[(0, a.clone()), (1, a), (2, b)]).unwrap_err();
        assert_eq!(err.differing_keys, 2);
        assert_eq!(err.first_key, "\"b\"");
        assert_eq!(
            err.values,
            [
                (0, Some("2".to_string())),
                (1, Some("2".to_string())),
                (2, Some("3".to_string()))
            ]
        );
        assert!(err.to_string().contains("site 2 = 3"), "{err}");
    }
}
