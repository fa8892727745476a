//! Tick throughput, ours against the floor, on the same rows of the same machine in one run:
//!
//! - `raw_update`: a plain batched `UPDATE ... WHERE shard = ANY($1) RETURNING id` (the floor);
//! - `fenced_tick`: the worker's tick (fence check + the same batched update, with the cadence
//!   guard), through `Items::tick`.
//!
//! Each for one worker's quarter of 100k items, and for 4 workers at once (4 connections, the
//! whole table). Criterion reports elements (item increments) per second.
//!
//! `cargo bench -p shardlease-worker --bench tick` (DATABASE_URL as for the tests; a fresh
//! database is created and dropped).

use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use futures_util::future::join_all;
use shardlease::hash::SHARDS;
use shardlease::tokio_postgres::Client;
use shardlease::{Member, MemberConfig};
use shardlease_worker::items::Items;

const ITEMS: u64 = 100_000;
const WORKERS: usize = 4;

struct Setup {
    db: shardlease_testkit::TestDb,
    members: Vec<Member>,
    clients: Vec<Client>,
    shards: Vec<Vec<i32>>,
    rows: Vec<u64>,
}

async fn setup() -> Setup {
    let db = shardlease_testkit::TestDb::empty().await;
    let (pg, mut client) = shardlease_worker::db::connect(&db.url, "bench")
        .await
        .unwrap();
    shardlease_worker::db::migrate(&mut client).await.unwrap();
    Items::work_items()
        .seed(&client, ITEMS, |_| {})
        .await
        .unwrap();
    client
        .batch_execute("VACUUM ANALYZE public.work_items")
        .await
        .unwrap();
    let mut members = Vec::new();
    for i in 0..WORKERS {
        members.push(
            Member::join(&pg, MemberConfig::new("bench", format!("w{i}")))
                .await
                .unwrap(),
        );
    }
    let view = members[0]
        .wait_for(Duration::from_secs(10), |v| v.members.len() == WORKERS)
        .await
        .expect("4 members");
    let assignment = view.assignment();
    let mut shards = Vec::new();
    let mut rows = Vec::new();
    for m in &members {
        let slot = m.view().my_slot().unwrap();
        let mine: Vec<i32> = assignment
            .shards_of(slot, SHARDS)
            .into_iter()
            .map(|s| s as i32)
            .collect();
        let n: i64 = client
            .query_one(
                "SELECT count(*) FROM public.work_items WHERE shard = ANY($1)",
                &[&mine],
            )
            .await
            .unwrap()
            .get(0);
        shards.push(mine);
        rows.push(n as u64);
    }
    let mut clients = Vec::new();
    for i in 0..WORKERS {
        clients.push(
            shardlease::connect_client(&pg, &format!("bench-work-{i}"))
                .await
                .unwrap(),
        );
    }
    eprintln!(
        "bench database {}: {ITEMS} items, {WORKERS} members, rows per member {rows:?}",
        db.name
    );
    Setup {
        db,
        members,
        clients,
        shards,
        rows,
    }
}

const RAW: &str =
    "UPDATE public.work_items SET value = value + 1, currentworker = $1, updated_at = now() \
                   WHERE shard = ANY($2) RETURNING id";

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let setup = rt.block_on(setup());
    let setup = tokio::sync::Mutex::new(setup);
    let items = Items::work_items();
    // Every measured function starts from the same table: without this, the later functions
    // would pay for the dead row versions the earlier ones left behind.
    let vacuum = || {
        rt.block_on(async {
            let s = setup.lock().await;
            s.clients[0]
                .batch_execute("VACUUM public.work_items")
                .await
                .expect("vacuum");
        })
    };

    let mut one = c.benchmark_group("one worker, 25k of 100k items");
    one.sample_size(20).measurement_time(Duration::from_secs(8));
    let rows0 = setup.blocking_lock().rows[0];
    one.throughput(Throughput::Elements(rows0));
    vacuum();
    one.bench_function("raw_update", |b| {
        b.to_async(&rt).iter(|| async {
            let mut s = setup.lock().await;
            let Setup {
                clients, shards, ..
            } = &mut *s;
            let rows = clients[0].query(RAW, &[&"raw", &shards[0]]).await.unwrap();
            assert_eq!(rows.len() as u64, rows0);
        })
    });
    vacuum();
    one.bench_function("fenced_tick", |b| {
        b.to_async(&rt).iter(|| async {
            let mut s = setup.lock().await;
            let Setup {
                members,
                clients,
                shards,
                ..
            } = &mut *s;
            let fence = members[0].view().fence().unwrap();
            let r = items
                .tick(&mut clients[0], &fence, "w0", &shards[0], Duration::ZERO)
                .await
                .unwrap();
            assert_eq!(r.incremented as u64, rows0);
        })
    });
    one.finish();

    let mut all = c.benchmark_group("4 workers at once, 100k items");
    all.sample_size(10)
        .measurement_time(Duration::from_secs(10));
    all.throughput(Throughput::Elements(ITEMS));
    vacuum();
    all.bench_function("raw_update", |b| {
        b.to_async(&rt).iter(|| async {
            let mut s = setup.lock().await;
            let Setup {
                clients, shards, ..
            } = &mut *s;
            let updates = clients
                .iter_mut()
                .zip(shards.iter())
                .map(|(client, mine)| async move {
                    client.query(RAW, &[&"raw", mine]).await.unwrap().len()
                });
            let n: usize = join_all(updates).await.into_iter().sum();
            assert_eq!(n as u64, ITEMS);
        })
    });
    vacuum();
    all.bench_function("fenced_tick", |b| {
        b.to_async(&rt).iter(|| async {
            let mut s = setup.lock().await;
            let Setup {
                members,
                clients,
                shards,
                ..
            } = &mut *s;
            let ticks = clients
                .iter_mut()
                .zip(shards.iter())
                .zip(members.iter())
                .map(|((client, mine), member)| {
                    let items = &items;
                    async move {
                        let fence = member.view().fence().unwrap();
                        let id = member.member_id().to_owned();
                        items
                            .tick(client, &fence, &id, mine, Duration::ZERO)
                            .await
                            .unwrap()
                            .incremented
                    }
                });
            let n: usize = join_all(ticks).await.into_iter().sum();
            assert_eq!(n as u64, ITEMS);
        })
    });
    all.finish();

    let s = setup.into_inner();
    rt.block_on(async move {
        for m in s.members {
            let _ = m.leave().await;
        }
        drop(s.clients);
    });
    drop(s.db); // drops the database
}

criterion_group!(benches, bench);
criterion_main!(benches);
