//! Leader election with shardlease's `Leader` API.
//!
//! Every process joins the same group as a candidate; the longest-standing one leads. A
//! process that restarts (or loses its lease and rejoins) comes back as the newest candidate
//! and follows: it never takes the lead from a live leader.
//!
//! When the leader leaves (SIGTERM: `resign()`), the next candidate leads at once. When it
//! crashes (kill -9), its successor, which waits on the leader's lock, reaps it the instant
//! its connection is gone: a few milliseconds. When it hangs, it reports `LOST` before its
//! lease expires by the database clock, and its successor takes over when the lease has
//! expired (about one TTL, 10 s by default).
//!
//! The leader proves its leadership with a leader transaction every second: the insert
//! commits only if this process still leads the group, checked in the same message as the
//! COMMIT. A deposed leader's write is refused, however late it learns it was deposed.
//!
//! ```text
//! cargo run -p shardlease --example leader_election -- --member a   # in three terminals:
//! cargo run -p shardlease --example leader_election -- --member b   # a leads; kill it and
//! cargo run -p shardlease --example leader_election -- --member c   # b takes over
//! psql -c 'SELECT * FROM shardlease.leaders'
//! psql -c 'SELECT generation, leader, count(*) FROM leader_log GROUP BY 1, 2 ORDER BY 1'
//! ```
//!
//! Output, one line per event:
//! `LEADER <me> generation=<g> members=<n>`,
//! `FOLLOWER <me> (leader: <id>) generation=<g> members=<n>`,
//! `WROTE <me> generation=<g>`, `FENCED <me>: <why>`, `LOST <me>: <why>`, `LEFT <me>`.

use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use shardlease::tokio_postgres::Client;
use shardlease::{Election, Leader, LeaderConfig, LeaderFence, Leadership};
use tokio::signal::unix::{signal, SignalKind};

#[derive(Parser)]
#[command(about = "Leader election with shardlease: the longest-standing candidate leads")]
struct Args {
    /// PostgreSQL URL.
    #[arg(
        long,
        env = "DATABASE_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/postgres",
        hide_env_values = true
    )]
    database_url: String,
    /// This member's id, unique in the group. Default: <hostname>-<pid>.
    #[arg(long, env = "MEMBER_ID")]
    member: Option<String>,
    /// The group to elect a leader in.
    #[arg(long, default_value = "leader-demo")]
    group: String,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    // Install the handlers first, so that a signal sent while we start up is not fatal.
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut sigint = signal(SignalKind::interrupt())?;
    let me = args.member.unwrap_or_else(default_member_id);

    let pg: shardlease::DbConfig = args.database_url.parse()?;
    let mut client = pg.connect("leader_election").await?;
    shardlease::migrate(&mut client).await?;
    // Serialise the CREATE: concurrent CREATE TABLE IF NOT EXISTS can still collide.
    client
        .batch_execute(
            "BEGIN;
             SELECT pg_advisory_xact_lock(hashtext('leader_log'));
             CREATE TABLE IF NOT EXISTS leader_log (
                 id bigserial PRIMARY KEY,
                 generation bigint NOT NULL,
                 leader text NOT NULL,
                 written_at timestamptz NOT NULL DEFAULT now());
             COMMIT;",
        )
        .await
        .context("creating leader_log")?;

    let leader = Leader::join(&pg, LeaderConfig::new(&args.group, &me)).await?;
    let mut elections = leader.watch();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut printed = String::new();
    print_role(&me, &elections.borrow_and_update(), &mut printed);

    loop {
        tokio::select! {
            _ = sigterm.recv() => break,
            _ = sigint.recv() => break,
            changed = elections.changed() => {
                if changed.is_err() {
                    anyhow::bail!("the candidate stopped");
                }
                print_role(&me, &elections.borrow_and_update(), &mut printed);
            }
            _ = tick.tick() => {
                let election = elections.borrow().clone();
                let Leadership::Leading { fence, .. } = &election.leadership else {
                    continue;
                };
                let generation = election.view.generation;
                match write_as_leader(&mut client, fence, &me, generation).await {
                    Ok(()) => println!("WROTE {me} generation={generation}"),
                    // We no longer lead: the next election tells.
                    Err(e) if e.is_fenced() => println!("FENCED {me}: {e}"),
                    Err(e) if client.is_closed() => {
                        eprintln!("{me}: the work connection broke ({e}); reconnecting");
                        client = pg.connect("leader_election").await?;
                    }
                    Err(e) => eprintln!("{me}: write failed: {e}"),
                }
            }
        }
    }
    // Hand over at once: the next candidate leads as soon as our leave commits.
    leader.resign().await?;
    println!("LEFT {me}");
    Ok(())
}

/// Print the role line when it differs from the last one printed.
fn print_role(me: &str, election: &Election, printed: &mut String) {
    let (generation, members) = (election.view.generation, election.view.members.len());
    let line = match &election.leadership {
        Leadership::Leading { .. } => {
            format!("LEADER {me} generation={generation} members={members}")
        }
        Leadership::Following { leader } => {
            format!("FOLLOWER {me} (leader: {leader}) generation={generation} members={members}")
        }
        Leadership::Lost { reason } => format!("LOST {me}: {reason}"),
        other => format!("LOST {me}: {other:?}"),
    };
    if line != *printed {
        println!("{line}");
        *printed = line;
    }
}

/// One leader transaction: it commits only if we still lead, so a deposed leader's write is
/// refused with `Error::Fenced`.
async fn write_as_leader(
    client: &mut Client,
    fence: &LeaderFence,
    me: &str,
    generation: u64,
) -> shardlease::Result<()> {
    let tx = fence.begin(client).await?;
    tx.execute(
        "INSERT INTO leader_log (generation, leader) VALUES ($1, $2)",
        &[&(generation as i64), &me],
    )
    .await?;
    tx.commit().await?;
    Ok(())
}

fn default_member_id() -> String {
    let host = std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".into());
    format!("{host}-{}", std::process::id())
}
