//! TLS against the real PostgreSQL server (`DATABASE_URL`, by default the local one), which
//! must have `ssl = on`. Each test gets a fresh database and reaches it under two host names:
//!
//! - the name in the server's certificate: `SHARDLEASE_TEST_TLS_HOST`, else the host of
//!   `DATABASE_URL` when that is a name, else `localhost`;
//! - an address the certificate does not list: the host of `DATABASE_URL` when that is an IP
//!   address, else its first resolved address.
//!
//! The server's certificate must chain to `SHARDLEASE_TEST_SSLROOTCERT`, by default Debian's
//! self-signed snakeoil certificate (`/etc/ssl/certs/ssl-cert-snakeoil.pem`, which
//! PostgreSQL's Debian packages use). User, password and port come from `DATABASE_URL`.

use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use shardlease::{DbConfig, Error, Member, MemberConfig, TlsMode};
use shardlease_testkit::{base_url, TestDb};

const SNAKEOIL: &str = "/etc/ssl/certs/ssl-cert-snakeoil.pem";
/// A real CA certificate (ISRG Root X1) that did not sign the server's certificate.
const UNRELATED_CA: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/fixtures/unrelated-ca.pem"
);

/// A fresh database on a TLS-enabled server, and how to reach it.
struct Tls {
    db: TestDb,
    /// The host name the certificate lists.
    name_host: String,
    /// An address the certificate does not list.
    addr_host: String,
    /// The root the server's certificate chains to.
    root: PathBuf,
}

/// The URL's parts around the host: (before the host, host, port, after the port).
fn split_host(url: &str) -> (String, String, String, String) {
    let scheme_end = url
        .find("://")
        .filter(|_| url.starts_with("postgres://") || url.starts_with("postgresql://"))
        .unwrap_or_else(|| {
            panic!("the TLS tests need DATABASE_URL as a postgres:// URL, not a key=value string")
        })
        + 3;
    let creds_end = url[scheme_end..]
        .find('@')
        .map(|i| scheme_end + i + 1)
        .unwrap_or(scheme_end);
    let authority_end = url[creds_end..]
        .find(['/', '?'])
        .map(|i| creds_end + i)
        .unwrap_or(url.len());
    let authority = &url[creds_end..authority_end];
    assert!(
        !authority.contains(','),
        "the TLS tests need DATABASE_URL with one host, not {authority:?}"
    );
    let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
        let (h, rest) = v6.split_once(']').expect("an IPv6 host ends with ']'");
        (
            h.to_owned(),
            rest.strip_prefix(':').unwrap_or("5432").to_owned(),
        )
    } else {
        match authority.rsplit_once(':') {
            Some((h, p)) => (h.to_owned(), p.to_owned()),
            None => (authority.to_owned(), "5432".to_owned()),
        }
    };
    assert!(
        !host.is_empty() && !host.starts_with('%') && !host.starts_with('/'),
        "the TLS tests need DATABASE_URL with a TCP host, not a Unix socket"
    );
    (
        url[..creds_end].to_owned(),
        host,
        port,
        url[authority_end..].to_owned(),
    )
}

impl Tls {
    async fn new() -> Tls {
        let db = TestDb::empty().await;
        let ssl: String = db
            .client()
            .await
            .query_one("SHOW ssl", &[])
            .await
            .expect("SHOW ssl")
            .get(0);
        assert_eq!(
            ssl,
            "on",
            "the TLS tests need a TLS-enabled PostgreSQL server (ssl = on in postgresql.conf), \
             but the server at DATABASE_URL ({}) reports ssl = {ssl}",
            shardlease::describe_target(&db.pg)
        );
        let root = PathBuf::from(
            std::env::var("SHARDLEASE_TEST_SSLROOTCERT").unwrap_or_else(|_| SNAKEOIL.to_owned()),
        );
        if let Err(e) = std::fs::read(&root) {
            panic!(
                "the TLS tests need the server's root certificate at {} (set \
                 SHARDLEASE_TEST_SSLROOTCERT to another PEM file), but it cannot be read: {e}",
                root.display()
            );
        }
        let (_, base_host, port, _) = split_host(&base_url());
        let base_ip = base_host.parse::<IpAddr>().ok();
        let name_host = std::env::var("SHARDLEASE_TEST_TLS_HOST").unwrap_or_else(|_| {
            if base_ip.is_some() {
                "localhost".to_owned()
            } else {
                base_host.clone()
            }
        });
        let addr_host = match base_ip {
            Some(ip) => ip.to_string(),
            None => tokio::net::lookup_host(format!("{base_host}:{port}"))
                .await
                .unwrap_or_else(|e| panic!("cannot resolve {base_host}: {e}"))
                .next()
                .unwrap_or_else(|| panic!("{base_host} resolves to no address"))
                .ip()
                .to_string(),
        };
        Tls {
            db,
            name_host,
            addr_host,
            root,
        }
    }

    fn root(&self) -> String {
        self.root.display().to_string()
    }

    /// The test database's URL with `host`, DATABASE_URL's own TLS parameters dropped and
    /// the query parameters `params` appended.
    fn url(&self, host: &str, params: &str) -> String {
        let (head, _, port, tail) = split_host(&self.db.url);
        let host = if host.contains(':') {
            format!("[{host}]")
        } else {
            host.to_owned()
        };
        let (path, query) = tail.split_once('?').unwrap_or((&tail, ""));
        let query: Vec<&str> = query
            .split('&')
            .filter(|p| {
                !p.is_empty() && !p.starts_with("sslmode=") && !p.starts_with("sslrootcert=")
            })
            .chain([params])
            .collect();
        format!("{head}{host}:{port}{path}?{}", query.join("&"))
    }

    fn config(&self, host: &str, params: &str) -> DbConfig {
        let url = self.url(host, params);
        shardlease::parse_database_url(&url).unwrap_or_else(|e| panic!("{url}: {e}"))
    }

    /// Connect as `params` say; true when the session uses TLS.
    async fn uses_tls(&self, host: &str, params: &str) -> shardlease::Result<bool> {
        let client = shardlease::connect_client(&self.config(host, params), "tls-test").await?;
        let row = client
            .query_one(
                "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
                &[],
            )
            .await?;
        Ok(row.get(0))
    }

    async fn connects_with_tls(&self, host: &str, params: &str) {
        match self.uses_tls(host, params).await {
            Ok(ssl) => assert!(ssl, "{host} with {params}: connected without TLS"),
            Err(e) => panic!("{host} with {params}: {e}"),
        }
    }

    /// The connection must fail with a TLS error; returns its message.
    async fn rejected(&self, host: &str, params: &str) -> String {
        match self.uses_tls(host, params).await {
            Ok(ssl) => {
                panic!("{host} with {params}: connected (ssl = {ssl}), expected a TLS error")
            }
            Err(e @ Error::Tls { .. }) => {
                assert!(!e.is_transient(), "{e}");
                e.to_string()
            }
            Err(e) => panic!("{host} with {params}: expected Error::Tls, got {e:?}"),
        }
    }
}

#[tokio::test]
async fn disable_and_the_default_connect_without_tls() {
    let t = Tls::new().await;
    for params in ["sslmode=disable", "sslmode=prefer", "sslmode=allow"] {
        assert!(!t.uses_tls(&t.addr_host, params).await.unwrap(), "{params}");
    }
    // No sslmode at all: plain, as before TLS was built in (DATABASE_URL's own sslmode, if any, wins).
    let url = shardlease::parse_database_url(&t.db.url).unwrap();
    if url.tls_mode() == TlsMode::Prefer {
        let client = shardlease::connect_client(&url, "tls-test").await.unwrap();
        let ssl: bool = client
            .query_one(
                "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        assert!(!ssl);
    }
}

#[tokio::test]
async fn require_encrypts_without_verifying() {
    let t = Tls::new().await;
    // Any name, and a certificate that chains to no root we know: encrypt only.
    t.connects_with_tls(&t.addr_host, "sslmode=require").await;
    t.connects_with_tls(&t.name_host, "sslmode=require").await;
}

#[tokio::test]
async fn require_with_a_root_verifies_the_chain_like_verify_ca() {
    let t = Tls::new().await;
    let root = t.root();
    t.connects_with_tls(&t.addr_host, &format!("sslmode=require&sslrootcert={root}"))
        .await;
    let err = t
        .rejected(
            &t.addr_host,
            &format!("sslmode=require&sslrootcert={UNRELATED_CA}"),
        )
        .await;
    assert!(err.contains("unknown issuer"), "{err}");
    assert!(
        err.contains(UNRELATED_CA),
        "names the roots it trusted: {err}"
    );
}

#[tokio::test]
async fn verify_full_by_the_certificates_name_connects() {
    let t = Tls::new().await;
    let root = t.root();
    t.connects_with_tls(
        &t.name_host,
        &format!("sslmode=verify-full&sslrootcert={root}"),
    )
    .await;
}

#[tokio::test]
async fn verify_full_by_an_unlisted_address_is_a_hostname_error() {
    let t = Tls::new().await;
    let root = t.root();
    let err = t
        .rejected(
            &t.addr_host,
            &format!("sslmode=verify-full&sslrootcert={root}"),
        )
        .await;
    assert!(err.contains("hostname mismatch"), "{err}");
    assert!(err.contains(&t.addr_host), "names the host: {err}");
    assert!(
        err.contains("sslmode=verify-ca"),
        "suggests the way out: {err}"
    );
}

#[tokio::test]
async fn verify_ca_checks_the_chain_but_not_the_name() {
    let t = Tls::new().await;
    let root = t.root();
    t.connects_with_tls(
        &t.addr_host,
        &format!("sslmode=verify-ca&sslrootcert={root}"),
    )
    .await;
    t.connects_with_tls(
        &t.name_host,
        &format!("sslmode=verify-ca&sslrootcert={root}"),
    )
    .await;
    // The chain still counts: the default (webpki) roots did not sign the server's certificate.
    let err = t.rejected(&t.addr_host, "sslmode=verify-ca").await;
    assert!(err.contains("unknown issuer"), "{err}");
}

#[tokio::test]
async fn verify_full_with_the_default_roots_rejects_a_private_ca() {
    let t = Tls::new().await;
    for params in ["sslmode=verify-full", "sslrootcert=system"] {
        let err = t.rejected(&t.name_host, params).await;
        assert!(err.contains("unknown issuer"), "{params}: {err}");
        assert!(err.contains("webpki"), "{params}: says which roots: {err}");
        assert!(
            err.contains("sslrootcert"),
            "{params}: says what to set: {err}"
        );
    }
}

#[tokio::test]
async fn a_missing_root_file_is_named() {
    let t = Tls::new().await;
    let missing = "/nonexistent/shardlease/root.pem";
    let err = shardlease::parse_database_url(&t.url(
        &t.name_host,
        &format!("sslmode=verify-full&sslrootcert={missing}"),
    ))
    .unwrap_err();
    assert!(matches!(err, Error::Url(_)), "{err:?}");
    assert!(err.to_string().contains(missing), "{err}");
    assert!(err.to_string().contains("cannot be read"), "{err}");

    // The file is read again at every connection: one that vanished after parsing is named too.
    let copy = std::env::temp_dir().join(format!("shardlease-tls-root-{}.pem", std::process::id()));
    std::fs::copy(&t.root, &copy).unwrap();
    let cfg = t.config(
        &t.name_host,
        &format!("sslmode=verify-full&sslrootcert={}", copy.display()),
    );
    std::fs::remove_file(&copy).unwrap();
    let err = shardlease::connect_client(&cfg, "tls-test")
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Tls { .. }), "{err:?}");
    assert!(
        err.to_string().contains(&copy.display().to_string()),
        "{err}"
    );
}

#[tokio::test]
async fn key_value_strings_take_the_same_parameters() {
    let t = Tls::new().await;
    let base = t.config(&t.name_host, "sslmode=disable");
    let quote = |s: &str| format!("'{}'", s.replace('\\', "\\\\").replace('\'', "\\'"));
    let mut s = format!(
        "host={} port={} user={} dbname={} sslmode=verify-full sslrootcert={}",
        t.name_host,
        base.get_ports().first().copied().unwrap_or(5432),
        quote(base.get_user().unwrap()),
        quote(&t.db.name),
        quote(&t.root()),
    );
    if let Some(password) = base.get_password() {
        s.push_str(&format!(
            " password={}",
            quote(std::str::from_utf8(password).unwrap())
        ));
    }
    let cfg = shardlease::parse_database_url(&s).unwrap();
    assert_eq!(cfg.tls_mode(), TlsMode::VerifyFull);
    let client = shardlease::connect_client(&cfg, "tls-test").await.unwrap();
    let ssl: bool = client
        .query_one(
            "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(ssl);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_joins_and_leaves_over_verified_tls() {
    let t = Tls::new().await;
    shardlease::migrate(&mut t.db.client().await).await.unwrap();
    let cfg = t.config(
        &t.name_host,
        &format!("sslmode=verify-full&sslrootcert={}", t.root()),
    );
    let member = Member::join(
        &cfg,
        MemberConfig::new("tls", "a")
            .heartbeat(Duration::from_millis(200))
            .lease_ttl(Duration::from_secs(2)),
    )
    .await
    .unwrap();
    let view = member
        .wait_for(Duration::from_secs(5), |v| v.is_joined())
        .await
        .expect("joined");
    assert_eq!(view.members.len(), 1);
    // The member's session connection is the one encrypted.
    let observer = t.db.client().await;
    let ssl: Vec<bool> = observer
        .query(
            "SELECT s.ssl FROM shardlease.leases l JOIN pg_stat_ssl s ON s.pid = l.backend_pid",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(ssl, vec![true], "the member's session connection");
    member.leave().await.unwrap();
    let leases: i64 = observer
        .query_one("SELECT count(*) FROM shardlease.leases", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(leases, 0);
}
