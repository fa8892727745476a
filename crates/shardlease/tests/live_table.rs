//! Putting a live table on a stored hash (`shardlease::live_table`): a table sharded the old
//! way (a `STORED` generated `shard` column and its index) gets its `key_hash` column while
//! writers tick and insert, without a rewrite, and keeps its old layout.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::TestDb;
use shardlease::hash;
use shardlease::live_table::KeyHashColumn;
use shardlease::migrate::MigrateOptions;
use shardlease::Error;

const ROWS: i64 = 60_000;

/// The table the old README taught: a stored generated shard and its index.
async fn legacy_orders(db: &TestDb) {
    db.client()
        .await
        .batch_execute(&format!(
            "CREATE TABLE public.orders (
                 id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
                 shard int GENERATED ALWAYS AS (shardlease.shard_of(id)) STORED,
                 processed integer NOT NULL DEFAULT 0,
                 note text);
             CREATE INDEX orders_shard ON public.orders (shard);
             INSERT INTO public.orders (note) SELECT 'seed ' || i FROM generate_series(1, {ROWS}) i;"
        ))
        .await
        .unwrap();
    db.client()
        .await
        .batch_execute("VACUUM ANALYZE public.orders")
        .await
        .unwrap();
}

async fn relfilenode(c: &shardlease::tokio_postgres::Client) -> u32 {
    c.query_one(
        "SELECT relfilenode FROM pg_class WHERE oid = 'public.orders'::regclass",
        &[],
    )
    .await
    .unwrap()
    .get(0)
}

/// Statement latencies of one writer, while the migration runs.
#[derive(Debug, Default)]
struct Writer {
    statements: u32,
    max: Duration,
    failures: Vec<String>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_live_legacy_table_moves_to_a_stored_hash_while_it_is_written() {
    let db = TestDb::migrated().await;
    legacy_orders(&db).await;
    let mut c = db.client().await;
    let before = relfilenode(&c).await;

    // Two writers as a member would run them: a tick over a quarter of the old shards, and
    // inserts (which the new trigger must cover the moment it exists).
    let stop = Arc::new(AtomicBool::new(false));
    let ticker = {
        let (stop, client) = (stop.clone(), db.client().await);
        tokio::spawn(async move {
            let mine: Vec<i32> = (0..256).collect();
            let mut w = Writer::default();
            while !stop.load(Ordering::Relaxed) {
                let t = Instant::now();
                match client
                    .execute(
                        "UPDATE public.orders SET processed = processed + 1 WHERE shard = ANY($1)",
                        &[&mine],
                    )
                    .await
                {
                    Ok(n) => assert!(n > 0),
                    Err(e) => w.failures.push(format!("{e:?}")),
                }
                w.max = w.max.max(t.elapsed());
                w.statements += 1;
            }
            w
        })
    };
    let inserter = {
        let (stop, client) = (stop.clone(), db.client().await);
        tokio::spawn(async move {
            let mut w = Writer::default();
            while !stop.load(Ordering::Relaxed) {
                let t = Instant::now();
                if let Err(e) = client
                    .execute(
                        "INSERT INTO public.orders (note) SELECT 'live' FROM generate_series(1, 50)",
                        &[],
                    )
                    .await
                {
                    w.failures.push(e.to_string());
                }
                w.max = w.max.max(t.elapsed());
                w.statements += 1;
            }
            w
        })
    };

    let column = KeyHashColumn::new("public.orders", "id").batch_pages(16);
    let options = MigrateOptions::default().lock_timeout(Duration::from_millis(500));
    let started = Instant::now();
    let report = column.prepare(&mut c, &options).await.expect("prepare");
    let took = started.elapsed();
    stop.store(true, Ordering::Relaxed);
    let ticker = ticker.await.unwrap();
    let inserter = inserter.await.unwrap();

    assert_eq!(
        report.steps,
        ["install", "backfill", "index", "validate", "settle"]
    );
    assert!(report.status.ready, "{report:?}");
    // The backfill filled the rows that the ticker's updates (through the trigger) did not.
    assert!(
        report.backfilled_rows >= ROWS as u64 / 2,
        "the backfill did the bulk: {report:?}"
    );
    // No rewrite: the table keeps its storage.
    assert_eq!(relfilenode(&c).await, before, "the table was rewritten");
    // Every row, old and new, has the right hash; nothing was lost.
    let row = c
        .query_one(
            "SELECT count(*), count(*) FILTER (WHERE key_hash IS DISTINCT FROM shardlease.uuid_hash(id)), \
                    count(*) FILTER (WHERE note = 'live') FROM public.orders",
            &[],
        )
        .await
        .unwrap();
    let (total, wrong, live): (i64, i64, i64) = (row.get(0), row.get(1), row.get(2));
    assert_eq!(wrong, 0);
    assert_eq!(total, ROWS + live);
    for r in c
        .query("SELECT id, key_hash FROM public.orders LIMIT 500", &[])
        .await
        .unwrap()
    {
        assert_eq!(hash::uuid_hash(&r.get(0)), r.get::<_, i32>(1));
    }
    // The old layout is untouched: users move at their own pace.
    let legacy: i64 = c
        .query_one(
            "SELECT count(*) FROM public.orders WHERE shard IS DISTINCT FROM shardlease.shard_of(id)",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(legacy, 0);
    let indexes: Vec<String> = c
        .query(
            "SELECT indexrelid::regclass::text FROM pg_index WHERE indrelid = 'public.orders'::regclass AND indisvalid ORDER BY 1",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(
        indexes,
        ["orders_key_hash_idx", "orders_pkey", "orders_shard"]
    );

    // The writers kept going and were never held up for long.
    for (name, w) in [("ticker", &ticker), ("inserter", &inserter)] {
        assert!(w.failures.is_empty(), "{name}: {:?}", w.failures);
        assert!(w.statements >= 3, "{name} made progress: {w:?}");
        assert!(
            w.max < Duration::from_secs(3),
            "{name} waited {:?} at most (lock_timeout 500 ms)",
            w.max
        );
    }
    println!(
        "prepare took {took:?}: {} rows backfilled, {} lock retries; ticker {} statements (max {:?}), inserter {} (max {:?}), {live} rows inserted meanwhile",
        report.backfilled_rows, report.lock_retries, ticker.statements, ticker.max, inserter.statements, inserter.max
    );

    // Idempotent.
    let again = column.prepare(&mut c, &options).await.unwrap();
    assert!(again.steps.is_empty() && again.status.ready, "{again:?}");
}

#[tokio::test]
async fn an_interrupted_index_build_is_redone_and_bad_input_is_refused() {
    let db = TestDb::migrated().await;
    let mut c = db.client().await;
    c.batch_execute(
        "CREATE TABLE public.jobs (name text PRIMARY KEY, n bigint, price numeric);
         INSERT INTO public.jobs SELECT 'job ' || i, i % 7, i FROM generate_series(1, 3000) i;",
    )
    .await
    .unwrap();
    // A concurrent build that failed, as an interrupted run leaves it: an invalid index under
    // the name the migration uses.
    let err = c
        .batch_execute("CREATE UNIQUE INDEX CONCURRENTLY jobs_name_hash_idx ON public.jobs (n)")
        .await
        .unwrap_err();
    assert_eq!(err.code().map(|c| c.code()), Some("23505"));
    let column = KeyHashColumn::new("public.jobs", "name").column("name_hash");
    let status = column.status(&c).await.unwrap();
    assert!(!status.has_column && !status.indexed && !status.ready);
    let report = column
        .prepare(&mut c, &MigrateOptions::default())
        .await
        .unwrap();
    assert!(report.status.ready, "{report:?}");
    let (valid, key): (bool, String) = {
        let r = c
            .query_one(
                "SELECT i.indisvalid, pg_get_indexdef(i.indexrelid) FROM pg_index i \
                 WHERE i.indexrelid = 'public.jobs_name_hash_idx'::regclass",
                &[],
            )
            .await
            .unwrap();
        (r.get(0), r.get(1))
    };
    assert!(valid && key.contains("(name_hash)"), "{key}");
    let wrong: i64 = c
        .query_one(
            "SELECT count(*) FROM public.jobs WHERE name_hash IS DISTINCT FROM shardlease.str_hash(name)",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(wrong, 0);
    let h: i32 = c
        .query_one(
            "SELECT name_hash FROM public.jobs WHERE name = 'job 1'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(h, hash::str_hash("job 1"));
    // An integer key hashes with int_hash, through the trigger as well.
    let column = KeyHashColumn::new("public.jobs", "n").column("n_hash");
    column
        .prepare(&mut c, &MigrateOptions::default())
        .await
        .unwrap();
    c.batch_execute("INSERT INTO public.jobs VALUES ('late', 123456789, 1)")
        .await
        .unwrap();
    let h: i32 = c
        .query_one("SELECT n_hash FROM public.jobs WHERE name = 'late'", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(h, hash::int_hash(123_456_789));

    // Bad input: clear errors, nothing changed.
    let err = KeyHashColumn::new("public.jobs", "price")
        .prepare(&mut c, &MigrateOptions::default())
        .await
        .unwrap_err();
    assert!(err.to_string().contains("not uuid, text"), "{err}");
    let err = KeyHashColumn::new("public.jobs", "nope")
        .prepare(&mut c, &MigrateOptions::default())
        .await
        .unwrap_err();
    assert!(err.to_string().contains("no column"), "{err}");
    let err = KeyHashColumn::new("public.missing", "id")
        .status(&c)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("public.missing"), "{err}");
    let gone: i64 = c
        .query_one(
            "SELECT count(*) FROM information_schema.columns WHERE table_name = 'jobs' AND column_name = 'key_hash'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(gone, 0);

    // Without schema version 5, the error says to migrate.
    let bare = TestDb::empty().await;
    let c = bare.client().await;
    c.batch_execute("CREATE TABLE t (id uuid)").await.unwrap();
    let err = KeyHashColumn::new("t", "id").status(&c).await.unwrap_err();
    assert!(matches!(err, Error::NotMigrated { .. }), "{err:?}");
}
