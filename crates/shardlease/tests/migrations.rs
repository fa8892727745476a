//! Migrations on a live database: bounded lock waits with retries, the session's own
//! `lock_timeout` left as it was, and a schema applied by hand (`psql -f`) recognised.

mod common;

use std::time::{Duration, Instant};

use common::{eventually, TestDb};
use shardlease::migrate::{self, MigrateOptions};
use shardlease::tokio_postgres::Client;
use shardlease::{Error, Member, MemberConfig};

/// The library's migration files, in version order, as `psql -f` would run them.
fn migration_files() -> Vec<(i32, String)> {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../../migrations/shardlease");
    let mut files: Vec<(i32, String)> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "sql"))
        .map(|p| {
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            let version: i32 = name[1..name.find("__").unwrap()].parse().unwrap();
            (version, std::fs::read_to_string(&p).unwrap())
        })
        .collect();
    files.sort();
    files
}

async fn history(c: &Client) -> Vec<i32> {
    c.query(
        "SELECT version FROM shardlease.schema_history ORDER BY version",
        &[],
    )
    .await
    .unwrap()
    .iter()
    .map(|r| r.get(0))
    .collect()
}

/// A schema applied with psql records no history: `migrate` used to fail on
/// `CREATE SEQUENCE`. It now recognises the versions present, records them, applies the rest.
#[tokio::test]
async fn a_schema_applied_by_hand_is_recognised() {
    let files = migration_files();
    assert!(files.len() >= 3);
    let all: Vec<i32> = files.iter().map(|(v, _)| *v).collect();

    // The first two files by hand: migrate records them and applies the others.
    let db = TestDb::empty().await;
    let mut c = db.client().await;
    for (_, sql) in &files[..2] {
        c.batch_execute(sql).await.expect("psql -f of a migration");
    }
    // Without the baseline check, the plain runner fails exactly as users saw it.
    let mut runner = refinery_runner();
    runner.set_migration_table_name("public.plain_history");
    let err = migrate::run_locked(&mut c, "SELECT 1", runner)
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("already exists"),
        "the runner alone trips over the hand-made schema: {err}"
    );
    let report = shardlease::migrate(&mut c)
        .await
        .expect("migrate after psql");
    assert_eq!(report.baselined, all[..2]);
    assert_eq!(report.applied.len(), all.len() - 2, "{report:?}");
    assert_eq!(report.version, migrate::required_version());
    assert_eq!(history(&c).await, all);
    shardlease::check_migrated(&c).await.unwrap();
    let again = shardlease::migrate(&mut c).await.unwrap();
    assert!(again.applied.is_empty() && again.baselined.is_empty());
    // The schema works: a member joins and leaves.
    let m = Member::join(&db.pg, MemberConfig::new("g", "a"))
        .await
        .unwrap();
    m.leave().await.unwrap();

    // Every file by hand: all recorded, nothing applied, and refinery accepts the checksums
    // (a divergent checksum would fail the second run).
    let db = TestDb::empty().await;
    let mut c = db.client().await;
    for (_, sql) in &files {
        c.batch_execute(sql).await.expect("psql -f of a migration");
    }
    let report = shardlease::migrate(&mut c).await.unwrap();
    assert_eq!(report.baselined, all);
    assert!(report.applied.is_empty());
    assert_eq!(history(&c).await, all);
    assert!(shardlease::migrate(&mut c)
        .await
        .unwrap()
        .applied
        .is_empty());

    // An empty database gets no baseline.
    let db = TestDb::empty().await;
    let report = shardlease::migrate(&mut db.client().await).await.unwrap();
    assert!(report.baselined.is_empty());
    assert_eq!(report.applied.len(), all.len());
}

/// The library's runner, for the negative control above.
fn refinery_runner() -> refinery::Runner {
    let files = migration_files();
    let migrations: Vec<refinery::Migration> = std::fs::read_dir(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../migrations/shardlease"
    ))
    .unwrap()
    .map(|e| e.unwrap().path())
    .filter(|p| p.extension().is_some_and(|x| x == "sql"))
    .map(|p| {
        let name = p.file_stem().unwrap().to_string_lossy().into_owned();
        refinery::Migration::unapplied(&name, &std::fs::read_to_string(&p).unwrap()).unwrap()
    })
    .collect();
    assert_eq!(migrations.len(), files.len());
    refinery::Runner::new(&migrations)
}

/// One migration that needs an ACCESS EXCLUSIVE lock on `busy`.
fn alter_busy() -> refinery::Runner {
    refinery::Runner::new(&[refinery::Migration::unapplied(
        "V1__alter_busy",
        "ALTER TABLE public.busy ADD COLUMN y integer",
    )
    .unwrap()])
}

/// A database with a table `busy` that a long transaction reads.
async fn busy_table() -> (TestDb, Client) {
    let db = TestDb::migrated().await;
    let c = db.client().await;
    c.batch_execute("CREATE TABLE public.busy (x integer); INSERT INTO public.busy VALUES (1)")
        .await
        .unwrap();
    let holder = db.client().await;
    holder
        .batch_execute("BEGIN; SELECT * FROM public.busy")
        .await
        .unwrap();
    (db, holder)
}

/// Wait until a backend runs `ALTER TABLE public.busy` and waits for a lock.
async fn wait_for_queued_alter(c: &Client) {
    eventually(
        Duration::from_secs(20),
        "the migration's ALTER TABLE to queue for its lock",
        || async {
            c.query_one(
                "SELECT EXISTS (SELECT 1 FROM pg_stat_activity WHERE datname = current_database() \
                 AND wait_event_type = 'Lock' AND query LIKE 'ALTER TABLE public.busy%')",
                &[],
            )
            .await
            .unwrap()
            .get(0)
        },
    )
    .await;
}

/// An ALTER that queues behind a long transaction gives way after its `lock_timeout`, so that
/// the statements queued behind it (a member's ticks) run; it is retried, and succeeds once
/// the long transaction ends. The session's own `lock_timeout` is restored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migration_ddl_gives_way_and_retries() {
    let (db, holder) = busy_table().await;
    let mut migrator = db.client().await;
    migrator
        .batch_execute("SET lock_timeout = '7s'")
        .await
        .unwrap();
    let options = MigrateOptions::default()
        .lock_timeout(Duration::from_millis(200))
        .attempts(1000)
        .max_backoff(Duration::from_millis(200));
    let task = tokio::spawn(async move {
        let report = migrate::run_locked_with(
            &mut migrator,
            "SELECT 1",
            alter_busy(),
            "public.busy_history",
            &[],
            &options,
        )
        .await;
        let after: String = migrator
            .query_one("SHOW lock_timeout", &[])
            .await
            .unwrap()
            .get(0);
        (report, after)
    });
    let observer = db.client().await;
    wait_for_queued_alter(&observer).await;
    // A reader arriving now queues behind the ALTER, which queues behind the holder. Without a
    // lock_timeout it would wait for the holder (for ever, here); with it, at most 200 ms plus
    // a backoff pause.
    let reader = db.client().await;
    let started = Instant::now();
    let read = tokio::time::timeout(
        Duration::from_secs(10),
        reader.query_one("SELECT count(*) FROM public.busy", &[]),
    )
    .await
    .expect("a reader must not stay queued behind the migration's ALTER TABLE")
    .unwrap();
    assert_eq!(read.get::<_, i64>(0), 1);
    let waited = started.elapsed();
    // And again: the migration keeps retrying while the holder stays.
    wait_for_queued_alter(&observer).await;
    holder.batch_execute("COMMIT").await.unwrap();
    let (report, after) = tokio::time::timeout(Duration::from_secs(30), task)
        .await
        .expect("the migration finishes once the holder commits")
        .unwrap();
    let report = report.expect("the migration succeeds");
    assert_eq!(report.applied, ["V1__alter_busy"]);
    assert!(report.lock_retries >= 1, "{report:?}");
    assert_eq!(after, "7s", "the session's lock_timeout is restored");
    let has_y: bool = observer
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM information_schema.columns WHERE table_name = 'busy' AND column_name = 'y')",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(has_y);
    println!(
        "reader queued behind the migration for {waited:?}; {} lock retries",
        report.lock_retries
    );
}

/// When the lock never comes, the migration gives up after its attempts with an error that
/// says what to do, and leaves nothing half done.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migration_gives_up_clearly_when_a_lock_never_comes() {
    let (db, holder) = busy_table().await;
    let mut migrator = db.client().await;
    let options = MigrateOptions::default()
        .lock_timeout(Duration::from_millis(100))
        .attempts(3)
        .max_backoff(Duration::from_millis(100));
    let err = migrate::run_locked_with(
        &mut migrator,
        "SELECT 1",
        alter_busy(),
        "public.busy_history",
        &[],
        &options,
    )
    .await
    .unwrap_err();
    assert!(matches!(err, Error::Migration(_)), "{err:?}");
    let text = err.to_string();
    for needle in ["55P03", "3 attempts", "pg_stat_activity", "lock_timeout"] {
        assert!(text.contains(needle), "{needle:?} in: {text}");
    }
    let recorded: i64 = migrator
        .query_one("SELECT count(*) FROM public.busy_history", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(recorded, 0, "nothing recorded");
    holder.batch_execute("ROLLBACK").await.unwrap();
    // Bad options are refused before anything runs.
    let err = migrate::migrate_with(&mut migrator, &MigrateOptions::default().attempts(0))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Config(_)), "{err:?}");
}
