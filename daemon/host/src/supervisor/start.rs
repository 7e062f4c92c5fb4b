//! Admission and start of a launch: the checks that need the host (interpreters, scripts,
//! workdir, GPUs, addresses), the records, and the spawns of every worker's shim.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::{Instant, SystemTime};

use berth_core::admission::Claim;
use berth_core::batch;
use berth_core::error::{Error, Result};
use berth_core::launch::{self, LaunchSpec, Program, WorkerIdentity};
use berth_core::limits;
use berth_core::worker::{WorkerRecord, WorkerStatus};
use berth_sys::cgroup::Limits;
use berth_sys::host as hostfs;
use berth_sys::launcher::{self, ShimHandle, ShimSpec};
use berth_sys::netns::{PendingNet, WorkerNet};
use berth_sys::store::{Op, Table};

use super::events::unavailable;
use super::life::{spawn_life, Run};
use super::pool::{self, Slot};
use super::{Entry, Host, Inner, LaunchAs};

/// What a launch resolved to on this host.
pub(super) struct Prepared {
    pub(super) program: PathBuf,
    pub(super) argv: Vec<String>,
    /// Code the interpreter reads from [`launch::SOURCE_PATH`] rather than its command line.
    pub(super) source: Option<String>,
    pub(super) workdir: PathBuf,
    pub(super) base_env: BTreeMap<String, String>,
}

pub(super) struct SpawnJob {
    pub(super) id: String,
    pub(super) shim: ShimSpec,
    pub(super) limits: Limits,
    /// The network namespace to make before the shim starts; `None` for a worker in the host's
    /// namespace, or one whose namespace exists already (a restart).
    pub(super) net: Option<WorkerNet>,
    /// That network, already being made by the namespace threads.
    pub(super) pending: Option<PendingNet>,
}

/// What is left to find on the filesystem once a launch's argv is known.
enum Target {
    /// `command[0]`, to look up in `PATH`.
    Command(String),
    /// A kernel's interpreter, and its script to check.
    Kernel {
        interpreter: PathBuf,
        script: Option<PathBuf>,
    },
}

/// A script must be a regular file the worker's user can read.
fn check_script(path: &Path) -> Result<()> {
    match std::fs::metadata(path) {
        Ok(m) if m.is_file() && access(path, libc::R_OK) => Ok(()),
        Ok(m) if !m.is_file() => Err(Error::FailedPrecondition(format!(
            "script {}: is not a regular file",
            path.display()
        ))),
        Ok(_) => Err(Error::FailedPrecondition(format!(
            "script {}: cannot be read",
            path.display()
        ))),
        Err(e) => Err(Error::FailedPrecondition(format!(
            "script {}: {e}",
            path.display()
        ))),
    }
}

/// Whether this thread's identity (inside `users::as_user`, the worker's user) may access
/// `path` with `mode`.
pub(super) fn access(path: &Path, mode: i32) -> bool {
    berth_sys::users::eaccess(path, mode)
}

impl Host {
    /// Admits and starts the workers of `spec`, all or none. Returns them as admitted (PENDING or
    /// STARTING); they turn RUNNING as their shims report.
    ///
    /// A launch with a `request_id` that the same owner launched within
    /// [`launch::RETRY_WINDOW`] returns that launch's workers as they are now and starts
    /// nothing: a client that retries after a lost answer or a failover launches once.
    pub async fn launch(&self, spec: LaunchSpec, who: LaunchAs) -> Result<Vec<WorkerRecord>> {
        let Some(request_id) = spec.request_id.clone() else {
            return self.launch_new(spec, who).await;
        };
        // A retry that comes while the first is still being admitted waits for it.
        let gate = self
            .inner
            .retries
            .enter((who.owner.clone(), request_id))
            .await;
        if let Some(first) = self.inner.launched_as(gate.key(), spec.n)? {
            tracing::info!(
                request_id = %gate.key().1,
                workers = first.len(),
                "a retried launch gets its first launch's workers"
            );
            return Ok(first);
        }
        self.launch_new(spec, who).await
    }

    async fn launch_new(&self, spec: LaunchSpec, who: LaunchAs) -> Result<Vec<WorkerRecord>> {
        let inner = self.inner.clone();
        // Bounds before work: nothing is made per worker for a launch the host cannot hold.
        let fits = {
            let st = inner.lock();
            let (capacity, used) = (st.ledger.capacity(), st.ledger.allocated());
            limits::check_workers(
                spec.n,
                inner.opts.limits.max_workers_per_launch,
                capacity.workers.saturating_sub(used.workers),
                capacity.workers,
            )
        };
        if let Err(e) = fits {
            inner
                .metrics
                .launch_refusals
                .fetch_add(1, Ordering::Relaxed);
            return Err(e);
        }
        if let Some(s) = &spec.session_id {
            inner.check_session(s)?;
        }
        let caller = who.addr;
        // Filesystem checks are syscalls: off the async threads. They are made as the user the
        // workers run as, so a workdir or script that user cannot enter or read is refused here.
        let mut prepared = {
            let inner = inner.clone();
            let spec = spec.clone();
            let account = who.account.clone();
            tokio::task::spawn_blocking(move || match &account {
                Some(a) if berth_sys::host::is_root() => {
                    berth_sys::users::as_user(a, || inner.prepare(&spec))
                        .map_err(|e| Error::Internal(format!("check as user {}: {e}", a.name)))?
                }
                _ => inner.prepare(&spec),
            })
            .await
            .map_err(|e| Error::Internal(format!("prepare launch: {e}")))??
        };
        crate::phase!("prepared");
        if let Some(a) = &who.account {
            // As a login would: the request's env may still say otherwise.
            for (k, v) in [
                ("HOME", a.home.to_string_lossy().into_owned()),
                ("USER", a.name.clone()),
                ("LOGNAME", a.name.clone()),
            ] {
                prepared.base_env.insert(k.into(), v);
            }
        }
        let creds = who.account.as_ref().map(|a| inner.opts.privileges.creds(a));
        let user = match &who.account {
            Some(a) => a.name.clone(),
            None => berth_sys::host::current_user_name(),
        };
        if spec.network != launch::NetworkMode::Host {
            if let Some(why) = inner.net.unavailable() {
                return Err(Error::FailedPrecondition(format!(
                    "network: workers with their own network cannot run on this host: {why}"
                )));
            }
        }
        let gateway = inner.net.subnet().map(|s| IpAddr::V4(s.gateway()));
        let master_ip = launch::master_ip(
            spec.master_ip,
            caller,
            launch::host_from_worker(spec.network, gateway, inner.opts.host_from_worker),
        );
        let claim = Claim {
            cpu: spec.cpu,
            memory_bytes: spec.memory_bytes,
        };
        // What the warm interpreter pool sees of this launch (see `pool`): the interpreter and
        // its arguments, and the environment a cold start would get (but for the worker's own
        // id and address, which no start-time variable depends on).
        let (pool_kernel, source_args) = match &spec.program {
            Program::Code { kernel, .. } => (Some(kernel.as_str()), 2),
            Program::Script { kernel, .. } => (Some(kernel.as_str()), 1),
            Program::Command(_) => (None, 0),
        };
        let interpreter_args = &prepared.argv[..prepared.argv.len().saturating_sub(source_args)];
        let pool = inner.pool.get().filter(|_| pool_kernel.is_some());
        let pool_env = match pool {
            Some(_) => launch::worker_env(
                &prepared.base_env,
                &spec.env,
                &WorkerIdentity {
                    worker_id: "-",
                    session_id: spec.session_id.as_deref(),
                    master_ip,
                    worker_ip: None,
                    gpu_uuids: &[],
                },
            ),
            None => Vec::new(),
        };
        let pool_ask = berth_core::pool::Ask {
            kernel: pool_kernel.unwrap_or_default(),
            network: spec.network,
            nvidia_gpu: spec.nvidia_gpu,
            code_by_fd: prepared.source.is_some(),
            uid: creds.as_ref().map(|c| c.uid),
            env: &pool_env,
            memory_bytes: spec.memory_bytes,
            interpreter_args,
        };
        let mut slots: Vec<Slot> = Vec::new();
        let mut ids: Vec<String>;
        let now = SystemTime::now();
        // Room for the launch's records in the store's queue, taken before any lock.
        let slot = inner.slot().await;
        let (records, committed) = {
            // The session stays open until the workers are in the table: a close either comes
            // first (the launch is refused) or finds them (and stops them).
            let _session = match &spec.session_id {
                Some(s) => Some(inner.lock_open_session(s)?),
                None => None,
            };
            let mut guard = inner.lock();
            let st = &mut *guard;
            if let Some(pool) = pool {
                slots = pool.take(spec.n as usize, &pool_ask);
            }
            // In id order, so that launch order outlives a restart (a retry answers in it). A
            // pooled worker has had its id since it was made.
            ids = slots
                .iter()
                .map(|s| s.id.clone())
                .chain((slots.len()..spec.n as usize).map(|_| berth_core::new_id()))
                .collect();
            ids.sort_unstable();
            Inner::release_slot_reserves(st, &slots);
            let books = batch::Books {
                ledger: &mut st.ledger,
                gpus: &mut st.gpus,
                ips: &mut st.ips,
            };
            let own_address = spec.network == launch::NetworkMode::Bridge;
            let grant = match batch::admit(books, &ids, claim, spec.nvidia_gpu, own_address) {
                Ok(g) => g,
                Err(e) => {
                    Inner::restore_slot_reserves(st, &slots);
                    if let Some(pool) = pool {
                        pool.put_back(std::mem::take(&mut slots));
                    }
                    inner
                        .metrics
                        .launch_refusals
                        .fetch_add(1, Ordering::Relaxed);
                    return Err(e);
                }
            };
            let ips = grant.ips;
            let mut out = Vec::with_capacity(ids.len());
            for (i, (id, gpu_uuids)) in ids.iter().zip(grant.gpu_uuids).enumerate() {
                st.seq += 1;
                let rec = WorkerRecord {
                    session_id: spec.session_id.clone(),
                    ip_address: ips.get(i).map(|ip| IpAddr::V4(*ip)),
                    cpu: spec.cpu,
                    memory_bytes: spec.memory_bytes,
                    nvidia_gpu: spec.nvidia_gpu,
                    gpu_uuids,
                    kernel: spec.program.kernel().to_owned(),
                    command: prepared.argv.clone(),
                    workdir: prepared.workdir.clone(),
                    network: spec.network,
                    restart: spec.restart,
                    labels: spec.labels.clone(),
                    owner: who.owner.clone(),
                    user: user.clone(),
                    request_id: spec.request_id.clone(),
                    pooled: slots.iter().any(|s| &s.id == id),
                    ..WorkerRecord::pending(id.clone(), inner.opts.name.clone(), now)
                };
                let seq = st.seq;
                st.workers.insert(
                    id.clone(),
                    Entry {
                        rec: rec.clone(),
                        seq,
                        admitted: Instant::now(),
                    },
                );
                out.push(rec);
            }
            let ops = out
                .iter()
                .map(|r| Op::put(Table::Workers, &r.id, r))
                .collect();
            (out, slot.map(|s| s.commit(ops)))
        };
        crate::phase!("admitted");
        // While the records are being made durable: what is not yet a process of the launch.
        // The code file, and each pooled worker's limits and spec; their claims wait for the
        // records (see below).
        let shared_source = match &prepared.source {
            // Code too long for the command line is written once for the whole launch and hard
            // linked into every worker's directory; where that fails, each spec carries it.
            Some(code) => {
                let dirs: Vec<PathBuf> = ids.iter().map(|id| inner.worker_dir(id)).collect();
                let code = code.clone();
                let written = tokio::task::spawn_blocking(move || share_source(&dirs, &code))
                    .await
                    .unwrap_or_else(|e| Err(std::io::Error::other(e.to_string())));
                if let Err(e) = &written {
                    tracing::warn!(error = %e, "code not shared: each worker's spec holds it");
                }
                written.is_ok()
            }
            None => false,
        };
        let mut slot_of: std::collections::HashMap<String, Slot> =
            slots.into_iter().map(|s| (s.id.clone(), s)).collect();
        let mut claims = Vec::new();
        let mut cold = Vec::new();
        for rec in &records {
            let id = &rec.id;
            let identity = WorkerIdentity {
                worker_id: id,
                session_id: spec.session_id.as_deref(),
                master_ip,
                worker_ip: rec.ip_address,
                gpu_uuids: &rec.gpu_uuids,
            };
            let shim = ShimSpec {
                worker_id: id.clone(),
                program: prepared.program.clone(),
                argv: prepared.argv.clone(),
                source: if shared_source {
                    None
                } else {
                    prepared.source.clone()
                },
                source_file: shared_source,
                env: launch::worker_env(&prepared.base_env, &spec.env, &identity),
                workdir: prepared.workdir.clone(),
                cgroup: inner.cgroups.worker(id),
                netns: (rec.network != launch::NetworkMode::Host).then(|| inner.net.path(id)),
                rotation: inner.opts.rotation,
                meta: serde_json::to_value(rec).unwrap_or_default(),
                creds: creds.clone(),
            };
            match (slot_of.remove(id), &creds) {
                (Some(slot), Some(c)) => {
                    let claim = pool::claim_of(
                        c,
                        shim.env.clone(),
                        &prepared.workdir,
                        &prepared.argv,
                        interpreter_args.len(),
                        match &spec.program {
                            Program::Code { code, .. } => Some(code.as_str()),
                            _ => None,
                        },
                        match &spec.program {
                            Program::Script { .. } => prepared.argv.last().map(Path::new),
                            _ => None,
                        },
                    );
                    claims.push((slot, shim, rec.clone(), claim));
                }
                _ => cold.push((rec, shim)),
            }
        }
        // The pooled workers are readied now, on a blocking thread that then waits for the word
        // that the records are durable (true) or refused (false), and only then claims them: a
        // claim right after the commit, with nothing else left to do.
        let (done_tx, mut done) = tokio::sync::mpsc::unbounded_channel();
        let mut tasks = Vec::new();
        let go = if claims.is_empty() {
            None
        } else {
            let (go, durable) = std::sync::mpsc::sync_channel::<bool>(1);
            let inner = inner.clone();
            let done_tx = done_tx.clone();
            tasks.push(tokio::task::spawn_blocking(move || {
                let readied: Vec<_> = claims
                    .into_iter()
                    .map(|(slot, shim, rec, claim)| {
                        let ready = inner.ready_slot(&slot, &shim, &rec);
                        (slot, rec.id, claim, ready)
                    })
                    .collect();
                if durable.recv() != Ok(true) {
                    for (slot, ..) in readied {
                        inner.discard_slot(slot);
                    }
                    return;
                }
                for (slot, id, claim, ready) in readied {
                    let res = ready.and_then(|()| inner.claim_slot(slot, &claim));
                    let _ = done_tx.send((id, res));
                }
            }));
            Some(go)
        };
        // The records are durable before any worker starts: a launch the store refuses has
        // nothing to undo but its admission, and no process of it ever runs.
        if let Some(committed) = committed {
            if let Err(e) = committed.durable().await {
                if let Some(go) = go {
                    let _ = go.send(false);
                }
                for t in tasks {
                    let _ = t.await;
                }
                inner.withdraw(&ids).await;
                tracing::warn!(error = %e, workers = ids.len(), "launch refused: not recorded");
                return Err(unavailable(e));
            }
        }
        if let Some(go) = go {
            let _ = go.send(true);
        }
        crate::phase!("durable");
        inner.metrics.launches.fetch_add(1, Ordering::Relaxed);
        for r in &records {
            inner.announce(r.clone());
        }
        let jobs: Vec<SpawnJob> = cold
            .into_iter()
            .map(|(rec, shim)| inner.spawn_job(rec, shim, false))
            .collect();
        // The namespace threads start on every network of the batch at once; each spawn waits
        // for its own just before it starts the shim.
        let jobs: Vec<SpawnJob> = jobs
            .into_iter()
            .map(|mut j| {
                j.pending = j.net.map(|n| inner.net.begin(&j.id, n));
                j
            })
            .collect();
        // Spread the batch over the CPUs: each spawn is a few syscalls and one posix_spawn.
        let lanes = hostfs::work_lanes().min(jobs.len());
        let mut chunks: Vec<Vec<SpawnJob>> = (0..lanes).map(|_| Vec::new()).collect();
        for (i, j) in jobs.into_iter().enumerate() {
            chunks[i % lanes].push(j);
        }
        // Each worker's start is handled as soon as its shim is spawned, while the other lanes
        // go on: its life task then sees its handshake and its exit at once instead of after the
        // whole batch (a batch of 200 spent a quarter of its time with every started worker
        // unheard).
        let mut not_started = 0usize;
        for chunk in chunks {
            let inner = inner.clone();
            let done_tx = done_tx.clone();
            tasks.push(tokio::task::spawn_blocking(move || {
                inner.spawn_chunk(chunk, |id, res| {
                    let _ = done_tx.send((id, res));
                })
            }));
        }
        drop(done_tx);
        while let Some((id, res)) = done.recv().await {
            match res {
                Ok(handle) => {
                    inner
                        .update(&id, |w| {
                            if w.status == WorkerStatus::Pending {
                                w.status = WorkerStatus::Starting;
                            }
                            w.shim_pid = Some(handle.pid);
                            w.shim_starttime = handle.starttime;
                        })
                        .await;
                    let session = spec.session_id.as_deref();
                    spawn_life(&inner, id, session, Run::Spawned(handle));
                }
                Err(msg) => {
                    inner.metrics.spawn_failures.fetch_add(1, Ordering::Relaxed);
                    inner.clone().not_started(&id, msg).await;
                    not_started += 1;
                }
            }
        }
        for t in tasks {
            t.await
                .map_err(|e| Error::Internal(format!("spawn task: {e}")))?;
        }
        // A worker that did not start is told FAILED once that is durable where the store
        // allows; the launch itself stands either way (its records are durable), and the writer
        // goes on writing the end until it is.
        if not_started > 0 {
            if let Some(store) = &inner.store {
                if let Err(e) = store.commit(Vec::new()).await {
                    tracing::warn!(error = %e, "ends of workers that did not start not yet durable");
                }
            }
        }
        let st = inner.lock();
        Ok(ids
            .iter()
            .filter_map(|id| st.workers.get(id).map(|e| e.rec.clone()))
            .collect())
    }
}

impl Inner {
    /// The workers that `key.0` launched with request id `key.1` within the retry window, in
    /// launch order; `None` when there are none. A retry must ask for as many workers as the
    /// first launch did.
    fn launched_as(&self, key: &(String, String), n: u32) -> Result<Option<Vec<WorkerRecord>>> {
        let now = SystemTime::now();
        let st = self.lock();
        let mut first: Vec<&Entry> = st
            .workers
            .values()
            .filter(|e| {
                e.rec.owner == key.0
                    && e.rec.request_id.as_deref() == Some(key.1.as_str())
                    && now
                        .duration_since(e.rec.created_at)
                        .is_ok_and(|age| age < launch::RETRY_WINDOW)
            })
            .collect();
        if first.is_empty() {
            return Ok(None);
        }
        if first.len() != n as usize {
            return Err(launch::retry_of_another_size(&key.1, first.len(), n));
        }
        first.sort_by(|a, b| (a.rec.created_at, &a.rec.id).cmp(&(b.rec.created_at, &b.rec.id)));
        Ok(Some(first.into_iter().map(|e| e.rec.clone()).collect()))
    }

    /// Takes back the admission of a launch whose records did not become durable: its workers
    /// leave the table and give back what they were granted, as if it had never come.
    async fn withdraw(&self, ids: &[String]) {
        let slot = self.slot().await;
        let mut guard = self.lock();
        let st = &mut *guard;
        for id in ids {
            st.workers.remove(id);
            st.ledger.release(id);
            st.gpus.release(id);
            st.ips.release(id);
        }
        // A request that named them meanwhile (a stop by id) may have queued their records
        // after the failed commit: the deletes come after it.
        if let Some(slot) = slot {
            slot.submit(
                ids.iter()
                    .map(|id| Op::delete(Table::Workers, id))
                    .collect(),
            );
        }
        drop(guard);
        self.changed.send_modify(|v| *v += 1);
    }

    /// The spawn of worker `rec` running `shim`: built here alone, for a launch and for a
    /// restart. `net_exists`: the worker's namespace is there already (a restart keeps it, unless
    /// a reboot took it), so none is made.
    pub(super) fn spawn_job(
        &self,
        rec: &WorkerRecord,
        shim: ShimSpec,
        net_exists: bool,
    ) -> SpawnJob {
        let net = match (rec.network, rec.ip_address) {
            (launch::NetworkMode::Host, _) => None,
            _ if net_exists => None,
            (launch::NetworkMode::Bridge, Some(IpAddr::V4(ip))) => Some(WorkerNet::Routed { ip }),
            _ => Some(WorkerNet::Isolated),
        };
        SpawnJob {
            id: rec.id.clone(),
            shim,
            limits: Limits {
                cpu: rec.cpu,
                memory_bytes: rec.memory_bytes,
                pids_max: self.opts.pids_max,
                denied_devices: self.denied_devices(&rec.gpu_uuids),
            },
            net,
            pending: None,
        }
    }

    /// Resolves the program and checks the host can run it: what it execs must fit the kernel's
    /// exec limits (INVALID_ARGUMENT naming the field otherwise), checked before the filesystem
    /// is looked at; the interpreter, `script`, `command[0]` and `workdir` must be there
    /// (FAILED_PRECONDITION otherwise).
    pub(super) fn prepare(&self, spec: &LaunchSpec) -> Result<Prepared> {
        let workdir = spec
            .workdir
            .clone()
            .unwrap_or_else(|| self.opts.default_workdir.clone());
        let mut base_env = self.opts.base_env.clone();
        base_env.insert("PATH".into(), self.opts.worker_path.clone());
        let (argv, source, target) = self.exec_of(spec, &workdir, &base_env)?;
        match std::fs::metadata(&workdir) {
            Ok(m) if m.is_dir() => {
                if !access(&workdir, libc::X_OK) {
                    return Err(Error::FailedPrecondition(format!(
                        "workdir {}: cannot be entered",
                        workdir.display()
                    )));
                }
            }
            Ok(_) => {
                return Err(Error::FailedPrecondition(format!(
                    "workdir {}: is not a directory",
                    workdir.display()
                )))
            }
            Err(e) => {
                return Err(Error::FailedPrecondition(format!(
                    "workdir {}: {e}",
                    workdir.display()
                )))
            }
        }
        let program = match target {
            Target::Command(name) => {
                let path_var = spec
                    .env
                    .get("PATH")
                    .cloned()
                    .unwrap_or_else(|| self.opts.worker_path.clone());
                hostfs::resolve_program(&name, &path_var, &workdir).ok_or_else(|| {
                    let why = if name.contains('/') {
                        "does not exist or is not executable"
                    } else {
                        "not found in PATH"
                    };
                    Error::FailedPrecondition(format!("command[0] {name}: {why}"))
                })?
            }
            Target::Kernel {
                interpreter,
                script,
            } => {
                if let Some(path) = script {
                    check_script(&path)?;
                }
                interpreter
            }
        };
        Ok(Prepared {
            program,
            argv,
            source,
            workdir,
            base_env,
        })
    }

    /// The argv of `spec`'s workers, the code they read from [`launch::SOURCE_PATH`] (where it
    /// is too long for the command line), and what is left to find on the filesystem; checked
    /// against the kernel's exec limits with the environment `base` and `spec.env` give.
    fn exec_of(
        &self,
        spec: &LaunchSpec,
        workdir: &Path,
        base: &BTreeMap<String, String>,
    ) -> Result<(Vec<String>, Option<String>, Target)> {
        let exec = |argv: &[String], field: &dyn Fn(usize) -> String| {
            limits::check_exec(argv, field, base, &spec.env, self.opts.exec)
        };
        let kernel = match &spec.program {
            Program::Command(cmd) => {
                exec(cmd, &|i| format!("command[{i}]"))?;
                return Ok((cmd.clone(), None, Target::Command(cmd[0].clone())));
            }
            Program::Code { kernel, .. } | Program::Script { kernel, .. } => kernel,
        };
        let entry = self
            .opts
            .kernels
            .iter()
            .find(|k| &k.name == kernel)
            .ok_or_else(|| Error::invalid("kernel", format!("unknown kernel {kernel:?}")))?;
        let inv = entry.invocation.as_ref().ok_or_else(|| {
            Error::FailedPrecondition(format!(
                "kernel {kernel}: interpreter not installed on this host (looked for {})",
                entry.candidates.join(", ")
            ))
        })?;
        let program = match &spec.program {
            Program::Script { kernel, path } if !path.is_absolute() => Program::Script {
                kernel: kernel.clone(),
                path: workdir.join(path),
            },
            other => other.clone(),
        };
        let argv = launch::kernel_argv(inv, &program);
        // The source is the last argument; the rest is the kernel's.
        let last = argv.len() - 1;
        let (source_field, script) = match &program {
            Program::Script { path, .. } => ("script", Some(path.clone())),
            _ => ("code", None),
        };
        let field = |i: usize| if i == last { source_field } else { "kernel" }.to_owned();
        let target = Target::Kernel {
            interpreter: inv.interpreter.clone(),
            script,
        };
        match &program {
            // Code too long for the command line goes by a file descriptor; what fits stays
            // there, where `sys.argv` and `commandArgs()` are what users expect.
            Program::Code { code, .. }
                if code.len() > limits::INLINE_CODE_MAX || exec(&argv, &field).is_err() =>
            {
                let argv = launch::kernel_argv_from_fd(inv);
                exec(&argv, &field)?;
                Ok((argv, Some(code.clone()), target))
            }
            _ => {
                exec(&argv, &field)?;
                Ok((argv, None, target))
            }
        }
    }

    /// Creates cgroups and starts shims for one chunk of a batch (blocking thread), handing
    /// each worker's outcome to `done` as soon as it is known.
    pub(super) fn spawn_chunk(
        &self,
        jobs: Vec<SpawnJob>,
        mut done: impl FnMut(String, Result<ShimHandle, String>),
    ) {
        for mut job in jobs {
            // Always collected, so that a network made for a worker that then does not start is
            // known to exist (finish() removes it).
            let made = job.pending.take().map(PendingNet::wait);
            let stopped = self
                .lock()
                .workers
                .get(&job.id)
                .is_some_and(|e| e.rec.stop_reason.is_some());
            let res = if stopped {
                Err("stopped before it started".into())
            } else {
                self.spawn_one(&mut job, made)
            };
            done(job.id, res);
        }
    }

    /// Makes the worker's network (unless `made` says how that went already), its cgroup, and
    /// starts its shim.
    pub(super) fn spawn_one(
        &self,
        job: &mut SpawnJob,
        made: Option<Result<PathBuf, berth_sys::netns::NetError>>,
    ) -> Result<ShimHandle, String> {
        match (made, job.net) {
            (Some(r), _) => {
                r.map_err(|e| e.to_string())?;
            }
            (None, Some(net)) => {
                self.net.create(&job.id, net).map_err(|e| e.to_string())?;
            }
            (None, None) => {}
        }
        crate::phase!("net", job.id);
        // What this spawn made goes if it fails half-way (finish() removes it again, harmlessly).
        let undo_net = || {
            if job.net.is_some() {
                let _ = self.net.remove(&job.id);
            }
        };
        let cg = match self.cgroups.create(&job.id, &job.limits) {
            Ok(cg) => cg,
            Err(e) => {
                undo_net();
                return Err(e.to_string());
            }
        };
        crate::phase!("cgroup", job.id);
        // The shim joins the directories made, which need not be every hierarchy's.
        job.shim.cgroup = cg.clone();
        let dir = self.worker_dir(&job.id);
        match self.spawner.spawn(&dir, &job.shim) {
            Ok(h) => {
                crate::phase!("spawned", job.id);
                Ok(h)
            }
            Err(e) => {
                let _ = self.cgroups.remove(&job.id);
                undo_net();
                Err(e.to_string())
            }
        }
    }
}

/// Writes `code` once into the first of `dirs` (worker directories, made here) as its
/// [`launcher::SOURCE_FILE`] and hard links it into the others: one copy on disk for a launch.
fn share_source(dirs: &[PathBuf], code: &str) -> std::io::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let Some((first, rest)) = dirs.split_first() else {
        return Ok(());
    };
    std::fs::create_dir_all(first)?;
    let original = first.join(launcher::SOURCE_FILE);
    // Root's alone, as the spec is: the worker reads it through the shim's memfd.
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&original)?
        .write_all(code.as_bytes())?;
    for d in rest {
        std::fs::create_dir_all(d)?;
        let link = d.join(launcher::SOURCE_FILE);
        match std::fs::hard_link(&original, &link) {
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                std::fs::remove_file(&link)?;
                std::fs::hard_link(&original, &link)?;
            }
            r => r?,
        }
    }
    Ok(())
}
