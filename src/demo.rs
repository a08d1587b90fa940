//! `podrouter demo`: the embedded default. Creates (or reuses) local Postgres clusters — a
//! catalog and N pods, each with K streaming replicas (`--replicas K`, cloned with
//! `pg_basebackup -R`, the first synchronous) — under one directory, writes the config it
//! runs with, starts the router in this process, creates the `demo` role and sample tenants,
//! and writes
//! `DIR/ready.json` once clients can connect. SIGINT/SIGTERM stop everything it started;
//! SIGHUP re-reads `DIR/pods.toml` like `podrouter serve` does. With `--load` it also runs
//! a skewed synthetic load ([`load`]) and shortens the sampler's and the autopilot's
//! windows, so a split recommendation shows within a minute.

pub mod load;

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
    /// Run a skewed synthetic load until stopped (`--load`).
    pub load: bool,
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
    #[error("configuring synchronous replication on the pods: {0}")]
    Replication(sqlx::Error),
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
    if opts.replicas > 4 {
        return Err(DemoError::Usage("--replicas must be at most 4".into()));
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
    let replicas: Vec<(String, String)> = (1..=opts.pods)
        .flat_map(|i| (1..=opts.replicas).map(move |j| (format!("pod{i}"), replica_name(i, j))))
        .collect();
    for name in names.iter().chain(replicas.iter().map(|(_, r)| r)) {
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
        "podrouter demo: starting {} pods ({} replicas each) and a catalog under {}",
        opts.pods,
        opts.replicas,
        dir.display()
    );
    // With replicas, commits wait for the synchronous one (localpg's default is off).
    let settings = if opts.replicas > 0 {
        vec![("synchronous_commit", "on".to_owned())]
    } else {
        Vec::new()
    };
    for name in &names {
        LocalCluster::create(&bins, &template, &dir.join(name))?;
    }
    let mut clusters = start_clusters(&bins, &dir, &state, &names, &settings).await?;
    if !replicas.is_empty() {
        let standbys = async {
            for (pod, replica) in &replicas {
                let (bins, datadir) = (bins.clone(), dir.join(replica));
                let (port, app) = (state.ports[pod], replica.replace('-', "_"));
                tokio::task::spawn_blocking(move || {
                    localpg::clone_standby(&bins, port, &datadir, &app)
                })
                .await
                .expect("pg_basebackup task")?;
            }
            let names: Vec<String> = replicas.iter().map(|(_, r)| r.clone()).collect();
            start_clusters(&bins, &dir, &state, &names, &settings).await
        };
        match standbys.await {
            Ok(started) => clusters.extend(started),
            Err(e) => {
                stop_all(&mut clusters).await;
                return Err(e.into());
            }
        }
        clusters.sort_by(|a, b| a.0.cmp(&b.0));
        if let Err(e) = make_first_replicas_synchronous(&clusters).await {
            stop_all(&mut clusters).await;
            return Err(DemoError::Replication(e));
        }
    }
    clusters.sort_by(|a, b| a.0.cmp(&b.0));
    let result = serve_demo(&opts, &dir, &clusters).await;
    stop_all(&mut clusters).await;
    result
}

/// `pod1-replica2`: the data directory (and port) name of a pod's replica; its
/// `application_name` is the same with `_` (a plain identifier in synchronous_standby_names).
fn replica_name(pod: usize, replica: usize) -> String {
    format!("pod{pod}-replica{replica}")
}

fn is_replica(name: &str) -> bool {
    name.contains("-replica")
}

/// Starts the clusters `names` (data directories under `dir`, ports from `state`) at once;
/// if one fails, stops the others and returns its error.
async fn start_clusters(
    bins: &PgBinaries,
    dir: &Path,
    state: &DemoState,
    names: &[String],
    settings: &[(&'static str, String)],
) -> Result<Vec<(String, LocalCluster)>, localpg::LocalPgError> {
    let mut clusters: Vec<(String, LocalCluster)> = Vec::new();
    let mut starts = tokio::task::JoinSet::new();
    for name in names {
        let (bins, datadir, port) = (bins.clone(), dir.join(name), state.ports[name]);
        let (name, settings) = (name.clone(), settings.to_vec());
        starts.spawn(async move {
            let started = LocalCluster::start(&bins, &datadir, port, &settings).await;
            (name, started)
        });
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
        return Err(e);
    }
    clusters.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(clusters)
}

/// `synchronous_standby_names = 'FIRST 1 (podN_replica1)'` on each pod's primary, reloaded.
/// Skipped (with a note) where the first replica is not that primary's standby any more,
/// e.g. after a failover on an earlier run: naming it would make every commit wait forever.
async fn make_first_replicas_synchronous(
    clusters: &[(String, LocalCluster)],
) -> Result<(), sqlx::Error> {
    for (name, primary) in clusters
        .iter()
        .filter(|(n, _)| n.starts_with("pod") && !is_replica(n))
    {
        let first = format!("{name}-replica1");
        let Some((_, replica)) = clusters.iter().find(|(n, _)| *n == first) else {
            continue;
        };
        let mut p = sqlx::PgConnection::connect(&primary.url_db("postgres")).await?;
        let mut r = sqlx::PgConnection::connect(&replica.url_db("postgres")).await?;
        let recovery = "SELECT pg_is_in_recovery()";
        let primary_in_recovery: bool = sqlx::query_scalar(recovery).fetch_one(&mut p).await?;
        let replica_in_recovery: bool = sqlx::query_scalar(recovery).fetch_one(&mut r).await?;
        if primary_in_recovery || !replica_in_recovery {
            eprintln!(
                "podrouter demo: {first} is not a standby of {name} (failed over on an earlier run?); \
                 synchronous replication is left as it is: see \"Failover and failback\" in the README"
            );
        } else {
            let app = first.replace('-', "_");
            // Two queries: ALTER SYSTEM cannot run in a multi-statement query's transaction.
            sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
                "ALTER SYSTEM SET synchronous_standby_names = 'FIRST 1 ({app})'"
            )))
            .execute(&mut p)
            .await?;
            sqlx::query("SELECT pg_reload_conf()")
                .execute(&mut p)
                .await?;
        }
        p.close().await?;
        r.close().await?;
    }
    Ok(())
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
    let pods: Vec<&(String, LocalCluster)> = clusters
        .iter()
        .filter(|(n, _)| n != "catalog" && !is_replica(n))
        .collect();
    let replicas_of = |pod: &str| -> Vec<String> {
        let prefix = format!("{pod}-replica");
        clusters
            .iter()
            .filter(|(n, _)| n.starts_with(&prefix))
            .map(|(_, c)| c.url())
            .collect()
    };

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
         [pool]\nmode = \"{}\"\nsize = {}\n\n\
         # Lower than the defaults (200/s per address), so a few parallel curls show the 429.\n\
         [limits]\nhttp_requests_per_ip = 50\nhttp_request_burst = 100\n\n\
         # A split's new pod: a local cluster under provisioned/ (see the README).\n\
         [provider]\nkind = \"local\"\n",
        dir.join("pods.toml").display(),
        opts.listen,
        opts.admin_listen,
        opts.http_listen,
        catalog.url_db("podrouter"),
        opts.pool_mode,
        opts.pool_size,
    );
    if opts.load {
        toml.push_str(
            "\n# `--load`: a short load window and `for`, so the autopilot's split recommendation\n\
             # stands within a minute of the load starting (defaults: 5s, 60s, 5m, 5m).\n\
             [metrics]\nsample_every = \"2s\"\nsize_every = \"10s\"\nload_window = \"20s\"\n\n\
             [autopilot]\nmode = \"recommend\"\nsplit_when = { busy_ratio = 0.75, for = \"30s\" }\n",
        );
    }
    for (name, c) in &pods {
        toml.push_str(&format!(
            "\n[[pod]]\nname = \"{name}\"\nprimary = \"{}\"\nweight = 1.0\n",
            c.url()
        ));
        let replicas = replicas_of(name);
        if !replicas.is_empty() {
            toml.push_str(&format!("replicas = {replicas:?}\n"));
        }
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
            // The pod's primary as the catalog knows it (a failover may have changed it).
            let primary = fleet.table.load().pods[&t.pod].admin_url.clone();
            load_sample_data(&format!("{primary}/{name}")).await?;
        }
        tenants.push(name);
    }

    // Pod URLs as the catalog has them: after a failover the primary is a former replica.
    let table = fleet.table.load_full();
    let ready = serde_json::json!({
        "router_url": format!("postgres://{DEMO_ROLE}:{DEMO_PASSWORD}@{}", running.pg_addr),
        "admin_url": format!("http://{}", running.admin_addr),
        "http_url": running.http_addr.map(|a| format!("http://{a}")),
        "admin_token": fleet.admin_token.clone().unwrap_or_default(),
        "pods": pods.iter().map(|(n, _)| {
            let route = &table.pods[n];
            serde_json::json!({"name": n, "url": route.admin_url, "replicas": route.replicas})
        }).collect::<Vec<_>>(),
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
        "podrouter demo is ready:\n  psql postgres://{DEMO_ROLE}:{DEMO_PASSWORD}@{}/tenant1\n  curl -u {DEMO_ROLE}:{DEMO_PASSWORD} -H 'Podrouter-Tenant: tenant1' {}/v1/sql -d '{{\"query\": \"select count(*) from accounts\"}}'\n  admin API {}  (token in {})\n  podrouter --demo-dir {} tenants\nEdit {} and send SIGHUP (or `podrouter --demo-dir {} config reload`) to reload it.\nCtrl-C stops everything.",
        running.pg_addr,
        ready["http_url"].as_str().unwrap_or("(no http_listen)"),
        ready["admin_url"].as_str().unwrap_or_default(),
        token_path.display(),
        dir.display(),
        config_path.display(),
        dir.display()
    );

    let load = opts.load.then(|| {
        let cli = format!("podrouter --demo-dir {}", dir.display());
        let router_url = ready["router_url"].as_str().unwrap_or_default();
        let (load, hot) = load::start(&fleet, router_url, &cli);
        println!(
            "podrouter demo --load: a skewed load runs at {hot}'s tenants; within about a minute \
             the autopilot recommends a split: `{cli} recommendations`, then `{cli} split {hot}`"
        );
        load
    });

    wait_for_signal().await;
    if let Some(load) = load {
        load.stop().await;
    }
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
