//! What the Kubernetes mode sends to the API server, checked against kube-rs's tower-test mock
//! service: status patches, Warning Events (one per distinct problem, renewed before the
//! Event TTL, retried with backoff), and Lease acquisition. Every call is bounded in time.

use super::crd::WorkerMetricsStatus;
use super::{problems, watch};
use crate::declaration::{DeclarationError, ErrorKind, FieldPath};
use crate::runtime::leader::{LeaseSettings, Observed, try_hold};
use crate::sinks::kubernetes_events::{self as events, Problems};
use crate::sinks::workermetrics_status as status;
use http::{Method, Request, Response, StatusCode};
use kube::Client;
use kube::client::Body;
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::pin::pin;
use std::sync::Arc;
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

fn invalid_pod(note: &str) -> Arc<Problems> {
    let problems = problems::problems(
        &BTreeMap::from([(
            ("shop".to_string(), "web-1".to_string()),
            (
                "uid-1".to_string(),
                vec![DeclarationError::new(
                    FieldPath::new(note),
                    ErrorKind::HostNetwork,
                )],
            ),
        )]),
        &Default::default(),
        &Default::default(),
    );
    Arc::new(problems)
}

/// Events go out on their own task: one per distinct problem, renewed (a series patch) before
/// the API server's Event TTL, re-created when gone, retried with backoff when rejected.
#[tokio::test(start_paused = true)]
async fn warning_events_are_published_renewed_and_retried_off_the_watch_path() {
    let (client, mut handle) = client();
    let refresh = Duration::from_secs(1800);
    let (tx, rx) =
        tokio::sync::watch::channel(invalid_pod("metadata.annotations[workersd.io/ports]"));
    let publisher = tokio::spawn(events::run(client, "wd-1".into(), refresh, rx));

    let (method, uri, event) = answer(&mut handle, StatusCode::CREATED, json!({})).await;
    assert_eq!(method, Method::POST);
    assert!(
        uri.starts_with("/apis/events.k8s.io/v1/namespaces/shop/events"),
        "{uri}"
    );
    assert_eq!(event["type"], "Warning");
    assert_eq!(event["reason"], "InvalidWorkerMetrics");
    assert_eq!(event["reportingController"], "workersd");
    assert_eq!(event["reportingInstance"], "wd-1");
    assert_eq!(event["regarding"]["name"], "web-1");
    assert_eq!(event["regarding"]["kind"], "Pod");
    assert!(
        event["note"]
            .as_str()
            .unwrap()
            .contains("workersd.io/ports"),
        "{event}"
    );
    let name = event["metadata"]["name"].as_str().unwrap().to_string();
    assert!(name.starts_with("web-1."), "{name}");

    // The same problem, resolved again and again: nothing until the refresh is due.
    tx.send_replace(invalid_pod("metadata.annotations[workersd.io/ports]"));
    no_request_for(&mut handle, refresh - Duration::from_secs(1)).await;
    // Then the Event is renewed by patching its series (which renews its TTL).
    let (method, uri, patch) = answer(&mut handle, StatusCode::OK, json!({})).await;
    assert_eq!(method, Method::PATCH);
    assert!(uri.contains(&format!("/events/{name}")), "{uri}");
    assert_eq!(patch["series"]["count"], 2);
    assert!(patch["series"]["lastObservedTime"].is_string(), "{patch}");

    // Next time the Event has expired: 404, so a new Event is created at once.
    no_request_for(&mut handle, refresh - Duration::from_secs(1)).await;
    let (method, ..) = answer(
        &mut handle,
        StatusCode::NOT_FOUND,
        api_status(404, "NotFound", "gone"),
    )
    .await;
    assert_eq!(method, Method::PATCH);
    let (method, ..) = answer(&mut handle, StatusCode::CREATED, json!({})).await;
    assert_eq!(method, Method::POST);

    // A different problem: a new Event naming it; rejected, it is retried after 1 s, 2 s, ...
    // and not on every resolution.
    tx.send_replace(invalid_pod("metadata.annotations[workersd.io/service]"));
    let rejected = api_status(500, "InternalError", "etcd");
    let (method, _, event) = answer(
        &mut handle,
        StatusCode::INTERNAL_SERVER_ERROR,
        rejected.clone(),
    )
    .await;
    assert_eq!(method, Method::POST);
    assert!(
        event["note"]
            .as_str()
            .unwrap()
            .contains("workersd.io/service"),
        "{event}"
    );
    for backoff in [1, 2, 4] {
        tx.send_replace(invalid_pod("metadata.annotations[workersd.io/service]"));
        no_request_for(&mut handle, Duration::from_millis(backoff * 1000 - 10)).await;
        let (method, ..) = answer(
            &mut handle,
            StatusCode::INTERNAL_SERVER_ERROR,
            rejected.clone(),
        )
        .await;
        assert_eq!(method, Method::POST);
    }
    // Fixed: no more Events.
    tx.send_replace(Arc::new(Problems::new()));
    no_request_for(&mut handle, Duration::from_secs(3600)).await;
    publisher.abort();
}

/// Asserts that nothing is sent for `quiet` (in paused time).
async fn no_request_for(handle: &mut Handle, quiet: Duration) {
    let mut pending = pin!(handle);
    assert!(
        tokio::time::timeout(quiet, pending.next_request())
            .await
            .is_err(),
        "no request for {quiet:?}"
    );
}

/// Bounds a call under test: a regression that sends an unexpected request (which the mock
/// never answers) fails the test instead of hanging it.
async fn bounded<T>(call: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(5), call)
        .await
        .expect("the call finishes within 5 s (an unexpected request would hang it)")
}

/// Asserts that nothing else was sent.
async fn no_more_requests(handle: &mut Handle) {
    let mut pending = pin!(handle);
    assert!(
        tokio::time::timeout(Duration::from_millis(200), pending.next_request())
            .await
            .is_err(),
        "no further request"
    );
}

/// The body of an API error, as the apiserver sends it.
fn api_status(code: u16, reason: &str, message: &str) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": reason,
           "code": code, "message": message})
}

fn lease_settings() -> LeaseSettings {
    LeaseSettings {
        namespace: "ops".into(),
        name: "workersd".into(),
        identity: "me".into(),
        duration: Duration::from_secs(15),
    }
}

fn held_by_other(renew_time: k8s_openapi::jiff::Timestamp, duration: i64, rv: &str) -> Value {
    json!({"metadata": {"name": "workersd", "namespace": "ops", "resourceVersion": rv},
           "spec": {"holderIdentity": "other", "leaseDurationSeconds": duration,
                    "renewTime": renew_time.to_string()}})
}

#[tokio::test]
async fn lease_is_created_when_missing_and_not_taken_while_held() {
    let settings = lease_settings();
    let (client, mut handle) = client();
    let api = kube::Api::namespaced(client, "ops");
    let mut observed = Observed::default();
    let server = tokio::spawn(async move {
        let get = answer(
            &mut handle,
            StatusCode::NOT_FOUND,
            api_status(404, "NotFound", "not found"),
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
    assert!(
        bounded(try_hold(&api, &settings, &mut observed))
            .await
            .unwrap()
    );
    let (get, create, mut handle) = server.await.unwrap();
    assert_eq!(get.0, Method::GET);
    assert_eq!(
        get.1,
        "/apis/coordination.k8s.io/v1/namespaces/ops/leases/workersd"
    );
    assert_eq!(create.0, Method::POST);
    // The apiserver names the object from its body (and checks its namespace against the
    // URL): a body without them is refused.
    assert_eq!(create.2["metadata"]["name"], "workersd");
    assert_eq!(create.2["metadata"]["namespace"], "ops");
    assert_eq!(create.2["spec"]["holderIdentity"], "me");
    assert_eq!(create.2["spec"]["leaseDurationSeconds"], 15);

    // Someone else renewed just now: no write.
    let mut observed = Observed::default();
    let renewed = k8s_openapi::jiff::Timestamp::now();
    let server = tokio::spawn(async move {
        answer(&mut handle, StatusCode::OK, held_by_other(renewed, 15, "5")).await;
        handle
    });
    assert!(
        !bounded(try_hold(&api, &settings, &mut observed))
            .await
            .unwrap()
    );
    let mut handle = server.await.unwrap();
    no_more_requests(&mut handle).await;
}

/// client-go's rule: another holder's lease expires leaseDurationSeconds after this instance
/// last saw it change, whatever the holder's clock wrote in renewTime.
#[tokio::test(start_paused = true)]
async fn a_skewed_holder_clock_neither_hands_over_early_nor_late() {
    let settings = lease_settings();
    let (client, mut handle) = client();
    let api = kube::Api::namespaced(client, "ops");
    let now = k8s_openapi::jiff::Timestamp::now();
    let ten = k8s_openapi::jiff::SignedDuration::from_secs(10);

    // renewTime 10 s in the past (holder clock behind), 5 s lease: by its renewTime it expired
    // 5 s ago, but this instance just saw it, so it is valid: no write.
    let mut observed = Observed::default();
    let behind = held_by_other(now - ten, 5, "7");
    let lease = behind.clone();
    let server = tokio::spawn(async move {
        answer(&mut handle, StatusCode::OK, lease).await;
        handle
    });
    assert!(
        !bounded(try_hold(&api, &settings, &mut observed))
            .await
            .unwrap(),
        "a lease seen for the first time is valid for its whole duration"
    );
    let mut handle = server.await.unwrap();
    no_more_requests(&mut handle).await;

    // renewTime 10 s in the future (holder clock ahead): by its renewTime it is valid for 15 s
    // more, but once this instance has seen it unchanged for 5 s it has expired: take over.
    let mut observed = Observed::default();
    let ahead = held_by_other(now + ten, 5, "8");
    let lease = ahead.clone();
    let server = tokio::spawn(async move {
        answer(&mut handle, StatusCode::OK, lease).await;
        handle
    });
    assert!(
        !bounded(try_hold(&api, &settings, &mut observed))
            .await
            .unwrap()
    );
    let mut handle = server.await.unwrap();
    tokio::time::advance(Duration::from_secs(5)).await;
    let lease = ahead.clone();
    let server = tokio::spawn(async move {
        let get = answer(&mut handle, StatusCode::OK, lease.clone()).await;
        let mut taken = lease;
        taken["spec"]["holderIdentity"] = json!("me");
        taken["metadata"]["resourceVersion"] = json!("9");
        let put = answer(&mut handle, StatusCode::OK, taken).await;
        (get, put, handle)
    });
    assert!(
        bounded(try_hold(&api, &settings, &mut observed))
            .await
            .unwrap(),
        "unchanged for a whole lease duration on our clock: expired"
    );
    let (get, put, _) = server.await.unwrap();
    assert_eq!(get.0, Method::GET);
    assert_eq!(put.0, Method::PUT);
    assert_eq!(put.2["spec"]["holderIdentity"], "me");
    assert_eq!(put.2["spec"]["leaseTransitions"], 1);
    assert_eq!(
        put.2["metadata"]["resourceVersion"], "8",
        "the takeover is conditional on the version read"
    );
}

/// Two instances racing: the one whose write loses (409) is not the leader.
#[tokio::test]
async fn a_conflicting_write_means_not_leader() {
    let settings = lease_settings();
    let (client, mut handle) = client();
    let api = kube::Api::namespaced(client, "ops");
    let conflict = |reason: &str| api_status(409, reason, "conflict");

    // Both saw no lease; the other created it first: AlreadyExists.
    let mut observed = Observed::default();
    let already = conflict("AlreadyExists");
    let server = tokio::spawn(async move {
        answer(
            &mut handle,
            StatusCode::NOT_FOUND,
            api_status(404, "NotFound", "not found"),
        )
        .await;
        let create = answer(&mut handle, StatusCode::CONFLICT, already).await;
        (create, handle)
    });
    assert!(
        !bounded(try_hold(&api, &settings, &mut observed))
            .await
            .unwrap()
    );
    let (create, mut handle) = server.await.unwrap();
    assert_eq!(create.0, Method::POST);

    // Both saw a released lease; the other's update landed first: Conflict.
    let mut observed = Observed::default();
    let released = json!({"metadata": {"name": "workersd", "namespace": "ops", "resourceVersion": "3"},
                          "spec": {"leaseDurationSeconds": 15}});
    let modified = conflict("Conflict");
    let server = tokio::spawn(async move {
        answer(&mut handle, StatusCode::OK, released).await;
        let put = answer(&mut handle, StatusCode::CONFLICT, modified).await;
        (put, handle)
    });
    assert!(
        !bounded(try_hold(&api, &settings, &mut observed))
            .await
            .unwrap()
    );
    let (put, mut handle) = server.await.unwrap();
    assert_eq!(put.0, Method::PUT);
    assert_eq!(put.2["metadata"]["resourceVersion"], "3");
    // Any other failure is an error the caller retries, never "someone else leads".
    let mut observed = Observed::default();
    let server = tokio::spawn(async move {
        answer(
            &mut handle,
            StatusCode::NOT_FOUND,
            api_status(404, "NotFound", "not found"),
        )
        .await;
        answer(
            &mut handle,
            StatusCode::INTERNAL_SERVER_ERROR,
            api_status(500, "InternalError", "etcd timeout"),
        )
        .await;
        handle
    });
    assert!(
        bounded(try_hold(&api, &settings, &mut observed))
            .await
            .is_err()
    );
    let mut handle = server.await.unwrap();
    no_more_requests(&mut handle).await;
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

/// An acquisition that took a whole renew period (a slow create) must still leave time for
/// the first renewal: renewals are timed from the last successful attempt's start.
#[tokio::test(start_paused = true)]
async fn a_slow_acquisition_leaves_time_for_the_first_renewal() {
    let settings = lease_settings(); // 15 s: renew every 5 s, renew deadline 10 s
    let (kube_client, mut handle) = client();
    let api = kube::Api::namespaced(kube_client, "ops");
    let acquired = tokio::time::Instant::now() - Duration::from_secs(5);
    let holder =
        tokio::spawn(async move { crate::runtime::leader::hold(&api, &settings, acquired).await });
    {
        let mut pending = pin!(&mut handle);
        let request = tokio::time::timeout(Duration::from_millis(100), pending.next_request())
            .await
            .expect("the first renewal is due at once, not a renew period from now");
        let (request, send) = request.expect("service called");
        assert_eq!(request.method(), Method::GET);
        let mine = json!({"metadata": {"name": "workersd", "namespace": "ops", "resourceVersion": "4"},
                          "spec": {"holderIdentity": "me", "leaseDurationSeconds": 15}});
        send.send_response(
            Response::builder()
                .status(StatusCode::OK)
                .body(Body::from(serde_json::to_vec(&mine).unwrap()))
                .unwrap(),
        );
    }
    let (method, ..) = answer(&mut handle, StatusCode::OK, json!({})).await;
    assert_eq!(method, Method::PUT);
    tokio::task::yield_now().await;
    assert!(
        !holder.is_finished(),
        "still leading after a renewal in time"
    );
    holder.abort();
}
