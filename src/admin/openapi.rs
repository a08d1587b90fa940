//! The OpenAPI 3.1 document of the admin API, served without a token at `GET /openapi.json`.
//!
//! Every operation is declared here with `#[utoipa::path]` on a documentation-only function,
//! and its bodies as `ToSchema` types that mirror what the handlers send and accept. The
//! handlers live in several files owned by different parts of the code; keeping the contract
//! in one file makes it reviewable as a whole. `tests/it/admin_jobs.rs` keeps it true: every
//! route of `app()` must appear here with its methods, every operation here must reach a
//! handler, and real responses must have exactly the documented fields.

// Documentation types are never built and the operation functions never called: they exist
// for the derives and the path macros.
#![allow(dead_code)]

use super::AppState;
use axum::routing::get;
use axum::{Json, Router};
use serde_json::Value;
use std::sync::LazyLock;
use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityScheme};
use utoipa::{Modify, OpenApi, ToSchema};

pub fn routes() -> Router<AppState> {
    Router::new().route("/openapi.json", get(|| async { Json(DOCUMENT.clone()) }))
}

/// The document as JSON, built once.
static DOCUMENT: LazyLock<Value> =
    LazyLock::new(|| serde_json::to_value(ApiDoc::openapi()).expect("the document serialises"));

/// The document (for tests and tools).
pub fn document() -> Value {
    DOCUMENT.clone()
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "podrouter admin API",
        description = "Pods, tenants, live moves, jobs and config of a podrouter fleet. Every \
                       /v1 call needs `Authorization: Bearer <token>` (router.admin_token_file); \
                       every mutating call is written to the audit log (GET /v1/audit). Errors \
                       are `{\"error\": {\"code\", \"message\"}}`."
    ),
    paths(
        healthz, readyz, openapi_json,
        list_pods, add_pod, get_pod, delete_pod, drain_pod, failover_pod,
        list_tenants, create_tenant, get_tenant, patch_tenant, delete_tenant,
        move_tenant, pause_tenant, resume_tenant,
        create_role, audit,
        reload_config, config_history, config_version,
        list_jobs, get_job, cancel_job,
        metrics, recommendations, rebalance, split_pod,
    ),
    components(schemas(ErrorBody)),
    modifiers(&BearerToken),
    security(("bearer" = [])),
    tags(
        (name = "health", description = "Liveness, readiness and this document; no token."),
        (name = "pods", description = "Pods: a Postgres primary, its replicas and HTTP upstreams."),
        (name = "tenants", description = "Tenants (one database each), moves and pauses."),
        (name = "jobs", description = "Long-running operations: moves and drains."),
        (name = "roles", description = "Client roles (SCRAM verifiers only)."),
        (name = "config", description = "pods.toml reloads and their history."),
        (name = "audit", description = "The audit log of mutating calls."),
        (name = "planner", description = "Metrics, autopilot recommendations, splits and rebalances."),
    )
)]
struct ApiDoc;

struct BearerToken;

impl Modify for BearerToken {
    fn modify(&self, doc: &mut utoipa::openapi::OpenApi) {
        doc.components
            .get_or_insert_with(Default::default)
            .add_security_scheme(
                "bearer",
                SecurityScheme::Http(Http::new(HttpAuthScheme::Bearer)),
            );
    }
}

// === schemas ===

/// Every error: a stable snake_case code and a message that says what to do.
#[derive(ToSchema)]
struct ErrorBody {
    error: ErrorDetail,
}

#[derive(ToSchema)]
struct ErrorDetail {
    code: String,
    message: String,
    /// A refused config reload: each offending field.
    refusals: Option<Vec<Refusal>>,
}

#[derive(ToSchema)]
struct Refusal {
    field: String,
    reason: String,
}

#[derive(ToSchema)]
struct Pod {
    name: String,
    /// The primary's URL, password redacted.
    primary: String,
    replicas: Vec<Replica>,
    http: Vec<String>,
    weight: f64,
    /// Whether new tenants (and moves) may land on it; false while drained.
    accepting: bool,
    tenants: u64,
    /// The primary's: "up", "up (in recovery)" or "down: why".
    health: String,
    /// "config" (pods.toml; reloads manage it) or "api" (POST /v1/pods or a pod provider).
    origin: String,
}

#[derive(ToSchema)]
struct Replica {
    url: String,
    health: String,
    lag_bytes: Option<u64>,
    lag_seconds: Option<f64>,
}

#[derive(ToSchema)]
struct PodList {
    pods: Vec<Pod>,
}

/// A pod to add (origin "api": reloads leave it alone).
#[derive(ToSchema)]
struct NewPod {
    /// 1 to 63 of a-z 0-9 _ -, starting with a letter.
    name: String,
    /// postgres://USER[:PASSWORD]@HOST[:PORT] of a superuser (or a user with CREATEDB and
    /// CREATEROLE); it must answer and not be in recovery.
    primary: String,
    #[schema(default = json!([]))]
    replicas: Option<Vec<String>>,
    #[schema(default = json!([]))]
    http: Option<Vec<String>>,
    #[schema(default = 1.0)]
    weight: Option<f64>,
    #[schema(default = true)]
    accepting: Option<bool>,
    /// "session" or "transaction"; default the config's.
    pool_mode: Option<String>,
}

#[derive(ToSchema)]
struct DeletedPod {
    deleted: String,
}

#[derive(ToSchema)]
struct FailoverRequest {
    /// The replica to promote (URL as listed, or HOST:PORT); default the least lagging.
    to: Option<String>,
}

/// A finished failover, shaped like a job.
#[derive(ToSchema)]
struct FailoverJob {
    id: String,
    kind: String,
    /// "succeeded" or "failed".
    state: String,
    started_at: chrono::DateTime<chrono::Utc>,
    finished_at: chrono::DateTime<chrono::Utc>,
    error: Option<String>,
    result: FailoverResult,
}

#[derive(ToSchema)]
struct FailoverResult {
    pod: String,
    from: String,
    to: String,
    promoted: bool,
    fenced_old_primary: bool,
    lsn: Option<String>,
    synchronous_standby_names_cleared: Option<String>,
    took_ms: u64,
}

#[derive(ToSchema)]
struct Tenant {
    name: String,
    pod: String,
    /// Grows by one at every route change (move, failover).
    route_version: i64,
    /// creating | active | paused | moving | deleting
    state: String,
    roles: Vec<String>,
    /// The tenant's own pool mode; null: its pod's and the config's.
    pool_mode: Option<String>,
}

#[derive(ToSchema)]
struct TenantList {
    tenants: Vec<Tenant>,
}

#[derive(ToSchema)]
struct NewTenant {
    name: String,
    /// Place it on this pod instead of asking the placement ring.
    pod: Option<String>,
    /// Roles that may reach it; the first owns its database.
    roles: Vec<String>,
}

#[derive(ToSchema)]
struct TenantPatch {
    /// "session", "transaction", or null to follow the pod and the config.
    pool_mode: Option<String>,
}

#[derive(ToSchema)]
struct DeletedTenant {
    deleted: String,
    pod: String,
    database_dropped: bool,
}

#[derive(ToSchema)]
struct MoveRequest {
    /// The pod to move the tenant to; it must accept tenants.
    to: String,
}

/// A long-running operation.
#[derive(ToSchema)]
struct Job {
    id: i64,
    /// move | drain | split | rebalance | failover
    kind: String,
    /// pending | running | succeeded | failed | cancelled
    state: String,
    /// e.g. queued, preflight, schema, replicate, copy, catch_up, cutover, cleanup (moves);
    /// moving (drains).
    phase: String,
    progress: Progress,
    tenant: Option<String>,
    /// A move's target pod; a drain's pod.
    pod: Option<String>,
    params: Value,
    /// The job that started this one (a drain for its moves).
    parent: Option<i64>,
    created_at: chrono::DateTime<chrono::Utc>,
    started_at: Option<chrono::DateTime<chrono::Utc>>,
    finished_at: Option<chrono::DateTime<chrono::Utc>>,
    error: Option<String>,
    /// A finished move's includes `pause_ms`; a drain's, split's or rebalance's lists its
    /// `moves` with their jobs and states.
    result: Option<Value>,
}

#[derive(ToSchema)]
struct Progress {
    done: u64,
    total: u64,
    /// e.g. "bytes", "bytes behind", "tenants", "steps".
    unit: String,
    /// Drains, splits, rebalances: each move with its job and state.
    moves: Option<Vec<Value>>,
    /// A move in catch-up: write transactions on the source that hold the cutover.
    long_write_transactions: Option<u64>,
}

#[derive(ToSchema)]
struct JobList {
    jobs: Vec<Job>,
}

#[derive(ToSchema)]
struct NewRole {
    name: String,
    /// At least 4 characters; only its SCRAM-SHA-256 verifier is stored.
    password: String,
}

#[derive(ToSchema)]
struct Role {
    name: String,
}

#[derive(ToSchema)]
struct AuditList {
    entries: Vec<AuditEntry>,
}

#[derive(ToSchema)]
struct AuditEntry {
    id: i64,
    at: chrono::DateTime<chrono::Utc>,
    actor: String,
    /// e.g. pod.add, pod.drain, pod.delete, tenant.create, tenant.move, job.move, config.reload
    action: String,
    target: String,
    detail: Value,
}

#[derive(ToSchema)]
struct ReloadRequest {
    /// Apply despite the safety rules (never despite an invalid file).
    #[schema(default = false)]
    force: Option<bool>,
}

#[derive(ToSchema)]
struct ReloadOutcome {
    /// False when the file is unchanged.
    applied: bool,
    version: Option<i64>,
    hash: Option<String>,
    diff: Vec<FieldChange>,
    forced: Option<bool>,
    overridden: Option<Vec<Refusal>>,
    removed_pods: Option<Vec<String>>,
}

#[derive(ToSchema)]
struct FieldChange {
    field: String,
    old: Value,
    new: Value,
    after_restart: Option<bool>,
}

#[derive(ToSchema)]
struct ConfigHistory {
    versions: Vec<ConfigVersion>,
}

#[derive(ToSchema)]
struct ConfigVersion {
    version: i64,
    hash: String,
    applied_at: chrono::DateTime<chrono::Utc>,
    forced: bool,
    diff: Vec<FieldChange>,
    /// The file's text, passwords redacted (one version only).
    config: Option<String>,
}

/// A split or rebalance plan (also a drain's, in its params).
#[derive(ToSchema)]
struct Plan {
    /// split | rebalance | drain
    kind: String,
    pod: Option<String>,
    target: Option<String>,
    moves: Vec<PlannedMove>,
    bytes_to_move: u64,
    before: std::collections::BTreeMap<String, Utilisation>,
    after: std::collections::BTreeMap<String, Utilisation>,
    /// Why the plan is what it is (also when it has no moves).
    note: String,
}

#[derive(ToSchema)]
struct PlannedMove {
    tenant: String,
    from: String,
    to: String,
    /// Server busy seconds per second.
    busy: f64,
    bytes: u64,
}

#[derive(ToSchema)]
struct Utilisation {
    tenants: u64,
    busy: f64,
    bytes: u64,
    busy_ratio: f64,
    disk_ratio: Option<f64>,
    /// The larger ratio.
    utilisation: f64,
}

#[derive(ToSchema)]
struct DryRun {
    dry_run: bool,
    plan: Plan,
}

#[derive(ToSchema)]
struct RebalanceRequest {
    #[schema(default = false)]
    dry_run: Option<bool>,
    #[schema(default = 10)]
    max_moves: Option<u64>,
}

#[derive(ToSchema)]
struct SplitRequest {
    #[schema(default = false)]
    dry_run: Option<bool>,
    /// An existing pod to move half the load to; default a new one from the pod provider.
    to: Option<String>,
}

#[derive(ToSchema)]
struct Recommendations {
    /// The autopilot's mode: off | recommend | apply
    mode: String,
    updated_at: Option<chrono::DateTime<chrono::Utc>>,
    recommendations: Vec<Recommendation>,
}

#[derive(ToSchema)]
struct Recommendation {
    pod: String,
    kind: String,
    /// Which thresholds the pod is over, in words.
    reason: String,
    figures: Value,
    since: chrono::DateTime<chrono::Utc>,
    /// Over for at least split_when.for: it stands (in apply mode, acts).
    ready: bool,
    plan: Plan,
}

// === operations ===

#[utoipa::path(get, path = "/healthz", tag = "health", security(()),
    responses((status = 200, description = "The process runs", body = String, content_type = "text/plain")))]
fn healthz() {}

#[utoipa::path(get, path = "/readyz", tag = "health", security(()),
    responses(
        (status = 200, description = "The catalog answers", body = String, content_type = "text/plain"),
        (status = 503, description = "The catalog does not answer", body = ErrorBody)))]
fn readyz() {}

#[utoipa::path(get, path = "/openapi.json", tag = "health", security(()),
    responses((status = 200, description = "This document", body = Object)))]
fn openapi_json() {}

#[utoipa::path(get, path = "/v1/pods", tag = "pods",
    responses((status = 200, description = "Every pod with its health", body = PodList)))]
fn list_pods() {}

#[utoipa::path(post, path = "/v1/pods", tag = "pods", request_body = NewPod,
    responses(
        (status = 201, description = "Added (audited pod.add); routers reload", body = Pod),
        (status = 400, description = "Bad name, URL or weight; the primary is a standby; its user may not create databases and roles", body = ErrorBody),
        (status = 409, description = "A pod of that name exists", body = ErrorBody),
        (status = 503, description = "The primary does not answer", body = ErrorBody)))]
fn add_pod() {}

#[utoipa::path(get, path = "/v1/pods/{pod}", tag = "pods",
    params(("pod" = String, Path, description = "Pod name")),
    responses(
        (status = 200, description = "The pod", body = Pod),
        (status = 404, description = "No such pod", body = ErrorBody)))]
fn get_pod() {}

#[utoipa::path(delete, path = "/v1/pods/{pod}", tag = "pods",
    params(("pod" = String, Path, description = "Pod name")),
    responses(
        (status = 200, description = "Deleted from the catalog (audited pod.delete); its databases stay on its servers", body = DeletedPod),
        (status = 404, description = "No such pod", body = ErrorBody),
        (status = 409, description = "Tenants live there (pod_has_tenants), jobs move tenants to or from it (pod_busy), or it comes from pods.toml (pod_in_config: remove it there and reload)", body = ErrorBody)))]
fn delete_pod() {}

#[utoipa::path(post, path = "/v1/pods/{pod}/drain", tag = "pods",
    params(("pod" = String, Path, description = "Pod name")),
    responses(
        (status = 202, description = "The pod no longer accepts tenants (audited pod.drain); the drain job moves every tenant to other pods chosen by the placement ring, moves.max_concurrent at a time (its moves have it as parent)", body = Job),
        (status = 404, description = "No such pod", body = ErrorBody),
        (status = 409, description = "A drain of the pod runs already, or no other pod accepts tenants", body = ErrorBody)))]
fn drain_pod() {}

#[utoipa::path(post, path = "/v1/pods/{pod}/failover", tag = "pods",
    params(("pod" = String, Path, description = "Pod name")),
    request_body(content = FailoverRequest, description = "Empty body: the least lagging replica"),
    responses(
        (status = 200, description = "The finished failover (state succeeded or failed)", body = FailoverJob),
        (status = 400, description = "`to` is not one of its replicas", body = ErrorBody),
        (status = 404, description = "No such pod", body = ErrorBody),
        (status = 409, description = "No healthy replica", body = ErrorBody)))]
fn failover_pod() {}

#[utoipa::path(get, path = "/v1/tenants", tag = "tenants",
    responses((status = 200, description = "Every tenant", body = TenantList)))]
fn list_tenants() {}

#[utoipa::path(post, path = "/v1/tenants", tag = "tenants", request_body = NewTenant,
    responses(
        (status = 201, description = "Created: its database on the pod, grants (audited tenant.create)", body = Tenant),
        (status = 400, description = "Bad name, no roles, unknown role", body = ErrorBody),
        (status = 404, description = "Unknown pod", body = ErrorBody),
        (status = 409, description = "It exists, or no pod accepts tenants", body = ErrorBody)))]
fn create_tenant() {}

#[utoipa::path(get, path = "/v1/tenants/{tenant}", tag = "tenants",
    params(("tenant" = String, Path, description = "Tenant name")),
    responses(
        (status = 200, description = "The tenant", body = Tenant),
        (status = 404, description = "No such tenant", body = ErrorBody)))]
fn get_tenant() {}

#[utoipa::path(patch, path = "/v1/tenants/{tenant}", tag = "tenants",
    params(("tenant" = String, Path, description = "Tenant name")),
    request_body = TenantPatch,
    responses(
        (status = 200, description = "Changed (audited tenant.pool_mode)", body = Tenant),
        (status = 404, description = "No such tenant", body = ErrorBody)))]
fn patch_tenant() {}

#[utoipa::path(delete, path = "/v1/tenants/{tenant}", tag = "tenants",
    params(
        ("tenant" = String, Path, description = "Tenant name"),
        ("drop_database" = Option<bool>, Query, description = "Also drop its database on the pod")),
    responses(
        (status = 200, description = "Removed from the catalog (audited tenant.delete)", body = DeletedTenant),
        (status = 404, description = "No such tenant", body = ErrorBody)))]
fn delete_tenant() {}

#[utoipa::path(post, path = "/v1/tenants/{tenant}/move", tag = "tenants",
    params(("tenant" = String, Path, description = "Tenant name")),
    request_body = MoveRequest,
    responses(
        (status = 202, description = "The move job (audited job.move); follow it at /v1/jobs/{id}", body = Job),
        (status = 400, description = "Already on that pod", body = ErrorBody),
        (status = 404, description = "Unknown tenant or pod", body = ErrorBody),
        (status = 409, description = "A move of the tenant runs already, it is not active, or the pod does not accept tenants", body = ErrorBody)))]
fn move_tenant() {}

#[utoipa::path(post, path = "/v1/tenants/{tenant}/pause", tag = "tenants",
    params(("tenant" = String, Path, description = "Tenant name")),
    responses(
        (status = 200, description = "Paused on every router (audited tenant.pause): running transactions finish, new ones wait", body = Tenant),
        (status = 404, description = "No such tenant", body = ErrorBody),
        (status = 409, description = "Not active (moving, creating)", body = ErrorBody)))]
fn pause_tenant() {}

#[utoipa::path(post, path = "/v1/tenants/{tenant}/resume", tag = "tenants",
    params(("tenant" = String, Path, description = "Tenant name")),
    responses(
        (status = 200, description = "Resumed (audited tenant.resume); held clients go on", body = Tenant),
        (status = 404, description = "No such tenant", body = ErrorBody)))]
fn resume_tenant() {}

#[utoipa::path(post, path = "/v1/roles", tag = "roles", request_body = NewRole,
    responses(
        (status = 201, description = "Created or updated (audited role.upsert); pods serving its tenants get the verifier", body = Role),
        (status = 400, description = "Bad name or weak password", body = ErrorBody)))]
fn create_role() {}

#[utoipa::path(get, path = "/v1/audit", tag = "audit",
    params(("limit" = Option<i64>, Query, description = "Newest entries, 1 to 1000 (default 100)")),
    responses((status = 200, description = "Audit entries, newest first", body = AuditList)))]
fn audit() {}

#[utoipa::path(post, path = "/v1/config/reload", tag = "config",
    request_body(content = ReloadRequest, description = "Empty body: {\"force\": false}"),
    responses(
        (status = 200, description = "Applied, or unchanged (audited config.reload)", body = ReloadOutcome),
        (status = 400, description = "Invalid file (force never overrides), or no config file", body = ErrorBody),
        (status = 409, description = "Refused by the safety rules; error.refusals names each field", body = ErrorBody)))]
fn reload_config() {}

#[utoipa::path(get, path = "/v1/config/history", tag = "config",
    params(("limit" = Option<i64>, Query, description = "Newest versions, 1 to 1000 (default 50)")),
    responses((status = 200, description = "Applied config versions, newest first", body = ConfigHistory)))]
fn config_history() {}

#[utoipa::path(get, path = "/v1/config/history/{version}", tag = "config",
    params(("version" = i64, Path, description = "Config version")),
    responses(
        (status = 200, description = "One version with its text", body = ConfigVersion),
        (status = 404, description = "No such version", body = ErrorBody)))]
fn config_version() {}

#[utoipa::path(get, path = "/v1/jobs", tag = "jobs",
    params(("limit" = Option<i64>, Query, description = "Newest jobs, 1 to 1000 (default 100)")),
    responses((status = 200, description = "Jobs, newest first", body = JobList)))]
fn list_jobs() {}

#[utoipa::path(get, path = "/v1/jobs/{id}", tag = "jobs",
    params(("id" = i64, Path, description = "Job id")),
    responses(
        (status = 200, description = "The job with its phase and progress", body = Job),
        (status = 404, description = "No such job", body = ErrorBody)))]
fn get_job() {}

#[utoipa::path(delete, path = "/v1/jobs/{id}", tag = "jobs",
    params(("id" = i64, Path, description = "Job id")),
    responses(
        (status = 202, description = "Cancelling (audited job.cancel): it rolls back and ends cancelled, or finishes if past its point of no return", body = Job),
        (status = 404, description = "No such job", body = ErrorBody),
        (status = 409, description = "It ended already, or another router runs it", body = ErrorBody)))]
fn cancel_job() {}

#[utoipa::path(get, path = "/metrics", tag = "planner",
    responses((status = 200, description = "Prometheus text format (podrouter_*)", body = String, content_type = "text/plain")))]
fn metrics() {}

#[utoipa::path(get, path = "/v1/recommendations", tag = "planner",
    responses((status = 200, description = "The autopilot's standing recommendations", body = Recommendations)))]
fn recommendations() {}

#[utoipa::path(post, path = "/v1/rebalance", tag = "planner",
    request_body(content = RebalanceRequest, description = "Empty body: run a rebalance of at most 10 moves"),
    responses(
        (status = 200, description = "dry_run: the plan only", body = DryRun),
        (status = 202, description = "The rebalance job; its moves are child jobs", body = Job),
        (status = 409, description = "Nothing to rebalance", body = ErrorBody)))]
fn rebalance() {}

#[utoipa::path(post, path = "/v1/pods/{pod}/split", tag = "planner",
    params(("pod" = String, Path, description = "Pod name")),
    request_body(content = SplitRequest, description = "Empty body: split onto a new pod from the provider"),
    responses(
        (status = 200, description = "dry_run: the plan only", body = DryRun),
        (status = 202, description = "The split job; its moves are child jobs", body = Job),
        (status = 404, description = "No such pod", body = ErrorBody),
        (status = 409, description = "Nothing to split, or no pod to split onto", body = ErrorBody)))]
fn split_pod() {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn document_has_the_bearer_scheme_and_open_health_routes() {
        let doc = document();
        assert_eq!(
            doc["components"]["securitySchemes"]["bearer"]["scheme"],
            "bearer"
        );
        assert_eq!(doc["security"][0]["bearer"], serde_json::json!([]));
        for open in ["/healthz", "/readyz", "/openapi.json"] {
            assert_eq!(
                doc["paths"][open]["get"]["security"],
                serde_json::json!([{}]),
                "{open} needs no token"
            );
        }
        assert!(doc["paths"]["/v1/pods"]["get"]["security"].is_null());
    }
}
