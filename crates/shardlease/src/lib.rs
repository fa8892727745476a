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
mod pooler;
mod session;
mod tls;
mod view;

pub use assignment::Assignment;
pub use config::MemberConfig;
pub use connect::{connect_client, describe_target, parse_database_url, DbConfig};
pub use error::{Error, FenceReason, Result};
pub use fence::Fence;
pub use member::Member;
pub use migrate::{check_migrated, migrate, MigrationReport};
pub use session::{CHANNEL, PROTOCOL_VERSION};
pub use tls::{RootCert, TlsMode};
pub use view::{MemberInfo, MemberState, View};

/// Re-exported driver types that appear in this crate's API.
pub use tokio_postgres;
