//! The command-line contract. Flag names are fixed; they may gain aliases, never change.

use std::net::SocketAddr;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

/// shardlease-worker: split public.work_items between workers that share one PostgreSQL.
#[derive(Debug, Parser)]
#[command(name = "shardlease-worker", version, about, long_about = None)]
pub struct Cli {
    /// PostgreSQL URL (postgres://user:password@host:port/database); TLS with
    /// ?sslmode=require, verify-ca or verify-full, and &sslrootcert=<CA PEM file>.
    #[arg(
        long,
        env = "DATABASE_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/postgres",
        hide_env_values = true,
        hide_default_value = false,
        global = true
    )]
    pub database_url: String,

    /// Log format on stderr.
    #[arg(long, env = "SHARDLEASE_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text, global = true)]
    pub log_format: LogFormat,

    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Apply all migrations (the shardlease schema and work_items) and exit. Idempotent.
    Migrate,
    /// Insert N new items into public.work_items.
    Seed(SeedArgs),
    /// Print the group's generation and members, with their shard and item counts.
    Status(GroupArgs),
    /// Join the group and tick the owned slice of work_items until SIGTERM or SIGINT.
    Run(RunArgs),
    /// Migrate, seed 12 demo items and run 3 workers in-process; then remove one and add one.
    Demo(DemoArgs),
}

/// `seed` arguments.
#[derive(Debug, Args)]
pub struct SeedArgs {
    /// How many items to insert (1 to 100000000).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=100_000_000))]
    pub count: u64,
}

/// The group flag.
#[derive(Debug, Clone, Args)]
pub struct GroupArgs {
    /// Group name.
    #[arg(long, env = "SHARDLEASE_GROUP", default_value = "work_items")]
    pub group: String,
}

/// Timing flags shared by `run` and `demo`.
#[derive(Debug, Clone, Args)]
pub struct Timing {
    /// Heartbeat interval, e.g. 500ms or 1s.
    #[arg(long, env = "SHARDLEASE_HEARTBEAT", default_value = "1s", value_parser = parse_duration)]
    pub heartbeat: Duration,

    /// Lease TTL by the database clock; must exceed twice the heartbeat.
    #[arg(long, env = "SHARDLEASE_LEASE_TTL", default_value = "5s", value_parser = parse_duration)]
    pub lease_ttl: Duration,

    /// Tick interval: how often owned items are incremented.
    #[arg(long, env = "SHARDLEASE_TICK", default_value = "1s", value_parser = parse_duration)]
    pub tick: Duration,

    /// How often to check for crashed members (bounds crash take-over); at most the heartbeat.
    #[arg(long, env = "SHARDLEASE_CRASH_CHECK", default_value = "100ms", value_parser = parse_duration)]
    pub crash_check: Duration,
}

/// `run` arguments.
#[derive(Debug, Args)]
pub struct RunArgs {
    #[command(flatten)]
    pub group: GroupArgs,

    #[command(flatten)]
    pub timing: Timing,

    /// PostgreSQL URL of the work connection (the fenced ticks), in the form of
    /// --database-url; default: --database-url. It may point at PgBouncer in transaction
    /// mode; --database-url carries the session (advisory lock, LISTEN, heartbeat) and must
    /// reach PostgreSQL directly or through a session-mode pool.
    #[arg(long, env = "WORK_DATABASE_URL", hide_env_values = true)]
    pub work_database_url: Option<String>,

    /// Member id; defaults to the hostname.
    #[arg(long, env = "POD_NAME", visible_alias = "member-id")]
    pub pod_name: Option<String>,

    /// Address of the HTTP server (/healthz, /readyz, /metrics); port 0 picks a free one.
    #[arg(long, env = "SHARDLEASE_HTTP_ADDR", default_value = "0.0.0.0:8080")]
    pub http_addr: SocketAddr,

    /// Print every watched id every second, however many (default: up to 20, then a summary).
    #[arg(long, env = "SHARDLEASE_PRINT_ALL_IDS")]
    pub print_all_ids: bool,
}

/// `demo` arguments.
#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Tick interval of the demo workers.
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    pub tick: Duration,
}

/// Parse `500ms`, `3s`, `1m`...; zero is refused.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s.trim())
        .map_err(|e| format!("{e} (write durations like 500ms, 3s or 1m)"))?;
    if d.is_zero() {
        return Err("must be more than zero".into());
    }
    Ok(d)
}

impl Timing {
    /// Check the relations between the values (each is positive already).
    pub fn validate(&self) -> Result<(), String> {
        if self.lease_ttl <= self.heartbeat * 2 {
            return Err(format!(
                "--lease-ttl ({}) must be more than twice --heartbeat ({})",
                humantime::format_duration(self.lease_ttl),
                humantime::format_duration(self.heartbeat)
            ));
        }
        if self.crash_check > self.heartbeat {
            return Err(format!(
                "--crash-check ({}) must not exceed --heartbeat ({})",
                humantime::format_duration(self.crash_check),
                humantime::format_duration(self.heartbeat)
            ));
        }
        if self.tick < Duration::from_millis(10) {
            return Err("--tick must be at least 10ms".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("3s"), Ok(Duration::from_secs(3)));
        assert!(parse_duration("0s").is_err());
        assert!(parse_duration("fast").is_err());
    }

    #[test]
    fn cli_is_well_formed() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }

    #[test]
    fn ttl_must_exceed_twice_the_heartbeat() {
        let t = Timing {
            heartbeat: Duration::from_secs(1),
            lease_ttl: Duration::from_secs(2),
            tick: Duration::from_secs(1),
            crash_check: Duration::from_millis(100),
        };
        assert!(t.validate().unwrap_err().contains("more than twice"));
    }
}
