//! Pods through the admin API (add, show, delete, drain), the OpenAPI document, the admin
//! listener's token rule, and the CLI on top of it (`podrouter move`, `jobs`, `pods`,
//! `tenants pause|resume`) run as the real binary against a running router. Real pods and
//! real moves throughout.

use crate::support::*;
use serde_json::{json, Value};
use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

const BIN: &str = env!("CARGO_BIN_EXE_podrouter");

/// Asserts an error answer: status, `{"error": {"code", "message"}}` with a message.
fn assert_error(status: axum::http::StatusCode, body: &Value, want: u16, code: &str) {
    assert_eq!(status.as_u16(), want, "{body}");
    assert_eq!(body["error"]["code"], code, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .is_some_and(|m| m.len() > 10),
        "{body}"
    );
}

async fn tenant_pod(f: &TestFleet, tenant: &str) -> String {
    let (status, t) = f.admin("GET", &format!("/v1/tenants/{tenant}"), None).await;
    assert_eq!(status.as_u16(), 200, "{t}");
    t["pod"].as_str().unwrap().to_owned()
}

/// A table with a sequence, so a moved tenant can show its data and take writes; 128-byte
/// rows, so many of them make a copy that lasts a moment.
async fn fill(f: &TestFleet, tenant: &str, rows: i64) {
    f.connect(tenant)
        .await
        .batch_execute(&format!(
            "create table items (id bigserial primary key, body text not null);
             insert into items (body)
                  select repeat(md5(g::text), 4) from generate_series(1, {rows}) g;"
        ))
        .await
        .unwrap();
}

/// The tenant answers through the router with all its rows, and takes a write.
async fn answers(f: &TestFleet, tenant: &str, rows: i64) {
    let c = f.connect(tenant).await;
    let n: i64 = c
        .query_one("select count(*) from items", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, rows, "{tenant} lost rows");
    c.execute("insert into items (body) values ('after')", &[])
        .await
        .unwrap_or_else(|e| panic!("{tenant} takes no writes: {e}"));
    c.execute("delete from items where body = 'after'", &[])
        .await
        .unwrap();
}

async fn audit_actions(f: &TestFleet) -> Vec<(String, String, String)> {
    let (_, a) = f.admin("GET", "/v1/audit?limit=1000", None).await;
    a["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["action"].as_str().unwrap().to_owned(),
                e["target"].as_str().unwrap().to_owned(),
                e["actor"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pods_add_show_delete_contract_and_api_pods_survive_reloads() {
    let f = TestFleet::start(Options::default()).await;
    let extra = cluster(f.dir.path(), "extra").await;

    // Bad input: 400 with the documented error shape.
    let (s, b) = f
        .admin(
            "POST",
            "/v1/pods",
            Some(json!({"name": "Bad Name", "primary": extra.url()})),
        )
        .await;
    assert_error(s, &b, 400, "invalid_pod_name");
    let (s, b) = f
        .admin(
            "POST",
            "/v1/pods",
            Some(json!({"name": "pod9", "primary": "mysql://x"})),
        )
        .await;
    assert_error(s, &b, 400, "invalid_pod_url");
    let (s, b) = f
        .admin(
            "POST",
            "/v1/pods",
            Some(json!({"name": "pod9", "primary": extra.url(), "weight": 0})),
        )
        .await;
    assert_error(s, &b, 400, "invalid_pod_weight");
    let (s, b) = f
        .admin(
            "POST",
            "/v1/pods",
            Some(json!({"name": "pod9", "primary": extra.url(), "colour": "red"})),
        )
        .await;
    assert_error(s, &b, 400, "invalid_json");
    // The primary must answer, to a user that may create databases and roles.
    let nobody = format!(
        "postgres://postgres@127.0.0.1:{}",
        podrouter::localpg::free_port()
    );
    let (s, b) = f
        .admin(
            "POST",
            "/v1/pods",
            Some(json!({"name": "pod9", "primary": nobody})),
        )
        .await;
    assert_error(s, &b, 503, "pod_unreachable");
    pod_admin(&extra, "postgres")
        .await
        .batch_execute("create role weak login password 'weak-pass'")
        .await
        .unwrap();
    let weak = format!("postgres://weak:weak-pass@127.0.0.1:{}", extra.port());
    let (s, b) = f
        .admin(
            "POST",
            "/v1/pods",
            Some(json!({"name": "pod9", "primary": weak})),
        )
        .await;
    assert_error(s, &b, 400, "pod_admin_insufficient");
    assert_eq!(f.admin("GET", "/v1/pods/pod9", None).await.0.as_u16(), 404);

    // Added: 201 with the pod as GET shows it.
    let (s, pod) = f
        .admin(
            "POST",
            "/v1/pods",
            Some(json!({"name": "pod9", "primary": extra.url(), "weight": 2.5, "http": ["http://127.0.0.1:9"]})),
        )
        .await;
    assert_eq!(s.as_u16(), 201, "{pod}");
    assert_eq!(pod["name"], "pod9");
    assert_eq!(pod["origin"], "api");
    assert_eq!(pod["weight"], 2.5);
    assert_eq!(pod["accepting"], true);
    assert_eq!(pod["tenants"], 0);
    assert_eq!(pod["http"], json!(["http://127.0.0.1:9"]));
    assert_eq!(pod["health"], "up", "{pod}");
    let (s, b) = f
        .admin(
            "POST",
            "/v1/pods",
            Some(json!({"name": "pod9", "primary": extra.url()})),
        )
        .await;
    assert_error(s, &b, 409, "pod_exists");
    let (s, shown) = f.admin("GET", "/v1/pods/pod9", None).await;
    assert_eq!(s.as_u16(), 200);
    assert_eq!(shown["primary"], pod["primary"]);
    let (s, b) = f.admin("GET", "/v1/pods/nope", None).await;
    assert_error(s, &b, 404, "unknown_pod");
    let (_, list) = f.admin("GET", "/v1/pods", None).await;
    let origins: BTreeMap<&str, &str> = list["pods"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| (p["name"].as_str().unwrap(), p["origin"].as_str().unwrap()))
        .collect();
    assert_eq!(
        origins,
        BTreeMap::from([("pod0", "config"), ("pod1", "config"), ("pod9", "api")])
    );

    // Routes know it at once: a tenant placed there answers through the router.
    let (s, t) = f
        .admin(
            "POST",
            "/v1/tenants",
            Some(json!({"name": "nine", "pod": "pod9", "roles": [ROLE]})),
        )
        .await;
    assert_eq!(s.as_u16(), 201, "{t}");
    fill(&f, "nine", 10).await;
    answers(&f, "nine", 10).await;

    // Delete: refused while a tenant lives there, and for pods of the config file.
    let (s, b) = f.admin("DELETE", "/v1/pods/pod9", None).await;
    assert_error(s, &b, 409, "pod_has_tenants");
    let (s, b) = f.admin("DELETE", "/v1/pods/pod1", None).await;
    assert_error(s, &b, 409, "pod_in_config");
    assert!(
        b["error"]["message"].as_str().unwrap().contains("reload"),
        "{b}"
    );
    let (s, b) = f.admin("DELETE", "/v1/pods/nope", None).await;
    assert_error(s, &b, 404, "unknown_pod");

    // Config reloads manage only the config's pods: one that changes a setting and one that
    // drops pod1 (no tenants) leave pod9 as it was.
    f.edit_config(|t| t.replace("size = 5", "size = 6"));
    let (s, r) = f.admin("POST", "/v1/config/reload", Some(json!({}))).await;
    assert_eq!(s.as_u16(), 200, "{r}");
    assert_eq!(r["applied"], true, "{r}");
    f.edit_config(|t| {
        let at = t
            .find("\n[[pod]]\nname = \"pod1\"")
            .expect("pod1 in the config");
        let end = t[at + 1..].find("\n[").map_or(t.len(), |e| at + 1 + e);
        format!("{}{}", &t[..at], &t[end..])
    });
    let (s, r) = f.admin("POST", "/v1/config/reload", Some(json!({}))).await;
    assert_eq!(s.as_u16(), 200, "{r}");
    assert_eq!(r["removed_pods"], json!(["pod1"]), "{r}");
    let (s, after) = f.admin("GET", "/v1/pods/pod9", None).await;
    assert_eq!(s.as_u16(), 200, "a reload removed an API pod: {after}");
    assert_eq!(after["origin"], "api");
    assert_eq!(after["weight"], 2.5);
    answers(&f, "nine", 10).await;

    // With its tenant gone, it can be deleted; the routing table forgets it.
    let (s, b) = f.admin("DELETE", "/v1/tenants/nine", None).await;
    assert_eq!(s.as_u16(), 200, "{b}");
    let (s, b) = f.admin("DELETE", "/v1/pods/pod9", None).await;
    assert_eq!(s.as_u16(), 200, "{b}");
    assert_eq!(b, json!({"deleted": "pod9"}));
    assert_error(
        f.admin("GET", "/v1/pods/pod9", None).await.0,
        &f.admin("GET", "/v1/pods/pod9", None).await.1,
        404,
        "unknown_pod",
    );
    assert!(!f.fleet().table.load().pods.contains_key("pod9"));

    // Every change above is in the audit log, by the admin API.
    let actions = audit_actions(&f).await;
    for want in [
        ("pod.add", "pod9"),
        ("pod.delete", "pod9"),
        ("pod.delete", "pod1"),
    ] {
        assert!(
            actions
                .iter()
                .any(|(a, t, who)| (a.as_str(), t.as_str()) == want && who == "admin-api"),
            "{want:?} not audited: {actions:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_moves_every_tenant_off_a_pod_one_at_a_time() {
    let f = TestFleet::start(Options {
        pods: 3,
        config_extra: "\n[moves]\nmax_concurrent = 1\n".into(),
        ..Default::default()
    })
    .await;
    for (t, pod) in [("d1", 1), ("d2", 1), ("e1", 2)] {
        f.tenant(t, pod).await;
        fill(&f, t, 100).await;
    }
    let (s, b) = f.admin("POST", "/v1/pods/nope/drain", None).await;
    assert_error(s, &b, 404, "unknown_pod");

    let (s, drain) = f.admin("POST", "/v1/pods/pod1/drain", None).await;
    assert_eq!(s.as_u16(), 202, "{drain}");
    assert_eq!(drain["kind"], "drain");
    assert_eq!(drain["pod"], "pod1");
    let id = drain["id"].as_i64().unwrap();
    // Closed to new tenants at once, and one drain at a time.
    let (_, pod1) = f.admin("GET", "/v1/pods/pod1", None).await;
    assert_eq!(pod1["accepting"], false, "{pod1}");
    let (s, b) = f.admin("POST", "/v1/pods/pod1/drain", None).await;
    assert_error(s, &b, 409, "drain_in_progress");

    let done = wait_job(&f, id, Duration::from_secs(240)).await;
    assert_eq!(done["state"], "succeeded", "{done}");
    assert_eq!(done["progress"]["unit"], "tenants", "{done}");
    assert_eq!(done["progress"]["done"], 2, "{done}");
    assert_eq!(done["progress"]["total"], 2, "{done}");
    let moves = done["result"]["moves"].as_array().unwrap();
    assert_eq!(moves.len(), 2, "{done}");
    assert!(moves.iter().all(|m| m["state"] == "succeeded"), "{done}");

    // Every tenant left pod1, for pods the ring chose, and answers with its data.
    for t in ["d1", "d2"] {
        let pod = tenant_pod(&f, t).await;
        assert!(pod == "pod0" || pod == "pod2", "{t} is on {pod}");
        answers(&f, t, 100).await;
    }
    assert_eq!(tenant_pod(&f, "e1").await, "pod2");
    answers(&f, "e1", 100).await;
    let (_, pod1) = f.admin("GET", "/v1/pods/pod1", None).await;
    assert_eq!(pod1["tenants"], 0, "{pod1}");
    assert_eq!(pod1["accepting"], false, "{pod1}");

    // Its moves are jobs with the drain as parent, started one after the other
    // (moves.max_concurrent = 1): each created only once the one before had ended.
    let (_, jobs) = f.admin("GET", "/v1/jobs", None).await;
    let mut children: Vec<&Value> = jobs["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|j| j["parent"] == id)
        .collect();
    children.sort_by_key(|j| j["id"].as_i64());
    assert_eq!(children.len(), 2, "{jobs}");
    assert!(children
        .iter()
        .all(|j| j["kind"] == "move" && j["state"] == "succeeded"));
    let ts = |v: &Value| chrono::DateTime::parse_from_rfc3339(v.as_str().unwrap()).unwrap();
    assert!(
        ts(&children[1]["created_at"]) >= ts(&children[0]["finished_at"]),
        "the drain ran two moves at once: {children:?}"
    );

    // New tenants are placed elsewhere while it is drained.
    for i in 0..6 {
        let (s, t) = f
            .admin(
                "POST",
                "/v1/tenants",
                Some(json!({"name": format!("new{i}"), "roles": [ROLE]})),
            )
            .await;
        assert_eq!(s.as_u16(), 201, "{t}");
        assert_ne!(t["pod"], "pod1", "{t}");
    }
    let actions = audit_actions(&f).await;
    for want in [
        ("pod.drain", "pod1"),
        ("job.drain", "pod1"),
        ("job.drain.succeeded", "pod1"),
    ] {
        assert!(
            actions
                .iter()
                .any(|(a, t, _)| (a.as_str(), t.as_str()) == want),
            "{want:?} not audited: {actions:?}"
        );
    }
}

/// `.route("PATH", METHODS)` calls in the admin API's sources: (path, methods).
fn routes_in_source() -> Vec<(String, BTreeSet<String>)> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src/admin");
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let text = std::fs::read_to_string(entry.unwrap().path()).unwrap();
        let mut rest = text.as_str();
        while let Some(at) = rest.find(".route(") {
            rest = &rest[at + ".route(".len()..];
            // The call's text, up to its closing parenthesis (strings skipped).
            let (mut depth, mut in_str, mut end) = (1, false, 0);
            let bytes = rest.as_bytes();
            while depth > 0 {
                match bytes[end] {
                    b'\\' if in_str => end += 1,
                    b'"' => in_str = !in_str,
                    b'(' if !in_str => depth += 1,
                    b')' if !in_str => depth -= 1,
                    _ => {}
                }
                end += 1;
            }
            let call = &rest[..end];
            let path = call.split('"').nth(1).unwrap().to_owned();
            let methods = ["get", "post", "put", "patch", "delete"]
                .into_iter()
                .filter(|m| {
                    call.match_indices(&format!("{m}("))
                        .any(|(i, _)| i == 0 || !call.as_bytes()[i - 1].is_ascii_alphanumeric())
                })
                .map(str::to_owned)
                .collect();
            out.push((path, methods));
        }
    }
    out
}

/// What a call to `method path` reached: false when no route took it (404 `not_found`
/// from the fallback, or 405). POSTs carry `{"dry_run": true}`, which every POST either
/// refuses as a bad body or, for plans, answers without acting.
async fn reaches_a_handler(f: &TestFleet, method: &str, path: &str) -> bool {
    let body = (method == "post").then(|| json!({"dry_run": true}));
    let (s, b) = f.admin(&method.to_uppercase(), path, body).await;
    s.as_u16() != 405 && b["error"]["code"] != "not_found"
}

/// `required ⊆ keys(value) ⊆ properties` of a component schema.
fn check_shape(doc: &Value, schema: &str, value: &Value) {
    let s = &doc["components"]["schemas"][schema];
    let props: BTreeSet<&str> = s["properties"]
        .as_object()
        .unwrap_or_else(|| panic!("no schema {schema}"))
        .keys()
        .map(String::as_str)
        .collect();
    let keys: BTreeSet<&str> = value
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    let required: BTreeSet<&str> = s["required"]
        .as_array()
        .map(|r| r.iter().map(|x| x.as_str().unwrap()).collect())
        .unwrap_or_default();
    assert!(
        keys.is_subset(&props),
        "{schema}: undocumented fields {:?}",
        &keys - &props
    );
    assert!(
        required.is_subset(&keys),
        "{schema}: missing fields {:?}",
        &required - &keys
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openapi_documents_every_route_and_the_real_shapes() {
    let f = TestFleet::start(Options::default()).await;
    // No token needed.
    let resp = reqwest::get(format!("http://{}/openapi.json", f.running().admin_addr))
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    let doc: Value = resp.json().await.unwrap();
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."), "{doc}");
    assert_eq!(doc, podrouter::admin::openapi::document());
    let paths = doc["paths"].as_object().unwrap();

    // Every route in the sources is documented with its methods ...
    let routes = routes_in_source();
    assert!(routes.len() >= 20, "found only {routes:?}");
    for (path, methods) in &routes {
        let documented = paths
            .get(path)
            .or_else(|| paths.get(&format!("/v1{path}")))
            .unwrap_or_else(|| panic!("route {path} is not in /openapi.json"));
        for m in methods {
            assert!(
                documented.get(m).is_some(),
                "{} {path} is not in /openapi.json",
                m.to_uppercase()
            );
        }
    }
    // ... and every documented operation reaches a handler, while the methods a path does
    // not document are refused (so the document lists exactly what `app()` serves).
    let concrete = |p: &str| {
        p.replace("{pod}", "nowhere")
            .replace("{tenant}", "nobody")
            .replace("{id}", "987654321")
            .replace("{version}", "987654321")
    };
    for (path, item) in paths {
        assert!(!concrete(path).contains('{'), "unknown parameter in {path}");
        for m in ["get", "post", "put", "patch", "delete"] {
            let reached = reaches_a_handler(&f, m, &concrete(path)).await;
            assert_eq!(
                reached,
                item.get(m).is_some(),
                "{} {path}: documented {} but reached a handler: {reached}",
                m.to_uppercase(),
                item.get(m).is_some()
            );
        }
    }

    // Real answers have the documented fields.
    f.tenant("shape", 0).await;
    let (_, pod) = f.admin("GET", "/v1/pods/pod0", None).await;
    check_shape(&doc, "Pod", &pod);
    let (_, tenant) = f.admin("GET", "/v1/tenants/shape", None).await;
    check_shape(&doc, "Tenant", &tenant);
    let (s, drain) = f.admin("POST", "/v1/pods/pod1/drain", None).await;
    assert_eq!(s.as_u16(), 202, "{drain}");
    check_shape(&doc, "Job", &drain);
    let done = wait_job(&f, drain["id"].as_i64().unwrap(), Duration::from_secs(60)).await;
    check_shape(&doc, "Job", &done);
    check_shape(&doc, "Progress", &done["progress"]);
    let (_, e) = f.admin("GET", "/v1/pods/nowhere", None).await;
    check_shape(&doc, "ErrorBody", &e);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tokenless_admin_api_is_loopback_only() {
    let f = TestFleet::start(Options {
        pods: 1,
        ..Default::default()
    })
    .await;
    // Validation refuses a non-loopback admin_listen without a token ...
    let text = std::fs::read_to_string(&f.config_path)
        .unwrap()
        .replace("admin_token_file = \"admin.token\"\n", "");
    let open = text.replacen(
        "admin_listen = \"127.0.0.1:0\"",
        "admin_listen = \"0.0.0.0:0\"",
        1,
    );
    assert_ne!(open, text);
    let path = f.dir.path().join("open.toml");
    std::fs::write(&path, &open).unwrap();
    let err = podrouter::config::Config::load(&path)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("admin_token_file") && err.contains("loopback"),
        "{err}"
    );
    let out = std::process::Command::new(BIN)
        .args(["config", "check"])
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{out:?}");

    // ... and a router without a token answers loopback callers only, whatever happened.
    let source = podrouter::config::ConfigSource::parse("tokenless.toml", text).unwrap();
    let catalog = podrouter::catalog::Catalog::connect(
        &format!("{}/podrouter_catalog", f.pods[0].url()),
        Duration::from_secs(10),
    )
    .await
    .unwrap();
    let fleet = std::sync::Arc::new(podrouter::fleet::Fleet::new(catalog, source, None));
    assert!(fleet.admin_token.is_none());
    for (peer, want) in [("10.1.2.3:40000", 403), ("127.0.0.1:40000", 200)] {
        use tower::ServiceExt;
        let mut req = axum::http::Request::builder()
            .uri("/v1/jobs")
            .body(axum::body::Body::empty())
            .unwrap();
        req.extensions_mut().insert(axum::extract::ConnectInfo(
            peer.parse::<std::net::SocketAddr>().unwrap(),
        ));
        let resp = podrouter::admin::app(fleet.clone())
            .oneshot(req)
            .await
            .unwrap();
        assert_eq!(resp.status().as_u16(), want, "caller {peer}");
    }
}

/// The CLI against the fleet's router, with its admin URL and token.
pub(crate) fn cli(f: &TestFleet, args: &[&str]) -> tokio::process::Command {
    let mut c = tokio::process::Command::new(BIN);
    c.arg("--admin-url")
        .arg(format!("http://{}", f.running().admin_addr))
        .arg("--token")
        .arg(&f.token)
        .args(args)
        .env("RUST_LOG", "warn")
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true);
    c
}

/// Runs the CLI to its end (bounded); returns exit code, stdout, stderr.
pub(crate) async fn run_cli(f: &TestFleet, args: &[&str]) -> (i32, String, String) {
    let out = tokio::time::timeout(Duration::from_secs(180), cli(f, args).output())
        .await
        .unwrap_or_else(|_| panic!("podrouter {args:?} did not end"))
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_moves_a_tenant_with_progress_and_drives_jobs_pods_and_pauses() {
    let f = TestFleet::start(Options::default()).await;
    f.tenant("cli", 0).await;
    fill(&f, "cli", 1000).await;

    // A move, followed to its end: phase lines (stdout is not a terminal), exit 0.
    let (code, out, err) = run_cli(&f, &["move", "cli", "--to", "pod1"]).await;
    assert_eq!(code, 0, "stdout:\n{out}\nstderr:\n{err}");
    // One line per phase seen (polled, so a short phase may pass unseen): at least the
    // first few, each naming the job.
    let phases: Vec<&str> = out
        .lines()
        .filter(|l| l.starts_with('[') && l.contains("job 1 move cli → pod1: "))
        .collect();
    assert!(phases.len() >= 2, "too few phase lines in:\n{out}");
    assert!(
        ["queued", "preflight", "schema", "replicate", "copy"]
            .iter()
            .any(|p| phases[0].ends_with(p) || phases[0].contains(&format!("{p} ("))),
        "{out}"
    );
    assert!(out.contains("succeeded"), "{out}");
    assert!(out.contains("clients paused"), "{out}");
    assert_eq!(tenant_pod(&f, "cli").await, "pod1");
    answers(&f, "cli", 1000).await;

    // Refusals exit 2 with the API's message.
    let (code, _, err) = run_cli(&f, &["move", "cli", "--to", "pod1"]).await;
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("already_there"), "{err}");
    let (code, _, err) = run_cli(&f, &["move", "nobody", "--to", "pod0"]).await;
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("unknown_tenant"), "{err}");

    // jobs --json: the list and one job parse, and say what happened.
    let (code, out, err) = run_cli(&f, &["jobs", "--json"]).await;
    assert_eq!(code, 0, "{err}");
    let list: Value = serde_json::from_str(&out).expect("jobs --json is JSON");
    let mv = &list["jobs"][0];
    assert_eq!(mv["kind"], "move", "{list}");
    assert_eq!(mv["tenant"], "cli");
    assert_eq!(mv["state"], "succeeded");
    let id = mv["id"].as_i64().unwrap().to_string();
    let (code, out, _) = run_cli(&f, &["jobs", &id, "--json"]).await;
    assert_eq!(code, 0);
    let one: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(one["id"], mv["id"]);
    assert!(one["result"]["pause_ms"].is_u64(), "{one}");
    let (code, out, _) = run_cli(&f, &["jobs"]).await;
    assert_eq!(code, 0);
    assert!(
        out.starts_with("ID") && out.contains("move") && out.contains("cli"),
        "{out}"
    );
    // A finished job cannot be cancelled.
    let (code, _, err) = run_cli(&f, &["jobs", "cancel", &id]).await;
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("job_finished"), "{err}");

    // tenants pause|resume.
    let (code, out, _) = run_cli(&f, &["tenants", "pause", "cli", "--json"]).await;
    assert_eq!(code, 0);
    assert_eq!(
        serde_json::from_str::<Value>(&out).unwrap()["state"],
        "paused"
    );
    let (code, out, _) = run_cli(&f, &["tenants", "resume", "cli", "--json"]).await;
    assert_eq!(code, 0);
    assert_eq!(
        serde_json::from_str::<Value>(&out).unwrap()["state"],
        "active"
    );
    answers(&f, "cli", 1000).await;
    let actions = audit_actions(&f).await;
    for want in ["tenant.pause", "tenant.resume", "job.move"] {
        assert!(
            actions.iter().any(|(a, t, _)| a == want && t == "cli"),
            "{want} not audited: {actions:?}"
        );
    }

    // pods add|show|drain|delete.
    let extra = cluster(f.dir.path(), "extra").await;
    let (code, out, err) = run_cli(
        &f,
        &[
            "pods",
            "add",
            "pod7",
            "--primary",
            &extra.url(),
            "--weight",
            "3",
            "--json",
        ],
    )
    .await;
    assert_eq!(code, 0, "{err}");
    let added: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        (added["name"].as_str(), added["weight"].as_f64()),
        (Some("pod7"), Some(3.0))
    );
    let (code, out, _) = run_cli(&f, &["pods", "show", "pod7"]).await;
    assert_eq!(code, 0);
    assert!(out.contains("pod7") && out.contains("api"), "{out}");
    let (code, out, err) = run_cli(&f, &["pods", "drain", "pod1", "--json"]).await;
    assert_eq!(code, 0, "stdout:\n{out}\nstderr:\n{err}");
    let drained: Value = serde_json::from_str(&out).expect("pods drain --json is JSON");
    assert_eq!(
        (drained["kind"].as_str(), drained["state"].as_str()),
        (Some("drain"), Some("succeeded")),
        "{drained}"
    );
    assert_ne!(tenant_pod(&f, "cli").await, "pod1");
    answers(&f, "cli", 1000).await;
    let (code, _, err) = run_cli(&f, &["pods", "delete", "pod1"]).await;
    assert_eq!(code, 1);
    assert!(err.contains("pod_in_config"), "{err}");
    let on_pod7 = tenant_pod(&f, "cli").await == "pod7";
    if !on_pod7 {
        let (code, out, err) = run_cli(&f, &["pods", "delete", "pod7"]).await;
        assert_eq!(code, 0, "{err}");
        assert!(out.contains("pod7"), "{out}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctrl_c_cancels_the_move_the_cli_follows() {
    let f = TestFleet::start(Options::default()).await;
    f.tenant("held", 0).await;
    fill(&f, "held", 1000).await;
    // A lock on the source's table holds the move before its copy (the schema dump waits
    // for it), so Ctrl-C finds it running whatever the machine's speed.
    let direct = pod_admin(&f.pods[0], "held").await;
    direct
        .batch_execute("begin; lock table items in access exclusive mode")
        .await
        .unwrap();
    let mut child = cli(&f, &["move", "held", "--to", "pod1"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let id = wait_for("the move job", Duration::from_secs(30), || async {
        let (_, l) = f.admin("GET", "/v1/jobs", None).await;
        l["jobs"][0]["id"].as_i64()
    })
    .await;
    wait_for(
        "the move to wait on the lock",
        Duration::from_secs(30),
        || async {
            let j = job(&f, id).await;
            assert_eq!(j["state"], "running", "{j}");
            matches!(j["phase"].as_str(), Some("preflight" | "schema")).then_some(())
        },
    )
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(job(&f, id).await["state"], "running");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id().unwrap() as i32),
        nix::sys::signal::Signal::SIGINT,
    )
    .unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    direct.batch_execute("rollback").await.unwrap();
    let status = tokio::time::timeout(Duration::from_secs(90), child.wait())
        .await
        .expect("the CLI waited past the cancel")
        .unwrap();
    let mut out = String::new();
    use tokio::io::AsyncReadExt;
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .await
        .unwrap();
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .await
        .unwrap();
    assert_eq!(status.code(), Some(2), "stdout:\n{out}\nstderr:\n{err}");
    assert!(out.contains("cancelling job"), "{out}");
    assert!(err.contains("cancelled"), "{err}");
    let j = job(&f, id).await;
    assert_eq!(
        j["state"], "cancelled",
        "the CLI returned before the job ended: {j}"
    );
    assert_eq!(tenant_pod(&f, "held").await, "pod0");
    answers(&f, "held", 1000).await;
    let actions = audit_actions(&f).await;
    assert!(
        actions
            .iter()
            .any(|(a, t, who)| a == "job.cancel" && *t == id.to_string() && who == "admin-api"),
        "the cancel is not audited: {actions:?}"
    );
}
