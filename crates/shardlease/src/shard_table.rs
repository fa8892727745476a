//! Balanced shards: every live slot owns the same number of shards, to within one, and ranges
//! of a stored 32-bit hash, with the minimal movement of [`Assignment::owner`].
//!
//! # Why
//!
//! [`Assignment::shards_of`] hashes each of `n` shards onto a slot with jump hash, so a slot's
//! shard *count* is random: about `n/w ± √(n/w)`. With 1,024 shards and 64 members that is
//! 16 ± 4 shards each, and the busiest member carries 1.75 times the mean; at 1,000 members a
//! third of them own no shard at all. Items inherit that noise on top of their own. A
//! [`ShardTable`] gives every live slot `⌊n/w⌋` or `⌈n/w⌉` shards instead, so that the only
//! noise left is the items' own: the same as hashing every item straight onto a slot.
//!
//! # The rule
//!
//! With every slot live (`w = S`), the **quota table** `T_S` maps shards to slots:
//!
//! - `T_1` gives every shard to slot 0;
//! - `T_{s+1}` is `T_s` after every slot `b < s` keeps its `q_{s+1}(b)` lowest shards and
//!   hands the rest to the new slot `s`, where `q_s(b) = ⌊n/s⌋ + (1 if b < n mod s else 0)`.
//!
//! `q_{s+1}(b) <= q_s(b)` for every `b`, so each step only moves shards *onto* the new slot,
//! the way a jump-hash bucket does, and every slot of `T_S` holds exactly `q_S(b)` shards.
//! The owner of shard `c` in a view `(S, live)` is then found as in [`Assignment::owner`], with
//! probe 0 taken from the table instead of jump hash:
//!
//! ```text
//! b = T_S(c)                                  // probe 0
//! i = 1
//! while b is vacant:
//!     b = jump_hash(mix(shard_key(c), i), S)  // probes 1, 2, ...: as in Assignment::owner
//!     i = i + 1
//! ```
//!
//! with the same fallback after `64·S` probes. The promises carry over:
//!
//! - the owner depends only on `(S, live set)`;
//! - a join that grows `S` (no vacant slot) moves shards only onto the joiner, `q_{S+1}(S)` of
//!   them, taken evenly from every other slot;
//! - a join that fills a vacant slot moves back exactly the shards whose probes pass through
//!   it first, onto the joiner;
//! - a leave of the top slot (`S` shrinks by one) gives each of its shards back to the slot it
//!   came from in `T_{S-1}`, an even spread, or re-probes it past vacancies; probes 1, 2, … are
//!   jump hash over `S`, which changes only where it was the departed top slot;
//! - any other leave re-probes only the departed slot's shards, evenly over the survivors;
//! - refilling a vacated slot restores the earlier table exactly.
//!
//! Vacant slots' shards are spread at random (as keys are by [`Assignment::owner`]); only they
//! add noise beyond the exact quotas, and joiners fill vacancies first.
//!
//! # Hash ranges
//!
//! A table over `n` shards also divides the 32-bit hash space: shard `c` holds the hashes `h`
//! whose position `p = h + 2³¹` (the unsigned order of the signed `integer`) satisfies
//! `⌊p·n / 2³²⌋ = c`, a contiguous range. [`ShardTable::hash_ranges`] merges a slot's shards
//! into ranges of `integer` hashes, ready for a `BETWEEN` join on an indexed hash column (see
//! [`HashRanges`]). Store [`crate::hash::uuid_hash`] (or [`str_hash`](crate::hash::str_hash),
//! [`int_hash`](crate::hash::int_hash)) of each row's key in that column, and the number of
//! shards stays a choice of the code ([`HASH_SHARDS`] by default), not of the table's data.
//!
//! ```
//! use shardlease::assignment::Assignment;
//! use shardlease::shard_table::HASH_SHARDS;
//!
//! let table = Assignment::new(3, [0, 1, 2]).unwrap().shard_table(HASH_SHARDS).unwrap();
//! let counts: Vec<usize> = (0..3).map(|slot| table.shards_of(slot).len()).collect();
//! assert_eq!(counts, [21846, 21845, 21845]); // 65,536 shards, within one of each other
//!
//! let h = shardlease::hash::uuid_hash(&uuid::Uuid::nil());
//! let owner = table.hash_owner(h).unwrap();
//! assert!(table.hash_ranges(owner).contains(h));
//! ```

use crate::assignment::{Assignment, AssignmentError, PROBES_PER_SLOT};
use crate::hash::shard_key;
use std::sync::{Arc, Mutex};

/// The number of hash shards the worker uses, and the default for embedders: 65,536.
///
/// At 1,000 members each owns 65 or 66 of them (a rounding imbalance under 1.1 %), and a
/// member's shards merge into at most a few hundred hash ranges at any group size.
pub const HASH_SHARDS: u32 = 1 << 16;

/// The largest shard count a [`ShardTable`] takes: 2²⁴ (a table costs 4 bytes per shard).
pub const MAX_SHARDS: u32 = 1 << 24;

/// Marks a shard without an owner (no live slot) in [`ShardTable::owners`].
const NO_OWNER: u32 = u32::MAX;

/// The owner of every shard for one membership view: see the [module docs](self).
///
/// Build it once per view with [`Assignment::shard_table`] (a few milliseconds for 65,536
/// shards and 1,000 slots) and ask it as often as needed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ShardTable {
    /// Owner per shard, [`NO_OWNER`] when no slot is live.
    owners: Vec<u32>,
}

impl Assignment {
    /// The balanced [`ShardTable`] of this view over `shards` shards.
    ///
    /// # Errors
    ///
    /// [`AssignmentError::ShardCount`] unless `1 <= shards <= MAX_SHARDS`.
    ///
    /// ```
    /// use shardlease::assignment::Assignment;
    ///
    /// let full = Assignment::new(4, 0..4).unwrap().shard_table(1024).unwrap();
    /// assert!((0..4).all(|slot| full.shards_of(slot).len() == 256));
    /// // A vacant slot's shards go to the others; nobody else's move.
    /// let holed = Assignment::new(4, [0, 2, 3]).unwrap().shard_table(1024).unwrap();
    /// for shard in 0..1024 {
    ///     if full.owner(shard) != Some(1) {
    ///         assert_eq!(holed.owner(shard), full.owner(shard));
    ///     }
    /// }
    /// ```
    pub fn shard_table(&self, shards: u32) -> Result<ShardTable, AssignmentError> {
        if shards == 0 || shards > MAX_SHARDS {
            return Err(AssignmentError::ShardCount {
                shards,
                max: MAX_SHARDS,
            });
        }
        if self.live_count() == 0 {
            return Ok(ShardTable {
                owners: vec![NO_OWNER; shards as usize],
            });
        }
        let s = self.slot_count();
        let probes = PROBES_PER_SLOT * u64::from(s);
        let mut owners = quota_table(s, shards).as_ref().clone();
        if self.live_count() < s as usize {
            let mut live = vec![false; s as usize];
            for slot in self.live_slots() {
                live[slot as usize] = true;
            }
            for (shard, owner) in (0u32..).zip(owners.iter_mut()) {
                if !live[*owner as usize] {
                    *owner = self
                        .probe_from(shard_key(shard), *owner, probes)
                        .expect("a live slot exists");
                }
            }
        }
        Ok(ShardTable { owners })
    }
}

/// The quota table `T_S` over `n` shards (see the module docs): the slot of each shard.
///
/// Tables depend only on `(S, n)`, and a group's `S` moves by small steps (a burst of joins
/// grows it one slot at a time, a leave of the top slot shrinks it by one). So the last few
/// tables are kept process-wide ([`QUOTA_CACHE`] of them), and a larger `S` continues from
/// the largest kept table below it instead of starting again from `T_1`: a member that
/// follows a burst of joins pays `O(n)` per view, not `O(n · ln S)` (65,536 shards: about
/// 0.1 ms instead of 2 to 7 ms).
fn quota_table(slot_count: u32, n: u32) -> Arc<Vec<u32>> {
    let base = {
        let cache = QUOTA_TABLES.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((_, _, t)) = cache.iter().find(|(s, m, _)| *s == slot_count && *m == n) {
            return Arc::clone(t);
        }
        cache
            .iter()
            .filter(|(s, m, _)| *m == n && *s < slot_count)
            .max_by_key(|(s, _, _)| *s)
            .map(|(s, _, t)| (*s, Arc::clone(t)))
    };
    let table = Arc::new(match base {
        Some((from, table)) => quota_steps(holdings_of(&table, from), from, slot_count, n),
        None => quota_steps(vec![vec![(0, n)]], 1, slot_count, n),
    });
    let mut cache = QUOTA_TABLES.lock().unwrap_or_else(|e| e.into_inner());
    if !cache.iter().any(|(s, m, _)| *s == slot_count && *m == n) {
        if cache.len() == QUOTA_CACHE {
            cache.remove(0);
        }
        cache.push((slot_count, n, Arc::clone(&table)));
    }
    table
}

/// How many quota tables [`quota_table`] keeps (256 KiB each at 65,536 shards).
const QUOTA_CACHE: usize = 4;

/// A kept quota table: `(S, n, T_S)`.
type KeptTable = (u32, u32, Arc<Vec<u32>>);

/// The kept quota tables, oldest first.
static QUOTA_TABLES: Mutex<Vec<KeptTable>> = Mutex::new(Vec::new());

/// The holdings (ascending, disjoint, half-open shard ranges per slot) of a table of
/// `slot_count` slots.
fn holdings_of(owners: &[u32], slot_count: u32) -> Vec<Vec<(u32, u32)>> {
    let mut holdings: Vec<Vec<(u32, u32)>> = vec![Vec::new(); slot_count as usize];
    let mut start = 0u32;
    for (c, w) in (1u32..).zip(owners.windows(2)) {
        if w[0] != w[1] {
            holdings[w[0] as usize].push((start, c));
            start = c;
        }
    }
    if let Some(&last) = owners.last() {
        holdings[last as usize].push((start, owners.len() as u32));
    }
    holdings
}

/// Continue `holdings` of `T_from` to `T_to` and return its table.
///
/// Each slot's holding is kept as ascending, disjoint, half-open ranges of shards; a slot gives
/// away the top of its holding. Work: `O(n · ln(to/from))` shard moves at most, and only slots
/// that give something are visited.
fn quota_steps(mut holdings: Vec<Vec<(u32, u32)>>, from: u32, to: u32, n: u32) -> Vec<u32> {
    for s in from..to {
        let (q_old, r_old) = (n / s, n % s);
        let (q_new, r_new) = (n / (s + 1), n % (s + 1));
        let d = q_old - q_new;
        // give(b) = q_s(b) - q_{s+1}(b) = d + [b < r_old] - [b < r_new] >= 0; visit only the
        // slots where it is positive.
        let givers: [std::ops::Range<u32>; 2] = match d {
            0 => [r_new..r_old, 0..0],
            1 if r_new > r_old => [0..r_old, r_new..s],
            _ => [0..s, 0..0],
        };
        let mut received: Vec<(u32, u32)> = Vec::new();
        for b in givers.into_iter().flatten() {
            let mut give = d + u32::from(b < r_old) - u32::from(b < r_new);
            let holding = &mut holdings[b as usize];
            while give > 0 {
                let (lo, hi) = *holding.last().expect("a giver holds at least its gift");
                let take = give.min(hi - lo);
                if take == hi - lo {
                    holding.pop();
                } else {
                    holding.last_mut().expect("non-empty").1 = hi - take;
                }
                received.push((hi - take, hi));
                give -= take;
            }
        }
        received.sort_unstable();
        let mut merged: Vec<(u32, u32)> = Vec::with_capacity(received.len());
        for (lo, hi) in received {
            match merged.last_mut() {
                Some(last) if last.1 == lo => last.1 = hi,
                _ => merged.push((lo, hi)),
            }
        }
        holdings.push(merged);
    }
    let mut owners = vec![0u32; n as usize];
    for (slot, holding) in (0u32..).zip(&holdings) {
        for &(lo, hi) in holding {
            owners[lo as usize..hi as usize].fill(slot);
        }
    }
    owners
}

impl ShardTable {
    /// The number of shards `n`.
    #[must_use]
    pub fn shard_count(&self) -> u32 {
        self.owners.len() as u32
    }

    /// The live slot that owns `shard`, or `None` when no slot is live or `shard >= n`.
    #[must_use]
    pub fn owner(&self, shard: u32) -> Option<u32> {
        match self.owners.get(shard as usize) {
            Some(&NO_OWNER) | None => None,
            Some(&slot) => Some(slot),
        }
    }

    /// The shards `slot` owns, ascending. Empty when `slot` is not live.
    #[must_use]
    pub fn shards_of(&self, slot: u32) -> Vec<u32> {
        (0u32..)
            .zip(&self.owners)
            .filter(|&(_, &owner)| owner == slot)
            .map(|(shard, _)| shard)
            .collect()
    }

    /// The shard of a stored 32-bit hash: `⌊(h + 2³¹) · n / 2³²⌋`.
    ///
    /// ```
    /// use shardlease::assignment::Assignment;
    ///
    /// let t = Assignment::new(1, [0]).unwrap().shard_table(4).unwrap();
    /// assert_eq!(t.shard_of_hash(i32::MIN), 0);
    /// assert_eq!(t.shard_of_hash(-1), 1);
    /// assert_eq!(t.shard_of_hash(0), 2);
    /// assert_eq!(t.shard_of_hash(i32::MAX), 3);
    /// ```
    #[must_use]
    pub fn shard_of_hash(&self, hash: i32) -> u32 {
        let position = u64::from(position(hash));
        ((position * u64::from(self.shard_count())) >> 32) as u32
    }

    /// The live slot that owns the row whose stored hash is `hash`.
    #[must_use]
    pub fn hash_owner(&self, hash: i32) -> Option<u32> {
        self.owner(self.shard_of_hash(hash))
    }

    /// The hash ranges of `slot`'s shards, merged where adjacent. Empty when `slot` is not
    /// live.
    #[must_use]
    pub fn hash_ranges(&self, slot: u32) -> HashRanges {
        HashRanges::of_shards(&self.shards_of(slot), self.shard_count())
    }
}

/// The unsigned position of a signed hash: `h + 2³¹`, which orders like `h`.
fn position(hash: i32) -> u32 {
    (hash as u32) ^ 0x8000_0000
}

/// The signed hash at an unsigned position.
fn hash_at(position: u32) -> i32 {
    (position ^ 0x8000_0000) as i32
}

/// A set of inclusive ranges of the signed 32-bit hash space, ascending and disjoint: what a
/// member owns of a table whose rows store a 32-bit hash (see the [module docs](self)).
///
/// Bind the bounds as two `integer[]` parameters and join on them; PostgreSQL then runs one
/// index range scan per range when the share is small, and a bitmap scan when it is large:
///
/// ```sql
/// UPDATE orders o SET processed_by = $1
///   FROM unnest($2::int4[], $3::int4[]) AS r(lo, hi)
///  WHERE o.key_hash BETWEEN r.lo AND r.hi
/// ```
///
/// ```
/// use shardlease::shard_table::HashRanges;
///
/// // Shards 0, 1 and 3 of 4: the lower half of the space and the top quarter.
/// let r = HashRanges::of_shards(&[0, 1, 3], 4);
/// assert_eq!(r.lower_bounds(), [i32::MIN, 1 << 30]);
/// assert_eq!(r.upper_bounds(), [-1, i32::MAX]);
/// assert!(r.contains(-5) && !r.contains(5) && r.contains(i32::MAX));
/// ```
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HashRanges {
    lo: Vec<i32>,
    hi: Vec<i32>,
}

impl HashRanges {
    /// The hash ranges of `shards` (any order, duplicates ignored) of a table of `shard_count`
    /// shards; shards `>= shard_count` are ignored.
    #[must_use]
    pub fn of_shards(shards: &[u32], shard_count: u32) -> HashRanges {
        let mut sorted: Vec<u32> = shards
            .iter()
            .copied()
            .filter(|&s| s < shard_count)
            .collect();
        sorted.sort_unstable();
        sorted.dedup();
        // Shard c covers the positions p with c·2³² <= p·n < (c+1)·2³², i.e. from
        // ⌈c·2³²/n⌉ to ⌈(c+1)·2³²/n⌉ − 1.
        let n = u64::from(shard_count);
        let start = |c: u64| (c << 32).div_ceil(n);
        let mut ranges: Vec<(u64, u64)> = Vec::new();
        for c in sorted {
            let (lo, end) = (start(u64::from(c)), start(u64::from(c) + 1));
            if lo == end {
                continue; // more shards than positions: an empty shard
            }
            match ranges.last_mut() {
                Some(last) if last.1 == lo => last.1 = end,
                _ => ranges.push((lo, end)),
            }
        }
        HashRanges {
            lo: ranges.iter().map(|&(lo, _)| hash_at(lo as u32)).collect(),
            hi: ranges
                .iter()
                .map(|&(_, end)| hash_at((end - 1) as u32))
                .collect(),
        }
    }

    /// The lowest hash of each range, ascending.
    #[must_use]
    pub fn lower_bounds(&self) -> &[i32] {
        &self.lo
    }

    /// The highest hash of each range (inclusive), in the same order.
    #[must_use]
    pub fn upper_bounds(&self) -> &[i32] {
        &self.hi
    }

    /// The ranges, ascending.
    pub fn iter(&self) -> impl Iterator<Item = std::ops::RangeInclusive<i32>> + '_ {
        self.lo.iter().zip(&self.hi).map(|(&lo, &hi)| lo..=hi)
    }

    /// The number of ranges.
    #[must_use]
    pub fn len(&self) -> usize {
        self.lo.len()
    }

    /// True when there is no range (the slot owns nothing).
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.lo.is_empty()
    }

    /// Whether `hash` falls in one of the ranges.
    #[must_use]
    pub fn contains(&self, hash: i32) -> bool {
        let i = self.lo.partition_point(|&lo| lo <= hash);
        i > 0 && hash <= self.hi[i - 1]
    }

    /// The share of the hash space the ranges cover, in `0.0..=1.0`.
    #[must_use]
    pub fn fraction(&self) -> f64 {
        let covered: u64 = self
            .iter()
            .map(|r| u64::from(position(*r.end()) - position(*r.start())) + 1)
            .sum();
        covered as f64 / (1u64 << 32) as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The quota rule, literally: per step, each slot keeps its lowest `q` shards.
    fn quota_table_by_definition(slot_count: u32, n: u32) -> Vec<u32> {
        let mut owners = vec![0u32; n as usize];
        for s in 1..slot_count {
            let q = |b: u32| n / (s + 1) + u32::from(b < n % (s + 1));
            for b in 0..s {
                let mine: Vec<usize> = (0..n as usize).filter(|&c| owners[c] == b).collect();
                for &c in &mine[q(b) as usize..] {
                    owners[c] = s;
                }
            }
        }
        owners
    }

    #[test]
    fn quota_table_follows_its_definition() {
        for n in [1, 2, 3, 7, 64, 100, 257] {
            for s in 1..=40 {
                assert_eq!(
                    *quota_table(s, n),
                    quota_table_by_definition(s, n),
                    "S={s} n={n}"
                );
            }
        }
    }

    /// Continuing a kept table (growing S one slot or many, in any order, shrinking it)
    /// gives the table computed from T_1.
    #[test]
    fn kept_tables_continue_exactly() {
        let fresh = |s: u32, n: u32| quota_steps(vec![vec![(0, n)]], 1, s, n);
        for n in [5, 64, 1000, HASH_SHARDS] {
            for s in [1, 2, 3, 9, 10, 11, 40, 39, 300, 7, 301, 1000, 999] {
                assert_eq!(*quota_table(s, n), fresh(s, n), "S={s} n={n}");
            }
        }
    }

    #[test]
    fn quotas_are_exact() {
        for (s, n) in [
            (1, 1024),
            (3, 1024),
            (16, 65536),
            (1000, 65536),
            (700, 1000),
            (5, 3),
        ] {
            let t = quota_table(s, n);
            for b in 0..s {
                let want = n / s + u32::from(b < n % s);
                let got = t.iter().filter(|&&o| o == b).count() as u32;
                assert_eq!(got, want, "S={s} n={n} slot {b}");
            }
        }
    }

    #[test]
    fn more_slots_than_shards() {
        let t = Assignment::new(10, 0..10).unwrap().shard_table(4).unwrap();
        let owners: Vec<Option<u32>> = (0..4).map(|c| t.owner(c)).collect();
        assert!(owners.iter().all(|o| o.is_some_and(|o| o < 4)));
        assert!(t.shards_of(7).is_empty());
    }

    #[test]
    fn bad_shard_counts_are_errors() {
        let a = Assignment::new(2, [0, 1]).unwrap();
        assert!(matches!(
            a.shard_table(0),
            Err(AssignmentError::ShardCount { shards: 0, .. })
        ));
        assert!(a.shard_table(MAX_SHARDS + 1).is_err());
        let empty = Assignment::new(3, []).unwrap().shard_table(8).unwrap();
        assert_eq!(empty.owner(0), None);
        assert!(empty.hash_ranges(0).is_empty());
        assert_eq!(empty.owner(8), None);
    }

    #[test]
    fn ranges_tile_the_hash_space() {
        for n in [1, 2, 3, 4, 1000, 1024, HASH_SHARDS] {
            let all: Vec<u32> = (0..n).collect();
            let r = HashRanges::of_shards(&all, n);
            assert_eq!(r.iter().collect::<Vec<_>>(), [i32::MIN..=i32::MAX], "n={n}");
            assert!((r.fraction() - 1.0).abs() < 1e-12);
            // Each shard's range holds exactly the hashes that map to it.
            let t = Assignment::new(1, [0]).unwrap().shard_table(n).unwrap();
            for c in [0, n / 2, n - 1] {
                let one = HashRanges::of_shards(&[c], n);
                let range = one.iter().next().unwrap();
                assert_eq!(t.shard_of_hash(*range.start()), c);
                assert_eq!(t.shard_of_hash(*range.end()), c);
                if *range.start() > i32::MIN {
                    assert_eq!(t.shard_of_hash(range.start() - 1), c - 1);
                }
                if *range.end() < i32::MAX {
                    assert_eq!(t.shard_of_hash(range.end() + 1), c + 1);
                }
            }
        }
    }

    #[test]
    fn a_slots_ranges_hold_exactly_its_hashes() {
        let t = Assignment::new(7, [0, 1, 3, 4, 6])
            .unwrap()
            .shard_table(4096)
            .unwrap();
        let ranges: Vec<HashRanges> = (0..7).map(|s| t.hash_ranges(s)).collect();
        let mut x: u32 = 0x1234_5678;
        for _ in 0..20_000 {
            x = x.wrapping_mul(0x9E37_79B9).wrapping_add(0x7F4A_7C15);
            let h = x as i32;
            let owner = t.hash_owner(h).unwrap();
            for (slot, r) in (0u32..).zip(&ranges) {
                assert_eq!(r.contains(h), slot == owner, "hash {h}, slot {slot}");
            }
        }
        assert!(ranges[2].is_empty() && ranges[5].is_empty());
        let total: f64 = ranges.iter().map(HashRanges::fraction).sum();
        assert!((total - 1.0).abs() < 1e-12);
    }
}
