//! The admin API: JSON over HTTP with a bearer token on everything under `/v1`. `app(fleet)`
//! builds the whole router, so tests drive it with `tower::ServiceExt::oneshot`.
//! Errors are mapped to statuses in one place ([`AppError`]).

mod jobs;
pub mod openapi;
mod planner;
mod pods;

use crate::failover::FailoverRequest;
use crate::fleet::{ErrorKind, Fleet, FleetError, NewTenant, ReloadError};
use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, Query, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::json;
use std::sync::Arc;

pub type AppState = Arc<Fleet>;

/// Largest request body the admin API reads.
const MAX_BODY: usize = 1024 * 1024;

pub fn app(fleet: AppState) -> Router {
    let v1 = Router::new()
        .route("/pods", get(list_pods))
        .route("/pods/{pod}/failover", post(failover_pod))
        .route("/tenants", get(list_tenants).post(create_tenant))
        .route(
            "/tenants/{tenant}",
            get(get_tenant).delete(delete_tenant).patch(patch_tenant),
        )
        .route("/roles", post(put_role))
        .route("/audit", get(audit))
        .route("/config/reload", post(reload_config))
        .route("/config/history", get(config_history))
        .route("/config/history/{version}", get(config_version))
        .merge(jobs::routes())
        .merge(planner::routes())
        .merge(pods::routes())
        .fallback(not_found)
        .route_layer(middleware::from_fn_with_state(fleet.clone(), require_token));
    let metrics = Router::new()
        .route("/metrics", get(planner::metrics))
        .route_layer(middleware::from_fn_with_state(fleet.clone(), require_token));
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .nest("/v1", v1)
        .merge(metrics)
        .merge(openapi::routes())
        .fallback(not_found)
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY))
        .with_state(fleet)
}

// === impl AppError ===

pub struct AppError(pub StatusCode, pub &'static str, pub String);

fn status(kind: ErrorKind) -> StatusCode {
    match kind {
        ErrorKind::BadRequest => StatusCode::BAD_REQUEST,
        ErrorKind::NotFound => StatusCode::NOT_FOUND,
        ErrorKind::Conflict => StatusCode::CONFLICT,
        ErrorKind::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        ErrorKind::Internal => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

impl From<FleetError> for AppError {
    fn from(e: FleetError) -> Self {
        AppError(status(e.kind), e.code, e.message)
    }
}

impl From<JsonRejection> for AppError {
    fn from(e: JsonRejection) -> Self {
        AppError(
            StatusCode::BAD_REQUEST,
            "invalid_json",
            format!("{}; send a JSON body as documented at /v1", e.body_text()),
        )
    }
}

impl IntoResponse for AppError {
    fn into_response(self) -> Response {
        (
            self.0,
            Json(json!({"error": {"code": self.1, "message": self.2}})),
        )
            .into_response()
    }
}

type ApiResult<T> = Result<T, AppError>;

async fn not_found() -> AppError {
    AppError(
        StatusCode::NOT_FOUND,
        "not_found",
        "no such endpoint; see the admin API in the README".into(),
    )
}

fn token_matches(expected: &str, got: &str) -> bool {
    // Constant-time in the token's content.
    expected.len() == got.len()
        && expected
            .bytes()
            .zip(got.bytes())
            .fold(0u8, |a, (x, y)| a | (x ^ y))
            == 0
}

async fn require_token(State(fleet): State<AppState>, req: Request, next: Next) -> Response {
    let Some(expected) = fleet.admin_token.as_deref() else {
        // No token: config validation allows that only on a loopback admin_listen. Should a
        // call from elsewhere arrive all the same (the token file vanished after validation,
        // a listener bound by hand), it is refused rather than trusted.
        let peer = req
            .extensions()
            .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
            .map(|c| c.0.ip());
        if peer.is_some_and(|ip| !ip.is_loopback()) {
            return AppError(
                StatusCode::FORBIDDEN,
                "admin_token_required",
                "this router has no admin token, so its admin API only answers loopback callers; set router.admin_token_file and restart".into(),
            )
            .into_response();
        }
        return next.run(req).await;
    };
    let given = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    match given {
        Some(t) if token_matches(expected, t.trim()) => next.run(req).await,
        Some(_) => AppError(
            StatusCode::FORBIDDEN,
            "bad_token",
            "the bearer token is wrong; use the one in router.admin_token_file".into(),
        )
        .into_response(),
        None => AppError(
            StatusCode::UNAUTHORIZED,
            "missing_token",
            "send `Authorization: Bearer <token>` (the token is in router.admin_token_file)".into(),
        )
        .into_response(),
    }
}

async fn readyz(State(fleet): State<AppState>) -> Response {
    match sqlx::query("SELECT 1").execute(fleet.catalog.pool()).await {
        Ok(_) => (StatusCode::OK, "ready\n").into_response(),
        Err(e) => AppError(
            StatusCode::SERVICE_UNAVAILABLE,
            "catalog_unavailable",
            format!("the catalog does not answer: {e}"),
        )
        .into_response(),
    }
}

async fn list_pods(State(fleet): State<AppState>) -> ApiResult<Json<serde_json::Value>> {
    Ok(Json(json!({ "pods": fleet.pods().await? })))
}

async fn list_tenants(State(fleet): State<AppState>) -> ApiResult<Json<serde_json::Value>> {
    Ok(Json(json!({ "tenants": fleet.tenants().await? })))
}

async fn get_tenant(
    State(fleet): State<AppState>,
    Path(tenant): Path<String>,
) -> ApiResult<Json<serde_json::Value>> {
    Ok(Json(json!(fleet.tenant(&tenant).await?)))
}

async fn create_tenant(
    State(fleet): State<AppState>,
    body: Result<Json<NewTenant>, JsonRejection>,
) -> ApiResult<(StatusCode, Json<serde_json::Value>)> {
    let Json(req) = body?;
    let t = fleet.create_tenant(req, "admin-api").await?;
    Ok((StatusCode::CREATED, Json(json!(t))))
}

#[derive(Deserialize)]
struct DeleteParams {
    #[serde(default)]
    drop_database: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TenantPatch {
    /// "session", "transaction", or null to follow the pod and the config.
    pool_mode: Option<crate::config::PoolMode>,
}

async fn patch_tenant(
    State(fleet): State<AppState>,
    Path(tenant): Path<String>,
    body: Result<Json<TenantPatch>, JsonRejection>,
) -> ApiResult<Json<serde_json::Value>> {
    let Json(p) = body?;
    let t = fleet
        .set_tenant_pool_mode(&tenant, p.pool_mode, "admin-api")
        .await?;
    Ok(Json(json!(t)))
}

async fn delete_tenant(
    State(fleet): State<AppState>,
    Path(tenant): Path<String>,
    Query(p): Query<DeleteParams>,
) -> ApiResult<Json<serde_json::Value>> {
    Ok(Json(
        fleet
            .delete_tenant(&tenant, p.drop_database, "admin-api")
            .await?,
    ))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewRole {
    name: String,
    password: String,
}

async fn put_role(
    State(fleet): State<AppState>,
    body: Result<Json<NewRole>, JsonRejection>,
) -> ApiResult<(StatusCode, Json<serde_json::Value>)> {
    let Json(r) = body?;
    fleet.put_role(&r.name, &r.password, "admin-api").await?;
    Ok((StatusCode::CREATED, Json(json!({"name": r.name}))))
}

#[derive(Deserialize)]
struct AuditParams {
    #[serde(default = "default_limit")]
    limit: i64,
}

fn default_limit() -> i64 {
    100
}

async fn audit(
    State(fleet): State<AppState>,
    Query(p): Query<AuditParams>,
) -> ApiResult<Json<serde_json::Value>> {
    let entries = fleet
        .catalog
        .audit_entries(p.limit.clamp(1, 1000))
        .await
        .map_err(FleetError::from)?;
    Ok(Json(json!({ "entries": entries })))
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct ReloadRequest {
    #[serde(default)]
    force: bool,
}

/// A JSON body, where an empty one means the request's defaults.
fn body_or_default<T: serde::de::DeserializeOwned + Default>(
    body: &[u8],
    hint: &str,
) -> Result<T, AppError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(T::default());
    }
    serde_json::from_slice(body).map_err(|e| {
        AppError(
            StatusCode::BAD_REQUEST,
            "invalid_json",
            format!("{e}; {hint}"),
        )
    })
}

/// `POST /v1/pods/{pod}/failover` `{"to": optional replica URL}` (an empty body: the least
/// lagging replica). Synchronous for now: answers 200 with the finished job, `succeeded` or
/// `failed`; 404 unknown pod, 409 no healthy replica, 400 `to` is not one of its replicas.
async fn failover_pod(
    State(fleet): State<AppState>,
    Path(pod): Path<String>,
    body: axum::body::Bytes,
) -> ApiResult<Json<serde_json::Value>> {
    let req: FailoverRequest =
        body_or_default(&body, "send {} or {\"to\": \"postgres://USER@HOST:PORT\"}")?;
    Ok(Json(json!(fleet.failover(&pod, req, "admin-api").await?)))
}

/// `POST /v1/config/reload`: an empty body means `{"force": false}`. A refused reload's
/// error also lists the refusals as `{"field", "reason"}`.
async fn reload_config(State(fleet): State<AppState>, body: axum::body::Bytes) -> Response {
    let req: ReloadRequest =
        match body_or_default(&body, "send {\"force\": false} or {\"force\": true}") {
            Ok(r) => r,
            Err(e) => return e.into_response(),
        };
    match fleet.reload_config(req.force, "admin-api").await {
        Ok(outcome) => Json(json!(outcome)).into_response(),
        Err(e) => {
            let mut error = json!({"code": e.code(), "message": e.to_string()});
            if let ReloadError::Refused(refusals) = &e {
                error["refusals"] = json!(refusals);
            }
            (status(e.kind()), Json(json!({ "error": error }))).into_response()
        }
    }
}

#[derive(Deserialize)]
struct HistoryParams {
    #[serde(default = "default_history_limit")]
    limit: i64,
}

fn default_history_limit() -> i64 {
    50
}

async fn config_history(
    State(fleet): State<AppState>,
    Query(p): Query<HistoryParams>,
) -> ApiResult<Json<serde_json::Value>> {
    let versions = fleet
        .catalog
        .config_versions(p.limit.clamp(1, 1000))
        .await
        .map_err(FleetError::from)?;
    Ok(Json(json!({ "versions": versions })))
}

/// One version with its text (`config`), passwords in URLs redacted.
async fn config_version(
    State(fleet): State<AppState>,
    Path(version): Path<i64>,
) -> ApiResult<Json<serde_json::Value>> {
    let mut v = fleet
        .catalog
        .config_version(version)
        .await
        .map_err(FleetError::from)?
        .ok_or_else(|| {
            AppError(
                StatusCode::NOT_FOUND,
                "unknown_config_version",
                format!("config version {version} does not exist; list versions with GET /v1/config/history"),
            )
        })?;
    v.config = v.config.map(|t| crate::config::redact_text(&t));
    Ok(Json(json!(v)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_compare() {
        assert!(token_matches("abc", "abc"));
        assert!(!token_matches("abc", "abd"));
        assert!(!token_matches("abc", "ab"));
    }
}
