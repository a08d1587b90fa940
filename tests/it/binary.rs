//! The `podrouter` binary as users run it: `serve` with a config (memory while streaming a
//! large result, pgbench through it), `config check`, and `demo`.

use crate::support::*;
use futures_util::TryStreamExt;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_podrouter");

struct Serve(Child);

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Peak and current resident memory of a process, in KiB.
fn rss_kib(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    (field("VmHWM:"), field("VmRSS:"))
}

/// A fleet whose router runs as the real binary (`podrouter serve`) instead of in-process.
async fn serve_binary(mode: &str) -> (TestFleet, Serve, String) {
    let mut f = TestFleet::acme(Options {
        pods: 1,
        ..Default::default()
    })
    .await;
    f.stop().await; // the in-process router made the tenant; the binary serves it
    let port = podrouter::localpg::free_port();
    let admin = podrouter::localpg::free_port();
    let text = std::fs::read_to_string(&f.config_path).unwrap();
    let text = text
        .replacen(
            "listen = \"127.0.0.1:0\"",
            &format!("listen = \"127.0.0.1:{port}\""),
            1,
        )
        .replacen(
            "admin_listen = \"127.0.0.1:0\"",
            &format!("admin_listen = \"127.0.0.1:{admin}\""),
            1,
        )
        .replace("mode = \"transaction\"", &format!("mode = \"{mode}\""))
        .replace("size = 5", "size = 6");
    let path = f.dir.path().join("serve.toml");
    std::fs::write(&path, text).unwrap();
    let child = Command::new(BIN)
        .args(["serve", "--config"])
        .arg(&path)
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let serve = Serve(child);
    let url = format!("postgres://{ROLE}:{PASSWORD}@127.0.0.1:{port}/acme");
    let deadline = Instant::now() + Duration::from_secs(30);
    while connect(&url).await.is_err() {
        assert!(Instant::now() < deadline, "podrouter serve did not come up");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    (f, serve, url)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_100_mb_result_streams_through_flat_memory() {
    let (_f, serve, url) = serve_binary("session").await;
    let c = connect(&url).await.unwrap();
    c.simple_query("select 1").await.unwrap();
    let (_, rss_before) = rss_kib(serve.0.id());
    // 100 MB as rows (extended protocol, streamed by the client)...
    let rows = c
        .query_raw(
            "select repeat('x', 1000) from generate_series(1, 100000)",
            std::iter::empty::<i32>(),
        )
        .await
        .unwrap();
    futures_util::pin_mut!(rows);
    let mut bytes = 0usize;
    while let Some(r) = rows.try_next().await.unwrap() {
        bytes += r.get::<_, &str>(0).len();
    }
    assert_eq!(bytes, 100_000_000);
    // ...and as one COPY stream.
    let stream = c
        .copy_out("copy (select repeat('y', 1000) from generate_series(1, 100000)) to stdout")
        .await
        .unwrap();
    futures_util::pin_mut!(stream);
    let mut copied = 0usize;
    while let Some(chunk) = stream.try_next().await.unwrap() {
        copied += chunk.len();
    }
    assert_eq!(copied, 100_100_000);
    let (peak, _) = rss_kib(serve.0.id());
    assert!(
        peak < rss_before + 40 * 1024,
        "router peak RSS grew from {rss_before} KiB to {peak} KiB while relaying 200 MB"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgbench_runs_through_the_router() {
    for mode in ["session", "transaction"] {
        let (_f, _serve, url) = serve_binary(mode).await;
        let init = Command::new(tool("pgbench"))
            .args(["-i", "-s", "1", "-q", &url])
            .output()
            .unwrap();
        assert!(
            init.status.success(),
            "pgbench -i ({mode}): {}",
            String::from_utf8_lossy(&init.stderr)
        );
        // Session mode holds a server connection per client (4 within the pool of 6);
        // transaction mode shares them: 8 clients on 6 connections.
        let clients = if mode == "session" { "4" } else { "8" };
        let run = Command::new(tool("pgbench"))
            .args(["-n", "-c", clients, "-j", "2", "-T", "3", &url])
            .output()
            .unwrap();
        let out = String::from_utf8_lossy(&run.stdout);
        if !run.status.success() {
            let admin = pod_admin(&_f.pods[0], "postgres").await;
            let activity: Vec<String> = admin
                .query("select usename || ' ' || state || ' ' || left(query, 60) from pg_stat_activity where usename = $1", &[&ROLE])
                .await
                .unwrap()
                .iter()
                .map(|r| r.get(0))
                .collect();
            panic!(
                "pgbench ({mode}): {out}{}\nserver connections: {activity:#?}",
                String::from_utf8_lossy(&run.stderr)
            );
        }
        assert!(
            out.contains("number of failed transactions: 0"),
            "{mode}: {out}"
        );
        let processed: u64 = out
            .lines()
            .find_map(|l| l.strip_prefix("number of transactions actually processed: "))
            .and_then(|v| v.split('/').next())
            .and_then(|v| v.trim().parse().ok())
            .unwrap();
        assert!(processed > 50, "{mode}: only {processed} transactions");
        // pgbench's invariant: every balance change is recorded in history.
        let c = connect(&url).await.unwrap();
        let row = c
            .query_one(
                "select (select sum(abalance) from pgbench_accounts)::bigint, (select sum(delta) from pgbench_history)::bigint, (select count(*) from pgbench_history)",
                &[],
            )
            .await
            .unwrap();
        assert_eq!(row.get::<_, i64>(0), row.get::<_, i64>(1), "{mode}");
        assert_eq!(row.get::<_, i64>(2) as u64, processed, "{mode}");
        if mode == "transaction" {
            // Named prepared statements with more clients (12) than server connections (6).
            for script in [&["-S"][..], &[][..]] {
                let run = Command::new(tool("pgbench"))
                    .args(["-n", "-M", "prepared", "-c", "12", "-j", "2", "-T", "3"])
                    .args(script)
                    .arg(&url)
                    .output()
                    .unwrap();
                let out = String::from_utf8_lossy(&run.stdout);
                assert!(
                    run.status.success() && out.contains("number of failed transactions: 0"),
                    "pgbench -M prepared {script:?}: {out}{}",
                    String::from_utf8_lossy(&run.stderr)
                );
            }
        }
    }
}

#[test]
fn config_check_names_the_field_and_the_fix() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("pods.toml");
    std::fs::write(
        &path,
        "[router]\nlisten = \"127.0.0.1:6432\"\nadmin_listen = \"127.0.0.1:9930\"\ncatalog_url = \"postgres://x@h/c\"\n[pool]\nsize = 0\n",
    )
    .unwrap();
    let out = Command::new(BIN)
        .args(["config", "check"])
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("pods.toml: pool.size: 0 is out of range; set it between 1 and 10000"),
        "{err}"
    );
    let example = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("pods.toml");
    let out = Command::new(BIN)
        .args(["config", "check"])
        .arg(&example)
        .output()
        .unwrap();
    // The example names a token file that only exists in production: the error says so.
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("router.admin_token_file"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_starts_pods_and_routes_tenants() {
    let dir = tempdir();
    let demo_dir = dir.path().join("demo");
    let ports: Vec<u16> = (0..3).map(|_| podrouter::localpg::free_port()).collect();
    let child = Command::new(BIN)
        .args([
            "demo",
            "--pods",
            "2",
            "--tenants",
            "6",
            "--pool-mode",
            "session",
            "--dir",
        ])
        .arg(&demo_dir)
        .args(["--listen", &format!("127.0.0.1:{}", ports[0])])
        .args(["--admin-listen", &format!("127.0.0.1:{}", ports[1])])
        .args(["--http-listen", &format!("127.0.0.1:{}", ports[2])])
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let demo = Serve(child);
    let ready = demo_dir.join("ready.json");
    let deadline = Instant::now() + Duration::from_secs(120);
    while !ready.exists() {
        assert!(Instant::now() < deadline, "no ready.json");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let r: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&ready).unwrap()).unwrap();
    let router = r["router_url"].as_str().unwrap();
    assert_eq!(r["pods"].as_array().unwrap().len(), 2);
    let mut ports_seen = std::collections::HashSet::new();
    for t in r["tenants"].as_array().unwrap() {
        let c = connect(&format!("{router}/{}", t.as_str().unwrap()))
            .await
            .unwrap();
        let row = c
            .query_one("select inet_server_port(), count(*) from accounts", &[])
            .await
            .unwrap();
        ports_seen.insert(row.get::<_, i32>(0));
        assert_eq!(row.get::<_, i64>(1), 100, "sample data present");
    }
    assert_eq!(ports_seen.len(), 2, "tenants spread over both pods");
    // The admin API answers with the token from ready.json.
    let out = Command::new(BIN)
        .args(["--demo-dir"])
        .arg(&demo_dir)
        .args(["tenants", "--json"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["tenants"].as_array().unwrap().len(), 6);
    // SIGTERM stops everything it started.
    let pid = nix::unistd::Pid::from_raw(demo.0.id() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    let mut demo = demo;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if demo.0.try_wait().unwrap().is_some() {
            break;
        }
        assert!(Instant::now() < deadline, "demo did not stop on SIGTERM");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for p in r["pods"].as_array().unwrap() {
        let url = p["url"].as_str().unwrap();
        assert!(
            connect(&format!("{url}/postgres")).await.is_err(),
            "pod {url} still up after the demo stopped"
        );
    }
}
