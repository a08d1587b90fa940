//! The Fleet: the router's control plane in one place — the catalog, the published
//! RoutingTable, the proxy, and the operations the admin API and the demo perform (roles,
//! tenants, pods). Every mutation is checked first, applied so that a failure leaves nothing
//! half-done, audited, and announced to every router with NOTIFY. Config reloads
//! ([`Fleet::reload_config`], from SIGHUP and the admin API) live here too.

use crate::catalog::{Catalog, CatalogError, NewConfigVersion, PodRow, TenantRow};
use crate::config::{self, Config, ConfigError, ConfigSource, FieldChange, Refusal};
use crate::health::{self, PodServers};
use crate::podadmin;
use crate::protocol::scram::Verifier;
use crate::proxy::{Proxy, ProxySettings};
use crate::routing::placement::{self, Candidate};
use crate::routing::{RoutingTable, SharedTable};
use arc_swap::ArcSwap;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

mod pods;
pub mod routers;
pub use pods::NewPod;

/// What kind of failure, which decides the HTTP status in one place (admin::AppError).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    BadRequest,
    NotFound,
    Conflict,
    Unavailable,
    Internal,
}

/// A control-plane error: a stable snake_case code and a message that says what to do.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct FleetError {
    pub kind: ErrorKind,
    pub code: &'static str,
    pub message: String,
}

impl FleetError {
    pub fn new(kind: ErrorKind, code: &'static str, message: impl Into<String>) -> Self {
        FleetError {
            kind,
            code,
            message: message.into(),
        }
    }
}

impl From<CatalogError> for FleetError {
    fn from(e: CatalogError) -> Self {
        match e {
            CatalogError::Conflict(m) => FleetError::new(ErrorKind::Conflict, "conflict", m),
            e => FleetError::new(
                ErrorKind::Unavailable,
                "catalog_unavailable",
                format!("{e}"),
            ),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewTenant {
    pub name: String,
    /// Place on this pod instead of asking the placement ring.
    #[serde(default)]
    pub pod: Option<String>,
    /// Roles that may reach the tenant; the first owns its database.
    pub roles: Vec<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct PodView {
    pub name: String,
    /// The primary's URL with any password redacted.
    pub primary: String,
    pub replicas: Vec<crate::health::ReplicaView>,
    pub http: Vec<String>,
    pub weight: f64,
    pub accepting: bool,
    pub tenants: usize,
    /// The primary's: "up", "up (in recovery)" or "down: why".
    pub health: String,
    /// "config" (from pods.toml: reloads manage it) or "api" (added through the admin API
    /// or a pod provider: only the API deletes it).
    pub origin: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct TenantView {
    pub name: String,
    pub pod: String,
    pub route_version: i64,
    pub state: String,
    pub roles: Vec<String>,
    /// The tenant's own pool mode; `null` when it follows its pod and the config.
    pub pool_mode: Option<String>,
}

impl From<TenantRow> for TenantView {
    fn from(t: TenantRow) -> Self {
        TenantView {
            name: t.name,
            pod: t.pod,
            route_version: t.route_version,
            state: t.state,
            roles: t.roles,
            pool_mode: t.pool_mode,
        }
    }
}

/// What a config reload did; the admin API answers it as JSON.
#[derive(Debug, Clone, Serialize)]
pub struct ReloadOutcome {
    /// False when the file is byte for byte the one running: nothing was recorded.
    pub applied: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub version: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hash: Option<String>,
    pub diff: Vec<FieldChange>,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub forced: bool,
    /// The safety rules `force` overrode.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub overridden: Vec<Refusal>,
    /// Pods the file no longer lists, deleted from the catalog (they had no tenants).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub removed_pods: Vec<String>,
}

/// Why a config reload did not happen; the running config stays in every case.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error("this router was started without a config file, so there is nothing to re-read; run it with `podrouter serve --config FILE`")]
    NoConfigFile,
    #[error("{0}; the running config stays: fix the file and reload again (force does not override an invalid file)")]
    Invalid(ConfigError),
    #[error("reload refused, the running config stays: {}; fix the file, or reload with force (`podrouter config reload --force`, POST /v1/config/reload {{\"force\": true}}) to apply it anyway", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))]
    Refused(Vec<Refusal>),
    #[error(transparent)]
    Fleet(#[from] FleetError),
}

impl ReloadError {
    pub fn kind(&self) -> ErrorKind {
        match self {
            ReloadError::NoConfigFile | ReloadError::Invalid(_) => ErrorKind::BadRequest,
            ReloadError::Refused(_) => ErrorKind::Conflict,
            ReloadError::Fleet(e) => e.kind,
        }
    }

    pub fn code(&self) -> &'static str {
        match self {
            ReloadError::NoConfigFile => "no_config_file",
            ReloadError::Invalid(_) => "invalid_config",
            ReloadError::Refused(_) => "reload_refused",
            ReloadError::Fleet(e) => e.code,
        }
    }
}

impl From<CatalogError> for ReloadError {
    fn from(e: CatalogError) -> Self {
        ReloadError::Fleet(e.into())
    }
}

pub struct Fleet {
    pub catalog: Catalog,
    pub table: SharedTable,
    pub proxy: Arc<Proxy>,
    /// The config in force. Reload replace order: catalog (pods, version, audit) → `config`
    /// → proxy settings (pools resized) → routes; readers load it whole, never a mix.
    pub config: ArcSwap<Config>,
    pub config_path: Option<PathBuf>,
    pub admin_token: Option<String>,
    /// The file the running config came from (text, hash, explicit fields): what a reload is
    /// diffed against. An async mutex because it is held across the whole reload, so that
    /// a SIGHUP and an API call never interleave; the hot path never touches it.
    source: tokio::sync::Mutex<ConfigSource>,
    /// Long-running operations (moves, splits) of this router.
    pub jobs: Arc<crate::jobs::Jobs>,
    /// The Prometheus registry, the router's per-tenant counters' exporter and the pod
    /// sampler's board (`GET /metrics`).
    pub metrics: Arc<crate::metrics::Metrics>,
    /// Autopilot recommendations and the pods the provider started.
    pub planner: crate::planner::PlannerState,
    routes_lock: tokio::sync::Mutex<()>,
    /// This router's id among the routers sharing the catalog (`routers::register`).
    pub router_id: Arc<routers::RouterId>,
    /// Pauses of live moves run by other routers that this router holds.
    pub remote_pauses: routers::RemotePauses,
}

impl Fleet {
    pub fn new(catalog: Catalog, source: ConfigSource, config_path: Option<PathBuf>) -> Fleet {
        let config = source.config.clone();
        let admin_token = config.admin_token(config_path.as_deref().and_then(|p| p.parent()));
        let table: SharedTable = Arc::new(ArcSwap::from_pointee(RoutingTable::default()));
        let base = config_path.as_deref().and_then(|p| p.parent());
        let proxy = Arc::new(Proxy::new(table.clone(), &config, base));
        let router_id = Arc::new(routers::RouterId::default());
        Fleet {
            jobs: Arc::new(crate::jobs::Jobs::new(
                catalog.clone(),
                config.moves.max_concurrent as usize,
                router_id.clone(),
            )),
            router_id,
            remote_pauses: Default::default(),
            routes_lock: tokio::sync::Mutex::new(()),
            metrics: Arc::new(crate::metrics::Metrics::new(proxy.clone())),
            planner: Default::default(),
            catalog,
            table,
            proxy,
            config: ArcSwap::from_pointee(config),
            config_path,
            admin_token,
            source: tokio::sync::Mutex::new(source),
        }
    }

    /// The text of the config file in force (as last applied).
    pub async fn config_text(&self) -> String {
        self.source.lock().await.text.clone()
    }

    /// Records the config this router starts with as a new version, unless the catalog's
    /// latest version is the same file. A start is not refused (a restart is deliberate), but
    /// what a reload would have refused is logged loudly and audited.
    pub async fn record_start_config(&self) -> Result<Option<i64>, FleetError> {
        let source = self.source.lock().await;
        let previous = self.catalog.latest_config().await?;
        if previous.as_ref().is_some_and(|p| p.hash == source.hash) {
            return Ok(None);
        }
        let previous = previous.and_then(|p| {
            ConfigSource::parse(&format!("config version {}", p.version), p.config?).ok()
        });
        let (diff, warnings) = match &previous {
            Some(prev) => {
                let tenants = self.tenants_per_pod().await?;
                let warnings: Vec<Refusal> = config::reload_refusals(prev, &source, &tenants)
                    .into_iter()
                    .filter(|r| !config::RESTART_ONLY.contains(&r.field.as_str()))
                    .collect();
                (config::diff(&prev.config, &source.config), warnings)
            }
            None => (Vec::new(), Vec::new()),
        };
        for w in &warnings {
            tracing::warn!(
                "started with a config that a reload would have refused: {w} (the previous config is in GET /v1/config/history)"
            );
        }
        let diff = serde_json::json!(diff);
        let version = self
            .catalog
            .record_start_config(
                &NewConfigVersion {
                    hash: &source.hash,
                    text: &source.text,
                    forced: false,
                    diff: diff.clone(),
                },
                "podrouter",
                serde_json::json!({"hash": source.hash, "diff": diff, "warnings": warnings}),
            )
            .await?;
        Ok(version)
    }

    /// Re-reads the config file and applies it if it is valid and safe (or `force`): what
    /// SIGHUP and `POST /v1/config/reload` do. Validation errors are never overridden; a
    /// refused or failed reload leaves the running config as it was. Audited either way.
    pub async fn reload_config(
        &self,
        force: bool,
        actor: &str,
    ) -> Result<ReloadOutcome, ReloadError> {
        let path = self
            .config_path
            .as_deref()
            .ok_or(ReloadError::NoConfigFile)?;
        let mut source = self.source.lock().await;
        let file = path.display().to_string();
        let new = match ConfigSource::load(path) {
            Ok(new) => new,
            Err(e) => {
                let detail =
                    serde_json::json!({"file": file, "force": force, "error": e.to_string()});
                self.audit_quietly(actor, "config.reload_invalid", detail)
                    .await;
                return Err(ReloadError::Invalid(e));
            }
        };
        if new.hash == source.hash {
            return Ok(ReloadOutcome {
                applied: false,
                version: None,
                hash: None,
                diff: Vec::new(),
                forced: false,
                overridden: Vec::new(),
                removed_pods: Vec::new(),
            });
        }
        let tenants = self.tenants_per_pod().await?;
        let refusals = config::reload_refusals(&source, &new, &tenants);
        if !refusals.is_empty() && !force {
            let detail = serde_json::json!({"file": file, "hash": new.hash, "refusals": refusals});
            self.audit_quietly(actor, "config.reload_refused", detail)
                .await;
            return Err(ReloadError::Refused(refusals));
        }
        let forced = force && !refusals.is_empty();
        let diff = config::diff(&source.config, &new.config);
        let kept: std::collections::BTreeSet<&str> =
            new.config.pods.iter().map(|p| p.name.as_str()).collect();
        let dropped: Vec<String> = source
            .config
            .pods
            .iter()
            .filter(|p| !kept.contains(p.name.as_str()))
            .map(|p| p.name.clone())
            .collect();
        let applied = self
            .catalog
            .apply_config(
                &NewConfigVersion {
                    hash: &new.hash,
                    text: &new.text,
                    forced,
                    diff: serde_json::json!(diff),
                },
                &pod_rows(&new.config),
                &dropped,
                actor,
                serde_json::json!({"file": file, "hash": new.hash, "force": force, "overridden": refusals, "diff": diff}),
            )
            .await?;
        let mut running = new.config.clone();
        running.keep_restart_only(&self.config.load());
        let settings = ProxySettings::from_config(&running);
        self.config.store(Arc::new(running));
        self.proxy.apply_settings(settings);
        if let Err(e) = self.reload_routes().await {
            // The catalog NOTIFYed; the follower retries, so routes catch up.
            tracing::warn!(
                "config version {} applied, but reloading routes failed: {e}",
                applied.version
            );
        }
        for pod in &applied.kept_pods {
            tracing::warn!(pod, "the config no longer lists this pod, but tenants still live on it; it stays in the catalog until they are moved");
        }
        tracing::info!(
            version = applied.version,
            changes = diff.len(),
            forced,
            "config reloaded"
        );
        let outcome = ReloadOutcome {
            applied: true,
            version: Some(applied.version),
            hash: Some(new.hash.clone()),
            diff,
            forced,
            overridden: refusals,
            removed_pods: applied.removed_pods,
        };
        *source = new;
        Ok(outcome)
    }

    async fn tenants_per_pod(&self) -> Result<BTreeMap<String, usize>, FleetError> {
        let mut out = BTreeMap::new();
        for t in self.catalog.snapshot().await?.tenants {
            *out.entry(t.pod).or_insert(0) += 1;
        }
        Ok(out)
    }

    /// Audits a reload that did not happen; the caller's answer matters more than the row.
    async fn audit_quietly(&self, actor: &str, action: &str, detail: serde_json::Value) {
        if let Err(e) = self.catalog.audit(actor, action, "config", detail).await {
            tracing::warn!("cannot audit {action}: {e}");
        }
    }

    /// Rebuilds the RoutingTable from the catalog and publishes it (build → store; old
    /// sessions drain on the routes they hold).
    pub async fn reload_routes(&self) -> Result<(), FleetError> {
        // Serialised with itself and with `store_routes`: a snapshot read before a route
        // switch committed can never be stored after the switch's own table.
        let _one_at_a_time = self.routes_lock.lock().await;
        let snap = self.catalog.snapshot().await?;
        let table = RoutingTable::build(&snap);
        self.sync_operator_pauses(&table);
        self.table.store(Arc::new(table));
        Ok(())
    }

    /// Operator pauses live in the catalog (state `paused`), so every router holds them:
    /// gates follow the table. Gates paused by a live move are the mover's, not touched.
    fn sync_operator_pauses(&self, table: &RoutingTable) {
        const OPERATOR: &str = "an operator";
        for (name, t) in &table.tenants {
            if t.state == "paused" {
                let gate = self.proxy.gates.get(name);
                if !gate.is_paused() {
                    gate.pause(OPERATOR);
                }
            }
        }
        for name in self.proxy.gates.paused() {
            let gate = self.proxy.gates.get(&name);
            let still = table
                .tenants
                .get(&name)
                .is_some_and(|t| t.state == "paused");
            if !still && gate.reason() == OPERATOR {
                gate.resume();
            }
        }
    }

    /// `POST /v1/tenants/{t}/pause`: new transactions of the tenant wait (up to
    /// `moves.operator_pause_hold`), running ones finish. Every router follows.
    pub async fn pause_tenant(&self, name: &str, actor: &str) -> Result<TenantView, FleetError> {
        let t = self.tenant(name).await?;
        if t.state != "paused" && !self.catalog.set_tenant_paused(name, true, actor).await? {
            return Err(FleetError::new(
                ErrorKind::Conflict,
                "tenant_busy",
                format!(
                    "tenant {name:?} is {}; only an active tenant can be paused",
                    t.state
                ),
            ));
        }
        self.reload_routes().await?;
        self.tenant(name).await
    }

    pub async fn resume_tenant(&self, name: &str, actor: &str) -> Result<TenantView, FleetError> {
        let t = self.tenant(name).await?;
        if t.state == "paused" {
            self.catalog.set_tenant_paused(name, false, actor).await?;
        }
        self.reload_routes().await?;
        self.tenant(name).await
    }

    /// Stores a table derived from the current one (a committed route switch), in order with
    /// `reload_routes`.
    pub async fn store_routes(
        &self,
        change: impl FnOnce(&RoutingTable) -> Option<RoutingTable>,
    ) -> bool {
        let _one_at_a_time = self.routes_lock.lock().await;
        match change(&self.table.load()) {
            Some(t) => {
                self.table.store(Arc::new(t));
                true
            }
            None => false,
        }
    }

    /// Writes the config's pods into the catalog (the config wins for the fields it sets).
    pub async fn sync_pods_from_config(&self) -> Result<(), FleetError> {
        for pod in pod_rows(&self.config.load()) {
            self.catalog.upsert_pod(&pod).await?;
        }
        Ok(())
    }

    pub async fn pods(&self) -> Result<Vec<PodView>, FleetError> {
        let snap = self.catalog.snapshot().await?;
        // Health as the monitor last saw it; pods it has not probed as the catalog now lists
        // them (just added or failed over, or the monitor is stuck) are probed here.
        let board = self.proxy.health.load();
        let servers: Vec<PodServers> = snap
            .pods
            .iter()
            .map(|p| PodServers {
                name: p.name.clone(),
                primary: p.primary_url.clone(),
                replicas: p.replicas.clone(),
            })
            .collect();
        let unprobed: Vec<PodServers> = servers
            .iter()
            .filter(|s| !board.fresh() || !board.pods.get(&s.name).is_some_and(|h| h.describes(s)))
            .cloned()
            .collect();
        let probed_now = health::probe_pods_now(&unprobed).await;
        let mut origins = crate::catalog::pods::origins(self.catalog.pool()).await?;
        Ok(snap
            .pods
            .iter()
            .map(|p| {
                let h = probed_now
                    .get(&p.name)
                    .or_else(|| board.pods.get(&p.name))
                    .expect("every pod is probed");
                PodView {
                    name: p.name.clone(),
                    primary: config::redact(&p.primary_url),
                    replicas: h.replicas.iter().map(Into::into).collect(),
                    http: p.http.clone(),
                    weight: p.weight,
                    accepting: p.accepting,
                    tenants: snap.tenants.iter().filter(|t| t.pod == p.name).count(),
                    health: h.primary.primary_status(),
                    origin: origins
                        .remove(&p.name)
                        .unwrap_or_else(|| crate::catalog::pods::ORIGIN_API.into()),
                }
            })
            .collect())
    }

    pub async fn tenants(&self) -> Result<Vec<TenantView>, FleetError> {
        Ok(self
            .catalog
            .snapshot()
            .await?
            .tenants
            .into_iter()
            .map(Into::into)
            .collect())
    }

    pub async fn tenant(&self, name: &str) -> Result<TenantView, FleetError> {
        self.catalog
            .tenant(name)
            .await?
            .map(Into::into)
            .ok_or_else(|| unknown_tenant(name))
    }

    /// Creates or updates a client role; only its SCRAM verifier is kept. Pods that already
    /// serve tenants granted to the role get the new verifier too.
    pub async fn put_role(
        &self,
        name: &str,
        password: &str,
        actor: &str,
    ) -> Result<(), FleetError> {
        if name.is_empty() || name.len() > 63 || name.contains('\0') || name.starts_with("pg_") {
            return Err(FleetError::new(
                ErrorKind::BadRequest,
                "invalid_role_name",
                format!("role name {name:?} is not usable: use 1 to 63 characters, not starting with pg_"),
            ));
        }
        if password.len() < 4 {
            return Err(FleetError::new(
                ErrorKind::BadRequest,
                "weak_password",
                "the password must have at least 4 characters",
            ));
        }
        let verifier = Verifier::generate(password);
        let snap = self.catalog.snapshot().await?;
        let pods: std::collections::BTreeSet<&str> = snap
            .tenants
            .iter()
            .filter(|t| t.roles.iter().any(|r| r == name))
            .map(|t| t.pod.as_str())
            .collect();
        for pod in pods {
            let url = &snap
                .pods
                .iter()
                .find(|p| p.name == pod)
                .expect("tenant's pod exists")
                .primary_url;
            let mut conn = podadmin::connect(url, None)
                .await
                .map_err(|e| pod_unreachable(pod, &e))?;
            podadmin::ensure_role(&mut conn, name, &verifier)
                .await
                .map_err(|e| pod_failed(pod, &e))?;
        }
        self.catalog.upsert_role(name, &verifier, actor).await?;
        self.reload_routes().await
    }

    pub async fn create_tenant(
        &self,
        req: NewTenant,
        actor: &str,
    ) -> Result<TenantView, FleetError> {
        let name = req.name.as_str();
        if !config::valid_name(name) || ["postgres", "template0", "template1"].contains(&name) {
            return Err(FleetError::new(
                ErrorKind::BadRequest,
                "invalid_tenant_name",
                format!("tenant name {name:?} is not usable: {}", config::NAME_RULE),
            ));
        }
        if req.roles.is_empty() {
            return Err(FleetError::new(
                ErrorKind::BadRequest,
                "no_roles",
                "a tenant needs at least one role: create one with `podrouter roles create NAME` (POST /v1/roles) and pass it in \"roles\"",
            ));
        }
        let snap = self.catalog.snapshot().await?;
        if snap.tenants.iter().any(|t| t.name == name) {
            return Err(FleetError::new(
                ErrorKind::Conflict,
                "tenant_exists",
                format!("tenant {name:?} already exists"),
            ));
        }
        let mut verifiers = Vec::new();
        for r in &req.roles {
            match snap.roles.iter().find(|x| &x.name == r) {
                Some(row) => verifiers.push((row.name.clone(), row.verifier.clone())),
                None => {
                    return Err(FleetError::new(
                        ErrorKind::BadRequest,
                        "unknown_role",
                        format!("role {r:?} does not exist: create it first with `podrouter roles create {r}`"),
                    ))
                }
            }
        }
        let pod = match &req.pod {
            Some(p) => snap
                .pods
                .iter()
                .find(|x| &x.name == p)
                .ok_or_else(|| unknown_pod(p))?,
            None => {
                let candidates: Vec<Candidate<'_>> = snap
                    .pods
                    .iter()
                    .map(|p| Candidate {
                        name: &p.name,
                        weight: p.weight,
                        accepting: p.accepting,
                    })
                    .collect();
                let chosen = placement::place(name, &candidates).ok_or_else(|| {
                    FleetError::new(
                        ErrorKind::Conflict,
                        "no_pod_accepts_tenants",
                        "no pod accepts new tenants: add a pod or set accepting = true on one",
                    )
                })?;
                snap.pods
                    .iter()
                    .find(|p| p.name == chosen)
                    .expect("placed on a listed pod")
            }
        };
        let mut conn = podadmin::connect(&pod.primary_url, None)
            .await
            .map_err(|e| pod_unreachable(&pod.name, &e))?;
        if podadmin::database_exists(&mut conn, name)
            .await
            .map_err(|e| pod_failed(&pod.name, &e))?
        {
            return Err(FleetError::new(
                ErrorKind::Conflict,
                "database_exists_on_pod",
                format!("pod {:?} already has a database named {name:?} that the catalog does not know; drop or rename it there first", pod.name),
            ));
        }
        // Catalog row first (state 'creating', not routable), then the pod, then 'active'.
        // Any failure after the row exists undoes both sides.
        self.catalog
            .insert_creating_tenant(name, &pod.name, &req.roles)
            .await
            .map_err(|e| {
                if let CatalogError::Query(sqlx::Error::Database(d)) = &e {
                    if d.is_unique_violation() {
                        return FleetError::new(
                            ErrorKind::Conflict,
                            "tenant_exists",
                            format!("tenant {name:?} already exists"),
                        );
                    }
                }
                e.into()
            })?;
        let on_pod = async {
            for (role, verifier) in &verifiers {
                podadmin::ensure_role(&mut conn, role, verifier).await?;
            }
            podadmin::create_database(&mut conn, name, &req.roles[0], &req.roles).await
        };
        if let Err(e) = on_pod.await {
            let _ = podadmin::drop_database(&mut conn, name).await;
            let _ = self
                .catalog
                .delete_tenant(name, actor, serde_json::json!({"rolled_back": true}))
                .await;
            return Err(pod_failed(&pod.name, &e));
        }
        self.catalog
            .activate_tenant(name, actor, serde_json::json!({"pod": pod.name, "roles": req.roles, "placed_by": if req.pod.is_some() { "request" } else { "ring" }}))
            .await?;
        self.reload_routes().await?;
        self.tenant(name).await
    }

    /// Sets (or with `None` clears) a tenant's pool mode. New sessions use it; sessions that
    /// are open keep the mode they started with.
    pub async fn set_tenant_pool_mode(
        &self,
        name: &str,
        mode: Option<crate::config::PoolMode>,
        actor: &str,
    ) -> Result<TenantView, FleetError> {
        let mode = mode.map(|m| m.to_string());
        if !self
            .catalog
            .set_tenant_pool_mode(name, mode.as_deref(), actor)
            .await?
        {
            return Err(unknown_tenant(name));
        }
        self.reload_routes().await?;
        self.tenant(name).await
    }

    /// Deletes a tenant from the catalog. Its database stays on the pod unless
    /// `drop_database` is set.
    pub async fn delete_tenant(
        &self,
        name: &str,
        drop_database: bool,
        actor: &str,
    ) -> Result<serde_json::Value, FleetError> {
        let snap = self.catalog.snapshot().await?;
        let t = snap
            .tenants
            .iter()
            .find(|t| t.name == name)
            .ok_or_else(|| unknown_tenant(name))?;
        if drop_database {
            let pod = snap
                .pods
                .iter()
                .find(|p| p.name == t.pod)
                .ok_or_else(|| unknown_pod(&t.pod))?;
            let mut conn = podadmin::connect(&pod.primary_url, None)
                .await
                .map_err(|e| pod_unreachable(&pod.name, &e))?;
            podadmin::drop_database(&mut conn, name)
                .await
                .map_err(|e| pod_failed(&pod.name, &e))?;
        }
        self.catalog
            .delete_tenant(
                name,
                actor,
                serde_json::json!({"pod": t.pod, "database_dropped": drop_database}),
            )
            .await?;
        self.reload_routes().await?;
        Ok(serde_json::json!({
            "deleted": name,
            "pod": t.pod,
            "database_dropped": drop_database,
        }))
    }

    /// Finishes what a crash interrupted: tenants left in 'creating' are rolled back.
    pub async fn sweep_interrupted(&self) -> Result<(), FleetError> {
        for t in self.catalog.tenants_in_state("creating").await? {
            tracing::warn!(tenant = %t.name, "rolling back a tenant creation interrupted by a crash");
            if let Some(pod) = self.table.load().pods.get(&t.pod) {
                if let Ok(mut conn) = podadmin::connect(&pod.admin_url, None).await {
                    let _ = podadmin::drop_database(&mut conn, &t.name).await;
                }
            }
            self.catalog
                .delete_tenant(
                    &t.name,
                    "podrouter",
                    serde_json::json!({"rolled_back": "interrupted creation"}),
                )
                .await?;
        }
        Ok(())
    }
}

fn pod_rows(config: &Config) -> Vec<PodRow> {
    config
        .pods
        .iter()
        .map(|p| PodRow {
            name: p.name.clone(),
            primary_url: p.primary.clone(),
            replicas: p.replicas.clone(),
            http: p.http.clone(),
            weight: p.weight,
            accepting: p.accepting,
            pool_mode: p.pool_mode.map(|m| m.to_string()),
        })
        .collect()
}

fn unknown_tenant(name: &str) -> FleetError {
    FleetError::new(
        ErrorKind::NotFound,
        "unknown_tenant",
        format!("tenant {name:?} does not exist; list tenants with GET /v1/tenants"),
    )
}

pub(crate) fn unknown_pod(name: &str) -> FleetError {
    FleetError::new(
        ErrorKind::NotFound,
        "unknown_pod",
        format!("pod {name:?} does not exist; list pods with GET /v1/pods"),
    )
}

fn pod_unreachable(pod: &str, e: &sqlx::Error) -> FleetError {
    FleetError::new(
        ErrorKind::Unavailable,
        "pod_unreachable",
        format!("pod {pod:?} cannot be reached: {e}; check that it is up"),
    )
}

fn pod_failed(pod: &str, e: &sqlx::Error) -> FleetError {
    FleetError::new(
        ErrorKind::Internal,
        "pod_operation_failed",
        format!("pod {pod:?} refused the operation: {e}; nothing was kept"),
    )
}
