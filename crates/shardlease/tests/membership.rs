//! Membership, liveness and fencing against a real PostgreSQL (one fresh database per test).

mod common;

use std::time::{Duration, Instant};

use common::{eventually, ChildMember, TestDb};
use shardlease::{Error, FenceReason, Member, MemberConfig, MemberState, View};

const WAIT: Duration = Duration::from_secs(10);

fn fast(group: &str, member: &str) -> MemberConfig {
    MemberConfig::new(group, member)
        .heartbeat(Duration::from_millis(200))
        .lease_ttl(Duration::from_millis(1500))
        .crash_check(Duration::from_millis(50))
}

async fn wait_members(m: &Member, n: usize, what: &str) -> View {
    m.wait_for(WAIT, |v| v.members.len() == n && v.is_joined())
        .await
        .unwrap_or_else(|| {
            panic!(
                "{}: timed out waiting for {n} members ({what}); view {:?}",
                m.member_id(),
                m.view()
            )
        })
}

/// Not a test: the body of the child process of the crash and hang tests.
#[tokio::test]
#[ignore = "run as a child process by the crash and hang tests"]
async fn child_member() {
    common::run_child_member().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_migrate_is_safe_and_idempotent() {
    let db = TestDb::empty().await;
    let mut tasks = Vec::new();
    for _ in 0..10 {
        let pg = db.pg.clone();
        tasks.push(tokio::spawn(async move {
            let mut c = shardlease::connect_client(&pg, "migrate-race")
                .await
                .unwrap();
            shardlease::migrate(&mut c).await
        }));
    }
    let mut applied = 0;
    for t in tasks {
        let report = t.await.unwrap().expect("every concurrent migrate succeeds");
        assert_eq!(report.version, shardlease::migrate::required_version());
        applied += report.applied.len();
    }
    // The migration files (versions need not be contiguous: other branches own some numbers).
    let expected = std::fs::read_dir(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../migrations/shardlease"
    ))
    .expect("the migrations directory")
    .filter_map(|e| e.ok())
    .filter(|e| {
        let name = e.file_name().to_string_lossy().into_owned();
        name.starts_with('V') && name.ends_with(".sql")
    })
    .count();
    assert!(expected >= 1, "no migration files found");
    assert_eq!(
        applied, expected,
        "each migration applied exactly once across 10 racers"
    );
    let c = db.client().await;
    let rows: i64 = c
        .query_one("SELECT count(*) FROM shardlease.schema_history", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(rows as usize, expected);
    let mut c = db.client().await;
    let again = shardlease::migrate(&mut c).await.unwrap();
    assert!(again.applied.is_empty(), "a second run is a no-op");
    shardlease::check_migrated(&c).await.unwrap();
}

#[tokio::test]
async fn every_table_view_column_and_function_has_a_comment() {
    let db = TestDb::migrated().await;
    let c = db.client().await;
    let missing: Vec<String> = c
        .query(
            "SELECT c.relname || coalesce('.' || a.attname, '') FROM pg_class c \
             JOIN pg_namespace n ON n.oid = c.relnamespace AND n.nspname = 'shardlease' \
             LEFT JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped \
             WHERE c.relkind IN ('r', 'v') AND c.relname <> 'schema_history' \
               AND (obj_description(c.oid, 'pg_class') IS NULL \
                    OR (a.attname IS NOT NULL AND col_description(c.oid, a.attnum) IS NULL)) \
             UNION ALL \
             SELECT p.oid::regprocedure::text FROM pg_proc p \
             JOIN pg_namespace n ON n.oid = p.pronamespace AND n.nspname = 'shardlease' \
             WHERE obj_description(p.oid, 'pg_proc') IS NULL",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert!(
        missing.is_empty(),
        "objects without COMMENT ON: {missing:?}"
    );
}

#[tokio::test]
async fn not_migrated_database_gets_a_clear_error() {
    let db = TestDb::empty().await;
    let err = Member::join(&db.pg, fast("g", "a")).await.unwrap_err();
    assert!(matches!(err, Error::NotMigrated { .. }), "{err:?}");
    assert!(
        err.to_string().contains("shardlease-worker migrate"),
        "{err}"
    );
    let c = db.client().await;
    let err = shardlease::check_migrated(&c).await.unwrap_err();
    assert!(matches!(err, Error::NotMigrated { .. }), "{err:?}");
}

#[tokio::test]
async fn bad_input_gets_clear_errors() {
    let err = shardlease::parse_database_url("not a url at all").unwrap_err();
    assert!(matches!(err, Error::Url(_)), "{err:?}");
    // TLS is built in: verify-full parses; bad TLS parameters get clear errors, without the password.
    let pg =
        shardlease::parse_database_url("postgres://u:hunter2@h/db?sslmode=verify-full").unwrap();
    assert_eq!(pg.tls_mode(), shardlease::TlsMode::VerifyFull);
    for (url, expected) in [
        (
            "postgres://u:hunter2@h/db?sslmode=verify-fullest",
            "sslmode=verify-fullest is not one of",
        ),
        (
            "postgres://u:hunter2@h/db?sslmode=verify-full&sslrootcert=/nonexistent/ca.pem",
            "/nonexistent/ca.pem cannot be read",
        ),
        (
            "postgres://u:hunter2@h/db?sslmode=require&sslrootcert=system",
            "sslrootcert=system needs sslmode=verify-full",
        ),
    ] {
        let err = shardlease::parse_database_url(url).unwrap_err();
        assert!(matches!(err, Error::Url(_)), "{err:?}");
        assert!(err.to_string().contains(expected), "{url}: {err}");
        assert!(
            !err.to_string().contains("hunter2"),
            "the password must never be printed: {err}"
        );
    }
    // Nothing listens on port 1.
    let pg = shardlease::parse_database_url("postgres://u:hunter2@127.0.0.1:1/db").unwrap();
    let err = Member::join(&pg, fast("g", "a")).await.unwrap_err();
    assert!(matches!(err, Error::Connect { .. }), "{err:?}");
    assert!(err.is_transient());
    assert!(!err.to_string().contains("hunter2"), "{err}");
    assert!(err.to_string().contains("127.0.0.1:1/db"), "{err}");
    let err = Member::join(&pg, fast("", "a")).await.unwrap_err();
    assert!(matches!(err, Error::Config(_)), "{err:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn join_and_leave_keep_slots_and_slot_count() {
    let db = TestDb::migrated().await;
    let a = Member::join(&db.pg, fast("g", "a")).await.unwrap();
    let b = Member::join(&db.pg, fast("g", "b")).await.unwrap();
    let c = Member::join(&db.pg, fast("g", "c")).await.unwrap();
    for m in [&a, &b, &c] {
        let v = wait_members(m, 3, "three joined").await;
        assert_eq!(v.slot_count, 3);
        assert_eq!(v.generation, 3);
    }
    assert_eq!(
        [a.view().my_slot(), b.view().my_slot(), c.view().my_slot()],
        [Some(0), Some(1), Some(2)]
    );

    // The middle member leaves: its slot is vacated, S stays.
    b.leave().await.unwrap();
    for m in [&a, &c] {
        let v = wait_members(m, 2, "b left").await;
        assert_eq!(v.slot_count, 3, "S never shrinks for a non-top slot");
        assert_eq!(v.member_in(1), None);
    }
    // A joiner refills the lowest vacant slot.
    let d = Member::join(&db.pg, fast("g", "d")).await.unwrap();
    assert_eq!(d.view().my_slot(), Some(1));
    assert_eq!(wait_members(&a, 3, "d joined").await.slot_count, 3);

    // The top slot leaves: S shrinks by exactly one.
    c.leave().await.unwrap();
    let v = wait_members(&a, 2, "c left").await;
    assert_eq!(v.slot_count, 2);

    let generation = v.generation;
    a.leave().await.unwrap();
    d.leave().await.unwrap();
    let admin = db.client().await;
    let row = admin
        .query_one(
            "SELECT generation, slot_count, (SELECT count(*) FROM shardlease.leases) FROM shardlease.groups",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, i64>(0) as u64, generation + 2);
    assert_eq!(row.get::<_, i64>(2), 0, "no lease left behind");
    let locks: i64 = admin
        .query_one("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND database = (SELECT oid FROM pg_database WHERE datname = current_database())", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(locks, 0, "leaving releases the advisory locks");
}

#[tokio::test]
async fn duplicate_member_id_and_protocol_mismatch_are_refused() {
    let db = TestDb::migrated().await;
    let a = Member::join(&db.pg, fast("g", "a")).await.unwrap();
    let err = Member::join(&db.pg, fast("g", "a")).await.unwrap_err();
    assert!(matches!(err, Error::MemberIdInUse { .. }), "{err:?}");
    let admin = db.client().await;
    admin
        .batch_execute("UPDATE shardlease.groups SET protocol_version = 99")
        .await
        .unwrap();
    let err = Member::join(&db.pg, fast("g", "b")).await.unwrap_err();
    assert!(matches!(err, Error::ProtocolMismatch { .. }), "{err:?}");
    let advisory: i64 = admin
        .query_one("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND database = (SELECT oid FROM pg_database WHERE datname = current_database())", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(advisory, 1, "a refused join keeps no advisory lock");
    a.leave().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_a_member_process_is_reaped_fast() {
    let db = TestDb::migrated().await;
    let a = Member::join(&db.pg, fast("g", "a")).await.unwrap();
    let b = Member::join(&db.pg, fast("g", "b")).await.unwrap();
    let child = ChildMember::spawn(&db, "g", "victim", 200, 1500);
    child.expect_line("READY", WAIT);
    wait_members(&a, 3, "child joined").await;
    wait_members(&b, 3, "child joined").await;
    let before = a.view().generation;

    let killed = Instant::now();
    child.signal("KILL");
    let gone = |v: &View| v.members.len() == 2 && v.member_in(2).is_none();
    let (va, vb) = tokio::join!(a.wait_for(WAIT, gone), b.wait_for(WAIT, gone));
    let latency = killed.elapsed();
    let (va, vb) = (va.expect("a sees the crash"), vb.expect("b sees the crash"));
    println!("kill -9 -> new view at every survivor: {latency:?}");
    // The lease TTL is 1.5 s: a take-over well under it proves the lock path, not expiry.
    assert!(
        latency < Duration::from_millis(1000),
        "crash detected in {latency:?}"
    );
    assert_eq!(va.generation, before + 1, "one reap, one generation");
    assert_eq!((va.generation, &va.members), (vb.generation, &vb.members));
    assert_eq!(
        va.slot_count, 2,
        "the crashed member held the top slot: S shrinks by one"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hung_member_expires_by_the_database_clock_and_its_backend_ends() {
    let db = TestDb::migrated().await;
    let a = Member::join(&db.pg, fast("g", "a")).await.unwrap();
    let child = ChildMember::spawn(&db, "g", "sleeper", 200, 1500);
    child.expect_line("READY", WAIT);
    wait_members(&a, 2, "child joined").await;
    let admin = db.client().await;
    let child_backend: i32 = admin
        .query_one(
            "SELECT backend_pid FROM shardlease.leases WHERE member_id = 'sleeper'",
            &[],
        )
        .await
        .unwrap()
        .get(0);

    child.signal("STOP");
    let stopped = Instant::now();
    let v = a
        .wait_for(WAIT, |v| v.members.len() == 1)
        .await
        .expect("the hung member is reaped");
    let took = stopped.elapsed();
    println!("SIGSTOP -> reaped after {took:?} (TTL 1.5 s)");
    assert!(
        took >= Duration::from_millis(1000),
        "reaped before its lease could expire: {took:?}"
    );
    assert!(v.is_joined());
    // Its session backend was proven its own (it held the lease's lock) and terminated.
    eventually(WAIT, "the zombie's backend to end", || async {
        admin
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE pid = $1",
                &[&child_backend],
            )
            .await
            .unwrap()
            .get::<_, i64>(0)
            == 0
    })
    .await;

    // Resumed, it finds its lease lost and rejoins as a new incarnation.
    child.signal("CONT");
    child.expect_line("VIEW gen", WAIT);
    let v = wait_members(&a, 2, "the resumed member rejoined").await;
    let sleeper = v.members.iter().find(|m| m.member_id == "sleeper").unwrap();
    assert_eq!(sleeper.slot, 1, "it refills its vacated slot");
    let incarnations: i64 = admin
        .query_one("SELECT last_value FROM shardlease.incarnation_seq", &[])
        .await
        .unwrap()
        .get(0);
    // An incarnation is (timeline << 40) | the sequence's value.
    assert_eq!(
        (
            sleeper.incarnation >> 40,
            sleeper.incarnation & ((1 << 40) - 1)
        ),
        (1, incarnations),
        "a new incarnation, on timeline 1"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fenced_write_is_rejected_after_a_membership_change() {
    let db = TestDb::migrated().await;
    let admin = db.client().await;
    admin
        .batch_execute("CREATE TABLE items (id int PRIMARY KEY, writer text)")
        .await
        .unwrap();
    admin
        .batch_execute("INSERT INTO items SELECT g, NULL FROM generate_series(1, 10) g")
        .await
        .unwrap();
    let a = Member::join(&db.pg, fast("g", "a")).await.unwrap();
    let stale = a.view();
    let mut work = db.client().await;

    // Under the current view, the write commits.
    let tx = stale.fence().unwrap().begin(&mut work).await.unwrap();
    tx.execute("UPDATE items SET writer = 'a' WHERE id = 1", &[])
        .await
        .unwrap();
    tx.commit().await.unwrap();

    // A membership change moves the generation on.
    let b = Member::join(&db.pg, fast("g", "b")).await.unwrap();
    let Err(err) = stale.fence().unwrap().begin(&mut work).await else {
        panic!("a stale fence must be refused")
    };
    match err {
        Error::Fenced {
            reason,
            expected,
            current,
        } => {
            assert_eq!(reason, FenceReason::StaleGeneration);
            assert_eq!(expected, stale.generation);
            assert_eq!(current, Some(stale.generation + 1));
        }
        other => panic!("expected Fenced, got {other:?}"),
    }
    // The fresh view writes again.
    let fresh = wait_members(&a, 2, "b joined").await;
    let tx = fresh.fence().unwrap().begin(&mut work).await.unwrap();
    tx.execute("UPDATE items SET writer = 'a2' WHERE id = 2", &[])
        .await
        .unwrap();
    tx.commit().await.unwrap();
    let writers: Vec<Option<String>> = admin
        .query("SELECT writer FROM items WHERE id <= 2 ORDER BY id", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(writers, [Some("a".into()), Some("a2".into())]);
    b.leave().await.unwrap();
}

/// `Fence::run` (the check, the statement and the commit pipelined): commits under the
/// current view; under a stale one it is refused, and what the statement did is rolled back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pipelined_fenced_statement_commits_or_is_refused_whole() {
    use shardlease::tokio_postgres::types::Type;
    let db = TestDb::migrated().await;
    let admin = db.client().await;
    admin
        .batch_execute(
            "CREATE TABLE items (id int PRIMARY KEY, writer text); \
             INSERT INTO items SELECT g, NULL FROM generate_series(1, 10) g",
        )
        .await
        .unwrap();
    let a = Member::join(&db.pg, fast("g", "a")).await.unwrap();
    let stale = a.view();
    let mut work = db.client().await;
    let update = "UPDATE items SET writer = $1 WHERE id <= $2 RETURNING id";

    let rows = stale
        .fence()
        .unwrap()
        .run(
            &mut work,
            update,
            &[(&"a", Type::TEXT), (&3i32, Type::INT4)],
        )
        .await
        .expect("the current view's fenced statement commits");
    assert_eq!(rows.len(), 3);

    let b = Member::join(&db.pg, fast("g", "b")).await.unwrap();
    // The current owner holds a row lock on an item: a stale member's statement must be
    // refused before it runs, not queue for that lock (two workers on views of different
    // generations would otherwise lock each other's rows, and deadlock).
    let mut owner = db.client().await;
    let owner_tx = owner.transaction().await.unwrap();
    owner_tx
        .execute("UPDATE items SET writer = 'owner' WHERE id = 10", &[])
        .await
        .unwrap();
    let err = tokio::time::timeout(
        Duration::from_secs(5),
        stale.fence().unwrap().run(
            &mut work,
            update,
            &[(&"stale", Type::TEXT), (&10i32, Type::INT4)],
        ),
    )
    .await
    .expect("a stale fenced statement waited for a row lock: the begin check must refuse it first")
    .expect_err("a stale fence must be refused");
    owner_tx.rollback().await.unwrap();
    assert!(
        matches!(
            err,
            Error::Fenced {
                reason: FenceReason::StaleGeneration,
                ..
            }
        ),
        "expected a stale-generation refusal, got {err:?}"
    );
    let stale_writes: i64 = admin
        .query_one("SELECT count(*) FROM items WHERE writer = 'stale'", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        stale_writes, 0,
        "the refused statement's writes were rolled back"
    );
    // The connection is usable again, outside any transaction.
    let fresh = wait_members(&a, 2, "b joined").await;
    let rows = fresh
        .fence()
        .unwrap()
        .run(
            &mut work,
            update,
            &[(&"a2", Type::TEXT), (&1i32, Type::INT4)],
        )
        .await
        .expect("the fresh view's fenced statement commits");
    assert_eq!(rows.len(), 1);
    // A statement that fails is reported as itself, and nothing commits.
    let err = fresh
        .fence()
        .unwrap()
        .run(&mut work, "UPDATE items SET id = 1 WHERE id = 2", &[])
        .await
        .expect_err("a duplicate key fails");
    assert!(
        err.to_string().contains("23505"),
        "the statement's own error: {err}"
    );
    b.leave().await.unwrap();
}

/// A join that waits for the group row longer than the member's lease budget (a cold start
/// of hundreds) is not lost the moment it returns: the lease runs from when it was taken.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_join_that_queued_past_its_lease_budget_stays_joined() {
    let db = TestDb::migrated().await;
    let first = Member::join(&db.pg, fast("g", "first")).await.unwrap();
    // Hold the group row as a membership change would, for longer than the TTL (1.5 s).
    let mut holder = db.client().await;
    let tx = holder.transaction().await.unwrap();
    tx.execute(
        "SELECT 1 FROM shardlease.groups WHERE name = 'g' FOR UPDATE",
        &[],
    )
    .await
    .unwrap();
    let pg = db.pg.clone();
    let joining = tokio::spawn(async move { Member::join(&pg, fast("g", "late")).await });
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert!(!joining.is_finished(), "the join waits for the group row");
    tx.rollback().await.unwrap();
    let late = joining
        .await
        .unwrap()
        .expect("the queued join succeeds once the row is free");
    // Lost at once, before the fix: its deadline counted from when the join was sent.
    let lost = late
        .wait_for(Duration::from_millis(1200), |v| !v.is_joined())
        .await;
    assert!(
        lost.is_none(),
        "the late joiner lost its lease: {:?}",
        late.view()
    );
    wait_members(&first, 2, "the late joiner").await;
    late.leave().await.unwrap();
    first.leave().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_fenced_transaction_neither_delays_a_join_nor_commits_after_it() {
    let db = TestDb::migrated().await;
    let admin = db.client().await;
    admin
        .batch_execute("CREATE TABLE log (generation bigint)")
        .await
        .unwrap();
    let a = Member::join(&db.pg, fast("g", "a")).await.unwrap();
    let view = a.view();
    let mut work = db.client().await;
    let tx = view.fence().unwrap().begin(&mut work).await.unwrap();
    tx.execute(
        "INSERT INTO log (generation) VALUES ($1)",
        &[&(view.generation as i64)],
    )
    .await
    .unwrap();
    // The fenced transaction stays open: a joiner does not wait for it.
    let started = Instant::now();
    let b = tokio::time::timeout(WAIT, Member::join(&db.pg, fast("g", "b")))
        .await
        .expect("the join completes while a fenced transaction is open")
        .unwrap();
    let joined_in = started.elapsed();
    println!("join beside an open fenced transaction took {joined_in:?}");
    assert!(
        joined_in < Duration::from_secs(1),
        "the join waited for the open fenced transaction: {joined_in:?}"
    );
    // The write computed under G cannot commit once G+1 has.
    match tx.commit().await {
        Err(Error::Fenced {
            reason: FenceReason::StaleGeneration,
            expected,
            current,
        }) => {
            assert_eq!(expected, view.generation);
            assert_eq!(current, Some(view.generation + 1));
        }
        other => panic!("expected a stale-generation refusal at commit, got {other:?}"),
    }
    let rows: i64 = admin
        .query_one("SELECT count(*) FROM log", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(rows, 0, "nothing of the refused transaction committed");
    // The connection is usable again, and a fresh view commits.
    let fresh = wait_members(&a, 2, "b joined").await;
    let tx = fresh.fence().unwrap().begin(&mut work).await.unwrap();
    tx.execute(
        "INSERT INTO log (generation) VALUES ($1)",
        &[&(fresh.generation as i64)],
    )
    .await
    .unwrap();
    tx.commit().await.unwrap();
    let logged: Vec<i64> = admin
        .query("SELECT generation FROM log", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(logged, [fresh.generation as i64]);
    b.leave().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repeatable_read_fenced_transaction_is_refused_after_a_change() {
    let db = TestDb::migrated().await;
    let admin = db.client().await;
    admin.batch_execute("CREATE TABLE t (n int)").await.unwrap();
    let a = Member::join(&db.pg, fast("g", "a")).await.unwrap();
    let view = a.view();
    let mut work = db.client().await;
    // A repeatable-read snapshot taken before the change must not pass the commit check.
    work.batch_execute("SET default_transaction_isolation = 'repeatable read'")
        .await
        .unwrap();
    let tx = view.fence().unwrap().begin(&mut work).await.unwrap();
    tx.execute("INSERT INTO t VALUES (1)", &[]).await.unwrap();
    let b = Member::join(&db.pg, fast("g", "b")).await.unwrap();
    let err = tx.commit().await.expect_err("refused");
    assert!(err.is_fenced(), "{err:?}");
    let rows: i64 = admin
        .query_one("SELECT count(*) FROM t", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(rows, 0);
    b.leave().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnects_and_rejoins_after_its_session_backend_is_terminated() {
    let db = TestDb::migrated().await;
    let a = Member::join(&db.pg, fast("g", "a")).await.unwrap();
    let b = Member::join(&db.pg, fast("g", "b")).await.unwrap();
    wait_members(&a, 2, "both joined").await;
    let old = b.view();
    let admin = db.client().await;
    let killed: bool = admin
        .query_one(
            "SELECT pg_terminate_backend(backend_pid) FROM shardlease.leases WHERE member_id = 'b'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(killed);
    let lost = b
        .wait_for(WAIT, |v| matches!(v.state, MemberState::Lost { .. }))
        .await;
    assert!(lost.is_some(), "b reports the loss");
    let back = b
        .wait_for(WAIT, |v| v.is_joined() && v.members.len() == 2)
        .await
        .expect("b rejoins");
    let (
        MemberState::Joined {
            incarnation: before,
            ..
        },
        MemberState::Joined {
            incarnation: after,
            slot,
        },
    ) = (old.state, back.state.clone())
    else {
        unreachable!()
    };
    assert!(after > before, "a new incarnation");
    assert_eq!(slot, 1, "it refills its old slot");
    assert!(back.generation > old.generation);
    wait_members(&a, 2, "a sees b back").await;
    b.leave().await.unwrap();
    a.leave().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_view_converges_when_a_notify_never_arrives() {
    let db = TestDb::migrated().await;
    let admin = db.client().await;
    // No NOTIFY at all from now on: neither the trigger's (hand edits) nor the library's own
    // announcements.
    admin
        .batch_execute(
            "ALTER TABLE shardlease.groups DISABLE TRIGGER notify_change; \
             CREATE OR REPLACE FUNCTION shardlease.notify_deltas(p_group text, p_prev bigint, \
               p_deltas jsonb, p_kind text) RETURNS void LANGUAGE sql AS 'SELECT'; \
             CREATE OR REPLACE FUNCTION shardlease.notify_hint(p_group text, p_generation bigint, \
               p_kind text) RETURNS void LANGUAGE sql AS 'SELECT'",
        )
        .await
        .unwrap();
    let hb = Duration::from_millis(300);
    let cfg = |m: &str| {
        MemberConfig::new("g", m)
            .heartbeat(hb)
            .lease_ttl(Duration::from_secs(3))
            .crash_check(hb)
    };
    let a = Member::join(&db.pg, cfg("a")).await.unwrap();
    let b = Member::join(&db.pg, cfg("b")).await.unwrap();
    let start = Instant::now();
    a.wait_for(WAIT, |v| v.members.len() == 2)
        .await
        .expect("a learns of b without a NOTIFY");
    let took = start.elapsed();
    println!("converged without NOTIFY in {took:?} (heartbeat {hb:?})");
    assert!(
        took <= hb * 3,
        "converged within about one heartbeat, took {took:?}"
    );
    b.leave().await.unwrap();
    a.wait_for(WAIT, |v| v.members.len() == 1)
        .await
        .expect("a learns of b's leave without a NOTIFY");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_the_handle_stops_it_and_the_others_reap_it() {
    let db = TestDb::migrated().await;
    let a = Member::join(&db.pg, fast("g", "a")).await.unwrap();
    let b = Member::join(&db.pg, fast("g", "b")).await.unwrap();
    wait_members(&a, 2, "both joined").await;
    drop(b);
    a.wait_for(WAIT, |v| v.members.len() == 1)
        .await
        .expect("the dropped member is reaped");
    a.leave().await.unwrap();
}

#[tokio::test]
async fn reaping_never_terminates_backends_it_cannot_prove() {
    let db = TestDb::migrated().await;
    let admin = db.client().await;
    let bystander = db.client().await;
    let bystander_pid: i32 = bystander
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    // A lease that expired and claims the bystander's pid, but whose lock it does not hold.
    admin
        .batch_execute(&format!(
            "INSERT INTO shardlease.groups (name, protocol_version) VALUES ('g', 1); \
             INSERT INTO shardlease.leases (group_name, member_id, slot, incarnation, backend_pid, ttl, expires_at) \
             VALUES ('g', 'ghost', 0, 999, {bystander_pid}, '1s', clock_timestamp() - interval '1s'); \
             UPDATE shardlease.groups SET slot_count = 1"
        ))
        .await
        .unwrap();
    let reaped: Vec<(String, String)> = admin
        .query("SELECT member_id, reason FROM shardlease.reap('g')", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(reaped, [("ghost".to_owned(), "expired".to_owned())]);
    let alive: i32 = bystander
        .query_one("SELECT 1", &[])
        .await
        .expect("bystander survives")
        .get(0);
    assert_eq!(alive, 1);
    let s: i32 = admin
        .query_one("SELECT slot_count FROM shardlease.groups", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(s, 0, "the top slot departed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hand_edited_slot_count_is_an_error_not_a_panic() {
    let db = TestDb::migrated().await;
    let a = Member::join(&db.pg, fast("g", "a")).await.unwrap();
    let b = Member::join(&db.pg, fast("g", "b")).await.unwrap();
    wait_members(&a, 2, "both joined").await;
    let admin = db.client().await;
    // b sits in slot 1: a slot count of 1 contradicts its lease.
    admin
        .batch_execute("UPDATE shardlease.groups SET slot_count = 1, generation = generation + 1")
        .await
        .unwrap();
    let err = Member::join(&db.pg, fast("g", "c"))
        .await
        .expect_err("a joiner cannot compute an assignment from these rows");
    assert!(
        matches!(err, Error::Inconsistent { .. }),
        "expected Inconsistent, got {err:?}"
    );
    assert!(err.to_string().contains("slot"), "{err}");
    // The members keep their last good view and their leases; nothing panicked.
    let fixed_gen: i64 = admin
        .query_one(
            "UPDATE shardlease.groups SET slot_count = 2, generation = generation + 1 RETURNING generation",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    for m in [&a, &b] {
        m.wait_for(WAIT, |v| v.generation == fixed_gen as u64 && v.is_joined())
            .await
            .expect("members adopt the repaired view");
    }
    b.leave().await.unwrap();
    a.leave().await.unwrap();
}

/// Join announcements (V7): a join is announced in its own transaction while the group's
/// credit lasts, so that a lone join, even right after a departure, reaches the members at
/// once; a burst takes the credit (`announce_burst`, 2) and the rest of it waits for the gap
/// (250 ms at 1,000 slots), to be flushed by the checkers. Checked on the rows, not on timing:
/// a join was announced at once when `announced_generation` caught up with `generation` in
/// the join's own transaction.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn joins_are_announced_at_once_until_a_burst_uses_the_credit() {
    let db = TestDb::migrated().await;
    let c = db.client().await;
    let protocol = shardlease::protocol::PROTOCOL_VERSION;
    // Every lease on this one backend: only the rows matter here, not liveness.
    let join = |member: String| {
        let c = &c;
        async move {
            let generation: i64 = c
                .query_one(
                    "SELECT generation FROM shardlease.join('g', $1, '1 hour', '{}', $2)",
                    &[&member, &protocol],
                )
                .await
                .unwrap_or_else(|e| panic!("join {member}: {e}"))
                .get(0);
            // The join has committed, and nothing else runs: the group row as it left it.
            let announced: i64 = c
                .query_one(
                    "SELECT announced_generation FROM shardlease.groups WHERE name = 'g'",
                    &[],
                )
                .await
                .unwrap()
                .get(0);
            generation == announced
        }
    };
    join("first".into()).await;
    // A group of 1,000 slots (a hand edit: only the gap depends on it), its credit full.
    c.batch_execute(
        "UPDATE shardlease.groups SET slot_count = 1000, announce_credit = shardlease.announce_burst(), \
           announce_credit_at = clock_timestamp()",
    )
    .await
    .unwrap();

    // A departure, then a lone join right after it: both announced at once (V6 held the
    // join back for 250 ms, the departure's announcement being that recent).
    let inc: i64 = c
        .query_one(
            "SELECT incarnation FROM shardlease.leases WHERE member_id = 'first'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    c.query_one("SELECT shardlease.evict($1)", &[&inc])
        .await
        .unwrap();
    assert!(
        join("lone".into()).await,
        "a lone join right after a departure was not announced at once"
    );

    // A burst of 12 joins: the credit left after the lone join (announce_burst() - 1), plus
    // one per 250 ms of the burst, is announced at once, and not one join more.
    let burst: f64 = c
        .query_one("SELECT shardlease.announce_burst()", &[])
        .await
        .unwrap()
        .get(0);
    let left = burst as usize - 1;
    let t0 = Instant::now();
    let mut at_once = Vec::new();
    for i in 0..12 {
        at_once.push(join(format!("burst{i}")).await);
    }
    let took = t0.elapsed();
    let refill = (took.as_secs_f64() / 0.25).ceil() as usize;
    assert!(
        at_once[..left].iter().all(|a| *a),
        "a burst: joins announced at once {at_once:?}; the first {left} (the credit left) must be"
    );
    let announced_at_once = at_once.iter().filter(|a| **a).count();
    assert!(
        (left..=left + refill).contains(&announced_at_once),
        "a burst of 12 joins over {took:?}: {announced_at_once} announced at once, expected {left} \
         (the credit left) to {} (plus its refill over the burst)",
        left + refill
    );
    if took < Duration::from_millis(1000) {
        assert!(
            announced_at_once < 12,
            "every join of a 12-join burst over {took:?} was announced at once: no throttle"
        );
    }

    // The queued joins go out with the checkers' flush once the gap has passed.
    eventually(
        WAIT,
        "the checkers' flush to announce the queued joins",
        || async {
            c.query_one("SELECT shardlease.flush_announcements('g')", &[])
                .await
                .unwrap();
            let r = c
            .query_one(
                "SELECT generation = announced_generation FROM shardlease.groups WHERE name = 'g'",
                &[],
            )
            .await
            .unwrap();
            r.get::<_, bool>(0)
        },
    )
    .await;
}
