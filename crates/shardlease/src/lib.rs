//! Split a table between processes that share one PostgreSQL database, safely, and re-split
//! it the moment one of them arrives, leaves, crashes or hangs. PostgreSQL is the only
//! coordination service.
//!
//! ```no_run
//! use shardlease::shard_table::HASH_SHARDS;
//! use shardlease::{DbConfig, Member, MemberConfig};
//!
//! # async fn example() -> anyhow::Result<()> {
//! let pg: DbConfig = "postgres://app@db.internal/app?sslmode=verify-full".parse()?;
//! let mut client = pg.connect("orders-service").await?;
//! shardlease::migrate(&mut client).await?; // from every process at once, if you like: it is locked
//! // orders gets key_hash = shardlease.uuid_hash(id): online, no rewrite, idempotent.
//! shardlease::live_table::KeyHashColumn::new("orders", "id")
//!     .prepare(&mut client, &shardlease::MigrateOptions::default()).await?;
//!
//! let member = Member::join(&pg, MemberConfig::new("orders", "pod-a")).await?;
//! let mut views = member.watch();
//! loop {
//!     let view = views.borrow_and_update().clone(); // one consistent snapshot
//!     if let Some(slot) = view.my_slot() {
//!         // This member's ranges of orders.key_hash: the same share as every other member's.
//!         let ranges = view.assignment().shard_table(HASH_SHARDS)?.hash_ranges(slot);
//!         // Refused with Error::Fenced if the membership changed since `view`.
//!         let tx = view.fence()?.begin(&mut client).await?;
//!         tx.execute(
//!             "UPDATE orders o SET owner = 'pod-a' FROM unnest($1::int4[], $2::int4[]) AS r(lo, hi) \
//!              WHERE o.key_hash BETWEEN r.lo AND r.hi",
//!             &[&ranges.lower_bounds(), &ranges.upper_bounds()],
//!         ).await?;
//!         tx.commit().await?;
//!     }
//!     tokio::select! {
//!         _ = views.changed() => {}  // rebalance at once
//!         _ = tokio::time::sleep(std::time::Duration::from_secs(1)) => {}
//!     }
//! }
//! # }
//! ```
//!
//! # The pieces
//! - [`DbConfig`]: where and how to connect (a `postgres://` URL, libpq's TLS settings,
//!   client certificates); [`DbConfig::connect`] opens a plain connection.
//! - [`migrate()`]: the schema, applied under an advisory lock; [`roles::grant`] gives a member
//!   or an inspector role exactly what it needs.
//! - [`Member`]: a membership held by a background task (a session connection with the
//!   slot's advisory lock, LISTEN, heartbeats, crash checks); [`Member::watch`] yields each new
//!   [`View`], and [`Member::leave`] leaves gracefully.
//! - [`View`]: one consistent snapshot of the group: its members, this member's
//!   [`MemberState`], the [`Assignment`] (jump consistent hashing over sticky slots), and the
//!   [`Fence`] for writes under it.
//! - [`Fence::begin`]: a transaction that commits only if the membership is still the one the
//!   view was read at ([`FencedTransaction`]); otherwise [`Error::Fenced`].
//! - [`hash`] and [`shard_table`]: key hashes and the balanced shard table, computed the
//!   same way in SQL; [`live_table`]: a stored hash added to a live table without a rewrite;
//!   [`Leader`]: leader election on the same membership; [`protocol`]: the
//!   channel, the protocol version and the lock keys, for psql and other languages.
//! - [`Error`]: what failed and what the library was doing, with the server's SQLSTATE,
//!   message, detail and hint; [`sqlstate`] names the library's own codes.
//!
//! The guarantees, the failure model with its measured figures, and the costs at scale are in
//! the repository's README.
#![deny(missing_docs)]

pub mod assignment;
pub mod backoff;
mod config;
mod connect;
mod crash_check;
mod error;
mod fence;
pub mod hash;
mod leader;
pub mod live_table;
mod member;
pub mod migrate;
mod notification;
mod pooler;
pub mod protocol;
pub mod roles;
mod session;
pub mod shard_table;
mod tcp;
mod tls;
mod view;

pub use assignment::Assignment;
pub use config::MemberConfig;
pub use connect::{connect_client, describe_target, parse_database_url, DbConfig};
pub use error::{sqlstate, Error, FenceReason, Result};
pub use fence::{Fence, FencedTransaction};
pub use leader::{Election, Leader, LeaderConfig, LeaderFence, LeaderTransaction, Leadership};
pub use member::Member;
pub use migrate::{check_migrated, migrate, MigrateOptions, MigrationReport};
pub use protocol::{CHANNEL, PROTOCOL_VERSION};
pub use tls::{ClientCert, RootCert, TlsMode};
pub use view::{MemberInfo, MemberState, View};

/// Re-exported driver types that appear in this crate's API.
pub use tokio_postgres;
