//! Pool limits and modes: the per-pod cap on server connections, the per-tenant cap on
//! clients, pool mode per tenant, session-only features in transaction mode, and idle server
//! connections that died in the pool.

use crate::support::*;
use podrouter::config::PoolMode;
use std::time::{Duration, Instant};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_never_gets_more_than_its_connection_cap() {
    let f = TestFleet::start(Options {
        pods: 1,
        mode: PoolMode::Session,
        pool_size: 5,
        checkout_timeout: "700ms",
        pool_extra: "max_pod_connections = 2\n",
        ..Default::default()
    })
    .await;
    f.tenant("alpha", 0).await;
    f.tenant("beta", 0).await;
    let a1 = f.connect("alpha").await;
    let a2 = f.connect("alpha").await;
    // The pod is full with alpha's two sessions: beta waits, then gets a clear 53300.
    let started = Instant::now();
    let e = connect(&f.app_url("beta")).await.unwrap_err();
    assert_eq!(code(&e), "53300");
    assert!(
        message(&e).contains("limit of 2 server connections"),
        "{}",
        message(&e)
    );
    assert!(started.elapsed() < Duration::from_secs(3));
    // When alpha's sessions end, their connections idle in alpha's pool; beta takes their
    // pod slots by closing them.
    drop((a1, a2));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let b = f.connect("beta").await;
    b.simple_query("select 1").await.unwrap();
    let admin = pod_admin(&f.pods[0], "postgres").await;
    let n: i64 = admin
        .query_one(
            "select count(*) from pg_stat_activity where usename = $1",
            &[&ROLE],
        )
        .await
        .unwrap()
        .get(0);
    assert!(n <= 2, "the pod holds {n} server connections, cap is 2");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_cannot_take_every_client_slot() {
    let f = TestFleet::start(Options {
        pods: 1,
        pool_extra: "max_clients_per_tenant = 2\n",
        ..Default::default()
    })
    .await;
    f.tenant("noisy", 0).await;
    f.tenant("quiet", 0).await;
    let _c1 = f.connect("noisy").await;
    let _c2 = f.connect("noisy").await;
    let e = connect(&f.app_url("noisy")).await.unwrap_err();
    assert_eq!(code(&e), "53300");
    assert!(
        message(&e).contains("too many connections for tenant \"noisy\""),
        "{}",
        message(&e)
    );
    // Other tenants are unaffected, and the slot frees when a client leaves.
    f.connect("quiet")
        .await
        .simple_query("select 1")
        .await
        .unwrap();
    drop(_c1);
    tokio::time::sleep(Duration::from_millis(200)).await;
    f.connect("noisy")
        .await
        .simple_query("select 1")
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_only_features_need_session_mode_per_tenant() {
    let f = TestFleet::start(Options {
        pods: 1,
        mode: PoolMode::Transaction,
        ..Default::default()
    })
    .await;
    f.tenant("jobs", 0).await;
    let c = f.connect("jobs").await;
    for q in [
        "LISTEN events",
        "select pg_advisory_lock(7)",
        "declare c cursor with hold for select 1",
    ] {
        let e = c.simple_query(q).await.unwrap_err();
        assert_eq!(code(&e), "0A000", "{q}");
        assert!(
            message(&e).contains("transaction pooling"),
            "{q}: {}",
            message(&e)
        );
    }
    // The same through the extended protocol (a query with parameters; JDBC, tokio-postgres
    // and pipelines send every query so): refused at its Parse, the rest of the batch dropped.
    let e = c
        .query("select pg_advisory_lock($1)", &[&7i64])
        .await
        .unwrap_err();
    assert_eq!(code(&e), "0A000", "{e}");
    let e = c.execute("LISTEN events", &[]).await.unwrap_err();
    assert_eq!(code(&e), "0A000", "{e}");
    let e = c
        .query("declare d cursor with hold for select $1::int", &[&1i32])
        .await
        .unwrap_err();
    assert_eq!(code(&e), "0A000", "{e}");
    // The connection stays usable, and the transaction-scoped lock works.
    c.simple_query("select pg_advisory_xact_lock(7)")
        .await
        .unwrap();
    let got: bool = c
        .query_one("select pg_try_advisory_xact_lock($1)", &[&7i64])
        .await
        .unwrap()
        .get(0);
    assert!(
        got,
        "the transaction-scoped lock through the extended protocol"
    );
    // Nothing refused reached a server: no server session holds lock 7 (the router holds
    // locks of its own in the catalog, on this pod too).
    let held: Option<String> = c
        .query_one(
            "select string_agg(format('pid %s key %s: %s', l.pid, l.objid, a.query), '; ') \
             from pg_locks l join pg_stat_activity a using (pid) \
             where l.locktype = 'advisory' and l.objid = 7 and l.pid <> pg_backend_pid()",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(held, None, "advisory locks held by server sessions");
    // Switch the tenant to session mode: new sessions may LISTEN.
    let t = f
        .fleet()
        .set_tenant_pool_mode("jobs", Some(PoolMode::Session), "test")
        .await
        .unwrap();
    assert_eq!(t.pool_mode.as_deref(), Some("session"));
    let s = f.connect("jobs").await;
    s.simple_query("LISTEN events").await.unwrap();
    s.simple_query("select pg_advisory_lock(7)").await.unwrap();
    // Back to the default.
    let t = f
        .fleet()
        .set_tenant_pool_mode("jobs", None, "test")
        .await
        .unwrap();
    assert_eq!(t.pool_mode, None);
    assert_eq!(
        code(
            &f.connect("jobs")
                .await
                .simple_query("LISTEN x")
                .await
                .unwrap_err()
        ),
        "0A000"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_idle_server_connections_are_replaced_transparently() {
    let f = TestFleet::acme(Options::one_pod(PoolMode::Transaction, 1)).await;
    let c = f.connect("acme").await;
    // The simple protocol: an extended-protocol query would leave tokio-postgres closing its
    // statement in the background, which may still be using the server connection (not idle)
    // when the pod ends it.
    async fn pid(c: &tokio_postgres::Client) -> i32 {
        let reply = c.simple_query("select pg_backend_pid()").await.unwrap();
        reply
            .iter()
            .find_map(|m| match m {
                tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0)?.parse().ok(),
                _ => None,
            })
            .expect("a row with the pid")
    }
    let first = pid(&c).await;
    // The pod ends the idle server connection behind the router's back.
    let admin = pod_admin(&f.pods[0], "postgres").await;
    admin
        .execute("select pg_terminate_backend($1)", &[&first])
        .await
        .unwrap();
    // Gone for sure (pg_terminate_backend only signals): its socket is closed by now.
    wait_for("the backend to exit", Duration::from_secs(10), || async {
        admin
            .query_opt("select 1 from pg_stat_activity where pid = $1", &[&first])
            .await
            .unwrap()
            .is_none()
            .then_some(())
    })
    .await;
    let second = pid(&c).await;
    assert_ne!(
        first, second,
        "a new server connection serves the client, without an error"
    );
}
