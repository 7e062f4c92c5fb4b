//! Hosts removed from a cluster (`RemoveHost`), as the scheduler replicas and the hosts keep
//! them to tell each other: each host's name and when it was removed (ms since the epoch). The
//! same bounds on both sides: a removal is told for [`MEMORY`], and at most [`MAX`] are kept.

use std::collections::BTreeMap;
use std::time::Duration;

/// How long a removal is told on.
pub const MEMORY: Duration = Duration::from_secs(24 * 3600);
/// The most removals kept (the newest).
pub const MAX: usize = 1024;

/// Removed hosts, by when (ms since the epoch).
pub type Removals = BTreeMap<String, u64>;

/// Remembers that `name` was removed at `at_ms` (the later of two tellings).
pub fn record(removals: &mut Removals, name: &str, at_ms: u64) {
    let at = removals.entry(name.to_owned()).or_insert(at_ms);
    *at = (*at).max(at_ms);
}

/// The oldest removal still told at `now_ms`.
pub fn oldest(now_ms: u64) -> u64 {
    now_ms.saturating_sub(MEMORY.as_millis() as u64)
}

/// Drops the removals past [`MEMORY`] at `now_ms`, then the oldest past [`MAX`].
pub fn prune(removals: &mut Removals, now_ms: u64) {
    let oldest = oldest(now_ms);
    removals.retain(|_, at| *at >= oldest);
    while removals.len() > MAX {
        let first = removals
            .iter()
            .min_by_key(|(_, at)| **at)
            .map(|(n, _)| n.clone())
            .expect("not empty");
        removals.remove(&first);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_later_telling_wins_and_old_or_surplus_ones_go() {
        let now = MEMORY.as_millis() as u64 * 2;
        let mut r = Removals::new();
        record(&mut r, "a", now - 10);
        record(&mut r, "a", now - 20);
        assert_eq!(r["a"], now - 10);
        record(&mut r, "old", oldest(now) - 1);
        for i in 0..MAX {
            record(&mut r, &format!("h{i}"), now - 1000 + i as u64);
        }
        prune(&mut r, now);
        assert_eq!(r.len(), MAX);
        assert!(!r.contains_key("old"));
        assert!(r.contains_key("a"), "newer than the oldest h");
        assert!(!r.contains_key("h0"));
    }
}
