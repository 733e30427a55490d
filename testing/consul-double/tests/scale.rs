//! Benchmark-sized smoke test: ~40,000 instances on one synthetic node, the
//! shape workersd produces, written through 64-op txns and read back.

use std::time::{Duration, Instant};

use consul_double::{Config, ConsulDouble};
use serde_json::{Value, json};

const INSTANCES: usize = 40_000;
const OPS_PER_TXN: usize = 64;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forty_thousand_instances_stay_fast() {
    let double = ConsulDouble::start(Config::default()).await.expect("start");
    let _ = rustls::crypto::ring::default_provider().install_default();
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .expect("client");
    let txn_url = format!("{}/v1/txn", double.api_url());
    let response = http
        .put(&txn_url)
        .json(&json!([{"Node": {"Verb": "set", "Node": {"Node": "syn", "Address": "127.0.0.1"}}}]))
        .send()
        .await
        .expect("node set");
    assert!(response.status().is_success());

    let started = Instant::now();
    let ids: Vec<usize> = (0..INSTANCES).collect();
    for chunk in ids.chunks(OPS_PER_TXN) {
        let ops: Vec<Value> = chunk
            .iter()
            .map(|i| {
                json!({"Service": {"Verb": "set", "Node": "syn", "Service": {
                    "ID": format!("worker-{i}"),
                    "Service": format!("app-{}", i % 50),
                    "Port": 10_000 + (i % 50_000),
                    "Tags": ["workersd"],
                    "Meta": {"worker_pid": i.to_string()},
                }}})
            })
            .collect();
        let response = http.put(&txn_url).json(&ops).send().await.expect("txn");
        assert!(
            response.status().is_success(),
            "{}",
            response.text().await.unwrap_or_default()
        );
    }
    let write_time = started.elapsed();
    assert_eq!(double.with_catalog(|c| c.service_count()), INSTANCES);

    // A small txn against the huge node must not cost O(node size).
    let started = Instant::now();
    for round in 0..100 {
        let ops = json!([{"Service": {"Verb": "set", "Node": "syn", "Service": {
            "ID": "worker-0", "Service": "app-0", "Port": 10_000,
            "Meta": {"round": round.to_string()},
        }}}]);
        let response = http.put(&txn_url).json(&ops).send().await.expect("txn");
        assert!(response.status().is_success());
    }
    let small_txn_time = started.elapsed() / 100;

    let started = Instant::now();
    let body: Value = http
        .get(format!("{}/v1/health/service/app-7", double.api_url()))
        .send()
        .await
        .expect("read")
        .json()
        .await
        .expect("json");
    let read_time = started.elapsed();
    assert_eq!(body.as_array().map(Vec::len), Some(INSTANCES / 50));

    eprintln!(
        "{INSTANCES} instances written in {write_time:?}; small txn {small_txn_time:?}; health read of {} in {read_time:?}",
        INSTANCES / 50
    );
    // Loose bounds for an unoptimised build on 2 cores; they catch O(n) regressions.
    assert!(
        small_txn_time < Duration::from_millis(50),
        "{small_txn_time:?}"
    );
    assert!(read_time < Duration::from_secs(2), "{read_time:?}");
    double.shutdown().await;
}
