//! Linearizability checker for strong (linearizable) key-value operations over recorded histories.
//!
//! The strong operations (`put_strong`, `get_strong`, `delete_strong`, `cas`) promise
//! linearizability: every operation appears to take effect atomically at one instant between
//! its invocation and its response, and those instants agree with real time. Tests record every
//! strong operation a client issues into a [`History`] (from concurrent tasks, through a
//! [`Recorder`]) and call [`check`], which decides whether such instants exist.
//!
//! # Model
//!
//! Each key is an independent register holding a value or nothing (absent, the initial state).
//! An [`Operation`] carries the issuing client, a [`Command`], its invocation time and its
//! [`Outcome`]. Times are `u64` ticks from one monotonic source (the [`Recorder`] uses a logical
//! clock under its lock, so ticks are distinct and respect real time exactly); an operation `a`
//! precedes `b` in real time iff `a` returned before `b` was invoked. At equal ticks the
//! invocation is taken to come first, so ties make operations concurrent, never ordered: the
//! checker never invents an order the recording does not prove.
//!
//! - `Put { key, value }` sets the register and answers [`Response::Ack`].
//! - `Delete { key }` clears it and answers [`Response::Ack`].
//! - `Get { key }` answers [`Response::Value`] with the register's content.
//! - `Cas { key, expected, new }` sets the register to `new` (`None` deletes) iff it holds
//!   `expected` (`None`: absent) and answers [`Response::CasOk`]; otherwise it leaves the register
//!   alone and answers [`Response::CasFailed`] with the value it found.
//!
//! Values need not be unique: the checker replays the register model rather than inferring
//! reads-from from values, so repeated values are handled exactly.
//!
//! # Unknown and failed outcomes
//!
//! An operation whose response never came (a timeout, a crashed client or server, a dropped
//! [`Pending`] handle) has [`Outcome::Unknown`]: it has no response time, so it is concurrent with
//! everything invoked after it, and it may or may not have taken effect. The search may therefore
//! linearize it at any point after its invocation, or not at all. A read with an unknown outcome
//! constrains nothing and is dropped. A compare-and-set with an unknown outcome is only ever
//! placed where it succeeds: placing it where it fails changes nothing, which is the same as
//! leaving it out. A write with an unknown outcome whose value no operation could observe is
//! dropped before the search, which is exact (see `drop_unobservable`) and keeps histories with
//! many timeouts from multiplying the search space. An operation that *definitely* did not take
//! effect ([`Outcome::Failed`], e.g. a typed "unavailable" error returned before anything was
//! proposed) is left out of the check.
//!
//! # Algorithm
//!
//! Linearizability is compositional (Herlihy & Wing 1990): a history is linearizable iff each
//! key's sub-history is. [`check`] therefore splits the history per key and checks each
//! sub-history on its own, which keeps the exponential part of the search confined to the
//! operations that are concurrent on one key.
//!
//! Each sub-history is checked with the Wing & Gong search (1993) as refined by Lowe (2017) and
//! implemented by Porcupine's `checkSingle` (Knossos checks the same property with a similar
//! search over configurations):
//!
//! 1. Every operation becomes a *call* entry at its invocation time and, if it returned, a
//!    *return* entry at its response time. The entries are sorted by time (calls first on ties)
//!    into a doubly linked list.
//! 2. Walking the list from its head, a call entry is an operation that may be linearized next:
//!    if the register model accepts it in the current state, it is appended to the
//!    linearization, its two entries are unlinked (dancing links, so undoing is `O(1)`), and the
//!    walk restarts at the head. Reaching a return entry means an operation had to take effect by
//!    then and could not: the search backtracks by popping the last linearized operation,
//!    relinking its entries and trying the entry after its call.
//! 3. Memoisation: the pair (set of linearized operations as a bitset, register state) fully
//!    determines what can still happen, so a pair seen before is never explored twice.
//! 4. The sub-history is linearizable once every operation with a known outcome is linearized;
//!    operations with unknown outcomes never produce a return entry, so they never force a
//!    backtrack and may remain unlinearized. It is not linearizable when backtracking empties the
//!    stack.
//!
//! A violation reports the longest linearizable prefix the search found, the register value it
//! leaves, the operation that had to take effect next, and why each candidate that could have
//! come next failed there.
//!
//! # Complexity
//!
//! Deciding linearizability is NP-complete in general (Gibbons & Korach 1997), and the search is
//! exponential in the worst case. With memoisation, the configurations it can visit for one key
//! are bounded by the downward-closed sets of operations times the distinct values: for `n`
//! operations of which at most `c` are pairwise concurrent, and `u` kept with unknown outcomes
//! (which stay concurrent until placed), about `n · 2^(c + u) · |values|`, each costing `O(c + u)`
//! to scan plus `O(n / 64)` to hash the bitset. A history produced by a correct store is usually
//! checked greedily in near-linear time; it is a violation that makes the search exhaust the
//! alternatives before the point where it occurs. [`Options::step_budget`] bounds the work per
//! key, so a pathological history yields [`Verdict::Undecided`] for that key instead of hanging
//! (the default budget is a few seconds of search). Keeping the number of clients per hot key
//! moderate keeps `c` small. A 10 000-operation history over 10 keys with 8 concurrent clients
//! checks in about 5 ms in a release build (see the `ten_thousand_ops_check_quickly` test).

use std::collections::BTreeMap;
use std::fmt::{self, Display};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

/// Identifies a client: one sequential issuer of operations. Used only in explanations; the check
/// relies on times alone.
pub type ClientId = u64;

/// A point in time: ticks of one monotonic clock shared by all clients of a history.
pub type Time = u64;

/// What an operation asked for.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Command {
    /// Set `key` to `value`.
    Put {
        /// The key written.
        key: Vec<u8>,
        /// The value written.
        value: Vec<u8>,
    },
    /// Read `key`.
    Get {
        /// The key read.
        key: Vec<u8>,
    },
    /// Remove `key`.
    Delete {
        /// The key removed.
        key: Vec<u8>,
    },
    /// Set `key` to `new` iff it holds `expected`.
    Cas {
        /// The key compared and set.
        key: Vec<u8>,
        /// The value the register must hold; `None`: it must be absent.
        expected: Option<Vec<u8>>,
        /// The value to set; `None` deletes the key.
        new: Option<Vec<u8>>,
    },
}

impl Command {
    /// `put(key, value)`.
    pub fn put(key: impl Into<Vec<u8>>, value: impl Into<Vec<u8>>) -> Command {
        Command::Put {
            key: key.into(),
            value: value.into(),
        }
    }

    /// `get(key)`.
    pub fn get(key: impl Into<Vec<u8>>) -> Command {
        Command::Get { key: key.into() }
    }

    /// `delete(key)`.
    pub fn delete(key: impl Into<Vec<u8>>) -> Command {
        Command::Delete { key: key.into() }
    }

    /// `cas(key, expected, new)`.
    pub fn cas(
        key: impl Into<Vec<u8>>,
        expected: Option<Vec<u8>>,
        new: Option<Vec<u8>>,
    ) -> Command {
        Command::Cas {
            key: key.into(),
            expected,
            new,
        }
    }

    /// The key the command touches.
    pub fn key(&self) -> &[u8] {
        match self {
            Command::Put { key, .. }
            | Command::Get { key }
            | Command::Delete { key }
            | Command::Cas { key, .. } => key,
        }
    }

    /// Whether `response` is a possible answer to this command (e.g. a `Get` answers with
    /// [`Response::Value`]). A mismatch is a bug in the recording, not in the store.
    pub fn accepts(&self, response: &Response) -> bool {
        matches!(
            (self, response),
            (Command::Put { .. } | Command::Delete { .. }, Response::Ack)
                | (Command::Get { .. }, Response::Value(_))
                | (
                    Command::Cas { .. },
                    Response::CasOk | Response::CasFailed { .. }
                )
        )
    }
}

impl Display for Command {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Command::Put { key, value } => write!(f, "put {} = {}", show(key), show(value)),
            Command::Get { key } => write!(f, "get {}", show(key)),
            Command::Delete { key } => write!(f, "delete {}", show(key)),
            Command::Cas { key, expected, new } => write!(
                f,
                "cas {} {} -> {}",
                show(key),
                show_opt(expected.as_deref()),
                show_opt(new.as_deref())
            ),
        }
    }
}

/// What the store answered.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Response {
    /// A `Put` or `Delete` was applied.
    Ack,
    /// A `Get` returned this value (`None`: absent).
    Value(Option<Vec<u8>>),
    /// A `Cas` found the expected value and set the new one.
    CasOk,
    /// A `Cas` found `current` instead of the expected value and changed nothing.
    CasFailed {
        /// What the register held (`None`: absent).
        current: Option<Vec<u8>>,
    },
}

impl Display for Response {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Response::Ack => f.write_str("ok"),
            Response::Value(v) => f.write_str(&show_opt(v.as_deref())),
            Response::CasOk => f.write_str("ok"),
            Response::CasFailed { current } => {
                write!(f, "failed (current {})", show_opt(current.as_deref()))
            }
        }
    }
}

/// How an operation ended.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Outcome {
    /// The store answered `response` at time `at`.
    Returned {
        /// When the response arrived.
        at: Time,
        /// What it said.
        response: Response,
    },
    /// The operation definitely did not take effect (an error that guarantees nothing was
    /// applied). Such operations are left out of the check.
    Failed {
        /// When the error arrived.
        at: Time,
    },
    /// No response: the operation may or may not have taken effect, at any time after its
    /// invocation (see the module documentation).
    Unknown,
}

/// One client operation.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Operation {
    /// The issuing client.
    pub client: ClientId,
    /// What it asked for.
    pub command: Command,
    /// When it was invoked (before the request left the client).
    pub invoked: Time,
    /// How it ended.
    pub outcome: Outcome,
}

impl Operation {
    /// An operation invoked at `invoked` that returned `response` at `at`.
    pub fn returned(
        client: ClientId,
        command: Command,
        invoked: Time,
        at: Time,
        response: Response,
    ) -> Operation {
        Operation {
            client,
            command,
            invoked,
            outcome: Outcome::Returned { at, response },
        }
    }

    /// An operation invoked at `invoked` whose outcome is unknown.
    pub fn unknown(client: ClientId, command: Command, invoked: Time) -> Operation {
        Operation {
            client,
            command,
            invoked,
            outcome: Outcome::Unknown,
        }
    }

    /// An operation invoked at `invoked` that definitely failed at `at`.
    pub fn failed(client: ClientId, command: Command, invoked: Time, at: Time) -> Operation {
        Operation {
            client,
            command,
            invoked,
            outcome: Outcome::Failed { at },
        }
    }

    /// The key the operation touches.
    pub fn key(&self) -> &[u8] {
        self.command.key()
    }
}

impl Display for Operation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.outcome {
            Outcome::Returned { at, response } => write!(
                f,
                "client {} [{}, {}] {} -> {}",
                self.client, self.invoked, at, self.command, response
            ),
            Outcome::Failed { at } => write!(
                f,
                "client {} [{}, {}] {} -> failed",
                self.client, self.invoked, at, self.command
            ),
            Outcome::Unknown => write!(
                f,
                "client {} [{}, ?] {} -> unknown",
                self.client, self.invoked, self.command
            ),
        }
    }
}

/// A recorded history: operations in any order (their times, not their positions, order them).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct History {
    ops: Vec<Operation>,
}

impl History {
    /// An empty history.
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends an operation.
    pub fn record(&mut self, op: Operation) {
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

    /// The operations in recording order; violations refer to them by index.
    pub fn ops(&self) -> &[Operation] {
        &self.ops
    }
}

impl FromIterator<Operation> for History {
    fn from_iter<I: IntoIterator<Item = Operation>>(iter: I) -> Self {
        History {
            ops: iter.into_iter().collect(),
        }
    }
}

impl Extend<Operation> for History {
    fn extend<I: IntoIterator<Item = Operation>>(&mut self, iter: I) {
        self.ops.extend(iter);
    }
}

/// A shareable, thread-safe history for concurrent test clients: clone it into every client
/// task, call [`invoke`](Recorder::invoke) just before sending a request and close the returned
/// [`Pending`] when the answer arrives, then [`snapshot`](Recorder::snapshot) at the end.
///
/// Times are a logical clock advanced under the recorder's lock: if one call returns before
/// another starts, the second gets the larger tick, so the ticks order operations exactly as
/// real time does, with no ties and no clock granularity to worry about. A std `Mutex` (not
/// tokio's) because the lock is held only for a tick and a `Vec` push, never across an `.await`.
#[derive(Clone, Debug, Default)]
pub struct Recorder {
    inner: Arc<Mutex<RecorderState>>,
}

#[derive(Debug, Default)]
struct RecorderState {
    clock: Time,
    history: History,
}

impl RecorderState {
    fn tick(&mut self) -> Time {
        self.clock += 1;
        self.clock
    }
}

impl Recorder {
    /// An empty recorder.
    pub fn new() -> Self {
        Self::default()
    }

    /// Records the invocation of `command` by `client` now. The operation counts as having an
    /// unknown outcome until the returned handle is closed, so a client that panics or is
    /// cancelled mid-request leaves a correct record behind.
    pub fn invoke(&self, client: ClientId, command: Command) -> Pending {
        let mut state = self.lock();
        let invoked = state.tick();
        let index = state.history.len();
        state
            .history
            .record(Operation::unknown(client, command, invoked));
        Pending {
            recorder: self.clone(),
            index,
        }
    }

    /// A copy of everything recorded so far (operations still pending appear as unknown).
    pub fn snapshot(&self) -> History {
        self.lock().history.clone()
    }

    fn close(&self, index: usize, outcome: impl FnOnce(Time) -> Outcome) {
        let mut state = self.lock();
        let at = state.tick();
        let op = &mut state.history.ops[index];
        op.outcome = outcome(at);
        if let Outcome::Returned { response, .. } = &op.outcome {
            assert!(
                op.command.accepts(response),
                "lincheck: response {response:?} does not answer {:?}",
                op.command
            );
        }
    }

    fn lock(&self) -> MutexGuard<'_, RecorderState> {
        // A client task that panicked must not hide the history from the check.
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// An invoked operation awaiting its outcome. Close it with [`complete`](Pending::complete),
/// [`fail`](Pending::fail) or [`unknown`](Pending::unknown); dropping it is the same as
/// `unknown`.
#[derive(Debug)]
#[must_use = "close the operation with complete, fail or unknown"]
pub struct Pending {
    recorder: Recorder,
    index: usize,
}

impl Pending {
    /// The store answered `response`; the response time is now.
    ///
    /// # Panics
    ///
    /// If `response` cannot answer the command (see [`Command::accepts`]).
    pub fn complete(self, response: Response) {
        self.recorder
            .close(self.index, |at| Outcome::Returned { at, response });
    }

    /// The operation definitely did not take effect; it is left out of the check.
    pub fn fail(self) {
        self.recorder.close(self.index, |at| Outcome::Failed { at });
    }

    /// The outcome will never be known (timeout, lost connection): the operation may take effect
    /// at any time after its invocation, or never.
    pub fn unknown(self) {}

    /// The operation's index in the recorded [`History::ops`].
    pub fn index(&self) -> usize {
        self.index
    }
}

/// How much work [`check_with`] may do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Options {
    /// Search steps allowed per key (one step tries one entry or undoes one operation); a key
    /// that needs more is reported as undecided. `None`: unbounded.
    pub step_budget: Option<u64>,
}

/// The per-key step budget of [`check`]: a few seconds of search at most.
pub const DEFAULT_STEP_BUDGET: u64 = 20_000_000;

impl Default for Options {
    fn default() -> Self {
        Options {
            step_budget: Some(DEFAULT_STEP_BUDGET),
        }
    }
}

/// A key whose sub-history is not linearizable.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Violation {
    /// The key.
    pub key: Vec<u8>,
    /// How many of its operations took part in the search.
    pub ops: usize,
    /// The longest linearizable prefix the search found, as indices into [`History::ops`] in
    /// linearization order.
    pub prefix: Vec<usize>,
    /// The register's value after that prefix (`None`: absent).
    pub value_after_prefix: Option<Vec<u8>>,
    /// The operation that had to take effect next (it returned before any other remaining
    /// operation did) but could not, as an index into [`History::ops`].
    pub blocked: usize,
    /// The operations that could have come after the prefix (invoked before `blocked`
    /// returned), none of which leads to a complete linearization, as indices into
    /// [`History::ops`].
    pub candidates: Vec<usize>,
    /// A human-readable account of the above.
    pub explanation: String,
}

impl Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.explanation)
    }
}

/// A key whose search ran out of its step budget.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Undecided {
    /// The key.
    pub key: Vec<u8>,
    /// How many of its operations took part in the search.
    pub ops: usize,
    /// The steps spent before giving up.
    pub steps: u64,
}

impl Display for Undecided {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "key {}: undecided after {} steps over {} operations",
            show(&self.key),
            self.steps,
            self.ops
        )
    }
}

/// The overall answer of a [`Report`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Every key's sub-history is linearizable.
    Ok,
    /// At least one key's sub-history is not linearizable.
    Violation,
    /// No violation was found, but at least one key ran out of its step budget.
    Undecided,
}

/// The result of [`check`].
#[derive(Clone, Debug)]
pub struct Report {
    /// Operations that took part in the search: all but definitely failed ones, reads with
    /// unknown outcomes, and writes with unknown outcomes whose value nothing observes.
    pub ops_checked: usize,
    /// Distinct keys checked.
    pub keys_checked: usize,
    /// Search steps over all keys.
    pub steps: u64,
    /// One entry per non-linearizable key, in key order.
    pub violations: Vec<Violation>,
    /// One entry per key whose search ran out of budget, in key order.
    pub undecided: Vec<Undecided>,
}

impl Report {
    /// The overall answer: a violation anywhere makes the history non-linearizable, whatever the
    /// undecided keys would have said.
    pub fn verdict(&self) -> Verdict {
        if !self.violations.is_empty() {
            Verdict::Violation
        } else if !self.undecided.is_empty() {
            Verdict::Undecided
        } else {
            Verdict::Ok
        }
    }

    /// Whether the history is linearizable (and every key was decided).
    pub fn is_ok(&self) -> bool {
        self.verdict() == Verdict::Ok
    }
}

impl Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "linearizability check of {} ops over {} keys ({} steps): ",
            self.ops_checked, self.keys_checked, self.steps
        )?;
        match self.verdict() {
            Verdict::Ok => return f.write_str("ok"),
            Verdict::Violation => write!(
                f,
                "{} key(s) not linearizable, {} undecided",
                self.violations.len(),
                self.undecided.len()
            )?,
            Verdict::Undecided => write!(f, "{} key(s) undecided", self.undecided.len())?,
        }
        for v in &self.violations {
            write!(f, "\n{v}")?;
        }
        for u in &self.undecided {
            write!(f, "\n{u}")?;
        }
        Ok(())
    }
}

/// Checks `history` for linearizability with the default [`Options`].
///
/// # Panics
///
/// If an operation's response cannot answer its command, or it returned before it was invoked:
/// both are recording bugs.
pub fn check(history: &History) -> Report {
    check_with(history, &Options::default())
}

/// Checks `history` for linearizability, key by key (see the module documentation).
///
/// # Panics
///
/// As [`check`].
pub fn check_with(history: &History, options: &Options) -> Report {
    let mut per_key: BTreeMap<&[u8], Vec<usize>> = BTreeMap::new();
    for (index, op) in history.ops().iter().enumerate() {
        if let Outcome::Returned { at, response } = &op.outcome {
            assert!(
                op.command.accepts(response),
                "lincheck: op #{index}: response {response:?} does not answer {:?}",
                op.command
            );
            assert!(
                *at >= op.invoked,
                "lincheck: op #{index} returned at {at}, before its invocation at {}",
                op.invoked
            );
        }
        per_key.entry(op.key()).or_default().push(index);
    }
    let mut report = Report {
        ops_checked: 0,
        keys_checked: per_key.len(),
        steps: 0,
        violations: Vec::new(),
        undecided: Vec::new(),
    };
    for (key, indices) in per_key {
        let sub = SubHistory::build(history, &indices);
        report.ops_checked += sub.ops.len();
        match search(&sub.ops, options.step_budget) {
            Search::Linearizable { steps } => report.steps += steps,
            Search::NotLinearizable { steps, prefix } => {
                report.steps += steps;
                report.violations.push(sub.explain(history, key, &prefix));
            }
            Search::OutOfBudget { steps } => {
                report.steps += steps;
                report.undecided.push(Undecided {
                    key: key.to_vec(),
                    ops: sub.ops.len(),
                    steps,
                });
            }
        }
    }
    report
}

/// A value id: `ABSENT` or an index into [`SubHistory::values`] plus one. Interning keeps the
/// model state a `u32`, cheap to compare, hash and store in the memo.
type ValueId = u32;
const ABSENT: ValueId = 0;

/// What an operation does to the register, with values interned.
#[derive(Clone, Copy, Debug)]
enum Effect {
    /// Put, delete (`ABSENT`), or either with an unknown outcome.
    Write(ValueId),
    /// A get that returned the value.
    Read(ValueId),
    /// A compare-and-set that succeeded.
    CasOk { expected: ValueId, new: ValueId },
    /// A compare-and-set that failed, having found `current`.
    CasFailed { expected: ValueId, current: ValueId },
    /// A compare-and-set with an unknown outcome: only placed where it succeeds.
    CasUnknown { expected: ValueId, new: ValueId },
}

impl Effect {
    /// The register model: the state after applying the operation to `state`, or `None` if the
    /// operation's recorded response is impossible in `state`.
    fn step(self, state: ValueId) -> Option<ValueId> {
        match self {
            Effect::Write(v) => Some(v),
            Effect::Read(v) => (state == v).then_some(state),
            Effect::CasOk { expected, new } | Effect::CasUnknown { expected, new } => {
                (state == expected).then_some(new)
            }
            Effect::CasFailed { expected, current } => {
                (state == current && state != expected).then_some(state)
            }
        }
    }
}

/// One operation of a key's sub-history, as the search sees it.
#[derive(Clone, Copy, Debug)]
struct SearchOp {
    /// Index into [`History::ops`].
    index: usize,
    effect: Effect,
    invoked: Time,
    /// `None` for an unknown outcome.
    returned: Option<Time>,
}

/// One key's operations, ready for the search.
struct SubHistory<'h> {
    ops: Vec<SearchOp>,
    /// Interned values: id `i + 1` is `values[i]`.
    values: Vec<&'h [u8]>,
}

impl<'h> SubHistory<'h> {
    fn build(history: &'h History, indices: &[usize]) -> SubHistory<'h> {
        let mut ids: ahash::AHashMap<&'h [u8], ValueId> = ahash::AHashMap::new();
        let mut values: Vec<&'h [u8]> = Vec::new();
        let mut intern = |v: Option<&'h [u8]>| -> ValueId {
            let Some(v) = v else { return ABSENT };
            *ids.entry(v).or_insert_with(|| {
                values.push(v);
                values.len() as ValueId
            })
        };
        let mut ops = Vec::with_capacity(indices.len());
        for &index in indices {
            let op = &history.ops()[index];
            let (returned, response) = match &op.outcome {
                Outcome::Failed { .. } => continue,
                Outcome::Unknown => (None, None),
                Outcome::Returned { at, response } => (Some(*at), Some(response)),
            };
            let effect = match (&op.command, response) {
                (Command::Put { value, .. }, _) => Effect::Write(intern(Some(value))),
                (Command::Delete { .. }, _) => Effect::Write(ABSENT),
                // A read whose answer never came constrains nothing.
                (Command::Get { .. }, None) => continue,
                (Command::Get { .. }, Some(Response::Value(v))) => {
                    Effect::Read(intern(v.as_deref()))
                }
                (Command::Cas { expected, new, .. }, response) => {
                    let expected = intern(expected.as_deref());
                    let new = intern(new.as_deref());
                    match response {
                        None => Effect::CasUnknown { expected, new },
                        Some(Response::CasOk) => Effect::CasOk { expected, new },
                        Some(Response::CasFailed { current }) => Effect::CasFailed {
                            expected,
                            current: intern(current.as_deref()),
                        },
                        Some(_) => unreachable!("responses are validated in check_with"),
                    }
                }
                (Command::Get { .. }, Some(_)) => {
                    unreachable!("responses are validated in check_with")
                }
            };
            ops.push(SearchOp {
                index,
                effect,
                invoked: op.invoked,
                returned,
            });
        }
        drop_unobservable(&mut ops, values.len());
        SubHistory { ops, values }
    }

    fn value(&self, id: ValueId) -> Option<&'h [u8]> {
        (id != ABSENT).then(|| self.values[id as usize - 1])
    }

    fn show_value(&self, id: ValueId) -> String {
        show_opt(self.value(id))
    }

    /// Why `op` cannot come next in register state `state`.
    fn reason(&self, op: &SearchOp, state: ValueId) -> String {
        let held = self.show_value(state);
        if op.effect.step(state).is_some() {
            return "fits here, but every continuation after it is a dead end".to_string();
        }
        match op.effect {
            Effect::Read(v) => format!(
                "returned {} but the register held {held}",
                self.show_value(v)
            ),
            Effect::CasOk { expected, .. } => format!(
                "reported success but the register held {held}, not the expected {}",
                self.show_value(expected)
            ),
            Effect::CasFailed { expected, current } if expected == current => format!(
                "reported failure although the current value it reported, {}, is the expected one",
                self.show_value(current)
            ),
            Effect::CasFailed { current, .. } => format!(
                "reported failure with current {} but the register held {held}",
                self.show_value(current)
            ),
            Effect::CasUnknown { expected, .. } => format!(
                "(outcome unknown) expected {} but the register held {held}, so here it could \
                 only have had no effect, which is the same as leaving it out",
                self.show_value(expected)
            ),
            Effect::Write(_) => unreachable!("a write fits every state"),
        }
    }

    /// Builds the violation report from the longest linearizable prefix found (positions in
    /// `self.ops`, in linearization order).
    fn explain(&self, history: &History, key: &[u8], prefix: &[u32]) -> Violation {
        use std::fmt::Write as _;
        let mut state = ABSENT;
        let mut placed = vec![false; self.ops.len()];
        for &i in prefix {
            state = self.ops[i as usize]
                .effect
                .step(state)
                .expect("the prefix was linearized by the search");
            placed[i as usize] = true;
        }
        // The search failed, so some operation with a known outcome is not in the prefix; the
        // first of them to return is the one that could not be placed in time.
        let blocked = (0..self.ops.len())
            .filter(|&i| !placed[i])
            .filter_map(|i| self.ops[i].returned.map(|at| (at, i)))
            .min()
            .map(|(_, i)| i)
            .expect("a non-linearizable sub-history has an operation left to place");
        let deadline = self.ops[blocked]
            .returned
            .expect("chosen among returned ops");
        // Calls sort before returns at equal times, so these are exactly the call entries the
        // search saw before `blocked`'s return entry.
        let candidates: Vec<usize> = (0..self.ops.len())
            .filter(|&i| !placed[i] && self.ops[i].invoked <= deadline)
            .collect();

        let op_line = |i: usize| {
            let index = self.ops[i].index;
            format!("#{index} {}", history.ops()[index])
        };
        let mut text = format!(
            "key {}: not linearizable ({} operations). The longest linearizable prefix found \
             places {} of them and leaves the register at {}.",
            show(key),
            self.ops.len(),
            prefix.len(),
            self.show_value(state)
        );
        const SHOWN: usize = 5;
        if !prefix.is_empty() {
            let skip = prefix.len().saturating_sub(SHOWN);
            let _ = write!(text, "\n  prefix (last {}):", prefix.len() - skip);
            for &i in &prefix[skip..] {
                let _ = write!(text, "\n    {}", op_line(i as usize));
            }
        }
        let _ = write!(
            text,
            "\n  next, {} had to take effect by {deadline}, but none of the {} operation(s) \
             that could come next can be placed:",
            op_line(blocked),
            candidates.len()
        );
        const SHOWN_CANDIDATES: usize = 10;
        for &i in candidates.iter().take(SHOWN_CANDIDATES) {
            let _ = write!(
                text,
                "\n    {}: {}",
                op_line(i),
                self.reason(&self.ops[i], state)
            );
        }
        if candidates.len() > SHOWN_CANDIDATES {
            let _ = write!(
                text,
                "\n    ... and {} more",
                candidates.len() - SHOWN_CANDIDATES
            );
        }
        Violation {
            key: key.to_vec(),
            ops: self.ops.len(),
            prefix: prefix.iter().map(|&i| self.ops[i as usize].index).collect(),
            value_after_prefix: self.value(state).map(<[u8]>::to_vec),
            blocked: self.ops[blocked].index,
            candidates: candidates.iter().map(|&i| self.ops[i].index).collect(),
            explanation: text,
        }
    }
}

/// Removes the writes with unknown outcomes whose effect no operation could ever observe.
///
/// An unknown write never forces a backtrack, so it stays concurrent with everything after its
/// invocation, and each one left unplaced doubles the configurations the search may have to
/// visit. Most of them are harmless: say an unknown write sets value `x`, and no operation with
/// a known outcome requires the register to hold `x` (a get returning `x`, a successful cas
/// expecting `x`, a failed cas reporting `x`), nor does any kept unknown cas expect `x`. Then in
/// any linearization that places it, the operations between it and the next put or delete can
/// only be other such writes (anything else would need a value from this irrelevant set), so
/// removing them all leaves every other operation's state unchanged. Dropping them is exact,
/// not a heuristic. The relevant values are a fixed point: an unknown cas that sets a relevant
/// value makes its expected value relevant (a chain of unknown writes may lead to it).
fn drop_unobservable(ops: &mut Vec<SearchOp>, values: usize) {
    let mut relevant = vec![false; values + 1];
    for op in ops.iter().filter(|op| op.returned.is_some()) {
        match op.effect {
            Effect::Read(v) | Effect::CasOk { expected: v, .. } => relevant[v as usize] = true,
            Effect::CasFailed { current, .. } => relevant[current as usize] = true,
            Effect::Write(_) | Effect::CasUnknown { .. } => {}
        }
    }
    loop {
        let mut changed = false;
        for op in ops.iter() {
            if let Effect::CasUnknown { expected, new } = op.effect
                && relevant[new as usize]
                && !relevant[expected as usize]
            {
                relevant[expected as usize] = true;
                changed = true;
            }
        }
        if !changed {
            break;
        }
    }
    ops.retain(|op| match op.effect {
        _ if op.returned.is_some() => true,
        Effect::Write(v) | Effect::CasUnknown { new: v, .. } => relevant[v as usize],
        // Unknown reads were never added; known ones are kept above.
        Effect::Read(_) | Effect::CasOk { .. } | Effect::CasFailed { .. } => true,
    });
}

/// What the search concluded for one key.
#[derive(Debug, PartialEq, Eq)]
enum Search {
    Linearizable {
        steps: u64,
    },
    NotLinearizable {
        steps: u64,
        /// The longest linearizable prefix found: positions in the sub-history, in order.
        prefix: Vec<u32>,
    },
    OutOfBudget {
        steps: u64,
    },
}

const NIL: u32 = u32::MAX;
const HEAD: u32 = 0;

/// An entry of the time-ordered list: an operation's call or return.
#[derive(Clone, Copy, Debug)]
struct Node {
    op: u32,
    call: bool,
    prev: u32,
    next: u32,
}

/// The call/return entries as a doubly linked list over a `Vec`, node 0 being the head
/// sentinel. Unlinking leaves a node's own links intact, so relinking in the reverse order
/// restores the list exactly (the search undoes lifts in stack order).
struct Entries {
    nodes: Vec<Node>,
    call_node: Vec<u32>,
    /// `NIL` for operations with unknown outcomes.
    return_node: Vec<u32>,
}

impl Entries {
    fn build(ops: &[SearchOp]) -> Entries {
        // (time, 0 = call / 1 = return, op): calls before returns at equal times keeps ties
        // concurrent; the op position makes the order deterministic.
        let mut events: Vec<(Time, u8, u32)> = Vec::with_capacity(2 * ops.len());
        for (i, op) in ops.iter().enumerate() {
            events.push((op.invoked, 0, i as u32));
            if let Some(at) = op.returned {
                events.push((at, 1, i as u32));
            }
        }
        events.sort_unstable();
        let mut nodes = Vec::with_capacity(events.len() + 1);
        nodes.push(Node {
            op: NIL,
            call: false,
            prev: NIL,
            next: if events.is_empty() { NIL } else { 1 },
        });
        let mut call_node = vec![NIL; ops.len()];
        let mut return_node = vec![NIL; ops.len()];
        let last = events.len() as u32;
        for (k, &(_, kind, op)) in events.iter().enumerate() {
            let id = k as u32 + 1;
            if kind == 0 {
                call_node[op as usize] = id;
            } else {
                return_node[op as usize] = id;
            }
            nodes.push(Node {
                op,
                call: kind == 0,
                prev: id - 1,
                next: if id == last { NIL } else { id + 1 },
            });
        }
        Entries {
            nodes,
            call_node,
            return_node,
        }
    }

    fn unlink(&mut self, n: u32) {
        let Node { prev, next, .. } = self.nodes[n as usize];
        self.nodes[prev as usize].next = next;
        if next != NIL {
            self.nodes[next as usize].prev = prev;
        }
    }

    fn relink(&mut self, n: u32) {
        let Node { prev, next, .. } = self.nodes[n as usize];
        self.nodes[prev as usize].next = n;
        if next != NIL {
            self.nodes[next as usize].prev = n;
        }
    }

    fn lift(&mut self, op: u32) {
        self.unlink(self.call_node[op as usize]);
        let ret = self.return_node[op as usize];
        if ret != NIL {
            self.unlink(ret);
        }
    }

    fn unlift(&mut self, op: u32) {
        let ret = self.return_node[op as usize];
        if ret != NIL {
            self.relink(ret);
        }
        self.relink(self.call_node[op as usize]);
    }
}

/// The memo: every (linearized set, state) configuration already explored. Keyed by the bitset
/// so a lookup borrows the working bitset; the states per set are few (usually one).
#[derive(Default)]
struct Memo {
    seen: ahash::AHashMap<Box<[u64]>, Vec<ValueId>>,
}

impl Memo {
    /// Records the configuration; `false` if it was already there.
    fn insert(&mut self, bits: &[u64], state: ValueId) -> bool {
        if let Some(states) = self.seen.get_mut(bits) {
            if states.contains(&state) {
                return false;
            }
            states.push(state);
        } else {
            self.seen.insert(bits.into(), vec![state]);
        }
        true
    }
}

/// The Wing–Gong search with memoisation over one key's operations (see the module
/// documentation).
fn search(ops: &[SearchOp], budget: Option<u64>) -> Search {
    let mut to_place = ops.iter().filter(|op| op.returned.is_some()).count();
    if to_place == 0 {
        return Search::Linearizable { steps: 0 };
    }
    let mut entries = Entries::build(ops);
    let mut memo = Memo::default();
    let mut bits = vec![0u64; ops.len().div_ceil(64)];
    // Linearized operations, each with the state before it.
    let mut stack: Vec<(u32, ValueId)> = Vec::new();
    let mut state = ABSENT;
    // The longest prefix: its length is tracked on every push, but the prefix itself is copied
    // only when the search first backs out of it, so a history that linearizes greedily pays
    // nothing for the explanation it does not need.
    let mut best: Vec<u32> = Vec::new();
    let mut best_len = 0usize;
    let mut best_saved = true;
    let budget = budget.unwrap_or(u64::MAX);
    let mut steps = 0u64;
    let mut cursor = entries.nodes[HEAD as usize].next;
    loop {
        if steps >= budget {
            return Search::OutOfBudget { steps };
        }
        steps += 1;
        // Every remaining operation with a known outcome has a return entry still in the list,
        // and `to_place > 0`, so the walk meets a return entry before the end of the list.
        debug_assert_ne!(cursor, NIL);
        let node = entries.nodes[cursor as usize];
        if node.call {
            let op = node.op;
            if let Some(next_state) = ops[op as usize].effect.step(state) {
                let (word, bit) = (op as usize / 64, 1u64 << (op % 64));
                bits[word] |= bit;
                if memo.insert(&bits, next_state) {
                    stack.push((op, state));
                    state = next_state;
                    entries.lift(op);
                    if ops[op as usize].returned.is_some() {
                        to_place -= 1;
                        if to_place == 0 {
                            return Search::Linearizable { steps };
                        }
                    }
                    if stack.len() > best_len {
                        best_len = stack.len();
                        best_saved = false;
                    }
                    cursor = entries.nodes[HEAD as usize].next;
                    continue;
                }
                bits[word] &= !bit;
            }
            cursor = node.next;
        } else {
            // An operation had to take effect by now and could not: undo the last choice.
            if !best_saved {
                debug_assert_eq!(stack.len(), best_len);
                best = stack.iter().map(|&(op, _)| op).collect();
                best_saved = true;
            }
            let Some((op, before)) = stack.pop() else {
                return Search::NotLinearizable {
                    steps,
                    prefix: best,
                };
            };
            state = before;
            bits[op as usize / 64] &= !(1u64 << (op % 64));
            entries.unlift(op);
            if ops[op as usize].returned.is_some() {
                to_place += 1;
            }
            cursor = entries.nodes[entries.call_node[op as usize] as usize].next;
        }
    }
}

fn show(bytes: &[u8]) -> String {
    const MAX: usize = 40;
    let shown = &bytes[..bytes.len().min(MAX)];
    let more = if bytes.len() > MAX { "..." } else { "" };
    format!("\"{}{more}\"", shown.escape_ascii())
}

fn show_opt(value: Option<&[u8]>) -> String {
    value.map_or_else(|| "<absent>".to_string(), show)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;
    use std::collections::HashMap;

    fn some(v: &str) -> Option<Vec<u8>> {
        Some(v.as_bytes().to_vec())
    }

    fn put(client: ClientId, key: &str, value: &str, inv: Time, ret: Time) -> Operation {
        Operation::returned(client, Command::put(key, value), inv, ret, Response::Ack)
    }

    fn get(client: ClientId, key: &str, value: Option<&str>, inv: Time, ret: Time) -> Operation {
        let response = Response::Value(value.and_then(some));
        Operation::returned(client, Command::get(key), inv, ret, response)
    }

    fn del(client: ClientId, key: &str, inv: Time, ret: Time) -> Operation {
        Operation::returned(client, Command::delete(key), inv, ret, Response::Ack)
    }

    fn cas(
        client: ClientId,
        key: &str,
        expected: Option<&str>,
        new: Option<&str>,
        inv: Time,
        ret: Time,
        response: Response,
    ) -> Operation {
        let command = Command::cas(key, expected.and_then(some), new.and_then(some));
        Operation::returned(client, command, inv, ret, response)
    }

    fn cas_failed(current: Option<&str>) -> Response {
        Response::CasFailed {
            current: current.and_then(some),
        }
    }

    fn verdict(ops: impl IntoIterator<Item = Operation>) -> Report {
        check(&History::from_iter(ops))
    }

    fn assert_ok(report: &Report) {
        assert_eq!(report.verdict(), Verdict::Ok, "{report}");
    }

    fn assert_violation(report: &Report) {
        assert_eq!(report.verdict(), Verdict::Violation, "{report}");
    }

    #[test]
    fn empty_history_is_ok() {
        let report = check(&History::new());
        assert_ok(&report);
        assert_eq!((report.ops_checked, report.keys_checked), (0, 0));
    }

    #[test]
    fn sequential_history_is_ok() {
        let report = verdict([
            get(1, "x", None, 1, 2),
            put(1, "x", "1", 3, 4),
            get(2, "x", Some("1"), 5, 6),
            put(2, "x", "2", 7, 8),
            get(1, "x", Some("2"), 9, 10),
        ]);
        assert_ok(&report);
        assert_eq!((report.ops_checked, report.keys_checked), (5, 1));
        assert!(report.to_string().ends_with(": ok"), "{report}");
    }

    #[test]
    fn stale_read_after_completed_write_is_a_violation() {
        let history = History::from_iter([
            put(1, "x", "1", 1, 2),
            put(1, "x", "2", 3, 4),
            get(2, "x", Some("1"), 5, 6),
        ]);
        let report = check(&history);
        assert_violation(&report);
        let v = &report.violations[0];
        assert_eq!(v.key, b"x");
        assert_eq!(v.prefix, [0, 1]);
        assert_eq!(v.value_after_prefix, some("2"));
        assert_eq!(v.blocked, 2);
        assert_eq!(v.candidates, [2]);
        assert!(
            v.explanation
                .contains("returned \"1\" but the register held \"2\""),
            "{v}"
        );
    }

    #[test]
    fn concurrent_write_and_read_may_see_either_value() {
        for seen in [None, Some("1")] {
            // The read overlaps the write: before or after it are both fine.
            assert_ok(&verdict([put(1, "x", "1", 1, 10), get(2, "x", seen, 2, 5)]));
        }
        // Once one read saw the new value, a later read must not see the old one.
        assert_violation(&verdict([
            put(1, "x", "1", 1, 10),
            get(2, "x", Some("1"), 2, 4),
            get(3, "x", None, 5, 6),
        ]));
        // But two overlapping reads may disagree in either order.
        assert_ok(&verdict([
            put(1, "x", "1", 1, 10),
            get(2, "x", Some("1"), 2, 6),
            get(3, "x", None, 3, 7),
        ]));
    }

    #[test]
    fn equal_times_count_as_concurrent() {
        // The put returns at 5 and the read is invoked at 5: no proof of order either way.
        assert_ok(&verdict([put(1, "x", "1", 1, 5), get(2, "x", None, 5, 6)]));
        assert_violation(&verdict([put(1, "x", "1", 1, 5), get(2, "x", None, 6, 7)]));
    }

    #[test]
    fn cas_semantics() {
        // Success on an absent key, then failure reporting the current value.
        assert_ok(&verdict([
            cas(1, "x", None, Some("1"), 1, 2, Response::CasOk),
            cas(2, "x", None, Some("2"), 3, 4, cas_failed(Some("1"))),
            cas(2, "x", Some("1"), Some("2"), 5, 6, Response::CasOk),
            get(1, "x", Some("2"), 7, 8),
            cas(1, "x", Some("2"), None, 9, 10, Response::CasOk),
            get(2, "x", None, 11, 12),
        ]));
        // Success although the register held something else.
        assert_violation(&verdict([
            put(1, "x", "1", 1, 2),
            cas(2, "x", Some("0"), Some("2"), 3, 4, Response::CasOk),
        ]));
        // Failure although the register held the expected value.
        assert_violation(&verdict([
            put(1, "x", "1", 1, 2),
            cas(2, "x", Some("1"), Some("2"), 3, 4, cas_failed(Some("0"))),
        ]));
        // Failure reporting the expected value as current can never happen.
        let report = verdict([cas(
            2,
            "x",
            Some("1"),
            Some("2"),
            3,
            4,
            cas_failed(Some("1")),
        )]);
        assert_violation(&report);
        assert!(
            report.violations[0]
                .explanation
                .contains("is the expected one"),
            "{report}"
        );
        // Failure reporting the wrong current value.
        assert_violation(&verdict([
            put(1, "x", "1", 1, 2),
            cas(2, "x", Some("0"), Some("2"), 3, 4, cas_failed(Some("3"))),
        ]));
        // A successful cas's effect is visible to later reads.
        assert_violation(&verdict([
            cas(1, "x", None, Some("1"), 1, 2, Response::CasOk),
            get(2, "x", None, 3, 4),
        ]));
        // Two concurrent cas from the same value: exactly one may win.
        assert_ok(&verdict([
            put(1, "x", "0", 1, 2),
            cas(2, "x", Some("0"), Some("a"), 3, 10, Response::CasOk),
            cas(3, "x", Some("0"), Some("b"), 4, 9, cas_failed(Some("a"))),
        ]));
        assert_violation(&verdict([
            put(1, "x", "0", 1, 2),
            cas(2, "x", Some("0"), Some("a"), 3, 10, Response::CasOk),
            cas(3, "x", Some("0"), Some("b"), 4, 9, Response::CasOk),
            get(1, "x", Some("a"), 11, 12),
        ]));
    }

    #[test]
    fn delete_then_get_returns_none() {
        assert_ok(&verdict([
            put(1, "x", "1", 1, 2),
            del(1, "x", 3, 4),
            get(2, "x", None, 5, 6),
        ]));
        assert_violation(&verdict([
            put(1, "x", "1", 1, 2),
            del(1, "x", 3, 4),
            get(2, "x", Some("1"), 5, 6),
        ]));
    }

    #[test]
    fn unknown_put_may_take_effect_or_not() {
        let unknown = Operation::unknown(1, Command::put("x", "u"), 3);
        // Observed later, long after the client gave up: it took effect late.
        assert_ok(&verdict([
            put(1, "x", "1", 1, 2),
            unknown.clone(),
            get(2, "x", Some("1"), 4, 5),
            get(2, "x", Some("u"), 20, 21),
        ]));
        // Never observed: it did not take effect (or was overwritten before anyone looked). Its
        // value is required by no operation, so it is dropped before the search.
        let report = verdict([
            put(1, "x", "1", 1, 2),
            unknown.clone(),
            get(2, "x", Some("1"), 4, 5),
            get(2, "x", Some("1"), 20, 21),
        ]);
        assert_ok(&report);
        assert_eq!(report.ops_checked, 3);
        // A chain of unknown writes that leads to an observed value is kept whole.
        let report = verdict([
            Operation::unknown(1, Command::put("x", "u"), 1),
            Operation::unknown(2, Command::cas("x", some("u"), some("w")), 2),
            Operation::unknown(3, Command::cas("x", some("q"), some("z")), 2),
            get(4, "x", Some("w"), 10, 11),
        ]);
        assert_ok(&report);
        assert_eq!(report.ops_checked, 3);
        // But it cannot be observed before it was invoked...
        assert_violation(&verdict([
            get(2, "x", Some("u"), 1, 2),
            Operation::unknown(1, Command::put("x", "u"), 3),
        ]));
        // ...nor take effect twice: once seen and then replaced, it cannot come back.
        assert_violation(&verdict([
            put(1, "x", "1", 1, 2),
            unknown,
            get(2, "x", Some("u"), 4, 5),
            get(2, "x", Some("1"), 6, 7),
        ]));
    }

    #[test]
    fn unknown_cas_and_unknown_read() {
        // An unknown cas that took effect explains the value; one that could not have succeeded
        // (the register held another value throughout) is simply left out.
        assert_ok(&verdict([
            put(1, "x", "1", 1, 2),
            Operation::unknown(2, Command::cas("x", some("1"), some("2")), 3),
            get(1, "x", Some("2"), 10, 11),
        ]));
        assert_violation(&verdict([
            put(1, "x", "0", 1, 2),
            Operation::unknown(2, Command::cas("x", some("1"), some("2")), 3),
            get(1, "x", Some("2"), 10, 11),
        ]));
        // A read with an unknown outcome is dropped and checks nothing.
        let report = verdict([
            put(1, "x", "1", 1, 2),
            Operation::unknown(2, Command::get("x"), 3),
        ]);
        assert_ok(&report);
        assert_eq!(report.ops_checked, 1);
    }

    #[test]
    fn failed_operations_did_not_happen() {
        let failed = Operation::failed(1, Command::put("x", "f"), 1, 2);
        assert_ok(&verdict([failed.clone(), get(2, "x", None, 3, 4)]));
        assert_violation(&verdict([failed, get(2, "x", Some("f"), 3, 4)]));
    }

    #[test]
    fn read_of_a_value_never_written_is_a_violation() {
        let report = verdict([put(1, "x", "1", 1, 10), get(2, "x", Some("ghost"), 2, 5)]);
        assert_violation(&report);
        let v = &report.violations[0];
        assert!(v.prefix.is_empty() || v.prefix == [0], "{v}");
        assert_eq!(v.blocked, 1);
    }

    #[test]
    fn repeated_values_are_handled() {
        // The same value written twice: the last read is explained by the second write only.
        assert_ok(&verdict([
            put(1, "x", "a", 1, 2),
            put(1, "x", "b", 3, 4),
            put(2, "x", "a", 5, 6),
            get(3, "x", Some("a"), 7, 8),
        ]));
        assert_violation(&verdict([
            put(1, "x", "a", 1, 2),
            put(2, "x", "a", 3, 4),
            put(1, "x", "b", 5, 6),
            get(3, "x", Some("a"), 7, 8),
        ]));
    }

    #[test]
    fn keys_are_checked_separately() {
        let report = verdict([
            put(1, "a", "1", 1, 2),
            put(1, "b", "1", 3, 4),
            get(2, "a", Some("1"), 5, 6),
            get(2, "b", None, 7, 8),
            // Real-time order across keys does not matter: "c" is read as absent after "a"
            // was read, which is fine.
            get(3, "c", None, 9, 10),
        ]);
        assert_violation(&report);
        assert_eq!(report.keys_checked, 3);
        assert_eq!(report.violations.len(), 1);
        assert_eq!(report.violations[0].key, b"b");
        assert!(
            report.to_string().contains("key \"b\": not linearizable"),
            "{report}"
        );
    }

    #[test]
    fn step_budget_yields_undecided() {
        // Many concurrent writes and a read that no order explains: the search must try every
        // subset of writes before giving up.
        let mut ops: Vec<Operation> = (0..12)
            .map(|i| put(i, "x", &format!("{i}"), 1, 100))
            .collect();
        ops.push(get(99, "x", Some("never"), 101, 102));
        let history = History::from_iter(ops);
        let tight = check_with(
            &history,
            &Options {
                step_budget: Some(50),
            },
        );
        assert_eq!(tight.verdict(), Verdict::Undecided, "{tight}");
        assert_eq!(tight.undecided[0].steps, 50);
        assert_eq!(check(&history).verdict(), Verdict::Violation);
    }

    #[test]
    #[should_panic(expected = "does not answer")]
    fn mismatched_response_is_a_recording_bug() {
        verdict([Operation::returned(
            1,
            Command::get("x"),
            1,
            2,
            Response::CasOk,
        )]);
    }

    #[test]
    fn recorder_collects_from_threads() {
        // Four threads share a register behind a mutex (linearizable by construction) and record
        // through one recorder; one operation is left pending and one fails.
        let recorder = Recorder::new();
        let register: Arc<Mutex<Option<Vec<u8>>>> = Arc::default();
        let threads: Vec<_> = (0..4u64)
            .map(|client| {
                let (recorder, register) = (recorder.clone(), Arc::clone(&register));
                std::thread::spawn(move || {
                    for i in 0..200 {
                        let value = format!("{client}-{i}").into_bytes();
                        let pending = recorder.invoke(client, Command::put("x", value.clone()));
                        *register.lock().unwrap() = Some(value);
                        pending.complete(Response::Ack);
                        let pending = recorder.invoke(client, Command::get("x"));
                        let seen = register.lock().unwrap().clone();
                        pending.complete(Response::Value(seen));
                    }
                })
            })
            .collect();
        for thread in threads {
            thread.join().expect("client thread panicked");
        }
        let pending = recorder.invoke(7, Command::put("x", "lost"));
        assert_eq!(pending.index(), 1600);
        drop(pending);
        recorder.invoke(8, Command::put("x", "refused")).fail();
        let history = recorder.snapshot();
        assert_eq!(history.len(), 1602);
        assert_eq!(history.ops()[1600].outcome, Outcome::Unknown);
        assert!(matches!(
            history.ops()[1601].outcome,
            Outcome::Failed { .. }
        ));
        let report = check(&history);
        assert_ok(&report);
        // The failed put is left out, and so is the pending one: nothing observed its value.
        assert_eq!(report.ops_checked, 1600);

        // The same recorder catches a read that ignores the latest write.
        let pending = recorder.invoke(9, Command::get("x"));
        pending.complete(Response::Value(some("0-0")));
        assert_violation(&check(&recorder.snapshot()));
    }

    /// The definition, executed literally: try every order of the operations that respects real
    /// time (`a` before `b` whenever `a` returned before `b` was invoked), with each unknown
    /// outcome either placed or left out, replaying the register. Exponential; for tiny
    /// histories only.
    fn brute_force(ops: &[Operation]) -> bool {
        fn returned(op: &Operation) -> Option<Time> {
            match op.outcome {
                Outcome::Returned { at, .. } => Some(at),
                _ => None,
            }
        }
        fn model(op: &Operation, state: &Option<Vec<u8>>) -> Option<Option<Vec<u8>>> {
            let response = match &op.outcome {
                Outcome::Returned { response, .. } => Some(response),
                _ => None,
            };
            match (&op.command, response) {
                (Command::Put { value, .. }, _) => Some(Some(value.clone())),
                (Command::Delete { .. }, _) => Some(None),
                (Command::Get { .. }, None) => Some(state.clone()),
                (Command::Get { .. }, Some(Response::Value(v))) => (v == state).then(|| v.clone()),
                (Command::Cas { expected, new, .. }, Some(Response::CasOk)) => {
                    (expected == state).then(|| new.clone())
                }
                (Command::Cas { expected, .. }, Some(Response::CasFailed { current })) => {
                    (current == state && expected != state).then(|| state.clone())
                }
                (Command::Cas { expected, new, .. }, None) => Some(if expected == state {
                    new.clone()
                } else {
                    state.clone()
                }),
                _ => unreachable!("generated histories are well formed"),
            }
        }
        fn go(ops: &[&Operation], placed: &mut [bool], state: Option<Vec<u8>>) -> bool {
            let pending = |placed: &[bool], j: usize| !placed[j] && returned(ops[j]).is_some();
            if !(0..ops.len()).any(|j| pending(placed, j)) {
                return true;
            }
            for i in 0..ops.len() {
                let must_wait = (0..ops.len()).any(|j| {
                    j != i && pending(placed, j) && returned(ops[j]) < Some(ops[i].invoked)
                });
                if placed[i] || must_wait {
                    continue;
                }
                if let Some(next) = model(ops[i], &state) {
                    placed[i] = true;
                    if go(ops, placed, next) {
                        return true;
                    }
                    placed[i] = false;
                }
            }
            false
        }
        let ops: Vec<&Operation> = ops
            .iter()
            .filter(|op| !matches!(op.outcome, Outcome::Failed { .. }))
            .collect();
        go(&ops, &mut vec![false; ops.len()], None)
    }

    #[test]
    fn agrees_with_brute_force_on_small_histories() {
        // Random one-key histories with random (mostly wrong) answers, so both verdicts occur
        // often; the search and the definition must agree on every one.
        let mut rng = ChaCha8Rng::seed_from_u64(0x11_4EC4);
        let value = |rng: &mut ChaCha8Rng| match rng.gen_range(0..3) {
            0 => None,
            1 => some("a"),
            _ => some("b"),
        };
        let (mut ok, mut bad) = (0, 0);
        for round in 0..3_000 {
            let mut history = History::new();
            for client in 0..rng.gen_range(1..=6) {
                let command = match rng.gen_range(0..4) {
                    0 => Command::put("x", value(&mut rng).unwrap_or_default()),
                    1 => Command::delete("x"),
                    2 => Command::get("x"),
                    _ => Command::cas("x", value(&mut rng), value(&mut rng)),
                };
                let invoked = rng.gen_range(0..10);
                let at = invoked + rng.gen_range(0..6);
                let response = match &command {
                    Command::Put { .. } | Command::Delete { .. } => Response::Ack,
                    Command::Get { .. } => Response::Value(value(&mut rng)),
                    Command::Cas { .. } if rng.gen_bool(0.5) => Response::CasOk,
                    Command::Cas { .. } => Response::CasFailed {
                        current: value(&mut rng),
                    },
                };
                history.record(match rng.gen_range(0..10) {
                    0 => Operation::unknown(client, command, invoked),
                    1 => Operation::failed(client, command, invoked, at),
                    _ => Operation::returned(client, command, invoked, at, response),
                });
            }
            let expected = brute_force(history.ops());
            let report = check(&history);
            assert_eq!(
                report.is_ok(),
                expected,
                "round {round}: {:#?}\n{report}",
                history.ops()
            );
            if expected {
                ok += 1;
            } else {
                bad += 1;
            }
        }
        println!("brute force agreed on {ok} linearizable and {bad} non-linearizable histories");
        assert!(ok > 300 && bad > 300, "{ok} ok, {bad} bad");
    }

    /// A simulated store for randomised histories. Clients issue operations on a few keys; each
    /// operation takes effect atomically at one tick between its invocation and its response, on
    /// the leader's state, so the histories are linearizable by construction. A client gives up
    /// on a request with probability `unknown` before it is applied (it may still be applied
    /// later, or never) or after (its response is lost): both leave an unknown outcome.
    ///
    /// With `stale_reads` (the planted bug), half the reads are served from a follower's copy,
    /// which replays the leader's changes with a random lag, like a strong read answered from a
    /// follower's local state instead of through the leader.
    #[derive(Clone, Copy, Debug)]
    struct Sim {
        clients: u64,
        keys: usize,
        ops: usize,
        unknown: f64,
        stale_reads: bool,
    }

    type Store = HashMap<Vec<u8>, Option<Vec<u8>>>;

    /// Applies `command` at the leader, appending any change to `log`.
    fn apply(
        store: &mut Store,
        log: &mut Vec<(Vec<u8>, Option<Vec<u8>>)>,
        command: &Command,
    ) -> Response {
        let key = command.key().to_vec();
        let slot = store.entry(key.clone()).or_default();
        let change = |slot: &mut Option<Vec<u8>>, log: &mut Vec<_>, value: Option<Vec<u8>>| {
            slot.clone_from(&value);
            log.push((key.clone(), value));
        };
        match command {
            Command::Put { value, .. } => {
                change(slot, log, Some(value.clone()));
                Response::Ack
            }
            Command::Delete { .. } => {
                change(slot, log, None);
                Response::Ack
            }
            Command::Get { .. } => Response::Value(slot.clone()),
            Command::Cas { expected, new, .. } => {
                if slot == expected {
                    change(slot, log, new.clone());
                    Response::CasOk
                } else {
                    Response::CasFailed {
                        current: slot.clone(),
                    }
                }
            }
        }
    }

    struct InFlight {
        index: usize,
        command: Command,
        response: Option<Response>,
    }

    fn simulate(seed: u64, sim: Sim) -> History {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut leader = Store::new();
        let mut log = Vec::new();
        let mut follower = Store::new();
        let mut follower_applied = 0;
        let mut history = History::new();
        let mut clients: Vec<Option<InFlight>> = (0..sim.clients).map(|_| None).collect();
        // What each client last saw of each key: the expected value of its next cas.
        let mut seen: Vec<Store> = vec![Store::new(); sim.clients as usize];
        // Requests whose clients gave up before they were applied.
        let mut orphans: Vec<Command> = Vec::new();
        let mut issued = 0;
        let mut now: Time = 0;
        while issued < sim.ops || clients.iter().any(Option::is_some) {
            now += 1;
            if follower_applied < log.len() && rng.gen_bool(0.3) {
                let (key, value): &(Vec<u8>, Option<Vec<u8>>) = &log[follower_applied];
                follower.insert(key.clone(), value.clone());
                follower_applied += 1;
            }
            if !orphans.is_empty() && rng.gen_bool(0.05) {
                let command = orphans.swap_remove(rng.gen_range(0..orphans.len()));
                if rng.gen_bool(0.5) {
                    apply(&mut leader, &mut log, &command);
                }
            }
            let client = rng.gen_range(0..sim.clients);
            let c = client as usize;
            match clients[c].take() {
                None if issued < sim.ops => {
                    let key = format!("k{}", rng.gen_range(0..sim.keys)).into_bytes();
                    let fresh = format!("c{client}-{issued}").into_bytes();
                    let command = match rng.gen_range(0..100) {
                        0..40 => Command::get(key),
                        40..65 => Command::put(key, fresh),
                        65..72 => Command::delete(key),
                        _ => {
                            let expected = if rng.gen_bool(0.8) {
                                seen[c].get(&key).cloned().flatten()
                            } else {
                                None
                            };
                            let new = rng.gen_bool(0.9).then_some(fresh);
                            Command::cas(key, expected, new)
                        }
                    };
                    let index = history.len();
                    history.record(Operation::unknown(client, command.clone(), now));
                    clients[c] = Some(InFlight {
                        index,
                        command,
                        response: None,
                    });
                    issued += 1;
                }
                None => {}
                Some(mut req) if req.response.is_none() => {
                    if rng.gen_bool(sim.unknown) {
                        orphans.push(req.command);
                    } else {
                        let stale = sim.stale_reads
                            && matches!(req.command, Command::Get { .. })
                            && rng.gen_bool(0.5);
                        req.response = Some(if stale {
                            Response::Value(follower.get(req.command.key()).cloned().flatten())
                        } else {
                            apply(&mut leader, &mut log, &req.command)
                        });
                        clients[c] = Some(req);
                    }
                }
                Some(req) => {
                    let response = req.response.expect("guarded above");
                    if rng.gen_bool(sim.unknown) {
                        continue; // applied, but the response is lost
                    }
                    let key = req.command.key().to_vec();
                    let observed = match (&req.command, &response) {
                        (Command::Put { value, .. }, _) => Some(value.clone()),
                        (Command::Cas { new, .. }, Response::CasOk) => new.clone(),
                        (_, Response::Value(v)) | (_, Response::CasFailed { current: v }) => {
                            v.clone()
                        }
                        _ => None,
                    };
                    seen[c].insert(key, observed);
                    history.ops[req.index].outcome = Outcome::Returned { at: now, response };
                }
            }
        }
        history
    }

    /// The seeds to run: `LINCHECK_SEED` replays one; `LINCHECK_SEEDS` sets how many.
    fn seeds(default: u64) -> Vec<u64> {
        if let Ok(s) = std::env::var("LINCHECK_SEED") {
            return vec![s.parse().expect("LINCHECK_SEED must be a number")];
        }
        let n = std::env::var("LINCHECK_SEEDS")
            .ok()
            .map(|s| s.parse().expect("LINCHECK_SEEDS must be a number"))
            .unwrap_or(default);
        (0..n).collect()
    }

    /// How many pairs of operations on one key overlap in time, and how many outcomes are
    /// unknown: evidence that a history exercises the search.
    fn overlap_and_unknown(history: &History) -> (usize, usize) {
        let mut overlaps = 0;
        let ops = history.ops();
        for (i, a) in ops.iter().enumerate() {
            let a_end = match a.outcome {
                Outcome::Returned { at, .. } | Outcome::Failed { at } => at,
                Outcome::Unknown => continue,
            };
            overlaps += ops[i + 1..]
                .iter()
                .filter(|b| b.key() == a.key() && b.invoked > a.invoked && b.invoked < a_end)
                .count();
        }
        let unknown = ops
            .iter()
            .filter(|op| op.outcome == Outcome::Unknown)
            .count();
        (overlaps, unknown)
    }

    const CORRECT: Sim = Sim {
        clients: 6,
        keys: 4,
        ops: 2_000,
        unknown: 0.01,
        stale_reads: false,
    };

    #[test]
    fn random_linearizable_histories_pass() {
        let (mut overlaps, mut unknown) = (0, 0);
        for seed in seeds(16) {
            let history = simulate(seed, CORRECT);
            let (o, u) = overlap_and_unknown(&history);
            overlaps += o;
            unknown += u;
            let report = check(&history);
            println!(
                "LINCHECK_SEED={seed}: {o} overlapping pairs, {u} unknown, {} steps",
                report.steps
            );
            assert!(
                report.is_ok(),
                "seed {seed} (replay: LINCHECK_SEED={seed} cargo test --release --lib lincheck): {report}"
            );
        }
        assert!(
            overlaps > 0 && unknown > 0,
            "{overlaps} overlaps, {unknown} unknown"
        );
    }

    #[test]
    fn planted_stale_reads_are_caught() {
        let sim = Sim {
            stale_reads: true,
            ops: 600,
            ..CORRECT
        };
        let (mut violations, mut undecided) = (0, 0);
        for seed in seeds(16) {
            let report = check(&simulate(seed, sim));
            println!(
                "LINCHECK_SEED={seed}: {:?} after {} steps",
                report.verdict(),
                report.steps
            );
            match report.verdict() {
                Verdict::Violation => {
                    if violations == 0 {
                        println!("{report}");
                    }
                    violations += 1;
                }
                Verdict::Undecided => undecided += 1,
                Verdict::Ok => {}
            }
        }
        println!("stale reads: {violations} violating histories, {undecided} undecided");
        assert!(violations > 0, "the planted stale reads went unnoticed");
    }

    /// 10 000 operations, 10 keys, 8 clients. Prints the time; the release figure is the one
    /// that matters (`cargo test --release --lib lincheck -- --nocapture ten_thousand`).
    #[test]
    fn ten_thousand_ops_check_quickly() {
        let sim = Sim {
            clients: 8,
            keys: 10,
            ops: 10_000,
            unknown: 0.005,
            stale_reads: false,
        };
        let history = simulate(7, sim);
        let (overlaps, unknown) = overlap_and_unknown(&history);
        let start = std::time::Instant::now();
        let report = check(&history);
        let elapsed = start.elapsed();
        println!(
            "checked {} ops (8 clients, 10 keys, {overlaps} overlapping pairs, {unknown} unknown) in {elapsed:?}, {} steps",
            history.len(),
            report.steps
        );
        assert_ok(&report);
    }
}
