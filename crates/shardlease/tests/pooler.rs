//! shardlease behind a real PgBouncer (`shardlease_testkit::PgBouncer`): fenced work (member
//! and leader fences) through a transaction pooler works, with many clients on few server
//! connections; a session through one is refused. Every test skips, saying why, when there
//! is no pgbouncer binary.
//!
//! Sessions (`Member::join`) connect directly unless a test says otherwise; work clients go
//! through PgBouncer in transaction mode.

use std::time::Duration;

use shardlease::tokio_postgres::types::Type;
use shardlease::tokio_postgres::{Client, SimpleQueryMessage};
use shardlease::{Error, Member, MemberConfig};
use shardlease_testkit::{PgBouncer, PoolMode, TestDb};

const WAIT: Duration = Duration::from_secs(15);

fn cfg(group: &str, member: &str) -> MemberConfig {
    MemberConfig::new(group, member)
        .heartbeat(Duration::from_millis(200))
        .lease_ttl(Duration::from_millis(1500))
}

/// `members` members joined directly to `db`, each seeing all of them.
async fn join_all(db: &TestDb, group: &str, members: usize) -> Vec<Member> {
    let mut out = Vec::new();
    for i in 0..members {
        out.push(
            Member::join(&db.pg, cfg(group, &format!("m{i}")))
                .await
                .expect("join directly"),
        );
    }
    for m in &out {
        m.wait_for(WAIT, |v| v.members.len() == members && v.is_joined())
            .await
            .unwrap_or_else(|| {
                panic!(
                    "{} did not see all {members} members within {WAIT:?}",
                    m.member_id()
                )
            });
    }
    out
}

/// One fenced increment of `member`'s counter on `client`, retried (at most 20 times) while
/// the view is stale (refused at begin or at commit); returns how many times the fence refused.
async fn fenced_increment(member: &Member, client: &mut Client) -> usize {
    for refused in 0..20 {
        let view = member.view();
        let fence = view.fence().expect("a joined member has a fence");
        let tx = match fence.begin(client).await {
            Ok(tx) => tx,
            Err(e) if e.is_fenced() => {
                // Bounded: the view that refreshes the fence usually comes at once.
                member
                    .wait_for(Duration::from_millis(500), |v| {
                        v.generation != view.generation
                    })
                    .await;
                continue;
            }
            Err(e) => panic!(
                "{}: fenced begin through PgBouncer: {e}",
                member.member_id()
            ),
        };
        let id = member.member_id();
        let updated = tx
            .execute_typed(
                "UPDATE public.counters SET n = n + 1 WHERE member = $1",
                &[(&id, Type::TEXT)],
            )
            .await
            .unwrap_or_else(|e| panic!("{id}: update through PgBouncer: {e}"));
        assert_eq!(updated, 1, "{id}: one counter row");
        match tx.commit().await {
            Ok(()) => return refused,
            // The membership changed while the transaction ran: nothing committed; retry
            // under the next view, as at begin.
            Err(e) if e.is_fenced() => {
                member
                    .wait_for(Duration::from_millis(500), |v| {
                        v.generation != view.generation
                    })
                    .await;
            }
            Err(e) => panic!("{id}: commit through PgBouncer: {e}"),
        }
    }
    panic!(
        "{}: fenced 20 times in a row with a stable group",
        member.member_id()
    );
}

/// Nine work clients of three members share two server connections, while a fourth member
/// joins and leaves again and again, so that fences are refused now and then (I1 hand-offs).
/// Every increment commits exactly once, and nothing fails.
///
/// May fail until the fence is pooler-safe (unnamed statements, transaction-scoped state):
/// run it after merging that change. With the fence of `query_one` (a named statement `sN`),
/// a refused fence rolls back while its `Row` still holds the statement, so the statement's
/// `Close` goes out after the server connection went back to the pool: `sN` stays on that
/// server, and another client whose own counter reaches `sN` there fails with `prepared
/// statement "sN" already exists`.
#[tokio::test]
async fn fenced_transactions_work_through_a_transaction_pooler_with_many_clients() {
    const MEMBERS: usize = 3;
    const CLIENTS_PER_MEMBER: usize = 3;
    const ROUNDS: usize = 100;
    let db = TestDb::migrated().await;
    // Nine work clients share two server connections.
    let Some(bouncer) = PgBouncer::start(PoolMode::Transaction, 2).await else {
        return;
    };
    let admin = db.client().await;
    admin
        .batch_execute("CREATE TABLE public.counters (member text PRIMARY KEY, n int NOT NULL)")
        .await
        .expect("create the counters");
    let members = join_all(&db, "pooled", MEMBERS).await;
    for m in &members {
        admin
            .execute(
                "INSERT INTO public.counters VALUES ($1, 0)",
                &[&m.member_id()],
            )
            .await
            .expect("insert a counter");
    }
    let pooled = bouncer.db_config(&db.name);
    let stop = tokio_util::sync::CancellationToken::new();
    let churn = {
        let (pg, stop) = (db.pg.clone(), stop.clone());
        tokio::spawn(async move {
            let mut changes = 0u32;
            while !stop.is_cancelled() {
                let m = Member::join(&pg, cfg("pooled", "churn"))
                    .await
                    .expect("the churning member joins");
                // Paces the churn; nothing waits on it.
                tokio::time::sleep(Duration::from_millis(100)).await;
                m.leave().await.expect("the churning member leaves");
                tokio::time::sleep(Duration::from_millis(100)).await;
                changes += 2;
            }
            changes
        })
    };
    let mut runs = Vec::new();
    for m in &members {
        for c in 0..CLIENTS_PER_MEMBER {
            let mut client = shardlease::connect_client(&pooled, &format!("work {c}"))
                .await
                .expect("connect through PgBouncer");
            runs.push(async move {
                let mut refused = 0;
                for _ in 0..ROUNDS {
                    refused += fenced_increment(m, &mut client).await;
                }
                refused
            });
        }
    }
    let refused: Vec<usize> = tokio::time::timeout(
        Duration::from_secs(120),
        futures_util::future::join_all(runs),
    )
    .await
    .unwrap_or_else(|_| {
        panic!(
            "the fenced increments through PgBouncer did not finish within 120 s; its log:\n{}",
            bouncer.log()
        )
    });
    stop.cancel();
    let refused = refused.iter().sum::<usize>();
    let changes = churn.await.expect("the churn task");
    eprintln!("{changes} membership changes, {refused} fenced refusals during the run");
    assert!(changes >= 2, "the group changed during the run");
    for m in &members {
        let n: i32 = admin
            .query_one(
                "SELECT n FROM public.counters WHERE member = $1",
                &[&m.member_id()],
            )
            .await
            .expect("read a counter")
            .get(0);
        assert_eq!(
            n as usize,
            CLIENTS_PER_MEMBER * ROUNDS,
            "{}: every fenced increment commits exactly once",
            m.member_id()
        );
    }
    // No named statement was left on the pooled server connections: pin both of them, one
    // per client, and look (simple queries only, which prepare nothing).
    let pinned = [
        shardlease::connect_client(&pooled, "look 1")
            .await
            .expect("connect through PgBouncer"),
        shardlease::connect_client(&pooled, "look 2")
            .await
            .expect("connect through PgBouncer"),
    ];
    let mut left = Vec::new();
    for c in &pinned {
        for m in c
            .simple_query(
                "BEGIN; SELECT pg_backend_pid() || ': ' || name || ' ' || statement \
                 FROM pg_prepared_statements",
            )
            .await
            .expect("list the server connection's prepared statements")
        {
            if let SimpleQueryMessage::Row(r) = m {
                left.push(r.get(0).unwrap_or_default().to_owned());
            }
        }
    }
    assert!(
        left.is_empty(),
        "named statements left on the pooled server connections, where another process's \
         statement of the same name would fail with 'already exists': {left:#?}"
    );
    for m in members {
        m.leave().await.expect("leave");
    }
}

/// I1 through the pooler: a fence of a view that a join made stale is refused, and the
/// current fence then works on the pool's one server connection, from a new client and from
/// the same one. May fail until the fence is pooler-safe, like the test above.
#[tokio::test]
async fn a_stale_fence_is_refused_through_a_transaction_pooler_and_leaves_nothing_behind() {
    let db = TestDb::migrated().await;
    let Some(bouncer) = PgBouncer::start(PoolMode::Transaction, 1).await else {
        return;
    };
    let a = Member::join(&db.pg, cfg("stale", "a"))
        .await
        .expect("join directly");
    let stale = a.view().fence().expect("a fence");
    let b = Member::join(&db.pg, cfg("stale", "b"))
        .await
        .expect("join directly");
    a.wait_for(WAIT, |v| v.members.len() == 2)
        .await
        .expect("a sees b");
    let pooled = bouncer.db_config(&db.name);
    let mut first = shardlease::connect_client(&pooled, "work 1")
        .await
        .expect("connect through PgBouncer");
    match stale.begin(&mut first).await {
        Err(e) if e.is_fenced() => {}
        Err(e) => panic!("expected a Fenced refusal through PgBouncer, got: {e:?}"),
        Ok(_) => panic!("a stale fence began a transaction through PgBouncer"),
    }
    // Both clients share the pool's one server connection.
    let mut second = shardlease::connect_client(&pooled, "work 2")
        .await
        .expect("connect through PgBouncer");
    for (name, client) in [
        ("a new client", &mut second),
        ("the same client", &mut first),
    ] {
        let fresh = a.view().fence().expect("a fence");
        let tx = fresh.begin(client).await.unwrap_or_else(|e| {
            panic!("{name}: a current fence after a refusal on the same server connection: {e:?}")
        });
        tx.commit()
            .await
            .unwrap_or_else(|e| panic!("{name}: commit: {e:?}"));
    }
    a.leave().await.expect("leave");
    b.leave().await.expect("leave");
}

/// `Member::join` refuses a session connection through a transaction pooler, with an error
/// that says why and what to do.
#[tokio::test]
async fn joining_through_a_transaction_pooler_is_refused_with_pooled_session() {
    let db = TestDb::migrated().await;
    let Some(bouncer) = PgBouncer::start(PoolMode::Transaction, 4).await else {
        return;
    };
    let pooled = bouncer.db_config(&db.name);
    let joined = tokio::time::timeout(WAIT, Member::join(&pooled, cfg("pooled", "m")))
        .await
        .unwrap_or_else(|_| panic!("Member::join through PgBouncer took more than {WAIT:?}"));
    match joined {
        Err(e @ Error::PooledSession { .. }) => {
            assert!(!e.is_transient(), "a pooled session is not transient: {e}");
            let message = e.to_string();
            let target = shardlease::describe_target(&pooled);
            for needle in [
                format!("the session connection to {target} goes through a transaction pooler"),
                "between transactions".into(),
                "DATABASE_URL".into(),
                "WORK_DATABASE_URL".into(),
            ] {
                assert!(
                    message.contains(&needle),
                    "{needle:?} missing from: {message}"
                );
            }
        }
        Err(e) => panic!("expected Error::PooledSession, got: {e}"),
        Ok(member) => {
            let view = member.view();
            drop(member);
            panic!(
                "Member::join succeeded through PgBouncer in transaction mode (slot {:?}); it \
                 must fail with Error::PooledSession",
                view.my_slot()
            );
        }
    }
    // Nothing joined: the group has no lease.
    let leases: i64 = db
        .client()
        .await
        .query_one("SELECT count(*) FROM shardlease.leases", &[])
        .await
        .expect("count leases")
        .get(0);
    assert_eq!(leases, 0, "a refused join leaves no lease");
}

/// A session-mode pool keeps one server connection per client: joining through it works.
#[tokio::test]
async fn joining_through_a_session_pool_works() {
    let db = TestDb::migrated().await;
    let Some(bouncer) = PgBouncer::start(PoolMode::Session, 4).await else {
        return;
    };
    let member = Member::join(&bouncer.db_config(&db.name), cfg("session", "m"))
        .await
        .expect("join through a session pool");
    assert!(member.view().is_joined());
    member.leave().await.expect("leave");
}

/// The leader fence through a transaction pooler: the leader's transaction commits, on the
/// pool's one server connection shared with a follower's client; once the leader is deposed
/// (its session ends, its successor's watcher reaps it), its open transaction is refused at
/// commit and leaves nothing behind, and the new leader's commits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_transaction_through_a_transaction_pooler_commits_only_while_leading() {
    use shardlease::{FenceReason, Leader, LeaderConfig};
    let db = TestDb::migrated().await;
    let Some(bouncer) = PgBouncer::start(PoolMode::Transaction, 1).await else {
        return;
    };
    let admin = db.client().await;
    admin
        .batch_execute("CREATE TABLE public.decisions (id serial PRIMARY KEY, by text NOT NULL)")
        .await
        .expect("create the table");
    let leader_cfg = |m: &str| {
        LeaderConfig::new("pooled-leader", m)
            .heartbeat(Duration::from_secs(5))
            .lease_ttl(Duration::from_secs(30))
    };
    let a = Leader::join(&db.pg, leader_cfg("a"))
        .await
        .expect("join directly");
    let b = Leader::join(&db.pg, leader_cfg("b"))
        .await
        .expect("join directly");
    b.wait_for(
        WAIT,
        |e| matches!(&e.leadership, shardlease::Leadership::Following { leader } if leader == "a"),
    )
    .await
    .expect("b follows a");
    let pooled = bouncer.db_config(&db.name);
    let mut work_a = shardlease::connect_client(&pooled, "work a")
        .await
        .expect("connect through PgBouncer");
    let mut work_b = shardlease::connect_client(&pooled, "work b")
        .await
        .expect("connect through PgBouncer");
    let fence = a.fence().expect("a leads");
    let tx = fence
        .begin(&mut work_a)
        .await
        .expect("begin through PgBouncer");
    tx.execute_typed(
        "INSERT INTO public.decisions (by) VALUES ($1)",
        &[(&"a", Type::TEXT)],
    )
    .await
    .expect("insert through PgBouncer");
    tx.commit()
        .await
        .expect("the leader commits through PgBouncer");

    // Depose a while its next transaction is open.
    let tx = fence
        .begin(&mut work_a)
        .await
        .expect("begin through PgBouncer");
    tx.execute_typed(
        "INSERT INTO public.decisions (by) VALUES ($1)",
        &[(&"a, deposed", Type::TEXT)],
    )
    .await
    .expect("insert through PgBouncer");
    admin
        .execute(
            "SELECT pg_terminate_backend(backend_pid, 5000) FROM shardlease.leases WHERE member_id = 'a'",
            &[],
        )
        .await
        .expect("end a's session");
    b.wait_for(WAIT, |e| e.leadership.is_leading())
        .await
        .expect("b leads");
    match tx.commit().await {
        Err(Error::Fenced { reason, .. }) => assert_eq!(reason, FenceReason::LeaseGone),
        other => panic!("the deposed leader's commit through PgBouncer: {other:?}"),
    }
    let tx = b
        .fence()
        .expect("b leads")
        .begin(&mut work_b)
        .await
        .expect("the new leader begins through PgBouncer");
    tx.execute_typed(
        "INSERT INTO public.decisions (by) VALUES ($1)",
        &[(&"b", Type::TEXT)],
    )
    .await
    .expect("insert through PgBouncer");
    tx.commit().await.expect("the new leader commits");
    let rows: Vec<String> = admin
        .query("SELECT by FROM public.decisions ORDER BY id", &[])
        .await
        .expect("read")
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(rows, ["a", "b"]);
    a.resign().await.expect("resign");
    b.resign().await.expect("resign");
}
