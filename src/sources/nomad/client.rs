//! The HTTP client for the local Nomad agent: who this node is, and its allocations by
//! blocking query (command/agent/http.go `parseWait`: `index` and `wait`; the reply's
//! `X-Nomad-Index` is where the next query waits from).

use super::alloc::Allocation;
use crate::secret::TokenSource;
use crate::tls::{TlsError, TlsSettings};
use serde::Deserialize;
use std::time::Duration;

#[derive(Clone, Debug)]
pub struct NomadSettings {
    /// Base URL, e.g. `http://127.0.0.1:4646`.
    pub address: String,
    pub token: TokenSource,
    pub region: Option<String>,
    pub tls: TlsSettings,
    /// Longest wait of one blocking query (Nomad caps it at 5 min).
    pub wait: Duration,
    /// Timeout of a request that does not block.
    pub request_timeout: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum NomadError {
    #[error("Nomad unreachable: {0}")]
    Unreachable(#[source] reqwest::Error),
    #[error(
        "Nomad denied the request: check the token's policy (agent:read, node:read, read-job): HTTP {status}: {body}"
    )]
    Forbidden { status: u16, body: String },
    #[error("Nomad answered HTTP {status} to {what}: {body}")]
    Status {
        what: &'static str,
        status: u16,
        body: String,
    },
    #[error("cannot decode Nomad's reply to {what}: {source}")]
    Decode {
        what: &'static str,
        #[source]
        source: serde_json::Error,
    },
    #[error("Nomad's /v1/agent/self has no client node ID: is this agent a client?")]
    NotAClient,
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error("cannot build HTTP client")]
    Build(#[source] reqwest::Error),
}

/// This agent's node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeIdentity {
    pub id: String,
    pub name: String,
}

pub struct NomadClient {
    http: reqwest::Client,
    settings: NomadSettings,
}

#[derive(Deserialize)]
struct AgentSelf {
    stats: Option<AgentStats>,
}

#[derive(Deserialize)]
struct AgentStats {
    client: Option<ClientStats>,
}

#[derive(Deserialize)]
struct ClientStats {
    node_id: Option<String>,
}

#[derive(Deserialize)]
struct NodeReply {
    #[serde(rename = "Name")]
    name: String,
}

fn truncate(body: &str) -> String {
    body.trim().chars().take(300).collect()
}

impl NomadClient {
    pub fn new(settings: NomadSettings) -> Result<Self, NomadError> {
        crate::tls::install_crypto_provider();
        let mut builder = reqwest::Client::builder().connect_timeout(settings.request_timeout);
        if settings.address.starts_with("https://") {
            builder = builder
                .use_preconfigured_tls(crate::tls::client_config(&settings.tls)?)
                .https_only(true);
        }
        let http = builder.build().map_err(NomadError::Build)?;
        Ok(Self { http, settings })
    }

    fn get(&self, path: &str) -> reqwest::RequestBuilder {
        let mut builder = self.http.get(format!(
            "{}{path}",
            self.settings.address.trim_end_matches('/')
        ));
        if let Some(region) = &self.settings.region {
            builder = builder.query(&[("region", region)]);
        }
        match self.settings.token.current() {
            Some(token) => builder.header("X-Nomad-Token", token.expose()),
            None => builder,
        }
    }

    async fn fetch(
        &self,
        what: &'static str,
        request: reqwest::RequestBuilder,
    ) -> Result<(String, u64), NomadError> {
        let response = request.send().await.map_err(NomadError::Unreachable)?;
        let status = response.status().as_u16();
        let index = response
            .headers()
            .get("X-Nomad-Index")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let body = response.text().await.map_err(NomadError::Unreachable)?;
        match status {
            200 => Ok((body, index)),
            401 | 403 => Err(NomadError::Forbidden {
                status,
                body: truncate(&body),
            }),
            _ => Err(NomadError::Status {
                what,
                status,
                body: truncate(&body),
            }),
        }
    }

    /// This agent's node: its ID from `/v1/agent/self` (`stats.client.node_id`, the client's
    /// Stats in client/client.go), its name from `/v1/node/:id`.
    pub async fn node(&self) -> Result<NodeIdentity, NomadError> {
        let timeout = self.settings.request_timeout;
        let (body, _) = self
            .fetch("agent self", self.get("/v1/agent/self").timeout(timeout))
            .await?;
        let agent: AgentSelf =
            serde_json::from_str(&body).map_err(|source| NomadError::Decode {
                what: "agent self",
                source,
            })?;
        let id = agent
            .stats
            .and_then(|s| s.client)
            .and_then(|c| c.node_id)
            .filter(|id| !id.is_empty())
            .ok_or(NomadError::NotAClient)?;
        let (body, _) = self
            .fetch("node", self.get(&format!("/v1/node/{id}")).timeout(timeout))
            .await?;
        let node: NodeReply = serde_json::from_str(&body).map_err(|source| NomadError::Decode {
            what: "node",
            source,
        })?;
        Ok(NodeIdentity {
            id,
            name: node.name,
        })
    }

    /// The node's allocations once they changed since `index` (at once for index 0), and
    /// the index to wait from next.
    pub async fn allocations(
        &self,
        node_id: &str,
        index: u64,
    ) -> Result<(Vec<Allocation>, u64), NomadError> {
        let wait = self.settings.wait;
        let request = self
            .get(&format!("/v1/node/{node_id}/allocations"))
            .query(&[
                ("index", index.to_string()),
                ("wait", format!("{}ms", wait.as_millis())),
            ])
            // Nomad adds up to wait/16 of jitter before answering.
            .timeout(wait + wait / 16 + self.settings.request_timeout);
        let (body, new_index) = self.fetch("node allocations", request).await?;
        let allocs = serde_json::from_str(&body).map_err(|source| NomadError::Decode {
            what: "node allocations",
            source,
        })?;
        Ok((allocs, new_index))
    }
}
