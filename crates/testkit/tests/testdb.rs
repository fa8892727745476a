//! The test kit against a real server: databases named after their test and recorded in the
//! registry, dropped with their row; databases of killed test processes dropped by the next
//! one (and those of live ones kept); and, with nothing at the default address, a throwaway
//! server of the test process, gone when the process ends.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use shardlease::tokio_postgres::Client;
use shardlease_testkit::{base_config, poll_until, TestDb};

const REGISTRY: &str = "shardlease_testkit.databases";

async fn admin() -> Client {
    shardlease::connect_client(&base_config(), "testkit-test")
        .await
        .expect("connect to the server")
}

async fn exists(c: &Client, name: &str) -> bool {
    c.query_one(
        "SELECT count(*) FROM pg_database WHERE datname = $1",
        &[&name],
    )
    .await
    .expect("pg_database")
    .get::<_, i64>(0)
        == 1
}

/// The registry's pid for `name`, if it has a row.
async fn owner(c: &Client, name: &str) -> Option<i32> {
    c.query_opt(
        &format!("SELECT pid FROM {REGISTRY} WHERE datname = $1"),
        &[&name],
    )
    .await
    .expect("read the registry")
    .map(|r| r.get(0))
}

/// Run this test binary's ignored test `name` as a child, with `env` (`None`: unset).
fn child(name: &str, env: &[(&str, Option<&str>)]) -> Child {
    let mut cmd = Command::new(std::env::current_exe().expect("test binary"));
    cmd.args([
        "--ignored",
        "--exact",
        name,
        "--nocapture",
        "--test-threads=1",
    ])
    .stdout(Stdio::piped())
    .stderr(Stdio::inherit());
    for (k, v) in env {
        match v {
            Some(v) => cmd.env(k, v),
            None => cmd.env_remove(k),
        };
    }
    cmd.spawn().expect("spawn the child test")
}

/// The first line of the child's stdout with `tag`, from the tag on. The rest of its
/// output is read (and dropped) by a thread, so that the child never writes to a closed pipe.
fn line_with(child: &mut Child, tag: &'static str) -> String {
    let stdout = child.stdout.take().expect("stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut tx = Some(tx);
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            // libtest prints "test <name> ... " first, on the same line.
            if let Some(i) = line.find(tag) {
                if let Some(tx) = tx.take() {
                    let _ = tx.send(line[i + tag.len()..].trim().to_owned());
                }
            }
        }
    });
    rx.recv_timeout(Duration::from_secs(60))
        .unwrap_or_else(|e| panic!("the child printed no {tag:?} line within 60 s: {e}"))
}

#[tokio::test]
async fn a_database_is_named_after_its_test_and_registered_until_dropped() {
    let c = admin().await;
    let db = TestDb::empty().await;
    assert!(
        db.name
            .starts_with("sl_a_database_is_named_after_its_test_and_registered_"),
        "{}",
        db.name
    );
    assert!(db.name.len() <= 63, "{}", db.name);
    assert!(exists(&c, &db.name).await);
    assert_eq!(owner(&c, &db.name).await, Some(std::process::id() as i32));
    let dbname: String = db
        .client()
        .await
        .query_one("SELECT current_database()", &[])
        .await
        .expect("current_database")
        .get(0);
    assert_eq!(dbname, db.name, "TestDb::pg reaches the database");
    assert_eq!(
        shardlease::parse_database_url(&db.url)
            .expect("TestDb::url parses")
            .get_dbname(),
        Some(db.name.as_str())
    );

    let named = TestDb::named("An explicit name!").await;
    assert!(
        named.name.starts_with("sl_an_explicit_name_"),
        "{}",
        named.name
    );

    let name = db.name.clone();
    drop(db);
    assert!(!exists(&c, &name).await, "dropped with the TestDb");
    assert_eq!(owner(&c, &name).await, None, "its row is gone too");
}

/// The child of the next test: create a database, say its name, wait to be killed.
#[tokio::test]
#[ignore = "run by databases_of_killed_test_processes_are_dropped_by_the_next_one"]
async fn child_holding_a_database() {
    if std::env::var_os("TESTKIT_CHILD").is_none() {
        return;
    }
    let db = TestDb::empty().await;
    println!("DATABASE {}", db.name);
    tokio::time::sleep(Duration::from_secs(120)).await;
}

/// The other child: a later test process, whose first database sweeps the registry.
#[tokio::test]
#[ignore = "run by databases_of_killed_test_processes_are_dropped_by_the_next_one"]
async fn child_of_a_later_run() {
    if std::env::var_os("TESTKIT_CHILD").is_none() {
        return;
    }
    let db = TestDb::empty().await;
    println!("DATABASE {}", db.name);
}

#[tokio::test]
async fn databases_of_killed_test_processes_are_dropped_by_the_next_one() {
    let c = admin().await;
    // This process's own sweep runs with its first database: now, before the kill below,
    // so that the later run's sweep is the one tested.
    let _ours = TestDb::empty().await;
    // The children use this process's server (without DATABASE_URL, each would otherwise
    // run a throwaway server of its own when nothing answers at the default address).
    let server = shardlease_testkit::base_url();
    let env = [
        ("TESTKIT_CHILD", Some("1")),
        ("DATABASE_URL", Some(server.as_str())),
    ];
    let mut killed = child("child_holding_a_database", &env);
    let mut alive = child("child_holding_a_database", &env);
    let leaked = line_with(&mut killed, "DATABASE ");
    let kept = line_with(&mut alive, "DATABASE ");
    killed.kill().expect("SIGKILL the first child");
    killed.wait().expect("reap it");
    assert!(exists(&c, &leaked).await, "SIGKILL leaves {leaked} behind");
    assert_eq!(owner(&c, &leaked).await, Some(killed.id() as i32));

    let mut later = child("child_of_a_later_run", &env);
    let _ = line_with(&mut later, "DATABASE ");
    let status = later.wait().expect("the later run ends");
    assert!(status.success(), "the later run: {status}");

    assert!(
        !exists(&c, &leaked).await,
        "the later run dropped {leaked}, whose owner was killed"
    );
    assert_eq!(owner(&c, &leaked).await, None);
    assert!(
        exists(&c, &kept).await,
        "the later run kept {kept}, whose owner still runs"
    );
    alive.kill().expect("SIGKILL the second child");
    alive.wait().expect("reap it");
    // Clean up after ourselves as the registry would.
    c.batch_execute(&format!("DROP DATABASE IF EXISTS \"{kept}\" WITH (FORCE)"))
        .await
        .expect("drop the second child's database");
    c.execute(
        &format!("DELETE FROM {REGISTRY} WHERE datname = $1"),
        &[&kept],
    )
    .await
    .expect("forget it");
}

/// The child of the next test: no DATABASE_URL, nothing at the default address.
#[tokio::test]
#[ignore = "run by with_nothing_at_the_default_address_a_process_runs_its_own_server"]
async fn child_without_a_server() {
    if std::env::var_os("TESTKIT_CHILD").is_none() {
        return;
    }
    let db = TestDb::migrated().await;
    let port: i32 = db
        .client()
        .await
        .query_one("SELECT inet_server_port()", &[])
        .await
        .expect("inet_server_port")
        .get(0);
    let data: String = db
        .client()
        .await
        .query_one("SELECT current_setting('data_directory')", &[])
        .await
        .expect("data_directory")
        .get(0);
    println!("SERVER {port} {data}");
}

#[tokio::test]
async fn with_nothing_at_the_default_address_a_process_runs_its_own_server() {
    let mut cmd = child(
        "child_without_a_server",
        &[
            ("TESTKIT_CHILD", Some("1")),
            ("DATABASE_URL", None),
            (
                shardlease_testkit::DEFAULT_URL_ENV,
                Some("postgres://postgres@127.0.0.1:1/postgres"),
            ),
        ],
    );
    let line = line_with(&mut cmd, "SERVER ");
    let status = cmd.wait().expect("the child ends");
    assert!(status.success(), "the child: {status}");
    let (port, data) = line.split_once(' ').expect("port and data directory");
    let port: u16 = port.parse().expect("port");
    assert_ne!(port, 1);
    assert_ne!(
        Some(&port),
        base_config().get_ports().first(),
        "a server of its own"
    );
    let data = PathBuf::from(data);
    let dir = data.parent().expect("the cluster directory").to_path_buf();
    poll_until(
        Duration::from_secs(30),
        "the watchdog to remove the child's throwaway server",
        || {
            let dir = dir.clone();
            async move { (!dir.exists()).then_some(()) }
        },
    )
    .await;
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", port)).is_err(),
        "nothing listens on {port} any more"
    );
}
