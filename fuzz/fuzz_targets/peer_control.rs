//! Peer control messages: hello, ack, reject (`peer_wire::PeerControl`).
//! The harness is `causalkv::fuzzing::peer_control`, which the regression test replays too.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| causalkv::fuzzing::peer_control(data));
