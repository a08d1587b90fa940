//! Failover: making one of a pod's replicas its primary. Two ways in:
//! - [`Fleet::failover`] (`POST /v1/pods/{pod}/failover`, `podrouter pods failover`): choose
//!   a replica (the one asked for, else the least lagging), fence the old primary if it still
//!   answers (a switchover), wait for the replica to replay all of its WAL, promote it, then
//!   switch the route;
//! - [`follow_promotion`] (the health monitor): a replica was promoted elsewhere while the
//!   primary is down; only the route is switched.
//!
//! Either way the route changes only through the catalog: a compare-and-set on the pod's
//! primary (so routers racing to follow the same promotion agree), the old primary moved to
//! the replicas, tenants' route versions bumped, audited as `pod.failover`, NOTIFY; then the
//! RoutingTable is rebuilt. New server connections go to the new primary (pools are keyed by
//! endpoint and sessions re-read the route at every checkout); nothing else is restarted.
//! If a failover fails before the route switch, the route stays and a fence is lifted.

use crate::config::{parse_pg_url, redact};
use crate::fleet::{ErrorKind, Fleet, FleetError};
use crate::health::{self, PodServers, Reading};
use crate::podadmin;
use serde::{Deserialize, Serialize};
use sqlx::Connection;
use std::time::{Duration, Instant};

/// How long a promoted replica may take to leave recovery.
const PROMOTE_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a switchover waits for the replica to replay the fenced primary's last WAL.
const CATCH_UP_TIMEOUT: Duration = Duration::from_secs(10);
/// How long fencing waits for the tenants' sessions on the old primary to end.
const FENCE_WAIT: Duration = Duration::from_secs(5);

/// `POST /v1/pods/{pod}/failover` body.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FailoverRequest {
    /// The replica to promote (its URL as listed, redacted or not, or `host:port`); default
    /// the least lagging one that answers.
    #[serde(default)]
    pub to: Option<String>,
}

/// A finished failover, shaped like a job (the jobs framework will run it later; today the
/// call answers when it is done).
#[derive(Debug, Clone, Serialize)]
pub struct FailoverJob {
    pub id: String,
    pub kind: &'static str,
    /// `succeeded` or `failed`.
    pub state: &'static str,
    pub started_at: chrono::DateTime<chrono::Utc>,
    pub finished_at: chrono::DateTime<chrono::Utc>,
    pub error: Option<String>,
    pub result: FailoverResult,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct FailoverResult {
    pub pod: String,
    /// The old primary (redacted), now the last of the pod's replicas.
    pub from: String,
    /// The new primary (redacted).
    pub to: String,
    /// Whether this call promoted it (false: it was already out of recovery).
    pub promoted: bool,
    /// Whether the old primary answered and was fenced (made read-only) first.
    pub fenced_old_primary: bool,
    /// The new primary's WAL position when the route switched.
    pub lsn: Option<String>,
    /// `synchronous_standby_names` the new primary had and no longer has.
    pub synchronous_standby_names_cleared: Option<String>,
    pub took_ms: u64,
}

/// `X/Y`, as Postgres writes an LSN.
fn lsn_text(lsn: u64) -> String {
    format!("{:X}/{:X}", lsn >> 32, lsn & 0xffff_ffff)
}

fn same_server(url: &str, asked: &str) -> bool {
    url == asked
        || redact(url) == asked
        || parse_pg_url(url).is_ok_and(|e| e.to_string() == asked)
        || matches!((parse_pg_url(url), parse_pg_url(asked)), (Ok(a), Ok(b)) if a == b)
}

fn no_healthy_replica(pod: &str, why: String) -> FleetError {
    FleetError::new(
        ErrorKind::Conflict,
        "no_healthy_replica",
        format!("pod {pod:?} has no replica to fail over to: {why}; start or repair a replica (GET /v1/pods shows their health), then retry"),
    )
}

struct Step(String);

impl<E: std::fmt::Display> From<E> for Step {
    fn from(e: E) -> Self {
        Step(e.to_string())
    }
}

impl Fleet {
    /// Fails `pod` over to one of its replicas (see the module docs). Errors before anything
    /// is touched (unknown pod, no healthy replica) are `Err`; once it started, the answer is
    /// the job, `succeeded` or `failed` with the reason.
    pub async fn failover(
        &self,
        pod: &str,
        req: FailoverRequest,
        actor: &str,
    ) -> Result<FailoverJob, FleetError> {
        let started_at = chrono::Utc::now();
        let clock = Instant::now();
        let _turn = self.proxy.health.switching.lock().await;
        let snap = self.catalog.snapshot().await?;
        let row = snap
            .pods
            .iter()
            .find(|p| p.name == pod)
            .ok_or_else(|| crate::fleet::unknown_pod(pod))?;
        let candidates: Vec<String> = match &req.to {
            Some(to) => match row.replicas.iter().find(|r| same_server(r, to)) {
                Some(r) => vec![r.clone()],
                None => {
                    return Err(FleetError::new(
                        ErrorKind::BadRequest,
                        "not_a_replica",
                        format!(
                            "{to:?} is not a replica of pod {pod:?}; its replicas are {:?} (GET /v1/pods)",
                            row.replicas.iter().map(|r| redact(r)).collect::<Vec<_>>()
                        ),
                    ))
                }
            },
            None => row.replicas.clone(),
        };
        if candidates.is_empty() {
            return Err(no_healthy_replica(
                pod,
                "it lists no replicas (pods.toml `replicas`)".into(),
            ));
        }
        let probed = health::probe_pods_now(&[PodServers {
            name: pod.to_owned(),
            primary: row.primary_url.clone(),
            replicas: candidates,
        }])
        .await
        .remove(pod)
        .expect("probed the pod asked for");
        // Already promoted (elsewhere) first, then the most WAL replayed.
        let chosen = probed
            .replicas
            .iter()
            .filter_map(|r| r.reading.as_ref().ok().map(|reading| (r, *reading)))
            .max_by_key(|(_, reading)| (!reading.in_recovery, reading.lsn));
        let Some((target, reading)) = chosen else {
            let why = probed
                .replicas
                .iter()
                .map(|r| format!("{} is {}", redact(&r.url), r.replica_status()))
                .collect::<Vec<_>>()
                .join(", ");
            return Err(no_healthy_replica(pod, why));
        };
        let old_answers = probed.primary.in_recovery() == Some(false);
        let databases: Vec<String> = snap
            .tenants
            .iter()
            .filter(|t| t.pod == pod)
            .map(|t| t.name.clone())
            .collect();

        let mut result = FailoverResult {
            pod: pod.to_owned(),
            from: redact(&row.primary_url),
            to: redact(&target.url),
            ..FailoverResult::default()
        };
        let outcome = self
            .promote_and_switch(
                pod,
                &row.primary_url,
                &row.replicas,
                &target.url,
                reading,
                old_answers.then_some(databases.as_slice()),
                actor,
                &mut result,
            )
            .await;
        result.took_ms = clock.elapsed().as_millis() as u64;
        let error = match outcome {
            Ok(()) => {
                tracing::info!(pod, to = %result.to, took_ms = result.took_ms, "failed over");
                None
            }
            Err(Step(e)) => {
                tracing::error!(pod, to = %result.to, "failover failed: {e}");
                let detail = serde_json::json!({"to": result.to, "error": e});
                if let Err(a) = self
                    .catalog
                    .audit(actor, "pod.failover_failed", pod, detail)
                    .await
                {
                    tracing::warn!("cannot audit the failed failover: {a}");
                }
                Some(format!("{e}; the route was not changed"))
            }
        };
        Ok(FailoverJob {
            id: format!("failover-{:016x}", rand::random::<u64>()),
            kind: "failover",
            state: if error.is_none() {
                "succeeded"
            } else {
                "failed"
            },
            started_at,
            finished_at: chrono::Utc::now(),
            error,
            result,
        })
    }

    /// Fence (when `fence` names the tenants' databases: the old primary answers) → wait for
    /// the target to replay everything → promote → clear stale synchronous standbys → switch
    /// the route. A failure before the switch lifts the fence.
    #[allow(clippy::too_many_arguments)]
    async fn promote_and_switch(
        &self,
        pod: &str,
        old_primary: &str,
        replicas: &[String],
        target: &str,
        reading: Reading,
        fence: Option<&[String]>,
        actor: &str,
        result: &mut FailoverResult,
    ) -> Result<(), Step> {
        let mut fenced = None;
        if let Some(databases) = fence {
            let mut old = podadmin::connect(old_primary, None).await?;
            podadmin::fence(&mut old, databases, FENCE_WAIT).await?;
            result.fenced_old_primary = true;
            fenced = Some(old);
        }
        let promoted = async {
            let mut new = podadmin::connect(target, None).await?;
            if let Some(old) = fenced.as_mut() {
                let last = podadmin::wal_position(old).await?;
                let deadline = Instant::now() + CATCH_UP_TIMEOUT;
                while podadmin::wal_position(&mut new).await? < last {
                    if Instant::now() >= deadline {
                        return Err(Step(format!(
                            "the replica did not replay the old primary's WAL up to {} within {CATCH_UP_TIMEOUT:?}",
                            lsn_text(last)
                        )));
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
            if reading.in_recovery {
                if !podadmin::promote(&mut new, PROMOTE_TIMEOUT).await? {
                    return Err(Step(format!(
                        "the replica did not leave recovery within {PROMOTE_TIMEOUT:?}; check its log"
                    )));
                }
                result.promoted = true;
            }
            Ok(new)
        }
        .await;
        let mut new = match promoted {
            Ok(new) => new,
            Err(e) => {
                if let Some(mut old) = fenced {
                    if let Err(u) = podadmin::unfence(&mut old).await {
                        tracing::error!(pod, "cannot lift the fence on the old primary: {u}; run ALTER SYSTEM RESET default_transaction_read_only there");
                    }
                }
                return Err(e);
            }
        };
        if let Some(old) = fenced {
            let _ = old.close().await;
        }
        result.synchronous_standby_names_cleared =
            podadmin::clear_synchronous_standbys(&mut new).await?;
        result.lsn = Some(lsn_text(podadmin::wal_position(&mut new).await?));
        let _ = new.close().await;
        let detail = serde_json::json!({
            "reason": "requested",
            "from": result.from,
            "to": result.to,
            "promoted": result.promoted,
            "fenced_old_primary": result.fenced_old_primary,
            "lsn": result.lsn,
            "synchronous_standby_names_cleared": result.synchronous_standby_names_cleared,
        });
        switch_route(self, pod, old_primary, replicas, target, actor, detail).await
    }
}

/// Moves the route of `pod` from `old_primary` to `new_primary` in the catalog (the old
/// primary becomes the last replica) and rebuilds the RoutingTable. Done already (by another
/// router) counts as done.
async fn switch_route(
    fleet: &Fleet,
    pod: &str,
    old_primary: &str,
    replicas: &[String],
    new_primary: &str,
    actor: &str,
    detail: serde_json::Value,
) -> Result<(), Step> {
    let mut new_replicas: Vec<String> = replicas
        .iter()
        .filter(|r| *r != new_primary)
        .cloned()
        .collect();
    new_replicas.push(old_primary.to_owned());
    let switched = fleet
        .catalog
        .switch_primary(pod, old_primary, new_primary, &new_replicas, actor, detail)
        .await?;
    if !switched {
        let now = fleet.catalog.snapshot().await?;
        let current = now
            .pods
            .iter()
            .find(|p| p.name == pod)
            .map(|p| p.primary_url.as_str());
        if current != Some(new_primary) {
            return Err(Step(format!(
                "the pod's primary changed to {} meanwhile",
                current
                    .map(redact)
                    .unwrap_or_else(|| "nothing (the pod was removed)".into())
            )));
        }
    }
    fleet.reload_routes().await?;
    Ok(())
}

/// Follows a promotion done elsewhere: `promoted` (a replica of `pod`, seen in recovery
/// before) answers out of recovery while the primary does not. Only the route changes.
pub(crate) async fn follow_promotion(fleet: &Fleet, pod: &PodServers, promoted: &str) {
    let _turn = fleet.proxy.health.switching.lock().await;
    let detail = serde_json::json!({
        "reason": "promoted elsewhere while the primary was down",
        "from": redact(&pod.primary),
        "to": redact(promoted),
    });
    match switch_route(
        fleet,
        &pod.name,
        &pod.primary,
        &pod.replicas,
        promoted,
        "podrouter-health",
        detail,
    )
    .await
    {
        Ok(()) => tracing::warn!(
            pod = %pod.name,
            from = %redact(&pod.primary),
            to = %redact(promoted),
            "the primary is down and a replica was promoted: writes now go to it"
        ),
        Err(Step(e)) => {
            tracing::error!(pod = %pod.name, "cannot follow the promotion of {}: {e}", redact(promoted))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lsns_read_like_postgres() {
        assert_eq!(lsn_text(0x1_0000_0060), "1/60");
        assert_eq!(lsn_text(0x3000028), "0/3000028");
    }

    #[test]
    fn a_replica_is_named_by_url_or_address() {
        let url = "postgres://su:pw@127.0.0.1:5433";
        assert!(same_server(url, url));
        assert!(same_server(url, "postgres://su:***@127.0.0.1:5433"));
        assert!(same_server(url, "127.0.0.1:5433"));
        assert!(same_server(url, "postgres://other@127.0.0.1:5433"));
        assert!(!same_server(url, "127.0.0.1:5434"));
    }
}
