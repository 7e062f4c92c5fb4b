//! Worker cgroups on cgroup v1 and v2: discovery of the hierarchies, creation with hard limits,
//! usage counters, killing a whole cgroup and removal. Every difference between v1 and v2 lives
//! in this module; the rest of berth sees [`WorkerCgroup`] and [`CgroupStats`].
//!
//! cgroups-rs 0.5 (the design card's choice) was tried for discovery, limits and stats and left
//! out: it adds 44 crates to the daemon (zbus 5 with an async-io runtime, nix 0.25 beside ours),
//! and the code it could replace came out 28 lines longer. Each place says in a `cgroups-rs:`
//! line why ours stays.

use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::devbpf::{self, DeviceNode};

/// Failure of a cgroup operation, with the path it concerned.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    /// A cgroup file or directory could not be read, written, created or removed.
    #[error("cgroup {op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The host has no usable cgroup hierarchy for a controller berth needs.
    #[error("no usable cgroup hierarchy: {0}")]
    Unsupported(String),
    /// Processes were still in the cgroup after it was killed for `waited`.
    #[error("cgroup {path} still holds {left} process(es) after {waited:?} of SIGKILL")]
    Busy {
        path: PathBuf,
        left: usize,
        waited: Duration,
    },
    /// The device filter of a v2 cgroup could not be built, loaded or attached.
    #[error("device filter of cgroup {path}: {op}: {message}")]
    DeviceFilter {
        op: &'static str,
        path: PathBuf,
        message: String,
    },
}

type Result<T, E = CgroupError> = std::result::Result<T, E>;

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> CgroupError + 'a {
    move |source| CgroupError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

/// Which cgroup interface the host offers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum CgroupVersion {
    V1,
    V2,
}

impl CgroupVersion {
    /// The number reported in `HostInfo.cgroup_version`.
    pub fn number(self) -> u32 {
        match self {
            CgroupVersion::V1 => 1,
            CgroupVersion::V2 => 2,
        }
    }
}

/// Hard limits of one worker's cgroup.
#[derive(Debug, Clone, PartialEq)]
pub struct Limits {
    /// CPU cores; enforced as a CFS quota over `CPU_PERIOD_US`.
    pub cpu: f64,
    /// Memory limit in bytes (swap is not allowed on top of it).
    pub memory_bytes: u64,
    /// Maximum number of tasks (processes and threads).
    pub pids_max: u64,
    /// Device nodes the worker must not open, mknod, read or write (the GPUs it does not hold).
    /// v1: one `devices.deny` line each; v2: a device-filter eBPF program on the cgroup. Every
    /// other device stays as the parent cgroup allows it.
    pub denied_devices: Vec<DeviceNode>,
}

/// CFS period used for CPU quotas.
pub const CPU_PERIOD_US: u64 = 100_000;

impl Limits {
    /// Quota in microseconds per [`CPU_PERIOD_US`]; never below the kernel's 1 ms minimum.
    pub fn cpu_quota_us(&self) -> u64 {
        ((self.cpu * CPU_PERIOD_US as f64).round() as u64).max(1_000)
    }
}

/// Usage counters read from a worker's cgroup.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct CgroupStats {
    pub cpu_seconds: f64,
    pub memory_peak_bytes: u64,
    pub memory_current_bytes: u64,
    /// Processes the kernel's OOM killer killed in this cgroup.
    pub oom_kills: u64,
}

/// One v1 hierarchy that berth uses, or the single v2 hierarchy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Controller {
    Cpu,
    Cpuacct,
    Memory,
    Pids,
    Freezer,
    Devices,
    /// The unified (v2) hierarchy, which holds every controller.
    Unified,
}

impl Controller {
    const V1: [Controller; 6] = [
        Controller::Cpu,
        Controller::Cpuacct,
        Controller::Memory,
        Controller::Pids,
        Controller::Freezer,
        Controller::Devices,
    ];

    fn v1_name(self) -> &'static str {
        match self {
            Controller::Cpu => "cpu",
            Controller::Cpuacct => "cpuacct",
            Controller::Memory => "memory",
            Controller::Pids => "pids",
            Controller::Freezer => "freezer",
            Controller::Devices => "devices",
            Controller::Unified => "",
        }
    }
}

/// A cgroup filesystem mount as read from `/proc/self/mountinfo`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CgroupMount {
    pub mount_point: PathBuf,
    /// Path inside the hierarchy that is mounted there (usually `/`).
    pub root: String,
    pub version: CgroupVersion,
    /// v1 controllers of this hierarchy (empty for v2).
    pub controllers: Vec<String>,
}

/// Parses `/proc/self/mountinfo` text into the cgroup mounts it lists.
// cgroups-rs: its mountinfo_self() keeps only v1 (`cgroup`) mounts, so it misses a hybrid cgroup2.
pub fn parse_mountinfo(text: &str) -> Vec<CgroupMount> {
    let mut mounts = Vec::new();
    for line in text.lines() {
        let Some((pre, post)) = line.split_once(" - ") else {
            continue;
        };
        let pre: Vec<&str> = pre.split_whitespace().collect();
        let post: Vec<&str> = post.split_whitespace().collect();
        if pre.len() < 5 || post.len() < 3 {
            continue;
        }
        let (root, mount_point) = (pre[3], pre[4]);
        let version = match post[0] {
            "cgroup" => CgroupVersion::V1,
            "cgroup2" => CgroupVersion::V2,
            _ => continue,
        };
        let controllers = match version {
            CgroupVersion::V1 => post[2]
                .split(',')
                .filter(|o| !matches!(*o, "rw" | "ro") && !o.starts_with("name="))
                .filter(|o| Controller::V1.iter().any(|c| c.v1_name() == *o) || *o == "cpuset")
                .map(str::to_owned)
                .collect(),
            CgroupVersion::V2 => Vec::new(),
        };
        mounts.push(CgroupMount {
            mount_point: PathBuf::from(unescape_mount_path(mount_point)),
            root: root.to_owned(),
            version,
            controllers,
        });
    }
    mounts
}

fn unescape_mount_path(s: &str) -> String {
    s.replace("\\040", " ")
        .replace("\\011", "\t")
        .replace("\\012", "\n")
        .replace("\\134", "\\")
}

/// Parses `/proc/<pid>/cgroup` into `(controllers, path)` pairs; v2 has empty controllers.
pub fn parse_proc_cgroup(text: &str) -> Vec<(Vec<String>, String)> {
    text.lines()
        .filter_map(|line| {
            let mut parts = line.splitn(3, ':');
            let _id = parts.next()?;
            let ctrls = parts.next()?;
            let path = parts.next()?;
            let ctrls = ctrls
                .split(',')
                .filter(|c| !c.is_empty() && !c.starts_with("name="))
                .map(str::to_owned)
                .collect();
            Some((ctrls, path.to_owned()))
        })
        .collect()
}

/// Parses a flat-keyed cgroup file (`memory.events`, `cpu.stat`, `memory.oom_control`).
pub fn parse_flat_keyed(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|l| {
        let (k, v) = l.split_once(' ')?;
        (k == key).then(|| v.trim().parse().ok()).flatten()
    })
}

/// The file through which a forked, still single-threaded child moves itself into a cgroup
/// before exec, by writing `0` to it. On v2 the shim only writes it where it cannot create the
/// child in the cgroup directly (see [`WorkerCgroup::clone_into_dir`]).
///
/// v1: `tasks` (move this thread). Writing `cgroup.procs` (move the whole thread group) takes the
/// global `cgroup_threadgroup_rwsem` for writing, and that waits for an RCU grace period unless
/// another migration ended moments before: 8–50 ms here for every launch that comes alone, against
/// ~0.03 ms for `tasks`, which the kernel (≥ 6.0, "cgroup: Optimize single thread migration")
/// moves under `cgroup_mutex` alone when a thread moves itself. For a process with one thread
/// the two are the same move. v2 has no `tasks`; `cgroup.threads` only works in threaded
/// subtrees, so it keeps `cgroup.procs`, with the grace period.
// cgroups-rs: add_task moves a pid from outside once it ran (v1 keeps its charges); ours: pre-exec
pub fn join_file(version: CgroupVersion) -> &'static str {
    match version {
        CgroupVersion::V1 => "tasks",
        CgroupVersion::V2 => "cgroup.procs",
    }
}

/// Parses the pids listed in `cgroup.procs`.
pub fn parse_pids(text: &str) -> Vec<i32> {
    text.split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect()
}

/// The cgroup directories of one worker, one per hierarchy. Serializable so that the per-worker
/// shim, which outlives the daemon, can kill the rest of its worker's processes by itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkerCgroup {
    pub version: CgroupVersion,
    pub dirs: Vec<(Controller, PathBuf)>,
}

impl WorkerCgroup {
    /// See [`Cgroups::update_limits`]. On v1 the swap-inclusive limit must never be below the
    /// memory limit: it goes first when the limit rises, after it when it falls.
    pub fn update_limits(&self, cpu: f64, memory_bytes: u64) -> Result<()> {
        let l = Limits {
            cpu,
            memory_bytes,
            pids_max: 0,
            denied_devices: Vec::new(),
        };
        match self.version {
            CgroupVersion::V1 => {
                if let Some(d) = self.dir(Controller::Cpu) {
                    write_cpu_quota(d, l.cpu_quota_us())?;
                }
                if let Some(d) = self.dir(Controller::Memory) {
                    let limit = d.join("memory.limit_in_bytes");
                    let sw = d.join("memory.memsw.limit_in_bytes");
                    let v = memory_bytes.to_string();
                    if sw.exists() {
                        if write_file(&sw, &v).is_ok() {
                            write_file(&limit, &v)?;
                        } else {
                            write_file(&limit, &v)?;
                            write_file(&sw, &v)?;
                        }
                    } else {
                        write_file(&limit, &v)?;
                    }
                }
            }
            CgroupVersion::V2 => {
                if let Some(d) = self.dir(Controller::Unified) {
                    write_file(
                        &d.join("cpu.max"),
                        &format!("{} {}", l.cpu_quota_us(), CPU_PERIOD_US),
                    )?;
                    write_file(&d.join("memory.max"), &memory_bytes.to_string())?;
                }
            }
        }
        Ok(())
    }

    fn dir(&self, c: Controller) -> Option<&Path> {
        self.dirs
            .iter()
            .find(|(k, _)| *k == c)
            .map(|(_, p)| p.as_path())
    }

    /// How a new worker process enters this cgroup, decided here and nowhere else:
    ///
    /// - `Some(dir)` (v2, one directory): the process is created in `dir` directly, by
    ///   `clone3(CLONE_INTO_CGROUP)` with `dir` open (Linux ≥ 5.7). No migration happens at all:
    ///   the fork takes `cgroup_threadgroup_rwsem` for reading only, so a launch that comes alone
    ///   waits for no RCU grace period, as a write to `cgroup.procs` would (see [`join_file`]).
    ///   Where clone3 is refused (an older kernel, a seccomp filter), the shim falls back to the
    ///   [`join_files`](Self::join_files).
    /// - `None` (v1, one directory per hierarchy): the process joins by writing `0` to each of
    ///   the [`join_files`](Self::join_files) before exec. v1 cannot clone into cgroups.
    ///
    /// Either way the program's first instruction runs inside the cgroup.
    // cgroups-rs: has no clone3 / CLONE_INTO_CGROUP; it only moves existing pids.
    pub fn clone_into_dir(&self) -> Option<&Path> {
        match (self.version, self.dirs.as_slice()) {
            (CgroupVersion::V2, [(_, dir)]) => Some(dir),
            _ => None,
        }
    }

    /// The files a new, single-threaded process writes `0` to, to join this cgroup: `tasks` on
    /// v1, `cgroup.procs` on v2 (where it is only the fallback of
    /// [`clone_into_dir`](Self::clone_into_dir)). See [`join_file`].
    pub fn join_files(&self) -> Vec<PathBuf> {
        distinct(
            self.dirs
                .iter()
                .map(|(_, d)| d.join(join_file(self.version))),
        )
    }

    /// Directory used for the process list (the pids hierarchy on v1).
    fn main_dir(&self) -> &Path {
        match self.version {
            CgroupVersion::V2 => self.dir(Controller::Unified),
            CgroupVersion::V1 => self
                .dir(Controller::Pids)
                .or_else(|| self.dir(Controller::Memory)),
        }
        .unwrap_or_else(|| self.dirs[0].1.as_path())
    }

    /// Directory of the device-access controls (v1 `devices`, v2 the unified cgroup).
    pub fn devices_dir(&self) -> Option<&Path> {
        match self.version {
            CgroupVersion::V2 => self.dir(Controller::Unified),
            CgroupVersion::V1 => self.dir(Controller::Devices),
        }
    }

    /// Pids of every process in the cgroup; empty when the cgroup is gone.
    pub fn pids(&self) -> Vec<i32> {
        let mut all = Vec::new();
        for d in distinct(self.dirs.iter().map(|(_, d)| d.clone())) {
            if let Ok(t) = fs::read_to_string(d.join("cgroup.procs")) {
                all.extend(parse_pids(&t));
            }
        }
        // A fork bomb puts thousands in every hierarchy: sort, not a quadratic search.
        all.sort_unstable();
        all.dedup();
        all
    }

    /// Sends `signal` to every process of the cgroup (a best-effort snapshot).
    pub fn signal_all(&self, signal: i32) {
        for pid in self.pids() {
            // SAFETY: kill(2) takes plain integers and has no memory effects.
            unsafe { libc::kill(pid, signal) };
        }
    }

    /// Kills every process of the cgroup, including ones forked while killing, and waits until
    /// the cgroup is empty, at most `timeout`. Each round sends every member SIGKILL: through
    /// `cgroup.kill` where the kernel has it (v2, Linux ≥ 5.14), which also catches forks in
    /// flight; elsewhere (v1, older v2) by freezing the cgroup, killing every member and thawing
    /// it again. Between rounds it sleeps ([`kill_pause`]); on v2 it wakes as soon as
    /// `cgroup.events` says the cgroup is empty. Fails with [`CgroupError::Busy`], saying how
    /// many processes are left, when the cgroup is not empty by then.
    ///
    /// Two things keep a fork bomb from outliving it:
    ///
    /// - **Thaw after every round**, frozen or not: a v1 task with a pending SIGKILL does not die
    ///   while its cgroup is `FREEZING` or `FROZEN` (it enters the refrigerator first), and the
    ///   freeze of thousands of throttled tasks may not complete for seconds, so a round never
    ///   waits long for it ([`FREEZE_WAIT`]): it only keeps most of them from forking meanwhile.
    /// - **The CPU quota is lifted** once every member has its SIGKILL: dying tasks still need
    ///   CPU time to exit, and 2,000 of them sharing a quota of half a core were throttled in
    ///   nearly every period and took seconds to go (all at once without the quota). It is not
    ///   lifted before the first SIGKILL, which would give live tasks the whole machine; it is
    ///   put back when the kill fails, so what is left stays held to it.
    // cgroups-rs: kill() is v2 only (cgroup.kill); nothing of it freezes, kills and thaws on v1.
    pub fn kill_all(&self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        if self.pids().is_empty() {
            return Ok(());
        }
        let mut lifted: Option<(PathBuf, String)> = None;
        let mut round = 0;
        loop {
            if !self.write_cgroup_kill() {
                let freezing = self.freeze(FREEZE_WAIT.min(remaining(deadline)));
                for pid in self.pids() {
                    // SAFETY: kill(2) takes plain integers and has no memory effects.
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                }
                if freezing.is_some() {
                    self.thaw();
                }
            }
            if round == 0 {
                lifted = self.lift_cpu_quota();
            }
            self.wait_empty(kill_pause(round).min(remaining(deadline)));
            let left = self.pids().len();
            if left == 0 {
                return Ok(());
            }
            if Instant::now() >= deadline {
                if let Some((file, value)) = lifted {
                    let _ = write_file(&file, &value);
                }
                return Err(CgroupError::Busy {
                    path: self.main_dir().to_path_buf(),
                    left,
                    waited: timeout,
                });
            }
            round += 1;
        }
    }

    /// Writes `cgroup.kill` (v2, Linux ≥ 5.14); false where there is none to write.
    fn write_cgroup_kill(&self) -> bool {
        self.version == CgroupVersion::V2
            && self
                .dir(Controller::Unified)
                .is_some_and(|d| write_file(&d.join("cgroup.kill"), "1").is_ok())
    }

    /// Removes the cgroup's CPU quota (v1 `cpu.cfs_quota_us` = -1, v2 `cpu.max` = max); returns
    /// the file and the value it had, to put back, or `None` where there was no quota (or no
    /// CPU controller). Every write of a quota walks the host's CPU cgroups under a global mutex
    /// (see [`write_cpu_quota`]), so an unlimited cgroup is left as it is.
    fn lift_cpu_quota(&self) -> Option<(PathBuf, String)> {
        let (file, unlimited) = match self.version {
            CgroupVersion::V1 => (self.dir(Controller::Cpu)?.join("cpu.cfs_quota_us"), "-1"),
            CgroupVersion::V2 => (self.dir(Controller::Unified)?.join("cpu.max"), "max"),
        };
        let had = fs::read_to_string(&file).ok()?;
        if !has_cpu_quota(&had) {
            return None;
        }
        write_file(&file, unlimited).ok()?;
        Some((file, had.trim().to_owned()))
    }

    /// Waits up to `wait` for the cgroup to be empty. v2 sleeps in `poll` on `cgroup.events`,
    /// which the kernel signals when `populated` changes; v1 has no such file and just sleeps.
    fn wait_empty(&self, wait: Duration) {
        if wait.is_zero() {
            return;
        }
        if self.version == CgroupVersion::V2 {
            if let Some(d) = self.dir(Controller::Unified) {
                if wait_unpopulated(&d.join("cgroup.events"), wait) {
                    return;
                }
            }
        }
        std::thread::sleep(wait);
    }

    /// Asks the kernel to freeze the cgroup (v1 `freezer.state`, v2 `cgroup.freeze`) and waits
    /// up to `wait` for it to be frozen. Returns `None` where nothing was asked (no freezer),
    /// else whether it froze in time; either way a [`thaw`](Self::thaw) must follow.
    fn freeze(&self, wait: Duration) -> Option<bool> {
        let (control, value, state, is_frozen): (PathBuf, &str, PathBuf, fn(&str) -> bool) =
            match self.version {
                CgroupVersion::V1 => {
                    let state = self.dir(Controller::Freezer)?.join("freezer.state");
                    (state.clone(), "FROZEN", state, |s| s.trim() == "FROZEN")
                }
                CgroupVersion::V2 => {
                    let dir = self.dir(Controller::Unified)?;
                    (
                        dir.join("cgroup.freeze"),
                        "1",
                        dir.join("cgroup.events"),
                        |s| parse_flat_keyed(s, "frozen") == Some(1),
                    )
                }
            };
        write_file(&control, value).ok()?;
        let until = Instant::now() + wait;
        loop {
            match fs::read_to_string(&state) {
                Ok(s) if is_frozen(&s) => return Some(true),
                Ok(_) if Instant::now() < until => std::thread::sleep(Duration::from_millis(1)),
                _ => return Some(false),
            }
        }
    }

    /// Thaws the cgroup, whatever state the freezer reached.
    fn thaw(&self) {
        let control = match self.version {
            CgroupVersion::V1 => self
                .dir(Controller::Freezer)
                .map(|d| (d.join("freezer.state"), "THAWED")),
            CgroupVersion::V2 => self
                .dir(Controller::Unified)
                .map(|d| (d.join("cgroup.freeze"), "0")),
        };
        if let Some((file, value)) = control {
            let _ = write_file(&file, value);
        }
    }

    /// Reads usage counters. Missing files read as zero (older kernels lack `memory.peak`).
    // cgroups-rs: on v1 reads 19 files a worker (123 syscalls, ~4x the time); v2 oom_kill stays 0.
    pub fn stats(&self) -> CgroupStats {
        let read =
            |c: Controller, f: &str| self.dir(c).and_then(|d| fs::read_to_string(d.join(f)).ok());
        let num = |s: Option<String>| s.and_then(|s| s.trim().parse::<u64>().ok()).unwrap_or(0);
        match self.version {
            CgroupVersion::V1 => CgroupStats {
                cpu_seconds: num(read(Controller::Cpuacct, "cpuacct.usage")) as f64 / 1e9,
                memory_peak_bytes: num(read(Controller::Memory, "memory.max_usage_in_bytes")),
                memory_current_bytes: num(read(Controller::Memory, "memory.usage_in_bytes")),
                oom_kills: read(Controller::Memory, "memory.oom_control")
                    .and_then(|t| parse_flat_keyed(&t, "oom_kill"))
                    .unwrap_or(0),
            },
            CgroupVersion::V2 => CgroupStats {
                cpu_seconds: read(Controller::Unified, "cpu.stat")
                    .and_then(|t| parse_flat_keyed(&t, "usage_usec"))
                    .unwrap_or(0) as f64
                    / 1e6,
                memory_peak_bytes: num(read(Controller::Unified, "memory.peak")),
                memory_current_bytes: num(read(Controller::Unified, "memory.current")),
                oom_kills: read(Controller::Unified, "memory.events")
                    .and_then(|t| parse_flat_keyed(&t, "oom_kill"))
                    .unwrap_or(0),
            },
        }
    }

    /// Removes the cgroup directories. The cgroup must be empty.
    pub fn remove(&self) -> Result<()> {
        let mut first_err = None;
        for (_, d) in &self.dirs {
            if let Err(e) = remove_dir_retry(d) {
                first_err.get_or_insert(e);
            }
        }
        first_err.map_or(Ok(()), Err)
    }
}

/// rmdir that tolerates a missing directory and retries briefly while the kernel still counts
/// exiting tasks (EBUSY right after the last process died).
fn remove_dir_retry(d: &Path) -> Result<()> {
    for attempt in 0..200 {
        match fs::remove_dir(d) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) && attempt < 199 => {
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) => return Err(io_err("remove", d)(e)),
        }
    }
    Ok(())
}

/// How long one kill round waits for the freezer (v1, v2 before `cgroup.kill`) before it kills
/// anyway: the tasks that froze cannot fork meanwhile, and the rest are caught next round.
pub const FREEZE_WAIT: Duration = Duration::from_millis(20);

/// Pause after kill round `round` (from 0) before the next: 1, 2, 4 … ms, then 50 ms at most, so
/// a cgroup that empties at once is seen to within a few milliseconds and one that takes long
/// to die costs at most 20 rounds a second, nothing like a busy loop.
pub fn kill_pause(round: u32) -> Duration {
    Duration::from_millis((1u64 << round.min(6)).min(50))
}

/// Whether a CPU controller's quota file (v1 `cpu.cfs_quota_us`, v2 `cpu.max`) sets a quota.
pub fn has_cpu_quota(text: &str) -> bool {
    match text.split_whitespace().next() {
        Some("max") | Some("-1") | None => false,
        Some(_) => true,
    }
}

fn remaining(deadline: Instant) -> Duration {
    deadline.saturating_duration_since(Instant::now())
}

/// Sleeps in `poll` on the v2 `cgroup.events` file `events` until it reads `populated 0`, at
/// most `wait`; false when the file cannot be read (the caller sleeps instead).
fn wait_unpopulated(events: &Path, wait: Duration) -> bool {
    use std::io::{Read, Seek};
    use std::os::fd::AsRawFd;
    let Ok(mut f) = fs::File::open(events) else {
        return false;
    };
    let until = Instant::now() + wait;
    let mut text = String::new();
    loop {
        text.clear();
        if f.rewind()
            .and_then(|()| f.read_to_string(&mut text))
            .is_err()
        {
            return false;
        }
        if parse_flat_keyed(&text, "populated") == Some(0) {
            return true;
        }
        let left = remaining(until);
        if left.is_zero() {
            return true;
        }
        // The kernel marks the file with POLLPRI (and POLLERR) whenever its content changes.
        let mut pfd = libc::pollfd {
            fd: f.as_raw_fd(),
            events: libc::POLLPRI,
            revents: 0,
        };
        let ms = left.as_millis().clamp(1, i32::MAX as u128) as i32;
        // SAFETY: pfd is one valid pollfd for the duration of the call.
        if unsafe { libc::poll(&mut pfd, 1, ms) } < 0
            && io::Error::last_os_error().kind() != io::ErrorKind::Interrupted
        {
            return false;
        }
    }
}

fn write_file(path: &Path, value: &str) -> Result<()> {
    let mut f = fs::OpenOptions::new()
        .write(true)
        .open(path)
        .map_err(io_err("open", path))?;
    f.write_all(value.as_bytes()).map_err(io_err("write", path))
}

/// Creates and finds worker cgroups under the daemon's own subtree.
pub trait Cgroups: Send + Sync {
    fn version(&self) -> CgroupVersion;
    /// Creates the cgroup of worker `id` with `limits`; on failure nothing is left behind.
    fn create(&self, id: &str, limits: &Limits) -> Result<WorkerCgroup>;
    /// The cgroup of worker `id`, whether or not it exists now.
    fn worker(&self, id: &str) -> WorkerCgroup;
    /// Ids of the worker cgroups that exist under this daemon's subtree.
    fn list(&self) -> Vec<String>;
    /// Removes the daemon's own (empty) subtree directories; called at shutdown.
    fn remove_subtree(&self) -> Result<()>;
    /// Human-readable location of the subtree, for logs.
    fn describe(&self) -> String;

    // What the supervisor does to a worker's cgroup goes through here, never through a
    // `WorkerCgroup` of its own, so that a fake can stand in for the kernel. `WorkerCgroup` is
    // the description the shim needs to join it.

    /// Pids of every process in worker `id`'s cgroup; empty when it is gone.
    fn pids(&self, id: &str) -> Vec<i32> {
        self.worker(id).pids()
    }
    /// Sends `signal` to every process of worker `id` (a best-effort snapshot).
    fn signal_all(&self, id: &str, signal: i32) {
        self.worker(id).signal_all(signal)
    }
    /// Kills every process of worker `id` and waits until its cgroup is empty, at most `timeout`.
    fn kill_all(&self, id: &str, timeout: Duration) -> Result<()> {
        self.worker(id).kill_all(timeout)
    }
    /// CPU, memory and OOM-kill counters of worker `id`'s cgroup.
    fn stats(&self, id: &str) -> CgroupStats {
        self.worker(id).stats()
    }
    /// Removes worker `id`'s (empty) cgroup; nothing to do when it is gone.
    fn remove(&self, id: &str) -> Result<()> {
        self.worker(id).remove()
    }
    /// Sets the CPU quota and memory limit of worker `id`'s existing cgroup (a pooled worker
    /// taken by a launch). Raising or lowering the memory limit both work; lowering it below
    /// what the cgroup uses makes the kernel reclaim, then OOM-kill.
    fn update_limits(&self, id: &str, cpu: f64, memory_bytes: u64) -> Result<()> {
        self.worker(id).update_limits(cpu, memory_bytes)
    }
}

/// The real cgroup filesystem.
#[derive(Debug)]
pub struct CgroupFs {
    version: CgroupVersion,
    /// The daemon's subtree in each hierarchy berth uses.
    bases: Vec<(Controller, PathBuf)>,
    /// Cgroups made ahead of need (v1 only); `None` makes every one on demand.
    pool: Option<Arc<ReadyPool>>,
    /// Where shims (and the zygotes that fork them) belong when that is not the daemon's own
    /// cgroup: the leaf of a delegated cgroup outside the daemon's (see [`CgroupFs::in_delegated`]).
    shim_leaf: Option<PathBuf>,
}

/// Prefix of the name of a cgroup made ahead of need: `_ready_` + 12 random characters. No
/// worker id has a `_`, so nothing takes one for a worker's.
const READY_PREFIX: &str = "_ready_";

/// How long the pool waits after a cgroup was taken before it makes more: the rest of that
/// launch (the shim's start) comes first on a host with few CPUs.
const POOL_QUIET: Duration = Duration::from_millis(10);

/// What a ready cgroup was made with. The CPU quota is what matters: on v1 every write of it
/// walks every CPU cgroup of the host under a global mutex (~1–2 ms with 4000 workers), so a
/// ready cgroup has it written already, and a launch takes one whose quota is its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Preset {
    quota_us: u64,
    pids_max: u64,
}

impl Preset {
    fn of(l: &Limits) -> Self {
        Self {
            quota_us: l.cpu_quota_us(),
            pids_max: l.pids_max,
        }
    }
}

/// Worker cgroups kept ready on v1: made in every hierarchy, CPU quota and pids limit written,
/// by a thread of their own while no launch is in progress. A launch renames one to its worker
/// id in each hierarchy (v1 allows renaming a cgroup within its parent; v2 does not) and writes
/// only the memory limit and device rules, which cost the same whatever the number of workers.
// cgroups-rs: makes every cgroup on demand (mkdir, then each limit); it cannot rename one.
#[derive(Debug)]
struct ReadyPool {
    target: usize,
    /// The daemon's subtree in each hierarchy, as [`CgroupFs`] has it.
    bases: Vec<(Controller, PathBuf)>,
    state: Mutex<PoolState>,
    changed: Condvar,
    stop: AtomicBool,
}

#[derive(Debug, Default)]
struct PoolState {
    ready: Vec<(String, Preset)>,
    /// What the latest launch asked for: what the pool makes.
    want: Option<Preset>,
    /// When a launch last took (or looked for) a cgroup.
    last_use: Option<Instant>,
    /// The refill thread is making (or re-presetting) one now.
    busy: bool,
}

impl ReadyPool {
    fn lock(&self) -> std::sync::MutexGuard<'_, PoolState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A ready cgroup made with `preset`, if there is one; the pool makes the next ones so.
    fn take(&self, preset: Preset) -> Option<String> {
        let mut st = self.lock();
        st.want = Some(preset);
        st.last_use = Some(Instant::now());
        let got = st
            .ready
            .iter()
            .position(|(_, p)| *p == preset)
            .map(|i| st.ready.swap_remove(i).0);
        drop(st);
        self.changed.notify_all();
        got
    }

    /// The directories of ready cgroup `name`, one per distinct hierarchy.
    fn dirs(&self, name: &str) -> Vec<PathBuf> {
        distinct(self.bases.iter().map(|(_, b)| b.join(name)))
    }

    /// Removes every ready cgroup now and stops the refill thread.
    fn drain(&self) {
        self.stop.store(true, Ordering::SeqCst);
        self.changed.notify_all();
        let mut st = self.lock();
        // One being made now goes too: the subtree can be removed once this returns.
        let deadline = Instant::now() + Duration::from_secs(2);
        while st.busy && Instant::now() < deadline {
            st = self
                .changed
                .wait_timeout(st, Duration::from_millis(50))
                .map(|(g, _)| g)
                .unwrap_or_else(|p| p.into_inner().0);
        }
        let ready = std::mem::take(&mut st.ready);
        drop(st);
        for (name, _) in ready {
            remove_dirs(&self.dirs(&name));
        }
    }

    /// Makes ready cgroup `name` with `preset` (or gives an existing one `preset`).
    fn make(&self, name: &str, preset: Preset, exists: bool) -> Result<()> {
        let dirs = self.dirs(name);
        let made = (|| {
            if !exists {
                for d in &dirs {
                    fs::create_dir(d).map_err(io_err("create", d))?;
                }
            }
            for (c, b) in &self.bases {
                let d = b.join(name);
                match c {
                    Controller::Cpu => write_cpu_quota(&d, preset.quota_us)?,
                    Controller::Pids => {
                        write_file(&d.join("pids.max"), &preset.pids_max.to_string())?
                    }
                    _ => {}
                }
            }
            Ok(())
        })();
        if made.is_err() {
            remove_dirs(&dirs);
        }
        made
    }

    /// Keeps `target` cgroups with the latest launch's preset ready, while launches leave it a
    /// quiet moment. A ready cgroup of an older preset is given the new one rather than made
    /// anew.
    fn refill(self: Arc<Self>) {
        let mut failures = 0u32;
        loop {
            let (name, preset, exists) = {
                let mut st = self.lock();
                if self.stop.load(Ordering::SeqCst) {
                    return;
                }
                let quiet_for = st
                    .last_use
                    .map_or(Duration::ZERO, |t| POOL_QUIET.saturating_sub(t.elapsed()));
                let Some(want) = st.want else {
                    let _ = self.changed.wait_timeout(st, Duration::from_secs(1));
                    continue;
                };
                let matching = st.ready.iter().filter(|(_, p)| *p == want).count();
                if matching >= self.target || !quiet_for.is_zero() {
                    let wait = if quiet_for.is_zero() {
                        Duration::from_secs(1)
                    } else {
                        quiet_for
                    };
                    let _ = self.changed.wait_timeout(st, wait);
                    continue;
                }
                st.busy = true;
                match st.ready.iter().position(|(_, p)| *p != want) {
                    Some(i) => {
                        let (name, _) = st.ready.swap_remove(i);
                        (name, want, true)
                    }
                    None => (berth_core::ready_name(READY_PREFIX), want, false),
                }
            };
            let made = self.make(&name, preset, exists);
            let stopped = self.stop.load(Ordering::SeqCst);
            if stopped && made.is_ok() {
                remove_dirs(&self.dirs(&name));
            }
            {
                let mut st = self.lock();
                st.busy = false;
                if !stopped && made.is_ok() {
                    st.ready.push((name, preset));
                }
            }
            self.changed.notify_all();
            if stopped {
                return;
            }
            match made {
                Ok(()) => failures = 0,
                Err(e) => {
                    failures += 1;
                    if failures == 1 {
                        tracing::warn!(error = %e, "ready cgroup not made");
                    }
                    std::thread::sleep(Duration::from_millis(
                        (100u64 << failures.min(6)).min(5_000),
                    ));
                }
            }
        }
    }
}

/// `paths` without repeats, in order: v1 controllers mounted together (`cpu,cpuacct`, the usual
/// systemd layout) share one hierarchy, so their directories are one.
fn distinct(paths: impl IntoIterator<Item = PathBuf>) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = Vec::new();
    for p in paths {
        if !out.contains(&p) {
            out.push(p);
        }
    }
    out
}

/// Best-effort rmdir of empty cgroup directories.
fn remove_dirs(dirs: &[PathBuf]) {
    for d in dirs {
        let _ = fs::remove_dir(d);
    }
}

/// Sets the CFS quota of the v1 cgroup `dir` over [`CPU_PERIOD_US`]. Every write of a period or
/// quota walks every CPU cgroup of the host under a global mutex (the kernel checks the quotas
/// of the whole tree): ~0.4–2 ms each with 4000 workers. A new cgroup starts with the default
/// period, so only the quota needs writing.
fn write_cpu_quota(dir: &Path, quota_us: u64) -> Result<()> {
    let period = dir.join("cpu.cfs_period_us");
    let current = fs::read_to_string(&period).map_err(io_err("read", &period))?;
    if current.trim().parse::<u64>().ok() != Some(CPU_PERIOD_US) {
        write_file(&period, &CPU_PERIOD_US.to_string())?;
    }
    write_file(&dir.join("cpu.cfs_quota_us"), &quota_us.to_string())
}

impl CgroupFs {
    /// Finds the hierarchies of this host and prepares `<own cgroup>/<subtree>` in each (or
    /// `<parent>/<subtree>` when `parent` is set). Prefers v1 when its memory controller is mounted
    /// (the hybrid layout), else the unified hierarchy. On v2 the daemon first moves the processes
    /// of its own cgroup into a leaf, as a `Delegate=yes` service must before enabling controllers
    /// for its children.
    // cgroups-rs: fixes v2 at /sys/fs/cgroup, ignores +controller errors, has no delegated leaf.
    pub fn discover(subtree: &str, parent: Option<&str>) -> Result<Self> {
        let mountinfo = fs::read_to_string("/proc/self/mountinfo")
            .map_err(io_err("read", Path::new("/proc/self/mountinfo")))?;
        let own = fs::read_to_string("/proc/self/cgroup")
            .map_err(io_err("read", Path::new("/proc/self/cgroup")))?;
        let mounts = parse_mountinfo(&mountinfo);
        let own = parse_proc_cgroup(&own);
        let v1_memory = mounts
            .iter()
            .any(|m| m.version == CgroupVersion::V1 && m.controllers.iter().any(|c| c == "memory"));
        if v1_memory {
            Self::setup_v1(&mounts, &own, subtree, parent)
        } else if let Some(m) = mounts.iter().find(|m| m.version == CgroupVersion::V2) {
            let own_path = own
                .iter()
                .find(|(c, _)| c.is_empty())
                .map(|(_, p)| p.clone())
                .unwrap_or_else(|| "/".into());
            Self::setup_v2(m, &own_path, subtree, parent)
        } else {
            Err(CgroupError::Unsupported(
                "neither a v1 memory hierarchy nor cgroup2 is mounted".into(),
            ))
        }
    }

    fn setup_v1(
        mounts: &[CgroupMount],
        own: &[(Vec<String>, String)],
        subtree: &str,
        parent: Option<&str>,
    ) -> Result<Self> {
        // Every hierarchy is looked up before any directory is made: a refused start leaves
        // no subtree behind in the hierarchies it did find.
        let mut found = Vec::new();
        for c in Controller::V1 {
            let name = c.v1_name();
            let Some(m) = mounts.iter().find(|m| {
                m.version == CgroupVersion::V1 && m.controllers.iter().any(|x| x == name)
            }) else {
                if matches!(c, Controller::Memory | Controller::Cpu | Controller::Pids) {
                    return Err(CgroupError::Unsupported(format!(
                        "v1 controller {name} is not mounted"
                    )));
                }
                continue;
            };
            found.push((c, name, m));
        }
        let mut bases = Vec::new();
        for (c, name, m) in found {
            let own_path = own
                .iter()
                .find(|(cs, _)| cs.iter().any(|x| x == name))
                .map(|(_, p)| p.as_str())
                .unwrap_or("/");
            let rel = parent.unwrap_or(own_path);
            let base = join_in_hierarchy(m, rel).join(subtree);
            fs::create_dir_all(&base).map_err(io_err("create", &base))?;
            bases.push((c, base));
        }
        Ok(Self {
            version: CgroupVersion::V1,
            bases,
            pool: None,
            shim_leaf: None,
        })
    }

    /// The v2 cgroup of this process (as /proc/self/cgroup names it) where [`Self::discover`]
    /// would use the unified hierarchy; `None` on a host that mounts the v1 memory controller.
    pub fn unified_own_path() -> Result<Option<String>> {
        let mountinfo = fs::read_to_string("/proc/self/mountinfo")
            .map_err(io_err("read", Path::new("/proc/self/mountinfo")))?;
        let own = fs::read_to_string("/proc/self/cgroup")
            .map_err(io_err("read", Path::new("/proc/self/cgroup")))?;
        let mounts = parse_mountinfo(&mountinfo);
        let v1_memory = mounts
            .iter()
            .any(|m| m.version == CgroupVersion::V1 && m.controllers.iter().any(|c| c == "memory"));
        if v1_memory || !mounts.iter().any(|m| m.version == CgroupVersion::V2) {
            return Ok(None);
        }
        Ok(Some(
            parse_proc_cgroup(&own)
                .into_iter()
                .find(|(c, _)| c.is_empty())
                .map_or_else(|| "/".into(), |(_, p)| p),
        ))
    }

    /// Prepares `<delegated>/<subtree>` on v2, where `delegated` (a path inside the hierarchy)
    /// is a cgroup handed to berth that is not the daemon's own: under systemd, the transient
    /// `Delegate=yes` scope that holds shims and workers (`sys::systemd`), so that the
    /// service's own cgroup never gets children with controllers. Its processes move into its
    /// leaf [`V2_LEAF`], which [`Self::shim_leaf`] then names for the shims.
    pub fn in_delegated(subtree: &str, delegated: &str) -> Result<Self> {
        let mountinfo = fs::read_to_string("/proc/self/mountinfo")
            .map_err(io_err("read", Path::new("/proc/self/mountinfo")))?;
        let mounts = parse_mountinfo(&mountinfo);
        let m = mounts
            .iter()
            .find(|m| m.version == CgroupVersion::V2)
            .ok_or_else(|| CgroupError::Unsupported("cgroup2 is not mounted".into()))?;
        let mut fs = Self::setup_v2(m, delegated, subtree, None)?;
        let leaf = V2Layout::of(delegated, subtree, None).leaf;
        fs.shim_leaf = leaf.map(|l| join_in_hierarchy(m, &l));
        Ok(fs)
    }

    /// The cgroup that shims and zygotes must be moved into, when it is not the daemon's own.
    pub fn shim_leaf(&self) -> Option<&Path> {
        self.shim_leaf.as_deref()
    }

    fn setup_v2(
        m: &CgroupMount,
        own_path: &str,
        subtree: &str,
        parent: Option<&str>,
    ) -> Result<Self> {
        let layout = V2Layout::of(own_path, subtree, parent);
        let parent_dir = join_in_hierarchy(m, &layout.parent);
        check_controllers(&parent_dir)?;
        match &layout.leaf {
            Some(leaf) if parent_dir != m.mount_point => {
                enable_in_delegated(&parent_dir, &join_in_hierarchy(m, leaf))?;
            }
            // A configured parent is the operator's to keep free of processes; the root cgroup
            // may hold processes and enable controllers at once.
            _ => enable_controllers(&parent_dir)?,
        }
        let base = join_in_hierarchy(m, &layout.base);
        fs::create_dir_all(&base).map_err(io_err("create", &base))?;
        enable_controllers(&base)?;
        Ok(Self {
            version: CgroupVersion::V2,
            bases: vec![(Controller::Unified, base)],
            pool: None,
            shim_leaf: None,
        })
    }

    /// Keeps `n` worker cgroups ready (see [`ReadyPool`]; v1 only: v2 cannot rename a cgroup,
    /// so there every one is made on demand). Removes the ready cgroups a crashed predecessor
    /// left first, whatever `n`.
    pub fn with_pool(mut self, n: usize) -> Self {
        if self.version != CgroupVersion::V1 {
            return self;
        }
        for (_, b) in &self.bases {
            let Ok(rd) = fs::read_dir(b) else { continue };
            for e in rd.flatten() {
                if e.file_name().to_string_lossy().starts_with(READY_PREFIX) {
                    let _ = fs::remove_dir(e.path());
                }
            }
        }
        if n == 0 {
            return self;
        }
        let pool = Arc::new(ReadyPool {
            target: n,
            // Only workers with devices to deny get a devices cgroup (see `create`).
            bases: self
                .bases
                .iter()
                .filter(|(c, _)| *c != Controller::Devices)
                .cloned()
                .collect(),
            state: Mutex::new(PoolState::default()),
            changed: Condvar::new(),
            stop: AtomicBool::new(false),
        });
        let p = pool.clone();
        match std::thread::Builder::new()
            .name("berth-cgroup-pool".into())
            .spawn(move || p.refill())
        {
            Ok(_) => self.pool = Some(pool),
            Err(e) => tracing::warn!(error = %e, "no ready cgroups: thread not started"),
        }
        self
    }

    /// Cgroups ready now.
    pub fn ready(&self) -> usize {
        self.pool.as_ref().map_or(0, |p| p.lock().ready.len())
    }

    /// Makes `cg` out of ready cgroup `name`: renamed in every hierarchy the pool keeps, made
    /// in the others (a devices cgroup, which the pool leaves out). On failure it puts back what
    /// it renamed, removes what it made and the ready cgroup.
    fn adopt(&self, name: &str, cg: &WorkerCgroup) -> Result<()> {
        let Some(pool) = &self.pool else {
            return Err(CgroupError::Unsupported("no ready cgroups".into()));
        };
        let mut renamed: Vec<(PathBuf, &Path)> = Vec::new();
        let mut made: Vec<&Path> = Vec::new();
        let mut seen: Vec<&Path> = Vec::new();
        for (c, to) in &cg.dirs {
            if seen.contains(&to.as_path()) {
                continue; // controllers mounted together share a directory
            }
            seen.push(to);
            let done = match pool.bases.iter().find(|(pc, _)| pc == c) {
                Some((_, b)) => {
                    let from = b.join(name);
                    fs::rename(&from, to)
                        .map(|()| renamed.push((from.clone(), to)))
                        .map_err(io_err("rename", &from))
                }
                None => fs::create_dir(to)
                    .map(|()| made.push(to))
                    .map_err(io_err("create", to)),
            };
            if let Err(e) = done {
                for (from, to) in renamed.iter().rev() {
                    let _ = fs::rename(to, from);
                }
                for d in made {
                    let _ = fs::remove_dir(d);
                }
                remove_dirs(&pool.dirs(name));
                return Err(e);
            }
        }
        Ok(())
    }
}

impl Drop for CgroupFs {
    fn drop(&mut self) {
        if let Some(p) = &self.pool {
            p.drain();
        }
    }
}

/// Path of cgroup `rel` (as /proc/self/cgroup names it) under mount `m`.
pub(crate) fn join_in_hierarchy(m: &CgroupMount, rel: &str) -> PathBuf {
    let rel = rel
        .strip_prefix(m.root.trim_end_matches('/'))
        .unwrap_or(rel);
    m.mount_point.join(rel.trim_start_matches('/'))
}

/// Leaf that holds the processes of a delegated v2 cgroup, so its children can have controllers.
pub const V2_LEAF: &str = "supervisor";

/// Controllers berth enables for the children of its v2 cgroups.
const V2_CONTROLLERS: [&str; 3] = ["cpu", "memory", "pids"];

/// The v2 cgroup delegated to a daemon whose own cgroup is `own_path`: that cgroup, or its parent
/// when the daemon already runs in the [`V2_LEAF`] of one. That happens to every process an
/// earlier berthd moved there (a shell, a test harness, a re-executed daemon) and to a systemd
/// unit with `DelegateSubgroup=supervisor`; taking the leaf itself as delegated would nest a new
/// leaf at every start and move the subtree (and the worker cgroups in it) away from the last one.
fn delegated_path(own_path: &str) -> &str {
    match own_path.trim_end_matches('/').rsplit_once('/') {
        Some(("", V2_LEAF)) => "/",
        Some((parent, V2_LEAF)) => parent,
        _ => own_path,
    }
}

/// Where a daemon puts its cgroups on v2, as paths inside the hierarchy.
#[derive(Debug, Clone, PartialEq, Eq)]
struct V2Layout {
    /// The cgroup whose children get berth's controllers: the configured parent, else the
    /// cgroup delegated to the daemon.
    parent: String,
    /// The leaf that holds the delegated cgroup's own processes (the daemon's among them), so
    /// that its children can have controllers; `None` for a configured parent.
    leaf: Option<String>,
    /// The daemon's subtree, which holds the worker cgroups: a sibling of the leaf.
    base: String,
}

impl V2Layout {
    /// The layout of a daemon whose own cgroup is `own_path` (as /proc/self/cgroup names it).
    /// A daemon that starts in the leaf already — a systemd unit with
    /// `DelegateSubgroup=supervisor`, or a daemon started again from a shell an earlier one
    /// moved there — gets the same layout as one that starts in the delegated cgroup itself.
    fn of(own_path: &str, subtree: &str, parent: Option<&str>) -> Self {
        let join = |a: &str, b: &str| format!("{}/{b}", a.trim_end_matches('/'));
        match parent {
            Some(p) => Self {
                parent: p.to_owned(),
                leaf: None,
                base: join(p, subtree),
            },
            None => {
                let delegated = delegated_path(own_path);
                Self {
                    parent: delegated.to_owned(),
                    leaf: Some(join(delegated, V2_LEAF)),
                    base: join(delegated, subtree),
                }
            }
        }
    }
}

/// Enables berth's controllers for the children of `dir`, a non-root cgroup delegated to the
/// daemon, as a `Delegate=yes` service must: its processes (the daemon's own among them) first
/// move into `leaf`, since a cgroup with processes cannot enable controllers for its children
/// (under `DelegateSubgroup=supervisor` systemd has put them there already). A process forked
/// into `dir` meanwhile makes the kernel refuse (EBUSY), so moving and enabling repeat until
/// they hold.
fn enable_in_delegated(dir: &Path, leaf: &Path) -> Result<()> {
    let mut attempt = 0;
    loop {
        move_into_leaf(dir, leaf)?;
        match enable_controllers(dir) {
            Err(CgroupError::Io { source, .. })
                if source.raw_os_error() == Some(libc::EBUSY) && attempt < 100 =>
            {
                attempt += 1;
                std::thread::sleep(Duration::from_millis(2));
            }
            r => return r,
        }
    }
}

fn move_into_leaf(dir: &Path, leaf: &Path) -> Result<()> {
    let procs = dir.join("cgroup.procs");
    let leaf_procs = leaf.join("cgroup.procs");
    // Processes may fork while they are moved: go on until the cgroup reads empty.
    for _ in 0..100 {
        let text = fs::read_to_string(&procs).map_err(io_err("read", &procs))?;
        let pids = parse_pids(&text);
        if pids.is_empty() {
            return Ok(());
        }
        fs::create_dir_all(leaf).map_err(io_err("create", leaf))?;
        for pid in pids {
            match write_file(&leaf_procs, &pid.to_string()) {
                Ok(()) => {}
                // A process that exited meanwhile, or a kernel thread, is not ours to move.
                Err(CgroupError::Io { source, .. })
                    if matches!(
                        source.raw_os_error(),
                        Some(libc::ESRCH) | Some(libc::EINVAL)
                    ) => {}
                Err(e) => return Err(e),
            }
        }
    }
    Ok(())
}

/// Fails unless `dir`'s parent hands it every controller berth needs.
fn check_controllers(dir: &Path) -> Result<()> {
    let file = dir.join("cgroup.controllers");
    let available = fs::read_to_string(&file).map_err(io_err("read", &file))?;
    let missing: Vec<&str> = V2_CONTROLLERS
        .into_iter()
        .filter(|c| !available.split_whitespace().any(|a| a == *c))
        .collect();
    if missing.is_empty() {
        Ok(())
    } else {
        Err(CgroupError::Unsupported(format!(
            "controller(s) {} not available in {} (not enabled in its parent's \
             cgroup.subtree_control; a systemd unit needs Delegate=yes)",
            missing.join(", "),
            dir.display()
        )))
    }
}

/// Enables berth's controllers for the children of `dir` (a no-op for those already enabled).
fn enable_controllers(dir: &Path) -> Result<()> {
    check_controllers(dir)?;
    let subtree = dir.join("cgroup.subtree_control");
    let enabled = fs::read_to_string(&subtree).map_err(io_err("read", &subtree))?;
    for c in V2_CONTROLLERS {
        if !enabled.split_whitespace().any(|e| e == c) {
            write_file(&subtree, &format!("+{c}"))?;
        }
    }
    Ok(())
}

impl Cgroups for CgroupFs {
    fn version(&self) -> CgroupVersion {
        self.version
    }

    fn create(&self, id: &str, limits: &Limits) -> Result<WorkerCgroup> {
        let mut cg = self.worker(id);
        // On v1 a worker with no device to deny needs no devices cgroup of its own: a new one
        // only copies its parent's rules (the kernel copies the whole exception list at each
        // mkdir), so the worker may open what its shim may. That saves a mkdir, a join and an
        // rmdir per worker on hosts without GPUs.
        if cg.version == CgroupVersion::V1 && limits.denied_devices.is_empty() {
            cg.dirs.retain(|(c, _)| *c != Controller::Devices);
        }
        if let Some(name) = self.pool.as_ref().and_then(|p| p.take(Preset::of(limits))) {
            match self.adopt(&name, &cg) {
                Ok(()) => {
                    if let Err(e) = apply_limits(&cg, limits, true) {
                        let _ = cg.remove();
                        return Err(e);
                    }
                    return Ok(cg);
                }
                Err(e) => tracing::warn!(error = %e, "ready cgroup unusable; making one"),
            }
        }
        let made = (|| {
            for d in distinct(cg.dirs.iter().map(|(_, d)| d.clone())) {
                fs::create_dir(&d).map_err(io_err("create", &d))?;
            }
            apply_limits(&cg, limits, false)
        })();
        if let Err(e) = made {
            let _ = cg.remove();
            return Err(e);
        }
        Ok(cg)
    }

    fn worker(&self, id: &str) -> WorkerCgroup {
        WorkerCgroup {
            version: self.version,
            dirs: self.bases.iter().map(|(c, b)| (*c, b.join(id))).collect(),
        }
    }

    fn list(&self) -> Vec<String> {
        let Some((_, base)) = self.bases.first() else {
            return Vec::new();
        };
        let Ok(rd) = fs::read_dir(base) else {
            return Vec::new();
        };
        rd.filter_map(|e| e.ok())
            .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
            .filter_map(|e| e.file_name().into_string().ok())
            .filter(|n| !n.starts_with(READY_PREFIX))
            .collect()
    }

    fn remove_subtree(&self) -> Result<()> {
        if let Some(p) = &self.pool {
            p.drain();
        }
        for (_, b) in &self.bases {
            match fs::remove_dir(b) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_err("remove", b)(e)),
            }
        }
        Ok(())
    }

    fn describe(&self) -> String {
        let dirs: Vec<String> = self
            .bases
            .iter()
            .map(|(_, b)| b.display().to_string())
            .collect();
        format!("cgroup v{} at {}", self.version.number(), dirs.join(", "))
    }
}

/// Writes limits `l` into the new cgroup `cg`; `preset`: the cgroup came from the pool with the
/// [`Preset`] of `l` written already.
// cgroups-rs: same syscalls on v1 but O_CREAT|O_TRUNC opens, +1 read of cpu.max per v2 launch.
fn apply_limits(cg: &WorkerCgroup, l: &Limits, preset: bool) -> Result<()> {
    let w = |c: Controller, f: &str, v: String| match cg.dir(c) {
        Some(d) => write_file(&d.join(f), &v),
        None => Ok(()),
    };
    match cg.version {
        CgroupVersion::V1 => {
            if !preset {
                if let Some(d) = cg.dir(Controller::Cpu) {
                    write_cpu_quota(d, l.cpu_quota_us())?;
                }
                w(Controller::Pids, "pids.max", l.pids_max.to_string())?;
            }
            w(
                Controller::Memory,
                "memory.limit_in_bytes",
                l.memory_bytes.to_string(),
            )?;
            // Where swap accounting exists, forbid swap on top of the limit.
            if let Some(d) = cg.dir(Controller::Memory) {
                let sw = d.join("memory.memsw.limit_in_bytes");
                if sw.exists() {
                    write_file(&sw, &l.memory_bytes.to_string())?;
                }
            }
            if !l.denied_devices.is_empty() {
                // The child inherits the parent's list; each line adds one exception. (v1 cannot
                // punch holes into a wildcard deny, so every denied node is named.)
                let d = cg.dir(Controller::Devices).ok_or_else(|| {
                    CgroupError::Unsupported(
                        "the v1 devices controller is not mounted: GPU isolation cannot be enforced"
                            .into(),
                    )
                })?;
                let deny = d.join("devices.deny");
                for node in &l.denied_devices {
                    write_file(&deny, &node.v1_rule())?;
                }
            }
        }
        CgroupVersion::V2 => {
            w(
                Controller::Unified,
                "cpu.max",
                format!("{} {}", l.cpu_quota_us(), CPU_PERIOD_US),
            )?;
            w(
                Controller::Unified,
                "memory.max",
                l.memory_bytes.to_string(),
            )?;
            if let Some(d) = cg.dir(Controller::Unified) {
                let sw = d.join("memory.swap.max");
                if sw.exists() {
                    write_file(&sw, "0")?;
                }
            }
            w(Controller::Unified, "pids.max", l.pids_max.to_string())?;
            if !l.denied_devices.is_empty() {
                if let Some(d) = cg.dir(Controller::Unified) {
                    attach_device_filter(d, &l.denied_devices)?;
                }
            }
        }
    }
    Ok(())
}

// bpf(2) commands, program and attach types, flags (linux/bpf.h).
const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_PROG_ATTACH: libc::c_long = 8;
const BPF_PROG_TYPE_CGROUP_DEVICE: u32 = 15;
const BPF_CGROUP_DEVICE: u32 = 6;
/// Ancestors' device programs keep running too, so a parent's policy still applies.
const BPF_F_ALLOW_MULTI: u32 = 2;

/// `union bpf_attr` as `BPF_PROG_LOAD` reads it (the fields up to `expected_attach_type`),
/// padded with zeros as the kernel requires of fields it knows but we do not set.
#[repr(C, align(8))]
struct BpfProgLoadAttr {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
    prog_name: [u8; 16],
    prog_ifindex: u32,
    expected_attach_type: u32,
    _pad: [u8; 48],
}

/// `union bpf_attr` as `BPF_PROG_ATTACH` reads it.
#[repr(C, align(8))]
struct BpfProgAttachAttr {
    target_fd: u32,
    attach_bpf_fd: u32,
    attach_type: u32,
    attach_flags: u32,
    replace_bpf_fd: u32,
    _pad: [u8; 44],
}

fn bpf(cmd: libc::c_long, attr: *mut libc::c_void, size: usize) -> io::Result<libc::c_long> {
    // SAFETY: the caller passes a pointer to a live, fully initialised attr of `size` bytes; the
    // kernel reads it (and writes only into buffers the attr points to, which outlive the call).
    let r = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr, size) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// Loads the device filter denying `denied` and attaches it to the v2 cgroup `dir`. The cgroup
/// keeps the program alive; it goes when the cgroup is removed.
// cgroups-rs: has no device eBPF program; its devices controller is v1 only.
fn attach_device_filter(dir: &Path, denied: &[DeviceNode]) -> Result<()> {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    let fail = |op: &'static str, message: String| CgroupError::DeviceFilter {
        op,
        path: dir.to_path_buf(),
        message,
    };
    let prog = devbpf::deny_filter(denied).map_err(|e| fail("build", e.to_string()))?;
    let bytes = devbpf::to_bytes(&prog);
    let license = b"Apache-2.0\0";
    let load = |log: Option<&mut Vec<u8>>| -> io::Result<OwnedFd> {
        let (log_level, log_size, log_buf) = match log {
            Some(buf) => (1, buf.len() as u32, buf.as_mut_ptr() as u64),
            None => (0, 0, 0),
        };
        let mut name = [0u8; 16];
        name[..11].copy_from_slice(b"berth_devcg");
        let mut attr = BpfProgLoadAttr {
            prog_type: BPF_PROG_TYPE_CGROUP_DEVICE,
            insn_cnt: prog.len() as u32,
            insns: bytes.as_ptr() as u64,
            license: license.as_ptr() as u64,
            log_level,
            log_size,
            log_buf,
            kern_version: 0,
            prog_flags: 0,
            prog_name: name,
            prog_ifindex: 0,
            // Not checked for device programs; left 0 as runc does.
            expected_attach_type: 0,
            _pad: [0; 48],
        };
        let fd = bpf(
            BPF_PROG_LOAD,
            (&mut attr as *mut BpfProgLoadAttr).cast(),
            std::mem::size_of::<BpfProgLoadAttr>(),
        )?;
        // SAFETY: BPF_PROG_LOAD returned a new program fd that nobody else owns.
        Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
    };
    let prog_fd = match load(None) {
        Ok(fd) => fd,
        Err(e) => {
            // Load again with the verifier's log, for an error that says why.
            let mut log = vec![0u8; 64 * 1024];
            let _ = load(Some(&mut log));
            let end = log.iter().position(|b| *b == 0).unwrap_or(log.len());
            let verifier = String::from_utf8_lossy(&log[..end]).trim().to_owned();
            let msg = if verifier.is_empty() {
                e.to_string()
            } else {
                format!("{e}; verifier: {verifier}")
            };
            return Err(fail("load", msg));
        }
    };
    let cgroup = fs::File::open(dir).map_err(io_err("open", dir))?;
    let mut attr = BpfProgAttachAttr {
        target_fd: cgroup.as_raw_fd() as u32,
        attach_bpf_fd: prog_fd.as_raw_fd() as u32,
        attach_type: BPF_CGROUP_DEVICE,
        attach_flags: BPF_F_ALLOW_MULTI,
        replace_bpf_fd: 0,
        _pad: [0; 44],
    };
    bpf(
        BPF_PROG_ATTACH,
        (&mut attr as *mut BpfProgAttachAttr).cast(),
        std::mem::size_of::<BpfProgAttachAttr>(),
    )
    .map_err(|e| fail("attach", e.to_string()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const HYBRID: &str = "\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
33 31 0:30 / /sys/fs/cgroup/cpuacct rw,relatime - cgroup cgroup rw,cpuacct
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
39 31 0:36 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,xattr,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
22 1 0:5 / /proc rw - proc proc rw";

    #[test]
    fn mountinfo_finds_v1_hierarchies_and_unified() {
        let m = parse_mountinfo(HYBRID);
        assert_eq!(m.len(), 6);
        assert_eq!(m[0].controllers, vec!["cpu"]);
        assert_eq!(m[2].mount_point, PathBuf::from("/sys/fs/cgroup/memory"));
        assert!(
            m[4].controllers.is_empty(),
            "name=systemd has no controller"
        );
        assert_eq!(m[5].version, CgroupVersion::V2);
    }

    #[test]
    fn mountinfo_combined_cpu_cpuacct() {
        let m = parse_mountinfo(
            "25 24 0:22 / /sys/fs/cgroup/cpu,cpuacct rw - cgroup cgroup rw,cpu,cpuacct",
        );
        assert_eq!(m[0].controllers, vec!["cpu", "cpuacct"]);
    }

    #[test]
    fn proc_cgroup_lines() {
        let p = parse_proc_cgroup(
            "4:memory:/process_api/x\n1:name=systemd:/\n0::/system.slice/b.service\n",
        );
        assert_eq!(
            p[0],
            (vec!["memory".to_string()], "/process_api/x".to_string())
        );
        assert_eq!(p[1], (vec![], "/".to_string()));
        assert_eq!(p[2], (vec![], "/system.slice/b.service".to_string()));
    }

    #[test]
    fn flat_keyed_files() {
        let events = "low 0\nhigh 0\nmax 12\noom 3\noom_kill 2\noom_group_kill 0\n";
        assert_eq!(parse_flat_keyed(events, "oom_kill"), Some(2));
        assert_eq!(parse_flat_keyed(events, "oom"), Some(3));
        assert_eq!(
            parse_flat_keyed("oom_kill_disable 0\nunder_oom 0\noom_kill 1\n", "oom_kill"),
            Some(1)
        );
        assert_eq!(
            parse_flat_keyed("usage_usec 1500\nuser_usec 1000\n", "usage_usec"),
            Some(1500)
        );
        assert_eq!(parse_flat_keyed("", "oom_kill"), None);
    }

    #[test]
    fn only_a_single_v2_dir_is_cloned_into() {
        let v2 = WorkerCgroup {
            version: CgroupVersion::V2,
            dirs: vec![(Controller::Unified, "/sys/fs/cgroup/berth-x/w1".into())],
        };
        assert_eq!(
            v2.clone_into_dir(),
            Some(Path::new("/sys/fs/cgroup/berth-x/w1"))
        );
        assert_eq!(
            v2.join_files(),
            vec![PathBuf::from("/sys/fs/cgroup/berth-x/w1/cgroup.procs")]
        );
        let v1 = WorkerCgroup {
            version: CgroupVersion::V1,
            dirs: vec![
                (
                    Controller::Memory,
                    "/sys/fs/cgroup/memory/berth-x/w1".into(),
                ),
                (Controller::Pids, "/sys/fs/cgroup/pids/berth-x/w1".into()),
            ],
        };
        assert_eq!(v1.clone_into_dir(), None);
        assert_eq!(
            v1.join_files(),
            vec![
                PathBuf::from("/sys/fs/cgroup/memory/berth-x/w1/tasks"),
                PathBuf::from("/sys/fs/cgroup/pids/berth-x/w1/tasks"),
            ]
        );
        // A v1 worker in a single hierarchy still joins through its file.
        let v1_one = WorkerCgroup {
            version: CgroupVersion::V1,
            dirs: vec![(Controller::Pids, "/sys/fs/cgroup/pids/w".into())],
        };
        assert_eq!(v1_one.clone_into_dir(), None);
        let v2_none = WorkerCgroup {
            version: CgroupVersion::V2,
            dirs: Vec::new(),
        };
        assert_eq!(v2_none.clone_into_dir(), None);
    }

    #[test]
    fn quota_rounds_and_has_a_floor() {
        let l = |cpu| Limits {
            cpu,
            memory_bytes: 1,
            pids_max: 1,
            denied_devices: Vec::new(),
        };
        assert_eq!(l(0.5).cpu_quota_us(), 50_000);
        assert_eq!(l(2.0).cpu_quota_us(), 200_000);
        assert_eq!(l(0.001).cpu_quota_us(), 1_000);
    }

    #[test]
    fn delegated_cgroup_of_a_daemon_in_the_leaf_is_the_leafs_parent() {
        let d = delegated_path;
        assert_eq!(
            d("/system.slice/berthd.service"),
            "/system.slice/berthd.service"
        );
        assert_eq!(
            d("/system.slice/berthd.service/supervisor"),
            "/system.slice/berthd.service"
        );
        assert_eq!(d("/supervisor"), "/");
        assert_eq!(d("/"), "/");
        assert_eq!(d("/a/supervisor-2"), "/a/supervisor-2");
    }

    #[test]
    fn v2_layout_is_the_same_whether_the_daemon_starts_in_the_leaf_or_not() {
        type Case = (
            &'static str,
            Option<&'static str>,
            (&'static str, Option<&'static str>, &'static str),
        );
        let unit = "/system.slice/berthd.service";
        let cases: &[Case] = &[
            // Delegate=yes: the daemon starts in the unit's cgroup and moves into the leaf.
            (
                unit,
                None,
                (
                    unit,
                    Some("/system.slice/berthd.service/supervisor"),
                    "/system.slice/berthd.service/berth-h",
                ),
            ),
            // Delegate=yes with DelegateSubgroup=supervisor (systemd 254+), or a daemon started
            // again from the leaf: the same layout, no supervisor/supervisor.
            (
                "/system.slice/berthd.service/supervisor",
                None,
                (
                    unit,
                    Some("/system.slice/berthd.service/supervisor"),
                    "/system.slice/berthd.service/berth-h",
                ),
            ),
            (
                "/system.slice/berthd.service/supervisor/",
                None,
                (
                    unit,
                    Some("/system.slice/berthd.service/supervisor"),
                    "/system.slice/berthd.service/berth-h",
                ),
            ),
            // The root cgroup (a test machine, a container).
            ("/", None, ("/", Some("/supervisor"), "/berth-h")),
            ("/supervisor", None, ("/", Some("/supervisor"), "/berth-h")),
            // Only a leaf named exactly so is the leaf.
            (
                "/a/supervisors",
                None,
                (
                    "/a/supervisors",
                    Some("/a/supervisors/supervisor"),
                    "/a/supervisors/berth-h",
                ),
            ),
            // A configured parent is used as it is, wherever the daemon runs.
            (
                "/system.slice/berthd.service/supervisor",
                Some("/berth.slice"),
                ("/berth.slice", None, "/berth.slice/berth-h"),
            ),
            (unit, Some("/"), ("/", None, "/berth-h")),
        ];
        for &(own, parent, (p, leaf, base)) in cases {
            assert_eq!(
                V2Layout::of(own, "berth-h", parent),
                V2Layout {
                    parent: p.into(),
                    leaf: leaf.map(Into::into),
                    base: base.into(),
                },
                "own {own:?} parent {parent:?}"
            );
        }
    }

    #[test]
    fn kill_rounds_back_off_to_50_ms() {
        let pauses: Vec<u64> = (0..10).map(|r| kill_pause(r).as_millis() as u64).collect();
        assert_eq!(pauses, [1, 2, 4, 8, 16, 32, 50, 50, 50, 50]);
        assert_eq!(kill_pause(u32::MAX), Duration::from_millis(50));
        // 10 s of a cgroup that will not die: a few hundred rounds, not a busy loop.
        let mut spent = Duration::ZERO;
        let mut rounds = 0;
        while spent < Duration::from_secs(10) {
            spent += kill_pause(rounds) + FREEZE_WAIT;
            rounds += 1;
        }
        assert!(rounds < 200, "{rounds} rounds in 10 s");
    }

    #[test]
    fn cpu_quota_files() {
        for (text, quota) in [
            ("50000\n", true),
            ("-1\n", false),
            ("50000 100000\n", true),
            ("max 100000\n", false),
            ("max\n", false),
            ("", false),
        ] {
            assert_eq!(has_cpu_quota(text), quota, "{text:?}");
        }
    }

    #[test]
    fn pids_of_every_hierarchy_once() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("pids"), dir.path().join("memory"));
        for (d, procs) in [(&a, "30\n10\n20\n"), (&b, "20\n30\n40\n")] {
            fs::create_dir(d).unwrap();
            fs::write(d.join("cgroup.procs"), procs).unwrap();
        }
        let cg = WorkerCgroup {
            version: CgroupVersion::V1,
            dirs: vec![
                (Controller::Pids, a.clone()),
                (Controller::Memory, b),
                (Controller::Cpu, dir.path().join("gone")),
                (Controller::Cpuacct, a),
            ],
        };
        assert_eq!(cg.pids(), vec![10, 20, 30, 40]);
    }

    #[test]
    fn hierarchy_join_strips_mount_root() {
        let m = CgroupMount {
            mount_point: "/sys/fs/cgroup".into(),
            root: "/".into(),
            version: CgroupVersion::V2,
            controllers: vec![],
        };
        assert_eq!(
            join_in_hierarchy(&m, "/a/b"),
            PathBuf::from("/sys/fs/cgroup/a/b")
        );
        assert_eq!(join_in_hierarchy(&m, "/"), PathBuf::from("/sys/fs/cgroup"));
        let nested = CgroupMount {
            root: "/outer".into(),
            ..m
        };
        assert_eq!(
            join_in_hierarchy(&nested, "/outer/x"),
            PathBuf::from("/sys/fs/cgroup/x")
        );
    }

    /// Real kernel, root only: a process in a cgroup whose device rules deny `c 195:1` gets
    /// EPERM opening such a node and ENXIO (allowed; no driver) opening `c 195:0`. Runs the v2
    /// eBPF filter where a cgroup2 hierarchy is mounted (on the hybrid layout too) and the v1
    /// `devices.deny` where the v1 devices controller is.
    #[test]
    fn device_rules_on_the_real_kernel() {
        use std::os::unix::ffi::OsStrExt;
        use std::os::unix::process::CommandExt;
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("skipped: needs root (cgroups, mknod)");
            return;
        }
        let mounts = parse_mountinfo(&fs::read_to_string("/proc/self/mountinfo").unwrap());
        let own = parse_proc_cgroup(&fs::read_to_string("/proc/self/cgroup").unwrap());
        let nodes = tempfile::tempdir().unwrap();
        let mk = |minor: u32| {
            let p = nodes.path().join(format!("nvidia{minor}"));
            let c = std::ffi::CString::new(p.as_os_str().as_bytes()).unwrap();
            // SAFETY: c is a valid path; mknod takes plain integers otherwise.
            let r = unsafe {
                libc::mknod(c.as_ptr(), libc::S_IFCHR | 0o666, libc::makedev(195, minor))
            };
            assert_eq!(
                r,
                0,
                "mknod {}: {}",
                p.display(),
                io::Error::last_os_error()
            );
            c
        };
        let (allowed, denied) = (mk(0), mk(1));
        // Joins the cgroup, then opens `node` before exec; the open's errno comes back as the
        // spawn error.
        let open_in = |procs: &Path, node: &std::ffi::CString| -> Option<i32> {
            let procs = fs::OpenOptions::new().write(true).open(procs).unwrap();
            let fd = std::os::fd::AsRawFd::as_raw_fd(&procs);
            let node = node.clone();
            let mut cmd = std::process::Command::new("/bin/true");
            // SAFETY: the hook only makes raw syscalls (write, open, close) on values prepared
            // before the fork.
            unsafe {
                cmd.pre_exec(move || {
                    if libc::write(fd, b"0".as_ptr().cast(), 1) != 1 {
                        return Err(io::Error::other("join cgroup"));
                    }
                    let f = libc::open(node.as_ptr(), libc::O_RDONLY);
                    if f < 0 {
                        return Err(io::Error::last_os_error());
                    }
                    libc::close(f);
                    Ok(())
                })
            };
            match cmd.spawn() {
                Ok(mut c) => {
                    let _ = c.wait();
                    Some(0)
                }
                Err(e) => e.raw_os_error(),
            }
        };
        let name = format!("berth-devtest-{}", std::process::id());
        let mut tried = 0;
        if let Some(m) = mounts.iter().find(|m| m.version == CgroupVersion::V2) {
            let own_path = own
                .iter()
                .find(|(c, _)| c.is_empty())
                .map(|(_, p)| p.as_str())
                .unwrap_or("/");
            let dir = join_in_hierarchy(m, own_path).join(&name);
            fs::create_dir(&dir).unwrap();
            let res = attach_device_filter(&dir, &[DeviceNode::char(195, 1)]).map(|()| {
                (
                    open_in(&dir.join("cgroup.procs"), &allowed),
                    open_in(&dir.join("cgroup.procs"), &denied),
                )
            });
            remove_dir_retry(&dir).unwrap();
            let (a, d) = res.unwrap();
            assert_eq!(
                a,
                Some(libc::ENXIO),
                "v2: the allowed node is open to the driver"
            );
            assert_eq!(d, Some(libc::EPERM), "v2: the denied node is refused");
            tried += 1;
        }
        if let Some(m) = mounts.iter().find(|m| {
            m.version == CgroupVersion::V1 && m.controllers.iter().any(|c| c == "devices")
        }) {
            let own_path = own
                .iter()
                .find(|(c, _)| c.iter().any(|x| x == "devices"))
                .map(|(_, p)| p.as_str())
                .unwrap_or("/");
            let dir = join_in_hierarchy(m, own_path).join(&name);
            fs::create_dir(&dir).unwrap();
            let res = write_file(
                &dir.join("devices.deny"),
                &DeviceNode::char(195, 1).v1_rule(),
            )
            .map(|()| {
                (
                    open_in(&dir.join("cgroup.procs"), &allowed),
                    open_in(&dir.join("cgroup.procs"), &denied),
                )
            });
            remove_dir_retry(&dir).unwrap();
            let (a, d) = res.unwrap();
            assert_eq!(
                a,
                Some(libc::ENXIO),
                "v1: the allowed node is open to the driver"
            );
            assert_eq!(d, Some(libc::EPERM), "v1: the denied node is refused");
            tried += 1;
        }
        if tried == 0 {
            crate::cannot_run("neither cgroup2 nor the v1 devices controller is mounted");
        } else {
            eprintln!("device rules enforced by {tried} cgroup interface(s)");
        }
    }

    /// The real cgroup file system with a subtree of its own for a test, or `None` (with the
    /// reason printed) where the test cannot run: not root, or no usable hierarchy (a failure
    /// under CI, see [`crate::cannot_run`]).
    fn test_cgroups(subtree: &str) -> Option<CgroupFs> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("skipped: needs root (cgroups)");
            return None;
        }
        CgroupFs::discover(&format!("{subtree}-{}", std::process::id()), None)
            .inspect_err(|e| crate::cannot_run(&e.to_string()))
            .ok()
    }

    /// Starts `sh -c script` as `nobody` inside `cg` (joined before exec, as the shim does).
    fn spawn_in(cg: &WorkerCgroup, script: &str) -> std::process::Child {
        use std::os::fd::AsRawFd;
        use std::os::unix::process::CommandExt;
        let joins: Vec<fs::File> = cg
            .join_files()
            .iter()
            .map(|f| fs::OpenOptions::new().write(true).open(f).unwrap())
            .collect();
        let fds: Vec<i32> = joins.iter().map(|f| f.as_raw_fd()).collect();
        let mut cmd = std::process::Command::new("/bin/sh");
        cmd.args(["-c", script])
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
        // SAFETY: the hook only makes raw syscalls (write, setgroups, setresgid, setresuid) on
        // values prepared before the fork.
        unsafe {
            cmd.pre_exec(move || {
                for fd in &fds {
                    if libc::write(*fd, b"0".as_ptr().cast(), 1) != 1 {
                        return Err(io::Error::last_os_error());
                    }
                }
                if libc::setgroups(0, std::ptr::null()) != 0
                    || libc::setresgid(65534, 65534, 65534) != 0
                    || libc::setresuid(65534, 65534, 65534) != 0
                {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            })
        };
        let child = cmd.spawn().unwrap();
        drop(joins);
        child
    }

    /// Real kernel, root only: a fork bomb of busy shells, throttled by its quota, dies within
    /// a second of `kill_all`, leaving its cgroup empty and thawed. Before the thaw after every
    /// round and the lifted quota, the freeze of thousands of throttled tasks did not complete,
    /// tasks with a pending SIGKILL stayed frozen, and the cgroup never emptied.
    #[test]
    fn kill_all_ends_a_throttled_fork_bomb() {
        let Some(cgs) = test_cgroups("berth-killtest") else {
            return;
        };
        let limits = Limits {
            cpu: 0.5,
            memory_bytes: 512 << 20,
            pids_max: 2048,
            denied_devices: Vec::new(),
        };
        let cg = cgs.create("bomb", &limits).unwrap();
        let mut sh = spawn_in(&cg, "bomb() { bomb | bomb & while :; do :; done; }; bomb");
        let t = Instant::now();
        while cg.pids().len() < 1000 && t.elapsed() < Duration::from_secs(60) {
            std::thread::sleep(Duration::from_millis(50));
        }
        // Held to 1 % of a core, a task gets the CPU once in many periods: the freeze of all of
        // them takes minutes.
        let (file, quota) = match cg.version {
            CgroupVersion::V1 => (
                cg.dir(Controller::Cpu).unwrap().join("cpu.cfs_quota_us"),
                "1000",
            ),
            CgroupVersion::V2 => (
                cg.dir(Controller::Unified).unwrap().join("cpu.max"),
                "1000 100000",
            ),
        };
        write_file(&file, quota).unwrap();
        std::thread::sleep(Duration::from_secs(1));
        let before = cg.pids().len();
        let t = Instant::now();
        let killed = cg.kill_all(Duration::from_secs(20));
        let took = t.elapsed();
        let left = cg.pids();
        let frozen = match cg.version {
            CgroupVersion::V1 => cg.dir(Controller::Freezer).map(|d| {
                fs::read_to_string(d.join("freezer.state"))
                    .unwrap()
                    .trim()
                    .to_owned()
            }),
            CgroupVersion::V2 => None,
        };
        if !left.is_empty() {
            thaw_and_kill(&cg);
        }
        let _ = sh.wait();
        cg.remove().unwrap();
        cgs.remove_subtree().unwrap();
        eprintln!("fork bomb of {before} tasks killed in {took:?}: {killed:?}");
        killed.unwrap();
        assert!(left.is_empty(), "{} left", left.len());
        assert!(before >= 1000, "the bomb never got going: {before} tasks");
        // Several times slower in the emulated cgroup-v2 guest (tests/vm), which says how much.
        let scale = std::env::var("BERTH_TEST_TIMEOUT_SCALE")
            .ok()
            .and_then(|s| s.parse::<f64>().ok())
            .filter(|s| s.is_finite() && *s >= 1.0)
            .unwrap_or(1.0);
        let limit = Duration::from_secs(2).mul_f64(scale);
        assert!(took < limit, "kill_all took {took:?}, more than {limit:?}");
        assert!(
            frozen.as_deref().is_none_or(|f| f == "THAWED"),
            "freezer {frozen:?}"
        );
    }

    /// Test clean-up that does not rely on `kill_all`.
    fn thaw_and_kill(cg: &WorkerCgroup) {
        cg.thaw();
        let _ = cg.lift_cpu_quota();
        for _ in 0..500 {
            let pids = cg.pids();
            if pids.is_empty() {
                return;
            }
            for p in pids {
                // SAFETY: kill(2) with integers.
                unsafe { libc::kill(p, libc::SIGKILL) };
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Real kernel, root, v1 only: a launch takes a ready cgroup with its own quota (renamed to
    /// the worker id, memory limit written), one with another quota is made on demand, ready
    /// cgroups are no workers' and go with the subtree.
    #[test]
    fn ready_cgroups_on_the_real_kernel() {
        let Some(cgs) = test_cgroups("berth-pooltest") else {
            return;
        };
        if cgs.version != CgroupVersion::V1 {
            let _ = cgs.remove_subtree();
            eprintln!("skipped: ready cgroups are v1 only");
            return;
        }
        let cgs = cgs.with_pool(2);
        let read = |cg: &WorkerCgroup, c: Controller, f: &str| {
            fs::read_to_string(cg.dir(c).unwrap().join(f))
                .unwrap()
                .trim()
                .to_owned()
        };
        let ready_dirs = |c: &CgroupFs| {
            fs::read_dir(&c.bases[0].1)
                .unwrap()
                .flatten()
                .filter(|e| e.file_name().to_string_lossy().starts_with(READY_PREFIX))
                .count()
        };
        let wait_ready = |c: &CgroupFs, n: usize| {
            let t = Instant::now();
            while c.ready() < n && t.elapsed() < Duration::from_secs(10) {
                std::thread::sleep(Duration::from_millis(5));
            }
            assert_eq!(c.ready(), n);
        };
        let limits = |cpu: f64| Limits {
            cpu,
            memory_bytes: 64 << 20,
            pids_max: 100,
            denied_devices: Vec::new(),
        };
        // Nothing is made before a launch says what it needs.
        assert_eq!(cgs.ready(), 0);
        let a = cgs.create("pooltesta", &limits(0.5)).unwrap();
        wait_ready(&cgs, 2);
        assert_eq!(ready_dirs(&cgs), 2);
        assert_eq!(cgs.list(), vec!["pooltesta".to_owned()]);
        // Taken: renamed, with the quota and pids limit it was made with and its memory limit.
        let b = cgs.create("pooltestb", &limits(0.5)).unwrap();
        assert!(cgs.ready() < 2 || ready_dirs(&cgs) == 2);
        for cg in [&a, &b] {
            assert_eq!(read(cg, Controller::Cpu, "cpu.cfs_quota_us"), "50000");
            assert_eq!(read(cg, Controller::Cpu, "cpu.cfs_period_us"), "100000");
            assert_eq!(read(cg, Controller::Pids, "pids.max"), "100");
            assert_eq!(
                read(cg, Controller::Memory, "memory.limit_in_bytes"),
                (64u64 << 20).to_string()
            );
        }
        // Another quota: made on demand; the pool then makes that one.
        let c = cgs.create("pooltestc", &limits(0.25)).unwrap();
        assert_eq!(read(&c, Controller::Cpu, "cpu.cfs_quota_us"), "25000");
        wait_ready(&cgs, 2);
        let d = cgs.create("pooltestd", &limits(0.25)).unwrap();
        assert_eq!(read(&d, Controller::Cpu, "cpu.cfs_quota_us"), "25000");
        let mut names = cgs.list();
        names.sort();
        assert_eq!(names, ["pooltesta", "pooltestb", "pooltestc", "pooltestd"]);
        for cg in [a, b, c, d] {
            cg.remove().unwrap();
        }
        cgs.remove_subtree().unwrap();
        assert!(cgs.bases.iter().all(|(_, b)| !b.exists()));
    }

    /// Real kernel, root only: on v1 a worker gets a devices cgroup only when it has devices to
    /// deny, whether its cgroup is made on demand or out of a ready one; removal by id copes
    /// with either. On v2 its one cgroup holds everything.
    #[test]
    fn devices_cgroup_only_where_devices_are_denied() {
        let Some(cgs) = test_cgroups("berth-devcg") else {
            return;
        };
        let cgs = cgs.with_pool(1);
        let limits = |denied: Vec<DeviceNode>| Limits {
            cpu: 0.5,
            memory_bytes: 64 << 20,
            pids_max: 16,
            denied_devices: denied,
        };
        let has_devices =
            |cg: &WorkerCgroup| cg.dirs.iter().any(|(c, _)| *c == Controller::Devices);
        let v1_devices = cgs.version == CgroupVersion::V1
            && cgs.bases.iter().any(|(c, _)| *c == Controller::Devices);
        let gpu = vec![DeviceNode::char(195, 1)];
        let mut made = Vec::new();
        // On demand first, then (v1) out of the ready cgroup the first launch asked for.
        for (i, denied) in [vec![], gpu.clone(), vec![], gpu.clone()]
            .into_iter()
            .enumerate()
        {
            let wants = !denied.is_empty();
            if i >= 2 && cgs.version == CgroupVersion::V1 {
                let t = Instant::now();
                while cgs.ready() == 0 && t.elapsed() < Duration::from_secs(10) {
                    std::thread::sleep(Duration::from_millis(5));
                }
                assert_eq!(cgs.ready(), 1);
            }
            let id = format!("devtest{i}");
            let cg = cgs.create(&id, &limits(denied)).unwrap();
            assert_eq!(has_devices(&cg), wants && v1_devices, "{cg:?}");
            assert!(cg.dirs.iter().all(|(_, d)| d.is_dir()), "{cg:?}");
            let stray = cgs
                .worker(&id)
                .dirs
                .into_iter()
                .any(|(c, d)| c == Controller::Devices && d.exists() && !(wants && v1_devices));
            assert!(!stray, "a devices cgroup for worker {i}");
            made.push(id);
        }
        let mut listed = cgs.list();
        listed.sort();
        assert_eq!(listed, made);
        // Removal by id (as after a restart) finds what exists and skips what never did.
        for id in &made {
            cgs.worker(id).remove().unwrap();
        }
        assert!(cgs.list().is_empty(), "{:?}", cgs.list());
        cgs.remove_subtree().unwrap();
    }

    /// v1 controllers mounted together (`cpu,cpuacct`) share one directory: a worker joins and
    /// makes it once.
    #[test]
    fn co_mounted_controllers_share_one_directory() {
        let d = PathBuf::from("/sys/fs/cgroup/cpu,cpuacct/berth/w1");
        let cg = WorkerCgroup {
            version: CgroupVersion::V1,
            dirs: vec![
                (Controller::Cpu, d.clone()),
                (Controller::Cpuacct, d.clone()),
                (Controller::Memory, "/sys/fs/cgroup/memory/berth/w1".into()),
            ],
        };
        assert_eq!(
            cg.join_files(),
            vec![
                d.join("tasks"),
                "/sys/fs/cgroup/memory/berth/w1/tasks".into()
            ]
        );
        assert_eq!(cg.dir(Controller::Cpuacct), Some(d.as_path()));
        assert_eq!(distinct([d.clone(), d.clone()]), vec![d]);
    }
}
