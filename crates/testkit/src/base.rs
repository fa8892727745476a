//! The server the tests run against: `DATABASE_URL`; unset, the local PostgreSQL on
//! 127.0.0.1:5432; and when nothing answers there, a throwaway cluster of this test process
//! (`shardlease-localpg`, the code of the worker's first-run demo), so that
//! `cargo test --workspace` needs no running server.

use shardlease::DbConfig;
use shardlease_localpg::{Builder, Cluster};
use std::sync::OnceLock;

use crate::url::url_of;

/// The server when `DATABASE_URL` is unset.
pub const DEFAULT_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";

/// Replaces [`DEFAULT_URL`], as for `shardlease-worker` (hidden there): for tests of what
/// happens when nothing answers at the default address, without stopping the server there.
pub const DEFAULT_URL_ENV: &str = "SHARDLEASE_DEFAULT_DATABASE_URL";

/// Debian's self-signed certificate, which its PostgreSQL packages serve by default; the
/// throwaway cluster serves it too when this process can read its key, so the TLS tests run
/// against it as against a packaged server.
const SNAKEOIL_CERT: &str = "/etc/ssl/certs/ssl-cert-snakeoil.pem";
const SNAKEOIL_KEY: &str = "/etc/ssl/private/ssl-cert-snakeoil.key";

struct Base {
    config: DbConfig,
    url: String,
    /// Kept for the life of the process; its watchdog removes it when the process ends.
    _cluster: Option<Cluster>,
}

fn base() -> &'static Base {
    static BASE: OnceLock<Base> = OnceLock::new();
    BASE.get_or_init(|| {
        if let Some(url) = std::env::var("DATABASE_URL").ok().filter(|u| !u.is_empty()) {
            let config = shardlease::parse_database_url(&url)
                .unwrap_or_else(|e| panic!("DATABASE_URL: {e}"));
            return Base {
                url,
                config,
                _cluster: None,
            };
        }
        let default = std::env::var(DEFAULT_URL_ENV)
            .ok()
            .filter(|u| !u.is_empty())
            .unwrap_or_else(|| DEFAULT_URL.to_owned());
        let config = shardlease::parse_database_url(&default)
            .unwrap_or_else(|e| panic!("{DEFAULT_URL_ENV}: {e}"));
        if shardlease_localpg::answers_at(&config) {
            return Base {
                url: url_of(&config),
                config,
                _cluster: None,
            };
        }
        throwaway(&shardlease_localpg::address(&config))
    })
}

/// The connection config of the server (its `postgres` database, or DATABASE_URL's).
pub fn base_config() -> DbConfig {
    base().config.clone()
}

/// The server's URL: `DATABASE_URL`, the local PostgreSQL, or this process's throwaway
/// cluster (see the crate docs).
pub fn base_url() -> String {
    base().url.clone()
}

/// Start this process's throwaway cluster, or panic saying what to do.
fn throwaway(default: &str) -> Base {
    let cluster = Builder::new()
        .dir_prefix("shardlease-testkit-pg")
        .max_connections(200)
        .conf("fsync = off")
        .init()
        .and_then(|cluster| {
            serve_snakeoil(&cluster)?;
            cluster.start()?;
            Ok(cluster)
        })
        .unwrap_or_else(|e| {
            panic!(
                "these tests need PostgreSQL: DATABASE_URL is unset, nothing answers at \
                 {default}, and no throwaway cluster could be started: {e}\n\
                 Start a server (or set DATABASE_URL), or install PostgreSQL's programs."
            )
        });
    eprintln!(
        "shardlease-testkit: nothing answers at {default} and DATABASE_URL is unset: \
         this test process runs a throwaway PostgreSQL on 127.0.0.1:{} ({}), removed when it ends",
        cluster.port(),
        cluster.dir().display()
    );
    let config = shardlease::parse_database_url(&cluster.url()).expect("the cluster's URL parses");
    Base {
        url: url_of(&config),
        config,
        _cluster: Some(cluster),
    }
}

/// `ssl = on` with Debian's snakeoil pair, copied into the data directory, when this process
/// can read the key; otherwise the cluster runs without TLS (and the TLS tests say so).
fn serve_snakeoil(cluster: &Cluster) -> shardlease_localpg::Result<()> {
    let (Ok(cert), Ok(key)) = (std::fs::read(SNAKEOIL_CERT), std::fs::read(SNAKEOIL_KEY)) else {
        return Ok(());
    };
    cluster.write_data_file("server.crt", &cert)?;
    cluster.write_data_file("server.key", &key)?;
    cluster.append_conf("ssl = on\nssl_cert_file = 'server.crt'\nssl_key_file = 'server.key'")
}
