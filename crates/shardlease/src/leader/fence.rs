//! Leader transactions: a write that commits only while its member leads.
//!
//! The same two checks as a member's fenced transaction (see [`crate::Fence`]), about
//! leadership instead of the generation: at begin without locking anything (a deposed leader
//! fails fast), and at commit, where `shardlease.leader_fence_commit` and `COMMIT` travel in
//! one message under the group's shared fence lock. Leadership moves only when the leader's
//! lease is deleted, a membership change, which takes that lock exclusively before it
//! commits: so a leader transaction never commits after its member was deposed. A follower
//! that joins or leaves does not refuse the leader's writes.
//!
//! Every statement is unnamed and all state is transaction-scoped, so the connection may go
//! through a transaction pooler.

use std::ops::{Deref, DerefMut};

use tokio_postgres::types::Type;
use tokio_postgres::{Client, Transaction};

use crate::error::{Error, FenceReason, Result};
use crate::fence::{begin_checked, commit_checked, refusal};

/// Proof of leadership: the leader's lease. Get it from
/// [`Leadership::Leading`](crate::Leadership::Leading) or [`Leader::fence`](crate::Leader::fence).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaderFence {
    pub(crate) group: String,
    pub(crate) slot: u32,
    pub(crate) incarnation: i64,
    pub(crate) term: u64,
    pub(crate) timeout_ms: i32,
}

impl LeaderFence {
    /// The group this member leads.
    pub fn group(&self) -> &str {
        &self.group
    }

    /// The incarnation of the leader's lease.
    pub fn incarnation(&self) -> i64 {
        self.incarnation
    }

    /// The leader's slot.
    pub fn slot(&self) -> u32 {
        self.slot
    }

    /// The generation of the first view in which this member led: a token that grows from
    /// one leader to the next (a successor leads only in a view without its predecessor), and
    /// stays the same for one leader's whole term. Store it beside what the leader writes to
    /// tell the terms apart.
    pub fn term(&self) -> u64 {
        self.term
    }

    /// Begin a leader transaction on `client` (any connection to the same database; a
    /// transaction pooler such as PgBouncer in transaction mode is fine).
    ///
    /// The first statement checks that this member's lease is live and leads the group.
    /// Nothing of the group is locked while the transaction runs; the decisive check comes
    /// with [`LeaderTransaction::commit`]. If a check fails, the transaction is rolled back
    /// and [`Error::Fenced`] says why ([`FenceReason::NotLeader`] when another member leads).
    ///
    /// ```no_run
    /// # async fn f(leader: &shardlease::Leader, client: &mut tokio_postgres::Client) -> shardlease::Result<()> {
    /// let fence = leader.fence()?; // Err(Fenced) unless this candidate leads
    /// let tx = fence.begin(client).await?;
    /// tx.execute("UPDATE jobs SET scheduled = true WHERE due < now()", &[]).await?;
    /// tx.commit().await?; // refused with Error::Fenced if it was deposed meanwhile
    /// # Ok(()) }
    /// ```
    pub async fn begin<'a>(&self, client: &'a mut Client) -> Result<LeaderTransaction<'a>> {
        let doing = || format!("beginning a leader transaction in group {:?}", self.group);
        let checked = begin_checked(
            client,
            &self.group,
            self.term,
            &doing,
            "SELECT status, current_generation FROM shardlease.leader_fence_begin($1, $2)",
            &[(&self.group, Type::TEXT), (&self.incarnation, Type::INT8)],
        )
        .await?;
        match checked {
            Ok(tx) => Ok(LeaderTransaction {
                tx,
                fence: self.clone(),
            }),
            Err((reason, current)) => Err(self.refused(reason, current)),
        }
    }

    fn refused(&self, reason: FenceReason, current: Option<u64>) -> Error {
        metrics::counter!("shardlease_fenced_rejections_total", "group" => self.group.clone())
            .increment(1);
        tracing::debug!(group = %self.group, %reason, term = self.term, ?current, "leader transaction fenced");
        Error::Fenced {
            reason,
            expected: self.term,
            current,
        }
    }
}

/// An open leader transaction: use it as a [`Transaction`] (it dereferences to one), then
/// [`commit`](LeaderTransaction::commit) it. Dropped without a commit, it rolls back.
#[must_use = "a leader transaction rolls back unless committed"]
pub struct LeaderTransaction<'a> {
    tx: Transaction<'a>,
    fence: LeaderFence,
}

impl<'a> LeaderTransaction<'a> {
    /// The fence this transaction writes under.
    pub fn fence(&self) -> &LeaderFence {
        &self.fence
    }

    /// Commit, if this member still leads: its lease is live and the group's longest-standing,
    /// checked under the group's fence lock in the same message as `COMMIT`. Otherwise nothing
    /// commits and [`Error::Fenced`] says why.
    pub async fn commit(self) -> Result<()> {
        let f = self.fence;
        // Integers only: safe to inline into the one simple-query message.
        let check = format!(
            "SELECT shardlease.leader_fence_commit({}, {})",
            f.incarnation, f.timeout_ms
        );
        commit_checked(self.tx, &check)
            .await
            .map_err(|e| match refusal(&e) {
                Some((reason, current)) => f.refused(reason, current),
                None => Error::Db {
                    doing: format!("committing a leader transaction in group {:?}", f.group),
                    source: e,
                },
            })
    }
}

impl std::fmt::Debug for LeaderTransaction<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LeaderTransaction")
            .field("fence", &self.fence)
            .finish_non_exhaustive()
    }
}

impl<'a> Deref for LeaderTransaction<'a> {
    type Target = Transaction<'a>;

    fn deref(&self) -> &Transaction<'a> {
        &self.tx
    }
}

impl<'a> DerefMut for LeaderTransaction<'a> {
    fn deref_mut(&mut self) -> &mut Transaction<'a> {
        &mut self.tx
    }
}
