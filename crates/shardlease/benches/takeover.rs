//! Take-over latency (invariant I2), side by side with the physical floor on the same
//! machine, in one run.
//!
//! ```text
//! cargo bench -p shardlease --bench takeover                # N = 30 (or TAKEOVER_RUNS)
//! cargo bench -p shardlease --bench takeover -- --runs 100 --json /tmp/takeover.json
//! ```
//!
//! Scenarios, each measured once per run, every measurement in its own fresh database
//! (created, migrated where needed, dropped), interleaved so that machine noise hits all alike:
//!
//! - **floor A**: a child process holds `pg_advisory_lock(1,1)`; a connection of ours is
//!   blocked in the same call; SIGKILL the child; time until our lock call returns.
//! - **floor B**: `NOTIFY` sent on one warm connection until it arrives on another
//!   LISTENing one.
//! - **crash**: 3 in-process survivors (`MemberConfig::new`: heartbeat 1 s, TTL 5 s, crash
//!   check 100 ms, or 50/20 ms for the knob rows) and one member in a child process;
//!   SIGKILL the child; time until every survivor's view lacks it.
//! - **leave**: 4 in-process members; the top-slot one calls `leave()`; time until every
//!   other member's view lacks it.
//!
//! Percentiles are nearest-rank over the sorted samples (with N ≤ 100, p99 is the max).
//! The results also go to `<target dir>/takeover.json`.
//!
//! The bench re-executes its own binary with `--child lock` or `--child member` for the
//! processes it kills.

use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime};

mod common;

use anyhow::{anyhow, bail, Context, Result};
use shardlease::tokio_postgres::{AsyncMessage, Client, Config, NoTls};
use shardlease::{Member, MemberConfig, View};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use common::{ms, stats, stats_json, Proc, Rng, Stats};

/// Bound on every wait; a take-over slower than this counts as a failed run.
const WAIT: Duration = Duration::from_secs(10);
const GROUP: &str = "bench";
const VICTIM: &str = "victim";
const CHANNEL: &str = "takeover_bench";
const ENV_URL: &str = "TAKEOVER_CHILD_URL";
const ENV_GROUP: &str = "TAKEOVER_CHILD_GROUP";
const ENV_MEMBER: &str = "TAKEOVER_CHILD_MEMBER";

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    if let Some(i) = args.iter().position(|a| a == "--child") {
        let role = args.get(i + 1).cloned().unwrap_or_default();
        return rt.block_on(child_main(&role));
    }
    let opts = Opts::parse(&args)?;
    rt.block_on(bench(opts))
}

// ---------------------------------------------------------------------------------------
// Options

struct Opts {
    runs: usize,
    json: PathBuf,
}

impl Opts {
    fn parse(args: &[String]) -> Result<Opts> {
        let mut runs = match std::env::var("TAKEOVER_RUNS") {
            Ok(v) => v
                .parse()
                .with_context(|| format!("TAKEOVER_RUNS must be a positive integer, got {v:?}"))?,
            Err(_) => 30,
        };
        let mut json = common::target_dir().join("takeover.json");
        let mut it = args.iter();
        while let Some(a) = it.next() {
            match a.as_str() {
                "--runs" => {
                    let v = it.next().context("--runs needs a value")?;
                    runs = v
                        .parse()
                        .with_context(|| format!("--runs must be a positive integer, got {v:?}"))?;
                }
                "--json" => json = it.next().context("--json needs a path")?.into(),
                // `cargo bench` passes `--bench`; ignore it and any filter.
                _ => {}
            }
        }
        if runs == 0 {
            bail!("--runs must be at least 1");
        }
        Ok(Opts { runs, json })
    }
}

// ---------------------------------------------------------------------------------------
// Child processes (this binary, re-executed)

async fn child_main(role: &str) -> Result<()> {
    let url = std::env::var(ENV_URL).context("child: no database URL")?;
    let pg = shardlease::parse_database_url(&url)?;
    // Keep the handles alive until stdin closes (the parent went away) or we are killed.
    let _keep: Box<dyn std::any::Any + Send> = match role {
        "lock" => {
            let client = connect(&pg, "takeover-bench lock holder").await?;
            client
                .batch_execute("SELECT pg_advisory_lock(1, 1)")
                .await?;
            println!("READY");
            Box::new(client)
        }
        "member" => {
            let group = std::env::var(ENV_GROUP).context("child: no group")?;
            let member = std::env::var(ENV_MEMBER).context("child: no member id")?;
            let m = Member::join(&pg, MemberConfig::new(group, member)).await?;
            println!("READY {:?}", m.view().my_slot());
            Box::new(m)
        }
        other => bail!("unknown child role {other:?}"),
    };
    let _ =
        tokio::task::spawn_blocking(|| std::io::copy(&mut std::io::stdin(), &mut std::io::sink()))
            .await;
    std::process::exit(0)
}

/// A child of `role` (`lock` or `member`) on `db`.
fn child(db: &Db, role: &str) -> Result<Proc> {
    Proc::spawn(
        role,
        &["--child", role],
        &[(ENV_URL, &db.url), (ENV_GROUP, GROUP), (ENV_MEMBER, VICTIM)],
    )
}

// ---------------------------------------------------------------------------------------
// Databases and connections

async fn connect(pg: &Config, app: &str) -> Result<Client> {
    let mut pg = pg.clone();
    pg.application_name(app);
    let (client, connection) = pg.connect(NoTls).await.context("connect")?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(client)
}

/// A fresh database per measurement, dropped with its connections afterwards.
type Db = shardlease_testkit::TestDb;

// ---------------------------------------------------------------------------------------
// Scenarios

/// One measurement. `total` is what the table reports; the rest explains it.
#[derive(Clone, Copy, Default)]
struct Sample {
    total: Duration,
    /// Crash/leave: the first observer's view changed (the others follow by NOTIFY).
    first: Option<Duration>,
    /// Leave: `leave()` returned. NOTIFY: the sender's statement returned.
    ack: Option<Duration>,
    /// Crash: the victim's slot lock was free (a raw connection queued on it got it).
    lock_free: Option<Duration>,
    /// Crash: the reap bumped the generation (`groups.changed_at`), measured on the
    /// database clock from the moment the lock was free, added to `lock_free`.
    reaped: Option<Duration>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    FloorLock,
    FloorNotify,
    FloorNotifyWrite,
    Crash(u64),
    Leave,
}

struct Scenario {
    key: &'static str,
    label: &'static str,
    kind: Kind,
    samples: Vec<Sample>,
    failures: Vec<String>,
}

/// Floor A: kill -9 of a lock holder → a blocked `pg_advisory_lock` returns.
async fn floor_lock(db: &Db) -> Result<Sample> {
    let mut holder = child(db, "lock")?;
    let result = async {
        holder.ready(WAIT).await?;
        let waiter = connect(&db.pg, "takeover-bench lock waiter").await?;
        let observer = connect(&db.pg, "takeover-bench observer").await?;
        let pid: i32 = waiter
            .query_one("SELECT pg_backend_pid()", &[])
            .await?
            .get(0);
        let blocked: JoinHandle<(Instant, Result<()>)> = tokio::spawn(async move {
            let r = waiter.batch_execute("SELECT pg_advisory_lock(1, 1)").await;
            (Instant::now(), r.map_err(anyhow::Error::from))
        });
        // Kill only once our backend is really queued on the lock.
        wait_queued(&observer, pid).await?;
        let t0 = holder.kill9()?;
        let (t1, r) = tokio::time::timeout(WAIT, blocked)
            .await
            .map_err(|_| anyhow!("the lock was not granted within {WAIT:?} of kill -9"))??;
        r.context("blocked pg_advisory_lock")?;
        Ok(Sample {
            total: t1 - t0,
            ..Sample::default()
        })
    }
    .await;
    holder.reap(WAIT).await;
    result
}

/// Wait until backend `pid` is queued on an advisory lock.
async fn wait_queued(observer: &Client, pid: i32) -> Result<()> {
    let deadline = Instant::now() + WAIT;
    loop {
        let waiting: bool = observer
            .query_one(
                "SELECT EXISTS (SELECT 1 FROM pg_locks WHERE locktype = 'advisory' \
                 AND pid = $1 AND NOT granted)",
                &[&pid],
            )
            .await?
            .get(0);
        if waiting {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("backend {pid} never queued on the advisory lock");
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

async fn recv(rx: &mut mpsc::UnboundedReceiver<(Instant, String)>, want: &str) -> Result<Instant> {
    let fut = async {
        loop {
            match rx.recv().await {
                Some((at, payload)) if payload == want => return Ok(at),
                Some(_) => continue,
                None => bail!("listener connection closed"),
            }
        }
    };
    tokio::time::timeout(WAIT, fut)
        .await
        .map_err(|_| anyhow!("no notification within {WAIT:?}"))?
}

/// Floor B: NOTIFY on one warm connection → received on another, LISTENing one.
/// With `write`, the NOTIFY shares a transaction with a one-row INSERT, so its commit
/// waits for a WAL flush, as every membership change's commit does.
async fn floor_notify(db: &Db, write: bool) -> Result<Sample> {
    let mut pg = db.pg.pg().clone();
    pg.application_name("takeover-bench listener");
    let (listener, mut connection) = pg.connect(NoTls).await.context("connect listener")?;
    let (tx, mut rx) = mpsc::unbounded_channel::<(Instant, String)>();
    tokio::spawn(async move {
        while let Some(message) = std::future::poll_fn(|cx| connection.poll_message(cx)).await {
            match message {
                Ok(AsyncMessage::Notification(n)) => {
                    let _ = tx.send((Instant::now(), n.payload().to_owned()));
                }
                Ok(_) => {}
                Err(_) => break,
            }
        }
    });
    listener.batch_execute(&format!("LISTEN {CHANNEL}")).await?;
    let sender = connect(&db.pg, "takeover-bench notifier").await?;
    let statement = |payload: &str| {
        if write {
            format!(
                "BEGIN; INSERT INTO takeover_bench VALUES (clock_timestamp()); \
                 NOTIFY {CHANNEL}, '{payload}'; COMMIT"
            )
        } else {
            format!("NOTIFY {CHANNEL}, '{payload}'")
        }
    };
    if write {
        sender
            .batch_execute("CREATE TABLE takeover_bench (at timestamptz)")
            .await?;
    }
    // Warm both sides up (statement path, LISTEN queue), then measure.
    sender.batch_execute(&statement("warm")).await?;
    recv(&mut rx, "warm").await?;
    let t0 = Instant::now();
    sender.batch_execute(&statement("go")).await?;
    let ack = t0.elapsed();
    let t1 = recv(&mut rx, "go").await?;
    Ok(Sample {
        total: t1 - t0,
        ack: Some(ack),
        ..Sample::default()
    })
}

fn member_cfg(id: &str, crash_check: Option<Duration>) -> MemberConfig {
    let cfg = MemberConfig::new(GROUP, id);
    match crash_check {
        Some(every) => cfg.crash_check(every),
        None => cfg,
    }
}

async fn wait_all(members: &[Member], n: usize) -> Result<()> {
    for m in members {
        m.wait_for(WAIT, |v| v.is_joined() && v.members.len() == n)
            .await
            .with_context(|| format!("{} never saw {n} members: {:?}", m.member_id(), m.view()))?;
    }
    Ok(())
}

/// One task per observer, resolving to the instant its view first lacks `gone`.
fn watch_departure(observers: &[Member], gone: &'static str) -> Vec<JoinHandle<Option<Instant>>> {
    observers
        .iter()
        .map(|m| {
            let mut rx = m.watch();
            tokio::spawn(async move {
                let departed = |v: &View| !v.members.iter().any(|x| x.member_id == gone);
                rx.wait_for(departed).await.ok().map(|_| Instant::now())
            })
        })
        .collect()
}

/// (first, last) arrival after `t0`, or an error naming the observer that never saw it.
async fn arrivals(
    t0: Instant,
    watchers: Vec<JoinHandle<Option<Instant>>>,
    observers: &[Member],
) -> Result<(Duration, Duration)> {
    let mut times = Vec::new();
    for (w, m) in watchers.into_iter().zip(observers) {
        match tokio::time::timeout(WAIT, w).await {
            Ok(Ok(Some(t))) => times.push(t.saturating_duration_since(t0)),
            _ => bail!(
                "{} did not see the departure within {WAIT:?}; view {:?}",
                m.member_id(),
                m.view()
            ),
        }
    }
    let first = *times.iter().min().context("no observers")?;
    let last = *times.iter().max().context("no observers")?;
    Ok((first, last))
}

async fn leave_all(members: Vec<Member>) {
    for m in members {
        let _ = tokio::time::timeout(WAIT, m.leave()).await;
    }
}

/// Ours, crash: 3 in-process survivors, one child-process member killed with SIGKILL.
async fn crash(db: &Db, crash_check: Option<Duration>, rng: &mut Rng) -> Result<Sample> {
    let mut survivors = Vec::new();
    for i in 0..3 {
        survivors.push(Member::join(&db.pg, member_cfg(&format!("s{i}"), crash_check)).await?);
    }
    let mut victim = child(db, "member")?;
    let result = async {
        victim.ready(WAIT).await?;
        wait_all(&survivors, 4).await?;
        let before = survivors[0].view().generation;
        // Random phase against the survivors' crash-check ticks.
        tokio::time::sleep(Duration::from_micros(rng.below(100_000))).await;
        // The in-situ floor: a raw connection queued on the victim's slot lock. It takes the
        // lock when the victim's backend is gone and lets go at once. The reap does not
        // mind: it checks that the lease's own backend holds the lock.
        let admin = connect(&db.pg, "takeover-bench slot-lock waiter").await?;
        let row = admin
            .query_one(
                "SELECT g.lock_key, l.slot FROM shardlease.leases l \
                 JOIN shardlease.groups g ON g.name = l.group_name \
                 WHERE l.group_name = $1 AND l.member_id = $2",
                &[&GROUP, &VICTIM],
            )
            .await?;
        let (lock_key, slot): (i32, i32) = (row.get(0), row.get(1));
        let waiter = connect(&db.pg, "takeover-bench slot-lock waiter").await?;
        let waiter_pid: i32 = waiter
            .query_one("SELECT pg_backend_pid()", &[])
            .await?
            .get(0);
        let lock_wait: JoinHandle<(Instant, Result<SystemTime>)> = tokio::spawn(async move {
            let r = waiter
                .query_one(
                    "SELECT clock_timestamp() FROM \
                     (SELECT pg_advisory_lock($1, $2), pg_advisory_unlock($1, $2)) AS locked",
                    &[&lock_key, &slot],
                )
                .await;
            (
                Instant::now(),
                r.map(|row| row.get(0)).map_err(anyhow::Error::from),
            )
        });
        wait_queued(&admin, waiter_pid).await?;
        let watchers = watch_departure(&survivors, VICTIM);
        let t0 = victim.kill9()?;
        let (first, last) = arrivals(t0, watchers, &survivors).await?;
        let (free_at, free_db) = tokio::time::timeout(WAIT, lock_wait)
            .await
            .map_err(|_| anyhow!("the victim's slot lock was not free within {WAIT:?}"))??;
        let free_db = free_db.context("slot-lock waiter")?;
        let reaped_db: SystemTime = admin
            .query_one(
                "SELECT changed_at FROM shardlease.groups WHERE name = $1",
                &[&GROUP],
            )
            .await?
            .get(0);
        let lock_free = free_at.saturating_duration_since(t0);
        let reaped = lock_free + reaped_db.duration_since(free_db).unwrap_or_default();
        for s in &survivors {
            let v = s.view();
            if !v.is_joined() || v.members.len() != 3 {
                bail!("{} ended in an unexpected view: {v:?}", s.member_id());
            }
            if v.generation != before + 1 {
                eprintln!(
                    "  note: {} went from generation {before} to {} (expected one reap)",
                    s.member_id(),
                    v.generation
                );
            }
        }
        Ok(Sample {
            total: last,
            first: Some(first),
            lock_free: Some(lock_free),
            reaped: Some(reaped),
            ..Sample::default()
        })
    }
    .await;
    victim.reap(WAIT).await;
    leave_all(survivors).await;
    result
}

/// Ours, graceful leave: 4 in-process members, the top-slot one leaves.
async fn leave(db: &Db) -> Result<Sample> {
    let mut members = Vec::new();
    for id in ["s0", "s1", "s2", "leaver"] {
        members.push(Member::join(&db.pg, member_cfg(id, None)).await?);
    }
    let result = async {
        wait_all(&members, 4).await?;
        let leaver = members.pop().context("leaver")?;
        let watchers = watch_departure(&members, "leaver");
        let t0 = Instant::now();
        tokio::time::timeout(WAIT, leaver.leave())
            .await
            .map_err(|_| anyhow!("leave() did not return within {WAIT:?}"))?
            .context("leave")?;
        let ack = t0.elapsed();
        let (first, last) = arrivals(t0, watchers, &members).await?;
        Ok(Sample {
            total: last,
            first: Some(first),
            ack: Some(ack),
            ..Sample::default()
        })
    }
    .await;
    leave_all(members).await;
    result
}

// ---------------------------------------------------------------------------------------
// Driver, statistics, report

fn scenarios() -> Vec<Scenario> {
    let s = |key, label, kind| Scenario {
        key,
        label,
        kind,
        samples: Vec::new(),
        failures: Vec::new(),
    };
    vec![
        s(
            "floor_lock_kill9",
            "floor A: lock freed by kill -9",
            Kind::FloorLock,
        ),
        s(
            "floor_notify",
            "floor B: NOTIFY delivery",
            Kind::FloorNotify,
        ),
        s(
            "floor_notify_write",
            "floor B': NOTIFY + row write",
            Kind::FloorNotifyWrite,
        ),
        s(
            "crash_default",
            "ours: crash (check 100 ms)",
            Kind::Crash(100),
        ),
        s(
            "crash_check_50ms",
            "ours: crash (check 50 ms)",
            Kind::Crash(50),
        ),
        s(
            "crash_check_20ms",
            "ours: crash (check 20 ms)",
            Kind::Crash(20),
        ),
        s("leave", "ours: graceful leave", Kind::Leave),
    ]
}

async fn run_one(kind: Kind, rng: &mut Rng) -> Result<Sample> {
    let db = match kind {
        Kind::Crash(_) | Kind::Leave => Db::migrated().await,
        _ => Db::empty().await,
    };
    let r = match kind {
        Kind::FloorLock => floor_lock(&db).await,
        Kind::FloorNotify => floor_notify(&db, false).await,
        Kind::FloorNotifyWrite => floor_notify(&db, true).await,
        // The default config is MemberConfig::new untouched; the knob rows set crash_check.
        Kind::Crash(100) => crash(&db, None, rng).await,
        Kind::Crash(ms) => crash(&db, Some(Duration::from_millis(ms)), rng).await,
        Kind::Leave => leave(&db).await,
    };
    drop(db);
    r
}

fn fmt_ms(d: Duration) -> String {
    let m = ms(d);
    if m < 10.0 {
        format!("{m:.3} ms")
    } else {
        format!("{m:.1} ms")
    }
}

async fn bench(opts: Opts) -> Result<()> {
    let base = shardlease::parse_database_url(&shardlease_testkit::base_url())?;
    let admin = connect(&base, "takeover-bench admin")
        .await
        .with_context(|| {
            format!(
                "PostgreSQL must be running at {}",
                shardlease::describe_target(&base)
            )
        })?;
    let server: String = admin.query_one("SELECT version()", &[]).await?.get(0);
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    eprintln!(
        "takeover: {} runs per scenario, fresh database per measurement; {cpus} CPUs; {server}",
        opts.runs
    );

    let mut all = scenarios();
    let mut rng = Rng::new();
    let started = Instant::now();
    for run in 1..=opts.runs {
        let mut line = format!("run {run:>3}/{}:", opts.runs);
        for sc in all.iter_mut() {
            match run_one(sc.kind, &mut rng).await {
                Ok(s) => {
                    line += &format!(" {}={:.2}ms", sc.key, ms(s.total));
                    sc.samples.push(s);
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
    let elapsed = started.elapsed();

    // ---- table
    let floor_of = |k: Kind| match k {
        Kind::Crash(_) => Some(Kind::FloorLock),
        Kind::Leave => Some(Kind::FloorNotify),
        _ => None,
    };
    let table_stats: Vec<Option<Stats>> = all
        .iter()
        .map(|s| stats(s.samples.iter().map(|x| x.total)))
        .collect();
    let find = |k: Kind| all.iter().position(|s| s.kind == k);

    println!();
    println!(
        "take-over latency, {} runs per scenario, {cpus} CPUs, {:.0} s total",
        opts.runs,
        elapsed.as_secs_f64()
    );
    println!(
        "{:<34} {:>4} {:>4} {:>11} {:>11} {:>11} {:>11} {:>13} {:>13}",
        "scenario", "runs", "fail", "p50", "p90", "p99", "max", "p50/floor", "p99/floor"
    );
    println!("{}", "-".repeat(34 + 5 + 5 + 12 * 4 + 14 * 2));
    let mut ratios = Vec::new();
    for (i, sc) in all.iter().enumerate() {
        let Some(st) = &table_stats[i] else {
            println!(
                "{:<34} {:>4} {:>4}  (no successful runs)",
                sc.label,
                0,
                sc.failures.len()
            );
            ratios.push(None);
            continue;
        };
        let floor = floor_of(sc.kind)
            .and_then(find)
            .and_then(|f| table_stats[f].as_ref());
        let (r50, r99) = match floor {
            Some(f) => (
                ms(st.p50) / ms(f.p50).max(1e-6),
                ms(st.p99) / ms(f.p99).max(1e-6),
            ),
            None => (f64::NAN, f64::NAN),
        };
        let ratio = |r: f64, floor_name: &str| {
            if r.is_nan() {
                "-".to_owned()
            } else {
                format!("{r:.0}x {floor_name}")
            }
        };
        let floor_name = match sc.kind {
            Kind::Crash(_) => "A",
            _ => "B",
        };
        println!(
            "{:<34} {:>4} {:>4} {:>11} {:>11} {:>11} {:>11} {:>13} {:>13}",
            sc.label,
            sc.samples.len(),
            sc.failures.len(),
            fmt_ms(st.p50),
            fmt_ms(st.p90),
            fmt_ms(st.p99),
            fmt_ms(st.max),
            ratio(r50, floor_name),
            ratio(r99, floor_name),
        );
        ratios.push(if r50.is_nan() { None } else { Some((r50, r99)) });
    }

    // ---- where the time goes
    println!();
    println!("breakdown (p50 / p99):");
    let mut breakdown = serde_json::Map::new();
    for sc in &all {
        let first = stats(sc.samples.iter().filter_map(|x| x.first));
        let ack = stats(sc.samples.iter().filter_map(|x| x.ack));
        let spread = stats(
            sc.samples
                .iter()
                .filter_map(|x| x.first.map(|f| x.total.saturating_sub(f))),
        );
        let pair = |s: &Option<Stats>| match s {
            Some(s) => format!("{} / {}", fmt_ms(s.p50), fmt_ms(s.p99)),
            None => "-".into(),
        };
        match sc.kind {
            Kind::FloorNotify | Kind::FloorNotifyWrite => {
                println!(
                    "  {:<32} NOTIFY statement returned on the sender: {}",
                    sc.label,
                    pair(&ack)
                );
            }
            Kind::Crash(_) => {
                let stage = |f: &dyn Fn(&Sample) -> Option<Duration>| {
                    stats(sc.samples.iter().filter_map(f))
                };
                let free = stage(&|x| x.lock_free);
                let to_reap = stage(&|x| Some(x.reaped?.saturating_sub(x.lock_free?)));
                let to_view = stage(&|x| Some(x.first?.saturating_sub(x.reaped?)));
                println!("  {}", sc.label);
                println!(
                    "      kill -9 -> slot lock free (in situ):       {}",
                    pair(&free)
                );
                println!(
                    "      lock free -> reap bumped the generation:   {}",
                    pair(&to_reap)
                );
                println!(
                    "      bump -> first survivor's view:             {}",
                    pair(&to_view)
                );
                println!(
                    "      first -> last survivor's view:             {}",
                    pair(&spread)
                );
                breakdown.insert(
                    format!("{}_stages", sc.key),
                    serde_json::json!({
                        "kill_to_lock_free": stats_json(&free),
                        "lock_free_to_reap_bump": stats_json(&to_reap),
                        "reap_bump_to_first_view": stats_json(&to_view),
                        "first_to_last_view": stats_json(&spread),
                    }),
                );
            }
            Kind::Leave => println!(
                "  {:<32} leave() returned: {}; first observer: {}; last minus first: {}",
                sc.label,
                pair(&ack),
                pair(&first),
                pair(&spread)
            ),
            Kind::FloorLock => {}
        }
        breakdown.insert(
            sc.key.to_owned(),
            serde_json::json!({
                "first_observer": stats_json(&first),
                "ack": stats_json(&ack),
                "last_minus_first": stats_json(&spread),
            }),
        );
    }
    if let Some(i) = find(Kind::Crash(100)) {
        if let Some(st) = &table_stats[i] {
            let verdict = if st.p99 < Duration::from_millis(250) {
                "met"
            } else {
                "MISSED"
            };
            println!(
                "\nI2 crash target (250 ms at p99) with the default config: {verdict} (p99 {}, nearest rank over {} runs)",
                fmt_ms(st.p99),
                all[i].samples.len()
            );
        }
    }

    // ---- JSON
    let scenarios_json: Vec<serde_json::Value> = all
        .iter()
        .enumerate()
        .map(|(i, sc)| {
            serde_json::json!({
                "key": sc.key,
                "label": sc.label,
                "runs": sc.samples.len(),
                "failures": sc.failures,
                "total": stats_json(&table_stats[i]),
                "ratio_to_floor": ratios[i].map(|(a, b)| serde_json::json!({"p50": a, "p99": b})),
                "breakdown": breakdown.get(sc.key),
                "stages": breakdown.get(&format!("{}_stages", sc.key)),
                "lock_free_ms": sc.samples.iter().filter_map(|x| x.lock_free.map(ms)).collect::<Vec<_>>(),
                "reaped_ms": sc.samples.iter().filter_map(|x| x.reaped.map(ms)).collect::<Vec<_>>(),
                "samples_ms": sc.samples.iter().map(|x| ms(x.total)).collect::<Vec<_>>(),
                "first_observer_ms": sc.samples.iter().filter_map(|x| x.first.map(ms)).collect::<Vec<_>>(),
                "ack_ms": sc.samples.iter().filter_map(|x| x.ack.map(ms)).collect::<Vec<_>>(),
            })
        })
        .collect();
    let unix = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let doc = serde_json::json!({
        "bench": "takeover",
        "unix_time": unix,
        "runs_requested": opts.runs,
        "percentiles": "nearest rank over the sorted samples",
        "cpus": cpus,
        "server": server,
        "target": shardlease::describe_target(&base),
        "elapsed_s": elapsed.as_secs_f64(),
        "config": {
            "members": "MemberConfig::new defaults (heartbeat 1 s, TTL 5 s, crash check 100 ms); crash rows override crash_check only",
            "crash": "3 in-process survivors + 1 child-process member killed with SIGKILL; random 0-100 ms delay before the kill",
            "leave": "4 in-process members; the top-slot member calls leave(); 3 observers",
            "floor_lock": "child holds pg_advisory_lock(1,1), ours blocked on it; SIGKILL the child",
            "floor_notify": "NOTIFY on a warm connection until received on a LISTENing one",
        },
        "scenarios": scenarios_json,
    });
    if let Some(dir) = opts.json.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    std::fs::write(&opts.json, serde_json::to_string_pretty(&doc)? + "\n")
        .with_context(|| format!("writing {}", opts.json.display()))?;
    println!("results: {}", opts.json.display());
    Ok(())
}
