//! A PostgreSQL restart (fast shutdown) under a group of 5 `shardlease-worker run`
//! processes on 2,000 items, on a private cluster (the test kit's `PrivateServer`): every
//! worker must be back (a live lease) within 10 s of the restart, and fewer than 5% of the
//! items may change owner (I3: a member that comes back within the grace period gets its
//! former slot back). The audit invariants hold across the restart, and every worker exits 0
//! on SIGTERM afterwards.
//!
//! Owners are measured on the worker's own path: the writer of each item's increments over a
//! 2 s window before the restart and after the group has settled again (`quiet_window`).
//!
//! Settings: heartbeat 500 ms, lease TTL 3 s, tick 1 s, crash check 100 ms.

mod common;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use common::*;
use shardlease::tokio_postgres::Client;
use shardlease_testkit::PrivateServer;

const NAMES: [&str; 5] = ["w1", "w2", "w3", "w4", "w5"];
const ITEMS: u64 = 2000;
/// Every worker holds a live lease again within this long of the restart's start.
const BACK_BOUND: Duration = Duration::from_secs(10);
/// The share of items that may change owner across the restart.
const MOVED_BOUND: f64 = 0.05;

async fn connect(url: &str) -> Client {
    let pg = shardlease::parse_database_url(url).expect("the server URL parses");
    poll_until(
        Duration::from_secs(10),
        "a connection to the private server",
        || async { shardlease::connect_client(&pg, "restart-test").await.ok() },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_postgres_restart_brings_every_worker_back_and_moves_almost_nothing() {
    let server = PrivateServer::start_default().expect("start a private PostgreSQL");
    let url = server.url();
    let out = cli(&url, &["migrate"]).await;
    assert!(out.success(), "`shardlease-worker migrate` failed: {out}");
    let out = cli(&url, &["seed", "--count", &ITEMS.to_string()]).await;
    assert!(out.success(), "`shardlease-worker seed` failed: {out}");
    let c = connect(&url).await;
    install_audit(&c).await;

    let mut ws: Vec<Worker> = NAMES
        .iter()
        .map(|n| Worker::spawn(&url, n, RUN_ARGS))
        .collect();
    wait_settled(&c, &NAMES, Duration::from_secs(30)).await;
    let leases_before = leases(&c).await;
    let before = quiet_window(&c, 2.0, "before the restart").await;
    assert_eq!(before.of.len() as u64, ITEMS, "every item has an owner");

    let restart_at = db_now(&c).await;
    let t0 = Instant::now();
    // pg_ctl blocks: off the runtime's threads, so that nothing else stalls meanwhile.
    let server = tokio::task::spawn_blocking(move || {
        server
            .restart()
            .expect("restart the private PostgreSQL (fast)");
        server
    })
    .await
    .expect("the restart thread");
    let up_after = t0.elapsed();
    drop(c);
    let c = connect(&url).await;

    let old: BTreeSet<i64> = leases_before.iter().map(|l| l.incarnation).collect();
    // Bounded at three times the bound, so that a slow return is measured, not just refused.
    let back_after = poll_until(
        BACK_BOUND * 3,
        "all 5 workers to hold live leases again after the restart",
        || async {
            let ls = leases(&c).await;
            let back = NAMES.iter().all(|n| {
                ls.iter()
                    .any(|l| l.member == *n && l.alive && !old.contains(&l.incarnation))
            });
            back.then(|| t0.elapsed())
        },
    )
    .await;
    wait_settled(&c, &NAMES, Duration::from_secs(30)).await;
    let settled_after = t0.elapsed();
    let leases_after = leases(&c).await;
    let after = quiet_window(&c, 2.0, "after the restart").await;

    let moved = before
        .of
        .iter()
        .filter(|(id, w)| after.of.get(*id) != Some(*w))
        .count();
    let share = moved as f64 / before.of.len() as f64;
    let slot_of = |ls: &[Lease], n: &str| ls.iter().find(|l| l.member == n).map(|l| l.slot);
    let slots: Vec<String> = NAMES
        .iter()
        .map(|n| {
            format!(
                "{n} {:?}->{:?}",
                slot_of(&leases_before, n),
                slot_of(&leases_after, n)
            )
        })
        .collect();
    let kept = NAMES
        .iter()
        .filter(|n| slot_of(&leases_before, n) == slot_of(&leases_after, n))
        .count();
    let joined: Vec<f64> = leases_after.iter().map(|l| l.joined_at).collect();
    let spread = joined.iter().cloned().fold(f64::MIN, f64::max)
        - joined.iter().cloned().fold(f64::MAX, f64::min);
    println!(
        "restart: server up again after {:.2} s; all 5 workers back after {:.2} s (bound {BACK_BOUND:?}), settled after {:.2} s; rejoins spread over {:.0} ms",
        up_after.as_secs_f64(),
        back_after.as_secs_f64(),
        settled_after.as_secs_f64(),
        spread * 1e3
    );
    println!(
        "restart: {moved} of {} items changed owner ({:.1}%, bound {:.0}%); {kept} of 5 workers kept their slot: {}",
        before.of.len(),
        share * 100.0,
        MOVED_BOUND * 100.0,
        slots.join(", ")
    );

    // The audit invariants across the restart: no lost or duplicated increment, no two
    // writers of one item under one generation, no increment closer than half a tick. The
    // increments around the restart may be apart by as long as the group took to settle.
    // The excused intervals are those that overlap the outage: the server goes down some
    // time after `restart_at` (a tick may still commit in between), and is up again at about
    // `restart_at + up_after` (pg_ctl polls, so a little before that).
    let excuses: Vec<Excuse> = NAMES
        .iter()
        .map(|n| Excuse {
            victim: n.to_string(),
            event: restart_at,
            until: restart_at + up_after.as_secs_f64(),
            bound: settled_after.as_secs_f64() + TICK + SLACK,
            why: "PostgreSQL restart: the server's downtime, the rejoin, then the next tick",
        })
        .collect();
    check_audit(&c, "PostgreSQL restart", &excuses, &BTreeSet::new()).await;

    for w in &ws {
        w.signal("TERM");
    }
    for w in &mut ws {
        let status = w.wait_exit(Duration::from_secs(10)).await;
        assert_eq!(
            status.code(),
            Some(0),
            "{}: SIGTERM after the restart must exit 0, got {status}",
            w.name
        );
        let panicked: Vec<String> = w
            .stdout()
            .into_iter()
            .chain(w.stderr())
            .filter(|l| l.contains("panicked"))
            .collect();
        assert!(panicked.is_empty(), "{}: {panicked:?}", w.name);
    }

    assert!(
        back_after <= BACK_BOUND,
        "all 5 workers were back only {:.2} s after the restart began (bound {BACK_BOUND:?})",
        back_after.as_secs_f64()
    );
    assert!(
        share < MOVED_BOUND,
        "I3: a PostgreSQL restart moved {moved} of {} items ({:.1}%; bound {:.0}%): members that come back must get their former slots back ({})",
        before.of.len(),
        share * 100.0,
        MOVED_BOUND * 100.0,
        slots.join(", ")
    );
    drop(server);
}
