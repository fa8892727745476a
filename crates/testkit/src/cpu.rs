//! CPU time of a PostgreSQL cluster, from `/proc/<pid>/stat` (Linux).

use std::io;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// CPU time (user + system) used so far by the cluster whose postmaster is `postmaster`:
/// the postmaster's own time and that of the children it has reaped (`cutime`, `cstime`),
/// plus the time of its live child processes (every backend and background process is a
/// direct child of the postmaster). Read from `/proc/<pid>/stat`; a backend that exits
/// between two reads moves from the live sum to the postmaster's reaped sum, so
/// differences of two readings stay right.
pub fn cluster_cpu_time(postmaster: u32) -> io::Result<Duration> {
    let main = read_stat(postmaster)?.ok_or_else(|| {
        io::Error::other(format!("no process {postmaster}: is the server running?"))
    })?;
    let mut ticks = main.utime + main.stime + main.cutime + main.cstime;
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
                ticks += st.utime + st.stime;
            }
        }
    }
    Ok(Duration::from_secs_f64(ticks as f64 / clock_ticks() as f64))
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
    utime: u64,
    stime: u64,
    cutime: u64,
    cstime: u64,
}

/// Fields 4 (ppid) and 14 to 17 (utime, stime, cutime, cstime) of `/proc/<pid>/stat`.
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
        utime: num(11)?,
        stime: num(12)?,
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
}
