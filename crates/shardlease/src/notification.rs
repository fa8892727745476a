//! Membership-change notifications: parse a payload, and apply the change it carries to a view.

use crate::view::{MemberInfo, MemberState, View};

/// A change announced on [`CHANNEL`](crate::protocol::CHANNEL).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Change {
    pub generation: u64,
    /// The generation the change applies to, when the payload carries the change itself.
    prev: Option<u64>,
    slot_count: Option<u32>,
    delta: Option<Delta>,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
enum Delta {
    Join {
        member: String,
        slot: u32,
        incarnation: i64,
    },
    Gone(Vec<i64>),
}

#[derive(serde::Deserialize)]
struct Payload {
    group: String,
    generation: u64,
    prev: Option<u64>,
    slot_count: Option<u32>,
    delta: Option<Delta>,
}

impl Change {
    /// The change in `payload`, if it is about `group` (malformed payloads are ignored: the
    /// heartbeat notices any change it announced).
    pub fn parse(payload: &str, group: &str) -> Option<Change> {
        let p: Payload = serde_json::from_str(payload).ok()?;
        (p.group == group).then_some(Change {
            generation: p.generation,
            prev: p.prev,
            slot_count: p.slot_count,
            delta: p.delta,
        })
    }

    /// The view after this change, when it carries the change and follows on from `view`;
    /// `None` means: re-read the tables. `incarnation` is the member's own: a change that
    /// removes it makes the member lost.
    pub fn apply(&self, view: &View, incarnation: i64) -> Option<View> {
        if self.prev != Some(view.generation) {
            return None;
        }
        let (delta, slot_count) = (self.delta.as_ref()?, self.slot_count?);
        let mut next = view.clone();
        next.generation = self.generation;
        next.slot_count = slot_count;
        match delta {
            Delta::Join {
                member,
                slot,
                incarnation,
            } => {
                next.members.retain(|m| m.slot != *slot);
                let at = next.members.partition_point(|m| m.slot < *slot);
                next.members.insert(
                    at,
                    MemberInfo {
                        member_id: member.clone(),
                        slot: *slot,
                        incarnation: *incarnation,
                    },
                );
            }
            Delta::Gone(gone) => {
                next.members.retain(|m| !gone.contains(&m.incarnation));
                if gone.contains(&incarnation) {
                    next.state = MemberState::Lost {
                        reason: "this member's lease is no longer in the group".into(),
                    };
                }
            }
        }
        // The tables keep every slot below S; a change that says otherwise is not trusted.
        if next.members.iter().any(|m| m.slot >= next.slot_count) {
            return None;
        }
        Some(next)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view(generation: u64, slots: &[(u32, i64)]) -> View {
        View {
            group: "g".into(),
            generation,
            slot_count: slots.iter().map(|s| s.0 + 1).max().unwrap_or(0),
            members: slots
                .iter()
                .map(|&(slot, incarnation)| MemberInfo {
                    member_id: format!("m{incarnation}"),
                    slot,
                    incarnation,
                })
                .collect(),
            state: MemberState::Joined {
                slot: 0,
                incarnation: 1,
            },
            fence_timeout_ms: 1000,
        }
    }

    #[test]
    fn a_join_that_follows_on_is_applied_in_slot_order() {
        let v = view(4, &[(0, 1), (2, 3)]);
        let c = Change::parse(
            r#"{"group":"g","generation":5,"kind":"join","prev":4,"slot_count":3,
                "delta":{"join":{"member":"m7","slot":1,"incarnation":7}}}"#,
            "g",
        )
        .unwrap();
        let next = c.apply(&v, 1).unwrap();
        assert_eq!(next.generation, 5);
        let slots: Vec<(u32, i64)> = next
            .members
            .iter()
            .map(|m| (m.slot, m.incarnation))
            .collect();
        assert_eq!(slots, [(0, 1), (1, 7), (2, 3)]);
        assert_eq!(next.members[1].member_id, "m7");
    }

    #[test]
    fn departures_shrink_the_view_and_our_own_makes_us_lost() {
        let v = view(4, &[(0, 1), (1, 2), (2, 3)]);
        let c = Change::parse(
            r#"{"group":"g","generation":5,"kind":"reap","prev":4,"slot_count":2,"delta":{"gone":[3]}}"#,
            "g",
        )
        .unwrap();
        let next = c.apply(&v, 1).unwrap();
        assert_eq!(next.members.len(), 2);
        assert_eq!(next.slot_count, 2);
        assert!(next.is_joined());
        let c = Change::parse(
            r#"{"group":"g","generation":5,"kind":"leave","prev":4,"slot_count":3,"delta":{"gone":[1]}}"#,
            "g",
        )
        .unwrap();
        assert!(!c.apply(&v, 1).unwrap().is_joined());
    }

    #[test]
    fn anything_that_does_not_follow_on_means_a_reread() {
        let v = view(4, &[(0, 1)]);
        let gap = r#"{"group":"g","generation":6,"prev":5,"slot_count":1,"delta":{"gone":[9]}}"#;
        assert_eq!(Change::parse(gap, "g").unwrap().apply(&v, 1), None);
        let hint = r#"{"group":"g","generation":5,"kind":"change"}"#;
        assert_eq!(Change::parse(hint, "g").unwrap().apply(&v, 1), None);
        let bad_slot = r#"{"group":"g","generation":5,"prev":4,"slot_count":1,
                           "delta":{"join":{"member":"x","slot":3,"incarnation":2}}}"#;
        assert_eq!(Change::parse(bad_slot, "g").unwrap().apply(&v, 1), None);
        assert_eq!(Change::parse(hint, "other"), None);
        assert_eq!(Change::parse("not json", "g"), None);
    }
}
