//! Pods through the admin API: add ([`Fleet::add_pod`], also what pod providers call),
//! delete ([`Fleet::delete_pod`]) and drain ([`Fleet::drain_pod`]: close the pod to new
//! tenants and move every tenant off it as a `drain` job whose children are ordinary moves,
//! run like a split's by `planner::ops::run_moves`).
//!
//! Pods added here have origin `api`: a config reload never touches them, and only this API
//! deletes them. Pods of `pods.toml` (origin `config`) are removed by taking them out of the
//! file and reloading, so the file stays the truth about them.

use super::{pod_failed, pod_unreachable, unknown_pod, ErrorKind, Fleet, FleetError, PodView};
use crate::catalog::pods::{self as q, DeleteRefusal, ORIGIN_API, ORIGIN_CONFIG};
use crate::catalog::PodRow;
use crate::config::{self, PoolMode};
use crate::routing::placement::{self, Candidate};
use crate::{planner, podadmin};
use serde::Deserialize;
use serde_json::{json, Value};
use std::sync::Arc;

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
    /// the drain. Returns the job (pending, as the API shows it) at once.
    ///
    /// A pod of `pods.toml` stays closed until a reload or restart writes the file's
    /// `accepting` again: set `accepting = false` in its `[[pod]]` entry to keep it closed.
    pub async fn drain_pod(self: &Arc<Self>, name: &str, actor: &str) -> Result<Value, FleetError> {
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
        // The moves: each tenant to the pod the ring picks among the others that accept.
        let candidates: Vec<Candidate<'_>> = snap
            .pods
            .iter()
            .filter(|p| p.name != name)
            .map(|p| Candidate {
                name: &p.name,
                weight: p.weight,
                accepting: p.accepting,
            })
            .collect();
        let moves = snap
            .tenants
            .iter()
            .filter(|t| t.pod == name)
            .filter_map(|t| {
                Some(planner::Move {
                    tenant: t.name.clone(),
                    from: name.to_owned(),
                    to: placement::place(&t.name, &candidates)?.to_owned(),
                    busy: 0.0,
                    bytes: 0,
                })
            })
            .collect();
        let from_config = q::origins(self.catalog.pool())
            .await?
            .get(name)
            .map(String::as_str)
            == Some(ORIGIN_CONFIG);
        let plan = planner::Plan {
            kind: "drain",
            pod: Some(name.to_owned()),
            target: None,
            moves,
            bytes_to_move: 0,
            before: Default::default(),
            after: Default::default(),
            note: if from_config {
                format!("pod {name:?} comes from the config file: a reload or restart opens it to new tenants again unless its [[pod]] entry says accepting = false")
            } else {
                format!("pod {name:?} stays closed to new tenants until it is deleted")
            },
        };
        // A drain is a plan job like a split: its moves run as child jobs, at most
        // moves.max_concurrent at a time.
        planner::ops::run_moves(self, "drain", Some(name), &plan, actor)
            .await
            .map_err(|e| match e.code {
                // Two drains raced past the check above; the index kept one.
                "catalog_unavailable" if e.message.contains("jobs_one_drain_per_pod") => {
                    draining("another drain job started just now")
                }
                _ => e,
            })
    }
}
