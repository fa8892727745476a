//! # shardlease
//!
//! Split a table between workers that share one PostgreSQL database, and re-split it the
//! moment one of them arrives, leaves, crashes or hangs. PostgreSQL is the only
//! coordination service.
//!
//! - Membership lives in `shardlease.leases`; changes are pushed with LISTEN/NOTIFY and
//!   re-read from the tables (notifications are only hints).
//! - Liveness rides on session advisory locks: a crashed member's lock vanishes with its
//!   connection, and the survivors reap it within the crash-check interval.
//! - Every ownership-dependent write runs in a [`Fence`]d transaction that checks the
//!   generation and the lease with the group row locked FOR SHARE.
//! - The [`Assignment`] is jump consistent hashing over sticky slots with deterministic
//!   re-probing of vacant slots: minimal movement, and balance within sampling noise.
//!
//! ```no_run
//! # async fn f() -> shardlease::Result<()> {
//! let pg = shardlease::parse_database_url("postgres://postgres@127.0.0.1/postgres")?;
//! let mut client = shardlease::connect_client(&pg, "setup").await?;
//! shardlease::migrate(&mut client).await?;
//!
//! let member = shardlease::Member::join(&pg, shardlease::MemberConfig::new("orders", "pod-a")).await?;
//! let view = member.view();
//! let shards = view.assignment().shards_of(view.my_slot().unwrap(), 1024);
//! let tx = view.fence()?.begin(&mut client).await?; // Err(Fenced) if the view is stale
//! tx.execute("UPDATE orders SET claimed = true WHERE shard = ANY($1)",
//!            &[&shards.iter().map(|&s| s as i32).collect::<Vec<_>>()]).await?;
//! tx.commit().await?;
//! member.leave().await?;
//! # Ok(()) }
//! ```
#![deny(missing_docs)]

pub mod assignment;
mod config;
mod connect;
mod error;
mod fence;
pub mod hash;
mod member;
pub mod migrate;
mod session;
mod view;

pub use assignment::Assignment;
pub use config::MemberConfig;
pub use connect::{connect_client, describe_target, parse_database_url};
pub use error::{Error, FenceReason, Result};
pub use fence::Fence;
pub use member::Member;
pub use migrate::{check_migrated, migrate, MigrationReport};
pub use session::{CHANNEL, PROTOCOL_VERSION};
pub use view::{MemberInfo, MemberState, View};

/// Re-exported driver types that appear in this crate's API.
pub use tokio_postgres;
