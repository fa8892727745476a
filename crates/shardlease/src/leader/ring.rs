//! Who leads, and who watches whom: pure functions of a view.
//!
//! Candidates are ordered by incarnation. A join takes a higher incarnation than every lease
//! of its group (joins hold the group row and draw from one sequence), so the order is the
//! order of arrival, and the first is the longest-standing: the leader. An incarnation carries
//! the timeline it was issued on (bits 40 and up); leases of an older timeline (before a
//! failover) are dead, and never lead.
//!
//! Each candidate watches the one before it, and the first watches the last: a ring, in
//! which every candidate is watched by exactly one other. The leader's successor is the one
//! that watches the leader.

use crate::view::{MemberInfo, View};

/// The timeline an incarnation was issued on (see the V3 migration).
fn timeline(incarnation: i64) -> i64 {
    incarnation >> 40
}

/// The leader of `view`: the lowest incarnation among the members of the view's latest
/// timeline, as `shardlease.leader_incarnation` computes it from the tables.
pub(crate) fn leader(view: &View) -> Option<&MemberInfo> {
    let latest = view.members.iter().map(|m| timeline(m.incarnation)).max()?;
    view.members
        .iter()
        .filter(|m| timeline(m.incarnation) == latest)
        .min_by_key(|m| m.incarnation)
}

/// The member the candidate of `incarnation` watches: the one just before it in incarnation
/// order, or the last one for the first. `None` when it is alone or not in the view.
pub(crate) fn watched(view: &View, incarnation: i64) -> Option<&MemberInfo> {
    if view.members.len() < 2 || !view.members.iter().any(|m| m.incarnation == incarnation) {
        return None;
    }
    view.members
        .iter()
        .filter(|m| m.incarnation < incarnation)
        .max_by_key(|m| m.incarnation)
        .or_else(|| view.members.iter().max_by_key(|m| m.incarnation))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::view::MemberState;

    const T1: i64 = 1 << 40;
    const T2: i64 = 2 << 40;

    /// A view of (member, slot, incarnation), sorted by slot as the session keeps it.
    fn view(members: &[(&str, u32, i64)]) -> View {
        let mut members: Vec<MemberInfo> = members
            .iter()
            .map(|&(id, slot, incarnation)| MemberInfo {
                member_id: id.into(),
                slot,
                incarnation,
            })
            .collect();
        members.sort_by_key(|m| m.slot);
        View {
            group: "g".into(),
            generation: 7,
            slot_count: members.iter().map(|m| m.slot + 1).max().unwrap_or(0),
            members,
            state: MemberState::Left,
            fence_timeout_ms: 1000,
        }
    }

    fn id(m: Option<&MemberInfo>) -> Option<&str> {
        m.map(|m| m.member_id.as_str())
    }

    #[test]
    fn the_longest_standing_member_leads_whatever_its_slot() {
        // b rejoined into slot 0 after a crash: a newer incarnation than a and c.
        let v = view(&[("b", 0, T1 + 9), ("a", 1, T1 + 2), ("c", 2, T1 + 5)]);
        assert_eq!(id(leader(&v)), Some("a"));
        assert_eq!(id(leader(&view(&[]))), None);
    }

    #[test]
    fn leases_of_an_older_timeline_never_lead() {
        // Before a failover, "old" had incarnation T1 + 1; "new" rejoined on timeline 2.
        let v = view(&[("old", 0, T1 + 1), ("new", 1, T2 + 1), ("newer", 2, T2 + 4)]);
        assert_eq!(id(leader(&v)), Some("new"));
    }

    #[test]
    fn every_member_is_watched_by_exactly_one_other() {
        let v = view(&[("b", 0, T1 + 9), ("a", 1, T1 + 2), ("c", 2, T1 + 5)]);
        // a (the leader) watches the newest, c watches a, b watches c.
        assert_eq!(id(watched(&v, T1 + 2)), Some("b"));
        assert_eq!(id(watched(&v, T1 + 5)), Some("a"));
        assert_eq!(id(watched(&v, T1 + 9)), Some("c"));
        let mut watchers: Vec<&str> = v
            .members
            .iter()
            .filter_map(|m| id(watched(&v, m.incarnation)))
            .collect();
        watchers.sort();
        assert_eq!(watchers, ["a", "b", "c"]);
    }

    #[test]
    fn nobody_is_watched_by_a_lone_member_or_a_stranger() {
        let v = view(&[("a", 0, T1 + 2)]);
        assert_eq!(id(watched(&v, T1 + 2)), None);
        let v = view(&[("a", 0, T1 + 2), ("b", 1, T1 + 3)]);
        assert_eq!(id(watched(&v, T1 + 3)), Some("a"));
        assert_eq!(id(watched(&v, T1 + 2)), Some("b"));
        assert_eq!(id(watched(&v, T1 + 99)), None, "not in the view");
    }
}
