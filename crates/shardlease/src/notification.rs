//! Membership-change notifications: parse a payload, and apply the change it carries to a view.

use crate::view::{MemberInfo, MemberState, View};

/// An announcement on [`CHANNEL`](crate::protocol::CHANNEL): the changes from generation
/// `prev` to `generation`, when the payload carries them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Change {
    pub generation: u64,
    prev: Option<u64>,
    slot_count: Option<u32>,
    deltas: Option<Vec<Delta>>,
}

/// One change, one generation: `{"join": {...}, "s": S}` or `{"gone": [...], "s": S}`
/// (`s`, the slot count after it, is not needed here: the payload's `slot_count` is the last's).
#[derive(Debug, Clone, PartialEq, Eq)]
enum Delta {
    Join {
        member: String,
        slot: u32,
        incarnation: i64,
    },
    Gone(Vec<i64>),
}

#[derive(serde::Deserialize)]
struct Joined {
    member: String,
    slot: u32,
    incarnation: i64,
}

#[derive(serde::Deserialize)]
struct RawDelta {
    join: Option<Joined>,
    gone: Option<Vec<i64>>,
}

impl<'de> serde::Deserialize<'de> for Delta {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Delta, D::Error> {
        match RawDelta::deserialize(d)? {
            RawDelta {
                join: Some(j),
                gone: None,
            } => Ok(Delta::Join {
                member: j.member,
                slot: j.slot,
                incarnation: j.incarnation,
            }),
            RawDelta {
                join: None,
                gone: Some(g),
            } => Ok(Delta::Gone(g)),
            _ => Err(serde::de::Error::custom(
                "a change is either a join or a departure",
            )),
        }
    }
}

#[derive(serde::Deserialize)]
struct Payload {
    group: String,
    generation: u64,
    prev: Option<u64>,
    slot_count: Option<u32>,
    deltas: Option<Vec<Delta>>,
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
            deltas: p.deltas,
        })
    }

    /// Apply these changes to `view` in place, when the payload carries them and they follow
    /// on from `view` (or overlap it: a view at a generation between prev and this one
    /// applies the changes after its own); `false` (and `view` untouched) means: re-read the tables.
    /// `incarnation` is the member's own: a change that removes it makes the member lost. No
    /// copy of the view is made: at a thousand members, every member applies every change.
    pub fn apply(&self, view: &mut View, incarnation: i64) -> bool {
        let (Some(deltas), Some(slot_count)) = (self.deltas.as_ref(), self.slot_count) else {
            return false;
        };
        // One delta per generation, from prev on: a view that has already reached a later
        // generation (by a re-read) applies only the rest.
        let Some(prev) = self.prev else {
            return false;
        };
        if prev > view.generation
            || self.generation <= view.generation
            || deltas.len() as u64 != self.generation - prev
        {
            return false;
        }
        let deltas = &deltas[(view.generation - prev) as usize..];
        if !self.consistent(view, deltas, slot_count) {
            return false;
        }
        for delta in deltas {
            match delta {
                Delta::Join {
                    member,
                    slot,
                    incarnation,
                } => {
                    let at = view.members.partition_point(|m| m.slot < *slot);
                    view.members.insert(
                        at,
                        MemberInfo {
                            member_id: member.clone(),
                            slot: *slot,
                            incarnation: *incarnation,
                        },
                    );
                }
                Delta::Gone(gone) => view.members.retain(|m| !gone.contains(&m.incarnation)),
            }
        }
        if !view.members.iter().any(|m| m.incarnation == incarnation) {
            view.state = MemberState::Lost {
                reason: "this member's lease is no longer in the group".into(),
            };
        }
        view.generation = self.generation;
        view.slot_count = slot_count;
        true
    }

    /// Whether applying `deltas` to `view` leaves what the tables guarantee: one member per
    /// slot, every slot below the slot count. Checked before anything changes, so that a
    /// hand-edited table means a re-read, never a half-applied view.
    fn consistent(&self, view: &View, deltas: &[Delta], slot_count: u32) -> bool {
        let gone: Vec<i64> = deltas
            .iter()
            .filter_map(|d| match d {
                Delta::Gone(g) => Some(g.iter().copied()),
                Delta::Join { .. } => None,
            })
            .flatten()
            .collect();
        let stays = |incarnation: i64| !gone.contains(&incarnation);
        // The highest slot that stays (members are sorted by slot).
        let top = view
            .members
            .iter()
            .rev()
            .find(|m| stays(m.incarnation))
            .map(|m| m.slot);
        if top.is_some_and(|slot| slot >= slot_count) {
            return false;
        }
        let mut added: Vec<u32> = Vec::new();
        for d in deltas {
            if let Delta::Join {
                slot, incarnation, ..
            } = d
            {
                let taken = view
                    .members
                    .binary_search_by_key(slot, |m| m.slot)
                    .is_ok_and(|i| stays(view.members[i].incarnation));
                if stays(*incarnation) {
                    if *slot >= slot_count || taken || added.contains(slot) {
                        return false;
                    }
                    added.push(*slot);
                }
            }
        }
        true
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
                "deltas":[{"join":{"member":"m7","slot":1,"incarnation":7}}]}"#,
            "g",
        )
        .unwrap();
        let mut next = v.clone();
        assert!(c.apply(&mut next, 1));
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
    fn a_burst_is_applied_in_order() {
        let v = view(4, &[(0, 1), (1, 2)]);
        let c = Change::parse(
            r#"{"group":"g","generation":7,"kind":"leave","prev":4,"slot_count":3,"deltas":[
                {"join":{"member":"a","slot":2,"incarnation":5}},
                {"gone":[2]},
                {"join":{"member":"b","slot":1,"incarnation":6}}]}"#,
            "g",
        )
        .unwrap();
        let mut next = v.clone();
        assert!(c.apply(&mut next, 1));
        let slots: Vec<(u32, i64)> = next
            .members
            .iter()
            .map(|m| (m.slot, m.incarnation))
            .collect();
        assert_eq!(slots, [(0, 1), (1, 6), (2, 5)]);
        assert_eq!((next.generation, next.slot_count), (7, 3));
    }

    #[test]
    fn a_view_ahead_of_prev_applies_only_the_rest() {
        // The view re-read at generation 5, which already has the join of m5.
        let v = view(5, &[(0, 1), (1, 5)]);
        let c = Change::parse(
            r#"{"group":"g","generation":6,"kind":"join","prev":4,"slot_count":3,"deltas":[
                {"join":{"member":"m5","slot":1,"incarnation":5}},
                {"join":{"member":"m6","slot":2,"incarnation":6}}]}"#,
            "g",
        )
        .unwrap();
        let mut next = v.clone();
        assert!(c.apply(&mut next, 1));
        let slots: Vec<(u32, i64)> = next
            .members
            .iter()
            .map(|m| (m.slot, m.incarnation))
            .collect();
        assert_eq!(slots, [(0, 1), (1, 5), (2, 6)]);
        // A delta count that does not match the generations is not trusted.
        let short =
            r#"{"group":"g","generation":7,"prev":4,"slot_count":3,"deltas":[{"gone":[5]}]}"#;
        let mut w = v.clone();
        assert!(!Change::parse(short, "g").unwrap().apply(&mut w, 1));
        assert_eq!(w, v);
    }

    #[test]
    fn departures_shrink_the_view_and_our_own_makes_us_lost() {
        let v = view(4, &[(0, 1), (1, 2), (2, 3)]);
        let c = Change::parse(
            r#"{"group":"g","generation":5,"kind":"reap","prev":4,"slot_count":2,"deltas":[{"gone":[3]}]}"#,
            "g",
        )
        .unwrap();
        let mut next = v.clone();
        assert!(c.apply(&mut next, 1));
        assert_eq!(next.members.len(), 2);
        assert_eq!(next.slot_count, 2);
        assert!(next.is_joined());
        let c = Change::parse(
            r#"{"group":"g","generation":5,"kind":"leave","prev":4,"slot_count":3,"deltas":[{"gone":[1]}]}"#,
            "g",
        )
        .unwrap();
        let mut next = v.clone();
        assert!(c.apply(&mut next, 1));
        assert!(!next.is_joined());
    }

    #[test]
    fn anything_that_does_not_follow_on_means_a_reread() {
        let v = view(4, &[(0, 1)]);
        let untouched = |json: &str| {
            let mut w = v.clone();
            let applied = Change::parse(json, "g").unwrap().apply(&mut w, 1);
            !applied && w == v
        };
        let gap = r#"{"group":"g","generation":6,"prev":5,"slot_count":1,"deltas":[{"gone":[9]}]}"#;
        assert!(untouched(gap));
        let hint = r#"{"group":"g","generation":5,"kind":"change"}"#;
        assert!(untouched(hint));
        let bad_slot = r#"{"group":"g","generation":5,"prev":4,"slot_count":1,
                           "deltas":[{"join":{"member":"x","slot":3,"incarnation":2}}]}"#;
        assert!(untouched(bad_slot));
        let taken = r#"{"group":"g","generation":5,"prev":4,"slot_count":2,
                        "deltas":[{"join":{"member":"x","slot":0,"incarnation":2}}]}"#;
        assert!(untouched(taken));
        assert_eq!(Change::parse(hint, "other"), None);
        assert_eq!(Change::parse("not json", "g"), None);
    }
}
