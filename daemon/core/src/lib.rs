//! Pure logic with no I/O: request validation, the worker state machine, resource accounting
//! and admission, placement across hosts. Unit-tested with plain values.

pub mod admission;
pub mod batch;
pub mod error;
pub mod gpus;
pub mod ipam;
pub mod launch;
pub mod limits;
pub mod placement;
pub mod pool;
pub mod removals;
pub mod session;
pub mod worker;

/// A short unique id: 12 characters of `[0-9a-z]`, starting with a letter.
pub fn new_id() -> String {
    use rand::Rng;
    const ALPHA: &[u8] = b"abcdefghijklmnopqrstuvwxyz";
    const ALNUM: &[u8] = b"0123456789abcdefghijklmnopqrstuvwxyz";
    let mut rng = rand::rng();
    let mut s = String::with_capacity(12);
    s.push(ALPHA[rng.random_range(0..ALPHA.len())] as char);
    for _ in 1..12 {
        s.push(ALNUM[rng.random_range(0..ALNUM.len())] as char);
    }
    s
}

/// `prefix` followed by 12 random characters of `[0-9a-z]`: names of things kept ready ahead
/// of need (cgroups, veth ends), which no id can take.
pub fn ready_name(prefix: &str) -> String {
    use rand::Rng;
    const ALNUM: &[u8] = b"0123456789abcdefghijklmnopqrstuvwxyz";
    let mut rng = rand::rng();
    let mut n = String::from(prefix);
    for _ in 0..12 {
        n.push(ALNUM[rng.random_range(0..ALNUM.len())] as char);
    }
    n
}

/// Whether `s` could be an id this server made (guards file paths built from ids).
pub fn is_valid_id(s: &str) -> bool {
    !s.is_empty() && s.len() <= 64 && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_short_unique_and_safe() {
        let ids: std::collections::HashSet<String> = (0..10_000).map(|_| new_id()).collect();
        assert_eq!(ids.len(), 10_000);
        assert!(ids.iter().all(|i| i.len() == 12 && is_valid_id(i)));
        assert!(!is_valid_id("../etc"));
        assert!(!is_valid_id(""));
    }
}
