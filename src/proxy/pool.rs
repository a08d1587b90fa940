//! Server connection pools, one per (tenant, role, pod route), and the cap on server
//! connections per pod that all pools of a pod share.
//!
//! A pool's [`Capacity`] bounds the connections checked out; an idle stack (LIFO, so warm
//! connections are reused first) holds the rest. New connections are made only when no idle
//! one is left, so idle + checked out never exceeds the pool size. Every server connection
//! also holds a slot of its server's capacity (per pod primary or replica) for its whole
//! life; when a server is full, idle connections of other pools on it are closed to make room.

use super::server::{Credentials, ServerConn, ServerError};
use super::tls::PodTls;
use crate::config::PgEndpoint;
use crate::metrics::{BusyTimer, StatsMap, TenantStats};
use crate::protocol::scram::Verifier;
use parking_lot::Mutex;
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};
use thiserror::Error;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PoolKey {
    pub tenant: String,
    pub role: String,
    pub pod: String,
    pub endpoint: PgEndpoint,
}

#[derive(Debug, Error)]
pub enum CheckoutError {
    #[error("all {size} server connections for this tenant and role stayed busy for {waited:?}")]
    Timeout { size: usize, waited: Duration },
    #[error("the pod is at its limit of {limit} server connections")]
    PodFull { limit: usize },
    #[error(transparent)]
    Server(#[from] ServerError),
}

/// Limits applied at checkout; read from the running config.
#[derive(Debug, Clone, Copy)]
pub struct PoolLimits {
    pub checkout_timeout: Duration,
    pub connect_timeout: Duration,
    pub server_lifetime: Duration,
    pub server_idle_timeout: Duration,
    /// Idle longer than this: checked with a query before reuse.
    pub server_check_after: Duration,
}

// === impl Capacity ===

/// A resizable count of slots: a semaphore plus its current size.
pub struct Capacity {
    sem: Arc<Semaphore>,
    size: AtomicUsize,
}

impl Capacity {
    fn new(size: usize) -> Capacity {
        Capacity {
            sem: Arc::new(Semaphore::new(size)),
            size: size.into(),
        }
    }

    fn try_take(&self) -> Option<OwnedSemaphorePermit> {
        self.sem.clone().try_acquire_owned().ok()
    }

    async fn take(&self, within: Duration) -> Option<OwnedSemaphorePermit> {
        match self.try_take() {
            Some(p) => Some(p),
            None => tokio::time::timeout(within, self.sem.clone().acquire_owned())
                .await
                .ok()
                .map(|p| p.expect("capacities are never closed")),
        }
    }

    pub fn size(&self) -> usize {
        self.size.load(Ordering::Relaxed)
    }

    pub fn in_use(&self) -> usize {
        self.size().saturating_sub(self.sem.available_permits())
    }

    /// Growing adds slots at once; shrinking takes slots away as they are given back
    /// (nothing in use is cut).
    fn resize(&self, new_size: usize) {
        let old = self.size.swap(new_size, Ordering::Relaxed);
        if new_size > old {
            self.sem.add_permits(new_size - old);
        } else if new_size < old {
            let owed = (old - new_size) - self.sem.forget_permits(old - new_size);
            if owed > 0 {
                let sem = self.sem.clone();
                tokio::spawn(async move {
                    if let Ok(p) = sem.acquire_many_owned(owed as u32).await {
                        p.forget();
                    }
                });
            }
        }
    }
}

// === impl PodSlots ===

/// The server connections one pod may have in all, and the pools that use them.
pub struct PodSlots {
    capacity: Capacity,
    pools: Mutex<Vec<Weak<Pool>>>,
}

impl PodSlots {
    /// Closes the oldest idle connection of any pool on this pod; true if one was closed.
    fn evict_one_idle(&self) -> bool {
        let pools: Vec<Arc<Pool>> = {
            let mut list = self.pools.lock();
            list.retain(|w| w.strong_count() > 0);
            list.iter().filter_map(Weak::upgrade).collect()
        };
        let oldest = pools
            .iter()
            .filter_map(|p| p.idle.lock().first().map(|c| (c.last_used, p.clone())))
            .min_by_key(|(t, _)| *t);
        match oldest {
            Some((_, pool)) => {
                let mut idle = pool.idle.lock();
                if idle.is_empty() {
                    return false;
                }
                drop(idle.remove(0)); // its pod slot is freed with it
                true
            }
            None => false,
        }
    }

    /// A pod slot for a new server connection, making room if the pod is full.
    async fn take(&self, within: Duration) -> Result<OwnedSemaphorePermit, CheckoutError> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            if let Some(p) = self.capacity.try_take() {
                return Ok(p);
            }
            if !self.evict_one_idle() {
                let left = deadline.saturating_duration_since(tokio::time::Instant::now());
                // Wait briefly for a slot, then look again for idle connections to close.
                if let Some(p) = self
                    .capacity
                    .take(left.min(Duration::from_millis(25)))
                    .await
                {
                    return Ok(p);
                }
                if tokio::time::Instant::now() >= deadline {
                    return Err(CheckoutError::PodFull {
                        limit: self.capacity.size(),
                    });
                }
            }
        }
    }

    pub fn capacity(&self) -> &Capacity {
        &self.capacity
    }
}

// === impl Pool ===

pub struct Pool {
    pub key: PoolKey,
    capacity: Capacity,
    pod: Arc<PodSlots>,
    /// Boxed: a connection moves through checkout, the relay and release by pointer (moving
    /// the ~500-byte struct was ~8% of the router's instructions per transaction).
    #[allow(clippy::vec_box)] // measured: see above
    idle: Mutex<Vec<Box<ServerConn>>>,
    auth: Mutex<PoolAuth>,
    /// Prepared statements known to parse on this pool's servers.
    pub known: super::prepared::KnownStatements,
    pod_tls: PodTls,
    /// The (pod, tenant)'s counters, shared with its other pools (crate::metrics).
    pub stats: Arc<TenantStats>,
}

struct PoolAuth {
    client_key: Option<[u8; 32]>,
    verifier: Verifier,
}

/// A checked-out server connection. Dropping it closes the connection (it may be mid-query);
/// [`Pool::release`] returns a clean one.
pub struct Checkout {
    pub conn: Box<ServerConn>,
    _permit: OwnedSemaphorePermit,
    /// Adds the time it is checked out to the tenant's server busy time.
    _busy: BusyTimer,
}

impl Checkout {
    /// When the server connection was handed out.
    pub fn since(&self) -> Instant {
        self._busy.since()
    }
}

impl Pool {
    /// Records the ClientKey and verifier of a client that just authenticated, so new server
    /// connections can log in with SCRAM pass-through.
    pub fn remember_auth(&self, client_key: [u8; 32], verifier: &Verifier) {
        let mut a = self.auth.lock();
        a.client_key = Some(client_key);
        if a.verifier != *verifier {
            a.verifier = verifier.clone();
        }
    }

    /// A server connection for this pool's tenant and role: an idle one, or a new one.
    /// The time it takes is the tenant's pool wait.
    pub async fn checkout(&self, limits: &PoolLimits) -> Result<Checkout, CheckoutError> {
        let started = tokio::time::Instant::now();
        let co = self.take_server(limits, started).await;
        // Until the busy timer started: no second clock read when nothing was waited for.
        let waited = match &co {
            Ok(c) => c.since().saturating_duration_since(started.into_std()),
            Err(_) => started.elapsed(),
        };
        self.stats.pool_wait.observe(waited);
        co
    }

    async fn take_server(
        &self,
        limits: &PoolLimits,
        started: tokio::time::Instant,
    ) -> Result<Checkout, CheckoutError> {
        // The clock as the permit comes: reused for the ages below and the busy timer (clock
        // reads were ~6% of the router's instructions per transaction); read again after a wait.
        let (permit, now) = match self.capacity.try_take() {
            Some(p) => (p, started.into_std()),
            None => {
                tracing::trace!(tenant = %self.key.tenant, "checkout waits");
                let p = self.capacity.take(limits.checkout_timeout).await.ok_or(
                    CheckoutError::Timeout {
                        size: self.capacity.size(),
                        waited: limits.checkout_timeout,
                    },
                )?;
                (p, Instant::now())
            }
        };
        loop {
            // Popped in a statement of its own: the lock is not held past it.
            let conn = self.idle.lock().pop();
            let Some(mut c) = conn else { break };
            let idle_for = now.saturating_duration_since(c.last_used);
            if !c.looks_alive(idle_for)
                || now.saturating_duration_since(c.created) >= limits.server_lifetime
            {
                continue;
            }
            if idle_for < limits.server_check_after {
                return Ok(Checkout {
                    conn: c,
                    _permit: permit,
                    _busy: BusyTimer::start_at(&self.stats, now),
                });
            }
            // Long idle: a firewall or a pod restart may have cut it silently.
            if c.simple_query("SELECT 1", limits.connect_timeout)
                .await
                .is_ok()
            {
                return Ok(Checkout {
                    conn: c,
                    _permit: permit,
                    _busy: BusyTimer::start(&self.stats),
                });
            }
        }
        let left = limits.checkout_timeout.saturating_sub(started.elapsed());
        let pod_slot = self.pod.take(left).await?;
        let creds = {
            let a = self.auth.lock();
            Credentials {
                user: self.key.role.clone(),
                database: self.key.tenant.clone(),
                client_key: a.client_key,
                verifier: a.verifier.clone(),
            }
        };
        let mut conn = Box::new(
            ServerConn::connect(
                &self.key.endpoint,
                &creds,
                &self.pod_tls,
                limits.connect_timeout,
            )
            .await?,
        );
        conn.pod_slot = Some(pod_slot);
        Ok(Checkout {
            conn,
            _permit: permit,
            _busy: BusyTimer::start(&self.stats),
        })
    }

    /// Returns a clean (idle, out of any transaction) connection to the pool; `now` is the
    /// clock if the caller read it a moment ago (at the ReadyForQuery that made it clean).
    pub fn release(&self, mut c: Checkout, now: Option<Instant>) {
        let now = now.unwrap_or_else(Instant::now);
        c.conn.last_used = now;
        c._busy.end_at(now);
        self.idle.lock().push(c.conn);
    }

    /// Closes idle connections unused for longer than `idle_timeout`; returns how many.
    pub fn prune(&self, idle_timeout: Duration) -> usize {
        let mut idle = self.idle.lock();
        let before = idle.len();
        idle.retain(|c| c.last_used.elapsed() < idle_timeout);
        before - idle.len()
    }

    pub fn idle_count(&self) -> usize {
        self.idle.lock().len()
    }

    pub fn active_count(&self) -> usize {
        self.capacity.in_use()
    }

    pub fn size(&self) -> usize {
        self.capacity.size()
    }

    /// Changes the pool size; surplus idle connections (oldest first) are closed.
    pub fn resize(&self, new_size: usize) {
        self.capacity.resize(new_size);
        let mut idle = self.idle.lock();
        let surplus = idle.len().saturating_sub(new_size);
        idle.drain(..surplus);
    }
}

// === impl Pools ===

/// All pools of this router, and the slots of each pod.
#[derive(Default)]
pub struct Pools {
    pools: Mutex<HashMap<PoolKey, Arc<Pool>>>,
    /// Keyed by (pod, endpoint): a pod's primary and each replica are separate servers with
    /// their own max_connections, so each gets the pod's limit.
    pods: Mutex<HashMap<(String, PgEndpoint), Arc<PodSlots>>>,
    /// How new server connections negotiate TLS (`tls.pod_tls`, restart-only).
    pod_tls: PodTls,
    /// Per (pod, tenant) counters; each pool holds its own's.
    pub tenant_stats: StatsMap,
}

impl Pools {
    pub fn with_pod_tls(pod_tls: PodTls) -> Pools {
        Pools {
            pod_tls,
            ..Pools::default()
        }
    }

    /// The pool for `key`; `pod_limit` sizes the pod's slots when they are first made.
    pub fn get_or_create(
        &self,
        key: PoolKey,
        size: usize,
        pod_limit: usize,
        verifier: &Verifier,
    ) -> Arc<Pool> {
        if let Some(p) = self.pools.lock().get(&key) {
            return p.clone();
        }
        let pod = self
            .pods
            .lock()
            .entry((key.pod.clone(), key.endpoint.clone()))
            .or_insert_with(|| {
                Arc::new(PodSlots {
                    capacity: Capacity::new(pod_limit),
                    pools: Mutex::new(Vec::new()),
                })
            })
            .clone();
        let mut map = self.pools.lock();
        if let Some(p) = map.get(&key) {
            return p.clone(); // another session made it meanwhile
        }
        let pool = Arc::new(Pool {
            key: key.clone(),
            capacity: Capacity::new(size),
            pod: pod.clone(),
            idle: Mutex::new(Vec::with_capacity(size)),
            auth: Mutex::new(PoolAuth {
                client_key: None,
                verifier: verifier.clone(),
            }),
            known: Default::default(),
            pod_tls: self.pod_tls.clone(),
            stats: self.tenant_stats.get(&key.pod, &key.tenant),
        });
        pod.pools.lock().push(Arc::downgrade(&pool));
        map.insert(key, pool.clone());
        pool
    }

    /// Applies new sizes: every pool to `size`, every pod to `pod_limit(pod)`.
    pub fn resize_all(&self, size: usize, pod_limit: impl Fn(&str) -> usize) {
        for p in self.snapshot() {
            if p.size() != size {
                p.resize(size);
            }
        }
        for ((name, _), slots) in self.pods.lock().iter() {
            let limit = pod_limit(name);
            if slots.capacity.size() != limit {
                slots.capacity.resize(limit);
            }
        }
    }

    /// Prunes idle connections everywhere and forgets pools that are empty and whose route is
    /// no longer current (`is_current` says whether a key still matches the routing table).
    pub fn maintain(&self, idle_timeout: Duration, is_current: impl Fn(&PoolKey) -> bool) {
        for p in &self.snapshot() {
            let stale = !is_current(&p.key);
            p.prune(if stale { Duration::ZERO } else { idle_timeout });
        }
        self.pools
            .lock()
            .retain(|k, p| is_current(k) || p.active_count() > 0 || p.idle_count() > 0);
    }

    pub fn snapshot(&self) -> Vec<Arc<Pool>> {
        self.pools.lock().values().cloned().collect()
    }

    pub fn pod_slots(&self, pod: &str, endpoint: &PgEndpoint) -> Option<Arc<PodSlots>> {
        self.pods
            .lock()
            .get(&(pod.to_owned(), endpoint.clone()))
            .cloned()
    }
}
