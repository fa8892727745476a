//! Fenced transactions: the single-writer guarantee (I1).

use tokio_postgres::{Client, Transaction};

use crate::error::{Error, FenceReason, Result};

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

    /// Begin a fenced transaction on `client` (any connection to the same database).
    ///
    /// Its first statement locks the group row FOR SHARE and checks that the generation is
    /// still this fence's and that the lease is live; it also bounds the transaction's lock,
    /// statement and idle times by the lease TTL. A membership change needs the row FOR
    /// UPDATE, so no change can commit while this transaction is open: a write under
    /// generation G can never commit after G+1. If the check fails, the transaction is rolled
    /// back and [`Error::Fenced`] says why; refresh the view and retry.
    ///
    /// ```no_run
    /// # async fn f(member: &shardlease::Member, client: &mut tokio_postgres::Client) -> shardlease::Result<()> {
    /// let view = member.view();
    /// let fence = view.fence()?;
    /// let tx = fence.begin(client).await?;
    /// tx.execute("UPDATE my_table SET n = n + 1 WHERE shard = ANY($1)", &[&vec![1i32, 2]]).await?;
    /// tx.commit().await?;
    /// # Ok(()) }
    /// ```
    pub async fn begin<'a>(&self, client: &'a mut Client) -> Result<Transaction<'a>> {
        let tx = client.transaction().await?;
        let row = tx
            .query_one(
                "SELECT status, current_generation FROM shardlease.fence($1, $2, $3, $4)",
                &[
                    &self.group,
                    &self.incarnation,
                    &(self.generation as i64),
                    &self.timeout_ms,
                ],
            )
            .await
            .map_err(|e| crate::error::classify(e, &self.group, ""))?;
        let status: &str = row.get(0);
        let current: Option<i64> = row.get(1);
        let reason = match status {
            "ok" => return Ok(tx),
            "stale_generation" => FenceReason::StaleGeneration,
            "lease_gone" => FenceReason::LeaseGone,
            "lease_expired" => FenceReason::LeaseExpired,
            _ => FenceReason::NoGroup,
        };
        tx.rollback().await?;
        metrics::counter!("shardlease_fenced_rejections_total", "group" => self.group.clone())
            .increment(1);
        tracing::debug!(group = %self.group, %reason, expected = self.generation, ?current, "fenced");
        Err(Error::Fenced {
            reason,
            expected: self.generation,
            current: current.map(|g| g as u64),
        })
    }
}
