//! Admin routes for pods: add (`POST /v1/pods`), show, delete, and drain (a `202` job that
//! moves every tenant off the pod). The fleet does the work ([`crate::fleet::NewPod`],
//! `Fleet::add_pod|delete_pod|drain_pod`); these map requests and statuses.

use super::{AppError, AppState};
use crate::fleet::{NewPod, PodView};
use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Value};

type ApiResult<T> = Result<T, AppError>;

/// Merged into `/v1` next to `GET /pods`, which lists pods.
pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/pods", post(add_pod))
        .route("/pods/{pod}", get(get_pod).delete(delete_pod))
        .route("/pods/{pod}/drain", post(drain_pod))
}

/// `POST /v1/pods` → 201 with the pod as `GET /v1/pods/{pod}` shows it.
async fn add_pod(
    State(fleet): State<AppState>,
    body: Result<Json<NewPod>, JsonRejection>,
) -> ApiResult<(StatusCode, Json<PodView>)> {
    let Json(pod) = body?;
    let name = pod.name.clone();
    fleet.add_pod(pod, "admin-api", json!({})).await?;
    Ok((StatusCode::CREATED, Json(fleet.pod(&name).await?)))
}

async fn get_pod(
    State(fleet): State<AppState>,
    Path(pod): Path<String>,
) -> ApiResult<Json<PodView>> {
    Ok(Json(fleet.pod(&pod).await?))
}

/// `DELETE /v1/pods/{pod}`: 409 while tenants live there, while jobs move tenants to or
/// from it, or when it comes from the config file.
async fn delete_pod(
    State(fleet): State<AppState>,
    Path(pod): Path<String>,
) -> ApiResult<Json<Value>> {
    Ok(Json(fleet.delete_pod(&pod, "admin-api").await?))
}

/// `POST /v1/pods/{pod}/drain` → 202 with the `drain` job.
async fn drain_pod(
    State(fleet): State<AppState>,
    Path(pod): Path<String>,
) -> ApiResult<(StatusCode, Json<Value>)> {
    let job = fleet.drain_pod(&pod, "admin-api").await?;
    Ok((StatusCode::ACCEPTED, Json(job)))
}
