//! A private PostgreSQL cluster for tests and benchmarks that restart the server, change its
//! settings, need many connections or measure its CPU, and so must not share the server of
//! the other tests. The cluster itself is `shardlease-localpg`'s (the code the worker's
//! `demo` uses on a first run); this adds the CPU measurements and `io::Result`s.

use std::io;
use std::path::PathBuf;
use std::time::Duration;

use shardlease_localpg::{Builder, Cluster};

use crate::cpu::{cluster_cpu_time, CpuUse};

/// A PostgreSQL cluster of its own: created by `initdb` in a temporary directory (as the
/// `postgres` OS user when run as root, since `initdb` refuses root), listening on a free
/// port of 127.0.0.1 with `trust` authentication for user `postgres`.
///
/// Dropping it stops the server (`pg_ctl stop -m immediate`) and removes the directory; so
/// does a watchdog when the test process is killed first.
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
    cluster: Cluster,
}

/// Settings of a [`PrivateServer`], written to its `postgresql.conf` before the first start.
#[derive(Debug, Clone)]
#[must_use]
pub struct PrivateServerBuilder {
    builder: Builder,
    hba: Vec<String>,
    files: Vec<(String, Vec<u8>)>,
}

impl Default for PrivateServerBuilder {
    fn default() -> Self {
        PrivateServerBuilder {
            builder: Builder::new().dir_prefix("shardlease-pg"),
            hba: Vec::new(),
            files: Vec::new(),
        }
    }
}

impl PrivateServerBuilder {
    /// `max_connections` (PostgreSQL's default is 100).
    pub fn max_connections(mut self, n: u32) -> Self {
        self.builder = self.builder.max_connections(n);
        self
    }

    /// `shared_buffers`, as PostgreSQL spells it: `"128MB"`, `"1GB"`.
    pub fn shared_buffers(mut self, size: impl Into<String>) -> Self {
        self.builder = self.builder.shared_buffers(size);
        self
    }

    /// Any other `postgresql.conf` line, e.g. `"track_commit_timestamp = on"` or
    /// `"shared_preload_libraries = 'pg_stat_statements'"`. Later lines win, as in the file.
    pub fn conf(mut self, line: impl Into<String>) -> Self {
        self.builder = self.builder.conf(line);
        self
    }

    /// A `pg_hba.conf` line, put before initdb's own lines (the first match wins), e.g.
    /// `"hostssl all all 127.0.0.1/32 cert clientcert=verify-full"`.
    pub fn hba(mut self, line: impl Into<String>) -> Self {
        self.hba.push(line.into());
        self
    }

    /// A file written into the data directory before the first start, readable by the server
    /// only (mode 0600, owned by the `postgres` OS user when run as root): certificates and
    /// keys for `ssl_cert_file = 'server.crt'` and the like.
    pub fn file(mut self, name: impl Into<String>, contents: impl Into<Vec<u8>>) -> Self {
        self.files.push((name.into(), contents.into()));
        self
    }

    /// Create the cluster and start it; returns once it accepts connections.
    pub fn start(self) -> io::Result<PrivateServer> {
        if self.hba.is_empty() && self.files.is_empty() {
            return Ok(PrivateServer {
                cluster: self.builder.start().map_err(io::Error::other)?,
            });
        }
        let server = self.init()?;
        server.start()?;
        Ok(server)
    }

    /// Create the cluster without starting it (to write certificates or `pg_hba.conf`
    /// first, through [`PrivateServer::cluster`]); [`PrivateServer::start`] starts it.
    /// The [`hba`](Self::hba) lines and [`file`](Self::file)s are written already.
    pub fn init(self) -> io::Result<PrivateServer> {
        let cluster = self.builder.init().map_err(io::Error::other)?;
        if !self.hba.is_empty() {
            let initdb_lines = std::fs::read_to_string(cluster.data_dir().join("pg_hba.conf"))?;
            let text = self.hba.join("\n") + "\n" + &initdb_lines;
            cluster
                .write_data_file("pg_hba.conf", text.as_bytes())
                .map_err(io::Error::other)?;
        }
        for (name, contents) in &self.files {
            cluster
                .write_data_file(name, contents)
                .map_err(io::Error::other)?;
        }
        Ok(PrivateServer { cluster })
    }
}

impl PrivateServer {
    /// Settings for a new cluster; [`PrivateServerBuilder::start`] creates and starts it.
    pub fn builder() -> PrivateServerBuilder {
        PrivateServerBuilder::default()
    }

    /// A new cluster with PostgreSQL's default settings, started.
    pub fn start_default() -> io::Result<PrivateServer> {
        PrivateServer::builder().start()
    }

    /// Start the (stopped) server; returns once it accepts connections (at most 60 s).
    pub fn start(&self) -> io::Result<()> {
        self.cluster.start().map_err(io::Error::other)
    }

    /// Stop the server, fast: open transactions are rolled back and sessions ended.
    pub fn stop(&self) -> io::Result<()> {
        self.cluster.stop().map_err(io::Error::other)
    }

    /// Restart the server, fast (every session is ended); returns once it accepts
    /// connections again.
    pub fn restart(&self) -> io::Result<()> {
        self.cluster.restart().map_err(io::Error::other)
    }

    /// A streaming standby of this server, started (see `shardlease_localpg::Cluster::standby`):
    /// asynchronous, so that a test can stop it, write more on this server, and promote it
    /// ([`PrivateServer::promote`]) into a failover that loses those writes.
    pub fn standby(&self) -> io::Result<PrivateServer> {
        Ok(PrivateServer {
            cluster: self.cluster.standby().map_err(io::Error::other)?,
        })
    }

    /// Promote this standby to a primary (a new timeline); returns once it is one.
    pub fn promote(&self) -> io::Result<()> {
        self.cluster.promote().map_err(io::Error::other)
    }

    /// Stop the server at once, as a crash would (`pg_ctl stop -m immediate`).
    pub fn crash(&self) -> io::Result<()> {
        self.cluster.crash().map_err(io::Error::other)
    }

    /// `postgres://postgres@127.0.0.1:<port>/postgres`.
    pub fn url(&self) -> String {
        self.cluster.url()
    }

    /// The URL of database `db` on this server.
    pub fn url_of(&self, db: &str) -> String {
        self.cluster.url_of(db)
    }

    /// The TCP port.
    pub fn port(&self) -> u16 {
        self.cluster.port()
    }

    /// The data directory.
    pub fn data_dir(&self) -> PathBuf {
        self.cluster.data_dir()
    }

    /// The server's log file.
    pub fn log_path(&self) -> PathBuf {
        self.cluster.log_path()
    }

    /// The cluster, for everything else (its configuration files, its OS user).
    pub fn cluster(&self) -> &Cluster {
        &self.cluster
    }

    /// The postmaster's process id, from `postmaster.pid` (the server must be running).
    pub fn postmaster_pid(&self) -> io::Result<u32> {
        self.cluster.postmaster_pid().map_err(io::Error::other)
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
