//! What the benches share: child processes of the bench binary itself (real processes, so
//! that kill -9 and SIGTERM are real), nearest-rank statistics, and where results go.
//!
//! Each bench uses part of it.
#![allow(dead_code)]

use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use tokio::io::{AsyncBufReadExt, BufReader, Lines};
use tokio::process::{Child, ChildStdin, ChildStdout, Command};

/// Drops `name` if a previous run left it behind, and creates it empty. Two statements:
/// neither may run inside the implicit transaction of a multi-statement simple query.
pub async fn recreate_database(
    admin: &shardlease::tokio_postgres::Client,
    name: &str,
) -> Result<()> {
    admin
        .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
        .await?;
    admin
        .batch_execute(&format!("CREATE DATABASE {name}"))
        .await?;
    Ok(())
}

/// `<target>`: a bench runs as `<target>/<profile>/deps/<name>-<hash>`.
pub fn target_dir() -> PathBuf {
    if let Ok(dir) = std::env::var("CARGO_TARGET_DIR") {
        return PathBuf::from(dir);
    }
    if let Ok(exe) = std::env::current_exe() {
        if exe.parent().and_then(|p| p.file_name()) == Some("deps".as_ref()) {
            if let Some(target) = exe.ancestors().nth(3) {
                return target.to_path_buf();
            }
        }
    }
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../target"))
}

/// A child process: this bench binary re-executed with `args` and `envs`. It prints a line
/// starting with `READY` when it is set up (or `FAILED <why>` when it gave up), and stays
/// until it is killed or its stdin closes (the parent went away).
pub struct Proc {
    name: String,
    child: Child,
    lines: Lines<BufReader<ChildStdout>>,
    _stdin: ChildStdin,
}

impl Proc {
    /// Start the child; `name` is for messages.
    pub fn spawn(name: &str, args: &[&str], envs: &[(&str, &str)]) -> Result<Proc> {
        Proc::spawn_nice(name, args, envs, 0)
    }

    /// Start the child at scheduling priority `nice` (0: this process's own; higher: lower
    /// priority), through `nice(1)`, which execs the binary in place, so the child's pid is
    /// the one a kill -9 goes to.
    pub fn spawn_nice(name: &str, args: &[&str], envs: &[(&str, &str)], nice: i32) -> Result<Proc> {
        let exe = std::env::current_exe().context("bench binary path")?;
        let mut cmd = if nice == 0 {
            Command::new(exe)
        } else {
            let mut c = Command::new("nice");
            c.arg("-n").arg(nice.to_string()).arg(exe);
            c
        };
        let mut child = cmd
            .args(args)
            .envs(envs.iter().copied())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("spawn child {name}"))?;
        let stdout = child.stdout.take().context("child stdout")?;
        let stdin = child.stdin.take().context("child stdin")?;
        Ok(Proc {
            name: name.to_owned(),
            child,
            lines: BufReader::new(stdout).lines(),
            _stdin: stdin,
        })
    }

    /// Wait up to `timeout` for the child's `READY` line; returns what follows `READY`.
    pub async fn ready(&mut self, timeout: Duration) -> Result<String> {
        let name = self.name.clone();
        let fut = async {
            loop {
                match self.lines.next_line().await {
                    Ok(Some(line)) => {
                        if let Some(rest) = line.strip_prefix("READY") {
                            return Ok(rest.trim().to_owned());
                        }
                        if let Some(e) = line.strip_prefix("FAILED ") {
                            bail!("child {name} gave up: {e}");
                        }
                    }
                    Ok(None) => bail!("child {name} exited before READY"),
                    Err(e) => bail!("reading child {name}'s stdout: {e}"),
                }
            }
        };
        tokio::time::timeout(timeout, fut)
            .await
            .map_err(|_| anyhow!("child {name} printed no READY within {timeout:?}"))?
    }

    /// SIGKILL (one `kill(2)` call); returns the instant just before the syscall.
    pub fn kill9(&mut self) -> Result<Instant> {
        let t0 = Instant::now();
        self.child
            .start_kill()
            .with_context(|| format!("kill -9 child {}", self.name))?;
        Ok(t0)
    }

    /// Send `signal` with one `kill(2)` call; returns the instant just before the syscall.
    pub fn signal(&mut self, signal: libc::c_int) -> Result<Instant> {
        let pid = self.child.id().context("child already reaped")?;
        let pid = libc::pid_t::try_from(pid).context("child pid")?;
        let t0 = Instant::now();
        // SAFETY: kill(2) takes plain integers; the pid is our own child's, not reaped yet.
        let rc = unsafe { libc::kill(pid, signal) };
        if rc != 0 {
            bail!(
                "kill({pid}, {signal}) failed: {}",
                std::io::Error::last_os_error()
            );
        }
        Ok(t0)
    }

    /// The child's exit, waited for up to `timeout`; `None` when it is still running.
    pub async fn wait(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        tokio::time::timeout(timeout, self.child.wait())
            .await
            .ok()
            .and_then(|r| r.ok())
    }

    /// Kill the child and wait up to `timeout` for it to be gone.
    pub async fn reap(mut self, timeout: Duration) {
        let _ = self.child.start_kill();
        let _ = tokio::time::timeout(timeout, self.child.wait()).await;
    }
}

/// Nearest rank: the smallest sample with at least p% of the samples at or below it.
pub fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil().max(1.0) as usize;
    sorted[rank.min(sorted.len()) - 1]
}

/// Milliseconds, as a float.
pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Nearest-rank figures of a set of samples.
pub struct Stats {
    pub p50: Duration,
    pub p90: Duration,
    pub p99: Duration,
    pub max: Duration,
    pub min: Duration,
    pub mean: Duration,
}

/// The figures of `values`; `None` when there are none.
pub fn stats(values: impl IntoIterator<Item = Duration>) -> Option<Stats> {
    let mut v: Vec<Duration> = values.into_iter().collect();
    if v.is_empty() {
        return None;
    }
    v.sort();
    Some(Stats {
        p50: percentile(&v, 50.0),
        p90: percentile(&v, 90.0),
        p99: percentile(&v, 99.0),
        max: *v.last().expect("non-empty"),
        min: v[0],
        mean: v.iter().sum::<Duration>() / v.len() as u32,
    })
}

/// The figures as JSON, in milliseconds (`null` without samples).
pub fn stats_json(s: &Option<Stats>) -> serde_json::Value {
    match s {
        None => serde_json::Value::Null,
        Some(s) => serde_json::json!({
            "p50_ms": ms(s.p50), "p90_ms": ms(s.p90), "p99_ms": ms(s.p99),
            "max_ms": ms(s.max), "min_ms": ms(s.min), "mean_ms": ms(s.mean),
        }),
    }
}

/// xorshift64*, seeded from the clock: only for random delays before an event, so that
/// events land at random phases of the heartbeats and checks.
pub struct Rng(u64);

impl Rng {
    /// Seeded from the clock.
    pub fn new() -> Rng {
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0x9E37_79B9_7F4A_7C15);
        Rng(seed | 1)
    }

    /// A number in `0..n`.
    pub fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) % n
    }
}
