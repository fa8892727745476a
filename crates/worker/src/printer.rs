//! How ids are printed: the worker's once-a-second line of watched ids (sorted, stable
//! while nothing changes, and for a large slice the count, the first few ids and what
//! changed), and the demo's table of a step (who watches which items, what moved, the
//! balance).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write;

use uuid::Uuid;

/// Up to this many ids are printed in full.
pub const FULL_LIST_MAX: usize = 20;
/// For a larger slice, this many are shown first.
const HEAD: usize = 5;
/// At most this many added or removed ids are named.
const CHANGES_NAMED: usize = 5;

/// Remembers the previous line's ids to print what changed.
#[derive(Debug, Default, Clone)]
pub struct Printer {
    previous: BTreeSet<Uuid>,
    print_all: bool,
}

impl Printer {
    /// A printer; `print_all` prints every id however many.
    pub fn new(print_all: bool) -> Self {
        Printer {
            previous: BTreeSet::new(),
            print_all,
        }
    }

    /// The line for `watched` (sorted ids), under `prefix`.
    pub fn line(&mut self, prefix: &str, watched: &[Uuid]) -> String {
        let now: BTreeSet<Uuid> = watched.iter().copied().collect();
        let added: Vec<&Uuid> = now.difference(&self.previous).collect();
        let removed: Vec<&Uuid> = self.previous.difference(&now).collect();
        let line = if self.print_all || now.len() <= FULL_LIST_MAX {
            let ids: Vec<String> = now.iter().map(Uuid::to_string).collect();
            format!("{prefix} watching {} ids: {}", now.len(), ids.join(" "))
        } else {
            let head: Vec<String> = now.iter().take(HEAD).map(Uuid::to_string).collect();
            format!(
                "{prefix} watching {} ids (first {HEAD}: {} ...) changed: +{} -{}{}",
                now.len(),
                head.join(" "),
                added.len(),
                removed.len(),
                describe_changes(&added, &removed)
            )
        };
        self.previous = now;
        line
    }
}

fn describe_changes(added: &[&Uuid], removed: &[&Uuid]) -> String {
    let mut out = String::new();
    for (sign, ids) in [("+", added), ("-", removed)] {
        for id in ids.iter().take(CHANGES_NAMED) {
            out.push_str(&format!(" {sign}{id}"));
        }
        if ids.len() > CHANGES_NAMED {
            out.push_str(&format!(" {sign}...({} more)", ids.len() - CHANGES_NAMED));
        }
    }
    out
}

/// Who watches which items at one step of the demo: worker name → item numbers.
pub type Owners = BTreeMap<String, BTreeSet<usize>>;

/// Item numbers per line of the demo's table.
const IDS_PER_LINE: usize = 15;

/// One step of the demo as a block of lines: per worker its item count and its items
/// (two-digit numbers, `+` on those that moved onto it); then what moved from whom to whom
/// (when anything could have) and the balance: the largest count against the mean,
/// beside the spread that chance alone gives when hashing this many items.
pub fn demo_step(title: &str, before: &Owners, after: &Owners) -> String {
    let total: usize = after.values().map(BTreeSet::len).sum();
    let owner_before: BTreeMap<usize, &str> = before
        .iter()
        .flat_map(|(w, items)| items.iter().map(move |i| (*i, w.as_str())))
        .collect();
    let width = after.keys().map(String::len).max().unwrap_or(0);
    let mut out = format!("{title}\n");
    // (from, to) → how many items.
    let mut moves: BTreeMap<(&str, &str), usize> = BTreeMap::new();
    for (worker, items) in after {
        let ids: Vec<String> = items
            .iter()
            .map(|i| match owner_before.get(i) {
                Some(prev) if *prev != worker => {
                    *moves.entry((prev, worker)).or_default() += 1;
                    format!("+{i:02}")
                }
                _ => format!("{i:02}"),
            })
            .collect();
        let head = format!("  {worker:<width$} {:>3} items:", items.len());
        let indent = " ".repeat(head.len());
        if ids.is_empty() {
            let _ = writeln!(out, "{head}");
        }
        for (n, chunk) in ids.chunks(IDS_PER_LINE).enumerate() {
            let lead = if n == 0 { &head } else { &indent };
            let _ = writeln!(out, "{lead} {}", chunk.join(" "));
        }
    }
    if !before.is_empty() {
        let moved: usize = moves.values().sum();
        let detail: Vec<String> = moves
            .iter()
            .map(|((from, to), n)| format!("{from} -> {to}: {n}"))
            .collect();
        let _ = writeln!(
            out,
            "  moved: {moved} of {total} items{}",
            if detail.is_empty() {
                String::new()
            } else {
                format!(" ({})", detail.join(", "))
            }
        );
    }
    if let Some(b) = Balance::of(after) {
        let _ = writeln!(
            out,
            "  balance: max {} / mean {:.1} = {:.2} ({total} items on {} workers; chance alone spreads the counts by about \u{b1}{:.1})",
            b.max, b.mean, b.max as f64 / b.mean, b.workers, b.chance_sd
        );
    }
    out
}

/// The balance of one step.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Balance {
    /// Workers with items or without.
    pub workers: usize,
    /// The largest count.
    pub max: usize,
    /// Items per worker.
    pub mean: f64,
    /// The standard deviation of one worker's count when `n` items hash independently to
    /// `k` equal shares: sqrt(n (1/k) (1 - 1/k)), the binomial spread.
    pub chance_sd: f64,
}

impl Balance {
    /// The balance of `owners`; `None` without workers or items.
    pub fn of(owners: &Owners) -> Option<Balance> {
        let workers = owners.len();
        let total: usize = owners.values().map(BTreeSet::len).sum();
        if workers == 0 || total == 0 {
            return None;
        }
        let p = 1.0 / workers as f64;
        Some(Balance {
            workers,
            max: owners.values().map(BTreeSet::len).max().unwrap_or(0),
            mean: total as f64 / workers as f64,
            chance_sd: (total as f64 * p * (1.0 - p)).sqrt(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(n: u128) -> Vec<Uuid> {
        (1..=n).map(Uuid::from_u128).collect()
    }

    #[test]
    fn small_slices_print_every_id_sorted_and_stable() {
        let mut p = Printer::new(false);
        let mut v = ids(3);
        v.reverse();
        let mut sorted = v.clone();
        sorted.sort();
        let a = p.line("[w]", &sorted);
        let b = p.line("[w]", &sorted);
        assert_eq!(a, b, "stable when nothing changes");
        assert!(a.starts_with("[w] watching 3 ids: 00000000-0000-0000-0000-000000000001 "));
    }

    #[test]
    fn large_slices_print_count_head_and_changes() {
        let mut p = Printer::new(false);
        let first = p.line("[w]", &ids(100));
        assert!(first.contains("watching 100 ids (first 5:"), "{first}");
        let mut next = ids(101);
        next.remove(0);
        let line = p.line("[w]", &next);
        assert!(line.contains("changed: +1 -1"), "{line}");
        assert!(
            line.contains("+00000000-0000-0000-0000-000000000065"),
            "{line}"
        );
        assert!(
            line.contains("-00000000-0000-0000-0000-000000000001"),
            "{line}"
        );
        let mut all = Printer::new(true);
        assert_eq!(all.line("[w]", &ids(100)).split(' ').count(), 4 + 100);
    }

    fn owners(list: &[(&str, &[usize])]) -> Owners {
        list.iter()
            .map(|(w, items)| (w.to_string(), items.iter().copied().collect()))
            .collect()
    }

    #[test]
    fn a_demo_step_shows_counts_moves_and_balance() {
        let before = owners(&[
            ("worker-1", &[1, 2]),
            ("worker-2", &[3, 4, 5]),
            ("worker-3", &[6]),
        ]);
        let after = owners(&[("worker-1", &[1, 2, 3, 4]), ("worker-3", &[5, 6])]);
        let text = demo_step("Step 2: worker-2 left", &before, &after);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], "Step 2: worker-2 left");
        assert_eq!(lines[1], "  worker-1   4 items: 01 02 +03 +04");
        assert_eq!(lines[2], "  worker-3   2 items: +05 06");
        assert_eq!(
            lines[3],
            "  moved: 3 of 6 items (worker-2 -> worker-1: 2, worker-2 -> worker-3: 1)"
        );
        assert!(
            lines[4].starts_with("  balance: max 4 / mean 3.0 = 1.33 (6 items on 2 workers; chance alone spreads the counts by about \u{b1}1.2)"),
            "{}",
            lines[4]
        );
        // The first step has nothing to compare with: no "moved" line.
        let first = demo_step("Step 1", &Owners::new(), &before);
        assert!(!first.contains("moved"), "{first}");
        assert!(!first.contains('+'), "{first}");
    }

    #[test]
    fn long_item_lists_wrap_under_the_first() {
        let many: Vec<usize> = (1..=45).collect();
        let text = demo_step("S", &Owners::new(), &owners(&[("w", &many)]));
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines[1],
            format!(
                "  w  45 items: {}",
                (1..=15)
                    .map(|i| format!("{i:02}"))
                    .collect::<Vec<_>>()
                    .join(" ")
            ),
            "{text}"
        );
        assert!(lines[2].starts_with("               16 17"), "{text}");
        assert!(lines[3].starts_with("               31 32"), "{text}");
        assert!(lines[3].ends_with(" 45"), "{text}");
    }

    #[test]
    fn balance_is_the_largest_count_against_the_mean() {
        let b = Balance::of(&owners(&[("a", &[1, 2, 3]), ("b", &[4]), ("c", &[])])).unwrap();
        assert_eq!((b.workers, b.max), (3, 3));
        assert!((b.mean - 4.0 / 3.0).abs() < 1e-9);
        // n = 4, k = 3: sqrt(4 * 1/3 * 2/3)
        assert!((b.chance_sd - (8.0f64 / 9.0).sqrt()).abs() < 1e-9);
        assert_eq!(Balance::of(&Owners::new()), None);
    }
}
