//! `consul-double` binary: a thin CLI around [`consul_double::ConsulDouble`].

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use consul_double::query::parse_go_duration;
use consul_double::{
    AclConfig, AgentConfig, Config, ConsulDouble, DEFAULT_MAX_TXN_OPS, DEFAULT_TXN_MAX_REQ_LEN,
};

#[derive(Parser, Debug)]
#[command(
    name = "consul-double",
    version,
    about = "Consul HTTP API test double (test support only)"
)]
struct Args {
    /// Consul API listen address.
    #[arg(long, env = "CONSUL_DOUBLE_LISTEN", default_value = "127.0.0.1:8500")]
    listen: SocketAddr,

    /// Control API listen address (down/up/wipe/state/stats).
    #[arg(
        long,
        env = "CONSUL_DOUBLE_CONTROL_LISTEN",
        default_value = "127.0.0.1:8590"
    )]
    control_listen: SocketAddr,

    /// Datacenter name reported and accepted.
    #[arg(long, env = "CONSUL_DOUBLE_DATACENTER", default_value = "dc1")]
    datacenter: String,

    /// Agent node name reported by /v1/agent/self.
    #[arg(long, env = "CONSUL_DOUBLE_NODE_NAME", default_value = "consul-double")]
    node_name: String,

    /// Require this ACL token on every /v1 request.
    #[arg(
        long,
        env = "CONSUL_DOUBLE_ACL_TOKEN",
        hide_env_values = true,
        conflicts_with = "acl_token_file"
    )]
    acl_token: Option<String>,

    /// Read the required ACL token from this file (surrounding whitespace ignored).
    #[arg(
        long,
        env = "CONSUL_DOUBLE_ACL_TOKEN_FILE",
        conflicts_with = "acl_config"
    )]
    acl_token_file: Option<PathBuf>,

    /// Full ACL setup from a JSON file: `{"default_policy": "deny", "tokens":
    /// [{"secret_id": "…", "management": true} | {"secret_id": "…", "rules":
    /// {"node_prefix": {"": {"policy": "read"}}, …}}], "anonymous": {rules}}`.
    #[arg(long, env = "CONSUL_DOUBLE_ACL_CONFIG", conflicts_with = "acl_token")]
    acl_config: Option<PathBuf>,

    /// Maximum operations per /v1/txn (Consul 1.14 and later: 128; before: 64).
    #[arg(long, env = "CONSUL_DOUBLE_MAX_TXN_OPS", default_value_t = DEFAULT_MAX_TXN_OPS)]
    max_txn_ops: usize,

    /// Largest /v1/txn body in bytes (Consul's limits.txn_max_req_len).
    #[arg(long, env = "CONSUL_DOUBLE_TXN_MAX_REQ_LEN", default_value_t = DEFAULT_TXN_MAX_REQ_LEN)]
    txn_max_req_len: usize,

    /// Consul's limits.kv_max_value_size; the txn body limit is the larger of the two.
    #[arg(long, env = "CONSUL_DOUBLE_KV_MAX_VALUE_SIZE", default_value_t = DEFAULT_TXN_MAX_REQ_LEN)]
    kv_max_value_size: usize,

    /// Index of the empty catalog at start and after a wipe.
    #[arg(long, default_value_t = 1)]
    initial_index: u64,

    /// Refuse txn Service ops that rename a stored service through its ID, as the newest
    /// Consul does (Consul 1.15-1.20 apply them).
    #[arg(long, env = "CONSUL_DOUBLE_REJECT_TXN_SERVICE_RENAME")]
    reject_txn_service_rename: bool,

    /// Run a local agent on node --node-name: /v1/agent/service/*, /v1/agent/check/*,
    /// anti-entropy to the catalog, TTL checks and the critical-service reaper.
    #[arg(long, env = "CONSUL_DOUBLE_AGENT")]
    agent: bool,

    /// The agent node's address in the catalog.
    #[arg(long, env = "CONSUL_DOUBLE_AGENT_ADDRESS", default_value = "127.0.0.1")]
    agent_address: String,

    /// Period of the agent's full anti-entropy sync (Go duration; Consul: 1m).
    #[arg(long, env = "CONSUL_DOUBLE_AGENT_AE_INTERVAL", value_parser = go_duration,
          default_value = "1m")]
    agent_ae_interval: Duration,

    /// Period of the critical-service reaper (Consul: 30s).
    #[arg(long, env = "CONSUL_DOUBLE_AGENT_CHECK_REAP_INTERVAL", value_parser = go_duration,
          default_value = "30s")]
    agent_check_reap_interval: Duration,

    /// TEST-ONLY deviation: the floor of DeregisterCriticalServiceAfter (Consul: 1m, fixed).
    #[arg(long, env = "CONSUL_DOUBLE_AGENT_CHECK_DEREGISTER_INTERVAL_MIN", value_parser = go_duration,
          default_value = "1m")]
    agent_check_deregister_interval_min: Duration,

    /// How late an output-only check change is synced (Consul's check_update_interval: 5m;
    /// 0s syncs every change).
    #[arg(long, env = "CONSUL_DOUBLE_AGENT_CHECK_UPDATE_INTERVAL", value_parser = go_duration,
          default_value = "5m")]
    agent_check_update_interval: Duration,

    /// Write the bound addresses here as JSON once listening.
    #[arg(long, env = "CONSUL_DOUBLE_READY_FILE")]
    ready_file: Option<PathBuf>,
}

fn go_duration(text: &str) -> Result<Duration, String> {
    parse_go_duration(text).ok_or_else(|| format!("invalid duration {text:?}"))
}

fn acl_token(args: &Args) -> Result<Option<String>, String> {
    if let Some(token) = &args.acl_token {
        return Ok(Some(token.clone()));
    }
    let Some(path) = &args.acl_token_file else {
        return Ok(None);
    };
    let token = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read ACL token file {}: {e}", path.display()))?;
    let token = token.trim().to_string();
    if token.is_empty() {
        return Err(format!("ACL token file {} is empty", path.display()));
    }
    Ok(Some(token))
}

fn acl_config(args: &Args) -> Result<Option<AclConfig>, String> {
    let Some(path) = &args.acl_config else {
        return Ok(None);
    };
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read ACL config {}: {e}", path.display()))?;
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|e| format!("ACL config {}: {e}", path.display()))
}

/// Writes atomically so a watcher never reads a half-written file.
fn write_ready_file(path: &PathBuf, contents: &str) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, contents)?;
    std::fs::rename(&tmp, path)
}

/// Returns on SIGINT or SIGTERM (what test harnesses usually send).
async fn wait_for_termination() {
    let mut terminate =
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(signal) => signal,
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
                return;
            }
        };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = terminate.recv() => {}
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let acl_token = match acl_token(&args) {
        Ok(token) => token,
        Err(message) => {
            eprintln!("consul-double: {message}");
            return ExitCode::from(2);
        }
    };
    let acl = match acl_config(&args) {
        Ok(acl) => acl,
        Err(message) => {
            eprintln!("consul-double: {message}");
            return ExitCode::from(2);
        }
    };
    let config = Config {
        acl,
        api_listen: args.listen,
        control_listen: Some(args.control_listen),
        datacenter: args.datacenter.clone(),
        node_name: args.node_name.clone(),
        agent: args.agent.then(|| AgentConfig {
            address: args.agent_address.clone(),
            ae_interval: args.agent_ae_interval,
            check_reap_interval: args.agent_check_reap_interval,
            check_deregister_interval_min: args.agent_check_deregister_interval_min,
            check_update_interval: args.agent_check_update_interval,
        }),
        acl_token,
        max_txn_ops: args.max_txn_ops,
        txn_max_req_len: args.txn_max_req_len,
        kv_max_value_size: args.kv_max_value_size,
        initial_index: args.initial_index,
        reject_txn_service_rename: args.reject_txn_service_rename,
        write_rate_limit: None,
    };
    tracing::info!(?config, "starting");
    let double = match ConsulDouble::start(config).await {
        Ok(double) => double,
        Err(error) => {
            eprintln!("consul-double: cannot listen: {error}");
            return ExitCode::from(1);
        }
    };
    let api = double.api_addr();
    let control = double
        .control_addr()
        .map(|a| a.to_string())
        .unwrap_or_default();
    if let Some(path) = &args.ready_file {
        let contents =
            serde_json::json!({ "api": api.to_string(), "control": control }).to_string();
        if let Err(error) = write_ready_file(path, &contents) {
            eprintln!(
                "consul-double: cannot write ready file {}: {error}",
                path.display()
            );
            return ExitCode::from(1);
        }
    }
    println!("consul-double ready api=http://{api} control=http://{control}");

    wait_for_termination().await;
    double.shutdown().await;
    ExitCode::SUCCESS
}

#[cfg(test)]
mod tests {
    use super::*;
    use consul_double::agent::{
        DEFAULT_AE_INTERVAL, DEFAULT_CHECK_DEREGISTER_INTERVAL_MIN, DEFAULT_CHECK_REAP_INTERVAL,
        DEFAULT_CHECK_UPDATE_INTERVAL,
    };

    #[test]
    fn agent_flag_defaults_are_consuls() {
        let args = Args::parse_from(["consul-double", "--agent"]);
        assert!(args.agent);
        assert_eq!(args.agent_ae_interval, DEFAULT_AE_INTERVAL);
        assert_eq!(args.agent_check_reap_interval, DEFAULT_CHECK_REAP_INTERVAL);
        assert_eq!(
            args.agent_check_deregister_interval_min,
            DEFAULT_CHECK_DEREGISTER_INTERVAL_MIN
        );
        assert_eq!(
            args.agent_check_update_interval,
            DEFAULT_CHECK_UPDATE_INTERVAL
        );
    }
}
