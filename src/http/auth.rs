//! HTTP Basic credentials checked against the catalog's SCRAM verifiers, the same ones wire
//! clients authenticate against. A password is checked by running a whole SCRAM exchange in
//! memory (postgres-protocol's client half, with libpq's SASLprep, against our server half),
//! which also yields the ClientKey that pools need to log in to pods by SCRAM pass-through.
//! No password is stored anywhere.
//!
//! That costs PBKDF2 (4096 rounds by default) per check, so successful checks are cached for
//! [`CACHE_FOR`], keyed by an HMAC of user and password under a per-process random key (the
//! cache holds no password, and a changed verifier misses). Checks run on the blocking pool,
//! a few at a time, so a flood of bad passwords cannot starve the async workers.

use crate::protocol::scram::{ServerExchange, Verifier};
use crate::routing::RoleAuth;
use axum::http::{header, HeaderMap};
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use hmac::{Hmac, Mac};
use parking_lot::Mutex;
use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};
use sha2::Sha256;
use std::collections::HashMap;
use std::time::{Duration, Instant};
use tokio::sync::Semaphore;

const CACHE_FOR: Duration = Duration::from_secs(60);
const CACHE_MAX: usize = 10_000;

pub struct Credentials {
    pub user: String,
    pub password: String,
}

/// The `Authorization: Basic` credentials of a request, if well formed.
pub fn basic(headers: &HeaderMap) -> Option<Credentials> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, encoded) = value.trim().split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = String::from_utf8(B64.decode(encoded.trim()).ok()?).ok()?;
    let (user, password) = decoded.split_once(':')?;
    (!user.is_empty()).then(|| Credentials {
        user: user.to_owned(),
        password: password.to_owned(),
    })
}

struct Cached {
    client_key: [u8; 32],
    stored_key: [u8; 32],
    until: Instant,
}

/// Verified logins, briefly remembered.
pub struct Logins {
    cache: Mutex<HashMap<[u8; 32], Cached>>,
    key: [u8; 32],
    checks: Semaphore,
}

impl Default for Logins {
    fn default() -> Self {
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        Logins {
            cache: Mutex::new(HashMap::new()),
            key: rand::random(),
            checks: Semaphore::new(cores),
        }
    }
}

impl Logins {
    fn id(&self, user: &str, password: &str) -> [u8; 32] {
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.key).expect("any key length");
        mac.update(user.as_bytes());
        mac.update(&[0]);
        mac.update(password.as_bytes());
        mac.finalize().into_bytes().into()
    }

    /// The ClientKey when `password` is `role`'s; None otherwise. An unknown role (`None`)
    /// costs the same as a known one, against a mock verifier, and always fails.
    pub async fn verify(
        &self,
        role: Option<&RoleAuth>,
        user: &str,
        password: &str,
        mock_secret: &[u8],
    ) -> Option<[u8; 32]> {
        let id = self.id(user, password);
        if let Some(role) = role {
            let cache = self.cache.lock();
            if let Some(c) = cache.get(&id) {
                if c.stored_key == role.verifier.stored_key && c.until > Instant::now() {
                    return Some(c.client_key);
                }
            }
        }
        let verifier = match role {
            Some(r) => r.verifier.clone(),
            None => Verifier::mock(user, mock_secret),
        };
        let stored_key = verifier.stored_key;
        let _permit = self.checks.acquire().await.ok()?;
        let password = password.to_owned();
        let client_key = tokio::task::spawn_blocking(move || client_key(verifier, &password))
            .await
            .ok()
            .flatten()?;
        role?;
        let mut cache = self.cache.lock();
        if cache.len() >= CACHE_MAX {
            let now = Instant::now();
            cache.retain(|_, c| c.until > now);
            if cache.len() >= CACHE_MAX {
                cache.clear();
            }
        }
        cache.insert(
            id,
            Cached {
                client_key,
                stored_key,
                until: Instant::now() + CACHE_FOR,
            },
        );
        Some(client_key)
    }
}

/// Runs a SCRAM exchange between a client that knows `password` and a server that knows
/// `verifier`; the ClientKey when they agree.
pub fn client_key(verifier: Verifier, password: &str) -> Option<[u8; 32]> {
    let mut client = ScramSha256::new(password.as_bytes(), ChannelBinding::unrequested());
    let (server, server_first) = ServerExchange::start(verifier, client.message()).ok()?;
    client.update(server_first.as_bytes()).ok()?;
    let (_, key) = server.finish(client.message()).ok()?;
    Some(key)
}

#[cfg(test)]
mod tests {
    use super::*;
    use sha2::Digest;

    #[test]
    fn a_password_is_checked_against_its_verifier() {
        let v = Verifier::parse(&Verifier::generate("s3cret")).unwrap();
        let key = client_key(v.clone(), "s3cret").expect("right password");
        assert_eq!(
            <[u8; 32]>::from(sha2::Sha256::digest(key)),
            v.stored_key,
            "the ClientKey hashes to the StoredKey"
        );
        assert!(client_key(v, "wrong").is_none());
    }

    #[test]
    fn basic_credentials() {
        let mut h = HeaderMap::new();
        assert!(basic(&h).is_none());
        h.insert(
            header::AUTHORIZATION,
            "Basic ZGVtbzpkZTptbw==".parse().unwrap(),
        );
        let c = basic(&h).unwrap();
        assert_eq!((c.user.as_str(), c.password.as_str()), ("demo", "de:mo"));
        h.insert(header::AUTHORIZATION, "Bearer x".parse().unwrap());
        assert!(basic(&h).is_none());
    }

    #[tokio::test]
    async fn verified_logins_are_cached_until_the_verifier_changes() {
        let logins = Logins::default();
        let role = RoleAuth {
            name: "app".into(),
            verifier: Verifier::parse(&Verifier::generate("pw")).unwrap(),
        };
        assert!(logins
            .verify(Some(&role), "app", "pw", b"x")
            .await
            .is_some());
        assert!(logins
            .verify(Some(&role), "app", "nope", b"x")
            .await
            .is_none());
        assert!(logins.verify(None, "app", "pw", b"x").await.is_none());
        assert_eq!(logins.cache.lock().len(), 1);
        let changed = RoleAuth {
            name: "app".into(),
            verifier: Verifier::parse(&Verifier::generate("other")).unwrap(),
        };
        assert!(logins
            .verify(Some(&changed), "app", "pw", b"x")
            .await
            .is_none());
    }
}
