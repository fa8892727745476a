//! Test harness: one fresh database per test (created, migrated, dropped), and child
//! processes that hold a real membership, for crash and hang tests.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use shardlease::tokio_postgres::{Client, Config};

/// The server tests run against: `DATABASE_URL`, default the local PostgreSQL.
pub fn base_url() -> String {
    std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned())
}

/// A fresh database, dropped (with its connections) when this value is dropped.
pub struct TestDb {
    pub name: String,
    pub url: String,
    pub pg: Config,
}

static COUNTER: AtomicU32 = AtomicU32::new(0);

impl TestDb {
    /// A new, empty database.
    pub async fn empty() -> TestDb {
        let name = format!(
            "shardlease_test_{}_{}_{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed),
            Instant::now().elapsed().subsec_nanos() % 1000
        );
        let admin = admin_client().await;
        admin
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .unwrap_or_else(|e| panic!("creating test database {name}: {e}"));
        let url = with_database(&base_url(), &name);
        let pg = shardlease::parse_database_url(&url).expect("test URL parses");
        TestDb { name, url, pg }
    }

    /// A new database with the shardlease schema.
    pub async fn migrated() -> TestDb {
        let db = TestDb::empty().await;
        let mut client = db.client().await;
        shardlease::migrate(&mut client).await.expect("migrate");
        db
    }

    /// A plain connection to this database.
    pub async fn client(&self) -> Client {
        shardlease::connect_client(&self.pg, "shardlease-test")
            .await
            .expect("connect to test database")
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let name = self.name.clone();
        // Drop runs outside any runtime guarantee: use a thread with its own runtime.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async move {
                let admin = admin_client().await;
                if let Err(e) = admin
                    .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                    .await
                {
                    eprintln!("warning: could not drop test database {name}: {e}");
                }
            })
        })
        .join();
    }
}

async fn admin_client() -> Client {
    let pg = shardlease::parse_database_url(&base_url()).expect("DATABASE_URL parses");
    shardlease::connect_client(&pg, "shardlease-test-admin")
        .await
        .unwrap_or_else(|e| panic!("PostgreSQL must be running for these tests: {e}"))
}

/// Replace the database of a postgres:// URL.
pub fn with_database(url: &str, db: &str) -> String {
    let (head, query) = match url.split_once('?') {
        Some((h, q)) => (h, Some(q)),
        None => (url, None),
    };
    let scheme_end = head.find("://").map(|i| i + 3).unwrap_or(0);
    let base = match head[scheme_end..].find('/') {
        Some(i) => &head[..scheme_end + i],
        None => head,
    };
    match query {
        Some(q) => format!("{base}/{db}?{q}"),
        None => format!("{base}/{db}"),
    }
}

/// Wait for `cond` to hold, polling every 5 ms; panics with `what` after `timeout`.
pub async fn eventually<F, Fut>(timeout: Duration, what: &str, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    loop {
        if cond().await {
            return;
        }
        if start.elapsed() > timeout {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// A child process that holds a membership (see `child_member` in the test files).
pub struct ChildMember {
    pub child: Child,
    pub lines: std::sync::mpsc::Receiver<String>,
}

impl ChildMember {
    /// Re-run this test binary as `child_member` with the given settings.
    pub fn spawn(
        db: &TestDb,
        group: &str,
        member: &str,
        heartbeat_ms: u64,
        ttl_ms: u64,
    ) -> ChildMember {
        let exe = std::env::current_exe().expect("test binary path");
        let mut child = Command::new(exe)
            .args([
                "--ignored",
                "--exact",
                "child_member",
                "--nocapture",
                "--test-threads=1",
            ])
            .env("SL_CHILD_URL", &db.url)
            .env("SL_CHILD_GROUP", group)
            .env("SL_CHILD_MEMBER", member)
            .env("SL_CHILD_HEARTBEAT_MS", heartbeat_ms.to_string())
            .env("SL_CHILD_TTL_MS", ttl_ms.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn child member");
        let stdout: ChildStdout = child.stdout.take().expect("stdout");
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        ChildMember { child, lines }
    }

    /// Wait for a line containing `prefix`.
    pub fn expect_line(&self, prefix: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) if line.contains(prefix) => return line,
                Ok(_) => continue,
                Err(_) => {
                    panic!("child member printed no line containing {prefix:?} within {timeout:?}")
                }
            }
        }
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    pub fn signal(&self, sig: &str) {
        let status = Command::new("kill")
            .args([&format!("-{sig}"), &self.child.id().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -{sig} failed");
    }
}

impl Drop for ChildMember {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The body of the `child_member` pseudo-test: join as told by the environment, print
/// `READY <slot> <incarnation>`, then a `VIEW` line per view change, until killed or stdin closes.
pub async fn run_child_member() {
    let Ok(url) = std::env::var("SL_CHILD_URL") else {
        return; // Not started as a child: nothing to do.
    };
    let env_ms = |k: &str| Duration::from_millis(std::env::var(k).unwrap().parse().unwrap());
    let pg = shardlease::parse_database_url(&url).unwrap();
    let cfg = shardlease::MemberConfig::new(
        std::env::var("SL_CHILD_GROUP").unwrap(),
        std::env::var("SL_CHILD_MEMBER").unwrap(),
    )
    .heartbeat(env_ms("SL_CHILD_HEARTBEAT_MS"))
    .lease_ttl(env_ms("SL_CHILD_TTL_MS"))
    .crash_check(env_ms("SL_CHILD_HEARTBEAT_MS").min(Duration::from_millis(100)));
    let member = shardlease::Member::join(&pg, cfg)
        .await
        .expect("child join");
    let mut views = member.watch();
    let view = views.borrow_and_update().clone();
    println!("READY {:?} {:?}", view.my_slot(), view.state);
    let stdin_closed = tokio::task::spawn_blocking(|| {
        let mut s = String::new();
        while std::io::stdin()
            .read_line(&mut s)
            .map(|n| n > 0)
            .unwrap_or(false)
        {}
    });
    tokio::pin!(stdin_closed);
    loop {
        tokio::select! {
            _ = &mut stdin_closed => break,
            changed = views.changed() => {
                if changed.is_err() { break }
                let v = views.borrow_and_update().clone();
                println!("VIEW gen={} state={:?} members={}", v.generation, v.state, v.members.len());
            }
        }
    }
    member.leave().await.expect("child leave");
}
