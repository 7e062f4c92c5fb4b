//! Stopping workers: SIGTERM to every process of a worker, SIGKILL to its cgroup after the
//! grace period.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use berth_core::error::Result;
use berth_core::worker::{Filter, Selector, WorkerRecord, WorkerStatus};
use berth_sys::store::{Op, Table};

use super::events::unavailable;
use super::{Host, Inner};

/// SIGTERM, then SIGKILL of the whole cgroup after `grace`.
pub(super) async fn stop_worker(inner: Arc<Inner>, id: String, grace: Duration) {
    // A worker still starting joins its cgroup shortly; give it a moment so it gets the SIGTERM.
    let start = tokio::time::Instant::now();
    while matches!(
        inner.status(&id),
        Some(WorkerStatus::Pending | WorkerStatus::Starting)
    ) && start.elapsed() < Duration::from_secs(5)
    {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    if inner.status(&id).is_none_or(|s| s.is_terminal()) {
        return;
    }
    {
        let (i, wid) = (inner.clone(), id.clone());
        let _ =
            tokio::task::spawn_blocking(move || i.cgroups.signal_all(&wid, libc::SIGTERM)).await;
    }
    let mut changes = inner.changed.subscribe();
    let deadline = tokio::time::Instant::now() + grace;
    loop {
        changes.borrow_and_update();
        if inner.status(&id).is_none_or(|s| s.is_terminal()) {
            return;
        }
        if tokio::time::Instant::now() >= deadline {
            break;
        }
        tokio::select! {
            _ = changes.changed() => {}
            _ = tokio::time::sleep_until(deadline) => {}
        }
    }
    // Kill until the shim has seen the end (it also kills the rest once the main process dies).
    while inner.status(&id).is_some_and(|s| !s.is_terminal()) {
        let (i, wid) = (inner.clone(), id.clone());
        let _ =
            tokio::task::spawn_blocking(move || i.cgroups.kill_all(&wid, Duration::from_secs(1)))
                .await;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

impl Host {
    /// Stops the selected workers: SIGTERM to every process of each, SIGKILL to the whole cgroup
    /// after `grace`. Returns them once they have ended. Idempotent. A request: the stop is
    /// recorded before any signal, so that a daemon that dies meanwhile finishes it and gives
    /// the workers the end the caller was told; UNAVAILABLE, and nothing signalled, when the
    /// store does not take it.
    pub async fn stop(
        &self,
        sel: Selector,
        grace: Option<Duration>,
        reason: &str,
    ) -> Result<Vec<WorkerRecord>> {
        self.stop_workers(sel, grace, reason, true).await
    }

    /// Stops the selected workers. `request`: record the stop (and wait for it) before any
    /// signal; otherwise the stop follows from a fact already recorded (a session's end) and
    /// goes on whatever the store does.
    pub(super) async fn stop_workers(
        &self,
        sel: Selector,
        grace: Option<Duration>,
        reason: &str,
        request: bool,
    ) -> Result<Vec<WorkerRecord>> {
        let grace = grace.unwrap_or(self.inner.opts.stop_grace);
        let filter = match &sel {
            Selector::Ids(ids) => Filter {
                ids: ids.clone(),
                ..Default::default()
            },
            Selector::Session(s) => Filter {
                session_id: Some(s.clone()),
                ..Default::default()
            },
            Selector::All => Filter::default(),
        };
        let selected: Vec<String> = self
            .inner
            .select(&filter)?
            .into_iter()
            .map(|r| r.id)
            .collect();
        let stoppable =
            |e: &super::Entry| !e.rec.status.is_terminal() && e.rec.stop_reason.is_none();
        // The workers whose stop this request recorded.
        let mut recorded: HashSet<String> = HashSet::new();
        if request {
            let slot = self.inner.slot().await;
            let committed = {
                let st = self.inner.lock();
                let ops: Vec<Op> = selected
                    .iter()
                    .filter_map(|id| st.workers.get(id))
                    .filter(|e| stoppable(e))
                    .map(|e| {
                        let mut r = e.rec.clone();
                        r.stop_reason = Some(reason.to_owned());
                        recorded.insert(r.id.clone());
                        Op::put(Table::Workers, &r.id, &r)
                    })
                    .collect();
                (!ops.is_empty())
                    .then(|| slot.map(|s| s.commit(ops)))
                    .flatten()
            };
            if let Some(c) = committed {
                c.durable().await.map_err(unavailable)?;
            }
        }
        // Memory follows, and the store gets each record again as memory has it now: a worker
        // that changed (or ended) since the commit must not keep the committed copy.
        let slot = self.inner.slot().await;
        let to_stop: Vec<String> = {
            let mut st = self.inner.lock();
            let mut to_stop = Vec::new();
            let mut ops = Vec::new();
            for id in &selected {
                if let Some(e) = st.workers.get_mut(id) {
                    if stoppable(e) {
                        e.rec.stop_reason = Some(reason.to_owned());
                        to_stop.push(id.clone());
                        ops.push(Op::put(Table::Workers, id, &e.rec));
                    } else if recorded.contains(id) {
                        ops.push(Op::put(Table::Workers, id, &e.rec));
                    }
                }
            }
            if let Some(slot) = slot {
                if !ops.is_empty() {
                    slot.submit(ops);
                }
            }
            to_stop
        };
        let mut changes = self.inner.changed.subscribe();
        for id in &to_stop {
            berth_server::spawn_in(
                berth_server::worker_span(id, None),
                stop_worker(self.inner.clone(), id.clone(), grace),
            );
        }
        // Return once all have ended; a worker whose processes cannot be killed (a process in
        // uninterruptible sleep) does not hold the call forever.
        let deadline = tokio::time::Instant::now() + grace + Duration::from_secs(15);
        loop {
            changes.borrow_and_update();
            let snapshot = self.inner.records(&selected);
            if snapshot.iter().all(|w| w.status.is_terminal())
                || tokio::time::Instant::now() >= deadline
            {
                // The ends the caller is told are durable first where the store allows; the
                // writer goes on writing them when it does not (and a request's recorded stop
                // gives them the same end after a restart meanwhile).
                if let Some(store) = &self.inner.store {
                    if let Err(e) = store.commit(Vec::new()).await {
                        tracing::warn!(error = %e, "ends of stopped workers not yet durable");
                    }
                }
                return Ok(snapshot);
            }
            tokio::select! {
                _ = changes.changed() => {}
                _ = tokio::time::sleep_until(deadline) => {}
            }
        }
    }
}
