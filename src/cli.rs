//! Command line. Every flag has an environment fallback so containers and Nomad tasks can be
//! configured without rewriting arguments.

use crate::probe::{ProbeSettings, defaults as probe_defaults};
use clap::{Args, Parser, Subcommand, ValueEnum};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

#[derive(Debug, Parser)]
#[command(
    name = "workersd",
    version = env!("WORKERSD_VERSION"),
    about = "Gives every worker process of a multi-process web service its own Prometheus scrape target"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Probe the targets of a YAML file (hosts, VMs, Nomad) and publish live workers.
    Standalone(Box<StandaloneArgs>),
    /// Watch Kubernetes pods (annotations and WorkerMetrics resources) and publish live workers.
    Kubernetes(Box<KubernetesArgs>),
    /// Follow this Nomad client's allocations (opted in by workersd_* meta) and publish live
    /// workers; run it as a Nomad system job, one per client node.
    Nomad(Box<NomadArgs>),
    /// Validate a targets file; print every error (entry, field, why) and exit 1 if any.
    Check {
        #[arg(long, env = "WORKERSD_TARGETS")]
        targets: PathBuf,
    },
    /// Print the WorkerMetrics CustomResourceDefinition (YAML).
    Crd,
}

#[derive(Debug, Args)]
pub struct StandaloneArgs {
    /// YAML targets file; re-read when its content changes.
    #[arg(long, env = "WORKERSD_TARGETS")]
    pub targets: PathBuf,
    /// How often the targets file is checked for changes.
    #[arg(long, env = "WORKERSD_RELOAD_INTERVAL", default_value = "1s", value_parser = parse_duration)]
    pub reload_interval: Duration,
    #[command(flatten)]
    pub run: RunArgs,
}

#[derive(Debug, Args)]
pub struct KubernetesArgs {
    /// Names this cluster in Consul: the synthetic node is `workersd-<cluster>` and the owner id
    /// includes it, so clusters sharing one Consul never touch each other's entries.
    #[arg(long, env = "WORKERSD_CLUSTER_NAME", default_value = "kubernetes")]
    pub cluster_name: String,
    /// Only watch these namespaces (comma-separated); all namespaces when empty.
    #[arg(long, env = "WORKERSD_NAMESPACES", value_delimiter = ',')]
    pub namespaces: Vec<String>,
    /// Published service name; `{namespace}-{service}` keeps a namespace inside its own names.
    #[arg(
        long,
        env = "WORKERSD_SERVICE_NAME_TEMPLATE",
        default_value = "{service}"
    )]
    pub service_name_template: String,
    /// Most worker ports probed per namespace; pods beyond it are refused with an Event.
    #[arg(
        long,
        env = "WORKERSD_MAX_PORTS_PER_NAMESPACE",
        default_value_t = 10_240
    )]
    pub max_ports_per_namespace: usize,
    /// Accept pods with hostNetwork (they publish the node's IP).
    #[arg(long, env = "WORKERSD_ALLOW_HOST_NETWORK")]
    pub allow_host_network: bool,
    /// Elect a leader through a Lease; only the leader probes and writes.
    #[arg(long, env = "WORKERSD_LEADER_ELECTION", default_value_t = true, action = clap::ArgAction::Set)]
    pub leader_election: bool,
    /// Namespace of the Lease [default: the client's namespace, in-cluster the pod's].
    #[arg(long, env = "WORKERSD_LEASE_NAMESPACE")]
    pub lease_namespace: Option<String>,
    #[arg(long, env = "WORKERSD_LEASE_NAME", default_value = "workersd")]
    pub lease_name: String,
    /// A standby takes over once it has seen the Lease unrenewed for this long.
    #[arg(long, env = "WORKERSD_LEASE_DURATION", default_value = "15s", value_parser = parse_duration)]
    pub lease_duration: Duration,
    /// A Warning Event about a problem that persists is renewed this often; keep it well below
    /// the API server's --event-ttl (1 h by default) so the Event never expires meanwhile.
    #[arg(long, env = "WORKERSD_EVENT_REFRESH_INTERVAL", default_value = "30m", value_parser = parse_duration)]
    pub event_refresh_interval: Duration,
    /// Node-local mode (one instance per node, a DaemonSet): watch and probe only the pods of
    /// this Kubernetes node and publish them under the Consul node `workersd-<cluster>_<node>`.
    /// The Lease then elects no prober, only the janitor that removes the entries of deleted
    /// nodes (it needs nodes list and watch).
    #[arg(long, env = "NODE_NAME")]
    pub node_name: Option<String>,
    /// This instance's identity in the Lease and in Events [default: the hostname].
    #[arg(long, env = "POD_NAME")]
    pub identity: Option<String>,
    #[command(flatten)]
    pub run: RunArgs,
}

#[derive(Debug, Args)]
pub struct NomadArgs {
    /// The local Nomad agent's HTTP API.
    #[arg(long, env = "NOMAD_ADDR", default_value = "http://127.0.0.1:4646")]
    pub nomad_addr: String,
    /// File holding the Nomad ACL token (preferred; env NOMAD_TOKEN is the fallback). It
    /// needs agent:read, node:read and read-job on the namespaces to publish.
    #[arg(long, env = "NOMAD_TOKEN_FILE")]
    pub nomad_token_file: Option<PathBuf>,
    /// PEM CA bundle verifying an https Nomad (default: the system roots).
    #[arg(long, env = "NOMAD_CACERT")]
    pub nomad_ca_file: Option<PathBuf>,
    /// PEM client certificate for Nomad's verify_https_client (with --nomad-client-key).
    #[arg(long, env = "NOMAD_CLIENT_CERT")]
    pub nomad_client_cert: Option<PathBuf>,
    #[arg(long, env = "NOMAD_CLIENT_KEY")]
    pub nomad_client_key: Option<PathBuf>,
    /// Verify Nomad's certificate against this name instead of the address' host.
    #[arg(long, env = "NOMAD_TLS_SERVER_NAME")]
    pub nomad_tls_server_name: Option<String>,
    /// Nomad region (default: the agent's own).
    #[arg(long, env = "NOMAD_REGION")]
    pub nomad_region: Option<String>,
    /// Only allocations of this namespace; "*": every namespace the token may read.
    #[arg(long, env = "NOMAD_NAMESPACE", default_value = "*")]
    pub nomad_namespace: String,
    /// Longest wait of one blocking query on the allocations (Nomad caps it at 5m).
    #[arg(long, env = "WORKERSD_NOMAD_WAIT", default_value = "5m", value_parser = parse_duration)]
    pub nomad_wait: Duration,
    #[command(flatten)]
    pub run: RunArgs,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Registration {
    Catalog,
    Agent,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Liveness {
    Hold,
    Connect,
}

/// Settings shared by every mode: probing, sinks, the controller's own endpoints.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// Consul HTTP API address (host:port or URL). The Consul sink is off when unset.
    #[arg(long, env = "CONSUL_HTTP_ADDR")]
    pub consul_addr: Option<String>,
    /// File holding the Consul ACL token (preferred; env CONSUL_HTTP_TOKEN is the fallback).
    #[arg(long, env = "CONSUL_HTTP_TOKEN_FILE")]
    pub consul_token_file: Option<PathBuf>,
    /// PEM CA bundle verifying an https Consul (default: the system roots).
    #[arg(long, env = "CONSUL_CACERT")]
    pub consul_ca_file: Option<PathBuf>,
    /// PEM client certificate for Consul's verify_incoming (with --consul-client-key).
    #[arg(long, env = "CONSUL_CLIENT_CERT")]
    pub consul_client_cert: Option<PathBuf>,
    /// PEM private key of --consul-client-cert.
    #[arg(long, env = "CONSUL_CLIENT_KEY")]
    pub consul_client_key: Option<PathBuf>,
    /// Verify Consul's certificate against this name instead of the address' host.
    #[arg(long, env = "CONSUL_TLS_SERVER_NAME")]
    pub consul_tls_server_name: Option<String>,
    /// Consul datacenter (default: the agent's own).
    #[arg(long, env = "CONSUL_DATACENTER")]
    pub consul_datacenter: Option<String>,
    /// Name of the synthetic Consul node that holds workersd's entries [default: workersd-<hostname>].
    #[arg(long, env = "WORKERSD_CONSUL_NODE")]
    pub consul_node: Option<String>,
    /// Address recorded on the synthetic node (entries carry their own addresses).
    #[arg(
        long,
        env = "WORKERSD_CONSUL_NODE_ADDRESS",
        default_value = "127.0.0.1"
    )]
    pub consul_node_address: String,
    /// Owner id written on every entry; only entries with this id are ever changed or removed
    /// [default: the Consul node name].
    #[arg(long, env = "WORKERSD_OWNER_ID")]
    pub owner_id: Option<String>,
    /// How workers are registered. catalog: under a synthetic node workersd owns (Kubernetes,
    /// hosts without a Consul agent). agent: as services of the local Consul agent, each with
    /// a TTL check workersd passes while the worker lives, so they die with the host (hosts,
    /// VMs and Nomad clients running an agent; --consul-addr is then that agent).
    #[arg(
        long,
        env = "WORKERSD_CONSUL_REGISTRATION",
        value_enum,
        default_value = "catalog"
    )]
    pub consul_registration: Registration,
    /// Agent registration: a worker's check goes critical when workersd has not passed it for
    /// this long (workersd gone or stuck); passed every third of it.
    #[arg(long, env = "WORKERSD_CONSUL_CHECK_TTL", default_value = "30s", value_parser = parse_duration)]
    pub consul_check_ttl: Duration,
    /// Agent registration: the agent removes a worker whose check stayed critical this long
    /// (Consul raises anything below 1m to 1m).
    #[arg(long, env = "WORKERSD_CONSUL_DEREGISTER_CRITICAL_AFTER", default_value = "1m", value_parser = parse_duration)]
    pub consul_deregister_critical_after: Duration,
    /// Consul is re-read and corrected when a blocking query on the node sees a change, at
    /// most once per interval; the query waits at most this long (a wiped Consul is noticed
    /// within about one interval).
    #[arg(long, env = "WORKERSD_CONSUL_RESYNC_INTERVAL", default_value = "10s", value_parser = parse_duration)]
    pub consul_resync_interval: Duration,
    /// Timeout of one Consul request.
    #[arg(long, env = "WORKERSD_CONSUL_TIMEOUT", default_value = "5s", value_parser = parse_duration)]
    pub consul_timeout: Duration,
    /// On SIGTERM/SIGINT, deregister this owner's entries. For per-allocation sidecars (Nomad)
    /// whose owner id dies with them; off by default, so restarts never flap live entries.
    #[arg(long, env = "WORKERSD_DEREGISTER_ON_EXIT")]
    pub deregister_on_exit: bool,
    /// Listen address of the built-in Prometheus HTTP SD endpoint (GET /targets); "off" disables it.
    #[arg(long, env = "WORKERSD_HTTP_SD_LISTEN", default_value = "127.0.0.1:9464", value_parser = parse_optional_addr)]
    pub http_sd_listen: OptionalListen,
    /// Listen address of workersd's own /metrics, /healthz and /readyz.
    #[arg(long, env = "WORKERSD_LISTEN", default_value = "127.0.0.1:9463")]
    pub listen: SocketAddr,
    /// Probe interval once a target is steady.
    #[arg(long, env = "WORKERSD_PROBE_INTERVAL", default_value = probe_defaults::INTERVAL, value_parser = parse_duration)]
    pub probe_interval: Duration,
    /// Timeout of one port probe (connect plus response head).
    #[arg(long, env = "WORKERSD_PROBE_TIMEOUT", default_value = probe_defaults::TIMEOUT, value_parser = parse_duration)]
    pub probe_timeout: Duration,
    /// Most port probes in flight at once, over all targets.
    #[arg(long, env = "WORKERSD_PROBE_CONCURRENCY", default_value_t = probe_defaults::CONCURRENCY)]
    pub probe_concurrency: usize,
    /// Probe interval while a target is new or changing.
    #[arg(long, env = "WORKERSD_FAST_INTERVAL", default_value = probe_defaults::FAST_INTERVAL, value_parser = parse_duration)]
    pub fast_interval: Duration,
    /// How long a target stays at the fast interval after it appears or changes.
    #[arg(long, env = "WORKERSD_FAST_PERIOD", default_value = probe_defaults::FAST_PERIOD, value_parser = parse_duration)]
    pub fast_period: Duration,
    /// Every port of a range is probed this long after a change of its live ports, then at
    /// doubling gaps up to 8x this while nothing new is found. In between, sweeps skip the
    /// closed ports above the lowest closed one (workers take the first free port); 0s:
    /// always every port.
    #[arg(long, env = "WORKERSD_FULL_SWEEP_INTERVAL", default_value = probe_defaults::FULL_SWEEP_INTERVAL, value_parser = parse_duration_or_zero)]
    pub full_sweep_interval: Duration,
    /// How live workers are watched between full sweeps. hold: one idle TCP connection per
    /// live worker, whose close (worker exit) is noticed at once, at no cost while it lives;
    /// connect: reconnect to every live worker each sweep.
    #[arg(long, env = "WORKERSD_LIVENESS", value_enum, default_value = "hold")]
    pub liveness: Liveness,
    /// Log format.
    #[arg(long, env = "WORKERSD_LOG_FORMAT", value_enum, default_value = "text")]
    pub log_format: LogFormat,
}

/// A flag value clap could not take; clap shows it after the flag's name.
#[derive(Debug, thiserror::Error)]
pub enum FlagValueError {
    #[error("{text:?} is not a duration like {examples}: {source}")]
    Duration {
        text: String,
        examples: &'static str,
        source: humantime::DurationError,
    },
    #[error("must be greater than zero")]
    ZeroDuration,
    #[error("{text:?} is not host:port or \"off\": {source}")]
    ListenAddress {
        text: String,
        source: std::net::AddrParseError,
    },
}

fn parse_duration(text: &str) -> Result<Duration, FlagValueError> {
    let d = humantime::parse_duration(text).map_err(|source| FlagValueError::Duration {
        text: text.into(),
        examples: "500ms or 10s",
        source,
    })?;
    if d.is_zero() {
        return Err(FlagValueError::ZeroDuration);
    }
    Ok(d)
}

fn parse_duration_or_zero(text: &str) -> Result<Duration, FlagValueError> {
    humantime::parse_duration(text).map_err(|source| FlagValueError::Duration {
        text: text.into(),
        examples: "0s or 60s",
        source,
    })
}

/// A listen address that can be switched off with "off".
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OptionalListen(pub Option<SocketAddr>);

fn parse_optional_addr(text: &str) -> Result<OptionalListen, FlagValueError> {
    if text.eq_ignore_ascii_case("off") || text.is_empty() {
        return Ok(OptionalListen(None));
    }
    text.parse()
        .map(|addr| OptionalListen(Some(addr)))
        .map_err(|source| FlagValueError::ListenAddress {
            text: text.into(),
            source,
        })
}

/// Flags that clap accepted one by one but that do not go together.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum InvalidFlags {
    #[error("--fast-interval must not exceed --probe-interval")]
    FastIntervalAboveProbeInterval,
    #[error("--probe-concurrency must be between 1 and 65536")]
    ProbeConcurrencyOutOfRange,
    #[error("--probe-timeout must not exceed --probe-interval")]
    ProbeTimeoutAboveProbeInterval,
}

impl RunArgs {
    /// The prober's settings from these flags; `hold_capacity` is how many worker connections
    /// the file-descriptor limit leaves for holds.
    pub fn probe_settings(&self, hold_capacity: usize) -> ProbeSettings {
        ProbeSettings {
            interval: self.probe_interval,
            timeout: self.probe_timeout,
            concurrency: self.probe_concurrency,
            fast_interval: self.fast_interval,
            fast_period: self.fast_period,
            full_sweep_interval: self.full_sweep_interval,
            holds: match self.liveness {
                Liveness::Hold => hold_capacity,
                Liveness::Connect => 0,
            },
        }
    }

    /// Checks relations between flags that clap cannot express.
    pub fn validate(&self) -> Result<(), InvalidFlags> {
        if self.fast_interval > self.probe_interval {
            return Err(InvalidFlags::FastIntervalAboveProbeInterval);
        }
        if !(1..=65_536).contains(&self.probe_concurrency) {
            return Err(InvalidFlags::ProbeConcurrencyOutOfRange);
        }
        if self.probe_timeout > self.probe_interval {
            return Err(InvalidFlags::ProbeTimeoutAboveProbeInterval);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn parses_standalone_flags() {
        let cli = Cli::try_parse_from([
            "workersd",
            "standalone",
            "--targets",
            "t.yaml",
            "--http-sd-listen",
            "off",
            "--probe-interval",
            "2s",
            "--fast-interval",
            "100ms",
        ])
        .unwrap();
        let Command::Standalone(args) = cli.command else {
            panic!("wrong subcommand")
        };
        assert_eq!(args.run.http_sd_listen, OptionalListen(None));
        assert_eq!(args.run.probe_interval, Duration::from_secs(2));
        assert!(args.run.validate().is_ok());
    }

    #[test]
    fn probe_defaults_are_the_probe_settings_defaults() {
        let cli = Cli::try_parse_from(["workersd", "standalone", "--targets", "t"]).unwrap();
        let Command::Standalone(args) = cli.command else {
            panic!("wrong subcommand")
        };
        assert_eq!(args.run.probe_settings(0), ProbeSettings::default());
        assert_eq!(args.run.liveness, Liveness::Hold);
        assert_eq!(args.run.probe_settings(100).holds, 100);
        assert!(args.run.validate().is_ok());
    }

    #[test]
    fn rejects_bad_flags_with_reasons() {
        let err = Cli::try_parse_from([
            "workersd",
            "standalone",
            "--targets",
            "t",
            "--probe-interval",
            "soon",
        ])
        .unwrap_err();
        assert!(err.to_string().contains("not a duration"), "{err}");
        let err = Cli::try_parse_from([
            "workersd",
            "standalone",
            "--targets",
            "t",
            "--probe-timeout",
            "0s",
        ])
        .unwrap_err();
        assert!(err.to_string().contains("greater than zero"), "{err}");
        let cli = Cli::try_parse_from([
            "workersd",
            "standalone",
            "--targets",
            "t",
            "--fast-interval",
            "1m",
        ])
        .unwrap();
        let Command::Standalone(args) = cli.command else {
            panic!("wrong subcommand")
        };
        let err = args.run.validate().unwrap_err();
        assert_eq!(err, InvalidFlags::FastIntervalAboveProbeInterval);
        assert!(err.to_string().contains("--fast-interval"));
    }
}
