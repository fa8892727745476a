//! Schema migrations: the plain SQL files of `migrations/shardlease`, embedded, applied by
//! refinery, recorded in `shardlease.schema_history`, under an advisory lock.
//!
//! Safe on a live database:
//! - **Bounded lock waits.** Every migration statement runs with a short `lock_timeout`
//!   ([`MigrateOptions::lock_timeout`], 1 s by default). A DDL statement that queues for a
//!   lock behind a running transaction makes every later statement on that table queue behind
//!   *it*; the bound caps that stall for the members' ticks. A migration that times out is
//!   rolled back whole and retried with backoff ([`MigrateOptions::attempts`]); the session's
//!   own `lock_timeout` is restored afterwards.
//! - **A schema applied by hand** (`psql -f V1__membership.sql ...`) records no history. A
//!   [`BaselineProbe`] per version recognises it, and the versions found are recorded as
//!   applied (with the checksums refinery expects) instead of failing on `CREATE SEQUENCE`.

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use backon::BackoffBuilder;
use tokio_postgres::Client;

use crate::error::{describe_db_error, Doing, Error, Result};

mod embedded {
    refinery::embed_migrations!("../../migrations/shardlease");
}

/// The advisory lock (single bigint key) that serialises migrations, from every process.
pub const MIGRATION_LOCK_KEY: i64 = 0x5348_4152_444C_4541; // "SHARDLEA"

/// The history table of the library's migrations.
pub const HISTORY_TABLE: &str = "shardlease.schema_history";

/// How long a migration waits for the migration lock held by another process.
const MIGRATION_LOCK_WAIT: &str = "300s";

/// What a migration run did.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct MigrationReport {
    /// Names of the migrations applied by this run, oldest first (empty: nothing to do).
    pub applied: Vec<String>,
    /// The schema version after the run.
    pub version: i32,
    /// Versions found applied by hand (no history) and recorded as applied by this run.
    pub baselined: Vec<i32>,
    /// How many times a statement gave up waiting for a lock and was retried.
    pub lock_retries: u32,
}

/// How migrations wait for locks on a live database.
///
/// ```
/// use std::time::Duration;
/// let opts = shardlease::migrate::MigrateOptions::default()
///     .lock_timeout(Duration::from_millis(500))
///     .attempts(60);
/// assert_eq!(opts.lock_timeout, Duration::from_millis(500));
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct MigrateOptions {
    /// The `lock_timeout` of every migration statement that takes a lock on a table in use:
    /// the longest that statements queued behind it wait. Default 1 s.
    pub lock_timeout: Duration,
    /// How many times a statement that timed out waiting for a lock is tried in all (with
    /// exponential backoff from 100 ms to [`MigrateOptions::max_backoff`], and jitter).
    /// Default 30.
    pub attempts: u32,
    /// The longest pause between two attempts. Default 5 s.
    pub max_backoff: Duration,
    /// The `lock_timeout` of steps that never block reads or writes of the table
    /// (`CREATE INDEX CONCURRENTLY`, `VALIDATE CONSTRAINT`), which wait for older
    /// transactions to end. Default 10 minutes.
    pub concurrent_lock_timeout: Duration,
}

impl Default for MigrateOptions {
    fn default() -> Self {
        MigrateOptions {
            lock_timeout: Duration::from_secs(1),
            attempts: 30,
            max_backoff: Duration::from_secs(5),
            concurrent_lock_timeout: Duration::from_secs(600),
        }
    }
}

impl MigrateOptions {
    /// Set [`MigrateOptions::lock_timeout`] (at least 1 ms).
    #[must_use]
    pub fn lock_timeout(mut self, timeout: Duration) -> Self {
        self.lock_timeout = timeout;
        self
    }

    /// Set [`MigrateOptions::attempts`] (at least 1).
    #[must_use]
    pub fn attempts(mut self, attempts: u32) -> Self {
        self.attempts = attempts;
        self
    }

    /// Set [`MigrateOptions::max_backoff`].
    #[must_use]
    pub fn max_backoff(mut self, max: Duration) -> Self {
        self.max_backoff = max;
        self
    }

    /// Set [`MigrateOptions::concurrent_lock_timeout`] (at least 1 ms).
    #[must_use]
    pub fn concurrent_lock_timeout(mut self, timeout: Duration) -> Self {
        self.concurrent_lock_timeout = timeout;
        self
    }

    /// Check the values.
    ///
    /// # Errors
    ///
    /// [`Error::Config`] when a timeout is under 1 ms or `attempts` is 0.
    pub fn validate(&self) -> Result<()> {
        if self.lock_timeout < Duration::from_millis(1)
            || self.concurrent_lock_timeout < Duration::from_millis(1)
        {
            return Err(Error::Config(
                "migration lock timeouts must be at least 1ms (0 would mean: wait forever)".into(),
            ));
        }
        if self.attempts == 0 {
            return Err(Error::Config(
                "migration attempts must be at least 1".into(),
            ));
        }
        Ok(())
    }

    fn backoff(&self) -> impl Iterator<Item = Duration> {
        crate::backoff::jittered(Duration::from_millis(100), self.max_backoff)
            .with_max_times(self.attempts.saturating_sub(1) as usize)
            .build()
    }
}

/// A query that tells whether the objects of one migration version exist: how
/// [`run_locked_with`] recognises a schema applied by hand.
///
/// A probe returns one boolean. Probes are checked only when the history table is missing
/// or empty; the highest version whose probe is true, and every version below it, are then
/// recorded as applied. Versions without a probe are covered by a later version's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BaselineProbe {
    /// The migration version.
    pub version: i32,
    /// A query returning one boolean: true when that version's objects exist.
    pub sql: &'static str,
}

/// The probes of the library's own migrations.
pub const LIBRARY_PROBES: &[BaselineProbe] = &[
    BaselineProbe {
        version: 1,
        sql: "SELECT to_regclass('shardlease.leases') IS NOT NULL \
              AND to_regprocedure('shardlease.join(text,text,interval,jsonb,integer)') IS NOT NULL",
    },
    BaselineProbe {
        version: 2,
        sql: "SELECT to_regprocedure('shardlease.dead_leases(text)') IS NOT NULL",
    },
    BaselineProbe {
        version: 3,
        sql: "SELECT to_regclass('shardlease.slot_reservations') IS NOT NULL",
    },
    BaselineProbe {
        version: 4,
        sql: "SELECT to_regprocedure('shardlease.evict(bigint)') IS NOT NULL",
    },
    BaselineProbe {
        version: 5,
        sql: "SELECT to_regprocedure('shardlease.key_hash_status(regclass,name)') IS NOT NULL",
    },
    BaselineProbe {
        version: 6,
        sql: "SELECT to_regprocedure('shardlease.await_departure(text,bigint,integer,integer)') IS NOT NULL",
    },
    BaselineProbe {
        version: 7,
        sql: "SELECT to_regprocedure('shardlease.announce_burst()') IS NOT NULL",
    },
    BaselineProbe {
        version: 8,
        sql: "SELECT to_regprocedure('shardlease.needs_reap(text,bigint)') IS NOT NULL",
    },
    BaselineProbe {
        version: 9,
        sql: "SELECT to_regclass('shardlease.own_lease') IS NOT NULL",
    },
    BaselineProbe {
        version: 10,
        sql: "SELECT to_regprocedure('shardlease.needs_reap(text,bigint,boolean)') IS NOT NULL",
    },
];

/// Apply the library's migrations. Idempotent, and safe when many processes run it at once:
/// it holds a session advisory lock for the duration, and each migration commits whole or not at all.
///
/// ```no_run
/// # async fn f(mut client: tokio_postgres::Client) -> shardlease::Result<()> {
/// let report = shardlease::migrate(&mut client).await?;
/// println!("schema at version {}, applied {:?}", report.version, report.applied);
/// # Ok(()) }
/// ```
pub async fn migrate(client: &mut Client) -> Result<MigrationReport> {
    migrate_with(client, &MigrateOptions::default()).await
}

/// [`migrate`] with explicit lock-wait options.
pub async fn migrate_with(
    client: &mut Client,
    options: &MigrateOptions,
) -> Result<MigrationReport> {
    run_locked_with(
        client,
        "CREATE SCHEMA IF NOT EXISTS shardlease",
        embedded::migrations::runner(),
        HISTORY_TABLE,
        LIBRARY_PROBES,
        options,
    )
    .await
}

/// Run any refinery `runner` under the shardlease migration lock, after `prelude` (SQL run
/// first, under the lock, e.g. to create the schema holding the history table), with the
/// default [`MigrateOptions`] and no baseline probes. The runner's history table must already
/// be set.
pub async fn run_locked(
    client: &mut Client,
    prelude: &str,
    runner: refinery::Runner,
) -> Result<MigrationReport> {
    run_locked_inner(client, prelude, runner, None, &MigrateOptions::default()).await
}

/// Run a refinery `runner` recorded in `history_table` under the shardlease migration lock,
/// after `prelude`: every migration statement with `options.lock_timeout` and retries, and a
/// schema applied by hand recognised by `probes` (see [`BaselineProbe`]). Embedders use it to
/// apply their own migrations as safely as the library's.
pub async fn run_locked_with(
    client: &mut Client,
    prelude: &str,
    mut runner: refinery::Runner,
    history_table: &str,
    probes: &[BaselineProbe],
    options: &MigrateOptions,
) -> Result<MigrationReport> {
    runner.set_migration_table_name(history_table);
    run_locked_inner(
        client,
        prelude,
        runner,
        Some((history_table, probes)),
        options,
    )
    .await
}

async fn run_locked_inner(
    client: &mut Client,
    prelude: &str,
    runner: refinery::Runner,
    baseline: Option<(&str, &[BaselineProbe])>,
    options: &MigrateOptions,
) -> Result<MigrationReport> {
    options.validate()?;
    let previous: String = client
        .query_one("SELECT current_setting('lock_timeout')", &[])
        .await
        .doing(|| "reading the session's lock_timeout".into())?
        .get(0);
    // Bounded wait: a migration still running elsewhere after 5 minutes is reported, not waited on forever.
    set_lock_timeout(client, MIGRATION_LOCK_WAIT).await?;
    let locked = client
        .execute("SELECT pg_advisory_lock($1)", &[&MIGRATION_LOCK_KEY])
        .await;
    if let Err(e) = locked {
        let _ = set_lock_timeout(client, &previous).await;
        return Err(match e.code().map(|c| c.code()) {
            Some("55P03") => Error::Migration(
                "another process has held the migration lock for 5 minutes; is a migration stuck?"
                    .into(),
            ),
            _ => Error::Db {
                doing: "taking the migration lock".into(),
                source: e,
            },
        });
    }
    let result = async {
        set_lock_timeout(client, &millis(options.lock_timeout)).await?;
        let mut retries = 0;
        let prelude = prelude.to_owned();
        with_lock_retries(
            client,
            options,
            "the migration prelude",
            &mut retries,
            |c| {
                let prelude = prelude.clone();
                Box::pin(async move { c.batch_execute(&prelude).await })
            },
        )
        .await?;
        let baselined = match baseline {
            Some((table, probes)) => apply_baseline(client, table, &runner, probes).await?,
            None => Vec::new(),
        };
        let applied = run_with_retries(client, &runner, options, &mut retries).await?;
        let version = runner
            .get_last_applied_migration_async(client)
            .await
            .map_err(|e| Error::Migration(describe_refinery(&e)))?
            .map(|m| m.version())
            .unwrap_or(0);
        Ok(MigrationReport {
            applied,
            version,
            baselined,
            lock_retries: retries,
        })
    }
    .await;
    // Always release the lock and restore the caller's lock_timeout; a closed connection
    // releases the lock by itself.
    let _ = client
        .execute("SELECT pg_advisory_unlock($1)", &[&MIGRATION_LOCK_KEY])
        .await;
    let _ = set_lock_timeout(client, &previous).await;
    if let Ok(report) = &result {
        for version in &report.baselined {
            tracing::info!(version, "recorded a migration applied by hand");
        }
        for name in &report.applied {
            tracing::info!(migration = %name, "applied migration");
        }
    }
    result
}

/// `lock_timeout` as PostgreSQL reads it.
pub(crate) fn millis(d: Duration) -> String {
    format!("{}ms", d.as_millis().max(1))
}

/// Set the session's `lock_timeout`.
pub(crate) async fn set_lock_timeout(client: &Client, value: &str) -> Result<()> {
    client
        .execute("SELECT set_config('lock_timeout', $1, false)", &[&value])
        .await
        .doing(|| format!("setting lock_timeout to {value}"))?;
    Ok(())
}

/// True for the errors of a bounded lock wait: `lock_not_available` (a `lock_timeout`) and
/// `deadlock_detected` (the server chose us as the victim).
pub(crate) fn is_lock_wait(e: &tokio_postgres::Error) -> bool {
    matches!(e.code().map(|c| c.code()), Some("55P03" | "40P01"))
}

/// A statement (or transaction) to retry on a lock timeout.
pub(crate) type Op<'c, T> =
    Pin<Box<dyn Future<Output = std::result::Result<T, tokio_postgres::Error>> + Send + 'c>>;

/// Run `op` until it does not fail on a lock wait, at most `options.attempts` times.
pub(crate) async fn with_lock_retries<T>(
    client: &mut Client,
    options: &MigrateOptions,
    what: &str,
    retries: &mut u32,
    mut op: impl for<'c> FnMut(&'c mut Client) -> Op<'c, T>,
) -> Result<T> {
    let mut delays = options.backoff();
    loop {
        match op(client).await {
            Ok(v) => return Ok(v),
            Err(e) if is_lock_wait(&e) => match delays.next() {
                Some(delay) => {
                    *retries += 1;
                    tracing::warn!(step = what, error = %describe_db_error(&e), retry_in = ?delay, "a lock was not granted in time; retrying");
                    tokio::time::sleep(delay).await;
                }
                None => return Err(gave_up(what, options, &describe_db_error(&e))),
            },
            Err(e) => {
                return Err(Error::Db {
                    doing: what.to_owned(),
                    source: e,
                })
            }
        }
    }
}

fn gave_up(what: &str, options: &MigrateOptions, error: &str) -> Error {
    Error::Migration(format!(
        "{what}: a lock was not granted within {} in {} attempts ({error}); a long transaction \
         holds the table: let it finish (see pg_stat_activity) and run the migration again, \
         or raise MigrateOptions::lock_timeout / attempts",
        humanize(options.lock_timeout),
        options.attempts
    ))
}

fn humanize(d: Duration) -> String {
    format!("{} ms", d.as_millis())
}

/// Run the refinery runner, retrying a migration that failed on a lock wait (refinery commits
/// each migration on its own, so a retry resumes with the failed one). Returns the names
/// applied.
async fn run_with_retries(
    client: &mut Client,
    runner: &refinery::Runner,
    options: &MigrateOptions,
    retries: &mut u32,
) -> Result<Vec<String>> {
    let mut delays = options.backoff();
    let mut applied: Vec<String> = Vec::new();
    loop {
        match runner.run_async(client).await {
            Ok(report) => {
                applied.extend(report.applied_migrations().iter().map(|m| m.to_string()));
                return Ok(applied);
            }
            Err(e) => {
                if let Some(report) = e.report() {
                    applied.extend(report.applied_migrations().iter().map(|m| m.to_string()));
                }
                let lock_wait = driver_error(&e).is_some_and(is_lock_wait);
                match (lock_wait, delays.next()) {
                    (true, Some(delay)) => {
                        *retries += 1;
                        tracing::warn!(error = %describe_refinery(&e), retry_in = ?delay, "a migration waited too long for a lock and was rolled back; retrying");
                        tokio::time::sleep(delay).await;
                    }
                    (true, None) => {
                        return Err(gave_up("a migration", options, &describe_refinery(&e)))
                    }
                    (false, _) => return Err(Error::Migration(describe_refinery(&e))),
                }
            }
        }
    }
}

/// The driver error inside a refinery error, if any.
fn driver_error(e: &refinery::Error) -> Option<&tokio_postgres::Error> {
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        if let Some(pg) = s.downcast_ref::<tokio_postgres::Error>() {
            return Some(pg);
        }
        source = s.source();
    }
    None
}

/// A refinery error with the server's SQLSTATE, message, detail and hint.
fn describe_refinery(e: &refinery::Error) -> String {
    match driver_error(e) {
        Some(pg) => format!("{}: {}", e.kind_name(), describe_db_error(pg)),
        None => e.to_string(),
    }
}

/// A short name of what refinery was doing.
trait KindName {
    fn kind_name(&self) -> String;
}

impl KindName for refinery::Error {
    fn kind_name(&self) -> String {
        match self.kind() {
            refinery::error::Kind::Connection(what, _) => what.clone(),
            other => other.to_string(),
        }
    }
}

/// When `history_table` is missing or empty but `probes` find the schema, record the versions
/// found (and all below them) as applied. Returns the versions recorded.
async fn apply_baseline(
    client: &mut Client,
    history_table: &str,
    runner: &refinery::Runner,
    probes: &[BaselineProbe],
) -> Result<Vec<i32>> {
    let exists: bool = client
        .query_one("SELECT to_regclass($1) IS NOT NULL", &[&history_table])
        .await
        .doing(|| format!("looking for {history_table}"))?
        .get(0);
    if exists {
        let rows: i64 = client
            .query_one(&format!("SELECT count(*) FROM {history_table}"), &[])
            .await
            .doing(|| format!("reading {history_table}"))?
            .get(0);
        if rows > 0 {
            return Ok(Vec::new());
        }
    }
    let mut found: Option<i32> = None;
    for probe in probes {
        let present: Option<bool> = client
            .query_one(probe.sql, &[])
            .await
            .doing(|| format!("probing for schema version {}", probe.version))?
            .get(0);
        if present == Some(true) {
            found = Some(found.map_or(probe.version, |v| v.max(probe.version)));
        }
    }
    let Some(baseline) = found else {
        return Ok(Vec::new());
    };
    let mut migrations: Vec<&refinery::Migration> = runner
        .get_migrations()
        .iter()
        .filter(|m| m.version() <= baseline)
        .collect();
    migrations.sort_by_key(|m| m.version());
    let tx = client
        .transaction()
        .await
        .doing(|| format!("recording a schema applied by hand in {history_table}"))?;
    // The table refinery itself creates.
    tx.batch_execute(&format!(
        "CREATE TABLE IF NOT EXISTS {history_table} (version int4 PRIMARY KEY, name varchar(255), \
         applied_on varchar(255), checksum varchar(255))"
    ))
    .await
    .doing(|| format!("creating {history_table}"))?;
    for m in &migrations {
        tx.execute(
            &format!(
                "INSERT INTO {history_table} (version, name, applied_on, checksum) \
                 VALUES ($1, $2, to_char(now() AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"'), $3)"
            ),
            &[&m.version(), &m.name(), &m.checksum().to_string()],
        )
        .await
        .doing(|| format!("recording version {} in {history_table}", m.version()))?;
    }
    tx.commit()
        .await
        .doing(|| format!("recording a schema applied by hand in {history_table}"))?;
    Ok(migrations.iter().map(|m| m.version()).collect())
}

/// The newest schema version this build of the library needs.
pub fn required_version() -> i32 {
    latest_version(&embedded::migrations::runner())
}

/// The newest version among `runner`'s migrations (0 when it has none): what
/// [`check_history`] should require for them.
pub fn latest_version(runner: &refinery::Runner) -> i32 {
    runner
        .get_migrations()
        .iter()
        .map(|m| m.version())
        .max()
        .unwrap_or(0)
}

/// Check that the database carries the schema version this build needs; the error tells
/// the user to migrate.
pub async fn check_migrated(client: &Client) -> Result<()> {
    check_history(client, HISTORY_TABLE, required_version()).await
}

/// Check that `history_table` (a refinery history table) records at least `required`.
///
/// Its statements are unnamed (no prepared statement), so that the check also works, and
/// lets a later check explain the problem, on a connection through a transaction pooler.
pub async fn check_history(client: &Client, history_table: &str, required: i32) -> Result<()> {
    let exists: bool = client
        .query_typed_one(
            "SELECT to_regclass($1) IS NOT NULL",
            &[(&history_table, tokio_postgres::types::Type::TEXT)],
        )
        .await
        .doing(|| format!("reading {history_table}"))?
        .get(0);
    if !exists {
        return Err(Error::NotMigrated {
            detail: format!("{history_table} does not exist"),
        });
    }
    let version: Option<i32> = client
        .query_typed_one(&format!("SELECT max(version) FROM {history_table}"), &[])
        .await
        .doing(|| format!("reading {history_table}"))?
        .get(0);
    let version = version.unwrap_or(0);
    if version < required {
        return Err(Error::NotMigrated {
            detail: format!("{history_table} is at version {version}, this build needs {required}"),
        });
    }
    Ok(())
}
