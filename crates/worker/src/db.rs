//! Connections, migrations and grants of the worker (the library's schema, then its own:
//! `public.work_items` and the `shardlease_worker` schema).

use anyhow::{bail, Context, Result};
use shardlease::live_table::KeyHashColumn;
use shardlease::migrate::{BaselineProbe, MigrateOptions};
use shardlease::roles::{quote_ident, Grants, RoleKind};
use shardlease::tokio_postgres::Client;
use shardlease::DbConfig;

mod embedded {
    refinery::embed_migrations!("../../migrations/work_items");
}

/// The worker's own schema (its view and migration history; the items stay in `public`).
pub const SCHEMA: &str = "shardlease_worker";

/// The history table of the worker's own migrations.
const HISTORY: &str = "shardlease_worker.schema_history";

/// Run under the migration lock before the worker's migrations: the schema of the history
/// table, and the history table itself moved there from where builds before the worker's
/// schema V2 kept it (`shardlease.worker_schema_history`), so that refinery finds it.
const PRELUDE: &str = "CREATE SCHEMA IF NOT EXISTS shardlease_worker;
DO $$
BEGIN
  IF to_regclass('shardlease.worker_schema_history') IS NOT NULL
     AND to_regclass('shardlease_worker.schema_history') IS NULL THEN
    ALTER TABLE shardlease.worker_schema_history SET SCHEMA shardlease_worker;
    ALTER TABLE shardlease_worker.worker_schema_history RENAME TO schema_history;
  END IF;
END
$$;";

/// How `migrate` recognises work_items migrations applied by hand with psql.
const PROBES: &[BaselineProbe] = &[
    BaselineProbe {
        version: 1,
        sql: "SELECT EXISTS (SELECT 1 FROM pg_attribute WHERE attrelid = to_regclass('public.work_items') \
              AND attname = 'shard' AND attgenerated = 's')",
    },
    BaselineProbe {
        version: 2,
        sql: "SELECT to_regclass('shardlease_worker.worker_items') IS NOT NULL",
    },
    BaselineProbe {
        version: 3,
        sql: "SELECT EXISTS (SELECT 1 FROM pg_trigger WHERE tgrelid = to_regclass('public.work_items') \
              AND tgname = 'key_hash_set')",
    },
    BaselineProbe {
        version: 4,
        sql: "SELECT EXISTS (SELECT 1 FROM pg_trigger WHERE tgrelid = to_regclass('public.work_items') \
              AND tgname = 'shard_set')",
    },
    BaselineProbe {
        version: 5,
        sql: "SELECT to_regprocedure('shardlease_worker.tick(regclass,text,bigint,bigint,integer,text,double precision,integer[],integer[])') IS NOT NULL",
    },
];

/// The items' stored hash, which the workers own by ranges.
pub fn key_hash() -> KeyHashColumn {
    KeyHashColumn::new("public.work_items", "id")
}

/// Parse the URL and connect once; errors name the target, never the password.
pub async fn connect(url: &str, application_name: &str) -> Result<(DbConfig, Client)> {
    let pg = shardlease::parse_database_url(url)?;
    let client = shardlease::connect_client(&pg, application_name).await?;
    Ok((pg, client))
}

/// Apply every migration, then put `work_items` on its stored hash (backfill, index,
/// validation: online, see `shardlease::live_table`); returns what this run did.
pub async fn migrate(client: &mut Client) -> Result<Vec<String>> {
    let options = MigrateOptions::default();
    let library = shardlease::migrate::migrate_with(client, &options).await?;
    let mut applied: Vec<String> = library
        .baselined
        .iter()
        .map(|v| format!("shardlease V{v} (found applied by hand)"))
        .collect();
    applied.extend(library.applied);
    let report = shardlease::migrate::run_locked_with(
        client,
        PRELUDE,
        embedded::migrations::runner(),
        HISTORY,
        PROBES,
        &options,
    )
    .await?;
    applied.extend(
        report
            .baselined
            .iter()
            .map(|v| format!("work_items V{v} (found applied by hand)")),
    );
    applied.extend(report.applied);
    let prepared = key_hash()
        .prepare(client, &options)
        .await
        .context("putting public.work_items on its stored hash")?;
    if !prepared.steps.is_empty() {
        applied.push(format!(
            "work_items.key_hash: {} ({} rows backfilled)",
            prepared.steps.join(", "),
            prepared.backfilled_rows
        ));
    }
    Ok(applied)
}

/// Fail with a message that says to run `shardlease-worker migrate` when anything is missing.
pub async fn check_migrated(client: &Client) -> Result<()> {
    shardlease::check_migrated(client).await?;
    let required = shardlease::migrate::latest_version(&embedded::migrations::runner());
    shardlease::migrate::check_history(client, HISTORY, required)
        .await
        .context("the work_items table is not set up")?;
    let status = key_hash().status(client).await?;
    if !status.ready {
        bail!(
            "public.work_items.key_hash is not ready ({status:?}): run `shardlease-worker migrate` \
             to finish its backfill and index (online: the table stays in use)"
        );
    }
    Ok(())
}

/// What the worker's roles get beyond the library's (`shardlease::roles`): its schema, its
/// view and history, and `public.work_items`, which members tick (UPDATE of the three columns a
/// tick writes) and inspectors read.
fn worker_privileges(kind: RoleKind) -> Vec<String> {
    let mut p = vec![
        format!("USAGE ON SCHEMA {SCHEMA}"),
        format!("SELECT ON {SCHEMA}.worker_items"),
        format!("SELECT ON {HISTORY}"),
        "USAGE ON SCHEMA public".to_owned(),
        "SELECT ON public.work_items".to_owned(),
    ];
    if kind == RoleKind::Member {
        p.push("UPDATE (value, currentworker, updated_at) ON public.work_items".to_owned());
    }
    p
}

/// Grant the member and inspector roles exactly what they need (the library's grants plus
/// the worker's), in one transaction, under the migration lock (concurrent GRANTs of one
/// object fail); idempotent. Run as the owner of the schemas, after [`migrate`].
pub async fn grant(client: &mut Client, roles: &[(&str, RoleKind)]) -> Result<Vec<Grants>> {
    if let [(a, _), (b, _)] = roles {
        anyhow::ensure!(
            a != b,
            "the member and the inspector role must differ (both are {a:?}): an inspector may not do what a member does"
        );
    }
    check_migrated(client).await?;
    let tx = client.transaction().await?;
    tx.execute(
        "SELECT pg_advisory_xact_lock($1)",
        &[&shardlease::migrate::MIGRATION_LOCK_KEY],
    )
    .await
    .context("taking the migration lock")?;
    let mut all = Vec::new();
    for &(role, kind) in roles {
        let mut grants = shardlease::roles::grant(&tx, role, kind)
            .await
            .with_context(|| format!("granting the {kind} role {role}"))?;
        let r = quote_ident(role);
        for sql in [
            format!("REVOKE ALL ON ALL TABLES IN SCHEMA {SCHEMA} FROM {r}"),
            format!("REVOKE ALL ON SCHEMA {SCHEMA} FROM {r}"),
            format!("REVOKE ALL ON public.work_items FROM {r}"),
        ] {
            tx.batch_execute(&sql)
                .await
                .with_context(|| format!("running {sql}"))?;
        }
        for p in worker_privileges(kind) {
            let sql = format!("GRANT {p} TO {r}");
            tx.batch_execute(&sql)
                .await
                .with_context(|| format!("running {sql}"))?;
            grants.privileges.push(p);
        }
        all.push(grants);
    }
    tx.commit().await.context("committing the grants")?;
    Ok(all)
}
