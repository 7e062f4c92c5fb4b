//! GPUs of the host behind the [`Gpus`] trait: inventory, topology, telemetry and the compute
//! processes on each GPU. Three backends: NVML (`nvml-wrapper`, which dlopens
//! `libnvidia-ml.so.1` at run time, so nothing NVIDIA is needed to build or to run without
//! GPUs), `none`, and `fake:N` for hosts and tests without GPUs.
//!
//! Every call here may block (NVML talks to the driver; the fake backend reads /proc): callers
//! run them on blocking threads. [`GpuMonitor`] samples on its own thread into a snapshot.

use std::fmt;
use std::path::Path;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use nvml_wrapper::error::NvmlError;
use nvml_wrapper::Nvml;

use super::cgroup::parse_proc_cgroup;
use super::devbpf::DeviceNode;

/// Character-device major of `/dev/nvidiaN` (minor N) and of `/dev/nvidiactl` (minor 255) and
/// `/dev/nvidia-modeset` (minor 254). `/dev/nvidia-uvm*` and `/dev/nvidia-caps/*` have dynamic
/// majors and stay allowed.
pub const NVIDIA_MAJOR: u32 = 195;

/// Failure of a GPU backend.
#[derive(Debug, thiserror::Error)]
pub enum GpuError {
    /// The `gpus` setting is not one of `nvml`, `none`, `fake:N`, `auto`.
    #[error("gpus {value:?}: {reason}")]
    Spec { value: String, reason: String },
    /// NVML could not be loaded or initialised.
    #[error("NVML not loaded: {reason}")]
    NvmlLoad { reason: String },
    /// An NVML query failed.
    #[error("NVML {what} of GPU {index}: {source}")]
    Nvml {
        what: &'static str,
        index: u32,
        #[source]
        source: NvmlError,
    },
}

/// Which backend the configuration asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GpuBackendSpec {
    /// NVML when it loads, else none.
    Auto,
    Nvml,
    None,
    /// `n` fake GPUs.
    Fake(u32),
}

/// Most GPUs a fake backend offers.
pub const FAKE_MAX: u32 = 64;

impl GpuBackendSpec {
    /// Parses `nvml`, `none`, `fake:N` or `auto`.
    pub fn parse(s: &str) -> Result<Self, GpuError> {
        let bad = |reason: &str| GpuError::Spec {
            value: s.to_owned(),
            reason: reason.to_owned(),
        };
        match s.trim() {
            "auto" => Ok(Self::Auto),
            "nvml" => Ok(Self::Nvml),
            "none" => Ok(Self::None),
            other => {
                let n = other
                    .strip_prefix("fake:")
                    .ok_or_else(|| bad("must be nvml, none, fake:N or auto"))?;
                let n: u32 = n
                    .parse()
                    .map_err(|_| bad("fake:N needs a whole number N"))?;
                if n == 0 || n > FAKE_MAX {
                    return Err(bad(&format!("fake:N needs 1 <= N <= {FAKE_MAX}")));
                }
                Ok(Self::Fake(n))
            }
        }
    }
}

/// One GPU of the inventory; fixed while the daemon runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GpuDevice {
    pub uuid: String,
    /// NVML index (not necessarily the CUDA index: workers get UUIDs).
    pub index: u32,
    pub name: String,
    pub memory_total_bytes: u64,
    pub pci_bus_id: String,
    pub mig_enabled: bool,
    /// Minor number of `/dev/nvidia<minor>`.
    pub minor_number: u32,
}

/// A compute process on a GPU.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GpuProcess {
    pub pid: u32,
    /// GPU memory the process uses, where the driver says.
    pub used_memory_bytes: Option<u64>,
    /// The berth worker whose cgroup holds the process; set by [`attribute_processes`].
    pub worker: Option<String>,
}

/// Telemetry of one GPU.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct GpuSample {
    pub uuid: String,
    pub memory_used_bytes: u64,
    pub utilization_percent: u32,
    pub processes: Vec<GpuProcess>,
    /// Why part of this sample is missing.
    pub error: Option<String>,
}

/// The GPUs of a host. Every method may block.
pub trait Gpus: Send + Sync + fmt::Debug {
    /// `nvml`, `none` or `fake`.
    fn backend(&self) -> &'static str;
    /// The inventory, in index order.
    fn devices(&self) -> &[GpuDevice];
    /// Topology distance between inventory positions `a` and `b`: 0 for the same GPU, larger
    /// is farther (NVML's common-ancestor levels: 10 same board … 50 across CPU sockets).
    fn distance(&self, a: usize, b: usize) -> u32;
    /// Current telemetry of every GPU, in inventory order.
    fn sample(&self) -> Vec<GpuSample>;
}

/// The distance matrix of `gpus`' inventory.
pub fn distance_matrix(gpus: &dyn Gpus) -> Vec<Vec<u32>> {
    let n = gpus.devices().len();
    (0..n)
        .map(|a| (0..n).map(|b| gpus.distance(a, b)).collect())
        .collect()
}

/// The device nodes a worker holding `held` (UUIDs) must not open: `/dev/nvidiaN` of every
/// other GPU of the inventory. Control devices stay open to every worker.
pub fn denied_nodes(devices: &[GpuDevice], held: &[String]) -> Vec<DeviceNode> {
    let mut v: Vec<DeviceNode> = devices
        .iter()
        .filter(|d| !held.contains(&d.uuid))
        .map(|d| DeviceNode::char(NVIDIA_MAJOR, d.minor_number))
        .collect();
    v.sort_by_key(|d| d.minor);
    v.dedup();
    v
}

/// A host without GPUs.
#[derive(Debug, Default)]
pub struct NoGpus;

impl Gpus for NoGpus {
    fn backend(&self) -> &'static str {
        "none"
    }
    fn devices(&self) -> &[GpuDevice] {
        &[]
    }
    fn distance(&self, _a: usize, _b: usize) -> u32 {
        0
    }
    fn sample(&self) -> Vec<GpuSample> {
        Vec::new()
    }
}

/// Memory total of every fake GPU.
pub const FAKE_MEMORY_TOTAL: u64 = 16 << 30;
/// GPU memory a process "uses" on each fake GPU it sees.
pub const FAKE_PROCESS_MEMORY: u64 = 64 << 20;
/// Memory the fake driver itself holds on each GPU.
pub const FAKE_BASE_MEMORY: u64 = 300 << 20;

/// `n` fake GPUs of one fake host, minor numbers `0..n`, two per PCIe switch and four per host
/// bridge. A process "uses" a fake GPU while its environment's `CUDA_VISIBLE_DEVICES` names the
/// GPU's UUID, as a CUDA program would after opening it; such processes are the GPU's compute
/// processes, so telemetry, per-worker GPU memory and stray processes can be tested without a
/// GPU. The UUIDs derive from the host name ([`fake_uuid`]): daemons side by side on one machine
/// are separate fake hosts with GPUs of their own, so one never counts another's workers (or
/// strays) as processes on its GPUs, as real separate hosts would not.
#[derive(Debug)]
pub struct FakeGpus {
    devices: Vec<GpuDevice>,
    proc_root: std::path::PathBuf,
}

/// The UUID of fake GPU `i` of the fake host `host` (the daemon's name): the same for the same
/// host on every start, distinct between hosts (a 32-bit FNV-1a hash of the name).
pub fn fake_uuid(host: &str, i: u32) -> String {
    let h = host.bytes().fold(0x811c_9dc5_u32, |h, b| {
        (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
    });
    format!("GPU-{h:08x}-fa4e-4000-8000-{i:012x}")
}

impl FakeGpus {
    /// `n` fake GPUs of host `host`.
    pub fn new(host: &str, n: u32) -> Self {
        Self::with_proc_root(host, n, Path::new("/proc"))
    }

    /// Fake GPUs whose processes are looked for under `proc_root` (tests).
    pub fn with_proc_root(host: &str, n: u32, proc_root: &Path) -> Self {
        let devices = (0..n)
            .map(|i| GpuDevice {
                uuid: fake_uuid(host, i),
                index: i,
                name: "berth fake GPU".into(),
                memory_total_bytes: FAKE_MEMORY_TOTAL,
                pci_bus_id: format!("00000000:{:02X}:00.0", 0x10 + i),
                mig_enabled: false,
                minor_number: i,
            })
            .collect();
        Self {
            devices,
            proc_root: proc_root.to_path_buf(),
        }
    }
}

/// UUIDs named by `CUDA_VISIBLE_DEVICES` in a `/proc/<pid>/environ` (NUL-separated).
pub fn visible_devices_in_environ(environ: &[u8]) -> Vec<String> {
    environ
        .split(|b| *b == 0)
        .find_map(|kv| kv.strip_prefix(b"CUDA_VISIBLE_DEVICES="))
        .map(|v| {
            String::from_utf8_lossy(v)
                .split(',')
                .map(|s| s.trim().to_owned())
                .filter(|s| !s.is_empty())
                .collect()
        })
        .unwrap_or_default()
}

impl Gpus for FakeGpus {
    fn backend(&self) -> &'static str {
        "fake"
    }

    fn devices(&self) -> &[GpuDevice] {
        &self.devices
    }

    fn distance(&self, a: usize, b: usize) -> u32 {
        match (a, b) {
            _ if a == b => 0,
            _ if a / 2 == b / 2 => 10,
            _ if a / 4 == b / 4 => 20,
            _ => 50,
        }
    }

    fn sample(&self) -> Vec<GpuSample> {
        let mut users: Vec<Vec<u32>> = vec![Vec::new(); self.devices.len()];
        if let Ok(rd) = std::fs::read_dir(&self.proc_root) {
            for e in rd.flatten() {
                let Some(pid) = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
                    continue;
                };
                let Ok(env) = std::fs::read(e.path().join("environ")) else {
                    continue;
                };
                for uuid in visible_devices_in_environ(&env) {
                    if let Some(i) = self.devices.iter().position(|d| d.uuid == uuid) {
                        users[i].push(pid);
                    }
                }
            }
        }
        self.devices
            .iter()
            .zip(users)
            .map(|(d, mut pids)| {
                pids.sort_unstable();
                let n = pids.len() as u64;
                GpuSample {
                    uuid: d.uuid.clone(),
                    memory_used_bytes: FAKE_BASE_MEMORY + n * FAKE_PROCESS_MEMORY,
                    // Busy while someone uses it, a little more with each user.
                    utilization_percent: if n == 0 {
                        0
                    } else {
                        (60 + 10 * n).min(100) as u32
                    },
                    processes: pids
                        .into_iter()
                        .map(|pid| GpuProcess {
                            pid,
                            used_memory_bytes: Some(FAKE_PROCESS_MEMORY),
                            worker: None,
                        })
                        .collect(),
                    error: None,
                }
            })
            .collect()
    }
}

/// GPUs seen through NVML.
pub struct NvmlGpus {
    nvml: Arc<Nvml>,
    devices: Vec<GpuDevice>,
    distance: Vec<Vec<u32>>,
    driver: String,
}

impl fmt::Debug for NvmlGpus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NvmlGpus")
            .field("devices", &self.devices)
            .field("driver", &self.driver)
            .finish()
    }
}

/// Why NVML did not load, in words for the start-up log.
pub fn nvml_load_reason(e: &NvmlError) -> String {
    match e {
        NvmlError::LibloadingError(le) => {
            format!("libnvidia-ml.so.1 missing ({le})")
        }
        NvmlError::DriverNotLoaded => "the NVIDIA kernel driver is not loaded".into(),
        NvmlError::NoPermission => "no permission to talk to the NVIDIA driver".into(),
        NvmlError::LibraryNotFound => "libnvidia-ml.so.1 missing".into(),
        other => other.to_string(),
    }
}

fn nvml_err(what: &'static str, index: u32) -> impl FnOnce(NvmlError) -> GpuError {
    move |source| GpuError::Nvml {
        what,
        index,
        source,
    }
}

/// `NVML_DEVICE_MIG_ENABLE`: the current MIG mode of a GPU with MIG on.
const NVML_DEVICE_MIG_ENABLE: u32 = 1;

/// NVML's topology level as a distance (the `nvmlGpuTopologyLevel_t` values).
fn topology_distance(level: nvml_wrapper::enum_wrappers::device::TopologyLevel) -> u32 {
    use nvml_wrapper::enum_wrappers::device::TopologyLevel as L;
    match level {
        L::Internal => 0,
        L::Single => 10,
        L::Multiple => 20,
        L::HostBridge => 30,
        L::Node => 40,
        L::System => 50,
    }
}

impl NvmlGpus {
    /// Loads NVML and reads the inventory and topology. Blocks (dlopen, driver calls).
    pub fn open() -> Result<Self, GpuError> {
        let nvml = Nvml::init().map_err(|e| GpuError::NvmlLoad {
            reason: nvml_load_reason(&e),
        })?;
        let driver = nvml.sys_driver_version().unwrap_or_default();
        let count = nvml.device_count().map_err(nvml_err("device count", 0))?;
        let mut devices = Vec::with_capacity(count as usize);
        for i in 0..count {
            let d = nvml.device_by_index(i).map_err(nvml_err("handle", i))?;
            devices.push(GpuDevice {
                uuid: d.uuid().map_err(nvml_err("uuid", i))?,
                index: i,
                name: d.name().unwrap_or_else(|_| "NVIDIA GPU".into()),
                memory_total_bytes: d.memory_info().map(|m| m.total).unwrap_or(0),
                pci_bus_id: d.pci_info().map(|p| p.bus_id).unwrap_or_default(),
                // NotSupported on GPUs without MIG.
                mig_enabled: d
                    .mig_mode()
                    .map(|m| m.current == NVML_DEVICE_MIG_ENABLE)
                    .unwrap_or(false),
                minor_number: d.minor_number().map_err(nvml_err("minor number", i))?,
            });
        }
        let n = devices.len() as u32;
        let between = |a: u32, b: u32| -> u32 {
            if a == b {
                return 0;
            }
            // Asked in one order only, so the matrix is symmetric whatever the driver says.
            let (a, b) = (a.min(b), a.max(b));
            let level = (|| {
                let da = nvml.device_by_index(a)?;
                let db = nvml.device_by_index(b)?;
                da.topology_common_ancestor(db)
            })();
            // Unknown topology: as far as it gets.
            level.map(topology_distance).unwrap_or(50)
        };
        let distance: Vec<Vec<u32>> = (0..n)
            .map(|a| (0..n).map(|b| between(a, b)).collect())
            .collect();
        Ok(Self {
            nvml: Arc::new(nvml),
            devices,
            distance,
            driver,
        })
    }

    /// Driver version, for the start-up log.
    pub fn driver_version(&self) -> &str {
        &self.driver
    }

    fn sample_one(&self, dev: &GpuDevice) -> GpuSample {
        let mut s = GpuSample {
            uuid: dev.uuid.clone(),
            ..Default::default()
        };
        let d = match self.nvml.device_by_index(dev.index) {
            Ok(d) => d,
            Err(e) => {
                s.error = Some(format!("handle: {e}"));
                return s;
            }
        };
        let mut errors = Vec::new();
        match d.memory_info() {
            Ok(m) => s.memory_used_bytes = m.used,
            Err(e) => errors.push(format!("memory: {e}")),
        }
        match d.utilization_rates() {
            Ok(u) => s.utilization_percent = u.gpu,
            // MIG-enabled GPUs report no utilization.
            Err(NvmlError::NotSupported) => {}
            Err(e) => errors.push(format!("utilization: {e}")),
        }
        match d.running_compute_processes() {
            Ok(ps) => {
                s.processes = ps
                    .into_iter()
                    .map(|p| GpuProcess {
                        pid: p.pid,
                        used_memory_bytes: match p.used_gpu_memory {
                            nvml_wrapper::enums::device::UsedGpuMemory::Used(b) => Some(b),
                            nvml_wrapper::enums::device::UsedGpuMemory::Unavailable => None,
                        },
                        worker: None,
                    })
                    .collect()
            }
            Err(e) => errors.push(format!("processes: {e}")),
        }
        if !errors.is_empty() {
            s.error = Some(errors.join("; "));
        }
        s
    }
}

impl Gpus for NvmlGpus {
    fn backend(&self) -> &'static str {
        "nvml"
    }

    fn devices(&self) -> &[GpuDevice] {
        &self.devices
    }

    fn distance(&self, a: usize, b: usize) -> u32 {
        self.distance
            .get(a)
            .and_then(|r| r.get(b))
            .copied()
            .unwrap_or(50)
    }

    fn sample(&self) -> Vec<GpuSample> {
        self.devices.iter().map(|d| self.sample_one(d)).collect()
    }
}

/// A backend as opened, with what the start-up log says about it.
#[derive(Debug)]
pub struct OpenedGpus {
    pub gpus: Arc<dyn Gpus>,
    /// What was found and why (`NVML not loaded: libnvidia-ml.so.1 missing; no GPUs`).
    pub note: String,
}

/// Opens the backend `spec` names for host `host` (the daemon's name, which names fake GPUs).
/// `auto` falls back to none when NVML does not load; an explicit `nvml` that does not load is
/// an error. Blocks: call it off the async threads.
pub fn open(spec: GpuBackendSpec, host: &str) -> Result<OpenedGpus, GpuError> {
    let found = |g: &dyn Gpus| -> String {
        let names: Vec<String> = g
            .devices()
            .iter()
            .map(|d| format!("{} {} (minor {})", d.index, d.name, d.minor_number))
            .collect();
        format!("{} GPU(s): {}", names.len(), names.join(", "))
    };
    match spec {
        GpuBackendSpec::None => Ok(OpenedGpus {
            gpus: Arc::new(NoGpus),
            note: "GPUs disabled by configuration (gpus = none)".into(),
        }),
        GpuBackendSpec::Fake(n) => {
            let g = FakeGpus::new(host, n);
            let note = format!("fake backend: {}", found(&g));
            Ok(OpenedGpus {
                gpus: Arc::new(g),
                note,
            })
        }
        GpuBackendSpec::Nvml => {
            let g = NvmlGpus::open()?;
            let note = format!("NVML loaded (driver {}): {}", g.driver_version(), found(&g));
            Ok(OpenedGpus {
                gpus: Arc::new(g),
                note,
            })
        }
        GpuBackendSpec::Auto => match NvmlGpus::open() {
            Ok(g) => {
                let note = format!("NVML loaded (driver {}): {}", g.driver_version(), found(&g));
                Ok(OpenedGpus {
                    gpus: Arc::new(g),
                    note,
                })
            }
            Err(e) => Ok(OpenedGpus {
                gpus: Arc::new(NoGpus),
                note: format!("{e}; running without GPUs"),
            }),
        },
    }
}

/// The worker id in a `/proc/<pid>/cgroup` text: the path component right below this daemon's
/// subtree directory `subtree` (`berth-<host name>`), in any hierarchy.
pub fn worker_in_proc_cgroup(text: &str, subtree: &str) -> Option<String> {
    parse_proc_cgroup(text).into_iter().find_map(|(_, path)| {
        let mut parts = path.split('/');
        parts.find(|p| *p == subtree)?;
        parts
            .next()
            .filter(|w| berth_core::is_valid_id(w))
            .map(str::to_owned)
    })
}

/// Sets `worker` of every process of `samples` from its cgroup under `proc_root`.
pub fn attribute_processes(samples: &mut [GpuSample], proc_root: &Path, subtree: &str) {
    for s in samples {
        for p in &mut s.processes {
            p.worker = std::fs::read_to_string(proc_root.join(p.pid.to_string()).join("cgroup"))
                .ok()
                .and_then(|t| worker_in_proc_cgroup(&t, subtree));
        }
    }
}

/// Telemetry of every GPU at one moment.
#[derive(Debug, Clone, Default)]
pub struct GpuSnapshot {
    pub taken_at: Option<SystemTime>,
    pub samples: Vec<GpuSample>,
}

/// Samples the GPUs every `period` on a thread of its own into a shared snapshot. The thread
/// ends (after the sample in flight) once the monitor is dropped; the drop never waits for it.
#[derive(Debug)]
pub struct GpuMonitor {
    latest: Arc<Mutex<Arc<GpuSnapshot>>>,
    /// Dropping it wakes the thread, which then ends.
    _stop: Option<mpsc::Sender<()>>,
}

impl GpuMonitor {
    /// Takes a first sample now (blocking), then one every `period` on thread
    /// `berth-gpu-telemetry`. `subtree` is the daemon's cgroup subtree directory name
    /// (`berth-<host name>`), by which GPU processes are attributed to workers.
    pub fn start(gpus: Arc<dyn Gpus>, period: Duration, subtree: String) -> std::io::Result<Self> {
        let take = {
            let gpus = gpus.clone();
            let subtree = subtree.clone();
            move || {
                let mut samples = gpus.sample();
                attribute_processes(&mut samples, Path::new("/proc"), &subtree);
                GpuSnapshot {
                    taken_at: Some(SystemTime::now()),
                    samples,
                }
            }
        };
        let first = take();
        let latest = Arc::new(Mutex::new(Arc::new(first)));
        if gpus.devices().is_empty() {
            // Nothing will ever change.
            return Ok(Self {
                latest,
                _stop: None,
            });
        }
        let (tx, rx) = mpsc::channel::<()>();
        let shared = latest.clone();
        std::thread::Builder::new()
            .name("berth-gpu-telemetry".into())
            .spawn(move || {
                // Until the sender is dropped (or sends): then the monitor is gone.
                while let Err(mpsc::RecvTimeoutError::Timeout) = rx.recv_timeout(period) {
                    let snap = take();
                    *shared.lock().unwrap_or_else(|p| p.into_inner()) = Arc::new(snap);
                }
            })?;
        Ok(Self {
            latest,
            _stop: Some(tx),
        })
    }

    /// A monitor that never samples (hosts built without one).
    pub fn idle() -> Self {
        Self {
            latest: Arc::new(Mutex::new(Arc::new(GpuSnapshot::default()))),
            _stop: None,
        }
    }

    /// The latest snapshot.
    pub fn latest(&self) -> Arc<GpuSnapshot> {
        self.latest
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backend_specs() {
        let ok = [
            ("auto", GpuBackendSpec::Auto),
            ("nvml", GpuBackendSpec::Nvml),
            ("none", GpuBackendSpec::None),
            ("fake:4", GpuBackendSpec::Fake(4)),
            (" fake:64 ", GpuBackendSpec::Fake(64)),
        ];
        for (s, want) in ok {
            assert_eq!(GpuBackendSpec::parse(s).unwrap(), want, "{s}");
        }
        for s in [
            "", "cuda", "fake", "fake:", "fake:x", "fake:0", "fake:65", "fake:-1",
        ] {
            assert!(
                matches!(GpuBackendSpec::parse(s), Err(GpuError::Spec { .. })),
                "{s:?} accepted"
            );
        }
    }

    #[test]
    fn fake_inventory_is_stable() {
        let g = FakeGpus::with_proc_root("h1", 4, Path::new("/nonexistent"));
        let d = g.devices();
        assert_eq!(d.len(), 4);
        assert_eq!(d[0].uuid, "GPU-903b3592-fa4e-4000-8000-000000000000");
        assert_eq!(d[3].uuid, "GPU-903b3592-fa4e-4000-8000-000000000003");
        assert_eq!(
            fake_uuid("h1", 12),
            "GPU-903b3592-fa4e-4000-8000-00000000000c"
        );
        // Another host's fake GPUs are other GPUs.
        let other = FakeGpus::with_proc_root("h2", 4, Path::new("/nonexistent"));
        assert!(other
            .devices()
            .iter()
            .all(|o| d.iter().all(|m| m.uuid != o.uuid)));
        for (i, dev) in d.iter().enumerate() {
            assert_eq!((dev.index, dev.minor_number), (i as u32, i as u32));
            assert_eq!(dev.name, "berth fake GPU");
            assert_eq!(dev.memory_total_bytes, FAKE_MEMORY_TOTAL);
        }
        assert_eq!(d[1].pci_bus_id, "00000000:11:00.0");
        assert_eq!(
            distance_matrix(&g),
            vec![
                vec![0, 10, 20, 20],
                vec![10, 0, 20, 20],
                vec![20, 20, 0, 10],
                vec![20, 20, 10, 0]
            ]
        );
        // No /proc to look at: idle GPUs.
        let s = g.sample();
        assert_eq!(s.len(), 4);
        assert!(s
            .iter()
            .all(|x| x.utilization_percent == 0 && x.processes.is_empty()));
        assert_eq!(s[2].memory_used_bytes, FAKE_BASE_MEMORY);
    }

    #[test]
    fn fake_processes_come_from_environ() {
        let root = tempfile::tempdir().unwrap();
        let mk = |pid: u32, env: &[u8], cgroup: &str| {
            let d = root.path().join(pid.to_string());
            std::fs::create_dir_all(&d).unwrap();
            std::fs::write(d.join("environ"), env).unwrap();
            std::fs::write(d.join("cgroup"), cgroup).unwrap();
        };
        let u1 = fake_uuid("h1", 1);
        let u2 = fake_uuid("h1", 2);
        mk(
            100,
            format!("PATH=/bin\0CUDA_VISIBLE_DEVICES={u1},{u2}\0").as_bytes(),
            "5:devices:/berth-h1/w1abc\n4:memory:/x/berth-h1/w1abc\n",
        );
        mk(
            101,
            format!("CUDA_VISIBLE_DEVICES={u1}\0").as_bytes(),
            "0::/user.slice\n",
        );
        mk(102, b"CUDA_VISIBLE_DEVICES=\0", "0::/\n");
        mk(103, b"HOME=/\0", "0::/\n");
        std::fs::create_dir_all(root.path().join("self")).unwrap();
        let g = FakeGpus::with_proc_root("h1", 4, root.path());
        let mut s = g.sample();
        attribute_processes(&mut s, root.path(), "berth-h1");
        let pids = |i: usize| s[i].processes.iter().map(|p| p.pid).collect::<Vec<_>>();
        assert_eq!(pids(0), Vec::<u32>::new());
        assert_eq!(pids(1), vec![100, 101]);
        assert_eq!(pids(2), vec![100]);
        assert_eq!(
            s[1].memory_used_bytes,
            FAKE_BASE_MEMORY + 2 * FAKE_PROCESS_MEMORY
        );
        assert!(s[1].utilization_percent > 0 && s[1].utilization_percent <= 100);
        assert_eq!(s[1].processes[0].worker.as_deref(), Some("w1abc"));
        assert_eq!(s[1].processes[1].worker, None);
    }

    #[test]
    fn environ_parsing() {
        let cases: &[(&[u8], &[&str])] = &[
            (
                b"A=1\0CUDA_VISIBLE_DEVICES=GPU-a,GPU-b\0B=2\0",
                &["GPU-a", "GPU-b"],
            ),
            (b"CUDA_VISIBLE_DEVICES=\0", &[]),
            (b"XCUDA_VISIBLE_DEVICES=GPU-a\0", &[]),
            (b"CUDA_VISIBLE_DEVICES=GPU-a", &["GPU-a"]),
            (b"", &[]),
        ];
        for (env, want) in cases {
            assert_eq!(visible_devices_in_environ(env), *want, "{env:?}");
        }
    }

    #[test]
    fn worker_from_proc_cgroup() {
        let cases: &[(&str, Option<&str>)] = &[
            (
                "0::/system.slice/berthd.service/berth-h1/abc123\n",
                Some("abc123"),
            ),
            (
                "9:name=systemd:/\n5:devices:/berth-h1/w9\n4:memory:/process_api/x/berth-h1/w9\n",
                Some("w9"),
            ),
            ("0::/system.slice/berthd.service/berth-h2/abc123\n", None),
            ("0::/berth-h1\n", None),
            ("0::/berth-h1/../etc\n", None),
            ("0::/user.slice\n", None),
            ("", None),
        ];
        for (text, want) in cases {
            assert_eq!(
                worker_in_proc_cgroup(text, "berth-h1").as_deref(),
                *want,
                "{text:?}"
            );
        }
    }

    #[test]
    fn denied_nodes_leave_held_and_control_devices() {
        let g = FakeGpus::with_proc_root("h1", 4, Path::new("/nonexistent"));
        let held = vec![fake_uuid("h1", 1), fake_uuid("h1", 3)];
        let minors: Vec<u32> = denied_nodes(g.devices(), &held)
            .iter()
            .map(|d| d.minor)
            .collect();
        assert_eq!(minors, vec![0, 2]);
        assert_eq!(denied_nodes(g.devices(), &[]).len(), 4);
        assert!(denied_nodes(&[], &[]).is_empty());
        assert!(denied_nodes(g.devices(), &[])
            .iter()
            .all(|d| d.major == NVIDIA_MAJOR && d.minor < 4));
    }

    /// Counts its samples.
    #[derive(Debug, Default)]
    struct Counting(std::sync::atomic::AtomicUsize);

    impl Gpus for Counting {
        fn backend(&self) -> &'static str {
            "fake"
        }
        fn devices(&self) -> &[GpuDevice] {
            static ONE: std::sync::OnceLock<Vec<GpuDevice>> = std::sync::OnceLock::new();
            ONE.get_or_init(|| FakeGpus::with_proc_root("h1", 1, Path::new("/nonexistent")).devices)
        }
        fn distance(&self, _a: usize, _b: usize) -> u32 {
            0
        }
        fn sample(&self) -> Vec<GpuSample> {
            let n = self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            vec![GpuSample {
                uuid: fake_uuid("h1", 0),
                utilization_percent: n as u32,
                ..Default::default()
            }]
        }
    }

    #[test]
    fn monitor_samples_and_stops() {
        let g = Arc::new(Counting::default());
        let m = GpuMonitor::start(g.clone(), Duration::from_millis(10), "berth-x".into()).unwrap();
        assert_eq!(
            m.latest().samples[0].utilization_percent,
            0,
            "first sample at start"
        );
        std::thread::sleep(Duration::from_millis(100));
        assert!(
            m.latest().samples[0].utilization_percent >= 2,
            "sampled on a period"
        );
        drop(m);
        std::thread::sleep(Duration::from_millis(50));
        let n = g.0.load(std::sync::atomic::Ordering::SeqCst);
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(g.0.load(std::sync::atomic::Ordering::SeqCst), n, "stopped");
        // A host without GPUs never starts a thread.
        let idle =
            GpuMonitor::start(Arc::new(NoGpus), Duration::from_millis(1), "x".into()).unwrap();
        assert!(idle.latest().samples.is_empty());
    }

    #[test]
    fn no_gpus_and_missing_nvml() {
        let g = open(GpuBackendSpec::None, "h1").unwrap();
        assert_eq!(g.gpus.backend(), "none");
        assert!(g.gpus.devices().is_empty());
        // This machine has no NVIDIA driver: auto falls back to none and says why; an
        // explicit nvml is an error. (Where a driver exists, both load NVML.)
        let auto = open(GpuBackendSpec::Auto, "h1").unwrap();
        if auto.gpus.backend() == "none" {
            assert!(auto.note.starts_with("NVML not loaded: "), "{}", auto.note);
            assert!(matches!(
                open(GpuBackendSpec::Nvml, "h1"),
                Err(GpuError::NvmlLoad { .. })
            ));
        }
    }
}
