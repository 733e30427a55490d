//! Every boundary of transaction sizing and splitting, without HTTP.

use super::*;
use crate::model::ServiceInstance;
use std::sync::Arc;

/// Operation `i` encoded in `len` bytes: the number padded with spaces, so bodies stay JSON.
fn op(i: usize, len: usize) -> Vec<u8> {
    let mut encoded = i.to_string().into_bytes();
    assert!(encoded.len() <= len, "op {i} needs more than {len} bytes");
    encoded.resize(len, b' ');
    encoded
}

/// A batch of operations of the given encoded sizes, numbered from 0.
fn sized(lens: &[usize]) -> Batch<'static> {
    let mut batch = Batch::default();
    for (i, len) in lens.iter().enumerate() {
        batch.push(op(i, *len), None);
    }
    batch
}

/// `n` operations of `len` bytes each.
fn batch(n: usize, len: usize) -> Batch<'static> {
    sized(&vec![len; n])
}

/// Operations per piece after splitting.
fn pieces(batch: Batch<'_>, limits: &TxnLimits) -> Vec<usize> {
    batch.split(limits).iter().map(|p| p.ops.len()).collect()
}

fn limits(ops: usize, bytes: usize) -> TxnLimits {
    TxnLimits { ops, bytes }
}

/// Consul's 413 with `body`.
fn status_413(body: &str) -> ConsulError {
    ConsulError::Status {
        what: "txn",
        status: 413,
        body: body.into(),
    }
}

const TOO_MANY: &str = "Transaction contains too many operations (129 > 128)";
const TOO_LARGE: &str = "Request body too large, max size: 524288 bytes";

#[test]
fn the_limits_start_at_what_current_consul_accepts() {
    assert_eq!(TxnLimits::default(), limits(128, 512 * 1024));
    assert_eq!((MAX_TXN_OPS, LEGACY_MAX_TXN_OPS), (128, 64));
}

#[test]
fn the_body_length_is_known_without_building_the_body() {
    let empty = Batch::default();
    assert_eq!(empty.body(), b"[]");
    assert_eq!(empty.body_len(), 2);
    assert_eq!(empty.body_len_with(5), 7, "[xxxxx]");
    let mut batch = Batch::default();
    for n in 1..=4 {
        let expected = batch.body_len_with(5);
        batch.push(op(n, 5), None);
        assert_eq!(batch.body_len(), expected, "{n} ops");
        assert_eq!(batch.body().len(), batch.body_len(), "{n} ops");
        // Brackets, the operations and one comma between each two.
        assert_eq!(batch.body_len(), 2 + 5 * n + (n - 1));
    }
    assert_eq!(batch.body(), b"[1    ,2    ,3    ,4    ]");
}

#[test]
fn exactly_128_operations_are_one_transaction_and_129_are_two() {
    let limits = TxnLimits::default();
    assert!(limits.fit(&batch(127, 3), 3), "the 128th fits");
    assert!(!limits.fit(&batch(128, 3), 3), "the 129th does not");
    assert_eq!(pieces(batch(128, 3), &limits), vec![128]);
    assert_eq!(pieces(batch(129, 3), &limits), vec![128, 1]);
    assert_eq!(pieces(batch(256, 3), &limits), vec![128, 128]);
    assert_eq!(pieces(batch(257, 3), &limits), vec![128, 128, 1]);
}

#[test]
fn legacy_consul_takes_64_operations_per_transaction() {
    let legacy = limits(LEGACY_MAX_TXN_OPS, MAX_TXN_BYTES);
    assert!(legacy.fit(&batch(63, 3), 3));
    assert!(!legacy.fit(&batch(64, 3), 3));
    assert_eq!(pieces(batch(64, 3), &legacy), vec![64]);
    assert_eq!(pieces(batch(65, 3), &legacy), vec![64, 1]);
    assert_eq!(pieces(batch(129, 3), &legacy), vec![64, 64, 1]);
}

#[test]
fn a_body_of_exactly_the_byte_limit_fits_and_one_byte_more_does_not() {
    // Three operations of 10 bytes: 2 brackets + 30 + 2 commas.
    let exact = 34;
    let two = batch(2, 10);
    assert!(limits(128, exact).fit(&two, 10));
    assert!(!limits(128, exact - 1).fit(&two, 10));
    assert!(!limits(128, exact).fit(&two, 11));
    assert_eq!(pieces(batch(3, 10), &limits(128, exact)), vec![3]);
    assert_eq!(pieces(batch(3, 10), &limits(128, exact - 1)), vec![2, 1]);
    // Whichever limit is reached first cuts the batch.
    assert_eq!(pieces(batch(3, 10), &limits(2, exact)), vec![2, 1]);
}

#[test]
fn an_operation_larger_than_the_byte_limit_goes_alone() {
    let small = limits(128, 20);
    assert_eq!(pieces(sized(&[50]), &small), vec![1]);
    assert_eq!(pieces(sized(&[5, 50, 5, 5]), &small), vec![1, 1, 2]);
    assert_eq!(pieces(sized(&[50, 5]), &small), vec![1, 1]);
    assert_eq!(pieces(sized(&[50, 50]), &small), vec![1, 1]);
    let split = sized(&[5, 50, 5]).split(&small);
    assert_eq!(split[1].body_len(), 52, "sent as it is; Consul decides");
}

#[test]
fn splitting_keeps_every_operation_in_order() {
    let lens: Vec<usize> = (0..300).map(|i| 3 + i % 40).collect();
    let whole: Vec<u64> = serde_json::from_slice(&sized(&lens).body()).unwrap();
    assert_eq!(whole, (0..300).collect::<Vec<u64>>());
    for limits in [limits(128, 4096), limits(64, 1000), limits(7, 100)] {
        let split = sized(&lens).split(&limits);
        let mut rejoined: Vec<u64> = Vec::new();
        for piece in &split {
            assert!(!piece.ops.is_empty());
            assert!(piece.ops.len() <= limits.ops, "{limits:?}");
            assert!(piece.body_len() <= limits.bytes, "{limits:?}");
            rejoined.extend(serde_json::from_slice::<Vec<u64>>(&piece.body()).unwrap());
        }
        assert_eq!(rejoined, whole, "{limits:?}");
    }
}

#[test]
fn too_many_operations_lowers_the_limit_to_64_once() {
    let mut current = TxnLimits::default();
    assert!(current.shrink(&status_413(TOO_MANY), &batch(128, 3)));
    assert_eq!(current, limits(64, MAX_TXN_BYTES), "bytes unchanged");
    assert_eq!(pieces(batch(128, 3), &current), vec![64, 64]);
    // A batch cut before the limit was lowered is split without lowering it further.
    assert!(current.shrink(&status_413(TOO_MANY), &batch(128, 3)));
    assert_eq!(current.ops, 64);
    // A batch within the legacy limit refused all the same: splitting cannot help.
    assert!(!current.shrink(&status_413(TOO_MANY), &batch(64, 3)));
    assert_eq!(current.ops, 64);
}

#[test]
fn too_many_operations_at_the_boundaries() {
    // A batch of exactly the limit is lowered; one over it was cut under an older limit.
    let mut at = limits(100, MAX_TXN_BYTES);
    assert!(at.shrink(&status_413(TOO_MANY), &batch(100, 3)));
    assert_eq!(at.ops, 64);
    let mut over = limits(100, MAX_TXN_BYTES);
    assert!(over.shrink(&status_413(TOO_MANY), &batch(101, 3)));
    assert_eq!(over.ops, 100);
    // 65 can still go down to 64; 64 cannot.
    let mut above_legacy = limits(65, MAX_TXN_BYTES);
    assert!(above_legacy.shrink(&status_413(TOO_MANY), &batch(65, 3)));
    assert_eq!(above_legacy.ops, 64);
    let mut below_legacy = limits(10, MAX_TXN_BYTES);
    assert!(!below_legacy.shrink(&status_413(TOO_MANY), &batch(10, 3)));
    assert_eq!(below_legacy.ops, 10);
}

#[test]
fn too_large_halves_the_byte_limit_to_the_refused_body() {
    // Four operations of 10 bytes: a body of 2 + 40 + 3.
    let refused = batch(4, 10);
    assert_eq!(refused.body_len(), 45);
    let mut big = limits(128, MAX_TXN_BYTES);
    assert!(big.shrink(&status_413(TOO_LARGE), &refused));
    assert_eq!(big, limits(128, 22), "ops unchanged");
    assert_eq!(pieces(batch(4, 10), &big), vec![1, 1, 1, 1]);
    let mut exact = limits(128, 45);
    assert!(exact.shrink(&status_413(TOO_LARGE), &refused));
    assert_eq!(exact.bytes, 22);
    // Cut before the limit was lowered: split again at the current one.
    let mut lower = limits(128, 44);
    assert!(lower.shrink(&status_413(TOO_LARGE), &refused));
    assert_eq!(lower.bytes, 44);
    assert_eq!(pieces(batch(4, 10), &lower), vec![3, 1]);
}

#[test]
fn only_a_413_about_size_of_more_than_one_operation_shrinks() {
    let unchanged = TxnLimits::default();
    let mut current = TxnLimits::default();
    // A single operation cannot be split (the sink quarantines it instead).
    assert!(!current.shrink(&status_413(TOO_MANY), &batch(1, 3)));
    assert!(!current.shrink(&status_413(TOO_LARGE), &batch(1, 3)));
    assert!(!current.shrink(&status_413("something else"), &batch(2, 3)));
    let other_status = ConsulError::Status {
        what: "txn",
        status: 500,
        body: TOO_MANY.into(),
    };
    assert!(!current.shrink(&other_status, &batch(2, 3)));
    let rejected = ConsulError::TxnRejected {
        status: 409,
        errors: TOO_LARGE.into(),
        failed: vec![(0, TOO_LARGE.into())],
    };
    assert!(!current.shrink(&rejected, &batch(2, 3)));
    assert_eq!(current, unchanged);
}

fn instance() -> Arc<ServiceInstance> {
    Arc::new(ServiceInstance {
        id: "o:web:10.0.0.1:9011".into(),
        service: "web".into(),
        address: "10.0.0.1".into(),
        port: 9011,
        tags: vec!["t".into()],
        meta: Arc::new(BTreeMap::from([("team".into(), "a".into())])),
    })
}

#[test]
fn the_node_is_created_only_if_still_absent() {
    assert_eq!(
        node_op("n", "127.0.0.1", &BTreeMap::new(), None),
        json!({ "Node": { "Verb": "cas", "Node": {
            "Node": "n", "Address": "127.0.0.1", "ModifyIndex": 0,
            "Meta": { "external-source": "workersd" },
        }}})
    );
    let in_dc = node_op("n", "127.0.0.1", &BTreeMap::new(), Some("dc2"));
    assert_eq!(in_dc["Node"]["Node"]["Datacenter"], "dc2");
}

#[test]
fn the_node_carries_the_extra_meta_and_is_always_marked_as_ours() {
    let meta = BTreeMap::from([
        ("workersd-cluster".to_string(), "prod".to_string()),
        ("external-source".to_string(), "someone-else".to_string()),
    ]);
    let op = node_op("n", "127.0.0.1", &meta, None);
    assert_eq!(
        op["Node"]["Node"]["Meta"],
        json!({ "workersd-cluster": "prod", "external-source": "workersd" })
    );
}

#[test]
fn entries_are_set_and_deleted_only_at_the_index_read() {
    assert_eq!(
        service_op("n", &Op::Register(instance()), 7),
        json!({ "Service": { "Verb": "cas", "Node": "n", "Service": {
            "ID": "o:web:10.0.0.1:9011", "Service": "web", "Address": "10.0.0.1", "Port": 9011,
            "Tags": ["t"], "Meta": { "team": "a", "worker-port": "9011" }, "ModifyIndex": 7,
        }}})
    );
    assert_eq!(
        service_op("n", &Op::Register(instance()), 0)["Service"]["Service"]["ModifyIndex"],
        0,
        "a new entry is created only if still absent"
    );
    assert_eq!(
        service_op("n", &Op::Deregister(instance()), 7),
        json!({ "Service": { "Verb": "delete-cas", "Node": "n", "Service": {
            "ID": "o:web:10.0.0.1:9011", "Service": "web", "ModifyIndex": 7,
        }}})
    );
    let encoded = encode(&service_op("n", &Op::Deregister(instance()), 7));
    assert_eq!(
        serde_json::from_slice::<serde_json::Value>(&encoded).unwrap(),
        service_op("n", &Op::Deregister(instance()), 7)
    );
}

#[test]
fn batches_encode_as_arrays_and_split_within_limits() {
    let mut batch = Batch::default();
    for i in 0..10 {
        batch.push(encode(&json!({ "op": "x".repeat(i * 10) })), None);
    }
    let body = batch.body();
    assert_eq!(body.len(), batch.body_len());
    let decoded: Vec<serde_json::Value> = serde_json::from_slice(&body).unwrap();
    assert_eq!(decoded.len(), 10);
    let limits = TxnLimits { ops: 4, bytes: 200 };
    let pieces = batch.split(&limits);
    assert!(pieces.len() >= 3);
    assert_eq!(pieces.iter().map(|p| p.ops.len()).sum::<usize>(), 10);
    for piece in &pieces {
        assert!(piece.ops.len() <= 4);
        // A piece over the byte limit holds a single operation that alone exceeds it.
        assert!(piece.body_len() <= 200 || piece.ops.len() == 1);
    }
    // Order is kept.
    let rejoined: Vec<serde_json::Value> = pieces
        .iter()
        .flat_map(|p| serde_json::from_slice::<Vec<serde_json::Value>>(&p.body()).unwrap())
        .collect();
    assert_eq!(rejoined, decoded);
}
