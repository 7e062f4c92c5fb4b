//! What clients ask of the workers without changing them: list, await, watch subscriptions.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use berth_core::error::{Error, Result};
use berth_core::worker::{Filter, WorkerRecord, WorkerStatus};
use berth_sys::output;

use super::{AwaitOutcome, Entry, Host, Inner, State};

/// NOT_FOUND for the first of `ids` this daemon does not know.
pub(super) fn check_ids(st: &State, ids: &[String]) -> Result<()> {
    match ids.iter().find(|id| !st.workers.contains_key(*id)) {
        Some(missing) => Err(Error::NotFound(format!("worker {missing} not found"))),
        None => Ok(()),
    }
}

impl Host {
    /// Workers matching `filter`, oldest first, with live usage for those still running.
    pub async fn list(&self, filter: &Filter) -> Result<Vec<WorkerRecord>> {
        let mut recs = self.inner.select(filter)?;
        let running: Vec<String> = recs
            .iter()
            .filter(|r| !r.status.is_terminal() && r.status != WorkerStatus::Pending)
            .map(|r| r.id.clone())
            .collect();
        if !running.is_empty() {
            let inner = self.inner.clone();
            let usage = tokio::task::spawn_blocking(move || {
                running
                    .into_iter()
                    .map(|id| {
                        let s = inner.cgroups.stats(&id);
                        // A stat of one sparse file: how much output the shim had to drop.
                        let dropped = output::dropped_bytes(&inner.worker_dir(&id));
                        (id, (s, dropped))
                    })
                    .collect::<HashMap<_, _>>()
            })
            .await
            .map_err(|e| Error::Internal(format!("read usage: {e}")))?;
            let gpu_memory = self.inner.gpu_memory_by_worker();
            for r in &mut recs {
                if let Some((s, dropped)) = usage.get(&r.id) {
                    r.cpu_seconds = s.cpu_seconds;
                    r.memory_peak_bytes = s.memory_peak_bytes;
                    r.gpu_memory_used_bytes = gpu_memory.get(&r.id).copied().unwrap_or(0);
                    if *dropped > r.output_dropped_bytes {
                        r.output_dropped_bytes = *dropped;
                        self.inner.note_dropped_output(&r.id, *dropped);
                    }
                }
            }
        }
        Ok(recs)
    }

    /// Waits until every selected worker has ended (or runs, with `completion` false), or until
    /// `timeout`. Every selected worker ends up in exactly one list of the outcome.
    pub async fn await_workers(
        &self,
        ids: Vec<String>,
        session_id: Option<String>,
        completion: bool,
        timeout: Option<Duration>,
    ) -> Result<AwaitOutcome> {
        let mut changes = self.inner.changed.subscribe();
        let filter = Filter {
            session_id,
            ids,
            ..Default::default()
        };
        let selected: Vec<String> = self
            .inner
            .select(&filter)?
            .into_iter()
            .map(|r| r.id)
            .collect();
        let deadline = timeout.map(|t| tokio::time::Instant::now() + t);
        let reached = |w: &WorkerRecord| {
            if completion {
                w.status == WorkerStatus::Succeeded
            } else {
                matches!(w.status, WorkerStatus::Running | WorkerStatus::Succeeded)
            }
        };
        loop {
            changes.borrow_and_update();
            let snapshot = self.inner.records(&selected);
            let settled = snapshot
                .iter()
                .all(|w| reached(w) || w.status.is_terminal());
            let timed_out = deadline.is_some_and(|d| tokio::time::Instant::now() >= d);
            if settled || timed_out || self.inner.shutdown.is_cancelled() {
                let (reached, failures) = snapshot.into_iter().partition(|w| reached(w));
                return Ok(AwaitOutcome { reached, failures });
            }
            let wait = changes.changed();
            let cancelled = self.inner.shutdown.cancelled();
            match deadline {
                Some(d) => {
                    tokio::select! {
                        _ = wait => {}
                        _ = tokio::time::sleep_until(d) => {}
                        _ = cancelled => {}
                    }
                }
                None => {
                    tokio::select! {
                        _ = wait => {}
                        _ = cancelled => {}
                    }
                }
            }
        }
    }

    /// Current records of the workers matching `filter` (no live usage).
    pub fn snapshot(&self, filter: &Filter) -> Result<Vec<WorkerRecord>> {
        self.inner.select(filter)
    }

    /// NOT_FOUND where `filter` names a worker or a session this daemon does not know, as
    /// [`Host::snapshot`] would say, without copying the records.
    pub fn check_filter(&self, filter: &Filter) -> Result<()> {
        self.inner.check_filter(filter)
    }
}

impl Inner {
    /// Workers matching `filter`, in launch order. NOT_FOUND for an id or a session this daemon
    /// does not know (an ended session is known while its workers are kept).
    pub(super) fn select(&self, filter: &Filter) -> Result<Vec<WorkerRecord>> {
        if let Some(s) = &filter.session_id {
            self.check_known_session(s)?;
        }
        let st = self.lock();
        check_ids(&st, &filter.ids)?;
        let mut v: Vec<(&Entry, WorkerRecord)> = if filter.ids.is_empty() {
            st.workers
                .values()
                .filter(|e| filter.matches(&e.rec))
                .map(|e| (e, e.rec.clone()))
                .collect()
        } else {
            // A lookup per named id, rather than every worker against every id.
            let rest = Filter {
                session_id: filter.session_id.clone(),
                ids: Vec::new(),
                statuses: filter.statuses.clone(),
                owner: filter.owner.clone(),
            };
            let mut seen = HashSet::new();
            filter
                .ids
                .iter()
                .filter(|id| seen.insert(id.as_str()))
                .filter_map(|id| st.workers.get(id))
                .filter(|e| rest.matches(&e.rec))
                .map(|e| (e, e.rec.clone()))
                .collect()
        };
        v.sort_by_key(|(e, _)| e.seq);
        Ok(v.into_iter().map(|(_, r)| r).collect())
    }

    /// What [`Inner::select`] checks, without copying any record.
    pub(super) fn check_filter(&self, filter: &Filter) -> Result<()> {
        if let Some(s) = &filter.session_id {
            self.check_known_session(s)?;
        }
        check_ids(&self.lock(), &filter.ids)
    }

    pub(super) fn records(&self, ids: &[String]) -> Vec<WorkerRecord> {
        let st = self.lock();
        ids.iter()
            .filter_map(|id| st.workers.get(id).map(|e| e.rec.clone()))
            .collect()
    }

    /// Keeps a running worker's count of dropped output (a live figure, like its usage: not
    /// written to the store until the worker ends) and logs each rise of it.
    pub(super) fn note_dropped_output(&self, id: &str, dropped: u64) {
        let mut st = self.lock();
        let Some(e) = st.workers.get_mut(id) else {
            return;
        };
        if dropped > e.rec.output_dropped_bytes {
            let before = e.rec.output_dropped_bytes;
            e.rec.output_dropped_bytes = dropped;
            drop(st);
            tracing::warn!(worker = %id, dropped_bytes = dropped, new = dropped - before, "worker output dropped (full disk or I/O error)");
        }
    }

    pub(super) fn status(&self, id: &str) -> Option<WorkerStatus> {
        self.lock().workers.get(id).map(|e| e.rec.status)
    }
}
