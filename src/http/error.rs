//! The HTTP gateway's errors and their statuses, in one place. Every error answers
//! `{"error": {"code": "snake_case", "message": "what happened and what to do"}}`, plus the
//! Postgres fields (`sqlstate`, `severity`, `detail`, `hint`, `position`) when Postgres
//! raised it; limits add `Retry-After`.

use super::pg::{ExecError, PgErrorFields};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::{json, Value};
use std::time::Duration;

#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    pub retry_after: Option<Duration>,
    pub postgres: Option<Box<PgErrorFields>>,
    /// Which statement of a batch failed (0-based).
    pub statement: Option<usize>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            code,
            message: message.into(),
            retry_after: None,
            postgres: None,
            statement: None,
        }
    }

    pub fn bad_request(code: &'static str, message: impl Into<String>) -> Self {
        ApiError::new(StatusCode::BAD_REQUEST, code, message)
    }

    /// Over a rate or concurrency limit: `429` with `Retry-After`.
    pub fn too_many(message: impl Into<String>, wait: Duration) -> Self {
        ApiError::new(StatusCode::TOO_MANY_REQUESTS, "rate_limited", message).retry_after(wait)
    }

    pub fn retry_after(mut self, wait: Duration) -> Self {
        self.retry_after = Some(wait);
        self
    }

    pub fn at_statement(mut self, index: Option<usize>) -> Self {
        self.statement = index;
        self
    }

    /// Wrong password, unknown role, or a role not granted on the tenant: all the same.
    pub fn unauthorized(user: &str) -> Self {
        ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            format!("password authentication failed for user \"{user}\""),
        )
    }

    pub fn no_tenant() -> Self {
        ApiError::bad_request(
            "no_tenant",
            "name the tenant with the Podrouter-Tenant header, or send the request to a host name whose first label is the tenant (tenant1.db.example.com)",
        )
    }

    pub fn unknown_tenant(tenant: &str) -> Self {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "tenant_not_found",
            format!("tenant \"{tenant}\" does not exist; list tenants with `podrouter tenants`"),
        )
    }

    /// A failed statement. Postgres' own errors keep their SQLSTATE; the status says whose
    /// fault it was: the request's (400, 403 for privileges, 409 for serialization failures
    /// and deadlocks, which are worth a retry) or the server's (503).
    pub fn from_exec(e: ExecError) -> Self {
        match e {
            ExecError::Postgres(pg) => {
                let status = match pg.sqlstate.get(..2).unwrap_or("") {
                    _ if pg.sqlstate == "42501" => StatusCode::FORBIDDEN,
                    "40" => StatusCode::CONFLICT,
                    "08" | "53" | "57" | "58" | "XX" => StatusCode::SERVICE_UNAVAILABLE,
                    _ => StatusCode::BAD_REQUEST,
                };
                ApiError {
                    postgres: Some(Box::new(pg.clone())),
                    ..ApiError::new(status, "postgres_error", pg.message)
                }
            }
            ExecError::TooManyRows(n) => ApiError::bad_request(
                "row_limit",
                format!("the statement returned more than {n} rows (http.max_rows); add a LIMIT or page with WHERE/ORDER BY"),
            ),
            ExecError::TooLarge(n) => ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "response_too_large",
                format!("the result is larger than {n} bytes (http.max_response); select fewer rows or columns"),
            ),
            ExecError::Timeout(d) => ApiError {
                postgres: Some(Box::new(PgErrorFields {
                    severity: "ERROR".into(),
                    sqlstate: "57014".into(),
                    message: "canceling statement due to statement timeout".into(),
                    detail: None,
                    hint: None,
                    position: None,
                })),
                ..ApiError::new(
                    StatusCode::GATEWAY_TIMEOUT,
                    "statement_timeout",
                    format!("the statement ran longer than {d:?} (http.statement_timeout) and was cancelled; nothing of the request was committed"),
                )
            },
            ExecError::Broken(why) => ApiError::new(
                StatusCode::BAD_GATEWAY,
                "server_connection_lost",
                format!("{why}; nothing is known to be committed unless the request was a single statement that finished; retry if it is safe"),
            ),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut error = json!({"code": self.code, "message": self.message});
        if let Some(pg) = &self.postgres {
            if let (Value::Object(e), Ok(Value::Object(fields))) =
                (&mut error, serde_json::to_value(pg))
            {
                e.extend(fields);
            }
        }
        if let Some(i) = self.statement {
            error["statement"] = json!(i);
        }
        let mut resp = (self.status, axum::Json(json!({ "error": error }))).into_response();
        if let Some(wait) = self.retry_after {
            resp.headers_mut().insert(
                header::RETRY_AFTER,
                HeaderValue::from(crate::limits::retry_after_secs(wait)),
            );
        }
        if self.status == StatusCode::UNAUTHORIZED {
            resp.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Basic realm=\"podrouter\", charset=\"UTF-8\""),
            );
        }
        resp
    }
}
