//! Wire types: request bodies as Consul accepts them and the records the
//! catalog stores and returns. Field names use Consul's canonical spelling.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

pub type Meta = BTreeMap<String, String>;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Weights {
    #[serde(rename = "Passing", default)]
    pub passing: i64,
    #[serde(rename = "Warning", default)]
    pub warning: i64,
}

impl Weights {
    /// Consul falls back to 1/1 when weights are missing or invalid
    /// (`NodeService.ToServiceNode`), so stored records always carry this.
    pub fn normalized(input: Option<&Weights>) -> Weights {
        match input {
            Some(w)
                if w.passing >= 1 && w.warning >= 0 && w.passing <= 65535 && w.warning <= 65535 =>
            {
                w.clone()
            }
            _ => Weights {
                passing: 1,
                warning: 1,
            },
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceAddress {
    // Consul (Go) decodes keys case-insensitively; its docs show lower case.
    #[serde(rename = "Address", alias = "address", default)]
    pub address: String,
    #[serde(rename = "Port", alias = "port", default)]
    pub port: i64,
}

/// A node as stored and returned (`structs.Node`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct NodeRecord {
    #[serde(rename = "ID")]
    pub id: String,
    pub node: String,
    pub address: String,
    pub datacenter: String,
    pub tagged_addresses: Option<Meta>,
    pub meta: Option<Meta>,
    pub create_index: u64,
    pub modify_index: u64,
}

impl NodeRecord {
    pub fn same_content(&self, other: &NodeRecord) -> bool {
        self.id == other.id
            && self.node == other.node
            && self.address == other.address
            && self.datacenter == other.datacenter
            && self.tagged_addresses == other.tagged_addresses
            && self.meta == other.meta
    }
}

/// A service instance as stored and returned (`structs.NodeService`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct ServiceRecord {
    #[serde(skip_serializing_if = "String::is_empty")]
    pub kind: String,
    #[serde(rename = "ID")]
    pub id: String,
    pub service: String,
    pub tags: Vec<String>,
    pub address: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tagged_addresses: Option<BTreeMap<String, ServiceAddress>>,
    pub meta: Option<Meta>,
    /// `json:",omitempty"` in `structs.NodeService`: a zero port is left out.
    #[serde(skip_serializing_if = "port_is_zero")]
    pub port: i64,
    pub weights: Weights,
    pub enable_tag_override: bool,
    #[serde(flatten)]
    pub mesh: MeshFields,
    pub create_index: u64,
    pub modify_index: u64,
}

fn port_is_zero(port: &i64) -> bool {
    *port == 0
}

/// Fields every `structs.NodeService` carries in Consul's JSON even for a
/// plain service (agent/structs/structs.go: `Proxy ConnectProxyConfig` and
/// `Connect ServiceConnect` are values, not pointers; `PeerName` has no
/// `omitempty`). The double stores no Connect data, so they are always the
/// zero values Consul renders; `Locality` is `omitempty` and so left out.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MeshFields;

impl Serialize for MeshFields {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut map = serializer.serialize_map(Some(3))?;
        map.serialize_entry(
            "Proxy",
            &serde_json::json!({"Mode": "", "MeshGateway": {}, "Expose": {}}),
        )?;
        map.serialize_entry("Connect", &serde_json::json!({}))?;
        map.serialize_entry("PeerName", "")?;
        map.end()
    }
}

impl ServiceRecord {
    pub fn same_content(&self, other: &ServiceRecord) -> bool {
        self.kind == other.kind
            && self.id == other.id
            && self.service == other.service
            && self.tags == other.tags
            && self.address == other.address
            && self.tagged_addresses == other.tagged_addresses
            && self.meta == other.meta
            && self.port == other.port
            && self.weights == other.weights
            && self.enable_tag_override == other.enable_tag_override
    }
}

/// A health check as stored and returned (`structs.HealthCheck`).
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct CheckRecord {
    pub node: String,
    #[serde(rename = "CheckID")]
    pub check_id: String,
    pub name: String,
    pub status: String,
    pub notes: String,
    pub output: String,
    #[serde(rename = "ServiceID")]
    pub service_id: String,
    pub service_name: String,
    pub service_tags: Vec<String>,
    #[serde(rename = "Type")]
    pub check_type: String,
    pub definition: serde_json::Value,
    pub create_index: u64,
    pub modify_index: u64,
}

impl CheckRecord {
    pub fn same_content(&self, other: &CheckRecord) -> bool {
        let mut probe = other.clone();
        probe.create_index = self.create_index;
        probe.modify_index = self.modify_index;
        *self == probe
    }
}

// ---------------------------------------------------------------------------
// Request bodies. Everything is optional so that a JSON `null` behaves like
// Go's zero value, which is what Consul sees for null fields.
// ---------------------------------------------------------------------------

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct ServiceInput {
    pub kind: Option<String>,
    #[serde(rename = "ID")]
    pub id: Option<String>,
    pub service: Option<String>,
    pub tags: Option<Vec<String>>,
    pub address: Option<String>,
    pub tagged_addresses: Option<BTreeMap<String, ServiceAddress>>,
    pub meta: Option<Meta>,
    pub port: Option<i64>,
    pub weights: Option<Weights>,
    pub enable_tag_override: Option<bool>,
    pub modify_index: Option<u64>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct CheckInput {
    pub node: Option<String>,
    #[serde(rename = "CheckID")]
    pub check_id: Option<String>,
    pub name: Option<String>,
    pub status: Option<String>,
    pub notes: Option<String>,
    pub output: Option<String>,
    #[serde(rename = "ServiceID")]
    pub service_id: Option<String>,
    pub service_name: Option<String>,
    #[serde(rename = "Type")]
    pub check_type: Option<String>,
    pub definition: Option<serde_json::Value>,
    pub modify_index: Option<u64>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct NodeInput {
    #[serde(rename = "ID")]
    pub id: Option<String>,
    pub node: Option<String>,
    pub address: Option<String>,
    pub datacenter: Option<String>,
    pub tagged_addresses: Option<Meta>,
    pub meta: Option<Meta>,
    pub modify_index: Option<u64>,
}

/// Body of `PUT /v1/catalog/register`.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct RegisterRequest {
    #[serde(rename = "ID")]
    pub id: Option<String>,
    pub node: Option<String>,
    pub address: Option<String>,
    pub datacenter: Option<String>,
    pub tagged_addresses: Option<Meta>,
    pub node_meta: Option<Meta>,
    pub service: Option<ServiceInput>,
    pub check: Option<CheckInput>,
    pub checks: Option<Vec<CheckInput>>,
    pub skip_node_update: Option<bool>,
}

/// Body of `PUT /v1/catalog/deregister`.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct DeregisterRequest {
    pub node: Option<String>,
    pub datacenter: Option<String>,
    #[serde(rename = "ServiceID")]
    pub service_id: Option<String>,
    #[serde(rename = "CheckID")]
    pub check_id: Option<String>,
}

/// One element of the `PUT /v1/txn` body.
#[derive(Clone, Debug, Default, Deserialize)]
pub struct TxnOpInput {
    #[serde(rename = "KV")]
    pub kv: Option<serde_json::Value>,
    #[serde(rename = "Node")]
    pub node: Option<TxnNodeOp>,
    #[serde(rename = "Service")]
    pub service: Option<TxnServiceOp>,
    #[serde(rename = "Check")]
    pub check: Option<TxnCheckOp>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct TxnNodeOp {
    pub verb: Option<String>,
    pub node: Option<NodeInput>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct TxnServiceOp {
    pub verb: Option<String>,
    pub node: Option<String>,
    pub service: Option<ServiceInput>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct TxnCheckOp {
    pub verb: Option<String>,
    pub check: Option<CheckInput>,
}

/// One element of a successful txn's `Results`.
#[derive(Clone, Debug, Serialize)]
pub enum TxnResult {
    Node(NodeRecord),
    Service(ServiceRecord),
    Check(CheckRecord),
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct TxnError {
    pub op_index: usize,
    pub what: String,
}
