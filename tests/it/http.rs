//! The HTTP gateway against real Postgres pods: SQL over HTTP (type mapping, authorization,
//! batches, caps), the tenant reverse proxy (to a small upstream started here), and the abuse
//! limits on both listeners, with clients bound to many loopback source addresses so one
//! abusive address can be told apart from everyone else.

use crate::support::*;
use bytes::Bytes;
use http_body_util::BodyExt;
use serde_json::{json, Value};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio_util::sync::CancellationToken;

/// The router of `f` with its HTTP gateway on a free port (the test harness starts the wire
/// and admin listeners; the gateway is started here the way `service::start` does).
struct Gateway {
    f: TestFleet,
    addr: SocketAddr,
    stop: CancellationToken,
}

impl Drop for Gateway {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

async fn gateway(opts: Options) -> Gateway {
    let f = TestFleet::start(opts).await;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let stop = CancellationToken::new();
    tokio::spawn(podrouter::http::serve(
        f.fleet(),
        listener,
        stop.clone(),
        tokio_util::task::TaskTracker::new(),
    ));
    Gateway { f, addr, stop }
}

fn loopback(last: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, 0, 0, last))
}

/// An HTTP client whose connections come from `source`.
fn client_from(source: IpAddr) -> reqwest::Client {
    reqwest::Client::builder()
        .local_address(source)
        .timeout(Duration::from_secs(20))
        .build()
        .unwrap()
}

struct Answer {
    status: u16,
    headers: reqwest::header::HeaderMap,
    body: Value,
}

impl Gateway {
    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    async fn sql_as(
        &self,
        client: &reqwest::Client,
        tenant: &str,
        user: &str,
        password: &str,
        body: Value,
    ) -> Answer {
        let resp = client
            .post(self.url("/v1/sql"))
            .basic_auth(user, Some(password))
            .header("podrouter-tenant", tenant)
            .json(&body)
            .send()
            .await
            .expect("the gateway answers");
        answer(resp).await
    }

    async fn sql(&self, tenant: &str, body: Value) -> Answer {
        self.sql_as(&reqwest::Client::new(), tenant, ROLE, PASSWORD, body)
            .await
    }
}

async fn answer(resp: reqwest::Response) -> Answer {
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let bytes = resp.bytes().await.unwrap();
    let body = serde_json::from_slice(&bytes)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into()));
    Answer {
        status,
        headers,
        body,
    }
}

fn sqlstate(a: &Answer) -> &str {
    a.body["error"]["sqlstate"].as_str().unwrap_or("")
}

// === SQL over HTTP ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn values_round_trip_through_the_documented_type_mapping() {
    let g = gateway(Options {
        pods: 1,
        ..Default::default()
    })
    .await;
    g.f.tenant("acme", 0).await;
    // One line per type: the parameter sent, the cast, the JSON that must come back.
    let cases: &[(&str, Value, Value, &str)] = &[
        ("int2", json!(-7), json!(-7), "int2"),
        ("int4", json!(41), json!(41), "int4"),
        (
            "int8",
            json!(9007199254740993i64),
            json!(9007199254740993i64),
            "int8",
        ),
        (
            "numeric",
            json!("12345678901234567890.000001"),
            json!("12345678901234567890.000001"),
            "numeric",
        ),
        ("float8", json!(1.5), json!(1.5), "float8"),
        ("bool", json!(true), json!(true), "bool"),
        (
            "text",
            json!("it's \"quoted\", ünïcode"),
            json!("it's \"quoted\", ünïcode"),
            "text",
        ),
        (
            "json",
            json!({"a": [1, 2, {"b": null}]}),
            json!({"a": [1, 2, {"b": null}]}),
            "json",
        ),
        (
            "jsonb",
            json!({"k": "v", "n": 1.5}),
            json!({"k": "v", "n": 1.5}),
            "jsonb",
        ),
        (
            "timestamptz",
            json!("2024-05-01T12:00:00.5+02:00"),
            json!("2024-05-01T10:00:00.5+00:00"),
            "timestamptz",
        ),
        (
            "timestamp",
            json!("2024-05-01 12:00:00"),
            json!("2024-05-01T12:00:00"),
            "timestamp",
        ),
        ("date", json!("2024-05-01"), json!("2024-05-01"), "date"),
        ("bytea", json!("AP9BAA=="), json!("AP9BAA=="), "bytea"),
        ("int4[]", json!([1, null, 3]), json!([1, null, 3]), "int4[]"),
        (
            "text[]",
            json!(["a,b", "c\"d", null, "NULL"]),
            json!(["a,b", "c\"d", null, "NULL"]),
            "text[]",
        ),
        (
            "int8[]",
            json!([[1, 2], [3, 4]]),
            json!([[1, 2], [3, 4]]),
            "int8[]",
        ),
        (
            "uuid",
            json!("a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"),
            json!("a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"),
            "uuid",
        ),
        ("int4", json!(null), json!(null), "int4"),
    ];
    for (cast, param, want, type_name) in cases {
        let a = g
            .sql(
                "acme",
                json!({"query": format!("select $1::{cast} as v"), "params": [param]}),
            )
            .await;
        assert_eq!(a.status, 200, "{cast}: {}", a.body);
        assert_eq!(a.body["rows"], json!([[want]]), "{cast}");
        assert_eq!(
            a.body["columns"],
            json!([{"name": "v", "type": type_name}]),
            "{cast}"
        );
    }
    // Parameters are bound, never spliced into the SQL text.
    let evil = "x'); drop table if exists t; --";
    let a = g
        .sql(
            "acme",
            json!({"query": "select $1::text as s, $2::int + 1 as n", "params": [evil, 41]}),
        )
        .await;
    assert_eq!(a.body["rows"], json!([[evil, 42]]));
    assert_eq!(a.body["command"], "SELECT");
    assert_eq!(a.body["row_count"], 1);
    // Writes report their command and count.
    g.sql(
        "acme",
        json!({"query": "create table items (id int primary key, tags text[])"}),
    )
    .await;
    let a = g
        .sql("acme", json!({"query": "insert into items select g, $1 from generate_series(1, 3) g", "params": [["x", "y"]]}))
        .await;
    assert_eq!(
        (a.status, &a.body["command"], &a.body["row_count"]),
        (200, &json!("INSERT"), &json!(3)),
        "{}",
        a.body
    );
    let a = g
        .sql("acme", json!({"query": "select id, tags from items where id = any($1) order by id", "params": [[1, 3]]}))
        .await;
    assert_eq!(
        a.body["rows"],
        json!([[1, ["x", "y"]], [3, ["x", "y"]]]),
        "{}",
        a.body
    );
    // Postgres errors keep their SQLSTATE.
    let a = g.sql("acme", json!({"query": "select 1/0"})).await;
    assert_eq!((a.status, sqlstate(&a)), (400, "22012"), "{}", a.body);
    let a = g
        .sql("acme", json!({"query": "select * from nowhere"}))
        .await;
    assert_eq!((a.status, sqlstate(&a)), (400, "42P01"), "{}", a.body);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credentials_and_grants_are_those_of_the_wire() {
    let g = gateway(Options {
        pods: 2,
        ..Default::default()
    })
    .await;
    g.f.tenant("alpha", 0).await;
    g.f.tenant("beta", 1).await;
    let fleet = g.f.fleet();
    fleet.put_role("other", "other-pw", "test").await.unwrap();
    fleet
        .create_tenant(
            podrouter::fleet::NewTenant {
                name: "gamma".into(),
                pod: Some("pod1".into()),
                roles: vec!["other".into()],
            },
            "test",
        )
        .await
        .unwrap();
    fleet.reload_routes().await.unwrap();
    let c = reqwest::Client::new();
    let secret =
        json!({"query": "create table secrets (s text); insert into secrets values ('beta-only')"});
    // A batch is not needed for a multi-statement string: extended protocol refuses it.
    let a = g.sql("beta", secret).await;
    assert_eq!(sqlstate(&a), "42601", "{}", a.body);
    g.sql("beta", json!({"queries": [{"query": "create table secrets (s text)"}, {"query": "insert into secrets values ('beta-only')"}]}))
        .await;

    // Right credentials on the right tenant.
    let a = g
        .sql(
            "beta",
            json!({"query": "select s, current_database() from secrets"}),
        )
        .await;
    assert_eq!(a.body["rows"], json!([["beta-only", "beta"]]), "{}", a.body);
    // Another tenant's data is not reachable through your own tenant.
    let a = g
        .sql("alpha", json!({"query": "select s from secrets"}))
        .await;
    assert_eq!((a.status, sqlstate(&a)), (400, "42P01"), "{}", a.body);
    // Wrong password, unknown user, no credentials: 401, the same answer.
    for (user, pw) in [(ROLE, "wrong"), ("nobody", PASSWORD)] {
        let a = g
            .sql_as(&c, "beta", user, pw, json!({"query": "select 1"}))
            .await;
        assert_eq!(a.status, 401, "{user}: {}", a.body);
        assert!(a.headers.contains_key("www-authenticate"));
        assert_eq!(a.body["error"]["code"], "unauthorized");
    }
    let resp = c
        .post(g.url("/v1/sql"))
        .header("podrouter-tenant", "beta")
        .json(&json!({"query": "select 1"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);
    // A role not granted on the tenant fails like a wrong password, both ways round.
    let a = g
        .sql_as(
            &c,
            "beta",
            "other",
            "other-pw",
            json!({"query": "select 1"}),
        )
        .await;
    assert_eq!(a.status, 401, "{}", a.body);
    let a = g
        .sql_as(&c, "gamma", ROLE, PASSWORD, json!({"query": "select 1"}))
        .await;
    assert_eq!(a.status, 401, "{}", a.body);
    let a = g
        .sql_as(
            &c,
            "gamma",
            "other",
            "other-pw",
            json!({"query": "select current_user"}),
        )
        .await;
    assert_eq!(a.body["rows"], json!([["other"]]), "{}", a.body);
    // An authenticated role learns that a tenant does not exist; nobody else does.
    let a = g.sql("nosuch", json!({"query": "select 1"})).await;
    assert_eq!(
        (a.status, a.body["error"]["code"].as_str()),
        (404, Some("tenant_not_found"))
    );
    let a = g
        .sql_as(&c, "nosuch", ROLE, "wrong", json!({"query": "select 1"}))
        .await;
    assert_eq!(a.status, 401);
    // The tenant may come from the host name instead of the header.
    let resp = c
        .post(g.url("/v1/sql"))
        .header("host", format!("beta.db.example.com:{}", g.addr.port()))
        .basic_auth(ROLE, Some(PASSWORD))
        .json(&json!({"query": "select current_database()"}))
        .send()
        .await
        .unwrap();
    assert_eq!(answer(resp).await.body["rows"], json!([["beta"]]));

    // HTTP used the same pool as wire clients of (beta, app): one pool, its connection idle.
    let wire = g.f.connect("beta").await;
    wire.simple_query("select 1").await.unwrap();
    let pools: Vec<_> = fleet
        .proxy
        .pools
        .snapshot()
        .into_iter()
        .filter(|p| p.key.tenant == "beta" && p.key.role == ROLE)
        .collect();
    assert_eq!(pools.len(), 1);
    assert!(pools[0].idle_count() >= 1 && pools[0].active_count() == 0);
    // The session settings HTTP used do not leak to wire clients of the same pool.
    let tz: String = wire.query_one("show timezone", &[]).await.unwrap().get(0);
    let pod_tz: String = pod_admin(&g.f.pods[1], "beta")
        .await
        .query_one("show timezone", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(tz, pod_tz);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_is_one_transaction() {
    let g = gateway(Options {
        pods: 1,
        pool_size: 1,
        ..Default::default()
    })
    .await;
    g.f.tenant("acme", 0).await;
    g.sql(
        "acme",
        json!({"query": "create table t (id int primary key)"}),
    )
    .await;
    let count = || async {
        g.sql("acme", json!({"query": "select count(*) from t"}))
            .await
            .body["rows"][0][0]
            .clone()
    };
    // The third statement fails: the first two are rolled back with it.
    let a = g
        .sql(
            "acme",
            json!({"queries": [
                {"query": "insert into t values ($1)", "params": [1]},
                {"query": "insert into t values ($1)", "params": [2]},
                {"query": "insert into t values ($1)", "params": [1]},
            ]}),
        )
        .await;
    assert_eq!((a.status, sqlstate(&a)), (400, "23505"), "{}", a.body);
    assert_eq!(a.body["error"]["statement"], 2);
    assert_eq!(count().await, json!(0));
    // A batch that succeeds commits all of it and answers each statement.
    let a = g
        .sql(
            "acme",
            json!({"queries": [
                {"query": "insert into t values (1), (2)"},
                {"query": "update t set id = id + 10 where id = $1", "params": [2]},
                {"query": "select id from t order by id"},
            ]}),
        )
        .await;
    assert_eq!(a.status, 200, "{}", a.body);
    let results = a.body["results"].as_array().unwrap();
    assert_eq!(results.len(), 3);
    assert_eq!(results[0]["row_count"], 2);
    assert_eq!(results[1]["command"], "UPDATE");
    assert_eq!(results[2]["rows"], json!([[1], [12]]));
    assert_eq!(count().await, json!(2));
    // Transactions are the gateway's to open and close.
    let a = g.sql("acme", json!({"query": "begin"})).await;
    assert_eq!(
        (a.status, a.body["error"]["code"].as_str()),
        (400, Some("transaction_control"))
    );
    // With pool size 1, every request above reused one server connection: it was always
    // given back idle, and a wire client finds it outside any transaction.
    let wire = g.f.connect("acme").await;
    // now() is when the transaction began: a fresh one begins with this statement.
    let rows = wire
        .simple_query("select now() = statement_timestamp()")
        .await
        .unwrap();
    let fresh = rows
        .iter()
        .any(|m| matches!(m, tokio_postgres::SimpleQueryMessage::Row(r) if r.get(0) == Some("t")));
    assert!(
        fresh,
        "the server connection was handed over inside a transaction"
    );
    wire.batch_execute("begin; insert into t values (99); rollback")
        .await
        .unwrap();
    assert_eq!(count().await, json!(2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn caps_and_the_statement_timeout_answer_clear_errors() {
    let g = gateway(Options {
        pods: 1,
        pool_size: 2,
        config_extra:
            "[http]\nmax_rows = 100\nmax_response = \"64kB\"\nstatement_timeout = \"700ms\"\n\
                       [limits]\nhttp_max_body = \"2kB\"\n"
                .into(),
        ..Default::default()
    })
    .await;
    g.f.tenant("acme", 0).await;
    let a = g
        .sql(
            "acme",
            json!({"query": "select g from generate_series(1, 100) g"}),
        )
        .await;
    assert_eq!(
        (a.status, a.body["rows"].as_array().map(Vec::len)),
        (200, Some(100))
    );
    let a = g
        .sql(
            "acme",
            json!({"query": "select g from generate_series(1, 101) g"}),
        )
        .await;
    assert_eq!(
        (a.status, a.body["error"]["code"].as_str()),
        (400, Some("row_limit")),
        "{}",
        a.body
    );
    let a = g
        .sql("acme", json!({"query": "select repeat('x', 100000)"}))
        .await;
    assert_eq!(
        (a.status, a.body["error"]["code"].as_str()),
        (413, Some("response_too_large")),
        "{}",
        a.body
    );
    let started = Instant::now();
    let a = g.sql("acme", json!({"query": "select pg_sleep(20)"})).await;
    assert_eq!((a.status, sqlstate(&a)), (504, "57014"), "{}", a.body);
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    // The statement was cancelled on the pod, not left running.
    let admin = pod_admin(&g.f.pods[0], "postgres").await;
    wait_for("the cancelled pg_sleep to end", Duration::from_secs(5), || async {
        let n: i64 = admin
            .query_one("select count(*) from pg_stat_activity where state = 'active' and query like 'select pg_sleep(20)%'", &[])
            .await
            .unwrap()
            .get(0);
        (n == 0).then_some(())
    })
    .await;
    let big = json!({"query": "select $1::text", "params": ["y".repeat(3000)]});
    let a = g.sql("acme", big).await;
    assert_eq!(
        (a.status, a.body["error"]["code"].as_str()),
        (413, Some("body_too_large")),
        "{}",
        a.body
    );
    // After all that the tenant is served as before.
    for _ in 0..4 {
        let a = g.sql("acme", json!({"query": "select 1 as one"})).await;
        assert_eq!(a.body["rows"], json!([[1]]), "{}", a.body);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_tenant_holds_http_queries_until_it_resumes() {
    let g = gateway(Options {
        pods: 1,
        ..Default::default()
    })
    .await;
    g.f.tenant("acme", 0).await;
    assert_eq!(
        g.sql("acme", json!({"query": "select 1"})).await.status,
        200
    );
    let gate = g.f.fleet().proxy.gates.get("acme");
    gate.pause("a test");
    let held = {
        let (url, c) = (g.url("/v1/sql"), reqwest::Client::new());
        tokio::spawn(async move {
            let resp = c
                .post(url)
                .basic_auth(ROLE, Some(PASSWORD))
                .header("podrouter-tenant", "acme")
                .json(&json!({"query": "select 2"}))
                .send()
                .await
                .unwrap();
            (Instant::now(), answer(resp).await)
        })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        !held.is_finished(),
        "the query ran while its tenant was paused"
    );
    assert_eq!(gate.waiting(), 1);
    let resumed = Instant::now();
    gate.resume();
    let (done, a) = held.await.unwrap();
    assert!(done >= resumed);
    assert_eq!(a.body["rows"], json!([[2]]), "{}", a.body);

    // A client that gives up mid-statement: its statement is cancelled on the pod too.
    let impatient = reqwest::Client::builder()
        .timeout(Duration::from_millis(500))
        .build()
        .unwrap();
    let gone = impatient
        .post(g.url("/v1/sql"))
        .basic_auth(ROLE, Some(PASSWORD))
        .header("podrouter-tenant", "acme")
        .json(&json!({"query": "select pg_sleep(20)"}))
        .send()
        .await;
    assert!(gone.is_err());
    let admin = pod_admin(&g.f.pods[0], "postgres").await;
    wait_for(
        "the abandoned pg_sleep to be cancelled",
        Duration::from_secs(5),
        || async {
            let n: i64 = admin
                .query_one(
                    "select count(*) from pg_stat_activity where state = 'active' and query like 'select pg_sleep(20)%'",
                    &[],
                )
                .await
                .unwrap()
                .get(0);
            (n == 0).then_some(())
        },
    )
    .await;
}

// === reverse proxy ===

/// A small application server: `/echo` streams the request body back as it arrives,
/// `/info` answers the headers it saw, `/slow` answers after 3 s.
async fn upstream(name: &'static str) -> (SocketAddr, CancellationToken) {
    use axum::routing::{any, get};
    let app = axum::Router::new()
        .route(
            "/echo",
            any(|req: axum::extract::Request| async move {
                axum::response::Response::new(req.into_body())
            }),
        )
        .route(
            "/info",
            get(move |headers: axum::http::HeaderMap| async move {
                let h = |k: &str| {
                    headers
                        .get(k)
                        .and_then(|v| v.to_str().ok())
                        .map(str::to_owned)
                };
                axum::Json(json!({
                    "upstream": name,
                    "host": h("host"),
                    "x-forwarded-for": h("x-forwarded-for"),
                    "x-forwarded-proto": h("x-forwarded-proto"),
                    "authorization": h("authorization"),
                }))
            }),
        )
        .route(
            "/slow",
            get(|| async {
                tokio::time::sleep(Duration::from_secs(3)).await;
                "late"
            }),
        );
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let stop = CancellationToken::new();
    let s = stop.clone();
    tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(async move { s.cancelled().await })
            .await
            .unwrap();
    });
    (addr, stop)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_reverse_proxy_streams_to_the_pods_upstreams() {
    let (up_a, stop_a) = upstream("a").await;
    let (up_b, stop_b) = upstream("b").await;
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    // The last pod gets the upstreams (config_extra continues its [[pod]] table).
    let g = gateway(Options {
        pods: 2,
        config_extra: format!(
            "http = [\"http://{up_a}\", \"http://{dead}\", \"http://{up_b}\"]\n[http]\nupstream_timeout = \"1s\"\n"
        ),
        ..Default::default()
    })
    .await;
    g.f.tenant("web", 1).await;
    g.f.tenant("plain", 0).await;
    let c = reqwest::Client::new();
    let get = |path: &str, tenant: &str| {
        c.get(g.url(path))
            .header("podrouter-tenant", tenant)
            .header("authorization", "Bearer app-token")
            .send()
    };
    // Round robin over the live upstreams; the dead one costs a GET nothing but a retry.
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..6 {
        let a = answer(get("/info", "web").await.unwrap()).await;
        assert_eq!(a.status, 200, "{}", a.body);
        assert_eq!(a.headers["podrouter-pod"], "pod1");
        assert_eq!(a.body["x-forwarded-for"], "127.0.0.1");
        assert_eq!(a.body["x-forwarded-proto"], "http");
        assert_eq!(a.body["host"], g.addr.to_string());
        assert_eq!(
            a.body["authorization"], "Bearer app-token",
            "credentials pass through"
        );
        seen.insert(a.body["upstream"].as_str().unwrap().to_owned());
    }
    assert_eq!(seen.into_iter().collect::<Vec<_>>(), ["a", "b"]);

    // Streaming both ways: each chunk comes back before the next one is sent.
    let stream = TcpStream::connect(g.addr).await.unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn);
    let (tx, rx) = tokio::sync::mpsc::channel::<
        Result<hyper::body::Frame<Bytes>, std::convert::Infallible>,
    >(1);
    let body =
        http_body_util::StreamBody::new(futures_util::stream::unfold(rx, |mut rx| async move {
            rx.recv().await.map(|f| (f, rx))
        }));
    let req = hyper::Request::post("/echo")
        .header("host", "web.apps.example.com")
        .body(body)
        .unwrap();
    let pending = tokio::spawn(async move { sender.send_request(req).await });
    tx.send(Ok(hyper::body::Frame::data(Bytes::from_static(b"first "))))
        .await
        .unwrap();
    let resp = tokio::time::timeout(Duration::from_secs(5), pending)
        .await
        .expect("response headers before the request body ended")
        .unwrap()
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["podrouter-pod"], "pod1");
    let mut body = resp.into_body();
    let mut echoed = Vec::new();
    let mut expect = b"first ".len();
    for chunk in [&b"second "[..], b"third"] {
        while echoed.len() < expect {
            let f = tokio::time::timeout(Duration::from_secs(5), body.frame())
                .await
                .expect("the echo of a chunk while the request is still open")
                .unwrap()
                .unwrap();
            echoed.extend_from_slice(&f.into_data().unwrap());
        }
        tx.send(Ok(hyper::body::Frame::data(Bytes::from_static(chunk))))
            .await
            .unwrap();
        expect += chunk.len();
    }
    drop(tx);
    let rest = body.collect().await.unwrap().to_bytes();
    echoed.extend_from_slice(&rest);
    assert_eq!(echoed, b"first second third");

    // A large body both ways.
    let big: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
    let resp = c
        .post(g.url("/echo"))
        .header("podrouter-tenant", "web")
        .body(big.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.bytes().await.unwrap().as_ref(), &big[..]);

    // Failures: no response in time (504), a pod without upstreams (503), an unknown tenant
    // (404), every upstream down (502).
    let a = answer(get("/slow", "web").await.unwrap()).await;
    assert_eq!(
        (a.status, a.body["error"]["code"].as_str()),
        (504, Some("upstream_timeout")),
        "{}",
        a.body
    );
    let a = answer(get("/info", "plain").await.unwrap()).await;
    assert_eq!(
        (a.status, a.body["error"]["code"].as_str()),
        (503, Some("no_upstream")),
        "{}",
        a.body
    );
    let a = answer(get("/info", "nosuch").await.unwrap()).await;
    assert_eq!(a.status, 404);
    stop_a.cancel();
    stop_b.cancel();
    let down = wait_for(
        "every upstream to refuse",
        Duration::from_secs(10),
        || async {
            let a = answer(get("/info", "web").await.unwrap()).await;
            (a.status != 200).then_some(a)
        },
    )
    .await;
    assert_eq!(down.status, 502, "{}", down.body);
    assert!(down.body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("pod1"));
    let a = answer(get("/info", "web").await.unwrap()).await;
    assert_eq!(
        (a.status, a.body["error"]["code"].as_str()),
        (502, Some("upstream_unreachable")),
        "{}",
        a.body
    );
}

// === abuse limits ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_abusive_address_gets_429_while_48_others_are_served() {
    let g = gateway(Options {
        pods: 1,
        pool_size: 10,
        config_extra: "[limits]\nhttp_requests_per_ip = 20\nhttp_request_burst = 20\n".into(),
        ..Default::default()
    })
    .await;
    g.f.tenant("acme", 0).await;
    let g = std::sync::Arc::new(g);
    let query = json!({"query": "select 1"});
    // The abuser: 200 requests from 127.0.0.2, 16 at a time.
    let abuser = {
        let (g, q) = (g.clone(), query.clone());
        tokio::spawn(async move {
            let c = client_from(loopback(2));
            let mut codes = Vec::new();
            let mut retry_after = None;
            for _ in 0..200 / 16 {
                let batch = (0..16).map(|_| g.sql_as(&c, "acme", ROLE, PASSWORD, q.clone()));
                for a in futures_util::future::join_all(batch).await {
                    if a.status == 429 {
                        retry_after = a.headers.get("retry-after").cloned();
                    }
                    codes.push(a.status);
                }
            }
            (codes, retry_after)
        })
    };
    // Everyone else: 5 requests each from 127.0.0.3 ..= 127.0.0.50, at the same time.
    let others: Vec<_> = (3..=50u8)
        .map(|last| {
            let (g, q) = (g.clone(), query.clone());
            tokio::spawn(async move {
                let c = client_from(loopback(last));
                let mut worst = Duration::ZERO;
                let mut codes = Vec::new();
                for _ in 0..5 {
                    let started = Instant::now();
                    let a = g.sql_as(&c, "acme", ROLE, PASSWORD, q.clone()).await;
                    worst = worst.max(started.elapsed());
                    codes.push(a.status);
                }
                (last, codes, worst)
            })
        })
        .collect();
    let (codes, retry_after) = abuser.await.unwrap();
    let limited = codes.iter().filter(|c| **c == 429).count();
    assert!(
        limited >= 100,
        "the abusive address got only {limited} 429s: {codes:?}"
    );
    assert!(codes.iter().all(|c| *c == 200 || *c == 429), "{codes:?}");
    let retry_after: u64 = retry_after.unwrap().to_str().unwrap().parse().unwrap();
    assert!((1..=2).contains(&retry_after));
    for o in others {
        let (last, codes, worst) = o.await.unwrap();
        assert_eq!(codes, [200; 5], "127.0.0.{last} was not served");
        assert!(
            worst < Duration::from_secs(3),
            "127.0.0.{last} waited {worst:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_over_its_rate_is_limited_from_every_address() {
    let g = gateway(Options {
        pods: 1,
        config_extra: "[limits]\nhttp_requests_per_tenant = 2\nhttp_tenant_burst = 5\n".into(),
        ..Default::default()
    })
    .await;
    g.f.tenant("noisy", 0).await;
    g.f.tenant("quiet", 0).await;
    let mut codes = Vec::new();
    for last in 2..12u8 {
        let c = client_from(loopback(last));
        codes.push(
            g.sql_as(&c, "noisy", ROLE, PASSWORD, json!({"query": "select 1"}))
                .await
                .status,
        );
    }
    assert!(
        codes.iter().filter(|c| **c == 429).count() >= 4,
        "{codes:?}"
    );
    assert_eq!(codes[..5], [200; 5]);
    let a = g.sql("quiet", json!({"query": "select 1"})).await;
    assert_eq!(a.status, 200, "another tenant is unaffected");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_http_clients_are_cut_off() {
    let g = gateway(Options {
        pods: 1,
        config_extra: "[limits]\nhttp_header_timeout = \"500ms\"\nhttp_idle_timeout = \"1s\"\n"
            .into(),
        ..Default::default()
    })
    .await;
    g.f.tenant("acme", 0).await;
    // Headers that never end, and a body that stops halfway.
    let mut slow_head = TcpStream::connect(g.addr).await.unwrap();
    slow_head
        .write_all(b"POST /v1/sql HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let mut slow_body = TcpStream::connect(g.addr).await.unwrap();
    slow_body
        .write_all(b"POST /v1/sql HTTP/1.1\r\nHost: x\r\nPodrouter-Tenant: acme\r\nAuthorization: Basic YXBwOmFwcC1zZWNyZXQ=\r\nContent-Length: 100\r\n\r\n{\"query\"")
        .await
        .unwrap();
    // Meanwhile others are served.
    assert_eq!(
        g.sql("acme", json!({"query": "select 1"})).await.status,
        200
    );
    let started = Instant::now();
    for (what, s) in [
        ("unfinished headers", &mut slow_head),
        ("unfinished body", &mut slow_body),
    ] {
        let mut buf = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf)).await;
        assert!(read.is_ok(), "a client with {what} was kept open");
    }
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "{:?}",
        started.elapsed()
    );
}

// === wire limits ===

async fn wire_from(
    source: IpAddr,
    router: SocketAddr,
    db: &str,
) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind(SocketAddr::new(source, 0)).unwrap();
    let stream = socket.connect(router).await.unwrap();
    let mut config = tokio_postgres::Config::new();
    config.user(ROLE).password(PASSWORD).dbname(db);
    let (client, conn) = config.connect_raw(stream, tokio_postgres::NoTls).await?;
    tokio::spawn(conn);
    Ok(client)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_address_opening_connections_too_fast_gets_53300_and_the_others_do_not() {
    let f = TestFleet::start(Options {
        pods: 1,
        config_extra: "[limits]\nwire_connections_per_ip = 5\nwire_connection_burst = 5\n".into(),
        ..Default::default()
    })
    .await;
    f.tenant("acme", 0).await;
    let router = f.running().pg_addr;
    let abuser = tokio::spawn(async move {
        let tries = (0..40).map(|_| wire_from(loopback(2), router, "acme"));
        futures_util::future::join_all(tries).await
    });
    let others: Vec<_> = (3..=50u8)
        .map(|last| {
            tokio::spawn(async move {
                let mut clients = Vec::new();
                for _ in 0..2 {
                    let c = wire_from(loopback(last), router, "acme").await;
                    clients.push(
                        c.map_err(|e| format!("127.0.0.{last}: {} {}", code(&e), message(&e))),
                    );
                }
                clients
            })
        })
        .collect();
    let results = abuser.await.unwrap();
    let refused: Vec<_> = results.iter().filter_map(|r| r.as_ref().err()).collect();
    assert!(refused.len() >= 30, "only {} of 40 refused", refused.len());
    for e in &refused {
        assert_eq!(code(e), "53300", "{e}");
        assert!(
            message(e).contains("too many connections from this address"),
            "{}",
            message(e)
        );
    }
    for o in others {
        for c in o.await.unwrap() {
            let c = c.unwrap();
            c.simple_query("select 1").await.unwrap();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_does_not_authenticate_in_time_is_cut_off() {
    let f = TestFleet::start(Options {
        pods: 1,
        config_extra: "[auth]\ntimeout = \"500ms\"\n".into(),
        ..Default::default()
    })
    .await;
    f.tenant("acme", 0).await;
    let addr = f.running().pg_addr;
    // Says nothing at all; sends its startup packet and then stalls in SCRAM.
    let mut silent = TcpStream::connect(addr).await.unwrap();
    let mut stalled = TcpStream::connect(addr).await.unwrap();
    let mut startup = bytes::BytesMut::new();
    postgres_protocol::message::frontend::startup_message(
        [("user", ROLE), ("database", "acme")],
        &mut startup,
    )
    .unwrap();
    stalled.write_all(&startup).await.unwrap();
    let started = Instant::now();
    for (what, s) in [("silent", &mut silent), ("stalled", &mut stalled)] {
        let mut got = Vec::new();
        tokio::time::timeout(Duration::from_secs(3), s.read_to_end(&mut got))
            .await
            .unwrap_or_else(|_| panic!("the {what} client was kept open"))
            .unwrap();
        let text = String::from_utf8_lossy(&got);
        assert!(
            text.contains("57P03") && text.contains("authentication did not finish"),
            "{what}: {text:?}"
        );
    }
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    // Everyone else is served meanwhile and after.
    f.connect("acme")
        .await
        .simple_query("select 1")
        .await
        .unwrap();
}
