//! What a reload does to each listener: a pure comparison of the endpoints
//! served now with those of the new configuration, each with what its
//! target's behaviour depends on (the target's fingerprint).
//!
//! An endpoint (a TCP address or a Unix socket path) is a target's
//! identity: the same endpoint with the same fingerprint is kept as it is
//! (its listener, its target, its connections); with another fingerprint
//! it is changed (new connections get the new target); an endpoint only
//! the new configuration has is added, one only the old has is removed.

/// The endpoints in each group: `keep`, `change` and `add` in the new
/// configuration's order, `remove` in the old one's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Plan<K> {
    pub(super) keep: Vec<K>,
    pub(super) change: Vec<K>,
    pub(super) add: Vec<K>,
    pub(super) remove: Vec<K>,
}

impl<K> Plan<K> {
    /// Whether the reload changes nothing at all.
    pub(super) fn is_noop(&self) -> bool {
        self.change.is_empty() && self.add.is_empty() && self.remove.is_empty()
    }
}

/// Compares `old` and `new` (endpoint, fingerprint) lists. An endpoint
/// listed twice counts once, as first listed (the configuration refuses
/// two targets on one endpoint before this runs).
pub(super) fn plan<K: PartialEq + Clone, S: PartialEq>(old: &[(K, S)], new: &[(K, S)]) -> Plan<K> {
    let first = |list: &[(K, S)], i: usize| !list[..i].iter().any(|(k, _)| *k == list[i].0);
    let mut plan = Plan {
        keep: Vec::new(),
        change: Vec::new(),
        add: Vec::new(),
        remove: Vec::new(),
    };
    for (i, (key, settings)) in new.iter().enumerate() {
        if !first(new, i) {
            continue;
        }
        match old.iter().find(|(k, _)| k == key) {
            Some((_, before)) if before == settings => plan.keep.push(key.clone()),
            Some(_) => plan.change.push(key.clone()),
            None => plan.add.push(key.clone()),
        }
    }
    for (i, (key, _)) in old.iter().enumerate() {
        if first(old, i) && !new.iter().any(|(k, _)| k == key) {
            plan.remove.push(key.clone());
        }
    }
    plan
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::listener::Endpoint;

    fn tcp(port: u16) -> Endpoint {
        Endpoint::Tcp(([127, 0, 0, 1], port).into())
    }

    fn unix(path: &str) -> Endpoint {
        Endpoint::Unix(path.into())
    }

    #[test]
    fn the_same_configuration_keeps_everything() {
        let set = [
            (tcp(5432), "a"),
            (unix("/run/k/.s.PGSQL.5432"), "a"),
            (tcp(3306), "b"),
        ];
        let plan = plan(&set, &set);
        assert_eq!(
            plan.keep,
            [tcp(5432), unix("/run/k/.s.PGSQL.5432"), tcp(3306)]
        );
        assert!(plan.is_noop());
    }

    #[test]
    fn each_endpoint_is_kept_changed_added_or_removed() {
        let old = [(tcp(5432), "a"), (tcp(5433), "b"), (tcp(5434), "c")];
        let new = [(tcp(5435), "d"), (tcp(5433), "b2"), (tcp(5432), "a")];
        assert_eq!(
            plan(&old, &new),
            Plan {
                keep: vec![tcp(5432)],
                change: vec![tcp(5433)],
                add: vec![tcp(5435)],
                remove: vec![tcp(5434)],
            }
        );
    }

    #[test]
    fn a_target_moved_to_another_endpoint_is_removed_there_and_added_here() {
        let old = [(tcp(5432), "a")];
        let new = [(tcp(6432), "a")];
        let plan = plan(&old, &new);
        assert_eq!((plan.add, plan.remove), (vec![tcp(6432)], vec![tcp(5432)]));
        assert!(plan.keep.is_empty() && plan.change.is_empty());
    }

    #[test]
    fn another_target_on_a_served_endpoint_is_a_change_not_a_new_listener() {
        // The listener stays bound: no moment without it, no bind race.
        let old = [(tcp(5432), "postgres://db-a")];
        let new = [(tcp(5432), "postgres://db-b")];
        let plan = plan(&old, &new);
        assert_eq!(plan.change, [tcp(5432)]);
        assert!(plan.add.is_empty() && plan.remove.is_empty());
    }

    #[test]
    fn a_unix_socket_and_a_tcp_port_are_separate_endpoints() {
        // A target that gains a Unix socket keeps its TCP listener.
        let old = [(tcp(5432), "a")];
        let new = [(tcp(5432), "a"), (unix("/run/k/.s.PGSQL.5432"), "a")];
        let plan = plan(&old, &new);
        assert_eq!(plan.keep, [tcp(5432)]);
        assert_eq!(plan.add, [unix("/run/k/.s.PGSQL.5432")]);
    }

    #[test]
    fn empty_sets() {
        let none: [(Endpoint, &str); 0] = [];
        let some = [(tcp(5432), "a")];
        assert_eq!(plan(&none, &some).add, [tcp(5432)]);
        assert_eq!(plan(&some, &none).remove, [tcp(5432)]);
        assert!(plan(&none, &none).is_noop());
    }

    #[test]
    fn an_endpoint_listed_twice_counts_once() {
        let old = [(tcp(5432), "a"), (tcp(5432), "x")];
        let new = [(tcp(5432), "a"), (tcp(5432), "y")];
        let plan = plan(&old, &new);
        assert_eq!(plan.keep, [tcp(5432)]);
        assert!(plan.is_noop());
    }
}
