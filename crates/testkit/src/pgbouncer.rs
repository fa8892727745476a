//! A real PgBouncer in front of the test server: the work path behind a transaction pooler,
//! and the session connection that must refuse one.
//!
//! ```no_run
//! # async fn f() {
//! use shardlease_testkit::{PgBouncer, PoolMode, TestDb};
//! let db = TestDb::migrated().await;
//! // Prints "skipped: ..." and returns None when there is no pgbouncer binary.
//! let Some(bouncer) = PgBouncer::start(PoolMode::Transaction, 4).await else { return };
//! let pooled = bouncer.db_config(&db.name); // every database of the server is reachable
//! # }
//! ```

use std::fmt;
use std::fs::{self, File};
use std::net::{Ipv4Addr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use shardlease::tokio_postgres::config::Host;
use shardlease::DbConfig;

use shardlease::tokio_postgres::Config;

use crate::{base_config, url_of};

/// Where the binary is looked for when it is not on `PATH` (Debian's package puts it there,
/// and `/usr/sbin` is not on every user's `PATH`).
const FALLBACK: &str = "/usr/sbin/pgbouncer";

/// How long PgBouncer may take to accept connections.
const STARTUP: Duration = Duration::from_secs(10);

/// PgBouncer's `pool_mode`: when a client's server connection goes back to the pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PoolMode {
    /// When the client disconnects: a session pooler, safe for session state.
    Session,
    /// At the end of every transaction: session state (advisory locks, LISTEN, SET,
    /// named prepared statements) does not survive between transactions.
    Transaction,
    /// After every statement; multi-statement transactions are refused.
    Statement,
}

impl fmt::Display for PoolMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PoolMode::Session => "session",
            PoolMode::Transaction => "transaction",
            PoolMode::Statement => "statement",
        })
    }
}

/// A PgBouncer process in front of the test server (`DATABASE_URL`), listening on a free
/// 127.0.0.1 port, with one `* = host=.. port=..` database entry so that every per-test
/// database is reachable through it. Clients authenticate with `auth_type = trust` as the
/// user of `DATABASE_URL`; PgBouncer logs in to PostgreSQL as that user (with its password,
/// if the URL has one). Clients connect without TLS.
///
/// Killed (SIGKILL) when dropped; its files live in a temporary directory removed then.
/// PgBouncer refuses to run as root: as root, it is started with `-u postgres`.
pub struct PgBouncer {
    child: Child,
    port: u16,
    mode: PoolMode,
    dir: PathBuf,
}

static COUNTER: AtomicU32 = AtomicU32::new(0);

impl PgBouncer {
    /// The `pgbouncer` binary: on `PATH`, else `/usr/sbin/pgbouncer`.
    pub fn binary() -> Option<PathBuf> {
        let on_path = std::env::var_os("PATH").and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|dir| dir.join("pgbouncer"))
                .find(|p| is_executable(p))
        });
        on_path.or_else(|| Some(PathBuf::from(FALLBACK)).filter(|p| is_executable(p)))
    }

    /// Start PgBouncer in `mode` with `default_pool_size = pool_size` (server connections
    /// per database and user) and `max_client_conn = 2000`, and wait until it accepts
    /// connections (at most 10 s).
    ///
    /// Returns `None`, after printing `skipped: ...` with the reason, when there is no
    /// `pgbouncer` binary: the caller's test returns early. Panics, with PgBouncer's log,
    /// when the binary is there but does not start.
    pub async fn start(mode: PoolMode, pool_size: u32) -> Option<PgBouncer> {
        let Some(binary) = PgBouncer::binary() else {
            eprintln!(
                "skipped: no pgbouncer binary on PATH or at {FALLBACK} \
                 (install it: apt-get install pgbouncer)"
            );
            return None;
        };
        // A free port can be taken by someone else before PgBouncer binds it: try again.
        let mut failures = Vec::new();
        for _ in 0..5 {
            match PgBouncer::spawn(&binary, mode, pool_size).await {
                Ok(bouncer) => return Some(bouncer),
                Err(StartError::PortTaken(log)) => failures.push(log),
                Err(StartError::Failed(why)) => panic!("{why}"),
            }
        }
        panic!(
            "pgbouncer could not bind a free port in 5 tries; its last log:\n{}",
            failures.last().map(String::as_str).unwrap_or("")
        );
    }

    /// The port it listens on (127.0.0.1).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Its pool mode.
    pub fn mode(&self) -> PoolMode {
        self.mode
    }

    /// The URL of database `db_name` through this PgBouncer (see [`PgBouncer::db_config`]).
    pub fn url(&self, db_name: &str) -> String {
        url_of(&self.db_config(db_name))
    }

    /// Database `db_name` through this PgBouncer: the user and password of `DATABASE_URL`,
    /// 127.0.0.1 and PgBouncer's port, without TLS.
    pub fn db_config(&self, db_name: &str) -> DbConfig {
        let server = base_config();
        let mut pg = Config::new();
        if let Some(user) = server.get_user() {
            pg.user(user);
        }
        if let Some(password) = server.get_password() {
            pg.password(password);
        }
        if let Some(timeout) = server.get_connect_timeout() {
            pg.connect_timeout(*timeout);
        }
        pg.host("127.0.0.1")
            .port(self.port)
            .dbname(db_name)
            .keepalives(server.get_keepalives())
            .keepalives_idle(server.get_keepalives_idle());
        DbConfig::new(pg)
    }

    /// Its log so far (for failure messages).
    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.join("pgbouncer.log")).unwrap_or_default()
    }

    async fn spawn(binary: &Path, mode: PoolMode, pool_size: u32) -> Result<PgBouncer, StartError> {
        let failed = |what: String| StartError::Failed(what);
        let port = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .and_then(|l| l.local_addr())
            .map_err(|e| failed(format!("cannot find a free port for pgbouncer: {e}")))?
            .port();
        let dir = std::env::temp_dir().join(format!(
            "shardlease-pgbouncer-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        fs::create_dir_all(&dir)
            .map_err(|e| failed(format!("cannot create {}: {e}", dir.display())))?;
        let child = match PgBouncer::launch(binary, &dir, port, mode, pool_size) {
            Ok(child) => child,
            Err(e) => {
                let _ = fs::remove_dir_all(&dir);
                return Err(e);
            }
        };
        // From here on, Drop kills the process and removes the directory.
        let mut bouncer = PgBouncer {
            child,
            port,
            mode,
            dir,
        };
        bouncer.wait_accepting().await?;
        Ok(bouncer)
    }

    /// Write the configuration into `dir` and start the process.
    fn launch(
        binary: &Path,
        dir: &Path,
        port: u16,
        mode: PoolMode,
        pool_size: u32,
    ) -> Result<Child, StartError> {
        let failed = |what: String| StartError::Failed(what);
        let server = base_config();
        let user = server.get_user().unwrap_or("postgres").to_owned();
        let password = server
            .get_password()
            .map(|p| String::from_utf8_lossy(p).into_owned())
            .unwrap_or_default();
        let host = match server.get_hosts().first() {
            Some(Host::Tcp(h)) => h.clone(),
            Some(Host::Unix(p)) => p.display().to_string(),
            None => "127.0.0.1".into(),
        };
        let server_port = server.get_ports().first().copied().unwrap_or(5432);
        let ini = dir.join("pgbouncer.ini");
        let userlist = dir.join("userlist.txt");
        let log = dir.join("pgbouncer.log");
        let quote = |s: &str| format!("\"{}\"", s.replace('"', "\"\""));
        let write = |path: &Path, text: String| {
            fs::write(path, text)
                .map_err(|e| failed(format!("cannot write {}: {e}", path.display())))
        };
        write(
            &userlist,
            format!("{} {}\n", quote(&user), quote(&password)),
        )?;
        write(
            &ini,
            format!(
                "[databases]\n\
                 * = host={host} port={server_port}\n\
                 \n\
                 [pgbouncer]\n\
                 listen_addr = 127.0.0.1\n\
                 listen_port = {port}\n\
                 unix_socket_dir =\n\
                 auth_type = trust\n\
                 auth_file = {userlist}\n\
                 admin_users = {user}\n\
                 pool_mode = {mode}\n\
                 max_client_conn = 2000\n\
                 default_pool_size = {pool_size}\n\
                 reserve_pool_size = 0\n\
                 query_wait_timeout = 30\n\
                 ; tokio-postgres sends only user, database, client_encoding and\n\
                 ; application_name, which PgBouncer tracks itself; other drivers' usual extras:\n\
                 ignore_startup_parameters = extra_float_digits,options\n",
                userlist = userlist.display(),
            ),
        )?;
        let log_file = File::create(&log)
            .map_err(|e| failed(format!("cannot create {}: {e}", log.display())))?;
        let log_err = log_file
            .try_clone()
            .map_err(|e| failed(format!("cannot open {}: {e}", log.display())))?;
        let mut cmd = Command::new(binary);
        if is_root() {
            // "PgBouncer should not run as root": drop to the server's own account.
            cmd.args(["-u", "postgres"]);
        }
        cmd.arg(&ini)
            .stdin(Stdio::null())
            .stdout(log_file)
            .stderr(log_err)
            .spawn()
            .map_err(|e| failed(format!("cannot start {}: {e}", binary.display())))
    }

    /// Wait until the port accepts a TCP connection, at most [`STARTUP`].
    async fn wait_accepting(&mut self) -> Result<(), StartError> {
        let start = Instant::now();
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                let log = self.log();
                return Err(if log.contains("Address already in use") {
                    StartError::PortTaken(log)
                } else {
                    StartError::Failed(format!(
                        "pgbouncer exited ({status}) before accepting connections on 127.0.0.1:{}; its log:\n{log}",
                        self.port
                    ))
                });
            }
            if tokio::net::TcpStream::connect((Ipv4Addr::LOCALHOST, self.port))
                .await
                .is_ok()
            {
                return Ok(());
            }
            if start.elapsed() > STARTUP {
                return Err(StartError::Failed(format!(
                    "timed out after {STARTUP:?} waiting for pgbouncer to accept connections on 127.0.0.1:{}; its log:\n{}",
                    self.port,
                    self.log()
                )));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

impl fmt::Debug for PgBouncer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PgBouncer")
            .field("port", &self.port)
            .field("mode", &self.mode)
            .field("pid", &self.child.id())
            .finish()
    }
}

impl Drop for PgBouncer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = fs::remove_dir_all(&self.dir);
    }
}

enum StartError {
    /// Someone else bound the port first (PgBouncer's log says so).
    PortTaken(String),
    /// Anything else: the message says what, with PgBouncer's log.
    Failed(String),
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// True when this process runs as root (the owner of `/proc/self` is the effective user).
fn is_root() -> bool {
    use std::os::unix::fs::MetadataExt;
    fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}
