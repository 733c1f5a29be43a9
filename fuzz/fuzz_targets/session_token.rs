//! Session tokens (`client::decode_session_token`).
//! The harness is `causalkv::fuzzing::session_token`, which the regression test replays too.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| causalkv::fuzzing::session_token(data));
