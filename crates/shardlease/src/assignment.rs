//! Minimal-movement assignment of keys to slots: a pure function of the membership view.
//!
//! A membership view is a *slot count* `S` (the persisted high-water mark of slots) and the set
//! of *live* slots, each `< S`. A member keeps its slot for life. [`Assignment::owner`] maps a
//! 64-bit key to a live slot with jump consistent hashing over `S` buckets, re-probing past
//! vacant slots:
//!
//! ```text
//! b = jump_hash(key, S)
//! i = 1
//! while b is vacant:
//!     b = jump_hash(mix(key, i), S)          // mix: crate::hash::mix
//!     i = i + 1
//! ```
//!
//! with a deterministic fallback after `64·S` probes (see [`Assignment::owner`]).
//!
//! This gives the promises of the design (I3, I4):
//! - the result depends only on `(S, live set)`, never on the order of events;
//! - a leave moves only the departed slot's keys, spread evenly over the survivors
//!   (a vacant slot's keys re-probe to a uniformly random live slot);
//! - a join moves keys only onto the joiner;
//! - refilling a vacated slot restores the earlier assignment exactly;
//! - loads are balanced within sampling noise;
//! - with every slot live it is plain jump hash.
//!
//! [`Assignment::shards_of`] gives each of `n` virtual shards its own jump hash, so slots own
//! a random *number* of shards; for the balance of items at every group size use the
//! [`shard_table`](crate::shard_table) instead, which gives every slot its quota exactly.
//!
//! The slot rules that keep those promises across membership changes are
//! [`join_slot`], [`slot_count_after_leave`] and [`slot_count_after_leaves`]; the database
//! code and the tests share them.
//!
//! ```
//! use shardlease::assignment::{join_slot, slot_count_after_leave, Assignment};
//!
//! // Three members join an empty group: slots 0, 1, 2 and S = 3.
//! let (mut s, mut live) = (0, Vec::new());
//! for _ in 0..3 {
//!     let (slot, new_s) = join_slot(s, &live);
//!     live.push(slot);
//!     s = new_s;
//! }
//! assert_eq!((s, live.as_slice()), (3, &[0, 1, 2][..]));
//! let before = Assignment::new(s, live.iter().copied()).unwrap();
//!
//! // Slot 1 leaves: S stays 3 (only the top slot's departure shrinks it).
//! s = slot_count_after_leave(s, 1);
//! live.retain(|&x| x != 1);
//! let after = Assignment::new(s, live.iter().copied()).unwrap();
//!
//! for key in 0..1000u64 {
//!     let key = shardlease::hash::mix64(key);
//!     if before.owner(key) != Some(1) {
//!         assert_eq!(before.owner(key), after.owner(key)); // nobody else's keys move
//!     }
//! }
//! ```

use std::collections::BTreeMap;

use crate::hash::{mix, shard_key};

/// The largest slot count [`Assignment::new`] accepts: 65 536.
///
/// Far above any real group (every member holds PostgreSQL connections), but it bounds the
/// work of [`Assignment::owner`] (at most `64·S` probes per key) on corrupt input.
pub const MAX_SLOT_COUNT: u32 = 1 << 16;

/// How many probes, per slot of `S`, [`Assignment::owner`] makes before its fallback.
pub(crate) const PROBES_PER_SLOT: u64 = 64;

/// Why a membership view is not a valid assignment input.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AssignmentError {
    /// A live slot is not below the slot count.
    #[error("live slot {slot} is out of range: the slot count is {slot_count}, so slots are 0..{slot_count}")]
    SlotOutOfRange {
        /// The offending slot.
        slot: u32,
        /// The slot count of the view.
        slot_count: u32,
    },
    /// A shard table was asked for 0 shards or more than
    /// [`MAX_SHARDS`](crate::shard_table::MAX_SHARDS).
    #[error("a shard table needs 1 to {max} shards, not {shards}")]
    ShardCount {
        /// The shard count asked for.
        shards: u32,
        /// [`MAX_SHARDS`](crate::shard_table::MAX_SHARDS).
        max: u32,
    },
    /// The slot count exceeds [`MAX_SLOT_COUNT`].
    #[error("slot count {slot_count} exceeds the maximum of {max}")]
    SlotCountTooLarge {
        /// The slot count of the view.
        slot_count: u32,
        /// [`MAX_SLOT_COUNT`].
        max: u32,
    },
}

/// The assignment of keys to live slots for one membership view `(S, live set)`.
///
/// Build it with [`Assignment::new`]; ask it with [`Assignment::owner`] or
/// [`Assignment::shard_owner`]. It is immutable and cheap to clone; two assignments are equal
/// exactly when their views are (`S` and the live *set*, whatever the input order).
///
/// ```
/// use shardlease::assignment::Assignment;
///
/// let a = Assignment::new(4, [3, 0, 2]).unwrap(); // slot 1 is vacant
/// assert_eq!(a.live_slots().collect::<Vec<_>>(), [0, 2, 3]);
/// let owner = a.owner(0x1234_5678_9abc_def0).unwrap();
/// assert!(a.is_live(owner));
/// assert_eq!(a, Assignment::new(4, [0, 2, 3, 3]).unwrap());
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Assignment {
    slot_count: u32,
    /// Sorted, without duplicates, every element `< slot_count`.
    live: Vec<u32>,
}

impl Assignment {
    /// Builds the assignment for `slot_count` slots of which `live_slots` are live.
    ///
    /// `live_slots` is a set: order and duplicates do not matter.
    ///
    /// # Errors
    ///
    /// [`AssignmentError::SlotOutOfRange`] if a live slot is `>= slot_count`;
    /// [`AssignmentError::SlotCountTooLarge`] if `slot_count > MAX_SLOT_COUNT`.
    ///
    /// ```
    /// use shardlease::assignment::{Assignment, AssignmentError};
    ///
    /// assert!(Assignment::new(0, []).is_ok()); // an empty group
    /// assert_eq!(
    ///     Assignment::new(2, [0, 2]),
    ///     Err(AssignmentError::SlotOutOfRange { slot: 2, slot_count: 2 })
    /// );
    /// ```
    pub fn new(
        slot_count: u32,
        live_slots: impl IntoIterator<Item = u32>,
    ) -> Result<Self, AssignmentError> {
        if slot_count > MAX_SLOT_COUNT {
            return Err(AssignmentError::SlotCountTooLarge {
                slot_count,
                max: MAX_SLOT_COUNT,
            });
        }
        let mut live: Vec<u32> = live_slots.into_iter().collect();
        live.sort_unstable();
        live.dedup();
        if let Some(&slot) = live.last() {
            if slot >= slot_count {
                return Err(AssignmentError::SlotOutOfRange { slot, slot_count });
            }
        }
        Ok(Self { slot_count, live })
    }

    /// The slot count `S`: the number of jump-hash buckets, live or vacant.
    #[must_use]
    pub fn slot_count(&self) -> u32 {
        self.slot_count
    }

    /// The live slots, in ascending order.
    pub fn live_slots(&self) -> impl Iterator<Item = u32> + '_ {
        self.live.iter().copied()
    }

    /// The number of live slots.
    #[must_use]
    pub fn live_count(&self) -> usize {
        self.live.len()
    }

    /// Whether `slot` is live.
    #[must_use]
    pub fn is_live(&self, slot: u32) -> bool {
        self.live.binary_search(&slot).is_ok()
    }

    /// The live slot that owns `key`, or `None` when no slot is live (never a default bucket).
    ///
    /// With `S = slot_count` and `w` live slots, `live_sorted` the live slots in ascending order:
    ///
    /// 1. Probe `0` is `jump_hash(key, S)`; probe `i >= 1` is `jump_hash(mix(key, i), S)`, with
    ///    [`crate::hash::mix`]. `jump_hash` is the Lamping–Veach jump consistent hash of the
    ///    `jump-consistent-hash` crate.
    /// 2. The owner is the first live slot among probes `0, 1, …, 64·S − 1`.
    /// 3. If all `64·S` probes are vacant, the owner is `live_sorted[mix(key, 64·S) % w]`.
    ///
    /// Each probe is an (almost) uniform draw from `0..S` that is live with probability
    /// `w/S >= 1/S`, so step 3 happens with probability `(1 − 1/S)^(64·S) < e⁻⁶⁴ ≈ 1.6·10⁻²⁸`
    /// per key. It only bounds the work on a pathological view; the minimal-movement promises
    /// hold for every key that step 2 resolves in both views of a change, i.e. for all keys in
    /// practice (the fallback, and the budget `64·S` itself, depend on the whole view).
    ///
    /// When every slot is live this is plain `jump_hash(key, S)` (no probing).
    ///
    /// ```
    /// use shardlease::assignment::Assignment;
    ///
    /// let key = 0x201997f8666313ab;
    /// let full = Assignment::new(8, 0..8).unwrap();
    /// let b = full.owner(key).unwrap();
    /// // Vacate the owner: the key moves to another live slot.
    /// let holed = Assignment::new(8, (0..8).filter(|&s| s != b)).unwrap();
    /// assert_ne!(holed.owner(key), Some(b));
    /// assert_eq!(Assignment::new(8, []).unwrap().owner(key), None);
    /// ```
    #[must_use]
    pub fn owner(&self, key: u64) -> Option<u32> {
        self.owner_within(key, PROBES_PER_SLOT * u64::from(self.slot_count))
    }

    /// [`Assignment::owner`] with a budget of `probes >= 1` probes before the fallback.
    fn owner_within(&self, key: u64, probes: u64) -> Option<u32> {
        if self.live.is_empty() {
            return None;
        }
        self.probe_from(key, jump_hash(key, self.slot_count), probes)
    }

    /// The owner of `key` whose probe 0 is `first` (a slot `< S`): `first` itself when it is
    /// live, else the re-probe sequence of [`Assignment::owner`] from probe 1 on, with its
    /// fallback. The [`crate::shard_table`] takes probe 0 from its quota table instead of
    /// jump hash, and everything after it from here. Needs a live slot.
    pub(crate) fn probe_from(&self, key: u64, first: u32, probes: u64) -> Option<u32> {
        let s = self.slot_count;
        if self.live.is_empty() {
            return None;
        }
        // Fast path: every slot is live (`live` is a set of slots < s).
        if self.live.len() == s as usize || self.is_live(first) {
            return Some(first);
        }
        for i in 1..probes {
            let b = jump_hash(mix(key, i), s);
            if self.is_live(b) {
                return Some(b);
            }
        }
        let w = self.live.len() as u64;
        let idx = (mix(key, probes) % w) as usize;
        Some(self.live[idx])
    }

    /// The owner of virtual shard `shard`: `owner(hash::shard_key(shard))`.
    ///
    /// ```
    /// use shardlease::assignment::Assignment;
    /// use shardlease::hash::shard_key;
    ///
    /// let a = Assignment::new(3, [0, 2]).unwrap();
    /// assert_eq!(a.shard_owner(17), a.owner(shard_key(17)));
    /// ```
    #[must_use]
    pub fn shard_owner(&self, shard: u32) -> Option<u32> {
        self.owner(shard_key(shard))
    }

    /// The shards in `0..shards` that `slot` owns, ascending. Empty if `slot` is not live.
    ///
    /// ```
    /// use shardlease::assignment::Assignment;
    ///
    /// let a = Assignment::new(2, [0, 1]).unwrap();
    /// let mut all = a.shards_of(0, 1024);
    /// all.extend(a.shards_of(1, 1024));
    /// all.sort_unstable();
    /// assert_eq!(all, (0..1024).collect::<Vec<_>>());
    /// ```
    #[must_use]
    pub fn shards_of(&self, slot: u32, shards: u32) -> Vec<u32> {
        if !self.is_live(slot) {
            return Vec::new();
        }
        (0..shards)
            .filter(|&shard| self.shard_owner(shard) == Some(slot))
            .collect()
    }

    /// How many of `keys` each live slot owns. Every live slot is present, with 0 if it owns
    /// none of the keys; with no live slot the map is empty.
    ///
    /// ```
    /// use shardlease::assignment::Assignment;
    ///
    /// let a = Assignment::new(3, [0, 2]).unwrap();
    /// let loads = a.loads((0..1000).map(shardlease::hash::mix64));
    /// assert_eq!(loads.keys().copied().collect::<Vec<_>>(), [0, 2]);
    /// assert_eq!(loads.values().sum::<usize>(), 1000);
    /// ```
    #[must_use]
    pub fn loads(&self, keys: impl IntoIterator<Item = u64>) -> BTreeMap<u32, usize> {
        let mut loads: BTreeMap<u32, usize> = self.live.iter().map(|&s| (s, 0)).collect();
        for key in keys {
            if let Some(slot) = self.owner(key) {
                *loads.entry(slot).or_insert(0) += 1;
            }
        }
        loads
    }
}

/// Jump consistent hash of `key` into `0..buckets` (`buckets >= 1`).
///
/// The crate computes `k.wrapping_mul(..) + 1`, which overflows for some keys; the workspace
/// turns overflow checks off for that crate, and a test below keeps a key that triggers it.
pub(crate) fn jump_hash(key: u64, buckets: u32) -> u32 {
    debug_assert!(buckets >= 1);
    jump_consistent_hash::hash(key, buckets as usize)
}

/// The slot a joiner takes, and the slot count after the join.
///
/// The joiner takes the lowest vacant slot below `slot_count`, leaving `slot_count` unchanged;
/// if every slot below `slot_count` is live it takes slot `slot_count`, and the count grows by
/// one. `live` is a set (order and duplicates do not matter); entries `>= slot_count` are
/// ignored.
///
/// Either way the join moves keys only onto the joiner: filling a vacant slot `v` stops the
/// probe sequences that used to pass through `v`, and growing `S` to `S + 1` turns some probes
/// into `S` (jump hash's own minimal-movement property) and leaves all others unchanged.
///
/// # Panics
///
/// If `slot_count == u32::MAX` and every slot is live (which needs `2³² − 1` live slots).
///
/// ```
/// use shardlease::assignment::join_slot;
///
/// assert_eq!(join_slot(0, &[]), (0, 1));
/// assert_eq!(join_slot(4, &[3, 0, 2]), (1, 4)); // lowest vacant slot, S unchanged
/// assert_eq!(join_slot(3, &[2, 1, 0]), (3, 4)); // none vacant: slot S, S grows
/// ```
#[must_use]
pub fn join_slot(slot_count: u32, live: &[u32]) -> (u32, u32) {
    let mut taken: Vec<u32> = live.iter().copied().filter(|&s| s < slot_count).collect();
    taken.sort_unstable();
    taken.dedup();
    // The lowest slot not in `taken`: the first index whose element differs from it.
    let lowest_vacant = taken
        .iter()
        .zip(0u32..)
        .find(|&(&slot, index)| slot != index)
        .map_or(taken.len() as u32, |(_, index)| index);
    if lowest_vacant < slot_count {
        (lowest_vacant, slot_count)
    } else {
        let grown = slot_count
            .checked_add(1)
            .expect("slot count overflow: 2^32 - 1 live slots");
        (slot_count, grown)
    }
}

/// The slot count after the member in slot `departed` leaves (or is reaped).
///
/// It is `slot_count − 1` when `departed` is the top slot `slot_count − 1`, and `slot_count`
/// otherwise.
///
/// **Why shrink at all:** dropping the top bucket when its member leaves is exactly jump hash's
/// own minimal-movement step (`S → S − 1` moves only bucket `S − 1`'s keys), and it keeps `S`
/// close to the number of members, which keeps probing cheap.
///
/// **Why by exactly one:** going from `S` to `S − 1` changes only the probes that were
/// `S − 1`; a probe sequence that reached `S − 1` stopped there (it was live), so the keys
/// that change path are exactly the departed slot's keys.
/// Going further, say to `S − 2` when slot `S − 2` is already vacant, would also change every
/// probe that was `S − 2`: keys that probed *through* the vacant slot `S − 2` on their way to
/// some surviving member would take a different path and may land on another survivor, which
/// breaks "a leave moves only the departed member's keys".
///
/// **Why `S` is persisted and never recomputed as `max(slot) + 1`:** the owner of a key depends
/// on `S`, and the live set alone does not determine it (slots 0 and 1 live with `S = 2` or with
/// `S = 3` are different views), so every member must read the same persisted `S`. Recomputing
/// it would also shrink by more than one whenever the slots just below the departed top slot are
/// vacant (`S = 5`, slot 3 vacant, slot 4 leaves: `max + 1 = 3`), which is the forbidden move
/// above. A vacant top slot left behind by this rule (slot `S − 2` was vacant when the top
/// slot left) simply stays a vacant bucket whose keys re-probe, at the cost of a few extra
/// probes, until a joiner fills it as the lowest vacant slot.
///
/// ```
/// use shardlease::assignment::slot_count_after_leave;
///
/// assert_eq!(slot_count_after_leave(4, 3), 3); // the top slot leaves
/// assert_eq!(slot_count_after_leave(4, 1), 4); // any other slot: S unchanged
/// ```
#[must_use]
pub fn slot_count_after_leave(slot_count: u32, departed: u32) -> u32 {
    if slot_count > 0 && departed == slot_count - 1 {
        slot_count - 1
    } else {
        slot_count
    }
}

/// The slot count after several members leave or are reaped at once (in one transaction).
///
/// Equal to applying [`slot_count_after_leave`] once per departed slot in descending slot
/// order, which is a valid sequence of single departures, each of which moves only its own
/// keys; so the combined change moves only the departed members' keys. Duplicates are ignored.
///
/// ```
/// use shardlease::assignment::slot_count_after_leaves;
///
/// assert_eq!(slot_count_after_leaves(5, &[3, 4]), 3); // 5 → 4 → 3
/// assert_eq!(slot_count_after_leaves(5, &[4, 2]), 4); // 5 → 4, then 2 is not the top
/// assert_eq!(slot_count_after_leaves(5, &[]), 5);
/// ```
#[must_use]
pub fn slot_count_after_leaves(slot_count: u32, departed: &[u32]) -> u32 {
    let mut departed = departed.to_vec();
    departed.sort_unstable_by(|a, b| b.cmp(a));
    departed.dedup();
    departed
        .into_iter()
        .fold(slot_count, slot_count_after_leave)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The key for which `jump-consistent-hash` overflows `k.wrapping_mul(..) + 1`.
    const OVERFLOW_KEY: u64 = 0x2019_97f8_6663_13ab;

    /// In a debug build this panics unless overflow checks are off for `jump-consistent-hash`.
    #[test]
    fn jump_hash_overflow_key_does_not_panic() {
        for buckets in [1, 2, 3, 7, 64, 1000, MAX_SLOT_COUNT] {
            assert!(jump_hash(OVERFLOW_KEY, buckets) < buckets);
        }
        for s in [1, 2, 5, 64] {
            let full = Assignment::new(s, 0..s).unwrap();
            assert_eq!(full.owner(OVERFLOW_KEY), Some(jump_hash(OVERFLOW_KEY, s)));
            let holed = Assignment::new(s + 3, 0..s).unwrap();
            assert!(holed.owner(OVERFLOW_KEY).unwrap() < s);
        }
    }

    /// The crate's own documented examples, so that a silent change of the crate is noticed.
    #[test]
    fn jump_hash_known_answers() {
        assert_eq!(jump_hash(0, 60), 0);
        assert_eq!(jump_hash(1, 60), 55);
        assert_eq!(jump_hash(2, 60), 46);
    }

    #[test]
    fn empty_views_have_no_owner() {
        for s in [0, 1, 5] {
            let a = Assignment::new(s, []).unwrap();
            assert_eq!(a.owner(0), None);
            assert_eq!(a.owner(OVERFLOW_KEY), None);
            assert_eq!(a.shard_owner(3), None);
            assert!(a.loads([1, 2, 3]).is_empty());
        }
    }

    #[test]
    fn rejects_bad_views() {
        assert_eq!(
            Assignment::new(3, [0, 7, 1]),
            Err(AssignmentError::SlotOutOfRange {
                slot: 7,
                slot_count: 3
            })
        );
        assert_eq!(
            Assignment::new(0, [0]),
            Err(AssignmentError::SlotOutOfRange {
                slot: 0,
                slot_count: 0
            })
        );
        assert!(matches!(
            Assignment::new(MAX_SLOT_COUNT + 1, [0]),
            Err(AssignmentError::SlotCountTooLarge { .. })
        ));
        assert!(Assignment::new(MAX_SLOT_COUNT, [MAX_SLOT_COUNT - 1]).is_ok());
    }

    #[test]
    fn single_live_slot_owns_everything() {
        let a = Assignment::new(9, [4]).unwrap();
        for k in 0..2000 {
            assert_eq!(a.owner(crate::hash::mix64(k)), Some(4));
        }
    }

    /// The fallback needs about e^64 keys to be reached naturally; force it with a tiny probe
    /// budget and check its formula.
    #[test]
    fn fallback_after_probe_budget() {
        let a = Assignment::new(8, [1, 5, 6]).unwrap();
        let live = [1, 5, 6];
        let mut fell_back = 0;
        for k in 0..2000u64 {
            let key = crate::hash::mix64(k);
            let first = jump_hash(key, 8);
            let got = a.owner_within(key, 1);
            if a.is_live(first) {
                assert_eq!(got, Some(first));
            } else {
                fell_back += 1;
                assert_eq!(got, Some(live[(mix(key, 1) % 3) as usize]));
            }
            // With the real budget the answer is a live slot found by probing.
            assert!(a.is_live(a.owner(key).unwrap()));
        }
        assert!(fell_back > 0);
    }

    /// One live slot among `MAX_SLOT_COUNT` still resolves, by probing, in bounded time.
    #[test]
    fn sparse_view_resolves() {
        let a = Assignment::new(MAX_SLOT_COUNT, [MAX_SLOT_COUNT / 2]).unwrap();
        for k in 0..4 {
            assert_eq!(a.owner(k), Some(MAX_SLOT_COUNT / 2));
        }
    }

    #[test]
    fn join_slot_rules() {
        assert_eq!(join_slot(0, &[]), (0, 1));
        assert_eq!(join_slot(1, &[]), (0, 1));
        assert_eq!(join_slot(1, &[0]), (1, 2));
        assert_eq!(join_slot(5, &[0, 1, 3]), (2, 5));
        assert_eq!(join_slot(5, &[4, 4, 3, 2, 1, 0]), (5, 6));
        assert_eq!(join_slot(3, &[1, 2]), (0, 3));
        // Out-of-range entries are ignored.
        assert_eq!(join_slot(2, &[0, 1, 7]), (2, 3));
        assert_eq!(join_slot(2, &[5]), (0, 2));
    }

    #[test]
    fn leave_rules() {
        assert_eq!(slot_count_after_leave(0, 0), 0);
        assert_eq!(slot_count_after_leave(1, 0), 0);
        assert_eq!(slot_count_after_leave(5, 4), 4);
        assert_eq!(slot_count_after_leave(5, 3), 5);
        assert_eq!(slot_count_after_leaves(5, &[2, 3, 4]), 2);
        assert_eq!(slot_count_after_leaves(5, &[4, 3, 3, 4]), 3);
        assert_eq!(slot_count_after_leaves(5, &[0, 4]), 4);
        assert_eq!(slot_count_after_leaves(3, &[0, 1, 2]), 0);
    }
}
