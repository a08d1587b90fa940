//! Test harness: real Postgres clusters (initdb once per run into a template under
//! `target/tmp`, copied per cluster; run as the `postgres` OS user when root) on free ports in
//! temporary directories, and the real router on 127.0.0.1:0. Everything stops on drop, also
//! when a test fails.

#![allow(dead_code)]

use podrouter::config::{Config, PoolMode};
use podrouter::fleet::NewTenant;
use podrouter::localpg::{self, LocalCluster, PgBinaries};
use podrouter::service::{self, Listeners, Running};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tokio_postgres::NoTls;

pub const ROLE: &str = "app";
pub const PASSWORD: &str = "app-secret";

pub fn bins() -> PgBinaries {
    PgBinaries::find().expect("PostgreSQL server binaries (install postgresql)")
}

/// The initdb template shared by all tests of this run.
pub fn template() -> PathBuf {
    let root = Path::new(env!("CARGO_TARGET_TMPDIR"));
    localpg::template(&bins(), root).expect("initdb template")
}

pub fn tempdir() -> tempfile::TempDir {
    let d = tempfile::Builder::new()
        .prefix("podrouter-test")
        .tempdir()
        .expect("tempdir");
    localpg::make_traversable(d.path()).expect("tempdir reachable by postgres");
    d
}

/// A started cluster in `dir/name`.
pub async fn cluster(dir: &Path, name: &str) -> LocalCluster {
    cluster_with(dir, name, &[]).await
}

/// A started cluster in `dir/name` with extra `postgres -c` settings.
pub async fn cluster_with(dir: &Path, name: &str, settings: &[(&str, String)]) -> LocalCluster {
    let b = bins();
    let datadir = dir.join(name);
    LocalCluster::create(&b, &template(), &datadir).expect("create cluster");
    LocalCluster::start(&b, &datadir, localpg::free_port(), settings)
        .await
        .expect("start cluster")
}

/// A streaming standby of `primary` cloned with pg_basebackup into `dir/name` (its
/// application_name is `name`), started on `port` (a free one when None).
pub async fn standby(
    dir: &Path,
    primary: &LocalCluster,
    name: &str,
    port: Option<u16>,
    settings: &[(&str, String)],
) -> LocalCluster {
    let b = bins();
    let datadir = dir.join(name);
    localpg::clone_standby(&b, primary.port(), &datadir, name).expect("pg_basebackup");
    LocalCluster::start(
        &b,
        &datadir,
        port.unwrap_or_else(localpg::free_port),
        settings,
    )
    .await
    .expect("start standby")
}

/// Makes the standby with application_name `name` the synchronous standby of `primary`.
pub async fn make_synchronous(primary: &LocalCluster, name: &str) {
    let c = pod_admin(primary, "postgres").await;
    // Two queries: ALTER SYSTEM cannot run in the implicit transaction of a multi-statement one.
    c.batch_execute(&format!(
        "ALTER SYSTEM SET synchronous_standby_names = 'FIRST 1 ({name})'"
    ))
    .await
    .unwrap();
    c.batch_execute("SELECT pg_reload_conf()").await.unwrap();
}

/// Polls `check` every 100 ms until it returns Some, for up to `within`; panics naming `what`.
pub async fn wait_for<T, F, Fut>(what: &str, within: std::time::Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = std::time::Instant::now() + within;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "timed out after {within:?} waiting for {what}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

pub struct Options {
    pub pods: usize,
    pub mode: PoolMode,
    pub pool_size: u32,
    pub checkout_timeout: &'static str,
    /// More lines for the `[pool]` section, e.g. "max_pod_connections = 2\n".
    pub pool_extra: &'static str,
    /// Appended to the config file after the pods, e.g. a `[tls]` section.
    pub config_extra: String,
    /// `postgres -c` settings for every pod, e.g. `("ssl", "on".into())`.
    pub pod_settings: Vec<(&'static str, String)>,
    /// Streaming replicas (with `pod_settings` too) of every pod but pod0, which holds the
    /// catalog, so a test may kill the others; listed in the config as `replicas`.
    pub replicas: usize,
    /// With replicas: the first one of each pod is its synchronous standby.
    pub synchronous: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            pods: 2,
            mode: PoolMode::Transaction,
            pool_size: 5,
            checkout_timeout: "5s",
            pool_extra: "",
            config_extra: String::new(),
            pod_settings: Vec::new(),
            replicas: 0,
            synchronous: false,
        }
    }
}

impl Options {
    /// One pod, with `mode` and `pool_size`; the rest as by default.
    pub fn one_pod(mode: PoolMode, pool_size: u32) -> Options {
        Options {
            pods: 1,
            mode,
            pool_size,
            ..Default::default()
        }
    }
}

pub struct TestFleet {
    pub pods: Vec<LocalCluster>,
    /// Each pod's replicas (`Options::replicas`), by pod index.
    pub replicas: Vec<Vec<LocalCluster>>,
    pub running: Option<Running>,
    pub config_path: PathBuf,
    pub token: String,
    pub dir: tempfile::TempDir,
}

impl TestFleet {
    pub async fn start(opts: Options) -> TestFleet {
        // RUST_LOG=podrouter=trace shows the router's own logs in a failing test's output.
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .try_init();
        let dir = tempdir();
        let mut pods = Vec::new();
        let mut replicas = Vec::new();
        for i in 0..opts.pods {
            let pod = cluster_with(dir.path(), &format!("pod{i}"), &opts.pod_settings).await;
            let mut mine = Vec::new();
            for j in 0..if i == 0 { 0 } else { opts.replicas } {
                let name = format!("pod{i}_replica{j}");
                mine.push(standby(dir.path(), &pod, &name, None, &opts.pod_settings).await);
                if j == 0 && opts.synchronous {
                    make_synchronous(&pod, &name).await;
                }
            }
            pods.push(pod);
            replicas.push(mine);
        }
        // The catalog lives in its own database on the first pod's cluster.
        let c = tokio_postgres::connect(&format!("{}/postgres", pods[0].url()), NoTls)
            .await
            .unwrap();
        tokio::spawn(c.1);
        c.0.batch_execute("CREATE DATABASE podrouter_catalog")
            .await
            .unwrap();
        let token = "test-token-0123456789abcdef".to_owned();
        std::fs::write(dir.path().join("admin.token"), &token).unwrap();
        let mut toml = format!(
            "[router]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\ncatalog_url = \"{}/podrouter_catalog\"\n\
             admin_token_file = \"admin.token\"\nshutdown_grace = \"2s\"\n\n[pool]\nmode = \"{}\"\nsize = {}\ncheckout_timeout = \"{}\"\n",
            pods[0].url(),
            opts.mode,
            opts.pool_size,
            opts.checkout_timeout,
        );
        toml.push_str(opts.pool_extra);
        for (i, p) in pods.iter().enumerate() {
            toml.push_str(&format!(
                "\n[[pod]]\nname = \"pod{i}\"\nprimary = \"{}\"\n",
                p.url()
            ));
            if !replicas[i].is_empty() {
                let urls: Vec<String> = replicas[i].iter().map(|r| r.url()).collect();
                toml.push_str(&format!("replicas = {urls:?}\n"));
            }
        }
        toml.push_str(&opts.config_extra);
        let config_path = dir.path().join("pods.toml");
        std::fs::write(&config_path, toml).unwrap();
        let config = Config::load(&config_path).expect("valid test config");
        let listeners = Listeners::bind(&config).await.unwrap();
        let running = service::start(config, Some(config_path.clone()), listeners)
            .await
            .expect("router starts");
        running
            .fleet
            .put_role(ROLE, PASSWORD, "test")
            .await
            .unwrap();
        TestFleet {
            pods,
            replicas,
            running: Some(running),
            config_path,
            token,
            dir,
        }
    }

    /// [`TestFleet::start`], with tenant `acme` on pod 0: what most tests begin with.
    pub async fn acme(opts: Options) -> TestFleet {
        let f = TestFleet::start(opts).await;
        f.tenant("acme", 0).await;
        f
    }

    pub fn running(&self) -> &Running {
        self.running.as_ref().expect("router running")
    }

    pub fn fleet(&self) -> Arc<podrouter::fleet::Fleet> {
        self.running().fleet.clone()
    }

    pub async fn tenant(&self, name: &str, pod: usize) {
        self.fleet()
            .create_tenant(
                NewTenant {
                    name: name.into(),
                    pod: Some(format!("pod{pod}")),
                    roles: vec![ROLE.into()],
                },
                "test",
            )
            .await
            .expect("create tenant");
    }

    pub fn url(&self, user: &str, password: &str, db: &str) -> String {
        format!(
            "postgres://{user}:{password}@{}/{db}",
            self.running().pg_addr
        )
    }

    pub fn app_url(&self, db: &str) -> String {
        self.url(ROLE, PASSWORD, db)
    }

    pub async fn connect(&self, db: &str) -> tokio_postgres::Client {
        connect(&self.app_url(db))
            .await
            .expect("connect through the router")
    }

    /// The router's config text with fixed ports for the wire and admin listeners (instead of
    /// `:0`), for running the real binary on the same catalog and pods.
    pub fn config_with_ports(&self, listen: u16, admin_listen: u16) -> String {
        std::fs::read_to_string(&self.config_path)
            .unwrap()
            .replacen(
                "listen = \"127.0.0.1:0\"",
                &format!("listen = \"127.0.0.1:{listen}\""),
                1,
            )
            .replacen(
                "admin_listen = \"127.0.0.1:0\"",
                &format!("admin_listen = \"127.0.0.1:{admin_listen}\""),
                1,
            )
    }

    /// Rewrites the router's config file with `edit` applied to its text (asserting that
    /// the edit changed something, so a test never reloads the same file by mistake).
    pub fn edit_config(&self, edit: impl FnOnce(&str) -> String) {
        let text = std::fs::read_to_string(&self.config_path).unwrap();
        let new = edit(&text);
        assert_ne!(new, text, "the edit left the config as it was");
        std::fs::write(&self.config_path, new).unwrap();
    }

    /// Calls the admin API in-process (`admin::app` with `oneshot`) with the fleet's token;
    /// returns the status and the JSON body.
    pub async fn admin(
        &self,
        method: &str,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> (axum::http::StatusCode, serde_json::Value) {
        use http_body_util::BodyExt;
        use tower::ServiceExt;
        let req = axum::http::Request::builder()
            .method(method)
            .uri(path)
            .header("authorization", format!("Bearer {}", self.token));
        let req = match body {
            Some(b) => req
                .header("content-type", "application/json")
                .body(axum::body::Body::from(b.to_string())),
            None => req.body(axum::body::Body::empty()),
        }
        .unwrap();
        let resp = podrouter::admin::app(self.fleet())
            .oneshot(req)
            .await
            .unwrap();
        let status = resp.status();
        let bytes = resp.into_body().collect().await.unwrap().to_bytes();
        let v = serde_json::from_slice(&bytes)
            .unwrap_or_else(|_| serde_json::Value::String(String::from_utf8_lossy(&bytes).into()));
        (status, v)
    }

    pub async fn stop(&mut self) {
        if let Some(r) = self.running.take() {
            r.shutdown().await;
        }
    }
}

/// Connects with tokio-postgres and drives the connection in the background.
pub async fn connect(url: &str) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let (client, conn) = tokio_postgres::connect(url, NoTls).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(client)
}

/// SQLSTATE of a failed connect or query.
pub fn code(e: &tokio_postgres::Error) -> String {
    e.as_db_error()
        .map(|d| d.code().code().to_owned())
        .unwrap_or_else(|| format!("no SQLSTATE: {e}"))
}

pub fn message(e: &tokio_postgres::Error) -> String {
    e.as_db_error()
        .map(|d| d.message().to_owned())
        .unwrap_or_else(|| e.to_string())
}

/// Superuser connection to a pod directly.
pub async fn pod_admin(pod: &LocalCluster, db: &str) -> tokio_postgres::Client {
    connect(&pod.url_db(db)).await.expect("connect to pod")
}

/// Path of a Postgres client tool (psql, pgbench) from the same install as the server.
pub fn tool(name: &str) -> PathBuf {
    let p = bins().tool(name);
    assert!(
        p.exists(),
        "{} not found: install the PostgreSQL client tools",
        p.display()
    );
    p
}

/// `GET /v1/jobs/{id}`, which must answer 200.
pub async fn job(f: &TestFleet, id: i64) -> serde_json::Value {
    let (status, j) = f.admin("GET", &format!("/v1/jobs/{id}"), None).await;
    assert_eq!(status.as_u16(), 200, "{j}");
    j
}

/// The job once it has ended (succeeded, failed or cancelled), within `within`.
pub async fn wait_job(f: &TestFleet, id: i64, within: std::time::Duration) -> serde_json::Value {
    wait_for(&format!("job {id} to end"), within, || async {
        let j = job(f, id).await;
        matches!(
            j["state"].as_str(),
            Some("succeeded" | "failed" | "cancelled")
        )
        .then_some(j)
    })
    .await
}
