//! The tokio + quinn driver around the sans-IO replica.
//!
//! - [`tls`]: the one TLS setup (mutual TLS with the cluster CA, ALPNs, transport limits).
//! - [`node`]: a running site: endpoint, tasks, shared state, graceful shutdown.
//! - [`peer`]: links between sites (hello, update streams, acks and heartbeats).
//! - [`failure`]: the phi-accrual failure detector (sans-IO) that turns heartbeat arrivals into
//!   peer states.
//! - [`service`]: the client request service.
//! - `socket`: the site's UDP socket, and an event for its closing (a restart waits for it).
//! - [`metrics`]: per-operation request counts and latency histograms.
//! - [`admin`]: the admin HTTP endpoints (`GET /metrics` in the Prometheus text format,
//!   `GET /status`).
pub mod admin;
pub mod failure;
pub mod metrics;
pub mod node;
pub mod peer;
pub(crate) mod service;
pub(crate) mod socket;
pub mod tls;

pub use node::{Metrics, Node, NodeError, NodeOptions};
