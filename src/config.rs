//! `pods.toml`: the config types, parsing, and validation. Every error names the file, the
//! field and the fix; nothing reads a field before [`Config::load`] has validated it.

use serde::{Deserialize, Serialize};
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

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub router: RouterConfig,
    #[serde(default)]
    pub pool: PoolConfig,
    #[serde(default)]
    pub auth: AuthConfig,
    #[serde(default, rename = "pod")]
    pub pods: Vec<PodConfig>,
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
        }
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
}

mod defaults {
    use super::Dur;
    use std::time::Duration;
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
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            file: file.clone(),
            source,
        })?;
        let config = Config::parse(&file, &text)?;
        config.validate(&file, path.parent())?;
        Ok(config)
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
        if p.reset_query.trim().is_empty() {
            return Err(invalid(
                "pool.reset_query",
                "empty".into(),
                "use \"DISCARD ALL\" unless you know better",
            ));
        }
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
        }
        Ok(())
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
