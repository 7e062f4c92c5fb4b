//! Start-up after a daemon restart: re-adopting live workers, giving the right end to those
//! that ended while it was down, and what no record accounts for.

use std::collections::HashMap;
use std::collections::HashSet;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use berth_core::admission::Claim;
use berth_core::error::{Error, Result};
use berth_core::session::{Session, REINSTATED_TTL};
use berth_core::worker::{Exit, WorkerRecord, WorkerStatus};
use berth_sys::host as hostfs;
use berth_sys::launcher::{self, ShimSpec};
use berth_sys::store::Table;
use berth_sys::store::{BadRecord, Op, OpenReport, Store, StoreError};

use super::life::{exit_of, is_zombie, spawn_life, Next, Run, RunTimes};
use super::{Entry, Host, Inner};

/// What recovery found at start-up.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RecoveryReport {
    /// Live workers whose shims were re-adopted.
    pub adopted: usize,
    /// Workers that ended while the daemon was down (their exit records were read).
    pub ended_while_down: usize,
    /// Workers whose end could not be known (no shim, no exit record).
    pub lost: usize,
    /// Worker cgroups or shims that no record accounts for.
    pub unaccounted: usize,
    /// Ended workers kept from before.
    pub kept: usize,
    pub sessions: usize,
    /// Sessions whose record was missing, reinstated for their live workers.
    pub sessions_reinstated: usize,
    /// Live workers that nothing accounts for, stopped because the store was lost.
    pub stopped_unaccounted: usize,
    pub bad_records: Vec<BadRecord>,
}

/// How to pick up one worker at start-up.
pub(super) enum Pickup {
    Keep,
    Adopt { shim_pid: u32 },
    Finish(Exit, RunTimes),
    Orphan,
    Respawn,
    Lost(String),
}

/// Reason prefix of workers found without any record.
pub const UNACCOUNTED: &str = "unaccounted for";

/// Where the records recovery starts from came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreOrigin {
    /// No store existed; a new one was made.
    Created,
    /// The store of the last run.
    Opened,
    /// The store could not be opened and `--recover` moved it aside: every record comes from
    /// the workers' own files.
    Replaced { moved_to: PathBuf },
}

/// Opens the state store under `state_dir`, logging what it found. A store that cannot be
/// opened is an error, never silently replaced: the sessions and records in it would be lost.
/// With `recover` (`berthd --recover`), one that cannot be opened for any reason but another
/// holder is moved aside and a new one made.
pub fn open_store(
    state_dir: &Path,
    recover: bool,
) -> std::result::Result<(Store, StoreOrigin), StoreError> {
    let path = state_dir.join("state.redb");
    let opened = Store::open(&path);
    let (store, origin) = match opened {
        Ok((store, OpenReport::Created)) => (store, StoreOrigin::Created),
        Ok((store, OpenReport::Opened)) => (store, StoreOrigin::Opened),
        Err(e @ StoreError::InUse { .. }) => return Err(e),
        Err(e) if recover && path.exists() => {
            let moved_to = Store::move_aside(&path)?;
            tracing::warn!(
                error = %e,
                moved_to = %moved_to.display(),
                "--recover: the state store could not be opened and was moved aside; \
                 the workers are taken over from their own files"
            );
            let (store, _) = Store::open(&path)?;
            (store, StoreOrigin::Replaced { moved_to })
        }
        Err(e) => return Err(e),
    };
    match &origin {
        StoreOrigin::Created => tracing::info!(path = %path.display(), "state store created"),
        StoreOrigin::Opened => tracing::info!(path = %path.display(), "state store opened"),
        StoreOrigin::Replaced { .. } => {}
    }
    if recover && !matches!(origin, StoreOrigin::Replaced { .. }) {
        tracing::info!("--recover: the state store opened; nothing to move aside");
    }
    Ok((store, origin))
}

/// Live `berth-shim` processes serving worker dirs under `workers_dir`, by worker id. A shim
/// works in its worker's directory; one from before that rule names it as its argument.
pub(super) fn scan_shims(workers_dir: &Path) -> HashMap<String, (u32, Option<u64>)> {
    let mut out = HashMap::new();
    let abs_dir = std::path::absolute(workers_dir).unwrap_or_else(|_| workers_dir.to_path_buf());
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return out;
    };
    for e in rd.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(cmd) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        let mut args = cmd.split(|b| *b == 0);
        let (Some(a0), Some(a1)) = (args.next(), args.next()) else {
            continue;
        };
        if !a0.ends_with(b"berth-shim") {
            continue;
        }
        let dir = std::fs::read_link(format!("/proc/{pid}/cwd"))
            .ok()
            .and_then(|d| Some(workers_dir.join(d.strip_prefix(&abs_dir).ok()?)))
            .unwrap_or_else(|| PathBuf::from(String::from_utf8_lossy(a1).into_owned()));
        if dir.parent() != Some(workers_dir) {
            continue;
        }
        if let Some(id) = dir.file_name().and_then(|n| n.to_str()) {
            if !is_zombie(pid) {
                out.insert(id.to_owned(), (pid, hostfs::process_starttime(pid)));
            }
        }
    }
    out
}

impl Host {
    /// Rebuilds the daemon's view at start-up from the state store, the workers' own files
    /// (spec and exit records), the live shims and the cgroups: live workers are re-adopted
    /// (their shims kept capturing output all along), workers that ended meanwhile get their
    /// real exit status, and nothing alive is killed or forgotten silently.
    ///
    /// No live worker is left without a session or an owner to end it: a worker whose session
    /// has no record gets that session back, reinstated with a lease of
    /// [`REINSTATED_TTL`](berth_core::session::REINSTATED_TTL) that its client renews or lets
    /// lapse; a worker whose stop was recorded is stopped again. Where the store was lost
    /// (`origin` is [`StoreOrigin::Replaced`]), workers with a readable spec are adopted from it
    /// (owner, user, session, claims) and each is logged; a live worker without one (nothing
    /// says whose it is) is stopped and listed.
    pub async fn recover(&self, store: &Store, origin: &StoreOrigin) -> Result<RecoveryReport> {
        let store_lost = matches!(origin, StoreOrigin::Replaced { .. });
        let (records, bad) = store
            .load::<WorkerRecord>(Table::Workers)
            .map_err(|e| Error::Internal(e.to_string()))?;
        let (sessions, bad_sessions) = store
            .load::<Session>(Table::Sessions)
            .map_err(|e| Error::Internal(e.to_string()))?;
        let inner = self.inner.clone();
        let plan = tokio::task::spawn_blocking(move || inner.plan_recovery(records, store_lost))
            .await
            .map_err(|e| Error::Internal(format!("recovery: {e}")))?;
        let mut report = RecoveryReport {
            bad_records: bad.into_iter().chain(bad_sessions).collect(),
            sessions: sessions
                .iter()
                .filter(|(_, s)| s.ended_at.is_none())
                .count(),
            ..Default::default()
        };
        let ended_sessions: Vec<Session> = sessions
            .iter()
            .filter(|(_, s)| s.ended_at.is_some())
            .map(|(_, s)| s.clone())
            .collect();
        {
            let mut ss = self.inner.sessions();
            for (_, s) in sessions {
                ss.insert(s.id.clone(), s);
            }
        }
        let mut plan = plan;
        plan.sort_by_key(|(r, _)| r.created_at);
        let reinstated = self.reinstate_sessions(&plan).await;
        report.sessions_reinstated = reinstated;
        report.sessions += reinstated;
        // Restore every record and claim first, then start following.
        {
            let mut st = self.inner.lock();
            for (rec, pickup) in &plan {
                st.seq += 1;
                let seq = st.seq;
                if !rec.status.is_terminal() && !matches!(pickup, Pickup::Keep | Pickup::Lost(_)) {
                    st.ledger.restore(
                        &rec.id,
                        Claim {
                            cpu: rec.cpu,
                            memory_bytes: rec.memory_bytes,
                        },
                    );
                    if let Some(IpAddr::V4(ip)) = rec.ip_address {
                        if let Err(c) = st.ips.restore(&rec.id, ip) {
                            tracing::warn!(
                                worker = %rec.id,
                                ip = %ip,
                                conflict = ?c,
                                "re-adopted worker's address not restored"
                            );
                        }
                    }
                    let gpus = st.gpus.restore(&rec.id, &rec.gpu_uuids);
                    if !gpus.is_clean() {
                        tracing::warn!(
                            worker = %rec.id,
                            unknown = ?gpus.unknown,
                            held_by_others = ?gpus.conflicts,
                            "re-adopted worker's GPU claims only partly restored"
                        );
                    }
                }
                st.workers.insert(
                    rec.id.clone(),
                    Entry {
                        rec: rec.clone(),
                        seq,
                        admitted: Instant::now(),
                    },
                );
            }
        }
        for (rec, pickup) in plan {
            let id = rec.id.clone();
            if rec.reason.starts_with(UNACCOUNTED) {
                report.unaccounted += 1;
            }
            match pickup {
                Pickup::Keep => report.kept += 1,
                Pickup::Adopt { shim_pid } => {
                    report.adopted += 1;
                    if store_lost && !rec.reason.starts_with(UNACCOUNTED) {
                        tracing::info!(
                            worker = %id,
                            session = rec.session_id.as_deref().unwrap_or(""),
                            owner = %rec.owner,
                            shim_pid,
                            "--recover: worker adopted from its spec"
                        );
                    }
                    let session = rec.session_id.clone();
                    self.inner.publish(&id).await;
                    let run = match launcher::pidfd_open(shim_pid as i32) {
                        Ok(pidfd) => Run::Adopted { shim_pid, pidfd },
                        // It ended between the scan and now: its exit record is there.
                        Err(_) => Run::Ended,
                    };
                    spawn_life(&self.inner, id.clone(), session.as_deref(), run);
                    self.stop_again(&rec, store_lost, &mut report);
                }
                Pickup::Finish(exit, at) => {
                    report.ended_while_down += 1;
                    let session = rec.session_id.clone();
                    if let Next::Restart(delay) = self.inner.clone().finish(&id, exit, at).await {
                        spawn_life(&self.inner, id, session.as_deref(), Run::RestartIn(delay));
                    }
                }
                Pickup::Orphan => {
                    let session = rec.session_id.clone();
                    self.inner.publish(&id).await;
                    spawn_life(&self.inner, id.clone(), session.as_deref(), Run::Orphan);
                    self.stop_again(&rec, store_lost, &mut report);
                }
                Pickup::Respawn => {
                    let session = rec.session_id.clone();
                    // The daemon that died may have made the worker's cgroup (empty: nothing of
                    // the worker runs) before it forked the shim: it is made again.
                    let inner = self.inner.clone();
                    let wid = id.clone();
                    let _ = tokio::task::spawn_blocking(move || inner.cgroups.remove(&wid)).await;
                    self.inner.publish(&id).await;
                    spawn_life(
                        &self.inner,
                        id,
                        session.as_deref(),
                        Run::RestartIn(Duration::ZERO),
                    );
                }
                Pickup::Lost(reason) => {
                    report.lost += 1;
                    let inner = self.inner.clone();
                    let wid = id.clone();
                    let _ = tokio::task::spawn_blocking(move || {
                        let _ = inner.cgroups.kill_all(&wid, Duration::from_secs(5));
                        let _ = inner.cgroups.remove(&wid);
                    })
                    .await;
                    self.inner
                        .update(&id, |w| {
                            w.status = WorkerStatus::Lost;
                            w.reason = reason;
                            w.finished_at.get_or_insert_with(SystemTime::now);
                        })
                        .await;
                }
            }
        }
        self.collect_networks().await;
        // A daemon that died while it stopped an ended session's workers left some running:
        // the end goes on.
        for s in ended_sessions {
            let live = self.inner.lock().workers.values().any(|e| {
                e.rec.session_id.as_deref() == Some(s.id.as_str()) && !e.rec.status.is_terminal()
            });
            if live {
                tracing::info!(session = %s.id, "stopping the workers of a session that ended");
                let host = self.clone();
                let span = tracing::info_span!("session_end", session = %s.id);
                berth_server::spawn_in(span, async move {
                    let _ = host.end_session(&s, None).await;
                });
            }
        }
        Ok(report)
    }

    /// Gives every live worker of `plan` whose session has no record that session back, open
    /// with a lease of [`REINSTATED_TTL`] and the worker's owner, so that it ends when its
    /// client is gone, as any session does. Returns how many were reinstated.
    async fn reinstate_sessions(&self, plan: &[(WorkerRecord, Pickup)]) -> usize {
        let now = self.inner.opts.clock.now();
        let mut reinstated = Vec::new();
        {
            let mut sessions = self.inner.sessions();
            for (rec, pickup) in plan {
                let live =
                    !rec.status.is_terminal() && !matches!(pickup, Pickup::Keep | Pickup::Lost(_));
                let Some(sid) = rec.session_id.as_ref().filter(|_| live) else {
                    continue;
                };
                if sessions.contains_key(sid) {
                    continue;
                }
                let s = Session::reinstated(sid.clone(), rec.owner.clone(), &now);
                tracing::warn!(
                    session = %sid,
                    worker = %rec.id,
                    owner = %rec.owner,
                    lease_s = REINSTATED_TTL.as_secs(),
                    "session without a record reinstated for its live workers: they end unless \
                     its client renews it"
                );
                sessions.insert(sid.clone(), s.clone());
                reinstated.push(s);
            }
        }
        let n = reinstated.len();
        if n > 0 {
            let ops = reinstated
                .iter()
                .map(|s| Op::put(Table::Sessions, &s.id, s))
                .collect();
            // A fact of start-up, like every other record recovery writes.
            self.inner.submit(ops).await;
        }
        n
    }

    /// Stops again a live worker whose stop was recorded (the daemon died before it ended), and,
    /// with the store lost, one that nothing accounts for (`plan_recovery` gave it its stop).
    fn stop_again(&self, rec: &WorkerRecord, store_lost: bool, report: &mut RecoveryReport) {
        let Some(reason) = &rec.stop_reason else {
            return;
        };
        if store_lost && rec.reason.starts_with(UNACCOUNTED) {
            report.stopped_unaccounted += 1;
            tracing::warn!(
                worker = %rec.id,
                pid = rec.pid.unwrap_or(0),
                "--recover: stopping a live worker that nothing accounts for (no record, no \
                 readable spec: no owner or session would ever end it)"
            );
        } else {
            tracing::info!(worker = %rec.id, reason = %reason, "stopping a worker whose stop was recorded");
        }
        berth_server::spawn_in(
            berth_server::worker_span(&rec.id, rec.session_id.as_deref()),
            super::stop::stop_worker(
                self.inner.clone(),
                rec.id.clone(),
                self.inner.opts.stop_grace,
            ),
        );
    }

    /// Removes every worker network namespace that belongs to no live worker: what a crashed
    /// daemon left half-made, and the namespaces of workers that ended while it was down. Their
    /// veths and routes die with them. Returns how many were removed.
    pub async fn collect_networks(&self) -> usize {
        let inner = self.inner.clone();
        let live: HashSet<String> = {
            let st = inner.lock();
            st.workers
                .values()
                .filter(|e| !e.rec.status.is_terminal())
                .map(|e| e.rec.id.clone())
                .collect()
        };
        let removed = tokio::task::spawn_blocking(move || {
            let mut n = 0;
            for id in inner.net.list() {
                if live.contains(&id) {
                    continue;
                }
                match inner.net.remove(&id) {
                    Ok(()) => n += 1,
                    Err(e) => tracing::warn!(worker = %id, error = %e, "stale network namespace not removed"),
                }
            }
            n
        })
        .await
        .unwrap_or(0);
        if removed > 0 {
            tracing::info!(
                count = removed,
                "removed network namespaces of no live worker"
            );
        }
        removed
    }
}

impl Inner {
    /// Decides, for every worker found anywhere, how to pick it up (blocking: reads /proc, files
    /// and cgroups).
    pub(super) fn plan_recovery(
        &self,
        records: Vec<(String, WorkerRecord)>,
        store_lost: bool,
    ) -> Vec<(WorkerRecord, Pickup)> {
        let workers_dir = self.opts.state_dir.join("workers");
        let shims = scan_shims(&workers_dir);
        let mut known: HashMap<String, WorkerRecord> = records.into_iter().collect();
        // What a predecessor's pool left idle goes first: those are no user's workers.
        let pool_gone = self.collect_pool_leftovers(&known, &shims);
        let mut ids: Vec<String> = known.keys().cloned().collect();
        let mut seen: HashSet<String> = ids.iter().cloned().collect();
        let on_disk = std::fs::read_dir(&workers_dir)
            .map(|rd| {
                rd.flatten()
                    .filter_map(|e| e.file_name().into_string().ok())
                    .collect::<Vec<_>>()
            })
            .unwrap_or_default();
        for id in on_disk
            .into_iter()
            .chain(self.cgroups.list())
            .chain(shims.keys().cloned())
        {
            if berth_core::is_valid_id(&id) && !pool_gone.contains(&id) && seen.insert(id.clone()) {
                ids.push(id);
            }
        }
        let mut plan = Vec::new();
        for id in ids {
            let dir = self.worker_dir(&id);
            let rec = match known.remove(&id) {
                Some(r) => r,
                None => match self.record_from_spec(&id, &dir) {
                    Some(r) => r,
                    None => self.unaccounted_record(&id),
                },
            };
            if rec.status.is_terminal() {
                plan.push((rec, Pickup::Keep));
                continue;
            }
            let shim = rec
                .shim_pid
                .filter(|p| {
                    rec.shim_starttime.is_some()
                        && hostfs::process_starttime(*p) == rec.shim_starttime
                        && !is_zombie(*p)
                })
                .or_else(|| shims.get(&id).map(|(p, _)| *p));
            let exit = launcher::read_exit(&dir).ok().flatten();
            let pickup = match (shim, exit) {
                (Some(pid), _) => Pickup::Adopt { shim_pid: pid },
                (None, Some(r)) => {
                    let (exit, at) = exit_of(r);
                    Pickup::Finish(exit, at)
                }
                (None, None) if !self.cgroups.pids(&id).is_empty() => Pickup::Orphan,
                // PENDING with nothing of it anywhere: a restart that was due, or a launch whose
                // records were durable when berthd died before it forked this worker's shim (no
                // shim ever marked it started). Either is started now, from its spec; one whose
                // spec was not even written cannot be, and did not start. A worker whose shim
                // did start and vanished without a trace is LOST, below.
                (None, None)
                    if rec.status == WorkerStatus::Pending
                        && (rec.restarts > 0
                            || (dir.join(launcher::SPEC_FILE).exists()
                                && !dir.join(launcher::STARTED_FILE).exists())) =>
                {
                    Pickup::Respawn
                }
                (None, None)
                    if rec.status == WorkerStatus::Pending
                        && rec.restarts == 0
                        && !dir.join(launcher::STARTED_FILE).exists() =>
                {
                    Pickup::Finish(
                        Exit {
                            spawn_error: Some(
                                "berthd stopped before it started the worker (no spec written)"
                                    .into(),
                            ),
                            ..Default::default()
                        },
                        RunTimes::default(),
                    )
                }
                (None, None) => {
                    Pickup::Lost("ended while berthd was down; exit status unknown".into())
                }
            };
            let mut rec = rec;
            // With the store lost, a live worker whose spec is gone too has no owner and no
            // session that would ever end it: it is stopped.
            if store_lost
                && rec.reason.starts_with(UNACCOUNTED)
                && matches!(pickup, Pickup::Adopt { .. } | Pickup::Orphan)
            {
                rec.stop_reason = Some(format!(
                    "{UNACCOUNTED}: no record and no readable spec after --recover"
                ));
            }
            match &pickup {
                Pickup::Adopt { shim_pid } => {
                    rec.shim_pid = Some(*shim_pid);
                    rec.shim_starttime = hostfs::process_starttime(*shim_pid);
                    if matches!(rec.status, WorkerStatus::Pending | WorkerStatus::Starting) {
                        rec.status = WorkerStatus::Running;
                        // The handshake was lost with the daemon: an estimate, until the exit
                        // record brings the shim's own start time.
                        rec.started_at.get_or_insert_with(SystemTime::now);
                    }
                    if rec.pid.is_none() {
                        rec.pid = self.cgroups.pids(&id).into_iter().min().map(|p| p as u32);
                    }
                }
                Pickup::Orphan => {
                    rec.status = WorkerStatus::Running;
                    if !rec.reason.starts_with(UNACCOUNTED) {
                        rec.reason =
                            "unsupervised: its shim is gone; the exit status will be unknown"
                                .into();
                    }
                }
                _ => {}
            }
            plan.push((rec, pickup));
        }
        plan
    }

    /// A record rebuilt from the worker's spec (the record at launch, kept beside its output).
    pub(super) fn record_from_spec(&self, id: &str, dir: &Path) -> Option<WorkerRecord> {
        let bytes = std::fs::read(dir.join(launcher::SPEC_FILE)).ok()?;
        let spec: ShimSpec = serde_json::from_slice(&bytes).ok()?;
        let mut rec: WorkerRecord = serde_json::from_value(spec.meta).ok()?;
        if rec.id != id {
            return None;
        }
        rec.status = WorkerStatus::Starting;
        Some(rec)
    }

    /// A record for a worker cgroup or shim that nothing else accounts for: listed, not killed.
    pub(super) fn unaccounted_record(&self, id: &str) -> WorkerRecord {
        let pids = self.cgroups.pids(id);
        WorkerRecord {
            status: WorkerStatus::Starting,
            pid: pids.into_iter().min().map(|p| p as u32),
            reason: format!("{UNACCOUNTED}: found in its cgroup without a record"),
            ..WorkerRecord::pending(id.to_owned(), self.opts.name.clone(), SystemTime::now())
        }
    }
}
