//! Real client libraries through the router in transaction mode, each with more clients than
//! server connections: the drivers' own prepared-statement handling (named statements,
//! statement caches and their eviction, pipelines with an error inside, batches, portals),
//! which is what transaction pooling breaks when it gets a detail wrong. The client programs
//! are in `tests/clients/`; each exits non-zero with a message on the first wrong result.
//! `.ci/run` installs what they need (Debian's python3-psycopg, python3-asyncpg,
//! libpostgresql-jdbc-java with a JRE, and node-postgres from npm).

use crate::support::*;
use podrouter::config::PoolMode;
use sqlx::{Connection, Row};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

const CLIENTS: usize = 6;

fn clients_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/clients")
}

/// One pod, transaction pooling with 2 server connections, one tenant.
async fn fleet() -> TestFleet {
    TestFleet::acme(Options::one_pod(PoolMode::Transaction, 2)).await
}

/// Runs a client program to completion (bounded in time) and fails the test with its output
/// unless it exits 0.
async fn run_client(program: &str, args: &[&str], setup_hint: &str) {
    let mut cmd = tokio::process::Command::new(program);
    cmd.args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}; {setup_hint}"));
    let out = tokio::time::timeout(Duration::from_secs(180), child.wait_with_output())
        .await
        .unwrap_or_else(|_| panic!("{program} {args:?} did not finish within 180 s (a hang)"))
        .expect("client output");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "{program} {args:?} failed ({}):\n{stdout}\n{stderr}\nIf a module is missing: {setup_hint}",
        out.status
    );
    assert!(
        stdout.contains(&format!("{CLIENTS} clients ok")),
        "unexpected output: {stdout}"
    );
}

/// The Debian interpreter, which the python3-* packages install into (a `python3` earlier
/// on PATH, e.g. pyenv's, does not see them).
fn python() -> &'static str {
    if Path::new("/usr/bin/python3").exists() {
        "/usr/bin/python3"
    } else {
        "python3"
    }
}

/// Runs `tests/clients/SCRIPT URL CLIENTS` with `program` against a fresh fleet.
async fn run_script(program: &str, script: &str, setup_hint: &str) {
    let f = fleet().await;
    let script = clients_dir().join(script);
    let args = [
        script.to_str().unwrap(),
        &f.app_url("acme"),
        &CLIENTS.to_string(),
    ];
    run_client(program, &args, setup_hint).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psycopg3() {
    run_script(python(), "psycopg3.py", "apt-get install python3-psycopg").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn asyncpg() {
    run_script(
        python(),
        "asyncpg_client.py",
        "apt-get install python3-asyncpg",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_postgres() {
    let hint = "apt-get install nodejs npm && npm ci --prefix tests/clients/node";
    run_script("node", "node/pg_client.js", hint).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgjdbc() {
    let f = fleet().await;
    let script = clients_dir().join("JdbcClient.java");
    let target = format!("{}/acme", f.running().pg_addr);
    run_client(
        "java",
        &[
            "-cp",
            "/usr/share/java/postgresql.jar",
            script.to_str().unwrap(),
            &target,
            ROLE,
            PASSWORD,
            &CLIENTS.to_string(),
        ],
        "apt-get install default-jre-headless libpostgresql-jdbc-java",
    )
    .await;
}

/// sqlx (what the router itself uses for its catalog): statements named `sqlx_s_N`, prepared
/// with Parse + Describe + Sync and cached per connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlx_prepared_statements() {
    let f = fleet().await;
    let url = f.app_url("acme");
    let mut setup = sqlx::PgConnection::connect(&url).await.unwrap();
    sqlx::raw_sql(
        "create table kv (k int primary key, v text);
         insert into kv select g, 'v' || g from generate_series(1, 100) g;
         create table counters (id int primary key, n int not null default 0);
         insert into counters select g, 0 from generate_series(0, 10) g",
    )
    .execute(&mut setup)
    .await
    .unwrap();
    let mut tasks = Vec::new();
    for i in 0..CLIENTS as i32 {
        let url = url.clone();
        tasks.push(tokio::spawn(async move {
            let mut c = sqlx::PgConnection::connect(&url).await.unwrap();
            for j in 0..40i32 {
                let k = 1 + (i * 7 + j) % 100;
                let v: String = sqlx::query_scalar("select v from kv where k = $1")
                    .bind(k)
                    .fetch_one(&mut c)
                    .await
                    .unwrap();
                assert_eq!(v, format!("v{k}"));
                let row = sqlx::query("select $1::int + $2::int as s, $3::text as t")
                    .bind(i)
                    .bind(j)
                    .bind("x")
                    .fetch_one(&mut c)
                    .await
                    .unwrap();
                assert_eq!(row.get::<i32, _>("s"), i + j);
                assert_eq!(row.get::<String, _>("t"), "x");
            }
            for j in 0..10 {
                let mut tx = c.begin().await.unwrap();
                sqlx::query("update counters set n = n + 1 where id = $1")
                    .bind(i)
                    .execute(&mut *tx)
                    .await
                    .unwrap();
                let n: i32 = sqlx::query_scalar("select n from counters where id = $1")
                    .bind(i)
                    .fetch_one(&mut *tx)
                    .await
                    .unwrap();
                assert_eq!(n, j + 1);
                tx.commit().await.unwrap();
            }
            // An error in a transaction, rolled back; the cached statements keep working.
            let mut tx = c.begin().await.unwrap();
            let e = sqlx::query_scalar::<_, i32>("select 1 / $1::int")
                .bind(0)
                .fetch_one(&mut *tx)
                .await
                .unwrap_err();
            assert_eq!(
                e.as_database_error().and_then(|d| d.code()).as_deref(),
                Some("22012")
            );
            tx.rollback().await.unwrap();
            let n: i32 = sqlx::query_scalar("select n from counters where id = $1")
                .bind(i)
                .fetch_one(&mut c)
                .await
                .unwrap();
            assert_eq!(n, 10);
            // DISCARD ALL through the extended protocol (what a pool's reset may run): this
            // client's statements are gone, and re-prepared on use; the other clients'
            // statements on the same server connection keep working.
            sqlx::query("DISCARD ALL").execute(&mut c).await.unwrap();
            c.clear_cached_statements().await.unwrap();
            let v: String = sqlx::query_scalar("select v from kv where k = $1")
                .bind(5)
                .fetch_one(&mut c)
                .await
                .unwrap();
            assert_eq!(v, "v5");
            c.close().await.unwrap();
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
}
