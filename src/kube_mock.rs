//! A mocked Kubernetes API server for the API tests of the modules that write to it (leader,
//! status, Events): kube-rs's client over a tower-test service, answered by the test.
//! Every wait is bounded, so an unexpected request fails a test instead of hanging it.

use http::{Method, Request, Response, StatusCode};
use kube::Client;
use kube::client::Body;
use serde_json::{Value, json};
use std::pin::pin;
use std::time::Duration;
use tower_test::mock;

pub type Handle = mock::Handle<Request<Body>, Response<Body>>;

pub fn client() -> (Client, Handle) {
    let (service, handle) = mock::pair::<Request<Body>, Response<Body>>();
    (Client::new(service, "default"), handle)
}

/// Answers the next request with `status` and `body`, returning what was asked.
pub async fn answer(
    handle: &mut Handle,
    status: StatusCode,
    body: Value,
) -> (Method, String, Value) {
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

/// Asserts that nothing is sent for `quiet` (in paused time).
pub async fn no_request_for(handle: &mut Handle, quiet: Duration) {
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
pub async fn bounded<T>(call: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(5), call)
        .await
        .expect("the call finishes within 5 s (an unexpected request would hang it)")
}

/// Asserts that nothing else was sent.
pub async fn no_more_requests(handle: &mut Handle) {
    let mut pending = pin!(handle);
    assert!(
        tokio::time::timeout(Duration::from_millis(200), pending.next_request())
            .await
            .is_err(),
        "no further request"
    );
}

/// The body of an API error, as the apiserver sends it.
pub fn api_status(code: u16, reason: &str, message: &str) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": reason,
           "code": code, "message": message})
}
