//! Pod providers: where a split's new pod comes from (`[provider]` in pods.toml).
//!
//! - `static`: a pod already in the catalog (listed in pods.toml) that holds no tenants and
//!   accepts them: a spare.
//! - `local`: a new cluster made with [`crate::localpg`] under `provider.dir` on this
//!   machine, started by this router and stopped with it (the next start starts it again).
//!   The demo and the tests use it.
//! - `command`: an operator's script (`sh -c`), given `PODROUTER_POD` and
//!   `PODROUTER_SOURCE_POD`, that makes a pod (a cloud instance, a Kubernetes cluster) and
//!   prints its primary's superuser URL on the first line of its stdout.
//!
//! A new pod is registered in the catalog with [`Fleet::add_pod`] (so it appears in
//! `GET /v1/pods`) before any tenant moves there.

use crate::config::{self, ProviderKind};
use crate::fleet::{ErrorKind, Fleet, FleetError};
use crate::localpg::{self, LocalCluster, PgBinaries};
use std::path::PathBuf;
use std::time::Duration;

/// Local clusters this router started; stopped at shutdown.
#[derive(Default)]
pub struct LocalPods {
    clusters: tokio::sync::Mutex<Vec<LocalCluster>>,
}

impl LocalPods {
    pub async fn stop_all(&self) {
        for mut c in self.clusters.lock().await.drain(..) {
            c.stop().await;
        }
    }
}

/// A pod ready for tenants, registered in the catalog.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ProvidedPod {
    pub name: String,
    /// The primary's URL, password redacted.
    pub primary: String,
    pub provider: &'static str,
}

fn provider_error(message: String) -> FleetError {
    FleetError::new(ErrorKind::Unavailable, "provider_failed", message)
}

/// The name a new pod split off `source` gets: the source's name with its trailing number
/// replaced by the next free one (`pod1`, `pod2` → `pod3`), else `<source>-2`, `-3`, ...
pub fn next_pod_name(existing: &[&str], source: &str) -> String {
    let stem = source.trim_end_matches(|c: char| c.is_ascii_digit());
    let numbered = stem.len() < source.len();
    let (stem, first) = if numbered {
        (stem.to_owned(), 1u32)
    } else {
        (format!("{source}-"), 2u32)
    };
    let highest = existing
        .iter()
        .filter_map(|n| n.strip_prefix(stem.as_str())?.parse::<u32>().ok())
        .max()
        .unwrap_or(first - 1);
    format!("{stem}{}", highest.max(first - 1) + 1)
}

/// The name the provider would give a pod split off `source` (for dry runs).
pub async fn planned_name(fleet: &Fleet, source: &str) -> Result<String, FleetError> {
    let snap = fleet.catalog.snapshot().await?;
    if let Some(ProviderKind::Static) = fleet.config.load().provider.as_ref().map(|p| p.kind) {
        if let Some(spare) = spare_pod(&snap, source) {
            return Ok(spare);
        }
    }
    let names: Vec<&str> = snap.pods.iter().map(|p| p.name.as_str()).collect();
    Ok(next_pod_name(&names, source))
}

fn spare_pod(snap: &crate::catalog::Snapshot, source: &str) -> Option<String> {
    snap.pods
        .iter()
        .filter(|p| p.name != source && p.accepting)
        .find(|p| !snap.tenants.iter().any(|t| t.pod == p.name))
        .map(|p| p.name.clone())
}

/// Gets a new pod for a split of `source` from the configured provider.
pub async fn provide(fleet: &Fleet, source: &str, actor: &str) -> Result<ProvidedPod, FleetError> {
    let config = fleet.config.load_full();
    let Some(p) = config.provider.clone() else {
        return Err(FleetError::new(
            ErrorKind::Conflict,
            "no_provider",
            "no pod provider is configured: add a [provider] section to pods.toml (kind = \"static\", \"local\" or \"command\"), or name an existing pod with {\"to\": \"POD\"}",
        ));
    };
    let snap = fleet.catalog.snapshot().await?;
    let names: Vec<&str> = snap.pods.iter().map(|p| p.name.as_str()).collect();
    let name = next_pod_name(&names, source);
    let (name, primary, kind) = match p.kind {
        ProviderKind::Static => {
            let spare = spare_pod(&snap, source).ok_or_else(|| {
                FleetError::new(
                    ErrorKind::Conflict,
                    "no_spare_pod",
                    "the static provider found no spare pod (one that accepts tenants and holds none): add one to pods.toml and reload, or name a pod with {\"to\": \"POD\"}",
                )
            })?;
            let url = snap
                .pods
                .iter()
                .find(|x| x.name == spare)
                .map(|x| x.primary_url.clone())
                .unwrap_or_default();
            return Ok(ProvidedPod {
                name: spare,
                primary: config::redact(&url),
                provider: "static",
            });
        }
        ProviderKind::Local => (name.clone(), local_pod(fleet, &name).await?, "local"),
        ProviderKind::Command => {
            let cmd = p.command.clone().unwrap_or_default();
            (
                name.clone(),
                command_pod(&cmd, &name, source, p.timeout.0).await?,
                "command",
            )
        }
    };
    fleet
        .add_pod(
            crate::fleet::NewPod::new(&name, &primary),
            actor,
            serde_json::json!({"provider": kind, "split_of": source}),
        )
        .await?;
    Ok(ProvidedPod {
        name,
        primary: config::redact(&primary),
        provider: kind,
    })
}

/// The config file's directory (where `podrouter demo` keeps its initdb template too).
fn config_dir(fleet: &Fleet) -> PathBuf {
    fleet
        .config_path
        .as_deref()
        .and_then(|p| p.parent())
        .map(|p| p.to_path_buf())
        .unwrap_or_else(|| PathBuf::from("."))
}

/// Where the local provider keeps its clusters: `provider.dir` (relative to the config
/// file), default `provisioned/` beside the config file.
fn local_dir(fleet: &Fleet) -> PathBuf {
    let base = config_dir(fleet);
    let dir = fleet
        .config
        .load()
        .provider
        .as_ref()
        .and_then(|p| p.dir.clone())
        .unwrap_or_else(|| PathBuf::from("provisioned"));
    if dir.is_relative() {
        base.join(dir)
    } else {
        dir
    }
}

async fn local_pod(fleet: &Fleet, name: &str) -> Result<String, FleetError> {
    let dir = local_dir(fleet);
    let cache = config_dir(fleet);
    let failed = |e: String| {
        provider_error(format!(
            "the local provider could not make pod {name:?}: {e}"
        ))
    };
    let (bins, datadir) = {
        let dir = dir.clone();
        let name = name.to_owned();
        tokio::task::spawn_blocking(move || {
            std::fs::create_dir_all(&dir)
                .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
            let made = (|| {
                localpg::make_traversable(&dir)?;
                let bins = PgBinaries::find()?;
                let template = localpg::template(&bins, &cache)?;
                let datadir = dir.join(&name);
                LocalCluster::create(&bins, &template, &datadir)?;
                Ok::<_, localpg::LocalPgError>((bins, datadir))
            })();
            made.map_err(|e| e.to_string())
        })
        .await
        .map_err(|e| provider_error(format!("the local provider's task failed: {e}")))?
        .map_err(failed)?
    };
    let cluster = LocalCluster::start(&bins, &datadir, localpg::free_port(), &[])
        .await
        .map_err(|e| failed(e.to_string()))?;
    let url = cluster.url();
    tracing::info!(pod = name, %url, "local provider started a new pod");
    fleet.planner.local.clusters.lock().await.push(cluster);
    Ok(url)
}

/// Starts again the local provider's clusters that the catalog still lists as pods (on
/// the port in their URL), so a restarted router finds its split-off pods up.
pub async fn restart_local(fleet: &Fleet) {
    if fleet.config.load().provider.as_ref().map(|p| p.kind) != Some(ProviderKind::Local) {
        return;
    }
    let dir = local_dir(fleet);
    let Ok(snap) = fleet.catalog.snapshot().await else {
        return;
    };
    let Ok(bins) = PgBinaries::find() else { return };
    for pod in &snap.pods {
        let datadir = dir.join(&pod.name);
        if !datadir.join("PG_VERSION").exists() {
            continue;
        }
        let Ok(endpoint) = config::parse_pg_url(&pod.primary_url) else {
            continue;
        };
        if health_answers(&pod.primary_url).await {
            continue; // already running (another router on this machine started it)
        }
        match LocalCluster::start(&bins, &datadir, endpoint.port, &[]).await {
            Ok(c) => {
                tracing::info!(pod = %pod.name, "local provider restarted its pod");
                fleet.planner.local.clusters.lock().await.push(c);
            }
            Err(e) => tracing::warn!(pod = %pod.name, "local provider cannot restart its pod: {e}"),
        }
    }
}

async fn health_answers(url: &str) -> bool {
    matches!(
        tokio::time::timeout(Duration::from_secs(2), crate::podadmin::connect(url, None)).await,
        Ok(Ok(_))
    )
}

async fn command_pod(
    cmd: &str,
    name: &str,
    source: &str,
    timeout: Duration,
) -> Result<String, FleetError> {
    let run = tokio::process::Command::new("sh")
        .arg("-c")
        .arg(cmd)
        .env("PODROUTER_POD", name)
        .env("PODROUTER_SOURCE_POD", source)
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(timeout, run)
        .await
        .map_err(|_| provider_error(format!("the provider command did not finish within {timeout:?}; it must print the new pod's URL and exit")))?
        .map_err(|e| provider_error(format!("cannot run the provider command: {e}")))?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        return Err(provider_error(format!(
            "the provider command failed ({}): {}",
            out.status,
            stderr.trim().lines().last().unwrap_or("")
        )));
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    let url = stdout.lines().next().unwrap_or("").trim().to_owned();
    config::parse_pg_url(&url).map_err(|e| {
        provider_error(format!(
            "the provider command printed {:?} on its first line, not a pod URL ({e}); print postgres://USER[:PASSWORD]@HOST:PORT",
            config::redact(&url)
        ))
    })?;
    Ok(url)
}

#[cfg(test)]
mod tests {
    use super::next_pod_name;

    #[test]
    fn pod_names() {
        let check = |existing: &[&str], source: &str, want: &str| {
            assert_eq!(
                next_pod_name(existing, source),
                want,
                "{existing:?} {source}"
            )
        };
        check(&["pod1", "pod2"], "pod1", "pod3");
        check(&["pod1", "pod2", "pod7"], "pod2", "pod8");
        check(&["pod-a", "pod-b"], "pod-a", "pod-a-2");
        check(&["pod-a", "pod-a-2"], "pod-a", "pod-a-3");
        check(&["eu0"], "eu0", "eu1");
    }
}
