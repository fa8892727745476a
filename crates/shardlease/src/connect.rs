//! Connections: URL parsing with clear errors, and connections whose notifications
//! arrive on a channel (the tokio-postgres `poll_message` pattern).

use std::time::Duration;

use futures_util::{future, stream, StreamExt};
use tokio::sync::mpsc;
use tokio_postgres::{AsyncMessage, Client, Config, NoTls, Notification};

use crate::error::{Error, Result};

/// Parse a `postgres://` URL (or a key=value string) into a driver config.
///
/// The error never repeats the password. TLS is not built in: `sslmode=require` and the
/// `verify-*` modes are refused with an explanation instead of failing at connect time.
///
/// ```
/// let cfg = shardlease::parse_database_url("postgres://app:secret@db:5432/app").unwrap();
/// assert_eq!(shardlease::describe_target(&cfg), "db:5432/app as app");
/// assert!(shardlease::parse_database_url("mysql://x").is_err());
/// ```
pub fn parse_database_url(url: &str) -> Result<Config> {
    let lower = url.to_ascii_lowercase();
    for mode in ["verify-full", "verify-ca", "require"] {
        if lower.contains(&format!("sslmode={mode}")) {
            return Err(Error::Url(format!(
                "sslmode={mode} is not supported: this build connects without TLS. \
                 Use sslmode=disable or sslmode=prefer, or terminate TLS in a local proxy"
            )));
        }
    }
    let mut cfg: Config = url.parse().map_err(|e: tokio_postgres::Error| {
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
    // Notice a silently dead peer (partition without a reset) in bounded time.
    cfg.keepalives(true);
    cfg.keepalives_idle(Duration::from_secs(5));
    Ok(cfg)
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

/// Open a connection named `application_name` and drive it in a background task.
/// Notifications go to the returned receiver; it closes when the connection ends.
pub(crate) async fn connect(
    cfg: &Config,
    application_name: &str,
) -> Result<(Client, mpsc::UnboundedReceiver<Notification>)> {
    let mut cfg = cfg.clone();
    cfg.application_name(application_name);
    let (client, mut connection) = cfg.connect(NoTls).await.map_err(|e| Error::Connect {
        target: describe_target(&cfg),
        cause: e,
    })?;
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
        drop(tx);
        future::ready(()).await
    });
    Ok((client, rx))
}

/// Open a plain connection (no notification channel) named `application_name`.
///
/// ```no_run
/// # async fn f() -> shardlease::Result<()> {
/// let cfg = shardlease::parse_database_url("postgres://postgres@127.0.0.1/postgres")?;
/// let client = shardlease::connect_client(&cfg, "my-service").await?;
/// # Ok(()) }
/// ```
pub async fn connect_client(cfg: &Config, application_name: &str) -> Result<Client> {
    let (client, _notifications) = connect(cfg, application_name).await?;
    Ok(client)
}
