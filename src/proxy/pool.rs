//! Server connection pools, one per (tenant, role, pod route). A semaphore bounds the
//! connections checked out; an idle stack (LIFO, so warm connections are reused first) holds
//! the rest. New connections are made only when no idle one is left, so idle + checked out
//! never exceeds the pool size.

use super::server::{Credentials, ServerConn, ServerError};
use crate::config::PgEndpoint;
use crate::protocol::scram::Verifier;
use parking_lot::Mutex;
use std::collections::HashMap;
use std::sync::Arc;
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
}

pub struct Pool {
    pub key: PoolKey,
    size: std::sync::atomic::AtomicUsize,
    permits: Arc<Semaphore>,
    idle: Mutex<Vec<ServerConn>>,
    auth: Mutex<PoolAuth>,
    /// Prepared statements known to parse on this pool's servers.
    pub known: super::prepared::KnownStatements,
}

struct PoolAuth {
    client_key: Option<[u8; 32]>,
    verifier: Verifier,
}

/// A checked-out server connection. Dropping it closes the connection (it may be mid-query);
/// [`Pool::release`] returns a clean one.
pub struct Checkout {
    pub conn: ServerConn,
    _permit: OwnedSemaphorePermit,
}

impl Pool {
    fn new(key: PoolKey, size: usize, verifier: Verifier) -> Pool {
        Pool {
            key,
            size: size.into(),
            permits: Arc::new(Semaphore::new(size)),
            idle: Mutex::new(Vec::with_capacity(size)),
            auth: Mutex::new(PoolAuth {
                client_key: None,
                verifier,
            }),
            known: Default::default(),
        }
    }

    /// Records the ClientKey and verifier of a client that just authenticated, so new server
    /// connections can log in with SCRAM pass-through.
    pub fn remember_auth(&self, client_key: [u8; 32], verifier: &Verifier) {
        let mut a = self.auth.lock();
        a.client_key = Some(client_key);
        if a.verifier != *verifier {
            a.verifier = verifier.clone();
        }
    }

    pub async fn checkout(&self, limits: &PoolLimits) -> Result<Checkout, CheckoutError> {
        let permit = match self.permits.clone().try_acquire_owned() {
            Ok(p) => p,
            Err(_) => {
                tracing::trace!(tenant = %self.key.tenant, "checkout waits");
                tokio::time::timeout(
                    limits.checkout_timeout,
                    self.permits.clone().acquire_owned(),
                )
                .await
                .map_err(|_| CheckoutError::Timeout {
                    size: self.size(),
                    waited: limits.checkout_timeout,
                })?
                .expect("pool semaphores are never closed")
            }
        };
        loop {
            let conn = self.idle.lock().pop();
            match conn {
                Some(c) if c.looks_alive() && c.created.elapsed() < limits.server_lifetime => {
                    return Ok(Checkout {
                        conn: c,
                        _permit: permit,
                    });
                }
                Some(_) => continue, // dead or too old: dropped here, try the next one
                None => break,
            }
        }
        let creds = {
            let a = self.auth.lock();
            Credentials {
                user: self.key.role.clone(),
                database: self.key.tenant.clone(),
                client_key: a.client_key,
                verifier: a.verifier.clone(),
            }
        };
        let conn = ServerConn::connect(&self.key.endpoint, &creds, limits.connect_timeout).await?;
        Ok(Checkout {
            conn,
            _permit: permit,
        })
    }

    /// Returns a clean (idle, out of any transaction) connection to the pool.
    pub fn release(&self, mut c: Checkout) {
        c.conn.last_used = Instant::now();
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
        self.size().saturating_sub(self.permits.available_permits())
    }

    pub fn size(&self) -> usize {
        self.size.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Changes the pool size. Growing adds permits at once; shrinking takes permits away as
    /// connections come back (checked-out connections are never cut), and closes surplus
    /// idle connections.
    pub fn resize(&self, new_size: usize) {
        use std::sync::atomic::Ordering;
        let old = self.size.swap(new_size, Ordering::Relaxed);
        if new_size > old {
            self.permits.add_permits(new_size - old);
        } else if new_size < old {
            let mut owed = old - new_size;
            owed -= self.permits.forget_permits(owed);
            if owed > 0 {
                // The rest is taken as checked-out connections are released.
                let permits = self.permits.clone();
                tokio::spawn(async move {
                    if let Ok(p) = permits.acquire_many_owned(owed as u32).await {
                        p.forget();
                    }
                });
            }
            let mut idle = self.idle.lock();
            let surplus = idle.len().saturating_sub(new_size);
            // The oldest idle connections are at the front (LIFO reuse pops the back).
            idle.drain(..surplus);
        }
    }
}

/// All pools of this router.
#[derive(Default)]
pub struct Pools {
    pools: Mutex<HashMap<PoolKey, Arc<Pool>>>,
}

impl Pools {
    pub fn get_or_create(&self, key: PoolKey, size: usize, verifier: &Verifier) -> Arc<Pool> {
        let mut map = self.pools.lock();
        if let Some(p) = map.get(&key) {
            return p.clone();
        }
        let pool = Arc::new(Pool::new(key.clone(), size, verifier.clone()));
        map.insert(key, pool.clone());
        pool
    }

    /// Prunes idle connections everywhere and forgets pools that are empty and whose route is
    /// no longer current (`is_current` says whether a key still matches the routing table).
    pub fn maintain(&self, idle_timeout: Duration, is_current: impl Fn(&PoolKey) -> bool) {
        let pools: Vec<Arc<Pool>> = self.pools.lock().values().cloned().collect();
        for p in &pools {
            let stale = !is_current(&p.key);
            p.prune(if stale { Duration::ZERO } else { idle_timeout });
        }
        self.pools
            .lock()
            .retain(|k, p| is_current(k) || p.active_count() > 0 || p.idle_count() > 0);
    }

    pub fn resize_all(&self, size: usize) {
        for p in self.snapshot() {
            if p.size() != size {
                p.resize(size);
            }
        }
    }

    pub fn snapshot(&self) -> Vec<Arc<Pool>> {
        self.pools.lock().values().cloned().collect()
    }
}
