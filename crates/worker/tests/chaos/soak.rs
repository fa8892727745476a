//! The soak's run: the cluster, the workers behind their proxies, the loop of quiet spells
//! and faults with the recovery after each, and the end (staleness, exits, panics).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use shardlease::tokio_postgres::Client;
use shardlease_testkit::PrivateServer;
use uuid::Uuid;

use crate::checks::{figures, install_chaos_tables};
use crate::common::{cli, db_now, install_audit, leases, poll_until, settled, Lease};
use crate::faults::{Fault, Member, Readiness, Snapshot};
use crate::{GAP_BOUND, ITEMS, NAMES, RECOVERY_BOUND, RESTART_MOVES_GOAL};

/// The soak's running record: violations and figures.
#[derive(Default)]
pub struct Record {
    pub violations: Vec<String>,
    /// Per kind: how many, and the slowest recovery.
    pub faults: BTreeMap<Fault, (usize, Duration)>,
    pub restarts: Vec<RestartFigure>,
    pub blackholes: Vec<Readiness>,
    pub sigterms: usize,
}

impl Record {
    pub fn fail(&mut self, what: String) {
        println!("chaos: VIOLATION: {what}");
        self.violations.push(what);
    }
}

/// What a PostgreSQL restart did to the assignment.
pub struct RestartFigure {
    pub moved: usize,
    pub items: usize,
    pub kept_slots: usize,
    pub back: Duration,
    pub slots: String,
}

/// How long the group took to recover after a fault was lifted.
pub struct Recovery {
    /// Until all 5 workers held live leases.
    pub back: Duration,
    /// Until, besides, every item was ticked since the last change, and every worker ticked
    /// since the fault was lifted.
    pub settled: Duration,
}

pub async fn connect(url: &str) -> Client {
    let pg = shardlease::parse_database_url(url).expect("the server URL parses");
    poll_until(
        Duration::from_secs(10),
        "a connection to the private server",
        || async { shardlease::connect_client(&pg, "chaos-test").await.ok() },
    )
    .await
}

/// Item id -> `currentworker`: the owners, once the group has settled.
pub async fn owners(c: &Client) -> BTreeMap<Uuid, String> {
    c.query(
        "SELECT id, coalesce(currentworker, '') FROM public.work_items",
        &[],
    )
    .await
    .expect("read the owners")
    .iter()
    .map(|r| (r.get(0), r.get(1)))
    .collect()
}

/// Wait until all 5 workers hold live leases, every item was ticked since the last
/// membership change, and every worker has ticked since `lifted` (database time).
pub async fn recover(c: &Client, lifted: f64) -> Result<Recovery, String> {
    let start = Instant::now();
    let names: Vec<String> = NAMES.iter().map(|s| s.to_string()).collect();
    let mut back = None;
    loop {
        let ls = leases(c).await;
        let alive = NAMES
            .iter()
            .all(|n| ls.iter().any(|l| l.member == *n && l.alive));
        if alive && back.is_none() {
            back = Some(start.elapsed());
        }
        if let Some(back) = back.filter(|_| alive) {
            let ticked: i64 = c
                .query_one(
                    "SELECT count(DISTINCT currentworker) FROM public.work_items \
                     WHERE updated_at > to_timestamp($1) AND currentworker = ANY($2)",
                    &[&lifted, &names],
                )
                .await
                .expect("count the workers that ticked since the fault")
                .get(0);
            if ticked == NAMES.len() as i64 && settled(c, &NAMES).await {
                return Ok(Recovery {
                    back,
                    settled: start.elapsed(),
                });
            }
        }
        if start.elapsed() > RECOVERY_BOUND {
            let state: Vec<String> = ls
                .iter()
                .map(|l| {
                    format!(
                        "{} slot {} incarnation {} alive {}",
                        l.member, l.slot, l.incarnation, l.alive
                    )
                })
                .collect();
            return Err(format!(
                "the group did not recover within {RECOVERY_BOUND:?} (all 5 alive, every item ticked since the last change, every worker ticked since the fault); leases: {state:?}"
            ));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A soak in progress.
pub struct Soak {
    pub server: Arc<PrivateServer>,
    /// The server's URL (the test's own connection goes there directly).
    pub url: String,
    pub c: Client,
    pub members: Vec<Member>,
    pub rng: fastrand::Rng,
    deck: Vec<Fault>,
    pub rec: Record,
    /// When the group first formed (database time).
    t0: f64,
}

impl Soak {
    /// A private cluster with `track_commit_timestamp`, the items, the audits, and the 5
    /// workers (each behind its proxy) settled.
    pub async fn start(seed: u64) -> Soak {
        let mut rng = fastrand::Rng::with_seed(seed);
        let server = Arc::new(
            PrivateServer::builder()
                .conf("track_commit_timestamp = on")
                .start()
                .expect("start a private PostgreSQL (track_commit_timestamp = on)"),
        );
        let url = server.url();
        let out = cli(&url, &["migrate"]).await;
        assert!(out.success(), "`shardlease-worker migrate` failed: {out}");
        let out = cli(&url, &["seed", "--count", &ITEMS.to_string()]).await;
        assert!(out.success(), "`shardlease-worker seed` failed: {out}");
        let c = connect(&url).await;
        install_audit(&c).await;
        install_chaos_tables(&c).await;
        let upstream = ([127, 0, 0, 1], server.port()).into();
        let mut members = Vec::new();
        for name in NAMES {
            members.push(Member::start(name, &url, upstream).await);
        }
        let t0 = db_now(&c).await;
        recover(&c, t0)
            .await
            .unwrap_or_else(|e| panic!("the group never formed: {e}"));
        let mut deck: Vec<Fault> = Fault::ALL.iter().map(|(f, _)| *f).collect();
        rng.shuffle(&mut deck);
        Soak {
            server,
            url,
            c,
            members,
            rng,
            deck,
            rec: Record::default(),
            t0,
        }
    }

    /// Quiet spells and faults until `length` has passed (or the group fails to recover).
    pub async fn run(&mut self, length: Duration) {
        let deadline = Instant::now() + length;
        while Instant::now() < deadline {
            // A quiet spell: no fault, so the cadence bound applies.
            let quiet = self.rng.u64(1500..3000);
            tokio::time::sleep(Duration::from_millis(quiet)).await;
            self.check_alive();
            if !self.one_fault().await {
                break;
            }
        }
    }

    /// One fault, its recovery and its record; false when the group did not recover.
    async fn one_fault(&mut self) -> bool {
        let fault = Fault::pick(&mut self.rng, &mut self.deck);
        let i = self.rng.usize(0..self.members.len());
        let started = db_now(&self.c).await;
        let applied = self.apply(fault, i).await;
        let lifted = db_now(&self.c).await;
        let recovery = recover(&self.c, lifted).await;
        let ended = db_now(&self.c).await;
        self.c
            .execute(
                "INSERT INTO public.chaos_faults (kind, target, detail, excuses, span) \
                 VALUES ($1, $2, $3, $4, tstzrange(to_timestamp($5), to_timestamp($6), '[]'))",
                &[
                    &fault.name(),
                    &applied.target,
                    &applied.detail,
                    &fault.excuses(),
                    &started,
                    &ended,
                ],
            )
            .await
            .expect("record the fault");
        let recovery = match recovery {
            Ok(r) => r,
            Err(e) => {
                self.rec.fail(format!(
                    "{} of {} ({}) at {:.1} s: {e}",
                    fault.name(),
                    applied.target,
                    applied.detail,
                    started - self.t0
                ));
                return false;
            }
        };
        let lease_ends: i64 = self
            .c
            .query_one(
                "SELECT count(*) FROM public.test_lease_audit \
                 WHERE event = 'end' AND at BETWEEN to_timestamp($1) AND to_timestamp($2)",
                &[&started, &ended],
            )
            .await
            .expect("count the lease ends of the fault's window")
            .get(0);
        println!(
            "chaos: {:6.1} s  {:<18} {:<10} {}; {lease_ends} leases ended; back {:.2} s, recovered {:.2} s after",
            started - self.t0,
            fault.name(),
            applied.target,
            applied.detail,
            recovery.back.as_secs_f64(),
            recovery.settled.as_secs_f64()
        );
        let entry = self.rec.faults.entry(fault).or_default();
        entry.0 += 1;
        entry.1 = entry.1.max(recovery.settled);
        if let Some(before) = applied.before_restart {
            self.measure_restart(before, recovery.back).await;
        }
        true
    }

    /// How many items changed owner across a PostgreSQL restart, and which slots moved.
    async fn measure_restart(&mut self, (before, leases_before): Snapshot, back: Duration) {
        let after = owners(&self.c).await;
        let leases_after = leases(&self.c).await;
        let moved = before
            .iter()
            .filter(|(id, w)| after.get(*id) != Some(*w))
            .count();
        let slot_of = |ls: &[Lease], n: &str| ls.iter().find(|l| l.member == n).map(|l| l.slot);
        let kept_slots = NAMES
            .iter()
            .filter(|n| slot_of(&leases_before, n) == slot_of(&leases_after, n))
            .count();
        let slots = NAMES
            .iter()
            .map(|n| {
                format!(
                    "{n} {:?}->{:?}",
                    slot_of(&leases_before, n),
                    slot_of(&leases_after, n)
                )
            })
            .collect::<Vec<_>>()
            .join(", ");
        println!(
            "chaos:          restart moved {moved} of {} items ({:.1}%); {kept_slots} of 5 slots kept: {slots}",
            before.len(),
            100.0 * moved as f64 / before.len() as f64
        );
        self.rec.restarts.push(RestartFigure {
            moved,
            items: before.len(),
            kept_slots,
            back,
            slots,
        });
    }

    /// Check that no worker process has exited on its own; respawn any that has.
    fn check_alive(&mut self) {
        for m in self.members.iter_mut() {
            if let Some(status) = m.current.try_exit() {
                self.rec.fail(format!(
                    "{} (pid {}) exited on its own: {status}",
                    m.name,
                    m.current.pid()
                ));
                m.respawn();
            }
        }
    }

    /// The end: every item ticked within [`GAP_BOUND`] after a last quiet spell, then the
    /// final SIGTERMs, exit statuses and panics, and the faults' summary.
    pub async fn finish(&mut self) {
        self.check_alive();
        tokio::time::sleep(Duration::from_secs_f64(GAP_BOUND)).await;
        let final_at = db_now(&self.c).await;
        let row = figures(
            &self.c,
            "staleness at the end",
            &format!(
                "SELECT count(*) FILTER (WHERE updated_at IS NULL \
                                          OR updated_at < to_timestamp({final_at}) - interval '{GAP_BOUND} seconds'), \
                        coalesce(extract(epoch FROM to_timestamp({final_at}) - min(updated_at))::float8, 0) \
                   FROM public.work_items"
            ),
        )
        .await;
        let (stale, oldest): (i64, f64) = (row.get(0), row.get(1));
        println!(
            "chaos: at the end, {stale} items not ticked in the last {GAP_BOUND} s (oldest tick {oldest:.2} s before)"
        );
        if stale > 0 {
            self.rec.fail(format!(
                "{stale} items were not ticked in the {GAP_BOUND} s before the final SIGTERM (oldest {oldest:.2} s)"
            ));
        }
        for m in self.members.iter_mut() {
            m.terminate(&mut self.rec, "final").await;
        }
        let panicked: Vec<String> = self
            .members
            .iter()
            .flat_map(|m| m.all())
            .flat_map(|w| {
                w.stdout()
                    .into_iter()
                    .chain(w.stderr())
                    .filter(|l| l.contains("panicked"))
                    .map(|l| format!("{}: {}", w.name, l.chars().take(300).collect::<String>()))
                    .collect::<Vec<_>>()
            })
            .collect();
        let processes: usize = self.members.iter().map(|m| m.past.len() + 1).sum();
        println!(
            "chaos: exits: {} SIGTERMs (mid-run and final) over {processes} worker processes; {} log lines say panicked",
            self.rec.sigterms,
            panicked.len()
        );
        for l in panicked {
            self.rec.fail(format!("a log line says panicked: {l}"));
        }
        let summary: Vec<String> = self
            .rec
            .faults
            .iter()
            .map(|(f, (n, worst))| {
                format!(
                    "{} x{n} (slowest recovery {:.2} s)",
                    f.name(),
                    worst.as_secs_f64()
                )
            })
            .collect();
        println!("chaos: faults: {}", summary.join(", "));
    }

    /// The share of items that changed owner at each PostgreSQL restart; a violation above
    /// the goal when `assert` says so.
    pub fn judge_restarts(&mut self, assert: bool) {
        let moves: Vec<String> = self
            .rec
            .restarts
            .iter()
            .map(|r| {
                format!(
                    "{:.1}% ({} of {}; {} of 5 slots kept; back in {:.2} s)",
                    100.0 * r.moved as f64 / r.items as f64,
                    r.moved,
                    r.items,
                    r.kept_slots,
                    r.back.as_secs_f64()
                )
            })
            .collect();
        println!(
            "chaos: PostgreSQL restarts: {}; items that changed owner: {} (goal under {:.0}%, asserted: {assert})",
            self.rec.restarts.len(),
            if moves.is_empty() {
                "-".into()
            } else {
                moves.join(", ")
            },
            RESTART_MOVES_GOAL * 100.0
        );
        let over: Vec<String> = self
            .rec
            .restarts
            .iter()
            .filter(|r| r.moved as f64 >= RESTART_MOVES_GOAL * r.items as f64)
            .map(|r| format!("{} of {} ({})", r.moved, r.items, r.slots))
            .collect();
        if assert && !over.is_empty() {
            self.rec.fail(format!(
                "I3: PostgreSQL restarts moved {} of the items (goal under {:.0}%)",
                over.join("; "),
                RESTART_MOVES_GOAL * 100.0
            ));
        }
    }

    /// The client-side renew deadline: a partitioned worker stops calling itself ready
    /// before its lease expires by the database clock; a violation when `assert` says so.
    pub fn judge_blackholes(&mut self, assert: bool) {
        let expiring = self
            .rec
            .blackholes
            .iter()
            .filter(|r| r.expired.is_some())
            .count();
        let late: Vec<String> = self
            .rec
            .blackholes
            .iter()
            .filter(|r| r.late())
            .map(|r| {
                format!(
                    "{} ({:.2} s blackhole: {})",
                    r.member,
                    r.length,
                    r.describe()
                )
            })
            .collect();
        println!(
            "chaos: blackholes: {}; the lease expired within {expiring} of them; the worker still said ready after its lease expired in {} (asserted: {assert})",
            self.rec.blackholes.len(),
            late.len()
        );
        if assert && !late.is_empty() {
            self.rec.fail(format!(
                "blackholed workers still said ready after their lease expired by the database clock: {}",
                late.join("; ")
            ));
        }
    }
}
