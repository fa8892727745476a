//! Test harness: one fresh database per test (from `shardlease-testkit`), and child
//! processes that hold a real membership, for crash and hang tests.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

#[allow(unused_imports)] // Not every test binary uses every helper.
pub use shardlease_testkit::{eventually, TestDb};

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

/// The server backend of `member`'s session (its lease's `backend_pid`).
pub async fn backend_of(c: &shardlease::tokio_postgres::Client, member: &str) -> i32 {
    c.query_one(
        "SELECT backend_pid FROM shardlease.leases WHERE member_id = $1",
        &[&member],
    )
    .await
    .unwrap_or_else(|e| panic!("the lease of {member}: {e}"))
    .get(0)
}

/// Whether the lease of `incarnation` is live by the database clock; `None` when it is gone.
pub async fn lease_live(c: &shardlease::tokio_postgres::Client, incarnation: i64) -> Option<bool> {
    c.query_opt(
        "SELECT expires_at > clock_timestamp() FROM shardlease.leases WHERE incarnation = $1",
        &[&incarnation],
    )
    .await
    .unwrap_or_else(|e| panic!("the lease of incarnation {incarnation}: {e}"))
    .map(|r| r.get(0))
}

/// Send `sig` to a server backend (the test runs as root, or as the server's OS user).
pub fn signal_backend(pid: i32, sig: &str) {
    let status = Command::new("kill")
        .args([&format!("-{sig}"), &pid.to_string()])
        .status()
        .expect("run kill");
    assert!(
        status.success(),
        "kill -{sig} {pid} failed: run the tests as root or as the server's OS user"
    );
}
