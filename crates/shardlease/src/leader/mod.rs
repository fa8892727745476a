//! Leader election: the longest-standing member of a group leads.
//!
//! Every member of a leader group is a candidate. The leader is the member with the lowest
//! lease incarnation of the current timeline: the one that joined first among those still
//! there. A joiner, or a member that comes back after a crash, always takes a higher
//! incarnation, so it never preempts a live leader; leadership moves only when the leader's
//! lease goes (it resigns, crashes, hangs past its TTL, or loses its connection).
//!
//! How a change of leader is noticed, and what it costs:
//! - **resign** (and SIGTERM in the example): the leader leaves the group in one
//!   transaction; its NOTIFY gives every candidate the new view at once.
//! - **crash**: each candidate's watcher keeps one statement waiting on the slot lock of the
//!   candidate before it in incarnation order (a ring); the leader's successor waits on
//!   the leader's. The lock is granted the instant the leader's backend is gone, and that
//!   statement reaps it on the server: a NOTIFY later, everyone knows the new leader.
//! - **hang**: the leader's own session reports `Lost` before its lease expires by the
//!   database clock (it saw no renewal succeed in time); its successor's heartbeat finds the
//!   lease expired, ends its backends and reaps it.
//!
//! At rest a candidate costs one heartbeat per beat and one re-armed wait per watch period:
//! about 0.55 statements per second with the defaults. No crash checks run in a leader
//! group (see `Detection::Ring` in the session).

mod config;
mod fence;
pub(crate) mod ring;
mod watcher;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::connect::DbConfig;
use crate::error::{Error, FenceReason, Result};
use crate::member::{timeout_ms, Member};
use crate::session::Detection;
use crate::view::{MemberState, View};

pub use config::LeaderConfig;
pub use fence::{LeaderFence, LeaderTransaction};

use watcher::{Target, Watcher};

/// Where a candidate stands.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Leadership {
    /// This candidate leads the group.
    Leading {
        /// When this candidate learned it leads (this process's monotonic clock).
        since: Instant,
        /// Proof of leadership for writes: [`LeaderFence::begin`].
        fence: LeaderFence,
    },
    /// Another candidate leads.
    Following {
        /// The leader's member id.
        leader: String,
    },
    /// This candidate is not in the group: it lost its lease (expired, reaped, or its
    /// session broke; it rejoins as the newest candidate when it can), resigned, or stopped.
    /// Whatever it did as leader must stop at once.
    Lost {
        /// What happened.
        reason: String,
    },
}

impl Leadership {
    /// True while leading.
    pub fn is_leading(&self) -> bool {
        matches!(self, Leadership::Leading { .. })
    }

    /// The fence, while leading.
    pub fn fence(&self) -> Option<&LeaderFence> {
        match self {
            Leadership::Leading { fence, .. } => Some(fence),
            _ => None,
        }
    }
}

/// A candidate's leadership, and the membership view it was decided from.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Election {
    /// Where this candidate stands.
    pub leadership: Leadership,
    /// The view it was decided from: the candidates (members), the generation.
    pub view: View,
}

impl Election {
    /// The leader's member id, as this view shows it (`None` while this candidate is lost).
    pub fn leader(&self) -> Option<&str> {
        match &self.leadership {
            Leadership::Leading { .. } => ring::leader(&self.view).map(|m| m.member_id.as_str()),
            Leadership::Following { leader } => Some(leader),
            Leadership::Lost { .. } => None,
        }
    }
}

/// A candidate in a group's leader election.
///
/// Joining makes it a member of the group (see [`Member`]) with a watcher of its own: a
/// second connection on which one statement waits for the candidate before it to go. The
/// longest-standing candidate leads; [`Leader::watch`] shows every change.
///
/// [`Leader::resign`] hands leadership over at once and leaves. Dropping the handle stops
/// the candidate without leaving: its connections close, and the others reap it as crashed.
///
/// ```no_run
/// # async fn f() -> shardlease::Result<()> {
/// use shardlease::{Leader, LeaderConfig, Leadership};
/// let pg = shardlease::parse_database_url("postgres://postgres@127.0.0.1/postgres")?;
/// let mut client = shardlease::connect_client(&pg, "scheduler").await?;
/// let leader = Leader::join(&pg, LeaderConfig::new("scheduler", "pod-a")).await?;
/// let mut elections = leader.watch();
/// loop {
///     let election = elections.borrow_and_update().clone();
///     if let Leadership::Leading { fence, .. } = &election.leadership {
///         // Commits only while this candidate leads.
///         let tx = fence.begin(&mut client).await?;
///         tx.execute("UPDATE jobs SET scheduled = true WHERE due < now()", &[]).await?;
///         tx.commit().await?;
///     }
///     if elections.changed().await.is_err() { break }
/// }
/// leader.resign().await?;
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct Leader {
    group: String,
    member_id: String,
    member: Option<Member>,
    election: watch::Receiver<Election>,
    shared: Arc<Shared>,
    stop: CancellationToken,
    task: Option<JoinHandle<()>>,
}

/// What the handle and the leader task share.
#[derive(Debug)]
struct Shared {
    election: watch::Sender<Election>,
    /// Set by [`Leader::resign`]: from then on, "resigned" is the last word.
    resigned: AtomicBool,
}

impl Shared {
    /// Publish `next` if it differs from the current election and the candidate has not
    /// resigned; true when published. Checked under the channel's lock, so that nothing is
    /// published after the resignation.
    fn publish(&self, next: Election) -> bool {
        self.election.send_if_modified(|e| {
            if self.resigned.load(Ordering::SeqCst) || *e == next {
                false
            } else {
                *e = next;
                true
            }
        })
    }
}

impl Leader {
    /// Validate `cfg`, join the group as a candidate and open the watcher's connection.
    ///
    /// The first attempt's errors are returned as is (unreachable database, not migrated,
    /// member id in use); later losses are retried in the background.
    pub async fn join(pg: &DbConfig, cfg: LeaderConfig) -> Result<Leader> {
        cfg.validate()?;
        let member = Member::join_with(pg, cfg.member_config(), Detection::Ring).await?;
        let watcher = match Watcher::connect(pg, &cfg).await {
            Ok(w) => w,
            Err(e) => {
                let _ = member.leave().await;
                return Err(e);
            }
        };
        let stop = CancellationToken::new();
        let (targets_tx, targets) = watch::channel(None);
        // A placeholder nobody sees: the first decision replaces it before join returns.
        let (election_tx, election) = watch::channel(Election {
            leadership: Leadership::Lost {
                reason: "joining".into(),
            },
            view: member.view(),
        });
        let shared = Arc::new(Shared {
            election: election_tx,
            resigned: AtomicBool::new(false),
        });
        let mut elector = Elector {
            group: cfg.group.clone(),
            fence_timeout_ms: timeout_ms(cfg.member_config().fence_lock_timeout()),
            views: member.watch(),
            shared: shared.clone(),
            targets: targets_tx,
            leader: None,
            accounted: None,
            carry: Duration::ZERO,
        };
        elector.update();
        tokio::spawn(watcher.run(targets, stop.child_token()));
        let task = tokio::spawn(elector.run(stop.clone()));
        Ok(Leader {
            group: cfg.group,
            member_id: cfg.member_id,
            member: Some(member),
            election,
            shared,
            stop,
            task: Some(task),
        })
    }

    /// This candidate's id.
    pub fn member_id(&self) -> &str {
        &self.member_id
    }

    /// Where this candidate stands now.
    pub fn leadership(&self) -> Leadership {
        self.election.borrow().leadership.clone()
    }

    /// True while this candidate leads.
    pub fn is_leading(&self) -> bool {
        self.election.borrow().leadership.is_leading()
    }

    /// The current election: leadership and the view it was decided from.
    pub fn election(&self) -> Election {
        self.election.borrow().clone()
    }

    /// A receiver that sees every change of the election: of leadership, and of the view.
    pub fn watch(&self) -> watch::Receiver<Election> {
        self.election.clone()
    }

    /// The fence of leader transactions. Fails with [`Error::Fenced`]
    /// ([`FenceReason::NotLeader`]) unless this candidate leads.
    pub fn fence(&self) -> Result<LeaderFence> {
        let election = self.election.borrow();
        match &election.leadership {
            Leadership::Leading { fence, .. } => Ok(fence.clone()),
            _ => Err(Error::Fenced {
                reason: FenceReason::NotLeader,
                expected: election.view.generation,
                current: None,
            }),
        }
    }

    /// Wait until the election satisfies `pred`, at most `timeout`. Returns it, or `None` on
    /// timeout or when the candidate has stopped.
    pub async fn wait_for(
        &self,
        timeout: Duration,
        pred: impl FnMut(&Election) -> bool,
    ) -> Option<Election> {
        let mut rx = self.election.clone();
        let found = tokio::time::timeout(timeout, async {
            rx.wait_for(pred).await.map(|e| e.clone()).ok()
        })
        .await;
        found.ok().flatten()
    }

    /// Hand leadership over and leave: this candidate reports `Lost` ("resigned") first, then
    /// leaves the group in one transaction, whose NOTIFY makes the next-longest-standing
    /// candidate the leader at once. A follower that resigns just leaves.
    pub async fn resign(mut self) -> Result<()> {
        self.shared.resigned.store(true, Ordering::SeqCst);
        self.shared.election.send_modify(|e| {
            e.leadership = Leadership::Lost {
                reason: "resigned".into(),
            }
        });
        metrics::gauge!("shardlease_leader", "group" => self.group.clone()).set(0.0);
        // Leave at once; stop the leader task and the watcher only then, so that the
        // watcher's cancel request does not compete with the leave.
        let left = match self.member.take() {
            Some(member) => member.leave().await,
            None => Ok(()),
        };
        self.stop.cancel();
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
        left
    }
}

impl Drop for Leader {
    fn drop(&mut self) {
        // Without leaving: the member's Drop closes its session, the others reap it.
        self.stop.cancel();
    }
}

/// The leader task: decides the leadership from every view, publishes it, and tells the
/// watcher whom to watch.
struct Elector {
    group: String,
    fence_timeout_ms: i32,
    views: watch::Receiver<View>,
    shared: Arc<Shared>,
    targets: watch::Sender<Target>,
    /// The leader's incarnation as last seen, to count changes.
    leader: Option<i64>,
    /// While leading: up to when the time as leader was counted.
    accounted: Option<Instant>,
    /// Time as leader not yet counted (the counter takes whole seconds).
    carry: Duration,
}

impl Elector {
    async fn run(mut self, stop: CancellationToken) {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                biased;
                _ = stop.cancelled() => {
                    self.finish("stopped: the handle was dropped");
                    return;
                }
                changed = self.views.changed() => {
                    if changed.is_err() {
                        self.finish("the member stopped");
                        return;
                    }
                    self.update();
                }
                _ = tick.tick(), if self.accounted.is_some() => self.account(),
            }
        }
    }

    /// Decide from the latest view, count what changed, and publish it: the metrics are
    /// current when a receiver sees the change.
    fn update(&mut self) {
        let (next, target) = self.decide();
        let same = *self.shared.election.borrow() == next;
        if !same && !self.shared.resigned.load(Ordering::SeqCst) {
            self.observe(&next);
            self.shared.publish(next);
        }
        // After the publication: a new target costs the watcher a cancel request. A
        // resigned candidate's watcher just stops (see `Leader::resign`).
        if self.shared.resigned.load(Ordering::SeqCst) {
            return;
        }
        self.targets.send_if_modified(|t| {
            let changed = *t != target;
            *t = target;
            changed
        });
    }

    /// The leadership the latest view implies, keeping `since` while the same lease leads,
    /// and whom to watch.
    fn decide(&mut self) -> (Election, Target) {
        let view = self.views.borrow_and_update().clone();
        let leadership = match &view.state {
            MemberState::Joined { slot, incarnation } => match ring::leader(&view) {
                Some(leader) if leader.incarnation == *incarnation => {
                    let leading_already = match &self.shared.election.borrow().leadership {
                        Leadership::Leading { since, fence }
                            if fence.incarnation == *incarnation =>
                        {
                            Some((*since, fence.clone()))
                        }
                        _ => None,
                    };
                    let (since, fence) = leading_already.unwrap_or_else(|| {
                        (
                            Instant::now(),
                            LeaderFence {
                                group: self.group.clone(),
                                slot: *slot,
                                incarnation: *incarnation,
                                term: view.generation,
                                timeout_ms: self.fence_timeout_ms,
                            },
                        )
                    });
                    Leadership::Leading { since, fence }
                }
                Some(leader) => Leadership::Following {
                    leader: leader.member_id.clone(),
                },
                None => Leadership::Lost {
                    reason: "this member is not in its own view".into(),
                },
            },
            MemberState::Lost { reason } => Leadership::Lost {
                reason: reason.clone(),
            },
            MemberState::Left => Leadership::Lost {
                reason: "left the group".into(),
            },
        };
        let target = view
            .my_incarnation()
            .and_then(|me| ring::watched(&view, me))
            .map(|m| m.incarnation);
        (Election { leadership, view }, target)
    }

    /// Log and count `election`, about to be published (or, at the end, the last word).
    fn observe(&mut self, election: &Election) {
        let leading = election.leadership.is_leading();
        metrics::gauge!("shardlease_leader", "group" => self.group.clone()).set(if leading {
            1.0
        } else {
            0.0
        });
        let leader = match &election.leadership {
            Leadership::Lost { .. } => None,
            _ => ring::leader(&election.view).map(|m| m.incarnation),
        };
        if leader.is_some() && leader != self.leader {
            if self.leader.is_some() {
                metrics::counter!("shardlease_leader_changes_total", "group" => self.group.clone())
                    .increment(1);
            }
            tracing::info!(group = %self.group, member = ?election.view.my_incarnation(), leader = ?election.leader(), generation = election.view.generation, "leader");
            self.leader = leader;
        }
        match (leading, self.accounted) {
            (true, None) => {
                metrics::counter!("shardlease_leader_terms_total", "group" => self.group.clone())
                    .increment(1);
                tracing::info!(group = %self.group, generation = election.view.generation, "leading");
                self.accounted = Some(Instant::now());
            }
            (false, Some(_)) => {
                self.account();
                self.accounted = None;
                tracing::info!(group = %self.group, leadership = ?election.leadership, "no longer leading");
            }
            _ => {}
        }
    }

    /// Count the time as leader up to now.
    fn account(&mut self) {
        let Some(from) = self.accounted else { return };
        let now = Instant::now();
        self.carry += now - from;
        self.accounted = Some(now);
        let whole = self.carry.as_secs();
        if whole > 0 {
            metrics::counter!("shardlease_leader_seconds_total", "group" => self.group.clone())
                .increment(whole);
            self.carry -= Duration::from_secs(whole);
        }
    }

    /// The last word: `Lost` (unless the candidate resigned, which said so already), and
    /// nothing to watch.
    fn finish(&mut self, reason: &str) {
        self.targets.send_replace(None);
        let resigned = self.shared.resigned.load(Ordering::SeqCst);
        let last = Election {
            leadership: Leadership::Lost {
                reason: if resigned { "resigned" } else { reason }.into(),
            },
            view: self.shared.election.borrow().view.clone(),
        };
        self.shared.publish(last.clone());
        self.observe(&last);
    }
}
