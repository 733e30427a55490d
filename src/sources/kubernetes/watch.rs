//! Watches pods and `WorkerMetrics` (cluster-wide or per allowed namespace), keeps a slim index of them,
//! and publishes target snapshots. A re-list after a dropped watch (410 Gone) replaces the index
//! of that scope atomically, so deletions missed meanwhile are never lost.

use super::crd::{WorkerMetrics, WorkerMetricsStatus};
use super::index::{Change, ClusterIndex, Indexer, ObjectKey, Scope};
use super::pod::slim;
use super::problems::{problems, refused_problems};
use super::resolve::{ResolveSettings, resolve};
use crate::metrics::Metrics;
use crate::sinks::consul::quarantine::{Refused, RefusedEntries};
use crate::sinks::kubernetes_events::{self as events, Problems};
use crate::sources::TargetSnapshot;
use futures::stream::{BoxStream, SelectAll};
use futures::{FutureExt, StreamExt};
use k8s_openapi::api::core::v1::Pod;
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher;
use kube::{Api, Client};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use tokio::sync::{oneshot, watch};

/// The CRD's name, for logs, `/readyz` and the `workersd_crd_installed` metric.
pub const CRD_NAME: &str = "workermetrics.workersd.io";

/// Pause before asking again whether an absent CRD was installed (its paths answer 404): the
/// condition usually lasts (helm install --skip-crds), and a CRD installed later is picked up
/// within this.
const CRD_POLL: Duration = Duration::from_secs(5);

/// What each `WorkerMetrics` covers, for its status.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ResourceState {
    pub uid: String,
    pub generation: Option<i64>,
    pub covered_pods: BTreeSet<String>,
    pub errors: Option<Vec<String>>,
    /// The status the object carries now: its conditions' transition times are kept across
    /// restarts and failovers.
    pub existing: Option<WorkerMetricsStatus>,
}

pub type ResourceReport = BTreeMap<ObjectKey, ResourceState>;

#[derive(Clone, Debug)]
pub struct WatchSettings {
    /// Empty: all namespaces.
    pub namespaces: Vec<String>,
    /// Node-local mode: only the pods of this node (a server-side field selector).
    pub node: Option<String>,
    /// Whether this instance reports `WorkerMetrics` problems as Events: always in
    /// deployment mode; in node-local mode only while it is the janitor, so a thousand
    /// instances never write a thousand Events about one object.
    pub reports_resources: watch::Receiver<bool>,
    pub resolve: ResolveSettings,
    pub identity: String,
    /// Set while the WorkerMetrics CRD is absent (read by `/readyz`).
    pub crd_missing: Arc<AtomicBool>,
    /// How long a published Event is left before its series is renewed (below the API
    /// server's Event TTL).
    pub event_refresh: std::time::Duration,
}

/// A 404 while listing or starting a watch: the resource type is not served. (A 404 can
/// only mean that here: lists and watches of a served type never answer it.)
fn is_absent_type(error: &watcher::Error) -> bool {
    match error {
        watcher::Error::InitialListFailed(kube::Error::Api(status))
        | watcher::Error::WatchStartFailed(kube::Error::Api(status)) => status.code == 404,
        _ => false,
    }
}

/// Paged list, then watch. Not streaming lists (`sendInitialEvents=true`): API servers with
/// the WatchList feature gate off (the default before 1.32, and on many aggregated servers)
/// refuse them with 422, and kube's watcher would retry that forever instead of falling back.
fn watcher_config() -> watcher::Config {
    watcher::Config::default()
}

/// WorkerMetrics changes of one scope. A watcher runs until it reports the type absent (404:
/// CRD not installed, or deleted); then, after CRD_POLL, a fresh watcher starts with a full
/// list. Restarting, rather than letting the watcher retry, polls at a steady pace (its
/// backoff restarts at under a second after every `Init`, yet keeps growing on failed
/// watch resumptions) and skips resuming a resourceVersion from before the deletion.
fn resource_changes(
    api: Api<WorkerMetrics>,
    config: watcher::Config,
    i: usize,
) -> BoxStream<'static, Change> {
    futures::stream::unfold(false, move |restarted| {
        let (api, config) = (api.clone(), config.clone());
        async move {
            if restarted {
                tokio::time::sleep(CRD_POLL).await;
            }
            let changes = watcher::watcher(api, config)
                .default_backoff()
                .map(move |r| match r {
                    Ok(event) => Change::Resource(i, Box::new(event)),
                    Err(e) if is_absent_type(&e) => Change::ResourcesAbsent(i),
                    Err(e) => Change::Failed("workermetrics", Box::new(e)),
                })
                .boxed();
            // Up to and including the first absence report, without polling (and so
            // retrying) the watcher once more.
            let run = futures::stream::unfold(Some(changes), |changes| async move {
                let mut changes = changes?;
                let change = changes.next().await?;
                let rest = (!matches!(change, Change::ResourcesAbsent(_))).then_some(changes);
                Some((change, rest))
            });
            Some((run, true))
        }
    })
    .flatten()
    .boxed()
}

/// Pods of `node` only, when set; the API server filters them.
fn pods_config(node: Option<&str>) -> watcher::Config {
    match node {
        Some(node) => watcher_config().fields(&format!("spec.nodeName={node}")),
        None => watcher_config(),
    }
}

fn streams(
    client: &Client,
    namespaces: &[String],
    node: Option<&str>,
) -> (Vec<Scope>, SelectAll<BoxStream<'static, Change>>) {
    let scopes: Vec<Option<String>> = if namespaces.is_empty() {
        vec![None]
    } else {
        namespaces.iter().cloned().map(Some).collect()
    };
    let mut all = SelectAll::new();
    for (i, ns) in scopes.iter().enumerate() {
        let (pods, resources): (Api<Pod>, Api<WorkerMetrics>) = match ns {
            Some(ns) => (
                Api::namespaced(client.clone(), ns),
                Api::namespaced(client.clone(), ns),
            ),
            None => (Api::all(client.clone()), Api::all(client.clone())),
        };
        let config = watcher_config();
        all.push(
            watcher::watcher(pods, pods_config(node))
                .default_backoff()
                .filter_map(move |r| {
                    futures::future::ready(match r {
                        Ok(event) => slim(event).map(|event| Change::Pod(i, Box::new(event))),
                        Err(e) => Some(Change::Failed("pods", Box::new(e))),
                    })
                })
                .boxed(),
        );
        all.push(resource_changes(resources, config, i));
    }
    let scopes = scopes.into_iter().map(Scope::new).collect();
    (scopes, all)
}

/// Outputs of the source: target snapshots and per-resource coverage (for statuses).
pub struct Outputs {
    pub targets: watch::Receiver<TargetSnapshot>,
    pub resources: watch::Receiver<Arc<ResourceReport>>,
}

/// Starts watching; returns once every watch completed its first list, so the first snapshot
/// is complete (a partial one would make the sinks drop live entries). `refused`: the entries
/// the Consul sink quarantines, reported as Events on their pods (`None` without that sink).
pub async fn start(
    client: Client,
    settings: WatchSettings,
    metrics: Arc<Metrics>,
    refused: Option<watch::Receiver<RefusedEntries>>,
) -> Outputs {
    let (targets_tx, targets_rx) = watch::channel::<TargetSnapshot>(Arc::new(Vec::new()));
    let (resources_tx, resources_rx) = watch::channel(Arc::new(ResourceReport::new()));
    let (ready_tx, ready_rx) = oneshot::channel();
    tokio::spawn(run(
        client,
        settings,
        metrics,
        targets_tx,
        resources_tx,
        ready_tx,
        refused,
    ));
    // The task never drops the sender before sending unless the runtime shuts down.
    let _ = ready_rx.await;
    Outputs {
        targets: targets_rx,
        resources: resources_rx,
    }
}

/// One span for the watch loop and what it logs (empty `namespaces`: the whole cluster).
#[tracing::instrument(name = "kubernetes_watch", skip_all, fields(namespaces = ?settings.namespaces))]
async fn run(
    client: Client,
    settings: WatchSettings,
    metrics: Arc<Metrics>,
    targets: watch::Sender<TargetSnapshot>,
    resources: watch::Sender<Arc<ResourceReport>>,
    ready: oneshot::Sender<()>,
    refused: Option<watch::Receiver<RefusedEntries>>,
) {
    let (scopes, mut changes) = streams(&client, &settings.namespaces, settings.node.as_deref());
    let mut indexer = Indexer::new(scopes);
    let mut crd_missing = false;
    // Events are written by their own task: a slow or failing API server never delays the
    // snapshots below.
    let (problems_tx, problems_rx) = watch::channel(Arc::new(Problems::new()));
    tokio::spawn(events::run(
        client.clone(),
        settings.identity.clone(),
        settings.event_refresh,
        problems_rx,
    ));
    let mut ready = Some(ready);
    // Problems of the cluster's objects, kept so a change of the refused entries alone
    // merges with them without resolving again.
    let mut cluster_problems = Problems::new();
    let mut reporting = settings.reports_resources.clone();
    let mut reporting_open = true;
    let (mut refused, mut refused_open) = match refused {
        Some(rx) => (rx, true),
        None => (watch::channel(RefusedEntries::default()).1, false),
    };
    let send_problems = |cluster: &Problems, refused: &[Refused], index: &ClusterIndex| {
        let mut current = cluster.clone();
        current.extend(refused_problems(refused, index));
        problems_tx.send_if_modified(|sent| {
            let changed = **sent != current;
            if changed {
                *sent = Arc::new(current);
            }
            changed
        });
    };
    loop {
        tokio::select! {
            change = changes.next() => {
                let Some(change) = change else { break };
                indexer.apply(change);
            }
            // The sink's refusals change: only the Events follow, no snapshot.
            seen = refused.changed(), if refused_open => {
                if seen.is_err() {
                    refused_open = false;
                } else if indexer.all_synced() {
                    let entries = refused.borrow_and_update().clone();
                    send_problems(&cluster_problems, &entries, &indexer.index);
                }
                continue;
            }
            // Becoming (or ceasing to be) the reporter of WorkerMetrics problems: resolve again.
            seen = reporting.changed(), if reporting_open => {
                if seen.is_err() {
                    reporting_open = false;
                }
            }
        }
        // Coalesce what is already queued into one resolution.
        for _ in 0..10_000 {
            match changes.next().now_or_never() {
                Some(Some(change)) => indexer.apply(change),
                _ => break,
            }
        }
        if !indexer.all_synced() {
            continue;
        }
        if indexer.crd_missing() != crd_missing {
            crd_missing = indexer.crd_missing();
            // Logged on each change, not on every poll.
            if crd_missing {
                tracing::warn!(
                    crd = CRD_NAME,
                    "WorkerMetrics CRD is not installed (its API paths answer 404): publishing annotated pods only; WorkerMetrics are picked up once it is installed"
                );
            } else {
                tracing::info!(
                    crd = CRD_NAME,
                    "WorkerMetrics CRD is installed: watching WorkerMetrics"
                );
            }
        }
        settings.crd_missing.store(crd_missing, Ordering::Relaxed);
        metrics.crd_installed(CRD_NAME, !crd_missing);
        let resolution = resolve(&indexer.index, &settings.resolve);
        metrics.invalid_objects("pod", resolution.invalid_pods.len());
        let invalid_resources = indexer
            .index
            .resources
            .values()
            .filter(|e| e.compiled.is_err())
            .count();
        metrics.invalid_objects("workermetrics", invalid_resources);
        cluster_problems = problems(
            &resolution.invalid_pods,
            &resolution.unknown_containers,
            &indexer.index,
            *reporting.borrow_and_update(),
        );
        let entries = refused.borrow_and_update().clone();
        send_problems(&cluster_problems, &entries, &indexer.index);
        let report: ResourceReport = indexer
            .index
            .resources
            .iter()
            .map(|(key, entry)| {
                let state = ResourceState {
                    uid: entry.uid.clone(),
                    generation: entry.generation,
                    covered_pods: resolution
                        .covered
                        .get(key)
                        .map(|c| c.pods.clone())
                        .unwrap_or_default(),
                    errors: entry
                        .compiled
                        .as_ref()
                        .err()
                        .map(|e| e.iter().map(ToString::to_string).collect()),
                    existing: entry.status.clone(),
                };
                (key.clone(), state)
            })
            .collect();
        resources.send_if_modified(|current| {
            let changed = **current != report;
            if changed {
                *current = Arc::new(report);
            }
            changed
        });
        let snapshot = crate::sources::share_unchanged(resolution.targets, &targets.borrow());
        targets.send_replace(snapshot);
        if let Some(ready) = ready.take() {
            tracing::info!(
                pods = indexer.index.pods.len(),
                workermetrics = indexer.index.resources.len(),
                "initial Kubernetes sync complete"
            );
            let _ = ready.send(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn watches_use_paged_lists_not_streaming_lists() {
        assert!(matches!(
            watcher_config().initial_list_strategy,
            watcher::InitialListStrategy::ListWatch
        ));
    }

    #[test]
    fn node_local_mode_asks_the_api_server_for_its_node_s_pods_only() {
        assert_eq!(
            pods_config(Some("n1")).field_selector.as_deref(),
            Some("spec.nodeName=n1")
        );
        assert_eq!(pods_config(None).field_selector, None);
    }
}
