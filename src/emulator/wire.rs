//! PostgreSQL v3 framing for the emulator: reading tagged and startup messages, and writing
//! the few backend messages the emulator answers itself. The upstream side uses
//! `postgres-protocol`'s frontend encoders and backend parser.

use std::io;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt};

/// The largest message accepted from a client or upstream (PostgreSQL's own limit is 1 GiB).
const MAX_MESSAGE: usize = 1 << 30;

/// One tagged message: its type byte and its body (without the length).
#[derive(Debug, Clone)]
pub(crate) struct Frame {
    pub(crate) tag: u8,
    pub(crate) body: Bytes,
}

impl Frame {
    /// The message as it goes on the wire.
    pub(crate) fn write_to(&self, out: &mut BytesMut) {
        out.put_u8(self.tag);
        out.put_i32((self.body.len() + 4) as i32);
        out.put_slice(&self.body);
    }
}

fn bad(msg: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.to_string())
}

/// Takes one complete tagged message off the front of `buf`, if there is one.
pub(crate) fn take_frame(buf: &mut BytesMut) -> io::Result<Option<Frame>> {
    if buf.len() < 5 {
        return Ok(None);
    }
    let len = i32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]);
    if len < 4 || len as usize > MAX_MESSAGE {
        return Err(bad("invalid message length"));
    }
    let total = 1 + len as usize;
    if buf.len() < total {
        // Grow with what arrives, not with what the header claims: a bogus length must not
        // allocate a gigabyte up front.
        buf.reserve((total - buf.len()).min(1 << 16));
        return Ok(None);
    }
    let tag = buf[0];
    let mut msg = buf.split_to(total);
    msg.advance(5);
    Ok(Some(Frame {
        tag,
        body: msg.freeze(),
    }))
}

/// Reads one tagged message. `Ok(None)` at a clean end of stream. Cancel safe: bytes read
/// stay in `buf`.
pub(crate) async fn read_frame<R: AsyncRead + Unpin>(
    r: &mut R,
    buf: &mut BytesMut,
) -> io::Result<Option<Frame>> {
    loop {
        if let Some(f) = take_frame(buf)? {
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
    }
}

/// The query text of a Parse message's rest (after the name).
pub(crate) fn parse_query(rest: &Bytes) -> io::Result<String> {
    cstr(&mut rest.clone())
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
        assert!(take_frame(&mut half).unwrap().is_none());
        half.unsplit(out);
        let z = take_frame(&mut half).unwrap().unwrap();
        assert_eq!((z.tag, &z.body[..]), (b'Z', &b"I"[..]));
        let e = take_frame(&mut half).unwrap().unwrap();
        assert_eq!(e.tag, b'E');
        assert!(half.is_empty());
        let mut garbage = BytesMut::from(&[b'Q', 0, 0, 0, 1][..]);
        assert!(take_frame(&mut garbage).is_err());
    }
}
