//! `shardlease-worker grant` and the worker under least-privilege roles, with real processes:
//! a worker group runs as a member role (login, not superuser, owner of nothing) through
//! joins, ticks, a kill -9 and a hang; `grant` gives exactly the documented privileges, and
//! again when run twice; members and inspectors create, alter and drop nothing; an inspector
//! reads `status`; and a database of the old layout (the worker's objects in the library's
//! schema) upgrades. Each test creates its roles and drops them at the end.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::*;
use shardlease::tokio_postgres::Client;
use shardlease_testkit::TestRole;

/// A fresh database, migrated and seeded with `items` by the binary, as its owner.
async fn seeded(items: u64) -> TestDb {
    let db = TestDb::empty().await;
    let out = db.cli(&["migrate"]).await;
    assert!(out.success(), "migrate: {out}");
    let out = db.cli(&["seed", "--count", &items.to_string()]).await;
    assert!(out.success(), "seed: {out}");
    db
}

/// `shardlease-worker grant` with `args`, as the owner; must succeed.
async fn grant(db: &TestDb, args: &[&str]) -> String {
    let mut all = vec!["grant"];
    all.extend_from_slice(args);
    let out = db.cli(&all).await;
    assert!(out.success(), "grant {args:?}: {out}");
    out.stdout
}

/// A member role and an inspector role, both granted with `shardlease-worker grant`.
async fn granted_roles(db: &TestDb) -> (TestRole, TestRole) {
    let member = TestRole::create(db, "member").await;
    let inspector = TestRole::create(db, "inspector").await;
    grant(
        db,
        &[
            "--member-role",
            &member.name,
            "--inspector-role",
            &inspector.name,
        ],
    )
    .await;
    (member, inspector)
}

/// Every privilege `role` holds in the database, one line each, sorted.
async fn privileges(c: &Client, role: &str) -> Vec<String> {
    let mut lines: Vec<String> = c
        .query(
        "SELECT 'schema ' || n.nspname || ' ' || a.privilege_type \
           FROM pg_namespace n, aclexplode(n.nspacl) a WHERE a.grantee = $1::text::regrole \
         UNION ALL \
         SELECT 'relation ' || n.nspname || '.' || c.relname || ' ' || a.privilege_type \
           FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace, aclexplode(c.relacl) a \
          WHERE a.grantee = $1::text::regrole \
         UNION ALL \
         SELECT 'column ' || n.nspname || '.' || c.relname || '.' || t.attname || ' ' || a.privilege_type \
           FROM pg_attribute t JOIN pg_class c ON c.oid = t.attrelid \
           JOIN pg_namespace n ON n.oid = c.relnamespace, aclexplode(t.attacl) a \
          WHERE a.grantee = $1::text::regrole \
         UNION ALL \
         SELECT 'function ' || n.nspname || '.' || p.proname || '(' || oidvectortypes(p.proargtypes) \
                || ') ' || a.privilege_type \
           FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace, aclexplode(p.proacl) a \
          WHERE a.grantee = $1::text::regrole",
        &[&role],
    )
    .await
    .expect("read the role's privileges")
    .iter()
    .map(|r| r.get(0))
    .collect();
    lines.sort();
    lines
}

/// What an inspector holds, exactly.
const INSPECTOR: &[&str] = &[
    "function shardlease.leader_incarnation(text) EXECUTE",
    "function shardlease.slot_locks(integer) EXECUTE",
    "relation public.work_items SELECT",
    "relation shardlease.group_status SELECT",
    "relation shardlease.leaders SELECT",
    "relation shardlease.members SELECT",
    "relation shardlease.schema_history SELECT",
    "relation shardlease_worker.schema_history SELECT",
    "relation shardlease_worker.worker_items SELECT",
    "schema public USAGE",
    "schema shardlease USAGE",
    "schema shardlease_worker USAGE",
];

/// What a member holds beyond an inspector's, exactly.
const MEMBER_EXTRA: &[&str] = &[
    "column public.work_items.currentworker UPDATE",
    "column public.work_items.updated_at UPDATE",
    "column public.work_items.value UPDATE",
    "column shardlease.own_lease.expires_at UPDATE",
    "column shardlease.own_lease.renewed_at UPDATE",
    "function shardlease.await_departure(text, bigint, integer, integer) EXECUTE",
    "function shardlease.fence_begin(text, bigint, bigint) EXECUTE",
    "function shardlease.fence_commit(bigint, bigint, integer) EXECUTE",
    "function shardlease.fence_guard(text, bigint, bigint) EXECUTE",
    "function shardlease.flush_announcements(text) EXECUTE",
    "function shardlease.heartbeat(bigint, integer[], interval) EXECUTE",
    "function shardlease.incarnation_timeline(bigint) EXECUTE",
    "function shardlease.join(text, text, interval, jsonb, integer) EXECUTE",
    "function shardlease.leader_fence_begin(text, bigint) EXECUTE",
    "function shardlease.leader_fence_commit(bigint, integer) EXECUTE",
    "function shardlease.lease_state(bigint) EXECUTE",
    "function shardlease.leave(bigint) EXECUTE",
    "function shardlease.needs_reap(text) EXECUTE",
    "function shardlease.needs_reap(text, bigint) EXECUTE",
    "function shardlease.needs_reap(text, bigint, boolean) EXECUTE",
    "function shardlease.reap(text) EXECUTE",
    "function shardlease.reported_generation(bigint, bigint, timestamp with time zone) EXECUTE",
    "function shardlease.timeline() EXECUTE",
    "relation shardlease.groups SELECT",
    "relation shardlease.leases SELECT",
    "relation shardlease.own_lease SELECT",
];

fn sorted(lists: &[&[&str]]) -> Vec<String> {
    let set: BTreeSet<String> = lists
        .iter()
        .flat_map(|l| l.iter().map(|s| s.to_string()))
        .collect();
    set.into_iter().collect()
}

/// `sql` fails with SQLSTATE 42501 (insufficient privilege).
async fn refused(c: &Client, who: &str, sql: &str) {
    match c.batch_execute(sql).await {
        Ok(()) => panic!("{who} may run {sql:?}, but must be refused"),
        Err(e) => {
            let code = e.code().map(|c| c.code().to_owned());
            assert_eq!(
                code.as_deref(),
                Some("42501"),
                "{who}: {sql:?} must be refused for lack of privilege, got {e}"
            );
        }
    }
}

/// Session backends of the group's workers, with their roles.
async fn worker_sessions(c: &Client) -> Vec<(i32, String)> {
    c.query(
        "SELECT pid, usename::text FROM pg_stat_activity WHERE application_name LIKE 'shardlease#%' ORDER BY pid",
        &[],
    )
    .await
    .expect("read pg_stat_activity")
    .iter()
    .map(|r| (r.get(0), r.get(1)))
    .collect()
}

#[tokio::test]
async fn a_worker_group_runs_as_the_member_role_through_a_kill_9_and_a_hang() {
    let db = seeded(300).await;
    let (member, inspector) = granted_roles(&db).await;
    let c = db.client().await;

    let mut ws: Vec<Worker> = ["w1", "w2", "w3"]
        .iter()
        .map(|n| Worker::spawn(&member.url, n, RUN_ARGS))
        .collect();
    wait_settled(&c, &["w1", "w2", "w3"], Duration::from_secs(30)).await;
    let sessions = worker_sessions(&c).await;
    assert_eq!(sessions.len(), 3, "one session per worker: {sessions:?}");
    assert!(
        sessions.iter().all(|(_, role)| role == &member.name),
        "every worker session runs as {}: {sessions:?}",
        member.name
    );
    let ticked: Vec<String> = c
        .query(
            "SELECT DISTINCT currentworker FROM public.work_items ORDER BY 1",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(
        ticked,
        ["w1", "w2", "w3"],
        "every worker's fenced ticks committed"
    );

    // kill -9: a survivor reaps w2, as the member role.
    ws[1].kill9();
    wait_settled(&c, &["w1", "w3"], Duration::from_secs(15)).await;

    // A hang past the TTL: a survivor reaps w3 and ends its session backend, as the member role
    // (the functions run with the owner's rights, and end only a proven member's backend).
    let w3_session: i32 = c
        .query_one(
            "SELECT backend_pid FROM shardlease.leases WHERE group_name = $1 AND member_id = 'w3'",
            &[&GROUP],
        )
        .await
        .expect("w3's lease")
        .get(0);
    ws[2].signal("STOP");
    wait_settled(&c, &["w1"], Duration::from_secs_f64(TTL + 15.0)).await;
    eventually(
        Duration::from_secs(10),
        "the reaper to end the stopped w3's session backend",
        || async {
            c.query_opt(
                "SELECT 1 FROM pg_stat_activity WHERE pid = $1",
                &[&w3_session],
            )
            .await
            .expect("read pg_stat_activity")
            .is_none()
        },
    )
    .await;
    ws[2].signal("CONT");
    wait_settled(&c, &["w1", "w3"], Duration::from_secs(30)).await;

    // The inspector reads status.
    let out = cli(&inspector.url, &["status"]).await;
    assert!(out.success(), "status as the inspector: {out}");
    assert!(
        out.stdout.contains("2 members (2 alive)"),
        "status as the inspector: {out}"
    );
    for w in &ws {
        if w.name != "w2" {
            w.signal("TERM");
        }
    }
    for w in ws.iter_mut() {
        if w.name != "w2" {
            let status = w.wait_exit(Duration::from_secs(10)).await;
            assert!(
                status.success(),
                "{} exits 0 after SIGTERM: {status}",
                w.name
            );
        }
    }
    let left: i64 = c
        .query_one("SELECT count(*) FROM shardlease.leases", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(left, 0, "the members left as the member role");
}

#[tokio::test]
async fn grant_gives_exactly_what_each_role_needs_and_is_idempotent() {
    let db = seeded(10).await;
    let c = db.client().await;
    let member = TestRole::create(&db, "member").await;
    let inspector = TestRole::create(&db, "inspector").await;
    // Leftovers of hand grants, which grant takes back.
    c.batch_execute(&format!(
        "GRANT ALL ON shardlease.leases, shardlease.groups TO {m}; \
         GRANT EXECUTE ON FUNCTION shardlease.evict(bigint) TO {m}; \
         GRANT INSERT, DELETE ON public.work_items TO {m}; \
         GRANT CREATE ON SCHEMA shardlease_worker TO {m}; \
         GRANT UPDATE ON public.work_items TO {i}",
        m = member.name,
        i = inspector.name
    ))
    .await
    .expect("hand grants");

    let args = [
        "--member-role",
        member.name.as_str(),
        "--inspector-role",
        inspector.name.as_str(),
    ];
    let first = grant(&db, &args).await;
    let member_privileges = privileges(&c, &member.name).await;
    let inspector_privileges = privileges(&c, &inspector.name).await;
    assert_eq!(
        member_privileges,
        sorted(&[INSPECTOR, MEMBER_EXTRA]),
        "the member's privileges"
    );
    assert_eq!(
        inspector_privileges,
        sorted(&[INSPECTOR]),
        "the inspector's privileges"
    );
    // It says what it granted, per role.
    let (member_part, inspector_part) = first
        .split_once(&format!("inspector role {}", inspector.name))
        .unwrap_or_else(|| panic!("grant reports the inspector role: {first}"));
    for line in [
        "UPDATE (value, currentworker, updated_at) ON public.work_items",
        "EXECUTE ON FUNCTION shardlease.reap(text)",
        "SELECT ON shardlease.leases",
    ] {
        assert!(
            member_part.contains(line),
            "the member's part lists {line}: {first}"
        );
        assert!(
            !inspector_part.contains(line),
            "the inspector's part does not list {line}: {first}"
        );
    }
    assert!(
        inspector_part.contains("SELECT ON shardlease_worker.worker_items"),
        "{first}"
    );

    let second = grant(&db, &args).await;
    assert_eq!(first, second, "a second run grants the same");
    assert_eq!(privileges(&c, &member.name).await, member_privileges);
    assert_eq!(privileges(&c, &inspector.name).await, inspector_privileges);

    // A member made an inspector loses what members have.
    grant(&db, &["--inspector-role", &member.name]).await;
    assert_eq!(privileges(&c, &member.name).await, sorted(&[INSPECTOR]));

    // Clear refusals.
    let out = db
        .cli(&[
            "grant",
            "--member-role",
            &member.name,
            "--inspector-role",
            &member.name,
        ])
        .await;
    assert_eq!(out.code(), Some(1), "{out}");
    assert!(out.stderr.contains("must differ"), "{out}");
    let out = db.cli(&["grant", "--member-role", "postgres"]).await;
    assert_eq!(out.code(), Some(1), "{out}");
    assert!(out.stderr.contains("superuser"), "{out}");
    let out = db
        .cli(&["grant", "--member-role", "sl_no_such_role_here"])
        .await;
    assert_eq!(out.code(), Some(1), "{out}");
    assert!(out.stderr.contains("does not exist"), "{out}");
    let out = db.cli(&["grant"]).await;
    assert_eq!(out.code(), Some(2), "{out}");
    assert!(out.stderr.contains("--member-role"), "{out}");

    // migrate grants too, given the roles.
    let out = db.cli(&["migrate", "--member-role", &member.name]).await;
    assert!(out.success(), "{out}");
    assert!(out.stdout.contains("already up to date"), "{out}");
    assert_eq!(privileges(&c, &member.name).await, member_privileges);
}

#[tokio::test]
async fn members_and_inspectors_create_alter_and_drop_nothing_and_write_only_ticks() {
    let db = seeded(10).await;
    let (member, inspector) = granted_roles(&db).await;
    let c = db.client().await;
    let pg15 = shardlease_testkit::server_at_least(&c, 150_000).await;
    let mut ddl = vec![
        "CREATE SCHEMA sl_intruder",
        "CREATE TABLE shardlease.x (i int)",
        "CREATE TABLE shardlease_worker.x (i int)",
        "CREATE VIEW shardlease.v AS SELECT 1",
        "CREATE FUNCTION shardlease.f() RETURNS int LANGUAGE sql AS 'SELECT 1'",
        "CREATE OR REPLACE FUNCTION shardlease.needs_reap(p_group text) RETURNS boolean LANGUAGE sql AS 'SELECT false'",
        "ALTER TABLE shardlease.leases ADD COLUMN x int",
        "ALTER TABLE public.work_items ADD COLUMN x int",
        "ALTER VIEW shardlease.members RENAME TO m2",
        "ALTER VIEW shardlease_worker.worker_items RENAME TO w2",
        "ALTER FUNCTION shardlease.reap(text) SECURITY INVOKER",
        "COMMENT ON TABLE shardlease.leases IS 'x'",
        "CREATE INDEX ON public.work_items (value)",
        "DROP VIEW shardlease_worker.worker_items",
        "DROP TABLE shardlease.leases CASCADE",
        "DROP TABLE public.work_items",
        "DROP FUNCTION shardlease.leave(bigint)",
        "DROP SCHEMA shardlease CASCADE",
        "DROP SCHEMA shardlease_worker CASCADE",
        "TRUNCATE public.work_items",
        "TRUNCATE shardlease.leases",
        "DELETE FROM public.work_items",
        "INSERT INTO public.work_items (value) VALUES (0)",
        "UPDATE public.work_items SET id = gen_random_uuid()",
        "DELETE FROM shardlease.leases",
        "UPDATE shardlease.groups SET slot_count = 0",
        "SELECT shardlease.evict(1)",
    ];
    // PostgreSQL 15 took CREATE on schema public from PUBLIC; older servers make grant warn.
    if pg15 {
        ddl.push("CREATE TABLE public.x (i int)");
    }
    for role in [&member, &inspector] {
        let rc = role.client().await;
        for sql in &ddl {
            refused(&rc, &role.name, sql).await;
        }
    }
    let ic = inspector.client().await;
    refused(
        &ic,
        &inspector.name,
        "UPDATE public.work_items SET value = value + 1",
    )
    .await;
    refused(
        &ic,
        &inspector.name,
        "SELECT * FROM shardlease.reap('work_items')",
    )
    .await;
    refused(&ic, &inspector.name, "SELECT * FROM shardlease.leases").await;

    // What they may do.
    let mc = member.client().await;
    let n = mc
        .execute(
            "UPDATE public.work_items SET value = value + 1, currentworker = 'm', updated_at = now()",
            &[],
        )
        .await
        .expect("a member may tick work_items");
    assert_eq!(n, 10);
    let n: i64 = ic
        .query_one("SELECT count(*) FROM shardlease_worker.worker_items", &[])
        .await
        .expect("an inspector reads the worker's view")
        .get(0);
    assert_eq!(n, 1, "one worker (m) last ticked the items");
    let out = cli(&inspector.url, &["status"]).await;
    assert!(out.success(), "status as the inspector: {out}");
    assert!(out.stdout.contains("no such group yet"), "{out}");
}

#[tokio::test]
async fn a_database_of_the_old_layout_upgrades_to_the_workers_schema() {
    // The layout before the worker's schema V2: its view and history in schema shardlease.
    mod old {
        refinery::embed_migrations!("../../migrations/work_items");
    }
    let db = TestDb::empty().await;
    let mut c = db.client().await;
    shardlease::migrate(&mut c)
        .await
        .expect("the library's schema");
    let mut runner = old::migrations::runner().set_target(refinery::Target::Version(1));
    runner.set_migration_table_name("shardlease.worker_schema_history");
    runner.run_async(&mut c).await.expect("the old layout");
    let exists = |name: &'static str| {
        let c = &c;
        async move {
            c.query_one("SELECT to_regclass($1) IS NOT NULL", &[&name])
                .await
                .unwrap()
                .get::<_, bool>(0)
        }
    };
    assert!(exists("shardlease.worker_items").await);
    assert!(exists("shardlease.worker_schema_history").await);

    let out = db.cli(&["migrate"]).await;
    assert!(out.success(), "migrate from the old layout: {out}");
    assert!(out.stdout.contains("applied V2__own_schema"), "{out}");
    assert!(
        !out.stdout.contains("V1__work_items"),
        "V1 is not applied again: {out}"
    );
    assert!(exists("shardlease_worker.worker_items").await);
    assert!(exists("shardlease_worker.schema_history").await);
    assert!(!exists("shardlease.worker_items").await);
    assert!(!exists("shardlease.worker_schema_history").await);
    let versions: Vec<i32> = c
        .query(
            "SELECT version FROM shardlease_worker.schema_history ORDER BY 1",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(versions, [1, 2, 3, 4, 5], "the history moved with its rows");
    let out = db.cli(&["migrate"]).await;
    assert!(out.stdout.contains("already up to date"), "{out}");
    let out = db.cli(&["seed", "--count", "3"]).await;
    assert!(out.success(), "{out}");
    let out = db.cli(&["status"]).await;
    assert!(out.success(), "{out}");
}
