//! HTTP-level tests of the double's Consul semantics and its control API.

use std::time::{Duration, Instant};

use consul_double::{Config, ConsulDouble};
use reqwest::{Client, StatusCode};
use serde_json::{Value, json};

fn client() -> Client {
    // No idle pooling: down/up tests must not reuse a connection the double cut.
    let _ = rustls::crypto::ring::default_provider().install_default();
    Client::builder()
        .pool_max_idle_per_host(0)
        .timeout(Duration::from_secs(30))
        .build()
        .expect("client")
}

async fn start() -> ConsulDouble {
    start_with(Config::default()).await
}

async fn start_with(config: Config) -> ConsulDouble {
    ConsulDouble::start(config).await.expect("double starts")
}

fn index_of(response: &reqwest::Response) -> u64 {
    response
        .headers()
        .get("X-Consul-Index")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .expect("X-Consul-Index header")
}

async fn txn(client: &Client, double: &ConsulDouble, ops: Value) -> (StatusCode, Value) {
    let response = client
        .put(format!("{}/v1/txn", double.api_url()))
        .json(&ops)
        .send()
        .await
        .expect("txn request");
    let status = response.status();
    let text = response.text().await.expect("txn body");
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

fn node_set(name: &str) -> Value {
    json!({"Node": {"Verb": "set", "Node": {"Node": name, "Address": "127.0.0.1"}}})
}

fn service_set(node: &str, id: &str, name: &str, port: u16) -> Value {
    json!({"Service": {"Verb": "set", "Node": node, "Service": {
        "ID": id, "Service": name, "Port": port, "Tags": ["worker"], "Meta": {"worker_id": id}
    }}})
}

async fn get_json(client: &Client, url: String) -> (StatusCode, u64, Value) {
    let response = client.get(url).send().await.expect("GET");
    let status = response.status();
    // Endpoints that do not block (agent/self, datacenters) send no index.
    let index = if response.headers().contains_key("X-Consul-Index") {
        index_of(&response)
    } else {
        0
    };
    let body = response.json().await.unwrap_or(Value::Null);
    (status, index, body)
}

#[tokio::test]
async fn txn_is_atomic_and_reports_every_failed_op() {
    let double = start().await;
    let http = client();
    let (status, body) = txn(
        &http,
        &double,
        json!([node_set("syn"), service_set("syn", "w1", "gunicorn", 9001)]),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["Errors"], Value::Null);
    assert_eq!(body["Results"].as_array().unwrap().len(), 2);
    let committed_index = double.index();

    // Op 0 is valid, ops 1 and 2 fail in the state store: nothing applies.
    let (status, body) = txn(
        &http,
        &double,
        json!([
            service_set("syn", "w2", "gunicorn", 9002),
            service_set("ghost", "w3", "gunicorn", 9003),
            {"Node": {"Verb": "cas", "Node": {"Node": "syn", "Address": "127.0.0.2", "ModifyIndex": 999}}},
        ]),
    )
    .await;
    assert_eq!(status, StatusCode::CONFLICT);
    assert_eq!(body["Results"], Value::Null);
    assert_eq!(
        body["Errors"],
        json!([
            {"OpIndex": 1, "What": "Missing node registration"},
            {"OpIndex": 2, "What": "failed to set node \"syn\", index is stale"},
        ])
    );
    assert_eq!(
        double.index(),
        committed_index,
        "a rolled back txn must not move the index"
    );
    let (_, _, instances) = get_json(
        &http,
        format!("{}/v1/catalog/service/gunicorn", double.api_url()),
    )
    .await;
    assert_eq!(instances.as_array().unwrap().len(), 1);

    // Deletes produce no result entries; Results is an empty list, not null.
    let (status, body) = txn(
        &http,
        &double,
        json!([{"Service": {"Verb": "delete", "Node": "syn", "Service": {"ID": "w1", "Service": "gunicorn"}}}]),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body, json!({"Results": [], "Errors": null}));
    let stats = double.stats();
    assert_eq!(stats.txn.committed, 2);
    assert_eq!(stats.txn.rolled_back, 1);
    assert_eq!(stats.txn.ops_applied, 3);
    assert_eq!(stats.txn.ops_applied_by_verb["Service.delete"], 1);
    double.shutdown().await;
}

/// Consul's `convertOps` (agent/txn_endpoint.go) enforces the larger of
/// `limits.txn_max_req_len` and `limits.kv_max_value_size` on the body, with its wording.
#[tokio::test]
async fn txn_body_limit_is_the_larger_of_txn_max_req_len_and_kv_max_value_size() {
    let http = client();
    // ~200 KiB: one node op with a big meta value the node op does not validate.
    let big = |len: usize| {
        json!([{"Node": {"Verb": "set", "Node": {
        "Node": "n", "Address": "127.0.0.1", "Meta": {"k": "v".repeat(len)}}}}])
    };
    let lowered_txn_only = start_with(Config {
        txn_max_req_len: 100 * 1024,
        ..Config::default()
    })
    .await;
    let (status, _) = txn(&http, &lowered_txn_only, big(200 * 1024)).await;
    assert_eq!(
        status,
        StatusCode::OK,
        "kv_max_value_size (512 KiB) still applies"
    );
    let (status, body) = txn(&http, &lowered_txn_only, big(600 * 1024)).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(
        body,
        json!("Request body too large, max size: 524288 bytes")
    );
    lowered_txn_only.shutdown().await;
    let lowered_both = start_with(Config {
        txn_max_req_len: 100 * 1024,
        kv_max_value_size: 100 * 1024,
        ..Config::default()
    })
    .await;
    let (status, body) = txn(&http, &lowered_both, big(200 * 1024)).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(
        body,
        json!("Request body too large, max size: 102400 bytes")
    );
    lowered_both.shutdown().await;
}

#[tokio::test]
async fn txn_operation_limit_and_body_errors() {
    let double = start().await;
    let http = client();
    let mut ops = vec![node_set("syn")];
    ops.extend((1..128).map(|i| service_set("syn", &format!("w{i}"), "gunicorn", 9000 + i)));
    let (status, _) = txn(&http, &double, Value::Array(ops.clone())).await;
    assert_eq!(status, StatusCode::OK, "128 ops are allowed");

    ops.push(service_set("syn", "w128", "gunicorn", 9128));
    let (status, body) = txn(&http, &double, Value::Array(ops.clone())).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(
        body,
        json!("Transaction contains too many operations (129 > 128)")
    );
    // A Consul before 1.14.
    let old = start_with(Config {
        max_txn_ops: 64,
        ..Config::default()
    })
    .await;
    let (status, body) = txn(&http, &old, Value::Array(ops[..65].to_vec())).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(
        body,
        json!("Transaction contains too many operations (65 > 64)")
    );
    old.shutdown().await;

    let response = http
        .put(format!("{}/v1/txn", double.api_url()))
        .body("[{\"Node\": ")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    assert!(
        response
            .text()
            .await
            .unwrap()
            .starts_with("Failed to parse body: ")
    );

    let response = http
        .put(format!("{}/v1/catalog/register", double.api_url()))
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    assert!(
        response
            .text()
            .await
            .unwrap()
            .starts_with("Request decode failed: ")
    );
    assert_eq!(double.stats().txn.rejected, 2);
    double.shutdown().await;
}

#[tokio::test]
async fn blocking_query_wakes_on_write_and_times_out_without_one() {
    let double = start().await;
    let http = client();
    let url = format!("{}/v1/catalog/services", double.api_url());
    let (_, index, _) = get_json(&http, url.clone()).await;

    // Timeout: nothing writes, so the query returns after wait (+ <= wait/16).
    let started = Instant::now();
    let (status, same_index, _) = get_json(&http, format!("{url}?index={index}&wait=1s")).await;
    let elapsed = started.elapsed();
    assert_eq!(status, StatusCode::OK);
    assert_eq!(same_index, index);
    assert!(
        elapsed >= Duration::from_secs(1),
        "returned early: {elapsed:?}"
    );
    assert!(
        elapsed < Duration::from_millis(1500),
        "returned late: {elapsed:?}"
    );

    // Wakeup: a write 300 ms in releases the query long before its wait.
    let blocked = tokio::spawn({
        let http = http.clone();
        let url = format!("{url}?index={index}&wait=30s");
        async move {
            let started = Instant::now();
            let result = get_json(&http, url).await;
            (started.elapsed(), result)
        }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (status, _) = txn(
        &http,
        &double,
        json!([node_set("syn"), service_set("syn", "w1", "web", 80)]),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let (elapsed, (status, new_index, body)) = blocked.await.unwrap();
    assert_eq!(status, StatusCode::OK);
    assert!(new_index > index);
    assert_eq!(body, json!({"web": ["worker"]}));
    assert!(
        elapsed < Duration::from_secs(5),
        "not woken by the write: {elapsed:?}"
    );

    // index=0 never blocks; an invalid wait is a 400 like Consul's.
    let started = Instant::now();
    let (status, _, _) = get_json(&http, format!("{url}?index=0&wait=30s")).await;
    assert_eq!(status, StatusCode::OK);
    assert!(started.elapsed() < Duration::from_secs(2));
    let response = http
        .get(format!("{url}?index=1&wait=10"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    assert_eq!(response.text().await.unwrap(), "Invalid wait time");
    assert_eq!(double.stats().blocking_queries, 2);
    double.shutdown().await;
}

/// agent/http.go `parseTokenInternal`: `?token=`, `X-Consul-Token`, then
/// `Authorization: Bearer`; an unknown token is 403 `ACL not found`
/// (acl/errors.go); no token is the anonymous token, whose reads are filtered
/// (200, empty, no filtered header) and whose writes are refused per op.
#[tokio::test]
async fn acl_tokens_are_resolved_like_consul() {
    let double = start_with(Config {
        acl_token: Some("s3cret".into()),
        ..Config::default()
    })
    .await;
    let http = client();
    let url = format!("{}/v1/catalog/services", double.api_url());
    let (status, _) = txn(
        &http,
        &double,
        json!([node_set("syn"), service_set("syn", "w1", "web", 1)]),
    )
    .await;
    assert_eq!(status, StatusCode::CONFLICT, "anonymous writes are refused");

    // The anonymous token reads an empty catalog, with no filtered header.
    let response = http.get(&url).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()["X-Consul-Default-ACL-Policy"], "deny");
    assert!(
        !response
            .headers()
            .contains_key("X-Consul-Results-Filtered-By-ACLs")
    );
    assert_eq!(response.json::<Value>().await.unwrap(), json!({}));

    let response = http
        .get(&url)
        .header("X-Consul-Token", "wrong")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::FORBIDDEN);
    assert_eq!(response.text().await.unwrap(), "ACL not found");

    let response = http
        .put(format!("{}/v1/txn", double.api_url()))
        .json(&json!([node_set("syn")]))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::CONFLICT);
    let body: Value = response.json().await.unwrap();
    assert_eq!(
        body["Errors"][0]["What"],
        "Permission denied: anonymous token lacks permission 'node:write' on \"syn\". \
         The anonymous token is used implicitly when a request does not specify a token."
    );
    assert_eq!(double.index(), 1, "a denied write must not apply");

    for request in [
        http.get(&url).header("X-Consul-Token", "s3cret"),
        http.get(&url).header("Authorization", "Bearer s3cret"),
        http.get(format!("{url}?token=s3cret")),
    ] {
        assert_eq!(request.send().await.unwrap().status(), StatusCode::OK);
    }
    let stats = double.stats();
    assert_eq!(stats.acl_denied, 1);
    assert_eq!(stats.acl_permission_denied, 3);
    assert_eq!(stats.token_sources["X-Consul-Token"], 2);
    assert_eq!(stats.token_sources["bearer"], 1);
    assert_eq!(stats.token_sources["query"], 1);
    assert_eq!(stats.token_sources["none"], 3);
    // Only parameter names are recorded, never the token value.
    let recorded = serde_json::to_string(&stats).unwrap();
    assert!(!recorded.contains("s3cret"));
    double.shutdown().await;
}

fn acl_with(tokens: Vec<consul_double::Token>) -> consul_double::AclConfig {
    consul_double::AclConfig {
        default_policy: consul_double::DefaultPolicy::Deny,
        tokens,
        anonymous: Default::default(),
    }
}

/// agent/consul/acl.go `filterNodeServiceList`: without node:read the reply
/// is `{"Node":null,"Services":null}` with `X-Consul-Results-Filtered-By-ACLs`
/// (a named token); without service:read on one service only that one goes.
/// agent/consul/txn_endpoint.go: a read-only token gets one permission error
/// per op in a 409.
#[tokio::test]
async fn acl_rules_filter_reads_and_refuse_writes_per_op() {
    use consul_double::{Access, Resource, Rules, Token};
    let double = start_with(Config {
        acl: Some(acl_with(vec![
            Token::management("root"),
            Token::with_rules("reader", Rules::everything(Access::Read)),
            Token::with_rules(
                "web-only",
                Rules::default()
                    .with(Resource::Node, "syn", false, Access::Read)
                    .with(Resource::Service, "web", true, Access::Read),
            ),
            Token::with_rules(
                "no-node",
                Rules::default().with(Resource::Service, "", true, Access::Write),
            ),
        ])),
        ..Config::default()
    })
    .await;
    let http = client();
    let ops = json!([
        node_set("syn"),
        service_set("syn", "w1", "web", 1),
        service_set("syn", "d1", "db", 2)
    ]);
    let response = http
        .put(format!("{}/v1/txn", double.api_url()))
        .header("X-Consul-Token", "root")
        .json(&ops)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);

    let node_services = format!("{}/v1/catalog/node-services/syn", double.api_url());
    let read = |token: &'static str| {
        http.get(&node_services)
            .header("X-Consul-Token", token)
            .send()
    };
    let response = read("reader").await.unwrap();
    assert!(
        !response
            .headers()
            .contains_key("X-Consul-Results-Filtered-By-ACLs")
    );
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["Services"].as_array().unwrap().len(), 2);
    // Entries carry the fields a real NodeService always has.
    assert_eq!(body["Services"][0]["PeerName"], "");
    assert_eq!(body["Services"][0]["Connect"], json!({}));
    assert!(body["Services"][0]["Proxy"].is_object());

    let response = read("web-only").await.unwrap();
    assert_eq!(
        response.headers()["X-Consul-Results-Filtered-By-ACLs"],
        "true"
    );
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["Services"].as_array().unwrap().len(), 1);
    assert_eq!(body["Services"][0]["Service"], "web");

    let response = read("no-node").await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(
        response.headers()["X-Consul-Results-Filtered-By-ACLs"],
        "true"
    );
    assert_eq!(
        response.json::<Value>().await.unwrap(),
        json!({"Node": null, "Services": null})
    );

    let response = http
        .put(format!("{}/v1/txn", double.api_url()))
        .header("X-Consul-Token", "reader")
        .json(&ops)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::CONFLICT);
    let body: Value = response.json().await.unwrap();
    let errors = body["Errors"].as_array().unwrap();
    assert_eq!(errors.len(), 3, "one error per op: {body}");
    assert!(
        errors[1]["What"]
            .as_str()
            .unwrap()
            .starts_with("Permission denied: token with AccessorID '")
    );
    assert!(
        errors[1]["What"]
            .as_str()
            .unwrap()
            .ends_with("lacks permission 'service:write' on \"web\"")
    );

    // A policy edited at run time takes effect on the next request.
    assert!(double.set_token_rules("reader", Rules::everything(Access::Write)));
    let response = http
        .put(format!("{}/v1/txn", double.api_url()))
        .header("X-Consul-Token", "reader")
        .json(&ops)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    double.shutdown().await;
}

/// agent/consul/catalog_endpoint.go `vetRegisterWithACL` / `vetDeregisterWithACL`: a
/// refused register or deregister is an RPC permission error, which agent/http.go answers
/// with 403 and the error text.
#[tokio::test]
async fn register_and_deregister_need_write_permission() {
    use consul_double::{Access, Resource, Rules, Token};
    let double = start_with(Config {
        acl: Some(acl_with(vec![
            Token::management("root"),
            Token::with_rules(
                "svc-only",
                Rules::everything(Access::Read).with(
                    Resource::Service,
                    "web",
                    false,
                    Access::Write,
                ),
            ),
        ])),
        ..Config::default()
    })
    .await;
    let http = client();
    let register = |token: &'static str| {
        http.put(format!("{}/v1/catalog/register", double.api_url()))
            .header("X-Consul-Token", token)
            .json(&json!({"Node": "n", "Address": "10.0.0.1",
                          "Service": {"ID": "w1", "Service": "web", "Port": 1}}))
            .send()
    };
    let response = register("svc-only").await.unwrap();
    assert_eq!(response.status(), StatusCode::FORBIDDEN);
    let text = response.text().await.unwrap();
    assert!(
        text.ends_with("lacks permission 'node:write' on \"n\""),
        "{text}"
    );
    assert_eq!(register("root").await.unwrap().status(), StatusCode::OK);
    // service:write on "web" is enough to deregister that service, not the node.
    let deregister = |body: Value| {
        http.put(format!("{}/v1/catalog/deregister", double.api_url()))
            .header("X-Consul-Token", "svc-only")
            .json(&body)
            .send()
    };
    let response = deregister(json!({"Node": "n"})).await.unwrap();
    assert_eq!(response.status(), StatusCode::FORBIDDEN);
    let response = deregister(json!({"Node": "n", "ServiceID": "w1"}))
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(double.with_catalog(|c| c.service_count()), 0);
    assert_eq!(double.stats().acl_permission_denied, 2);
    double.shutdown().await;
}

/// `catalogNodeMaxIndex`: node-services reports and blocks on the node's own
/// index, so a write to another node neither wakes nor moves it.
#[tokio::test]
async fn node_services_blocks_on_the_nodes_own_index() {
    let double = start().await;
    let http = client();
    txn(
        &http,
        &double,
        json!([node_set("a"), service_set("a", "a1", "s", 1)]),
    )
    .await;
    let url = format!("{}/v1/catalog/node-services/a", double.api_url());
    let (_, index_a, _) = get_json(&http, url.clone()).await;
    // structs.ServiceNode's Connect fields are values: always present.
    let (_, _, listed) =
        get_json(&http, format!("{}/v1/catalog/service/s", double.api_url())).await;
    assert_eq!(listed[0]["ServiceConnect"], json!({}));
    assert_eq!(listed[0]["ServiceProxy"]["Mode"], "");
    txn(&http, &double, json!([node_set("b")])).await;
    assert!(double.index() > index_a);
    let started = Instant::now();
    let (_, index, _) = get_json(&http, format!("{url}?index={index_a}&wait=300ms")).await;
    assert_eq!(
        index, index_a,
        "another node's write does not move this one"
    );
    assert!(started.elapsed() >= Duration::from_millis(300));
    let (_, unknown, body) = get_json(
        &http,
        format!("{}/v1/catalog/node-services/zzz", double.api_url()),
    )
    .await;
    assert_eq!(body, json!({"Node": null, "Services": null}));
    assert!(unknown >= 1);
    double.shutdown().await;
}

/// agent/blockingquery: a restored snapshot (here a wipe) abandons the state
/// store and every blocked query returns at once, with the lower index.
#[tokio::test]
async fn a_wipe_releases_blocked_queries_at_once() {
    let double = start().await;
    let http = client();
    txn(&http, &double, json!([node_set("a")])).await;
    let url = format!("{}/v1/catalog/node-services/a", double.api_url());
    let (_, index, _) = get_json(&http, url.clone()).await;
    let blocked = tokio::spawn({
        let http = http.clone();
        async move { get_json(&http, format!("{url}?index={index}&wait=20s")).await }
    });
    // Wait for the query to be blocked before wiping.
    while double.stats().blocking_queries == 0 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // The counter moves just before the query subscribes; let it get there.
    tokio::time::sleep(Duration::from_millis(50)).await;
    let started = Instant::now();
    double.wipe();
    let (status, after, body) = tokio::time::timeout(Duration::from_secs(5), blocked)
        .await
        .expect("released at once")
        .unwrap();
    assert_eq!(status, StatusCode::OK);
    assert!(after < index, "{after} < {index}");
    assert_eq!(body["Node"], Value::Null);
    assert!(started.elapsed() < Duration::from_secs(5));
    double.shutdown().await;
}

#[tokio::test]
async fn down_refuses_connections_and_drops_long_polls_then_up_restores() {
    let double = start_with(Config {
        control_listen: Some("127.0.0.1:0".parse().unwrap()),
        ..Config::default()
    })
    .await;
    let control = format!("http://{}", double.control_addr().unwrap());
    let http = client();
    let (status, _) = txn(
        &http,
        &double,
        json!([node_set("syn"), service_set("syn", "w1", "web", 80)]),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let index = double.index();
    let services = format!("{}/v1/catalog/services", double.api_url());

    let long_poll = tokio::spawn({
        let http = http.clone();
        let url = format!("{services}?index={index}&wait=60s");
        async move { http.get(url).send().await }
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let started = Instant::now();
    let response = http
        .post(format!("{control}/control/down"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let state: Value = response.json().await.unwrap();
    assert_eq!(state["api_up"], json!(false));

    let dropped = tokio::time::timeout(Duration::from_secs(5), long_poll)
        .await
        .expect("long poll must end when the API goes down")
        .unwrap();
    assert!(
        dropped.is_err(),
        "in-flight blocking query must be dropped, got {dropped:?}"
    );
    assert!(started.elapsed() < Duration::from_secs(5));
    let refused = http.get(&services).send().await.unwrap_err();
    assert!(
        refused.is_connect(),
        "expected connection refused, got {refused:?}"
    );

    // Back up on the same address with the catalog intact.
    let response = http
        .post(format!("{control}/control/up"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let (status, same_index, body) = get_json(&http, services.clone()).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(same_index, index);
    assert_eq!(body, json!({"web": ["worker"]}));

    // Down, then up empty: a Consul that lost its data.
    http.post(format!("{control}/control/down"))
        .send()
        .await
        .unwrap();
    let response = http
        .post(format!("{control}/control/up?empty=true"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let (_, wiped_index, body) = get_json(&http, services.clone()).await;
    assert_eq!(body, json!({}));
    assert_eq!(wiped_index, 1);

    // A client still holding the old, higher index blocks for its full wait
    // (Consul only returns once the index passes it), then sees the index go
    // backwards and must reset to 0.
    let started = Instant::now();
    let (status, returned, _) = get_json(&http, format!("{services}?index={index}&wait=1s")).await;
    assert_eq!(status, StatusCode::OK);
    assert!(started.elapsed() >= Duration::from_secs(1));
    assert!(returned < index);

    let state: Value = http
        .get(format!("{control}/control/state"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(state["node_count"], json!(0));
    assert_eq!(state["api_up"], json!(true));
    double.shutdown().await;
}

#[tokio::test]
async fn wipe_and_stats_controls() {
    let double = start_with(Config {
        control_listen: Some("127.0.0.1:0".parse().unwrap()),
        initial_index: 10,
        ..Config::default()
    })
    .await;
    let control = format!("http://{}", double.control_addr().unwrap());
    let http = client();
    txn(
        &http,
        &double,
        json!([node_set("syn"), service_set("syn", "w1", "web", 80)]),
    )
    .await;
    assert_eq!(double.index(), 11);
    let stats: Value = http
        .get(format!("{control}/control/stats"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(stats["requests"]["PUT /v1/txn"], json!(1));
    assert_eq!(stats["catalog_writes"], json!(1));

    http.post(format!("{control}/control/wipe"))
        .send()
        .await
        .unwrap();
    assert_eq!(double.index(), 10);
    assert_eq!(double.state()["service_count"], json!(0));

    let response = http
        .post(format!("{control}/control/reset-stats"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::NO_CONTENT);
    assert_eq!(double.stats(), Default::default());

    http.get(format!("{}/v1/kv/anything", double.api_url()))
        .send()
        .await
        .unwrap();
    assert_eq!(double.stats().unmatched["GET /v1/kv/anything"], 1);
    double.shutdown().await;
}

#[tokio::test]
async fn node_services_for_unknown_node_matches_consul() {
    let double = start().await;
    let http = client();
    // Consul answers 200 with nulls here, not 404 (see CONTRACT.md).
    let (status, _, body) = get_json(
        &http,
        format!("{}/v1/catalog/node-services/ghost", double.api_url()),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body, json!({"Node": null, "Services": null}));
    let (_, _, body) = get_json(&http, format!("{}/v1/catalog/node/ghost", double.api_url())).await;
    assert_eq!(body, Value::Null);

    txn(
        &http,
        &double,
        json!([node_set("syn"), service_set("syn", "w1", "web", 80)]),
    )
    .await;
    let (status, _, body) = get_json(
        &http,
        format!("{}/v1/catalog/node-services/SYN", double.api_url()),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["Node"]["Node"], json!("syn"));
    assert_eq!(body["Services"][0]["ID"], json!("w1"));
    assert_eq!(body["Services"][0]["Meta"], json!({"worker_id": "w1"}));
    double.shutdown().await;
}

#[tokio::test]
async fn catalog_register_deregister_and_health_filters() {
    let double = start().await;
    let http = client();
    let api = double.api_url();
    let register = |body: Value| {
        http.put(format!("{api}/v1/catalog/register"))
            .json(&body)
            .send()
    };

    let response = register(json!({
        "Node": "syn", "Address": "10.1.2.3", "NodeMeta": {"role": "workers"},
        "Service": {"Service": "gunicorn", "Port": 9100, "Tags": ["a"]},
        "Check": {"Name": "alive", "Status": "passing", "ServiceID": "gunicorn"}
    }))
    .await
    .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.text().await.unwrap(), "true");
    let response = register(json!({
        "Node": "syn", "Address": "10.1.2.3", "NodeMeta": {"role": "workers"},
        "Service": {"ID": "gunicorn-2", "Service": "gunicorn", "Port": 9101, "Tags": ["b"]},
        "Check": {"CheckID": "g2", "Name": "alive", "Status": "critical", "ServiceID": "gunicorn-2"}
    }))
    .await
    .unwrap();
    assert_eq!(response.status(), StatusCode::OK);

    let response = register(json!({"Node": "syn", "Service": {"Service": "x"}}))
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(
        response.text().await.unwrap(),
        "Must provide address if SkipNodeUpdate is not set"
    );

    let health = format!("{api}/v1/health/service/gunicorn");
    let (_, _, all) = get_json(&http, health.clone()).await;
    assert_eq!(all.as_array().unwrap().len(), 2);
    assert_eq!(all[0]["Checks"][0]["ServiceName"], json!("gunicorn"));
    let (_, _, passing) = get_json(&http, format!("{health}?passing")).await;
    assert_eq!(passing.as_array().unwrap().len(), 1);
    assert_eq!(passing[0]["Service"]["ID"], json!("gunicorn"));
    let (_, _, tagged) = get_json(&http, format!("{health}?tag=b")).await;
    assert_eq!(tagged[0]["Service"]["Port"], json!(9101));
    let (_, _, by_meta) = get_json(&http, format!("{health}?node-meta=role:other")).await;
    assert_eq!(by_meta, json!([]));
    let response = http
        .get(format!("{health}?passing=maybe"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    let response = http
        .get(format!("{health}?filter=Service.Port%3D%3D1"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);

    let response = http
        .put(format!("{api}/v1/catalog/deregister"))
        .json(&json!({"Node": "syn", "ServiceID": "gunicorn-2"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let (_, _, all) = get_json(&http, health.clone()).await;
    assert_eq!(all.as_array().unwrap().len(), 1);
    assert_eq!(
        double.state()["nodes"][0]["Checks"]
            .as_array()
            .unwrap()
            .len(),
        1
    );

    http.put(format!("{api}/v1/catalog/deregister"))
        .json(&json!({"Node": "syn"}))
        .send()
        .await
        .unwrap();
    let (_, _, nodes) = get_json(&http, format!("{api}/v1/catalog/nodes")).await;
    assert_eq!(nodes, json!([]));

    let (_, _, agent) = get_json(&http, format!("{api}/v1/agent/self")).await;
    assert_eq!(agent["Config"]["Datacenter"], json!("dc1"));
    let (_, _, dcs) = get_json(&http, format!("{api}/v1/catalog/datacenters")).await;
    assert_eq!(dcs, json!(["dc1"]));
    let response = http
        .get(format!("{api}/v1/catalog/services?dc=elsewhere"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(response.text().await.unwrap(), "No path to datacenter");
    double.shutdown().await;
}

#[tokio::test]
async fn binary_prints_ready_line_and_writes_ready_file() {
    use std::io::{BufRead, BufReader};
    use std::process::{Command, Stdio};

    let dir = std::env::temp_dir().join(format!("consul-double-bin-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let ready = dir.join("ready.json");
    let mut child = Command::new(env!("CARGO_BIN_EXE_consul-double"))
        .args([
            "--listen",
            "127.0.0.1:0",
            "--control-listen",
            "127.0.0.1:0",
            "--ready-file",
        ])
        .arg(&ready)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn consul-double");
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let addresses: Value = serde_json::from_str(&std::fs::read_to_string(&ready).unwrap()).unwrap();
    let api = addresses["api"].as_str().unwrap().to_string();
    assert!(
        line.starts_with("consul-double ready api=http://"),
        "{line}"
    );
    assert!(line.contains(&api), "{line}");

    let response = client()
        .get(format!("http://{api}/v1/catalog/services"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let _ = child.kill();
    let _ = child.wait();
    let _ = std::fs::remove_dir_all(&dir);
}
