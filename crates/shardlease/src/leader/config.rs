//! A candidate's configuration: the member settings with leader-election defaults, and the
//! watcher's.

use std::time::Duration;

use crate::config::MemberConfig;
use crate::error::{Error, Result};

/// How a candidate joins its group, keeps its lease and watches the others.
///
/// The defaults (heartbeat 2 s, TTL 10 s, watch period 20 s) cost about 0.55 statements per
/// candidate per second at rest, while a crashed leader is replaced within milliseconds (its
/// successor waits on its lock) and a hung one within about one TTL.
///
/// ```
/// use std::time::Duration;
/// let cfg = shardlease::LeaderConfig::new("scheduler", "pod-a")
///     .heartbeat(Duration::from_secs(1))
///     .lease_ttl(Duration::from_secs(5));
/// cfg.validate().unwrap();
/// ```
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct LeaderConfig {
    /// The group to elect a leader in (1 to 200 characters). Every member of the group is a
    /// candidate: join it through [`Leader`](crate::Leader) only.
    pub group: String,
    /// This candidate's id, unique in the group (1 to 200 characters).
    pub member_id: String,
    /// How often the lease is checked (and, every other beat, extended), and the candidate
    /// before this one in incarnation order probed for expiry. One statement per beat: the
    /// whole cost at rest but for the watch. Default 2 s.
    pub heartbeat: Duration,
    /// Lease time-to-live, by the database clock. Must exceed twice the heartbeat. A hung
    /// leader is replaced about one TTL (plus up to a heartbeat) after its last renewal, and
    /// reports itself `Lost` a heartbeat (at most a quarter of the TTL) before the lease
    /// expires. Default 10 s.
    pub lease_ttl: Duration,
    /// How long one wait on the watched candidate's lock lasts before it is re-armed (one
    /// statement). A waiting statement holds a snapshot, and with it the database's xmin
    /// horizon: this bounds how long vacuum is held back. Between 100 ms and 1 h; default 20 s.
    pub watch_period: Duration,
    /// Upper bound of the reconnect backoff. Default 5 s.
    pub reconnect_max_backoff: Duration,
    /// Metadata stored with the lease (a JSON object). Default `{}`.
    pub metadata: serde_json::Value,
}

impl LeaderConfig {
    /// A configuration with the defaults (heartbeat 2 s, TTL 10 s, watch period 20 s).
    pub fn new(group: impl Into<String>, member_id: impl Into<String>) -> Self {
        LeaderConfig {
            group: group.into(),
            member_id: member_id.into(),
            heartbeat: Duration::from_secs(2),
            lease_ttl: Duration::from_secs(10),
            watch_period: Duration::from_secs(20),
            reconnect_max_backoff: Duration::from_secs(5),
            metadata: serde_json::json!({}),
        }
    }

    /// Set the heartbeat interval.
    #[must_use]
    pub fn heartbeat(mut self, heartbeat: Duration) -> Self {
        self.heartbeat = heartbeat;
        self
    }

    /// Set the lease TTL.
    #[must_use]
    pub fn lease_ttl(mut self, ttl: Duration) -> Self {
        self.lease_ttl = ttl;
        self
    }

    /// Set how long one wait on the watched candidate's lock lasts.
    #[must_use]
    pub fn watch_period(mut self, period: Duration) -> Self {
        self.watch_period = period;
        self
    }

    /// Set the reconnect backoff cap.
    #[must_use]
    pub fn reconnect_max_backoff(mut self, cap: Duration) -> Self {
        self.reconnect_max_backoff = cap;
        self
    }

    /// Set the lease metadata (must be a JSON object).
    #[must_use]
    pub fn metadata(mut self, metadata: serde_json::Value) -> Self {
        self.metadata = metadata;
        self
    }

    /// Check every value; the error names the first bad one and why.
    pub fn validate(&self) -> Result<()> {
        self.member_config().validate()?;
        if self.watch_period < Duration::from_millis(100)
            || self.watch_period > Duration::from_secs(3600)
        {
            return Err(Error::Config(format!(
                "watch period must be between 100ms and 1h, got {:?}",
                self.watch_period
            )));
        }
        Ok(())
    }

    /// The membership settings: no crash checks run in a leader group (the crash-check
    /// interval is set to the heartbeat only to pass validation).
    pub(crate) fn member_config(&self) -> MemberConfig {
        MemberConfig::new(self.group.clone(), self.member_id.clone())
            .heartbeat(self.heartbeat)
            .lease_ttl(self.lease_ttl)
            .crash_check(self.heartbeat)
            .reconnect_max_backoff(self.reconnect_max_backoff)
            .metadata(self.metadata.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_cheap() {
        let cfg = LeaderConfig::new("g", "m");
        cfg.validate().unwrap();
        // One heartbeat per beat and one re-armed wait per watch period, per candidate.
        let per_second = 1.0 / cfg.heartbeat.as_secs_f64() + 1.0 / cfg.watch_period.as_secs_f64();
        assert!(per_second <= 0.6, "{per_second} statements per second");
    }

    #[test]
    fn rejects_bad_values_with_a_reason() {
        let bad = [
            (LeaderConfig::new("", "m"), "group must not be empty"),
            (
                LeaderConfig::new("g", "m").lease_ttl(Duration::from_secs(3)),
                "more than twice the heartbeat",
            ),
            (
                LeaderConfig::new("g", "m").watch_period(Duration::from_millis(5)),
                "watch period",
            ),
            (
                LeaderConfig::new("g", "m").metadata(serde_json::json!("x")),
                "JSON object",
            ),
        ];
        for (cfg, want) in bad {
            let err = cfg.validate().unwrap_err().to_string();
            assert!(err.contains(want), "{err:?} should mention {want:?}");
        }
    }
}
