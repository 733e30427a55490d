//! The `WorkerMetrics` custom resource: a selector over pods of its namespace plus the port
//! ranges of their containers. `workersd crd` prints its CustomResourceDefinition.

use crate::declaration::{
    self, Declaration, DeclarationError, ErrorKind, FieldPath, Input, Located, RawDeclaration,
    RawMeta, RawRange, SourceKind,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, LabelSelector};
use kube::CustomResource;
use kube::core::{Selector, SelectorExt};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

/// Declares where the workers of a set of pods expose their metrics.
// Several printcolumns legitimately repeat `type_`.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "workersd.io",
    version = "v1alpha1",
    kind = "WorkerMetrics",
    plural = "workermetrics",
    shortname = "wm",
    namespaced,
    status = "WorkerMetricsStatus",
    printcolumn(name = "Service", type_ = "string", json_path = ".spec.service"),
    printcolumn(name = "Pods", type_ = "integer", json_path = ".status.matchedPods"),
    printcolumn(
        name = "Endpoints",
        type_ = "integer",
        json_path = ".status.liveEndpoints"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct WorkerMetricsSpec {
    /// Pods of this namespace whose labels match are covered.
    pub selector: LabelSelector,
    /// Consul service name (subject to the controller's service-name policy).
    pub service: String,
    /// Worker port ranges per container.
    pub containers: Vec<ContainerPorts>,
    /// HTTP path of the workers' metrics (default /metrics).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// http or https (default http).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scheme: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tags: Vec<String>,
    /// Extra Consul service meta (and HTTP SD labels).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub meta: BTreeMap<String, String>,
    /// Steady-state probe interval for these pods, e.g. "5s" (default: the controller's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub probe_interval: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ContainerPorts {
    /// Container name.
    pub name: String,
    /// Inclusive range like "9011-9020", or one port.
    pub ports: String,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct WorkerMetricsStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    #[serde(default)]
    pub matched_pods: u32,
    #[serde(default)]
    pub live_endpoints: u32,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
}

/// A validated resource: its selector and the declaration it applies.
#[derive(Clone, Debug)]
pub struct CompiledWorkerMetrics {
    pub selector: Selector,
    pub spec: Declaration,
    pub probe_interval: Option<Duration>,
}

impl CompiledWorkerMetrics {
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.selector.matches(labels)
    }
}

/// Shortest and longest `probeInterval` accepted.
const PROBE_INTERVALS: std::ops::RangeInclusive<Duration> =
    Duration::from_secs(1)..=Duration::from_secs(3600);

/// Validates a spec, naming each bad field by its path.
pub fn compile(spec: &WorkerMetricsSpec) -> Result<CompiledWorkerMetrics, Vec<DeclarationError>> {
    let mut errors = Vec::new();
    let field = |name: &str| FieldPath::new(format!("spec.{name}"));
    let selector = match Selector::try_from(spec.selector.clone()) {
        Ok(s) => Some(s),
        Err(e) => {
            errors.push(DeclarationError::new(
                field("selector"),
                ErrorKind::Selector(Arc::new(e)),
            ));
            None
        }
    };
    let selector_bad = selector.is_none();
    let optional = |name: &str, value: &Option<String>| match value {
        None => Input::Absent(field(name)),
        Some(value) => Input::given(field(name), value.clone()),
    };
    let raw = RawDeclaration {
        source: SourceKind::WorkerMetrics,
        service: Input::given(field("service"), spec.service.clone()),
        ranges_field: field("containers"),
        ranges: spec
            .containers
            .iter()
            .enumerate()
            .map(|(i, c)| RawRange {
                container: Some(Located::new(
                    field(&format!("containers[{i}].name")),
                    c.name.clone(),
                )),
                ports: Located::new(field(&format!("containers[{i}].ports")), c.ports.clone()),
            })
            .collect(),
        ranges_refused: false,
        path: optional("path", &spec.path),
        scheme: optional("scheme", &spec.scheme),
        tags: Input::given(field("tags"), spec.tags.clone()),
        meta_field: field("meta"),
        meta: spec
            .meta
            .iter()
            .map(|(key, value)| RawMeta {
                field: field("meta"),
                key: key.clone(),
                value: value.clone(),
            })
            .collect(),
    };
    let declared = declaration::validate(raw);
    let probe_interval = match spec
        .probe_interval
        .as_deref()
        .map(humantime::parse_duration)
    {
        None => None,
        Some(Ok(d)) if PROBE_INTERVALS.contains(&d) => Some(d),
        Some(Ok(_)) => {
            errors.push(DeclarationError::new(
                field("probeInterval"),
                ErrorKind::ProbeIntervalRange,
            ));
            None
        }
        Some(Err(e)) => {
            errors.push(DeclarationError::new(
                field("probeInterval"),
                ErrorKind::NotADuration(e),
            ));
            None
        }
    };
    match (declared, selector) {
        (Ok(declared), Some(selector)) if errors.is_empty() => Ok(CompiledWorkerMetrics {
            selector,
            spec: declared,
            probe_interval,
        }),
        (declared, _) => {
            // In the order of the spec's fields: the selector first, the probe interval last.
            let probe_errors = errors.split_off(usize::from(selector_bad));
            errors.extend(declared.err().unwrap_or_default());
            errors.extend(probe_errors);
            Err(errors)
        }
    }
}

/// The CustomResourceDefinition as YAML (what `workersd crd` prints and `crds/` contains).
pub fn crd_yaml() -> String {
    use kube::CustomResourceExt;
    let crd = WorkerMetrics::crd();
    format!(
        "# Generated by `workersd crd`; do not edit (a test fails when it drifts from the code).\n{}",
        serde_norway::to_string(&crd).expect("a CRD always serialises")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> WorkerMetricsSpec {
        serde_json::from_value(serde_json::json!({
            "selector": {"matchLabels": {"app": "web"}},
            "service": "clever",
            "containers": [{"name": "web", "ports": "9011-9020"}],
            "tags": ["gunicorn"],
            "probeInterval": "5s"
        }))
        .unwrap()
    }

    #[test]
    fn compiles_a_valid_spec() {
        let compiled = compile(&spec()).unwrap();
        assert_eq!(compiled.spec.service, "clever");
        assert_eq!(compiled.probe_interval, Some(Duration::from_secs(5)));
        assert!(compiled.matches(&BTreeMap::from([("app".into(), "web".into())])));
        assert!(!compiled.matches(&BTreeMap::from([("app".into(), "db".into())])));
    }

    #[test]
    fn names_every_bad_field() {
        let mut bad = spec();
        bad.service = "no_way".into();
        bad.containers.push(ContainerPorts {
            name: "".into(),
            ports: "9015-9030".into(),
        });
        bad.containers.push(ContainerPorts {
            name: "x".into(),
            ports: "nope".into(),
        });
        bad.scheme = Some("gopher".into());
        bad.probe_interval = Some("0s".into());
        bad.selector.match_expressions = Some(vec![
            k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelectorRequirement {
                key: "a".into(),
                operator: "Sideways".into(),
                values: None,
            },
        ]);
        let errors: Vec<String> = compile(&bad)
            .unwrap_err()
            .iter()
            .map(ToString::to_string)
            .collect();
        for want in [
            "spec.selector:",
            "spec.service:",
            "spec.containers[1].name:",
            "spec.containers[2].ports:",
            "spec.containers[1].ports: 9015-9030 overlaps",
            "spec.scheme:",
            "spec.probeInterval:",
        ] {
            assert!(
                errors.iter().any(|e| e.starts_with(want)),
                "missing {want:?} in {errors:#?}"
            );
        }
    }

    #[test]
    fn committed_crd_matches_the_code() {
        let committed = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/crds/workermetrics.yaml"))
            .expect("crds/workermetrics.yaml exists; regenerate with `workersd crd > crds/workermetrics.yaml`");
        assert!(
            committed == crd_yaml(),
            "crds/workermetrics.yaml drifted from the code; regenerate with `cargo run -- crd > crds/workermetrics.yaml`"
        );
    }
}
