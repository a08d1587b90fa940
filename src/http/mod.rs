//! The HTTP listener (`http_listen`): SQL over HTTP and the tenant reverse proxy. Until that
//! capability lands, every request gets a clear JSON 501 so clients fail fast.

use crate::fleet::Fleet;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::{Json, Router};
use std::sync::Arc;

pub fn app(fleet: Arc<Fleet>) -> Router {
    Router::new()
        .fallback(|| async {
            (
                StatusCode::NOT_IMPLEMENTED,
                Json(serde_json::json!({"error": {
                    "code": "not_implemented",
                    "message": "SQL over HTTP and the tenant reverse proxy are not in this build yet; use the PostgreSQL wire listener"
                }})),
            )
                .into_response()
        })
        .with_state(fleet)
}
