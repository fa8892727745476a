//! A private, throwaway PostgreSQL cluster from the local installation: `initdb` in a
//! temporary directory, `pg_ctl` to run it on a free port of 127.0.0.1, everything removed
//! when the [`Cluster`] is dropped, or, if this process dies first, by a watchdog.
//!
//! One source for two users: `shardlease-worker demo`, which starts one when no server
//! answers and `DATABASE_URL` is unset, and the test kit (`PrivateServer`, and the server of
//! the tests when none is running), with the probe that decides ([`answers_at`]). Besides
//! the standard library it needs only `thiserror` and tokio-postgres's `Config` type (which
//! the worker has anyway), so the worker binary gains no test dependencies.
//!
//! ```no_run
//! # fn main() -> Result<(), shardlease_localpg::Error> {
//! let cluster = shardlease_localpg::Builder::new()
//!     .max_connections(300)
//!     .conf("fsync = off")
//!     .start()?; // NotInstalled (with the install commands) when there is no initdb
//! println!("throwaway PostgreSQL at {}", cluster.url());
//! // ... connect to cluster.url() ...
//! drop(cluster); // stopped, directory removed
//! # Ok(()) }
//! ```
//!
//! The installation is `$PG_BIN` when set, else the first directory on `PATH` with both
//! `initdb` and `pg_ctl`, else the first of [`USUAL_PLACES`] (highest version first);
//! `SHARDLEASE_PG_SEARCH` replaces the usual places (see [`SEARCH_ENV`]).
#![deny(missing_docs)]
#![cfg(unix)]

mod cluster;
mod error;
mod install;
mod os;
mod probe;
mod watchdog;

pub use cluster::{Builder, Cluster};
pub use error::{Error, Result};
pub use install::{
    Installation, NotInstalled, Search, INSTALL_HINT, PG_BIN_ENV, SEARCH_ENV, USUAL_PLACES,
};
pub use probe::{address, answers, answers_at, PROBE_TIMEOUT};
