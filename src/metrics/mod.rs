//! Prometheus metrics: one [`Registry`] per router, rendered at `GET /metrics`.
//!
//! The hot path only touches atomics: every pool holds an `Arc<`[`TenantStats`]`>` for its
//! (pod, tenant), and a session adds to it at a ReadyForQuery (queries, transactions,
//! latency, bytes) and at checkout and release (pool wait, server busy time). Nothing is
//! looked up, allocated or locked per message. At scrape time [`RouterCollector`] folds
//! those counters into families labelled `{pod, tenant}`, where only the `top_tenants`
//! busiest tenants have their own label and the rest are summed per pod as
//! `tenant="other"`, so the number of series stays bounded however many tenants there are.
//!
//! Labels move between a tenant's own series and `other` as tenants get busy or quiet.
//! [`Labels`] keeps every series monotonic while they do: a tenant's own series carries its
//! whole count, `other` keeps (frozen) what it had already shown of the tenant before the
//! label, and gets nothing of what the tenant does under its own label. So `rate()` never
//! sees a counter go down and no increase lands in two series. (Raw sums of counters across
//! tenants may count a labelled tenant's early share twice: sum rates, not counters.)
//!
//! The pod sampler ([`sampler`]) adds the pods' own figures (transactions/s, cache hits,
//! connections, sizes, replication lag, host CPU/memory/disk).

pub mod sampler;

use crate::proxy::Proxy;
use parking_lot::Mutex;
use prometheus::core::{Collector, Desc};
use prometheus::proto::{self, MetricFamily, MetricType};
use prometheus::{
    Encoder, GaugeVec, HistogramOpts, HistogramVec, IntCounterVec, IntGaugeVec, Opts, Registry,
};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Upper bounds (seconds) of the latency and pool-wait histogram buckets.
pub const BUCKETS: [f64; 15] = [
    0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// The same bounds in nanoseconds, for the hot path.
const BUCKETS_NS: [u64; 15] = [
    100_000,
    500_000,
    1_000_000,
    2_500_000,
    5_000_000,
    10_000_000,
    25_000_000,
    50_000_000,
    100_000_000,
    250_000_000,
    500_000_000,
    1_000_000_000,
    2_500_000_000,
    5_000_000_000,
    10_000_000_000,
];

/// SQLSTATE classes of errors (PostgreSQL appendix A), sorted; any other is `other`.
pub const ERROR_CLASSES: [&str; 40] = [
    "03", "08", "09", "0A", "0B", "0F", "0L", "0P", "0Z", "20", "21", "22", "23", "24", "25", "26",
    "27", "28", "2B", "2D", "2F", "34", "38", "39", "3B", "3D", "3F", "40", "42", "44", "53", "54",
    "55", "57", "58", "72", "F0", "HV", "P0", "XX",
];
const CLASS_SLOTS: usize = ERROR_CLASSES.len() + 1;

fn class_index(sqlstate: &[u8]) -> usize {
    match sqlstate.get(..2) {
        Some(c) => ERROR_CLASSES
            .iter()
            .position(|k| k.as_bytes() == c)
            .unwrap_or(ERROR_CLASSES.len()),
        None => ERROR_CLASSES.len(),
    }
}

fn class_name(index: usize) -> &'static str {
    if index < ERROR_CLASSES.len() {
        ERROR_CLASSES[index]
    } else {
        "other"
    }
}

// === impl Histogram ===

/// A histogram of durations in atomics: per-bucket counts (not cumulative), sum and count.
#[derive(Default)]
pub struct Histogram {
    buckets: [AtomicU64; BUCKETS.len() + 1],
    sum_ns: AtomicU64,
    count: AtomicU64,
}

impl Histogram {
    pub fn observe(&self, d: Duration) {
        let ns = d.as_nanos().min(u64::MAX as u128) as u64;
        let i = BUCKETS_NS
            .iter()
            .position(|b| ns <= *b)
            .unwrap_or(BUCKETS.len());
        self.buckets[i].fetch_add(1, Relaxed);
        self.sum_ns.fetch_add(ns, Relaxed);
        self.count.fetch_add(1, Relaxed);
    }

    pub fn count(&self) -> u64 {
        self.count.load(Relaxed)
    }

    fn push_raw(&self, out: &mut Vec<u64>) {
        out.extend(self.buckets.iter().map(|b| b.load(Relaxed)));
        out.push(self.sum_ns.load(Relaxed));
        out.push(self.count.load(Relaxed));
    }
}

const HIST_LEN: usize = BUCKETS.len() + 3;

// === impl TenantStats ===

/// What the router saw of one tenant on one pod. Shared by every pool of that (pod, tenant)
/// and by the sessions using them; only ever added to.
pub struct TenantStats {
    /// Transactions ended: ReadyForQuery with status idle.
    pub transactions: AtomicU64,
    /// Bytes from clients, and to them.
    pub bytes_in: AtomicU64,
    pub bytes_out: AtomicU64,
    /// Time server connections were checked out for this tenant.
    pub busy_ns: AtomicU64,
    /// From the first message of a request to its ReadyForQuery; its count is the queries.
    pub query_time: Histogram,
    /// Checkout: from asking for a server connection to having one.
    pub pool_wait: Histogram,
    errors: [AtomicU64; CLASS_SLOTS],
}

impl Default for TenantStats {
    fn default() -> Self {
        TenantStats {
            transactions: AtomicU64::new(0),
            bytes_in: AtomicU64::new(0),
            bytes_out: AtomicU64::new(0),
            busy_ns: AtomicU64::new(0),
            query_time: Histogram::default(),
            pool_wait: Histogram::default(),
            errors: std::array::from_fn(|_| AtomicU64::new(0)),
        }
    }
}

/// Offsets in [`TenantStats::raw`].
mod raw {
    pub const TRANSACTIONS: usize = 0;
    pub const BYTES_IN: usize = 1;
    pub const BYTES_OUT: usize = 2;
    pub const BUSY_NS: usize = 3;
    pub const QUERY_TIME: usize = 4;
    pub const POOL_WAIT: usize = QUERY_TIME + super::HIST_LEN;
    pub const ERRORS: usize = POOL_WAIT + super::HIST_LEN;
    pub const LEN: usize = ERRORS + super::CLASS_SLOTS;
}

impl TenantStats {
    /// Counts an error by its SQLSTATE (five ASCII characters).
    pub fn error(&self, sqlstate: &[u8]) {
        self.errors[class_index(sqlstate)].fetch_add(1, Relaxed);
    }

    pub fn queries(&self) -> u64 {
        self.query_time.count()
    }

    pub fn busy(&self) -> Duration {
        Duration::from_nanos(self.busy_ns.load(Relaxed))
    }

    /// Every counter, flattened (layout in [`raw`]), for the collector's arithmetic.
    fn raw(&self) -> Vec<u64> {
        let mut v = Vec::with_capacity(raw::LEN);
        v.push(self.transactions.load(Relaxed));
        v.push(self.bytes_in.load(Relaxed));
        v.push(self.bytes_out.load(Relaxed));
        v.push(self.busy_ns.load(Relaxed));
        self.query_time.push_raw(&mut v);
        self.pool_wait.push_raw(&mut v);
        v.extend(self.errors.iter().map(|e| e.load(Relaxed)));
        v
    }
}

/// Counts an ErrorResponse (its body: fields of a type byte and a C string) by the class of
/// its SQLSTATE (field `C`).
pub fn count_error(stats: &TenantStats, mut body: &[u8]) {
    while let Some((&kind, rest)) = body.split_first() {
        if kind == 0 {
            break;
        }
        let end = rest.iter().position(|b| *b == 0).unwrap_or(rest.len());
        if kind == b'C' {
            return stats.error(&rest[..end]);
        }
        body = rest.get(end + 1..).unwrap_or_default();
    }
    stats.error(b"");
}

/// Times one checkout: from when the server connection was handed out until it is released
/// or dropped, added to the tenant's busy time.
pub struct BusyTimer {
    stats: Arc<TenantStats>,
    since: Instant,
    /// When the checkout ended, if the releaser had the clock at hand.
    until: Option<Instant>,
}

impl BusyTimer {
    pub fn start(stats: &Arc<TenantStats>) -> BusyTimer {
        Self::start_at(stats, Instant::now())
    }

    /// Started at `since` (a clock reading the caller already has).
    pub fn start_at(stats: &Arc<TenantStats>, since: Instant) -> BusyTimer {
        BusyTimer {
            stats: stats.clone(),
            since,
            until: None,
        }
    }

    pub fn since(&self) -> Instant {
        self.since
    }

    /// The checkout ends at `at` (a clock reading the caller already has), not at drop.
    pub fn end_at(&mut self, at: Instant) {
        self.until = Some(at);
    }
}

impl Drop for BusyTimer {
    fn drop(&mut self) {
        let until = self.until.unwrap_or_else(Instant::now);
        let ns = until.saturating_duration_since(self.since).as_nanos() as u64;
        self.stats.busy_ns.fetch_add(ns, Relaxed);
    }
}

/// A session's running figures between two ReadyForQuery messages: bytes are summed in
/// plain integers and flushed to the tenant's atomics once per request.
#[derive(Default)]
pub struct Meter {
    pub bytes_in: u64,
    pub bytes_out: u64,
    started: Option<Instant>,
    /// The clock at the last ReadyForQuery, for whoever releases the server next.
    ready_at: Option<Instant>,
    /// Where the last flush went, so bytes after it are not lost when the session ends.
    last: Option<Arc<TenantStats>>,
}

impl Meter {
    /// A request message went to the server: the clock starts unless it runs already.
    #[inline]
    pub fn request(&mut self) {
        if self.started.is_none() {
            self.started = Some(Instant::now());
        }
    }

    /// The next request is timed from `at` (when its server was checked out), which saves
    /// a clock read in [`Meter::request`].
    #[inline]
    pub fn request_from(&mut self, at: Instant) {
        if self.started.is_none() {
            self.started = Some(at);
        }
    }

    /// The clock at the last ReadyForQuery, once: a release right after it reuses it.
    #[inline]
    pub fn take_ready_at(&mut self) -> Option<Instant> {
        self.ready_at.take()
    }

    /// The server said ReadyForQuery with `status`; `pending` is whether more replies are
    /// still expected (pipelined requests, timed from here on).
    pub fn ready(&mut self, stats: &Arc<TenantStats>, status: u8, pending: bool) {
        let now = Instant::now();
        let took = self
            .started
            .map_or(Duration::ZERO, |s| now.saturating_duration_since(s));
        self.started = pending.then_some(now);
        self.ready_at = Some(now);
        stats.query_time.observe(took);
        if status == b'I' {
            stats.transactions.fetch_add(1, Relaxed);
        }
        self.flush(stats);
    }

    /// Adds the bytes counted so far to `stats` (cheap when there are none): at every
    /// ReadyForQuery, and wherever the session waits with nothing left to write.
    #[inline]
    pub fn flush(&mut self, stats: &Arc<TenantStats>) {
        if !self.last.as_ref().is_some_and(|l| Arc::ptr_eq(l, stats)) {
            self.last = Some(stats.clone());
        }
        if self.bytes_in == 0 && self.bytes_out == 0 {
            return;
        }
        if self.bytes_in > 0 {
            stats
                .bytes_in
                .fetch_add(std::mem::take(&mut self.bytes_in), Relaxed);
        }
        if self.bytes_out > 0 {
            stats
                .bytes_out
                .fetch_add(std::mem::take(&mut self.bytes_out), Relaxed);
        }
    }
}

impl Drop for Meter {
    fn drop(&mut self) {
        if let Some(last) = self.last.take() {
            self.flush(&last);
        }
    }
}

/// Every (pod, tenant)'s stats. Looked up when a pool is made, never per message.
#[derive(Default)]
pub struct StatsMap {
    map: Mutex<HashMap<(String, String), Arc<TenantStats>>>,
}

impl StatsMap {
    pub fn get(&self, pod: &str, tenant: &str) -> Arc<TenantStats> {
        let mut map = self.map.lock();
        if let Some(s) = map.get(&(pod.to_owned(), tenant.to_owned())) {
            return s.clone();
        }
        let s = Arc::new(TenantStats::default());
        map.insert((pod.to_owned(), tenant.to_owned()), s.clone());
        s
    }

    pub fn snapshot(&self) -> Vec<((String, String), Arc<TenantStats>)> {
        self.map
            .lock()
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    /// Server busy time per tenant, all pods together.
    pub fn busy_by_tenant(&self) -> HashMap<String, Duration> {
        let mut out: HashMap<String, Duration> = HashMap::new();
        for ((_, tenant), s) in self.map.lock().iter() {
            *out.entry(tenant.clone()).or_default() += s.busy();
        }
        out
    }

    /// Forgets stats nobody uses any more (no pool holds them) whose tenant is not on that
    /// pod now; returns them so their counts can stay in the pod's `other`.
    fn retire(&self, current: impl Fn(&str, &str) -> bool) -> Vec<((String, String), Vec<u64>)> {
        let mut out = Vec::new();
        self.map.lock().retain(|(pod, tenant), s| {
            let keep = Arc::strong_count(s) > 1 || current(pod, tenant);
            if !keep {
                out.push(((pod.clone(), tenant.clone()), s.raw()));
            }
            keep
        });
        out
    }
}

// === impl Labels ===

/// Which tenants have their own label, and the offsets that keep every series monotonic as
/// tenants get or lose one (see the module header).
#[derive(Default)]
struct Labels {
    /// Tenants with their own label.
    labelled: HashSet<String>,
    /// Smoothed busy seconds per second per tenant, for ranking.
    score: HashMap<String, f64>,
    last_busy: HashMap<String, Duration>,
    last_rank: Option<Instant>,
    keys: HashMap<(String, String), KeyOffsets>,
    /// Per pod: counts of retired stats, kept in `other`.
    retired: HashMap<String, Vec<u64>>,
}

/// Per (pod, tenant): `credited` is what was moved out of `other` when a label was lost
/// (the tenant's own series had it), `base` what `other` kept when the label was gained:
/// what `other` had already shown of the tenant (`reported`), so nothing is counted twice
/// that no scrape has seen.
#[derive(Default, Clone)]
struct KeyOffsets {
    labelled: bool,
    base: Vec<u64>,
    credited: Vec<u64>,
    reported: Vec<u64>,
}

fn sub(a: &[u64], b: &[u64]) -> Vec<u64> {
    a.iter()
        .enumerate()
        .map(|(i, x)| x.saturating_sub(b.get(i).copied().unwrap_or(0)))
        .collect()
}

fn add_into(acc: &mut Vec<u64>, v: &[u64]) {
    if acc.len() < v.len() {
        acc.resize(v.len(), 0);
    }
    for (a, x) in acc.iter_mut().zip(v) {
        *a += x;
    }
}

impl KeyOffsets {
    /// This key's share of `other` given its raw counts.
    fn other_part(&self, raw: &[u64]) -> Vec<u64> {
        if self.labelled {
            self.base.clone()
        } else {
            sub(raw, &self.credited)
        }
    }

    /// The tenant's own series: all it did on this pod.
    fn own(&self, raw: &[u64]) -> Vec<u64> {
        raw.to_vec()
    }

    fn set_labelled(&mut self, labelled: bool, raw: &[u64]) {
        if labelled == self.labelled {
            return;
        }
        if labelled {
            self.base = self.reported.clone();
        } else {
            // `other` keeps `base`: everything past it was the own series'.
            self.credited = sub(raw, &self.base);
            self.base.clear();
        }
        self.labelled = labelled;
    }
}

/// How much busier than the quietest labelled tenant another must be to take its label.
const RELABEL_FACTOR: f64 = 2.0;

impl Labels {
    /// Re-ranks tenants by recent busy time: free labels go to the busiest unlabelled
    /// tenants with any load, and a labelled tenant loses its label only to one at least
    /// [`RELABEL_FACTOR`] times busier, so labels do not flap.
    fn rank(&mut self, busy: &HashMap<String, Duration>, top: usize, now: Instant) {
        let dt = self
            .last_rank
            .map_or(0.0, |t| now.duration_since(t).as_secs_f64());
        for (tenant, b) in busy {
            let before = self.last_busy.get(tenant).copied().unwrap_or_default();
            let delta = b.saturating_sub(before).as_secs_f64();
            let rate = if dt > 0.0 { delta / dt } else { delta };
            let s = self.score.entry(tenant.clone()).or_insert(0.0);
            *s = if dt > 0.0 {
                0.5 * *s + 0.5 * rate
            } else {
                rate
            };
        }
        self.last_busy = busy.clone();
        self.last_rank = Some(now);
        self.score.retain(|t, _| busy.contains_key(t));
        self.labelled.retain(|t| busy.contains_key(t));
        while self.labelled.len() > top {
            let weakest = self.weakest().expect("not empty");
            self.labelled.remove(&weakest);
        }
        let mut candidates: Vec<(&String, f64)> = self
            .score
            .iter()
            .filter(|(t, s)| !self.labelled.contains(*t) && **s > 0.0)
            .map(|(t, s)| (t, *s))
            .collect();
        candidates.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(b.0)));
        let candidates: Vec<(String, f64)> = candidates
            .into_iter()
            .map(|(t, s)| (t.clone(), s))
            .collect();
        for (tenant, score) in candidates {
            if self.labelled.len() < top {
                self.labelled.insert(tenant);
                continue;
            }
            let Some(weakest) = self.weakest() else { break };
            if score > RELABEL_FACTOR * self.score.get(&weakest).copied().unwrap_or(0.0) {
                self.labelled.remove(&weakest);
                self.labelled.insert(tenant);
            } else {
                break; // candidates are sorted: no later one qualifies either
            }
        }
    }

    fn weakest(&self) -> Option<String> {
        self.labelled
            .iter()
            .min_by(|a, b| {
                let (sa, sb) = (self.score.get(*a), self.score.get(*b));
                sa.unwrap_or(&0.0)
                    .total_cmp(sb.unwrap_or(&0.0))
                    .then(b.cmp(a))
            })
            .cloned()
    }

    /// Series values: per (pod, tenant-or-"other").
    fn series(
        &mut self,
        raws: Vec<((String, String), Vec<u64>)>,
        retired: Vec<((String, String), Vec<u64>)>,
    ) -> BTreeMap<(String, String), Vec<u64>> {
        for ((pod, tenant), raw) in retired {
            let k = self.keys.remove(&(pod.clone(), tenant)).unwrap_or_default();
            add_into(self.retired.entry(pod).or_default(), &k.other_part(&raw));
        }
        let mut out: BTreeMap<(String, String), Vec<u64>> = BTreeMap::new();
        for (pod, r) in &self.retired {
            add_into(out.entry((pod.clone(), OTHER.into())).or_default(), r);
        }
        for ((pod, tenant), raw) in raws {
            let labelled = self.labelled.contains(&tenant);
            let k = self.keys.entry((pod.clone(), tenant.clone())).or_default();
            k.set_labelled(labelled, &raw);
            k.reported = k.other_part(&raw);
            add_into(
                out.entry((pod.clone(), OTHER.into())).or_default(),
                &k.reported,
            );
            if labelled {
                out.insert((pod, tenant), k.own(&raw));
            }
        }
        out
    }
}

pub const OTHER: &str = "other";

// === impl RouterCollector ===

/// Builds the router's and the sampler's families at scrape time.
pub struct RouterCollector {
    proxy: Arc<Proxy>,
    samples: Arc<sampler::SampleBoard>,
    labels: Mutex<Labels>,
    top_tenants: AtomicUsize,
    descs: Vec<Desc>,
}

/// (name, help, type, labels) of every family the collector makes.
const FAMILIES: &[(&str, &str, MetricType, &[&str])] = &[
    ("podrouter_client_connections", "Client sessions open, by the tenant's current pod.", MetricType::GAUGE, &["pod", "tenant"]),
    ("podrouter_server_connections", "Server connections of the router's pools, checked out (active) or pooled (idle).", MetricType::GAUGE, &["pod", "state"]),
    ("podrouter_tenants", "Tenants routed to the pod.", MetricType::GAUGE, &["pod"]),
    ("podrouter_queries_total", "Requests answered with ReadyForQuery (a simple Query, or an extended-protocol batch up to Sync).", MetricType::COUNTER, &["pod", "tenant"]),
    ("podrouter_transactions_total", "Transactions ended (ReadyForQuery idle).", MetricType::COUNTER, &["pod", "tenant"]),
    ("podrouter_errors_total", "ErrorResponses to clients, from the pods and the router, by SQLSTATE class.", MetricType::COUNTER, &["pod", "tenant", "class"]),
    ("podrouter_client_bytes_received_total", "Bytes received from clients.", MetricType::COUNTER, &["pod", "tenant"]),
    ("podrouter_client_bytes_sent_total", "Bytes sent to clients.", MetricType::COUNTER, &["pod", "tenant"]),
    ("podrouter_server_busy_seconds_total", "Time server connections were checked out by the tenant (its load on the pod).", MetricType::COUNTER, &["pod", "tenant"]),
    ("podrouter_query_duration_seconds", "From a request's first message to its ReadyForQuery, on the server connection.", MetricType::HISTOGRAM, &["pod", "tenant"]),
    ("podrouter_pool_wait_seconds", "Time to get a server connection at checkout (waiting and connecting).", MetricType::HISTOGRAM, &["pod", "tenant"]),
    ("podrouter_pod_up", "1 when the pod's primary answered the last health probe and sample.", MetricType::GAUGE, &["pod"]),
    ("podrouter_pod_transactions_per_second", "Commits and rollbacks per second on the pod (pg_stat_database).", MetricType::GAUGE, &["pod"]),
    ("podrouter_tenant_transactions_per_second", "Commits and rollbacks per second in the tenant's database (pg_stat_database).", MetricType::GAUGE, &["pod", "tenant"]),
    ("podrouter_pod_cache_hit_ratio", "Share of block reads served from shared buffers since the last sample.", MetricType::GAUGE, &["pod"]),
    ("podrouter_pod_backends", "Backends connected to the pod's primary.", MetricType::GAUGE, &["pod"]),
    ("podrouter_pod_max_connections", "The pod primary's max_connections.", MetricType::GAUGE, &["pod"]),
    ("podrouter_tenant_database_bytes", "Size of the tenant's database (pg_database_size).", MetricType::GAUGE, &["pod", "tenant"]),
    ("podrouter_pod_replication_lag_bytes", "WAL not yet replayed by a replica or subscriber (pg_stat_replication).", MetricType::GAUGE, &["pod", "replica"]),
    ("podrouter_pod_replication_lag_seconds", "replay_lag of a replica or subscriber (pg_stat_replication).", MetricType::GAUGE, &["pod", "replica"]),
    ("podrouter_host_cpu_utilisation", "Host CPU busy share since the last sample (node_exporter).", MetricType::GAUGE, &["pod"]),
    ("podrouter_host_memory_available_bytes", "node_memory_MemAvailable_bytes of the pod's host.", MetricType::GAUGE, &["pod"]),
    ("podrouter_host_memory_total_bytes", "node_memory_MemTotal_bytes of the pod's host.", MetricType::GAUGE, &["pod"]),
    ("podrouter_host_filesystem_avail_bytes", "node_filesystem_avail_bytes of the pod host's filesystems.", MetricType::GAUGE, &["pod", "mountpoint"]),
    ("podrouter_host_filesystem_size_bytes", "node_filesystem_size_bytes of the pod host's filesystems.", MetricType::GAUGE, &["pod", "mountpoint"]),
    ("podrouter_tenant_load", "The tenant's server busy seconds per second over metrics.load_window (the planner's load).", MetricType::GAUGE, &["pod", "tenant"]),
];

/// One family under construction.
struct Family {
    mf: MetricFamily,
}

fn label(name: &str, value: &str) -> proto::LabelPair {
    let mut l = proto::LabelPair::default();
    l.set_name(name.to_owned());
    l.set_value(value.to_owned());
    l
}

impl Family {
    fn new(name: &str) -> Family {
        let (_, help, kind, _) = FAMILIES
            .iter()
            .find(|f| f.0 == name)
            .expect("family is listed");
        let mut mf = MetricFamily::default();
        mf.set_name(name.to_owned());
        mf.set_help((*help).to_owned());
        mf.set_field_type(*kind);
        Family { mf }
    }

    fn labels(names: &[&str], values: &[&str]) -> Vec<proto::LabelPair> {
        names.iter().zip(values).map(|(n, v)| label(n, v)).collect()
    }

    fn gauge(&mut self, names: &[&str], values: &[&str], v: f64) {
        let mut g = proto::Gauge::default();
        g.set_value(v);
        let mut m = proto::Metric::from_label(Self::labels(names, values));
        m.set_gauge(g);
        self.mf.mut_metric().push(m);
    }

    fn counter(&mut self, names: &[&str], values: &[&str], v: f64) {
        let mut c = proto::Counter::default();
        c.set_value(v);
        let mut m = proto::Metric::from_label(Self::labels(names, values));
        m.set_counter(c);
        self.mf.mut_metric().push(m);
    }

    /// A histogram from raw (non-cumulative buckets, sum in ns, count).
    fn histogram(&mut self, names: &[&str], values: &[&str], raw: &[u64]) {
        let mut h = proto::Histogram::default();
        let mut cumulative = 0;
        let buckets = BUCKETS
            .iter()
            .enumerate()
            .map(|(i, bound)| {
                cumulative += raw[i];
                let mut b = proto::Bucket::default();
                b.set_upper_bound(*bound);
                b.set_cumulative_count(cumulative);
                b
            })
            .collect();
        h.set_bucket(buckets);
        h.set_sample_sum(raw[BUCKETS.len() + 1] as f64 / 1e9);
        h.set_sample_count(raw[BUCKETS.len() + 2]);
        let mut m = proto::Metric::from_label(Self::labels(names, values));
        m.set_histogram(h);
        self.mf.mut_metric().push(m);
    }
}

impl RouterCollector {
    fn new(proxy: Arc<Proxy>, samples: Arc<sampler::SampleBoard>) -> RouterCollector {
        let descs = FAMILIES
            .iter()
            .map(|(name, help, _, labels)| {
                Desc::new(
                    (*name).to_owned(),
                    (*help).to_owned(),
                    labels.iter().map(|l| (*l).to_owned()).collect(),
                    HashMap::new(),
                )
                .expect("valid metric description")
            })
            .collect();
        RouterCollector {
            proxy,
            samples,
            labels: Mutex::new(Labels::default()),
            top_tenants: AtomicUsize::new(20),
            descs,
        }
    }

    fn router_families(&self, out: &mut Vec<MetricFamily>) {
        let table = self.proxy.table.load_full();
        let stats = &self.proxy.pools.tenant_stats;
        let retired =
            stats.retire(|pod, tenant| table.tenant(tenant).is_some_and(|t| t.pod.name == pod));
        let snapshot = stats.snapshot();
        let busy = stats.busy_by_tenant();
        let mut labels = self.labels.lock();
        labels.rank(&busy, self.top_tenants.load(Relaxed), Instant::now());
        let raws = snapshot.iter().map(|(k, s)| (k.clone(), s.raw())).collect();
        let series = labels.series(raws, retired);
        let labelled = labels.labelled.clone();
        drop(labels);

        let pt = &["pod", "tenant"];
        let mut fams: Vec<Family> = [
            "podrouter_queries_total",
            "podrouter_transactions_total",
            "podrouter_client_bytes_received_total",
            "podrouter_client_bytes_sent_total",
            "podrouter_server_busy_seconds_total",
            "podrouter_query_duration_seconds",
            "podrouter_pool_wait_seconds",
            "podrouter_errors_total",
        ]
        .iter()
        .map(|n| Family::new(n))
        .collect();
        for ((pod, tenant), v) in &series {
            let mut v = v.clone();
            v.resize(raw::LEN, 0); // a series made only of empty offsets
            let lv = &[pod.as_str(), tenant.as_str()];
            let qt = &v[raw::QUERY_TIME..raw::QUERY_TIME + HIST_LEN];
            fams[0].counter(pt, lv, qt[HIST_LEN - 1] as f64);
            fams[1].counter(pt, lv, v[raw::TRANSACTIONS] as f64);
            fams[2].counter(pt, lv, v[raw::BYTES_IN] as f64);
            fams[3].counter(pt, lv, v[raw::BYTES_OUT] as f64);
            fams[4].counter(pt, lv, v[raw::BUSY_NS] as f64 / 1e9);
            fams[5].histogram(pt, lv, qt);
            fams[6].histogram(pt, lv, &v[raw::POOL_WAIT..raw::POOL_WAIT + HIST_LEN]);
            for (i, n) in v[raw::ERRORS..raw::LEN].iter().enumerate() {
                if *n > 0 {
                    fams[7].counter(
                        &["pod", "tenant", "class"],
                        &[pod, tenant, class_name(i)],
                        *n as f64,
                    );
                }
            }
        }

        // Gauges: read from the pools and the per-tenant client counts, no hot-path cost.
        let mut clients: BTreeMap<(String, String), u64> = BTreeMap::new();
        for (tenant, n) in self.proxy.tenant_client_counts() {
            let Some(route) = table.tenant(&tenant) else {
                continue;
            };
            let t = if labelled.contains(&tenant) {
                tenant
            } else {
                OTHER.into()
            };
            *clients.entry((route.pod.name.clone(), t)).or_default() += n as u64;
        }
        let mut f = Family::new("podrouter_client_connections");
        for pod in table.pods.keys() {
            clients.entry((pod.clone(), OTHER.into())).or_default();
        }
        for ((pod, tenant), n) in &clients {
            f.gauge(pt, &[pod, tenant], *n as f64);
        }
        fams.push(f);
        let mut servers: BTreeMap<String, (usize, usize)> =
            table.pods.keys().map(|p| (p.clone(), (0, 0))).collect();
        for p in self.proxy.pools.snapshot() {
            let e = servers.entry(p.key.pod.clone()).or_default();
            e.0 += p.active_count();
            e.1 += p.idle_count();
        }
        let mut f = Family::new("podrouter_server_connections");
        for (pod, (active, idle)) in &servers {
            f.gauge(&["pod", "state"], &[pod, "active"], *active as f64);
            f.gauge(&["pod", "state"], &[pod, "idle"], *idle as f64);
        }
        fams.push(f);
        let mut f = Family::new("podrouter_tenants");
        for pod in table.pods.keys() {
            let n = table
                .tenants
                .values()
                .filter(|t| t.pod.name == *pod)
                .count();
            f.gauge(&["pod"], &[pod], n as f64);
        }
        fams.push(f);
        let health = self.proxy.health.load();
        let samples = self.samples.load();
        let mut f = Family::new("podrouter_pod_up");
        for pod in table.pods.keys() {
            let probed = health
                .pods
                .get(pod)
                .is_some_and(|h| h.primary.in_recovery() == Some(false));
            let sampled = samples.pods.get(pod).is_none_or(|s| s.error.is_none());
            f.gauge(&["pod"], &[pod], f64::from(u8::from(probed && sampled)));
        }
        fams.push(f);
        out.extend(fams.into_iter().map(|f| f.mf));
        sampler::families(&samples, &labelled, out);
    }
}

impl Collector for RouterCollector {
    fn desc(&self) -> Vec<&Desc> {
        self.descs.iter().collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let mut out = Vec::new();
        self.router_families(&mut out);
        out
    }
}

// === impl Metrics ===

/// The router's registry: the collector above, and the families other parts of the router
/// update as things happen (moves, the autopilot).
pub struct Metrics {
    registry: Registry,
    collector: Arc<RouterCollector>,
    pub samples: Arc<sampler::SampleBoard>,
    /// Moves by outcome (`succeeded`, `failed`, `cancelled`), for the mover to count.
    pub moves: IntCounterVec,
    /// Moves in each phase right now, for the mover to move between.
    pub move_phases: IntGaugeVec,
    /// How long moves held their tenant's clients at cutover.
    pub move_pause: HistogramVec,
    /// Autopilot decisions by pod, kind (`split`) and action (`recommended`, `cleared`,
    /// `applied`, `failed`, `cooling_down`).
    pub autopilot_decisions: IntCounterVec,
    /// Recommendations standing now, by pod and kind.
    pub autopilot_recommendations: IntGaugeVec,
    /// The planner's view of each pod: load against capacity by resource (`busy`,
    /// `connections`, `disk`), set by the autopilot after each sample.
    pub pod_utilisation: GaugeVec,
}

/// Shares the collector with the registry (which wants a box it owns).
struct Shared(Arc<RouterCollector>);

impl Collector for Shared {
    fn desc(&self) -> Vec<&Desc> {
        self.0.desc()
    }
    fn collect(&self) -> Vec<MetricFamily> {
        self.0.collect()
    }
}

impl Metrics {
    pub fn new(proxy: Arc<Proxy>) -> Metrics {
        let registry = Registry::new();
        let samples = Arc::new(sampler::SampleBoard::default());
        let collector = Arc::new(RouterCollector::new(proxy, samples.clone()));
        registry
            .register(Box::new(Shared(collector.clone())))
            .expect("collector registers");
        let moves = IntCounterVec::new(
            Opts::new(
                "podrouter_moves_total",
                "Tenant moves finished, by outcome.",
            ),
            &["outcome"],
        )
        .expect("valid metric");
        let move_phases = IntGaugeVec::new(
            Opts::new(
                "podrouter_moves_in_phase",
                "Tenant moves running, by phase.",
            ),
            &["phase"],
        )
        .expect("valid metric");
        let move_pause = HistogramVec::new(
            HistogramOpts::new(
                "podrouter_move_pause_seconds",
                "How long a move held its tenant's clients at cutover.",
            )
            .buckets(BUCKETS.to_vec()),
            &[],
        )
        .expect("valid metric");
        let autopilot_decisions = IntCounterVec::new(
            Opts::new(
                "podrouter_autopilot_decisions_total",
                "Autopilot decisions, by pod, kind and action.",
            ),
            &["pod", "kind", "action"],
        )
        .expect("valid metric");
        let autopilot_recommendations = IntGaugeVec::new(
            Opts::new(
                "podrouter_autopilot_recommendations",
                "Autopilot recommendations standing now (1), by pod and kind.",
            ),
            &["pod", "kind"],
        )
        .expect("valid metric");
        let pod_utilisation = GaugeVec::new(
            Opts::new(
                "podrouter_pod_utilisation",
                "The pod's load against its capacity (the planner's view), by resource; 1 is full.",
            ),
            &["pod", "resource"],
        )
        .expect("valid metric");
        for c in [
            Box::new(pod_utilisation.clone()) as Box<dyn Collector>,
            Box::new(moves.clone()),
            Box::new(move_phases.clone()),
            Box::new(move_pause.clone()),
            Box::new(autopilot_decisions.clone()),
            Box::new(autopilot_recommendations.clone()),
        ] {
            registry.register(c).expect("metric registers");
        }
        Metrics {
            registry,
            collector,
            samples,
            moves,
            move_phases,
            move_pause,
            autopilot_decisions,
            autopilot_recommendations,
            pod_utilisation,
        }
    }

    /// The Prometheus text exposition of everything; `top_tenants` from `[metrics]`.
    pub fn render(&self, top_tenants: usize) -> String {
        self.collector.top_tenants.store(top_tenants, Relaxed);
        let mut buf = Vec::new();
        prometheus::TextEncoder::new()
            .encode(&self.registry.gather(), &mut buf)
            .expect("text encoding does not fail");
        String::from_utf8(buf).expect("the text format is UTF-8")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(n: u64) -> Vec<u64> {
        vec![n]
    }

    /// Drives [`Labels`] through label changes: (tenant busy totals, top, expected series
    /// of pod "p" as (tenant, value)) per step; every series must be monotonic.
    #[test]
    fn labels_keep_series_monotonic() {
        let mut l = Labels::default();
        let t0 = Instant::now();
        let mut last: BTreeMap<String, u64> = BTreeMap::new();
        type Counts<'a> = &'a [(&'a str, u64)];
        let steps: &[(Counts, usize, Counts)] = &[
            // a gets the label at the first scrape: other never showed it, so it keeps none.
            (&[("a", 10), ("b", 1)], 1, &[("a", 10), ("other", 1)]),
            (&[("a", 20), ("b", 2)], 1, &[("a", 20), ("other", 2)]),
            // b got much busier: it takes a's label; other keeps the 2 it showed of b, and
            // nothing of what a did under its own label.
            (&[("a", 21), ("b", 100)], 1, &[("b", 100), ("other", 2)]),
            (&[("a", 25), ("b", 150)], 1, &[("b", 150), ("other", 6)]),
            // two labels: a gets its own again.
            (
                &[("a", 30), ("b", 160)],
                2,
                &[("a", 30), ("b", 160), ("other", 6)],
            ),
        ];
        for (i, (totals, top, want)) in steps.iter().enumerate() {
            let busy: HashMap<String, Duration> = totals
                .iter()
                .map(|(t, n)| (t.to_string(), Duration::from_secs(*n)))
                .collect();
            l.rank(&busy, *top, t0 + Duration::from_secs(i as u64 + 1));
            let raws = totals
                .iter()
                .map(|(t, n)| (("p".to_string(), t.to_string()), raw(*n)))
                .collect();
            let got: Vec<(String, u64)> = l
                .series(raws, Vec::new())
                .into_iter()
                .map(|((_, t), v)| (t, v[0]))
                .collect();
            let want: Vec<(String, u64)> = want.iter().map(|(t, n)| (t.to_string(), *n)).collect();
            assert_eq!(got, want, "step {i}");
            for (t, v) in &got {
                if let Some(prev) = last.get(t) {
                    assert!(v >= prev, "step {i}: {t} went from {prev} to {v}");
                }
                last.insert(t.clone(), *v);
            }
        }
    }

    #[test]
    fn retired_stats_stay_in_other() {
        let mut l = Labels::default();
        let key = ("p".to_string(), "gone".to_string());
        let s1 = l.series(vec![(key.clone(), raw(7))], Vec::new());
        assert_eq!(s1[&("p".into(), OTHER.into())], raw(7));
        let s2 = l.series(Vec::new(), vec![(key, raw(9))]);
        assert_eq!(s2[&("p".into(), OTHER.into())], raw(9));
    }

    #[test]
    fn sqlstate_classes() {
        let check = |code: &str, want: &str| {
            assert_eq!(class_name(class_index(code.as_bytes())), want, "{code}")
        };
        check("42P01", "42");
        check("53300", "53");
        check("0A000", "0A");
        check("XX000", "XX");
        check("ZZ999", "other");
        check("4", "other");
    }

    #[test]
    fn histogram_buckets() {
        let h = Histogram::default();
        h.observe(Duration::from_micros(50));
        h.observe(Duration::from_millis(3));
        h.observe(Duration::from_secs(60));
        let mut v = Vec::new();
        h.push_raw(&mut v);
        assert_eq!(v[0], 1); // <= 0.1 ms
        assert_eq!(v[4], 1); // <= 5 ms
        assert_eq!(v[BUCKETS.len()], 1); // +Inf
        assert_eq!(v[HIST_LEN - 1], 3);
    }
}
