//! Assembles a running controller. Every mode (standalone, Kubernetes) feeds the same
//! pipeline and sinks through a `TargetSnapshot` channel.

pub mod admin_server;
mod controller;
pub mod janitor;
pub mod leader;
pub mod limits;
mod nomad;
mod settings;
pub mod shutdown;
pub mod status_page;

pub use self::controller::{Controller, Started};
use self::leader::LeaseSettings;
pub use self::nomad::run_nomad;
use self::settings::{ConsulNode, default_node, hostname_or_localhost};
use crate::cli::{KubernetesArgs, Registration, StandaloneArgs};
use crate::declaration;
use crate::metrics::Metrics;
use crate::model::meta_keys;
use crate::sinks::consul::ConsulClient;
use crate::sinks::workermetrics_status as status;
use crate::sources::kubernetes::pod::NamePolicy;
use crate::sources::kubernetes::resolve::ResolveSettings;
use crate::sources::kubernetes::watch as kube_watch;
use crate::sources::{self, TargetSnapshot, file};
use anyhow::{Context, bail};
use futures::FutureExt;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use tokio::sync::watch;
use tracing::Instrument;

pub async fn run_standalone(args: StandaloneArgs) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(&args.targets)
        .with_context(|| format!("cannot read targets file {}", args.targets.display()))?;
    let targets = match file::parse_targets(&text) {
        Ok(targets) => targets,
        Err(errors) => {
            for error in &errors {
                tracing::error!(file = %args.targets.display(), error = %error, "invalid targets file");
            }
            bail!(
                "{} has {} error(s); run `workersd check --targets {}`",
                args.targets.display(),
                errors.len(),
                args.targets.display()
            );
        }
    };
    tracing::info!(file = %args.targets.display(), targets = targets.len(), "targets file loaded");
    let controller =
        Controller::prepare(args.run, default_node(), Arc::new(Metrics::new())).await?;
    let (targets_tx, targets_rx) =
        watch::channel::<TargetSnapshot>(sources::share_unchanged(targets, &[]));
    tokio::spawn(file::watch_targets_file(
        args.targets.clone(),
        args.reload_interval,
        text,
        targets_tx,
        controller.metrics.clone(),
    ));
    let started = controller.start(targets_rx);
    shutdown::signal().await;
    started.stop().await;
    Ok(())
}

pub async fn run_kubernetes(args: KubernetesArgs) -> anyhow::Result<()> {
    declaration::owner_id(&args.cluster_name).context("--cluster-name")?;
    refuse_agent_registration(&args)?;
    let names = NamePolicy::new(&args.service_name_template).context("--service-name-template")?;
    let node_local = match &args.node_name {
        Some(node) => Some(node_local_consul_node(&args, node)?),
        None => None,
    };
    let client = kube::Client::try_default().await.context(
        "cannot configure the Kubernetes client (in-cluster service account or KUBECONFIG)",
    )?;
    let consul_node = node_local
        .clone()
        .unwrap_or_else(|| ConsulNode::named(format!("workersd-{}", args.cluster_name)));
    let controller = Controller::prepare(args.run, consul_node, Arc::new(Metrics::new())).await?;
    let identity = args.identity.clone().unwrap_or_else(hostname_or_localhost);
    let lease = LeaseSettings {
        namespace: args
            .lease_namespace
            .clone()
            .unwrap_or_else(|| client.default_namespace().to_string()),
        name: args.lease_name.clone(),
        identity: identity.clone(),
        duration: args.lease_duration,
        standby_poll: None,
    };
    // Renewal runs on its own task from the moment this instance leads: the initial sync below
    // can take longer than the whole lease on a big cluster, and nothing the rest of the
    // process awaits may keep the lease from being renewed.
    let mut lost = if args.leader_election && node_local.is_none() {
        let settings = lease.clone();
        let api = kube::Api::namespaced(client.clone(), &settings.namespace);
        controller.readiness.standby.store(true, Ordering::Relaxed);
        controller.metrics.leading("leader", false);
        let acquired = tokio::select! {
            acquired = leader::acquire(&api, &settings) => acquired,
            _ = shutdown::signal() => return Ok(()),
        };
        controller.readiness.standby.store(false, Ordering::Relaxed);
        controller.metrics.leading("leader", true);
        let lease = format!("{}/{}", settings.namespace, settings.name);
        let renewal =
            tokio::spawn(
                async move { leader::renew_while_leading(&api, &settings, acquired).await },
            );
        async move {
            let _ = renewal.await;
            lease
        }
        .boxed()
    } else {
        std::future::pending::<String>().boxed()
    };
    // Deployment mode: the leader reports everything. Node-local mode: the janitor, once
    // it holds the Lease (every instance, without leader election).
    let (janitor_leading, reports_resources) =
        watch::channel(node_local.is_none() || !args.leader_election);
    let watch_settings = kube_watch::WatchSettings {
        namespaces: args.namespaces.clone(),
        node: args.node_name.clone(),
        reports_resources,
        resolve: ResolveSettings {
            names,
            allow_host_network: args.allow_host_network,
            max_ports_per_namespace: args.max_ports_per_namespace,
        },
        identity,
        crd_missing: controller.readiness.crd_missing.clone(),
        event_refresh: args.event_refresh_interval,
    };
    let metrics = controller.metrics.clone();
    let refused = controller.refused();
    let outputs = tokio::select! {
        outputs = kube_watch::start(client.clone(), watch_settings, metrics, refused)
            .instrument(tracing::info_span!("kubernetes_watch", namespaces = ?args.namespaces)) => outputs,
        lease = &mut lost => bail!("lost leadership of lease {lease} during the initial sync; exiting so a standby takes over"),
        _ = shutdown::signal() => return Ok(()),
    };
    let janitor = if node_local.is_some() && args.leader_election {
        let consul = match controller.consul_settings() {
            Some(settings) => Some(ConsulClient::new(settings.clone())?),
            None => {
                tracing::info!(
                    "no Consul sink: the janitor has nothing to retire (HTTP SD entries die with their instance)"
                );
                None
            }
        };
        Some(janitor::Janitor {
            client: client.clone(),
            lease: janitor::lease_settings(lease),
            consul,
            cluster: args.cluster_name.clone(),
            metrics: controller.metrics.clone(),
            leading: janitor_leading,
        })
    } else {
        None
    };
    let started = controller.start(outputs.targets);
    if let Some(janitor) = janitor {
        tokio::spawn(janitor.run());
    }
    if node_local.is_none() {
        tokio::spawn(status::run(
            client,
            outputs.resources,
            started.desired.clone(),
        ));
    } else {
        // Its counts are cluster-wide, and each instance sees one node.
        tracing::info!("node-local mode: WorkerMetrics status is not written");
    }
    tokio::select! {
        lease = &mut lost => {
            bail!("lost leadership of lease {lease}; exiting so a standby takes over")
        }
        _ = shutdown::signal() => {}
    }
    started.stop().await;
    Ok(())
}

/// A pod's workers are not the services of any one host's agent, and pods move between
/// hosts: Kubernetes mode registers in the catalog.
fn refuse_agent_registration(args: &KubernetesArgs) -> anyhow::Result<()> {
    if args.run.consul_registration == Registration::Agent {
        bail!(
            "--consul-registration agent is for hosts running a Consul agent (workersd standalone); in Kubernetes mode workers are registered in the catalog (--consul-registration catalog)"
        );
    }
    Ok(())
}

/// Node-local mode's Consul node: one per Kubernetes node, `workersd-<cluster>_<node>`, owned
/// under its own name. `_` never occurs in a Kubernetes node name (a DNS subdomain), so no
/// two (cluster, node) pairs share a Consul node.
fn node_local_consul_node(args: &KubernetesArgs, node: &str) -> anyhow::Result<ConsulNode> {
    if args.run.consul_node.is_some() {
        bail!(
            "--consul-node cannot be set with --node-name: each node-local instance publishes under its own Consul node, workersd-<cluster>_<node>"
        );
    }
    if args.run.owner_id.is_some() {
        bail!(
            "--owner-id cannot be set with --node-name: each node-local instance owns its entries under its Consul node's name"
        );
    }
    if !is_dns_subdomain(node) {
        bail!("--node-name {node:?} is not a Kubernetes node name (a DNS subdomain)");
    }
    let name = format!("workersd-{}_{node}", args.cluster_name);
    declaration::owner_id(&name)
        .context("--node-name: the Consul node workersd-<cluster>_<node> is too long")?;
    Ok(ConsulNode {
        name,
        meta: [
            (meta_keys::CLUSTER.to_string(), args.cluster_name.clone()),
            (meta_keys::KUBERNETES_NODE.to_string(), node.to_string()),
        ]
        .into(),
    })
}

/// Kubernetes' DNS-1123 subdomain: at most 253 characters of lowercase letters, digits, '-'
/// and '.', each label starting and ending with a letter or digit.
fn is_dns_subdomain(name: &str) -> bool {
    name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::{Cli, Command};
    use clap::Parser;

    fn kubernetes_args(flags: &[&str]) -> KubernetesArgs {
        let argv = ["workersd", "kubernetes"].iter().chain(flags);
        match Cli::try_parse_from(argv).expect("flags parse").command {
            Command::Kubernetes(args) => *args,
            _ => unreachable!(),
        }
    }

    fn consul_node(flags: &[&str]) -> anyhow::Result<ConsulNode> {
        let args = kubernetes_args(flags);
        let node = args.node_name.clone().expect("--node-name given");
        node_local_consul_node(&args, &node)
    }

    #[test]
    fn each_kubernetes_node_gets_its_own_consul_node_naming_cluster_and_node() {
        let node = consul_node(&[
            "--cluster-name=prod",
            "--node-name=ip-10-0-1-7.ec2.internal",
        ])
        .unwrap();
        assert_eq!(node.name, "workersd-prod_ip-10-0-1-7.ec2.internal");
        assert_eq!(node.meta["workersd-cluster"], "prod");
        assert_eq!(node.meta["workersd-k8s-node"], "ip-10-0-1-7.ec2.internal");
        // The separator cannot occur in a node name, so two clusters never share a node.
        let a = consul_node(&["--cluster-name=a", "--node-name=b-c"]).unwrap();
        let b = consul_node(&["--cluster-name=a-b", "--node-name=c"]).unwrap();
        assert_ne!(a.name, b.name);
    }

    #[test]
    fn kubernetes_mode_refuses_agent_registration() {
        let agent = kubernetes_args(&["--consul-registration=agent"]);
        let error = format!("{:#}", refuse_agent_registration(&agent).unwrap_err());
        assert!(error.contains("--consul-registration agent"), "{error}");
        assert!(refuse_agent_registration(&kubernetes_args(&[])).is_ok());
    }

    #[test]
    fn node_local_mode_refuses_what_would_share_or_break_a_node() {
        for (flags, named) in [
            (
                &["--node-name=n1", "--consul-node=shared"][..],
                "--consul-node",
            ),
            (&["--node-name=n1", "--owner-id=me"][..], "--owner-id"),
            (&["--node-name=N1"][..], "--node-name"),
            (&["--node-name=n_1"][..], "--node-name"),
            (&["--node-name=-n1"][..], "--node-name"),
        ] {
            let error = format!("{:#}", consul_node(flags).unwrap_err());
            assert!(error.contains(named), "{flags:?}: {error}");
        }
        let long = format!("--node-name={}", "n".repeat(120));
        let error = format!("{:#}", consul_node(&[&long]).unwrap_err());
        assert!(
            error.contains("--node-name") && error.contains("too long"),
            "{error}"
        );
    }
}
