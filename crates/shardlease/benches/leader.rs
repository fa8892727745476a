//! Leader election: hand-over latency and cost at rest, for the `Leader` API at its default
//! settings (`LeaderConfig::new`: heartbeat 2 s, TTL 10 s, watch period 20 s), on a private
//! PostgreSQL cluster of its own (initdb, `pg_stat_statements` preloaded): it needs nothing
//! running.
//!
//! ```text
//! cargo bench -p shardlease --bench leader                      # 30 runs, 60 s at rest
//! cargo bench -p shardlease --bench leader -- --runs 100 --rest-secs 120 --json /tmp/leader.json
//! ```
//!
//! Scenarios, 3 candidates each, every run in a group of its own, interleaved so that
//! machine noise hits all alike:
//!
//! - **kill -9**: the leader is a child process (it joined first); 2 in-process candidates
//!   follow. SIGKILL the child; time until its successor's `Leadership` is `Leading`, and
//!   until the third candidate follows the successor. In situ, a raw connection queued on the
//!   leader's slot lock measures when the lock was free (the floor).
//! - **SIGTERM**: the same, but SIGTERM: the child's handler calls `resign()`.
//! - **resign()**: 3 in-process candidates; the leader calls `resign()`.
//! - **at rest**: 3 candidates sit still for `--rest-secs`; the library's statements
//!   (`pg_stat_statements` calls, track = top, of their database) and transactions
//!   (`pg_stat_database.xact_commit`) per candidate per second. The same for 3 plain members
//!   at `MemberConfig` defaults (the old example's design: every member a crash checker).
//!
//! Percentiles are nearest-rank over the sorted samples (below 100 runs, p99 is the max;
//! at 100 runs, the second largest).
//! The results also go to `<target dir>/leader.json`.

use std::path::PathBuf;
use std::time::{Duration, Instant};

mod common;

use anyhow::{anyhow, bail, Context, Result};
use shardlease::tokio_postgres::Client;
use shardlease::{DbConfig, Election, Leader, LeaderConfig, Leadership, Member, MemberConfig};
use shardlease_testkit::PrivateServer;
use tokio::task::JoinHandle;

use common::{ms, recreate_database, stats, stats_json, Proc, Rng, Stats};

/// Bound on every wait; a hand-over slower than this counts as a failed run.
const WAIT: Duration = Duration::from_secs(30);
const ENV_URL: &str = "LEADER_BENCH_URL";
const ENV_GROUP: &str = "LEADER_BENCH_GROUP";
const DB: &str = "leader_bench";

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    if args.iter().any(|a| a == "--child") {
        return rt.block_on(child_main());
    }
    let opts = Opts::parse(&args)?;
    rt.block_on(bench(opts))
}

// ---------------------------------------------------------------------------------------
// Options

struct Opts {
    runs: usize,
    rest: Duration,
    json: PathBuf,
}

impl Opts {
    fn parse(args: &[String]) -> Result<Opts> {
        let mut runs = match std::env::var("LEADER_RUNS") {
            Ok(v) => v
                .parse()
                .with_context(|| format!("LEADER_RUNS must be a positive integer, got {v:?}"))?,
            Err(_) => 30,
        };
        let mut rest = Duration::from_secs(60);
        let mut json = common::target_dir().join("leader.json");
        let mut it = args.iter();
        while let Some(a) = it.next() {
            match a.as_str() {
                "--runs" => {
                    let v = it.next().context("--runs needs a value")?;
                    runs = v
                        .parse()
                        .with_context(|| format!("--runs must be a positive integer, got {v:?}"))?;
                }
                "--rest-secs" => {
                    let v = it.next().context("--rest-secs needs a value")?;
                    let secs: u64 = v.parse().with_context(|| {
                        format!("--rest-secs must be a positive integer, got {v:?}")
                    })?;
                    rest = Duration::from_secs(secs);
                }
                "--json" => json = it.next().context("--json needs a path")?.into(),
                // `cargo bench` passes `--bench`; ignore it and any filter.
                _ => {}
            }
        }
        if runs == 0 {
            bail!("--runs must be at least 1");
        }
        if rest < Duration::from_secs(10) {
            bail!("--rest-secs must be at least 10 (the heartbeat is 2 s, the watch period 20 s)");
        }
        Ok(Opts { runs, rest, json })
    }
}

// ---------------------------------------------------------------------------------------
// The child candidate (this binary, re-executed)

/// Join as a candidate at the defaults, print `READY`; on SIGTERM resign and exit 0; exit
/// when stdin closes (the parent went away).
async fn child_main() -> Result<()> {
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let url = std::env::var(ENV_URL).context("child: no database URL")?;
    let group = std::env::var(ENV_GROUP).context("child: no group")?;
    let pg = shardlease::parse_database_url(&url)?;
    let leader = Leader::join(&pg, LeaderConfig::new(group, "victim")).await?;
    leader
        .wait_for(WAIT, |e| e.leadership.is_leading())
        .await
        .context("child: never led")?;
    println!("READY");
    let stdin_closed =
        tokio::task::spawn_blocking(|| std::io::copy(&mut std::io::stdin(), &mut std::io::sink()));
    tokio::select! {
        _ = sigterm.recv() => {
            leader.resign().await?;
            println!("LEFT");
        }
        _ = stdin_closed => {}
    }
    std::process::exit(0)
}

/// A child candidate in `group`.
fn child(url: &str, group: &str) -> Result<Proc> {
    Proc::spawn(
        "candidate",
        &["--child"],
        &[(ENV_URL, url), (ENV_GROUP, group)],
    )
}

// ---------------------------------------------------------------------------------------
// Measurements

#[derive(Clone, Copy, Default)]
struct Sample {
    /// The event → the successor's `Leadership` is `Leading`.
    total: Duration,
    /// The event → the third candidate follows the successor.
    all: Option<Duration>,
    /// Crash: the event → the leader's slot lock was free (a raw waiter got it).
    lock_free: Option<Duration>,
    /// resign(): the call returned.
    ack: Option<Duration>,
    /// resign(): in the same run, a one-row write and a NOTIFY committed on one raw
    /// connection → the NOTIFY arrived on another (what a leave is, at the least).
    floor: Option<Duration>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Kill9,
    Sigterm,
    Resign,
}

struct Scenario {
    key: &'static str,
    label: &'static str,
    kind: Kind,
    samples: Vec<Sample>,
    failures: Vec<String>,
}

/// Resolves to the instant `l`'s election first satisfies `pred`.
fn when(
    l: &Leader,
    pred: impl Fn(&Election) -> bool + Send + Sync + 'static,
) -> JoinHandle<Option<Instant>> {
    let mut rx = l.watch();
    tokio::spawn(async move {
        tokio::time::timeout(WAIT, rx.wait_for(|e| pred(e)))
            .await
            .ok()?
            .ok()
            .map(|_| Instant::now())
    })
}

fn leads(e: &Election) -> bool {
    e.leadership.is_leading()
}

fn follows(who: &'static str) -> impl Fn(&Election) -> bool + Send + Sync {
    move |e: &Election| matches!(&e.leadership, Leadership::Following { leader } if leader == who)
}

async fn settle(l: &Leader, what: &str, pred: impl Fn(&Election) -> bool) -> Result<()> {
    l.wait_for(WAIT, |e| pred(e))
        .await
        .map(|_| ())
        .ok_or_else(|| anyhow!("{} never {what}: {:?}", l.member_id(), l.election()))
}

async fn resign_all(ls: Vec<Leader>) {
    for l in ls {
        let _ = tokio::time::timeout(WAIT, l.resign()).await;
    }
}

/// A child-process leader and two in-process followers (`s1` joined before `s2`); the child
/// gets `signal` (SIGKILL or SIGTERM).
async fn child_leader(cx: &Cx, group: &str, signal: libc::c_int) -> Result<Sample> {
    let mut victim = child(&cx.url, group)?;
    let mut followers = Vec::new();
    let result = async {
        victim.ready(WAIT).await?;
        for id in ["s1", "s2"] {
            followers.push(Leader::join(&cx.pg, LeaderConfig::new(group, id)).await?);
        }
        for f in &followers {
            settle(f, "followed the victim among 3", |e| {
                follows("victim")(e) && e.view.members.len() == 3
            })
            .await?;
        }
        // Random phase against the heartbeats.
        tokio::time::sleep(cx.jitter()).await;
        let lock_wait = if signal == libc::SIGKILL {
            Some(queue_on_slot_lock(cx, group, "victim").await?)
        } else {
            None
        };
        let successor = when(&followers[0], leads);
        let third = when(&followers[1], follows("s1"));
        let t0 = victim.signal(signal)?;
        let t1 = successor
            .await?
            .ok_or_else(|| anyhow!("s1 did not lead within {WAIT:?}"))?;
        let t2 = third
            .await?
            .ok_or_else(|| anyhow!("s2 did not follow s1 within {WAIT:?}"))?;
        let lock_free = match lock_wait {
            Some(w) => Some(
                tokio::time::timeout(WAIT, w)
                    .await
                    .map_err(|_| anyhow!("the victim's slot lock was not free within {WAIT:?}"))??
                    .saturating_duration_since(t0),
            ),
            None => None,
        };
        Ok(Sample {
            total: t1.saturating_duration_since(t0),
            all: Some(t2.saturating_duration_since(t0)),
            lock_free,
            ack: None,
            floor: None,
        })
    }
    .await;
    victim.reap(WAIT).await;
    resign_all(followers).await;
    result
}

/// A raw connection queued on `member`'s slot lock; resolves to the instant it got it (and
/// let go at once).
async fn queue_on_slot_lock(cx: &Cx, group: &str, member: &str) -> Result<JoinHandle<Instant>> {
    let row = cx
        .admin
        .query_one(
            "SELECT g.lock_key, l.slot FROM shardlease.leases l \
             JOIN shardlease.groups g ON g.name = l.group_name \
             WHERE l.group_name = $1 AND l.member_id = $2",
            &[&group, &member],
        )
        .await?;
    let (lock_key, slot): (i32, i32) = (row.get(0), row.get(1));
    let waiter = shardlease::connect_client(&cx.pg, "leader-bench slot-lock waiter").await?;
    let pid: i32 = waiter
        .query_one("SELECT pg_backend_pid()", &[])
        .await?
        .get(0);
    let handle = tokio::spawn(async move {
        let _ = waiter
            .execute(
                "SELECT pg_advisory_xact_lock_shared($1, $2)",
                &[&lock_key, &slot],
            )
            .await;
        Instant::now()
    });
    // Go on only once it is really queued.
    let deadline = Instant::now() + WAIT;
    loop {
        let queued: bool = cx
            .admin
            .query_one(
                "SELECT EXISTS (SELECT 1 FROM pg_locks WHERE pid = $1 AND NOT granted)",
                &[&pid],
            )
            .await?
            .get(0);
        if queued {
            return Ok(handle);
        }
        if Instant::now() > deadline {
            bail!("the slot-lock waiter never queued");
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// Three in-process candidates; the leader calls `resign()`.
async fn resign(cx: &Cx, group: &str) -> Result<Sample> {
    let mut ls = Vec::new();
    let result = async {
        for id in ["leader", "s1", "s2"] {
            ls.push(Leader::join(&cx.pg, LeaderConfig::new(group, id)).await?);
        }
        settle(&ls[0], "led 3", |e| leads(e) && e.view.members.len() == 3).await?;
        for f in &ls[1..] {
            settle(f, "followed among 3", |e| {
                follows("leader")(e) && e.view.members.len() == 3
            })
            .await?;
        }
        let floor = write_notify(cx).await?;
        tokio::time::sleep(cx.jitter()).await;
        let leader = ls.remove(0);
        let successor = when(&ls[0], leads);
        let third = when(&ls[1], follows("s1"));
        let t0 = Instant::now();
        tokio::time::timeout(WAIT, leader.resign())
            .await
            .map_err(|_| anyhow!("resign() did not return within {WAIT:?}"))??;
        let ack = t0.elapsed();
        let t1 = successor
            .await?
            .ok_or_else(|| anyhow!("s1 did not lead within {WAIT:?}"))?;
        let t2 = third
            .await?
            .ok_or_else(|| anyhow!("s2 did not follow s1 within {WAIT:?}"))?;
        Ok(Sample {
            total: t1.saturating_duration_since(t0),
            all: Some(t2.saturating_duration_since(t0)),
            lock_free: None,
            ack: Some(ack),
            floor: Some(floor),
        })
    }
    .await;
    resign_all(ls).await;
    result
}

/// The floor of a hand-over by leave: a one-row write and a NOTIFY committed on a raw, warm
/// connection, until the NOTIFY arrives on another, LISTENing one.
async fn write_notify(cx: &Cx) -> Result<Duration> {
    use shardlease::tokio_postgres::{AsyncMessage, NoTls};
    let (listener, mut connection) = cx.pg.pg().connect(NoTls).await?;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(Instant, String)>();
    tokio::spawn(async move {
        while let Some(m) = std::future::poll_fn(|c| connection.poll_message(c)).await {
            match m {
                Ok(AsyncMessage::Notification(n)) => {
                    let _ = tx.send((Instant::now(), n.payload().to_owned()));
                }
                Ok(_) => {}
                Err(_) => break,
            }
        }
    });
    listener.batch_execute("LISTEN leader_bench_floor").await?;
    let sender = shardlease::connect_client(&cx.pg, "leader-bench floor").await?;
    let send = |payload: &str| {
        format!(
            "BEGIN; INSERT INTO leader_bench_floor VALUES (clock_timestamp()); \
             NOTIFY leader_bench_floor, '{payload}'; COMMIT"
        )
    };
    // Warm both sides up, then measure.
    sender.batch_execute(&send("warm")).await?;
    arrival(&mut rx, "warm").await?;
    let t0 = Instant::now();
    sender.batch_execute(&send("go")).await?;
    let t1 = arrival(&mut rx, "go").await?;
    Ok(t1.saturating_duration_since(t0))
}

/// The instant the notification `want` arrived.
async fn arrival(
    rx: &mut tokio::sync::mpsc::UnboundedReceiver<(Instant, String)>,
    want: &str,
) -> Result<Instant> {
    let found = tokio::time::timeout(WAIT, async {
        while let Some((at, payload)) = rx.recv().await {
            if payload == want {
                return Some(at);
            }
        }
        None
    })
    .await;
    found
        .ok()
        .flatten()
        .ok_or_else(|| anyhow!("NOTIFY {want} did not arrive within {WAIT:?}"))
}

// ---------------------------------------------------------------------------------------
// At rest

#[derive(Default)]
struct Rest {
    label: &'static str,
    statements: Option<f64>,
    xacts: Option<f64>,
    top: Vec<(String, i64)>,
    window: Duration,
}

/// Three candidates (or plain members) in a database of their own, still for `window`.
async fn at_rest(
    server: &PrivateServer,
    admin: &Client,
    db: &str,
    leaders: bool,
    window: Duration,
) -> Result<Rest> {
    recreate_database(admin, db).await?;
    let pg = shardlease::parse_database_url(&server.url_of(db))?;
    let mut c = shardlease::connect_client(&pg, "leader-bench migrate").await?;
    shardlease::migrate(&mut c).await?;
    drop(c);
    let oid: shardlease::tokio_postgres::types::Oid = admin
        .query_one("SELECT oid FROM pg_database WHERE datname = $1", &[&db])
        .await?
        .get(0);
    let mut candidates = Vec::new();
    let mut members = Vec::new();
    for id in ["a", "b", "c"] {
        if leaders {
            candidates.push(Leader::join(&pg, LeaderConfig::new("rest", id)).await?);
        } else {
            members.push(Member::join(&pg, MemberConfig::new("rest", id)).await?);
        }
    }
    for l in &candidates {
        settle(l, "settled among 3", |e| {
            e.view.members.len() == 3 && !matches!(e.leadership, Leadership::Lost { .. })
        })
        .await?;
    }
    for m in &members {
        m.wait_for(WAIT, |v| v.is_joined() && v.members.len() == 3)
            .await
            .context("members never saw 3")?;
    }
    // Let the joins' refreshes and announcements pass: a heartbeat and a bit.
    tokio::time::sleep(Duration::from_secs(3)).await;
    admin
        .batch_execute("SELECT pg_stat_statements_reset()")
        .await?;
    let xacts = || async {
        admin
            .query_one(
                "SELECT xact_commit FROM pg_stat_database WHERE datname = $1",
                &[&db],
            )
            .await
            .map(|row| row.get::<_, i64>(0))
    };
    let x0 = xacts().await?;
    let t0 = Instant::now();
    tokio::time::sleep(window).await;
    let secs = t0.elapsed().as_secs_f64();
    let calls: i64 = admin
        .query_one(
            "SELECT coalesce(sum(calls), 0)::bigint FROM pg_stat_statements WHERE dbid = $1",
            &[&oid],
        )
        .await?
        .get(0);
    let top = admin
        .query(
            "SELECT regexp_replace(query, '\\s+', ' ', 'g'), calls FROM pg_stat_statements \
             WHERE dbid = $1 ORDER BY calls DESC LIMIT 5",
            &[&oid],
        )
        .await?
        .iter()
        .map(|row| (row.get::<_, String>(0), row.get::<_, i64>(1)))
        .collect();
    // Backends flush their counters when idle, at most once a second: the edges of the
    // window may be off by a second's worth.
    let x1 = xacts().await?;
    resign_all(candidates).await;
    for m in members {
        let _ = m.leave().await;
    }
    admin
        .batch_execute(&format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)"))
        .await?;
    Ok(Rest {
        label: if leaders {
            "Leader API, LeaderConfig defaults"
        } else {
            "plain members, MemberConfig defaults (the old example)"
        },
        statements: Some(calls as f64 / 3.0 / secs),
        xacts: Some((x1 - x0) as f64 / 3.0 / secs),
        top,
        window: t0.elapsed(),
    })
}

// ---------------------------------------------------------------------------------------
// Driver, statistics, report

struct Cx {
    url: String,
    pg: DbConfig,
    admin: Client,
    rng: std::sync::Mutex<Rng>,
}

impl Cx {
    /// A random delay of 0 to 100 ms: a random phase against the heartbeats.
    fn jitter(&self) -> Duration {
        let us = self.rng.lock().expect("rng").below(100_000);
        Duration::from_micros(us)
    }
}

fn pair(s: &Option<Stats>) -> String {
    match s {
        Some(s) => format!("{:.1} / {:.1} ms", ms(s.p50), ms(s.p99)),
        None => "-".into(),
    }
}

async fn bench(opts: Opts) -> Result<()> {
    let started = Instant::now();
    let server = PrivateServer::builder()
        .conf("shared_preload_libraries = 'pg_stat_statements'")
        .conf("pg_stat_statements.track = top")
        .start()
        .context("starting a private PostgreSQL cluster")?;
    let base = shardlease::parse_database_url(&server.url())?;
    let admin = shardlease::connect_client(&base, "leader-bench admin").await?;
    admin
        .batch_execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
        .await
        .context("pg_stat_statements")?;
    let version: String = admin.query_one("SELECT version()", &[]).await?.get(0);
    recreate_database(&admin, DB).await?;
    let url = server.url_of(DB);
    let pg = shardlease::parse_database_url(&url)?;
    let mut c = shardlease::connect_client(&pg, "leader-bench migrate").await?;
    shardlease::migrate(&mut c).await?;
    c.batch_execute("CREATE TABLE leader_bench_floor (at timestamptz)")
        .await?;
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    eprintln!(
        "leader: {} runs per scenario; {cpus} CPUs; private cluster on port {}; {version}",
        opts.runs,
        server.port()
    );
    let cx = Cx {
        url,
        pg,
        admin: c,
        rng: std::sync::Mutex::new(Rng::new()),
    };

    let s = |key, label, kind| Scenario {
        key,
        label,
        kind,
        samples: Vec::new(),
        failures: Vec::new(),
    };
    let mut all = vec![
        s("kill9", "kill -9 of the leader → new leader", Kind::Kill9),
        s(
            "sigterm",
            "SIGTERM of the leader (resign) → new leader",
            Kind::Sigterm,
        ),
        s("resign", "resign() → new leader", Kind::Resign),
    ];
    for run in 1..=opts.runs {
        let mut line = format!("run {run:>3}/{}:", opts.runs);
        for sc in all.iter_mut() {
            let group = format!("{}-{run}", sc.key);
            let r = match sc.kind {
                Kind::Kill9 => child_leader(&cx, &group, libc::SIGKILL).await,
                Kind::Sigterm => child_leader(&cx, &group, libc::SIGTERM).await,
                Kind::Resign => resign(&cx, &group).await,
            };
            match r {
                Ok(x) => {
                    line += &format!(" {}={:.2}ms", sc.key, ms(x.total));
                    sc.samples.push(x);
                }
                Err(e) => {
                    line += &format!(" {}=FAIL", sc.key);
                    eprintln!("  {} run {run} failed: {e:#}", sc.key);
                    sc.failures.push(format!("run {run}: {e:#}"));
                }
            }
        }
        eprintln!("{line}  [{:.0}s]", started.elapsed().as_secs_f64());
    }

    eprintln!("at rest: 3 candidates, {:?} ...", opts.rest);
    let rest_leader = at_rest(&server, &admin, "leader_rest", true, opts.rest).await?;
    eprintln!(
        "at rest: 3 plain members, {:?} ...",
        opts.rest.min(Duration::from_secs(20))
    );
    let rest_members = at_rest(
        &server,
        &admin,
        "members_rest",
        false,
        opts.rest.min(Duration::from_secs(20)),
    )
    .await?;
    let elapsed = started.elapsed();

    // ---- report
    println!();
    println!(
        "leader election, 3 candidates, {} runs per scenario, {cpus} CPUs, {:.0} s total (nearest-rank percentiles)",
        opts.runs,
        elapsed.as_secs_f64()
    );
    println!(
        "{:<46} {:>4} {:>4} {:>20} {:>10} {:>22}",
        "scenario", "runs", "fail", "successor leads p50/p99", "max", "all know p50/p99"
    );
    let mut json_scenarios = Vec::new();
    for sc in &all {
        let total = stats(sc.samples.iter().map(|x| x.total));
        let every = stats(sc.samples.iter().filter_map(|x| x.all));
        let free = stats(sc.samples.iter().filter_map(|x| x.lock_free));
        let ack = stats(sc.samples.iter().filter_map(|x| x.ack));
        println!(
            "{:<46} {:>4} {:>4} {:>20} {:>10} {:>22}",
            sc.label,
            sc.samples.len(),
            sc.failures.len(),
            pair(&total),
            total
                .as_ref()
                .map(|s| format!("{:.1} ms", ms(s.max)))
                .unwrap_or_else(|| "-".into()),
            pair(&every),
        );
        if free.is_some() {
            println!(
                "    floor: kill -9 → the leader's slot lock free (in situ): {}",
                pair(&free)
            );
        }
        if ack.is_some() {
            println!("    resign() returned: {}", pair(&ack));
        }
        let floor = stats(sc.samples.iter().filter_map(|x| x.floor));
        if floor.is_some() {
            println!(
                "    floor: a one-row write + NOTIFY committed → received (raw connections, same runs): {}",
                pair(&floor)
            );
        }
        json_scenarios.push(serde_json::json!({
            "key": sc.key,
            "label": sc.label,
            "runs": sc.samples.len(),
            "failures": sc.failures,
            "successor_leads": stats_json(&total),
            "all_know": stats_json(&every),
            "lock_free": stats_json(&free),
            "resign_returned": stats_json(&ack),
            "floor_write_notify": stats_json(&stats(sc.samples.iter().filter_map(|x| x.floor))),
            "samples_ms": sc.samples.iter().map(|x| ms(x.total)).collect::<Vec<_>>(),
        }));
    }
    println!();
    println!("at rest, per candidate per second:");
    let mut json_rest = Vec::new();
    for r in [&rest_leader, &rest_members] {
        println!(
            "  {:<58} {:.3} statements (pg_stat_statements), {:.3} transactions (xact_commit), over {:.0} s",
            r.label,
            r.statements.unwrap_or(f64::NAN),
            r.xacts.unwrap_or(f64::NAN),
            r.window.as_secs_f64()
        );
        for (q, n) in &r.top {
            println!("      {n:>6}  {}", truncate(q, 110));
        }
        json_rest.push(serde_json::json!({
            "label": r.label,
            "statements_per_candidate_s": r.statements,
            "xact_commit_per_candidate_s": r.xacts,
            "window_s": r.window.as_secs_f64(),
            "top": r.top,
        }));
    }
    let kill = stats(all[0].samples.iter().map(|x| x.total));
    let resign_stats = stats(all[2].samples.iter().map(|x| x.total));
    let verdict = |ok: bool| if ok { "met" } else { "MISSED" };
    println!();
    println!(
        "goals: kill -9 → new leader p99 <= 100 ms: {}; resign → new leader p99 <= 10 ms: {}; <= 1 statement per candidate per second at rest: {}",
        verdict(kill.as_ref().is_some_and(|s| s.p99 <= Duration::from_millis(100))),
        verdict(resign_stats.as_ref().is_some_and(|s| s.p99 <= Duration::from_millis(10))),
        verdict(rest_leader.statements.is_some_and(|s| s <= 1.0)),
    );

    let doc = serde_json::json!({
        "bench": "leader",
        "unix_time": std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
        "runs_requested": opts.runs,
        "cpus": cpus,
        "server": version,
        "elapsed_s": elapsed.as_secs_f64(),
        "percentiles": "nearest rank over the sorted samples",
        "config": "LeaderConfig::new defaults: heartbeat 2 s, TTL 10 s, watch period 20 s",
        "scenarios": json_scenarios,
        "at_rest": json_rest,
    });
    if let Some(dir) = opts.json.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&opts.json, serde_json::to_string_pretty(&doc)? + "\n")
        .with_context(|| format!("writing {}", opts.json.display()))?;
    println!("results: {}", opts.json.display());
    Ok(())
}

fn truncate(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        s.to_owned()
    } else {
        s.chars().take(n).collect::<String>() + "…"
    }
}
