//! The catalog: sqlx queries over the schema in `migrations/` (applied at start). Runtime
//! queries only, so the crate builds without a database at hand.

pub mod jobs;
pub mod pods;

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
    /// A change that conflicts with one in progress (message says what to do).
    #[error("{0}")]
    Conflict(String),
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PodRow {
    pub name: String,
    pub primary_url: String,
    pub replicas: Vec<String>,
    pub http: Vec<String>,
    pub weight: f64,
    pub accepting: bool,
    /// Default pool mode of the pod's tenants (`session`/`transaction`), if set.
    pub pool_mode: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TenantRow {
    pub name: String,
    pub pod: String,
    pub route_version: i64,
    pub state: String,
    pub roles: Vec<String>,
    /// Pool mode override (`session`/`transaction`), if set.
    pub pool_mode: Option<String>,
}

#[derive(Debug, Clone)]
pub struct RoleRow {
    pub name: String,
    pub verifier: String,
}

/// One applied config, as `GET /v1/config/history` lists it; `config` (the file's text) only
/// when one version is asked for.
#[derive(Debug, Clone, Serialize)]
pub struct ConfigVersionRow {
    pub version: i64,
    pub hash: String,
    pub applied_at: chrono::DateTime<chrono::Utc>,
    pub forced: bool,
    pub diff: serde_json::Value,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub config: Option<String>,
}

/// A config about to be recorded.
pub struct NewConfigVersion<'a> {
    pub hash: &'a str,
    pub text: &'a str,
    pub forced: bool,
    pub diff: serde_json::Value,
}

/// What [`Catalog::apply_config`] did.
#[derive(Debug, Clone)]
pub struct AppliedConfig {
    pub version: i64,
    /// Pods removed from the file and deleted from the catalog.
    pub removed_pods: Vec<String>,
    /// Pods removed from the file but kept because tenants still live on them (forced).
    pub kept_pods: Vec<String>,
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
        l.listen_all([ROUTES_CHANNEL, crate::fleet::routers::PAUSES_CHANNEL])
            .await?;
        Ok(l)
    }

    pub async fn snapshot(&self) -> Result<Snapshot, CatalogError> {
        let mut tx = self.pool.begin().await?;
        sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
            .execute(&mut *tx)
            .await?;
        let pods = sqlx::query(
            "SELECT name, primary_url, replicas, http, weight, accepting, pool_mode FROM pods ORDER BY name",
        )
        .fetch_all(&mut *tx)
        .await?
        .into_iter()
        .map(|r| pod_row(&r))
        .collect::<Result<_, _>>()?;
        let tenants = sqlx::query(
            "SELECT t.name, t.pod, t.route_version, t.state, t.pool_mode,
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
            "SELECT t.name, t.pod, t.route_version, t.state, t.pool_mode,
                    coalesce(array_agg(g.role ORDER BY g.role) FILTER (WHERE g.role IS NOT NULL), '{}') AS roles
               FROM tenants t LEFT JOIN tenant_grants g ON g.tenant = t.name
              WHERE t.name = $1 GROUP BY t.name",
        )
        .bind(name)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.map(|r| tenant_row(&r)).transpose()?)
    }

    /// Inserts or updates a pod from the config (the config wins for the fields it sets, and
    /// a pod the API added becomes the config's when the file lists it: origin `config`).
    pub async fn upsert_pod(&self, pod: &PodRow) -> Result<(), CatalogError> {
        let mut conn = self.pool.acquire().await?;
        upsert_pod(&mut conn, pod).await
    }

    /// Records a reloaded config in one transaction with what it changes in the catalog: its
    /// pods upserted, pods it no longer lists deleted when no tenant lives on them (each
    /// audited), the version row, and the `config.reload` audit row (`detail` plus the
    /// version); then NOTIFY.
    pub async fn apply_config(
        &self,
        version: &NewConfigVersion<'_>,
        pods: &[PodRow],
        dropped_pods: &[String],
        actor: &str,
        detail: serde_json::Value,
    ) -> Result<AppliedConfig, CatalogError> {
        let mut tx = self.pool.begin().await?;
        for pod in pods {
            upsert_pod(&mut tx, pod).await?;
        }
        let (mut removed_pods, mut kept_pods) = (Vec::new(), Vec::new());
        for name in dropped_pods {
            // Tenants reference their pod, so a pod with tenants is never deleted here.
            // Only pods of the config: those added through the API are the API's to remove.
            let n = sqlx::query(
                "DELETE FROM pods p WHERE p.name = $1 AND p.origin = 'config'
                   AND NOT EXISTS (SELECT 1 FROM tenants t WHERE t.pod = p.name)",
            )
            .bind(name)
            .execute(&mut *tx)
            .await?
            .rows_affected();
            if n > 0 {
                audit(
                    &mut tx,
                    actor,
                    "pod.delete",
                    name,
                    serde_json::json!({"reason": "removed from the config file by a reload"}),
                )
                .await?;
                removed_pods.push(name.clone());
            } else {
                kept_pods.push(name.clone());
            }
        }
        let v = insert_config_version(&mut tx, version).await?;
        let mut detail = detail;
        if let Some(d) = detail.as_object_mut() {
            d.insert("version".into(), v.into());
            d.insert("removed_pods".into(), serde_json::json!(removed_pods));
            d.insert("kept_pods".into(), serde_json::json!(kept_pods));
        }
        audit(
            &mut tx,
            actor,
            "config.reload",
            &format!("version {v}"),
            detail,
        )
        .await?;
        notify(&mut tx).await?;
        tx.commit().await?;
        Ok(AppliedConfig {
            version: v,
            removed_pods,
            kept_pods,
        })
    }

    /// Records the config a router starts with, unless it is the latest version already (so
    /// restarts do not add duplicates). Returns the new version, if one was added.
    pub async fn record_start_config(
        &self,
        version: &NewConfigVersion<'_>,
        actor: &str,
        detail: serde_json::Value,
    ) -> Result<Option<i64>, CatalogError> {
        let mut tx = self.pool.begin().await?;
        // Routers starting together must not both record the same file.
        sqlx::query("LOCK TABLE config_versions IN SHARE ROW EXCLUSIVE MODE")
            .execute(&mut *tx)
            .await?;
        let latest: Option<String> =
            sqlx::query_scalar("SELECT hash FROM config_versions ORDER BY version DESC LIMIT 1")
                .fetch_optional(&mut *tx)
                .await?;
        if latest.as_deref() == Some(version.hash) {
            return Ok(None);
        }
        let v = insert_config_version(&mut tx, version).await?;
        audit(
            &mut tx,
            actor,
            "config.start",
            &format!("version {v}"),
            detail,
        )
        .await?;
        tx.commit().await?;
        Ok(Some(v))
    }

    /// The newest recorded config, with its text.
    pub async fn latest_config(&self) -> Result<Option<ConfigVersionRow>, CatalogError> {
        self.fetch_config_version(None).await
    }

    /// Recorded configs, newest first, without their text.
    pub async fn config_versions(&self, limit: i64) -> Result<Vec<ConfigVersionRow>, CatalogError> {
        let rows = sqlx::query(
            "SELECT version, hash, applied_at, forced, diff FROM config_versions
              ORDER BY version DESC LIMIT $1",
        )
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .iter()
            .map(|r| config_version_row(r, false))
            .collect::<Result<_, _>>()?)
    }

    /// One recorded config with its text.
    pub async fn config_version(
        &self,
        version: i64,
    ) -> Result<Option<ConfigVersionRow>, CatalogError> {
        self.fetch_config_version(Some(version)).await
    }

    /// `version`, or the newest when `None`.
    async fn fetch_config_version(
        &self,
        version: Option<i64>,
    ) -> Result<Option<ConfigVersionRow>, CatalogError> {
        let row = sqlx::query(
            "SELECT version, hash, applied_at, forced, diff, config FROM config_versions
              WHERE version = coalesce($1, (SELECT max(version) FROM config_versions))",
        )
        .bind(version)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.map(|r| config_version_row(&r, true)).transpose()?)
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

    /// Sets or clears (None) a tenant's pool mode override, audited.
    pub async fn set_tenant_pool_mode(
        &self,
        name: &str,
        mode: Option<&str>,
        actor: &str,
    ) -> Result<bool, CatalogError> {
        let mut tx = self.pool.begin().await?;
        let n =
            sqlx::query("UPDATE tenants SET pool_mode = $2, updated_at = now() WHERE name = $1")
                .bind(name)
                .bind(mode)
                .execute(&mut *tx)
                .await?
                .rows_affected();
        if n > 0 {
            audit(
                &mut tx,
                actor,
                "tenant.pool_mode",
                name,
                serde_json::json!({ "pool_mode": mode }),
            )
            .await?;
            notify(&mut tx).await?;
        }
        tx.commit().await?;
        Ok(n > 0)
    }

    /// Makes `new_primary` the pod's primary, with `replicas` as its replicas, if
    /// `old_primary` still is its primary (compare-and-set, so routers racing to follow the
    /// same promotion agree); the route version of every tenant on the pod grows by one.
    /// Audited as `pod.failover` with `detail`, then NOTIFY. False when the pod's primary was
    /// no longer `old_primary` (nothing changed).
    pub async fn switch_primary(
        &self,
        pod: &str,
        old_primary: &str,
        new_primary: &str,
        replicas: &[String],
        actor: &str,
        detail: serde_json::Value,
    ) -> Result<bool, CatalogError> {
        let mut tx = self.pool.begin().await?;
        let n = sqlx::query(
            "UPDATE pods SET primary_url = $3, replicas = $4, updated_at = now()
              WHERE name = $1 AND primary_url = $2",
        )
        .bind(pod)
        .bind(old_primary)
        .bind(new_primary)
        .bind(sqlx::types::Json(replicas))
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if n == 0 {
            return Ok(false);
        }
        sqlx::query(
            "UPDATE tenants SET route_version = route_version + 1, updated_at = now() WHERE pod = $1",
        )
        .bind(pod)
        .execute(&mut *tx)
        .await?;
        audit(&mut tx, actor, "pod.failover", pod, detail).await?;
        notify(&mut tx).await?;
        tx.commit().await?;
        Ok(true)
    }

    /// Sets an active tenant `paused` (or a paused one `active`), audited and notified;
    /// false when the tenant was not in the expected state.
    pub async fn set_tenant_paused(
        &self,
        name: &str,
        paused: bool,
        actor: &str,
    ) -> Result<bool, CatalogError> {
        let (from, to, action) = if paused {
            ("active", "paused", "tenant.pause")
        } else {
            ("paused", "active", "tenant.resume")
        };
        let mut tx = self.pool.begin().await?;
        let n = sqlx::query(
            "UPDATE tenants SET state = $3, updated_at = now() WHERE name = $1 AND state = $2",
        )
        .bind(name)
        .bind(from)
        .bind(to)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if n > 0 {
            audit(&mut tx, actor, action, name, serde_json::json!({})).await?;
            notify(&mut tx).await?;
        }
        tx.commit().await?;
        Ok(n > 0)
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

    /// Inserts a new pod (not from the config: a provider made it), audited `pod.add`, and
    /// NOTIFYs; false when a pod of that name exists.
    pub async fn add_pod(
        &self,
        pod: &PodRow,
        actor: &str,
        detail: serde_json::Value,
    ) -> Result<bool, CatalogError> {
        let mut tx = self.pool.begin().await?;
        let added = sqlx::query(
            "INSERT INTO pods (name, primary_url, replicas, http, weight, accepting, pool_mode)
             VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (name) DO NOTHING",
        )
        .bind(&pod.name)
        .bind(&pod.primary_url)
        .bind(sqlx::types::Json(&pod.replicas))
        .bind(sqlx::types::Json(&pod.http))
        .bind(pod.weight)
        .bind(pod.accepting)
        .bind(&pod.pool_mode)
        .execute(&mut *tx)
        .await?
        .rows_affected()
            > 0;
        if added {
            audit(&mut tx, actor, "pod.add", &pod.name, detail).await?;
            notify(&mut tx).await?;
        }
        tx.commit().await?;
        Ok(added)
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

/// Audits an action whose own change is elsewhere (a cancel request); a failure is logged.
pub async fn audit_quietly(catalog: &Catalog, actor: &str, action: &str, target: &str) {
    if let Ok(mut conn) = catalog.pool.acquire().await {
        if let Err(e) = audit(&mut conn, actor, action, target, serde_json::json!({})).await {
            tracing::warn!("cannot audit {action} on {target}: {e}");
        }
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

/// The catalog learns which server is a pod's primary (a failover changes it); the config
/// only lists the pod's servers. So while the config names the same set of servers, the
/// catalog's choice of primary stays, and a restart or reload after a failover never routes
/// writes back to the old primary. A config that names other servers wins.
async fn keep_failed_over_primary(
    conn: &mut sqlx::PgConnection,
    pod: &PodRow,
) -> Result<Option<PodRow>, CatalogError> {
    let row = sqlx::query("SELECT primary_url, replicas FROM pods WHERE name = $1 FOR UPDATE")
        .bind(&pod.name)
        .fetch_optional(conn)
        .await?;
    let Some(row) = row else {
        return Ok(None);
    };
    let primary: String = row.try_get("primary_url")?;
    let replicas = row
        .try_get::<sqlx::types::Json<Vec<String>>, _>("replicas")?
        .0;
    let servers = |p: &str, r: &[String]| {
        let mut all: Vec<String> = r.to_vec();
        all.push(p.to_owned());
        all.sort();
        all
    };
    if primary == pod.primary_url
        || servers(&primary, &replicas) != servers(&pod.primary_url, &pod.replicas)
    {
        return Ok(None);
    }
    Ok(Some(PodRow {
        primary_url: primary,
        replicas,
        ..pod.clone()
    }))
}

async fn upsert_pod(conn: &mut sqlx::PgConnection, pod: &PodRow) -> Result<(), CatalogError> {
    let learned = keep_failed_over_primary(conn, pod).await?;
    let pod = learned.as_ref().unwrap_or(pod);
    sqlx::query(
        "INSERT INTO pods (name, primary_url, replicas, http, weight, accepting, pool_mode, origin)
         VALUES ($1, $2, $3, $4, $5, $6, $7, 'config')
         ON CONFLICT (name) DO UPDATE SET primary_url = excluded.primary_url,
             replicas = excluded.replicas, http = excluded.http, weight = excluded.weight,
             accepting = excluded.accepting, pool_mode = excluded.pool_mode, origin = 'config',
             updated_at = now()
         WHERE (pods.primary_url, pods.replicas, pods.http, pods.weight, pods.accepting, pods.pool_mode,
                pods.origin)
               IS DISTINCT FROM (excluded.primary_url, excluded.replicas, excluded.http, excluded.weight,
                                 excluded.accepting, excluded.pool_mode, 'config')",
    )
    .bind(&pod.name)
    .bind(&pod.primary_url)
    .bind(sqlx::types::Json(&pod.replicas))
    .bind(sqlx::types::Json(&pod.http))
    .bind(pod.weight)
    .bind(pod.accepting)
    .bind(&pod.pool_mode)
    .execute(conn)
    .await?;
    Ok(())
}

async fn insert_config_version(
    conn: &mut sqlx::PgConnection,
    v: &NewConfigVersion<'_>,
) -> Result<i64, CatalogError> {
    Ok(sqlx::query_scalar(
        "INSERT INTO config_versions (hash, forced, config, diff) VALUES ($1, $2, $3, $4)
         RETURNING version",
    )
    .bind(v.hash)
    .bind(v.forced)
    .bind(v.text)
    .bind(&v.diff)
    .fetch_one(conn)
    .await?)
}

fn config_version_row(
    r: &sqlx::postgres::PgRow,
    with_text: bool,
) -> Result<ConfigVersionRow, sqlx::Error> {
    Ok(ConfigVersionRow {
        version: r.try_get("version")?,
        hash: r.try_get("hash")?,
        applied_at: r.try_get("applied_at")?,
        forced: r.try_get("forced")?,
        diff: r.try_get("diff")?,
        config: if with_text {
            Some(r.try_get("config")?)
        } else {
            None
        },
    })
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
        pool_mode: r.try_get("pool_mode")?,
    })
}

fn tenant_row(r: &sqlx::postgres::PgRow) -> Result<TenantRow, sqlx::Error> {
    Ok(TenantRow {
        name: r.try_get("name")?,
        pod: r.try_get("pod")?,
        route_version: r.try_get("route_version")?,
        state: r.try_get("state")?,
        roles: r.try_get("roles")?,
        pool_mode: r.try_get("pool_mode")?,
    })
}
