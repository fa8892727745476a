//! What can go wrong starting a private cluster.

use std::io;

use crate::install::NotInstalled;

/// The result type of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Why a private cluster could not be created, started or stopped.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// No `initdb` and `pg_ctl` were found; the message says where it looked and what to
    /// install, per platform.
    #[error(transparent)]
    NotInstalled(#[from] NotInstalled),
    /// This process is root, and no other user can run the server.
    #[error("PostgreSQL refuses to run as root, and {0}")]
    Root(String),
    /// An operation on a file or a process failed.
    #[error("{what}: {source}")]
    Io {
        /// What we were doing.
        what: String,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// A PostgreSQL program exited with a failure.
    #[error("{what} failed ({status}): {output}")]
    Command {
        /// The program and what it was asked to do.
        what: String,
        /// Its exit status.
        status: String,
        /// Its output, and the end of the server log where that helps.
        output: String,
    },
}

impl Error {
    pub(crate) fn io(what: String, source: io::Error) -> Error {
        Error::Io { what, source }
    }
}
