//! A real private cluster: it starts, accepts connections, restarts, and leaves nothing
//! behind, neither when dropped nor when its owner is killed with SIGKILL (the watchdog).
//! Needs a PostgreSQL installation (initdb and pg_ctl); see the crate docs for where it looks.

use std::io::{BufRead, BufReader};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use shardlease_localpg::{Builder, Cluster};

/// True while process `pid` exists and is not a zombie.
fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z"),
        Err(_) => false,
    }
}

fn accepts(port: u16) -> bool {
    TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), Duration::from_secs(1)).is_ok()
}

/// Wait until `cond` holds; panics naming `what` after `timeout`.
fn wait_for(timeout: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(
            start.elapsed() < timeout,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn start() -> Cluster {
    Builder::new()
        .dir_prefix("shardlease-localpg-test")
        .max_connections(20)
        .start()
        .unwrap_or_else(|e| panic!("a private cluster: {e}"))
}

#[test]
fn a_cluster_runs_restarts_and_leaves_nothing_when_dropped() {
    let cluster = start();
    let (dir, port) = (cluster.dir().to_path_buf(), cluster.port());
    let pid = cluster.postmaster_pid().expect("postmaster.pid");
    assert!(alive(pid), "the postmaster {pid} runs");
    assert!(accepts(port), "it accepts connections on 127.0.0.1:{port}");
    assert_eq!(
        cluster.url(),
        format!("postgres://postgres@127.0.0.1:{port}/postgres")
    );
    if cluster.installation().version().is_none() {
        panic!(
            "no version from {}",
            cluster.installation().pg_ctl().display()
        );
    }
    cluster.restart().expect("restart");
    let new_pid = cluster
        .postmaster_pid()
        .expect("postmaster.pid after restart");
    assert_ne!(new_pid, pid, "a restart runs a new postmaster");
    assert!(accepts(port), "it accepts connections after the restart");

    drop(cluster);
    assert!(!dir.exists(), "{} is removed", dir.display());
    assert!(!alive(new_pid), "the postmaster {new_pid} has stopped");
    assert!(!accepts(port), "nothing listens on {port} any more");
}

/// The child half of the next test: start a cluster, say where, then wait to be killed.
#[test]
#[ignore = "run by owner_killed_with_sigkill_leaves_nothing_behind"]
fn child_holding_a_cluster() {
    if std::env::var_os("LOCALPG_CHILD").is_none() {
        return;
    }
    let cluster = start();
    println!(
        "CLUSTER {} {} {}",
        cluster.dir().display(),
        cluster.port(),
        cluster.postmaster_pid().expect("postmaster.pid")
    );
    std::thread::sleep(Duration::from_secs(120));
}

#[test]
fn owner_killed_with_sigkill_leaves_nothing_behind() {
    let mut child = Command::new(std::env::current_exe().expect("test binary"))
        .args([
            "--ignored",
            "--exact",
            "child_holding_a_cluster",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("LOCALPG_CHILD", "1")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn the child");
    let stdout = child.stdout.take().expect("stdout");
    let line = BufReader::new(stdout)
        .lines()
        .map_while(Result::ok)
        // libtest prints "test child_holding_a_cluster ... " first, on the same line.
        .find_map(|l| l.find("CLUSTER ").map(|i| l[i..].to_owned()))
        .expect("the child says where its cluster is");
    let f: Vec<&str> = line.split_whitespace().collect();
    let (dir, port, pid): (PathBuf, u16, u32) = (
        f[1].into(),
        f[2].parse().expect("port"),
        f[3].parse().expect("pid"),
    );
    assert!(alive(pid) && dir.exists() && accepts(port), "{line}");

    child.kill().expect("SIGKILL the child"); // std's kill is SIGKILL
    child.wait().expect("reap the child");
    wait_for(
        Duration::from_secs(30),
        "the watchdog to stop the killed owner's server and remove its directory",
        || !alive(pid) && !dir.exists(),
    );
    assert!(!accepts(port), "nothing listens on {port} any more");
}
