//! The local agent's HTTP endpoints: registration, reads, check updates, their refusals
//! and ACL rules, against `agent/agent_endpoint.go` and `agent/acl.go`.

mod agent_support;

use agent_support::*;
use consul_double::{Access, AclConfig, Resource, Rules, Token};
use reqwest::StatusCode;
use serde_json::{Value, json};

#[tokio::test]
async fn registration_is_synced_to_the_catalog_under_the_agent_node() {
    let double = start(agent_config()).await;
    let (status, body) = put(
        &double,
        "/v1/agent/service/register",
        Some(
            json!({"ID": "web-1", "Name": "web", "Port": 8080, "Address": "127.0.0.9",
                    "Meta": {"owner": "workersd"},
                    "Check": {"TTL": "30s", "DeregisterCriticalServiceAfter": "1m"}}),
        ),
    )
    .await;
    assert_eq!((status, body.as_str()), (StatusCode::OK, ""));

    let services = get(&double, "/v1/agent/services").await;
    assert_eq!(
        services,
        json!({"web-1": {"ID": "web-1", "Service": "web", "Tags": [], "Port": 8080,
            "Address": "127.0.0.9", "Meta": {"owner": "workersd"},
            "TaggedAddresses": {"lan_ipv4": {"Address": "127.0.0.9", "Port": 8080},
                                "wan_ipv4": {"Address": "127.0.0.9", "Port": 8080}},
            "Weights": {"Passing": 1, "Warning": 1}, "EnableTagOverride": false,
            "Datacenter": "dc1"}})
    );
    let one = get(&double, "/v1/agent/service/web-1").await;
    assert!(one["ContentHash"].as_str().is_some_and(|h| !h.is_empty()));
    let checks = get(&double, "/v1/agent/checks").await;
    assert_eq!(checks["service:web-1"]["Type"], "ttl");
    assert_eq!(checks["service:web-1"]["Name"], "Service 'web' check");
    assert_eq!(checks["service:web-1"]["Status"], "critical");

    // Critical until passed (no Status in the definition), next to serf's node check.
    let instances = health(&double, "web").await;
    assert_eq!(instances.len(), 1);
    assert_eq!(check_status(&instances[0].1, "serfHealth"), "passing");
    assert_eq!(check_status(&instances[0].1, "service:web-1"), "critical");
    let catalog = get(&double, "/v1/catalog/service/web").await;
    assert_eq!(catalog[0]["Node"], "node-1");
    assert_eq!(catalog[0]["ServiceMeta"]["owner"], "workersd");

    let (status, _) = put(
        &double,
        "/v1/agent/check/pass/service:web-1?note=probed",
        None,
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let instances = health(&double, "web").await;
    assert_eq!(check_status(&instances[0].1, "service:web-1"), "passing");
    let (status, _) = put(
        &double,
        "/v1/agent/check/update/service:web-1",
        Some(json!({"Status": "warning", "Output": "slow"})),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let instances = health(&double, "web").await;
    assert!(instances[0].1.contains(&(
        "service:web-1".to_string(),
        "warning".to_string(),
        "slow".to_string()
    )));

    let (status, _) = put(&double, "/v1/agent/service/deregister/web-1", None).await;
    assert_eq!(status, StatusCode::OK);
    assert!(health(&double, "web").await.is_empty());
    assert_eq!(get(&double, "/v1/agent/services").await, json!({}));
    double.shutdown().await;
}

#[tokio::test]
async fn refusals_match_upstream() {
    let double = start(agent_config()).await;
    let cases = [
        (json!({"ID": "x"}), "Missing service name"),
        (
            json!({"Name": "web", "Check": {"Notes": "no ttl"}}),
            "Invalid check: TTL must be > 0 for TTL checks",
        ),
        (
            json!({"Name": "web", "Check": {"TTL": "5s", "Status": "fine"}}),
            "Status for checks must 'passing', 'warning', 'critical'",
        ),
    ];
    for (body, expected) in cases {
        let (status, text) = put(&double, "/v1/agent/service/register", Some(body)).await;
        assert_eq!((status, text.as_str()), (StatusCode::BAD_REQUEST, expected));
    }
    put(
        &double,
        "/v1/agent/service/register",
        Some(ttl_service("w1", "web", "10s")),
    )
    .await;
    let (status, text) = put(
        &double,
        "/v1/agent/check/update/service:w1",
        Some(json!({"Status": "ok"})),
    )
    .await;
    assert_eq!(
        (status, text.as_str()),
        (StatusCode::BAD_REQUEST, "Invalid check status: 'ok'")
    );
    let (status, text) = put(&double, "/v1/agent/check/pass/web", None).await;
    assert_eq!(
        (status, text.as_str()),
        (
            StatusCode::NOT_FOUND,
            "Unknown check ID \"web\". Ensure that the check ID is passed, not the check name."
        )
    );
    let (status, text) = put(&double, "/v1/agent/service/deregister/web", None).await;
    assert_eq!(
        (status, text.as_str()),
        (
            StatusCode::NOT_FOUND,
            "Unknown service ID \"web\". Ensure that the service ID is passed, not the service name."
        )
    );
    let (status, text) = call(
        &client(),
        reqwest::Method::GET,
        format!("{}/v1/agent/service/nope", double.api_url()),
        None,
        None,
    )
    .await;
    assert_eq!(
        (status, text.as_str()),
        (StatusCode::NOT_FOUND, "unknown service ID: nope")
    );
    let (status, _) = call(
        &client(),
        reqwest::Method::GET,
        format!("{}/v1/agent/check/pass/service:w1", double.api_url()),
        None,
        None,
    )
    .await;
    assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
    double.shutdown().await;
}

#[tokio::test]
async fn agent_writes_need_service_write_and_reads_are_filtered() {
    let acl = AclConfig {
        tokens: vec![
            Token::management("root"),
            Token::with_rules(
                "web-writer",
                Rules::default().with(Resource::Service, "web", true, Access::Write),
            ),
            Token::with_rules("reader", Rules::everything(Access::Read)),
        ],
        ..AclConfig::single_management_token("root")
    };
    let double = start_with(agent_config(), Some(acl)).await;
    let http = client();
    let url = |path: &str| format!("{}{path}", double.api_url());
    let register = |body: Value, token: &'static str| {
        call(
            &http,
            reqwest::Method::PUT,
            url("/v1/agent/service/register"),
            Some(body),
            Some(token),
        )
    };
    let (status, text) = register(ttl_service("w1", "web", "30s"), "reader").await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert!(
        text.starts_with("Permission denied: token with AccessorID '")
            && text.ends_with("' lacks permission 'service:write' on \"web\""),
        "{text}"
    );
    assert_eq!(
        register(ttl_service("w1", "web", "30s"), "web-writer")
            .await
            .0,
        StatusCode::OK
    );
    assert_eq!(
        register(ttl_service("d1", "db", "30s"), "web-writer")
            .await
            .0,
        StatusCode::FORBIDDEN
    );
    assert_eq!(
        register(ttl_service("d1", "db", "30s"), "root").await.0,
        StatusCode::OK
    );
    // Taking over another service's ID needs write on the service it replaces.
    assert_eq!(
        register(ttl_service("d1", "web", "30s"), "web-writer")
            .await
            .0,
        StatusCode::FORBIDDEN
    );

    let pass = |id: &str, token: &'static str| {
        call(
            &http,
            reqwest::Method::PUT,
            url(&format!("/v1/agent/check/pass/{id}")),
            None,
            Some(token),
        )
    };
    assert_eq!(pass("service:w1", "reader").await.0, StatusCode::FORBIDDEN);
    assert_eq!(pass("service:w1", "web-writer").await.0, StatusCode::OK);
    assert_eq!(
        pass("service:d1", "web-writer").await.0,
        StatusCode::FORBIDDEN
    );
    assert_eq!(pass("service:zz", "reader").await.0, StatusCode::NOT_FOUND);
    let deregister = call(
        &http,
        reqwest::Method::PUT,
        url("/v1/agent/service/deregister/d1"),
        None,
        Some("web-writer"),
    );
    assert_eq!(deregister.await.0, StatusCode::FORBIDDEN);
    assert!(double.stats().acl_permission_denied >= 6);

    let response = http
        .get(url("/v1/agent/services"))
        .header("X-Consul-Token", "web-writer")
        .send()
        .await
        .unwrap();
    assert_eq!(
        response.headers()["X-Consul-Results-Filtered-By-ACLs"],
        "true"
    );
    let body: Value = response.json().await.unwrap();
    assert_eq!(body.as_object().unwrap().keys().collect::<Vec<_>>(), ["w1"]);
    // Anonymous (no rules, default deny): everything filtered, no header.
    let response = http.get(url("/v1/agent/checks")).send().await.unwrap();
    assert!(
        !response
            .headers()
            .contains_key("X-Consul-Results-Filtered-By-ACLs")
    );
    assert_eq!(response.json::<Value>().await.unwrap(), json!({}));
    let (status, _) = call(
        &http,
        reqwest::Method::GET,
        url("/v1/agent/service/d1"),
        None,
        Some("web-writer"),
    )
    .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (status, text) = call(
        &http,
        reqwest::Method::GET,
        url("/v1/agent/services"),
        None,
        Some("nope"),
    )
    .await;
    assert_eq!(
        (status, text.as_str()),
        (StatusCode::FORBIDDEN, "ACL not found")
    );
    double.shutdown().await;
}

#[tokio::test]
async fn reregistration_keeps_check_state_and_can_replace_checks() {
    let double = start(agent_config()).await;
    let two_checks = json!({"ID": "w1", "Name": "web", "Checks": [
        {"CheckID": "a", "TTL": "30s"}, {"CheckID": "b", "TTL": "30s"}]});
    put(&double, "/v1/agent/service/register", Some(two_checks)).await;
    put(&double, "/v1/agent/check/pass/a", None).await;
    let only_a = json!({"ID": "w1", "Name": "web", "Checks": [{"CheckID": "a", "TTL": "30s"}]});
    put(&double, "/v1/agent/service/register", Some(only_a.clone())).await;
    let checks = &health(&double, "web").await[0].1;
    assert_eq!(
        check_status(checks, "a"),
        "passing",
        "the snapshot keeps the status"
    );
    assert_eq!(
        check_status(checks, "b"),
        "critical",
        "kept without replace-existing-checks"
    );

    put(
        &double,
        "/v1/agent/service/register?replace-existing-checks",
        Some(only_a),
    )
    .await;
    let checks = &health(&double, "web").await[0].1;
    assert_eq!(checks.len(), 2, "serfHealth and a: {checks:?}");
    assert_eq!(check_status(checks, "a"), "passing");
    double.shutdown().await;
}

/// The CLI wires `--agent` and its settings, and the control API drives the agent.
#[tokio::test]
async fn the_binary_runs_an_agent_with_the_configured_minimum() {
    use std::io::{BufRead, BufReader};
    use std::process::{Command, Stdio};

    let mut child = Command::new(env!("CARGO_BIN_EXE_consul-double"))
        .args(["--listen", "127.0.0.1:0", "--control-listen", "127.0.0.1:0"])
        .args([
            "--agent",
            "--node-name",
            "host-7",
            "--agent-address",
            "10.1.2.3",
        ])
        .args(["--agent-check-deregister-interval-min", "5s"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn consul-double");
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let url_after = |key: &str| {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(key))
            .unwrap()
            .to_string()
    };
    let (api, control) = (url_after("api="), url_after("control="));
    let http = client();
    let body = json!({"ID": "w1", "Name": "web", "Check": {"TTL": "30s",
                      "DeregisterCriticalServiceAfter": "1s"}});
    let response = http
        .put(format!("{api}/v1/agent/service/register"))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let catalog: Value = http
        .get(format!("{api}/v1/catalog/service/web"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(catalog[0]["Node"], "host-7");
    assert_eq!(catalog[0]["Address"], "10.1.2.3");
    let state: Value = http
        .post(format!("{control}/control/agent/fail"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(state["failed"], true);
    assert_eq!(
        state["checks"][0]["DeregisterCriticalServiceAfterSeconds"],
        5.0
    );
    let restarted = http
        .post(format!("{control}/control/agent/restart?dev=true"))
        .send()
        .await
        .unwrap();
    assert_eq!(restarted.status(), StatusCode::OK);
    let _ = child.kill();
    let _ = child.wait();
}
