//! The `WorkerMetrics` custom resource: a selector over pods of its namespace plus the port
//! ranges of their containers. `workersd crd` prints its CustomResourceDefinition.

use super::spec::{DeclaredRange, FieldError, WorkerSpec, check_ranges, field_error};
use crate::model::{PortRange, Scheme};
use crate::validate;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, LabelSelector};
use kube::CustomResource;
use kube::core::{Selector, SelectorExt};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
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
    pub spec: WorkerSpec,
    pub probe_interval: Option<Duration>,
}

impl CompiledWorkerMetrics {
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.selector.matches(labels)
    }
}

/// Validates a spec, naming each bad field by its path.
pub fn compile(spec: &WorkerMetricsSpec) -> Result<CompiledWorkerMetrics, Vec<FieldError>> {
    let mut errors = Vec::new();
    let selector = match Selector::try_from(spec.selector.clone()) {
        Ok(s) => Some(s),
        Err(e) => {
            errors.push(field_error("spec.selector", e.to_string()));
            None
        }
    };
    if let Err(e) = validate::service_name(&spec.service) {
        errors.push(field_error("spec.service", e));
    }
    if spec.containers.is_empty() {
        errors.push(field_error(
            "spec.containers",
            "at least one container with a port range is required",
        ));
    }
    let mut ranges = Vec::new();
    let mut range_fields = Vec::new();
    for (i, c) in spec.containers.iter().enumerate() {
        if c.name.is_empty() {
            errors.push(field_error(
                format!("spec.containers[{i}].name"),
                "must not be empty",
            ));
        }
        match c.ports.parse::<PortRange>() {
            Ok(ports) => {
                ranges.push(DeclaredRange {
                    container: Some(c.name.clone()),
                    ports,
                });
                range_fields.push((ports, format!("spec.containers[{i}].ports")));
            }
            Err(e) => errors.push(field_error(
                format!("spec.containers[{i}].ports"),
                e.to_string(),
            )),
        }
    }
    errors.extend(check_ranges(&ranges, |r| {
        range_fields
            .iter()
            .find(|(p, _)| *p == r.ports)
            .map(|(_, f)| f.clone())
            .unwrap_or_default()
    }));
    let path = spec.path.clone().unwrap_or_else(|| "/metrics".into());
    if let Err(e) = validate::metrics_path(&path) {
        errors.push(field_error("spec.path", e));
    }
    let scheme = match spec.scheme.as_deref().map(str::parse::<Scheme>) {
        None => Scheme::Http,
        Some(Ok(s)) => s,
        Some(Err(e)) => {
            errors.push(field_error("spec.scheme", e));
            Scheme::Http
        }
    };
    if let Err(e) = validate::tags(&spec.tags) {
        errors.push(field_error("spec.tags", e));
    }
    if let Err(e) = validate::meta(&spec.meta) {
        errors.push(field_error("spec.meta", e));
    }
    let probe_interval = match spec
        .probe_interval
        .as_deref()
        .map(humantime::parse_duration)
    {
        None => None,
        Some(Ok(d)) if d >= Duration::from_secs(1) && d <= Duration::from_secs(3600) => Some(d),
        Some(Ok(_)) => {
            errors.push(field_error(
                "spec.probeInterval",
                "must be between 1s and 1h",
            ));
            None
        }
        Some(Err(e)) => {
            errors.push(field_error(
                "spec.probeInterval",
                format!("not a duration like \"10s\": {e}"),
            ));
            None
        }
    };
    if !errors.is_empty() {
        return Err(errors);
    }
    Ok(CompiledWorkerMetrics {
        selector: selector.expect("no errors"),
        spec: WorkerSpec {
            service: spec.service.clone(),
            ranges,
            path,
            scheme,
            tags: spec.tags.clone(),
            meta: spec.meta.clone(),
        },
        probe_interval,
    })
}

/// The CustomResourceDefinition as YAML (what `workersd crd` prints and `crds/` holds).
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
