//! Clocks: the hybrid logical clock, [`Version`] and [`VClock`].
//!
//! Timestamps are `u64` microseconds. The [`Hlc`] never reads the wall clock itself: the caller
//! passes physical time in, so the replication core stays deterministic under simulation. A tick
//! returns `max(physical_now, last + 1, floor)`, where `floor` is `max(ctx) + 1` for a write under a
//! causal context: a write that causally follows another write therefore always gets a larger
//! timestamp, and wins last-writer-wins. The logical part of the hybrid clock is folded into the
//! same integer (a burst of writes inside one microsecond advances by one per write), which keeps
//! every vector entry a single comparable number.
//!
//! A [`VClock`] has one entry per site: entry `j` is the highest timestamp from site `j` that is
//! covered. It implements `PartialOrd` with `None` for concurrent clocks.

use std::cmp::Ordering;
use std::fmt;

/// A site's index in the cluster configuration (`0..N`).
pub type SiteId = u16;

/// A timestamp in microseconds of the hybrid logical clock.
pub type Timestamp = u64;

/// The version of a write: its HLC timestamp at the origin plus the origin's id.
///
/// Versions are totally ordered (timestamp first, site id breaks ties); the greatest version wins
/// last-writer-wins.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct Version {
    /// HLC timestamp given at the origin site.
    pub ts: Timestamp,
    /// The origin site.
    pub site: SiteId,
}

impl Version {
    /// A version.
    pub fn new(ts: Timestamp, site: SiteId) -> Self {
        Self { ts, site }
    }
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}@{}", self.ts, self.site)
    }
}

/// A hybrid logical clock. Physical time is passed in by the caller.
#[derive(Clone, Debug, Default)]
pub struct Hlc {
    last: Timestamp,
}

impl Hlc {
    /// A clock that has issued nothing yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// A clock that will never issue a timestamp at or below `last` (used on recovery).
    pub fn starting_after(last: Timestamp) -> Self {
        Self { last }
    }

    /// The last timestamp issued.
    pub fn last(&self) -> Timestamp {
        self.last
    }

    /// Issues a new timestamp: `max(physical_now, last + 1, floor)`.
    pub fn tick(&mut self, physical_now: Timestamp, floor: Timestamp) -> Timestamp {
        let ts = physical_now.max(self.last + 1).max(floor);
        self.last = ts;
        ts
    }

    /// Moves the clock forward to at least `ts` without issuing (for example after observing a
    /// remote timestamp, so local clocks stay close to each other).
    pub fn observe(&mut self, ts: Timestamp) {
        self.last = self.last.max(ts);
    }
}

/// A vector clock: one HLC timestamp per site.
#[derive(Clone, PartialEq, Eq, Hash, Default)]
pub struct VClock(Vec<Timestamp>);

impl VClock {
    /// The zero clock for `n` sites.
    pub fn zero(n: usize) -> Self {
        Self(vec![0; n])
    }

    /// A clock from its entries.
    pub fn from_vec(entries: Vec<Timestamp>) -> Self {
        Self(entries)
    }

    /// The same clock with exactly `n` entries (cut or padded with zeros).
    pub fn resized(&self, n: usize) -> VClock {
        let mut v = self.0.clone();
        v.resize(n, 0);
        VClock(v)
    }

    /// The entries, one per site.
    pub fn as_slice(&self) -> &[Timestamp] {
        &self.0
    }

    /// The entries, owned.
    pub fn into_vec(self) -> Vec<Timestamp> {
        self.0
    }

    /// Number of entries (the number of sites).
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// True when the clock has no entries.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Entry `site`, or 0 if the clock is shorter.
    pub fn get(&self, site: SiteId) -> Timestamp {
        self.0.get(site as usize).copied().unwrap_or(0)
    }

    /// Raises entry `site` to at least `ts` (growing the clock if needed).
    pub fn raise(&mut self, site: SiteId, ts: Timestamp) {
        let i = site as usize;
        if i >= self.0.len() {
            self.0.resize(i + 1, 0);
        }
        if self.0[i] < ts {
            self.0[i] = ts;
        }
    }

    /// Entry-wise maximum, in place.
    pub fn merge(&mut self, other: &VClock) {
        if other.0.len() > self.0.len() {
            self.0.resize(other.0.len(), 0);
        }
        for (a, b) in self.0.iter_mut().zip(&other.0) {
            if *a < *b {
                *a = *b;
            }
        }
    }

    /// Entry-wise maximum of two clocks.
    pub fn merged(&self, other: &VClock) -> VClock {
        let mut c = self.clone();
        c.merge(other);
        c
    }

    /// Entry-wise minimum, in place (used for the stable vector).
    pub fn meet(&mut self, other: &VClock) {
        let n = self.0.len().max(other.0.len());
        self.0.resize(n, 0);
        for (i, a) in self.0.iter_mut().enumerate() {
            *a = (*a).min(other.get(i as SiteId));
        }
    }

    /// True when every entry of `self` is at least the same entry of `other`: everything `other`
    /// has seen, `self` has seen too.
    pub fn covers(&self, other: &VClock) -> bool {
        other
            .0
            .iter()
            .enumerate()
            .all(|(i, &b)| self.get(i as SiteId) >= b)
    }

    /// The first entry where `self` falls short of `other`, as `(site, have, need)`.
    pub fn first_gap(&self, other: &VClock) -> Option<(SiteId, Timestamp, Timestamp)> {
        other.0.iter().enumerate().find_map(|(i, &b)| {
            let a = self.get(i as SiteId);
            (a < b).then_some((i as SiteId, a, b))
        })
    }

    /// The greatest entry (0 for an empty clock).
    pub fn max_entry(&self) -> Timestamp {
        self.0.iter().copied().max().unwrap_or(0)
    }

    /// The smallest entry (0 for an empty clock).
    pub fn min_entry(&self) -> Timestamp {
        self.0.iter().copied().min().unwrap_or(0)
    }
}

impl PartialOrd for VClock {
    /// `Less` / `Greater` when one clock covers the other, `Equal` when equal, `None` when the
    /// clocks are concurrent.
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        let n = self.0.len().max(other.0.len());
        let (mut le, mut ge) = (true, true);
        for i in 0..n {
            let (a, b) = (self.get(i as SiteId), other.get(i as SiteId));
            le &= a <= b;
            ge &= a >= b;
            if !le && !ge {
                return None;
            }
        }
        match (le, ge) {
            (true, true) => Some(Ordering::Equal),
            (true, false) => Some(Ordering::Less),
            (false, true) => Some(Ordering::Greater),
            (false, false) => None,
        }
    }
}

impl fmt::Debug for VClock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.0)
    }
}

impl fmt::Display for VClock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "[")?;
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                write!(f, ",")?;
            }
            write!(f, "{e}")?;
        }
        write!(f, "]")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn clock(n: usize) -> impl Strategy<Value = VClock> {
        proptest::collection::vec(0u64..6, n).prop_map(VClock::from_vec)
    }

    proptest! {
        #[test]
        fn merge_is_commutative(a in clock(4), b in clock(4)) {
            prop_assert_eq!(a.merged(&b), b.merged(&a));
        }

        #[test]
        fn merge_is_associative(a in clock(4), b in clock(4), c in clock(4)) {
            prop_assert_eq!(a.merged(&b).merged(&c), a.merged(&b.merged(&c)));
        }

        #[test]
        fn merge_is_idempotent(a in clock(4)) {
            prop_assert_eq!(a.merged(&a), a.clone());
        }

        #[test]
        fn order_agrees_with_merge(a in clock(4), b in clock(4)) {
            // a <= b exactly when merging a into b changes nothing.
            let le = matches!(a.partial_cmp(&b), Some(Ordering::Less | Ordering::Equal));
            prop_assert_eq!(le, a.merged(&b) == b);
            prop_assert_eq!(b.covers(&a), le);
            // The merge is an upper bound of both.
            let m = a.merged(&b);
            prop_assert!(m >= a && m >= b);
        }

        #[test]
        fn concurrency_is_symmetric(a in clock(3), b in clock(3)) {
            prop_assert_eq!(a.partial_cmp(&b).is_none(), b.partial_cmp(&a).is_none());
        }

        #[test]
        fn hlc_is_strictly_increasing(nows in proptest::collection::vec(0u64..100, 1..50), floor in 0u64..200) {
            let mut h = Hlc::new();
            let mut prev = 0;
            for now in nows {
                let ts = h.tick(now, floor);
                prop_assert!(ts > prev && ts >= now && ts >= floor);
                prev = ts;
            }
        }
    }

    #[test]
    fn concurrent_clocks_compare_none() {
        let a = VClock::from_vec(vec![1, 0]);
        let b = VClock::from_vec(vec![0, 1]);
        assert_eq!(a.partial_cmp(&b), None);
        assert!(!a.covers(&b));
        assert_eq!(a.first_gap(&b), Some((1, 0, 1)));
    }

    #[test]
    fn versions_order_by_ts_then_site() {
        assert!(Version::new(2, 0) > Version::new(1, 5));
        assert!(Version::new(2, 1) > Version::new(2, 0));
    }
}
