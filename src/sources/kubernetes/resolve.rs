//! Turns the cluster index (slim pods and compiled `WorkerMetrics`) into targets, plus what
//! must be reported back: invalid objects and which pods each custom resource covers. Pure.

use super::annotations::{parse_annotations, ports_annotation};
use super::crd::CompiledWorkerMetrics;
use super::index::{ClusterIndex, CustomResourceEntry, ObjectKey};
use super::pod::{NamePolicy, pod_targets, unknown_containers};
use crate::declaration::{Declaration, DeclarationError, ErrorKind, FieldPath};
use crate::model::Target;
use std::collections::{BTreeMap, BTreeSet};

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CoveredPods {
    pub pods: BTreeSet<String>,
}

#[derive(Clone, Debug, Default)]
pub struct Resolution {
    pub targets: Vec<Target>,
    /// Pods whose declaration is refused, with every reason (for Events).
    pub invalid_pods: BTreeMap<ObjectKey, (String, Vec<DeclarationError>)>,
    /// Pods each valid custom resource covers (for its status).
    pub covered: BTreeMap<ObjectKey, CoveredPods>,
    /// Published pods whose declaration names a container they do not have (for Events);
    /// the other ranges are published.
    pub unknown_containers: BTreeMap<ObjectKey, (String, Vec<DeclarationError>)>,
}

#[derive(Clone, Debug)]
pub struct ResolveSettings {
    pub names: NamePolicy,
    pub allow_host_network: bool,
    /// Most ports probed for one namespace: one tenant cannot exhaust the prober.
    pub max_ports_per_namespace: usize,
}

/// Which declaration applies to a pod. A `WorkerMetrics` wins over annotations: it is an
/// explicit, RBAC-controlled object, while annotations travel with any pod template.
pub fn resolve(index: &ClusterIndex, settings: &ResolveSettings) -> Resolution {
    let mut out = Resolution::default();
    let mut by_namespace: BTreeMap<
        &str,
        Vec<(&ObjectKey, &CustomResourceEntry, &CompiledWorkerMetrics)>,
    > = BTreeMap::new();
    for (key, entry) in &index.resources {
        if let Ok(compiled) = &entry.compiled {
            by_namespace
                .entry(key.0.as_str())
                .or_default()
                .push((key, entry, compiled));
            out.covered.insert(key.clone(), CoveredPods::default());
        }
    }
    for list in by_namespace.values_mut() {
        list.sort_by(|a, b| (&a.1.created, &a.0.1).cmp(&(&b.1.created, &b.0.1)));
    }
    let mut ports_used: BTreeMap<&str, usize> = BTreeMap::new();
    for (key, pod) in &index.pods {
        let from_resource = by_namespace.get(pod.namespace.as_str()).and_then(|list| {
            list.iter()
                .find(|(_, _, compiled)| compiled.matches(&pod.labels))
        });
        // Where each range was declared, for errors: (resource name, or None for annotations).
        let (spec, interval, declared_by): (Declaration, _, Option<&str>) = match from_resource {
            Some((cr_key, _, compiled)) => {
                if let Some(covered) = out.covered.get_mut(*cr_key) {
                    covered.pods.insert(pod.name.clone());
                }
                (
                    compiled.spec.clone(),
                    compiled.probe_interval,
                    Some(cr_key.1.as_str()),
                )
            }
            None => match parse_annotations(&pod.annotations) {
                Ok(None) => continue,
                Ok(Some(spec)) => (spec, None, None),
                Err(errors) => {
                    out.invalid_pods
                        .insert(key.clone(), (pod.uid.clone(), errors));
                    continue;
                }
            },
        };
        if pod.host_network && !settings.allow_host_network {
            let error =
                DeclarationError::new(FieldPath::new("spec.hostNetwork"), ErrorKind::HostNetwork);
            out.invalid_pods
                .insert(key.clone(), (pod.uid.clone(), vec![error]));
            continue;
        }
        let service = match settings.names.service_name(&pod.namespace, &spec.service) {
            Ok(name) => name,
            Err(error) => {
                out.invalid_pods
                    .insert(key.clone(), (pod.uid.clone(), vec![error]));
                continue;
            }
        };
        let targets = pod_targets(pod, &spec, &service);
        let ports: usize = targets.iter().map(|t| t.ports.len()).sum();
        let used = ports_used.entry(pod.namespace.as_str()).or_default();
        if *used + ports > settings.max_ports_per_namespace {
            let error = DeclarationError::new(
                FieldPath::new("metadata.namespace"),
                ErrorKind::NamespaceQuota {
                    namespace: pod.namespace.clone(),
                    max: settings.max_ports_per_namespace,
                    ports,
                },
            );
            out.invalid_pods
                .insert(key.clone(), (pod.uid.clone(), vec![error]));
            continue;
        }
        *used += ports;
        // Ranges of a resource are in the order of its `spec.containers`.
        let unknown = unknown_containers(pod, &spec, |i, name| match declared_by {
            Some(resource) => FieldPath::new(format!(
                "WorkerMetrics {resource} spec.containers[{i}].name"
            )),
            None => ports_annotation(name),
        });
        if !unknown.is_empty() {
            out.unknown_containers
                .insert(key.clone(), (pod.uid.clone(), unknown));
        }
        out.targets.extend(targets.into_iter().map(|mut t| {
            t.probe_interval = interval;
            t
        }));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sources::kubernetes::pod::PodInfo;

    #[test]
    fn a_namespace_cannot_exceed_its_port_quota() {
        let mut index = ClusterIndex::default();
        for name in ["a", "b", "c"] {
            add(
                &mut index,
                pod(
                    "greedy",
                    name,
                    &[],
                    &[(SERVICE, "x"), ("workersd.io/ports", "9000-9099")],
                ),
            );
        }
        add(
            &mut index,
            pod(
                "modest",
                "m",
                &[],
                &[(SERVICE, "y"), ("workersd.io/ports", "9000-9009")],
            ),
        );
        let settings = ResolveSettings {
            max_ports_per_namespace: 250,
            ..settings("{service}")
        };
        let r = resolve(&index, &settings);
        let pods: BTreeSet<&str> = r
            .targets
            .iter()
            .map(|t| t.meta["k8s-pod"].as_str())
            .collect();
        assert_eq!(
            pods,
            BTreeSet::from(["a", "b", "m"]),
            "the third greedy pod is refused, others are not"
        );
        let refusal = r.invalid_pods[&("greedy".into(), "c".into())].1[0].to_string();
        assert!(
            refusal.starts_with("metadata.namespace:")
                && refusal.contains("--max-ports-per-namespace"),
            "{refusal}"
        );
    }
    use crate::sources::kubernetes::annotations::SERVICE;
    use crate::sources::kubernetes::crd::{ContainerPorts, WorkerMetricsSpec, compile};
    use std::time::Duration;

    fn pod(ns: &str, name: &str, labels: &[(&str, &str)], annotations: &[(&str, &str)]) -> PodInfo {
        PodInfo {
            namespace: ns.into(),
            name: name.into(),
            uid: format!("uid-{name}"),
            node: None,
            ip: Some("127.0.0.2".parse().unwrap()),
            host_network: false,
            terminating: false,
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            annotations: annotations
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            running: BTreeMap::from([("web".into(), 0)]),
            containers: BTreeSet::from(["web".into()]),
            sidecars: BTreeSet::from(["exporter".into()]),
        }
    }

    fn resource(service: &str, app: &str, created: &str) -> CustomResourceEntry {
        let spec = WorkerMetricsSpec {
            selector: serde_json::from_value(serde_json::json!({"matchLabels": {"app": app}}))
                .unwrap(),
            service: service.into(),
            containers: vec![ContainerPorts {
                name: "web".into(),
                ports: "9100-9101".into(),
            }],
            path: None,
            scheme: None,
            tags: vec![],
            meta: BTreeMap::new(),
            probe_interval: Some("3s".into()),
        };
        CustomResourceEntry {
            uid: format!("cr-{service}"),
            generation: Some(1),
            created: created.into(),
            compiled: compile(&spec),
            status: None,
        }
    }

    fn settings(template: &str) -> ResolveSettings {
        ResolveSettings {
            names: NamePolicy::new(template).unwrap(),
            allow_host_network: false,
            max_ports_per_namespace: 10_240,
        }
    }

    fn add(index: &mut ClusterIndex, p: PodInfo) {
        index.pods.insert((p.namespace.clone(), p.name.clone()), p);
    }

    #[test]
    fn custom_resource_wins_over_annotations_and_oldest_resource_wins() {
        let mut index = ClusterIndex::default();
        add(
            &mut index,
            pod(
                "shop",
                "web-1",
                &[("app", "web")],
                &[(SERVICE, "annotated"), ("workersd.io/ports", "9011-9020")],
            ),
        );
        add(
            &mut index,
            pod(
                "shop",
                "other",
                &[("app", "other")],
                &[(SERVICE, "annotated"), ("workersd.io/ports", "9011-9020")],
            ),
        );
        add(
            &mut index,
            pod("elsewhere", "web-2", &[("app", "web")], &[]),
        );
        index.resources.insert(
            ("shop".into(), "newer".into()),
            resource("newer", "web", "2026-02-01T00:00:00Z"),
        );
        index.resources.insert(
            ("shop".into(), "older".into()),
            resource("older", "web", "2026-01-01T00:00:00Z"),
        );
        let r = resolve(&index, &settings("{service}"));
        let services: BTreeSet<(&str, &str)> = r
            .targets
            .iter()
            .map(|t| (t.meta["k8s-pod"].as_str(), t.service.as_str()))
            .collect();
        assert_eq!(
            services,
            BTreeSet::from([("web-1", "older"), ("other", "annotated")])
        );
        let web1 = r
            .targets
            .iter()
            .find(|t| t.meta["k8s-pod"] == "web-1")
            .unwrap();
        assert_eq!(web1.probe_interval, Some(Duration::from_secs(3)));
        assert_eq!(
            r.covered[&("shop".into(), "older".into())].pods,
            BTreeSet::from(["web-1".to_string()])
        );
        assert!(r.covered[&("shop".into(), "newer".into())].pods.is_empty());
        assert!(r.invalid_pods.is_empty());
    }

    #[test]
    fn invalid_pods_are_reported_without_affecting_others() {
        let mut index = ClusterIndex::default();
        add(
            &mut index,
            pod(
                "a",
                "bad",
                &[],
                &[(SERVICE, "x"), ("workersd.io/ports", "9020-9011")],
            ),
        );
        add(
            &mut index,
            pod(
                "a",
                "good",
                &[],
                &[(SERVICE, "x"), ("workersd.io/ports", "9011-9020")],
            ),
        );
        let mut host = pod(
            "a",
            "host",
            &[],
            &[(SERVICE, "x"), ("workersd.io/ports", "9011-9020")],
        );
        host.host_network = true;
        add(&mut index, host);
        let r = resolve(&index, &settings("{service}"));
        assert_eq!(r.targets.len(), 1);
        assert_eq!(r.targets[0].meta["k8s-pod"], "good");
        assert!(
            r.invalid_pods[&("a".into(), "bad".into())].1[0]
                .to_string()
                .contains("workersd.io/ports")
        );
        assert!(
            r.invalid_pods[&("a".into(), "host".into())].1[0]
                .to_string()
                .starts_with("spec.hostNetwork")
        );
        let allowed = resolve(
            &index,
            &ResolveSettings {
                allow_host_network: true,
                ..settings("{service}")
            },
        );
        assert_eq!(allowed.targets.len(), 2);
    }

    #[test]
    fn resources_and_annotations_naming_unknown_containers_are_reported() {
        let mut index = ClusterIndex::default();
        let mut sidecar_pod = pod("shop", "web-1", &[("app", "web")], &[]);
        sidecar_pod.running.insert("exporter".into(), 2);
        add(&mut index, sidecar_pod);
        add(
            &mut index,
            pod(
                "shop",
                "annotated",
                &[],
                &[
                    (SERVICE, "a"),
                    ("workersd.io/ports.web", "9011"),
                    ("workersd.io/ports.exporter", "9100"),
                    ("workersd.io/ports.typo", "9200"),
                ],
            ),
        );
        let mut wm = resource("cr", "web", "2026-01-01T00:00:00Z");
        let spec = WorkerMetricsSpec {
            selector: serde_json::from_value(serde_json::json!({"matchLabels": {"app": "web"}}))
                .unwrap(),
            service: "cr".into(),
            containers: vec![
                ContainerPorts {
                    name: "exporter".into(),
                    ports: "9100".into(),
                },
                ContainerPorts {
                    name: "missing".into(),
                    ports: "9300".into(),
                },
            ],
            path: None,
            scheme: None,
            tags: vec![],
            meta: BTreeMap::new(),
            probe_interval: None,
        };
        wm.compiled = compile(&spec);
        index.resources.insert(("shop".into(), "cr".into()), wm);
        let r = resolve(&index, &settings("{service}"));
        let published: BTreeSet<(&str, &str)> = r
            .targets
            .iter()
            .map(|t| (t.meta["k8s-pod"].as_str(), t.meta["k8s-container"].as_str()))
            .collect();
        assert_eq!(
            published,
            BTreeSet::from([("web-1", "exporter"), ("annotated", "web")]),
            "a running sidecar is probed; one not running is not (yet)"
        );
        let fields = |pod: &str| -> Vec<String> {
            r.unknown_containers[&("shop".into(), pod.into())]
                .1
                .iter()
                .map(|e| e.field.to_string())
                .collect()
        };
        assert_eq!(
            fields("web-1"),
            vec!["WorkerMetrics cr spec.containers[1].name"]
        );
        assert_eq!(
            fields("annotated"),
            vec!["metadata.annotations[workersd.io/ports.typo]"]
        );
        assert!(r.invalid_pods.is_empty());
    }

    #[test]
    fn a_hostile_namespace_cannot_publish_into_another_teams_service() {
        let mut index = ClusterIndex::default();
        add(
            &mut index,
            pod(
                "mallory",
                "evil",
                &[],
                &[(SERVICE, "payments"), ("workersd.io/ports", "9011")],
            ),
        );
        add(
            &mut index,
            pod(
                "payments",
                "api",
                &[],
                &[(SERVICE, "api"), ("workersd.io/ports", "9011")],
            ),
        );
        let r = resolve(&index, &settings("{namespace}-{service}"));
        let names: BTreeSet<&str> = r.targets.iter().map(|t| t.service.as_str()).collect();
        assert_eq!(names, BTreeSet::from(["mallory-payments", "payments-api"]));
        assert!(
            r.targets
                .iter()
                .all(|t| t.address.to_string() == "127.0.0.2"),
            "only the pod's own IP"
        );
    }
}
