//! One fresh database per test, named after the test (`sl_<test>_<suffix>`), recorded in the
//! registry before it exists, dropped with its connections when the [`TestDb`] is dropped.

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};

use shardlease::tokio_postgres::error::SqlState;
use shardlease::tokio_postgres::Client;
use shardlease::DbConfig;

use crate::base::base_config;
use crate::registry::{self, quote_ident};
use crate::url::url_of;

/// PostgreSQL's longest identifier, bytes (NAMEDATALEN - 1).
const MAX_NAME: usize = 63;
/// `sl_`, the test's part, `_`, then this many random base-36 characters.
const SUFFIX: usize = 6;
const PREFIX: &str = "sl_";

/// A fresh database, dropped (with its connections) when this value is dropped.
pub struct TestDb {
    /// The database's name: `sl_<test>_<suffix>`.
    pub name: String,
    /// Its URL (written from [`TestDb::pg`]), for processes a test starts.
    pub url: String,
    /// Its connection config: the server's, with this database.
    pub pg: DbConfig,
}

impl TestDb {
    /// A new, empty database, named after the running test (the test harness names each
    /// test's thread after it; elsewhere, after the executable).
    pub async fn empty() -> TestDb {
        TestDb::named(&current_test()).await
    }

    /// A new, empty database named after `test` (sanitized, shortened, made unique).
    pub async fn named(test: &str) -> TestDb {
        let admin = admin_client().await;
        let registered = registry::prepare(&admin).await;
        let name = loop {
            let name = database_name(test);
            if registered {
                match registry::record(&admin, &name, test).await {
                    Ok(true) => {}
                    Ok(false) => continue, // taken: draw another suffix
                    Err(e) => panic!("recording test database {name}: {e}"),
                }
            }
            match admin
                .batch_execute(&format!("CREATE DATABASE {}", quote_ident(&name)))
                .await
            {
                Ok(()) => break name,
                Err(e) => {
                    if registered {
                        registry::forget(&admin, &name).await;
                    }
                    if e.code() == Some(&SqlState::DUPLICATE_DATABASE) {
                        continue;
                    }
                    panic!("creating test database {name}: {e}");
                }
            }
        };
        let mut pg = base_config();
        pg.pg_mut().dbname(&name);
        TestDb {
            url: url_of(&pg),
            name,
            pg,
        }
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
                let admin = admin_client().await;
                match registry::drop_database(&admin, &name).await {
                    // Forgotten only once gone: a failed drop is retried by a later run.
                    Ok(()) => registry::forget(&admin, &name).await,
                    Err(e) => eprintln!("warning: could not drop test database {name}: {e}"),
                }
            })
        })
        .join();
    }
}

pub(crate) async fn admin_client() -> Client {
    shardlease::connect_client(&base_config(), "shardlease-test-admin")
        .await
        .unwrap_or_else(|e| panic!("PostgreSQL must be running for these tests: {e}"))
}

/// The running test's name: its thread's name (the harness names each test's thread after
/// the test, `module::test`; the last part is kept), or for the main thread or a runtime's
/// worker, the executable's name without cargo's hash.
pub fn current_test() -> String {
    let thread = std::thread::current();
    match thread.name() {
        Some(name) if !matches!(name, "main" | "tokio-runtime-worker") => {
            name.rsplit("::").next().unwrap_or(name).to_owned()
        }
        _ => std::env::current_exe()
            .ok()
            .and_then(|p| p.file_stem()?.to_str().map(str::to_owned))
            .map(|stem| match stem.rsplit_once('-') {
                Some((name, hash)) if hash.chars().all(|c| c.is_ascii_hexdigit()) => {
                    name.to_owned()
                }
                _ => stem,
            })
            .unwrap_or_else(|| "test".to_owned()),
    }
}

/// `sl_<test, sanitized and shortened>_<6 random base-36 characters>`, at most 63 bytes of
/// `[a-z0-9_]`.
pub(crate) fn database_name(test: &str) -> String {
    let mut part = String::new();
    for c in test.chars() {
        let c = c.to_ascii_lowercase();
        let c = if c.is_ascii_alphanumeric() { c } else { '_' };
        if !(c == '_' && (part.is_empty() || part.ends_with('_'))) {
            part.push(c);
        }
    }
    let room = MAX_NAME - PREFIX.len() - 1 - SUFFIX;
    part.truncate(room);
    let part = part.trim_end_matches('_');
    let part = if part.is_empty() { "test" } else { part };
    format!("{PREFIX}{part}_{}", suffix())
}

/// Random base-36 characters: a randomly keyed hash (std's `RandomState`) of a counter.
fn suffix() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut h = RandomState::new().build_hasher();
    h.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
    h.write_u32(std::process::id());
    let mut n = h.finish();
    let mut out = String::with_capacity(SUFFIX);
    for _ in 0..SUFFIX {
        out.push(char::from_digit((n % 36) as u32, 36).unwrap_or('0'));
        n /= 36;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_the_sanitized_test_name_and_a_suffix() {
        let name = database_name("Tests::A-zero lease/TTL!");
        let (part, suffix) = name.rsplit_once('_').unwrap();
        assert_eq!(part, "sl_tests_a_zero_lease_ttl");
        assert_eq!(suffix.len(), SUFFIX);
        assert!(suffix.chars().all(|c| c.is_ascii_alphanumeric()));
        let long = database_name(&"x".repeat(200));
        assert_eq!(long.len(), MAX_NAME, "{long}");
        assert!(database_name("???").starts_with("sl_test_"));
        assert_ne!(database_name("t"), database_name("t"), "unique suffixes");
    }

    #[test]
    fn the_current_test_is_named_after_its_thread() {
        assert_eq!(current_test(), "the_current_test_is_named_after_its_thread");
    }
}
