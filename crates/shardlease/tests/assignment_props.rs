//! Property tests of the assignment (design invariants I3 and I4) and the hash test vectors.
//!
//! Statistical bounds are derived in the comments next to them. The properties whose
//! assertions are statistical use a fixed proptest seed, so they are deterministic (never
//! flaky); the exact properties use random seeds and explore new views on every run.

use std::collections::{BTreeMap, BTreeSet};

use proptest::prelude::*;
use proptest::test_runner::{Config, RngSeed};
use shardlease::assignment::{
    join_slot, slot_count_after_leave, slot_count_after_leaves, Assignment,
};
use shardlease::hash::{self, mix, mix64, shard_key};

/// Keys per property where the design asks for statistics at scale.
const K: u64 = 100_000;

/// The fixed key set: `mix64(i)` for `i` in `0..n`.
fn keys(n: u64) -> impl Iterator<Item = u64> {
    (0..n).map(mix64)
}

fn owners(a: &Assignment, n: u64) -> Vec<Option<u32>> {
    keys(n).map(|k| a.owner(k)).collect()
}

/// A random-seeded config; proptest writes no regression files.
fn cases(n: u32) -> Config {
    Config {
        cases: n,
        failure_persistence: None,
        ..Config::default()
    }
}

/// A fixed-seed config for properties whose assertions are statistical bounds.
fn fixed_cases(n: u32, seed: u64) -> Config {
    Config {
        rng_seed: RngSeed::Fixed(seed),
        ..cases(n)
    }
}

/// A membership view `(S, live set)` with `live` live slots among `live + vacant` slots.
fn view(
    live: std::ops::RangeInclusive<u32>,
    vacant: u32,
) -> impl Strategy<Value = (u32, Vec<u32>)> {
    (live, 0..=vacant).prop_flat_map(|(w, v)| {
        let s = w + v;
        (
            Just(s),
            proptest::sample::subsequence((0..s).collect::<Vec<_>>(), w as usize),
        )
    })
}

/// An event of a membership history.
#[derive(Clone, Debug)]
enum Event {
    Join,
    /// The member at this index (mod the live count) of the sorted live slots leaves.
    Leave(usize),
    /// Several members crash and are reaped in one transaction (indices as for `Leave`).
    Crash(Vec<usize>),
}

fn event() -> impl Strategy<Value = Event> {
    prop_oneof![
        4 => Just(Event::Join),
        3 => any::<usize>().prop_map(Event::Leave),
        1 => proptest::collection::vec(any::<usize>(), 1..4).prop_map(Event::Crash),
    ]
}

/// The membership state that the database keeps: the persisted slot count and the live slots.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct State {
    s: u32,
    live: BTreeSet<u32>,
}

impl State {
    fn assignment(&self) -> Assignment {
        Assignment::new(self.s, self.live.iter().copied()).expect("a valid view")
    }

    fn join(&mut self) -> u32 {
        let live: Vec<u32> = self.live.iter().copied().collect();
        let (slot, s) = join_slot(self.s, &live);
        // The design's rule, independently: the lowest vacant slot (slot S when none is), and
        // S grows only when the joiner takes slot S.
        let lowest_vacant = (0..).find(|x| !self.live.contains(x)).unwrap();
        assert_eq!((slot, s), (lowest_vacant, self.s.max(lowest_vacant + 1)));
        self.live.insert(slot);
        self.s = s;
        slot
    }

    fn leave(&mut self, slot: u32) {
        assert!(self.live.remove(&slot));
        self.s = slot_count_after_leave(self.s, slot);
    }

    fn crash(&mut self, slots: &[u32]) {
        for slot in slots {
            self.live.remove(slot);
        }
        self.s = slot_count_after_leaves(self.s, slots);
    }

    /// The live slots picked by `indices` (mod the live count), distinct.
    fn pick(&self, indices: &[usize]) -> Vec<u32> {
        let live: Vec<u32> = self.live.iter().copied().collect();
        let picked: BTreeSet<u32> = indices.iter().map(|i| live[i % live.len()]).collect();
        picked.into_iter().collect()
    }

    /// Applies `e`; returns the joiner or the departed slots.
    fn apply(&mut self, e: &Event) -> (Option<u32>, Vec<u32>) {
        match e {
            Event::Join => (Some(self.join()), Vec::new()),
            Event::Leave(_) | Event::Crash(_) if self.live.is_empty() => (None, Vec::new()),
            Event::Leave(i) => {
                let slot = self.pick(&[*i])[0];
                self.leave(slot);
                (None, vec![slot])
            }
            Event::Crash(is) => {
                let slots = self.pick(is);
                self.crash(&slots);
                (None, slots)
            }
        }
    }

    fn check(&self) {
        assert!(self.live.iter().all(|&x| x < self.s), "{self:?}");
    }
}

/// Checks one step of a history: a departure moves only the departed slots' keys; a join moves
/// keys only onto the joiner.
fn check_step(
    before: &[Option<u32>],
    after: &[Option<u32>],
    joiner: Option<u32>,
    departed: &[u32],
) -> Result<(), TestCaseError> {
    for (i, (b, a)) in before.iter().zip(after).enumerate() {
        if b == a {
            continue;
        }
        match (joiner, b) {
            (Some(j), _) => {
                prop_assert_eq!(*a, Some(j), "key {} moved, but not onto the joiner", i)
            }
            (None, Some(old)) => prop_assert!(
                departed.contains(old),
                "key {} moved from surviving slot {} to {:?}",
                i,
                old,
                a
            ),
            (None, None) => prop_assert!(false, "key {} had no owner, now {:?}", i, a),
        }
    }
    Ok(())
}

/// A history that reaches the same `(S, live)` as `target` by a different route: join `S + 1`
/// members (slots `0..=S`), let the target's vacant slots below `S` leave in the given order,
/// then let slot `S` leave, which shrinks the count to exactly `S`.
fn canonical_route(target: &State, order: &[usize]) -> State {
    let mut st = State::default();
    for _ in 0..=target.s {
        st.join();
    }
    let mut vacant: Vec<u32> = (0..target.s).filter(|x| !target.live.contains(x)).collect();
    // Permute the vacant slots with the given indices (a Fisher–Yates driven by `order`).
    for (k, &r) in order.iter().enumerate().take(vacant.len()) {
        let j = k + r % (vacant.len() - k);
        vacant.swap(k, j);
    }
    for slot in vacant {
        st.leave(slot);
    }
    st.leave(target.s);
    st
}

proptest! {
    #![proptest_config(cases(32))]

    /// Property 1: the assignment depends only on the view, never on the order of events.
    #[test]
    fn order_of_events_does_not_matter(
        events in proptest::collection::vec(event(), 0..60),
        order in proptest::collection::vec(any::<usize>(), 64),
        shuffle in any::<u64>(),
    ) {
        let mut a = State::default();
        for e in &events {
            a.apply(e);
            a.check();
        }
        let b = canonical_route(&a, &order);
        prop_assert_eq!(&a, &b);
        let (x, y) = (a.assignment(), b.assignment());
        prop_assert_eq!(&x, &y);

        // Permuting (and duplicating) the live-slot input changes nothing.
        let mut live: Vec<u32> = a.live.iter().copied().collect();
        live.extend(a.live.iter().copied().take(3));
        let n = live.len();
        for k in (1..n).rev() {
            live.swap(k, (mix(shuffle, k as u64) % (k as u64 + 1)) as usize);
        }
        let z = Assignment::new(a.s, live.iter().copied()).unwrap();
        prop_assert_eq!(&x, &z);
        for key in keys(20_000) {
            let o = x.owner(key);
            prop_assert_eq!(o, y.owner(key));
            prop_assert_eq!(o, z.owner(key));
        }
    }

    /// Properties 2, 3, 6 along random histories (8 192 keys per step): every leave or crash
    /// moves only the departed members' keys, every join moves keys only onto the joiner.
    #[test]
    fn every_step_of_a_history_moves_minimally(
        events in proptest::collection::vec(event(), 1..40),
    ) {
        const N: u64 = 8_192;
        let mut st = State::default();
        let mut before = owners(&st.assignment(), N);
        for e in &events {
            let (joiner, departed) = st.apply(e);
            st.check();
            let after = owners(&st.assignment(), N);
            check_step(&before, &after, joiner, &departed)?;
            // The departed members' keys all moved, to survivors.
            for (b, a) in before.iter().zip(&after) {
                if let Some(old) = b {
                    if departed.contains(old) {
                        prop_assert!(a.is_none_or(|x| st.live.contains(&x)));
                        prop_assert_ne!(a, b);
                    }
                }
            }
            before = after;
        }
    }

    /// Property 7: with no live member no key has an owner, whatever `S` is.
    #[test]
    fn empty_membership_has_no_owner(s in 0u32..200, key in any::<u64>()) {
        let a = Assignment::new(s, []).unwrap();
        prop_assert_eq!(a.owner(key), None);
        prop_assert_eq!(a.shard_owner((key % 1024) as u32), None);
    }

    /// Every owner is a live slot, and permuting the input changes nothing (cheap, many cases).
    #[test]
    fn owner_is_live_and_input_order_free(
        (s, live) in view(1..=16, 8),
        key in any::<u64>(),
        rot in any::<usize>(),
    ) {
        let a = Assignment::new(s, live.iter().copied()).unwrap();
        let mut rotated = live.clone();
        rotated.reverse();
        let n = rotated.len();
        rotated.rotate_left(rot % n);
        let b = Assignment::new(s, rotated).unwrap();
        let o = a.owner(key).unwrap();
        prop_assert!(live.contains(&o));
        prop_assert_eq!(b.owner(key), Some(o));
        if live.len() == s as usize {
            prop_assert_eq!(o, jump_consistent_hash::hash(key, s as usize));
        }
    }
}

/// `c` survivors share `n` moved keys; each should get `n/c`. Under the uniform re-probe model
/// a survivor's share is Binomial(n, 1/c) (exactly n when c = 1), with standard deviation
/// σ = √(n·(1/c)·(1 − 1/c)). Allow 6σ + 1 (the +1 absorbs rounding when σ is tiny): a
/// Gaussian tail of 6σ has probability 2·10⁻⁹ per survivor.
fn check_spread(
    received: &BTreeMap<u32, usize>,
    survivors: usize,
    n: usize,
) -> Result<(), TestCaseError> {
    let p = 1.0 / survivors as f64;
    let mean = n as f64 * p;
    let bound = 6.0 * (n as f64 * p * (1.0 - p)).sqrt() + 1.0;
    prop_assert_eq!(received.values().sum::<usize>(), n);
    for (slot, &got) in received {
        prop_assert!(
            (got as f64 - mean).abs() <= bound,
            "survivor {} received {} of {} moved keys; expected {:.1} ± {:.1}",
            slot,
            got,
            n,
            mean,
            bound
        );
    }
    Ok(())
}

proptest! {
    #![proptest_config(fixed_cases(24, 0x5EED_0001))]

    /// Property 2: a leave moves exactly the departed member's keys, spread evenly over the
    /// survivors. K = 100 000 keys.
    #[test]
    fn leave_moves_exactly_the_departed_keys_evenly(
        (s, live) in view(2..=64, 8),
        pick in any::<usize>(),
    ) {
        let before = Assignment::new(s, live.iter().copied()).unwrap();
        let d = live[pick % live.len()];
        let after = Assignment::new(
            slot_count_after_leave(s, d),
            live.iter().copied().filter(|&x| x != d),
        ).unwrap();
        let mut received: BTreeMap<u32, usize> =
            after.live_slots().map(|x| (x, 0)).collect();
        let mut moved = 0;
        for key in keys(K) {
            let (b, a) = (before.owner(key).unwrap(), after.owner(key).unwrap());
            if b == d {
                prop_assert_ne!(a, d);
                *received.get_mut(&a).unwrap() += 1;
                moved += 1;
            } else {
                prop_assert_eq!(a, b, "a survivor's key moved");
            }
        }
        check_spread(&received, live.len() - 1, moved)?;
    }

    /// Property 3: a join moves keys only onto the joiner (and the joiner gets a fair share,
    /// within the balance bound of I4). K = 100 000 keys.
    #[test]
    fn join_moves_keys_only_onto_the_joiner(
        (s, live) in view(0..=63, 8),
    ) {
        let before = Assignment::new(s, live.iter().copied()).unwrap();
        let (j, s2) = join_slot(s, &live);
        let after = Assignment::new(s2, live.iter().copied().chain([j])).unwrap();
        let mut gained = 0usize;
        for key in keys(K) {
            let a = after.owner(key);
            if a != before.owner(key) {
                prop_assert_eq!(a, Some(j));
            }
            gained += usize::from(a == Some(j));
        }
        let w = (live.len() + 1) as f64;
        let mean = K as f64 / w;
        prop_assert!(gained as f64 <= mean * (1.0 + 5.0 * (w / K as f64).sqrt()));
        prop_assert!(gained as f64 >= mean * (1.0 - 5.0 * (w / K as f64).sqrt()));
    }

    /// Property 4: refilling a vacated slot restores the earlier assignment exactly.
    /// K = 100 000 keys.
    #[test]
    fn refilling_a_vacated_slot_restores_the_assignment(
        (s, live) in view(1..=64, 8),
        pick in any::<usize>(),
    ) {
        // Make `d` the lowest vacant slot once it leaves: fill every slot below it.
        let d = live[pick % live.len()];
        let live: BTreeSet<u32> = live.iter().copied().chain(0..d).collect();
        let original = Assignment::new(s, live.iter().copied()).unwrap();
        let s1 = slot_count_after_leave(s, d);
        let rest: Vec<u32> = live.iter().copied().filter(|&x| x != d).collect();
        let (j, s2) = join_slot(s1, &rest);
        prop_assert_eq!((j, s2), (d, s));
        let refilled = Assignment::new(s2, rest.iter().copied().chain([j])).unwrap();
        prop_assert_eq!(&refilled, &original);
        for key in keys(K) {
            prop_assert_eq!(refilled.owner(key), original.owner(key));
        }
    }

    /// Property 6: several members crash at once and are reaped in one transaction; only their
    /// keys move, and they land on survivors. K = 100 000 keys.
    #[test]
    fn a_multi_crash_moves_only_the_departed_keys(
        (s, live) in view(2..=64, 8),
        picks in proptest::collection::vec(any::<usize>(), 1..8),
    ) {
        let mut departed: Vec<u32> = picks.iter().map(|p| live[p % live.len()]).collect();
        departed.sort_unstable();
        departed.dedup();
        if departed.len() == live.len() {
            departed.pop(); // keep one survivor
        }
        let before = Assignment::new(s, live.iter().copied()).unwrap();
        let after = Assignment::new(
            slot_count_after_leaves(s, &departed),
            live.iter().copied().filter(|x| !departed.contains(x)),
        ).unwrap();
        let survivors = live.len() - departed.len();
        let mut received: BTreeMap<u32, usize> = after.live_slots().map(|x| (x, 0)).collect();
        let mut moved = 0;
        for key in keys(K) {
            let (b, a) = (before.owner(key).unwrap(), after.owner(key).unwrap());
            if departed.contains(&b) {
                *received.get_mut(&a).unwrap() += 1;
                moved += 1;
            } else {
                prop_assert_eq!(a, b, "a survivor's key moved");
            }
        }
        check_spread(&received, survivors, moved)?;
    }

    /// Property 5 (I4): max/mean ≤ 1 + 5·√(w/K) for K = 100 000 keys, w in 1..=64 live slots,
    /// S up to w + 8 with random vacancies.
    ///
    /// A slot's load is Binomial(K, 1/w), so its relative deviation from the mean has standard
    /// deviation √((1 − 1/w)·w/K) ≤ √(w/K); the bound is 5σ for the maximum of w loads, which a
    /// uniform hash exceeds with probability below w · 3·10⁻⁷.
    #[test]
    fn loads_are_balanced(
        (s, live) in view(1..=64, 8),
        shards in any::<bool>(),
    ) {
        let a = Assignment::new(s, live.iter().copied()).unwrap();
        let loads = if shards {
            a.loads((0..K as u32).map(shard_key))
        } else {
            a.loads(keys(K))
        };
        let w = live.len() as f64;
        let max = *loads.values().max().unwrap() as f64;
        let mean = K as f64 / w;
        let bound = 1.0 + 5.0 * (w / K as f64).sqrt();
        prop_assert!(max / mean <= bound, "max/mean = {} > {} (S = {}, live = {:?})", max / mean, bound, s, live);
    }
}

/// Prints the movement and balance figures (run with `--nocapture`) and checks them against
/// the same bounds as the properties.
#[test]
fn movement_and_balance_figures() {
    for w in [4u32, 16, 64] {
        let full = Assignment::new(w, 0..w).unwrap();
        let loads = full.loads(keys(K));
        let max = *loads.values().max().unwrap() as f64;
        let mean = K as f64 / f64::from(w);
        let bound = 1.0 + 5.0 * (f64::from(w) / K as f64).sqrt();

        // A holed view: w live slots among w + 4, every other slot near the top vacant.
        let s = w + 4;
        let holed_live: Vec<u32> = (0..s).filter(|x| !(x % 2 == 1 && *x >= s - 8)).collect();
        let holed_live = &holed_live[..w as usize];
        let holed = Assignment::new(s, holed_live.iter().copied()).unwrap();
        let hmax = *holed.loads(keys(K)).values().max().unwrap() as f64;

        // Leave of a middle slot, then of the top slot; join onto a full group.
        let moved = |a: &Assignment, b: &Assignment| {
            keys(K).filter(|&k| a.owner(k) != b.owner(k)).count() as f64 / K as f64
        };
        let mid = w / 2;
        let left_mid = Assignment::new(w, (0..w).filter(|&x| x != mid)).unwrap();
        let left_top = Assignment::new(slot_count_after_leave(w, w - 1), 0..w - 1).unwrap();
        let (j, s2) = join_slot(w, &(0..w).collect::<Vec<_>>());
        let joined = Assignment::new(s2, (0..w).chain([j])).unwrap();
        let (m_mid, m_top, m_join) = (
            moved(&full, &left_mid),
            moved(&full, &left_top),
            moved(&full, &joined),
        );
        println!(
            "w={w:2}: max/mean full {:.4}, holed (S={s}) {:.4}, bound {:.4}; moved on leave (mid) \
             {m_mid:.4}, leave (top) {m_top:.4}, ideal 1/w = {:.4}; moved on join {m_join:.4}, \
             ideal 1/(w+1) = {:.4}",
            max / mean,
            hmax / mean,
            bound,
            1.0 / f64::from(w),
            1.0 / f64::from(w + 1),
        );
        assert!(max / mean <= bound && hmax / mean <= bound);
        for (m, ideal) in [
            (m_mid, 1.0 / f64::from(w)),
            (m_top, 1.0 / f64::from(w)),
            (m_join, 1.0 / f64::from(w + 1)),
        ] {
            // The moved fraction is one slot's load: within the balance bound of its mean.
            assert!((m - ideal).abs() <= ideal * 5.0 * (f64::from(w) / K as f64).sqrt());
        }
    }
}

/// The committed vector file is well-formed and covers what the schema promises (the values
/// themselves are checked by the unit tests of `hash`, and by the SQL tests).
#[test]
fn hash_vectors_match_the_rust_functions() {
    let v: serde_json::Value =
        serde_json::from_str(include_str!("vectors/hash_vectors.json")).unwrap();
    assert!(v["_doc"].as_str().is_some_and(|d| !d.is_empty()));
    let ids: Vec<&str> = v["uuid_keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["id"].as_str().unwrap())
        .collect();
    assert!(ids.len() >= 20);
    assert!(ids.contains(&"00000000-0000-0000-0000-000000000000"));
    assert!(ids.contains(&"ffffffff-ffff-ffff-ffff-ffffffffffff"));
    for c in v["uuid_keys"].as_array().unwrap() {
        let id: uuid::Uuid = c["id"].as_str().unwrap().parse().unwrap();
        assert_eq!(
            format!("{:016x}", hash::uuid_key(&id)),
            c["key_u64_hex"].as_str().unwrap()
        );
        assert_eq!(hash::uuid_key_i64(&id), c["key_i64"].as_i64().unwrap());
        assert_eq!(
            u64::from(hash::shard_of_uuid(&id)),
            c["shard"].as_u64().unwrap()
        );
    }
    let strs: Vec<&str> = v["str_keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["s"].as_str().unwrap())
        .collect();
    assert!(strs.len() >= 10);
    for s in ["", "é", "work_items"] {
        assert!(strs.contains(&s), "{s:?} is in the vectors");
    }
    for c in v["str_keys"].as_array().unwrap() {
        let s = c["s"].as_str().unwrap();
        assert_eq!(
            format!("{:016x}", hash::str_key(s)),
            c["key_u64_hex"].as_str().unwrap()
        );
        assert_eq!(hash::str_key_i64(s), c["key_i64"].as_i64().unwrap());
    }
    for c in v["mix64"].as_array().unwrap() {
        let x = u64::from_str_radix(c["x_hex"].as_str().unwrap(), 16).unwrap();
        assert_eq!(format!("{:016x}", mix64(x)), c["out_hex"].as_str().unwrap());
    }
    for c in v["mix"].as_array().unwrap() {
        let key = u64::from_str_radix(c["key_hex"].as_str().unwrap(), 16).unwrap();
        let i = c["i"].as_u64().unwrap();
        assert_eq!(
            format!("{:016x}", mix(key, i)),
            c["out_hex"].as_str().unwrap()
        );
    }
}

/// The `owners` vectors pin the owner function itself.
#[test]
fn owner_vectors_match() {
    let v: serde_json::Value =
        serde_json::from_str(include_str!("vectors/hash_vectors.json")).unwrap();
    let cases = v["owners"].as_array().unwrap();
    assert!(cases.len() >= 50);
    for c in cases {
        let s = u32::try_from(c["slot_count"].as_u64().unwrap()).unwrap();
        let live = c["live"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| u32::try_from(x.as_u64().unwrap()).unwrap());
        let a = Assignment::new(s, live).unwrap();
        let key = u64::from_str_radix(c["key_hex"].as_str().unwrap(), 16).unwrap();
        let want = c["owner"].as_u64().map(|o| u32::try_from(o).unwrap());
        assert_eq!(a.owner(key), want, "owner of {key:#018x} in {c}");
    }
}

/// The `shard_tables` vectors pin the balanced shard table (quota table and re-probes).
#[test]
fn shard_table_vectors_match() {
    let v: serde_json::Value =
        serde_json::from_str(include_str!("vectors/hash_vectors.json")).unwrap();
    let cases = v["shard_tables"].as_array().unwrap();
    assert!(cases.len() >= 20);
    for c in cases {
        let s = u32::try_from(c["slot_count"].as_u64().unwrap()).unwrap();
        let live: Vec<u32> = c["live"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| u32::try_from(x.as_u64().unwrap()).unwrap())
            .collect();
        let n = u32::try_from(c["shards"].as_u64().unwrap()).unwrap();
        let t = Assignment::new(s, live.iter().copied())
            .unwrap()
            .shard_table(n)
            .unwrap();
        let counts: Vec<u64> = live.iter().map(|&x| t.shards_of(x).len() as u64).collect();
        let want: Vec<u64> = c["counts"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap())
            .collect();
        assert_eq!(counts, want, "shard counts in {c}");
        for pair in c["owners"].as_array().unwrap() {
            let shard = u32::try_from(pair[0].as_u64().unwrap()).unwrap();
            let want = pair[1].as_u64().map(|o| u32::try_from(o).unwrap());
            assert_eq!(t.owner(shard), want, "owner of shard {shard} in {c}");
        }
    }
}

/// The inputs of the vector file. Changing them requires regenerating the file.
const VECTOR_UUIDS: &[&str] = &[
    "00000000-0000-0000-0000-000000000000",
    "ffffffff-ffff-ffff-ffff-ffffffffffff",
    "00000000-0000-0000-0000-000000000001",
    "80000000-0000-0000-0000-000000000000",
    "01234567-89ab-cdef-0123-456789abcdef",
    "123e4567-e89b-12d3-a456-426614174000",
    "6ba7b810-9dad-11d1-80b4-00c04fd430c8",
    "6ba7b811-9dad-11d1-80b4-00c04fd430c8",
    "f47ac10b-58cc-4372-a567-0e02b2c3d479",
    "9b2f3d1e-6c4a-4f8e-9d7b-2a1c5e8f0b3d",
    "3f2504e0-4f89-41d3-9a0c-0305e82c3301",
    "a8098c1a-f86e-41d1-bd40-9fb5c0e4a8d1",
    "c9bf9e57-1685-4c89-bafb-ff5af830be8a",
    "16fd2706-8baf-433b-82eb-8c7fada847da",
    "e4eaaaf2-d142-41c4-8a0a-1f1a4cbe7a53",
    "7c9e6679-7425-40de-944b-e07fc1f90ae7",
    "550e8400-e29b-41d4-a716-446655440000",
    "d9428888-122b-41f6-8b1d-4e2e28b6f1c0",
    "0f8fad5b-d9cb-469f-a165-70867728950e",
    "2c5ea4c0-4067-41fa-8e35-1d45ab7a9c5b",
    "5d3c1f0a-8e7b-4a9c-b2d1-6f4e3a2b1c0d",
    "b3e1c6a2-94f5-4d8e-a7c3-0e9f8d7c6b5a",
    "017f22e2-79b0-7cc3-98c4-dc0c0c07398f",
    "1ec9414c-232a-6b00-b3c8-9e6bdeced846",
];

const VECTOR_STRINGS: &[&str] = &[
    "",
    "é",
    "work_items",
    "a",
    "abc",
    "shardlease",
    "shardlease-worker-0",
    "O'Reilly \"quoted\"",
    "日本語",
    "🦀 crab",
    "tab\there, newline\nthere",
];

const VECTOR_MIX64: &[u64] = &[
    0,
    1,
    2,
    1023,
    0x9E37_79B9_7F4A_7C15,
    0x2019_97f8_6663_13ab,
    0x8000_0000_0000_0000,
    u64::MAX,
];

/// Membership views `(S, live slots)` and keys of the `owners` vectors, which pin
/// [`Assignment::owner`] itself (jump hash, re-probe order and mixer): a member computing a
/// different owner function must use a different protocol version.
const VECTOR_VIEWS: &[(u32, &[u32])] = &[
    (0, &[]),
    (5, &[]),
    (1, &[0]),
    (4, &[0, 1, 2, 3]),
    (10, &[0, 1, 2, 3, 4, 5, 6, 7, 8, 9]),
    (5, &[0, 2, 3]),
    (8, &[1, 5, 6]),
    (20, &[0, 3, 6, 9, 12, 15, 18]),
    (64, &[7, 40, 63]),
    (1024, &[0, 511, 1023]),
];

fn vector_owner_keys() -> Vec<u64> {
    vec![
        0,
        1,
        0x2019_97f8_6663_13ab,
        u64::MAX,
        shard_key(1),
        shard_key(1023),
        mix64(12_345),
        mix64(67_890),
    ]
}

/// Integer keys of the `hash32` vectors.
const VECTOR_INTS: &[i64] = &[
    0,
    1,
    -1,
    42,
    1_000_000_007,
    i64::MIN,
    i64::MAX,
    0x0123_4567_89ab_cdef,
];

/// Shard counts of the `shard_tables` vectors: the legacy column's and the hash shards.
const VECTOR_SHARD_COUNTS: [u32; 2] = [1024, 65_536];

/// The shards whose owners the `shard_tables` vectors pin.
fn vector_table_shards(n: u32) -> Vec<u32> {
    vec![0, 1, 2, 3, n / 3, n / 2, n - 2, n - 1, 12_345 % n]
}

const VECTOR_MIX: &[(u64, u64)] = &[
    (0, 1),
    (0, 2),
    (1, 1),
    (0x2019_97f8_6663_13ab, 1),
    (0x2019_97f8_6663_13ab, 7),
    (u64::MAX, 1),
    (u64::MAX, 64),
    (0x1234_5678_9abc_def0, 65_536),
];

fn generate_vectors() -> String {
    // Written by hand so that the keys keep the documented order and each vector is one line;
    // `q` quotes and escapes a string as JSON.
    let q = |s: &str| serde_json::Value::from(s).to_string();
    let hex = |x: u64| q(&format!("{x:016x}"));
    let uuid_keys: Vec<String> = VECTOR_UUIDS
        .iter()
        .map(|s| {
            let id: uuid::Uuid = s.parse().unwrap();
            format!(
                r#"{{"id": {}, "key_u64_hex": {}, "key_i64": {}, "shard": {}}}"#,
                q(&id.to_string()),
                hex(hash::uuid_key(&id)),
                hash::uuid_key_i64(&id),
                hash::shard_of_uuid(&id),
            )
        })
        .collect();
    let str_keys: Vec<String> = VECTOR_STRINGS
        .iter()
        .map(|s| {
            format!(
                r#"{{"s": {}, "key_u64_hex": {}, "key_i64": {}}}"#,
                q(s),
                hex(hash::str_key(s)),
                hash::str_key_i64(s),
            )
        })
        .collect();
    let mix64s: Vec<String> = VECTOR_MIX64
        .iter()
        .map(|&x| format!(r#"{{"x_hex": {}, "out_hex": {}}}"#, hex(x), hex(mix64(x))))
        .collect();
    let mixes: Vec<String> = VECTOR_MIX
        .iter()
        .map(|&(k, i)| {
            format!(
                r#"{{"key_hex": {}, "i": {i}, "out_hex": {}}}"#,
                hex(k),
                hex(mix(k, i))
            )
        })
        .collect();
    let hash32: Vec<String> = VECTOR_UUIDS
        .iter()
        .map(|s| {
            let id: uuid::Uuid = s.parse().unwrap();
            format!(
                r#"{{"uuid": {}, "hash": {}}}"#,
                q(&id.to_string()),
                hash::uuid_hash(&id)
            )
        })
        .chain(
            VECTOR_STRINGS
                .iter()
                .map(|s| format!(r#"{{"s": {}, "hash": {}}}"#, q(s), hash::str_hash(s))),
        )
        .chain(
            VECTOR_INTS
                .iter()
                .map(|&v| format!(r#"{{"int": {v}, "hash": {}}}"#, hash::int_hash(v))),
        )
        .collect();
    let mut tables: Vec<String> = Vec::new();
    for &(s, live) in VECTOR_VIEWS {
        let a = Assignment::new(s, live.iter().copied()).unwrap();
        for n in VECTOR_SHARD_COUNTS {
            let t = a.shard_table(n).unwrap();
            let counts: Vec<usize> = live.iter().map(|&slot| t.shards_of(slot).len()).collect();
            let owners: Vec<String> = vector_table_shards(n)
                .into_iter()
                .map(|c| {
                    let o = t.owner(c).map_or("null".to_string(), |o| o.to_string());
                    format!("[{c}, {o}]")
                })
                .collect();
            tables.push(format!(
                r#"{{"slot_count": {s}, "live": {live:?}, "shards": {n}, "counts": {counts:?}, "owners": [{}]}}"#,
                owners.join(", ")
            ));
        }
    }
    let doc = "Test vectors for shardlease's stable hashes (crates/shardlease/src/hash.rs); Rust \
        and SQL must both reproduce them. This file is the source of truth; regenerate only on \
        purpose (SHARDLEASE_WRITE_VECTORS=1 cargo test -p shardlease --test assignment_props \
        -- --ignored write_hash_vectors). All *_hex fields are the 64-bit value as exactly 16 \
        lowercase hex digits, no prefix. uuid_keys: id = canonical UUID text; key_u64_hex = the \
        first 8 bytes of sha256 over the 16 raw UUID bytes (uuid_send), big-endian; key_i64 = \
        the same bits as a signed bigint, i.e. ('x' || encode(substr(sha256(uuid_send(id)), 1, \
        8), 'hex'))::bit(64)::bigint; shard = key & 1023 (0..1024). str_keys: s = the string; \
        the same over its UTF-8 bytes, i.e. ('x' || encode(substr(sha256(convert_to(s, \
        'UTF8')), 1, 8), 'hex'))::bit(64)::bigint. mix64: out = SplitMix64 finalizer of x: z = \
        (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9; z = (z ^ (z >> 27)) * 0x94d049bb133111eb; out = z \
        ^ (z >> 31), all mod 2^64 with logical shifts. mix: out = mix64(key ^ (i * \
        0x9e3779b97f4a7c15 mod 2^64)), the assignment's re-probe mixer. owners: the owner of \
        key_hex for the membership view (slot_count S, live = the live slots): probe 0 is \
        jump_hash(key, S), probe i >= 1 is jump_hash(mix(key, i), S) (Lamping-Veach jump \
        consistent hash, as in the Rust jump-consistent-hash crate 0.1.0); the owner is the \
        first live probe among 64*S probes, else live_sorted[mix(key, 64*S) % len(live)]; null \
        when live is empty. hash32: the stored 32-bit hash, the first 4 bytes of sha256, \
        big-endian, as a signed integer: ('x' || encode(substr(sha256(b), 1, 4), 'hex'))::bit(32)::int \
        with b = uuid_send(uuid) for \"uuid\", convert_to(s, 'UTF8') for \"s\", int8send(int) for \
        \"int\". shard_tables: the balanced shard table of the view (slot_count S, live) over \
        `shards` shards (crates/shardlease/src/shard_table.rs): counts = the number of shards of \
        each live slot, in the order of live; owners = [shard, owner] pairs. Probe 0 of shard c is \
        the quota table T_S(c) (T_1 = all to slot 0; T_{s+1}: every slot b < s keeps its \
        floor(n/(s+1)) + [b < n mod (s+1)] lowest shards and hands the rest to slot s); probes i >= 1 \
        are jump_hash(mix(mix64(c), i), S); the owner is the first live probe among 64*S probes, \
        else live_sorted[mix(mix64(c), 64*S) % len(live)]; null when live is empty.";
    let mut owners: Vec<String> = Vec::new();
    for &(s, live) in VECTOR_VIEWS {
        let a = Assignment::new(s, live.iter().copied()).unwrap();
        for key in vector_owner_keys() {
            let owner = a.owner(key).map_or("null".to_string(), |o| o.to_string());
            owners.push(format!(
                r#"{{"slot_count": {s}, "live": {live:?}, "key_hex": {}, "owner": {owner}}}"#,
                hex(key)
            ));
        }
    }
    let section = |name: &str, entries: &[String]| {
        let lines: Vec<String> = entries.iter().map(|e| format!("    {e}")).collect();
        format!("  {}: [\n{}\n  ]", q(name), lines.join(",\n"))
    };
    let text = format!(
        "{{\n  \"_doc\": {},\n{},\n{},\n{},\n{},\n{},\n{},\n{}\n}}\n",
        q(doc),
        section("uuid_keys", &uuid_keys),
        section("str_keys", &str_keys),
        section("mix64", &mix64s),
        section("mix", &mixes),
        section("owners", &owners),
        section("hash32", &hash32),
        section("shard_tables", &tables),
    );
    serde_json::from_str::<serde_json::Value>(&text).expect("the generator writes valid JSON");
    text
}

/// Regenerates `tests/vectors/hash_vectors.json` when `SHARDLEASE_WRITE_VECTORS=1`, otherwise
/// prints it. Ignored: the committed file is the source of truth, and the hash functions must
/// never change in a way that would alter it.
#[test]
#[ignore = "generator; run explicitly to (re)create the vector file"]
fn write_hash_vectors() {
    let text = generate_vectors();
    if std::env::var("SHARDLEASE_WRITE_VECTORS").as_deref() == Ok("1") {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/vectors/hash_vectors.json"
        );
        std::fs::write(path, text).unwrap();
    } else {
        print!("{text}");
    }
}

// ---------------------------------------------------------------------------------------------
// The balanced shard table (`shard_table`): the same promises at shard level, exact quotas, and
// the figures through the worker's path (item id → stored 32-bit hash → hash shard → slot).
// ---------------------------------------------------------------------------------------------

use shardlease::shard_table::{ShardTable, HASH_SHARDS};

/// Shards per property step: enough for every slot of the histories to own many.
const TABLE_SHARDS: u32 = 4096;

fn table(st: &State, n: u32) -> ShardTable {
    st.assignment().shard_table(n).expect("a valid shard count")
}

fn table_owners(t: &ShardTable) -> Vec<Option<u32>> {
    (0..t.shard_count()).map(|c| t.owner(c)).collect()
}

/// The quota `q_S(b)` of slot `b` among `S` all-live slots.
fn quota(s: u32, b: u32, n: u32) -> usize {
    (n / s + u32::from(b < n % s)) as usize
}

proptest! {
    #![proptest_config(cases(32))]

    /// The table depends only on the view: a random history and a canonical route to the same
    /// `(S, live)` give the same table, shard for shard.
    #[test]
    fn shard_tables_depend_only_on_the_view(
        events in proptest::collection::vec(event(), 0..60),
        order in proptest::collection::vec(any::<usize>(), 64),
    ) {
        let mut a = State::default();
        for e in &events {
            a.apply(e);
        }
        let b = canonical_route(&a, &order);
        prop_assert_eq!(table(&a, TABLE_SHARDS), table(&b, TABLE_SHARDS));
    }

    /// Every step of a random history moves shards minimally: a leave or crash moves only the
    /// departed slots' shards (all of them, to survivors), a join moves shards only onto the
    /// joiner; a join that grows `S` gives the joiner exactly its quota.
    #[test]
    fn every_step_of_a_history_moves_shards_minimally(
        events in proptest::collection::vec(event(), 1..40),
    ) {
        let mut st = State::default();
        let mut before = table_owners(&table(&st, TABLE_SHARDS));
        for e in &events {
            let s_before = st.s;
            let (joiner, departed) = st.apply(e);
            let after = table_owners(&table(&st, TABLE_SHARDS));
            check_step(&before, &after, joiner, &departed)?;
            for (b, a) in before.iter().zip(&after) {
                if let Some(old) = b {
                    if departed.contains(old) {
                        prop_assert!(a.is_none_or(|x| st.live.contains(&x)));
                        prop_assert_ne!(a, b);
                    }
                }
            }
            if let Some(j) = joiner {
                if st.s > s_before && st.live.len() == st.s as usize {
                    let got = after.iter().filter(|o| **o == Some(j)).count();
                    prop_assert_eq!(got, quota(st.s, j, TABLE_SHARDS));
                }
            }
            before = after;
        }
    }
}

proptest! {
    #![proptest_config(fixed_cases(24, 0x5EED_0002))]

    /// With every slot live, each slot owns exactly its quota; the top slot's departure hands
    /// each survivor exactly the shards it had given (an even spread, to one shard), and a
    /// middle slot's departure spreads its shards over the survivors within the binomial bound
    /// of `check_spread`. 65,536 shards.
    #[test]
    fn shard_table_quotas_and_even_spread(w in 2u32..=300, pick in any::<u32>()) {
        let n = HASH_SHARDS;
        let full = Assignment::new(w, 0..w).unwrap().shard_table(n).unwrap();
        for b in 0..w {
            prop_assert_eq!(full.shards_of(b).len(), quota(w, b, n));
        }
        for d in [w - 1, pick % (w - 1)] {
            let after = Assignment::new(slot_count_after_leave(w, d), (0..w).filter(|&x| x != d))
                .unwrap()
                .shard_table(n)
                .unwrap();
            let mut received: BTreeMap<u32, usize> =
                (0..w).filter(|&x| x != d).map(|x| (x, 0)).collect();
            for c in 0..n {
                let (b, a) = (full.owner(c).unwrap(), after.owner(c).unwrap());
                if b == d {
                    *received.get_mut(&a).unwrap() += 1;
                } else {
                    prop_assert_eq!(a, b, "a survivor's shard moved");
                }
            }
            if d == w - 1 {
                for (&b, &got) in &received {
                    prop_assert_eq!(got, quota(w - 1, b, n) - quota(w, b, n));
                }
            } else {
                check_spread(&received, (w - 1) as usize, quota(w, d, n))?;
            }
        }
    }

    /// Refilling a vacated slot restores the earlier table exactly.
    #[test]
    fn refilling_a_vacated_slot_restores_the_table(
        (s, live) in view(1..=64, 8),
        pick in any::<usize>(),
    ) {
        let d = live[pick % live.len()];
        let live: BTreeSet<u32> = live.iter().copied().chain(0..d).collect();
        let original = Assignment::new(s, live.iter().copied()).unwrap().shard_table(TABLE_SHARDS).unwrap();
        let s1 = slot_count_after_leave(s, d);
        let rest: Vec<u32> = live.iter().copied().filter(|&x| x != d).collect();
        let (j, s2) = join_slot(s1, &rest);
        prop_assert_eq!((j, s2), (d, s));
        let refilled = Assignment::new(s2, rest.iter().copied().chain([j])).unwrap().shard_table(TABLE_SHARDS).unwrap();
        prop_assert_eq!(refilled, original);
    }

    /// Balance with vacancies: a live slot owns its quota in `T_S` plus its share of the
    /// vacant slots' shards, which re-probe uniformly: Binomial(v, 1/w) for v vacant shards.
    /// Bound: ⌈n/S⌉ + v/w + 5·√(v/w) + 1 per slot.
    #[test]
    fn shard_table_balance_with_vacancies((s, live) in view(1..=200, 40)) {
        let n = HASH_SHARDS;
        let t = Assignment::new(s, live.iter().copied()).unwrap().shard_table(n).unwrap();
        let w = live.len() as f64;
        let vacant_shards: usize = (0..s).filter(|x| !live.contains(x)).map(|b| quota(s, b, n)).sum();
        let extra = vacant_shards as f64 / w;
        let bound = f64::from(n.div_ceil(s)) + extra + 5.0 * extra.sqrt() + 1.0;
        let mut total = 0;
        for &slot in &live {
            let got = t.shards_of(slot).len();
            total += got;
            prop_assert!(got as f64 <= bound, "slot {} owns {} shards > {:.1} (S = {}, w = {})", slot, got, bound, s, w);
        }
        prop_assert_eq!(total, n as usize);
    }
}

/// `count` item ids, fixed: version-4 UUIDs built from SplitMix64, like `gen_random_uuid()`.
fn item_ids(count: u64) -> Vec<uuid::Uuid> {
    (0..count)
        .map(|i| {
            let bytes =
                ((u128::from(mix64(i)) << 64) | u128::from(mix64(i ^ hash::GOLDEN))).to_be_bytes();
            uuid::Builder::from_random_bytes(bytes).into_uuid()
        })
        .collect()
}

/// max/mean, min/mean and the number of live slots without an item.
fn spread(counts: &BTreeMap<u32, usize>, k: usize) -> (f64, f64, usize) {
    let mean = k as f64 / counts.len() as f64;
    let max = *counts.values().max().unwrap() as f64;
    let min = *counts.values().min().unwrap() as f64;
    let empty = counts.values().filter(|&&c| c == 0).count();
    (max / mean, min / mean, empty)
}

/// Items per live slot along one path `owner_of(item index) -> slot`.
fn item_counts(
    a: &Assignment,
    k: usize,
    owner_of: impl Fn(usize) -> Option<u32>,
) -> BTreeMap<u32, usize> {
    let mut counts: BTreeMap<u32, usize> = a.live_slots().map(|s| (s, 0)).collect();
    for i in 0..k {
        *counts.get_mut(&owner_of(i).unwrap()).unwrap() += 1;
    }
    counts
}

/// The figures of issue 10, through the worker's own path: 100,000 item ids, each hashed to
/// its stored 32-bit hash (`hash::uuid_hash`, the twin of `shardlease.uuid_hash`, proven by
/// the vectors), owned through the table of 65,536 hash shards, beside the key-level figure
/// (the item's 64-bit key hashed straight onto a slot) and the 1,024-shard path the worker used
/// before (`shard_of_uuid` → `shard_owner`). Prints with `--nocapture`; asserts the goals:
/// max/mean ≤ 1.05 at w = 16 and ≤ 1.12 at w = 64, no member without items at w = 1,000, the
/// hash share that moves on a join or leave within 2 % of the ideal 1/(w+1) and 1/w, items
/// moving only off the departed member or onto the joiner, and the I4 bound wherever the
/// key-level path meets it.
#[test]
fn item_level_balance_and_movement_figures() {
    const ITEMS: usize = 100_000;
    let ids = item_ids(ITEMS as u64);
    let keys: Vec<u64> = ids.iter().map(hash::uuid_key).collect();
    let legacy: Vec<u32> = ids.iter().map(hash::shard_of_uuid).collect();
    let hashes: Vec<i32> = ids.iter().map(hash::uuid_hash).collect();
    println!(
        "items = {ITEMS}; max/mean and min/mean of items per member, members without items; \
         movement = share of items that changed owner (ideal 1/w on a leave, 1/(w+1) on a join)"
    );
    for w in [4u32, 16, 64, 256, 1000] {
        let full = Assignment::new(w, 0..w).unwrap();
        let t = full.shard_table(HASH_SHARDS).unwrap();
        let key_level = spread(&item_counts(&full, ITEMS, |i| full.owner(keys[i])), ITEMS);
        let old = spread(
            &item_counts(&full, ITEMS, |i| full.shard_owner(legacy[i])),
            ITEMS,
        );
        let new = spread(
            &item_counts(&full, ITEMS, |i| t.hash_owner(hashes[i])),
            ITEMS,
        );

        // Movement: a middle slot leaves, the top slot leaves, a member joins the full group.
        let mid = w / 2;
        let left_mid = Assignment::new(w, (0..w).filter(|&x| x != mid)).unwrap();
        let left_top = Assignment::new(slot_count_after_leave(w, w - 1), 0..w - 1).unwrap();
        let (j, s2) = join_slot(w, &(0..w).collect::<Vec<_>>());
        let joined = Assignment::new(s2, (0..w).chain([j])).unwrap();
        let mut line = Vec::new();
        for (what, after, ideal, mover) in [
            ("leave (mid)", &left_mid, 1.0 / f64::from(w), mid),
            ("leave (top)", &left_top, 1.0 / f64::from(w), w - 1),
            ("join", &joined, 1.0 / f64::from(w + 1), j),
        ] {
            let t2 = after.shard_table(HASH_SHARDS).unwrap();
            let moved_items = hashes
                .iter()
                .filter(|&&h| {
                    let (b, a) = (t.hash_owner(h), t2.hash_owner(h));
                    if b != a {
                        // Only the departed member's items move, or items onto the joiner.
                        assert!(
                            b == Some(mover) || a == Some(mover),
                            "w={w} {what}: an item moved from {b:?} to {a:?}"
                        );
                    }
                    b != a
                })
                .count() as f64
                / ITEMS as f64;
            let moved_shards = (0..HASH_SHARDS)
                .filter(|&c| t.owner(c) != t2.owner(c))
                .count() as f64
                / f64::from(HASH_SHARDS);
            let key_moved = keys
                .iter()
                .filter(|&&k| full.owner(k) != after.owner(k))
                .count() as f64
                / ITEMS as f64;
            // The expected movement (the hash share that changes owner) is within 2 % of ideal.
            assert!(
                (moved_shards / ideal - 1.0).abs() <= 0.02,
                "w={w} {what}: {moved_shards:.5} of the hash space moved, ideal {ideal:.5}"
            );
            // The items that move are one member's load: within the I4 sampling bound of it.
            let sigma = (ideal * (1.0 - ideal) / ITEMS as f64).sqrt();
            assert!(
                (moved_items - ideal).abs() <= 5.0 * sigma,
                "w={w} {what}: {moved_items:.5} of the items moved, ideal {ideal:.5}"
            );
            line.push(format!(
                "{what}: items {moved_items:.5} (key-level {key_moved:.5}), hash share {moved_shards:.5}, ideal {ideal:.5}"
            ));
        }
        println!(
            "w={w:4}: max/mean (min/mean, empty): key-level {:.3} ({:.3}, {}) | 1,024 shards (before) {:.3} ({:.3}, {}) | \
             hash table of 65,536 shards {:.3} ({:.3}, {}); ranges per member max {}; {}",
            key_level.0, key_level.1, key_level.2, old.0, old.1, old.2, new.0, new.1, new.2,
            (0..w).map(|s| t.hash_ranges(s).len()).max().unwrap(),
            line.join("; ")
        );
        let i4 = 1.0 + 5.0 * (f64::from(w) / ITEMS as f64).sqrt();
        assert!(
            new.0 <= i4,
            "w={w}: max/mean {:.4} above the I4 bound {i4:.4}",
            new.0
        );
        match w {
            16 => assert!(new.0 <= 1.05, "goal at 16 members: {:.4}", new.0),
            64 => assert!(new.0 <= 1.12, "goal at 64 members: {:.4}", new.0),
            1000 => assert_eq!(new.2, 0, "goal at 1,000 members: none without items"),
            _ => {}
        }
    }
}
