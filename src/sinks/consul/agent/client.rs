//! The local agent's endpoints (agent/agent_endpoint.go), on the sink's one Consul client.

use super::super::client::{ConsulClient, send};
use super::super::decode::decode_agent_services;
use super::super::error::{ConsulError, truncate};
use crate::model::Catalog;

/// The agent answers a write its token may not make with 403 "Permission denied"
/// (agent/acl.go), unlike the catalog's per-operation 409.
fn checked(what: &'static str, status: u16, body: &str) -> Result<(), ConsulError> {
    match status {
        200 => Ok(()),
        403 => Err(ConsulError::Forbidden(format!(
            "HTTP 403 to {what}: {}",
            truncate(body)
        ))),
        _ => Err(ConsulError::Status {
            what,
            status,
            body: truncate(body),
        }),
    }
}

impl ConsulClient {
    /// Every service of the local agent, foreign ones included (the double has no `?filter`,
    /// and a filter would hide the IDs a registration could overwrite).
    pub(in crate::sinks::consul) async fn agent_services(&self) -> Result<Catalog, ConsulError> {
        let request = self.local_request(reqwest::Method::GET, "/v1/agent/services");
        let (status, body) = send(request).await?;
        checked("agent services", status, &body)?;
        decode_agent_services(body.as_bytes(), &self.settings.owner)
    }

    pub(in crate::sinks::consul) async fn agent_register(
        &self,
        registration: &serde_json::Value,
    ) -> Result<(), ConsulError> {
        let request = self
            .local_request(reqwest::Method::PUT, "/v1/agent/service/register")
            .json(registration);
        let (status, body) = send(request).await?;
        checked("agent service register", status, &body)
    }

    pub(in crate::sinks::consul) async fn agent_deregister(
        &self,
        service_id: &str,
    ) -> Result<(), ConsulError> {
        let path = format!("/v1/agent/service/deregister/{service_id}");
        let (status, body) = send(self.local_request(reqwest::Method::PUT, &path)).await?;
        checked("agent service deregister", status, &body)
    }

    /// A 404 means the agent no longer has the check (restarted in -dev mode, or the
    /// service was reaped): the sink re-reads and registers it again.
    pub(in crate::sinks::consul) async fn agent_check_pass(
        &self,
        check_id: &str,
    ) -> Result<(), ConsulError> {
        let path = format!("/v1/agent/check/pass/{check_id}");
        let (status, body) = send(self.local_request(reqwest::Method::PUT, &path)).await?;
        checked("agent check pass", status, &body)
    }
}
