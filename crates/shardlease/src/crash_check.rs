//! A checker's memory between crash checks, and what it asks of the next one.
//!
//! Three members of a group (the lowest slots) check for crashed and expired members, ten
//! times a second each by default. A check at rest should cost next to nothing, so it does
//! only what may find something:
//!
//! - **The slot locks** are probed (one shared try-lock per lease) only when a session of the
//!   database has ended since this checker last looked (`shardlease.ended_sessions()`, schema
//!   version 8): a crashed member's backend releases its slot lock before that count moves.
//!   They are still probed once per heartbeat whatever the count says, for the sessions it
//!   does not count (a member that closes its connection without leaving), and at every check
//!   after one that found something, until the group is clean again.
//! - **The expiries** are looked at (a scan of the group's leases) only when the earliest
//!   lease of another member may have come due (schema version 10): each look returns how
//!   long, by the database clock, until the earliest becomes reapable, and the checker looks
//!   again once that much has passed by its own monotonic clock, counted from before it sent
//!   the check, so never later than the database would say. It also looks when its view has
//!   moved to another generation (a joiner may have a shorter TTL), and whenever it probes
//!   the locks (once per heartbeat at least, which also covers a hand edit of `expires_at`).
//!   Whether a lease has expired is still the database's decision, by its clock.

use std::time::Duration;

use tokio::time::Instant;

/// What one check returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Checked {
    /// The group has a dead or expired member to reap.
    pub(crate) needs_reap: bool,
    /// `shardlease.ended_sessions()` as the check read it (`None` before PostgreSQL 15).
    pub(crate) ended_sessions: Option<i64>,
    /// The check probed every slot lock.
    pub(crate) probed: bool,
    /// The check looked at the expiries.
    pub(crate) looked: bool,
    /// When it looked: how long until the earliest lease of another member becomes reapable
    /// for its expiry, by the database clock (`None`: no other lease).
    pub(crate) next_expiry: Option<Duration>,
}

/// A checker's memory between crash checks.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct CheckState {
    /// The count of ended sessions as of the last check (`None`: probe at the next).
    ended_sessions: Option<i64>,
    /// When the last check that probed every slot lock was sent.
    probed_at: Option<Instant>,
    /// When the expiries are next worth a look (`None`: at the next check).
    expiries_due: Option<Instant>,
    /// The view's generation when the expiries were last looked at.
    looked_generation: Option<u64>,
}

impl CheckState {
    /// The count to pass to `shardlease.needs_reap`: `None` (probe every lock) when there is
    /// none, or when the last full probe is a heartbeat old.
    pub(crate) fn seen(&self, heartbeat: Duration) -> Option<i64> {
        match self.probed_at {
            Some(at) if at.elapsed() < heartbeat => self.ended_sessions,
            _ => None,
        }
    }

    /// Whether a check sent at `now`, with the view at `generation`, should look at the
    /// expiries: when they may have come due, or the group has changed since the last look.
    pub(crate) fn look_expiries(&self, generation: u64, now: Instant) -> bool {
        self.looked_generation != Some(generation) || self.expiries_due.is_none_or(|due| now >= due)
    }

    /// Remember what a check sent at `sent`, with the view at `generation`, returned. With no
    /// other lease in the group, the expiries are next looked at a heartbeat later (the probe
    /// every heartbeat looks anyway) or at the next change of the group.
    pub(crate) fn record(
        &mut self,
        checked: Checked,
        sent: Instant,
        generation: u64,
        heartbeat: Duration,
    ) {
        if checked.probed {
            self.probed_at = Some(sent);
        }
        if checked.looked {
            self.looked_generation = Some(generation);
            self.expiries_due = Some(sent + checked.next_expiry.unwrap_or(heartbeat));
        }
        if checked.needs_reap {
            // Found something: look and probe again at every check until the group is clean.
            self.ended_sessions = None;
            self.expiries_due = None;
        } else {
            self.ended_sessions = checked.ended_sessions;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BEAT: Duration = Duration::from_secs(1);

    fn clean(ended_sessions: Option<i64>, probed: bool) -> Checked {
        Checked {
            needs_reap: false,
            ended_sessions,
            probed,
            looked: probed,
            next_expiry: Some(Duration::from_secs(3)),
        }
    }

    #[test]
    fn checks_skip_the_probe_only_after_a_clean_recent_one() {
        let now = Instant::now();
        let mut c = CheckState::default();
        assert_eq!(c.seen(BEAT), None, "the first check probes every lock");

        c.record(clean(Some(7), true), now, 1, BEAT);
        assert_eq!(
            c.seen(BEAT),
            Some(7),
            "a clean probe: the next check compares counts"
        );
        c.record(clean(Some(7), false), now, 1, BEAT);
        assert_eq!(c.seen(BEAT), Some(7));

        let found = Checked {
            needs_reap: true,
            ..clean(Some(8), true)
        };
        c.record(found, now, 1, BEAT);
        assert_eq!(
            c.seen(BEAT),
            None,
            "found something: probe again until clean"
        );
        c.record(clean(Some(8), true), now, 1, BEAT);
        assert_eq!(c.seen(BEAT), Some(8));

        c.record(clean(None, true), now, 1, BEAT);
        assert_eq!(
            c.seen(BEAT),
            None,
            "no count (PostgreSQL 14): every check probes"
        );

        let long_ago = now
            .checked_sub(BEAT * 2)
            .expect("the clock is past two seconds");
        let mut c = CheckState::default();
        c.record(clean(Some(7), true), long_ago, 1, BEAT);
        assert_eq!(c.seen(BEAT), None, "the last full probe is a heartbeat old");
    }

    #[test]
    fn checks_look_at_the_expiries_only_when_one_may_have_come_due() {
        let sent = Instant::now();
        let mut c = CheckState::default();
        assert!(c.look_expiries(1, sent), "the first check looks");

        c.record(clean(Some(7), true), sent, 1, BEAT);
        let ms = Duration::from_millis;
        assert!(!c.look_expiries(1, sent + ms(100)), "3 s to go: no look");
        assert!(
            !c.look_expiries(1, sent + ms(2_999)),
            "not yet due by the clock counted from the send"
        );
        assert!(c.look_expiries(1, sent + ms(3_000)), "due: look");
        assert!(
            c.look_expiries(2, sent + ms(100)),
            "the view moved to another generation: look"
        );

        // A check that only read the count leaves the schedule as it was.
        let counted = Checked {
            looked: false,
            next_expiry: None,
            ..clean(Some(7), false)
        };
        c.record(counted, sent + ms(100), 1, BEAT);
        assert!(!c.look_expiries(1, sent + ms(200)));
        assert!(c.look_expiries(1, sent + ms(3_000)));

        // A lease already reapable (an unkillable one not yet due, say): look at once.
        let due_now = Checked {
            next_expiry: Some(Duration::ZERO),
            ..clean(Some(7), true)
        };
        c.record(due_now, sent, 1, BEAT);
        assert!(c.look_expiries(1, sent));

        // Alone in the group: look again a heartbeat later, or at the group's next change.
        let alone = Checked {
            next_expiry: None,
            ..clean(Some(7), true)
        };
        c.record(alone, sent, 1, BEAT);
        assert!(!c.look_expiries(1, sent + ms(999)));
        assert!(c.look_expiries(1, sent + BEAT));
        assert!(c.look_expiries(2, sent + ms(1)));

        // Found something: look again at every check until the group is clean.
        let found = Checked {
            needs_reap: true,
            ..clean(Some(8), true)
        };
        c.record(found, sent, 1, BEAT);
        assert!(c.look_expiries(1, sent + ms(1)));
    }
}
