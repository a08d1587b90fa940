//! Read-only routing: which replica of a pod a session that asked for one
//! (`-c podrouter.target=replica`) gets for its next server connection. Only replicas the
//! health monitor saw, recently, up, in recovery and within `pool.max_replica_lag` qualify;
//! when none does the session uses the primary (the documented fallback), so a read-only
//! client keeps working, only without offloading the primary.

use super::PodRoute;
use crate::config::{PgEndpoint, ReplicaLag};
use crate::health::HealthSnapshot;

/// A replica of `pod` fit for reads, or None (use the primary). Several fit replicas are
/// shared out by `spread` (the client's id), so one client stays on one replica while it
/// remains fit.
pub fn readable<'r>(
    pod: &'r PodRoute,
    health: &HealthSnapshot,
    max_lag: ReplicaLag,
    spread: u64,
) -> Option<&'r PgEndpoint> {
    if pod.replica_endpoints.is_empty() || !health.fresh() {
        return None;
    }
    let probed = health.pods.get(&pod.name)?;
    let fit = |e: &&PgEndpoint| {
        probed
            .replicas
            .iter()
            .any(|r| r.endpoint.as_ref() == Some(*e) && r.readable(max_lag))
    };
    let count = pod.replica_endpoints.iter().filter(fit).count();
    if count == 0 {
        return None;
    }
    pod.replica_endpoints
        .iter()
        .filter(fit)
        .nth((spread % count as u64) as usize)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::health::{NodeHealth, PodHealth, Reading};
    use std::collections::HashMap;
    use std::time::{Duration, Instant};

    const PRIMARY: &str = "postgres://su@127.0.0.1:6001";
    const R1: &str = "postgres://su@127.0.0.1:6002";
    const R2: &str = "postgres://su@127.0.0.1:6003";

    fn node(url: &str, in_recovery: bool, delay: f64) -> NodeHealth {
        NodeHealth {
            url: url.into(),
            endpoint: crate::config::parse_pg_url(url).ok(),
            reading: Ok(Reading {
                in_recovery,
                lsn: 0,
                receive_lsn: None,
                replay_delay: delay,
            }),
            lag_bytes: Some(0),
        }
    }

    fn pod() -> PodRoute {
        let ep = |u| crate::config::parse_pg_url(u).unwrap();
        PodRoute {
            name: "a".into(),
            primary: ep(PRIMARY),
            admin_url: PRIMARY.into(),
            replicas: vec![R1.into(), R2.into()],
            replica_endpoints: vec![ep(R1), ep(R2)],
            http: vec![],
            weight: 1.0,
            accepting: true,
            pool_mode: None,
        }
    }

    fn snapshot(replicas: Vec<NodeHealth>, taken: Instant) -> HealthSnapshot {
        HealthSnapshot {
            taken: Some(taken),
            pods: HashMap::from([(
                "a".to_owned(),
                PodHealth {
                    primary: node(PRIMARY, false, 0.0),
                    replicas,
                },
            )]),
        }
    }

    #[test]
    fn picks_fit_replicas_else_none() {
        let p = pod();
        let lag = ReplicaLag::Time(Duration::from_secs(10));
        let port = |h: &HealthSnapshot, spread| readable(&p, h, lag, spread).map(|e| e.port);
        let now = Instant::now();

        let both = snapshot(vec![node(R1, true, 0.0), node(R2, true, 1.0)], now);
        assert_eq!((port(&both, 0), port(&both, 1)), (Some(6002), Some(6003)));
        let lagging = snapshot(vec![node(R1, true, 30.0), node(R2, true, 1.0)], now);
        assert_eq!(
            (port(&lagging, 0), port(&lagging, 1)),
            (Some(6003), Some(6003))
        );
        let promoted = snapshot(vec![node(R1, false, 0.0), node(R2, true, 11.0)], now);
        assert_eq!(port(&promoted, 0), None, "none fit: the primary");
        assert_eq!(port(&HealthSnapshot::default(), 0), None, "never probed");
        let old = snapshot(
            vec![node(R1, true, 0.0)],
            now - crate::health::STALE_AFTER - Duration::from_secs(1),
        );
        assert_eq!(port(&old, 0), None, "a stale snapshot is not trusted");
    }
}
