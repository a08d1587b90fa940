//! Pause gates, one per tenant: the point where a live move (or an operator) holds a
//! tenant's new transactions while the ones already running finish.
//!
//! A session passes the gate when it takes a server connection for a transaction and leaves
//! it when the transaction ends (transaction mode) or the session ends (session mode). While
//! a gate is paused, arrivals wait in a bounded queue; `resume` lets them all go, and each
//! then reads the route afresh, so they continue on whatever pod the route names by then.
//!
//! The hot path is two atomic read-modify-writes per transaction and no lock. Pausing and
//! entering race only through `paused` and `inside`, both `SeqCst`: an entrant increments
//! `inside` and then reads `paused`; the pauser sets `paused` and then reads `inside`. One of
//! the two always sees the other, so no transaction starts unseen after `pause` returns.

use parking_lot::Mutex;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Notify;
use tokio::time::Instant;

#[derive(Debug, Default)]
pub struct PauseGate {
    paused: AtomicBool,
    /// Sessions inside a transaction (holding a pass).
    inside: AtomicUsize,
    /// Sessions waiting for `resume`.
    waiting: AtomicUsize,
    resumed: Notify,
    emptied: Notify,
    /// Wakes session-mode sessions idle between transactions when a pause starts.
    pausing: Notify,
    /// Who paused, for messages: "a live move", "an operator".
    reason: Mutex<&'static str>,
}

/// Proof of having passed a gate; leaving happens on drop, so every path out of a
/// transaction (release, a lost server, a client gone) leaves exactly once.
#[derive(Debug)]
pub struct GatePass {
    gate: Arc<PauseGate>,
}

impl Drop for GatePass {
    fn drop(&mut self) {
        if self.gate.inside.fetch_sub(1, SeqCst) == 1 && self.gate.paused.load(SeqCst) {
            self.gate.emptied.notify_waiters();
        }
    }
}

/// Why a session could not pass a paused gate.
#[derive(Debug, PartialEq, Eq)]
pub enum Held {
    /// The queue of held sessions is full.
    QueueFull { limit: usize, reason: &'static str },
    /// Still paused after waiting this long.
    TimedOut {
        waited: Duration,
        reason: &'static str,
    },
}

impl PauseGate {
    pub fn is_paused(&self) -> bool {
        self.paused.load(SeqCst)
    }

    /// Who paused it (meaningful while paused).
    pub fn reason(&self) -> &'static str {
        *self.reason.lock()
    }

    /// Sessions inside a transaction right now.
    pub fn inside(&self) -> usize {
        self.inside.load(SeqCst)
    }

    /// Sessions held, waiting for `resume`.
    pub fn waiting(&self) -> usize {
        self.waiting.load(SeqCst)
    }

    /// Passes the gate: at once when it is open, else after `resume`. Waits at most `hold`,
    /// and refuses at once when `max_waiting` sessions already wait.
    pub async fn enter(
        self: &Arc<Self>,
        hold: Duration,
        max_waiting: usize,
    ) -> Result<GatePass, Held> {
        if let Some(pass) = self.try_enter() {
            return Ok(pass);
        }
        let started = Instant::now();
        if self.waiting.fetch_add(1, SeqCst) >= max_waiting {
            self.waiting.fetch_sub(1, SeqCst);
            return Err(Held::QueueFull {
                limit: max_waiting,
                reason: *self.reason.lock(),
            });
        }
        let _waiting = Waiting(self);
        loop {
            let resumed = self.resumed.notified();
            tokio::pin!(resumed);
            resumed.as_mut().enable();
            if let Some(pass) = self.try_enter() {
                return Ok(pass);
            }
            if tokio::time::timeout_at(started + hold, resumed)
                .await
                .is_err()
            {
                if let Some(pass) = self.try_enter() {
                    return Ok(pass);
                }
                return Err(Held::TimedOut {
                    waited: started.elapsed(),
                    reason: *self.reason.lock(),
                });
            }
        }
    }

    /// Passes an open gate; None while it is paused.
    pub fn try_enter(self: &Arc<Self>) -> Option<GatePass> {
        if self.paused.load(SeqCst) {
            return None;
        }
        self.inside.fetch_add(1, SeqCst);
        let pass = GatePass { gate: self.clone() };
        if self.paused.load(SeqCst) {
            return None; // dropping the pass leaves again (and wakes a pauser if last)
        }
        Some(pass)
    }

    /// Closes the gate to new transactions. Those already inside carry on; see [`drained`].
    pub fn pause(&self, reason: &'static str) {
        *self.reason.lock() = reason;
        self.paused.store(true, SeqCst);
        self.pausing.notify_waiters();
    }

    /// Completes when a pause starts after this call (see [`Notify::notified`]); check
    /// [`is_paused`](Self::is_paused) after creating it to cover one already under way.
    pub fn pausing(&self) -> tokio::sync::futures::Notified<'_> {
        self.pausing.notified()
    }

    /// Waits until no session is inside a transaction, or `deadline`; true when drained.
    pub async fn drained(&self, deadline: Instant) -> bool {
        loop {
            let emptied = self.emptied.notified();
            tokio::pin!(emptied);
            emptied.as_mut().enable();
            if self.inside.load(SeqCst) == 0 {
                return true;
            }
            if tokio::time::timeout_at(deadline, emptied).await.is_err() {
                return self.inside.load(SeqCst) == 0;
            }
        }
    }

    /// Opens the gate and releases every held session.
    pub fn resume(&self) {
        self.paused.store(false, SeqCst);
        self.resumed.notify_waiters();
    }
}

struct Waiting<'a>(&'a PauseGate);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.waiting.fetch_sub(1, SeqCst);
    }
}

/// Every tenant's gate, created on first use and kept while the process lives (one small
/// struct per tenant ever served).
#[derive(Debug, Default)]
pub struct PauseGates {
    gates: Mutex<HashMap<String, Arc<PauseGate>>>,
}

impl PauseGates {
    pub fn get(&self, tenant: &str) -> Arc<PauseGate> {
        let mut gates = self.gates.lock();
        if let Some(g) = gates.get(tenant) {
            return g.clone();
        }
        let g = Arc::new(PauseGate::default());
        gates.insert(tenant.to_owned(), g.clone());
        g
    }

    /// Tenants whose gate is paused now.
    pub fn paused(&self) -> Vec<String> {
        self.gates
            .lock()
            .iter()
            .filter(|(_, g)| g.is_paused())
            .map(|(t, _)| t.clone())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOLD: Duration = Duration::from_secs(5);

    #[tokio::test]
    async fn an_open_gate_lets_everyone_through() {
        let g = Arc::new(PauseGate::default());
        let a = g.enter(HOLD, 10).await.unwrap();
        let b = g.enter(HOLD, 10).await.unwrap();
        assert_eq!(g.inside(), 2);
        drop((a, b));
        assert_eq!(g.inside(), 0);
    }

    #[tokio::test]
    async fn pause_waits_for_running_transactions_and_holds_new_ones() {
        let g = Arc::new(PauseGate::default());
        let running = g.enter(HOLD, 10).await.unwrap();
        g.pause("a test");
        // A new arrival is held.
        let g2 = g.clone();
        let held = tokio::spawn(async move { g2.enter(HOLD, 10).await.map(|_| Instant::now()) });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(g.waiting(), 1);
        // Not drained while one is inside; drained as soon as it leaves.
        assert!(!g.drained(Instant::now() + Duration::from_millis(50)).await);
        let g3 = g.clone();
        let drain = tokio::spawn(async move { g3.drained(Instant::now() + HOLD).await });
        tokio::time::sleep(Duration::from_millis(20)).await;
        drop(running);
        assert!(drain.await.unwrap());
        let resumed_at = Instant::now();
        g.resume();
        let passed_at = held
            .await
            .unwrap()
            .expect("held session passes after resume");
        assert!(passed_at >= resumed_at);
        assert_eq!(g.waiting(), 0);
    }

    #[tokio::test]
    async fn the_queue_is_bounded_and_the_hold_has_a_deadline() {
        let g = Arc::new(PauseGate::default());
        g.pause("an operator");
        let g2 = g.clone();
        let first = tokio::spawn(async move { g2.enter(Duration::from_millis(100), 1).await });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(
            g.enter(HOLD, 1).await.unwrap_err(),
            Held::QueueFull {
                limit: 1,
                reason: "an operator"
            }
        );
        match first.await.unwrap() {
            Err(Held::TimedOut { waited, reason }) => {
                assert!(waited >= Duration::from_millis(100));
                assert_eq!(reason, "an operator");
            }
            other => panic!("expected a timeout, got {other:?}"),
        }
        assert_eq!(g.inside(), 0);
        assert_eq!(g.waiting(), 0);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn no_entrant_slips_past_a_pause() {
        // Many entrants race one pauser: after drained() returns, nobody may be inside.
        for _ in 0..50 {
            let g = Arc::new(PauseGate::default());
            let holding = Arc::new(AtomicUsize::new(0));
            let mut tasks = Vec::new();
            for _ in 0..8 {
                let (g, holding) = (g.clone(), holding.clone());
                tasks.push(tokio::spawn(async move {
                    for _ in 0..200 {
                        if let Some(p) = g.try_enter() {
                            holding.fetch_add(1, SeqCst);
                            tokio::task::yield_now().await;
                            holding.fetch_sub(1, SeqCst);
                            drop(p);
                        }
                        tokio::task::yield_now().await;
                    }
                }));
            }
            tokio::task::yield_now().await;
            g.pause("a test");
            assert!(g.drained(Instant::now() + HOLD).await);
            for _ in 0..20 {
                assert_eq!(
                    holding.load(SeqCst),
                    0,
                    "a transaction started after the pause"
                );
                tokio::task::yield_now().await;
            }
            assert!(g.try_enter().is_none());
            g.resume();
            for t in tasks {
                t.await.unwrap();
            }
        }
    }
}
