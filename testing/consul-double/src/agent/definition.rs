//! The body of `PUT /v1/agent/service/register` (`structs.ServiceDefinition` with its
//! `CheckType`s) and the agent endpoint's validation, in upstream's order and wording:
//! `agent/agent_endpoint.go` (`AgentRegisterService`), `agent/structs/check_type.go`
//! (`CheckType.UnmarshalJSON`, `Validate`), `agent/structs/service_definition.go`
//! (`NodeService`, `CheckTypes`), `agent/structs/structs.go` (`ValidateWeights`,
//! `ValidateServiceMetadata`), `agent/agent.go` (`addServiceInternal`: check IDs, names and
//! default tagged addresses).

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::time::Duration;

use serde::Deserialize;
use serde_json::Value;

use crate::model::{Meta, ServiceAddress, ServiceRecord, Weights};
use crate::query::parse_go_duration;
use crate::store::validate_meta;

/// A refused request: HTTP status and Consul's plain-text body.
#[derive(Debug, PartialEq, Eq)]
pub struct Refusal {
    pub status: u16,
    pub text: String,
}

fn bad_request(text: impl Into<String>) -> Refusal {
    Refusal {
        status: 400,
        text: text.into(),
    }
}

/// One TTL check of a service, as the agent keeps (and persists) its definition.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CheckDef {
    pub check_id: String,
    pub name: String,
    /// The definition's initial `Status`; empty means critical.
    pub status: String,
    pub notes: String,
    pub ttl: Duration,
    /// As given; the agent raises it to its minimum when it arms the reaper.
    pub deregister_critical_service_after: Duration,
}

#[derive(Default, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct ServiceDefinitionInput {
    kind: Option<String>,
    #[serde(rename = "ID")]
    id: Option<String>,
    name: Option<String>,
    tags: Option<Vec<String>>,
    address: Option<String>,
    tagged_addresses: Option<BTreeMap<String, ServiceAddress>>,
    meta: Option<Meta>,
    port: Option<i64>,
    weights: Option<Weights>,
    enable_tag_override: Option<bool>,
    check: Option<CheckTypeInput>,
    checks: Option<Vec<CheckTypeInput>>,
}

/// `structs.CheckType` as decoded by its `UnmarshalJSON`: durations are Go duration strings
/// or numbers of nanoseconds, and the snake_case spellings are accepted too.
#[derive(Default, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct CheckTypeInput {
    #[serde(rename = "CheckID", alias = "check_id")]
    check_id: Option<String>,
    name: Option<String>,
    status: Option<String>,
    notes: Option<String>,
    #[serde(rename = "TTL", alias = "ttl")]
    ttl: Option<Value>,
    #[serde(alias = "deregister_critical_service_after")]
    deregister_critical_service_after: Option<Value>,
    interval: Option<Value>,
    #[serde(rename = "HTTP")]
    http: Option<String>,
    #[serde(rename = "TCP")]
    tcp: Option<String>,
    #[serde(rename = "UDP")]
    udp: Option<String>,
    #[serde(rename = "GRPC")]
    grpc: Option<String>,
    #[serde(rename = "H2PING")]
    h2ping: Option<String>,
    #[serde(rename = "OSService")]
    os_service: Option<String>,
    script_args: Option<Vec<String>>,
    alias_node: Option<String>,
    alias_service: Option<String>,
}

impl CheckTypeInput {
    /// `CheckType.Empty`: an all-zero `Check` object is no check at all.
    fn is_empty(&self) -> bool {
        [
            &self.check_id,
            &self.name,
            &self.status,
            &self.notes,
            &self.http,
            &self.tcp,
            &self.udp,
            &self.grpc,
            &self.h2ping,
            &self.os_service,
            &self.alias_node,
            &self.alias_service,
        ]
        .iter()
        .all(|s| s.as_deref().unwrap_or_default().is_empty())
            && self.ttl.is_none()
            && self.deregister_critical_service_after.is_none()
            && self.interval.is_none()
            && self.script_args.as_ref().is_none_or(Vec::is_empty)
    }
}

/// Go's `time.ParseDuration` for strings, nanoseconds for numbers (`CheckType.UnmarshalJSON`).
fn duration(value: &Option<Value>) -> Result<Duration, Refusal> {
    match value {
        None | Some(Value::Null) => Ok(Duration::ZERO),
        Some(Value::String(text)) => parse_go_duration(text).ok_or_else(|| {
            bad_request(format!(
                "Request decode failed: time: invalid duration {text:?}"
            ))
        }),
        Some(Value::Number(n)) => Ok(Duration::from_nanos(
            n.as_f64().unwrap_or(0.0).max(0.0) as u64
        )),
        Some(other) => Err(bad_request(format!(
            "Request decode failed: invalid duration {other}"
        ))),
    }
}

/// `CheckType.Validate`, then the double's own limit: only TTL checks are run.
fn check_def(input: &CheckTypeInput) -> Result<(Duration, Duration), Refusal> {
    let ttl = duration(&input.ttl)?;
    let interval = duration(&input.interval)?;
    let deregister_after = duration(&input.deregister_critical_service_after)?;
    let set = |s: &Option<String>| !s.as_deref().unwrap_or_default().is_empty();
    let interval_check = input.script_args.as_ref().is_some_and(|a| !a.is_empty())
        || [
            &input.http,
            &input.tcp,
            &input.udp,
            &input.grpc,
            &input.h2ping,
            &input.os_service,
        ]
        .into_iter()
        .any(set);
    let alias = set(&input.alias_node) || set(&input.alias_service);
    let invalid = |text: &str| Err(bad_request(format!("Invalid check: {text}")));
    if !interval.is_zero() && !ttl.is_zero() {
        return invalid("Interval and TTL cannot both be specified");
    }
    if interval_check && interval.is_zero() {
        return invalid(
            "Interval must be > 0 for Script, HTTP, H2PING, TCP, UDP or OSService checks",
        );
    }
    if interval_check && alias {
        return invalid("Interval cannot be set for Alias checks");
    }
    if alias && !ttl.is_zero() {
        return invalid("TTL must be not be set for Alias checks");
    }
    if !interval_check && !alias && ttl.is_zero() {
        return invalid("TTL must be > 0 for TTL checks");
    }
    if ttl.is_zero() {
        return invalid("consul-double runs only TTL checks");
    }
    Ok((ttl, deregister_after))
}

fn valid_status(status: &str) -> bool {
    matches!(status, "passing" | "warning" | "critical")
}

/// `ValidateWeights`.
fn validate_weights(weights: &Weights) -> Result<(), String> {
    if weights.passing < 1 {
        return Err("Passing must be greater than 0".into());
    }
    if weights.warning < 0 {
        return Err("Warning must be greater or equal than 0".into());
    }
    if weights.passing > 65535 || weights.warning > 65535 {
        return Err("DNS Weight must be between 0 and 65535".into());
    }
    Ok(())
}

/// `addServiceInternal`: an IP service address also becomes the `lan_ipv4`/`wan_ipv4`
/// (or `_ipv6`) tagged addresses unless those are given.
fn default_tagged_addresses(service: &mut ServiceRecord) {
    let family = match service.address.parse::<IpAddr>() {
        Ok(IpAddr::V4(_)) => "ipv4",
        Ok(IpAddr::V6(_)) => "ipv6",
        Err(_) => return,
    };
    let tagged = service.tagged_addresses.get_or_insert_with(BTreeMap::new);
    for prefix in ["lan", "wan"] {
        tagged
            .entry(format!("{prefix}_{family}"))
            .or_insert_with(|| ServiceAddress {
                address: service.address.clone(),
                port: service.port,
            });
    }
}

/// Decodes and validates a registration: the service as the agent stores it and its TTL
/// checks with their IDs (`service:<id>`, `service:<id>:<n>` when several) and names.
pub fn parse_registration(body: &[u8]) -> Result<(ServiceRecord, Vec<CheckDef>), Refusal> {
    let input: ServiceDefinitionInput = serde_json::from_slice(body)
        .map_err(|e| bad_request(format!("Request decode failed: {e}")))?;
    let name = input.name.clone().unwrap_or_default();
    if name.is_empty() {
        return Err(bad_request("Missing service name"));
    }
    let address = input.address.clone().unwrap_or_default();
    if matches!(address.as_str(), "0.0.0.0" | "::" | "[::]") {
        return Err(bad_request("Invalid service address"));
    }
    if let Some(weights) = &input.weights {
        validate_weights(weights).map_err(|e| bad_request(format!("Invalid Weights: {e}")))?;
    }
    if let Some(meta) = &input.meta {
        validate_meta(meta).map_err(|e| bad_request(format!("Invalid Service Meta: {e}")))?;
    }
    let inputs: Vec<&CheckTypeInput> = input
        .check
        .iter()
        .filter(|c| !c.is_empty())
        .chain(input.checks.iter().flatten())
        .collect();
    let mut timings = Vec::with_capacity(inputs.len());
    for check in &inputs {
        timings.push(check_def(check)?);
    }
    for check in &inputs {
        if !check
            .status
            .as_deref()
            .is_none_or(|s| s.is_empty() || valid_status(s))
        {
            return Err(bad_request(
                "Status for checks must 'passing', 'warning', 'critical'",
            ));
        }
    }
    let id = input
        .id
        .clone()
        .filter(|id| !id.is_empty())
        .unwrap_or_else(|| name.clone());
    let mut service = ServiceRecord {
        kind: input.kind.clone().unwrap_or_default(),
        id: id.clone(),
        service: name.clone(),
        tags: input.tags.clone().unwrap_or_default(),
        address,
        tagged_addresses: input.tagged_addresses.clone(),
        meta: input.meta.clone(),
        port: input.port.unwrap_or_default(),
        weights: Weights::normalized(input.weights.as_ref()),
        enable_tag_override: input.enable_tag_override.unwrap_or_default(),
        mesh: Default::default(),
        create_index: 0,
        modify_index: 0,
    };
    default_tagged_addresses(&mut service);
    let several = inputs.len() > 1;
    let checks = inputs
        .iter()
        .zip(timings)
        .enumerate()
        .map(|(i, (check, (ttl, deregister_after)))| CheckDef {
            check_id: match check.check_id.as_deref() {
                Some(given) if !given.is_empty() => given.to_string(),
                _ if several => format!("service:{id}:{}", i + 1),
                _ => format!("service:{id}"),
            },
            name: match check.name.as_deref() {
                Some(given) if !given.is_empty() => given.to_string(),
                _ => format!("Service '{name}' check"),
            },
            status: check.status.clone().unwrap_or_default(),
            notes: check.notes.clone().unwrap_or_default(),
            ttl,
            deregister_critical_service_after: deregister_after,
        })
        .collect();
    Ok((service, checks))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(body: serde_json::Value) -> Result<(ServiceRecord, Vec<CheckDef>), Refusal> {
        parse_registration(body.to_string().as_bytes())
    }

    #[test]
    fn ids_names_and_durations_follow_upstream() {
        let (service, checks) = parse(serde_json::json!({
            "Name": "web", "ID": "web-1", "Address": "10.0.0.5", "Port": 8080,
            "Check": {"TTL": "10s", "DeregisterCriticalServiceAfter": "90s"},
            "Checks": [{"CheckID": "own", "Name": "n", "ttl": 2_000_000_000u64, "Status": "passing"}],
        }))
        .unwrap();
        assert_eq!(service.id, "web-1");
        let tagged = service.tagged_addresses.unwrap();
        assert_eq!(tagged["lan_ipv4"].address, "10.0.0.5");
        assert_eq!(tagged["wan_ipv4"].port, 8080);
        assert_eq!(checks[0].check_id, "service:web-1:1");
        assert_eq!(checks[0].name, "Service 'web' check");
        assert_eq!(checks[0].ttl, Duration::from_secs(10));
        assert_eq!(
            checks[0].deregister_critical_service_after,
            Duration::from_secs(90)
        );
        assert_eq!(checks[1].check_id, "own");
        assert_eq!(checks[1].ttl, Duration::from_secs(2));
        let (_, single) = parse(serde_json::json!({"Name": "db", "Check": {"TTL": "1s"}})).unwrap();
        assert_eq!(single[0].check_id, "service:db");
    }

    #[test]
    fn refusals_use_upstream_wording() {
        let text = |body| parse(body).unwrap_err().text;
        assert_eq!(text(serde_json::json!({"ID": "x"})), "Missing service name");
        assert_eq!(
            text(serde_json::json!({"Name": "w", "Check": {"Notes": "no ttl"}})),
            "Invalid check: TTL must be > 0 for TTL checks"
        );
        assert_eq!(
            text(serde_json::json!({"Name": "w", "Check": {"TTL": "5s", "Status": "ok"}})),
            "Status for checks must 'passing', 'warning', 'critical'"
        );
        assert_eq!(
            text(serde_json::json!({"Name": "w", "Address": "0.0.0.0"})),
            "Invalid service address"
        );
        assert_eq!(
            text(serde_json::json!({"Name": "w", "Weights": {"Passing": 0, "Warning": 1}})),
            "Invalid Weights: Passing must be greater than 0"
        );
        assert!(
            text(serde_json::json!({"Name": "w", "Meta": {"a.b": "v"}}))
                .starts_with("Invalid Service Meta: Couldn't load metadata pair ('a.b', 'v')")
        );
        assert_eq!(
            text(serde_json::json!({"Name": "w", "Check": {"TTL": "soon"}})),
            "Request decode failed: time: invalid duration \"soon\""
        );
        assert!(
            parse(serde_json::json!({"Name": "w", "Check": {}}))
                .unwrap()
                .1
                .is_empty()
        );
    }
}
