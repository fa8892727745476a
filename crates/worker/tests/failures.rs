//! The worker under failures, with real PostgreSQL and real `shardlease-worker` processes:
//! steady state and a join, kill -9, SIGTERM, SIGSTOP past the TTL, rows inserted and
//! deleted mid-run. Every scenario ends with the audit invariants (`check_audit`).
//! `sigterm_late_in_the_leavers_second_keeps_the_cadence` is the adversarial graceful leave
//! that caught the catch-up-tick bug (see its comment).
//!
//! Settings: heartbeat 500 ms, lease TTL 3 s, tick 1 s, crash check 100 ms (the default).

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::*;
use shardlease::tokio_postgres::Client;
use uuid::Uuid;

/// Items per scenario.
const ITEMS: u64 = 300;

/// Allowance for crash detection, seconds: the design's target is 250 ms at p99 from the
/// connection's death to the reap (survivors poll for a released advisory lock every
/// `--crash-check`, 100 ms here); doubled for a loaded 2-core test machine.
const DETECT: f64 = 0.5;

fn start(db: &TestDb, names: &[&str], extra: &[&str]) -> Vec<Worker> {
    names.iter().map(|n| db.worker(n, extra)).collect()
}

/// Wait for an increment by `worker` newer than any so far, and return its tick time.
/// Used to time a signal right after the victim's tick, so that the measured gaps are
/// dominated by the take-over and not by where in its second the victim was hit.
async fn fresh_tick_of(c: &Client, worker: &str) -> f64 {
    let last = || async {
        c.query_one(
            "SELECT coalesce(extract(epoch FROM max(at))::float8, 0) FROM public.test_audit WHERE worker = $1",
            &[&worker],
        )
        .await
        .expect("read the audit table")
        .get::<_, f64>(0)
    };
    let before = last().await;
    poll_until(
        Duration::from_secs(5),
        &format!("a fresh tick by {worker}"),
        || async {
            let seen = last().await;
            (seen > before).then_some(seen)
        },
    )
    .await
}

/// Every item of `before` owned by `survivor` is still its own in `after`.
fn assert_kept(before: &Owners, after: &Owners, survivor: &str, event: &str) {
    let had = before.items_of(survivor);
    let has = after.items_of(survivor);
    let lost: Vec<&Uuid> = had.difference(&has).collect();
    assert!(
        lost.is_empty(),
        "after {event}, survivor {survivor} lost {} of its {} items (I3: only the departed member's keys move), e.g. {:?} now owned by {:?}",
        lost.len(),
        had.len(),
        lost.first(),
        lost.first().map(|id| &after.of[*id])
    );
}

#[tokio::test]
async fn every_item_ticks_under_exactly_one_worker_and_a_joiner_takes_only_its_own() {
    let db = TestDb::with_items(ITEMS).await;
    let c = db.client().await;
    let _ws = start(&db, &["w1", "w2", "w3"], &[]);
    wait_settled(&c, &["w1", "w2", "w3"], Duration::from_secs(30)).await;

    // 1. Steady state: over ~3 s, every item is incremented by exactly one worker
    // (quiet_window asserts it), so the workers' sets are disjoint and cover all items.
    let before = quiet_window(&c, 3.0, "steady state, 3 workers").await;
    assert_eq!(
        before.of.len() as u64,
        ITEMS,
        "steady state: every item has an owner"
    );
    let sizes = before.sizes();
    assert_eq!(
        sizes.keys().map(String::as_str).collect::<Vec<_>>(),
        ["w1", "w2", "w3"],
        "steady state: every worker owns items: {sizes:?}"
    );
    let window = before.to - before.from;
    for (id, n) in &before.counts {
        assert!(
            (2..=4).contains(n),
            "steady state: item {id} was incremented {n} times in {window:.2} s; about once per second expected"
        );
    }
    eprintln!("steady state: items per worker {sizes:?} over {window:.2} s");

    // 4. A new worker: only items moving onto it change owner.
    let _w4 = db.worker("w4", &[]);
    wait_settled(&c, &["w1", "w2", "w3", "w4"], Duration::from_secs(20)).await;
    let after = quiet_window(&c, 2.0, "after w4 joined").await;
    let mut moved = 0;
    for (id, now) in &after.of {
        let was = &before.of[id];
        if now != was {
            moved += 1;
            assert_eq!(
                now, "w4",
                "after w4 joined, item {id} moved from {was} to {now}: a join may move keys only onto the joiner"
            );
        }
    }
    let w4 = after.items_of("w4").len();
    assert!(w4 > 0, "w4 joined but owns no item");
    // I4: max/mean <= 1 + 5·sqrt(w/K).
    let mean = ITEMS as f64 / 4.0;
    let limit = mean * (1.0 + 5.0 * (4.0 / ITEMS as f64).sqrt());
    for (w, n) in after.sizes() {
        assert!(
            (n as f64) <= limit,
            "after w4 joined, {w} owns {n} items, above the balance bound {limit:.0}"
        );
    }
    assert_eq!(
        moved, w4,
        "every moved item went to w4, and w4 got only moved items"
    );
    eprintln!(
        "join: {moved} of {ITEMS} items moved, all onto w4; sizes {:?}",
        after.sizes()
    );

    check_audit(&c, "steady state and join", &[], &BTreeSet::new()).await;
}

#[tokio::test]
async fn kill_9_survivors_take_over_and_the_restarted_worker_gets_its_items_back() {
    let db = TestDb::with_items(ITEMS).await;
    let c = db.client().await;
    let mut ws = start(&db, &["w1", "w2", "w3"], &[]);
    wait_settled(&c, &["w1", "w2", "w3"], Duration::from_secs(30)).await;
    let before = quiet_window(&c, 2.0, "before kill -9").await;
    let victim_items = before.items_of("w2");

    fresh_tick_of(&c, "w2").await;
    let killed_at = db_now(&c).await;
    ws[1].kill9();
    wait_settled(&c, &["w1", "w3"], Duration::from_secs(10)).await;
    let (_, reaped_at) = generation(&c).await;
    let detection = reaped_at - killed_at;

    let after = quiet_window(&c, 2.0, "after kill -9 of w2").await;
    for s in ["w1", "w3"] {
        assert_kept(&before, &after, s, "kill -9 of w2");
        let gained = after.items_of(s).intersection(&victim_items).count();
        assert!(gained > 0, "after kill -9 of w2, survivor {s} took none of w2's {} items: they must spread over the survivors", victim_items.len());
    }

    let a = audit(&c).await;
    let t = takeover(&a, "w2", killed_at);
    eprintln!(
        "kill -9: crash detected and reaped {:.0} ms after the kill; take-over gap (last increment by w2 -> first by the new owner) max {:.0} ms over {} items; kill -> first take-over increment max {:.0} ms",
        detection * 1e3,
        t.max_gap * 1e3,
        t.items,
        t.max_after_event * 1e3
    );
    assert_eq!(
        t.items,
        victim_items.len(),
        "every item of w2 was taken over"
    );
    // The survivors tick gained shards as soon as the reap's view arrives (the kill comes
    // right after w2's tick, so its items are due 0.5 s later): the first take-over increment
    // comes within that 0.5 s, plus crash detection (target 250 ms), plus slack for load.
    assert!(
        t.max_after_event <= 0.5 + 0.25 + SLACK,
        "kill -9: an item of w2 waited {:.3} s after the kill for its new owner",
        t.max_after_event
    );
    assert!(
        detection <= DETECT,
        "kill -9: the survivors reaped w2 {detection:.3} s after the kill; crash detection must take well under a second (allowance {DETECT} s)"
    );
    // The victim ticked its items `max_before_event` before it died; the survivors notice
    // within DETECT and work the items at their next tick, at most one tick later (and no
    // earlier than tick/2 after the victim's increment, hence the 1.5 tick floor).
    let bound = (t.max_before_event + DETECT + TICK).max(1.5 * TICK) + SLACK;
    assert!(
        t.max_gap <= bound,
        "kill -9: an item of w2 waited {:.3} s for its new owner (bound {bound:.3} s)",
        t.max_gap
    );
    let excuse = Excuse {
        victim: "w2".into(),
        event: killed_at,
        until: killed_at,
        bound,
        why: "crash take-over: the victim's last tick, detection, then the survivor's next tick",
    };

    // w2 restarts under its own name (as a pod of a StatefulSet would): its slot was kept
    // for it, so it gets exactly its former items back, and nobody else's (I3: refilling a
    // vacated slot restores the assignment).
    let _w2 = db.worker("w2", &[]);
    wait_settled(&c, &["w1", "w2", "w3"], Duration::from_secs(20)).await;
    let refilled = quiet_window(&c, 2.0, "after w2 came back").await;
    assert_eq!(
        refilled.items_of("w2"),
        victim_items,
        "the restarted w2 got its kept slot back: it must own exactly its former items"
    );
    for s in ["w1", "w3"] {
        assert_eq!(
            refilled.items_of(s),
            before.items_of(s),
            "after w2 came back, {s} must own exactly its items from before the kill"
        );
    }

    check_audit(&c, "kill -9 then refill", &[excuse], &BTreeSet::new()).await;
}

#[tokio::test]
async fn sigterm_leaves_promptly_and_only_the_leavers_items_move() {
    let db = TestDb::with_items(ITEMS).await;
    let c = db.client().await;
    let mut ws = start(&db, &["w1", "w2", "w3"], &[]);
    wait_settled(&c, &["w1", "w2", "w3"], Duration::from_secs(30)).await;
    let before = quiet_window(&c, 2.0, "before SIGTERM").await;
    let leaver_items = before.items_of("w3");

    // Leave right after a tick of the leaver: the survivors then work its items at their
    // next tick, within about a second. (Leaving late in the leaver's second is the
    // adversarial case: see `sigterm_late_in_the_leavers_second_keeps_the_cadence`.)
    fresh_tick_of(&c, "w3").await;
    let term_at = db_now(&c).await;
    let sent = std::time::Instant::now();
    ws[2].signal("TERM");
    let status = ws[2].wait_exit(Duration::from_secs(2)).await;
    let exit_after = sent.elapsed();
    assert_eq!(
        status.code(),
        Some(0),
        "SIGTERM: the worker must exit 0, got {status}"
    );
    wait_settled(&c, &["w1", "w2"], Duration::from_secs(10)).await;
    let (_, left_at) = generation(&c).await;

    let after = quiet_window(&c, 2.0, "after SIGTERM of w3").await;
    for s in ["w1", "w2"] {
        assert_kept(&before, &after, s, "SIGTERM of w3");
    }
    let a = audit(&c).await;
    let t = takeover(&a, "w3", term_at);
    eprintln!(
        "SIGTERM: exited 0 after {:.0} ms, left the group {:.0} ms after the signal; take-over gap max {:.0} ms over {} items (signal {:.0} ms after w3's last increment; signal -> first take-over increment max {:.0} ms)",
        exit_after.as_secs_f64() * 1e3,
        (left_at - term_at) * 1e3,
        t.max_gap * 1e3,
        t.items,
        t.max_before_event * 1e3,
        t.max_after_event * 1e3
    );
    assert_eq!(
        t.items,
        leaver_items.len(),
        "every item of w3 was taken over"
    );
    assert!(
        left_at - term_at <= 1.0,
        "SIGTERM: the leave committed {:.3} s after the signal",
        left_at - term_at
    );
    // The survivors tick gained shards at once, and again when the items the leaver ticked
    // just before the signal become due (0.5 s after that tick): not at their next regular tick.
    assert!(
        t.max_after_event <= 0.5 + 0.1 + SLACK,
        "SIGTERM: an item of w3 waited {:.3} s after the signal for its new owner",
        t.max_after_event
    );
    // A graceful leave is a hand-off: the cadence bound applies without excuse.
    check_audit(&c, "SIGTERM", &[], &BTreeSet::new()).await;
}

#[tokio::test]
async fn sigstop_past_the_ttl_is_fenced_and_rejoins_after_sigcont() {
    let db = TestDb::with_items(ITEMS).await;
    let c = db.client().await;
    let ws = start(&db, &["w1", "w2", "w3"], &[]);
    wait_settled(&c, &["w1", "w2", "w3"], Duration::from_secs(30)).await;
    let before = quiet_window(&c, 2.0, "before SIGSTOP").await;
    let stopped_items = before.items_of("w2");
    let old = lease_of(&c, "w2").await.expect("w2 holds a lease");

    fresh_tick_of(&c, "w2").await;
    let stopped_at = db_now(&c).await;
    ws[1].signal("STOP");
    // The stopped w2 renews no more, but a heartbeat it sent just before the stop may still
    // extend its lease on the server: follow the lease until the reaper deletes it, and keep
    // the last expiry it showed (database clock).
    let last_expiry = std::cell::Cell::new(f64::MIN);
    poll_until(
        Duration::from_secs_f64(TTL + 10.0),
        "the stopped w2's lease to be reaped",
        || {
            let (c, last_expiry) = (&c, &last_expiry);
            async move {
                let expiry: Option<f64> = c
                    .query_opt(
                        "SELECT extract(epoch FROM expires_at)::float8 FROM shardlease.leases \
                         WHERE group_name = $1 AND member_id = 'w2'",
                        &[&GROUP],
                    )
                    .await
                    .expect("read w2's lease")
                    .map(|r| r.get(0));
                match expiry {
                    Some(e) => {
                        last_expiry.set(last_expiry.get().max(e));
                        None
                    }
                    None => Some(()),
                }
            }
        },
    )
    .await;
    let last_expiry = last_expiry.get();
    wait_settled(&c, &["w1", "w3"], Duration::from_secs_f64(TTL + 10.0)).await;
    let (_, reaped_at) = generation(&c).await;
    let hang_detection = reaped_at - stopped_at;
    let a = audit(&c).await;
    let t = takeover(&a, "w2", stopped_at);
    eprintln!(
        "SIGSTOP: w2 reaped {:.0} ms after the stop (TTL {TTL} s); take-over gap max {:.0} ms over {} items",
        hang_detection * 1e3,
        t.max_gap * 1e3,
        t.items
    );
    assert_eq!(
        t.items,
        stopped_items.len(),
        "every item of the stopped w2 was taken over"
    );
    // Never reaped before its lease expired by the database clock, and soon after it.
    assert!(
        reaped_at >= last_expiry,
        "SIGSTOP: w2 was reaped {:.3} s before its lease expired",
        last_expiry - reaped_at
    );
    assert!(
        reaped_at <= last_expiry + DETECT,
        "SIGSTOP: w2 was reaped {:.3} s after its lease expired (allowed: {DETECT} s)",
        reaped_at - last_expiry
    );
    // A heartbeat extends the lease once less than TTL - 1.5 heartbeats is left, so every
    // other beat (0.5 s here): at the stop the lease had between TTL - 1 s and TTL left.
    assert!(
        (TTL - 1.0 - SLACK..=TTL + DETECT).contains(&hang_detection),
        "SIGSTOP: w2 was reaped {hang_detection:.3} s after the stop; expected after its lease expired, within TTL {TTL} s (+{DETECT} s)"
    );
    let resumed_at = db_now(&c).await;
    ws[1].signal("CONT");
    let new = poll_until(
        Duration::from_secs(20),
        "w2 to rejoin as a new incarnation after SIGCONT",
        || async {
            lease_of(&c, "w2")
                .await
                .filter(|l| l.alive && l.incarnation != old.incarnation)
        },
    )
    .await;
    wait_settled(&c, &["w1", "w2", "w3"], Duration::from_secs(20)).await;
    let after = quiet_window(&c, 2.0, "after w2 rejoined").await;
    eprintln!(
        "SIGSTOP: after SIGCONT, w2 rejoined {:.0} ms later as incarnation {} (was {}), slot {} (was {})",
        (new.joined_at - resumed_at) * 1e3,
        new.incarnation,
        old.incarnation,
        new.slot,
        old.slot
    );
    for l in ws[1].stderr().iter().filter(|l| {
        l.contains("fenced") || l.contains("lost") || l.contains("Lost") || l.contains("rejoin")
    }) {
        eprintln!(
            "SIGSTOP: w2 after SIGCONT: {}",
            l.chars().take(300).collect::<String>()
        );
    }
    assert_eq!(
        after.items_of("w2"),
        stopped_items,
        "w2 rejoined into its vacated slot: it must own exactly its former items again"
    );

    // I1: nothing written by w2 under its old view after the stop. Every increment by w2
    // with a tick time after its last one before the stop belongs to the new incarnation
    // (tick started after the rejoin) and to an item it owns under the new generation.
    let a = audit(&c).await;
    for (id, incs) in &a {
        for i in incs
            .iter()
            .filter(|i| i.worker == "w2" && i.at > stopped_at)
        {
            assert!(
                i.at >= new.joined_at,
                "I1: w2 incremented item {id} (value {}) with a tick started {:.3} s after the stop and {:.3} s before it rejoined: a write under its stale view",
                i.value,
                i.at - stopped_at,
                new.joined_at - i.at
            );
            assert!(
                after.items_of("w2").contains(id),
                "I1: after rejoining, w2 incremented item {id}, which it does not own under the new generation"
            );
        }
    }
    let excuse = Excuse {
        victim: "w2".into(),
        event: stopped_at,
        until: stopped_at,
        bound: t.max_before_event + TTL + DETECT + TICK + SLACK,
        why:
            "hang take-over: the lease expires by the database clock, then the survivor's next tick",
    };
    assert!(
        t.max_gap <= excuse.bound,
        "SIGSTOP: an item of w2 waited {:.3} s for its new owner (bound {:.3} s: TTL, reap, next tick)",
        t.max_gap,
        excuse.bound
    );
    check_audit(&c, "SIGSTOP and SIGCONT", &[excuse], &BTreeSet::new()).await;
}

#[tokio::test]
async fn rows_inserted_and_deleted_mid_run() {
    let db = TestDb::with_items(ITEMS).await;
    let c = db.client().await;
    let names = ["w1", "w2", "w3"];
    let ws = start(&db, &names, &["--print-all-ids"]);
    wait_settled(&c, &names, Duration::from_secs(30)).await;
    let owners = quiet_window(&c, 2.0, "before the inserts").await;

    // The printed ids: sorted, stable while nothing changes, and the worker's own items.
    for w in &ws {
        let from = w.stdout().len();
        let (i, first) = w
            .wait_stdout(from, "a watched-id line", Duration::from_secs(3), |l| {
                l.contains("watching")
            })
            .await;
        let (_, second) = w
            .wait_stdout(
                i + 1,
                "a second watched-id line",
                Duration::from_secs(3),
                |l| l.contains("watching"),
            )
            .await;
        assert_eq!(
            first, second,
            "{}: the watched-id line must be stable while nothing changes",
            w.name
        );
        let (_, ids) =
            parse_ids(&first).unwrap_or_else(|| panic!("{}: unexpected line {first:?}", w.name));
        let mut sorted = ids.clone();
        sorted.sort();
        assert_eq!(
            ids, sorted,
            "{}: the watched ids must be printed sorted",
            w.name
        );
        let own: Vec<Uuid> = owners.items_of(&w.name).into_iter().collect();
        assert_eq!(
            ids, own,
            "{}: the printed ids must be exactly the items it increments",
            w.name
        );
    }

    // Inserted rows are ticked at the next tick, without a restart.
    let inserted_at = db_now(&c).await;
    let new_ids: BTreeSet<Uuid> = c
        .query("INSERT INTO public.work_items (value) SELECT 0 FROM generate_series(1, 6) RETURNING id", &[])
        .await
        .expect("insert rows")
        .iter()
        .map(|r| r.get(0))
        .collect();
    eventually(
        Duration::from_secs(3),
        "the 6 inserted rows to be incremented",
        || async {
            let a = audit(&c).await;
            new_ids.iter().all(|id| a.contains_key(id))
        },
    )
    .await;
    let a = audit(&c).await;
    let first = new_ids
        .iter()
        .map(|id| a[id][0].at - inserted_at)
        .fold(0.0f64, f64::max);
    eprintln!(
        "insert: every new row incremented within {:.0} ms of the insert",
        first * 1e3
    );
    assert!(
        first <= TICK + SLACK,
        "insert: a new row waited {first:.3} s for its first increment; the next tick (within {TICK} s) must take it"
    );
    for id in &new_ids {
        let owner = &a[id][0].worker;
        let w = ws
            .iter()
            .find(|w| &w.name == owner)
            .expect("owner is a worker");
        w.wait_stdout(
            0,
            &format!("a line with the inserted id {id}"),
            Duration::from_secs(3),
            |l| parse_ids(l).is_some_and(|(_, ids)| ids.contains(id)),
        )
        .await;
    }

    // Deleted rows vanish from the printed ids at the next line after the next tick.
    let victims: Vec<Uuid> = owners.of.keys().step_by(50).copied().collect();
    let marks: Vec<usize> = ws.iter().map(|w| w.stdout().len()).collect();
    let n = c
        .execute(
            "DELETE FROM public.work_items WHERE id = ANY($1)",
            &[&victims],
        )
        .await
        .expect("delete rows");
    assert_eq!(n as usize, victims.len());
    let total = item_ids(&c).await.len();
    let mut seen = 0;
    for (w, mark) in ws.iter().zip(marks) {
        let (i, line) = w
            .wait_stdout(
                mark,
                "a line without the deleted ids",
                Duration::from_secs(3),
                |l| parse_ids(l).is_some_and(|(_, ids)| !victims.iter().any(|v| ids.contains(v))),
            )
            .await;
        seen += parse_ids(&line).expect("line").1.len();
        // And they stay gone.
        let (_, later) = w
            .wait_stdout(
                i + 1,
                "a later watched-id line",
                Duration::from_secs(3),
                |l| l.contains("watching"),
            )
            .await;
        let (_, ids) = parse_ids(&later).expect("line");
        assert!(
            !victims.iter().any(|v| ids.contains(v)),
            "{}: a deleted id came back in {later:?}",
            w.name
        );
    }
    assert_eq!(
        seen, total,
        "after the delete, the printed lists together must hold every remaining item once"
    );
    check_audit(
        &c,
        "inserts and deletes",
        &[],
        &victims.into_iter().collect(),
    )
    .await;
}

/// The adversarial graceful leave. Two workers tick ~0.75 s apart: the survivor at
/// t0 + 0.75 s, the leaver at t0 and t0 + 1 s. The leaver gets SIGTERM right after the
/// survivor's tick and leaves at once. Were the survivor to take the leaver's items only at
/// its next regular tick (t0 + 1.75 s), they would wait ~1.75 s, above the 1.5 s the design
/// promises across hand-offs. The worker therefore ticks gained shards at once on the view
/// change (and again half a tick later for items not yet due); this test failed every run
/// before that (1.73–1.79 s against a 1.65 s bound).
#[tokio::test]
async fn sigterm_late_in_the_leavers_second_keeps_the_cadence() {
    let db = TestDb::with_items(ITEMS).await;
    let c = db.client().await;
    let mut w1 = db.worker("w1", &[]);
    wait_settled(&c, &["w1"], Duration::from_secs(30)).await;

    // Start w2 so that its first tick (right after it joins, ~50 ms after the spawn) comes
    // ~0.8 s after a tick of w1 (the precondition below checks the phases).
    let t0 = fresh_tick_of(&c, "w1").await;
    let wait = t0 + 0.75 - db_now(&c).await;
    tokio::time::sleep(Duration::from_secs_f64(wait.max(0.0))).await;
    let mut w2 = db.worker("w2", &[]);
    wait_settled(&c, &["w1", "w2"], Duration::from_secs(20)).await;
    let p1 = fresh_tick_of(&c, "w1").await;
    let p2 = fresh_tick_of(&c, "w2").await;
    let r = (p2 - p1).rem_euclid(TICK);
    // The leaver is the worker whose tick comes r >= 0.5 s before the survivor's.
    let (leaver, survivor, r) = if r >= 0.5 {
        (&mut w1, "w2", r)
    } else {
        (&mut w2, "w1", TICK - r)
    };
    // The survivor's tick must come late enough in the leaver's second for the gap to show
    // (1 + r > 1.5 s + slack), and early enough for the leave to happen before the leaver's
    // own next tick.
    assert!(
        (0.65..=0.9).contains(&r),
        "precondition: the survivor's tick must come 0.65 to 0.9 s after the leaver's, got {r:.3} s"
    );
    let leaver_name = leaver.name.clone();

    fresh_tick_of(&c, survivor).await;
    let term_at = db_now(&c).await;
    leaver.signal("TERM");
    let status = leaver.wait_exit(Duration::from_secs(2)).await;
    assert_eq!(
        status.code(),
        Some(0),
        "SIGTERM: the worker must exit 0, got {status}"
    );
    wait_settled(&c, &[survivor], Duration::from_secs(10)).await;
    quiet_window(&c, 2.0, "after the late SIGTERM").await;
    let t = takeover(&audit(&c).await, &leaver_name, term_at);
    eprintln!(
        "late SIGTERM: survivor ticks {r:.3} s after the leaver; signal {:.0} ms after the leaver's last increment; take-over gap max {:.0} ms over {} items",
        t.max_before_event * 1e3,
        t.max_gap * 1e3,
        t.items
    );
    check_audit(&c, "late SIGTERM", &[], &BTreeSet::new()).await;
}
