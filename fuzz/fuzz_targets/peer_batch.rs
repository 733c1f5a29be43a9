//! Update batches on an origin's stream, and datagram copies of them (`peer_wire::decode_batch`, `peer_wire::decode_copy`).
//! The harness is `causalkv::fuzzing::peer_batch`, which the regression test replays too.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| causalkv::fuzzing::peer_batch(data));
