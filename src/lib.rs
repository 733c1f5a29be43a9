//! # causalkv
//!
//! A geo-replicated key-value store with causal+ consistency. Every site accepts reads and writes
//! at local latency and keeps serving when cut off; updates travel between sites over QUIC with
//! mutual TLS, each tagged with a vector clock of its causal dependencies, and a receiver buffers an
//! update until everything it depends on is applied locally.
//!
//! This crate is the server. The client library is its own crate, `causalkv-client`, which this
//! one builds on and re-exports ([`client`], [`clock`], [`wire`], [`tls`], [`names`],
//! [`sharding`]): an application that only talks to causalkv depends on that crate alone.
//!
//! # Layout
//!
//! From the top down; each module imports only modules below it, and the graph has no cycles:
//!
//! - `tools` (feature `tools`, on by default): what the `causalkv` binary, the tests and the
//!   benchmark scripts use beside the server: the dev-cluster builder, the benchmark driver,
//!   the WAN emulator, the causal-consistency checker and the certificate tooling.
//! - `fuzzing` (hidden): the entry points of the `cargo fuzz` targets in `fuzz/`, one per
//!   decoder of outside input (frames, peer and client messages, session tokens, site configs,
//!   Raft RPCs, RESP), and the replay of the inputs checked in under `fuzz/regressions/`.
//! - [`net`]: the tokio + quinn driver: a running [`Node`], peer links, the client service,
//!   admin endpoints, the durability and snapshot tasks.
//! - [`consensus`]: the Raft groups of the strong operations (openraft): types, the durable
//!   Raft log, the state machine holding the strong keyspace, the RPC messages, and the
//!   cluster configuration (epoch and sites) replicated in partition index 0's group.
//! - [`config`]: the site configuration file (TOML).
//! - [`resp`]: the Redis protocol (RESP2 and RESP3), sans-IO: request parsing with limits,
//!   reply encoding, commands. The RESP listener in [`net`] drives it.
//! - [`peer_wire`]: the peer protocol's messages (hello, acks, update batches).
//! - [`replica`]: the sans-IO replication core (no tokio, no sockets, no wall clock): local
//!   reads and writes under a causal context, the dependency buffer, LWW apply, markers, acks,
//!   retention and tombstone collection. Side effects come back as values.
//! - [`storage`]: the live key/value state behind a small [`Store`](storage::Store) trait
//!   (a `DashMap`), the write-ahead log and snapshots.
//! - [`histogram`]: a lock-free latency histogram (Prometheus buckets), recorded by the
//!   request path and the write-ahead log.
//! - [`update`]: the values replicated and logged ([`Update`](update::Update),
//!   [`Item`](update::Item), [`Record`](update::Record)).
//! - From `causalkv-client`: [`client`], [`tls`], [`names`], [`wire`], [`sharding`], [`clock`].
#![warn(missing_docs)]

pub mod config;
pub mod consensus;
#[doc(hidden)]
pub mod fuzzing;
pub mod histogram;
pub mod net;
pub mod peer_wire;
pub mod replica;
pub mod resp;
pub mod storage;
#[cfg(feature = "tools")]
pub mod tools;
pub mod update;

pub use causalkv_client::{Client, ClientError};
pub use causalkv_client::{client, clock, names, sharding, tls, wire};
pub use config::SiteConfig;
pub use net::Node;

/// The README's examples, compiled and run as doctests.
#[cfg(all(doctest, feature = "tools"))]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
