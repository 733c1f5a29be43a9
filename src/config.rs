//! Site configuration, read from a TOML file (`causalkv serve --config site.toml`).
//!
//! Every site of a cluster is listed in `[[sites]]` (the same list in every site's file), and
//! `site_id` says which one this file is for. Limits, timeouts and replication knobs have safe
//! defaults; unknown keys are an error, so a typo never silently falls back to a default.
//!
//! ```toml
//! cluster_id = "prod"
//! site_id = 0
//! data_dir = "data/a"
//!
//! [[sites]]
//! id = 0
//! name = "a"
//! addr = "127.0.0.1:7100"
//!
//! [[sites]]
//! id = 1
//! name = "b"
//! addr = "127.0.0.1:7101"
//!
//! [tls]
//! ca = "certs/dev/ca.pem"
//! cert = "certs/dev/site-a.pem"
//! key = "certs/dev/site-a.key"
//! ```

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::clock::SiteId;
use crate::wire::Limits;

/// A configuration problem, with what to fix.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not valid TOML for this schema.
    #[error("config file {path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The parser's message (line, column, field).
        message: String,
    },
    /// The values are inconsistent.
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

/// One site of the cluster.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SiteEntry {
    /// Site id, `0..N`.
    pub id: SiteId,
    /// Site name; the site's certificate must carry it.
    pub name: String,
    /// Address the site listens on, for peers and clients (UDP, QUIC). With several partitions,
    /// the address of partition 0.
    pub addr: SocketAddr,
    /// With several partitions (top-level `partitions`): the address of every partition node of
    /// this site, in partition order, the first equal to `addr`. When omitted, partition `p`
    /// listens on `addr`'s host at `addr`'s port + `p`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub partition_addrs: Vec<SocketAddr>,
}

impl SiteEntry {
    /// A site entry with no explicit partition addresses.
    pub fn new(id: SiteId, name: impl Into<String>, addr: SocketAddr) -> Self {
        Self {
            id,
            name: name.into(),
            addr,
            partition_addrs: Vec::new(),
        }
    }

    /// The address of this site's partition `p` (see [`SiteEntry::partition_addrs`]).
    pub fn partition_addr(&self, p: u32) -> SocketAddr {
        match self.partition_addrs.get(p as usize) {
            Some(a) => *a,
            None => {
                let mut a = self.addr;
                a.set_port(self.addr.port().wrapping_add(p as u16));
                a
            }
        }
    }
}

/// Certificate files.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// The cluster CA certificate (PEM).
    pub ca: PathBuf,
    /// This site's certificate (PEM).
    pub cert: PathBuf,
    /// This site's private key (PEM).
    pub key: PathBuf,
    /// Whether clients must present a certificate signed by the cluster CA. Default: true.
    #[serde(default = "yes")]
    pub require_client_cert: bool,
}

fn yes() -> bool {
    true
}

fn one() -> u32 {
    1
}

fn is_one(v: &u32) -> bool {
    *v == 1
}

fn is_zero(v: &u32) -> bool {
    *v == 0
}

/// Timeouts, in milliseconds.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Timeouts {
    /// Longest a request may wait for causal readiness or synchronous replication.
    pub request_ms: u64,
    /// QUIC idle timeout (the smaller of both sides' applies).
    pub idle_ms: u64,
    /// QUIC keep-alive interval; must be shorter than the idle timeout.
    pub keep_alive_ms: u64,
    /// How often a site sends its applied vector (heartbeat) to each peer.
    pub heartbeat_ms: u64,
    /// Longest backoff between reconnection attempts.
    pub max_backoff_ms: u64,
    /// Longest a graceful shutdown waits for in-flight requests.
    pub drain_ms: u64,
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            request_ms: 5_000,
            idle_ms: 10_000,
            keep_alive_ms: 2_000,
            heartbeat_ms: 100,
            max_backoff_ms: 2_000,
            drain_ms: 5_000,
        }
    }
}

impl Timeouts {
    /// A millisecond setting as a duration.
    pub fn ms(v: u64) -> Duration {
        Duration::from_millis(v)
    }
}

/// Replication knobs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ReplicationConfig {
    /// Most updates in one batch frame.
    pub batch_max_items: usize,
    /// How often an idle site sends a clock marker (ms).
    pub marker_interval_ms: u64,
    /// Most updates from one peer held in the dependency buffer before reading that peer's
    /// stream pauses (so the buffer holds at most this many per peer). Per peer, so that
    /// updates waiting on another peer's stream never stop that stream.
    pub max_buffered: usize,
    /// With several partitions: the partitions of a site send each other their contributions
    /// to the site's stable vector at most three times per this many ms (a short burst, so that
    /// the answer to a sibling's wait never waits behind the previous frame).
    pub stable_exchange_ms: u64,
    /// Update frames to one peer go out at most this often (ms; 0: as soon as there is
    /// something to send): at once on a link that has been quiet this long, else this long
    /// after the previous frame, carrying every update of the moment. Fewer, fuller packets
    /// cost every site less CPU and bytes per update, at the price of up to this much
    /// visibility delay, small next to a WAN link's one-way time (results/resp).
    pub linger_ms: u64,
    /// When update frames also go to a peer as QUIC datagram copies, so that a lost packet
    /// holds up neither its updates nor those behind it for a retransmission (a round trip and
    /// more): `auto` (default) on a link that lost a packet in the last `redundancy_window_ms`,
    /// `always`, or `off`. A copy is sent only for a frame that fits one datagram, and costs
    /// its bytes again on the link; a lossless link sends none under `auto`.
    pub redundancy: Redundancy,
    /// Under `redundancy = "auto"`: how long after a lost packet a link keeps sending copies
    /// (ms, at least 1).
    pub redundancy_window_ms: u64,
}

/// When update frames also travel as datagram copies ([`ReplicationConfig::redundancy`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Redundancy {
    /// Never.
    Off,
    /// On a link that lost a packet within the window.
    #[default]
    Auto,
    /// Always.
    Always,
}

impl Default for ReplicationConfig {
    fn default() -> Self {
        Self {
            batch_max_items: 1024,
            marker_interval_ms: 5,
            max_buffered: 1_000_000,
            stable_exchange_ms: 1,
            linger_ms: 2,
            redundancy: Redundancy::Auto,
            redundancy_window_ms: 10_000,
        }
    }
}

/// QUIC transport settings (`[quic]`), for peer and client connections alike.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct QuicConfig {
    /// Per-stream receive window, bytes: what a peer may send on one stream ahead of what this
    /// site has read. It bounds one link's throughput to window / round trip, so size it to the
    /// bandwidth-delay product of the slowest link (the default, 16 MiB, is 100 ms x 160 MB/s).
    pub stream_window: u64,
    /// Per-connection receive window and send buffer, bytes; at least `stream_window`.
    pub conn_window: u64,
    /// Largest UDP payload accepted and probed for by path-MTU discovery, bytes
    /// (1200..=65527; default 1452, one Ethernet frame). See
    /// [`TransportLimits::max_udp_payload`](crate::tls::TransportLimits::max_udp_payload)
    /// before raising it.
    pub max_udp_payload: u16,
    /// The congestion window a new connection starts with, bytes (at least 2400; default
    /// 256 KiB). See
    /// [`TransportLimits::initial_window`](crate::tls::TransportLimits::initial_window).
    pub initial_window: u64,
    /// The congestion controller: `cubic` (default), `bbr` or `newreno`. See
    /// [`Congestion`](crate::tls::Congestion).
    pub congestion: crate::tls::Congestion,
    /// The congestion window never counts as below this many bytes (0: the controller's own
    /// floor, two packets). See
    /// [`TransportLimits::min_window`](crate::tls::TransportLimits::min_window).
    pub min_window: u64,
    /// The longest a peer may delay an acknowledgement, milliseconds (1..=1000), asked for
    /// with QUIC's acknowledgement-frequency extension; 0 (the default) leaves QUIC's own 25 ms.
    /// See [`TransportLimits::max_ack_delay`](crate::tls::TransportLimits::max_ack_delay).
    pub max_ack_delay_ms: u64,
    /// Ack-eliciting packets a peer may receive before it acknowledges at once (1..=1000;
    /// default 16). See
    /// [`TransportLimits::ack_eliciting_threshold`](crate::tls::TransportLimits::ack_eliciting_threshold).
    pub ack_eliciting_threshold: u32,
    /// Length of the connection IDs this site issues, bytes (1..=20; default 4). See
    /// [`TransportLimits::cid_len`](crate::tls::TransportLimits::cid_len).
    pub cid_len: u8,
    /// Packets acknowledged after a packet before it counts as lost (1..=1000; default 1,
    /// QUIC's own is 3). See
    /// [`TransportLimits::loss_packet_threshold`](crate::tls::TransportLimits::loss_packet_threshold).
    pub loss_packet_threshold: u32,
    /// Thousandths of the round trip after which a packet that a later one overtook counts as
    /// lost (1000..=4000; default 1125). See
    /// [`TransportLimits::loss_time_threshold_permille`](crate::tls::TransportLimits::loss_time_threshold_permille).
    pub loss_time_threshold_permille: u32,
}

impl Default for QuicConfig {
    fn default() -> Self {
        let t = crate::tls::TransportLimits::default();
        Self {
            stream_window: t.stream_window,
            conn_window: t.conn_window,
            max_udp_payload: t.max_udp_payload,
            initial_window: t.initial_window,
            congestion: t.congestion,
            min_window: t.min_window,
            max_ack_delay_ms: t.max_ack_delay.map_or(0, |d| d.as_millis() as u64),
            ack_eliciting_threshold: t.ack_eliciting_threshold,
            cid_len: t.cid_len,
            loss_packet_threshold: t.loss_packet_threshold,
            loss_time_threshold_permille: t.loss_time_threshold_permille,
        }
    }
}

/// Durable storage: write-ahead log and snapshots (`[storage]`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StorageConfig {
    /// When the write-ahead log is fsynced: `always` (default; a write is acknowledged after
    /// its fsync, shared by concurrent writers: nothing acknowledged is ever lost), `batch`
    /// (acknowledged once written, fsynced every `batch_ms`, like Redis's `everysec`: a machine
    /// crash can lose the last `batch_ms` of acknowledged writes) or `never` (acknowledged once
    /// written; a machine crash may lose whatever the OS had not written back). A killed
    /// process loses no acknowledged write under any of them.
    pub fsync: crate::storage::wal::FsyncPolicy,
    /// Under `batch`, the interval between fsyncs in milliseconds: the window of acknowledged
    /// writes a machine crash can lose (plus one fsync's duration).
    pub batch_ms: u64,
    /// Log segment size in bytes.
    pub segment_bytes: u64,
    /// Under `always`, how many fsyncs of the log may run at once (at least 1). More than one
    /// lets the next group start its fsync while the previous one is still running, which pays
    /// off on disks that complete concurrent flushes in parallel.
    pub fsync_threads: u32,
    /// Allocate each log segment's `segment_bytes` on disk when it is created, so that a
    /// commit's `fdatasync` flushes the data without growing the file (default true).
    pub preallocate: bool,
    /// How often to consider a snapshot, in milliseconds.
    pub snapshot_interval_ms: u64,
    /// Take a snapshot (and drop the log segments it covers) once the log holds this many bytes.
    pub snapshot_log_bytes: u64,
}

impl Default for StorageConfig {
    fn default() -> Self {
        let w = crate::storage::wal::WalOptions::default();
        Self {
            fsync: w.fsync,
            batch_ms: w.batch_ms,
            segment_bytes: w.segment_bytes,
            fsync_threads: w.fsync_threads,
            preallocate: w.preallocate,
            snapshot_interval_ms: 10_000,
            snapshot_log_bytes: 256 << 20,
        }
    }
}

impl StorageConfig {
    /// The write-ahead log options.
    pub fn wal(&self) -> crate::storage::wal::WalOptions {
        crate::storage::wal::WalOptions {
            fsync: self.fsync,
            batch_ms: self.batch_ms,
            segment_bytes: self.segment_bytes,
            fsync_threads: self.fsync_threads.max(1),
            preallocate: self.preallocate,
        }
    }
}

/// The RESP listener (`[resp]`): Redis clients over TCP and TLS, each connection a causal
/// session at this site (see [`crate::net::resp`]). Absent: no RESP listener.
///
/// ```toml
/// [resp]
/// addr = "127.0.0.1:6380"
/// ```
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RespConfig {
    /// Where to listen (TCP). Port 0 picks a free port ([`crate::Node::resp_addr`]).
    pub addr: SocketAddr,
    /// Whether Redis clients must present a certificate signed by the cluster CA, as QUIC
    /// clients must. Default: true; `false` is an explicit opt-out, logged at start-up.
    #[serde(default = "yes")]
    pub require_client_cert: bool,
    /// Most connections served at once; one more is told `ERR max number of clients reached`
    /// and closed. Default 1024.
    #[serde(default = "RespConfig::default_max_connections")]
    pub max_connections: usize,
    /// Largest argument (key or value) a request may carry, in bytes; a larger one is refused
    /// from its length header, before it is read, and the connection closed (as Redis does on
    /// a protocol error). Default 2 MiB. Values are further bounded by `limits.max_value`.
    #[serde(default = "RespConfig::default_max_arg_bytes")]
    pub max_arg_bytes: usize,
    /// Most pipelined requests run from one read; the rest of that read are answered
    /// `ERR pipeline deeper than ...` and not run. Default 1024.
    #[serde(default = "RespConfig::default_max_pipeline")]
    pub max_pipeline: usize,
    /// Largest reply to one request, in bytes (an `MGET` of many large values): past it the
    /// request is answered `ERR reply of more than ...` and the connection stays open.
    /// Default 16 MiB.
    #[serde(default = "RespConfig::default_max_reply_bytes")]
    pub max_reply_bytes: usize,
}

impl RespConfig {
    /// A listener on `addr` with the default limits.
    pub fn new(addr: SocketAddr) -> Self {
        Self {
            addr,
            require_client_cert: true,
            max_connections: Self::default_max_connections(),
            max_arg_bytes: Self::default_max_arg_bytes(),
            max_pipeline: Self::default_max_pipeline(),
            max_reply_bytes: Self::default_max_reply_bytes(),
        }
    }

    fn default_max_connections() -> usize {
        1024
    }

    fn default_max_arg_bytes() -> usize {
        2 << 20
    }

    fn default_max_pipeline() -> usize {
        1024
    }

    fn default_max_reply_bytes() -> usize {
        16 << 20
    }
}

/// Failure detection of peers (`[failure]`): a phi-accrual detector per peer, fed by the
/// heartbeats and acks on its control streams (see [`crate::net::failure`]).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FailureConfig {
    /// Suspicion level from which a peer is reported `suspect`.
    pub phi_suspect: f64,
    /// Suspicion level from which a peer is reported `down`; above `phi_suspect`.
    pub phi_down: f64,
    /// Heartbeat inter-arrival times remembered per peer.
    pub window: usize,
    /// Floor of the inter-arrival standard deviation, in milliseconds: the jitter a perfectly
    /// regular link is still allowed (scheduling pauses, a lost datagram).
    pub min_std_dev_ms: u64,
}

impl Default for FailureConfig {
    fn default() -> Self {
        Self {
            phi_suspect: 5.0,
            phi_down: 10.0,
            window: 200,
            min_std_dev_ms: 100,
        }
    }
}

// Validation refuses NaN, so equality is an equivalence on every accepted configuration.
impl Eq for FailureConfig {}

/// Consensus for the strong operations (`[consensus]`): one Raft group per partition index,
/// whose voters are that partition's node at every site (see [`crate::consensus`]).
///
/// The defaults suit WAN round trips of up to about 300 ms, not a LAN: openraft's own defaults
/// (50 ms heartbeats, 150-300 ms elections) would time out every append over such links and
/// elect continually. In openraft 0.9 an append-entries RPC, heartbeats included, times out
/// after one heartbeat interval, so `heartbeat_ms` must exceed the longest round trip plus a
/// log fsync; the election timeout should be 10-20 round trips.
///
/// Failover: voters of openraft 0.9 refuse every vote while the leader's lease
/// (`election_max_ms` since its last heartbeat) runs, so nothing can replace a crashed leader
/// sooner. The node's failure detector has a follower stand as soon as the lease has run out
/// (plus a jitter of up to `heartbeat_ms`, none at the preferred leader site), so a crashed
/// leader is replaced after about `election_max_ms` + `heartbeat_ms` / 2 + one vote round trip
/// (openraft's own timer, left on as a fallback, would wait the lease plus an election timeout
/// plus, after meeting a longer log, 2 x `election_max_ms`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ConsensusConfig {
    /// Leader heartbeat interval, and the timeout of one append-entries RPC (ms).
    pub heartbeat_ms: u64,
    /// Shortest election timeout (ms): a follower that hears no leader for a random time
    /// between this and `election_max_ms` stands for election.
    pub election_min_ms: u64,
    /// Longest election timeout (ms).
    pub election_max_ms: u64,
    /// Longest a whole snapshot transfer to a lagging site may take (ms).
    pub install_snapshot_timeout_ms: u64,
    /// Most log entries in one append-entries RPC.
    pub max_payload_entries: u64,
    /// Take a snapshot of the strong keyspace every this many applied log entries.
    pub snapshot_every: u64,
    /// Longest one step of bringing a joining site into the group may take at the leader (ms):
    /// its Raft log catching up as a learner, the change to a voter, or its covering its
    /// floor. A step that runs out is logged as a warning with what it waits for, and tried
    /// again at a later tick.
    pub join_step_ms: u64,
    /// The site (by name) that should lead while it is healthy: when it is up to date and not
    /// the leader, it stands for election. Default: none.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub preferred_leader: Option<String>,
}

impl Default for ConsensusConfig {
    fn default() -> Self {
        Self {
            heartbeat_ms: 500,
            election_min_ms: 1_500,
            election_max_ms: 3_000,
            install_snapshot_timeout_ms: 60_000,
            max_payload_entries: 512,
            snapshot_every: 20_000,
            join_step_ms: 30_000,
            preferred_leader: None,
        }
    }
}

/// A site's whole configuration.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SiteConfig {
    /// Cluster id; sites of different clusters refuse each other.
    pub cluster_id: String,
    /// Which entry of `sites` this is.
    pub site_id: SiteId,
    /// Where durable state lives.
    pub data_dir: PathBuf,
    /// Where to serve the admin HTTP endpoints (`GET /metrics` in the Prometheus text format,
    /// `GET /status` as JSON), over plain TCP: bind it to loopback or a management network.
    /// Default: none (no admin server). Port 0 picks a free port ([`crate::Node::admin_addr`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub admin_addr: Option<SocketAddr>,
    /// Partition nodes per site (`1..=64`, default 1): keys map to partitions by
    /// [`crate::sharding::partition_of`]. The same in every node's file.
    #[serde(default = "one", skip_serializing_if = "is_one")]
    pub partitions: u32,
    /// Which partition of its site this node serves (`0..partitions`, default 0).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub partition: u32,
    /// Every site of the cluster.
    pub sites: Vec<SiteEntry>,
    /// Certificates.
    pub tls: TlsConfig,
    /// Size limits.
    #[serde(default)]
    pub limits: Limits,
    /// Timeouts.
    #[serde(default)]
    pub timeouts: Timeouts,
    /// Replication knobs.
    #[serde(default)]
    pub replication: ReplicationConfig,
    /// QUIC transport.
    #[serde(default)]
    pub quic: QuicConfig,
    /// Durable storage.
    #[serde(default)]
    pub storage: StorageConfig,
    /// Failure detection.
    #[serde(default)]
    pub failure: FailureConfig,
    /// The RESP listener, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resp: Option<RespConfig>,
    /// Consensus for the strong operations.
    #[serde(default)]
    pub consensus: ConsensusConfig,
    /// A site added to a running cluster (`causalkv sites add`) names here the site it
    /// joins from: at its first start it fetches a snapshot from that site, then catches up
    /// from every site and is made a Raft voter. Unset for the sites the cluster was
    /// deployed with. Ignored once the data directory records the join.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub join_from: Option<String>,
}

impl SiteConfig {
    /// Reads and validates a TOML file. Relative paths in it are taken relative to the file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let mut cfg: SiteConfig = toml::from_str(&text).map_err(|e| ConfigError::Parse {
            path: path.to_owned(),
            message: e.to_string(),
        })?;
        if let Some(base) = path.parent() {
            for p in [
                &mut cfg.data_dir,
                &mut cfg.tls.ca,
                &mut cfg.tls.cert,
                &mut cfg.tls.key,
            ] {
                if p.is_relative() {
                    *p = base.join(&*p);
                }
            }
        }
        cfg.validate()?;
        Ok(cfg)
    }

    /// The QUIC transport limits this configuration asks for.
    pub fn transport_limits(&self) -> crate::tls::TransportLimits {
        crate::tls::TransportLimits {
            idle_timeout: std::time::Duration::from_millis(self.timeouts.idle_ms),
            keep_alive: std::time::Duration::from_millis(self.timeouts.keep_alive_ms),
            stream_window: self.quic.stream_window,
            conn_window: self.quic.conn_window,
            max_udp_payload: self.quic.max_udp_payload,
            initial_window: self.quic.initial_window,
            congestion: self.quic.congestion,
            min_window: self.quic.min_window,
            max_ack_delay: (self.quic.max_ack_delay_ms > 0)
                .then(|| std::time::Duration::from_millis(self.quic.max_ack_delay_ms)),
            ack_eliciting_threshold: self.quic.ack_eliciting_threshold,
            cid_len: self.quic.cid_len,
            loss_packet_threshold: self.quic.loss_packet_threshold,
            loss_time_threshold_permille: self.quic.loss_time_threshold_permille,
            ..Default::default()
        }
    }

    /// Checks the values are consistent.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.validate_removed(&[])
    }

    /// [`SiteConfig::validate`] for a site list that still holds sites removed from the cluster
    /// (their ids in `removed`): a removed site keeps its id and name for good, but its address
    /// is free again, so another site may listen there.
    pub fn validate_removed(&self, removed: &[u16]) -> Result<(), ConfigError> {
        let bad = |m: String| Err(ConfigError::Invalid(m));
        let n = self.sites.len();
        if !(1..=64).contains(&n) {
            return bad(format!("a cluster has 1 to 64 sites, this one lists {n}"));
        }
        for (i, s) in self.sites.iter().enumerate() {
            if s.id as usize != i {
                return bad(format!(
                    "sites must be listed in id order 0..{n}: entry {i} has id {}",
                    s.id
                ));
            }
            if s.name.is_empty()
                || !s
                    .name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-')
            {
                return bad(format!(
                    "site name {:?} must be non-empty ASCII letters, digits or '-'",
                    s.name
                ));
            }
            if self.sites[..i].iter().any(|o| o.name == s.name) {
                return bad(format!("site name {:?} is listed twice", s.name));
            }
        }
        let parts = self.partitions;
        if !(1..=64).contains(&parts) {
            return bad(format!("partitions must be 1 to 64, not {parts}"));
        }
        if self.partition >= parts {
            return bad(format!(
                "partition {} is not among the {parts} partitions",
                self.partition
            ));
        }
        let mut seen = std::collections::HashSet::new();
        for s in &self.sites {
            for p in 0..parts {
                if s.partition_addrs.is_empty() && u32::from(s.addr.port()) + p > 65535 {
                    return bad(format!(
                        "site {:?}: partition {p} would listen on port {} + {p}, past 65535; \
                         list partition_addrs",
                        s.name,
                        s.addr.port()
                    ));
                }
                if (s.partition_addrs.is_empty() || s.partition_addrs.len() == parts as usize)
                    && !removed.contains(&s.id)
                {
                    let a = s.partition_addr(p);
                    if !seen.insert(a) {
                        return bad(format!(
                            "address {a} (site {:?}, partition {p}) is used by another node",
                            s.name
                        ));
                    }
                }
            }
            if !s.partition_addrs.is_empty()
                && (s.partition_addrs.len() != parts as usize || s.partition_addrs[0] != s.addr)
            {
                return bad(format!(
                    "site {:?}: partition_addrs must list all {parts} partition addresses, the first equal to addr",
                    s.name
                ));
            }
        }
        if self.site_id as usize >= n {
            return bad(format!(
                "site_id {} is not among the {n} listed sites",
                self.site_id
            ));
        }
        if self.cluster_id.is_empty() {
            return bad("cluster_id must not be empty".into());
        }
        if let Some(r) = &self.resp
            && (r.max_connections == 0
                || r.max_pipeline == 0
                || r.max_arg_bytes == 0
                || r.max_reply_bytes == 0)
        {
            return bad(
                "resp.max_connections, resp.max_pipeline, resp.max_arg_bytes and resp.max_reply_bytes must be at least 1"
                    .into(),
            );
        }
        let t = &self.timeouts;
        if t.keep_alive_ms == 0 || t.keep_alive_ms >= t.idle_ms {
            return bad(format!(
                "timeouts.keep_alive_ms ({}) must be above 0 and below timeouts.idle_ms ({})",
                t.keep_alive_ms, t.idle_ms
            ));
        }
        if let Err(e) = self.transport_limits().validate() {
            return bad(format!("[quic]: {e}"));
        }
        if t.heartbeat_ms == 0 {
            return bad("timeouts.heartbeat_ms must be above 0".into());
        }
        let f = &self.failure;
        if !(f.phi_suspect.is_finite() && f.phi_down.is_finite())
            || f.phi_suspect <= 0.0
            || f.phi_down <= f.phi_suspect
        {
            return bad(format!(
                "failure: phi_suspect ({}) must be above 0 and phi_down ({}) above phi_suspect",
                f.phi_suspect, f.phi_down
            ));
        }
        if f.window < 2 || f.min_std_dev_ms == 0 {
            return bad(format!(
                "failure: window ({}) must be at least 2 and min_std_dev_ms ({}) above 0",
                f.window, f.min_std_dev_ms
            ));
        }
        let l = &self.limits;
        // Saturating: two huge limits must not wrap around to a small sum that passes.
        if l.max_key == 0
            || l.max_key.saturating_add(l.max_value).saturating_add(4096) > l.max_frame
        {
            return bad(format!(
                "limits: max_frame ({}) must exceed max_key ({}) + max_value ({}) + 4096",
                l.max_frame, l.max_key, l.max_value
            ));
        }
        let st = &self.storage;
        if st.segment_bytes < 4096 || st.batch_ms == 0 || st.snapshot_interval_ms == 0 {
            return bad(
                "storage: segment_bytes must be >= 4096, batch_ms and snapshot_interval_ms above 0"
                    .into(),
            );
        }
        if !(1..=64).contains(&st.fsync_threads) {
            return bad(format!(
                "storage: fsync_threads must be between 1 and 64, not {}",
                st.fsync_threads
            ));
        }
        let c = &self.consensus;
        if c.heartbeat_ms == 0
            || c.election_min_ms <= c.heartbeat_ms
            || c.election_max_ms <= c.election_min_ms
        {
            return bad(format!(
                "consensus: need 0 < heartbeat_ms ({}) < election_min_ms ({}) < election_max_ms ({})",
                c.heartbeat_ms, c.election_min_ms, c.election_max_ms
            ));
        }
        if c.install_snapshot_timeout_ms == 0
            || c.max_payload_entries == 0
            || c.snapshot_every == 0
            || c.join_step_ms == 0
        {
            return bad(
                "consensus: install_snapshot_timeout_ms, max_payload_entries, snapshot_every and join_step_ms must be above 0"
                    .into(),
            );
        }
        if let Some(p) = &c.preferred_leader
            && !self.sites.iter().any(|s| &s.name == p)
        {
            return bad(format!(
                "consensus.preferred_leader {p:?} is not a listed site"
            ));
        }
        if let Some(j) = &self.join_from
            && (!self.sites.iter().any(|s| &s.name == j) || *j == self.me().name)
        {
            return bad(format!(
                "join_from {j:?} must name another listed site (the one to fetch a snapshot from)"
            ));
        }
        let r = &self.replication;
        if r.batch_max_items == 0
            || r.marker_interval_ms == 0
            || r.stable_exchange_ms == 0
            || r.redundancy_window_ms == 0
        {
            return bad(
                "replication.batch_max_items, marker_interval_ms, stable_exchange_ms and redundancy_window_ms must be above 0"
                    .into(),
            );
        }
        Ok(())
    }

    /// This site's entry.
    pub fn me(&self) -> &SiteEntry {
        &self.sites[self.site_id as usize]
    }

    /// The address this node listens on: its partition's address at its site.
    pub fn listen_addr(&self) -> SocketAddr {
        self.me().partition_addr(self.partition)
    }

    /// The address of `site`'s node for this node's partition: the peer it replicates with.
    pub fn peer_addr(&self, site: SiteId) -> SocketAddr {
        self.sites[site as usize].partition_addr(self.partition)
    }

    /// Number of sites.
    pub fn n(&self) -> usize {
        self.sites.len()
    }

    /// The other sites.
    pub fn peers(&self) -> impl Iterator<Item = &SiteEntry> {
        self.sites.iter().filter(move |s| s.id != self.site_id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
cluster_id = "t"
site_id = 1
data_dir = "d"
[[sites]]
id = 0
name = "a"
addr = "127.0.0.1:1"
[[sites]]
id = 1
name = "b"
addr = "127.0.0.1:2"
[tls]
ca = "ca.pem"
cert = "b.pem"
key = "b.key"
"#;

    fn load(text: &str) -> Result<SiteConfig, ConfigError> {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("site.toml");
        std::fs::write(&p, text).unwrap();
        SiteConfig::load(&p)
    }

    #[test]
    fn loads_with_defaults_and_resolves_paths() {
        let c = load(GOOD).unwrap();
        assert_eq!(c.me().name, "b");
        assert!(c.tls.require_client_cert);
        assert!(c.tls.ca.is_absolute());
        assert_eq!(c.limits, Limits::default());
        assert_eq!(c.failure, FailureConfig::default());
        assert_eq!(c.admin_addr, None);
    }

    #[test]
    fn failure_detection_and_admin_settings_load_and_are_checked() {
        let c = load(&format!(
            "admin_addr = \"127.0.0.1:9100\"\n{GOOD}\n[failure]\nphi_suspect = 3\nphi_down = 8.5\n"
        ))
        .unwrap();
        assert_eq!(c.admin_addr, Some("127.0.0.1:9100".parse().unwrap()));
        assert_eq!((c.failure.phi_suspect, c.failure.phi_down), (3.0, 8.5));
        assert_eq!(c.failure.window, FailureConfig::default().window);
        // A round trip through TOML keeps everything.
        let text = toml::to_string_pretty(&c).unwrap();
        assert_eq!(toml::from_str::<SiteConfig>(&text).unwrap(), c);
        let e = load(&format!("{GOOD}\n[failure]\nphi_suspect = 12\n")).unwrap_err();
        assert!(e.to_string().contains("phi_down"), "{e}");
        let e = load(&format!("{GOOD}\n[failure]\nphi_suspect = nan\n")).unwrap_err();
        assert!(e.to_string().contains("phi_suspect"), "{e}");
        let e = load(&format!("{GOOD}\n[failure]\nwindow = 1\n")).unwrap_err();
        assert!(e.to_string().contains("window"), "{e}");
        let e = load(&format!("{GOOD}\n[failure]\nphi_threshold = 8\n")).unwrap_err();
        assert!(e.to_string().contains("phi_threshold"), "{e}");
    }

    #[test]
    fn consensus_settings_default_to_wan_values_and_are_checked() {
        let c = load(GOOD).unwrap();
        assert_eq!(c.consensus, ConsensusConfig::default());
        assert!(c.consensus.heartbeat_ms >= 300, "a WAN-safe heartbeat");
        let c = load(&format!(
            "{GOOD}\n[consensus]\nheartbeat_ms = 200\nelection_min_ms = 1000\nelection_max_ms = 2000\npreferred_leader = \"a\"\n"
        ))
        .unwrap();
        assert_eq!(c.consensus.preferred_leader.as_deref(), Some("a"));
        assert_eq!(c.consensus.heartbeat_ms, 200);
        let text = toml::to_string_pretty(&c).unwrap();
        assert_eq!(toml::from_str::<SiteConfig>(&text).unwrap(), c);
        let e = load(&format!("{GOOD}\n[consensus]\nelection_min_ms = 100\n")).unwrap_err();
        assert!(e.to_string().contains("election_min_ms"), "{e}");
        let e = load(&format!("{GOOD}\n[consensus]\npreferred_leader = \"zz\"\n")).unwrap_err();
        assert!(e.to_string().contains("preferred_leader"), "{e}");
        let e = load(&format!("{GOOD}\n[consensus]\njoin_step_ms = 0\n")).unwrap_err();
        assert!(e.to_string().contains("join_step_ms"), "{e}");
        let c = load(&format!("{GOOD}\n[consensus]\njoin_step_ms = 5000\n")).unwrap();
        assert_eq!(c.consensus.join_step_ms, 5_000);
    }

    #[test]
    fn limits_too_large_to_add_up_are_refused() {
        let e = load(&format!(
            "{GOOD}\n[limits]\nmax_key = 9223372036854775807\nmax_value = 9223372036854775807\n"
        ))
        .unwrap_err();
        assert!(e.to_string().contains("max_frame"), "{e}");
    }

    #[test]
    fn typos_and_inconsistencies_are_refused_with_a_clear_message() {
        let e = load(&GOOD.replace("site_id = 1", "site_idd = 1")).unwrap_err();
        assert!(e.to_string().contains("site_idd"), "{e}");
        let e = load(&GOOD.replace("site_id = 1", "site_id = 5")).unwrap_err();
        assert!(e.to_string().contains("site_id 5"), "{e}");
        let e = load(&format!("{GOOD}\n[timeouts]\nkeep_alive_ms = 20000\n")).unwrap_err();
        assert!(e.to_string().contains("keep_alive_ms"), "{e}");
        let e = load(&format!("{GOOD}\n[quic]\nmax_udp_payload = 1000\n")).unwrap_err();
        assert!(e.to_string().contains("max_udp_payload"), "{e}");
        let e = load(&format!("{GOOD}\n[quic]\nmax_ack_delay_ms = 5000\n")).unwrap_err();
        assert!(e.to_string().contains("max_ack_delay"), "{e}");
        let e = load(&format!("{GOOD}\n[quic]\ncid_len = 0\n")).unwrap_err();
        assert!(e.to_string().contains("cid_len"), "{e}");
        let e = load(&format!(
            "{GOOD}\n[quic]\nloss_time_threshold_permille = 900\n"
        ))
        .unwrap_err();
        assert!(e.to_string().contains("loss_time_threshold"), "{e}");
        let e = load(&format!("{GOOD}\n[quic]\nack_eliciting_threshold = 0\n")).unwrap_err();
        assert!(e.to_string().contains("ack_eliciting_threshold"), "{e}");
        let e = load(&format!(
            "{GOOD}\n[quic]\nstream_window = 1\nconn_window = 0\n"
        ))
        .unwrap_err();
        assert!(e.to_string().contains("stream_window"), "{e}");
        let ok = load(&format!("{GOOD}\n[quic]\nmax_udp_payload = 1452\n")).expect("valid");
        assert_eq!(ok.transport_limits().max_udp_payload, 1452);
        let e = load(&GOOD.replace("name = \"b\"", "name = \"a\"")).unwrap_err();
        assert!(e.to_string().contains("twice"), "{e}");
        let e = load(&format!(
            "{GOOD}\n[replication]\nredundancy = \"sometimes\"\n"
        ))
        .unwrap_err();
        assert!(e.to_string().contains("unknown variant `sometimes`"), "{e}");
        let e = load(&format!(
            "{GOOD}\n[replication]\nredundancy_window_ms = 0\n"
        ))
        .unwrap_err();
        assert!(e.to_string().contains("redundancy_window_ms"), "{e}");
        let ok = load(&format!("{GOOD}\n[replication]\nredundancy = \"always\"\n")).expect("valid");
        assert_eq!(ok.replication.redundancy, Redundancy::Always);
        let e = load(&format!("{GOOD}\n[storage]\nfsync_threads = 0\n")).unwrap_err();
        assert!(e.to_string().contains("fsync_threads"), "{e}");
        let ok = load(&format!("{GOOD}\n[storage]\nfsync_threads = 4\n")).expect("valid");
        assert_eq!(ok.storage.wal().fsync_threads, 4);
        assert!(
            ok.storage.wal().preallocate,
            "segments are preallocated by default"
        );
        let ok = load(&format!("{GOOD}\n[storage]\npreallocate = false\n")).expect("valid");
        assert!(!ok.storage.wal().preallocate);
    }

    #[test]
    fn resp_table_loads_with_defaults_and_is_checked() {
        assert_eq!(load(GOOD).unwrap().resp, None);
        let c = load(&format!("{GOOD}\n[resp]\naddr = \"127.0.0.1:6380\"\n")).unwrap();
        assert_eq!(
            c.resp,
            Some(RespConfig::new("127.0.0.1:6380".parse().unwrap()))
        );
        let text = toml::to_string_pretty(&c).unwrap();
        assert_eq!(toml::from_str::<SiteConfig>(&text).unwrap(), c);
        let c = load(&format!(
            "{GOOD}\n[resp]\naddr = \"127.0.0.1:0\"\nrequire_client_cert = false\nmax_pipeline = 8\n"
        ))
        .unwrap();
        let r = c.resp.unwrap();
        assert!(!r.require_client_cert);
        assert_eq!((r.max_pipeline, r.max_connections), (8, 1024));
        assert_eq!(r.max_reply_bytes, 16 << 20);
        let e = load(&format!(
            "{GOOD}\n[resp]\naddr = \"127.0.0.1:0\"\nmax_connections = 0\n"
        ))
        .unwrap_err();
        assert!(e.to_string().contains("resp.max_connections"), "{e}");
        let e = load(&format!(
            "{GOOD}\n[resp]\naddr = \"127.0.0.1:0\"\nmax_args = 3\n"
        ))
        .unwrap_err();
        assert!(e.to_string().contains("max_args"), "{e}");
    }
}
