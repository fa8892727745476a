//! The member's background task: one dedicated session connection that holds the slot's
//! advisory lock, LISTENs, heartbeats, looks for crashed members when it is one of the
//! group's checkers, and reconnects when it must.
//!
//! Cost at rest, per member and heartbeat: one statement, whatever the group size: every
//! other beat a plain UPDATE through `shardlease.own_lease` renews the lease (schema version
//! 9), and the beats between read it with a plain statement. Only the [`CHECKERS`] lowest slots look for crashes, once per crash-check
//! interval each: one read of a shared counter, a look at the expiries only when one may have
//! come due, and a shared try-lock per lease (no `pg_locks` scan) only when a session of the
//! database has ended since the checker last looked, or once per heartbeat
//! ([`crate::crash_check`]). Everyone else's heartbeat probes the checkers' slot
//! locks now and then, so that a group whose checkers all died still notices. Membership
//! changes arrive as notifications that carry the change, applied to the view without a
//! re-read when they follow on from it (a re-read otherwise, once per burst).
//!
//! Leader candidates ([`Detection::Ring`]) run no crash checks: each heartbeat probes the
//! member before them in incarnation order, and the leader module's watcher catches crashes.

use std::future::Future;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use backon::{ExponentialBuilder, Retryable};
use tokio::sync::{mpsc, watch, OnceCell};
use tokio::time::{interval, Instant, MissedTickBehavior};
use tokio_postgres::error::SqlState;
use tokio_postgres::{Client, Notification, Statement};
use tokio_util::sync::CancellationToken;

use crate::config::MemberConfig;
use crate::connect::{connect_session, DbConfig};
use crate::crash_check::{CheckState, Checked};
use crate::error::{classify, Doing, Error, Result};
use crate::member::timeout_ms;
use crate::notification::Change;
use crate::protocol::{CHANNEL, PROTOCOL_VERSION};
use crate::view::{MemberInfo, MemberState, View};

/// How many of the lowest slots look for crashed members. Their checks are spread evenly
/// over the crash-check interval, so that the group as a whole checks this many times per
/// interval.
pub(crate) const CHECKERS: usize = 3;

/// Every how many heartbeats a member that is not a checker probes the checkers' slot locks.
const PROBE_EVERY: u64 = 4;

/// How long a join may wait for its turn at the group row (at least half the TTL): see
/// `open_session`. 200 workers started at once join in about 10 s on 2 cores.
const JOIN_WAIT: Duration = Duration::from_secs(30);

/// `Ok(None)` when a statement could not be prepared because a function it calls does not
/// exist (the schema predates it).
fn unless_undefined(prepared: Result<Statement>) -> Result<Option<Statement>> {
    match prepared {
        Ok(statement) => Ok(Some(statement)),
        Err(Error::NotMigrated { detail }) => {
            tracing::debug!(%detail, "the schema predates a statement of this build: the session uses the older one");
            Ok(None)
        }
        Err(e) => Err(e),
    }
}

/// The renewing heartbeat (schema version 9): extend the lease through `shardlease.own_lease`
/// and report the generation as `shardlease.lease_state` does; probe the slots in `$2` as
/// `shardlease.heartbeat` does: only when there are any, driven by them (a lookup each: a
/// generic plan made while the group was small fetched all of the group's leases for every
/// renewal), and the CASE keeps the try-lock to the probed slots whatever the plan (the order
/// of a filter's conditions is the planner's).
const RENEW: &str = "\
    UPDATE shardlease.own_lease o \
       SET renewed_at = clock_timestamp(), expires_at = clock_timestamp() + o.ttl \
      FROM shardlease.groups g \
     WHERE o.incarnation = $1::bigint AND g.name = o.group_name \
    RETURNING \
      shardlease.reported_generation(g.generation, g.announced_generation, g.announced_at), \
      CASE WHEN cardinality($2::integer[]) > 0 THEN EXISTS ( \
        SELECT 1 FROM unnest($2::integer[]) p(slot) \
          JOIN shardlease.leases le ON le.group_name = o.group_name AND le.slot = p.slot \
         WHERE CASE WHEN le.slot = ANY ($2::integer[]) AND le.slot <> o.slot \
                    THEN le.expires_at <= clock_timestamp() \
                         OR pg_try_advisory_xact_lock_shared(g.lock_key, le.slot) \
                    ELSE false END) \
      ELSE false END, \
      o.expires_at";

/// How a member looks for crashed and hung members.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Detection {
    /// The group's [`CHECKERS`] lowest slots check every crash-check interval; everyone
    /// else's heartbeat probes the checkers now and then. The default.
    Checkers,
    /// Leader candidates ([`crate::leader`]): no crash checks. Every heartbeat probes the
    /// member before this one in the ring of incarnations (expiry, or a lock found free),
    /// and a watcher of the leader module waits on that member's lock to catch a crash.
    Ring,
}

/// The statements a session runs every heartbeat or check, prepared once per connection:
/// those every member runs when it joins, the others (the crash check and the reap, which
/// only the three checkers run, and `shardlease.heartbeat`, which only leader groups and old
/// schemas call) on first use, which spares a cold start of 1,000 members as many Parse
/// messages, each with its catalog lookups in a fresh backend.
struct Prepared {
    /// `shardlease.heartbeat`: a beat that probes without renewing (leader groups), or every
    /// beat on a schema older than version 8.
    heartbeat: OnceCell<Statement>,
    /// A heartbeat that renews and probes nothing: a plain read of the lease. `None` on a
    /// schema older than version 8, where every beat calls `heartbeat`.
    read: Option<Statement>,
    /// A heartbeat that renews (and probes the slots it is given): one plain UPDATE through
    /// `shardlease.own_lease`. `None` on a schema older than version 9, or once the role
    /// turned out not to have the privilege (granted before version 9 and not since): then
    /// renewing beats call `heartbeat`.
    renew: Option<Statement>,
    check: OnceCell<Check>,
    reap: OnceCell<Statement>,
    view: Statement,
}

/// The PL/pgSQL heartbeat ([`Prepared::heartbeat`]).
const HEARTBEAT: &str = "SELECT generation, suspect, expires_at \
    FROM shardlease.heartbeat($1::bigint, $2::integer[], $3::bigint * interval '1 millisecond')";

/// The reap.
const REAP: &str =
    "SELECT member_id, slot, incarnation, reason, generation FROM shardlease.reap($1::text)";

/// The crash check of schema version 10: flush the group's due announcements, then look for
/// dead members, at the expiries only when asked ([`crate::crash_check`]).
const SCHEDULED_CHECK: &str = "\
    SELECT shardlease.flush_announcements($1::text), c.needs_reap, c.ended_sessions, c.probed, \
           c.looked, c.next_expiry_ms \
      FROM shardlease.needs_reap($1::text, $2::bigint, $3::boolean) c";

/// The crash check of schema version 8 (expiries at every check).
const GATED_CHECK: &str = "\
    SELECT shardlease.flush_announcements($1::text), c.needs_reap, c.ended_sessions, c.probed \
      FROM shardlease.needs_reap($1::text, $2::bigint) c";

/// The crash check of older schemas (every slot lock at every check).
const FULL_CHECK: &str =
    "SELECT shardlease.flush_announcements($1::text), shardlease.needs_reap($1::text)";

/// Prepare the crash check of the newest schema version the database has.
async fn prepare_check(client: &Client) -> std::result::Result<Check, tokio_postgres::Error> {
    let undefined = |e: &tokio_postgres::Error| e.code() == Some(&SqlState::UNDEFINED_FUNCTION);
    match client.prepare(SCHEDULED_CHECK).await {
        Ok(check) => return Ok(Check::Scheduled(check)),
        Err(e) if !undefined(&e) => return Err(e),
        Err(_) => {}
    }
    match client.prepare(GATED_CHECK).await {
        Ok(check) => Ok(Check::Gated(check)),
        Err(e) if undefined(&e) => client.prepare(FULL_CHECK).await.map(Check::Full),
        Err(e) => Err(e),
    }
}

/// The crash check, by schema version.
enum Check {
    /// Version 10: also looks at the expiries only when asked ([`crate::crash_check`]).
    Scheduled(Statement),
    /// Version 8: probes the slot locks only when a session has ended, looks at the
    /// expiries at every check.
    Gated(Statement),
    /// Older schemas: probes every slot lock at every check.
    Full(Statement),
}

/// A joined session: the connection that holds our lock, and what we joined as.
pub(crate) struct Session {
    client: Client,
    notifications: mpsc::UnboundedReceiver<Notification>,
    prepared: Prepared,
    slot: u32,
    incarnation: i64,
    lock_key: i32,
    /// The generation the last heartbeat reported, when it was ahead of the view.
    ahead: Option<u64>,
    /// The lease's expiry (database clock) as last seen, to tell a renewing beat.
    expires_at: SystemTime,
    /// When the statement that last renewed the lease (or joined) was sent.
    renewed_sent: Instant,
    /// How many beats asked to renew (to spread the checkers' probes over them).
    renewals: u64,
    /// What this member's crash checks have seen, when it is a checker.
    checks: CheckState,
    /// When this member stops calling itself joined unless a renewal succeeds first: the
    /// instant the last renewing statement was sent, plus the TTL, less a margin. The
    /// statement ran after it was sent, so the lease lasts at least until then by the
    /// database clock: a member cut off from the database (a partition without a reset, a
    /// hung server) reports itself lost before anyone may take its shards over.
    deadline: Instant,
}

pub(crate) struct Driver {
    pg: DbConfig,
    cfg: MemberConfig,
    view: watch::Sender<View>,
    leave: CancellationToken,
    abort: CancellationToken,
    detection: Detection,
}

/// What the loop should do after handling one event.
enum Next {
    Continue,
    /// The session is unusable: the lease or the connection is lost.
    Lost(String),
}

impl Driver {
    pub(crate) fn new(
        pg: DbConfig,
        cfg: MemberConfig,
        view: watch::Sender<View>,
        leave: CancellationToken,
        abort: CancellationToken,
        detection: Detection,
    ) -> Self {
        Driver {
            pg,
            cfg,
            view,
            leave,
            abort,
            detection,
        }
    }

    fn who(&self) -> String {
        format!("{}/{}", self.cfg.group, self.cfg.member_id)
    }

    /// Connect, LISTEN and join; publish the first view. `first`: this is the member's first
    /// join, so check first that the session connection is not behind a transaction pooler
    /// (later joins use the same URL).
    pub(crate) async fn open_session(&self, first: bool) -> Result<Session> {
        let app = truncate(&format!(
            "shardlease {}/{} joining",
            self.cfg.group, self.cfg.member_id
        ));
        let (client, notifications, ends) = connect_session(&self.pg, &app).await?;
        if first {
            crate::pooler::check_session_not_pooled(
                &self.pg,
                &client,
                ends,
                &crate::describe_target(&self.pg),
            )
            .await?;
        }
        // Every wait is bounded: once joined, a lock wait by a heartbeat and a statement by
        // half the TTL, so that a slow statement never costs this member its lease. The join
        // itself waits up to JOIN_WAIT (set here, lowered once it has returned): a joiner
        // holds no lease yet, and joins queue for the group row one after another, so when
        // hundreds of members start at once (a cold start, a whole group after a database
        // restart) a joiner that gave up would only lose its place, and retrying costs a new
        // connection.
        //
        // Generic plans from the first execution: every statement of the session (and in our
        // functions) is a lookup by key whose best plan does not depend on the values, and a
        // new session would otherwise plan each of them afresh at its first five executions
        // (the plan cache's custom plans), which a group of hundreds of members starting at
        // once pays for hundreds of times a second.
        //
        // Asynchronous commit: the session's transactions (joins, renewals, leaves, reaps)
        // do not wait for their WAL to reach disk, so a join does not hold the group row
        // through a flush. A server crash may lose the last of them, and costs nothing: the
        // crash ends every session anyway, so a lost join or renewal belonged to a member
        // that must rejoin, a lost leave or reap is done again by the checkers (the departed
        // member's slot lock died with the server), and any write that depends on a
        // membership change (a fenced commit, which commits synchronously on its own
        // connection) flushes the WAL up to and past that change first.
        let lock_timeout = self.lock_timeout_ms();
        let statement_timeout = timeout_ms(self.cfg.lease_ttl / 2);
        let join_wait = timeout_ms(JOIN_WAIT.max(self.cfg.lease_ttl / 2));
        client
            .batch_execute(&format!(
                "SET lock_timeout = {join_wait}; SET statement_timeout = {join_wait}; \
                 SET idle_in_transaction_session_timeout = {statement_timeout}; \
                 SET plan_cache_mode = force_generic_plan; SET synchronous_commit = off; \
                 LISTEN {CHANNEL}"
            ))
            .await
            .map_err(|e| {
                classify(
                    e,
                    &self.cfg.group,
                    &self.cfg.member_id,
                    "setting up the session connection",
                )
            })?;
        let prepared = self.prepare(&client).await?;
        let ttl = format!("{} milliseconds", self.cfg.lease_ttl.as_millis());
        let sent = Instant::now();
        let joined = client
            .query_one(
                "SELECT slot, incarnation, generation, lock_key, expires_at, \
                        statement_timestamp() \
                 FROM shardlease.join($1, $2, $3::text::interval, $4, $5)",
                &[
                    &self.cfg.group,
                    &self.cfg.member_id,
                    &ttl,
                    &self.cfg.metadata,
                    &PROTOCOL_VERSION,
                ],
            )
            .await;
        let joined = match joined {
            Ok(row) => client
                .batch_execute(&format!(
                    "SET lock_timeout = {lock_timeout}; SET statement_timeout = {statement_timeout}"
                ))
                .await
                .map(|()| row),
            Err(e) => Err(e),
        };
        let row = match joined {
            Ok(row) => row,
            Err(e) => {
                // A failed join may have taken the slot lock before failing: let it go.
                let _ = client
                    .batch_execute("SELECT pg_advisory_unlock_all()")
                    .await;
                return Err(classify(
                    e,
                    &self.cfg.group,
                    &self.cfg.member_id,
                    &format!("joining as {}", self.who()),
                ));
            }
        };
        let session = Session {
            client,
            notifications,
            prepared,
            slot: row.get::<_, i32>(0) as u32,
            incarnation: row.get(1),
            lock_key: row.get(3),
            ahead: None,
            expires_at: row.get(4),
            renewed_sent: sent,
            renewals: 0,
            checks: CheckState::default(),
            deadline: sent + queued(&row, self.cfg.lease_ttl) + self.lease_budget(),
        };
        let generation: i64 = row.get(2);
        tracing::info!(
            group = %self.cfg.group, member = %self.cfg.member_id, slot = session.slot,
            incarnation = session.incarnation, generation, "joined"
        );
        metrics::counter!("shardlease_joins_total", "group" => self.cfg.group.clone()).increment(1);
        self.refresh(&session).await?;
        Ok(session)
    }

    async fn prepare(&self, client: &Client) -> Result<Prepared> {
        let prepare = |sql: &'static str| async move {
            client.prepare(sql).await.map_err(|e| {
                classify(
                    e,
                    &self.cfg.group,
                    &self.cfg.member_id,
                    "preparing the session's statements",
                )
            })
        };
        Ok(Prepared {
            heartbeat: OnceCell::new(),
            // Schema version 8's statements, and what older schemas offer instead (an
            // embedder may run this build before migrating; the worker refuses to).
            read: unless_undefined(
                prepare(
                    "SELECT generation, false, expires_at FROM shardlease.lease_state($1::bigint)",
                )
                .await,
            )?,
            renew: unless_undefined(prepare(RENEW).await)?,
            check: OnceCell::new(),
            reap: OnceCell::new(),
            view: prepare(
                "SELECT g.generation, g.slot_count, l.member_id, l.slot, l.incarnation \
                 FROM shardlease.groups g \
                 LEFT JOIN shardlease.leases l ON l.group_name = g.name \
                 WHERE g.name = $1::text ORDER BY l.slot",
            )
            .await?,
        })
    }

    /// The member's life: heartbeats, crash checks (when a checker) and notifications until
    /// asked to leave or abort; on a loss, rejoin with capped, jittered exponential backoff.
    pub(crate) async fn run(self, first: Session) -> Result<()> {
        let mut session = Some(first);
        let mut heartbeat = interval(self.cfg.heartbeat);
        heartbeat.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut next_check: Option<Instant> = None;
        let mut beats: u64 = 0;
        loop {
            let Some(s) = session.as_mut() else {
                match self.rejoin().await {
                    Some(s) => {
                        session = Some(s);
                        next_check = None;
                        continue;
                    }
                    None => {
                        self.publish_state(MemberState::Left);
                        return Ok(());
                    }
                }
            };
            // Checkers look for crashes at their own phase of the interval; others never.
            let rank = match self.detection {
                Detection::Checkers => self.checker_slots().iter().position(|&c| c == s.slot),
                Detection::Ring => None,
            };
            if rank.is_none() {
                next_check = None;
            } else if next_check.is_none() {
                next_check = rank.map(|r| next_phase(self.cfg.crash_check, r));
            }
            // Heartbeats come before notifications, so that a burst of changes can never
            // hold off a renewal. No handler may outlive the lease's deadline.
            let deadline = s.deadline;
            let next = tokio::select! {
                biased;
                _ = self.abort.cancelled() => {
                    self.publish_state(MemberState::Left);
                    return Ok(());
                }
                _ = self.leave.cancelled() => {
                    let s = session.take().expect("checked above");
                    let result = self.leave_group(s).await;
                    self.publish_state(MemberState::Left);
                    return result;
                }
                _ = tokio::time::sleep_until(deadline) => self.past_deadline(),
                _ = heartbeat.tick() => {
                    beats += 1;
                    let renew = self.renew_due(s);
                    let probe = self.probe_slots(s, rank, beats, renew);
                    self.before_deadline(deadline, self.on_heartbeat(s, probe, renew)).await
                }
                _ = sleep_until(next_check), if next_check.is_some() => {
                    next_check = rank.map(|r| next_phase(self.cfg.crash_check, r));
                    self.before_deadline(deadline, self.on_crash_check(s)).await
                }
                note = s.notifications.recv() => match note {
                    Some(note) => self.before_deadline(deadline, self.on_notifications(s, note)).await,
                    None => Next::Lost("the session connection closed".into()),
                },
            };
            if let Next::Lost(reason) = next {
                if self.abort.is_cancelled() {
                    // Dropped while a handler ran: whatever failed under it is the drop's
                    // doing (its connection is going away), not a lost lease to report.
                    self.publish_state(MemberState::Left);
                    return Ok(());
                }
                tracing::warn!(group = %self.cfg.group, member = %self.cfg.member_id, %reason, "lease lost; fenced work stops, rejoining");
                metrics::counter!("shardlease_losses_total", "group" => self.cfg.group.clone())
                    .increment(1);
                self.publish_state(MemberState::Lost { reason });
                // Dropping the session closes the connection, which releases its locks.
                session = None;
            }
        }
    }

    /// The session connection's lock wait once joined: one heartbeat.
    fn lock_timeout_ms(&self) -> i32 {
        timeout_ms(self.cfg.heartbeat)
    }

    /// How long after a renewal was sent the member still calls itself joined: the TTL less
    /// a margin of one heartbeat (at most a quarter of the TTL) for the reaction.
    fn lease_budget(&self) -> Duration {
        self.cfg.lease_ttl - self.cfg.heartbeat.min(self.cfg.lease_ttl / 4)
    }

    /// Run `handler`, unless the lease's deadline passes first.
    async fn before_deadline(
        &self,
        deadline: Instant,
        handler: impl Future<Output = Next>,
    ) -> Next {
        match tokio::time::timeout_at(deadline, handler).await {
            Ok(next) => next,
            Err(_) => self.past_deadline(),
        }
    }

    fn past_deadline(&self) -> Next {
        Next::Lost(format!(
            "no renewal succeeded within {:?} of the last one (the database does not answer): \
             stopping before the lease expires by the database clock",
            self.lease_budget()
        ))
    }

    /// The group's checkers: the slots of the view's lowest [`CHECKERS`] members.
    fn checker_slots(&self) -> Vec<u32> {
        let view = self.view.borrow();
        view.members.iter().take(CHECKERS).map(|m| m.slot).collect()
    }

    /// Handle `first` and every notification already queued behind it: changes that follow
    /// on from the view are applied as they come; anything else costs one re-read in all.
    async fn on_notifications(&self, s: &mut Session, first: Notification) -> Next {
        let mut reread = false;
        let mut note = Some(first);
        while let Some(n) = note {
            if let Some(change) = Change::parse(n.payload(), &self.cfg.group) {
                let applied = self.view.send_if_modified(|v| {
                    if change.generation <= v.generation {
                        return false; // seen already
                    }
                    let applied = change.apply(v, s.incarnation);
                    reread |= !applied;
                    applied
                });
                if applied {
                    self.view_changed();
                }
            }
            note = s.notifications.try_recv().ok();
        }
        if reread {
            return self.refresh_or_lose(s).await;
        }
        if self.view.borrow().is_joined() {
            Next::Continue
        } else {
            Next::Lost("this member's lease is no longer in the group".into())
        }
    }

    /// Whether this beat asks to renew (calls `shardlease.heartbeat`): always on a schema
    /// older than version 8, else from [`MemberConfig::renew_ask_after`] after the last
    /// renewal was sent.
    fn renew_due(&self, s: &Session) -> bool {
        s.prepared.read.is_none() || s.renewed_sent.elapsed() >= self.cfg.renew_ask_after()
    }

    /// The slots this heartbeat probes. Checkers: none. Other members: the checkers' slots
    /// other than ours, every [`PROBE_EVERY`] beats, in turns by slot, so that the group
    /// probes them about N / 4 times per beat and each member costs one cheap statement per
    /// beat: on every other renewing beat (renewals come every other beat), so that the beats
    /// between stay plain reads; on schemas before version 8, every fourth beat. Leader
    /// candidates: the member before this one in the ring, every beat.
    fn probe_slots(&self, s: &Session, rank: Option<usize>, beats: u64, renew: bool) -> Vec<i32> {
        let due = match s.prepared.read {
            Some(_) => renew && (s.renewals + u64::from(s.slot)).is_multiple_of(PROBE_EVERY / 2),
            None => (beats + u64::from(s.slot)).is_multiple_of(PROBE_EVERY),
        };
        match self.detection {
            Detection::Checkers if rank.is_none() && due => self
                .checker_slots()
                .into_iter()
                .filter(|&c| c != s.slot)
                .map(|c| c as i32)
                .collect(),
            Detection::Checkers => Vec::new(),
            Detection::Ring => crate::leader::ring::watched(&self.view.borrow(), s.incarnation)
                .map(|m| vec![m.slot as i32])
                .unwrap_or_default(),
        }
    }

    /// One heartbeat: renew the lease when due, with a plain UPDATE through
    /// `shardlease.own_lease` (which also probes `probe`); on a beat that only probes (leader
    /// groups), or on a schema before version 9, through `shardlease.heartbeat`; on the
    /// beats that do neither, read the lease with a plain statement
    /// (`shardlease.lease_state`). Either way: is the lease live, and which generation has
    /// the group announced.
    async fn on_heartbeat(&self, s: &mut Session, probe: Vec<i32>, renew: bool) -> Next {
        let sent = Instant::now();
        let read = s
            .prepared
            .read
            .clone()
            .filter(|_| !renew && probe.is_empty());
        let plain_renew = s.prepared.renew.clone().filter(|_| renew);
        if read.is_none() {
            s.renewals += 1;
        }
        let result = match (&read, &plain_renew) {
            (Some(read), _) => s.client.query_opt(read, &[&s.incarnation]).await,
            (None, Some(renew)) => match s.client.query_opt(renew, &[&s.incarnation, &probe]).await
            {
                Err(e) if e.code() == Some(&SqlState::INSUFFICIENT_PRIVILEGE) => {
                    let error = Error::Db {
                        doing: format!("renewing the lease ({})", self.who()),
                        source: e,
                    };
                    tracing::warn!(
                        group = %self.cfg.group, member = %self.cfg.member_id, %error,
                        "this role may not renew through shardlease.own_lease (granted before schema version 9): \
                         renewing through shardlease.heartbeat from now on, at a higher cost; \
                         grant the role again (shardlease-worker grant, or shardlease::roles::grant)"
                    );
                    s.prepared.renew = None;
                    self.call_heartbeat(s, &probe).await
                }
                other => other,
            },
            (None, None) => self.call_heartbeat(s, &probe).await,
        };
        let row = match result {
            Ok(row) => row,
            Err(e) if read.is_none() => return self.db_error("renewing the lease", e),
            Err(e) => return self.db_error("reading the lease", e),
        };
        let Some(row) = row else {
            return Next::Lost("the lease could not be renewed: it expired or was reaped".into());
        };
        let generation: i64 = row.get(0);
        let suspect: bool = row.get(1);
        let expires_at: SystemTime = row.get(2);
        if expires_at != s.expires_at {
            s.expires_at = expires_at;
            s.renewed_sent = sent;
            s.deadline = sent + self.lease_budget();
        }
        if suspect {
            // A probed member (a checker, or our predecessor in the ring) is gone or hung.
            tracing::info!(group = %self.cfg.group, member = %self.cfg.member_id, probed = ?probe, "a probed member is gone or expired; reaping");
            if let Next::Lost(reason) = self.reap(s).await {
                return Next::Lost(reason);
            }
        }
        // A change whose NOTIFY we have not seen a heartbeat later: re-read (I6). One beat
        // of grace, because the NOTIFY may still be on its way: at a thousand members,
        // re-reading at once would cost a re-read per member for every change.
        let seen = self.view.borrow().generation;
        let overdue = s.ahead.is_some_and(|g| g > seen);
        s.ahead = Some(generation as u64).filter(|&g| g > seen);
        if overdue {
            s.ahead = None;
            return self.refresh_or_lose(s).await;
        }
        Next::Continue
    }

    /// `shardlease.heartbeat`: renews when the database clock says so, and probes `probe`.
    async fn call_heartbeat(
        &self,
        s: &Session,
        probe: &[i32],
    ) -> std::result::Result<Option<tokio_postgres::Row>, tokio_postgres::Error> {
        let heartbeat = s
            .prepared
            .heartbeat
            .get_or_try_init(|| s.client.prepare(HEARTBEAT))
            .await?;
        s.client
            .query_opt(
                heartbeat,
                &[&s.incarnation, &probe, &self.cfg.renew_below_ms()],
            )
            .await
    }

    /// One crash check: the slot locks when a session of the database has ended since this
    /// checker last looked, and at least once per heartbeat; the expiries when one may have
    /// come due (see [`crate::crash_check`]).
    async fn on_crash_check(&self, s: &mut Session) -> Next {
        let seen = s.checks.seen(self.cfg.heartbeat);
        let sent = Instant::now();
        let generation = self.view.borrow().generation;
        let check = match s
            .prepared
            .check
            .get_or_try_init(|| prepare_check(&s.client))
            .await
        {
            Ok(check) => check,
            Err(e) => return self.db_error("preparing the crash check", e),
        };
        let result = match check {
            Check::Scheduled(check) => {
                let look = s.checks.look_expiries(generation, sent);
                s.client
                    .query_one(check, &[&self.cfg.group, &seen, &look])
                    .await
                    .map(|row| Checked {
                        needs_reap: row.get(1),
                        ended_sessions: row.get(2),
                        probed: row.get(3),
                        looked: row.get(4),
                        next_expiry: row
                            .get::<_, Option<i64>>(5)
                            .map(|ms| Duration::from_millis(ms.max(0) as u64)),
                    })
            }
            Check::Gated(check) => s
                .client
                .query_one(check, &[&self.cfg.group, &seen])
                .await
                .map(|row| Checked {
                    needs_reap: row.get(1),
                    ended_sessions: row.get(2),
                    probed: row.get(3),
                    looked: false,
                    next_expiry: None,
                }),
            Check::Full(check) => s
                .client
                .query_one(check, &[&self.cfg.group])
                .await
                .map(|row| Checked {
                    needs_reap: row.get(1),
                    ended_sessions: None,
                    probed: true,
                    looked: false,
                    next_expiry: None,
                }),
        };
        let checked = match result {
            Ok(checked) => checked,
            Err(e) => return self.db_error("checking the group for crashed or expired members", e),
        };
        s.checks
            .record(checked, sent, generation, self.cfg.heartbeat);
        if checked.needs_reap {
            self.reap(s).await
        } else {
            Next::Continue
        }
    }

    /// Reap the group's dead members. The reap waits for the group row at most a quarter
    /// of a heartbeat (the session's other statements wait up to a heartbeat): a reap queues
    /// behind membership changes, and while it waits this member's heartbeat waits too. In a
    /// burst of hundreds of joins, one reap per member would otherwise cost every member its
    /// lease. A reap that finds the row busy is tried again at the next check; the joins
    /// themselves reap dead checkers.
    async fn reap(&self, s: &Session) -> Next {
        let reap_wait = format!("SET lock_timeout = {}", timeout_ms(self.cfg.heartbeat / 4));
        let restore = format!("SET lock_timeout = {}", self.lock_timeout_ms());
        let reap = match s
            .prepared
            .reap
            .get_or_try_init(|| s.client.prepare(REAP))
            .await
        {
            Ok(reap) => reap,
            Err(e) => return self.db_error("preparing the reap", e),
        };
        // One round trip: the three statements are pipelined, and run in order.
        let params: [&(dyn tokio_postgres::types::ToSql + Sync); 1] = [&self.cfg.group];
        let (waiting, reaped, restored) = tokio::join!(
            s.client.batch_execute(&reap_wait),
            s.client.query(reap, &params),
            s.client.batch_execute(&restore),
        );
        if let Err(e) = waiting.and(restored) {
            return self.db_error("setting the reap's lock wait", e);
        }
        if let Err(e) = &reaped {
            if e.code() == Some(&tokio_postgres::error::SqlState::LOCK_NOT_AVAILABLE) {
                tracing::debug!(group = %self.cfg.group, member = %self.cfg.member_id, "the group row is busy with membership changes; reaping at the next check");
                return Next::Continue;
            }
        }
        match reaped {
            Ok(rows) => {
                let mut reaped = 0;
                for row in &rows {
                    let member: &str = row.get(0);
                    let slot: i32 = row.get(1);
                    let reason: &str = row.get(3);
                    let generation: Option<i64> = row.get(4);
                    if reason == "unkillable" {
                        // Deleting the lease would leave its backend holding the slot lock.
                        tracing::warn!(group = %self.cfg.group, member, slot, by = %self.cfg.member_id, "an expired member's backend could not be ended (no privilege, or it did not exit in time); its lease is kept, and ending it is tried again in one TTL");
                        metrics::counter!("shardlease_unkillable_total", "group" => self.cfg.group.clone()).increment(1);
                        continue;
                    }
                    reaped += 1;
                    tracing::info!(group = %self.cfg.group, reaped = member, slot, reason, ?generation, by = %self.cfg.member_id, "reaped member");
                    metrics::counter!("shardlease_reaped_total", "group" => self.cfg.group.clone(), "reason" => reason.to_owned()).increment(1);
                }
                if reaped == 0 {
                    Next::Continue
                } else {
                    self.refresh_or_lose(s).await
                }
            }
            Err(e) => self.db_error("reaping crashed or expired members", e),
        }
    }

    fn db_error(&self, doing: &str, e: tokio_postgres::Error) -> Next {
        let broken = crate::error::connection_ended(&e);
        let err = Error::Db {
            doing: format!("{doing} ({})", self.who()),
            source: e,
        };
        if broken {
            Next::Lost(err.to_string())
        } else {
            // Lock or statement timeout: bounded, try again at the next tick.
            tracing::warn!(group = %self.cfg.group, member = %self.cfg.member_id, error = %err, "retrying at the next tick");
            Next::Continue
        }
    }

    async fn refresh_or_lose(&self, s: &Session) -> Next {
        match self.refresh(s).await {
            Ok(()) if self.view.borrow().is_joined() => Next::Continue,
            Ok(()) => Next::Lost("this member's lease is no longer in the group".into()),
            Err(Error::Db { source, .. }) => self.db_error("re-reading the group's view", source),
            Err(e @ Error::Inconsistent { .. }) => {
                // Keep the last good view and the lease; the next heartbeat reads again.
                tracing::error!(group = %self.cfg.group, member = %self.cfg.member_id, error = %e, "not adopting the group's view");
                Next::Continue
            }
            Err(e) => Next::Lost(e.to_string()),
        }
    }

    /// Re-read the view from the tables, in one statement, and publish it if it changed.
    async fn refresh(&self, s: &Session) -> Result<()> {
        let rows = s
            .client
            .query(&s.prepared.view, &[&self.cfg.group])
            .await
            .doing(|| format!("reading the view of {}", self.who()))?;
        let Some(first) = rows.first() else {
            return Err(Error::Fenced {
                reason: crate::FenceReason::NoGroup,
                expected: self.view.borrow().generation,
                current: None,
            });
        };
        let generation = first.get::<_, i64>(0) as u64;
        let slot_count = first.get::<_, i32>(1) as u32;
        let members: Vec<MemberInfo> = rows
            .iter()
            .filter_map(|r| {
                Some(MemberInfo {
                    member_id: r.get::<_, Option<String>>(2)?,
                    slot: r.get::<_, Option<i32>>(3)? as u32,
                    incarnation: r.get::<_, Option<i64>>(4)?,
                })
            })
            .collect();
        // The tables should keep every slot below S; a hand edit may not. Refuse such a view
        // (it would have no assignment) rather than publish it, and say what to fix.
        if let Err(e) = crate::Assignment::new(slot_count, members.iter().map(|m| m.slot)) {
            return Err(Error::Inconsistent {
                group: self.cfg.group.clone(),
                detail: e.to_string(),
            });
        }
        let state = if members.iter().any(|m| m.incarnation == s.incarnation) {
            MemberState::Joined {
                slot: s.slot,
                incarnation: s.incarnation,
            }
        } else {
            MemberState::Lost {
                reason: "this member's lease is no longer in the group".into(),
            }
        };
        let new = View {
            group: self.cfg.group.clone(),
            generation,
            slot_count,
            members,
            state,
            fence_timeout_ms: timeout_ms(self.cfg.fence_lock_timeout()),
        };
        let changed = self.view.send_if_modified(|v| {
            if *v == new {
                false
            } else {
                *v = new;
                true
            }
        });
        if changed {
            self.view_changed();
        }
        Ok(())
    }

    fn view_changed(&self) {
        let v = self.view.borrow();
        tracing::debug!(group = %v.group, member = %self.cfg.member_id, generation = v.generation, slot_count = v.slot_count, members = v.members.len(), "view changed");
        metrics::gauge!("shardlease_generation", "group" => v.group.clone())
            .set(v.generation as f64);
        metrics::gauge!("shardlease_members", "group" => v.group.clone())
            .set(v.members.len() as f64);
        metrics::counter!("shardlease_view_changes_total", "group" => v.group.clone()).increment(1);
    }

    fn publish_state(&self, state: MemberState) {
        self.view.send_if_modified(|v| {
            if v.state == state {
                false
            } else {
                v.state = state;
                true
            }
        });
    }

    /// Reconnect and rejoin, with capped exponential backoff and jitter, until it works or
    /// the member is told to stop (then `None`).
    async fn rejoin(&self) -> Option<Session> {
        let attempt = (|| self.open_session(false))
            .retry(rejoin_backoff(self.cfg.reconnect_max_backoff))
            .notify(|e: &Error, delay: Duration| {
                if e.is_transient() {
                    tracing::warn!(group = %self.cfg.group, member = %self.cfg.member_id, error = %e, retry_in = ?delay, "rejoin failed; retrying");
                } else {
                    tracing::error!(group = %self.cfg.group, member = %self.cfg.member_id, error = %e, retry_in = ?delay, "rejoin failed; retrying");
                }
            });
        tokio::select! {
            _ = self.abort.cancelled() => None,
            _ = self.leave.cancelled() => None,
            session = attempt => {
                metrics::counter!("shardlease_rejoins_total", "group" => self.cfg.group.clone()).increment(1);
                session.ok()
            }
        }
    }

    /// Leave in one transaction (delete, shrink S, bump, notify), then release the lock.
    async fn leave_group(&self, s: Session) -> Result<()> {
        // Typed, unnamed: one round trip (no separate prepare) before the leave commits, so
        // that the others hear of it (and a leader's successor leads) as soon as possible.
        let generation: Option<i64> = s
            .client
            .query_typed_one(
                "SELECT shardlease.leave($1)",
                &[(&s.incarnation, tokio_postgres::types::Type::INT8)],
            )
            .await
            .doing(|| format!("leaving as {}", self.who()))?
            .get(0);
        s.client
            .execute(
                "SELECT pg_advisory_unlock($1, $2)",
                &[&s.lock_key, &(s.slot as i32)],
            )
            .await
            .doing(|| format!("releasing the slot lock of {}", self.who()))?;
        tracing::info!(group = %self.cfg.group, member = %self.cfg.member_id, slot = s.slot, ?generation, "left");
        Ok(())
    }
}

/// Capped, jittered exponential backoff from 50 ms up to `cap`.
fn rejoin_backoff(cap: Duration) -> ExponentialBuilder {
    crate::backoff::jittered(Duration::from_millis(50), cap)
}

/// The next instant at checker `rank`'s phase of `period`: checkers divide the period evenly
/// by the wall clock, so that together they check every `period / CHECKERS`. Only a schedule:
/// clocks that disagree make the checks less even, never less safe.
fn next_phase(period: Duration, rank: usize) -> Instant {
    let period_ns = period.as_nanos().max(1);
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos();
    let offset = period_ns * rank as u128 / CHECKERS as u128;
    let phase = (now + period_ns - offset) % period_ns;
    let wait = period_ns - phase;
    Instant::now() + Duration::from_nanos(wait as u64)
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// `s` cut to PostgreSQL's 63 bytes of `application_name`, on a character boundary.
pub(crate) fn truncate(s: &str) -> String {
    let mut out = String::new();
    for c in s.chars() {
        if out.len() + c.len_utf8() > 63 {
            break;
        }
        out.push(c);
    }
    out
}

/// How long a join waited in the server before it took its lease (the lease runs from then):
/// from the statement's start to the lease's start, `expires_at - ttl`, both on the database
/// clock. The statement started after it was sent, so the lease started at least this long
/// after the join was sent, and the member's deadline may count from there: a join that
/// queued behind hundreds of others is not lost the moment it returns.
fn queued(row: &tokio_postgres::Row, ttl: Duration) -> Duration {
    let expires_at: SystemTime = row.get(4);
    let started: SystemTime = row.get(5);
    expires_at
        .checked_sub(ttl)
        .and_then(|leased| leased.duration_since(started).ok())
        .unwrap_or(Duration::ZERO)
}

#[cfg(test)]
mod tests {
    use backon::BackoffBuilder;
    use shardlease_testkit::TestDb;

    use super::*;

    /// The slots whose locks this session holds shared (taken by a probe's try-locks, held
    /// to the end of the transaction).
    async fn probed_locks(c: &tokio_postgres::Transaction<'_>) -> Vec<i64> {
        c.query(
            "SELECT objid::int8 FROM pg_locks \
              WHERE locktype = 'advisory' AND pid = pg_backend_pid() AND mode = 'ShareLock' \
              ORDER BY 1",
            &[],
        )
        .await
        .expect("read this session's shared advisory locks")
        .iter()
        .map(|r| r.get(0))
        .collect()
    }

    async fn raw_join(c: &Client, member: &str) -> i64 {
        c.query_one(
            "SELECT incarnation FROM shardlease.join('g', $1, interval '60 s', '{}', $2)",
            &[&member, &PROTOCOL_VERSION],
        )
        .await
        .unwrap_or_else(|e| panic!("join as {member}: {e}"))
        .get(0)
    }

    /// A probe tries the locks of the probed slots only, whatever the plan: here every scan
    /// is sequential (as in a generic plan made while the group was small), under which a
    /// filter ran its try-lock on each of the group's leases before testing the slot.
    #[tokio::test]
    async fn a_heartbeat_tries_only_the_probed_slots_locks() {
        let db = TestDb::migrated().await;
        // Slots 0 to 2 (the checkers, whom a joiner reaps when dead) stay live; 3 and 4 are
        // dead (their session closed, their leases kept); this session takes slot 5.
        let live = db.client().await;
        for m in ["l0", "l1", "l2"] {
            raw_join(&live, m).await;
        }
        let gone = db.client().await;
        raw_join(&gone, "d3").await;
        raw_join(&gone, "d4").await;
        drop(gone);
        let mut c = db.client().await;
        let inc = raw_join(&c, "x").await;
        shardlease_testkit::eventually(
            Duration::from_secs(10),
            "the closed session's slot locks to be free",
            || async {
                c.query_one(
                    "SELECT count(*) = 0 FROM pg_locks WHERE locktype = 'advisory' AND objid IN (3, 4)",
                    &[],
                )
                .await
                .expect("read pg_locks")
                .get(0)
            },
        )
        .await;

        let heartbeat = "SELECT suspect FROM shardlease.heartbeat($1, $2, interval '0 s')";
        for (what, sql) in [("shardlease.heartbeat", heartbeat), ("RENEW", RENEW)] {
            for (probe, suspect, locks) in [(vec![], false, vec![]), (vec![3], true, vec![3i64])] {
                let tx = c.transaction().await.expect("begin");
                tx.batch_execute(
                    "SET LOCAL plan_cache_mode = force_generic_plan; \
                     SET LOCAL enable_indexscan = off; SET LOCAL enable_bitmapscan = off",
                )
                .await
                .expect("force sequential scans");
                let params: [&(dyn tokio_postgres::types::ToSql + Sync); 2] = [&inc, &probe];
                let row = tx
                    .query_one(sql, &params)
                    .await
                    .unwrap_or_else(|e| panic!("{what} probing {probe:?}: {e}"));
                let found: bool = row.get(if sql == RENEW { 1 } else { 0 });
                assert_eq!(
                    found, suspect,
                    "{what} probing {probe:?}: a dead member found?"
                );
                assert_eq!(
                    probed_locks(&tx).await,
                    locks,
                    "{what} probing {probe:?} took the lock of slots it was not asked to probe"
                );
                tx.rollback().await.expect("rollback");
            }
        }
    }

    #[test]
    fn rejoin_delays_differ_between_members() {
        let delays = || -> Vec<Duration> {
            rejoin_backoff(Duration::from_secs(5))
                .build()
                .take(4)
                .collect()
        };
        let (a, b) = (delays(), delays());
        assert_ne!(a, b, "two members drew the same jittered delays: {a:?}");
        assert!(a.iter().all(|d| *d >= Duration::from_millis(50)));
    }
}
