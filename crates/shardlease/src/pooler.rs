//! Refuse a transaction (or statement) pooler in front of the session connection.
//!
//! The session connection holds the slot's advisory lock, LISTENs and keeps its settings for
//! its whole life. Behind a pooler that hands server connections out per transaction, none
//! of that stays with the member: the lock and the LISTEN sit on a server connection that
//! other clients use next, and the member's next statement may run on another one. So a
//! member checks once, when it first joins, that its session connection keeps one backend.
//!
//! # The probe
//!
//! A direct connection (or a session-mode pool) keeps one backend, with one pid, for its
//! whole life, and no other live connection shares that backend. A transaction pooler
//! releases the server connection at the end of every transaction. The probe makes that
//! release observable, with a second, short-lived connection to the same target:
//!
//! 1. session: `SELECT pg_backend_pid()` → P (a pooler releases the server now);
//! 2. probe: `BEGIN; SELECT pg_backend_pid()` → Q, and the transaction stays open, which
//!    pins a server connection to the probe;
//! 3. session: `SELECT pg_backend_pid()`;
//! 4. probe: `ROLLBACK` (a pooler releases the probe's server now);
//! 5. session: `SELECT pg_backend_pid()`; steps 2 to 5 are one round.
//!
//! Pooled when Q = P (another client's transaction ran on our backend), or when the session's
//! pid changes (its backend changed between transactions). Neither can happen on a direct
//! connection or in a session pool, so there are no false alarms.
//!
//! A pooler that reuses the most recently released server first (PgBouncer's default, LIFO)
//! hands the probe the session's just-released server in step 2, and is caught there. If
//! another client released a server in between, the probe gets that one, and the session's
//! server stays free for the session in step 3; but step 4 then releases the probe's server
//! last, and step 5 gets it. A round misses only when other clients take and release servers
//! at both moments: behind a busy pool (12 clients on 4 servers, as in the tests) about 1
//! round in 8 missed, so the probe runs up to [`ROUNDS`] rounds, stopping at the first that
//! catches the pooler (no miss in 600 checks of 5 rounds under that load). On a direct
//! connection it runs them all: 2 + 4 × `ROUNDS` round trips and one connection, once per
//! join.
//!
//! # The proof without a probe
//!
//! When this process opened the session's TCP stream itself ([`crate::tcp`]), it knows the
//! stream's two ends, and asks the backend for its own view of its client
//! (`inet_client_addr`, `inet_client_port`) and of itself (`inet_server_addr`,
//! `inet_server_port`). A TCP connection is named by those four values, so when they are
//! this stream's two ends the backend serves this very stream: no pooler stands between,
//! and the probe, its connection and its round trips are skipped. That is the case of a
//! member that connects straight to PostgreSQL by host name or address. A pooler's backend
//! sees the pooler's own connection (another client port, and the pooler's address), so it
//! never passes; nor does a direct connection through address translation (a Kubernetes
//! Service's virtual address: the server sees its own address) or over a Unix-domain socket
//! (no addresses): those run the probe, as before.
//!
//! Every statement is a simple query or an unnamed one (no named prepared statements, which
//! a transaction pooler would break with a confusing error before the probe could explain).

use std::net::IpAddr;
use std::time::Duration;

use tokio_postgres::{Client, SimpleQueryMessage};

use crate::connect::{connect_client, DbConfig};
use crate::error::{Error, Result};
use crate::tcp::Endpoints;

/// The most the whole probe may take. A direct server answers it in a few round trips; a
/// pooler whose pool is exhausted would make the probe wait (PgBouncer queues clients for up
/// to its `query_wait_timeout`, 120 s by default).
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);

/// What to do about a pooled session, appended to every [`Error::PooledSession`] detail.
const REMEDY: &str = "point DATABASE_URL (the session connection) directly at PostgreSQL or at \
     a session-mode pool, and put only WORK_DATABASE_URL (the work connections) behind the \
     transaction pooler";

/// Fail with [`Error::PooledSession`] when a transaction or statement pooler stands between
/// `client` (a member's session connection, made from `pg`) and PostgreSQL. `target` names
/// the connection in the error (see [`describe_target`](crate::describe_target)).
///
/// When `ends` (the session's TCP stream, if this process opened it) prove a direct
/// connection, that is all: one statement. Otherwise opens one short-lived probe connection
/// from `pg` (see the module documentation) and runs up to 1 + 2 × [`ROUNDS`] statements on
/// `client`. Call it once per join, before the join transaction, with no transaction open
/// on `client`. A probe that cannot connect fails with that error. A probe that does not
/// finish within [`PROBE_TIMEOUT`] proves nothing (for example, a session-mode pool with no
/// server connection to spare for the probe makes it wait): it is logged as a warning and
/// the check passes.
pub(crate) async fn check_session_not_pooled(
    pg: &DbConfig,
    client: &Client,
    ends: Option<Endpoints>,
    target: &str,
) -> Result<()> {
    if let Some(ends) = ends {
        if serves_this_stream(client, ends).await? {
            tracing::debug!(database = %target, local = %ends.local, peer = %ends.peer,
                "the session's backend serves its own TCP stream: no pooler");
            return Ok(());
        }
    }
    match tokio::time::timeout(PROBE_TIMEOUT, probe(pg, client)).await {
        Ok(Ok(Verdict::Direct)) => Ok(()),
        Ok(Ok(Verdict::Pooled(why))) => Err(Error::PooledSession {
            target: target.to_owned(),
            detail: format!("{why}; {REMEDY}"),
        }),
        Ok(Err(e)) => Err(e),
        Err(_) => {
            tracing::warn!(
                database = %target,
                "could not tell whether the session connection goes through a pooler: the probe \
                 did not finish within {PROBE_TIMEOUT:?}; going on"
            );
            Ok(())
        }
    }
}

/// What the probe saw.
#[derive(Debug, PartialEq, Eq)]
enum Verdict {
    /// One backend for the session, not shared.
    Direct,
    /// A pooler; why we know.
    Pooled(String),
}

/// Whether the backend serving `client` reports `ends` as its TCP connection's two ends (see
/// the module documentation). `false` when it has no addresses (a Unix-domain socket).
async fn serves_this_stream(client: &Client, ends: Endpoints) -> Result<bool> {
    let row = client
        .query_typed_one(
            "SELECT host(inet_client_addr()), inet_client_port(), \
                    host(inet_server_addr()), inet_server_port()",
            &[],
        )
        .await?;
    let end = |addr: usize, port: usize| -> Option<(IpAddr, u16)> {
        let ip = row.get::<_, Option<String>>(addr)?.parse().ok()?;
        let port = u16::try_from(row.get::<_, Option<i32>>(port)?).ok()?;
        Some((ip, port))
    };
    Ok(match (end(0, 1), end(2, 3)) {
        (Some(client), Some(server)) => ends.are(client, server),
        _ => false,
    })
}

/// Rounds of the probe (steps 2 to 5 of the module documentation) before concluding that
/// the session is direct.
const ROUNDS: usize = 5;

async fn probe(pg: &DbConfig, client: &Client) -> Result<Verdict> {
    // Connect first, so that steps 1 and 2 follow each other closely.
    let probe = connect_client(pg, "shardlease pooler probe").await?;
    let session = backend_pid(client).await?;
    for _ in 0..ROUNDS {
        let pinned = match first_pid(probe.simple_query("BEGIN; SELECT pg_backend_pid()").await) {
            Ok(pid) => pid,
            Err(e) => return refused(e),
        };
        let during = backend_pid(client).await?;
        if let Some(pooled) = judge(session, pinned, during) {
            return Ok(pooled);
        }
        probe.simple_query("ROLLBACK").await?;
        let after = backend_pid(client).await?;
        if let Some(pooled) = judge(session, 0, after) {
            return Ok(pooled);
        }
    }
    Ok(Verdict::Direct)
}

/// A probe transaction failed: PgBouncer's statement mode refuses transactions outright;
/// anything else is an error.
fn refused(e: tokio_postgres::Error) -> Result<Verdict> {
    match e.as_db_error().map(|db| db.message()) {
        Some(m) if m.contains("pool") => Ok(Verdict::Pooled(format!(
            "a probe connection's transaction was refused ({m}): only a pooler does that"
        ))),
        _ => Err(e.into()),
    }
}

/// The verdict on the session's first pid, the pid of the probe's open transaction (0: none)
/// and the session's pid since: `None` when they prove nothing.
fn judge(session: i32, pinned: i32, later: i32) -> Option<Verdict> {
    if pinned == session {
        Some(Verdict::Pooled(format!(
            "its server backend (pid {session}) ran another connection's transaction between two \
             of its own, so its backend changes between transactions"
        )))
    } else if later != session {
        Some(Verdict::Pooled(format!(
            "its server backend changed between transactions (pid {session}, then {later})"
        )))
    } else {
        None
    }
}

/// `pg_backend_pid()` of `client`, as an unnamed statement.
async fn backend_pid(client: &Client) -> Result<i32> {
    Ok(client
        .query_typed_one("SELECT pg_backend_pid()", &[])
        .await?
        .get(0))
}

/// The first column of the first row of a simple query, as a pid.
fn first_pid(
    messages: std::result::Result<Vec<SimpleQueryMessage>, tokio_postgres::Error>,
) -> std::result::Result<i32, tokio_postgres::Error> {
    let row = messages?.into_iter().find_map(|m| match m {
        SimpleQueryMessage::Row(row) => Some(row),
        _ => None,
    });
    // pg_backend_pid() always returns one non-null int4; 0 matches no backend.
    Ok(row
        .and_then(|r| r.get(0).and_then(|v| v.parse().ok()))
        .unwrap_or(0))
}

#[cfg(test)]
mod tests {
    //! The probe against the real server, directly and through a real PgBouncer in each
    //! pool mode. (The `Member::join` path is tested in `tests/pooler.rs`.)

    use super::*;
    use shardlease_testkit::{PgBouncer, PoolMode, TestDb};

    /// Checks per connection.
    const TRIES: usize = 20;

    #[test]
    fn judge_needs_one_stable_unshared_backend() {
        assert_eq!(judge(1, 2, 1), None);
        assert_eq!(judge(1, 0, 1), None);
        assert!(matches!(judge(1, 1, 1), Some(Verdict::Pooled(m)) if m.contains("pid 1")));
        assert!(matches!(judge(1, 2, 3), Some(Verdict::Pooled(m)) if m.contains("pid 1, then 3")));
    }

    /// How the check runs: as a member's does, with the ends of the session's own TCP
    /// stream, or with the probe alone.
    #[derive(Clone, Copy, Debug)]
    enum Via {
        Ends,
        Probe,
    }

    /// A session connection to `url`, opened as a member's is, with its TCP ends.
    async fn session(url: &str) -> (Client, Option<Endpoints>) {
        let pg = crate::parse_database_url(url).expect("test URL parses");
        let (client, _notifications, ends) =
            crate::connect::connect_session(&pg, "shardlease pooler test")
                .await
                .expect("connect the session");
        (client, ends)
    }

    /// Run the check `tries` times on one session connection to `url`; how many said pooled.
    async fn detections(url: &str, tries: usize, via: Via) -> (usize, Option<Error>) {
        let pg = crate::parse_database_url(url).expect("test URL parses");
        let (client, ends) = session(url).await;
        let ends = match via {
            Via::Ends => Some(ends.expect("a TCP URL: the member opens the stream itself")),
            Via::Probe => None,
        };
        let mut pooled = 0;
        let mut last = None;
        for _ in 0..tries {
            match check_session_not_pooled(&pg, &client, ends, "the test target").await {
                Ok(()) => {}
                Err(e @ Error::PooledSession { .. }) => {
                    pooled += 1;
                    last = Some(e);
                }
                Err(e) => panic!("the probe failed: {e}"),
            }
        }
        (pooled, last)
    }

    #[tokio::test]
    async fn a_direct_connection_is_never_called_pooled() {
        let db = TestDb::empty().await;
        for via in [Via::Ends, Via::Probe] {
            let (pooled, last) = detections(&db.url, TRIES, via).await;
            assert_eq!(
                pooled, 0,
                "direct connection called pooled ({via:?}): {last:?}"
            );
        }
    }

    #[tokio::test]
    async fn only_a_direct_tcp_session_is_proven_by_its_own_ends() {
        let db = TestDb::empty().await;
        let (client, ends) = session(&db.url).await;
        let ends = ends.expect("a TCP URL: the member opens the stream itself");
        assert!(
            serves_this_stream(&client, ends).await.expect("ask"),
            "a direct session's backend does not report its stream's ends {ends:?}"
        );
        // Another stream's ends, to the same server from the same process, prove nothing.
        let (_other, other_ends) = session(&db.url).await;
        let other_ends = other_ends.expect("a TCP URL");
        assert!(!serves_this_stream(&client, other_ends).await.expect("ask"));
        // Behind a pooler, even a session-mode one, the backend sees the pooler's connection.
        for mode in [PoolMode::Session, PoolMode::Transaction] {
            let Some(bouncer) = PgBouncer::start(mode, 4).await else {
                return;
            };
            let (client, ends) = session(&bouncer.url(&db.name)).await;
            let ends = ends.expect("a TCP URL");
            assert!(
                !serves_this_stream(&client, ends).await.expect("ask"),
                "a session through PgBouncer ({mode:?}) proven direct by {ends:?}"
            );
        }
    }

    #[tokio::test]
    async fn pgbouncer_session_mode_is_never_called_pooled() {
        let db = TestDb::empty().await;
        let Some(bouncer) = PgBouncer::start(PoolMode::Session, 4).await else {
            return;
        };
        let (pooled, last) = detections(&bouncer.url(&db.name), TRIES, Via::Ends).await;
        assert_eq!(pooled, 0, "session-mode pool called pooled: {last:?}");
    }

    #[tokio::test]
    async fn a_session_pool_without_a_spare_server_is_not_called_pooled() {
        // The session holds the pool's only server connection: the probe waits for one
        // until PROBE_TIMEOUT, which proves nothing, and the check passes.
        let db = TestDb::empty().await;
        let Some(bouncer) = PgBouncer::start(PoolMode::Session, 1).await else {
            return;
        };
        let started = std::time::Instant::now();
        let (pooled, last) = detections(&bouncer.url(&db.name), 1, Via::Ends).await;
        assert_eq!(pooled, 0, "a full session pool called pooled: {last:?}");
        let took = started.elapsed();
        assert!(
            took >= PROBE_TIMEOUT && took < PROBE_TIMEOUT + Duration::from_secs(5),
            "the probe gave up after {took:?}, not after PROBE_TIMEOUT ({PROBE_TIMEOUT:?})"
        );
    }

    #[tokio::test]
    async fn pgbouncer_transaction_mode_is_caught_every_time() {
        let db = TestDb::empty().await;
        let Some(bouncer) = PgBouncer::start(PoolMode::Transaction, 4).await else {
            return;
        };
        let (pooled, last) = detections(&bouncer.url(&db.name), TRIES, Via::Ends).await;
        assert_eq!(
            pooled,
            TRIES,
            "transaction pooling missed; pgbouncer log:\n{}",
            bouncer.log()
        );
        let message = last.expect("an error").to_string();
        for needle in [
            "the session connection to the test target goes through a transaction pooler",
            "between transactions",
            "DATABASE_URL",
            "session-mode pool",
            "WORK_DATABASE_URL",
        ] {
            assert!(
                message.contains(needle),
                "{needle:?} missing from: {message}"
            );
        }
    }

    #[tokio::test]
    async fn pgbouncer_transaction_mode_is_caught_while_other_clients_use_the_pool() {
        // Twelve other clients run short transactions and single statements through the same
        // pool of 4 all the time (a session URL pointed by mistake at the pooler of a busy
        // work path), so that the probe's server is often not the session's.
        let db = TestDb::empty().await;
        let Some(bouncer) = PgBouncer::start(PoolMode::Transaction, 4).await else {
            return;
        };
        let url = bouncer.url(&db.name);
        let stop = tokio_util::sync::CancellationToken::new();
        let mut noise = Vec::new();
        for i in 0..12 {
            let pg = crate::parse_database_url(&url).expect("test URL parses");
            let stop = stop.clone();
            noise.push(tokio::spawn(async move {
                let c = connect_client(&pg, "noise").await.expect("connect");
                let sql = if i % 2 == 0 {
                    "BEGIN; SELECT pg_backend_pid(); COMMIT"
                } else {
                    "SELECT pg_backend_pid()"
                };
                while !stop.is_cancelled() {
                    c.simple_query(sql).await.expect("noise");
                }
            }));
        }
        let (pooled, last) = detections(&url, 5 * TRIES, Via::Ends).await;
        stop.cancel();
        for n in noise {
            n.await.expect("noise task");
        }
        assert_eq!(
            pooled,
            5 * TRIES,
            "transaction pooling missed under load: {last:?}"
        );
    }

    #[tokio::test]
    async fn pgbouncer_statement_mode_is_caught() {
        let db = TestDb::empty().await;
        let Some(bouncer) = PgBouncer::start(PoolMode::Statement, 4).await else {
            return;
        };
        let (pooled, last) = detections(&bouncer.url(&db.name), TRIES, Via::Ends).await;
        assert_eq!(pooled, TRIES, "statement pooling missed: {last:?}");
    }
}
