//! Login roles for the tests of least-privilege roles: created with a unique name, never a
//! superuser nor an owner of anything, and dropped again (with their privileges in the test
//! database) when the [`TestRole`] is dropped.

use std::sync::atomic::{AtomicU32, Ordering};

use shardlease::tokio_postgres::config::Host;
use shardlease::tokio_postgres::Client;
use shardlease::DbConfig;

use crate::database::admin_client;
use crate::TestDb;

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A login role (`LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE`, with a password) for one test
/// database. Roles are global to the server: dropping this value revokes its privileges in
/// that database (`DROP OWNED BY`) and drops the role.
pub struct TestRole {
    /// The role's name: `sl_<purpose>_<pid>_<n>`.
    pub name: String,
    /// Its password.
    pub password: String,
    /// The database it is meant for.
    db_name: String,
    /// Connections as this role to that database.
    pub pg: DbConfig,
    /// `postgres://` URL of that database as this role (for the worker binary).
    pub url: String,
}

impl TestRole {
    /// Create a role for `db`; `purpose` (`member`, `inspector`) goes into its name.
    pub async fn create(db: &TestDb, purpose: &str) -> TestRole {
        let name = format!(
            "sl_{purpose}_{}_{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        let password = format!("pw-{name}");
        admin_client()
            .await
            .batch_execute(&format!(
                "CREATE ROLE {name} LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE PASSWORD '{password}'"
            ))
            .await
            .unwrap_or_else(|e| panic!("creating role {name}: {e}"));
        let mut pg = db.pg.clone();
        pg.pg_mut().user(&name).password(password.as_bytes());
        let host = match pg.get_hosts().first() {
            Some(Host::Tcp(h)) if h.contains(':') => format!("[{h}]"),
            Some(Host::Tcp(h)) => h.clone(),
            other => panic!("the role tests need a TCP host, not {other:?}"),
        };
        let port = pg.get_ports().first().copied().unwrap_or(5432);
        let url = format!("postgres://{name}:{password}@{host}:{port}/{}", db.name);
        TestRole {
            name,
            password,
            db_name: db.name.clone(),
            pg,
            url,
        }
    }

    /// A plain connection as this role.
    pub async fn client(&self) -> Client {
        shardlease::connect_client(&self.pg, &format!("shardlease-test {}", self.name))
            .await
            .unwrap_or_else(|e| panic!("connect as role {}: {e}", self.name))
    }
}

impl Drop for TestRole {
    fn drop(&mut self) {
        let name = self.name.clone();
        let mut cfg = crate::base_config();
        cfg.pg_mut().dbname(&self.db_name);
        let db = crate::url_of(&cfg);
        // Drop may run inside a runtime: use a thread with a runtime of its own.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async move {
                // Its privileges in the test database first (gone anyway once that is dropped).
                if let Ok(pg) = shardlease::parse_database_url(&db) {
                    if let Ok(c) = shardlease::connect_client(&pg, "shardlease-test-admin").await
                    {
                        let _ = c.batch_execute(&format!("DROP OWNED BY {name}")).await;
                    }
                }
                let admin = admin_client().await;
                let _ = admin
                    .batch_execute(&format!(
                        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = '{name}'"
                    ))
                    .await;
                if let Err(e) = admin
                    .batch_execute(&format!("DROP ROLE IF EXISTS {name}"))
                    .await
                {
                    eprintln!("warning: could not drop test role {name}: {e}");
                }
            })
        })
        .join();
    }
}
