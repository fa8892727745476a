//! The command-line contract. Flag names are fixed; they may gain aliases, never change.

use std::net::SocketAddr;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

/// The server when `--database-url`/`DATABASE_URL` is unset.
pub const DEFAULT_DATABASE_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";

/// shardlease-worker: split public.work_items between workers that share one PostgreSQL.
#[derive(Debug, Parser)]
#[command(name = "shardlease-worker", version, about, long_about = None)]
pub struct Cli {
    /// PostgreSQL URL (postgres://user:password@host:port/database); TLS with
    /// ?sslmode=require, verify-ca or verify-full, and &sslrootcert=<CA PEM file>; a client
    /// certificate with &sslcert=<PEM>&sslkey=<PEM> (and &sslpassword= for an encrypted key).
    /// [default: postgres://postgres@127.0.0.1:5432/postgres; for `demo`, when nothing
    /// answers there, a throwaway PostgreSQL from the local installation]
    #[arg(long, env = "DATABASE_URL", hide_env_values = true, global = true)]
    pub database_url: Option<String>,

    /// The URL used when --database-url is unset. Hidden: it lets tests point the default
    /// at an address where nothing answers, without stopping the server there.
    #[arg(
        long,
        env = "SHARDLEASE_DEFAULT_DATABASE_URL",
        default_value = DEFAULT_DATABASE_URL,
        hide = true,
        global = true
    )]
    pub default_database_url: String,

    /// Log format on stderr.
    #[arg(long, env = "SHARDLEASE_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text, global = true)]
    pub log_format: LogFormat,

    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

impl Cli {
    /// `--database-url` when given (and not empty), else the default.
    pub fn database_url(&self) -> &str {
        self.explicit_database_url()
            .unwrap_or(&self.default_database_url)
    }

    /// `--database-url` (`DATABASE_URL`) when given and not empty.
    pub fn explicit_database_url(&self) -> Option<&str> {
        self.database_url
            .as_deref()
            .map(str::trim)
            .filter(|u| !u.is_empty())
    }
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
    /// Apply all migrations (the shardlease schema and work_items) and exit; then, given
    /// --member-role or --inspector-role, grant them as `grant` does. Idempotent.
    Migrate(RoleArgs),
    /// Grant least-privilege roles, as the owner of the schemas (who ran `migrate`):
    /// members may join, heartbeat, leave, reap and tick work_items; inspectors may only read
    /// the views, work_items and status; neither may create, alter or drop anything, nor
    /// evict anyone. Idempotent.
    Grant(RoleArgs),
    /// Insert N new items into public.work_items.
    Seed(SeedArgs),
    /// Print the group's generation and members, with their shard and item counts.
    Status(GroupArgs),
    /// Join the group and tick the owned slice of work_items until SIGTERM or SIGINT.
    Run(RunArgs),
    /// Migrate, seed 60 demo items and run 3 workers in-process; then remove one and add one.
    /// With DATABASE_URL unset and nothing answering at 127.0.0.1:5432, it runs on a
    /// throwaway PostgreSQL started from the local installation (removed at exit).
    Demo(DemoArgs),
}

/// The roles of `grant` (and `migrate`): existing roles, neither a superuser nor the owner.
#[derive(Debug, Clone, Args)]
pub struct RoleArgs {
    /// The workers' role: may join, heartbeat, leave, reap and tick (UPDATE) work_items.
    #[arg(long, env = "SHARDLEASE_MEMBER_ROLE")]
    pub member_role: Option<String>,

    /// A read-only role for psql users and dashboards: the views, work_items and `status`.
    #[arg(long, env = "SHARDLEASE_INSPECTOR_ROLE")]
    pub inspector_role: Option<String>,
}

impl RoleArgs {
    /// The roles to grant, with their kinds (empty names are ignored).
    pub fn roles(&self) -> Vec<(&str, shardlease::roles::RoleKind)> {
        use shardlease::roles::RoleKind;
        [
            (self.member_role.as_deref(), RoleKind::Member),
            (self.inspector_role.as_deref(), RoleKind::Inspector),
        ]
        .into_iter()
        .filter_map(|(name, kind)| Some((name?.trim(), kind)))
        .filter(|(name, _)| !name.is_empty())
        .collect()
    }
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
        // The rules that relate heartbeat, TTL and crash check are the library's: one source.
        let member = shardlease::MemberConfig::new("flags", "flags")
            .heartbeat(self.heartbeat)
            .lease_ttl(self.lease_ttl)
            .crash_check(self.crash_check);
        if let Err(e) = member.validate() {
            let detail = match e {
                shardlease::Error::Config(detail) => detail,
                e => e.to_string(),
            };
            return Err(format!(
                "{detail} (--heartbeat {}, --lease-ttl {}, --crash-check {})",
                humantime::format_duration(self.heartbeat),
                humantime::format_duration(self.lease_ttl),
                humantime::format_duration(self.crash_check)
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
