//! Test support shared by the workspace's tests and benchmarks, after sqlx's test harness:
//! every test gets a fresh PostgreSQL database of its own (created, and dropped with its
//! connections when the [`TestDb`] is dropped), so tests run in parallel; and every wait is
//! bounded and says what it waited for.
//!
//! The server is `DATABASE_URL`, by default `postgres://postgres@127.0.0.1:5432/postgres`.
//!
//! [`PgBouncer`] runs a real PgBouncer in front of that server (transaction pooling by
//! default), for the work path behind a pooler; tests skip, saying why, without the binary.
//! Tests that restart the server, change its settings, need many connections or measure its
//! CPU run a [`PrivateServer`] of their own instead; [`cluster_cpu_time`] and [`CpuUse`]
//! measure a cluster's CPU from `/proc`.
#![deny(missing_docs)]

mod cpu;
mod server;

pub use cpu::{cluster_cpu_time, CpuUse};
pub use server::{PrivateServer, PrivateServerBuilder};

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use shardlease::tokio_postgres::Client;
use shardlease::DbConfig;

/// The server the tests run against: `DATABASE_URL`, default the local PostgreSQL.
pub fn base_url() -> String {
    std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned())
}

/// Replace the database of a postgres:// URL, keeping its query string.
pub fn with_database(url: &str, db: &str) -> String {
    let (head, query) = match url.split_once('?') {
        Some((h, q)) => (h, Some(q)),
        None => (url, None),
    };
    let scheme_end = head.find("://").map(|i| i + 3).unwrap_or(0);
    let base = match head[scheme_end..].find('/') {
        Some(i) => &head[..scheme_end + i],
        None => head,
    };
    match query {
        Some(q) => format!("{base}/{db}?{q}"),
        None => format!("{base}/{db}"),
    }
}

/// Replace the host and port of a postgres:// URL, keeping its user, password, database and
/// query string (the counterpart of [`with_database`]).
pub fn with_host_port(url: &str, host: &str, port: u16) -> String {
    let scheme_end = url.find("://").map(|i| i + 3).unwrap_or(0);
    let rest = &url[scheme_end..];
    let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
    let authority = &rest[..authority_end];
    let userinfo = authority.rfind('@').map(|i| &authority[..=i]).unwrap_or("");
    format!(
        "{}{userinfo}{host}:{port}{}",
        &url[..scheme_end],
        &rest[authority_end..]
    )
}

mod pgbouncer;
pub use pgbouncer::{PgBouncer, PoolMode};

/// A fresh database, dropped (with its connections) when this value is dropped.
pub struct TestDb {
    /// The database's name.
    pub name: String,
    /// Its URL.
    pub url: String,
    /// Its connection config.
    pub pg: DbConfig,
}

static COUNTER: AtomicU32 = AtomicU32::new(0);

impl TestDb {
    /// A new, empty database.
    pub async fn empty() -> TestDb {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let name = format!(
            "shardlease_test_{}_{}_{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed),
            nanos % 100_000
        );
        admin_client()
            .await
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .unwrap_or_else(|e| panic!("creating test database {name}: {e}"));
        let url = with_database(&base_url(), &name);
        let pg = shardlease::parse_database_url(&url).expect("test URL parses");
        TestDb { name, url, pg }
    }

    /// A new database with the shardlease schema.
    pub async fn migrated() -> TestDb {
        let db = TestDb::empty().await;
        let mut client = db.client().await;
        shardlease::migrate(&mut client)
            .await
            .expect("migrate the test database");
        db
    }

    /// A plain connection to this database.
    pub async fn client(&self) -> Client {
        shardlease::connect_client(&self.pg, "shardlease-test")
            .await
            .expect("connect to the test database")
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let name = self.name.clone();
        // Drop may run inside a runtime: use a thread with a runtime of its own.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async move {
                let sql = format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)");
                if let Err(e) = admin_client().await.batch_execute(&sql).await {
                    eprintln!("warning: could not drop test database {name}: {e}");
                }
            })
        })
        .join();
    }
}

async fn admin_client() -> Client {
    let pg = shardlease::parse_database_url(&base_url()).expect("DATABASE_URL parses");
    shardlease::connect_client(&pg, "shardlease-test-admin")
        .await
        .unwrap_or_else(|e| panic!("PostgreSQL must be running for these tests: {e}"))
}

/// Wait for `cond` to hold, polling every 5 ms; panics naming `what` after `timeout`.
pub async fn eventually<F, Fut>(timeout: Duration, what: &str, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    poll_until(timeout, what, || {
        let fut = cond();
        async move { fut.await.then_some(()) }
    })
    .await
}

/// Poll `f` every 5 ms until it returns `Some`; panics naming `what` after `timeout`.
pub async fn poll_until<T, F, Fut>(timeout: Duration, what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let start = Instant::now();
    loop {
        if let Some(v) = f().await {
            return v;
        }
        if start.elapsed() > timeout {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::with_database;

    #[test]
    fn with_database_replaces_only_the_database() {
        assert_eq!(
            with_database("postgres://u:p@h:5/db?sslmode=disable", "x"),
            "postgres://u:p@h:5/x?sslmode=disable"
        );
        assert_eq!(with_database("postgres://h", "x"), "postgres://h/x");
    }

    #[test]
    fn with_host_port_replaces_only_host_and_port() {
        use super::with_host_port;
        assert_eq!(
            with_host_port("postgres://u:p@h:5/db?sslmode=disable", "127.0.0.1", 6432),
            "postgres://u:p@127.0.0.1:6432/db?sslmode=disable"
        );
        assert_eq!(
            with_host_port("postgres://h", "127.0.0.1", 6432),
            "postgres://127.0.0.1:6432"
        );
        assert_eq!(
            with_host_port("postgres://u@h?x=1", "b", 1),
            "postgres://u@b:1?x=1"
        );
    }
}
