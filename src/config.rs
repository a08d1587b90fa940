//! `pods.toml`: the config types, parsing, and validation. Every error names the file, the
//! field and the fix; nothing reads a field before [`Config::load`] has validated it.
//!
//! Reloads: a [`ConfigSource`] keeps a file's text, hash and the fields it sets explicitly;
//! [`diff`] lists what changes between two configs and [`reload_refusals`] says which of
//! those changes a reload must refuse unless forced.

use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;
use thiserror::Error;

#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("{file}: cannot read: {source}; check the path and its permissions")]
    Read {
        file: String,
        source: std::io::Error,
    },
    #[error("{file}: {message}")]
    Parse { file: String, message: String },
    #[error("{file}: {field}: {problem}; {fix}")]
    Invalid {
        file: String,
        field: String,
        problem: String,
        fix: String,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum PoolMode {
    Session,
    #[default]
    Transaction,
}

impl FromStr for PoolMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "session" => Ok(PoolMode::Session),
            "transaction" => Ok(PoolMode::Transaction),
            _ => Err(format!(
                "unknown pool mode {s:?}: use session or transaction"
            )),
        }
    }
}

impl std::fmt::Display for PoolMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            PoolMode::Session => "session",
            PoolMode::Transaction => "transaction",
        })
    }
}

/// A duration written as `250ms`, `5s`, `2m` or `1h`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Dur(pub Duration);

impl FromStr for Dur {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
        let (num, unit) = s.split_at(split);
        let n: u64 = num.parse().map_err(|_| {
            format!("{s:?} is not a duration: write e.g. \"250ms\", \"5s\", \"2m\"")
        })?;
        let d = match unit.trim() {
            "ms" => Duration::from_millis(n),
            "s" => Duration::from_secs(n),
            "m" => Duration::from_secs(n * 60),
            "h" => Duration::from_secs(n * 3600),
            _ => {
                return Err(format!(
                    "{s:?} has no unit: write e.g. \"250ms\", \"5s\", \"2m\", \"1h\""
                ))
            }
        };
        Ok(Dur(d))
    }
}

impl std::fmt::Display for Dur {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ms = self.0.as_millis();
        if !ms.is_multiple_of(1000) {
            write!(f, "{ms}ms")
        } else {
            write!(f, "{}s", ms / 1000)
        }
    }
}

impl<'de> Deserialize<'de> for Dur {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

impl Serialize for Dur {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

/// An amount of bytes written as `512kB`, `1MB`, `1GB` (units of 1024, as in Postgres) or a
/// plain integer of bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct ByteSize(pub u64);

impl FromStr for ByteSize {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
        let (num, unit) = s.split_at(split);
        let bad =
            || format!("{s:?} is not a size: write e.g. \"512kB\", \"1MB\" or a number of bytes");
        let n: u64 = num.parse().map_err(|_| bad())?;
        let scale: u64 = match unit.trim() {
            "" | "B" => 1,
            "kB" => 1 << 10,
            "MB" => 1 << 20,
            "GB" => 1 << 30,
            _ => return Err(bad()),
        };
        n.checked_mul(scale).map(ByteSize).ok_or_else(bad)
    }
}

impl std::fmt::Display for ByteSize {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let b = self.0;
        match [("GB", 1u64 << 30), ("MB", 1 << 20), ("kB", 1 << 10)]
            .into_iter()
            .find(|(_, size)| b >= *size && b.is_multiple_of(*size))
        {
            Some((name, size)) => write!(f, "{}{name}", b / size),
            None => write!(f, "{b}B"),
        }
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Bytes(u64),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Bytes(b) => Ok(ByteSize(b)),
            Raw::Text(s) => s.parse().map_err(serde::de::Error::custom),
        }
    }
}

impl Serialize for ByteSize {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

/// How far behind its primary a replica may be and still serve read-only sessions: a time
/// (`"10s"`, `"500ms"`) or an amount of WAL (`"16MB"`, `"512kB"`, `"1GB"`, units of 1024 as
/// in Postgres, or a plain integer of bytes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplicaLag {
    Time(Duration),
    Bytes(u64),
}

impl FromStr for ReplicaLag {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
        let (num, unit) = s.split_at(split);
        let bad = || {
            format!("{s:?} is not a replica lag: write a time like \"10s\" or an amount of WAL like \"16MB\"")
        };
        let n: u64 = num.parse().map_err(|_| bad())?;
        let scale = match unit.trim() {
            "ms" | "s" | "m" | "h" => return s.parse::<Dur>().map(|d| ReplicaLag::Time(d.0)),
            "" | "B" => 1,
            "kB" => 1 << 10,
            "MB" => 1 << 20,
            "GB" => 1 << 30,
            "TB" => 1 << 40,
            _ => return Err(bad()),
        };
        n.checked_mul(scale).map(ReplicaLag::Bytes).ok_or_else(bad)
    }
}

impl std::fmt::Display for ReplicaLag {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match *self {
            ReplicaLag::Time(d) => Dur(d).fmt(f),
            ReplicaLag::Bytes(b) => {
                let unit = [
                    ("TB", 1u64 << 40),
                    ("GB", 1 << 30),
                    ("MB", 1 << 20),
                    ("kB", 1 << 10),
                ]
                .into_iter()
                .find(|(_, size)| b >= *size && b % size == 0);
                match unit {
                    Some((name, size)) => write!(f, "{}{name}", b / size),
                    None => write!(f, "{b}B"),
                }
            }
        }
    }
}

impl<'de> Deserialize<'de> for ReplicaLag {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Bytes(u64),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Bytes(b) => Ok(ReplicaLag::Bytes(b)),
            Raw::Text(s) => s.parse().map_err(serde::de::Error::custom),
        }
    }
}

impl Serialize for ReplicaLag {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub router: RouterConfig,
    #[serde(default)]
    pub pool: PoolConfig,
    #[serde(default)]
    pub auth: AuthConfig,
    /// Abuse limits on the listeners: per source address, per tenant, timeouts, body caps.
    #[serde(default)]
    pub limits: LimitsConfig,
    /// SQL over HTTP and the tenant reverse proxy (`router.http_listen`).
    #[serde(default)]
    pub http: HttpConfig,
    #[serde(default, rename = "pod")]
    pub pods: Vec<PodConfig>,
    /// TLS with clients and pods; none without a `[tls]` section. Restart-only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<TlsConfig>,
    /// Live moves: pause deadline, catch-up bounds, what happens to the source database.
    #[serde(default)]
    pub moves: MoveConfig,
    /// Prometheus series and the pod sampler.
    #[serde(default)]
    pub metrics: MetricsConfig,
    /// Split recommendations and, in `apply` mode, splits the autopilot runs itself.
    #[serde(default)]
    pub autopilot: AutopilotConfig,
    /// Where a split's new pod comes from; none without a `[provider]` section.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provider: Option<ProviderConfig>,
}

/// `[moves]`: how live moves pause, catch up and clean up.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MoveConfig {
    /// Longest a move may hold a tenant's clients; past it the move aborts and the tenant
    /// resumes on its source pod.
    #[serde(default = "defaults::pause_deadline")]
    pub pause_deadline: Dur,
    /// Replication lag (bytes of WAL) under which a move may pause for its cutover.
    #[serde(default = "defaults::cutover_lag_bytes")]
    pub cutover_lag_bytes: u64,
    /// Longest the initial copy plus catch-up may take before the move gives up.
    #[serde(default = "defaults::catch_up_timeout")]
    pub catch_up_timeout: Dur,
    /// Cutover attempts (each a pause of at most `pause_deadline`) before the move fails.
    #[serde(default = "defaults::cutover_attempts")]
    pub cutover_attempts: u32,
    /// How long a moved tenant's old database is kept on the source pod (renamed
    /// `<tenant>_moved_<job>`, closed to connections); "0s" drops it right after the move.
    #[serde(default = "defaults::source_retention")]
    pub source_retention: Dur,
    /// Moves running at once (split and rebalance jobs respect it too).
    #[serde(default = "defaults::max_concurrent_moves")]
    pub max_concurrent: u32,
    /// Longest a client waits at a tenant paused by an operator before it gets an error.
    #[serde(default = "defaults::operator_pause_hold")]
    pub operator_pause_hold: Dur,
    /// Clients one paused tenant may hold; past it new ones get an error at once.
    #[serde(default = "defaults::max_held_clients")]
    pub max_held_clients: u32,
}

impl Default for MoveConfig {
    fn default() -> Self {
        MoveConfig {
            pause_deadline: defaults::pause_deadline(),
            cutover_lag_bytes: defaults::cutover_lag_bytes(),
            catch_up_timeout: defaults::catch_up_timeout(),
            cutover_attempts: defaults::cutover_attempts(),
            source_retention: defaults::source_retention(),
            max_concurrent: defaults::max_concurrent_moves(),
            operator_pause_hold: defaults::operator_pause_hold(),
            max_held_clients: defaults::max_held_clients(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouterConfig {
    /// PostgreSQL wire listener.
    pub listen: SocketAddr,
    /// Admin API listener.
    pub admin_listen: SocketAddr,
    /// SQL over HTTP and tenant reverse proxy listener (optional).
    #[serde(default)]
    pub http_listen: Option<SocketAddr>,
    /// The catalog database (Postgres URL).
    pub catalog_url: String,
    /// File holding the admin API bearer token.
    #[serde(default)]
    pub admin_token_file: Option<PathBuf>,
    /// How long a new server connection may take to connect and authenticate.
    #[serde(default = "defaults::connect_timeout")]
    pub connect_timeout: Dur,
    /// How long shutdown waits for clients to finish before closing them.
    #[serde(default = "defaults::shutdown_grace")]
    pub shutdown_grace: Dur,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoolConfig {
    #[serde(default)]
    pub mode: PoolMode,
    /// Server connections per (pod, tenant, role).
    #[serde(default = "defaults::pool_size")]
    pub size: u32,
    /// Client connections the router accepts in all.
    #[serde(default = "defaults::max_clients")]
    pub max_clients: u32,
    /// How long a client waits for a server connection before a 53300 error.
    #[serde(default = "defaults::checkout_timeout")]
    pub checkout_timeout: Dur,
    /// Idle server connections older than this are closed.
    #[serde(default = "defaults::server_idle_timeout")]
    pub server_idle_timeout: Dur,
    /// Server connections are closed after this age, at their next release.
    #[serde(default = "defaults::server_lifetime")]
    pub server_lifetime: Dur,
    /// Query run on a session-mode server connection before another client gets it.
    #[serde(default = "defaults::reset_query")]
    pub reset_query: String,
    /// Server connections to one pod, all tenants and roles together (keep it below the
    /// pod's max_connections); a pod may override it with `max_connections`.
    #[serde(default = "defaults::max_pod_connections")]
    pub max_pod_connections: u32,
    /// Client connections one tenant may hold (a noisy neighbour cannot take them all).
    #[serde(default = "defaults::max_clients_per_tenant")]
    pub max_clients_per_tenant: u32,
    /// A server connection idle for longer than this is checked with a query before reuse.
    #[serde(default = "defaults::server_check_after")]
    pub server_check_after: Dur,
    /// Sessions that ask for a replica (`-c podrouter.target=replica`) use one only while
    /// its lag is within this bound (a time, `"10s"`, or WAL bytes, `"16MB"`); otherwise they
    /// go to the primary.
    #[serde(default = "defaults::max_replica_lag")]
    pub max_replica_lag: ReplicaLag,
}

impl Default for PoolConfig {
    fn default() -> Self {
        PoolConfig {
            mode: PoolMode::default(),
            size: defaults::pool_size(),
            max_clients: defaults::max_clients(),
            checkout_timeout: defaults::checkout_timeout(),
            server_idle_timeout: defaults::server_idle_timeout(),
            server_lifetime: defaults::server_lifetime(),
            reset_query: defaults::reset_query(),
            max_pod_connections: defaults::max_pod_connections(),
            max_clients_per_tenant: defaults::max_clients_per_tenant(),
            server_check_after: defaults::server_check_after(),
            max_replica_lag: defaults::max_replica_lag(),
        }
    }
}

/// `[tls]`: certificates are read and checked at load, and only at start (every field is
/// restart-only). See [`crate::proxy::tls`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM certificate chain (leaf first) shown to clients; with `key_file`, clients may
    /// connect with TLS (SSLRequest is answered 'S'). Relative to the config file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cert_file: Option<PathBuf>,
    /// PEM private key of `cert_file`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_file: Option<PathBuf>,
    /// `prefer`: clients choose; `require`: clients without TLS are refused.
    #[serde(default)]
    pub mode: ClientTlsMode,
    /// TLS from the router to pods, with libpq's sslmode meanings.
    #[serde(default)]
    pub pod_tls: PodTlsMode,
    /// PEM CA certificate(s) the pods' certificates must chain to (`verify-full` only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_ca_file: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum ClientTlsMode {
    #[default]
    Prefer,
    Require,
}

/// Like libpq's sslmode: `disable` never encrypts; `prefer` encrypts when the pod accepts
/// TLS; `require` always encrypts (without checking the certificate); `verify-full` also
/// checks the certificate against `pod_ca_file` and the pod's host name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum PodTlsMode {
    #[default]
    Disable,
    Prefer,
    Require,
    VerifyFull,
}

impl std::fmt::Display for PodTlsMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            PodTlsMode::Disable => "disable",
            PodTlsMode::Prefer => "prefer",
            PodTlsMode::Require => "require",
            PodTlsMode::VerifyFull => "verify-full",
        })
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthConfig {
    /// How long a client has to finish startup and authentication.
    #[serde(default = "defaults::auth_timeout")]
    pub timeout: Dur,
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            timeout: defaults::auth_timeout(),
        }
    }
}

/// `[limits]`: abuse limits. Rates are token buckets per key (a source address, a tenant):
/// `rate` tokens per second, at most `burst` saved up; 0 turns a rate limit off. Every field
/// is read at each use, so a reload applies them at once (timeouts: to new connections).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsConfig {
    /// New wire connections per second from one source address; over it the client gets
    /// `FATAL 53300 too many connections from this address`.
    #[serde(default = "defaults::wire_connections_per_ip")]
    pub wire_connections_per_ip: u32,
    /// Wire connections one address may open at once before the rate applies.
    #[serde(default = "defaults::wire_connection_burst")]
    pub wire_connection_burst: u32,
    /// HTTP requests per second from one source address (SQL and proxied); over it `429`.
    #[serde(default = "defaults::http_requests_per_ip")]
    pub http_requests_per_ip: u32,
    #[serde(default = "defaults::http_request_burst")]
    pub http_request_burst: u32,
    /// HTTP requests per second for one tenant, all addresses together; over it `429`.
    #[serde(default = "defaults::http_requests_per_tenant")]
    pub http_requests_per_tenant: u32,
    #[serde(default = "defaults::http_tenant_burst")]
    pub http_tenant_burst: u32,
    /// HTTP requests one address may have in flight; over it `429`.
    #[serde(default = "defaults::http_in_flight_per_ip")]
    pub http_in_flight_per_ip: u32,
    /// HTTP requests in flight in all; over it `503`.
    #[serde(default = "defaults::http_in_flight")]
    pub http_in_flight: u32,
    /// Open HTTP connections from one address; more are closed at accept.
    #[serde(default = "defaults::http_connections_per_ip")]
    pub http_connections_per_ip: u32,
    /// Request headers must arrive within this (slowloris); also how long an idle
    /// keep-alive connection waits for its next request.
    #[serde(default = "defaults::http_header_timeout")]
    pub http_header_timeout: Dur,
    /// An HTTP connection on which no byte moves either way for this long is closed.
    #[serde(default = "defaults::http_idle_timeout")]
    pub http_idle_timeout: Dur,
    /// Largest `POST /v1/sql` body; over it `413`.
    #[serde(default = "defaults::http_max_body")]
    pub http_max_body: ByteSize,
    /// Largest proxied request body; over it `413`.
    #[serde(default = "defaults::http_proxy_max_body")]
    pub http_proxy_max_body: ByteSize,
    /// Source addresses (and tenants) whose rate state is kept; past it, new ones share one
    /// bucket, so the limiter's memory stays bounded whatever the number of addresses.
    #[serde(default = "defaults::max_tracked_keys")]
    pub max_tracked_keys: u32,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            wire_connections_per_ip: defaults::wire_connections_per_ip(),
            wire_connection_burst: defaults::wire_connection_burst(),
            http_requests_per_ip: defaults::http_requests_per_ip(),
            http_request_burst: defaults::http_request_burst(),
            http_requests_per_tenant: defaults::http_requests_per_tenant(),
            http_tenant_burst: defaults::http_tenant_burst(),
            http_in_flight_per_ip: defaults::http_in_flight_per_ip(),
            http_in_flight: defaults::http_in_flight(),
            http_connections_per_ip: defaults::http_connections_per_ip(),
            http_header_timeout: defaults::http_header_timeout(),
            http_idle_timeout: defaults::http_idle_timeout(),
            http_max_body: defaults::http_max_body(),
            http_proxy_max_body: defaults::http_proxy_max_body(),
            max_tracked_keys: defaults::max_tracked_keys(),
        }
    }
}

/// `[http]`: SQL over HTTP and the tenant reverse proxy.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpConfig {
    /// Rows one statement may return; over it the request fails with `row_limit`.
    #[serde(default = "defaults::http_max_rows")]
    pub max_rows: u32,
    /// Result bytes (as Postgres sends them) one request may return; over it
    /// `response_too_large`.
    #[serde(default = "defaults::http_max_response")]
    pub max_response: ByteSize,
    /// A statement running longer is cancelled (`57014`).
    #[serde(default = "defaults::http_statement_timeout")]
    pub statement_timeout: Dur,
    /// How long connecting to a pod's HTTP upstream may take before the next one is tried.
    #[serde(default = "defaults::upstream_connect_timeout")]
    pub upstream_connect_timeout: Dur,
    /// An upstream that sends no response headers within this gets the client a `504`.
    #[serde(default = "defaults::upstream_timeout")]
    pub upstream_timeout: Dur,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            max_rows: defaults::http_max_rows(),
            max_response: defaults::http_max_response(),
            statement_timeout: defaults::http_statement_timeout(),
            upstream_connect_timeout: defaults::upstream_connect_timeout(),
            upstream_timeout: defaults::upstream_timeout(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PodConfig {
    pub name: String,
    /// Superuser (or CREATEDB + CREATEROLE) URL of the primary, used for admin work; clients'
    /// traffic goes to the same host and port as the tenant's own role.
    pub primary: String,
    #[serde(default)]
    pub replicas: Vec<String>,
    #[serde(default)]
    pub http: Vec<String>,
    #[serde(default = "defaults::weight")]
    pub weight: f64,
    /// Whether new tenants may be placed here.
    #[serde(default = "defaults::yes")]
    pub accepting: bool,
    /// Pool mode of this pod's tenants (a tenant may override it); default `pool.mode`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pool_mode: Option<PoolMode>,
    /// Server connections to this pod in all; default `pool.max_pod_connections`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_connections: Option<u32>,
    /// node_exporter of the pod's host (`http://HOST:9100/metrics`): host CPU, memory, disk.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_exporter: Option<String>,
    /// What the pod can sustain, for the planner and the autopilot.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capacity: Option<PodCapacity>,
}

// === metrics, planner and autopilot config ===

/// `[metrics]`: cardinality of tenant labels and the pod sampler's pace.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// Tenants with their own `tenant` label (the busiest); the others are summed per pod
    /// as `tenant="other"`, so the number of series stays bounded.
    #[serde(default = "observe_defaults::top_tenants")]
    pub top_tenants: u32,
    /// How often the sampler reads every pod's statistics (and node_exporter).
    #[serde(default = "observe_defaults::sample_every")]
    pub sample_every: Dur,
    /// How often database sizes are read (pg_database_size walks the files: slower).
    #[serde(default = "observe_defaults::size_every")]
    pub size_every: Dur,
    /// The window a tenant's load (server busy seconds per second) is averaged over.
    #[serde(default = "observe_defaults::load_window")]
    pub load_window: Dur,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        MetricsConfig {
            top_tenants: observe_defaults::top_tenants(),
            sample_every: observe_defaults::sample_every(),
            size_every: observe_defaults::size_every(),
            load_window: observe_defaults::load_window(),
        }
    }
}

/// A pod's capacity: what 100% utilisation means for the planner.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PodCapacity {
    /// Server busy seconds per second the pod sustains (about its useful CPU cores).
    #[serde(default = "observe_defaults::busy")]
    pub busy: f64,
    /// Backends; default the pod's own max_connections as sampled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connections: Option<u32>,
    /// Bytes of databases; default the size of the data filesystem from node_exporter,
    /// and unlimited without one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk_bytes: Option<u64>,
}

impl Default for PodCapacity {
    fn default() -> Self {
        PodCapacity {
            busy: observe_defaults::busy(),
            connections: None,
            disk_bytes: None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum AutopilotMode {
    Off,
    /// Propose splits (GET /v1/recommendations, a metric, the audit log); change nothing.
    #[default]
    Recommend,
    /// Also run them, within `cooldown` and `max_concurrent_moves`.
    Apply,
}

/// `[autopilot]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AutopilotConfig {
    #[serde(default)]
    pub mode: AutopilotMode,
    #[serde(default)]
    pub split_when: SplitWhen,
    /// In `apply` mode: after a job the autopilot started ends, how long before it starts
    /// another (on any pod), so the figures settle first.
    #[serde(default = "observe_defaults::cooldown")]
    pub cooldown: Dur,
    /// Moves an applied split runs at once.
    #[serde(default = "observe_defaults::autopilot_moves")]
    pub max_concurrent_moves: u32,
}

impl Default for AutopilotConfig {
    fn default() -> Self {
        AutopilotConfig {
            mode: AutopilotMode::default(),
            split_when: SplitWhen::default(),
            cooldown: observe_defaults::cooldown(),
            max_concurrent_moves: observe_defaults::autopilot_moves(),
        }
    }
}

/// When a pod needs a split: any ratio at or over its threshold for `for`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SplitWhen {
    /// Server busy seconds per second against `capacity.busy`.
    #[serde(default = "observe_defaults::busy_ratio")]
    pub busy_ratio: f64,
    /// Backends against max_connections (or `capacity.connections`).
    #[serde(default = "observe_defaults::connections_ratio")]
    pub connections_ratio: f64,
    /// Database bytes against `capacity.disk_bytes` (ignored while that is unknown).
    #[serde(default = "observe_defaults::disk_ratio")]
    pub disk_ratio: f64,
    #[serde(rename = "for", default = "observe_defaults::split_for")]
    pub for_: Dur,
}

impl Default for SplitWhen {
    fn default() -> Self {
        SplitWhen {
            busy_ratio: observe_defaults::busy_ratio(),
            connections_ratio: observe_defaults::connections_ratio(),
            disk_ratio: observe_defaults::disk_ratio(),
            for_: observe_defaults::split_for(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProviderKind {
    /// Spare pods listed in this file that hold no tenants yet.
    Static,
    /// initdb a new cluster on this machine (demo, tests, single-host trials).
    Local,
    /// Run `command`; it prints the new pod's primary URL on its first line of stdout.
    Command,
}

/// `[provider]`: where a split's new pod comes from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProviderConfig {
    pub kind: ProviderKind,
    /// `local`: where new clusters live (relative to this file); default `provisioned/`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dir: Option<PathBuf>,
    /// `command`: run with `sh -c`, with PODROUTER_POD (the new pod's name) and
    /// PODROUTER_SOURCE_POD in its environment.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<String>,
    /// `command`: how long it may take.
    #[serde(default = "observe_defaults::provider_timeout")]
    pub timeout: Dur,
}

mod observe_defaults {
    use super::Dur;
    use std::time::Duration;
    pub fn top_tenants() -> u32 {
        20
    }
    pub fn sample_every() -> Dur {
        Dur(Duration::from_secs(5))
    }
    pub fn size_every() -> Dur {
        Dur(Duration::from_secs(60))
    }
    pub fn load_window() -> Dur {
        Dur(Duration::from_secs(300))
    }
    pub fn busy() -> f64 {
        4.0
    }
    pub fn cooldown() -> Dur {
        Dur(Duration::from_secs(1800))
    }
    pub fn autopilot_moves() -> u32 {
        2
    }
    pub fn busy_ratio() -> f64 {
        0.75
    }
    pub fn connections_ratio() -> f64 {
        0.8
    }
    pub fn disk_ratio() -> f64 {
        0.8
    }
    pub fn split_for() -> Dur {
        Dur(Duration::from_secs(300))
    }
    pub fn provider_timeout() -> Dur {
        Dur(Duration::from_secs(600))
    }
}

impl Config {
    /// Checks `[metrics]`, `[autopilot]`, `[provider]` and the pods' `capacity` and
    /// `node_exporter`: (field, problem, fix) of the first error.
    fn validate_observe(&self) -> Result<(), (String, String, String)> {
        let bad = |f: &str, p: String, fix: &str| Err((f.to_owned(), p, fix.to_owned()));
        let m = &self.metrics;
        if m.top_tenants > 1000 {
            return bad(
                "metrics.top_tenants",
                format!("{} is out of range", m.top_tenants),
                "use 0 to 1000 (each labelled tenant adds series)",
            );
        }
        for (f, d) in [
            ("metrics.sample_every", m.sample_every),
            ("metrics.size_every", m.size_every),
            ("metrics.load_window", m.load_window),
        ] {
            if d.0 < Duration::from_millis(100) || d.0 > Duration::from_secs(24 * 3600) {
                return bad(
                    f,
                    format!("{d} is out of range"),
                    "use a duration between 100ms and 24h, e.g. \"5s\"",
                );
            }
        }
        let w = &self.autopilot.split_when;
        for (f, r) in [
            ("autopilot.split_when.busy_ratio", w.busy_ratio),
            (
                "autopilot.split_when.connections_ratio",
                w.connections_ratio,
            ),
            ("autopilot.split_when.disk_ratio", w.disk_ratio),
        ] {
            if !(r.is_finite() && r > 0.0 && r <= 10.0) {
                return bad(
                    f,
                    format!("{r} is out of range"),
                    "use a ratio above 0, e.g. 0.75",
                );
            }
        }
        if self.autopilot.max_concurrent_moves == 0 || self.autopilot.max_concurrent_moves > 64 {
            return bad(
                "autopilot.max_concurrent_moves",
                format!("{} is out of range", self.autopilot.max_concurrent_moves),
                "use 1 to 64",
            );
        }
        if let Some(p) = &self.provider {
            if p.kind == ProviderKind::Command
                && p.command.as_deref().is_none_or(|c| c.trim().is_empty())
            {
                return bad(
                    "provider.command",
                    "kind = \"command\" needs a command".into(),
                    "set command = \"/path/to/new-pod.sh\" (it prints the new primary's URL)",
                );
            }
        }
        for (i, pod) in self.pods.iter().enumerate() {
            if let Some(url) = &pod.node_exporter {
                if !(url.starts_with("http://") || url.starts_with("https://")) {
                    return bad(
                        &format!("pod[{i}].node_exporter"),
                        format!("{url:?} is not an HTTP URL"),
                        "write http://HOST:9100/metrics",
                    );
                }
            }
            if let Some(c) = &pod.capacity {
                if !(c.busy.is_finite() && c.busy > 0.0) {
                    return bad(
                        &format!("pod[{i}].capacity.busy"),
                        format!("{} is out of range", c.busy),
                        "use the server busy seconds per second the pod sustains, e.g. 4.0",
                    );
                }
                if c.connections == Some(0) || c.disk_bytes == Some(0) {
                    return bad(
                        &format!("pod[{i}].capacity"),
                        "a capacity of 0".into(),
                        "leave it out to use the pod's own figures",
                    );
                }
            }
        }
        Ok(())
    }
}

mod defaults {
    use super::Dur;
    use std::time::Duration;
    pub fn pause_deadline() -> Dur {
        Dur(Duration::from_secs(2))
    }
    pub fn cutover_lag_bytes() -> u64 {
        1024 * 1024
    }
    pub fn catch_up_timeout() -> Dur {
        Dur(Duration::from_secs(6 * 3600))
    }
    pub fn cutover_attempts() -> u32 {
        5
    }
    pub fn source_retention() -> Dur {
        Dur(Duration::from_secs(7 * 24 * 3600))
    }
    pub fn max_concurrent_moves() -> u32 {
        2
    }
    pub fn operator_pause_hold() -> Dur {
        Dur(Duration::from_secs(30))
    }
    pub fn max_held_clients() -> u32 {
        10_000
    }
    pub fn max_pod_connections() -> u32 {
        90
    }
    pub fn max_clients_per_tenant() -> u32 {
        5000
    }
    pub fn server_check_after() -> Dur {
        Dur(Duration::from_secs(30))
    }
    pub fn max_replica_lag() -> super::ReplicaLag {
        super::ReplicaLag::Time(Duration::from_secs(10))
    }
    pub fn pool_size() -> u32 {
        20
    }
    pub fn max_clients() -> u32 {
        20_000
    }
    pub fn checkout_timeout() -> Dur {
        Dur(Duration::from_secs(5))
    }
    pub fn server_idle_timeout() -> Dur {
        Dur(Duration::from_secs(600))
    }
    pub fn server_lifetime() -> Dur {
        Dur(Duration::from_secs(3600))
    }
    pub fn connect_timeout() -> Dur {
        Dur(Duration::from_secs(5))
    }
    pub fn shutdown_grace() -> Dur {
        Dur(Duration::from_secs(10))
    }
    pub fn auth_timeout() -> Dur {
        Dur(Duration::from_secs(5))
    }
    pub fn reset_query() -> String {
        "DISCARD ALL".into()
    }
    pub fn weight() -> f64 {
        1.0
    }
    pub fn yes() -> bool {
        true
    }
    pub fn wire_connections_per_ip() -> u32 {
        50
    }
    pub fn wire_connection_burst() -> u32 {
        500
    }
    pub fn http_requests_per_ip() -> u32 {
        200
    }
    pub fn http_request_burst() -> u32 {
        400
    }
    pub fn http_requests_per_tenant() -> u32 {
        2000
    }
    pub fn http_tenant_burst() -> u32 {
        4000
    }
    pub fn http_in_flight_per_ip() -> u32 {
        64
    }
    pub fn http_in_flight() -> u32 {
        1024
    }
    pub fn http_connections_per_ip() -> u32 {
        256
    }
    pub fn http_header_timeout() -> Dur {
        Dur(Duration::from_secs(5))
    }
    pub fn http_idle_timeout() -> Dur {
        Dur(Duration::from_secs(60))
    }
    pub fn http_max_body() -> super::ByteSize {
        super::ByteSize(1 << 20)
    }
    pub fn http_proxy_max_body() -> super::ByteSize {
        super::ByteSize(64 << 20)
    }
    pub fn max_tracked_keys() -> u32 {
        100_000
    }
    pub fn http_max_rows() -> u32 {
        10_000
    }
    pub fn http_max_response() -> super::ByteSize {
        super::ByteSize(16 << 20)
    }
    pub fn http_statement_timeout() -> Dur {
        Dur(Duration::from_secs(30))
    }
    pub fn upstream_connect_timeout() -> Dur {
        Dur(Duration::from_secs(2))
    }
    pub fn upstream_timeout() -> Dur {
        Dur(Duration::from_secs(30))
    }
}

/// Names of pods and tenants: they become database names and URL host labels.
pub fn valid_name(name: &str) -> bool {
    let b = name.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b[0].is_ascii_lowercase()
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'_' || *c == b'-')
}

pub const NAME_RULE: &str =
    "use 1 to 63 characters: lowercase letters, digits, '_' or '-', starting with a letter";

impl Config {
    /// Reads, parses and validates a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        ConfigSource::load(path).map(|s| s.config)
    }

    /// Parses without validation (`file` names the source in errors).
    pub fn parse(file: &str, text: &str) -> Result<Config, ConfigError> {
        toml::from_str(text).map_err(|e| ConfigError::Parse {
            file: file.to_owned(),
            message: e.to_string().trim_end().replace('\n', "\n  "),
        })
    }

    /// Checks every field; `base` resolves relative paths.
    pub fn validate(&self, file: &str, base: Option<&Path>) -> Result<(), ConfigError> {
        let invalid = |field: &str, problem: String, fix: &str| ConfigError::Invalid {
            file: file.to_owned(),
            field: field.to_owned(),
            problem,
            fix: fix.to_owned(),
        };
        let r = &self.router;
        if let Err(e) = parse_pg_url(&r.catalog_url) {
            return Err(invalid(
                "router.catalog_url",
                e,
                "write postgres://USER[:PASSWORD]@HOST[:PORT]/DATABASE",
            ));
        }
        // Port 0 (tests) means "any free port", so only fixed ports can collide.
        let fixed: Vec<SocketAddr> = [Some(r.listen), Some(r.admin_listen), r.http_listen]
            .into_iter()
            .flatten()
            .filter(|a| a.port() != 0)
            .collect();
        if (1..fixed.len()).any(|i| fixed[..i].contains(&fixed[i])) {
            return Err(invalid(
                "router.listen",
                "listen, admin_listen and http_listen must be different addresses".into(),
                "give each listener its own port",
            ));
        }
        match &r.admin_token_file {
            Some(path) => {
                let path = self.resolve(path, base);
                match std::fs::read_to_string(&path) {
                    Ok(t) if t.trim().len() >= 16 => {}
                    Ok(_) => {
                        return Err(invalid(
                            "router.admin_token_file",
                            format!(
                                "{} holds a token shorter than 16 characters",
                                path.display()
                            ),
                            "write a long random token, e.g. `openssl rand -hex 32 > FILE`",
                        ))
                    }
                    Err(e) => return Err(invalid(
                        "router.admin_token_file",
                        format!("cannot read {}: {e}", path.display()),
                        "create the file with a random token, e.g. `openssl rand -hex 32 > FILE`",
                    )),
                }
            }
            None if !r.admin_listen.ip().is_loopback() => {
                return Err(invalid(
                    "router.admin_token_file",
                    format!(
                        "admin_listen {} is not loopback and no token is set",
                        r.admin_listen
                    ),
                    "set admin_token_file, or bind admin_listen to 127.0.0.1",
                ))
            }
            None => {}
        }
        for (field, d) in [
            ("router.connect_timeout", r.connect_timeout),
            ("pool.checkout_timeout", self.pool.checkout_timeout),
            ("auth.timeout", self.auth.timeout),
        ] {
            if d.0.is_zero() || d.0 > Duration::from_secs(600) {
                return Err(invalid(
                    field,
                    format!("{d} is out of range"),
                    "use a duration between 1ms and 10m, e.g. \"5s\"",
                ));
            }
        }
        let m = &self.moves;
        for (field, d, max) in [
            (
                "moves.pause_deadline",
                m.pause_deadline,
                Duration::from_secs(60),
            ),
            (
                "moves.operator_pause_hold",
                m.operator_pause_hold,
                Duration::from_secs(3600),
            ),
            (
                "moves.catch_up_timeout",
                m.catch_up_timeout,
                Duration::from_secs(7 * 24 * 3600),
            ),
        ] {
            if d.0 < Duration::from_millis(10) || d.0 > max {
                return Err(invalid(
                    field,
                    format!("{d} is out of range"),
                    &format!("use a duration between 10ms and {}", Dur(max)),
                ));
            }
        }
        if m.cutover_attempts == 0 || m.cutover_attempts > 100 {
            return Err(invalid(
                "moves.cutover_attempts",
                format!("{} is out of range", m.cutover_attempts),
                "use 1 to 100",
            ));
        }
        if m.max_concurrent == 0 || m.max_concurrent > 64 {
            return Err(invalid(
                "moves.max_concurrent",
                format!("{} is out of range", m.max_concurrent),
                "use 1 to 64",
            ));
        }
        if m.max_held_clients == 0 {
            return Err(invalid(
                "moves.max_held_clients",
                "0 would fail every client of a paused tenant".into(),
                "use at least 1 (default 10000)",
            ));
        }
        let p = &self.pool;
        if !(1..=10_000).contains(&p.size) {
            return Err(invalid(
                "pool.size",
                format!("{} is out of range", p.size),
                "set it between 1 and 10000 server connections per (pod, tenant, role), e.g. 20",
            ));
        }
        if p.max_clients == 0 {
            return Err(invalid(
                "pool.max_clients",
                "0 would refuse every client".into(),
                "set it to e.g. 20000",
            ));
        }
        if p.max_pod_connections == 0 {
            return Err(invalid(
                "pool.max_pod_connections",
                "0 would refuse every server connection".into(),
                "set it below the pods' max_connections, e.g. 90 for max_connections = 100",
            ));
        }
        if p.max_clients_per_tenant == 0 {
            return Err(invalid(
                "pool.max_clients_per_tenant",
                "0 would refuse every client".into(),
                "set it to e.g. 5000",
            ));
        }
        let lag_in_range = match p.max_replica_lag {
            ReplicaLag::Time(d) => d <= Duration::from_secs(24 * 3600),
            ReplicaLag::Bytes(b) => b <= 1 << 40,
        };
        if !lag_in_range {
            return Err(invalid(
                "pool.max_replica_lag",
                format!("{} is out of range", p.max_replica_lag),
                "use at most \"24h\" or \"1TB\", e.g. \"10s\" or \"16MB\"",
            ));
        }
        if p.reset_query.trim().is_empty() {
            return Err(invalid(
                "pool.reset_query",
                "empty".into(),
                "use \"DISCARD ALL\" unless you know better",
            ));
        }
        self.validate_limits(&invalid)?;
        let mut names = std::collections::HashSet::new();
        for (i, pod) in self.pods.iter().enumerate() {
            let at = |f: &str| format!("pod[{i}].{f}");
            if !valid_name(&pod.name) {
                return Err(invalid(
                    &at("name"),
                    format!("{:?} is not a valid pod name", pod.name),
                    NAME_RULE,
                ));
            }
            if !names.insert(pod.name.as_str()) {
                return Err(invalid(
                    &at("name"),
                    format!("pod {:?} appears twice", pod.name),
                    "give every pod a unique name",
                ));
            }
            if let Err(e) = parse_pg_url(&pod.primary) {
                return Err(invalid(
                    &at("primary"),
                    e,
                    "write postgres://USER[:PASSWORD]@HOST[:PORT]",
                ));
            }
            for (j, rep) in pod.replicas.iter().enumerate() {
                if let Err(e) = parse_pg_url(rep) {
                    return Err(invalid(
                        &at(&format!("replicas[{j}]")),
                        e,
                        "write postgres://USER[:PASSWORD]@HOST[:PORT]",
                    ));
                }
            }
            for (j, h) in pod.http.iter().enumerate() {
                if !(h.starts_with("http://") || h.starts_with("https://")) {
                    return Err(invalid(
                        &at(&format!("http[{j}]")),
                        format!("{h:?} is not an HTTP URL"),
                        "write http://HOST:PORT",
                    ));
                }
            }
            if !(pod.weight.is_finite() && pod.weight > 0.0 && pod.weight <= 1000.0) {
                return Err(invalid(
                    &at("weight"),
                    format!("{} is out of range", pod.weight),
                    "use a positive number up to 1000, e.g. 1.0",
                ));
            }
            if pod.max_connections == Some(0) {
                return Err(invalid(
                    &at("max_connections"),
                    "0 would refuse every server connection".into(),
                    "set it below the pod's own max_connections, or remove it to use pool.max_pod_connections",
                ));
            }
        }
        if let Err((field, problem, fix)) = self.validate_observe() {
            return Err(invalid(&field, problem, &fix));
        }
        if let Err(e) = crate::proxy::tls::TlsSetup::load(self.tls.as_ref(), base) {
            return Err(invalid(e.field, e.problem, &e.fix));
        }
        Ok(())
    }

    /// `[limits]` and `[http]`: every count positive where 0 would refuse everything, every
    /// duration and size in a range that still serves someone.
    fn validate_limits(
        &self,
        invalid: &dyn Fn(&str, String, &str) -> ConfigError,
    ) -> Result<(), ConfigError> {
        let (l, h) = (&self.limits, &self.http);
        for (field, rate, burst, burst_field) in [
            (
                "limits.wire_connections_per_ip",
                l.wire_connections_per_ip,
                l.wire_connection_burst,
                "limits.wire_connection_burst",
            ),
            (
                "limits.http_requests_per_ip",
                l.http_requests_per_ip,
                l.http_request_burst,
                "limits.http_request_burst",
            ),
            (
                "limits.http_requests_per_tenant",
                l.http_requests_per_tenant,
                l.http_tenant_burst,
                "limits.http_tenant_burst",
            ),
        ] {
            if rate > 0 && burst == 0 {
                return Err(invalid(
                    burst_field,
                    format!("0 would refuse everything {field} allows"),
                    "set it to at least 1 (e.g. twice the rate), or set the rate to 0 to turn the limit off",
                ));
            }
        }
        for (field, n, fix) in [
            (
                "limits.http_in_flight_per_ip",
                l.http_in_flight_per_ip,
                "e.g. 64",
            ),
            ("limits.http_in_flight", l.http_in_flight, "e.g. 1024"),
            (
                "limits.http_connections_per_ip",
                l.http_connections_per_ip,
                "e.g. 256",
            ),
            ("limits.max_tracked_keys", l.max_tracked_keys, "e.g. 100000"),
            ("http.max_rows", h.max_rows, "e.g. 10000"),
        ] {
            if n == 0 {
                return Err(invalid(
                    field,
                    "0 would refuse every request".into(),
                    &format!("set it to at least 1, {fix}"),
                ));
            }
        }
        for (field, d) in [
            ("limits.http_header_timeout", l.http_header_timeout),
            ("limits.http_idle_timeout", l.http_idle_timeout),
            ("http.statement_timeout", h.statement_timeout),
            ("http.upstream_connect_timeout", h.upstream_connect_timeout),
            ("http.upstream_timeout", h.upstream_timeout),
        ] {
            if d.0 < Duration::from_millis(10) || d.0 > Duration::from_secs(3600) {
                return Err(invalid(
                    field,
                    format!("{d} is out of range"),
                    "use a duration between 10ms and 1h, e.g. \"5s\"",
                ));
            }
        }
        for (field, b) in [
            ("limits.http_max_body", l.http_max_body),
            ("limits.http_proxy_max_body", l.http_proxy_max_body),
            ("http.max_response", h.max_response),
        ] {
            if b.0 == 0 || b.0 > 1 << 32 {
                return Err(invalid(
                    field,
                    format!("{b} is out of range"),
                    "use a size between 1B and 4GB, e.g. \"1MB\"",
                ));
            }
        }
        Ok(())
    }

    /// The cap on server connections to a pod.
    pub fn pod_connection_limit(&self, pod: &str) -> usize {
        self.pods
            .iter()
            .find(|p| p.name == pod)
            .and_then(|p| p.max_connections)
            .unwrap_or(self.pool.max_pod_connections) as usize
    }

    fn resolve(&self, path: &Path, base: Option<&Path>) -> PathBuf {
        match base {
            Some(b) if path.is_relative() => b.join(path),
            _ => path.to_owned(),
        }
    }

    /// The admin token, read from `admin_token_file` (relative to the config's directory).
    pub fn admin_token(&self, base: Option<&Path>) -> Option<String> {
        let path = self.resolve(self.router.admin_token_file.as_ref()?, base);
        std::fs::read_to_string(path)
            .ok()
            .map(|t| t.trim().to_owned())
    }

    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).expect("config serialises")
    }

    /// Copies the fields that only take effect at a restart ([`RESTART_ONLY`]) from the
    /// running config, so the config in memory keeps describing what actually runs.
    pub fn keep_restart_only(&mut self, running: &Config) {
        self.router.listen = running.router.listen;
        self.router.admin_listen = running.router.admin_listen;
        self.router.http_listen = running.router.http_listen;
        self.router.catalog_url = running.router.catalog_url.clone();
        self.router.admin_token_file = running.router.admin_token_file.clone();
        self.pool.max_clients = running.pool.max_clients;
        self.tls = running.tls.clone();
    }
}

// === impl ConfigSource ===

/// Fields a running router cannot change: its listeners are bound, its catalog connected, its
/// admin token read, its client limit sized and its TLS certificates loaded at start. Keep
/// in step with [`Config::keep_restart_only`].
pub const RESTART_ONLY: &[&str] = &[
    "router.listen",
    "router.admin_listen",
    "router.http_listen",
    "router.catalog_url",
    "router.admin_token_file",
    "pool.max_clients",
    "tls.cert_file",
    "tls.key_file",
    "tls.mode",
    "tls.pod_tls",
    "tls.pod_ca_file",
];

/// A config file as read: the text (kept verbatim and stored in the catalog), its SHA-256,
/// the config it parses to, and the fields the file sets explicitly (as [`diff`] names them,
/// e.g. `pool.size`, `pod[pod-a].weight`), which is what tells a hand-tuned value from a
/// default.
#[derive(Debug, Clone, PartialEq)]
pub struct ConfigSource {
    pub config: Config,
    pub text: String,
    pub hash: String,
    pub explicit: BTreeSet<String>,
}

impl ConfigSource {
    /// Reads, parses and validates a config file, keeping its text.
    pub fn load(path: &Path) -> Result<ConfigSource, ConfigError> {
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            file: file.clone(),
            source,
        })?;
        let source = ConfigSource::parse(&file, text)?;
        source.config.validate(&file, path.parent())?;
        Ok(source)
    }

    /// Parses without validation (for versions read back from the catalog).
    pub fn parse(file: &str, text: String) -> Result<ConfigSource, ConfigError> {
        let config = Config::parse(file, &text)?;
        let table: toml::Table = toml::from_str(&text).map_err(|e| ConfigError::Parse {
            file: file.to_owned(),
            message: e.to_string(),
        })?;
        let explicit = field_values(&serde_json::to_value(&table).unwrap_or(Value::Null))
            .into_keys()
            .collect();
        Ok(ConfigSource {
            config,
            hash: sha256_hex(&text),
            text,
            explicit,
        })
    }

    /// A source for a config that was built in memory rather than read from a file: its text
    /// is the config written out, so every field counts as explicit.
    pub fn generated(config: Config) -> ConfigSource {
        let text = config.to_toml();
        ConfigSource::parse("generated config", text.clone()).unwrap_or_else(|_| ConfigSource {
            hash: sha256_hex(&text),
            explicit: field_values(&to_json(&config)).into_keys().collect(),
            config,
            text,
        })
    }
}

pub fn sha256_hex(text: &str) -> String {
    format!("{:x}", Sha256::digest(text.as_bytes()))
}

fn to_json(config: &Config) -> Value {
    serde_json::to_value(config).unwrap_or(Value::Null)
}

/// Every leaf of a config (as JSON) by its field path: `pool.size`, `router.listen`,
/// `pod[pod-a].weight` (pods by name, since their order in the file means nothing). Arrays
/// are leaves.
fn field_values(v: &Value) -> BTreeMap<String, Value> {
    fn walk(prefix: &str, v: &Value, out: &mut BTreeMap<String, Value>) {
        match v {
            Value::Object(map) => {
                for (k, v) in map {
                    match (prefix, k.as_str(), v) {
                        ("", "pod", Value::Array(pods)) => {
                            for (i, p) in pods.iter().enumerate() {
                                walk(&pod_field(&pod_name(p, i)), p, out);
                            }
                        }
                        ("", _, _) => walk(k, v, out),
                        _ => walk(&format!("{prefix}.{k}"), v, out),
                    }
                }
            }
            leaf => {
                out.insert(prefix.to_owned(), leaf.clone());
            }
        }
    }
    let mut out = BTreeMap::new();
    walk("", v, &mut out);
    out
}

fn pod_name(p: &Value, index: usize) -> String {
    p.get("name")
        .and_then(Value::as_str)
        .map(str::to_owned)
        .unwrap_or_else(|| index.to_string())
}

fn pod_field(name: &str) -> String {
    format!("pod[{name}]")
}

/// The pod a field path belongs to (`pod[pod-a].weight` → `pod-a`).
fn pod_of(field: &str) -> Option<&str> {
    field.strip_prefix("pod[")?.split_once(']').map(|(n, _)| n)
}

// === diff ===

/// One changed field. `old`/`new` are JSON (null when absent); URLs have their passwords
/// redacted. A pod added or removed as a whole is one change named `pod[NAME]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FieldChange {
    pub field: String,
    pub old: Value,
    pub new: Value,
    /// A [`RESTART_ONLY`] field: recorded now, in effect after the next restart.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub after_restart: bool,
}

impl std::fmt::Display for FieldChange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {} -> {}", self.field, self.old, self.new)
    }
}

/// What differs between two configs, field by field, in field-path order.
pub fn diff(old: &Config, new: &Config) -> Vec<FieldChange> {
    let split = |c: &Config| {
        let mut v = to_json(c);
        let pods = v
            .as_object_mut()
            .and_then(|m| m.remove("pod"))
            .and_then(|p| match p {
                Value::Array(a) => Some(a),
                _ => None,
            })
            .unwrap_or_default();
        let pods: BTreeMap<String, Value> = pods
            .into_iter()
            .enumerate()
            .map(|(i, p)| (pod_name(&p, i), p))
            .collect();
        (field_values(&v), pods)
    };
    let ((old_fields, old_pods), (new_fields, new_pods)) = (split(old), split(new));
    let mut changes = Vec::new();
    fn compare(
        out: &mut Vec<FieldChange>,
        a: &BTreeMap<String, Value>,
        b: &BTreeMap<String, Value>,
    ) {
        let keys: BTreeSet<&String> = a.keys().chain(b.keys()).collect();
        for k in keys {
            let (o, n) = (
                a.get(k).cloned().unwrap_or(Value::Null),
                b.get(k).cloned().unwrap_or(Value::Null),
            );
            if o != n {
                out.push(change(k, o, n));
            }
        }
    }
    compare(&mut changes, &old_fields, &new_fields);
    let prefixed = |name: &str, p: Option<&Value>| -> BTreeMap<String, Value> {
        match p {
            Some(p) => field_values(p)
                .into_iter()
                .map(|(k, v)| (format!("{}.{k}", pod_field(name)), v))
                .collect(),
            None => BTreeMap::new(),
        }
    };
    let names: BTreeSet<&String> = old_pods.keys().chain(new_pods.keys()).collect();
    for name in names {
        match (old_pods.get(name), new_pods.get(name)) {
            (Some(_), Some(_)) => compare(
                &mut changes,
                &prefixed(name, old_pods.get(name)),
                &prefixed(name, new_pods.get(name)),
            ),
            (o, n) => changes.push(change(
                &pod_field(name),
                o.cloned().unwrap_or(Value::Null),
                n.cloned().unwrap_or(Value::Null),
            )),
        }
    }
    changes
}

fn change(field: &str, old: Value, new: Value) -> FieldChange {
    FieldChange {
        field: field.to_owned(),
        old: redact_value(old),
        new: redact_value(new),
        after_restart: RESTART_ONLY.contains(&field),
    }
}

/// Passwords in any URL inside a JSON value replaced by `***`.
fn redact_value(v: Value) -> Value {
    match v {
        Value::String(s) if s.contains("://") => Value::String(redact(&s)),
        Value::Array(a) => Value::Array(a.into_iter().map(redact_value).collect()),
        Value::Object(m) => {
            Value::Object(m.into_iter().map(|(k, v)| (k, redact_value(v))).collect())
        }
        other => other,
    }
}

// === reload rules ===

/// A change a reload refuses unless forced: the field and why, with what to do instead.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Refusal {
    pub field: String,
    pub reason: String,
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.field, self.reason)
    }
}

/// The safety rules for replacing `running` with `new` (validation has passed already):
/// a field that needs a restart, a pool shrunk by more than half, a pod dropped that still
/// has tenants (`tenants` counts them per pod, from the catalog), and a field the running
/// file set that the new file leaves to its default (seed 004: a hand-tuned `size = 200`
/// silently became the default when an old file was restored).
pub fn reload_refusals(
    running: &ConfigSource,
    new: &ConfigSource,
    tenants: &BTreeMap<String, usize>,
) -> Vec<Refusal> {
    let mut out = Vec::new();
    let refuse = |field: &str, reason: String| Refusal {
        field: field.to_owned(),
        reason,
    };
    for c in diff(&running.config, &new.config) {
        if c.after_restart {
            out.push(refuse(
                &c.field,
                format!(
                    "changes from {} to {}, which only takes effect when podrouter restarts; restart it to apply this (with force the rest is applied now and this field keeps its running value until the restart)",
                    c.old, c.new
                ),
            ));
        }
    }
    let (old_size, new_size) = (running.config.pool.size, new.config.pool.size);
    if u64::from(new_size) * 2 < u64::from(old_size) {
        out.push(refuse(
            "pool.size",
            format!(
                "would shrink every pool from {old_size} to {new_size} server connections, by more than half at once; shrink to at least {} per reload",
                old_size.div_ceil(2)
            ),
        ));
    }
    let kept: BTreeSet<&str> = new.config.pods.iter().map(|p| p.name.as_str()).collect();
    for pod in &running.config.pods {
        let n = tenants.get(&pod.name).copied().unwrap_or(0);
        if !kept.contains(pod.name.as_str()) && n > 0 {
            out.push(refuse(
                &pod_field(&pod.name),
                format!(
                    "is no longer in the file but still has {n} tenant(s) in the catalog; move or delete them first, or keep the pod in the file (with force the pod stays in the catalog for its tenants)"
                ),
            ));
        }
    }
    let old_values = field_values(&to_json(&running.config));
    let new_values = field_values(&to_json(&new.config));
    for field in running.explicit.difference(&new.explicit) {
        if pod_of(field).is_some_and(|p| !kept.contains(p)) {
            continue; // the whole pod went; the rule above judges that
        }
        let show = |v: Option<&Value>| redact_value(v.cloned().unwrap_or(Value::Null));
        out.push(refuse(
            field,
            format!(
                "was set to {} in the running config but the new file no longer sets it, so it would fall back to the default {}; set it in the file (to the default if that is what you want)",
                show(old_values.get(field)),
                show(new_values.get(field)),
            ),
        ));
    }
    out
}

/// Host, port and user of a `postgres://` URL, checked the way the router will use them.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PgEndpoint {
    pub host: String,
    pub port: u16,
}

impl std::fmt::Display for PgEndpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.host, self.port)
    }
}

pub fn parse_pg_url(url: &str) -> Result<PgEndpoint, String> {
    if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
        return Err(format!("{:?} is not a postgres:// URL", redact(url)));
    }
    let opts = sqlx::postgres::PgConnectOptions::from_str(url)
        .map_err(|e| format!("{:?}: {e}", redact(url)))?;
    Ok(PgEndpoint {
        host: opts.get_host().to_owned(),
        port: opts.get_port(),
    })
}

/// The URL with any password replaced by `***`, for messages and logs.
pub fn redact(url: &str) -> String {
    if let Some((scheme, rest)) = url.split_once("://") {
        if let Some((userinfo, host)) = rest.split_once('@') {
            if let Some((user, _)) = userinfo.split_once(':') {
                return format!("{scheme}://{user}:***@{host}");
            }
        }
    }
    url.to_owned()
}

/// A config text with the password of every `scheme://user:password@host` replaced by `***`.
pub fn redact_text(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(i) = rest.find("://") {
        let (head, tail) = rest.split_at(i + 3);
        out.push_str(head);
        let end = tail
            .find(|c: char| c == '"' || c == '\'' || c.is_whitespace())
            .unwrap_or(tail.len());
        let (url, after) = tail.split_at(end);
        out.push_str(&redact(&format!("x://{url}"))[4..]);
        rest = after;
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = r#"
[router]
listen = "127.0.0.1:6432"
admin_listen = "127.0.0.1:9930"
catalog_url = "postgres://podrouter@127.0.0.1:5432/podrouter"

[[pod]]
name = "pod-a"
primary = "postgres://postgres@127.0.0.1:5433"
"#;

    /// One line per case: a change to the base config and the words the error must contain.
    fn check(extra: &str, expect: &str) {
        let text = format!("{BASE}{extra}");
        let result = Config::parse("pods.toml", &text)
            .and_then(|c| c.validate("pods.toml", None).map(|_| c));
        match (result, expect) {
            (Ok(_), "") => {}
            (Ok(_), want) => panic!("accepted, expected an error with {want:?}"),
            (Err(e), "") => panic!("rejected: {e}"),
            (Err(e), want) => {
                let msg = e.to_string();
                assert!(msg.starts_with("pods.toml: "), "{msg}");
                assert!(msg.contains(want), "{msg:?} should mention {want:?}");
            }
        }
    }

    #[test]
    fn validation_names_field_and_fix() {
        check("", "");
        check(
            "[pool]\nsize = 0\n",
            "pool.size: 0 is out of range; set it between 1 and 10000",
        );
        check("[pool]\nsise = 3\n", "unknown field `sise`");
        check(
            "[pool]\nmode = \"statement\"\n",
            "unknown variant `statement`",
        );
        check("[pool]\ncheckout_timeout = \"5\"\n", "has no unit");
        check(
            "[[pod]]\nname = \"pod-a\"\nprimary = \"postgres://x@h\"\n",
            "pod[1].name: pod \"pod-a\" appears twice",
        );
        check(
            "[[pod]]\nname = \"Pod B\"\nprimary = \"postgres://x@h\"\n",
            "pod[1].name",
        );
        check(
            "[[pod]]\nname = \"b\"\nprimary = \"mysql://x@h\"\n",
            "pod[1].primary",
        );
        check(
            "[[pod]]\nname = \"b\"\nprimary = \"postgres://x@h\"\nweight = 0.0\n",
            "pod[1].weight",
        );
        check(
            "[[pod]]\nname = \"b\"\nprimary = \"postgres://x@h\"\nhttp = [\"ftp://x\"]\n",
            "pod[1].http[0]",
        );
        check(
            "[[pod]]\nname = \"b\"\nprimary = \"postgres://x@h\"\nreplicas = [\"nope\"]\n",
            "pod[1].replicas[0]",
        );
    }

    #[test]
    fn limits_are_validated_and_sizes_parse() {
        check(
            "[limits]\nhttp_requests_per_ip = 10\nhttp_request_burst = 20\n",
            "",
        );
        check(
            "[limits]\nhttp_requests_per_ip = 0\nhttp_request_burst = 0\n",
            "",
        );
        check(
            "[limits]\nhttp_request_burst = 0\n",
            "limits.http_request_burst: 0 would refuse",
        );
        check("[limits]\nhttp_in_flight = 0\n", "limits.http_in_flight");
        check(
            "[limits]\nhttp_header_timeout = \"0s\"\n",
            "limits.http_header_timeout",
        );
        check("[limits]\nhttp_max_body = \"2XB\"\n", "is not a size");
        check("[http]\nmax_rows = 0\n", "http.max_rows");
        check(
            "[http]\nstatement_timeout = \"2h\"\n",
            "http.statement_timeout",
        );
        for (s, b) in [("512kB", 512 << 10), ("1MB", 1 << 20), ("7", 7), ("3B", 3)] {
            let parsed: ByteSize = s.parse().unwrap();
            assert_eq!(parsed.0, b, "{s}");
        }
        assert_eq!(ByteSize(1 << 20).to_string(), "1MB");
        assert_eq!(ByteSize(1000).to_string(), "1000B");
    }

    #[test]
    fn non_loopback_admin_needs_a_token() {
        let text = BASE.replace(
            "admin_listen = \"127.0.0.1:9930\"",
            "admin_listen = \"0.0.0.0:9930\"",
        );
        let c = Config::parse("pods.toml", &text).unwrap();
        let e = c.validate("pods.toml", None).unwrap_err().to_string();
        assert!(e.contains("router.admin_token_file"), "{e}");
    }

    #[test]
    fn durations_round_trip() {
        for (s, ms) in [
            ("250ms", 250),
            ("5s", 5000),
            ("2m", 120_000),
            ("1h", 3_600_000),
        ] {
            let d: Dur = s.parse().unwrap();
            assert_eq!(d.0.as_millis(), ms);
        }
        assert!("5 parsecs".parse::<Dur>().is_err());
        assert_eq!(Dur(Duration::from_millis(1500)).to_string(), "1500ms");
    }

    #[test]
    fn replica_lag_is_a_time_or_an_amount_of_wal() {
        let lag = |text: &str, want: ReplicaLag, shown: &str| {
            let got: ReplicaLag = text.parse().unwrap();
            assert_eq!((got, got.to_string().as_str()), (want, shown), "{text}");
        };
        lag("10s", ReplicaLag::Time(Duration::from_secs(10)), "10s");
        lag(
            "500ms",
            ReplicaLag::Time(Duration::from_millis(500)),
            "500ms",
        );
        lag("16MB", ReplicaLag::Bytes(16 << 20), "16MB");
        lag("512kB", ReplicaLag::Bytes(512 << 10), "512kB");
        lag("1000", ReplicaLag::Bytes(1000), "1000B");
        for bad in ["10 parsecs", "MB", "-1s", "99999999999999999999TB"] {
            assert!(bad.parse::<ReplicaLag>().is_err(), "{bad}");
        }
        let c = file("[pool]\nmax_replica_lag = 65536\n").config;
        assert_eq!(c.pool.max_replica_lag, ReplicaLag::Bytes(65536));
        assert_eq!(PoolConfig::default().max_replica_lag.to_string(), "10s");
        check("[pool]\nmax_replica_lag = \"2d\"\n", "is not a replica lag");
        check(
            "[pool]\nmax_replica_lag = \"25h\"\n",
            "pool.max_replica_lag",
        );
        check("[pool]\nmax_replica_lag = \"24h\"\n", "");
    }

    const POD_A: &str =
        "[[pod]]\nname = \"pod-a\"\nprimary = \"postgres://postgres@127.0.0.1:5433\"\n";
    const POD_B: &str = "[[pod]]\nname = \"pod-b\"\nprimary = \"postgres://u:pw@127.0.0.1:5434\"\n";

    fn source(text: String) -> ConfigSource {
        let s = ConfigSource::parse("pods.toml", text).unwrap();
        s.config.validate("pods.toml", None).unwrap();
        s
    }

    /// BASE's router section with `extra` after it (pods come from `extra`).
    fn file(extra: &str) -> ConfigSource {
        let router = BASE.split("[[pod]]").next().unwrap();
        source(format!("{router}{extra}"))
    }

    /// One line per case: the running file's extra, the new file's extra, and the changes
    /// expected as `field: old -> new`.
    fn check_diff(old: &str, new: &str, expect: &[&str]) {
        let got: Vec<String> = diff(&file(old).config, &file(new).config)
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(got, expect, "{old:?} -> {new:?}");
    }

    #[test]
    fn diff_names_each_changed_field() {
        check_diff("[pool]\nsize = 20\n", "[pool]\nsize = 20\n", &[]);
        check_diff("", "[pool]\nsize = 20\n", &[]); // 20 is the default
        check_diff(
            "[pool]\nsize = 5\n",
            "[pool]\nsize = 12\n",
            &["pool.size: 5 -> 12"],
        );
        check_diff(
            "",
            "[pool]\ncheckout_timeout = \"2s\"\n",
            &["pool.checkout_timeout: \"5s\" -> \"2s\""],
        );
        check_diff(
            POD_A,
            &format!("{POD_A}weight = 2.0\n"),
            &["pod[pod-a].weight: 1.0 -> 2.0"],
        );
        check_diff(&format!("{POD_A}{POD_B}"), &format!("{POD_B}{POD_A}"), &[]); // order is no change
        check_diff(
            POD_A,
            &format!("{POD_A}{POD_B}"),
            &[
                r#"pod[pod-b]: null -> {"accepting":true,"http":[],"name":"pod-b","primary":"postgres://u:***@127.0.0.1:5434","replicas":[],"weight":1.0}"#,
            ],
        );
        check_diff(
            &format!("{POD_A}{POD_B}"),
            POD_A,
            &[
                r#"pod[pod-b]: {"accepting":true,"http":[],"name":"pod-b","primary":"postgres://u:***@127.0.0.1:5434","replicas":[],"weight":1.0} -> null"#,
            ],
        );
    }

    /// One line per case: running extra, new extra, and for each expected refusal how its
    /// message starts (field first). pod-a has 3 tenants in the catalog, pod-b none.
    fn check_reload(old: &str, new: &str, expect: &[&str]) {
        let tenants = BTreeMap::from([("pod-a".to_owned(), 3)]);
        let got: Vec<String> = reload_refusals(&file(old), &file(new), &tenants)
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(got.len(), expect.len(), "{old:?} -> {new:?}: {got:#?}");
        for (g, want) in got.iter().zip(expect) {
            assert!(g.starts_with(want), "{g:?} should start with {want:?}");
        }
    }

    #[test]
    fn reload_refuses_unsafe_changes() {
        // Allowed: growing, shrinking by at most half, adding fields and pods, dropping an
        // empty pod.
        check_reload("[pool]\nsize = 20\n", "[pool]\nsize = 200\n", &[]);
        check_reload("[pool]\nsize = 20\n", "[pool]\nsize = 10\n", &[]);
        check_reload("", "[pool]\nsize = 10\n", &[]);
        check_reload(POD_A, &format!("{POD_A}{POD_B}"), &[]);
        check_reload(&format!("{POD_A}{POD_B}"), POD_A, &[]);
        check_reload("[pool]\nsize = 21\n", "[pool]\nsize = 11\n", &[]);
        // (a) pool shrunk by more than half.
        check_reload(
            "[pool]\nsize = 20\n",
            "[pool]\nsize = 5\n",
            &["pool.size: would shrink every pool from 20 to 5"],
        );
        check_reload("[pool]\nsize = 21\n", "[pool]\nsize = 10\n", &["pool.size: would shrink every pool from 21 to 10 server connections, by more than half at once; shrink to at least 11 per reload"]);
        // (b) a pod with tenants dropped.
        check_reload(
            &format!("{POD_A}{POD_B}"),
            POD_B,
            &["pod[pod-a]: is no longer in the file but still has 3 tenant(s)"],
        );
        // (c) an explicit field left to its default, even when the default is the same value.
        check_reload("[pool]\nsize = 200\n", "", &["pool.size: would shrink every pool from 200 to 20", "pool.size: was set to 200 in the running config but the new file no longer sets it, so it would fall back to the default 20"]);
        check_reload(
            "[pool]\ncheckout_timeout = \"5s\"\n",
            "",
            &["pool.checkout_timeout: was set to \"5s\""],
        );
        check_reload(&format!("{POD_A}weight = 3.0\n"), POD_A, &["pod[pod-a].weight: was set to 3.0 in the running config but the new file no longer sets it, so it would fall back to the default 1.0"]);
        check_reload("[auth]\n", "", &[]); // removing an empty section drops no field
                                           // Restart-only fields.
        check_reload("", "[pool]\nmax_clients = 10\n", &["pool.max_clients: changes from 20000 to 10, which only takes effect when podrouter restarts"]);
    }

    #[test]
    fn restart_only_fields_keep_their_running_values() {
        let running = file("");
        let mut new = file("[pool]\nmax_clients = 10\nsize = 7\n").config;
        new.router.listen = "127.0.0.1:7000".parse().unwrap();
        new.keep_restart_only(&running.config);
        assert_eq!((new.pool.max_clients, new.pool.size), (20_000, 7));
        assert_eq!(new.router.listen, running.config.router.listen);
        let changes = diff(&running.config, &file("[pool]\nmax_clients = 10\n").config);
        assert!(changes[0].after_restart, "{changes:?}");
    }

    #[test]
    fn tls_section_is_checked_at_load() {
        let dir = tempfile::tempdir().unwrap();
        let made = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
        let other = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
        let write = |name: &str, text: &str| std::fs::write(dir.path().join(name), text).unwrap();
        write("server.crt", &made.cert.pem());
        write("server.key", &made.signing_key.serialize_pem());
        write("other.key", &other.signing_key.serialize_pem());
        write("garbage.pem", "not a certificate\n");
        // One line per case: the [tls] section (paths relative to the config's directory)
        // and the words the error must contain ("" = valid).
        let check = |tls: &str, expect: &str| {
            let text = format!("{BASE}\n[tls]\n{tls}");
            let result = Config::parse("pods.toml", &text)
                .and_then(|c| c.validate("pods.toml", Some(dir.path())));
            match (result, expect) {
                (Ok(()), "") => {}
                (Ok(()), want) => panic!("{tls:?} accepted, expected {want:?}"),
                (Err(e), want) => {
                    let msg = e.to_string();
                    assert!(!want.is_empty(), "{tls:?} rejected: {msg}");
                    assert!(msg.starts_with("pods.toml: "), "{msg}");
                    assert!(msg.contains(want), "{msg:?} should mention {want:?}");
                }
            }
        };
        check(
            "cert_file = \"server.crt\"\nkey_file = \"server.key\"\n",
            "",
        );
        check(
            "cert_file = \"server.crt\"\nkey_file = \"server.key\"\nmode = \"require\"\n",
            "",
        );
        check("pod_tls = \"require\"\n", "");
        check("", "");
        check(
            "mode = \"require\"\n",
            "tls.mode: \"require\" needs a certificate, but cert_file and key_file are not set; set cert_file and key_file",
        );
        check(
            "cert_file = \"missing.crt\"\nkey_file = \"server.key\"\n",
            "tls.cert_file: cannot read",
        );
        check(
            "cert_file = \"missing.crt\"\nkey_file = \"server.key\"\n",
            "missing.crt",
        );
        check(
            "cert_file = \"garbage.pem\"\nkey_file = \"server.key\"\n",
            "tls.cert_file: ",
        );
        check(
            "cert_file = \"server.crt\"\nkey_file = \"server.crt\"\n",
            "tls.key_file: ",
        );
        check(
            "cert_file = \"server.crt\"\nkey_file = \"other.key\"\n",
            "tls.key_file: does not fit cert_file",
        );
        check(
            "cert_file = \"server.crt\"\n",
            "tls.key_file: missing while cert_file is set",
        );
        check(
            "key_file = \"server.key\"\n",
            "tls.cert_file: missing while key_file is set",
        );
        check(
            "pod_tls = \"verify-full\"\n",
            "tls.pod_ca_file: missing while pod_tls = \"verify-full\"",
        );
        check(
            "pod_tls = \"verify-full\"\npod_ca_file = \"server.crt\"\n",
            "",
        );
        check(
            "pod_tls = \"require\"\npod_ca_file = \"server.crt\"\n",
            "tls.pod_ca_file: is only used with pod_tls = \"verify-full\"",
        );
        check(
            "pod_tls = \"verify-full\"\npod_ca_file = \"garbage.pem\"\n",
            "tls.pod_ca_file: ",
        );
        check("pod_tls = \"verify\"\n", "unknown variant `verify`");
        check("mode = \"disable\"\n", "unknown variant `disable`");
        check("certfile = \"x\"\n", "unknown field `certfile`");
        // Every [tls] field is restart-only.
        check_reload(
            "",
            "[tls]\npod_tls = \"prefer\"\n",
            &["tls.mode: changes from null to \"prefer\", which only takes effect when podrouter restarts", "tls.pod_tls: changes from null to \"prefer\""],
        );
        let running = file("[tls]\npod_tls = \"prefer\"\n");
        let mut new = file("").config;
        new.keep_restart_only(&running.config);
        assert_eq!(new.tls, running.config.tls);
    }

    #[test]
    fn sources_know_their_explicit_fields_and_hash() {
        let s = file(&format!("[pool]\nsize = 7\n{POD_A}weight = 2.0\n"));
        for f in [
            "router.listen",
            "pool.size",
            "pod[pod-a].weight",
            "pod[pod-a].primary",
        ] {
            assert!(s.explicit.contains(f), "{f} in {:?}", s.explicit);
        }
        assert!(!s.explicit.contains("pool.checkout_timeout"));
        assert_eq!(s.hash.len(), 64);
        assert_eq!(
            sha256_hex("abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        let g = ConfigSource::generated(s.config.clone());
        assert_eq!(g.config, s.config);
        assert!(g.explicit.contains("pool.checkout_timeout"));
    }

    #[test]
    fn names_and_redaction() {
        assert!(valid_name("tenant1") && valid_name("pod-a") && valid_name("a_b"));
        assert!(
            !valid_name("")
                && !valid_name("1x")
                && !valid_name("A")
                && !valid_name("a b")
                && !valid_name(&"a".repeat(64))
        );
        assert_eq!(redact("postgres://u:pw@h:1/d"), "postgres://u:***@h:1/d");
        assert_eq!(redact("postgres://u@h"), "postgres://u@h");
        assert_eq!(
            redact_text("a = \"postgres://u:pw@h:1/d\"\nb = \"postgres://v@h\" # http://x:y@z\n"),
            "a = \"postgres://u:***@h:1/d\"\nb = \"postgres://v@h\" # http://x:***@z\n"
        );
    }

    #[test]
    fn example_config_in_repo_is_valid() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("pods.toml");
        let text = std::fs::read_to_string(&path).unwrap();
        let c = Config::parse("pods.toml", &text).unwrap();
        // The example points at a token file that does not exist here; validate the rest.
        let mut c2 = c.clone();
        c2.router.admin_token_file = None;
        c2.validate("pods.toml", None).unwrap();
        assert!(c.pods.len() >= 2);
    }
}
