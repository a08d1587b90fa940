//! The planner's inputs from what the router knows: pods from the catalog with their
//! capacity (`[[pod]] capacity`, × weight), tenants with their load from the last sample
//! (router busy time per second, database size), and each pod's ratios for the autopilot.

use super::{PodLoad, TenantLoad};
use crate::catalog::Snapshot;
use crate::config::{Config, PodCapacity};
use crate::fleet::{Fleet, FleetError};
use crate::metrics::sampler::FleetSample;
use serde::Serialize;

/// A pod's figures against its capacity, as the autopilot judges them.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PodFigures {
    pub busy: f64,
    pub busy_capacity: f64,
    pub busy_ratio: f64,
    pub backends: u64,
    pub max_connections: u64,
    pub connections_ratio: f64,
    pub bytes: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub disk_capacity: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub disk_ratio: Option<f64>,
    pub tenants: usize,
}

/// Everything the planner needs, from one catalog snapshot and one sample.
#[derive(Debug, Clone)]
pub struct FleetLoad {
    pub pods: Vec<PodLoad>,
    pub tenants: Vec<TenantLoad>,
    pub figures: Vec<(String, PodFigures)>,
}

pub fn capacity_of(config: &Config, pod: &str) -> PodCapacity {
    config
        .pods
        .iter()
        .find(|p| p.name == pod)
        .and_then(|p| p.capacity.clone())
        .unwrap_or_default()
}

/// Builds the planner's view (pure: tests call it with made-up inputs).
pub fn fleet_load(snap: &Snapshot, config: &Config, sample: &FleetSample) -> FleetLoad {
    let tenants: Vec<TenantLoad> = snap
        .tenants
        .iter()
        .filter(|t| t.state != "creating" && t.state != "deleting")
        .map(|t| TenantLoad {
            name: t.name.clone(),
            pod: t.pod.clone(),
            busy: sample.tenant_load.get(&t.name).copied().unwrap_or(0.0),
            bytes: sample
                .pods
                .get(&t.pod)
                .and_then(|p| p.databases.get(&t.name))
                .and_then(|d| d.size_bytes)
                .unwrap_or(0),
        })
        .collect();
    let mut pods = Vec::new();
    let mut figures = Vec::new();
    for p in &snap.pods {
        let cap = capacity_of(config, &p.name);
        let ps = sample.pods.get(&p.name);
        let disk_capacity = cap.disk_bytes.or_else(|| {
            ps.and_then(|s| s.host.as_ref())
                .and_then(|h| h.disk_size_bytes())
        });
        let pod = PodLoad {
            name: p.name.clone(),
            busy_capacity: cap.busy * p.weight,
            disk_capacity,
            accepting: p.accepting,
            draining: false,
        };
        let mine: Vec<&TenantLoad> = tenants.iter().filter(|t| t.pod == p.name).collect();
        let busy: f64 = mine.iter().map(|t| t.busy).sum();
        let bytes: u64 = mine.iter().map(|t| t.bytes).sum();
        let backends = ps.map_or(0, |s| s.backends);
        let max_connections = cap
            .connections
            .map(u64::from)
            .or_else(|| ps.map(|s| s.max_connections).filter(|m| *m > 0))
            .unwrap_or(0);
        figures.push((
            p.name.clone(),
            PodFigures {
                busy,
                busy_capacity: pod.busy_capacity,
                busy_ratio: if pod.busy_capacity > 0.0 {
                    busy / pod.busy_capacity
                } else {
                    0.0
                },
                backends,
                max_connections,
                connections_ratio: if max_connections > 0 {
                    backends as f64 / max_connections as f64
                } else {
                    0.0
                },
                bytes,
                disk_capacity,
                disk_ratio: disk_capacity
                    .filter(|c| *c > 0)
                    .map(|c| bytes as f64 / c as f64),
                tenants: mine.len(),
            },
        ));
        pods.push(pod);
    }
    FleetLoad {
        pods,
        tenants,
        figures,
    }
}

/// The planner's view of the fleet now.
pub async fn current(fleet: &Fleet) -> Result<FleetLoad, FleetError> {
    let snap = fleet.catalog.snapshot().await?;
    Ok(fleet_load(
        &snap,
        &fleet.config.load(),
        &fleet.metrics.samples.load(),
    ))
}
