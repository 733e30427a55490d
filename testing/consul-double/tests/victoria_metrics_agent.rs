//! Fidelity check of agent mode with a real Consul client: VictoriaMetrics' `consul_sd_configs`
//! sees services registered through the local agent under its node, with
//! `__meta_consul_health` following their TTL checks and serf's verdict on the node, and loses
//! a service the critical-service reaper removed. Requires `victoria-metrics` on PATH.

mod vm_support;

use std::collections::BTreeMap;
use std::time::Duration;

use consul_double::{AgentConfig, Config, ConsulDouble};
use serde_json::{Value, json};
use vm_support::*;

const NODE: &str = "host-1";

/// VictoriaMetrics keys a target by its final labels, so the health is copied into one: a
/// change of `__meta_consul_health` then replaces the target (as a `keep`-passing rule would
/// drop it).
const RELABEL: &str =
    "      - source_labels: [__meta_consul_health]\n        target_label: consul_health\n";

fn health_of(targets: &BTreeMap<String, Value>, address: &str) -> Option<String> {
    let target = targets.get(address)?;
    let health = target["discoveredLabels"]["__meta_consul_health"].as_str();
    assert_eq!(health, target["labels"]["consul_health"].as_str());
    health.map(String::from)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn victoria_metrics_follows_agent_registrations_ttls_and_node_failure() {
    let double = ConsulDouble::start(Config {
        node_name: NODE.into(),
        agent: Some(AgentConfig {
            // Test-only: a reaper floor below Consul's minute, so the test stays short.
            check_deregister_interval_min: Duration::from_millis(500),
            check_reap_interval: Duration::from_millis(100),
            ..AgentConfig::default()
        }),
        ..Config::default()
    })
    .await
    .expect("start double");
    let _ = rustls::crypto::ring::default_provider().install_default();
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .expect("client");
    let steady = start_scrape_target("steady").await;
    let dying = start_scrape_target("dying").await;
    for (id, addr, ttl) in [("steady", steady, "1h"), ("dying", dying, "1s")] {
        let body = json!({"ID": id, "Name": "gunicorn", "Port": addr.port(),
            "Meta": {"workersd-owner": "host-1"},
            "Check": {"TTL": ttl, "Status": "passing", "DeregisterCriticalServiceAfter": "1s"}});
        let response = http
            .put(format!("{}/v1/agent/service/register", double.api_url()))
            .json(&body)
            .send()
            .await
            .expect("register");
        assert_eq!(response.status(), reqwest::StatusCode::OK);
    }
    let (steady, dying) = (steady.to_string(), dying.to_string());

    let scratch = TempDir::new("consul-double-vm-agent");
    let (_vm, vm) = start_victoria_metrics(&scratch, double.api_addr(), RELABEL);
    let (ok, seen) = poll_targets(&http, &vm, NODE, |t| {
        health_of(t, &steady).as_deref() == Some("passing") && t.contains_key(&dying)
    })
    .await;
    assert!(ok, "agent registrations not discovered: {seen:#?}");

    // The host's node fails: serf's check makes every instance critical at once.
    double.agent_node_failed(true).expect("agent");
    let (ok, seen) = poll_targets(&http, &vm, NODE, |t| {
        health_of(t, &steady).as_deref() == Some("critical")
    })
    .await;
    let served: Value = http
        .get(format!("{}/v1/health/service/gunicorn", double.api_url()))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(
        ok,
        "a failed node's instances did not turn critical: {seen:#?}\nserved: {served:#}\nstats: {:#?}",
        double.stats()
    );
    double.agent_node_failed(false).expect("agent");

    // Nobody passes `dying`: its TTL expires, then the reaper removes it.
    let (ok, seen) = poll_targets(&http, &vm, NODE, |t| {
        health_of(t, &steady).as_deref() == Some("passing") && !t.contains_key(&dying)
    })
    .await;
    assert!(
        ok,
        "the reaped service stayed, or the node stayed critical: {seen:#?}"
    );
    assert!(double.stats().unmatched.is_empty());
    double.shutdown().await;
}
