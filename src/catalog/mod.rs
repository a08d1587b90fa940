//! The catalog: sqlx queries over the schema in `migrations/` (applied at start). Runtime
//! queries only, so the crate builds without a database at hand.

use serde::Serialize;
use sqlx::postgres::{PgListener, PgPool, PgPoolOptions};
use sqlx::Row;
use std::time::Duration;
use thiserror::Error;

/// The channel every router LISTENs on; any change to routes or roles notifies it.
pub const ROUTES_CHANNEL: &str = "podrouter_routes";

#[derive(Debug, Error)]
pub enum CatalogError {
    #[error("catalog database unreachable ({url}): {source}; check router.catalog_url and that the catalog server is up")]
    Connect { url: String, source: sqlx::Error },
    #[error("catalog migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("catalog query failed: {0}")]
    Query(#[from] sqlx::Error),
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PodRow {
    pub name: String,
    pub primary_url: String,
    pub replicas: Vec<String>,
    pub http: Vec<String>,
    pub weight: f64,
    pub accepting: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TenantRow {
    pub name: String,
    pub pod: String,
    pub route_version: i64,
    pub state: String,
    pub roles: Vec<String>,
}

#[derive(Debug, Clone)]
pub struct RoleRow {
    pub name: String,
    pub verifier: String,
}

/// Everything a RoutingTable is built from, read in one transaction.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    pub pods: Vec<PodRow>,
    pub tenants: Vec<TenantRow>,
    pub roles: Vec<RoleRow>,
}

#[derive(Clone)]
pub struct Catalog {
    pool: PgPool,
}

impl Catalog {
    /// Connects (retrying for up to `wait`, so a catalog that is still starting is fine) and
    /// applies the migrations.
    pub async fn connect(url: &str, wait: Duration) -> Result<Catalog, CatalogError> {
        let deadline = tokio::time::Instant::now() + wait;
        let pool = loop {
            match PgPoolOptions::new()
                .max_connections(8)
                .acquire_timeout(Duration::from_secs(5))
                .connect(url)
                .await
            {
                Ok(p) => break p,
                Err(e) if tokio::time::Instant::now() >= deadline => {
                    return Err(CatalogError::Connect {
                        url: crate::config::redact(url),
                        source: e,
                    })
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        };
        sqlx::migrate!("./migrations").run(&pool).await?;
        Ok(Catalog { pool })
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    pub async fn listener(&self) -> Result<PgListener, CatalogError> {
        let mut l = PgListener::connect_with(&self.pool).await?;
        l.listen(ROUTES_CHANNEL).await?;
        Ok(l)
    }

    pub async fn snapshot(&self) -> Result<Snapshot, CatalogError> {
        let mut tx = self.pool.begin().await?;
        sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
            .execute(&mut *tx)
            .await?;
        let pods = sqlx::query(
            "SELECT name, primary_url, replicas, http, weight, accepting FROM pods ORDER BY name",
        )
        .fetch_all(&mut *tx)
        .await?
        .into_iter()
        .map(|r| pod_row(&r))
        .collect::<Result<_, _>>()?;
        let tenants = sqlx::query(
            "SELECT t.name, t.pod, t.route_version, t.state,
                    coalesce(array_agg(g.role ORDER BY g.role) FILTER (WHERE g.role IS NOT NULL), '{}') AS roles
               FROM tenants t LEFT JOIN tenant_grants g ON g.tenant = t.name
              GROUP BY t.name ORDER BY t.name",
        )
        .fetch_all(&mut *tx)
        .await?
        .into_iter()
        .map(|r| tenant_row(&r))
        .collect::<Result<_, _>>()?;
        let roles = sqlx::query("SELECT name, verifier FROM roles ORDER BY name")
            .fetch_all(&mut *tx)
            .await?
            .into_iter()
            .map(|r| {
                Ok::<_, sqlx::Error>(RoleRow {
                    name: r.try_get("name")?,
                    verifier: r.try_get("verifier")?,
                })
            })
            .collect::<Result<_, _>>()?;
        tx.commit().await?;
        Ok(Snapshot {
            pods,
            tenants,
            roles,
        })
    }

    pub async fn tenant(&self, name: &str) -> Result<Option<TenantRow>, CatalogError> {
        let row = sqlx::query(
            "SELECT t.name, t.pod, t.route_version, t.state,
                    coalesce(array_agg(g.role ORDER BY g.role) FILTER (WHERE g.role IS NOT NULL), '{}') AS roles
               FROM tenants t LEFT JOIN tenant_grants g ON g.tenant = t.name
              WHERE t.name = $1 GROUP BY t.name",
        )
        .bind(name)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.map(|r| tenant_row(&r)).transpose()?)
    }

    /// Inserts or updates a pod from the config (the config wins for the fields it sets).
    pub async fn upsert_pod(&self, pod: &PodRow) -> Result<(), CatalogError> {
        sqlx::query(
            "INSERT INTO pods (name, primary_url, replicas, http, weight, accepting)
             VALUES ($1, $2, $3, $4, $5, $6)
             ON CONFLICT (name) DO UPDATE SET primary_url = excluded.primary_url,
                 replicas = excluded.replicas, http = excluded.http, weight = excluded.weight,
                 accepting = excluded.accepting, updated_at = now()
             WHERE (pods.primary_url, pods.replicas, pods.http, pods.weight, pods.accepting)
                   IS DISTINCT FROM (excluded.primary_url, excluded.replicas, excluded.http, excluded.weight, excluded.accepting)",
        )
        .bind(&pod.name)
        .bind(&pod.primary_url)
        .bind(sqlx::types::Json(&pod.replicas))
        .bind(sqlx::types::Json(&pod.http))
        .bind(pod.weight)
        .bind(pod.accepting)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    pub async fn upsert_role(
        &self,
        name: &str,
        verifier: &str,
        actor: &str,
    ) -> Result<(), CatalogError> {
        let mut tx = self.pool.begin().await?;
        sqlx::query(
            "INSERT INTO roles (name, verifier) VALUES ($1, $2)
             ON CONFLICT (name) DO UPDATE SET verifier = excluded.verifier, updated_at = now()",
        )
        .bind(name)
        .bind(verifier)
        .execute(&mut *tx)
        .await?;
        audit(&mut tx, actor, "role.upsert", name, serde_json::json!({})).await?;
        notify(&mut tx).await?;
        tx.commit().await?;
        Ok(())
    }

    pub async fn role(&self, name: &str) -> Result<Option<RoleRow>, CatalogError> {
        let row = sqlx::query("SELECT name, verifier FROM roles WHERE name = $1")
            .bind(name)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row
            .map(|r| {
                Ok::<_, sqlx::Error>(RoleRow {
                    name: r.try_get("name")?,
                    verifier: r.try_get("verifier")?,
                })
            })
            .transpose()?)
    }

    /// Records a tenant in state `creating` (before anything is made on the pod), so a crash
    /// half-way leaves a row that says what to clean up.
    pub async fn insert_creating_tenant(
        &self,
        name: &str,
        pod: &str,
        roles: &[String],
    ) -> Result<(), CatalogError> {
        let mut tx = self.pool.begin().await?;
        sqlx::query("INSERT INTO tenants (name, pod, state) VALUES ($1, $2, 'creating')")
            .bind(name)
            .bind(pod)
            .execute(&mut *tx)
            .await?;
        for role in roles {
            sqlx::query("INSERT INTO tenant_grants (tenant, role) VALUES ($1, $2)")
                .bind(name)
                .bind(role)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    pub async fn activate_tenant(
        &self,
        name: &str,
        actor: &str,
        detail: serde_json::Value,
    ) -> Result<(), CatalogError> {
        let mut tx = self.pool.begin().await?;
        sqlx::query("UPDATE tenants SET state = 'active', updated_at = now() WHERE name = $1")
            .bind(name)
            .execute(&mut *tx)
            .await?;
        audit(&mut tx, actor, "tenant.create", name, detail).await?;
        notify(&mut tx).await?;
        tx.commit().await?;
        Ok(())
    }

    /// Removes a tenant row (and its grants), audited.
    pub async fn delete_tenant(
        &self,
        name: &str,
        actor: &str,
        detail: serde_json::Value,
    ) -> Result<bool, CatalogError> {
        let mut tx = self.pool.begin().await?;
        let n = sqlx::query("DELETE FROM tenants WHERE name = $1")
            .bind(name)
            .execute(&mut *tx)
            .await?
            .rows_affected();
        if n > 0 {
            audit(&mut tx, actor, "tenant.delete", name, detail).await?;
            notify(&mut tx).await?;
        }
        tx.commit().await?;
        Ok(n > 0)
    }

    pub async fn tenants_in_state(&self, state: &str) -> Result<Vec<TenantRow>, CatalogError> {
        Ok(self
            .snapshot()
            .await?
            .tenants
            .into_iter()
            .filter(|t| t.state == state)
            .collect())
    }

    pub async fn audit(
        &self,
        actor: &str,
        action: &str,
        target: &str,
        detail: serde_json::Value,
    ) -> Result<(), CatalogError> {
        let mut conn = self.pool.acquire().await?;
        audit(&mut conn, actor, action, target, detail).await
    }

    pub async fn audit_entries(&self, limit: i64) -> Result<Vec<serde_json::Value>, CatalogError> {
        let rows = sqlx::query(
            "SELECT id, at, actor, action, target, detail FROM audit_log ORDER BY id DESC LIMIT $1",
        )
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(serde_json::json!({
                    "id": r.try_get::<i64, _>("id")?,
                    "at": r.try_get::<chrono::DateTime<chrono::Utc>, _>("at")?,
                    "actor": r.try_get::<String, _>("actor")?,
                    "action": r.try_get::<String, _>("action")?,
                    "target": r.try_get::<String, _>("target")?,
                    "detail": r.try_get::<serde_json::Value, _>("detail")?,
                }))
            })
            .collect::<Result<_, sqlx::Error>>()
            .map_err(Into::into)
    }
}

async fn audit(
    conn: &mut sqlx::PgConnection,
    actor: &str,
    action: &str,
    target: &str,
    detail: serde_json::Value,
) -> Result<(), CatalogError> {
    sqlx::query("INSERT INTO audit_log (actor, action, target, detail) VALUES ($1, $2, $3, $4)")
        .bind(actor)
        .bind(action)
        .bind(target)
        .bind(detail)
        .execute(conn)
        .await?;
    Ok(())
}

async fn notify(conn: &mut sqlx::PgConnection) -> Result<(), CatalogError> {
    sqlx::query("SELECT pg_notify($1, '')")
        .bind(ROUTES_CHANNEL)
        .execute(conn)
        .await?;
    Ok(())
}

fn pod_row(r: &sqlx::postgres::PgRow) -> Result<PodRow, sqlx::Error> {
    Ok(PodRow {
        name: r.try_get("name")?,
        primary_url: r.try_get("primary_url")?,
        replicas: r
            .try_get::<sqlx::types::Json<Vec<String>>, _>("replicas")?
            .0,
        http: r.try_get::<sqlx::types::Json<Vec<String>>, _>("http")?.0,
        weight: r.try_get("weight")?,
        accepting: r.try_get("accepting")?,
    })
}

fn tenant_row(r: &sqlx::postgres::PgRow) -> Result<TenantRow, sqlx::Error> {
    Ok(TenantRow {
        name: r.try_get("name")?,
        pod: r.try_get("pod")?,
        route_version: r.try_get("route_version")?,
        state: r.try_get("state")?,
        roles: r.try_get("roles")?,
    })
}
