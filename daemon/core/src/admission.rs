//! Resource accounting and admission: the host's allocatable CPU, memory and worker slots, and
//! what each live worker holds. A launch is admitted whole or not at all.

use std::collections::HashMap;

use crate::error::{Error, Result};

use super::launch::GIB;

/// What the host offers to workers.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Capacity {
    pub cpu: f64,
    pub memory_bytes: u64,
    pub workers: u32,
}

/// What one worker holds.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Claim {
    pub cpu: f64,
    pub memory_bytes: u64,
}

/// Sum of the claims of the live workers.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Allocated {
    pub cpu: f64,
    pub memory_bytes: u64,
    pub workers: u32,
}

/// Tolerance for summing fractional CPU claims (0.1 × 10 must fit into 1.0).
const CPU_EPSILON: f64 = 1e-9;

/// The ledger of claims against the host's capacity.
#[derive(Debug, Clone)]
pub struct Ledger {
    capacity: Capacity,
    claims: HashMap<String, Claim>,
    allocated: Allocated,
}

impl Ledger {
    pub fn new(capacity: Capacity) -> Self {
        Self {
            capacity,
            claims: HashMap::new(),
            allocated: Allocated::default(),
        }
    }

    pub fn capacity(&self) -> Capacity {
        self.capacity
    }

    pub fn allocated(&self) -> Allocated {
        self.allocated
    }

    /// Checks that `n` workers of `claim` fit, without changing anything. The error says what is
    /// short, with numbers.
    pub fn check(&self, n: u32, claim: Claim) -> Result<()> {
        let free_workers = self.capacity.workers.saturating_sub(self.allocated.workers);
        if n > free_workers {
            return Err(Error::ResourceExhausted(format!(
                "workers: {n} requested, {free_workers} of {} slots free",
                self.capacity.workers
            )));
        }
        let cpu = claim.cpu * f64::from(n);
        let free_cpu = self.capacity.cpu - self.allocated.cpu;
        if cpu > free_cpu + CPU_EPSILON {
            return Err(Error::ResourceExhausted(format!(
                "cpu: {n} × {} = {cpu:.3} cores requested, {:.3} of {:.3} free",
                claim.cpu,
                free_cpu.max(0.0),
                self.capacity.cpu
            )));
        }
        let mem = u128::from(claim.memory_bytes) * u128::from(n);
        let free_mem = self
            .capacity
            .memory_bytes
            .saturating_sub(self.allocated.memory_bytes);
        if mem > u128::from(free_mem) {
            return Err(Error::ResourceExhausted(format!(
                "memory: {n} × {:.3} GiB = {:.3} GiB requested, {:.3} of {:.3} GiB free",
                claim.memory_bytes as f64 / GIB,
                mem as f64 / GIB,
                free_mem as f64 / GIB,
                self.capacity.memory_bytes as f64 / GIB
            )));
        }
        Ok(())
    }

    /// Admits every id in `ids` with `claim`, or none of them.
    pub fn admit(&mut self, ids: &[String], claim: Claim) -> Result<()> {
        self.check(ids.len() as u32, claim)?;
        for id in ids {
            self.claims.insert(id.clone(), claim);
            self.allocated.cpu += claim.cpu;
            self.allocated.memory_bytes += claim.memory_bytes;
            self.allocated.workers += 1;
        }
        Ok(())
    }

    /// Records a claim that already exists on the host (a re-adopted worker), even past capacity.
    pub fn restore(&mut self, id: &str, claim: Claim) {
        if self.claims.insert(id.to_owned(), claim).is_none() {
            self.allocated.cpu += claim.cpu;
            self.allocated.memory_bytes += claim.memory_bytes;
            self.allocated.workers += 1;
        }
    }

    /// Frees the claim of `id`; idempotent.
    pub fn release(&mut self, id: &str) {
        if let Some(c) = self.claims.remove(id) {
            self.allocated.cpu = (self.allocated.cpu - c.cpu).max(0.0);
            self.allocated.memory_bytes =
                self.allocated.memory_bytes.saturating_sub(c.memory_bytes);
            self.allocated.workers = self.allocated.workers.saturating_sub(1);
            if self.claims.is_empty() {
                // Wipe accumulated float error.
                self.allocated = Allocated::default();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(n: usize, p: &str) -> Vec<String> {
        (0..n).map(|i| format!("{p}{i}")).collect()
    }

    const GB: u64 = 1 << 30;

    fn ledger() -> Ledger {
        Ledger::new(Capacity {
            cpu: 2.0,
            memory_bytes: 4 * GB,
            workers: 10,
        })
    }

    #[test]
    fn all_or_nothing() {
        let mut l = ledger();
        let c = Claim {
            cpu: 0.25,
            memory_bytes: GB,
        };
        l.admit(&ids(3, "a"), c).unwrap();
        let err = l.admit(&ids(2, "b"), c).unwrap_err();
        assert!(
            matches!(&err, Error::ResourceExhausted(m) if m.starts_with("memory")),
            "{err}"
        );
        assert_eq!(l.allocated().workers, 3, "a refused launch changes nothing");
        l.admit(&ids(1, "c"), c).unwrap();
        assert_eq!(l.allocated().memory_bytes, 4 * GB);
    }

    #[test]
    fn shortages_name_the_resource() {
        let l = ledger();
        let cases = [
            (
                11,
                Claim {
                    cpu: 0.01,
                    memory_bytes: 1,
                },
                "workers",
            ),
            (
                5,
                Claim {
                    cpu: 0.5,
                    memory_bytes: 1,
                },
                "cpu",
            ),
            (
                1,
                Claim {
                    cpu: 0.1,
                    memory_bytes: 5 * GB,
                },
                "memory",
            ),
            (
                1,
                Claim {
                    cpu: 0.1,
                    memory_bytes: u64::MAX,
                },
                "memory",
            ),
        ];
        for (n, c, what) in cases {
            match l.check(n, c) {
                Err(Error::ResourceExhausted(m)) => assert!(m.starts_with(what), "{m}"),
                other => panic!("{n} {c:?}: {other:?}"),
            }
        }
    }

    #[test]
    fn fractional_cpu_fills_exactly() {
        let mut l = ledger();
        l.admit(
            &ids(20, "x").into_iter().take(10).collect::<Vec<_>>(),
            Claim {
                cpu: 0.2,
                memory_bytes: 1,
            },
        )
        .unwrap();
        assert!((l.allocated().cpu - 2.0).abs() < 1e-6);
    }

    #[test]
    fn release_is_idempotent_and_frees() {
        let mut l = ledger();
        let c = Claim {
            cpu: 1.0,
            memory_bytes: GB,
        };
        l.admit(&ids(2, "a"), c).unwrap();
        l.release("a0");
        l.release("a0");
        assert_eq!(l.allocated().workers, 1);
        l.release("a1");
        assert_eq!(l.allocated(), Allocated::default());
        l.admit(&ids(2, "b"), c).unwrap();
    }
}
