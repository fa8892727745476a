//! `demo`: one command that shows the redistribution. Three workers run in-process on 12
//! items; one leaves, one joins, and each step prints who watches what.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use shardlease::tokio_postgres::Client;
use shardlease::DbConfig;
use shardlease::MemberConfig;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::items::Items;
use crate::worker::{self, WorkerConfig};

const TABLE: &str = "public.shardlease_demo_items";
const GROUP: &str = "shardlease-demo";
const ITEMS: i64 = 12;

struct Running {
    name: String,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<Result<()>>,
}

/// Run the demo against `pg`, with an already migrated `client`.
pub async fn run(pg: &DbConfig, client: &Client, tick: Duration) -> Result<()> {
    println!(
        "Demo table {TABLE} (recreated), group {GROUP}, {ITEMS} items, tick {}.",
        humantime::format_duration(tick)
    );
    client
        .batch_execute(&format!(
            "DROP TABLE IF EXISTS {TABLE}; \
             CREATE TABLE {TABLE} (LIKE public.work_items INCLUDING ALL); \
             INSERT INTO {TABLE} (value) SELECT 0 FROM generate_series(1, {ITEMS});"
        ))
        .await?;
    let ids: Vec<Uuid> = client
        .query(&format!("SELECT id FROM {TABLE} ORDER BY id"), &[])
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let labels: BTreeMap<Uuid, String> = ids
        .iter()
        .enumerate()
        .map(|(i, id)| (*id, format!("item{:02}", i + 1)))
        .collect();

    let start = |name: &str| {
        let stop = CancellationToken::new();
        let cfg = WorkerConfig {
            pg: pg.clone(),
            work_pg: pg.clone(),
            member: MemberConfig::new(GROUP, name),
            tick,
            items: Items::named(TABLE),
            print: None,
        };
        let task = tokio::spawn(worker::run(cfg, stop.clone(), Default::default()));
        Running {
            name: name.to_owned(),
            stop,
            task,
        }
    };
    let mut workers: Vec<Running> = ["worker-1", "worker-2", "worker-3"]
        .iter()
        .map(|n| start(n))
        .collect();
    let mut before = settle(client, &workers, tick).await?;
    show("Step 1: three workers joined", &before, &before, &labels);

    let leaving = workers.remove(1);
    leaving.stop.cancel();
    leaving.task.await??;
    let after = settle(client, &workers, tick).await?;
    show(
        &format!("Step 2: {} left (SIGTERM-style leave)", leaving.name),
        &before,
        &after,
        &labels,
    );
    before = after;

    workers.push(start("worker-4"));
    let after = settle(client, &workers, tick).await?;
    show(
        "Step 3: worker-4 joined (it refills the vacated slot)",
        &before,
        &after,
        &labels,
    );

    for w in workers {
        w.stop.cancel();
        w.task.await??;
    }
    println!("\nAll workers left. Only the departed worker's items moved at step 2, only items moving onto the joiner at step 3.");
    println!("Inspect: psql -c \"SELECT * FROM {TABLE} ORDER BY currentWorker\"");
    Ok(())
}

/// Wait until every item was ticked by one of `workers` since this call, and return who has what.
async fn settle(
    client: &Client,
    workers: &[Running],
    tick: Duration,
) -> Result<BTreeMap<String, Vec<Uuid>>> {
    let names: Vec<&str> = workers.iter().map(|w| w.name.as_str()).collect();
    let since = Instant::now();
    let deadline = since + Duration::from_secs(30) + tick * 4;
    let marker: std::time::SystemTime = client.query_one("SELECT now()", &[]).await?.get(0);
    loop {
        let rows = client
            .query(
                &format!("SELECT id, currentworker, updated_at >= $1 FROM {TABLE}"),
                &[&marker],
            )
            .await?;
        let fresh = rows.iter().all(|r| {
            r.get::<_, Option<bool>>(2) == Some(true)
                && r.get::<_, Option<&str>>(1)
                    .is_some_and(|w| names.contains(&w))
        });
        if fresh {
            let mut by: BTreeMap<String, Vec<Uuid>> = BTreeMap::new();
            for r in &rows {
                by.entry(r.get::<_, String>(1)).or_default().push(r.get(0));
            }
            return Ok(by);
        }
        if Instant::now() > deadline {
            bail!(
                "the demo workers did not take over every item within {:?}",
                deadline - since
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn show(
    title: &str,
    before: &BTreeMap<String, Vec<Uuid>>,
    after: &BTreeMap<String, Vec<Uuid>>,
    labels: &BTreeMap<Uuid, String>,
) {
    println!("\n{title}:");
    let owner_before: BTreeMap<&Uuid, &str> = before
        .iter()
        .flat_map(|(w, ids)| ids.iter().map(move |id| (id, w.as_str())))
        .collect();
    let mut moved = 0;
    for (worker, ids) in after {
        let mut names: Vec<String> = Vec::new();
        let mut sorted = ids.clone();
        sorted.sort_by_key(|id| labels[id].clone());
        for id in &sorted {
            match owner_before.get(id) {
                Some(prev) if *prev != worker => {
                    moved += 1;
                    names.push(format!("{} (from {prev})", labels[id]));
                }
                _ => names.push(labels[id].clone()),
            }
        }
        println!(
            "  {worker:<9} watches {:>2}: {}",
            ids.len(),
            names.join(", ")
        );
    }
    if before != after {
        println!("  moved: {moved} of {ITEMS} items");
    }
}
