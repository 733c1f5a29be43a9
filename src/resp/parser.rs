//! Parsing RESP: requests ([`parse_command`]) and any RESP3 value ([`parse_frame`]).
//!
//! Following mini-redis, a request is first *checked* (every header read, every length
//! compared with the [`Limits`], bulk payloads skipped over) without allocating; only a request
//! that is complete in the buffer is then split off and sliced into arguments, which share the
//! received buffer (no copy). A [`RequestParser`] remembers how far a partial request has been
//! checked, so each byte of a request is checked once however it is split across reads (a
//! request of a million empty arguments arriving a few bytes at a time would otherwise cost
//! time quadratic in its size), and a garbage length is refused when its header is read,
//! before any byte of the payload it announces arrives.
//!
//! Requests come in the two forms Redis accepts: an array of bulk strings (what every client
//! library and `redis-cli` send) and an inline command (`PING\r\n`, what a person types into
//! `nc`), split on spaces.

use bytes::{Bytes, BytesMut};

use super::reply::Frame;

/// Size limits checked while parsing, before anything is allocated.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Largest argument (bulk string), in bytes.
    pub max_arg_bytes: usize,
    /// Most arguments in one request.
    pub max_args: usize,
    /// Longest inline request line, in bytes.
    pub max_inline: usize,
    /// Largest request (all its arguments and headers), in bytes: what one request may make
    /// the server buffer.
    pub max_request_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_arg_bytes: 2 << 20,
            max_args: 1 << 20,
            max_inline: 64 << 10,
            max_request_bytes: 16 << 20,
        }
    }
}

/// Why the bytes received are not RESP. The connection cannot be resynchronised after one:
/// the server replies with the error and closes it, as Redis does.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    /// An array header whose count is not a number.
    #[error("Protocol error: invalid multibulk length")]
    BadCount,
    /// An array header with more elements than [`Limits::max_args`].
    #[error("Protocol error: {count} arguments exceed the limit of {max}")]
    TooManyArgs {
        /// Announced count.
        count: i64,
        /// The limit.
        max: usize,
    },
    /// An array element that is not a bulk string.
    #[error("Protocol error: expected '$', got '{}'", *.0 as char)]
    ExpectedBulk(u8),
    /// A bulk header whose length is not a number, or is negative.
    #[error("Protocol error: invalid bulk length")]
    BadBulkLength,
    /// A bulk string longer than [`Limits::max_arg_bytes`].
    #[error(
        "Protocol error: argument of {len} bytes exceeds the limit of {max} bytes (resp.max_arg_bytes)"
    )]
    ArgTooLarge {
        /// Announced length.
        len: i64,
        /// The limit.
        max: usize,
    },
    /// A request larger than [`Limits::max_request_bytes`].
    #[error("Protocol error: request of more than {max} bytes (limits.max_frame)")]
    RequestTooLarge {
        /// The limit.
        max: usize,
    },
    /// A bulk string not followed by CRLF.
    #[error("Protocol error: bulk string not followed by CRLF")]
    MissingCrlf,
    /// An inline request line longer than [`Limits::max_inline`].
    #[error("Protocol error: too big inline request")]
    InlineTooLong,
    /// A value of a type byte RESP3 does not define (frames only).
    #[error("Protocol error: unknown type byte {0:#04x}")]
    UnknownType(u8),
    /// A value that is not what its type says (a bad integer, boolean or UTF-8 string).
    #[error("Protocol error: malformed {0}")]
    Malformed(&'static str),
    /// Aggregates nested deeper than [`MAX_DEPTH`] (frames only).
    #[error("Protocol error: aggregates nested deeper than {MAX_DEPTH}")]
    TooDeep,
}

/// The longest header line (type byte, a 20-digit length and CRLF, with room to spare): a
/// header still without its CRLF past this is garbage, not a slow client.
const MAX_HEADER: usize = 32;

/// How deep [`parse_frame`] follows nested aggregates.
pub const MAX_DEPTH: usize = 16;

/// Takes requests off the front of a connection's buffer, one call per request, remembering
/// between calls how far the partial request at the front has been checked. The buffer must
/// only grow at its end between calls (as reads append to it).
///
/// ```
/// use bytes::BytesMut;
/// use causalkv::resp::{Limits, RequestParser};
///
/// let mut parser = RequestParser::new(Limits::default());
/// let mut buf = BytesMut::from(&b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\n*1\r\n$4\r\nPI"[..]);
/// let args = parser.next(&mut buf).unwrap().unwrap();
/// assert_eq!(args, [&b"GET"[..], &b"k"[..]]);
/// assert_eq!(parser.next(&mut buf).unwrap(), None); // partial PING: read more
/// buf.extend_from_slice(b"NG\r\n");
/// assert_eq!(parser.next(&mut buf).unwrap().unwrap(), [&b"PING"[..]]);
/// ```
#[derive(Debug, Clone)]
pub struct RequestParser {
    limits: Limits,
    partial: Partial,
}

/// How far the request at the front of the buffer has been checked.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
enum Partial {
    /// Nothing yet.
    #[default]
    Fresh,
    /// An array of `count` bulk strings, the first `done` of which are complete and checked;
    /// the next one starts at `pos`.
    Multibulk {
        count: usize,
        done: usize,
        pos: usize,
    },
    /// An inline line with no line end in its first `scanned` bytes.
    Inline { scanned: usize },
}

impl RequestParser {
    /// A parser for a new connection.
    pub fn new(limits: Limits) -> Self {
        Self {
            limits,
            partial: Partial::Fresh,
        }
    }

    /// Takes the next request off the front of `buf`: `Ok(None)` if no complete request is
    /// there yet (nothing is consumed; read more and call again), else its arguments, which
    /// share `buf`'s memory. Empty requests (a blank inline line, an empty array) are consumed
    /// and skipped. After an error the connection cannot be resynchronised.
    pub fn next(&mut self, buf: &mut BytesMut) -> Result<Option<Vec<Bytes>>, ProtocolError> {
        loop {
            let Some(first) = buf.first() else {
                return Ok(None);
            };
            let parsed = if *first == b'*' {
                check_multibulk(buf, &self.limits, &mut self.partial)
            } else {
                check_inline(buf, &self.limits, &mut self.partial)
            };
            let parsed = parsed.inspect_err(|_| self.partial = Partial::Fresh)?;
            let Some((len, count)) = parsed else {
                return Ok(None);
            };
            self.partial = Partial::Fresh;
            let frame = buf.split_to(len).freeze();
            if count == 0 {
                continue;
            }
            let args = if frame[0] == b'*' {
                multibulk_args(&frame, count)
            } else {
                inline_args(&frame)
            };
            if args.is_empty() {
                continue;
            }
            return Ok(Some(args));
        }
    }

    /// How many arguments of the partial request at the front of the buffer have been
    /// checked so far (what the next call does not check again).
    pub fn checked_args(&self) -> usize {
        match self.partial {
            Partial::Multibulk { done, .. } => done,
            _ => 0,
        }
    }
}

/// Takes the next request off the front of `buf`, as [`RequestParser::next`] does for a parser
/// that starts afresh: for one-off parsing. A connection keeps its [`RequestParser`].
///
/// ```
/// use bytes::BytesMut;
/// use causalkv::resp::{Limits, parse_command};
///
/// let mut buf = BytesMut::from(&b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\n*1\r\n$4\r\nPI"[..]);
/// let args = parse_command(&mut buf, &Limits::default()).unwrap().unwrap();
/// assert_eq!(args, [&b"GET"[..], &b"k"[..]]);
/// assert_eq!(parse_command(&mut buf, &Limits::default()).unwrap(), None); // partial PING
/// ```
pub fn parse_command(
    buf: &mut BytesMut,
    limits: &Limits,
) -> Result<Option<Vec<Bytes>>, ProtocolError> {
    RequestParser::new(*limits).next(buf)
}

/// Checks an array of bulk strings, from where `partial` says an earlier call stopped:
/// `Some((bytes, count))` once it is complete, else `None` with `partial` updated.
fn check_multibulk(
    buf: &[u8],
    limits: &Limits,
    partial: &mut Partial,
) -> Result<Option<(usize, usize)>, ProtocolError> {
    let (count, mut done, mut pos) = match *partial {
        Partial::Multibulk { count, done, pos } => (count, done, pos),
        _ => {
            let Some((count, pos)) = header(buf, 0, ProtocolError::BadCount)? else {
                return Ok(None);
            };
            if count <= 0 {
                return Ok(Some((pos, 0))); // `*0` and `*-1`: nothing to do, as in Redis
            }
            if count as u64 > limits.max_args as u64 {
                return Err(ProtocolError::TooManyArgs {
                    count,
                    max: limits.max_args,
                });
            }
            (count as usize, 0, pos)
        }
    };
    while done < count {
        *partial = Partial::Multibulk { count, done, pos };
        let Some(&t) = buf.get(pos) else {
            return Ok(None);
        };
        if t != b'$' {
            return Err(ProtocolError::ExpectedBulk(t));
        }
        let Some((len, after)) = header(buf, pos, ProtocolError::BadBulkLength)? else {
            return Ok(None);
        };
        check_bulk_len(len, limits)?;
        let end = after + len as usize;
        if end + 2 > limits.max_request_bytes {
            return Err(ProtocolError::RequestTooLarge {
                max: limits.max_request_bytes,
            });
        }
        if buf.len() < end + 2 {
            return Ok(None);
        }
        if &buf[end..end + 2] != b"\r\n" {
            return Err(ProtocolError::MissingCrlf);
        }
        pos = end + 2;
        done += 1;
    }
    Ok(Some((pos, count)))
}

/// The arguments of a checked array of `count` bulk strings.
fn multibulk_args(frame: &Bytes, count: usize) -> Vec<Bytes> {
    let mut args = Vec::with_capacity(count);
    let mut pos = line_end(frame, 0).expect("checked") + 2;
    for _ in 0..count {
        let eol = line_end(frame, pos).expect("checked");
        let len: usize = parse_int(&frame[pos + 1..eol]).expect("checked") as usize;
        let start = eol + 2;
        args.push(frame.slice(start..start + len));
        pos = start + len + 2;
    }
    args
}

/// Checks an inline request, from where `partial` says an earlier call stopped: `Some((bytes,
/// 1))` once its line is complete.
fn check_inline(
    buf: &[u8],
    limits: &Limits,
    partial: &mut Partial,
) -> Result<Option<(usize, usize)>, ProtocolError> {
    let from = match *partial {
        Partial::Inline { scanned } => scanned,
        _ => 0,
    };
    let end = buf.len().min(limits.max_inline + 1);
    match buf[from.min(end)..end].iter().position(|&b| b == b'\n') {
        Some(i) => {
            let i = from + i;
            // An inline line is short, but its words are arguments like any others.
            let words = inline_words(&buf[..i + 1]);
            if words > limits.max_args {
                return Err(ProtocolError::TooManyArgs {
                    count: words as i64,
                    max: limits.max_args,
                });
            }
            Ok(Some((i + 1, 1)))
        }
        None if buf.len() > limits.max_inline => Err(ProtocolError::InlineTooLong),
        None => {
            *partial = Partial::Inline { scanned: end };
            Ok(None)
        }
    }
}

fn is_inline_space(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\r' | b'\n')
}

/// The number of words of an inline request line.
fn inline_words(line: &[u8]) -> usize {
    let mut prev_space = true;
    let mut words = 0;
    for &b in line {
        let space = is_inline_space(b);
        if prev_space && !space {
            words += 1;
        }
        prev_space = space;
    }
    words
}

/// The words of a checked inline request line.
fn inline_args(frame: &Bytes) -> Vec<Bytes> {
    let mut args = Vec::new();
    let mut start = None;
    for (i, &b) in frame.iter().enumerate() {
        let space = is_inline_space(b);
        match (space, start) {
            (false, None) => start = Some(i),
            (true, Some(s)) => {
                args.push(frame.slice(s..i));
                start = None;
            }
            _ => {}
        }
    }
    if let Some(s) = start {
        args.push(frame.slice(s..));
    }
    args
}

/// Reads the header line at `pos` (a type byte, a decimal number, CRLF): the number and the
/// position after the CRLF, `None` if the line is not complete, `bad` if it is not a number.
fn header(
    buf: &[u8],
    pos: usize,
    bad: ProtocolError,
) -> Result<Option<(i64, usize)>, ProtocolError> {
    match line_end(buf, pos) {
        Some(eol) => match parse_int(&buf[pos + 1..eol]) {
            Some(n) => Ok(Some((n, eol + 2))),
            None => Err(bad),
        },
        None if buf.len() - pos > MAX_HEADER => Err(bad),
        None => Ok(None),
    }
}

/// The position of the CRLF ending the line that starts at `pos`, searched within
/// [`MAX_HEADER`] bytes.
/// A bulk string's declared length against the limits: not negative (a null is handled before),
/// and at most `max_arg_bytes`, checked before anything is allocated for it.
fn check_bulk_len(len: i64, limits: &Limits) -> Result<(), ProtocolError> {
    if len < 0 {
        return Err(ProtocolError::BadBulkLength);
    }
    if len as u64 > limits.max_arg_bytes as u64 {
        return Err(ProtocolError::ArgTooLarge {
            len,
            max: limits.max_arg_bytes,
        });
    }
    Ok(())
}

fn line_end(buf: &[u8], pos: usize) -> Option<usize> {
    line_end_within(buf, pos, MAX_HEADER)
}

/// The position of the CRLF ending the line that starts at `pos`, searched within `max` bytes.
fn line_end_within(buf: &[u8], pos: usize, max: usize) -> Option<usize> {
    let window = &buf[pos..buf.len().min(pos.saturating_add(max))];
    window
        .windows(2)
        .position(|w| w == b"\r\n")
        .map(|i| pos + i)
}

/// A strict decimal `i64`: an optional `-` and 1 to 19 digits.
fn parse_int(s: &[u8]) -> Option<i64> {
    let (neg, digits) = match s.split_first() {
        Some((b'-', rest)) => (true, rest),
        _ => (false, s),
    };
    if digits.is_empty() || digits.len() > 19 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let n: i64 = std::str::from_utf8(digits).ok()?.parse().ok()?;
    Some(if neg { -n } else { n })
}

/// Reads one RESP3 value (what a server sends) from the front of `buf`: `Ok(None)` if it is
/// not complete yet, else the value and the bytes it took. Bulk lengths and aggregate counts
/// are checked against `limits` (`max_arg_bytes`, `max_args`) before they are trusted.
pub fn parse_frame(buf: &[u8], limits: &Limits) -> Result<Option<(Frame, usize)>, ProtocolError> {
    frame_at(buf, 0, limits, 0)
}

fn frame_at(
    buf: &[u8],
    pos: usize,
    limits: &Limits,
    depth: usize,
) -> Result<Option<(Frame, usize)>, ProtocolError> {
    let Some(&t) = buf.get(pos) else {
        return Ok(None);
    };
    // Simple strings and errors may be long lines; everything else has a short header.
    let max_line = if matches!(t, b'+' | b'-') {
        limits.max_arg_bytes.saturating_add(2)
    } else {
        MAX_HEADER
    };
    // The line ends after the type byte: a value that starts with "\r\n" has an empty type,
    // not a line that ends before it starts.
    let Some(eol) = line_end_within(buf, pos + 1, max_line) else {
        if buf.len() - pos <= max_line {
            return Ok(None);
        }
        return Err(ProtocolError::Malformed("header"));
    };
    let line = &buf[pos + 1..eol];
    let next = eol + 2;
    let text = |what| {
        std::str::from_utf8(line)
            .map(str::to_owned)
            .map_err(|_| ProtocolError::Malformed(what))
    };
    let int = |what| parse_int(line).ok_or(ProtocolError::Malformed(what));
    let frame = match t {
        b'+' => Frame::Simple(text("simple string")?),
        b'-' => Frame::Error(text("error")?),
        b':' => Frame::Integer(int("integer")?),
        b'_' if line.is_empty() => Frame::Null,
        b'#' => match line {
            b"t" => Frame::Boolean(true),
            b"f" => Frame::Boolean(false),
            _ => return Err(ProtocolError::Malformed("boolean")),
        },
        b'$' => {
            let len = int("bulk length")?;
            if len == -1 {
                return Ok(Some((Frame::Null, next)));
            }
            check_bulk_len(len, limits)?;
            let end = next + len as usize;
            if buf.len() < end + 2 {
                return Ok(None);
            }
            if &buf[end..end + 2] != b"\r\n" {
                return Err(ProtocolError::MissingCrlf);
            }
            return Ok(Some((
                Frame::Bulk(Bytes::copy_from_slice(&buf[next..end])),
                end + 2,
            )));
        }
        b'*' | b'~' | b'%' => {
            let count = int("aggregate length")?;
            if count == -1 && t == b'*' {
                return Ok(Some((Frame::Null, next)));
            }
            if count < 0 {
                return Err(ProtocolError::BadCount);
            }
            // A map's count is of pairs; saturating, so a huge one is refused below rather
            // than overflowing.
            let elems = if t == b'%' {
                count.saturating_mul(2)
            } else {
                count
            };
            if elems as u64 > limits.max_args as u64 {
                return Err(ProtocolError::TooManyArgs {
                    count,
                    max: limits.max_args,
                });
            }
            if depth >= MAX_DEPTH {
                return Err(ProtocolError::TooDeep);
            }
            // Checked before allocating: every element is at least 3 bytes.
            if (buf.len() - next) < elems as usize * 3 {
                return Ok(None);
            }
            let mut items = Vec::with_capacity(elems as usize);
            let mut at = next;
            for _ in 0..elems {
                let Some((f, after)) = frame_at(buf, at, limits, depth + 1)? else {
                    return Ok(None);
                };
                items.push(f);
                at = after;
            }
            let frame = match t {
                b'*' => Frame::Array(items),
                b'~' => Frame::Set(items),
                _ => {
                    let mut pairs = Vec::with_capacity(items.len() / 2);
                    let mut it = items.into_iter();
                    while let (Some(k), Some(v)) = (it.next(), it.next()) {
                        pairs.push((k, v));
                    }
                    Frame::Map(pairs)
                }
            };
            return Ok(Some((frame, at)));
        }
        other => return Err(ProtocolError::UnknownType(other)),
    };
    Ok(Some((frame, next)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resp::reply::{Protocol, encode_command};
    use proptest::prelude::*;

    fn parse(bytes: &[u8]) -> Result<Option<Vec<Bytes>>, ProtocolError> {
        parse_command(&mut BytesMut::from(bytes), &Limits::default())
    }

    /// Found by the `resp` fuzz target: an inline request's words were not held to
    /// `max_args` (only the line's length was limited).
    #[test]
    fn an_inline_request_with_too_many_words_is_refused() {
        let l = limits(64, 3);
        let parse = |b: &[u8]| parse_command(&mut BytesMut::from(b), &l);
        assert_eq!(parse(b"SET k v\r\n").unwrap().unwrap().len(), 3);
        assert!(matches!(
            parse(b"SET k v w\r\n"),
            Err(ProtocolError::TooManyArgs { count: 4, max: 3 })
        ));
        assert!(matches!(
            parse(b"\r a\tb \r c\rd\n"),
            Err(ProtocolError::TooManyArgs { count: 4, max: 3 })
        ));
    }

    /// Found by the `resp` fuzz target: a value starting with its line end panicked slicing
    /// the line (`buf[1..0]`).
    #[test]
    fn a_value_that_starts_with_its_line_end_is_refused() {
        // Incomplete (no line after the type byte yet) or refused, never a value.
        for input in [&b"\r\n"[..], b"\r\n$3\r\nSET\r\n", b"*1\r\n\r\n"] {
            let got = parse_frame(input, &Limits::default());
            assert!(!matches!(got, Ok(Some(_))), "{input:?} gives {got:?}");
        }
        assert!(parse_frame(b"\r\n$3\r\nSET\r\n", &Limits::default()).is_err());
    }

    fn limits(max_arg_bytes: usize, max_args: usize) -> Limits {
        Limits {
            max_arg_bytes,
            max_args,
            max_inline: 64,
            max_request_bytes: 4096,
        }
    }

    #[test]
    fn multibulk_and_inline() {
        assert_eq!(
            parse(b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$0\r\n\r\n").unwrap(),
            Some(vec![
                Bytes::from_static(b"SET"),
                Bytes::from_static(b"k"),
                Bytes::new()
            ])
        );
        assert_eq!(
            parse(b"  ping  hello\r\n").unwrap(),
            Some(vec![
                Bytes::from_static(b"ping"),
                Bytes::from_static(b"hello")
            ])
        );
        // Blank lines and empty arrays are skipped, as Redis does.
        assert_eq!(
            parse(b"\r\n*0\r\nPING\n").unwrap(),
            Some(vec![Bytes::from_static(b"PING")])
        );
    }

    #[test]
    fn incomplete_consumes_nothing() {
        let whole = b"*2\r\n$4\r\nECHO\r\n$5\r\nhello\r\n";
        for cut in 0..whole.len() {
            let mut buf = BytesMut::from(&whole[..cut]);
            assert_eq!(parse_command(&mut buf, &Limits::default()), Ok(None));
            assert_eq!(buf.len(), cut, "nothing consumed at {cut}");
        }
    }

    /// Found in review: every read re-checked a partial request from its start, so a request
    /// of many small arguments sent a few bytes at a time cost time quadratic in its size (a
    /// million empty arguments: 17 ms per read on the runtime thread). The parser now resumes
    /// where it stopped.
    #[test]
    fn a_partial_request_is_checked_from_where_the_last_read_stopped() {
        let mut parser = RequestParser::new(Limits::default());
        let mut buf = BytesMut::from(&b"*100001\r\n$4\r\nECHO\r\n"[..]);
        assert_eq!(parser.next(&mut buf), Ok(None));
        assert_eq!(parser.checked_args(), 1);
        for i in 0..100_000 {
            // Each argument split across two reads.
            buf.extend_from_slice(b"$0\r");
            assert_eq!(parser.next(&mut buf), Ok(None));
            buf.extend_from_slice(b"\n\r\n");
            let got = parser.next(&mut buf).unwrap();
            if i < 99_999 {
                assert_eq!(got, None);
                assert_eq!(parser.checked_args(), i + 2, "argument {i} checked once");
            } else {
                let args = got.expect("the last argument completes the request");
                assert_eq!(args.len(), 100_001);
                assert_eq!(&args[0][..], b"ECHO");
            }
        }
        assert!(buf.is_empty());
        assert_eq!(parser.checked_args(), 0);
        // An inline line is scanned once too, and a later request starts afresh.
        buf.extend_from_slice(b"PI");
        assert_eq!(parser.next(&mut buf), Ok(None));
        buf.extend_from_slice(b"NG\r\n*1\r\n$4\r\nPING\r\n");
        assert_eq!(parser.next(&mut buf).unwrap().unwrap(), [&b"PING"[..]]);
        assert_eq!(parser.next(&mut buf).unwrap().unwrap(), [&b"PING"[..]]);
    }

    #[test]
    fn limits_refuse_before_the_payload_arrives() {
        // A 1 TB bulk is refused from its header alone.
        let mut buf = BytesMut::from(&b"*1\r\n$1000000000000\r\n"[..]);
        assert_eq!(
            parse_command(&mut buf, &limits(1024, 8)),
            Err(ProtocolError::ArgTooLarge {
                len: 1_000_000_000_000,
                max: 1024
            })
        );
        let mut buf = BytesMut::from(&b"*9\r\n"[..]);
        assert!(matches!(
            parse_command(&mut buf, &limits(1024, 8)),
            Err(ProtocolError::TooManyArgs { count: 9, max: 8 })
        ));
        let mut buf = BytesMut::from(&[b'x'; 65][..]);
        assert_eq!(
            parse_command(&mut buf, &limits(1024, 8)),
            Err(ProtocolError::InlineTooLong)
        );
    }

    #[test]
    fn garbage_is_a_clear_error() {
        assert_eq!(parse(b"*x\r\n"), Err(ProtocolError::BadCount));
        assert_eq!(
            parse(b"*1\r\n:3\r\n"),
            Err(ProtocolError::ExpectedBulk(b':'))
        );
        assert_eq!(parse(b"*1\r\n$-3\r\n"), Err(ProtocolError::BadBulkLength));
        assert_eq!(parse(b"*1\r\n$1\r\nabc"), Err(ProtocolError::MissingCrlf));
        assert_eq!(parse(&[b'*'; 40]), Err(ProtocolError::BadCount));
        assert_eq!(
            parse(b"*1\r\n$99999999999999999999999\r\n"),
            Err(ProtocolError::BadBulkLength)
        );
        assert!(
            ProtocolError::ArgTooLarge { len: 9, max: 1 }
                .to_string()
                .contains("resp.max_arg_bytes")
        );
    }

    #[test]
    fn frames_are_bounded() {
        let deep = "*1\r\n".repeat(MAX_DEPTH + 1) + ":1\r\n";
        assert_eq!(
            parse_frame(deep.as_bytes(), &Limits::default()),
            Err(ProtocolError::TooDeep)
        );
        // A huge count with few bytes behind it waits without allocating for the count.
        assert_eq!(
            parse_frame(b"*1000000\r\n:1\r\n", &Limits::default()),
            Ok(None)
        );
        assert_eq!(
            parse_frame(b"!3\r\n", &Limits::default()),
            Err(ProtocolError::UnknownType(b'!'))
        );
        // A map of more pairs than an i64 can double is refused, not overflowed (found by
        // fuzzing; fuzz/regressions/resp/ keeps the input).
        assert!(matches!(
            parse_frame(b"%4666666666666666666\r\n", &Limits::default()),
            Err(ProtocolError::TooManyArgs { .. })
        ));
    }

    fn arg() -> impl Strategy<Value = Vec<u8>> {
        prop::collection::vec(any::<u8>(), 0..40)
    }

    fn frame() -> impl Strategy<Value = Frame> {
        let text = "[ -~]{0,60}".prop_map(|s| s.replace(['\r', '\n'], ""));
        let leaf = prop_oneof![
            text.clone().prop_map(Frame::Simple),
            text.prop_map(Frame::Error),
            any::<i64>().prop_map(Frame::Integer),
            arg().prop_map(|b| Frame::Bulk(b.into())),
            Just(Frame::Null),
            any::<bool>().prop_map(Frame::Boolean),
        ];
        leaf.prop_recursive(3, 24, 4, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..4).prop_map(Frame::Array),
                prop::collection::vec(inner.clone(), 0..4).prop_map(Frame::Set),
                prop::collection::vec((inner.clone(), inner), 0..3).prop_map(Frame::Map),
            ]
        })
    }

    proptest! {
        /// A command encoded as clients send it parses back to its arguments, whatever the
        /// bytes, and at every split point before its end it is incomplete.
        #[test]
        fn command_roundtrip(args in prop::collection::vec(arg(), 1..6), cut in any::<prop::sample::Index>()) {
            let wire = encode_command(&args);
            let mut buf = BytesMut::from(&wire[..]);
            let got = parse_command(&mut buf, &Limits::default()).unwrap().unwrap();
            prop_assert_eq!(got, args.iter().map(|a| Bytes::from(a.clone())).collect::<Vec<_>>());
            prop_assert!(buf.is_empty());
            let cut = cut.index(wire.len());
            let mut part = BytesMut::from(&wire[..cut]);
            prop_assert_eq!(parse_command(&mut part, &Limits::default()), Ok(None));
        }

        /// Requests arriving in reads of any sizes give what the same bytes give in one read.
        #[test]
        fn requests_split_across_reads_parse_as_whole(
            reqs in prop::collection::vec((prop::collection::vec(arg(), 1..5), any::<bool>()), 1..6),
            cuts in prop::collection::vec(any::<prop::sample::Index>(), 0..8),
        ) {
            let mut wire = Vec::new();
            for (args, inline) in &reqs {
                if *inline {
                    // Inline words: no spaces or line ends inside, none empty.
                    let words: Vec<Vec<u8>> = args
                        .iter()
                        .map(|a| a.iter().copied().filter(|b| !is_inline_space(*b)).collect::<Vec<u8>>())
                        .filter(|w| !w.is_empty() && w[0] != b'*')
                        .collect();
                    if words.is_empty() {
                        continue;
                    }
                    wire.extend_from_slice(&words.join(&b' '));
                    wire.extend_from_slice(b"\r\n");
                } else {
                    wire.extend_from_slice(&encode_command(args));
                }
            }
            let mut all = Vec::new();
            let mut buf = BytesMut::from(&wire[..]);
            while let Some(args) = parse_command(&mut buf, &Limits::default()).unwrap() {
                all.push(args);
            }
            let mut at: Vec<usize> = cuts.iter().map(|c| c.index(wire.len() + 1)).collect();
            at.push(0);
            at.push(wire.len());
            at.sort_unstable();
            let mut parser = RequestParser::new(Limits::default());
            let mut buf = BytesMut::new();
            let mut got = Vec::new();
            for w in at.windows(2) {
                buf.extend_from_slice(&wire[w[0]..w[1]]);
                while let Some(args) = parser.next(&mut buf).unwrap() {
                    got.push(args);
                }
            }
            prop_assert_eq!(got, all);
        }

        /// Every reply the encoder writes in RESP3 parses back to itself.
        #[test]
        fn reply_roundtrip(f in frame()) {
            let mut out = BytesMut::new();
            f.encode(Protocol::Resp3, &mut out);
            let (back, used) = parse_frame(&out, &Limits::default()).unwrap().unwrap();
            prop_assert_eq!(back, f);
            prop_assert_eq!(used, out.len());
        }

        /// RESP2 encodings parse too (maps and sets flattened to arrays, nulls as null bulks).
        #[test]
        fn resp2_replies_parse(f in frame()) {
            let mut out = BytesMut::new();
            f.encode(Protocol::Resp2, &mut out);
            let (_, used) = parse_frame(&out, &Limits::default()).unwrap().unwrap();
            prop_assert_eq!(used, out.len());
        }

        /// Arbitrary bytes never panic and never consume a request that is not there.
        #[test]
        fn garbage_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..200)) {
            let mut buf = BytesMut::from(&bytes[..]);
            let small = limits(64, 8);
            while let Ok(Some(args)) = parse_command(&mut buf, &small) {
                prop_assert!(args.len() <= 8 && args.iter().all(|a| a.len() <= 64));
            }
            let _ = parse_frame(&bytes, &small);
        }
    }
}
