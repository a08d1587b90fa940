//! Splitting a pod end to end over real pods: the local provider makes the new pod, it is
//! registered, about half the load moves there as one `split` job of move jobs, and every
//! tenant still answers with its data; a dry run changes nothing.

use crate::support::*;
use serde_json::{json, Value};
use std::time::Duration;

async fn job(f: &TestFleet, id: i64) -> Value {
    let (status, j) = f.admin("GET", &format!("/v1/jobs/{id}"), None).await;
    assert_eq!(status.as_u16(), 200, "{j}");
    j
}

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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn split_moves_half_the_load_to_a_new_local_pod() {
    let mut f = TestFleet::start(Options {
        config_extra: "\n[metrics]\nsample_every = \"250ms\"\nload_window = \"60s\"\n\n[provider]\nkind = \"local\"\n".into(),
        ..Options::default()
    })
    .await;
    let names = ["t1", "t2", "t3", "t4"];
    for t in names {
        f.tenant(t, 1).await;
        let c = f.connect(t).await;
        c.batch_execute(&format!(
            "CREATE TABLE items (id serial PRIMARY KEY, v text);
             INSERT INTO items (v) SELECT '{t}-' || g FROM generate_series(1, 100) g"
        ))
        .await
        .unwrap();
    }
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
    let done = wait_for("the split job to end", Duration::from_secs(180), || async {
        let j = job(&f, id).await;
        matches!(
            j["state"].as_str(),
            Some("succeeded" | "failed" | "cancelled")
        )
        .then_some(j)
    })
    .await;
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
    for t in names {
        let c = f.connect(t).await;
        let n: i64 = c
            .query_one("SELECT count(*) FROM items", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(n, 100, "{t}");
    }
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
    for t in names {
        f.tenant(t, 1).await;
        let c = f.connect(t).await;
        c.batch_execute(&format!(
            "CREATE TABLE items (id serial PRIMARY KEY, v text);
             INSERT INTO items (v) SELECT '{t}-' || g FROM generate_series(1, 100) g"
        ))
        .await
        .unwrap();
    }
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
    let done = wait_for("the split job to end", Duration::from_secs(180), || async {
        let j = job(&f, id).await;
        matches!(
            j["state"].as_str(),
            Some("succeeded" | "failed" | "cancelled")
        )
        .then_some(j)
    })
    .await;
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
    for t in names {
        let c = f.connect(t).await;
        let n: i64 = c
            .query_one("SELECT count(*) FROM items", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(n, 100, "{t}");
    }
    f.stop().await;
}
