//! The sink's own behaviour: settings, retries and its log span.

use super::*;
use crate::pipeline::DesiredState;

#[test]
fn normalizes_addresses_like_consul_http_addr() {
    assert_eq!(
        normalize_address("127.0.0.1:8500").unwrap(),
        "http://127.0.0.1:8500"
    );
    assert_eq!(
        normalize_address("http://consul:8500/").unwrap(),
        "http://consul:8500"
    );
    assert!(matches!(normalize_address(" "), Err(AddressError::Empty)));
    let ftp = normalize_address("ftp://x").unwrap_err();
    assert_eq!(
        ftp.to_string(),
        r#"Consul address "ftp://x" must use http:// or https://"#
    );
    // The URL parser's reason is kept as the source.
    let bad = normalize_address("consul:99999").unwrap_err();
    assert!(matches!(bad, AddressError::Invalid { .. }), "{bad}");
    assert!(std::error::Error::source(&bad).is_some());
    assert_eq!(
        normalize_address("https://consul:8501").unwrap(),
        "https://consul:8501"
    );
    assert!(normalize_address("http://").is_err());
}

#[test]
fn retries_are_jittered_and_capped() {
    let (min, max) = (Duration::from_millis(100), Duration::from_millis(350));
    let sequence = || jittered(min, max).build().take(12).collect::<Vec<_>>();
    let (one, two) = (sequence(), sequence());
    assert_eq!(one.len(), 12, "never runs out");
    // Two sidecars starting from the same state do not retry in lockstep.
    assert_ne!(one, two);
    for (i, delay) in one.iter().chain(&two).enumerate() {
        let step = (min * 2u32.pow((i % 12) as u32)).min(max);
        // The exponential step, plus up to as much again.
        assert!(*delay >= step && *delay < step * 2, "{i}: {delay:?}");
        assert!(*delay < max * 2);
    }
    let first = jittered(RETRY_MIN, RETRY_MAX).build().next().unwrap();
    assert!((RETRY_MIN..RETRY_MIN * 2).contains(&first), "{first:?}");
}

/// Tests that create sinks take turns: tracing caches whether a span is wanted per callsite,
/// so a sink made on another test thread without a subscriber races the one that logs.
static SINKS: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

#[tokio::test]
async fn sink_events_carry_the_node_once_in_their_span() {
    let _turn = SINKS.lock().await;
    let lines = crate::fixtures::CapturedLogs::default();
    let writer = lines.clone();
    // As `--log-format json` logs.
    let subscriber = tracing_subscriber::fmt()
        .json()
        .flatten_event(true)
        .with_writer(move || writer.clone())
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);
    let client = ConsulClient::new(ConsulSettings {
        // Nothing listens there: every pass fails and is logged.
        address: "http://127.0.0.1:1".into(),
        token: TokenSource::None,
        datacenter: None,
        node: "sink-node".into(),
        node_address: "127.0.0.1".into(),
        node_meta: Default::default(),
        owner: "o".into(),
        resync_interval: Duration::from_secs(60),
        request_timeout: Duration::from_secs(2),
        tls: Default::default(),
    })
    .unwrap();
    let sink = ConsulSink::new(client, Arc::new(Metrics::new()));
    let (_tx, desired) = tokio::sync::watch::channel(Arc::new(DesiredState {
        catalog: Default::default(),
        complete: true,
    }));
    sink.run_until(desired, tokio::time::sleep(Duration::from_millis(300)))
        .await;
    let text = lines.text();
    let failures: Vec<serde_json::Value> = text
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .filter(|event: &serde_json::Value| {
            event["message"] == "consul sync failed; will re-read and retry"
        })
        .collect();
    assert!(!failures.is_empty(), "{text}");
    for event in failures {
        assert_eq!(event["span"]["name"], "consul_sink", "{event}");
        assert_eq!(event["span"]["node"], "sink-node", "{event}");
        assert!(
            event.get("node").is_none(),
            "not repeated on the event: {event}"
        );
        assert!(event["target"].is_string(), "tracing's own target: {event}");
    }
}

#[tokio::test]
async fn an_unreachable_consul_keeps_the_cause_as_the_source() {
    let _turn = SINKS.lock().await;
    let client = ConsulClient::new(ConsulSettings {
        address: "http://127.0.0.1:1".into(),
        token: TokenSource::None,
        datacenter: None,
        node: "n".into(),
        node_address: "127.0.0.1".into(),
        node_meta: Default::default(),
        owner: "o".into(),
        resync_interval: Duration::from_secs(60),
        request_timeout: Duration::from_secs(2),
        tls: Default::default(),
    })
    .unwrap();
    let mut sink = ConsulSink::new(client, Arc::new(Metrics::new()));
    let empty = DesiredState {
        catalog: Default::default(),
        complete: true,
    };
    let err = sink.sync(&empty).await.unwrap_err();
    assert!(matches!(err, ConsulError::Unreachable(_)), "{err}");
    assert!(err.to_string().starts_with("Consul unreachable: "), "{err}");
    assert!(std::error::Error::source(&err).is_some());
}
