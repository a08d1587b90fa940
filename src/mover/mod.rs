//! Live tenant moves: one tenant's database goes from its pod to another while its clients
//! keep working. The protocol and its four invariants are in DESIGN.md ("Live move"):
//!
//! preflight → schema (pg_dump | psql) → replicate (publication + subscription: initial copy,
//! then streaming) → catch-up → cutover [pause the tenant's gate → fence the source → wait
//! until the target applied the source's WAL insert position → sequences → switch the route
//! in the catalog → resume] → cleanup (subscription, slot, publication; the source database
//! kept renamed for `moves.source_retention`).
//!
//! Before the route switch, any failure, cancellation or deadline rolls everything back
//! (the tenant stays on its source, unfenced, with no replication object left). The switch
//! is one catalog transaction that also marks the job `switched`: past it the move only
//! finishes. Every step is written to the job's checkpoint before it takes effect, so a
//! router that crashed mid-move finishes or rolls it back at its next start ([`recover`]).

pub mod pg;

use crate::catalog::jobs::{self as q, JobRow, NewJob};
use crate::fleet::{ErrorKind, Fleet, FleetError};
use crate::jobs::{JobCtx, Outcome};
use crate::podadmin;
use serde::{Deserialize, Serialize};
use serde_json::json;
use sqlx::{Connection, PgConnection};
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// What a move has made so far; written before each step takes effect.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Checkpoint {
    pub tenant: String,
    pub source: String,
    pub target: String,
    #[serde(default)]
    pub target_db: bool,
    /// Tables switched to REPLICA IDENTITY FULL, with their own identity.
    #[serde(default)]
    pub identity: Vec<(String, String)>,
    #[serde(default)]
    pub publication: bool,
    #[serde(default)]
    pub subscription: bool,
    #[serde(default)]
    pub sub_oid: Option<i64>,
    #[serde(default)]
    pub fenced: bool,
    #[serde(default)]
    pub switched: bool,
    /// Cleanup still owed (a pod was unreachable when the job ended).
    #[serde(default)]
    pub pending_cleanup: bool,
    #[serde(default)]
    pub source_kept_as: Option<String>,
    #[serde(default)]
    pub source_dropped: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum MoveError {
    #[error("{0}")]
    Refused(String),
    #[error("cancelled")]
    Cancelled,
    #[error("{0}")]
    Failed(String),
}

impl MoveError {
    fn pod(pod: &str, step: &str, e: impl std::fmt::Display) -> MoveError {
        MoveError::Failed(format!("{step} on pod {pod:?} failed: {e}"))
    }
}

impl From<crate::catalog::CatalogError> for MoveError {
    fn from(e: crate::catalog::CatalogError) -> Self {
        MoveError::Failed(format!("catalog: {e}"))
    }
}

type MoveResult<T> = Result<T, MoveError>;

/// Starts moving `tenant` to pod `to` as a job; returns the job (pending) at once.
pub async fn start_move(
    fleet: &Arc<Fleet>,
    tenant: &str,
    to: &str,
    actor: &str,
    parent: Option<i64>,
) -> Result<JobRow, FleetError> {
    let table = fleet.table.load();
    let route = table.tenant(tenant).ok_or_else(|| {
        FleetError::new(
            ErrorKind::NotFound,
            "unknown_tenant",
            format!("tenant {tenant:?} does not exist; list tenants with GET /v1/tenants"),
        )
    })?;
    let target = table
        .pods
        .get(to)
        .ok_or_else(|| crate::fleet::unknown_pod(to))?;
    if route.pod.name == to {
        return Err(FleetError::new(
            ErrorKind::BadRequest,
            "already_there",
            format!("tenant {tenant:?} is already on pod {to:?}; name another pod"),
        ));
    }
    if !target.accepting {
        return Err(FleetError::new(
            ErrorKind::Conflict,
            "pod_not_accepting",
            format!("pod {to:?} does not accept tenants (it is draining or closed); pick another pod or set it accepting"),
        ));
    }
    let from = route.pod.name.clone();
    let job = q::begin_move(
        fleet.catalog.pool(),
        &NewJob {
            kind: "move",
            tenant: Some(tenant),
            pod: Some(to),
            params: json!({"from": from, "to": to}),
            parent,
            actor,
        },
        &from,
        fleet.router_id.get(),
    )
    .await?;
    fleet.reload_routes().await?;
    let checkpoint = Checkpoint {
        tenant: tenant.to_owned(),
        source: from,
        target: to.to_owned(),
        ..Default::default()
    };
    let f = fleet.clone();
    fleet.jobs.spawn(
        job.id,
        move |ctx| async move { run(f, ctx, checkpoint).await },
    );
    Ok(job)
}

/// The job body: forward through the phases; on failure before the switch, roll back.
async fn run(fleet: Arc<Fleet>, ctx: JobCtx, checkpoint: Checkpoint) -> Outcome {
    let slots = fleet.jobs.move_slots.clone();
    let _slot = tokio::select! {
        s = slots.acquire_owned() => s.expect("never closed"),
        _ = ctx.cancel.cancelled() => {
            let _ = q::end_move(fleet.catalog.pool(), &checkpoint.tenant).await;
            let _ = fleet.reload_routes().await;
            return Outcome::Cancelled("cancelled before it started".into());
        }
    };
    let mut mv = Move::new(fleet.clone(), ctx, checkpoint);
    fleet
        .metrics
        .move_phases
        .with_label_values(&[mv.phase])
        .inc();
    let started = Instant::now();
    let outcome = mv.forward().await;
    let outcome = finish(&mut mv, outcome, started).await;
    mv.fleet
        .metrics
        .move_phases
        .with_label_values(&[mv.phase])
        .dec();
    let label = match &outcome {
        Outcome::Succeeded(_) => "succeeded",
        Outcome::Failed { .. } => "failed",
        Outcome::Cancelled(_) => "cancelled",
    };
    mv.fleet.metrics.moves.with_label_values(&[label]).inc();
    outcome
}

async fn finish(
    mv: &mut Move,
    outcome: MoveResult<serde_json::Value>,
    started: Instant,
) -> Outcome {
    match outcome {
        Ok(mut result) => {
            result["duration_ms"] = json!(started.elapsed().as_millis() as u64);
            Outcome::Succeeded(result)
        }
        Err(e) if mv.cp.switched => {
            // Past the point of no return the move has happened; only cleanup failed.
            let _ = mv.save(json!({"pending_cleanup": true})).await;
            Outcome::Succeeded(json!({
                "pause_ms": mv.pause_ms, "from": mv.cp.source, "to": mv.cp.target,
                "cleanup_pending": e.to_string(),
            }))
        }
        Err(e) => {
            let failed_in = mv.phase;
            let cleanup = mv.roll_back().await;
            let tail = match &cleanup {
                Ok(()) => "; the tenant stays on its pod and nothing was left behind".to_owned(),
                Err(c) => {
                    format!("; the tenant stays on its pod, and cleanup will be retried: {c}")
                }
            };
            match e {
                MoveError::Cancelled => Outcome::Cancelled(format!("cancelled{tail}")),
                MoveError::Refused(m) => Outcome::Failed {
                    error: format!("refused: {m}"),
                    result: None,
                },
                MoveError::Failed(m) => Outcome::Failed {
                    error: format!("{m}{tail}"),
                    result: Some(json!({"phase": failed_in, "attempts": mv.attempts})),
                },
            }
        }
    }
}

/// Connections of one move, opened as needed.
struct Conns {
    /// The source pod's `postgres` database (fence, slots, rename).
    src: Option<PgConnection>,
    /// The tenant's database on the source (facts, identity, publication, sequences); it
    /// outlives the fence, which spares this backend.
    src_db: Option<(PgConnection, i32)>,
    dst: Option<PgConnection>,
    dst_db: Option<PgConnection>,
}

struct Move {
    fleet: Arc<Fleet>,
    ctx: JobCtx,
    cp: Checkpoint,
    name: String,
    conns: Conns,
    phase: &'static str,
    pause_ms: u64,
    attempts: u32,
    timings: serde_json::Map<String, serde_json::Value>,
}

/// How long a single statement against a pod may take outside the cutover.
const STEP_TIMEOUT: Duration = Duration::from_secs(120);
const POLL: Duration = Duration::from_millis(200);

impl Move {
    fn new(fleet: Arc<Fleet>, ctx: JobCtx, cp: Checkpoint) -> Move {
        let name = pg::object_name(ctx.id);
        Move {
            fleet,
            ctx,
            cp,
            name,
            conns: Conns {
                src: None,
                src_db: None,
                dst: None,
                dst_db: None,
            },
            phase: "queued",
            pause_ms: 0,
            attempts: 0,
            timings: Default::default(),
        }
    }

    fn cancel(&self) -> &CancellationToken {
        &self.ctx.cancel
    }

    fn check_cancel(&self) -> MoveResult<()> {
        if self.ctx.cancelled() {
            Err(MoveError::Cancelled)
        } else {
            Ok(())
        }
    }

    async fn enter(&mut self, phase: &'static str) -> MoveResult<()> {
        self.check_cancel()?;
        self.switch_phase(phase);
        self.ctx.phase(phase).await?;
        Ok(())
    }

    /// Moves this move between the `podrouter_moves_in_phase` gauges.
    fn switch_phase(&mut self, phase: &'static str) {
        let gauges = &self.fleet.metrics.move_phases;
        gauges.with_label_values(&[self.phase]).dec();
        gauges.with_label_values(&[phase]).inc();
        self.phase = phase;
    }

    /// Records `patch` in the checkpoint (memory and catalog).
    async fn save(&mut self, patch: serde_json::Value) -> MoveResult<()> {
        let mut now = serde_json::to_value(&self.cp).expect("serialisable");
        if let (Some(o), Some(p)) = (now.as_object_mut(), patch.as_object()) {
            for (k, v) in p {
                o.insert(k.clone(), v.clone());
            }
        }
        self.cp = serde_json::from_value(now.clone()).expect("same shape");
        self.ctx.checkpoint(now).await?;
        Ok(())
    }

    fn admin_url(&self, pod: &str) -> MoveResult<String> {
        self.fleet
            .table
            .load()
            .pods
            .get(pod)
            .map(|p| p.admin_url.clone())
            .ok_or_else(|| MoveError::Failed(format!("pod {pod:?} is no longer in the catalog")))
    }

    async fn connect(&self, pod: &str, db: Option<&str>) -> MoveResult<PgConnection> {
        let url = self.admin_url(pod)?;
        podadmin::connect(&url, db)
            .await
            .map_err(|e| MoveError::pod(pod, "connecting", podadmin::short(&e)))
    }

    async fn src(&mut self) -> MoveResult<&mut PgConnection> {
        if self.conns.src.is_none() {
            self.conns.src = Some(self.connect(&self.cp.source.clone(), None).await?);
        }
        Ok(self.conns.src.as_mut().expect("set"))
    }

    async fn src_db(&mut self) -> MoveResult<&mut PgConnection> {
        if self.conns.src_db.is_none() {
            let mut c = self
                .connect(&self.cp.source.clone(), Some(&self.cp.tenant.clone()))
                .await?;
            let pid: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
                .fetch_one(&mut c)
                .await
                .map_err(|e| MoveError::pod(&self.cp.source, "connecting", e))?;
            self.conns.src_db = Some((c, pid));
        }
        Ok(&mut self.conns.src_db.as_mut().expect("set").0)
    }

    async fn dst(&mut self) -> MoveResult<&mut PgConnection> {
        if self.conns.dst.is_none() {
            self.conns.dst = Some(self.connect(&self.cp.target.clone(), None).await?);
        }
        Ok(self.conns.dst.as_mut().expect("set"))
    }

    async fn dst_db(&mut self) -> MoveResult<&mut PgConnection> {
        if self.conns.dst_db.is_none() {
            self.conns.dst_db = Some(
                self.connect(&self.cp.target.clone(), Some(&self.cp.tenant.clone()))
                    .await?,
            );
        }
        Ok(self.conns.dst_db.as_mut().expect("set"))
    }

    fn time(&mut self, phase: &str, since: Instant) {
        self.timings.insert(
            format!("{phase}_ms"),
            json!(since.elapsed().as_millis() as u64),
        );
    }

    async fn forward(&mut self) -> MoveResult<serde_json::Value> {
        let (source, target, tenant) = (
            self.cp.source.clone(),
            self.cp.target.clone(),
            self.cp.tenant.clone(),
        );
        // --- preflight
        let t = Instant::now();
        self.enter("preflight").await?;
        let facts = {
            let db = self.src_db().await?;
            let f = pg::source_facts(db).await;
            f.map_err(|e| MoveError::pod(&source, "reading the tenant database", e))?
        };
        let tf = {
            let roles = facts.roles.clone();
            let dst = self.dst().await?;
            pg::target_facts(dst, &tenant, &roles)
                .await
                .map_err(|e| MoveError::pod(&target, "checking", e))?
        };
        self.preflight(&facts, &tf)?;
        self.time("preflight", t);

        // --- schema
        let t = Instant::now();
        self.enter("schema").await?;
        self.ensure_roles().await?;
        self.save(json!({"target_db": true})).await?;
        self.copy_schema().await?;
        self.time("schema", t);

        // --- replication objects
        let t = Instant::now();
        self.enter("replicate").await?;
        let identity: Vec<(String, String)> = facts.without_identity.clone();
        if !identity.is_empty() {
            self.save(json!({"identity": identity})).await?;
            for (table, _) in &identity {
                let db = self.src_db().await?;
                pg::set_identity(db, table, "f")
                    .await
                    .map_err(|e| MoveError::pod(&source, "setting REPLICA IDENTITY FULL", e))?;
            }
        }
        self.save(json!({"publication": true})).await?;
        let name = self.name.clone();
        {
            let db = self.src_db().await?;
            pg::create_publication(db, &name)
                .await
                .map_err(|e| MoveError::pod(&source, "creating the publication", e))?;
        }
        self.save(json!({"subscription": true})).await?;
        let conninfo = pg::conninfo(&self.admin_url(&source)?, &tenant);
        {
            let db = self.dst_db().await?;
            let created =
                tokio::time::timeout(STEP_TIMEOUT, pg::create_subscription(db, &name, &conninfo))
                    .await;
            match created {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    return Err(MoveError::pod(
                        &target,
                        "creating the subscription",
                        podadmin::short(&e),
                    ))
                }
                Err(_) => {
                    return Err(MoveError::pod(
                        &target,
                        "creating the subscription",
                        "no answer (is a long transaction open on the source?)",
                    ))
                }
            }
            let oid = pg::subscription_oid(db, &name)
                .await
                .map_err(|e| MoveError::pod(&target, "reading the subscription", e))?;
            self.save(json!({"sub_oid": oid})).await?;
        }
        self.time("replicate", t);

        // --- initial copy
        let t = Instant::now();
        self.enter("copy").await?;
        let total_bytes: i64 = facts.tables.iter().map(|(_, s)| *s).sum();
        let copied = self.wait_copied(&facts.tables, total_bytes).await?;
        self.time("copy", t);

        // --- catch-up
        let t = Instant::now();
        self.enter("catch_up").await?;
        self.wait_caught_up().await?;
        self.time("catch_up", t);

        // --- cutover
        let t = Instant::now();
        self.enter("cutover").await?;
        let version = self.cutover().await?;
        self.time("cutover", t);

        // --- cleanup (past the point of no return: errors leave the move done)
        let t = Instant::now();
        self.switch_phase("cleanup");
        let _ = self.ctx.phase("cleanup").await;
        self.clean_up_after_switch().await?;
        self.time("cleanup", t);
        let _ = self.ctx.phase("done").await;
        self.ctx
            .progress(
                json!({"done": total_bytes, "total": total_bytes, "unit": "bytes"}),
                true,
            )
            .await?;
        Ok(json!({
            "pause_ms": self.pause_ms,
            "from": source,
            "to": target,
            "route_version": version,
            "tables": facts.tables.len(),
            "bytes": total_bytes,
            "rows_copied": copied,
            "cutover_attempts": self.attempts,
            "replica_identity_full": identity.len(),
            "source_kept_as": self.cp.source_kept_as,
            "timings": self.timings,
        }))
    }

    fn preflight(&self, f: &pg::SourceFacts, t: &pg::TargetFacts) -> MoveResult<()> {
        let (src, dst, tenant) = (&self.cp.source, &self.cp.target, &self.cp.tenant);
        let refuse = |m: String| Err(MoveError::Refused(m));
        if f.wal_level != "logical" {
            return refuse(format!(
                "pod {src:?} runs with wal_level={}; set wal_level = logical there and restart it",
                f.wal_level
            ));
        }
        if f.free_slots < 3 {
            return refuse(format!("pod {src:?} has {} free replication slots, a move needs 3; raise max_replication_slots or drop unused slots", f.free_slots));
        }
        if f.free_senders < 3 {
            return refuse(format!(
                "pod {src:?} has {} free WAL senders, a move needs 3; raise max_wal_senders",
                f.free_senders
            ));
        }
        if f.large_objects > 0 {
            return refuse(format!("tenant {tenant:?} has {} large objects, which logical replication cannot move; store them in bytea columns first", f.large_objects));
        }
        if !f.unlogged.is_empty() {
            return refuse(format!("tenant {tenant:?} has unlogged tables ({}), which logical replication cannot move; ALTER TABLE ... SET LOGGED first", f.unlogged.join(", ")));
        }
        if f.prepared_xacts > 0 {
            return refuse(format!("tenant {tenant:?} has {} prepared transactions; COMMIT PREPARED or ROLLBACK PREPARED them first", f.prepared_xacts));
        }
        if t.version / 10000 < f.version / 10000 {
            return refuse(format!("pod {dst:?} runs PostgreSQL {} and pod {src:?} {}: a move needs a target at least as new as its source", t.version / 10000, f.version / 10000));
        }
        if t.has_database {
            return refuse(format!("pod {dst:?} already has a database named {tenant:?}; drop or rename it there first"));
        }
        if t.free_workers < 1 {
            return refuse(format!("pod {dst:?} has no free logical replication worker; raise max_logical_replication_workers"));
        }
        let table = self.fleet.table.load();
        let known: Vec<&String> = t
            .missing_roles
            .iter()
            .filter(|r| !table.roles.contains_key(r.as_str()))
            .collect();
        if !known.is_empty() {
            return refuse(format!(
                "roles {} own objects or hold privileges in {tenant:?} but do not exist on pod {dst:?}; create them there first",
                known.iter().map(|r| r.as_str()).collect::<Vec<_>>().join(", ")
            ));
        }
        Ok(())
    }

    /// The tenant's roles on the target, with the catalog's verifiers (never a password).
    async fn ensure_roles(&mut self) -> MoveResult<()> {
        let table = self.fleet.table.load_full();
        let Some(route) = table.tenant(&self.cp.tenant) else {
            return Err(MoveError::Failed(
                "the tenant vanished from the catalog".into(),
            ));
        };
        let target = self.cp.target.clone();
        let mut roles: Vec<_> = route.grants.iter().cloned().collect();
        roles.sort();
        for role in roles {
            let Some(row) = self.fleet.catalog.role(&role).await? else {
                continue;
            };
            let verifier = row.verifier;
            let dst = self.dst().await?;
            podadmin::ensure_role(dst, &role, &verifier)
                .await
                .map_err(|e| MoveError::pod(&target, "creating the tenant's roles", e))?;
        }
        Ok(())
    }

    /// `pg_dump --schema-only --create` of the source, restored with psql on the target.
    async fn copy_schema(&mut self) -> MoveResult<()> {
        let bins = crate::localpg::PgBinaries::find().map_err(|e| {
            MoveError::Failed(format!(
                "pg_dump and psql are needed for the schema copy: {e}"
            ))
        })?;
        let src = pg::conninfo(&self.admin_url(&self.cp.source)?, &self.cp.tenant);
        let dst = pg::conninfo(&self.admin_url(&self.cp.target)?, "postgres");
        let dump = tokio::process::Command::new(bins.tool("pg_dump"))
            .args([
                "--schema-only",
                "--create",
                "--no-publications",
                "--no-subscriptions",
            ])
            .arg("--dbname")
            .arg(&src)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true)
            .output();
        let dump = tokio::select! {
            r = dump => r.map_err(|e| MoveError::Failed(format!("cannot run pg_dump: {e}")))?,
            _ = self.cancel().cancelled() => return Err(MoveError::Cancelled),
        };
        if !dump.status.success() {
            return Err(MoveError::pod(
                &self.cp.source,
                "pg_dump --schema-only",
                String::from_utf8_lossy(&dump.stderr).trim(),
            ));
        }
        let mut psql = tokio::process::Command::new(bins.tool("psql"))
            .args(["-X", "-q", "-v", "ON_ERROR_STOP=1"])
            .arg("--dbname")
            .arg(&dst)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| MoveError::Failed(format!("cannot run psql: {e}")))?;
        let mut stdin = psql.stdin.take().expect("piped");
        let script = dump.stdout;
        let feed = async move {
            use tokio::io::AsyncWriteExt;
            let _ = stdin.write_all(&script).await;
            drop(stdin);
        };
        let (_, out) = tokio::join!(feed, psql.wait_with_output());
        let out = out.map_err(|e| MoveError::Failed(format!("psql: {e}")))?;
        if !out.status.success() {
            return Err(MoveError::pod(
                &self.cp.target,
                "restoring the schema",
                String::from_utf8_lossy(&out.stderr).trim(),
            ));
        }
        Ok(())
    }

    /// Waits for the initial copy of every table, reporting progress; returns rows copied.
    async fn wait_copied(&mut self, tables: &[(String, i64)], total: i64) -> MoveResult<i64> {
        let name = self.name.clone();
        let target = self.cp.target.clone();
        let sizes: std::collections::HashMap<&str, i64> =
            tables.iter().map(|(t, s)| (t.as_str(), *s)).collect();
        let started = Instant::now();
        let timeout = self.fleet.config.load().moves.catch_up_timeout.0;
        let mut rows = 0;
        loop {
            self.check_cancel()?;
            let st = {
                let db = self.dst_db().await?;
                pg::copy_state(db, &name)
                    .await
                    .map_err(|e| MoveError::pod(&target, "watching the copy", e))?
            };
            if st.errors > 0 {
                return Err(MoveError::pod(
                    &target,
                    "the initial copy",
                    format!(
                        "the subscription reports {} errors; see the pod's server log",
                        st.errors
                    ),
                ));
            }
            let pending: i64 = st
                .syncing
                .iter()
                .map(|t| sizes.get(t.as_str()).copied().unwrap_or(0))
                .sum();
            let done = (total - pending + st.copying_bytes).clamp(0, total);
            rows = rows.max(st.copying_rows);
            let secs = started.elapsed().as_secs_f64();
            let eta = if done > 0 && done < total {
                Some(((total - done) as f64 * secs / done as f64).round() as u64)
            } else {
                None
            };
            self.ctx
                .progress(
                    json!({"done": done, "total": total, "unit": "bytes",
                           "tables_ready": st.ready, "tables": st.total, "rows": rows,
                           "eta_seconds": eta}),
                    false,
                )
                .await?;
            if st.total > 0 && st.ready == st.total || st.total == 0 && tables.is_empty() {
                return Ok(rows);
            }
            if started.elapsed() > timeout {
                return Err(MoveError::Failed(format!(
                    "the initial copy did not finish within {timeout:?} (moves.catch_up_timeout)"
                )));
            }
            self.sleep(POLL).await?;
        }
    }

    async fn sleep(&self, d: Duration) -> MoveResult<()> {
        tokio::select! {
            _ = tokio::time::sleep(d) => Ok(()),
            _ = self.ctx.cancel.cancelled() => Err(MoveError::Cancelled),
        }
    }

    /// Waits until the target is within `moves.cutover_lag_bytes` of the source and no
    /// write transaction on the tenant is older than half the pause deadline.
    async fn wait_caught_up(&mut self) -> MoveResult<()> {
        let cfg = self.fleet.config.load().moves.clone();
        let (source, name, tenant) = (
            self.cp.source.clone(),
            self.name.clone(),
            self.cp.tenant.clone(),
        );
        let started = Instant::now();
        loop {
            self.check_cancel()?;
            let head = {
                let src = self.src().await?;
                pg::wal_insert_lsn(src)
                    .await
                    .map_err(|e| MoveError::pod(&source, "reading the WAL position", e))?
            };
            let applied = {
                let src = self.src().await?;
                pg::confirmed_lsn(src, &name)
                    .await
                    .map_err(|e| MoveError::pod(&source, "reading the replication slot", e))?
            };
            let lag = applied.map(|a| (head - a).max(0));
            let writers = {
                let src = self.src().await?;
                pg::long_writers(src, &tenant, cfg.pause_deadline.0 / 2)
                    .await
                    .map_err(|e| MoveError::pod(&source, "checking transactions", e))?
            };
            let _ = self
                .ctx
                .progress(json!({"done": 0, "total": lag.unwrap_or(0), "unit": "bytes behind", "long_write_transactions": writers}), false)
                .await;
            if lag.is_some_and(|l| l <= cfg.cutover_lag_bytes as i64) && writers == 0 {
                return Ok(());
            }
            if started.elapsed() > cfg.catch_up_timeout.0 {
                return Err(MoveError::Failed(format!(
                    "the target did not catch up within {:?} (lag {lag:?} bytes, {writers} long write transactions)",
                    cfg.catch_up_timeout.0
                )));
            }
            self.sleep(Duration::from_millis(50)).await?;
        }
    }

    /// Pauses, fences, waits for the target, switches the route and resumes; retried up to
    /// `moves.cutover_attempts` times when an attempt runs past the pause deadline.
    async fn cutover(&mut self) -> MoveResult<i64> {
        let cfg = self.fleet.config.load().moves.clone();
        let mut last = String::new();
        while self.attempts < cfg.cutover_attempts {
            self.check_cancel()?;
            self.attempts += 1;
            match self.cutover_once(cfg.pause_deadline.0).await {
                Ok(v) => return Ok(v),
                Err(MoveError::Failed(why)) => {
                    tracing::info!(
                        job = self.ctx.id,
                        attempt = self.attempts,
                        "cutover attempt gave up: {why}"
                    );
                    last = why;
                    self.sleep(Duration::from_millis(500)).await?;
                    self.wait_caught_up().await?;
                }
                Err(e) => return Err(e),
            }
        }
        Err(MoveError::Failed(format!(
            "no cutover within the pause deadline in {} attempts (last: {last}); raise moves.pause_deadline or move at a quieter time",
            self.attempts
        )))
    }

    async fn cutover_once(&mut self, budget: Duration) -> MoveResult<i64> {
        let gate = self.fleet.proxy.gates.get(&self.cp.tenant);
        let t0 = Instant::now();
        let deadline = t0 + budget;
        gate.pause("a live move");
        // Every other live router holds the tenant's clients too before the fence.
        let everywhere = self
            .fleet
            .pause_everywhere(&self.cp.tenant, Some(self.ctx.id), budget)
            .await;
        let r = match &everywhere {
            Ok(p) => self.cutover_paused(&gate, p, deadline).await,
            Err(e) => Err(MoveError::Failed(format!(
                "cannot pause the tenant on the other routers: {e}"
            ))),
        };
        match &r {
            Ok(_) => {}
            Err(_) => {
                if self.cp.fenced {
                    // Bounded: a hung source must not hold the clients forever.
                    let tenant = self.cp.tenant.clone();
                    let unfenced = match tokio::time::timeout(Duration::from_secs(2), async {
                        let src = self.src().await?;
                        pg::unfence(src, &tenant)
                            .await
                            .map_err(|e| MoveError::pod("source", "unfencing", e))
                    })
                    .await
                    {
                        Ok(Ok(())) => true,
                        Ok(Err(e)) => {
                            tracing::warn!("cannot unfence the source: {e}");
                            false
                        }
                        Err(_) => false,
                    };
                    if unfenced {
                        let _ = self.save(json!({"fenced": false})).await;
                    }
                }
            }
        }
        gate.resume();
        if let Ok(p) = &everywhere {
            let version = r.as_ref().ok().copied();
            if let Err(e) = self.fleet.resume_everywhere(p, version).await {
                // They let go at the pause's expiry (after loading the route) instead.
                tracing::warn!(
                    job = self.ctx.id,
                    "cannot end the pause on the other routers: {e}"
                );
            }
        }
        self.pause_ms = t0.elapsed().as_millis() as u64;
        self.fleet
            .metrics
            .move_pause
            .with_label_values(&[] as &[&str])
            .observe(t0.elapsed().as_secs_f64());
        if r.is_ok() {
            tracing::info!(job = self.ctx.id, tenant = %self.cp.tenant, pause_ms = self.pause_ms, "tenant moved");
        }
        r
    }

    async fn cutover_paused(
        &mut self,
        gate: &crate::routing::pause::PauseGate,
        everywhere: &crate::fleet::routers::FleetPause,
        deadline: Instant,
    ) -> MoveResult<i64> {
        let past = |what: &str| MoveError::Failed(format!("{what} took past the pause deadline"));
        // 1. running transactions finish, here and on every other router (within half the
        // budget, leaving time for the rest)
        let step = Instant::now();
        let half = Instant::now() + (deadline - Instant::now()) / 2;
        if !gate.drained(half).await {
            return Err(MoveError::Failed(format!(
                "{} transactions of the tenant were still running at half the pause deadline",
                gate.inside()
            )));
        }
        match self.fleet.others_drained(everywhere, half).await {
            Ok(Ok(())) => {}
            Ok(Err(busy)) => {
                return Err(MoveError::Failed(format!(
                    "routers {busy:?} still had transactions of the tenant running (or did not answer) at half the pause deadline"
                )))
            }
            Err(e) => {
                return Err(MoveError::Failed(format!(
                    "cannot hear from the other routers: {e}"
                )))
            }
        }
        self.time("pause_drain", step);
        self.check_cancel()?;
        // 2. fence the source
        let step = Instant::now();
        let (source, target, tenant, name) = (
            self.cp.source.clone(),
            self.cp.target.clone(),
            self.cp.tenant.clone(),
            self.name.clone(),
        );
        self.save(json!({"fenced": true})).await?;
        let keep = self.conns.src_db.as_ref().map(|c| c.1).unwrap_or(0);
        let src = self.src().await?;
        tokio::time::timeout_at(deadline, pg::fence(src, &tenant, keep))
            .await
            .map_err(|_| past("fencing the source"))?
            .map_err(|e| MoveError::pod(&source, "fencing", e))?;
        self.time("pause_fence", step);
        // 3. where the source's WAL ends now; wait until the target applied that far
        let step = Instant::now();
        let job = self.ctx.id;
        let src = self.src().await?;
        let lsn = tokio::time::timeout_at(deadline, pg::flushed_wal_position(src, job))
            .await
            .map_err(|_| past("reading the WAL position"))?
            .map_err(|e| MoveError::pod(&source, "reading the WAL position", e))?;
        loop {
            let src = self.src().await?;
            let applied = tokio::time::timeout_at(deadline, pg::confirmed_lsn(src, &name))
                .await
                .map_err(|_| past("waiting for the target"))?
                .map_err(|e| MoveError::pod(&source, "reading the replication slot", e))?;
            if applied.is_some_and(|a| a >= lsn) {
                break;
            }
            if Instant::now() + Duration::from_millis(5) >= deadline {
                return Err(past("the target catching up"));
            }
            self.check_cancel()?;
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        self.time("pause_wal_wait", step);
        // 4. sequences
        let step = Instant::now();
        let db = self.src_db().await?;
        let seqs = tokio::time::timeout_at(deadline, pg::read_sequences(db))
            .await
            .map_err(|_| past("reading sequences"))?
            .map_err(|e| MoveError::pod(&source, "reading sequences", e))?;
        let db = self.dst_db().await?;
        tokio::time::timeout_at(deadline, pg::write_sequences(db, &seqs))
            .await
            .map_err(|_| past("setting sequences"))?
            .map_err(|e| MoveError::pod(&target, "setting sequences", e))?;
        self.time("pause_sequences", step);
        // 5. the switch: durable in the catalog before anyone is released
        let step = Instant::now();
        self.check_cancel()?;
        if Instant::now() >= deadline {
            return Err(past("the cutover"));
        }
        let version = q::switch_route(
            self.fleet.catalog.pool(),
            self.ctx.id,
            &tenant,
            &source,
            &target,
        )
        .await?
        .ok_or_else(|| MoveError::Failed("the tenant's route changed under the move".into()))?;
        self.cp.switched = true;
        // The local table now, without waiting for NOTIFY (others follow it).
        let moved = self
            .fleet
            .store_routes(|t| t.with_tenant_moved(&tenant, &target, version))
            .await;
        if !moved {
            let _ = self.fleet.reload_routes().await;
        }
        self.time("pause_switch", step);
        Ok(version)
    }

    /// After the switch: replication objects go, the source database is renamed and kept
    /// (or dropped when the retention is zero).
    async fn clean_up_after_switch(&mut self) -> MoveResult<()> {
        let (source, target, tenant, name) = (
            self.cp.source.clone(),
            self.cp.target.clone(),
            self.cp.tenant.clone(),
            self.name.clone(),
        );
        {
            let db = self.dst_db().await?;
            pg::drop_subscription(db, &name)
                .await
                .map_err(|e| MoveError::pod(&target, "dropping the subscription", e))?;
        }
        // Our own source connection is the only one left on the fenced database.
        if let Some((mut db, _)) = self.conns.src_db.take() {
            let _ = pg::drop_publication(&mut db, &name).await;
            for (table, ident) in self.cp.identity.clone() {
                let _ = pg::set_identity(&mut db, &table, &ident).await;
            }
            let _ = db.close().await;
        }
        let sub_oid = self.cp.sub_oid;
        let retention = self.fleet.config.load().moves.source_retention.0;
        let src = self.src().await?;
        pg::drop_slots(src, &name, sub_oid)
            .await
            .map_err(|e| MoveError::pod(&source, "dropping the replication slot", e))?;
        if retention.is_zero() {
            pg::drop_database(src, &tenant)
                .await
                .map_err(|e| MoveError::pod(&source, "dropping the old database", e))?;
            self.save(json!({"source_dropped": true})).await?;
        } else {
            let kept = pg::kept_name(&tenant, self.ctx.id);
            self.save(json!({"source_kept_as": kept})).await?;
            let src = self.src().await?;
            if pg::database_exists(src, &tenant).await.unwrap_or(false) {
                pg::rename_database(src, &tenant, &kept)
                    .await
                    .map_err(|e| MoveError::pod(&source, "renaming the old database", e))?;
            }
        }
        self.save(json!({"pending_cleanup": false})).await?;
        Ok(())
    }

    /// Undoes everything before the switch: the tenant stays on its source.
    async fn roll_back(&mut self) -> MoveResult<()> {
        self.switch_phase("rolling_back");
        let _ = self.ctx.phase("rolling_back").await;
        // The job's own token may be cancelled; cleanup must still run.
        let r = roll_back_objects(&self.fleet, self.ctx.id, &mut self.cp, &mut self.conns).await;
        let _ = q::end_move(self.fleet.catalog.pool(), &self.cp.tenant).await;
        let _ = self.fleet.reload_routes().await;
        let pending = r.is_err();
        let _ = self.save(json!({"pending_cleanup": pending})).await;
        r
    }
}

/// Removes what a move made before its switch, per its checkpoint; idempotent. Order:
/// unfence the source (the tenant must work there again at once), stop the subscription on
/// the target (so nothing re-takes the slot), then the source's slots, publication and
/// replica identities, then the half-copied database. Each pod is tried independently, so
/// a target that is down does not keep the source fenced.
async fn roll_back_objects(
    fleet: &Arc<Fleet>,
    job: i64,
    cp: &mut Checkpoint,
    conns: &mut Conns,
) -> MoveResult<()> {
    let name = pg::object_name(job);
    let table = fleet.table.load_full();
    let src_url = table.pods.get(&cp.source).map(|p| p.admin_url.clone());
    let dst_url = table.pods.get(&cp.target).map(|p| p.admin_url.clone());
    let mut problems = Vec::new();
    let short = |pod: &str, what: &str, e: &sqlx::Error| {
        format!("{what} on {pod:?}: {}", podadmin::short(e))
    };
    let mut src = match (&src_url, conns.src.take()) {
        (_, Some(c)) => Some(c),
        (Some(u), None) => match podadmin::connect(u, None).await {
            Ok(c) => Some(c),
            Err(e) => {
                problems.push(short(&cp.source, "connecting", &e));
                None
            }
        },
        (None, None) => {
            problems.push(format!("pod {:?} is gone from the catalog", cp.source));
            None
        }
    };
    if cp.fenced {
        if let Some(c) = src.as_mut() {
            match pg::unfence(c, &cp.tenant).await {
                Ok(()) => cp.fenced = false,
                Err(e) => problems.push(short(&cp.source, "unfencing", &e)),
            }
        }
    }
    if cp.subscription {
        if let Some(u) = &dst_url {
            let db = match conns.dst_db.take() {
                Some(c) => Ok(c),
                None => podadmin::connect(u, Some(&cp.tenant)).await,
            };
            match db {
                Ok(mut db) => {
                    if let Err(e) = pg::drop_subscription(&mut db, &name).await {
                        problems.push(short(&cp.target, "dropping the subscription", &e));
                    }
                    let _ = db.close().await;
                }
                // No database there (never made, or dropped): no subscription either.
                Err(sqlx::Error::Database(d)) if d.code().as_deref() == Some("3D000") => {}
                Err(e) => problems.push(short(&cp.target, "connecting", &e)),
            }
        }
        if let Some(c) = src.as_mut() {
            if let Err(e) = pg::drop_slots(c, &name, cp.sub_oid).await {
                problems.push(short(&cp.source, "dropping the replication slot", &e));
            }
        }
    }
    if cp.publication || !cp.identity.is_empty() {
        if let Some(u) = &src_url {
            let db = match conns.src_db.take() {
                Some((c, _)) => Ok(c),
                None => podadmin::connect(u, Some(&cp.tenant)).await,
            };
            match db {
                Ok(mut db) => {
                    if let Err(e) = pg::drop_publication(&mut db, &name).await {
                        problems.push(short(&cp.source, "dropping the publication", &e));
                    }
                    for (t, ident) in &cp.identity {
                        if let Err(e) = pg::set_identity(&mut db, t, ident).await {
                            problems.push(short(
                                &cp.source,
                                &format!("restoring the replica identity of {t}"),
                                &e,
                            ));
                        }
                    }
                    let _ = db.close().await;
                }
                Err(e) => problems.push(short(&cp.source, "connecting", &e)),
            }
        }
    }
    if cp.target_db {
        if let Some(u) = &dst_url {
            let dst = match conns.dst.take() {
                Some(c) => Ok(c),
                None => podadmin::connect(u, None).await,
            };
            match dst {
                Ok(mut dst) => {
                    if let Err(e) = pg::drop_database(&mut dst, &cp.tenant).await {
                        problems.push(short(&cp.target, "dropping the half-copied database", &e));
                    }
                }
                Err(e) => problems.push(short(&cp.target, "connecting", &e)),
            }
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(MoveError::Failed(problems.join("; ")))
    }
}

/// At start (and then now and again): jobs whose router is gone — killed, or this router's
/// previous process — are taken over; moves among them are finished (switched) or rolled
/// back, and the jobs closed. Jobs of other live routers are theirs and left alone.
pub async fn recover(fleet: &Arc<Fleet>) {
    let jobs = match q::unfinished(fleet.catalog.pool()).await {
        Ok(j) => j,
        Err(e) => {
            tracing::error!("cannot read unfinished jobs: {e}");
            return;
        }
    };
    let mut recovered = 0;
    for job in jobs {
        if fleet.jobs.is_running(job.id) {
            continue;
        }
        match crate::fleet::routers::is_live(fleet, job.owner).await {
            Ok(false) => {}
            Ok(true) => continue,
            Err(e) => {
                tracing::error!("cannot tell whether job {}'s router is live: {e}", job.id);
                return;
            }
        }
        match q::claim(
            fleet.catalog.pool(),
            job.id,
            job.owner,
            fleet.router_id.get(),
        )
        .await
        {
            Ok(true) => {}
            Ok(false) => continue, // another router took it first
            Err(e) => {
                tracing::error!("cannot take over job {}: {e}", job.id);
                return;
            }
        }
        let (state, result, error) = match job.kind.as_str() {
            "move" => recover_move(fleet, &job).await,
            _ => (
                "failed",
                None,
                Some("interrupted by a router restart; its moves were finished or rolled back one by one — run it again if needed".to_owned()),
            ),
        };
        tracing::warn!(job = job.id, kind = %job.kind, state, "recovered a job interrupted by a restart");
        if let Err(e) = q::finish(
            fleet.catalog.pool(),
            job.id,
            state,
            result.as_ref(),
            error.as_deref(),
        )
        .await
        {
            tracing::error!(job = job.id, "cannot close the recovered job: {e}");
        }
        recovered += 1;
        if let Err(e) = crate::fleet::routers::end_pauses_of_job(fleet, job.id).await {
            tracing::warn!(
                job = job.id,
                "cannot end the recovered job's pauses (they expire by themselves): {e}"
            );
        }
    }
    if recovered > 0 {
        let _ = fleet.reload_routes().await;
    }
}

async fn recover_move(
    fleet: &Arc<Fleet>,
    job: &JobRow,
) -> (&'static str, Option<serde_json::Value>, Option<String>) {
    let mut cp: Checkpoint = match serde_json::from_value(job.checkpoint.clone()) {
        Ok(cp) => cp,
        Err(_) => {
            // Nothing was made yet (the checkpoint is written before the first step).
            let tenant = job.tenant.clone().unwrap_or_default();
            let _ = q::end_move(fleet.catalog.pool(), &tenant).await;
            return (
                "failed",
                None,
                Some("interrupted by a router restart before it began; nothing to undo".into()),
            );
        }
    };
    let mut conns = Conns {
        src: None,
        src_db: None,
        dst: None,
        dst_db: None,
    };
    if cp.switched {
        // Past the point of no return: finish the cleanup.
        let ctx_free = finish_cleanup(fleet, job.id, &mut cp).await;
        let _ = q::checkpoint(
            fleet.catalog.pool(),
            job.id,
            &serde_json::to_value(&cp).expect("serialisable"),
        )
        .await;
        return (
            "succeeded",
            Some(
                json!({"from": cp.source, "to": cp.target, "recovered": true, "cleanup_pending": ctx_free.err()}),
            ),
            None,
        );
    }
    let r = roll_back_objects(fleet, job.id, &mut cp, &mut conns).await;
    cp.pending_cleanup = r.is_err();
    let _ = q::checkpoint(
        fleet.catalog.pool(),
        job.id,
        &serde_json::to_value(&cp).expect("serialisable"),
    )
    .await;
    let _ = q::end_move(fleet.catalog.pool(), &cp.tenant).await;
    let msg = match r {
        Ok(()) => "interrupted by a router restart; rolled back: the tenant stays on its pod and nothing was left behind".to_owned(),
        Err(e) => format!("interrupted by a router restart; the tenant stays on its pod; cleanup will be retried: {e}"),
    };
    ("failed", None, Some(msg))
}

/// The cleanup of a switched move, outside a running job (recovery, janitor).
async fn finish_cleanup(fleet: &Arc<Fleet>, job: i64, cp: &mut Checkpoint) -> Result<(), String> {
    let name = pg::object_name(job);
    let table = fleet.table.load_full();
    let url = |pod: &str| table.pods.get(pod).map(|p| p.admin_url.clone());
    let mut problems = Vec::new();
    if let Some(u) = url(&cp.target) {
        match podadmin::connect(&u, Some(&cp.tenant)).await {
            Ok(mut db) => {
                if let Err(e) = pg::drop_subscription(&mut db, &name).await {
                    problems.push(format!("subscription: {}", podadmin::short(&e)));
                }
            }
            Err(e) => problems.push(format!("pod {:?}: {}", cp.target, podadmin::short(&e))),
        }
    }
    if let Some(u) = url(&cp.source) {
        match podadmin::connect(&u, None).await {
            Ok(mut src) => {
                if let Err(e) = pg::drop_slots(&mut src, &name, cp.sub_oid).await {
                    problems.push(format!("slot: {}", podadmin::short(&e)));
                }
                // The publication lives inside the old database, closed to connections:
                // it goes with that database at the end of the retention.
                let kept = pg::kept_name(&cp.tenant, job);
                if pg::database_exists(&mut src, &cp.tenant)
                    .await
                    .unwrap_or(false)
                {
                    match pg::rename_database(&mut src, &cp.tenant, &kept).await {
                        Ok(()) => cp.source_kept_as = Some(kept),
                        Err(e) => problems.push(format!("rename: {}", podadmin::short(&e))),
                    }
                } else if pg::database_exists(&mut src, &kept).await.unwrap_or(false) {
                    cp.source_kept_as = Some(kept);
                }
            }
            Err(e) => problems.push(format!("pod {:?}: {}", cp.source, podadmin::short(&e))),
        }
    }
    cp.pending_cleanup = !problems.is_empty();
    if problems.is_empty() {
        Ok(())
    } else {
        Err(problems.join("; "))
    }
}

/// Background upkeep: retries cleanup that a pod being down left owed, and drops source
/// databases kept past `moves.source_retention`.
pub async fn janitor(fleet: Arc<Fleet>, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(Duration::from_secs(15));
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        // Jobs of a router that died while this one runs.
        recover(&fleet).await;
        if let Ok(jobs) =
            q::finished_with_flag(fleet.catalog.pool(), "move", "pending_cleanup").await
        {
            for job in jobs {
                let Ok(mut cp) = serde_json::from_value::<Checkpoint>(job.checkpoint.clone())
                else {
                    continue;
                };
                let r = if cp.switched {
                    finish_cleanup(&fleet, job.id, &mut cp)
                        .await
                        .map_err(MoveError::Failed)
                } else {
                    let mut conns = Conns {
                        src: None,
                        src_db: None,
                        dst: None,
                        dst_db: None,
                    };
                    roll_back_objects(&fleet, job.id, &mut cp, &mut conns).await
                };
                cp.pending_cleanup = r.is_err();
                if r.is_ok() {
                    tracing::info!(job = job.id, "owed move cleanup done");
                }
                let _ = q::checkpoint(
                    fleet.catalog.pool(),
                    job.id,
                    &serde_json::to_value(&cp).expect("serialisable"),
                )
                .await;
            }
        }
        let retention = fleet.config.load().moves.source_retention.0;
        if let Ok(jobs) = q::list(fleet.catalog.pool(), 1000).await {
            for job in jobs
                .into_iter()
                .filter(|j| j.kind == "move" && j.state == "succeeded")
            {
                let Ok(mut cp) = serde_json::from_value::<Checkpoint>(job.checkpoint.clone())
                else {
                    continue;
                };
                let (Some(kept), false) = (cp.source_kept_as.clone(), cp.source_dropped) else {
                    continue;
                };
                let due = job.finished_at.is_some_and(|f| {
                    chrono::Utc::now() - f
                        > chrono::Duration::from_std(retention).unwrap_or(chrono::Duration::MAX)
                });
                if !due {
                    continue;
                }
                let Some(url) = fleet
                    .table
                    .load()
                    .pods
                    .get(&cp.source)
                    .map(|p| p.admin_url.clone())
                else {
                    continue;
                };
                if let Ok(mut src) = podadmin::connect(&url, None).await {
                    if pg::drop_database(&mut src, &kept).await.is_ok() {
                        tracing::info!(job = job.id, database = %kept, "dropped a moved tenant's old database past its retention");
                        cp.source_dropped = true;
                        let _ = q::checkpoint(
                            fleet.catalog.pool(),
                            job.id,
                            &json!({"source_dropped": true}),
                        )
                        .await;
                    }
                }
            }
        }
    }
}
