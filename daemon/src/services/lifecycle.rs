//! The parts of a worker's life that span more than one request or more than one daemon:
//! sessions and their leases, ON_FAILURE restarts, retention of ended workers, and re-adoption
//! of workers after a restart of the daemon.

use std::collections::HashSet;

use super::*;
use crate::sys::store::{BadRecord, OpenReport, Store};

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
    pub bad_records: Vec<BadRecord>,
}

/// How to pick up one worker at start-up.
enum Pickup {
    Keep,
    Adopt { shim_pid: u32 },
    Finish(Exit, RunTimes),
    Orphan,
    Respawn,
    Lost(String),
}

impl Inner {
    /// NOT_FOUND unless `id` is an open session.
    pub(super) fn check_session(&self, id: &str) -> Result<()> {
        self.lock_open_session(id).map(drop)
    }

    /// The sessions, locked, if `id` is open: it stays open while the guard is held. Take the
    /// state lock only after this one, never the other way round.
    pub(super) fn lock_open_session(
        &self,
        id: &str,
    ) -> Result<MutexGuard<'_, HashMap<String, Session>>> {
        let sessions = self.sessions();
        match sessions.get(id) {
            Some(s) if s.is_open(SystemTime::now()) => Ok(sessions),
            _ => Err(Error::NotFound(format!("session {id} not found or ended"))),
        }
    }

    /// NOT_FOUND unless this daemon knows session `id`: open, or ended with its workers (or its
    /// end) still kept. Call without the state lock held.
    pub(super) fn check_known_session(&self, id: &str) -> Result<()> {
        let recorded = self.sessions().contains_key(id);
        if recorded {
            return Ok(());
        }
        // A session whose record is gone (a store recovered from the workers' own files) is
        // still known by the workers launched into it.
        let st = self.lock();
        if st
            .workers
            .values()
            .any(|e| e.rec.session_id.as_deref() == Some(id))
        {
            return Ok(());
        }
        Err(Error::NotFound(format!(
            "session_id: session {id} not found"
        )))
    }

    fn sessions(&self) -> MutexGuard<'_, HashMap<String, Session>> {
        self.sessions.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Host {
    /// Opens a session whose lease lasts `ttl_seconds` (0: the default 30 s), under `id` when
    /// given (a scheduler opens one session id on every host it places on). A session of that id
    /// that is still open is renewed instead.
    pub async fn open_session(
        &self,
        ttl_seconds: u32,
        labels: BTreeMap<String, String>,
        id: Option<String>,
    ) -> Result<Session> {
        if let Some(id) = &id {
            if self.inner.sessions().contains_key(id) {
                return self.keep_alive(id);
            }
        }
        let s = Session::open(
            id.unwrap_or_else(crate::core::new_id),
            ttl_seconds,
            labels,
            SystemTime::now(),
        )?;
        if let Some(store) = &self.inner.store {
            store
                .commit(vec![Op::put(Table::Sessions, &s.id, &s)])
                .await
                .map_err(|e| Error::Internal(format!("state store: {e}")))?;
        }
        self.inner.sessions().insert(s.id.clone(), s.clone());
        tracing::info!(session = %s.id, ttl_s = s.ttl.as_secs(), "session opened");
        Ok(s)
    }

    /// Renews a session's lease; NOT_FOUND once it has ended.
    pub fn keep_alive(&self, id: &str) -> Result<Session> {
        let now = SystemTime::now();
        let s = {
            let mut sessions = self.inner.sessions();
            let s = sessions
                .get_mut(id)
                .filter(|s| s.is_open(now))
                .ok_or_else(|| Error::NotFound(format!("session {id} not found or ended")))?;
            s.renew(now);
            s.clone()
        };
        if let Some(store) = &self.inner.store {
            store.submit(vec![Op::put(Table::Sessions, &s.id, &s)]);
        }
        Ok(s)
    }

    /// Ends a session and stops all its workers (reason `session ended`).
    pub async fn close_session(
        &self,
        id: &str,
        grace: Option<Duration>,
    ) -> Result<Vec<WorkerRecord>> {
        // A lease that lapsed a moment ago, before the expiry task saw it, still ends here.
        let ended = self
            .inner
            .sessions()
            .get_mut(id)
            .and_then(|s| s.end(SystemTime::now()).then(|| s.clone()));
        let Some(s) = ended else {
            return Err(Error::NotFound(format!("session {id} not found or ended")));
        };
        self.end_session(&s, grace).await
    }

    /// Records the end of session `s` (ended already in memory) and stops its workers. The
    /// ended session stays known, in memory and in the store, while its workers are kept.
    async fn end_session(&self, s: &Session, grace: Option<Duration>) -> Result<Vec<WorkerRecord>> {
        if let Some(store) = &self.inner.store {
            store.submit(vec![Op::put(Table::Sessions, &s.id, s)]);
        }
        tracing::info!(session = %s.id, "session ended");
        self.stop(Selector::Session(s.id.clone()), grace, "session ended")
            .await
    }

    /// Starts the background duties: session expiry and retention of ended workers.
    pub fn start_background(&self) {
        let host = self.clone();
        crate::services::spawn_in(tracing::info_span!("session_expiry"), async move {
            host.expire_sessions().await
        });
        let host = self.clone();
        crate::services::spawn_in(tracing::info_span!("retention"), async move {
            host.sweep_finished().await
        });
    }

    async fn expire_sessions(&self) {
        loop {
            let now = SystemTime::now();
            let expired: Vec<Session> = {
                let mut sessions = self.inner.sessions();
                sessions
                    .values_mut()
                    .filter(|s| s.ended_at.is_none() && s.expired(now))
                    .filter_map(|s| s.end(now).then(|| s.clone()))
                    .collect()
            };
            for s in expired {
                tracing::info!(session = %s.id, "session lease lapsed");
                let host = self.clone();
                let span = tracing::info_span!("session_end", session = %s.id);
                crate::services::spawn_in(span, async move {
                    let _ = host.end_session(&s, None).await;
                });
            }
            let next = {
                let sessions = self.inner.sessions();
                sessions
                    .values()
                    .filter(|s| s.ended_at.is_none())
                    .map(|s| s.expires_at.duration_since(now).unwrap_or_default())
                    .min()
                    .unwrap_or(Duration::from_secs(1))
                    .clamp(Duration::from_millis(50), Duration::from_secs(1))
            };
            tokio::select! {
                _ = tokio::time::sleep(next) => {}
                _ = self.inner.shutdown.cancelled() => return,
            }
        }
    }

    async fn sweep_finished(&self) {
        loop {
            tokio::select! {
                _ = tokio::time::sleep(self.inner.opts.retention_sweep) => {}
                _ = self.inner.shutdown.cancelled() => return,
            }
            self.forget_finished().await;
        }
    }

    /// Forgets ended workers past their retention, with their records and files.
    pub async fn forget_finished(&self) -> usize {
        let now = SystemTime::now();
        let doomed: Vec<String> = {
            let mut st = self.inner.lock();
            let mut ended: Vec<(u64, String, Option<SystemTime>)> = st
                .workers
                .values()
                .filter(|e| e.rec.status.is_terminal())
                .map(|e| (e.seq, e.rec.id.clone(), e.rec.finished_at))
                .collect();
            ended.sort();
            let excess = ended
                .len()
                .saturating_sub(self.inner.opts.retain_finished_max);
            let doomed: Vec<String> = ended
                .iter()
                .enumerate()
                .filter(|(i, (_, _, fin))| {
                    *i < excess
                        || fin.is_some_and(|f| {
                            now.duration_since(f).unwrap_or_default()
                                >= self.inner.opts.retain_finished_for
                        })
                })
                .map(|(_, (_, id, _))| id.clone())
                .collect();
            for id in &doomed {
                st.workers.remove(id);
            }
            doomed
        };
        let forgotten_sessions = self.forget_ended_sessions(now);
        if let Some(store) = &self.inner.store {
            let ops: Vec<Op> = doomed
                .iter()
                .map(|id| Op::delete(Table::Workers, id))
                .chain(
                    forgotten_sessions
                        .iter()
                        .map(|id| Op::delete(Table::Sessions, id)),
                )
                .collect();
            if !ops.is_empty() {
                store.submit(ops);
            }
        }
        if doomed.is_empty() {
            return 0;
        }
        let dirs: Vec<PathBuf> = doomed.iter().map(|id| self.inner.worker_dir(id)).collect();
        let _ = tokio::task::spawn_blocking(move || {
            for d in dirs {
                let _ = std::fs::remove_dir_all(d);
            }
        })
        .await;
        tracing::info!(count = doomed.len(), "forgot ended workers past retention");
        doomed.len()
    }

    /// Forgets ended sessions that no kept worker belongs to any more, once they ended longer
    /// than the retention of ended workers ago, or beyond as many as ended workers are kept
    /// (oldest first). Returns their ids.
    fn forget_ended_sessions(&self, now: SystemTime) -> Vec<String> {
        let in_use: HashSet<String> = {
            let st = self.inner.lock();
            st.workers
                .values()
                .filter_map(|e| e.rec.session_id.clone())
                .collect()
        };
        let opts = &self.inner.opts;
        let mut sessions = self.inner.sessions();
        let mut idle: Vec<(SystemTime, String)> = sessions
            .values()
            .filter(|s| !in_use.contains(&s.id))
            .filter_map(|s| s.ended_at.map(|e| (e, s.id.clone())))
            .collect();
        idle.sort();
        let excess = idle.len().saturating_sub(opts.retain_finished_max);
        let doomed: Vec<String> = idle
            .into_iter()
            .enumerate()
            .filter(|(i, (_, id))| {
                *i < excess
                    || sessions
                        .get(id)
                        .is_some_and(|s| s.forgettable(now, opts.retain_finished_for))
            })
            .map(|(_, (_, id))| id)
            .collect();
        for id in &doomed {
            sessions.remove(id);
        }
        doomed
    }

    /// Rebuilds the daemon's view at start-up from the state store, the workers' own files
    /// (spec and exit records), the live shims and the cgroups: live workers are re-adopted
    /// (their shims kept capturing output all along), workers that ended meanwhile get their
    /// real exit status, and nothing alive is killed or forgotten silently.
    pub async fn recover(&self, store: &Store) -> Result<RecoveryReport> {
        let (records, bad) = store
            .load::<WorkerRecord>(Table::Workers)
            .map_err(|e| Error::Internal(e.to_string()))?;
        let (sessions, bad_sessions) = store
            .load::<Session>(Table::Sessions)
            .map_err(|e| Error::Internal(e.to_string()))?;
        let inner = self.inner.clone();
        let plan = tokio::task::spawn_blocking(move || inner.plan_recovery(records))
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
                    let span = crate::services::worker_span(&id, rec.session_id.as_deref());
                    self.inner.publish(rec);
                    match spawn::pidfd_open(shim_pid as i32) {
                        Ok(fd) => {
                            let inner = self.inner.clone();
                            crate::services::spawn_in(
                                span,
                                await_shim(inner, id, shim_pid, fd, None),
                            );
                        }
                        // It ended between the scan and now: its exit record is there.
                        Err(_) => {
                            let inner = self.inner.clone();
                            crate::services::spawn_in(span, async move {
                                finish_from_files(inner, id).await
                            });
                        }
                    }
                }
                Pickup::Finish(exit, at) => {
                    report.ended_while_down += 1;
                    self.inner.clone().finish(&id, exit, at).await;
                }
                Pickup::Orphan => {
                    let span = crate::services::worker_span(&id, rec.session_id.as_deref());
                    self.inner.publish(rec);
                    crate::services::spawn_in(span, watch_orphan(self.inner.clone(), id));
                }
                Pickup::Respawn => {
                    let span = crate::services::worker_span(&id, rec.session_id.as_deref());
                    self.inner.publish(rec);
                    crate::services::spawn_in(
                        span,
                        restart_later(self.inner.clone(), id, Duration::ZERO),
                    );
                }
                Pickup::Lost(reason) => {
                    report.lost += 1;
                    let inner = self.inner.clone();
                    let cg = inner.cgroups.worker(&id);
                    let _ = tokio::task::spawn_blocking(move || {
                        let _ = cg.kill_all(Duration::from_secs(5));
                        let _ = cg.remove();
                    })
                    .await;
                    self.inner.update(&id, |w| {
                        w.status = WorkerStatus::Lost;
                        w.reason = reason;
                        w.finished_at.get_or_insert_with(SystemTime::now);
                    });
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
                crate::services::spawn_in(span, async move {
                    let _ = host.end_session(&s, None).await;
                });
            }
        }
        Ok(report)
    }
}

impl Host {
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

/// Reason prefix of workers found without any record.
pub const UNACCOUNTED: &str = "unaccounted for";

/// Opens the state store under `state_dir`, logging what it found.
pub fn open_store(state_dir: &Path) -> std::result::Result<Store, crate::sys::store::StoreError> {
    let (store, report) = Store::open(&state_dir.join("state.redb"))?;
    match report {
        OpenReport::Created => tracing::info!("state store created"),
        OpenReport::Opened => tracing::info!("state store opened"),
        OpenReport::Replaced { moved_to, error } => tracing::error!(
            moved_to = %moved_to.display(),
            error = %error,
            "state store unreadable: moved aside; recovering workers from their own files"
        ),
    }
    Ok(store)
}

/// Live `berth-shim` processes serving worker dirs under `workers_dir`, by worker id. A shim
/// works in its worker's directory; one from before that rule names it as its argument.
fn scan_shims(workers_dir: &Path) -> HashMap<String, (u32, Option<u64>)> {
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

impl Inner {
    /// Decides, for every worker found anywhere, how to pick it up (blocking: reads /proc, files
    /// and cgroups).
    fn plan_recovery(&self, records: Vec<(String, WorkerRecord)>) -> Vec<(WorkerRecord, Pickup)> {
        let workers_dir = self.opts.state_dir.join("workers");
        let shims = scan_shims(&workers_dir);
        let mut known: HashMap<String, WorkerRecord> = records.into_iter().collect();
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
            if crate::core::is_valid_id(&id) && seen.insert(id.clone()) {
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
            let exit = shim::read_exit(&dir).ok().flatten();
            let cg = self.cgroups.worker(&id);
            let pickup = match (shim, exit) {
                (Some(pid), _) => Pickup::Adopt { shim_pid: pid },
                (None, Some(r)) => {
                    let (exit, at) = exit_of(r);
                    Pickup::Finish(exit, at)
                }
                (None, None) if !cg.pids().is_empty() => Pickup::Orphan,
                (None, None) if rec.status == WorkerStatus::Pending && rec.restarts > 0 => {
                    Pickup::Respawn
                }
                (None, None) => {
                    Pickup::Lost("ended while berthd was down; exit status unknown".into())
                }
            };
            let mut rec = rec;
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
                        rec.pid = cg.pids().into_iter().min().map(|p| p as u32);
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
    fn record_from_spec(&self, id: &str, dir: &Path) -> Option<WorkerRecord> {
        let bytes = std::fs::read(dir.join(shim::SPEC_FILE)).ok()?;
        let spec: ShimSpec = serde_json::from_slice(&bytes).ok()?;
        let mut rec: WorkerRecord = serde_json::from_value(spec.meta).ok()?;
        if rec.id != id {
            return None;
        }
        rec.status = WorkerStatus::Starting;
        Some(rec)
    }

    /// A record for a worker cgroup or shim that nothing else accounts for: listed, not killed.
    fn unaccounted_record(&self, id: &str) -> WorkerRecord {
        let cg = self.cgroups.worker(id);
        let pids = cg.pids();
        WorkerRecord {
            status: WorkerStatus::Starting,
            pid: pids.into_iter().min().map(|p| p as u32),
            reason: format!("{UNACCOUNTED}: found in its cgroup without a record"),
            ..WorkerRecord::pending(id.to_owned(), self.opts.name.clone(), SystemTime::now())
        }
    }
}

/// Ends worker `id` from the exit record its shim left.
async fn finish_from_files(inner: Arc<Inner>, id: String) {
    let dir = inner.worker_dir(&id);
    let rec = tokio::task::spawn_blocking(move || shim::read_exit(&dir)).await;
    let (exit, at) = outcome_of(rec, "shim exited without an exit record".into());
    inner.finish(&id, exit, at).await;
}

/// Follows a worker whose shim is gone: it is over when its cgroup is empty.
async fn watch_orphan(inner: Arc<Inner>, id: String) {
    let cg = inner.cgroups.worker(&id);
    loop {
        let c = cg.clone();
        let empty = tokio::task::spawn_blocking(move || c.pids().is_empty())
            .await
            .unwrap_or(true);
        if empty {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let stop = inner
        .lock()
        .workers
        .get(&id)
        .and_then(|e| e.rec.stop_reason.clone());
    let reason = "ended unsupervised; exit status unknown".to_owned();
    inner
        .clone()
        .finish(
            &id,
            Exit {
                spawn_error: None,
                ..Default::default()
            },
            RunTimes::default(),
        )
        .await;
    if stop.is_none() {
        inner.update(&id, |w| {
            w.status = WorkerStatus::Lost;
            w.reason = reason;
        });
    }
}

/// Starts worker `id` again after `delay` (ON_FAILURE), in a fresh cgroup, same output streams.
pub(super) fn restart_later(
    inner: Arc<Inner>,
    id: String,
    delay: Duration,
) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>> {
    // Boxed: restart → follow → finish → restart is a cycle the compiler cannot size.
    Box::pin(restart_after(inner, id, delay))
}

async fn restart_after(inner: Arc<Inner>, id: String, delay: Duration) {
    tokio::select! {
        _ = tokio::time::sleep(delay) => {}
        // Shutting down: the record stays PENDING and the next daemon restarts it.
        _ = inner.shutdown.cancelled() => return,
    }
    let Some(rec) = inner.lock().workers.get(&id).map(|e| e.rec.clone()) else {
        return;
    };
    if rec.stop_reason.is_some() {
        let exit = Exit {
            spawn_error: Some("stopped before it restarted".into()),
            ..Default::default()
        };
        inner.finish(&id, exit, RunTimes::default()).await;
        return;
    }
    let dir = inner.worker_dir(&id);
    let job_inner = inner.clone();
    let jid = id.clone();
    let res = tokio::task::spawn_blocking(move || {
        let bytes =
            std::fs::read(dir.join(shim::SPEC_FILE)).map_err(|e| format!("read spec: {e}"))?;
        let spec: ShimSpec =
            serde_json::from_slice(&bytes).map_err(|e| format!("read spec: {e}"))?;
        let _ = std::fs::remove_file(dir.join(shim::EXIT_FILE));
        // The namespace outlives a restart; after a reboot or a crash of an earlier daemon it
        // may be gone, and is made again with the worker's address.
        let net = match (spec.netns.is_some(), rec.ip_address) {
            (false, _) => None,
            (true, _) if job_inner.net.exists(&jid) => None,
            (true, Some(IpAddr::V4(ip))) => Some(WorkerNet::Routed { ip }),
            (true, _) => Some(WorkerNet::Isolated),
        };
        let mut job = SpawnJob {
            net,
            pending: None,
            id: jid,
            shim: spec,
            limits: Limits {
                cpu: rec.cpu,
                memory_bytes: rec.memory_bytes,
                pids_max: job_inner.opts.pids_max,
                denied_devices: job_inner.denied_devices(&rec.gpu_uuids),
            },
        };
        job_inner.spawn_one(&mut job, None)
    })
    .await
    .unwrap_or_else(|e| Err(format!("restart task: {e}")));
    match res {
        Ok(handle) => {
            inner.update(&id, |w| {
                w.status = WorkerStatus::Starting;
                w.shim_pid = Some(handle.pid);
                w.shim_starttime = handle.starttime;
                w.exit_code = None;
                w.signal = None;
            });
            follow_worker(inner, id, handle).await;
        }
        Err(msg) => {
            let exit = Exit {
                spawn_error: Some(msg),
                ..Default::default()
            };
            inner.finish(&id, exit, RunTimes::default()).await;
        }
    }
}
