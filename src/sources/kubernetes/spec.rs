//! What a pod declares about its workers, from annotations or from a `WorkerMetrics` custom
//! resource, and how a declaration plus a pod becomes targets. Pure: no API calls here.

use crate::declaration::{
    self, Declaration, DeclarationError, ErrorKind, FieldPath, Input, Located, RawDeclaration,
    RawMeta, RawRange, SourceKind, rules,
};
use crate::model::{Target, TargetId};
use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

pub const PREFIX: &str = "workersd.io/";
pub const SERVICE: &str = "workersd.io/service";
pub const PORTS: &str = "workersd.io/ports";
pub const PORTS_PREFIX: &str = "workersd.io/ports.";
pub const PATH: &str = "workersd.io/path";
pub const SCHEME: &str = "workersd.io/scheme";
pub const TAGS: &str = "workersd.io/tags";
pub const META_PREFIX: &str = "workersd.io/meta.";

/// Longest annotation value read; anything longer is an error, not parsed.
pub const MAX_ANNOTATION_VALUE: usize = 4096;

/// Parses a pod's `workersd.io/*` annotations. `Ok(None)`: the pod did not opt in.
pub fn parse_annotations(
    annotations: &BTreeMap<String, String>,
) -> Result<Option<Declaration>, Vec<DeclarationError>> {
    let ours: Vec<(&String, &String)> = annotations
        .iter()
        .filter(|(k, _)| k.starts_with(PREFIX))
        .collect();
    if ours.is_empty() {
        return Ok(None);
    }
    let mut errors = Vec::new();
    let mut raw = RawDeclaration {
        meta_field: annotation(&format!("{META_PREFIX}*")),
        ..RawDeclaration::empty(SourceKind::Annotations, |name| {
            annotation(&format!("{PREFIX}{name}"))
        })
    };
    for (key, value) in ours {
        let field = annotation(key);
        let too_long = value.len() > MAX_ANNOTATION_VALUE;
        if too_long {
            errors.push(DeclarationError::new(
                field.clone(),
                ErrorKind::AnnotationTooLong {
                    bytes: value.len(),
                    max: MAX_ANNOTATION_VALUE,
                },
            ));
        }
        let given = |value: &String| {
            if too_long {
                Input::Refused
            } else {
                Input::given(field.clone(), value.clone())
            }
        };
        match key.as_str() {
            SERVICE => raw.service = given(value),
            PATH => raw.path = given(value),
            SCHEME => raw.scheme = given(value),
            TAGS => {
                raw.tags = match given(value) {
                    Input::Given(Located { field, value }) => {
                        let tags = value
                            .split(',')
                            .map(str::trim)
                            .filter(|t| !t.is_empty())
                            .map(str::to_string)
                            .collect();
                        Input::given(field, tags)
                    }
                    _ => Input::Refused,
                }
            }
            key if key == PORTS || key.starts_with(PORTS_PREFIX) => {
                if too_long {
                    raw.ranges_refused = true;
                    continue;
                }
                let container = key
                    .strip_prefix(PORTS_PREFIX)
                    .map(|name| Located::new(field.clone(), name.to_string()));
                raw.ranges.push(RawRange {
                    container,
                    ports: Located::new(field, value.clone()),
                });
            }
            key => match key.strip_prefix(META_PREFIX) {
                Some(_) if too_long => {}
                Some(meta_key) => raw.meta.push(RawMeta {
                    field,
                    key: meta_key.to_string(),
                    value: value.clone(),
                }),
                None => errors.push(DeclarationError::new(field, ErrorKind::UnknownAnnotation)),
            },
        }
    }
    match declaration::validate(raw) {
        Ok(declared) if errors.is_empty() => Ok(Some(declared)),
        result => {
            errors.extend(result.err().unwrap_or_default());
            Err(errors)
        }
    }
}

fn annotation(key: &str) -> FieldPath {
    FieldPath::new(format!("metadata.annotations[{key}]"))
}

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

/// The annotation that declares a container's ports, for error locations.
pub fn ports_annotation(container: &str) -> FieldPath {
    annotation(&format!("{PORTS_PREFIX}{container}"))
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Scheme;

    fn annotations(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn fields(errors: Vec<DeclarationError>) -> Vec<String> {
        errors.into_iter().map(|e| e.to_string()).collect()
    }

    #[test]
    fn pods_without_our_annotations_are_ignored() {
        assert!(matches!(
            parse_annotations(&annotations(&[("app", "x")])),
            Ok(None)
        ));
    }

    #[test]
    fn parses_a_full_declaration() {
        let spec = parse_annotations(&annotations(&[
            (SERVICE, "clever"),
            ("workersd.io/ports.web", "9011-9020"),
            ("workersd.io/ports.sidecar", "9100"),
            (PATH, "/m"),
            (SCHEME, "https"),
            (TAGS, "gunicorn, python,"),
            ("workersd.io/meta.team", "web"),
        ]))
        .unwrap()
        .unwrap();
        assert_eq!(spec.service, "clever");
        assert_eq!(spec.ranges.len(), 2);
        assert_eq!(spec.tags, vec!["gunicorn", "python"]);
        assert_eq!(spec.scheme, Scheme::Https);
        assert_eq!(spec.meta["team"], "web");
    }

    #[test]
    fn names_every_bad_annotation() {
        let errors = fields(
            parse_annotations(&annotations(&[
                (SERVICE, "Bad_Name"),
                (PORTS, "9020-9011"),
                ("workersd.io/ports.web", "1-65535"),
                ("workersd.io/ports.", "1"),
                (SCHEME, "ftp"),
                (PATH, "metrics"),
                ("workersd.io/meta.consul-x", "y"),
                ("workersd.io/prots", "1"),
            ]))
            .unwrap_err(),
        );
        for want in [
            "metadata.annotations[workersd.io/service]:",
            "metadata.annotations[workersd.io/ports]: range 9020-9011 is reversed",
            "metadata.annotations[workersd.io/ports.web]: range 1-65535 spans",
            "metadata.annotations[workersd.io/ports.]:",
            "metadata.annotations[workersd.io/scheme]:",
            "metadata.annotations[workersd.io/path]:",
            "metadata.annotations[workersd.io/meta.consul-x]:",
            "metadata.annotations[workersd.io/prots]: unknown",
        ] {
            assert!(
                errors.iter().any(|e| e.starts_with(want)),
                "missing {want:?} in {errors:#?}"
            );
        }
    }

    #[test]
    fn overlapping_ranges_and_missing_fields_are_errors() {
        let errors = fields(
            parse_annotations(&annotations(&[
                (SERVICE, "a"),
                (PORTS, "9011-9020"),
                ("workersd.io/ports.web", "9020-9030"),
            ]))
            .unwrap_err(),
        );
        assert_eq!(errors.len(), 1);
        assert!(errors[0].contains("overlaps"), "{errors:?}");
        let errors = fields(parse_annotations(&annotations(&[(PORTS, "9011")])).unwrap_err());
        assert!(errors[0].contains("workersd.io/service]: required"));
        let errors = fields(parse_annotations(&annotations(&[(SERVICE, "a")])).unwrap_err());
        assert!(errors[0].contains("no port range"));
    }

    #[test]
    fn oversized_declarations_are_rejected() {
        let mut many: Vec<(String, String)> = (0..20)
            .map(|i| (format!("workersd.io/ports.c{i}"), format!("{}", 9000 + i)))
            .collect();
        many.push((SERVICE.into(), "a".into()));
        let map: BTreeMap<String, String> = many.into_iter().collect();
        assert!(
            fields(parse_annotations(&map).unwrap_err())
                .iter()
                .any(|e| e.contains("at most 16"))
        );
        let huge = "1".repeat(MAX_ANNOTATION_VALUE + 1);
        assert!(parse_annotations(&annotations(&[(SERVICE, "a"), (PORTS, &huge)])).is_err());
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
}
