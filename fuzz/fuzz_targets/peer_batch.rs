//! Update batches on an origin's stream (`peer_wire::decode_batch`).
//! The harness is `causalkv::fuzzing::peer_batch`, which the regression test replays too.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| causalkv::fuzzing::peer_batch(data));
