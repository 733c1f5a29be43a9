//! Redis clients' requests, their commands, and RESP3 values (`resp`).
//! The harness is `causalkv::fuzzing::resp`, which the regression test replays too.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| causalkv::fuzzing::resp(data));
