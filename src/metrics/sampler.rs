//! The pod sampler: every `metrics.sample_every` it reads each pod primary's statistics —
//! transactions per second per database from `pg_stat_database` deltas, the cache hit ratio,
//! backends against max_connections, replication lag from `pg_stat_replication`, and (every
//! `metrics.size_every`) database sizes — plus host CPU, memory and disk from the pod's
//! node_exporter when it lists one, and the router's own load per tenant (server busy
//! seconds per second over `metrics.load_window`). Each round is published whole as a
//! [`FleetSample`] through `ArcSwap` ([`SampleBoard`]), which `/metrics` and the planner read.
//!
//! It keeps one admin connection per pod primary of its own rather than borrowing the
//! health monitor's: the monitor must answer within its 2 s probe timeout to follow a
//! promotion, and `pg_database_size` on a large pod can take longer than that. Replica lag
//! as the replicas see it stays the health monitor's ([`crate::health`]); this reads it from
//! the primary's side, which also shows the subscriptions of live moves.

use crate::fleet::Fleet;
use crate::podadmin;
use arc_swap::ArcSwap;
use prometheus::proto::MetricFamily;
use sqlx::{Connection, PgConnection, Row};
use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// How long one pod's round may take before it counts as failed.
const POD_TIMEOUT: Duration = Duration::from_secs(10);
const EXPORTER_TIMEOUT: Duration = Duration::from_secs(3);

/// One pod as last sampled.
#[derive(Debug, Clone, Default)]
pub struct PodSample {
    /// Why the pod's primary could not be read this round (the rest is then empty).
    pub error: Option<String>,
    /// Commits + rollbacks per second, all databases (None on the first round).
    pub xact_rate: Option<f64>,
    /// Blocks found in shared buffers / blocks read, since the last round.
    pub cache_hit_ratio: Option<f64>,
    pub backends: u64,
    pub max_connections: u64,
    pub databases: HashMap<String, DbSample>,
    pub replication: Vec<ReplicationSample>,
    /// From node_exporter, when the pod lists one.
    pub host: Option<HostSample>,
}

impl PodSample {
    /// Bytes of all databases whose size is known.
    pub fn size_bytes(&self) -> u64 {
        self.databases.values().filter_map(|d| d.size_bytes).sum()
    }
}

#[derive(Debug, Clone, Default)]
pub struct DbSample {
    pub xact_total: u64,
    pub xact_rate: Option<f64>,
    pub backends: u64,
    /// pg_database_size, refreshed every `metrics.size_every`.
    pub size_bytes: Option<u64>,
}

#[derive(Debug, Clone)]
pub struct ReplicationSample {
    /// application_name: a replica's name, or a move's subscription.
    pub name: String,
    pub lag_bytes: Option<u64>,
    pub lag_seconds: Option<f64>,
}

#[derive(Debug, Clone, Default)]
pub struct HostSample {
    pub error: Option<String>,
    pub cpu_utilisation: Option<f64>,
    pub memory_available_bytes: Option<f64>,
    pub memory_total_bytes: Option<f64>,
    pub filesystems: Vec<Filesystem>,
}

impl HostSample {
    /// The size of the filesystem mounted at `/`, else of the largest one.
    pub fn disk_size_bytes(&self) -> Option<u64> {
        self.filesystems
            .iter()
            .find(|f| f.mountpoint == "/")
            .or_else(|| {
                self.filesystems
                    .iter()
                    .max_by(|a, b| a.size.total_cmp(&b.size))
            })
            .map(|f| f.size as u64)
    }
}

#[derive(Debug, Clone)]
pub struct Filesystem {
    pub mountpoint: String,
    pub avail: f64,
    pub size: f64,
}

/// Every pod from one round, and the router's load per tenant.
#[derive(Debug, Default)]
pub struct FleetSample {
    pub taken: Option<Instant>,
    pub pods: HashMap<String, PodSample>,
    /// Server busy seconds per second per tenant, over `metrics.load_window` (or since the
    /// router started, when that is shorter).
    pub tenant_load: HashMap<String, f64>,
    /// How many seconds `tenant_load` covers.
    pub load_window: f64,
    /// Each tenant's pod when the round ran.
    pub tenants: HashMap<String, String>,
}

/// The published sample. Replace order: a round builds a complete [`FleetSample`], then
/// stores it; readers load it whole.
#[derive(Default)]
pub struct SampleBoard {
    snapshot: ArcSwap<FleetSample>,
    /// Wakes whoever waits for the next round (the autopilot, tests).
    pub rounds: tokio::sync::Notify,
}

impl SampleBoard {
    pub fn load(&self) -> arc_swap::Guard<Arc<FleetSample>> {
        self.snapshot.load()
    }

    pub fn load_full(&self) -> Arc<FleetSample> {
        self.snapshot.load_full()
    }

    pub fn publish(&self, s: FleetSample) {
        self.snapshot.store(Arc::new(s));
        self.rounds.notify_waiters();
    }
}

// === one pod ===

/// What a round keeps for the next one: counters to take deltas of, sizes, connections.
#[derive(Default)]
struct PodState {
    at: Option<Instant>,
    xacts: HashMap<String, u64>,
    blocks: (u64, u64),
    sizes: HashMap<String, u64>,
    sized_at: Option<Instant>,
    cpu: Option<(f64, f64)>,
}

struct PodTarget {
    name: String,
    url: String,
    exporter: Option<String>,
}

async fn read_pod(
    conn: &mut PgConnection,
    state: &mut PodState,
    size_every: Duration,
) -> Result<PodSample, sqlx::Error> {
    let now = Instant::now();
    let rows = sqlx::query(
        "SELECT datname, numbackends::int8 AS backends, (xact_commit + xact_rollback)::int8 AS xacts,
                blks_hit::int8 AS hit, blks_read::int8 AS read,
                current_setting('max_connections')::int8 AS max_connections
           FROM pg_stat_database WHERE datname IS NOT NULL",
    )
    .fetch_all(&mut *conn)
    .await?;
    let dt = state.at.map(|t| now.duration_since(t).as_secs_f64());
    let mut s = PodSample::default();
    let (mut hit, mut read, mut xacts, mut prev_xacts) = (0u64, 0u64, 0u64, 0u64);
    let mut seen = HashMap::new();
    for r in &rows {
        let name: String = r.try_get("datname")?;
        let x = r.try_get::<i64, _>("xacts")? as u64;
        let backends = r.try_get::<i64, _>("backends")? as u64;
        hit += r.try_get::<i64, _>("hit")? as u64;
        read += r.try_get::<i64, _>("read")? as u64;
        s.max_connections = r.try_get::<i64, _>("max_connections")? as u64;
        s.backends += backends;
        let prev = state.xacts.get(&name).copied();
        xacts += x;
        prev_xacts += prev.unwrap_or(x);
        let xact_rate = match (prev, dt) {
            (Some(p), Some(dt)) if dt > 0.0 => Some(x.saturating_sub(p) as f64 / dt),
            _ => None,
        };
        seen.insert(name.clone(), x);
        s.databases.insert(
            name,
            DbSample {
                xact_total: x,
                xact_rate,
                backends,
                size_bytes: None,
            },
        );
    }
    if let Some(dt) = dt.filter(|dt| *dt > 0.0) {
        s.xact_rate = Some(xacts.saturating_sub(prev_xacts) as f64 / dt);
        let (dh, dr) = (
            hit.saturating_sub(state.blocks.0),
            read.saturating_sub(state.blocks.1),
        );
        s.cache_hit_ratio = (dh + dr > 0).then(|| dh as f64 / (dh + dr) as f64);
    }
    if s.cache_hit_ratio.is_none() && hit + read > 0 {
        s.cache_hit_ratio = Some(hit as f64 / (hit + read) as f64);
    }
    state.xacts = seen;
    state.blocks = (hit, read);
    state.at = Some(now);

    s.replication = sqlx::query(
        "SELECT coalesce(application_name, '') AS name,
                CASE WHEN pg_is_in_recovery() THEN NULL
                     ELSE (pg_current_wal_lsn() - replay_lsn)::int8 END AS lag_bytes,
                extract(epoch FROM replay_lag)::float8 AS lag_seconds
           FROM pg_stat_replication ORDER BY 1",
    )
    .fetch_all(&mut *conn)
    .await?
    .iter()
    .map(|r| {
        Ok::<_, sqlx::Error>(ReplicationSample {
            name: r.try_get("name")?,
            lag_bytes: r
                .try_get::<Option<i64>, _>("lag_bytes")?
                .map(|b| b.max(0) as u64),
            lag_seconds: r.try_get("lag_seconds")?,
        })
    })
    .collect::<Result<_, _>>()?;

    if state
        .sized_at
        .is_none_or(|t| now.duration_since(t) >= size_every)
    {
        let sizes = sqlx::query(
            "SELECT datname, pg_database_size(oid)::int8 AS bytes FROM pg_database
              WHERE datallowconn AND NOT datistemplate",
        )
        .fetch_all(&mut *conn)
        .await;
        match sizes {
            Ok(rows) => {
                state.sizes = rows
                    .iter()
                    .filter_map(|r| {
                        Some((
                            r.try_get("datname").ok()?,
                            r.try_get::<i64, _>("bytes").ok()? as u64,
                        ))
                    })
                    .collect();
                state.sized_at = Some(now);
            }
            // A database dropped between the list and its size (a move cleaning up): next time.
            Err(e) => tracing::debug!("database sizes: {e}"),
        }
    }
    for (name, db) in s.databases.iter_mut() {
        db.size_bytes = state.sizes.get(name).copied();
    }
    Ok(s)
}

async fn sample_pod(
    target: &PodTarget,
    conn: Option<PgConnection>,
    state: &mut PodState,
    size_every: Duration,
    http: &reqwest::Client,
) -> (PodSample, Option<PgConnection>) {
    let attempt = async {
        let mut c = match conn {
            Some(c) => c,
            None => podadmin::connect(&target.url, None).await?,
        };
        let s = read_pod(&mut c, state, size_every).await?;
        Ok::<_, sqlx::Error>((s, c))
    };
    let (mut sample, conn) = match tokio::time::timeout(POD_TIMEOUT, attempt).await {
        Ok(Ok((s, c))) => (s, Some(c)),
        Ok(Err(e)) => (
            PodSample {
                error: Some(podadmin::short(&e)),
                ..PodSample::default()
            },
            None,
        ),
        Err(_) => (
            PodSample {
                error: Some(format!("no answer within {POD_TIMEOUT:?}")),
                ..PodSample::default()
            },
            None,
        ),
    };
    if let Some(url) = &target.exporter {
        sample.host = Some(read_exporter(http, url, &mut state.cpu).await);
    }
    (sample, conn)
}

// === node_exporter ===

async fn read_exporter(
    http: &reqwest::Client,
    url: &str,
    cpu: &mut Option<(f64, f64)>,
) -> HostSample {
    let text = async {
        http.get(url)
            .timeout(EXPORTER_TIMEOUT)
            .send()
            .await?
            .error_for_status()?
            .text()
            .await
    };
    match text.await {
        Ok(t) => host_from_text(&t, cpu),
        Err(e) => HostSample {
            error: Some(format!("node_exporter at {url}: {e}")),
            ..HostSample::default()
        },
    }
}

/// A metric's labels as (name, value) pairs.
type Labels = Vec<(String, String)>;

/// One sample line of the Prometheus text format: name, labels, value.
fn parse_line(line: &str) -> Option<(&str, Labels, f64)> {
    let line = line.trim();
    if line.is_empty() || line.starts_with('#') {
        return None;
    }
    let name_end = line.find(['{', ' ', '\t']).unwrap_or(line.len());
    let name = &line[..name_end];
    let mut rest = &line[name_end..];
    let mut labels = Vec::new();
    if let Some(body) = rest.strip_prefix('{') {
        let mut chars = body.char_indices();
        let mut key = String::new();
        let end = loop {
            let (i, c) = chars.next()?;
            match c {
                '}' => break i,
                ',' | ' ' => {}
                '=' => {
                    if chars.next()?.1 != '"' {
                        return None;
                    }
                    let mut value = String::new();
                    loop {
                        match chars.next()?.1 {
                            '"' => break,
                            '\\' => match chars.next()?.1 {
                                'n' => value.push('\n'),
                                c => value.push(c),
                            },
                            c => value.push(c),
                        }
                    }
                    labels.push((std::mem::take(&mut key), value));
                }
                c => key.push(c),
            }
        };
        rest = &body[end + 1..];
    }
    let value = rest.split_whitespace().next()?.parse().ok()?;
    Some((name, labels, value))
}

/// Filesystems that hold no data directory.
const PSEUDO_FS: &[&str] = &[
    "tmpfs",
    "devtmpfs",
    "squashfs",
    "proc",
    "sysfs",
    "nsfs",
    "ramfs",
    "autofs",
    "fuse.lxcfs",
];

/// Host figures from a node_exporter page; `cpu` carries (busy, total) CPU seconds between
/// calls so the utilisation is over the interval.
pub fn host_from_text(text: &str, cpu: &mut Option<(f64, f64)>) -> HostSample {
    let mut h = HostSample::default();
    let (mut idle, mut total) = (0.0, 0.0);
    let mut fs: BTreeMap<String, (Option<f64>, Option<f64>)> = BTreeMap::new();
    for (name, labels, value) in text.lines().filter_map(parse_line) {
        let get = |k: &str| labels.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
        match name {
            "node_cpu_seconds_total" => {
                total += value;
                if matches!(get("mode"), Some("idle" | "iowait")) {
                    idle += value;
                }
            }
            "node_memory_MemAvailable_bytes" => h.memory_available_bytes = Some(value),
            "node_memory_MemTotal_bytes" => h.memory_total_bytes = Some(value),
            "node_filesystem_avail_bytes" | "node_filesystem_size_bytes" => {
                if PSEUDO_FS.contains(&get("fstype").unwrap_or("")) {
                    continue;
                }
                let Some(mount) = get("mountpoint") else {
                    continue;
                };
                let e = fs.entry(mount.to_owned()).or_default();
                if name == "node_filesystem_avail_bytes" {
                    e.0 = Some(value);
                } else {
                    e.1 = Some(value);
                }
            }
            _ => {}
        }
    }
    if total > 0.0 {
        let busy = total - idle;
        if let Some((b0, t0)) = *cpu {
            if total > t0 {
                h.cpu_utilisation = Some(((busy - b0) / (total - t0)).clamp(0.0, 1.0));
            }
        }
        *cpu = Some((busy, total));
    }
    h.filesystems = fs
        .into_iter()
        .filter_map(|(mountpoint, (avail, size))| {
            Some(Filesystem {
                mountpoint,
                avail: avail?,
                size: size?,
            })
        })
        .collect();
    h
}

// === the loop ===

/// The router's busy time per tenant over time, for load rates over a window.
struct LoadHistory {
    points: VecDeque<(Instant, HashMap<String, Duration>)>,
}

impl LoadHistory {
    fn new() -> LoadHistory {
        LoadHistory {
            points: VecDeque::from([(Instant::now(), HashMap::new())]),
        }
    }

    /// Adds the current totals; returns (rates, seconds covered).
    fn push(
        &mut self,
        now: Instant,
        busy: HashMap<String, Duration>,
        window: Duration,
    ) -> (HashMap<String, f64>, f64) {
        // Keep the newest point at or before the window's start, so rates cover all of it.
        while self.points.len() > 1 && now.duration_since(self.points[1].0) >= window {
            self.points.pop_front();
        }
        let (t0, old) = self.points.front().expect("never empty");
        let dt = now.duration_since(*t0).as_secs_f64();
        let rates = busy
            .iter()
            .map(|(t, b)| {
                let before = old.get(t).copied().unwrap_or_default();
                let rate = if dt > 0.0 {
                    b.saturating_sub(before).as_secs_f64() / dt
                } else {
                    0.0
                };
                (t.clone(), rate)
            })
            .collect();
        self.points.push_back((now, busy));
        (rates, dt)
    }
}

fn targets(fleet: &Fleet) -> Vec<PodTarget> {
    let config = fleet.config.load();
    let table = fleet.table.load();
    let mut out: Vec<PodTarget> = table
        .pods
        .values()
        .map(|p| PodTarget {
            name: p.name.clone(),
            url: p.admin_url.clone(),
            exporter: config
                .pods
                .iter()
                .find(|c| c.name == p.name)
                .and_then(|c| c.node_exporter.clone()),
        })
        .collect();
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
}

/// Samples every pod each `metrics.sample_every` until `shutdown`, publishing each round
/// on `fleet.metrics.samples`.
pub async fn run(fleet: Arc<Fleet>, shutdown: CancellationToken) {
    let mut conns: HashMap<String, PgConnection> = HashMap::new();
    let mut states: HashMap<String, PodState> = HashMap::new();
    let mut history = LoadHistory::new();
    let http = reqwest::Client::new();
    loop {
        let (every, size_every, window) = {
            let m = &fleet.config.load().metrics;
            (m.sample_every.0, m.size_every.0, m.load_window.0)
        };
        let started = Instant::now();
        let pods = targets(&fleet);
        let round = async {
            let mut jobs = Vec::new();
            for t in &pods {
                let conn = conns.remove(&t.url);
                let mut state = states.remove(&t.name).unwrap_or_default();
                let http = &http;
                jobs.push(async move {
                    let (s, c) = sample_pod(t, conn, &mut state, size_every, http).await;
                    (t, s, c, state)
                });
            }
            futures_join_all(jobs).await
        };
        let done = tokio::select! {
            _ = shutdown.cancelled() => break,
            done = round => done,
        };
        let mut sample = FleetSample::default();
        for (t, s, c, state) in done {
            if let Some(c) = c {
                conns.insert(t.url.clone(), c);
            }
            states.insert(t.name.clone(), state);
            sample.pods.insert(t.name.clone(), s);
        }
        let urls: HashSet<&String> = pods.iter().map(|p| &p.url).collect();
        conns.retain(|u, _| urls.contains(u));
        let names: HashSet<&String> = pods.iter().map(|p| &p.name).collect();
        states.retain(|n, _| names.contains(n));
        let now = Instant::now();
        let busy = fleet.proxy.pools.tenant_stats.busy_by_tenant();
        (sample.tenant_load, sample.load_window) = history.push(now, busy, window);
        sample.tenants = fleet
            .table
            .load()
            .tenants
            .values()
            .map(|t| (t.name.clone(), t.pod.name.clone()))
            .collect();
        sample.taken = Some(now);
        fleet.metrics.samples.publish(sample);
        let pause = every.saturating_sub(started.elapsed());
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tokio::time::sleep(pause) => {}
        }
    }
    for (_, c) in conns {
        let _ = tokio::time::timeout(Duration::from_millis(500), c.close()).await;
    }
}

/// Runs futures concurrently on this task and collects their outputs in order.
async fn futures_join_all<F: std::future::Future>(futures: Vec<F>) -> Vec<F::Output> {
    let mut pinned: Vec<_> = futures.into_iter().map(Box::pin).collect();
    let mut out: Vec<Option<F::Output>> = pinned.iter().map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for (i, f) in pinned.iter_mut().enumerate() {
            if out[i].is_none() {
                match f.as_mut().poll(cx) {
                    std::task::Poll::Ready(v) => out[i] = Some(v),
                    std::task::Poll::Pending => pending = true,
                }
            }
        }
        if pending {
            std::task::Poll::Pending
        } else {
            std::task::Poll::Ready(())
        }
    })
    .await;
    out.into_iter()
        .map(|o| o.expect("every future finished"))
        .collect()
}

// === exposition ===

/// The sampler's families; per-tenant figures only for `labelled` tenants, the rest of a
/// pod's tenants summed as `other`.
pub(super) fn families(s: &FleetSample, labelled: &HashSet<String>, out: &mut Vec<MetricFamily>) {
    use super::{Family, OTHER};
    let mut pods: Vec<(&String, &PodSample)> = s.pods.iter().collect();
    pods.sort_by(|a, b| a.0.cmp(b.0));
    let p = &["pod"];
    let pt = &["pod", "tenant"];
    let mut tps = Family::new("podrouter_pod_transactions_per_second");
    let mut ttps = Family::new("podrouter_tenant_transactions_per_second");
    let mut hit = Family::new("podrouter_pod_cache_hit_ratio");
    let mut backends = Family::new("podrouter_pod_backends");
    let mut maxc = Family::new("podrouter_pod_max_connections");
    let mut size = Family::new("podrouter_tenant_database_bytes");
    let mut lag_b = Family::new("podrouter_pod_replication_lag_bytes");
    let mut lag_s = Family::new("podrouter_pod_replication_lag_seconds");
    let mut cpu = Family::new("podrouter_host_cpu_utilisation");
    let mut mem_a = Family::new("podrouter_host_memory_available_bytes");
    let mut mem_t = Family::new("podrouter_host_memory_total_bytes");
    let mut fs_a = Family::new("podrouter_host_filesystem_avail_bytes");
    let mut fs_s = Family::new("podrouter_host_filesystem_size_bytes");
    for (pod, ps) in pods {
        if ps.error.is_some() {
            continue;
        }
        if let Some(r) = ps.xact_rate {
            tps.gauge(p, &[pod], r);
        }
        if let Some(r) = ps.cache_hit_ratio {
            hit.gauge(p, &[pod], r);
        }
        backends.gauge(p, &[pod], ps.backends as f64);
        maxc.gauge(p, &[pod], ps.max_connections as f64);
        // The pod's tenants' databases (not postgres, not a move's leftovers).
        let mut rates: BTreeMap<&str, f64> = BTreeMap::new();
        let mut sizes: BTreeMap<&str, f64> = BTreeMap::new();
        for (db, d) in &ps.databases {
            if s.tenants.get(db) != Some(pod) {
                continue;
            }
            let t = if labelled.contains(db) {
                db.as_str()
            } else {
                OTHER
            };
            if let Some(r) = d.xact_rate {
                *rates.entry(t).or_default() += r;
            }
            if let Some(b) = d.size_bytes {
                *sizes.entry(t).or_default() += b as f64;
            }
        }
        for (t, r) in rates {
            ttps.gauge(pt, &[pod, t], r);
        }
        for (t, b) in sizes {
            size.gauge(pt, &[pod, t], b);
        }
        for r in &ps.replication {
            if let Some(b) = r.lag_bytes {
                lag_b.gauge(&["pod", "replica"], &[pod, &r.name], b as f64);
            }
            if let Some(sec) = r.lag_seconds {
                lag_s.gauge(&["pod", "replica"], &[pod, &r.name], sec);
            }
        }
        if let Some(h) = ps.host.as_ref().filter(|h| h.error.is_none()) {
            if let Some(c) = h.cpu_utilisation {
                cpu.gauge(p, &[pod], c);
            }
            if let Some(m) = h.memory_available_bytes {
                mem_a.gauge(p, &[pod], m);
            }
            if let Some(m) = h.memory_total_bytes {
                mem_t.gauge(p, &[pod], m);
            }
            for f in &h.filesystems {
                fs_a.gauge(&["pod", "mountpoint"], &[pod, &f.mountpoint], f.avail);
                fs_s.gauge(&["pod", "mountpoint"], &[pod, &f.mountpoint], f.size);
            }
        }
    }
    let mut load = Family::new("podrouter_tenant_load");
    let mut loads: BTreeMap<(String, String), f64> = BTreeMap::new();
    for (tenant, l) in &s.tenant_load {
        let Some(pod) = s.tenants.get(tenant).cloned() else {
            continue;
        };
        let t = if labelled.contains(tenant) {
            tenant.clone()
        } else {
            OTHER.into()
        };
        *loads.entry((pod, t)).or_default() += l;
    }
    for ((pod, t), l) in &loads {
        load.gauge(pt, &[pod, t], *l);
    }
    for f in [
        tps, ttps, hit, backends, maxc, size, lag_b, lag_s, cpu, mem_a, mem_t, fs_a, fs_s, load,
    ] {
        out.push(f.mf);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PAGE: &str = r#"# HELP node_cpu_seconds_total Seconds the CPUs spent in each mode.
# TYPE node_cpu_seconds_total counter
node_cpu_seconds_total{cpu="0",mode="idle"} 90
node_cpu_seconds_total{cpu="0",mode="iowait"} 0
node_cpu_seconds_total{cpu="0",mode="user"} 10
node_cpu_seconds_total{cpu="1",mode="idle"} 80
node_cpu_seconds_total{cpu="1",mode="system"} 20
node_memory_MemAvailable_bytes 2.5e+09
node_memory_MemTotal_bytes 8e+09
node_filesystem_avail_bytes{device="/dev/sda1",fstype="ext4",mountpoint="/"} 1e+10
node_filesystem_size_bytes{device="/dev/sda1",fstype="ext4",mountpoint="/"} 5e+10
node_filesystem_avail_bytes{device="tmpfs",fstype="tmpfs",mountpoint="/run"} 1e+08
node_filesystem_size_bytes{device="tmpfs",fstype="tmpfs",mountpoint="/run"} 1e+08
node_filesystem_avail_bytes{device="x",fstype="ext4",mountpoint="/a \"b\", c}"} 7
node_filesystem_size_bytes{device="x",fstype="ext4",mountpoint="/a \"b\", c}"} 9
"#;

    #[test]
    fn node_exporter_page() {
        let mut cpu = None;
        let h = host_from_text(PAGE, &mut cpu);
        assert_eq!(h.cpu_utilisation, None, "no interval yet");
        assert_eq!(cpu, Some((30.0, 200.0)));
        assert_eq!(h.memory_available_bytes, Some(2.5e9));
        assert_eq!(h.memory_total_bytes, Some(8e9));
        let mounts: Vec<&str> = h
            .filesystems
            .iter()
            .map(|f| f.mountpoint.as_str())
            .collect();
        assert_eq!(mounts, ["/", "/a \"b\", c}"]);
        assert_eq!(h.disk_size_bytes(), Some(50_000_000_000));
        // 100 more CPU seconds, 25 of them busy.
        let later = PAGE
            .replace("mode=\"idle\"} 90", "mode=\"idle\"} 165")
            .replace("mode=\"user\"} 10", "mode=\"user\"} 35");
        let h = host_from_text(&later, &mut cpu);
        assert_eq!(h.cpu_utilisation, Some(0.25));
    }

    #[test]
    fn text_lines() {
        let check = |line: &str, want: Option<(&str, usize, f64)>| {
            let got = parse_line(line).map(|(n, l, v)| (n, l.len(), v));
            assert_eq!(got, want, "{line}");
        };
        check("up 1", Some(("up", 0, 1.0)));
        check("x{a=\"1\",b=\"2\"} 3 1700000000000", Some(("x", 2, 3.0)));
        check("# HELP x y", None);
        check("x{a=\"1\"", None);
    }

    #[test]
    fn load_over_a_window() {
        let mut h = LoadHistory::new();
        let t0 = h.points[0].0;
        let at = |s: u64| t0 + Duration::from_secs(s);
        let busy = |n: u64| HashMap::from([("a".to_string(), Duration::from_secs(n))]);
        let (r, dt) = h.push(at(10), busy(5), Duration::from_secs(20));
        assert_eq!((r["a"], dt), (0.5, 10.0));
        let (r, _) = h.push(at(20), busy(15), Duration::from_secs(20));
        assert_eq!(r["a"], 0.75);
        // The window slides: from t=20 (15 s busy) to t=40 (35 s busy).
        let (r, dt) = h.push(at(40), busy(35), Duration::from_secs(20));
        assert_eq!((r["a"], dt), (1.0, 20.0));
    }
}
