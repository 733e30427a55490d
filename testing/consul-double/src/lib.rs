//! A Consul HTTP API test double for workersd's tests and benchmarks.
//!
//! It keeps an in-memory catalog (nodes, services, checks) behind the subset
//! of Consul's `/v1` API that workersd and Prometheus-style `consul_sd_configs`
//! clients use, with Consul's blocking queries, txn atomicity and ACL token
//! checks, plus a separate control listener to take the API down, bring it
//! back (optionally empty) and read state and request statistics.
//! `CONTRACT.md` lists every endpoint and deviation.
//!
//! ```no_run
//! # async fn demo() -> std::io::Result<()> {
//! let double = consul_double::ConsulDouble::start(consul_double::Config::default()).await?;
//! println!("Consul at {}", double.api_url());
//! double.down().await;          // connections refused, long polls dropped
//! double.up(false).await?;      // same address, same catalog
//! double.shutdown().await;
//! # Ok(()) }
//! ```

pub mod acl;
pub mod agent;
mod api;
mod control;
pub mod model;
mod ops;
pub mod query;
mod server;
pub mod stats;
pub mod store;

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};

use serde_json::json;
use tokio::sync::watch;

pub use acl::{Access, AclConfig, DefaultPolicy, Resource, Rules, Token};
pub use agent::AgentConfig;
pub use stats::{Stats, TxnStats};
use store::Catalog;

/// Consul's limit since 1.14; before, 64 (set `max_txn_ops` to model an older Consul).
pub const DEFAULT_MAX_TXN_OPS: usize = 128;
/// Consul's default `limits.txn_max_req_len` (and `kv_max_value_size`).
pub const DEFAULT_TXN_MAX_REQ_LEN: usize = 512 * 1024;

#[derive(Clone)]
pub struct Config {
    /// API listener; port 0 picks a free port that later "up"s reuse.
    pub api_listen: SocketAddr,
    /// Control listener; `None` serves no control HTTP API (the methods on
    /// [`ConsulDouble`] still work in-process).
    pub control_listen: Option<SocketAddr>,
    pub datacenter: String,
    /// Agent node name reported by `/v1/agent/self`; with [`Config::agent`], the node
    /// the local agent syncs its services to.
    pub node_name: String,
    /// A local agent serving `/v1/agent/service/*` and `/v1/agent/check/*` on this
    /// listener; `None` (the default): those paths are unmatched.
    pub agent: Option<AgentConfig>,
    /// Shorthand for [`Config::acl`]: ACLs on, default deny, this one
    /// management token. Ignored when `acl` is set.
    pub acl_token: Option<String>,
    /// Consul's ACL system: tokens with node/service rules, the anonymous
    /// token and the default policy (see [`acl`]). `None` with no
    /// `acl_token`: ACLs disabled, everything allowed.
    pub acl: Option<AclConfig>,
    pub max_txn_ops: usize,
    /// Largest `/v1/txn` body in bytes (Consul's `limits.txn_max_req_len`, 512 KiB); the
    /// limit enforced is the larger of this and `kv_max_value_size`, as in Consul.
    pub txn_max_req_len: usize,
    /// Consul's `limits.kv_max_value_size` (512 KiB): a txn body may be this large even
    /// when `txn_max_req_len` is smaller (`convertOps` in `agent/txn_endpoint.go`).
    pub kv_max_value_size: usize,
    /// Index of the empty catalog, at start and after a wipe (minimum 1).
    pub initial_index: u64,
    /// Newest Consul's txn pre-check: a Service op whose ID (case-insensitively) names a
    /// stored service of another name is refused. Off by default: Consul 1.15-1.20 apply it.
    pub reject_txn_service_rename: bool,
    /// Consul's global write rate limit (`limits.request_limits`, mode `enforcing`) applied
    /// to `/v1/txn` writes; `None` (the default) is Consul's default mode, `disabled`.
    pub write_rate_limit: Option<WriteRateLimit>,
}

/// A token bucket of `per_second` tokens, holding at most `burst` (at least 1).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct WriteRateLimit {
    pub per_second: f64,
    pub burst: f64,
    /// Whether the double answers as the leader: a write over the limit is then
    /// `ErrRetryLater` (503), else `ErrRetryElsewhere` (429), per
    /// `agent/consul/rate/handler.go`.
    pub leader: bool,
}

impl Default for Config {
    fn default() -> Config {
        Config {
            api_listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            control_listen: None,
            datacenter: "dc1".into(),
            node_name: "consul-double".into(),
            agent: None,
            acl_token: None,
            acl: None,
            max_txn_ops: DEFAULT_MAX_TXN_OPS,
            txn_max_req_len: DEFAULT_TXN_MAX_REQ_LEN,
            kv_max_value_size: DEFAULT_TXN_MAX_REQ_LEN,
            initial_index: 1,
            reject_txn_service_rename: false,
            write_rate_limit: None,
        }
    }
}

// Hand-written so the ACL token never reaches a log line.
impl fmt::Debug for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Config")
            .field("api_listen", &self.api_listen)
            .field("control_listen", &self.control_listen)
            .field("datacenter", &self.datacenter)
            .field("node_name", &self.node_name)
            .field("agent", &self.agent)
            .field("acl_token", &self.acl_token.as_ref().map(|_| "<redacted>"))
            .field("acl", &self.acl)
            .field("max_txn_ops", &self.max_txn_ops)
            .field("txn_max_req_len", &self.txn_max_req_len)
            .field("kv_max_value_size", &self.kv_max_value_size)
            .field("initial_index", &self.initial_index)
            .field("reject_txn_service_rename", &self.reject_txn_service_rename)
            .field("write_rate_limit", &self.write_rate_limit)
            .finish()
    }
}

/// State shared by the API handlers, the control handlers and the handle.
pub(crate) struct Shared {
    config: Config,
    catalog: RwLock<Catalog>,
    /// Broadcasts the catalog index so blocked queries wake on writes.
    index_tx: watch::Sender<u64>,
    stats: Mutex<Stats>,
    /// The ACL setup in force; replaceable at run time (control API).
    acl: RwLock<Option<AclConfig>>,
    /// Bumped by a wipe (a snapshot restore): blocked queries return at once,
    /// as Consul's do when the state store is abandoned.
    restores_tx: watch::Sender<u64>,
    api_addr: SocketAddr,
    api_up: AtomicBool,
    api_listener: tokio::sync::Mutex<Option<server::RunningListener>>,
    /// Fault injection: txn Service writes of these service names are refused per op.
    refused_services: Mutex<Vec<String>>,
    /// Write rate-limit bucket: (tokens, last refill).
    write_tokens: Mutex<(f64, tokio::time::Instant)>,
    /// The local agent, if configured. Lock order: the agent, then the catalog.
    agent: Option<Mutex<agent::LocalAgent>>,
}

impl Shared {
    // A handler never panics while holding these locks, but recover from
    // poisoning anyway rather than turn one bug into a cascade.
    fn read_catalog(&self) -> RwLockReadGuard<'_, Catalog> {
        self.catalog.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write_catalog(&self) -> RwLockWriteGuard<'_, Catalog> {
        self.catalog.write().unwrap_or_else(|e| e.into_inner())
    }

    /// Consul's rate limiter (`agent/consul/rate/handler.go`, global write limit, enforcing):
    /// `Err((status, text))` when this write is over the limit.
    fn admit_write(&self) -> Result<(), (u16, &'static str)> {
        let Some(limit) = self.config.write_rate_limit else {
            return Ok(());
        };
        let mut bucket = self.write_tokens.lock().unwrap_or_else(|e| e.into_inner());
        let now = tokio::time::Instant::now();
        let refill = now.duration_since(bucket.1).as_secs_f64() * limit.per_second;
        *bucket = ((bucket.0 + refill).min(limit.burst.max(1.0)), now);
        if bucket.0 >= 1.0 {
            bucket.0 -= 1.0;
            return Ok(());
        }
        Err(if limit.leader {
            (
                503,
                "rate limit exceeded for operation that can only be performed by the leader, try again later",
            )
        } else {
            (
                429,
                "rate limit exceeded, try again later or against a different server",
            )
        })
    }

    fn refused_services(&self) -> MutexGuard<'_, Vec<String>> {
        self.refused_services
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    fn stats(&self) -> MutexGuard<'_, Stats> {
        self.stats.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Publishes a new catalog index to blocked queries.
    fn publish_index(&self, index: u64) {
        self.index_tx.send_replace(index);
    }

    fn wipe(&self) {
        let index = {
            let mut catalog = self.write_catalog();
            *catalog = Catalog::new(self.config.initial_index);
            catalog.index
        };
        self.publish_index(index);
        // Consul's blockingquery returns as soon as `state.AbandonCh()`
        // closes (a snapshot restore), with whatever the new store holds.
        self.restores_tx.send_modify(|n| *n += 1);
    }

    fn acl(&self) -> RwLockReadGuard<'_, Option<AclConfig>> {
        self.acl.read().unwrap_or_else(|e| e.into_inner())
    }

    fn set_acl(&self, acl: Option<AclConfig>) {
        *self.acl.write().unwrap_or_else(|e| e.into_inner()) = acl.map(AclConfig::normalized);
    }

    /// Replaces one token's rules; false when no token has that secret.
    fn set_token_rules(&self, secret: &str, rules: Rules) -> bool {
        let mut guard = self.acl.write().unwrap_or_else(|e| e.into_inner());
        let Some(token) = guard
            .as_mut()
            .and_then(|acl| acl.tokens.iter_mut().find(|t| t.secret_id == secret))
        else {
            return false;
        };
        token.management = false;
        token.rules = rules;
        true
    }

    async fn down(&self) {
        let running = self.api_listener.lock().await.take();
        if let Some(running) = running {
            running.stop().await;
        }
        self.api_up.store(false, Ordering::SeqCst);
    }

    async fn up(self: &Arc<Self>, empty: bool) -> io::Result<()> {
        let mut guard = self.api_listener.lock().await;
        if empty {
            self.wipe();
        }
        if guard.is_none() {
            let listener = server::bind(self.api_addr)?;
            *guard = Some(server::spawn_api(listener, api::router(self.clone())));
            self.api_up.store(true, Ordering::SeqCst);
        }
        Ok(())
    }

    fn state_dump(&self) -> serde_json::Value {
        let catalog = self.read_catalog();
        let nodes: Vec<serde_json::Value> = catalog
            .nodes
            .values()
            .map(|entry| {
                json!({
                    "Node": entry.record,
                    "Services": entry.services.values().collect::<Vec<_>>(),
                    "Checks": entry.checks.values().collect::<Vec<_>>(),
                })
            })
            .collect();
        json!({
            "index": catalog.index,
            "datacenter": self.config.datacenter,
            "api_addr": self.api_addr.to_string(),
            "api_up": self.api_up.load(Ordering::SeqCst),
            "node_count": catalog.nodes.len(),
            "service_count": catalog.service_count(),
            "nodes": nodes,
        })
    }
}

/// Handle to a running double. Dropping it without [`ConsulDouble::shutdown`]
/// aborts its listeners.
pub struct ConsulDouble {
    shared: Arc<Shared>,
    control_addr: Option<SocketAddr>,
    control: Option<server::RunningListener>,
    /// The local agent's clock loop.
    agent_task: Option<tokio::task::JoinHandle<()>>,
}

impl ConsulDouble {
    /// Binds the listeners and starts serving; returns once both accept.
    pub async fn start(config: Config) -> io::Result<ConsulDouble> {
        let api_listener = server::bind(config.api_listen)?;
        let api_addr = api_listener.local_addr()?;
        let control_listener = match config.control_listen {
            Some(addr) => Some(server::bind(addr)?),
            None => None,
        };
        let initial = Catalog::new(config.initial_index);
        let (index_tx, _) = watch::channel(initial.index);
        let acl = match (&config.acl, &config.acl_token) {
            (Some(acl), _) => Some(acl.clone().normalized()),
            (None, Some(token)) => Some(AclConfig::single_management_token(token)),
            (None, None) => None,
        };
        let write_tokens = Mutex::new((
            config.write_rate_limit.map_or(0.0, |l| l.burst.max(1.0)),
            tokio::time::Instant::now(),
        ));
        let agent = config.agent.clone().map(|agent_config| {
            Mutex::new(agent::LocalAgent::new(
                &config.node_name,
                api::agent_node_id(&config.node_name),
                &config.datacenter,
                agent_config,
                tokio::time::Instant::now(),
            ))
        });
        let shared = Arc::new(Shared {
            agent,
            config,
            catalog: RwLock::new(initial),
            index_tx,
            stats: Mutex::new(Stats::default()),
            acl: RwLock::new(acl),
            restores_tx: watch::Sender::new(0),
            api_addr,
            api_up: AtomicBool::new(true),
            api_listener: tokio::sync::Mutex::new(None),
            refused_services: Mutex::new(Vec::new()),
            write_tokens,
        });
        let agent_task = agent::endpoints::lock(&shared).map(|mut local| {
            // The leader registers the joining member, then the agent's first full sync runs.
            agent::endpoints::set_member_failed(&shared, &mut local, false);
            tokio::spawn(agent::endpoints::run(shared.clone()))
        });
        *shared.api_listener.lock().await =
            Some(server::spawn_api(api_listener, api::router(shared.clone())));
        let (control_addr, control) = match control_listener {
            Some(listener) => {
                let addr = listener.local_addr()?;
                let running = server::spawn_control(listener, control::router(shared.clone()));
                (Some(addr), Some(running))
            }
            None => (None, None),
        };
        Ok(ConsulDouble {
            shared,
            control_addr,
            control,
            agent_task,
        })
    }

    pub fn api_addr(&self) -> SocketAddr {
        self.shared.api_addr
    }

    /// `http://host:port` of the API listener, for client configuration.
    pub fn api_url(&self) -> String {
        format!("http://{}", self.shared.api_addr)
    }

    pub fn control_addr(&self) -> Option<SocketAddr> {
        self.control_addr
    }

    pub fn datacenter(&self) -> &str {
        &self.shared.config.datacenter
    }

    /// Current catalog index (what `X-Consul-Index` reports).
    pub fn index(&self) -> u64 {
        self.shared.read_catalog().index
    }

    pub fn is_up(&self) -> bool {
        self.shared.api_up.load(Ordering::SeqCst)
    }

    /// Closes the API listener (new connections are refused) and drops every
    /// open API connection, including blocked queries. The catalog is kept.
    pub async fn down(&self) {
        self.shared.down().await;
    }

    /// Rebinds the API address. With `empty`, the catalog comes back wiped
    /// and the index restarts, like a Consul that lost its data.
    pub async fn up(&self, empty: bool) -> io::Result<()> {
        self.shared.up(empty).await
    }

    /// Empties the catalog and resets the index without touching listeners.
    pub fn wipe(&self) {
        self.shared.wipe();
    }

    /// JSON dump of the whole catalog, as served by `GET /control/state`.
    pub fn state(&self) -> serde_json::Value {
        self.shared.state_dump()
    }

    /// Read access to the catalog for assertions that need more than JSON.
    pub fn with_catalog<T>(&self, f: impl FnOnce(&Catalog) -> T) -> T {
        f(&self.shared.read_catalog())
    }

    pub fn stats(&self) -> Stats {
        self.shared.stats().clone()
    }

    /// Replaces the ACL setup (`None` turns ACLs off), like editing tokens
    /// and policies in a running Consul. Takes effect on the next request.
    pub fn set_acl(&self, acl: Option<AclConfig>) {
        self.shared.set_acl(acl);
    }

    /// Replaces the rules of the token with this secret (it stops being a
    /// management token); false if there is no such token.
    pub fn set_token_rules(&self, secret: &str, rules: Rules) -> bool {
        self.shared.set_token_rules(secret, rules)
    }

    pub fn reset_stats(&self) {
        *self.shared.stats() = Stats::default();
    }

    /// The local agent's state (`GET /control/agent`); `None` without an agent.
    pub fn agent_state(&self) -> Option<serde_json::Value> {
        control::agent_action(&self.shared, control::AgentAction::Show)
    }

    /// Restarts the local agent (`POST /control/agent/restart`): services registered
    /// through the API come back from its data directory, or with `dev` nothing does.
    pub fn agent_restart(&self, dev: bool) -> Option<serde_json::Value> {
        control::agent_action(&self.shared, control::AgentAction::Restart { dev })
    }

    /// Serf marks the agent's node failed (`true`) or alive again (`false`).
    pub fn agent_node_failed(&self, failed: bool) -> Option<serde_json::Value> {
        let action = if failed {
            control::AgentAction::Fail
        } else {
            control::AgentAction::Recover
        };
        control::agent_action(&self.shared, action)
    }

    /// Runs the agent's periodic full anti-entropy sync now.
    pub fn agent_full_sync(&self) -> Option<serde_json::Value> {
        control::agent_action(&self.shared, control::AgentAction::FullSync)
    }

    /// Stops both listeners and drops open connections.
    pub async fn shutdown(mut self) {
        if let Some(task) = self.agent_task.take() {
            task.abort();
        }
        self.shared.down().await;
        if let Some(control) = self.control.take() {
            control.stop().await;
        }
    }
}

impl Drop for ConsulDouble {
    fn drop(&mut self) {
        if let Some(task) = self.agent_task.take() {
            task.abort();
        }
        if let Some(control) = self.control.take() {
            control.abort();
        }
        if let Ok(mut guard) = self.shared.api_listener.try_lock()
            && let Some(running) = guard.take()
        {
            running.abort();
        }
    }
}
