//! Agent registration against the Consul double's local agent (in process): each live
//! worker a service of the agent with a TTL check workersd passes; ownership and restart
//! safety as in catalog registration; an agent that lost its services gets them again.

mod common;

use common::desired_of;
use consul_double::{AgentConfig, Config, ConsulDouble};
use serde_json::{Value, json};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;
use workersd::metrics::Metrics;
use workersd::pipeline::DesiredState;
use workersd::secret::TokenSource;
use workersd::sinks::consul::agent::AgentSink;
use workersd::sinks::consul::agent::registration::CheckSettings;
use workersd::sinks::consul::{ConsulClient, ConsulSettings};

const OWNER: &str = "workersd-host-1";

async fn start() -> ConsulDouble {
    ConsulDouble::start(Config {
        node_name: "host-1".into(),
        agent: Some(AgentConfig {
            check_update_interval: Duration::ZERO,
            ..AgentConfig::default()
        }),
        ..Config::default()
    })
    .await
    .unwrap()
}

fn sink(double: &ConsulDouble, ttl: Duration) -> AgentSink {
    let settings = ConsulSettings {
        address: double.api_url(),
        token: TokenSource::None,
        datacenter: None,
        node: OWNER.into(),
        node_address: "127.0.0.1".into(),
        node_meta: Default::default(),
        owner: OWNER.into(),
        resync_interval: Duration::from_secs(60),
        request_timeout: Duration::from_secs(2),
        tls: Default::default(),
    };
    let check = CheckSettings {
        ttl,
        deregister_after: Duration::from_secs(60),
    };
    AgentSink::new(
        ConsulClient::new(settings).unwrap(),
        check,
        Arc::new(Metrics::new()),
    )
}

fn desired(pods: usize, live: u16, complete: bool) -> DesiredState {
    desired_of("clever", OWNER, pods, live, complete, BTreeMap::new())
}

async fn request(
    double: &ConsulDouble,
    method: reqwest::Method,
    path: &str,
    body: Option<Value>,
) -> Value {
    workersd::tls::install_crypto_provider();
    let mut request = reqwest::Client::new().request(method, format!("{}{path}", double.api_url()));
    if let Some(body) = body {
        request = request.json(&body);
    }
    let response = request.send().await.unwrap();
    assert!(
        response.status().is_success(),
        "{path}: {}",
        response.status()
    );
    response.json().await.unwrap_or(Value::Null)
}

/// Service ID → the status of its `service:<id>` check, as health/service reports it.
async fn health(double: &ConsulDouble) -> BTreeMap<String, String> {
    let entries = request(
        double,
        reqwest::Method::GET,
        "/v1/health/service/clever",
        None,
    )
    .await;
    entries
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            let id = e["Service"]["ID"].as_str().unwrap().to_string();
            let check = format!("service:{id}");
            let status = e["Checks"]
                .as_array()
                .unwrap()
                .iter()
                .find(|c| c["CheckID"] == check.as_str())
                .map_or("none", |c| c["Status"].as_str().unwrap())
                .to_string();
            (id, status)
        })
        .collect()
}

async fn agent_ids(double: &ConsulDouble) -> BTreeSet<String> {
    let services = request(double, reqwest::Method::GET, "/v1/agent/services", None).await;
    services.as_object().unwrap().keys().cloned().collect()
}

#[tokio::test]
async fn live_workers_are_agent_services_with_passing_checks_and_others_are_untouched() {
    let double = start().await;
    // Someone else's service, and one holding an ID workersd wants.
    let wanted = desired(1, 1, true);
    let taken = wanted.catalog.keys().next().unwrap().to_string();
    for (id, service) in [("nomad-api", "api"), (taken.as_str(), "clever")] {
        let body = json!({"ID": id, "Name": service, "Port": 1234});
        request(
            &double,
            reqwest::Method::PUT,
            "/v1/agent/service/register",
            Some(body),
        )
        .await;
    }
    let mut sink = sink(&double, Duration::from_secs(30));
    let outcome = sink.sync(&desired(2, 2, true)).await.unwrap();
    assert_eq!((outcome.registered, outcome.conflicts), (3, 1));
    let ids = agent_ids(&double).await;
    assert_eq!(ids.len(), 2 + 3, "{ids:?}");
    let statuses = health(&double).await;
    let ours: Vec<_> = statuses.iter().filter(|(id, _)| **id != taken).collect();
    assert_eq!(ours.len(), 3);
    assert!(
        ours.iter().all(|(_, s)| s.as_str() == "passing"),
        "{statuses:?}"
    );
    // The foreign service under our ID kept its content (port 1234, no check of ours).
    let agent = request(
        &double,
        reqwest::Method::GET,
        &format!("/v1/agent/service/{taken}"),
        None,
    )
    .await;
    assert_eq!(agent["Port"], 1234);

    // Scale-down: the gone worker's service goes; a repeat writes nothing.
    let outcome = sink.sync(&desired(1, 2, true)).await.unwrap();
    assert_eq!((outcome.registered, outcome.deregistered), (0, 2));
    assert!(agent_ids(&double).await.contains("nomad-api"));
    let again = sink.sync(&desired(1, 2, true)).await.unwrap();
    assert_eq!(
        (again.registered, again.deregistered, again.requests),
        (0, 0, 0)
    );
}

#[tokio::test]
async fn checks_stay_passing_while_passed_and_expire_when_workersd_stops() {
    let double = start().await;
    let ttl = Duration::from_millis(900);
    let mut sink = sink(&double, ttl);
    let state = desired(1, 2, true);
    sink.sync(&state).await.unwrap();
    // Passed every third of the TTL: still passing after several TTLs.
    for _ in 0..12 {
        tokio::time::sleep(ttl / 4).await;
        sink.sync(&state).await.unwrap();
    }
    let statuses = health(&double).await;
    assert!(statuses.values().all(|s| s == "passing"), "{statuses:?}");
    // Nobody passes them any more: critical after the TTL.
    tokio::time::sleep(ttl * 2).await;
    let statuses = health(&double).await;
    assert_eq!(statuses.len(), 2);
    assert!(statuses.values().all(|s| s == "critical"), "{statuses:?}");
}

#[tokio::test]
async fn a_restart_adopts_and_deregisters_nothing_until_probed_and_a_dev_agent_is_refilled() {
    let double = start().await;
    sink(&double, Duration::from_secs(30))
        .sync(&desired(2, 2, true))
        .await
        .unwrap();
    // A new workersd whose first probe found only part so far: nothing is removed.
    let mut restarted = sink(&double, Duration::from_secs(30));
    let outcome = restarted.sync(&desired(1, 1, false)).await.unwrap();
    assert_eq!((outcome.registered, outcome.deregistered), (0, 0));
    assert_eq!(outcome.deferred, 3);
    assert_eq!(agent_ids(&double).await.len(), 4);

    // The agent restarted in -dev mode lost everything: the next read registers it again.
    double.agent_restart(true).unwrap();
    assert!(agent_ids(&double).await.is_empty());
    restarted.invalidate();
    let outcome = restarted.sync(&desired(2, 2, true)).await.unwrap();
    assert_eq!(outcome.registered, 4);
    let statuses = health(&double).await;
    assert_eq!(statuses.len(), 4);
    assert!(statuses.values().all(|s| s == "passing"), "{statuses:?}");
}
