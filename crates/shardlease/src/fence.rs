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

use tokio_postgres::types::Type;
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
        let tx = client.transaction().await.doing(doing)?;
        let row = tx
            .query_typed(
                "SELECT status, current_generation FROM shardlease.fence_begin($1, $2, $3)",
                &[
                    (&self.group, Type::TEXT),
                    (&self.incarnation, Type::INT8),
                    (&(self.generation as i64), Type::INT8),
                ],
            )
            .await
            .map_err(|e| crate::error::classify(e, &self.group, "", &doing()))?;
        let row = row.into_iter().next().ok_or_else(|| Error::Fenced {
            reason: FenceReason::NoGroup,
            expected: self.generation,
            current: None,
        })?;
        let status: &str = row.get(0);
        let current: Option<i64> = row.get(1);
        match FenceReason::from_status(status) {
            None => Ok(FencedTransaction {
                tx,
                fence: self.clone(),
            }),
            Some(reason) => {
                tx.rollback().await.doing(doing)?;
                Err(self.refused(reason, current.map(|g| g as u64)))
            }
        }
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
        let f = &self.fence;
        // Integers only: safe to inline into the one simple-query message.
        let sql = format!(
            "SELECT shardlease.fence_commit({}, {}, {}); COMMIT",
            f.incarnation, f.generation as i64, f.timeout_ms
        );
        match self.tx.batch_execute(&sql).await {
            Ok(()) => {
                // COMMIT has run: forget the driver's handle, whose drop would send ROLLBACK.
                // It owns no heap memory (a top-level transaction has no savepoint name).
                std::mem::forget(self.tx);
                Ok(())
            }
            Err(e) => {
                let err = self.commit_error(e);
                // The transaction is aborted; dropping the handle rolls it back.
                let _ = self.tx.rollback().await;
                Err(err)
            }
        }
    }

    fn commit_error(&self, e: tokio_postgres::Error) -> Error {
        let f = &self.fence;
        if let Some(db) = e.as_db_error() {
            let code = db.code().code();
            if code == sqlstate::FENCED {
                let status = db.message().trim_start_matches("shardlease fence: ");
                let current = db
                    .detail()
                    .and_then(|d| d.strip_prefix("current generation "))
                    .and_then(|d| d.split(',').next())
                    .and_then(|g| g.parse().ok());
                let reason = FenceReason::from_status(status).unwrap_or(FenceReason::NoGroup);
                return f.refused(reason, current);
            }
            if code == "40001" {
                // Repeatable read or serializable: the group row changed since the snapshot.
                tracing::debug!(group = %f.group, error = %describe_db_error(&e), "fenced at commit by a serialization failure");
                return f.refused(FenceReason::StaleGeneration, None);
            }
        }
        Error::Db {
            doing: format!("committing a fenced transaction in group {:?}", f.group),
            source: e,
        }
    }
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
