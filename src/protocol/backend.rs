//! Backend messages the router writes to clients itself: authentication requests,
//! ParameterStatus, BackendKeyData, ReadyForQuery and ErrorResponse.

use bytes::{BufMut, BytesMut};

fn with_len(buf: &mut BytesMut, tag: u8, body: impl FnOnce(&mut BytesMut)) {
    buf.put_u8(tag);
    let at = buf.len();
    buf.put_i32(0);
    body(buf);
    let len = (buf.len() - at) as i32;
    buf[at..at + 4].copy_from_slice(&len.to_be_bytes());
}

fn put_cstr(buf: &mut BytesMut, s: &str) {
    // A NUL inside a string would end the field early; Postgres strings never contain one.
    buf.put_slice(s.replace('\0', "").as_bytes());
    buf.put_u8(0);
}

pub fn authentication_ok(buf: &mut BytesMut) {
    with_len(buf, b'R', |b| b.put_i32(0));
}

pub fn authentication_sasl(buf: &mut BytesMut, mechanisms: &[&str]) {
    with_len(buf, b'R', |b| {
        b.put_i32(10);
        for m in mechanisms {
            put_cstr(b, m);
        }
        b.put_u8(0);
    });
}

pub fn authentication_sasl_continue(buf: &mut BytesMut, data: &[u8]) {
    with_len(buf, b'R', |b| {
        b.put_i32(11);
        b.put_slice(data);
    });
}

pub fn authentication_sasl_final(buf: &mut BytesMut, data: &[u8]) {
    with_len(buf, b'R', |b| {
        b.put_i32(12);
        b.put_slice(data);
    });
}

pub fn parameter_status(buf: &mut BytesMut, name: &str, value: &str) {
    with_len(buf, b'S', |b| {
        put_cstr(b, name);
        put_cstr(b, value);
    });
}

pub fn backend_key_data(buf: &mut BytesMut, pid: i32, secret: i32) {
    with_len(buf, b'K', |b| {
        b.put_i32(pid);
        b.put_i32(secret);
    });
}

pub fn ready_for_query(buf: &mut BytesMut, status: u8) {
    with_len(buf, b'Z', |b| b.put_u8(status));
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Severity {
    Error,
    Fatal,
}

impl Severity {
    fn as_str(self) -> &'static str {
        match self {
            Severity::Error => "ERROR",
            Severity::Fatal => "FATAL",
        }
    }
}

/// An error the router raises itself. `message` should start with `podrouter:` and,
/// together with `hint`, say what happened and what to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouterError {
    pub severity: Severity,
    pub code: &'static str,
    pub message: String,
    pub detail: Option<String>,
    pub hint: Option<String>,
}

impl RouterError {
    pub fn fatal(code: &'static str, message: impl Into<String>) -> Self {
        RouterError {
            severity: Severity::Fatal,
            code,
            message: message.into(),
            detail: None,
            hint: None,
        }
    }

    pub fn error(code: &'static str, message: impl Into<String>) -> Self {
        RouterError {
            severity: Severity::Error,
            ..Self::fatal(code, message)
        }
    }

    pub fn with_hint(mut self, hint: impl Into<String>) -> Self {
        self.hint = Some(hint.into());
        self
    }

    pub fn with_detail(mut self, detail: impl Into<String>) -> Self {
        self.detail = Some(detail.into());
        self
    }

    pub fn encode(&self, buf: &mut BytesMut) {
        with_len(buf, b'E', |b| {
            for (field, value) in [
                (b'S', Some(self.severity.as_str())),
                (b'V', Some(self.severity.as_str())),
                (b'C', Some(self.code)),
                (b'M', Some(self.message.as_str())),
                (b'D', self.detail.as_deref()),
                (b'H', self.hint.as_deref()),
            ] {
                if let Some(v) = value {
                    b.put_u8(field);
                    put_cstr(b, v);
                }
            }
            b.put_u8(0);
        });
    }
}

impl std::fmt::Display for RouterError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} {}: {}",
            self.severity.as_str(),
            self.code,
            self.message
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use postgres_protocol::message::backend::{ErrorFields, Message};

    #[test]
    fn error_response_parses_as_postgres_would() {
        let mut buf = BytesMut::new();
        RouterError::fatal("3D000", "podrouter: database \"x\" does not exist")
            .with_hint("check the name")
            .encode(&mut buf);
        let Some(Message::ErrorResponse(body)) = Message::parse(&mut buf).unwrap() else {
            panic!("not an ErrorResponse")
        };
        use postgres_protocol::message::backend::ErrorField;
        let mut fields = body.fields();
        let mut seen = Vec::new();
        while let Some(f) = fallible_iterator::FallibleIterator::next(&mut fields).unwrap() {
            let f: ErrorField<'_> = f;
            seen.push((
                f.type_(),
                String::from_utf8_lossy(f.value_bytes()).into_owned(),
            ));
        }
        assert!(seen.contains(&(b'C', "3D000".into())));
        assert!(seen.contains(&(b'S', "FATAL".into())));
        assert!(seen.contains(&(b'H', "check the name".into())));
        let _: Option<ErrorFields<'_>> = None;
    }

    #[test]
    fn lengths_are_right() {
        let mut buf = BytesMut::new();
        ready_for_query(&mut buf, b'I');
        assert_eq!(&buf[..], b"Z\0\0\0\x05I");
        buf.clear();
        authentication_ok(&mut buf);
        assert_eq!(&buf[..], b"R\0\0\0\x08\0\0\0\0");
    }
}
