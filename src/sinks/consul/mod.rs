//! The Consul catalog sink. Every live worker becomes one service instance under a synthetic
//! node that workersd owns; writes go through `/v1/txn` in batches of at most 128 operations
//! (64 for Consul before 1.14).
//! What Consul really holds is re-read at start, after any error and when a blocking query
//! sees the node change (at most once per resync interval), and corrected: missing entries
//! re-registered, stale owned entries garbage-collected, entries of anyone else never touched.

use crate::catalog::plan::{self as reconcile, Op};
use crate::metrics::Metrics;
use crate::model::{Catalog, EXTERNAL_SOURCE, ServiceInstance, meta_keys};
use crate::pipeline::{DesiredRx, DesiredState};
use crate::secret::TokenSource;
pub mod quarantine;

use self::quarantine::Quarantine;
use backon::BackoffBuilder;
use serde::{Deserialize, Serialize};
use serde_json::json;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use tokio::time::Instant;

/// Operations per transaction: Consul 1.14 and later accept 128.
pub const MAX_TXN_OPS: usize = 128;
/// Older Consul accepts 64 and answers 413 "too many operations" above; the sink then keeps
/// to this for the rest of its life (one refused request against an old Consul).
pub const LEGACY_MAX_TXN_OPS: usize = 64;
/// Consul's default `limits.txn_max_req_len`. Entries with meta and tags at Consul's limits
/// are ~60 KB each, so a full batch of them would be refused; a smaller configured limit is
/// learnt from the 413.
pub const MAX_TXN_BYTES: usize = 512 * 1024;

/// How big a transaction this Consul accepts, as far as the sink knows.
#[derive(Debug)]
struct TxnLimits {
    ops: usize,
    bytes: usize,
}

impl TxnLimits {
    /// Whether `batch` can take one more operation of `len` encoded bytes.
    fn fit(&self, batch: &Batch, len: usize) -> bool {
        batch.ops.len() < self.ops && batch.body_len_with(len) <= self.bytes
    }

    /// Learns from Consul's refusal of `batch`: true when it should be split and resent
    /// (also when it was cut under a limit since lowered), false when that cannot help.
    fn shrink(&mut self, error: &ConsulError, batch: &Batch) -> bool {
        let ConsulError::Status {
            status: 413, body, ..
        } = error
        else {
            return false;
        };
        if body.contains("too many operations") {
            if batch.ops.len() <= self.ops {
                if self.ops <= LEGACY_MAX_TXN_OPS {
                    return false;
                }
                self.ops = LEGACY_MAX_TXN_OPS;
                tracing::info!(
                    ops = self.ops,
                    "Consul accepts fewer operations per transaction (before 1.14); batching accordingly"
                );
            }
            return true;
        }
        if body.contains("too large") {
            if batch.body_len() <= self.bytes {
                self.bytes = batch.body_len() / 2;
                tracing::warn!(
                    bytes = self.bytes,
                    "Consul refused a transaction as too large (limits.txn_max_req_len); sending smaller ones"
                );
            }
            return true;
        }
        false
    }
}

/// Encoded operations for one transaction; `None` marks the node's own registration.
#[derive(Default)]
struct Batch<'p> {
    ops: Vec<(Vec<u8>, Option<&'p Op>)>,
    bytes: usize,
}

impl<'p> Batch<'p> {
    fn push(&mut self, encoded: Vec<u8>, op: Option<&'p Op>) {
        self.bytes += encoded.len();
        self.ops.push((encoded, op));
    }

    /// `[a,b,c]`: brackets and one comma between operations.
    fn body_len(&self) -> usize {
        2 + self.bytes + self.ops.len().saturating_sub(1)
    }

    fn body_len_with(&self, len: usize) -> usize {
        2 + self.bytes + len + self.ops.len()
    }

    fn body(&self) -> Vec<u8> {
        let mut body = Vec::with_capacity(self.body_len());
        body.push(b'[');
        for (i, (encoded, _)) in self.ops.iter().enumerate() {
            if i > 0 {
                body.push(b',');
            }
            body.extend_from_slice(encoded);
        }
        body.push(b']');
        body
    }

    /// Splits into batches within `limits`, in order; each takes at least one operation.
    fn split(self, limits: &TxnLimits) -> Vec<Batch<'p>> {
        let mut pieces = vec![Batch::default()];
        for (encoded, op) in self.ops {
            let last = pieces.last_mut().expect("never empty");
            if !last.ops.is_empty() && !limits.fit(last, encoded.len()) {
                pieces.push(Batch::default());
            }
            pieces.last_mut().expect("never empty").push(encoded, op);
        }
        pieces
    }
}

fn encode(op: &serde_json::Value) -> Vec<u8> {
    serde_json::to_vec(op).expect("a JSON value always encodes")
}
const SINK: &str = "consul";

#[derive(Debug)]
pub struct ConsulSettings {
    /// Base URL, e.g. `http://127.0.0.1:8500`.
    pub address: String,
    pub token: TokenSource,
    pub datacenter: Option<String>,
    pub node: String,
    pub node_address: String,
    pub owner: String,
    pub resync_interval: Duration,
    pub request_timeout: Duration,
    /// Used for `https://` addresses.
    pub tls: crate::tls::TlsSettings,
}

/// Normalises `CONSUL_HTTP_ADDR`-style values (`host:port` or a URL) to a base URL.
pub fn normalize_address(raw: &str) -> Result<String, String> {
    let raw = raw.trim();
    let raw = match raw.strip_suffix('/') {
        Some(stripped) if !stripped.ends_with(':') && !stripped.ends_with('/') => stripped,
        _ => raw,
    };
    if raw.is_empty() {
        return Err("Consul address is empty".into());
    }
    let url = if raw.starts_with("http://") || raw.starts_with("https://") {
        raw.to_string()
    } else if raw.contains("://") {
        return Err(format!(
            "Consul address {raw:?} must use http:// or https://"
        ));
    } else {
        format!("http://{raw}")
    };
    let parsed = reqwest::Url::parse(&url)
        .map_err(|e| format!("Consul address {raw:?} is not a valid URL: {e}"))?;
    if parsed.host_str().is_none() {
        return Err(format!("Consul address {raw:?} has no host"));
    }
    Ok(url)
}

#[derive(Debug, thiserror::Error)]
pub enum ConsulError {
    #[error("Consul unreachable: {0}")]
    Unreachable(String),
    /// An unknown token (403 `ACL not found`), a write the token may not make (409 with
    /// `Permission denied` per operation) or a read Consul filtered for the token.
    #[error("Consul denied the request: check the ACL token's policy: {0}")]
    Forbidden(String),
    #[error("Consul rejected the transaction (HTTP {status}): {errors}")]
    TxnRejected {
        status: u16,
        errors: String,
        /// Consul's per-op errors (`OpIndex`, `What`); empty when the reply had none.
        failed: Vec<(usize, String)>,
    },
    #[error("Consul answered HTTP {status} to {what}: {body}")]
    Status {
        what: &'static str,
        status: u16,
        body: String,
    },
    #[error("cannot decode Consul's reply to {what}: {error}")]
    Decode { what: &'static str, error: String },
    #[error(
        "Consul node {node:?} exists but was not registered by workersd (NodeMeta external-source is {found:?}); choose another --consul-node"
    )]
    NodeNotOwned { node: String, found: Option<String> },
}

impl ConsulError {
    fn kind(&self) -> &'static str {
        match self {
            ConsulError::Unreachable(_) => "unreachable",
            ConsulError::Forbidden(_) => "forbidden",
            ConsulError::TxnRejected { .. } => "txn_rejected",
            ConsulError::Status { .. } => "status",
            ConsulError::Decode { .. } => "decode",
            ConsulError::NodeNotOwned { .. } => "node_not_owned",
        }
    }
}

/// The node and everything registered under it, as Consul reports it.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct NodeView {
    pub node_meta: Option<BTreeMap<String, String>>,
    pub services: Catalog,
    /// `X-Consul-Index` of the reply (0 when absent): where a change watch starts.
    pub index: u64,
    /// Each entry's `ModifyIndex`, read or learnt from our txn results: owned entries are
    /// deleted with `delete-cas` at it, so one re-registered by someone else since is kept.
    pub modify_index: ModifyIndexes,
}

/// `ModifyIndex` by service ID.
pub type ModifyIndexes = std::collections::HashMap<Arc<str>, u64>;

/// Decodes a node-services reply entry by entry into a catalog as it is read: a
/// resync re-reads every entry (40,000 at 10,000 pods), and entries equal to the desired
/// ones are shared, never materialised or collected in between.
/// The second field is our owner id: only entries carrying it must decode strictly.
struct NodeServicesSeed<'c>(&'c Catalog, &'c str, &'c mut ModifyIndexes);

impl<'de> serde::de::DeserializeSeed<'de> for NodeServicesSeed<'_> {
    type Value = (Option<NodeReply>, Catalog);
    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> serde::de::Visitor<'de> for NodeServicesSeed<'_> {
    type Value = (Option<NodeReply>, Catalog);
    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a node-services object")
    }
    fn visit_map<M: serde::de::MapAccess<'de>>(self, mut map: M) -> Result<Self::Value, M::Error> {
        let (mut node, mut services) = (None, Catalog::new());
        while let Some(key) = map.next_key::<String>()? {
            match key.as_str() {
                "Node" => node = map.next_value()?,
                "Services" => {
                    services = map.next_value_seed(ServicesSeed(self.0, self.1, self.2))?
                }
                _ => {
                    map.next_value::<serde::de::IgnoredAny>()?;
                }
            }
        }
        Ok((node, services))
    }
}

/// The `Services` array (or null) of a node-services reply; the second field is our owner.
struct ServicesSeed<'c>(&'c Catalog, &'c str, &'c mut ModifyIndexes);

impl<'de> serde::de::DeserializeSeed<'de> for ServicesSeed<'_> {
    type Value = Catalog;
    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_option(self)
    }
}

impl<'de> serde::de::Visitor<'de> for ServicesSeed<'_> {
    type Value = Catalog;
    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("an array of services or null")
    }
    fn visit_none<E>(self) -> Result<Catalog, E> {
        Ok(Catalog::new())
    }
    fn visit_unit<E>(self) -> Result<Catalog, E> {
        Ok(Catalog::new())
    }
    fn visit_some<D: serde::Deserializer<'de>>(self, d: D) -> Result<Catalog, D::Error> {
        d.deserialize_seq(self)
    }
    fn visit_seq<S: serde::de::SeqAccess<'de>>(self, mut seq: S) -> Result<Catalog, S::Error> {
        let mut services = Catalog::new();
        while let Some(mut s) = seq.next_element::<ServiceReply>()? {
            if let Port::Odd(odd) = &s.port {
                // Consul stores any int as a port (agent/structs NodeService.Port is an `int`,
                // never range-checked), so someone else's entry may hold -1 or 70000. It is
                // never ours to touch; only its ID matters (conflicts). Our own must be exact.
                if s.is_owned_by(self.1) {
                    return Err(serde::de::Error::custom(format!(
                        "service {:?}, which workersd owns, has Port {odd}, not a port number",
                        s.id
                    )));
                }
                s.port = Port::Valid(0);
            }
            let modify_index = s.modify_index;
            let (id, instance) = match self.0.get(s.id.as_str()) {
                // Shares the desired instance instead of a decoded copy.
                Some(want) if s.is(want) => (want.id.clone(), want.clone()),
                _ => {
                    let instance = s.into_instance();
                    (instance.id.clone(), Arc::new(instance))
                }
            };
            self.2.insert(id.clone(), modify_index);
            services.insert(id, instance);
        }
        Ok(services)
    }
}

#[derive(Deserialize)]
struct NodeReply {
    #[serde(rename = "Meta", alias = "NodeMeta", default)]
    meta: Option<BTreeMap<String, String>>,
}

#[derive(Deserialize)]
struct ServiceReply {
    #[serde(rename = "ID")]
    id: String,
    #[serde(rename = "Service")]
    service: String,
    #[serde(rename = "Address", default)]
    address: Option<String>,
    /// Absent when 0 (`json:",omitempty"` in agent/structs NodeService).
    #[serde(rename = "Port", default)]
    port: Port,
    #[serde(rename = "Tags", default)]
    tags: Option<Vec<String>>,
    #[serde(rename = "Meta", default)]
    meta: Option<Pairs>,
    #[serde(rename = "ModifyIndex", default)]
    modify_index: u64,
}

/// A service's `Port` as Consul may hold it: any JSON value is accepted, so that one foreign
/// entry with an odd port cannot make the whole reply undecodable.
#[derive(Debug, PartialEq)]
enum Port {
    Valid(u16),
    /// What was there instead, for the error message.
    Odd(String),
}

impl Default for Port {
    fn default() -> Self {
        Port::Valid(0)
    }
}

impl Port {
    fn get(&self) -> u16 {
        match self {
            Port::Valid(port) => *port,
            Port::Odd(_) => 0,
        }
    }
}

impl<'de> Deserialize<'de> for Port {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visit;
        impl<'de> serde::de::Visitor<'de> for Visit {
            type Value = Port;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a port")
            }
            fn visit_u64<E>(self, v: u64) -> Result<Port, E> {
                Ok(u16::try_from(v).map_or_else(|_| Port::Odd(v.to_string()), Port::Valid))
            }
            fn visit_i64<E>(self, v: i64) -> Result<Port, E> {
                Ok(u16::try_from(v).map_or_else(|_| Port::Odd(v.to_string()), Port::Valid))
            }
            fn visit_f64<E>(self, v: f64) -> Result<Port, E> {
                Ok(Port::Odd(v.to_string()))
            }
            fn visit_str<E>(self, v: &str) -> Result<Port, E> {
                Ok(Port::Odd(format!("{v:?}")))
            }
            fn visit_bool<E>(self, v: bool) -> Result<Port, E> {
                Ok(Port::Odd(v.to_string()))
            }
            fn visit_unit<E>(self) -> Result<Port, E> {
                Ok(Port::Valid(0))
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Port, A::Error> {
                while seq.next_element::<serde::de::IgnoredAny>()?.is_some() {}
                Ok(Port::Odd("an array".into()))
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Port, A::Error> {
                while map
                    .next_entry::<serde::de::IgnoredAny, serde::de::IgnoredAny>()?
                    .is_some()
                {}
                Ok(Port::Odd("an object".into()))
            }
        }
        deserializer.deserialize_any(Visit)
    }
}

/// A JSON object of strings as its pairs, in one allocation (a map costs a node per key, per
/// entry read).
#[derive(Debug, Default)]
struct Pairs(Vec<(String, String)>);

impl<'de> Deserialize<'de> for Pairs {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visit;
        impl<'de> serde::de::Visitor<'de> for Visit {
            type Value = Pairs;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("an object of strings")
            }
            fn visit_map<M: serde::de::MapAccess<'de>>(
                self,
                mut map: M,
            ) -> Result<Self::Value, M::Error> {
                let mut pairs = Vec::with_capacity(map.size_hint().unwrap_or(0).min(64));
                while let Some(pair) = map.next_entry()? {
                    pairs.push(pair);
                }
                Ok(Pairs(pairs))
            }
        }
        deserializer.deserialize_map(Visit)
    }
}

impl Pairs {
    fn get(&self, key: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

impl ServiceReply {
    /// Our marker and our owner id, as [`reconcile::is_owned_by`] decides it.
    fn is_owned_by(&self, owner: &str) -> bool {
        let meta = self.meta.as_ref();
        let get = |key| meta.and_then(|m| m.get(key));
        get(meta_keys::EXTERNAL_SOURCE) == Some(EXTERNAL_SOURCE)
            && get(meta_keys::OWNER) == Some(owner)
    }

    /// Whether this entry is exactly `want` as workersd publishes it.
    fn is(&self, want: &ServiceInstance) -> bool {
        let tags = self.tags.as_deref().unwrap_or_default();
        let empty = Pairs::default();
        let meta = self.meta.as_ref().unwrap_or(&empty);
        self.service == want.service
            && self.address.as_deref().unwrap_or_default() == want.address
            && self.port == Port::Valid(want.port)
            && tags == want.tags.as_slice()
            // Keys are unique in Consul's replies; a duplicate makes the lengths differ.
            && meta.0.len() == want.meta.len() + 1
            && meta.get(meta_keys::WORKER_PORT) == Some(want.port.to_string().as_str())
            && want
                .meta
                .iter()
                .all(|(k, v)| meta.get(k) == Some(v.as_str()))
    }

    fn into_instance(self) -> ServiceInstance {
        let mut meta: BTreeMap<String, String> =
            self.meta.unwrap_or_default().0.into_iter().collect();
        // Stored without `worker-port` when it is the port (see ServiceInstance::meta); a
        // missing or wrong one is kept visible so the entry differs and gets rewritten.
        let port = self.port.get();
        match meta.get(meta_keys::WORKER_PORT) {
            Some(v) if *v == port.to_string() => {
                meta.remove(meta_keys::WORKER_PORT);
            }
            Some(_) => {}
            None => {
                meta.insert(meta_keys::WORKER_PORT.into(), String::new());
            }
        }
        ServiceInstance {
            id: self.id.into(),
            service: self.service,
            address: self.address.unwrap_or_default(),
            port,
            tags: self.tags.unwrap_or_default(),
            meta: Arc::new(meta),
        }
    }
}

/// A committed txn's reply: only what the sink keeps of it.
#[derive(Deserialize)]
struct TxnReply {
    #[serde(rename = "Results", default)]
    results: Option<Vec<TxnResultReply>>,
}

#[derive(Deserialize)]
struct TxnResultReply {
    #[serde(rename = "Service", default)]
    service: Option<ServiceIndexReply>,
}

#[derive(Deserialize)]
struct ServiceIndexReply {
    #[serde(rename = "ID")]
    id: String,
    #[serde(rename = "ModifyIndex", default)]
    modify_index: u64,
}

#[derive(Deserialize)]
struct TxnErrors {
    #[serde(rename = "Errors", default)]
    errors: Option<Vec<TxnError>>,
}

#[derive(Deserialize)]
struct TxnError {
    #[serde(rename = "OpIndex", default)]
    op_index: usize,
    #[serde(rename = "What", default)]
    what: String,
}

#[derive(Serialize)]
struct ServiceBody<'a> {
    #[serde(rename = "ID")]
    id: &'a str,
    #[serde(rename = "Service")]
    service: &'a str,
    #[serde(rename = "Address")]
    address: &'a str,
    #[serde(rename = "Port")]
    port: u16,
    #[serde(rename = "Tags")]
    tags: &'a [String],
    #[serde(rename = "Meta")]
    meta: BTreeMap<String, String>,
}

/// A thin client for the few Consul endpoints the sink needs.
pub struct ConsulClient {
    http: reqwest::Client,
    settings: ConsulSettings,
}

impl ConsulClient {
    pub fn new(settings: ConsulSettings) -> Result<Self, String> {
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
        let http = builder
            .build()
            .map_err(|e| format!("cannot build HTTP client: {e}"))?;
        Ok(Self { http, settings })
    }

    fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        let mut builder = self
            .http
            .request(method, format!("{}{path}", self.settings.address));
        if let Some(dc) = &self.settings.datacenter {
            builder = builder.query(&[("dc", dc)]);
        }
        if let Some(token) = self.settings.token.current() {
            builder = builder.header("X-Consul-Token", token.expose());
        }
        builder
    }

    /// Everything under our node; an absent node is an empty view. Entries equal to `desired`
    /// ones share them. Consul answers an unknown node with 200 and nulls
    /// (agent/catalog_endpoint.go `CatalogNodeServiceList`), never 404: a 404 comes from a
    /// proxy or a wrong path and is an error, or workersd would recreate what it cannot see.
    pub async fn read_node(&self, desired: &Catalog) -> Result<NodeView, ConsulError> {
        let path = format!("/v1/catalog/node-services/{}", self.settings.node);
        let response = self
            .request(reqwest::Method::GET, &path)
            .send()
            .await
            .map_err(unreachable)?;
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
            let view = decode_streamed(response, desired.clone(), owner).await?;
            return Ok(NodeView { index, ..view });
        }
        let body = response.text().await.map_err(unreachable)?;
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

    fn node_op(&self) -> serde_json::Value {
        // Sent only when the read found no node: `cas` at ModifyIndex 0 creates it only if
        // still absent (Consul's ensureNodeCASTxn), so a node someone else registered since
        // is refused ("index is stale") instead of taken over.
        let mut node = json!({
            "Node": self.settings.node,
            "Address": self.settings.node_address,
            "Meta": { meta_keys::EXTERNAL_SOURCE: EXTERNAL_SOURCE },
            "ModifyIndex": 0,
        });
        if let Some(dc) = &self.settings.datacenter {
            node["Datacenter"] = json!(dc);
        }
        json!({ "Node": { "Verb": "cas", "Node": node } })
    }

    /// `modify_index` is the entry's known ModifyIndex (used by deletes).
    fn service_op(&self, op: &Op, modify_index: u64) -> serde_json::Value {
        match op {
            Op::Register(i) => json!({ "Service": {
                "Verb": "set",
                "Node": self.settings.node,
                "Service": ServiceBody {
                    id: &i.id, service: &i.service, address: &i.address, port: i.port, tags: &i.tags, meta: i.published_meta(),
                },
            }}),
            // Only if unchanged since read (Consul's deleteServiceCASTxn): an entry someone
            // re-registered under that ID is refused ("index is stale"), then re-read.
            Op::Deregister(i) => json!({ "Service": {
                "Verb": "delete-cas",
                "Node": self.settings.node,
                "Service": { "ID": &*i.id, "Service": i.service, "ModifyIndex": modify_index },
            }}),
        }
    }

    /// Sends one transaction: `body` is a JSON array of operations.
    /// Returns the ModifyIndex of each service the txn wrote, by ID.
    async fn txn(&self, body: Vec<u8>) -> Result<BTreeMap<String, u64>, ConsulError> {
        let request = self
            .request(reqwest::Method::PUT, "/v1/txn")
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(body);
        let (status, body) = send(request).await?;
        match status {
            200 => Ok(serde_json::from_str::<TxnReply>(&body)
                .ok()
                .and_then(|r| r.results)
                .unwrap_or_default()
                .into_iter()
                .filter_map(|r| r.service)
                .map(|s| (s.id, s.modify_index))
                .collect()),
            403 => Err(ConsulError::Forbidden(format!(
                "HTTP 403: {}",
                truncate(&body)
            ))),
            409 => {
                let failed: Vec<(usize, String)> = serde_json::from_str::<TxnErrors>(&body)
                    .ok()
                    .and_then(|e| e.errors)
                    .unwrap_or_default()
                    .into_iter()
                    .map(|e| (e.op_index, e.what))
                    .collect();
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

/// Decodes a node-services reply while it arrives. At 10,000 pods the reply is ~18 MB of
/// JSON; collecting it first (and reqwest's copy into a `String`) held twice that on top of
/// the steady state at every resync. Chunks go to a blocking thread that decodes from a
/// `Read`; the channel holds a few, so the memory in flight is a few chunks and one entry.
/// `desired` is a clone of the catalog (its entries are shared, ~2 MB at 40,000 entries).
async fn decode_streamed(
    mut response: reqwest::Response,
    desired: Catalog,
    owner: String,
) -> Result<NodeView, ConsulError> {
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
                interrupted = Some(unreachable(e));
                break;
            }
        }
    }
    drop(chunks);
    let decoded = decoder.await.map_err(|e| ConsulError::Decode {
        what: "node-services",
        error: e.to_string(),
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

/// Decodes a `/v1/catalog/node-services/:node` reply. Real Consul answers `{"Node": null}` for
/// an unknown node; `null` lists are empty lists. No entry is taken for ours, so an odd port
/// is tolerated on every one (see [`decode_owned_node_services`]).
pub fn decode_node_services(
    body: impl std::io::Read,
    desired: &Catalog,
) -> Result<NodeView, ConsulError> {
    decode_owned_node_services(body, desired, "")
}

/// As [`decode_node_services`], for the workersd instance `owner`: entries of anyone else are
/// decoded leniently (a port Consul holds but no port number is read as 0; they are never
/// written), entries of `owner` strictly.
pub fn decode_owned_node_services(
    body: impl std::io::Read,
    desired: &Catalog,
    owner: &str,
) -> Result<NodeView, ConsulError> {
    use serde::de::DeserializeSeed;
    let mut decoder = serde_json::Deserializer::from_reader(body);
    let mut modify_index = ModifyIndexes::new();
    let (node, services) = NodeServicesSeed(desired, owner, &mut modify_index)
        .deserialize(&mut decoder)
        .and_then(|reply| decoder.end().map(|()| reply))
        .map_err(|e| ConsulError::Decode {
            what: "node-services",
            error: e.to_string(),
        })?;
    let Some(node) = node else {
        return Ok(NodeView::default());
    };
    Ok(NodeView {
        node_meta: Some(node.meta.unwrap_or_default()),
        services,
        index: 0,
        modify_index,
    })
}

/// Consul's `X-Consul-Results-Filtered-By-ACLs` (agent/http.go `setResultsFilteredByACLs`).
fn filtered_by_acls(response: &reqwest::Response) -> bool {
    response
        .headers()
        .get("X-Consul-Results-Filtered-By-ACLs")
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"true"))
}

/// One line for a txn refused for missing permissions: who lacks what, each permission
/// once, e.g. `token with AccessorID 'a1' lacks 'node:write' on "n", 'service:write' on "web"
/// (129 of 129 operations refused)`. `None` when no operation was refused for a permission.
/// Consul's wording is acl/errors.go `PermissionDeniedError.Error`.
/// A token that may not write the node can write nothing: one `Forbidden` that says which
/// permissions it lacks. Entries refused for permission are left out of the pass, so the
/// others are still published, and the pass then reports `Forbidden` (see
/// [`ConsulSink::permission_held`]).
fn forbidden_txn(error: &ConsulError, node_op: Option<usize>) -> Option<String> {
    let ConsulError::TxnRejected { failed, .. } = error else {
        return None;
    };
    if failed.is_empty() || !failed.iter().all(|(_, what)| is_permission_denied(what)) {
        return None;
    }
    let node_refused = node_op.is_some_and(|n| failed.iter().any(|(i, _)| *i == n));
    node_refused.then(|| permission_summary(failed, failed.len()))?
}

fn is_permission_denied(what: &str) -> bool {
    what.contains("Permission denied")
}

/// One line for the permission errors among `errors` (op index, text) of a txn of `ops`.
fn permission_summary(errors: &[(usize, String)], ops: usize) -> Option<String> {
    let denied: Vec<&str> = errors
        .iter()
        .map(|(_, what)| what.as_str())
        .filter(|what| is_permission_denied(what))
        .collect();
    let first = *denied.first()?;
    let mut who = None;
    let mut missing: Vec<&str> = Vec::new();
    for what in &denied {
        let Some((subject, rest)) = what.split_once(" lacks permission ") else {
            continue;
        };
        who.get_or_insert(subject.trim_start_matches("Permission denied: "));
        // `'service:write' on "web"`, without the anonymous token's explanation.
        let permission = rest.split(". The anonymous token").next().unwrap_or(rest);
        if !missing.contains(&permission) {
            missing.push(permission);
        }
    }
    let refused = format!("{} of {ops} operations refused", denied.len());
    Some(match who {
        Some(who) => {
            let hint = if who == "anonymous token" {
                " (no token was sent)"
            } else {
                ""
            };
            format!("{who}{hint} lacks {} ({refused})", missing.join(", "))
        }
        None => format!("{} ({refused})", truncate(first)),
    })
}

fn consul_index(response: &reqwest::Response) -> u64 {
    response
        .headers()
        .get("X-Consul-Index")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// What a change watch saw.
#[derive(Debug, PartialEq, Eq)]
pub enum Watched {
    Unchanged,
    Changed,
}

/// Sends a request and reads the whole reply as text.
async fn send(request: reqwest::RequestBuilder) -> Result<(u16, String), ConsulError> {
    let response = request.send().await.map_err(unreachable)?;
    let status = response.status().as_u16();
    let body = response.text().await.map_err(unreachable)?;
    Ok((status, body))
}

fn unreachable(e: reqwest::Error) -> ConsulError {
    // reqwest errors name the URL, never headers, so the token cannot leak here.
    ConsulError::Unreachable(e.to_string())
}

fn truncate(body: &str) -> String {
    let body = body.trim();
    match body.char_indices().nth(300) {
        Some((i, _)) => format!("{}…", &body[..i]),
        None => body.to_string(),
    }
}

/// Capped exponential backoff for retries while Consul is unhealthy, jittered so that many
/// sidecars that lost the same Consul do not retry in lockstep when it comes back: each delay
/// is the exponential step plus up to as much again at random, so within `[min, 2 * max)`.
struct Backoff {
    builder: backon::ExponentialBuilder,
    delays: backon::ExponentialBackoff,
}

impl Backoff {
    fn new(min: Duration, max: Duration) -> Self {
        let builder = backon::ExponentialBuilder::default()
            .with_min_delay(min)
            .with_max_delay(max)
            .with_jitter()
            .without_max_times();
        Self {
            builder,
            delays: builder.build(),
        }
    }
    fn next(&mut self) -> Duration {
        // Never runs out without a maximum of attempts; the cap is the fallback.
        self.delays
            .next()
            .unwrap_or_else(|| self.builder.build().next().unwrap_or_default())
    }
    fn reset(&mut self) {
        self.delays = self.builder.build();
    }
}

/// Result of one successful pass.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct SyncOutcome {
    pub requests: usize,
    pub registered: usize,
    pub deregistered: usize,
    pub conflicts: usize,
    pub deferred: usize,
    /// Operations Consul refused, held back and retried later.
    pub quarantined: usize,
}

/// The sink's memory of Consul between passes: `None` means "re-read before writing".
pub struct ConsulSink {
    client: Arc<ConsulClient>,
    metrics: Arc<Metrics>,
    known: Option<NodeView>,
    /// The index of every successful read, for the change watch (sent even when equal).
    reads: tokio::sync::watch::Sender<Option<u64>>,
    last_read: Option<Instant>,
    deregister_allowed: bool,
    reported_conflicts: Vec<String>,
    txn_limits: TxnLimits,
    /// Operations Consul refused, held back so they do not block the others.
    quarantine: Quarantine,
    /// The entries held back, published when the set changes (for Kubernetes Events).
    refused: tokio::sync::watch::Sender<quarantine::RefusedEntries>,
    /// This pass's entries the token may not write: left out so the others are published,
    /// then the pass reports `Forbidden`. Not quarantined: they are resent on the sink's
    /// own retry, so a fixed policy takes effect within seconds.
    denied: Vec<(usize, String)>,
    pub synced: Arc<AtomicBool>,
}

impl ConsulSink {
    pub fn new(client: ConsulClient, metrics: Arc<Metrics>) -> Self {
        Self {
            client: Arc::new(client),
            metrics,
            known: None,
            reads: tokio::sync::watch::Sender::new(None),
            last_read: None,
            deregister_allowed: false,
            reported_conflicts: Vec::new(),
            txn_limits: TxnLimits {
                ops: MAX_TXN_OPS,
                bytes: MAX_TXN_BYTES,
            },
            quarantine: Quarantine::default(),
            refused: tokio::sync::watch::Sender::new(Arc::new(Vec::new())),
            denied: Vec::new(),
            synced: Arc::new(AtomicBool::new(false)),
        }
    }

    /// Brings Consul to `desired` with the fewest writes; no request at all when the known
    /// state already matches.
    pub async fn sync(&mut self, desired: &DesiredState) -> Result<SyncOutcome, ConsulError> {
        // Once every target was probed after start, absent entries really are gone.
        self.deregister_allowed |= desired.complete;
        let owner = self.client.settings.owner.clone();
        let mut outcome = SyncOutcome::default();
        self.denied.clear();
        if self.known.is_none() {
            self.metrics.sink_request(SINK, "read");
            outcome.requests += 1;
            let view = self.client.read_node(&desired.catalog).await?;
            if let Some(meta) = &view.node_meta {
                let marker = meta.get(meta_keys::EXTERNAL_SOURCE);
                if marker.map(String::as_str) != Some(EXTERNAL_SOURCE) {
                    return Err(ConsulError::NodeNotOwned {
                        node: self.client.settings.node.clone(),
                        found: marker.cloned(),
                    });
                }
            }
            self.last_read = Some(Instant::now());
            self.reads.send_replace(Some(view.index));
            self.known = Some(view);
            crate::runtime::limits::release_free_memory();
        }
        let known = self.known.as_mut().expect("read above");
        let plan = reconcile::plan(
            &desired.catalog,
            &known.services,
            &owner,
            self.deregister_allowed,
        );
        outcome.conflicts = plan.conflicts.len();
        outcome.deferred = plan.deferred_deregistrations;
        // Reported when the set changes, not on every pass.
        if plan.conflicts != self.reported_conflicts {
            if !plan.conflicts.is_empty() {
                tracing::warn!(ids = ?plan.conflicts, "service IDs held by entries workersd does not own; left untouched");
            }
            self.reported_conflicts = plan.conflicts.clone();
        }
        // Services need their node; it is (re)created in the first batch when missing.
        let needs_node = known.node_meta.is_none();
        // Operations Consul refused stay out until their delay runs out or they change.
        self.quarantine
            .retain_planned(plan.first.iter().chain(&plan.ops));
        let now = Instant::now();
        let sendable = |ops: &[Op]| -> Vec<usize> {
            (0..ops.len())
                .filter(|&i| !self.quarantine.holds(&ops[i], now))
                .collect()
        };
        let (first, rest) = (sendable(&plan.first), sendable(&plan.ops));
        if first.is_empty() && rest.is_empty() {
            self.count_quarantined(&mut outcome);
            return self.permission_held().map_or(Ok(outcome), Err);
        }
        let mut batch = Batch::default();
        if needs_node {
            batch.push(encode(&self.client.node_op()), None);
        }
        for (ops, sendable) in [(&plan.first, first), (&plan.ops, rest)] {
            if sendable.is_empty() {
                continue;
            }
            for op in sendable.into_iter().map(|i| &ops[i]) {
                let modify_index = match op {
                    Op::Deregister(i) => self
                        .known
                        .as_ref()
                        .and_then(|k| k.modify_index.get(&i.id).copied())
                        // Unknown: refused as stale, and the re-read learns it.
                        .unwrap_or(0),
                    Op::Register(_) => 0,
                };
                let encoded = encode(&self.client.service_op(op, modify_index));
                if !batch.ops.is_empty() && !self.txn_limits.fit(&batch, encoded.len()) {
                    self.send(std::mem::take(&mut batch), &mut outcome).await?;
                }
                batch.push(encoded, Some(op));
            }
            // Rows deleted in `first` are committed before they are set again.
            if !batch.ops.is_empty() {
                self.send(std::mem::take(&mut batch), &mut outcome).await?;
            }
        }
        self.count_quarantined(&mut outcome);
        self.metrics
            .sink_operations(SINK, "register", outcome.registered as u64);
        self.metrics
            .sink_operations(SINK, "deregister", outcome.deregistered as u64);
        self.permission_held().map_or(Ok(outcome), Err)
    }

    /// Applies `batch` in one transaction, or in smaller ones when Consul refuses it as too
    /// big (413: more operations or bytes than it accepts); the limits learnt are kept. On
    /// any other error, the next pass re-reads Consul (a batch may have been applied in part).
    async fn send(
        &mut self,
        batch: Batch<'_>,
        outcome: &mut SyncOutcome,
    ) -> Result<(), ConsulError> {
        let mut queue = std::collections::VecDeque::from([batch]);
        while let Some(part) = queue.pop_front() {
            self.metrics.sink_request(SINK, "txn");
            outcome.requests += 1;
            match self.client.txn(part.body()).await {
                Ok(written) => self.applied(part, &written, outcome),
                Err(e) if part.ops.len() > 1 && self.txn_limits.shrink(&e, &part) => {
                    for piece in part.split(&self.txn_limits).into_iter().rev() {
                        queue.push_front(piece);
                    }
                }
                Err(e) => {
                    let node_op = part.ops.iter().position(|(_, op)| op.is_none());
                    if let Some(summary) = forbidden_txn(&e, node_op) {
                        self.known = None;
                        return Err(ConsulError::Forbidden(summary));
                    }
                    match self.isolate(&e, part) {
                        Some(rest) if rest.ops.is_empty() => {}
                        Some(rest) => queue.push_front(rest),
                        None => {
                            self.known = None;
                            return Err(e);
                        }
                    }
                }
            }
        }
        Ok(())
    }

    /// Holds back the operations of `batch` that Consul refused for themselves and returns
    /// the others, to resend; `None` when isolating cannot help (see [`quarantine::isolate`]).
    fn isolate<'p>(&mut self, error: &ConsulError, batch: Batch<'p>) -> Option<Batch<'p>> {
        let refusals = match error {
            ConsulError::TxnRejected { failed, .. } => failed.clone(),
            // One operation over Consul's body limit on its own.
            ConsulError::Status {
                status: 413, body, ..
            } if batch.ops.len() == 1 => vec![(0, body.clone())],
            _ => return None,
        };
        let node_op = batch.ops.iter().position(|(_, op)| op.is_none());
        let isolation = quarantine::isolate(batch.ops.len(), &refusals, node_op)?;
        let now = Instant::now();
        let mut slots: Vec<_> = batch.ops.into_iter().map(Some).collect();
        for (i, what) in &isolation.refused {
            if let Some((_, Some(op))) = slots[*i].take() {
                if is_permission_denied(what) {
                    self.denied.push((*i, what.clone()));
                } else {
                    self.hold(op, what, now);
                }
            }
        }
        let mut rest = Batch::default();
        for (encoded, op) in slots.into_iter().flatten() {
            rest.push(encoded, op);
        }
        Some(rest)
    }

    fn hold(&mut self, op: &Op, what: &str, now: Instant) {
        let (delay, refusals) = self.quarantine.refuse(op, what, now);
        let (verb, instance) = match op {
            Op::Register(i) => ("register", i),
            Op::Deregister(i) => ("deregister", i),
        };
        self.metrics.sink_error(SINK, "entry_refused");
        tracing::warn!(
            service_id = %instance.id,
            service = %instance.service,
            address = %instance.address,
            port = instance.port,
            field = quarantine::refused_field(what).unwrap_or("-"),
            verb,
            error = %truncate(what),
            retry_in = ?delay,
            refusals,
            "Consul refused one catalog entry; it is held back and retried later, every other entry is published"
        );
    }

    fn applied(
        &mut self,
        batch: Batch<'_>,
        written: &BTreeMap<String, u64>,
        outcome: &mut SyncOutcome,
    ) {
        let known = self.known.as_mut().expect("read before any write");
        for (_, op) in batch.ops {
            match op {
                None => {
                    known.node_meta = Some(BTreeMap::from([(
                        meta_keys::EXTERNAL_SOURCE.to_string(),
                        EXTERNAL_SOURCE.to_string(),
                    )]));
                }
                Some(op) => {
                    self.quarantine.accepted(op);
                    match op {
                        Op::Register(i) => {
                            outcome.registered += 1;
                            match written.get(&*i.id) {
                                Some(&index) => known.modify_index.insert(i.id.clone(), index),
                                None => known.modify_index.remove(&i.id),
                            };
                        }
                        Op::Deregister(i) => {
                            outcome.deregistered += 1;
                            known.modify_index.remove(&i.id);
                        }
                    }
                    reconcile::apply(&mut known.services, std::slice::from_ref(op));
                }
            }
        }
    }

    /// `Forbidden` when this pass left out entries the token may not write: the pass
    /// published what it could, and the policy gets fixed (readiness says so) rather than
    /// the refusal passing as a synced catalog.
    fn permission_held(&self) -> Option<ConsulError> {
        let summary = permission_summary(&self.denied, self.denied.len())?;
        Some(ConsulError::Forbidden(summary))
    }

    fn count_quarantined(&self, outcome: &mut SyncOutcome) {
        outcome.quarantined = self.quarantine.len();
        self.metrics.sink_quarantined(SINK, outcome.quarantined);
        self.publish_refused();
    }

    /// Sends the held entries when they differ from those sent last: an entry leaves once
    /// accepted, no longer desired, or changed.
    fn publish_refused(&self) {
        let entries = self.quarantine.entries();
        self.refused.send_if_modified(|sent| {
            let changed = **sent != entries;
            if changed {
                *sent = Arc::new(entries);
            }
            changed
        });
    }

    /// The entries Consul refused and the sink holds back, updated whenever that set changes.
    pub fn refused(&self) -> tokio::sync::watch::Receiver<quarantine::RefusedEntries> {
        self.refused.subscribe()
    }

    /// Forget the known state so the next pass re-reads Consul.
    pub fn invalidate(&mut self) {
        self.known = None;
    }

    /// Follows the desired state until the channel closes. Never deregisters on shutdown: a
    /// restarting workersd must leave live entries in place.
    pub async fn run(self, desired: DesiredRx) {
        self.run_until(desired, std::future::pending()).await;
    }

    /// As [`Self::run`], until `stop` completes (after the pass in progress). Returns the sink,
    /// so a last pass (`--deregister-on-exit`) uses the same client and memory of Consul.
    ///
    /// Consul is re-read only when a blocking query on the node reports a change (our own
    /// writes included), at most once per resync interval: re-reading 40,000 unchanged
    /// entries every interval was a quarter of the steady-state CPU at 10,000 pods.
    pub async fn run_until(
        mut self,
        mut desired: DesiredRx,
        stop: impl std::future::Future<Output = ()>,
    ) -> Self {
        tokio::pin!(stop);
        let resync_interval = self.client.settings.resync_interval;
        let changes = Arc::new(tokio::sync::Notify::new());
        let watcher = AbortOnDrop(tokio::spawn(watch_changes(
            self.client.clone(),
            self.reads.subscribe(),
            changes.clone(),
            self.metrics.clone(),
        )));
        // Capped low: a retry is one cheap read, and a long outage must not delay convergence.
        // With jitter the delays are 100-200 ms at first and at most 5 s.
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_millis(2500));
        let mut change_seen = false;
        loop {
            let state = desired.borrow_and_update().clone();
            let started = std::time::Instant::now();
            let retry_in = match self.sync(&state).await {
                Ok(outcome) => {
                    self.metrics.reconcile_duration(started.elapsed());
                    if outcome.registered + outcome.deregistered > 0 {
                        tracing::info!(
                            registered = outcome.registered,
                            deregistered = outcome.deregistered,
                            requests = outcome.requests,
                            "consul catalog updated"
                        );
                    }
                    if state.complete {
                        self.synced.store(true, Ordering::Relaxed);
                    }
                    backoff.reset();
                    None
                }
                Err(e) => {
                    // Refusals isolated before the pass failed are held all the same.
                    self.publish_refused();
                    self.metrics.sink_error(SINK, e.kind());
                    let delay = backoff.next();
                    tracing::warn!(error = %e, retry_in = ?delay, "consul sync failed; will re-read and retry");
                    self.invalidate();
                    Some(delay)
                }
            };
            let next_resync = self
                .last_read
                .map_or_else(Instant::now, |at| at + resync_interval);
            let wake_at = match retry_in {
                Some(delay) => Some(Instant::now() + delay),
                None => [
                    change_seen.then_some(next_resync),
                    self.quarantine.next_retry(),
                ]
                .into_iter()
                .flatten()
                .min(),
            };
            tokio::select! {
                () = &mut stop => break,
                changed = desired.changed(), if retry_in.is_none() => {
                    if changed.is_err() {
                        break;
                    }
                }
                () = changes.notified(), if !change_seen => change_seen = true,
                () = sleep_until_some(wake_at) => {}
            }
            if change_seen && Instant::now() >= next_resync {
                self.invalidate();
                change_seen = false;
            }
        }
        drop(watcher);
        self
    }
}

/// Aborts the task when dropped, so a watch never outlives its sink.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

async fn sleep_until_some(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Watches the node from the index of the sink's last read, and tells the sink when a
/// re-read is due. After telling, it waits for that re-read before watching again.
async fn watch_changes(
    client: Arc<ConsulClient>,
    mut reads: tokio::sync::watch::Receiver<Option<u64>>,
    changes: Arc<tokio::sync::Notify>,
    metrics: Arc<Metrics>,
) {
    // The blocking wait is the resync interval. A snapshot restore answers a blocked query at
    // once with a lower index; a Consul that lost its data some other way (a new cluster) is
    // only noticed when the wait runs out, and this bounds how long that takes.
    let wait = client.settings.resync_interval;
    // A server that answers at once without a new index (no blocking support, a caching
    // proxy) must not become a busy loop.
    let min_spacing = wait.min(Duration::from_secs(1));
    loop {
        let Some(index) = *reads.borrow_and_update() else {
            if reads.changed().await.is_err() {
                return;
            }
            continue;
        };
        let started = Instant::now();
        let watched = if index == 0 {
            // No X-Consul-Index to block on: fall back to a re-read every interval.
            tokio::time::sleep(wait).await;
            Watched::Changed
        } else {
            metrics.sink_request(SINK, "watch");
            client.wait_for_change(index, wait).await
        };
        if watched == Watched::Changed {
            changes.notify_one();
            if reads.changed().await.is_err() {
                return;
            }
        }
        tokio::time::sleep_until(started + min_spacing).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalizes_addresses_like_consul_http_addr() {
        assert_eq!(
            normalize_address("127.0.0.1:8500").unwrap(),
            "http://127.0.0.1:8500"
        );
        assert_eq!(
            normalize_address("http://consul:8500/").unwrap(),
            "http://consul:8500"
        );
        assert!(normalize_address("").is_err());
        assert!(normalize_address("ftp://x").is_err());
        assert_eq!(
            normalize_address("https://consul:8501").unwrap(),
            "https://consul:8501"
        );
        assert!(normalize_address("http://").is_err());
    }

    #[test]
    fn backoff_is_jittered_and_capped() {
        let (min, max) = (Duration::from_millis(100), Duration::from_millis(350));
        let sequence = || {
            let mut b = Backoff::new(min, max);
            (0..12).map(|_| b.next()).collect::<Vec<_>>()
        };
        let (one, two) = (sequence(), sequence());
        // Two sidecars starting from the same state do not retry in lockstep.
        assert_ne!(one, two);
        for (i, delay) in one.iter().chain(&two).enumerate() {
            let step = (min * 2u32.pow((i % 12) as u32)).min(max);
            // The exponential step, plus up to as much again.
            assert!(*delay >= step && *delay < step * 2, "{i}: {delay:?}");
            assert!(*delay < max * 2);
        }
        let mut b = Backoff::new(min, max);
        for _ in 0..5 {
            b.next();
        }
        b.reset();
        assert!(b.next() < min * 2, "back to the first step");
    }

    #[test]
    fn worker_port_meta_is_stored_as_the_port_and_drift_stays_visible() {
        let body = |meta: &str| {
            format!(
                r#"{{"Node":{{"Node":"n","Meta":{{}}}},"Services":[{{"ID":"a","Service":"s","Port":9011,"Address":"x","Meta":{meta}}}]}}"#
            )
        };
        let decoded = |meta: &str| {
            decode_node_services(body(meta).as_bytes(), &Catalog::new())
                .unwrap()
                .services["a"]
                .clone()
        };
        let right = decoded(r#"{"worker-port":"9011","team":"web"}"#);
        assert_eq!(*right.meta, BTreeMap::from([("team".into(), "web".into())]));
        assert_eq!(right.published_meta()["worker-port"], "9011");
        // A wrong or missing worker-port must not compare equal to what workersd wants.
        let wanted = ServiceInstance {
            meta: Arc::new(BTreeMap::from([("team".into(), "web".into())])),
            ..(*right).clone()
        };
        assert_eq!(*right, wanted);
        assert_ne!(*decoded(r#"{"worker-port":"9999","team":"web"}"#), wanted);
        assert_ne!(*decoded(r#"{"team":"web"}"#), wanted);
    }

    #[test]
    fn a_reread_entry_equal_to_the_desired_one_is_shared_not_copied() {
        // Go escapes <, > and & in JSON: such strings still compare equal.
        let want = Arc::new(ServiceInstance {
            id: "o:s:x:9011".into(),
            service: "s".into(),
            address: "x".into(),
            port: 9011,
            tags: vec!["a<b".into()],
            meta: Arc::new(BTreeMap::from([("team".into(), "r&d".into())])),
        });
        let desired = Catalog::from([(want.id.clone(), want.clone())]);
        let body = r#"{"Node":{"Node":"n","Meta":{}},"Services":[
            {"ID":"o:s:x:9011","Service":"s","Port":9011,"Address":"x","Tags":["a\u003cb"],"Meta":{"team":"r\u0026d","worker-port":"9011"}},
            {"ID":"other","Service":"s","Port":1,"Address":"x","Tags":null,"Meta":null}]}"#;
        let view = decode_node_services(body.as_bytes(), &desired).unwrap();
        assert!(Arc::ptr_eq(&view.services["o:s:x:9011"], &want));
        assert_eq!(view.services["other"].port, 1);
        // Any difference (here the tag) gives a decoded copy that compares unequal.
        let changed = body.replace("a\\u003cb", "c");
        let view = decode_node_services(changed.as_bytes(), &desired).unwrap();
        assert!(!Arc::ptr_eq(&view.services["o:s:x:9011"], &want));
        assert_ne!(view.services["o:s:x:9011"], want);
        assert_eq!(view.services["o:s:x:9011"].tags, vec!["c".to_string()]);
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
            let view = decode_node_services(std::io::BufReader::new(reader), &Catalog::new());
            assert_eq!(view.unwrap(), whole, "chunks of {size} bytes");
        }
    }

    #[test]
    fn an_odd_port_is_tolerated_on_foreign_entries_only() {
        let entry = |id: &str, port: &str, owner: &str| {
            format!(
                r#"{{"ID":"{id}","Service":"s","Address":"x","Port":{port},"Meta":{{"external-source":"workersd","workersd-owner":"{owner}"}}}}"#
            )
        };
        let reply = |entries: &[String]| {
            format!(
                r#"{{"Node":{{"Node":"n","Meta":{{}}}},"Services":[{}]}}"#,
                entries.join(",")
            )
        };
        let foreign = reply(&[
            entry("a", "-1", "other"),
            entry("b", "70000", "other"),
            entry("c", r#""9000""#, "other"),
            entry("d", "1.5", "other"),
            entry("e", "[1]", "other"),
            entry("mine", "9011", "me"),
        ]);
        let view = decode_owned_node_services(foreign.as_bytes(), &Catalog::new(), "me").unwrap();
        assert_eq!(view.services.len(), 6);
        assert_eq!(view.services["a"].port, 0);
        assert_eq!(view.services["mine"].port, 9011);
        // Ours must be exact: an odd port on our own entry names the entry and the field.
        let ours = reply(&[entry("mine", "70000", "me")]);
        let err = decode_owned_node_services(ours.as_bytes(), &Catalog::new(), "me").unwrap_err();
        assert!(err.to_string().contains(r#"service "mine""#), "{err}");
        assert!(err.to_string().contains("Port 70000"), "{err}");
        // A missing port is 0 (Consul omits a zero port).
        let missing = r#"{"Node":{"Node":"n"},"Services":[{"ID":"z","Service":"s"}]}"#;
        let view = decode_node_services(missing.as_bytes(), &Catalog::new()).unwrap();
        assert_eq!(view.services["z"].port, 0);
    }

    #[test]
    fn permission_errors_are_summarised_once() {
        let op = |i, what: &str| (i, what.to_string());
        let token = "Permission denied: token with AccessorID 'a1' lacks permission";
        let errors: Vec<(usize, String)> =
            std::iter::once(op(0, &format!("{token} 'node:write' on \"n\"")))
                .chain((1..128).map(|i| op(i, &format!("{token} 'service:write' on \"web\""))))
                .collect();
        assert_eq!(
            permission_summary(&errors, 128).unwrap(),
            "token with AccessorID 'a1' lacks 'node:write' on \"n\", 'service:write' on \"web\" (128 of 128 operations refused)"
        );
        let anonymous = [op(
            0,
            "Permission denied: anonymous token lacks permission 'node:write' on \"n\". The anonymous token is used implicitly when a request does not specify a token.",
        )];
        assert_eq!(
            permission_summary(&anonymous, 1).unwrap(),
            "anonymous token (no token was sent) lacks 'node:write' on \"n\" (1 of 1 operations refused)"
        );
        let other = [op(0, "Missing node registration")];
        assert_eq!(permission_summary(&other, 1), None);
        let mixed = [
            op(0, "Permission denied"),
            op(1, "Missing node registration"),
        ];
        assert_eq!(
            permission_summary(&mixed, 2).unwrap(),
            "Permission denied (1 of 2 operations refused)"
        );
    }

    #[test]
    fn only_a_refused_node_makes_a_txn_forbidden() {
        let denied = |i: usize, on: &str| {
            (
                i,
                format!(
                    "Permission denied: token with AccessorID 'a1' lacks permission 'service:write' on \"{on}\""
                ),
            )
        };
        let rejected = |failed: Vec<(usize, String)>| ConsulError::TxnRejected {
            status: 409,
            errors: String::new(),
            failed,
        };
        // The node refused: nothing can be written.
        let node = rejected(vec![denied(0, "n"), denied(1, "a")]);
        assert!(forbidden_txn(&node, Some(0)).unwrap().contains("2 of 2"));
        // Entries refused, the node allowed or absent: they are held back, the rest is sent.
        let entries = rejected(vec![denied(1, "a"), denied(2, "b")]);
        assert_eq!(forbidden_txn(&entries, Some(0)), None);
        assert_eq!(forbidden_txn(&entries, None), None);
        // Refused for another reason: isolation decides.
        let meta = rejected(vec![(0, "Value is too long".into())]);
        assert_eq!(forbidden_txn(&meta, Some(0)), None);
    }

    #[test]
    fn decodes_node_services_with_nulls() {
        let none = Catalog::new();
        let view = decode_node_services(
            r#"{"Node":{"Node":"n","Meta":null},"Services":[{"ID":"a","Service":"s","Tags":null,"Meta":null,"Port":1,"Address":"x","Weights":{"Passing":1}}]}"#
                .as_bytes(),
            &none,
        )
        .unwrap();
        assert_eq!(view.node_meta, Some(BTreeMap::new()));
        assert!(view.services["a"].tags.is_empty());
        // Services may come first, be null, or be missing; a missing node is an empty view.
        let view =
            decode_node_services(r#"{"Services":null,"Node":{"Node":"n"}}"#.as_bytes(), &none)
                .unwrap();
        assert!(view.node_meta.is_some() && view.services.is_empty());
        let view =
            decode_node_services(r#"{"Node":null,"Services":[]}"#.as_bytes(), &none).unwrap();
        assert_eq!(view, NodeView::default());
        for bad in [
            "null",
            "[]",
            r#"{"Node":{},"Services":{}}"#,
            r#"{"Node":{}} x"#,
        ] {
            assert!(
                decode_node_services(bad.as_bytes(), &none).is_err(),
                "{bad}"
            );
        }
    }
}
