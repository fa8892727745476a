//! The member's background task: one dedicated session connection that holds the slot's
//! advisory lock, LISTENs, heartbeats, reaps the dead, and reconnects when it must.

use std::time::Duration;

use backon::{ExponentialBuilder, Retryable};
use tokio::sync::{mpsc, watch};
use tokio::time::{interval, MissedTickBehavior};
use tokio_postgres::{Client, Notification};
use tokio_util::sync::CancellationToken;

use crate::config::MemberConfig;
use crate::connect::{connect, DbConfig};
use crate::error::{classify, Error, Result};
use crate::member::timeout_ms;
use crate::view::{MemberInfo, MemberState, View};

/// The NOTIFY channel of membership changes.
pub const CHANNEL: &str = "shardlease";

/// The assignment protocol this build speaks (jump hash + splitmix re-probing over S slots).
pub const PROTOCOL_VERSION: i32 = 1;

/// A joined session: the connection that holds our lock, and what we joined as.
pub(crate) struct Session {
    client: Client,
    notifications: mpsc::UnboundedReceiver<Notification>,
    slot: u32,
    incarnation: i64,
    lock_key: i32,
}

pub(crate) struct Driver {
    pg: DbConfig,
    cfg: MemberConfig,
    view: watch::Sender<View>,
    leave: CancellationToken,
    abort: CancellationToken,
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
    ) -> Self {
        Driver {
            pg,
            cfg,
            view,
            leave,
            abort,
        }
    }

    /// Connect, LISTEN and join; publish the first view.
    pub(crate) async fn open_session(&self) -> Result<Session> {
        let app = truncate(&format!(
            "shardlease {}/{} joining",
            self.cfg.group, self.cfg.member_id
        ));
        let (client, notifications) = connect(&self.pg, &app).await?;
        let lock_timeout = timeout_ms(self.cfg.heartbeat);
        // Reaping may wait up to 2 s for a zombie backend to exit.
        let statement_timeout = timeout_ms(self.cfg.statement_timeout() + Duration::from_secs(2));
        client
            .batch_execute(&format!(
                "SET lock_timeout = {lock_timeout}; SET statement_timeout = {statement_timeout}; \
                 SET idle_in_transaction_session_timeout = {statement_timeout}; LISTEN {CHANNEL}"
            ))
            .await?;
        let ttl = format!("{} milliseconds", self.cfg.lease_ttl.as_millis());
        let joined = client
            .query_one(
                "SELECT slot, incarnation, generation, lock_key \
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
        let row = match joined {
            Ok(row) => row,
            Err(e) => {
                // A failed join may have taken the slot lock before failing: let it go.
                let _ = client
                    .batch_execute("SELECT pg_advisory_unlock_all()")
                    .await;
                return Err(classify(e, &self.cfg.group, &self.cfg.member_id));
            }
        };
        let session = Session {
            client,
            notifications,
            slot: row.get::<_, i32>(0) as u32,
            incarnation: row.get(1),
            lock_key: row.get(3),
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

    /// The member's life: react to notifications, heartbeats and crash checks until asked
    /// to leave or abort; on a loss, rejoin with capped, jittered exponential backoff.
    pub(crate) async fn run(self, first: Session) -> Result<()> {
        // Members that joined together would check for crashes in step; spread their phases
        // over the interval (by incarnation) so that, together, they look more often.
        let period = self.cfg.crash_check;
        let phase =
            period.mul_f64((crate::hash::mix64(first.incarnation as u64) % 1024) as f64 / 1024.0);
        let mut session = Some(first);
        let mut heartbeat = interval(self.cfg.heartbeat);
        heartbeat.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut crash_check = tokio::time::interval_at(tokio::time::Instant::now() + phase, period);
        crash_check.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            let Some(s) = session.as_mut() else {
                match self.rejoin().await {
                    Some(s) => {
                        session = Some(s);
                        continue;
                    }
                    None => {
                        self.publish_state(MemberState::Left);
                        return Ok(());
                    }
                }
            };
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
                note = s.notifications.recv() => match note {
                    Some(note) => self.on_notification(s, &note).await,
                    None => Next::Lost("the session connection closed".into()),
                },
                _ = heartbeat.tick() => self.on_heartbeat(s).await,
                _ = crash_check.tick() => self.on_crash_check(s).await,
            };
            if let Next::Lost(reason) = next {
                tracing::warn!(group = %self.cfg.group, member = %self.cfg.member_id, %reason, "lease lost; fenced work stops, rejoining");
                metrics::counter!("shardlease_losses_total", "group" => self.cfg.group.clone())
                    .increment(1);
                self.publish_state(MemberState::Lost { reason });
                // Dropping the session closes the connection, which releases its locks.
                session = None;
            }
        }
    }

    async fn on_notification(&self, s: &Session, note: &Notification) -> Next {
        #[derive(serde::Deserialize)]
        struct Payload {
            group: String,
            generation: u64,
        }
        match serde_json::from_str::<Payload>(note.payload()) {
            Ok(p) if p.group != self.cfg.group => return Next::Continue,
            Ok(p) if p.generation == self.view.borrow().generation => return Next::Continue,
            _ => {}
        }
        self.refresh_or_lose(s).await
    }

    async fn on_heartbeat(&self, s: &Session) -> Next {
        match s
            .client
            .query_opt(
                "SELECT generation FROM shardlease.renew($1)",
                &[&s.incarnation],
            )
            .await
        {
            Ok(Some(row)) => {
                let generation: i64 = row.get(0);
                if generation as u64 != self.view.borrow().generation {
                    // A change whose NOTIFY we did not see: re-read (I6).
                    return self.refresh_or_lose(s).await;
                }
                Next::Continue
            }
            Ok(None) => {
                Next::Lost("the lease could not be renewed: it expired or was reaped".into())
            }
            Err(e) => self.db_error("renew", e),
        }
    }

    async fn on_crash_check(&self, s: &Session) -> Next {
        let needed = match s
            .client
            .query_one("SELECT shardlease.needs_reap($1)", &[&self.cfg.group])
            .await
        {
            Ok(row) => row.get::<_, bool>(0),
            Err(e) => return self.db_error("crash check", e),
        };
        if !needed {
            return Next::Continue;
        }
        match s
            .client
            .query(
                "SELECT member_id, slot, incarnation, reason, generation FROM shardlease.reap($1)",
                &[&self.cfg.group],
            )
            .await
        {
            Ok(rows) => {
                for row in &rows {
                    let member: &str = row.get(0);
                    let slot: i32 = row.get(1);
                    let reason: &str = row.get(3);
                    let generation: Option<i64> = row.get(4);
                    tracing::info!(group = %self.cfg.group, reaped = member, slot, reason, ?generation, by = %self.cfg.member_id, "reaped member");
                    metrics::counter!("shardlease_reaped_total", "group" => self.cfg.group.clone(), "reason" => reason.to_owned()).increment(1);
                }
                if rows.is_empty() {
                    Next::Continue
                } else {
                    self.refresh_or_lose(s).await
                }
            }
            Err(e) => self.db_error("reap", e),
        }
    }

    fn db_error(&self, what: &str, e: tokio_postgres::Error) -> Next {
        if e.is_closed() || e.code().is_none() {
            Next::Lost(format!("{what} failed: {e}"))
        } else {
            // Lock or statement timeout: bounded, try again at the next tick.
            tracing::warn!(group = %self.cfg.group, member = %self.cfg.member_id, error = %e, "{what} failed; retrying at the next tick");
            Next::Continue
        }
    }

    async fn refresh_or_lose(&self, s: &Session) -> Next {
        match self.refresh(s).await {
            Ok(()) if self.view.borrow().is_joined() => Next::Continue,
            Ok(()) => Next::Lost("this member's lease is no longer in the group".into()),
            Err(Error::Db(e)) => self.db_error("view refresh", e),
            Err(e) => Next::Lost(e.to_string()),
        }
    }

    /// Re-read the view from the tables, in one statement, and publish it if it changed.
    async fn refresh(&self, s: &Session) -> Result<()> {
        let rows = s
            .client
            .query(
                "SELECT g.generation, g.slot_count, l.member_id, l.slot, l.incarnation \
                 FROM shardlease.groups g \
                 LEFT JOIN shardlease.leases l ON l.group_name = g.name \
                 WHERE g.name = $1 ORDER BY l.slot",
                &[&self.cfg.group],
            )
            .await?;
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
            fence_timeout_ms: timeout_ms(self.cfg.statement_timeout()),
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
            let v = self.view.borrow();
            tracing::debug!(group = %v.group, member = %self.cfg.member_id, generation = v.generation, slot_count = v.slot_count, members = v.members.len(), "view changed");
            metrics::gauge!("shardlease_generation", "group" => v.group.clone())
                .set(v.generation as f64);
            metrics::gauge!("shardlease_members", "group" => v.group.clone())
                .set(v.members.len() as f64);
            metrics::counter!("shardlease_view_changes_total", "group" => v.group.clone())
                .increment(1);
        }
        Ok(())
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
        let backoff = ExponentialBuilder::default()
            .with_min_delay(Duration::from_millis(50))
            .with_max_delay(self.cfg.reconnect_max_backoff)
            .with_jitter()
            .without_max_times();
        let attempt = (|| self.open_session())
            .retry(backoff)
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
        let generation: Option<i64> = s
            .client
            .query_one("SELECT shardlease.leave($1)", &[&s.incarnation])
            .await?
            .get(0);
        s.client
            .execute(
                "SELECT pg_advisory_unlock($1, $2)",
                &[&s.lock_key, &(s.slot as i32)],
            )
            .await?;
        tracing::info!(group = %self.cfg.group, member = %self.cfg.member_id, slot = s.slot, ?generation, "left");
        Ok(())
    }
}

fn truncate(s: &str) -> String {
    let mut out = String::new();
    for c in s.chars() {
        if out.len() + c.len_utf8() > 63 {
            break;
        }
        out.push(c);
    }
    out
}
