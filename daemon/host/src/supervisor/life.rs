//! A worker's life after its spawn: following its shim to the end, the final record, what it
//! held given back, and ON_FAILURE restarts.

use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::io::unix::AsyncFd;
use tokio::io::AsyncReadExt;

use berth_core::error::Result;
use berth_core::launch;
use berth_core::worker::{final_state, Exit, WorkerRecord, WorkerStatus};
use berth_sys::launcher::{self, ShimHandle, ShimSpec};
use berth_sys::output;

use super::Inner;

/// When a worker's last run started and ended, as its shim recorded them; `None` where no shim
/// said (it never ran, left no exit record, or is an older shim).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(super) struct RunTimes {
    pub(super) started_at: Option<SystemTime>,
    pub(super) finished_at: Option<SystemTime>,
}

/// Writes the end of a worker into its record.
pub(super) fn finalize_record(
    rec: &mut WorkerRecord,
    status: WorkerStatus,
    reason: String,
    exit: &Exit,
    times: RunTimes,
    stats: berth_sys::cgroup::CgroupStats,
) {
    // Usage of earlier runs (restarts) adds up; peaks take the maximum.
    let earlier_cpu = if rec.restarts > 0 {
        rec.cpu_seconds
    } else {
        0.0
    };
    rec.status = status;
    rec.reason = reason;
    rec.exit_code = exit.exit_code;
    rec.signal = exit.signal;
    let finished_at = times.finished_at.unwrap_or_else(SystemTime::now);
    // The shim's own start time is the truth: a worker re-adopted after a restart of the daemon
    // had only an estimate until now.
    if let Some(s) = times.started_at {
        rec.started_at = Some(s);
    }
    // Without the shim's times (an older shim, a lost exit record), the start was stamped by the
    // daemon and may lie after an end stamped elsewhere.
    if rec.started_at.is_some_and(|s| s > finished_at) {
        rec.started_at = Some(finished_at);
    }
    rec.finished_at = Some(finished_at);
    rec.cpu_seconds = earlier_cpu + stats.cpu_seconds;
    rec.memory_peak_bytes = rec.memory_peak_bytes.max(stats.memory_peak_bytes);
}

/// How a worker is found when its life task takes it up.
pub(super) enum Run {
    /// A shim this daemon has just started.
    Spawned(ShimHandle),
    /// A live shim found at start-up, with a pidfd on it.
    Adopted { shim_pid: u32, pidfd: OwnedFd },
    /// A shim that ended before anyone watched it: its exit record is in the worker's directory.
    Ended,
    /// Processes left in the worker's cgroup whose shim is gone.
    Orphan,
    /// To be started again after this delay (ON_FAILURE).
    RestartIn(Duration),
}

/// What comes after a worker's run, as [`Inner::finish`] decided it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[must_use = "a restart must be started"]
pub(super) enum Next {
    Done,
    Restart(Duration),
}

/// Starts the task that owns worker `id`'s life from `run` on (in the worker's tracing span).
pub(super) fn spawn_life(inner: &Arc<Inner>, id: String, session: Option<&str>, run: Run) {
    let span = berth_server::worker_span(&id, session);
    berth_server::spawn_in(span, life(inner.clone(), id, run));
}

/// One worker's life, owned by one task: wait for the end of its run, record it, and start it
/// again after its back-off for as long as its restart policy says so.
async fn life(inner: Arc<Inner>, id: String, mut run: Run) {
    loop {
        let next = match run {
            Run::Spawned(handle) => {
                let end = follow_worker(&inner, &id, handle).await;
                inner
                    .clone()
                    .finish_as(&id, end.exit, end.times, end.lost)
                    .await
            }
            Run::Adopted { shim_pid, pidfd } => {
                let end = await_shim(&inner, &id, shim_pid, pidfd, None).await;
                inner
                    .clone()
                    .finish_as(&id, end.exit, end.times, end.lost)
                    .await
            }
            Run::Ended => {
                let (exit, times) = exit_from_files(&inner, &id).await;
                inner.clone().finish(&id, exit, times).await
            }
            Run::Orphan => watch_orphan(&inner, &id).await,
            Run::RestartIn(delay) => match restart(&inner, &id, delay).await {
                Some(handle) => {
                    run = Run::Spawned(handle);
                    continue;
                }
                None => return,
            },
        };
        match next {
            Next::Done => return,
            Next::Restart(delay) => run = Run::RestartIn(delay),
        }
    }
}

/// How a run of a worker ended, as its shim told or, where the shim died, as its death tells.
struct RunEnd {
    exit: Exit,
    times: RunTimes,
    /// The shim died without an exit record: the worker's end is unknown (LOST, for this
    /// reason).
    lost: Option<String>,
}

/// How long a shim may take to say whether its worker started. A start takes milliseconds; a
/// shim stuck before its handshake (in the kernel, on a cgroup write) is killed after this, and
/// its worker did not start.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(60);

/// Follows one run of a worker from its shim's handshake to its end; returns how it ended.
async fn follow_worker(inner: &Arc<Inner>, id: &str, handle: ShimHandle) -> RunEnd {
    let shim_pid = handle.pid;
    let Ok(hs) = tokio::time::timeout(HANDSHAKE_TIMEOUT, read_handshake(handle.handshake)).await
    else {
        let why = format!(
            "no handshake from the shim within {} s",
            HANDSHAKE_TIMEOUT.as_secs()
        );
        inner.metrics.spawn_failures.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(worker = %id, shim = shim_pid, "{why}; killing the shim");
        if let Err(e) = launcher::pidfd_kill(handle.pidfd.as_fd(), libc::SIGKILL) {
            tracing::warn!(worker = %id, shim = shim_pid, error = %e, "shim not killed");
        }
        // Its end is awaited (and its worker's cgroup killed by `finish_as`); the worker never
        // ran as far as this daemon knows.
        let _ = await_shim(inner, id, shim_pid, handle.pidfd, Some(why.clone())).await;
        return RunEnd {
            exit: Exit {
                spawn_error: Some(why),
                ..Default::default()
            },
            times: RunTimes::default(),
            lost: None,
        };
    };
    match &hs {
        Ok(hs) => {
            crate::phase!("running", id);
            let admitted = inner.lock().workers.get(id).map(|e| e.admitted);
            if let Some(a) = admitted {
                inner.metrics.observe_latency(a.elapsed());
            }
            inner
                .metrics
                .workers_started
                .fetch_add(1, Ordering::Relaxed);
            inner
                .update(id, |w| {
                    w.status = WorkerStatus::Running;
                    w.pid = Some(hs.pid);
                    w.started_at = Some(hs.started_at.unwrap_or_else(SystemTime::now));
                })
                .await;
        }
        Err(msg) => {
            inner.metrics.spawn_failures.fetch_add(1, Ordering::Relaxed);
            tracing::info!(worker = %id, error = %msg, "worker did not start");
        }
    }
    await_shim(inner, id, shim_pid, handle.pidfd, hs.err()).await
}

/// How long the daemon waits, after a shim ended without an exit record, for its parent (a
/// zygote) to reap it so that the kernel can tell how it ended.
const SHIM_REAP_WAIT: Duration = Duration::from_secs(1);

/// Waits for the shim of worker `id` to exit; returns the end its exit record tells. Used for
/// shims this daemon started and for shims it re-adopted after a restart. A shim that left no
/// record (killed, crashed) died: the worker, which may still run, is LOST with how the shim
/// ended (its cgroup is killed by `finish_as` before that end is recorded).
async fn await_shim(
    inner: &Arc<Inner>,
    id: &str,
    shim_pid: u32,
    pidfd: OwnedFd,
    handshake_error: Option<String>,
) -> RunEnd {
    // SAFETY: the OwnedFd is moved into the AsyncFd, which owns it until dropped, so the fd
    // stays open and refers to the same pidfd for the AsyncFd's whole life.
    let registered =
        unsafe { AsyncFd::register_with_interest(pidfd, tokio::io::Interest::READABLE) };
    let pidfd = match registered {
        Ok(fd) => {
            let _ = fd.readable().await;
            crate::phase!("shim_exited", id);
            Some(fd.into_inner())
        }
        Err(e) => {
            // Without a pollable pidfd, poll the pid.
            tracing::warn!(worker = %id, error = ?e, "pidfd not pollable; polling");
            while std::path::Path::new(&format!("/proc/{shim_pid}")).exists()
                && !is_zombie(shim_pid)
            {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            None
        }
    };
    let dir = inner.worker_dir(id);
    let read = tokio::task::spawn_blocking(move || {
        let reaped = launcher::reap(shim_pid);
        let rec = launcher::read_exit(&dir);
        let status = match rec {
            Ok(Some(_)) => None,
            _ => reaped.or_else(|| {
                launcher::exit_status(shim_pid, pidfd.as_ref().map(|f| f.as_fd()), SHIM_REAP_WAIT)
            }),
        };
        (rec, status)
    })
    .await;
    let (rec, status) = match read {
        Ok((rec, status)) => (Ok(rec), status),
        Err(e) => (Err(e), None),
    };
    if matches!(rec, Ok(Ok(None))) {
        let signalled = status.is_some_and(|s| libc::WIFSIGNALED(s));
        // A shim that said why its worker did not start ended as it should; any other end
        // without a record is a death.
        if handshake_error.is_none() || signalled {
            let why = shim_death(status);
            tracing::warn!(worker = %id, shim = shim_pid, reason = %why, "shim died without an exit record; its worker is lost");
            return RunEnd {
                exit: Exit::default(),
                times: RunTimes::default(),
                lost: Some(why),
            };
        }
    }
    let missing = handshake_error.unwrap_or_else(|| "shim exited without an exit record".into());
    let (exit, times) = outcome_of(rec, missing);
    RunEnd {
        exit,
        times,
        lost: None,
    }
}

/// The reason of a worker whose shim ended with wait status `status` (`None`: not known) and
/// left no exit record.
fn shim_death(status: Option<i32>) -> String {
    match status {
        Some(s) if libc::WIFSIGNALED(s) => format!("shim died (signal {})", libc::WTERMSIG(s)),
        Some(s) if libc::WIFEXITED(s) => {
            format!("shim died (exit code {})", libc::WEXITSTATUS(s))
        }
        _ => "shim died (exit status unknown)".to_owned(),
    }
}

/// How a worker ended, from its shim's exit record.
pub(super) fn exit_of(r: launcher::ExitRecord) -> (Exit, RunTimes) {
    let times = RunTimes {
        started_at: r.started_at(),
        finished_at: Some(r.finished_at()),
    };
    (
        Exit {
            exit_code: r.exit_code,
            signal: r.signal,
            spawn_error: r.spawn_error,
            ..Default::default()
        },
        times,
    )
}

/// How a worker ended, from an attempt to read its exit record off the async threads;
/// `missing` says why, where the shim left no record.
pub(super) fn outcome_of(
    read: std::result::Result<
        std::io::Result<Option<launcher::ExitRecord>>,
        tokio::task::JoinError,
    >,
    missing: String,
) -> (Exit, RunTimes) {
    let spawn_error = match read {
        Ok(Ok(Some(r))) => return exit_of(r),
        Ok(Ok(None)) => missing,
        Ok(Err(e)) => format!("exit record unreadable: {e}"),
        Err(e) => format!("exit record: {e}"),
    };
    (
        Exit {
            spawn_error: Some(spawn_error),
            ..Default::default()
        },
        RunTimes::default(),
    )
}

pub(super) fn is_zombie(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            s.rsplit_once(')')
                .is_some_and(|(_, r)| r.trim_start().starts_with('Z'))
        })
        .unwrap_or(true)
}

pub(super) async fn read_handshake(
    fd: std::os::fd::OwnedFd,
) -> Result<launcher::Handshake, String> {
    let mut rx = tokio::net::unix::pipe::Receiver::from_owned_fd(fd)
        .map_err(|e| format!("handshake pipe: {e}"))?;
    let mut buf = Vec::with_capacity(64);
    let mut chunk = [0u8; 256];
    loop {
        match rx.read(&mut chunk).await {
            Ok(0) => break,
            Ok(n) => {
                buf.extend_from_slice(&chunk[..n]);
                if buf.contains(&b'\n') || buf.len() > 4096 {
                    break;
                }
            }
            Err(e) => return Err(format!("handshake read: {e}")),
        }
    }
    launcher::parse_handshake(&String::from_utf8_lossy(&buf))
}

/// The end of worker `id` from the exit record its shim left.
async fn exit_from_files(inner: &Arc<Inner>, id: &str) -> (Exit, RunTimes) {
    let dir = inner.worker_dir(id);
    let rec = tokio::task::spawn_blocking(move || launcher::read_exit(&dir)).await;
    outcome_of(rec, "shim exited without an exit record".into())
}

/// Follows a worker whose shim is gone: it is over when its cgroup is empty.
async fn watch_orphan(inner: &Arc<Inner>, id: &str) -> Next {
    loop {
        let (i, wid) = (inner.clone(), id.to_owned());
        let empty = tokio::task::spawn_blocking(move || i.cgroups.pids(&wid).is_empty())
            .await
            .unwrap_or(true);
        if empty {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // One final record, LOST (unless it was stopped): no watcher ever sees another end first.
    inner
        .clone()
        .finish_as(
            id,
            Exit::default(),
            RunTimes::default(),
            Some("ended unsupervised; exit status unknown".to_owned()),
        )
        .await
}

/// Starts worker `id` again after `delay` (ON_FAILURE), in a fresh cgroup, same output streams;
/// returns its new shim, or none when it is not to run again (stopped meanwhile, or its start
/// failed: then it has been finished).
async fn restart(inner: &Arc<Inner>, id: &str, delay: Duration) -> Option<ShimHandle> {
    tokio::select! {
        _ = tokio::time::sleep(delay) => {}
        // Shutting down: the record stays PENDING and the next daemon restarts it.
        _ = inner.shutdown.cancelled() => return None,
    }
    let rec = inner.lock().workers.get(id).map(|e| e.rec.clone())?;
    if rec.stop_reason.is_some() {
        inner
            .clone()
            .not_started(id, "stopped before it restarted".into())
            .await;
        return None;
    }
    let dir = inner.worker_dir(id);
    let job_inner = inner.clone();
    let jid = id.to_owned();
    let res = tokio::task::spawn_blocking(move || {
        let bytes =
            std::fs::read(dir.join(launcher::SPEC_FILE)).map_err(|e| format!("read spec: {e}"))?;
        let spec: ShimSpec =
            serde_json::from_slice(&bytes).map_err(|e| format!("read spec: {e}"))?;
        let _ = std::fs::remove_file(dir.join(launcher::EXIT_FILE));
        let _ = std::fs::remove_file(dir.join(launcher::STARTED_FILE));
        // The namespace outlives a restart; after a reboot or a crash of an earlier daemon it
        // may be gone, and is made again with the worker's address.
        let net_exists = spec.netns.is_some() && job_inner.net.exists(&jid);
        let mut job = job_inner.spawn_job(&rec, spec, net_exists);
        job_inner.spawn_one(&mut job, None)
    })
    .await
    .unwrap_or_else(|e| Err(format!("restart task: {e}")));
    match res {
        Ok(handle) => {
            inner
                .update(id, |w| {
                    w.status = WorkerStatus::Starting;
                    w.shim_pid = Some(handle.pid);
                    w.shim_starttime = handle.starttime;
                    w.exit_code = None;
                    w.signal = None;
                })
                .await;
            Some(handle)
        }
        Err(msg) => {
            inner.clone().not_started(id, msg).await;
            None
        }
    }
}

impl Inner {
    /// Removes worker `id`'s network namespace (its veth and route go with it) and frees its
    /// address. Idempotent.
    pub(super) async fn release_network(self: &Arc<Self>, id: &str, own_namespace: bool) {
        if own_namespace {
            let inner = self.clone();
            let nid = id.to_owned();
            let removed = tokio::task::spawn_blocking(move || inner.net.remove(&nid)).await;
            if let Ok(Err(e)) = removed {
                tracing::warn!(worker = %id, error = %e, "network namespace not removed");
            }
        }
        self.lock().ips.release(id);
    }

    /// Ends worker `id`, whose program did not start (`why`); such a worker is never restarted.
    pub(super) async fn not_started(self: Arc<Self>, id: &str, why: String) {
        let exit = Exit {
            spawn_error: Some(why),
            ..Default::default()
        };
        let next = self.finish(id, exit, RunTimes::default()).await;
        debug_assert_eq!(next, Next::Done, "a spawn error is never restarted");
    }

    /// Ends worker `id`'s run: reads its usage, removes its cgroup, and either records its end
    /// and frees what it held, or (ON_FAILURE) keeps both for the restart it returns.
    pub(super) async fn finish(self: Arc<Self>, id: &str, exit: Exit, times: RunTimes) -> Next {
        self.finish_as(id, exit, times, None).await
    }

    /// [`Inner::finish`]; `lost`: the end is not known (no exit record), the worker is LOST for
    /// this reason unless it was stopped, and never restarted.
    pub(super) async fn finish_as(
        self: Arc<Self>,
        id: &str,
        mut exit: Exit,
        times: RunTimes,
        lost: Option<String>,
    ) -> Next {
        let inner = self.clone();
        let cid = id.to_owned();
        let (stats, dropped) = tokio::task::spawn_blocking(move || {
            let stats = inner.cgroups.stats(&cid);
            if let Err(e) = inner.cgroups.kill_all(&cid, Duration::from_secs(10)) {
                tracing::warn!(worker = %cid, error = %e, "worker processes survived the kill");
            }
            if let Err(e) = inner.cgroups.remove(&cid) {
                tracing::warn!(worker = %cid, error = %e, "cgroup not removed");
            }
            (stats, output::dropped_bytes(&inner.worker_dir(&cid)))
        })
        .await
        .unwrap_or_default();
        crate::phase!("cgroup_removed", id);
        self.note_dropped_output(id, dropped);
        exit.oom_killed = stats.oom_kills > 0;
        let known = self.lock().workers.contains_key(id);
        if !known {
            {
                let mut st = self.lock();
                st.ledger.release(id);
                st.gpus.release(id);
            }
            self.release_network(id, true).await;
            return Next::Done;
        }
        // Restart (the worker keeps its claim, namespace and address) or end.
        let restart_or_end = {
            let mut guard = self.lock();
            let st = &mut *guard;
            let Some(e) = st.workers.get_mut(id) else {
                // Workers are only forgotten once ended: nothing is held any more.
                return Next::Done;
            };
            let (status, reason) = final_state(&exit, e.rec.stop_reason.as_deref());
            if status == WorkerStatus::Failed
                && lost.is_none()
                && exit.spawn_error.is_none()
                && e.rec.restart.should_restart(e.rec.restarts)
                && !self.shutdown.is_cancelled()
            {
                // ON_FAILURE: same worker, same claim, after an exponential back-off.
                e.rec.restarts += 1;
                let delay = e.rec.restart.backoff(e.rec.restarts);
                e.rec.status = WorkerStatus::Pending;
                e.rec.reason = format!(
                    "{reason}; restart {} of {} in {} ms",
                    e.rec.restarts,
                    e.rec.restart.max_restarts,
                    delay.as_millis()
                );
                e.rec.exit_code = exit.exit_code;
                e.rec.signal = exit.signal;
                e.rec.pid = None;
                e.rec.cpu_seconds += stats.cpu_seconds;
                e.rec.memory_peak_bytes = e.rec.memory_peak_bytes.max(stats.memory_peak_bytes);
                Err((delay, e.rec.reason.clone()))
            } else {
                Ok(e.rec.network)
            }
        };
        let network = match restart_or_end {
            Ok(network) => network,
            Err((delay, reason)) => {
                tracing::info!(worker = %id, reason = %reason, "worker failed; restarting");
                self.publish(id).await;
                return Next::Restart(delay);
            }
        };
        // Everything is given back before the worker is seen to have ended, so whoever sees the
        // end (an await, a watch) can count on its namespace, address and claim being free.
        self.release_network(id, network != launch::NetworkMode::Host)
            .await;
        crate::phase!("net_released", id);
        let rec = {
            let mut guard = self.lock();
            let st = &mut *guard;
            st.ledger.release(id);
            st.gpus.release(id);
            let Some(e) = st.workers.get_mut(id) else {
                return Next::Done;
            };
            // Read again: a stop may have come while the network went.
            let (status, reason) = match (final_state(&exit, e.rec.stop_reason.as_deref()), lost) {
                ((WorkerStatus::Stopped, r), _) => (WorkerStatus::Stopped, r),
                (_, Some(why)) => (WorkerStatus::Lost, why),
                (end, None) => end,
            };
            finalize_record(&mut e.rec, status, reason, &exit, times, stats);
            e.rec.clone()
        };
        tracing::info!(worker = %id, status = rec.status.as_str(), reason = %rec.reason, "worker ended");
        if self.publish(id).await.is_none() {
            // Forgotten by retention meanwhile (its record's delete is queued): watchers still
            // hear of the end, and nothing writes the record back.
            self.announce(rec);
        }
        crate::phase!("published", id);
        Next::Done
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(ms: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_millis(ms)
    }

    #[test]
    fn a_shims_death_is_told_by_its_wait_status() {
        assert_eq!(shim_death(Some(libc::SIGKILL)), "shim died (signal 9)");
        assert_eq!(shim_death(Some(3 << 8)), "shim died (exit code 3)");
        assert_eq!(shim_death(None), "shim died (exit status unknown)");
    }

    #[test]
    fn the_shims_times_are_the_record_s() {
        // (start the daemon had, shim's start, shim's end) → (start, end) recorded.
        type Case = (Option<u64>, Option<u64>, Option<u64>, (Option<u64>, u64));
        let cases: &[Case] = &[
            // From the handshake, confirmed by the exit record.
            (Some(100), Some(100), Some(500), (Some(100), 500)),
            // Re-adopted after a restart: the daemon's estimate gives way to the shim's time.
            (Some(900), Some(100), Some(500), (Some(100), 500)),
            // Re-adopted, never had a start: the exit record brings it.
            (None, Some(100), Some(500), (Some(100), 500)),
            // An older shim (no start in its record): an estimate after the end is held to it.
            (Some(900), None, Some(500), (Some(500), 500)),
            (Some(100), None, Some(500), (Some(100), 500)),
            // Never ran.
            (None, None, Some(500), (None, 500)),
        ];
        for &(had, shim_start, shim_end, (start, end)) in cases {
            let mut rec = WorkerRecord::pending("w".into(), "h".into(), at(50));
            rec.started_at = had.map(at);
            let times = RunTimes {
                started_at: shim_start.map(at),
                finished_at: shim_end.map(at),
            };
            finalize_record(
                &mut rec,
                WorkerStatus::Succeeded,
                "exited with code 0".into(),
                &Exit::default(),
                times,
                Default::default(),
            );
            assert_eq!(
                (rec.started_at, rec.finished_at),
                (start.map(at), Some(at(end))),
                "{had:?} {shim_start:?} {shim_end:?}"
            );
        }
    }
}
