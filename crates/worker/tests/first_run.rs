//! The first run, as a new user meets it: `shardlease-worker demo` with `DATABASE_URL` unset
//! and nothing at the default address starts a throwaway PostgreSQL, says so in one line,
//! and leaves nothing behind, also after SIGINT; without an installation it prints the
//! install commands and exits 1; with an explicit URL it never starts one.
//!
//! The default address is pointed at a closed port with the hidden
//! `SHARDLEASE_DEFAULT_DATABASE_URL`, so the shared server on 5432 keeps running. Each test
//! gives the binary a temporary directory of its own (`TMPDIR`), to check that it is left
//! empty.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

/// Where nothing answers.
const NOTHING: &str = "postgres://postgres@127.0.0.1:1/postgres";
const ANNOUNCEMENT: &str = "started a throwaway PostgreSQL";

/// An empty directory for the binary's `TMPDIR`, removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new(test: &str) -> TempDir {
        let dir = std::env::temp_dir().join(format!(
            "shardlease-first-run-{test}-{}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create the test's TMPDIR");
        TempDir(dir)
    }

    fn entries(&self) -> Vec<String> {
        std::fs::read_dir(&self.0)
            .expect("read the test's TMPDIR")
            .filter_map(Result::ok)
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect()
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The binary with `args`, no `DATABASE_URL`, the default address at a closed port, its
/// temporary files in `tmp`, and no `RUST_LOG` (the defaults a new user has).
fn first_run(args: &[&str], tmp: &TempDir) -> Command {
    let mut cmd = Command::new(BIN);
    cmd.args(args)
        .env_remove("DATABASE_URL")
        .env_remove("RUST_LOG")
        .env_remove("PG_BIN")
        .env_remove("SHARDLEASE_PG_SEARCH")
        .env("SHARDLEASE_DEFAULT_DATABASE_URL", NOTHING)
        .env("TMPDIR", &tmp.0);
    cmd
}

/// The announcement's port and directory:
/// "... on 127.0.0.1:<port> in <dir>; it is removed when the demo ends."
fn port_and_dir(line: &str) -> (u16, PathBuf) {
    let port = line
        .split_once(" on 127.0.0.1:")
        .and_then(|(_, rest)| rest.split_whitespace().next())
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no port in {line:?}"));
    let dir = line
        .split_once(" in ")
        .and_then(|(_, rest)| rest.split_once("; it is removed"))
        .map(|(dir, _)| PathBuf::from(dir))
        .unwrap_or_else(|| panic!("no directory in {line:?}"));
    (port, dir)
}

/// Processes whose command line mentions `dir` (a postmaster runs as `postgres -D <dir>/data`).
fn processes_using(dir: &Path) -> Vec<String> {
    let needle = dir.display().to_string();
    std::fs::read_dir("/proc")
        .expect("/proc")
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().parse::<u32>().is_ok())
        .filter_map(|e| {
            let cmdline = std::fs::read(e.path().join("cmdline")).ok()?;
            let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            cmdline
                .contains(&needle)
                .then(|| format!("{}: {cmdline}", e.file_name().to_string_lossy()))
        })
        .collect()
}

fn accepts(port: u16) -> bool {
    std::net::TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), Duration::from_secs(1))
        .is_ok()
}

/// Nothing of the throwaway server is left: no process, no port, no directory.
fn assert_gone(port: u16, dir: &Path, tmp: &TempDir) {
    let procs = processes_using(dir);
    assert!(
        procs.is_empty(),
        "processes left behind:\n{}",
        procs.join("\n")
    );
    assert!(!accepts(port), "something still listens on {port}");
    assert!(!dir.exists(), "{} is left behind", dir.display());
    assert!(
        tmp.entries().is_empty(),
        "files left in TMPDIR: {:?}",
        tmp.entries()
    );
}

#[tokio::test]
async fn demo_without_a_server_runs_on_a_throwaway_one_and_leaves_nothing() {
    let tmp = TempDir::new("ok");
    let mut w = Worker::spawn_command("demo", first_run(&["demo", "--tick", "300ms"], &tmp));
    let status = w.wait_exit(Duration::from_secs(120)).await;
    let (stdout, stderr) = (w.stdout(), w.stderr());
    assert!(
        status.success(),
        "demo: {status}\nstdout:\n{}\nstderr:\n{}",
        stdout.join("\n"),
        stderr.join("\n")
    );
    let announced: Vec<&String> = stdout.iter().filter(|l| l.contains(ANNOUNCEMENT)).collect();
    assert_eq!(
        announced.len(),
        1,
        "one line says what it did:\n{}",
        stdout.join("\n")
    );
    let line = announced[0];
    assert!(
        line.starts_with("Nothing answers at 127.0.0.1:1 and DATABASE_URL is unset"),
        "{line}"
    );
    assert_eq!(line, &stdout[0], "it is the first line");
    for step in ["Step 1", "Step 2", "Step 3", "All workers left"] {
        assert!(
            stdout.iter().any(|l| l.starts_with(step)),
            "no {step:?}:\n{}",
            stdout.join("\n")
        );
    }
    assert!(
        stderr.is_empty(),
        "nothing on stderr (only warnings are logged):\n{}",
        stderr.join("\n")
    );
    let (port, dir) = port_and_dir(line);
    assert!(dir.starts_with(&tmp.0), "{} is under TMPDIR", dir.display());
    assert_gone(port, &dir, &tmp);
}

#[tokio::test]
async fn sigint_mid_demo_stops_the_workers_and_removes_the_throwaway_server() {
    let tmp = TempDir::new("sigint");
    // Ticks of 5 s: the demo is far from done when the signal comes.
    let mut w = Worker::spawn_command("demo", first_run(&["demo", "--tick", "5s"], &tmp));
    let (_, line) = w
        .wait_stdout(
            0,
            "the throwaway server's announcement",
            Duration::from_secs(60),
            |l| l.contains(ANNOUNCEMENT),
        )
        .await;
    let (port, dir) = port_and_dir(&line);
    w.wait_stdout(1, "the demo's first line", Duration::from_secs(30), |l| {
        l.starts_with("Demo:")
    })
    .await;
    assert!(accepts(port), "the server runs on {port}");
    assert!(
        !processes_using(&dir).is_empty(),
        "a postmaster runs in {}",
        dir.display()
    );

    let sent = Instant::now();
    w.signal("INT");
    let status = w.wait_exit(Duration::from_secs(30)).await;
    let took = sent.elapsed();
    assert_eq!(
        status.code(),
        Some(130),
        "SIGINT: exit 130\nstdout:\n{}\nstderr:\n{}",
        w.stdout().join("\n"),
        w.stderr().join("\n")
    );
    assert!(
        w.stderr().iter().any(|l| l.starts_with("interrupted")),
        "it says it was interrupted: {:?}",
        w.stderr()
    );
    assert!(
        !w.stdout().iter().any(|l| l.starts_with("Step 3")),
        "the demo was cut short"
    );
    assert_gone(port, &dir, &tmp);
    eprintln!("demo: exited 130 and removed its server {took:?} after SIGINT");
}

#[tokio::test]
async fn demo_without_an_installation_prints_the_install_commands_and_exits_1() {
    let tmp = TempDir::new("none");
    let mut cmd = first_run(&["demo"], &tmp);
    // No programs on PATH (the binary is started by its full path), no usual places.
    cmd.env("PATH", "").env("SHARDLEASE_PG_SEARCH", "");
    let mut w = Worker::spawn_command("demo", cmd);
    let status = w.wait_exit(Duration::from_secs(30)).await;
    let stderr = w.stderr().join("\n");
    assert_eq!(status.code(), Some(1), "exit 1: {status}\n{stderr}");
    for needle in [
        "nothing answers at 127.0.0.1:1 and DATABASE_URL is unset",
        "no PostgreSQL installation found",
        "Debian/Ubuntu:  sudo apt-get install postgresql",
        "Fedora:         sudo dnf install postgresql-server",
        "macOS:          brew install postgresql@17",
        "Or set DATABASE_URL",
    ] {
        assert!(stderr.contains(needle), "{needle:?} missing:\n{stderr}");
    }
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(w.stdout().is_empty(), "nothing on stdout: {:?}", w.stdout());
    assert!(tmp.entries().is_empty(), "{:?}", tmp.entries());
}

#[tokio::test]
async fn an_explicit_database_url_never_starts_a_throwaway_server() {
    let tmp = TempDir::new("explicit");
    let mut cmd = first_run(&["demo"], &tmp);
    cmd.env("DATABASE_URL", NOTHING);
    let mut w = Worker::spawn_command("demo", cmd);
    let status = w.wait_exit(Duration::from_secs(30)).await;
    let stderr = w.stderr();
    assert_eq!(status.code(), Some(1), "exit 1: {status}\n{stderr:?}");
    assert_eq!(stderr.len(), 1, "one line: {stderr:?}");
    assert!(
        stderr[0].contains("cannot connect") && stderr[0].contains("127.0.0.1:1"),
        "{stderr:?}"
    );
    assert!(
        !w.stdout().iter().any(|l| l.contains(ANNOUNCEMENT)),
        "{:?}",
        w.stdout()
    );
    assert!(tmp.entries().is_empty(), "{:?}", tmp.entries());
}
