//! Watches pods and `WorkerMetrics` (cluster-wide or per allowed namespace), keeps a slim view,
//! and publishes target snapshots. A re-list after a dropped watch (410 Gone) replaces the view
//! of that scope atomically, so deletions missed meanwhile are never lost.

use super::crd::{WorkerMetrics, WorkerMetricsStatus, compile};
use super::events::{self, Problem, Problems};
use super::resolve::{ClusterView, CustomResourceEntry, ObjectKey, ResolveSettings, resolve};
use super::spec::{FieldError, PREFIX, PodInfo};
use crate::metrics::Metrics;
use crate::sources::TargetSnapshot;
use futures::stream::{BoxStream, SelectAll};
use futures::{FutureExt, StreamExt};
use k8s_openapi::api::core::v1::Pod;
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use kube::{Api, Client, Resource, ResourceExt};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use tokio::sync::{oneshot, watch};

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
    let running = status
        .and_then(|s| s.container_statuses.as_ref())
        .map(|statuses| {
            statuses
                .iter()
                .filter(|c| c.state.as_ref().is_some_and(|s| s.running.is_some()))
                .map(|c| (c.name.clone(), c.restart_count))
                .collect()
        })
        .unwrap_or_default();
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
    Pod(usize, Event<PodInfo>),
    Resource(usize, Box<Event<WorkerMetrics>>),
    Failed(&'static str, String),
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
}

impl Source {
    fn apply(&mut self, change: Change) {
        match change {
            Change::Pod(i, event) => match event {
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
            Change::Failed(what, error) => {
                tracing::warn!(watch = what, error = %error, "watch failed; retrying with backoff");
            }
        }
    }

    fn all_synced(&self) -> bool {
        self.synced.len() == self.scopes.len() * 2
    }
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
        let config = watcher::Config::default();
        all.push(
            watcher::watcher(pods, config.clone())
                .default_backoff()
                .filter_map(move |r| {
                    futures::future::ready(match r {
                        Ok(event) => slim(event).map(|event| Change::Pod(i, event)),
                        Err(e) => Some(Change::Failed("pods", e.to_string())),
                    })
                })
                .boxed(),
        );
        all.push(
            watcher::watcher(resources, config)
                .default_backoff()
                .map(move |r| match r {
                    Ok(event) => Change::Resource(i, Box::new(event)),
                    Err(e) => Change::Failed("workermetrics", e.to_string()),
                })
                .boxed(),
        );
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
/// is complete (a partial one would make the sinks drop live entries).
pub async fn start(client: Client, settings: WatchSettings, metrics: Arc<Metrics>) -> Outputs {
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
) {
    let (scopes, mut changes) = streams(&client, &settings.namespaces);
    let mut source = Source {
        view: ClusterView::default(),
        scopes,
        synced: BTreeSet::new(),
    };
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
    while let Some(change) = changes.next().await {
        source.apply(change);
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
        let resolution = resolve(&source.view, &settings.resolve);
        metrics.invalid_objects("pod", resolution.invalid_pods.len());
        let invalid_resources = source
            .view
            .resources
            .values()
            .filter(|e| e.compiled.is_err())
            .count();
        metrics.invalid_objects("workermetrics", invalid_resources);
        let current = problems(&resolution.invalid_pods, &source.view);
        problems_tx.send_if_modified(|sent| {
            let changed = **sent != current;
            if changed {
                *sent = Arc::new(current);
            }
            changed
        });
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

fn describe(errors: &[FieldError]) -> String {
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
    invalid_pods: &BTreeMap<ObjectKey, (String, Vec<FieldError>)>,
    view: &ClusterView,
) -> Problems {
    let pods = invalid_pods
        .iter()
        .map(|((namespace, name), (uid, errors))| Problem {
            api_version: "v1",
            kind: "Pod",
            namespace: namespace.clone(),
            name: name.clone(),
            uid: uid.clone(),
            reason: "InvalidWorkerMetrics",
            note: describe(errors),
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
                note: describe(errors),
            })
        });
    pods.chain(resources).map(|p| (p.uid.clone(), p)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

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
        };
        for (i, ns) in [(0, "a"), (1, "b")] {
            source.apply(Change::Pod(i, Event::Init));
            source.apply(Change::Pod(i, Event::InitApply(pod_named("p1", ns))));
            source.apply(Change::Pod(i, Event::InitApply(pod_named("p2", ns))));
            source.apply(Change::Pod(i, Event::InitDone));
            source.apply(Change::Resource(i, Box::new(Event::Init)));
            source.apply(Change::Resource(i, Box::new(Event::InitDone)));
        }
        assert!(source.all_synced());
        assert_eq!(source.view.pods.len(), 4);
        // Scope "a" re-lists after 410 Gone: p2 was deleted while the watch was down.
        source.apply(Change::Pod(0, Event::Init));
        source.apply(Change::Pod(0, Event::InitApply(pod_named("p1", "a"))));
        assert_eq!(
            source.view.pods.len(),
            4,
            "the old view stays until the re-list completes"
        );
        source.apply(Change::Pod(0, Event::InitDone));
        let keys: Vec<_> = source.view.pods.keys().cloned().collect();
        assert_eq!(
            keys,
            vec![
                ("a".into(), "p1".into()),
                ("b".into(), "p1".into()),
                ("b".into(), "p2".into())
            ]
        );
        source.apply(Change::Pod(1, Event::Delete(pod_named("p1", "b"))));
        assert_eq!(source.view.pods.len(), 2);
    }
}
