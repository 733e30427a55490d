//! The HTTP client for the few Consul endpoints the sink needs.

use super::ConsulSettings;
use super::decode::{NodeRead, decode_owned_node_services, txn_errors, txn_written};
use super::error::{ClientError, ConsulError, truncate};
use crate::model::Catalog;
use std::collections::BTreeMap;
use std::time::Duration;

/// A thin client for the few Consul endpoints the sink needs.
pub struct ConsulClient {
    http: reqwest::Client,
    pub(super) settings: ConsulSettings,
}

impl ConsulClient {
    pub fn new(settings: ConsulSettings) -> Result<Self, ClientError> {
        // reqwest's rustls needs the process-wide provider even for plain http clients.
        crate::tls::install_crypto_provider();
        let mut builder = reqwest::Client::builder()
            .timeout(settings.request_timeout)
            .connect_timeout(settings.request_timeout);
        if settings.address.starts_with("https://") {
            builder = builder
                .use_preconfigured_tls(crate::tls::client_config(&settings.tls)?)
                .https_only(true);
        }
        let http = builder.build().map_err(ClientError::Build)?;
        Ok(Self { http, settings })
    }

    /// The same Consul, token and settings, writing under `node` as its owner: node-local
    /// mode's convention, where a node's entries are owned by the node's name.
    pub fn for_node(&self, node: &str) -> Self {
        let mut settings = self.settings.clone();
        settings.node = node.to_string();
        settings.owner = node.to_string();
        Self {
            http: self.http.clone(),
            settings,
        }
    }

    /// The nodes carrying every `meta` pair (Consul's `?node-meta=key:value`, all of which
    /// must match: agent/catalog_endpoint.go `ListNodes`, state `NodesByMeta`).
    pub async fn nodes_with_meta(
        &self,
        meta: &[(&str, &str)],
    ) -> Result<Vec<CatalogNode>, ConsulError> {
        let filters: Vec<(&str, String)> = meta
            .iter()
            .map(|(key, value)| ("node-meta", format!("{key}:{value}")))
            .collect();
        let request = self
            .request(reqwest::Method::GET, "/v1/catalog/nodes")
            .query(&filters);
        let (status, body) = send(request).await?;
        match status {
            200 => serde_json::from_str(&body).map_err(|e| ConsulError::Decode {
                what: "catalog nodes",
                source: e.into(),
            }),
            403 => Err(ConsulError::Forbidden(format!(
                "HTTP 403: {}",
                truncate(&body)
            ))),
            _ => Err(ConsulError::Status {
                what: "catalog nodes",
                status,
                body: truncate(&body),
            }),
        }
    }

    /// Removes this client's node (and with it whatever is still registered on it:
    /// agent/consul/catalog_endpoint.go `Deregister` with only a node).
    pub async fn deregister_node(&self) -> Result<(), ConsulError> {
        let body = serde_json::json!({ "Node": self.settings.node });
        let request = self
            .request(reqwest::Method::PUT, "/v1/catalog/deregister")
            .json(&body);
        let (status, body) = send(request).await?;
        match status {
            200 => Ok(()),
            403 => Err(ConsulError::Forbidden(format!(
                "HTTP 403: {}",
                truncate(&body)
            ))),
            _ => Err(ConsulError::Status {
                what: "catalog deregister",
                status,
                body: truncate(&body),
            }),
        }
    }

    fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        let builder = self.local_request(method, path);
        match &self.settings.datacenter {
            Some(dc) => builder.query(&[("dc", dc)]),
            None => builder,
        }
    }

    /// A request to the agent itself (`/v1/agent/...`), which serves its own datacenter only.
    pub(super) fn local_request(
        &self,
        method: reqwest::Method,
        path: &str,
    ) -> reqwest::RequestBuilder {
        let builder = self
            .http
            .request(method, format!("{}{path}", self.settings.address));
        match self.settings.token.current() {
            Some(token) => builder.header("X-Consul-Token", token.expose()),
            None => builder,
        }
    }

    /// Everything under our node; an absent node is an empty read. Entries equal to `desired`
    /// ones share them. Consul answers an unknown node with 200 and nulls
    /// (agent/catalog_endpoint.go `CatalogNodeServiceList`), never 404: a 404 comes from a
    /// proxy or a wrong path and is an error, or workersd would recreate what it cannot see.
    pub async fn read_node(&self, desired: &Catalog) -> Result<NodeRead, ConsulError> {
        let path = format!("/v1/catalog/node-services/{}", self.settings.node);
        let response = self
            .request(reqwest::Method::GET, &path)
            .send()
            .await
            .map_err(ConsulError::Unreachable)?;
        let status = response.status().as_u16();
        let index = consul_index(&response);
        if status == 200 {
            // A token without node:read (or without service:read on some entry) gets an
            // emptied or partial reply, not an error: taking it for the node's content would
            // create the node over one we cannot see, or re-register over hidden entries.
            // Consul only says so to a named token (the anonymous token's writes fail later).
            if filtered_by_acls(&response) {
                return Err(ConsulError::Forbidden(format!(
                    "the token may not read node {:?} and everything on it (needs node:read on it and service:read on its services); Consul filtered the reply (X-Consul-Results-Filtered-By-ACLs)",
                    self.settings.node
                )));
            }
            let owner = self.settings.owner.clone();
            let read = decode_streamed(response, desired.clone(), owner).await?;
            return Ok(NodeRead { index, ..read });
        }
        let body = response.text().await.map_err(ConsulError::Unreachable)?;
        match status {
            403 => Err(ConsulError::Forbidden(format!(
                "HTTP 403: {}",
                truncate(&body)
            ))),
            _ => Err(ConsulError::Status {
                what: "node-services",
                status,
                body: truncate(&body),
            }),
        }
    }

    /// Blocks until what `read_node` would return may differ from the read at `index`, or
    /// `wait` passes. `Unchanged` only when Consul answered with the same index; a moved
    /// index (a write, or one that went back after a restore) or any failure is `Changed`,
    /// since only a re-read can tell what happened. The reply body is not read: after a
    /// wait that ran out, it is the whole node again.
    pub async fn wait_for_change(&self, index: u64, wait: Duration) -> Watched {
        let path = format!("/v1/catalog/node-services/{}", self.settings.node);
        let response = self
            .request(reqwest::Method::GET, &path)
            .query(&[
                ("index", index.to_string()),
                ("wait", format!("{}ms", wait.as_millis())),
            ])
            // Consul adds up to wait/16 of jitter before answering.
            .timeout(wait + wait / 16 + self.settings.request_timeout)
            .send()
            .await;
        match response {
            Ok(r) if r.status().as_u16() == 200 && consul_index(&r) == index => Watched::Unchanged,
            _ => Watched::Changed,
        }
    }

    /// Sends one transaction: `body` is a JSON array of operations.
    /// Returns the ModifyIndex of each service the txn wrote, by ID.
    pub(super) async fn txn(&self, body: Vec<u8>) -> Result<BTreeMap<String, u64>, ConsulError> {
        let request = self
            .request(reqwest::Method::PUT, "/v1/txn")
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(body);
        let (status, body) = send(request).await?;
        match status {
            200 => Ok(txn_written(&body)),
            403 => Err(ConsulError::Forbidden(format!(
                "HTTP 403: {}",
                truncate(&body)
            ))),
            409 => {
                let failed = txn_errors(&body);
                let errors = if failed.is_empty() {
                    truncate(&body)
                } else {
                    failed
                        .iter()
                        .map(|(i, what)| format!("op {i}: {}", truncate(what)))
                        .collect::<Vec<_>>()
                        .join("; ")
                };
                Err(ConsulError::TxnRejected {
                    status,
                    errors,
                    failed,
                })
            }
            _ => Err(ConsulError::Status {
                what: "txn",
                status,
                body: truncate(&body),
            }),
        }
    }
}

/// Decodes a node-services reply while it arrives: a large node's reply collected first
/// (and copied again into a `String` by reqwest) would be held twice on top of the steady
/// state at every resync. Chunks go to a blocking thread that decodes from a `Read`; the
/// channel holds a few, so the memory in flight is a few chunks and one entry. `desired` is
/// a clone of the catalog, whose entries are shared, not copied.
async fn decode_streamed(
    mut response: reqwest::Response,
    desired: Catalog,
    owner: String,
) -> Result<NodeRead, ConsulError> {
    let (chunks, received) = tokio::sync::mpsc::channel(4);
    let decoder = tokio::task::spawn_blocking(move || {
        let body = ChunkReader {
            chunks: received,
            current: bytes::Bytes::new(),
        };
        decode_owned_node_services(
            std::io::BufReader::with_capacity(64 * 1024, body),
            &desired,
            &owner,
        )
    });
    let mut interrupted = None;
    loop {
        match response.chunk().await {
            Ok(Some(chunk)) => {
                // The decoder stops reading at the first error and reports it below.
                if chunks.send(chunk).await.is_err() {
                    break;
                }
            }
            Ok(None) => break,
            Err(e) => {
                interrupted = Some(ConsulError::Unreachable(e));
                break;
            }
        }
    }
    drop(chunks);
    let decoded = decoder.await.map_err(|e| ConsulError::Decode {
        what: "node-services",
        source: e.into(),
    })?;
    // A reply cut off in transit fails to decode too; the cause is the connection.
    match interrupted {
        Some(e) => Err(e),
        None => decoded,
    }
}

/// A reply body as a blocking `Read`, fed chunk by chunk from the async side.
struct ChunkReader {
    chunks: tokio::sync::mpsc::Receiver<bytes::Bytes>,
    current: bytes::Bytes,
}

impl std::io::Read for ChunkReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        while self.current.is_empty() {
            match self.chunks.blocking_recv() {
                Some(chunk) => self.current = chunk,
                None => return Ok(0),
            }
        }
        let n = buf.len().min(self.current.len());
        buf[..n].copy_from_slice(&self.current.split_to(n));
        Ok(n)
    }
}

/// Consul's `X-Consul-Results-Filtered-By-ACLs` (agent/http.go `setResultsFilteredByACLs`).
fn filtered_by_acls(response: &reqwest::Response) -> bool {
    response
        .headers()
        .get("X-Consul-Results-Filtered-By-ACLs")
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"true"))
}

fn consul_index(response: &reqwest::Response) -> u64 {
    response
        .headers()
        .get("X-Consul-Index")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// One node of a `/v1/catalog/nodes` reply.
#[derive(Clone, Debug, PartialEq, Eq, serde::Deserialize)]
pub struct CatalogNode {
    #[serde(rename = "Node")]
    pub name: String,
    #[serde(rename = "Meta", default, deserialize_with = "null_as_empty")]
    pub meta: BTreeMap<String, String>,
}

fn null_as_empty<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<BTreeMap<String, String>, D::Error> {
    let meta: Option<BTreeMap<String, String>> = serde::Deserialize::deserialize(d)?;
    Ok(meta.unwrap_or_default())
}

/// What a change watch saw.
#[derive(Debug, PartialEq, Eq)]
pub enum Watched {
    Unchanged,
    Changed,
}

/// Sends a request and reads the whole reply as text.
pub(super) async fn send(request: reqwest::RequestBuilder) -> Result<(u16, String), ConsulError> {
    let response = request.send().await.map_err(ConsulError::Unreachable)?;
    let status = response.status().as_u16();
    let body = response.text().await.map_err(ConsulError::Unreachable)?;
    Ok((status, body))
}

#[cfg(test)]
mod tests {
    use super::super::decode::decode_node_services;
    use super::*;

    #[test]
    fn a_reply_decodes_the_same_whatever_its_chunks() {
        let body = r#"{"Node":{"Node":"n","Meta":{"external-source":"workersd"}},"Services":[
            {"ID":"a","Service":"s","Port":9011,"Address":"x","Tags":["t\u003c"],"Meta":{"k":"v","worker-port":"9011"}},
            {"ID":"b","Service":"s","Port":9012,"Address":"x","Tags":null,"Meta":null}]}"#;
        let whole = decode_node_services(body.as_bytes(), &Catalog::new()).unwrap();
        assert_eq!(whole.services.len(), 2);
        for size in [1, 2, 3, 7, 64, body.len()] {
            let (chunks, received) = tokio::sync::mpsc::channel(body.len());
            for piece in body.as_bytes().chunks(size) {
                chunks
                    .try_send(bytes::Bytes::copy_from_slice(piece))
                    .unwrap();
            }
            drop(chunks);
            let reader = ChunkReader {
                chunks: received,
                current: bytes::Bytes::new(),
            };
            let read = decode_node_services(std::io::BufReader::new(reader), &Catalog::new());
            assert_eq!(read.unwrap(), whole, "chunks of {size} bytes");
        }
    }
}
