//! The worker behind a real PgBouncer (`shardlease_testkit::PgBouncer`): the work path
//! (`WORK_DATABASE_URL`) through transaction pooling, with fewer server connections than
//! workers, while each worker's session (`DATABASE_URL`) is direct; and a worker whose
//! session goes through the pooler, which must refuse to run. Both skip, saying why, when
//! there is no pgbouncer binary.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::*;
use shardlease::tokio_postgres::SimpleQueryMessage;
use shardlease_testkit::{PgBouncer, PoolMode};

/// Items per scenario.
const ITEMS: u64 = 300;

/// Server connections in PgBouncer's pool: fewer than the workers.
const POOL: u32 = 2;

/// The clients PgBouncer's admin console lists for `db`, with their application names.
async fn pooled_clients(bouncer: &PgBouncer, db: &str) -> BTreeSet<String> {
    let admin = shardlease::connect_client(&bouncer.db_config("pgbouncer"), "test admin")
        .await
        .expect("connect to the PgBouncer admin console");
    // The admin console speaks only the simple query protocol.
    let rows = admin
        .simple_query("SHOW CLIENTS")
        .await
        .expect("SHOW CLIENTS");
    rows.iter()
        .filter_map(|m| match m {
            SimpleQueryMessage::Row(r) if r.get("database") == Some(db) => {
                r.get("application_name").map(str::to_owned)
            }
            _ => None,
        })
        .collect()
}

/// May fail now and then until the fence is pooler-safe: a refused fence (at the joins) can
/// leave its named statement `sN` on a pooled server connection, and another worker process,
/// whose statement counter reaches `sN` there, fails a tick with `prepared statement "sN"
/// already exists` (see `tests/pooler.rs` in the library).
#[tokio::test]
async fn three_workers_tick_through_a_transaction_pooler_with_two_server_connections() {
    let db = TestDb::with_items(ITEMS).await;
    let Some(bouncer) = PgBouncer::start(PoolMode::Transaction, POOL).await else {
        return;
    };
    let work_url = bouncer.url(&db.name);
    let c = db.client().await;
    let names = ["w1", "w2", "w3"];
    let ws: Vec<Worker> = names
        .iter()
        .map(|n| db.worker_env(n, &[], &[("WORK_DATABASE_URL", &work_url)]))
        .collect();
    wait_settled(&c, &names, Duration::from_secs(30)).await;

    // Every item is ticked by exactly one live worker, and its value advances.
    let owners = quiet_window(&c, 3.0, "3 workers through PgBouncer").await;
    let sizes = owners.sizes();
    assert_eq!(
        sizes.keys().map(String::as_str).collect::<Vec<_>>(),
        names,
        "every worker ticks items: {sizes:?}"
    );
    let stalled: Vec<_> = owners.counts.iter().filter(|(_, n)| **n < 2).collect();
    assert!(
        stalled.is_empty(),
        "items incremented less than twice in 3 s: {stalled:?}"
    );
    let unowned: i64 = c
        .query_one(
            "SELECT count(*) FROM public.work_items WHERE NOT (currentworker = ANY($1))",
            &[&names.iter().map(|s| s.to_string()).collect::<Vec<_>>()],
        )
        .await
        .expect("count items")
        .get(0);
    assert_eq!(unowned, 0, "every item's currentWorker is a live worker");

    // The work really went through PgBouncer: it lists the three work connections as its
    // clients, and PostgreSQL sees at most POOL work backends for the three workers.
    let clients = pooled_clients(&bouncer, &db.name).await;
    let want: BTreeSet<String> = names
        .iter()
        .map(|n| format!("shardlease-worker {n} work"))
        .collect();
    assert_eq!(clients, want, "PgBouncer's clients for {}", db.name);
    let work_backends: i64 = c
        .query_one(
            "SELECT count(*) FROM pg_stat_activity \
             WHERE datname = $1 AND application_name LIKE 'shardlease-worker % work'",
            &[&db.name],
        )
        .await
        .expect("count work backends")
        .get(0);
    assert!(
        work_backends <= i64::from(POOL),
        "{work_backends} work backends for 3 workers: the work path bypassed PgBouncer's pool of {POOL}"
    );

    check_audit(&c, "3 workers through PgBouncer", &[], &BTreeSet::new()).await;
    for w in &ws {
        let problems: Vec<String> = w
            .stderr()
            .into_iter()
            .filter(|l| l.contains("WARN") || l.contains("ERROR"))
            .collect();
        assert!(
            problems.is_empty(),
            "worker {} logged warnings or errors:\n{}",
            w.name,
            problems.join("\n")
        );
    }
}

/// A worker whose session connection goes through a transaction pooler exits at once, with
/// one line that says why, instead of joining and flapping.
#[tokio::test]
async fn a_worker_whose_session_goes_through_a_transaction_pooler_exits_with_one_clear_line() {
    let db = TestDb::with_items(ITEMS).await;
    let Some(bouncer) = PgBouncer::start(PoolMode::Transaction, POOL).await else {
        return;
    };
    let mut w = Worker::spawn(&bouncer.url(&db.name), "w1", RUN_ARGS);
    let exit = w.exit_within(Duration::from_secs(20)).await;
    let stderr = w.stderr();
    let Some(status) = exit else {
        panic!(
            "the worker still runs 20 s after starting with DATABASE_URL through PgBouncer in \
             transaction mode; it must exit. Its stderr:\n{}",
            stderr.join("\n")
        );
    };
    assert_eq!(
        status.code(),
        Some(1),
        "exit status; stderr:\n{}",
        stderr.join("\n")
    );
    let about_pooler: Vec<&String> = stderr
        .iter()
        .filter(|l| l.contains("transaction pooler"))
        .collect();
    assert_eq!(
        about_pooler.len(),
        1,
        "one line about the transaction pooler; stderr:\n{}",
        stderr.join("\n")
    );
    let line = about_pooler[0];
    assert!(
        line.starts_with("error: ")
            && line.contains(&format!("127.0.0.1:{}/{}", bouncer.port(), db.name))
            && line.contains("WORK_DATABASE_URL"),
        "the error names the target and the fix: {line}"
    );
    // No flapping: it never joined, and did not retry.
    let flaps: Vec<&String> = stderr
        .iter()
        .filter(|l| l.contains("joined") || l.contains("retrying") || l.contains("rejoin"))
        .collect();
    assert!(flaps.is_empty(), "the worker joined or retried: {flaps:?}");
    let leases = leases(&db.client().await).await;
    assert!(leases.is_empty(), "no lease was left behind: {leases:?}");
}
