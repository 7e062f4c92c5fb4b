//! The host supervisor: admits launches, starts each worker through its shim, follows it to its
//! end, frees what it held, and answers list, await, stop, watch and output requests. It wires
//! the pure core to the sys layer; gRPC types never reach it.
//!
//! This module holds the supervisor's state (`Host`, its `Inner` and the worker table) and what
//! reads it whole (`view`, counts); each duty has a module of its own: `start` (admission and
//! spawns), `life` (a worker from spawn to its final record, and restarts), `stop`, `query`
//! (list, await), `events` (every change to the store and to watchers), `streams` (output),
//! `follow` (waking output followers), `sessions`, `retention`, `recovery` (start-up).

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant, SystemTime};

use tokio::sync::{broadcast, watch};
use tokio_util::sync::CancellationToken;

use berth_core::admission::{Capacity, Ledger};
use berth_core::gpus::GpuLedger;
use berth_core::ipam::Ipam;
use berth_core::launch::KernelInvocation;
use berth_core::limits::{ExecLimits, LaunchLimits};
use berth_core::session::Session;
use berth_core::worker::{WorkerRecord, WorkerStatus};
use berth_sys::cgroup::{CgroupVersion, Cgroups};
use berth_sys::clock::{Clock, SystemClock};
use berth_sys::devbpf::DeviceNode;
use berth_sys::gpu::{self, GpuDevice, GpuMonitor, GpuSample, Gpus, NoGpus};
use berth_sys::launcher::Spawner;
use berth_sys::netns::{Netns, NoNetwork};
use berth_sys::output::{Rotation, StreamKind};
use berth_sys::store::StoreWriter;

mod access;
mod events;
mod follow;
mod life;
mod pool;
mod query;
mod recovery;
mod retention;
mod sessions;
mod start;
mod stop;
mod streams;

pub use access::{LaunchAs, WorkerPrivileges};
pub use recovery::{open_store, RecoveryReport, StoreOrigin, UNACCOUNTED};

/// A kernel of the host's table and what it resolved to at start-up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelEntry {
    pub name: String,
    pub invocation: Option<KernelInvocation>,
    /// What was looked for, for the error when it is missing.
    pub candidates: Vec<String>,
    /// Interpreters kept started ahead of need (`[kernels.python3] pool_size`); 0: none.
    pub pool_size: usize,
    /// Modules they import before they wait.
    pub preload: Vec<String>,
}

/// How long a stop kills a worker's cgroup before it gives up on it: a cgroup empties within
/// a second once its CPU quota is lifted and its freezer thawed (2,000 tasks of a fork bomb: about
/// 0.2 s here); what outlives 10 s of SIGKILL is stuck in the kernel.
pub const DEFAULT_KILL_LIMIT: Duration = Duration::from_secs(10);

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
    /// How long a stop goes on killing a worker's cgroup after the grace period before it gives
    /// up and reports the worker as not ended ([`DEFAULT_KILL_LIMIT`]).
    pub kill_limit: Duration,
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
    /// What the workers of a launch keep and may ask for.
    pub privileges: WorkerPrivileges,
    /// Caps on one launch request (`[limits]`).
    pub limits: LaunchLimits,
    /// The kernel's exec limits for the workers.
    pub exec: ExecLimits,
    /// The clocks session leases are measured on.
    pub clock: Arc<dyn Clock>,
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
            kill_limit: DEFAULT_KILL_LIMIT,
            host_from_worker: IpAddr::V4(Ipv4Addr::LOCALHOST),
            subnet: String::new(),
            labels: BTreeMap::new(),
            retain_finished_for: Duration::from_secs(24 * 3600),
            retain_finished_max: 10_000,
            retention_sweep: Duration::from_secs(30),
            privileges: WorkerPrivileges::default(),
            limits: LaunchLimits::default(),
            exec: ExecLimits {
                arg_max: berth_sys::host::arg_max().min(berth_core::limits::ARG_MAX_CEILING),
            },
            clock: Arc::new(SystemClock::new()),
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
    /// With `session_id` and `follow`: also the workers the session launches from now on,
    /// until it has ended.
    pub new_workers: bool,
}

/// What `HostInfo` reports.
#[derive(Debug, Clone)]
pub struct HostView {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub capacity: Capacity,
    pub allocated: berth_core::admission::Allocated,
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
    /// One launch at a time per (owner, `request_id`), so that a retry that comes while the
    /// first is still being admitted waits for it and gets its workers.
    retries: berth_server::gates::Gates<(String, String)>,
    state: Mutex<State>,
    changed: watch::Sender<u64>,
    events: broadcast::Sender<WorkerRecord>,
    /// Counts the ends of sessions (closed or lapsed): what session followers wait for.
    session_ends: watch::Sender<u64>,
    /// Wakes output followers; started by the first (see `follow`).
    output_watch: OnceLock<Option<follow::OutputWatch>>,
    started_at: SystemTime,
    metrics: Metrics,
    shutdown: CancellationToken,
    /// The warm interpreter pool, once started (see `pool`).
    pool: OnceLock<pool::Pool>,
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
                retries: Default::default(),
                state: Mutex::new(State {
                    workers: HashMap::new(),
                    ledger,
                    gpus: gpu_ledger,
                    ips,
                    seq: 0,
                }),
                changed,
                events,
                session_ends: watch::channel(0).0,
                output_watch: OnceLock::new(),
                started_at: SystemTime::now(),
                metrics: Metrics::default(),
                shutdown: CancellationToken::new(),
                pool: OnceLock::new(),
            }),
        }
    }

    /// Starts the background duties: session expiry, retention of ended workers, and the warm
    /// interpreter pool where one is configured.
    pub fn start_background(&self) {
        self.start_pool();
        let host = self.clone();
        berth_server::spawn_in(tracing::info_span!("session_expiry"), async move {
            host.expire_sessions().await
        });
        let host = self.clone();
        berth_server::spawn_in(tracing::info_span!("retention"), async move {
            host.sweep_finished().await
        });
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

    /// The grace period of a stop that names none.
    pub fn stop_grace(&self) -> Duration {
        self.inner.opts.stop_grace
    }

    /// Directory of worker `id`'s spec, exit record and output.
    pub fn worker_dir(&self, id: &str) -> PathBuf {
        self.inner.worker_dir(id)
    }

    /// The caps on one launch request.
    pub fn limits(&self) -> &LaunchLimits {
        &self.inner.opts.limits
    }

    /// Whether the host's kernel table has `name` (installed or not).
    pub fn knows_kernel(&self, name: &str) -> bool {
        self.inner.opts.kernels.iter().any(|k| k.name == name)
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
        berth_server::spawn_in(tracing::info_span!("gpu_watch"), async move {
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
}
