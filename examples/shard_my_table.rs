//! Sharding your own table with shardlease.
//!
//! `orders` is an ordinary table (it may already exist, large and in use). It gets a stored
//! 32-bit hash of its id, `key_hash`, without a rewrite: `shardlease::live_table` adds a
//! nullable column and a trigger, backfills the old rows in small transactions, builds the
//! index `CONCURRENTLY` and validates (`shardlease.uuid_hash(id)` is the SQL twin of
//! `shardlease::hash::uuid_hash`). Every process joins the group `orders`, and every second
//! (and at once when the membership changes) it processes the unprocessed rows of the hash
//! ranges it owns (the balanced shard table of the view: every member owns the same number of
//! the 65,536 hash shards, to one), in ONE fenced transaction with one batched UPDATE. If the
//! view it computed its ranges from is stale, the transaction is refused with `Error::Fenced`
//! and nothing commits; the process waits for the next view and retries. So no row is ever
//! processed by two members, even while members come and go.
//!
//! ```text
//! cargo run -p shardlease --example shard_my_table -- --member a --seed 1000   # in two or
//! cargo run -p shardlease --example shard_my_table -- --member b               # more terminals
//! psql -c 'SELECT processed_by, count(*) FROM orders GROUP BY 1'
//! ```
//!
//! Output: `JOINED <me> slot=<s>`, then
//! `VIEW <me> generation=<g> slot=<s> slot_count=<S> live=<slots> shards=<n> ranges=<r>` per
//! view change,
//! `PROCESSED <me> rows=<n> generation=<g> [ids…]`, `FENCED <me>: <why>`, `DONE <me>`, `LEFT <me>`.

use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use shardlease::live_table::KeyHashColumn;
use shardlease::migrate::MigrateOptions;
use shardlease::shard_table::{HashRanges, HASH_SHARDS};
use shardlease::tokio_postgres::Client;
use shardlease::{Member, MemberConfig, View};
use tokio::signal::unix::{signal, SignalKind};
use uuid::Uuid;

#[derive(Parser)]
#[command(about = "Process your own table's rows, split between processes with fenced writes")]
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
    /// The group to join.
    #[arg(long, default_value = "orders")]
    group: String,
    /// Insert this many unprocessed orders if the table is empty.
    #[arg(long, default_value_t = 1000)]
    seed: u32,
    /// Process nothing before the group has had this many members (once, at the start).
    #[arg(long, default_value_t = 1)]
    min_members: usize,
    /// Leave and exit 0 once no unprocessed row remains.
    #[arg(long)]
    exit_when_done: bool,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    // Install the handlers first, so that a signal sent while we start up is not fatal.
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut sigint = signal(SignalKind::interrupt())?;
    let me = args.member.clone().unwrap_or_else(default_member_id);

    let pg: shardlease::DbConfig = args.database_url.parse()?;
    let mut client = pg.connect("shard_my_table").await?;
    shardlease::migrate(&mut client).await?; // creates shardlease.uuid_hash, add_key_hash, ...
    setup(&mut client, args.seed).await?;

    let member = Member::join(&pg, MemberConfig::new(&args.group, &me)).await?;
    let mut views = member.watch();
    let mut view = views.borrow_and_update().clone();
    let slot = view.my_slot().context("joined, so the view has our slot")?;
    println!("JOINED {me} slot={slot}");
    print_view(&me, &view)?;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut started = false;

    loop {
        tokio::select! {
            _ = sigterm.recv() => break,
            _ = sigint.recv() => break,
            changed = views.changed() => {
                if changed.is_err() {
                    anyhow::bail!("the member stopped");
                }
                view = views.borrow_and_update().clone();
                print_view(&me, &view)?;
                // Fall through: take over new shards now, not at the next tick.
            }
            _ = tick.tick() => view = views.borrow().clone(),
        }
        // Wait for --min-members once, at the start; afterwards members may come and go.
        started = started || view.members.len() >= args.min_members;
        if !started || !view.is_joined() {
            continue;
        }
        let ranges = my_ranges(&view)?;
        match process_my_shards(&mut client, &view, &ranges, &me).await {
            Ok(ids) if ids.is_empty() => {}
            Ok(ids) => {
                let sample: Vec<String> = ids.iter().take(3).map(Uuid::to_string).collect();
                println!(
                    "PROCESSED {me} rows={} generation={} [{}{}]",
                    ids.len(),
                    view.generation,
                    sample.join(", "),
                    if ids.len() > 3 { ", …" } else { "" }
                );
            }
            // The view moved on (or we lost our lease): nothing was written. The select above
            // waits for the next view, processes under it at once, and so retries.
            Err(e) if e.is_fenced() => {
                println!("FENCED {me}: {e}");
                continue;
            }
            Err(e) if client.is_closed() => {
                eprintln!("{me}: the work connection broke ({e}); reconnecting");
                client = pg.connect("shard_my_table").await?;
                continue;
            }
            Err(e) => return Err(e.into()),
        }
        if args.exit_when_done && nothing_left(&client).await? {
            println!("DONE {me}");
            break;
        }
    }
    member.leave().await?;
    println!("LEFT {me}");
    Ok(())
}

/// Create the table if it is missing and seed it if it is empty (the transaction-level
/// advisory lock serialises concurrent starters, so that only one of them seeds), then put it
/// on its stored hash: on an existing, large, busy table the same call works online (brief
/// locks with a bounded `lock_timeout`, a backfill in small transactions, `CREATE INDEX
/// CONCURRENTLY`), and concurrent callers take turns.
async fn setup(client: &mut Client, seed: u32) -> anyhow::Result<()> {
    let tx = client.transaction().await?;
    tx.batch_execute(
        "SELECT pg_advisory_xact_lock(hashtext('orders setup'));
         CREATE TABLE IF NOT EXISTS orders (
             id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
             processed_by text,
             processed_at timestamptz);",
    )
    .await
    .context("creating orders")?;
    let seeded = tx
        .execute(
            "INSERT INTO orders (processed_by) SELECT NULL FROM generate_series(1, $1::bigint)
             WHERE NOT EXISTS (SELECT 1 FROM orders)",
            &[&i64::from(seed)],
        )
        .await?;
    tx.commit().await?;
    if seeded > 0 {
        println!("SEEDED {seeded} orders");
    }
    let report = KeyHashColumn::new("orders", "id")
        .prepare(client, &MigrateOptions::default())
        .await
        .context("adding orders.key_hash")?;
    if !report.steps.is_empty() {
        println!(
            "KEY_HASH steps={} backfilled={}",
            report.steps.join(","),
            report.backfilled_rows
        );
    }
    Ok(())
}

/// The hash ranges `view` gives this member (empty when it is not joined).
fn my_ranges(view: &View) -> anyhow::Result<HashRanges> {
    Ok(match view.my_slot() {
        Some(slot) => view
            .assignment()
            .shard_table(HASH_SHARDS)?
            .hash_ranges(slot),
        None => HashRanges::default(),
    })
}

/// One fenced transaction: claim every unprocessed row of `ranges`, the hash ranges that
/// `view` gives us.
async fn process_my_shards(
    client: &mut Client,
    view: &View,
    ranges: &HashRanges,
    me: &str,
) -> shardlease::Result<Vec<Uuid>> {
    let fence = view.fence()?; // Err(Fenced) when not joined
    let tx = fence.begin(client).await?; // Err(Fenced) when the view is stale
    let rows = tx
        .query(
            "UPDATE orders o SET processed_by = $1, processed_at = now()
               FROM unnest($2::int4[], $3::int4[]) AS r(lo, hi)
              WHERE o.key_hash BETWEEN r.lo AND r.hi AND o.processed_by IS NULL
             RETURNING o.id",
            &[&me, &ranges.lower_bounds(), &ranges.upper_bounds()],
        )
        .await?;
    tx.commit().await?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}

async fn nothing_left(client: &Client) -> anyhow::Result<bool> {
    let row = client
        .query_one(
            "SELECT NOT EXISTS (SELECT 1 FROM orders WHERE processed_by IS NULL)",
            &[],
        )
        .await?;
    Ok(row.get(0))
}

fn print_view(me: &str, view: &View) -> anyhow::Result<()> {
    let assignment = view.assignment();
    let live: Vec<String> = assignment.live_slots().map(|s| s.to_string()).collect();
    let table = assignment.shard_table(HASH_SHARDS)?;
    let shards = view.my_slot().map_or(0, |s| table.shards_of(s).len());
    println!(
        "VIEW {me} generation={} slot={} slot_count={} live={} shards={shards} ranges={}",
        view.generation,
        view.my_slot().map_or("-".into(), |s| s.to_string()),
        view.slot_count,
        live.join(","),
        my_ranges(view)?.len(),
    );
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
