//! The host supervisor: admits launches, starts each worker through its shim, follows it to its
//! end, frees what it held, and answers list, await, stop, watch and output requests. It wires
//! the pure core to the sys layer; gRPC types never reach it.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use tokio::io::unix::AsyncFd;
use tokio::io::AsyncReadExt;
use tokio::sync::{broadcast, mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::core::admission::{Capacity, Claim, Ledger};
use crate::core::gpus::GpuLedger;
use crate::core::ipam::Ipam;
use crate::core::launch::{self, KernelInvocation, LaunchSpec, Program, WorkerIdentity};
use crate::core::session::Session;
use crate::core::worker::{final_state, Exit, Filter, Selector, WorkerRecord, WorkerStatus};
use crate::error::{Error, Result};
use crate::sys::cgroup::{CgroupVersion, Cgroups, Limits};
use crate::sys::devbpf::DeviceNode;
use crate::sys::gpu::{self, GpuDevice, GpuMonitor, GpuSample, Gpus, NoGpus};
use crate::sys::host as hostfs;
use crate::sys::netns::{Netns, NoNetwork, PendingNet, WorkerNet};
use crate::sys::output::{self, Rotation, StreamKind};
use crate::sys::shim::{self, ShimSpec};
use crate::sys::spawn::{self, ShimHandle, Spawner};
use crate::sys::store::{Op, StoreWriter, Table};

#[path = "lifecycle.rs"]
mod lifecycle;
pub use lifecycle::{open_store, RecoveryReport, UNACCOUNTED};

/// A kernel of the host's table and what it resolved to at start-up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelEntry {
    pub name: String,
    pub invocation: Option<KernelInvocation>,
    /// What was looked for, for the error when it is missing.
    pub candidates: Vec<String>,
}

/// Everything the supervisor needs to know about its host, resolved at start-up.
#[derive(Debug, Clone)]
pub struct HostOptions {
    pub name: String,
    pub state_dir: PathBuf,
    pub capacity: Capacity,
    pub pids_max: u64,
    pub default_workdir: PathBuf,
    /// `PATH` of workers; also where `command[0]` is looked up.
    pub worker_path: String,
    /// Variables every worker starts with (before the request's).
    pub base_env: BTreeMap<String, String>,
    pub kernels: Vec<KernelEntry>,
    pub rotation: Rotation,
    pub stop_grace: Duration,
    /// Address at which a worker reaches the host (the default `BERTH_MASTER_IP` for a caller on
    /// loopback).
    pub host_from_worker: IpAddr,
    pub subnet: String,
    pub labels: BTreeMap<String, String>,
    /// Ended workers are forgotten (record and files) after this long...
    pub retain_finished_for: Duration,
    /// ...or once more than this many ended workers are kept, oldest first.
    pub retain_finished_max: usize,
    /// How often retention is checked.
    pub retention_sweep: Duration,
}

impl HostOptions {
    /// Options for tests and tools: everything at its default under `state_dir`.
    pub fn with_defaults(name: &str, state_dir: &Path, capacity: Capacity) -> Self {
        Self {
            name: name.to_owned(),
            state_dir: state_dir.to_path_buf(),
            capacity,
            pids_max: 4096,
            default_workdir: PathBuf::from("/"),
            worker_path: "/usr/local/bin:/usr/bin:/bin".into(),
            base_env: BTreeMap::new(),
            kernels: Vec::new(),
            rotation: Rotation {
                segment_bytes: 16 << 20,
                segments: 4,
            },
            stop_grace: Duration::from_secs(10),
            host_from_worker: IpAddr::V4(Ipv4Addr::LOCALHOST),
            subnet: String::new(),
            labels: BTreeMap::new(),
            retain_finished_for: Duration::from_secs(24 * 3600),
            retain_finished_max: 10_000,
            retention_sweep: Duration::from_secs(30),
        }
    }
}

/// Result of an await: every requested worker is in exactly one list.
#[derive(Debug, Clone, Default)]
pub struct AwaitOutcome {
    pub reached: Vec<WorkerRecord>,
    pub failures: Vec<WorkerRecord>,
}

/// One piece of a worker's output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutputPiece {
    pub worker_id: String,
    pub stream: StreamKind,
    pub offset: u64,
    pub data: Vec<u8>,
}

/// A request for output.
#[derive(Debug, Clone, Default)]
pub struct OutputRequest {
    pub ids: Vec<String>,
    pub session_id: Option<String>,
    pub follow: bool,
    pub from_start: bool,
    pub streams: Vec<StreamKind>,
}

/// What `HostInfo` reports.
#[derive(Debug, Clone)]
pub struct HostView {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub capacity: Capacity,
    pub allocated: crate::core::admission::Allocated,
    pub subnet: String,
    pub cgroup_version: CgroupVersion,
    pub kernels: Vec<KernelEntry>,
    pub started_at: SystemTime,
    /// `nvml`, `none` or `fake`.
    pub gpu_backend: &'static str,
    /// Every GPU of the inventory with its latest telemetry and holder.
    pub gpus: Vec<GpuView>,
    pub gpu_capacity: u32,
    pub gpu_allocated: u32,
    /// Worker addresses leased now, and how many the subnet holds.
    pub ip_leases: usize,
    pub ip_capacity: u32,
    /// Network namespaces ready for bridge-mode workers.
    pub netns_ready: usize,
}

/// One GPU as `HostInfo` reports it.
#[derive(Debug, Clone)]
pub struct GpuView {
    pub device: GpuDevice,
    /// Latest telemetry; `None` before the first sample.
    pub sample: Option<GpuSample>,
    /// The worker that holds the GPU.
    pub holder: Option<String>,
    /// Compute processes on the GPU that belong to no live worker of this host.
    pub stray_pids: Vec<u32>,
}

/// Counters behind `/metrics`.
#[derive(Debug, Default)]
pub struct Metrics {
    pub launches: AtomicU64,
    pub launch_refusals: AtomicU64,
    pub workers_started: AtomicU64,
    pub spawn_failures: AtomicU64,
    /// Launch → RUNNING latency histogram: counts per bucket of [`LATENCY_BUCKETS`], then +Inf.
    pub latency_buckets: [AtomicU64; LATENCY_BUCKETS.len() + 1],
    pub latency_sum_us: AtomicU64,
}

/// Upper bounds (seconds) of the launch latency histogram.
pub const LATENCY_BUCKETS: [f64; 10] = [0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 1.0, 5.0];

impl Metrics {
    fn observe_latency(&self, d: Duration) {
        let s = d.as_secs_f64();
        let i = LATENCY_BUCKETS
            .iter()
            .position(|b| s <= *b)
            .unwrap_or(LATENCY_BUCKETS.len());
        self.latency_buckets[i].fetch_add(1, Ordering::Relaxed);
        self.latency_sum_us
            .fetch_add(d.as_micros() as u64, Ordering::Relaxed);
    }
}

struct Entry {
    rec: WorkerRecord,
    seq: u64,
    admitted: Instant,
}

struct State {
    workers: HashMap<String, Entry>,
    ledger: Ledger,
    /// Which worker holds which GPU; claimed and freed together with `ledger`.
    gpus: GpuLedger,
    /// Which bridge-mode worker holds which address; leased and freed with `ledger`.
    ips: Ipam,
    seq: u64,
}

struct Inner {
    opts: HostOptions,
    cgroups: Arc<dyn Cgroups>,
    spawner: Arc<dyn Spawner>,
    gpus: Arc<dyn Gpus>,
    gpu_monitor: GpuMonitor,
    /// Worker network namespaces.
    net: Arc<dyn Netns>,
    /// Durable records; `None` only in tests of the supervisor without a state store.
    store: Option<StoreWriter>,
    sessions: Mutex<HashMap<String, Session>>,
    state: Mutex<State>,
    changed: watch::Sender<u64>,
    events: broadcast::Sender<WorkerRecord>,
    started_at: SystemTime,
    metrics: Metrics,
    shutdown: CancellationToken,
}

/// The host supervisor. Cheap to clone; all clones share one state.
#[derive(Clone)]
pub struct Host {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Host {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Host")
            .field("name", &self.inner.opts.name)
            .finish()
    }
}

/// Largest piece of output sent in one chunk.
const CHUNK: usize = 64 * 1024;

impl Host {
    pub fn new(
        opts: HostOptions,
        cgroups: Arc<dyn Cgroups>,
        spawner: Arc<dyn Spawner>,
        store: Option<StoreWriter>,
    ) -> Self {
        Self::with_gpus(
            opts,
            cgroups,
            spawner,
            store,
            Arc::new(NoGpus),
            GpuMonitor::idle(),
        )
    }

    /// A supervisor of a host with `gpus`, whose telemetry `monitor` samples.
    pub fn with_gpus(
        opts: HostOptions,
        cgroups: Arc<dyn Cgroups>,
        spawner: Arc<dyn Spawner>,
        store: Option<StoreWriter>,
        gpus: Arc<dyn Gpus>,
        monitor: GpuMonitor,
    ) -> Self {
        let net = Arc::new(NoNetwork {
            reason: "not configured".into(),
            dir: opts.state_dir.join("netns"),
        });
        Self::with_network(opts, cgroups, spawner, store, gpus, monitor, net)
    }

    /// A supervisor of a host with `gpus` and worker networks `net`.
    pub fn with_network(
        opts: HostOptions,
        cgroups: Arc<dyn Cgroups>,
        spawner: Arc<dyn Spawner>,
        store: Option<StoreWriter>,
        gpus: Arc<dyn Gpus>,
        monitor: GpuMonitor,
        net: Arc<dyn Netns>,
    ) -> Self {
        let (changed, _) = watch::channel(0);
        let ips = Ipam::new(net.subnet());
        let (events, _) = broadcast::channel(8192);
        let ledger = Ledger::new(opts.capacity);
        let gpu_ledger = GpuLedger::new(
            gpus.devices().iter().map(|d| d.uuid.clone()).collect(),
            gpu::distance_matrix(gpus.as_ref()),
        );
        Self {
            inner: Arc::new(Inner {
                opts,
                cgroups,
                spawner,
                gpus,
                gpu_monitor: monitor,
                net,
                store,
                sessions: Mutex::new(HashMap::new()),
                state: Mutex::new(State {
                    workers: HashMap::new(),
                    ledger,
                    gpus: gpu_ledger,
                    ips,
                    seq: 0,
                }),
                changed,
                events,
                started_at: SystemTime::now(),
                metrics: Metrics::default(),
                shutdown: CancellationToken::new(),
            }),
        }
    }

    pub fn name(&self) -> &str {
        &self.inner.opts.name
    }

    pub fn metrics(&self) -> &Metrics {
        &self.inner.metrics
    }

    /// Cancelled when the daemon shuts down; long streams end with it.
    pub fn shutdown_token(&self) -> CancellationToken {
        self.inner.shutdown.clone()
    }

    /// Directory of worker `id`'s spec, exit record and output.
    pub fn worker_dir(&self, id: &str) -> PathBuf {
        self.inner.worker_dir(id)
    }

    /// Whether the host's kernel table has `name` (installed or not).
    pub fn knows_kernel(&self, name: &str) -> bool {
        self.inner.opts.kernels.iter().any(|k| k.name == name)
    }

    /// Admits and starts the workers of `spec`, all or none. Returns them as admitted (PENDING or
    /// STARTING); they turn RUNNING as their shims report.
    pub async fn launch(
        &self,
        spec: LaunchSpec,
        caller: Option<IpAddr>,
    ) -> Result<Vec<WorkerRecord>> {
        let inner = self.inner.clone();
        if let Some(s) = &spec.session_id {
            inner.check_session(s)?;
        }
        // Filesystem checks are syscalls: off the async threads.
        let prepared = {
            let inner = inner.clone();
            let spec = spec.clone();
            tokio::task::spawn_blocking(move || inner.prepare(&spec))
                .await
                .map_err(|e| Error::Internal(format!("prepare launch: {e}")))??
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
        let ids: Vec<String> = (0..spec.n).map(|_| crate::core::new_id()).collect();
        let now = SystemTime::now();
        let records: Vec<WorkerRecord> = {
            // The session stays open until the workers are in the table: a close either comes
            // first (the launch is refused) or finds them (and stops them).
            let _session = match &spec.session_id {
                Some(s) => Some(inner.lock_open_session(s)?),
                None => None,
            };
            let mut guard = inner.lock();
            let st = &mut *guard;
            // CPU, memory, worker slots, GPUs and addresses: all of it for every worker, or
            // nothing.
            let wants_ips = spec.network == launch::NetworkMode::Bridge;
            if let Err(e) = st.ips.check(if wants_ips { spec.n } else { 0 }) {
                inner
                    .metrics
                    .launch_refusals
                    .fetch_add(1, Ordering::Relaxed);
                return Err(e);
            }
            let gpu_sets = match crate::core::gpus::admit(
                &mut st.ledger,
                &mut st.gpus,
                &ids,
                claim,
                spec.nvidia_gpu,
            ) {
                Ok(sets) => sets,
                Err(e) => {
                    inner
                        .metrics
                        .launch_refusals
                        .fetch_add(1, Ordering::Relaxed);
                    return Err(e);
                }
            };
            let ips = if wants_ips {
                match st.ips.allocate(&ids) {
                    Ok(ips) => ips,
                    Err(e) => {
                        // Unreachable after the check above; never keep claims of refused workers.
                        for id in &ids {
                            st.ledger.release(id);
                            st.gpus.release(id);
                        }
                        return Err(e);
                    }
                }
            } else {
                Vec::new()
            };
            let mut out = Vec::with_capacity(ids.len());
            for (i, (id, gpu_uuids)) in ids.iter().zip(gpu_sets).enumerate() {
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
            out
        };
        inner.metrics.launches.fetch_add(1, Ordering::Relaxed);
        for r in &records {
            inner.publish(r.clone());
        }

        let jobs: Vec<SpawnJob> = records
            .iter()
            .map(|rec| {
                let id = &rec.id;
                let identity = WorkerIdentity {
                    worker_id: id,
                    session_id: spec.session_id.as_deref(),
                    master_ip,
                    worker_ip: rec.ip_address,
                    gpu_uuids: &rec.gpu_uuids,
                };
                let net = match (rec.network, rec.ip_address) {
                    (launch::NetworkMode::Host, _) => None,
                    (launch::NetworkMode::Bridge, Some(IpAddr::V4(ip))) => {
                        Some(WorkerNet::Routed { ip })
                    }
                    _ => Some(WorkerNet::Isolated),
                };
                SpawnJob {
                    id: id.clone(),
                    shim: ShimSpec {
                        worker_id: id.clone(),
                        program: prepared.program.clone(),
                        argv: prepared.argv.clone(),
                        env: launch::worker_env(&prepared.base_env, &spec.env, &identity),
                        workdir: prepared.workdir.clone(),
                        cgroup: inner.cgroups.worker(id),
                        netns: net.map(|_| inner.net.path(id)),
                        rotation: inner.opts.rotation,
                        meta: records
                            .iter()
                            .find(|r| &r.id == id)
                            .and_then(|r| serde_json::to_value(r).ok())
                            .unwrap_or_default(),
                    },
                    limits: Limits {
                        cpu: spec.cpu,
                        memory_bytes: spec.memory_bytes,
                        pids_max: inner.opts.pids_max,
                        denied_devices: inner.denied_devices(&rec.gpu_uuids),
                    },
                    net,
                    pending: None,
                }
            })
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
        let lanes = hostfs::online_cpus().clamp(1, 4).min(jobs.len());
        let mut chunks: Vec<Vec<SpawnJob>> = (0..lanes).map(|_| Vec::new()).collect();
        for (i, j) in jobs.into_iter().enumerate() {
            chunks[i % lanes].push(j);
        }
        let mut tasks = Vec::new();
        for chunk in chunks {
            let inner = inner.clone();
            tasks.push(tokio::task::spawn_blocking(move || {
                inner.spawn_chunk(chunk)
            }));
        }
        for t in tasks {
            let results = t
                .await
                .map_err(|e| Error::Internal(format!("spawn task: {e}")))?;
            for (id, res) in results {
                match res {
                    Ok(handle) => {
                        inner.update(&id, |w| {
                            if w.status == WorkerStatus::Pending {
                                w.status = WorkerStatus::Starting;
                            }
                            w.shim_pid = Some(handle.pid);
                            w.shim_starttime = handle.starttime;
                        });
                        let span = crate::services::worker_span(&id, spec.session_id.as_deref());
                        crate::services::spawn_in(span, follow_worker(inner.clone(), id, handle));
                    }
                    Err(msg) => {
                        inner.metrics.spawn_failures.fetch_add(1, Ordering::Relaxed);
                        let exit = Exit {
                            spawn_error: Some(msg),
                            ..Default::default()
                        };
                        inner.clone().finish(&id, exit, RunTimes::default()).await;
                    }
                }
            }
        }
        // The client hears of its workers only once their records are durable.
        if let Some(store) = &inner.store {
            if let Err(e) = store.commit(Vec::new()).await {
                tracing::error!(error = %e, "launch not recorded; stopping its workers");
                let this = Host {
                    inner: inner.clone(),
                };
                let _ = this
                    .stop(
                        Selector::Ids(ids.clone()),
                        Some(Duration::ZERO),
                        "launch not recorded",
                    )
                    .await;
                return Err(Error::Internal(format!("state store: {e}")));
            }
        }
        let st = inner.lock();
        Ok(ids
            .iter()
            .filter_map(|id| st.workers.get(id).map(|e| e.rec.clone()))
            .collect())
    }

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
                        let s = inner.cgroups.worker(&id).stats();
                        (id, s)
                    })
                    .collect::<HashMap<_, _>>()
            })
            .await
            .map_err(|e| Error::Internal(format!("read usage: {e}")))?;
            let gpu_memory = self.inner.gpu_memory_by_worker();
            for r in &mut recs {
                if let Some(s) = usage.get(&r.id) {
                    r.cpu_seconds = s.cpu_seconds;
                    r.memory_peak_bytes = s.memory_peak_bytes;
                    r.gpu_memory_used_bytes = gpu_memory.get(&r.id).copied().unwrap_or(0);
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
            statuses: Vec::new(),
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
            crate::services::spawn_in(
                crate::services::worker_span(id, None),
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

    /// A receiver of every worker change from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<WorkerRecord> {
        self.inner.events.subscribe()
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

    /// Streams output of the selected workers into a channel; see [`OutputRequest`].
    pub fn output(&self, req: OutputRequest) -> Result<mpsc::Receiver<Result<OutputPiece>>> {
        if req.ids.is_empty() && req.session_id.is_none() {
            return Err(Error::invalid("ids", "name workers by ids or session_id"));
        }
        let filter = Filter {
            ids: req.ids.clone(),
            session_id: req.session_id.clone(),
            statuses: Vec::new(),
        };
        let ids: Vec<String> = self
            .inner
            .select(&filter)?
            .into_iter()
            .map(|r| r.id)
            .collect();
        let streams = if req.streams.is_empty() {
            StreamKind::BOTH.to_vec()
        } else {
            req.streams.clone()
        };
        let (tx, rx) = mpsc::channel(16);
        crate::services::spawn_in(
            tracing::info_span!("output"),
            pump_output(
                self.inner.clone(),
                ids,
                streams,
                req.follow,
                req.from_start,
                tx,
            ),
        );
        Ok(rx)
    }

    /// What `GetHostInfo` reports.
    pub fn view(&self) -> HostView {
        let snapshot = self.inner.gpu_monitor.latest();
        let st = self.inner.lock();
        let live = |w: &str| {
            st.workers
                .get(w)
                .is_some_and(|e| !e.rec.status.is_terminal())
        };
        let gpus = self
            .inner
            .gpus
            .devices()
            .iter()
            .map(|d| {
                let sample = snapshot.samples.iter().find(|s| s.uuid == d.uuid).cloned();
                let stray_pids = sample
                    .iter()
                    .flat_map(|s| &s.processes)
                    .filter(|p| !p.worker.as_deref().is_some_and(live))
                    .map(|p| p.pid)
                    .collect();
                GpuView {
                    device: d.clone(),
                    sample,
                    holder: st.gpus.holder(&d.uuid).map(str::to_owned),
                    stray_pids,
                }
            })
            .collect();
        HostView {
            name: self.inner.opts.name.clone(),
            labels: self.inner.opts.labels.clone(),
            capacity: st.ledger.capacity(),
            allocated: st.ledger.allocated(),
            subnet: self.inner.opts.subnet.clone(),
            cgroup_version: self.inner.cgroups.version(),
            kernels: self.inner.opts.kernels.clone(),
            started_at: self.inner.started_at,
            gpu_backend: self.inner.gpus.backend(),
            gpus,
            gpu_capacity: st.gpus.total(),
            gpu_allocated: st.gpus.allocated(),
            ip_leases: st.ips.leased(),
            ip_capacity: st.ips.subnet().map_or(0, |s| s.worker_addresses()),
            netns_ready: self.inner.net.ready(),
        }
    }

    /// Logs, once each, GPU compute processes that belong to no live worker of this host (a
    /// process that escaped its worker, or one started outside berth), every telemetry period.
    /// They also show in `/metrics`. Does nothing on a host without GPUs.
    pub fn start_gpu_watch(&self, period: Duration) {
        if self.inner.gpus.devices().is_empty() {
            return;
        }
        let host = self.clone();
        crate::services::spawn_in(tracing::info_span!("gpu_watch"), async move {
            let mut reported: std::collections::HashSet<(u32, String)> = Default::default();
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(period) => {}
                    _ = host.inner.shutdown.cancelled() => return,
                }
                let mut now = std::collections::HashSet::new();
                for g in host.view().gpus {
                    for pid in g.stray_pids {
                        let key = (pid, g.device.uuid.clone());
                        if !reported.contains(&key) {
                            let worker = g
                                .sample
                                .iter()
                                .flat_map(|s| &s.processes)
                                .find(|p| p.pid == pid)
                                .and_then(|p| p.worker.clone());
                            tracing::warn!(
                                pid,
                                gpu = %g.device.uuid,
                                cgroup_worker = worker.as_deref().unwrap_or("-"),
                                "GPU process outside any live worker of this host"
                            );
                        }
                        now.insert(key);
                    }
                }
                reported = now;
            }
        });
    }

    /// Counts of workers by status.
    pub fn status_counts(&self) -> Vec<(WorkerStatus, usize)> {
        let st = self.inner.lock();
        WorkerStatus::ALL
            .iter()
            .map(|s| {
                (
                    *s,
                    st.workers.values().filter(|e| e.rec.status == *s).count(),
                )
            })
            .collect()
    }

    /// Begins shutdown: streams and waits end. Workers keep running under their shims.
    pub fn shutdown(&self) {
        self.inner.shutdown.cancel();
    }

    /// Removes this daemon's cgroup subtree if no worker cgroup is left in it.
    pub fn cleanup_subtree(&self) {
        if self.inner.cgroups.list().is_empty() {
            if let Err(e) = self.inner.cgroups.remove_subtree() {
                tracing::debug!(error = %e, "cgroup subtree kept");
            }
        }
    }
}

/// What a launch resolved to on this host.
struct Prepared {
    program: PathBuf,
    argv: Vec<String>,
    workdir: PathBuf,
    base_env: BTreeMap<String, String>,
}

struct SpawnJob {
    id: String,
    shim: ShimSpec,
    limits: Limits,
    /// The network namespace to make before the shim starts; `None` for a worker in the host's
    /// namespace, or one whose namespace exists already (a restart).
    net: Option<WorkerNet>,
    /// That network, already being made by the namespace threads.
    pending: Option<PendingNet>,
}

/// NOT_FOUND for the first of `ids` this daemon does not know.
fn check_ids(st: &State, ids: &[String]) -> Result<()> {
    match ids.iter().find(|id| !st.workers.contains_key(*id)) {
        Some(missing) => Err(Error::NotFound(format!("worker {missing} not found"))),
        None => Ok(()),
    }
}

fn access(path: &Path, mode: i32) -> bool {
    use std::os::unix::ffi::OsStrExt;
    let Ok(c) = std::ffi::CString::new(path.as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: c is a valid NUL-terminated path.
    unsafe { libc::access(c.as_ptr(), mode) == 0 }
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave the maps half-updated in a way that matters
        // more than refusing every later request would.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn worker_dir(&self, id: &str) -> PathBuf {
        self.opts.state_dir.join("workers").join(id)
    }

    /// Device nodes a worker holding the GPUs `held` must not open: every other GPU's.
    fn denied_devices(&self, held: &[String]) -> Vec<DeviceNode> {
        gpu::denied_nodes(self.gpus.devices(), held)
    }

    /// GPU memory used by each worker's processes, from the latest telemetry.
    fn gpu_memory_by_worker(&self) -> HashMap<String, u64> {
        let snap = self.gpu_monitor.latest();
        let mut m = HashMap::new();
        for p in snap.samples.iter().flat_map(|s| &s.processes) {
            if let (Some(w), Some(b)) = (&p.worker, p.used_memory_bytes) {
                *m.entry(w.clone()).or_insert(0) += b;
            }
        }
        m
    }

    /// Resolves the program and checks the host can run it (FAILED_PRECONDITION otherwise).
    fn prepare(&self, spec: &LaunchSpec) -> Result<Prepared> {
        let workdir = spec
            .workdir
            .clone()
            .unwrap_or_else(|| self.opts.default_workdir.clone());
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
        let mut base_env = self.opts.base_env.clone();
        base_env.insert("PATH".into(), self.opts.worker_path.clone());
        let (program, argv) = match &spec.program {
            Program::Command(cmd) => {
                let path_var = spec
                    .env
                    .get("PATH")
                    .cloned()
                    .unwrap_or_else(|| self.opts.worker_path.clone());
                let resolved =
                    hostfs::resolve_program(&cmd[0], &path_var, &workdir).ok_or_else(|| {
                        let why = if cmd[0].contains('/') {
                            "does not exist or is not executable"
                        } else {
                            "not found in PATH"
                        };
                        Error::FailedPrecondition(format!("command[0] {}: {why}", cmd[0]))
                    })?;
                (resolved, cmd.clone())
            }
            Program::Code { kernel, .. } | Program::Script { kernel, .. } => {
                let entry = self
                    .opts
                    .kernels
                    .iter()
                    .find(|k| &k.name == kernel)
                    .ok_or_else(|| {
                        Error::invalid("kernel", format!("unknown kernel {kernel:?}"))
                    })?;
                let inv = entry.invocation.as_ref().ok_or_else(|| {
                    Error::FailedPrecondition(format!(
                        "kernel {kernel}: interpreter not installed on this host (looked for {})",
                        entry.candidates.join(", ")
                    ))
                })?;
                let program = match &spec.program {
                    Program::Script { kernel, path } => {
                        let path = if path.is_absolute() {
                            path.clone()
                        } else {
                            workdir.join(path)
                        };
                        match std::fs::metadata(&path) {
                            Ok(m) if m.is_file() && access(&path, libc::R_OK) => {}
                            Ok(m) if !m.is_file() => {
                                return Err(Error::FailedPrecondition(format!(
                                    "script {}: is not a regular file",
                                    path.display()
                                )))
                            }
                            Ok(_) => {
                                return Err(Error::FailedPrecondition(format!(
                                    "script {}: cannot be read",
                                    path.display()
                                )))
                            }
                            Err(e) => {
                                return Err(Error::FailedPrecondition(format!(
                                    "script {}: {e}",
                                    path.display()
                                )))
                            }
                        }
                        Program::Script {
                            kernel: kernel.clone(),
                            path,
                        }
                    }
                    other => other.clone(),
                };
                (inv.interpreter.clone(), launch::kernel_argv(inv, &program))
            }
        };
        Ok(Prepared {
            program,
            argv,
            workdir,
            base_env,
        })
    }

    /// Creates cgroups and starts shims for one chunk of a batch (blocking thread).
    fn spawn_chunk(&self, jobs: Vec<SpawnJob>) -> Vec<(String, Result<ShimHandle, String>)> {
        jobs.into_iter()
            .map(|mut job| {
                // Always collected, so that a network made for a worker that then does not start
                // is known to exist (finish() removes it).
                let made = job.pending.take().map(PendingNet::wait);
                let stopped = self
                    .lock()
                    .workers
                    .get(&job.id)
                    .is_some_and(|e| e.rec.stop_reason.is_some());
                if stopped {
                    return (job.id, Err("stopped before it started".into()));
                }
                let res = self.spawn_one(&mut job, made);
                (job.id, res)
            })
            .collect()
    }

    /// Makes the worker's network (unless `made` says how that went already), its cgroup, and
    /// starts its shim.
    fn spawn_one(
        &self,
        job: &mut SpawnJob,
        made: Option<Result<PathBuf, crate::sys::netns::NetError>>,
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
        // The shim joins the directories made, which need not be every hierarchy's.
        job.shim.cgroup = cg.clone();
        let dir = self.worker_dir(&job.id);
        match self.spawner.spawn(&dir, &job.shim) {
            Ok(h) => Ok(h),
            Err(e) => {
                let _ = cg.remove();
                undo_net();
                Err(e.to_string())
            }
        }
    }

    /// Removes worker `id`'s network namespace (its veth and route go with it) and frees its
    /// address. Idempotent.
    async fn release_network(self: &Arc<Self>, id: &str, own_namespace: bool) {
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

    /// Workers matching `filter`, in launch order. NOT_FOUND for an id or a session this daemon
    /// does not know (an ended session is known while its workers are kept).
    fn select(&self, filter: &Filter) -> Result<Vec<WorkerRecord>> {
        if let Some(s) = &filter.session_id {
            self.check_known_session(s)?;
        }
        let st = self.lock();
        check_ids(&st, &filter.ids)?;
        let mut v: Vec<(&Entry, WorkerRecord)> = st
            .workers
            .values()
            .filter(|e| filter.matches(&e.rec))
            .map(|e| (e, e.rec.clone()))
            .collect();
        v.sort_by_key(|(e, _)| e.seq);
        Ok(v.into_iter().map(|(_, r)| r).collect())
    }

    /// What [`Inner::select`] checks, without copying any record.
    fn check_filter(&self, filter: &Filter) -> Result<()> {
        if let Some(s) = &filter.session_id {
            self.check_known_session(s)?;
        }
        check_ids(&self.lock(), &filter.ids)
    }

    fn records(&self, ids: &[String]) -> Vec<WorkerRecord> {
        let st = self.lock();
        ids.iter()
            .filter_map(|id| st.workers.get(id).map(|e| e.rec.clone()))
            .collect()
    }

    fn status(&self, id: &str) -> Option<WorkerStatus> {
        self.lock().workers.get(id).map(|e| e.rec.status)
    }

    fn publish(&self, rec: WorkerRecord) {
        if let Some(store) = &self.store {
            store.submit(vec![Op::put(Table::Workers, &rec.id, &rec)]);
        }
        let _ = self.events.send(rec);
        self.changed.send_modify(|v| *v += 1);
    }

    /// Applies `f` to worker `id` and tells watchers.
    fn update(&self, id: &str, f: impl FnOnce(&mut WorkerRecord)) -> Option<WorkerRecord> {
        let rec = {
            let mut st = self.lock();
            let e = st.workers.get_mut(id)?;
            f(&mut e.rec);
            e.rec.clone()
        };
        self.publish(rec.clone());
        Some(rec)
    }

    /// Ends worker `id`: reads its usage, removes its cgroup, frees its claim, records its status.
    async fn finish(self: Arc<Self>, id: &str, mut exit: Exit, times: RunTimes) {
        let inner = self.clone();
        let cid = id.to_owned();
        let stats = tokio::task::spawn_blocking(move || {
            let cg = inner.cgroups.worker(&cid);
            let stats = cg.stats();
            if let Err(e) = cg.kill_all(Duration::from_secs(10)) {
                tracing::warn!(worker = %cid, error = %e, "worker processes survived the kill");
            }
            if let Err(e) = cg.remove() {
                tracing::warn!(worker = %cid, error = %e, "cgroup not removed");
            }
            stats
        })
        .await
        .unwrap_or_default();
        exit.oom_killed = stats.oom_kills > 0;
        let mut restart_in = None;
        let known = self.lock().workers.contains_key(id);
        if !known {
            {
                let mut st = self.lock();
                st.ledger.release(id);
                st.gpus.release(id);
            }
            self.release_network(id, true).await;
            return;
        }
        let rec = {
            let mut guard = self.lock();
            let st = &mut *guard;
            let Some(e) = st.workers.get_mut(id) else {
                // Workers are only forgotten once ended: nothing is held any more.
                return;
            };
            let (status, reason) = final_state(&exit, e.rec.stop_reason.as_deref());
            if status == WorkerStatus::Failed
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
                restart_in = Some(delay);
                e.rec.clone()
            } else {
                st.ledger.release(id);
                st.gpus.release(id);
                finalize_record(&mut e.rec, status, reason, &exit, times, stats);
                e.rec.clone()
            }
        };
        if let Some(delay) = restart_in {
            tracing::info!(worker = %id, reason = %rec.reason, "worker failed; restarting");
            let span = crate::services::worker_span(id, rec.session_id.as_deref());
            self.publish(rec);
            crate::services::spawn_in(
                span,
                lifecycle::restart_later(self.clone(), id.to_owned(), delay),
            );
            return;
        }
        // Restarts keep their namespace and address; a worker that has ended frees both.
        self.release_network(id, rec.network != launch::NetworkMode::Host)
            .await;
        tracing::info!(worker = %id, status = rec.status.as_str(), reason = %rec.reason, "worker ended");
        self.publish(rec);
    }
}

/// When a worker's last run started and ended, as its shim recorded them; `None` where no shim
/// said (it never ran, left no exit record, or is an older shim).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct RunTimes {
    started_at: Option<SystemTime>,
    finished_at: Option<SystemTime>,
}

/// Writes the end of a worker into its record.
fn finalize_record(
    rec: &mut WorkerRecord,
    status: WorkerStatus,
    reason: String,
    exit: &Exit,
    times: RunTimes,
    stats: crate::sys::cgroup::CgroupStats,
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

/// Follows one worker from its shim's handshake to its end.
async fn follow_worker(inner: Arc<Inner>, id: String, handle: ShimHandle) {
    let shim_pid = handle.pid;
    let hs = read_handshake(handle.handshake).await;
    match &hs {
        Ok(hs) => {
            let admitted = inner.lock().workers.get(&id).map(|e| e.admitted);
            if let Some(a) = admitted {
                inner.metrics.observe_latency(a.elapsed());
            }
            inner
                .metrics
                .workers_started
                .fetch_add(1, Ordering::Relaxed);
            inner.update(&id, |w| {
                w.status = WorkerStatus::Running;
                w.pid = Some(hs.pid);
                w.started_at = Some(hs.started_at.unwrap_or_else(SystemTime::now));
            });
        }
        Err(msg) => {
            inner.metrics.spawn_failures.fetch_add(1, Ordering::Relaxed);
            tracing::info!(worker = %id, error = %msg, "worker did not start");
        }
    }
    await_shim(inner, id, shim_pid, handle.pidfd, hs.err()).await;
}

/// Waits for the shim of worker `id` to exit, then ends the worker from its exit record. Used
/// for shims this daemon started and for shims it re-adopted after a restart.
async fn await_shim(
    inner: Arc<Inner>,
    id: String,
    shim_pid: u32,
    pidfd: std::os::fd::OwnedFd,
    handshake_error: Option<String>,
) {
    // SAFETY: the OwnedFd is moved into the AsyncFd, which owns it until dropped, so the fd
    // stays open and refers to the same pidfd for the AsyncFd's whole life.
    let registered =
        unsafe { AsyncFd::register_with_interest(pidfd, tokio::io::Interest::READABLE) };
    match registered {
        Ok(fd) => {
            let _ = fd.readable().await;
        }
        Err(e) => {
            // Without a pollable pidfd, poll the pid.
            tracing::warn!(worker = %id, error = ?e, "pidfd not pollable; polling");
            while std::path::Path::new(&format!("/proc/{shim_pid}")).exists()
                && !is_zombie(shim_pid)
            {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    let dir = inner.worker_dir(&id);
    let rec = tokio::task::spawn_blocking(move || {
        spawn::reap(shim_pid);
        shim::read_exit(&dir)
    })
    .await;
    let missing = handshake_error.unwrap_or_else(|| "shim exited without an exit record".into());
    let (exit, times) = outcome_of(rec, missing);
    inner.finish(&id, exit, times).await;
}

/// How a worker ended, from its shim's exit record.
fn exit_of(r: shim::ExitRecord) -> (Exit, RunTimes) {
    let times = RunTimes {
        started_at: r.started_at(),
        finished_at: Some(r.finished_at()),
    };
    (
        Exit {
            exit_code: r.exit_code,
            signal: r.signal,
            spawn_error: r.spawn_error,
            oom_killed: false,
        },
        times,
    )
}

/// How a worker ended, from an attempt to read its exit record off the async threads;
/// `missing` says why, where the shim left no record.
fn outcome_of(
    read: std::result::Result<std::io::Result<Option<shim::ExitRecord>>, tokio::task::JoinError>,
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

fn is_zombie(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            s.rsplit_once(')')
                .is_some_and(|(_, r)| r.trim_start().starts_with('Z'))
        })
        .unwrap_or(true)
}

async fn read_handshake(fd: std::os::fd::OwnedFd) -> Result<shim::Handshake, String> {
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
    shim::parse_handshake(&String::from_utf8_lossy(&buf))
}

/// SIGTERM, then SIGKILL of the whole cgroup after `grace`.
async fn stop_worker(inner: Arc<Inner>, id: String, grace: Duration) {
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
    let cg = inner.cgroups.worker(&id);
    {
        let cg = cg.clone();
        let _ = tokio::task::spawn_blocking(move || cg.signal_all(libc::SIGTERM)).await;
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
        let cg = cg.clone();
        let _ = tokio::task::spawn_blocking(move || cg.kill_all(Duration::from_secs(1))).await;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Sends the output of `ids` to `tx`; with `follow`, until every worker has ended.
async fn pump_output(
    inner: Arc<Inner>,
    ids: Vec<String>,
    streams: Vec<StreamKind>,
    follow: bool,
    from_start: bool,
    tx: mpsc::Sender<Result<OutputPiece>>,
) {
    struct Cursor {
        id: String,
        stream: StreamKind,
        dir: PathBuf,
        offset: u64,
        done: bool,
    }
    let mut cursors: Vec<Cursor> = ids
        .iter()
        .flat_map(|id| {
            streams.iter().map(|s| Cursor {
                id: id.clone(),
                stream: *s,
                dir: inner.worker_dir(id).join(s.dir_name()),
                offset: 0,
                done: false,
            })
        })
        .collect();
    if !from_start {
        let dirs: Vec<PathBuf> = cursors.iter().map(|c| c.dir.clone()).collect();
        let ends = tokio::task::spawn_blocking(move || {
            dirs.iter()
                .map(|d| output::stream_end(d).unwrap_or(0))
                .collect::<Vec<_>>()
        })
        .await
        .unwrap_or_default();
        for (c, e) in cursors.iter_mut().zip(ends) {
            c.offset = e;
        }
    }
    let mut idle = Duration::from_millis(10);
    loop {
        // Status first, then read: a worker seen ended has written its last byte already.
        let ended: Vec<bool> = cursors
            .iter()
            .map(|c| inner.status(&c.id).is_none_or(|s| s.is_terminal()))
            .collect();
        let reads: Vec<(PathBuf, u64)> =
            cursors.iter().map(|c| (c.dir.clone(), c.offset)).collect();
        let results = match tokio::task::spawn_blocking(move || {
            reads
                .into_iter()
                .map(|(d, o)| output::read_stream(&d, o, CHUNK))
                .collect::<Vec<_>>()
        })
        .await
        {
            Ok(r) => r,
            Err(e) => {
                let _ = tx
                    .send(Err(Error::Internal(format!("read output: {e}"))))
                    .await;
                return;
            }
        };
        let mut progressed = false;
        for (i, res) in results.into_iter().enumerate() {
            let c = &mut cursors[i];
            if c.done {
                continue;
            }
            match res {
                Ok(r) if !r.data.is_empty() => {
                    progressed = true;
                    c.offset = r.offset + r.data.len() as u64;
                    let piece = OutputPiece {
                        worker_id: c.id.clone(),
                        stream: c.stream,
                        offset: r.offset,
                        data: r.data,
                    };
                    if tx.send(Ok(piece)).await.is_err() {
                        return;
                    }
                }
                Ok(_) => {
                    if !follow || ended[i] {
                        c.done = true;
                    }
                }
                Err(e) => {
                    let _ = tx
                        .send(Err(Error::Internal(format!(
                            "read output of worker {}: {e}",
                            c.id
                        ))))
                        .await;
                    return;
                }
            }
        }
        if cursors.iter().all(|c| c.done) {
            return;
        }
        if progressed {
            idle = Duration::from_millis(10);
            continue;
        }
        tokio::select! {
            _ = tokio::time::sleep(idle) => {}
            _ = tx.closed() => return,
            _ = inner.shutdown.cancelled() => return,
        }
        idle = (idle * 2).min(Duration::from_millis(100));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(ms: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_millis(ms)
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
