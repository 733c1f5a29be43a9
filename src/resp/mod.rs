//! The Redis protocol (RESP2 and RESP3), sans-IO: pure functions over bytes, no sockets, no
//! tokio. The RESP listener ([`crate::net::resp`]) drives them over TLS.
//!
//! - [`parser`]: requests. A connection's [`RequestParser`](parser::RequestParser) takes the
//!   bytes received so far and returns `Ok(None)` (incomplete: read more, and the next call
//!   resumes where this one stopped), a request's arguments, or a
//!   [`ProtocolError`](parser::ProtocolError). Lengths are checked against
//!   [`Limits`](parser::Limits) as they are read, before anything is allocated, so garbage or a
//!   huge announced length costs nothing. [`parser::parse_frame`] reads any RESP3 value (what
//!   a server replies); tests and fuzzing use it to check the encoder.
//! - [`reply`]: replies. A [`Frame`](reply::Frame) is encoded for the protocol version the
//!   connection speaks ([`Protocol`](reply::Protocol)): RESP3 maps, sets, booleans and nulls
//!   become their RESP2 forms on a RESP2 connection.
//! - [`command`]: a parsed request's arguments turned into a [`Command`](command::Command),
//!   with Redis's error messages for wrong arity and unsupported options.
pub mod command;
pub mod parser;
pub mod reply;

pub use command::Command;
pub use parser::{Limits, ProtocolError, RequestParser, parse_command};
pub use reply::{Frame, Protocol};
