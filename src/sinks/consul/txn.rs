//! Transactions, apart from any I/O: how each operation is encoded, how many operations
//! and bytes one `/v1/txn` request may carry, batches of encoded operations, and what to do
//! when Consul refuses one as too big (413).

use super::error::ConsulError;
use crate::catalog::plan::Op;
use crate::model::{EXTERNAL_SOURCE, meta_keys};
use serde::Serialize;
use serde_json::json;
use std::collections::BTreeMap;

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
#[derive(Debug, PartialEq, Eq)]
pub(super) struct TxnLimits {
    pub(super) ops: usize,
    pub(super) bytes: usize,
}

impl Default for TxnLimits {
    /// What current Consul accepts by default; lowered when it refuses a transaction.
    fn default() -> Self {
        Self {
            ops: MAX_TXN_OPS,
            bytes: MAX_TXN_BYTES,
        }
    }
}

impl TxnLimits {
    /// Whether `batch` can take one more operation of `len` encoded bytes.
    pub(super) fn fit(&self, batch: &Batch, len: usize) -> bool {
        batch.ops.len() < self.ops && batch.body_len_with(len) <= self.bytes
    }

    /// Learns from Consul's refusal of `batch`: true when it should be split and resent
    /// (also when it was cut under a limit since lowered), false when that cannot help (a
    /// single operation cannot be split; another refusal is not about size).
    pub(super) fn shrink(&mut self, error: &ConsulError, batch: &Batch) -> bool {
        if batch.ops.len() <= 1 {
            return false;
        }
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
pub(super) struct Batch<'p> {
    pub(super) ops: Vec<(Vec<u8>, Option<&'p Op>)>,
    pub(super) bytes: usize,
}

impl<'p> Batch<'p> {
    pub(super) fn push(&mut self, encoded: Vec<u8>, op: Option<&'p Op>) {
        self.bytes += encoded.len();
        self.ops.push((encoded, op));
    }

    /// `[a,b,c]`: brackets and one comma between operations.
    pub(super) fn body_len(&self) -> usize {
        2 + self.bytes + self.ops.len().saturating_sub(1)
    }

    pub(super) fn body_len_with(&self, len: usize) -> usize {
        2 + self.bytes + len + self.ops.len()
    }

    pub(super) fn body(&self) -> Vec<u8> {
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
    pub(super) fn split(self, limits: &TxnLimits) -> Vec<Batch<'p>> {
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

pub(super) fn encode(op: &serde_json::Value) -> Vec<u8> {
    serde_json::to_vec(op).expect("a JSON value always encodes")
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
    #[serde(rename = "ModifyIndex")]
    modify_index: u64,
}

/// The operation that creates our node. Sent only when the read found no node: `cas` at
/// ModifyIndex 0 creates it only if still absent (Consul's ensureNodeCASTxn), so a node
/// someone else registered since is refused ("index is stale") instead of taken over.
pub(super) fn node_op(
    node: &str,
    address: &str,
    meta: &BTreeMap<String, String>,
    datacenter: Option<&str>,
) -> serde_json::Value {
    let mut meta = meta.clone();
    meta.insert(
        meta_keys::EXTERNAL_SOURCE.to_string(),
        EXTERNAL_SOURCE.to_string(),
    );
    let mut body = json!({
        "Node": node,
        "Address": address,
        "Meta": meta,
        "ModifyIndex": 0,
    });
    if let Some(dc) = datacenter {
        body["Datacenter"] = json!(dc);
    }
    json!({ "Node": { "Verb": "cas", "Node": body } })
}

/// The operation for `op` on `node`; `modify_index` is the entry's ModifyIndex as last read
/// (0: absent then). Both verbs are conditional on it, so nothing someone else wrote since
/// the read is overwritten or deleted: Consul refuses the op ("index is stale") and the sink
/// re-reads.
pub(super) fn service_op(node: &str, op: &Op, modify_index: u64) -> serde_json::Value {
    match op {
        // Consul's ensureServiceCASTxn: at index 0 only if still absent, else only if unchanged.
        Op::Register(i) => json!({ "Service": {
            "Verb": "cas",
            "Node": node,
            "Service": ServiceBody {
                id: &i.id, service: &i.service, address: &i.address, port: i.port, tags: &i.tags, meta: i.published_meta(),
                modify_index,
            },
        }}),
        // Only if unchanged since read (Consul's deleteServiceCASTxn): an entry someone
        // re-registered under that ID is refused ("index is stale"), then re-read.
        Op::Deregister(i) => json!({ "Service": {
            "Verb": "delete-cas",
            "Node": node,
            "Service": { "ID": &*i.id, "Service": i.service, "ModifyIndex": modify_index },
        }}),
    }
}
#[cfg(test)]
mod tests;
