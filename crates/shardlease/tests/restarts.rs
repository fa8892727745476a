//! Restarts, failovers, zombies and partitions, against a real PostgreSQL: sticky slots
//! (a reaped member gets its slot back, a server restart moves nobody), terminate before
//! delete (a backend that cannot be ended keeps its lease), the client-side lease deadline,
//! and the fencing epoch across a failover that rolls the membership back.

mod common;

use common::{backend_of, lease_live, signal_backend};

use std::time::Duration;

use common::TestDb;
use shardlease::{Error, FenceReason, Member, MemberConfig, MemberState, View};
use shardlease_testkit::{eventually, PrivateServer};

const WAIT: Duration = Duration::from_secs(15);

fn fast(group: &str, member: &str) -> MemberConfig {
    MemberConfig::new(group, member)
        .heartbeat(Duration::from_millis(200))
        .lease_ttl(Duration::from_millis(1500))
        .crash_check(Duration::from_millis(50))
}

async fn wait_view(m: &Member, what: &str, pred: impl FnMut(&View) -> bool) -> View {
    m.wait_for(WAIT, pred).await.unwrap_or_else(|| {
        panic!(
            "{}: timed out after {WAIT:?} waiting for {what}; view {:?}",
            m.member_id(),
            m.view()
        )
    })
}

fn slot_of(m: &Member) -> u32 {
    m.view()
        .my_slot()
        .unwrap_or_else(|| panic!("{} is not joined: {:?}", m.member_id(), m.view()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reaped_member_gets_its_slot_back_and_nobody_else_takes_it() {
    let db = TestDb::migrated().await;
    let a = Member::join(&db.pg, fast("g", "a")).await.unwrap();
    let b = Member::join(&db.pg, fast("g", "b")).await.unwrap();
    let c = Member::join(&db.pg, fast("g", "c")).await.unwrap();
    wait_view(&a, "3 members", |v| v.members.len() == 3).await;
    assert_eq!((slot_of(&a), slot_of(&b), slot_of(&c)), (0, 1, 2));

    // b crashes (its connection closes without a leave): reaped, and slot 1 is kept for it.
    drop(b);
    wait_view(&a, "b reaped", |v| v.members.len() == 2).await;
    let newcomer = Member::join(&db.pg, fast("g", "newcomer")).await.unwrap();
    assert_eq!(
        slot_of(&newcomer),
        3,
        "a newcomer must not take the slot kept for the reaped member b"
    );
    let b = Member::join(&db.pg, fast("g", "b")).await.unwrap();
    assert_eq!(slot_of(&b), 1, "b comes back to its own slot");

    // A graceful leave keeps nothing: the next joiner takes the slot.
    c.leave().await.unwrap();
    wait_view(&a, "c gone", |v| v.member_in(2).is_none()).await;
    let d = Member::join(&db.pg, fast("g", "d")).await.unwrap();
    assert_eq!(slot_of(&d), 2, "a slot left gracefully is free at once");

    // A reservation lapses after twice the TTL: then the slot is anyone's.
    drop(newcomer);
    wait_view(&a, "newcomer reaped", |v| v.member_in(3).is_none()).await;
    let check = db.client().await;
    eventually(WAIT, "the reservation of slot 3 to lapse", || async {
        check
            .query_one(
                "SELECT NOT EXISTS (SELECT 1 FROM shardlease.slot_reservations \
                 WHERE slot = 3 AND reserved_until > clock_timestamp())",
                &[],
            )
            .await
            .unwrap()
            .get(0)
    })
    .await;
    let e = Member::join(&db.pg, fast("g", "e")).await.unwrap();
    assert_eq!(slot_of(&e), 3, "a lapsed reservation frees the slot");
    for m in [a, b, d, e] {
        m.leave().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_restart_moves_nobody() {
    let server = PrivateServer::start_default().expect("a private PostgreSQL");
    let pg = shardlease::parse_database_url(&server.url()).unwrap();
    let mut c = shardlease::connect_client(&pg, "restart-test")
        .await
        .unwrap();
    shardlease::migrate(&mut c).await.unwrap();
    drop(c);
    let mut members = Vec::new();
    for i in 0..5 {
        let cfg = fast("g", &format!("m{i}")).reconnect_max_backoff(Duration::from_millis(500));
        members.push(Member::join(&pg, cfg).await.unwrap());
    }
    wait_view(&members[0], "5 members", |v| v.members.len() == 5).await;
    let before: Vec<(u32, i64)> = members
        .iter()
        .map(|m| {
            let v = m.view();
            (slot_of(m), v.my_incarnation().unwrap())
        })
        .collect();

    server.restart().expect("restart the server (fast)");
    let restarted = std::time::Instant::now();
    for (m, (slot, incarnation)) in members.iter().zip(&before) {
        let v = wait_view(m, "rejoined with all 5 back", |v| {
            v.my_incarnation().is_some_and(|i| i != *incarnation) && v.members.len() == 5
        })
        .await;
        assert_eq!(
            v.my_slot(),
            Some(*slot),
            "{} came back to another slot after a server restart",
            m.member_id()
        );
    }
    println!(
        "server restart: all 5 members back in their slots {:?} after the restart",
        restarted.elapsed()
    );
    for m in members {
        m.leave().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_lease_whose_backend_cannot_be_ended_is_kept_and_reported() {
    let db = TestDb::migrated().await;
    let zombie = db.client().await;
    zombie
        .query_one(
            "SELECT slot FROM shardlease.join('g', 'zombie', '300 milliseconds', '{}', $1)",
            &[&shardlease::protocol::PROTOCOL_VERSION],
        )
        .await
        .unwrap();
    let reaper = db.client().await;
    // Half of this bounds the wait for a terminated backend to exit.
    reaper
        .batch_execute("SET statement_timeout = '1s'")
        .await
        .unwrap();
    let pid = backend_of(&reaper, "zombie").await;
    eventually(WAIT, "the zombie's lease to expire", || async {
        reaper
            .query_one(
                "SELECT expires_at <= clock_timestamp() FROM shardlease.leases WHERE member_id = 'zombie'",
                &[],
            )
            .await
            .unwrap()
            .get(0)
    })
    .await;

    // A backend that cannot run cannot exit: SIGTERM is not enough within the wait.
    signal_backend(pid, "STOP");
    let reaped = reaper
        .query("SELECT member_id, reason FROM shardlease.reap('g')", &[])
        .await;
    signal_backend(pid, "CONT");
    let reaped: Vec<(String, String)> = reaped
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(
        reaped,
        vec![("zombie".to_owned(), "unkillable".to_owned())],
        "reap reports the lease it could not end the backend of"
    );
    let kept: i64 = reaper
        .query_one(
            "SELECT count(*) FROM shardlease.leases WHERE member_id = 'zombie'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        kept, 1,
        "the lease of a backend that still holds its slot lock is kept"
    );

    // Continued, the backend handles the SIGTERM and exits: now the lease goes.
    eventually(
        WAIT,
        "the zombie's lease to be reaped once its backend is gone",
        || async {
            let rows = reaper
                .query("SELECT reason FROM shardlease.reap('g')", &[])
                .await
                .unwrap();
            rows.iter().any(|r| r.get::<_, &str>(0) == "expired")
        },
    )
    .await;
    let joined: i32 = reaper
        .query_one(
            "SELECT slot FROM shardlease.join('g', 'zombie', '5 seconds', '{}', $1)",
            &[&shardlease::protocol::PROTOCOL_VERSION],
        )
        .await
        .expect("the slot lock is free again: the zombie's id rejoins")
        .get(0);
    assert_eq!(joined, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_cut_off_from_the_database_reports_lost_before_its_lease_expires() {
    let db = TestDb::migrated().await;
    let cfg = MemberConfig::new("g", "cut-off")
        .heartbeat(Duration::from_millis(200))
        .lease_ttl(Duration::from_millis(2000));
    let m = Member::join(&db.pg, cfg).await.unwrap();
    let incarnation = m.view().my_incarnation().unwrap();
    let check = db.client().await;
    let pid = backend_of(&check, "cut-off").await;
    // The session's backend stops answering, its connection stays open: as a partition
    // without a reset, or a hung server, looks to the member.
    signal_backend(pid, "STOP");
    let lost = m
        .wait_for(Duration::from_secs(5), |v| {
            matches!(v.state, MemberState::Lost { .. })
        })
        .await;
    let still_live = lease_live(&check, incarnation).await;
    signal_backend(pid, "CONT");
    let lost = lost.expect("the member reports Lost when it cannot renew, within 5 s");
    assert_eq!(
        still_live,
        Some(true),
        "Lost must come before the lease expires by the database clock: {lost:?}"
    );
    m.leave().await.ok();
}

/// An asynchronous failover rolls the generation and the incarnation sequence back; a fence
/// from before it must never match the new timeline's membership, even where both numbers
/// are issued again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fence_from_before_a_failover_is_refused_on_the_new_timeline() {
    let primary = PrivateServer::start_default().expect("a private PostgreSQL");
    let primary_pg = shardlease::parse_database_url(&primary.url()).unwrap();
    let mut c = shardlease::connect_client(&primary_pg, "failover-test")
        .await
        .unwrap();
    shardlease::migrate(&mut c).await.unwrap();
    // The group exists, empty; the next incarnation's nextval writes a new sequence record
    // (as every 32nd does), which the standby will not have.
    let base = Member::join(&primary_pg, fast("g", "base")).await.unwrap();
    base.leave().await.unwrap();
    c.batch_execute("SELECT setval('shardlease.incarnation_seq', 1000)")
        .await
        .unwrap();
    let standby = primary.standby().expect("a streaming standby");
    let standby_pg = shardlease::parse_database_url(&standby.url()).unwrap();
    let s = shardlease::connect_client(&standby_pg, "failover-test")
        .await
        .unwrap();
    let lsn: String = c
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await
        .unwrap()
        .get(0);
    eventually(WAIT, "the standby to replay the primary's WAL", || async {
        s.query_one(
            "SELECT pg_last_wal_replay_lsn() >= $1::text::pg_lsn",
            &[&lsn],
        )
        .await
        .unwrap()
        .get(0)
    })
    .await;
    drop(s);
    standby.stop().expect("stop the standby");

    // On the old primary only: a joins, and holds a fence.
    let a = Member::join(&primary_pg, fast("g", "a")).await.unwrap();
    let fence = a.view().fence().unwrap();
    primary.crash().expect("crash the primary");
    drop(a);

    // Failover: the standby, which never saw a's join, becomes the primary.
    standby.start().expect("restart the standby");
    standby.promote().expect("promote the standby");
    let b = Member::join(&standby_pg, fast("g", "b")).await.unwrap();
    let vb = b.view();
    assert_eq!(
        (vb.generation, vb.my_slot()),
        (fence.generation(), Some(fence.slot())),
        "the failover issued a's generation and slot again (the test's premise)"
    );
    assert_ne!(
        vb.my_incarnation(),
        Some(fence.incarnation()),
        "an incarnation is never issued twice, even across a failover"
    );
    let mut work = shardlease::connect_client(&standby_pg, "stale-writer")
        .await
        .unwrap();
    match fence.begin(&mut work).await {
        Err(Error::Fenced {
            reason: FenceReason::OtherTimeline,
            ..
        }) => {}
        Err(e) => panic!("a stale fence must be refused as from another timeline, got {e}"),
        Ok(tx) => {
            let committed = tx.commit().await;
            panic!("a fence from before the failover began on the new timeline (commit: {committed:?})");
        }
    }
    b.leave().await.unwrap();
}

/// Members that joined under schema V2 (no timeline in their incarnations) rejoin once when
/// V3 is applied under them, each into its own slot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_rejoin_into_their_slots_when_v3_is_applied_under_them() {
    let db = TestDb::empty().await;
    let admin = db.client().await;
    for sql in [
        include_str!("../../../migrations/shardlease/V1__membership.sql"),
        include_str!("../../../migrations/shardlease/V2__constant_cost.sql"),
    ] {
        admin.batch_execute(sql).await.expect("apply V1 and V2");
    }
    let a = Member::join(&db.pg, fast("g", "a")).await.unwrap();
    let b = Member::join(&db.pg, fast("g", "b")).await.unwrap();
    wait_view(&a, "2 members", |v| v.members.len() == 2).await;
    let slots = (slot_of(&a), slot_of(&b));
    assert_eq!(
        a.view().my_incarnation().map(|i| i >> 40),
        Some(0),
        "a V2 incarnation has no timeline"
    );

    admin
        .batch_execute(include_str!(
            "../../../migrations/shardlease/V3__restarts.sql"
        ))
        .await
        .expect("apply V3 while the members run");
    for m in [&a, &b] {
        wait_view(m, "a rejoin on timeline 1, both members back", |v| {
            v.my_incarnation().is_some_and(|i| i >> 40 == 1) && v.members.len() == 2
        })
        .await;
    }
    assert_eq!(
        (slot_of(&a), slot_of(&b)),
        slots,
        "each member rejoined into its own slot"
    );
    a.leave().await.unwrap();
    b.leave().await.unwrap();
}

/// A read-only server (a standby, a just-demoted primary) refuses the join with SQLSTATE
/// 25006: a transient error, retried, not the end of the member.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_only_server_is_a_transient_error() {
    let db = TestDb::migrated().await;
    let admin = db.client().await;
    admin
        .batch_execute(&format!(
            "ALTER DATABASE {} SET default_transaction_read_only = on",
            db.name
        ))
        .await
        .unwrap();
    let err = match Member::join(&db.pg, fast("g", "a")).await {
        Ok(_) => panic!("a join on a read-only database succeeded"),
        Err(e) => e,
    };
    assert!(
        err.is_transient(),
        "a read-only server must be retried: {err}"
    );
    assert!(
        err.to_string().contains("25006"),
        "the error names the SQLSTATE: {err}"
    );
    admin
        .batch_execute(&format!(
            "ALTER DATABASE {} RESET default_transaction_read_only",
            db.name
        ))
        .await
        .unwrap();
    let a = Member::join(&db.pg, fast("g", "a"))
        .await
        .expect("joins once writable");
    a.leave().await.unwrap();
}
