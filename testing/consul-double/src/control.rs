//! The control listener: fault injection and introspection for tests.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use axum::Json;
use axum::Router;
use axum::extract::{RawQuery, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use serde_json::json;

use crate::Shared;
use crate::query::{QueryParams, parse_go_bool};

pub fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/control/health", get(health))
        .route("/control/down", post(down))
        .route("/control/up", post(up))
        .route("/control/wipe", post(wipe))
        .route("/control/state", get(state))
        .route("/control/stats", get(stats))
        .route("/control/reset-stats", post(reset_stats))
        .route("/control/acl", put(set_acl))
        .route("/control/acl/rules", put(set_token_rules))
        .route(
            "/control/refuse-service-writes",
            post(refuse_service_writes),
        )
        .route("/control/agent", get(agent_show))
        .route("/control/agent/restart", post(agent_restart))
        .route("/control/agent/fail", post(agent_fail))
        .route("/control/agent/recover", post(agent_recover))
        .route("/control/agent/full-sync", post(agent_full_sync))
        .with_state(shared)
}

fn listener_status(shared: &Shared) -> Json<serde_json::Value> {
    let index = shared.read_catalog().index;
    Json(json!({
        "api_addr": shared.api_addr.to_string(),
        "api_up": shared.api_up.load(Ordering::SeqCst),
        "index": index,
    }))
}

async fn health(State(shared): State<Arc<Shared>>) -> Response {
    listener_status(&shared).into_response()
}

async fn down(State(shared): State<Arc<Shared>>) -> Response {
    shared.down().await;
    listener_status(&shared).into_response()
}

async fn up(State(shared): State<Arc<Shared>>, RawQuery(raw): RawQuery) -> Response {
    let params = QueryParams::parse(raw.as_deref());
    let empty = match params.get("empty") {
        None => false,
        Some("") => true,
        Some(value) => match parse_go_bool(value) {
            Some(flag) => flag,
            None => return (StatusCode::BAD_REQUEST, "empty must be a boolean").into_response(),
        },
    };
    match shared.up(empty).await {
        Ok(()) => listener_status(&shared).into_response(),
        Err(error) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("cannot rebind {}: {error}", shared.api_addr),
        )
            .into_response(),
    }
}

async fn wipe(State(shared): State<Arc<Shared>>) -> Response {
    shared.wipe();
    listener_status(&shared).into_response()
}

async fn state(State(shared): State<Arc<Shared>>) -> Response {
    Json(shared.state_dump()).into_response()
}

async fn stats(State(shared): State<Arc<Shared>>) -> Response {
    let snapshot = shared.stats().clone();
    Json(snapshot).into_response()
}

/// Body `{"services": ["name", …]}` replaces the set of refused service names (`[]` clears).
async fn refuse_service_writes(
    State(shared): State<Arc<Shared>>,
    Json(body): Json<serde_json::Value>,
) -> Response {
    let Some(names) = body["services"].as_array() else {
        return (StatusCode::BAD_REQUEST, "body must be {\"services\": [..]}").into_response();
    };
    let names: Vec<String> = names
        .iter()
        .filter_map(|n| n.as_str().map(str::to_string))
        .collect();
    *shared.refused_services() = names.clone();
    Json(json!({ "services": names })).into_response()
}

async fn reset_stats(State(shared): State<Arc<Shared>>) -> Response {
    *shared.stats() = Default::default();
    StatusCode::NO_CONTENT.into_response()
}

/// Replaces the whole ACL setup; a JSON `null` turns ACLs off.
async fn set_acl(
    State(shared): State<Arc<Shared>>,
    Json(acl): Json<Option<crate::acl::AclConfig>>,
) -> Response {
    shared.set_acl(acl);
    StatusCode::NO_CONTENT.into_response()
}

#[derive(serde::Deserialize)]
struct TokenRules {
    secret_id: String,
    rules: crate::acl::Rules,
}

/// Replaces one token's rules (a policy edited while clients run).
async fn set_token_rules(
    State(shared): State<Arc<Shared>>,
    Json(body): Json<TokenRules>,
) -> Response {
    if shared.set_token_rules(&body.secret_id, body.rules) {
        StatusCode::NO_CONTENT.into_response()
    } else {
        (StatusCode::NOT_FOUND, "no token with that secret").into_response()
    }
}

/// What the control API can do to the local agent.
pub(crate) enum AgentAction {
    Show,
    /// An agent restart; `dev`: one run with `-dev` (nothing persisted).
    Restart {
        dev: bool,
    },
    /// Serf marks the node failed.
    Fail,
    /// Serf sees the node alive again.
    Recover,
    /// The periodic anti-entropy run, now.
    FullSync,
}

/// Applies `action` and returns the agent's state; `None` without an agent.
pub(crate) fn agent_action(shared: &Shared, action: AgentAction) -> Option<serde_json::Value> {
    use crate::agent::endpoints::{lock, push, set_member_failed};
    let mut agent = lock(shared)?;
    let now = tokio::time::Instant::now();
    match action {
        AgentAction::Show => {}
        AgentAction::Restart { dev } => {
            agent.restart(dev, now);
            push(shared, &mut agent, true);
        }
        AgentAction::Fail => set_member_failed(shared, &mut agent, true),
        AgentAction::Recover => set_member_failed(shared, &mut agent, false),
        AgentAction::FullSync => push(shared, &mut agent, true),
    }
    Some(agent.dump(now))
}

fn agent_response(shared: &Shared, action: AgentAction) -> Response {
    match agent_action(shared, action) {
        Some(state) => Json(state).into_response(),
        None => (
            StatusCode::NOT_FOUND,
            "no local agent: start the double with --agent",
        )
            .into_response(),
    }
}

async fn agent_show(State(shared): State<Arc<Shared>>) -> Response {
    agent_response(&shared, AgentAction::Show)
}

/// `?dev=true`: the agent ran with `-dev` and comes back empty.
async fn agent_restart(State(shared): State<Arc<Shared>>, RawQuery(raw): RawQuery) -> Response {
    let params = QueryParams::parse(raw.as_deref());
    let dev = match params.get("dev") {
        None => false,
        Some("") => true,
        Some(value) => match parse_go_bool(value) {
            Some(flag) => flag,
            None => return (StatusCode::BAD_REQUEST, "dev must be a boolean").into_response(),
        },
    };
    agent_response(&shared, AgentAction::Restart { dev })
}

async fn agent_fail(State(shared): State<Arc<Shared>>) -> Response {
    agent_response(&shared, AgentAction::Fail)
}

async fn agent_recover(State(shared): State<Arc<Shared>>) -> Response {
    agent_response(&shared, AgentAction::Recover)
}

async fn agent_full_sync(State(shared): State<Arc<Shared>>) -> Response {
    agent_response(&shared, AgentAction::FullSync)
}
