//! Fuzzes what a Redis client can make a site parse: RESP requests (arrays of bulk strings and
//! inline lines, in arbitrary pieces), the commands they name, and RESP3 replies. Any panic,
//! and any argument past the limits, is a bug; errors are the expected outcome for most inputs.
#![no_main]

use bytes::BytesMut;
use causalkv::resp::{Limits, command, parse_command, parser::parse_frame};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let limits = Limits {
        max_arg_bytes: 256,
        max_args: 16,
        max_inline: 128,
        max_request_bytes: 1024,
    };
    // The first byte picks a chunk size, as if the rest arrived in reads of that size.
    let Some((&chunk, rest)) = data.split_first() else {
        return;
    };
    let chunk = usize::from(chunk).max(1);
    let mut buf = BytesMut::new();
    'reads: for piece in rest.chunks(chunk) {
        buf.extend_from_slice(piece);
        loop {
            match parse_command(&mut buf, &limits) {
                Ok(Some(args)) => {
                    assert!(!args.is_empty() && args.len() <= limits.max_args);
                    assert!(args.iter().all(|a| a.len() <= limits.max_request_bytes));
                    let _ = command::parse(&args);
                }
                Ok(None) => break,
                Err(_) => break 'reads,
            }
        }
    }
    let _ = parse_frame(rest, &limits);
});
