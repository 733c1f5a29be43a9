//! Frames (`wire::read_frame`), then every message type a peer or client sends in one.
//! The harness is `causalkv::fuzzing::decode_frame`, which the regression test replays too.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| causalkv::fuzzing::decode_frame(data));
