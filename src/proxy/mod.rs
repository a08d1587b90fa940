//! The PostgreSQL wire side of the router: the listener, client sessions, server
//! connections, pools and cancel routing.
//!
//! Life cycle of a client connection (each phase in its own module):
//! accept (max clients) → [`startup`] (SSL 'N', startup packet, SCRAM against the catalog,
//! tenant lookup and grant check) → [`session`] (checkout from the tenant's [`pool`], replay
//! of session parameters, relay, release) → close. Cancel requests are routed by [`cancel`].

pub mod cancel;
pub mod pool;
pub mod prepared;
pub mod server;
pub mod session;
pub mod startup;

use crate::config::{Config, PoolMode};
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
    pub pool_size: usize,
    pub limits: PoolLimits,
    pub auth_timeout: Duration,
    pub reset_query: String,
}

impl ProxySettings {
    pub fn from_config(c: &Config) -> Self {
        ProxySettings {
            mode: c.pool.mode,
            pool_size: c.pool.size as usize,
            limits: PoolLimits {
                checkout_timeout: c.pool.checkout_timeout.0,
                connect_timeout: c.router.connect_timeout.0,
                server_lifetime: c.pool.server_lifetime.0,
                server_idle_timeout: c.pool.server_idle_timeout.0,
            },
            auth_timeout: c.auth.timeout.0,
            reset_query: c.pool.reset_query.clone(),
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
    settings: ArcSwap<ProxySettings>,
    client_slots: Arc<Semaphore>,
    max_clients: usize,
    mock_secret: [u8; 32],
    next_client_id: AtomicU64,
}

impl Proxy {
    pub fn new(table: SharedTable, config: &Config) -> Proxy {
        Proxy {
            table,
            pools: Pools::default(),
            cancels: cancel::CancelRegistry::default(),
            stats: ProxyStats::default(),
            settings: ArcSwap::from_pointee(ProxySettings::from_config(config)),
            client_slots: Arc::new(Semaphore::new(config.pool.max_clients as usize)),
            max_clients: config.pool.max_clients as usize,
            mock_secret: rand::random(),
            next_client_id: AtomicU64::new(1),
        }
    }

    pub fn settings(&self) -> arc_swap::Guard<Arc<ProxySettings>> {
        self.settings.load()
    }

    /// Applies reloaded settings: new sessions and checkouts use them at once, and existing
    /// pools are resized to the new pool size.
    pub fn apply_settings(&self, s: ProxySettings) {
        let size = s.pool_size;
        self.settings.store(Arc::new(s));
        self.pools.resize_all(size);
    }

    pub(crate) fn mock_secret(&self) -> &[u8] {
        &self.mock_secret
    }

    pub fn pool_for(&self, route: &TenantRoute, role: &RoleAuth) -> Arc<Pool> {
        let size = self.settings().pool_size;
        self.pools
            .get_or_create(session::pool_key(route, &role.name), size, &role.verifier)
    }

    /// Drops idle server connections past their idle timeout and pools of old routes.
    pub fn maintain_pools(&self) {
        let table = self.table.load();
        let idle = self.settings().limits.server_idle_timeout;
        self.pools.maintain(idle, |k| {
            table
                .tenant(&k.tenant)
                .is_some_and(|t| t.pod.name == k.pod && t.pod.primary == k.endpoint)
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
        let proxy = proxy.clone();
        let shutdown = shutdown.clone();
        tracker.spawn(async move { handle_client(proxy, stream, peer, shutdown).await });
    }
}

async fn handle_client(
    proxy: Arc<Proxy>,
    mut stream: TcpStream,
    peer: SocketAddr,
    shutdown: CancellationToken,
) {
    let _ = stream.set_nodelay(true);
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

async fn send_fatal(stream: &mut TcpStream, e: &RouterError) {
    let mut out = BytesMut::new();
    e.encode(&mut out);
    let _ = stream.write_all(&out).await;
    let _ = stream.shutdown().await;
}
