//! TLS with clients and with pods, set up once at start from `[tls]` (its fields are
//! restart-only): the rustls acceptor for clients that send an SSLRequest, and the
//! connector and SSLRequest negotiation for server connections to pods.
//!
//! Config validation calls [`TlsSetup::load`] too, so a config that passes `podrouter
//! config check` is one whose certificates and keys actually load.

use super::server::ServerError;
use super::stream::{MaybeTls, ServerStream};
use crate::config::{ClientTlsMode, PodTlsMode, TlsConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::rustls::client::danger::{
    HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier,
};
use tokio_rustls::rustls::crypto::{self, CryptoProvider};
use tokio_rustls::rustls::{
    self, ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig, SignatureScheme,
};
use tokio_rustls::{TlsAcceptor, TlsConnector};

/// The SSLRequest code (1234 << 16 | 5679).
const SSL_REQUEST_CODE: i32 = 80_877_103;

/// A `[tls]` field that cannot be used, with what to do about it.
#[derive(Debug, thiserror::Error)]
#[error("{field}: {problem}; {fix}")]
pub struct TlsError {
    pub field: &'static str,
    pub problem: String,
    pub fix: String,
}

fn tls_error(field: &'static str, problem: impl Into<String>, fix: &str) -> TlsError {
    TlsError {
        field,
        problem: problem.into(),
        fix: fix.to_owned(),
    }
}

/// What the router offers clients.
#[derive(Clone, Default)]
pub struct ClientTls {
    /// Present when a certificate is configured: SSLRequest is answered 'S'.
    pub acceptor: Option<TlsAcceptor>,
    /// `mode = "require"`: clients that do not encrypt are refused.
    pub required: bool,
}

/// How the router connects to pods.
#[derive(Clone, Default)]
pub struct PodTls {
    pub mode: PodTlsMode,
    connector: Option<TlsConnector>,
}

pub struct TlsSetup {
    pub clients: ClientTls,
    pub pods: PodTls,
}

/// rustls with the `ring` provider, named explicitly so no process-wide default is needed.
fn provider() -> Arc<CryptoProvider> {
    Arc::new(crypto::ring::default_provider())
}

fn resolve(path: &Path, base: Option<&Path>) -> PathBuf {
    match base {
        Some(b) if path.is_relative() => b.join(path),
        _ => path.to_owned(),
    }
}

fn read_pem(field: &'static str, path: &Path, fix: &str) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path)
        .map_err(|e| tls_error(field, format!("cannot read {}: {e}", path.display()), fix))
}

fn certificates(
    field: &'static str,
    path: &Path,
    fix: &str,
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read_pem(field, path, fix)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| tls_error(field, format!("{}: {e}", path.display()), fix))?;
    if certs.is_empty() {
        return Err(tls_error(
            field,
            format!(
                "{} holds no PEM certificate (-----BEGIN CERTIFICATE-----)",
                path.display()
            ),
            fix,
        ));
    }
    Ok(certs)
}

const CERT_FIX: &str = "point it at a PEM certificate chain, leaf first (make one with e.g. `openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 365 -subj /CN=HOST -keyout server.key -out server.crt`)";
const KEY_FIX: &str =
    "point it at the PEM private key (PKCS#8, PKCS#1 or SEC1, unencrypted) of cert_file";
const CA_FIX: &str =
    "point it at the PEM certificate of the CA that signed each pod's ssl_cert_file";

impl TlsSetup {
    /// Builds the rustls configs from `[tls]` (relative paths against `base`, the config
    /// file's directory). No `[tls]` section: no TLS either way.
    pub fn load(tls: Option<&TlsConfig>, base: Option<&Path>) -> Result<TlsSetup, TlsError> {
        let Some(tls) = tls else {
            return Ok(TlsSetup {
                clients: ClientTls::default(),
                pods: PodTls::default(),
            });
        };
        let acceptor = match (&tls.cert_file, &tls.key_file) {
            (Some(cert), Some(key)) => {
                let chain = certificates("tls.cert_file", &resolve(cert, base), CERT_FIX)?;
                let key_path = resolve(key, base);
                let pem = read_pem("tls.key_file", &key_path, KEY_FIX)?;
                let key = PrivateKeyDer::from_pem_slice(&pem).map_err(|e| {
                    tls_error(
                        "tls.key_file",
                        format!(
                            "{} holds no usable PEM private key: {e}",
                            key_path.display()
                        ),
                        KEY_FIX,
                    )
                })?;
                let config = ServerConfig::builder_with_provider(provider())
                    .with_safe_default_protocol_versions()
                    .expect("ring supports the default TLS versions")
                    .with_no_client_auth()
                    .with_single_cert(chain, key)
                    .map_err(|e| {
                        tls_error(
                            "tls.key_file",
                            format!("does not fit cert_file: {e}"),
                            "use the private key that the certificate in cert_file was made for",
                        )
                    })?;
                Some(TlsAcceptor::from(Arc::new(config)))
            }
            (None, None) => None,
            (Some(_), None) => {
                return Err(tls_error(
                    "tls.key_file",
                    "missing while cert_file is set",
                    KEY_FIX,
                ))
            }
            (None, Some(_)) => {
                return Err(tls_error(
                    "tls.cert_file",
                    "missing while key_file is set",
                    CERT_FIX,
                ))
            }
        };
        if tls.mode == ClientTlsMode::Require && acceptor.is_none() {
            return Err(tls_error(
                "tls.mode",
                "\"require\" needs a certificate, but cert_file and key_file are not set",
                "set cert_file and key_file, or use mode = \"prefer\"",
            ));
        }
        let connector = match (tls.pod_tls, &tls.pod_ca_file) {
            (PodTlsMode::VerifyFull, Some(ca)) => {
                let mut roots = RootCertStore::empty();
                for cert in certificates("tls.pod_ca_file", &resolve(ca, base), CA_FIX)? {
                    roots.add(cert).map_err(|e| {
                        tls_error(
                            "tls.pod_ca_file",
                            format!("not a usable CA certificate: {e}"),
                            CA_FIX,
                        )
                    })?;
                }
                Some(client_config(
                    ClientConfig::builder_with_provider(provider())
                        .with_safe_default_protocol_versions()
                        .expect("ring supports the default TLS versions")
                        .with_root_certificates(roots),
                ))
            }
            (PodTlsMode::VerifyFull, None) => {
                return Err(tls_error(
                    "tls.pod_ca_file",
                    "missing while pod_tls = \"verify-full\"",
                    CA_FIX,
                ))
            }
            (_, Some(_)) => {
                return Err(tls_error(
                    "tls.pod_ca_file",
                    format!(
                        "is only used with pod_tls = \"verify-full\", not {:?}",
                        tls.pod_tls.to_string()
                    ),
                    "set pod_tls = \"verify-full\" to verify the pods' certificates, or remove pod_ca_file",
                ))
            }
            (PodTlsMode::Disable, None) => None,
            (PodTlsMode::Prefer | PodTlsMode::Require, None) => Some(client_config(
                ClientConfig::builder_with_provider(provider())
                    .with_safe_default_protocol_versions()
                    .expect("ring supports the default TLS versions")
                    .dangerous()
                    .with_custom_certificate_verifier(Arc::new(EncryptOnlyVerifier(provider()))),
            )),
        };
        Ok(TlsSetup {
            clients: ClientTls {
                acceptor,
                required: tls.mode == ClientTlsMode::Require,
            },
            pods: PodTls {
                mode: tls.pod_tls,
                connector,
            },
        })
    }

    /// [`load`](Self::load), or, should the files have broken since validation read them, a
    /// setup that fails closed: no client TLS offered (so `require` refuses everyone) and no
    /// pod TLS (so pods that need it cannot be reached); the error is logged.
    pub fn load_or_fail_closed(tls: Option<&TlsConfig>, base: Option<&Path>) -> TlsSetup {
        TlsSetup::load(tls, base).unwrap_or_else(|e| {
            tracing::error!("TLS cannot be set up: {e}; TLS connections fail until a restart");
            TlsSetup {
                clients: ClientTls {
                    acceptor: None,
                    required: tls.is_some_and(|t| t.mode == ClientTlsMode::Require),
                },
                pods: PodTls {
                    mode: tls.map(|t| t.pod_tls).unwrap_or_default(),
                    connector: None,
                },
            }
        })
    }
}

fn client_config(
    builder: rustls::ConfigBuilder<ClientConfig, rustls::client::WantsClientCert>,
) -> TlsConnector {
    TlsConnector::from(Arc::new(builder.with_no_client_auth()))
}

impl PodTls {
    /// Negotiates encryption on a fresh connection to a pod, as libpq does for the same
    /// sslmode: SSLRequest, then a TLS handshake on 'S'; on 'N' plain text for `prefer`
    /// and an error otherwise.
    pub async fn negotiate(
        &self,
        mut tcp: TcpStream,
        host: &str,
    ) -> Result<ServerStream, ServerError> {
        if self.mode == PodTlsMode::Disable {
            return Ok(MaybeTls::Plain(tcp));
        }
        let Some(connector) = &self.connector else {
            return Err(ServerError::Tls(
                "TLS to pods is not set up (see the router's log)".into(),
            ));
        };
        let name = ServerName::try_from(host.to_owned()).map_err(|e| {
            ServerError::Tls(format!(
                "{host:?} cannot be checked against a certificate: {e}"
            ))
        })?;
        let mut request = [0u8; 8];
        request[..4].copy_from_slice(&8i32.to_be_bytes());
        request[4..].copy_from_slice(&SSL_REQUEST_CODE.to_be_bytes());
        tcp.write_all(&request).await?;
        // Exactly one byte: anything the pod sent after it would be unencrypted data
        // injected before the handshake (CVE-2021-23222), which rustls then rejects.
        match tcp.read_u8().await? {
            b'S' => {
                let tls = connector
                    .connect(name, tcp)
                    .await
                    .map_err(|e| ServerError::Tls(format!("TLS handshake failed: {e}")))?;
                Ok(MaybeTls::tls(tls))
            }
            b'N' if self.mode == PodTlsMode::Prefer => Ok(MaybeTls::Plain(tcp)),
            b'N' => Err(ServerError::Tls(format!(
                "the pod does not accept TLS connections, but tls.pod_tls = \"{}\"; turn on ssl on the pod or set pod_tls = \"prefer\"",
                self.mode
            ))),
            other => Err(ServerError::Protocol(format!(
                "unexpected answer {other:#04x} to SSLRequest"
            ))),
        }
    }
}

// === impl EncryptOnlyVerifier ===

/// For `pod_tls = "prefer" | "require"`: encrypts without checking who is at the other end.
/// Any certificate is accepted, like libpq's sslmode=require without a root certificate;
/// only the handshake signatures are checked (so the session keys belong to the key in the
/// certificate offered). This protects against passive eavesdropping, not against an active
/// man in the middle; `verify-full` (with `pod_ca_file`) does that.
#[derive(Debug)]
struct EncryptOnlyVerifier(Arc<CryptoProvider>);

impl ServerCertVerifier for EncryptOnlyVerifier {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}
