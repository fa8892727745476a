//! The command-line contract of `shardlease-worker`: exit codes, one-line errors, no
//! password in any output, the migration hint, retries against an unreachable database,
//! the HTTP endpoints, `status` and `demo`.

mod common;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use common::*;

/// A database URL that refuses connections, with a password that must never be printed.
const UNREACHABLE: &str = "postgres://u:secret@127.0.0.1:1/x";

fn one_line(out: &CliOutput) -> String {
    let lines: Vec<&str> = out.stderr.trim_end().lines().collect();
    assert_eq!(lines.len(), 1, "expected a one-line error on stderr: {out}");
    lines[0].to_owned()
}

#[tokio::test]
async fn a_zero_lease_ttl_is_refused_with_exit_2_and_one_line() {
    let out = cli(&base_url(), &["run", "--lease-ttl", "0s"]).await;
    assert_eq!(out.code(), Some(2), "--lease-ttl 0s: {out}");
    let line = one_line(&out);
    assert!(
        line.contains("--lease-ttl"),
        "the error must name the flag: {line}"
    );
    assert!(out.stdout.is_empty(), "nothing on stdout: {out}");
}

#[tokio::test]
async fn a_ttl_not_above_twice_the_heartbeat_is_refused() {
    for (hb, ttl) in [("1s", "2s"), ("500ms", "1s"), ("1s", "1500ms")] {
        let out = cli(&base_url(), &["run", "--heartbeat", hb, "--lease-ttl", ttl]).await;
        assert_eq!(
            out.code(),
            Some(2),
            "--heartbeat {hb} --lease-ttl {ttl}: {out}"
        );
        let line = one_line(&out);
        assert!(
            line.contains("--lease-ttl") && line.contains("--heartbeat"),
            "the error must name both flags: {line}"
        );
    }
    // Just above twice passes the validation: on an unmigrated database, `run` then fails
    // on the migration check (exit 1), not on its flags (exit 2).
    let db = TestDb::empty().await;
    let out = db
        .cli(&[
            "run",
            "--heartbeat",
            "1s",
            "--lease-ttl",
            "2001ms",
            "--pod-name",
            "w1",
        ])
        .await;
    assert_eq!(
        out.code(),
        Some(1),
        "--heartbeat 1s --lease-ttl 2001ms is valid: {out}"
    );
}

#[tokio::test]
async fn an_unknown_flag_exits_2_with_one_line() {
    for args in [
        &["run", "--bogus"][..],
        &["migrate", "--bogus"],
        &["frobnicate"],
    ] {
        let out = cli(&base_url(), args).await;
        assert_eq!(out.code(), Some(2), "{args:?}: {out}");
        let line = one_line(&out);
        assert!(
            line.contains("--bogus") || line.contains("frobnicate"),
            "{args:?}: the error must name the offending argument: {line}"
        );
    }
}

#[tokio::test]
async fn an_unreachable_database_fails_clearly_without_the_password() {
    for args in [&["migrate"][..], &["seed", "--count", "1"], &["status"]] {
        let started = Instant::now();
        let out = cli(UNREACHABLE, args).await;
        assert!(
            !out.success(),
            "{args:?} against an unreachable database must fail: {out}"
        );
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "{args:?}: took {:?} to give up",
            started.elapsed()
        );
        let text = format!("{}{}", out.stdout, out.stderr);
        assert!(
            !text.contains("secret"),
            "{args:?}: the password leaked: {out}"
        );
        let line = one_line(&out);
        assert!(
            line.contains("cannot connect") && line.contains("127.0.0.1:1"),
            "{args:?}: the error must say that it cannot connect, and where: {line}"
        );
    }
}

#[tokio::test]
async fn a_bad_work_database_url_fails_with_one_line_naming_it_without_the_password() {
    for bad in [
        "mysql://u:secret@127.0.0.1/x",
        "postgres://u:secret@127.0.0.1:99999/x",
        "postgres://u:secret@127.0.0.1/x?sslmode=sometimes",
    ] {
        let out = cli(
            &base_url(),
            &["run", "--pod-name", "w1", "--work-database-url", bad],
        )
        .await;
        assert_eq!(out.code(), Some(1), "--work-database-url {bad}: {out}");
        let line = one_line(&out);
        assert!(
            line.contains("WORK_DATABASE_URL") && line.contains("invalid database URL"),
            "the error must name the work URL and say what is wrong: {line}"
        );
        assert!(!line.contains("secret"), "the password leaked: {line}");
    }
}

#[tokio::test]
async fn a_work_database_url_to_an_unmigrated_database_says_to_migrate() {
    let db = TestDb::with_items(1).await;
    let other = TestDb::empty().await;
    let out = db
        .cli(&[
            "run",
            "--pod-name",
            "w1",
            "--http-addr",
            "127.0.0.1:0",
            "--work-database-url",
            &other.url,
        ])
        .await;
    assert_eq!(out.code(), Some(1), "{out}");
    let line = one_line(&out);
    assert!(
        line.contains("WORK_DATABASE_URL") && line.contains("shardlease-worker migrate"),
        "the error must name the work URL and say to migrate: {line}"
    );
}

#[tokio::test]
async fn status_seed_and_run_on_an_unmigrated_database_say_to_migrate() {
    let db = TestDb::empty().await;
    for args in [
        &["status"][..],
        &["seed", "--count", "1"],
        &["run", "--pod-name", "w1", "--http-addr", "127.0.0.1:0"],
    ] {
        let out = db.cli(args).await;
        assert!(
            !out.success(),
            "{args:?} on an unmigrated database must fail: {out}"
        );
        assert!(
            out.stderr.contains("shardlease-worker migrate"),
            "{args:?}: the error must say to run `shardlease-worker migrate`: {out}"
        );
    }
    // Nothing was created by the failed commands.
    let c = db.client().await;
    let tables: i64 = c
        .query_one(
            "SELECT count(*) FROM information_schema.tables WHERE table_schema IN ('public', 'shardlease')",
            &[],
        )
        .await
        .expect("count tables")
        .get(0);
    assert_eq!(
        tables, 0,
        "status/seed/run must not create tables on an unmigrated database"
    );
}

#[tokio::test]
async fn migrate_twice_succeeds_both_times() {
    let db = TestDb::empty().await;
    let first = db.cli(&["migrate"]).await;
    assert!(first.success(), "first migrate: {first}");
    assert!(
        first.stdout.contains("applied"),
        "first migrate says what it applied: {first}"
    );
    let second = db.cli(&["migrate"]).await;
    assert!(second.success(), "second migrate: {second}");
    assert!(
        second.stdout.contains("already up to date"),
        "second migrate says there was nothing to do: {second}"
    );
    let seeded = db.cli(&["seed", "--count", "5"]).await;
    assert!(seeded.success(), "seed after migrate: {seeded}");
    // Seeding leaves the planner statistics behind (a table never analysed has -1).
    let reltuples: f32 = db
        .client()
        .await
        .query_one(
            "SELECT reltuples FROM pg_class WHERE oid = 'public.work_items'::regclass",
            &[],
        )
        .await
        .expect("read pg_class")
        .get(0);
    assert_eq!(reltuples, 5.0, "seed analyses the table it filled");
    let third = db.cli(&["migrate"]).await;
    assert!(third.success(), "migrate with rows present: {third}");
    let n: i64 = db
        .client()
        .await
        .query_one("SELECT count(*) FROM public.work_items", &[])
        .await
        .expect("count items")
        .get(0);
    assert_eq!(n, 5, "migrate keeps the rows");
}

#[tokio::test]
async fn run_against_an_unreachable_database_retries_and_exits_0_on_sigterm() {
    let mut w = Worker::spawn(UNREACHABLE, "w1", RUN_ARGS);
    let line = w.wait_stderr("retrying", Duration::from_secs(15)).await;
    assert!(
        line.contains("127.0.0.1:1"),
        "the retry message names the target: {line}"
    );
    // Keeps trying: a second retry message.
    let w_ref = &w;
    poll_until(
        Duration::from_secs(15),
        "a second retry message",
        || async move {
            (w_ref
                .stderr()
                .iter()
                .filter(|l| l.contains("retrying"))
                .count()
                >= 2)
                .then_some(())
        },
    )
    .await;
    let addr = w.http_addr().await;
    assert_eq!(
        http_get(addr, "/healthz").await.0,
        200,
        "/healthz while retrying"
    );
    assert_eq!(
        http_get(addr, "/readyz").await.0,
        503,
        "/readyz must be 503 while not joined"
    );

    let sent = Instant::now();
    w.signal("TERM");
    let status = w.wait_exit(Duration::from_secs(2)).await;
    assert_eq!(
        status.code(),
        Some(0),
        "SIGTERM while retrying: exit 0, got {status}"
    );
    eprintln!(
        "run (unreachable database): exited 0 {:?} after SIGTERM",
        sent.elapsed()
    );
    let all = format!("{}\n{}", w.stdout().join("\n"), w.stderr().join("\n"));
    assert!(!all.contains("secret"), "the password leaked:\n{all}");
}

#[tokio::test]
async fn http_endpoints_health_readiness_and_metrics() {
    let db = TestDb::with_items(30).await;
    let c = db.client().await;
    let w = db.worker("w1", &[]);
    let addr = w.http_addr().await;
    let (code, _) = http_get(addr, "/healthz").await;
    assert_eq!(code, 200, "/healthz");
    poll_until(
        Duration::from_secs(20),
        "/readyz to answer 200 once joined",
        || async move { (http_get(addr, "/readyz").await.0 == 200).then_some(()) },
    )
    .await;
    assert!(
        lease_of(&c, "w1").await.is_some_and(|l| l.alive),
        "/readyz said ready: w1 must be an alive member"
    );
    let body = poll_until(
        Duration::from_secs(10),
        "/metrics to show ticks and members",
        || async move {
            let (code, body) = http_get(addr, "/metrics").await;
            (code == 200
                && body.contains("shardlease_worker_ticks_total")
                && body.contains("shardlease_members"))
            .then_some(body)
        },
    )
    .await;
    assert!(
        body.lines().any(|l| l.starts_with("shardlease_worker_ticks_total") && l.contains("outcome=\"ok\"")),
        "/metrics counts successful ticks:\n{body}"
    );
    let (code, _) = http_get(addr, "/nope").await;
    assert_eq!(code, 404, "unknown path");
}

#[tokio::test]
async fn status_prints_the_generation_and_every_member() {
    let db = TestDb::with_items(300).await;
    let c = db.client().await;
    let before = db.cli(&["status"]).await;
    assert!(before.success(), "status before any member: {before}");
    assert!(
        before.stdout.contains("no such group yet"),
        "status before any member: {before}"
    );

    let _ws = [db.worker("w1", &[]), db.worker("w2", &[])];
    let generation = wait_settled(&c, &["w1", "w2"], Duration::from_secs(30)).await;
    let out = db.cli(&["status"]).await;
    assert!(out.success(), "status: {out}");
    let lines: Vec<&str> = out.stdout.lines().collect();
    assert!(
        lines[0].contains(&format!("generation {generation}"))
            && lines[0].contains("2 members (2 alive)"),
        "status: the first line gives the generation and the members: {out}"
    );
    let header = lines[1];
    let mut last = 0;
    for col in ["MEMBER", "SLOT", "ALIVE", "EXPIRES IN", "SHARDS", "ITEMS"] {
        let at = header
            .find(col)
            .unwrap_or_else(|| panic!("status: no {col} column in {header:?}"));
        assert!(at >= last, "status: columns out of order in {header:?}");
        last = at;
    }
    let (mut shards, mut items) = (0, 0);
    for name in ["w1", "w2"] {
        let row = lines
            .iter()
            .find(|l| l.split_whitespace().next() == Some(name))
            .unwrap_or_else(|| panic!("status: no line for {name}: {out}"));
        let f: Vec<&str> = row.split_whitespace().collect();
        assert_eq!(f.len(), 6, "status: {name}: six columns in {row:?}");
        assert!(
            f[1].parse::<u32>().is_ok(),
            "status: {name}: SLOT in {row:?}"
        );
        assert_eq!(f[2], "yes", "status: {name} is alive: {row:?}");
        let expires: f64 = f[3]
            .strip_suffix('s')
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("status: {name}: EXPIRES IN in {row:?}"));
        assert!(
            expires > 0.0 && expires <= TTL,
            "status: {name}: expires in {expires} s, TTL {TTL} s"
        );
        shards += f[4].parse::<u32>().expect("SHARDS");
        items += f[5].parse::<u32>().expect("ITEMS");
    }
    assert_eq!(
        shards,
        shardlease::shard_table::HASH_SHARDS,
        "status: the members' hash shards add up to every shard: {out}"
    );
    for row in lines
        .iter()
        .filter(|l| l.starts_with("w1 ") || l.starts_with("w2 "))
    {
        let n: u32 = row.split_whitespace().nth(4).unwrap().parse().unwrap();
        assert_eq!(
            n, 32_768,
            "status: two members own half the hash shards each: {out}"
        );
    }
    assert!(
        lines[0].contains("items per member max/mean"),
        "status: the first line gives the balance: {out}"
    );
    assert_eq!(
        items, 300,
        "status: the members' items add up to every item: {out}"
    );
}

/// One step of the demo's output: worker → (items, the items marked as moved onto it),
/// and its "balance: max M / mean X" figures.
#[derive(Debug, Default)]
struct Step {
    owners: std::collections::BTreeMap<String, (BTreeSet<u32>, BTreeSet<u32>)>,
    max: usize,
    mean: f64,
}

/// The "Step N" blocks of the demo's stdout.
fn demo_steps(stdout: &str) -> Vec<Step> {
    let mut steps: Vec<Step> = Vec::new();
    let mut current: Option<String> = None;
    for line in stdout.lines() {
        if line.starts_with("Step ") {
            steps.push(Step::default());
            current = None;
            continue;
        }
        let Some(step) = steps.last_mut() else {
            continue;
        };
        let trimmed = line.trim_start();
        if let Some(rest) = trimmed.strip_prefix("balance: max ") {
            let (max, rest) = rest.split_once(" / mean ").expect("max / mean");
            step.max = max.parse().expect("max");
            step.mean = rest
                .split_whitespace()
                .next()
                .unwrap()
                .parse()
                .expect("mean");
            current = None;
            continue;
        }
        let ids = if let Some((head, ids)) = line.split_once(" items:") {
            let name = head
                .split_whitespace()
                .next()
                .expect("worker name")
                .to_owned();
            let count: usize = head
                .split_whitespace()
                .nth(1)
                .unwrap()
                .parse()
                .expect("count");
            step.owners.entry(name.clone()).or_default();
            current = Some(name.clone());
            let n = ids.split_whitespace().count();
            assert!(count >= n, "{line}");
            ids
        } else if current.is_some()
            && trimmed
                .chars()
                .next()
                .is_some_and(|c| c.is_ascii_digit() || c == '+')
            && line.starts_with("    ")
        {
            line
        } else {
            current = None;
            continue;
        };
        let entry = step.owners.get_mut(current.as_ref().unwrap()).unwrap();
        for id in ids.split_whitespace() {
            let n: u32 = id
                .trim_start_matches('+')
                .parse()
                .unwrap_or_else(|_| panic!("item {id:?} in {line:?}"));
            entry.0.insert(n);
            if id.starts_with('+') {
                entry.1.insert(n);
            }
        }
    }
    steps
}

/// The demo against the test's database, as a user runs it (no RUST_LOG).
async fn demo_output(db: &TestDb) -> CliOutput {
    let mut cmd = tokio::process::Command::new(BIN);
    cmd.args(["demo", "--tick", "300ms"])
        .env("DATABASE_URL", &db.url)
        .env_remove("RUST_LOG")
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true);
    let out = tokio::time::timeout(Duration::from_secs(120), cmd.output())
        .await
        .expect("the demo finishes within 120 s")
        .expect("run the demo");
    CliOutput {
        status: out.status,
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

#[tokio::test]
async fn demo_tells_its_story_moving_only_what_must_move() {
    let db = TestDb::empty().await;
    let out = demo_output(&db).await;
    assert!(out.success(), "demo: {out}");
    assert!(
        out.stderr.is_empty(),
        "only warnings are logged by default, and there are none: {out}"
    );
    assert!(
        !out.stdout.contains("throwaway"),
        "DATABASE_URL is set: no throwaway server: {out}"
    );
    let steps = demo_steps(&out.stdout);
    assert_eq!(steps.len(), 3, "three steps: {out}");
    let names = |s: &Step| s.owners.keys().cloned().collect::<Vec<_>>();
    assert_eq!(
        names(&steps[0]),
        ["worker-1", "worker-2", "worker-3"],
        "{out}"
    );
    assert_eq!(names(&steps[1]), ["worker-1", "worker-3"], "{out}");
    assert_eq!(
        names(&steps[2]),
        ["worker-1", "worker-3", "worker-4"],
        "{out}"
    );
    let all: BTreeSet<u32> = (1..=60).collect();
    for (i, step) in steps.iter().enumerate() {
        // Every item has exactly one owner.
        let mut seen = BTreeSet::new();
        for (items, _) in step.owners.values() {
            assert!(
                seen.is_disjoint(items),
                "step {}: an item has two owners: {out}",
                i + 1
            );
            seen.extend(items);
        }
        assert_eq!(seen, all, "step {}: every item is watched: {out}", i + 1);
        let max = step
            .owners
            .values()
            .map(|(items, _)| items.len())
            .max()
            .unwrap();
        assert_eq!(
            step.max,
            max,
            "step {}: the balance line's max: {out}",
            i + 1
        );
        let mean = 60.0 / step.owners.len() as f64;
        assert!(
            (step.mean - mean).abs() < 0.05,
            "step {}: the balance line's mean: {out}",
            i + 1
        );
    }
    let items = |step: usize, w: &str| steps[step].owners[w].0.clone();
    let marked = |step: usize, w: &str| steps[step].owners[w].1.clone();
    // Step 1 marks nothing: there was nothing before it.
    assert!(steps[0].owners.values().all(|(_, m)| m.is_empty()), "{out}");
    // Step 2: worker-2's items, and only they, moved; the others kept theirs.
    let leaver = items(0, "worker-2");
    for w in ["worker-1", "worker-3"] {
        assert!(
            items(1, w).is_superset(&items(0, w)),
            "step 2: {w} kept its items: {out}"
        );
        assert_eq!(
            marked(1, w),
            &items(1, w) - &items(0, w),
            "step 2: + marks what moved onto {w}: {out}"
        );
        assert!(
            marked(1, w).is_subset(&leaver),
            "step 2: only worker-2's items moved: {out}"
        );
    }
    // Step 3: worker-4 refills worker-2's slot: it gets exactly worker-2's items back.
    assert_eq!(
        items(2, "worker-4"),
        leaver,
        "step 3: worker-4 has worker-2's items: {out}"
    );
    assert_eq!(
        marked(2, "worker-4"),
        leaver,
        "step 3: all of them moved onto it: {out}"
    );
    for w in ["worker-1", "worker-3"] {
        assert_eq!(
            items(2, w),
            items(0, w),
            "step 3: {w} is back to its step-1 items: {out}"
        );
        assert!(
            marked(2, w).is_empty(),
            "step 3: nothing moved onto {w}: {out}"
        );
    }
    assert!(
        out.stdout
            .contains("which got exactly worker-2's items back"),
        "the summary says so: {out}"
    );
}
