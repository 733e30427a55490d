//! The local agent over time: TTL expiry, the critical-service reaper, anti-entropy,
//! restarts and node failure, against `agent/agent.go`, `agent/local/state.go` and
//! `agent/checks/check.go`.

mod agent_support;

use std::time::{Duration, Instant};

use agent_support::*;
use consul_double::AgentConfig;
use reqwest::StatusCode;
use serde_json::json;

#[tokio::test]
async fn a_ttl_check_not_passed_in_time_goes_critical_with_upstreams_output() {
    let double = start(agent_config()).await;
    let mut body = ttl_service("w1", "web", "1s");
    body["Check"]["Status"] = json!("passing");
    assert_eq!(
        put(&double, "/v1/agent/service/register", Some(body))
            .await
            .0,
        StatusCode::OK
    );
    assert_eq!(
        check_status(&health(&double, "web").await[0].1, "service:w1"),
        "passing"
    );

    // Passing more often than the TTL keeps it passing.
    for _ in 0..6 {
        tokio::time::sleep(Duration::from_millis(150)).await;
        let update = json!({"Status": "passing", "Output": "200 OK"});
        put(&double, "/v1/agent/check/update/service:w1", Some(update)).await;
        assert_eq!(
            check_status(&health(&double, "web").await[0].1, "service:w1"),
            "passing"
        );
    }
    eventually("TTL expiry", Duration::from_secs(5), || async {
        health(&double, "web").await[0].1.contains(&(
            "service:w1".to_string(),
            "critical".to_string(),
            "TTL expired (last output before timeout follows): 200 OK".to_string(),
        ))
    })
    .await;
    put(&double, "/v1/agent/check/pass/service:w1", None).await;
    assert_eq!(
        check_status(&health(&double, "web").await[0].1, "service:w1"),
        "passing"
    );
    double.shutdown().await;
}

#[tokio::test]
async fn the_reaper_removes_a_service_critical_longer_than_its_raised_timeout() {
    // Upstream's floor is one minute; the test lowers it (the documented test-only override).
    let double = start(AgentConfig {
        check_deregister_interval_min: Duration::from_millis(1500),
        check_reap_interval: Duration::from_millis(50),
        ..agent_config()
    })
    .await;
    let mut body = ttl_service("w1", "web", "200ms");
    body["Check"]["DeregisterCriticalServiceAfter"] = json!("10ms");
    put(&double, "/v1/agent/service/register", Some(body)).await;
    let raised =
        &double.agent_state().unwrap()["checks"][0]["DeregisterCriticalServiceAfterSeconds"];
    assert_eq!(raised.as_f64(), Some(1.5), "raised to the minimum");
    let registered = Instant::now();
    // Registered critical, but the clock starts only when the TTL expires (200ms); the
    // service goes after 200ms + 1.5s, not after 10ms nor 1.5s.
    tokio::time::sleep(Duration::from_millis(650)).await;
    assert_eq!(health(&double, "web").await.len(), 1, "reaped too early");
    eventually("the reaper", Duration::from_secs(5), || async {
        health(&double, "web").await.is_empty()
    })
    .await;
    assert!(registered.elapsed() >= Duration::from_millis(1700));
    assert_eq!(get(&double, "/v1/agent/services").await, json!({}));
    // A reaped service is gone from the data directory too.
    double.agent_restart(false).unwrap();
    assert_eq!(get(&double, "/v1/agent/services").await, json!({}));
    double.shutdown().await;

    let default_floor = start(agent_config()).await;
    let mut body = ttl_service("w1", "web", "10s");
    body["Check"]["DeregisterCriticalServiceAfter"] = json!("1s");
    put(&default_floor, "/v1/agent/service/register", Some(body)).await;
    let raised =
        &default_floor.agent_state().unwrap()["checks"][0]["DeregisterCriticalServiceAfterSeconds"];
    assert_eq!(raised.as_f64(), Some(60.0));
    default_floor.shutdown().await;
}

#[tokio::test]
async fn full_sync_deletes_what_the_agent_does_not_know_and_repairs_the_rest() {
    let double = start(agent_config()).await;
    put(
        &double,
        "/v1/agent/service/register",
        Some(ttl_service("w1", "web", "10s")),
    )
    .await;
    // Written around the agent, straight into the catalog on its node.
    let stray = json!({"Node": "node-1", "Address": "127.0.0.1", "SkipNodeUpdate": true,
                       "Service": {"ID": "stray", "Service": "web", "Port": 1}});
    assert_eq!(
        put(&double, "/v1/catalog/register", Some(stray)).await.0,
        StatusCode::OK
    );
    let tampered = json!({"Node": "node-1", "Address": "127.0.0.1", "SkipNodeUpdate": true,
                          "Service": {"ID": "w1", "Service": "web", "Port": 9999}});
    put(&double, "/v1/catalog/register", Some(tampered)).await;
    // A change sync pushes only what changed locally.
    put(
        &double,
        "/v1/agent/service/register",
        Some(ttl_service("w2", "web", "10s")),
    )
    .await;
    assert_eq!(health(&double, "web").await.len(), 3);

    double.agent_full_sync().unwrap();
    let instances = get(&double, "/v1/catalog/service/web").await;
    let ports: Vec<(String, i64)> = instances
        .as_array()
        .unwrap()
        .iter()
        .map(|i| {
            (
                i["ServiceID"].as_str().unwrap().into(),
                i["ServicePort"].as_i64().unwrap(),
            )
        })
        .collect();
    assert_eq!(ports, [("w1".into(), 8080), ("w2".into(), 8080)]);
    // serf's check survives.
    let node = get(&double, "/v1/catalog/node/node-1").await;
    assert!(node["Node"]["TaggedAddresses"]["lan"].is_string());
    assert_eq!(
        check_status(&health(&double, "web").await[0].1, "serfHealth"),
        "passing"
    );
    double.shutdown().await;

    // The periodic run does the same on its own.
    let periodic = start(AgentConfig {
        ae_interval: Duration::from_millis(200),
        ..agent_config()
    })
    .await;
    let stray = json!({"Node": "node-1", "Address": "127.0.0.1", "SkipNodeUpdate": true,
                       "Service": {"ID": "stray", "Service": "web", "Port": 1}});
    put(&periodic, "/v1/catalog/register", Some(stray)).await;
    eventually("the periodic full sync", Duration::from_secs(5), || async {
        health(&periodic, "web").await.is_empty()
    })
    .await;
    periodic.shutdown().await;
}

#[tokio::test]
async fn a_restart_restores_persisted_services_and_a_dev_restart_loses_them() {
    let double = start(agent_config()).await;
    for id in ["w1", "w2", "w3"] {
        put(
            &double,
            "/v1/agent/service/register",
            Some(ttl_service(id, "web", "30s")),
        )
        .await;
    }
    let mut short = ttl_service("w4", "web", "150ms");
    short["Check"]["Status"] = json!("passing");
    put(&double, "/v1/agent/service/register", Some(short)).await;
    put(&double, "/v1/agent/check/pass/service:w1", None).await;
    put(&double, "/v1/agent/service/deregister/w3", None).await;
    eventually("w4's TTL expiry", Duration::from_secs(5), || async {
        health(&double, "web")
            .await
            .iter()
            .any(|(id, checks)| id == "w4" && check_status(checks, "service:w4") == "critical")
    })
    .await;

    double.agent_restart(false).unwrap();
    let services = get(&double, "/v1/agent/services").await;
    let ids: Vec<&String> = services.as_object().unwrap().keys().collect();
    assert_eq!(ids, ["w1", "w2", "w4"]);
    let checks = get(&double, "/v1/agent/checks").await;
    // A TTL state younger than its TTL is restored; everything else starts critical.
    assert_eq!(checks["service:w1"]["Status"], "passing");
    assert_eq!(checks["service:w2"]["Status"], "critical");
    assert_eq!(checks["service:w4"]["Status"], "critical");
    assert_eq!(health(&double, "web").await.len(), 3);

    double.agent_restart(true).unwrap();
    assert_eq!(get(&double, "/v1/agent/services").await, json!({}));
    // The first full sync after the restart removes what the agent no longer has.
    assert!(health(&double, "web").await.is_empty());
    double.shutdown().await;
}

#[tokio::test]
async fn a_failed_node_makes_every_instance_critical_until_it_recovers() {
    let double = start(agent_config()).await;
    for id in ["w1", "w2"] {
        let mut body = ttl_service(id, "web", "30s");
        body["Check"]["Status"] = json!("passing");
        put(&double, "/v1/agent/service/register", Some(body)).await;
    }
    assert_eq!(
        get(&double, "/v1/health/service/web?passing")
            .await
            .as_array()
            .unwrap()
            .len(),
        2
    );

    double.agent_node_failed(true).unwrap();
    let instances = health(&double, "web").await;
    assert_eq!(instances.len(), 2);
    for (_, checks) in &instances {
        assert!(checks.contains(&(
            "serfHealth".into(),
            "critical".into(),
            "Agent not live or unreachable".into()
        )));
    }
    assert_eq!(
        get(&double, "/v1/health/service/web?passing").await,
        json!([])
    );
    // The partitioned agent cannot sync: its changes wait.
    put(&double, "/v1/agent/check/fail/service:w2", None).await;
    let instances = health(&double, "web").await;
    assert_eq!(check_status(&instances[1].1, "service:w2"), "passing");

    double.agent_node_failed(false).unwrap();
    let instances = health(&double, "web").await;
    assert_eq!(check_status(&instances[0].1, "serfHealth"), "passing");
    assert_eq!(check_status(&instances[1].1, "service:w2"), "critical");
    assert_eq!(
        get(&double, "/v1/health/service/web?passing")
            .await
            .as_array()
            .unwrap()
            .len(),
        1
    );
    double.shutdown().await;
}

#[tokio::test]
async fn an_output_only_change_is_synced_late_and_a_status_change_at_once() {
    let double = start(AgentConfig {
        check_update_interval: Duration::from_secs(3),
        ..AgentConfig::default()
    })
    .await;
    put(
        &double,
        "/v1/agent/service/register",
        Some(ttl_service("w1", "web", "30s")),
    )
    .await;
    let update = |output: &str| {
        put(
            &double,
            "/v1/agent/check/update/service:w1",
            Some(json!({"Status": "passing", "Output": output})),
        )
    };
    update("first").await;
    let output = |entry: &[(String, String, String)]| {
        entry
            .iter()
            .find(|c| c.0 == "service:w1")
            .unwrap()
            .2
            .clone()
    };
    assert_eq!(output(&health(&double, "web").await[0].1), "first");
    update("second").await;
    assert_eq!(
        output(&health(&double, "web").await[0].1),
        "first",
        "deferred"
    );
    assert_eq!(
        get(&double, "/v1/agent/checks").await["service:w1"]["Output"],
        "second"
    );
    eventually("the deferred sync", Duration::from_secs(10), || async {
        output(&health(&double, "web").await[0].1) == "second"
    })
    .await;
    double.shutdown().await;
}
