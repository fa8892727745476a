//! One worker: join the group, tick the owned shards at a fixed rate in fenced
//! transactions, print the watched ids every second, leave on shutdown.

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Result;
use backon::{ExponentialBuilder, Retryable};
use shardlease::hash::SHARDS;
use shardlease::tokio_postgres::Client;
use shardlease::DbConfig;
use shardlease::{Member, MemberConfig, View};
use tokio::sync::watch;
use tokio::time::{interval, MissedTickBehavior};
use tokio_util::sync::CancellationToken;

use crate::items::{Items, TickResult};
use crate::printer::Printer;

/// How a worker runs.
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    /// Where the database is, for the member's session connection (advisory lock, LISTEN,
    /// heartbeat): directly, or through a session-mode pool.
    pub pg: DbConfig,
    /// Where the work connection goes (the fenced ticks): the same database, possibly
    /// through a transaction pooler.
    pub work_pg: DbConfig,
    /// Group, member id and lease timings.
    pub member: MemberConfig,
    /// Tick interval.
    pub tick: Duration,
    /// The table.
    pub items: Items,
    /// Print the watched ids every second (the demo prints its own summary instead).
    pub print: Option<Printer>,
}

/// The member's view, once joined, for /readyz.
pub type Readiness = Arc<Mutex<Option<watch::Receiver<View>>>>;

/// True when the worker is joined with a valid lease.
pub fn is_ready(r: &Readiness) -> bool {
    r.lock()
        .ok()
        .and_then(|g| g.as_ref().map(|v| v.borrow().is_joined()))
        .unwrap_or(false)
}

/// Run until `shutdown`, then leave the group. Transient failures (database unreachable,
/// member id still held by a previous incarnation) are retried with backoff and reported.
pub async fn run(
    mut cfg: WorkerConfig,
    shutdown: CancellationToken,
    ready: Readiness,
) -> Result<()> {
    let member_id = cfg.member.member_id.clone();
    let Some(member) = until_shutdown(&shutdown, join(&cfg)).await else {
        return Ok(());
    };
    let member = member?;
    *ready.lock().expect("readiness lock") = Some(member.watch());
    let mut work: Option<Client> = None;
    let mut state = TickState::default();
    let mut views = member.watch();
    let mut ticker = interval(cfg.tick);
    ticker.set_missed_tick_behavior(MissedTickBehavior::Skip);
    let mut printer_clock = interval(Duration::from_secs(1));
    printer_clock.set_missed_tick_behavior(MissedTickBehavior::Skip);
    // Shards gained by a view change get a catch-up tick at once, and one more half a tick
    // later for the items their previous owner ticked too recently: so that an item never
    // waits for this worker's next regular tick (at most 1.5 ticks across a hand-off).
    let mut follow_up: Option<(tokio::time::Instant, Vec<i32>)> = None;
    // Only the view-change branch adopts views (and so knows what was gained); start from
    // the view we joined with.
    state.adopt(&member.view(), member.member_id());
    loop {
        let follow_up_at = follow_up.as_ref().map(|(at, _)| *at);
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            changed = views.changed() => {
                if changed.is_err() { break }
                state.view_changed_at = Some(Instant::now());
                let gained = state.adopt(&member.view(), member.member_id());
                if !gained.is_empty() {
                    // Every tick gives way to shutdown: a tick stuck behind a storm of
                    // membership changes must not delay the leave (its transaction rolls back).
                    let Some(caught_up) = until_shutdown(&shutdown, tick(&cfg, &member, &mut work, &mut state, Some(&gained))).await else { break };
                    // Some gained items were ticked by their previous owner too recently:
                    // tick them once they are due.
                    if caught_up.is_none_or(|r| r.incremented < r.watched) {
                        follow_up = Some((tokio::time::Instant::now() + cfg.tick / 2, gained));
                    }
                }
            }
            _ = async { tokio::time::sleep_until(follow_up_at.expect("guarded")).await }, if follow_up_at.is_some() => {
                let (_, gained) = follow_up.take().expect("guarded");
                if until_shutdown(&shutdown, tick(&cfg, &member, &mut work, &mut state, Some(&gained))).await.is_none() { break }
            }
            _ = ticker.tick() => {
                if until_shutdown(&shutdown, tick(&cfg, &member, &mut work, &mut state, None)).await.is_none() { break }
            }
            _ = printer_clock.tick() => {
                if let Some(p) = cfg.print.as_mut() {
                    let line = describe(&member.view(), &member_id, &state, p);
                    let mut out = std::io::stdout().lock();
                    let _ = writeln!(out, "{line}");
                    let _ = out.flush();
                }
            }
        }
    }
    *ready.lock().expect("readiness lock") = None;
    // Leave promptly so that the others take over at once; the lease would expire anyway.
    match tokio::time::timeout(Duration::from_millis(1500), member.leave()).await {
        Ok(Ok(())) => tracing::info!(member = %member_id, "left the group"),
        Ok(Err(e)) => {
            tracing::warn!(member = %member_id, error = %e, "leave failed; the lease will be reaped")
        }
        Err(_) => tracing::warn!(member = %member_id, "leave timed out; the lease will be reaped"),
    }
    Ok(())
}

async fn until_shutdown<T>(
    shutdown: &CancellationToken,
    f: impl std::future::Future<Output = T>,
) -> Option<T> {
    tokio::select! {
        _ = shutdown.cancelled() => None,
        v = f => Some(v),
    }
}

fn backoff() -> ExponentialBuilder {
    ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(200))
        .with_max_delay(Duration::from_secs(5))
        .with_jitter()
        .without_max_times()
}

async fn join(cfg: &WorkerConfig) -> Result<Member> {
    let target = shardlease::describe_target(&cfg.pg);
    let member = (|| Member::join(&cfg.pg, cfg.member.clone()))
        .retry(backoff())
        .when(|e: &shardlease::Error| e.is_transient())
        .notify(|e, delay| {
            tracing::warn!(member = %cfg.member.member_id, database = %target, error = %e, retry_in = ?delay, "cannot join yet; retrying");
        })
        .await?;
    Ok(member)
}

#[derive(Debug, Default)]
struct TickState {
    shards: Vec<i32>,
    last: TickResult,
    last_generation: Option<u64>,
    view_changed_at: Option<Instant>,
}

/// What a tick did.
#[derive(Debug, Default, Clone, Copy)]
struct Ticked {
    /// Items incremented.
    incremented: usize,
    /// Items in the ticked shards.
    watched: usize,
}

/// The shards `view` gives this member, when joined.
fn owned_shards(view: &View) -> Option<Vec<i32>> {
    let slot = view.my_slot()?;
    Some(
        view.assignment()
            .shards_of(slot, SHARDS)
            .into_iter()
            .map(|s| s as i32)
            .collect(),
    )
}

impl TickState {
    /// Take the owned shards of `view` as current; returns the shards gained.
    fn adopt(&mut self, view: &View, member_id: &str) -> Vec<i32> {
        let Some(shards) = owned_shards(view) else {
            return Vec::new();
        };
        if shards == self.shards {
            return Vec::new();
        }
        let gained: Vec<i32> = shards
            .iter()
            .filter(|s| self.shards.binary_search(s).is_err())
            .copied()
            .collect();
        let lost = self
            .shards
            .iter()
            .filter(|s| shards.binary_search(s).is_err())
            .count();
        tracing::info!(member = %member_id, generation = view.generation, slot = ?view.my_slot(), shards = shards.len(), gained = gained.len(), lost, "assignment changed");
        metrics::counter!("shardlease_worker_rebalances_total").increment(1);
        metrics::gauge!("shardlease_worker_owned_shards").set(shards.len() as f64);
        self.shards = shards;
        gained
    }
}

/// One tick: compute the owned shards from the current view and run the fenced update, on
/// all of them or `only` on those of them (a catch-up after a hand-off). A fenced refusal
/// waits for the newer view and retries within the same tick. Returns what the tick saw,
/// or `None` when it could not run.
async fn tick(
    cfg: &WorkerConfig,
    member: &Member,
    work: &mut Option<Client>,
    state: &mut TickState,
    only: Option<&[i32]>,
) -> Option<Ticked> {
    let member_id = member.member_id();
    for _attempt in 0..3 {
        let view = member.view();
        let (Some(_), Ok(fence)) = (view.my_slot(), view.fence()) else {
            metrics::counter!("shardlease_worker_ticks_total", "outcome" => "not_joined")
                .increment(1);
            return None;
        };
        // The shards of the very view the fence checks; a newer view than the one adopted
        // is pending in the watch channel, and the loop adopts it next.
        let owned = owned_shards(&view).unwrap_or_default();
        let shards: Vec<i32> = match only {
            None => owned,
            Some(subset) => subset
                .iter()
                .filter(|s| owned.binary_search(s).is_ok())
                .copied()
                .collect(),
        };
        if shards.is_empty() && only.is_some() {
            return Some(Ticked::default());
        }
        let client = match work {
            Some(c) if !c.is_closed() => c,
            _ => match shardlease::connect_client(
                &cfg.work_pg,
                &format!("shardlease-worker {member_id} work"),
            )
            .await
            {
                Ok(c) => {
                    metrics::counter!("shardlease_worker_reconnects_total").increment(1);
                    work.insert(c)
                }
                Err(e) => {
                    tracing::warn!(member = %member_id, error = %e, "work connection unavailable; skipping this tick");
                    metrics::counter!("shardlease_worker_ticks_total", "outcome" => "error")
                        .increment(1);
                    return None;
                }
            },
        };
        let started = Instant::now();
        match cfg
            .items
            .tick(client, &fence, member_id, &shards, cfg.tick / 2)
            .await
        {
            Ok(result) => {
                metrics::histogram!("shardlease_worker_tick_duration_seconds")
                    .record(started.elapsed().as_secs_f64());
                metrics::counter!("shardlease_worker_ticks_total", "outcome" => "ok").increment(1);
                metrics::counter!("shardlease_worker_increments_total")
                    .increment(result.incremented as u64);
                if state.last_generation != Some(view.generation) && result.incremented > 0 {
                    if let (Some(_), Some(at)) =
                        (state.last_generation, state.view_changed_at.take())
                    {
                        metrics::histogram!("shardlease_worker_takeover_seconds")
                            .record(at.elapsed().as_secs_f64());
                    }
                    state.last_generation = Some(view.generation);
                }
                let ticked = Ticked {
                    incremented: result.incremented,
                    watched: result.watched.len(),
                };
                if only.is_none() {
                    metrics::gauge!("shardlease_worker_owned_items")
                        .set(result.watched.len() as f64);
                    state.last = result;
                }
                return Some(ticked);
            }
            Err(e) if e.is_fenced() => {
                metrics::counter!("shardlease_worker_ticks_total", "outcome" => "fenced")
                    .increment(1);
                tracing::info!(member = %member_id, error = %e, "tick fenced; refreshing the view");
                member
                    .wait_for(Duration::from_millis(500), |v| {
                        v.generation != view.generation
                    })
                    .await;
            }
            Err(e) => {
                metrics::counter!("shardlease_worker_ticks_total", "outcome" => "error")
                    .increment(1);
                tracing::warn!(member = %member_id, error = %e, "tick failed");
                if work.as_ref().is_some_and(Client::is_closed) {
                    *work = None;
                }
                return None;
            }
        }
    }
    None
}

fn describe(view: &View, member_id: &str, state: &TickState, printer: &mut Printer) -> String {
    match view.my_slot() {
        Some(slot) => printer.line(
            &format!(
                "[{member_id} gen={} slot={slot} shards={}]",
                view.generation,
                state.shards.len()
            ),
            &state.last.watched,
        ),
        None => format!(
            "[{member_id}] not joined ({:?}); watching nothing",
            view.state
        ),
    }
}
