//! The once-a-second line of watched ids: sorted, stable while nothing changes, and for a
//! large slice the count, the first few ids and what changed.

use std::collections::BTreeSet;

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
}
