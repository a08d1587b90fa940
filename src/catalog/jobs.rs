//! The `jobs` table: long-running operations, their phase, progress and checkpoint.

use super::{audit, CatalogError};
use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::{PgPool, Row};

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct JobRow {
    pub id: i64,
    pub kind: String,
    pub tenant: Option<String>,
    pub pod: Option<String>,
    pub params: serde_json::Value,
    pub state: String,
    pub phase: String,
    pub progress: serde_json::Value,
    pub checkpoint: serde_json::Value,
    pub result: Option<serde_json::Value>,
    pub error: Option<String>,
    pub parent: Option<i64>,
    pub actor: String,
    pub created_at: DateTime<Utc>,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
    /// The router running it (`routers.id`).
    pub owner: Option<i32>,
}

pub struct NewJob<'a> {
    pub kind: &'a str,
    pub tenant: Option<&'a str>,
    pub pod: Option<&'a str>,
    pub params: serde_json::Value,
    pub parent: Option<i64>,
    pub actor: &'a str,
}

const COLUMNS: &str = "id, kind, tenant, pod, params, state, phase, progress, checkpoint, result, \
                       error, parent, actor, created_at, started_at, finished_at, owner";

/// Inserts a pending job, audited as `job.<kind>`. A second unfinished move of the same
/// tenant violates `jobs_one_move_per_tenant` and comes back as [`CatalogError::Conflict`].
pub async fn insert(
    pool: &PgPool,
    job: &NewJob<'_>,
    owner: Option<i32>,
) -> Result<JobRow, CatalogError> {
    let mut tx = pool.begin().await?;
    let row = sqlx::query(sqlx::AssertSqlSafe(format!(
        "INSERT INTO jobs (kind, tenant, pod, params, parent, actor, owner) VALUES ($1, $2, $3, $4, $5, $6, $7)
         RETURNING {COLUMNS}"
    )))
    .bind(job.kind)
    .bind(job.tenant)
    .bind(job.pod)
    .bind(&job.params)
    .bind(job.parent)
    .bind(job.actor)
    .bind(owner)
    .fetch_one(&mut *tx)
    .await
    .map_err(|e| match &e {
        sqlx::Error::Database(d) if d.constraint() == Some("jobs_one_move_per_tenant") => {
            CatalogError::Conflict(format!(
                "tenant {:?} already has a move in progress; wait for it or cancel it (DELETE /v1/jobs/ID)",
                job.tenant.unwrap_or_default()
            ))
        }
        _ => CatalogError::from(e),
    })?;
    let row = job_row(&row)?;
    let target = job.tenant.or(job.pod).unwrap_or("fleet");
    audit(
        &mut tx,
        job.actor,
        &format!("job.{}", job.kind),
        target,
        serde_json::json!({"job": row.id, "params": job.params}),
    )
    .await?;
    tx.commit().await?;
    Ok(row)
}

pub async fn get(pool: &PgPool, id: i64) -> Result<Option<JobRow>, CatalogError> {
    let row = sqlx::query(sqlx::AssertSqlSafe(format!(
        "SELECT {COLUMNS} FROM jobs WHERE id = $1"
    )))
    .bind(id)
    .fetch_optional(pool)
    .await?;
    Ok(row.map(|r| job_row(&r)).transpose()?)
}

/// The newest jobs first.
pub async fn list(pool: &PgPool, limit: i64) -> Result<Vec<JobRow>, CatalogError> {
    let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
        "SELECT {COLUMNS} FROM jobs ORDER BY id DESC LIMIT $1"
    )))
    .bind(limit)
    .fetch_all(pool)
    .await?;
    Ok(rows.iter().map(job_row).collect::<Result<_, _>>()?)
}

/// Jobs left pending or running (by a router that stopped or crashed).
pub async fn unfinished(pool: &PgPool) -> Result<Vec<JobRow>, CatalogError> {
    let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
        "SELECT {COLUMNS} FROM jobs WHERE state IN ('pending', 'running') ORDER BY id"
    )))
    .fetch_all(pool)
    .await?;
    Ok(rows.iter().map(job_row).collect::<Result<_, _>>()?)
}

/// Takes over a job from `from` (its owner that is no longer live): compare-and-set, so of
/// two routers recovering the same job only one gets it.
pub async fn claim(
    pool: &PgPool,
    id: i64,
    from: Option<i32>,
    to: Option<i32>,
) -> Result<bool, CatalogError> {
    let done = sqlx::query(
        "UPDATE jobs SET owner = $3, updated_at = now()
          WHERE id = $1 AND owner IS NOT DISTINCT FROM $2 AND state IN ('pending', 'running')",
    )
    .bind(id)
    .bind(from)
    .bind(to)
    .execute(pool)
    .await?;
    Ok(done.rows_affected() == 1)
}

pub async fn set_running(pool: &PgPool, id: i64) -> Result<(), CatalogError> {
    sqlx::query(
        "UPDATE jobs SET state = 'running', started_at = coalesce(started_at, now()), updated_at = now()
          WHERE id = $1",
    )
    .bind(id)
    .execute(pool)
    .await?;
    Ok(())
}

pub async fn set_phase(pool: &PgPool, id: i64, phase: &str) -> Result<(), CatalogError> {
    sqlx::query("UPDATE jobs SET phase = $2, updated_at = now() WHERE id = $1")
        .bind(id)
        .bind(phase)
        .execute(pool)
        .await?;
    Ok(())
}

pub async fn set_progress(
    pool: &PgPool,
    id: i64,
    progress: &serde_json::Value,
) -> Result<(), CatalogError> {
    sqlx::query("UPDATE jobs SET progress = $2, updated_at = now() WHERE id = $1")
        .bind(id)
        .bind(progress)
        .execute(pool)
        .await?;
    Ok(())
}

/// Merges `patch` into the job's checkpoint (top-level keys replaced).
pub async fn checkpoint(
    pool: &PgPool,
    id: i64,
    patch: &serde_json::Value,
) -> Result<(), CatalogError> {
    sqlx::query("UPDATE jobs SET checkpoint = checkpoint || $2, updated_at = now() WHERE id = $1")
        .bind(id)
        .bind(patch)
        .execute(pool)
        .await?;
    Ok(())
}

/// Records how a job ended, audited as `job.<kind>.<state>`.
pub async fn finish(
    pool: &PgPool,
    id: i64,
    state: &str,
    result: Option<&serde_json::Value>,
    error: Option<&str>,
) -> Result<(), CatalogError> {
    let mut tx = pool.begin().await?;
    let row = sqlx::query(
        "UPDATE jobs SET state = $2, result = $3, error = $4, finished_at = now(), updated_at = now()
          WHERE id = $1 RETURNING kind, coalesce(tenant, pod, 'fleet') AS target",
    )
    .bind(id)
    .bind(state)
    .bind(result)
    .bind(error)
    .fetch_one(&mut *tx)
    .await?;
    let kind: String = row.try_get("kind")?;
    let target: String = row.try_get("target")?;
    audit(
        &mut tx,
        "podrouter",
        &format!("job.{kind}.{state}"),
        &target,
        serde_json::json!({"job": id, "result": result, "error": error}),
    )
    .await?;
    tx.commit().await?;
    Ok(())
}

fn job_row(r: &sqlx::postgres::PgRow) -> Result<JobRow, sqlx::Error> {
    Ok(JobRow {
        id: r.try_get("id")?,
        kind: r.try_get("kind")?,
        tenant: r.try_get("tenant")?,
        pod: r.try_get("pod")?,
        params: r.try_get("params")?,
        state: r.try_get("state")?,
        phase: r.try_get("phase")?,
        progress: r.try_get("progress")?,
        checkpoint: r.try_get("checkpoint")?,
        result: r.try_get("result")?,
        error: r.try_get("error")?,
        parent: r.try_get("parent")?,
        actor: r.try_get("actor")?,
        created_at: r.try_get("created_at")?,
        started_at: r.try_get("started_at")?,
        finished_at: r.try_get("finished_at")?,
        owner: r.try_get("owner")?,
    })
}

// === moves ===

/// Starts a move in one transaction: the job row (pending) and the tenant's state `moving`,
/// which holds only if the tenant is `active` on `from`. Conflict otherwise.
pub async fn begin_move(
    pool: &PgPool,
    job: &NewJob<'_>,
    from: &str,
    owner: Option<i32>,
) -> Result<JobRow, CatalogError> {
    let tenant = job.tenant.expect("a move names its tenant");
    let mut tx = pool.begin().await?;
    let n = sqlx::query(
        "UPDATE tenants SET state = 'moving', updated_at = now()
          WHERE name = $1 AND pod = $2 AND state = 'active'",
    )
    .bind(tenant)
    .bind(from)
    .execute(&mut *tx)
    .await?
    .rows_affected();
    if n == 0 {
        return Err(CatalogError::Conflict(format!(
            "tenant {tenant:?} is not active on pod {from:?} (being created, moved, paused or deleted); check GET /v1/tenants/{tenant} and GET /v1/jobs"
        )));
    }
    tx.commit().await?;
    match insert(pool, job, owner).await {
        Ok(row) => Ok(row),
        Err(e) => {
            // Give the tenant back its state; the insert failed (e.g. a move already runs).
            let _ = end_move(pool, tenant).await;
            Err(e)
        }
    }
}

/// Switches a moving tenant's route from `from` to `to` (route version + 1, state back to
/// `active`) and marks the job `switched` in its checkpoint, in one transaction; audited and
/// notified. Returns the new route version, or None if the tenant was not on `from`.
pub async fn switch_route(
    pool: &PgPool,
    job: i64,
    tenant: &str,
    from: &str,
    to: &str,
) -> Result<Option<i64>, CatalogError> {
    let mut tx = pool.begin().await?;
    // Durable before any held client is released (DESIGN.md, invariant 4), whatever the
    // catalog server's default.
    sqlx::query("SET LOCAL synchronous_commit = on")
        .execute(&mut *tx)
        .await?;
    let version: Option<i64> = sqlx::query_scalar(
        "UPDATE tenants SET pod = $3, route_version = route_version + 1, state = 'active', updated_at = now()
          WHERE name = $1 AND pod = $2 RETURNING route_version",
    )
    .bind(tenant)
    .bind(from)
    .bind(to)
    .fetch_optional(&mut *tx)
    .await?;
    let Some(version) = version else {
        return Ok(None);
    };
    sqlx::query(
        "UPDATE jobs SET phase = 'switched', checkpoint = checkpoint || '{\"switched\": true}', updated_at = now()
          WHERE id = $1",
    )
    .bind(job)
    .execute(&mut *tx)
    .await?;
    audit(
        &mut tx,
        "podrouter",
        "tenant.move",
        tenant,
        serde_json::json!({"job": job, "from": from, "to": to, "route_version": version}),
    )
    .await?;
    super::notify(&mut tx).await?;
    tx.commit().await?;
    Ok(Some(version))
}

/// Puts a tenant left `moving` back to `active` (a move that rolled back).
pub async fn end_move(pool: &PgPool, tenant: &str) -> Result<(), CatalogError> {
    let mut tx = pool.begin().await?;
    sqlx::query(
        "UPDATE tenants SET state = 'active', updated_at = now() WHERE name = $1 AND state = 'moving'",
    )
    .bind(tenant)
    .execute(&mut *tx)
    .await?;
    super::notify(&mut tx).await?;
    tx.commit().await?;
    Ok(())
}

/// Finished jobs of `kind` whose checkpoint has `key` = true (e.g. cleanup still owed).
pub async fn finished_with_flag(
    pool: &PgPool,
    kind: &str,
    key: &str,
) -> Result<Vec<JobRow>, CatalogError> {
    let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
        "SELECT {COLUMNS} FROM jobs
          WHERE kind = $1 AND state IN ('succeeded', 'failed', 'cancelled')
            AND coalesce((checkpoint ->> $2)::boolean, false) ORDER BY id"
    )))
    .bind(kind)
    .bind(key)
    .fetch_all(pool)
    .await?;
    Ok(rows.iter().map(job_row).collect::<Result<_, _>>()?)
}
