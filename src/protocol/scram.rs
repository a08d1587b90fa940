//! SCRAM-SHA-256 (RFC 5802 / 7677) as Postgres uses it, both halves:
//!
//! * [`ServerExchange`] authenticates a client against a stored verifier
//!   (`SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>`). A successful exchange
//!   yields the client's `ClientKey`, recovered from its proof.
//! * [`ClientKeyExchange`] authenticates the router to a pod *with that ClientKey* instead of
//!   a password ("SCRAM pass-through"): the pod holds the same verifier, so the key the client
//!   proved it knows is exactly what the pod asks for. The router never sees or stores a
//!   plaintext password, and the catalog holds verifiers only.
//!
//! Channel binding (`SCRAM-SHA-256-PLUS`) is not offered: the router terminates TLS itself,
//! so a client-to-pod binding could not hold anyway.

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use hmac::{Hmac, Mac};
use rand::RngCore;
use sha2::{Digest, Sha256};
use thiserror::Error;

type HmacSha256 = Hmac<Sha256>;

pub const MECHANISM: &str = "SCRAM-SHA-256";
const NONCE_LEN: usize = 18;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum ScramError {
    #[error("malformed SCRAM verifier: {0}")]
    Verifier(&'static str),
    #[error("malformed SCRAM message: {0}")]
    Message(&'static str),
    #[error("channel binding is not supported by podrouter; connect with channel_binding=disable or prefer")]
    ChannelBinding,
    #[error("SCRAM proof does not match")]
    BadProof,
    #[error(
        "the pod's SCRAM salt or iteration count differs from the catalog's verifier for this role"
    )]
    VerifierMismatch,
    #[error("the pod's SCRAM server signature is wrong")]
    BadServerSignature,
}

/// A parsed SCRAM-SHA-256 verifier, as stored in `pg_authid.rolpassword` and the catalog.
#[derive(Clone, PartialEq, Eq)]
pub struct Verifier {
    pub iterations: u32,
    pub salt: Vec<u8>,
    pub stored_key: [u8; 32],
    pub server_key: [u8; 32],
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Verifier")
            .field("iterations", &self.iterations)
            .finish_non_exhaustive()
    }
}

impl Verifier {
    pub fn parse(s: &str) -> Result<Self, ScramError> {
        let rest = s
            .strip_prefix("SCRAM-SHA-256$")
            .ok_or(ScramError::Verifier("must start with SCRAM-SHA-256$"))?;
        let (params, keys) = rest
            .split_once('$')
            .ok_or(ScramError::Verifier("missing keys"))?;
        let (iter, salt) = params
            .split_once(':')
            .ok_or(ScramError::Verifier("missing salt"))?;
        let (stored, server) = keys
            .split_once(':')
            .ok_or(ScramError::Verifier("missing server key"))?;
        let iterations: u32 = iter
            .parse()
            .map_err(|_| ScramError::Verifier("bad iteration count"))?;
        if iterations == 0 {
            return Err(ScramError::Verifier("iteration count must be positive"));
        }
        let salt = B64
            .decode(salt)
            .map_err(|_| ScramError::Verifier("salt is not base64"))?;
        Ok(Verifier {
            iterations,
            salt,
            stored_key: key32(stored)?,
            server_key: key32(server)?,
        })
    }

    /// A verifier for `password` with a fresh random salt (Postgres' defaults: 4096 rounds).
    pub fn generate(password: &str) -> String {
        postgres_protocol::password::scram_sha_256(password.as_bytes())
    }

    /// A verifier no proof can match, with a salt derived from the user name, so that an
    /// unknown role runs through the same exchange as a known one (as Postgres' "mock"
    /// authentication does) and cannot be told apart by its answers.
    pub fn mock(user: &str, secret: &[u8]) -> Self {
        let salt = hmac(secret, user.as_bytes())[..16].to_vec();
        let mut stored_key = [0u8; 32];
        let mut server_key = [0u8; 32];
        rand::thread_rng().fill_bytes(&mut stored_key);
        rand::thread_rng().fill_bytes(&mut server_key);
        Verifier {
            iterations: 4096,
            salt,
            stored_key,
            server_key,
        }
    }
}

fn key32(b64: &str) -> Result<[u8; 32], ScramError> {
    B64.decode(b64)
        .ok()
        .and_then(|v| <[u8; 32]>::try_from(v.as_slice()).ok())
        .ok_or(ScramError::Verifier("key is not 32 bytes of base64"))
}

fn hmac(key: &[u8], msg: &[u8]) -> [u8; 32] {
    let mut mac = HmacSha256::new_from_slice(key).expect("HMAC takes any key length");
    mac.update(msg);
    mac.finalize().into_bytes().into()
}

fn sha256(data: &[u8]) -> [u8; 32] {
    Sha256::digest(data).into()
}

fn xor32(a: &[u8; 32], b: &[u8; 32]) -> [u8; 32] {
    std::array::from_fn(|i| a[i] ^ b[i])
}

fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn nonce() -> String {
    let mut raw = [0u8; NONCE_LEN];
    rand::thread_rng().fill_bytes(&mut raw);
    B64.encode(raw)
}

/// `k=v` attributes of a SCRAM message, in order.
fn attr(part: Option<&str>, key: char) -> Result<&str, ScramError> {
    part.and_then(|p| p.strip_prefix(key)?.strip_prefix('='))
        .ok_or(ScramError::Message("unexpected attribute"))
}

// === impl ServerExchange ===

/// The server side of one SCRAM exchange with a client.
pub struct ServerExchange {
    verifier: Verifier,
    gs2_header: String,
    client_first_bare: String,
    server_first: String,
    nonce: String,
}

impl ServerExchange {
    /// Takes the client-first message; returns the exchange and the server-first message.
    pub fn start(verifier: Verifier, client_first: &[u8]) -> Result<(Self, String), ScramError> {
        let msg =
            std::str::from_utf8(client_first).map_err(|_| ScramError::Message("not UTF-8"))?;
        // gs2-header: cbind-flag "," [authzid] ","
        let mut parts = msg.splitn(3, ',');
        let flag = parts.next().ok_or(ScramError::Message("empty"))?;
        match flag {
            "n" | "y" => {}
            f if f.starts_with("p=") => return Err(ScramError::ChannelBinding),
            _ => return Err(ScramError::Message("bad channel binding flag")),
        }
        let authzid = parts.next().ok_or(ScramError::Message("missing authzid"))?;
        if !authzid.is_empty() {
            return Err(ScramError::Message(
                "authorization identities are not supported",
            ));
        }
        let bare = parts
            .next()
            .ok_or(ScramError::Message("missing client-first-bare"))?;
        let mut attrs = bare.split(',');
        // Postgres ignores the SCRAM user name (the startup packet's user counts).
        let _user = attr(attrs.next(), 'n')?;
        let client_nonce = attr(attrs.next(), 'r')?;
        if client_nonce.is_empty()
            || !client_nonce
                .bytes()
                .all(|b| (0x21..=0x7e).contains(&b) && b != b',')
        {
            return Err(ScramError::Message("bad client nonce"));
        }
        let nonce = format!("{client_nonce}{}", self::nonce());
        let server_first = format!(
            "r={nonce},s={},i={}",
            B64.encode(&verifier.salt),
            verifier.iterations
        );
        let ex = ServerExchange {
            verifier,
            gs2_header: format!("{flag},{authzid},"),
            client_first_bare: bare.to_owned(),
            server_first: server_first.clone(),
            nonce,
        };
        Ok((ex, server_first))
    }

    /// Takes the client-final message. On success returns the server-final message and the
    /// client's ClientKey (for pass-through to pods).
    pub fn finish(self, client_final: &[u8]) -> Result<(String, [u8; 32]), ScramError> {
        let msg =
            std::str::from_utf8(client_final).map_err(|_| ScramError::Message("not UTF-8"))?;
        let (without_proof, proof) = msg
            .rsplit_once(",p=")
            .ok_or(ScramError::Message("missing proof"))?;
        let mut attrs = without_proof.split(',');
        let binding = attr(attrs.next(), 'c')?;
        if binding != B64.encode(&self.gs2_header) {
            return Err(ScramError::ChannelBinding);
        }
        if attr(attrs.next(), 'r')? != self.nonce {
            return Err(ScramError::Message("nonce mismatch"));
        }
        let proof: [u8; 32] = B64
            .decode(proof)
            .ok()
            .and_then(|v| v.try_into().ok())
            .ok_or(ScramError::Message("proof is not 32 bytes of base64"))?;
        let auth_message = format!(
            "{},{},{}",
            self.client_first_bare, self.server_first, without_proof
        );
        let client_signature = hmac(&self.verifier.stored_key, auth_message.as_bytes());
        let client_key = xor32(&proof, &client_signature);
        if !ct_eq(&sha256(&client_key), &self.verifier.stored_key) {
            return Err(ScramError::BadProof);
        }
        let server_signature = hmac(&self.verifier.server_key, auth_message.as_bytes());
        Ok((format!("v={}", B64.encode(server_signature)), client_key))
    }
}

// === impl ClientKeyExchange ===

/// The client side of SCRAM, proving knowledge of a ClientKey rather than a password.
pub struct ClientKeyExchange {
    client_key: [u8; 32],
    expected: Verifier,
    client_first_bare: String,
    state: ClientState,
}

enum ClientState {
    AwaitFirst { nonce: String },
    AwaitFinal { auth_message: String },
    Done,
}

impl ClientKeyExchange {
    /// `expected` is the catalog's verifier for the role: the pod must use the same salt and
    /// iteration count, or the ClientKey cannot work there.
    pub fn new(client_key: [u8; 32], expected: Verifier) -> Self {
        let nonce = nonce();
        ClientKeyExchange {
            client_key,
            expected,
            client_first_bare: format!("n=,r={nonce}"),
            state: ClientState::AwaitFirst { nonce },
        }
    }

    pub fn client_first(&self) -> String {
        format!("n,,{}", self.client_first_bare)
    }

    /// Takes server-first, returns client-final.
    pub fn respond(&mut self, server_first: &[u8]) -> Result<String, ScramError> {
        let ClientState::AwaitFirst { nonce } = &self.state else {
            return Err(ScramError::Message("unexpected server-first"));
        };
        let msg =
            std::str::from_utf8(server_first).map_err(|_| ScramError::Message("not UTF-8"))?;
        let mut attrs = msg.split(',');
        let server_nonce = attr(attrs.next(), 'r')?;
        let salt = B64
            .decode(attr(attrs.next(), 's')?)
            .map_err(|_| ScramError::Message("bad salt"))?;
        let iterations: u32 = attr(attrs.next(), 'i')?
            .parse()
            .map_err(|_| ScramError::Message("bad iterations"))?;
        if !server_nonce.starts_with(nonce.as_str()) || server_nonce.len() == nonce.len() {
            return Err(ScramError::Message("server nonce does not extend ours"));
        }
        if salt != self.expected.salt || iterations != self.expected.iterations {
            return Err(ScramError::VerifierMismatch);
        }
        let without_proof = format!("c=biws,r={server_nonce}");
        let auth_message = format!("{},{},{}", self.client_first_bare, msg, without_proof);
        let stored_key = sha256(&self.client_key);
        let proof = xor32(
            &self.client_key,
            &hmac(&stored_key, auth_message.as_bytes()),
        );
        self.state = ClientState::AwaitFinal { auth_message };
        Ok(format!("{without_proof},p={}", B64.encode(proof)))
    }

    /// Checks server-final.
    pub fn verify(&mut self, server_final: &[u8]) -> Result<(), ScramError> {
        let ClientState::AwaitFinal { auth_message } = &self.state else {
            return Err(ScramError::Message("unexpected server-final"));
        };
        let msg =
            std::str::from_utf8(server_final).map_err(|_| ScramError::Message("not UTF-8"))?;
        let sig = B64
            .decode(attr(Some(msg), 'v')?)
            .map_err(|_| ScramError::Message("bad server signature"))?;
        let expected = hmac(&self.expected.server_key, auth_message.as_bytes());
        if !ct_eq(&sig, &expected) {
            return Err(ScramError::BadServerSignature);
        }
        self.state = ClientState::Done;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};

    /// Runs our server side against postgres-protocol's client (the one tokio-postgres uses).
    fn exchange(verifier: &str, password: &str) -> Result<[u8; 32], ScramError> {
        let mut client = ScramSha256::new(password.as_bytes(), ChannelBinding::unsupported());
        let (server, first) = ServerExchange::start(Verifier::parse(verifier)?, client.message())?;
        client.update(first.as_bytes()).unwrap();
        let (fin, key) = server.finish(client.message())?;
        client
            .finish(fin.as_bytes())
            .expect("client accepts our server signature");
        Ok(key)
    }

    #[test]
    fn right_password_passes_and_wrong_fails() {
        let v = Verifier::generate("s3cret");
        assert!(exchange(&v, "s3cret").is_ok());
        assert_eq!(exchange(&v, "s3cret!"), Err(ScramError::BadProof));
    }

    #[test]
    fn client_key_passes_through_to_a_server_with_the_same_verifier() {
        let v = Verifier::generate("pw");
        let key = exchange(&v, "pw").unwrap();
        // Now the router plays client with the key against a "pod" holding the same verifier.
        let mut router = ClientKeyExchange::new(key, Verifier::parse(&v).unwrap());
        let (pod, first) = ServerExchange::start(
            Verifier::parse(&v).unwrap(),
            router.client_first().as_bytes(),
        )
        .unwrap();
        let fin = router.respond(first.as_bytes()).unwrap();
        let (server_final, key2) = pod.finish(fin.as_bytes()).unwrap();
        assert_eq!(key, key2);
        router.verify(server_final.as_bytes()).unwrap();
    }

    #[test]
    fn pass_through_refuses_a_pod_with_another_salt() {
        let v = Verifier::generate("pw");
        let other = Verifier::generate("pw");
        let key = exchange(&v, "pw").unwrap();
        let mut router = ClientKeyExchange::new(key, Verifier::parse(&v).unwrap());
        let (_pod, first) = ServerExchange::start(
            Verifier::parse(&other).unwrap(),
            router.client_first().as_bytes(),
        )
        .unwrap();
        assert_eq!(
            router.respond(first.as_bytes()),
            Err(ScramError::VerifierMismatch)
        );
    }

    #[test]
    fn mock_verifier_never_matches_and_is_stable_per_user() {
        let m1 = Verifier::mock("ghost", b"k");
        let m2 = Verifier::mock("ghost", b"k");
        assert_eq!(m1.salt, m2.salt);
        let mut client = ScramSha256::new(b"anything", ChannelBinding::unsupported());
        let (server, first) = ServerExchange::start(m1, client.message()).unwrap();
        client.update(first.as_bytes()).unwrap();
        assert_eq!(
            server.finish(client.message()).err(),
            Some(ScramError::BadProof)
        );
    }

    #[test]
    fn rejects_malformed_verifiers_and_messages() {
        for bad in [
            "",
            "md5abc",
            "SCRAM-SHA-256$x:AAAA$AA:AA",
            "SCRAM-SHA-256$4096:AAAA$AA==:AA==",
        ] {
            assert!(Verifier::parse(bad).is_err(), "{bad}");
        }
        let v = Verifier::parse(&Verifier::generate("pw")).unwrap();
        for bad in [
            &b"p=tls-server-end-point,,n=,r=abc"[..],
            b"n,,r=abc",
            b"x,,n=,r=a",
            b"n,,n=,r=",
            b"\xff",
        ] {
            assert!(ServerExchange::start(v.clone(), bad).is_err(), "{bad:?}");
        }
    }
}
