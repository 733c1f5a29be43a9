//! Fuzzing entry points: one function per `cargo fuzz` target in `fuzz/`, each feeding arbitrary
//! bytes to a decoder that takes outside input, then checking what it accepted. A panic is a
//! bug; an error is the expected outcome for almost every input.
//!
//! The targets in `fuzz/fuzz_targets/` call these functions, and so does the regression test
//! below, which replays every input checked in under `fuzz/regressions/<target>/`: a crash the
//! fuzzer finds is fixed and its input kept there, so the normal test suite guards it.
//!
//! The harnesses allocate nothing per input beyond what the decoder itself does: frames are read
//! by polling [`read_frame`] once with a no-op waker (reading from memory never waits), not
//! inside a runtime, and rkyv payloads are copied into one 16-byte aligned buffer reused by the
//! thread.

use std::cell::RefCell;
use std::future::Future;
use std::pin::pin;
use std::task::{Context, Poll, Waker};

use bytes::Bytes;
use rkyv::util::AlignedVec;

use crate::client::{decode_session_token, encode_session_token};
use crate::config::SiteConfig;
use crate::consensus::{self, Rpc, RpcReply};
use crate::peer_wire::{self, ArchivedPeerControl, PeerControl};
use crate::resp;
use crate::wire::{self, ArchivedRequest, Limits, Request, Response, read_frame};

/// A target: its name (the binary in `fuzz/`, the folder under `fuzz/regressions/`) and its
/// entry point.
pub type Target = (&'static str, fn(&[u8]));

/// Every target.
pub const TARGETS: &[Target] = &[
    ("decode_frame", decode_frame),
    ("peer_batch", peer_batch),
    ("peer_control", peer_control),
    ("client_request", client_request),
    ("session_token", session_token),
    ("site_config", site_config),
    ("raft_rpc", raft_rpc),
    ("resp", resp),
];

/// The largest frame the harnesses read: as large as a peer's control stream allows, so that the
/// length check and both of its outcomes are reached without zeroing megabytes per input.
const MAX_FRAME: usize = 64 * 1024;

/// Runs a future that never waits (it reads from memory) to completion without a runtime.
fn ready<F: Future>(f: F) -> F::Output {
    let mut f = pin!(f);
    match f.as_mut().poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(v) => v,
        Poll::Pending => unreachable!("reading from memory never waits"),
    }
}

/// Splits `data` into the frames [`read_frame`] finds in it, until the first error or the end.
fn frames(data: &[u8], mut each: impl FnMut(&Bytes)) {
    let mut input = data;
    while let Ok(Some(frame)) = ready(read_frame(&mut input, MAX_FRAME)) {
        each(&frame);
    }
}

/// `data` in a 16-byte aligned buffer (as a frame is after [`read_frame`]), reused per thread.
fn aligned(data: &[u8], each: impl FnOnce(&[u8])) {
    thread_local! {
        static BUF: RefCell<AlignedVec<16>> = RefCell::new(AlignedVec::new());
    }
    BUF.with_borrow_mut(|buf| {
        buf.clear();
        buf.extend_from_slice(data);
        each(buf);
    });
}

/// Frames, then the message types a peer or client sends in one: update batches, peer control
/// messages, client requests, and (for the client side) responses. The first byte picks which
/// one every frame is read as (the other targets take each type apart on its own): a malformed
/// archive costs its decoder an error message, and four of them per frame would be most of the
/// time this target spends.
pub fn decode_frame(data: &[u8]) {
    let Some((&pick, rest)) = data.split_first() else {
        return;
    };
    let limits = Limits::default();
    frames(rest, |frame| match pick % 4 {
        0 => drop(peer_wire::decode_batch(
            frame,
            &mut Default::default(),
            1,
            3,
            &limits,
        )),
        1 => drop(wire::decode::<PeerControl>(frame)),
        2 => drop(wire::access::<ArchivedRequest>(frame)),
        _ => drop(wire::decode::<Response>(frame)),
    });
}

/// An update batch as an origin's stream carries it, and the same bytes as a datagram copy of
/// one ([`peer_wire::decode_copy`]). The first byte picks the cluster size (1 to 64 sites) and
/// the expected origin; whatever the decoders accept must hold what they promise, and encode
/// back to the same items.
pub fn peer_batch(data: &[u8]) {
    let Some((&pick, rest)) = data.split_first() else {
        return;
    };
    let sites = usize::from(pick % 64) + 1;
    let origin = u16::from(pick >> 6) % sites as u16;
    let limits = Limits {
        max_key: 64,
        max_value: 256,
        ..Limits::default()
    };
    let frame = Bytes::from_owner({
        let mut v = AlignedVec::<16>::with_capacity(rest.len());
        v.extend_from_slice(rest);
        v
    });
    let check = |items: &[crate::update::Item], mut last: u64| {
        for item in items {
            let ts = match item {
                crate::update::Item::Marker(ts) => *ts,
                crate::update::Item::Update(u) => {
                    assert_eq!(u.version.site, origin);
                    assert!(u.deps.len() <= sites);
                    assert!(!u.key.is_empty() && u.key.len() <= limits.max_key);
                    assert!(u.value.as_ref().is_none_or(|v| v.len() <= limits.max_value));
                    u.version.ts
                }
            };
            assert!(ts > last, "timestamps increase along a batch");
            last = ts;
        }
        Bytes::from_owner(peer_wire::encode_batch(&Default::default(), items))
    };
    if let Ok(items) =
        peer_wire::decode_batch(&frame, &mut Default::default(), origin, sites, &limits)
    {
        let again = check(&items, 0);
        let back = peer_wire::decode_batch(&again, &mut Default::default(), origin, sites, &limits)
            .expect("re-encoded batch");
        assert_eq!(back, items);
    }
    if let Ok((prev, items)) = peer_wire::decode_copy(&frame, origin, sites, &limits) {
        let again = Bytes::from(peer_wire::encode_copy(prev, &check(&items, prev)));
        let back = peer_wire::decode_copy(&again, origin, sites, &limits).expect("re-encoded copy");
        assert_eq!(back, (prev, items));
    }
}

/// A peer control stream's messages: the first byte picks the reading. Even: a hello or reject
/// (rkyv), with the applied vector's length check, which must encode back to itself. Odd: a
/// packed ack or contribution ([`peer_wire::decode_ack`]), read whole and as a delta against a
/// previous one;
/// whatever it accepts must encode back to the same vector.
pub fn peer_control(data: &[u8]) {
    let Some((&pick, rest)) = data.split_first() else {
        return;
    };
    if pick % 2 == 1 {
        let prev: &[u64] = &[1 << 40, 7, 0];
        for prev in [None, Some(prev)] {
            if let Ok(a) = peer_wire::decode_ack(prev, rest) {
                let _ = wire::check_vector(&a.v, 3, "ack vector");
                let again = peer_wire::encode_contribution(prev, &a.v, a.waiting, a.write);
                assert_eq!(peer_wire::decode_ack(prev, &again).expect("re-encoded"), a);
            }
        }
        return;
    }
    aligned(rest, |frame| {
        let Ok(msg) = wire::decode::<PeerControl>(frame) else {
            return;
        };
        if let PeerControl::Hello(h) = &msg {
            let _ = wire::check_vector(&h.applied, usize::from(h.sites), "hello");
        }
        if let Err(e) = wire::access::<ArchivedPeerControl>(frame) {
            panic!("decodes but does not validate: {e}");
        }
        let again = wire::encode(&msg);
        assert_eq!(
            wire::decode::<PeerControl>(&again).expect("re-encoded"),
            msg
        );
    });
}

/// A client request as the service reads it (the archived view, then the context and size
/// checks), decoded in full when it validates; or (first byte odd) a response, as the client
/// library reads it.
pub fn client_request(data: &[u8]) {
    let Some((&pick, rest)) = data.split_first() else {
        return;
    };
    let limits = Limits::default();
    aligned(rest, |frame| {
        if pick % 2 == 1 {
            let _ = wire::decode::<Response>(frame);
            return;
        }
        let Ok(req) = wire::access::<ArchivedRequest>(frame) else {
            return;
        };
        let ctx: Vec<u64> = req.ctx.iter().map(|x| x.to_native()).collect();
        let _ = wire::check_vector(&ctx, 3, "causal context");
        if let wire::ArchivedClientOp::Put { key, value, .. } = &req.op {
            let _ = wire::check_sizes(key.len(), value.len(), &limits);
        }
        let req = wire::decode::<Request>(frame).expect("validated request deserialises");
        let again = wire::encode(&req);
        assert_eq!(wire::decode::<Request>(&again).expect("re-encoded"), req);
    });
}

/// A session token (`CAUSAL.TOKEN`, `Client::set_session_token`): what decodes has at most 64
/// entries and survives a round trip.
pub fn session_token(data: &[u8]) {
    let Ok(token) = std::str::from_utf8(data) else {
        return;
    };
    if let Some(ctx) = decode_session_token(token) {
        assert!(ctx.len() <= 64);
        assert_eq!(decode_session_token(&encode_session_token(&ctx)), Some(ctx));
    }
}

/// A site configuration file: TOML into [`SiteConfig`], then its validation; a configuration
/// that validates must answer every question the node asks of it at start.
pub fn site_config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(cfg) = toml::from_str::<SiteConfig>(text) else {
        return;
    };
    if cfg.validate().is_err() {
        return;
    }
    let _ = cfg.me();
    let _ = cfg.listen_addr();
    let _ = cfg.storage.wal();
    let _ = cfg.transport_limits();
    for site in &cfg.sites {
        let _ = cfg.peer_addr(site.id);
        for p in 0..cfg.partitions {
            let _ = site.partition_addr(p);
        }
    }
    let _ = consensus::raft_config(&cfg.consensus, &cfg.cluster_id, cfg.partition).validate();
}

/// Raft RPCs and their replies (postcard) inside frames, as the consensus streams carry them:
/// whatever decodes encodes again.
pub fn raft_rpc(data: &[u8]) {
    frames(data, |frame| {
        if let Ok(rpc) = consensus::decode::<Rpc>(frame) {
            let again = consensus::encode(&rpc);
            consensus::decode::<Rpc>(&again).expect("re-encoded rpc");
        }
        if let Ok(reply) = consensus::decode::<RpcReply>(frame) {
            let again = consensus::encode(&reply);
            consensus::decode::<RpcReply>(&again).expect("re-encoded reply");
        }
    });
}

/// What a Redis client can make a site parse: RESP requests (arrays of bulk strings and inline
/// lines, arriving in reads of a size the first byte picks), the commands they name, and RESP3
/// values. Any argument past the limits is a bug, and so is a request sequence that differs
/// from the one the same bytes give when they arrive in one read (the parser resumes a partial
/// request where it stopped).
pub fn resp(data: &[u8]) {
    let limits = resp::Limits {
        max_arg_bytes: 256,
        max_args: 16,
        max_inline: 128,
        max_request_bytes: 1024,
    };
    let Some((&chunk, rest)) = data.split_first() else {
        return;
    };
    let chunk = usize::from(chunk).max(1);
    // What a parser takes off `reads`, up to its first error.
    let requests = |reads: &mut dyn Iterator<Item = &[u8]>| {
        let mut parser = resp::RequestParser::new(limits);
        let mut buf = bytes::BytesMut::new();
        let mut got = Vec::new();
        for piece in reads {
            buf.extend_from_slice(piece);
            loop {
                match parser.next(&mut buf) {
                    Ok(Some(args)) => got.push(Ok(args)),
                    Ok(None) => break,
                    Err(e) => {
                        got.push(Err(e));
                        return got;
                    }
                }
            }
        }
        got
    };
    let split = requests(&mut rest.chunks(chunk));
    for args in split.iter().flatten() {
        assert!(!args.is_empty() && args.len() <= limits.max_args);
        assert!(args.iter().all(|a| a.len() <= limits.max_request_bytes));
        let _ = resp::command::parse(args);
    }
    let whole = requests(&mut std::iter::once(rest));
    assert_eq!(
        split, whole,
        "requests differ when the bytes arrive in pieces"
    );
    let _ = resp::parser::parse_frame(rest, &limits);
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    /// Every input under `fuzz/regressions/<target>/` (crashes found and fixed) and under
    /// `fuzz/seeds/<target>/` (the starting corpus), through its target's entry point.
    #[test]
    fn checked_in_fuzz_inputs_do_not_panic() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
        let mut ran = 0;
        for (name, target) in TARGETS {
            for dir in ["regressions", "seeds"] {
                let Ok(entries) = std::fs::read_dir(root.join(dir).join(name)) else {
                    continue;
                };
                for entry in entries {
                    let path = entry.unwrap().path();
                    let data = std::fs::read(&path).unwrap();
                    let ok = std::panic::catch_unwind(|| target(&data));
                    assert!(ok.is_ok(), "{name}: {} panics", path.display());
                    ran += 1;
                }
            }
        }
        assert!(ran > 0, "no inputs found under {}", root.display());
    }

    /// Writes the starting corpus, `fuzz/seeds/<target>/`: one valid input of each kind a
    /// target reads, so that the fuzzer starts past the structural checks. Run by hand after a
    /// message type changes: `cargo test --release --lib write_fuzz_seeds -- --ignored`.
    #[test]
    #[ignore = "writes into the source tree"]
    fn write_fuzz_seeds() {
        use crate::clock::{VClock, Version};
        use crate::consensus::{Command, Forwarded, WriteOp};
        use crate::peer_wire::PeerHello;
        use crate::update::{Item, Update};
        use crate::wire::ClientOp;

        let framed = |payload: &[u8]| wire::encode_frame(payload).expect("a small frame");
        let update = |ts, key: &str, value: Option<&str>| {
            Item::Update(Update {
                key: Bytes::copy_from_slice(key.as_bytes()),
                value: value.map(|v| Bytes::copy_from_slice(v.as_bytes())),
                version: Version::new(ts, 1),
                deps: VClock::from_vec(vec![3, 0, 0]),
            })
        };
        let batch = peer_wire::encode_batch(
            &Default::default(),
            &[
                update(5, "a", Some("x")),
                update(6, "b", None),
                Item::Marker(9),
            ],
        )
        .to_vec();
        let hello = wire::encode(&PeerControl::Hello(PeerHello {
            cluster: "dev".into(),
            site: 1,
            sites: 3,
            partition: 0,
            partitions: 1,
            applied: vec![1, 2, 3],
        }))
        .to_vec();
        let ack = peer_wire::encode_ack(None, &[4, 5, 6]);
        let ack_delta = peer_wire::encode_contribution(
            Some(&[1 << 40, 7, 0]),
            &[(1 << 40) + 250, 7, 3],
            true,
            Some((1 << 40) + 200),
        );
        let reject = wire::encode(&PeerControl::Reject {
            reason: "no".into(),
        })
        .to_vec();
        let request = |op| {
            wire::encode(&Request {
                timeout_ms: 100,
                ctx: vec![1, 0, 2],
                op,
            })
            .to_vec()
        };
        let put = request(ClientOp::Put {
            key: b"k".to_vec(),
            value: b"v".to_vec(),
            sync: 1,
        });
        let get = request(ClientOp::Get { key: b"k".to_vec() });
        let cas = request(ClientOp::Cas {
            key: b"k".to_vec(),
            expected: None,
            new: Some(b"v".to_vec()),
            client: 1,
            serial: 2,
        });
        let vote = openraft::Vote::new(2, 1);
        let rpcs = [
            consensus::encode(&Rpc::Vote(openraft::raft::VoteRequest::new(vote, None))),
            consensus::encode(&Rpc::Append(openraft::raft::AppendEntriesRequest {
                vote,
                prev_log_id: None,
                entries: vec![],
                leader_commit: None,
            })),
            consensus::encode(&Rpc::Forward {
                op: Forwarded::Write(Command {
                    client: 1,
                    serial: 2,
                    ctx: vec![0, 1, 0],
                    op: WriteOp::Put {
                        key: b"k".to_vec(),
                        value: b"v".to_vec(),
                    },
                }),
                timeout_ms: 1000,
            }),
            consensus::encode(&RpcReply::Malformed("x".into())),
        ];
        let config = concat!(
            "cluster_id = \"dev\"\nsite_id = 0\ndata_dir = \"a\"\n",
            "[[sites]]\nid = 0\nname = \"a\"\naddr = \"127.0.0.1:7100\"\n",
            "[[sites]]\nid = 1\nname = \"b\"\naddr = \"127.0.0.1:7101\"\n",
            "[tls]\nca = \"ca.pem\"\ncert = \"a.pem\"\nkey = \"a.key\"\n",
            "[limits]\nmax_key = 1024\nmax_value = 1048576\nmax_frame = 16777216\n",
            "[storage]\nfsync = \"always\"\nsegment_bytes = 67108864\n",
            "[resp]\naddr = \"127.0.0.1:9100\"\n",
            "[consensus]\nheartbeat_ms = 500\n",
        );
        let seeds: Vec<(&str, Vec<Vec<u8>>)> = vec![
            (
                "decode_frame",
                vec![
                    [&[0u8][..], &framed(&batch), &framed(&batch)].concat(),
                    [&[1u8][..], &framed(&hello), &framed(&reject)].concat(),
                    [&[2u8][..], &framed(&put)].concat(),
                ],
            ),
            (
                "peer_batch",
                vec![
                    [&[66u8][..], &batch].concat(),
                    [&[66u8][..], &peer_wire::encode_copy(4, &batch)].concat(),
                ],
            ),
            (
                "peer_control",
                vec![
                    [&[0u8][..], &hello].concat(),
                    [&[0u8][..], &reject].concat(),
                    [&[1u8][..], &ack].concat(),
                    [&[1u8][..], &ack_delta].concat(),
                ],
            ),
            (
                "client_request",
                vec![put, get, cas]
                    .into_iter()
                    .map(|r| [&[0u8][..], &r].concat())
                    .collect(),
            ),
            (
                "session_token",
                vec![encode_session_token(&VClock::from_vec(vec![1, 0, 7])).into_bytes()],
            ),
            ("site_config", vec![config.as_bytes().to_vec()]),
            ("raft_rpc", rpcs.iter().map(|r| framed(r)).collect()),
            (
                "resp",
                vec![
                    b"\x10*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$1\r\nv\r\n".to_vec(),
                    b"\x03GET k\r\nCAUSAL.TOKEN\r\n".to_vec(),
                ],
            ),
        ];
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/seeds");
        for (name, inputs) in seeds {
            let dir = root.join(name);
            std::fs::create_dir_all(&dir).unwrap();
            for (i, input) in inputs.iter().enumerate() {
                TARGETS.iter().find(|t| t.0 == name).unwrap().1(input);
                std::fs::write(dir.join(format!("seed-{i}")), input).unwrap();
            }
        }
    }
}
