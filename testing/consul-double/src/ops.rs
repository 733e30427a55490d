//! Consul's write semantics, independent of HTTP: the pre-apply checks of
//! the server RPC layer followed by the state-store operations, for
//! `/v1/catalog/register`, `/v1/catalog/deregister` and `/v1/txn`.

use crate::acl::{Access, Authorizer, Resource};
use crate::model::{
    CheckInput, CheckRecord, DeregisterRequest, NodeInput, RegisterRequest, ServiceInput,
    ServiceRecord, TxnError, TxnOpInput, TxnResult, Weights,
};
use crate::store::{Catalog, NodeSpec, WriteTxn};

/// Consul's `ipaddr.IsAny`.
fn is_any_address(address: &str) -> bool {
    matches!(address, "0.0.0.0" | "::" | "[::]")
}

/// Validates the textual form `go-uuid`'s `ParseUUID` accepts.
fn validate_uuid(id: &str) -> Result<(), String> {
    if id.len() != 36 {
        return Err("uuid string is wrong length".into());
    }
    let well_formed = id.bytes().enumerate().all(|(i, b)| match i {
        8 | 13 | 18 | 23 => b == b'-',
        _ => b.is_ascii_hexdigit(),
    });
    if well_formed {
        Ok(())
    } else {
        Err("uuid is improperly formatted".into())
    }
}

/// Consul's `nodePreApply`.
fn node_pre_apply(name: &str, id: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("Must provide node".into());
    }
    if !id.is_empty() {
        validate_uuid(id).map_err(|e| format!("Bad node ID: {e}"))?;
    }
    Ok(())
}

/// Consul's `servicePreApply`: defaults the ID to the name, requires a name
/// whenever an ID is given (delete ops included), rejects "any" addresses.
fn service_pre_apply(service: &mut ServiceInput) -> Result<(), String> {
    let name = service.service.clone().unwrap_or_default();
    let id = service.id.clone().unwrap_or_default();
    if id.is_empty() && !name.is_empty() {
        service.id = Some(name.clone());
    }
    if !id.is_empty() && name.is_empty() {
        return Err(
            "Must provide service name (Service.Service) when service ID is provided".into(),
        );
    }
    if service.id.as_deref().unwrap_or_default().is_empty() {
        // Consul would store a nameless, ID-less instance; refusing is kinder.
        return Err("Must provide service name (Service.Service)".into());
    }
    if is_any_address(service.address.as_deref().unwrap_or_default()) {
        return Err("Invalid service address".into());
    }
    Ok(())
}

/// `with_tagged_addresses` is false for txn ops: Consul's txn endpoint does
/// not copy `Service.TaggedAddresses` into the operation.
fn service_record(input: &ServiceInput, with_tagged_addresses: bool) -> ServiceRecord {
    ServiceRecord {
        kind: input.kind.clone().unwrap_or_default(),
        id: input.id.clone().unwrap_or_default(),
        service: input.service.clone().unwrap_or_default(),
        tags: input.tags.clone().unwrap_or_default(),
        address: input.address.clone().unwrap_or_default(),
        tagged_addresses: if with_tagged_addresses {
            input.tagged_addresses.clone()
        } else {
            None
        },
        meta: input.meta.clone(),
        port: input.port.unwrap_or_default(),
        weights: Weights::normalized(input.weights.as_ref()),
        enable_tag_override: input.enable_tag_override.unwrap_or_default(),
        mesh: Default::default(),
        create_index: 0,
        modify_index: 0,
    }
}

fn check_record(input: &CheckInput, default_node: &str) -> CheckRecord {
    let check_id = match input.check_id.as_deref() {
        Some(id) if !id.is_empty() => id.to_string(),
        _ => input.name.clone().unwrap_or_default(),
    };
    CheckRecord {
        node: match input.node.as_deref() {
            Some(node) if !node.is_empty() => node.to_string(),
            _ => default_node.to_string(),
        },
        check_id,
        name: input.name.clone().unwrap_or_default(),
        status: input.status.clone().unwrap_or_default(),
        notes: input.notes.clone().unwrap_or_default(),
        output: input.output.clone().unwrap_or_default(),
        service_id: input.service_id.clone().unwrap_or_default(),
        service_name: input.service_name.clone().unwrap_or_default(),
        service_tags: Vec::new(),
        check_type: input.check_type.clone().unwrap_or_default(),
        definition: input
            .definition
            .clone()
            .unwrap_or_else(|| serde_json::Value::Object(Default::default())),
        create_index: 0,
        modify_index: 0,
    }
}

fn node_spec(input: &NodeInput, default_dc: &str) -> NodeSpec {
    NodeSpec {
        id: input.id.clone().unwrap_or_default(),
        node: input.node.clone().unwrap_or_default(),
        address: input.address.clone().unwrap_or_default(),
        datacenter: match input.datacenter.as_deref() {
            Some(dc) if !dc.is_empty() => dc.to_string(),
            _ => default_dc.to_string(),
        },
        tagged_addresses: input.tagged_addresses.clone(),
        meta: input.meta.clone(),
    }
}

/// Applies a catalog registration atomically. Errors carry Consul's text;
/// Consul reports them as HTTP 500 (they are RPC errors).
pub fn register(
    catalog: &mut Catalog,
    mut req: RegisterRequest,
    default_dc: &str,
) -> Result<Option<u64>, String> {
    let node_name = req.node.clone().unwrap_or_default();
    node_pre_apply(&node_name, req.id.as_deref().unwrap_or_default())?;
    let skip_node_update = req.skip_node_update.unwrap_or(false);
    if req.address.as_deref().unwrap_or_default().is_empty() && !skip_node_update {
        return Err("Must provide address if SkipNodeUpdate is not set".into());
    }
    if let Some(service) = req.service.as_mut() {
        service_pre_apply(service)?;
    }
    let mut checks: Vec<CheckInput> = req.checks.take().unwrap_or_default();
    if let Some(check) = req.check.take() {
        checks.push(check);
    }
    for check in &checks {
        let check_node = check.node.as_deref().unwrap_or_default();
        if !check_node.is_empty() && !check_node.eq_ignore_ascii_case(&node_name) {
            return Err(format!(
                "Node '{}' for check '{}' doesn't match register request node '{}'",
                check_node,
                check.check_id.as_deref().unwrap_or_default(),
                node_name
            ));
        }
    }

    let mut tx = WriteTxn::begin(catalog);
    let result = (|| {
        let exists = tx.catalog().node(&node_name).is_some();
        if !skip_node_update || !exists {
            let spec = NodeSpec {
                id: req.id.clone().unwrap_or_default(),
                node: node_name.clone(),
                address: req.address.clone().unwrap_or_default(),
                datacenter: match req.datacenter.as_deref() {
                    Some(dc) if !dc.is_empty() => dc.to_string(),
                    _ => default_dc.to_string(),
                },
                tagged_addresses: req.tagged_addresses.clone(),
                meta: req.node_meta.clone(),
            };
            tx.set_node(spec)
                .map_err(|e| format!("failed inserting node: {e}"))?;
        }
        if let Some(service) = &req.service {
            tx.set_service(&node_name, service_record(service, true))
                .map_err(|e| format!("failed inserting service: {e}"))?;
        }
        for check in &checks {
            tx.set_check(check_record(check, &node_name))
                .map_err(|e| format!("failed inserting check: {e}"))?;
        }
        Ok(())
    })();
    match result {
        Ok(()) => Ok(tx.commit()),
        Err(e) => {
            tx.rollback();
            Err(e)
        }
    }
}

/// Applies a catalog deregistration: a service (and its checks), else a
/// check, else the whole node. Unknown targets are a successful no-op.
pub fn deregister(catalog: &mut Catalog, req: &DeregisterRequest) -> Result<Option<u64>, String> {
    let node = req.node.as_deref().unwrap_or_default();
    if node.is_empty() {
        return Err("Must provide node".into());
    }
    let mut tx = WriteTxn::begin(catalog);
    match (req.service_id.as_deref(), req.check_id.as_deref()) {
        (Some(service_id), _) if !service_id.is_empty() => tx.delete_service(node, service_id),
        (_, Some(check_id)) if !check_id.is_empty() => tx.delete_check(node, check_id),
        _ => tx.delete_node(node),
    }
    Ok(tx.commit())
}

/// A txn operation after the HTTP layer's conversion and the server's
/// pre-checks.
enum PreparedOp {
    Node {
        verb: String,
        node: NodeInput,
    },
    Service {
        verb: String,
        node: String,
        service: ServiceInput,
    },
    Check {
        verb: String,
        check: CheckInput,
    },
}

const VERBS: [&str; 5] = ["set", "cas", "get", "delete", "delete-cas"];

pub struct TxnPlan {
    ops: Vec<PreparedOp>,
    pub writes: usize,
}

/// Converts and pre-checks txn ops (Consul's `convertOps` + `Txn.preCheck`).
/// Any error here rejects the whole txn before anything is applied. Each
/// write op that passes validation is then vetted against the token
/// (agent/consul/txn_endpoint.go `vetNodeTxnOp`, `vetServiceTxnOp`,
/// `vetCheckTxnOp`): one `Permission denied: …` error per op refused.
pub fn prepare_txn(ops: Vec<TxnOpInput>, authz: &Authorizer) -> Result<TxnPlan, Vec<TxnError>> {
    let mut errors = Vec::new();
    let mut prepared = Vec::with_capacity(ops.len());
    let mut writes = 0;
    for (op_index, op) in ops.into_iter().enumerate() {
        let mut fail = |what: String| errors.push(TxnError { op_index, what });
        let (verb, kind) = if op.kv.is_some() {
            fail("consul-double does not implement KV operations".into());
            continue;
        } else if let Some(node_op) = op.node {
            let verb = node_op.verb.unwrap_or_default();
            let node = node_op.node.unwrap_or_default();
            if VERBS.contains(&verb.as_str()) && verb != "get" {
                let name = node.node.as_deref().unwrap_or_default();
                if let Err(e) = node_pre_apply(name, node.id.as_deref().unwrap_or_default())
                    .and_then(|()| authz.require(Resource::Node, name, Access::Write))
                {
                    fail(e);
                }
            }
            (verb.clone(), PreparedOp::Node { verb, node })
        } else if let Some(service_op) = op.service {
            let verb = service_op.verb.unwrap_or_default();
            let mut service = service_op.service.unwrap_or_default();
            if VERBS.contains(&verb.as_str())
                && verb != "get"
                && let Err(e) = service_pre_apply(&mut service).and_then(|()| {
                    let name = service.service.as_deref().unwrap_or_default();
                    authz.require(Resource::Service, name, Access::Write)
                })
            {
                fail(e);
            }
            let node = service_op.node.unwrap_or_default();
            (
                verb.clone(),
                PreparedOp::Service {
                    verb,
                    node,
                    service,
                },
            )
        } else if let Some(check_op) = op.check {
            let verb = check_op.verb.unwrap_or_default();
            if VERBS.contains(&verb.as_str())
                && verb != "get"
                && let Some(check) = &check_op.check
                && let Err(e) = vet_check(check, authz)
            {
                fail(e);
            }
            (
                verb.clone(),
                PreparedOp::Check {
                    verb,
                    check: check_op.check.unwrap_or_default(),
                },
            )
        } else {
            fail("unknown operation type".into());
            continue;
        };
        if !VERBS.contains(&verb.as_str()) {
            let noun = match kind {
                PreparedOp::Node { .. } => "node",
                PreparedOp::Service { .. } => "service",
                PreparedOp::Check { .. } => "check",
            };
            fail(format!("unknown {noun} operation: {verb}"));
            continue;
        }
        if verb != "get" {
            writes += 1;
        }
        prepared.push(kind);
    }
    if errors.is_empty() {
        Ok(TxnPlan {
            ops: prepared,
            writes,
        })
    } else {
        Err(errors)
    }
}

/// `vetCheckWrite`: a node-level check needs node:write, a service check
/// service:write on the service it names.
fn vet_check(check: &CheckInput, authz: &Authorizer) -> Result<(), String> {
    let service_id = check.service_id.as_deref().unwrap_or_default();
    if service_id.is_empty() {
        let node = check.node.as_deref().unwrap_or_default();
        return authz.require(Resource::Node, node, Access::Write);
    }
    match check.service_name.as_deref().unwrap_or_default() {
        "" => Err(format!(
            "unknown service ID {:?} for check ID {:?}",
            service_id,
            check.check_id.as_deref().unwrap_or_default()
        )),
        name => authz.require(Resource::Service, name, Access::Write),
    }
}

/// Newest Consul's `vetServiceTxnOp` (`agent/consul/txn_endpoint.go`), run in `preCheck`
/// against the committed catalog: a Service write whose ID names (case-insensitively, as
/// memdb's ID index does) a stored service of another name (compared exactly) is refused.
/// Consul 1.15-1.20 have no such check; see `Config::reject_txn_service_rename`.
pub fn reject_service_renames(catalog: &Catalog, plan: &TxnPlan) -> Vec<TxnError> {
    let mut errors = Vec::new();
    for (op_index, op) in plan.ops.iter().enumerate() {
        let PreparedOp::Service {
            verb,
            node,
            service,
        } = op
        else {
            continue;
        };
        if verb == "get" {
            continue;
        }
        let id = service.id.as_deref().unwrap_or_default();
        let name = service.service.as_deref().unwrap_or_default();
        if let Some(existing) = catalog.service(node, id)
            && existing.service != name
        {
            errors.push(TxnError {
                op_index,
                what: format!(
                    "service name does not match existing service name for service ID {id:?} on node {node:?}"
                ),
            });
        }
    }
    errors
}

/// Fault injection (`POST /control/refuse-service-writes`), not a Consul behaviour: txn
/// Service writes of the given service names fail per op, as an op Consul refuses on its own
/// (an ACL denial, a meta rule) does in `preCheck`: 409, nothing applied.
pub fn refuse_service_writes(plan: &TxnPlan, refused: &[String]) -> Vec<TxnError> {
    let mut errors = Vec::new();
    for (op_index, op) in plan.ops.iter().enumerate() {
        if let PreparedOp::Service { verb, service, .. } = op
            && verb != "get"
        {
            let name = service.service.as_deref().unwrap_or_default();
            if refused.iter().any(|r| r == name) {
                errors.push(TxnError {
                    op_index,
                    what: format!("consul-double: injected refusal of service {name:?}"),
                });
            }
        }
    }
    errors
}

/// Kind and verb of each op, e.g. `"Service.set"`, for statistics.
pub fn op_labels(plan: &TxnPlan) -> Vec<String> {
    plan.ops
        .iter()
        .map(|op| match op {
            PreparedOp::Node { verb, .. } => format!("Node.{verb}"),
            PreparedOp::Service { verb, .. } => format!("Service.{verb}"),
            PreparedOp::Check { verb, .. } => format!("Check.{verb}"),
        })
        .collect()
}

pub enum TxnOutcome {
    /// `index` is `None` when nothing changed (or the txn only read).
    Applied {
        results: Vec<TxnResult>,
        index: Option<u64>,
    },
    RolledBack(Vec<TxnError>),
}

/// Runs a read-only plan (Consul's `TxnRO`).
pub fn read_txn(catalog: &Catalog, plan: TxnPlan, default_dc: &str) -> TxnOutcome {
    let mut results = Vec::new();
    let mut errors = Vec::new();
    for (op_index, op) in plan.ops.into_iter().enumerate() {
        match read_op(catalog, &op, default_dc) {
            Ok(result) => results.push(result),
            Err(what) => errors.push(TxnError { op_index, what }),
        }
    }
    if errors.is_empty() {
        TxnOutcome::Applied {
            results,
            index: None,
        }
    } else {
        TxnOutcome::RolledBack(errors)
    }
}

fn read_op(catalog: &Catalog, op: &PreparedOp, default_dc: &str) -> Result<TxnResult, String> {
    match op {
        PreparedOp::Node { node, .. } => {
            let spec = node_spec(node, default_dc);
            let found = if spec.id.is_empty() {
                catalog.node(&spec.node)
            } else {
                catalog.node_by_id(&spec.id)
            };
            found
                .map(|entry| TxnResult::Node(entry.record.clone()))
                .ok_or_else(|| format!("node {:?} doesn't exist", spec.node))
        }
        PreparedOp::Service { node, service, .. } => {
            let id = service.id.clone().unwrap_or_default();
            catalog
                .service(node, &id)
                .map(|s| TxnResult::Service(s.clone()))
                .ok_or_else(|| format!("service {id:?} on node {node:?} doesn't exist"))
        }
        PreparedOp::Check { check, .. } => {
            let node = check.node.clone().unwrap_or_default();
            let id = check.check_id.clone().unwrap_or_default();
            catalog
                .check(&node, &id)
                .map(|c| TxnResult::Check(c.clone()))
                .ok_or_else(|| format!("check {id:?} on node {node:?} doesn't exist"))
        }
    }
}

/// Runs a plan with writes atomically (Consul's `TxnRW`): every op runs,
/// every error is collected, and any error rolls everything back.
pub fn write_txn(catalog: &mut Catalog, plan: TxnPlan, default_dc: &str) -> TxnOutcome {
    let mut tx = WriteTxn::begin(catalog);
    let mut results = Vec::new();
    let mut errors = Vec::new();
    for (op_index, op) in plan.ops.into_iter().enumerate() {
        let outcome = if op_is_get(&op) {
            read_op(tx.catalog(), &op, default_dc).map(Some)
        } else {
            write_op(&mut tx, op, default_dc)
        };
        match outcome {
            Ok(Some(result)) => results.push(result),
            Ok(None) => {}
            Err(what) => errors.push(TxnError { op_index, what }),
        }
    }
    if errors.is_empty() {
        let index = tx.commit();
        TxnOutcome::Applied { results, index }
    } else {
        tx.rollback();
        TxnOutcome::RolledBack(errors)
    }
}

fn op_is_get(op: &PreparedOp) -> bool {
    match op {
        PreparedOp::Node { verb, .. }
        | PreparedOp::Service { verb, .. }
        | PreparedOp::Check { verb, .. } => verb == "get",
    }
}

/// Consul's CAS rule: index 0 means "only if absent", otherwise the stored
/// ModifyIndex must match.
fn cas_allows(requested: u64, existing: Option<u64>) -> bool {
    match existing {
        None => requested == 0,
        Some(current) => requested != 0 && requested == current,
    }
}

fn write_op(
    tx: &mut WriteTxn<'_>,
    op: PreparedOp,
    default_dc: &str,
) -> Result<Option<TxnResult>, String> {
    match op {
        PreparedOp::Node { verb, node } => {
            let requested = node.modify_index.unwrap_or(0);
            let spec = node_spec(&node, default_dc);
            let existing = tx.catalog().node(&spec.node).map(|e| e.record.modify_index);
            match verb.as_str() {
                "set" => tx.set_node(spec).map(|n| Some(TxnResult::Node(n))),
                "cas" if !cas_allows(requested, existing) => Err(format!(
                    "failed to set node {:?}, index is stale",
                    spec.node
                )),
                "cas" => tx.set_node(spec).map(|n| Some(TxnResult::Node(n))),
                "delete" => {
                    tx.delete_node(&spec.node);
                    Ok(None)
                }
                _ if existing.is_none() || existing != Some(requested) => Err(format!(
                    "failed to delete node {:?}, index is stale",
                    spec.node
                )),
                _ => {
                    tx.delete_node(&spec.node);
                    Ok(None)
                }
            }
        }
        PreparedOp::Service {
            verb,
            node,
            service,
        } => {
            let requested = service.modify_index.unwrap_or(0);
            let record = service_record(&service, false);
            let existing = tx.catalog().service(&node, &record.id).cloned();
            match verb.as_str() {
                "set" | "cas" => {
                    // Consul 1.15-1.20: a set on an ID that matches a stored one
                    // case-insensitively replaces that row, its ID spelling and name
                    // included (`ensureServiceTxn`, memdb's lower-cased ID index).
                    if verb == "cas" && !cas_allows(requested, existing.map(|s| s.modify_index)) {
                        return Err(format!(
                            "failed to set service {:?} on node {:?}, index is stale",
                            record.id, node
                        ));
                    }
                    tx.set_service(&node, record)
                        .map(|s| Some(TxnResult::Service(s)))
                }
                "delete" => {
                    tx.delete_service(&node, &record.id);
                    Ok(None)
                }
                _ => {
                    if existing.map(|s| s.modify_index) != Some(requested) {
                        return Err(format!(
                            "failed to delete service {:?} on node {:?}, index is stale",
                            record.id, node
                        ));
                    }
                    tx.delete_service(&node, &record.id);
                    Ok(None)
                }
            }
        }
        PreparedOp::Check { verb, check } => {
            let requested = check.modify_index.unwrap_or(0);
            let record = check_record(&check, "");
            let existing = tx
                .catalog()
                .check(&record.node, &record.check_id)
                .map(|c| c.modify_index);
            match verb.as_str() {
                "set" => tx.set_check(record).map(|c| Some(TxnResult::Check(c))),
                "cas" if !cas_allows(requested, existing) => Err(format!(
                    "failed to set check {:?} on node {:?}, index is stale",
                    record.check_id, record.node
                )),
                "cas" => tx.set_check(record).map(|c| Some(TxnResult::Check(c))),
                "delete" => {
                    tx.delete_check(&record.node, &record.check_id);
                    Ok(None)
                }
                _ if existing.is_none() || existing != Some(requested) => Err(format!(
                    "failed to delete check {:?} on node {:?}, index is stale",
                    record.check_id, record.node
                )),
                _ => {
                    tx.delete_check(&record.node, &record.check_id);
                    Ok(None)
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ops(json: &str) -> Vec<TxnOpInput> {
        serde_json::from_str(json).unwrap()
    }

    fn prepare_txn_all(ops: Vec<TxnOpInput>) -> Result<TxnPlan, Vec<TxnError>> {
        prepare_txn(ops, &Authorizer::allow_all())
    }

    #[test]
    fn each_op_the_token_may_not_write_gets_its_own_error() {
        use crate::acl::{AclConfig, DefaultPolicy, Rules, Token};
        let acl = AclConfig {
            default_policy: DefaultPolicy::Deny,
            tokens: vec![Token::with_rules(
                "t",
                Rules::everything(Access::Read).with(
                    Resource::Service,
                    "web",
                    false,
                    Access::Write,
                ),
            )],
            anonymous: Rules::default(),
        }
        .normalized();
        let authz = acl.resolve(Some("t")).unwrap();
        let err = prepare_txn(
            ops(
                r#"[{"Node":{"Verb":"set","Node":{"Node":"n","Address":"a"}}},
                    {"Service":{"Verb":"set","Node":"n","Service":{"Service":"web"}}},
                    {"Service":{"Verb":"delete","Node":"n","Service":{"ID":"x","Service":"db"}}},
                    {"Service":{"Verb":"get","Node":"n","Service":{"ID":"x","Service":"db"}}}]"#,
            ),
            &authz,
        )
        .err()
        .unwrap();
        let indexes: Vec<_> = err.iter().map(|e| e.op_index).collect();
        assert_eq!(indexes, [0, 2]);
        assert!(
            err[0]
                .what
                .ends_with("lacks permission 'node:write' on \"n\""),
            "{}",
            err[0].what
        );
        assert!(
            err[1]
                .what
                .ends_with("lacks permission 'service:write' on \"db\"")
        );
    }

    #[test]
    fn uuid_validation_matches_go_uuid() {
        assert!(validate_uuid("67539c9d-b948-ba67-edd4-d07a676d6673").is_ok());
        assert!(validate_uuid("67539c9d").is_err());
        assert!(validate_uuid("67539c9d-b948-ba67-edd4-d07a676d667z").is_err());
    }

    #[test]
    fn service_delete_without_name_is_rejected_like_consul() {
        let err = prepare_txn_all(ops(
            r#"[{"Service":{"Verb":"delete","Node":"n","Service":{"ID":"db1"}}}]"#,
        ))
        .err()
        .unwrap();
        assert_eq!(err[0].op_index, 0);
        assert!(err[0].what.contains("Must provide service name"));
    }

    #[test]
    fn unknown_verbs_and_kv_are_reported_per_op() {
        let err = prepare_txn_all(ops(
            r#"[{"Node":{"Verb":"set","Node":{"Node":"n","Address":"a"}}},
                {"Node":{"Verb":"frob","Node":{"Node":"n"}}},
                {"KV":{"Verb":"set","Key":"k"}},
                {}]"#,
        ))
        .err()
        .unwrap();
        let indexes: Vec<_> = err.iter().map(|e| e.op_index).collect();
        assert_eq!(indexes, [1, 2, 3]);
        assert_eq!(err[0].what, "unknown node operation: frob");
        assert_eq!(err[2].what, "unknown operation type");
    }

    #[test]
    fn cas_semantics() {
        assert!(cas_allows(0, None));
        assert!(!cas_allows(0, Some(3)));
        assert!(!cas_allows(3, None));
        assert!(cas_allows(3, Some(3)));
        assert!(!cas_allows(2, Some(3)));
    }

    /// `ensureServiceTxn` (agent/consul/state/catalog.go) validates meta with
    /// `structs.ValidateServiceMetadata`; `txnDispatch` (state/txn.go) collects the error
    /// and `TxnRW` rolls back every op, the node included.
    #[test]
    fn one_meta_value_over_512_bytes_rolls_back_the_whole_txn() {
        let mut cat = Catalog::new(1);
        let long = "v".repeat(513);
        let plan = prepare_txn_all(ops(&format!(
            r#"[{{"Node":{{"Verb":"set","Node":{{"Node":"n","Address":"10.0.0.1"}}}}}},
                {{"Service":{{"Verb":"set","Node":"n","Service":{{"ID":"a","Service":"web","Port":80}}}}}},
                {{"Service":{{"Verb":"set","Node":"n","Service":{{"ID":"b","Service":"web","Port":81,
                  "Meta":{{"metrics-path":"{long}"}}}}}}}}]"#
        )))
        .ok()
        .unwrap();
        match write_txn(&mut cat, plan, "dc1") {
            TxnOutcome::RolledBack(errors) => {
                assert_eq!(errors.len(), 1);
                assert_eq!(errors[0].op_index, 2);
                assert_eq!(
                    errors[0].what,
                    format!(
                        "Invalid Service Meta for node n and serviceID b: Couldn't load metadata pair ('metrics-path', '{long}'): Value is too long (limit: 512 characters)"
                    )
                );
            }
            TxnOutcome::Applied { .. } => panic!("applied"),
        }
        assert!(cat.nodes.is_empty(), "the node op is rolled back too");
    }

    /// Consul 1.15-1.20: IDs are one row case-insensitively, so a set of `web-1` followed
    /// by a delete of `Web-1` in one txn deletes what the set just wrote. The newest
    /// Consul's pre-check refuses the set instead (the stored row is named `Web`).
    #[test]
    fn a_set_and_a_delete_of_ids_differing_in_case_hit_one_row() {
        let mut cat = Catalog::new(1);
        let setup = prepare_txn_all(ops(
            r#"[{"Node":{"Verb":"set","Node":{"Node":"n","Address":"10.0.0.1"}}},
                {"Service":{"Verb":"set","Node":"n","Service":{"ID":"Web-1","Service":"Web","Port":80}}}]"#,
        ))
        .ok()
        .unwrap();
        assert!(matches!(
            write_txn(&mut cat, setup, "dc1"),
            TxnOutcome::Applied { .. }
        ));
        let rename = || {
            prepare_txn_all(ops(
                r#"[{"Service":{"Verb":"set","Node":"n","Service":{"ID":"web-1","Service":"web","Port":80}}},
                    {"Service":{"Verb":"delete","Node":"N","Service":{"ID":"Web-1","Service":"Web"}}}]"#,
            ))
            .ok()
            .unwrap()
        };
        let refused = reject_service_renames(&cat, &rename());
        assert_eq!(refused.len(), 1);
        assert_eq!(refused[0].op_index, 0);
        assert_eq!(
            refused[0].what,
            r#"service name does not match existing service name for service ID "web-1" on node "n""#
        );
        assert!(matches!(
            write_txn(&mut cat, rename(), "dc1"),
            TxnOutcome::Applied { .. }
        ));
        assert!(cat.service("n", "web-1").is_none(), "the set was deleted");
        assert_eq!(cat.service_count(), 0);
    }

    /// `txnNode`/`txnService` (agent/consul/state/txn.go) with `ensureNodeCASTxn` and
    /// `deleteServiceCASTxn` (state/catalog.go): create-only at index 0, stale otherwise.
    #[test]
    fn node_cas_creates_only_if_absent_and_delete_cas_needs_the_index() {
        let mut cat = Catalog::new(1);
        let run = |cat: &mut Catalog, json: &str| match write_txn(
            cat,
            prepare_txn_all(ops(json)).ok().unwrap(),
            "dc1",
        ) {
            TxnOutcome::Applied { .. } => Ok(()),
            TxnOutcome::RolledBack(e) => Err(e[0].what.clone()),
        };
        let create =
            r#"[{"Node":{"Verb":"cas","Node":{"Node":"n","Address":"a","ModifyIndex":0}}}]"#;
        run(&mut cat, create).unwrap();
        assert_eq!(
            run(&mut cat, create).unwrap_err(),
            r#"failed to set node "n", index is stale"#
        );
        run(
            &mut cat,
            r#"[{"Service":{"Verb":"set","Node":"n","Service":{"ID":"a","Service":"web"}}}]"#,
        )
        .unwrap();
        let index = cat.service("n", "a").unwrap().modify_index;
        let delete = |i: u64| {
            format!(
                r#"[{{"Service":{{"Verb":"delete-cas","Node":"n","Service":{{"ID":"A","Service":"web","ModifyIndex":{i}}}}}}}]"#
            )
        };
        assert_eq!(
            run(&mut cat, &delete(index + 1)).unwrap_err(),
            r#"failed to delete service "A" on node "n", index is stale"#
        );
        run(&mut cat, &delete(index)).unwrap();
        assert!(cat.service("n", "a").is_none());
        assert!(
            run(&mut cat, &delete(index)).is_err(),
            "an absent service is stale"
        );
    }

    #[test]
    fn txn_drops_tagged_addresses_like_consul() {
        let mut cat = Catalog::new(1);
        let plan = prepare_txn_all(ops(
            r#"[{"Node":{"Verb":"set","Node":{"Node":"n","Address":"10.0.0.1"}}},
                {"Service":{"Verb":"set","Node":"n","Service":{"Service":"web","Port":80,
                  "TaggedAddresses":{"lan":{"address":"1.2.3.4","port":1}}}}}]"#,
        ))
        .ok()
        .unwrap();
        match write_txn(&mut cat, plan, "dc1") {
            TxnOutcome::Applied { results, index } => {
                assert_eq!(index, Some(2));
                assert_eq!(results.len(), 2);
            }
            TxnOutcome::RolledBack(e) => panic!("{e:?}"),
        }
        let svc = cat.service("n", "web").unwrap();
        assert!(svc.tagged_addresses.is_none());
        assert_eq!(
            svc.weights,
            Weights {
                passing: 1,
                warning: 1
            }
        );
    }
}
