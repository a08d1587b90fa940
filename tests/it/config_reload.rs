//! Config reload over a real catalog and real pods: through the admin API
//! (`POST /v1/config/reload`, `GET /v1/config/history`), through `Fleet::reload_config` (what
//! SIGHUP calls), and through the real binary receiving SIGHUP.

use crate::support::*;
use axum::http::StatusCode;
use podrouter::fleet::ReloadError;
use serde_json::{json, Value};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_podrouter");

async fn reload(f: &TestFleet, force: bool) -> (StatusCode, Value) {
    f.admin("POST", "/v1/config/reload", Some(json!({ "force": force })))
        .await
}

async fn history(f: &TestFleet) -> Vec<Value> {
    let (s, v) = f.admin("GET", "/v1/config/history", None).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    v["versions"].as_array().unwrap().clone()
}

async fn audit_actions(f: &TestFleet) -> Vec<String> {
    let (_, v) = f.admin("GET", "/v1/audit", None).await;
    v["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["action"].as_str().unwrap().to_owned())
        .collect()
}

fn fields(list: &Value) -> Vec<&str> {
    list.as_array()
        .unwrap()
        .iter()
        .map(|c| c["field"].as_str().unwrap())
        .collect()
}

/// Asserts a 409 `reload_refused` that names exactly `want` (in its message too).
fn assert_refused(got: &(StatusCode, Value), want: &[&str]) {
    let (s, v) = got;
    assert_eq!(*s, StatusCode::CONFLICT, "{v}");
    assert_eq!(v["error"]["code"], "reload_refused", "{v}");
    assert_eq!(fields(&v["error"]["refusals"]), want, "{v}");
    let msg = v["error"]["message"].as_str().unwrap();
    for field in want {
        assert!(msg.contains(field), "{msg:?} should name {field}");
    }
    assert!(msg.contains("force"), "{msg:?} should say how to override");
}

/// The config text without the `[[pod]]` block of `name`.
fn without_pod(text: &str, name: &str) -> String {
    let mut parts = text.split("\n[[pod]]\n");
    let mut out = parts.next().unwrap().to_owned();
    for block in parts {
        if !block.starts_with(&format!("name = \"{name}\"")) {
            out.push_str("\n[[pod]]\n");
            out.push_str(block);
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn growing_the_pool_is_applied_and_recorded_in_history() {
    let f = TestFleet::start(Options {
        pods: 1,
        ..Default::default()
    })
    .await;
    let fleet = f.fleet();
    f.tenant("acme", 0).await;
    let client = f.connect("acme").await;
    client.simple_query("select 1").await.unwrap();

    // The config the router started with is version 1.
    let start = history(&f).await;
    assert_eq!(start.len(), 1, "{start:?}");
    let text = std::fs::read_to_string(&f.config_path).unwrap();
    assert_eq!(start[0]["hash"], podrouter::config::sha256_hex(&text));

    // Reloading the same file changes nothing and records nothing.
    let (s, v) = reload(&f, false).await;
    assert_eq!(
        (s, v),
        (StatusCode::OK, json!({"applied": false, "diff": []}))
    );

    f.edit_config(|t| t.replace("size = 5\n", "size = 12\n"));
    let (s, v) = reload(&f, false).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["applied"], true);
    assert_eq!(v["version"], start[0]["version"].as_i64().unwrap() + 1);
    let text = std::fs::read_to_string(&f.config_path).unwrap();
    assert_eq!(v["hash"], podrouter::config::sha256_hex(&text));
    assert_eq!(
        v["diff"],
        json!([{"field": "pool.size", "old": 5, "new": 12}])
    );

    // In force: the config, the proxy's settings, and the pool that already existed.
    assert_eq!(fleet.config.load().pool.size, 12);
    assert_eq!(fleet.proxy.settings().pool_size, 12);
    let pools = fleet.proxy.pools.snapshot();
    assert!(!pools.is_empty());
    assert!(pools.iter().all(|p| p.size() == 12));
    client.simple_query("select 1").await.unwrap();

    // History, newest first, with the diff; the text is kept.
    let h = history(&f).await;
    assert_eq!(h.len(), 2);
    assert_eq!(h[0]["version"], v["version"]);
    assert_eq!(h[0]["forced"], false);
    assert_eq!(h[0]["diff"], v["diff"]);
    assert!(h[0]["applied_at"].is_string());
    assert_eq!(h[1]["version"], start[0]["version"]);
    let (s, one) = f
        .admin("GET", &format!("/v1/config/history/{}", v["version"]), None)
        .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(one["config"].as_str().unwrap(), text);
    assert!(audit_actions(&f)
        .await
        .contains(&"config.reload".to_owned()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shrinking_the_pool_by_more_than_half_is_refused_unless_forced() {
    let f = TestFleet::start(Options {
        pods: 1,
        pool_size: 20,
        ..Default::default()
    })
    .await;
    let fleet = f.fleet();
    f.edit_config(|t| t.replace("size = 20\n", "size = 5\n"));

    assert_refused(&reload(&f, false).await, &["pool.size"]);
    assert_eq!(
        fleet.config.load().pool.size,
        20,
        "the running config stays"
    );
    assert_eq!(fleet.proxy.settings().pool_size, 20);
    assert_eq!(history(&f).await.len(), 1, "nothing recorded");
    assert!(audit_actions(&f)
        .await
        .contains(&"config.reload_refused".to_owned()));

    let (s, v) = reload(&f, true).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(
        (v["applied"].clone(), v["forced"].clone()),
        (json!(true), json!(true))
    );
    assert_eq!(fields(&v["overridden"]), ["pool.size"]);
    assert_eq!(fleet.config.load().pool.size, 5);
    assert_eq!(fleet.proxy.settings().pool_size, 5);
    let h = history(&f).await;
    assert_eq!(h[0]["forced"], true);
    assert_eq!(
        h[0]["diff"],
        json!([{"field": "pool.size", "old": 20, "new": 5}])
    );
    assert_eq!(h[1]["forced"], false);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_an_explicitly_set_field_is_refused_naming_it() {
    let f = TestFleet::start(Options {
        pods: 1,
        ..Default::default()
    })
    .await;
    // "5s" is also the default: the value would not change, but the file's intent would.
    f.edit_config(|t| t.replace("checkout_timeout = \"5s\"\n", ""));
    let got = reload(&f, false).await;
    assert_refused(&got, &["pool.checkout_timeout"]);
    let msg = got.1["error"]["message"].as_str().unwrap();
    assert!(msg.contains("fall back to the default"), "{msg}");
    assert_eq!(history(&f).await.len(), 1);
    // Setting it again (to anything) is fine.
    f.edit_config(|t| t.replace("[pool]\n", "[pool]\ncheckout_timeout = \"3s\"\n"));
    let (s, v) = reload(&f, false).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(fields(&v["diff"]), ["pool.checkout_timeout"]);
    assert_eq!(
        f.fleet().proxy.settings().limits.checkout_timeout,
        Duration::from_secs(3)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removing_a_pod_with_tenants_is_refused_and_an_empty_one_is_deleted() {
    let f = TestFleet::start(Options::default()).await;
    f.tenant("acme", 1).await;
    let original = std::fs::read_to_string(&f.config_path).unwrap();

    f.edit_config(|t| without_pod(t, "pod1"));
    let got = reload(&f, true).await;
    assert_eq!(
        got.0,
        StatusCode::OK,
        "force keeps a pod with tenants in the catalog: {}",
        got.1
    );
    assert_eq!(got.1["removed_pods"], Value::Null, "{}", got.1);
    let (_, pods) = f.admin("GET", "/v1/pods", None).await;
    assert_eq!(pods["pods"].as_array().unwrap().len(), 2, "{pods}");
    f.connect("acme")
        .await
        .simple_query("select 1")
        .await
        .unwrap();

    // Back to both pods, then unforced: refused, naming the pod and its tenants.
    std::fs::write(&f.config_path, &original).unwrap();
    let (s, v) = reload(&f, false).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    f.edit_config(|t| without_pod(t, "pod1"));
    let got = reload(&f, false).await;
    assert_refused(&got, &["pod[pod1]"]);
    assert!(got.1["error"]["message"]
        .as_str()
        .unwrap()
        .contains("still has 1 tenant(s)"));

    // A pod without tenants leaves the file and the catalog, audited.
    std::fs::write(&f.config_path, without_pod(&original, "pod0")).unwrap();
    let (s, v) = reload(&f, false).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["removed_pods"], json!(["pod0"]));
    assert_eq!(fields(&v["diff"]), ["pod[pod0]"]);
    let (_, pods) = f.admin("GET", "/v1/pods", None).await;
    let names: Vec<&str> = pods["pods"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["pod1"]);
    assert!(!f.fleet().table.load().pods.contains_key("pod0"));
    assert!(audit_actions(&f).await.contains(&"pod.delete".to_owned()));
    f.connect("acme")
        .await
        .simple_query("select 1")
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_file_is_refused_and_force_does_not_override_it() {
    let f = TestFleet::start(Options {
        pods: 1,
        ..Default::default()
    })
    .await;
    let original = std::fs::read_to_string(&f.config_path).unwrap();
    for (text, words) in [
        (format!("{original}\n[pool\n"), "TOML parse error"),
        (
            original.replace("size = 5\n", "size = 0\n"),
            "pool.size: 0 is out of range; set it between 1 and 10000",
        ),
    ] {
        std::fs::write(&f.config_path, &text).unwrap();
        for force in [false, true] {
            let (s, v) = reload(&f, force).await;
            assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
            assert_eq!(v["error"]["code"], "invalid_config", "{v}");
            let msg = v["error"]["message"].as_str().unwrap();
            assert!(
                msg.starts_with(&f.config_path.display().to_string()),
                "{msg}"
            );
            assert!(msg.contains(words), "{msg:?} should contain {words:?}");
            assert!(msg.contains("the running config stays"), "{msg}");
        }
    }
    assert_eq!(f.fleet().config.load().pool.size, 5);
    assert_eq!(history(&f).await.len(), 1);
    assert!(audit_actions(&f)
        .await
        .contains(&"config.reload_invalid".to_owned()));
}

/// SIGHUP calls `Fleet::reload_config(false, "sighup")`; here it is called directly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_config_applies_safe_changes_and_keeps_restart_only_fields() {
    let f = TestFleet::start(Options {
        pods: 1,
        ..Default::default()
    })
    .await;
    let fleet = f.fleet();
    f.edit_config(|t| t.replace("[pool]\n", "[pool]\nserver_idle_timeout = \"2m\"\n"));
    let o = fleet.reload_config(false, "sighup").await.unwrap();
    assert!(o.applied && !o.forced);
    assert_eq!(o.diff.len(), 1);
    assert_eq!(
        o.diff[0].to_string(),
        r#"pool.server_idle_timeout: "600s" -> "120s""#
    );
    assert_eq!(
        fleet.proxy.settings().limits.server_idle_timeout,
        Duration::from_secs(120)
    );

    // A listener cannot move while running: refused with a restart hint...
    let listen = fleet.config.load().router.listen;
    f.edit_config(|t| t.replacen("listen = \"127.0.0.1:0\"", "listen = \"127.0.0.1:1\"", 1));
    match fleet.reload_config(false, "sighup").await {
        Err(ReloadError::Refused(r)) => {
            assert_eq!(r.len(), 1, "{r:?}");
            assert_eq!(r[0].field, "router.listen");
            assert!(r[0].reason.contains("restart"), "{}", r[0].reason);
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    // ...and with force the rest applies while the listener keeps its running value until a
    // restart; the file's value is what history records.
    f.edit_config(|t| t.replace("size = 5\n", "size = 7\n"));
    let o = fleet.reload_config(true, "sighup").await.unwrap();
    assert!(o.forced);
    let restart: Vec<_> = o.diff.iter().filter(|c| c.after_restart).collect();
    assert_eq!(restart.len(), 1, "{:?}", o.diff);
    assert_eq!(restart[0].field, "router.listen");
    assert_eq!(fleet.config.load().router.listen, listen);
    assert_eq!(fleet.config.load().pool.size, 7);
    // The next reload diffs against the file as applied: the listener is not refused again.
    f.edit_config(|t| t.replace("size = 7\n", "size = 8\n"));
    let o = fleet.reload_config(false, "sighup").await.unwrap();
    assert_eq!(
        o.diff.iter().map(|c| c.field.as_str()).collect::<Vec<_>>(),
        ["pool.size"]
    );
}

struct Serve(Child);

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn sighup(child: &Serve) {
    let pid = nix::unistd::Pid::from_raw(child.0.id() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGHUP).unwrap();
}

/// GETs an admin path on the binary's listener until `done` accepts the JSON.
async fn poll(
    http: &reqwest::Client,
    url: &str,
    token: &str,
    done: impl Fn(&Value) -> bool,
) -> Value {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(resp) = http.get(url).bearer_auth(token).send().await {
            if let Ok(v) = resp.json::<Value>().await {
                if done(&v) {
                    return v;
                }
            }
        }
        assert!(Instant::now() < deadline, "gave up waiting on {url}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_the_config_of_podrouter_serve() {
    let mut f = TestFleet::acme(Options {
        pods: 1,
        ..Default::default()
    })
    .await;
    f.stop().await; // the binary serves the same catalog and pod
    let (port, admin) = (
        podrouter::localpg::free_port(),
        podrouter::localpg::free_port(),
    );
    let path = f.dir.path().join("serve.toml");
    let text = f.config_with_ports(port, admin);
    std::fs::write(&path, &text).unwrap();
    let serve = Serve(
        Command::new(BIN)
            .args(["serve", "--config"])
            .arg(&path)
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap(),
    );
    let base = format!("http://127.0.0.1:{admin}");
    let history_url = format!("{base}/v1/config/history");
    let http = reqwest::Client::new();
    let hash = podrouter::config::sha256_hex(&text);
    let started = poll(&http, &history_url, &f.token, |v| {
        v["versions"][0]["hash"] == hash
    })
    .await;
    let start_version = started["versions"][0]["version"].as_i64().unwrap();

    // An unsafe edit: SIGHUP is refused (audited), and the process keeps serving.
    std::fs::write(&path, text.replace("size = 5\n", "size = 1\n")).unwrap();
    sighup(&serve);
    poll(&http, &format!("{base}/v1/audit"), &f.token, |v| {
        v["entries"].as_array().is_some_and(|e| {
            e.iter()
                .any(|e| e["action"] == "config.reload_refused" && e["actor"] == "sighup")
        })
    })
    .await;
    let mut serve = serve;
    assert!(
        serve.0.try_wait().unwrap().is_none(),
        "SIGHUP must not stop the router"
    );

    // A safe edit: SIGHUP applies it and history shows the new version with its diff.
    std::fs::write(&path, text.replace("size = 5\n", "size = 9\n")).unwrap();
    sighup(&serve);
    let v = poll(&http, &history_url, &f.token, |v| {
        v["versions"][0]["version"] != start_version
    })
    .await;
    assert_eq!(v["versions"][0]["version"], start_version + 1);
    assert_eq!(
        v["versions"][0]["diff"],
        json!([{"field": "pool.size", "old": 5, "new": 9}])
    );
    let url = format!("postgres://{ROLE}:{PASSWORD}@127.0.0.1:{port}/acme");
    connect(&url)
        .await
        .unwrap()
        .simple_query("select 1")
        .await
        .unwrap();

    // The CLI on the same API: history, a refused reload, a forced one.
    let cli = |args: &[&str]| {
        Command::new(BIN)
            .args(["--admin-url", &base, "--token", &f.token])
            .args(args)
            .output()
            .unwrap()
    };
    let out = cli(&["config", "history", "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let h: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(h["versions"][0]["diff"][0]["field"], "pool.size");
    let out = cli(&["config", "history"]);
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        table.contains("VERSION") && table.contains("pool.size"),
        "{table}"
    );

    std::fs::write(&path, text.replace("size = 5\n", "size = 2\n")).unwrap();
    let out = cli(&["config", "reload"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("reload_refused") && err.contains("pool.size"),
        "{err}"
    );
    let out = cli(&["config", "reload", "--force"]);
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        said.contains(&format!("applied config version {}", start_version + 2))
            && said.contains("forced"),
        "{said}"
    );
    let out = cli(&["config", "reload"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("unchanged"));
}
