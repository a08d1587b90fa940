//! Framing of the v3 protocol: the length-prefixed startup packet and the tagged messages
//! that follow it (`tag: u8, len: i32 including itself, body`).

use bytes::{Buf, BytesMut};
use thiserror::Error;

/// Largest startup packet accepted, as Postgres' `MAX_STARTUP_PACKET_LENGTH`.
pub const MAX_STARTUP_LEN: usize = 10_000;
/// Largest single message accepted in either direction (Postgres' `PQ_LARGE_MESSAGE_LIMIT`).
pub const MAX_MESSAGE_LEN: usize = (1 << 30) - 1;

const PROTOCOL_V3: i32 = 196_608;
const CANCEL_REQUEST: i32 = 80_877_102;
const SSL_REQUEST: i32 = 80_877_103;
const GSSENC_REQUEST: i32 = 80_877_104;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum FrameError {
    #[error("invalid startup packet length {0}")]
    StartupLength(usize),
    #[error("unsupported frontend protocol {major}.{minor}: podrouter speaks 3.0")]
    Version { major: u16, minor: u16 },
    #[error("malformed startup packet: {0}")]
    Startup(&'static str),
    #[error("invalid message length {len} for message type '{tag}'", tag = char::from(*.tag))]
    Length { tag: u8, len: i64 },
    #[error("invalid frontend message type {0}")]
    UnknownFrontendTag(u8),
}

/// What the first packet of a connection asks for.
#[derive(Debug, PartialEq, Eq)]
pub enum Startup {
    SslRequest,
    GssEncRequest,
    Cancel { pid: i32, secret: i32 },
    Startup { params: Vec<(String, String)> },
}

impl Startup {
    pub fn param(&self, key: &str) -> Option<&str> {
        match self {
            Startup::Startup { params } => params
                .iter()
                .find(|(k, _)| k == key)
                .map(|(_, v)| v.as_str()),
            _ => None,
        }
    }
}

/// Validates the 4-byte length that opens a startup packet; returns the body length.
pub fn startup_body_len(header: [u8; 4]) -> Result<usize, FrameError> {
    let len = i32::from_be_bytes(header);
    if !(8..=MAX_STARTUP_LEN as i32).contains(&len) {
        return Err(FrameError::StartupLength(len.max(0) as usize));
    }
    Ok(len as usize - 4)
}

/// Parses a startup packet body (everything after the length).
pub fn parse_startup(mut body: &[u8]) -> Result<Startup, FrameError> {
    if body.len() < 4 {
        return Err(FrameError::Startup("too short"));
    }
    let code = body.get_i32();
    match code {
        SSL_REQUEST => Ok(Startup::SslRequest),
        GSSENC_REQUEST => Ok(Startup::GssEncRequest),
        CANCEL_REQUEST => {
            if body.len() != 8 {
                return Err(FrameError::Startup("cancel request must carry pid and key"));
            }
            Ok(Startup::Cancel {
                pid: body.get_i32(),
                secret: body.get_i32(),
            })
        }
        PROTOCOL_V3 => {
            let mut params = Vec::new();
            loop {
                let key = take_cstr(&mut body)?;
                if key.is_empty() {
                    break;
                }
                let value = take_cstr(&mut body)?;
                params.push((key.to_owned(), value.to_owned()));
            }
            if !body.is_empty() {
                return Err(FrameError::Startup("bytes after the terminating zero"));
            }
            Ok(Startup::Startup { params })
        }
        other => Err(FrameError::Version {
            major: (other >> 16) as u16,
            minor: (other & 0xffff) as u16,
        }),
    }
}

/// Takes a NUL-terminated UTF-8 string off the front of `buf`.
pub fn take_cstr<'a>(buf: &mut &'a [u8]) -> Result<&'a str, FrameError> {
    let end = buf
        .iter()
        .position(|&b| b == 0)
        .ok_or(FrameError::Startup("missing string terminator"))?;
    let s = std::str::from_utf8(&buf[..end]).map_err(|_| FrameError::Startup("invalid UTF-8"))?;
    *buf = &buf[end + 1..];
    Ok(s)
}

/// Header of one tagged message: its tag and total size on the wire (tag byte included).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub tag: u8,
    pub wire_len: usize,
}

/// Reads the header at the start of `buf`, if five bytes are there. Does not consume.
pub fn peek_header(buf: &[u8]) -> Result<Option<Header>, FrameError> {
    if buf.len() < 5 {
        return Ok(None);
    }
    let tag = buf[0];
    let len = i32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]);
    if len < 4 || len as usize > MAX_MESSAGE_LEN {
        return Err(FrameError::Length {
            tag,
            len: len as i64,
        });
    }
    Ok(Some(Header {
        tag,
        wire_len: len as usize + 1,
    }))
}

/// Splits one whole message off `buf` when it is complete; `None` means "need more bytes"
/// (nothing is allocated or consumed in that case).
pub fn split_message(buf: &mut BytesMut) -> Result<Option<BytesMut>, FrameError> {
    match peek_header(buf)? {
        Some(h) if buf.len() >= h.wire_len => Ok(Some(buf.split_to(h.wire_len))),
        _ => Ok(None),
    }
}

/// Message types a client may send after startup (protocol 3.0).
pub fn is_frontend_tag(tag: u8) -> bool {
    matches!(
        tag,
        b'B' | b'C'
            | b'D'
            | b'E'
            | b'F'
            | b'H'
            | b'P'
            | b'Q'
            | b'S'
            | b'X'
            | b'd'
            | b'c'
            | b'f'
            | b'p'
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn startup_bytes(code: i32, rest: &[u8]) -> Vec<u8> {
        let mut v = code.to_be_bytes().to_vec();
        v.extend_from_slice(rest);
        v
    }

    #[test]
    fn parses_startup_params() {
        let body = startup_bytes(PROTOCOL_V3, b"user\0alice\0database\0tenant1\0\0");
        let s = parse_startup(&body).unwrap();
        assert_eq!(s.param("user"), Some("alice"));
        assert_eq!(s.param("database"), Some("tenant1"));
        assert_eq!(s.param("options"), None);
    }

    #[test]
    fn classifies_special_requests() {
        assert_eq!(
            parse_startup(&startup_bytes(SSL_REQUEST, b"")).unwrap(),
            Startup::SslRequest
        );
        assert_eq!(
            parse_startup(&startup_bytes(GSSENC_REQUEST, b"")).unwrap(),
            Startup::GssEncRequest
        );
        let mut cancel = startup_bytes(CANCEL_REQUEST, &7i32.to_be_bytes());
        cancel.extend_from_slice(&(-9i32).to_be_bytes());
        assert_eq!(
            parse_startup(&cancel).unwrap(),
            Startup::Cancel { pid: 7, secret: -9 }
        );
    }

    #[test]
    fn rejects_malformed_startups() {
        let check = |body: Vec<u8>| assert!(parse_startup(&body).is_err(), "{body:?}");
        check(vec![0, 1]);
        check(startup_bytes(0x0002_0000, b""));
        check(startup_bytes(PROTOCOL_V3, b"user\0alice"));
        check(startup_bytes(PROTOCOL_V3, b"user\0alice\0\0junk"));
        check(startup_bytes(PROTOCOL_V3, b"user\0\xff\xfe\0\0"));
        check(startup_bytes(CANCEL_REQUEST, b"\0\0"));
        assert!(startup_body_len(3i32.to_be_bytes()).is_err());
        assert!(startup_body_len(1_000_000i32.to_be_bytes()).is_err());
        assert_eq!(startup_body_len(8i32.to_be_bytes()), Ok(4));
    }

    #[test]
    fn splits_whole_messages_only() {
        let mut buf = BytesMut::from(&b"Z\0\0\0\x05IQ\0\0"[..]);
        let m = split_message(&mut buf).unwrap().unwrap();
        assert_eq!(&m[..], b"Z\0\0\0\x05I");
        assert_eq!(split_message(&mut buf).unwrap(), None);
        assert_eq!(buf.len(), 3, "an incomplete message stays in the buffer");
        let mut bad = BytesMut::from(&b"Q\0\0\0\x02"[..]);
        assert!(split_message(&mut bad).is_err());
        let mut neg = BytesMut::from(&b"Q\xff\xff\xff\xff"[..]);
        assert!(split_message(&mut neg).is_err());
    }
}
