//! The pod as workersd keeps it (slimmed on arrival), and how a declaration plus a pod becomes
//! targets: running containers, unknown container names, the service-name policy. Pure.

use super::annotations::PREFIX;
use crate::declaration::{Declaration, DeclarationError, ErrorKind, FieldPath, rules};
use crate::model::{Target, TargetId};
use k8s_openapi::api::core::v1::{ContainerStatus, Pod};
use kube::runtime::watcher::Event;
use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

/// The parts of a pod workersd needs; everything else is dropped on arrival to keep memory low.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodInfo {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    pub node: Option<String>,
    pub ip: Option<IpAddr>,
    pub host_network: bool,
    pub terminating: bool,
    pub labels: BTreeMap<String, String>,
    pub annotations: BTreeMap<String, String>,
    /// Running containers and native sidecars, and their restart counts.
    pub running: BTreeMap<String, i32>,
    /// Names of the spec's regular containers.
    pub containers: BTreeSet<String>,
    /// Names of its native sidecars: init containers with `restartPolicy: Always`
    /// (Kubernetes >= 1.29), which run alongside the regular containers.
    pub sidecars: BTreeSet<String>,
}

/// Declared ranges naming a container the pod does not have (neither a regular container
/// nor a native sidecar), located by `field_of(index of the range, container name)`. Such a
/// range can never be probed; the others still are.
pub fn unknown_containers(
    pod: &PodInfo,
    spec: &Declaration,
    field_of: impl Fn(usize, &str) -> FieldPath,
) -> Vec<DeclarationError> {
    if pod.containers.is_empty() {
        return Vec::new(); // no spec seen: nothing to compare with
    }
    let list = |names: &BTreeSet<String>| {
        if names.is_empty() {
            "none".to_string()
        } else {
            names.iter().cloned().collect::<Vec<_>>().join(", ")
        }
    };
    spec.ranges
        .iter()
        .enumerate()
        .filter_map(|(i, range)| {
            let name = range.container.as_deref()?;
            if pod.containers.contains(name) || pod.sidecars.contains(name) {
                return None;
            }
            Some(DeclarationError::new(
                field_of(i, name),
                ErrorKind::UnknownContainer {
                    name: name.to_string(),
                    pod: format!("{}/{}", pod.namespace, pod.name),
                    containers: list(&pod.containers),
                    sidecars: list(&pod.sidecars),
                },
            ))
        })
        .collect()
}

/// How published service names are derived; a namespace can only publish into names the
/// template allows, e.g. `{namespace}-{service}`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NamePolicy {
    pub template: String,
}

impl Default for NamePolicy {
    fn default() -> Self {
        Self {
            template: "{service}".into(),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum NamePolicyError {
    #[error("service name template {0:?} must contain {{service}}")]
    NoService(String),
    #[error("service name template {0:?} may only use {{namespace}} and {{service}}")]
    UnknownPlaceholder(String),
}

impl NamePolicy {
    pub fn new(template: &str) -> Result<Self, NamePolicyError> {
        if !template.contains("{service}") {
            return Err(NamePolicyError::NoService(template.to_string()));
        }
        let probe = template
            .replace("{namespace}", "ns")
            .replace("{service}", "svc");
        if probe.contains('{') || probe.contains('}') {
            return Err(NamePolicyError::UnknownPlaceholder(template.to_string()));
        }
        Ok(Self {
            template: template.to_string(),
        })
    }

    /// The published name, or why the policy refuses it.
    pub fn service_name(&self, namespace: &str, service: &str) -> Result<String, DeclarationError> {
        let name = self
            .template
            .replace("{namespace}", namespace)
            .replace("{service}", service);
        rules::service_name(&name).map(|()| name).map_err(|source| {
            DeclarationError::new(
                FieldPath::new("service"),
                ErrorKind::NamePolicy {
                    template: self.template.clone(),
                    source,
                },
            )
        })
    }
}

/// Targets of one pod under one declaration: one per declared range whose container runs.
/// The restart counts are part of the target, so a container restart re-probes at once.
pub fn pod_targets(pod: &PodInfo, spec: &Declaration, service: &str) -> Vec<Target> {
    let (Some(ip), false) = (pod.ip, pod.terminating) else {
        return Vec::new();
    };
    if pod.running.is_empty() {
        return Vec::new();
    }
    spec.ranges
        .iter()
        .filter_map(|range| {
            let restarts = match &range.container {
                Some(c) => *pod.running.get(c)?,
                None => pod.running.values().sum(),
            };
            let mut meta = spec.meta.clone();
            meta.insert("k8s-namespace".into(), pod.namespace.clone());
            meta.insert("k8s-pod".into(), pod.name.clone());
            if let Some(c) = &range.container {
                meta.insert("k8s-container".into(), c.clone());
            }
            if let Some(node) = &pod.node {
                meta.insert("k8s-node".into(), node.clone());
            }
            let container = range.container.as_deref().unwrap_or("");
            Some(Target {
                id: TargetId::new(format!(
                    "k8s:{}/{}/{}/{container}/{}",
                    pod.namespace, pod.name, pod.uid, range.ports
                )),
                service: service.to_string(),
                address: ip,
                ports: range.ports,
                path: spec.path.clone(),
                scheme: spec.scheme,
                tags: spec.tags.clone(),
                meta,
                revision: restarts as u64,
                probe_interval: None,
            })
        })
        .collect()
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
pub(crate) fn slim(event: Event<Pod>) -> Option<Event<PodInfo>> {
    Some(match event {
        Event::Init => Event::Init,
        Event::InitDone => Event::InitDone,
        Event::InitApply(pod) => Event::InitApply(pod_info(&pod)?),
        Event::Apply(pod) => Event::Apply(pod_info(&pod)?),
        Event::Delete(pod) => Event::Delete(pod_info(&pod)?),
    })
}

/// A slim pod with only a namespace and a name, for tests.
#[cfg(test)]
pub(crate) fn pod_named(name: &str, ns: &str) -> PodInfo {
    let pod: Pod =
        serde_json::from_value(serde_json::json!({"metadata": {"namespace": ns, "name": name}}))
            .expect("a valid pod");
    pod_info(&pod).expect("namespace and name are set")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sources::kubernetes::annotations::{
        PORTS, SERVICE, parse_annotations, ports_annotation,
    };

    fn annotations(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn pod() -> PodInfo {
        PodInfo {
            namespace: "shop".into(),
            name: "web-1".into(),
            uid: "u1".into(),
            node: Some("node-a".into()),
            ip: Some("127.0.0.2".parse().unwrap()),
            host_network: false,
            terminating: false,
            labels: BTreeMap::new(),
            annotations: BTreeMap::new(),
            running: BTreeMap::from([("web".into(), 0)]),
            containers: BTreeSet::from(["web".into()]),
            sidecars: BTreeSet::new(),
        }
    }

    #[test]
    fn pod_targets_follow_running_containers_and_ip() {
        let spec = parse_annotations(&annotations(&[
            (SERVICE, "clever"),
            ("workersd.io/ports.web", "9011-9020"),
            ("workersd.io/ports.sidecar", "9100"),
        ]))
        .unwrap()
        .unwrap();
        let targets = pod_targets(&pod(), &spec, "clever");
        assert_eq!(targets.len(), 1, "sidecar is not running");
        let t = &targets[0];
        assert_eq!(t.address.to_string(), "127.0.0.2");
        assert_eq!(t.meta["k8s-namespace"], "shop");
        assert_eq!(t.meta["k8s-pod"], "web-1");
        assert_eq!(t.meta["k8s-container"], "web");
        assert_eq!(t.meta["k8s-node"], "node-a");

        let mut restarted = pod();
        restarted.running.insert("web".into(), 1);
        assert_ne!(
            pod_targets(&restarted, &spec, "clever")[0],
            *t,
            "a restart changes the target"
        );
        assert_eq!(pod_targets(&restarted, &spec, "clever")[0].id, t.id);

        let mut terminating = pod();
        terminating.terminating = true;
        assert!(pod_targets(&terminating, &spec, "clever").is_empty());
        let mut no_ip = pod();
        no_ip.ip = None;
        assert!(pod_targets(&no_ip, &spec, "clever").is_empty());
    }

    #[test]
    fn a_running_native_sidecar_is_probed_and_an_unknown_name_is_reported() {
        let spec = parse_annotations(&annotations(&[
            (SERVICE, "clever"),
            ("workersd.io/ports.web", "9011-9020"),
            ("workersd.io/ports.exporter", "9100"),
            ("workersd.io/ports.nope", "9200"),
        ]))
        .unwrap()
        .unwrap();
        let mut p = pod();
        p.sidecars.insert("exporter".into());
        // Sidecar not running yet: only web.
        let containers = |p: &PodInfo| -> BTreeSet<String> {
            pod_targets(p, &spec, "clever")
                .iter()
                .map(|t| t.meta["k8s-container"].clone())
                .collect()
        };
        assert_eq!(containers(&p), BTreeSet::from(["web".to_string()]));
        p.running.insert("exporter".into(), 0);
        assert_eq!(
            containers(&p),
            BTreeSet::from(["web".to_string(), "exporter".to_string()])
        );
        let unknown = unknown_containers(&p, &spec, |_, name| ports_annotation(name));
        assert_eq!(unknown.len(), 1, "{unknown:?}");
        assert_eq!(
            unknown[0].field.as_str(),
            "metadata.annotations[workersd.io/ports.nope]"
        );
        assert!(
            unknown[0]
                .to_string()
                .contains("containers: web; sidecars: exporter"),
            "{}",
            unknown[0]
        );
        // A pod-wide range names no container: never unknown.
        let pod_wide = parse_annotations(&annotations(&[(SERVICE, "c"), (PORTS, "9011")]))
            .unwrap()
            .unwrap();
        assert!(unknown_containers(&p, &pod_wide, |_, n| FieldPath::new(n)).is_empty());
    }

    #[test]
    fn name_policy_confines_namespaces() {
        let policy = NamePolicy::new("{namespace}-{service}").unwrap();
        assert_eq!(policy.service_name("shop", "web").unwrap(), "shop-web");
        assert!(policy.service_name("shop", "web_").is_err());
        assert!(NamePolicy::new("{namespace}").is_err());
        assert!(NamePolicy::new("{service}-{pod}").is_err());
        assert_eq!(
            NamePolicy::default().service_name("any", "web").unwrap(),
            "web"
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
}
