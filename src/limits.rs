//! Abuse limits shared by the wire listener and the HTTP gateway: token-bucket rate limits
//! and in-flight counts, keyed by a source address or a tenant.
//!
//! Both are sharded maps behind `parking_lot` mutexes held for one lookup, never across an
//! `.await`, so one busy key costs the others nothing but a shard's brief lock. Memory stays
//! bounded: a bucket that has refilled is the same as no bucket, so such entries are swept;
//! past `max_keys` tracked keys, new keys share one overflow bucket per shard (an attack from
//! millions of addresses is slowed as one, and never grows the map). In-flight counts exist
//! only while something is in flight.

use parking_lot::Mutex;
use std::collections::HashMap;
use std::hash::{BuildHasher, Hash};
use std::sync::Arc;
use std::time::{Duration, Instant};

const SHARDS: usize = 16;
/// How often a shard drops its refilled buckets (also whenever it is full, at most this often).
const SWEEP_EVERY: Duration = Duration::from_secs(10);
const SWEEP_WHEN_FULL_EVERY: Duration = Duration::from_millis(100);

/// A token bucket's parameters: `per_second` tokens added each second, at most `burst` kept.
/// A rate of 0 means unlimited.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rate {
    pub per_second: f64,
    pub burst: f64,
}

impl Rate {
    pub fn new(per_second: u32, burst: u32) -> Rate {
        Rate {
            per_second: per_second as f64,
            burst: burst.max(1) as f64,
        }
    }

    pub fn is_unlimited(&self) -> bool {
        self.per_second <= 0.0
    }
}

// === impl Bucket ===

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

impl Bucket {
    fn full(rate: Rate, now: Instant) -> Bucket {
        Bucket {
            tokens: rate.burst,
            at: now,
        }
    }

    fn refill(&mut self, rate: Rate, now: Instant) {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens = (self.tokens + elapsed * rate.per_second).min(rate.burst);
        self.at = now;
    }

    /// Takes a token, or says how long until one is there.
    fn take(&mut self, rate: Rate, now: Instant) -> Result<(), Duration> {
        self.refill(rate, now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64(
                (1.0 - self.tokens) / rate.per_second,
            ))
        }
    }

    fn is_full(&self, rate: Rate, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens + elapsed * rate.per_second >= rate.burst
    }
}

// === impl RateLimiter ===

struct Shard<K> {
    buckets: HashMap<K, Bucket>,
    /// Shared by keys that arrive while the shard is full.
    overflow: Option<Bucket>,
    swept: Instant,
}

/// Token buckets per key.
pub struct RateLimiter<K> {
    shards: Box<[Mutex<Shard<K>>]>,
    hasher: std::collections::hash_map::RandomState,
    max_keys: std::sync::atomic::AtomicUsize,
}

impl<K: Hash + Eq + Clone> RateLimiter<K> {
    pub fn new(max_keys: usize) -> Self {
        let now = Instant::now();
        RateLimiter {
            shards: (0..SHARDS)
                .map(|_| {
                    Mutex::new(Shard {
                        buckets: HashMap::new(),
                        overflow: None,
                        swept: now,
                    })
                })
                .collect(),
            hasher: Default::default(),
            max_keys: max_keys.into(),
        }
    }

    /// Changes the bound on tracked keys (a config reload); applies at the next sweep.
    pub fn set_max_keys(&self, max_keys: usize) {
        self.max_keys
            .store(max_keys, std::sync::atomic::Ordering::Relaxed);
    }

    /// Takes one token of `key`'s bucket; `Err(wait)` says when the next one comes.
    pub fn check(&self, key: &K, rate: Rate) -> Result<(), Duration> {
        self.check_at(key, rate, Instant::now())
    }

    pub fn check_at(&self, key: &K, rate: Rate, now: Instant) -> Result<(), Duration> {
        if rate.is_unlimited() {
            return Ok(());
        }
        let per_shard = (self.max_keys.load(std::sync::atomic::Ordering::Relaxed) / SHARDS).max(1);
        let mut shard = self.shards[self.hasher.hash_one(key) as usize % SHARDS].lock();
        if let Some(b) = shard.buckets.get_mut(key) {
            return b.take(rate, now);
        }
        let since = now.saturating_duration_since(shard.swept);
        let full = shard.buckets.len() >= per_shard;
        if since >= SWEEP_EVERY || (full && since >= SWEEP_WHEN_FULL_EVERY) {
            shard.buckets.retain(|_, b| !b.is_full(rate, now));
            shard.swept = now;
        }
        if shard.buckets.len() < per_shard {
            let mut b = Bucket::full(rate, now);
            let taken = b.take(rate, now);
            shard.buckets.insert(key.clone(), b);
            return taken;
        }
        shard
            .overflow
            .get_or_insert_with(|| Bucket::full(rate, now))
            .take(rate, now)
    }

    /// Keys with a bucket right now (for tests and metrics).
    pub fn tracked(&self) -> usize {
        self.shards.iter().map(|s| s.lock().buckets.len()).sum()
    }
}

// === impl InFlight ===

/// How many of something (requests, connections) each key has open, with a cap per key.
pub struct InFlight<K> {
    shards: Box<[Mutex<HashMap<K, usize>>]>,
    hasher: std::collections::hash_map::RandomState,
}

/// One counted unit; uncounted on drop.
pub struct InFlightGuard<K: Hash + Eq + Clone> {
    owner: Arc<InFlight<K>>,
    key: K,
}

impl<K: Hash + Eq + Clone> InFlight<K> {
    pub fn new() -> Arc<Self> {
        Arc::new(InFlight {
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            hasher: Default::default(),
        })
    }

    fn shard(&self, key: &K) -> &Mutex<HashMap<K, usize>> {
        &self.shards[self.hasher.hash_one(key) as usize % SHARDS]
    }

    /// Counts one more for `key`, unless it already has `limit`.
    pub fn acquire(self: &Arc<Self>, key: &K, limit: usize) -> Option<InFlightGuard<K>> {
        let mut map = self.shard(key).lock();
        let n = map.entry(key.clone()).or_insert(0);
        if *n >= limit {
            if *n == 0 {
                map.remove(key);
            }
            return None;
        }
        *n += 1;
        Some(InFlightGuard {
            owner: self.clone(),
            key: key.clone(),
        })
    }

    pub fn count(&self, key: &K) -> usize {
        self.shard(key).lock().get(key).copied().unwrap_or(0)
    }
}

impl<K: Hash + Eq + Clone> Drop for InFlightGuard<K> {
    fn drop(&mut self) {
        let mut map = self.owner.shard(&self.key).lock();
        if let Some(n) = map.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                map.remove(&self.key);
            }
        }
    }
}

/// Seconds for a `Retry-After` header: the wait rounded up, at least 1.
pub fn retry_after_secs(wait: Duration) -> u64 {
    (wait.as_secs() + u64::from(wait.subsec_nanos() > 0)).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bucket_allows_its_burst_then_its_rate() {
        let l = RateLimiter::new(100);
        let rate = Rate::new(10, 3);
        let t0 = Instant::now();
        for _ in 0..3 {
            assert!(l.check_at(&"a", rate, t0).is_ok());
        }
        let wait = l.check_at(&"a", rate, t0).unwrap_err();
        assert!(
            wait <= Duration::from_millis(100) && wait > Duration::ZERO,
            "{wait:?}"
        );
        // Another key is untouched.
        assert!(l.check_at(&"b", rate, t0).is_ok());
        // 100 ms later one more token is there, and only one.
        let t1 = t0 + Duration::from_millis(100);
        assert!(l.check_at(&"a", rate, t1).is_ok());
        assert!(l.check_at(&"a", rate, t1).is_err());
        assert!(
            l.check_at(&"x", Rate::new(0, 0), t1).is_ok(),
            "rate 0 is off"
        );
    }

    #[test]
    fn memory_stays_bounded_and_refilled_buckets_go() {
        let l = RateLimiter::new(SHARDS * 4);
        let rate = Rate::new(1, 1);
        let t0 = Instant::now();
        for i in 0..10_000u32 {
            let _ = l.check_at(&i, rate, t0);
        }
        assert!(l.tracked() <= SHARDS * 4, "{} keys tracked", l.tracked());
        // Keys beyond the bound share a bucket: most of them are refused.
        let refused = (20_000..20_100u32)
            .filter(|i| l.check_at(i, rate, t0).is_err())
            .count();
        assert!(refused > 50, "only {refused} of 100 overflow keys refused");
        // Once the buckets have refilled, a sweep drops them (every shard gets new keys).
        let later = t0 + SWEEP_EVERY + Duration::from_secs(1);
        for i in 30_000..30_000 + SHARDS as u32 * 32 {
            let _ = l.check_at(&i, rate, later);
        }
        assert!(l.tracked() <= SHARDS * 4);
        let old: usize = l
            .shards
            .iter()
            .map(|s| s.lock().buckets.keys().filter(|k| **k < 30_000).count())
            .sum();
        assert_eq!(old, 0, "refilled buckets were kept");
    }

    #[test]
    fn in_flight_counts_and_forgets() {
        let f = InFlight::new();
        let a = f.acquire(&"ip", 2).unwrap();
        let b = f.acquire(&"ip", 2).unwrap();
        assert!(f.acquire(&"ip", 2).is_none());
        assert!(f.acquire(&"other", 2).is_some());
        drop(a);
        assert_eq!(f.count(&"ip"), 1);
        drop(b);
        assert_eq!(f.count(&"ip"), 0);
        assert!(f.shards.iter().all(|s| s.lock().is_empty()));
    }

    #[test]
    fn retry_after_rounds_up() {
        assert_eq!(retry_after_secs(Duration::from_millis(1)), 1);
        assert_eq!(retry_after_secs(Duration::ZERO), 1);
        assert_eq!(retry_after_secs(Duration::from_millis(1500)), 2);
        assert_eq!(retry_after_secs(Duration::from_secs(3)), 3);
    }
}
