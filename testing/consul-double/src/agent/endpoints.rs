//! The agent's HTTP endpoints (`agent/agent_endpoint.go`, ACL vetting in `agent/acl.go`)
//! and the loop that drives its timers and anti-entropy.
//!
//! ACL: writes need `service:write` on the service (for a node-level check `node:write` on
//! the agent's node) and are refused with 403 and the permission-denied text
//! (`vetServiceRegisterWithAuthorizer`, `vetServiceUpdateWithAuthorizer`,
//! `vetCheckUpdateWithAuthorizer`); an unknown service or check is a 404 first. Reads are
//! filtered by `service:read` (`filterServicesWithAuthorizer`, `filterChecksWithAuthorizer`),
//! except `GET /v1/agent/service/:id`, which refuses with 403.

use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::{Arc, MutexGuard};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{Extension, Path, RawQuery, State};
use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, put};
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::time::Instant;

use super::{LocalAgent, parse_registration};
use crate::Shared;
use crate::acl::{Access, Authorizer, Resource};
use crate::api::{MAX_BODY_BYTES, json_response, read_body, text, with_405};
use crate::model::{CheckRecord, ServiceRecord};
use crate::query::QueryParams;

/// How often the loop looks at the agent's clocks; TTLs and intervals are this coarse.
const TICK: Duration = Duration::from_millis(20);

pub(crate) fn routes() -> Router<Arc<Shared>> {
    Router::new()
        .route("/v1/agent/services", with_405(get(services)))
        .route("/v1/agent/service/register", with_405(put(register)))
        .route(
            "/v1/agent/service/deregister/{*id}",
            with_405(put(deregister)),
        )
        .route("/v1/agent/service/{*id}", with_405(get(service)))
        .route("/v1/agent/checks", with_405(get(checks)))
        .route("/v1/agent/check/pass/{*id}", with_405(put(pass)))
        .route("/v1/agent/check/warn/{*id}", with_405(put(warn)))
        .route("/v1/agent/check/fail/{*id}", with_405(put(fail)))
        .route("/v1/agent/check/update/{*id}", with_405(put(update)))
}

/// The agent's lock; taken before the catalog's, never after.
pub(crate) fn lock(shared: &Shared) -> Option<MutexGuard<'_, LocalAgent>> {
    shared
        .agent
        .as_ref()
        .map(|agent| agent.lock().unwrap_or_else(|e| e.into_inner()))
}

/// Runs a sync (`full`: anti-entropy's periodic one) and publishes what it committed.
pub(crate) fn push(shared: &Shared, agent: &mut LocalAgent, full: bool) {
    let index = {
        let mut catalog = shared.write_catalog();
        if full {
            agent.sync_full(&mut catalog, Instant::now())
        } else {
            agent.sync_changes(&mut catalog)
        }
    };
    committed(shared, index);
}

pub(crate) fn committed(shared: &Shared, index: Option<u64>) {
    if let Some(index) = index {
        shared.stats().catalog_writes += 1;
        shared.publish_index(index);
    }
}

/// Serf's verdict on the agent's node, as the leader writes it into the catalog.
pub(crate) fn set_member_failed(shared: &Shared, agent: &mut LocalAgent, failed: bool) {
    let index = agent.reconcile_member(&mut shared.write_catalog(), failed);
    committed(shared, index);
    if !failed {
        // A rejoined agent runs a full sync at once (`ae.StateSyncer`'s server-up event).
        push(shared, agent, true);
    }
}

/// The agent's clocks: TTL expiry, deferred outputs, the reaper, periodic full syncs.
pub(crate) async fn run(shared: Arc<Shared>) {
    let mut ticker = tokio::time::interval(TICK);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        let Some(mut agent) = lock(&shared) else {
            return;
        };
        let full = agent.run_timers(Instant::now());
        // Most ticks change nothing: leave the catalog lock to the readers then.
        if full || agent.has_changes() {
            push(&shared, &mut agent, full);
        }
    }
}

fn ok() -> Response {
    json_response(StatusCode::OK, Vec::new())
}

fn denied(shared: &Shared, reason: String) -> Response {
    shared.stats().acl_permission_denied += 1;
    text(StatusCode::FORBIDDEN, reason)
}

fn no_agent() -> Response {
    text(StatusCode::NOT_FOUND, "404 page not found\n")
}

/// `buildAgentService`: `Tags` and `Meta` are never null, local records carry no indexes.
fn agent_service(service: &ServiceRecord, datacenter: &str) -> Value {
    let mut body = json!({
        "ID": service.id,
        "Service": service.service,
        "Tags": service.tags,
        "Meta": service.meta.clone().unwrap_or_default(),
        "Port": service.port,
        "Address": service.address,
        "Weights": service.weights,
        "EnableTagOverride": service.enable_tag_override,
        "Datacenter": datacenter,
    });
    if !service.kind.is_empty() {
        body["Kind"] = json!(service.kind);
    }
    if let Some(tagged) = service.tagged_addresses.as_ref().filter(|t| !t.is_empty()) {
        body["TaggedAddresses"] = json!(tagged);
    }
    body
}

/// `structs.HealthCheck` as the agent lists it (no raft indexes).
fn agent_check(check: &CheckRecord) -> Value {
    let mut body = json!(check);
    body["Interval"] = json!("");
    body["Timeout"] = json!("");
    body["ExposedPort"] = json!(0);
    body
}

fn filtered_header(mut response: Response, authz: &Authorizer, filtered: bool) -> Response {
    // Only for a presented token, to leak nothing to anonymous callers.
    if filtered && !authz.anonymous {
        response.headers_mut().insert(
            "X-Consul-Results-Filtered-By-ACLs",
            HeaderValue::from_static("true"),
        );
    }
    response
}

fn refuse_filter(params: &QueryParams) -> Option<Response> {
    params.get("filter").filter(|f| !f.is_empty()).map(|_| {
        text(
            StatusCode::BAD_REQUEST,
            "Failed to create boolean expression evaluator: consul-double does not implement ?filter expressions",
        )
    })
}

async fn services(
    State(shared): State<Arc<Shared>>,
    Extension(authz): Extension<Authorizer>,
    RawQuery(raw): RawQuery,
) -> Response {
    let params = QueryParams::parse(raw.as_deref());
    if let Some(refused) = refuse_filter(&params) {
        return refused;
    }
    let Some(agent) = lock(&shared) else {
        return no_agent();
    };
    let mut filtered = false;
    let body: serde_json::Map<String, Value> = agent
        .services()
        .filter(|s| {
            let allowed = authz.service_read(&s.service);
            filtered |= !allowed;
            allowed
        })
        .map(|s| (s.id.clone(), agent_service(s, &shared.config.datacenter)))
        .collect();
    let response = json_response(StatusCode::OK, Value::Object(body).to_string().into_bytes());
    filtered_header(response, &authz, filtered)
}

/// `AgentService`: the definition with its `ContentHash` (hash-based blocking is not
/// implemented).
async fn service(
    State(shared): State<Arc<Shared>>,
    Extension(authz): Extension<Authorizer>,
    Path(id): Path<String>,
) -> Response {
    let Some(agent) = lock(&shared) else {
        return no_agent();
    };
    let Some(record) = agent.service(&id) else {
        return text(StatusCode::NOT_FOUND, format!("unknown service ID: {id}"));
    };
    if let Err(reason) = authz.require(Resource::Service, &record.service, Access::Read) {
        return text(StatusCode::FORBIDDEN, reason);
    }
    let mut body = agent_service(record, &shared.config.datacenter);
    let mut hasher = DefaultHasher::new();
    body.to_string().hash(&mut hasher);
    let hash = format!("{:016x}", hasher.finish());
    body["ContentHash"] = json!(hash);
    let mut response = json_response(StatusCode::OK, body.to_string().into_bytes());
    if let Ok(value) = HeaderValue::from_str(&hash) {
        response.headers_mut().insert("X-Consul-ContentHash", value);
    }
    response
}

async fn checks(
    State(shared): State<Arc<Shared>>,
    Extension(authz): Extension<Authorizer>,
    RawQuery(raw): RawQuery,
) -> Response {
    let params = QueryParams::parse(raw.as_deref());
    if let Some(refused) = refuse_filter(&params) {
        return refused;
    }
    let Some(agent) = lock(&shared) else {
        return no_agent();
    };
    let mut filtered = false;
    let body: serde_json::Map<String, Value> = agent
        .checks()
        .filter(|c| {
            let allowed = if c.service_name.is_empty() {
                authz.node_read(&agent.node)
            } else {
                authz.service_read(&c.service_name)
            };
            filtered |= !allowed;
            allowed
        })
        .map(|c| (c.check_id.clone(), agent_check(c)))
        .collect();
    let response = json_response(StatusCode::OK, Value::Object(body).to_string().into_bytes());
    filtered_header(response, &authz, filtered)
}

async fn register(
    State(shared): State<Arc<Shared>>,
    Extension(authz): Extension<Authorizer>,
    RawQuery(raw): RawQuery,
    body: Body,
) -> Response {
    let params = QueryParams::parse(raw.as_deref());
    let bytes = match read_body(body, MAX_BODY_BYTES).await {
        Ok(bytes) => bytes,
        Err(response) => return response,
    };
    let (service, checks) = match parse_registration(&bytes) {
        Ok(parsed) => parsed,
        Err(refusal) => {
            let status = StatusCode::from_u16(refusal.status).unwrap_or(StatusCode::BAD_REQUEST);
            return text(status, refusal.text);
        }
    };
    let replace = params.has("replace-existing-checks")
        && matches!(params.get("replace-existing-checks"), Some("" | "true"));
    let Some(mut agent) = lock(&shared) else {
        return no_agent();
    };
    let vetted = authz
        .require(Resource::Service, &service.service, Access::Write)
        .and_then(|()| match agent.service(&service.id) {
            Some(existing) => authz.require(Resource::Service, &existing.service, Access::Write),
            None => Ok(()),
        });
    if let Err(reason) = vetted {
        return denied(&shared, reason);
    }
    agent.add_service(service, checks, replace, Instant::now());
    push(&shared, &mut agent, false);
    ok()
}

async fn deregister(
    State(shared): State<Arc<Shared>>,
    Extension(authz): Extension<Authorizer>,
    Path(id): Path<String>,
) -> Response {
    let Some(mut agent) = lock(&shared) else {
        return no_agent();
    };
    let Some(existing) = agent.service(&id) else {
        return text(
            StatusCode::NOT_FOUND,
            format!(
                "Unknown service ID {id:?}. Ensure that the service ID is passed, not the service name."
            ),
        );
    };
    if let Err(reason) = authz.require(Resource::Service, &existing.service, Access::Write) {
        return denied(&shared, reason);
    }
    agent.remove_service(&id);
    push(&shared, &mut agent, false);
    ok()
}

/// `agentCheckUpdate`: vetted against the stored check, then `updateTTLCheck`.
fn check_update(
    shared: &Shared,
    authz: &Authorizer,
    id: &str,
    status: &str,
    output: &str,
) -> Response {
    let Some(mut agent) = lock(shared) else {
        return no_agent();
    };
    let Some(check) = agent.check(id) else {
        return text(
            StatusCode::NOT_FOUND,
            format!(
                "Unknown check ID {id:?}. Ensure that the check ID is passed, not the check name."
            ),
        );
    };
    let vetted = if check.service_name.is_empty() {
        authz.require(Resource::Node, &agent.node, Access::Write)
    } else {
        authz.require(Resource::Service, &check.service_name, Access::Write)
    };
    if let Err(reason) = vetted {
        return denied(shared, reason);
    }
    agent.update_ttl(id, status, output, Instant::now());
    push(shared, &mut agent, false);
    ok()
}

fn note(raw: Option<String>) -> String {
    QueryParams::parse(raw.as_deref())
        .get("note")
        .unwrap_or_default()
        .to_string()
}

async fn pass(
    State(shared): State<Arc<Shared>>,
    Extension(authz): Extension<Authorizer>,
    Path(id): Path<String>,
    RawQuery(raw): RawQuery,
) -> Response {
    check_update(&shared, &authz, &id, "passing", &note(raw))
}

async fn warn(
    State(shared): State<Arc<Shared>>,
    Extension(authz): Extension<Authorizer>,
    Path(id): Path<String>,
    RawQuery(raw): RawQuery,
) -> Response {
    check_update(&shared, &authz, &id, "warning", &note(raw))
}

async fn fail(
    State(shared): State<Arc<Shared>>,
    Extension(authz): Extension<Authorizer>,
    Path(id): Path<String>,
    RawQuery(raw): RawQuery,
) -> Response {
    check_update(&shared, &authz, &id, "critical", &note(raw))
}

/// `checkUpdate`, the body of `PUT /v1/agent/check/update/:id`.
#[derive(Default, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct CheckUpdate {
    status: Option<String>,
    output: Option<String>,
}

async fn update(
    State(shared): State<Arc<Shared>>,
    Extension(authz): Extension<Authorizer>,
    Path(id): Path<String>,
    body: Body,
) -> Response {
    let bytes = match read_body(body, MAX_BODY_BYTES).await {
        Ok(bytes) => bytes,
        Err(response) => return response,
    };
    let request: CheckUpdate = match serde_json::from_slice(&bytes) {
        Ok(request) => request,
        Err(e) => {
            return text(
                StatusCode::BAD_REQUEST,
                format!("Request decode failed: {e}"),
            );
        }
    };
    let status = request.status.unwrap_or_default();
    if !matches!(status.as_str(), "passing" | "warning" | "critical") {
        return text(
            StatusCode::BAD_REQUEST,
            format!("Invalid check status: '{status}'"),
        );
    }
    check_update(
        &shared,
        &authz,
        &id,
        &status,
        &request.output.unwrap_or_default(),
    )
    .into_response()
}
