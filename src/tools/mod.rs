//! Tooling beside the server (feature `tools`): what the `causalkv` binary, the tests and the
//! benchmark scripts use. None of it is needed to embed a site or to use the client.
//!
//! - [`dev`]: lays out a local multi-site deployment (`causalkv dev`, tests, scripts).
//! - [`bench`]: load generation and replication measurements for the benchmark scripts.
//! - [`wan`]: user-space WAN emulation (a delaying UDP/TCP relay mesh) for the benchmarks.
//! - [`checker`]: a causal-consistency checker over recorded histories, used by the simulation
//!   and by the end-to-end suites.
//! - [`checked`]: a workload over running sites whose history the checker judges
//!   (`causalkv bench checked`).
//! - [`lincheck`]: a linearizability checker (Wing–Gong search, per key, with unknown outcomes)
//!   over recorded histories of strong operations.
//! - [`certs`]: development CA and certificate tooling (`causalkv certs init`).
pub mod bench;
pub mod certs;
pub mod checked;
pub mod checker;
pub mod dev;
pub mod lincheck;
pub mod wan;
