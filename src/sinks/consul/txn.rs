//! Transaction sizing, apart from any I/O: how many operations and bytes one `/v1/txn`
//! request may carry, batches of encoded operations, and how to split them when Consul
//! refuses one as too big.

use super::error::ConsulError;
use crate::catalog::plan::Op;

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
pub(super) struct TxnLimits {
    pub(super) ops: usize,
    pub(super) bytes: usize,
}

impl TxnLimits {
    /// Whether `batch` can take one more operation of `len` encoded bytes.
    pub(super) fn fit(&self, batch: &Batch, len: usize) -> bool {
        batch.ops.len() < self.ops && batch.body_len_with(len) <= self.bytes
    }

    /// Learns from Consul's refusal of `batch`: true when it should be split and resent
    /// (also when it was cut under a limit since lowered), false when that cannot help.
    pub(super) fn shrink(&mut self, error: &ConsulError, batch: &Batch) -> bool {
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

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

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
}
