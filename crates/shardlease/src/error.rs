//! The library's error type, and the SQLSTATEs of its own SQL functions.

use std::fmt;

/// The SQLSTATEs that shardlease's SQL functions raise, each mapped to a typed [`Error`]
/// variant. Class `SL` is ours; PostgreSQL never uses it.
pub mod sqlstate {
    /// The group has 65,536 members: no slot is left ([`Error::GroupFull`](crate::Error::GroupFull)).
    pub const GROUP_FULL: &str = "SLF01";
    /// The advisory lock of the slot a joiner was given is still held by a departed member's
    /// backend ([`Error::SlotHeld`](crate::Error::SlotHeld)); transient.
    pub const SLOT_HELD: &str = "SLL01";
    /// The group's rows contradict each other ([`Error::Inconsistent`](crate::Error::Inconsistent)).
    pub const INCONSISTENT: &str = "SLI01";
    /// Another live member uses this member id ([`Error::MemberIdInUse`](crate::Error::MemberIdInUse)).
    pub const MEMBER_ID_IN_USE: &str = "SLM01";
    /// A fenced transaction's commit check failed; the message names the reason
    /// ([`Error::Fenced`](crate::Error::Fenced)).
    pub const FENCED: &str = "SLX01";
    /// The group runs another assignment protocol ([`Error::ProtocolMismatch`](crate::Error::ProtocolMismatch)).
    pub const PROTOCOL_MISMATCH: &str = "SLP01";
}

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
    /// The lease was taken on another timeline of the database: a failover or a
    /// point-in-time restore happened since, which may have rolled the membership back.
    OtherTimeline,
    /// A leader transaction's member does not lead the group: a longer-standing member is
    /// live (see [`Leader`](crate::Leader)).
    NotLeader,
}

impl fmt::Display for FenceReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            FenceReason::StaleGeneration => "the generation moved on",
            FenceReason::LeaseGone => "the lease is gone",
            FenceReason::LeaseExpired => "the lease expired",
            FenceReason::NoGroup => "the group does not exist",
            FenceReason::NotJoined => "the member is not joined",
            FenceReason::OtherTimeline => {
                "the lease was taken on another timeline of the database (a failover or a restore)"
            }
            FenceReason::NotLeader => "this member does not lead the group",
        })
    }
}

impl FenceReason {
    /// The reason a fence function's status names (`ok` is not a reason: `None`).
    pub(crate) fn from_status(status: &str) -> Option<FenceReason> {
        match status {
            "ok" => None,
            "stale_generation" => Some(FenceReason::StaleGeneration),
            "lease_gone" => Some(FenceReason::LeaseGone),
            "lease_expired" => Some(FenceReason::LeaseExpired),
            "other_timeline" => Some(FenceReason::OtherTimeline),
            "not_leader" => Some(FenceReason::NotLeader),
            _ => Some(FenceReason::NoGroup),
        }
    }
}

/// Everything that can go wrong in shardlease.
///
/// Database errors say what the library was doing, and the server's SQLSTATE, message,
/// detail and hint; the driver's error stays reachable as the [`source`](std::error::Error::source).
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
    #[error("cannot connect to PostgreSQL at {target}: {}", describe_db_error(.cause))]
    Connect {
        /// Where we tried to connect (host, port, database, user; never the password).
        target: String,
        /// The driver's error (its message is part of this error's message).
        #[source]
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

    /// The member's session connection goes through a transaction (or statement) pooler,
    /// which would break its session advisory lock and LISTEN. Not transient.
    #[error("the session connection to {target} goes through a transaction pooler: {detail}")]
    PooledSession {
        /// Where we connected (never the password).
        target: String,
        /// What was observed, and what to do.
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

    /// The group has no slot left (65,536 members).
    #[error("group {group:?} is full: {detail}")]
    GroupFull {
        /// The group.
        group: String,
        /// The database's message.
        detail: String,
    },

    /// The slot a joiner was given is still locked by a departed member's backend, which is
    /// being ended. Transient: the join is retried.
    #[error("cannot join group {group:?} yet: {detail}")]
    SlotHeld {
        /// The group.
        group: String,
        /// The database's message.
        detail: String,
    },

    /// The group's rows contradict each other (for example a lease whose slot is not below
    /// the group's slot count, after a hand edit): no assignment can be computed from them.
    /// The member keeps its last good view and reads again at the next heartbeat.
    #[error("the tables of group {group:?} are inconsistent: {detail}; fix the row by hand (see shardlease.members and shardlease.groups)")]
    Inconsistent {
        /// The group.
        group: String,
        /// What contradicts what.
        detail: String,
    },

    /// The member has stopped (left, or its handle was dropped).
    #[error("the member has stopped")]
    Stopped,

    /// Any other database error, with what the library was doing.
    #[error("{doing} failed: {}", describe_db_error(.source))]
    Db {
        /// What the library was doing ("renewing the lease of work_items/pod-a").
        doing: String,
        /// The driver's error.
        #[source]
        source: tokio_postgres::Error,
    },
}

impl From<tokio_postgres::Error> for Error {
    fn from(source: tokio_postgres::Error) -> Error {
        Error::Db {
            doing: "a database statement".into(),
            source,
        }
    }
}

impl Error {
    /// True for errors that may pass on their own (connection loss, lock timeouts,
    /// serialization failures, a read-only server), so that retrying later makes sense.
    pub fn is_transient(&self) -> bool {
        match self {
            Error::Connect { .. } => true,
            Error::Db { source, .. } => is_transient_db(source),
            Error::MemberIdInUse { .. } => true,
            Error::SlotHeld { .. } => true,
            Error::Fenced { .. } => true,
            _ => false,
        }
    }

    /// True when this is a [`Error::Fenced`] refusal.
    pub fn is_fenced(&self) -> bool {
        matches!(self, Error::Fenced { .. })
    }

    /// The server's SQLSTATE, when the error came from the server.
    pub fn code(&self) -> Option<&tokio_postgres::error::SqlState> {
        match self {
            Error::Db { source, .. } | Error::Connect { cause: source, .. } => source.code(),
            _ => None,
        }
    }
}

/// A driver error on one line: for a server error its SQLSTATE, message, detail, hint and
/// where; otherwise the error with its causes (the driver's own message omits them).
pub(crate) fn describe_db_error(e: &tokio_postgres::Error) -> String {
    if let Some(db) = e.as_db_error() {
        let mut out = format!(
            "SQLSTATE {}: {}: {}",
            db.code().code(),
            db.severity(),
            db.message()
        );
        if let Some(detail) = db.detail() {
            out.push_str(&format!("; detail: {detail}"));
        }
        if let Some(hint) = db.hint() {
            out.push_str(&format!("; hint: {hint}"));
        }
        if let Some(context) = db.where_() {
            out.push_str(&format!("; where: {}", context.replace('\n', " / ")));
        }
        return out;
    }
    let mut out = if e.is_closed() {
        "the connection is closed".to_owned()
    } else {
        e.to_string()
    };
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

/// The error ended the connection: it is closed, failed below SQL (I/O or protocol: no
/// SQLSTATE), or the server ended it with a FATAL of class 08 (connection exception) or 57P
/// (administrator command, crash, shutdown), which arrives before the socket is seen closed.
pub(crate) fn connection_ended(e: &tokio_postgres::Error) -> bool {
    e.is_closed()
        || e.code().is_none_or(|code| {
            let c = code.code();
            c.starts_with("08") || c.starts_with("57P")
        })
}

/// Classify a driver error: connection-level failures, lock/serialization conflicts and a
/// read-only server (a replica, or a just-demoted primary) are transient.
pub(crate) fn is_transient_db(e: &tokio_postgres::Error) -> bool {
    if connection_ended(e) {
        return true;
    }
    match e.code() {
        None => true,
        Some(code) => {
            let c = code.code();
            c == "55P03" // lock_not_available (lock_timeout)
                || c == "57014" // query_canceled (statement_timeout)
                || c == "40001" // serialization_failure
                || c == "40P01" // deadlock_detected
                || c == "25P03" // idle_in_transaction_session_timeout
                || c == "25006" // read_only_sql_transaction: a replica or a demoted primary
                || c == sqlstate::SLOT_HELD
        }
    }
}

/// Adds what the library was doing to a driver error.
pub(crate) trait Doing<T> {
    /// Map the error to [`Error::Db`] (or a typed variant for our own SQLSTATEs and a
    /// missing schema), naming what was being done.
    fn doing(self, what: impl FnOnce() -> String) -> Result<T>;
}

impl<T> Doing<T> for std::result::Result<T, tokio_postgres::Error> {
    fn doing(self, what: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|source| Error::Db {
            doing: what(),
            source,
        })
    }
}

/// Map the errors of our SQL functions, and of a database without the schema, to typed
/// errors; anything else becomes [`Error::Db`] saying what we were `doing`.
pub(crate) fn classify(e: tokio_postgres::Error, group: &str, member: &str, doing: &str) -> Error {
    let message = || {
        e.as_db_error()
            .map(|d| d.message().to_owned())
            .unwrap_or_else(|| e.to_string())
    };
    let code = e.code().map(|c| c.code().to_owned());
    match code.as_deref() {
        Some(sqlstate::MEMBER_ID_IN_USE) => Error::MemberIdInUse {
            group: group.to_owned(),
            member: member.to_owned(),
        },
        Some(sqlstate::PROTOCOL_MISMATCH) => Error::ProtocolMismatch {
            group: group.to_owned(),
            detail: message(),
        },
        Some(sqlstate::GROUP_FULL) => Error::GroupFull {
            group: group.to_owned(),
            detail: message(),
        },
        Some(sqlstate::SLOT_HELD) => Error::SlotHeld {
            group: group.to_owned(),
            detail: message(),
        },
        Some(sqlstate::INCONSISTENT) => Error::Inconsistent {
            group: group.to_owned(),
            detail: message(),
        },
        Some("3F000") | Some("42P01") | Some("42883") => Error::NotMigrated { detail: message() },
        _ => Error::Db {
            doing: doing.to_owned(),
            source: e,
        },
    }
}

/// The library's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fence_statuses_map_to_reasons() {
        assert_eq!(FenceReason::from_status("ok"), None);
        assert_eq!(
            FenceReason::from_status("stale_generation"),
            Some(FenceReason::StaleGeneration)
        );
        assert_eq!(
            FenceReason::from_status("lease_expired"),
            Some(FenceReason::LeaseExpired)
        );
        assert_eq!(
            FenceReason::from_status("not_leader"),
            Some(FenceReason::NotLeader)
        );
    }
}
