//! Keeps each `WorkerMetrics` status current: observed generation, matched pods, live
//! endpoints, and the `Ready` / `InvalidSpec` conditions. Written only when it changes.

use crate::model::Catalog;
use crate::pipeline::DesiredRx;
use crate::sources::kubernetes::crd::{WorkerMetrics, WorkerMetricsStatus};
use crate::sources::kubernetes::watch::{ResourceReport, ResourceState};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::api::{Patch, PatchParams};
use kube::{Api, Client};
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

/// The field manager of workersd's writes.
pub const FIELD_MANAGER: &str = "workersd";

/// Live endpoints per (namespace, pod), from the desired catalog.
pub fn live_by_pod(catalog: &Catalog) -> HashMap<(&str, &str), u32> {
    let mut counts = HashMap::new();
    for instance in catalog.values() {
        if let (Some(ns), Some(pod)) = (
            instance.meta.get("k8s-namespace"),
            instance.meta.get("k8s-pod"),
        ) {
            *counts.entry((ns.as_str(), pod.as_str())).or_insert(0) += 1;
        }
    }
    counts
}

fn condition(
    type_: &str,
    status: bool,
    reason: &str,
    message: String,
    previous: Option<&WorkerMetricsStatus>,
    now: &Time,
) -> Condition {
    let status = if status { "True" } else { "False" };
    // The transition time only moves when the status does.
    let last_transition_time = previous
        .and_then(|p| p.conditions.iter().find(|c| c.type_ == type_))
        .filter(|c| c.status == status)
        .map(|c| c.last_transition_time.clone())
        .unwrap_or_else(|| now.clone());
    Condition {
        type_: type_.into(),
        status: status.into(),
        reason: reason.into(),
        message,
        last_transition_time,
        observed_generation: None,
    }
}

pub fn status_for(
    namespace: &str,
    state: &ResourceState,
    live: &HashMap<(&str, &str), u32>,
    previous: Option<&WorkerMetricsStatus>,
    now: &Time,
) -> WorkerMetricsStatus {
    let endpoints: u32 = state
        .covered_pods
        .iter()
        .map(|pod| live.get(&(namespace, pod.as_str())).copied().unwrap_or(0))
        .sum();
    let pods = state.covered_pods.len() as u32;
    let conditions = match &state.errors {
        Some(errors) => vec![
            condition(
                "Ready",
                false,
                "InvalidSpec",
                "the spec is invalid; see the InvalidSpec condition".into(),
                previous,
                now,
            ),
            condition(
                "InvalidSpec",
                true,
                "InvalidSpec",
                errors.join("; "),
                previous,
                now,
            ),
        ],
        None => vec![
            condition(
                "Ready",
                true,
                "Reconciled",
                format!("{pods} pod(s) matched, {endpoints} live endpoint(s)"),
                previous,
                now,
            ),
            condition("InvalidSpec", false, "Valid", String::new(), previous, now),
        ],
    };
    WorkerMetricsStatus {
        observed_generation: state.generation,
        matched_pods: pods,
        live_endpoints: endpoints,
        conditions,
    }
}

/// Patches statuses whenever coverage or the desired catalog changes (coalesced).
#[tracing::instrument(name = "workermetrics_status", skip_all)]
pub async fn run(
    client: Client,
    mut resources: watch::Receiver<Arc<ResourceReport>>,
    mut desired: DesiredRx,
) {
    let mut written: HashMap<String, WorkerMetricsStatus> = HashMap::new();
    loop {
        let report = resources.borrow_and_update().clone();
        let catalog = desired.borrow_and_update().clone();
        let live = live_by_pod(&catalog.catalog);
        let now = Time(k8s_openapi::jiff::Timestamp::now());
        let mut seen = BTreeMap::new();
        for ((namespace, name), state) in report.iter() {
            // What we wrote last, else what the object carries (written by an earlier run or
            // leader): an unchanged condition keeps its lastTransitionTime across restarts.
            let previous = written.get(&state.uid).or(state.existing.as_ref());
            let status = status_for(namespace, state, &live, previous, &now);
            seen.insert(state.uid.clone(), ());
            if previous == Some(&status) {
                written.insert(state.uid.clone(), status);
                continue;
            }
            match patch(&client, namespace, name, &status).await {
                Ok(()) => {
                    written.insert(state.uid.clone(), status);
                }
                Err(e) => {
                    tracing::warn!(namespace, workermetrics = name, error = %e, "cannot update status")
                }
            }
        }
        written.retain(|uid, _| seen.contains_key(uid));
        tokio::select! {
            r = resources.changed() => if r.is_err() { return },
            r = desired.changed() => if r.is_err() { return },
        }
        // Let a burst of changes settle into one round of patches.
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

pub(crate) async fn patch(
    client: &Client,
    namespace: &str,
    name: &str,
    status: &WorkerMetricsStatus,
) -> Result<(), kube::Error> {
    let api: Api<WorkerMetrics> = Api::namespaced(client.clone(), namespace);
    let body = serde_json::json!({ "status": status });
    // Named like every write of ours, so managedFields say who owns the status.
    let params = PatchParams {
        field_manager: Some(FIELD_MANAGER.into()),
        ..PatchParams::default()
    };
    api.patch_status(name, &params, &Patch::Merge(&body))
        .await
        .map(|_| ())
}

#[cfg(test)]
mod api_tests;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::desired_catalog;
    use crate::model::{PortRange, Scheme, Target, TargetId};
    use std::collections::BTreeSet;

    fn state(pods: &[&str], errors: Option<Vec<String>>) -> ResourceState {
        ResourceState {
            uid: "u".into(),
            generation: Some(3),
            covered_pods: pods.iter().map(|p| p.to_string()).collect(),
            errors,
            existing: None,
        }
    }

    #[test]
    fn counts_endpoints_of_covered_pods_and_keeps_transition_times() {
        let target = |pod: &str| Target {
            id: TargetId::new(pod),
            service: "s".into(),
            address: "127.0.0.2".parse().unwrap(),
            ports: PortRange::new(1, 10).unwrap(),
            path: "/metrics".into(),
            scheme: Scheme::Http,
            tags: vec![],
            meta: BTreeMap::from([
                ("k8s-namespace".into(), "shop".into()),
                ("k8s-pod".into(), pod.into()),
            ]),
            revision: 0,
            probe_interval: None,
        };
        let (a, b) = (target("a"), target("b"));
        let (three, two) = (BTreeSet::from([1, 2, 3]), BTreeSet::from([4, 5]));
        let catalog = desired_catalog("o", [(&a, &three), (&b, &two)]);
        let live = live_by_pod(&catalog);
        let t0 = Time(k8s_openapi::jiff::Timestamp::from_second(1_000).unwrap());
        let first = status_for("shop", &state(&["a", "c"], None), &live, None, &t0);
        assert_eq!(
            (
                first.matched_pods,
                first.live_endpoints,
                first.observed_generation
            ),
            (2, 3, Some(3))
        );
        assert_eq!(first.conditions[0].type_, "Ready");
        assert_eq!(first.conditions[0].status, "True");
        let t1 = Time(k8s_openapi::jiff::Timestamp::from_second(2_000).unwrap());
        let again = status_for("shop", &state(&["a", "c"], None), &live, Some(&first), &t1);
        assert_eq!(again, first, "no change, no new transition time, no patch");

        let invalid = status_for(
            "shop",
            &state(&[], Some(vec!["spec.service: bad".into()])),
            &live,
            Some(&first),
            &t1,
        );
        assert_eq!(invalid.conditions[0].status, "False");
        assert_eq!(invalid.conditions[0].last_transition_time, t1);
        assert_eq!(invalid.conditions[1].type_, "InvalidSpec");
        assert_eq!(invalid.conditions[1].status, "True");
        assert_eq!(invalid.conditions[1].message, "spec.service: bad");
    }
}
