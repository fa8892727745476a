//! Leader election against a real PostgreSQL (one fresh database per test): who leads, no
//! preemption, hand-over on resign, crash (the watcher) and hang (the session's deadline),
//! the leader fence, and the metrics.

mod common;

use common::{backend_of, lease_live, signal_backend};

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{eventually, TestDb};
use shardlease::tokio_postgres::Client;
use shardlease::{Election, Error, FenceReason, Leader, LeaderConfig, Leadership};

const WAIT: Duration = Duration::from_secs(15);

/// Fast settings for hang tests: a heartbeat of 200 ms, a TTL of 1.5 s.
fn fast(group: &str, member: &str) -> LeaderConfig {
    LeaderConfig::new(group, member)
        .heartbeat(Duration::from_millis(200))
        .lease_ttl(Duration::from_millis(1500))
}

/// A heartbeat of 5 s and a TTL of 30 s: a take-over well under a second can only be the
/// watcher's (no crash checks run in a leader group, and nothing expires).
fn slow(group: &str, member: &str) -> LeaderConfig {
    LeaderConfig::new(group, member)
        .heartbeat(Duration::from_secs(5))
        .lease_ttl(Duration::from_secs(30))
}

async fn wait_election(l: &Leader, what: &str, pred: impl FnMut(&Election) -> bool) -> Election {
    l.wait_for(WAIT, pred).await.unwrap_or_else(|| {
        panic!(
            "{}: timed out after {WAIT:?} waiting for {what}; election {:?}",
            l.member_id(),
            l.election()
        )
    })
}

fn follows(e: &Election, leader: &str) -> bool {
    matches!(&e.leadership, Leadership::Following { leader: l } if l == leader)
}

/// Wait until `leader` leads and every one of `followers` follows it, with `n` candidates.
async fn settled(leader: &Leader, followers: &[&Leader], n: usize) {
    let id = leader.member_id().to_owned();
    wait_election(leader, &format!("{id} leading {n}"), |e| {
        e.leadership.is_leading() && e.view.members.len() == n
    })
    .await;
    for f in followers {
        wait_election(f, &format!("following {id} among {n}"), |e| {
            follows(e, &id) && e.view.members.len() == n
        })
        .await;
    }
}

async fn incarnation_of(c: &Client, member: &str) -> i64 {
    c.query_one(
        "SELECT incarnation FROM shardlease.leases WHERE member_id = $1",
        &[&member],
    )
    .await
    .unwrap_or_else(|e| panic!("the lease of {member}: {e}"))
    .get(0)
}

async fn leader_in_sql(c: &Client, group: &str) -> Option<String> {
    c.query_opt(
        "SELECT member_id FROM shardlease.leaders WHERE group_name = $1",
        &[&group],
    )
    .await
    .unwrap()
    .map(|r| r.get(0))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_longest_standing_candidate_leads_and_a_returning_one_follows() {
    let db = TestDb::migrated().await;
    let admin = db.client().await;
    let a = Leader::join(&db.pg, slow("g", "a")).await.unwrap();
    let b = Leader::join(&db.pg, slow("g", "b")).await.unwrap();
    let c = Leader::join(&db.pg, slow("g", "c")).await.unwrap();
    settled(&a, &[&b, &c], 3).await;
    assert_eq!(leader_in_sql(&admin, "g").await.as_deref(), Some("a"));
    assert_eq!(a.election().leader(), Some("a"));
    let a_slot = a.election().view.my_slot().unwrap();

    // Dropping the handle closes a's connections, as a crash does. Its successor b waits on
    // its lock: b leads well before any heartbeat (5 s) could have noticed.
    let crashed = Instant::now();
    drop(a);
    wait_election(&b, "b leading after a crashed", |e| {
        e.leadership.is_leading() && e.view.members.len() == 2
    })
    .await;
    let took = crashed.elapsed();
    println!("crash of the leader -> its successor leads: {took:?}");
    assert!(
        took < Duration::from_secs(2),
        "took {took:?}: not the watcher"
    );
    wait_election(&c, "c following b", |e| follows(e, "b")).await;

    // a comes back under its id, into its old slot (kept for it), and follows.
    let a = Leader::join(&db.pg, slow("g", "a")).await.unwrap();
    settled(&b, &[&a, &c], 3).await;
    assert_eq!(a.election().view.my_slot(), Some(a_slot), "its slot back");
    assert_eq!(leader_in_sql(&admin, "g").await.as_deref(), Some("b"));
    assert!(matches!(
        a.fence(),
        Err(Error::Fenced {
            reason: FenceReason::NotLeader,
            ..
        })
    ));
    for l in [a, b, c] {
        l.resign().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resign_hands_leadership_over_at_once() {
    let db = TestDb::migrated().await;
    let a = Leader::join(&db.pg, slow("g", "a")).await.unwrap();
    let b = Leader::join(&db.pg, slow("g", "b")).await.unwrap();
    let c = Leader::join(&db.pg, slow("g", "c")).await.unwrap();
    settled(&a, &[&b, &c], 3).await;
    let mut last_word = a.watch();
    let a_term = a.fence().unwrap().term();

    let t0 = Instant::now();
    a.resign().await.unwrap();
    let returned = t0.elapsed();
    wait_election(&b, "b leading", |e| e.leadership.is_leading()).await;
    let took = t0.elapsed();
    println!("resign -> the successor leads: {took:?} (resign returned after {returned:?})");
    assert!(took < Duration::from_secs(2), "took {took:?}");
    settled(&b, &[&c], 2).await;
    let b_term = b.fence().unwrap().term();
    assert!(b_term > a_term, "terms grow: a {a_term}, then b {b_term}");
    assert!(
        matches!(&last_word.borrow_and_update().leadership, Leadership::Lost { reason } if reason == "resigned"),
        "the resigned candidate's last word: {:?}",
        last_word.borrow().leadership
    );
    // Its watcher's backend, which was waiting on c's lock, ends too.
    let admin = db.client().await;
    eventually(WAIT, "the resigned candidate's watcher backend to end", || async {
        admin
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'shardlease g/a watcher'",
                &[],
            )
            .await
            .unwrap()
            .get::<_, i64>(0)
            == 0
    })
    .await;
    // A follower that resigns changes nothing for the leader.
    let before = b.leadership();
    c.resign().await.unwrap();
    wait_election(&b, "b alone", |e| e.view.members.len() == 1).await;
    assert_eq!(b.leadership(), before, "same term, same fence");
    b.resign().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_transaction_commits_only_while_its_member_leads() {
    let db = TestDb::migrated().await;
    let admin = db.client().await;
    admin
        .batch_execute("CREATE TABLE decisions (id serial PRIMARY KEY, by text NOT NULL)")
        .await
        .unwrap();
    let a = Leader::join(&db.pg, slow("g", "a")).await.unwrap();
    let b = Leader::join(&db.pg, slow("g", "b")).await.unwrap();
    settled(&a, &[&b], 2).await;
    let mut work_a = db.client().await;
    let mut work_b = db.client().await;

    // A follower has no fence, and the database refuses its incarnation as well.
    match b.fence() {
        Err(Error::Fenced {
            reason: FenceReason::NotLeader,
            ..
        }) => {}
        other => panic!("a follower's fence: {other:?}"),
    }
    let b_incarnation = incarnation_of(&admin, "b").await;
    let status: String = admin
        .query_one(
            "SELECT status FROM shardlease.leader_fence_begin('g', $1)",
            &[&b_incarnation],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(status, "not_leader");

    // A follower joining while the leader's transaction is open does not refuse it (a
    // member fence would: the generation moved).
    let fence = a.fence().unwrap();
    let tx = fence.begin(&mut work_a).await.unwrap();
    tx.execute(
        "INSERT INTO decisions (by) VALUES ('a: before c joined')",
        &[],
    )
    .await
    .unwrap();
    let c = Leader::join(&db.pg, slow("g", "c")).await.unwrap();
    settled(&a, &[&b, &c], 3).await;
    tx.commit().await.expect("the leader's write commits");

    // The leader is deposed while its transaction is open (its session's backend ends: b,
    // which watches it, reaps it): the commit is refused, nothing of it is written.
    let tx = fence.begin(&mut work_a).await.unwrap();
    tx.execute("INSERT INTO decisions (by) VALUES ('a: deposed')", &[])
        .await
        .unwrap();
    let a_backend: i32 = admin
        .query_one(
            "SELECT backend_pid FROM shardlease.leases WHERE member_id = 'a'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    admin
        .execute("SELECT pg_terminate_backend($1, 5000)", &[&a_backend])
        .await
        .unwrap();
    wait_election(&b, "b leading", |e| e.leadership.is_leading()).await;
    match tx.commit().await {
        Err(Error::Fenced { reason, .. }) => {
            assert_eq!(reason, FenceReason::LeaseGone, "a's lease was reaped")
        }
        other => panic!("the deposed leader's commit: {other:?}"),
    }
    // Its old fence is refused at begin too, and the new leader's transaction commits.
    match fence.begin(&mut work_a).await {
        Err(Error::Fenced { reason, .. }) => assert_eq!(reason, FenceReason::LeaseGone),
        other => panic!("the deposed leader's begin: {other:?}"),
    }
    let tx = b.fence().unwrap().begin(&mut work_b).await.unwrap();
    tx.execute("INSERT INTO decisions (by) VALUES ('b')", &[])
        .await
        .unwrap();
    tx.commit().await.unwrap();
    let rows: Vec<String> = admin
        .query("SELECT by FROM decisions ORDER BY id", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(rows, ["a: before c joined", "b"]);
    // a rejoined on its own (as the newest candidate) and follows b.
    wait_election(&a, "a following b", |e| follows(e, "b")).await;
    for l in [a, b, c] {
        l.resign().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_cut_off_from_the_database_steps_down_before_its_lease_expires() {
    let db = TestDb::migrated().await;
    let admin = db.client().await;
    let a = Leader::join(&db.pg, fast("g", "a")).await.unwrap();
    let b = Leader::join(&db.pg, fast("g", "b")).await.unwrap();
    settled(&a, &[&b], 2).await;
    let incarnation = incarnation_of(&admin, "a").await;
    let pid = backend_of(&admin, "a").await;
    // The leader's session backend stops answering, its connection stays open: as a
    // partition without a reset, or a hung server, looks to the leader.
    signal_backend(pid, "STOP");
    let lost = a
        .wait_for(Duration::from_secs(5), |e| {
            matches!(e.leadership, Leadership::Lost { .. })
        })
        .await;
    let still_live = lease_live(&admin, incarnation).await;
    let fence = a.fence();
    signal_backend(pid, "CONT");
    let lost = lost.expect("the leader reports Lost when it cannot renew, within 5 s");
    assert_eq!(
        still_live,
        Some(true),
        "Lost must come before the lease expires by the database clock: {lost:?}"
    );
    assert!(fence.is_err(), "no fence once lost: {fence:?}");
    // b takes over; a comes back as the newest candidate and follows.
    settled(&b, &[&a], 2).await;
    for l in [a, b] {
        l.resign().await.unwrap();
    }
}

/// Not a test: the body of the child process of the crash and metrics tests. Joins the
/// group `SL_CHILD_GROUP` as `SL_CHILD_MEMBER` with the settings of [`slow`], prints
/// `READY`, and waits to be killed.
#[tokio::test]
#[ignore = "run as a child process by the crash and metrics tests"]
async fn child_leader() {
    let Ok(url) = std::env::var("SL_CHILD_URL") else {
        return; // Not started as a child: nothing to do.
    };
    let pg = shardlease::parse_database_url(&url).unwrap();
    let group = std::env::var("SL_CHILD_GROUP").unwrap();
    let l = Leader::join(
        &pg,
        slow(&group, &std::env::var("SL_CHILD_MEMBER").unwrap()),
    )
    .await
    .expect("child join");
    wait_election(&l, "joined", |e| e.view.is_joined()).await;
    println!("READY");
    let _ =
        tokio::task::spawn_blocking(|| std::io::copy(&mut std::io::stdin(), &mut std::io::sink()))
            .await;
    drop(l);
}

fn spawn_child_leader(db: &TestDb, group: &str, member: &str) -> Child {
    use std::io::BufRead;
    let exe = std::env::current_exe().expect("test binary path");
    let mut child = Command::new(exe)
        .args([
            "--ignored",
            "--exact",
            "child_leader",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("SL_CHILD_URL", &db.url)
        .env("SL_CHILD_GROUP", group)
        .env("SL_CHILD_MEMBER", member)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn child leader");
    let stdout = child.stdout.take().expect("stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            let _ = tx.send(line);
        }
    });
    let deadline = Instant::now() + WAIT;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) if line.contains("READY") => return child,
            Ok(_) => continue,
            Err(e) => panic!("the child leader printed no READY within {WAIT:?}: {e}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_leader_is_replaced_by_its_watcher_and_leaves_no_backend_behind() {
    let db = TestDb::migrated().await;
    let admin = db.client().await;
    let mut child = spawn_child_leader(&db, "g", "victim");
    let b = Leader::join(&db.pg, slow("g", "b")).await.unwrap();
    let c = Leader::join(&db.pg, slow("g", "c")).await.unwrap();
    wait_election(&b, "b following the victim", |e| {
        follows(e, "victim") && e.view.members.len() == 3
    })
    .await;
    let watchers = |who: &'static str| {
        let admin = &admin;
        async move {
            admin
                .query_one(
                    "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1",
                    &[&format!("shardlease g/{who} watcher")],
                )
                .await
                .unwrap()
                .get::<_, i64>(0)
        }
    };
    assert_eq!(watchers("victim").await, 1, "the victim has its watcher");

    let killed = Instant::now();
    child.kill().expect("kill -9 the child");
    wait_election(&b, "b leading", |e| e.leadership.is_leading()).await;
    let took = killed.elapsed();
    let _ = child.wait();
    println!("kill -9 of the leader -> its successor leads: {took:?}");
    // Heartbeat 5 s, TTL 30 s: only the watcher can be this fast.
    assert!(took < Duration::from_secs(2), "took {took:?}");
    settled(&b, &[&c], 2).await;
    // The victim's watcher backend was waiting on c's lock when its client died: it notices
    // (client_connection_check_interval) and ends, instead of waiting on.
    eventually(
        WAIT,
        "the killed candidate's watcher backend to end",
        || async { watchers("victim").await == 0 },
    )
    .await;
    for l in [b, c] {
        l.resign().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_leader_config_is_a_clear_error() {
    let db = TestDb::migrated().await;
    let err = Leader::join(
        &db.pg,
        LeaderConfig::new("g", "a").watch_period(Duration::from_millis(1)),
    )
    .await
    .unwrap_err();
    assert!(err.to_string().contains("watch period"), "{err}");
    let a = Leader::join(&db.pg, slow("g", "a")).await.unwrap();
    let err = Leader::join(&db.pg, slow("g", "a")).await.unwrap_err();
    assert!(
        matches!(err, Error::MemberIdInUse { .. }),
        "a second candidate under one id: {err}"
    );
    a.resign().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leadership_metrics_follow_the_terms() {
    let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
    let handle = recorder.handle();
    metrics::set_global_recorder(recorder).expect("the only recorder of this test binary");
    let db = TestDb::migrated().await;
    // One candidate of the group in this process (the series are per process and group):
    // the first leader is a child process.
    let group = "metrics-g";
    let mut elder = spawn_child_leader(&db, group, "elder");
    let x = Leader::join(&db.pg, slow(group, "x")).await.unwrap();
    wait_election(&x, "x following the elder", |e| follows(e, "elder")).await;
    let value = |name: &str| -> f64 {
        let text = handle.render();
        let prefix = format!("{name}{{group=\"{group}\"}} ");
        text.lines()
            .find_map(|l| l.strip_prefix(&prefix))
            .map(|v| v.trim().parse().unwrap())
            .unwrap_or(0.0)
    };
    assert_eq!(value("shardlease_leader"), 0.0, "x follows");
    assert_eq!(value("shardlease_leader_terms_total"), 0.0);

    elder.kill().expect("kill -9 the elder");
    let _ = elder.wait();
    wait_election(&x, "x leading", |e| e.leadership.is_leading()).await;
    assert_eq!(value("shardlease_leader"), 1.0, "x leads");
    assert_eq!(
        value("shardlease_leader_terms_total"),
        1.0,
        "x began a term"
    );
    assert_eq!(
        value("shardlease_leader_changes_total"),
        1.0,
        "one change of leader: the elder, then x"
    );
    // Lead for over two seconds, then hand over.
    tokio::time::sleep(Duration::from_millis(2300)).await;
    x.resign().await.unwrap();
    assert_eq!(value("shardlease_leader"), 0.0, "x resigned");
    let seconds = value("shardlease_leader_seconds_total");
    assert!(seconds >= 2.0, "x led for over 2 s: {seconds}");
}
