//! The Consul sink against the in-repo Consul double (in process): batching, minimal writes,
//! ownership, restart safety, outages, ACL.

mod common;

use common::desired_of;
use consul_double::{
    Access, AclConfig, Config, ConsulDouble, DefaultPolicy, Resource, Rules, Token,
};
use serde_json::{Value, json};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;
use workersd::metrics::Metrics;
use workersd::pipeline::DesiredState;
use workersd::secret::{FileSecret, Secret, TokenSource};
use workersd::sinks::consul::{ConsulClient, ConsulError, ConsulSettings, ConsulSink};

const NODE: &str = "workersd-test";
const OWNER: &str = "cluster-a";

fn settings(double: &ConsulDouble, token: Option<&str>) -> ConsulSettings {
    ConsulSettings {
        address: double.api_url(),
        token: token.map_or(TokenSource::None, |t| TokenSource::Fixed(Secret::new(t))),
        datacenter: None,
        node: NODE.into(),
        node_address: "127.0.0.1".into(),
        node_meta: Default::default(),
        owner: OWNER.into(),
        resync_interval: Duration::from_secs(60),
        request_timeout: Duration::from_secs(2),
        tls: Default::default(),
    }
}

fn sink(double: &ConsulDouble, token: Option<&str>) -> ConsulSink {
    ConsulSink::new(
        ConsulClient::new(settings(double, token)).unwrap(),
        Arc::new(Metrics::new()),
    )
}

/// `pods` targets on 10.1.x.y, each with `live` workers.
fn desired(pods: usize, live: u16, complete: bool) -> DesiredState {
    let meta = BTreeMap::from([("team".into(), "web".into())]);
    desired_with_meta(pods, live, complete, meta)
}

fn desired_with_meta(
    pods: usize,
    live: u16,
    complete: bool,
    meta: BTreeMap<String, String>,
) -> DesiredState {
    desired_of("clever", OWNER, pods, live, complete, meta)
}

async fn get(double: &ConsulDouble, path: &str) -> Value {
    workersd::tls::install_crypto_provider();
    reqwest::get(format!("{}{path}", double.api_url()))
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

async fn put(double: &ConsulDouble, path: &str, body: Value) {
    workersd::tls::install_crypto_provider();
    let response = reqwest::Client::new()
        .put(format!("{}{path}", double.api_url()))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert!(
        response.status().is_success(),
        "{path}: {}",
        response.status()
    );
}

async fn instances(double: &ConsulDouble, service: &str) -> Vec<Value> {
    get(double, &format!("/v1/catalog/service/{service}"))
        .await
        .as_array()
        .unwrap()
        .clone()
}

async fn start() -> ConsulDouble {
    ConsulDouble::start(Config::default()).await.unwrap()
}

#[tokio::test]
async fn initial_sync_is_batched_and_a_repeat_writes_nothing() {
    let double = start().await;
    let mut sink = sink(&double, None);
    let state = desired(50, 4, true); // 200 endpoints
    let outcome = sink.sync(&state).await.unwrap();
    assert_eq!(outcome.registered, 200);
    // One read, then ceil((200 + node op) / 128) = 2 transactions.
    assert_eq!(outcome.requests, 1 + 2);
    let listed = instances(&double, "clever").await;
    assert_eq!(listed.len(), 200);
    let one = &listed[0];
    assert_eq!(one["Node"], NODE);
    assert_eq!(one["NodeMeta"]["external-source"], "workersd");
    assert_eq!(one["ServiceMeta"]["external-source"], "workersd");
    assert_eq!(one["ServiceMeta"]["workersd-owner"], OWNER);
    assert_eq!(one["ServiceMeta"]["metrics-path"], "/metrics");
    assert_eq!(one["ServiceMeta"]["metrics-scheme"], "http");
    assert_eq!(one["ServiceMeta"]["team"], "web");
    assert_eq!(one["ServiceTags"], json!(["gunicorn"]));

    let again = sink.sync(&state).await.unwrap();
    assert_eq!(again.requests, 0, "no change, no request");
    // Even after re-reading Consul, an unchanged catalog costs no write.
    sink.invalidate();
    let reread = sink.sync(&state).await.unwrap();
    assert_eq!(
        (reread.requests, reread.registered, reread.deregistered),
        (1, 0, 0)
    );
}

#[tokio::test]
async fn garbage_collects_only_what_it_owns() {
    let double = start().await;
    // A foreign service on another node, a foreign entry on our node, and an entry of another
    // workersd owner sharing the node.
    put(
        &double,
        "/v1/catalog/register",
        json!({
            "Node": "other-node", "Address": "10.9.9.9",
            "Service": {"ID": "foreign-1", "Service": "clever", "Address": "10.9.9.9", "Port": 9011}
        }),
    )
    .await;
    let mut first = sink(&double, None);
    first.sync(&desired(2, 2, true)).await.unwrap();
    put(&double, "/v1/catalog/register", json!({
        "Node": NODE, "Address": "127.0.0.1", "NodeMeta": {"external-source": "workersd"},
        "Service": {"ID": "hand-made", "Service": "clever", "Address": "10.9.9.8", "Port": 1, "Meta": {"team": "ops"}}
    }))
    .await;
    put(&double, "/v1/catalog/register", json!({
        "Node": NODE, "Address": "127.0.0.1", "NodeMeta": {"external-source": "workersd"},
        "Service": {"ID": "cluster-b:clever:10.2.0.1:9011", "Service": "clever", "Address": "10.2.0.1", "Port": 9011,
                    "Meta": {"external-source": "workersd", "workersd-owner": "cluster-b"}}
    }))
    .await;
    let before = instances(&double, "clever").await;
    assert_eq!(before.len(), 4 + 3);

    // Everything of ours goes away; nothing else does.
    let mut restarted = sink(&double, None);
    let outcome = restarted.sync(&desired(0, 0, true)).await.unwrap();
    assert_eq!(outcome.deregistered, 4);
    let ids: BTreeSet<String> = instances(&double, "clever")
        .await
        .iter()
        .map(|i| i["ServiceID"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        ids,
        BTreeSet::from([
            "foreign-1".to_string(),
            "hand-made".into(),
            "cluster-b:clever:10.2.0.1:9011".into()
        ])
    );
}

#[tokio::test]
async fn a_restarted_sink_deregisters_nothing_until_targets_were_probed() {
    let double = start().await;
    sink(&double, None)
        .sync(&desired(3, 4, true))
        .await
        .unwrap();
    let mut restarted = sink(&double, None);
    // After a restart nothing is probed yet: the desired catalog is empty and incomplete.
    let outcome = restarted.sync(&desired(0, 0, false)).await.unwrap();
    assert_eq!((outcome.deregistered, outcome.deferred), (0, 12));
    assert_eq!(instances(&double, "clever").await.len(), 12);
    // Probing completes with one worker fewer per pod: exactly those go.
    let outcome = restarted.sync(&desired(3, 3, true)).await.unwrap();
    assert_eq!((outcome.registered, outcome.deregistered), (0, 3));
    assert_eq!(instances(&double, "clever").await.len(), 9);
}

/// Consul stores any int as a service port (agent/structs `NodeService.Port` is an `int`
/// with no range check): someone else's entry on our node with Port -1 or 70000 must not
/// stop workersd from reading the node, nor be touched.
#[tokio::test]
async fn foreign_entries_with_odd_ports_do_not_break_reads() {
    let double = start().await;
    let mut sink = sink(&double, None);
    sink.sync(&desired(2, 2, true)).await.unwrap();
    for (id, port) in [("odd-negative", -1), ("odd-large", 70000)] {
        put(
            &double,
            "/v1/catalog/register",
            json!({
                "Node": NODE, "Address": "127.0.0.1", "SkipNodeUpdate": true,
                "Service": {"ID": id, "Service": "clever", "Address": "10.9.9.9", "Port": port}
            }),
        )
        .await;
    }
    sink.invalidate();
    let outcome = sink.sync(&desired(2, 3, true)).await.unwrap();
    assert_eq!((outcome.registered, outcome.deregistered), (2, 0));
    let listed = instances(&double, "clever").await;
    assert_eq!(listed.len(), 6 + 2);
    let port_of = |id: &str| {
        listed
            .iter()
            .find(|i| i["ServiceID"] == id)
            .map(|i| i["ServicePort"].clone())
    };
    assert_eq!(port_of("odd-negative"), Some(json!(-1)));
    assert_eq!(port_of("odd-large"), Some(json!(70000)));
}

/// Consul before 1.14 refuses more than 64 operations per transaction: the refused batch is
/// resent in halves, and later batches are 64 at once.
#[tokio::test]
async fn an_older_consul_gets_64_operations_per_transaction() {
    let double = ConsulDouble::start(Config {
        max_txn_ops: 64,
        ..Config::default()
    })
    .await
    .unwrap();
    let mut sink = sink(&double, None);
    let outcome = sink.sync(&desired(50, 4, true)).await.unwrap();
    assert_eq!(outcome.registered, 200);
    // One read, one refused 128-op txn, then ceil((200 + node op) / 64) = 4.
    assert_eq!(outcome.requests, 1 + 1 + 4);
    assert_eq!(instances(&double, "clever").await.len(), 200);
    let outcome = sink.sync(&desired(100, 4, true)).await.unwrap();
    assert_eq!(outcome.registered, 200);
    assert_eq!(outcome.requests, 4, "no refused request the second time");
    let stats = double.stats();
    assert_eq!(stats.txn.committed, 8);
    assert_eq!(stats.requests_matching("PUT /v1/txn"), 9);
}

/// 40 meta pairs of 500 bytes: ~21 KB per entry, at Consul's per-entry limits' scale.
fn big_meta() -> BTreeMap<String, String> {
    (0..40)
        .map(|i| (format!("k{i}"), "v".repeat(500)))
        .collect()
}

/// Batches stay under Consul's 512 KiB body limit, whatever the entries weigh.
#[tokio::test]
async fn large_entries_are_batched_by_size() {
    let double = start().await;
    let mut sink = sink(&double, None);
    let outcome = sink
        .sync(&desired_with_meta(20, 4, true, big_meta()))
        .await
        .unwrap();
    assert_eq!(outcome.registered, 80);
    // One read, then ~1.7 MB of operations in txns of at most 512 KiB: four or more.
    let txns = outcome.requests - 1;
    assert!(txns >= 4, "{outcome:?}");
    assert_eq!(double.stats().txn.rejected, 0);
    assert_eq!(instances(&double, "clever").await.len(), 80);
}

/// A Consul configured with smaller `limits.txn_max_req_len` and `kv_max_value_size` (the
/// body limit is the larger of the two) refuses the first batches; the sink learns the size
/// and later passes are not refused.
#[tokio::test]
async fn a_smaller_consul_body_limit_is_learnt() {
    let double = ConsulDouble::start(Config {
        txn_max_req_len: 100 * 1024,
        kv_max_value_size: 100 * 1024,
        ..Config::default()
    })
    .await
    .unwrap();
    let mut sink = sink(&double, None);
    let outcome = sink
        .sync(&desired_with_meta(10, 4, true, big_meta()))
        .await
        .unwrap();
    assert_eq!(outcome.registered, 40);
    let refused = double.stats().txn.rejected;
    assert!(refused >= 1, "the first batch is too large");
    let outcome = sink
        .sync(&desired_with_meta(20, 4, true, big_meta()))
        .await
        .unwrap();
    assert_eq!(outcome.registered, 40);
    assert_eq!(
        double.stats().txn.rejected,
        refused,
        "nothing refused once learnt"
    );
    assert_eq!(instances(&double, "clever").await.len(), 80);
}

#[tokio::test]
async fn refills_a_consul_that_lost_its_catalog_and_survives_an_outage() {
    let double = start().await;
    let mut sink = sink(&double, None);
    let state = desired(2, 3, true);
    sink.sync(&state).await.unwrap();
    double.down().await;
    // A change while Consul is down is an `Unreachable` error, not a panic or a lost write.
    let err = sink.sync(&desired(2, 2, true)).await.unwrap_err();
    assert!(matches!(err, ConsulError::Unreachable(_)), "{err}");
    assert!(matches!(
        sink.sync(&state).await,
        Err(ConsulError::Unreachable(_))
    ));
    double.up(true).await.unwrap(); // back, but empty
    sink.invalidate();
    let outcome = sink.sync(&state).await.unwrap();
    assert_eq!(outcome.registered, 6);
    let listed = instances(&double, "clever").await;
    assert_eq!(listed.len(), 6);
    let ids: BTreeSet<&str> = listed
        .iter()
        .map(|i| i["ServiceID"].as_str().unwrap())
        .collect();
    assert_eq!(ids.len(), 6, "no duplicates");
}

/// A node-services reply cut off mid-body (a Consul restart, a proxy timeout) is a connection
/// error to retry, not a decode error and not a partial view.
#[tokio::test]
async fn a_reply_cut_off_in_transit_is_unreachable() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move {
        let (mut stream, _) = listener.accept().await.unwrap();
        let _ = stream.read(&mut [0u8; 4096]).await;
        let head =
            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 100000\r\n\r\n";
        let body = r#"{"Node":{"Node":"workersd-test","Meta":{"external-source":"workersd"}},"Services":[{"ID":"a""#;
        stream.write_all(head.as_bytes()).await.unwrap();
        stream.write_all(body.as_bytes()).await.unwrap();
        // Dropped here: the connection closes 99,900 bytes short.
    });
    let client = ConsulClient::new(ConsulSettings {
        address,
        ..settings(&start().await, None)
    })
    .unwrap();
    let err = client.read_node(&Default::default()).await.unwrap_err();
    assert!(matches!(err, ConsulError::Unreachable(_)), "{err}");
}

/// The token travels in the `X-Consul-Token` header, never in the URL (where proxies and
/// Consul's own request log would keep it), and never appears in errors or settings.
/// Real Consul answers node-services for an unknown node with 200 and nulls
/// (agent/catalog_endpoint.go); a 404 is a proxy or a wrong path. It is an error, not an
/// absent node: nothing is written on the strength of it.
#[tokio::test]
async fn a_404_from_node_services_is_an_error_not_an_absent_node() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = format!("http://{}", listener.local_addr().unwrap());
    let (seen_tx, mut seen) = tokio::sync::mpsc::unbounded_channel::<String>();
    tokio::spawn(async move {
        loop {
            let Ok((mut stream, _)) = listener.accept().await else {
                return;
            };
            let mut request = vec![0u8; 64 * 1024];
            let n = stream.read(&mut request).await.unwrap_or(0);
            let line = String::from_utf8_lossy(&request[..n])
                .lines()
                .next()
                .unwrap_or_default()
                .to_string();
            let _ = seen_tx.send(line);
            let body = "404 page not found\n";
            let reply = format!(
                "HTTP/1.1 404 Not Found\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = stream.write_all(reply.as_bytes()).await;
        }
    });
    let double = start().await;
    let mut sink = ConsulSink::new(
        ConsulClient::new(ConsulSettings {
            address,
            ..settings(&double, None)
        })
        .unwrap(),
        Arc::new(Metrics::new()),
    );
    let err = sink.sync(&desired(1, 1, true)).await.unwrap_err();
    assert!(
        matches!(
            err,
            ConsulError::Status {
                what: "node-services",
                status: 404,
                ..
            }
        ),
        "{err}"
    );
    drop(sink);
    let mut requests = Vec::new();
    while let Ok(line) = seen.try_recv() {
        requests.push(line);
    }
    assert!(
        requests.iter().all(|r| r.starts_with("GET ")),
        "nothing written: {requests:?}"
    );
}

#[tokio::test]
async fn acl_token_is_sent_and_never_shown() {
    let double = ConsulDouble::start(Config {
        acl_token: Some("s3cret-token".into()),
        ..Config::default()
    })
    .await
    .unwrap();
    // No token: the anonymous token reads nothing and may not write (409 per operation).
    let mut without = sink(&double, None);
    let err = without.sync(&desired(1, 1, true)).await.unwrap_err();
    assert!(matches!(err, ConsulError::Forbidden(_)), "{err}");
    assert!(err.to_string().contains("no token was sent"), "{err}");
    let mut wrong = sink(&double, Some("nope"));
    let err = wrong.sync(&desired(1, 1, true)).await.unwrap_err();
    assert!(matches!(err, ConsulError::Forbidden(_)), "{err}");
    assert!(err.to_string().contains("ACL not found"), "{err}");
    assert!(!err.to_string().contains("nope"));
    double.reset_stats();
    let mut with = sink(&double, Some("s3cret-token"));
    assert_eq!(with.sync(&desired(1, 1, true)).await.unwrap().registered, 1);
    assert!(!format!("{:?}", settings(&double, Some("s3cret-token"))).contains("s3cret"));
    let sources = double.stats().token_sources;
    assert_eq!(
        sources.keys().collect::<Vec<_>>(),
        ["X-Consul-Token"],
        "the token is sent in the header only: {sources:?}"
    );
    assert_eq!(sources["X-Consul-Token"], 2, "one read, one txn");
}

/// Service instances in the double, seen past its ACLs.
fn stored(double: &ConsulDouble) -> usize {
    double.with_catalog(|c| c.service_count())
}

/// Instances of `service` as the double holds them (no ACL filter in the way).
fn stored_of(double: &ConsulDouble, service: &str) -> usize {
    double.with_catalog(|c| c.instances_of(service).count())
}

fn acl(tokens: Vec<Token>) -> AclConfig {
    AclConfig {
        default_policy: DefaultPolicy::Deny,
        tokens,
        anonymous: Rules::default(),
    }
}

/// A read-only token: Consul refuses each of the 129 operations with its own `Permission
/// denied` in a 409. workersd reports it as `forbidden`, in one line naming each missing
/// permission once.
#[tokio::test]
async fn a_token_without_write_permission_is_forbidden_in_one_line() {
    let double = ConsulDouble::start(Config {
        acl: Some(acl(vec![Token::with_rules(
            "reader",
            Rules::everything(Access::Read),
        )])),
        ..Config::default()
    })
    .await
    .unwrap();
    let err = sink(&double, Some("reader"))
        .sync(&desired(40, 4, true))
        .await
        .unwrap_err();
    assert!(matches!(err, ConsulError::Forbidden(_)), "{err}");
    let text = err.to_string();
    assert!(
        text.contains(r#"lacks 'node:write' on "workersd-test", 'service:write' on "clever""#),
        "{text}"
    );
    assert!(text.contains("128 of 128 operations refused"), "{text}");
    assert_eq!(text.matches("service:write").count(), 1, "{text}");
    assert_eq!(double.stats().acl_permission_denied, 128);
    assert_eq!(stored(&double), 0);
}

/// A token that may not read our node gets `{"Node":null}` with
/// `X-Consul-Results-Filtered-By-ACLs`: that is not an absent node, and workersd must not
/// create the node (or re-register entries) over what it cannot see.
#[tokio::test]
async fn a_filtered_read_is_forbidden_not_an_empty_node() {
    let double = ConsulDouble::start(Config {
        acl: Some(acl(vec![
            Token::management("root"),
            Token::with_rules(
                "blind",
                Rules::default()
                    .with(Resource::Node, "other-", true, Access::Write)
                    .with(Resource::Service, "", true, Access::Write),
            ),
        ])),
        ..Config::default()
    })
    .await
    .unwrap();
    sink(&double, Some("root"))
        .sync(&desired(2, 2, true))
        .await
        .unwrap();
    double.reset_stats();
    let err = sink(&double, Some("blind"))
        .sync(&desired(2, 3, true))
        .await
        .unwrap_err();
    assert!(matches!(err, ConsulError::Forbidden(_)), "{err}");
    assert!(err.to_string().contains("node:read"), "{err}");
    assert_eq!(
        double.stats().requests_matching("PUT /v1/txn"),
        0,
        "nothing written over a node it cannot see"
    );
    assert_eq!(stored(&double), 4);
}

/// The token's policy loses write permission while the sink runs, then gets it back:
/// meanwhile passes fail as `forbidden` and nothing is written or removed; once restored,
/// the sink converges.
#[tokio::test]
async fn a_token_losing_and_regaining_write_permission() {
    let double = ConsulDouble::start(Config {
        acl: Some(acl(vec![Token::with_rules(
            "t",
            Rules::everything(Access::Write),
        )])),
        ..Config::default()
    })
    .await
    .unwrap();
    let mut sink = sink(&double, Some("t"));
    sink.sync(&desired(3, 3, true)).await.unwrap();
    assert!(double.set_token_rules("t", Rules::everything(Access::Read)));
    sink.invalidate();
    let err = sink.sync(&desired(3, 2, true)).await.unwrap_err();
    assert!(matches!(err, ConsulError::Forbidden(_)), "{err}");
    assert_eq!(stored(&double), 9, "nothing removed");
    assert!(double.set_token_rules("t", Rules::everything(Access::Write)));
    sink.invalidate();
    let outcome = sink.sync(&desired(3, 2, true)).await.unwrap();
    assert_eq!((outcome.registered, outcome.deregistered), (0, 3));
    assert_eq!(stored(&double), 6);
}

#[tokio::test]
async fn a_token_refused_one_service_publishes_the_others_and_says_forbidden() {
    // A prefix rule: every node and the service "clever", but not "billing".
    let rules = Rules::everything(Access::Read)
        .with(Resource::Node, "", true, Access::Write)
        .with(Resource::Service, "clever", false, Access::Write);
    let double = ConsulDouble::start(Config {
        acl: Some(acl(vec![Token::with_rules("t", rules)])),
        ..Config::default()
    })
    .await
    .unwrap();
    let mut sink = sink(&double, Some("t"));
    let meta = BTreeMap::new();
    // 130 refused entries sort before the allowed ones and fill a batch of their own.
    let mut want = desired_of("billing", OWNER, 65, 2, true, meta.clone());
    want.catalog
        .extend(desired_of("clever", OWNER, 2, 2, true, meta).catalog);
    let err = sink.sync(&want).await.unwrap_err();
    let ConsulError::Forbidden(why) = &err else {
        panic!("{err}")
    };
    assert!(
        why.contains("lacks 'service:write' on \"billing\""),
        "{why}"
    );
    assert_eq!(
        stored_of(&double, "clever"),
        4,
        "the allowed entries are published"
    );
    assert!(stored_of(&double, "billing") == 0);
    // Next pass: the refused entries wait in quarantine; still forbidden, nothing resent.
    let err = sink.sync(&want).await.unwrap_err();
    assert!(matches!(err, ConsulError::Forbidden(_)), "{err}");
    assert_eq!(stored_of(&double, "clever"), 4);
}

#[tokio::test]
async fn refuses_a_node_it_did_not_create() {
    let double = start().await;
    put(
        &double,
        "/v1/catalog/register",
        json!({"Node": NODE, "Address": "10.0.0.1", "NodeMeta": {"team": "x"}}),
    )
    .await;
    let err = sink(&double, None)
        .sync(&desired(1, 1, true))
        .await
        .unwrap_err();
    assert!(matches!(err, ConsulError::NodeNotOwned { .. }), "{err}");
    assert!(instances(&double, "clever").await.is_empty());
}

#[tokio::test]
async fn a_rotated_token_file_is_used_without_restart() {
    let double = ConsulDouble::start(Config {
        acl_token: Some("rotated-token".into()),
        ..Config::default()
    })
    .await
    .unwrap();
    let dir = std::env::temp_dir().join(format!("workersd-sink-token-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("token");
    std::fs::write(&file, "expired-token\n").unwrap();
    let settings = ConsulSettings {
        token: TokenSource::File(FileSecret::open(&file).unwrap()),
        ..settings(&double, None)
    };
    let mut sink = ConsulSink::new(
        ConsulClient::new(settings).unwrap(),
        Arc::new(Metrics::new()),
    );
    let err = sink.sync(&desired(1, 1, true)).await.unwrap_err();
    assert!(matches!(err, ConsulError::Forbidden(_)), "{err}");
    std::fs::write(&file, "rotated-token\n").unwrap();
    assert_eq!(sink.sync(&desired(1, 1, true)).await.unwrap().registered, 1);
    std::fs::remove_dir_all(dir).unwrap();
}

/// Full node-services reads (blocking watch queries excluded).
fn full_reads(double: &ConsulDouble) -> u64 {
    let stats = double.stats();
    stats.requests_matching("GET /v1/catalog/node-services") - stats.blocking_queries
}

/// Polls `check` every 20 ms for at most `limit`; returns how long it took.
async fn within(limit: Duration, what: &str, mut check: impl AsyncFnMut() -> bool) -> Duration {
    let started = std::time::Instant::now();
    while !check().await {
        assert!(started.elapsed() < limit, "{what}: not within {limit:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    started.elapsed()
}

/// The running sink re-reads Consul only when a blocking query on its node sees a change: an
/// unchanged catalog costs no read at all, while an entry deleted by hand and a wiped catalog
/// (whose index went back) are both repaired within about one resync interval.
#[tokio::test]
async fn the_running_sink_rereads_only_after_consul_changed() {
    let double = start().await;
    let resync = Duration::from_millis(300);
    let sink = ConsulSink::new(
        ConsulClient::new(ConsulSettings {
            resync_interval: resync,
            ..settings(&double, None)
        })
        .unwrap(),
        Arc::new(Metrics::new()),
    );
    let (desired_tx, desired_rx) = workersd::pipeline::desired_channel();
    desired_tx.send_replace(Arc::new(desired(3, 2, true)));
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let running = tokio::spawn(sink.run_until(desired_rx, async {
        let _ = stop_rx.await;
    }));
    within(Duration::from_secs(5), "initial sync", async || {
        instances(&double, "clever").await.len() == 6
    })
    .await;
    // Our own writes moved the index: one re-read follows, then the watch settles.
    tokio::time::sleep(resync * 3).await;
    double.reset_stats();
    tokio::time::sleep(resync * 5).await;
    let stats = double.stats();
    assert_eq!(full_reads(&double), 0, "no change, no re-read: {stats:?}");
    assert!(stats.blocking_queries >= 3, "watched: {stats:?}");
    assert_eq!(stats.requests_matching("PUT /v1/txn"), 0);

    let id = instances(&double, "clever").await[0]["ServiceID"]
        .as_str()
        .unwrap()
        .to_string();
    put(
        &double,
        "/v1/catalog/deregister",
        json!({"Node": NODE, "ServiceID": id}),
    )
    .await;
    let repaired = within(
        Duration::from_secs(3),
        "entry deleted by hand restored",
        async || instances(&double, "clever").await.len() == 6,
    )
    .await;
    assert!(full_reads(&double) >= 1);

    double.wipe();
    let refilled = within(
        Duration::from_secs(3),
        "wiped catalog refilled",
        async || instances(&double, "clever").await.len() == 6,
    )
    .await;
    println!("repaired in {repaired:?}, refilled in {refilled:?} (resync {resync:?})");
    stop_tx.send(()).unwrap();
    tokio::time::timeout(Duration::from_secs(5), running)
        .await
        .expect("stops")
        .unwrap();
}

/// One entry Consul refuses (here a `metrics-path` over Consul's 512-byte meta value limit,
/// which reaches the sink when a source lets it through) must not hold back the others: a
/// txn is atomic, so the sink isolates the refused operation, publishes every other entry
/// and the node, and holds the refused one back (not resent on every pass).
#[tokio::test]
async fn one_refused_entry_does_not_block_the_others() {
    let double = start().await;
    let mut sink = sink(&double, None);
    let mut refused = sink.refused();
    let mut state = desired(30, 4, true); // 120 entries: one txn with the node op
    let poisoned = state.catalog.keys().nth(17).unwrap().clone();
    let entry = Arc::make_mut(state.catalog.get_mut(&poisoned).unwrap());
    let mut meta = (*entry.meta).clone();
    meta.insert("metrics-path".into(), format!("/{}", "m".repeat(600)));
    entry.meta = Arc::new(meta);

    let outcome = sink.sync(&state).await.unwrap();
    assert_eq!(outcome.registered, 119, "{outcome:?}");
    assert_eq!(outcome.quarantined, 1, "{outcome:?}");
    let listed = instances(&double, "clever").await;
    assert_eq!(listed.len(), 119);
    assert!(listed.iter().all(|i| i["ServiceID"] != *poisoned));
    assert_eq!(listed[0]["NodeMeta"]["external-source"], "workersd");
    // Published for Events: the entry, with Consul's reason.
    assert!(refused.has_changed().unwrap());
    {
        let held = refused.borrow_and_update();
        assert_eq!(held.len(), 1);
        assert_eq!(held[0].instance.id, poisoned);
        assert!(held[0].error.contains("metrics-path"), "{}", held[0].error);
    }

    // The refused entry is held back: another pass sends nothing, and announces nothing new.
    let again = sink.sync(&state).await.unwrap();
    assert_eq!((again.requests, again.quarantined), (0, 1), "{again:?}");
    assert!(!refused.has_changed().unwrap());
    // Once its declaration is fixed it is published at once, and leaves the refused set.
    let fixed = desired(30, 4, true);
    let outcome = sink.sync(&fixed).await.unwrap();
    assert_eq!((outcome.registered, outcome.quarantined), (1, 0));
    assert_eq!(instances(&double, "clever").await.len(), 120);
    assert!(refused.has_changed().unwrap());
    assert!(refused.borrow_and_update().is_empty());
}

/// Consul matches service IDs case-insensitively. A case-only change of the service name
/// or of the owner id must leave every entry published, on Consul 1.15-1.20 (where a set
/// and a delete of the same row in one txn delete what was just written) and on the newest
/// Consul (which refuses to rename a service through its ID).
#[tokio::test]
async fn a_case_only_rename_keeps_every_entry() {
    let meta = || BTreeMap::from([("team".to_string(), "web".to_string())]);
    for newest in [false, true] {
        let double = ConsulDouble::start(Config {
            reject_txn_service_rename: newest,
            ..Config::default()
        })
        .await
        .unwrap();
        let sink = |owner: &str| {
            ConsulSink::new(
                ConsulClient::new(ConsulSettings {
                    owner: owner.into(),
                    ..settings(&double, None)
                })
                .unwrap(),
                Arc::new(Metrics::new()),
            )
        };
        let mut first = sink("Cluster-A");
        first
            .sync(&desired_of("Clever", "Cluster-A", 3, 2, true, meta()))
            .await
            .unwrap();
        assert_eq!(instances(&double, "clever").await.len(), 6);
        // The service is renamed `clever`, then the owner id becomes `cluster-a`.
        first
            .sync(&desired_of("clever", "Cluster-A", 3, 2, true, meta()))
            .await
            .unwrap();
        let listed = instances(&double, "clever").await;
        assert_eq!(listed.len(), 6, "newest={newest}: {listed:?}");
        assert!(listed.iter().all(|i| i["ServiceName"] == "clever"));
        let mut renamed = sink("cluster-a");
        let state = desired_of("clever", "cluster-a", 3, 2, true, meta());
        renamed.sync(&state).await.unwrap();
        let listed = instances(&double, "clever").await;
        assert_eq!(listed.len(), 6, "newest={newest}: {listed:?}");
        assert!(
            listed
                .iter()
                .all(|i| i["ServiceMeta"]["workersd-owner"] == "cluster-a")
        );
        // Nothing left to do after a re-read.
        renamed.invalidate();
        let again = renamed.sync(&state).await.unwrap();
        assert_eq!((again.registered, again.deregistered), (0, 0), "{again:?}");
    }
}

/// The synthetic node is created only if absent (`cas` at ModifyIndex 0): a node of that name
/// created by someone else between the sink's read and its write is never taken over.
#[tokio::test]
async fn a_node_created_meanwhile_by_someone_else_is_not_taken_over() {
    let double = start().await;
    let mut sink = sink(&double, None);
    // The sink reads Consul (no node yet) and has nothing to write.
    let outcome = sink.sync(&desired(0, 0, false)).await.unwrap();
    assert_eq!(outcome.requests, 1);
    put(
        &double,
        "/v1/catalog/register",
        json!({"Node": NODE, "Address": "10.0.0.9", "NodeMeta": {"team": "x"}}),
    )
    .await;
    let err = sink.sync(&desired(1, 1, true)).await.unwrap_err();
    assert!(
        err.to_string().contains("index is stale"),
        "refused, not overwritten: {err}"
    );
    let node = get(&double, &format!("/v1/catalog/node/{NODE}")).await;
    assert_eq!(node["Node"]["Meta"], json!({"team": "x"}));
    assert_eq!(node["Node"]["Address"], "10.0.0.9");
    assert!(instances(&double, "clever").await.is_empty());
    // The re-read then sees whose node it is.
    let err = sink.sync(&desired(1, 1, true)).await.unwrap_err();
    assert!(matches!(err, ConsulError::NodeNotOwned { .. }), "{err}");
}

/// Owned entries are deleted with `delete-cas` at the ModifyIndex the sink knows: an entry
/// that someone else re-registered under the same ID since (now not ours) is never deleted.
#[tokio::test]
async fn an_entry_taken_over_meanwhile_is_not_deleted() {
    let double = start().await;
    let mut sink = sink(&double, None);
    sink.sync(&desired(1, 2, true)).await.unwrap();
    let listed = instances(&double, "clever").await;
    assert_eq!(listed.len(), 2);
    let taken = listed[1]["ServiceID"].as_str().unwrap().to_string();
    // Someone registers their own service under that ID (no workersd meta).
    put(&double, "/v1/catalog/register", json!({
        "Node": NODE, "Address": "127.0.0.1", "SkipNodeUpdate": true,
        "Service": {"ID": taken, "Service": "clever", "Address": "10.9.9.9", "Port": 1, "Meta": {"team": "ops"}}
    }))
    .await;
    // The worker behind that ID is gone: the sink's stale view says the entry is its own.
    let gone = desired(1, 1, true);
    assert!(!gone.catalog.contains_key(taken.as_str()));
    let first = sink.sync(&gone).await;
    assert!(
        first
            .as_ref()
            .is_err_and(|e| e.to_string().contains("index is stale")),
        "{first:?}"
    );
    // After the re-read the entry is someone else's and is left alone.
    let outcome = sink.sync(&gone).await.unwrap();
    assert_eq!(outcome.deregistered, 0, "{outcome:?}");
    let listed = instances(&double, "clever").await;
    let kept = listed.iter().find(|i| i["ServiceID"] == *taken).unwrap();
    assert_eq!(kept["ServiceMeta"], json!({"team": "ops"}));
}

/// Writes are conditional on what the sink read, as deletes are: an ID someone else took
/// since the read (a new one, or one of ours they re-registered) is refused by Consul
/// ("index is stale") instead of being overwritten, and left alone after the re-read.
#[tokio::test]
async fn an_entry_registered_meanwhile_by_someone_else_is_not_overwritten() {
    let double = start().await;
    let mut sink = sink(&double, None);
    let before = desired(1, 1, true);
    sink.sync(&before).await.unwrap();
    // The worker on the next port starts, but someone else registers that ID first.
    let changed = desired_with_meta(1, 2, true, BTreeMap::from([("team".into(), "new".into())]));
    let new_id = changed
        .catalog
        .keys()
        .find(|id| !before.catalog.contains_key(*id))
        .unwrap()
        .to_string();
    put(&double, "/v1/catalog/register", json!({
        "Node": NODE, "Address": "127.0.0.1", "SkipNodeUpdate": true,
        "Service": {"ID": new_id, "Service": "clever", "Address": "10.9.9.9", "Port": 1, "Meta": {"team": "ops"}}
    }))
    .await;
    // An entry of ours re-registered by someone else since the read, while our copy changes.
    let ours = instances(&double, "clever").await;
    let retaken = ours.iter().find(|i| i["ServiceID"] != *new_id).unwrap()["ServiceID"]
        .as_str()
        .unwrap()
        .to_string();
    put(&double, "/v1/catalog/register", json!({
        "Node": NODE, "Address": "127.0.0.1", "SkipNodeUpdate": true,
        "Service": {"ID": retaken, "Service": "clever", "Address": "10.9.9.8", "Port": 2, "Meta": {"team": "ops"}}
    }))
    .await;
    let first = sink.sync(&changed).await;
    assert!(
        first
            .as_ref()
            .is_err_and(|e| e.to_string().contains("index is stale")),
        "{first:?}"
    );
    // After the re-read both are someone else's: conflicts, never overwritten.
    sink.sync(&changed).await.unwrap();
    let listed = instances(&double, "clever").await;
    for id in [&new_id, &retaken] {
        let kept = listed.iter().find(|i| i["ServiceID"] == **id).unwrap();
        assert_eq!(kept["ServiceMeta"], json!({"team": "ops"}), "{id}");
    }
}

/// Consul's rate limiter (enforcing mode) refuses writes over the limit with 503 on the
/// leader and 429 elsewhere: the running sink backs off (jittered) and converges without
/// hammering Consul.
#[tokio::test]
async fn a_rate_limited_consul_is_backed_off_from() {
    for leader in [true, false] {
        let double = ConsulDouble::start(Config {
            write_rate_limit: Some(consul_double::WriteRateLimit {
                per_second: 4.0,
                burst: 1.0,
                leader,
            }),
            ..Config::default()
        })
        .await
        .unwrap();
        let sink = ConsulSink::new(
            ConsulClient::new(settings(&double, None)).unwrap(),
            Arc::new(Metrics::new()),
        );
        let (desired_tx, desired_rx) = workersd::pipeline::desired_channel();
        desired_tx.send_replace(Arc::new(desired(100, 4, true))); // 400 entries: 4 txns
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let running = tokio::spawn(sink.run_until(desired_rx, async {
            let _ = stop_rx.await;
        }));
        within(Duration::from_secs(10), "converged", async || {
            instances(&double, "clever").await.len() == 400
        })
        .await;
        let stats = double.stats();
        let status: u16 = if leader { 503 } else { 429 };
        let refused = stats
            .responses
            .get("PUT /v1/txn")
            .and_then(|r| r.get(&status))
            .copied()
            .unwrap_or(0);
        println!("leader={leader}: {refused} writes refused with {status} before converging");
        assert!(
            refused >= 1,
            "leader={leader}: the limit was hit: {stats:?}"
        );
        assert!(refused <= 20, "leader={leader}: backed off: {stats:?}");
        stop_tx.send(()).unwrap();
        running.await.unwrap();
    }
}

/// Node-local mode's janitor: it finds a cluster's nodes by their meta, and retiring one
/// removes our entries and then the node; an entry of anyone else keeps the node and stays.
#[tokio::test]
async fn a_retired_node_loses_our_entries_then_itself_unless_someone_else_is_on_it() {
    let double = start().await;
    let metrics = Arc::new(Metrics::new());
    for k8s_node in ["n1", "n2"] {
        let node = format!("workersd-prod_{k8s_node}");
        let settings = ConsulSettings {
            node: node.clone(),
            owner: node.clone(),
            node_meta: BTreeMap::from([
                ("workersd-cluster".into(), "prod".into()),
                ("workersd-k8s-node".into(), k8s_node.into()),
            ]),
            ..settings(&double, None)
        };
        let mut sink = ConsulSink::new(ConsulClient::new(settings).unwrap(), metrics.clone());
        let entries = desired_of("clever", &node, 2, 2, true, BTreeMap::new());
        assert_eq!(sink.sync(&entries).await.unwrap().registered, 4);
    }
    put(&double, "/v1/catalog/register", json!({
        "Node": "workersd-prod_n2", "Address": "127.0.0.1",
        "NodeMeta": {"external-source": "workersd", "workersd-cluster": "prod", "workersd-k8s-node": "n2"},
        "Service": {"ID": "hand-made", "Service": "clever", "Address": "10.9.9.8", "Port": 1}
    }))
    .await;
    // Deployment mode's node of the same cluster, and another cluster's node.
    sink(&double, None)
        .sync(&desired(1, 1, true))
        .await
        .unwrap();

    let base = ConsulClient::new(settings(&double, None)).unwrap();
    let found = base
        .nodes_with_meta(&[
            ("external-source", "workersd"),
            ("workersd-cluster", "prod"),
        ])
        .await
        .unwrap();
    let names: Vec<&str> = found.iter().map(|n| n.name.as_str()).collect();
    assert_eq!(names, ["workersd-prod_n1", "workersd-prod_n2"]);
    assert_eq!(found[1].meta["workersd-k8s-node"], "n2");

    let mut n1 = ConsulSink::new(base.for_node("workersd-prod_n1"), metrics.clone());
    let retired = n1.retire().await.unwrap();
    assert_eq!(
        (retired.deregistered, retired.node_removed, retired.others),
        (4, true, 0)
    );
    let mut n2 = ConsulSink::new(base.for_node("workersd-prod_n2"), metrics.clone());
    let retired = n2.retire().await.unwrap();
    assert_eq!(
        (retired.deregistered, retired.node_removed, retired.others),
        (4, false, 1)
    );

    let nodes: BTreeSet<String> = get(&double, "/v1/catalog/nodes")
        .await
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["Node"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        nodes,
        BTreeSet::from([NODE.to_string(), "workersd-prod_n2".into()])
    );
    let left: BTreeSet<String> = instances(&double, "clever")
        .await
        .iter()
        .map(|i| i["ServiceID"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(left.len(), 2, "{left:?}");
    assert!(left.contains("hand-made"), "{left:?}");
}
