//! The admin API through `admin::app(fleet)` with `tower::ServiceExt::oneshot`, over a real
//! catalog and real pods.

use crate::support::*;
use axum::body::Body;
use axum::http::{Request, StatusCode};
use http_body_util::BodyExt;
use serde_json::{json, Value};
use tower::ServiceExt;

async fn call(
    f: &TestFleet,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<Value>,
) -> (StatusCode, Value) {
    let mut req = Request::builder().method(method).uri(path);
    if let Some(t) = token {
        req = req.header("authorization", format!("Bearer {t}"));
    }
    let req = match body {
        Some(b) => req
            .header("content-type", "application/json")
            .body(Body::from(b.to_string())),
        None => req.body(Body::empty()),
    }
    .unwrap();
    let resp = podrouter::admin::app(f.fleet()).oneshot(req).await.unwrap();
    let status = resp.status();
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    let v = serde_json::from_slice(&bytes)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into()));
    (status, v)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_api_contract() {
    let f = TestFleet::start(Options::default()).await;
    let tok = Some(f.token.as_str());

    // Health needs no token; everything under /v1 does.
    assert_eq!(
        call(&f, "GET", "/healthz", None, None).await.0,
        StatusCode::OK
    );
    assert_eq!(
        call(&f, "GET", "/readyz", None, None).await.0,
        StatusCode::OK
    );
    let (s, v) = call(&f, "GET", "/v1/tenants", None, None).await;
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (StatusCode::UNAUTHORIZED, Some("missing_token"))
    );
    let (s, v) = call(&f, "GET", "/v1/tenants", Some("wrong-token"), None).await;
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (StatusCode::FORBIDDEN, Some("bad_token"))
    );

    // Pods with health and tenant counts.
    let (s, v) = call(&f, "GET", "/v1/pods", tok, None).await;
    assert_eq!(s, StatusCode::OK);
    let pods = v["pods"].as_array().unwrap();
    assert_eq!(pods.len(), 2);
    assert!(
        pods.iter()
            .all(|p| p["health"] == "up" && p["tenants"] == 0 && p["accepting"] == true),
        "{v}"
    );

    // Create: placed by the ring, visible with its pod and route version.
    let (s, v) = call(
        &f,
        "POST",
        "/v1/tenants",
        tok,
        Some(json!({"name": "acme", "roles": [ROLE]})),
    )
    .await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    let pod = v["pod"].as_str().unwrap().to_owned();
    assert_eq!(v["route_version"], 1);
    assert_eq!(v["state"], "active");
    let (s, v) = call(&f, "GET", "/v1/tenants/acme", tok, None).await;
    assert_eq!((s, v["pod"].as_str()), (StatusCode::OK, Some(pod.as_str())));
    // It is usable at once through the router.
    f.connect("acme")
        .await
        .simple_query("select 1")
        .await
        .unwrap();

    // Bad calls: clear codes, nothing half-done.
    let check = |want: StatusCode, code: &'static str| {
        move |(s, v): (StatusCode, Value)| {
            assert_eq!(s, want, "{v}");
            assert_eq!(v["error"]["code"], code, "{v}");
            assert!(!v["error"]["message"].as_str().unwrap().is_empty());
        }
    };
    check(StatusCode::CONFLICT, "tenant_exists")(
        call(
            &f,
            "POST",
            "/v1/tenants",
            tok,
            Some(json!({"name": "acme", "roles": [ROLE]})),
        )
        .await,
    );
    check(StatusCode::BAD_REQUEST, "invalid_tenant_name")(
        call(
            &f,
            "POST",
            "/v1/tenants",
            tok,
            Some(json!({"name": "Bad Name", "roles": [ROLE]})),
        )
        .await,
    );
    check(StatusCode::BAD_REQUEST, "unknown_role")(
        call(
            &f,
            "POST",
            "/v1/tenants",
            tok,
            Some(json!({"name": "x1", "roles": ["nobody"]})),
        )
        .await,
    );
    check(StatusCode::BAD_REQUEST, "no_roles")(
        call(
            &f,
            "POST",
            "/v1/tenants",
            tok,
            Some(json!({"name": "x2", "roles": []})),
        )
        .await,
    );
    check(StatusCode::NOT_FOUND, "unknown_pod")(
        call(
            &f,
            "POST",
            "/v1/tenants",
            tok,
            Some(json!({"name": "x3", "roles": [ROLE], "pod": "nopod"})),
        )
        .await,
    );
    check(StatusCode::BAD_REQUEST, "invalid_json")(
        call(&f, "POST", "/v1/tenants", tok, Some(json!({"nme": "x4"}))).await,
    );
    check(StatusCode::NOT_FOUND, "unknown_tenant")(
        call(&f, "GET", "/v1/tenants/nosuch", tok, None).await,
    );
    check(StatusCode::NOT_FOUND, "not_found")(call(&f, "GET", "/v1/nothing-here", tok, None).await);
    let (_, v) = call(&f, "GET", "/v1/tenants", tok, None).await;
    assert_eq!(
        v["tenants"].as_array().unwrap().len(),
        1,
        "failed creations left nothing behind: {v}"
    );

    // Delete keeps the database by default, and is audited.
    let (s, v) = call(&f, "DELETE", "/v1/tenants/acme", tok, None).await;
    assert_eq!(
        (s, &v["database_dropped"]),
        (StatusCode::OK, &json!(false)),
        "{v}"
    );
    let e = connect(&f.app_url("acme")).await.unwrap_err();
    assert_eq!(code(&e), "3D000", "a deleted tenant is no longer routed");
    let idx = if pod == "pod0" { 0 } else { 1 };
    let direct = pod_admin(&f.pods[idx], "postgres").await;
    let kept: i64 = direct
        .query_one(
            "select count(*) from pg_database where datname = 'acme'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(kept, 1, "the database stays on the pod");
    let (_, v) = call(&f, "GET", "/v1/audit", tok, None).await;
    let actions: Vec<&str> = v["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["action"].as_str().unwrap())
        .collect();
    assert!(
        actions.contains(&"tenant.create")
            && actions.contains(&"tenant.delete")
            && actions.contains(&"role.upsert"),
        "{actions:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_role_password_change_reaches_the_pods() {
    let f = TestFleet::acme(Options {
        pods: 1,
        ..Default::default()
    })
    .await;
    f.connect("acme")
        .await
        .simple_query("select 1")
        .await
        .unwrap();
    let (s, _) = call(
        &f,
        "POST",
        "/v1/roles",
        Some(&f.token),
        Some(json!({"name": ROLE, "password": "rotated-pw"})),
    )
    .await;
    assert_eq!(s, StatusCode::CREATED);
    assert_eq!(
        code(&connect(&f.app_url("acme")).await.unwrap_err()),
        "28P01",
        "the old password no longer works"
    );
    // The new password works through the router, including for new server connections,
    // which need the pod to hold the same new verifier (SCRAM pass-through).
    let c = connect(&f.url(ROLE, "rotated-pw", "acme")).await.unwrap();
    c.simple_query("select 1").await.unwrap();
    let direct = connect(&format!(
        "postgres://{ROLE}:rotated-pw@127.0.0.1:{}/acme",
        f.pods[0].port()
    ))
    .await;
    assert!(direct.is_ok(), "the pod has the rotated verifier");
}
