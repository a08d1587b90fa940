//! The PostgreSQL wire side end to end: real pods, the real router, real clients.

use crate::support::*;
use futures_util::{SinkExt, TryStreamExt};
use podrouter::config::PoolMode;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_postgres::NoTls;

async fn one_row(c: &tokio_postgres::Client, sql: &str) -> (String, i32) {
    let r = c.query_one(sql, &[]).await.unwrap();
    (r.get(0), r.get(1))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenants_reach_their_own_pods() {
    let f = TestFleet::start(Options::default()).await;
    for (t, pod) in [("alpha", 0), ("beta", 1), ("gamma", 0), ("delta", 1)] {
        f.tenant(t, pod).await;
    }
    for (t, pod) in [("alpha", 0), ("beta", 1), ("gamma", 0), ("delta", 1)] {
        let c = f.connect(t).await;
        let (db, port) = one_row(&c, "select current_database()::text, inet_server_port()").await;
        assert_eq!(db, t);
        assert_eq!(
            port as u16,
            f.pods[pod].port(),
            "{t} must be served by pod{pod}"
        );
        // Writes land there too.
        c.batch_execute("create table t (id int primary key); insert into t values (1)")
            .await
            .unwrap();
        let direct = pod_admin(&f.pods[pod], t).await;
        assert_eq!(
            direct
                .query_one("select count(*) from t", &[])
                .await
                .unwrap()
                .get::<_, i64>(0),
            1
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn placement_spreads_tenants_over_pods() {
    let f = TestFleet::start(Options::default()).await;
    let fleet = f.fleet();
    let mut pods = std::collections::HashSet::new();
    for i in 0..8 {
        let t = fleet
            .create_tenant(
                podrouter::fleet::NewTenant {
                    name: format!("spread{i}"),
                    pod: None,
                    roles: vec![ROLE.into()],
                },
                "test",
            )
            .await
            .unwrap();
        pods.insert(t.pod);
    }
    assert_eq!(pods.len(), 2, "8 tenants placed by the ring use both pods");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_and_tenant_errors_look_like_postgres() {
    let f = TestFleet::acme(Options {
        pods: 1,
        ..Default::default()
    })
    .await;
    f.fleet()
        .put_role("other", "other-pw", "test")
        .await
        .unwrap();

    let e = connect(&f.app_url("nosuch")).await.unwrap_err();
    assert_eq!(code(&e), "3D000");
    assert!(
        message(&e).contains("database \"nosuch\" does not exist"),
        "{}",
        message(&e)
    );

    let e = connect(&f.url(ROLE, "wrong", "acme")).await.unwrap_err();
    assert_eq!(code(&e), "28P01");
    assert!(message(&e).contains("password authentication failed for user \"app\""));

    // A real role that is not granted on the tenant fails exactly like a wrong password.
    let e = connect(&f.url("other", "other-pw", "acme"))
        .await
        .unwrap_err();
    assert_eq!(code(&e), "28P01");
    // So does a role that does not exist at all.
    let e = connect(&f.url("ghost", "x", "acme")).await.unwrap_err();
    assert_eq!(code(&e), "28P01");

    // The router keeps serving.
    let c = f.connect("acme").await;
    assert_eq!(
        c.query_one("select 1", &[]).await.unwrap().get::<_, i32>(0),
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_reaches_the_running_query() {
    for mode in [PoolMode::Session, PoolMode::Transaction] {
        let f = TestFleet::acme(Options::one_pod(mode, 5)).await;
        let c = f.connect("acme").await;
        let token = c.cancel_token();
        let started = Instant::now();
        let q = tokio::spawn(async move { c.simple_query("select pg_sleep(30)").await });
        tokio::time::sleep(Duration::from_millis(300)).await;
        token.cancel_query(NoTls).await.unwrap();
        let e = q.await.unwrap().unwrap_err();
        assert_eq!(code(&e), "57014", "{mode}: query canceled");
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "{mode}: the cancel took effect"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copy_in_and_out() {
    let f = TestFleet::acme(Options {
        pods: 1,
        ..Default::default()
    })
    .await;
    let c = f.connect("acme").await;
    c.batch_execute("create table items (id int, name text)")
        .await
        .unwrap();
    let sink = c.copy_in("copy items from stdin").await.unwrap();
    futures_util::pin_mut!(sink);
    let mut data = String::new();
    for i in 0..20_000 {
        data.push_str(&format!("{i}\titem {i}\n"));
    }
    for chunk in data.as_bytes().chunks(7_000) {
        sink.send(bytes::Bytes::copy_from_slice(chunk))
            .await
            .unwrap();
    }
    assert_eq!(sink.finish().await.unwrap(), 20_000);
    let out: Vec<bytes::Bytes> = c
        .copy_out("copy (select * from items order by id) to stdout")
        .await
        .unwrap()
        .try_collect()
        .await
        .unwrap();
    let text: Vec<u8> = out.concat();
    assert_eq!(text, data.as_bytes());
    // A failing COPY leaves the connection usable.
    let e = c
        .simple_query("copy items from '/nonexistent/file'")
        .await
        .unwrap_err();
    assert!(code(&e) == "42501" || code(&e) == "58P01", "{e}");
    assert_eq!(
        c.query_one("select count(*) from items", &[])
            .await
            .unwrap()
            .get::<_, i64>(0),
        20_000
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_client_frees_its_server_connection() {
    for mode in [PoolMode::Session, PoolMode::Transaction] {
        let f = TestFleet::start(Options {
            pods: 1,
            mode,
            pool_size: 1,
            checkout_timeout: "10s",
            ..Default::default()
        })
        .await;
        f.tenant("acme", 0).await;
        // A raw client that starts a long query and then vanishes without a word.
        let (client, conn) = tokio_postgres::connect(&f.app_url("acme"), NoTls)
            .await
            .unwrap();
        let conn_task = tokio::spawn(conn);
        let q = tokio::spawn(async move { client.simple_query("select pg_sleep(60)").await });
        tokio::time::sleep(Duration::from_millis(300)).await;
        conn_task.abort();
        q.abort();
        // The only server connection must come back: a new client gets it quickly.
        let started = Instant::now();
        let c = f.connect("acme").await;
        c.simple_query("select 1").await.unwrap();
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{mode}: server connection was freed"
        );
        let admin = pod_admin(&f.pods[0], "postgres").await;
        let sleeping: i64 = admin
            .query_one("select count(*) from pg_stat_activity where query like 'select pg_sleep(60)%' and state = 'active'", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(
            sleeping, 0,
            "{mode}: the abandoned query was cancelled on the pod"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pod_down_gives_a_clear_error_then_recovers() {
    let mut f = TestFleet::start(Options {
        pods: 2,
        mode: PoolMode::Session,
        ..Default::default()
    })
    .await;
    f.tenant("acme", 1).await;
    f.connect("acme")
        .await
        .simple_query("select 1")
        .await
        .unwrap();
    let port = f.pods[1].port();
    f.pods[1].stop().await;
    let e = connect(&f.app_url("acme")).await.unwrap_err();
    assert!(
        code(&e).starts_with("08"),
        "connection-exception class, got {}",
        code(&e)
    );
    let m = message(&e);
    assert!(m.contains("acme") && m.starts_with("podrouter:"), "{m}");
    assert!(
        !m.contains(&port.to_string()),
        "the error must not leak the pod's address: {m}"
    );
    // Restart the pod on the same port; the router recovers without a restart.
    let datadir = f.pods[1].datadir().to_owned();
    f.pods[1] = podrouter::localpg::LocalCluster::start(&bins(), &datadir, port, &[])
        .await
        .unwrap();
    let c = f.connect("acme").await;
    assert_eq!(
        c.query_one("select 1", &[]).await.unwrap().get::<_, i32>(0),
        1
    );
    f.stop().await;
}

/// Sends raw bytes to the listener and returns what came back before the router closed.
async fn raw(addr: std::net::SocketAddr, bytes: &[u8]) -> Vec<u8> {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let _ = s.write_all(bytes).await;
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(8), s.read_to_end(&mut out)).await;
    out
}

fn startup(params: &[(&str, &str)]) -> Vec<u8> {
    let mut body = 196_608i32.to_be_bytes().to_vec();
    for (k, v) in params {
        body.extend_from_slice(k.as_bytes());
        body.push(0);
        body.extend_from_slice(v.as_bytes());
        body.push(0);
    }
    body.push(0);
    let mut m = ((body.len() + 4) as i32).to_be_bytes().to_vec();
    m.extend_from_slice(&body);
    m
}

fn error_code(reply: &[u8]) -> Option<String> {
    let start = reply.iter().position(|&b| b == b'E')?;
    let body = &reply[start + 5..];
    let i = body.windows(1).position(|w| w[0] == b'C')?;
    let rest = &body[i + 1..];
    let end = rest.iter().position(|&b| b == 0)?;
    Some(String::from_utf8_lossy(&rest[..end]).into_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_and_malformed_input_is_refused_cleanly() {
    let f = TestFleet::acme(Options {
        pods: 1,
        ..Default::default()
    })
    .await;
    let addr = f.running().pg_addr;
    let check = |reply: Vec<u8>, want: &str, what: &str| {
        assert_eq!(
            error_code(&reply).as_deref(),
            Some(want),
            "{what}: got {reply:?}"
        );
    };
    check(
        raw(addr, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await,
        "08P01",
        "HTTP request",
    );
    check(raw(addr, &[0, 0, 0, 3]).await, "08P01", "length too small");
    check(
        raw(addr, &[0x7f, 0, 0, 0]).await,
        "08P01",
        "length too large",
    );
    let mut old_proto = 8i32.to_be_bytes().to_vec();
    old_proto.extend_from_slice(&0x0002_0000i32.to_be_bytes());
    check(raw(addr, &old_proto).await, "08P01", "protocol 2.0");
    check(
        raw(addr, &startup(&[("database", "acme")])).await,
        "28000",
        "no user",
    );
    // Authentication answered with something other than SASL.
    let mut bad_auth = startup(&[("user", ROLE), ("database", "acme")]);
    bad_auth.extend_from_slice(b"Q\0\0\0\x0dselect 1\0");
    check(
        raw(addr, &bad_auth).await,
        "08P01",
        "query before authentication",
    );
    // SSL is declined with 'N' and the startup may continue.
    let mut ssl = 8i32.to_be_bytes().to_vec();
    ssl.extend_from_slice(&80_877_103i32.to_be_bytes());
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(&ssl).await.unwrap();
    let mut n = [0u8; 1];
    s.read_exact(&mut n).await.unwrap();
    assert_eq!(&n, b"N");
    // Random bytes, many times: the router stays up and keeps serving.
    for i in 0..50u32 {
        let junk: Vec<u8> = (0..(i * 37 % 300 + 1))
            .map(|j| (j.wrapping_mul(2_654_435_761u32.wrapping_add(i)) >> 7) as u8)
            .collect();
        let _ = raw(addr, &junk).await;
    }
    // A client that connects and says nothing is cut off by the auth timeout, not kept.
    let c = f.connect("acme").await;
    assert_eq!(
        c.query_one("select 1", &[]).await.unwrap().get::<_, i32>(0),
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transaction_mode_shares_few_server_connections() {
    let f = TestFleet::acme(Options::one_pod(PoolMode::Transaction, 2)).await;
    let setup = f.connect("acme").await;
    setup
        .batch_execute("create table counter (n int); insert into counter values (0)")
        .await
        .unwrap();
    let mut tasks = Vec::new();
    for _ in 0..10 {
        let url = f.app_url("acme");
        tasks.push(tokio::spawn(async move {
            let mut c = connect(&url).await.unwrap();
            for _ in 0..20 {
                let tx = c.transaction().await.unwrap();
                tx.execute("update counter set n = n + 1", &[])
                    .await
                    .unwrap();
                tx.commit().await.unwrap();
            }
            c
        }));
    }
    let clients: Vec<_> = futures_util::future::join_all(tasks)
        .await
        .into_iter()
        .map(Result::unwrap)
        .collect();
    assert_eq!(
        setup
            .query_one("select n from counter", &[])
            .await
            .unwrap()
            .get::<_, i32>(0),
        200
    );
    let admin = pod_admin(&f.pods[0], "postgres").await;
    let n: i64 = admin
        .query_one(
            "select count(*) from pg_stat_activity where usename = $1",
            &[&ROLE],
        )
        .await
        .unwrap()
        .get(0);
    assert!(
        n <= 2,
        "11 clients must share at most 2 server connections, saw {n}"
    );
    drop(clients);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_parameters_follow_the_client() {
    let f = TestFleet::acme(Options::one_pod(PoolMode::Transaction, 1)).await;
    let a = connect(&format!("{}?application_name=alpha", f.app_url("acme")))
        .await
        .unwrap();
    let b = connect(&format!(
        "{}?application_name=beta&options=-c%20DateStyle%3DSQL%2C%5C%20DMY",
        f.app_url("acme")
    ))
    .await
    .unwrap();
    for _ in 0..3 {
        let name: String = a
            .query_one("show application_name", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(name, "alpha");
        let name: String = b
            .query_one("show application_name", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(name, "beta");
        let ds: String = b.query_one("show datestyle", &[]).await.unwrap().get(0);
        assert_eq!(ds, "SQL, DMY");
        let ds: String = a.query_one("show datestyle", &[]).await.unwrap().get(0);
        assert_eq!(
            ds, "ISO, MDY",
            "b's setting must not leak to a on the shared connection"
        );
    }
    // A SET by the client follows it across transactions.
    a.batch_execute("set application_name = 'alpha2'")
        .await
        .unwrap();
    b.simple_query("select 1").await.unwrap();
    let name: String = a
        .query_one("show application_name", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(name, "alpha2");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pool_exhaustion_is_a_53300_not_a_hang() {
    let f = TestFleet::start(Options {
        pods: 1,
        mode: PoolMode::Session,
        pool_size: 1,
        checkout_timeout: "500ms",
        ..Default::default()
    })
    .await;
    f.tenant("acme", 0).await;
    let _holder = f.connect("acme").await;
    let started = Instant::now();
    let e = connect(&f.app_url("acme")).await.unwrap_err();
    assert_eq!(code(&e), "53300");
    assert!(started.elapsed() < Duration::from_secs(3));
}

/// SQL-level PREPARE in transaction mode holds within one transaction (README): what
/// `DEALLOCATE ALL` drops there must really be gone from the server connection, which the
/// next client of the pool gets; the client's protocol-level statements keep working.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sql_prepare_and_deallocate_all_in_one_transaction() {
    let f = TestFleet::acme(Options::one_pod(PoolMode::Transaction, 1)).await;
    let (a, b) = (f.connect("acme").await, f.connect("acme").await);
    let plus = a.prepare("select $1::int + 1").await.unwrap();
    let value = |rows: Vec<tokio_postgres::SimpleQueryMessage>| {
        rows.iter().find_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_owned),
            _ => None,
        })
    };
    for (who, c) in [("a", &a), ("b", &b)] {
        c.simple_query("BEGIN; PREPARE q AS select 7")
            .await
            .unwrap();
        let got = value(c.simple_query("EXECUTE q").await.unwrap());
        assert_eq!(got.as_deref(), Some("7"), "{who}");
        c.simple_query("DEALLOCATE ALL")
            .await
            .unwrap_or_else(|e| panic!("{who}: {e}"));
        c.simple_query("COMMIT").await.unwrap();
    }
    let v: i32 = a.query_one(&plus, &[&1i32]).await.unwrap().get(0);
    assert_eq!(v, 2, "a protocol-level statement after DEALLOCATE ALL");
}

/// A Parse (or simple query) is read whole before it goes on in transaction mode; one far
/// longer than the relay's buffer bound must still get through, not stall.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statements_longer_than_the_relay_buffer() {
    let f = TestFleet::acme(Options::one_pod(PoolMode::Transaction, 2)).await;
    let c = f.connect("acme").await;
    for n in [100_000usize, 1_000_000] {
        let literal = "x".repeat(n);
        let sql = format!("select $1::int + length('{literal}')");
        let st = tokio::time::timeout(Duration::from_secs(30), c.prepare(&sql))
            .await
            .unwrap_or_else(|_| panic!("a {n}-byte Parse stalled"))
            .unwrap();
        let v: i32 = c.query_one(&st, &[&1i32]).await.unwrap().get(0);
        assert_eq!(v, n as i32 + 1);
        let rows = tokio::time::timeout(
            Duration::from_secs(30),
            c.simple_query(&format!("select length('{literal}')")),
        )
        .await
        .unwrap_or_else(|_| panic!("a {n}-byte simple query stalled"))
        .unwrap();
        let got = rows.iter().find_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_owned),
            _ => None,
        });
        assert_eq!(got, Some(n.to_string()));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn extended_protocol_and_errors_in_a_pipeline() {
    let f = TestFleet::acme(Options::one_pod(PoolMode::Transaction, 2)).await;
    let c = f.connect("acme").await;
    c.batch_execute("create table kv (k int primary key, v text)")
        .await
        .unwrap();
    // Prepared first, so the three requests are sent in this order in one pipeline.
    let ins = c.prepare("insert into kv values ($1, $2)").await.unwrap();
    let sel = c.prepare("select v from kv where k = $1").await.unwrap();
    let (r1, r2, r3) = tokio::join!(
        c.execute(&ins, &[&1i32, &"one"]),
        c.execute(&ins, &[&1i32, &"dup"]),
        c.query(&sel, &[&1i32]),
    );
    assert_eq!(r1.unwrap(), 1);
    assert_eq!(code(&r2.unwrap_err()), "23505");
    assert_eq!(r3.unwrap()[0].get::<_, String>(0), "one");
    let rows: Vec<tokio_postgres::Row> = c
        .query_raw(
            "select g, repeat('x', 100) from generate_series(1, 5000) g",
            std::iter::empty::<i32>(),
        )
        .await
        .unwrap()
        .try_collect()
        .await
        .unwrap();
    assert_eq!(rows.len(), 5000);
    let sum: i64 = rows.iter().map(|r| r.get::<_, i32>(0) as i64).sum();
    assert_eq!(sum, 5000 * 5001 / 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prepared_statements_work_across_shared_server_connections() {
    let f = TestFleet::acme(Options::one_pod(PoolMode::Transaction, 2)).await;
    let setup = f.connect("acme").await;
    setup.batch_execute("create table kv (k int primary key, v text); insert into kv select g, 'v' || g from generate_series(1, 100) g").await.unwrap();
    // Eight clients on two server connections, each with statements under the same names
    // (tokio-postgres names them s0, s1, ...), reused across many transactions.
    let mut tasks = Vec::new();
    for i in 0..8i32 {
        let url = f.app_url("acme");
        tasks.push(tokio::spawn(async move {
            let c = connect(&url).await.unwrap();
            let get = c.prepare("select v from kv where k = $1").await.unwrap();
            let add = c.prepare("select $1::int + $2::int").await.unwrap();
            for j in 0..50i32 {
                let k = 1 + (i * 7 + j) % 100;
                let v: String = c.query_one(&get, &[&k]).await.unwrap().get(0);
                assert_eq!(v, format!("v{k}"));
                let s: i32 = c.query_one(&add, &[&i, &j]).await.unwrap().get(0);
                assert_eq!(s, i + j);
            }
            // A statement closed by one client stays usable for the others.
            drop(add);
            let again = c.prepare("select $1::int + $2::int").await.unwrap();
            let s: i32 = c.query_one(&again, &[&1i32, &2i32]).await.unwrap().get(0);
            assert_eq!(s, 3);
            // An error inside a pipeline is reported and the statements keep working.
            let bad = c.prepare("select 1 / $1::int").await.unwrap();
            assert_eq!(
                code(&c.query_one(&bad, &[&0i32]).await.unwrap_err()),
                "22012"
            );
            let v: String = c.query_one(&get, &[&5i32]).await.unwrap().get(0);
            assert_eq!(v, "v5");
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    // A statement that fails to prepare is an error for that client only.
    let c = f.connect("acme").await;
    assert_eq!(
        code(&c.prepare("select * from no_such_table").await.unwrap_err()),
        "42P01"
    );
    assert_eq!(
        c.query_one("select count(*) from kv", &[])
            .await
            .unwrap()
            .get::<_, i64>(0),
        100
    );
    // DISCARD ALL from a client does not leave the router believing statements still exist.
    let st = c.prepare("select v from kv where k = $1").await.unwrap();
    c.batch_execute("DISCARD ALL").await.unwrap();
    let v: String = c.query_one(&st, &[&7i32]).await.unwrap().get(0);
    assert_eq!(v, "v7");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_connection_is_reused_after_copy_and_errors() {
    for mode in [PoolMode::Session, PoolMode::Transaction] {
        let f = TestFleet::acme(Options::one_pod(mode, 1)).await;
        let pid = |c: tokio_postgres::Client| async move {
            c.query_one("select pg_backend_pid()", &[])
                .await
                .unwrap()
                .get::<_, i32>(0)
        };
        let c = f.connect("acme").await;
        c.batch_execute("create table t (x int)").await.unwrap();
        let first = c
            .query_one("select pg_backend_pid()", &[])
            .await
            .unwrap()
            .get::<_, i32>(0);
        // COPY through the extended protocol (Sync sent before the data), then an error.
        let sink = c.copy_in("copy t from stdin").await.unwrap();
        futures_util::pin_mut!(sink);
        sink.send(bytes::Bytes::from_static(b"1\n2\n"))
            .await
            .unwrap();
        sink.finish().await.unwrap();
        assert!(c.simple_query("select 1/0").await.is_err());
        drop(c);
        tokio::time::sleep(Duration::from_millis(200)).await;
        let again = pid(f.connect("acme").await).await;
        assert_eq!(
            first, again,
            "{mode}: the one server connection was pooled again, not closed"
        );
    }
}
