//! A private PostgreSQL cluster: `initdb` on a free port in a temporary directory, for tests
//! and benchmarks that restart the server, change its settings, need many connections or
//! measure its CPU, and so must not share the server of the other tests.

use std::io;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use crate::cpu::{cluster_cpu_time, CpuUse};

/// A PostgreSQL cluster of its own: created by `initdb` in a temporary directory (as the
/// `postgres` OS user when run as root, since `initdb` refuses root), listening on a free
/// port of 127.0.0.1 with `trust` authentication for user `postgres`.
///
/// Dropping it stops the server (`pg_ctl stop -m immediate`) and removes the directory.
///
/// ```no_run
/// let server = shardlease_testkit::PrivateServer::builder()
///     .max_connections(300)
///     .conf("track_commit_timestamp = on")
///     .start()
///     .expect("a private PostgreSQL");
/// let url = server.url(); // postgres://postgres@127.0.0.1:<port>/postgres
/// server.restart().expect("restart");
/// # drop(url);
/// ```
#[derive(Debug)]
pub struct PrivateServer {
    bin: PathBuf,
    dir: PathBuf,
    port: u16,
}

/// Settings of a [`PrivateServer`], written to its `postgresql.conf` before the first start.
#[derive(Debug, Clone, Default)]
#[must_use]
pub struct PrivateServerBuilder {
    max_connections: Option<u32>,
    shared_buffers: Option<String>,
    lines: Vec<String>,
}

impl PrivateServerBuilder {
    /// `max_connections` (PostgreSQL's default is 100).
    pub fn max_connections(mut self, n: u32) -> Self {
        self.max_connections = Some(n);
        self
    }

    /// `shared_buffers`, as PostgreSQL spells it: `"128MB"`, `"1GB"`.
    pub fn shared_buffers(mut self, size: impl Into<String>) -> Self {
        self.shared_buffers = Some(size.into());
        self
    }

    /// Any other `postgresql.conf` line, e.g. `"track_commit_timestamp = on"` or
    /// `"shared_preload_libraries = 'pg_stat_statements'"`. Later lines win, as in the file.
    pub fn conf(mut self, line: impl Into<String>) -> Self {
        self.lines.push(line.into());
        self
    }

    /// Create the cluster and start it; returns once it accepts connections.
    pub fn start(self) -> io::Result<PrivateServer> {
        let bin = pg_bin()?;
        let mut last = None;
        // A free port can be taken between our probe and the server's bind: try a few.
        for _ in 0..3 {
            let port = free_port()?;
            let server = PrivateServer::init(bin.clone(), port, &self)?;
            match server.start() {
                Ok(()) => return Ok(server),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| io::Error::other("the private server did not start")))
    }
}

static COUNTER: AtomicU32 = AtomicU32::new(0);

impl PrivateServer {
    /// Settings for a new cluster; [`PrivateServerBuilder::start`] creates and starts it.
    pub fn builder() -> PrivateServerBuilder {
        PrivateServerBuilder::default()
    }

    /// A new cluster with PostgreSQL's default settings, started.
    pub fn start_default() -> io::Result<PrivateServer> {
        PrivateServer::builder().start()
    }

    fn init(bin: PathBuf, port: u16, settings: &PrivateServerBuilder) -> io::Result<PrivateServer> {
        let dir = std::env::temp_dir().join(format!(
            "shardlease-pg-{}-{port}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir)?;
        // From here on, Drop removes the directory, whatever fails next.
        let server = PrivateServer { bin, dir, port };
        if is_root() {
            let out = Command::new("chown")
                .arg("postgres:postgres")
                .arg(&server.dir)
                .output()?;
            check(&out, "chown postgres:postgres of the server directory")?;
        }
        let data = server.data_dir();
        let out = run_pg(
            &server.bin.join("initdb"),
            &[
                "-D".as_ref(),
                data.as_os_str(),
                "-U".as_ref(),
                "postgres".as_ref(),
                "--auth=trust".as_ref(),
                "-E".as_ref(),
                "UTF8".as_ref(),
                "--no-sync".as_ref(),
            ],
        )?;
        check(&out, "initdb")?;
        let mut conf = format!(
            "\n# shardlease-testkit PrivateServer\nport = {port}\nlisten_addresses = '127.0.0.1'\n\
             unix_socket_directories = '{}'\n",
            server.dir.display()
        );
        if let Some(n) = settings.max_connections {
            conf += &format!("max_connections = {n}\n");
        }
        if let Some(s) = &settings.shared_buffers {
            conf += &format!("shared_buffers = '{s}'\n");
        }
        for line in &settings.lines {
            conf += line;
            conf += "\n";
        }
        let path = data.join("postgresql.conf");
        let mut text = std::fs::read_to_string(&path)?;
        text += &conf;
        std::fs::write(&path, text)?;
        Ok(server)
    }

    /// Start the (stopped) server; returns once it accepts connections (at most 60 s).
    pub fn start(&self) -> io::Result<()> {
        self.ctl(&["start", "-w", "-t", "60"])
    }

    /// Stop the server, fast: open transactions are rolled back and sessions ended.
    pub fn stop(&self) -> io::Result<()> {
        self.ctl(&["stop", "-m", "fast", "-w", "-t", "60"])
    }

    /// Restart the server, fast (every session is ended); returns once it accepts
    /// connections again.
    pub fn restart(&self) -> io::Result<()> {
        self.ctl(&["restart", "-m", "fast", "-w", "-t", "60"])
    }

    fn ctl(&self, args: &[&str]) -> io::Result<()> {
        let data = self.data_dir();
        let log = self.log_path();
        let mut all: Vec<&std::ffi::OsStr> = vec![
            "-D".as_ref(),
            data.as_os_str(),
            "-l".as_ref(),
            log.as_os_str(),
        ];
        all.extend(args.iter().map(std::ffi::OsStr::new));
        let out = run_pg(&self.bin.join("pg_ctl"), &all)?;
        check(&out, &format!("pg_ctl {}", args[0])).map_err(|e| {
            let tail = std::fs::read_to_string(&log).unwrap_or_default();
            let tail: Vec<&str> = tail.lines().rev().take(10).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            io::Error::other(format!(
                "{e}\n--- server log ({}) ---\n{}",
                log.display(),
                tail.join("\n")
            ))
        })
    }

    /// `postgres://postgres@127.0.0.1:<port>/postgres`.
    pub fn url(&self) -> String {
        self.url_of("postgres")
    }

    /// The URL of database `db` on this server.
    pub fn url_of(&self, db: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{db}", self.port)
    }

    /// The TCP port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The data directory.
    pub fn data_dir(&self) -> PathBuf {
        self.dir.join("data")
    }

    /// The server's log file.
    pub fn log_path(&self) -> PathBuf {
        self.dir.join("log")
    }

    /// The postmaster's process id, from `postmaster.pid` (the server must be running).
    pub fn postmaster_pid(&self) -> io::Result<u32> {
        let text = std::fs::read_to_string(self.data_dir().join("postmaster.pid"))?;
        text.lines()
            .next()
            .and_then(|l| l.trim().parse().ok())
            .ok_or_else(|| io::Error::other(format!("no pid in postmaster.pid: {text:?}")))
    }

    /// CPU time (user + system) used so far by the whole cluster: the postmaster, its live
    /// child processes (backends, background workers) and the children it has already
    /// reaped. See [`cluster_cpu_time`].
    pub fn cpu_time(&self) -> io::Result<Duration> {
        cluster_cpu_time(self.postmaster_pid()?)
    }

    /// The cluster's CPU use over the next `window` (the server must keep running).
    pub async fn measure_cpu(&self, window: Duration) -> io::Result<CpuUse> {
        CpuUse::measure(self.postmaster_pid()?, window).await
    }
}

impl Drop for PrivateServer {
    fn drop(&mut self) {
        let data = self.data_dir();
        if data.join("postmaster.pid").exists() {
            let _ = run_pg(
                &self.bin.join("pg_ctl"),
                &[
                    "-D".as_ref(),
                    data.as_os_str(),
                    "-m".as_ref(),
                    "immediate".as_ref(),
                    "-w".as_ref(),
                    "stop".as_ref(),
                ],
            );
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The newest PostgreSQL server binaries: `$PG_BIN` if set, else the highest version under
/// `/usr/lib/postgresql/*/bin` (Debian's layout).
fn pg_bin() -> io::Result<PathBuf> {
    if let Ok(dir) = std::env::var("PG_BIN") {
        return Ok(PathBuf::from(dir));
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .map_err(|e| {
            io::Error::other(format!(
                "PostgreSQL server binaries under /usr/lib/postgresql (Debian's postgresql \
                 package), or PG_BIN: {e}"
            ))
        })?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let v = e.file_name().to_str()?.parse().ok()?;
            Some((v, e.path().join("bin")))
        })
        .filter(|(_, p)| p.join("initdb").exists())
        .collect();
    versions.sort();
    versions
        .pop()
        .map(|(_, p)| p)
        .ok_or_else(|| io::Error::other("no initdb under /usr/lib/postgresql/*/bin"))
}

fn free_port() -> io::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| o.stdout == b"0\n")
        .unwrap_or(false)
}

/// Run `bin` with `args`, as the postgres OS user when we are root.
fn run_pg(bin: &Path, args: &[&std::ffi::OsStr]) -> io::Result<Output> {
    let mut cmd = if is_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(bin);
        c
    } else {
        Command::new(bin)
    };
    cmd.args(args)
        .output()
        .map_err(|e| io::Error::new(e.kind(), format!("running {}: {e}", bin.display())))
}

fn check(out: &Output, what: &str) -> io::Result<()> {
    if out.status.success() {
        return Ok(());
    }
    Err(io::Error::other(format!(
        "{what} failed ({}): {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )))
}
