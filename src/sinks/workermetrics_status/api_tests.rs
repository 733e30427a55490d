//! Status writes against a mocked API server: merge patches on the status subresource, named
//! by their field manager, skipped when the object already says the same.

use super::{self as status};
use crate::kube_mock::{answer, bounded, client, no_request_for};
use crate::sources::kubernetes::crd::WorkerMetricsStatus;
use crate::sources::kubernetes::watch;
use http::{Method, StatusCode};
use serde_json::json;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

#[tokio::test]
async fn status_patch_is_a_merge_patch_on_the_status_subresource() {
    let (client, mut handle) = client();
    let status = WorkerMetricsStatus {
        observed_generation: Some(4),
        matched_pods: 2,
        live_endpoints: 7,
        conditions: vec![],
    };
    let server = tokio::spawn(async move {
        let (method, uri, body) = answer(
            &mut handle,
            StatusCode::OK,
            json!({"apiVersion": "workersd.io/v1alpha1", "kind": "WorkerMetrics",
                   "metadata": {"name": "web", "namespace": "shop"},
                   "spec": {"selector": {}, "service": "s", "containers": []}}),
        )
        .await;
        (method, uri, body)
    });
    bounded(status::patch(&client, "shop", "web", &status))
        .await
        .unwrap();
    let (method, uri, body) = server.await.unwrap();
    assert_eq!(method, Method::PATCH);
    assert!(
        uri.starts_with("/apis/workersd.io/v1alpha1/namespaces/shop/workermetrics/web/status"),
        "{uri}"
    );
    assert_eq!(body["status"]["observedGeneration"], 4);
    assert_eq!(body["status"]["matchedPods"], 2);
    assert_eq!(body["status"]["liveEndpoints"], 7);
}

fn existing_status(matched: u32, message: &str, since: &str) -> WorkerMetricsStatus {
    let since: k8s_openapi::jiff::Timestamp = since.parse().unwrap();
    let condition = |type_: &str, status: &str, reason: &str, message: &str| {
        k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition {
            type_: type_.into(),
            status: status.into(),
            reason: reason.into(),
            message: message.into(),
            last_transition_time: k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(since),
            observed_generation: None,
        }
    };
    WorkerMetricsStatus {
        observed_generation: Some(3),
        matched_pods: matched,
        live_endpoints: 0,
        conditions: vec![
            condition("Ready", "True", "Reconciled", message),
            condition("InvalidSpec", "False", "Valid", ""),
        ],
    }
}

fn report_with(existing: WorkerMetricsStatus) -> Arc<watch::ResourceReport> {
    let state = watch::ResourceState {
        uid: "u1".into(),
        generation: Some(3),
        covered_pods: ["a".to_string(), "b".to_string()].into(),
        errors: None,
        existing: Some(existing),
    };
    Arc::new(BTreeMap::from([(
        ("shop".to_string(), "web".to_string()),
        state,
    )]))
}

/// After a restart or failover the object's own status is the reference: a condition that did
/// not change keeps its lastTransitionTime, an identical status is not rewritten, and every
/// patch names workersd as its field manager.
#[tokio::test]
async fn status_writes_keep_transition_times_across_restarts_and_name_their_manager() {
    let since = "2020-01-01T00:00:00Z";
    // Written by an earlier leader: Ready since 2020, 5 pods then; 2 now.
    let (kube_client, mut handle) = client();
    let (_resources_tx, resources) = tokio::sync::watch::channel(report_with(existing_status(
        5,
        "5 pod(s) matched, 0 live endpoint(s)",
        since,
    )));
    let (_desired_tx, desired) = crate::pipeline::desired_channel();
    let writer = tokio::spawn(status::run(kube_client, resources, desired));
    let (method, uri, body) = answer(&mut handle, StatusCode::OK, json!({})).await;
    assert_eq!(method, Method::PATCH);
    assert!(uri.contains("/workermetrics/web/status?"), "{uri}");
    assert!(uri.contains("fieldManager=workersd"), "{uri}");
    assert_eq!(body["status"]["matchedPods"], 2);
    assert_eq!(body["status"]["conditions"][0]["type"], "Ready");
    assert_eq!(
        body["status"]["conditions"][0]["lastTransitionTime"], since,
        "Ready stayed True: its transition time is the object's, not the restart's"
    );
    assert_eq!(body["status"]["conditions"][1]["lastTransitionTime"], since);
    writer.abort();

    // The object already says exactly what we would write: no patch at all.
    let (kube_client, mut handle) = client();
    let (_resources_tx, resources) = tokio::sync::watch::channel(report_with(existing_status(
        2,
        "2 pod(s) matched, 0 live endpoint(s)",
        since,
    )));
    let (_desired_tx, desired) = crate::pipeline::desired_channel();
    let writer = tokio::spawn(status::run(kube_client, resources, desired));
    no_request_for(&mut handle, Duration::from_millis(500)).await;
    writer.abort();
}
