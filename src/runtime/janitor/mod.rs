//! The janitor of node-local mode. Each instance owns its own node's entries; when a
//! Kubernetes node is deleted, nobody is left to remove its entries, so one instance at a
//! time, elected through the Lease, does: it follows the cluster's Node objects and retires
//! the Consul node of every Kubernetes node that no longer exists. A node that is only
//! NotReady keeps its entries (its workers may still run and be scraped) until its Node
//! object is deleted.

mod orphans;

use super::leader::{self, LeaseSettings};
use crate::metrics::Metrics;
use crate::model::{EXTERNAL_SOURCE, meta_keys};
use crate::sinks::consul::{ConsulClient, ConsulError, ConsulSink};
use crate::sources::kubernetes::nodes;
use k8s_openapi::api::coordination::v1::Lease;
use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

pub use self::orphans::orphans;

/// Consul is checked again this often even without a Node change: a node registered after
/// the last sweep (an instance that wrote just before its Node was deleted) is caught.
const RESWEEP: Duration = Duration::from_secs(60);

/// The Lease settings of the janitor's election: a standby reads the Lease every two lease
/// durations. With one standby per node, the default (a sixth of the lease) would be
/// thousands of reads a second on a big cluster (BENCHMARKS.md), and a janitor taking over
/// later only delays the removal of a deleted node's entries.
pub fn lease_settings(lease: LeaseSettings) -> LeaseSettings {
    LeaseSettings {
        standby_poll: Some(lease.duration * 2),
        ..lease
    }
}

pub struct Janitor {
    pub client: kube::Client,
    pub lease: LeaseSettings,
    /// Writes under any node of the cluster (`for_node`). Without a Consul sink there is
    /// nothing to retire, and the Lease only elects the reporter of WorkerMetrics problems.
    pub consul: Option<ConsulClient>,
    pub cluster: String,
    pub metrics: Arc<Metrics>,
    /// True while this instance is the janitor: it then also reports WorkerMetrics problems.
    pub leading: tokio::sync::watch::Sender<bool>,
}

impl Janitor {
    /// Stands by for the Lease, sweeps while holding it, stands by again when it is lost.
    #[tracing::instrument(name = "janitor", skip_all, fields(cluster = %self.cluster))]
    pub async fn run(self) {
        let api: kube::Api<Lease> =
            kube::Api::namespaced(self.client.clone(), &self.lease.namespace);
        self.metrics.leading("janitor", false);
        loop {
            let acquired = leader::acquire(&api, &self.lease).await;
            self.metrics.leading("janitor", true);
            tracing::info!("this instance is the janitor: it removes the entries of deleted nodes");
            self.leading.send_replace(true);
            tokio::select! {
                () = leader::renew_while_leading(&api, &self.lease, acquired) => {
                    tracing::warn!("no longer the janitor; standing by");
                }
                () = self.sweep_while_leading() => {}
            }
            self.leading.send_replace(false);
            self.metrics.leading("janitor", false);
        }
    }

    async fn sweep_while_leading(&self) {
        let Some(consul) = &self.consul else {
            return std::future::pending().await;
        };
        let mut names = nodes::watch_names(self.client.clone());
        loop {
            let current = names.borrow_and_update().clone();
            if let Some(nodes) = current
                && let Err(e) = self.sweep(consul, &nodes).await
            {
                tracing::warn!(error = %e, retry_in = ?RESWEEP, "janitor sweep failed");
            }
            tokio::select! {
                changed = names.changed() => {
                    if changed.is_err() {
                        std::future::pending::<()>().await;
                    }
                }
                () = tokio::time::sleep(RESWEEP) => {}
            }
        }
    }

    /// Retires every orphaned node; one failing node does not stop the others.
    async fn sweep(
        &self,
        consul: &ConsulClient,
        nodes: &BTreeSet<String>,
    ) -> Result<(), ConsulError> {
        let filter = [
            (meta_keys::EXTERNAL_SOURCE, EXTERNAL_SOURCE),
            (meta_keys::CLUSTER, self.cluster.as_str()),
        ];
        let consul_nodes = consul.nodes_with_meta(&filter).await?;
        for node in orphans(&consul_nodes, &self.cluster, nodes) {
            let kubernetes_node = node
                .meta
                .get(meta_keys::KUBERNETES_NODE)
                .map_or("", String::as_str);
            let mut sink = ConsulSink::new(consul.for_node(&node.name), self.metrics.clone());
            match sink.retire().await {
                Ok(retired) => tracing::info!(
                    consul_node = %node.name,
                    kubernetes_node,
                    deregistered = retired.deregistered,
                    node_removed = retired.node_removed,
                    left_for_other_owners = retired.others,
                    "retired the Consul node of a deleted Kubernetes node"
                ),
                Err(e) => tracing::warn!(
                    consul_node = %node.name,
                    kubernetes_node,
                    error = %e,
                    "could not retire the Consul node of a deleted Kubernetes node; retrying at the next sweep"
                ),
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn standby_janitors_read_the_lease_every_two_leases_and_the_holder_renews_as_usual() {
        let lease = LeaseSettings {
            namespace: "ops".into(),
            name: "workersd".into(),
            identity: "wd-n1".into(),
            duration: Duration::from_secs(15),
            standby_poll: None,
        };
        let janitor = lease_settings(lease.clone());
        assert_eq!(janitor.retry_every(), Duration::from_secs(30));
        assert_eq!(lease.retry_every(), Duration::from_millis(2500));
        assert_eq!(janitor.renew_every(), lease.renew_every());
        assert_eq!(janitor.renew_deadline(), lease.renew_deadline());
    }
}
