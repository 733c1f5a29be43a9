//! The dependency buffer: remote updates received but not yet applicable.
//!
//! Updates from one origin arrive in order, and must be applied in that order (`applied[i]` means
//! "everything from `i` up to here"). So the buffer is one FIFO queue per origin, and only the head
//! of each queue can be applicable. A blocked head is indexed by the single vector entry it waits
//! on, `(entry k, needed timestamp)`, in a min-heap per entry. When `applied[k]` advances, only the
//! heads waiting on `k` with a need at or below the new value are woken and re-checked; a head
//! that is still blocked is re-indexed on its next missing entry. Nothing ever rescans the whole
//! buffer, so one apply costs `O(log b + n)` for `b` buffered updates and `n` sites.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};

use super::Item;
use crate::clock::{SiteId, Timestamp, VClock};

/// Capacity a queue keeps however short it gets (see [`release_spare`]).
const KEEP: usize = 1024;

/// Gives back the room a backlog left in `q` (a partition, a peer's restart) once it has
/// drained below a quarter of its capacity, down to twice what it holds and at least [`KEEP`]
/// items: one fault's high-water mark is not kept for the life of the process. Shrinking copies
/// what is left, so it happens a few times after a backlog and never in steady state.
pub(crate) fn release_spare<T>(q: &mut VecDeque<T>) {
    let cap = q.capacity();
    if cap > KEEP && q.len() < cap / 4 {
        q.shrink_to((q.len() * 2).max(KEEP));
    }
}

/// Remote items waiting for their dependencies, per origin, indexed by what each head waits on.
#[derive(Debug)]
pub struct DependencyBuffer {
    /// Per origin: received items not yet applied, in stream order.
    queues: Vec<VecDeque<Item>>,
    /// Per vector entry `k`: heads waiting until `applied[k] >= need`, as `(need, origin)`.
    waiting: Vec<BinaryHeap<Reverse<(Timestamp, SiteId)>>>,
    /// Per origin: true while its head is registered in `waiting`.
    blocked: Vec<bool>,
    len: usize,
    bytes: usize,
}

impl DependencyBuffer {
    /// An empty buffer for `n` sites.
    pub fn new(n: usize) -> Self {
        Self {
            queues: (0..n).map(|_| VecDeque::new()).collect(),
            waiting: (0..n).map(|_| BinaryHeap::new()).collect(),
            blocked: vec![false; n],
            len: 0,
            bytes: 0,
        }
    }

    /// Makes room for `n` sites (a site added to the cluster); never shrinks.
    pub fn grow(&mut self, n: usize) {
        while self.queues.len() < n {
            self.queues.push(VecDeque::new());
            self.blocked.push(false);
        }
        if self.waiting.len() < n {
            self.waiting.resize_with(n, BinaryHeap::new);
        }
    }

    /// Number of buffered items.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when nothing is buffered.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Approximate payload bytes buffered (keys and values).
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Number of items buffered from `origin`.
    pub fn len_from(&self, origin: SiteId) -> usize {
        self.queues[origin as usize].len()
    }

    /// Appends an item from `origin` to its queue. Returns true when the queue was idle (empty and
    /// not blocked), so the caller should try to drain it.
    pub fn push(&mut self, origin: SiteId, item: Item) -> bool {
        let q = &mut self.queues[origin as usize];
        let was_idle = q.is_empty();
        self.bytes += item.payload_len();
        q.push_back(item);
        self.len += 1;
        was_idle && !self.blocked[origin as usize]
    }

    /// The head of `origin`'s queue, if it is not blocked.
    pub fn ready_head(&self, origin: SiteId) -> Option<&Item> {
        if self.blocked[origin as usize] {
            return None;
        }
        self.queues[origin as usize].front()
    }

    /// The timestamp of the head of `origin`'s queue, blocked or not.
    pub fn head_ts(&self, origin: SiteId) -> Option<Timestamp> {
        self.queues[origin as usize].front().map(Item::ts)
    }

    /// Removes and returns the head of `origin`'s queue.
    pub fn pop(&mut self, origin: SiteId) -> Option<Item> {
        let q = &mut self.queues[origin as usize];
        let item = q.pop_front()?;
        release_spare(q);
        self.len -= 1;
        self.bytes -= item.payload_len();
        Some(item)
    }

    /// Parks `origin`'s head until `applied[entry] >= need`. `entry` may be a site the
    /// replica does not count yet (a peer that applied its addition earlier sent an update
    /// that depends on it): the head waits until the site is counted and its stream arrives.
    pub fn block(&mut self, origin: SiteId, entry: SiteId, need: Timestamp) {
        self.blocked[origin as usize] = true;
        let e = entry as usize;
        if e >= self.waiting.len() {
            self.waiting.resize_with(e + 1, BinaryHeap::new);
        }
        self.waiting[e].push(Reverse((need, origin)));
    }

    /// Unparks every head waiting on `entry` whose need is at most `applied_entry`, pushing their
    /// origins onto `wake`.
    pub fn wake(&mut self, entry: SiteId, applied_entry: Timestamp, wake: &mut Vec<SiteId>) {
        let Some(heap) = self.waiting.get_mut(entry as usize) else {
            return;
        };
        while let Some(Reverse((need, origin))) = heap.peek().copied() {
            if need > applied_entry {
                break;
            }
            heap.pop();
            self.blocked[origin as usize] = false;
            wake.push(origin);
        }
    }

    /// Drops everything (a crash loses the buffer; the origins resend).
    pub fn clear(&mut self) {
        let n = self.queues.len();
        *self = Self::new(n);
    }

    /// The first entry of `deps` (other than `origin`'s own, which stream order guarantees) that
    /// `applied` does not cover yet, as `(entry, need)`.
    pub fn first_missing(
        applied: &VClock,
        deps: &VClock,
        origin: SiteId,
    ) -> Option<(SiteId, Timestamp)> {
        deps.as_slice().iter().enumerate().find_map(|(k, &need)| {
            let k = k as SiteId;
            (k != origin && applied.get(k) < need).then_some((k, need))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_drained_backlog_gives_its_capacity_back() {
        let mut buf = DependencyBuffer::new(2);
        for ts in 1..=20_000 {
            buf.push(1, Item::Marker(ts));
        }
        assert!(buf.queues[1].capacity() >= 20_000);
        while buf.len_from(1) > 100 {
            buf.pop(1);
        }
        let cap = buf.queues[1].capacity();
        assert!(
            cap <= 2 * KEEP,
            "capacity {cap} kept after the backlog drained"
        );
        // What is left is intact and in order.
        assert_eq!(buf.head_ts(1), Some(19_901));
        assert_eq!(buf.len(), 100);
    }
}
