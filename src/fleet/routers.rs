//! Routers sharing one catalog: membership and fleet-wide move pauses.
//!
//! **Membership.** At start a router inserts its row in `routers` and takes the session
//! advisory lock `(LOCK_SPACE, id)` on a catalog connection it keeps for its whole life
//! ([`register`]). A router is live exactly while that lock is held: when a router is killed
//! its connection closes and the lock goes with it, so no heartbeat timeout has to pass before
//! the others know (a hung router still counts as live, as it would with a heartbeat too,
//! until its TCP connection to the catalog times out). Jobs record their owner; only jobs of
//! a router that is not live are recovered by another ([`crate::mover::recover`]).
//!
//! **Move pauses.** A move must hold its tenant's clients on every router before it fences
//! the source, or clients of the other routers would see their connections cut. The mover
//! calls [`Fleet::pause_everywhere`]: a row in `move_pauses` and a NOTIFY on
//! [`PAUSES_CHANNEL`]; every other live router pauses its gate for the tenant, waits for its
//! running transactions to end and writes an acknowledgement ([`follow_pause`]); the mover
//! waits for all of them (or gives up the attempt at its drain deadline, resuming everyone).
//! At the end [`Fleet::resume_everywhere`] records the route version to follow, so a router
//! resumes only once its routing table has the switch (invariant 4 of DESIGN.md holds on
//! every router, not just the mover's). A router that never hears the end lets go at the
//! pause's `expires_at`.

use super::Fleet;
use crate::catalog::CatalogError;
use parking_lot::Mutex;
use sqlx::{Connection, PgConnection, Row};
use std::collections::HashMap;
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// The advisory lock space of router membership ("podr").
pub const LOCK_SPACE: i32 = 0x706f_6472;
/// The channel of move pauses: payload `pause <id>` or `resume <id>`.
pub const PAUSES_CHANNEL: &str = "podrouter_pauses";
/// How often a router refreshes its `seen_at` (for people reading the table; liveness is the
/// lock) and re-takes its lock after losing the catalog connection.
const KEEPALIVE: Duration = Duration::from_secs(5);
/// How often the mover polls for acknowledgements.
const ACK_POLL: Duration = Duration::from_millis(2);
/// A pause row outlives the mover's deadline by this much before other routers let go.
const EXPIRY_MARGIN: Duration = Duration::from_secs(1);

/// SQL: the routers whose membership lock is held (`r` is a `routers` row).
static LIVE: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    format!(
        "EXISTS (SELECT 1 FROM pg_locks l
                  WHERE l.locktype = 'advisory' AND l.granted
                    AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
                    AND l.classid = {LOCK_SPACE}::oid AND l.objid = r.id::oid AND l.objsubid = 2)"
    )
});

/// This router's id in `routers` (0 until [`register`]).
#[derive(Debug, Default)]
pub struct RouterId(AtomicI32);

impl RouterId {
    pub fn get(&self) -> Option<i32> {
        match self.0.load(Ordering::Relaxed) {
            0 => None,
            id => Some(id),
        }
    }
}

/// Remote pauses this router holds: pause id → tenant (only those that paused the gate here).
#[derive(Debug, Default)]
pub struct RemotePauses(Mutex<HashMap<i64, String>>);

/// Registers this router and keeps its membership lock until `shutdown` (then deletes the
/// row). Also prunes the rows of routers that are gone.
pub async fn register(
    fleet: &Arc<Fleet>,
    listen: String,
    admin: String,
    shutdown: CancellationToken,
) -> Result<i32, CatalogError> {
    let url = fleet.config.load().router.catalog_url.clone();
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_else(|_| "unknown".into());
    let mut conn = PgConnection::connect(&url).await?;
    let mut tx = conn.begin().await?;
    let id: i32 = sqlx::query_scalar(
        "INSERT INTO routers (host, pid, listen, admin) VALUES ($1, $2, $3, $4) RETURNING id",
    )
    .bind(&host)
    .bind(std::process::id() as i32)
    .bind(&listen)
    .bind(&admin)
    .fetch_one(&mut *tx)
    .await?;
    lock(&mut tx, id).await?;
    tx.commit().await?;
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "DELETE FROM routers r WHERE r.id <> $1 AND NOT {}",
        *LIVE
    )))
    .bind(id)
    .execute(&mut conn)
    .await?;
    sqlx::query(
        "DELETE FROM move_pauses WHERE coalesce(ended_at, expires_at) < now() - interval '1 day'",
    )
    .execute(&mut conn)
    .await?;
    fleet.router_id.0.store(id, Ordering::Relaxed);
    tracing::info!(router = id, "registered in the catalog");
    tokio::spawn(keep_membership(url, id, conn, shutdown));
    Ok(id)
}

async fn lock(conn: &mut PgConnection, id: i32) -> Result<(), sqlx::Error> {
    sqlx::query("SELECT pg_advisory_lock($1, $2)")
        .bind(LOCK_SPACE)
        .bind(id)
        .execute(conn)
        .await
        .map(|_| ())
}

/// Holds the membership connection; reconnects (re-taking the lock) when it drops.
async fn keep_membership(url: String, id: i32, conn: PgConnection, shutdown: CancellationToken) {
    let mut conn = Some(conn);
    let mut tick = tokio::time::interval(KEEPALIVE);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tick.tick() => {}
        }
        if conn.is_none() {
            match PgConnection::connect(&url).await {
                Ok(mut c) => match lock(&mut c, id).await {
                    Ok(()) => {
                        tracing::info!(router = id, "catalog membership restored");
                        conn = Some(c);
                    }
                    Err(e) => tracing::warn!("cannot re-take the router's catalog lock: {e}"),
                },
                Err(e) => tracing::warn!("cannot reconnect to the catalog: {e}"),
            }
        }
        if let Some(c) = conn.as_mut() {
            let r = sqlx::query("UPDATE routers SET seen_at = now() WHERE id = $1")
                .bind(id)
                .execute(&mut *c)
                .await;
            if let Err(e) = r {
                tracing::warn!(router = id, "catalog membership lost, reconnecting: {e}");
                conn = None;
            }
        }
    }
    if let Some(mut c) = conn {
        let _ = sqlx::query("DELETE FROM routers WHERE id = $1")
            .bind(id)
            .execute(&mut c)
            .await;
        let _ = c.close().await;
    }
}

/// Whether router `id` is live (None: never registered).
pub async fn is_live(fleet: &Fleet, id: Option<i32>) -> Result<bool, CatalogError> {
    let Some(id) = id else { return Ok(false) };
    if Some(id) == fleet.router_id.get() {
        return Ok(true);
    }
    Ok(sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "SELECT EXISTS (SELECT 1 FROM routers r WHERE r.id = $1 AND {})",
        *LIVE
    )))
    .bind(id)
    .fetch_one(fleet.catalog.pool())
    .await?)
}

/// Names a job's owner for messages: "router 3 (admin 10.0.0.5:9930)", or what is known.
pub async fn describe(fleet: &Fleet, owner: Option<i32>) -> String {
    let Some(id) = owner else {
        return "no router (a restart will recover it)".into();
    };
    let admin: Option<Option<String>> =
        sqlx::query_scalar("SELECT admin FROM routers WHERE id = $1")
            .bind(id)
            .fetch_optional(fleet.catalog.pool())
            .await
            .ok()
            .flatten();
    match admin {
        Some(Some(a)) => format!("router {id} (admin API on {a})"),
        _ => format!("router {id}, which is gone (a live router recovers its jobs within 15 s)"),
    }
}

/// A pause held on every live router ([`Fleet::pause_everywhere`]).
#[derive(Debug)]
pub struct FleetPause {
    pub id: i64,
    /// The other routers asked to pause.
    pub others: Vec<i32>,
}

impl Fleet {
    /// Asks every other live router to pause `tenant` (the caller pauses this router's own
    /// gate) for at most `hold`; returns at once. Wait for them with [`Fleet::others_drained`].
    pub async fn pause_everywhere(
        &self,
        tenant: &str,
        job: Option<i64>,
        hold: Duration,
    ) -> Result<FleetPause, CatalogError> {
        let me = self.router_id.get().unwrap_or(0);
        let mut tx = self.catalog.pool().begin().await?;
        let row = sqlx::query(sqlx::AssertSqlSafe(format!(
            "WITH p AS (
               INSERT INTO move_pauses (tenant, job, origin, expires_at)
               VALUES ($1, $2, $3, now() + $4::interval) RETURNING id)
             SELECT p.id, array(SELECT r.id FROM routers r WHERE r.id <> $3 AND {} ORDER BY r.id) AS others
               FROM p",
            *LIVE
        )))
        .bind(tenant)
        .bind(job)
        .bind(me)
        .bind(format!("{} milliseconds", (hold + EXPIRY_MARGIN).as_millis()))
        .fetch_one(&mut *tx)
        .await?;
        let id: i64 = row.try_get("id")?;
        let others: Vec<i32> = row.try_get("others")?;
        if !others.is_empty() {
            sqlx::query("SELECT pg_notify($1, $2)")
                .bind(PAUSES_CHANNEL)
                .bind(format!("pause {id}"))
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(FleetPause { id, others })
    }

    /// Waits until every router asked to pause has acknowledged with no transaction of the
    /// tenant running (a router that stopped being live counts as done: it has no clients
    /// left). Ok(Err(routers)) names those still busy at `deadline`.
    pub async fn others_drained(
        &self,
        pause: &FleetPause,
        deadline: Instant,
    ) -> Result<Result<(), Vec<i32>>, CatalogError> {
        if pause.others.is_empty() {
            return Ok(Ok(()));
        }
        let sql = format!(
            "SELECT r.id FROM routers r
              WHERE r.id = ANY($2) AND {}
                AND NOT EXISTS (SELECT 1 FROM move_pause_acks a
                                 WHERE a.pause = $1 AND a.router = r.id AND a.drained)",
            *LIVE
        );
        loop {
            let waiting: Vec<i32> = sqlx::query_scalar(sqlx::AssertSqlSafe(sql.clone()))
                .bind(pause.id)
                .bind(&pause.others)
                .fetch_all(self.catalog.pool())
                .await?;
            if waiting.is_empty() {
                return Ok(Ok(()));
            }
            if Instant::now() + ACK_POLL >= deadline {
                return Ok(Err(waiting));
            }
            tokio::time::sleep(ACK_POLL).await;
        }
    }

    /// Ends a pause on every router; `route_version`: the tenant's route after a switch,
    /// which a router loads before it lets its held clients go.
    pub async fn resume_everywhere(
        &self,
        pause: &FleetPause,
        route_version: Option<i64>,
    ) -> Result<(), CatalogError> {
        let mut tx = self.catalog.pool().begin().await?;
        sqlx::query("UPDATE move_pauses SET ended_at = now(), route_version = $2 WHERE id = $1")
            .bind(pause.id)
            .bind(route_version)
            .execute(&mut *tx)
            .await?;
        if !pause.others.is_empty() {
            sqlx::query("SELECT pg_notify($1, $2)")
                .bind(PAUSES_CHANNEL)
                .bind(format!("resume {}", pause.id))
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(())
    }
}

/// Ends the pauses a recovered job left open (its router died mid-cutover), so the routers
/// holding them let their clients go now, on the tenant's route as recovery left it.
pub async fn end_pauses_of_job(fleet: &Fleet, job: i64) -> Result<(), CatalogError> {
    sqlx::query(
        "WITH e AS (
           UPDATE move_pauses p
              SET ended_at = now(),
                  route_version = (SELECT t.route_version FROM tenants t WHERE t.name = p.tenant)
            WHERE p.job = $1 AND p.ended_at IS NULL
           RETURNING p.id)
         SELECT pg_notify($2, 'resume ' || e.id) FROM e",
    )
    .bind(job)
    .bind(PAUSES_CHANNEL)
    .fetch_all(fleet.catalog.pool())
    .await?;
    Ok(())
}

/// Acts on a `podrouter_pauses` notification (`pause <id>` / `resume <id>`) from another
/// router. Runs as its own task: a pause waits for the tenant's transactions here to end.
pub async fn follow_pause(fleet: Arc<Fleet>, payload: String) {
    let mut words = payload.split_whitespace();
    let (Some(what), Some(Ok(id))) = (words.next(), words.next().map(str::parse::<i64>)) else {
        tracing::warn!(%payload, "ignoring a malformed pause notification");
        return;
    };
    let r = match what {
        "pause" => hold(&fleet, id).await,
        "resume" => release(&fleet, id).await,
        _ => Ok(()),
    };
    if let Err(e) = r {
        tracing::warn!(
            pause = id,
            "cannot follow the {what} of another router: {e}"
        );
    }
}

/// Applies the pauses still open in the catalog (after (re)connecting to it, when
/// notifications may have been missed), and ends those held here that ended meanwhile.
pub async fn sync_pauses(fleet: &Arc<Fleet>) {
    let me = fleet.router_id.get().unwrap_or(0);
    let open: Vec<i64> = sqlx::query_scalar(
        "SELECT id FROM move_pauses WHERE ended_at IS NULL AND expires_at > now() AND origin <> $1",
    )
    .bind(me)
    .fetch_all(fleet.catalog.pool())
    .await
    .unwrap_or_default();
    let held: Vec<i64> = fleet.remote_pauses.0.lock().keys().copied().collect();
    for id in held.into_iter().filter(|id| !open.contains(id)) {
        tokio::spawn(follow_pause(fleet.clone(), format!("resume {id}")));
    }
    for id in open {
        if !fleet.remote_pauses.0.lock().contains_key(&id) {
            tokio::spawn(follow_pause(fleet.clone(), format!("pause {id}")));
        }
    }
}

async fn hold(fleet: &Arc<Fleet>, id: i64) -> Result<(), CatalogError> {
    let me = fleet.router_id.get().unwrap_or(0);
    let Some(row) = sqlx::query(sqlx::AssertSqlSafe(format!(
        "SELECT p.tenant, p.origin, p.ended_at IS NOT NULL AS ended,
                greatest(extract(epoch FROM p.expires_at - now()), 0)::float8 AS left_s,
                EXISTS (SELECT 1 FROM routers r WHERE r.id = p.origin AND {}) AS origin_live
           FROM move_pauses p WHERE p.id = $1",
        *LIVE
    )))
    .bind(id)
    .fetch_optional(fleet.catalog.pool())
    .await?
    else {
        return Ok(());
    };
    let tenant: String = row.try_get("tenant")?;
    let origin: i32 = row.try_get("origin")?;
    let left = Duration::from_secs_f64(row.try_get::<f64, _>("left_s")?);
    // A pause of a router that is gone is not held: whoever recovers its job ends it.
    if origin == me
        || row.try_get::<bool, _>("ended")?
        || left.is_zero()
        || !row.try_get::<bool, _>("origin_live")?
    {
        return Ok(());
    }
    let gate = fleet.proxy.gates.get(&tenant);
    let ours = {
        let mut held = fleet.remote_pauses.0.lock();
        if held.contains_key(&id) {
            return Ok(());
        }
        let ours = !gate.is_paused();
        if ours {
            gate.pause("a live move");
            held.insert(id, tenant.clone());
        }
        ours
    };
    tracing::info!(pause = id, %tenant, router = origin, "holding the tenant for a live move on another router");
    let until = Instant::now() + left;
    let drained = gate.drained(until).await;
    sqlx::query(
        "INSERT INTO move_pause_acks (pause, router, drained) VALUES ($1, $2, $3)
         ON CONFLICT (pause, router) DO UPDATE SET drained = EXCLUDED.drained, at = now()",
    )
    .bind(id)
    .bind(me)
    .bind(drained)
    .execute(fleet.catalog.pool())
    .await?;
    // An end that came while this pause was being taken found nothing to release.
    let ended: bool =
        sqlx::query_scalar("SELECT ended_at IS NOT NULL FROM move_pauses WHERE id = $1")
            .bind(id)
            .fetch_optional(fleet.catalog.pool())
            .await?
            .unwrap_or(true);
    if ended {
        return release(fleet, id).await;
    }
    if ours {
        // The mover's end normally comes first; this is the safety net if it never does.
        let fleet = fleet.clone();
        tokio::spawn(async move {
            tokio::time::sleep_until(until).await;
            if fleet.remote_pauses.0.lock().remove(&id).is_some() {
                tracing::warn!(pause = id, %tenant, "a live move's pause expired without its end; resuming the tenant here");
                let _ = fleet.reload_routes().await;
                fleet.proxy.gates.get(&tenant).resume();
            }
        });
    }
    Ok(())
}

async fn release(fleet: &Arc<Fleet>, id: i64) -> Result<(), CatalogError> {
    let version: Option<i64> =
        sqlx::query_scalar("SELECT route_version FROM move_pauses WHERE id = $1")
            .bind(id)
            .fetch_optional(fleet.catalog.pool())
            .await?
            .flatten();
    let Some(tenant) = fleet.remote_pauses.0.lock().get(&id).cloned() else {
        return Ok(());
    };
    if let Some(v) = version {
        // Invariant 4 here too: held clients go on only with the switched route. Without it
        // they stay held; the pause's expiry reloads and lets them go.
        let current = |f: &Fleet| f.table.load().tenants.get(&tenant).map(|t| t.route_version);
        for attempt in 0..3 {
            if current(fleet).is_some_and(|c| c >= v) {
                break;
            }
            if attempt > 0 {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            if let Err(e) = fleet.reload_routes().await {
                tracing::warn!(pause = id, "cannot load the switched route: {}", e.message);
            }
        }
        if current(fleet).is_none_or(|c| c < v) {
            tracing::warn!(pause = id, %tenant, "the switched route did not load; holding the tenant until the pause expires");
            return Ok(());
        }
    }
    if fleet.remote_pauses.0.lock().remove(&id).is_some() {
        fleet.proxy.gates.get(&tenant).resume();
        tracing::info!(pause = id, %tenant, "released the tenant after a live move on another router");
    }
    Ok(())
}
