//! Pods through the admin API: add ([`Fleet::add_pod`], also what pod providers call),
//! delete ([`Fleet::delete_pod`]) and drain ([`Fleet::drain_pod`]: close the pod to new
//! tenants and move every tenant off it as a `drain` job whose children are ordinary moves).
//!
//! Pods added here have origin `api`: a config reload never touches them, and only this API
//! deletes them. Pods of `pods.toml` (origin `config`) are removed by taking them out of the
//! file and reloading, so the file stays the truth about them.

use super::{pod_failed, pod_unreachable, unknown_pod, ErrorKind, Fleet, FleetError, PodView};
use crate::catalog::jobs::{JobRow, NewJob};
use crate::catalog::pods::{self as q, DeleteRefusal, ORIGIN_API, ORIGIN_CONFIG};
use crate::catalog::{CatalogError, PodRow};
use crate::config::{self, PoolMode};
use crate::jobs::{JobCtx, Outcome};
use crate::podadmin;
use crate::routing::placement::{self, Candidate};
use serde::Deserialize;
use serde_json::{json, Value};
use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

/// A pod to add: `POST /v1/pods`, or a pod provider's new pod ([`NewPod::new`]).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewPod {
    pub name: String,
    /// `postgres://USER[:PASSWORD]@HOST[:PORT]` of a user that may create databases and
    /// roles (a superuser, for moves).
    pub primary: String,
    #[serde(default)]
    pub replicas: Vec<String>,
    /// The pod's HTTP upstreams for the tenant reverse proxy.
    #[serde(default)]
    pub http: Vec<String>,
    #[serde(default = "default_weight")]
    pub weight: f64,
    #[serde(default = "default_accepting")]
    pub accepting: bool,
    /// Default pool mode of its tenants; none: the config's.
    #[serde(default)]
    pub pool_mode: Option<PoolMode>,
}

fn default_weight() -> f64 {
    1.0
}

fn default_accepting() -> bool {
    true
}

impl NewPod {
    /// A pod with only a primary, weight 1, accepting tenants.
    pub fn new(name: impl Into<String>, primary: impl Into<String>) -> NewPod {
        NewPod {
            name: name.into(),
            primary: primary.into(),
            replicas: Vec::new(),
            http: Vec::new(),
            weight: default_weight(),
            accepting: default_accepting(),
            pool_mode: None,
        }
    }

    /// The same rules as a `[[pod]]` of `pods.toml` (config::Config::validate).
    fn check(&self) -> Result<(), FleetError> {
        let bad = |code, msg: String| Err(FleetError::new(ErrorKind::BadRequest, code, msg));
        if !config::valid_name(&self.name) {
            return bad(
                "invalid_pod_name",
                format!(
                    "pod name {:?} is not usable: {}",
                    self.name,
                    config::NAME_RULE
                ),
            );
        }
        for (field, url) in std::iter::once(("primary".to_owned(), &self.primary)).chain(
            self.replicas
                .iter()
                .enumerate()
                .map(|(i, r)| (format!("replicas[{i}]"), r)),
        ) {
            if let Err(e) = config::parse_pg_url(url) {
                return bad(
                    "invalid_pod_url",
                    format!("{field}: {e}; write postgres://USER[:PASSWORD]@HOST[:PORT]"),
                );
            }
        }
        if let Some(h) = self
            .http
            .iter()
            .find(|h| !(h.starts_with("http://") || h.starts_with("https://")))
        {
            return bad(
                "invalid_pod_url",
                format!("http: {h:?} is not an HTTP URL; write http://HOST:PORT"),
            );
        }
        if !(self.weight.is_finite() && self.weight > 0.0 && self.weight <= 1000.0) {
            return bad(
                "invalid_pod_weight",
                format!(
                    "weight {} is out of range; use a positive number up to 1000, e.g. 1.0",
                    self.weight
                ),
            );
        }
        Ok(())
    }

    /// What the audit log records (passwords redacted).
    fn describe(&self) -> Value {
        json!({
            "primary": config::redact(&self.primary),
            "replicas": self.replicas.iter().map(|r| config::redact(r)).collect::<Vec<_>>(),
            "http": self.http,
            "weight": self.weight,
            "accepting": self.accepting,
            "pool_mode": self.pool_mode.map(|m| m.to_string()),
            "origin": ORIGIN_API,
        })
    }
}

/// Tenants on the pod being drained that are moved at once, at most.
fn drain_window(fleet: &Fleet) -> usize {
    fleet.config.load().moves.max_concurrent.max(1) as usize
}

/// How often a drain looks at its moves.
const DRAIN_POLL: Duration = Duration::from_millis(250);

/// How long a cancelled drain waits for its moves to roll back before it reports.
const DRAIN_CANCEL_WAIT: Duration = Duration::from_secs(300);

impl Fleet {
    /// Registers a pod in the catalog (origin `api`), audited `pod.add` with `detail` and the
    /// pod's settings, once its primary answers as a primary to a user that may create
    /// databases and roles. New tenants may then be placed there and moves may target it. A
    /// pod of that name that exists already is a conflict.
    pub async fn add_pod(&self, pod: NewPod, actor: &str, detail: Value) -> Result<(), FleetError> {
        pod.check()?;
        let exists = || {
            FleetError::new(
                ErrorKind::Conflict,
                "pod_exists",
                format!(
                    "pod {:?} already exists; list pods with GET /v1/pods",
                    pod.name
                ),
            )
        };
        if q::origins(self.catalog.pool())
            .await?
            .contains_key(&pod.name)
        {
            return Err(exists());
        }
        let mut conn = podadmin::connect(&pod.primary, None)
            .await
            .map_err(|e| pod_unreachable(&pod.name, &e))?;
        let admin = podadmin::admin_facts(&mut conn)
            .await
            .map_err(|e| pod_failed(&pod.name, &e));
        let _ = sqlx::Connection::close(conn).await;
        let admin = admin?;
        if admin.in_recovery {
            return Err(FleetError::new(
                ErrorKind::BadRequest,
                "pod_primary_in_recovery",
                format!(
                    "{} is a standby (in recovery), not a primary; give its primary, and list standbys in \"replicas\"",
                    config::redact(&pod.primary)
                ),
            ));
        }
        if !(admin.superuser || (admin.createdb && admin.createrole)) {
            return Err(FleetError::new(
                ErrorKind::BadRequest,
                "pod_admin_insufficient",
                format!(
                    "user {:?} on {} may not create databases and roles; connect as a superuser (moves need one too)",
                    admin.user,
                    config::redact(&pod.primary)
                ),
            ));
        }
        let mut detail = detail;
        if let (Some(d), Value::Object(facts)) = (detail.as_object_mut(), pod.describe()) {
            d.extend(facts);
        }
        let row = PodRow {
            name: pod.name.clone(),
            primary_url: pod.primary.clone(),
            replicas: pod.replicas.clone(),
            http: pod.http.clone(),
            weight: pod.weight,
            accepting: pod.accepting,
            pool_mode: pod.pool_mode.map(|m| m.to_string()),
        };
        if !self.catalog.add_pod(&row, actor, detail).await? {
            return Err(exists());
        }
        self.reload_routes().await
    }

    /// One pod as `GET /v1/pods` lists it.
    pub async fn pod(&self, name: &str) -> Result<PodView, FleetError> {
        self.pods()
            .await?
            .into_iter()
            .find(|p| p.name == name)
            .ok_or_else(|| unknown_pod(name))
    }

    /// Deletes a pod added through the API, once no tenant lives there and no job moves
    /// tenants to or from it. Its databases stay on its servers. Pods of the config file are
    /// refused: they go by removing them from the file and reloading.
    pub async fn delete_pod(&self, name: &str, actor: &str) -> Result<Value, FleetError> {
        let refusal = match q::delete(self.catalog.pool(), name, actor).await? {
            Ok(()) => {
                self.reload_routes().await?;
                return Ok(json!({ "deleted": name }));
            }
            Err(r) => r,
        };
        let conflict = |code, msg: String| FleetError::new(ErrorKind::Conflict, code, msg);
        Err(match refusal {
            DeleteRefusal::Unknown => unknown_pod(name),
            DeleteRefusal::FromConfig => conflict(
                "pod_in_config",
                format!("pod {name:?} comes from the config file: remove its [[pod]] entry there and reload (`podrouter config reload`, POST /v1/config/reload); drain it first if tenants live there"),
            ),
            DeleteRefusal::HasTenants(n) => conflict(
                "pod_has_tenants",
                format!("{n} tenant(s) live on pod {name:?}; move them off first with `podrouter pods drain {name}` (POST /v1/pods/{name}/drain), then delete it"),
            ),
            DeleteRefusal::Busy(jobs) => conflict(
                "pod_busy",
                format!("jobs {jobs:?} are moving tenants to or from pod {name:?}; wait for them to end (GET /v1/jobs/ID) or cancel them (DELETE /v1/jobs/ID), then delete it"),
            ),
        })
    }

    /// Closes the pod to new tenants (accepting = false, audited `pod.drain`) and starts a
    /// `drain` job that moves every tenant on it to other accepting pods chosen by the
    /// placement ring, `moves.max_concurrent` at a time, each as a move job whose parent is
    /// the drain. Returns the job (pending) at once.
    ///
    /// A pod of `pods.toml` stays closed until a reload or restart writes the file's
    /// `accepting` again: set `accepting = false` in its `[[pod]]` entry to keep it closed.
    pub async fn drain_pod(
        self: &Arc<Self>,
        name: &str,
        actor: &str,
    ) -> Result<JobRow, FleetError> {
        let snap = self.catalog.snapshot().await?;
        let pod = snap
            .pods
            .iter()
            .find(|p| p.name == name)
            .ok_or_else(|| unknown_pod(name))?;
        let draining = |job: &str| {
            FleetError::new(
                ErrorKind::Conflict,
                "drain_in_progress",
                format!("pod {name:?} is being drained already ({job}); follow it with `podrouter jobs ID` or cancel it with `podrouter jobs cancel ID`"),
            )
        };
        if let Some(&id) = q::unfinished_drains(self.catalog.pool(), name)
            .await?
            .first()
        {
            return Err(draining(&format!("job {id}")));
        }
        let tenants = snap.tenants.iter().filter(|t| t.pod == name).count();
        if tenants > 0 && !snap.pods.iter().any(|p| p.name != name && p.accepting) {
            return Err(FleetError::new(
                ErrorKind::Conflict,
                "no_pod_accepts_tenants",
                format!("no other pod accepts tenants, so the {tenants} tenant(s) of pod {name:?} have nowhere to go: add a pod (POST /v1/pods) or set accepting on one"),
            ));
        }
        q::set_accepting(
            self.catalog.pool(),
            name,
            false,
            actor,
            "pod.drain",
            json!({"tenants": tenants, "was_accepting": pod.accepting}),
        )
        .await?;
        self.reload_routes().await?;
        let job = self
            .jobs
            .create(&NewJob {
                kind: "drain",
                tenant: None,
                pod: Some(name),
                params: json!({ "pod": name }),
                parent: None,
                actor,
            })
            .await
            .map_err(|e| match &e {
                CatalogError::Query(sqlx::Error::Database(d))
                    if d.constraint() == Some("jobs_one_drain_per_pod") =>
                {
                    draining("another drain job started just now")
                }
                _ => e.into(),
            })?;
        let origin = q::origins(self.catalog.pool())
            .await?
            .remove(name)
            .unwrap_or_default();
        let drain = Drain {
            fleet: self.clone(),
            pod: name.to_owned(),
            actor: actor.to_owned(),
            from_config: origin == ORIGIN_CONFIG,
        };
        self.jobs.spawn(job.id, move |ctx| drain.run(ctx));
        Ok(job)
    }
}

/// A move the drain started, until it ends.
struct ChildMove {
    job: i64,
    tenant: String,
    to: String,
}

/// The body of a `drain` job.
struct Drain {
    fleet: Arc<Fleet>,
    pod: String,
    actor: String,
    from_config: bool,
}

impl Drain {
    async fn run(self, ctx: JobCtx) -> Outcome {
        let _ = ctx.phase("moving").await;
        let mut attempted = BTreeSet::new();
        let mut running: Vec<ChildMove> = Vec::new();
        let (mut moved, mut failed) = (Vec::new(), Vec::new());
        loop {
            let snap = match self.fleet.catalog.snapshot().await {
                Ok(s) => s,
                // Moves already started go on by themselves; the operator can drain again.
                Err(e) => {
                    return Outcome::Failed {
                        error: format!("the catalog does not answer ({e}); moves already started go on: drain the pod again once it is back"),
                        result: Some(json!({"moved": moved, "failed": failed})),
                    }
                }
            };
            let todo: Vec<String> = snap
                .tenants
                .iter()
                .filter(|t| t.pod == self.pod && !attempted.contains(&t.name))
                .map(|t| t.name.clone())
                .collect();
            if todo.is_empty() && running.is_empty() {
                break;
            }
            let candidates: Vec<Candidate<'_>> = snap
                .pods
                .iter()
                .filter(|p| p.name != self.pod)
                .map(|p| Candidate {
                    name: &p.name,
                    weight: p.weight,
                    accepting: p.accepting,
                })
                .collect();
            for tenant in todo
                .iter()
                .take(drain_window(&self.fleet).saturating_sub(running.len()))
            {
                if ctx.cancelled() {
                    break;
                }
                attempted.insert(tenant.clone());
                let Some(to) = placement::place(tenant, &candidates) else {
                    failed.push(json!({"tenant": tenant, "error": "no other pod accepts tenants"}));
                    continue;
                };
                match crate::mover::start_move(&self.fleet, tenant, to, &self.actor, Some(ctx.id))
                    .await
                {
                    Ok(job) => running.push(ChildMove {
                        job: job.id,
                        tenant: tenant.clone(),
                        to: to.to_owned(),
                    }),
                    Err(e) => failed.push(json!({"tenant": tenant, "to": to, "error": e.message})),
                }
            }
            let total = attempted.len() + todo.iter().filter(|t| !attempted.contains(*t)).count();
            let _ = ctx
                .progress(
                    json!({"done": moved.len() + failed.len(), "total": total, "unit": "tenants",
                           "moving": running.iter().map(|c| &c.tenant).collect::<Vec<_>>()}),
                    false,
                )
                .await;
            if ctx.cancelled() {
                return self.cancel(running, moved, failed).await;
            }
            tokio::select! {
                _ = tokio::time::sleep(DRAIN_POLL) => {}
                _ = ctx.cancel.cancelled() => {}
            }
            self.collect(&mut running, &mut moved, &mut failed).await;
        }
        let total = moved.len() + failed.len();
        let _ = ctx
            .progress(
                json!({"done": total, "total": total, "unit": "tenants"}),
                true,
            )
            .await;
        let note = self.from_config.then(|| format!(
            "pod {:?} comes from the config file: a reload or restart opens it again unless its [[pod]] entry says accepting = false",
            self.pod
        ));
        if failed.is_empty() {
            return Outcome::Succeeded(json!({"pod": self.pod, "moved": moved, "note": note}));
        }
        let why: Vec<String> = failed
            .iter()
            .map(|f| {
                format!(
                    "{}: {}",
                    f["tenant"].as_str().unwrap_or("?"),
                    f["error"].as_str().unwrap_or("?")
                )
            })
            .collect();
        Outcome::Failed {
            error: format!(
                "{} of {total} tenant(s) could not be moved off pod {:?} ({}); the pod stays closed to new tenants: fix the cause and drain it again",
                failed.len(),
                self.pod,
                why.join("; ")
            ),
            result: Some(json!({"pod": self.pod, "moved": moved, "failed": failed, "note": note})),
        }
    }

    /// Moves `running` that ended, into `moved` or `failed`.
    async fn collect(
        &self,
        running: &mut Vec<ChildMove>,
        moved: &mut Vec<Value>,
        failed: &mut Vec<Value>,
    ) {
        let mut still = Vec::new();
        for c in running.drain(..) {
            let job = match self.fleet.jobs.get(c.job).await {
                Ok(Some(j)) => j,
                // The catalog blinked (or the row is gone): look again next round.
                _ => {
                    still.push(c);
                    continue;
                }
            };
            match job.state.as_str() {
                "succeeded" => moved.push(json!({
                    "tenant": c.tenant, "to": c.to, "job": c.job,
                    "pause_ms": job.result.as_ref().and_then(|r| r.get("pause_ms").cloned()),
                })),
                "failed" | "cancelled" => failed.push(json!({
                    "tenant": c.tenant, "to": c.to, "job": c.job,
                    "error": job.error.unwrap_or_else(|| job.state.clone()),
                })),
                _ => still.push(c),
            }
        }
        *running = still;
    }

    /// Cancels the moves still running and waits (bounded) for them to end.
    async fn cancel(
        &self,
        mut running: Vec<ChildMove>,
        mut moved: Vec<Value>,
        mut failed: Vec<Value>,
    ) -> Outcome {
        for c in &running {
            self.fleet.jobs.cancel(c.job);
        }
        let deadline = tokio::time::Instant::now() + DRAIN_CANCEL_WAIT;
        while !running.is_empty() && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(DRAIN_POLL).await;
            self.collect(&mut running, &mut moved, &mut failed).await;
        }
        let left: Vec<i64> = running.iter().map(|c| c.job).collect();
        Outcome::Cancelled(format!(
            "cancelled: {} tenant(s) moved off pod {:?} before the cancel; the others stay on it{}; the pod stays closed to new tenants",
            moved.len(),
            self.pod,
            if left.is_empty() { String::new() } else { format!(" (moves {left:?} were still ending)") },
        ))
    }
}
