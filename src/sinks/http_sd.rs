//! The built-in Prometheus HTTP SD sink: `GET /targets[?service=NAME]` answers in the
//! `http_sd_configs` format, straight from the desired catalog (no Consul needed).

use crate::model::{Catalog, ServiceInstance, meta_keys};
use crate::pipeline::DesiredRx;
use crate::runtime::admin_server::Readiness;
use axum::Json;
use axum::extract::{Query, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;

/// One `http_sd_configs` target group.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TargetGroup {
    pub targets: Vec<String>,
    pub labels: BTreeMap<String, String>,
}

/// Prometheus label names allow `[a-zA-Z0-9_]` only.
fn label_name_part(key: &str) -> String {
    key.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

fn labels_of(instance: &ServiceInstance) -> BTreeMap<String, String> {
    let mut labels = BTreeMap::new();
    let path = instance
        .meta
        .get(meta_keys::METRICS_PATH)
        .cloned()
        .unwrap_or_else(|| "/metrics".into());
    let scheme = instance
        .meta
        .get(meta_keys::METRICS_SCHEME)
        .cloned()
        .unwrap_or_else(|| "http".into());
    labels.insert("__metrics_path__".into(), path);
    labels.insert("__scheme__".into(), scheme);
    labels.insert("__meta_workersd_service".into(), instance.service.clone());
    labels.insert("__meta_workersd_address".into(), instance.address.clone());
    // Same convention as Consul SD: separators around the list so `,tag,` regexes work.
    labels.insert(
        "__meta_workersd_tags".into(),
        format!(",{},", instance.tags.join(",")),
    );
    for (key, value) in instance.meta.iter() {
        if meta_keys::RESERVED.contains(&key.as_str()) {
            continue;
        }
        labels.insert(
            format!("__meta_workersd_meta_{}", label_name_part(key)),
            value.clone(),
        );
    }
    labels
}

fn target_address(instance: &ServiceInstance) -> String {
    if instance.address.contains(':') {
        format!("[{}]:{}", instance.address, instance.port)
    } else {
        format!("{}:{}", instance.address, instance.port)
    }
}

type Labels = BTreeMap<String, String>;

/// Groups instances sharing identical labels; output order is deterministic.
pub fn target_groups(catalog: &Catalog, service: Option<&str>) -> Vec<TargetGroup> {
    let mut groups: BTreeMap<Labels, Vec<(&str, u16, String)>> = BTreeMap::new();
    for instance in catalog
        .values()
        .filter(|i| service.is_none_or(|s| i.service == s))
    {
        groups.entry(labels_of(instance)).or_default().push((
            instance.address.as_str(),
            instance.port,
            target_address(instance),
        ));
    }
    groups
        .into_iter()
        .map(|(labels, mut targets)| {
            targets.sort();
            TargetGroup {
                targets: targets.into_iter().map(|(_, _, t)| t).collect(),
                labels,
            }
        })
        .collect()
}

#[derive(Deserialize)]
struct TargetsQuery {
    service: Option<String>,
}

#[derive(Clone)]
struct SdState {
    desired: DesiredRx,
    readiness: Arc<Readiness>,
}

async fn targets(State(sd): State<SdState>, Query(query): Query<TargetsQuery>) -> Response {
    // A list that is empty only because nothing was probed yet would make Prometheus drop
    // every target: refuse instead, so it keeps its last good list.
    if sd.readiness.standby.load(Ordering::Relaxed) {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "standing by for leadership\n",
        )
            .into_response();
    }
    if !sd.readiness.probed.load(Ordering::Relaxed) {
        return (StatusCode::SERVICE_UNAVAILABLE, "targets not yet probed\n").into_response();
    }
    let state = sd.desired.borrow().clone();
    let mut response =
        Json(target_groups(&state.catalog, query.service.as_deref())).into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json; charset=utf-8"),
    );
    response
}

pub fn router(desired: DesiredRx, readiness: Arc<Readiness>) -> axum::Router {
    axum::Router::new()
        .route("/targets", get(targets))
        .with_state(SdState { desired, readiness })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::desired_catalog;
    use crate::model::{PortRange, Scheme, Target, TargetId};
    use std::collections::BTreeSet;

    fn target(service: &str, address: &str) -> Target {
        Target {
            id: TargetId::new(address),
            service: service.into(),
            address: address.parse().unwrap(),
            ports: "9011-9020".parse::<PortRange>().unwrap(),
            path: "/m".into(),
            scheme: Scheme::Https,
            tags: vec!["a".into(), "b".into()],
            meta: BTreeMap::from([("team-name".into(), "web".into())]),
            revision: 0,
            probe_interval: None,
        }
    }

    #[test]
    fn groups_per_target_with_prometheus_labels() {
        let (a, b, v6) = (
            target("clever", "127.0.0.2"),
            target("other", "127.0.0.3"),
            target("clever", "::1"),
        );
        let live = BTreeSet::from([9012, 9011]);
        let catalog = desired_catalog("me", [(&a, &live), (&b, &live), (&v6, &live)]);
        let groups = target_groups(&catalog, Some("clever"));
        assert_eq!(groups.len(), 2);
        let g = groups
            .iter()
            .find(|g| g.labels["__meta_workersd_address"] == "127.0.0.2")
            .unwrap();
        assert_eq!(g.targets, vec!["127.0.0.2:9011", "127.0.0.2:9012"]);
        assert_eq!(g.labels["__metrics_path__"], "/m");
        assert_eq!(g.labels["__scheme__"], "https");
        assert_eq!(g.labels["__meta_workersd_service"], "clever");
        assert_eq!(g.labels["__meta_workersd_tags"], ",a,b,");
        assert_eq!(g.labels["__meta_workersd_meta_team_name"], "web");
        assert!(
            !g.labels.keys().any(|k| k.contains("owner")),
            "internal meta stays internal"
        );
        let g6 = groups
            .iter()
            .find(|g| g.labels["__meta_workersd_address"] == "::1")
            .unwrap();
        assert_eq!(g6.targets, vec!["[::1]:9011", "[::1]:9012"]);
        assert_eq!(target_groups(&catalog, None).len(), 3);
        assert!(target_groups(&catalog, Some("nope")).is_empty());
    }
}
