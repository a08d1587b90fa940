//! Live tenant moves over real pods: under a pgbench load with nothing lost, tables without a
//! primary key, sequences, cancellation in each phase, a target that dies, a router killed
//! mid-move, and two moves at once. DESIGN.md "Live move" has the four invariants.

use crate::support::*;
use serde_json::{json, Value};
use std::time::{Duration, Instant};

/// Starts a move through the admin API; returns the job id.
async fn start_move(f: &TestFleet, tenant: &str, to: &str) -> i64 {
    let (status, job) = f
        .admin(
            "POST",
            &format!("/v1/tenants/{tenant}/move"),
            Some(json!({ "to": to })),
        )
        .await;
    assert_eq!(status.as_u16(), 202, "{job}");
    job["id"].as_i64().expect("job id")
}

async fn wait_phase(f: &TestFleet, id: i64, phase: &str, within: Duration) {
    wait_for(&format!("job {id} to reach {phase}"), within, || async {
        let j = job(f, id).await;
        assert!(
            matches!(j["state"].as_str(), Some("pending" | "running")),
            "job ended before {phase}: {j}"
        );
        (j["phase"] == phase).then_some(())
    })
    .await
}

async fn tenant_pod(f: &TestFleet, tenant: &str) -> (String, String) {
    let (_, t) = f.admin("GET", &format!("/v1/tenants/{tenant}"), None).await;
    (
        t["pod"].as_str().unwrap().to_owned(),
        t["state"].as_str().unwrap().to_owned(),
    )
}

/// Every trace a move of `tenant` from pod `src` to pod `dst` could leave behind.
async fn leftovers(f: &TestFleet, tenant: &str, src: usize, dst: usize) -> Vec<String> {
    let mut found = Vec::new();
    let s = pod_admin(&f.pods[src], "postgres").await;
    for r in s
        .query(
            "select slot_name::text from pg_replication_slots where slot_name like 'podrouter%' or slot_name like 'pg\\_%\\_sync\\_%'",
            &[],
        )
        .await
        .unwrap()
    {
        found.push(format!("slot {} on source", r.get::<_, String>(0)));
    }
    let allow: bool = s
        .query_one(
            "select datallowconn from pg_database where datname = $1",
            &[&tenant],
        )
        .await
        .unwrap()
        .get(0);
    if !allow {
        found.push("source database still fenced".into());
    }
    let sdb = pod_admin(&f.pods[src], tenant).await;
    for r in sdb
        .query("select pubname::text from pg_publication", &[])
        .await
        .unwrap()
    {
        found.push(format!("publication {} on source", r.get::<_, String>(0)));
    }
    let full: i64 = sdb
        .query_one(
            "select count(*) from pg_class where relreplident = 'f' and relkind = 'r'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    if full > 0 {
        found.push(format!("{full} tables left with REPLICA IDENTITY FULL"));
    }
    let d = pod_admin(&f.pods[dst], "postgres").await;
    if d.query_opt("select 1 from pg_database where datname = $1", &[&tenant])
        .await
        .unwrap()
        .is_some()
    {
        found.push("database on target".into());
    }
    let subs: i64 = d
        .query_one("select count(*) from pg_subscription", &[])
        .await
        .unwrap()
        .get(0);
    if subs > 0 {
        found.push(format!("{subs} subscriptions on target"));
    }
    found
}

/// A tenant with a few hundred thousand rows, so the copy takes a moment.
async fn fill(f: &TestFleet, tenant: &str, rows: i64) {
    let c = f.connect(tenant).await;
    c.batch_execute(&format!(
        "create table items (id bigserial primary key, body text not null);
         insert into items (body) select repeat(md5(g::text), 4) from generate_series(1, {rows}) g;
         create table notes (k int, v text);  -- no primary key
         insert into notes select g, 'n' || g from generate_series(1, 1000) g;"
    ))
    .await
    .unwrap();
}

fn pgbench(args: &[&str], url: &str) -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new(tool("pgbench"));
    cmd.args(args).arg(url).kill_on_drop(true);
    cmd
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_move_under_pgbench_load_loses_nothing() {
    let f = TestFleet::start(Options {
        pods: 2,
        pool_size: 8,
        ..Default::default()
    })
    .await;
    f.tenant("bank", 0).await;
    let url = f.app_url("bank");
    let init = pgbench(&["-i", "-s", "2", "-q"], &url)
        .output()
        .await
        .unwrap();
    assert!(
        init.status.success(),
        "{}",
        String::from_utf8_lossy(&init.stderr)
    );
    let load = pgbench(&["-n", "-c", "8", "-j", "2", "-T", "20"], &url).output();
    let load = tokio::spawn(load);
    tokio::time::sleep(Duration::from_secs(4)).await;
    let id = start_move(&f, "bank", "pod1").await;
    let done = wait_job(&f, id, Duration::from_secs(120)).await;
    assert_eq!(done["state"], "succeeded", "{done}");
    let out = load.await.unwrap().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !stdout.contains("number of failed transactions: ")
            || stdout.contains("number of failed transactions: 0 "),
        "{stdout}"
    );
    let processed: i64 = stdout
        .lines()
        .find_map(|l| l.strip_prefix("number of transactions actually processed: "))
        .and_then(|l| l.split('/').next())
        .and_then(|n| n.trim().parse().ok())
        .expect("pgbench summary");
    assert!(processed > 100, "{stdout}");
    assert_eq!(
        tenant_pod(&f, "bank").await,
        ("pod1".into(), "active".into())
    );
    // Invariant on the target: every balance change is in history, once.
    let t = pod_admin(&f.pods[1], "bank").await;
    let r = t
        .query_one(
            "select (select sum(abalance) from pgbench_accounts)::int8, (select sum(bbalance) from pgbench_branches)::int8,
                    (select sum(tbalance) from pgbench_tellers)::int8, (select coalesce(sum(delta), 0) from pgbench_history)::int8,
                    (select count(*) from pgbench_history)",
            &[],
        )
        .await
        .unwrap();
    let (a, b, te, d, n): (i64, i64, i64, i64, i64) =
        (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4));
    assert!(
        a == b && b == te && te == d,
        "balances differ on the target: {a} {b} {te} {d}"
    );
    assert_eq!(n, processed, "history rows vs transactions processed");
    let pause = done["result"]["pause_ms"].as_u64().expect("pause_ms");
    assert!(pause < 2000, "pause {pause} ms");
    // The source database is kept, renamed and closed; no replication object remains.
    let s = pod_admin(&f.pods[0], "postgres").await;
    let kept = done["result"]["source_kept_as"].as_str().expect("kept");
    let allow: bool = s
        .query_one(
            "select datallowconn from pg_database where datname = $1",
            &[&kept],
        )
        .await
        .unwrap()
        .get(0);
    assert!(!allow);
    let slots: i64 = s
        .query_one("select count(*) from pg_replication_slots", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(slots, 0);
    let subs: i64 = t
        .query_one("select count(*) from pg_subscription", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(subs, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tables_without_a_key_and_sequences_survive_a_move() {
    let f = TestFleet::start(Options::default()).await;
    f.tenant("shop", 0).await;
    fill(&f, "shop", 20_000).await;
    // A writer that keeps updating the keyless table and inserting with the sequence.
    let writer = {
        let c = f.connect("shop").await;
        tokio::spawn(async move {
            let started = Instant::now();
            let mut n = 0;
            while started.elapsed() < Duration::from_secs(60) {
                c.execute(
                    "update notes set v = v || '.' where k = $1",
                    &[&((n % 1000) + 1)],
                )
                .await
                .expect("update during the move");
                c.execute("insert into items (body) values ('during')", &[])
                    .await
                    .expect("insert during the move");
                n += 1;
                if n >= 400 && started.elapsed() > Duration::from_secs(3) {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            n
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let id = start_move(&f, "shop", "pod1").await;
    let done = wait_job(&f, id, Duration::from_secs(120)).await;
    assert_eq!(done["state"], "succeeded", "{done}");
    assert_eq!(done["result"]["replica_identity_full"], 1, "{done}");
    let n = writer.await.unwrap();
    let c = f.connect("shop").await;
    // Every update reached the target: the dots add up.
    let dots: i64 = c
        .query_one(
            "select sum(length(v) - length(replace(v, '.', '')))::int8 from notes",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(dots, n as i64);
    // The sequence continues after the last id: no duplicate key.
    let max: i64 = c
        .query_one("select max(id) from items", &[])
        .await
        .unwrap()
        .get(0);
    let next: i64 = c
        .query_one(
            "insert into items (body) values ('after') returning id",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(next > max, "next id {next} <= max {max}");
    let rows: i64 = c
        .query_one("select count(*) from items", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(rows, 20_000 + n as i64 + 1);
    // On the target, the keyless table has its own identity back (default).
    let t = pod_admin(&f.pods[1], "shop").await;
    let ident: i8 = t
        .query_one(
            "select relreplident::text::\"char\" from pg_class where relname = 'notes'",
            &[],
        )
        .await
        .map(|r| r.get::<_, i8>(0))
        .unwrap_or(b'd' as i8);
    assert_eq!(ident as u8, b'd');
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_in_each_phase_leaves_the_tenant_where_it_was() {
    let f = TestFleet::start(Options {
        pods: 2,
        config_extra: "\n[moves]\npause_deadline = \"20s\"\n".into(),
        ..Default::default()
    })
    .await;
    f.tenant("acme", 0).await;
    fill(&f, "acme", 300_000).await;
    let check = |label: &'static str| {
        let f = &f;
        async move {
            assert_eq!(
                tenant_pod(f, "acme").await,
                ("pod0".into(), "active".into()),
                "{label}"
            );
            assert_eq!(
                leftovers(f, "acme", 0, 1).await,
                Vec::<String>::new(),
                "{label}"
            );
            let c = f.connect("acme").await;
            c.execute("insert into items (body) values ($1)", &[&label])
                .await
                .unwrap_or_else(|e| panic!("{label}: writes fail after the cancel: {e}"));
        }
    };
    // Right away (preflight or schema).
    let id = start_move(&f, "acme", "pod1").await;
    let (status, _) = f.admin("DELETE", &format!("/v1/jobs/{id}"), None).await;
    assert_eq!(status.as_u16(), 202);
    let j = wait_job(&f, id, Duration::from_secs(60)).await;
    assert_eq!(j["state"], "cancelled", "{j}");
    check("early").await;

    // During the initial copy.
    let id = start_move(&f, "acme", "pod1").await;
    wait_phase(&f, id, "copy", Duration::from_secs(60)).await;
    f.admin("DELETE", &format!("/v1/jobs/{id}"), None).await;
    let j = wait_job(&f, id, Duration::from_secs(60)).await;
    assert_eq!(j["state"], "cancelled", "{j}");
    check("copy").await;

    // (Catch-up cannot be held from outside: a write transaction old enough to hold it
    // also holds the table-sync slots of the copy. Its cancel takes the same path as the
    // copy's: the cancellable sleep between polls, then the same rollback.)

    // During the cutover: a client's open transaction keeps the pause waiting.
    // (A read-only transaction: it neither holds the slot's snapshot nor counts as a writer.)
    let client = f.connect("acme").await;
    client.batch_execute("begin; select 1").await.unwrap();
    let id = start_move(&f, "acme", "pod1").await;
    wait_phase(&f, id, "cutover", Duration::from_secs(90)).await;
    // A new client's query is held at the gate meanwhile, not failed.
    let held = {
        let c = f.connect("acme").await;
        tokio::spawn(async move {
            c.query_one("select count(*) from items", &[])
                .await
                .map(|r| r.get::<_, i64>(0))
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    f.admin("DELETE", &format!("/v1/jobs/{id}"), None).await;
    let j = wait_job(&f, id, Duration::from_secs(60)).await;
    assert_eq!(j["state"], "cancelled", "{j}");
    assert!(
        held.await
            .unwrap()
            .expect("the held query runs after the cancel")
            > 0
    );
    client.batch_execute("commit").await.unwrap();
    check("cutover").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_target_that_dies_during_the_copy_aborts_the_move_cleanly() {
    let mut f = TestFleet::start(Options::default()).await;
    f.tenant("acme", 0).await;
    fill(&f, "acme", 300_000).await;
    let id = start_move(&f, "acme", "pod1").await;
    wait_phase(&f, id, "copy", Duration::from_secs(60)).await;
    let (datadir, port) = (f.pods[1].datadir().to_owned(), f.pods[1].port());
    f.pods[1].kill9();
    let j = wait_job(&f, id, Duration::from_secs(120)).await;
    assert_eq!(j["state"], "failed", "{j}");
    assert!(j["error"].as_str().unwrap().contains("pod1"), "{j}");
    // The tenant works on its source at once.
    assert_eq!(
        tenant_pod(&f, "acme").await,
        ("pod0".into(), "active".into())
    );
    let c = f.connect("acme").await;
    c.execute("insert into items (body) values ('after')", &[])
        .await
        .unwrap();
    // Once the target is back, the janitor removes what was left there.
    f.pods[1] = podrouter::localpg::LocalCluster::start(&bins(), &datadir, port, &[])
        .await
        .unwrap();
    wait_for(
        "no leftovers after the target returns",
        Duration::from_secs(60),
        || async { leftovers(&f, "acme", 0, 1).await.is_empty().then_some(()) },
    )
    .await;
    f.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_moves_at_once_and_a_second_move_of_the_same_tenant_is_refused() {
    let f = TestFleet::start(Options {
        pods: 3,
        ..Default::default()
    })
    .await;
    f.tenant("one", 0).await;
    f.tenant("two", 1).await;
    fill(&f, "one", 20_000).await;
    fill(&f, "two", 20_000).await;
    let a = start_move(&f, "one", "pod2").await;
    let b = start_move(&f, "two", "pod0").await;
    let (status, e) = f
        .admin("POST", "/v1/tenants/one/move", Some(json!({"to": "pod1"})))
        .await;
    assert_eq!(status.as_u16(), 409, "{e}");
    let (status, e) = f
        .admin(
            "POST",
            "/v1/tenants/nosuch/move",
            Some(json!({"to": "pod1"})),
        )
        .await;
    assert_eq!(status.as_u16(), 404, "{e}");
    let (status, e) = f
        .admin(
            "POST",
            "/v1/tenants/two/move",
            Some(json!({"to": "nosuch"})),
        )
        .await;
    assert!(status.as_u16() == 404 || status.as_u16() == 409, "{e}");
    for id in [a, b] {
        let j = wait_job(&f, id, Duration::from_secs(120)).await;
        assert_eq!(j["state"], "succeeded", "{j}");
    }
    assert_eq!(tenant_pod(&f, "one").await.0, "pod2");
    assert_eq!(tenant_pod(&f, "two").await.0, "pod0");
    for t in ["one", "two"] {
        let c = f.connect(t).await;
        let n: i64 = c
            .query_one("select count(*) from items", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(n, 20_000);
    }
    // A finished job cannot be cancelled.
    let (status, _) = f.admin("DELETE", &format!("/v1/jobs/{a}"), None).await;
    assert_eq!(status.as_u16(), 409);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_mode_clients_follow_the_move_with_their_settings_and_statements() {
    let f = TestFleet::start(Options {
        pods: 2,
        mode: podrouter::config::PoolMode::Session,
        ..Default::default()
    })
    .await;
    f.tenant("acme", 0).await;
    fill(&f, "acme", 1_000).await;
    let port = "select current_setting('port')::int";
    // An idle session with settings and prepared statements of both kinds.
    let idle = f.connect("acme").await;
    idle.batch_execute(
        "set application_name = 'idle-session';
         set work_mem = '12MB';
         set search_path = public, pg_catalog;
         prepare byid (bigint) as select body from items where id = $1",
    )
    .await
    .unwrap();
    let counted = idle
        .prepare("select count(*) from items where id <= $1")
        .await
        .unwrap();
    let before: i32 = idle.query_one(port, &[]).await.unwrap().get(0);
    assert_eq!(before as u16, f.pods[0].port());
    // A session with a temporary table: its state cannot follow.
    let pinned = f.connect("acme").await;
    pinned
        .batch_execute("create temp table scratch (x int); insert into scratch values (1)")
        .await
        .unwrap();
    // A busy session: one statement after another through the move, none may fail.
    let busy = f.connect("acme").await;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let looping = {
        let stop = stop.clone();
        tokio::spawn(async move {
            let (mut ok, mut ports) = (0u64, std::collections::BTreeSet::new());
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let r = busy
                    .query_one(
                        "select count(*), current_setting('port')::int from items",
                        &[],
                    )
                    .await
                    .expect("a busy session-mode client must not see an error");
                assert_eq!(r.get::<_, i64>(0), 1_000);
                ports.insert(r.get::<_, i32>(1));
                ok += 1;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            (ok, ports)
        })
    };
    let id = start_move(&f, "acme", "pod1").await;
    let j = wait_job(&f, id, Duration::from_secs(120)).await;
    assert_eq!(j["state"], "succeeded", "{j}");
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (ok, ports) = looping.await.unwrap();
    assert!(ok > 10, "only {ok} statements ran");
    assert!(
        ports.contains(&(f.pods[1].port() as i32)),
        "the busy session never reached the target: {ports:?}"
    );
    // The idle session continues on the target, its state intact.
    let after: i32 = idle.query_one(port, &[]).await.unwrap().get(0);
    assert_eq!(after as u16, f.pods[1].port());
    let show = |name: &'static str| {
        let idle = &idle;
        async move {
            idle.query_one(&format!("show {name}"), &[])
                .await
                .unwrap()
                .get::<_, String>(0)
        }
    };
    assert_eq!(show("work_mem").await, "12MB");
    assert_eq!(show("search_path").await, "public, pg_catalog");
    assert_eq!(show("application_name").await, "idle-session");
    let n: i64 = idle.query_one(&counted, &[&500i64]).await.unwrap().get(0);
    assert_eq!(n, 500);
    let rows = idle.simple_query("execute byid(7)").await.unwrap();
    assert!(
        rows.iter()
            .any(|m| matches!(m, tokio_postgres::SimpleQueryMessage::Row(_))),
        "EXECUTE of the SQL-level statement returned no row"
    );
    // The session with a temporary table was ended between transactions with a clear 57P01.
    let e = pinned.simple_query("select 1").await.unwrap_err();
    match e.as_db_error() {
        Some(db) => {
            assert_eq!(db.code().code(), "57P01", "{e}");
            assert!(db.message().contains("temporary tables"), "{e}");
        }
        None => assert!(pinned.is_closed(), "{e}"),
    }
    let c = f.connect("acme").await;
    let n: i64 = c
        .query_one("select count(*) from items", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 1_000);
    assert_eq!(tenant_pod(&f, "acme").await.0, "pod1");
}

/// The router as a separate process on the fleet's catalog, for SIGKILL.
struct Router {
    child: std::process::Child,
    admin: String,
}

impl Drop for Router {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn router_process(f: &TestFleet, port: u16, admin: u16) -> Router {
    let path = f.dir.path().join("serve.toml");
    std::fs::write(&path, f.config_with_ports(port, admin)).unwrap();
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_podrouter"))
        .args(["serve", "--config"])
        .arg(&path)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::inherit())
        .spawn()
        .unwrap();
    let r = Router {
        child,
        admin: format!("http://127.0.0.1:{admin}"),
    };
    let url = format!("postgres://{ROLE}:{PASSWORD}@127.0.0.1:{port}/acme");
    wait_for(
        "podrouter serve to accept",
        Duration::from_secs(30),
        || async { connect(&url).await.ok().map(|_| ()) },
    )
    .await;
    r
}

async fn http(
    r: &Router,
    token: &str,
    method: reqwest::Method,
    path: &str,
    body: Option<Value>,
) -> Value {
    let req = reqwest::Client::new()
        .request(method, format!("{}{path}", r.admin))
        .bearer_auth(token);
    let req = match body {
        Some(b) => req.json(&b),
        None => req,
    };
    req.send().await.unwrap().json().await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_router_killed_mid_move_recovers_at_its_next_start() {
    let mut f = TestFleet::start(Options {
        pods: 2,
        config_extra: "\n[moves]\npause_deadline = \"30s\"\n".into(),
        ..Default::default()
    })
    .await;
    f.tenant("acme", 0).await;
    fill(&f, "acme", 300_000).await;
    f.stop().await;
    let (port, admin) = (
        podrouter::localpg::free_port(),
        podrouter::localpg::free_port(),
    );
    let url = format!("postgres://{ROLE}:{PASSWORD}@127.0.0.1:{port}/acme");
    let token = f.token.clone();
    for when in ["copy", "cutover"] {
        let mut r = router_process(&f, port, admin).await;
        let holder = connect(&url).await.unwrap();
        if when == "cutover" {
            holder.batch_execute("begin; select 1").await.unwrap();
        }
        let job = http(
            &r,
            &token,
            reqwest::Method::POST,
            "/v1/tenants/acme/move",
            Some(json!({"to": "pod1"})),
        )
        .await;
        let id = job["id"].as_i64().unwrap_or_else(|| panic!("{job}"));
        wait_for(when, Duration::from_secs(90), || async {
            let j = http(
                &r,
                &token,
                reqwest::Method::GET,
                &format!("/v1/jobs/{id}"),
                None,
            )
            .await;
            assert!(j["state"] == "running" || j["state"] == "pending", "{j}");
            (j["phase"] == when).then_some(())
        })
        .await;
        tokio::time::sleep(Duration::from_millis(200)).await;
        r.child.kill().unwrap(); // SIGKILL
        r.child.wait().unwrap();
        drop(holder);
        let r = router_process(&f, port, admin).await;
        let j = http(
            &r,
            &token,
            reqwest::Method::GET,
            &format!("/v1/jobs/{id}"),
            None,
        )
        .await;
        assert_eq!(j["state"], "failed", "{when}: {j}");
        assert!(j["error"].as_str().unwrap().contains("restart"), "{j}");
        let t = http(&r, &token, reqwest::Method::GET, "/v1/tenants/acme", None).await;
        assert_eq!(
            (t["pod"].as_str(), t["state"].as_str()),
            (Some("pod0"), Some("active")),
            "{when}: {t}"
        );
        assert_eq!(
            leftovers(&f, "acme", 0, 1).await,
            Vec::<String>::new(),
            "{when}"
        );
        let c = connect(&url).await.unwrap();
        c.execute("insert into items (body) values ($1)", &[&when])
            .await
            .unwrap();
        drop(r);
    }
}
