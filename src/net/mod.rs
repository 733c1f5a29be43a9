//! The tokio + quinn driver around the sans-IO replica.
//!
//! - [`tls`]: the one TLS setup (mutual TLS with the cluster CA, ALPNs, transport limits).
//! - [`node`]: a running site: endpoint, tasks, shared state, graceful shutdown.
//! - [`peer`]: links between sites (hello, update streams, acks and heartbeats).
//! - [`service`]: the client request service.
pub mod node;
pub mod peer;
pub(crate) mod service;
pub mod tls;

pub use node::{Metrics, Node, NodeError, NodeOptions};
