//! The command line. Every run flag also reads its `IDEMGATE_*` variable.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

/// The command line. Every run flag also reads its `IDEMGATE_*` variable.
#[derive(Debug, Parser)]
#[command(
    name = "idemgate",
    version,
    about = "Idempotency and deduplication sidecar"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub args: RunArgs,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Validate a config file: exit 0 and print the effective config, or list
    /// every problem and exit 2.
    CheckConfig,
    /// Run a toy payments API behind idemgate and show what duplicates do.
    Demo,
    /// Create or migrate the configured store's schema (PostgreSQL) and
    /// exit; for a role that may create it, before the sidecar runs as one
    /// that may not.
    Migrate,
    /// Exit 0 if the admin listener's /healthz answers 200 (for container
    /// health checks without curl); `--ready` checks /readyz instead.
    Healthcheck {
        #[arg(long)]
        ready: bool,
    },
}

/// Flags that override the config file.
#[derive(Debug, Default, Clone, Args)]
pub struct RunArgs {
    /// TOML config file (see config/idemgate.example.toml).
    #[arg(long, env = "IDEMGATE_CONFIG", global = true)]
    pub config: Option<PathBuf>,
    /// Proxy listener address [default: 127.0.0.1:8081].
    #[arg(long, env = "IDEMGATE_LISTEN", global = true)]
    pub listen: Option<String>,
    /// Admin listener address [default: 127.0.0.1:9901].
    #[arg(long, env = "IDEMGATE_ADMIN_LISTEN", global = true)]
    pub admin_listen: Option<String>,
    /// The API behind the proxy, e.g. http://127.0.0.1:8080. Without it only
    /// the admin listener runs (dedup-only mode).
    #[arg(long, env = "IDEMGATE_UPSTREAM", global = true)]
    pub upstream: Option<String>,
    /// Redis standalone URL (redis:// or rediss://).
    #[arg(long, env = "IDEMGATE_REDIS", global = true)]
    pub redis: Option<String>,
    /// Redis Cluster seed node URL (repeatable; comma-separated in the env).
    #[arg(
        long = "redis-cluster",
        env = "IDEMGATE_REDIS_CLUSTER",
        value_delimiter = ',',
        global = true
    )]
    pub redis_cluster: Vec<String>,
    /// Bearer token the admin API asks for (better from the environment or
    /// `admin_token_file` than on a command line).
    #[arg(
        long,
        env = "IDEMGATE_ADMIN_TOKEN",
        global = true,
        hide_env_values = true
    )]
    pub admin_token: Option<String>,
    /// Log format: text or json. Level from RUST_LOG.
    #[arg(long, env = "IDEMGATE_LOG_FORMAT", global = true)]
    pub log_format: Option<String>,
    /// Event loops serving the proxy listener (0: the shared runtime).
    #[arg(long, env = "IDEMGATE_EVENT_LOOPS", global = true)]
    pub event_loops: Option<String>,
}
