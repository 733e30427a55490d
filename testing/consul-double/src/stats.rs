//! Counters that tests and benchmarks read through `GET /control/stats` or
//! [`crate::ConsulDouble::stats`].

use std::collections::{BTreeMap, BTreeSet};

use serde::Serialize;

#[derive(Clone, Debug, Default, Serialize, PartialEq, Eq)]
pub struct TxnStats {
    /// Write txns that committed (including ones that changed nothing).
    pub committed: u64,
    /// Txns answered 409: a pre-check or an operation failed, nothing applied.
    pub rolled_back: u64,
    /// Txns refused before looking at the ops (400 bad JSON, 413 too large).
    pub rejected: u64,
    /// Txns with only `get` verbs.
    pub read_only: u64,
    /// Operations inside committed write txns.
    pub ops_applied: u64,
    /// `ops_applied` split by `Kind.verb`, e.g. `"Service.set"`.
    pub ops_applied_by_verb: BTreeMap<String, u64>,
}

#[derive(Clone, Debug, Default, Serialize, PartialEq, Eq)]
pub struct Stats {
    /// Requests per matched route, e.g. `"GET /v1/health/service/{service}"`.
    pub requests: BTreeMap<String, u64>,
    /// Status codes per matched route.
    pub responses: BTreeMap<String, BTreeMap<u16, u64>>,
    /// Query parameter names seen per route (values are never recorded, so
    /// `?token=` cannot leak).
    pub query_params: BTreeMap<String, BTreeSet<String>>,
    /// Requests to paths the double does not implement, e.g. `"GET /v1/kv/x"`.
    pub unmatched: BTreeMap<String, u64>,
    /// Reads that asked to block (`index` > 0).
    pub blocking_queries: u64,
    /// Requests refused with 403 `ACL not found` (unknown token).
    pub acl_denied: u64,
    /// Reads from which the token's rules removed something.
    pub acl_filtered: u64,
    /// Write operations refused for a missing permission (one per txn op;
    /// register/deregister count once).
    pub acl_permission_denied: u64,
    /// How requests presented their token: `"X-Consul-Token"`, `"bearer"`,
    /// `"query"` (`?token=`, which leaks into URLs and logs) or `"none"`.
    pub token_sources: BTreeMap<String, u64>,
    /// Writes (register, deregister, txn) that moved the index.
    pub catalog_writes: u64,
    pub txn: TxnStats,
}

impl Stats {
    pub fn record_request<'a>(&mut self, route: &str, params: impl Iterator<Item = &'a str>) {
        *self.requests.entry(route.to_string()).or_insert(0) += 1;
        let seen = self.query_params.entry(route.to_string()).or_default();
        for name in params {
            if !seen.contains(name) {
                seen.insert(name.to_string());
            }
        }
    }

    pub fn record_token_source(&mut self, source: &str) {
        *self.token_sources.entry(source.to_string()).or_insert(0) += 1;
    }

    pub fn record_response(&mut self, route: &str, status: u16) {
        *self
            .responses
            .entry(route.to_string())
            .or_default()
            .entry(status)
            .or_insert(0) += 1;
    }

    pub fn record_txn_applied(&mut self, labels: &[String]) {
        self.txn.committed += 1;
        self.txn.ops_applied += labels.len() as u64;
        for label in labels {
            *self
                .txn
                .ops_applied_by_verb
                .entry(label.clone())
                .or_insert(0) += 1;
        }
    }

    /// Total requests for routes starting with `prefix` (e.g. `"PUT /v1/txn"`).
    pub fn requests_matching(&self, prefix: &str) -> u64 {
        self.requests
            .iter()
            .filter(|(route, _)| route.starts_with(prefix))
            .map(|(_, n)| n)
            .sum()
    }
}
