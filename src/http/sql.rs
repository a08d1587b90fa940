//! `POST /v1/sql`: SQL over HTTP for a tenant. The request's life cycle, phase by phase:
//! tenant (header or host) → Basic credentials checked against the role's verifier (before
//! the tenant is looked up, as on the wire) → grant → the tenant's rate limit → the body →
//! [`checkout_for_http`]: the tenant's pause gate, then a server connection from the *same*
//! pool wire clients of that tenant and role use → the statements ([`super::pg`]) → the
//! connection back to the pool when idle and clean, else closed.
//!
//! One statement runs in its own implicit transaction; a batch (`{"queries": [...]}`) runs
//! in one explicit transaction that is rolled back as a whole when any statement fails.

use super::error::ApiError;
use super::pg::{Caps, Conversation, ExecError, QueryResult};
use super::{auth, tenant_of, Gateway};
use crate::proxy::cancel::{send_cancel, BackendTarget};
use crate::proxy::pool::{Checkout, CheckoutError, Pool};
use crate::proxy::server::params_signature;
use crate::proxy::Proxy;
use crate::routing::pause::{GatePass, Held};
use crate::routing::{RoleAuth, TenantRoute};
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::sync::Arc;
use std::time::Duration;

/// Session settings of every HTTP statement, so results come in a form [`super::types`]
/// reads the same way every time: UTF-8, ISO dates in UTC, hex bytea.
pub const HTTP_SESSION: &[(&str, &str)] = &[
    ("client_encoding", "UTF8"),
    ("DateStyle", "ISO, MDY"),
    ("TimeZone", "UTC"),
    ("bytea_output", "hex"),
];

/// Statements in one batch at most.
const MAX_BATCH: usize = 1000;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Statement {
    query: String,
    #[serde(default)]
    params: Vec<Value>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SqlRequest {
    #[serde(default)]
    query: Option<String>,
    #[serde(default)]
    params: Vec<Value>,
    #[serde(default)]
    queries: Option<Vec<Statement>>,
}

/// The answer: one statement's result, or a batch's results in order.
#[derive(Serialize)]
#[serde(untagged)]
enum Answer {
    One(QueryResult),
    Batch { results: Vec<QueryResult> },
}

pub async fn handle(State(gw): State<Arc<Gateway>>, req: Request) -> Response {
    match run(&gw, req).await {
        Ok(v) => Json(v).into_response(),
        Err(e) => e.into_response(),
    }
}

async fn run(gw: &Gateway, req: Request) -> Result<Answer, ApiError> {
    let (parts, body) = req.into_parts();
    let tenant_name = tenant_of(&parts.headers).ok_or_else(ApiError::no_tenant)?;
    let creds = auth::basic(&parts.headers).ok_or_else(|| {
        ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "send the tenant role's user name and password with HTTP Basic authentication (curl -u user:password)",
        )
    })?;
    let proxy = &gw.fleet.proxy;
    let table = proxy.table.load_full();
    let role = table.roles.get(&creds.user).cloned();
    // Authenticate first: only an authenticated role learns whether a tenant exists.
    let client_key = gw
        .logins
        .verify(
            role.as_deref(),
            &creds.user,
            &creds.password,
            proxy.mock_secret(),
        )
        .await
        .ok_or_else(|| ApiError::unauthorized(&creds.user))?;
    let role = role.ok_or_else(|| ApiError::unauthorized(&creds.user))?;
    let tenant = table
        .tenant(&tenant_name)
        .cloned()
        .ok_or_else(|| ApiError::unknown_tenant(&tenant_name))?;
    if table.authorized(&tenant, &creds.user).is_none() {
        return Err(ApiError::unauthorized(&creds.user));
    }
    drop(table);
    gw.admit_tenant(&tenant.name)?;

    let (limits, http) = {
        let c = gw.fleet.config.load();
        (c.limits.clone(), c.http.clone())
    };
    if declared_too_large(&parts.headers, limits.http_max_body.0) {
        return Err(body_too_large(limits.http_max_body.0));
    }
    let body = read_body(
        body,
        limits.http_max_body.0 as usize,
        limits.http_idle_timeout.0,
    )
    .await?;
    let request: SqlRequest = serde_json::from_slice(&body).map_err(|e| {
        ApiError::bad_request(
            "invalid_json",
            format!("{e}; send {{\"query\": \"...\", \"params\": [...]}} or {{\"queries\": [{{\"query\": \"...\", \"params\": [...]}}, ...]}}"),
        )
    })?;
    let (statements, batch) = match (request.query, request.queries) {
        (Some(query), None) => (
            vec![Statement {
                query,
                params: request.params,
            }],
            false,
        ),
        (None, Some(qs)) if !qs.is_empty() && qs.len() <= MAX_BATCH && request.params.is_empty() => {
            (qs, true)
        }
        _ => {
            return Err(ApiError::bad_request(
                "invalid_request",
                format!("send either \"query\" (with optional \"params\") or \"queries\" with 1 to {MAX_BATCH} statements"),
            ))
        }
    };
    for (i, s) in statements.iter().enumerate() {
        if let Some(word) = transaction_control(&s.query) {
            return Err(ApiError::bad_request(
                "transaction_control",
                format!("{word} is not allowed: each request is one transaction; send the statements together as a batch, {{\"queries\": [...]}}"),
            )
            .at_statement(batch.then_some(i)));
        }
    }
    let caps = Caps {
        max_rows: http.max_rows as usize,
        max_bytes: http.max_response.0 as usize,
        statement_timeout: http.statement_timeout.0,
    };

    let (mut co, pool, _pass) = checkout_for_http(proxy, &tenant, &role, client_key).await?;
    // A client that goes away mid-request drops this future and with it the connection;
    // the cancel stops what the backend was running for it.
    let cancel = CancelOnDrop(Some(BackendTarget {
        addr: co.conn.addr,
        pid: co.conn.backend_pid,
        secret: co.conn.backend_secret,
    }));
    let outcome = execute(&mut co, &statements, batch, caps).await;
    cancel.disarm();
    match &outcome {
        Err((e, _)) if e.breaks_connection() => drop(co),
        _ => pool.release(co, None),
    }
    let results = outcome.map_err(|(e, i)| ApiError::from_exec(e).at_statement(i))?;
    Ok(if batch {
        Answer::Batch { results }
    } else {
        Answer::One(results.into_iter().next().expect("one statement"))
    })
}

/// Sends a CancelRequest for a backend when dropped before [`CancelOnDrop::disarm`].
struct CancelOnDrop(Option<BackendTarget>);

impl CancelOnDrop {
    fn disarm(mut self) {
        self.0 = None;
    }
}

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        if let Some(target) = self.0.take() {
            tokio::spawn(send_cancel(target));
        }
    }
}

/// Runs the statements; the connection is idle and clean afterwards unless the error says
/// it breaks the connection. Errors carry the failing statement's index in a batch.
async fn execute(
    co: &mut Checkout,
    statements: &[Statement],
    batch: bool,
    caps: Caps,
) -> Result<Vec<QueryResult>, (ExecError, Option<usize>)> {
    let mut talk = Conversation::new(&mut co.conn);
    let own = caps.statement_timeout;
    if batch {
        talk.simple("BEGIN", own).await.map_err(|e| (e, None))?;
    }
    let mut results = Vec::with_capacity(statements.len());
    for (i, s) in statements.iter().enumerate() {
        match talk.run(&s.query, &s.params, caps).await {
            Ok(r) => results.push(r),
            Err(e) => {
                if !e.breaks_connection() && talk.status != b'I' {
                    talk.simple("ROLLBACK", own).await.map_err(|e| (e, None))?;
                }
                return Err((e, batch.then_some(i)));
            }
        }
    }
    if batch {
        talk.simple("COMMIT", own).await.map_err(|e| (e, None))?;
    }
    if talk.status != b'I' {
        // A statement left a transaction open that transaction_control() did not see.
        talk.simple("ROLLBACK", own).await.map_err(|e| (e, None))?;
        return Err((
            ExecError::Postgres(super::pg::PgErrorFields {
                severity: "ERROR".into(),
                sqlstate: "25000".into(),
                message: "podrouter: the request left a transaction open; it was rolled back"
                    .into(),
                detail: None,
                hint: Some("Send several statements as one batch, {\"queries\": [...]}.".into()),
                position: None,
            }),
            None,
        ));
    }
    Ok(results)
}

/// The first keyword when a statement starts or ends a transaction itself.
fn transaction_control(query: &str) -> Option<String> {
    let word: String = query
        .trim_start()
        .chars()
        .take_while(|c| c.is_ascii_alphabetic())
        .collect::<String>()
        .to_ascii_uppercase();
    matches!(
        word.as_str(),
        "BEGIN" | "START" | "COMMIT" | "END" | "ROLLBACK" | "ABORT"
    )
    .then_some(word)
}

async fn read_body(body: Body, limit: usize, within: Duration) -> Result<bytes::Bytes, ApiError> {
    match tokio::time::timeout(within, axum::body::to_bytes(body, limit)).await {
        Err(_) => Err(ApiError::new(
            StatusCode::REQUEST_TIMEOUT,
            "body_timeout",
            format!("the request body did not arrive within {within:?}"),
        )),
        Ok(Ok(b)) => Ok(b),
        Ok(Err(e)) => {
            let mut source: Option<&dyn std::error::Error> = Some(&e);
            while let Some(s) = source {
                if s.is::<http_body_util::LengthLimitError>() {
                    return Err(body_too_large(limit as u64));
                }
                source = s.source();
            }
            Err(ApiError::bad_request(
                "invalid_body",
                format!("cannot read the request body: {e}"),
            ))
        }
    }
}

fn body_too_large(limit: u64) -> ApiError {
    ApiError::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        "body_too_large",
        format!("the request body is larger than {limit} bytes (limits.http_max_body)"),
    )
}

/// Whether the declared `content-length` is over `limit` (checked before reading a byte).
pub fn declared_too_large(headers: &axum::http::HeaderMap, limit: u64) -> bool {
    headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        .is_some_and(|n| n > limit)
}

/// A server connection for one HTTP request, the way a wire session gets one for a
/// transaction: through the tenant's pause gate (held during a live move's cutover, and
/// the route read again afterwards, so a held request runs on the pod the move switched
/// to), then from the pool of (tenant, role, the pod's primary) that wire clients share,
/// with the session settings [`HTTP_SESSION`]. The gate pass is held until the request ends.
pub async fn checkout_for_http(
    proxy: &Proxy,
    tenant: &TenantRoute,
    role: &Arc<RoleAuth>,
    client_key: [u8; 32],
) -> Result<(Checkout, Arc<Pool>, GatePass), ApiError> {
    let settings = proxy.settings();
    let gate = proxy.gates.get(&tenant.name);
    let pass = match gate.try_enter() {
        Some(pass) => pass,
        None => gate
            .enter(settings.pause_hold, settings.max_held_clients)
            .await
            .map_err(|held| {
                let why = match held {
                    Held::QueueFull { limit, reason } => {
                        format!("is paused by {reason} and {limit} clients already wait")
                    }
                    Held::TimedOut { waited, reason } => {
                        format!("is paused by {reason} and did not resume within {waited:?}")
                    }
                };
                ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "tenant_paused",
                    format!("tenant \"{}\" {why}; retry shortly", tenant.name),
                )
                .retry_after(Duration::from_secs(1))
            })?,
    };
    let route = proxy
        .table
        .load()
        .tenant(&tenant.name)
        .cloned()
        .ok_or_else(|| ApiError::unknown_tenant(&tenant.name))?;
    let pool = proxy.pool_for(&route, role);
    pool.remember_auth(client_key, &role.verifier);
    let mut co = pool.checkout(&settings.limits).await.map_err(|e| {
        let busy = |m: String| {
            ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "no_server_connection", m)
                .retry_after(Duration::from_secs(1))
        };
        match e {
            CheckoutError::Timeout { size, waited } => busy(format!(
                "all {size} server connections of tenant \"{}\" stayed busy for {waited:?} (53300); retry later, or raise pool.size",
                route.name
            )),
            CheckoutError::PodFull { limit } => busy(format!(
                "the pod of tenant \"{}\" is at its limit of {limit} server connections (53300); retry later",
                route.name
            )),
            CheckoutError::Server(e) => {
                tracing::warn!(tenant = %route.name, pod = %route.pod.name, "server connection failed: {e}");
                ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "tenant_unavailable",
                    crate::proxy::server::client_error(&route.name, &e).message,
                )
                .retry_after(Duration::from_secs(1))
            }
        }
    })?;
    let wanted: Vec<(String, String)> = HTTP_SESSION
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    let signature = params_signature(&wanted);
    if co.conn.synced_for != Some(signature) {
        co.conn
            .sync_params(&wanted, settings.limits.connect_timeout)
            .await
            .map_err(|e| {
                ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "tenant_unavailable",
                    format!(
                        "cannot prepare a server connection of tenant \"{}\": {e}",
                        route.name
                    ),
                )
            })?;
        co.conn.synced_for = Some(signature);
    }
    Ok((co, pool, pass))
}

#[cfg(test)]
mod tests {
    use super::transaction_control;

    #[test]
    fn transaction_control_statements_are_spotted() {
        for q in [
            "begin",
            "  BEGIN ISOLATION LEVEL SERIALIZABLE",
            "commit;",
            "Rollback",
            "end",
            "start transaction",
            "abort",
        ] {
            assert!(transaction_control(q).is_some(), "{q}");
        }
        for q in [
            "select 1",
            "insert into begin_log values (1)",
            "savepoint a",
            "beginning",
        ] {
            assert!(transaction_control(q).is_none(), "{q}");
        }
    }
}
