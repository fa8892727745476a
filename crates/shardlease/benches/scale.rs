//! Membership at scale (invariant I8, with I2 at size): one group of N members, each figure
//! printed beside its floor measured in the same run, with its goal and PASS or MISS.
//!
//! ```text
//! cargo bench -p shardlease --bench scale                          # N = 10, 100, 1000
//! cargo bench -p shardlease --bench scale -- --sizes 10,100 --quick
//! cargo bench -p shardlease --bench scale -- --sizes 1000 --reps 30 --json /tmp/scale.json
//! ```
//!
//! Flags (defaults; `--quick` in brackets): `--sizes 10,100,1000` [10,100], `--reps 50` [5]
//! (kill -9, join and leave), `--floor-reps 30` [5], `--rest-secs 20` [3], `--hold-secs 10`
//! [3], `--contended-events 20` [5], `--churn-rounds 2` [1], `--phase-secs 60` [20],
//! `--timeout-ms 10000`, `--cold-timeout-secs 60`, `--churn-timeout-secs 30`,
//! `--join-concurrency 64`, `--child-nice 19`, `--max-connections 2300` (of the private
//! cluster; N + 100 and a few more are needed), `--json <target>/scale.json`.
//!
//! Needs nothing running: it starts a private PostgreSQL cluster (the test kit's
//! `PrivateServer`, `max_connections` 2300, `pg_stat_statements` preloaded), with a fresh
//! database per size. Members use `MemberConfig::new` (heartbeat 1 s, TTL 5 s, crash check
//! 100 ms). In-process members share this process's runtime; the members that are killed
//! with SIGKILL are real child processes (this binary re-executed with `--child member`).
//!
//! The child processes run at `--child-nice` (19 by default: the lowest priority). They stand
//! in for members on other machines, whose start-up costs the survivors nothing. On one
//! machine it does: the kernel's autogroup scheduling puts this process and its children in
//! one group, where CPU is shared per thread, so 100 children starting at once left the
//! survivors' 2 runtime threads a small share of it. Their renewals then came back after the
//! lease budget (TTL − 1 s), and up to a third of the survivors lost their leases while the
//! server answered every heartbeat within 60 ms. `--child-nice 0` measures that case. The
//! server runs in its own session, so its share is the same either way.
//!
//! Per size N, in order:
//!
//! - **floors** on the quiet server: N plain connections opened (64 at a time) and
//!   LISTENing; the cluster's CPU with those N idle connections, then while each runs one
//!   prepared `SELECT 1` a second (the heartbeat's rate); a committed row write with
//!   NOTIFY until all N listeners have it; kill -9 of a child holding an advisory lock until
//!   a connection blocked on that lock has it and its NOTIFY (sent by the server right after
//!   the grant, in the same query string) reached all N listeners; k = ⌈N/10⌉ child
//!   processes started until each is connected and holds a lock.
//! - **cold start**: N `Member::join`s, 64 in flight, until every member's view shows N.
//! - **at rest**: over `--rest-secs`, the cluster's CPU (on-CPU time of the postmaster and
//!   its children, from `/proc/<pid>/schedstat`), the library's statements (top-level `calls` in
//!   `pg_stat_statements` for the members' database) and transactions
//!   (`pg_stat_database.xact_commit`), per member per second.
//! - **kill -9**: a child-process member joins (N members), is killed; time until every
//!   in-process member's view lacks it. `--reps` times.
//! - **leave**: an in-process member joins (N members) and calls `leave()`; time until every
//!   other member's view lacks it. `--reps` times.
//! - **contended**: 4 members run fenced ticks back to back (each on a work connection of its
//!   own) and a fifth holds a fenced transaction open for `--hold-secs`. While it is open,
//!   three loops run side by side: joins, leaves, and kill -9s of child-process members, up
//!   to `--contended-events` each, each event timed until every member's view has it; the
//!   members that leave and the children that are killed joined before the transaction
//!   opened. Only events that start while it is open count. A fourth loop measures the
//!   phase's own floor in the same window: a row write + NOTIFY until N plain listeners
//!   have it, as many times, back to back; the listeners are in a database of their own, so
//!   that they do not double the fan-out of the members' notifications.
//! - **churn**: ⌈N/10⌉ members are child processes; all are killed with SIGKILL at once and
//!   started again at once; time until every in-process member's view holds each of them
//!   again under a new incarnation. `--churn-rounds` times.
//!
//! Joins retry transient errors with capped backoff, as the worker does. Every wait is
//! bounded (`--timeout-ms` per event, `--cold-timeout-secs` for the cold start,
//! `--churn-timeout-secs` for a churn round); a timed-out wait is a MISS that says what it
//! waited for. A phase stops after 3 failed repetitions or when it has used `--phase-secs`,
//! so the bench always completes. A "lease lost" is a member whose watched state went from
//! `Joined` to `Lost` (or to `Joined` under a new incarnation); every in-process member is
//! watched all along.
//!
//! Percentiles are nearest-rank over the sorted samples (with fewer than 100 samples, p99 is
//! the max). The results also go to `<target dir>/scale.json`; the library's WARN and ERROR
//! events go to `<target dir>/scale-library.log`.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

mod common;

use anyhow::{anyhow, bail, Context, Result};
use shardlease::tokio_postgres::{AsyncMessage, Client, NoTls};
use shardlease::{DbConfig, Member, MemberConfig, MemberState, View};
use shardlease_testkit::PrivateServer;
use tokio::sync::{mpsc, watch, Semaphore};
use tokio::task::{JoinHandle, JoinSet};

use common::{ms, percentile, recreate_database, target_dir, Proc};

const GROUP: &str = "scale";
const FLOOR_CHANNEL: &str = "scale_floor";
/// A phase stops after this many failed repetitions.
const GIVE_UP_AFTER: usize = 3;

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if let Some(i) = args.iter().position(|a| a == "--child") {
        // A child is light: one thread.
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        return rt.block_on(child_main(&args[i + 1..]));
    }
    let opts = Opts::parse(&args)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(bench(opts))
}

// ---------------------------------------------------------------------------------------
// Options

#[derive(Debug, Clone)]
struct Opts {
    sizes: Vec<usize>,
    quick: bool,
    /// kill -9 and leave repetitions per size.
    reps: usize,
    /// Repetitions of each floor.
    floor_reps: usize,
    rest: Duration,
    hold: Duration,
    churn_rounds: usize,
    /// Joins, leaves and kills each in the contended phase.
    contended_events: usize,
    /// A phase starts no new repetition after this long.
    phase: Duration,
    timeout: Duration,
    cold_timeout: Duration,
    churn_timeout: Duration,
    join_concurrency: usize,
    /// The scheduling priority (nice) of the child processes: they stand in for members on
    /// other machines (see the module documentation).
    child_nice: i32,
    /// The private cluster's max_connections.
    max_connections: u32,
    json: PathBuf,
}

impl Opts {
    fn parse(args: &[String]) -> Result<Opts> {
        let quick = args.iter().any(|a| a == "--quick");
        let mut o = Opts {
            sizes: if quick {
                vec![10, 100]
            } else {
                vec![10, 100, 1000]
            },
            quick,
            reps: if quick { 5 } else { 50 },
            floor_reps: if quick { 5 } else { 30 },
            rest: Duration::from_secs(if quick { 3 } else { 20 }),
            hold: Duration::from_secs(if quick { 3 } else { 10 }),
            churn_rounds: if quick { 1 } else { 2 },
            contended_events: if quick { 5 } else { 20 },
            phase: Duration::from_secs(if quick { 20 } else { 60 }),
            timeout: Duration::from_secs(10),
            cold_timeout: Duration::from_secs(60),
            churn_timeout: Duration::from_secs(30),
            join_concurrency: 64,
            child_nice: 19,
            max_connections: 2300,
            json: target_dir().join("scale.json"),
        };
        let mut it = args.iter();
        while let Some(a) = it.next() {
            let mut value = |name: &str| -> Result<String> {
                it.next()
                    .cloned()
                    .with_context(|| format!("{name} needs a value"))
            };
            let num = |name: &str, v: String| -> Result<u64> {
                v.parse()
                    .with_context(|| format!("{name} must be a non-negative integer, got {v:?}"))
            };
            match a.as_str() {
                "--sizes" => {
                    let v = value(a)?;
                    o.sizes = v
                        .split(',')
                        .map(|s| {
                            s.trim()
                                .replace('_', "")
                                .parse::<usize>()
                                .with_context(|| format!("--sizes: bad size {s:?}"))
                        })
                        .collect::<Result<_>>()?;
                }
                "--reps" => o.reps = num(a, value(a)?)? as usize,
                "--floor-reps" => o.floor_reps = num(a, value(a)?)? as usize,
                "--rest-secs" => o.rest = Duration::from_secs(num(a, value(a)?)?),
                "--hold-secs" => o.hold = Duration::from_secs(num(a, value(a)?)?),
                "--churn-rounds" => o.churn_rounds = num(a, value(a)?)? as usize,
                "--contended-events" => o.contended_events = num(a, value(a)?)? as usize,
                "--phase-secs" => o.phase = Duration::from_secs(num(a, value(a)?)?),
                "--timeout-ms" => o.timeout = Duration::from_millis(num(a, value(a)?)?),
                "--cold-timeout-secs" => o.cold_timeout = Duration::from_secs(num(a, value(a)?)?),
                "--churn-timeout-secs" => o.churn_timeout = Duration::from_secs(num(a, value(a)?)?),
                "--join-concurrency" => o.join_concurrency = num(a, value(a)?)? as usize,
                "--max-connections" => o.max_connections = num(a, value(a)?)? as u32,
                "--child-nice" => {
                    let v = value(a)?;
                    o.child_nice = v
                        .parse()
                        .ok()
                        .filter(|n| (0..=19).contains(n))
                        .with_context(|| format!("--child-nice must be 0 to 19, got {v:?}"))?;
                }
                "--json" => o.json = value(a)?.into(),
                // `cargo bench` passes `--bench`.
                "--quick" | "--bench" => {}
                other if other.starts_with('-') => bail!(
                    "unknown flag {other:?}; flags: --sizes 10,100,1000 --quick --reps N \
                     --floor-reps N --rest-secs S --hold-secs S --churn-rounds N --contended-events N \
                     --phase-secs S --timeout-ms MS \
                     --cold-timeout-secs S --churn-timeout-secs S --join-concurrency N --child-nice N --max-connections N --json PATH"
                ),
                _ => {} // a bench filter: ignored
            }
        }
        if o.sizes.is_empty() || o.sizes.contains(&0) {
            bail!("--sizes needs sizes of at least 1");
        }
        if o.sizes.iter().any(|&n| n < 6) {
            bail!("every size must be at least 6 (4 tickers, a holder and an observer)");
        }
        if o.reps == 0 || o.floor_reps == 0 || o.join_concurrency == 0 {
            bail!("--reps, --floor-reps and --join-concurrency must be at least 1");
        }
        if o.rest.is_zero() || o.timeout.is_zero() {
            bail!("--rest-secs and --timeout-ms must be positive");
        }
        Ok(o)
    }
}

// ---------------------------------------------------------------------------------------
// Child processes (this binary, re-executed)

/// `--child member <url> <id>`: join (retrying for 60 s, as a worker would), print
/// `READY <attempts>`, stay until stdin closes or SIGKILL.
/// `--child lock <url> <key>`: take `pg_advisory_lock(1, key)`, print `READY 1`, stay.
async fn child_main(args: &[String]) -> Result<()> {
    let [role, url, arg] = args else {
        bail!("child: expected <role> <url> <arg>, got {args:?}");
    };
    let pg = shardlease::parse_database_url(url)?;
    let _keep: Box<dyn std::any::Any> = match role.as_str() {
        "member" => {
            let deadline = Instant::now() + Duration::from_secs(60);
            let mut delay = Duration::from_millis(20);
            let mut attempts = 0;
            let member = loop {
                attempts += 1;
                match Member::join(&pg, MemberConfig::new(GROUP, arg.as_str())).await {
                    Ok(m) => break m,
                    Err(e) if Instant::now() + delay < deadline => {
                        if attempts == 1 {
                            eprintln!("child {arg}: join failed, retrying: {e}");
                        }
                        tokio::time::sleep(delay).await;
                        delay = (delay * 2).min(Duration::from_millis(500));
                    }
                    Err(e) => {
                        println!("FAILED {e}");
                        std::process::exit(1);
                    }
                }
            };
            println!("READY {attempts}");
            Box::new(member)
        }
        "lock" => {
            let key: i32 = arg.parse()?;
            let client = shardlease::connect_client(&pg, "scale-bench lock holder").await?;
            client
                .execute("SELECT pg_advisory_lock(1, $1)", &[&key])
                .await?;
            println!("READY 1");
            Box::new(client)
        }
        other => bail!("unknown child role {other:?}"),
    };
    let _ =
        tokio::task::spawn_blocking(|| std::io::copy(&mut std::io::stdin(), &mut std::io::sink()))
            .await;
    std::process::exit(0)
}

/// A child `--child <role> <url> <arg>` on the members' database, at `--child-nice`.
fn child(cx: &Ctx<'_>, role: &str, arg: &str) -> Result<Proc> {
    Proc::spawn_nice(
        &format!("{role} {arg}"),
        &["--child", role, &cx.url, arg],
        &[],
        cx.opts.child_nice,
    )
}

// ---------------------------------------------------------------------------------------
// Samples, statistics

/// Repeated measurements of one figure, with the failed repetitions and why.
#[derive(Debug, Default, Clone)]
struct Dist {
    samples: Vec<Duration>,
    failures: Vec<String>,
    /// Events that came after their window (contended: after the held transaction ended).
    late: usize,
    /// Stopped early: the phase used up its time budget (`--phase-secs`).
    cut: bool,
}

impl Dist {
    fn push(&mut self, r: Result<Duration>) {
        match r {
            Ok(d) => self.samples.push(d),
            Err(e) => self.failures.push(format!("{e:#}")),
        }
    }
    /// Keep a sample of an event at `at` only when it is within the window ending at `end`.
    fn push_within(&mut self, at: Instant, r: Result<Duration>, end: Instant) {
        if at > end {
            self.late += 1;
        } else {
            self.push(r);
        }
    }
    /// Stop repeating: after 3 failures, or once the phase has used its time budget.
    fn stop(&mut self, phase_start: Instant, budget: Duration) -> bool {
        if self.failures.len() >= GIVE_UP_AFTER {
            return true;
        }
        self.cut = phase_start.elapsed() >= budget;
        self.cut
    }
    fn sorted(&self) -> Vec<Duration> {
        let mut v = self.samples.clone();
        v.sort();
        v
    }
    fn p(&self, p: f64) -> Option<Duration> {
        let v = self.sorted();
        (!v.is_empty()).then(|| percentile(&v, p))
    }
    fn summary(&self) -> String {
        match (self.p(50.0), self.p(99.0)) {
            (Some(a), Some(b)) => {
                let mut s = format!(
                    "p50 {} · p99 {} (n={})",
                    fmt_d(a),
                    fmt_d(b),
                    self.samples.len()
                );
                if !self.failures.is_empty() {
                    let _ = write!(s, " + {} failed", self.failures.len());
                }
                if self.late > 0 {
                    let _ = write!(s, "; {} after the window, not counted", self.late);
                }
                if self.cut {
                    s += "; phase budget used up";
                }
                s
            }
            _ if self.late > 0 => format!(
                "no sample ({} failed; {} after the window, not counted)",
                self.failures.len(),
                self.late
            ),
            _ => format!("no sample ({} failed)", self.failures.len()),
        }
    }
    fn json(&self) -> serde_json::Value {
        serde_json::json!({
            "p50_ms": self.p(50.0).map(ms),
            "p90_ms": self.p(90.0).map(ms),
            "p99_ms": self.p(99.0).map(ms),
            "max_ms": self.sorted().last().copied().map(ms),
            "samples_ms": self.samples.iter().copied().map(ms).collect::<Vec<_>>(),
            "failures": self.failures,
            "after_the_window": self.late,
            "stopped_at_the_phase_budget": self.cut,
        })
    }
}

fn fmt_d(d: Duration) -> String {
    let m = ms(d);
    if m < 10.0 {
        format!("{m:.2} ms")
    } else if m < 10_000.0 {
        format!("{m:.0} ms")
    } else {
        format!("{:.1} s", d.as_secs_f64())
    }
}

// ---------------------------------------------------------------------------------------
// Watching members

type Rx = watch::Receiver<View>;

fn has(v: &View, id: &str) -> bool {
    v.members.iter().any(|m| m.member_id == id)
}

/// Whether `v` holds every member of `want` (by id) under an incarnation other than the one
/// given (`None`: any). One pass over the view and a lookup per member: every observer runs
/// this at every view change, and checking each wanted id against the whole view (k × N
/// comparisons; 100 × 1,000 in the churn, times 1,000 observers) kept this process's runtime,
/// where the in-process members renew their leases, busy for up to a second.
fn holds_all(v: &View, want: &HashMap<String, Option<i64>>) -> bool {
    let found = v
        .members
        .iter()
        .filter(|m| {
            want.get(&m.member_id)
                .is_some_and(|old| *old != Some(m.incarnation))
        })
        .count();
    found == want.len()
}

fn describe(v: &View) -> String {
    let state = match &v.state {
        MemberState::Joined { slot, .. } => format!("joined in slot {slot}"),
        MemberState::Lost { reason } => format!("lost ({reason})"),
        MemberState::Left => "left".into(),
        other => format!("{other:?}"),
    };
    format!(
        "generation {}, {} members, {state}",
        v.generation,
        v.members.len()
    )
}

/// Wait until `pred` holds on every receiver, until `deadline`. Returns when the last one
/// got there, or what was still missing.
async fn all_hold<P>(
    observers: &[(String, Rx)],
    what: &str,
    deadline: Instant,
    pred: P,
) -> Result<Instant>
where
    P: Fn(&View) -> bool + Clone + Send + Sync + 'static,
{
    let started = Instant::now();
    let tasks: Vec<JoinHandle<Option<Instant>>> = observers
        .iter()
        .map(|(_, rx)| {
            let mut rx = rx.clone();
            let pred = pred.clone();
            tokio::spawn(async move {
                let fut = rx.wait_for(|v| pred(v));
                match tokio::time::timeout_at(deadline.into(), fut).await {
                    Ok(Ok(_)) => Some(Instant::now()),
                    _ => None,
                }
            })
        })
        .collect();
    let mut last = started;
    let mut missing = Vec::new();
    for ((name, rx), t) in observers.iter().zip(tasks) {
        match t.await.ok().flatten() {
            Some(at) => last = last.max(at),
            None => missing.push((name, describe(&rx.borrow()))),
        }
    }
    if missing.is_empty() {
        return Ok(last);
    }
    let (name, view) = &missing[0];
    bail!(
        "{} of {} members did not see {what} within {:?} (e.g. {name}: {view})",
        missing.len(),
        observers.len(),
        deadline.saturating_duration_since(started)
    )
}

/// Counts leases lost by watched members: `Joined` → `Lost`, or `Joined` under a new
/// incarnation without a `Lost` seen in between.
#[derive(Default)]
struct Losses {
    count: AtomicU64,
    examples: Mutex<Vec<String>>,
}

impl Losses {
    fn watch(self: &Arc<Self>, id: String, mut rx: Rx, t0: Instant) {
        let me = self.clone();
        tokio::spawn(async move {
            let mut joined: Option<i64> = None;
            let mut counted = false;
            loop {
                let state = rx.borrow_and_update().state.clone();
                let lost = match state {
                    MemberState::Joined { incarnation, .. } => {
                        let lost = matches!(joined, Some(j) if j != incarnation) && !counted;
                        joined = Some(incarnation);
                        counted = false;
                        lost.then(|| "rejoined under a new incarnation".to_owned())
                    }
                    MemberState::Lost { reason } if joined.is_some() && !counted => {
                        counted = true;
                        Some(reason)
                    }
                    MemberState::Left => return,
                    _ => None,
                };
                if let Some(reason) = lost {
                    me.count.fetch_add(1, Ordering::Relaxed);
                    let mut ex = me.examples.lock().expect("examples");
                    if ex.len() < 20 {
                        ex.push(format!(
                            "{id} at {:.1} s: {reason}",
                            t0.elapsed().as_secs_f64()
                        ));
                    }
                }
                if rx.changed().await.is_err() {
                    return;
                }
            }
        });
    }
    fn get(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }
}

// ---------------------------------------------------------------------------------------
// Connections

/// A plain connection whose notifications go to `tx` as (arrival, payload).
async fn listener(pg: &DbConfig, tx: mpsc::UnboundedSender<(Instant, String)>) -> Result<Client> {
    let mut cfg = pg.pg().clone();
    cfg.application_name("scale-bench floor listener");
    let (client, mut connection) = cfg.connect(NoTls).await.context("connect a listener")?;
    tokio::spawn(async move {
        while let Some(m) = std::future::poll_fn(|cx| connection.poll_message(cx)).await {
            match m {
                Ok(AsyncMessage::Notification(n)) => {
                    let _ = tx.send((Instant::now(), n.payload().to_owned()));
                }
                Ok(_) => {}
                Err(_) => break,
            }
        }
    });
    client
        .batch_execute(&format!("LISTEN {FLOOR_CHANNEL}"))
        .await?;
    Ok(client)
}

/// The floor of a membership change: `writer` commits a row and a NOTIFY with `payload`;
/// the time from sending it until all `n` listeners behind `rx` have it.
async fn write_notify(
    writer: &Client,
    rx: &mut mpsc::UnboundedReceiver<(Instant, String)>,
    payload: &str,
    n: usize,
    timeout: Duration,
) -> Result<Duration> {
    let t0 = Instant::now();
    writer
        .batch_execute(&format!(
            "BEGIN; INSERT INTO scale_floor VALUES (clock_timestamp()); \
             NOTIFY {FLOOR_CHANNEL}, '{payload}'; COMMIT"
        ))
        .await?;
    Ok(fan_in(rx, payload, n, t0 + timeout).await? - t0)
}

/// Wait until `n` notifications with `payload` have arrived; the last one's arrival.
async fn fan_in(
    rx: &mut mpsc::UnboundedReceiver<(Instant, String)>,
    payload: &str,
    n: usize,
    deadline: Instant,
) -> Result<Instant> {
    let mut got = 0;
    let mut last = None;
    while got < n {
        match tokio::time::timeout_at(deadline.into(), rx.recv()).await {
            Ok(Some((at, p))) if p == payload => {
                got += 1;
                last = Some(at);
            }
            Ok(Some(_)) => {}
            Ok(None) => bail!("the listeners' channel closed"),
            Err(_) => bail!("only {got} of {n} listeners had NOTIFY {payload:?} in time"),
        }
    }
    last.context("no listener")
}

/// Wait until backend `pid` is queued on an advisory lock.
async fn wait_queued(observer: &Client, pid: i32, deadline: Instant) -> Result<()> {
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

// ---------------------------------------------------------------------------------------
// One size

/// Everything measured at one size.
#[derive(Default)]
struct SizeResult {
    n: usize,
    join_concurrency: usize,
    floor_connect: Option<Duration>,
    floor_connect_err: Option<String>,
    floor_idle_cores: Option<f64>,
    /// The cluster's CPU while every floor connection runs one prepared `SELECT 1` a second.
    floor_busy_cores: Option<f64>,
    floor_notify: Dist,
    floor_lock: Dist,
    floor_restart: Dist,
    cold: Dist,
    cold_joins_returned: Option<Duration>,
    cold_join_errors: Vec<String>,
    /// Join attempts that failed transiently and were retried.
    cold_retries: usize,
    /// The renewing heartbeats (`shardlease.heartbeat`; the beats between are plain reads)
    /// during the churn rounds: calls, mean and max server time (ms).
    churn_heartbeat: Option<(i64, f64, f64)>,
    /// How late a 10 ms timer of this process fired at most during the churn rounds.
    churn_timer_late: Option<Duration>,
    /// The cluster's CPU over the cold start (cores).
    cold_cores: Option<f64>,
    /// The statements that took the most server time during the cold start: query, calls,
    /// mean and total execution time (ms).
    cold_top: Vec<(String, i64, f64, f64)>,
    joined: usize,
    rest_cores: Option<f64>,
    rest_statements: Option<f64>,
    rest_statements_err: Option<String>,
    rest_xacts: Option<f64>,
    /// The busiest statements at rest: query, calls, mean execution time (ms).
    rest_top: Vec<(String, i64, f64)>,
    rest_losses: u64,
    kill: Dist,
    join: Dist,
    leave: Dist,
    contended_join: Dist,
    contended_leave: Dist,
    contended_reap: Dist,
    /// The floor in the same window: a row write + NOTIFY until N plain listeners have it.
    contended_floor: Dist,
    contended_losses: u64,
    contended_ticks: (u64, u64, u64),
    contended_tick_errors: Vec<String>,
    contended_hold: String,
    churn: Dist,
    churn_losses: u64,
    churn_k: usize,
    total_losses: u64,
    elapsed: Duration,
    notes: Vec<String>,
    /// The library's WARN/ERROR events during this size: (message, count), most first.
    library_log: Vec<(String, usize)>,
    /// The server's WARNING/ERROR/FATAL lines during this size.
    server_log: Vec<(String, usize)>,
}

/// What one size's phases share.
struct Ctx<'a> {
    opts: &'a Opts,
    server: &'a PrivateServer,
    /// The members' database.
    url: String,
    pg: DbConfig,
    /// On the `postgres` database: statistics and CPU readings come from here.
    admin: Client,
    /// On the members' database.
    local: Client,
    db_name: String,
    db_oid: u32,
    losses: Arc<Losses>,
    started: Instant,
}

fn cfg(id: &str) -> MemberConfig {
    MemberConfig::new(GROUP, id)
}

fn observers(members: &[Member]) -> Vec<(String, Rx)> {
    members
        .iter()
        .map(|m| (m.member_id().to_owned(), m.watch()))
        .collect()
}

async fn leave_bounded(m: Member, timeout: Duration) -> Result<()> {
    let id = m.member_id().to_owned();
    tokio::time::timeout(timeout, m.leave())
        .await
        .map_err(|_| anyhow!("{id}: leave() did not return within {timeout:?}"))?
        .with_context(|| format!("{id}: leave()"))
}

/// Join, retrying transient failures (as the worker does) with capped backoff until
/// `deadline`. Returns the member and the attempts it took.
async fn join_retrying(pg: &DbConfig, id: &str, deadline: Instant) -> Result<(Member, u32)> {
    let mut delay = Duration::from_millis(20);
    let mut attempts = 0;
    loop {
        attempts += 1;
        match tokio::time::timeout_at(deadline.into(), Member::join(pg, cfg(id))).await {
            Ok(Ok(m)) => return Ok((m, attempts)),
            Ok(Err(e)) if e.is_transient() && Instant::now() + delay < deadline => {
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(1));
            }
            Ok(Err(e)) => {
                return Err(anyhow::Error::new(e)
                    .context(format!("{id}: Member::join, attempt {attempts}")))
            }
            Err(_) => bail!("{id}: not joined by the deadline after {attempts} attempts"),
        }
    }
}

/// Open `n` LISTENing connections, `concurrency` at a time, until `deadline`.
async fn open_listeners(
    pg: &DbConfig,
    n: usize,
    concurrency: usize,
    tx: &mpsc::UnboundedSender<(Instant, String)>,
    deadline: Instant,
) -> (Vec<Client>, Vec<String>) {
    let sem = Arc::new(Semaphore::new(concurrency));
    let mut set = JoinSet::new();
    for _ in 0..n {
        let (pg, tx, sem) = (pg.clone(), tx.clone(), sem.clone());
        set.spawn(async move {
            let _permit = sem.acquire_owned().await?;
            listener(&pg, tx).await
        });
    }
    let mut clients = Vec::new();
    let mut errors = Vec::new();
    loop {
        match tokio::time::timeout_at(deadline.into(), set.join_next()).await {
            Ok(Some(Ok(Ok(c)))) => clients.push(c),
            Ok(Some(Ok(Err(e)))) => errors.push(format!("{e:#}")),
            Ok(Some(Err(e))) => errors.push(format!("listener task: {e}")),
            Ok(None) => break,
            Err(_) => {
                errors.push(format!(
                    "{} of {n} connections not open by the deadline",
                    n - clients.len() - errors.len()
                ));
                break;
            }
        }
    }
    (clients, errors)
}

/// The cluster's CPU over `window` while each of `clients` runs one prepared `SELECT 1` a
/// second, their phases spread evenly over the second: what waking N backends once a second
/// each costs the server, before any of the library's work (the members' heartbeat rate).
async fn statement_a_second(cx: &Ctx<'_>, clients: &[Client], window: Duration) -> Result<f64> {
    let n = clients.len().max(1) as f64;
    let second = Duration::from_secs(1);
    let start = tokio::time::Instant::now() + Duration::from_millis(100);
    // One round first, so that every backend has its statement planned before the window.
    let warm = 2 * second;
    let stop = start + warm + window + second;
    let load =
        futures_util::future::join_all(clients.iter().enumerate().map(|(i, c)| async move {
            let statement = c.prepare("SELECT 1").await?;
            let mut tick = tokio::time::interval_at(start + second.mul_f64(i as f64 / n), second);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            while tick.tick().await < stop {
                c.query(&statement, &[]).await?;
            }
            anyhow::Ok(())
        }));
    let measure = async {
        tokio::time::sleep_until(start + warm).await;
        cx.server.measure_cpu(window).await
    };
    let (done, cpu) = tokio::join!(load, measure);
    if let Some(e) = done.into_iter().find_map(Result::err) {
        return Err(e.context("the one-statement-a-second floor"));
    }
    Ok(cpu?.cores())
}

/// The floors, on the quiet server (no member yet), with N LISTENing connections open.
async fn floors(cx: &Ctx<'_>, n: usize, r: &mut SizeResult) -> Result<()> {
    let o = cx.opts;
    let (tx, mut rx) = mpsc::unbounded_channel();
    let t0 = Instant::now();
    let (listeners, errors) =
        open_listeners(&cx.pg, n, o.join_concurrency, &tx, t0 + o.cold_timeout).await;
    if errors.is_empty() {
        r.floor_connect = Some(t0.elapsed());
    } else {
        r.floor_connect_err = Some(format!(
            "{} of {n} connections failed: {}",
            errors.len(),
            errors[0]
        ));
    }
    let listening = listeners.len();
    eprintln!(
        "  floor: {listening} listeners open in {:.2} s",
        t0.elapsed().as_secs_f64()
    );

    let cpu = cx.server.measure_cpu(o.rest).await?;
    r.floor_idle_cores = Some(cpu.cores());
    eprintln!(
        "  floor: idle server with {listening} connections: {:.3} core",
        cpu.cores()
    );
    let busy = statement_a_second(cx, &listeners, o.rest).await?;
    r.floor_busy_cores = Some(busy);
    eprintln!("  floor: one SELECT 1 a second on each of {listening} connections: {busy:.3} core");

    // Row write + NOTIFY → all N listeners.
    cx.local
        .batch_execute("CREATE TABLE scale_floor (at timestamptz)")
        .await?;
    write_notify(&cx.local, &mut rx, "warm", listening, o.timeout).await?;
    let phase = Instant::now();
    for rep in 0..o.floor_reps {
        if r.floor_notify.stop(phase, o.phase) {
            break;
        }
        let payload = format!("w{rep}");
        let res = write_notify(&cx.local, &mut rx, &payload, listening, o.timeout).await;
        r.floor_notify.push(res);
    }
    eprintln!(
        "  floor: write + NOTIFY to {listening}: {}",
        r.floor_notify.summary()
    );

    // kill -9 of a lock holder → a blocked connection gets the lock and NOTIFYs → all N.
    let waiter = Arc::new(shardlease::connect_client(&cx.pg, "scale-bench lock waiter").await?);
    let waiter_pid: i32 = waiter
        .query_one("SELECT pg_backend_pid()", &[])
        .await?
        .get(0);
    let phase = Instant::now();
    for rep in 0..o.floor_reps {
        if r.floor_lock.stop(phase, o.phase) {
            break;
        }
        let mut holder = child(cx, "lock", "1")?;
        let res = async {
            holder.ready(o.timeout).await?;
            let payload = format!("k{rep}");
            let w = waiter.clone();
            let sql = format!(
                "SELECT pg_advisory_lock(1, 1); NOTIFY {FLOOR_CHANNEL}, '{payload}'; \
                 SELECT pg_advisory_unlock(1, 1)"
            );
            let blocked = tokio::spawn(async move { w.batch_execute(&sql).await });
            wait_queued(&cx.local, waiter_pid, Instant::now() + o.timeout).await?;
            let t0 = holder.kill9()?;
            let last = fan_in(&mut rx, &payload, listening, t0 + o.timeout).await?;
            tokio::time::timeout(o.timeout, blocked)
                .await
                .map_err(|_| anyhow!("the lock waiter did not finish"))???;
            Ok(last - t0)
        }
        .await;
        holder.reap(o.timeout).await;
        r.floor_lock.push(res);
    }
    eprintln!(
        "  floor: kill -9 → lock free → NOTIFY to {listening}: {}",
        r.floor_lock.summary()
    );
    drop(listeners);

    // k processes started, each connected and holding a lock.
    let k = n.div_ceil(10);
    let phase = Instant::now();
    for _ in 0..o.churn_rounds.max(1) {
        if r.floor_restart.stop(phase, o.phase) {
            break;
        }
        let t0 = Instant::now();
        let res = async {
            let mut procs = Vec::new();
            for i in 0..k {
                procs.push(child(cx, "lock", &(100 + i).to_string())?);
            }
            let deadline = t0 + o.churn_timeout;
            let mut result = Ok(());
            for p in procs.iter_mut() {
                if let Err(e) = p
                    .ready(deadline.saturating_duration_since(Instant::now()))
                    .await
                {
                    result = Err(e);
                    break;
                }
            }
            let took = t0.elapsed();
            for p in procs {
                p.reap(o.timeout).await;
            }
            result.map(|()| took)
        }
        .await;
        r.floor_restart.push(res);
    }
    eprintln!(
        "  floor: {k} processes started, connected, locked: {}",
        r.floor_restart.summary()
    );
    Ok(())
}

/// N joins, `--join-concurrency` in flight, until every member's view shows N.
async fn cold_start(cx: &Ctx<'_>, n: usize, r: &mut SizeResult) -> Vec<Member> {
    let o = cx.opts;
    let sem = Arc::new(Semaphore::new(o.join_concurrency));
    let stmts_reset = reset_statements(cx).await.is_ok();
    let cpu0 = cx.server.cpu_time().ok();
    let t0 = Instant::now();
    let deadline = t0 + o.cold_timeout;
    let mut set = JoinSet::new();
    for i in 0..n {
        let (pg, sem) = (cx.pg.clone(), sem.clone());
        set.spawn(async move {
            let _permit = sem.acquire_owned().await.map_err(|e| anyhow!("{e}"))?;
            let id = format!("m{i:04}");
            join_retrying(&pg, &id, deadline)
                .await
                .map(|(m, attempts)| (i, m, attempts))
        });
    }
    let mut joined = Vec::new();
    loop {
        match tokio::time::timeout_at(deadline.into(), set.join_next()).await {
            Ok(Some(Ok(Ok((i, m, attempts))))) => {
                r.cold_retries += attempts as usize - 1;
                joined.push((i, m));
            }
            Ok(Some(Ok(Err(e)))) => r.cold_join_errors.push(format!("{e:#}")),
            Ok(Some(Err(e))) => r.cold_join_errors.push(format!("join task: {e}")),
            Ok(None) => break,
            Err(_) => {
                r.cold_join_errors.push(format!(
                    "{} joins had not returned after {:?}",
                    set.len(),
                    o.cold_timeout
                ));
                set.abort_all();
                break;
            }
        }
    }
    if r.cold_join_errors.is_empty() {
        r.cold_joins_returned = Some(t0.elapsed());
    }
    joined.sort_by_key(|(i, _)| *i);
    let members: Vec<Member> = joined.into_iter().map(|(_, m)| m).collect();
    for m in &members {
        cx.losses
            .watch(m.member_id().to_owned(), m.watch(), cx.started);
    }
    r.joined = members.len();
    let obs = observers(&members);
    let want = members.len();
    let res = all_hold(
        &obs,
        &format!("{n} members"),
        deadline.max(Instant::now() + Duration::from_millis(1)),
        move |v| v.is_joined() && v.members.len() == want,
    )
    .await;
    let res = match res {
        _ if want < n => Err(anyhow!(
            "only {want} of {n} members joined within {:?} ({})",
            o.cold_timeout,
            r.cold_join_errors
                .first()
                .map(String::as_str)
                .unwrap_or("-")
        )),
        Ok(last) => Ok(last - t0),
        Err(e) => Err(e.context(format!("cold start not done within {:?}", o.cold_timeout))),
    };
    r.cold.push(res);
    let wall = t0.elapsed();
    if let (Some(c0), Ok(c1)) = (cpu0, cx.server.cpu_time()) {
        r.cold_cores = Some((c1.saturating_sub(c0)).as_secs_f64() / wall.as_secs_f64());
    }
    if stmts_reset {
        r.cold_top = busiest(cx, "total_exec_time", 5).await.unwrap_or_default();
    }
    eprintln!(
        "  cold start: {} ({} of {n} joined, {} retried attempts; all joins returned: {})",
        r.cold.summary(),
        members.len(),
        r.cold_retries,
        r.cold_joins_returned
            .map(fmt_d)
            .unwrap_or_else(|| "no".into())
    );
    members
}

/// Start `pg_stat_statements` afresh, for a phase's own statement counts (see [`busiest`]).
async fn reset_statements(cx: &Ctx<'_>) -> Result<(), shardlease::tokio_postgres::Error> {
    cx.admin
        .batch_execute("SELECT pg_stat_statements_reset()")
        .await
}

/// The members' database's busiest statements since the last `pg_stat_statements_reset()`,
/// by `order` (a pg_stat_statements column): query, calls, mean and total execution time (ms).
async fn busiest(cx: &Ctx<'_>, order: &str, limit: i64) -> Result<Vec<(String, i64, f64, f64)>> {
    Ok(cx
        .admin
        .query(
            &format!(
                "SELECT regexp_replace(query, '\\s+', ' ', 'g'), calls, mean_exec_time, total_exec_time \
                 FROM pg_stat_statements WHERE dbid = $1 ORDER BY {order} DESC LIMIT $2"
            ),
            &[&cx.db_oid, &limit],
        )
        .await?
        .iter()
        .map(|row| (row.get(0), row.get(1), row.get(2), row.get(3)))
        .collect())
}

/// CPU, statements and transactions at rest.
async fn at_rest(cx: &Ctx<'_>, members: usize, r: &mut SizeResult) -> Result<()> {
    let o = cx.opts;
    // Let the joins' last refreshes pass: one heartbeat and a bit.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let stmts_ok = reset_statements(cx).await;
    let xacts = || async {
        cx.admin
            .query_one(
                "SELECT xact_commit FROM pg_stat_database WHERE datname = $1",
                &[&cx.db_name],
            )
            .await
            .map(|row| row.get::<_, i64>(0))
    };
    let x0 = xacts().await?;
    let l0 = cx.losses.get();
    let t0 = Instant::now();
    let cpu = cx.server.measure_cpu(o.rest).await?;
    let secs = t0.elapsed().as_secs_f64();
    r.rest_cores = Some(cpu.cores());
    r.rest_losses = cx.losses.get() - l0;
    match stmts_ok {
        Ok(()) => {
            let calls: i64 = cx
                .admin
                .query_one(
                    "SELECT coalesce(sum(calls), 0)::bigint FROM pg_stat_statements WHERE dbid = $1",
                    &[&cx.db_oid],
                )
                .await?
                .get(0);
            r.rest_statements = Some(calls as f64 / members.max(1) as f64 / secs);
            r.rest_top = busiest(cx, "calls", 5)
                .await?
                .into_iter()
                .map(|(q, calls, mean, _)| (q, calls, mean))
                .collect();
        }
        Err(e) => r.rest_statements_err = Some(format!("pg_stat_statements: {e}")),
    }
    // Backends flush their counters when idle, at most once a second: the edges of the
    // window may be off by a second's worth.
    let x1 = xacts().await?;
    r.rest_xacts = Some((x1 - x0) as f64 / members.max(1) as f64 / secs);
    eprintln!(
        "  at rest: {:.3} core; {} statements and {:.2} transactions per member per second; {} leases lost",
        cpu.cores(),
        r.rest_statements
            .map(|s| format!("{s:.2}"))
            .unwrap_or_else(|| "?".into()),
        r.rest_xacts.unwrap_or(0.0),
        r.rest_losses
    );
    Ok(())
}

/// A child-process member joins, and is killed: until every in-process member's view lacks it.
/// Returns the instant of the kill and the time until the last view.
async fn kill_once(cx: &Ctx<'_>, obs: &[(String, Rx)], id: &str) -> Result<(Instant, Duration)> {
    let o = cx.opts;
    let mut p = child(cx, "member", id)?;
    let res = async {
        p.ready(o.timeout).await?;
        let want = id.to_owned();
        all_hold(
            obs,
            &format!("{id} join"),
            Instant::now() + o.timeout,
            move |v| has(v, &want),
        )
        .await?;
        let t0 = p.kill9()?;
        let want = id.to_owned();
        let last = all_hold(
            obs,
            &format!("{id} gone after kill -9"),
            t0 + o.timeout,
            move |v| v.is_joined() && !has(v, &want),
        )
        .await?;
        Ok((t0, last - t0))
    }
    .await;
    p.reap(o.timeout).await;
    res
}

/// An in-process member joins (timed until every view has it) and leaves (timed until every
/// other view lacks it). Returns each event's start and result; no leave after a failed join.
type Timed = (Instant, Result<Duration>);

async fn join_leave_once(cx: &Ctx<'_>, obs: &[(String, Rx)], id: &str) -> (Timed, Option<Timed>) {
    let o = cx.opts;
    let t0 = Instant::now();
    let m = match join_retrying(&cx.pg, id, t0 + o.timeout).await {
        Ok((m, _)) => m,
        Err(e) => return ((t0, Err(e)), None),
    };
    cx.losses.watch(id.to_owned(), m.watch(), cx.started);
    let mut all = obs.to_vec();
    all.push((id.to_owned(), m.watch()));
    let want = id.to_owned();
    let seen = all_hold(&all, &format!("{id} join"), t0 + o.timeout, move |v| {
        v.is_joined() && has(v, &want)
    })
    .await;
    let join = (t0, seen.map(|last| last - t0));
    let t1 = Instant::now();
    let res = async {
        leave_bounded(m, o.timeout).await?;
        let want = id.to_owned();
        let last = all_hold(
            obs,
            &format!("{id} gone after leave()"),
            t1 + o.timeout,
            move |v| v.is_joined() && !has(v, &want),
        )
        .await?;
        Ok(last - t1)
    }
    .await;
    (join, Some((t1, res)))
}

fn is_fenced(e: &anyhow::Error) -> bool {
    matches!(
        e.downcast_ref::<shardlease::Error>(),
        Some(shardlease::Error::Fenced { .. })
    )
}

/// One fenced tick: an upsert of this member's row, under the view's fence.
async fn tick(view: &View, client: &mut Client) -> Result<()> {
    let fence = view.fence()?;
    let slot = fence.slot() as i32;
    let tx = fence.begin(client).await?;
    tx.execute(
        "INSERT INTO scale_ticks (slot, n) VALUES ($1, 1) \
         ON CONFLICT (slot) DO UPDATE SET n = scale_ticks.n + 1",
        &[&slot],
    )
    .await?;
    tx.commit().await?;
    Ok(())
}

#[derive(Default)]
struct TickCounts {
    ok: AtomicU64,
    fenced: AtomicU64,
    errors: AtomicU64,
    examples: Mutex<Vec<String>>,
}

/// Fenced ticks back to back until `stop`; after a rejection, wait for the next view (at
/// most 1 s) and retry.
fn ticker(
    pg: DbConfig,
    mut rx: Rx,
    counts: Arc<TickCounts>,
    stop: watch::Receiver<bool>,
) -> JoinHandle<Result<()>> {
    tokio::spawn(async move {
        let mut client = shardlease::connect_client(&pg, "scale-bench ticker").await?;
        while !*stop.borrow() {
            let view = rx.borrow_and_update().clone();
            match tick(&view, &mut client).await {
                Ok(()) => {
                    counts.ok.fetch_add(1, Ordering::Relaxed);
                }
                Err(e) => {
                    let wait = if is_fenced(&e) {
                        counts.fenced.fetch_add(1, Ordering::Relaxed);
                        Duration::from_secs(1)
                    } else {
                        counts.errors.fetch_add(1, Ordering::Relaxed);
                        let mut ex = counts.examples.lock().expect("examples");
                        if ex.len() < 5 {
                            ex.push(format!("{e:#}"));
                        }
                        Duration::from_millis(100)
                    };
                    if client.is_closed() {
                        client = shardlease::connect_client(&pg, "scale-bench ticker").await?;
                    }
                    let _ = tokio::time::timeout(wait, rx.changed()).await;
                }
            }
        }
        Ok(())
    })
}

/// Joins, leaves and reaps while 4 members tick back to back and a fifth holds a fenced
/// transaction open. The members that leave and the child processes that are killed join
/// before the transaction opens; during it, joins, leaves and kill -9s run in three loops
/// side by side, `--contended-events` each or until the transaction ends. Only events that
/// start while it is open count.
async fn contended(cx: &Ctx<'_>, members: &[Member], r: &mut SizeResult) -> Result<()> {
    let o = cx.opts;
    cx.local
        .batch_execute("CREATE TABLE scale_ticks (slot integer PRIMARY KEY, n bigint NOT NULL)")
        .await?;
    let obs = observers(members);
    let events = o.contended_events;

    // The pools, joined while nothing holds the group.
    let mut leavers = Vec::new();
    for i in 0..events {
        let id = format!("c-leaver-{i}");
        match join_retrying(&cx.pg, &id, Instant::now() + o.timeout).await {
            Ok((m, _)) => {
                cx.losses.watch(id, m.watch(), cx.started);
                leavers.push(m);
            }
            Err(e) => {
                r.notes.push(format!("contended setup: {e:#}"));
                break;
            }
        }
    }
    let mut victims = Vec::new();
    for i in 0..events {
        victims.push(child(cx, "member", &format!("c-victim-{i}"))?);
    }
    // Not measured: as long as a churn round may take.
    let setup_deadline = Instant::now() + o.churn_timeout;
    let mut ready = 0;
    for p in victims.iter_mut() {
        match p
            .ready(setup_deadline.saturating_duration_since(Instant::now()))
            .await
        {
            Ok(_) => ready += 1,
            Err(e) => {
                r.notes.push(format!("contended setup: {e:#}"));
                break;
            }
        }
    }
    victims.truncate(ready);
    let want: HashMap<String, Option<i64>> = leavers
        .iter()
        .map(|m| m.member_id().to_owned())
        .chain((0..victims.len()).map(|i| format!("c-victim-{i}")))
        .map(|id| (id, None))
        .collect();
    if let Err(e) = all_hold(
        &obs,
        "the contended phase's pools join",
        setup_deadline,
        move |v| holds_all(v, &want),
    )
    .await
    {
        r.notes.push(format!("contended setup: {e:#}"));
    }

    // The floor for this phase, measured in the same window: N plain listeners, and a
    // connection of its own that writes a row and NOTIFYs them. In a database of their own:
    // a NOTIFY wakes every listening backend of its database, whatever the channel, so
    // listeners beside the members' would double the fan-out of every announcement.
    // The floor is a reference, not the measurement: without it the phase still runs.
    let floor_db = format!("{}_floor", cx.db_name);
    let (floor_tx, mut floor_rx) = mpsc::unbounded_channel();
    let floor_setup = async {
        recreate_database(&cx.admin, &floor_db).await?;
        let pg = shardlease::parse_database_url(&cx.server.url_of(&floor_db))?;
        let writer = shardlease::connect_client(&pg, "scale-bench contended floor").await?;
        writer
            .batch_execute("CREATE TABLE scale_floor (at timestamptz)")
            .await?;
        let (listeners, errors) = open_listeners(
            &pg,
            members.len(),
            o.join_concurrency,
            &floor_tx,
            setup_deadline,
        )
        .await;
        if let Some(e) = errors.first() {
            bail!(
                "{} of {} listeners failed to open (e.g. {e})",
                errors.len(),
                members.len()
            );
        }
        // As for the quiet floor: the writer's first statements are not part of it.
        write_notify(&writer, &mut floor_rx, "warm", listeners.len(), o.timeout).await?;
        Ok((writer, listeners))
    }
    .await;
    drop(floor_tx);
    let (floor_writer, floor_listeners) = match floor_setup {
        Ok((writer, listeners)) => (Some(writer), listeners),
        Err(e) => {
            r.notes
                .push(format!("contended floor: {e:#}; no floor measured"));
            (None, Vec::new())
        }
    };

    let counts = Arc::new(TickCounts::default());
    let (stop_tx, stop_rx) = watch::channel(false);
    let tickers: Vec<_> = members[..4]
        .iter()
        .map(|m| ticker(cx.pg.clone(), m.watch(), counts.clone(), stop_rx.clone()))
        .collect();
    let l0 = cx.losses.get();

    // The holder: a fenced transaction with one write, open for --hold-secs.
    let hold = o.hold;
    let holder_rx = members[4].watch();
    let mut holder_client = shardlease::connect_client(&cx.pg, "scale-bench holder").await?;
    let (began_tx, began) = tokio::sync::oneshot::channel();
    let open_within = o.timeout;
    let holder = tokio::spawn(async move {
        let t0 = Instant::now();
        let mut rx = holder_rx;
        let mut refused = 0;
        let res: Result<()> = async {
            // As an application does: a fenced refusal means a newer view is on its way;
            // wait for it and try again (a trial transaction, rolled back, finds the fence).
            let fence = loop {
                let view = rx.borrow_and_update().clone();
                let tried = async {
                    let fence = view.fence()?;
                    drop(fence.begin(&mut holder_client).await?);
                    Ok::<_, anyhow::Error>(fence)
                }
                .await;
                match tried {
                    Ok(fence) => break fence,
                    Err(e) if is_fenced(&e) && t0.elapsed() < open_within => {
                        refused += 1;
                        let _ = tokio::time::timeout(Duration::from_secs(1), rx.changed()).await;
                    }
                    Err(e) => return Err(e),
                }
            };
            let slot = fence.slot() as i32;
            let tx = fence.begin(&mut holder_client).await?;
            tx.execute(
                "INSERT INTO scale_ticks (slot, n) VALUES ($1, 1) \
                 ON CONFLICT (slot) DO UPDATE SET n = scale_ticks.n + 1",
                &[&slot],
            )
            .await?;
            let _ = began_tx.send(Instant::now());
            tokio::time::sleep(hold).await;
            tx.commit().await?;
            Ok(())
        }
        .await;
        let ended = Instant::now();
        let what = match res {
            Ok(()) => format!(
                "held {:.1} s, committed ({refused} fenced refusals before it opened)",
                t0.elapsed().as_secs_f64()
            ),
            Err(e) => format!(
                "ended after {:.1} s ({refused} fenced refusals before): {e:#}",
                t0.elapsed().as_secs_f64()
            ),
        };
        (ended, what)
    });
    // The window opens when the transaction has written.
    let opened = tokio::time::timeout(o.timeout + Duration::from_secs(2), began).await;
    let hold_end = Instant::now() + o.hold;
    let (mut joins, mut leaves, mut reaps) = (Vec::new(), Vec::new(), Vec::new());
    let mut floor = Vec::new();
    let mut joiners = Vec::new();
    if let Ok(Ok(_)) = opened {
        // Three loops side by side, so that an event kind that waits behind the held
        // transaction does not keep the others out of the window; a fourth for the floor.
        let join_loop = async {
            for i in 0..events {
                if Instant::now() >= hold_end {
                    break;
                }
                // Join: until every view, the joiner's too, has it.
                let id = format!("c-joiner-{i}");
                let t0 = Instant::now();
                let res = async {
                    let (m, _) = join_retrying(&cx.pg, &id, t0 + o.timeout).await?;
                    cx.losses.watch(id.clone(), m.watch(), cx.started);
                    let mut all = obs.clone();
                    all.push((id.clone(), m.watch()));
                    joiners.push(m);
                    let want = id.clone();
                    let last = all_hold(&all, &format!("{id} join"), t0 + o.timeout, move |v| {
                        v.is_joined() && has(v, &want)
                    })
                    .await?;
                    Ok(last - t0)
                }
                .await;
                joins.push((t0, res));
            }
        };
        let leave_loop = async {
            while Instant::now() < hold_end {
                // Leave: until every observer's view lacks it.
                let Some(m) = leavers.pop() else { break };
                let id = m.member_id().to_owned();
                let t0 = Instant::now();
                let res = async {
                    leave_bounded(m, o.timeout).await?;
                    let want = id.clone();
                    let last = all_hold(
                        &obs,
                        &format!("{id} gone after leave()"),
                        t0 + o.timeout,
                        move |v| v.is_joined() && !has(v, &want),
                    )
                    .await?;
                    Ok(last - t0)
                }
                .await;
                leaves.push((t0, res));
            }
        };
        let reap_loop = async {
            while Instant::now() < hold_end {
                // Reap: kill -9 of a child member, until every observer's view lacks it.
                let Some(mut p) = victims.pop() else { break };
                let id = format!("c-victim-{}", victims.len());
                let res = async {
                    let t0 = p.kill9()?;
                    let want = id.clone();
                    let last = all_hold(
                        &obs,
                        &format!("{id} gone after kill -9"),
                        t0 + o.timeout,
                        move |v| v.is_joined() && !has(v, &want),
                    )
                    .await?;
                    Ok((t0, last - t0))
                }
                .await;
                match res {
                    Ok((t0, d)) => reaps.push((t0, Ok(d))),
                    Err(e) => reaps.push((Instant::now(), Err(e))),
                }
                p.reap(o.timeout).await;
            }
        };
        // The floor, back to back as the events are: a row write and NOTIFY, until every
        // listener has it.
        let floor_loop = async {
            let Some(floor_writer) = floor_writer.as_ref() else {
                return;
            };
            for i in 0..events {
                if Instant::now() >= hold_end {
                    break;
                }
                let payload = format!("c{i}");
                let t0 = Instant::now();
                let n = floor_listeners.len();
                let res = write_notify(floor_writer, &mut floor_rx, &payload, n, o.timeout).await;
                floor.push((t0, res));
            }
        };
        tokio::join!(join_loop, leave_loop, reap_loop, floor_loop);
    } else {
        r.notes.push(format!(
            "contended: the fenced transaction did not open within {:?}; no event was measured",
            o.timeout
        ));
    }
    // Only events that started while the transaction was held count.
    let (window_end, what) = match tokio::time::timeout(o.hold + o.timeout, holder).await {
        Ok(Ok((ended, s))) => (ended.min(hold_end), s),
        Ok(Err(e)) => (hold_end, format!("holder task failed: {e}")),
        Err(_) => (
            hold_end,
            format!(
                "still open {:?} after the hold should have ended",
                o.timeout
            ),
        ),
    };
    r.contended_hold = what;
    for (at, res) in joins {
        r.contended_join.push_within(at, res, window_end);
    }
    for (at, res) in leaves {
        r.contended_leave.push_within(at, res, window_end);
    }
    for (at, res) in reaps {
        r.contended_reap.push_within(at, res, window_end);
    }
    for (at, res) in floor {
        r.contended_floor.push_within(at, res, window_end);
    }
    drop(floor_listeners);
    drop(floor_writer);
    if let Err(e) = cx
        .admin
        .batch_execute(&format!("DROP DATABASE IF EXISTS {floor_db} WITH (FORCE)"))
        .await
    {
        r.notes
            .push(format!("contended floor: dropping {floor_db}: {e}"));
    }
    let _ = stop_tx.send(true);
    for t in tickers {
        match tokio::time::timeout(o.timeout, t).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(e))) => r
                .contended_tick_errors
                .push(format!("ticker stopped: {e:#}")),
            Ok(Err(e)) => r.contended_tick_errors.push(format!("ticker task: {e}")),
            Err(_) => r
                .contended_tick_errors
                .push(format!("a ticker did not stop within {:?}", o.timeout)),
        }
    }
    r.contended_losses = cx.losses.get() - l0;
    r.contended_ticks = (
        counts.ok.load(Ordering::Relaxed),
        counts.fenced.load(Ordering::Relaxed),
        counts.errors.load(Ordering::Relaxed),
    );
    r.contended_tick_errors
        .extend(counts.examples.lock().expect("examples").iter().cloned());
    // Clean up: the pools' rest and the joiners leave; the children go.
    for m in joiners.into_iter().chain(leavers) {
        let _ = leave_bounded(m, o.timeout).await;
    }
    for p in victims {
        p.reap(o.timeout).await;
    }
    eprintln!(
        "  contended: join {}; leave {}; reap {}; floor {}; holder {}; ticks ok {} fenced {} errors {}; {} leases lost",
        r.contended_join.summary(),
        r.contended_leave.summary(),
        r.contended_reap.summary(),
        r.contended_floor.summary(),
        r.contended_hold,
        r.contended_ticks.0,
        r.contended_ticks.1,
        r.contended_ticks.2,
        r.contended_losses
    );
    Ok(())
}

/// k = ⌈N/10⌉ members as child processes; kill -9 all, start all again: until every
/// in-process member's view has each under a new incarnation.
async fn churn(
    cx: &Ctx<'_>,
    members: &mut Vec<Member>,
    n: usize,
    r: &mut SizeResult,
) -> Result<()> {
    let o = cx.opts;
    let k = n.div_ceil(10);
    r.churn_k = k;
    while members.len() + k > n && members.len() > 5 {
        let m = members.pop().expect("non-empty");
        if let Err(e) = leave_bounded(m, o.timeout).await {
            r.notes.push(format!("churn setup: {e:#}"));
        }
    }
    let obs = observers(members);
    let ids: Vec<String> = (0..k).map(|i| format!("churn-{i:03}")).collect();
    let spawn_all = |ids: &[String]| -> Result<Vec<Proc>> {
        ids.iter().map(|id| child(cx, "member", id)).collect()
    };
    let mut procs = spawn_all(&ids)?;
    let deadline = Instant::now() + o.churn_timeout;
    for p in procs.iter_mut() {
        p.ready(deadline.saturating_duration_since(Instant::now()))
            .await?;
    }
    let want: HashMap<String, Option<i64>> = ids.iter().map(|id| (id.clone(), None)).collect();
    all_hold(
        &obs,
        &format!("the {k} churn members join"),
        deadline,
        move |v| holds_all(v, &want),
    )
    .await?;

    // Where a survivor's renewal waits during the churn: the server's time per heartbeat
    // (pg_stat_statements, from here on), and this process's runtime, where every in-process
    // member runs (how late a 10 ms timer fires).
    let stmts_reset = reset_statements(cx).await.is_ok();
    let late_us = Arc::new(AtomicU64::new(0));
    let lateness = tokio::spawn({
        let late_us = late_us.clone();
        async move {
            let mut next = tokio::time::Instant::now();
            loop {
                next += Duration::from_millis(10);
                tokio::time::sleep_until(next).await;
                let late = tokio::time::Instant::now().saturating_duration_since(next);
                late_us.fetch_max(late.as_micros() as u64, Ordering::Relaxed);
                next = next.max(tokio::time::Instant::now());
            }
        }
    });
    let phase = Instant::now();
    for round in 0..o.churn_rounds {
        if r.churn.stop(phase, o.phase) {
            break;
        }
        let before: BTreeMap<String, i64> = obs[0]
            .1
            .borrow()
            .members
            .iter()
            .map(|m| (m.member_id.clone(), m.incarnation))
            .collect();
        let l0 = cx.losses.get();
        let t0 = Instant::now();
        for p in procs.iter_mut() {
            p.kill9()?;
        }
        for p in procs.drain(..) {
            p.reap(o.timeout).await;
        }
        procs = spawn_all(&ids)?;
        let deadline = t0 + o.churn_timeout;
        let want: HashMap<String, Option<i64>> = ids
            .iter()
            .map(|id| (id.clone(), before.get(id).copied()))
            .collect();
        let seen = all_hold(
            &obs,
            &format!("all {k} killed members back under new incarnations"),
            deadline,
            move |v| holds_all(v, &want),
        )
        .await;
        let mut res = seen.map(|last| last - t0);
        for p in procs.iter_mut() {
            if let Err(e) = p
                .ready(deadline.saturating_duration_since(Instant::now()))
                .await
            {
                res = Err(e);
                break;
            }
        }
        let lost = cx.losses.get() - l0;
        r.churn_losses += lost;
        eprintln!(
            "  churn round {}: {} ({lost} survivors' leases lost)",
            round + 1,
            match &res {
                Ok(d) => fmt_d(*d),
                Err(e) => format!("FAILED: {e:#}"),
            }
        );
        r.churn.push(res);
    }
    lateness.abort();
    r.churn_timer_late = Some(Duration::from_micros(late_us.load(Ordering::Relaxed)));
    if stmts_reset {
        r.churn_heartbeat = cx
            .admin
            .query_opt(
                "SELECT calls, mean_exec_time, max_exec_time FROM pg_stat_statements \
                 WHERE dbid = $1 AND query LIKE '%shardlease.heartbeat(%' ORDER BY calls DESC LIMIT 1",
                &[&cx.db_oid],
            )
            .await?
            .map(|row| (row.get(0), row.get(1), row.get(2)));
    }
    if stmts_reset {
        for (q, calls, mean_ms, total_ms) in busiest(cx, "calls", 6).await.unwrap_or_default() {
            eprintln!(
                "  churn: {calls:>7} calls, {:>6.0} µs each, {:>6.2} s in all  {}",
                mean_ms * 1e3,
                total_ms / 1e3,
                truncate(&q, 90)
            );
        }
    }
    eprintln!(
        "  churn: renewing heartbeats {}; this process's 10 ms timer fired up to {} late",
        r.churn_heartbeat
            .map(|(calls, mean, max)| format!(
                "{calls} calls, {mean:.2} ms mean and {max:.0} ms max server time"
            ))
            .unwrap_or_else(|| "not measured".into()),
        r.churn_timer_late.map(fmt_d).unwrap_or_else(|| "?".into())
    );
    for p in procs {
        p.reap(o.timeout).await;
    }
    Ok(())
}

async fn run_size(
    server: &PrivateServer,
    opts: &Opts,
    n: usize,
    losses: Arc<Losses>,
    started: Instant,
) -> Result<SizeResult> {
    let mut r = SizeResult {
        n,
        join_concurrency: opts.join_concurrency,
        ..SizeResult::default()
    };
    let t_size = Instant::now();
    let base = shardlease::parse_database_url(&server.url())?;
    let admin = shardlease::connect_client(&base, "scale-bench admin").await?;
    let db_name = format!("scale_{n}");
    recreate_database(&admin, &db_name).await?;
    let db_oid: u32 = admin
        .query_one(
            "SELECT oid FROM pg_database WHERE datname = $1",
            &[&db_name],
        )
        .await?
        .get(0);
    let url = server.url_of(&db_name);
    let pg = shardlease::parse_database_url(&url)?;
    let mut local = shardlease::connect_client(&pg, "scale-bench local").await?;
    shardlease::migrate(&mut local).await?;
    let cx = Ctx {
        opts,
        server,
        url,
        pg,
        admin,
        local,
        db_name: db_name.clone(),
        db_oid,
        losses: losses.clone(),
        started,
    };
    let l_start = losses.get();

    eprintln!("N = {n}: floors");
    if let Err(e) = floors(&cx, n, &mut r).await {
        r.notes.push(format!("floors: {e:#}"));
        eprintln!("  floors failed: {e:#}");
    }

    eprintln!("N = {n}: cold start");
    let mut members = cold_start(&cx, n, &mut r).await;

    if members.len() >= 6 {
        eprintln!("N = {n}: at rest for {:?}", opts.rest);
        if let Err(e) = at_rest(&cx, members.len(), &mut r).await {
            r.notes.push(format!("at rest: {e:#}"));
        }

        // N members: the in-process ones less one, and the victim.
        eprintln!("N = {n}: kill -9, {} times", opts.reps);
        if let Some(m) = members.pop() {
            if let Err(e) = leave_bounded(m, opts.timeout).await {
                r.notes.push(format!("kill setup: {e:#}"));
            }
        }
        let obs = observers(&members);
        let phase = Instant::now();
        for rep in 0..opts.reps {
            if r.kill.stop(phase, opts.phase) {
                break;
            }
            let res = kill_once(&cx, &obs, &format!("victim-{rep}")).await;
            r.kill.push(res.map(|(_, d)| d));
        }
        eprintln!("  kill -9: {}", r.kill.summary());

        eprintln!("N = {n}: join and leave, {} times", opts.reps);
        let phase = Instant::now();
        for rep in 0..opts.reps {
            if r.join.stop(phase, opts.phase) || r.leave.stop(phase, opts.phase) {
                break;
            }
            let (join, leave) = join_leave_once(&cx, &obs, &format!("leaver-{rep}")).await;
            r.join.push(join.1);
            if let Some((_, res)) = leave {
                r.leave.push(res);
            }
        }
        eprintln!("  join: {}; leave: {}", r.join.summary(), r.leave.summary());

        eprintln!("N = {n}: contended, {:?}", opts.hold);
        if let Err(e) = contended(&cx, &members, &mut r).await {
            r.notes.push(format!("contended: {e:#}"));
            eprintln!("  contended failed: {e:#}");
        }

        eprintln!("N = {n}: churn");
        if let Err(e) = churn(&cx, &mut members, n, &mut r).await {
            r.notes.push(format!("churn: {e:#}"));
            eprintln!("  churn failed: {e:#}");
            r.churn.push(Err(e));
        }
    } else {
        r.notes.push(format!(
            "only {} members joined: the other phases need at least 6",
            members.len()
        ));
    }

    r.total_losses = losses.get() - l_start;
    // Drop without leaving: the sessions close; then the database goes.
    drop(members);
    let Ctx { admin, local, .. } = cx;
    drop(local);
    if let Err(e) = admin
        .batch_execute(&format!("DROP DATABASE IF EXISTS {db_name} WITH (FORCE)"))
        .await
    {
        r.notes.push(format!("dropping {db_name}: {e}"));
    }
    r.elapsed = t_size.elapsed();
    Ok(r)
}

// ---------------------------------------------------------------------------------------
// Logs

/// The library's WARN and ERROR events go to `path`.
fn init_library_log(path: &std::path::Path) -> Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let file =
        std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
    tracing_subscriber::fmt()
        .with_max_level(tracing_subscriber::filter::LevelFilter::WARN)
        .with_ansi(false)
        .with_writer(Mutex::new(file))
        .try_init()
        .map_err(|e| anyhow!("installing the log subscriber: {e}"))
}

fn file_len(path: &std::path::Path) -> u64 {
    std::fs::metadata(path).map(|m| m.len()).unwrap_or(0)
}

/// Count the lines of `path` after byte `from` that `key` maps to a message; most first.
fn log_summary(
    path: &std::path::Path,
    from: u64,
    key: fn(&str) -> Option<String>,
) -> Vec<(String, usize)> {
    let Ok(bytes) = std::fs::read(path) else {
        return Vec::new();
    };
    let text = String::from_utf8_lossy(&bytes[(from as usize).min(bytes.len())..]).into_owned();
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    for line in text.lines() {
        if let Some(k) = key(line) {
            *counts.entry(k).or_default() += 1;
        }
    }
    let mut v: Vec<(String, usize)> = counts.into_iter().collect();
    v.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    v
}

/// `<time>  WARN shardlease::session: lease lost; ... group=scale member=m0001 ...` →
/// `WARN lease lost; ...` (the fields dropped).
fn library_key(line: &str) -> Option<String> {
    let level = ["ERROR", "WARN"]
        .into_iter()
        .find(|l| line.contains(&format!(" {l} ")))?;
    let after = &line[line.find(&format!(" {level} "))? + level.len() + 2..];
    let msg = after.split_once(": ").map(|(_, m)| m).unwrap_or(after);
    let words: Vec<&str> = msg
        .split(' ')
        .take_while(|w| {
            !w.split_once('=').is_some_and(|(k, _)| {
                !k.is_empty() && k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
            })
        })
        .collect();
    Some(format!("{level} {}", words.join(" ")))
}

/// `<time> UTC [pid] ERROR:  message` → `ERROR: message` with digits masked.
fn server_key(line: &str) -> Option<String> {
    let (level, rest) = ["PANIC", "FATAL", "ERROR", "WARNING"]
        .into_iter()
        .find_map(|l| line.split_once(&format!("] {l}:  ")).map(|(_, r)| (l, r)))?;
    let masked: String = rest
        .chars()
        .map(|c| if c.is_ascii_digit() { '#' } else { c })
        .collect();
    Some(format!("{level}: {masked}"))
}

// ---------------------------------------------------------------------------------------
// Report

struct Row {
    n: usize,
    figure: String,
    measured: String,
    floor: String,
    goal: String,
    verdict: &'static str,
}

fn verdict(ok: bool) -> &'static str {
    if ok {
        "PASS"
    } else {
        "MISS"
    }
}

/// PASS when every repetition succeeded and the p99 is within `goal`.
fn dist_ok(d: &Dist, goal: Duration) -> bool {
    d.failures.is_empty() && d.p(99.0).is_some_and(|p| p <= goal)
}

fn rows(r: &SizeResult, listeners: usize) -> Vec<Row> {
    let n = r.n;
    let k = n.div_ceil(10);
    let heartbeat = MemberConfig::new(GROUP, "x").heartbeat;
    let notify_floor = format!(
        "write + NOTIFY → {listeners} listeners: {}",
        r.floor_notify.summary()
    );
    let lock_floor = format!(
        "kill -9 → lock free → NOTIFY → {listeners} listeners: {}",
        r.floor_lock.summary()
    );
    let mut v = Vec::new();
    let mut row =
        |figure: &str, measured: String, floor: String, goal: &str, verdict: &'static str| {
            v.push(Row {
                n,
                figure: figure.to_owned(),
                measured,
                floor,
                goal: goal.to_owned(),
                verdict,
            })
        };
    let cold_goal = Duration::from_secs(10);
    row(
        "cold start: all N joined, each view shows N",
        match (r.cold.samples.first(), r.cold.failures.first()) {
            (Some(d), _) => fmt_d(*d),
            (None, Some(e)) => format!("failed: {}", truncate(e, 90)),
            _ => "not run".into(),
        },
        match (&r.floor_connect, &r.floor_connect_err) {
            (Some(d), _) => format!(
                "{n} connections + LISTEN, {} in flight: {}",
                r.join_concurrency,
                fmt_d(*d)
            ),
            (None, Some(e)) => format!("failed: {}", truncate(e, 60)),
            _ => "-".into(),
        },
        "≤ 10 s",
        verdict(dist_ok(&r.cold, cold_goal)),
    );
    row(
        "server CPU at rest (all backends, /proc)",
        r.rest_cores
            .map(|c| format!("{c:.3} core"))
            .unwrap_or_else(|| "not measured".into()),
        match (r.floor_busy_cores, r.floor_idle_cores) {
            (Some(b), Some(i)) => format!(
                "1 SELECT 1/s on each of {listeners} connections: {b:.3} core (idle: {i:.3})"
            ),
            (None, Some(i)) => format!("idle server, {listeners} idle connections: {i:.3} core"),
            _ => "-".into(),
        },
        "≤ 0.25 core",
        verdict(r.rest_cores.is_some_and(|c| c <= 0.25)),
    );
    row(
        "statements / member / s at rest (pg_stat_statements)",
        match (r.rest_statements, &r.rest_statements_err) {
            (Some(s), _) => format!(
                "{s:.2} (xact_commit: {:.2})",
                r.rest_xacts.unwrap_or(f64::NAN)
            ),
            (None, Some(e)) => format!(
                "{} (xact_commit: {:.2})",
                truncate(e, 40),
                r.rest_xacts.unwrap_or(f64::NAN)
            ),
            _ => "not measured".into(),
        },
        format!(
            "one renew per heartbeat ({heartbeat:?}): {:.2}",
            1.0 / heartbeat.as_secs_f64()
        ),
        "≤ 1.5",
        verdict(r.rest_statements.is_some_and(|s| s <= 1.5)),
    );
    let kill_goal = if n <= 10 { 50 } else { 100 };
    row(
        "kill -9 of one member → every survivor's view",
        r.kill.summary(),
        lock_floor.clone(),
        if n <= 10 {
            "p99 ≤ 50 ms"
        } else {
            "p99 ≤ 100 ms"
        },
        verdict(dist_ok(&r.kill, Duration::from_millis(kill_goal))),
    );
    row(
        "graceful leave → every member's view",
        r.leave.summary(),
        notify_floor.clone(),
        "p99 ≤ 20 ms",
        verdict(dist_ok(&r.leave, Duration::from_millis(20))),
    );
    row(
        "join → every member's view (quiet)",
        r.join.summary(),
        notify_floor.clone(),
        "-",
        "-",
    );
    let c_goal = Duration::from_millis(50);
    let contended_floor = format!(
        "write + NOTIFY → {listeners} listeners, in the same window: {}",
        r.contended_floor.summary()
    );
    row(
        "contended: join → every view",
        r.contended_join.summary(),
        contended_floor.clone(),
        "p99 ≤ 50 ms",
        verdict(dist_ok(&r.contended_join, c_goal)),
    );
    row(
        "contended: leave → every view",
        r.contended_leave.summary(),
        contended_floor.clone(),
        "p99 ≤ 50 ms",
        verdict(dist_ok(&r.contended_leave, c_goal)),
    );
    row(
        "contended: reap after kill -9 → every view",
        r.contended_reap.summary(),
        contended_floor,
        "p99 ≤ 50 ms",
        verdict(dist_ok(&r.contended_reap, c_goal)),
    );
    row(
        "contended: leases lost (4 tickers + held tx)",
        format!(
            "{} (ticks ok {}, fenced {}, errors {})",
            r.contended_losses, r.contended_ticks.0, r.contended_ticks.1, r.contended_ticks.2
        ),
        "-".into(),
        "0",
        verdict(r.contended_losses == 0 && r.contended_ticks.0 > 0),
    );
    row(
        &format!("churn: {k} killed + restarted → all rejoined"),
        r.churn.summary(),
        format!(
            "{k} processes start, connect, lock: {}",
            r.floor_restart.summary()
        ),
        "≤ 10 s",
        verdict(dist_ok(&r.churn, Duration::from_secs(10))),
    );
    row(
        "churn: survivors' leases lost",
        if r.churn.samples.is_empty() && r.churn.failures.is_empty() {
            "not measured".into()
        } else {
            r.churn_losses.to_string()
        },
        "-".into(),
        "0",
        verdict(r.churn_losses == 0 && !r.churn.samples.is_empty()),
    );
    v
}

fn truncate(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        s.to_owned()
    } else {
        s.chars().take(max).collect::<String>() + "…"
    }
}

fn print_report(results: &[SizeResult], opts: &Opts, header: &str, elapsed: Duration) {
    println!();
    println!("{header}");
    println!(
        "membership at scale: sizes {:?}, {} reps, {} floor reps, rest {:?}, hold {:?}, {} churn rounds, child processes at nice {}{}; {:.0} s in all",
        opts.sizes,
        opts.reps,
        opts.floor_reps,
        opts.rest,
        opts.hold,
        opts.churn_rounds,
        opts.child_nice,
        if opts.quick { " (--quick)" } else { "" },
        elapsed.as_secs_f64()
    );
    println!();
    println!("| N | figure | measured | floor (same run) | goal | verdict |");
    println!("|---:|---|---|---|---|---|");
    for r in results {
        for row in rows(r, r.n) {
            println!(
                "| {} | {} | {} | {} | {} | {} |",
                row.n, row.figure, row.measured, row.floor, row.goal, row.verdict
            );
        }
    }
    println!();
    println!("p50/p99: nearest rank; with fewer than 100 samples p99 is the max. Failed repetitions count as MISS.");
    for r in results {
        println!();
        println!("N = {} ({:.0} s):", r.n, r.elapsed.as_secs_f64());
        let fail = |name: &str, d: &Dist| {
            for f in d.failures.iter().take(3) {
                println!("  {name}: {}", truncate(f, 300));
            }
            if d.failures.len() > 3 {
                println!("  {name}: … {} more failures", d.failures.len() - 3);
            }
        };
        if let Some(e) = &r.floor_connect_err {
            println!("  floor connect: {e}");
        }
        fail("floor NOTIFY", &r.floor_notify);
        fail("floor lock", &r.floor_lock);
        fail("floor restart", &r.floor_restart);
        fail("cold start", &r.cold);
        if !r.cold_join_errors.is_empty() {
            println!(
                "  cold start: {} of {} joins failed, e.g. {}",
                r.cold_join_errors.len(),
                r.n,
                truncate(&r.cold_join_errors[0], 300)
            );
        }
        if let Some(d) = r.cold_joins_returned {
            println!("  cold start: every join returned after {}", fmt_d(d));
        }
        if r.cold_retries > 0 {
            println!(
                "  cold start: {} join attempts failed transiently and were retried",
                r.cold_retries
            );
        }
        if let Some(c) = r.cold_cores {
            println!("  cold start: the server used {c:.2} cores on average");
        }
        for (q, calls, mean_ms, total_ms) in &r.cold_top {
            println!(
                "  cold start: {:>6.2} s in {calls:>6} calls, {:>6.0} µs each (server time)  {}",
                total_ms / 1e3,
                mean_ms * 1e3,
                truncate(q, 90)
            );
        }
        for (q, calls, mean_ms) in &r.rest_top {
            println!(
                "  at rest: {calls:>8} calls, {:>5.0} µs each (server time)  {}",
                mean_ms * 1e3,
                truncate(q, 100)
            );
        }
        if r.rest_losses > 0 {
            println!("  at rest: {} leases lost", r.rest_losses);
        }
        fail("kill -9", &r.kill);
        fail("join", &r.join);
        fail("leave", &r.leave);
        fail("contended join", &r.contended_join);
        fail("contended leave", &r.contended_leave);
        fail("contended reap", &r.contended_reap);
        println!("  contended: the held transaction {}", r.contended_hold);
        for e in r.contended_tick_errors.iter().take(5) {
            println!("  contended: tick error: {}", truncate(e, 300));
        }
        fail("churn", &r.churn);
        println!("  leases lost in all at this size: {}", r.total_losses);
        for note in &r.notes {
            println!("  note: {}", truncate(note, 300));
        }
        let show = |name: &str, v: &[(String, usize)]| {
            let total: usize = v.iter().map(|(_, c)| c).sum();
            println!("  {name}: {total} lines");
            for (m, c) in v.iter().take(6) {
                println!("    {c:>7} × {}", truncate(m, 140));
            }
        };
        show("library WARN/ERROR events", &r.library_log);
        show("server WARNING/ERROR/FATAL lines", &r.server_log);
    }
}

fn result_json(r: &SizeResult) -> serde_json::Value {
    let rows: Vec<serde_json::Value> = rows(r, r.n)
        .into_iter()
        .map(|row| {
            serde_json::json!({
                "figure": row.figure, "measured": row.measured, "floor": row.floor,
                "goal": row.goal, "verdict": row.verdict,
            })
        })
        .collect();
    let mut doc = serde_json::json!({
        "n": r.n,
        "elapsed_s": r.elapsed.as_secs_f64(),
        "table": rows,
        "floor_connect_ms": r.floor_connect.map(ms),
        "floor_connect_error": r.floor_connect_err,
        "floor_idle_cores": r.floor_idle_cores,
        "floor_busy_cores": r.floor_busy_cores,
        "floor_notify": r.floor_notify.json(),
        "floor_lock": r.floor_lock.json(),
        "floor_restart": r.floor_restart.json(),
        "cold_start": r.cold.json(),
        "cold_joins_returned_ms": r.cold_joins_returned.map(ms),
        "cold_join_errors": r.cold_join_errors.iter().take(20).collect::<Vec<_>>(),
        "cold_join_retries": r.cold_retries,
        "joined": r.joined,
        "rest_cores": r.rest_cores,
        "rest_statements_per_member_s": r.rest_statements,
        "rest_statements_error": r.rest_statements_err,
        "rest_xact_commit_per_member_s": r.rest_xacts,
        "rest_top_statements": r.rest_top,
        "cold_cores": r.cold_cores,
        "cold_top_statements": r.cold_top,
        "rest_losses": r.rest_losses,
        "kill": r.kill.json(),
        "join": r.join.json(),
        "leave": r.leave.json(),
        "contended_join": r.contended_join.json(),
        "contended_leave": r.contended_leave.json(),
        "contended_reap": r.contended_reap.json(),
        "contended_losses": r.contended_losses,
        "contended_ticks": {"ok": r.contended_ticks.0, "fenced": r.contended_ticks.1, "errors": r.contended_ticks.2},
        "contended_tick_errors": r.contended_tick_errors,
        "contended_hold": r.contended_hold,
        "churn_k": r.churn_k,
        "churn": r.churn.json(),
        "churn_losses": r.churn_losses,
        "total_losses": r.total_losses,
        "notes": r.notes,
        "library_log": r.library_log,
        "server_log": r.server_log,
    });
    // Added apart: one more key in the literal above exceeds json!'s recursion limit.
    doc["churn_heartbeat_calls_mean_max_ms"] = serde_json::json!(r.churn_heartbeat);
    doc["churn_timer_late_ms"] = serde_json::json!(r.churn_timer_late.map(ms));
    doc["contended_floor"] = r.contended_floor.json();
    doc
}

async fn bench(opts: Opts) -> Result<()> {
    let started = Instant::now();
    let library_log = target_dir().join("scale-library.log");
    init_library_log(&library_log)?;
    let server = PrivateServer::builder()
        .max_connections(opts.max_connections)
        .shared_buffers("256MB")
        .conf("shared_preload_libraries = 'pg_stat_statements'")
        .conf("pg_stat_statements.track = top")
        .start()
        .context("starting a private PostgreSQL cluster")?;
    let base = shardlease::parse_database_url(&server.url())?;
    let admin = shardlease::connect_client(&base, "scale-bench admin").await?;
    if let Err(e) = admin
        .batch_execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
        .await
    {
        eprintln!("warning: no pg_stat_statements ({e}); statements will not be counted, transactions will");
    }
    let version: String = admin.query_one("SELECT version()", &[]).await?.get(0);
    let max_conn: String = admin.query_one("SHOW max_connections", &[]).await?.get(0);
    drop(admin);
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let header = format!(
        "{cpus} CPUs; private cluster on port {} (max_connections {max_conn}); {version}",
        server.port()
    );
    eprintln!("scale: {header}");
    eprintln!("scale: library log {}", library_log.display());

    let losses = Arc::new(Losses::default());
    let mut results = Vec::new();
    for &n in &opts.sizes {
        let (lib0, srv0) = (file_len(&library_log), file_len(&server.log_path()));
        match run_size(&server, &opts, n, losses.clone(), started).await {
            Ok(mut r) => {
                r.library_log = log_summary(&library_log, lib0, library_key);
                r.server_log = log_summary(&server.log_path(), srv0, server_key);
                results.push(r);
            }
            Err(e) => {
                eprintln!("N = {n}: setup failed: {e:#}");
                let mut r = SizeResult {
                    n,
                    ..SizeResult::default()
                };
                r.notes.push(format!("setup failed: {e:#}"));
                results.push(r);
            }
        }
    }
    let elapsed = started.elapsed();
    print_report(&results, &opts, &header, elapsed);
    let examples = losses.examples.lock().expect("examples").clone();
    if !examples.is_empty() {
        println!();
        println!("first leases lost (seconds since the start):");
        for e in &examples {
            println!("  {}", truncate(e, 200));
        }
    }

    let doc = serde_json::json!({
        "bench": "scale",
        "unix_time": std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
        "cpus": cpus,
        "server": version,
        "max_connections": max_conn,
        "elapsed_s": elapsed.as_secs_f64(),
        "percentiles": "nearest rank over the sorted samples",
        "options": {
            "sizes": opts.sizes, "quick": opts.quick, "reps": opts.reps,
            "floor_reps": opts.floor_reps, "rest_s": opts.rest.as_secs_f64(),
            "hold_s": opts.hold.as_secs_f64(), "churn_rounds": opts.churn_rounds,
            "timeout_ms": ms(opts.timeout), "cold_timeout_s": opts.cold_timeout.as_secs_f64(),
            "churn_timeout_s": opts.churn_timeout.as_secs_f64(),
            "join_concurrency": opts.join_concurrency, "child_nice": opts.child_nice,
            "max_connections": opts.max_connections,
        },
        "member_config": "MemberConfig::new defaults (heartbeat 1 s, TTL 5 s, crash check 100 ms)",
        "statements": "pg_stat_statements calls (track = top) of the members' database; xact_commit from pg_stat_database",
        "cpu": "on-CPU time (/proc/<pid>/schedstat) of the postmaster and its live children, plus its reaped children's cutime + cstime",
        "sizes": results.iter().map(result_json).collect::<Vec<_>>(),
        "leases_lost_examples": examples,
    });
    if let Some(dir) = opts.json.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&opts.json, serde_json::to_string_pretty(&doc)? + "\n")
        .with_context(|| format!("writing {}", opts.json.display()))?;
    println!();
    println!("results: {}", opts.json.display());
    println!("library log: {}", library_log.display());
    Ok(())
}
