//! Encoding RESP replies ([`Frame::encode`]) for the protocol version a connection speaks, and
//! requests as clients send them ([`encode_command`]).

use bytes::{BufMut, Bytes, BytesMut};

/// The protocol version of a connection: RESP2 until the client says `HELLO 3`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Protocol {
    /// RESP2, every connection's start.
    #[default]
    Resp2,
    /// RESP3 (`HELLO 3`): maps, sets, booleans and a null type of its own.
    Resp3,
}

impl Protocol {
    /// The version number (`2` or `3`), as `HELLO` reports it.
    pub fn number(self) -> i64 {
        match self {
            Protocol::Resp2 => 2,
            Protocol::Resp3 => 3,
        }
    }
}

/// A RESP value: what a reply is made of.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Frame {
    /// `+OK`: a status line (no CR or LF in it).
    Simple(String),
    /// `-ERR ...`: an error line, starting with its code (`ERR`, `WRONGTYPE`, ...).
    Error(String),
    /// `:42`.
    Integer(i64),
    /// `$5 hello`: binary-safe bytes.
    Bulk(Bytes),
    /// RESP3 `_`; a null bulk string (`$-1`) in RESP2.
    Null,
    /// RESP3 `#t` / `#f`; `:1` / `:0` in RESP2.
    Boolean(bool),
    /// `*n` elements.
    Array(Vec<Frame>),
    /// RESP3 `~n`; an array in RESP2.
    Set(Vec<Frame>),
    /// RESP3 `%n` pairs; a flat array of keys and values in RESP2.
    Map(Vec<(Frame, Frame)>),
}

impl Frame {
    /// `+OK`.
    pub fn ok() -> Frame {
        Frame::Simple("OK".into())
    }

    /// An error reply, `-ERR message` unless `message` starts with its own code.
    pub fn err(message: impl Into<String>) -> Frame {
        let m: String = message.into();
        // Error lines cannot carry CR or LF.
        let m = m.replace(['\r', '\n'], " ");
        let has_code = m
            .split(' ')
            .next()
            .is_some_and(|w| !w.is_empty() && w.bytes().all(|b| b.is_ascii_uppercase()));
        Frame::Error(if has_code { m } else { format!("ERR {m}") })
    }

    /// A bulk string.
    pub fn bulk(b: impl Into<Bytes>) -> Frame {
        Frame::Bulk(b.into())
    }

    /// Appends the encoding of this value for `proto` to `out`.
    ///
    /// ```
    /// use bytes::BytesMut;
    /// use causalkv::resp::{Frame, Protocol};
    ///
    /// let mut out = BytesMut::new();
    /// Frame::Null.encode(Protocol::Resp2, &mut out);
    /// Frame::Null.encode(Protocol::Resp3, &mut out);
    /// assert_eq!(&out[..], b"$-1\r\n_\r\n");
    /// ```
    pub fn encode(&self, proto: Protocol, out: &mut BytesMut) {
        let resp3 = proto == Protocol::Resp3;
        match self {
            Frame::Simple(s) => line(out, b'+', s.as_bytes()),
            Frame::Error(s) => line(out, b'-', s.as_bytes()),
            Frame::Integer(i) => number(out, b':', *i),
            Frame::Bulk(b) => {
                number(out, b'$', b.len() as i64);
                out.put_slice(b);
                out.put_slice(b"\r\n");
            }
            Frame::Null if resp3 => out.put_slice(b"_\r\n"),
            Frame::Null => out.put_slice(b"$-1\r\n"),
            Frame::Boolean(v) if resp3 => out.put_slice(if *v { b"#t\r\n" } else { b"#f\r\n" }),
            Frame::Boolean(v) => number(out, b':', i64::from(*v)),
            Frame::Array(items) => aggregate(out, b'*', items, proto),
            Frame::Set(items) => aggregate(out, if resp3 { b'~' } else { b'*' }, items, proto),
            Frame::Map(pairs) => {
                if resp3 {
                    number(out, b'%', pairs.len() as i64);
                } else {
                    number(out, b'*', 2 * pairs.len() as i64);
                }
                for (k, v) in pairs {
                    k.encode(proto, out);
                    v.encode(proto, out);
                }
            }
        }
    }
}

fn line(out: &mut BytesMut, t: u8, s: &[u8]) {
    out.put_u8(t);
    out.put_slice(s);
    out.put_slice(b"\r\n");
}

fn number(out: &mut BytesMut, t: u8, n: i64) {
    out.put_u8(t);
    out.put_slice(n.to_string().as_bytes());
    out.put_slice(b"\r\n");
}

fn aggregate(out: &mut BytesMut, t: u8, items: &[Frame], proto: Protocol) {
    number(out, t, items.len() as i64);
    for f in items {
        f.encode(proto, out);
    }
}

/// A request as clients send it: an array of bulk strings.
///
/// ```
/// assert_eq!(
///     causalkv::resp::reply::encode_command(&[b"GET".as_slice(), b"k"]),
///     b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\n"
/// );
/// ```
pub fn encode_command<A: AsRef<[u8]>>(args: &[A]) -> Vec<u8> {
    let mut out = BytesMut::new();
    Frame::Array(
        args.iter()
            .map(|a| Frame::Bulk(Bytes::copy_from_slice(a.as_ref())))
            .collect(),
    )
    .encode(Protocol::Resp2, &mut out);
    out.to_vec()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn enc(f: &Frame, p: Protocol) -> Vec<u8> {
        let mut out = BytesMut::new();
        f.encode(p, &mut out);
        out.to_vec()
    }

    #[test]
    fn resp2_forms_of_resp3_types() {
        let m = Frame::Map(vec![(Frame::bulk("a"), Frame::Boolean(true))]);
        assert_eq!(enc(&m, Protocol::Resp3), b"%1\r\n$1\r\na\r\n#t\r\n");
        assert_eq!(enc(&m, Protocol::Resp2), b"*2\r\n$1\r\na\r\n:1\r\n");
        let s = Frame::Set(vec![Frame::Integer(-1)]);
        assert_eq!(enc(&s, Protocol::Resp2), b"*1\r\n:-1\r\n");
        assert_eq!(enc(&s, Protocol::Resp3), b"~1\r\n:-1\r\n");
    }

    #[test]
    fn errors_carry_a_code_and_one_line() {
        assert_eq!(Frame::err("no\r\nway"), Frame::Error("ERR no  way".into()));
        assert_eq!(
            Frame::err("NOPROTO unsupported"),
            Frame::Error("NOPROTO unsupported".into())
        );
    }
}
