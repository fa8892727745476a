//! Connections and migrations of the worker (the library's schema, then work_items).

use anyhow::{Context, Result};
use shardlease::tokio_postgres::Client;
use shardlease::DbConfig;

mod embedded {
    refinery::embed_migrations!("../../migrations/work_items");
}

/// The history table of the worker's own migrations.
const HISTORY: &str = "shardlease.worker_schema_history";

/// Parse the URL and connect once; errors name the target, never the password.
pub async fn connect(url: &str, application_name: &str) -> Result<(DbConfig, Client)> {
    let pg = shardlease::parse_database_url(url)?;
    let client = shardlease::connect_client(&pg, application_name).await?;
    Ok((pg, client))
}

/// Apply every migration; returns the names applied by this run.
pub async fn migrate(client: &mut Client) -> Result<Vec<String>> {
    let mut applied = shardlease::migrate(client).await?.applied;
    let mut runner = embedded::migrations::runner();
    runner.set_migration_table_name(HISTORY);
    let report = shardlease::migrate::run_locked(client, "SELECT 1", runner).await?;
    applied.extend(report.applied);
    Ok(applied)
}

/// Fail with a message that says to run `shardlease-worker migrate` when anything is missing.
pub async fn check_migrated(client: &Client) -> Result<()> {
    shardlease::check_migrated(client).await?;
    let required = shardlease::migrate::latest_version(&embedded::migrations::runner());
    shardlease::migrate::check_history(client, HISTORY, required)
        .await
        .context("the work_items table is not set up")?;
    Ok(())
}
