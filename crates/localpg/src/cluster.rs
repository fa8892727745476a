//! A cluster of its own: `initdb` in a temporary directory, `pg_ctl` to start and stop it,
//! removed when dropped (and by its [`Watchdog`] when this process dies without dropping it).

use std::ffi::OsStr;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};

use crate::error::{Error, Result};
use crate::install::Installation;
use crate::os::{self, RunAs};
use crate::watchdog::Watchdog;

/// How long `pg_ctl` may wait for a start or stop, seconds.
const PG_CTL_WAIT_SECS: &str = "60";

/// How many free ports to try when another process takes ours before the server binds it.
const PORT_TRIES: usize = 3;

/// Settings of a [`Cluster`], written to its `postgresql.conf` before the first start.
#[derive(Debug, Clone)]
#[must_use]
pub struct Builder {
    prefix: String,
    installation: Option<Installation>,
    max_connections: Option<u32>,
    shared_buffers: Option<String>,
    lines: Vec<String>,
}

impl Default for Builder {
    fn default() -> Self {
        Builder {
            prefix: "shardlease-pg".into(),
            installation: None,
            max_connections: None,
            shared_buffers: None,
            lines: Vec::new(),
        }
    }
}

impl Builder {
    /// Default settings: the installation [`Installation::find`] finds, PostgreSQL's own
    /// settings, a directory named `shardlease-pg-<pid>-<n>` under the temporary directory.
    pub fn new() -> Builder {
        Builder::default()
    }

    /// Name the temporary directory `<prefix>-<pid>-<n>`.
    pub fn dir_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
        self
    }

    /// Use this installation instead of searching for one.
    pub fn installation(mut self, installation: Installation) -> Self {
        self.installation = Some(installation);
        self
    }

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

    /// Any other `postgresql.conf` line, e.g. `"fsync = off"`. Later lines win, as in the file.
    pub fn conf(mut self, line: impl Into<String>) -> Self {
        self.lines.push(line.into());
        self
    }

    /// Create the cluster (`initdb`) without starting it, e.g. to add files or
    /// `pg_hba.conf` lines first; [`Cluster::start`] starts it.
    pub fn init(self) -> Result<Cluster> {
        let installation = match self.installation.clone() {
            Some(i) => i,
            None => Installation::find()?,
        };
        Cluster::init(installation, &self)
    }

    /// Create the cluster and start it; returns once it accepts connections. When another
    /// process takes the free port first, it tries another (three in all).
    pub fn start(self) -> Result<Cluster> {
        let mut cluster = self.init()?;
        let mut tries = 0;
        loop {
            tries += 1;
            match cluster.start() {
                Ok(()) => return Ok(cluster),
                Err(_) if tries < PORT_TRIES && cluster.log_says_port_taken() => {
                    cluster.move_to_free_port()?;
                }
                Err(e) => return Err(e),
            }
        }
    }
}

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A PostgreSQL cluster of its own: created by `initdb` in a temporary directory, listening
/// on a free port of 127.0.0.1 (and a Unix socket in that directory) with `trust`
/// authentication for the superuser `postgres`, `UTF8` and the C locale.
///
/// Started as root, every program runs as the OS user `postgres` (or `nobody` where there is
/// no such user) through `runuser`, since PostgreSQL refuses to run as root; the directory
/// then belongs to that user. The programs run in a process group of their own, so a Ctrl-C
/// at the terminal reaches only this process, which decides when the server stops.
///
/// Dropping it stops the server (`pg_ctl stop -m immediate`) and removes the directory. If
/// this process dies without dropping it (SIGKILL, `std::process::exit`, a value kept in a
/// `static`), its watchdog does the same: a `/bin/sh` that waits for the end of a pipe only
/// this process holds.
#[derive(Debug)]
pub struct Cluster {
    installation: Installation,
    dir: PathBuf,
    port: u16,
    run_as: RunAs,
    watchdog: Option<Watchdog>,
}

impl Cluster {
    fn init(installation: Installation, settings: &Builder) -> Result<Cluster> {
        let (dir, run_as) = make_dir(&settings.prefix)?;
        let port = os::free_port()?;
        // From here on, Drop removes the directory, whatever fails next.
        let mut cluster = Cluster {
            installation,
            dir,
            port,
            run_as,
            watchdog: None,
        };
        cluster.watchdog = Some(Watchdog::spawn(&cluster.stop_command(), &cluster.dir)?);
        let data = cluster.data_dir();
        let out = cluster.run(
            &cluster.installation.initdb(),
            &[
                "-D".as_ref(),
                data.as_os_str(),
                "-U".as_ref(),
                "postgres".as_ref(),
                "--auth=trust".as_ref(),
                "-E".as_ref(),
                "UTF8".as_ref(),
                "--no-locale".as_ref(),
                "--no-sync".as_ref(),
            ],
        )?;
        check(&out, "initdb")?;
        let mut conf = format!(
            "\n# shardlease-localpg\nport = {port}\nlisten_addresses = '127.0.0.1'\n\
             unix_socket_directories = '{}'\n",
            cluster.dir.display()
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
        cluster.append_conf(&conf)?;
        Ok(cluster)
    }

    /// Start the (stopped) server; returns once it accepts connections (at most 60 s).
    pub fn start(&self) -> Result<()> {
        self.ctl(&["start", "-w", "-t", PG_CTL_WAIT_SECS])
    }

    /// Stop the server, fast: open transactions are rolled back and sessions ended.
    pub fn stop(&self) -> Result<()> {
        self.ctl(&["stop", "-m", "fast", "-w", "-t", PG_CTL_WAIT_SECS])
    }

    /// Restart the server, fast (every session is ended); returns once it accepts
    /// connections again.
    pub fn restart(&self) -> Result<()> {
        self.ctl(&["restart", "-m", "fast", "-w", "-t", PG_CTL_WAIT_SECS])
    }

    /// Promote this standby to a primary (a new timeline); returns once it is one.
    pub fn promote(&self) -> Result<()> {
        self.ctl(&["promote", "-w", "-t", PG_CTL_WAIT_SECS])
    }

    /// Stop the server at once, as a crash would (`pg_ctl stop -m immediate`).
    pub fn crash(&self) -> Result<()> {
        self.ctl(&["stop", "-m", "immediate", "-w", "-t", PG_CTL_WAIT_SECS])
    }

    /// A streaming standby of this (running) server: `pg_basebackup -R` into a directory of
    /// its own, on a free port, started; returns once it accepts connections. It replicates
    /// asynchronously, so that a test can stop it, write more here, and promote it
    /// ([`Cluster::promote`]) into a failover that loses those writes.
    pub fn standby(&self) -> Result<Cluster> {
        let (dir, run_as) = make_dir("shardlease-pg-standby")?;
        let port = os::free_port()?;
        let mut standby = Cluster {
            installation: self.installation.clone(),
            dir,
            port,
            run_as,
            watchdog: None,
        };
        standby.watchdog = Some(Watchdog::spawn(&standby.stop_command(), &standby.dir)?);
        let data = standby.data_dir();
        let primary_port = self.port.to_string();
        let out = standby.run(
            &self.installation.bin_dir().join("pg_basebackup"),
            &[
                "-D".as_ref(),
                data.as_os_str(),
                "-h".as_ref(),
                "127.0.0.1".as_ref(),
                "-p".as_ref(),
                primary_port.as_ref(),
                "-U".as_ref(),
                "postgres".as_ref(),
                "-R".as_ref(),
                "-X".as_ref(),
                "stream".as_ref(),
                "--no-sync".as_ref(),
            ],
        )?;
        check(&out, "pg_basebackup")?;
        standby.append_conf(&format!(
            "\n# shardlease-localpg standby\nport = {port}\nunix_socket_directories = '{}'",
            standby.dir.display()
        ))?;
        standby.start()?;
        Ok(standby)
    }

    /// `postgres://postgres@127.0.0.1:<port>/postgres`.
    pub fn url(&self) -> String {
        self.url_of("postgres")
    }

    /// The URL of database `db` on this server (`db` must not need percent-encoding).
    pub fn url_of(&self, db: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{db}", self.port)
    }

    /// The TCP port (on 127.0.0.1).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The temporary directory, removed on drop.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The data directory.
    pub fn data_dir(&self) -> PathBuf {
        self.dir.join("data")
    }

    /// The server's log file.
    pub fn log_path(&self) -> PathBuf {
        self.dir.join("log")
    }

    /// The installation it runs from.
    pub fn installation(&self) -> &Installation {
        &self.installation
    }

    /// The OS user the server runs as when this process is root; `None` otherwise (it runs
    /// as this process's user).
    pub fn os_user(&self) -> Option<&str> {
        match &self.run_as {
            RunAs::Me => None,
            RunAs::User { name, .. } => Some(name),
        }
    }

    /// Append lines to `postgresql.conf` (they win over earlier ones); a running server
    /// reads them at its next restart, or reload for settings that allow it.
    pub fn append_conf(&self, lines: &str) -> Result<()> {
        let path = self.data_dir().join("postgresql.conf");
        let what = || format!("appending to {}", path.display());
        let mut text = fs::read_to_string(&path).map_err(|e| Error::io(what(), e))?;
        text += lines;
        text += "\n";
        fs::write(&path, text).map_err(|e| Error::io(what(), e))
    }

    /// Write `contents` to `name` in the data directory (e.g. a certificate, or a new
    /// `pg_hba.conf`), owned by the server's user, readable by it alone.
    pub fn write_data_file(&self, name: &str, contents: &[u8]) -> Result<PathBuf> {
        use std::os::unix::fs::PermissionsExt;
        let path = self.data_dir().join(name);
        let what = || format!("writing {}", path.display());
        fs::write(&path, contents).map_err(|e| Error::io(what(), e))?;
        fs::set_permissions(&path, fs::Permissions::from_mode(0o600))
            .map_err(|e| Error::io(what(), e))?;
        if let RunAs::User { uid, .. } = &self.run_as {
            std::os::unix::fs::chown(&path, Some(*uid), None).map_err(|e| Error::io(what(), e))?;
        }
        Ok(path)
    }

    /// The postmaster's process id, from `postmaster.pid` (the server must be running).
    pub fn postmaster_pid(&self) -> Result<u32> {
        let path = self.data_dir().join("postmaster.pid");
        let text = fs::read_to_string(&path)
            .map_err(|e| Error::io(format!("reading {}", path.display()), e))?;
        text.lines()
            .next()
            .and_then(|l| l.trim().parse().ok())
            .ok_or_else(|| {
                Error::io(
                    format!("reading {}", path.display()),
                    io::Error::other(format!("no pid in {text:?}")),
                )
            })
    }

    /// The last `n` lines of the server log.
    pub fn log_tail(&self, n: usize) -> String {
        let text = fs::read_to_string(self.log_path()).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    fn ctl(&self, args: &[&str]) -> Result<()> {
        let data = self.data_dir();
        let log = self.log_path();
        let mut all: Vec<&OsStr> = vec![
            "-D".as_ref(),
            data.as_os_str(),
            "-l".as_ref(),
            log.as_os_str(),
        ];
        all.extend(args.iter().map(OsStr::new));
        let out = self.run(&self.installation.pg_ctl(), &all)?;
        check(&out, &format!("pg_ctl {}", args[0])).map_err(|e| match e {
            Error::Command {
                what,
                status,
                output,
            } => Error::Command {
                what,
                status,
                output: format!(
                    "{output}\n--- server log ({}) ---\n{}",
                    log.display(),
                    self.log_tail(10)
                ),
            },
            e => e,
        })
    }

    fn log_says_port_taken(&self) -> bool {
        let log = fs::read_to_string(self.log_path()).unwrap_or_default();
        log.contains("could not bind") || log.contains("Address already in use")
    }

    fn move_to_free_port(&mut self) -> Result<()> {
        self.port = os::free_port()?;
        self.append_conf(&format!("port = {}", self.port))
    }

    /// Run `program` with `args` (as the server's user), in the cluster's directory and a
    /// process group of its own.
    fn run(&self, program: &Path, args: &[&OsStr]) -> Result<Output> {
        let mut cmd = os::command_as(&self.run_as, program)?;
        cmd.args(args)
            .current_dir(&self.dir)
            .env_remove("PGDATA")
            .env_remove("PGPORT")
            .stdin(Stdio::null());
        os::in_own_process_group(&mut cmd);
        cmd.output()
            .map_err(|e| Error::io(format!("running {}", program.display()), e))
    }

    /// The command that stops the server at once, as the watchdog runs it.
    fn stop_command(&self) -> Vec<String> {
        let mut argv = os::prefix_as(&self.run_as);
        argv.push(self.installation.pg_ctl().display().to_string());
        for a in ["-D", &self.data_dir().display().to_string(), "-m"] {
            argv.push(a.to_owned());
        }
        argv.extend(["immediate", "-w", "stop"].map(str::to_owned));
        argv
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // The watchdog would do the same at this process's exit: end it first.
        drop(self.watchdog.take());
        let data = self.data_dir();
        if data.join("postmaster.pid").exists() {
            let _ = self.run(
                &self.installation.pg_ctl(),
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
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// A new directory `<temp>/<prefix>-<pid>-<n>`, given to the server's user when we are root.
fn make_dir(prefix: &str) -> Result<(PathBuf, RunAs)> {
    let temp = std::env::temp_dir();
    loop {
        let dir = temp.join(format!(
            "{prefix}-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        match fs::create_dir(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(Error::io(format!("creating {}", dir.display()), e)),
        }
        let run_as = match os::run_as_for(&dir) {
            Ok(r) => r,
            Err(e) => {
                let _ = fs::remove_dir(&dir);
                return Err(e);
            }
        };
        if let RunAs::User { uid, .. } = &run_as {
            if let Err(e) = std::os::unix::fs::chown(&dir, Some(*uid), None) {
                let _ = fs::remove_dir(&dir);
                return Err(Error::io(
                    format!("giving {} to uid {uid}", dir.display()),
                    e,
                ));
            }
        }
        return Ok((dir, run_as));
    }
}

fn check(out: &Output, what: &str) -> Result<()> {
    if out.status.success() {
        return Ok(());
    }
    Err(Error::Command {
        what: what.to_owned(),
        status: out.status.to_string(),
        output: format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    })
}
