//! `demo`: one command that shows the redistribution. Three workers run in-process on 60
//! items; one leaves, one joins, and each step prints who watches which items, what moved,
//! and the balance.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use shardlease::tokio_postgres::Client;
use shardlease::DbConfig;
use shardlease::MemberConfig;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::items::Items;
use crate::printer::{demo_step, Owners};
use crate::worker::{self, WorkerConfig};

const TABLE: &str = "public.shardlease_demo_items";
const GROUP: &str = "shardlease-demo";
/// Enough items for the balance to show (about 20 per worker), few enough to print them all.
pub const ITEMS: usize = 60;

/// The demo was interrupted (SIGINT or SIGTERM); its workers left first.
#[derive(Debug)]
pub struct Interrupted;

impl fmt::Display for Interrupted {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("interrupted: the demo's workers left the group")
    }
}

impl std::error::Error for Interrupted {}

struct Running {
    name: String,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<Result<()>>,
}

/// The demo's workers.
struct Fleet {
    pg: DbConfig,
    tick: Duration,
    workers: Vec<Running>,
}

impl Fleet {
    fn start(&mut self, name: &str) {
        let stop = CancellationToken::new();
        let cfg = WorkerConfig {
            pg: self.pg.clone(),
            work_pg: self.pg.clone(),
            member: MemberConfig::new(GROUP, name),
            tick: self.tick,
            items: Items::named(TABLE),
            print: None,
        };
        let task = tokio::spawn(worker::run(cfg, stop.clone(), worker::readiness().0));
        self.workers.push(Running {
            name: name.to_owned(),
            stop,
            task,
        });
    }

    /// Stop worker `name` (a SIGTERM-style leave) and wait for it.
    async fn stop(&mut self, name: &str) -> Result<()> {
        let Some(at) = self.workers.iter().position(|w| w.name == name) else {
            bail!("no demo worker {name}");
        };
        let w = self.workers.remove(at);
        w.stop.cancel();
        w.task.await?
    }

    /// Stop every worker and wait for them.
    async fn stop_all(&mut self) -> Result<()> {
        for w in &self.workers {
            w.stop.cancel();
        }
        let mut first_error = Ok(());
        for w in self.workers.drain(..) {
            let r = w.task.await.map_err(anyhow::Error::from).and_then(|r| r);
            if first_error.is_ok() {
                first_error = r;
            }
        }
        first_error
    }

    fn names(&self) -> Vec<&str> {
        self.workers.iter().map(|w| w.name.as_str()).collect()
    }
}

/// Run the demo against `pg`, with an already migrated `client`, until done or until
/// `interrupted` (then the workers leave and [`Interrupted`] is returned). `inspect` prints
/// how to look at the table afterwards (not when the database goes away with the demo).
pub async fn run(
    pg: &DbConfig,
    client: &Client,
    tick: Duration,
    interrupted: &CancellationToken,
    inspect: bool,
) -> Result<()> {
    if interrupted.is_cancelled() {
        return Err(Interrupted.into());
    }
    println!(
        "Demo: table {TABLE} (recreated) with {ITEMS} items, group {GROUP}, tick {}. \
         Items are numbered 01-{ITEMS}; + marks those that moved onto a worker.",
        humantime::format_duration(tick)
    );
    client
        .batch_execute(&format!(
            "DROP TABLE IF EXISTS {TABLE}; \
             CREATE TABLE {TABLE} (LIKE public.work_items INCLUDING ALL); \
             SELECT shardlease.add_key_hash('{TABLE}', 'id', 'key_hash'); \
             INSERT INTO {TABLE} (value) SELECT 0 FROM generate_series(1, {ITEMS});"
        ))
        .await?;
    let ids: Vec<Uuid> = client
        .query(&format!("SELECT id FROM {TABLE} ORDER BY id"), &[])
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let numbers: BTreeMap<Uuid, usize> =
        ids.iter().enumerate().map(|(i, id)| (*id, i + 1)).collect();

    let mut fleet = Fleet {
        pg: pg.clone(),
        tick,
        workers: Vec::new(),
    };
    let story = steps(&mut fleet, client, &numbers, interrupted).await;
    // Whatever happened, the workers leave before the demo returns.
    let stopped = fleet.stop_all().await;
    let [joined, after_leave, rejoined] = story?;
    stopped?;

    println!("{}", summary(&joined, &after_leave, &rejoined));
    if inspect {
        println!("Inspect: psql -c \"SELECT * FROM {TABLE} ORDER BY currentworker\"");
    }
    Ok(())
}

/// The three steps; returns who had what after each.
async fn steps(
    fleet: &mut Fleet,
    client: &Client,
    numbers: &BTreeMap<Uuid, usize>,
    interrupted: &CancellationToken,
) -> Result<[Owners; 3]> {
    for name in ["worker-1", "worker-2", "worker-3"] {
        fleet.start(name);
    }
    let joined = settle(client, fleet, numbers, interrupted).await?;
    println!(
        "\n{}",
        demo_step("Step 1: three workers joined", &Owners::new(), &joined)
    );

    fleet.stop("worker-2").await?;
    let after_leave = settle(client, fleet, numbers, interrupted).await?;
    println!(
        "{}",
        demo_step(
            "Step 2: worker-2 left (SIGTERM-style leave)",
            &joined,
            &after_leave
        )
    );

    fleet.start("worker-4");
    let rejoined = settle(client, fleet, numbers, interrupted).await?;
    println!(
        "{}",
        demo_step("Step 3: worker-4 joined", &after_leave, &rejoined)
    );
    Ok([joined, after_leave, rejoined])
}

/// The items whose owner changed: (item, from, to).
fn moves<'a>(before: &'a Owners, after: &'a Owners) -> Vec<(usize, &'a str, &'a str)> {
    let owner: BTreeMap<usize, &str> = before
        .iter()
        .flat_map(|(w, items)| items.iter().map(move |i| (*i, w.as_str())))
        .collect();
    after
        .iter()
        .flat_map(|(w, items)| items.iter().map(move |i| (*i, w.as_str())))
        .filter_map(|(i, to)| {
            owner
                .get(&i)
                .filter(|from| **from != to)
                .map(|from| (i, *from, to))
        })
        .collect()
}

/// What the three steps showed, checked from the tables (not assumed).
fn summary(joined: &Owners, after_leave: &Owners, rejoined: &Owners) -> String {
    let leave = moves(joined, after_leave);
    let join = moves(after_leave, rejoined);
    let leaver = joined.get("worker-2").map_or(0, BTreeSet::len);
    let mut out = String::from("All workers left. ");
    if leave.iter().all(|(_, from, _)| *from == "worker-2") && leave.len() == leaver {
        out += &format!("Step 2 moved only worker-2's {leaver} items");
    } else {
        let between = leave
            .iter()
            .filter(|(_, from, _)| *from != "worker-2")
            .count();
        out += &format!(
            "Step 2 moved {} items, {between} of them between workers that stayed",
            leave.len()
        );
    }
    if join.iter().all(|(_, _, to)| *to == "worker-4") {
        out += &format!("; step 3 moved items only onto worker-4 ({})", join.len());
    } else {
        out += &format!(
            "; step 3 moved {} items, not only onto worker-4",
            join.len()
        );
    }
    if joined.get("worker-2").is_some() && joined.get("worker-2") == rejoined.get("worker-4") {
        out += ", which got exactly worker-2's items back: it refilled the vacated slot.";
    } else {
        out += ".";
    }
    out
}

/// Wait until the group's live members are exactly the fleet's workers and every item was
/// ticked since then, and return who has which items.
///
/// A tick stamps `updated_at` with its transaction's start and commits only if the group's
/// generation is still the one it began under (the fence), so once the membership is the
/// fleet at generation `g`, every tick that started later and committed ran under `g`: its
/// worker owns the item in the settled assignment. Were only "ticked since we began
/// waiting" asked, a worker that joined first and ticked everything before the others
/// joined would show as the owner of their items.
///
/// Polls the tables every 100 ms (ticks leave no other trace); gives up after 30 s and four
/// ticks, or when `interrupted`.
async fn settle(
    client: &Client,
    fleet: &Fleet,
    numbers: &BTreeMap<Uuid, usize>,
    interrupted: &CancellationToken,
) -> Result<Owners> {
    let mut names: Vec<&str> = fleet.names();
    names.sort_unstable();
    let since = Instant::now();
    let deadline = since + Duration::from_secs(30) + fleet.tick * 4;
    let mut settled: Option<(i64, std::time::SystemTime)> = None;
    loop {
        let (generation, members, now) = membership(client).await?;
        match settled {
            Some((g, _)) if g != generation || members != names => settled = None,
            None if members == names => settled = Some((generation, now)),
            _ => {}
        }
        if let Some((at_generation, marker)) = settled {
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
            // The generation must not have moved while the rows were read.
            if fresh && membership(client).await?.0 == at_generation {
                let mut by: Owners = BTreeMap::new();
                for r in &rows {
                    by.entry(r.get::<_, String>(1))
                        .or_default()
                        .insert(numbers[&r.get::<_, Uuid>(0)]);
                }
                return Ok(by);
            }
        }
        if Instant::now() > deadline {
            bail!(
                "the demo workers ({}) did not settle within {:?}: the group's live members are \
                 [{}]{}",
                names.join(", "),
                deadline - since,
                members.join(", "),
                if settled.is_some() {
                    ", and not every item was ticked since"
                } else {
                    ""
                }
            );
        }
        tokio::select! {
            _ = interrupted.cancelled() => return Err(Interrupted.into()),
            _ = tokio::time::sleep(Duration::from_millis(100)) => {}
        }
    }
}

/// The group's generation, its live members (sorted) and the database's clock.
async fn membership(client: &Client) -> Result<(i64, Vec<String>, std::time::SystemTime)> {
    let row = client
        .query_one(
            "SELECT (SELECT generation FROM shardlease.groups WHERE name = $1), \
                    ARRAY(SELECT member_id::text FROM shardlease.members \
                          WHERE group_name = $1 AND alive ORDER BY member_id), \
                    now()",
            &[&GROUP],
        )
        .await?;
    Ok((
        row.get::<_, Option<i64>>(0).unwrap_or(0),
        row.get(1),
        row.get(2),
    ))
}
