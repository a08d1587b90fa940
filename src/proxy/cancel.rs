//! Cancel requests. Each client gets a router-made (pid, secret) in its BackendKeyData; the
//! registry maps it to whichever server backend the client is using right now, so a cancel
//! reaches the right backend on the right pod even though server connections are shared.

use bytes::BytesMut;
use parking_lot::Mutex;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BackendTarget {
    pub addr: SocketAddr,
    pub pid: i32,
    pub secret: i32,
}

/// The server backend a client is attached to, if any.
#[derive(Debug, Default)]
pub struct CancelSlot(Mutex<Option<BackendTarget>>);

impl CancelSlot {
    pub fn attach(&self, t: BackendTarget) {
        *self.0.lock() = Some(t);
    }
    pub fn detach(&self) {
        *self.0.lock() = None;
    }
    pub fn current(&self) -> Option<BackendTarget> {
        *self.0.lock()
    }
}

#[derive(Default)]
pub struct CancelRegistry {
    clients: Mutex<HashMap<i32, (i32, Arc<CancelSlot>)>>,
}

/// Removes the client's entry when its session ends.
pub struct Registration<'a> {
    registry: &'a CancelRegistry,
    pub pid: i32,
    pub secret: i32,
    pub slot: Arc<CancelSlot>,
}

impl Drop for Registration<'_> {
    fn drop(&mut self) {
        self.registry.clients.lock().remove(&self.pid);
    }
}

impl CancelRegistry {
    pub fn register(&self) -> Registration<'_> {
        let slot = Arc::new(CancelSlot::default());
        let secret: i32 = rand::random();
        let mut map = self.clients.lock();
        let pid = loop {
            // Positive like a real pid, and unique among live clients.
            let pid = rand::random::<i32>() & 0x7fff_ffff;
            if pid != 0 && !map.contains_key(&pid) {
                break pid;
            }
        };
        map.insert(pid, (secret, slot.clone()));
        Registration {
            registry: self,
            pid,
            secret,
            slot,
        }
    }

    /// The backend to cancel for a client's (pid, secret), if the secret matches.
    pub fn lookup(&self, pid: i32, secret: i32) -> Option<BackendTarget> {
        let map = self.clients.lock();
        let (s, slot) = map.get(&pid)?;
        if *s != secret {
            return None;
        }
        slot.current()
    }

    pub fn len(&self) -> usize {
        self.clients.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Sends a CancelRequest to a backend. Best effort, like libpq's: errors are only logged.
pub async fn send_cancel(target: BackendTarget) {
    let mut buf = BytesMut::new();
    postgres_protocol::message::frontend::cancel_request(target.pid, target.secret, &mut buf);
    let res = async {
        let mut s = TcpStream::connect(target.addr).await?;
        s.write_all(&buf).await?;
        s.shutdown().await
    };
    if let Err(e) = tokio::time::timeout(std::time::Duration::from_secs(5), res)
        .await
        .unwrap_or_else(|_| {
            Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "cancel timed out",
            ))
        })
    {
        tracing::debug!(addr = %target.addr, "cancel request not delivered: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lookup_needs_the_right_secret_and_ends_with_the_session() {
        let reg = CancelRegistry::default();
        let target = BackendTarget {
            addr: "127.0.0.1:5432".parse().unwrap(),
            pid: 42,
            secret: 7,
        };
        let (pid, secret) = {
            let r = reg.register();
            r.slot.attach(target);
            assert_eq!(reg.lookup(r.pid, r.secret), Some(target));
            assert_eq!(reg.lookup(r.pid, r.secret.wrapping_add(1)), None);
            r.slot.detach();
            assert_eq!(
                reg.lookup(r.pid, r.secret),
                None,
                "no backend while detached"
            );
            r.slot.attach(target);
            (r.pid, r.secret)
        };
        assert_eq!(reg.lookup(pid, secret), None, "gone once the session ends");
        assert!(reg.is_empty());
    }
}
