//! TEMPORARY naive placer with the interface of the real one (being written on branch
//! `placement`); replaced at merge.
#![allow(missing_docs)]

use std::collections::BTreeMap;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Amount {
    pub cpu_milli: u64,
    pub memory_bytes: u64,
    pub gpus: u32,
    pub workers: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Strategy {
    BinPack,
    Spread,
}

#[derive(Debug, Clone)]
pub struct Ask<'a> {
    pub n: u32,
    pub per_worker: Amount,
    pub constraints: &'a BTreeMap<String, String>,
    pub strategy: Strategy,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Shortfall(String);

impl std::fmt::Display for Shortfall {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

#[derive(Debug, Clone)]
struct H {
    cap: Amount,
    alloc: Amount,
    labels: BTreeMap<String, String>,
    ok: bool,
}

#[derive(Debug, Default)]
pub struct Placer {
    hosts: BTreeMap<String, H>,
}

impl Placer {
    pub fn new() -> Self {
        Self::default()
    }
    pub fn upsert(
        &mut self,
        name: &str,
        capacity: Amount,
        allocated: Amount,
        labels: BTreeMap<String, String>,
        schedulable: bool,
    ) {
        self.hosts.insert(
            name.to_owned(),
            H {
                cap: capacity,
                alloc: allocated,
                labels,
                ok: schedulable,
            },
        );
    }
    pub fn remove(&mut self, name: &str) {
        self.hosts.remove(name);
    }
    pub fn place(&self, ask: &Ask<'_>) -> Result<Vec<(String, u32)>, Shortfall> {
        let mut out = Vec::new();
        let mut left = ask.n;
        for (name, h) in &self.hosts {
            if !h.ok
                || !ask
                    .constraints
                    .iter()
                    .all(|(k, v)| h.labels.get(k) == Some(v))
            {
                continue;
            }
            let fit =
                |c: u64, a: u64, w: u64| c.saturating_sub(a).checked_div(w).unwrap_or(u64::MAX);
            let k = fit(h.cap.cpu_milli, h.alloc.cpu_milli, ask.per_worker.cpu_milli)
                .min(fit(
                    h.cap.memory_bytes,
                    h.alloc.memory_bytes,
                    ask.per_worker.memory_bytes,
                ))
                .min(fit(
                    h.cap.gpus.into(),
                    h.alloc.gpus.into(),
                    ask.per_worker.gpus.into(),
                ))
                .min(fit(h.cap.workers.into(), h.alloc.workers.into(), 1));
            let k = k.min(u64::from(left)) as u32;
            if k > 0 {
                out.push((name.clone(), k));
                left -= k;
            }
            if left == 0 {
                return Ok(out);
            }
        }
        Err(Shortfall(format!(
            "fitting hosts have room for {} of {} workers",
            ask.n - left,
            ask.n
        )))
    }
    pub fn len(&self) -> usize {
        self.hosts.len()
    }
    pub fn is_empty(&self) -> bool {
        self.hosts.is_empty()
    }
}
