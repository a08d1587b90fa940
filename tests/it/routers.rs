//! Several routers on one catalog: a move's pause holds the clients of every live router
//! (DESIGN.md "Scaling out"), and a router recovers only the jobs of routers that are gone.

use crate::support::*;
use podrouter::config::Config;
use podrouter::service::{self, Listeners, Running};
use serde_json::json;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// A second router in this process, on the same config file (so the same catalog and pods).
async fn second_router(f: &TestFleet) -> Running {
    let config = Config::load(&f.config_path).unwrap();
    let listeners = Listeners::bind(&config).await.unwrap();
    service::start(config, Some(f.config_path.clone()), listeners)
        .await
        .expect("second router starts")
}

/// Inserts rows through `url` one transaction at a time until `stop`; returns how many
/// committed and the errors seen.
async fn writer(url: String, tag: &'static str, stop: Arc<AtomicBool>) -> (i64, Vec<String>) {
    let c = connect(&url).await.expect("connect");
    let (mut ok, mut errors) = (0, Vec::new());
    for _ in 0..200_000 {
        if stop.load(Ordering::Relaxed) {
            break;
        }
        match c
            .execute("insert into items (body) values ($1)", &[&tag])
            .await
        {
            Ok(_) => ok += 1,
            Err(e) => errors.push(message(&e)),
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    (ok, errors)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_move_holds_the_clients_of_every_router_and_fails_none() {
    let f = TestFleet::start(Options::default()).await;
    f.tenant("acme", 0).await;
    f.connect("acme")
        .await
        .batch_execute("create table items (id bigserial primary key, body text not null)")
        .await
        .unwrap();
    let b = second_router(&f).await;
    let b_url = format!("postgres://{ROLE}:{PASSWORD}@{}/acme", b.pg_addr);
    let stop = Arc::new(AtomicBool::new(false));
    let on_a = tokio::spawn(writer(f.app_url("acme"), "a", stop.clone()));
    let on_b = tokio::spawn(writer(b_url, "b", stop.clone()));
    tokio::time::sleep(Duration::from_millis(500)).await;

    let (status, job) = f
        .admin("POST", "/v1/tenants/acme/move", Some(json!({"to": "pod1"})))
        .await;
    assert_eq!(status.as_u16(), 202, "{job}");
    let id = job["id"].as_i64().unwrap();
    let done = wait_job(&f, id, Duration::from_secs(120)).await;
    assert_eq!(done["state"], "succeeded", "{done}");
    // Both routers go on writing to the target for a moment.
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    let (a_ok, a_err) = on_a.await.unwrap();
    let (b_ok, b_err) = on_b.await.unwrap();
    assert!(a_err.is_empty(), "router A's client failed: {a_err:?}");
    assert!(b_err.is_empty(), "router B's client failed: {b_err:?}");
    assert!(a_ok > 50 && b_ok > 50, "a {a_ok}, b {b_ok}");

    // Every committed row is on the target, once.
    let t = pod_admin(&f.pods[1], "acme").await;
    let rows = t
        .query(
            "select body, count(*) from items group by body order by body",
            &[],
        )
        .await
        .unwrap();
    let counts: Vec<(String, i64)> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
    assert_eq!(counts, vec![("a".into(), a_ok), ("b".into(), b_ok)]);

    // Router B held the tenant and said so before the fence.
    let b_id = b.fleet.router_id.get().expect("B registered");
    let catalog = b.fleet.catalog.pool();
    let acks: Vec<(i32, bool)> = sqlx::query_as(
        "select a.router, a.drained from move_pause_acks a join move_pauses p on p.id = a.pause
          where p.job = $1",
    )
    .bind(id)
    .fetch_all(catalog)
    .await
    .unwrap();
    assert!(acks.contains(&(b_id, true)), "acks {acks:?}");
    assert!(
        !b.fleet.proxy.gates.get("acme").is_paused(),
        "B resumed its clients"
    );
    let route = b.fleet.table.load().tenants["acme"].pod.name.clone();
    assert_eq!(route, "pod1", "B follows the switched route");
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_router_recovers_the_jobs_of_routers_that_are_gone_and_no_others() {
    let f = TestFleet::start(Options {
        pods: 1,
        ..Default::default()
    })
    .await;
    let a = f.fleet();
    let a_id = a.router_id.get().expect("A registered");
    let pool = a.catalog.pool().clone();
    let insert = |owner: i32| {
        let pool = pool.clone();
        async move {
            sqlx::query_scalar::<_, i64>(
                "insert into jobs (kind, state, phase, owner) values ('split', 'running', 'moving', $1) returning id",
            )
            .bind(owner)
            .fetch_one(&pool)
            .await
            .unwrap()
        }
    };
    let alive = insert(a_id).await;
    // An id no router holds: its router is gone.
    let orphan = insert(a_id + 1000).await;

    let b = second_router(&f).await;
    let b_id = b.fleet.router_id.get().expect("B registered");
    assert_ne!(a_id, b_id);
    let state = |id: i64| {
        let pool = pool.clone();
        async move {
            sqlx::query_as::<_, (String, Option<i32>)>(
                "select state, owner from jobs where id = $1",
            )
            .bind(id)
            .fetch_one(&pool)
            .await
            .unwrap()
        }
    };
    assert_eq!(state(alive).await, ("running".into(), Some(a_id)));
    // Taken over and closed by a live router: B at its start, or A's janitor if it swept
    // first.
    wait_for(
        "the orphan job to be closed",
        Duration::from_secs(20),
        || async {
            let (st, owner) = state(orphan).await;
            (st == "failed" && (owner == Some(a_id) || owner == Some(b_id))).then_some(())
        },
    )
    .await;

    // Once A is gone, B takes its job over at its next sweep.
    let mut f = f;
    drop(a);
    f.stop().await;
    wait_for("router A to leave", Duration::from_secs(10), || async {
        let live = podrouter::fleet::routers::is_live(&b.fleet, Some(a_id))
            .await
            .unwrap();
        (!live).then_some(())
    })
    .await;
    // B's own sweep (its janitor may be at it already; only one of the two takes the job).
    podrouter::mover::recover(&b.fleet).await;
    wait_for("B to close A's job", Duration::from_secs(20), || async {
        (state(alive).await == ("failed".into(), Some(b_id))).then_some(())
    })
    .await;
    b.shutdown().await;
}
