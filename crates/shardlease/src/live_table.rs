//! Put a live table on a stored 32-bit hash without rewriting it or stopping its writers.
//!
//! Members own ranges of a stored hash (see [`crate::shard_table`]). A table gets that column
//! in four steps, each of which leaves the table fully usable, and each idempotent:
//!
//! 1. **install** (`shardlease.add_key_hash`): a nullable `integer` column (a catalog change,
//!    no rewrite), a trigger that fills it on insert and on update of the key, and the
//!    constraint `<column>_is_set CHECK (<column> IS NOT NULL) NOT VALID`. Brief
//!    `ACCESS EXCLUSIVE` locks, under a short `lock_timeout` with retries, so that writers
//!    queue behind it for at most [`MigrateOptions::lock_timeout`].
//! 2. **backfill** (`shardlease.backfill_key_hash`): the rows from before the trigger, a slice
//!    of pages per transaction, skipping rows that a transaction holds locked.
//! 3. **index**: `CREATE INDEX CONCURRENTLY`, which never blocks reads or writes; a leftover
//!    invalid index from an interrupted run is dropped concurrently first.
//! 4. **validate**: the last rows (`shardlease.backfill_key_hash_rest`), then
//!    `ALTER TABLE ... VALIDATE CONSTRAINT` (a `SHARE UPDATE EXCLUSIVE` lock: reads and writes
//!    go on), which proves that no row lacks its hash.
//! 5. **settle** (`shardlease.add_key_hash` again): until step 4 the trigger runs on every
//!    insert and update, so that no new row version lacks its hash; now it narrows to inserts
//!    and updates of the key (or the hash), and the members' updates run without it.
//!
//! The table is **ready** ([`KeyHashStatus::ready`]) once all five are done: members may then
//! own hash ranges of it. Until then, keep the old layout (a `shard` column and
//! [`Assignment::shards_of`](crate::Assignment::shards_of)): nothing here changes or drops it.
//!
//! ```no_run
//! # async fn f(mut client: tokio_postgres::Client) -> shardlease::Result<()> {
//! use shardlease::live_table::KeyHashColumn;
//! use shardlease::migrate::MigrateOptions;
//!
//! let column = KeyHashColumn::new("public.orders", "id"); // adds orders.key_hash
//! let report = column.prepare(&mut client, &MigrateOptions::default()).await?;
//! assert!(report.status.ready);
//! # Ok(()) }
//! ```
//!
//! The same in psql, for whoever migrates by hand:
//!
//! ```sql
//! SET lock_timeout = '1s';
//! SELECT shardlease.add_key_hash('public.orders', 'id', 'key_hash');   -- retry on a lock timeout
//! SELECT * FROM shardlease.backfill_key_hash('public.orders', 'id', 'key_hash', 0, 1000);
//! -- ... again from next_page while it is below table_pages, then:
//! CREATE INDEX CONCURRENTLY IF NOT EXISTS orders_key_hash_idx ON public.orders (key_hash);
//! SELECT shardlease.backfill_key_hash_rest('public.orders', 'id', 'key_hash', 10000); -- until 0
//! ALTER TABLE public.orders VALIDATE CONSTRAINT key_hash_is_set;
//! SELECT shardlease.add_key_hash('public.orders', 'id', 'key_hash');   -- narrows the trigger
//! SELECT * FROM shardlease.key_hash_status('public.orders');
//! ```

use std::time::Instant;

use tokio_postgres::types::Type;
use tokio_postgres::Client;

use crate::error::{Doing, Error, Result};
use crate::migrate::{millis, set_lock_timeout, with_lock_retries, MigrateOptions};

/// A table's stored-hash column, and the steps that add it (see the [module docs](self)).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyHashColumn {
    table: String,
    key: String,
    column: String,
    batch_pages: i32,
    rest_batch: i32,
}

/// Where a table stands (`shardlease.key_hash_status`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct KeyHashStatus {
    /// The `integer` column exists.
    pub has_column: bool,
    /// The trigger that fills it exists and is enabled.
    pub has_trigger: bool,
    /// Every row has its hash: the constraint `<column>_is_set` is validated (or the column
    /// is `NOT NULL`).
    pub backfilled: bool,
    /// A valid index leads with the column.
    pub indexed: bool,
    /// All of the above, and the trigger narrowed to inserts and key updates: members may
    /// own hash ranges of the table.
    pub ready: bool,
}

/// What [`KeyHashColumn::prepare`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct PrepareReport {
    /// The steps this run carried out (`install`, `backfill`, `index`, `validate`, `settle`);
    /// empty when the table was ready.
    pub steps: Vec<&'static str>,
    /// Rows whose hash this run filled in.
    pub backfilled_rows: u64,
    /// Statements retried after a lock timeout (or a deadlock).
    pub lock_retries: u32,
    /// The table's state afterwards.
    pub status: KeyHashStatus,
}

/// Progress of a backfill, reported after every slice.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct BackfillProgress {
    /// Pages done.
    pub pages_done: i64,
    /// The table's size in pages (it may grow meanwhile).
    pub table_pages: i64,
    /// Rows updated so far.
    pub rows: u64,
}

/// How many times the last rows and the validation are tried when writers keep adding rows
/// without a hash (only an update that moves a row version before its hash was set does).
const VALIDATE_ROUNDS: u32 = 10;

impl KeyHashColumn {
    /// The column `key_hash` of `table` (a name as SQL reads it, e.g. `public.orders`), hashed
    /// from the key column `key` (uuid, text-like or integer).
    pub fn new(table: impl Into<String>, key: impl Into<String>) -> Self {
        KeyHashColumn {
            table: table.into(),
            key: key.into(),
            column: "key_hash".into(),
            batch_pages: 128,
            rest_batch: 10_000,
        }
    }

    /// Name the hash column (default `key_hash`).
    #[must_use]
    pub fn column(mut self, column: impl Into<String>) -> Self {
        self.column = column.into();
        self
    }

    /// Pages per backfill transaction (default 128, i.e. 1 MiB; at least 1). Each slice holds
    /// its rows locked until it commits: smaller slices, shorter waits for other writers.
    #[must_use]
    pub fn batch_pages(mut self, pages: i32) -> Self {
        self.batch_pages = pages.max(1);
        self
    }

    /// The table, as given.
    pub fn table(&self) -> &str {
        &self.table
    }

    /// The hash column's name.
    pub fn column_name(&self) -> &str {
        &self.column
    }

    /// Where the table stands.
    ///
    /// # Errors
    ///
    /// [`Error::NotMigrated`] when the shardlease schema predates version 5, [`Error::Db`]
    /// when the table does not exist.
    pub async fn status(&self, client: &Client) -> Result<KeyHashStatus> {
        // No named prepared statement: workers read this through a transaction pooler too.
        let rows = client
            .query_typed(
                "SELECT has_column, has_trigger, backfilled, indexed, ready \
                 FROM shardlease.key_hash_status($1::text::regclass, $2::name)",
                &[(&self.table, Type::TEXT), (&self.column, Type::TEXT)],
            )
            .await
            .map_err(|e| self.classify(self.error(e, "reading its state")))?;
        let row = rows.into_iter().next().ok_or_else(|| {
            Error::Migration(format!(
                "key_hash of table {}: shardlease.key_hash_status returned no row",
                self.table
            ))
        })?;
        Ok(KeyHashStatus {
            has_column: row.get(0),
            has_trigger: row.get(1),
            backfilled: row.get(2),
            indexed: row.get(3),
            ready: row.get(4),
        })
    }

    /// All steps that are not done yet, then the state. Idempotent; restores the session's
    /// `lock_timeout`.
    ///
    /// # Errors
    ///
    /// [`Error::Migration`] when a lock was not granted in `options.attempts` tries, or rows
    /// without a hash keep appearing; [`Error::Db`] for anything else.
    pub async fn prepare(
        &self,
        client: &mut Client,
        options: &MigrateOptions,
    ) -> Result<PrepareReport> {
        options.validate()?;
        let previous: String = client
            .query_one("SELECT current_setting('lock_timeout')", &[])
            .await
            .doing(|| "reading the session's lock_timeout".into())?
            .get(0);
        self.lock(client, options).await?;
        let result = self.prepare_steps(client, options).await;
        let unlocked = client
            .execute(
                "SELECT pg_advisory_unlock(hashtextextended('shardlease.key_hash ' || $1::text::regclass::oid, 0))",
                &[&self.table],
            )
            .await;
        let restored = set_lock_timeout(client, &previous).await;
        let report = result?;
        unlocked.map_err(|e| self.error(e, "releasing its preparation lock"))?;
        restored?;
        Ok(report)
    }

    /// Take the session advisory lock that serialises preparers of this table.
    ///
    /// It is polled with `pg_try_advisory_lock`, never waited for: `CREATE INDEX
    /// CONCURRENTLY` waits for every transaction that holds an older snapshot, and a session
    /// blocked in `pg_advisory_lock` holds one, so a blocking wait behind a preparer that is
    /// building the index would deadlock with it. Gives up after
    /// [`MigrateOptions::concurrent_lock_timeout`], saying so.
    async fn lock(&self, client: &Client, options: &MigrateOptions) -> Result<()> {
        let started = Instant::now();
        let mut pause = std::time::Duration::from_millis(20);
        loop {
            let got: bool = client
                .query_one(
                    "SELECT pg_try_advisory_lock(hashtextextended('shardlease.key_hash ' || $1::text::regclass::oid, 0))",
                    &[&self.table],
                )
                .await
                .map_err(|e| self.classify(self.error(e, "taking its preparation lock")))?
                .get(0);
            if got {
                return Ok(());
            }
            if started.elapsed() >= options.concurrent_lock_timeout {
                return Err(Error::Migration(format!(
                    "{}.{}: another process has been preparing it for {:?}; is it stuck? (see pg_stat_activity)",
                    self.table, self.column, options.concurrent_lock_timeout
                )));
            }
            tracing::info!(table = %self.table, retry_in = ?pause, "another process prepares this table's stored hash; waiting for it");
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(std::time::Duration::from_secs(1));
        }
    }

    async fn prepare_steps(
        &self,
        client: &mut Client,
        options: &MigrateOptions,
    ) -> Result<PrepareReport> {
        let mut report = PrepareReport {
            steps: Vec::new(),
            backfilled_rows: 0,
            lock_retries: 0,
            status: self.status(client).await?,
        };
        if report.status.ready {
            return Ok(report);
        }
        if !(report.status.has_column && report.status.has_trigger) {
            self.install(client, options, &mut report.lock_retries)
                .await?;
            report.steps.push("install");
        }
        if !report.status.backfilled {
            let started = Instant::now();
            report.backfilled_rows += self
                .backfill(client, options, &mut report.lock_retries, |p| {
                    tracing::info!(table = %self.table, pages_done = p.pages_done, table_pages = p.table_pages, rows = p.rows, "backfilling the stored hash");
                })
                .await?;
            tracing::info!(table = %self.table, rows = report.backfilled_rows, elapsed = ?started.elapsed(), "backfilled the stored hash");
            report.steps.push("backfill");
        }
        if !report.status.indexed {
            self.index(client, options, &mut report.lock_retries)
                .await?;
            report.steps.push("index");
        }
        if !report.status.backfilled {
            report.backfilled_rows += self
                .validate(client, options, &mut report.lock_retries)
                .await?;
            report.steps.push("validate");
        }
        // Narrow the trigger to inserts and key updates (and install it if it is missing).
        report.status = self.status(client).await?;
        if !report.status.ready {
            self.install(client, options, &mut report.lock_retries)
                .await?;
            report.steps.push("settle");
            report.status = self.status(client).await?;
        }
        Ok(report)
    }

    /// Step 1 (and 5): the column, the trigger and the unvalidated constraint, in one short
    /// transaction under `options.lock_timeout`, retried. Once the constraint is validated,
    /// the same call narrows the trigger to inserts and key updates.
    pub async fn install(
        &self,
        client: &mut Client,
        options: &MigrateOptions,
        retries: &mut u32,
    ) -> Result<()> {
        set_lock_timeout(client, &millis(options.lock_timeout)).await?;
        let args = (self.table.clone(), self.key.clone(), self.column.clone());
        let what = format!("adding {} to {}", self.column, self.table);
        with_lock_retries(client, options, &what, retries, move |c| {
            let (table, key, column) = args.clone();
            Box::pin(async move {
                c.execute(
                    "SELECT shardlease.add_key_hash($1::text::regclass, $2, $3)",
                    &[&table, &key, &column],
                )
                .await
            })
        })
        .await
        .map_err(|e| self.classify(e))?;
        Ok(())
    }

    /// Step 2: fill the hash of every row that lacks it, a slice of pages per transaction.
    /// Returns the rows updated.
    pub async fn backfill(
        &self,
        client: &mut Client,
        options: &MigrateOptions,
        retries: &mut u32,
        mut progress: impl FnMut(BackfillProgress),
    ) -> Result<u64> {
        set_lock_timeout(client, &millis(options.lock_timeout)).await?;
        let mut page: i64 = 0;
        let mut rows: u64 = 0;
        loop {
            let args = (
                self.table.clone(),
                self.key.clone(),
                self.column.clone(),
                page,
                self.batch_pages,
            );
            let what = format!("backfilling {}.{}", self.table, self.column);
            let (updated, next, pages) = with_lock_retries(client, options, &what, retries, move |c| {
                let (table, key, column, page, batch) = args.clone();
                Box::pin(async move {
                    let row = c
                        .query_one(
                            "SELECT updated, next_page, table_pages FROM shardlease.backfill_key_hash($1::text::regclass, $2, $3, $4, $5)",
                            &[&table, &key, &column, &page, &batch],
                        )
                        .await?;
                    Ok((row.get::<_, i64>(0), row.get::<_, i64>(1), row.get::<_, i64>(2)))
                })
            })
            .await
            .map_err(|e| self.classify(e))?;
            rows += updated as u64;
            page = next;
            progress(BackfillProgress {
                pages_done: page.min(pages),
                table_pages: pages,
                rows,
            });
            if page >= pages {
                return Ok(rows);
            }
        }
    }

    /// Step 3: `CREATE INDEX CONCURRENTLY` on the column (named `<table>_<column>_idx`), after
    /// dropping an invalid leftover of an interrupted run.
    pub async fn index(
        &self,
        client: &mut Client,
        options: &MigrateOptions,
        retries: &mut u32,
    ) -> Result<()> {
        set_lock_timeout(client, &millis(options.concurrent_lock_timeout)).await?;
        let names = client
            .query_one(
                "SELECT $1::text::regclass::text, quote_ident(n.nspname), \
                        quote_ident(left(c.relname || '_' || $2 || '_idx', 63)), quote_ident($2) \
                 FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
                 WHERE c.oid = $1::text::regclass",
                &[&self.table, &self.column],
            )
            .await
            .map_err(|e| self.error(e, "naming its index"))?;
        let (table, schema, index, column): (String, String, String, String) =
            (names.get(0), names.get(1), names.get(2), names.get(3));
        let invalid: bool = client
            .query_one(
                "SELECT EXISTS (SELECT 1 FROM pg_index i JOIN pg_class x ON x.oid = i.indexrelid \
                 WHERE i.indrelid = $1::text::regclass AND quote_ident(x.relname) = $2 AND NOT i.indisvalid)",
                &[&self.table, &index],
            )
            .await
            .map_err(|e| self.error(e, "looking for an invalid index"))?
            .get(0);
        let what = format!("indexing {}.{}", self.table, self.column);
        if invalid {
            let drop = format!("DROP INDEX CONCURRENTLY IF EXISTS {schema}.{index}");
            with_lock_retries(client, options, &what, retries, move |c| {
                let drop = drop.clone();
                Box::pin(async move { c.batch_execute(&drop).await })
            })
            .await?;
        }
        let create =
            format!("CREATE INDEX CONCURRENTLY IF NOT EXISTS {index} ON {table} ({column})");
        with_lock_retries(client, options, &what, retries, move |c| {
            let create = create.clone();
            let drop = format!("DROP INDEX CONCURRENTLY IF EXISTS {schema}.{index}");
            Box::pin(async move {
                match c.batch_execute(&create).await {
                    // A failed concurrent build leaves an invalid index behind: drop it so
                    // that the retry builds a new one.
                    Err(e) => {
                        let _ = c.batch_execute(&drop).await;
                        Err(e)
                    }
                    ok => ok,
                }
            })
        })
        .await?;
        Ok(())
    }

    /// Step 4: fill the last rows and validate the constraint, which proves every row has its
    /// hash. Returns the rows updated.
    pub async fn validate(
        &self,
        client: &mut Client,
        options: &MigrateOptions,
        retries: &mut u32,
    ) -> Result<u64> {
        let constraint: String = client
            .query_one(
                "SELECT quote_ident(left($1 || '_is_set', 63))",
                &[&self.column],
            )
            .await
            .doing(|| "naming the constraint".into())?
            .get(0);
        let table: String = client
            .query_one("SELECT $1::text::regclass::text", &[&self.table])
            .await
            .map_err(|e| self.error(e, "naming it"))?
            .get(0);
        let mut rows = 0u64;
        for _round in 0..VALIDATE_ROUNDS {
            set_lock_timeout(client, &millis(options.lock_timeout)).await?;
            loop {
                let args = (
                    self.table.clone(),
                    self.key.clone(),
                    self.column.clone(),
                    self.rest_batch,
                );
                let what = format!(
                    "backfilling the last rows of {}.{}",
                    self.table, self.column
                );
                let updated: i64 = with_lock_retries(client, options, &what, retries, move |c| {
                    let (table, key, column, limit) = args.clone();
                    Box::pin(async move {
                        Ok(c.query_one(
                            "SELECT shardlease.backfill_key_hash_rest($1::text::regclass, $2, $3, $4)",
                            &[&table, &key, &column, &limit],
                        )
                        .await?
                        .get(0))
                    })
                })
                .await
                .map_err(|e| self.classify(e))?;
                rows += updated as u64;
                if updated == 0 {
                    break;
                }
            }
            set_lock_timeout(client, &millis(options.concurrent_lock_timeout)).await?;
            let sql = format!("ALTER TABLE {table} VALIDATE CONSTRAINT {constraint}");
            match client.batch_execute(&sql).await {
                Ok(()) => return Ok(rows),
                // A row without its hash: one that a lock kept from the last pass. Again.
                Err(e) if e.code().map(|c| c.code()) == Some("23514") => continue,
                Err(e) if crate::migrate::is_lock_wait(&e) => {
                    *retries += 1;
                    continue;
                }
                Err(e) => return Err(self.error(e, "validating the constraint")),
            }
        }
        Err(Error::Migration(format!(
            "{}.{}: rows without a hash kept appearing through {VALIDATE_ROUNDS} rounds (rows held \
             locked by long transactions?); run the migration again",
            self.table, self.column
        )))
    }

    fn error(&self, source: tokio_postgres::Error, doing: &str) -> Error {
        Error::Db {
            doing: format!("{} of table {}: {doing}", self.column, self.table),
            source,
        }
    }

    /// A schema without the version-5 functions means: migrate first.
    fn classify(&self, e: Error) -> Error {
        match e {
            Error::Db { source, doing }
                if matches!(source.code().map(|c| c.code()), Some("42883" | "3F000")) =>
            {
                Error::NotMigrated {
                    detail: format!("{doing}: {}", crate::error::describe_db_error(&source)),
                }
            }
            other => other,
        }
    }
}
