//! A PostgreSQL restart: members lose their sessions, report the loss, reconnect with
//! backoff and rejoin as new incarnations. Runs a private server (initdb on a free port in a
//! temporary directory, as the `postgres` OS user when run as root), so that restarting it
//! disturbs no other test.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use shardlease::{Member, MemberConfig};

struct PrivateServer {
    bin: PathBuf,
    dir: PathBuf,
    port: u16,
}

fn pg_bin() -> PathBuf {
    let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .expect(
            "PostgreSQL server binaries under /usr/lib/postgresql (Debian's postgresql package)",
        )
        .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
        .filter(|p| p.join("initdb").exists())
        .collect();
    versions.sort();
    versions
        .pop()
        .expect("an initdb under /usr/lib/postgresql/*/bin")
}

/// Run `bin` with `args`, as the postgres OS user when we are root (initdb refuses root).
fn run_pg(bin: &Path, args: &[&str]) -> std::process::Output {
    let is_root = Command::new("id")
        .arg("-u")
        .output()
        .map(|o| o.stdout == b"0\n")
        .unwrap_or(false);
    let mut cmd = if is_root {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(bin);
        c
    } else {
        Command::new(bin)
    };
    cmd.args(args)
        .output()
        .expect("run a PostgreSQL server binary")
}

impl PrivateServer {
    fn start() -> PrivateServer {
        let bin = pg_bin();
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let dir = std::env::temp_dir().join(format!("shardlease-pg-{}-{port}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let _ = Command::new("chown")
            .args(["postgres:postgres", dir.to_str().unwrap()])
            .status();
        let data = dir.join("data");
        let out = run_pg(
            &bin.join("initdb"),
            &[
                "-D",
                data.to_str().unwrap(),
                "-U",
                "postgres",
                "--auth=trust",
                "-E",
                "UTF8",
                "--no-sync",
            ],
        );
        assert!(
            out.status.success(),
            "initdb failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let server = PrivateServer { bin, dir, port };
        server.ctl("start");
        server
    }

    fn ctl(&self, action: &str) {
        let data = self.dir.join("data");
        let log = self.dir.join("log");
        let opts = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1",
            self.port,
            self.dir.display()
        );
        let out = run_pg(
            &self.bin.join("pg_ctl"),
            &[
                "-D",
                data.to_str().unwrap(),
                "-l",
                log.to_str().unwrap(),
                "-o",
                &opts,
                "-m",
                "fast",
                "-w",
                "-t",
                "60",
                action,
            ],
        );
        assert!(
            out.status.success(),
            "pg_ctl {action} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }
}

impl Drop for PrivateServer {
    fn drop(&mut self) {
        let data = self.dir.join("data");
        let _ = run_pg(
            &self.bin.join("pg_ctl"),
            &["-D", data.to_str().unwrap(), "-m", "immediate", "stop"],
        );
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_rejoin_after_a_server_restart() {
    let server = PrivateServer::start();
    let pg = shardlease::parse_database_url(&server.url()).unwrap();
    let mut client = shardlease::connect_client(&pg, "restart-test")
        .await
        .unwrap();
    shardlease::migrate(&mut client).await.unwrap();
    drop(client);
    let cfg = |m: &str| {
        MemberConfig::new("g", m)
            .heartbeat(Duration::from_millis(200))
            .lease_ttl(Duration::from_millis(1500))
            .crash_check(Duration::from_millis(50))
            .reconnect_max_backoff(Duration::from_millis(500))
    };
    let a = Member::join(&pg, cfg("a")).await.unwrap();
    let b = Member::join(&pg, cfg("b")).await.unwrap();
    let both = |v: &shardlease::View| v.is_joined() && v.members.len() == 2;
    a.wait_for(Duration::from_secs(10), both)
        .await
        .expect("a sees both");
    let before = b.view();

    server.ctl("restart");
    let restarted = Instant::now();
    // New incarnations for both prove that each lost its session and rejoined.
    for m in [&a, &b] {
        let v = m
            .wait_for(Duration::from_secs(20), |v| {
                both(v)
                    && v.members.iter().all(|x| {
                        before
                            .members
                            .iter()
                            .all(|y| x.incarnation != y.incarnation)
                    })
            })
            .await
            .unwrap_or_else(|| {
                panic!(
                    "{} rejoined with a new incarnation; view {:?}",
                    m.member_id(),
                    m.view()
                )
            });
        assert_eq!(v.slot_count, 2);
    }
    println!(
        "both members rejoined {:?} after the restart",
        restarted.elapsed()
    );
    a.leave().await.unwrap();
    b.leave().await.unwrap();
}
