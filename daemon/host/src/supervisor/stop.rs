//! Stopping workers: SIGTERM to every process of a worker, SIGKILL to its whole cgroup after the
//! grace period, for a bounded time. A stop answers once its workers are gone; a worker that
//! could not be ended is an error that names it and what is left of it, never a success.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use berth_core::error::{Error, Result};
use berth_core::worker::{Filter, Selector, WorkerRecord, WorkerStatus};
use berth_sys::store::{Op, Table};

use super::events::unavailable;
use super::{Host, Inner};

/// How long a stop waits for a worker that is still starting to join its cgroup.
const STARTING_WAIT: Duration = Duration::from_secs(5);

/// How long a stop waits, after its kills, for the shims of the killed workers to record their
/// ends (they drain the output pipes first).
const REPORT_WAIT: Duration = Duration::from_secs(5);

/// How often a stop looks again at a worker whose cgroup is empty but whose end its shim has not
/// reported yet, besides every change of a worker.
const RECHECK: Duration = Duration::from_millis(250);

/// How a stop of one worker ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum StopOutcome {
    /// The worker has ended (whoever ended it).
    Ended,
    /// Its processes survived SIGKILL for the whole kill limit: what the cgroup said.
    Survived(String),
}

/// SIGTERM, then SIGKILL of the whole cgroup after `grace`, for at most the host's kill limit.
pub(super) async fn stop_worker(inner: Arc<Inner>, id: String, grace: Duration) -> StopOutcome {
    let ended = |inner: &Inner| inner.status(&id).is_none_or(|s| s.is_terminal());
    // A worker still starting joins its cgroup shortly; give it a moment so it gets the SIGTERM.
    let start = tokio::time::Instant::now();
    while matches!(
        inner.status(&id),
        Some(WorkerStatus::Pending | WorkerStatus::Starting)
    ) && start.elapsed() < STARTING_WAIT
    {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    if ended(&inner) {
        return StopOutcome::Ended;
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
        if ended(&inner) {
            return StopOutcome::Ended;
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
    // `kill_all` sleeps between its rounds and returns once the cgroup is empty; the shim then
    // drains the output and records the end.
    let give_up = tokio::time::Instant::now() + inner.opts.kill_limit;
    loop {
        changes.borrow_and_update();
        if ended(&inner) {
            return StopOutcome::Ended;
        }
        let left = give_up.saturating_duration_since(tokio::time::Instant::now());
        if left.is_zero() {
            break;
        }
        let (i, wid) = (inner.clone(), id.clone());
        let killed = tokio::task::spawn_blocking(move || i.cgroups.kill_all(&wid, left)).await;
        if let Ok(Err(e)) = killed {
            tracing::debug!(worker = %id, error = %e, "cgroup not empty after its kill");
        }
        let pause = RECHECK.min(give_up.saturating_duration_since(tokio::time::Instant::now()));
        tokio::select! {
            _ = changes.changed() => {}
            _ = tokio::time::sleep(pause) => {}
        }
    }
    let (i, wid) = (inner.clone(), id.clone());
    let left = tokio::task::spawn_blocking(move || {
        berth_sys::host::describe_processes(&i.cgroups.pids(&wid))
    })
    .await
    .unwrap_or_default();
    tracing::warn!(worker = %id, %left, "worker survived SIGKILL; the stop gives up");
    StopOutcome::Survived(left)
}

impl Host {
    /// Stops the selected workers: SIGTERM to every process of each, SIGKILL to the whole cgroup
    /// after `grace`. Returns them once they have ended. Idempotent: a worker whose earlier stop
    /// gave up is killed again. A request: the stop is recorded before any signal, so that a
    /// daemon that dies meanwhile finishes it and gives the workers the end the caller was told;
    /// UNAVAILABLE, and nothing signalled, when the store does not take it.
    ///
    /// Fails with [`Error::Internal`], naming each worker and what is left of it, when a worker
    /// could not be ended within the host's kill limit (a process in uninterruptible sleep that
    /// SIGKILL does not reach), or when processes are left in the cgroup of one that ended.
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
        // A stop not yet recorded for a live worker is recorded before any signal.
        let unrecorded =
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
                    .filter(|e| unrecorded(e))
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
        // that changed (or ended) since the commit must not keep the committed copy. Every live
        // worker is stopped, also one an earlier stop gave up on (its reason stays).
        let slot = self.inner.slot().await;
        let live: Vec<String> = {
            let mut st = self.inner.lock();
            let mut live = Vec::new();
            let mut ops = Vec::new();
            for id in &selected {
                if let Some(e) = st.workers.get_mut(id) {
                    if unrecorded(e) {
                        e.rec.stop_reason = Some(reason.to_owned());
                        ops.push(Op::put(Table::Workers, id, &e.rec));
                    } else if recorded.contains(id) {
                        ops.push(Op::put(Table::Workers, id, &e.rec));
                    }
                    if !e.rec.status.is_terminal() {
                        live.push(id.clone());
                    }
                }
            }
            if let Some(slot) = slot {
                if !ops.is_empty() {
                    slot.submit(ops);
                }
            }
            live
        };
        // Spawned, so that a stop goes on when its caller goes away.
        let stops: Vec<_> = live
            .iter()
            .map(|id| {
                berth_server::spawn_in(
                    berth_server::worker_span(id, None),
                    stop_worker(self.inner.clone(), id.clone(), grace),
                )
            })
            .collect();
        let mut survived = Vec::new();
        for (id, stop) in live.iter().zip(stops) {
            if let Ok(StopOutcome::Survived(what)) = stop.await {
                survived.push((id.clone(), what));
            }
        }
        // The killed workers' shims record their ends; workers whose stop gave up are not waited
        // for again.
        let mut changes = self.inner.changed.subscribe();
        let deadline = tokio::time::Instant::now() + REPORT_WAIT;
        let snapshot = loop {
            changes.borrow_and_update();
            let snapshot = self.inner.records(&selected);
            let waiting = snapshot
                .iter()
                .any(|w| !w.status.is_terminal() && !survived.iter().any(|(id, _)| *id == w.id));
            if !waiting || tokio::time::Instant::now() >= deadline {
                break snapshot;
            }
            tokio::select! {
                _ = changes.changed() => {}
                _ = tokio::time::sleep_until(deadline) => {}
            }
        };
        // Nothing of a stopped worker may be left: not a live worker, not a process in the
        // cgroup of one that ended (its shim and the daemon kill that too, but may fail).
        let mut failures = Vec::new();
        for w in snapshot.iter().filter(|w| live.contains(&w.id)) {
            if let Some((_, what)) = survived.iter().find(|(id, _)| *id == w.id) {
                failures.push(format!(
                    "worker {} could not be ended (still {}): {what} left in its cgroup after \
                     {:?} of SIGKILL",
                    w.id,
                    w.status.as_str(),
                    self.inner.opts.kill_limit
                ));
                continue;
            }
            let (i, wid) = (self.inner.clone(), w.id.clone());
            let pids = tokio::task::spawn_blocking(move || i.cgroups.pids(&wid))
                .await
                .unwrap_or_default();
            if !w.status.is_terminal() {
                failures.push(format!(
                    "worker {} has not ended ({}) {REPORT_WAIT:?} after its kill",
                    w.id,
                    w.status.as_str()
                ));
            } else if !pids.is_empty() {
                failures.push(format!(
                    "worker {} ended ({}) but {} left in its cgroup",
                    w.id,
                    w.status.as_str(),
                    berth_sys::host::describe_processes(&pids)
                ));
            }
        }
        // The ends the caller is told are durable first where the store allows; the writer goes
        // on writing them when it does not (and a request's recorded stop gives them the same
        // end after a restart meanwhile).
        if let Some(store) = &self.inner.store {
            if let Err(e) = store.commit(Vec::new()).await {
                tracing::warn!(error = %e, "ends of stopped workers not yet durable");
            }
        }
        if failures.is_empty() {
            Ok(snapshot)
        } else {
            Err(Error::Internal(failures.join("; ")))
        }
    }
}
