//! Fenced transactions: the single-writer guarantee (I1).
//!
//! A fenced transaction is checked twice: at begin, without locking anything of the group (a
//! stale view fails fast), and at commit, where `shardlease.fence_commit` and `COMMIT` travel
//! in one message. `fence_commit` holds the group's fence lock shared while the server
//! commits; a membership change takes it exclusively just before it bumps the generation. So
//! a write under generation G never commits after G+1, and a membership change waits only for
//! transactions that are committing, never for a long one.
//!
//! Every statement here is unnamed (no prepared statement outlives its transaction) and all
//! state is transaction-scoped, so the work connection may go through a transaction pooler.

use std::ops::{Deref, DerefMut};

use tokio_postgres::types::{ToSql, Type};
use tokio_postgres::{Client, Transaction};

use crate::error::{describe_db_error, sqlstate, Doing, Error, FenceReason, Result};

/// Proof of the view a write is computed from: the group, this member's lease and the
/// generation. Get it from [`View::fence`](crate::View::fence) of the same view you computed
/// your assignment from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fence {
    pub(crate) group: String,
    pub(crate) slot: u32,
    pub(crate) incarnation: i64,
    pub(crate) generation: u64,
    pub(crate) timeout_ms: i32,
}

impl Fence {
    /// The generation this fence writes under.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// The member's slot.
    pub fn slot(&self) -> u32 {
        self.slot
    }

    /// The incarnation of the lease this fence was computed under.
    pub fn incarnation(&self) -> i64 {
        self.incarnation
    }

    /// The group's name.
    pub fn group(&self) -> &str {
        &self.group
    }

    /// How long the commit check may wait for the group's fence lock, in milliseconds (the
    /// third argument of `shardlease.fence_commit`).
    pub fn lock_timeout_ms(&self) -> i32 {
        self.timeout_ms
    }

    /// The error of a statement that ran this fence's checks itself, `doing` what: a
    /// refusal by `shardlease.fence_guard` or `shardlease.fence_commit` (SQLSTATE `SLX01`)
    /// is [`Error::Fenced`], anything else [`Error::Db`].
    ///
    /// That is how one statement can be fenced on its own: a function of yours that calls
    /// `shardlease.fence_guard(group, incarnation, generation)`, does its writes and then
    /// calls `shardlease.fence_commit(incarnation, generation, lock_timeout_ms)`, run
    /// outside an explicit transaction, so that its commit follows the commit check at once
    /// (the check holds the group's fence lock until then). One statement instead of the
    /// five of [`Fence::run`]: the worker's tick (`shardlease_worker.tick`) does this.
    ///
    /// ```no_run
    /// # async fn f(member: &shardlease::Member, client: &tokio_postgres::Client) -> shardlease::Result<()> {
    /// use tokio_postgres::types::Type;
    ///
    /// let fence = member.view().fence()?;
    /// let generation = fence.generation() as i64;
    /// let rows = client
    ///     .query_typed(
    ///         "SELECT * FROM my_fenced_write($1, $2, $3, $4)",
    ///         &[(&fence.group(), Type::TEXT), (&fence.incarnation(), Type::INT8),
    ///           (&generation, Type::INT8), (&fence.lock_timeout_ms(), Type::INT4)],
    ///     )
    ///     .await
    ///     .map_err(|e| fence.error_of(e, "running my fenced write"))?;
    /// # Ok(()) }
    /// ```
    pub fn error_of(&self, e: tokio_postgres::Error, doing: &str) -> Error {
        match refusal(&e) {
            Some((reason, current)) => self.refused(reason, current),
            None => Error::Db {
                doing: format!("{doing} in group {:?}", self.group),
                source: e,
            },
        }
    }

    /// Begin a fenced transaction on `client` (any connection to the same database; a
    /// transaction pooler such as PgBouncer in transaction mode is fine).
    ///
    /// The first statement checks that the generation is still this fence's and that the
    /// lease is live. Nothing of the group is locked while the transaction runs, however
    /// long it takes: the decisive check comes with [`FencedTransaction::commit`]. (If the
    /// member hangs, the reaper ends this transaction when the lease expires.) If a check fails, the transaction is rolled back and
    /// [`Error::Fenced`] says why; refresh the view and retry.
    ///
    /// ```no_run
    /// # async fn f(member: &shardlease::Member, client: &mut tokio_postgres::Client) -> shardlease::Result<()> {
    /// let view = member.view();
    /// let fence = view.fence()?;
    /// let tx = fence.begin(client).await?;
    /// tx.execute("UPDATE my_table SET n = n + 1 WHERE shard = ANY($1)", &[&vec![1i32, 2]]).await?;
    /// tx.commit().await?; // refused with Error::Fenced if the membership changed meanwhile
    /// # Ok(()) }
    /// ```
    pub async fn begin<'a>(&self, client: &'a mut Client) -> Result<FencedTransaction<'a>> {
        let doing = || format!("beginning a fenced transaction in group {:?}", self.group);
        let checked = begin_checked(
            client,
            &self.group,
            self.generation,
            &doing,
            "SELECT status, current_generation FROM shardlease.fence_begin($1, $2, $3)",
            &self.begin_params(&(self.generation as i64)),
        )
        .await?;
        match checked {
            Ok(tx) => Ok(FencedTransaction {
                tx,
                fence: self.clone(),
            }),
            Err((reason, current)) => Err(self.refused(reason, current)),
        }
    }

    /// Run one statement in a fenced transaction, in two round trips instead of four: `BEGIN`,
    /// then the begin check, `statement`, and the commit check with `COMMIT`, sent together
    /// (pipelined; the server runs them in order, and an error skips the rest). The rows of
    /// `statement` when the transaction committed; otherwise nothing committed, and the error
    /// says why ([`Error::Fenced`] when the fence no longer holds).
    ///
    /// The guarantee is [`commit`](FencedTransaction::commit)'s: the commit check decides.
    /// The begin check raises on a stale fence, so `statement` never runs (nor locks a row
    /// that the current owner is about to write) for a member whose view is already out of
    /// date. Once it is sent, the server runs it to its commit or its refusal without the
    /// client; a member that hangs meanwhile is ended with its lease by the reaper, as in
    /// [`begin`](Fence::begin). `statement` is unnamed (typed parameters, no prepared
    /// statement), so `client` may go through a transaction pooler.
    ///
    /// ```no_run
    /// # async fn f(member: &shardlease::Member, client: &mut tokio_postgres::Client) -> shardlease::Result<()> {
    /// use tokio_postgres::types::Type;
    ///
    /// let fence = member.view().fence()?;
    /// let rows = fence
    ///     .run(client, "UPDATE my_table SET n = n + 1 WHERE shard = ANY($1) RETURNING id",
    ///          &[(&vec![1i32, 2], Type::INT4_ARRAY)])
    ///     .await?;
    /// println!("{} rows committed under generation {}", rows.len(), fence.generation());
    /// # Ok(()) }
    /// ```
    pub async fn run(
        &self,
        client: &mut Client,
        statement: &str,
        params: &[(&(dyn ToSql + Sync), Type)],
    ) -> Result<Vec<tokio_postgres::Row>> {
        let doing = || format!("running a fenced statement in group {:?}", self.group);
        let tx = client.transaction().await.doing(doing)?;
        // Integers only: safe to inline into the one simple-query message.
        let commit = with_commit(&self.commit_check());
        let generation = self.generation as i64;
        let guard_params = self.begin_params(&generation);
        let (guarded, rows, committed) = tokio::join!(
            tx.query_typed("SELECT shardlease.fence_guard($1, $2, $3)", &guard_params),
            tx.query_typed(statement, params),
            tx.batch_execute(&commit)
        );
        match settle(tx, committed).await {
            Ok(()) => rows.doing(doing),
            Err(e) => {
                // Why, in the order the server ran them: the begin check, the statement, then
                // the commit check (after an error the others fail as "transaction aborted").
                if let Err(e) = guarded {
                    return Err(self.refused_or(e, "beginning"));
                }
                rows.doing(doing)?;
                Err(self.refused_or(e, "committing"))
            }
        }
    }

    /// The begin check's parameters: group, incarnation and `generation` (this fence's, as
    /// the `bigint` it is stored as).
    fn begin_params<'a>(&'a self, generation: &'a i64) -> [(&'a (dyn ToSql + Sync), Type); 3] {
        [
            (&self.group, Type::TEXT),
            (&self.incarnation, Type::INT8),
            (generation, Type::INT8),
        ]
    }

    /// The commit check: `shardlease.fence_commit` with this fence's integers inlined.
    fn commit_check(&self) -> String {
        format!(
            "SELECT shardlease.fence_commit({}, {}, {})",
            self.incarnation, self.generation as i64, self.timeout_ms
        )
    }

    /// The error of a failed begin or commit check (`step`: "beginning" or "committing"):
    /// the refusal, or the database error.
    fn refused_or(&self, e: tokio_postgres::Error, step: &str) -> Error {
        self.error_of(e, &format!("{step} a fenced transaction"))
    }

    fn refused(&self, reason: FenceReason, current: Option<u64>) -> Error {
        metrics::counter!("shardlease_fenced_rejections_total", "group" => self.group.clone())
            .increment(1);
        tracing::debug!(group = %self.group, %reason, expected = self.generation, ?current, "fenced");
        Error::Fenced {
            reason,
            expected: self.generation,
            current,
        }
    }
}

/// An open fenced transaction: use it as a [`Transaction`] (it dereferences to one), then
/// [`commit`](FencedTransaction::commit) it. Dropped without a commit, it rolls back.
#[must_use = "a fenced transaction rolls back unless committed"]
pub struct FencedTransaction<'a> {
    tx: Transaction<'a>,
    fence: Fence,
}

impl<'a> FencedTransaction<'a> {
    /// The fence this transaction writes under.
    pub fn fence(&self) -> &Fence {
        &self.fence
    }

    /// Commit, if the fence still holds: the generation is the fence's and the lease is
    /// live, checked under the group's fence lock in the same message as `COMMIT`. Otherwise
    /// nothing commits and [`Error::Fenced`] says why.
    pub async fn commit(self) -> Result<()> {
        let check = self.fence.commit_check();
        let fence = self.fence;
        commit_checked(self.tx, &check)
            .await
            .map_err(|e| fence.refused_or(e, "committing"))
    }
}

/// Open a transaction on `client` and run its first statement, `check`: a fence function
/// that returns `(status, current_generation)`. The open transaction when the status is `ok`;
/// otherwise the transaction is rolled back and the refusal returned. No row at all is
/// [`FenceReason::NoGroup`] against `expected`. Shared by member and leader fences.
pub(crate) async fn begin_checked<'a>(
    client: &'a mut Client,
    group: &str,
    expected: u64,
    doing: &(dyn Fn() -> String + Sync),
    check: &str,
    params: &[(&(dyn ToSql + Sync), Type)],
) -> Result<std::result::Result<Transaction<'a>, (FenceReason, Option<u64>)>> {
    let tx = client.transaction().await.doing(doing)?;
    let rows = tx
        .query_typed(check, params)
        .await
        .map_err(|e| crate::error::classify(e, group, "", &doing()))?;
    let row = rows.into_iter().next().ok_or_else(|| Error::Fenced {
        reason: FenceReason::NoGroup,
        expected,
        current: None,
    })?;
    let status: &str = row.get(0);
    let current: Option<i64> = row.get(1);
    match FenceReason::from_status(status) {
        None => Ok(Ok(tx)),
        Some(reason) => {
            tx.rollback().await.doing(doing)?;
            Ok(Err((reason, current.map(|g| g as u64))))
        }
    }
}

/// Send `check` and `COMMIT` to the server in one message: a check that raises keeps the
/// `COMMIT` from running. `Ok` when committed; otherwise the driver's error, after the
/// transaction was rolled back.
pub(crate) async fn commit_checked(
    tx: Transaction<'_>,
    check: &str,
) -> std::result::Result<(), tokio_postgres::Error> {
    let sent = tx.batch_execute(&with_commit(check)).await;
    settle(tx, sent).await
}

/// `check` and `COMMIT` as one simple-query message: a check that raises keeps the `COMMIT`
/// from running.
fn with_commit(check: &str) -> String {
    format!("{check}; COMMIT")
}

/// After a [`with_commit`] message ran with outcome `sent`: when it committed, forget the
/// driver's handle, whose drop would send ROLLBACK (it owns no heap memory: a top-level
/// transaction has no savepoint name); otherwise the transaction is aborted, so roll it back
/// (dropping the handle would too) and return the error.
async fn settle(
    tx: Transaction<'_>,
    sent: std::result::Result<(), tokio_postgres::Error>,
) -> std::result::Result<(), tokio_postgres::Error> {
    match sent {
        Ok(()) => {
            std::mem::forget(tx);
            Ok(())
        }
        Err(e) => {
            let _ = tx.rollback().await;
            Err(e)
        }
    }
}

/// The refusal a commit check's error carries, if it is one: SLX01 names the reason in its
/// message and the current generation in its detail; a serialization failure (repeatable
/// read or serializable) means the group row changed since the transaction's snapshot.
pub(crate) fn refusal(e: &tokio_postgres::Error) -> Option<(FenceReason, Option<u64>)> {
    let db = e.as_db_error()?;
    let code = db.code().code();
    if code == sqlstate::FENCED {
        let status = db.message().trim_start_matches("shardlease fence: ");
        let current = db
            .detail()
            .and_then(|d| d.strip_prefix("current generation "))
            .and_then(|d| d.split(',').next())
            .and_then(|g| g.parse().ok());
        let reason = FenceReason::from_status(status).unwrap_or(FenceReason::NoGroup);
        return Some((reason, current));
    }
    if code == "40001" {
        tracing::debug!(error = %describe_db_error(e), "fenced at commit by a serialization failure");
        return Some((FenceReason::StaleGeneration, None));
    }
    None
}

impl std::fmt::Debug for FencedTransaction<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FencedTransaction")
            .field("fence", &self.fence)
            .finish_non_exhaustive()
    }
}

impl<'a> Deref for FencedTransaction<'a> {
    type Target = Transaction<'a>;

    fn deref(&self) -> &Transaction<'a> {
        &self.tx
    }
}

impl<'a> DerefMut for FencedTransaction<'a> {
    fn deref_mut(&mut self) -> &mut Transaction<'a> {
        &mut self.tx
    }
}
