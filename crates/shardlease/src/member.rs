//! The member handle: join a group, keep the lease, watch the view, leave.

use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::config::MemberConfig;
use crate::connect::DbConfig;
use crate::error::Result;
use crate::session::{Detection, Driver, Session};
use crate::view::{MemberState, View};

/// A joined member of a group.
///
/// A background task owns the member's dedicated session connection: it holds the
/// advisory lock of the member's slot, LISTENs for membership changes, renews the lease
/// every heartbeat, reaps crashed and expired members, and reconnects and rejoins (as a new
/// incarnation) when the connection or the lease is lost.
///
/// [`Member::leave`] leaves gracefully. Dropping the handle stops the task without leaving:
/// the session connection closes, and the other members reap this one as crashed.
///
/// ```no_run
/// # async fn f() -> shardlease::Result<()> {
/// let pg: shardlease::DbConfig = "postgres://postgres@127.0.0.1/postgres".parse()?;
/// let member = shardlease::Member::join(&pg, shardlease::MemberConfig::new("orders", "pod-a")).await?;
/// let mut views = member.watch();
/// loop {
///     let view = views.borrow_and_update().clone();
///     let mine = view.my_slot().map(|slot| view.assignment().shards_of(slot, 1024));
///     println!("generation {}: I own shards {:?}", view.generation, mine);
///     if views.changed().await.is_err() { break }
/// }
/// member.leave().await?;
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct Member {
    member_id: String,
    view: watch::Receiver<View>,
    leave: CancellationToken,
    abort: CancellationToken,
    task: Option<JoinHandle<Result<()>>>,
}

impl Member {
    /// Validate `cfg`, connect, and join the group: one transaction that reaps the dead,
    /// takes the lowest vacant slot (or a new one), takes the slot's advisory lock, inserts
    /// the lease and bumps the generation.
    ///
    /// The first attempt's error is returned as is (unreachable database, database not
    /// migrated, member id in use, protocol mismatch); later losses are retried in the
    /// background. Use [`Error::is_transient`](crate::Error::is_transient) to decide whether
    /// to retry a failed join.
    pub async fn join(pg: &DbConfig, cfg: MemberConfig) -> Result<Member> {
        Member::join_with(pg, cfg, Detection::Checkers).await
    }

    /// [`Member::join`], looking for crashed members as `detection` says.
    pub(crate) async fn join_with(
        pg: &DbConfig,
        cfg: MemberConfig,
        detection: Detection,
    ) -> Result<Member> {
        cfg.validate()?;
        let (view_tx, view) = watch::channel(View {
            group: cfg.group.clone(),
            generation: 0,
            slot_count: 0,
            members: Vec::new(),
            state: MemberState::Lost {
                reason: "not joined yet".into(),
            },
            fence_timeout_ms: timeout_ms(cfg.fence_lock_timeout()),
        });
        let leave = CancellationToken::new();
        let abort = CancellationToken::new();
        let driver = Driver::new(
            pg.clone(),
            cfg.clone(),
            view_tx,
            leave.clone(),
            abort.clone(),
            detection,
        );
        let session: Session = driver.open_session(true).await?;
        let task = tokio::spawn(driver.run(session));
        Ok(Member {
            member_id: cfg.member_id,
            view,
            leave,
            abort,
            task: Some(task),
        })
    }

    /// This member's id.
    pub fn member_id(&self) -> &str {
        &self.member_id
    }

    /// The current view (a clone of the latest snapshot).
    pub fn view(&self) -> View {
        self.view.borrow().clone()
    }

    /// A receiver that sees every change of the view.
    pub fn watch(&self) -> watch::Receiver<View> {
        self.view.clone()
    }

    /// Wait until the view satisfies `pred`, at most `timeout`. Returns the view, or `None`
    /// on timeout or when the member has stopped.
    pub async fn wait_for(
        &self,
        timeout: Duration,
        pred: impl FnMut(&View) -> bool,
    ) -> Option<View> {
        let mut rx = self.view.clone();
        let found = tokio::time::timeout(timeout, async {
            rx.wait_for(pred).await.map(|view| view.clone()).ok()
        })
        .await;
        found.ok().flatten()
    }

    /// Leave gracefully: delete the lease, bump the generation and notify in one
    /// transaction, then release the advisory lock and close the connection.
    pub async fn leave(mut self) -> Result<()> {
        self.leave.cancel();
        match self.task.take() {
            Some(task) => task.await.unwrap_or(Ok(())),
            None => Ok(()),
        }
    }
}

impl Drop for Member {
    fn drop(&mut self) {
        // Without leaving: the connection closes and the others reap this member.
        self.abort.cancel();
    }
}

pub(crate) fn timeout_ms(d: Duration) -> i32 {
    d.as_millis().clamp(1, i32::MAX as u128) as i32
}
