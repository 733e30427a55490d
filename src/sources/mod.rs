//! Sources say where workers may live. Each publishes complete snapshots of its targets; the
//! pipeline diffs snapshots, so a source never has to compute changes itself.

pub mod file;
pub mod kubernetes;
pub mod nomad;

use crate::model::Target;
use std::sync::Arc;

/// A complete set of targets from one source at one moment. Targets are shared: the
/// pipeline and the prober keep the same ones, and an unchanged target keeps its allocation
/// from snapshot to snapshot (a copy for each user added up).
pub type TargetSnapshot = Arc<Vec<Arc<Target>>>;

/// A snapshot of `targets` in which each target equal to one in `previous` (same id) is that
/// one, so a re-resolve of an unchanged cluster allocates nothing that lasts.
pub fn share_unchanged(targets: Vec<Target>, previous: &[Arc<Target>]) -> TargetSnapshot {
    let previous: std::collections::HashMap<&str, &Arc<Target>> =
        previous.iter().map(|t| (t.id.as_str(), t)).collect();
    Arc::new(
        targets
            .into_iter()
            .map(|t| match previous.get(t.id.as_str()) {
                Some(old) if ***old == t => Arc::clone(old),
                _ => Arc::new(t),
            })
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures;

    fn target(id: &str, path: &str) -> Target {
        fixtures::target(id).address("10.0.0.1").path(path).build()
    }

    #[test]
    fn unchanged_targets_keep_their_allocation_and_changed_ones_do_not() {
        let first = share_unchanged(vec![target("a", "/metrics"), target("b", "/metrics")], &[]);
        let second = share_unchanged(
            vec![
                target("a", "/metrics"),
                target("b", "/other"),
                target("c", "/metrics"),
            ],
            &first,
        );
        assert!(Arc::ptr_eq(&first[0], &second[0]), "a is unchanged");
        assert!(!Arc::ptr_eq(&first[1], &second[1]), "b changed");
        assert_eq!(second[1].path, "/other");
        assert_eq!(second.len(), 3);
    }
}
