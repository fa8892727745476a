//! 200 `shardlease-worker run` processes on one private PostgreSQL (the test kit's
//! `PrivateServer`, `max_connections` 700): all join within 30 s, the server rests under
//! half a core (the on-CPU time of every server process, from `/proc/<pid>/schedstat`, over 10 s), and all
//! leave on SIGTERM and exit 0. Worker settings are the defaults (heartbeat 1 s, TTL 5 s,
//! tick 1 s, crash check 100 ms).
//!
//! Ignored by default (200 processes); run it alone:
//!
//! ```text
//! cargo test -p shardlease-worker --test scale -- --ignored --nocapture
//! ```

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use common::*;
use shardlease::tokio_postgres::{AsyncMessage, Client, NoTls};
use shardlease_testkit::PrivateServer;

const WORKERS: usize = 200;
const ITEMS: u64 = 1000;
const JOIN_BOUND: Duration = Duration::from_secs(30);
const REST_WINDOW: Duration = Duration::from_secs(10);
const CPU_BOUND: f64 = 0.5;
const EXIT_BOUND: Duration = Duration::from_secs(30);

/// (live leases, ids of the workers with one).
async fn live_members(c: &Client) -> (usize, Vec<String>) {
    let ids: Vec<String> = c
        .query(
            "SELECT member_id FROM shardlease.members WHERE group_name = $1 AND alive",
            &[&GROUP],
        )
        .await
        .expect("read shardlease.members")
        .iter()
        .map(|r| r.get(0))
        .collect();
    (ids.len(), ids)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "starts 200 worker processes; run alone: cargo test -p shardlease-worker --test scale -- --ignored"]
async fn two_hundred_workers_join_rest_cheaply_and_exit_cleanly() {
    let started = Instant::now();
    let server = PrivateServer::builder()
        .max_connections(700)
        .start()
        .expect("start a private PostgreSQL (max_connections 700)");
    let url = server.url();
    let out = cli(&url, &["migrate"]).await;
    assert!(out.success(), "`shardlease-worker migrate` failed: {out}");
    let out = cli(&url, &["seed", "--count", &ITEMS.to_string()]).await;
    assert!(out.success(), "`shardlease-worker seed` failed: {out}");

    // A listener on the membership channel: re-count the members on every change.
    let pg = shardlease::parse_database_url(&url).expect("URL parses");
    let (watcher, mut connection) = pg.pg().connect(NoTls).await.expect("connect");
    let (note_tx, mut notes) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Some(Ok(m)) = std::future::poll_fn(|cx| connection.poll_message(cx)).await {
            if let AsyncMessage::Notification(_) = m {
                let _ = note_tx.send(());
            }
        }
    });
    watcher
        .batch_execute(&format!("LISTEN {}", shardlease::CHANNEL))
        .await
        .expect("LISTEN");

    let t0 = Instant::now();
    let mut workers: Vec<Worker> = (0..WORKERS)
        .map(|i| {
            Worker::spawn(
                &url,
                &format!("w{i:03}"),
                &["run", "--http-addr", "127.0.0.1:0"],
            )
        })
        .collect();
    let spawned = t0.elapsed();

    // Every check is made and its figure printed; the failures are reported together at the end.
    let mut failures: Vec<String> = Vec::new();

    // Every membership change NOTIFYs: re-count on each (and at the deadline).
    let deadline = t0 + JOIN_BOUND;
    let joined_in = loop {
        let (live, ids) = live_members(&watcher).await;
        if live == WORKERS {
            break Some(t0.elapsed());
        }
        if Instant::now() >= deadline {
            let exited: Vec<String> = workers
                .iter_mut()
                .filter_map(|w| w.try_exit().map(|s| format!("{} ({s})", w.name)))
                .collect();
            let missing: Vec<&str> = workers
                .iter()
                .map(|w| w.name.as_str())
                .filter(|n| !ids.iter().any(|i| i == n))
                .take(10)
                .collect();
            failures.push(format!(
                "waited {JOIN_BOUND:?} for all {WORKERS} workers to hold live leases in \
                 shardlease.members: {live} do; missing e.g. {missing:?}; exited: {exited:?}"
            ));
            println!("after {JOIN_BOUND:?}: {live} of {WORKERS} workers held live leases");
            break None;
        }
        let _ = tokio::time::timeout_at(deadline.into(), notes.recv()).await;
        // Drain the burst: one re-count per batch of notifications.
        while notes.try_recv().is_ok() {}
    };
    println!(
        "{WORKERS} workers spawned in {:.2} s; all held live leases after {}",
        spawned.as_secs_f64(),
        joined_in.map_or("-".into(), |d| format!("{:.2} s", d.as_secs_f64()))
    );

    // At rest: from one heartbeat after the joins (or the join deadline).
    tokio::time::sleep(Duration::from_secs(2)).await;
    let cpu = server
        .measure_cpu(REST_WINDOW)
        .await
        .expect("read the server's CPU time from /proc");
    let (live_after, _) = live_members(&watcher).await;
    println!(
        "server CPU at rest with {WORKERS} workers over {:.1} s: {:.3} core ({:.2} s of CPU); \
         {live_after} live leases at the end of the window",
        cpu.wall.as_secs_f64(),
        cpu.cores(),
        cpu.cpu.as_secs_f64()
    );

    // SIGTERM all; each leaves and exits 0.
    let t_term = Instant::now();
    for w in &workers {
        w.signal("TERM");
    }
    let exit_deadline = t_term + EXIT_BOUND;
    let mut statuses = BTreeMap::new();
    loop {
        for w in workers.iter_mut() {
            if let Some(s) = w.try_exit() {
                statuses.entry(w.name.clone()).or_insert(s);
            }
        }
        if statuses.len() == WORKERS || Instant::now() >= exit_deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let exited_in = t_term.elapsed();
    let not_exited: Vec<&str> = workers
        .iter()
        .map(|w| w.name.as_str())
        .filter(|n| !statuses.contains_key(*n))
        .collect();
    let failed: Vec<String> = statuses
        .iter()
        .filter(|(_, s)| s.code() != Some(0))
        .map(|(n, s)| format!("{n}: {s}"))
        .collect();
    println!(
        "SIGTERM: {} of {WORKERS} exited within {:.2} s, {} not with 0",
        statuses.len(),
        exited_in.as_secs_f64(),
        failed.len()
    );

    // What the workers logged above INFO, by message.
    let mut logged: BTreeMap<String, usize> = BTreeMap::new();
    for w in &workers {
        for line in w.stderr() {
            if let Some(level) = ["ERROR", "WARN"].iter().find(|l| line.contains(*l)) {
                let msg = line
                    .split_once(&format!("{level} "))
                    .map(|(_, m)| m)
                    .unwrap_or(&line);
                let msg: String = msg
                    .split(' ')
                    .take_while(|w| !w.contains('='))
                    .collect::<Vec<_>>()
                    .join(" ");
                *logged.entry(format!("{level} {msg}")).or_default() += 1;
            }
        }
    }
    for (msg, n) in &logged {
        println!("workers logged {n} × {msg}");
    }
    println!(
        "the whole test took {:.1} s",
        started.elapsed().as_secs_f64()
    );

    if cpu.cores() >= CPU_BOUND {
        failures.push(format!(
            "server CPU at rest with {WORKERS} workers: {:.3} core over {:?}; expected under \
             {CPU_BOUND} core",
            cpu.cores(),
            cpu.wall
        ));
    }
    if !not_exited.is_empty() {
        failures.push(format!(
            "waited {EXIT_BOUND:?} after SIGTERM for every worker to exit; {} did not, e.g. {:?}",
            not_exited.len(),
            &not_exited[..not_exited.len().min(10)]
        ));
    }
    if !failed.is_empty() {
        failures.push(format!(
            "every worker should exit 0 after SIGTERM; {} did not: {:?}",
            failed.len(),
            &failed[..failed.len().min(10)]
        ));
    }
    // Their logs are summarised above: no per-worker dump.
    drop(workers);
    assert!(
        failures.is_empty(),
        "{} check(s) failed:\n- {}",
        failures.len(),
        failures.join("\n- ")
    );
}
