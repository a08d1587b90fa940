//! `podrouter demo`: the embedded default. Creates (or reuses) local Postgres clusters — a
//! catalog and N pods — under one directory, writes the config it runs with, starts the
//! router in this process, creates the `demo` role and sample tenants, and writes
//! `DIR/ready.json` once clients can connect. SIGINT/SIGTERM stop everything it started;
//! SIGHUP re-reads `DIR/pods.toml` like `podrouter serve` does.

use crate::config::{ConfigSource, PoolMode};
use crate::fleet::NewTenant;
use crate::localpg::{self, LocalCluster, PgBinaries};
use crate::service::{self, Listeners};
use serde::{Deserialize, Serialize};
use sqlx::Connection;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

pub const DEMO_ROLE: &str = "demo";
pub const DEMO_PASSWORD: &str = "demo";

pub struct DemoOptions {
    pub dir: PathBuf,
    pub pods: usize,
    pub tenants: usize,
    pub listen: SocketAddr,
    pub admin_listen: SocketAddr,
    pub http_listen: SocketAddr,
    pub pool_mode: PoolMode,
    pub pool_size: u32,
    pub replicas: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error("{0}")]
    Usage(String),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    LocalPg(#[from] localpg::LocalPgError),
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error(transparent)]
    Start(#[from] service::StartError),
    #[error("{0}")]
    Fleet(#[from] crate::fleet::FleetError),
    #[error("loading sample data: {0}")]
    Sample(#[from] sqlx::Error),
    #[error("cannot install the SIGHUP handler: {0}")]
    Signal(std::io::Error),
}

/// Ports chosen on the first run, reused by later runs while they are free.
#[derive(Debug, Default, Serialize, Deserialize)]
struct DemoState {
    ports: BTreeMap<String, u16>,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> DemoError + '_ {
    move |source| DemoError::Io {
        path: path.to_owned(),
        source,
    }
}

fn port_is_free(port: u16) -> bool {
    std::net::TcpListener::bind(("127.0.0.1", port)).is_ok()
}

pub async fn run(opts: DemoOptions) -> Result<(), DemoError> {
    if opts.pods == 0 || opts.pods > 16 {
        return Err(DemoError::Usage("--pods must be between 1 and 16".into()));
    }
    if opts.tenants > 1000 {
        return Err(DemoError::Usage("--tenants must be at most 1000".into()));
    }
    if opts.replicas > 0 {
        return Err(DemoError::Usage(
            "--replicas is not available in this build yet (replica routing and failover are planned); run without it".into(),
        ));
    }
    let dir = std::path::absolute(&opts.dir).map_err(io(&opts.dir))?;
    std::fs::create_dir_all(&dir).map_err(io(&dir))?;
    localpg::make_traversable(&dir)?;
    let bins = PgBinaries::find()?;
    let template = localpg::template(&bins, &dir)?;

    let state_path = dir.join("state.json");
    let mut state: DemoState = std::fs::read_to_string(&state_path)
        .ok()
        .and_then(|s| serde_json::from_str(&s).ok())
        .unwrap_or_default();
    let mut names = vec!["catalog".to_owned()];
    names.extend((1..=opts.pods).map(|i| format!("pod{i}")));
    for name in &names {
        let reuse = state.ports.get(name).copied().filter(|p| port_is_free(*p));
        let port = reuse.unwrap_or_else(localpg::free_port);
        state.ports.insert(name.clone(), port);
    }
    std::fs::write(
        &state_path,
        serde_json::to_vec_pretty(&state).expect("state serialises"),
    )
    .map_err(io(&state_path))?;

    eprintln!(
        "podrouter demo: starting {} pods and a catalog under {}",
        opts.pods,
        dir.display()
    );
    let mut clusters: Vec<(String, LocalCluster)> = Vec::new();
    let mut starts = tokio::task::JoinSet::new();
    for name in &names {
        let datadir = dir.join(name);
        LocalCluster::create(&bins, &template, &datadir)?;
        let bins = PgBinaries {
            bindir: bins.bindir.clone(),
        };
        let port = state.ports[name];
        let name = name.clone();
        starts.spawn(async move { (name, LocalCluster::start(&bins, &datadir, port, &[]).await) });
    }
    let mut failure = None;
    while let Some(joined) = starts.join_next().await {
        let (name, started) = joined.expect("cluster start task");
        match started {
            Ok(c) => clusters.push((name, c)),
            Err(e) => failure = Some(e),
        }
    }
    if let Some(e) = failure {
        stop_all(&mut clusters).await;
        return Err(e.into());
    }
    clusters.sort_by(|a, b| a.0.cmp(&b.0));
    let result = serve_demo(&opts, &dir, &clusters).await;
    stop_all(&mut clusters).await;
    result
}

async fn stop_all(clusters: &mut [(String, LocalCluster)]) {
    for (_, c) in clusters.iter_mut() {
        c.stop().await;
    }
}

async fn serve_demo(
    opts: &DemoOptions,
    dir: &Path,
    clusters: &[(String, LocalCluster)],
) -> Result<(), DemoError> {
    let catalog = &clusters
        .iter()
        .find(|(n, _)| n == "catalog")
        .expect("catalog cluster")
        .1;
    let pods: Vec<&(String, LocalCluster)> =
        clusters.iter().filter(|(n, _)| n != "catalog").collect();

    // The catalog database.
    let mut c = sqlx::PgConnection::connect(&catalog.url_db("postgres")).await?;
    if sqlx::query("SELECT 1 FROM pg_database WHERE datname = 'podrouter'")
        .fetch_optional(&mut c)
        .await?
        .is_none()
    {
        sqlx::query("CREATE DATABASE podrouter")
            .execute(&mut c)
            .await?;
    }
    c.close().await?;

    let token_path = dir.join("admin.token");
    if !token_path.exists() {
        let token: String = (0..32)
            .map(|_| format!("{:02x}", rand::random::<u8>()))
            .collect();
        std::fs::write(&token_path, token + "\n").map_err(io(&token_path))?;
    }
    let mut toml = format!(
        "# Written by `podrouter demo`; `podrouter serve --config {}` runs the same router.\n\
         [router]\nlisten = \"{}\"\nadmin_listen = \"{}\"\nhttp_listen = \"{}\"\n\
         catalog_url = \"{}\"\nadmin_token_file = \"admin.token\"\n\n\
         [pool]\nmode = \"{}\"\nsize = {}\n",
        dir.join("pods.toml").display(),
        opts.listen,
        opts.admin_listen,
        opts.http_listen,
        catalog.url_db("podrouter"),
        opts.pool_mode,
        opts.pool_size,
    );
    for (name, c) in &pods {
        toml.push_str(&format!(
            "\n[[pod]]\nname = \"{name}\"\nprimary = \"{}\"\nweight = 1.0\n",
            c.url()
        ));
    }
    let config_path = dir.join("pods.toml");
    std::fs::write(&config_path, &toml).map_err(io(&config_path))?;
    let source = ConfigSource::load(&config_path)?;

    // Registered before start, so an early SIGHUP waits instead of killing the demo.
    let hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        .map_err(DemoError::Signal)?;
    let listeners = Listeners::bind(&source.config).await?;
    let running = service::start_with_source(source, Some(config_path.clone()), listeners).await?;
    running.reload_on_sighup(hup);
    let fleet = running.fleet.clone();

    let existing = fleet.tenants().await?;
    if fleet
        .catalog
        .role(DEMO_ROLE)
        .await
        .map_err(crate::fleet::FleetError::from)?
        .is_none()
    {
        fleet.put_role(DEMO_ROLE, DEMO_PASSWORD, "demo").await?;
    }
    let mut tenants = Vec::new();
    for i in 1..=opts.tenants {
        let name = format!("tenant{i}");
        if !existing.iter().any(|t| t.name == name) {
            let t = fleet
                .create_tenant(
                    NewTenant {
                        name: name.clone(),
                        pod: None,
                        roles: vec![DEMO_ROLE.into()],
                    },
                    "demo",
                )
                .await?;
            let pod = pods
                .iter()
                .find(|(n, _)| *n == t.pod)
                .expect("placed on a demo pod");
            load_sample_data(&pod.1.url_db(&name)).await?;
        }
        tenants.push(name);
    }

    let ready = serde_json::json!({
        "router_url": format!("postgres://{DEMO_ROLE}:{DEMO_PASSWORD}@{}", running.pg_addr),
        "admin_url": format!("http://{}", running.admin_addr),
        "http_url": running.http_addr.map(|a| format!("http://{a}")),
        "admin_token": fleet.admin_token.clone().unwrap_or_default(),
        "pods": pods.iter().map(|(n, c)| serde_json::json!({"name": n, "url": c.url(), "replicas": []})).collect::<Vec<_>>(),
        "tenants": tenants,
        "config": config_path,
    });
    let ready_path = dir.join("ready.json");
    let tmp = dir.join("ready.json.tmp");
    std::fs::write(
        &tmp,
        serde_json::to_vec_pretty(&ready).expect("ready.json serialises"),
    )
    .map_err(io(&tmp))?;
    std::fs::rename(&tmp, &ready_path).map_err(io(&ready_path))?;
    println!(
        "podrouter demo is ready:\n  psql postgres://{DEMO_ROLE}:{DEMO_PASSWORD}@{}/tenant1\n  admin API {}  (token in {})\n  podrouter --demo-dir {} tenants\nEdit {} and send SIGHUP (or `podrouter --demo-dir {} config reload`) to reload it.\nCtrl-C stops everything.",
        running.pg_addr,
        ready["admin_url"].as_str().unwrap_or_default(),
        token_path.display(),
        dir.display(),
        config_path.display(),
        dir.display()
    );

    wait_for_signal().await;
    let _ = std::fs::remove_file(&ready_path);
    running.shutdown().await;
    Ok(())
}

/// Sample tables owned by the demo role, so clients can write and pgbench can init.
async fn load_sample_data(url: &str) -> Result<(), sqlx::Error> {
    let mut c = sqlx::PgConnection::connect(url).await?;
    sqlx::raw_sql(
        "SET ROLE demo;
         CREATE TABLE accounts (id serial PRIMARY KEY, name text NOT NULL,
                                balance numeric(12,2) NOT NULL DEFAULT 0, created_at timestamptz NOT NULL DEFAULT now());
         INSERT INTO accounts (name, balance) SELECT 'customer ' || g, (g * 37 % 1000) FROM generate_series(1, 100) g;
         CREATE TABLE events (id bigserial PRIMARY KEY, account_id int NOT NULL REFERENCES accounts,
                              kind text NOT NULL, at timestamptz NOT NULL DEFAULT now());
         INSERT INTO events (account_id, kind)
              SELECT 1 + g % 100, (ARRAY['login', 'purchase', 'refund'])[1 + g % 3] FROM generate_series(1, 1000) g;",
    )
    .execute(&mut c)
    .await?;
    c.close().await
}

async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    eprintln!("podrouter demo: stopping");
}
