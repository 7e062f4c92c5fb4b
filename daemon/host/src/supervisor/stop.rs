//! Stopping workers: SIGTERM to every process of a worker, SIGKILL to its cgroup after the
//! grace period.

use std::sync::Arc;
use std::time::Duration;

use berth_core::error::Result;
use berth_core::worker::{Filter, Selector, WorkerRecord, WorkerStatus};

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
    /// after `grace`. Returns them once they have ended. Idempotent.
    pub async fn stop(
        &self,
        sel: Selector,
        grace: Option<Duration>,
        reason: &str,
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
        let mut to_stop = Vec::new();
        {
            let mut st = self.inner.lock();
            for id in &selected {
                if let Some(e) = st.workers.get_mut(id) {
                    if !e.rec.status.is_terminal() && e.rec.stop_reason.is_none() {
                        e.rec.stop_reason = Some(reason.to_owned());
                        to_stop.push(id.clone());
                    }
                }
            }
        }
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
                return Ok(snapshot);
            }
            tokio::select! {
                _ = changes.changed() => {}
                _ = tokio::time::sleep_until(deadline) => {}
            }
        }
    }
}
