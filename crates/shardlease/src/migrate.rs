//! Schema migrations: the plain SQL files of `migrations/shardlease`, embedded, applied by
//! refinery, recorded in `shardlease.schema_history`, under an advisory lock.

use tokio_postgres::Client;

use crate::error::{Doing, Error, Result};

mod embedded {
    refinery::embed_migrations!("../../migrations/shardlease");
}

/// The advisory lock (single bigint key) that serialises migrations, from every process.
pub const MIGRATION_LOCK_KEY: i64 = 0x5348_4152_444C_4541; // "SHARDLEA"

/// The history table of the library's migrations.
pub const HISTORY_TABLE: &str = "shardlease.schema_history";

/// What a migration run did.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct MigrationReport {
    /// Names of the migrations applied by this run, oldest first (empty: nothing to do).
    pub applied: Vec<String>,
    /// The schema version after the run.
    pub version: i32,
}

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
    let mut runner = embedded::migrations::runner();
    runner.set_migration_table_name(HISTORY_TABLE);
    run_locked(client, "CREATE SCHEMA IF NOT EXISTS shardlease", runner).await
}

/// Run any refinery `runner` under the shardlease migration lock, after `prelude` (SQL run
/// first, under the lock, e.g. to create the schema holding the history table).
/// Embedders use it to apply their own migrations as safely as the library's.
pub async fn run_locked(
    client: &mut Client,
    prelude: &str,
    runner: refinery::Runner,
) -> Result<MigrationReport> {
    // Bounded wait: a migration still running elsewhere after 5 minutes is reported, not waited on forever.
    client
        .batch_execute("SET lock_timeout = '300s'")
        .await
        .doing(|| "setting up the migration connection".into())?;
    let locked = client
        .execute("SELECT pg_advisory_lock($1)", &[&MIGRATION_LOCK_KEY])
        .await;
    client
        .batch_execute("RESET lock_timeout")
        .await
        .doing(|| "setting up the migration connection".into())?;
    if let Err(e) = locked {
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
        client
            .batch_execute(prelude)
            .await
            .doing(|| "running the migration prelude".into())?;
        let report = runner
            .run_async(client)
            .await
            .map_err(|e| Error::Migration(e.to_string()))?;
        let applied: Vec<String> = report
            .applied_migrations()
            .iter()
            .map(|m| m.to_string())
            .collect();
        let version = runner
            .get_last_applied_migration_async(client)
            .await
            .map_err(|e| Error::Migration(e.to_string()))?
            .map(|m| m.version())
            .unwrap_or(0);
        Ok(MigrationReport { applied, version })
    }
    .await;
    // Always release the lock; a closed connection releases it by itself.
    let _ = client
        .execute("SELECT pg_advisory_unlock($1)", &[&MIGRATION_LOCK_KEY])
        .await;
    if let Ok(report) = &result {
        for name in &report.applied {
            tracing::info!(migration = %name, "applied migration");
        }
    }
    result
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
