//! Warning Events against a mocked API server: one per distinct problem, renewed before the
//! Event TTL, re-created when gone, retried with backoff when rejected.

use super::{self as events, Problems};
use crate::declaration::{DeclarationError, ErrorKind, FieldPath};
use crate::kube_mock::{answer, api_status, client, no_request_for};
use crate::sources::kubernetes::problems;
use http::{Method, StatusCode};
use serde_json::json;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

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
        true,
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

    // A different problem: a new Event naming it; rejected, it is retried after 1-2 s, 2-4 s, ...
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
    // Each retry comes after its delay plus up to as much again of jitter.
    for backoff in [1, 2, 4] {
        let failed = tokio::time::Instant::now();
        tx.send_replace(invalid_pod("metadata.annotations[workersd.io/service]"));
        no_request_for(&mut handle, Duration::from_millis(backoff * 1000 - 10)).await;
        let (method, ..) = answer(
            &mut handle,
            StatusCode::INTERNAL_SERVER_ERROR,
            rejected.clone(),
        )
        .await;
        assert_eq!(method, Method::POST);
        let waited = failed.elapsed();
        assert!(
            waited <= Duration::from_secs(2 * backoff),
            "retry {backoff}: after {waited:?}"
        );
    }
    // Fixed: no more Events.
    tx.send_replace(Arc::new(Problems::new()));
    no_request_for(&mut handle, Duration::from_secs(3600)).await;
    publisher.abort();
}
