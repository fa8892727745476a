//! Leader election with shardlease.
//!
//! Every process joins the same group; the member in the lowest live slot leads. When the
//! leader leaves (SIGTERM) or crashes (kill -9), the survivors get a new view and the next
//! lowest slot takes over: at once on a leave, within the crash-check interval on a crash.
//!
//! Slots are sticky and a joiner takes the lowest vacant one, so a member that restarts (or
//! loses its lease and rejoins) into a lower slot than the current leader's takes the lead
//! back. Pick the lowest incarnation instead if leadership should stay with the oldest member.
//!
//! The leader proves its leadership with a fenced write every second: the insert commits only
//! if the view it decided "I lead" from is still current. Two leaders can therefore never
//! write under the same generation, even if one of them is slow to learn it was replaced.
//!
//! ```text
//! cargo run -p shardlease --example leader_election -- --member a   # in three terminals:
//! cargo run -p shardlease --example leader_election -- --member b   # a leads; kill it and
//! cargo run -p shardlease --example leader_election -- --member c   # b takes over
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
use shardlease::{Fence, Member, MemberConfig, MemberState, View};
use tokio::signal::unix::{signal, SignalKind};

#[derive(Parser)]
#[command(about = "Leader election with shardlease: the lowest live slot leads")]
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

    let pg = shardlease::parse_database_url(&args.database_url)?;
    let mut client = shardlease::connect_client(&pg, "leader_election").await?;
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

    let member = Member::join(&pg, MemberConfig::new(&args.group, &me)).await?;
    let mut views = member.watch();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    print_role(&me, &views.borrow_and_update());

    loop {
        tokio::select! {
            _ = sigterm.recv() => break,
            _ = sigint.recv() => break,
            changed = views.changed() => {
                if changed.is_err() {
                    anyhow::bail!("the member stopped");
                }
                print_role(&me, &views.borrow_and_update());
            }
            _ = tick.tick() => {
                let view = views.borrow().clone();
                if leader_of(&view) != Some(&me) {
                    continue;
                }
                match write_as_leader(&mut client, &view.fence()?, &me).await {
                    Ok(()) => println!("WROTE {me} generation={}", view.generation),
                    // Our view is stale: we may no longer lead. The next view tells.
                    Err(e) if e.is_fenced() => println!("FENCED {me}: {e}"),
                    Err(e) if client.is_closed() => {
                        eprintln!("{me}: the work connection broke ({e}); reconnecting");
                        client = shardlease::connect_client(&pg, "leader_election").await?;
                    }
                    Err(e) => eprintln!("{me}: write failed: {e}"),
                }
            }
        }
    }
    member.leave().await?;
    println!("LEFT {me}");
    Ok(())
}

/// The leader of a view: the member in the lowest live slot (`members` is sorted by slot).
/// A member that is not joined (lost its lease, rejoining) never considers itself leader.
fn leader_of(view: &View) -> Option<&str> {
    if !view.is_joined() {
        return None;
    }
    view.members.first().map(|m| m.member_id.as_str())
}

fn print_role(me: &str, view: &View) {
    let (generation, members) = (view.generation, view.members.len());
    match leader_of(view) {
        Some(leader) if leader == me => {
            println!("LEADER {me} generation={generation} members={members}")
        }
        Some(leader) => {
            println!("FOLLOWER {me} (leader: {leader}) generation={generation} members={members}")
        }
        None => match &view.state {
            MemberState::Lost { reason } => println!("LOST {me}: {reason}"),
            other => println!("LOST {me}: {other:?}"),
        },
    }
}

/// One fenced transaction: it commits only if `fence`'s generation is still current and our
/// lease is live, so a deposed leader's write is refused with `Error::Fenced`.
async fn write_as_leader(client: &mut Client, fence: &Fence, me: &str) -> shardlease::Result<()> {
    let tx = fence.begin(client).await?;
    tx.execute(
        "INSERT INTO leader_log (generation, leader) VALUES ($1, $2)",
        &[&(fence.generation() as i64), &me],
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
