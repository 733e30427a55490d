//! Helpers shared by the agent tests.
#![allow(dead_code)]

use std::future::Future;
use std::time::{Duration, Instant};

use consul_double::{AclConfig, AgentConfig, Config, ConsulDouble};
use reqwest::{Client, StatusCode};
use serde_json::{Value, json};

pub fn client() -> Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .expect("client")
}

pub fn agent_config() -> AgentConfig {
    AgentConfig {
        check_update_interval: Duration::ZERO,
        ..AgentConfig::default()
    }
}

pub async fn start(agent: AgentConfig) -> ConsulDouble {
    start_with(agent, None).await
}

pub async fn start_with(agent: AgentConfig, acl: Option<AclConfig>) -> ConsulDouble {
    ConsulDouble::start(Config {
        node_name: "node-1".into(),
        agent: Some(agent),
        acl,
        ..Config::default()
    })
    .await
    .expect("double starts")
}

pub async fn call(
    http: &Client,
    method: reqwest::Method,
    url: String,
    body: Option<Value>,
    token: Option<&str>,
) -> (StatusCode, String) {
    let mut request = http.request(method, url);
    if let Some(body) = body {
        request = request.json(&body);
    }
    if let Some(token) = token {
        request = request.header("X-Consul-Token", token);
    }
    let response = request.send().await.expect("request");
    (response.status(), response.text().await.expect("body"))
}

pub async fn put(double: &ConsulDouble, path: &str, body: Option<Value>) -> (StatusCode, String) {
    call(
        &client(),
        reqwest::Method::PUT,
        format!("{}{path}", double.api_url()),
        body,
        None,
    )
    .await
}

pub async fn get(double: &ConsulDouble, path: &str) -> Value {
    let (status, text) = call(
        &client(),
        reqwest::Method::GET,
        format!("{}{path}", double.api_url()),
        None,
        None,
    )
    .await;
    assert_eq!(status, StatusCode::OK, "GET {path}: {text}");
    serde_json::from_str(&text).expect("JSON body")
}

/// `(service ID, [(check ID, status, output)])` of every instance of `name`.
pub async fn health(
    double: &ConsulDouble,
    name: &str,
) -> Vec<(String, Vec<(String, String, String)>)> {
    let body = get(double, &format!("/v1/health/service/{name}")).await;
    body.as_array()
        .expect("array")
        .iter()
        .map(|entry| {
            let checks = entry["Checks"]
                .as_array()
                .unwrap()
                .iter()
                .map(|c| {
                    let field = |k: &str| c[k].as_str().unwrap().to_string();
                    (field("CheckID"), field("Status"), field("Output"))
                })
                .collect();
            (entry["Service"]["ID"].as_str().unwrap().to_string(), checks)
        })
        .collect()
}

pub async fn eventually<F, Fut>(what: &str, limit: Duration, mut probe: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let started = Instant::now();
    while !probe().await {
        assert!(started.elapsed() < limit, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub fn ttl_service(id: &str, name: &str, ttl: &str) -> Value {
    json!({"ID": id, "Name": name, "Port": 8080, "Meta": {"owner": "workersd"},
           "Check": {"TTL": ttl}})
}

pub fn check_status(entry: &[(String, String, String)], id: &str) -> String {
    entry
        .iter()
        .find(|(check, _, _)| check == id)
        .map(|(_, status, _)| status.clone())
        .unwrap_or_else(|| panic!("no check {id} in {entry:?}"))
}
