//! Lease acquisition and renewal against a mocked API server.

use super::{LeaseSettings, Observed, try_acquire_or_renew};
use crate::kube_mock::{answer, api_status, bounded, client, no_more_requests, no_request_for};
use http::{Method, Response, StatusCode};
use kube::client::Body;
use serde_json::{Value, json};
use std::pin::pin;
use std::time::Duration;

fn lease_settings() -> LeaseSettings {
    LeaseSettings {
        namespace: "ops".into(),
        name: "workersd".into(),
        identity: "me".into(),
        duration: Duration::from_secs(15),
        standby_poll: None,
    }
}

fn held_by_other(renew_time: k8s_openapi::jiff::Timestamp, duration: i64, rv: &str) -> Value {
    json!({"metadata": {"name": "workersd", "namespace": "ops", "resourceVersion": rv},
           "spec": {"holderIdentity": "other", "leaseDurationSeconds": duration,
                    "renewTime": renew_time.to_string()}})
}

/// A 15 s Lease held by `holder`, renewed now, at resourceVersion `rv`.
fn held_by(holder: &str, rv: &str) -> Value {
    let mut lease = held_by_other(k8s_openapi::jiff::Timestamp::now(), 15, rv);
    lease["spec"]["holderIdentity"] = json!(holder);
    lease
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
        bounded(try_acquire_or_renew(&api, &settings, &mut observed))
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
        !bounded(try_acquire_or_renew(&api, &settings, &mut observed))
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
        !bounded(try_acquire_or_renew(&api, &settings, &mut observed))
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
        !bounded(try_acquire_or_renew(&api, &settings, &mut observed))
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
        bounded(try_acquire_or_renew(&api, &settings, &mut observed))
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
        !bounded(try_acquire_or_renew(&api, &settings, &mut observed))
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
        !bounded(try_acquire_or_renew(&api, &settings, &mut observed))
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
        bounded(try_acquire_or_renew(&api, &settings, &mut observed))
            .await
            .is_err()
    );
    let mut handle = server.await.unwrap();
    no_more_requests(&mut handle).await;
}

/// An acquisition that took a whole renew period (a slow create) must still leave time for
/// the first renewal: renewals are timed from the last successful attempt's start.
#[tokio::test(start_paused = true)]
async fn a_slow_acquisition_leaves_time_for_the_first_renewal() {
    let settings = lease_settings(); // 15 s: renew every 5 s, renew deadline 10 s
    let (kube_client, mut handle) = client();
    let api = kube::Api::namespaced(kube_client, "ops");
    let acquired = tokio::time::Instant::now() - Duration::from_secs(5);
    let renewal = tokio::spawn(async move {
        crate::runtime::leader::renew_while_leading(&api, &settings, acquired).await
    });
    {
        let mut pending = pin!(&mut handle);
        let request = tokio::time::timeout(Duration::from_millis(100), pending.next_request())
            .await
            .expect("the first renewal is due at once, not a renew period from now");
        let (request, send) = request.expect("service called");
        assert_eq!(request.method(), Method::GET);
        let mine = held_by("me", "4");
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
        !renewal.is_finished(),
        "still leading after a renewal in time"
    );
    renewal.abort();
}

/// A standby says who leads once per holder, not once per attempt (one every retry period
/// for as long as another instance leads).
#[tokio::test(start_paused = true)]
async fn a_standby_logs_each_new_holder_once() {
    let captured = crate::fixtures::CapturedLogs::default();
    let writer = captured.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .finish();
    let _logging = tracing::subscriber::set_default(subscriber);
    let settings = lease_settings();
    let (kube_client, mut handle) = client();
    let api = kube::Api::namespaced(kube_client, "ops");
    let server = tokio::spawn(async move {
        // The holder renews (a new resourceVersion each time), so its lease stays valid.
        for (rv, holder) in ["other", "other", "other", "third"].iter().enumerate() {
            let lease = held_by(holder, &rv.to_string());
            let (method, ..) = answer(&mut handle, StatusCode::OK, lease).await;
            assert_eq!(method, Method::GET, "a standby never writes a valid lease");
        }
        handle // kept open: later attempts time out instead of failing at once
    });
    let standing_by =
        tokio::time::timeout(Duration::from_secs(30), super::acquire(&api, &settings)).await;
    assert!(standing_by.is_err(), "never leader while others lead");
    assert!(server.is_finished(), "four attempts were answered");
    let text = captured.text();
    let lines: Vec<&str> = text.lines().filter(|l| l.contains("standing by")).collect();
    assert_eq!(lines.len(), 2, "{text}");
    assert!(
        lines[0].contains("\"other\"") && lines[1].contains("\"third\""),
        "{text}"
    );
}

/// A leader renews every renew period, counted from its last successful attempt, and after a
/// failed attempt retries a quarter period later: never sooner (it would hammer the API
/// server), never later (the lease could run out before the renew deadline is noticed).
#[tokio::test(start_paused = true)]
async fn renewals_come_every_period_and_retries_a_quarter_period_after_a_failure() {
    let settings = lease_settings(); // 15 s: renew every 5 s, renew deadline 10 s
    let period = settings.renew_every();
    let (kube_client, mut handle) = client();
    let api = kube::Api::namespaced(kube_client, "ops");
    let acquired = tokio::time::Instant::now();
    let renewal = tokio::spawn(async move {
        crate::runtime::leader::renew_while_leading(&api, &settings, acquired).await
    });
    let tick = Duration::from_millis(1);
    let mine = held_by("me", "4");
    // The first renewal is a period after the acquisition, the next a period after that.
    for _ in 0..2 {
        no_request_for(&mut handle, period - tick).await;
        let (method, ..) = answer(&mut handle, StatusCode::OK, mine.clone()).await;
        assert_eq!(method, Method::GET);
        let (method, ..) = answer(&mut handle, StatusCode::OK, mine.clone()).await;
        assert_eq!(method, Method::PUT);
    }
    // A failed attempt is retried a quarter period later.
    no_request_for(&mut handle, period - tick).await;
    let failed = api_status(500, "InternalError", "etcd timeout");
    let (method, ..) = answer(&mut handle, StatusCode::INTERNAL_SERVER_ERROR, failed).await;
    assert_eq!(method, Method::GET);
    no_request_for(&mut handle, period / 4 - tick).await;
    let retried = tokio::time::Instant::now();
    let (method, ..) = answer(&mut handle, StatusCode::OK, mine.clone()).await;
    assert_eq!(method, Method::GET);
    assert!(
        retried.elapsed() <= 2 * tick,
        "retried {:?} late",
        retried.elapsed()
    );
    renewal.abort();
}
