//! Placement of new tenants: a weighted consistent hash ring over the pods that accept
//! tenants. Hashing is deterministic across processes and versions (the ring's FNV for
//! vnodes; tenant names are first mixed through SHA-256, because FNV alone clusters names
//! that differ only in their last characters, like `tenant1..tenant8`), and each pod gets
//! vnodes in proportion to its weight. After placement the catalog is the truth: moves
//! and splits change single rows and never re-hash anyone.

use consistent_hash_ring::RingBuilder;

/// Virtual nodes per unit of weight.
const VNODES_PER_WEIGHT: f64 = 64.0;

/// A pod as placement sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct Candidate<'a> {
    pub name: &'a str,
    pub weight: f64,
    pub accepting: bool,
}

/// The pod a new tenant lands on, or `None` when no pod accepts tenants.
pub fn place<'a>(tenant: &str, pods: &[Candidate<'a>]) -> Option<&'a str> {
    let mut nodes: Vec<(&'a str, usize)> = pods
        .iter()
        .filter(|p| p.accepting && p.weight > 0.0)
        .map(|p| {
            (
                p.name,
                ((p.weight * VNODES_PER_WEIGHT).round() as usize).max(1),
            )
        })
        .collect();
    // The ring's layout must not depend on the order pods were listed in.
    nodes.sort_unstable();
    if nodes.is_empty() {
        return None;
    }
    let ring = RingBuilder::default().weighted_nodes(&nodes).build();
    Some(*ring.get(ring_key(tenant)))
}

/// A well-mixed, stable 64-bit key for a tenant name.
fn ring_key(tenant: &str) -> u64 {
    use sha2::{Digest, Sha256};
    let d = Sha256::digest(tenant.as_bytes());
    u64::from_be_bytes(d[..8].try_into().expect("8 bytes"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pods(spec: &[(&'static str, f64, bool)]) -> Vec<Candidate<'static>> {
        spec.iter()
            .map(|&(name, weight, accepting)| Candidate {
                name,
                weight,
                accepting,
            })
            .collect()
    }

    fn share(spec: &[(&'static str, f64, bool)], pod: &str) -> f64 {
        let p = pods(spec);
        let n = 4000;
        let hits = (0..n)
            .filter(|i| place(&format!("tenant{i}"), &p) == Some(pod))
            .count();
        hits as f64 / n as f64
    }

    #[test]
    fn deterministic_and_order_independent() {
        let a = pods(&[("a", 1.0, true), ("b", 1.0, true), ("c", 1.0, true)]);
        let mut b = a.clone();
        b.reverse();
        for i in 0..200 {
            let t = format!("t{i}");
            assert_eq!(place(&t, &a), place(&t, &b));
        }
    }

    #[test]
    fn respects_weights_and_accepting() {
        let even = share(&[("a", 1.0, true), ("b", 1.0, true)], "a");
        assert!((0.4..0.6).contains(&even), "{even}");
        let heavy = share(&[("a", 3.0, true), ("b", 1.0, true)], "a");
        assert!((0.65..0.85).contains(&heavy), "{heavy}");
        assert_eq!(share(&[("a", 1.0, false), ("b", 1.0, true)], "a"), 0.0);
        assert_eq!(place("t", &pods(&[("a", 1.0, false)])), None);
        assert_eq!(place("t", &[]), None);
    }

    #[test]
    fn sequential_names_spread() {
        // Names that differ only in their last character must not cluster on one pod.
        let p = pods(&[("pod1", 1.0, true), ("pod2", 1.0, true)]);
        for prefix in ["tenant", "spread", "t"] {
            let on_first = (1..=8)
                .filter(|i| place(&format!("{prefix}{i}"), &p) == Some("pod1"))
                .count();
            assert!(
                (2..=6).contains(&on_first),
                "{prefix}1..8: {on_first} of 8 on pod1"
            );
        }
    }

    #[test]
    fn adding_a_pod_moves_only_its_share() {
        let before = pods(&[("a", 1.0, true), ("b", 1.0, true)]);
        let after = pods(&[("a", 1.0, true), ("b", 1.0, true), ("c", 1.0, true)]);
        let n = 3000;
        let moved = (0..n)
            .filter(|i| {
                let t = format!("tenant{i}");
                let (x, y) = (place(&t, &before), place(&t, &after));
                x != y && y != Some("c")
            })
            .count();
        assert_eq!(moved, 0, "tenants only ever move to the new pod");
    }
}
