//! The client's side of connection start: SSL/GSS negotiation (a TLS handshake when the
//! router has a certificate), the startup packet, and SCRAM-SHA-256 authentication against
//! the catalog's verifiers. Ends with an authenticated
//! client and the tenant it may use, or with a Postgres-like FATAL error.

use super::stream::ClientStream;
use super::Proxy;
use crate::protocol::backend::{self, RouterError};
use crate::protocol::framing::{self, Startup};
use crate::protocol::scram::{self, ServerExchange, Verifier};
use crate::protocol::sqlstate;
use crate::routing::{RoleAuth, TenantRoute};
use bytes::{Buf, BytesMut};
use std::sync::Arc;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Largest message accepted before authentication (SASL messages are small).
const MAX_AUTH_MESSAGE: usize = 10_000;

/// Startup parameters that are about the connection, not session settings to replay.
const NOT_SESSION_PARAMS: &[&str] = &["user", "database", "replication", "options"];

pub enum Outcome {
    /// A cancel request was handled, or the client left before authenticating.
    Done,
    Authenticated(Authenticated),
}

pub struct Authenticated {
    pub user: String,
    pub tenant: Arc<TenantRoute>,
    pub role: Arc<RoleAuth>,
    pub client_key: [u8; 32],
    /// SASL final message still owed to the client (sent with AuthenticationOk).
    pub server_final: String,
    /// Session parameters the client asked for, to be set on every server connection it uses.
    pub params: Vec<(String, String)>,
    /// Which server of the tenant's pod the client wants (`podrouter.target`).
    pub target: Target,
}

/// The startup setting `podrouter.target` (`options='-c podrouter.target=replica'` in libpq):
/// the router's own, never sent to a server.
pub const TARGET_SETTING: &str = "podrouter.target";

/// Which server of its pod a session's server connections go to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Target {
    /// Reads and writes: the primary.
    #[default]
    Primary,
    /// Reads only: a replica within `pool.max_replica_lag`, else the primary.
    Replica,
}

/// Takes `podrouter.target` out of the session parameters (the last one given wins).
fn take_target(params: &mut Vec<(String, String)>) -> Result<Target, RouterError> {
    let mut target = Target::Primary;
    let mut bad = None;
    params.retain(|(k, v)| {
        if !k.eq_ignore_ascii_case(TARGET_SETTING) {
            return true;
        }
        match v.to_ascii_lowercase().as_str() {
            "primary" => target = Target::Primary,
            "replica" => target = Target::Replica,
            _ => bad = Some(v.clone()),
        }
        false
    });
    match bad {
        Some(v) => Err(RouterError::fatal(
            sqlstate::INVALID_PARAMETER_VALUE,
            format!("podrouter: invalid value for {TARGET_SETTING}: {v:?}"),
        )
        .with_hint("Use primary (the default) or replica.")),
        None => Ok(target),
    }
}

/// A failure that ends the connection; `None` means the client just went away.
pub struct Refusal(pub Option<RouterError>);

impl From<RouterError> for Refusal {
    fn from(e: RouterError) -> Self {
        Refusal(Some(e))
    }
}

impl From<std::io::Error> for Refusal {
    fn from(_: std::io::Error) -> Self {
        Refusal(None)
    }
}

fn protocol_violation(what: impl std::fmt::Display) -> RouterError {
    RouterError::fatal(
        sqlstate::PROTOCOL_VIOLATION,
        format!("podrouter: protocol violation: {what}"),
    )
}

/// The first byte of a TLS handshake record: a client that starts TLS at once.
const TLS_HANDSHAKE: u8 = 0x16;

/// Reads the startup packet. SSLRequest is answered 'S' and followed by the TLS handshake
/// when the router has a certificate, 'N' otherwise; GSSENCRequest always gets 'N'. With
/// `tls.mode = "require"`, a startup packet over plain TCP is refused; cancel requests are
/// not (libpq sends them in clear text).
async fn read_startup(proxy: &Proxy, stream: &mut ClientStream) -> Result<Startup, Refusal> {
    for _ in 0..3 {
        let mut len = [0u8; 4];
        stream.read_exact(&mut len).await?;
        if len[0] == TLS_HANDSHAKE && !stream.is_tls() {
            return Err(protocol_violation(
                "direct TLS connections (sslnegotiation=direct) are not supported; connect with sslnegotiation=postgres",
            )
            .into());
        }
        let body_len = framing::startup_body_len(len).map_err(protocol_violation)?;
        let mut body = vec![0u8; body_len];
        stream.read_exact(&mut body).await?;
        match framing::parse_startup(&body).map_err(protocol_violation)? {
            Startup::SslRequest if stream.is_tls() => {
                return Err(protocol_violation("SSLRequest on an encrypted connection").into())
            }
            Startup::SslRequest => match &proxy.client_tls.acceptor {
                Some(acceptor) => {
                    stream.write_all(b"S").await?;
                    // read_exact took exactly the SSLRequest, so nothing sent in clear text
                    // after it can pass for encrypted data (CVE-2021-23214).
                    stream.accept_tls(acceptor).await?;
                }
                None => stream.write_all(b"N").await?,
            },
            Startup::GssEncRequest => stream.write_all(b"N").await?,
            Startup::Startup { .. } if proxy.client_tls.required && !stream.is_tls() => {
                return Err(RouterError::fatal(
                    sqlstate::INVALID_AUTHORIZATION,
                    "podrouter: TLS is required; connect with sslmode=require",
                )
                .into())
            }
            other => return Ok(other),
        }
    }
    Err(protocol_violation("too many encryption requests").into())
}

/// Answers a connection the router will not serve, before any authentication: encryption
/// requests get 'N', a cancel request is passed on, the startup packet gets `e` as the FATAL
/// error a client shows (replying only after reading the packet, so the client is not reset
/// before it reads the reason). Bounded by `within`; reads a few small packets at most.
pub async fn refuse(
    proxy: &Proxy,
    mut stream: tokio::net::TcpStream,
    e: &RouterError,
    within: std::time::Duration,
) {
    let answer = async {
        for _ in 0..3 {
            let mut len = [0u8; 4];
            stream.read_exact(&mut len).await?;
            let body_len = framing::startup_body_len(len)
                .ok()
                .filter(|n| *n <= MAX_AUTH_MESSAGE)
                .ok_or(std::io::ErrorKind::InvalidData)?;
            let mut body = vec![0u8; body_len];
            stream.read_exact(&mut body).await?;
            match framing::parse_startup(&body) {
                Ok(Startup::SslRequest | Startup::GssEncRequest) => stream.write_all(b"N").await?,
                Ok(Startup::Cancel { pid, secret }) => {
                    if let Some(target) = proxy.cancels.lookup(pid, secret) {
                        super::cancel::send_cancel(target).await;
                    }
                    return Ok(());
                }
                _ => {
                    let mut out = BytesMut::new();
                    e.encode(&mut out);
                    stream.write_all(&out).await?;
                    return stream.shutdown().await;
                }
            }
        }
        Ok::<(), std::io::Error>(())
    };
    let _ = tokio::time::timeout(within, answer).await;
}

/// Reads one whole tagged message during authentication.
async fn read_auth_message(
    stream: &mut ClientStream,
    buf: &mut BytesMut,
) -> Result<(u8, BytesMut), Refusal> {
    loop {
        if let Some(h) = framing::peek_header(buf).map_err(protocol_violation)? {
            if h.wire_len > MAX_AUTH_MESSAGE {
                return Err(protocol_violation(format!(
                    "authentication message of {} bytes",
                    h.wire_len
                ))
                .into());
            }
            if buf.len() >= h.wire_len {
                let mut m = buf.split_to(h.wire_len);
                m.advance(5);
                return Ok((h.tag, m));
            }
        }
        buf.reserve(1024);
        if stream.read_buf(buf).await? == 0 {
            return Err(Refusal(None));
        }
    }
}

fn password_failed(user: &str) -> RouterError {
    RouterError::fatal(
        sqlstate::INVALID_PASSWORD,
        format!("podrouter: password authentication failed for user \"{user}\""),
    )
}

/// Splits `options` into words as Postgres does (`pg_split_opts`): whitespace separates,
/// a backslash escapes the next character (so `\ ` is a space inside a value).
fn split_options(options: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut cur = String::new();
    let mut chars = options.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => cur.extend(chars.next()),
            c if c.is_whitespace() => {
                if !cur.is_empty() {
                    words.push(std::mem::take(&mut cur));
                }
            }
            c => cur.push(c),
        }
    }
    if !cur.is_empty() {
        words.push(cur);
    }
    words
}

/// Parses `-c name=value` and `--name=value` out of the `options` startup parameter.
fn parse_options(options: &str, into: &mut Vec<(String, String)>) -> Result<(), RouterError> {
    let words = split_options(options);
    let mut words = words.iter().map(String::as_str);
    while let Some(w) = words.next() {
        let setting = if w == "-c" {
            words.next()
        } else {
            w.strip_prefix("--").or_else(|| w.strip_prefix("-c"))
        };
        match setting.and_then(|s| s.split_once('=')) {
            Some((k, v)) => into.push((k.replace('-', "_"), v.to_owned())),
            None => {
                return Err(RouterError::fatal(
                    sqlstate::FEATURE_NOT_SUPPORTED,
                    format!("podrouter: unsupported startup option {w:?}"),
                )
                .with_hint("Only `-c name=value` settings are supported in options (escape spaces with a backslash)."))
            }
        }
    }
    Ok(())
}

/// Runs startup and authentication. `buf` keeps any bytes the client sent past the last
/// authentication message.
pub async fn run(
    proxy: &Proxy,
    stream: &mut ClientStream,
    buf: &mut BytesMut,
) -> Result<Outcome, Refusal> {
    let params = match read_startup(proxy, stream).await? {
        Startup::Cancel { pid, secret } => {
            if let Some(target) = proxy.cancels.lookup(pid, secret) {
                super::cancel::send_cancel(target).await;
            }
            return Ok(Outcome::Done);
        }
        Startup::Startup { params } => params,
        Startup::SslRequest | Startup::GssEncRequest => unreachable!("answered in read_startup"),
    };
    let get = |k: &str| params.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
    let user = get("user")
        .filter(|u| !u.is_empty())
        .ok_or_else(|| {
            RouterError::fatal(
                sqlstate::INVALID_AUTHORIZATION,
                "podrouter: no PostgreSQL user name specified in startup packet",
            )
        })?
        .to_owned();
    let database = get("database")
        .filter(|d| !d.is_empty())
        .unwrap_or(&user)
        .to_owned();
    if get("replication").is_some_and(|r| r != "false" && r != "0" && r != "off") {
        return Err(RouterError::fatal(
            sqlstate::FEATURE_NOT_SUPPORTED,
            "podrouter: replication connections are not routed",
        )
        .with_hint("Connect replication clients to the pod directly.")
        .into());
    }
    let mut session_params: Vec<(String, String)> = params
        .iter()
        .filter(|(k, _)| !NOT_SESSION_PARAMS.contains(&k.as_str()))
        .cloned()
        .collect();
    if let Some(options) = get("options") {
        parse_options(options, &mut session_params)?;
    }
    let target = take_target(&mut session_params)?;
    if session_params.len() > 64 {
        return Err(protocol_violation("more than 64 startup parameters").into());
    }
    if let Some(bad) = session_params.iter().find(|(k, _)| {
        k.is_empty()
            || !k
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'.')
    }) {
        return Err(protocol_violation(format!("invalid parameter name {:?}", bad.0)).into());
    }

    // Authenticate first, then look the tenant up: only an authenticated role learns whether
    // a tenant exists. Unknown roles run a mock exchange so they look like a wrong password.
    let table = proxy.table.load_full();
    let role = table.roles.get(&user).cloned();
    let verifier = role
        .as_ref()
        .map(|r| r.verifier.clone())
        .unwrap_or_else(|| Verifier::mock(&user, proxy.mock_secret()));

    let mut out = BytesMut::new();
    backend::authentication_sasl(&mut out, &[scram::MECHANISM]);
    stream.write_all(&out).await?;

    let (tag, mut body) = read_auth_message(stream, buf).await?;
    if tag != b'p' {
        return Err(protocol_violation(format!(
            "expected SASLInitialResponse, got message type '{}'",
            tag as char
        ))
        .into());
    }
    let mut b: &[u8] = &body;
    let mechanism = framing::take_cstr(&mut b).map_err(protocol_violation)?;
    if mechanism != scram::MECHANISM {
        return Err(RouterError::fatal(
            sqlstate::INVALID_AUTHORIZATION,
            format!("podrouter: SASL mechanism {mechanism:?} is not supported"),
        )
        .with_hint("Use SCRAM-SHA-256 without channel binding (channel_binding=prefer or disable).")
        .into());
    }
    if b.len() < 4 {
        return Err(protocol_violation("SASLInitialResponse without data").into());
    }
    let data_len = (&b[..4]).get_i32();
    let data = &b[4..];
    if data_len < 0 || data_len as usize != data.len() {
        return Err(protocol_violation("SASLInitialResponse length mismatch").into());
    }
    let (exchange, server_first) = ServerExchange::start(verifier, data).map_err(|e| match e {
        scram::ScramError::ChannelBinding => {
            RouterError::fatal(sqlstate::INVALID_AUTHORIZATION, format!("podrouter: {e}"))
        }
        other => protocol_violation(other),
    })?;
    out.clear();
    backend::authentication_sasl_continue(&mut out, server_first.as_bytes());
    stream.write_all(&out).await?;

    let (tag, rest) = read_auth_message(stream, buf).await?;
    if tag != b'p' {
        return Err(protocol_violation(format!(
            "expected SASLResponse, got message type '{}'",
            tag as char
        ))
        .into());
    }
    body = rest;
    let (server_final, client_key) = match exchange.finish(&body) {
        Ok(ok) => ok,
        Err(scram::ScramError::BadProof) => return Err(password_failed(&user).into()),
        Err(e) => return Err(protocol_violation(e).into()),
    };
    let Some(role) = role else {
        return Err(password_failed(&user).into());
    };
    let Some(tenant) = table.tenant(&database).cloned() else {
        return Err(RouterError::fatal(
            sqlstate::INVALID_CATALOG_NAME,
            format!("podrouter: database \"{database}\" does not exist"),
        )
        .with_hint("The database name is the tenant; list tenants with `podrouter tenants`.")
        .into());
    };
    // A role that is not granted on this tenant fails exactly like a wrong password.
    if table.authorized(&tenant, &user).is_none() {
        return Err(password_failed(&user).into());
    }
    Ok(Outcome::Authenticated(Authenticated {
        user,
        tenant,
        role,
        client_key,
        server_final,
        params: session_params,
        target,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_become_settings() {
        let check = |opts: &str, want: &[(&str, &str)]| {
            let mut v = Vec::new();
            parse_options(opts, &mut v).unwrap();
            let want: Vec<(String, String)> = want
                .iter()
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .collect();
            assert_eq!(v, want, "{opts}");
        };
        check("-c search_path=app", &[("search_path", "app")]);
        check(
            "-csearch_path=app --statement-timeout=5s",
            &[("search_path", "app"), ("statement_timeout", "5s")],
        );
        check("", &[]);
        check("-c DateStyle=SQL,\\ DMY", &[("DateStyle", "SQL, DMY")]);
        assert!(parse_options("-x", &mut Vec::new()).is_err());
    }

    #[test]
    fn target_is_taken_out_of_the_settings() {
        let check = |opts: &str, want: Option<Target>, left: &[&str]| {
            let mut v = vec![("application_name".to_owned(), "app".to_owned())];
            parse_options(opts, &mut v).unwrap();
            let got = take_target(&mut v).ok();
            let names: Vec<&str> = v.iter().map(|(k, _)| k.as_str()).collect();
            assert_eq!((got, names.as_slice()), (want, left), "{opts}");
        };
        check("", Some(Target::Primary), &["application_name"]);
        check(
            "-c podrouter.target=replica",
            Some(Target::Replica),
            &["application_name"],
        );
        check(
            "-c search_path=x -c podrouter.target=Replica -c podrouter.target=primary",
            Some(Target::Primary),
            &["application_name", "search_path"],
        );
        check(
            "--podrouter.target=replica",
            Some(Target::Replica),
            &["application_name"],
        );
        check("-c podrouter.target=standby", None, &["application_name"]);
    }
}
