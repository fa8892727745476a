//! Least-privilege roles against the real server (`shardlease::roles::grant`): members do
//! their work with their grants alone, inspectors only read, neither evicts anyone, and the
//! reaper ends only backends proven to be a dead member's. Each test creates its roles
//! (login, not superuser, owner of nothing) and drops them at the end.

use std::time::Duration;

use shardlease::roles::{self, RoleKind};
use shardlease::tokio_postgres::Client;
use shardlease::{Error, Member, MemberConfig};
use shardlease_testkit::{eventually, TestDb, TestRole};

/// A role of `kind` for `db`, granted by the owner (the test's superuser).
async fn granted(db: &TestDb, kind: RoleKind) -> TestRole {
    let role = TestRole::create(db, &kind.to_string()).await;
    let mut c = db.client().await;
    let tx = c.transaction().await.expect("begin");
    let grants = roles::grant(&tx, &role.name, kind)
        .await
        .unwrap_or_else(|e| panic!("grant {kind} role {}: {e}", role.name));
    tx.commit().await.expect("commit the grants");
    assert!(
        grants.warnings.is_empty(),
        "no warnings for a plain login role: {:?}",
        grants.warnings
    );
    role
}

fn fast(group: &str, member: &str) -> MemberConfig {
    MemberConfig::new(group, member)
        .heartbeat(Duration::from_millis(200))
        .lease_ttl(Duration::from_secs(2))
        .crash_check(Duration::from_millis(50))
}

/// `sql` fails with SQLSTATE 42501 (insufficient privilege); returns the message.
async fn refused(c: &Client, who: &str, sql: &str) -> String {
    match c.batch_execute(sql).await {
        Ok(()) => panic!("{who} may run {sql:?}, but must be refused"),
        Err(e) => {
            let db = e
                .as_db_error()
                .unwrap_or_else(|| panic!("{who}: {sql:?} failed without a server error: {e}"));
            assert_eq!(
                db.code().code(),
                "42501",
                "{who}: {sql:?} must be refused for lack of privilege, got {}: {}",
                db.code().code(),
                db.message()
            );
            db.message().to_owned()
        }
    }
}

async fn pid(c: &Client) -> i32 {
    c.query_one("SELECT pg_backend_pid()", &[])
        .await
        .expect("pg_backend_pid")
        .get(0)
}

/// The pid of the session backend of `member` in `group`.
async fn lease_pid(c: &Client, group: &str, member: &str) -> (i32, i64) {
    let r = c
        .query_one(
            "SELECT backend_pid, incarnation FROM shardlease.leases WHERE group_name = $1 AND member_id = $2",
            &[&group, &member],
        )
        .await
        .unwrap_or_else(|e| panic!("the lease of {group}/{member}: {e}"));
    (r.get(0), r.get(1))
}

#[tokio::test]
async fn only_the_key_hashes_are_public_and_the_members_functions_run_as_their_owner() {
    let db = TestDb::migrated().await;
    let c = db.client().await;
    let public: Vec<String> = c
        .query(
            "SELECT p.proname::text FROM pg_proc p, \
                    aclexplode(coalesce(p.proacl, acldefault('f', p.proowner))) a \
              WHERE p.pronamespace = 'shardlease'::regnamespace \
                AND a.grantee = 0 AND a.privilege_type = 'EXECUTE' ORDER BY 1",
            &[],
        )
        .await
        .expect("read the function ACLs")
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(
        public,
        [
            "int_hash",
            "key_hash_status",
            "shard_of",
            "str_hash",
            "str_key",
            "uuid_hash",
            "uuid_key"
        ],
        "only the pure key hashes and key_hash_status may be executable by PUBLIC (a new function needs REVOKE EXECUTE ... FROM PUBLIC)"
    );
    let definers: Vec<(String, Vec<String>)> = c
        .query(
            "SELECT p.proname::text, coalesce(p.proconfig, '{}') FROM pg_proc p \
              WHERE p.pronamespace = 'shardlease'::regnamespace AND p.prosecdef ORDER BY 1",
            &[],
        )
        .await
        .expect("read the SECURITY DEFINER functions")
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let mut want: Vec<&str> = roles::MEMBER_FUNCTIONS.to_vec();
    want.sort_unstable();
    // One name per function: needs_reap has two overloads (schema versions 1 and 8).
    let mut names: Vec<&str> = definers.iter().map(|(n, _)| n.as_str()).collect();
    names.dedup();
    assert_eq!(
        names, want,
        "exactly the members' functions run with their owner's rights"
    );
    for (name, config) in &definers {
        assert_eq!(
            config,
            &["search_path=pg_catalog, pg_temp".to_owned()],
            "shardlease.{name} runs as its owner, so its search_path must be pinned"
        );
    }
}

#[tokio::test]
async fn a_member_role_joins_fences_reaps_and_leaves_with_its_grants_alone() {
    let db = TestDb::migrated().await;
    let member = granted(&db, RoleKind::Member).await;
    let admin = db.client().await;
    admin
        .batch_execute(&format!(
            "CREATE TABLE public.jobs (id int PRIMARY KEY, owner text); \
             INSERT INTO public.jobs SELECT g, NULL FROM generate_series(1, 10) g; \
             GRANT SELECT, UPDATE (owner) ON public.jobs TO {}",
            member.name
        ))
        .await
        .expect("a user table for the fenced write");

    let a = Member::join(&member.pg, fast("g", "a"))
        .await
        .expect("join as the member role");
    let b = Member::join(&member.pg, fast("g", "b"))
        .await
        .expect("a second member joins as the member role");
    let view = a
        .wait_for(Duration::from_secs(10), |v| v.members.len() == 2)
        .await
        .expect("a sees both members");
    let mut work = member.client().await;
    let tx = view
        .fence()
        .expect("a is joined")
        .begin(&mut work)
        .await
        .expect("a fenced transaction as the member role");
    let n = tx
        .execute("UPDATE public.jobs SET owner = 'a'", &[])
        .await
        .expect("the fenced write");
    tx.commit().await.expect("the fenced commit");
    assert_eq!(n, 10);

    // b crashes (its session connection closes): a reaps it, as the member role.
    drop(b);
    a.wait_for(Duration::from_secs(10), |v| v.members.len() == 1)
        .await
        .expect("a reaps the crashed b");
    let reaped: i64 = admin
        .query_one(
            "SELECT count(*) FROM shardlease.leases WHERE group_name = 'g' AND member_id = 'b'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(reaped, 0, "b's lease is gone");

    // A stale fence is still refused at commit.
    let stale = view.fence().expect("fence of the old view");
    let err = match stale.begin(&mut work).await {
        Err(e) => e,
        Ok(tx) => tx.commit().await.expect_err("a stale view must not commit"),
    };
    assert!(matches!(err, Error::Fenced { .. }), "{err:?}");

    a.leave().await.expect("leave as the member role");
    let left: i64 = admin
        .query_one(
            "SELECT count(*) FROM shardlease.leases WHERE group_name = 'g'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(left, 0, "a's lease is gone after its leave");
}

#[tokio::test]
async fn an_inspector_reads_the_views_and_may_do_nothing_else() {
    let db = TestDb::migrated().await;
    let member = granted(&db, RoleKind::Member).await;
    let inspector = granted(&db, RoleKind::Inspector).await;
    let m = Member::join(&member.pg, fast("g", "m"))
        .await
        .expect("join as the member role");
    let admin = db.client().await;
    let (m_pid, m_inc) = lease_pid(&admin, "g", "m").await;

    let c = inspector.client().await;
    let alive: bool = c
        .query_one(
            "SELECT alive FROM shardlease.members WHERE group_name = 'g' AND member_id = 'm'",
            &[],
        )
        .await
        .expect("an inspector reads shardlease.members")
        .get(0);
    assert!(alive, "the inspector sees the member alive");
    let members: i64 = c
        .query_one(
            "SELECT alive_members FROM shardlease.group_status WHERE group_name = 'g'",
            &[],
        )
        .await
        .expect("an inspector reads shardlease.group_status")
        .get(0);
    assert_eq!(members, 1);

    let who = format!("inspector {}", inspector.name);
    refused(&c, &who, "DELETE FROM shardlease.leases").await;
    refused(&c, &who, "SELECT * FROM shardlease.reap('g')").await;
    refused(&c, &who, "SELECT * FROM shardlease.leases").await;
    refused(
        &c,
        &who,
        "UPDATE shardlease.groups SET generation = generation + 1",
    )
    .await;
    refused(
        &c,
        &who,
        "SELECT * FROM shardlease.join('g', 'intruder', '5 seconds', '{}', 1)",
    )
    .await;
    refused(&c, &who, &format!("SELECT shardlease.leave({m_inc})")).await;
    refused(&c, &who, &format!("SELECT shardlease.evict({m_inc})")).await;
    refused(&c, &who, "SELECT * FROM shardlease.fence_begin('g', 1, 1)").await;
    refused(&c, &who, "SELECT shardlease.terminate_expired('g')").await;
    refused(&c, &who, "SELECT shardlease.needs_reap('g')").await;
    refused(&c, &who, &format!("SELECT pg_terminate_backend({m_pid})")).await;

    let view = m.view();
    assert!(
        view.is_joined(),
        "the member is still joined after the inspector's attempts"
    );
    let (pid_after, inc_after) = lease_pid(&admin, "g", "m").await;
    assert_eq!(
        (pid_after, inc_after),
        (m_pid, m_inc),
        "the member keeps its lease and its session"
    );
    m.leave().await.expect("leave");
}

#[tokio::test]
async fn a_member_evicts_nobody_and_ends_only_backends_proven_to_be_a_dead_members() {
    let db = TestDb::migrated().await;
    let member = granted(&db, RoleKind::Member).await;
    let inspector = granted(&db, RoleKind::Inspector).await;
    let a = Member::join(&member.pg, fast("g", "a"))
        .await
        .expect("join as the member role");
    let admin = db.client().await;
    let (a_pid, a_inc) = lease_pid(&admin, "g", "a").await;

    // A member may not remove another's lease, nor change the tables by hand.
    let m = member.client().await;
    let who = format!("member {}", member.name);
    let msg = refused(&m, &who, &format!("SELECT shardlease.leave({a_inc})")).await;
    assert!(msg.contains("leaves only its own lease"), "{msg}");
    refused(&m, &who, &format!("SELECT shardlease.evict({a_inc})")).await;
    refused(&m, &who, "DELETE FROM shardlease.leases").await;
    refused(
        &m,
        &who,
        &format!("UPDATE shardlease.leases SET expires_at = now() WHERE incarnation = {a_inc}"),
    )
    .await;
    refused(
        &m,
        &who,
        "UPDATE shardlease.groups SET generation = generation + 1",
    )
    .await;
    refused(
        &m,
        &who,
        "INSERT INTO shardlease.leases (group_name, member_id, slot, incarnation, backend_pid, ttl, expires_at) \
         VALUES ('g', 'x', 9, -1, 1, '1s', now())",
    )
    .await;
    refused(&m, &who, "SELECT shardlease.terminate_expired('g')").await;
    refused(
        &m,
        &who,
        "SELECT * FROM shardlease.delete_leases('g', 1, ARRAY[1::bigint], ARRAY['expired'])",
    )
    .await;
    refused(&m, &who, "SELECT * FROM shardlease.reap_locked('g', 1, 1)").await;

    // Sessions that are not members: the owner's (a superuser) and an inspector's; and one
    // that holds a slot lock, as a live member would.
    let superuser = db.client().await;
    let superuser_pid = pid(&superuser).await;
    let insp = inspector.client().await;
    let insp_pid = pid(&insp).await;
    let holder = db.client().await;
    let holder_pid = pid(&holder).await;
    let lock_key: i32 = admin
        .query_one(
            "SELECT lock_key FROM shardlease.groups WHERE name = 'g'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    holder
        .execute("SELECT pg_advisory_lock($1, 4)", &[&lock_key])
        .await
        .expect("take slot 4's lock");

    // PostgreSQL itself refuses a member's direct signal to another role's backend.
    refused(
        &m,
        &who,
        &format!("SELECT pg_terminate_backend({superuser_pid})"),
    )
    .await;
    refused(
        &m,
        &who,
        &format!("SELECT pg_terminate_backend({insp_pid})"),
    )
    .await;

    // Hand-crafted expired leases (as a bad hand edit would leave them) point at the owner's
    // session, the inspector's session and a's own session backend; the last one at the
    // session that holds slot 4's lock, which is proof enough of membership.
    admin
        .batch_execute(&format!(
            "UPDATE shardlease.groups SET slot_count = 5 WHERE name = 'g'; \
             INSERT INTO shardlease.leases (group_name, member_id, slot, incarnation, backend_pid, ttl, expires_at) \
             SELECT 'g', 'crafted-' || s, s, nextval('shardlease.incarnation_seq'), p, '1 second', \
                    clock_timestamp() - interval '1 second' \
               FROM (VALUES (1, {superuser_pid}), (2, {insp_pid}), (3, {a_pid}), (4, {holder_pid})) v(s, p)"
        ))
        .await
        .expect("craft expired leases");

    // The member role reaps them (a's own checks may get there first: they run as the
    // member role too).
    m.query("SELECT * FROM shardlease.reap('g')", &[])
        .await
        .expect("the member role may reap");
    eventually(
        Duration::from_secs(10),
        "the crafted leases to be reaped",
        || async {
            let left: i64 = admin
                .query_one(
                    "SELECT count(*) FROM shardlease.leases WHERE member_id LIKE 'crafted-%'",
                    &[],
                )
                .await
                .unwrap()
                .get(0);
            left == 0
        },
    )
    .await;

    // The proven one was ended; nobody else was.
    eventually(
        Duration::from_secs(10),
        "the backend holding slot 4's lock to be ended",
        || async { holder.query_one("SELECT 1", &[]).await.is_err() },
    )
    .await;
    for (name, c) in [("the owner's", &superuser), ("the inspector's", &insp)] {
        c.query_one("SELECT 1", &[])
            .await
            .unwrap_or_else(|e| panic!("{name} session must survive the reap: {e}"));
    }
    let (pid_after, inc_after) = lease_pid(&admin, "g", "a").await;
    assert_eq!(
        (pid_after, inc_after),
        (a_pid, a_inc),
        "a keeps its session and its lease"
    );
    assert!(a.view().is_joined(), "a is still joined");
    a.leave().await.expect("a leaves its own lease");
}

#[tokio::test]
async fn grant_refuses_superusers_roles_with_the_owners_rights_and_unknown_roles() {
    let db = TestDb::migrated().await;
    let mut c = db.client().await;
    let tx = c.transaction().await.unwrap();
    let err = roles::grant(&tx, "postgres", RoleKind::Member)
        .await
        .expect_err("a superuser is refused");
    assert!(err.to_string().contains("superuser"), "{err}");
    drop(tx);

    let owner_like = TestRole::create(&db, "ownerlike").await;
    c.batch_execute(&format!("GRANT postgres TO {}", owner_like.name))
        .await
        .expect("make a role a member of the owner");
    let tx = c.transaction().await.unwrap();
    let err = roles::grant(&tx, &owner_like.name, RoleKind::Inspector)
        .await
        .expect_err("a role with the owner's rights is refused");
    assert!(
        err.to_string().contains("owner of schema shardlease"),
        "{err}"
    );
    drop(tx);
    c.batch_execute(&format!("REVOKE postgres FROM {}", owner_like.name))
        .await
        .unwrap();

    let tx = c.transaction().await.unwrap();
    let err = roles::grant(&tx, "sl_no_such_role_anywhere", RoleKind::Member)
        .await
        .expect_err("an unknown role is refused");
    assert!(
        matches!(&err, Error::Config(m) if m.contains("does not exist")),
        "{err:?}"
    );
    drop(tx);

    let empty = TestDb::empty().await;
    let mut c = empty.client().await;
    let tx = c.transaction().await.unwrap();
    let err = roles::grant(&tx, &owner_like.name, RoleKind::Member)
        .await
        .expect_err("no schema, no grants");
    assert!(matches!(err, Error::NotMigrated { .. }), "{err:?}");
}

/// `sql` fails with SQLSTATE 44000 (WITH CHECK OPTION violation).
async fn out_of_bounds(c: &Client, sql: &str) {
    match c.batch_execute(sql).await {
        Ok(()) => panic!("{sql:?} must break shardlease.own_lease's check option"),
        Err(e) => assert_eq!(
            e.code().map(|c| c.code()),
            Some("44000"),
            "{sql:?} must fail with 44000 (check option violation): {e:?}"
        ),
    }
}

#[tokio::test]
async fn a_member_renews_only_its_own_live_lease_and_never_past_its_ttl() {
    let db = TestDb::migrated().await;
    let member = granted(&db, RoleKind::Member).await;
    let inspector = granted(&db, RoleKind::Inspector).await;
    let a = Member::join(&member.pg, fast("g", "a"))
        .await
        .expect("join as the member role");
    let admin = db.client().await;
    let (_, a_inc) = lease_pid(&admin, "g", "a").await;

    // Another session of the member role sees no lease of its own, so it renews nothing.
    let m = member.client().await;
    let touched = m
        .execute(
            "UPDATE shardlease.own_lease SET expires_at = clock_timestamp() + ttl",
            &[],
        )
        .await
        .expect("a member role may update shardlease.own_lease");
    assert_eq!(
        touched, 0,
        "a session that holds no lease renews none (a's is not its own)"
    );

    // Its own lease, taken by hand with the protocol's join: renewed within its TTL only.
    let own: i64 = m
        .query_one(
            "SELECT incarnation FROM shardlease.join('h', 'x', '5 seconds', '{}', 2)",
            &[],
        )
        .await
        .expect("join by hand as the member role")
        .get(0);
    let renewed = m
        .query_one(
            "UPDATE shardlease.own_lease SET renewed_at = clock_timestamp(), \
                    expires_at = clock_timestamp() + ttl \
              WHERE incarnation = $1 RETURNING expires_at <= clock_timestamp() + interval '5 seconds'",
            &[&own],
        )
        .await
        .expect("a member renews its own lease through shardlease.own_lease");
    assert!(
        renewed.get::<_, bool>(0),
        "renewed to at most one TTL from now"
    );
    out_of_bounds(
        &m,
        "UPDATE shardlease.own_lease SET expires_at = clock_timestamp() + interval '1 hour'",
    )
    .await;
    out_of_bounds(
        &m,
        "UPDATE shardlease.own_lease SET renewed_at = clock_timestamp() + interval '1 hour'",
    )
    .await;
    out_of_bounds(
        &m,
        "UPDATE shardlease.own_lease SET expires_at = clock_timestamp() - interval '1 second'",
    )
    .await;
    let who = format!("member {}", member.name);
    refused(
        &m,
        &who,
        "UPDATE shardlease.own_lease SET ttl = interval '1 hour'",
    )
    .await;
    refused(&m, &who, "UPDATE shardlease.own_lease SET slot = 7").await;
    refused(&m, &who, "DELETE FROM shardlease.own_lease").await;
    refused(
        &m,
        &who,
        "INSERT INTO shardlease.own_lease (group_name, slot, incarnation, ttl, renewed_at, expires_at) \
         VALUES ('h', 9, -1, '1s', now(), now())",
    )
    .await;
    // An expired lease stays expired: the view no longer shows it.
    admin
        .execute(
            "UPDATE shardlease.leases SET expires_at = clock_timestamp() - interval '1 second' \
              WHERE incarnation = $1",
            &[&own],
        )
        .await
        .expect("expire x's lease");
    let revived = m
        .execute(
            "UPDATE shardlease.own_lease SET expires_at = clock_timestamp() + ttl",
            &[],
        )
        .await
        .expect("update shardlease.own_lease");
    assert_eq!(revived, 0, "an expired lease cannot be renewed");

    let c = inspector.client().await;
    let who = format!("inspector {}", inspector.name);
    refused(
        &c,
        &who,
        "UPDATE shardlease.own_lease SET renewed_at = renewed_at",
    )
    .await;
    refused(&c, &who, "SELECT * FROM shardlease.own_lease").await;

    let (_, inc_after) = lease_pid(&admin, "g", "a").await;
    assert_eq!(inc_after, a_inc, "a keeps its lease throughout");
    a.leave().await.expect("leave");
}

#[tokio::test]
async fn a_member_role_granted_before_schema_9_keeps_its_lease_through_the_heartbeat_function() {
    let db = TestDb::migrated().await;
    let member = granted(&db, RoleKind::Member).await;
    let admin = db.client().await;
    admin
        .batch_execute(&format!(
            "REVOKE ALL ON shardlease.own_lease FROM {}",
            roles::quote_ident(&member.name)
        ))
        .await
        .expect("revoke the renewal view, as before schema version 9");
    let cfg = fast("g", "a");
    let ttl = cfg.lease_ttl;
    let a = Member::join(&member.pg, cfg)
        .await
        .expect("join as the member role");
    let (_, inc) = lease_pid(&admin, "g", "a").await;
    // Renewed well past three TTLs after joining, by the same incarnation: the member fell
    // back to shardlease.heartbeat instead of losing its lease.
    let ttl_ms = ttl.as_millis() as f64;
    eventually(
        ttl * 6,
        "a's lease renewed three TTLs after its join",
        || async {
            let row = admin
                .query_one(
                    "SELECT incarnation, \
                        extract(epoch FROM renewed_at - joined_at)::float8 * 1000 > $1::float8 * 3 \
                   FROM shardlease.leases WHERE group_name = 'g' AND member_id = 'a'",
                    &[&ttl_ms],
                )
                .await
                .expect("read a's lease");
            assert_eq!(
                row.get::<_, i64>(0),
                inc,
                "a lost its lease and rejoined: the fallback to shardlease.heartbeat failed"
            );
            row.get::<_, bool>(1)
        },
    )
    .await;
    assert!(a.view().is_joined(), "a is still joined");
    a.leave().await.expect("leave");
}
