//! # causalkv
//!
//! A geo-replicated key-value store with causal+ consistency. Every site accepts reads and writes
//! at local latency and keeps serving when cut off; updates travel between sites over QUIC with
//! mutual TLS, each tagged with a vector clock of its causal dependencies, and a receiver buffers an
//! update until everything it depends on is applied locally.
//!
//! # Layout
//!
//! - [`client`]: the async client library with causal sessions and failover.
//! - [`clock`]: hybrid logical clock, [`Version`](clock::Version) and [`VClock`](clock::VClock).
//! - [`config`]: the site configuration file (TOML).
//! - [`dev`]: lays out a local multi-site deployment (`causalkv dev`, tests, scripts).
//! - [`replica`]: the sans-IO replication core (no tokio, no sockets, no wall clock): local
//!   reads and writes under a causal context, the dependency buffer, LWW apply, markers, acks,
//!   retention and tombstone collection. Side effects come back as values.
//! - [`sharding`]: which partition node of a site holds a key (the hash clients route by).
//! - [`storage`]: the live key/value state behind a small [`Store`](storage::Store) trait
//!   (a `DashMap` today).
//! - [`checker`]: a causal-consistency checker over recorded histories, used by the
//!   simulation and by end-to-end suites.
//! - [`bench`]: load generation and replication measurements for the benchmark scripts.
//! - [`certs`]: development CA and certificate tooling (`causalkv certs init`).
//! - [`wire`]: rkyv messages, the one framing function, validation and limits.
//! - [`net`]: the tokio + quinn driver: TLS setup, peer links, the client service.
//! - [`wan`]: user-space WAN emulation (delaying UDP/TCP relay mesh) for the benchmarks.
#![warn(missing_docs)]

pub mod bench;
pub mod certs;
pub mod checker;
pub mod client;
pub mod clock;
pub mod config;
pub mod dev;
pub mod net;
pub mod replica;
pub mod sharding;
pub mod storage;
pub mod wan;
pub mod wire;

pub use client::{Client, ClientError};
pub use config::SiteConfig;
pub use net::Node;

/// The README's examples, compiled and run as doctests.
#[doc = include_str!("../README.md")]
#[cfg(doctest)]
pub struct ReadmeDoctests;
