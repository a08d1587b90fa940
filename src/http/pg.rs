//! Running SQL over HTTP statements on a checked-out server connection with the extended
//! protocol: Parse + Describe (the server infers parameter types) + Flush, then Bind (every
//! parameter as text, bound as a real parameter: never spliced into the SQL) + Execute +
//! Sync, results in text format turned into JSON ([`super::types`]).
//!
//! Caps are enforced while reading: Execute asks for one row more than `max_rows` (the
//! server stops there and the Sync closes the portal, so the connection stays poolable), and
//! result bytes are counted before a row is buffered. A statement past its timeout, or a
//! result past its byte cap, is cancelled with a CancelRequest and its connection closed
//! (the backend rolls back), never pooled: a late cancel must not hit someone else's query.

use super::types::{self, Oid};
use crate::proxy::cancel::{send_cancel, BackendTarget};
use crate::proxy::server::ServerConn;
use bytes::BytesMut;
use fallible_iterator::FallibleIterator;
use postgres_protocol::message::backend::Message;
use postgres_protocol::message::frontend;
use postgres_protocol::IsNull;
use serde::Serialize;
use serde_json::Value;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::Instant;

/// How long the server may take to reach ReadyForQuery after an error or the row cap.
const SETTLE: Duration = Duration::from_secs(2);

#[derive(Debug, Clone, Copy)]
pub struct Caps {
    pub max_rows: usize,
    pub max_bytes: usize,
    pub statement_timeout: Duration,
}

#[derive(Debug, Serialize)]
pub struct Column {
    pub name: String,
    #[serde(rename = "type")]
    pub type_name: String,
    #[serde(skip)]
    oid: Oid,
}

/// One statement's answer, as the API returns it.
#[derive(Debug, Serialize)]
pub struct QueryResult {
    pub command: String,
    pub row_count: Option<u64>,
    pub columns: Vec<Column>,
    pub rows: Vec<Vec<Value>>,
}

/// An ErrorResponse's fields, as the API returns them.
#[derive(Debug, Clone, Serialize)]
pub struct PgErrorFields {
    pub severity: String,
    pub sqlstate: String,
    pub message: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hint: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub position: Option<u32>,
}

#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    /// The statement failed on the server; the connection is fine.
    #[error("{}: {}", .0.sqlstate, .0.message)]
    Postgres(PgErrorFields),
    #[error("the statement returned more than {0} rows")]
    TooManyRows(usize),
    #[error("the result is larger than {0} bytes")]
    TooLarge(usize),
    #[error("the statement ran longer than {0:?} and was cancelled")]
    Timeout(Duration),
    /// The connection cannot be trusted any more (I/O, protocol, would not settle).
    #[error("lost the server connection: {0}")]
    Broken(String),
}

impl ExecError {
    /// Whether the server connection must be closed rather than pooled.
    pub fn breaks_connection(&self) -> bool {
        matches!(
            self,
            ExecError::Broken(_) | ExecError::Timeout(_) | ExecError::TooLarge(_)
        )
    }
}

fn broken(e: impl std::fmt::Display) -> ExecError {
    ExecError::Broken(e.to_string())
}

/// A conversation with one server connection. `status` is the last ReadyForQuery's.
pub struct Conversation<'a> {
    conn: &'a mut ServerConn,
    buf: BytesMut,
    out: BytesMut,
    pub status: u8,
    /// Result bytes read so far in this conversation (for `max_bytes`).
    bytes: usize,
}

/// Why reading stopped early while a statement ran.
enum Stop {
    Rows,
    Bytes,
    Timeout,
}

impl<'a> Conversation<'a> {
    pub fn new(conn: &'a mut ServerConn) -> Self {
        Conversation {
            conn,
            buf: BytesMut::with_capacity(8192),
            out: BytesMut::with_capacity(1024),
            status: b'I',
            bytes: 0,
        }
    }

    fn target(&self) -> BackendTarget {
        BackendTarget {
            addr: self.conn.addr,
            pid: self.conn.backend_pid,
            secret: self.conn.backend_secret,
        }
    }

    async fn send(&mut self) -> Result<(), ExecError> {
        let r = self.conn.stream.write_all(&self.out).await;
        self.out.clear();
        r.map_err(broken)
    }

    /// Reads one message (ErrorResponse included) by `deadline`; None when it passed.
    async fn read(&mut self, deadline: Instant) -> Result<Option<Message>, ExecError> {
        loop {
            if let Some(m) = Message::parse(&mut self.buf).map_err(broken)? {
                if let Message::ParameterStatus(p) = &m {
                    if let (Ok(n), Ok(v)) = (p.name(), p.value()) {
                        let (n, v) = (n.to_owned(), v.to_owned());
                        self.conn.set_param(&n, &v);
                        self.conn.synced_for = None;
                    }
                }
                return Ok(Some(m));
            }
            self.buf.reserve(8192);
            match tokio::time::timeout_at(deadline, self.conn.stream.read_buf(&mut self.buf)).await
            {
                Err(_) => return Ok(None),
                Ok(Ok(0)) => return Err(broken("the pod closed the connection")),
                Ok(Ok(_)) => {}
                Ok(Err(e)) => return Err(broken(e)),
            }
        }
    }

    /// Length of the next message once its header is in, without buffering its body.
    fn next_len(&self) -> Option<(u8, usize)> {
        crate::protocol::framing::peek_header(&self.buf)
            .ok()
            .flatten()
            .map(|h| (h.tag, h.wire_len))
    }

    /// Reads up to and including ReadyForQuery (the reply to a Sync already sent),
    /// discarding everything; the last error, if any, is returned.
    async fn settle(&mut self) -> Result<Option<PgErrorFields>, ExecError> {
        let deadline = Instant::now() + SETTLE;
        let mut error = None;
        loop {
            match self.read(deadline).await? {
                None => return Err(broken("the pod did not reach ReadyForQuery in time")),
                Some(Message::ReadyForQuery(r)) => {
                    self.status = r.status();
                    return Ok(error);
                }
                Some(Message::ErrorResponse(body)) => error = Some(error_fields(&body)),
                Some(_) => {}
            }
        }
    }

    /// Stops the running statement. The connection is not used again (the caller drops it,
    /// and the backend rolls back): reusing it would risk the cancel reaching the next
    /// statement run on it.
    async fn abandon(&mut self, e: ExecError) -> ExecError {
        send_cancel(self.target()).await;
        e
    }

    /// Parses and describes `sql`: the parameter types the server inferred and the columns.
    async fn describe(
        &mut self,
        sql: &str,
        deadline: Instant,
    ) -> Result<(Vec<Oid>, Vec<Column>), ExecError> {
        frontend::parse("", sql, std::iter::empty(), &mut self.out).map_err(broken)?;
        frontend::describe(b'S', "", &mut self.out).map_err(broken)?;
        frontend::flush(&mut self.out);
        self.send().await?;
        let mut params = Vec::new();
        loop {
            let Some(m) = self.read(deadline).await? else {
                return Err(self.abandon(ExecError::Timeout(Duration::ZERO)).await);
            };
            match m {
                Message::ParseComplete
                | Message::NoticeResponse(_)
                | Message::ParameterStatus(_) => {}
                Message::ParameterDescription(body) => {
                    params = body.parameters().collect().map_err(broken)?;
                }
                Message::NoData => return Ok((params, Vec::new())),
                Message::RowDescription(body) => {
                    let columns = body
                        .fields()
                        .map(|f| {
                            Ok(Column {
                                name: f.name().to_owned(),
                                type_name: types::type_name(f.type_oid()).into_owned(),
                                oid: f.type_oid(),
                            })
                        })
                        .collect()
                        .map_err(broken)?;
                    return Ok((params, columns));
                }
                Message::ErrorResponse(body) => {
                    let e = error_fields(&body);
                    // The server skips to the next Sync after an error.
                    frontend::sync(&mut self.out);
                    self.send().await?;
                    self.settle().await?;
                    return Err(ExecError::Postgres(e));
                }
                _ => return Err(broken("unexpected reply to Parse/Describe")),
            }
        }
    }

    /// Runs one statement with `params`, within `caps`.
    pub async fn run(
        &mut self,
        sql: &str,
        params: &[Value],
        caps: Caps,
    ) -> Result<QueryResult, ExecError> {
        let deadline = Instant::now() + caps.statement_timeout;
        let timeout = |e: ExecError| match e {
            ExecError::Timeout(_) => ExecError::Timeout(caps.statement_timeout),
            other => other,
        };
        let (param_types, columns) = self.describe(sql, deadline).await.map_err(timeout)?;
        let values: Vec<Option<String>> = params
            .iter()
            .enumerate()
            .map(|(i, v)| types::to_param(v, param_types.get(i).copied().unwrap_or(0)))
            .collect();
        let bound = frontend::bind(
            "",
            "",
            std::iter::once(0i16),
            values.iter(),
            |v, buf| match v {
                Some(s) => {
                    buf.extend_from_slice(s.as_bytes());
                    Ok(IsNull::No)
                }
                None => Ok(IsNull::Yes),
            },
            std::iter::once(0i16),
            &mut self.out,
        );
        if bound.is_err() {
            // Only a count past 65535 fails here; nothing was sent for this statement.
            self.out.clear();
            frontend::sync(&mut self.out);
            self.send().await?;
            self.settle().await?;
            return Err(ExecError::Postgres(PgErrorFields {
                severity: "ERROR".into(),
                sqlstate: "54000".into(),
                message: format!("podrouter: too many parameters ({})", params.len()),
                detail: None,
                hint: None,
                position: None,
            }));
        }
        let max_rows = i32::try_from(caps.max_rows + 1).unwrap_or(i32::MAX);
        frontend::execute("", max_rows, &mut self.out).map_err(broken)?;
        frontend::sync(&mut self.out);
        self.send().await?;

        let mut rows = Vec::new();
        let mut tag = None;
        let mut error = None;
        let stop = loop {
            if let Some((b'D', len)) = self.next_len() {
                if self.bytes + len > caps.max_bytes {
                    break Some(Stop::Bytes);
                }
            }
            let Some(m) = self.read(deadline).await? else {
                break Some(Stop::Timeout);
            };
            match m {
                Message::DataRow(body) => {
                    self.bytes += body.buffer().len() + 7;
                    if rows.len() >= caps.max_rows {
                        break Some(Stop::Rows);
                    }
                    rows.push(row_to_json(&body, &columns).map_err(broken)?);
                }
                Message::PortalSuspended => break Some(Stop::Rows),
                Message::CommandComplete(body) => {
                    tag = Some(body.tag().map_err(broken)?.to_owned())
                }
                Message::EmptyQueryResponse => tag = Some(String::new()),
                Message::ErrorResponse(body) => error = Some(error_fields(&body)),
                Message::ReadyForQuery(r) => {
                    self.status = r.status();
                    break None;
                }
                _ => {}
            }
        };
        match stop {
            None => {}
            Some(Stop::Rows) => {
                // The portal is suspended (or about to be): the Sync sent closes it.
                self.settle().await?;
                return Err(ExecError::TooManyRows(caps.max_rows));
            }
            Some(Stop::Bytes) => {
                return Err(self.abandon(ExecError::TooLarge(caps.max_bytes)).await)
            }
            Some(Stop::Timeout) => {
                return Err(self
                    .abandon(ExecError::Timeout(caps.statement_timeout))
                    .await)
            }
        }
        if let Some(e) = error {
            return Err(ExecError::Postgres(e));
        }
        let tag = tag.unwrap_or_default();
        let (command, row_count) = split_tag(&tag);
        Ok(QueryResult {
            command,
            row_count,
            columns,
            rows,
        })
    }

    /// Runs a statement without parameters or results, the router's own (BEGIN, ROLLBACK).
    pub async fn simple(&mut self, sql: &str, within: Duration) -> Result<(), ExecError> {
        frontend::query(sql, &mut self.out).map_err(broken)?;
        self.send().await?;
        let deadline = Instant::now() + within;
        let mut error = None;
        loop {
            match self.read(deadline).await? {
                None => return Err(self.abandon(ExecError::Timeout(within)).await),
                Some(Message::ErrorResponse(body)) => error = Some(error_fields(&body)),
                Some(Message::ReadyForQuery(r)) => {
                    self.status = r.status();
                    return match error {
                        Some(e) => Err(ExecError::Postgres(e)),
                        None => Ok(()),
                    };
                }
                Some(_) => {}
            }
        }
    }
}

fn row_to_json(
    body: &postgres_protocol::message::backend::DataRowBody,
    columns: &[Column],
) -> std::io::Result<Vec<Value>> {
    let buf = body.buffer();
    let mut out = Vec::with_capacity(columns.len());
    let mut ranges = body.ranges();
    let mut i = 0;
    while let Some(range) = ranges.next()? {
        let oid = columns.get(i).map_or(0, |c| c.oid);
        out.push(match range {
            None => Value::Null,
            Some(r) => types::to_json(oid, &String::from_utf8_lossy(&buf[r])),
        });
        i += 1;
    }
    Ok(out)
}

/// `INSERT 0 5` → ("INSERT", 5); `SELECT 2` → ("SELECT", 2); `CREATE TABLE` → no count.
fn split_tag(tag: &str) -> (String, Option<u64>) {
    let mut words: Vec<&str> = tag.split(' ').collect();
    let count = match words.last().and_then(|w| w.parse::<u64>().ok()) {
        Some(n) => {
            words.pop();
            // INSERT's tag also carries an oid (always 0) before the count.
            if words.len() == 2 && words[0] == "INSERT" {
                words.pop();
            }
            Some(n)
        }
        None => None,
    };
    (words.join(" "), count)
}

fn error_fields(body: &postgres_protocol::message::backend::ErrorResponseBody) -> PgErrorFields {
    let mut e = PgErrorFields {
        severity: String::new(),
        sqlstate: String::new(),
        message: String::new(),
        detail: None,
        hint: None,
        position: None,
    };
    let mut fields = body.fields();
    while let Ok(Some(f)) = fields.next() {
        let value = String::from_utf8_lossy(f.value_bytes()).into_owned();
        match f.type_() {
            b'V' => e.severity = value,
            b'S' if e.severity.is_empty() => e.severity = value,
            b'C' => e.sqlstate = value,
            b'M' => e.message = value,
            b'D' => e.detail = Some(value),
            b'H' => e.hint = Some(value),
            b'P' => e.position = value.parse().ok(),
            _ => {}
        }
    }
    e
}

#[cfg(test)]
mod tests {
    use super::split_tag;

    #[test]
    fn command_tags() {
        let check = |tag: &str, command: &str, count: Option<u64>| {
            assert_eq!(split_tag(tag), (command.to_owned(), count), "{tag}")
        };
        check("SELECT 2", "SELECT", Some(2));
        check("INSERT 0 5", "INSERT", Some(5));
        check("UPDATE 0", "UPDATE", Some(0));
        check("CREATE TABLE", "CREATE TABLE", None);
        check("COPY 3", "COPY", Some(3));
        check("", "", None);
    }
}
