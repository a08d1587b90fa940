//! Metrics against real traffic and real pods: `/metrics` counts exactly what clients did,
//! the sampler's figures match a pod under pgbench (transactions, backends, sizes,
//! replication), node_exporter figures come through, and the planner's dry runs and the
//! autopilot's recommendations work on the live load.

use crate::support::{Options, TestFleet};
use std::collections::BTreeMap;
use std::time::Duration;

/// The value of the series `name` whose labels include all of `labels` (None if absent).
fn series(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        let (head, value) = l.rsplit_once(' ')?;
        let (n, rest) = match head.split_once('{') {
            Some((n, rest)) => (n, rest.trim_end_matches('}')),
            None => (head, ""),
        };
        if n != name {
            return None;
        }
        let got: BTreeMap<&str, &str> = rest
            .split(',')
            .filter_map(|kv| {
                let (k, v) = kv.split_once('=')?;
                Some((k, v.trim_matches('"')))
            })
            .collect();
        labels
            .iter()
            .all(|(k, v)| got.get(k) == Some(v))
            .then(|| value.parse().ok())?
    })
}

async fn scrape(f: &TestFleet) -> String {
    let (status, body) = f.admin("GET", "/metrics", None).await;
    assert_eq!(status, 200, "GET /metrics: {body}");
    body.as_str().expect("text").to_owned()
}

fn value(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    series(text, name, labels).unwrap_or_else(|| panic!("no {name}{labels:?} in /metrics:\n{text}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_what_clients_did() {
    let mut f = TestFleet::start(Options {
        config_extra: "\n[metrics]\ntop_tenants = 1\n".into(),
        ..Options::default()
    })
    .await;
    f.tenant("alpha", 1).await;
    f.tenant("beta", 1).await;
    // /metrics needs the admin token, like /v1.
    let unauthorised = reqwest_get(&f, "/metrics", None).await;
    assert_eq!(unauthorised, 401);

    let a = f.connect("alpha").await;
    for _ in 0..20 {
        a.simple_query("SELECT 1").await.unwrap();
    }
    a.batch_execute("BEGIN").await.unwrap();
    a.batch_execute("SELECT pg_sleep(0.05)").await.unwrap();
    a.batch_execute("COMMIT").await.unwrap();
    let e = a
        .batch_execute("SELECT * FROM no_such_table")
        .await
        .unwrap_err();
    assert_eq!(crate::support::code(&e), "42P01");
    // 1 MB back to the client.
    a.simple_query("SELECT repeat('x', 1048576)").await.unwrap();
    let b = f.connect("beta").await;
    b.simple_query("SELECT 1").await.unwrap();

    let m = scrape(&f).await;
    let alpha = &[("pod", "pod1"), ("tenant", "alpha")][..];
    let other = &[("pod", "pod1"), ("tenant", "other")][..];
    // 20 + BEGIN/SELECT/COMMIT + the failed one + repeat
    assert_eq!(value(&m, "podrouter_queries_total", alpha), 25.0);
    // 20 + the block + the failed one (rolled back) + repeat
    assert_eq!(value(&m, "podrouter_transactions_total", alpha), 23.0);
    assert_eq!(
        value(&m, "podrouter_query_duration_seconds_count", alpha),
        25.0
    );
    assert_eq!(
        value(
            &m,
            "podrouter_errors_total",
            &[("pod", "pod1"), ("tenant", "alpha"), ("class", "42")]
        ),
        1.0
    );
    // top_tenants = 1: beta (less busy) is summed into other.
    assert_eq!(value(&m, "podrouter_queries_total", other), 1.0);
    assert!(series(&m, "podrouter_queries_total", &[("tenant", "beta")]).is_none());
    // Busy time: at least the 50 ms the transaction slept.
    let busy = value(&m, "podrouter_server_busy_seconds_total", alpha);
    assert!(busy >= 0.05, "busy {busy}");
    assert!(value(&m, "podrouter_pool_wait_seconds_count", alpha) >= 23.0);
    let sent = value(&m, "podrouter_client_bytes_sent_total", alpha);
    assert!(sent >= 1_048_576.0, "bytes sent {sent}");
    // Each "SELECT 1" Query message is 14 bytes.
    let received = value(&m, "podrouter_client_bytes_received_total", alpha);
    assert!(
        (20.0 * 14.0..100_000.0).contains(&received),
        "bytes received {received}"
    );
    assert_eq!(value(&m, "podrouter_client_connections", alpha), 1.0);
    assert_eq!(value(&m, "podrouter_tenants", &[("pod", "pod1")]), 2.0);
    assert!(
        value(
            &m,
            "podrouter_server_connections",
            &[("pod", "pod1"), ("state", "idle")]
        ) >= 1.0
    );
    assert_eq!(
        value(
            &m,
            "podrouter_server_connections",
            &[("pod", "pod1"), ("state", "active")]
        ),
        0.0
    );

    // Counters only grow, by exactly what happened since.
    for _ in 0..5 {
        a.simple_query("SELECT 1").await.unwrap();
    }
    let m2 = scrape(&f).await;
    assert_eq!(value(&m2, "podrouter_queries_total", alpha), 30.0);
    assert_eq!(value(&m2, "podrouter_queries_total", other), 1.0);
    drop((a, b));
    f.stop().await;
}

/// Status of a plain HTTP GET to the admin listener (the real socket, not oneshot).
async fn reqwest_get(f: &TestFleet, path: &str, token: Option<&str>) -> u16 {
    let url = format!("http://{}{path}", f.running().admin_addr);
    let mut req = reqwest::Client::new().get(url);
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    req.send()
        .await
        .expect("admin listener answers")
        .status()
        .as_u16()
}

/// pgbench through the router on `tenant` for `secs`; returns the transactions processed.
fn pgbench(f: &TestFleet, tenant: &str, args: &[&str]) -> String {
    let addr = f.running().pg_addr;
    let out = std::process::Command::new(crate::support::tool("pgbench"))
        .args([
            "-h",
            &addr.ip().to_string(),
            "-p",
            &addr.port().to_string(),
            "-U",
            crate::support::ROLE,
        ])
        .args(args)
        .arg(tenant)
        .env("PGPASSWORD", crate::support::PASSWORD)
        .output()
        .expect("pgbench runs");
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "pgbench {args:?} failed:\n{text}");
    text
}

fn processed(pgbench_output: &str) -> u64 {
    pgbench_output
        .lines()
        .find_map(|l| l.strip_prefix("number of transactions actually processed: "))
        .and_then(|n| n.split('/').next()?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no transaction count in:\n{pgbench_output}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sampler_follows_a_pod_under_pgbench() {
    // A real node_exporter for the host figures.
    let exporter_port = podrouter::localpg::free_port();
    let mut exporter = std::process::Command::new("prometheus-node-exporter")
        .arg(format!("--web.listen-address=127.0.0.1:{exporter_port}"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("prometheus-node-exporter (apt-get install prometheus-node-exporter)");
    let mut f = TestFleet::start(Options {
        replicas: 1,
        config_extra:
            "\n[metrics]\nsample_every = \"250ms\"\nsize_every = \"1s\"\nload_window = \"2s\"\n"
                .to_owned(),
        ..Options::default()
    })
    .await;
    // The exporter belongs to pod1 (the same host here): add it and reload.
    f.edit_config(|t| {
        t.replacen(
            "name = \"pod1\"\n",
            &format!(
                "name = \"pod1\"\nnode_exporter = \"http://127.0.0.1:{exporter_port}/metrics\"\n"
            ),
            1,
        )
    });
    f.fleet()
        .reload_config(false, "test")
        .await
        .expect("reload");
    f.tenant("bench", 1).await;
    pgbench(&f, "bench", &["-i", "-s", "2", "-q"]);
    let fleet = f.fleet();
    let before = crate::support::wait_for("a sample of bench", Duration::from_secs(10), || {
        let s = fleet.metrics.samples.load_full();
        async move {
            s.pods
                .get("pod1")?
                .databases
                .get("bench")
                .map(|d| d.xact_total)
        }
    })
    .await;

    // Load for 4 s while watching the sampler.
    let fleet2 = fleet.clone();
    let watch = tokio::spawn(async move {
        let (mut max_rate, mut max_backends, mut max_load) = (0.0f64, 0u64, 0.0f64);
        for _ in 0..16 {
            tokio::time::sleep(Duration::from_millis(250)).await;
            let s = fleet2.metrics.samples.load_full();
            if let Some(p) = s.pods.get("pod1") {
                max_backends = max_backends.max(p.backends);
                if let Some(r) = p.databases.get("bench").and_then(|d| d.xact_rate) {
                    max_rate = max_rate.max(r);
                }
            }
            max_load = max_load.max(s.tenant_load.get("bench").copied().unwrap_or(0.0));
        }
        (max_rate, max_backends, max_load)
    });
    let f_ref = &f;
    let out = tokio::task::block_in_place(|| pgbench(f_ref, "bench", &["-c", "4", "-T", "4"]));
    let (max_rate, max_backends, max_load) = watch.await.unwrap();
    let n = processed(&out);
    let tps = n as f64 / 4.0;
    assert!(n > 50, "pgbench did too little to judge: {out}");
    // Every pgbench transaction commits once in the tenant's database: the sampler's
    // counter grows by that (plus the odd pool check), once the backends flushed stats.
    let total = crate::support::wait_for(
        "pg_stat_database to count pgbench",
        Duration::from_secs(15),
        || {
            let s = fleet.metrics.samples.load_full();
            async move {
                let t = s.pods.get("pod1")?.databases.get("bench")?.xact_total;
                (t - before >= n).then_some(t)
            }
        },
    )
    .await;
    assert!(
        total - before <= n + n / 10 + 50,
        "{} transactions counted for {n}",
        total - before
    );
    // The rate seen during the run is of the order of pgbench's own.
    // (Backends flush their statistics about once a second, so one short round may see
    // several rounds' worth.)
    assert!(
        max_rate > 0.3 * tps && max_rate < 8.0 * tps,
        "sampled {max_rate}/s, pgbench {tps}/s"
    );
    // 4 clients, pool size 5: at least 4 server connections plus the sampler's own.
    assert!(max_backends >= 5, "backends {max_backends}");
    assert!(max_load > 0.1, "router load {max_load}");

    let s = fleet.metrics.samples.load_full();
    let p = &s.pods["pod1"];
    assert_eq!(p.max_connections, 200);
    let hit = p.cache_hit_ratio.expect("cache hit ratio");
    assert!(hit > 0.0 && hit <= 1.0, "{hit}");
    // Sizes as the pod itself reports them.
    let direct = crate::support::pod_admin(&f.pods[1], "postgres").await;
    let size: i64 = direct
        .query_one("SELECT pg_database_size('bench')", &[])
        .await
        .unwrap()
        .get(0);
    let sampled = crate::support::wait_for("a fresh size", Duration::from_secs(10), || {
        let s = fleet.metrics.samples.load_full();
        async move {
            let b = s.pods.get("pod1")?.databases.get("bench")?.size_bytes? as f64;
            ((b - size as f64).abs() < 0.1 * size as f64).then_some(b)
        }
    })
    .await;
    assert!(
        sampled > 1_000_000.0,
        "a scale-2 pgbench database is bigger: {sampled}"
    );
    // The replica, from the primary's pg_stat_replication.
    let rep = p
        .replication
        .iter()
        .find(|r| r.name == "pod1_replica0")
        .unwrap_or_else(|| panic!("replica in {:?}", p.replication));
    assert!(rep.lag_bytes.is_some());
    // Host figures from node_exporter.
    let host = p.host.as_ref().expect("host sample");
    assert_eq!(host.error, None);
    assert!(host.memory_total_bytes.unwrap() > host.memory_available_bytes.unwrap());
    assert!(!host.filesystems.is_empty());
    let cpu = crate::support::wait_for("a CPU interval", Duration::from_secs(5), || {
        let s = fleet.metrics.samples.load_full();
        async move { s.pods.get("pod1")?.host.as_ref()?.cpu_utilisation }
    })
    .await;
    assert!((0.0..=1.0).contains(&cpu));

    // The same figures in /metrics.
    let m = scrape(&f).await;
    let pod1 = &[("pod", "pod1")][..];
    assert_eq!(value(&m, "podrouter_pod_max_connections", pod1), 200.0);
    assert!(
        value(
            &m,
            "podrouter_tenant_database_bytes",
            &[("pod", "pod1"), ("tenant", "bench")]
        ) > 1e6
    );
    assert!(series(&m, "podrouter_pod_transactions_per_second", pod1).is_some());
    assert!(series(
        &m,
        "podrouter_pod_replication_lag_bytes",
        &[("pod", "pod1"), ("replica", "pod1_replica0")]
    )
    .is_some());
    assert!(value(&m, "podrouter_host_memory_total_bytes", pod1) > 0.0);
    assert_eq!(value(&m, "podrouter_pod_up", pod1), 1.0);
    assert!(
        value(
            &m,
            "podrouter_server_busy_seconds_total",
            &[("pod", "pod1"), ("tenant", "bench")]
        ) > 0.5
    );

    // The planner sees the load: a dry-run split of pod1 moves bench's half somewhere new,
    // and a dry-run rebalance gives before/after per pod.
    f.tenant("quiet", 1).await;
    let (status, split) = f
        .admin(
            "POST",
            "/v1/pods/pod1/split",
            Some(serde_json::json!({"dry_run": true})),
        )
        .await;
    assert_eq!(status, 200, "{split}");
    assert_eq!(split["plan"]["target"], "pod2");
    assert_eq!(
        split["plan"]["moves"].as_array().unwrap().len(),
        1,
        "{split}"
    );
    assert_eq!(split["plan"]["before"]["pod1"]["tenants"], 2, "{split}");
    assert_eq!(split["plan"]["after"]["pod2"]["tenants"], 1, "{split}");
    let (status, plan) = f
        .admin(
            "POST",
            "/v1/rebalance",
            Some(serde_json::json!({"dry_run": true, "max_moves": 3})),
        )
        .await;
    assert_eq!(status, 200, "{plan}");
    assert!(
        plan["plan"]["before"]["pod0"].is_object() && plan["plan"]["after"]["pod1"].is_object(),
        "{plan}"
    );

    f.stop().await;
    let _ = exporter.kill();
    let _ = exporter.wait();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn autopilot_recommends_a_split_under_load_and_audits_it() {
    let mut f = TestFleet::start(Options {
        config_extra: "\n[metrics]\nsample_every = \"250ms\"\nload_window = \"2s\"\n\n[autopilot]\nmode = \"recommend\"\nsplit_when = { busy_ratio = 0.05, for = \"1s\" }\n".into(),
        ..Options::default()
    })
    .await;
    f.tenant("hot", 1).await;
    f.tenant("cold", 1).await;
    let (_, recs) = f.admin("GET", "/v1/recommendations", None).await;
    assert!(
        recs["recommendations"]
            .as_array()
            .is_none_or(|r| r.is_empty()),
        "{recs}"
    );
    // Keep hot busy: 4 clients in a loop of 20 ms sleeps hold server connections nearly all
    // the time, several busy seconds per second against the default capacity of 4.
    let url = f.app_url("hot");
    let stop = tokio_util::sync::CancellationToken::new();
    let mut load = Vec::new();
    for _ in 0..4 {
        let (url, stop) = (url.clone(), stop.clone());
        load.push(tokio::spawn(async move {
            let c = crate::support::connect(&url).await.unwrap();
            while !stop.is_cancelled() {
                c.batch_execute("SELECT pg_sleep(0.02)").await.unwrap();
            }
        }));
    }
    let fleet = f.fleet();
    let rec = crate::support::wait_for(
        "a split recommendation for pod1",
        Duration::from_secs(20),
        || {
            let r = fleet.planner.autopilot.recommendations();
            async move {
                r.recommendations
                    .iter()
                    .find(|r| r.pod == "pod1" && r.ready)
                    .cloned()
            }
        },
    )
    .await;
    assert!(rec.reason.contains("busy"), "{}", rec.reason);
    assert_eq!(rec.plan.moves.len(), 1);
    let m = scrape(&f).await;
    assert_eq!(
        value(
            &m,
            "podrouter_autopilot_recommendations",
            &[("pod", "pod1"), ("kind", "split")]
        ),
        1.0
    );
    assert_eq!(
        value(
            &m,
            "podrouter_autopilot_decisions_total",
            &[
                ("pod", "pod1"),
                ("kind", "split"),
                ("action", "recommended")
            ]
        ),
        1.0,
        "recommended once, not at every round"
    );
    let (_, audit) = f.admin("GET", "/v1/audit?limit=100", None).await;
    let entry = audit["entries"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["action"] == "autopilot.recommend")
        .unwrap_or_else(|| panic!("no autopilot.recommend in {audit}"));
    assert_eq!(entry["target"], "pod1");
    assert!(entry["detail"]["figures"]["busy_ratio"].as_f64().unwrap() >= 0.05);
    // The load stops: the recommendation clears, audited too.
    stop.cancel();
    for l in load {
        l.await.unwrap();
    }
    crate::support::wait_for(
        "the recommendation to clear",
        Duration::from_secs(20),
        || {
            let r = fleet.planner.autopilot.recommendations();
            async move { (!r.recommendations.iter().any(|r| r.pod == "pod1")).then_some(()) }
        },
    )
    .await;
    let (_, audit) = f.admin("GET", "/v1/audit?limit=100", None).await;
    assert!(audit["entries"]
        .as_array()
        .unwrap()
        .iter()
        .any(|e| e["action"] == "autopilot.clear"));
    f.stop().await;
}
