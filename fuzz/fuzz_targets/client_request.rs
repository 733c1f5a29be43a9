//! Client requests as the service reads them, and responses as the client reads them.
//! The harness is `causalkv::fuzzing::client_request`, which the regression test replays too.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| causalkv::fuzzing::client_request(data));
