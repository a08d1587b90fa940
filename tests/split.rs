//! Splitting a pod end to end over real pods: the local provider makes the new pod, it is
//! registered, about half the load moves there as one `split` job of move jobs, and every
//! tenant still answers with its data; a dry run changes nothing.

mod support;

use serde_json::{json, Value};
use std::time::Duration;
use support::*;

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
