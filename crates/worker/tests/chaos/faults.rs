//! The faults: what each does to a worker, its connections, the server or the items, drawn
//! from the soak's seeded generator so that a seed repeats the schedule.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use shardlease::tokio_postgres::Client;
use shardlease_testkit::{AfterBlackhole, Proxy};
use uuid::Uuid;

use crate::common::{db_now, http_get, item_ids, leases, settled, Lease, Worker, GROUP, RUN_ARGS};
use crate::soak::{connect, owners, recover, Record, Soak};
use crate::{EXIT_BOUND, NAMES};

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Fault {
    Kill9,
    Stop,
    Term,
    Reset,
    Blackhole,
    PgRestart,
    Insert,
    Delete,
}

impl Fault {
    /// Every kind, with its weight once each has come once.
    pub const ALL: [(Fault, u32); 8] = [
        (Fault::Kill9, 2),
        (Fault::Stop, 2),
        (Fault::Term, 2),
        (Fault::Reset, 3),
        (Fault::Blackhole, 2),
        (Fault::PgRestart, 1),
        (Fault::Insert, 1),
        (Fault::Delete, 1),
    ];

    pub fn name(self) -> &'static str {
        match self {
            Fault::Kill9 => "kill -9",
            Fault::Stop => "SIGSTOP",
            Fault::Term => "SIGTERM",
            Fault::Reset => "reset",
            Fault::Blackhole => "blackhole",
            Fault::PgRestart => "PostgreSQL restart",
            Fault::Insert => "insert",
            Fault::Delete => "delete",
        }
    }

    /// Whether the fault's window excuses slow increments (inserts and deletes excuse none).
    pub fn excuses(self) -> bool {
        !matches!(self, Fault::Insert | Fault::Delete)
    }

    /// The next fault: the deck's (every kind once, shuffled) while it lasts, then by weight.
    pub fn pick(rng: &mut fastrand::Rng, deck: &mut Vec<Fault>) -> Fault {
        if let Some(f) = deck.pop() {
            return f;
        }
        let total: u32 = Fault::ALL.iter().map(|(_, w)| w).sum();
        let mut r = rng.u32(0..total);
        for (f, w) in Fault::ALL {
            if r < w {
                return f;
            }
            r -= w;
        }
        unreachable!("r < total")
    }
}

/// A worker: its proxy, its running process, and its earlier processes (for their logs).
pub struct Member {
    pub name: &'static str,
    pub proxy: Proxy,
    pub url: String,
    pub current: Worker,
    pub past: Vec<Worker>,
}

impl Member {
    /// A worker named `name` behind a new proxy to `upstream`, on the server URL `url`.
    pub async fn start(name: &'static str, url: &str, upstream: std::net::SocketAddr) -> Member {
        let proxy = Proxy::start(upstream).await.expect("start a proxy");
        let url = shardlease_testkit::with_host_port(url, "127.0.0.1", proxy.port());
        let current = Worker::spawn(&url, name, RUN_ARGS);
        Member {
            name,
            proxy,
            url,
            current,
            past: Vec::new(),
        }
    }

    /// Start a new process in place of the current one (which has exited).
    pub fn respawn(&mut self) {
        let old = std::mem::replace(
            &mut self.current,
            Worker::spawn(&self.url, self.name, RUN_ARGS),
        );
        self.past.push(old);
    }

    /// Every process this member has run.
    pub fn all(&self) -> impl Iterator<Item = &Worker> {
        self.past.iter().chain(std::iter::once(&self.current))
    }

    /// SIGTERM the current process and wait for it to exit; false on a failure (recorded).
    pub async fn terminate(&mut self, rec: &mut Record, when: &str) -> bool {
        self.current.signal("TERM");
        rec.sigterms += 1;
        match self.current.exit_within(EXIT_BOUND).await {
            Some(s) if s.code() == Some(0) => true,
            Some(s) => {
                rec.fail(format!(
                    "{} exited with {s} on the {when} SIGTERM",
                    self.name
                ));
                false
            }
            None => {
                rec.fail(format!(
                    "{} did not exit within {EXIT_BOUND:?} of the {when} SIGTERM",
                    self.name
                ));
                self.current.kill9();
                false
            }
        }
    }
}

/// The owners and leases just before a PostgreSQL restart.
pub type Snapshot = (BTreeMap<Uuid, String>, Vec<Lease>);

/// What applying a fault did.
pub struct Applied {
    /// The worker's name, `server` or `work_items`.
    pub target: String,
    pub detail: String,
    /// For a PostgreSQL restart, the group as it was before.
    pub before_restart: Option<Snapshot>,
}

impl Soak {
    /// Apply `fault` (to worker `i` when it targets one) and lift it again.
    pub async fn apply(&mut self, fault: Fault, i: usize) -> Applied {
        let on = |detail: String| Applied {
            target: NAMES[i].to_string(),
            detail,
            before_restart: None,
        };
        let items = |detail: String| Applied {
            target: "work_items".into(),
            detail,
            before_restart: None,
        };
        match fault {
            Fault::Kill9 => on(self.kill9(i).await),
            Fault::Stop => on(self.stop(i).await),
            Fault::Term => on(self.term(i).await),
            Fault::Reset => on(self.reset(i)),
            Fault::Blackhole => on(self.blackhole(i).await),
            Fault::PgRestart => {
                let (detail, before) = self.restart_postgres().await;
                Applied {
                    target: "server".into(),
                    detail,
                    before_restart: Some(before),
                }
            }
            Fault::Insert => items(self.insert().await),
            Fault::Delete => items(self.delete().await),
        }
    }

    /// kill -9, and a new process up to 1 s later.
    async fn kill9(&mut self, i: usize) -> String {
        self.members[i].current.kill9();
        let pause = self.rng.u64(0..1000);
        tokio::time::sleep(Duration::from_millis(pause)).await;
        self.members[i].respawn();
        format!("restarted {pause} ms later")
    }

    /// SIGSTOP, and SIGCONT 1 to 5 s later (the lease TTL is 3 s).
    async fn stop(&mut self, i: usize) -> String {
        let pause = self.rng.u64(1000..5000);
        let m = &self.members[i];
        m.current.signal("STOP");
        tokio::time::sleep(Duration::from_millis(pause)).await;
        m.current.signal("CONT");
        format!("SIGCONT {pause} ms later")
    }

    /// SIGTERM (it must exit 0), and a new process up to 1 s later.
    async fn term(&mut self, i: usize) -> String {
        let clean = self.members[i].terminate(&mut self.rec, "mid-run").await;
        let pause = self.rng.u64(0..1000);
        tokio::time::sleep(Duration::from_millis(pause)).await;
        self.members[i].respawn();
        format!(
            "{}; restarted {pause} ms later",
            if clean { "exited 0" } else { "exit FAILED" }
        )
    }

    /// Reset the worker's session connection, its work connection, or both.
    fn reset(&mut self, i: usize) -> String {
        let which = self.rng.u32(0..3);
        let m = &self.members[i];
        let conns = m.proxy.connections();
        // The work connection's name is "shardlease-worker <id> work"; the session's
        // starts "shardlease <group>/<id>".
        let is_work = |a: &Option<String>| {
            a.as_deref()
                .is_some_and(|a| a.starts_with("shardlease-worker") && a.ends_with("work"))
        };
        let n = conns
            .iter()
            .filter(|c| match which {
                0 => !is_work(&c.application_name),
                1 => is_work(&c.application_name),
                _ => true,
            })
            .filter(|c| m.proxy.reset(c.id))
            .count();
        format!(
            "{n} of {} connections ({})",
            conns.len(),
            ["session", "work", "all"][which as usize]
        )
    }

    /// Blackhole the worker's connections for 2 to 4 s, then resume or reset, watching its
    /// `/readyz` meanwhile.
    async fn blackhole(&mut self, i: usize) -> String {
        let length = Duration::from_millis(self.rng.u64(2000..4000));
        let then = if self.rng.bool() {
            AfterBlackhole::Resume
        } else {
            AfterBlackhole::Reset
        };
        let r = blackhole_watching_readiness(&self.c, &self.members[i], length, then).await;
        let detail = format!("{length:?}, then {then:?}; {}", r.describe());
        self.rec.blackholes.push(r);
        detail
    }

    /// Restart PostgreSQL (fast shutdown), from a settled group, whose owners it returns.
    async fn restart_postgres(&mut self) -> (String, Snapshot) {
        // The group has recovered from the last fault: each item's currentworker is its
        // owner. Make sure, since the owners are compared with those after the restart.
        if !settled(&self.c, &NAMES).await {
            let lifted = db_now(&self.c).await;
            if let Err(e) = recover(&self.c, lifted).await {
                self.rec.fail(format!("before a PostgreSQL restart: {e}"));
            }
        }
        let before = (owners(&self.c).await, leases(&self.c).await);
        let server = self.server.clone();
        let took = Instant::now();
        // pg_ctl blocks: off the runtime's threads, so that the proxies keep running.
        tokio::task::spawn_blocking(move || server.restart())
            .await
            .expect("the restart thread")
            .expect("restart the private PostgreSQL (fast)");
        self.c = connect(&self.url).await;
        let detail = format!(
            "fast; accepting connections again after {:.2} s",
            took.elapsed().as_secs_f64()
        );
        (detail, before)
    }

    /// Insert 1 to 20 items.
    async fn insert(&mut self) -> String {
        let n = self.rng.i64(1..=20);
        self.c
            .execute(
                "WITH i AS (INSERT INTO public.work_items (value) \
                            SELECT 0 FROM generate_series(1, $1::bigint) RETURNING id) \
                 INSERT INTO public.chaos_inserted SELECT id, clock_timestamp() FROM i",
                &[&n],
            )
            .await
            .expect("insert items");
        format!("{n} items")
    }

    /// Delete 1 to 20 items, keeping their last values for the value check.
    async fn delete(&mut self) -> String {
        let ids: Vec<Uuid> = item_ids(&self.c).await.into_iter().collect();
        let n = self.rng.usize(1..=20).min(ids.len());
        let victims: Vec<Uuid> = self.rng.choose_multiple(ids.iter().copied(), n);
        let deleted = self
            .c
            .execute(
                "WITH d AS (DELETE FROM public.work_items WHERE id = ANY($1) RETURNING id, value) \
                 INSERT INTO public.chaos_deleted SELECT id, value, clock_timestamp() FROM d",
                &[&victims],
            )
            .await
            .expect("delete items");
        format!("{deleted} items")
    }
}

/// What a blackholed worker's `/readyz` said, against its lease's expiry by the database
/// clock; times in seconds from the start of the blackhole.
pub struct Readiness {
    pub member: &'static str,
    pub length: f64,
    /// When the lease expired, if it did within the blackhole.
    pub expired: Option<f64>,
    /// When `/readyz` first failed, if it did within the blackhole.
    pub unready: Option<f64>,
}

impl Readiness {
    /// Whether the worker still called itself ready after its lease had expired.
    pub fn late(&self) -> bool {
        match (self.expired, self.unready) {
            (Some(e), Some(u)) => u > e,
            (Some(_), None) => true,
            (None, _) => false,
        }
    }

    pub fn describe(&self) -> String {
        let at = |t: Option<f64>| {
            t.map(|t| format!("{t:.2} s"))
                .unwrap_or_else(|| "never".into())
        };
        format!(
            "/readyz failed: {}; lease expired (database clock): {}",
            at(self.unready),
            at(self.expired)
        )
    }
}

/// Blackhole `m`'s connections for `length`, then resume or reset, polling its `/readyz`
/// (which is not behind the proxy) meanwhile.
async fn blackhole_watching_readiness(
    c: &Client,
    m: &Member,
    length: Duration,
    then: AfterBlackhole,
) -> Readiness {
    let http = m.current.http_addr().await;
    let start_db = db_now(c).await;
    let start = Instant::now();
    m.proxy.blackhole();
    let mut expires: Option<Option<f64>> = None;
    let mut unready = None;
    while start.elapsed() < length {
        // Read the lease once a renewal that was on its way when the blackhole began has had
        // time to commit; no later one can reach the server.
        if expires.is_none() && start.elapsed() >= Duration::from_millis(200) {
            let row = c
                .query_opt(
                    "SELECT extract(epoch FROM expires_at)::float8 FROM shardlease.leases \
                     WHERE group_name = $1 AND member_id = $2",
                    &[&GROUP, &m.name],
                )
                .await
                .expect("read the blackholed worker's lease");
            expires = Some(row.map(|r| r.get::<_, f64>(0) - start_db));
        }
        if unready.is_none() {
            let (status, _) = http_get(http, "/readyz").await;
            if status != 200 {
                unready = Some(start.elapsed().as_secs_f64());
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    if then == AfterBlackhole::Reset {
        // Reset first, so that no held byte is delivered on the way out.
        m.proxy.reset_all();
    }
    m.proxy.resume();
    let length = length.as_secs_f64();
    Readiness {
        member: m.name,
        length,
        expired: expires.flatten().filter(|&e| e < length),
        unready,
    }
}
