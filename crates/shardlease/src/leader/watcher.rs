//! A candidate's watcher: one connection of its own, on which one statement,
//! `shardlease.await_departure`, waits on the slot lock of the candidate it watches (the one
//! before it in the ring; the leader, for the leader's successor). The lock is granted the
//! instant that member's backend is gone, and the same statement reaps the group, on the
//! server: a crash is known within milliseconds, at no cost at rest but the re-armed wait.
//!
//! When the target changes, the waiting statement is cancelled (PostgreSQL's cancel
//! request) and the wait starts again on the new one; when the candidate stops, too, a
//! moment later.

use std::time::Duration;

use backon::BackoffBuilder;
use tokio::sync::watch;
use tokio_postgres::error::SqlState;
use tokio_postgres::{Client, Statement};
use tokio_util::sync::CancellationToken;

use crate::connect::{cancel, connect, DbConfig};
use crate::error::{classify, Doing, Result};
use crate::member::timeout_ms;
use crate::session::truncate;

use super::LeaderConfig;

/// The incarnation to watch, if any.
pub(crate) type Target = Option<i64>;

/// How long a cancel request may take before the connection is dropped instead.
const CANCEL_TIMEOUT: Duration = Duration::from_secs(2);

/// How long after the candidate stopped its wait is cancelled: out of the way of the
/// hand-over that a resignation starts.
const STOP_CANCEL_DELAY: Duration = Duration::from_millis(200);

pub(crate) struct Watcher {
    pg: DbConfig,
    group: String,
    member_id: String,
    /// One wait's bound (the watch period).
    wait: Duration,
    /// The reap's lock waits: a heartbeat.
    lock_timeout: Duration,
    /// Every statement's bound: the wait and a TTL.
    statement_timeout: Duration,
    /// The pause before waiting again on a target that departed (its lease stayed: the reap
    /// could not finish) or after an error: a heartbeat.
    retry: Duration,
    max_backoff: Duration,
    conn: Option<Conn>,
}

/// The watcher's connection and its prepared statement.
struct Conn {
    client: Client,
    await_departure: Statement,
}

impl Watcher {
    /// Open the watcher's connection (the first attempt's error is returned as is).
    pub(crate) async fn connect(pg: &DbConfig, cfg: &LeaderConfig) -> Result<Watcher> {
        let mut w = Watcher {
            pg: pg.clone(),
            group: cfg.group.clone(),
            member_id: cfg.member_id.clone(),
            wait: cfg.watch_period,
            lock_timeout: cfg.heartbeat,
            statement_timeout: cfg.watch_period + cfg.lease_ttl,
            retry: cfg.heartbeat,
            max_backoff: cfg.reconnect_max_backoff,
            conn: None,
        };
        w.conn = Some(w.open().await?);
        Ok(w)
    }

    async fn open(&self) -> Result<Conn> {
        let app = truncate(&format!(
            "shardlease {}/{} watcher",
            self.group, self.member_id
        ));
        let (client, _notifications) = connect(&self.pg, &app).await?;
        let doing = || {
            format!(
                "setting up the watcher of {}/{}",
                self.group, self.member_id
            )
        };
        client
            .batch_execute(&format!(
                "SET lock_timeout = {}; SET statement_timeout = {}; \
                 SET idle_in_transaction_session_timeout = {}",
                timeout_ms(self.lock_timeout),
                timeout_ms(self.statement_timeout),
                timeout_ms(self.statement_timeout),
            ))
            .await
            .doing(doing)?;
        // PostgreSQL 14 and later: a backend whose client died while it waits notices within
        // a second and ends, instead of waiting on. Older servers lack the setting (harmless).
        if let Err(e) = client
            .batch_execute("SET client_connection_check_interval = 1000")
            .await
        {
            tracing::debug!(group = %self.group, member = %self.member_id, error = %e, "no client_connection_check_interval");
        }
        let await_departure = client
            .prepare(
                "SELECT status, reaped FROM shardlease.await_departure($1::text, $2::bigint, $3::integer, $4::integer)",
            )
            .await
            .map_err(|e| classify(e, &self.group, &self.member_id, &doing()))?;
        Ok(Conn {
            client,
            await_departure,
        })
    }

    /// Watch whatever `targets` says until `stop`.
    pub(crate) async fn run(
        mut self,
        mut targets: watch::Receiver<Target>,
        stop: CancellationToken,
    ) {
        loop {
            let target = *targets.borrow_and_update();
            let go_on = match target {
                None => self.pause(None, &mut targets, &stop).await,
                Some(incarnation) => self.watch(incarnation, &mut targets, &stop).await,
            };
            if !go_on {
                break;
            }
        }
        tracing::debug!(group = %self.group, member = %self.member_id, "watcher stopped");
    }

    /// One wait on the lock of lease `incarnation`, and what its end calls for; false on stop.
    async fn watch(
        &mut self,
        incarnation: i64,
        targets: &mut watch::Receiver<Target>,
        stop: &CancellationToken,
    ) -> bool {
        if self.conn.is_none() {
            match self.reconnect(stop).await {
                Some(conn) => self.conn = Some(conn),
                None => return false,
            }
        }
        let Some(conn) = self.conn.as_ref() else {
            return true;
        };
        let token = conn.client.cancel_token();
        let (wait_ms, lock_ms) = (timeout_ms(self.wait), timeout_ms(self.lock_timeout));
        let params: [&(dyn tokio_postgres::types::ToSql + Sync); 4] =
            [&self.group, &incarnation, &wait_ms, &lock_ms];
        let wait = conn.client.query_one(&conn.await_departure, &params);
        let wake = tokio::select! {
            biased;
            _ = stop.cancelled() => Wake::Stop,
            changed = targets.changed() => match changed {
                Ok(()) => Wake::Retarget,
                Err(_) => Wake::Stop,
            },
            row = wait => Wake::Done(row),
        };
        let row = match wake {
            // Stopped: cancel the wait, so that the backend does not linger on the lock
            // (the driver keeps a connection open until its last response). A moment later:
            // a cancel request costs the server a process, which a hand-over in progress
            // (this candidate's leave, its successor's new view) should not compete with.
            Wake::Stop => {
                let pg = self.pg.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(STOP_CANCEL_DELAY).await;
                    let _ = tokio::time::timeout(CANCEL_TIMEOUT, cancel(&pg, &token)).await;
                });
                return false;
            }
            // A new target: cancel this wait; the next one starts at once.
            Wake::Retarget => {
                self.cancel(&token).await;
                return true;
            }
            Wake::Done(row) => row,
        };
        match row {
            Ok(row) => match row.get::<_, &str>(0) {
                // Still held after the watch period: wait again.
                "waiting" => true,
                "departed" => {
                    let reaped: i32 = row.get(1);
                    tracing::info!(group = %self.group, member = %self.member_id, watched = incarnation, reaped, "the watched member is gone");
                    // The view changes next (the target with it); if the lease stayed (the
                    // reap could not finish), wait again a heartbeat later, not at once.
                    self.pause(Some(self.retry), targets, stop).await
                }
                // No such lease: the view is behind; wait for the next target.
                _ => {
                    tracing::debug!(group = %self.group, member = %self.member_id, watched = incarnation, "the watched lease is gone already");
                    self.pause(Some(self.retry), targets, stop).await
                }
            },
            // A cancel that arrived late, after the wait it was meant for: wait again.
            Err(e) if e.code() == Some(&SqlState::QUERY_CANCELED) => true,
            Err(e) => {
                let broken = e.is_closed() || e.code().is_none();
                let err = crate::Error::Db {
                    doing: format!(
                        "watching lease {incarnation} of group {:?} (as {})",
                        self.group, self.member_id
                    ),
                    source: e,
                };
                tracing::warn!(group = %self.group, member = %self.member_id, error = %err, "the watch failed; retrying");
                if broken {
                    self.conn = None;
                    true
                } else {
                    self.pause(Some(self.retry), targets, stop).await
                }
            }
        }
    }

    /// Wait until the target changes, `pause` passes (if given) or `stop`; false on stop.
    async fn pause(
        &self,
        pause: Option<Duration>,
        targets: &mut watch::Receiver<Target>,
        stop: &CancellationToken,
    ) -> bool {
        let sleep = async {
            match pause {
                Some(d) => tokio::time::sleep(d).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = stop.cancelled() => false,
            changed = targets.changed() => changed.is_ok(),
            _ = sleep => true,
        }
    }

    /// Cancel the statement running on the connection; drop the connection if the cancel
    /// request fails, so that no wait outlives its target by more than its watch period.
    async fn cancel(&mut self, token: &tokio_postgres::CancelToken) {
        match tokio::time::timeout(CANCEL_TIMEOUT, cancel(&self.pg, token)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::debug!(group = %self.group, member = %self.member_id, error = %e, "cancel request failed; reconnecting the watcher");
                self.conn = None;
            }
            Err(_) => {
                tracing::debug!(group = %self.group, member = %self.member_id, "cancel request timed out; reconnecting the watcher");
                self.conn = None;
            }
        }
    }

    /// Reconnect with capped, jittered exponential backoff until it works (`Some`) or `stop`.
    async fn reconnect(&self, stop: &CancellationToken) -> Option<Conn> {
        let mut delays =
            crate::backoff::jittered(Duration::from_millis(50), self.max_backoff).build();
        loop {
            match self.open().await {
                Ok(conn) => return Some(conn),
                Err(e) => {
                    let delay = delays.next().unwrap_or(self.max_backoff);
                    tracing::warn!(group = %self.group, member = %self.member_id, error = %e, retry_in = ?delay, "the watcher cannot connect; crashes are noticed by the heartbeat meanwhile");
                    tokio::select! {
                        _ = stop.cancelled() => return None,
                        _ = tokio::time::sleep(delay) => {}
                    }
                }
            }
        }
    }
}

/// What ended a wait.
enum Wake {
    Stop,
    Retarget,
    Done(std::result::Result<tokio_postgres::Row, tokio_postgres::Error>),
}
