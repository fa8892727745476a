//! Which test process owns which database, after sqlx's test harness: a row per database in
//! `shardlease_testkit.databases` of the server's admin database, written before the
//! database is created and deleted after it is dropped. A test process killed before its
//! drops ran (SIGKILL, a timeout, Ctrl-C) leaves rows whose owner is gone; the next test
//! process on the same machine drops those databases.
//!
//! An owner is (machine, pid, process start time): the machine is the kernel's boot id and
//! the host name (a container has its own host name, and pids of another pid namespace say
//! nothing here), the start time tells a reused pid from the owner. Rows of other machines
//! are left alone.

use std::sync::OnceLock;

use shardlease::tokio_postgres::Client;
use tokio::sync::OnceCell;

/// The registry table.
pub(crate) const TABLE: &str = "shardlease_testkit.databases";

/// This process, as the registry names owners.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Owner {
    pub machine: String,
    pub pid: i32,
    /// Clock ticks since boot at which the process started (`/proc/<pid>/stat`), 0 unknown.
    pub started: i64,
}

impl Owner {
    pub(crate) fn me() -> &'static Owner {
        static ME: OnceLock<Owner> = OnceLock::new();
        ME.get_or_init(|| {
            let pid = std::process::id();
            Owner {
                machine: machine(),
                pid: pid as i32,
                started: start_time(pid).unwrap_or(0),
            }
        })
    }

    /// Whether this owner's process still runs (on this machine).
    fn is_running(&self) -> bool {
        let pid = self.pid as u32;
        if std::path::Path::new("/proc/self/stat").exists() {
            return match start_time(pid) {
                Some(started) => self.started == 0 || started == self.started,
                None => false,
            };
        }
        // Without /proc: `kill -0` (a reused pid then counts as running: the safe side).
        std::process::Command::new("kill")
            .args(["-0", &pid.to_string()])
            .stderr(std::process::Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(true)
    }
}

/// The start time (field 22 of `/proc/<pid>/stat`) of a live, non-zombie process.
fn start_time(pid: u32) -> Option<i64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = stat.rsplit_once(')')?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    // rest starts at field 3 (state).
    if f.first() == Some(&"Z") {
        return None;
    }
    f.get(19)?.parse().ok()
}

/// The kernel's boot id and the host name (of this UTS namespace).
fn machine() -> String {
    let read = |p: &str| {
        std::fs::read_to_string(p)
            .map(|s| s.trim().to_owned())
            .unwrap_or_default()
    };
    let host = match read("/proc/sys/kernel/hostname") {
        h if !h.is_empty() => h,
        _ => std::env::var("HOSTNAME").unwrap_or_default(),
    };
    format!("{}/{host}", read("/proc/sys/kernel/random/boot_id"))
}

/// Create the registry if needed and drop what killed runs left, once per process. False
/// when the registry cannot be used (then databases are created without it, with a warning).
pub(crate) async fn prepare(admin: &Client) -> bool {
    static READY: OnceCell<bool> = OnceCell::const_new();
    *READY
        .get_or_init(|| async {
            match create(admin).await {
                Ok(()) => {
                    sweep(admin).await;
                    true
                }
                Err(e) => {
                    // Leave no aborted transaction on the connection the caller goes on with.
                    let _ = admin.batch_execute("ROLLBACK").await;
                    eprintln!(
                        "warning: shardlease-testkit cannot keep its database registry \
                         ({TABLE}): {e}; databases of killed test runs will not be cleaned up"
                    );
                    false
                }
            }
        })
        .await
}

async fn create(admin: &Client) -> Result<(), shardlease::tokio_postgres::Error> {
    // Concurrent CREATE ... IF NOT EXISTS can still collide in the catalogs: serialize.
    admin
        .batch_execute(&format!(
            "BEGIN;
             SELECT pg_advisory_xact_lock(hashtext('{TABLE}'));
             CREATE SCHEMA IF NOT EXISTS shardlease_testkit;
             CREATE TABLE IF NOT EXISTS {TABLE} (
                 datname    text PRIMARY KEY,
                 test       text NOT NULL,
                 machine    text NOT NULL,
                 pid        integer NOT NULL,
                 started    bigint NOT NULL,
                 created_at timestamptz NOT NULL DEFAULT now()
             );
             COMMENT ON TABLE {TABLE} IS 'shardlease-testkit: the test process owning each \
                 test database; databases whose owner is gone are dropped by the next test run';
             COMMIT;"
        ))
        .await
}

/// Drop the databases of this machine's owners that are gone.
async fn sweep(admin: &Client) {
    let me = Owner::me();
    let rows = match admin
        .query(
            &format!("SELECT datname, pid, started FROM {TABLE} WHERE machine = $1"),
            &[&me.machine],
        )
        .await
    {
        Ok(rows) => rows,
        Err(e) => {
            eprintln!("warning: shardlease-testkit: reading {TABLE}: {e}");
            return;
        }
    };
    let mut dropped = Vec::new();
    for row in rows {
        let name: String = row.get(0);
        let owner = Owner {
            machine: me.machine.clone(),
            pid: row.get(1),
            started: row.get(2),
        };
        if owner == *me || owner.is_running() {
            continue;
        }
        // Claim the row first, so that of two sweeping processes only one drops.
        let claimed = admin
            .execute(
                &format!("DELETE FROM {TABLE} WHERE datname = $1 AND pid = $2 AND started = $3"),
                &[&name, &owner.pid, &owner.started],
            )
            .await;
        if !matches!(claimed, Ok(1)) {
            continue;
        }
        match drop_database(admin, &name).await {
            Ok(()) => dropped.push(name),
            Err(e) => eprintln!("warning: shardlease-testkit: dropping leaked {name}: {e}"),
        }
    }
    if !dropped.is_empty() {
        eprintln!(
            "shardlease-testkit: dropped {} database(s) left by killed test runs: {}",
            dropped.len(),
            dropped.join(", ")
        );
    }
}

/// Record that this process owns `name`, before creating it. False when the name is taken.
pub(crate) async fn record(
    admin: &Client,
    name: &str,
    test: &str,
) -> Result<bool, shardlease::tokio_postgres::Error> {
    let me = Owner::me();
    let n = admin
        .execute(
            &format!(
                "INSERT INTO {TABLE} (datname, test, machine, pid, started) \
                 VALUES ($1, $2, $3, $4, $5) ON CONFLICT (datname) DO NOTHING"
            ),
            &[&name, &test, &me.machine, &me.pid, &me.started],
        )
        .await?;
    Ok(n == 1)
}

/// Forget `name` (after dropping it, or when creating it failed).
pub(crate) async fn forget(admin: &Client, name: &str) {
    if let Err(e) = admin
        .execute(&format!("DELETE FROM {TABLE} WHERE datname = $1"), &[&name])
        .await
    {
        eprintln!("warning: shardlease-testkit: removing {name} from {TABLE}: {e}");
    }
}

/// `DROP DATABASE IF EXISTS "name" WITH (FORCE)`.
pub(crate) async fn drop_database(
    admin: &Client,
    name: &str,
) -> Result<(), shardlease::tokio_postgres::Error> {
    admin
        .batch_execute(&format!(
            "DROP DATABASE IF EXISTS {} WITH (FORCE)",
            quote_ident(name)
        ))
        .await
}

/// `name` as an SQL identifier.
pub(crate) fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_runs_and_a_finished_one_does_not() {
        assert!(Owner::me().is_running());
        let mut child = std::process::Command::new("true")
            .spawn()
            .expect("spawn true");
        let pid = child.id() as i32;
        child.wait().expect("wait");
        let gone = Owner {
            machine: Owner::me().machine.clone(),
            pid,
            started: Owner::me().started,
        };
        assert!(!gone.is_running(), "pid {pid} has exited and was reaped");
        // A live pid with another start time is a reused pid, not the owner.
        let reused = Owner {
            started: Owner::me().started + 1,
            ..Owner::me().clone()
        };
        assert!(!reused.is_running());
    }
}
