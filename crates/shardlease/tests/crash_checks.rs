//! The checkers' crash check (schema version 8) against a real PostgreSQL: it probes the
//! slot locks only after a session of the database has ended abnormally, by which time the
//! dead member's lock is free; and a member that closes its session without leaving, which
//! PostgreSQL does not count, is still found by the probe every heartbeat.

mod common;

use std::time::{Duration, Instant};

use common::{ChildMember, TestDb};
use shardlease::tokio_postgres::Client;
use shardlease::{Member, MemberConfig, PROTOCOL_VERSION};
use shardlease_testkit::{poll_until, server_at_least};

const WAIT: Duration = Duration::from_secs(10);

/// Not a test: the body of the child process of the kill -9 case.
#[tokio::test]
#[ignore = "run as a child process by the crash tests"]
async fn child_member() {
    common::run_child_member().await;
}

/// `shardlease.needs_reap(group, seen)`: (needs_reap, ended_sessions, probed).
async fn check(c: &Client, seen: Option<i64>) -> (bool, Option<i64>, bool) {
    let row = c
        .query_one(
            "SELECT needs_reap, ended_sessions, probed FROM shardlease.needs_reap('g', $1)",
            &[&seen],
        )
        .await
        .expect("run the crash check");
    (row.get(0), row.get(1), row.get(2))
}

/// Join group `g` as `member` on `c`'s own session, with a long TTL (so that only its lock
/// can tell that it is gone); returns the backend pid.
async fn raw_join(c: &Client, member: &str) -> i32 {
    c.query_one(
        "SELECT j.slot FROM shardlease.join('g', $1, interval '60 s', '{}', $2) j",
        &[&member, &PROTOCOL_VERSION],
    )
    .await
    .expect("join with SQL");
    c.query_one("SELECT pg_backend_pid()", &[])
        .await
        .expect("read the backend pid")
        .get(0)
}

async fn ended_sessions(c: &Client) -> Option<i64> {
    c.query_one("SELECT shardlease.ended_sessions()", &[])
        .await
        .expect("read shardlease.ended_sessions()")
        .get(0)
}

/// Check, with the count of the last clean check, until a check probes; return what it found.
async fn next_probe(c: &Client, seen: i64, what: &str) -> bool {
    poll_until(WAIT, what, || async {
        let (needs_reap, _, probed) = check(c, Some(seen)).await;
        probed.then_some(needs_reap)
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_check_probes_only_after_a_session_ended_and_then_finds_the_dead() {
    let db = TestDb::migrated().await;
    let c = db.client().await;
    if !server_at_least(&c, 150_000).await {
        println!("skipped: before PostgreSQL 15 the count is unknown and every check probes");
        return;
    }

    // Ended with pg_terminate_backend (sessions_killed).
    let victim = db.client().await;
    let pid = raw_join(&victim, "terminated").await;
    let (needs_reap, seen, probed) = check(&c, None).await;
    assert_eq!((needs_reap, probed), (false, true), "a live group, probed");
    let seen = seen.expect("PostgreSQL 15 counts ended sessions");
    assert_eq!(
        check(&c, Some(seen)).await,
        (false, Some(seen), false),
        "nothing ended since: no probe"
    );
    let terminated: bool = c
        .query_one("SELECT pg_terminate_backend($1)", &[&pid])
        .await
        .unwrap()
        .get(0);
    assert!(terminated);
    // Only this test's sessions use its database, and only the victim's ends abnormally: the
    // first check that sees the count move must also find its lock free.
    assert!(
        next_probe(&c, seen, "a check that sees the terminated session").await,
        "the count moved before the terminated member's lock was free"
    );
    let reaped = c
        .query("SELECT member_id FROM shardlease.reap('g')", &[])
        .await
        .unwrap();
    assert_eq!(reaped.len(), 1, "the terminated member is reaped");

    // Killed with SIGKILL: its backend finds the client gone (sessions_abandoned).
    let child = ChildMember::spawn(&db, "g", "killed", 200, 60_000);
    child.expect_line("READY", WAIT);
    let (needs_reap, seen, _) = check(&c, None).await;
    assert!(!needs_reap, "the child's lease is live");
    let seen = seen.unwrap();
    assert!(
        !check(&c, Some(seen)).await.2,
        "nothing ended since: no probe"
    );
    child.signal("KILL");
    assert!(
        next_probe(&c, seen, "a check that sees the killed member's session").await,
        "the count moved before the killed member's lock was free"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_closed_without_leaving_is_found_by_the_probe_every_heartbeat() {
    let db = TestDb::migrated().await;
    let c = db.client().await;
    let heartbeat = Duration::from_millis(200);
    let a = Member::join(
        &db.pg,
        MemberConfig::new("g", "a")
            .heartbeat(heartbeat)
            .lease_ttl(Duration::from_millis(1500))
            .crash_check(Duration::from_millis(50)),
    )
    .await
    .unwrap();
    let quiet = db.client().await;
    raw_join(&quiet, "quiet").await;
    a.wait_for(WAIT, |v| v.members.len() == 2)
        .await
        .expect("a sees the member that joined with SQL");
    let before = ended_sessions(&c).await;

    // Dropping the client sends Terminate: a normal end, which the statistics do not count.
    let closed = Instant::now();
    drop(quiet);
    a.wait_for(WAIT, |v| v.members.len() == 1)
        .await
        .expect("the member whose session closed is reaped");
    let latency = closed.elapsed();
    println!("session closed without leaving -> reaped: {latency:?}");
    assert_eq!(
        ended_sessions(&c).await,
        before,
        "a normal close is not counted: the periodic probe found it"
    );
    // The lease had 60 s left: well under that proves the lock probe, not the expiry.
    assert!(
        latency < heartbeat * 10,
        "a closed session was found after {latency:?}, more than a few heartbeats"
    );
    a.leave().await.unwrap();
}
