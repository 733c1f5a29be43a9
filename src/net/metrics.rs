//! Request metrics: counts and latency histograms per client operation, lock-free.
//!
//! Histograms use fixed Prometheus-style buckets (upper bounds in seconds, [`BUCKETS_MICROS`])
//! with one atomic counter each, so recording is a handful of relaxed atomic adds on the request
//! path. [`super::admin`] renders them, with the node's other counters and gauges, in the
//! Prometheus text format.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// A client operation, as metrics label it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    /// A read.
    Get,
    /// A write.
    Put,
    /// A delete.
    Delete,
    /// A status request.
    Status,
    /// A strong (linearizable) put.
    StrongPut,
    /// A strong (linearizable) get.
    StrongGet,
    /// A strong delete.
    StrongDelete,
    /// A compare-and-set.
    Cas,
}

impl Op {
    /// Every operation, in label order.
    pub const ALL: [Op; 8] = [
        Op::Get,
        Op::Put,
        Op::Delete,
        Op::Status,
        Op::StrongPut,
        Op::StrongGet,
        Op::StrongDelete,
        Op::Cas,
    ];

    /// The `op` label value.
    pub fn name(self) -> &'static str {
        match self {
            Op::Get => "get",
            Op::Put => "put",
            Op::Delete => "delete",
            Op::Status => "status",
            Op::StrongPut => "strong_put",
            Op::StrongGet => "strong_get",
            Op::StrongDelete => "strong_delete",
            Op::Cas => "cas",
        }
    }
}

/// Upper bounds of the latency buckets, in microseconds (100 µs to 10 s); `+Inf` is implied.
pub const BUCKETS_MICROS: [u64; 16] = [
    100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000,
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

/// Counts and latencies of one operation.
#[derive(Debug, Default)]
pub struct OpStats {
    /// Requests answered with a result.
    pub ok: AtomicU64,
    /// Requests answered with an error (not ready, too large, storage, sync timeout, ...).
    pub errors: AtomicU64,
    /// Time from a valid request frame to its response being written.
    pub latency: Histogram,
}

/// Per-operation statistics of the client service.
#[derive(Debug, Default)]
pub struct OpMetrics {
    ops: [OpStats; Op::ALL.len()],
}

impl OpMetrics {
    /// The statistics of `op`.
    pub fn get(&self, op: Op) -> &OpStats {
        &self.ops[op as usize]
    }

    /// Records one request of `op` that took `latency`.
    pub fn record(&self, op: Op, ok: bool, latency: Duration) {
        let s = self.get(op);
        let c = if ok { &s.ok } else { &s.errors };
        c.fetch_add(1, Ordering::Relaxed);
        s.latency.record(latency);
    }
}

/// Counters of one node, readable at any time.
#[derive(Debug, Default)]
pub struct Metrics {
    /// Frames that failed validation.
    pub malformed_frames: AtomicU64,
    /// Peer hellos refused.
    pub hellos_rejected: AtomicU64,
    /// Connections whose TLS handshake failed.
    pub tls_failures: AtomicU64,
    /// Certificate reloads that took effect.
    pub tls_reloads: AtomicU64,
    /// Certificate reloads rejected (the previous certificates stayed in force).
    pub tls_reload_failures: AtomicU64,
    /// Client requests served.
    pub requests: AtomicU64,
    /// Client requests refused for size.
    pub too_large: AtomicU64,
    /// Update batches received from peers.
    pub batches_in: AtomicU64,
    /// Update batches sent to peers.
    pub batches_out: AtomicU64,
    /// Bytes of update frames received.
    pub bytes_in: AtomicU64,
    /// Bytes of update frames sent.
    pub bytes_out: AtomicU64,
    /// Per client operation: counts and latency histograms.
    pub ops: OpMetrics,
}

impl Metrics {
    /// Reads one counter.
    pub fn get(c: &AtomicU64) -> u64 {
        c.load(Ordering::Relaxed)
    }

    pub(crate) fn bump(c: &AtomicU64) {
        c.fetch_add(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn observations_land_in_the_right_buckets() {
        let h = Histogram::default();
        h.record(Duration::from_micros(50)); // <= 100 µs
        h.record(Duration::from_micros(100)); // <= 100 µs (bounds are inclusive)
        h.record(Duration::from_micros(101)); // <= 250 µs
        h.record(Duration::from_millis(3)); // <= 5 ms
        h.record(Duration::from_secs(60)); // +Inf
        let (cum, sum) = h.snapshot();
        assert_eq!(cum.len(), BUCKETS_MICROS.len() + 1);
        assert_eq!(&cum[..6], &[2, 3, 3, 3, 3, 4]);
        assert_eq!(cum[BUCKETS_MICROS.len() - 1], 4);
        assert_eq!(*cum.last().unwrap(), 5);
        assert_eq!(h.count(), 5);
        assert_eq!(sum, 50 + 100 + 101 + 3_000 + 60_000_000);
    }

    #[test]
    fn ops_are_counted_apart() {
        let m = OpMetrics::default();
        m.record(Op::Put, true, Duration::from_millis(1));
        m.record(Op::Put, false, Duration::from_millis(1));
        m.record(Op::Get, true, Duration::from_millis(1));
        assert_eq!(m.get(Op::Put).ok.load(Ordering::Relaxed), 1);
        assert_eq!(m.get(Op::Put).errors.load(Ordering::Relaxed), 1);
        assert_eq!(m.get(Op::Put).latency.count(), 2);
        assert_eq!(m.get(Op::Get).latency.count(), 1);
        assert_eq!(m.get(Op::Delete).latency.count(), 0);
        for (i, op) in Op::ALL.iter().enumerate() {
            assert_eq!(*op as usize, i);
        }
    }
}
