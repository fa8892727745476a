//! Member configuration: a plain struct with validated, chainable setters.

use std::time::Duration;

use crate::error::{Error, Result};

/// How a member joins and keeps its lease.
///
/// ```
/// use std::time::Duration;
/// let cfg = shardlease::MemberConfig::new("work_items", "worker-a")
///     .heartbeat(Duration::from_millis(500))
///     .lease_ttl(Duration::from_secs(3));
/// cfg.validate().unwrap();
/// ```
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct MemberConfig {
    /// The group to join (1 to 200 characters).
    pub group: String,
    /// This member's id, unique in the group (1 to 200 characters). The worker uses the pod name.
    pub member_id: String,
    /// How often the lease is checked (and, every other beat, extended) and the generation
    /// compared with the view's. Default 1 s.
    pub heartbeat: Duration,
    /// Lease time-to-live, by the database clock. Must exceed twice the heartbeat. Default 5 s.
    pub lease_ttl: Duration,
    /// How often each of the group's three checkers (its lowest slots) looks for crashed
    /// members (slot locks free) and expired leases; they take turns, so the group checks
    /// three times per interval. Bounds crash detection. Default 100 ms; at most the heartbeat.
    pub crash_check: Duration,
    /// Upper bound of the reconnect backoff. Default 5 s.
    pub reconnect_max_backoff: Duration,
    /// Metadata stored with the lease (a JSON object). Default `{}`.
    pub metadata: serde_json::Value,
}

impl MemberConfig {
    /// A configuration with the defaults (heartbeat 1 s, TTL 5 s, crash check 100 ms).
    pub fn new(group: impl Into<String>, member_id: impl Into<String>) -> Self {
        MemberConfig {
            group: group.into(),
            member_id: member_id.into(),
            heartbeat: Duration::from_secs(1),
            lease_ttl: Duration::from_secs(5),
            crash_check: Duration::from_millis(100),
            reconnect_max_backoff: Duration::from_secs(5),
            metadata: serde_json::json!({}),
        }
    }

    /// Set the heartbeat interval.
    #[must_use = "a setter returns the changed value; the original is consumed"]
    pub fn heartbeat(mut self, heartbeat: Duration) -> Self {
        self.heartbeat = heartbeat;
        self
    }

    /// Set the lease TTL.
    #[must_use = "a setter returns the changed value; the original is consumed"]
    pub fn lease_ttl(mut self, ttl: Duration) -> Self {
        self.lease_ttl = ttl;
        self
    }

    /// Set the crash-check interval.
    #[must_use = "a setter returns the changed value; the original is consumed"]
    pub fn crash_check(mut self, every: Duration) -> Self {
        self.crash_check = every;
        self
    }

    /// Set the reconnect backoff cap.
    #[must_use = "a setter returns the changed value; the original is consumed"]
    pub fn reconnect_max_backoff(mut self, cap: Duration) -> Self {
        self.reconnect_max_backoff = cap;
        self
    }

    /// Set the lease metadata (must be a JSON object).
    #[must_use = "a setter returns the changed value; the original is consumed"]
    pub fn metadata(mut self, metadata: serde_json::Value) -> Self {
        self.metadata = metadata;
        self
    }

    /// Check every value; the error names the first bad one and why.
    pub fn validate(&self) -> Result<()> {
        check_name("group", &self.group)?;
        check_name("member id", &self.member_id)?;
        if self.heartbeat < Duration::from_millis(10) {
            return Err(Error::Config(format!(
                "heartbeat must be at least 10ms, got {:?}",
                self.heartbeat
            )));
        }
        if self.lease_ttl <= self.heartbeat * 2 {
            return Err(Error::Config(format!(
                "lease TTL ({:?}) must be more than twice the heartbeat ({:?}), so that one late heartbeat does not lose the lease",
                self.lease_ttl, self.heartbeat
            )));
        }
        if self.lease_ttl > Duration::from_secs(24 * 3600) {
            return Err(Error::Config(format!(
                "lease TTL must be at most 24h, got {:?}",
                self.lease_ttl
            )));
        }
        if self.crash_check < Duration::from_millis(5) || self.crash_check > self.heartbeat {
            return Err(Error::Config(format!(
                "crash check interval must be between 5ms and the heartbeat ({:?}), got {:?}",
                self.heartbeat, self.crash_check
            )));
        }
        if self.reconnect_max_backoff < Duration::from_millis(10) {
            return Err(Error::Config(format!(
                "reconnect backoff cap must be at least 10ms, got {:?}",
                self.reconnect_max_backoff
            )));
        }
        if !self.metadata.is_object() {
            return Err(Error::Config("metadata must be a JSON object".into()));
        }
        Ok(())
    }

    /// A heartbeat writes the lease only when less than this is left of it: after one and a
    /// half heartbeats, so that renewals write every other beat and a member still survives
    /// two failed heartbeats in a row (the TTL exceeds two heartbeats).
    pub(crate) fn renew_below_ms(&self) -> i64 {
        self.lease_ttl
            .saturating_sub(self.heartbeat.mul_f64(1.5))
            .as_millis() as i64
    }

    /// From how long after the last renewal was sent a heartbeat asks to renew (calls
    /// `shardlease.heartbeat`, which renews once less than [`Self::renew_below_ms`] is left
    /// by the database clock, 1.5 heartbeats after a renewal); earlier beats only read the
    /// lease. A quarter of a heartbeat early, so that a beat that comes a little early, or a
    /// renewal that took a while, never skips a renewal that is due.
    pub(crate) fn renew_ask_after(&self) -> Duration {
        self.heartbeat.mul_f64(1.25)
    }

    /// How long a fenced transaction's commit check may wait for the group's fence lock
    /// (held exclusively only while a membership change commits): the lease TTL.
    pub(crate) fn fence_lock_timeout(&self) -> Duration {
        self.lease_ttl
    }
}

fn check_name(what: &str, name: &str) -> Result<()> {
    if name.trim().is_empty() {
        return Err(Error::Config(format!("{what} must not be empty")));
    }
    if name.chars().count() > 200 {
        return Err(Error::Config(format!(
            "{what} must be at most 200 characters, got {}",
            name.chars().count()
        )));
    }
    if name.chars().any(char::is_control) {
        return Err(Error::Config(format!(
            "{what} must not contain control characters: {name:?}"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid() {
        MemberConfig::new("g", "m").validate().unwrap();
    }

    #[test]
    fn rejects_bad_values_with_a_reason() {
        let bad = [
            (MemberConfig::new("", "m"), "group must not be empty"),
            (MemberConfig::new("g", " "), "member id must not be empty"),
            (
                MemberConfig::new("g", "m").lease_ttl(Duration::from_secs(2)),
                "more than twice the heartbeat",
            ),
            (
                MemberConfig::new("g", "m").heartbeat(Duration::ZERO),
                "heartbeat must be at least",
            ),
            (
                MemberConfig::new("g", "m").crash_check(Duration::from_secs(2)),
                "crash check interval",
            ),
            (
                MemberConfig::new("g", "m").metadata(serde_json::json!([1])),
                "JSON object",
            ),
            (MemberConfig::new("g".repeat(201), "m"), "at most 200"),
        ];
        for (cfg, want) in bad {
            let err = cfg.validate().unwrap_err().to_string();
            assert!(err.contains(want), "{err:?} should mention {want:?}");
        }
    }
}
