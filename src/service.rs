//! Running the router: connect the catalog, publish the first RoutingTable, then serve the
//! wire listener and the admin API until shutdown. `start` takes already-bound listeners, so
//! tests bind `127.0.0.1:0` and run the real thing.

use crate::catalog::Catalog;
use crate::config::{Config, ConfigSource};
use crate::fleet::{Fleet, FleetError};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(
        "cannot listen on {addr} ({what}): {source}; pick a free address or stop what holds it"
    )]
    Bind {
        what: &'static str,
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error(transparent)]
    Catalog(#[from] crate::catalog::CatalogError),
    #[error("{0}")]
    Fleet(#[from] FleetError),
}

pub struct Listeners {
    pub pg: TcpListener,
    pub admin: TcpListener,
    pub http: Option<TcpListener>,
}

impl Listeners {
    pub async fn bind(config: &Config) -> Result<Listeners, StartError> {
        async fn one(what: &'static str, addr: SocketAddr) -> Result<TcpListener, StartError> {
            TcpListener::bind(addr)
                .await
                .map_err(|source| StartError::Bind { what, addr, source })
        }
        let r = &config.router;
        Ok(Listeners {
            pg: one("listen", r.listen).await?,
            admin: one("admin_listen", r.admin_listen).await?,
            http: match r.http_listen {
                Some(a) => Some(one("http_listen", a).await?),
                None => None,
            },
        })
    }
}

pub struct Running {
    pub fleet: Arc<Fleet>,
    pub pg_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    pub http_addr: Option<SocketAddr>,
    shutdown: CancellationToken,
    tracker: TaskTracker,
    sessions: TaskTracker,
}

/// Starts everything; returns once the listeners accept and the routing table is loaded.
/// The file at `config_path` is read again for its text (recorded as a config version and
/// diffed against by reloads); when it no longer matches `config`, the config written out
/// stands in for it. Callers that loaded the file themselves use [`start_with_source`].
pub async fn start(
    config: Config,
    config_path: Option<PathBuf>,
    listeners: Listeners,
) -> Result<Running, StartError> {
    let from_file = config_path
        .as_deref()
        .and_then(|p| ConfigSource::load(p).ok())
        .filter(|s| s.config == config);
    if from_file.is_none() && config_path.is_some() {
        tracing::warn!("the config file changed since it was loaded; recording the config in memory instead (every field counts as set)");
    }
    let source = from_file.unwrap_or_else(|| ConfigSource::generated(config));
    start_with_source(source, config_path, listeners).await
}

/// [`start`] with the config file as it was read (text, hash and explicit fields).
pub async fn start_with_source(
    source: ConfigSource,
    config_path: Option<PathBuf>,
    listeners: Listeners,
) -> Result<Running, StartError> {
    let catalog =
        Catalog::connect(&source.config.router.catalog_url, Duration::from_secs(30)).await?;
    let fleet = Arc::new(Fleet::new(catalog, source, config_path));
    fleet.sync_pods_from_config().await?;
    fleet.reload_routes().await?;
    fleet.sweep_interrupted().await?;
    let shutdown = CancellationToken::new();
    let pg_addr = listeners.pg.local_addr().expect("bound");
    let admin_addr = listeners.admin.local_addr().expect("bound");
    // Membership first: recovery tells its own jobs (none yet) and other live routers' jobs
    // (theirs) from those of routers that are gone.
    crate::fleet::routers::register(
        &fleet,
        pg_addr.to_string(),
        admin_addr.to_string(),
        shutdown.clone(),
    )
    .await?;
    // Moves a previous process left running are finished or rolled back before any client
    // is served: a tenant fenced mid-move must be unfenced (or switched) first.
    crate::mover::recover(&fleet).await;
    if let Some(version) = fleet.record_start_config().await? {
        tracing::info!(version, "recorded the config as a new version");
    }

    let tracker = TaskTracker::new();
    let sessions = TaskTracker::new();
    let http_addr = listeners
        .http
        .as_ref()
        .map(|l| l.local_addr().expect("bound"));

    tracker.spawn(follow_catalog(fleet.clone(), shutdown.clone()));
    tracker.spawn(crate::health::monitor(fleet.clone(), shutdown.clone()));
    tracker.spawn(crate::metrics::sampler::run(
        fleet.clone(),
        shutdown.clone(),
    ));
    tracker.spawn(crate::planner::autopilot::run(
        fleet.clone(),
        shutdown.clone(),
    ));
    tracker.spawn(crate::mover::janitor(fleet.clone(), shutdown.clone()));
    tracker.spawn(crate::proxy::serve(
        fleet.proxy.clone(),
        listeners.pg,
        shutdown.clone(),
        sessions.clone(),
    ));
    let admin = crate::admin::app(fleet.clone());
    let stop = shutdown.clone();
    tracker.spawn(async move {
        let served = axum::serve(
            listeners.admin,
            admin.into_make_service_with_connect_info::<SocketAddr>(),
        )
        .with_graceful_shutdown(async move { stop.cancelled().await })
        .await;
        if let Err(e) = served {
            tracing::error!("admin API stopped: {e}");
        }
    });
    if let Some(http) = listeners.http {
        tracker.spawn(crate::http::serve(
            fleet.clone(),
            http,
            shutdown.clone(),
            sessions.clone(),
        ));
    }
    tracing::info!(%pg_addr, %admin_addr, "podrouter is serving");
    Ok(Running {
        fleet,
        pg_addr,
        admin_addr,
        http_addr,
        shutdown,
        tracker,
        sessions,
    })
}

impl Running {
    /// Stops accepting, lets sessions reach a clean point (closing idle ones with 57P01) for
    /// up to `router.shutdown_grace`, then returns.
    pub async fn shutdown(self) {
        // Running moves abort first (resuming their held clients on the source), within
        // their pause deadline; the next start finishes anything left.
        self.fleet.jobs.shutdown(Duration::from_secs(15)).await;
        self.shutdown.cancel();
        self.tracker.close();
        self.sessions.close();
        let grace = self.fleet.config.load().router.shutdown_grace.0;
        if tokio::time::timeout(grace, self.sessions.wait())
            .await
            .is_err()
        {
            tracing::warn!("sessions still busy after {grace:?}; closing them");
        }
        let _ = tokio::time::timeout(Duration::from_secs(5), self.tracker.wait()).await;
    }

    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    /// Reloads the config file (without force) at every signal `hup` delivers, until
    /// shutdown. The caller registers `hup` (SIGHUP) before [`start`], so a signal that comes
    /// early waits in it instead of killing the process.
    pub fn reload_on_sighup(&self, mut hup: tokio::signal::unix::Signal) {
        let fleet = self.fleet.clone();
        let stop = self.shutdown.clone();
        self.tracker.spawn(async move {
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    got = hup.recv() => {
                        if got.is_none() {
                            return;
                        }
                        match fleet.reload_config(false, "sighup").await {
                            Ok(o) if o.applied => tracing::info!(version = o.version, changes = o.diff.len(), "SIGHUP: config reloaded"),
                            Ok(_) => tracing::info!("SIGHUP: the config file is unchanged"),
                            Err(e) => tracing::error!("SIGHUP: {e}"),
                        }
                    }
                }
            }
        });
    }
}

/// Keeps the RoutingTable in step with the catalog: LISTEN for changes (reconnecting when the
/// catalog connection drops), a full reload every 30 s as a safety net, and pool upkeep.
async fn follow_catalog(fleet: Arc<Fleet>, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(Duration::from_secs(30));
    let mut upkeep = tokio::time::interval(Duration::from_secs(10));
    let mut listener = None;
    loop {
        if listener.is_none() {
            match fleet.catalog.listener().await {
                Ok(l) => {
                    listener = Some(l);
                    // Changes may have happened while we were not listening.
                    let _ = fleet.reload_routes().await;
                    crate::fleet::routers::sync_pauses(&fleet).await;
                }
                Err(e) => tracing::warn!("cannot LISTEN on the catalog, retrying: {e}"),
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {
                if let Err(e) = fleet.reload_routes().await {
                    tracing::warn!("route reload failed: {e}");
                }
            }
            _ = upkeep.tick() => fleet.proxy.maintain_pools(),
            n = async { listener.as_mut().expect("checked").recv().await }, if listener.is_some() => {
                match n {
                    Ok(n) if n.channel() == crate::fleet::routers::PAUSES_CHANNEL => {
                        tokio::spawn(crate::fleet::routers::follow_pause(fleet.clone(), n.payload().to_owned()));
                    }
                    Ok(_) => {
                        if let Err(e) = fleet.reload_routes().await {
                            tracing::warn!("route reload failed: {e}");
                        }
                    }
                    Err(e) => {
                        tracing::warn!("catalog notifications interrupted: {e}");
                        listener = None;
                        tokio::time::sleep(Duration::from_millis(500)).await;
                    }
                }
            }
        }
    }
}
