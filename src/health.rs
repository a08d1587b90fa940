//! Pod health. A monitor task ([`monitor`], spawned by `service::start`) probes every pod's
//! primary and replicas about once a second over long-lived admin connections and publishes
//! what it saw as one immutable [`HealthSnapshot`] through `ArcSwap` ([`HealthBoard`], held
//! by the proxy). `GET /v1/pods` and read-only routing (`routing::replica`) read the snapshot;
//! nothing probes per request or per checkout.
//!
//! After each round the monitor looks for a pod whose primary is down (or in recovery) while
//! exactly one of its replicas — one it saw in recovery before — no longer is: a promotion
//! done elsewhere (Patroni, an operator's `pg_promote()`). The router then follows it through
//! the catalog ([`crate::failover`]). A replica never seen in recovery is never followed, so
//! an old primary that comes back as a primary after a failover cannot take the route back.

use crate::config::{parse_pg_url, redact, PgEndpoint, ReplicaLag};
use crate::fleet::Fleet;
use crate::podadmin;
use arc_swap::ArcSwap;
use serde::Serialize;
use sqlx::{Connection, PgConnection, Row};
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// Time between the starts of two probe rounds.
pub const PROBE_INTERVAL: Duration = Duration::from_secs(1);
/// How long one server may take to answer a probe (connecting included) before it is down.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(2);
/// A snapshot older than this (a stuck monitor) is not trusted for routing reads.
pub const STALE_AFTER: Duration = Duration::from_secs(5);

/// One query for both roles: whether the server is in recovery, its WAL position (current on
/// a primary, replayed on a standby), what a standby has received, and how long a standby
/// with received-but-unreplayed WAL has been behind (0 when it replayed all it received).
const PROBE_SQL: &str = "SELECT pg_is_in_recovery() AS in_recovery,
       (CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn() ELSE pg_current_wal_lsn() END
         - '0/0'::pg_lsn)::int8 AS lsn,
       (pg_last_wal_receive_lsn() - '0/0'::pg_lsn)::int8 AS receive_lsn,
       (CASE WHEN NOT pg_is_in_recovery()
                  OR pg_last_wal_receive_lsn() <= pg_last_wal_replay_lsn() THEN 0
             ELSE coalesce(extract(epoch FROM now() - pg_last_xact_replay_timestamp()), 0)
        END)::float8 AS replay_delay";

/// What a server answered to a probe.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Reading {
    pub in_recovery: bool,
    /// The current WAL position on a primary; the replayed one on a server in recovery.
    pub lsn: u64,
    /// What a standby has received (None when it never streamed).
    pub receive_lsn: Option<u64>,
    /// Seconds a standby is behind with WAL it received but has not replayed yet.
    pub replay_delay: f64,
}

/// One server of a pod as last probed.
#[derive(Debug, Clone, PartialEq)]
pub struct NodeHealth {
    /// The server's admin URL (may hold a password: [`redact`] it before showing it).
    pub url: String,
    pub endpoint: Option<PgEndpoint>,
    /// What it answered, or why it did not.
    pub reading: Result<Reading, String>,
    /// A standby's distance behind: WAL bytes behind the primary's current position, or,
    /// while the primary does not answer, received but not yet replayed.
    pub lag_bytes: Option<u64>,
}

impl NodeHealth {
    fn new(url: &str, reading: Result<Reading, String>, lag_bytes: Option<u64>) -> NodeHealth {
        NodeHealth {
            url: url.to_owned(),
            endpoint: parse_pg_url(url).ok(),
            reading,
            lag_bytes,
        }
    }

    pub fn in_recovery(&self) -> Option<bool> {
        self.reading.as_ref().ok().map(|r| r.in_recovery)
    }

    /// As a pod's primary: "up", "up (in recovery)" (it cannot take writes), or "down: why".
    pub fn primary_status(&self) -> String {
        match &self.reading {
            Ok(r) if r.in_recovery => "up (in recovery)".into(),
            Ok(_) => "up".into(),
            Err(why) => format!("down: {why}"),
        }
    }

    /// As a replica: "up", "up (not in recovery)" (promoted, or not a standby: it serves no
    /// reads), or "down: why".
    pub fn replica_status(&self) -> String {
        match &self.reading {
            Ok(r) if !r.in_recovery => "up (not in recovery)".into(),
            Ok(_) => "up".into(),
            Err(why) => format!("down: {why}"),
        }
    }

    pub fn lag_seconds(&self) -> Option<f64> {
        match &self.reading {
            Ok(r) if r.in_recovery => Some(r.replay_delay),
            _ => None,
        }
    }

    /// Fit to serve reads: answered, in recovery, and within `bound`.
    pub fn readable(&self, bound: ReplicaLag) -> bool {
        match (&self.reading, bound) {
            (Ok(r), ReplicaLag::Time(max)) if r.in_recovery => r.replay_delay <= max.as_secs_f64(),
            (Ok(r), ReplicaLag::Bytes(max)) if r.in_recovery => {
                self.lag_bytes.is_some_and(|lag| lag <= max)
            }
            _ => false,
        }
    }
}

/// A replica as `GET /v1/pods` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct ReplicaView {
    /// The replica's URL with any password redacted.
    pub url: String,
    pub health: String,
    pub lag_bytes: Option<u64>,
    pub lag_seconds: Option<f64>,
}

impl From<&NodeHealth> for ReplicaView {
    fn from(n: &NodeHealth) -> Self {
        ReplicaView {
            url: redact(&n.url),
            health: n.replica_status(),
            lag_bytes: n.lag_bytes,
            lag_seconds: n.lag_seconds(),
        }
    }
}

/// A pod's servers as last probed.
#[derive(Debug, Clone, PartialEq)]
pub struct PodHealth {
    pub primary: NodeHealth,
    pub replicas: Vec<NodeHealth>,
}

impl PodHealth {
    /// Whether this was probed with the servers `servers` lists (the catalog may have
    /// changed since, e.g. by a failover).
    pub fn describes(&self, servers: &PodServers) -> bool {
        self.primary.url == servers.primary
            && self.replicas.len() == servers.replicas.len()
            && self
                .replicas
                .iter()
                .zip(&servers.replicas)
                .all(|(h, u)| h.url == *u)
    }
}

/// Every pod's health from one probe round.
#[derive(Debug, Default)]
pub struct HealthSnapshot {
    /// When the round finished; None before the first one.
    pub taken: Option<Instant>,
    pub pods: HashMap<String, PodHealth>,
}

impl HealthSnapshot {
    /// Whether the round is recent enough to route by.
    pub fn fresh(&self) -> bool {
        self.taken.is_some_and(|t| t.elapsed() < STALE_AFTER)
    }
}

/// The published health snapshot. Replace order: the monitor builds a complete snapshot from
/// one round, then stores it; readers load it whole and never see half a round.
#[derive(Default)]
pub struct HealthBoard {
    snapshot: ArcSwap<HealthSnapshot>,
    /// Serialises route switches in this router (an admin failover and following a promotion
    /// elsewhere); held across the switch, never on the hot path.
    pub(crate) switching: tokio::sync::Mutex<()>,
}

impl HealthBoard {
    pub fn load(&self) -> arc_swap::Guard<Arc<HealthSnapshot>> {
        self.snapshot.load()
    }

    pub fn publish(&self, snapshot: HealthSnapshot) {
        self.snapshot.store(Arc::new(snapshot));
    }
}

/// A pod's servers as the catalog (or the routing table) lists them, by admin URL.
#[derive(Debug, Clone)]
pub struct PodServers {
    pub name: String,
    pub primary: String,
    pub replicas: Vec<String>,
}

// === probes ===

async fn read(conn: &mut PgConnection) -> Result<Reading, sqlx::Error> {
    let row = sqlx::query(PROBE_SQL).fetch_one(conn).await?;
    let lsn: Option<i64> = row.try_get("lsn")?;
    let receive: Option<i64> = row.try_get("receive_lsn")?;
    Ok(Reading {
        in_recovery: row.try_get("in_recovery")?,
        lsn: lsn.unwrap_or(0) as u64,
        receive_lsn: receive.map(|l| l as u64),
        replay_delay: row.try_get("replay_delay")?,
    })
}

/// Probes one server, over `conn` when one is kept from the last round. Returns what it saw
/// and the connection to keep (none after a failure: the next round reconnects).
pub async fn probe(
    url: &str,
    conn: Option<PgConnection>,
) -> (Result<Reading, String>, Option<PgConnection>) {
    let attempt = async {
        let mut c = match conn {
            Some(c) => c,
            None => podadmin::connect(url, None).await?,
        };
        let reading = read(&mut c).await?;
        Ok::<_, sqlx::Error>((reading, c))
    };
    match tokio::time::timeout(PROBE_TIMEOUT, attempt).await {
        Ok(Ok((reading, c))) => (Ok(reading), Some(c)),
        Ok(Err(e)) => (Err(podadmin::short(&e)), None),
        Err(_) => (Err(format!("no answer within {PROBE_TIMEOUT:?}")), None),
    }
}

/// Probes every server of `pods` at once, reusing the connections in `conns` and leaving
/// the working ones there; then works out each replica's lag against its primary.
pub async fn probe_pods(
    pods: &[PodServers],
    conns: &mut HashMap<String, PgConnection>,
) -> HashMap<String, PodHealth> {
    let urls: HashSet<&String> = pods
        .iter()
        .flat_map(|p| std::iter::once(&p.primary).chain(&p.replicas))
        .collect();
    let mut probes = tokio::task::JoinSet::new();
    for url in urls {
        let (url, conn) = (url.clone(), conns.remove(url));
        probes.spawn(async move {
            let (reading, conn) = probe(&url, conn).await;
            (url, reading, conn)
        });
    }
    let mut readings = HashMap::new();
    while let Some(done) = probes.join_next().await {
        if let Ok((url, reading, conn)) = done {
            if let Some(c) = conn {
                conns.insert(url.clone(), c);
            }
            readings.insert(url, reading);
        }
    }
    pods.iter()
        .map(|p| (p.name.clone(), assemble(p, &readings)))
        .collect()
}

/// Probes `pods` once over fresh connections, closed afterwards.
pub async fn probe_pods_now(pods: &[PodServers]) -> HashMap<String, PodHealth> {
    let mut conns = HashMap::new();
    let health = probe_pods(pods, &mut conns).await;
    close_all(conns).await;
    health
}

async fn close_all(conns: HashMap<String, PgConnection>) {
    for (_, c) in conns {
        let _ = tokio::time::timeout(Duration::from_millis(500), c.close()).await;
    }
}

fn assemble(pod: &PodServers, readings: &HashMap<String, Result<Reading, String>>) -> PodHealth {
    let get = |url: &str| {
        readings
            .get(url)
            .cloned()
            .unwrap_or_else(|| Err("not probed".into()))
    };
    let primary = NodeHealth::new(&pod.primary, get(&pod.primary), None);
    let primary_lsn = match primary.reading {
        Ok(r) if !r.in_recovery => Some(r.lsn),
        _ => None,
    };
    let replicas = pod
        .replicas
        .iter()
        .map(|url| {
            let reading = get(url);
            let lag = match &reading {
                Ok(r) if r.in_recovery => Some(match primary_lsn {
                    Some(p) => p.saturating_sub(r.lsn),
                    None => r.receive_lsn.unwrap_or(r.lsn).saturating_sub(r.lsn),
                }),
                _ => None,
            };
            NodeHealth::new(url, reading, lag)
        })
        .collect();
    PodHealth { primary, replicas }
}

// === monitor ===

/// The replica of `pod` to follow: the primary does not take writes, and exactly one replica
/// that was seen in recovery (`standbys`) now answers out of recovery.
fn promoted_replica<'h>(pod: &'h PodHealth, standbys: &HashSet<String>) -> Promotion<'h> {
    if pod.primary.in_recovery() == Some(false) {
        return Promotion::None;
    }
    let promoted: Vec<&NodeHealth> = pod
        .replicas
        .iter()
        .filter(|r| r.in_recovery() == Some(false) && standbys.contains(&r.url))
        .collect();
    match promoted.as_slice() {
        [] => Promotion::None,
        [one] => Promotion::One(&one.url),
        _ => Promotion::Ambiguous,
    }
}

enum Promotion<'h> {
    None,
    One(&'h str),
    Ambiguous,
}

/// Probes every pod about once a second until `shutdown`, publishes each round on the
/// proxy's [`HealthBoard`], and follows promotions done elsewhere.
pub async fn monitor(fleet: Arc<Fleet>, shutdown: CancellationToken) {
    let mut conns: HashMap<String, PgConnection> = HashMap::new();
    // Per pod: replicas seen in recovery, and whether an ambiguous promotion was reported.
    let mut standbys: HashMap<String, HashSet<String>> = HashMap::new();
    let mut warned: HashSet<String> = HashSet::new();
    let mut tick = tokio::time::interval(PROBE_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tick.tick() => {}
        }
        let pods = servers_of(&fleet.table.load());
        let round = tokio::select! {
            _ = shutdown.cancelled() => break,
            round = probe_pods(&pods, &mut conns) => round,
        };
        conns.retain(|url, _| {
            pods.iter()
                .any(|p| p.primary == *url || p.replicas.contains(url))
        });
        standbys.retain(|pod, _| round.contains_key(pod));
        let mut follow = Vec::new();
        for pod in &pods {
            let health = &round[&pod.name];
            let seen = standbys.entry(pod.name.clone()).or_default();
            match promoted_replica(health, seen) {
                Promotion::One(url) => follow.push((pod.clone(), url.to_owned())),
                Promotion::Ambiguous => {
                    if warned.insert(pod.name.clone()) {
                        tracing::error!(pod = %pod.name, "the primary is down and more than one replica is out of recovery; not following either: fail over explicitly with POST /v1/pods/{}/failover {{\"to\": ...}}", pod.name);
                    }
                }
                Promotion::None => {
                    warned.remove(&pod.name);
                }
            }
            seen.retain(|url| pod.replicas.contains(url));
            for r in &health.replicas {
                if r.in_recovery() == Some(true) {
                    seen.insert(r.url.clone());
                }
            }
        }
        fleet.proxy.health.publish(HealthSnapshot {
            taken: Some(Instant::now()),
            pods: round,
        });
        for (pod, promoted) in follow {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = crate::failover::follow_promotion(&fleet, &pod, &promoted) => {}
            }
        }
    }
    close_all(conns).await;
}

/// The servers of every pod in a routing table.
pub fn servers_of(table: &crate::routing::RoutingTable) -> Vec<PodServers> {
    table
        .pods
        .values()
        .map(|p| PodServers {
            name: p.name.clone(),
            primary: p.admin_url.clone(),
            replicas: p.replicas.clone(),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reading(in_recovery: bool, lsn: u64, receive: Option<u64>, delay: f64) -> Reading {
        Reading {
            in_recovery,
            lsn,
            receive_lsn: receive,
            replay_delay: delay,
        }
    }

    fn pod(replicas: &[&str]) -> PodServers {
        PodServers {
            name: "a".into(),
            primary: "postgres://su@127.0.0.1:5001".into(),
            replicas: replicas.iter().map(|r| r.to_string()).collect(),
        }
    }

    const R1: &str = "postgres://su@127.0.0.1:5002";
    const R2: &str = "postgres://su@127.0.0.1:5003";

    #[test]
    fn lag_is_measured_against_the_primary_or_what_was_received() {
        let p = pod(&[R1, R2]);
        let mut readings = HashMap::from([
            (p.primary.clone(), Ok(reading(false, 1000, None, 0.0))),
            (R1.to_owned(), Ok(reading(true, 900, Some(950), 2.5))),
            (R2.to_owned(), Err("connection refused".to_owned())),
        ]);
        let h = assemble(&p, &readings);
        assert_eq!(h.primary.primary_status(), "up");
        assert_eq!(h.replicas[0].lag_bytes, Some(100));
        assert_eq!(h.replicas[0].lag_seconds(), Some(2.5));
        assert_eq!(h.replicas[1].replica_status(), "down: connection refused");
        assert!(h.replicas[0].readable(ReplicaLag::Bytes(100)));
        assert!(!h.replicas[0].readable(ReplicaLag::Bytes(99)));
        assert!(h.replicas[0].readable(ReplicaLag::Time(Duration::from_secs(3))));
        assert!(!h.replicas[0].readable(ReplicaLag::Time(Duration::from_secs(2))));
        assert!(!h.replicas[1].readable(ReplicaLag::Time(Duration::from_secs(60))));
        assert!(h.describes(&p));
        assert!(!h.describes(&pod(&[R2, R1])));

        // Primary down: what the replica received but has not replayed.
        readings.insert(p.primary.clone(), Err("gone".into()));
        let h = assemble(&p, &readings);
        assert_eq!(h.replicas[0].lag_bytes, Some(50));
        assert_eq!(h.primary.primary_status(), "down: gone");
    }

    #[test]
    fn follows_only_a_single_replica_seen_in_recovery() {
        let check = |primary: Result<Reading, String>,
                     replicas: [Result<Reading, String>; 2],
                     seen: &[&str],
                     want: Option<&str>| {
            let p = pod(&[R1, R2]);
            let [a, b] = replicas;
            let readings = HashMap::from([
                (p.primary.clone(), primary),
                (R1.to_owned(), a),
                (R2.to_owned(), b),
            ]);
            let h = assemble(&p, &readings);
            let seen = seen.iter().map(|s| s.to_string()).collect();
            let got = match promoted_replica(&h, &seen) {
                Promotion::One(u) => Some(u.to_owned()),
                Promotion::None => None,
                Promotion::Ambiguous => Some("ambiguous".into()),
            };
            assert_eq!(got.as_deref(), want);
        };
        let down = || Err::<Reading, String>("down".into());
        let primary = || Ok(reading(false, 10, None, 0.0));
        let standby = || Ok(reading(true, 10, Some(10), 0.0));
        let promoted = || Ok(reading(false, 10, None, 0.0));
        check(down(), [promoted(), standby()], &[R1, R2], Some(R1));
        check(primary(), [promoted(), standby()], &[R1, R2], None);
        check(down(), [promoted(), standby()], &[R2], None);
        check(
            down(),
            [promoted(), promoted()],
            &[R1, R2],
            Some("ambiguous"),
        );
        check(down(), [standby(), down()], &[R1, R2], None);
        // A primary that came back in recovery takes no writes either.
        check(standby(), [standby(), promoted()], &[R2], Some(R2));
    }
}
