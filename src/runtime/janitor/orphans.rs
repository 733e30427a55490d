//! Which Consul nodes the janitor retires: pure, so every rule is tested without Consul.

use crate::model::{EXTERNAL_SOURCE, meta_keys};
use crate::sinks::consul::CatalogNode;
use std::collections::BTreeSet;

/// The Consul nodes of `cluster`'s node-local instances whose Kubernetes node is not among
/// `nodes` (a complete list of the cluster's Node objects). A node is one of them only if
/// workersd created it (`external-source`) for this cluster and names its Kubernetes node:
/// the single node of deployment mode carries no Kubernetes node and is never retired.
pub fn orphans<'n>(
    consul: &'n [CatalogNode],
    cluster: &str,
    nodes: &BTreeSet<String>,
) -> Vec<&'n CatalogNode> {
    consul
        .iter()
        .filter(|n| {
            let meta = |key| n.meta.get(key).map(String::as_str);
            meta(meta_keys::EXTERNAL_SOURCE) == Some(EXTERNAL_SOURCE)
                && meta(meta_keys::CLUSTER) == Some(cluster)
                && meta(meta_keys::KUBERNETES_NODE).is_some_and(|k| !nodes.contains(k))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn node(name: &str, meta: &[(&str, &str)]) -> CatalogNode {
        CatalogNode {
            name: name.into(),
            meta: meta
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect::<BTreeMap<_, _>>(),
        }
    }

    fn ours(cluster: &str, k8s_node: &str) -> CatalogNode {
        node(
            &format!("workersd-{cluster}_{k8s_node}"),
            &[
                ("external-source", "workersd"),
                ("workersd-cluster", cluster),
                ("workersd-k8s-node", k8s_node),
            ],
        )
    }

    fn names(found: Vec<&CatalogNode>) -> Vec<&str> {
        found.into_iter().map(|n| n.name.as_str()).collect()
    }

    #[test]
    fn only_nodes_of_deleted_kubernetes_nodes_are_orphans() {
        let consul = [ours("prod", "n1"), ours("prod", "n2"), ours("prod", "n3")];
        let live = BTreeSet::from(["n1".to_string(), "n3".to_string()]);
        assert_eq!(names(orphans(&consul, "prod", &live)), ["workersd-prod_n2"]);
    }

    #[test]
    fn nodes_not_made_by_workersd_for_this_cluster_are_never_orphans() {
        let none = BTreeSet::new();
        let consul = [
            // Another cluster sharing the Consul.
            ours("staging", "n1"),
            // Deployment mode's node: no Kubernetes node named.
            node(
                "workersd-prod",
                &[
                    ("external-source", "workersd"),
                    ("workersd-cluster", "prod"),
                ],
            ),
            // Someone else's node that happens to carry our keys.
            node(
                "agent-1",
                &[
                    ("external-source", "nomad"),
                    ("workersd-cluster", "prod"),
                    ("workersd-k8s-node", "n1"),
                ],
            ),
            node("bare", &[]),
        ];
        assert!(orphans(&consul, "prod", &none).is_empty());
    }
}
