//! One worker: join the group, tick the owned hash shards (the balanced shard table of the
//! view, as ranges of `work_items.key_hash`) at a fixed rate in fenced transactions, print
//! the watched ids every second, leave on shutdown.

use std::io::Write;
use std::time::{Duration, Instant};

use anyhow::Result;
use backon::{ExponentialBuilder, Retryable};
use shardlease::shard_table::{HashRanges, HASH_SHARDS};
use shardlease::tokio_postgres::Client;
use shardlease::DbConfig;
use shardlease::{Assignment, Member, MemberConfig, View};
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

/// Whether the worker is joined with a live lease, for /readyz.
pub type Readiness = watch::Receiver<bool>;

/// A readiness channel, not ready: [`run`] sends on it, the HTTP server reads it.
pub fn readiness() -> (watch::Sender<bool>, Readiness) {
    watch::channel(false)
}

/// Keep `ready` in step with the member's state (joined or not) until `stop`, then say
/// "not ready": a task of its own, so that /readyz follows a lost lease at once, even while
/// a tick runs.
fn follow_readiness(
    mut views: watch::Receiver<View>,
    ready: watch::Sender<bool>,
    stop: CancellationToken,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            let joined = views.borrow_and_update().is_joined();
            ready.send_if_modified(|r| std::mem::replace(r, joined) != joined);
            tokio::select! {
                _ = stop.cancelled() => break,
                changed = views.changed() => if changed.is_err() { break },
            }
        }
        ready.send_replace(false);
    })
}

/// Run until `shutdown`, then leave the group. Transient failures (database unreachable,
/// member id still held by a previous incarnation) are retried with backoff and reported.
pub async fn run(
    mut cfg: WorkerConfig,
    shutdown: CancellationToken,
    ready: watch::Sender<bool>,
) -> Result<()> {
    let member_id = cfg.member.member_id.clone();
    let Some(member) = until_shutdown(&shutdown, join(&cfg)).await else {
        return Ok(());
    };
    let member = member?;
    let stop_readiness = shutdown.child_token();
    let readiness = follow_readiness(member.watch(), ready, stop_readiness.clone());
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
    let mut follow_up: Option<(tokio::time::Instant, Vec<u32>)> = None;
    // Only the view-change branch adopts views (and so knows what was gained); start from
    // the view we joined with.
    state.adopt(&member.view(), member.member_id());
    let mut adopted_at = tokio::time::Instant::now();
    // A view change that comes within ADOPT_GAP of the last adoption waits for the gap to end
    // (`adopt_at`), together with any that follow it.
    let mut adopt_at: Option<tokio::time::Instant> = None;
    loop {
        let follow_up_at = follow_up.as_ref().map(|(at, _)| *at);
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            changed = views.changed() => {
                if changed.is_err() { break }
                state.view_changed_at = Some(Instant::now());
                let due = adopted_at + ADOPT_GAP;
                if tokio::time::Instant::now() < due {
                    adopt_at.get_or_insert(due);
                    continue;
                }
                adopted_at = tokio::time::Instant::now();
                if !adopt(&cfg, &member, &mut work, &mut state, &mut follow_up, &shutdown).await { break }
            }
            _ = async { tokio::time::sleep_until(adopt_at.expect("guarded")).await }, if adopt_at.is_some() => {
                adopt_at = None;
                adopted_at = tokio::time::Instant::now();
                if !adopt(&cfg, &member, &mut work, &mut state, &mut follow_up, &shutdown).await { break }
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
    // Not ready from here on: the leave follows.
    stop_readiness.cancel();
    let _ = readiness.await;
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

/// The least time between two adoptions of a new view. A burst of membership changes (a
/// cold start of hundreds of workers, a whole group rejoining after a restart) announces many
/// views a second; each adoption computes this member's shards, so the worker takes the first
/// view of a burst at once and then at most one every gap, the newest. Ticks always run on the
/// newest view (its fence), whatever was adopted last.
const ADOPT_GAP: Duration = Duration::from_millis(100);

/// Adopt the member's current view: shards it gained get a catch-up tick at once, and a
/// follow-up half a tick later for items their previous owner ticked too recently. False
/// when shutdown came first.
async fn adopt(
    cfg: &WorkerConfig,
    member: &Member,
    work: &mut Option<Client>,
    state: &mut TickState,
    follow_up: &mut Option<(tokio::time::Instant, Vec<u32>)>,
    shutdown: &CancellationToken,
) -> bool {
    let gained = state.adopt(&member.view(), member.member_id());
    if gained.is_empty() {
        return true;
    }
    // Every tick gives way to shutdown: a tick stuck behind a storm of membership changes
    // must not delay the leave (its transaction rolls back).
    let Some(caught_up) =
        until_shutdown(shutdown, tick(cfg, member, work, state, Some(&gained))).await
    else {
        return false;
    };
    // Some gained items were ticked by their previous owner too recently: tick them once
    // they are due.
    if caught_up.is_none_or(|r| r.incremented < r.watched) {
        *follow_up = Some((tokio::time::Instant::now() + cfg.tick / 2, gained));
    }
    true
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
    shardlease::backoff::jittered(Duration::from_millis(200), Duration::from_secs(5))
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
    /// The hash shards adopted last (ascending).
    shards: Vec<u32>,
    ownership: Ownership,
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

/// This member's hash shards, from the balanced shard table of the view's assignment:
/// computed once per membership change (a few milliseconds at 65,536 shards), not per tick.
#[derive(Debug, Default)]
struct Ownership {
    /// The assignment and slot `shards` was computed for.
    key: Option<(Assignment, u32)>,
    shards: Vec<u32>,
    /// `shards` as hash ranges, for the tick's statement.
    ranges: HashRanges,
}

impl Ownership {
    /// The hash shards `view` gives this member (ascending), and their ranges, when joined.
    fn of(&mut self, view: &View) -> Option<(&[u32], &HashRanges)> {
        let slot = view.my_slot()?;
        let assignment = view.assignment();
        if self.key.as_ref() != Some(&(assignment.clone(), slot)) {
            let table = assignment
                .shard_table(HASH_SHARDS)
                .expect("HASH_SHARDS is a valid shard count");
            self.shards = table.shards_of(slot);
            self.ranges = HashRanges::of_shards(&self.shards, HASH_SHARDS);
            self.key = Some((assignment, slot));
        }
        Some((&self.shards, &self.ranges))
    }
}

impl TickState {
    /// Take the owned shards of `view` as current; returns the shards gained.
    fn adopt(&mut self, view: &View, member_id: &str) -> Vec<u32> {
        let owned = self.ownership.of(view).map(|(s, _)| s.to_vec());
        let (gained, lost) = self.take(owned);
        if gained.is_empty() && lost == 0 {
            return gained;
        }
        tracing::info!(member = %member_id, generation = view.generation, slot = ?view.my_slot(), shards = self.shards.len(), gained = gained.len(), lost, "assignment changed");
        metrics::counter!("shardlease_worker_rebalances_total").increment(1);
        metrics::gauge!("shardlease_worker_owned_shards").set(self.shards.len() as f64);
        gained
    }

    /// Take `shards` as the owned ones (`None`: not joined, so none); returns the shards
    /// gained and how many were lost. A member that is not joined owns nothing, so that
    /// the shards a rejoin brings back, even to the same slot, count as gained and get
    /// their catch-up tick at once.
    fn take(&mut self, shards: Option<Vec<u32>>) -> (Vec<u32>, usize) {
        let shards = shards.unwrap_or_default();
        if shards == self.shards {
            return (Vec::new(), 0);
        }
        let gained: Vec<u32> = shards
            .iter()
            .filter(|s| self.shards.binary_search(s).is_err())
            .copied()
            .collect();
        let lost = self
            .shards
            .iter()
            .filter(|s| shards.binary_search(s).is_err())
            .count();
        self.shards = shards;
        (gained, lost)
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
    only: Option<&[u32]>,
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
        let (owned, all) = state.ownership.of(&view)?;
        let Some(ranges) = ranges_to_tick(owned, all, only) else {
            return Some(Ticked::default());
        };
        let client = work_connection(cfg, member_id, work).await?;
        let started = Instant::now();
        match cfg
            .items
            .tick(client, &fence, member_id, &ranges, cfg.tick / 2)
            .await
        {
            Ok(result) => return Some(state.record(&view, result, started, only.is_none())),
            Err(e) if e.is_fenced() => {
                metrics::counter!("shardlease_worker_ticks_total", "outcome" => "fenced")
                    .increment(1);
                tracing::debug!(member = %member_id, error = %e, "tick fenced; refreshing the view");
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

/// The hash ranges a tick covers: all the owned ones, or `only` those of the given shards
/// that are still owned (`None`: none is).
fn ranges_to_tick(owned: &[u32], all: &HashRanges, only: Option<&[u32]>) -> Option<HashRanges> {
    let Some(subset) = only else {
        return Some(all.clone());
    };
    let gained: Vec<u32> = subset
        .iter()
        .filter(|s| owned.binary_search(s).is_ok())
        .copied()
        .collect();
    (!gained.is_empty()).then(|| HashRanges::of_shards(&gained, HASH_SHARDS))
}

/// The work connection, opened again when it is closed; `None` (reported) when it cannot be.
async fn work_connection<'a>(
    cfg: &WorkerConfig,
    member_id: &str,
    work: &'a mut Option<Client>,
) -> Option<&'a mut Client> {
    if work.as_ref().is_some_and(|c| !c.is_closed()) {
        return work.as_mut();
    }
    match shardlease::connect_client(&cfg.work_pg, &format!("shardlease-worker {member_id} work"))
        .await
    {
        Ok(c) => {
            metrics::counter!("shardlease_worker_reconnects_total").increment(1);
            Some(work.insert(c))
        }
        Err(e) => {
            tracing::warn!(member = %member_id, error = %e, "work connection unavailable; skipping this tick");
            metrics::counter!("shardlease_worker_ticks_total", "outcome" => "error").increment(1);
            None
        }
    }
}

impl TickState {
    /// Record a tick that committed: its metrics, the take-over time after a view change,
    /// and, for a full tick (`whole`), what it watched.
    fn record(&mut self, view: &View, result: TickResult, started: Instant, whole: bool) -> Ticked {
        metrics::histogram!("shardlease_worker_tick_duration_seconds")
            .record(started.elapsed().as_secs_f64());
        metrics::counter!("shardlease_worker_ticks_total", "outcome" => "ok").increment(1);
        metrics::counter!("shardlease_worker_increments_total")
            .increment(result.incremented as u64);
        if self.last_generation != Some(view.generation) && result.incremented > 0 {
            if let (Some(_), Some(at)) = (self.last_generation, self.view_changed_at.take()) {
                metrics::histogram!("shardlease_worker_takeover_seconds")
                    .record(at.elapsed().as_secs_f64());
            }
            self.last_generation = Some(view.generation);
        }
        let ticked = Ticked {
            incremented: result.incremented,
            watched: result.watched.len(),
        };
        if whole {
            metrics::gauge!("shardlease_worker_owned_items").set(result.watched.len() as f64);
            self.last = result;
        }
        ticked
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_that_come_back_after_a_loss_count_as_gained() {
        let mut state = TickState::default();
        assert_eq!(state.take(Some(vec![1, 5, 9])), (vec![1, 5, 9], 0));
        assert_eq!(state.take(Some(vec![1, 5, 9])), (vec![], 0));
        // Lost: nothing is owned meanwhile.
        assert_eq!(state.take(None), (vec![], 3));
        assert!(state.shards.is_empty());
        // Rejoined into the same slot: every shard is gained again, for its catch-up tick.
        assert_eq!(state.take(Some(vec![1, 5, 9])), (vec![1, 5, 9], 0));
        // A rebalance: one shard moves away, one arrives.
        assert_eq!(state.take(Some(vec![1, 7, 9])), (vec![7], 1));
    }
}
