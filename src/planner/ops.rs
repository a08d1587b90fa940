//! The planner's operations on the fleet: dry-run plans for a split or a rebalance from the
//! current load, and starting them. Starting one provisions the split's new pod (when no
//! `to` is named) and hands the plan's moves to [`run_moves`], the single place where plans
//! become move jobs: a parent job (`split`/`rebalance`) whose children are the moves.

use super::{load, plan_rebalance, plan_split, provider, Plan, PodLoad};
use crate::catalog::jobs::NewJob;
use crate::fleet::{ErrorKind, Fleet, FleetError};
use crate::jobs::{JobCtx, JobView, Outcome};
use serde_json::json;
use std::sync::Arc;
use std::time::Duration;

/// The plan for splitting `pod`: onto `to` when named (an existing pod that accepts
/// tenants), else onto a pod the provider would make (same capacity as `pod`).
pub async fn split_plan(fleet: &Fleet, pod: &str, to: Option<&str>) -> Result<Plan, FleetError> {
    let load = load::current(fleet).await?;
    let source = load
        .pods
        .iter()
        .find(|p| p.name == pod)
        .ok_or_else(|| crate::fleet::unknown_pod(pod))?;
    let target = match to {
        Some(to) => {
            let t = load
                .pods
                .iter()
                .find(|p| p.name == to)
                .ok_or_else(|| crate::fleet::unknown_pod(to))?;
            if t.name == source.name || !t.accepting {
                return Err(FleetError::new(
                    ErrorKind::BadRequest,
                    "bad_split_target",
                    format!("pod {to:?} cannot take the split: name another pod that accepts tenants, or leave \"to\" out to get a new one from the provider"),
                ));
            }
            t.clone()
        }
        None => PodLoad {
            name: provider::planned_name(fleet, pod).await?,
            accepting: true,
            draining: false,
            ..source.clone()
        },
    };
    Ok(plan_split(source, &target, &load.tenants))
}

pub async fn rebalance_plan(fleet: &Fleet, max_moves: usize) -> Result<Plan, FleetError> {
    let load = load::current(fleet).await?;
    Ok(plan_rebalance(&load.pods, &load.tenants, max_moves))
}

/// Starts a split of `pod`: plans it, gets the target (`to`, or a new pod from the
/// provider) and runs the moves as a job. Returns the job.
pub async fn start_split(
    fleet: &Arc<Fleet>,
    pod: &str,
    to: Option<&str>,
    actor: &str,
) -> Result<serde_json::Value, FleetError> {
    let plan = split_plan(fleet, pod, to).await?;
    if plan.moves.is_empty() {
        return Err(FleetError::new(
            ErrorKind::Conflict,
            "nothing_to_split",
            plan.note,
        ));
    }
    let target = match to {
        Some(t) => t.to_owned(),
        None => provider::provide(fleet, pod, actor).await?.name,
    };
    // Plan again against the pod that now exists (its name may differ from the dry run's).
    let plan = split_plan(fleet, pod, Some(&target)).await?;
    run_moves(fleet, "split", Some(pod), &plan, actor).await
}

pub async fn start_rebalance(
    fleet: &Arc<Fleet>,
    max_moves: usize,
    actor: &str,
) -> Result<serde_json::Value, FleetError> {
    let plan = rebalance_plan(fleet, max_moves).await?;
    if plan.moves.is_empty() {
        return Err(FleetError::new(
            ErrorKind::Conflict,
            "nothing_to_rebalance",
            plan.note,
        ));
    }
    run_moves(fleet, "rebalance", None, &plan, actor).await
}

// === plans to move jobs ===

/// Runs a plan's moves as one job of `kind` (`split`/`rebalance`): each move is a child
/// `move` job ([`crate::mover::start_move`]), at most `moves.max_concurrent` started at a
/// time, with progress per tenant. Returns the parent job as the API shows it.
pub async fn run_moves(
    fleet: &Arc<Fleet>,
    kind: &str,
    pod: Option<&str>,
    plan: &Plan,
    actor: &str,
) -> Result<serde_json::Value, FleetError> {
    let job = fleet
        .jobs
        .create(&NewJob {
            kind,
            tenant: None,
            pod,
            params: json!({ "plan": plan }),
            parent: None,
            actor,
        })
        .await?;
    let view = json!(JobView::from(job.clone()));
    let (f, plan, actor) = (fleet.clone(), plan.clone(), actor.to_owned());
    fleet.jobs.spawn(job.id, move |ctx| async move {
        run_plan(f, ctx, plan, actor).await
    });
    Ok(view)
}

/// One move of a plan job as it goes.
#[derive(Debug, Clone, serde::Serialize)]
struct Step {
    tenant: String,
    to: String,
    job: Option<i64>,
    state: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

fn finished(state: &str) -> bool {
    matches!(state, "succeeded" | "failed" | "cancelled")
}

async fn run_plan(fleet: Arc<Fleet>, ctx: JobCtx, plan: Plan, actor: String) -> Outcome {
    let _ = ctx.phase("moving").await;
    let at_once = fleet.config.load().moves.max_concurrent.max(1) as usize;
    let mut steps: Vec<Step> = plan
        .moves
        .iter()
        .map(|m| Step {
            tenant: m.tenant.clone(),
            to: m.to.clone(),
            job: None,
            state: "waiting".into(),
            error: None,
        })
        .collect();
    let mut cancelled = false;
    loop {
        if ctx.cancelled() && !cancelled {
            cancelled = true;
            for s in steps.iter().filter(|s| !finished(&s.state)) {
                if let Some(id) = s.job {
                    fleet.jobs.cancel(id);
                }
            }
        }
        // Follow the running moves.
        for s in steps
            .iter_mut()
            .filter(|s| s.job.is_some() && !finished(&s.state))
        {
            if let Ok(Some(row)) = fleet.jobs.get(s.job.expect("filtered")).await {
                s.state = row.state;
                s.error = row.error;
            }
        }
        // Start more, up to the bound.
        let running = steps
            .iter()
            .filter(|s| s.job.is_some() && !finished(&s.state))
            .count();
        let waiting: Vec<usize> = steps
            .iter()
            .enumerate()
            .filter(|(_, s)| s.job.is_none() && s.state == "waiting")
            .map(|(i, _)| i)
            .take(at_once.saturating_sub(running))
            .collect();
        for i in waiting {
            let s = &mut steps[i];
            if cancelled {
                s.state = "cancelled".into();
                continue;
            }
            match crate::mover::start_move(&fleet, &s.tenant, &s.to, &actor, Some(ctx.id)).await {
                Ok(row) => {
                    s.job = Some(row.id);
                    s.state = row.state;
                }
                Err(e) => {
                    s.state = "failed".into();
                    s.error = Some(e.message);
                }
            }
        }
        let done = steps.iter().filter(|s| finished(&s.state)).count();
        let _ = ctx
            .progress(
                json!({"done": done, "total": steps.len(), "unit": "tenants", "moves": steps}),
                done == steps.len(),
            )
            .await;
        if done == steps.len() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let failed: Vec<&Step> = steps.iter().filter(|s| s.state != "succeeded").collect();
    let result =
        json!({"moves": steps, "target": plan.target, "before": plan.before, "after": plan.after});
    if cancelled {
        Outcome::Cancelled(format!(
            "cancelled; {} of {} moves had finished (they stay done)",
            steps.len() - failed.len(),
            steps.len()
        ))
    } else if failed.is_empty() {
        Outcome::Succeeded(result)
    } else {
        Outcome::Failed {
            error: format!(
                "{} of {} moves did not succeed ({}); the other tenants moved, and each failed one stays on its pod: see its move job, then split or move again",
                failed.len(),
                steps.len(),
                failed
                    .iter()
                    .map(|s| format!("{}: {}", s.tenant, s.error.as_deref().unwrap_or(&s.state)))
                    .collect::<Vec<_>>()
                    .join("; ")
            ),
            result: Some(result),
        }
    }
}
