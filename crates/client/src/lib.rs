//! # causalkv-client
//!
//! The client library of causalkv, a geo-replicated key-value store with causal+ consistency:
//! a [`Client`] is a causal session (read-your-writes, monotonic reads and writes, writes follow
//! reads) that fails over between sites, over QUIC with mutual TLS.
//!
//! This crate is everything an application needs and nothing of the server: its dependencies
//! are the transport (quinn, rustls, tokio), the wire format (rkyv) and what they need. The
//! server (`causalkv`) builds on it, so both ends share one wire format, one framing function
//! and one TLS setup.
//!
//! # Layout
//!
//! From the top down; each module imports only modules below it:
//!
//! - [`client`]: the async client with session context, tokens and causal failover.
//! - [`tls`]: the one TLS setup for peers and clients (mutual TLS with the cluster CA, ALPNs,
//!   transport limits).
//! - [`names`]: the certificate naming rules (`site-<name>.causalkv`, file names).
//! - [`wire`]: client messages, the one framing function, validation, limits, and the
//!   protocol's close and error codes.
//! - [`sharding`]: which partition node of a site holds a key.
//! - [`clock`]: hybrid logical clock, [`Version`](clock::Version) and
//!   [`VClock`](clock::VClock).
#![warn(missing_docs)]

pub mod client;
pub mod clock;
pub mod names;
pub mod sharding;
pub mod tls;
pub mod wire;

pub use client::{Client, ClientError};
