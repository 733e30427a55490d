//! The sink's errors: of its settings, of building its client, and of talking to Consul.

/// A `--consul-addr` that is no base URL of a Consul HTTP API.
#[derive(Debug, thiserror::Error)]
pub enum AddressError {
    #[error("Consul address is empty")]
    Empty,
    #[error("Consul address {0:?} must use http:// or https://")]
    Scheme(String),
    #[error("Consul address {address:?} is not a valid URL")]
    Invalid {
        address: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("Consul address {0:?} has no host")]
    NoHost(String),
}

/// The client could not be built from its settings.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The CA, client certificate or key of `--consul-*` TLS flags.
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
    #[error("cannot build HTTP client")]
    Build(#[source] reqwest::Error),
}

#[derive(Debug, thiserror::Error)]
pub enum ConsulError {
    /// No HTTP reply (connect, TLS, timeout, a reply cut off). Says reqwest's top line (it
    /// names the URL, never headers, so the token cannot leak); the cause stays the source.
    #[error("Consul unreachable: {0}")]
    Unreachable(#[source] reqwest::Error),
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
    #[error("cannot decode Consul's reply to {what}: {source}")]
    Decode {
        what: &'static str,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error(
        "Consul node {node:?} exists but was not registered by workersd (NodeMeta external-source is {found:?}); choose another --consul-node"
    )]
    NodeNotOwned { node: String, found: Option<String> },
}

impl ConsulError {
    pub(super) fn kind(&self) -> &'static str {
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

pub(super) fn truncate(body: &str) -> String {
    let body = body.trim();
    match body.char_indices().nth(300) {
        Some((i, _)) => format!("{}…", &body[..i]),
        None => body.to_string(),
    }
}
