//! Request metrics: counts and latency histograms per client operation, lock-free.
//!
//! Histograms ([`Histogram`], from [`crate::histogram`]) use fixed Prometheus-style buckets with
//! one atomic counter each, so recording is a handful of relaxed atomic adds on the request path. [`super::admin`] renders them, with the node's other counters and gauges, in the
//! Prometheus text format.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

pub use crate::histogram::{BUCKETS_MICROS, Histogram};

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

/// A stage of a put's (or delete's) path to its acknowledgement, as `/metrics` labels it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PutStage {
    /// From the valid request frame to the write applied and its log record queued (the
    /// replica lock, a causal wait if any, serialising the record).
    Apply,
    /// From the record queued to the log telling waiters it is durable under the policy in
    /// force (written and fsynced under `always`, written under `batch` and `never`).
    Log,
    /// From that moment to the request's task running again on the runtime.
    Wake,
    /// From then to the response written to the client's stream.
    Reply,
}

impl PutStage {
    /// Every stage, in order.
    pub const ALL: [PutStage; 4] = [
        PutStage::Apply,
        PutStage::Log,
        PutStage::Wake,
        PutStage::Reply,
    ];

    /// The `stage` label value.
    pub fn name(self) -> &'static str {
        match self {
            PutStage::Apply => "apply",
            PutStage::Log => "log",
            PutStage::Wake => "wake",
            PutStage::Reply => "reply",
        }
    }
}

/// How long writes spend in each [`PutStage`].
#[derive(Debug, Default)]
pub struct PutStages([Histogram; 4]);

impl PutStages {
    /// The histogram of `stage`.
    pub fn get(&self, stage: PutStage) -> &Histogram {
        &self.0[stage as usize]
    }

    /// Records one write's time in `stage`.
    pub fn record(&self, stage: PutStage, d: Duration) {
        self.get(stage).record(d);
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

/// What the bytes a node sends over its peer links carry, as `/metrics` labels them
/// (`causalkv_peer_bytes_out_total{kind=...}`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WireKind {
    /// Keys and values of replicated updates.
    Payload,
    /// The updates' dependency vectors.
    Deps,
    /// Clock markers (a batch of markers alone counts whole, frame and all).
    Marker,
    /// The rest of update frames: length prefixes, batch and item headers, padding.
    Framing,
    /// Acks on the control streams sent because the durable vector changed.
    Ack,
    /// Acks sent only because a heartbeat was due (nothing changed).
    Heartbeat,
    /// Hellos.
    Hello,
    /// Stable-vector contributions to the site's other partitions.
    Sibling,
    /// Raft RPCs and their replies (strong operations).
    Raft,
    /// Datagram copies of update frames (`replication.redundancy`), whole.
    Copy,
}

impl WireKind {
    /// Every kind, in label order.
    pub const ALL: [WireKind; 10] = [
        WireKind::Payload,
        WireKind::Deps,
        WireKind::Marker,
        WireKind::Framing,
        WireKind::Ack,
        WireKind::Heartbeat,
        WireKind::Hello,
        WireKind::Sibling,
        WireKind::Raft,
        WireKind::Copy,
    ];

    /// The `kind` label value.
    pub fn name(self) -> &'static str {
        match self {
            WireKind::Payload => "payload",
            WireKind::Deps => "deps",
            WireKind::Marker => "marker",
            WireKind::Framing => "framing",
            WireKind::Ack => "ack",
            WireKind::Heartbeat => "heartbeat",
            WireKind::Hello => "hello",
            WireKind::Sibling => "sibling",
            WireKind::Raft => "raft",
            WireKind::Copy => "copy",
        }
    }
}

/// Bytes sent over peer links, per [`WireKind`], and the UDP payload bytes the peer connections
/// sent (so QUIC's own overhead is the difference).
#[derive(Debug, Default)]
pub struct WireBytes {
    kinds: [AtomicU64; WireKind::ALL.len()],
    /// UDP payload bytes sent on peer connections (quinn's `udp_tx.bytes`), sampled.
    pub udp_tx: AtomicU64,
}

impl WireBytes {
    /// Counts `n` bytes of `kind`.
    pub fn add(&self, kind: WireKind, n: usize) {
        self.kinds[kind as usize].fetch_add(n as u64, Ordering::Relaxed);
    }

    /// Bytes of `kind` so far.
    pub fn get(&self, kind: WireKind) -> u64 {
        self.kinds[kind as usize].load(Ordering::Relaxed)
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
    /// Snapshots sent to joining sites.
    pub snapshots_served: AtomicU64,
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
    /// Datagram copies of update frames sent (`replication.redundancy`).
    pub copies_out: AtomicU64,
    /// Stable-vector contributions sent to sibling partitions.
    pub contributions_out: AtomicU64,
    /// Bytes of those contribution frames (the cost of partitioning a site).
    pub contribution_bytes_out: AtomicU64,
    /// Bytes sent over peer links, per kind.
    pub wire: WireBytes,
    /// Per client operation: counts and latency histograms.
    pub ops: OpMetrics,
    /// Client writes, stage by stage: where a durable write spends its time.
    pub put_stages: PutStages,
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
        for (i, k) in WireKind::ALL.iter().enumerate() {
            assert_eq!(*k as usize, i);
        }
    }
}
