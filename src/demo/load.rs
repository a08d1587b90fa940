//! `podrouter demo --load`: a bounded, skewed synthetic load through the router, so the
//! sampler sees one pod run hot and the autopilot (recommend mode) proposes splitting it.
//!
//! The hot pod is the one holding the most tenants (a split needs two). Its tenants together
//! get about one pod's `capacity.busy` of server busy time per second (100% utilisation,
//! over the default 75% threshold; after a split each half is near 50%, under it), the other
//! tenants a trickle. The busy time is `pg_sleep` inside the server, so the load costs no
//! CPU: it shows as server connections held, which is what the router measures. Each worker
//! is one client connection through the router as the demo role, in a loop of short
//! transactions, so it rides through the split's moves like any application would.

use crate::fleet::Fleet;
use crate::planner::load::capacity_of;
use sqlx::Connection;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// One worker's cycle: `duty` of it inside `pg_sleep` on the server, the rest idle.
const PERIOD: Duration = Duration::from_millis(200);
/// The cold tenants' duty cycle: visible in the metrics, far from any threshold.
const COLD_DUTY: f64 = 0.05;
/// At most this many workers (client connections) in all.
const MAX_WORKERS: usize = 32;

/// One client connection's share of the load.
#[derive(Debug, Clone, PartialEq)]
pub struct Worker {
    pub tenant: String,
    /// The share of each [`PERIOD`] spent in `pg_sleep`, in (0, 1].
    pub duty: f64,
}

/// The load for `tenants` (name, pod): the pod with the most tenants (ties: the first
/// name) is hot, its tenants sharing `capacity` busy seconds per second over as few
/// workers as can carry it; every other tenant gets one worker at [`COLD_DUTY`].
/// Returns the hot pod and the workers.
pub fn plan(tenants: &[(String, String)], capacity: impl Fn(&str) -> f64) -> (String, Vec<Worker>) {
    let mut pods: Vec<&str> = tenants.iter().map(|(_, p)| p.as_str()).collect();
    pods.sort();
    pods.dedup();
    let count = |pod: &str| tenants.iter().filter(|(_, p)| p == pod).count();
    let hot = pods
        .iter()
        .copied()
        .max_by(|a, b| count(a).cmp(&count(b)).then(b.cmp(a)))
        .unwrap_or_default()
        .to_owned();
    let n = count(&hot).max(1);
    let per_tenant = capacity(&hot).max(0.1) / n as f64;
    // Workers per hot tenant: each carries at most one busy second per second.
    let k = (per_tenant.ceil() as usize).clamp(1, (MAX_WORKERS / n).max(1));
    let duty = (per_tenant / k as f64).min(1.0);
    let mut workers = Vec::new();
    for (tenant, pod) in tenants {
        let (copies, duty) = if *pod == hot {
            (k, duty)
        } else {
            (1, COLD_DUTY)
        };
        for _ in 0..copies {
            workers.push(Worker {
                tenant: tenant.clone(),
                duty,
            });
        }
    }
    workers.truncate(MAX_WORKERS);
    (hot, workers)
}

/// The demo's running load; [`Load::stop`] ends it.
pub struct Load {
    stop: CancellationToken,
    tracker: TaskTracker,
}

/// Starts the load on the fleet's tenants through the router at `router_url`
/// (`postgres://demo:demo@HOST:PORT`), and a watcher that prints, once, the split the
/// autopilot recommends with the command that carries it out (`cli` is the CLI's prefix,
/// e.g. `podrouter --demo-dir DIR`). Returns the hot pod's name.
pub fn start(fleet: &Arc<Fleet>, router_url: &str, cli: &str) -> (Load, String) {
    let table = fleet.table.load_full();
    let config = fleet.config.load_full();
    let mut tenants: Vec<(String, String)> = table
        .tenants
        .values()
        .filter(|t| t.grants.contains(super::DEMO_ROLE))
        .map(|t| (t.name.clone(), t.pod.name.clone()))
        .collect();
    tenants.sort();
    let (hot, workers) = plan(&tenants, |pod| {
        let weight = table.pods.get(pod).map_or(1.0, |p| p.weight);
        capacity_of(&config, pod).busy * weight
    });
    let load = Load {
        stop: CancellationToken::new(),
        tracker: TaskTracker::new(),
    };
    for w in workers {
        let url = format!("{router_url}/{}", w.tenant);
        load.tracker.spawn(worker(url, w.duty, load.stop.clone()));
    }
    load.tracker.spawn(announce(
        fleet.clone(),
        hot.clone(),
        cli.to_owned(),
        load.stop.clone(),
    ));
    load.tracker.close();
    (load, hot)
}

impl Load {
    pub async fn stop(self) {
        self.stop.cancel();
        self.tracker.wait().await;
    }
}

/// One client: short transactions with `pg_sleep` at `duty`, until `stop`. Errors (the
/// router stopping, say) are logged and the client connects again a second later.
async fn worker(url: String, duty: f64, stop: CancellationToken) {
    let busy = PERIOD.mul_f64(duty);
    let idle = PERIOD.saturating_sub(busy);
    let query = format!("SELECT pg_sleep({:.3})", busy.as_secs_f64());
    while !stop.is_cancelled() {
        tokio::select! {
            _ = stop.cancelled() => return,
            Err(e) = sleep_in_loop(&url, &query, idle) => {
                tracing::debug!("demo load on {}: {e}; connecting again", crate::config::redact(&url));
            }
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
}

/// Connects to `url` and runs `query` every `idle` until an error.
async fn sleep_in_loop(
    url: &str,
    query: &str,
    idle: Duration,
) -> Result<std::convert::Infallible, sqlx::Error> {
    let mut c = sqlx::PgConnection::connect(url).await?;
    loop {
        sqlx::raw_sql(sqlx::AssertSqlSafe(query.to_owned()))
            .execute(&mut c)
            .await?;
        if !idle.is_zero() {
            tokio::time::sleep(idle).await;
        }
    }
}

/// Prints the autopilot's split recommendation for `hot` once it stands (and again if it
/// clears and comes back), with the commands that show and carry it out.
async fn announce(fleet: Arc<Fleet>, hot: String, cli: String, stop: CancellationToken) {
    let mut shown = false;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
        let recs = fleet.planner.autopilot.recommendations();
        let ready = recs
            .recommendations
            .iter()
            .find(|r| r.ready && r.pod == hot);
        match (ready, shown) {
            (Some(r), false) => {
                shown = true;
                println!(
                    "podrouter demo: the autopilot recommends splitting {hot} ({}); see it with `{cli} recommendations`, carry it out with `{cli} split {hot}`",
                    r.reason
                );
            }
            (None, true) => shown = false,
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{plan, Worker, COLD_DUTY};

    fn tenants(list: &[(&str, &str)]) -> Vec<(String, String)> {
        list.iter()
            .map(|(t, p)| (t.to_string(), p.to_string()))
            .collect()
    }

    fn busy_on(workers: &[Worker], names: &[&str]) -> f64 {
        workers
            .iter()
            .filter(|w| names.contains(&w.tenant.as_str()))
            .map(|w| w.duty)
            .sum()
    }

    #[test]
    fn the_pod_with_most_tenants_gets_its_capacity_spread_evenly() {
        let check = |list: &[(&str, &str)], cap: f64, hot: &str, hot_tenants: &[&str]| {
            let (got, workers) = plan(&tenants(list), |_| cap);
            assert_eq!(got, hot, "{list:?}");
            let total = busy_on(&workers, hot_tenants);
            assert!((total - cap).abs() < 1e-9, "{list:?}: {total} of {cap}");
            for t in hot_tenants {
                let share = busy_on(&workers, &[t]);
                assert!((share - cap / hot_tenants.len() as f64).abs() < 1e-9, "{t}");
            }
            assert!(workers.iter().all(|w| w.duty > 0.0 && w.duty <= 1.0));
            for w in workers
                .iter()
                .filter(|w| !hot_tenants.contains(&w.tenant.as_str()))
            {
                assert_eq!(w.duty, COLD_DUTY);
            }
        };
        let two_two = [
            ("t1", "pod1"),
            ("t2", "pod2"),
            ("t3", "pod1"),
            ("t4", "pod2"),
        ];
        check(&two_two, 4.0, "pod1", &["t1", "t3"]);
        let three_one = [
            ("t1", "pod2"),
            ("t2", "pod1"),
            ("t3", "pod2"),
            ("t4", "pod2"),
        ];
        check(&three_one, 4.0, "pod2", &["t1", "t3", "t4"]);
        check(&three_one, 1.0, "pod2", &["t1", "t3", "t4"]);
        check(&[("a", "x"), ("b", "x")], 0.5, "x", &["a", "b"]);
    }

    #[test]
    fn bounded_workers() {
        let many: Vec<(String, String)> = (0..100)
            .map(|i| (format!("t{i}"), "pod1".to_owned()))
            .collect();
        let (_, workers) = plan(&many, |_| 64.0);
        assert!(workers.len() <= super::MAX_WORKERS);
        assert!(plan(&[], |_| 4.0).1.is_empty());
    }
}
