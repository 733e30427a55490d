//! What goes wrong with the cluster's objects, as problems for Warning Events: refused
//! declarations, unknown container names, and entries Consul refused. Pure.

use super::index::{ClusterIndex, ObjectKey};
use crate::declaration::DeclarationError;
use crate::sinks::consul::quarantine::Refused;
use crate::sinks::kubernetes_events::{self as events, Problem, Problems};
use std::collections::BTreeMap;

fn describe(errors: &[DeclarationError]) -> String {
    events::note(
        errors
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join("; "),
    )
}

/// The current problems of pods and, with `resources`, of `WorkerMetrics`, for Events.
pub(crate) fn problems(
    invalid_pods: &BTreeMap<ObjectKey, (String, Vec<DeclarationError>)>,
    unknown_containers: &BTreeMap<ObjectKey, (String, Vec<DeclarationError>)>,
    index: &ClusterIndex,
    resources: bool,
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
    let resources =
        index
            .resources
            .iter()
            .filter(|_| resources)
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
/// pods no longer in `index` (or without the Kubernetes meta) are skipped.
pub(crate) fn refused_problems(refused: &[Refused], index: &ClusterIndex) -> Problems {
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
            let pod = index.pods.get(&key)?;
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
    use crate::sources::kubernetes::pod::pod_named;
    use std::sync::Arc;

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
        let problems = problems(&invalid, &unknown, &ClusterIndex::default(), true);
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
    fn workermetrics_problems_only_from_the_instance_that_reports_them() {
        let mut index = ClusterIndex::default();
        let invalid = crate::sources::kubernetes::index::CustomResourceEntry {
            uid: "wm-1".into(),
            generation: Some(1),
            created: String::new(),
            compiled: Err(vec![DeclarationError::new(
                crate::declaration::FieldPath::new("spec.service"),
                crate::declaration::ErrorKind::HostNetwork,
            )]),
            status: None,
        };
        index
            .resources
            .insert(("shop".into(), "web".into()), invalid);
        let none = BTreeMap::new();
        let reported = problems(&none, &none, &index, true);
        let kinds: Vec<_> = reported.values().map(|p| (p.kind, p.reason)).collect();
        assert_eq!(kinds, [("WorkerMetrics", "InvalidSpec")]);
        assert!(problems(&none, &none, &index, false).is_empty());
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
        let mut index = ClusterIndex::default();
        for (name, uid) in [("web-1", "u1"), ("api-1", "u2")] {
            let mut pod = pod_named(name, "shop");
            pod.uid = uid.into();
            index.pods.insert(("shop".into(), name.into()), pod);
        }
        let entries = vec![
            refused("web-b", "shop", "web-1", "Permission denied"),
            refused("web-a", "shop", "web-1", "Value is too long"),
            refused("api-a", "shop", "api-1", "Permission denied"),
            // The pod is gone, or the entry is not a pod's: nothing to report on.
            refused("old-a", "shop", "old-1", "Permission denied"),
            refused("file-a", "", "", "Permission denied"),
        ];
        let problems = refused_problems(&entries, &index);
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
        let note = &refused_problems(&long, &index)["u1/ConsulRefusedEntry"].note;
        assert!(note.len() <= 1004 && note.contains("service ID web-a;"));
        assert!(refused_problems(&[], &index).is_empty());
    }
}
