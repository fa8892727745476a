#![doc = include_str!("../../../README.md")]
#![deny(missing_docs)]

pub mod assignment;
mod config;
mod connect;
mod error;
mod fence;
pub mod hash;
mod member;
pub mod migrate;
mod notification;
mod pooler;
pub mod protocol;
mod session;
mod tls;
mod view;

pub use assignment::Assignment;
pub use config::MemberConfig;
pub use connect::{connect_client, describe_target, parse_database_url, DbConfig};
pub use error::{sqlstate, Error, FenceReason, Result};
pub use fence::{Fence, FencedTransaction};
pub use member::Member;
pub use migrate::{check_migrated, migrate, MigrationReport};
pub use protocol::{CHANNEL, PROTOCOL_VERSION};
pub use tls::{RootCert, TlsMode};
pub use view::{MemberInfo, MemberState, View};

/// Re-exported driver types that appear in this crate's API.
pub use tokio_postgres;
