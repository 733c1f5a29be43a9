//! The tokio + quinn driver around the sans-IO replica.
//!
//! Files, from the top down (each imports only what is below it):
//!
//! - [`node`]: a running site: endpoint, accept loop, start and graceful shutdown.
//! - [`admin`]: the admin HTTP endpoints (`GET /metrics` in the Prometheus text format,
//!   `GET /status`, `POST /reload`).
//! - [`resp`]: the RESP listener: Redis clients over TLS, each connection a causal session.
//! - [`peer`]: links between sites (hello, update streams, acks and heartbeats).
//! - `join`: a joining site's snapshot: served by a site on a connection of its own, fetched
//!   by the joining site before it starts.
//! - `service`: the client request service.
//! - `membership`: removing sites from a running cluster (decommission, dead-site removal with
//!   its cut and relay, the `Lost` refusal).
//! - `strong`: the strong operations: this node's Raft voter, its RPCs over the peer links,
//!   forwarding to the leader.
//! - `tasks`: the ticker, the durability pump and the snapshotter.
//! - `status`: the site's status view.
//! - `recovery`: start-up recovery from snapshot and log.
//! - [`reload`]: reloading the TLS credentials without downtime (SIGHUP, `POST /reload`).
//! - [`credentials`]: the TLS credentials in force, as loaded from their files.
//! - `shared`: the state a node's tasks share and `Shared::mutate`, the one place replica state
//!   changes.
//! - `durability`: the write-ahead log as the node drives it (append in apply order, durable
//!   state advances with fsyncs).
//! - `peer_state`: what the node knows of each peer.
//! - [`metrics`]: counters, per-operation request counts and latency histograms.
//! - [`failure`]: the phi-accrual failure detector (sans-IO) that turns heartbeat arrivals into
//!   peer states.
//! - `socket`: the site's UDP socket, and an event for its closing (a restart waits for it).
//! - [`error`]: why a node could not start.
//!
//! The TLS setup is the client library's ([`crate::tls`]): one setup for peers and clients.
pub mod admin;
pub mod credentials;
pub(crate) mod durability;
pub mod error;
pub mod failure;
pub(crate) mod join;
pub(crate) mod membership;
pub mod metrics;
pub mod node;
pub mod peer;
pub(crate) mod peer_state;
pub(crate) mod recovery;
pub mod reload;
pub mod resp;
pub(crate) mod service;
pub(crate) mod shared;
pub(crate) mod socket;
pub(crate) mod status;
pub mod strong;
pub(crate) mod tasks;

pub use credentials::{LoadedCert, ReloadError};
pub use error::NodeError;
pub use metrics::Metrics;
pub use node::{HOLD_FLOOR_FILE, HOLD_SITES_FILE, Node, NodeOptions};
pub use strong::{StrongMetrics, StrongOptions};
