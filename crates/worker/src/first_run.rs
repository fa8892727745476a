//! The first run: `demo` with `DATABASE_URL` unset and nothing answering at the default
//! address starts a throwaway PostgreSQL from the local installation
//! (`shardlease-localpg`: `initdb` in a temporary directory, a free port, removed at exit).

use std::fmt;

use anyhow::{Context, Result};
use shardlease::DbConfig;
use shardlease_localpg::{Builder, Cluster, NotInstalled};
use tokio_util::sync::CancellationToken;

use crate::demo::Interrupted;

/// Where the demo runs: the given or default server, or a throwaway one (stopped and
/// removed when this value is dropped).
pub struct Target {
    /// The connection config.
    pub config: DbConfig,
    /// The throwaway server, if one was started.
    pub throwaway: Option<Cluster>,
}

impl Target {
    /// Stop and remove the throwaway server, if any, off the async threads (`pg_ctl stop`
    /// waits for the server).
    pub async fn finish(self) {
        if let Some(cluster) = self.throwaway {
            let _ = tokio::task::spawn_blocking(move || drop(cluster)).await;
        }
    }
}

/// No server and no installation to start one from: what to install, per platform.
#[derive(Debug)]
pub struct NoPostgres {
    /// The default address that did not answer.
    pub default: String,
    /// Where the installation was looked for.
    pub not_installed: NotInstalled,
}

impl fmt::Display for NoPostgres {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "nothing answers at {} and DATABASE_URL is unset, and the demo cannot start a \
             throwaway PostgreSQL instead: {}\n\
             Or set DATABASE_URL to a running server.",
            self.default, self.not_installed
        )
    }
}

impl std::error::Error for NoPostgres {}

/// The demo's server: `explicit` (DATABASE_URL) when set, used as is; else `default` when
/// something answers there; else a throwaway cluster, announced in one line on stdout.
/// A signal while the cluster starts waits for the start, removes the cluster, and returns
/// [`Interrupted`].
pub async fn demo_target(
    explicit: Option<&str>,
    default: &str,
    interrupted: &CancellationToken,
) -> Result<Target> {
    if let Some(url) = explicit {
        return Ok(Target {
            config: shardlease::parse_database_url(url)?,
            throwaway: None,
        });
    }
    let config = shardlease::parse_database_url(default)
        .context("the default database URL (SHARDLEASE_DEFAULT_DATABASE_URL)")?;
    let probe = config.clone();
    if tokio::task::spawn_blocking(move || shardlease_localpg::answers_at(&probe)).await? {
        return Ok(Target {
            config,
            throwaway: None,
        });
    }
    let target = shardlease_localpg::address(&config);
    let mut start = tokio::task::spawn_blocking(|| {
        Builder::new()
            .dir_prefix("shardlease-demo-pg")
            // A throwaway: no need to survive a power cut.
            .conf("fsync = off")
            .start()
    });
    let started = tokio::select! {
        r = &mut start => r?,
        _ = interrupted.cancelled() => {
            // The start cannot be abandoned half-way: let it finish, then remove it.
            if let Ok(Ok(cluster)) = start.await {
                let _ = tokio::task::spawn_blocking(move || drop(cluster)).await;
            }
            return Err(Interrupted.into());
        }
    };
    let cluster = match started {
        Ok(cluster) => cluster,
        Err(shardlease_localpg::Error::NotInstalled(not_installed)) => {
            return Err(NoPostgres {
                default: target,
                not_installed,
            }
            .into())
        }
        Err(e) => {
            return Err(anyhow::Error::from(e).context(format!(
                "nothing answers at {target} and DATABASE_URL is unset; starting a throwaway \
                 PostgreSQL failed"
            )))
        }
    };
    let installation = cluster.installation();
    println!(
        "Nothing answers at {target} and DATABASE_URL is unset: started a throwaway \
         PostgreSQL{} from {}{} on 127.0.0.1:{} in {}; it is removed when the demo ends.",
        installation
            .version()
            .map(|v| format!(" {v}"))
            .unwrap_or_default(),
        installation.bin_dir().display(),
        cluster
            .os_user()
            .map(|u| format!(" (as OS user {u})"))
            .unwrap_or_default(),
        cluster.port(),
        cluster.dir().display(),
    );
    let config = shardlease::parse_database_url(&cluster.url())?;
    Ok(Target {
        config,
        throwaway: Some(cluster),
    })
}
