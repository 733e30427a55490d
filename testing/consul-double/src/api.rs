//! The `/v1` HTTP surface: routing, ACL enforcement, request statistics,
//! blocking reads and the JSON shapes Consul returns.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Extension, MatchedPath, Path, RawQuery, Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{MethodRouter, get, put};
use serde::Serialize;
use serde_json::json;
use tokio::time::Instant;

use crate::Shared;
use crate::acl::{Access, Authorizer, Resource};
use crate::model::{
    CheckRecord, DeregisterRequest, Meta, NodeRecord, RegisterRequest, ServiceAddress,
    ServiceRecord, TxnError, TxnOpInput, TxnResult, Weights,
};
use crate::ops::{self, TxnOutcome};
use crate::query::{
    ApiError, QueryParams, ReadOptions, check_datacenter, jitter, parse_go_bool, read_options,
};
use crate::store::{Catalog, NodeEntry};

/// Generous cap for other bodies; Consul sets none, but unbounded reads are
/// a hazard even in a test double.
pub(crate) const MAX_BODY_BYTES: usize = 32 * 1024 * 1024;

pub fn router(shared: Arc<Shared>) -> Router {
    let agent_routes = match shared.agent {
        Some(_) => crate::agent::endpoints::routes(),
        None => Router::new(),
    };
    Router::new()
        .merge(agent_routes)
        .route("/v1/agent/self", with_405(get(agent_self)))
        .route("/v1/status/leader", with_405(get(status_leader)))
        .route("/v1/status/peers", with_405(get(status_peers)))
        .route(
            "/v1/catalog/datacenters",
            with_405(get(catalog_datacenters)),
        )
        .route("/v1/catalog/nodes", with_405(get(catalog_nodes)))
        .route("/v1/catalog/services", with_405(get(catalog_services)))
        .route("/v1/catalog/service/", with_405(get(missing_service_name)))
        .route(
            "/v1/catalog/service/{service}",
            with_405(get(catalog_service)),
        )
        .route("/v1/catalog/node/{node}", with_405(get(catalog_node)))
        .route(
            "/v1/catalog/node-services/{node}",
            with_405(get(catalog_node_services)),
        )
        .route("/v1/health/service/", with_405(get(missing_service_name)))
        .route(
            "/v1/health/service/{service}",
            with_405(get(health_service)),
        )
        .route("/v1/catalog/register", with_405(put(catalog_register)))
        .route("/v1/catalog/deregister", with_405(put(catalog_deregister)))
        .route("/v1/txn", with_405(put(txn)))
        .route_layer(middleware::from_fn_with_state(
            shared.clone(),
            api_middleware,
        ))
        .fallback(unmatched)
        .with_state(shared)
}

/// Consul answers a known path with the wrong method with 405 and a body.
pub(crate) fn with_405(route: MethodRouter<Arc<Shared>>) -> MethodRouter<Arc<Shared>> {
    route.fallback(method_not_allowed)
}

async fn method_not_allowed(method: Method) -> Response {
    text(
        StatusCode::METHOD_NOT_ALLOWED,
        format!("method {method} not allowed"),
    )
}

async fn unmatched(State(shared): State<Arc<Shared>>, request: Request) -> Response {
    let route = format!("{} {}", request.method(), request.uri().path());
    *shared.stats().unmatched.entry(route).or_insert(0) += 1;
    text(StatusCode::NOT_FOUND, "404 page not found\n")
}

/// Statistics and ACL enforcement for every matched `/v1` route: the token
/// is resolved once (agent/http.go `parseToken`, then the server's
/// `ResolveToken`); an unknown token is 403 `ACL not found` everywhere, a
/// known one (or none: the anonymous token) is handed to the handler, which
/// filters reads and vets writes with it.
async fn api_middleware(
    State(shared): State<Arc<Shared>>,
    mut request: Request,
    next: Next,
) -> Response {
    let template = request
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| request.uri().path().to_string());
    let route = format!("{} {}", request.method(), template);
    let params = QueryParams::parse(request.uri().query());
    shared.stats().record_request(&route, params.names());
    let (token, source) = presented_token(request.headers(), &params);
    shared.stats().record_token_source(source);

    let (resolved, default_policy) = match shared.acl().as_ref() {
        None => (Ok(Authorizer::allow_all()), None),
        Some(acl) => (acl.resolve(token.as_deref()), Some(acl.default_policy)),
    };
    let mut response = match resolved {
        Err(text_) => {
            shared.stats().acl_denied += 1;
            text(StatusCode::FORBIDDEN, text_)
        }
        Ok(authz) => {
            request.extensions_mut().insert(authz);
            next.run(request).await
        }
    };
    // agent/http.go `setACLDefaultPolicy`: on every answer while ACLs are on.
    if let Some(policy) = default_policy {
        let value = match policy {
            crate::acl::DefaultPolicy::Allow => "allow",
            crate::acl::DefaultPolicy::Deny => "deny",
        };
        response.headers_mut().insert(
            "X-Consul-Default-ACL-Policy",
            HeaderValue::from_static(value),
        );
    }
    shared
        .stats()
        .record_response(&route, response.status().as_u16());
    response
}

/// Consul's token sources, in its precedence order: `?token=`, then
/// `X-Consul-Token`, then `Authorization: Bearer` (agent/http.go
/// `parseTokenInternal`). Also says where the token was found, so tests can
/// assert that clients keep it out of URLs.
fn presented_token(headers: &HeaderMap, params: &QueryParams) -> (Option<String>, &'static str) {
    if let Some(token) = params.get("token").filter(|t| !t.is_empty()) {
        return (Some(token.to_string()), "query");
    }
    if let Some(token) = headers
        .get("X-Consul-Token")
        .and_then(|v| v.to_str().ok())
        .filter(|t| !t.is_empty())
    {
        return (Some(token.to_string()), "X-Consul-Token");
    }
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
        .filter(|t| !t.is_empty());
    match bearer {
        Some(token) => (Some(token.to_string()), "bearer"),
        None => (None, "none"),
    }
}

// ---------------------------------------------------------------------------
// Response helpers
// ---------------------------------------------------------------------------

pub(crate) fn text(status: StatusCode, body: impl Into<String>) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        body.into(),
    )
        .into_response()
}

fn api_error(error: ApiError) -> Response {
    let status = StatusCode::from_u16(error.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    text(status, error.message)
}

fn encode<T: Serialize + ?Sized>(value: &T, pretty: bool) -> Vec<u8> {
    // Our types have string keys only, so encoding cannot fail.
    let encoded = if pretty {
        serde_json::to_vec_pretty(value)
    } else {
        serde_json::to_vec(value)
    };
    encoded.unwrap_or_default()
}

pub(crate) fn json_response(status: StatusCode, body: Vec<u8>) -> Response {
    (status, [(header::CONTENT_TYPE, "application/json")], body).into_response()
}

/// A read response with Consul's query-meta headers.
fn read_response(index: u64, consistency: &'static str, body: Vec<u8>) -> Response {
    let mut response = json_response(StatusCode::OK, body);
    let headers = response.headers_mut();
    headers.insert("X-Consul-Index", HeaderValue::from(index.max(1)));
    headers.insert("X-Consul-KnownLeader", HeaderValue::from_static("true"));
    headers.insert("X-Consul-LastContact", HeaderValue::from_static("0"));
    headers.insert(
        "X-Consul-Effective-Consistency",
        HeaderValue::from_static(consistency),
    );
    response
}

/// Waits until the query's index (`index_of`: the whole catalog's, or one
/// node's) exceeds `min_index`, or the wait (plus Consul's jitter) expires.
/// A wipe (a snapshot restore) returns at once, as Consul's blocking query
/// does when the abandoned state store's `AbandonCh` closes
/// (agent/blockingquery/blockingquery.go); the client then sees a lower
/// index and must reset.
async fn wait_for_index(
    shared: &Shared,
    min_index: u64,
    wait: Duration,
    index_of: &impl Fn(&Catalog) -> u64,
) {
    let deadline = Instant::now() + wait + jitter(wait);
    let mut index_rx = shared.index_tx.subscribe();
    let mut restores_rx = shared.restores_tx.subscribe();
    restores_rx.borrow_and_update();
    loop {
        index_rx.borrow_and_update();
        if index_of(&shared.read_catalog()) > min_index {
            return;
        }
        tokio::select! {
            changed = index_rx.changed() => {
                if changed.is_err() {
                    return;
                }
            }
            _ = restores_rx.changed() => return,
            _ = tokio::time::sleep_until(deadline) => return,
        }
    }
}

/// A read's body, and whether ACLs removed anything from it.
struct Rendered {
    body: Vec<u8>,
    filtered: bool,
}

/// Shared shape of every blocking read: parse options, block if asked, then
/// render under the read lock so the body and `X-Consul-Index` agree.
/// `X-Consul-Results-Filtered-By-ACLs: true` is set when the token's rules
/// removed something, except for the anonymous token (agent/consul/rpc.go
/// `maskResultsFilteredByACLs`; agent/http.go `setResultsFilteredByACLs`).
async fn blocking_read(
    shared: &Shared,
    params: &QueryParams,
    authz: &Authorizer,
    index_of: impl Fn(&Catalog) -> u64,
    render: impl FnOnce(&Catalog, &ReadOptions) -> Rendered,
) -> Response {
    let options = match read_options(params, &shared.config.datacenter) {
        Ok(options) => options,
        Err(error) => return api_error(error),
    };
    if options.min_index > 0 {
        shared.stats().blocking_queries += 1;
        wait_for_index(shared, options.min_index, options.wait, &index_of).await;
    }
    let (index, rendered) = {
        let catalog = shared.read_catalog();
        (index_of(&catalog), render(&catalog, &options))
    };
    let mut response = read_response(index, options.consistency, rendered.body);
    if rendered.filtered {
        shared.stats().acl_filtered += 1;
        if !authz.anonymous {
            response.headers_mut().insert(
                "X-Consul-Results-Filtered-By-ACLs",
                HeaderValue::from_static("true"),
            );
        }
    }
    response
}

fn whole_catalog(catalog: &Catalog) -> u64 {
    catalog.index
}

fn node_matches_meta(node: &NodeRecord, filters: &[(String, String)]) -> bool {
    filters.iter().all(|(k, v)| {
        node.meta
            .as_ref()
            .and_then(|meta| meta.get(k))
            .is_some_and(|actual| actual == v)
    })
}

/// Consul's `serviceTagsFilter`: every requested tag, case-insensitively.
fn service_has_tags(service: &ServiceRecord, wanted: &[&str]) -> bool {
    wanted.iter().all(|tag| {
        service
            .tags
            .iter()
            .any(|t| t.to_lowercase() == tag.to_lowercase())
    })
}

// ---------------------------------------------------------------------------
// Agent and status
// ---------------------------------------------------------------------------

/// Deterministic UUID-shaped ID for the agent's node.
pub(crate) fn agent_node_id(name: &str) -> String {
    let hash = name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x0100_0000_01b3)
    });
    let hex = format!("{hash:016x}{:016x}", hash.rotate_left(17));
    format!(
        "{}-{}-{}-{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..32]
    )
}

async fn agent_self(State(shared): State<Arc<Shared>>, RawQuery(raw): RawQuery) -> Response {
    let params = QueryParams::parse(raw.as_deref());
    let config = &shared.config;
    let node_id = agent_node_id(&config.node_name);
    let body = json!({
        "Config": {
            "Datacenter": config.datacenter,
            "PrimaryDatacenter": config.datacenter,
            "NodeName": config.node_name,
            "NodeID": node_id,
            "Revision": "consul-double",
            "Server": true,
            "Version": "1.17.0",
            "BuildDate": "1970-01-01T00:00:00Z",
        },
        "Coord": null,
        "Member": {
            "Name": config.node_name,
            "Addr": shared.api_addr.ip().to_string(),
            "Port": 8301,
            "Tags": {
                "dc": config.datacenter,
                "id": node_id,
                "role": "consul",
                "port": "8300",
                "vsn": "2",
                "build": "1.17.0:consul-double",
            },
            "Status": 1,
            "ProtocolMin": 1, "ProtocolMax": 5, "ProtocolCur": 2,
            "DelegateMin": 2, "DelegateMax": 5, "DelegateCur": 4,
        },
        "Meta": { "consul-network-segment": "" },
        "Stats": {},
    });
    json_response(StatusCode::OK, encode(&body, params.has("pretty")))
}

async fn status_leader(State(shared): State<Arc<Shared>>) -> Response {
    let leader = format!("{}:8300", shared.api_addr.ip());
    json_response(StatusCode::OK, encode(&leader, false))
}

async fn status_peers(State(shared): State<Arc<Shared>>) -> Response {
    let peers = [format!("{}:8300", shared.api_addr.ip())];
    json_response(StatusCode::OK, encode(&peers, false))
}

// ---------------------------------------------------------------------------
// Catalog reads
// ---------------------------------------------------------------------------

async fn catalog_datacenters(State(shared): State<Arc<Shared>>) -> Response {
    json_response(StatusCode::OK, encode(&[&shared.config.datacenter], false))
}

async fn missing_service_name() -> Response {
    text(StatusCode::BAD_REQUEST, "Missing service name")
}

/// ACL filter: `aclFilter.filterNodes` (node:read).
async fn catalog_nodes(
    State(shared): State<Arc<Shared>>,
    Extension(authz): Extension<Authorizer>,
    RawQuery(raw): RawQuery,
) -> Response {
    let params = QueryParams::parse(raw.as_deref());
    blocking_read(
        &shared,
        &params,
        &authz,
        whole_catalog,
        |catalog, options| {
            let mut filtered = false;
            let nodes: Vec<&NodeRecord> = catalog
                .nodes
                .values()
                .map(|entry| &entry.record)
                .filter(|node| node_matches_meta(node, &options.node_meta))
                .filter(|node| {
                    let allowed = authz.node_read(&node.node);
                    filtered |= !allowed;
                    allowed
                })
                .collect();
            Rendered {
                body: encode(&nodes, options.pretty),
                filtered,
            }
        },
    )
    .await
}

/// ACL filter: `aclFilter.filterServices` (service:read on each name).
async fn catalog_services(
    State(shared): State<Arc<Shared>>,
    Extension(authz): Extension<Authorizer>,
    RawQuery(raw): RawQuery,
) -> Response {
    let params = QueryParams::parse(raw.as_deref());
    blocking_read(
        &shared,
        &params,
        &authz,
        whole_catalog,
        |catalog, options| {
            let mut services: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
            let mut filtered = false;
            for (name_key, entry) in &catalog.services_by_name {
                if !authz.service_read(&entry.display_name) {
                    filtered = true;
                    continue;
                }
                if options.node_meta.is_empty() {
                    let tags = entry.tag_counts.keys().map(String::as_str).collect();
                    services.insert(&entry.display_name, tags);
                    continue;
                }
                let mut tags: Vec<&str> = Vec::new();
                let mut any = false;
                for (node, service) in catalog.instances_of(name_key) {
                    if node_matches_meta(&node.record, &options.node_meta) {
                        any = true;
                        tags.extend(service.tags.iter().map(String::as_str));
                    }
                }
                if any {
                    tags.sort_unstable();
                    tags.dedup();
                    services.insert(&entry.display_name, tags);
                }
            }
            Rendered {
                body: encode(&services, options.pretty),
                filtered,
            }
        },
    )
    .await
}

/// One element of `/v1/catalog/service/:service` (`structs.ServiceNode`).
#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
struct CatalogServiceView<'a> {
    #[serde(rename = "ID")]
    id: &'a str,
    node: &'a str,
    address: &'a str,
    datacenter: &'a str,
    tagged_addresses: &'a Option<Meta>,
    node_meta: &'a Option<Meta>,
    service_kind: &'a str,
    #[serde(rename = "ServiceID")]
    service_id: &'a str,
    service_name: &'a str,
    service_tags: &'a [String],
    service_address: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    service_tagged_addresses: &'a Option<BTreeMap<String, ServiceAddress>>,
    service_weights: &'a Weights,
    service_meta: &'a Option<Meta>,
    service_port: i64,
    service_enable_tag_override: bool,
    /// `structs.ServiceNode` carries these as values (never omitted); the double stores
    /// no Connect data, so they are the zero values Consul renders.
    service_proxy: serde_json::Value,
    service_connect: serde_json::Value,
    create_index: u64,
    modify_index: u64,
}

impl<'a> CatalogServiceView<'a> {
    fn new(node: &'a NodeRecord, service: &'a ServiceRecord) -> Self {
        CatalogServiceView {
            id: &node.id,
            node: &node.node,
            address: &node.address,
            datacenter: &node.datacenter,
            tagged_addresses: &node.tagged_addresses,
            node_meta: &node.meta,
            service_kind: &service.kind,
            service_id: &service.id,
            service_name: &service.service,
            service_tags: &service.tags,
            service_address: &service.address,
            service_tagged_addresses: &service.tagged_addresses,
            service_weights: &service.weights,
            service_meta: &service.meta,
            service_port: service.port,
            service_enable_tag_override: service.enable_tag_override,
            service_proxy: json!({"Mode": "", "MeshGateway": {}, "Expose": {}}),
            service_connect: json!({}),
            create_index: service.create_index,
            modify_index: service.modify_index,
        }
    }
}

/// ACL filter: `aclFilter.filterServiceNodes` (node:read and service:read).
/// The instances of service `name` a read returns: those matching `?node-meta` and every
/// `?tag`, less those the token may not see (`aclFilter.filterServiceNodes` /
/// `filterCheckServiceNodes`: node:read on the node and service:read on the service are both
/// needed); `filtered` is set when the ACL filter dropped any.
fn visible_instances<'a>(
    catalog: &'a Catalog,
    name: &str,
    options: &ReadOptions,
    tags: &[String],
    authz: &Authorizer,
    filtered: &mut bool,
) -> Vec<(&'a NodeEntry, &'a ServiceRecord)> {
    let tag_refs: Vec<&str> = tags.iter().map(String::as_str).collect();
    catalog
        .instances_of(name)
        .filter(|(node, service)| {
            node_matches_meta(&node.record, &options.node_meta)
                && service_has_tags(service, &tag_refs)
        })
        .filter(|(node, service)| {
            let allowed =
                authz.node_read(&node.record.node) && authz.service_read(&service.service);
            *filtered |= !allowed;
            allowed
        })
        .collect()
}

async fn catalog_service(
    State(shared): State<Arc<Shared>>,
    Extension(authz): Extension<Authorizer>,
    Path(name): Path<String>,
    RawQuery(raw): RawQuery,
) -> Response {
    let params = QueryParams::parse(raw.as_deref());
    let tags: Vec<String> = params.all("tag").into_iter().map(String::from).collect();
    blocking_read(
        &shared,
        &params,
        &authz,
        whole_catalog,
        |catalog, options| {
            let mut filtered = false;
            let views: Vec<CatalogServiceView> =
                visible_instances(catalog, &name, options, &tags, &authz, &mut filtered)
                    .into_iter()
                    .map(|(node, service)| CatalogServiceView::new(&node.record, service))
                    .collect();
            Rendered {
                body: encode(&views, options.pretty),
                filtered,
            }
        },
    )
    .await
}

/// Services of one node, with Consul's ACL filter (`aclFilter.filterNodeServiceList`
/// / `filterNodeServices`): without node:read on the node the whole reply is
/// the empty value, with service:read missing that service is dropped.
fn node_services_visible<'a>(
    catalog: &'a Catalog,
    node: &str,
    authz: &Authorizer,
) -> (Option<&'a NodeEntry>, Vec<&'a ServiceRecord>, bool) {
    let Some(entry) = catalog.node(node) else {
        return (None, Vec::new(), false);
    };
    if !authz.node_read(&entry.record.node) {
        return (None, Vec::new(), true);
    }
    let mut filtered = false;
    let services = entry
        .services
        .values()
        .filter(|s| {
            let allowed = authz.service_read(&s.service);
            filtered |= !allowed;
            allowed
        })
        .collect();
    (Some(entry), services, filtered)
}

/// `/v1/catalog/node-services/:node`. For an unknown node Consul answers
/// 200 with `{"Node":null,"Services":null}` (not 404), and `Services` is
/// also null for a node without services; both are reproduced. The index is
/// the node's own (`catalogNodeMaxIndex`), so a write elsewhere neither
/// wakes a watch on this node nor moves its `X-Consul-Index`.
async fn catalog_node_services(
    State(shared): State<Arc<Shared>>,
    Extension(authz): Extension<Authorizer>,
    Path(node): Path<String>,
    RawQuery(raw): RawQuery,
) -> Response {
    let params = QueryParams::parse(raw.as_deref());
    let index_of = |catalog: &Catalog| catalog.node_index(&node);
    blocking_read(&shared, &params, &authz, index_of, |catalog, options| {
        let (entry, services, filtered) = node_services_visible(catalog, &node, &authz);
        let services = Some(services).filter(|s| !s.is_empty());
        let body = json!({
            "Node": entry.map(|e| &e.record),
            "Services": services,
        });
        Rendered {
            body: encode(&body, options.pretty),
            filtered,
        }
    })
    .await
}

/// `/v1/catalog/node/:node`: services as a map by ID, `null` if unknown.
async fn catalog_node(
    State(shared): State<Arc<Shared>>,
    Extension(authz): Extension<Authorizer>,
    Path(node): Path<String>,
    RawQuery(raw): RawQuery,
) -> Response {
    let params = QueryParams::parse(raw.as_deref());
    let index_of = |catalog: &Catalog| catalog.node_index(&node);
    blocking_read(&shared, &params, &authz, index_of, |catalog, options| {
        let (entry, services, filtered) = node_services_visible(catalog, &node, &authz);
        let body = entry.map(|entry| {
            let services: BTreeMap<&str, &ServiceRecord> =
                services.iter().map(|s| (s.id.as_str(), *s)).collect();
            json!({ "Node": entry.record, "Services": services })
        });
        Rendered {
            body: encode(&body, options.pretty),
            filtered,
        }
    })
    .await
}

// ---------------------------------------------------------------------------
// Health
// ---------------------------------------------------------------------------

#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
struct CheckServiceNodeView<'a> {
    node: &'a NodeRecord,
    service: &'a ServiceRecord,
    checks: Vec<&'a CheckRecord>,
}

/// Node-level checks plus the checks bound to this service instance.
fn instance_checks<'a>(node: &'a NodeEntry, service: &ServiceRecord) -> Vec<&'a CheckRecord> {
    node.checks
        .values()
        .filter(|c| c.service_id.is_empty() || c.service_id.eq_ignore_ascii_case(&service.id))
        .collect()
}

/// ACL filter: `aclFilter.filterCheckServiceNodes` (node:read and service:read).
async fn health_service(
    State(shared): State<Arc<Shared>>,
    Extension(authz): Extension<Authorizer>,
    Path(name): Path<String>,
    RawQuery(raw): RawQuery,
) -> Response {
    let params = QueryParams::parse(raw.as_deref());
    let passing_only = if params.has("passing") {
        match params.get("passing") {
            Some("") | None => true,
            Some(value) => match parse_go_bool(value) {
                Some(flag) => flag,
                None => return text(StatusCode::BAD_REQUEST, "Invalid value for ?passing"),
            },
        }
    } else {
        false
    };
    let tags: Vec<String> = params.all("tag").into_iter().map(String::from).collect();
    blocking_read(
        &shared,
        &params,
        &authz,
        whole_catalog,
        |catalog, options| {
            let mut filtered = false;
            let views: Vec<CheckServiceNodeView> =
                visible_instances(catalog, &name, options, &tags, &authz, &mut filtered)
                    .into_iter()
                    .map(|(node, service)| CheckServiceNodeView {
                        node: &node.record,
                        service,
                        checks: instance_checks(node, service),
                    })
                    .filter(|view| {
                        !passing_only || view.checks.iter().all(|c| c.status == "passing")
                    })
                    .collect();
            Rendered {
                body: encode(&views, options.pretty),
                filtered,
            }
        },
    )
    .await
}

// ---------------------------------------------------------------------------
// Writes
// ---------------------------------------------------------------------------

pub(crate) async fn read_body(body: Body, limit: usize) -> Result<Bytes, Response> {
    axum::body::to_bytes(body, limit).await.map_err(|_| {
        text(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("Request body too large, max size: {limit} bytes"),
        )
    })
}

fn declared_length(headers: &HeaderMap) -> Option<usize> {
    headers
        .get(header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .parse()
        .ok()
}

fn after_write(shared: &Shared, index: Option<u64>) {
    if let Some(index) = index {
        shared.stats().catalog_writes += 1;
        shared.publish_index(index);
    }
}

async fn catalog_register(
    State(shared): State<Arc<Shared>>,
    Extension(authz): Extension<Authorizer>,
    RawQuery(raw): RawQuery,
    body: Body,
) -> Response {
    let params = QueryParams::parse(raw.as_deref());
    if let Err(error) = check_datacenter(params.get("dc"), &shared.config.datacenter) {
        return api_error(error);
    }
    let bytes = match read_body(body, MAX_BODY_BYTES).await {
        Ok(bytes) => bytes,
        Err(response) => return response,
    };
    let request: RegisterRequest = match serde_json::from_slice(&bytes) {
        Ok(request) => request,
        Err(e) => {
            return text(
                StatusCode::BAD_REQUEST,
                format!("Request decode failed: {e}"),
            );
        }
    };
    if let Err(error) = check_datacenter(request.datacenter.as_deref(), &shared.config.datacenter) {
        return api_error(error);
    }
    let outcome = {
        let mut catalog = shared.write_catalog();
        if let Err(denied) = vet_register(&catalog, &request, &authz) {
            shared.stats().acl_permission_denied += 1;
            return text(StatusCode::FORBIDDEN, denied);
        }
        ops::register(&mut catalog, request, &shared.config.datacenter)
    };
    match outcome {
        Ok(index) => {
            after_write(&shared, index);
            json_response(StatusCode::OK, b"true".to_vec())
        }
        Err(message) => text(StatusCode::INTERNAL_SERVER_ERROR, message),
    }
}

async fn catalog_deregister(
    State(shared): State<Arc<Shared>>,
    Extension(authz): Extension<Authorizer>,
    RawQuery(raw): RawQuery,
    body: Body,
) -> Response {
    let params = QueryParams::parse(raw.as_deref());
    if let Err(error) = check_datacenter(params.get("dc"), &shared.config.datacenter) {
        return api_error(error);
    }
    let bytes = match read_body(body, MAX_BODY_BYTES).await {
        Ok(bytes) => bytes,
        Err(response) => return response,
    };
    let request: DeregisterRequest = match serde_json::from_slice(&bytes) {
        Ok(request) => request,
        Err(e) => {
            return text(
                StatusCode::BAD_REQUEST,
                format!("Request decode failed: {e}"),
            );
        }
    };
    if let Err(error) = check_datacenter(request.datacenter.as_deref(), &shared.config.datacenter) {
        return api_error(error);
    }
    let outcome = {
        let mut catalog = shared.write_catalog();
        if let Err(denied) = vet_deregister(&catalog, &request, &authz) {
            shared.stats().acl_permission_denied += 1;
            return text(StatusCode::FORBIDDEN, denied);
        }
        ops::deregister(&mut catalog, &request)
    };
    match outcome {
        Ok(index) => {
            after_write(&shared, index);
            json_response(StatusCode::OK, b"true".to_vec())
        }
        Err(message) => text(StatusCode::INTERNAL_SERVER_ERROR, message),
    }
}

/// agent/consul/catalog_endpoint.go `vetRegisterWithACL`, reduced: node:write
/// unless the node is only referenced (`SkipNodeUpdate` on an existing node),
/// service:write on the service, and the check's node or service. A refusal
/// is an RPC permission error: HTTP 403 with its text (agent/http.go).
fn vet_register(
    catalog: &Catalog,
    request: &RegisterRequest,
    authz: &Authorizer,
) -> Result<(), String> {
    let node = request.node.as_deref().unwrap_or_default();
    let node_exists = catalog.node(node).is_some();
    if !(request.skip_node_update.unwrap_or(false) && node_exists) {
        authz.require(Resource::Node, node, Access::Write)?;
    }
    if let Some(service) = &request.service {
        let name = service
            .service
            .as_deref()
            .or(service.id.as_deref())
            .unwrap_or_default();
        authz.require(Resource::Service, name, Access::Write)?;
    }
    let checks = request.checks.iter().flatten().chain(request.check.iter());
    for check in checks {
        match check.service_name.as_deref().filter(|s| !s.is_empty()) {
            Some(name) => authz.require(Resource::Service, name, Access::Write)?,
            None => authz.require(Resource::Node, node, Access::Write)?,
        }
    }
    Ok(())
}

/// `vetDeregisterWithACL`: service:write on the stored service, node:write
/// for a node-level check or the whole node.
fn vet_deregister(
    catalog: &Catalog,
    request: &DeregisterRequest,
    authz: &Authorizer,
) -> Result<(), String> {
    let node = request.node.as_deref().unwrap_or_default();
    if let Some(id) = request.service_id.as_deref().filter(|s| !s.is_empty()) {
        return match catalog.service(node, id) {
            Some(service) => authz.require(Resource::Service, &service.service, Access::Write),
            None => Ok(()),
        };
    }
    if let Some(id) = request.check_id.as_deref().filter(|s| !s.is_empty()) {
        return match catalog.check(node, id) {
            Some(check) if !check.service_name.is_empty() => {
                authz.require(Resource::Service, &check.service_name, Access::Write)
            }
            _ => authz.require(Resource::Node, node, Access::Write),
        };
    }
    authz.require(Resource::Node, node, Access::Write)
}

#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
struct TxnResponse<'a> {
    results: Option<&'a [TxnResult]>,
    errors: Option<&'a [TxnError]>,
}

fn txn_rejected(shared: &Shared, response: Response) -> Response {
    shared.stats().txn.rejected += 1;
    response
}

async fn txn(
    State(shared): State<Arc<Shared>>,
    Extension(authz): Extension<Authorizer>,
    RawQuery(raw): RawQuery,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let params = QueryParams::parse(raw.as_deref());
    let pretty = params.has("pretty");
    if let Err(error) = check_datacenter(params.get("dc"), &shared.config.datacenter) {
        return api_error(error);
    }
    // Consul's convertOps (agent/txn_endpoint.go): for backward compatibility the body may be
    // as large as kv_max_value_size when that is the larger limit.
    let limit = shared
        .config
        .txn_max_req_len
        .max(shared.config.kv_max_value_size);
    if declared_length(&headers).is_some_and(|len| len > limit) {
        return txn_rejected(
            &shared,
            text(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("Request body too large, max size: {limit} bytes"),
            ),
        );
    }
    let bytes = match read_body(body, limit).await {
        Ok(bytes) => bytes,
        Err(response) => return txn_rejected(&shared, response),
    };
    let ops_in: Vec<TxnOpInput> = match serde_json::from_slice(&bytes) {
        Ok(ops_in) => ops_in,
        Err(e) => {
            return txn_rejected(
                &shared,
                text(
                    StatusCode::BAD_REQUEST,
                    format!("Failed to parse body: {e}"),
                ),
            );
        }
    };
    let max = shared.config.max_txn_ops;
    if ops_in.len() > max {
        return txn_rejected(
            &shared,
            text(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!(
                    "Transaction contains too many operations ({} > {max})",
                    ops_in.len()
                ),
            ),
        );
    }
    let plan = match ops::prepare_txn(ops_in, &authz) {
        Ok(plan) => plan,
        Err(errors) => {
            let denied = errors
                .iter()
                .filter(|e| e.what.starts_with("Permission denied"))
                .count();
            shared.stats().acl_permission_denied += denied as u64;
            shared.stats().txn.rolled_back += 1;
            return txn_conflict(&errors, pretty);
        }
    };
    let injected = ops::refuse_service_writes(&plan, &shared.refused_services());
    if !injected.is_empty() {
        shared.stats().txn.rolled_back += 1;
        return txn_conflict(&injected, pretty);
    }
    if shared.config.reject_txn_service_rename {
        let errors = ops::reject_service_renames(&shared.read_catalog(), &plan);
        if !errors.is_empty() {
            shared.stats().txn.rolled_back += 1;
            return txn_conflict(&errors, pretty);
        }
    }
    // Txn.Apply is a write RPC for Consul's rate limiter; read-only txns are Txn.Read.
    if plan.writes > 0
        && let Err((status, refusal)) = shared.admit_write()
    {
        return txn_rejected(
            &shared,
            text(
                StatusCode::from_u16(status).unwrap_or(StatusCode::TOO_MANY_REQUESTS),
                refusal,
            ),
        );
    }
    let labels = ops::op_labels(&plan);
    let datacenter = &shared.config.datacenter;
    if plan.writes == 0 {
        let outcome = ops::read_txn(&shared.read_catalog(), plan, datacenter);
        let index = shared.read_catalog().index;
        return match outcome {
            TxnOutcome::Applied { results, .. } => {
                shared.stats().txn.read_only += 1;
                let body = encode(
                    &TxnResponse {
                        results: Some(&results),
                        errors: None,
                    },
                    pretty,
                );
                // Read-only txns carry the read headers, per Consul's docs.
                let mut response = read_response(index, "leader", body);
                response.headers_mut().remove("X-Consul-Index");
                response
                    .headers_mut()
                    .remove("X-Consul-Effective-Consistency");
                response
            }
            TxnOutcome::RolledBack(errors) => {
                shared.stats().txn.rolled_back += 1;
                txn_conflict(&errors, pretty)
            }
        };
    }
    let outcome = ops::write_txn(&mut shared.write_catalog(), plan, datacenter);
    match outcome {
        TxnOutcome::Applied { results, index } => {
            shared.stats().record_txn_applied(&labels);
            after_write(&shared, index);
            let body = encode(
                &TxnResponse {
                    results: Some(&results),
                    errors: None,
                },
                pretty,
            );
            json_response(StatusCode::OK, body)
        }
        TxnOutcome::RolledBack(errors) => {
            shared.stats().txn.rolled_back += 1;
            txn_conflict(&errors, pretty)
        }
    }
}

fn txn_conflict(errors: &[TxnError], pretty: bool) -> Response {
    let body = encode(
        &TxnResponse {
            results: None,
            errors: Some(errors),
        },
        pretty,
    );
    json_response(StatusCode::CONFLICT, body)
}
