//! Raft RPCs and replies (postcard) inside frames (`consensus::decode`).
//! The harness is `causalkv::fuzzing::raft_rpc`, which the regression test replays too.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| causalkv::fuzzing::raft_rpc(data));
