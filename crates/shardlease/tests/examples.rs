//! The embedding examples of the repository's `examples/` directory, run as real processes
//! against a fresh database each.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use common::TestDb;
use shardlease::hash::uuid_hash;
use shardlease::shard_table::HASH_SHARDS;
use shardlease::Assignment;

/// Process start-up: connect, migrate, create the table, join.
const STARTUP: Duration = Duration::from_secs(30);
/// Crash take-over: detection rides on the advisory lock, so this is well under the 5 s TTL.
const CRASH_TAKEOVER: Duration = Duration::from_secs(3);
/// Anything else that should happen at once or at the next 1 s tick.
const SOON: Duration = Duration::from_secs(5);

/// The path of the built example `name`, next to this test binary
/// (`target/<profile>/deps/examples-…` → `target/<profile>/examples/<name>`).
///
/// `cargo test` builds the examples, but `cargo test --test examples` does not, so the binary
/// may be missing or stale: run `cargo build --example <name>` for the same profile and target
/// directory (a no-op when it is fresh). If cargo cannot run, an existing binary is used.
fn example_binary(name: &str) -> PathBuf {
    static BUILD: Mutex<()> = Mutex::new(());
    let _one_build_at_a_time = BUILD.lock().unwrap_or_else(|e| e.into_inner());
    let exe = std::env::current_exe().expect("path of the test binary");
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("the test binary lives in target/<profile>/deps");
    let target_dir = profile_dir.parent().expect("target/<profile> has a parent");
    let bin = profile_dir
        .join("examples")
        .join(format!("{name}{}", std::env::consts::EXE_SUFFIX));

    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(&cargo);
    cmd.current_dir(env!("CARGO_MANIFEST_DIR"))
        .args(["build", "--quiet", "-p", "shardlease", "--example", name])
        .arg("--target-dir")
        .arg(target_dir);
    match profile_dir.file_name().and_then(|p| p.to_str()) {
        Some("debug") | None => {}
        Some("release") => {
            cmd.arg("--release");
        }
        Some(other) => {
            cmd.args(["--profile", other]);
        }
    }
    let built = cmd.status();
    match built {
        Ok(status) if status.success() && bin.exists() => bin,
        Ok(status) if status.success() => panic!(
            "`{cargo} build --example {name}` succeeded but {} does not exist",
            bin.display()
        ),
        _ if bin.exists() => {
            eprintln!(
                "warning: `{cargo} build --example {name}` failed ({built:?}); using the existing {}",
                bin.display()
            );
            bin
        }
        _ => panic!(
            "example binary {} is missing and `{cargo} build -p shardlease --example {name}` failed: {built:?}",
            bin.display()
        ),
    }
}

/// A running example. Its stdout is read line by line on a thread; it is killed on drop.
struct Proc {
    name: String,
    child: Child,
    lines: Receiver<String>,
    /// Every line received so far, for failure messages.
    seen: Vec<String>,
}

impl Proc {
    fn spawn(bin: &Path, db: &TestDb, name: &str, extra: &[&str]) -> Proc {
        let mut child = Command::new(bin)
            .args(["--member", name])
            .args(extra)
            .env("DATABASE_URL", &db.url)
            .env_remove("MEMBER_ID")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| panic!("spawning {} for {name}: {e}", bin.display()));
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Proc {
            name: name.to_owned(),
            child,
            lines,
            seen: Vec::new(),
        }
    }

    /// Consume lines until one satisfies `pred`; panic after `timeout` saying `what`.
    fn wait_line(&mut self, what: &str, timeout: Duration, pred: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if pred(&line) {
                        return line;
                    }
                }
                Err(e) => panic!(
                    "{}: no line with {what} within {timeout:?} ({}); its output so far:\n{}",
                    self.name,
                    match e {
                        RecvTimeoutError::Timeout => "timed out",
                        RecvTimeoutError::Disconnected => "stdout closed",
                    },
                    self.seen.join("\n")
                ),
            }
        }
    }

    /// The next role line (`LEADER`/`FOLLOWER`/`LOST`) showing `members` members.
    fn wait_role(&mut self, members: usize, timeout: Duration) -> Role {
        let what = format!("a LEADER/FOLLOWER line with members={members}");
        let line = self.wait_line(&what, timeout, |l| {
            Role::parse(l).is_some_and(|r| r.members == members)
        });
        Role::parse(&line).expect("matched above")
    }

    fn signal(&self, sig: &str) {
        let status = Command::new("kill")
            .args([format!("-{sig}"), self.child.id().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -{sig} {} failed", self.name);
    }

    /// Wait for the process to exit (polling `try_wait`; there is no event to wait on).
    fn wait_exit(&mut self, what: &str, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "{} did not exit within {timeout:?} ({what}); its output so far:\n{}",
                self.name,
                self.seen.join("\n")
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// After exit: every line, including those not consumed yet.
    fn all_lines(&mut self) -> Vec<String> {
        // The reader thread ends at EOF, which closes the channel.
        while let Ok(line) = self.lines.recv_timeout(SOON) {
            self.seen.push(line);
        }
        self.seen.clone()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `name=value` from a whitespace-separated line.
fn field<'a>(line: &'a str, name: &str) -> Option<&'a str> {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(name)?.strip_prefix('='))
}

/// A role line of the leader_election example.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Role {
    me: String,
    leader: String,
    generation: u64,
    members: usize,
}

impl Role {
    /// `LEADER <me> generation=<g> members=<n>` or
    /// `FOLLOWER <me> (leader: <id>) generation=<g> members=<n>`.
    fn parse(line: &str) -> Option<Role> {
        let mut words = line.split_whitespace();
        let kind = words.next()?;
        let me = words.next()?.to_owned();
        let leader = match kind {
            "LEADER" => me.clone(),
            "FOLLOWER" => line
                .split_once("(leader: ")?
                .1
                .split_once(')')?
                .0
                .to_owned(),
            _ => return None,
        };
        Some(Role {
            me,
            leader,
            generation: field(line, "generation")?.parse().ok()?,
            members: field(line, "members")?.parse().ok()?,
        })
    }

    fn leads(&self) -> bool {
        self.me == self.leader
    }
}

/// Wait for a role line with `members` members from each of `procs`; check that exactly one
/// leads, that the others follow it, and that all agree on the generation. Returns the
/// leader's index.
fn agreed_leader(procs: &mut [&mut Proc], members: usize, timeout: Duration) -> usize {
    let roles: Vec<Role> = procs
        .iter_mut()
        .map(|p| p.wait_role(members, timeout))
        .collect();
    let leaders: Vec<usize> = (0..roles.len()).filter(|&i| roles[i].leads()).collect();
    assert_eq!(leaders.len(), 1, "exactly one LEADER among {roles:#?}");
    let leader = &roles[leaders[0]];
    for r in &roles {
        assert_eq!(
            r.leader, leader.me,
            "everyone follows {}: {roles:#?}",
            leader.me
        );
        assert_eq!(
            r.generation, leader.generation,
            "one generation: {roles:#?}"
        );
    }
    leaders[0]
}

fn wait_wrote(p: &mut Proc) {
    let prefix = format!("WROTE {} ", p.name);
    p.wait_line(
        &format!("{prefix:?} (a fenced write as leader)"),
        SOON,
        |l| l.starts_with(&prefix),
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_election_hands_over_on_crash_and_leave() {
    let bin = example_binary("leader_election");
    let started = Instant::now();
    // An empty database: the example migrates it and creates its table itself.
    let db = TestDb::empty().await;
    let mut procs: Vec<Proc> = ["le-a", "le-b", "le-c"]
        .iter()
        .map(|name| Proc::spawn(&bin, &db, name, &[]))
        .collect();

    // One leader among three, and it proves it with a fenced write.
    let first = agreed_leader(&mut procs.iter_mut().collect::<Vec<_>>(), 3, STARTUP);
    wait_wrote(&mut procs[first]);
    let crashed = procs.remove(first);
    let crashed_name = crashed.name.clone();

    // kill -9 the leader: its advisory lock vanishes with its connection, the survivors reap it.
    let killed_at = Instant::now();
    drop(crashed); // SIGKILL, then reap the process
    let second = agreed_leader(&mut procs.iter_mut().collect::<Vec<_>>(), 2, CRASH_TAKEOVER);
    let takeover = killed_at.elapsed();
    assert_ne!(procs[second].name, crashed_name);
    eprintln!("crash take-over after kill -9: {takeover:?}");
    wait_wrote(&mut procs[second]);

    // SIGTERM the new leader: it leaves, exits 0, and the last member leads.
    let mut departed = procs.remove(second);
    departed.signal("TERM");
    let status = departed.wait_exit("after SIGTERM", SOON);
    assert!(
        status.success(),
        "{} exits 0 after SIGTERM, got {status}",
        departed.name
    );
    departed.wait_line("\"LEFT\"", SOON, |l| l.starts_with("LEFT "));
    let last = &mut procs[0];
    let role = last.wait_role(1, SOON);
    assert!(role.leads(), "the last member leads: {role:?}");
    wait_wrote(last);
    last.signal("TERM");
    let status = last.wait_exit("after SIGTERM", SOON);
    assert!(
        status.success(),
        "{} exits 0 after SIGTERM, got {status}",
        last.name
    );

    let log = check_leader_log(&db).await;
    let writers: BTreeSet<&str> = log.iter().map(|(_, l)| l.as_str()).collect();
    assert_eq!(writers.len(), 3, "all three leaders wrote in turn: {log:?}");
    eprintln!(
        "leader election: {} fenced writes, {:?} in all",
        log.len(),
        started.elapsed()
    );
}

/// Never two leaders under one generation, and the log is in generation order (a fenced write
/// under G cannot commit after G+1 exists). Returns the log.
async fn check_leader_log(db: &TestDb) -> Vec<(i64, String)> {
    let client = db.client().await;
    let rows = client
        .query("SELECT generation, leader FROM leader_log ORDER BY id", &[])
        .await
        .expect("read leader_log");
    let log: Vec<(i64, String)> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
    let mut by_generation: BTreeMap<i64, BTreeSet<&str>> = BTreeMap::new();
    for (generation, leader) in &log {
        by_generation.entry(*generation).or_default().insert(leader);
    }
    for (generation, leaders) in &by_generation {
        assert_eq!(
            leaders.len(),
            1,
            "generation {generation} has writes by {leaders:?}"
        );
    }
    assert!(
        log.windows(2).all(|w| w[0].0 <= w[1].0),
        "leader_log in commit order has non-decreasing generations: {log:?}"
    );
    log
}

/// A leader that hangs (SIGSTOP) loses its lease after the TTL; the other member takes over;
/// when the old leader resumes, it writes nothing under its old view before it has rejoined,
/// and it follows: it does not take the lead back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_election_fences_a_paused_leader() {
    // LeaderConfig's defaults: the lease expires 10 s (TTL) after the last renewal at most,
    // and the successor's heartbeat (every 2 s) finds it expired; plus slack.
    const TTL_TAKEOVER: Duration = Duration::from_secs(20);
    let bin = example_binary("leader_election");
    let started = Instant::now();
    let db = TestDb::empty().await;
    let mut procs: Vec<Proc> = ["lp-a", "lp-b"]
        .iter()
        .map(|name| Proc::spawn(&bin, &db, name, &[]))
        .collect();
    let first = agreed_leader(&mut procs.iter_mut().collect::<Vec<_>>(), 2, STARTUP);
    let (old, new) = if first == 0 { (0, 1) } else { (1, 0) };
    wait_wrote(&mut procs[old]);

    procs[old].signal("STOP");
    let stopped_at = Instant::now();
    let role = procs[new].wait_role(1, TTL_TAKEOVER);
    assert!(
        role.leads(),
        "the survivor leads once the paused leader's lease expired: {role:?}"
    );
    eprintln!("hang take-over after SIGSTOP: {:?}", stopped_at.elapsed());
    wait_wrote(&mut procs[new]);

    procs[old].signal("CONT");
    let resumed_from = procs[old].seen.len();
    // The resumed member finds its lease gone and rejoins as the newest candidate (into its
    // old slot): it follows. Both agree on the new view.
    let leader = agreed_leader(&mut procs.iter_mut().collect::<Vec<_>>(), 2, SOON);
    assert_eq!(
        leader, new,
        "the resumed old leader must not take the lead back: {:#?}",
        procs[old].seen
    );
    let after = procs[old].seen[resumed_from..].to_vec();
    assert!(
        !after.iter().any(|l| l.starts_with("WROTE ")),
        "the resumed old leader must not write before it learns it was deposed: {after:#?}"
    );
    wait_wrote(&mut procs[leader]);
    for p in &mut procs {
        p.signal("TERM");
        let status = p.wait_exit("after SIGTERM", SOON);
        assert!(
            status.success(),
            "{} exits 0 after SIGTERM, got {status}",
            p.name
        );
    }
    let log = check_leader_log(&db).await;
    let writers: BTreeSet<&str> = log.iter().map(|(_, l)| l.as_str()).collect();
    assert_eq!(writers.len(), 2, "both leaders wrote in turn: {log:?}");
    eprintln!(
        "paused leader: {} fenced writes, resumed leader printed {after:?}, {:?} in all",
        log.len(),
        started.elapsed()
    );
}

/// How many times `p` began leading: LEADER lines that follow any other role line (or none)
/// among the lines read from it so far.
fn terms_begun(p: &Proc) -> usize {
    let mut leading = false;
    let mut terms = 0;
    for line in &p.seen {
        let role = if line.starts_with("LEADER ") {
            true
        } else if line.starts_with("FOLLOWER ") || line.starts_with("LOST ") {
            false
        } else {
            continue;
        };
        if role && !leading {
            terms += 1;
        }
        leading = role;
    }
    terms
}

/// Three candidates; the leader is killed with SIGKILL ten times, and each victim restarts
/// under its old id. Every crash makes exactly one new leader, the longest-standing survivor,
/// and the restarted member follows: no preemption, even though it gets its old slot back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_election_survives_ten_crashes_without_preemption() {
    const CRASHES: usize = 10;
    let bin = example_binary("leader_election");
    let started = Instant::now();
    let db = TestDb::empty().await;
    // Started one after another, so that the order of seniority is known.
    let mut procs: Vec<Proc> = Vec::new();
    let mut seniority: std::collections::VecDeque<String> = Default::default();
    for name in ["lk-a", "lk-b", "lk-c"] {
        let mut p = Proc::spawn(&bin, &db, name, &[]);
        if procs.len() < 2 {
            // Joined: its first role line (the third's is read below, with the others').
            p.wait_role(procs.len() + 1, STARTUP);
        }
        procs.push(p);
        seniority.push_back(name.to_owned());
    }
    // Terms begun by processes killed since.
    let mut dead_terms = 0;
    let mut takeovers = Vec::new();
    // Every leader in turn, as the survivors agreed on it.
    let mut leaders: Vec<String> = vec![seniority[0].clone()];
    let mut leader = agreed_leader(&mut procs.iter_mut().collect::<Vec<_>>(), 3, STARTUP);
    assert_eq!(
        procs[leader].name, seniority[0],
        "the longest-standing candidate leads"
    );
    for crash in 1..=CRASHES {
        wait_wrote(&mut procs[leader]);
        let victim = procs.remove(leader);
        dead_terms += terms_begun(&victim);
        let name = seniority.pop_front().expect("three candidates");
        let killed_at = Instant::now();
        drop(victim); // SIGKILL, then reap the process
        let next = agreed_leader(&mut procs.iter_mut().collect::<Vec<_>>(), 2, CRASH_TAKEOVER);
        takeovers.push(killed_at.elapsed());
        assert_eq!(
            procs[next].name, seniority[0],
            "crash {crash}: the next longest-standing candidate takes over"
        );
        leaders.push(procs[next].name.clone());
        wait_wrote(&mut procs[next]);

        // The victim comes back under its old id (and into its old slot): from its first
        // role line on, it follows the leader that took over.
        procs.push(Proc::spawn(&bin, &db, &name, &[]));
        seniority.push_back(name);
        leader = agreed_leader(&mut procs.iter_mut().collect::<Vec<_>>(), 3, STARTUP);
        assert_eq!(
            procs[leader].name, seniority[0],
            "crash {crash}: the leader stays after the restart"
        );
        let terms = dead_terms + procs.iter().map(terms_begun).sum::<usize>();
        assert_eq!(
            terms,
            1 + crash,
            "crash {crash}: one new leadership per crash, none for a restart"
        );
    }
    // The log agrees: each leader's writes, then its successor's, in the order they led.
    let log = check_leader_log(&db).await;
    let mut runs: Vec<&str> = log.iter().map(|(_, l)| l.as_str()).collect();
    runs.dedup();
    assert_eq!(
        runs, leaders,
        "leader_log: one run of writes per leadership"
    );
    for p in &mut procs {
        p.signal("TERM");
        let status = p.wait_exit("after SIGTERM", SOON);
        assert!(
            status.success(),
            "{} exits 0 after SIGTERM, got {status}",
            p.name
        );
    }
    takeovers.sort();
    eprintln!(
        "{CRASHES} crashes of the leader: take-over (kill -9 -> both survivors agree) min {:?}, median {:?}, max {:?}; {} leadership runs in leader_log; {:?} in all",
        takeovers[0],
        takeovers[takeovers.len() / 2],
        takeovers[takeovers.len() - 1],
        runs.len(),
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sharding_processes_every_row_once_by_its_owner() {
    const ROWS: i64 = 500;
    let bin = example_binary("shard_my_table");
    let started = Instant::now();
    let db = TestDb::empty().await;
    let seed = ROWS.to_string();
    let args = ["--seed", &seed, "--min-members", "3", "--exit-when-done"];
    let mut procs: Vec<Proc> = ["sh-a", "sh-b", "sh-c"]
        .iter()
        .map(|name| Proc::spawn(&bin, &db, name, &args))
        .collect();
    for p in &mut procs {
        let status = p.wait_exit("--exit-when-done: all rows processed", STARTUP);
        assert!(status.success(), "{} exits 0, got {status}", p.name);
    }

    // From the output: each member's slot, the view it processed under and how many rows.
    let mut seeded = 0;
    let mut slot_of: BTreeMap<String, u32> = BTreeMap::new();
    let mut views: BTreeSet<(u64, u32, String)> = BTreeSet::new(); // (generation, S, live)
    let mut reported: BTreeMap<String, i64> = BTreeMap::new();
    for p in &mut procs {
        let lines = p.all_lines();
        let mut view_of: BTreeMap<u64, (u32, String)> = BTreeMap::new();
        for line in &lines {
            if let Some(n) = line.strip_prefix("SEEDED ") {
                seeded += n.split_whitespace().next().unwrap().parse::<i64>().unwrap();
            } else if line.starts_with("JOINED ") {
                slot_of.insert(
                    p.name.clone(),
                    field(line, "slot").unwrap().parse().unwrap(),
                );
            } else if line.starts_with("VIEW ") {
                let generation = field(line, "generation").unwrap().parse().unwrap();
                let s = field(line, "slot_count").unwrap().parse().unwrap();
                view_of.insert(generation, (s, field(line, "live").unwrap().to_owned()));
            } else if line.starts_with("PROCESSED ") {
                let generation: u64 = field(line, "generation").unwrap().parse().unwrap();
                let (s, live) = view_of[&generation].clone();
                views.insert((generation, s, live));
                *reported.entry(p.name.clone()).or_default() +=
                    field(line, "rows").unwrap().parse::<i64>().unwrap();
            }
        }
        assert!(
            lines.iter().any(|l| l.starts_with("DONE ")),
            "{}: DONE in {lines:#?}",
            p.name
        );
        assert!(
            lines.iter().any(|l| l.starts_with("LEFT ")),
            "{}: LEFT in {lines:#?}",
            p.name
        );
    }
    assert_eq!(seeded, ROWS, "exactly one process seeds, once");
    assert_eq!(slot_of.len(), 3, "three members joined: {slot_of:?}");
    // --min-members 3 and nobody leaves before every row is done: one view for all the work.
    assert_eq!(
        views.len(),
        1,
        "all rows were processed under one view: {views:?}"
    );
    let (generation, slot_count, live) = views.pop_first().unwrap();
    let live: Vec<u32> = live.split(',').map(|s| s.parse().unwrap()).collect();
    assert_eq!(
        live.len(),
        3,
        "the view of generation {generation} has three members"
    );
    let table = Assignment::new(slot_count, live)
        .expect("a valid view")
        .shard_table(HASH_SHARDS)
        .unwrap();

    let client = db.client().await;
    let rows = client
        .query("SELECT id, key_hash, processed_by FROM orders", &[])
        .await
        .expect("read orders");
    assert_eq!(rows.len() as i64, ROWS);
    let mut shards_of: BTreeMap<String, BTreeSet<u32>> = BTreeMap::new();
    let mut counts: BTreeMap<String, i64> = BTreeMap::new();
    for row in &rows {
        let id: uuid::Uuid = row.get(0);
        let key_hash: i32 = row.get(1);
        let by: Option<String> = row.get(2);
        let by = by.unwrap_or_else(|| panic!("order {id} was not processed"));
        assert_eq!(
            key_hash,
            uuid_hash(&id),
            "SQL and Rust agree on the stored hash of {id}"
        );
        let shard = table.shard_of_hash(key_hash);
        assert_eq!(
            table.owner(shard),
            Some(slot_of[&by]),
            "order {id} (hash shard {shard}) was processed by {by} in slot {}, not by its owner",
            slot_of[&by]
        );
        shards_of.entry(by.clone()).or_default().insert(shard);
        *counts.entry(by).or_default() += 1;
    }
    // The table is on its stored hash for good: column, trigger, index, validated.
    let ready: bool = client
        .query_one(
            "SELECT ready FROM shardlease.key_hash_status('orders')",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(ready);
    // Exactly once: the rows each member reports it updated add up to what the table says.
    assert_eq!(
        reported, counts,
        "reported PROCESSED rows per member vs the table"
    );
    assert_eq!(
        counts.len(),
        3,
        "every member processed its share: {counts:?}"
    );
    let all: Vec<&BTreeSet<u32>> = shards_of.values().collect();
    for (i, a) in all.iter().enumerate() {
        for b in &all[i + 1..] {
            assert!(a.is_disjoint(b), "members' shard sets are disjoint");
        }
    }
    eprintln!(
        "sharding: {counts:?} under generation {generation}, {:?} in all",
        started.elapsed()
    );
}
