//! Splitting a pod end to end over real pods: the local provider makes the new pod, it is
//! registered, about half the load moves there as one `split` job of move jobs, and every
//! tenant still answers with its data; a dry run changes nothing.

use crate::support::*;
use serde_json::{json, Value};
use std::time::Duration;

async fn pods(f: &TestFleet) -> Vec<Value> {
    let (_, p) = f.admin("GET", "/v1/pods", None).await;
    p["pods"].as_array().unwrap().clone()
}

async fn tenants_on(f: &TestFleet, pod: &str) -> Vec<String> {
    let (_, t) = f.admin("GET", "/v1/tenants", None).await;
    t["tenants"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|t| t["pod"] == pod)
        .map(|t| t["name"].as_str().unwrap().to_owned())
        .collect()
}

/// Creates each tenant on pod1 with an `items` table of `rows(tenant)` rows.
async fn seed(f: &TestFleet, names: &[&str], rows: impl Fn(&str) -> i64) {
    for t in names {
        f.tenant(t, 1).await;
        let c = f.connect(t).await;
        c.batch_execute(&format!(
            "CREATE TABLE items (id serial PRIMARY KEY, v text);
             INSERT INTO items (v) SELECT '{t}-' || g FROM generate_series(1, {}) g",
            rows(t)
        ))
        .await
        .unwrap();
    }
}

/// Every tenant answers through the router with all of its `items`.
async fn assert_items(f: &TestFleet, names: &[&str], rows: impl Fn(&str) -> i64) {
    for t in names {
        let c = f.connect(t).await;
        let n: i64 = c
            .query_one("SELECT count(*) FROM items", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(n, rows(t), "{t}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn split_moves_half_the_load_to_a_new_local_pod() {
    let mut f = TestFleet::start(Options {
        config_extra: "\n[metrics]\nsample_every = \"250ms\"\nload_window = \"60s\"\n\n[provider]\nkind = \"local\"\n".into(),
        ..Options::default()
    })
    .await;
    let names = ["t1", "t2", "t3", "t4"];
    seed(&f, &names, |_| 100).await;
    // t1 and t2 twice as busy as t3 and t4 (each sleep holds a server connection).
    for (t, n) in [("t1", 8), ("t2", 8), ("t3", 4), ("t4", 4)] {
        let c = f.connect(t).await;
        for _ in 0..n {
            c.batch_execute("SELECT pg_sleep(0.05)").await.unwrap();
        }
    }
    let fleet = f.fleet();
    wait_for(
        "the sampler to see the load",
        Duration::from_secs(10),
        || {
            let s = fleet.metrics.samples.load_full();
            async move { (s.tenant_load.get("t4").copied().unwrap_or(0.0) > 0.0).then_some(()) }
        },
    )
    .await;

    // A dry run plans and changes nothing.
    let (status, dry) = f
        .admin(
            "POST",
            "/v1/pods/pod1/split",
            Some(json!({"dry_run": true})),
        )
        .await;
    assert_eq!(status.as_u16(), 200, "{dry}");
    assert_eq!(dry["plan"]["target"], "pod2");
    assert_eq!(dry["plan"]["moves"].as_array().unwrap().len(), 2, "{dry}");
    assert_eq!(pods(&f).await.len(), 2, "a dry run adds no pod");

    let (status, started) = f
        .admin("POST", "/v1/pods/pod1/split", Some(json!({})))
        .await;
    assert_eq!(status.as_u16(), 202, "{started}");
    assert_eq!(started["kind"], "split");
    let id = started["id"].as_i64().unwrap();
    let done = wait_job(&f, id, Duration::from_secs(180)).await;
    assert_eq!(done["state"], "succeeded", "{done}");
    assert_eq!(done["progress"]["done"], 2, "{done}");
    assert_eq!(done["progress"]["unit"], "tenants");

    // The new pod is registered and holds the moved half of the load.
    let all = pods(&f).await;
    let new = all
        .iter()
        .find(|p| p["name"] == "pod2")
        .unwrap_or_else(|| panic!("no pod2 in {all:?}"));
    assert_eq!(new["tenants"], 2, "{new}");
    let (on1, on2) = (tenants_on(&f, "pod1").await, tenants_on(&f, "pod2").await);
    assert_eq!(on1.len() + on2.len(), 4);
    // Half the load: one busy and one quiet tenant on each side.
    let busy = |side: &[String]| side.iter().filter(|t| *t == "t1" || *t == "t2").count();
    assert_eq!(
        (busy(&on1), busy(&on2)),
        (1, 1),
        "pod1 {on1:?}, pod2 {on2:?}"
    );
    // Every tenant answers through the router with its data.
    assert_items(&f, &names, |_| 100).await;
    // Audited: the new pod and the split.
    let (_, audit) = f.admin("GET", "/v1/audit?limit=200", None).await;
    let actions: Vec<&str> = audit["entries"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e["action"].as_str())
        .collect();
    assert!(actions.contains(&"pod.add"), "{actions:?}");
    f.stop().await;
}

/// `[autopilot] mode = "apply"`: real load pushes a pod over its busy threshold; the
/// autopilot splits it once, audited with the figures, and then — though both halves are
/// still over the (deliberately tiny) threshold — starts nothing more within `cooldown`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn autopilot_in_apply_mode_splits_a_hot_pod_once() {
    let mut f = TestFleet::start(Options {
        config_extra: "\n[metrics]\nsample_every = \"250ms\"\nload_window = \"2s\"\n\n[provider]\nkind = \"local\"\n\n[autopilot]\nmode = \"apply\"\nsplit_when = { busy_ratio = 0.05, for = \"1s\" }\ncooldown = \"10m\"\n".into(),
        ..Options::default()
    })
    .await;
    let names = ["h1", "h2", "h3", "h4"];
    seed(&f, &names, |_| 100).await;
    // Each tenant about one busy second per second against pod1's default capacity of 4.
    let stop = tokio_util::sync::CancellationToken::new();
    let mut load = Vec::new();
    for t in names {
        let (url, stop) = (f.app_url(t), stop.clone());
        load.push(tokio::spawn(async move {
            let c = connect(&url).await.unwrap();
            let mut n = 0u64;
            while !stop.is_cancelled() {
                // Through the split's moves: held at the pause, never failed.
                c.batch_execute("SELECT pg_sleep(0.02)")
                    .await
                    .unwrap_or_else(|e| panic!("tenant {url}: {e}"));
                n += 1;
            }
            n
        }));
    }
    let applied = wait_for(
        "the autopilot to start a split",
        Duration::from_secs(30),
        || async {
            let (_, audit) = f.admin("GET", "/v1/audit?limit=200", None).await;
            audit["entries"]
                .as_array()
                .unwrap()
                .iter()
                .find(|e| e["action"] == "autopilot.apply")
                .cloned()
        },
    )
    .await;
    assert_eq!(applied["target"], "pod1", "{applied}");
    assert!(
        applied["detail"]["decision"]["figures"]["busy_ratio"]
            .as_f64()
            .unwrap()
            >= 0.05,
        "{applied}"
    );
    let id = applied["detail"]["job"]["id"].as_i64().unwrap();
    let done = wait_job(&f, id, Duration::from_secs(180)).await;
    assert_eq!(done["state"], "succeeded", "{done}");
    assert_eq!(done["kind"], "split");
    assert_eq!(tenants_on(&f, "pod2").await.len(), 2);
    // Both halves stay over the threshold: recommendations stand again, but the cooldown
    // holds the autopilot back.
    let fleet = f.fleet();
    wait_for(
        "a standing recommendation after the split",
        Duration::from_secs(20),
        || {
            let r = fleet.planner.autopilot.recommendations();
            async move { r.recommendations.iter().any(|r| r.ready).then_some(()) }
        },
    )
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (_, audit) = f.admin("GET", "/v1/audit?limit=500", None).await;
    let applies = audit["entries"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["action"] == "autopilot.apply")
        .count();
    assert_eq!(applies, 1, "one split, no flapping: {audit}");
    assert_eq!(pods(&f).await.len(), 3);
    stop.cancel();
    for l in load {
        assert!(l.await.unwrap() > 10);
    }
    assert_items(&f, &names, |_| 100).await;
    f.stop().await;
}

/// `podrouter split` as the real binary: `--dry-run` prints the plan (and `--json` the
/// API's) and changes nothing; refusals exit 2 with the API's message; the split itself is
/// followed move by move to exit 0, and the planned tenants end on the new pod with their
/// data. `recommendations` prints the autopilot's board.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_split_plans_then_moves_the_planned_tenants_to_a_new_pod() {
    use crate::admin_jobs::run_cli;
    let mut f = TestFleet::start(Options {
        config_extra: "\n[metrics]\nsample_every = \"250ms\"\nsize_every = \"250ms\"\nload_window = \"60s\"\n\n[provider]\nkind = \"local\"\n".into(),
        ..Options::default()
    })
    .await;
    let names = ["c1", "c2", "c3", "c4"];
    // c3 holds more data than the others.
    let rows = |t: &str| if t == "c3" { 20_000 } else { 100 };
    seed(&f, &names, rows).await;
    // Busy time 3 : 2 : 2 : 1. Half of it is {c1, c4} or {c2, c3} (16 queries each, so the
    // per-query overhead is the same on both sides); the tie goes to fewer bytes to copy,
    // and c3 is the big one: the plan is {c1, c4}, whatever the timing noise.
    for (t, n) in [("c1", 12), ("c2", 8), ("c3", 8), ("c4", 4)] {
        let c = f.connect(t).await;
        for _ in 0..n {
            c.batch_execute("SELECT pg_sleep(0.05)").await.unwrap();
        }
    }
    let fleet = f.fleet();
    wait_for(
        "the sampler to see the load and the sizes",
        Duration::from_secs(10),
        || {
            let s = fleet.metrics.samples.load_full();
            async move {
                let size = |t: &str| {
                    s.pods
                        .get("pod1")
                        .and_then(|p| p.databases.get(t))
                        .and_then(|d| d.size_bytes)
                        .unwrap_or(0)
                };
                let loaded = s.tenant_load.get("c4").copied().unwrap_or(0.0) > 0.0;
                (loaded && size("c3") > size("c1") + 500_000).then_some(())
            }
        },
    )
    .await;

    // The dry run as a table: the header, one row per move, each pod before → after.
    let (code, out, err) = run_cli(&f, &["split", "pod1", "--dry-run"]).await;
    assert_eq!(code, 0, "stdout:\n{out}\nstderr:\n{err}");
    assert!(
        out.starts_with("split pod1 onto pod2 (a new pod from the provider): 2 of 4 tenant(s), "),
        "{out}"
    );
    let planned: Vec<&str> = out
        .lines()
        .filter_map(|l| {
            let cells: Vec<&str> = l.split_whitespace().collect();
            match cells[..] {
                [tenant, "pod1", "pod2", ..] => Some(tenant),
                _ => None,
            }
        })
        .collect();
    assert_eq!(planned, ["c1", "c4"], "{out}");
    let pod_row = |pod: &str| {
        out.lines()
            .find(|l| l.starts_with(&format!("{pod} ")))
            .unwrap_or_else(|| panic!("no row for {pod} in:\n{out}"))
            .split_whitespace()
            .collect::<Vec<_>>()
    };
    assert_eq!(pod_row("pod1")[1..4], ["4", "→", "2"], "{out}");
    assert_eq!(pod_row("pod2")[1..4], ["0", "→", "2"], "{out}");
    // ... and as the API's JSON, with the same moves.
    let (code, out, err) = run_cli(&f, &["split", "pod1", "--dry-run", "--json"]).await;
    assert_eq!(code, 0, "{err}");
    let dry: Value = serde_json::from_str(&out).expect("split --dry-run --json is JSON");
    let mut json_planned: Vec<&str> = dry["plan"]["moves"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["tenant"].as_str().unwrap())
        .collect();
    json_planned.sort();
    assert_eq!(json_planned, planned, "{dry}");
    assert_eq!(pods(&f).await.len(), 2, "a dry run adds no pod");

    // Refusals: exit 2 with the API's error, nothing started.
    for (args, code_name) in [
        (&["split", "nosuch", "--dry-run"][..], "unknown_pod"),
        (&["split", "nosuch"][..], "unknown_pod"),
        (&["split", "pod1", "--to", "pod1"][..], "bad_split_target"),
    ] {
        let (code, _, err) = run_cli(&f, args).await;
        assert_eq!(code, 2, "{args:?}: {err}");
        assert!(err.contains(code_name), "{args:?}: {err}");
    }
    let (_, jobs) = f.admin("GET", "/v1/jobs", None).await;
    assert_eq!(jobs["jobs"].as_array().unwrap().len(), 0, "{jobs}");

    // The split, followed to its end: the job's phase, each tenant's move, the summary.
    let (code, out, err) = run_cli(&f, &["split", "pod1"]).await;
    assert_eq!(code, 0, "stdout:\n{out}\nstderr:\n{err}");
    assert!(out.contains("split pod1: moving"), "{out}");
    for t in &planned {
        assert!(
            out.lines()
                .any(|l| l.contains(&format!("  {t} → pod2 (job "))
                    && l.contains(": succeeded (clients paused ")),
            "no line for {t}'s move succeeding in:\n{out}"
        );
    }
    assert!(
        out.lines().last().is_some_and(
            |l| l.contains("succeeded") && l.ends_with("(2 of 2 tenant(s) moved to pod2)")
        ),
        "{out}"
    );
    let mut on2 = tenants_on(&f, "pod2").await;
    on2.sort();
    assert_eq!(on2, planned, "the planned tenants are on the new pod");
    assert_eq!(tenants_on(&f, "pod1").await.len(), 2);
    assert_items(&f, &names, rows).await;
    // The new pod is a server of its own, and the moved tenants' data is there.
    let (_, all) = f.admin("GET", "/v1/pods", None).await;
    let new_primary = all["pods"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "pod2")
        .and_then(|p| p["primary"].as_str())
        .unwrap()
        .to_owned();
    for t in &planned {
        let direct = connect(&format!("{new_primary}/{t}")).await.unwrap();
        let n: i64 = direct
            .query_one("SELECT count(*) FROM items", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(n, 100, "{t} on pod2's own server");
    }

    // recommendations: the board in recommend mode (the default), as a table and as JSON.
    let (code, out, err) = run_cli(&f, &["recommendations"]).await;
    assert_eq!(code, 0, "{err}");
    assert!(
        out.starts_with("autopilot mode recommend, judged at "),
        "{out}"
    );
    let (code, out, _) = run_cli(&f, &["recommendations", "--json"]).await;
    assert_eq!(code, 0);
    let board: Value = serde_json::from_str(&out).expect("recommendations --json is JSON");
    assert_eq!(board["mode"], "recommend", "{board}");
    assert!(board["recommendations"].is_array(), "{board}");
    f.stop().await;
}
