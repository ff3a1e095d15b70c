//! PostgreSQL v3 framing for the emulator: reading tagged and startup messages, and writing
//! the few backend messages the emulator answers itself. The upstream side uses
//! `postgres-protocol`'s frontend encoders and backend parser.

use std::io;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt};

/// PostgreSQL's `PQ_LARGE_MESSAGE_LIMIT`: the longest Query, Parse, Bind, FunctionCall or copy
/// message it accepts (the length word, which counts itself; 1 GiB - 2).
pub(crate) const LARGE_MESSAGE: usize = (1 << 30) - 2;

/// PostgreSQL's `PQ_SMALL_MESSAGE_LIMIT`: the longest message of any other type it accepts.
pub(crate) const SMALL_MESSAGE: usize = 10_000;

/// PostgreSQL's `PG_MAX_AUTH_TOKEN_LENGTH`: the longest password message it accepts.
pub(crate) const AUTH_MESSAGE: usize = 65_535;

/// The most of a message's body the emulator holds at once: a longer body is taken as its
/// first `HEAD` bytes (enough for the statement names, and past the 16 KiB after which a
/// text pins anyway) and the rest is passed through as it arrives, never held whole.
pub(crate) const HEAD: usize = 64 * 1024;

/// The longest message a client may send of type `tag`, as PostgreSQL's `SocketBackend`
/// allows: `large` for the types that carry statements and data, 10,000 bytes for the rest.
pub(crate) fn client_limit(tag: u8, large: usize) -> usize {
    match tag {
        b'Q' | b'F' | b'P' | b'B' | b'd' | b'c' | b'f' => large,
        _ => SMALL_MESSAGE,
    }
}

/// One tagged message, or the first [`HEAD`] bytes of a longer one: its type byte, its body
/// (without the length) and how many bytes of the body are still to come.
#[derive(Debug, Clone)]
pub(crate) struct Frame {
    pub(crate) tag: u8,
    pub(crate) body: Bytes,
    /// Bytes of the body after `body`, not read yet: they are passed on (or dropped) as they
    /// arrive.
    pub(crate) more: usize,
}

impl Frame {
    /// The message as it goes on the wire (only the part here when `more` is not zero; the
    /// length counts the rest too).
    pub(crate) fn write_to(&self, out: &mut BytesMut) {
        out.put_u8(self.tag);
        out.put_i32((self.body.len() + self.more + 4) as i32);
        out.put_slice(&self.body);
    }

    /// The same message with `more` bytes of its body still to come.
    pub(crate) fn with_more(mut self, more: usize) -> Frame {
        self.more = more;
        self
    }
}

fn bad(msg: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.to_string())
}

/// Takes one message off the front of `buf`: whole if its body is at most [`HEAD`] bytes,
/// else its head (the rest is in `Frame::more`). A message longer than `limit(tag)` (its
/// length word, counting itself, as PostgreSQL counts) is refused with "invalid message
/// length", PostgreSQL's words.
#[inline]
pub(crate) fn take_frame(
    buf: &mut BytesMut,
    limit: impl Fn(u8) -> usize,
) -> io::Result<Option<Frame>> {
    if buf.len() < 5 {
        return Ok(None);
    }
    let tag = buf[0];
    let len = i32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]);
    if len < 4 || len as usize > limit(tag) {
        return Err(bad("invalid message length"));
    }
    let body = len as usize - 4;
    let head = body.min(HEAD);
    if buf.len() < 5 + head {
        // Grow with what arrives, not with what the header claims.
        buf.reserve((5 + head - buf.len()).min(1 << 16));
        return Ok(None);
    }
    let mut msg = buf.split_to(5 + head);
    msg.advance(5);
    Ok(Some(Frame {
        tag,
        body: msg.freeze(),
        more: body - head,
    }))
}

/// Reads one whole tagged message of at most `limit` bytes (at most [`HEAD`]). `Ok(None)` at
/// a clean end of stream. Cancel safe: bytes read stay in `buf`.
pub(crate) async fn read_frame<R: AsyncRead + Unpin>(
    r: &mut R,
    buf: &mut BytesMut,
    limit: usize,
) -> io::Result<Option<Frame>> {
    debug_assert!(limit <= HEAD + 4);
    loop {
        if let Some(f) = take_frame(buf, |_| limit)? {
            return Ok(Some(f));
        }
        if r.read_buf(buf).await? == 0 {
            return if buf.is_empty() {
                Ok(None)
            } else {
                Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "truncated message",
                ))
            };
        }
    }
}

/// Reads one untagged startup-phase message (length, then body).
pub(crate) async fn read_startup<R: AsyncRead + Unpin>(
    r: &mut R,
    buf: &mut BytesMut,
) -> io::Result<Option<Bytes>> {
    loop {
        if buf.len() >= 4 {
            let len = i32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]);
            if !(8..=10_000).contains(&len) {
                return Err(bad("invalid startup message length"));
            }
            if buf.len() >= len as usize {
                let mut msg = buf.split_to(len as usize);
                msg.advance(4);
                return Ok(Some(msg.freeze()));
            }
        }
        if r.read_buf(buf).await? == 0 {
            return Ok(None);
        }
    }
}

/// Reads a NUL-terminated string off the front of `b`.
pub(crate) fn cstr(b: &mut Bytes) -> io::Result<String> {
    let end = b
        .iter()
        .position(|&c| c == 0)
        .ok_or_else(|| bad("missing string terminator"))?;
    let s = String::from_utf8(b.split_to(end).to_vec()).map_err(|_| bad("invalid UTF-8"))?;
    b.advance(1);
    Ok(s)
}

fn message(out: &mut BytesMut, tag: u8, body: impl FnOnce(&mut BytesMut)) {
    out.put_u8(tag);
    let at = out.len();
    out.put_i32(0);
    body(out);
    let len = (out.len() - at) as i32;
    out[at..at + 4].copy_from_slice(&len.to_be_bytes());
}

pub(crate) fn auth_ok(out: &mut BytesMut) {
    message(out, b'R', |b| b.put_i32(0));
}

pub(crate) fn auth_md5(out: &mut BytesMut, salt: [u8; 4]) {
    message(out, b'R', |b| {
        b.put_i32(5);
        b.put_slice(&salt);
    });
}

pub(crate) fn parameter_status(out: &mut BytesMut, name: &str, value: &str) {
    message(out, b'S', |b| {
        b.put_slice(name.as_bytes());
        b.put_u8(0);
        b.put_slice(value.as_bytes());
        b.put_u8(0);
    });
}

pub(crate) fn backend_key(out: &mut BytesMut, pid: i32, key: i32) {
    message(out, b'K', |b| {
        b.put_i32(pid);
        b.put_i32(key);
    });
}

pub(crate) fn ready(out: &mut BytesMut, status: u8) {
    message(out, b'Z', |b| b.put_u8(status));
}

/// An ErrorResponse with severity, SQLSTATE and message.
pub(crate) fn error(out: &mut BytesMut, severity: &str, code: &str, text: &str) {
    message(out, b'E', |b| {
        for (field, value) in [
            (b'S', severity),
            (b'V', severity),
            (b'C', code),
            (b'M', text),
        ] {
            b.put_u8(field);
            b.put_slice(value.as_bytes());
            b.put_u8(0);
        }
        b.put_u8(0);
    });
}

/// A Parse message body's parts: statement name, then the rest (query and parameter types).
pub(crate) fn split_name(body: &Bytes) -> io::Result<(String, Bytes)> {
    let mut b = body.clone();
    let name = cstr(&mut b)?;
    Ok((name, b))
}

/// Builds a message whose body is `name\0` followed by `rest` (Parse, Describe/Close after
/// their kind byte are built by the caller).
pub(crate) fn named(tag: u8, prefix: &[u8], name: &str, rest: &[u8]) -> Frame {
    let mut body = BytesMut::with_capacity(prefix.len() + name.len() + 1 + rest.len());
    body.put_slice(prefix);
    body.put_slice(name.as_bytes());
    body.put_u8(0);
    body.put_slice(rest);
    Frame {
        tag,
        body: body.freeze(),
        more: 0,
    }
}

/// The query text of a Parse message's rest (after the name).
pub(crate) fn parse_query(rest: &Bytes) -> io::Result<String> {
    cstr(&mut rest.clone())
}

/// The text at the front of the head of a message whose body goes on past it: up to its
/// terminator if the head holds one, else all of the head (a character cut at its end is
/// dropped).
pub(crate) fn text_head(b: &[u8]) -> String {
    let b = b.iter().position(|&c| c == 0).map_or(b, |end| &b[..end]);
    match std::str::from_utf8(b) {
        Ok(s) => s.to_string(),
        Err(e) => String::from_utf8_lossy(&b[..e.valid_up_to()]).into_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_and_truncated_input_waits() {
        let mut out = BytesMut::new();
        ready(&mut out, b'I');
        error(&mut out, "ERROR", "08000", "x");
        let mut half = out.split_to(3);
        let any = |_| LARGE_MESSAGE;
        assert!(take_frame(&mut half, any).unwrap().is_none());
        half.unsplit(out);
        let z = take_frame(&mut half, any).unwrap().unwrap();
        assert_eq!((z.tag, &z.body[..], z.more), (b'Z', &b"I"[..], 0));
        let e = take_frame(&mut half, any).unwrap().unwrap();
        assert_eq!(e.tag, b'E');
        assert!(half.is_empty());
        let mut garbage = BytesMut::from(&[b'Q', 0, 0, 0, 1][..]);
        assert!(take_frame(&mut garbage, any).is_err());
    }

    #[test]
    fn a_long_message_is_taken_as_its_head_and_a_too_long_one_is_refused() {
        let limit = |tag| client_limit(tag, LARGE_MESSAGE);
        let mut buf = BytesMut::new();
        Frame {
            tag: b'Q',
            body: Bytes::from(vec![b'x'; HEAD]),
            more: 100,
        }
        .write_to(&mut buf);
        let head = take_frame(&mut buf, limit).unwrap().unwrap();
        assert_eq!((head.body.len(), head.more), (HEAD, 100));
        assert!(buf.is_empty(), "nothing of the rest was waited for");
        // A head that has not all arrived is waited for.
        let mut buf = BytesMut::from(&[b'B', 0, 1, 0, 0, 0][..]);
        assert!(take_frame(&mut buf, limit).unwrap().is_none());
        // Over PostgreSQL's limits: 1 GiB - 2 for a Query, 10,000 bytes for a Sync.
        let header = |tag: u8, len: usize| {
            let mut b = BytesMut::from(&[tag][..]);
            b.put_i32(len as i32);
            b
        };
        assert!(
            take_frame(&mut header(b'Q', LARGE_MESSAGE), limit)
                .unwrap()
                .is_none()
        );
        let e = take_frame(&mut header(b'Q', LARGE_MESSAGE + 1), limit).unwrap_err();
        assert_eq!(e.to_string(), "invalid message length");
        assert!(take_frame(&mut header(b'S', SMALL_MESSAGE + 1), limit).is_err());
        assert!(
            take_frame(&mut header(b'S', SMALL_MESSAGE), limit)
                .unwrap()
                .is_none()
        );
    }

    #[test]
    fn the_text_of_a_head_stops_at_its_terminator_or_at_a_whole_character() {
        assert_eq!(text_head(b"SELECT 1\0junk"), "SELECT 1");
        assert_eq!(text_head("SELECT 'é".as_bytes()), "SELECT 'é");
        let cut = "SELECT 'é".as_bytes();
        assert_eq!(text_head(&cut[..cut.len() - 1]), "SELECT '");
    }
}
