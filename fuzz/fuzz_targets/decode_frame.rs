//! Fuzzes everything a peer or client can make a site parse: the length-prefixed framing, then
//! each message type's validation (bytecheck) and semantic checks. Any panic is a bug; errors
//! are the expected outcome for almost every input.
#![no_main]

use causalkv::peer_wire::{self, PeerControl};
use causalkv::wire::{self, ArchivedRequest, Limits};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
    let limits = Limits::default();
    let mut input = data;
    while let Ok(Some(frame)) = rt.block_on(wire::read_frame(&mut input, 1 << 20)) {
        let _ = peer_wire::decode_batch(&frame, 1, 3, &limits);
        let _ = wire::decode::<PeerControl>(&frame);
        let _ = wire::access::<ArchivedRequest>(&frame);
    }
});
