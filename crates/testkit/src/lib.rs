//! Test support shared by the workspace's tests and benchmarks, after sqlx's test harness:
//! every test gets a fresh PostgreSQL database of its own, named after the test
//! (`sl_<test>_<suffix>`), created, and dropped with its connections when the [`TestDb`] is
//! dropped, so tests run in parallel; and every wait is bounded and says what it waited for.
//!
//! The server is `DATABASE_URL`, by default `postgres://postgres@127.0.0.1:5432/postgres`.
//! When `DATABASE_URL` is unset and nothing answers there, each test process starts a
//! throwaway cluster of its own from the local installation (`shardlease-localpg`, as the
//! worker's `demo` does), removed when the process ends, so `cargo test --workspace` needs no
//! running server.
//!
//! A registry table in the server's admin database (`shardlease_testkit.databases`) records
//! which test process owns which database; the first test of a later run drops the
//! databases of processes that were killed before they could.
//!
//! [`PgBouncer`] runs a real PgBouncer in front of that server (transaction pooling by
//! default), for the work path behind a pooler; tests skip, saying why, without the binary.
//! Tests that restart the server, change its settings, need many connections or measure its
//! CPU run a [`PrivateServer`] of their own instead; [`cluster_cpu_time`] and [`CpuUse`]
//! measure a cluster's CPU from `/proc`.
#![deny(missing_docs)]

mod base;
mod cpu;
mod database;
mod pgbouncer;
mod proxy;
mod registry;
mod roles;
mod server;
mod url;

pub use base::{base_config, base_url, DEFAULT_URL, DEFAULT_URL_ENV};
pub use cpu::{cluster_cpu_time, CpuUse};
pub use database::{current_test, TestDb};
pub use pgbouncer::{PgBouncer, PoolMode};
pub use proxy::{AfterBlackhole, ConnInfo, Proxy};
pub use roles::TestRole;
pub use server::{PrivateServer, PrivateServerBuilder};
pub use url::{url_of, with_host_port};

use std::time::{Duration, Instant};

/// Whether the server `c` talks to is at least `version_num` (`server_version_num`, such as
/// `150000` for PostgreSQL 15), for tests of what older servers lack.
pub async fn server_at_least(c: &shardlease::tokio_postgres::Client, version_num: i32) -> bool {
    c.query_one(
        "SELECT current_setting('server_version_num')::int >= $1",
        &[&version_num],
    )
    .await
    .expect("read server_version_num")
    .get(0)
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
