//! Jobs: long-running operations (moves, splits, rebalances) that the admin API starts and
//! answers `202` for. Each job is a row in the catalog (state, phase, progress, checkpoint,
//! result) and, while it runs, a tracked task here with a cancellation token.
//!
//! The row is the truth: `GET /v1/jobs/{id}` reads it, and a router that restarts finds the
//! jobs its predecessor left running and finishes or rolls them back (`mover::recover`).

use crate::catalog::jobs::{self as q, JobRow, NewJob};
use crate::catalog::{Catalog, CatalogError};
use parking_lot::Mutex;
use serde::Serialize;
use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// How often a job's progress is written to the catalog at most.
const PROGRESS_EVERY: Duration = Duration::from_millis(250);

/// A job as the API shows it (DESIGN.md, "Admin API").
#[derive(Debug, Clone, Serialize)]
pub struct JobView {
    pub id: i64,
    pub kind: String,
    pub state: String,
    pub phase: String,
    pub progress: serde_json::Value,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pod: Option<String>,
    pub params: serde_json::Value,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub parent: Option<i64>,
    pub created_at: chrono::DateTime<chrono::Utc>,
    pub started_at: Option<chrono::DateTime<chrono::Utc>>,
    pub finished_at: Option<chrono::DateTime<chrono::Utc>>,
    pub error: Option<String>,
    pub result: Option<serde_json::Value>,
}

impl From<JobRow> for JobView {
    fn from(j: JobRow) -> Self {
        JobView {
            id: j.id,
            kind: j.kind,
            state: j.state,
            phase: j.phase,
            progress: j.progress,
            tenant: j.tenant,
            pod: j.pod,
            params: j.params,
            parent: j.parent,
            created_at: j.created_at,
            started_at: j.started_at,
            finished_at: j.finished_at,
            error: j.error,
            result: j.result,
        }
    }
}

/// How a job's work ended.
#[derive(Debug)]
pub enum Outcome {
    Succeeded(serde_json::Value),
    /// Failed, with a message that says what happened and what to do; `result` may carry
    /// figures (e.g. how far it got).
    Failed {
        error: String,
        result: Option<serde_json::Value>,
    },
    /// Cancelled on request, everything it made undone.
    Cancelled(String),
}

pub struct Jobs {
    catalog: Catalog,
    running: Mutex<HashMap<i64, CancellationToken>>,
    tracker: TaskTracker,
    /// Cancelled at shutdown: every running job stops at its next safe point.
    shutdown: CancellationToken,
    /// Moves running at once (`moves.max_concurrent`); queued moves wait in phase `queued`.
    pub move_slots: Arc<tokio::sync::Semaphore>,
    /// This router's id: the owner of the jobs it creates.
    router_id: Arc<crate::fleet::routers::RouterId>,
}

impl Jobs {
    pub fn new(
        catalog: Catalog,
        max_concurrent_moves: usize,
        router_id: Arc<crate::fleet::routers::RouterId>,
    ) -> Jobs {
        Jobs {
            router_id,
            move_slots: Arc::new(tokio::sync::Semaphore::new(max_concurrent_moves)),
            catalog,
            running: Mutex::new(HashMap::new()),
            tracker: TaskTracker::new(),
            shutdown: CancellationToken::new(),
        }
    }

    pub async fn create(&self, job: &NewJob<'_>) -> Result<JobRow, CatalogError> {
        q::insert(self.catalog.pool(), job, self.router_id.get()).await
    }

    /// Runs `work` for the pending job `id` as a tracked task; its outcome is recorded when
    /// it returns. Returns at once.
    pub fn spawn<F, Fut>(self: &Arc<Self>, id: i64, work: F)
    where
        F: FnOnce(JobCtx) -> Fut + Send + 'static,
        Fut: Future<Output = Outcome> + Send + 'static,
    {
        let cancel = self.shutdown.child_token();
        self.running.lock().insert(id, cancel.clone());
        let jobs = self.clone();
        self.tracker.spawn(async move {
            let ctx = JobCtx {
                id,
                catalog: jobs.catalog.clone(),
                cancel,
                last_progress: Mutex::new(None),
            };
            let outcome = match q::set_running(jobs.catalog.pool(), id).await {
                Ok(()) => work(ctx).await,
                Err(e) => Outcome::Failed {
                    error: format!("could not start: {e}"),
                    result: None,
                },
            };
            let (state, result, error) = match &outcome {
                Outcome::Succeeded(r) => ("succeeded", Some(r), None),
                Outcome::Failed { error, result } => {
                    ("failed", result.as_ref(), Some(error.as_str()))
                }
                Outcome::Cancelled(m) => ("cancelled", None, Some(m.as_str())),
            };
            match &outcome {
                Outcome::Succeeded(_) => tracing::info!(job = id, "job succeeded"),
                Outcome::Failed { error, .. } => tracing::warn!(job = id, "job failed: {error}"),
                Outcome::Cancelled(_) => tracing::info!(job = id, "job cancelled"),
            }
            // The outcome must reach the catalog: retry for a while if it is briefly away.
            for attempt in 0..50 {
                match q::finish(jobs.catalog.pool(), id, state, result, error).await {
                    Ok(()) => break,
                    Err(e) if attempt == 49 => {
                        tracing::error!(job = id, "cannot record the job's outcome ({state}): {e}")
                    }
                    Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
                }
            }
            jobs.running.lock().remove(&id);
        });
    }

    pub async fn get(&self, id: i64) -> Result<Option<JobRow>, CatalogError> {
        q::get(self.catalog.pool(), id).await
    }

    pub async fn list(&self, limit: i64) -> Result<Vec<JobRow>, CatalogError> {
        q::list(self.catalog.pool(), limit).await
    }

    /// Asks a running job to stop; it undoes what it made and ends `cancelled` (or, past
    /// its point of no return, finishes). False when no such job runs in this router.
    pub fn cancel(&self, id: i64) -> bool {
        match self.running.lock().get(&id) {
            Some(t) => {
                t.cancel();
                true
            }
            None => false,
        }
    }

    pub fn is_running(&self, id: i64) -> bool {
        self.running.lock().contains_key(&id)
    }

    /// Stops every job at its next safe point and waits (up to `grace`) for them to end.
    pub async fn shutdown(&self, grace: Duration) {
        self.shutdown.cancel();
        self.tracker.close();
        if tokio::time::timeout(grace, self.tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                "jobs still running at shutdown; the next start finishes or rolls them back"
            );
        }
    }
}

/// What a running job uses to report itself and to notice cancellation.
pub struct JobCtx {
    pub id: i64,
    catalog: Catalog,
    pub cancel: CancellationToken,
    last_progress: Mutex<Option<Instant>>,
}

impl JobCtx {
    pub fn cancelled(&self) -> bool {
        self.cancel.is_cancelled()
    }

    pub async fn phase(&self, phase: &str) -> Result<(), CatalogError> {
        tracing::info!(job = self.id, phase, "job phase");
        q::set_phase(self.catalog.pool(), self.id, phase).await
    }

    /// Records progress, at most every [`PROGRESS_EVERY`] unless `force`.
    pub async fn progress(
        &self,
        progress: serde_json::Value,
        force: bool,
    ) -> Result<(), CatalogError> {
        {
            let mut last = self.last_progress.lock();
            if !force && last.is_some_and(|t| t.elapsed() < PROGRESS_EVERY) {
                return Ok(());
            }
            *last = Some(Instant::now());
        }
        q::set_progress(self.catalog.pool(), self.id, &progress).await
    }

    /// Merges `patch` into the job's checkpoint, before the step it describes takes effect
    /// (so a crash always leaves a checkpoint that names everything that may exist).
    pub async fn checkpoint(&self, patch: serde_json::Value) -> Result<(), CatalogError> {
        q::checkpoint(self.catalog.pool(), self.id, &patch).await
    }
}
