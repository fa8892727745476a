//! Tick throughput, ours against the floor, on the same rows of the same machine in one run:
//!
//! - `raw_update`: a plain batched `UPDATE ... FROM unnest($lo, $hi) WHERE key_hash BETWEEN lo
//!   AND hi RETURNING id` over the member's hash ranges (the floor);
//! - `raw_update_1024_shards`: the floor of the layout before (`WHERE shard = ANY($1)` over the
//!   member's jump-hashed shards of 1,024; other rows, about as many), for comparison;
//! - `fenced_tick`: the worker's tick (the begin check, the batched range update with the
//!   cadence guard, and the commit check, in one statement: `shardlease_worker.tick`), through
//!   `Items::tick`;
//! - `fenced_tick_1024_shards`: the tick of the build before, verbatim, on its own rows.
//!
//! Each for one worker's quarter of 100k items, and for 4 workers at once (4 connections, the
//! whole table); then the tick of one member's share at 1 and at 1,000 members (the whole
//! table, and the ~100 items of slot 500 of 1,000), with their plans printed first.
//! Criterion reports elements (item increments) per second.
//!
//! `cargo bench -p shardlease-worker --bench tick` (DATABASE_URL as for the tests; a fresh
//! database is created and dropped).

use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use futures_util::future::join_all;
use shardlease::hash::SHARDS;
use shardlease::shard_table::{HashRanges, HASH_SHARDS};
use shardlease::tokio_postgres::Client;
use shardlease::{Assignment, Member, MemberConfig};
use shardlease_worker::items::Items;

const ITEMS: u64 = 100_000;
const WORKERS: usize = 4;

struct Setup {
    db: shardlease_testkit::TestDb,
    members: Vec<Member>,
    clients: Vec<Client>,
    ranges: Vec<HashRanges>,
    rows: Vec<u64>,
    legacy: Vec<Vec<i32>>,
    legacy_rows: Vec<u64>,
    /// One member's share at 1 and at 1,000 members.
    shares: Vec<Share>,
}

/// One member's share of a group of some size, in both layouts.
#[derive(Clone)]
struct Share {
    name: &'static str,
    ranges: HashRanges,
    rows: u64,
    /// The same member's shards of 1,024 (protocol 1) in a group of that size.
    legacy: Vec<i32>,
}

async fn count(client: &Client, ranges: &HashRanges) -> u64 {
    let n: i64 = client
        .query_one(
            "SELECT count(*) FROM public.work_items w JOIN unnest($1::int4[], $2::int4[]) AS r(lo, hi) \
             ON w.key_hash BETWEEN r.lo AND r.hi",
            &[&ranges.lower_bounds(), &ranges.upper_bounds()],
        )
        .await
        .unwrap()
        .get(0);
    n as u64
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
    let table = assignment.shard_table(HASH_SHARDS).unwrap();
    let (mut ranges, mut rows, mut legacy, mut legacy_rows) = (vec![], vec![], vec![], vec![]);
    for m in &members {
        let slot = m.view().my_slot().unwrap();
        let mine = table.hash_ranges(slot);
        rows.push(count(&client, &mine).await);
        ranges.push(mine);
        let old: Vec<i32> = assignment
            .shards_of(slot, SHARDS)
            .into_iter()
            .map(|s| s as i32)
            .collect();
        let n: i64 = client
            .query_one(
                "SELECT count(*) FROM public.work_items WHERE shard = ANY($1)",
                &[&old],
            )
            .await
            .unwrap()
            .get(0);
        legacy.push(old);
        legacy_rows.push(n as u64);
    }
    let mut shares = Vec::new();
    for (name, w, slot) in [("1 member", 1, 0), ("slot 500 of 1,000 members", 1000, 500)] {
        let view = Assignment::new(w, 0..w).unwrap();
        let share = view.shard_table(HASH_SHARDS).unwrap().hash_ranges(slot);
        let legacy: Vec<i32> = view
            .shards_of(slot, SHARDS)
            .into_iter()
            .map(|s| s as i32)
            .collect();
        let n = count(&client, &share).await;
        let plan: Vec<String> = client
            .query(
                &format!("EXPLAIN (ANALYZE, COSTS OFF, TIMING OFF, SUMMARY ON) {RAW}"),
                &[&"plan", &share.lower_bounds(), &share.upper_bounds()],
            )
            .await
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect();
        eprintln!(
            "plan of the tick's update, {name} ({} ranges, {n} rows):\n  {}",
            share.len(),
            plan.join("\n  ")
        );
        shares.push(Share {
            name,
            ranges: share,
            rows: n,
            legacy,
        });
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
        "bench database {}: {ITEMS} items, {WORKERS} members, rows per member {rows:?} \
         (1,024-shard layout: {legacy_rows:?}), hash ranges per member {:?}",
        db.name,
        ranges.iter().map(HashRanges::len).collect::<Vec<_>>()
    );
    Setup {
        db,
        members,
        clients,
        ranges,
        rows,
        legacy,
        legacy_rows,
        shares,
    }
}

const RAW: &str = "UPDATE public.work_items AS w \
     SET value = w.value + 1, currentworker = $1, updated_at = now() \
     FROM unnest($2::int4[], $3::int4[]) AS r(lo, hi) \
     WHERE w.key_hash BETWEEN r.lo AND r.hi RETURNING w.id";

/// The tick of the build before (protocol 1, 1,024 shards), verbatim, to measure it side by
/// side with the current one on the same machine in the same run.
async fn legacy_tick(
    client: &mut Client,
    fence: &shardlease::Fence,
    member: &str,
    shards: &[i32],
) -> usize {
    use shardlease::tokio_postgres::types::Type;
    let tx = fence.begin(client).await.unwrap();
    let gap_ms = 0.0f64;
    let due = "(updated_at IS NULL OR updated_at <= now() - $3::float8 * interval '1 millisecond')";
    let sql = format!(
        "UPDATE public.work_items SET \
           value = CASE WHEN {due} THEN value + 1 ELSE value END, \
           currentworker = CASE WHEN {due} THEN $1 ELSE currentworker END, \
           updated_at = CASE WHEN {due} THEN now() ELSE updated_at END \
         WHERE shard = ANY($2) \
         RETURNING id, updated_at = now()"
    );
    let rows = tx
        .query_typed(
            &sql,
            &[
                (&member, Type::VARCHAR),
                (&shards, Type::INT4_ARRAY),
                (&gap_ms, Type::FLOAT8),
            ],
        )
        .await
        .unwrap();
    tx.commit().await.unwrap();
    rows.iter().filter(|r| r.get::<_, bool>(1)).count()
}

const RAW_1024: &str =
    "UPDATE public.work_items SET value = value + 1, currentworker = $1, updated_at = now() \
                   WHERE shard = ANY($2) RETURNING id";

/// One interleaved measurement: the tick (`fenced`) or the floor (`raw`) of the hash-range
/// layout (`ranges`) or of the 1,024-shard layout, by `workers` members at once. Returns
/// (seconds, rows).
async fn run_variant(
    s: &mut Setup,
    items: &Items,
    fenced: bool,
    ranges: bool,
    targets: &[(HashRanges, Vec<i32>)],
) -> (f64, u64) {
    let Setup {
        members, clients, ..
    } = s;
    let started = std::time::Instant::now();
    let runs = clients.iter_mut().zip(members.iter()).zip(targets).map(
        |((client, member), (r, l))| async move {
            let fence = member.view().fence().unwrap();
            let id = member.member_id().to_owned();
            match (fenced, ranges) {
                (true, true) => {
                    items
                        .tick(client, &fence, &id, r, Duration::ZERO)
                        .await
                        .unwrap()
                        .incremented
                }
                (true, false) => legacy_tick(client, &fence, &id, l).await,
                (false, true) => client
                    .query(RAW, &[&"raw", &r.lower_bounds(), &r.upper_bounds()])
                    .await
                    .unwrap()
                    .len(),
                (false, false) => client.query(RAW_1024, &[&"raw", l]).await.unwrap().len(),
            }
        },
    );
    let rows: usize = join_all(runs).await.into_iter().sum();
    (started.elapsed().as_secs_f64(), rows as u64)
}

/// The tick and its floor, now and before, interleaved round by round (the order rotates, and
/// each round starts from a vacuumed table), so that the load of a shared machine weighs on
/// all four alike. Prints the medians.
async fn interleaved(
    setup: &tokio::sync::Mutex<Setup>,
    items: &Items,
    what: &str,
    targets: &[(HashRanges, Vec<i32>)],
    rounds: usize,
) {
    let names = [
        "raw, hash ranges",
        "raw, 1,024 shards",
        "fenced tick, hash ranges",
        "fenced tick, 1,024 shards (before)",
    ];
    let mut per_row: [Vec<f64>; 4] = Default::default();
    let mut rows = [0u64; 4];
    for round in 0..rounds {
        let mut s = setup.lock().await;
        s.clients[0]
            .batch_execute("VACUUM public.work_items")
            .await
            .unwrap();
        for k in 0..4 {
            let v = (k + round) % 4;
            let (secs, n) = run_variant(&mut s, items, v >= 2, v % 2 == 0, targets).await;
            per_row[v].push(secs / n as f64);
            rows[v] = n;
        }
    }
    eprintln!("interleaved, {what}, {rounds} rounds, median:");
    for (v, name) in names.iter().enumerate() {
        let mut t = per_row[v].clone();
        t.sort_by(f64::total_cmp);
        let median = t[t.len() / 2];
        eprintln!(
            "  {name:<36} {:>8.1} ms for {:>6} rows, {:>5.0}k increments/s",
            median * rows[v] as f64 * 1000.0,
            rows[v],
            1.0 / median / 1000.0
        );
    }
}

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

    let (four, shares): (Vec<(HashRanges, Vec<i32>)>, Vec<Share>) = {
        let s = setup.blocking_lock();
        (
            s.ranges
                .iter()
                .cloned()
                .zip(s.legacy.iter().cloned())
                .collect(),
            s.shares.clone(),
        )
    };
    rt.block_on(interleaved(
        &setup,
        &items,
        "1 of 4 workers",
        &four[..1],
        30,
    ));
    rt.block_on(interleaved(&setup, &items, "4 workers at once", &four, 15));
    for share in &shares {
        let target = [(share.ranges.clone(), share.legacy.clone())];
        let rounds = if share.rows > 10_000 { 10 } else { 100 };
        rt.block_on(interleaved(&setup, &items, share.name, &target, rounds));
    }

    let mut one = c.benchmark_group("one worker, 25k of 100k items");
    one.sample_size(20).measurement_time(Duration::from_secs(8));
    let rows0 = setup.blocking_lock().rows[0];
    one.throughput(Throughput::Elements(rows0));
    vacuum();
    one.bench_function("raw_update", |b| {
        b.to_async(&rt).iter(|| async {
            let mut s = setup.lock().await;
            let Setup {
                clients, ranges, ..
            } = &mut *s;
            let r = &ranges[0];
            let rows = clients[0]
                .query(RAW, &[&"raw", &r.lower_bounds(), &r.upper_bounds()])
                .await
                .unwrap();
            assert_eq!(rows.len() as u64, rows0);
        })
    });
    let legacy0 = setup.blocking_lock().legacy_rows[0];
    one.throughput(Throughput::Elements(legacy0));
    vacuum();
    one.bench_function("raw_update_1024_shards", |b| {
        b.to_async(&rt).iter(|| async {
            let mut s = setup.lock().await;
            let Setup {
                clients, legacy, ..
            } = &mut *s;
            let rows = clients[0]
                .query(RAW_1024, &[&"raw", &legacy[0]])
                .await
                .unwrap();
            assert_eq!(rows.len() as u64, legacy0);
        })
    });
    vacuum();
    one.bench_function("fenced_tick_1024_shards", |b| {
        b.to_async(&rt).iter(|| async {
            let mut s = setup.lock().await;
            let Setup {
                members,
                clients,
                legacy,
                ..
            } = &mut *s;
            let fence = members[0].view().fence().unwrap();
            let n = legacy_tick(&mut clients[0], &fence, "w0", &legacy[0]).await;
            assert_eq!(n as u64, legacy0);
        })
    });
    one.throughput(Throughput::Elements(rows0));
    vacuum();
    one.bench_function("fenced_tick", |b| {
        b.to_async(&rt).iter(|| async {
            let mut s = setup.lock().await;
            let Setup {
                members,
                clients,
                ranges,
                ..
            } = &mut *s;
            let fence = members[0].view().fence().unwrap();
            let r = items
                .tick(&mut clients[0], &fence, "w0", &ranges[0], Duration::ZERO)
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
                clients, ranges, ..
            } = &mut *s;
            let updates = clients
                .iter_mut()
                .zip(ranges.iter())
                .map(|(client, mine)| async move {
                    client
                        .query(RAW, &[&"raw", &mine.lower_bounds(), &mine.upper_bounds()])
                        .await
                        .unwrap()
                        .len()
                });
            let n: usize = join_all(updates).await.into_iter().sum();
            assert_eq!(n as u64, ITEMS);
        })
    });
    vacuum();
    all.bench_function("raw_update_1024_shards", |b| {
        b.to_async(&rt).iter(|| async {
            let mut s = setup.lock().await;
            let Setup {
                clients, legacy, ..
            } = &mut *s;
            let updates = clients
                .iter_mut()
                .zip(legacy.iter())
                .map(|(client, mine)| async move {
                    client.query(RAW_1024, &[&"raw", mine]).await.unwrap().len()
                });
            let n: usize = join_all(updates).await.into_iter().sum();
            assert_eq!(n as u64, ITEMS);
        })
    });
    vacuum();
    all.bench_function("fenced_tick_1024_shards", |b| {
        b.to_async(&rt).iter(|| async {
            let mut s = setup.lock().await;
            let Setup {
                members,
                clients,
                legacy,
                ..
            } = &mut *s;
            let ticks = clients
                .iter_mut()
                .zip(legacy.iter())
                .zip(members.iter())
                .map(|((client, mine), member)| async move {
                    let fence = member.view().fence().unwrap();
                    let id = member.member_id().to_owned();
                    legacy_tick(client, &fence, &id, mine).await
                });
            let n: usize = join_all(ticks).await.into_iter().sum();
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
                ranges,
                ..
            } = &mut *s;
            let ticks = clients
                .iter_mut()
                .zip(ranges.iter())
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

    // One member's share at 1 and at 1,000 members: the whole table in one tick, and the
    // ~100 items of one member among 1,000 (65 or 66 hash ranges, an index scan each).
    for (i, Share { name, rows, .. }) in shares.iter().enumerate() {
        let mut g = c.benchmark_group(format!("one member's share at {name}"));
        if *rows > 10_000 {
            g.sample_size(10).measurement_time(Duration::from_secs(10));
        } else {
            g.sample_size(50).measurement_time(Duration::from_secs(5));
        }
        g.throughput(Throughput::Elements(*rows));
        vacuum();
        g.bench_function("raw_update", |b| {
            b.to_async(&rt).iter(|| async {
                let mut s = setup.lock().await;
                let Setup {
                    clients, shares, ..
                } = &mut *s;
                let r = &shares[i].ranges;
                let n = clients[0]
                    .query(RAW, &[&"raw", &r.lower_bounds(), &r.upper_bounds()])
                    .await
                    .unwrap()
                    .len();
                assert_eq!(n as u64, shares[i].rows);
            })
        });
        vacuum();
        g.bench_function("fenced_tick", |b| {
            b.to_async(&rt).iter(|| async {
                let mut s = setup.lock().await;
                let Setup {
                    members,
                    clients,
                    shares,
                    ..
                } = &mut *s;
                let fence = members[0].view().fence().unwrap();
                let r = items
                    .tick(
                        &mut clients[0],
                        &fence,
                        "w0",
                        &shares[i].ranges,
                        Duration::ZERO,
                    )
                    .await
                    .unwrap();
                assert_eq!(r.incremented as u64, shares[i].rows);
            })
        });
        g.finish();
    }

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
