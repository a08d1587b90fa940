//! The RoutingTable: an immutable snapshot of tenant → pod and role → verifier, built from the
//! catalog and published through `ArcSwap`. The hot path does one lock-free `load()` and a
//! hash lookup.
//!
//! Replace order (do not change without reading ARCHITECTURE.md, "Invariants"):
//! 1. build a complete new table from one consistent catalog snapshot,
//! 2. `store()` it — new connections and checkouts see the new routes from here on,
//! 3. old sessions keep the `Arc`s they hold and finish on the old route; pools keyed by an
//!    old route are retired when idle.

pub mod pause;
pub mod placement;
pub mod replica;

use crate::catalog::Snapshot;
use crate::config::{parse_pg_url, PgEndpoint, PoolMode};
use crate::protocol::scram::Verifier;
use arc_swap::ArcSwap;
use std::collections::{HashMap, HashSet};
use std::sync::Arc;

#[derive(Debug)]
pub struct PodRoute {
    pub name: String,
    /// Where tenant traffic goes: the primary's host and port.
    pub primary: PgEndpoint,
    /// The admin URL of the primary (may hold a password: never log it unredacted).
    pub admin_url: String,
    /// The replicas' admin URLs, as listed in the catalog.
    pub replicas: Vec<String>,
    /// The replicas' hosts and ports, where read-only sessions go ([`replica`]).
    pub replica_endpoints: Vec<PgEndpoint>,
    pub http: Vec<String>,
    pub weight: f64,
    pub accepting: bool,
    /// Default pool mode of the pod's tenants.
    pub pool_mode: Option<PoolMode>,
}

impl PodRoute {
    /// Whether `endpoint` is one of this pod's servers (its primary or a replica).
    pub fn serves(&self, endpoint: &PgEndpoint) -> bool {
        self.primary == *endpoint || self.replica_endpoints.contains(endpoint)
    }
}

/// The replicas' endpoints; one whose URL does not parse is left out with a warning.
fn replica_endpoints(pod: &str, urls: &[String]) -> Vec<PgEndpoint> {
    urls.iter()
        .filter_map(|u| match parse_pg_url(u) {
            Ok(e) => Some(e),
            Err(e) => {
                tracing::warn!(pod, "replica skipped: {e}");
                None
            }
        })
        .collect()
}

#[derive(Debug)]
pub struct TenantRoute {
    pub name: String,
    pub pod: Arc<PodRoute>,
    pub route_version: i64,
    pub state: String,
    pub grants: HashSet<String>,
    /// The tenant's own pool mode, overriding its pod's.
    pub pool_mode: Option<PoolMode>,
}

impl TenantRoute {
    /// The pool mode for this tenant's sessions: its own, else its pod's, else `default`.
    pub fn pool_mode(&self, default: PoolMode) -> PoolMode {
        self.pool_mode.or(self.pod.pool_mode).unwrap_or(default)
    }
}

#[derive(Debug)]
pub struct RoleAuth {
    pub name: String,
    pub verifier: Verifier,
}

#[derive(Debug, Default)]
pub struct RoutingTable {
    pub pods: HashMap<String, Arc<PodRoute>>,
    pub tenants: HashMap<String, Arc<TenantRoute>>,
    pub roles: HashMap<String, Arc<RoleAuth>>,
    /// Unique per table built in this process (the empty default is 0): a session that saw
    /// this generation last needs no lookup of its tenant again.
    pub generation: u64,
}

fn next_generation() -> u64 {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

impl RoutingTable {
    /// Builds a table from a catalog snapshot. Rows that cannot be used (a pod URL that does
    /// not parse, a verifier that does not parse) are skipped with a warning rather than
    /// taking every other tenant down with them.
    pub fn build(snap: &Snapshot) -> RoutingTable {
        let mut pods = HashMap::new();
        for p in &snap.pods {
            match parse_pg_url(&p.primary_url) {
                Ok(primary) => {
                    pods.insert(
                        p.name.clone(),
                        Arc::new(PodRoute {
                            name: p.name.clone(),
                            primary,
                            admin_url: p.primary_url.clone(),
                            replicas: p.replicas.clone(),
                            replica_endpoints: replica_endpoints(&p.name, &p.replicas),
                            http: p.http.clone(),
                            weight: p.weight,
                            accepting: p.accepting,
                            pool_mode: p.pool_mode.as_deref().and_then(|m| m.parse().ok()),
                        }),
                    );
                }
                Err(e) => tracing::warn!(pod = %p.name, "pod skipped: {e}"),
            }
        }
        let mut tenants = HashMap::new();
        for t in &snap.tenants {
            // A tenant still being created has no database yet.
            if t.state == "creating" || t.state == "deleting" {
                continue;
            }
            let Some(pod) = pods.get(&t.pod) else {
                tracing::warn!(tenant = %t.name, pod = %t.pod, "tenant skipped: its pod is not usable");
                continue;
            };
            tenants.insert(
                t.name.clone(),
                Arc::new(TenantRoute {
                    name: t.name.clone(),
                    pod: pod.clone(),
                    route_version: t.route_version,
                    state: t.state.clone(),
                    grants: t.roles.iter().cloned().collect(),
                    pool_mode: t.pool_mode.as_deref().and_then(|m| m.parse().ok()),
                }),
            );
        }
        let mut roles = HashMap::new();
        for r in &snap.roles {
            match Verifier::parse(&r.verifier) {
                Ok(verifier) => {
                    roles.insert(
                        r.name.clone(),
                        Arc::new(RoleAuth {
                            name: r.name.clone(),
                            verifier,
                        }),
                    );
                }
                Err(e) => tracing::warn!(role = %r.name, "role skipped: {e}"),
            }
        }
        RoutingTable {
            pods,
            tenants,
            roles,
            generation: next_generation(),
        }
    }

    /// This table with one tenant routed to `pod` at `route_version` and active: what a
    /// live move stores right after its route switch commits, without a catalog round trip.
    /// None when the tenant or the pod is unknown here.
    pub fn with_tenant_moved(
        &self,
        tenant: &str,
        pod: &str,
        route_version: i64,
    ) -> Option<RoutingTable> {
        let old = self.tenants.get(tenant)?;
        let pod = self.pods.get(pod)?.clone();
        let mut tenants = self.tenants.clone();
        tenants.insert(
            tenant.to_owned(),
            Arc::new(TenantRoute {
                name: old.name.clone(),
                pod,
                route_version,
                state: "active".into(),
                grants: old.grants.clone(),
                pool_mode: old.pool_mode,
            }),
        );
        Some(RoutingTable {
            pods: self.pods.clone(),
            tenants,
            roles: self.roles.clone(),
            generation: next_generation(),
        })
    }

    pub fn tenant(&self, name: &str) -> Option<&Arc<TenantRoute>> {
        self.tenants.get(name)
    }

    /// The role's verifier when it exists *and* is granted on the tenant.
    pub fn authorized(&self, tenant: &TenantRoute, role: &str) -> Option<&Arc<RoleAuth>> {
        if !tenant.grants.contains(role) {
            return None;
        }
        self.roles.get(role)
    }
}

/// The published table.
pub type SharedTable = Arc<ArcSwap<RoutingTable>>;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::{PodRow, RoleRow, TenantRow};

    #[test]
    fn builds_routes_and_checks_grants() {
        let snap = Snapshot {
            pods: vec![PodRow {
                name: "a".into(),
                primary_url: "postgres://su@127.0.0.1:5433".into(),
                replicas: vec![],
                http: vec![],
                weight: 1.0,
                accepting: true,
                pool_mode: Some("session".into()),
            }],
            tenants: vec![
                TenantRow {
                    name: "t1".into(),
                    pod: "a".into(),
                    route_version: 3,
                    state: "active".into(),
                    roles: vec!["app".into()],
                    pool_mode: None,
                },
                TenantRow {
                    name: "t2".into(),
                    pod: "a".into(),
                    route_version: 1,
                    state: "creating".into(),
                    roles: vec![],
                    pool_mode: None,
                },
                TenantRow {
                    name: "t3".into(),
                    pod: "gone".into(),
                    route_version: 1,
                    state: "active".into(),
                    roles: vec![],
                    pool_mode: Some("transaction".into()),
                },
            ],
            roles: vec![
                RoleRow {
                    name: "app".into(),
                    verifier: Verifier::generate("pw"),
                },
                RoleRow {
                    name: "other".into(),
                    verifier: Verifier::generate("pw"),
                },
            ],
        };
        let t = RoutingTable::build(&snap);
        let t1 = t.tenant("t1").unwrap();
        assert_eq!(t1.pod.primary.port, 5433);
        assert_eq!(t1.route_version, 3);
        assert_eq!(
            t1.pool_mode(PoolMode::Transaction),
            PoolMode::Session,
            "the pod's default applies"
        );
        assert!(
            t.tenant("t2").is_none(),
            "a tenant being created is not routable"
        );
        assert!(
            t.tenant("t3").is_none(),
            "a tenant on an unknown pod is not routable"
        );
        assert!(t.authorized(t1, "app").is_some());
        assert!(
            t.authorized(t1, "other").is_none(),
            "a role not granted on the tenant"
        );
        assert!(t.authorized(t1, "ghost").is_none());
    }
}
