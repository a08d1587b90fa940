//! The PostgreSQL wire side of the router: the listener, client sessions, server
//! connections, pools and cancel routing.
//!
//! Life cycle of a client connection (each phase in its own module):
//! accept (max clients) → [`startup`] (SSLRequest: a [`tls`] handshake or 'N', startup
//! packet, SCRAM against the catalog, tenant lookup and grant check) → [`session`] (checkout from the tenant's [`pool`], replay
//! of session parameters, relay, release) → close. Cancel requests are routed by [`cancel`].

pub mod cancel;
pub mod pool;
pub mod prepared;
pub mod server;
pub mod session;
pub mod sqltext;
pub mod startup;
pub mod stream;
pub mod tls;

use crate::config::{Config, PgEndpoint, PoolMode, ReplicaLag};
use crate::protocol::backend::RouterError;
use crate::protocol::sqlstate;
use crate::routing::{RoleAuth, SharedTable, TenantRoute};
use arc_swap::ArcSwap;
use bytes::BytesMut;
use pool::{Pool, PoolLimits, Pools};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// The parts of the config the proxy reads, swapped whole on reload.
#[derive(Debug, Clone)]
pub struct ProxySettings {
    pub mode: PoolMode,
    /// New connections per second from one source address (`limits.wire_connections_per_ip`).
    pub connections_per_ip: crate::limits::Rate,
    pub max_tracked_keys: usize,
    pub pool_size: usize,
    /// Server connections per pod: the default and each pod's own.
    pub pod_limit: usize,
    pub pod_limits: std::collections::HashMap<String, usize>,
    pub max_clients_per_tenant: usize,
    pub limits: PoolLimits,
    pub auth_timeout: Duration,
    pub reset_query: String,
    /// Bound on a replica's lag for sessions that ask for one (`podrouter.target=replica`).
    pub max_replica_lag: ReplicaLag,
    /// Longest a client waits at a paused tenant's gate, and how many may wait there.
    pub pause_hold: Duration,
    pub max_held_clients: usize,
}

impl ProxySettings {
    pub fn pod_limit(&self, pod: &str) -> usize {
        self.pod_limits.get(pod).copied().unwrap_or(self.pod_limit)
    }

    pub fn from_config(c: &Config) -> Self {
        ProxySettings {
            mode: c.pool.mode,
            connections_per_ip: crate::limits::Rate::new(
                c.limits.wire_connections_per_ip,
                c.limits.wire_connection_burst,
            ),
            max_tracked_keys: c.limits.max_tracked_keys as usize,
            pool_size: c.pool.size as usize,
            pod_limit: c.pool.max_pod_connections as usize,
            pod_limits: c
                .pods
                .iter()
                .map(|p| (p.name.clone(), c.pod_connection_limit(&p.name)))
                .collect(),
            max_clients_per_tenant: c.pool.max_clients_per_tenant as usize,
            limits: PoolLimits {
                checkout_timeout: c.pool.checkout_timeout.0,
                connect_timeout: c.router.connect_timeout.0,
                server_lifetime: c.pool.server_lifetime.0,
                server_idle_timeout: c.pool.server_idle_timeout.0,
                server_check_after: c.pool.server_check_after.0,
            },
            auth_timeout: c.auth.timeout.0,
            reset_query: c.pool.reset_query.clone(),
            max_replica_lag: c.pool.max_replica_lag,
            // A move resumes its clients by its deadline; an operator's pause by the hold.
            pause_hold: c.moves.operator_pause_hold.0.max(c.moves.pause_deadline.0),
            max_held_clients: c.moves.max_held_clients as usize,
        }
    }
}

#[derive(Default)]
pub struct ProxyStats {
    pub clients_accepted: AtomicU64,
    pub clients_active: AtomicU64,
    pub clients_refused: AtomicU64,
}

pub struct Proxy {
    pub table: SharedTable,
    pub pools: Pools,
    pub cancels: cancel::CancelRegistry,
    pub stats: ProxyStats,
    /// New connections per source address, and the few tasks that answer those refused.
    connection_rate: crate::limits::RateLimiter<std::net::IpAddr>,
    refusals: Arc<Semaphore>,
    settings: ArcSwap<ProxySettings>,
    client_slots: Arc<Semaphore>,
    max_clients: usize,
    mock_secret: [u8; 32],
    next_client_id: AtomicU64,
    /// Live client sessions per tenant, for `pool.max_clients_per_tenant`.
    tenant_clients: parking_lot::Mutex<std::collections::HashMap<String, usize>>,
    /// The pods' health as last probed (crate::health), read by replica routing.
    pub health: crate::health::HealthBoard,
    /// TLS offered to clients (restart-only: loaded once here).
    pub client_tls: tls::ClientTls,
    /// Per-tenant pause gates (live moves, operator pauses).
    pub gates: crate::routing::pause::PauseGates,
}

/// One counted client session of a tenant; uncounted on drop.
struct TenantClient<'a> {
    proxy: &'a Proxy,
    tenant: String,
}

impl Drop for TenantClient<'_> {
    fn drop(&mut self) {
        let mut map = self.proxy.tenant_clients.lock();
        if let Some(n) = map.get_mut(&self.tenant) {
            *n -= 1;
            if *n == 0 {
                map.remove(&self.tenant);
            }
        }
    }
}

impl Proxy {
    /// `base` is the config file's directory, for relative TLS file paths.
    pub fn new(table: SharedTable, config: &Config, base: Option<&std::path::Path>) -> Proxy {
        let tls = tls::TlsSetup::load_or_fail_closed(config.tls.as_ref(), base);
        Proxy {
            table,
            pools: Pools::with_pod_tls(tls.pods),
            cancels: cancel::CancelRegistry::default(),
            stats: ProxyStats::default(),
            connection_rate: crate::limits::RateLimiter::new(
                config.limits.max_tracked_keys as usize,
            ),
            refusals: Arc::new(Semaphore::new(MAX_REFUSALS_IN_FLIGHT)),
            settings: ArcSwap::from_pointee(ProxySettings::from_config(config)),
            client_slots: Arc::new(Semaphore::new(config.pool.max_clients as usize)),
            max_clients: config.pool.max_clients as usize,
            mock_secret: rand::random(),
            next_client_id: AtomicU64::new(1),
            tenant_clients: Default::default(),
            health: Default::default(),
            client_tls: tls.clients,
            gates: Default::default(),
        }
    }

    pub fn settings(&self) -> arc_swap::Guard<Arc<ProxySettings>> {
        self.settings.load()
    }

    /// Applies reloaded settings: new sessions and checkouts use them at once, and existing
    /// pools are resized to the new pool size.
    pub fn apply_settings(&self, s: ProxySettings) {
        let s = Arc::new(s);
        self.settings.store(s.clone());
        self.connection_rate.set_max_keys(s.max_tracked_keys);
        self.pools.resize_all(s.pool_size, |pod| s.pod_limit(pod));
    }

    /// Counts a client session of `tenant`, or refuses it when the tenant is at its limit.
    fn admit_tenant_client(&self, tenant: &str) -> Result<TenantClient<'_>, RouterError> {
        let limit = self.settings().max_clients_per_tenant;
        let mut map = self.tenant_clients.lock();
        let n = map.entry(tenant.to_owned()).or_insert(0);
        if *n >= limit {
            return Err(RouterError::fatal(
                sqlstate::TOO_MANY_CONNECTIONS,
                format!("podrouter: too many connections for tenant \"{tenant}\" (limit {limit})"),
            )
            .with_hint(
                "Close idle connections, or ask an operator to raise pool.max_clients_per_tenant.",
            ));
        }
        *n += 1;
        Ok(TenantClient {
            proxy: self,
            tenant: tenant.to_owned(),
        })
    }

    /// Live client sessions per tenant (read at scrape time by the metrics).
    pub fn tenant_client_counts(&self) -> Vec<(String, usize)> {
        let map = self.tenant_clients.lock();
        map.iter().map(|(t, n)| (t.clone(), *n)).collect()
    }

    pub(crate) fn mock_secret(&self) -> &[u8] {
        &self.mock_secret
    }

    pub fn pool_for(&self, route: &TenantRoute, role: &RoleAuth) -> Arc<Pool> {
        self.pool_at(route, role, &route.pod.primary)
    }

    /// The pool of a tenant and role on one server of its pod: the primary or a replica.
    pub fn pool_at(
        &self,
        route: &TenantRoute,
        role: &RoleAuth,
        endpoint: &PgEndpoint,
    ) -> Arc<Pool> {
        let s = self.settings();
        self.pools.get_or_create(
            session::pool_key_at(route, &role.name, endpoint),
            s.pool_size,
            s.pod_limit(&route.pod.name),
            &role.verifier,
        )
    }

    /// Drops idle server connections past their idle timeout and pools of old routes.
    pub fn maintain_pools(&self) {
        let table = self.table.load();
        let idle = self.settings().limits.server_idle_timeout;
        self.pools.maintain(idle, |k| {
            table
                .tenant(&k.tenant)
                .is_some_and(|t| t.pod.name == k.pod && t.pod.serves(&k.endpoint))
        });
    }
}

/// Accepts wire connections until `shutdown`; each client runs as a tracked task.
pub async fn serve(
    proxy: Arc<Proxy>,
    listener: TcpListener,
    shutdown: CancellationToken,
    tracker: TaskTracker,
) {
    loop {
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => break,
            a = listener.accept() => a,
        };
        let (stream, peer) = match accepted {
            Ok(x) => x,
            Err(e) => {
                // Out of file descriptors and the like: back off instead of spinning.
                tracing::warn!("accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        if let Err(wait) = proxy
            .connection_rate
            .check(&peer.ip(), proxy.settings().connections_per_ip)
        {
            refuse_connection(&proxy, &tracker, stream, peer, wait);
            continue;
        }
        let proxy = proxy.clone();
        let shutdown = shutdown.clone();
        tracker.spawn(async move { handle_client(proxy, stream, peer, shutdown).await });
    }
}

/// Connections refused for their address's rate being answered at once; more are closed
/// without a word, so a flood cannot make the router spend much on refusing it.
const MAX_REFUSALS_IN_FLIGHT: usize = 256;

/// How long a refused client has to send its startup packet and read the error.
const REFUSAL_TIME: Duration = Duration::from_secs(1);

/// Answers a connection over its address's rate with `FATAL 53300`, in a small task of its
/// own so the accept loop (and every other address) never waits for it.
fn refuse_connection(
    proxy: &Arc<Proxy>,
    tracker: &TaskTracker,
    stream: TcpStream,
    peer: SocketAddr,
    wait: Duration,
) {
    proxy.stats.clients_refused.fetch_add(1, Ordering::Relaxed);
    tracing::debug!(%peer, "refused: over the connection rate of its address");
    let Ok(permit) = proxy.refusals.clone().try_acquire_owned() else {
        return; // dropping the socket closes it
    };
    let proxy = proxy.clone();
    tracker.spawn(async move {
        let _permit = permit;
        let e = RouterError::fatal(
            sqlstate::TOO_MANY_CONNECTIONS,
            "podrouter: too many connections from this address",
        )
        .with_hint(format!(
            "Connect less often (reuse connections, or a client-side pool); retry in {} s, or ask an operator to raise limits.wire_connections_per_ip.",
            crate::limits::retry_after_secs(wait)
        ));
        startup::refuse(&proxy, stream, &e, REFUSAL_TIME).await;
    });
}

async fn handle_client(
    proxy: Arc<Proxy>,
    stream: TcpStream,
    peer: SocketAddr,
    shutdown: CancellationToken,
) {
    let _ = stream.set_nodelay(true);
    let mut stream = stream::ClientStream::Plain(stream);
    proxy.stats.clients_accepted.fetch_add(1, Ordering::Relaxed);
    let permit = proxy.client_slots.clone().try_acquire_owned();
    let mut buf = BytesMut::new();
    let timeout = proxy.settings().auth_timeout;
    let started = tokio::time::timeout(timeout, startup::run(&proxy, &mut stream, &mut buf)).await;
    let auth = match started {
        Ok(Ok(startup::Outcome::Authenticated(a))) => a,
        Ok(Ok(startup::Outcome::Done)) => return,
        Ok(Err(startup::Refusal(e))) => {
            if let Some(e) = e {
                tracing::debug!(%peer, "refused: {e}");
                proxy.stats.clients_refused.fetch_add(1, Ordering::Relaxed);
                send_fatal(&mut stream, &e).await;
            }
            return;
        }
        Err(_) => {
            proxy.stats.clients_refused.fetch_add(1, Ordering::Relaxed);
            let e = RouterError::fatal(
                sqlstate::CANNOT_CONNECT_NOW,
                format!("podrouter: authentication did not finish within {timeout:?}"),
            );
            send_fatal(&mut stream, &e).await;
            return;
        }
    };
    let Ok(_permit) = permit else {
        let e = RouterError::fatal(
            sqlstate::TOO_MANY_CONNECTIONS,
            format!(
                "podrouter: sorry, too many clients already (max_clients {})",
                proxy.max_clients
            ),
        )
        .with_hint("Retry later, or raise pool.max_clients.");
        send_fatal(&mut stream, &e).await;
        return;
    };
    let _counted = match proxy.admit_tenant_client(&auth.tenant.name) {
        Ok(c) => c,
        Err(e) => {
            proxy.stats.clients_refused.fetch_add(1, Ordering::Relaxed);
            send_fatal(&mut stream, &e).await;
            return;
        }
    };
    proxy.stats.clients_active.fetch_add(1, Ordering::Relaxed);
    let registration = proxy.cancels.register();
    let pool = proxy.pool_for(&auth.tenant, &auth.role);
    pool.remember_auth(auth.client_key, &auth.role.verifier);
    let client_id = proxy.next_client_id.fetch_add(1, Ordering::Relaxed);
    let key = (registration.pid, registration.secret);
    let session = session::Session::new(
        &proxy,
        stream,
        auth,
        registration.slot.clone(),
        client_id,
        pool,
        buf,
    );
    session.run(key, shutdown).await;
    drop(registration);
    proxy.stats.clients_active.fetch_sub(1, Ordering::Relaxed);
}

async fn send_fatal(stream: &mut stream::ClientStream, e: &RouterError) {
    let mut out = BytesMut::new();
    e.encode(&mut out);
    let _ = stream.write_all(&out).await;
    let _ = stream.shutdown().await;
}
