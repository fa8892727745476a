//! CPU time of a PostgreSQL cluster, from `/proc` (Linux).
//!
//! Live processes are read from `/proc/<pid>/task/*/schedstat`: the scheduler's own account of the
//! time each spent on a CPU, in nanoseconds. The tick-sampled `utime`/`stime` of
//! `/proc/<pid>/stat` are not used for them: a backend that wakes on a timer-driven request,
//! runs for tens of microseconds and sleeps again is almost never the task running when the
//! sampling tick fires, so a group of mostly idle backends reads close to zero. Measured on a
//! private cluster with 1,000 pgbench clients sending one `SELECT 1` a second each:
//! `utime + stime` said 0.003 core, `schedstat` 0.085 core.

use std::io;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// CPU time used so far by the cluster whose postmaster is `postmaster`: the exact on-CPU
/// time (`schedstat`) of the postmaster and of its live child processes (every
/// backend and background process is a direct child of the postmaster), plus the
/// tick-sampled time (`cutime + cstime`) of the children it has reaped. A backend that exits
/// between two reads moves from the live sum to the reaped sum, measured the coarser way; at
/// rest that is only the odd autovacuum worker.
pub fn cluster_cpu_time(postmaster: u32) -> io::Result<Duration> {
    let no_server = || io::Error::other(format!("no process {postmaster}: is the server running?"));
    let main = read_stat(postmaster)?.ok_or_else(no_server)?;
    let mut total = read_runtime(postmaster)?.ok_or_else(no_server)?
        + Duration::from_secs_f64((main.cutime + main.cstime) as f64 / clock_ticks() as f64);
    for entry in std::fs::read_dir("/proc")? {
        let Ok(entry) = entry else { continue };
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        // A process may exit between listing and reading: skip it.
        if let Ok(Some(st)) = read_stat(pid) {
            if st.ppid == postmaster {
                total += read_runtime(pid).ok().flatten().unwrap_or_default();
            }
        }
    }
    Ok(total)
}

/// CPU used over a wall-clock window.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CpuUse {
    /// CPU time (user + system) used in the window.
    pub cpu: Duration,
    /// The window's length.
    pub wall: Duration,
}

impl CpuUse {
    /// Average cores busy: CPU time divided by wall time.
    pub fn cores(&self) -> f64 {
        self.cpu.as_secs_f64() / self.wall.as_secs_f64().max(1e-9)
    }

    /// Read [`cluster_cpu_time`] of `postmaster`, wait `window`, read it again.
    pub async fn measure(postmaster: u32, window: Duration) -> io::Result<CpuUse> {
        let (c0, t0) = (cluster_cpu_time(postmaster)?, Instant::now());
        tokio::time::sleep(window).await;
        let (c1, t1) = (cluster_cpu_time(postmaster)?, Instant::now());
        Ok(CpuUse {
            cpu: c1.saturating_sub(c0),
            wall: t1 - t0,
        })
    }
}

struct Stat {
    ppid: u32,
    cutime: u64,
    cstime: u64,
}

/// Nanoseconds spent on a CPU by every thread of `pid`: field 1 of
/// `/proc/<pid>/task/<tid>/schedstat`, summed (`/proc/<pid>/schedstat` is the main thread's
/// alone; PostgreSQL's processes have one thread, but the test kit's callers may not). `None`
/// when the process is gone.
fn read_runtime(pid: u32) -> io::Result<Option<Duration>> {
    let tasks = match std::fs::read_dir(format!("/proc/{pid}/task")) {
        Ok(t) => t,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let mut total = Duration::ZERO;
    let mut read_any = false;
    for task in tasks {
        let Ok(task) = task else { continue };
        // A thread may exit between listing and reading: skip it.
        let Ok(text) = std::fs::read_to_string(task.path().join("schedstat")) else {
            continue;
        };
        let ns = text
            .split_whitespace()
            .next()
            .and_then(|s| s.parse::<u64>().ok())
            .ok_or_else(|| {
                io::Error::other(format!(
                    "unexpected {}/schedstat: {text:?}",
                    task.path().display()
                ))
            })?;
        total += Duration::from_nanos(ns);
        read_any = true;
    }
    if !read_any {
        if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            return Ok(None);
        }
        // Never read as zero: a CPU figure of nothing would pass every bound.
        return Err(io::Error::other(format!(
            "no /proc/{pid}/task/*/schedstat: this kernel keeps no scheduler statistics \
             (CONFIG_SCHED_INFO), so the cluster's CPU time cannot be measured"
        )));
    }
    Ok(Some(total))
}

/// Fields 4 (ppid), 16 and 17 (cutime, cstime) of `/proc/<pid>/stat`.
fn read_stat(pid: u32) -> io::Result<Option<Stat>> {
    let text = match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(t) => t,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    // The command name (field 2) is in parentheses and may contain spaces: split after it.
    let rest = text
        .rsplit_once(')')
        .map(|(_, r)| r)
        .ok_or_else(|| io::Error::other(format!("unexpected /proc/{pid}/stat: {text:?}")))?;
    // rest = " <state> <ppid> ...": field 3 is index 0 here.
    let f: Vec<&str> = rest.split_whitespace().collect();
    let num = |i: usize| -> io::Result<u64> {
        f.get(i)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| io::Error::other(format!("field {} of /proc/{pid}/stat", i + 3)))
    };
    Ok(Some(Stat {
        ppid: num(1)? as u32,
        cutime: num(13)?,
        cstime: num(14)?,
    }))
}

/// Clock ticks per second (`getconf CLK_TCK`; 100 on Linux when that cannot run).
fn clock_ticks() -> u64 {
    static TICKS: OnceLock<u64> = OnceLock::new();
    *TICKS.get_or_init(|| {
        std::process::Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s.trim().parse().ok())
            .filter(|&t| t > 0)
            .unwrap_or(100)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_process_stat_parses() {
        let st = read_stat(std::process::id())
            .expect("read /proc/self")
            .expect("we exist");
        assert!(st.ppid > 0);
    }

    #[test]
    fn own_runtime_grows_with_work() {
        let pid = std::process::id();
        let before = read_runtime(pid).expect("read").expect("we exist");
        let spin = Instant::now();
        let mut x = 0u64;
        while spin.elapsed() < Duration::from_millis(30) {
            x = std::hint::black_box(x.wrapping_add(1));
        }
        let after = read_runtime(pid).expect("read").expect("we exist");
        // 30 ms of spinning on this thread: at least most of it is on a CPU.
        assert!(
            after - before >= Duration::from_millis(15),
            "schedstat grew by only {:?} over 30 ms of spinning",
            after - before
        );
    }
}
