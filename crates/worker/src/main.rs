//! `shardlease-worker`: claims a jump-hash slice of `public.work_items` and ticks it every
//! second. See `--help`, and the repository README.

use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::Parser;
use shardlease::MemberConfig;
use tokio_util::sync::CancellationToken;

use shardlease_worker::cli::{self, Cli, Command, LogFormat};
use shardlease_worker::first_run::{self, NoPostgres};
use shardlease_worker::items::Items;
use shardlease_worker::{db, demo, http, printer, status, worker};

/// The exit status after SIGINT, as shells report a process ended by it (128 + 2).
const EXIT_INTERRUPTED: u8 = 130;

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if !e.use_stderr() => e.exit(), // --help, --version
        Err(e) => {
            // One line: what is wrong with which flag.
            let text = e.render().to_string();
            let first = text.lines().next().unwrap_or("invalid arguments");
            eprintln!("{first}");
            return ExitCode::from(2);
        }
    };
    if let Command::Run(args) = &cli.command {
        if let Err(msg) = args.timing.validate() {
            eprintln!("error: {msg}");
            return ExitCode::from(2);
        }
    }
    if let Command::Grant(roles) = &cli.command {
        if roles.roles().is_empty() {
            eprintln!("error: grant needs --member-role, --inspector-role or both");
            return ExitCode::from(2);
        }
    }
    // The demo tells its story on stdout: only warnings on stderr unless RUST_LOG asks.
    let default_level = match cli.command {
        Command::Demo(_) => "warn",
        _ => "info",
    };
    init_logging(cli.log_format, default_level);
    // `run` on one thread: a worker's tasks (its session, its ticks, its HTTP endpoints) wait
    // on the database almost all the time, and a second thread only adds wake-ups between
    // threads (hundreds of workers share a machine with their PostgreSQL).
    let runtime = match cli.command {
        Command::Run(_) => tokio::runtime::Builder::new_current_thread(),
        _ => {
            let mut b = tokio::runtime::Builder::new_multi_thread();
            b.worker_threads(2);
            b
        }
    }
    .enable_all()
    .build();
    let runtime = match runtime {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(dispatch(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if e.is::<demo::Interrupted>() => {
            eprintln!("{e}");
            ExitCode::from(EXIT_INTERRUPTED)
        }
        // Several lines: the install command per platform.
        Err(e) if e.is::<NoPostgres>() => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("error: {}", one_line(&e));
            ExitCode::FAILURE
        }
    }
}

/// The error and its causes on one line, without repeating a cause that a message
/// already quotes (driver errors include their cause in their own message).
fn one_line(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if !out.contains(&text) {
            if !out.is_empty() {
                out.push_str(": ");
            }
            out.push_str(&text);
        }
    }
    out
}

fn init_logging(format: LogFormat, default_level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("RUST_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
}

async fn dispatch(cli: Cli) -> Result<()> {
    let url = cli.database_url().to_owned();
    let explicit_url = cli.explicit_database_url().map(str::to_owned);
    let default_url = cli.default_database_url;
    match cli.command {
        Command::Migrate(roles) => {
            let (pg, mut client) = db::connect(&url, "shardlease-worker migrate").await?;
            let applied = db::migrate(&mut client).await?;
            if applied.is_empty() {
                println!("{}: already up to date", shardlease::describe_target(&pg));
            } else {
                println!(
                    "{}: applied {}",
                    shardlease::describe_target(&pg),
                    applied.join(", ")
                );
            }
            if !roles.roles().is_empty() {
                grant(&pg, &mut client, &roles).await?;
            }
            Ok(())
        }
        Command::Grant(roles) => {
            let (pg, mut client) = db::connect(&url, "shardlease-worker grant").await?;
            grant(&pg, &mut client, &roles).await
        }
        Command::Seed(args) => {
            let (_, client) = db::connect(&url, "shardlease-worker seed").await?;
            db::check_migrated(&client).await?;
            let count = args.count;
            Items::work_items()
                .seed(&client, count, |done| {
                    if count > 50_000 {
                        eprintln!("seeded {done}/{count}");
                    }
                })
                .await?;
            println!("inserted {count} items into public.work_items");
            Ok(())
        }
        Command::Status(args) => {
            let (_, client) = db::connect(&url, "shardlease-worker status").await?;
            db::check_migrated(&client).await?;
            print!(
                "{}",
                status::render(&client, &args.group, &Items::work_items()).await?
            );
            Ok(())
        }
        Command::Run(args) => run(&url, args).await,
        Command::Demo(args) => {
            // Handlers first: from here on, SIGINT and SIGTERM end the demo in order (its
            // workers leave, then the throwaway server, if any, is removed).
            let interrupted = CancellationToken::new();
            tokio::spawn(cancel_on_signal(interrupted.clone())?);
            let target =
                first_run::demo_target(explicit_url.as_deref(), &default_url, &interrupted).await?;
            let inspect = target.throwaway.is_none();
            let result = async {
                let pg = &target.config;
                let mut client = shardlease::connect_client(pg, "shardlease-worker demo").await?;
                db::migrate(&mut client).await?;
                demo::run(pg, &client, args.tick, &interrupted, inspect).await
            }
            .await;
            target.finish().await;
            result
        }
    }
}

/// Grant the roles and print every privilege each one got, and the warnings.
async fn grant(
    pg: &shardlease::DbConfig,
    client: &mut shardlease::tokio_postgres::Client,
    roles: &cli::RoleArgs,
) -> Result<()> {
    for g in db::grant(client, &roles.roles()).await? {
        println!(
            "{}: {} role {} may now, and may only:",
            shardlease::describe_target(pg),
            g.kind,
            g.role
        );
        for p in &g.privileges {
            println!("  {p}");
        }
        for w in &g.warnings {
            eprintln!("warning: {w}");
        }
    }
    Ok(())
}

async fn run(url: &str, args: cli::RunArgs) -> Result<()> {
    let pg = shardlease::parse_database_url(url)?;
    // Unset or empty: the work connection goes where the session goes.
    let work_url = args
        .work_database_url
        .as_deref()
        .map(str::trim)
        .filter(|u| !u.is_empty());
    let work_pg = match work_url {
        Some(work_url) => shardlease::parse_database_url(work_url)
            .context("WORK_DATABASE_URL (--work-database-url)")?,
        None => pg.clone(),
    };
    let member_id = match args.pod_name.filter(|s| !s.trim().is_empty()) {
        Some(id) => id,
        None => hostname()
            .context("POD_NAME is not set and the hostname is unknown: pass --pod-name")?,
    };
    let member = MemberConfig::new(args.group.group, member_id.clone())
        .heartbeat(args.timing.heartbeat)
        .lease_ttl(args.timing.lease_ttl)
        .crash_check(args.timing.crash_check)
        .metadata(
            serde_json::json!({"version": env!("CARGO_PKG_VERSION"), "pid": std::process::id()}),
        );
    member.validate()?;

    // Fail fast on a database that is reachable but not migrated; keep retrying one that
    // is not reachable yet (it may be starting).
    match shardlease::connect_client(&pg, "shardlease-worker check").await {
        Ok(client) => db::check_migrated(&client).await?,
        Err(e) => tracing::warn!(error = %e, "database not reachable yet; will keep trying"),
    }
    // The same for the work connection's target (the check's statements are unnamed, so
    // they work through a transaction pooler): a work URL that reaches another database
    // fails now, not at every tick.
    if work_url.is_some() {
        match shardlease::connect_client(&work_pg, "shardlease-worker check").await {
            Ok(client) => db::check_migrated(&client)
                .await
                .context("WORK_DATABASE_URL (--work-database-url)")?,
            Err(e) => {
                tracing::warn!(error = %e, "work database not reachable yet; will keep trying")
            }
        }
    }

    let shutdown = CancellationToken::new();
    let (ready_tx, ready) = worker::readiness();
    let metrics = http::install_metrics()?;
    http::serve(args.http_addr, ready.clone(), metrics, shutdown.clone()).await?;
    tokio::spawn(cancel_on_signal(shutdown.clone())?);
    tracing::info!(
        member = %member_id,
        database = %shardlease::describe_target(&pg),
        work_database = %shardlease::describe_target(&work_pg),
        "starting"
    );
    let cfg = worker::WorkerConfig {
        pg,
        work_pg,
        member,
        tick: args.timing.tick,
        items: Items::work_items(),
        print: Some(printer::Printer::new(args.print_all_ids)),
    };
    worker::run(cfg, shutdown, ready_tx).await
}

/// Handle SIGTERM and SIGINT from now on (the handlers are installed before this returns);
/// the returned future cancels `shutdown` at the first of them.
fn cancel_on_signal(
    shutdown: CancellationToken,
) -> Result<impl std::future::Future<Output = ()> + Send + 'static> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM: leaving the group"),
            _ = int.recv() => tracing::info!("SIGINT: leaving the group"),
        }
        shutdown.cancel();
    })
}

fn hostname() -> Option<String> {
    std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
}
