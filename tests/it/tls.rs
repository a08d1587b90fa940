//! TLS end to end: clients to the router (tokio-postgres over rustls, and psql), the router to
//! pods (real Postgres with ssl = on), and the refusals. Certificates are made here with
//! rcgen: a CA, and a server certificate for localhost / 127.0.0.1 signed by it.

use crate::support::*;
use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair, KeyUsagePurpose};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tokio_rustls::rustls;

/// A CA and a server certificate it signed, as PEM files in `dir`.
struct Certs {
    ca: PathBuf,
    cert: PathBuf,
    key: PathBuf,
    ca_pem: String,
}

fn make_certs(dir: &Path, prefix: &str) -> Certs {
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, format!("{prefix} test CA"));
    let ca_key = KeyPair::generate().unwrap();
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca_params, ca_key);

    let mut params =
        CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()]).unwrap();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "localhost");
    let key = KeyPair::generate().unwrap();
    let cert = params.signed_by(&key, &issuer).unwrap();

    let certs = Certs {
        ca: dir.join(format!("{prefix}-ca.crt")),
        cert: dir.join(format!("{prefix}-server.crt")),
        key: dir.join(format!("{prefix}-server.key")),
        ca_pem: ca_cert.pem(),
    };
    std::fs::write(&certs.ca, &certs.ca_pem).unwrap();
    std::fs::write(&certs.cert, cert.pem()).unwrap();
    std::fs::write(&certs.key, key.serialize_pem()).unwrap();
    // Postgres insists on a private key only its own OS user can read.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&certs.key, std::fs::Permissions::from_mode(0o600)).unwrap();
    podrouter::localpg::chown_for_server(&certs.key).unwrap();
    certs
}

fn pod_ssl_settings(c: &Certs) -> Vec<(&'static str, String)> {
    vec![
        ("ssl", "on".into()),
        ("ssl_cert_file", c.cert.display().to_string()),
        ("ssl_key_file", c.key.display().to_string()),
    ]
}

fn tls_section(lines: &str) -> String {
    format!("\n[tls]\n{lines}")
}

/// A tokio-postgres TLS connector that trusts only `ca_pem` and checks the host name.
fn connector(ca_pem: &str) -> tokio_postgres_rustls::MakeRustlsConnect {
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls::pki_types::CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(c.unwrap()).unwrap();
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    tokio_postgres_rustls::MakeRustlsConnect::new(config)
}

async fn connect_tls(
    url: &str,
    ca_pem: &str,
) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let (client, conn) = tokio_postgres::connect(url, connector(ca_pem)).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(client)
}

async fn backend_ssl(c: &tokio_postgres::Client) -> bool {
    c.query_one(
        "select ssl from pg_stat_ssl where pid = pg_backend_pid()",
        &[],
    )
    .await
    .unwrap()
    .get(0)
}

/// The `ssl` column of every backend of the tenant role on a pod (seen by its superuser).
async fn role_backends_ssl(pod: &podrouter::localpg::LocalCluster) -> Vec<bool> {
    pod_admin(pod, "postgres")
        .await
        .query(
            "select ssl from pg_stat_ssl join pg_stat_activity using (pid) where usename = $1",
            &[&ROLE],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

/// Runs psql with `conninfo` and `command`; returns (success, stdout, stderr).
async fn psql(conninfo: &str, command: &str) -> (bool, String, String) {
    let out = tokio::process::Command::new(tool("psql"))
        .args(["-X", "-A", "-t", "-d", conninfo, "-c", command])
        .env("PGPASSWORD", PASSWORD)
        .env("PGCONNECT_TIMEOUT", "10")
        .output()
        .await
        .expect("run psql");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn conninfo(f: &TestFleet, db: &str, sslmode: &str) -> String {
    let addr = f.running().pg_addr;
    format!(
        "host={} port={} user={ROLE} dbname={db} sslmode={sslmode}",
        addr.ip(),
        addr.port()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_and_pods_speak_tls() {
    let dir = tempdir();
    let certs = make_certs(dir.path(), "pods");
    let f = TestFleet::start(Options {
        pods: 1,
        pod_settings: pod_ssl_settings(&certs),
        config_extra: tls_section(&format!(
            "cert_file = \"{}\"\nkey_file = \"{}\"\npod_tls = \"verify-full\"\npod_ca_file = \"{}\"\n",
            certs.cert.display(),
            certs.key.display(),
            certs.ca.display()
        )),
        ..Default::default()
    })
    .await;
    f.tenant("secure", 0).await;

    // A verifying rustls client (the router's certificate chains to the CA and names
    // 127.0.0.1); the router's own connection to the pod is TLS too, verified likewise.
    let url = format!("{}?sslmode=require", f.app_url("secure"));
    let c = connect_tls(&url, &certs.ca_pem)
        .await
        .expect("TLS client through the router");
    c.batch_execute("create table t (id int); insert into t values (1), (2)")
        .await
        .unwrap();
    let n: i64 = c
        .query_one("select count(*) from t", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 2);
    assert!(
        backend_ssl(&c).await,
        "the router's connection to the pod must use TLS"
    );
    // Megabytes both ways through both TLS legs, far more than the relay's chunks and the
    // sockets' buffers (stream.rs has the test that pins down flushing on a full socket).
    let big = "y".repeat(4 << 20);
    c.execute("create table big (v text)", &[]).await.unwrap();
    c.execute("insert into big values ($1)", &[&big])
        .await
        .unwrap();
    let back: String = c.query_one("select v from big", &[]).await.unwrap().get(0);
    assert!(back == big, "4 MiB came back with {} bytes", back.len());
    let rows = c
        .query(
            "select repeat('x', 1000) from generate_series(1, 5000)",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(rows.len(), 5000);
    let on_pod = role_backends_ssl(&f.pods[0]).await;
    assert!(
        !on_pod.is_empty() && on_pod.iter().all(|s| *s),
        "every backend of the tenant role on the pod uses TLS: {on_pod:?}"
    );

    // psql, as users run it.
    let (ok, out, err) = psql(&conninfo(&f, "secure", "require"), "\\conninfo").await;
    assert!(ok, "psql sslmode=require: {err}");
    assert!(out.contains("SSL connection"), "psql says: {out}");
    let (ok, out, err) = psql(&conninfo(&f, "secure", "require"), "select count(*) from t").await;
    assert!(ok, "psql sslmode=require: {err}");
    assert_eq!(out.trim(), "2");

    // mode = "prefer" (the default) still serves clients that do not ask for TLS.
    let plain = f.connect("secure").await;
    assert_eq!(
        plain
            .query_one("select count(*) from t", &[])
            .await
            .unwrap()
            .get::<_, i64>(0),
        2
    );
    let (ok, _, err) = psql(&conninfo(&f, "secure", "disable"), "select 1").await;
    assert!(ok, "psql sslmode=disable with mode = prefer: {err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn require_refuses_clients_without_tls() {
    let dir = tempdir();
    let certs = make_certs(dir.path(), "router");
    let f = TestFleet::start(Options {
        pods: 1,
        config_extra: tls_section(&format!(
            "cert_file = \"{}\"\nkey_file = \"{}\"\nmode = \"require\"\n",
            certs.cert.display(),
            certs.key.display()
        )),
        ..Default::default()
    })
    .await;
    f.tenant("strict", 0).await;

    let e = connect(&f.app_url("strict"))
        .await
        .expect_err("a plain client is refused");
    assert_eq!(code(&e), "28000", "{e}");
    assert_eq!(
        message(&e),
        "podrouter: TLS is required; connect with sslmode=require"
    );
    let (ok, _, err) = psql(&conninfo(&f, "strict", "disable"), "select 1").await;
    assert!(!ok);
    assert!(
        err.contains("podrouter: TLS is required; connect with sslmode=require"),
        "{err}"
    );

    // With TLS it works, and the pod side stays as configured: pod_tls defaults to disable.
    let url = format!("{}?sslmode=require", f.app_url("strict"));
    let c = connect_tls(&url, &certs.ca_pem).await.expect("TLS client");
    assert!(
        !backend_ssl(&c).await,
        "pod_tls = disable: plain to the pod"
    );
    let (ok, out, err) = psql(&conninfo(&f, "strict", "require"), "select 41 + 1").await;
    assert!(ok, "{err}");
    assert_eq!(out.trim(), "42");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pods_that_fail_verification_are_not_used() {
    let dir = tempdir();
    let pod_certs = make_certs(dir.path(), "pods");
    let other = make_certs(dir.path(), "other");
    let f = TestFleet::start(Options {
        pods: 1,
        pod_settings: pod_ssl_settings(&pod_certs),
        // A CA that did not sign the pod's certificate.
        config_extra: tls_section(&format!(
            "pod_tls = \"verify-full\"\npod_ca_file = \"{}\"\n",
            other.ca.display()
        )),
        ..Default::default()
    })
    .await;
    f.tenant("guarded", 0).await;
    let e = connect(&f.app_url("guarded"))
        .await
        .expect_err("no connection to an unverified pod");
    assert_eq!(code(&e), "08006", "{e}");
    assert!(
        message(&e).contains("TLS with its pod failed"),
        "{}",
        message(&e)
    );
    assert!(role_backends_ssl(&f.pods[0]).await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn require_to_a_pod_without_tls_fails_and_prefer_falls_back() {
    for (mode, works) in [("require", false), ("prefer", true)] {
        let f = TestFleet::start(Options {
            pods: 1,
            config_extra: tls_section(&format!("pod_tls = \"{mode}\"\n")),
            ..Default::default()
        })
        .await;
        f.tenant("plainpod", 0).await;
        match connect(&f.app_url("plainpod")).await {
            Ok(c) => {
                assert!(works, "pod_tls = {mode} to a pod without ssl must fail");
                assert!(!backend_ssl(&c).await);
            }
            Err(e) => {
                assert!(!works, "pod_tls = {mode}: {e}");
                assert_eq!(code(&e), "08006", "{e}");
            }
        }
        let ssl: String = pod_admin(&f.pods[0], "postgres")
            .await
            .query_one("show ssl", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(ssl, "off", "the test pod has no TLS");
    }
}
