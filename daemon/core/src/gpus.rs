//! GPU accounting: which worker holds which whole GPU. A worker asking for `k` GPUs gets `k`
//! free ones, exclusively; a launch of `n` workers gets all its `n × k` GPUs or none, together
//! with its CPU and memory ([`admit`]). For `k > 1` the ledger prefers GPUs close to each other
//! (least total pairwise topology distance), deterministically.

use std::collections::HashMap;

use crate::error::{Error, Result};

use super::admission::{Claim, Ledger};

/// Above this many candidate sets the choice of a worker's GPUs is greedy instead of exhaustive.
const EXHAUSTIVE_LIMIT: u64 = 20_000;

/// The GPUs of a host and who holds each.
#[derive(Debug, Clone, Default)]
pub struct GpuLedger {
    /// UUIDs in inventory order; positions index `distance` and `holders`.
    uuids: Vec<String>,
    /// Topology distance between two GPUs (symmetric; smaller is closer).
    distance: Vec<Vec<u32>>,
    holders: Vec<Option<String>>,
    by_worker: HashMap<String, Vec<usize>>,
}

/// What [`GpuLedger::restore`] could not take over as it was.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RestoreOutcome {
    /// UUIDs that are not in this host's inventory (any more).
    pub unknown: Vec<String>,
    /// `(uuid, holder)`: UUIDs already held by another worker; they stay with that worker.
    pub conflicts: Vec<(String, String)>,
}

impl RestoreOutcome {
    pub fn is_clean(&self) -> bool {
        self.unknown.is_empty() && self.conflicts.is_empty()
    }
}

impl GpuLedger {
    /// A ledger of `uuids` (inventory order). `distance[i][j]` is the topology distance between
    /// GPUs `i` and `j`; a matrix of the wrong shape counts every pair as equally close.
    pub fn new(uuids: Vec<String>, distance: Vec<Vec<u32>>) -> Self {
        let n = uuids.len();
        let distance = if distance.len() == n && distance.iter().all(|r| r.len() == n) {
            distance
        } else {
            vec![vec![0; n]; n]
        };
        Self {
            holders: vec![None; n],
            uuids,
            distance,
            by_worker: HashMap::new(),
        }
    }

    /// GPUs on the host.
    pub fn total(&self) -> u32 {
        self.uuids.len() as u32
    }

    /// GPUs no worker holds.
    pub fn free(&self) -> u32 {
        self.holders.iter().filter(|h| h.is_none()).count() as u32
    }

    /// GPUs held by workers.
    pub fn allocated(&self) -> u32 {
        self.total() - self.free()
    }

    /// The worker that holds `uuid`.
    pub fn holder(&self, uuid: &str) -> Option<&str> {
        let i = self.uuids.iter().position(|u| u == uuid)?;
        self.holders[i].as_deref()
    }

    /// UUIDs held by `worker`, in the order they were given to it.
    pub fn held_by(&self, worker: &str) -> Vec<String> {
        self.by_worker
            .get(worker)
            .map(|v| v.iter().map(|&i| self.uuids[i].clone()).collect())
            .unwrap_or_default()
    }

    /// Checks that `n` workers of `k` GPUs each fit, without changing anything.
    pub fn check(&self, n: u32, k: u32) -> Result<()> {
        let want = u64::from(n) * u64::from(k);
        let free = u64::from(self.free());
        if want > free {
            let none = if self.uuids.is_empty() {
                " (this host has no GPUs)"
            } else {
                ""
            };
            return Err(Error::ResourceExhausted(format!(
                "gpus: {n} × {k} = {want} requested, {free} of {} free{none}",
                self.total()
            )));
        }
        Ok(())
    }

    /// Positions of the GPUs `n` workers of `k` GPUs each would get, in worker order, without
    /// changing anything.
    pub fn plan(&self, n: u32, k: u32) -> Result<Vec<Vec<usize>>> {
        self.check(n, k)?;
        let mut taken: Vec<bool> = self.holders.iter().map(|h| h.is_some()).collect();
        let mut out = Vec::with_capacity(n as usize);
        for _ in 0..n {
            let set = if k == 0 {
                Vec::new()
            } else {
                self.best_set(&taken, k as usize)
            };
            for &i in &set {
                taken[i] = true;
            }
            out.push(set);
        }
        Ok(out)
    }

    /// Gives every worker of `ids` `k` GPUs, or none of them. Returns their UUIDs, per worker.
    pub fn claim(&mut self, ids: &[String], k: u32) -> Result<Vec<Vec<String>>> {
        let plan = self.plan(ids.len() as u32, k)?;
        Ok(ids
            .iter()
            .zip(plan)
            .map(|(id, set)| self.assign(id, set))
            .collect())
    }

    fn assign(&mut self, worker: &str, set: Vec<usize>) -> Vec<String> {
        if set.is_empty() {
            return Vec::new();
        }
        for &i in &set {
            self.holders[i] = Some(worker.to_owned());
        }
        let uuids = set.iter().map(|&i| self.uuids[i].clone()).collect();
        self.by_worker
            .entry(worker.to_owned())
            .or_default()
            .extend(set);
        uuids
    }

    /// Records claims that already exist on the host (a re-adopted worker). UUIDs this host no
    /// longer has, or that another worker holds, are reported and skipped.
    pub fn restore(&mut self, worker: &str, uuids: &[String]) -> RestoreOutcome {
        let mut out = RestoreOutcome::default();
        let mut set = Vec::new();
        for u in uuids {
            match self.uuids.iter().position(|x| x == u) {
                None => out.unknown.push(u.clone()),
                Some(i) => match &self.holders[i] {
                    Some(h) if h != worker => out.conflicts.push((u.clone(), h.clone())),
                    Some(_) => {}
                    None => set.push(i),
                },
            }
        }
        self.assign(worker, set);
        out
    }

    /// Frees every GPU `worker` holds; returns their UUIDs. Idempotent.
    pub fn release(&mut self, worker: &str) -> Vec<String> {
        let Some(set) = self.by_worker.remove(worker) else {
            return Vec::new();
        };
        for &i in &set {
            self.holders[i] = None;
        }
        set.iter().map(|&i| self.uuids[i].clone()).collect()
    }

    /// The best `k` GPUs among those not `taken`: least total pairwise distance, then closest to
    /// GPUs already taken (so groups of free GPUs that sit together stay whole), then lowest
    /// positions. The caller has checked that `k` are free.
    fn best_set(&self, taken: &[bool], k: usize) -> Vec<usize> {
        let free: Vec<usize> = (0..taken.len()).filter(|&i| !taken[i]).collect();
        let held: Vec<usize> = (0..taken.len()).filter(|&i| taken[i]).collect();
        let cost = |set: &[usize]| -> (u64, u64) {
            let mut inner = 0u64;
            for (a, &i) in set.iter().enumerate() {
                for &j in &set[a + 1..] {
                    inner += u64::from(self.distance[i][j]);
                }
            }
            let near: u64 = set
                .iter()
                .map(|&i| {
                    held.iter()
                        .map(|&h| u64::from(self.distance[i][h]))
                        .min()
                        .unwrap_or(0)
                })
                .sum();
            (inner, near)
        };
        let better = |a: &((u64, u64), Vec<usize>), b: &((u64, u64), Vec<usize>)| a < b;
        let mut best: Option<((u64, u64), Vec<usize>)> = None;
        let mut consider = |set: Vec<usize>| {
            let cand = (cost(&set), set);
            if best.as_ref().is_none_or(|b| better(&cand, b)) {
                best = Some(cand);
            }
        };
        if combinations(free.len() as u64, k as u64) <= EXHAUSTIVE_LIMIT {
            let mut idx: Vec<usize> = (0..k).collect();
            loop {
                consider(idx.iter().map(|&i| free[i]).collect());
                // Next combination in lexicographic order.
                let mut i = k;
                while i > 0 && idx[i - 1] == free.len() - k + (i - 1) {
                    i -= 1;
                }
                if i == 0 {
                    break;
                }
                idx[i - 1] += 1;
                for j in i..k {
                    idx[j] = idx[j - 1] + 1;
                }
            }
        } else {
            // Greedy from every seed: add the free GPU closest to the set so far.
            for &seed in &free {
                let mut set = vec![seed];
                while set.len() < k {
                    let next = free
                        .iter()
                        .filter(|i| !set.contains(i))
                        .min_by_key(|&&i| {
                            let d: u64 = set.iter().map(|&j| u64::from(self.distance[i][j])).sum();
                            (d, i)
                        })
                        .copied();
                    match next {
                        Some(n) => set.push(n),
                        None => break,
                    }
                }
                set.sort_unstable();
                consider(set);
            }
        }
        best.map(|(_, s)| s).unwrap_or_default()
    }
}

/// `n choose k`, saturating.
fn combinations(n: u64, k: u64) -> u64 {
    if k > n {
        return 0;
    }
    let k = k.min(n - k);
    let mut c: u64 = 1;
    for i in 0..k {
        c = c.saturating_mul(n - i) / (i + 1);
        if c > EXHAUSTIVE_LIMIT * 1000 {
            return u64::MAX;
        }
    }
    c
}

/// Admits `ids` with `claim` CPU and memory and `k` GPUs each: all of it or nothing. Returns
/// the GPU UUIDs of each worker, in the order of `ids`.
pub fn admit(
    ledger: &mut Ledger,
    gpus: &mut GpuLedger,
    ids: &[String],
    claim: Claim,
    k: u32,
) -> Result<Vec<Vec<String>>> {
    ledger.check(ids.len() as u32, claim)?;
    gpus.check(ids.len() as u32, k)?;
    let sets = gpus.claim(ids, k)?;
    if let Err(e) = ledger.admit(ids, claim) {
        // Unreachable after the check above; never leave GPUs claimed for refused workers.
        for id in ids {
            gpus.release(id);
        }
        return Err(e);
    }
    Ok(sets)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::admission::Capacity;

    fn uuids(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("GPU-{i}")).collect()
    }

    /// Pairs (0,1), (2,3), … share a switch (10); quads share a host bridge (20); else 50.
    fn paired(n: usize) -> Vec<Vec<u32>> {
        (0..n)
            .map(|i| {
                (0..n)
                    .map(|j| match (i, j) {
                        _ if i == j => 0,
                        _ if i / 2 == j / 2 => 10,
                        _ if i / 4 == j / 4 => 20,
                        _ => 50,
                    })
                    .collect()
            })
            .collect()
    }

    fn ids(n: usize, p: &str) -> Vec<String> {
        (0..n).map(|i| format!("{p}{i}")).collect()
    }

    fn positions(l: &GpuLedger, sets: &[Vec<String>]) -> Vec<Vec<usize>> {
        sets.iter()
            .map(|s| {
                s.iter()
                    .map(|u| l.uuids.iter().position(|x| x == u).unwrap())
                    .collect()
            })
            .collect()
    }

    #[test]
    fn placement_prefers_close_gpus() {
        // (GPUs, held before, n, k, expected positions per worker)
        type Case = (usize, Vec<usize>, u32, u32, Vec<Vec<usize>>);
        let cases: Vec<Case> = vec![
            (4, vec![], 2, 2, vec![vec![0, 1], vec![2, 3]]),
            (4, vec![], 1, 1, vec![vec![0]]),
            // With 3 held, a one-GPU worker takes 2 (its neighbour) and leaves the pair 0,1.
            (4, vec![3], 1, 1, vec![vec![2]]),
            // 1 and 2 held: the free 0 and 3 are the only pair left.
            (4, vec![1, 2], 1, 2, vec![vec![0, 3]]),
            // 8 GPUs, 1 held: a 2-GPU worker takes the first whole pair (2,3), not (0,2).
            (8, vec![1], 1, 2, vec![vec![2, 3]]),
            // 8 GPUs, 4 wanted: a whole quad.
            (8, vec![0], 1, 4, vec![vec![4, 5, 6, 7]]),
            // 8 GPUs, 3 held in the first quad, 4 wanted: the second quad.
            (8, vec![0, 1, 2], 1, 4, vec![vec![4, 5, 6, 7]]),
            (
                8,
                vec![],
                4,
                2,
                vec![vec![0, 1], vec![2, 3], vec![4, 5], vec![6, 7]],
            ),
            (2, vec![], 3, 0, vec![vec![], vec![], vec![]]),
        ];
        for (n_gpus, held, n, k, want) in cases {
            let mut l = GpuLedger::new(uuids(n_gpus), paired(n_gpus));
            for h in &held {
                l.restore(&format!("old{h}"), &[format!("GPU-{h}")]);
            }
            let got = l.claim(&ids(n as usize, "w"), k).unwrap();
            assert_eq!(
                positions(&l, &got),
                want,
                "{n_gpus} GPUs, held {held:?}, {n} × {k}"
            );
        }
    }

    #[test]
    fn claims_are_exclusive_and_all_or_nothing() {
        let mut l = GpuLedger::new(uuids(4), paired(4));
        let a = l.claim(&ids(1, "a"), 2).unwrap();
        let b = l.claim(&ids(1, "b"), 2).unwrap();
        assert!(a[0].iter().all(|u| !b[0].contains(u)), "{a:?} {b:?}");
        let err = l.claim(&ids(1, "c"), 1).unwrap_err();
        assert_eq!(
            err,
            Error::ResourceExhausted("gpus: 1 × 1 = 1 requested, 0 of 4 free".into())
        );
        assert_eq!(l.held_by("c0"), Vec::<String>::new());
        l.release("a0");
        let err = l.claim(&ids(3, "d"), 2).unwrap_err();
        assert!(
            matches!(&err, Error::ResourceExhausted(m) if m == "gpus: 3 × 2 = 6 requested, 2 of 4 free"),
            "{err}"
        );
        assert_eq!(l.free(), 2, "a refused claim changes nothing");
        assert_eq!(l.claim(&ids(1, "e"), 2).unwrap(), a);
    }

    #[test]
    fn release_is_idempotent_and_frees() {
        let mut l = GpuLedger::new(uuids(2), vec![]);
        let got = l.claim(&ids(1, "a"), 2).unwrap();
        assert_eq!(l.holder("GPU-1"), Some("a0"));
        assert_eq!(l.release("a0"), got[0]);
        assert_eq!(l.release("a0"), Vec::<String>::new());
        assert_eq!((l.free(), l.allocated()), (2, 0));
        assert_eq!(l.holder("GPU-1"), None);
    }

    #[test]
    fn no_gpus_says_so() {
        let l = GpuLedger::default();
        assert_eq!(
            l.check(2, 1).unwrap_err(),
            Error::ResourceExhausted(
                "gpus: 2 × 1 = 2 requested, 0 of 0 free (this host has no GPUs)".into()
            )
        );
        l.check(5, 0).unwrap();
        // n × k beyond u32 does not wrap.
        assert!(l.check(u32::MAX, u32::MAX).is_err());
    }

    #[test]
    fn restore_takes_over_existing_claims() {
        let mut l = GpuLedger::new(uuids(4), paired(4));
        let out = l.restore("w1", &["GPU-2".into(), "GPU-9".into()]);
        assert_eq!(out.unknown, vec!["GPU-9".to_string()]);
        assert!(out.conflicts.is_empty());
        assert_eq!(l.held_by("w1"), vec!["GPU-2".to_string()]);
        let out = l.restore("w2", &["GPU-2".into(), "GPU-3".into()]);
        assert_eq!(out.conflicts, vec![("GPU-2".to_string(), "w1".to_string())]);
        assert_eq!(l.held_by("w2"), vec!["GPU-3".to_string()]);
        // Restoring the same claim twice is harmless.
        assert!(l.restore("w1", &["GPU-2".into()]).is_clean());
        assert_eq!(l.held_by("w1"), vec!["GPU-2".to_string()]);
        assert_eq!(l.allocated(), 2);
        // The rest is still claimable and avoids the restored GPUs.
        let got = l.claim(&ids(1, "n"), 2).unwrap();
        assert_eq!(got, vec![vec!["GPU-0".to_string(), "GPU-1".to_string()]]);
    }

    #[test]
    fn large_inventories_choose_greedily_but_well() {
        // 64 GPUs, 8 wanted: C(64, 8) is far beyond the exhaustive limit.
        let mut l = GpuLedger::new(uuids(64), paired(64));
        l.restore("old", &["GPU-0".into()]);
        let got = l.claim(&ids(1, "w"), 8).unwrap();
        let pos = positions(&l, &got);
        assert_eq!(pos[0].len(), 8);
        // Two whole quads that do not include the held GPU 0's quad... or at least no GPU twice.
        let mut s = pos[0].clone();
        s.dedup();
        assert_eq!(s.len(), 8);
        assert!(!pos[0].contains(&0));
    }

    #[test]
    fn admit_is_all_or_nothing_across_cpu_and_gpus() {
        const GB: u64 = 1 << 30;
        let mut ledger = Ledger::new(Capacity {
            cpu: 4.0,
            memory_bytes: 8 * GB,
            workers: 10,
        });
        let mut gpus = GpuLedger::new(uuids(4), paired(4));
        let claim = Claim {
            cpu: 1.0,
            memory_bytes: GB,
        };
        // GPUs short: nothing is taken, neither CPU nor GPUs.
        let err = admit(&mut ledger, &mut gpus, &ids(3, "a"), claim, 2).unwrap_err();
        assert!(
            matches!(&err, Error::ResourceExhausted(m) if m.starts_with("gpus: 3 × 2 = 6 requested, 4 of 4 free")),
            "{err}"
        );
        assert_eq!(ledger.allocated().workers, 0);
        assert_eq!(gpus.free(), 4);
        // CPU short: no GPU is taken.
        let big = Claim {
            cpu: 3.0,
            memory_bytes: GB,
        };
        let err = admit(&mut ledger, &mut gpus, &ids(2, "b"), big, 1).unwrap_err();
        assert!(
            matches!(&err, Error::ResourceExhausted(m) if m.starts_with("cpu")),
            "{err}"
        );
        assert_eq!(gpus.free(), 4);
        // Fits: both ledgers take it.
        let sets = admit(&mut ledger, &mut gpus, &ids(2, "c"), claim, 2).unwrap();
        assert_eq!(sets.len(), 2);
        assert_eq!((ledger.allocated().workers, gpus.free()), (2, 0));
    }

    #[test]
    fn combinations_saturate() {
        assert_eq!(combinations(4, 2), 6);
        assert_eq!(combinations(8, 4), 70);
        assert_eq!(combinations(3, 5), 0);
        assert_eq!(combinations(64, 32), u64::MAX);
    }
}
