//! Admin routes for metrics, the planner and the autopilot: `GET /metrics` (Prometheus
//! text), `GET /v1/recommendations`, `POST /v1/rebalance` and `POST /v1/pods/{pod}/split`
//! (`{"dry_run": true}` answers the plan; otherwise `202` with the job).

use super::{body_or_default, AppError, AppState};
use crate::planner::ops;
use axum::extract::{Path, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::json;

type ApiResult<T> = Result<T, AppError>;

/// Under `/v1`.
pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/recommendations", get(recommendations))
        .route("/rebalance", post(rebalance))
        .route("/pods/{pod}/split", post(split))
}

/// `GET /metrics`: the Prometheus text format. Behind the admin token like `/v1` (when one
/// is configured; without one the admin listener is loopback-only).
pub async fn metrics(State(fleet): State<AppState>) -> Response {
    let top = fleet.config.load().metrics.top_tenants as usize;
    let text = fleet.metrics.render(top);
    ([(header::CONTENT_TYPE, prometheus::TEXT_FORMAT)], text).into_response()
}

async fn recommendations(State(fleet): State<AppState>) -> Json<serde_json::Value> {
    Json(json!(*fleet.planner.autopilot.recommendations()))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RebalanceRequest {
    #[serde(default)]
    dry_run: bool,
    #[serde(default = "default_max_moves")]
    max_moves: usize,
}

fn default_max_moves() -> usize {
    10
}

impl Default for RebalanceRequest {
    fn default() -> Self {
        RebalanceRequest {
            dry_run: false,
            max_moves: default_max_moves(),
        }
    }
}

/// `POST /v1/rebalance {"dry_run": bool, "max_moves": n}` (default 10 moves).
async fn rebalance(State(fleet): State<AppState>, body: axum::body::Bytes) -> ApiResult<Response> {
    let req: RebalanceRequest =
        body_or_default(&body, "send {\"dry_run\": true, \"max_moves\": 5}")?;
    if req.dry_run {
        let plan = ops::rebalance_plan(&fleet, req.max_moves).await?;
        return Ok(Json(json!({ "dry_run": true, "plan": plan })).into_response());
    }
    let job = ops::start_rebalance(&fleet, req.max_moves, "admin-api").await?;
    Ok((StatusCode::ACCEPTED, Json(job)).into_response())
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct SplitRequest {
    #[serde(default)]
    dry_run: bool,
    /// An existing pod to move half the load to; default a new one from the provider.
    #[serde(default)]
    to: Option<String>,
}

/// `POST /v1/pods/{pod}/split {"dry_run": bool, "to": optional pod}`.
async fn split(
    State(fleet): State<AppState>,
    Path(pod): Path<String>,
    body: axum::body::Bytes,
) -> ApiResult<Response> {
    let req: SplitRequest =
        body_or_default(&body, "send {} or {\"dry_run\": true} or {\"to\": \"POD\"}")?;
    if req.dry_run {
        let plan = ops::split_plan(&fleet, &pod, req.to.as_deref()).await?;
        return Ok(Json(json!({ "dry_run": true, "plan": plan })).into_response());
    }
    let job = ops::start_split(&fleet, &pod, req.to.as_deref(), "admin-api").await?;
    Ok((StatusCode::ACCEPTED, Json(job)).into_response())
}
