//! Test harness for the worker binary: a fresh database per test (created, dropped), the
//! built `shardlease-worker` run as real processes, and a test-only audit table that records
//! every increment of `public.work_items` with the writer and the tick's database time.
//!
//! Times that matter for assertions are database times (`now()` of the tick transaction,
//! `clock_timestamp()`), carried as seconds since the epoch in `f64`.
#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use shardlease::tokio_postgres::Client;
use uuid::Uuid;

/// The worker binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_shardlease-worker");

/// The group the worker joins by default.
pub const GROUP: &str = "work_items";

/// The worker settings of these tests: heartbeat 500 ms, TTL 3 s, tick 1 s.
pub const RUN_ARGS: &[&str] = &[
    "run",
    "--heartbeat",
    "500ms",
    "--lease-ttl",
    "3s",
    "--tick",
    "1s",
    "--http-addr",
    "127.0.0.1:0",
];
/// Tick interval of [`RUN_ARGS`], seconds.
pub const TICK: f64 = 1.0;
/// Lease TTL of [`RUN_ARGS`], seconds.
pub const TTL: f64 = 3.0;

/// Scheduling slack for cadence bounds, seconds. The worker's own rule makes the bounds hold
/// exactly in terms of tick start times (an item is "due" when its last tick is at least
/// tick/2 old), but a tick transaction starts a few milliseconds after its timer fires, and
/// on a loaded 2-core test machine (several worker processes, PostgreSQL and the compiler of
/// other tests) that delay can reach tens of milliseconds.
pub const SLACK: f64 = 0.15;

// ---------------------------------------------------------------------------------------
// Databases
// ---------------------------------------------------------------------------------------

/// A fresh database (from `shardlease-testkit`) with the worker's helpers.
pub struct TestDb(shardlease_testkit::TestDb);

impl std::ops::Deref for TestDb {
    type Target = shardlease_testkit::TestDb;
    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl TestDb {
    /// A new, empty database.
    pub async fn empty() -> TestDb {
        TestDb(shardlease_testkit::TestDb::empty().await)
    }

    /// A new database, migrated and seeded with `count` items by the binary itself
    /// (`shardlease-worker migrate`, `seed --count`), with the audit table installed.
    pub async fn with_items(count: u64) -> TestDb {
        let db = TestDb::empty().await;
        let out = db.cli(&["migrate"]).await;
        assert!(out.success(), "`shardlease-worker migrate` failed: {out}");
        let out = db.cli(&["seed", "--count", &count.to_string()]).await;
        assert!(
            out.success(),
            "`shardlease-worker seed --count {count}` failed: {out}"
        );
        install_audit(&db.client().await).await;
        db
    }

    /// Run the binary with `args` against this database and wait for it (at most 60 s).
    pub async fn cli(&self, args: &[&str]) -> CliOutput {
        cli(&self.url, args).await
    }

    /// Start a worker process named `name` with [`RUN_ARGS`] and `extra` flags.
    pub fn worker(&self, name: &str, extra: &[&str]) -> Worker {
        self.worker_env(name, extra, &[])
    }

    /// [`TestDb::worker`] with extra environment variables (`WORK_DATABASE_URL`, ...).
    pub fn worker_env(&self, name: &str, extra: &[&str], env: &[(&str, &str)]) -> Worker {
        let mut args: Vec<&str> = RUN_ARGS.to_vec();
        args.extend_from_slice(extra);
        Worker::spawn_env(&self.url, name, &args, env)
    }
}

#[allow(unused_imports)] // Not every test binary uses every helper.
pub use shardlease_testkit::{base_url, eventually, poll_until};

// ---------------------------------------------------------------------------------------
// One-shot commands
// ---------------------------------------------------------------------------------------

/// What a finished command printed.
#[derive(Debug)]
pub struct CliOutput {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl CliOutput {
    pub fn success(&self) -> bool {
        self.status.success()
    }
    pub fn code(&self) -> Option<i32> {
        self.status.code()
    }
}

impl std::fmt::Display for CliOutput {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}\n--- stdout ---\n{}--- stderr ---\n{}",
            self.status, self.stdout, self.stderr
        )
    }
}

/// Run the binary with `args` and `DATABASE_URL=url`; at most 60 s.
pub async fn cli(url: &str, args: &[&str]) -> CliOutput {
    let mut cmd = tokio::process::Command::new(BIN);
    cmd.args(args)
        .env("DATABASE_URL", url)
        .env_remove("WORK_DATABASE_URL")
        .env_remove("POD_NAME")
        .stdin(Stdio::null())
        .kill_on_drop(true);
    let out = tokio::time::timeout(Duration::from_secs(60), cmd.output())
        .await
        .unwrap_or_else(|_| {
            panic!(
                "`shardlease-worker {}` did not finish within 60 s",
                args.join(" ")
            )
        })
        .expect("run shardlease-worker");
    CliOutput {
        status: out.status,
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

// ---------------------------------------------------------------------------------------
// Worker processes
// ---------------------------------------------------------------------------------------

type Lines = Arc<Mutex<Vec<String>>>;

/// A running `shardlease-worker run` process. Its stdout and stderr are read by threads
/// into line buffers. Dropping it kills the process (SIGKILL; also when stopped).
pub struct Worker {
    pub name: String,
    child: Child,
    stdout: Lines,
    stderr: Lines,
    /// The threads that collect stdout and stderr: they end at end of file.
    readers: [std::thread::JoinHandle<()>; 2],
    exited: Option<ExitStatus>,
}

fn reader(stream: impl Read + Send + 'static, lines: Lines) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        for line in BufReader::new(stream).lines().map_while(Result::ok) {
            lines.lock().expect("lines").push(line);
        }
    })
}

impl Worker {
    /// Start the binary as member `name` (POD_NAME) with `args`.
    pub fn spawn(url: &str, name: &str, args: &[&str]) -> Worker {
        Worker::spawn_env(url, name, args, &[])
    }

    /// [`Worker::spawn`] with extra environment variables.
    pub fn spawn_env(url: &str, name: &str, args: &[&str], env: &[(&str, &str)]) -> Worker {
        let mut cmd = Command::new(BIN);
        cmd.args(args)
            .env("DATABASE_URL", url)
            .env_remove("WORK_DATABASE_URL")
            .envs(env.iter().copied())
            .env("POD_NAME", name)
            .env("RUST_LOG", "info");
        Worker::spawn_command(name, cmd)
    }

    /// Start `cmd` (the binary, with its arguments and environment set by the caller),
    /// called `name` in messages.
    pub fn spawn_command(name: &str, mut cmd: Command) -> Worker {
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn shardlease-worker");
        let stdout = Lines::default();
        let stderr = Lines::default();
        let readers = [
            reader(child.stdout.take().expect("stdout"), stdout.clone()),
            reader(child.stderr.take().expect("stderr"), stderr.clone()),
        ];
        Worker {
            name: name.to_owned(),
            child,
            stdout,
            stderr,
            readers,
            exited: None,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Every stdout line so far.
    pub fn stdout(&self) -> Vec<String> {
        self.stdout.lock().expect("lines").clone()
    }

    /// Every stderr line so far.
    pub fn stderr(&self) -> Vec<String> {
        self.stderr.lock().expect("lines").clone()
    }

    /// Wait for a stderr line containing `needle`.
    pub async fn wait_stderr(&self, needle: &str, timeout: Duration) -> String {
        let what = format!("worker {} to log a line containing {needle:?}", self.name);
        poll_until(timeout, &what, || {
            std::future::ready(self.stderr().into_iter().find(|l| l.contains(needle)))
        })
        .await
    }

    /// Wait for a stdout line, at index `from` or later, for which `pred` holds; returns its
    /// index and text.
    pub async fn wait_stdout(
        &self,
        from: usize,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&str) -> bool,
    ) -> (usize, String) {
        let what = format!("worker {} to print {what}", self.name);
        poll_until(timeout, &what, || {
            std::future::ready(
                self.stdout()
                    .into_iter()
                    .enumerate()
                    .skip(from)
                    .find(|(_, l)| pred(l)),
            )
        })
        .await
    }

    /// The address of its HTTP server, from its `http listening ... addr=` log line.
    pub async fn http_addr(&self) -> SocketAddr {
        let line = self
            .wait_stderr("http listening", Duration::from_secs(20))
            .await;
        let addr = line
            .split_whitespace()
            .find_map(|w| w.strip_prefix("addr="))
            .unwrap_or_else(|| panic!("no addr= in {line:?}"));
        addr.parse()
            .unwrap_or_else(|e| panic!("bad address {addr:?} in {line:?}: {e}"))
    }

    /// Send a signal with kill(1): TERM, STOP, CONT, ...
    pub fn signal(&self, sig: &str) {
        // kill(2) itself, not a `kill` process per signal: a test that signals 200 workers
        // must not spend its time forking.
        let signo = match sig {
            "TERM" => libc::SIGTERM,
            "INT" => libc::SIGINT,
            "STOP" => libc::SIGSTOP,
            "CONT" => libc::SIGCONT,
            "KILL" => libc::SIGKILL,
            other => panic!("signal {other:?}: not one the tests send"),
        };
        let pid = self.child.id() as libc::pid_t;
        // SAFETY: kill(2) with the pid of a child we spawned and have not reaped yet.
        let rc = unsafe { libc::kill(pid, signo) };
        assert!(
            rc == 0,
            "kill -{sig} {pid} ({}) failed: {}",
            self.name,
            std::io::Error::last_os_error()
        );
    }

    /// kill -9, and reap the process.
    pub fn kill9(&mut self) {
        self.child.kill().expect("SIGKILL");
        self.exited = Some(self.child.wait().expect("wait"));
    }

    /// The exit status, if the process has exited; does not wait.
    pub fn try_exit(&mut self) -> Option<ExitStatus> {
        if self.exited.is_none() {
            self.exited = self.child.try_wait().expect("try_wait");
        }
        self.exited
    }

    /// Wait for the process to exit.
    pub async fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        self.exit_within(timeout)
            .await
            .unwrap_or_else(|| panic!("worker {} did not exit within {timeout:?}", self.name))
    }

    /// After the process exited: wait (at most 2 s; a child process of its own may still
    /// hold the pipes) until everything it wrote to stdout and stderr has been collected,
    /// so that what a test reads after the exit is all of it.
    async fn collect_output(&self) {
        let start = Instant::now();
        while !self.readers.iter().all(|r| r.is_finished())
            && start.elapsed() < Duration::from_secs(2)
        {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Wait for the process to exit, at most `timeout`; `None` if it is still running.
    pub async fn exit_within(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let start = Instant::now();
        loop {
            if let Some(s) = self.exited {
                return Some(s);
            }
            if let Some(s) = self.child.try_wait().expect("try_wait") {
                self.exited = Some(s);
                self.collect_output().await;
                return Some(s);
            }
            if start.elapsed() > timeout {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        if self.exited.is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        if std::thread::panicking() {
            let tail = |lines: &Lines| {
                let l = lines.lock().map(|l| l.clone()).unwrap_or_default();
                l[l.len().saturating_sub(20)..]
                    .iter()
                    .map(|l| l.chars().take(400).collect::<String>())
                    .collect::<Vec<_>>()
                    .join("\n")
            };
            eprintln!(
                "==== worker {}: last stderr lines ====\n{}\n==== worker {}: last stdout lines ====\n{}",
                self.name,
                tail(&self.stderr),
                self.name,
                tail(&self.stdout)
            );
        }
    }
}

/// GET `path` from `addr` over a raw HTTP/1.1 connection: (status code, body).
pub async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let fut = async {
        let mut s = tokio::net::TcpStream::connect(addr).await?;
        s.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await?;
        std::io::Result::Ok(String::from_utf8_lossy(&buf).into_owned())
    };
    let text = tokio::time::timeout(Duration::from_secs(10), fut)
        .await
        .unwrap_or_else(|_| panic!("GET {path} from {addr} took more than 10 s"))
        .unwrap_or_else(|e| panic!("GET {path} from {addr}: {e}"));
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no HTTP status in the answer to GET {path}: {text:?}"));
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

// ---------------------------------------------------------------------------------------
// The database's view: members, clock, audit
// ---------------------------------------------------------------------------------------

/// The database clock (`clock_timestamp()`), seconds since the epoch.
pub async fn db_now(c: &Client) -> f64 {
    c.query_one("SELECT extract(epoch FROM clock_timestamp())::float8", &[])
        .await
        .expect("read the database clock")
        .get(0)
}

/// A lease of the group, as `shardlease.members` shows it.
#[derive(Debug, Clone, PartialEq)]
pub struct Lease {
    pub member: String,
    pub slot: i32,
    pub incarnation: i64,
    pub alive: bool,
    pub joined_at: f64,
}

/// Every lease of the worker group.
pub async fn leases(c: &Client) -> Vec<Lease> {
    c.query(
        "SELECT member_id, slot, incarnation, alive, extract(epoch FROM joined_at)::float8 \
         FROM shardlease.members WHERE group_name = $1 ORDER BY slot",
        &[&GROUP],
    )
    .await
    .expect("read shardlease.members")
    .iter()
    .map(|r| Lease {
        member: r.get(0),
        slot: r.get(1),
        incarnation: r.get(2),
        alive: r.get(3),
        joined_at: r.get(4),
    })
    .collect()
}

/// The lease of `member`, if it has one.
pub async fn lease_of(c: &Client, member: &str) -> Option<Lease> {
    leases(c).await.into_iter().find(|l| l.member == member)
}

/// The group's generation and when it last changed (database clock).
pub async fn generation(c: &Client) -> (i64, f64) {
    let r = c
        .query_one(
            "SELECT generation, extract(epoch FROM changed_at)::float8 FROM shardlease.groups WHERE name = $1",
            &[&GROUP],
        )
        .await
        .expect("read shardlease.groups");
    (r.get(0), r.get(1))
}

/// Whether exactly `names` hold leases, all alive, and every item has been ticked by one of
/// them since the last membership change.
pub async fn settled(c: &Client, names: &[&str]) -> bool {
    let want: BTreeSet<String> = names.iter().map(|s| s.to_string()).collect();
    let ls = leases(c).await;
    let have: BTreeSet<String> = ls.iter().map(|l| l.member.clone()).collect();
    if have != want || !ls.iter().all(|l| l.alive) {
        return false;
    }
    let stale: i64 = c
        .query_one(
            "SELECT count(*) FROM public.work_items w, shardlease.groups g \
             WHERE g.name = $1 AND (w.updated_at IS NULL OR w.updated_at <= g.changed_at \
                   OR NOT (w.currentworker = ANY($2)))",
            &[
                &GROUP,
                &names.iter().map(|s| s.to_string()).collect::<Vec<_>>(),
            ],
        )
        .await
        .expect("count unsettled items")
        .get(0);
    stale == 0
}

/// Wait until [`settled`] holds for `names`. Returns the generation.
pub async fn wait_settled(c: &Client, names: &[&str], timeout: Duration) -> i64 {
    let want: BTreeSet<&str> = names.iter().copied().collect();
    eventually(
        timeout,
        &format!("the group to settle on exactly {want:?}, alive, with every item ticked since the last change"),
        || settled(c, names),
    )
    .await;
    generation(c).await.0
}

/// Every item id.
pub async fn item_ids(c: &Client) -> BTreeSet<Uuid> {
    c.query("SELECT id FROM public.work_items", &[])
        .await
        .expect("read item ids")
        .iter()
        .map(|r| r.get(0))
        .collect()
}

/// Install the test-only audit: a row per increment of `public.work_items`, with the
/// writer (`NEW.currentworker`), the tick transaction's `now()` (`NEW.updated_at`), the
/// trigger's `clock_timestamp()`, and the writer's lease incarnation and the group's
/// generation as the tick transaction saw them (the database must have the shardlease
/// schema). The audit row commits with the increment, so its `xmin` is the writer's
/// transaction (`pg_xact_commit_timestamp(xmin)` with `track_commit_timestamp = on`).
///
/// The worker does not stamp its fence on the row, so the trigger reads it, once per
/// transaction: the group's generation and the writer's lease (by member id), in one
/// snapshot taken between the fence's begin and its commit. For a committed write this is
/// the fence's own generation and incarnation: the fence checked generation G at begin and
/// again at commit, generations only grow, and every lease change bumps the generation in
/// the same transaction. So a committed row with another writer in the same generation, or
/// with no lease (`incarnation` NULL), is a fencing failure, not an artefact of the audit.
pub async fn install_audit(c: &Client) {
    c.batch_execute(&format!(
        "CREATE TABLE public.test_audit (
           seq bigserial PRIMARY KEY,
           id uuid NOT NULL,
           value integer NOT NULL,
           worker text,
           at timestamptz,
           generation bigint,
           incarnation bigint,
           logged_at timestamptz NOT NULL DEFAULT clock_timestamp());
         CREATE INDEX ON public.test_audit (id, value);
         CREATE FUNCTION public.test_audit_fn() RETURNS trigger LANGUAGE plpgsql AS $$
         DECLARE
           -- writer|generation|incarnation, cached for the transaction
           v_ctx text := coalesce(current_setting('test_audit.ctx', true), '');
           v_generation bigint;
           v_incarnation bigint;
         BEGIN
           IF v_ctx = '' OR split_part(v_ctx, '|', 1) IS DISTINCT FROM coalesce(NEW.currentworker, '') THEN
             SELECT g.generation, l.incarnation INTO v_generation, v_incarnation
               FROM shardlease.groups g
               LEFT JOIN shardlease.leases l ON l.group_name = g.name AND l.member_id = NEW.currentworker
              WHERE g.name = TG_ARGV[0];
             v_ctx := format('%s|%s|%s', coalesce(NEW.currentworker, ''),
                             coalesce(v_generation::text, ''), coalesce(v_incarnation::text, ''));
             PERFORM set_config('test_audit.ctx', v_ctx, true);
           END IF;
           INSERT INTO public.test_audit (id, value, worker, at, generation, incarnation)
           VALUES (NEW.id, NEW.value, NEW.currentworker, NEW.updated_at,
                   nullif(split_part(v_ctx, '|', 2), '')::bigint,
                   nullif(split_part(v_ctx, '|', 3), '')::bigint);
           RETURN NULL;
         END $$;
         CREATE TRIGGER test_audit AFTER UPDATE ON public.work_items
           FOR EACH ROW WHEN (NEW.value <> OLD.value) EXECUTE FUNCTION public.test_audit_fn('{GROUP}');"
    ))
    .await
    .expect("install the audit trigger");
}

/// One audited increment.
#[derive(Debug, Clone, PartialEq)]
pub struct Inc {
    pub id: Uuid,
    pub value: i32,
    pub worker: String,
    /// The tick transaction's `now()`, seconds since the epoch.
    pub at: f64,
    /// The group's generation the write was made under (see [`install_audit`]).
    pub generation: Option<i64>,
    /// The writer's lease incarnation; `None`: the writer held no lease.
    pub incarnation: Option<i64>,
}

/// Every audited increment, per item, in value order.
pub async fn audit(c: &Client) -> BTreeMap<Uuid, Vec<Inc>> {
    let rows = c
        .query(
            "SELECT id, value, coalesce(worker, ''), extract(epoch FROM at)::float8, generation, incarnation \
             FROM public.test_audit ORDER BY id, value, seq",
            &[],
        )
        .await
        .expect("read the audit table");
    let mut out: BTreeMap<Uuid, Vec<Inc>> = BTreeMap::new();
    for r in rows {
        let inc = Inc {
            id: r.get(0),
            value: r.get(1),
            worker: r.get(2),
            at: r.get(3),
            generation: r.get(4),
            incarnation: r.get(5),
        };
        out.entry(inc.id).or_default().push(inc);
    }
    out
}

/// Who incremented each item with a tick time in `[from, to)`.
pub async fn writers_between(c: &Client, from: f64, to: f64) -> BTreeMap<Uuid, BTreeSet<String>> {
    let mut out: BTreeMap<Uuid, BTreeSet<String>> = BTreeMap::new();
    for (id, incs) in audit(c).await {
        for i in incs.iter().filter(|i| i.at >= from && i.at < to) {
            out.entry(id).or_default().insert(i.worker.clone());
        }
    }
    out
}

/// The owners over a quiet window: every item was incremented by exactly one worker in it.
#[derive(Debug, Clone)]
pub struct Owners {
    pub of: BTreeMap<Uuid, String>,
    /// Increments per item in the window.
    pub counts: BTreeMap<Uuid, usize>,
    pub from: f64,
    pub to: f64,
}

impl Owners {
    /// Items of `worker`.
    pub fn items_of(&self, worker: &str) -> BTreeSet<Uuid> {
        self.of
            .iter()
            .filter(|(_, w)| *w == worker)
            .map(|(id, _)| *id)
            .collect()
    }

    /// Item count per worker.
    pub fn sizes(&self) -> BTreeMap<String, usize> {
        let mut out = BTreeMap::new();
        for w in self.of.values() {
            *out.entry(w.clone()).or_default() += 1;
        }
        out
    }
}

/// Watch a window of `secs` seconds (database clock) and check that every item was
/// incremented in it, each by exactly one worker. `label` names the moment in messages.
pub async fn quiet_window(c: &Client, secs: f64, label: &str) -> Owners {
    assert!(
        secs >= 1.5 * TICK,
        "a window shorter than 1.5 ticks may miss an item's tick"
    );
    let from = db_now(c).await;
    tokio::time::sleep(Duration::from_secs_f64(secs)).await;
    let to = db_now(c).await;
    let ids = item_ids(c).await;
    let writers = writers_between(c, from, to).await;
    let mut of = BTreeMap::new();
    let mut counts = BTreeMap::new();
    let all = audit(c).await;
    for id in &ids {
        let ws = writers.get(id).cloned().unwrap_or_default();
        assert!(
            ws.len() == 1,
            "{label}: item {id} was incremented by {} workers {ws:?} in the {secs} s window; expected exactly one",
            ws.len()
        );
        of.insert(*id, ws.into_iter().next().expect("one"));
        let n = all
            .get(id)
            .map(|v| v.iter().filter(|i| i.at >= from && i.at < to).count())
            .unwrap_or(0);
        counts.insert(*id, n);
    }
    Owners {
        of,
        counts,
        from,
        to,
    }
}

/// A take-over, measured from the audit table.
#[derive(Debug, Clone)]
pub struct Takeover {
    /// Items whose last increment before the event was by the victim.
    pub items: usize,
    /// Max over those items of (first increment by the new owner − last by the victim).
    pub max_gap: f64,
    /// Max over those items of (first increment by the new owner − the event).
    pub max_after_event: f64,
    /// Max over those items of (event − last increment by the victim).
    pub max_before_event: f64,
}

/// Measure the take-over of `victim`'s items after `event` (database time).
pub fn takeover(audit: &BTreeMap<Uuid, Vec<Inc>>, victim: &str, event: f64) -> Takeover {
    let mut t = Takeover {
        items: 0,
        max_gap: 0.0,
        max_after_event: 0.0,
        max_before_event: 0.0,
    };
    for (id, incs) in audit {
        let Some(pos) = incs.iter().rposition(|i| i.at <= event) else {
            continue;
        };
        let last = &incs[pos];
        if last.worker != victim {
            continue;
        }
        let next = incs[pos + 1..]
            .iter()
            .find(|i| i.worker != victim)
            .unwrap_or_else(|| {
                panic!("item {id} of {victim} was never taken over after the event")
            });
        t.items += 1;
        t.max_gap = t.max_gap.max(next.at - last.at);
        t.max_after_event = t.max_after_event.max(next.at - event);
        t.max_before_event = t.max_before_event.max(event - last.at);
    }
    t
}

/// Intervals of an item that may exceed the 1.5 s cadence bound, up to `bound`: those from
/// an increment by `victim` to the next increment that overlap the event, from `event` to
/// `until` (database clock; the same for an instant, such as a kill).
#[derive(Debug, Clone)]
pub struct Excuse {
    pub victim: String,
    pub event: f64,
    pub until: f64,
    pub bound: f64,
    pub why: &'static str,
}

/// The audit invariants, checked at the end of every scenario, while the workers still run:
/// - values of an item go up by exactly one per audited increment, in tick-time order
///   (no lost update, no write committed out of order);
/// - two increments of one item are at least 0.5 s apart (tick/2: the worker's due rule),
///   whoever wrote them; in particular no two workers write one item within the same second;
/// - consecutive increments of one item are at most 1.5 s apart (+ [`SLACK`]), except the
///   intervals that `excuses` name;
/// - every item that still exists was incremented within the last 1.5 s (+ [`SLACK`]): no
///   item is left behind at the end. Items in `skip` (deleted ones) are not checked;
/// - (all items) every increment's writer held a lease, and no item was written by two
///   workers under one generation (I1, as [`install_audit`] records it).
pub async fn check_audit(c: &Client, label: &str, excuses: &[Excuse], skip: &BTreeSet<Uuid>) {
    let now = db_now(c).await;
    let existing = item_ids(c).await;
    let all = audit(c).await;
    let min_gap = TICK / 2.0;
    let max_gap = 1.5 * TICK + SLACK;
    let mut writers: BTreeMap<(Uuid, Option<i64>), BTreeSet<&str>> = BTreeMap::new();
    for (id, incs) in &all {
        for i in incs {
            assert!(
                i.incarnation.is_some(),
                "{label}: item {id}: increment {} by {} committed under generation {:?} while {} held no lease",
                i.value,
                i.worker,
                i.generation,
                i.worker
            );
            writers
                .entry((*id, i.generation))
                .or_default()
                .insert(&i.worker);
        }
    }
    for ((id, generation), ws) in &writers {
        assert!(
            ws.len() == 1,
            "{label}: item {id} was written by {ws:?} under the same generation {generation:?}: two writers for one view"
        );
    }
    let (mut lo, mut hi, mut n) = (f64::MAX, 0.0f64, 0usize);
    for (id, incs) in &all {
        if skip.contains(id) {
            continue;
        }
        for w in incs.windows(2) {
            let (a, b) = (&w[0], &w[1]);
            n += 1;
            let gap = b.at - a.at;
            assert_eq!(
                b.value,
                a.value + 1,
                "{label}: item {id}: value went from {} ({}) to {} ({}): an increment is missing or duplicated",
                a.value,
                a.worker,
                b.value,
                b.worker
            );
            // The due rule compares now() with the last updated_at, both transaction
            // start times: exact, no slack in this direction.
            assert!(
                gap >= min_gap - 1e-6,
                "{label}: item {id}: increments {} by {} and {} by {} are only {gap:.3} s apart (at least {min_gap} s expected){}",
                a.value,
                a.worker,
                b.value,
                b.worker,
                if a.worker != b.worker { ": two workers wrote the item within the same second" } else { "" }
            );
            let excuse = excuses
                .iter()
                .find(|e| a.worker == e.victim && a.at <= e.until && e.event < b.at);
            let bound = excuse.map(|e| e.bound).unwrap_or(max_gap);
            assert!(
                gap <= bound,
                "{label}: item {id} waited {gap:.3} s between increment {} by {} and {} by {} (bound {bound:.3} s{})",
                a.value,
                a.worker,
                b.value,
                b.worker,
                excuse.map(|e| format!(": {}", e.why)).unwrap_or_default()
            );
            lo = lo.min(gap);
            if excuse.is_none() {
                hi = hi.max(gap);
            }
        }
    }
    for id in existing.iter().filter(|id| !skip.contains(id)) {
        let last = all.get(id).and_then(|v| v.last());
        let Some(last) = last else {
            panic!("{label}: item {id} was never incremented");
        };
        assert!(
            now - last.at <= max_gap,
            "{label}: item {id} was last incremented {:.3} s ago by {}: it is no longer ticked",
            now - last.at,
            last.worker
        );
    }
    eprintln!(
        "{label}: audit ok: {n} intervals over {} items, min {lo:.3} s, max (unexcused) {hi:.3} s",
        all.len()
    );
}

/// Parse a `--print-all-ids` stdout line: (prefix, ids).
pub fn parse_ids(line: &str) -> Option<(String, Vec<Uuid>)> {
    let (prefix, rest) = line.split_once("] watching ")?;
    let ids = match rest.split_once("ids:") {
        Some((_, list)) => list
            .split_whitespace()
            .map(|s| s.parse().expect("uuid in the watched-id line"))
            .collect(),
        None => Vec::new(),
    };
    Some((format!("{prefix}]"), ids))
}
