//! Replicas, read-only routing, failover and failback, against real streaming replicas
//! (pg_basebackup clones of the pods, started as local clusters). pod0 holds the catalog, so
//! the tenant under test always lives on pod1, which has the replicas.

use crate::support::*;
use serde_json::{json, Value};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio_postgres::NoTls;

/// A client of `db` through the router with `-c podrouter.target=TARGET`.
async fn connect_target(
    f: &TestFleet,
    db: &str,
    target: &str,
) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let mut cfg: tokio_postgres::Config = f.app_url(db).parse().unwrap();
    cfg.options(format!("-c podrouter.target={target}"));
    let (client, conn) = cfg.connect(NoTls).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(client)
}

async fn pod(f: &TestFleet, name: &str) -> Value {
    let (s, v) = f.admin("GET", "/v1/pods", None).await;
    assert_eq!(s, 200, "{v}");
    v["pods"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == name)
        .cloned()
        .unwrap_or_else(|| panic!("no pod {name} in {v}"))
}

async fn in_recovery(c: &tokio_postgres::Client) -> Option<bool> {
    c.query_one("SELECT pg_is_in_recovery()", &[])
        .await
        .ok()
        .map(|r| r.get(0))
}

async fn server_port(c: &tokio_postgres::Client) -> i32 {
    c.query_one("SELECT inet_server_port()", &[])
        .await
        .unwrap()
        .get(0)
}

/// Waits until the health monitor has seen `url` (a replica of `pod`) up and in recovery.
async fn monitor_sees_standby(f: &TestFleet, pod_name: &str, url: &str) {
    let fleet = f.fleet();
    wait_for(
        "the monitor to see the standby",
        Duration::from_secs(10),
        || {
            let fleet = fleet.clone();
            async move {
                let board = fleet.proxy.health.load();
                board
                    .pods
                    .get(pod_name)?
                    .replicas
                    .iter()
                    .find(|r| r.url == url && r.in_recovery() == Some(true))?;
                Some(())
            }
        },
    )
    .await;
}

async fn audit_actions(f: &TestFleet) -> Vec<(String, String, String)> {
    let (_, v) = f.admin("GET", "/v1/audit?limit=50", None).await;
    v["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["action"].as_str().unwrap().to_owned(),
                e["actor"].as_str().unwrap().to_owned(),
                e["target"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_go_to_a_replica_on_request_and_fall_back_to_the_primary() {
    let mut f = TestFleet::start(Options {
        replicas: 1,
        ..Default::default()
    })
    .await;
    f.tenant("acme", 1).await;
    let replica_port = f.replicas[1][0].port() as i32;
    let rw = f.connect("acme").await;
    rw.batch_execute(
        "CREATE TABLE notes (id int PRIMARY KEY, body text); INSERT INTO notes VALUES (1, 'one')",
    )
    .await
    .unwrap();

    let ro = connect_target(&f, "acme", "replica").await.unwrap();
    let ro = &ro;
    // The setting is the router's own: no server ever sees it.
    let forwarded: Option<String> = ro
        .query_one("SELECT current_setting('podrouter.target', true)", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(forwarded, None);
    wait_for(
        "reads on the replica",
        Duration::from_secs(10),
        || async move { (in_recovery(ro).await == Some(true)).then_some(()) },
    )
    .await;
    assert_eq!(server_port(ro).await, replica_port);

    // What the primary commits through the router is read on the replica once replayed.
    rw.execute("INSERT INTO notes VALUES (2, 'two')", &[])
        .await
        .unwrap();
    let body: String = wait_for(
        "the insert to replay",
        Duration::from_secs(10),
        || async move {
            // Until the replica has replayed the CREATE TABLE, the table is not there either.
            ro.query_opt("SELECT body FROM notes WHERE id = 2", &[])
                .await
                .ok()?
                .map(|r| r.get(0))
        },
    )
    .await;
    assert_eq!(body, "two");
    let e = ro
        .execute("INSERT INTO notes VALUES (3, 'no')", &[])
        .await
        .unwrap_err();
    assert_eq!(code(&e), "25006", "a replica is read-only: {e}");
    assert_eq!(
        in_recovery(&rw).await,
        Some(false),
        "writers stay on the primary"
    );
    let e = connect_target(&f, "acme", "standby").await.unwrap_err();
    assert_eq!(code(&e), "22023", "{e}");

    // The pod list shows each replica's health and lag, from the monitor.
    let p = pod(&f, "pod1").await;
    assert_eq!(p["health"], "up", "{p}");
    assert_eq!(p["replicas"][0]["url"], f.replicas[1][0].url(), "{p}");
    assert_eq!(p["replicas"][0]["health"], "up", "{p}");
    assert!(p["replicas"][0]["lag_bytes"].is_u64(), "{p}");
    assert!(p["replicas"][0]["lag_seconds"].is_number(), "{p}");

    // Replica gone: read-only sessions use the primary (a checkout that finds the replica
    // down before the monitor does falls back to the primary too).
    f.replicas[1][0].stop().await;
    let f = &f;
    wait_for(
        "reads to fall back to the primary",
        Duration::from_secs(10),
        || async move {
            let c = connect_target(f, "acme", "replica").await.ok()?;
            (in_recovery(&c).await == Some(false)).then_some(())
        },
    )
    .await;
    let c = connect_target(f, "acme", "replica").await.unwrap();
    assert_eq!(server_port(&c).await, f.pods[1].port() as i32);
    wait_for(
        "the pod list to show the replica down",
        Duration::from_secs(10),
        || async move {
            let p = pod(f, "pod1").await;
            p["replicas"][0]["health"]
                .as_str()?
                .starts_with("down: ")
                .then_some(())
        },
    )
    .await;
}

/// Inserts increasing ids through the router until `stop`, reconnecting after errors;
/// records the ids acknowledged and every error as (SQLSTATE, message).
async fn write_loop(
    url: String,
    stop: Arc<AtomicBool>,
    acked: Arc<Mutex<Vec<i32>>>,
    errors: Arc<Mutex<Vec<(String, String)>>>,
) {
    let mut client = None;
    let mut next = 0;
    while !stop.load(Ordering::Relaxed) {
        if client.is_none() {
            match connect(&url).await {
                Ok(c) => client = Some(c),
                Err(e) => {
                    errors.lock().unwrap().push((code(&e), message(&e)));
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            }
        }
        next += 1;
        let c = client.as_ref().expect("connected");
        // One simple query per insert: a single request in flight, so the error that ends
        // the connection is reported for it (an extended-protocol execute would pipeline the
        // Close of the previous statement ahead of it, and get only "connection closed").
        match c
            .batch_execute(&format!("INSERT INTO events VALUES ({next})"))
            .await
        {
            Ok(_) => acked.lock().unwrap().push(next),
            Err(e) => {
                errors.lock().unwrap().push((code(&e), message(&e)));
                client = None;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

fn len<T>(v: &Mutex<Vec<T>>) -> usize {
    v.lock().unwrap().len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failover_after_a_crash_keeps_every_acknowledged_write() {
    let mut f = TestFleet::start(Options {
        replicas: 1,
        synchronous: true,
        pod_settings: vec![("synchronous_commit", "on".into())],
        ..Default::default()
    })
    .await;
    f.tenant("acme", 1).await;
    f.connect("acme")
        .await
        .batch_execute("CREATE TABLE events (id int PRIMARY KEY)")
        .await
        .unwrap();
    let sync: String = pod_admin(&f.pods[1], "postgres")
        .await
        .query_one("SELECT sync_state FROM pg_stat_replication", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(sync, "sync");
    let version = f.admin("GET", "/v1/tenants/acme", None).await.1["route_version"]
        .as_i64()
        .unwrap();

    let (stop, acked, errors) = (
        Arc::new(AtomicBool::new(false)),
        Arc::new(Mutex::new(Vec::new())),
        Arc::new(Mutex::new(Vec::new())),
    );
    let writer = tokio::spawn(write_loop(
        f.app_url("acme"),
        stop.clone(),
        acked.clone(),
        errors.clone(),
    ));
    let (acks, errs) = (&acked, &errors);
    wait_for(
        "writes before the crash",
        Duration::from_secs(10),
        || async move { (len(acks) >= 30).then_some(()) },
    )
    .await;

    f.pods[1].kill9();
    wait_for(
        "clients to notice the crash",
        Duration::from_secs(10),
        || async move { (len(errs) >= 2).then_some(()) },
    )
    .await;
    let before_failover = len(acks);

    let (s, job) = f
        .admin("POST", "/v1/pods/pod1/failover", Some(json!({})))
        .await;
    assert_eq!(s, 200, "{job}");
    assert_eq!(job["kind"], "failover", "{job}");
    assert_eq!(job["state"], "succeeded", "{job}");
    assert_eq!(job["result"]["to"], f.replicas[1][0].url(), "{job}");
    assert_eq!(job["result"]["from"], f.pods[1].url(), "{job}");
    assert_eq!(job["result"]["promoted"], true, "{job}");
    assert_eq!(job["result"]["fenced_old_primary"], false, "{job}");

    // Writes succeed again through the same router, on the promoted replica.
    wait_for(
        "writes after the failover",
        Duration::from_secs(15),
        || async move { (len(acks) >= before_failover + 30).then_some(()) },
    )
    .await;
    stop.store(true, Ordering::Relaxed);
    writer.await.unwrap();

    // Clients were told clearly. A query that was on its way to a server when the pod died
    // gets the server's own goodbye (relayed as it came, followed by podrouter's 08006); every
    // other one gets podrouter's 08006 naming the tenant.
    let errors = errors.lock().unwrap().clone();
    let from_router = |(code, message): &(String, String)| {
        code.starts_with("08") && message.contains("tenant \"acme\"")
    };
    let from_dying_server = |(code, message): &(String, String)| {
        code == "57P01" && message.contains("terminating connection")
    };
    assert!(errors.iter().any(from_router), "{errors:?}");
    assert!(
        errors
            .iter()
            .all(|e| from_router(e) || from_dying_server(e)),
        "{errors:?}"
    );
    // Synchronous replication: nothing acknowledged before the crash is lost.
    let acked = acked.lock().unwrap().clone();
    let new_primary = pod_admin(&f.replicas[1][0], "acme").await;
    let present: i64 = new_primary
        .query_one("SELECT count(*) FROM events WHERE id = ANY($1)", &[&acked])
        .await
        .unwrap()
        .get(0);
    assert_eq!(present as usize, acked.len());
    let c = f.connect("acme").await;
    assert_eq!(server_port(&c).await, f.replicas[1][0].port() as i32);

    let p = pod(&f, "pod1").await;
    assert_eq!(p["primary"], f.replicas[1][0].url(), "{p}");
    assert_eq!(p["replicas"][0]["url"], f.pods[1].url(), "{p}");
    assert!(
        p["replicas"][0]["health"]
            .as_str()
            .unwrap()
            .starts_with("down: "),
        "{p}"
    );
    let t = f.admin("GET", "/v1/tenants/acme", None).await.1;
    assert_eq!(t["route_version"].as_i64(), Some(version + 1), "{t}");
    assert!(audit_actions(&f).await.contains(&(
        "pod.failover".into(),
        "admin-api".into(),
        "pod1".into()
    )));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn follows_a_promotion_done_elsewhere() {
    let mut f = TestFleet::start(Options {
        replicas: 1,
        ..Default::default()
    })
    .await;
    f.tenant("acme", 1).await;
    let replica_url = f.replicas[1][0].url();
    f.connect("acme")
        .await
        .batch_execute("CREATE TABLE t (v int); INSERT INTO t VALUES (1)")
        .await
        .unwrap();
    monitor_sees_standby(&f, "pod1", &replica_url).await;

    // What Patroni would do: the primary is gone, the replica is promoted directly.
    f.pods[1].stop().await;
    pod_admin(&f.replicas[1][0], "postgres")
        .await
        .execute("SELECT pg_promote()", &[])
        .await
        .unwrap();
    let (f, replica_url) = (&f, replica_url.as_str());
    wait_for(
        "the router to follow",
        Duration::from_secs(10),
        || async move { (pod(f, "pod1").await["primary"] == replica_url).then_some(()) },
    )
    .await;
    let c = f.connect("acme").await;
    c.execute("INSERT INTO t VALUES (2)", &[]).await.unwrap();
    assert_eq!(server_port(&c).await, f.replicas[1][0].port() as i32);
    let n: i64 = c
        .query_one("SELECT count(*) FROM t", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 2);
    assert!(audit_actions(f).await.contains(&(
        "pod.failover".into(),
        "podrouter-health".into(),
        "pod1".into()
    )));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failback_after_rebuilding_the_old_primary_as_a_replica() {
    let mut f = TestFleet::start(Options {
        replicas: 1,
        ..Default::default()
    })
    .await;
    f.tenant("acme", 1).await;
    let (old_url, old_port) = (f.pods[1].url(), f.pods[1].port());
    let new_url = f.replicas[1][0].url();
    f.connect("acme")
        .await
        .batch_execute("CREATE TABLE t (v int); INSERT INTO t VALUES (1)")
        .await
        .unwrap();

    // Requests the API refuses, before anything is touched.
    let check = |(s, v): (axum::http::StatusCode, Value), status: u16, code: &str| {
        assert_eq!(
            (s.as_u16(), v["error"]["code"].as_str()),
            (status, Some(code)),
            "{v}"
        );
    };
    let post = |path: &'static str, body: Value| f.admin("POST", path, Some(body));
    check(
        post("/v1/pods/nope/failover", json!({})).await,
        404,
        "unknown_pod",
    );
    check(
        post("/v1/pods/pod0/failover", json!({})).await,
        409,
        "no_healthy_replica",
    );
    check(
        post("/v1/pods/pod1/failover", json!({"to": "127.0.0.1:1"})).await,
        400,
        "not_a_replica",
    );
    check(
        post("/v1/pods/pod1/failover", json!({"too": 1})).await,
        400,
        "invalid_json",
    );

    // Planned maintenance on the primary: stop it, fail over to the replica.
    f.pods[1].stop().await;
    let (s, job) = f.admin("POST", "/v1/pods/pod1/failover", None).await;
    assert_eq!(
        (s.as_u16(), job["state"].as_str()),
        (200, Some("succeeded")),
        "{job}"
    );
    assert_eq!(job["result"]["to"], new_url.as_str(), "{job}");
    f.connect("acme")
        .await
        .execute("INSERT INTO t VALUES (2)", &[])
        .await
        .unwrap();

    // The old primary rejoins as a replica of the new one: a fresh clone at its old address.
    let rejoined = standby(
        f.dir.path(),
        &f.replicas[1][0],
        "pod1_rejoined",
        Some(old_port),
        &[],
    )
    .await;
    monitor_sees_standby(&f, "pod1", &old_url).await;
    let p = pod(&f, "pod1").await;
    assert_eq!(
        (p["primary"].as_str(), p["replicas"][0]["health"].as_str()),
        (Some(new_url.as_str()), Some("up")),
        "{p}"
    );

    // Fail back. The current primary still answers, so it is fenced (read-only) first and
    // the rejoined replica catches up with its last WAL before it is promoted.
    let (s, job) = f
        .admin(
            "POST",
            "/v1/pods/pod1/failover",
            Some(json!({"to": old_url})),
        )
        .await;
    assert_eq!(
        (s.as_u16(), job["state"].as_str()),
        (200, Some("succeeded")),
        "{job}"
    );
    assert_eq!(job["result"]["fenced_old_primary"], true, "{job}");
    assert_eq!(job["result"]["promoted"], true, "{job}");
    let c = f.connect("acme").await;
    c.execute("INSERT INTO t VALUES (3)", &[]).await.unwrap();
    assert_eq!(server_port(&c).await, rejoined.port() as i32);
    let rows: Vec<i32> = c
        .query("SELECT v FROM t ORDER BY v", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(rows, [1, 2, 3]);

    // The fenced former primary takes no writes and serves no reads until it is rebuilt.
    let fenced: String = pod_admin(&f.replicas[1][0], "postgres")
        .await
        .query_one("SHOW default_transaction_read_only", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(fenced, "on");
    let p = pod(&f, "pod1").await;
    assert_eq!(p["primary"], old_url.as_str(), "{p}");
    assert_eq!(p["replicas"][0]["url"], new_url.as_str(), "{p}");
    assert_eq!(p["replicas"][0]["health"], "up (not in recovery)", "{p}");
    let ro = connect_target(&f, "acme", "replica").await.unwrap();
    assert_eq!(
        server_port(&ro).await,
        rejoined.port() as i32,
        "no fit replica: the primary"
    );
}
