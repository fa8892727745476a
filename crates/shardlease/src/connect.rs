//! Connections: URL parsing with clear errors, TLS as libpq's `sslmode` says (see the
//! `tls` module), and connections whose notifications arrive on a channel (the
//! tokio-postgres `poll_message` pattern).

use std::ops::Deref;
use std::time::Duration;

use futures_util::{stream, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_postgres::config::SslMode;
use tokio_postgres::tls::MakeTlsConnect;
use tokio_postgres::{AsyncMessage, CancelToken, Client, Config, Connection, NoTls, Notification};

use crate::error::{Error, Result};
use crate::tcp::{self, Endpoints};
use crate::tls::{self, ClientCert, RootCert, TlsMode, Verification};

/// Where to connect and how: tokio-postgres's [`Config`] plus the TLS settings (libpq's
/// `sslmode`, `sslrootcert` and the client certificate: `sslcert`, `sslkey`, `sslpassword`),
/// which tokio-postgres's own config cannot hold.
///
/// Made by [`parse_database_url`], or from a [`Config`] you built (`DbConfig::from(config)`:
/// its `ssl_mode` `Require` becomes [`TlsMode::Require`], anything else no TLS). It
/// dereferences to the [`Config`] for reading; [`DbConfig::pg_mut`] edits it. The TLS mode
/// of a connection comes from [`DbConfig::tls_mode`] only: the inner config's `ssl_mode` is
/// kept in step (`Require` when TLS is used, `Disable` otherwise) and overridden on connect.
#[derive(Debug, Clone)]
pub struct DbConfig {
    pg: Config,
    tls_mode: TlsMode,
    root_cert: Option<RootCert>,
    client_cert: Option<ClientCert>,
}

impl DbConfig {
    /// `pg` with the TLS settings its `ssl_mode` implies (`Require`: encrypt only; else none).
    pub fn new(pg: Config) -> DbConfig {
        let tls_mode = match pg.get_ssl_mode() {
            SslMode::Require => TlsMode::Require,
            SslMode::Disable => TlsMode::Disable,
            _ => TlsMode::Prefer,
        };
        DbConfig {
            pg,
            tls_mode,
            root_cert: None,
            client_cert: None,
        }
        .in_step()
    }

    /// Set the TLS mode and the trusted roots, checked as libpq does
    /// (`sslrootcert=system` needs `verify-full`). A root file is read at every connection
    /// attempt, so a renewed CA file is picked up without a restart.
    #[must_use = "a setter returns the changed value; the original is consumed"]
    pub fn with_tls(mut self, mode: TlsMode, root_cert: Option<RootCert>) -> Result<DbConfig> {
        if root_cert == Some(RootCert::System) && mode != TlsMode::VerifyFull {
            return Err(Error::Config(format!(
                "sslrootcert=system needs sslmode=verify-full (or no sslmode), not sslmode={mode}: \
                 trusting the public roots without checking the host name would accept any \
                 publicly certified server"
            )));
        }
        check_client_cert(mode, self.client_cert.as_ref())?;
        self.tls_mode = mode;
        self.root_cert = root_cert;
        Ok(self.in_step())
    }

    /// Set the client certificate (libpq's `sslcert`, `sslkey`, `sslpassword`), presented
    /// when the server asks for one. It needs a TLS mode (`require`, `verify-ca` or
    /// `verify-full`): the other modes connect without TLS here. Its files are read at every
    /// connection attempt.
    #[must_use = "a setter returns the changed value; the original is consumed"]
    pub fn with_client_cert(mut self, cert: Option<ClientCert>) -> Result<DbConfig> {
        check_client_cert(self.tls_mode, cert.as_ref())?;
        self.client_cert = cert;
        Ok(self)
    }

    /// The client certificate, if given.
    pub fn client_cert(&self) -> Option<&ClientCert> {
        self.client_cert.as_ref()
    }

    /// The driver config.
    pub fn pg(&self) -> &Config {
        &self.pg
    }

    /// The driver config, to edit. Its `ssl_mode` is ignored: see [`DbConfig::with_tls`].
    pub fn pg_mut(&mut self) -> &mut Config {
        &mut self.pg
    }

    /// libpq's `sslmode`.
    pub fn tls_mode(&self) -> TlsMode {
        self.tls_mode
    }

    /// libpq's `sslrootcert`, if given.
    pub fn root_cert(&self) -> Option<&RootCert> {
        self.root_cert.as_ref()
    }

    /// What connections verify; `None` for plain connections. As in libpq, connections
    /// over Unix-domain sockets never use TLS.
    fn verification(&self) -> Option<Verification> {
        if only_unix_sockets(&self.pg) {
            return None;
        }
        tls::verification(self.tls_mode, self.root_cert.as_ref())
    }

    /// Keep the inner config's `ssl_mode` in step, so that even a connection made from
    /// [`DbConfig::pg`] without our connector cannot silently go without TLS.
    fn in_step(mut self) -> DbConfig {
        let mode = if self.verification().is_some() {
            SslMode::Require
        } else {
            SslMode::Disable
        };
        self.pg.ssl_mode(mode);
        self
    }
}

/// A client certificate is only ever sent over TLS: refuse one with a mode that never uses it.
fn check_client_cert(mode: TlsMode, cert: Option<&ClientCert>) -> Result<()> {
    match cert {
        Some(c) if !mode.uses_tls() => Err(Error::Config(format!(
            "sslcert {} is given but sslmode={mode} connects without TLS, so the certificate \
             would never be sent: use sslmode=verify-full (or verify-ca, or require)",
            c.cert.display()
        ))),
        _ => Ok(()),
    }
}

#[cfg(unix)]
fn only_unix_sockets(pg: &Config) -> bool {
    let hosts = pg.get_hosts();
    !hosts.is_empty()
        && hosts
            .iter()
            .all(|h| matches!(h, tokio_postgres::config::Host::Unix(_)))
}

#[cfg(not(unix))]
fn only_unix_sockets(_: &Config) -> bool {
    false
}

impl Deref for DbConfig {
    type Target = Config;

    fn deref(&self) -> &Config {
        &self.pg
    }
}

/// Parses a `postgres://` URL or a key=value string: see [`parse_database_url`].
///
/// ```
/// let cfg: shardlease::DbConfig = "postgres://app@db:5432/app?sslmode=verify-full".parse().unwrap();
/// assert_eq!(cfg.target(), "db:5432/app as app");
/// ```
impl std::str::FromStr for DbConfig {
    type Err = Error;

    fn from_str(url: &str) -> Result<DbConfig> {
        parse_database_url(url)
    }
}

impl DbConfig {
    /// Open a plain connection named `application_name`, with TLS and client certificate as
    /// this config says.
    ///
    /// ```no_run
    /// # async fn f() -> shardlease::Result<()> {
    /// let pg: shardlease::DbConfig = "postgres://postgres@127.0.0.1/postgres".parse()?;
    /// let client = pg.connect("my-service").await?;
    /// # Ok(()) }
    /// ```
    pub async fn connect(&self, application_name: &str) -> Result<Client> {
        let (client, _notifications) = connect(self, application_name).await?;
        Ok(client)
    }

    /// "host:port/database as user", for messages: never the password.
    pub fn target(&self) -> String {
        describe_target(&self.pg)
    }
}

impl From<Config> for DbConfig {
    fn from(pg: Config) -> DbConfig {
        DbConfig::new(pg)
    }
}

/// Parse a `postgres://` URL (or a key=value string) into a connection config: the same as
/// `url.parse::<DbConfig>()` ([`DbConfig`] is [`FromStr`](std::str::FromStr)).
///
/// The error never repeats the password. TLS follows libpq's `sslmode`: `disable`, `allow`
/// and `prefer` (the default) connect without TLS; `require` encrypts without verifying the
/// server (unless `sslrootcert` is given: then as `verify-ca`); `verify-ca` checks the
/// certificate chain against `sslrootcert` (a PEM file; by default the bundled webpki
/// roots); `verify-full` also checks the host name. `sslrootcert=system` means the webpki
/// roots and implies `verify-full`. A root certificate file is checked here, and read
/// again at every connection attempt.
///
/// A client certificate is `sslcert` (PEM, with any intermediates) and `sslkey` (its PEM
/// private key, at most 0600, or 0640 when owned by root), with `sslpassword` for a key
/// encrypted as PKCS#8; both files are checked here too, and it needs a TLS mode.
///
/// ```
/// let cfg = shardlease::parse_database_url("postgres://app:secret@db:5432/app").unwrap();
/// assert_eq!(shardlease::describe_target(&cfg), "db:5432/app as app");
/// assert_eq!(cfg.tls_mode(), shardlease::TlsMode::Prefer);
/// let cfg = shardlease::parse_database_url("postgres://db/app?sslmode=verify-full").unwrap();
/// assert_eq!(cfg.tls_mode(), shardlease::TlsMode::VerifyFull);
/// assert!(shardlease::parse_database_url("mysql://x").is_err());
/// ```
pub fn parse_database_url(url: &str) -> Result<DbConfig> {
    let params = tls::take_tls_params(url);
    if let Some(key) = &params.unsupported {
        return Err(Error::Url(format!(
            "{key} is not supported: certificate revocation lists are not built in"
        )));
    }
    let client_cert = client_cert(&params)?;
    let root_cert = params
        .sslrootcert
        .as_deref()
        .filter(|s| !s.is_empty())
        .map(RootCert::parse);
    let tls_mode = match params.sslmode.as_deref() {
        Some(mode) => mode.parse::<TlsMode>().map_err(Error::Url)?,
        // libpq: sslrootcert=system makes verify-full the default.
        None if root_cert == Some(RootCert::System) => TlsMode::VerifyFull,
        None => TlsMode::Prefer,
    };
    let mut cfg: Config = params.rest.parse().map_err(|e: tokio_postgres::Error| {
        Error::Url(format!(
            "{e} (expected postgres://user:password@host:port/database)"
        ))
    })?;
    if cfg.get_hosts().is_empty() {
        return Err(Error::Url("no host given".into()));
    }
    if cfg.get_user().is_none() {
        cfg.user("postgres");
    }
    if cfg.get_connect_timeout().is_none() {
        cfg.connect_timeout(Duration::from_secs(5));
    }
    notice_dead_peers(&mut cfg);
    let db = DbConfig::new(cfg)
        .with_tls(tls_mode, root_cert)
        .and_then(|db| db.with_client_cert(client_cert))
        .map_err(|e| match e {
            Error::Config(m) => Error::Url(m),
            e => e,
        })?;
    // Fail now, not at the first connection, on a root certificate file that cannot be used.
    if let (Some(Verification::Chain | Verification::Full), Some(root)) =
        (db.verification(), db.root_cert())
    {
        tls::load_roots(Some(root)).map_err(Error::Url)?;
    }
    if let (Some(_), Some(c)) = (db.verification(), db.client_cert()) {
        tls::load_client_cert(c).map_err(Error::Url)?;
    }
    Ok(db)
}

/// tokio-postgres's default keepalive idle time (the kernel's): two hours.
const DRIVER_KEEPALIVES_IDLE: Duration = Duration::from_secs(2 * 60 * 60);

/// Notice a silently dead peer (a partition without a reset, a hung host) in seconds, not
/// in the kernel's two hours of keepalive silence or fifteen minutes of retransmissions:
/// keepalives after 5 s idle, every 1 s, 3 probes; and unacknowledged data for at most 10 s
/// (`tcp_user_timeout`). Whatever the URL sets itself is kept (`keepalives=0` turns the
/// probes off).
fn notice_dead_peers(cfg: &mut Config) {
    if cfg.get_keepalives_idle() == DRIVER_KEEPALIVES_IDLE {
        cfg.keepalives_idle(Duration::from_secs(5));
    }
    if cfg.get_keepalives_interval().is_none() {
        cfg.keepalives_interval(Duration::from_secs(1));
    }
    if cfg.get_keepalives_retries().is_none() {
        cfg.keepalives_retries(3);
    }
    if cfg.get_tcp_user_timeout().is_none() {
        cfg.tcp_user_timeout(Duration::from_secs(10));
    }
}

/// `sslcert`, `sslkey` and `sslpassword` as a [`ClientCert`]: both files or none (an empty
/// value is no value, as in libpq).
fn client_cert(params: &tls::TlsParams) -> Result<Option<ClientCert>> {
    let given = |v: &Option<String>| v.clone().filter(|s| !s.is_empty());
    match (given(&params.sslcert), given(&params.sslkey)) {
        (None, None) if given(&params.sslpassword).is_some() => Err(Error::Url(
            "sslpassword is given without sslcert and sslkey: it is the password of an encrypted sslkey".into(),
        )),
        (None, None) => Ok(None),
        (Some(cert), None) => Err(Error::Url(format!(
            "sslcert {cert} is given without sslkey: give the certificate's private key file too \
             (libpq would look for ~/.postgresql/postgresql.key; shardlease reads no default file)"
        ))),
        (None, Some(key)) => Err(Error::Url(format!(
            "sslkey {key} is given without sslcert: give the certificate file too"
        ))),
        (Some(cert), Some(key)) => {
            let c = ClientCert::new(cert, key);
            Ok(Some(match given(&params.sslpassword) {
                Some(pw) => c.password(pw),
                None => c,
            }))
        }
    }
}

/// "host:port/database as user", for messages: never the password.
pub fn describe_target(cfg: &Config) -> String {
    let host = match cfg.get_hosts().first() {
        Some(tokio_postgres::config::Host::Tcp(h)) => h.clone(),
        #[cfg(unix)]
        Some(tokio_postgres::config::Host::Unix(p)) => p.display().to_string(),
        None => "?".into(),
    };
    let port = cfg.get_ports().first().copied().unwrap_or(5432);
    let user = cfg.get_user().unwrap_or("postgres");
    let db = cfg.get_dbname().unwrap_or(user);
    format!("{host}:{port}/{db} as {user}")
}

/// Open a connection named `application_name` (with TLS as `db` says) and drive it in a
/// background task. Notifications go to the returned receiver; it closes when the
/// connection ends.
pub(crate) async fn connect(
    db: &DbConfig,
    application_name: &str,
) -> Result<(Client, mpsc::UnboundedReceiver<Notification>)> {
    let (client, notifications, _) = connect_over(db, application_name, None).await?;
    Ok((client, notifications))
}

/// [`connect`] for a member's session connection: when `db` names one TCP server, over a
/// TCP stream this process opens itself, whose two ends it returns (the pooler check's proof
/// without a probe: see [`crate::tcp`]). Otherwise, or when that stream cannot be opened,
/// as [`connect`] does (and with its errors), without the ends.
pub(crate) async fn connect_session(
    db: &DbConfig,
    application_name: &str,
) -> Result<(
    Client,
    mpsc::UnboundedReceiver<Notification>,
    Option<Endpoints>,
)> {
    let stream = match tcp::single_target(&db.pg) {
        Some((host, hostaddr, port)) => match tcp::open(&db.pg, &host, hostaddr, port).await {
            Ok((stream, ends)) => Some((host, stream, ends)),
            Err(e) => {
                tracing::debug!(error = %e, "could not open the session's TCP stream; the driver tries");
                None
            }
        },
        None => None,
    };
    connect_over(db, application_name, stream).await
}

/// Connect over `stream` (its host name, for TLS, and its ends) when given, else by the
/// driver's own connect.
async fn connect_over(
    db: &DbConfig,
    application_name: &str,
    stream: Option<(String, TcpStream, Endpoints)>,
) -> Result<(
    Client,
    mpsc::UnboundedReceiver<Notification>,
    Option<Endpoints>,
)> {
    let mut cfg = db.pg.clone();
    cfg.application_name(application_name);
    let target = describe_target(&cfg);
    let failed = |e: tokio_postgres::Error| match tls::explain_rejection(
        &e,
        db.tls_mode,
        db.root_cert.as_ref(),
        db.client_cert.as_ref(),
    ) {
        Some(detail) => Error::Tls {
            target: target.clone(),
            detail,
        },
        None => Error::Connect {
            target: target.clone(),
            cause: e,
        },
    };
    match (db.verification(), stream) {
        (None, None) => {
            cfg.ssl_mode(SslMode::Disable);
            let (client, connection) = cfg.connect(NoTls).await.map_err(failed)?;
            Ok((client, drive(connection), None))
        }
        (None, Some((_, stream, ends))) => {
            cfg.ssl_mode(SslMode::Disable);
            let (client, connection) = cfg.connect_raw(stream, NoTls).await.map_err(failed)?;
            Ok((client, drive(connection), Some(ends)))
        }
        (Some(verification), stream) => {
            let mut connector =
                tls::connector(verification, db.root_cert.as_ref(), db.client_cert.as_ref())
                    .map_err(|detail| Error::Tls {
                        target: target.clone(),
                        detail,
                    })?;
            cfg.ssl_mode(SslMode::Require);
            match stream {
                None => {
                    let (client, connection) = cfg.connect(connector).await.map_err(failed)?;
                    Ok((client, drive(connection), None))
                }
                Some((host, stream, ends)) => {
                    let tls = MakeTlsConnect::<TcpStream>::make_tls_connect(&mut connector, &host)
                        .map_err(|e| Error::Tls {
                            target: target.clone(),
                            detail: format!("the host name {host:?} cannot be verified: {e}"),
                        })?;
                    let (client, connection) =
                        cfg.connect_raw(stream, tls).await.map_err(failed)?;
                    Ok((client, drive(connection), Some(ends)))
                }
            }
        }
    }
}

/// Ask the server to cancel the statement running on `token`'s connection: a short
/// connection of its own to the same server, with TLS as `db` says. The server does not say
/// whether anything was cancelled.
pub(crate) async fn cancel(db: &DbConfig, token: &CancelToken) -> Result<()> {
    let target = describe_target(&db.pg);
    let failed = |cause: tokio_postgres::Error| Error::Connect {
        target: target.clone(),
        cause,
    };
    match db.verification() {
        None => token.cancel_query(NoTls).await.map_err(failed),
        Some(verification) => {
            let connector =
                tls::connector(verification, db.root_cert.as_ref(), db.client_cert.as_ref())
                    .map_err(|detail| Error::Tls {
                        target: target.clone(),
                        detail,
                    })?;
            token.cancel_query(connector).await.map_err(failed)
        }
    }
}

/// Drive `connection` in a background task; its notifications go to the returned receiver.
fn drive<S, T>(connection: Connection<S, T>) -> mpsc::UnboundedReceiver<Notification>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let mut connection = connection;
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut messages = stream::poll_fn(move |cx| connection.poll_message(cx));
        while let Some(message) = messages.next().await {
            match message {
                Ok(AsyncMessage::Notification(n)) => {
                    if tx.send(n).is_err() {
                        // Nobody listens any more; keep driving the connection for the client.
                    }
                }
                Ok(AsyncMessage::Notice(notice)) => {
                    tracing::debug!(message = notice.message(), "postgres notice");
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::debug!(error = %e, "connection ended");
                    break;
                }
            }
        }
    });
    rx
}

/// Open a plain connection named `application_name`: the same as [`DbConfig::connect`].
pub async fn connect_client(cfg: &DbConfig, application_name: &str) -> Result<Client> {
    cfg.connect(application_name).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dead_peers_are_noticed_in_seconds_unless_the_url_says_otherwise() {
        let cfg = parse_database_url("postgres://app@db/app").unwrap();
        assert!(cfg.get_keepalives());
        assert_eq!(cfg.get_keepalives_idle(), Duration::from_secs(5));
        assert_eq!(cfg.get_keepalives_interval(), Some(Duration::from_secs(1)));
        assert_eq!(cfg.get_keepalives_retries(), Some(3));
        assert_eq!(cfg.get_tcp_user_timeout(), Some(&Duration::from_secs(10)));

        // tokio-postgres reads these in seconds (libpq: tcp_user_timeout in milliseconds).
        let cfg = parse_database_url(
            "postgres://app@db/app?keepalives=0&keepalives_idle=30&keepalives_interval=7\
             &keepalives_retries=9&tcp_user_timeout=20",
        )
        .unwrap();
        assert!(!cfg.get_keepalives());
        assert_eq!(cfg.get_keepalives_idle(), Duration::from_secs(30));
        assert_eq!(cfg.get_keepalives_interval(), Some(Duration::from_secs(7)));
        assert_eq!(cfg.get_keepalives_retries(), Some(9));
        assert_eq!(cfg.get_tcp_user_timeout(), Some(&Duration::from_secs(20)));
    }
}
