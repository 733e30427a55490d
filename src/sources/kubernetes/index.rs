//! The cluster as the watch keeps it: slim pods and compiled `WorkerMetrics`, by namespace
//! and name. The `Indexer` applies each watch change to it, and replaces a scope's objects
//! only once its re-list completes, so deletions missed while a watch was down are never lost.
//! Pure: `watch` feeds it.

use super::crd::{CompiledWorkerMetrics, WorkerMetrics, WorkerMetricsStatus, compile};
use super::pod::PodInfo;
use crate::declaration::DeclarationError;
use kube::runtime::watcher::{self, Event};
use kube::{Resource, ResourceExt};
use std::collections::{BTreeMap, BTreeSet};

/// Namespace and name.
pub type ObjectKey = (String, String);

/// A `WorkerMetrics` as the controller sees it.
#[derive(Clone, Debug)]
pub struct CustomResourceEntry {
    pub uid: String,
    pub generation: Option<i64>,
    /// Orders competing resources: the oldest wins, then the name.
    pub created: String,
    pub compiled: Result<CompiledWorkerMetrics, Vec<DeclarationError>>,
    /// The status the object carries now (written by an earlier leader or run).
    pub status: Option<WorkerMetricsStatus>,
}

/// Every watched pod (slimmed) and `WorkerMetrics` (compiled) of the cluster.
#[derive(Clone, Debug, Default)]
pub struct ClusterIndex {
    pub pods: BTreeMap<ObjectKey, PodInfo>,
    pub resources: BTreeMap<ObjectKey, CustomResourceEntry>,
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

/// One thing a watch stream reported.
pub(super) enum Change {
    /// Pods are slimmed as they arrive, so full objects never queue up.
    Pod(usize, Box<Event<PodInfo>>),
    Resource(usize, Box<Event<WorkerMetrics>>),
    /// The WorkerMetrics paths of this scope answer 404: the CRD is not installed.
    ResourcesAbsent(usize),
    Failed(&'static str, Box<watcher::Error>),
}

/// One namespace (or the whole cluster) as watched by one pod stream and one WorkerMetrics
/// stream, and the buffers of a re-list in progress.
pub(super) struct Scope {
    namespace: Option<String>,
    pod_buffer: Option<BTreeMap<ObjectKey, PodInfo>>,
    resource_buffer: Option<BTreeMap<ObjectKey, CustomResourceEntry>>,
}

impl Scope {
    pub(super) fn new(namespace: Option<String>) -> Self {
        Self {
            namespace,
            pod_buffer: None,
            resource_buffer: None,
        }
    }

    fn includes(&self, key: &ObjectKey) -> bool {
        self.namespace.as_ref().is_none_or(|ns| *ns == key.0)
    }
}

fn key_of<K: Resource>(object: &K) -> Option<ObjectKey> {
    Some((
        object.meta().namespace.clone()?,
        object.meta().name.clone()?,
    ))
}

/// The index, and how far the watch of each scope has got.
pub(super) struct Indexer {
    pub(super) index: ClusterIndex,
    scopes: Vec<Scope>,
    /// Streams (pods and resources of every scope) that finished their first list.
    synced: BTreeSet<(bool, usize)>,
    /// Scopes whose WorkerMetrics type is not served (CRD absent); they count as synced
    /// with no resources, so annotated pods are published meanwhile.
    resources_absent: BTreeSet<usize>,
}

impl Indexer {
    pub(super) fn new(scopes: Vec<Scope>) -> Self {
        Self {
            index: ClusterIndex::default(),
            scopes,
            synced: BTreeSet::new(),
            resources_absent: BTreeSet::new(),
        }
    }

    pub(super) fn apply(&mut self, change: Change) {
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
                    self.index.pods.retain(|k, _| !scope.includes(k));
                    self.index.pods.extend(buffer);
                    self.synced.insert((true, i));
                }
                Event::Apply(info) => {
                    self.index
                        .pods
                        .insert((info.namespace.clone(), info.name.clone()), info);
                }
                Event::Delete(info) => {
                    self.index.pods.remove(&(info.namespace, info.name));
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
                    self.index.resources.retain(|k, _| !scope.includes(k));
                    self.index.resources.extend(buffer);
                    self.synced.insert((false, i));
                    self.resources_absent.remove(&i);
                }
                Event::Apply(resource) => {
                    if let Some(key) = key_of(&resource) {
                        self.index.resources.insert(key, resource_entry(&resource));
                    }
                }
                Event::Delete(resource) => {
                    if let Some(key) = key_of(&resource) {
                        self.index.resources.remove(&key);
                    }
                }
            },
            Change::ResourcesAbsent(i) => {
                // Deleting a CRD deletes its objects first; drop whatever is left all the same.
                let scope = &mut self.scopes[i];
                scope.resource_buffer = None;
                let scope = &self.scopes[i];
                self.index.resources.retain(|k, _| !scope.includes(k));
                self.synced.insert((false, i));
                self.resources_absent.insert(i);
            }
            Change::Failed(what, error) => {
                tracing::warn!(watch = what, error = %error, "watch failed; retrying with backoff");
            }
        }
    }

    pub(super) fn all_synced(&self) -> bool {
        self.synced.len() == self.scopes.len() * 2
    }

    /// Whether the CRD is absent (any scope's WorkerMetrics paths answer 404).
    pub(super) fn crd_missing(&self) -> bool {
        !self.resources_absent.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sources::kubernetes::pod::pod_named;

    #[test]
    fn a_relist_replaces_its_scope_and_drops_missed_deletions() {
        let mut indexer = Indexer {
            index: ClusterIndex::default(),
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
            indexer.apply(Change::Pod(i, Box::new(Event::Init)));
            indexer.apply(Change::Pod(
                i,
                Box::new(Event::InitApply(pod_named("p1", ns))),
            ));
            indexer.apply(Change::Pod(
                i,
                Box::new(Event::InitApply(pod_named("p2", ns))),
            ));
            indexer.apply(Change::Pod(i, Box::new(Event::InitDone)));
            indexer.apply(Change::Resource(i, Box::new(Event::Init)));
            indexer.apply(Change::Resource(i, Box::new(Event::InitDone)));
        }
        assert!(indexer.all_synced());
        assert_eq!(indexer.index.pods.len(), 4);
        // Scope "a" re-lists after 410 Gone: p2 was deleted while the watch was down.
        indexer.apply(Change::Pod(0, Box::new(Event::Init)));
        indexer.apply(Change::Pod(
            0,
            Box::new(Event::InitApply(pod_named("p1", "a"))),
        ));
        assert_eq!(
            indexer.index.pods.len(),
            4,
            "the old index stays until the re-list completes"
        );
        indexer.apply(Change::Pod(0, Box::new(Event::InitDone)));
        let keys: Vec<_> = indexer.index.pods.keys().cloned().collect();
        assert_eq!(
            keys,
            vec![
                ("a".into(), "p1".into()),
                ("b".into(), "p1".into()),
                ("b".into(), "p2".into())
            ]
        );
        indexer.apply(Change::Pod(
            1,
            Box::new(Event::Delete(pod_named("p1", "b"))),
        ));
        assert_eq!(indexer.index.pods.len(), 2);
    }

    #[test]
    fn an_absent_crd_counts_as_synced_without_resources_until_it_is_listed() {
        let mut indexer = Indexer {
            index: ClusterIndex::default(),
            scopes: vec![Scope {
                namespace: None,
                pod_buffer: None,
                resource_buffer: None,
            }],
            synced: BTreeSet::new(),
            resources_absent: BTreeSet::new(),
        };
        indexer.apply(Change::Pod(0, Box::new(Event::Init)));
        indexer.apply(Change::Pod(
            0,
            Box::new(Event::InitApply(pod_named("p1", "a"))),
        ));
        indexer.apply(Change::Pod(0, Box::new(Event::InitDone)));
        assert!(
            !indexer.all_synced(),
            "the WorkerMetrics list is still pending"
        );
        indexer.apply(Change::Resource(0, Box::new(Event::Init)));
        indexer.apply(Change::ResourcesAbsent(0));
        assert!(indexer.all_synced() && indexer.crd_missing());
        assert_eq!(indexer.index.pods.len(), 1);

        // The CRD appears: a full list replaces the absence.
        let wm: WorkerMetrics = serde_json::from_value(serde_json::json!({
            "apiVersion": "workersd.io/v1alpha1", "kind": "WorkerMetrics",
            "metadata": {"namespace": "a", "name": "w", "uid": "u"},
            "spec": {"selector": {}, "service": "s", "containers": []}
        }))
        .unwrap();
        indexer.apply(Change::Resource(0, Box::new(Event::Init)));
        indexer.apply(Change::Resource(0, Box::new(Event::InitApply(wm))));
        assert!(indexer.crd_missing(), "absent until the list completes");
        indexer.apply(Change::Resource(0, Box::new(Event::InitDone)));
        assert!(!indexer.crd_missing());
        assert_eq!(indexer.index.resources.len(), 1);

        // Deleted again: whatever is left of its resources goes.
        indexer.apply(Change::ResourcesAbsent(0));
        assert!(indexer.crd_missing() && indexer.index.resources.is_empty());
        assert_eq!(indexer.index.pods.len(), 1, "pods are untouched");
    }
}
