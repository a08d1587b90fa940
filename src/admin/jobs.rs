//! Admin routes for live moves, jobs and operator pauses.

use super::{AppError, AppState};
use crate::fleet::FleetError;
use crate::jobs::JobView;
use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::json;

type ApiResult<T> = Result<T, AppError>;

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/tenants/{tenant}/move", post(move_tenant))
        .route("/tenants/{tenant}/pause", post(pause_tenant))
        .route("/tenants/{tenant}/resume", post(resume_tenant))
        .route("/jobs", get(list_jobs))
        .route("/jobs/{id}", get(get_job).delete(cancel_job))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MoveRequest {
    /// The pod to move the tenant to.
    pub to: String,
}

/// `POST /v1/tenants/{tenant}/move {"to": pod}` → 202 with the job.
async fn move_tenant(
    State(fleet): State<AppState>,
    Path(tenant): Path<String>,
    body: Result<Json<MoveRequest>, JsonRejection>,
) -> ApiResult<(StatusCode, Json<JobView>)> {
    let Json(req) = body?;
    let job = crate::mover::start_move(&fleet, &tenant, &req.to, "admin-api", None).await?;
    Ok((StatusCode::ACCEPTED, Json(job.into())))
}

async fn pause_tenant(
    State(fleet): State<AppState>,
    Path(tenant): Path<String>,
) -> ApiResult<Json<serde_json::Value>> {
    Ok(Json(json!(fleet.pause_tenant(&tenant, "admin-api").await?)))
}

async fn resume_tenant(
    State(fleet): State<AppState>,
    Path(tenant): Path<String>,
) -> ApiResult<Json<serde_json::Value>> {
    Ok(Json(json!(
        fleet.resume_tenant(&tenant, "admin-api").await?
    )))
}

#[derive(Deserialize)]
struct JobsParams {
    #[serde(default = "default_limit")]
    limit: i64,
}

fn default_limit() -> i64 {
    100
}

async fn list_jobs(
    State(fleet): State<AppState>,
    Query(p): Query<JobsParams>,
) -> ApiResult<Json<serde_json::Value>> {
    let jobs: Vec<JobView> = fleet
        .jobs
        .list(p.limit.clamp(1, 1000))
        .await
        .map_err(FleetError::from)?
        .into_iter()
        .map(Into::into)
        .collect();
    Ok(Json(json!({ "jobs": jobs })))
}

fn unknown_job(id: i64) -> AppError {
    AppError(
        StatusCode::NOT_FOUND,
        "unknown_job",
        format!("job {id} does not exist; list jobs with GET /v1/jobs"),
    )
}

async fn get_job(State(fleet): State<AppState>, Path(id): Path<i64>) -> ApiResult<Json<JobView>> {
    let job = fleet.jobs.get(id).await.map_err(FleetError::from)?;
    Ok(Json(job.ok_or_else(|| unknown_job(id))?.into()))
}

/// `DELETE /v1/jobs/{id}`: cancels a running job (202; it rolls back and ends `cancelled`,
/// or finishes if past its point of no return). A finished job answers 409.
async fn cancel_job(
    State(fleet): State<AppState>,
    Path(id): Path<i64>,
) -> ApiResult<(StatusCode, Json<JobView>)> {
    let job = fleet
        .jobs
        .get(id)
        .await
        .map_err(FleetError::from)?
        .ok_or_else(|| unknown_job(id))?;
    if !matches!(job.state.as_str(), "pending" | "running") {
        return Err(AppError(
            StatusCode::CONFLICT,
            "job_finished",
            format!("job {id} already ended ({}); nothing to cancel", job.state),
        ));
    }
    if !fleet.jobs.cancel(id) {
        let owner = crate::fleet::routers::describe(&fleet, job.owner).await;
        return Err(AppError(
            StatusCode::CONFLICT,
            "job_elsewhere",
            format!("job {id} is not running in this router but in {owner}; send the DELETE to that router's admin API"),
        ));
    }
    crate::catalog::audit_quietly(&fleet.catalog, "admin-api", "job.cancel", &id.to_string()).await;
    Ok((StatusCode::ACCEPTED, Json(job.into())))
}
