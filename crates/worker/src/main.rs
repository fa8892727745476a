//! `shardlease-worker`: claims a jump-hash slice of `public.work_items` and ticks it every
//! second. See `--help`, and the repository README.

use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::Parser;
use shardlease::MemberConfig;
use tokio_util::sync::CancellationToken;

use shardlease_worker::cli::{self, Cli, Command, LogFormat};
use shardlease_worker::items::Items;
use shardlease_worker::{db, demo, http, printer, status, worker};

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
    init_logging(cli.log_format);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(dispatch(cli)) {
        Ok(()) => ExitCode::SUCCESS,
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

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("RUST_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
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
    let url = cli.database_url;
    match cli.command {
        Command::Migrate => {
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
            Ok(())
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
            let (pg, mut client) = db::connect(&url, "shardlease-worker demo").await?;
            db::migrate(&mut client).await?;
            demo::run(&pg, &client, args.tick).await
        }
    }
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
    let ready = worker::Readiness::default();
    let metrics = http::install_metrics()?;
    http::serve(args.http_addr, ready.clone(), metrics, shutdown.clone()).await?;
    tokio::spawn(signals(shutdown.clone()));
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
    worker::run(cfg, shutdown, ready).await
}

/// Cancel `shutdown` on SIGTERM or SIGINT.
async fn signals(shutdown: CancellationToken) {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("cannot install signal handlers");
        return;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: leaving the group"),
        _ = int.recv() => tracing::info!("SIGINT: leaving the group"),
    }
    shutdown.cancel();
}

fn hostname() -> Option<String> {
    std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
}
