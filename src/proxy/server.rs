//! One server connection to a pod: connect, authenticate as the client's role with SCRAM
//! pass-through, collect ParameterStatus and BackendKeyData, and run the few simple queries
//! the router issues itself (reset, parameter sync).

use super::stream::ServerStream;
use super::tls::PodTls;
use crate::config::PgEndpoint;
use crate::protocol::backend::RouterError;
use crate::protocol::scram::{self, ClientKeyExchange, ScramError, Verifier};
use crate::protocol::sqlstate;
use bytes::{Buf, BytesMut};
use postgres_protocol::message::backend::Message;
use postgres_protocol::message::frontend;
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use thiserror::Error;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

#[derive(Debug, Error)]
pub enum ServerError {
    #[error("cannot connect: {0}")]
    Io(#[from] std::io::Error),
    #[error("timed out after {0:?}")]
    Timeout(Duration),
    #[error("SCRAM pass-through failed: {0}")]
    Scram(#[from] ScramError),
    #[error("the pod asks for {0} authentication; podrouter needs scram-sha-256 in the pod's pg_hba.conf for tenant roles")]
    UnsupportedAuth(&'static str),
    #[error("no client has authenticated for this role since the router started")]
    NoClientKey,
    #[error("the pod answered: {} {}: {}", .0.severity, .0.code, .0.message)]
    Postgres(PgError),
    #[error("protocol error from the pod: {0}")]
    Protocol(String),
    #[error("TLS with the pod failed: {0}")]
    Tls(String),
}

/// An ErrorResponse from a pod, kept whole so it can be relayed to the client.
#[derive(Debug, Clone)]
pub struct PgError {
    pub severity: String,
    pub code: String,
    pub message: String,
    /// The message as it came, ready to forward.
    pub raw: BytesMut,
}

impl ServerError {
    /// True when the pod could not be reached at all (as opposed to refusing us).
    pub fn is_unreachable(&self) -> bool {
        matches!(self, ServerError::Io(_) | ServerError::Timeout(_))
    }
}

/// What the router needs to log in to a pod as a tenant role.
#[derive(Clone)]
pub struct Credentials {
    pub user: String,
    pub database: String,
    pub client_key: Option<[u8; 32]>,
    pub verifier: Verifier,
}

pub struct ServerConn {
    pub stream: ServerStream,
    pub addr: SocketAddr,
    pub backend_pid: i32,
    pub backend_secret: i32,
    /// Current value of every parameter the server reported or we set (name as reported).
    pub params: Vec<(String, String)>,
    /// The reported parameters as they were right after startup: what a client that asks
    /// for nothing must see.
    pub initial_params: Vec<(String, String)>,
    pub created: Instant,
    pub last_used: Instant,
    /// Signature of the client parameter set this connection's session parameters match
    /// ([`params_signature`]); a client with the same set skips the comparison.
    pub synced_for: Option<u64>,
    /// Named statements prepared on this connection by the transaction-mode rewriter.
    pub prepared: super::prepared::ServerStatements,
    /// This connection's slot of its pod's connection cap, freed when it closes.
    pub pod_slot: Option<tokio::sync::OwnedSemaphorePermit>,
}

impl ServerConn {
    pub async fn connect(
        endpoint: &PgEndpoint,
        creds: &Credentials,
        tls: &PodTls,
        timeout: Duration,
    ) -> Result<ServerConn, ServerError> {
        match tokio::time::timeout(timeout, Self::connect_inner(endpoint, creds, tls)).await {
            Ok(r) => r,
            Err(_) => Err(ServerError::Timeout(timeout)),
        }
    }

    async fn connect_inner(
        endpoint: &PgEndpoint,
        creds: &Credentials,
        tls: &PodTls,
    ) -> Result<ServerConn, ServerError> {
        let stream = TcpStream::connect((endpoint.host.as_str(), endpoint.port)).await?;
        stream.set_nodelay(true)?;
        let addr = stream.peer_addr()?;
        let stream = tls.negotiate(stream, &endpoint.host).await?;
        let mut conn = ServerConn {
            stream,
            addr,
            backend_pid: 0,
            backend_secret: 0,
            params: Vec::new(),
            initial_params: Vec::new(),
            created: Instant::now(),
            last_used: Instant::now(),
            synced_for: None,
            prepared: Default::default(),
            pod_slot: None,
        };
        let mut out = BytesMut::new();
        frontend::startup_message(
            [
                ("user", creds.user.as_str()),
                ("database", creds.database.as_str()),
                ("application_name", "podrouter"),
            ],
            &mut out,
        )
        .map_err(|e| ServerError::Protocol(e.to_string()))?;
        conn.stream.write_all(&out).await?;
        let mut buf = BytesMut::with_capacity(4096);
        let mut scram: Option<ClientKeyExchange> = None;
        loop {
            let msg = conn.read_message(&mut buf).await?;
            match msg {
                Message::AuthenticationOk => {}
                Message::AuthenticationSasl(body) => {
                    let mut mechs = body.mechanisms();
                    let mut offered = false;
                    while let Some(m) = fallible_iterator::FallibleIterator::next(&mut mechs)
                        .map_err(|e| ServerError::Protocol(e.to_string()))?
                    {
                        offered |= m == scram::MECHANISM;
                    }
                    if !offered {
                        return Err(ServerError::UnsupportedAuth(
                            "a SASL mechanism other than SCRAM-SHA-256",
                        ));
                    }
                    let key = creds.client_key.ok_or(ServerError::NoClientKey)?;
                    let ex = ClientKeyExchange::new(key, creds.verifier.clone());
                    out.clear();
                    frontend::sasl_initial_response(
                        scram::MECHANISM,
                        ex.client_first().as_bytes(),
                        &mut out,
                    )
                    .map_err(|e| ServerError::Protocol(e.to_string()))?;
                    conn.stream.write_all(&out).await?;
                    scram = Some(ex);
                }
                Message::AuthenticationSaslContinue(body) => {
                    let ex = scram.as_mut().ok_or_else(|| {
                        ServerError::Protocol("SASL continue before start".into())
                    })?;
                    let reply = ex.respond(body.data())?;
                    out.clear();
                    frontend::sasl_response(reply.as_bytes(), &mut out)
                        .map_err(|e| ServerError::Protocol(e.to_string()))?;
                    conn.stream.write_all(&out).await?;
                }
                Message::AuthenticationSaslFinal(body) => {
                    let ex = scram
                        .as_mut()
                        .ok_or_else(|| ServerError::Protocol("SASL final before start".into()))?;
                    ex.verify(body.data())?;
                }
                Message::AuthenticationCleartextPassword => {
                    return Err(ServerError::UnsupportedAuth("cleartext password"))
                }
                Message::AuthenticationMd5Password(_) => {
                    return Err(ServerError::UnsupportedAuth("md5"))
                }
                Message::AuthenticationKerberosV5
                | Message::AuthenticationScmCredential
                | Message::AuthenticationGss
                | Message::AuthenticationSspi
                | Message::AuthenticationGssContinue(_) => {
                    return Err(ServerError::UnsupportedAuth("GSS/SSPI/Kerberos"))
                }
                Message::BackendKeyData(k) => {
                    conn.backend_pid = k.process_id();
                    conn.backend_secret = k.secret_key();
                }
                Message::ParameterStatus(p) => {
                    let (name, value) = (
                        p.name().map_err(|e| ServerError::Protocol(e.to_string()))?,
                        p.value()
                            .map_err(|e| ServerError::Protocol(e.to_string()))?,
                    );
                    conn.set_param(name, value);
                }
                Message::NoticeResponse(_) => {}
                Message::ReadyForQuery(_) => {
                    conn.initial_params = conn.params.clone();
                    return Ok(conn);
                }
                Message::ErrorResponse(_) => {
                    unreachable!("read_message turns errors into ServerError")
                }
                _ => {
                    return Err(ServerError::Protocol(
                        "unexpected message during startup".into(),
                    ))
                }
            }
        }
    }

    /// Reads one whole backend message; an ErrorResponse becomes `ServerError::Postgres`.
    async fn read_message(&mut self, buf: &mut BytesMut) -> Result<Message, ServerError> {
        loop {
            if let Some(h) = crate::protocol::framing::peek_header(buf)
                .map_err(|e| ServerError::Protocol(e.to_string()))?
            {
                if buf.len() >= h.wire_len && h.tag == b'E' {
                    let raw = buf.split_to(h.wire_len);
                    return Err(ServerError::Postgres(parse_error(raw)));
                }
            }
            if let Some(m) =
                Message::parse(buf).map_err(|e| ServerError::Protocol(e.to_string()))?
            {
                return Ok(m);
            }
            buf.reserve(4096);
            if self.stream.read_buf(buf).await? == 0 {
                return Err(ServerError::Io(std::io::ErrorKind::UnexpectedEof.into()));
            }
        }
    }

    pub fn set_param(&mut self, name: &str, value: &str) {
        match self
            .params
            .iter_mut()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
        {
            Some(slot) => slot.1 = value.to_owned(),
            None => self.params.push((name.to_owned(), value.to_owned())),
        }
    }

    pub fn param(&self, name: &str) -> Option<&str> {
        lookup(&self.params, name)
    }

    /// Runs a simple query issued by the router itself, swallowing its results. ParameterStatus
    /// messages update `params`. Any error leaves the connection unusable (the caller drops it).
    pub async fn simple_query(&mut self, sql: &str, timeout: Duration) -> Result<(), ServerError> {
        self.query_values(sql, timeout).await.map(drop)
    }

    /// [`Self::simple_query`] that also returns the first column of every row, as text.
    pub async fn query_values(
        &mut self,
        sql: &str,
        timeout: Duration,
    ) -> Result<Vec<Option<String>>, ServerError> {
        let fut = async {
            let mut out = BytesMut::new();
            frontend::query(sql, &mut out).map_err(|e| ServerError::Protocol(e.to_string()))?;
            self.stream.write_all(&out).await?;
            let mut buf = BytesMut::with_capacity(1024);
            let mut failed = None;
            let mut values = Vec::new();
            loop {
                match self.read_message(&mut buf).await {
                    Ok(Message::ReadyForQuery(r)) => {
                        if r.status() != b'I' {
                            return Err(ServerError::Protocol(
                                "not idle after the router's own query".into(),
                            ));
                        }
                        return match failed {
                            Some(e) => Err(ServerError::Postgres(e)),
                            None => Ok(values),
                        };
                    }
                    Ok(Message::ParameterStatus(p)) => {
                        if let (Ok(n), Ok(v)) = (p.name(), p.value()) {
                            let (n, v) = (n.to_owned(), v.to_owned());
                            self.set_param(&n, &v);
                        }
                    }
                    Ok(Message::DataRow(row)) => {
                        use fallible_iterator::FallibleIterator;
                        let first = row
                            .ranges()
                            .next()
                            .map_err(|e| ServerError::Protocol(e.to_string()))?
                            .flatten()
                            .map(|r| String::from_utf8_lossy(&row.buffer()[r]).into_owned());
                        values.push(first);
                    }
                    Ok(_) => {}
                    Err(ServerError::Postgres(e)) => failed = Some(e),
                    Err(e) => return Err(e),
                }
            }
        };
        match tokio::time::timeout(timeout, fut).await {
            Ok(r) => r,
            Err(_) => Err(ServerError::Timeout(timeout)),
        }
    }

    /// Brings the server's session parameters to the client's values with one batch: SET
    /// what the client asks for, RESET what an earlier client changed and this one did not
    /// ask for. Returns the number of statements sent.
    pub async fn sync_params(
        &mut self,
        wanted: &[(String, String)],
        timeout: Duration,
    ) -> Result<usize, ServerError> {
        let reset: Vec<String> = self
            .params
            .iter()
            .filter(|(k, v)| {
                lookup(wanted, k).is_none() && lookup(&self.initial_params, k) != Some(v.as_str())
            })
            .map(|(k, _)| k.clone())
            .collect();
        let mut sql = String::new();
        for name in &reset {
            sql.push_str(&format!("RESET {};", quote_ident(name)));
        }
        for (name, value) in wanted {
            if self.param(name) != Some(value.as_str()) {
                sql.push_str(&format!(
                    "SET {} TO {};",
                    quote_ident(name),
                    quote_literal(value)
                ));
            }
        }
        if sql.is_empty() {
            return Ok(0);
        }
        self.simple_query(&sql, timeout).await?;
        for name in &reset {
            match lookup(&self.initial_params, name).map(str::to_owned) {
                Some(v) => self.set_param(name, &v),
                None => self.params.retain(|(k, _)| !k.eq_ignore_ascii_case(name)),
            }
        }
        // Parameters that Postgres does not report back are recorded as set.
        for (name, value) in wanted {
            if self.param(name) != Some(value.as_str()) {
                self.set_param(name, value);
            }
        }
        Ok(sql.matches(';').count())
    }

    /// Whether an idle connection (idle for `idle_for`) still looks alive: no EOF and no
    /// unsolicited bytes (a server shutting down sends a FATAL before closing). Cheap: at
    /// most one non-blocking read.
    pub fn looks_alive(&self, idle_for: Duration) -> bool {
        self.stream.looks_alive(idle_for)
    }
}

/// A stable signature of a parameter set (order-sensitive, as clients send it).
pub fn params_signature(params: &[(String, String)]) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    params.hash(&mut h);
    h.finish()
}

/// A parameter's value by name; GUC names are case-insensitive.
fn lookup<'a>(params: &'a [(String, String)], name: &str) -> Option<&'a str> {
    params
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

pub fn quote_ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

/// A string literal that reads the same whatever `standard_conforming_strings` is.
pub fn quote_literal(s: &str) -> String {
    if s.contains('\\') {
        format!("E'{}'", s.replace('\\', "\\\\").replace('\'', "''"))
    } else {
        format!("'{}'", s.replace('\'', "''"))
    }
}

/// Splits an ErrorResponse into the fields the router looks at.
pub fn parse_error(raw: BytesMut) -> PgError {
    let mut severity = String::new();
    let mut code = String::new();
    let mut message = String::new();
    let mut body = &raw[5.min(raw.len())..];
    while body.has_remaining() && body[0] != 0 {
        let field = body.get_u8();
        let end = body.iter().position(|&b| b == 0).unwrap_or(body.len());
        let value = String::from_utf8_lossy(&body[..end]).into_owned();
        body = &body[(end + 1).min(body.len())..];
        match field {
            b'V' => severity = value,
            b'S' if severity.is_empty() => severity = value,
            b'C' => code = value,
            b'M' => message = value,
            _ => {}
        }
    }
    PgError {
        severity,
        code,
        message,
        raw,
    }
}

/// Turns a failure to get a server connection into the error the client sees. It names the
/// tenant, never the pod's address.
pub fn client_error(tenant: &str, e: &ServerError) -> RouterError {
    match e {
        ServerError::Io(_) | ServerError::Timeout(_) => RouterError::fatal(
            sqlstate::CONNECTION_FAILURE,
            format!("podrouter: tenant \"{tenant}\" is unavailable: its pod cannot be reached"),
        )
        .with_hint("Retry shortly; operators can check the pod with `podrouter pods`."),
        ServerError::Postgres(pg) => RouterError::fatal(
            // Keep the pod's code when it has one (e.g. 53300 too many connections).
            if pg.code == sqlstate::TOO_MANY_CONNECTIONS {
                sqlstate::TOO_MANY_CONNECTIONS
            } else {
                sqlstate::CONNECTION_FAILURE
            },
            format!(
                "podrouter: tenant \"{tenant}\" refused the connection: {}",
                pg.message
            ),
        ),
        ServerError::Tls(_) => RouterError::fatal(
            sqlstate::CONNECTION_FAILURE,
            format!("podrouter: tenant \"{tenant}\" is unavailable: TLS with its pod failed"),
        )
        .with_hint("An operator should check tls.pod_tls and the pod's certificate; the router's log has the cause."),
        other => RouterError::fatal(
            sqlstate::CONNECTION_FAILURE,
            format!("podrouter: cannot log in to tenant \"{tenant}\" on its pod: {other}"),
        )
        .with_hint(
            "An operator should check that the role exists on the pod with the catalog's verifier.",
        ),
    }
}
