//! Pods added, drained and deleted through the admin API. Pods of the config are written by
//! [`super::Catalog::apply_config`]; the `origin` column (migration 0005) tells them apart,
//! so a reload manages only the config's pods and the API only its own.

use super::{audit, notify, CatalogError};
use sqlx::{PgPool, Row};
use std::collections::HashMap;

/// Where a pod came from.
pub const ORIGIN_CONFIG: &str = "config";
pub const ORIGIN_API: &str = "api";

/// Every pod's origin, by name.
pub async fn origins(pool: &PgPool) -> Result<HashMap<String, String>, CatalogError> {
    let rows = sqlx::query("SELECT name, origin FROM pods")
        .fetch_all(pool)
        .await?;
    rows.iter()
        .map(|r| Ok((r.try_get("name")?, r.try_get("origin")?)))
        .collect::<Result<_, sqlx::Error>>()
        .map_err(Into::into)
}

/// Why [`delete`] did not delete a pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeleteRefusal {
    Unknown,
    /// The config lists it: remove it there and reload.
    FromConfig,
    /// Tenants live on it (how many).
    HasTenants(i64),
    /// Unfinished jobs move tenants to or from it (their ids).
    Busy(Vec<i64>),
}

/// Deletes a pod the API added, audited `pod.delete` and NOTIFYd, in one transaction that
/// holds the pod's row: a tenant created or moved onto it concurrently either commits first
/// (and the delete is refused) or waits and then fails on the missing pod.
pub async fn delete(
    pool: &PgPool,
    name: &str,
    actor: &str,
) -> Result<Result<(), DeleteRefusal>, CatalogError> {
    let mut tx = pool.begin().await?;
    let origin: Option<String> =
        sqlx::query_scalar("SELECT origin FROM pods WHERE name = $1 FOR UPDATE")
            .bind(name)
            .fetch_optional(&mut *tx)
            .await?;
    let refusal = match origin.as_deref() {
        None => Some(DeleteRefusal::Unknown),
        Some(ORIGIN_CONFIG) => Some(DeleteRefusal::FromConfig),
        Some(_) => {
            let tenants: i64 = sqlx::query_scalar("SELECT count(*) FROM tenants WHERE pod = $1")
                .bind(name)
                .fetch_one(&mut *tx)
                .await?;
            // A move's job names its target in `pod` and its source in params.from.
            let jobs: Vec<i64> = sqlx::query_scalar(
                "SELECT id FROM jobs WHERE state IN ('pending', 'running')
                    AND (pod = $1 OR params ->> 'from' = $1 OR params ->> 'to' = $1) ORDER BY id",
            )
            .bind(name)
            .fetch_all(&mut *tx)
            .await?;
            if tenants > 0 {
                Some(DeleteRefusal::HasTenants(tenants))
            } else if !jobs.is_empty() {
                Some(DeleteRefusal::Busy(jobs))
            } else {
                None
            }
        }
    };
    if let Some(r) = refusal {
        return Ok(Err(r));
    }
    sqlx::query("DELETE FROM pods WHERE name = $1")
        .bind(name)
        .execute(&mut *tx)
        .await?;
    audit(
        &mut tx,
        actor,
        "pod.delete",
        name,
        serde_json::json!({"origin": ORIGIN_API}),
    )
    .await?;
    notify(&mut tx).await?;
    tx.commit().await?;
    Ok(Ok(()))
}

/// Sets whether a pod accepts new tenants (and moves onto it), audited as `action` with
/// `detail` and NOTIFYd; false when there is no such pod. A config pod keeps the value until
/// a reload that changes the pod writes the file's value again.
pub async fn set_accepting(
    pool: &PgPool,
    name: &str,
    accepting: bool,
    actor: &str,
    action: &str,
    detail: serde_json::Value,
) -> Result<bool, CatalogError> {
    let mut tx = pool.begin().await?;
    let n = sqlx::query("UPDATE pods SET accepting = $2, updated_at = now() WHERE name = $1")
        .bind(name)
        .bind(accepting)
        .execute(&mut *tx)
        .await?
        .rows_affected();
    if n > 0 {
        audit(&mut tx, actor, action, name, detail).await?;
        notify(&mut tx).await?;
    }
    tx.commit().await?;
    Ok(n > 0)
}

/// Unfinished drain jobs of a pod.
pub async fn unfinished_drains(pool: &PgPool, pod: &str) -> Result<Vec<i64>, CatalogError> {
    Ok(sqlx::query_scalar(
        "SELECT id FROM jobs WHERE kind = 'drain' AND pod = $1 AND state IN ('pending', 'running')
          ORDER BY id",
    )
    .bind(pod)
    .fetch_all(pool)
    .await?)
}
