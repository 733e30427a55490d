//! Watches pods and `WorkerMetrics` (cluster-wide or per allowed namespace), keeps a slim view,
//! and publishes target snapshots. A re-list after a dropped watch (410 Gone) replaces the view
//! of that scope atomically, so deletions missed meanwhile are never lost.

use super::crd::{WorkerMetrics, WorkerMetricsStatus, compile};
use super::resolve::{ClusterView, CustomResourceEntry, ObjectKey, ResolveSettings, resolve};
use super::spec::{PREFIX, PodInfo};
use crate::declaration::DeclarationError;
use crate::metrics::Metrics;
use crate::sinks::consul::quarantine::{Refused, RefusedEntries};
use crate::sinks::kubernetes_events::{self as events, Problem, Problems};
use crate::sources::TargetSnapshot;
use futures::stream::{BoxStream, SelectAll};
use futures::{FutureExt, StreamExt};
use k8s_openapi::api::core::v1::{ContainerStatus, Pod};
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use kube::{Api, Client, Resource, ResourceExt};
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
    pub resolve: ResolveSettings,
    pub identity: String,
    /// Set while the WorkerMetrics CRD is absent (read by `/readyz`).
    pub crd_missing: Arc<AtomicBool>,
    /// How long a published Event is left before its series is renewed (below the API
    /// server's Event TTL).
    pub event_refresh: std::time::Duration,
}

/// Keeps only what workersd needs of a pod.
pub fn pod_info(pod: &Pod) -> Option<PodInfo> {
    let meta = &pod.metadata;
    let spec = pod.spec.as_ref();
    let status = pod.status.as_ref();
    let phase_done = status
        .and_then(|s| s.phase.as_deref())
        .is_some_and(|p| p == "Succeeded" || p == "Failed");
    let containers: BTreeSet<String> = spec
        .map(|s| s.containers.iter().map(|c| c.name.clone()).collect())
        .unwrap_or_default();
    // Native sidecars (KEP-753): init containers with `restartPolicy: Always`; they keep
    // running beside the regular containers and report in `initContainerStatuses`.
    let sidecars: BTreeSet<String> = spec
        .and_then(|s| s.init_containers.as_ref())
        .map(|inits| {
            inits
                .iter()
                .filter(|c| c.restart_policy.as_deref() == Some("Always"))
                .map(|c| c.name.clone())
                .collect()
        })
        .unwrap_or_default();
    let running_in = |statuses: Option<&Vec<ContainerStatus>>, names: &BTreeSet<String>| {
        statuses
            .into_iter()
            .flatten()
            .filter(|c| names.contains(&c.name))
            .filter(|c| c.state.as_ref().is_some_and(|s| s.running.is_some()))
            .map(|c| (c.name.clone(), c.restart_count))
            .collect::<Vec<_>>()
    };
    let mut running: BTreeMap<String, i32> = BTreeMap::new();
    if let Some(status) = status {
        // A status for a name the spec lacks is ignored (cannot happen on a real server).
        let all_regular = status
            .container_statuses
            .iter()
            .flatten()
            .map(|c| c.name.clone())
            .collect::<BTreeSet<_>>();
        let regular = if containers.is_empty() {
            &all_regular // no spec seen: trust the statuses
        } else {
            &containers
        };
        running.extend(running_in(status.container_statuses.as_ref(), regular));
        // Only sidecars: a regular init container running means the pod is still initializing.
        running.extend(running_in(
            status.init_container_statuses.as_ref(),
            &sidecars,
        ));
    }
    Some(PodInfo {
        namespace: meta.namespace.clone()?,
        name: meta.name.clone()?,
        uid: meta.uid.clone().unwrap_or_default(),
        node: spec.and_then(|s| s.node_name.clone()),
        ip: status
            .and_then(|s| s.pod_ip.as_deref())
            .and_then(|ip| ip.parse().ok()),
        host_network: spec.and_then(|s| s.host_network).unwrap_or(false),
        terminating: meta.deletion_timestamp.is_some() || phase_done,
        labels: meta.labels.clone().unwrap_or_default(),
        // Only our annotations: the rest can be large (last-applied-configuration) and unused.
        annotations: meta
            .annotations
            .as_ref()
            .map(|a| {
                a.iter()
                    .filter(|(k, _)| k.starts_with(PREFIX))
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect()
            })
            .unwrap_or_default(),
        running,
        containers,
        sidecars,
    })
}

/// The same event about the slim pod; pods without namespace or name are dropped.
fn slim(event: Event<Pod>) -> Option<Event<PodInfo>> {
    Some(match event {
        Event::Init => Event::Init,
        Event::InitDone => Event::InitDone,
        Event::InitApply(pod) => Event::InitApply(pod_info(&pod)?),
        Event::Apply(pod) => Event::Apply(pod_info(&pod)?),
        Event::Delete(pod) => Event::Delete(pod_info(&pod)?),
    })
}

fn resource_entry(resource: &WorkerMetrics) -> CustomResourceEntry {
    CustomResourceEntry {
        uid: resource.uid().unwrap_or_default(),
        generation: resource.metadata.generation,
        created: resource
            .metadata
            .creation_timestamp
            .as_ref()
            .map(|t| t.0.to_string())
            .unwrap_or_default(),
        compiled: compile(&resource.spec),
        status: resource.status.clone(),
    }
}

enum Change {
    /// Pods are slimmed as they arrive, so full objects never queue up.
    Pod(usize, Box<Event<PodInfo>>),
    Resource(usize, Box<Event<WorkerMetrics>>),
    /// The WorkerMetrics paths of this scope answer 404: the CRD is not installed.
    ResourcesAbsent(usize),
    Failed(&'static str, String),
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

/// Per-stream scope and the buffer of a re-list in progress.
struct Scope {
    namespace: Option<String>,
    pod_buffer: Option<BTreeMap<ObjectKey, PodInfo>>,
    resource_buffer: Option<BTreeMap<ObjectKey, CustomResourceEntry>>,
}

impl Scope {
    fn holds(&self, key: &ObjectKey) -> bool {
        self.namespace.as_ref().is_none_or(|ns| *ns == key.0)
    }
}

fn key_of<K: Resource>(object: &K) -> Option<ObjectKey> {
    Some((
        object.meta().namespace.clone()?,
        object.meta().name.clone()?,
    ))
}

struct Source {
    view: ClusterView,
    scopes: Vec<Scope>,
    /// Streams (pods and resources of every scope) that finished their first list.
    synced: BTreeSet<(bool, usize)>,
    /// Scopes whose WorkerMetrics type is not served (CRD absent); they count as synced
    /// with no resources, so annotated pods are published meanwhile.
    resources_absent: BTreeSet<usize>,
}

impl Source {
    fn apply(&mut self, change: Change) {
        match change {
            Change::Pod(i, event) => match *event {
                Event::Init => self.scopes[i].pod_buffer = Some(BTreeMap::new()),
                Event::InitApply(info) => {
                    if let Some(buffer) = self.scopes[i].pod_buffer.as_mut() {
                        buffer.insert((info.namespace.clone(), info.name.clone()), info);
                    }
                }
                Event::InitDone => {
                    let buffer = self.scopes[i].pod_buffer.take().unwrap_or_default();
                    let scope = &self.scopes[i];
                    self.view.pods.retain(|k, _| !scope.holds(k));
                    self.view.pods.extend(buffer);
                    self.synced.insert((true, i));
                }
                Event::Apply(info) => {
                    self.view
                        .pods
                        .insert((info.namespace.clone(), info.name.clone()), info);
                }
                Event::Delete(info) => {
                    self.view.pods.remove(&(info.namespace, info.name));
                }
            },
            Change::Resource(i, event) => match *event {
                Event::Init => self.scopes[i].resource_buffer = Some(BTreeMap::new()),
                Event::InitApply(resource) => {
                    if let (Some(key), Some(buffer)) =
                        (key_of(&resource), self.scopes[i].resource_buffer.as_mut())
                    {
                        buffer.insert(key, resource_entry(&resource));
                    }
                }
                Event::InitDone => {
                    let buffer = self.scopes[i].resource_buffer.take().unwrap_or_default();
                    let scope = &self.scopes[i];
                    self.view.resources.retain(|k, _| !scope.holds(k));
                    self.view.resources.extend(buffer);
                    self.synced.insert((false, i));
                    self.resources_absent.remove(&i);
                }
                Event::Apply(resource) => {
                    if let Some(key) = key_of(&resource) {
                        self.view.resources.insert(key, resource_entry(&resource));
                    }
                }
                Event::Delete(resource) => {
                    if let Some(key) = key_of(&resource) {
                        self.view.resources.remove(&key);
                    }
                }
            },
            Change::ResourcesAbsent(i) => {
                // Deleting a CRD deletes its objects first; drop whatever is left all the same.
                let scope = &mut self.scopes[i];
                scope.resource_buffer = None;
                let scope = &self.scopes[i];
                self.view.resources.retain(|k, _| !scope.holds(k));
                self.synced.insert((false, i));
                self.resources_absent.insert(i);
            }
            Change::Failed(what, error) => {
                tracing::warn!(watch = what, error = %error, "watch failed; retrying with backoff");
            }
        }
    }

    fn all_synced(&self) -> bool {
        self.synced.len() == self.scopes.len() * 2
    }

    /// Whether the CRD is absent (any scope's WorkerMetrics paths answer 404).
    fn crd_missing(&self) -> bool {
        !self.resources_absent.is_empty()
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
                    Err(e) => Change::Failed("workermetrics", e.to_string()),
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

fn streams(
    client: &Client,
    namespaces: &[String],
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
            watcher::watcher(pods, config.clone())
                .default_backoff()
                .filter_map(move |r| {
                    futures::future::ready(match r {
                        Ok(event) => slim(event).map(|event| Change::Pod(i, Box::new(event))),
                        Err(e) => Some(Change::Failed("pods", e.to_string())),
                    })
                })
                .boxed(),
        );
        all.push(resource_changes(resources, config, i));
    }
    let scopes = scopes
        .into_iter()
        .map(|namespace| Scope {
            namespace,
            pod_buffer: None,
            resource_buffer: None,
        })
        .collect();
    (scopes, all)
}

/// Outputs of the source: target snapshots and per-resource coverage (for statuses).
pub struct Outputs {
    pub targets: watch::Receiver<TargetSnapshot>,
    pub resources: watch::Receiver<Arc<ResourceReport>>,
}

/// Starts watching; returns once every watch completed its first list, so the first snapshot
/// is complete (a partial one would make the sinks drop live entries). `refused`: the entries
/// the Consul sink holds back, reported as Events on their pods (`None` without that sink).
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

async fn run(
    client: Client,
    settings: WatchSettings,
    metrics: Arc<Metrics>,
    targets: watch::Sender<TargetSnapshot>,
    resources: watch::Sender<Arc<ResourceReport>>,
    ready: oneshot::Sender<()>,
    refused: Option<watch::Receiver<RefusedEntries>>,
) {
    let (scopes, mut changes) = streams(&client, &settings.namespaces);
    let mut source = Source {
        view: ClusterView::default(),
        scopes,
        synced: BTreeSet::new(),
        resources_absent: BTreeSet::new(),
    };
    let mut crd_missing = false;
    // Events are written by their own task: a slow or failing API server never holds up the
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
    let (mut refused, mut refused_open) = match refused {
        Some(rx) => (rx, true),
        None => (watch::channel(RefusedEntries::default()).1, false),
    };
    let send_problems = |cluster: &Problems, refused: &[Refused], view: &ClusterView| {
        let mut current = cluster.clone();
        current.extend(refused_problems(refused, view));
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
                source.apply(change);
            }
            // The sink's refusals change: only the Events follow, no snapshot.
            seen = refused.changed(), if refused_open => {
                if seen.is_err() {
                    refused_open = false;
                } else if source.all_synced() {
                    let entries = refused.borrow_and_update().clone();
                    send_problems(&cluster_problems, &entries, &source.view);
                }
                continue;
            }
        }
        // Coalesce what is already queued into one resolution.
        for _ in 0..10_000 {
            match changes.next().now_or_never() {
                Some(Some(change)) => source.apply(change),
                _ => break,
            }
        }
        if !source.all_synced() {
            continue;
        }
        if source.crd_missing() != crd_missing {
            crd_missing = source.crd_missing();
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
        let resolution = resolve(&source.view, &settings.resolve);
        metrics.invalid_objects("pod", resolution.invalid_pods.len());
        let invalid_resources = source
            .view
            .resources
            .values()
            .filter(|e| e.compiled.is_err())
            .count();
        metrics.invalid_objects("workermetrics", invalid_resources);
        cluster_problems = problems(
            &resolution.invalid_pods,
            &resolution.unknown_containers,
            &source.view,
        );
        let entries = refused.borrow_and_update().clone();
        send_problems(&cluster_problems, &entries, &source.view);
        let report: ResourceReport = source
            .view
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
                pods = source.view.pods.len(),
                workermetrics = source.view.resources.len(),
                "initial Kubernetes sync complete"
            );
            let _ = ready.send(());
        }
    }
}

fn describe(errors: &[DeclarationError]) -> String {
    events::note(
        errors
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join("; "),
    )
}

/// The current problems of pods and `WorkerMetrics`, for Events.
pub(crate) fn problems(
    invalid_pods: &BTreeMap<ObjectKey, (String, Vec<DeclarationError>)>,
    unknown_containers: &BTreeMap<ObjectKey, (String, Vec<DeclarationError>)>,
    view: &ClusterView,
) -> Problems {
    let pods = invalid_pods.iter().map(|(key, (uid, errors))| {
        pod_problem(
            key,
            uid,
            "InvalidWorkerMetrics",
            "Validate",
            describe(errors),
        )
    });
    let resources = view
        .resources
        .iter()
        .filter_map(|((namespace, name), entry)| {
            let errors = entry.compiled.as_ref().err()?;
            Some(Problem {
                api_version: "workersd.io/v1alpha1",
                kind: "WorkerMetrics",
                namespace: namespace.clone(),
                name: name.clone(),
                uid: entry.uid.clone(),
                reason: "InvalidSpec",
                action: "Validate",
                note: describe(errors),
            })
        });
    // A declared name that matches no container or native sidecar: the pod's other ranges
    // are still probed, so this is its own problem beside any other on the same pod.
    let unknown = unknown_containers
        .iter()
        .map(|(key, (uid, errors))| {
            pod_problem(key, uid, "UnknownContainer", "Validate", describe(errors))
        })
        .map(|p| (format!("{}/{}", p.uid, p.reason), p));
    pods.chain(resources)
        .map(|p| (p.uid.clone(), p))
        .chain(unknown)
        .collect()
}

fn pod_problem(
    (namespace, name): &ObjectKey,
    uid: &str,
    reason: &'static str,
    action: &'static str,
    note: String,
) -> Problem {
    Problem {
        api_version: "v1",
        kind: "Pod",
        namespace: namespace.clone(),
        name: name.clone(),
        uid: uid.to_string(),
        reason,
        action,
        note,
    }
}

/// Why an entry is refused, the reason of its pod's Event.
const REFUSED_REASON: &str = "ConsulRefusedEntry";

/// The entries Consul refused, as problems of the pods they came from: one per pod (keyed
/// beside the pod's other problems), its note listing the pod's refused entries. Entries of
/// pods no longer in `view` (or without the Kubernetes meta) are skipped.
pub(crate) fn refused_problems(refused: &[Refused], view: &ClusterView) -> Problems {
    let mut by_pod: BTreeMap<ObjectKey, Vec<&Refused>> = BTreeMap::new();
    for entry in refused {
        let meta = &entry.instance.meta;
        if let (Some(namespace), Some(name)) = (meta.get("k8s-namespace"), meta.get("k8s-pod")) {
            by_pod
                .entry((namespace.clone(), name.clone()))
                .or_default()
                .push(entry);
        }
    }
    by_pod
        .into_iter()
        .filter_map(|(key, mut entries)| {
            let pod = view.pods.get(&key)?;
            entries.sort_by(|a, b| a.instance.id.cmp(&b.instance.id));
            // IDs first, so a cut note still names every refused entry.
            let ids = entries
                .iter()
                .map(|e| e.instance.id.to_string())
                .collect::<Vec<_>>()
                .join(", ");
            let reasons = entries
                .iter()
                .map(|e| format!("{}: {}", e.instance.id, e.error))
                .collect::<Vec<_>>()
                .join("; ");
            let note = events::note(format!(
                "Consul refused the catalog entry of service ID {ids}; held back and retried later, the pod's other entries are published. {reasons}"
            ));
            let problem = pod_problem(&key, &pod.uid, REFUSED_REASON, "Register", note);
            Some((format!("{}/{REFUSED_REASON}", pod.uid), problem))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unknown_container_is_a_problem_beside_a_refused_declaration_of_the_same_pod() {
        let key = ("shop".to_string(), "web-1".to_string());
        let errors = |field: &str| {
            (
                "u1".to_string(),
                vec![DeclarationError::new(
                    crate::declaration::FieldPath::new(field),
                    crate::declaration::ErrorKind::HostNetwork,
                )],
            )
        };
        let invalid = BTreeMap::from([(
            key.clone(),
            errors("metadata.annotations[workersd.io/ports]"),
        )]);
        let unknown =
            BTreeMap::from([(key, errors("metadata.annotations[workersd.io/ports.side]"))]);
        let problems = problems(&invalid, &unknown, &ClusterView::default());
        let reasons: Vec<_> = problems
            .values()
            .map(|p| (p.uid.as_str(), p.reason))
            .collect();
        assert_eq!(
            reasons,
            vec![("u1", "InvalidWorkerMetrics"), ("u1", "UnknownContainer")]
        );
        assert!(
            problems
                .values()
                .all(|p| p.kind == "Pod" && p.name == "web-1")
        );
    }

    #[test]
    fn pod_info_keeps_only_what_is_needed() {
        let pod: Pod = serde_json::from_value(serde_json::json!({
            "metadata": {
                "namespace": "shop", "name": "web-1", "uid": "u1",
                "labels": {"app": "web"},
                "annotations": {
                    "workersd.io/service": "clever",
                    "kubectl.kubernetes.io/last-applied-configuration": "{...huge...}"
                },
                "managedFields": [{"manager": "kubectl"}]
            },
            "spec": {"nodeName": "node-a", "containers": [{"name": "web"}, {"name": "sidecar"}]},
            "status": {
                "podIP": "10.0.0.7", "phase": "Running",
                "containerStatuses": [
                    {"name": "web", "restartCount": 2, "ready": true, "image": "x", "imageID": "y",
                     "state": {"running": {"startedAt": "2026-01-01T00:00:00Z"}}},
                    {"name": "sidecar", "restartCount": 0, "ready": false, "image": "x", "imageID": "y",
                     "state": {"waiting": {"reason": "CrashLoopBackOff"}}}
                ]
            }
        }))
        .unwrap();
        let info = pod_info(&pod).unwrap();
        assert_eq!(info.ip.unwrap().to_string(), "10.0.0.7");
        assert_eq!(info.node.as_deref(), Some("node-a"));
        assert_eq!(info.running, BTreeMap::from([("web".to_string(), 2)]));
        assert_eq!(info.annotations.len(), 1, "foreign annotations are dropped");
        assert!(!info.terminating && !info.host_network);

        let mut deleting = pod.clone();
        deleting.metadata.deletion_timestamp =
            Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                k8s_openapi::jiff::Timestamp::now(),
            ));
        assert!(pod_info(&deleting).unwrap().terminating);
    }

    #[test]
    fn native_sidecars_run_from_init_container_statuses() {
        let pod: Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"namespace": "shop", "name": "web-1", "uid": "u1"},
            "spec": {
                "containers": [{"name": "web"}],
                "initContainers": [
                    {"name": "setup"},
                    {"name": "exporter", "restartPolicy": "Always"}
                ]
            },
            "status": {
                "podIP": "10.0.0.7", "phase": "Running",
                "initContainerStatuses": [
                    {"name": "setup", "restartCount": 0, "ready": true, "image": "x", "imageID": "y",
                     "state": {"terminated": {"exitCode": 0, "reason": "Completed"}}},
                    {"name": "exporter", "restartCount": 3, "ready": true, "image": "x", "imageID": "y",
                     "state": {"running": {"startedAt": "2026-01-01T00:00:00Z"}}}
                ],
                "containerStatuses": [
                    {"name": "web", "restartCount": 0, "ready": true, "image": "x", "imageID": "y",
                     "state": {"running": {"startedAt": "2026-01-01T00:00:00Z"}}}
                ]
            }
        }))
        .unwrap();
        let info = pod_info(&pod).unwrap();
        assert_eq!(
            info.running,
            BTreeMap::from([("web".to_string(), 0), ("exporter".to_string(), 3)])
        );
        assert_eq!(info.containers, BTreeSet::from(["web".to_string()]));
        assert_eq!(info.sidecars, BTreeSet::from(["exporter".to_string()]));

        // A regular init container that is running means "initializing": never a target.
        let mut initializing = pod.clone();
        let status = initializing.status.as_mut().unwrap();
        status.init_container_statuses.as_mut().unwrap()[0].state =
            serde_json::from_value(serde_json::json!({"running": {}})).unwrap();
        assert!(
            !pod_info(&initializing)
                .unwrap()
                .running
                .contains_key("setup")
        );
    }

    #[test]
    fn watches_use_paged_lists_not_streaming_lists() {
        assert!(matches!(
            watcher_config().initial_list_strategy,
            watcher::InitialListStrategy::ListWatch
        ));
    }

    fn refused(id: &str, ns: &str, pod: &str, error: &str) -> Refused {
        let meta = [("k8s-namespace", ns), ("k8s-pod", pod)]
            .into_iter()
            .filter(|(_, v)| !v.is_empty())
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Refused {
            instance: Arc::new(crate::model::ServiceInstance {
                id: id.into(),
                service: "s".into(),
                address: "10.0.0.1".into(),
                port: 9000,
                tags: vec![],
                meta: Arc::new(meta),
            }),
            error: error.into(),
        }
    }

    #[test]
    fn refused_entries_are_one_problem_per_pod_beside_its_other_problems() {
        let mut view = ClusterView::default();
        for (name, uid) in [("web-1", "u1"), ("api-1", "u2")] {
            let mut pod = pod_named(name, "shop");
            pod.uid = uid.into();
            view.pods.insert(("shop".into(), name.into()), pod);
        }
        let entries = vec![
            refused("web-b", "shop", "web-1", "Permission denied"),
            refused("web-a", "shop", "web-1", "Value is too long"),
            refused("api-a", "shop", "api-1", "Permission denied"),
            // The pod is gone, or the entry is not a pod's: nothing to report on.
            refused("old-a", "shop", "old-1", "Permission denied"),
            refused("file-a", "", "", "Permission denied"),
        ];
        let problems = refused_problems(&entries, &view);
        assert_eq!(
            problems.keys().collect::<Vec<_>>(),
            vec!["u1/ConsulRefusedEntry", "u2/ConsulRefusedEntry"]
        );
        let web = &problems["u1/ConsulRefusedEntry"];
        assert_eq!(
            (
                web.kind,
                web.name.as_str(),
                web.uid.as_str(),
                web.reason,
                web.action
            ),
            ("Pod", "web-1", "u1", "ConsulRefusedEntry", "Register")
        );
        assert!(
            web.note.contains("service ID web-a, web-b;")
                && web
                    .note
                    .ends_with("web-a: Value is too long; web-b: Permission denied"),
            "{}",
            web.note
        );
        assert!(!problems["u2/ConsulRefusedEntry"].note.contains("web-"));
        // A long error is cut to the Event limit, still naming the IDs.
        let long = vec![refused("web-a", "shop", "web-1", &"x".repeat(5000))];
        let note = &refused_problems(&long, &view)["u1/ConsulRefusedEntry"].note;
        assert!(note.len() <= 1004 && note.contains("service ID web-a;"));
        assert!(refused_problems(&[], &view).is_empty());
    }

    fn pod_named(name: &str, ns: &str) -> PodInfo {
        let pod: Pod = serde_json::from_value(
            serde_json::json!({"metadata": {"namespace": ns, "name": name}}),
        )
        .unwrap();
        pod_info(&pod).unwrap()
    }

    #[test]
    fn a_relist_replaces_its_scope_and_drops_missed_deletions() {
        let mut source = Source {
            view: ClusterView::default(),
            scopes: vec![
                Scope {
                    namespace: Some("a".into()),
                    pod_buffer: None,
                    resource_buffer: None,
                },
                Scope {
                    namespace: Some("b".into()),
                    pod_buffer: None,
                    resource_buffer: None,
                },
            ],
            synced: BTreeSet::new(),
            resources_absent: BTreeSet::new(),
        };
        for (i, ns) in [(0, "a"), (1, "b")] {
            source.apply(Change::Pod(i, Box::new(Event::Init)));
            source.apply(Change::Pod(
                i,
                Box::new(Event::InitApply(pod_named("p1", ns))),
            ));
            source.apply(Change::Pod(
                i,
                Box::new(Event::InitApply(pod_named("p2", ns))),
            ));
            source.apply(Change::Pod(i, Box::new(Event::InitDone)));
            source.apply(Change::Resource(i, Box::new(Event::Init)));
            source.apply(Change::Resource(i, Box::new(Event::InitDone)));
        }
        assert!(source.all_synced());
        assert_eq!(source.view.pods.len(), 4);
        // Scope "a" re-lists after 410 Gone: p2 was deleted while the watch was down.
        source.apply(Change::Pod(0, Box::new(Event::Init)));
        source.apply(Change::Pod(
            0,
            Box::new(Event::InitApply(pod_named("p1", "a"))),
        ));
        assert_eq!(
            source.view.pods.len(),
            4,
            "the old view stays until the re-list completes"
        );
        source.apply(Change::Pod(0, Box::new(Event::InitDone)));
        let keys: Vec<_> = source.view.pods.keys().cloned().collect();
        assert_eq!(
            keys,
            vec![
                ("a".into(), "p1".into()),
                ("b".into(), "p1".into()),
                ("b".into(), "p2".into())
            ]
        );
        source.apply(Change::Pod(
            1,
            Box::new(Event::Delete(pod_named("p1", "b"))),
        ));
        assert_eq!(source.view.pods.len(), 2);
    }

    #[test]
    fn an_absent_crd_counts_as_synced_without_resources_until_it_is_listed() {
        let mut source = Source {
            view: ClusterView::default(),
            scopes: vec![Scope {
                namespace: None,
                pod_buffer: None,
                resource_buffer: None,
            }],
            synced: BTreeSet::new(),
            resources_absent: BTreeSet::new(),
        };
        source.apply(Change::Pod(0, Box::new(Event::Init)));
        source.apply(Change::Pod(
            0,
            Box::new(Event::InitApply(pod_named("p1", "a"))),
        ));
        source.apply(Change::Pod(0, Box::new(Event::InitDone)));
        assert!(
            !source.all_synced(),
            "the WorkerMetrics list is still pending"
        );
        source.apply(Change::Resource(0, Box::new(Event::Init)));
        source.apply(Change::ResourcesAbsent(0));
        assert!(source.all_synced() && source.crd_missing());
        assert_eq!(source.view.pods.len(), 1);

        // The CRD appears: a full list replaces the absence.
        let wm: WorkerMetrics = serde_json::from_value(serde_json::json!({
            "apiVersion": "workersd.io/v1alpha1", "kind": "WorkerMetrics",
            "metadata": {"namespace": "a", "name": "w", "uid": "u"},
            "spec": {"selector": {}, "service": "s", "containers": []}
        }))
        .unwrap();
        source.apply(Change::Resource(0, Box::new(Event::Init)));
        source.apply(Change::Resource(0, Box::new(Event::InitApply(wm))));
        assert!(source.crd_missing(), "absent until the list completes");
        source.apply(Change::Resource(0, Box::new(Event::InitDone)));
        assert!(!source.crd_missing());
        assert_eq!(source.view.resources.len(), 1);

        // Deleted again: whatever is left of its resources goes.
        source.apply(Change::ResourcesAbsent(0));
        assert!(source.crd_missing() && source.view.resources.is_empty());
        assert_eq!(source.view.pods.len(), 1, "pods are untouched");
    }
}
