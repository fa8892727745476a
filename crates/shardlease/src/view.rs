//! The membership view a member computes its assignment from.

use crate::assignment::Assignment;
use crate::error::{Error, FenceReason, Result};
use crate::fence::Fence;

/// Where this member stands.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum MemberState {
    /// Joined: holds a live lease in `slot` under `incarnation`.
    Joined {
        /// The member's slot.
        slot: u32,
        /// The lease's incarnation (new on every join).
        incarnation: i64,
    },
    /// Lost its lease (expired, reaped, or its session connection broke). Fenced work stops
    /// at once; the member rejoins as a new incarnation when it can.
    Lost {
        /// What happened.
        reason: String,
    },
    /// Left the group (gracefully, or because its handle was dropped).
    Left,
}

/// One member as the view sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct MemberInfo {
    /// The member's id.
    pub member_id: String,
    /// Its slot.
    pub slot: u32,
    /// Its lease's incarnation.
    pub incarnation: i64,
}

/// A consistent snapshot of a group's membership, read from the tables in one statement.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct View {
    /// The group.
    pub group: String,
    /// The generation this view was read at.
    pub generation: u64,
    /// S, the slot count the assignment hashes over.
    pub slot_count: u32,
    /// The members, sorted by slot.
    pub members: Vec<MemberInfo>,
    /// This member's state.
    pub state: MemberState,
    pub(crate) fence_timeout_ms: i32,
}

impl View {
    /// The assignment of this view: a pure function of (S, live slots).
    pub fn assignment(&self) -> Assignment {
        Assignment::new(self.slot_count, self.members.iter().map(|m| m.slot))
            .expect("the database keeps every slot below the slot count")
    }

    /// This member's slot, when joined.
    pub fn my_slot(&self) -> Option<u32> {
        match self.state {
            MemberState::Joined { slot, .. } => Some(slot),
            _ => None,
        }
    }

    /// This member's lease incarnation, when joined.
    pub fn my_incarnation(&self) -> Option<i64> {
        match self.state {
            MemberState::Joined { incarnation, .. } => Some(incarnation),
            _ => None,
        }
    }

    /// True when joined.
    pub fn is_joined(&self) -> bool {
        matches!(self.state, MemberState::Joined { .. })
    }

    /// The member id in `slot`, if any.
    pub fn member_in(&self, slot: u32) -> Option<&str> {
        self.members
            .iter()
            .find(|m| m.slot == slot)
            .map(|m| m.member_id.as_str())
    }

    /// The fence for writes computed from this view. Fails with [`Error::Fenced`]
    /// ([`FenceReason::NotJoined`]) when the member is not joined.
    pub fn fence(&self) -> Result<Fence> {
        match self.state {
            MemberState::Joined { slot, incarnation } => Ok(Fence {
                group: self.group.clone(),
                slot,
                incarnation,
                generation: self.generation,
                timeout_ms: self.fence_timeout_ms,
            }),
            _ => Err(Error::Fenced {
                reason: FenceReason::NotJoined,
                expected: self.generation,
                current: None,
            }),
        }
    }
}
