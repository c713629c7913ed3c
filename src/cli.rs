//! The command line (SPEC §1): clap derive with environment fallbacks.
//! Flags win over env, env over the file; `main` turns these into actions.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::telemetry::logging::LogFormat;

#[derive(Parser, Debug)]
#[command(
    name = "opsgate",
    version,
    about = "Sidecar health/ops proxy: maintenance mode, circuit breakers, retries, health checks and metrics for any app."
)]
pub struct Cli {
    /// Log format (default: json when stdout is not a terminal).
    #[arg(long, global = true, value_enum)]
    pub log_format: Option<LogFormat>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Args, Debug, Clone)]
pub struct ConfigArg {
    /// Config file (default: ./opsgate.toml, then /etc/opsgate/opsgate.toml).
    #[arg(long, env = "OPSGATE_CONFIG")]
    pub config: Option<PathBuf>,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the proxy.
    Run {
        #[command(flatten)]
        config: ConfigArg,
        /// Proxy listen address (overrides proxy.listen).
        #[arg(long, env = "OPSGATE_LISTEN", value_parser = parse_listen)]
        listen: Option<SocketAddr>,
        /// Upstream URL: defines upstream "app" and, without routes, a catch-all route.
        #[arg(long, env = "OPSGATE_UPSTREAM")]
        upstream: Option<String>,
        /// Admin listen address (overrides admin.listen).
        #[arg(long, env = "OPSGATE_ADMIN_LISTEN", value_parser = parse_listen)]
        admin: Option<SocketAddr>,
    },
    /// Validate the config: exit 0 when valid, 2 with every error (file:line:col) when not.
    CheckConfig {
        #[command(flatten)]
        config: ConfigArg,
    },
    /// Run every health check once and print a table; exit 0 healthy/degraded, 1 unhealthy.
    Check {
        #[command(flatten)]
        config: ConfigArg,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Block until every critical check passes (for init containers); exit 1 on timeout.
    Wait {
        #[command(flatten)]
        config: ConfigArg,
        #[arg(long, default_value = "60s", value_parser = parse_dur)]
        timeout: std::time::Duration,
    },
    /// GET a URL without following redirects: exit 0 on 2xx/3xx, 1 otherwise.
    Probe {
        url: String,
        #[arg(long, default_value = "2s", value_parser = parse_dur)]
        timeout: std::time::Duration,
    },
    /// Talk to a running opsgate's admin API.
    Ctl(CtlArgs),
    /// Add the opsgate sidecar to Kubernetes manifests (files or stdin); writes YAML to stdout.
    ///
    /// Deployments, StatefulSets and DaemonSets (also inside `List`s) get the sidecar, a
    /// ConfigMap `<name>-opsgate`, opsgate's probes and a config volume; Services in the
    /// input that select them are pointed at opsgate's port. Already injected workloads
    /// are left as they are.
    Inject(InjectArgs),
    /// Run opsgate on :8080 in front of a built-in demo app.
    Demo {
        /// Proxy listen address for the demo.
        #[arg(long, default_value = "0.0.0.0:8080", value_parser = parse_listen)]
        listen: SocketAddr,
        /// Admin listen address for the demo.
        #[arg(long, default_value = "127.0.0.1:9901", value_parser = parse_listen)]
        admin: SocketAddr,
    },
}

#[derive(Args, Debug)]
pub struct InjectArgs {
    /// Manifest files or directories (their .yaml/.yml/.json files); none or `-` reads stdin.
    pub files: Vec<PathBuf>,
    /// The opsgate image.
    #[arg(long, default_value = concat!("opsgate:", env!("CARGO_PKG_VERSION")))]
    pub image: String,
    /// The app container opsgate fronts, when the pod has several.
    #[arg(long)]
    pub container: Option<String>,
    /// The app's port (default: its only declared port, else its probe's port).
    #[arg(long)]
    pub upstream_port: Option<u16>,
    /// A critical dependency check, NAME=URL (postgres://, redis://, http(s)://, else host:port
    /// for TCP). Keep credentials out of the ConfigMap with `${VAR:-default}`: VAR then comes
    /// from the optional Secret `<name>-opsgate`.
    #[arg(long, value_name = "NAME=URL")]
    pub check: Vec<String>,
    /// A dependency check that only degrades health, NAME=URL.
    #[arg(long, value_name = "NAME=URL")]
    pub soft_check: Vec<String>,
    /// Maintenance mode when turned on (by the ConfigMap key "maintenance"): block writes or all.
    #[arg(long, default_value = "writes", value_parser = ["writes", "all"])]
    pub maintenance: String,
    /// Ship this opsgate.toml instead of one made from the flags above.
    #[arg(long, conflicts_with_all = ["check", "soft_check"])]
    pub config: Option<PathBuf>,
    /// A regular container instead of a native sidecar (clusters older than Kubernetes 1.29).
    #[arg(long)]
    pub no_native_sidecar: bool,
}

#[derive(Args, Debug)]
pub struct CtlArgs {
    /// Admin API base URL.
    #[arg(
        long,
        env = "OPSGATE_ADMIN_URL",
        default_value = "http://127.0.0.1:9901"
    )]
    pub admin: String,
    /// Bearer token for the admin API.
    #[arg(long, env = "OPSGATE_ADMIN_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Print raw JSON.
    #[arg(long, global = true)]
    pub json: bool,
    #[command(subcommand)]
    pub command: CtlCommand,
}

#[derive(Subcommand, Debug)]
pub enum CtlCommand {
    /// Show health, breakers and maintenance.
    Status,
    /// Turn the maintenance override on or off, or clear it.
    Maintenance {
        #[command(subcommand)]
        action: MaintenanceAction,
    },
    /// Control a circuit breaker by name.
    Breaker {
        #[command(subcommand)]
        action: BreakerAction,
    },
    /// Reload the config now.
    Reload,
    /// Start draining: readiness 503, keep serving.
    Drain,
    /// Fleet-wide toggles through Redis.
    Fleet {
        #[command(subcommand)]
        command: FleetCommand,
    },
}

#[derive(Subcommand, Debug)]
pub enum MaintenanceAction {
    On {
        #[arg(long)]
        reason: Option<String>,
    },
    Off,
    Clear,
}

#[derive(Subcommand, Debug)]
pub enum BreakerAction {
    Reset { name: String },
    Open { name: String },
    Close { name: String },
}

#[derive(Subcommand, Debug)]
pub enum FleetCommand {
    /// SET and PUBLISH the fleet maintenance key.
    Maintenance {
        #[arg(value_parser = ["on", "off"])]
        state: String,
        #[arg(long)]
        redis: String,
        #[arg(long)]
        key: String,
    },
}

fn parse_dur(s: &str) -> Result<std::time::Duration, String> {
    crate::config::parse_duration(s)
}

fn parse_listen(s: &str) -> Result<SocketAddr, String> {
    crate::config::parse_listen(s)
}
