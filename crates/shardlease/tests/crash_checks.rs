//! The checkers' crash check against a real PostgreSQL: it probes the slot locks only after a
//! session of the database has ended abnormally, by which time the dead member's lock is free
//! (schema version 8); a member that closes its session without leaving, which PostgreSQL does
//! not count, is still found by the probe every heartbeat; and it looks at the expiries only
//! when asked, saying when the earliest comes due, which a checker uses to find a hung member
//! within a check of its expiry although its probe comes only once per heartbeat (version 10).

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

/// `shardlease.needs_reap(group, seen, look)`: (needs_reap, probed, looked, next_expiry_ms).
async fn scheduled_check(
    c: &Client,
    seen: Option<i64>,
    look: bool,
) -> (bool, bool, bool, Option<i64>) {
    let row = c
        .query_one(
            "SELECT needs_reap, probed, looked, next_expiry_ms \
               FROM shardlease.needs_reap('g', $1, $2)",
            &[&seen, &look],
        )
        .await
        .expect("run the scheduled crash check");
    (row.get(0), row.get(1), row.get(2), row.get(3))
}

/// Join group `g` as `member` on `c`'s own session, with a long TTL (so that only its lock
/// can tell that it is gone); returns the backend pid.
async fn raw_join(c: &Client, member: &str) -> i32 {
    raw_join_for(c, member, "60 s").await
}

/// Join group `g` as `member` on `c`'s own session with lease TTL `ttl` (an interval);
/// returns the backend pid.
async fn raw_join_for(c: &Client, member: &str, ttl: &str) -> i32 {
    c.query_one(
        "SELECT j.slot FROM shardlease.join('g', $1, $2::text::interval, '{}', $3) j",
        &[&member, &ttl, &PROTOCOL_VERSION],
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_check_looks_at_the_expiries_only_when_asked_and_says_when_the_next_is_due() {
    let db = TestDb::migrated().await;
    let c = db.client().await;
    let member = db.client().await;
    let pid = raw_join(&member, "m").await;
    let seen = ended_sessions(&c).await;
    let (_, probed, ..) = scheduled_check(&c, seen, false).await;
    if probed {
        println!(
            "skipped: before PostgreSQL 15 the count is unknown and every check probes and looks"
        );
        return;
    }

    assert_eq!(
        scheduled_check(&c, seen, false).await,
        (false, false, false, None),
        "not asked, nothing ended: neither a look nor a probe"
    );
    let (needs_reap, _, looked, next) = scheduled_check(&c, seen, true).await;
    assert!(looked && !needs_reap, "asked: a look, and a live lease");
    let next = next.expect("the member's lease comes due some time");
    assert!(
        (55_000..=60_000).contains(&next),
        "the 60 s lease joined just now comes due in {next} ms"
    );

    // Expired by hand (no change of generation, no ended session): only a look finds it.
    member
        .batch_execute("SELECT 1")
        .await
        .expect("the member's session is alive");
    c.execute(
        "UPDATE shardlease.leases SET expires_at = clock_timestamp() - interval '1 second' \
          WHERE backend_pid = $1",
        &[&pid],
    )
    .await
    .unwrap();
    assert_eq!(
        scheduled_check(&c, seen, false).await,
        (false, false, false, None),
        "not asked: the expired lease is not looked for"
    );
    assert_eq!(
        scheduled_check(&c, seen, true).await,
        (true, false, true, Some(0)),
        "asked: the expired lease needs reaping now"
    );

    // An expired lease whose backend could not be ended is reapable one TTL after that.
    c.execute(
        "UPDATE shardlease.leases SET unkillable_since = clock_timestamp() WHERE backend_pid = $1",
        &[&pid],
    )
    .await
    .unwrap();
    let (needs_reap, _, looked, next) = scheduled_check(&c, seen, true).await;
    assert!(
        looked && !needs_reap,
        "unkillable within its TTL: nothing to do yet"
    );
    let next = next.expect("it comes due one TTL after it was found unkillable");
    assert!(
        (55_000..=60_000).contains(&next),
        "due one TTL after it was found unkillable, said {next} ms"
    );

    // The caller's own lease is not its to reap.
    let own = scheduled_check(&member, seen, true).await;
    assert_eq!(
        (own.0, own.2, own.3),
        (false, true, None),
        "a checker alone with its own lease has nothing to look for"
    );
}

/// A member that hangs (its lease is never renewed, its backend and lock live on) is reaped
/// within a crash check or two of its expiry by a checker whose heartbeat, and so its probe
/// of every lock and look at every expiry, comes only every 10 s: the look it scheduled for
/// the lease's expiry finds it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_checker_looks_when_the_earliest_expiry_comes_due() {
    let db = TestDb::migrated().await;
    let heartbeat = Duration::from_secs(10);
    let a = Member::join(
        &db.pg,
        MemberConfig::new("g", "a")
            .heartbeat(heartbeat)
            .lease_ttl(Duration::from_secs(25))
            .crash_check(Duration::from_millis(50)),
    )
    .await
    .unwrap();
    let hung = db.client().await;
    raw_join_for(&hung, "hung", "1500 milliseconds").await;
    a.wait_for(WAIT, |v| v.members.len() == 2)
        .await
        .expect("a sees the member that joined with SQL");
    let c = db.client().await;
    let expires_at: std::time::SystemTime = c
        .query_one(
            "SELECT expires_at FROM shardlease.leases WHERE member_id = 'hung'",
            &[],
        )
        .await
        .unwrap()
        .get(0);

    // Long enough for the probe every heartbeat, so that a late find fails the bound below.
    a.wait_for(heartbeat * 2, |v| v.members.len() == 1)
        .await
        .expect("the hung member is reaped");
    let now: std::time::SystemTime = c
        .query_one("SELECT clock_timestamp()", &[])
        .await
        .unwrap()
        .get(0);
    let late = now
        .duration_since(expires_at)
        .expect("reaped after its lease expired, by the database clock");
    println!("hung member reaped {late:?} after its lease expired (checks every 50 ms, heartbeat {heartbeat:?})");
    assert!(
        late < Duration::from_secs(2),
        "reaped {late:?} after its expiry: the checker waited for its probe every {heartbeat:?} instead of looking when the lease came due"
    );
    a.leave().await.unwrap();
}
