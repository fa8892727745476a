//! The library's error type.

use std::fmt;

/// Why a fenced transaction was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum FenceReason {
    /// The group's generation moved on since the view the caller computed its assignment from.
    StaleGeneration,
    /// The member's lease is gone: it left, or was reaped.
    LeaseGone,
    /// The member's lease has expired by the database clock.
    LeaseExpired,
    /// The group does not exist.
    NoGroup,
    /// The member is not joined (joining, lost or left), so it has no view to write under.
    NotJoined,
}

impl fmt::Display for FenceReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            FenceReason::StaleGeneration => "the generation moved on",
            FenceReason::LeaseGone => "the lease is gone",
            FenceReason::LeaseExpired => "the lease expired",
            FenceReason::NoGroup => "the group does not exist",
            FenceReason::NotJoined => "the member is not joined",
        })
    }
}

/// Everything that can go wrong in shardlease.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A configuration value is invalid; the message says which and why.
    #[error("invalid configuration: {0}")]
    Config(String),

    /// The database URL could not be parsed (the password is never shown).
    #[error("invalid database URL: {0}")]
    Url(String),

    /// The database could not be reached.
    #[error("cannot connect to PostgreSQL at {target}: {}", chain(.cause))]
    Connect {
        /// Where we tried to connect (host, port, database, user; never the password).
        target: String,
        /// The driver's error (its message is part of this error's message).
        cause: tokio_postgres::Error,
    },

    /// TLS with the database failed: the server's certificate was rejected (the detail says
    /// why and what to do), or the trusted roots (`sslrootcert`) cannot be loaded. Not
    /// transient: retrying will not change the answer.
    #[error("TLS with PostgreSQL at {target} failed: {detail}")]
    Tls {
        /// Where we tried to connect (host, port, database, user; never the password).
        target: String,
        /// Why, and what to do.
        detail: String,
    },

    /// The database lacks the shardlease schema, or an older version of it.
    #[error("the database is not migrated ({detail}): run `shardlease-worker migrate` (or call shardlease::migrate)")]
    NotMigrated {
        /// What is missing.
        detail: String,
    },

    /// A migration failed; nothing of that migration was committed.
    #[error("migration failed: {0}")]
    Migration(String),

    /// A fenced transaction was refused: the caller's view is stale. Nothing it wrote commits.
    #[error("fenced: {reason} (view generation {expected}, current {current:?})")]
    Fenced {
        /// Why.
        reason: FenceReason,
        /// The generation the caller computed its assignment from.
        expected: u64,
        /// The group's current generation, when known.
        current: Option<u64>,
    },

    /// Another live member of the group already uses this member id.
    #[error("member id {member:?} already holds a live lease in group {group:?}")]
    MemberIdInUse {
        /// The group.
        group: String,
        /// The member id.
        member: String,
    },

    /// The group runs another version of the assignment function.
    #[error("group {group:?} runs an incompatible assignment protocol: {detail}")]
    ProtocolMismatch {
        /// The group.
        group: String,
        /// The database's message.
        detail: String,
    },

    /// The session connection goes through a transaction (or statement) pooler, which would
    /// break its advisory lock and LISTEN; the detail says why and what to do. Not transient.
    #[error("the session connection to {target} goes through a transaction pooler: {detail}")]
    PooledSession {
        /// Where we connected (host, port, database, user; never the password).
        target: String,
        /// Why, and what to do.
        detail: String,
    },

    /// The member has stopped (left, or its handle was dropped).
    #[error("the member has stopped")]
    Stopped,

    /// Any other database error.
    #[error("database error: {0}")]
    Db(#[from] tokio_postgres::Error),
}

impl Error {
    /// True for errors that may pass on their own (connection loss, lock timeouts,
    /// serialization failures), so that retrying later makes sense.
    pub fn is_transient(&self) -> bool {
        match self {
            Error::Connect { .. } => true,
            Error::Db(e) => is_transient_db(e),
            Error::MemberIdInUse { .. } => true,
            Error::Fenced { .. } => true,
            _ => false,
        }
    }

    /// True when this is a [`Error::Fenced`] refusal.
    pub fn is_fenced(&self) -> bool {
        matches!(self, Error::Fenced { .. })
    }
}

/// A driver error with its causes, on one line (the driver's own message omits them).
fn chain(e: &tokio_postgres::Error) -> String {
    let mut out = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

/// Classify a driver error: connection-level failures and lock/serialization
/// conflicts are transient.
pub(crate) fn is_transient_db(e: &tokio_postgres::Error) -> bool {
    if e.is_closed() {
        return true;
    }
    match e.code() {
        None => true, // I/O or protocol level: the connection is broken.
        Some(code) => {
            let c = code.code();
            c.starts_with("08") // connection exception
                || c.starts_with("57P") // admin shutdown, crash shutdown, cannot connect now
                || c == "55P03" // lock_not_available (lock_timeout)
                || c == "57014" // query_canceled (statement_timeout)
                || c == "40001" // serialization_failure
                || c == "40P01" // deadlock_detected
                || c == "25P03" // idle_in_transaction_session_timeout
                || c == "SLL01" // a departed member's backend still holds the slot lock
        }
    }
}

/// Map the errors of our SQL functions, and of a database without the schema, to typed errors.
pub(crate) fn classify(e: tokio_postgres::Error, group: &str, member: &str) -> Error {
    let code = e.code().map(|c| c.code().to_owned());
    match code.as_deref() {
        Some("SLM01") => Error::MemberIdInUse {
            group: group.to_owned(),
            member: member.to_owned(),
        },
        Some("SLP01") => Error::ProtocolMismatch {
            group: group.to_owned(),
            detail: e
                .as_db_error()
                .map(|d| d.message().to_owned())
                .unwrap_or_default(),
        },
        Some("3F000") | Some("42P01") | Some("42883") => Error::NotMigrated {
            detail: e
                .as_db_error()
                .map(|d| d.message().to_owned())
                .unwrap_or_else(|| e.to_string()),
        },
        _ => Error::Db(e),
    }
}

/// The library's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
