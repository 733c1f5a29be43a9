//! A latency histogram with fixed Prometheus-style buckets and one atomic counter per bucket,
//! so that recording is a handful of relaxed atomic adds: cheap enough for the request path and
//! the write-ahead log's commit loop, which both record into it. The admin endpoint renders it
//! in the Prometheus text format.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Upper bounds of the latency buckets, in microseconds (25 µs to 10 s: fine enough for an fsync); `+Inf` is implied.
pub const BUCKETS_MICROS: [u64; 18] = [
    25, 50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000,
    1_000_000, 2_500_000, 5_000_000, 10_000_000,
];

/// A latency histogram with fixed buckets ([`BUCKETS_MICROS`]).
#[derive(Debug, Default)]
pub struct Histogram {
    /// Observations per bucket (not cumulative); the last entry counts those above every bound.
    buckets: [AtomicU64; BUCKETS_MICROS.len() + 1],
    /// Sum of observations, in microseconds.
    sum_micros: AtomicU64,
}

impl Histogram {
    /// Records one observation.
    pub fn record(&self, d: Duration) {
        let us = d.as_micros().min(u64::MAX as u128) as u64;
        let i = BUCKETS_MICROS.partition_point(|&b| b < us);
        self.buckets[i].fetch_add(1, Ordering::Relaxed);
        self.sum_micros.fetch_add(us, Ordering::Relaxed);
    }

    /// Cumulative counts per bucket bound (the last is `+Inf`, the total count), and the sum in
    /// microseconds. Read without a lock: under concurrent recording the figures may be off by
    /// the observations in flight, as with any Prometheus client.
    pub fn snapshot(&self) -> (Vec<u64>, u64) {
        let mut acc = 0;
        let cumulative = self
            .buckets
            .iter()
            .map(|b| {
                acc += b.load(Ordering::Relaxed);
                acc
            })
            .collect();
        (cumulative, self.sum_micros.load(Ordering::Relaxed))
    }

    /// Observations recorded.
    pub fn count(&self) -> u64 {
        self.buckets.iter().map(|b| b.load(Ordering::Relaxed)).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn observations_land_in_the_right_buckets() {
        let h = Histogram::default();
        h.record(Duration::from_micros(50)); // <= 50 µs
        h.record(Duration::from_micros(100)); // <= 100 µs (bounds are inclusive)
        h.record(Duration::from_micros(101)); // <= 250 µs
        h.record(Duration::from_millis(3)); // <= 5 ms
        h.record(Duration::from_secs(60)); // +Inf
        let (cum, sum) = h.snapshot();
        assert_eq!(cum.len(), BUCKETS_MICROS.len() + 1);
        assert_eq!(&cum[..8], &[0, 1, 2, 3, 3, 3, 3, 4]);
        assert_eq!(cum[BUCKETS_MICROS.len() - 1], 4);
        assert_eq!(*cum.last().unwrap(), 5);
        assert_eq!(h.count(), 5);
        assert_eq!(sum, 50 + 100 + 101 + 3_000 + 60_000_000);
    }
}
