//! The end-to-end suites, on real QUIC and TCP sockets, real TLS certificates, real files and
//! real processes: one test binary whose modules are the suites (one compile of the shared async
//! and TLS code instead of one per suite). Run one suite with its module name as the filter,
//! e.g. `cargo test --release --test e2e -- faults::`.
//!
//! - [`client`]: the client library, the CLI and the RESP listener with clients we did not write;
//! - [`durability`]: the write-ahead log, fsync policies and `kill -9`;
//! - [`faults`]: partitions, kills, loss and planted bugs, judged by the causal checker;
//! - [`membership`]: adding, decommissioning and removing dead sites;
//! - [`strong`]: linearizable operations through Raft;
//! - [`transport`]: QUIC, mutual TLS, framing and bad input.

#[path = "common/mod.rs"]
mod common;

#[path = "client.rs"]
mod client;
#[path = "durability.rs"]
mod durability;
#[path = "faults.rs"]
mod faults;
#[path = "membership.rs"]
mod membership;
#[path = "strong.rs"]
mod strong;
#[path = "transport.rs"]
mod transport;
