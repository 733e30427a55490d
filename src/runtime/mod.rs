//! Assembles a running controller. Every mode (standalone, Kubernetes) feeds the same
//! pipeline and sinks through a `TargetSnapshot` channel.

pub mod admin_server;
mod controller;
pub mod leader;
pub mod limits;
mod settings;
pub mod shutdown;

pub use self::controller::{Controller, Started};
use self::leader::LeaseSettings;
use self::settings::{default_node_name, hostname_or_localhost};
use crate::cli::{KubernetesArgs, StandaloneArgs};
use crate::declaration;
use crate::metrics::Metrics;
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
        Controller::prepare(args.run, default_node_name(), Arc::new(Metrics::new())).await?;
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
    let names = NamePolicy::new(&args.service_name_template).context("--service-name-template")?;
    let client = kube::Client::try_default().await.context(
        "cannot configure the Kubernetes client (in-cluster service account or KUBECONFIG)",
    )?;
    let controller = Controller::prepare(
        args.run,
        format!("workersd-{}", args.cluster_name),
        Arc::new(Metrics::new()),
    )
    .await?;
    let identity = args.identity.clone().unwrap_or_else(hostname_or_localhost);
    // Renewal runs on its own task from the moment this instance leads: the initial sync below
    // can take longer than the whole lease on a big cluster, and nothing the rest of the
    // process awaits may keep the lease from being renewed.
    let mut lost = if args.leader_election {
        let settings = LeaseSettings {
            namespace: args
                .lease_namespace
                .clone()
                .unwrap_or_else(|| client.default_namespace().to_string()),
            name: args.lease_name.clone(),
            identity: identity.clone(),
            duration: args.lease_duration,
        };
        let api = kube::Api::namespaced(client.clone(), &settings.namespace);
        controller.readiness.standby.store(true, Ordering::Relaxed);
        let acquired = tokio::select! {
            acquired = leader::acquire(&api, &settings) => acquired,
            _ = shutdown::signal() => return Ok(()),
        };
        controller.readiness.standby.store(false, Ordering::Relaxed);
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
    let watch_settings = kube_watch::WatchSettings {
        namespaces: args.namespaces.clone(),
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
    let started = controller.start(outputs.targets);
    tokio::spawn(status::run(
        client,
        outputs.resources,
        started.desired.clone(),
    ));
    tokio::select! {
        lease = &mut lost => {
            bail!("lost leadership of lease {lease}; exiting so a standby takes over")
        }
        _ = shutdown::signal() => {}
    }
    started.stop().await;
    Ok(())
}
