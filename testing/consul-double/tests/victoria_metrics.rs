//! Fidelity check with a real Consul client: VictoriaMetrics' `consul_sd_configs`
//! must discover, label and drop workers through the double exactly as it
//! would through Consul. Requires `victoria-metrics` on PATH (Debian package
//! `victoria-metrics`); a missing binary fails the test on purpose.

mod vm_support;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use consul_double::{Config, ConsulDouble};
use serde_json::{Value, json};
use vm_support::*;

const NODE: &str = "workersd-synthetic";

fn service_op(verb: &str, id: &str, name: &str, port: u16, pid: &str) -> Value {
    json!({"Service": {"Verb": verb, "Node": NODE, "Service": {
        "ID": id,
        "Service": name,
        "Port": port,
        "Tags": ["workersd", name],
        "Meta": {"worker_pid": pid, "worker_id": id},
    }}})
}

async fn put_txn(http: &reqwest::Client, double: &ConsulDouble, ops: Value) {
    let response = http
        .put(format!("{}/v1/txn", double.api_url()))
        .json(&ops)
        .send()
        .await
        .expect("txn request");
    let status = response.status();
    let body = response.text().await.unwrap_or_default();
    assert_eq!(status, reqwest::StatusCode::OK, "txn failed: {body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn victoria_metrics_discovers_workers_through_the_double() {
    let double = ConsulDouble::start(Config::default())
        .await
        .expect("start double");
    let _ = rustls::crypto::ring::default_provider().install_default();
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .expect("client");
    let gunicorn_1 = start_scrape_target("gunicorn-1").await;
    let gunicorn_2 = start_scrape_target("gunicorn-2").await;
    let celery_1 = start_scrape_target("celery-1").await;

    put_txn(
        &http,
        &double,
        json!([
            {"Node": {"Verb": "set", "Node": {
                "Node": NODE, "Address": "127.0.0.1", "Meta": {"managed_by": "workersd"}
            }}},
            service_op("set", "gunicorn-1", "gunicorn", gunicorn_1.port(), "101"),
            service_op("set", "gunicorn-2", "gunicorn", gunicorn_2.port(), "102"),
            service_op("set", "celery-1", "celery", celery_1.port(), "201"),
        ]),
    )
    .await;

    let scratch = TempDir::new("consul-double-vm");
    let (_vm, vm) = start_victoria_metrics(&scratch, double.api_addr(), "");

    let expected: BTreeMap<String, (&str, &str, &str)> = [
        (gunicorn_1, "gunicorn-1", "gunicorn", "101"),
        (gunicorn_2, "gunicorn-2", "gunicorn", "102"),
        (celery_1, "celery-1", "celery", "201"),
    ]
    .into_iter()
    .map(|(addr, id, name, pid)| (addr.to_string(), (id, name, pid)))
    .collect();

    let all_discovered = |targets: &BTreeMap<String, Value>| {
        targets.len() == expected.len()
            && expected.iter().all(|(address, (id, name, pid))| {
                targets.get(address).is_some_and(|t| {
                    let labels = &t["discoveredLabels"];
                    labels["__meta_consul_service_id"] == json!(id)
                        && labels["__meta_consul_service"] == json!(name)
                        && labels["__meta_consul_service_metadata_worker_pid"] == json!(pid)
                        && labels["__meta_consul_service_metadata_worker_id"] == json!(id)
                        && labels["__meta_consul_tags"] == json!(format!(",workersd,{name},"))
                        && labels["__meta_consul_metadata_managed_by"] == json!("workersd")
                        && labels["__meta_consul_dc"] == json!("dc1")
                        && labels["__meta_consul_health"] == json!("passing")
                        && t["health"] == json!("up")
                })
            })
    };
    let (ok, seen) = poll_targets(&http, &vm, NODE, all_discovered).await;
    assert!(
        ok,
        "VictoriaMetrics did not discover and scrape all workers via the double within {DISCOVERY_DEADLINE:?}; last seen: {seen:#?}\nstats: {:#?}",
        double.stats()
    );

    // Deregister one gunicorn instance and the only celery instance.
    put_txn(
        &http,
        &double,
        json!([
            service_op("delete", "gunicorn-2", "gunicorn", 0, ""),
            service_op("delete", "celery-1", "celery", 0, ""),
        ]),
    )
    .await;
    let remaining = gunicorn_1.to_string();
    let (ok, seen) = poll_targets(&http, &vm, NODE, |targets| {
        targets.len() == 1 && targets.contains_key(&remaining)
    })
    .await;
    assert!(
        ok,
        "deregistered workers did not disappear from VictoriaMetrics; last seen: {seen:#?}"
    );

    // Which parts of the API VM relied on, and did the double serve all of it?
    let stats = double.stats();
    eprintln!("endpoints VictoriaMetrics called: {:#?}", stats.requests);
    eprintln!("query parameters it sent: {:#?}", stats.query_params);
    eprintln!("responses: {:#?}", stats.responses);
    assert!(
        stats.unmatched.is_empty(),
        "VM called unimplemented endpoints: {:?}",
        stats.unmatched
    );
    let vm_routes: BTreeSet<&str> = stats
        .requests
        .keys()
        .map(String::as_str)
        .filter(|route| !route.starts_with("PUT "))
        .collect();
    for required in [
        "GET /v1/agent/self",
        "GET /v1/catalog/services",
        "GET /v1/health/service/{service}",
    ] {
        assert!(
            vm_routes.contains(required),
            "VM never called {required}: {vm_routes:?}"
        );
    }
    for (route, statuses) in &stats.responses {
        assert!(
            statuses.keys().all(|status| *status == 200),
            "{route} answered {statuses:?}"
        );
    }
    assert!(stats.blocking_queries > 0, "VM is expected to long-poll");
    double.shutdown().await;
}
