//! What the Kubernetes mode sends to the API server, checked against kube-rs's tower-test mock
//! service: status patches, Warning Events (published once per distinct problem), and Lease
//! acquisition.

use super::crd::WorkerMetricsStatus;
use super::leader::{LeaseSettings, try_hold};
use super::spec::field_error;
use super::status;
use super::watch::{EventPublisher, Warned};
use http::{Method, Request, Response, StatusCode};
use kube::Client;
use kube::client::Body;
use kube::runtime::events::Reporter;
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::pin::pin;
use std::time::Duration;
use tower_test::mock;

type Handle = mock::Handle<Request<Body>, Response<Body>>;

fn client() -> (Client, Handle) {
    let (service, handle) = mock::pair::<Request<Body>, Response<Body>>();
    (Client::new(service, "default"), handle)
}

/// Answers the next request with `status` and `body`, returning what was asked.
async fn answer(handle: &mut Handle, status: StatusCode, body: Value) -> (Method, String, Value) {
    let mut handle = pin!(handle);
    let (request, send) = tokio::time::timeout(Duration::from_secs(5), handle.next_request())
        .await
        .expect("a request within 5 s")
        .expect("service called");
    let method = request.method().clone();
    let uri = request.uri().to_string();
    let bytes = request.into_body().collect_bytes().await.unwrap();
    let sent: Value = if bytes.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&bytes).unwrap()
    };
    send.send_response(
        Response::builder()
            .status(status)
            .body(Body::from(serde_json::to_vec(&body).unwrap()))
            .unwrap(),
    );
    (method, uri, sent)
}

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
    status::patch(&client, "shop", "web", &status)
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

#[tokio::test]
async fn invalid_pod_gets_one_warning_event_per_distinct_problem() {
    let (client, mut handle) = client();
    let events = EventPublisher {
        client,
        reporter: Reporter {
            controller: "workersd".into(),
            instance: Some("test".into()),
        },
    };
    let mut warned = Warned::default();
    let key = ("shop".to_string(), "web-1".to_string());
    let problem = vec![field_error(
        "metadata.annotations[workersd.io/ports]",
        "range 9020-9011 is reversed",
    )];
    let invalid = BTreeMap::from([(key.clone(), ("uid-1".to_string(), problem))]);

    let server = tokio::spawn(async move {
        let first = answer(&mut handle, StatusCode::CREATED, json!({})).await;
        (first, handle)
    });
    warned.pods(&events, &invalid).await;
    let ((method, uri, event), mut handle) = server.await.unwrap();
    assert_eq!(method, Method::POST);
    assert!(
        uri.starts_with("/apis/events.k8s.io/v1/namespaces/shop/events"),
        "{uri}"
    );
    assert_eq!(event["type"], "Warning");
    assert_eq!(event["reason"], "InvalidWorkerMetrics");
    assert_eq!(event["regarding"]["name"], "web-1");
    assert_eq!(event["regarding"]["kind"], "Pod");
    assert!(
        event["note"]
            .as_str()
            .unwrap()
            .contains("workersd.io/ports"),
        "{event}"
    );

    // Same problem again: no request at all.
    warned.pods(&events, &invalid).await;
    {
        let mut pending = pin!(&mut handle);
        assert!(
            tokio::time::timeout(Duration::from_millis(200), pending.next_request())
                .await
                .is_err(),
            "no second Event for the same problem"
        );
    }

    // A different problem on the same object: a new Event (not folded into the first one)
    // whose note names the new field.
    let other = vec![field_error(
        "metadata.annotations[workersd.io/service]",
        "\"Bad_Name\" is not a DNS-compatible name",
    )];
    let changed = BTreeMap::from([(key, ("uid-1".to_string(), other))]);
    let server =
        tokio::spawn(async move { answer(&mut handle, StatusCode::CREATED, json!({})).await });
    warned.pods(&events, &changed).await;
    let (method, _, event) = server.await.unwrap();
    assert_eq!(
        method,
        Method::POST,
        "a new Event, not a patch of the old series"
    );
    assert!(
        event["note"]
            .as_str()
            .unwrap()
            .contains("workersd.io/service"),
        "{event}"
    );
}

#[tokio::test]
async fn lease_is_created_when_missing_and_not_taken_while_held() {
    let settings = LeaseSettings {
        namespace: "ops".into(),
        name: "workersd".into(),
        identity: "me".into(),
        duration: Duration::from_secs(15),
    };
    let (client, mut handle) = client();
    let api = kube::Api::namespaced(client, "ops");
    let server = tokio::spawn(async move {
        let get = answer(
            &mut handle,
            StatusCode::NOT_FOUND,
            json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound", "code": 404, "message": "not found"}),
        )
        .await;
        let create = answer(
            &mut handle,
            StatusCode::CREATED,
            json!({"metadata": {"name": "workersd", "namespace": "ops"}}),
        )
        .await;
        (get, create, handle)
    });
    assert!(try_hold(&api, &settings).await.unwrap());
    let (get, create, mut handle) = server.await.unwrap();
    assert_eq!(get.0, Method::GET);
    assert_eq!(
        get.1,
        "/apis/coordination.k8s.io/v1/namespaces/ops/leases/workersd"
    );
    assert_eq!(create.0, Method::POST);
    assert_eq!(create.2["spec"]["holderIdentity"], "me");
    assert_eq!(create.2["spec"]["leaseDurationSeconds"], 15);

    // Someone else renewed just now: no write.
    let renewed = k8s_openapi::jiff::Timestamp::now().to_string();
    let server = tokio::spawn(async move {
        answer(
            &mut handle,
            StatusCode::OK,
            json!({"metadata": {"name": "workersd", "namespace": "ops", "resourceVersion": "5"},
                   "spec": {"holderIdentity": "other", "leaseDurationSeconds": 15, "renewTime": renewed}}),
        )
        .await;
        handle
    });
    assert!(!try_hold(&api, &settings).await.unwrap());
    let mut handle = server.await.unwrap();
    let mut pending = pin!(&mut handle);
    assert!(
        tokio::time::timeout(Duration::from_millis(200), pending.next_request())
            .await
            .is_err()
    );
}
