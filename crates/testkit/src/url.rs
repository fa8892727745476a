//! A connection config written back as a `postgres://` URL, for the processes a test starts
//! (`DATABASE_URL` of a worker): configs are edited as configs, never as strings.

use std::fmt::Write;

use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};
use shardlease::tokio_postgres::config::Host;
use shardlease::{DbConfig, TlsMode};

/// RFC 3986's unreserved characters stay; everything else is percent-encoded.
const COMPONENT: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

fn enc(s: &str) -> String {
    utf8_percent_encode(s, COMPONENT).to_string()
}

/// `cfg` as a `postgres://` URL that [`shardlease::parse_database_url`] reads back to the
/// same user, password, hosts, ports, database, `options`, `application_name`,
/// `connect_timeout`, `sslmode` and `sslrootcert` (other driver settings are not carried).
pub fn url_of(cfg: &DbConfig) -> String {
    let pg = cfg.pg();
    let mut url = String::from("postgres://");
    if let Some(user) = pg.get_user() {
        url += &enc(user);
        if let Some(password) = pg.get_password() {
            url.push(':');
            url += &enc(&String::from_utf8_lossy(password));
        }
        url.push('@');
    }
    let ports = pg.get_ports();
    let hosts: Vec<String> = pg
        .get_hosts()
        .iter()
        .enumerate()
        .map(|(i, host)| {
            let mut h = match host {
                Host::Tcp(name) if name.contains(':') => format!("[{name}]"),
                Host::Tcp(name) => enc(name),
                Host::Unix(path) => enc(&path.display().to_string()),
            };
            // One port for every host, or one per host.
            if let Some(port) = ports.get(i).or(ports.first().filter(|_| ports.len() == 1)) {
                let _ = write!(h, ":{port}");
            }
            h
        })
        .collect();
    url += &hosts.join(",");
    if let Some(db) = pg.get_dbname() {
        url.push('/');
        url += &enc(db);
    }
    let mut query: Vec<String> = Vec::new();
    if cfg.tls_mode() != TlsMode::Prefer {
        query.push(format!("sslmode={}", cfg.tls_mode()));
    }
    if let Some(root) = cfg.root_cert() {
        // `system` or the file's path, as libpq spells it.
        query.push(format!("sslrootcert={}", enc(&root.to_string())));
    }
    if let Some(timeout) = pg.get_connect_timeout() {
        query.push(format!("connect_timeout={}", timeout.as_secs().max(1)));
    }
    if let Some(options) = pg.get_options() {
        query.push(format!("options={}", enc(options)));
    }
    if let Some(name) = pg.get_application_name() {
        query.push(format!("application_name={}", enc(name)));
    }
    if !query.is_empty() {
        url.push('?');
        url += &query.join("&");
    }
    url
}

/// `url` with its host and port replaced, keeping its user, password, database and query
/// string: where a test puts a proxy in front of the server. Only the authority is touched.
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

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip(url: &str) {
        let a = shardlease::parse_database_url(url).unwrap_or_else(|e| panic!("{url}: {e}"));
        let written = url_of(&a);
        let b = shardlease::parse_database_url(&written)
            .unwrap_or_else(|e| panic!("{url} written as {written}: {e}"));
        let (pa, pb) = (a.pg(), b.pg());
        assert_eq!(pa.get_user(), pb.get_user(), "{url} → {written}");
        assert_eq!(pa.get_password(), pb.get_password(), "{url} → {written}");
        assert_eq!(pa.get_hosts(), pb.get_hosts(), "{url} → {written}");
        assert_eq!(pa.get_ports(), pb.get_ports(), "{url} → {written}");
        assert_eq!(pa.get_dbname(), pb.get_dbname(), "{url} → {written}");
        assert_eq!(pa.get_options(), pb.get_options(), "{url} → {written}");
        assert_eq!(
            pa.get_application_name(),
            pb.get_application_name(),
            "{url} → {written}"
        );
        assert_eq!(
            pa.get_connect_timeout(),
            pb.get_connect_timeout(),
            "{url} → {written}"
        );
        assert_eq!(a.tls_mode(), b.tls_mode(), "{url} → {written}");
        assert_eq!(a.root_cert(), b.root_cert(), "{url} → {written}");
    }

    #[test]
    fn urls_read_back_to_the_same_config() {
        round_trip("postgres://postgres@127.0.0.1:5432/postgres");
        round_trip("postgres://u%40x:p%3A%2F%20w@db.example:6543/my%20db?sslmode=require");
        round_trip("postgres://u@h1:1,h2:2/d?connect_timeout=9&application_name=a%20b");
        round_trip("postgres://u@[::1]:5432/d?options=-c%20search_path%3Dx");
        round_trip("postgres://u@%2Fvar%2Frun%2Fpostgresql/d");
        round_trip("postgres://u@h/d?sslmode=verify-full&sslrootcert=system");
        round_trip("host=h port=7 user=u password='a b' dbname=x sslmode=disable");
    }

    #[test]
    fn a_new_database_name_changes_only_the_database() {
        let mut cfg = shardlease::parse_database_url(
            "postgres://u:p@h:5/db?sslmode=require&application_name=t",
        )
        .unwrap();
        cfg.pg_mut().dbname("other");
        assert_eq!(
            url_of(&cfg),
            "postgres://u:p@h:5/other?sslmode=require&connect_timeout=5&application_name=t"
        );
    }
}
