//! The autopilot: after every sampler round it judges each pod against `[autopilot]
//! split_when` (busy ratio, connections ratio, disk ratio). A pod over any threshold is
//! watched; once it has stayed over for `split_when.for`, a split recommendation stands for
//! it (with the plan and the figures) at `GET /v1/recommendations` and as
//! `podrouter_autopilot_recommendations`. In `apply` mode the autopilot also starts that
//! split — one change at a time, then nothing more until `cooldown` has passed since that
//! job ended, so the figures settle (the moved load leaves the source's window and shows on
//! the new pod) before it judges again: no flapping. Every decision
//! (recommended, cleared, applied, failed) is audited with the figures that caused it.

use super::load::{self, PodFigures};
use super::{ops, plan_split, provider, Plan, PodLoad};
use crate::config::{AutopilotMode, SplitWhen};
use crate::fleet::Fleet;
use arc_swap::ArcSwap;
use chrono::{DateTime, Utc};
use parking_lot::Mutex;
use serde::Serialize;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;
use tokio_util::sync::CancellationToken;

#[derive(Debug, Clone, Serialize)]
pub struct Recommendation {
    pub pod: String,
    pub kind: &'static str,
    /// Which thresholds the pod is over, in words.
    pub reason: String,
    pub figures: PodFigures,
    /// Since when the pod has been over a threshold.
    pub since: DateTime<Utc>,
    /// Over for at least `split_when.for`: the recommendation stands (in `apply` mode, acts).
    pub ready: bool,
    pub plan: Plan,
}

#[derive(Debug, Clone, Serialize, Default)]
pub struct Recommendations {
    pub mode: String,
    pub updated_at: Option<DateTime<Utc>>,
    pub recommendations: Vec<Recommendation>,
}

#[derive(Default)]
struct Watch {
    over_since: Option<(Instant, DateTime<Utc>)>,
    /// The standing recommendation was audited (so it is audited once, and its clearing too).
    announced: bool,
}

#[derive(Default)]
pub struct Autopilot {
    board: ArcSwap<Recommendations>,
    watch: Mutex<HashMap<String, Watch>>,
    /// The split job the autopilot started last, while it may still run.
    job: Mutex<Option<i64>>,
    /// No new action before this: `cooldown` after the last job ended.
    quiet_until: Mutex<Option<Instant>>,
}

impl Autopilot {
    pub fn recommendations(&self) -> Arc<Recommendations> {
        self.board.load_full()
    }
}

/// The thresholds `f` is at or over, in words; empty when none.
pub fn over(f: &PodFigures, w: &SplitWhen) -> Vec<String> {
    let mut out = Vec::new();
    if f.busy_ratio >= w.busy_ratio {
        out.push(format!(
            "busy {:.2} s/s of {:.2} ({:.0}% >= {:.0}%)",
            f.busy,
            f.busy_capacity,
            100.0 * f.busy_ratio,
            100.0 * w.busy_ratio
        ));
    }
    if f.max_connections > 0 && f.connections_ratio >= w.connections_ratio {
        out.push(format!(
            "{} of {} connections ({:.0}% >= {:.0}%)",
            f.backends,
            f.max_connections,
            100.0 * f.connections_ratio,
            100.0 * w.connections_ratio
        ));
    }
    if let (Some(d), Some(cap)) = (f.disk_ratio, f.disk_capacity) {
        if d >= w.disk_ratio {
            out.push(format!(
                "{} of {} bytes ({:.0}% >= {:.0}%)",
                f.bytes,
                cap,
                100.0 * d,
                100.0 * w.disk_ratio
            ));
        }
    }
    out
}

async fn audit(fleet: &Fleet, action: &str, pod: &str, detail: serde_json::Value) {
    if let Err(e) = fleet.catalog.audit("autopilot", action, pod, detail).await {
        tracing::warn!(pod, "cannot audit {action}: {e}");
    }
}

/// One judgement of every pod; publishes the recommendations and, in `apply` mode, acts.
pub async fn evaluate(fleet: &Arc<Fleet>) -> Result<(), crate::fleet::FleetError> {
    let config = fleet.config.load_full();
    let ap = &config.autopilot;
    let pilot = &fleet.planner.autopilot;
    let metrics = &fleet.metrics;
    let load = load::current(fleet).await?;
    metrics.pod_utilisation.reset();
    for (pod, f) in &load.figures {
        let set = |resource: &str, v: f64| {
            metrics
                .pod_utilisation
                .with_label_values(&[pod.as_str(), resource])
                .set(v)
        };
        set("busy", f.busy_ratio);
        if f.max_connections > 0 {
            set("connections", f.connections_ratio);
        }
        if let Some(d) = f.disk_ratio {
            set("disk", d);
        }
    }
    if ap.mode == AutopilotMode::Off {
        pilot.watch.lock().clear();
        metrics.autopilot_recommendations.reset();
        pilot.board.store(Arc::new(Recommendations {
            mode: "off".into(),
            updated_at: Some(Utc::now()),
            recommendations: Vec::new(),
        }));
        return Ok(());
    }
    let now = (Instant::now(), Utc::now());
    let mut recs = Vec::new();
    let mut announce = Vec::new();
    let mut cleared = Vec::new();
    let names: Vec<&str> = load.pods.iter().map(|p| p.name.as_str()).collect();
    {
        let mut watch = pilot.watch.lock();
        watch.retain(|pod, _| names.contains(&pod.as_str()));
        for (pod, figures) in &load.figures {
            let w = watch.entry(pod.clone()).or_default();
            let reasons = over(figures, &ap.split_when);
            if reasons.is_empty() || figures.tenants < 2 {
                if w.announced {
                    cleared.push((pod.clone(), figures.clone()));
                }
                w.over_since = None;
                w.announced = false;
                continue;
            }
            let since = *w.over_since.get_or_insert(now);
            let ready = now.0.duration_since(since.0) >= ap.split_when.for_.0;
            let source = load.pods.iter().find(|p| &p.name == pod).expect("listed");
            let target = PodLoad {
                name: provider::next_pod_name(&names, pod),
                accepting: true,
                draining: false,
                ..source.clone()
            };
            let rec = Recommendation {
                pod: pod.clone(),
                kind: "split",
                reason: reasons.join("; "),
                figures: figures.clone(),
                since: since.1,
                ready,
                plan: plan_split(source, &target, &load.tenants),
            };
            if ready && !w.announced {
                w.announced = true;
                announce.push(rec.clone());
            }
            recs.push(rec);
        }
    }
    metrics.autopilot_recommendations.reset();
    for r in recs.iter().filter(|r| r.ready) {
        metrics
            .autopilot_recommendations
            .with_label_values(&[r.pod.as_str(), r.kind])
            .set(1);
    }
    pilot.board.store(Arc::new(Recommendations {
        mode: match ap.mode {
            AutopilotMode::Apply => "apply",
            _ => "recommend",
        }
        .into(),
        updated_at: Some(now.1),
        recommendations: recs.clone(),
    }));
    for r in &announce {
        tracing::info!(pod = %r.pod, reason = %r.reason, "autopilot recommends a split");
        metrics
            .autopilot_decisions
            .with_label_values(&[r.pod.as_str(), "split", "recommended"])
            .inc();
        audit(
            fleet,
            "autopilot.recommend",
            &r.pod,
            serde_json::json!({
                "kind": r.kind, "reason": r.reason, "figures": r.figures,
                "thresholds": ap.split_when, "plan": r.plan,
            }),
        )
        .await;
    }
    for (pod, figures) in &cleared {
        metrics
            .autopilot_decisions
            .with_label_values(&[pod.as_str(), "split", "cleared"])
            .inc();
        audit(
            fleet,
            "autopilot.clear",
            pod,
            serde_json::json!({"kind": "split", "figures": figures, "thresholds": ap.split_when}),
        )
        .await;
    }
    if ap.mode == AutopilotMode::Apply {
        apply(fleet, &recs).await;
    }
    Ok(())
}

/// Starts the first ready split, unless a job the autopilot started still runs or the
/// fleet is within `cooldown` of that job's end.
async fn apply(fleet: &Arc<Fleet>, recs: &[Recommendation]) {
    let pilot = &fleet.planner.autopilot;
    let cooldown = fleet.config.load().autopilot.cooldown.0;
    let last = *pilot.job.lock();
    if let Some(id) = last {
        if fleet.jobs.is_running(id) {
            return;
        }
        *pilot.job.lock() = None;
        *pilot.quiet_until.lock() = Some(Instant::now() + cooldown);
        tracing::info!(
            job = id,
            "autopilot: its split ended; quiet for {cooldown:?}"
        );
    }
    if pilot.quiet_until.lock().is_some_and(|t| Instant::now() < t) {
        return;
    }
    if let Some(r) = recs.iter().find(|r| r.ready) {
        let figures = serde_json::json!({"reason": r.reason, "figures": r.figures, "plan": r.plan});
        match ops::start_split(fleet, &r.pod, None, "autopilot").await {
            Ok(job) => {
                *pilot.job.lock() = job.get("id").and_then(|i| i.as_i64());
                fleet
                    .metrics
                    .autopilot_decisions
                    .with_label_values(&[r.pod.as_str(), "split", "applied"])
                    .inc();
                audit(
                    fleet,
                    "autopilot.apply",
                    &r.pod,
                    serde_json::json!({"decision": figures, "job": job}),
                )
                .await;
            }
            Err(e) => {
                tracing::warn!(pod = %r.pod, "autopilot could not start a split: {e}");
                fleet
                    .metrics
                    .autopilot_decisions
                    .with_label_values(&[r.pod.as_str(), "split", "failed"])
                    .inc();
                audit(fleet, "autopilot.apply_failed", &r.pod, serde_json::json!({"decision": figures, "error": {"code": e.code, "message": e.message}})).await;
                // A refusal (no provider, say) is not retried at every round either.
                *pilot.quiet_until.lock() = Some(Instant::now() + cooldown);
            }
        }
    }
}

/// The planner's task: restarts the local provider's pods, then judges the fleet after
/// every sampler round until `shutdown`; stops the local pods it started on the way out.
pub async fn run(fleet: Arc<Fleet>, shutdown: CancellationToken) {
    provider::restart_local(&fleet).await;
    loop {
        let next = fleet.metrics.samples.rounds.notified();
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = next => {}
        }
        if let Err(e) = evaluate(&fleet).await {
            tracing::warn!("autopilot: {e}");
        }
    }
    fleet.planner.local.stop_all().await;
}
