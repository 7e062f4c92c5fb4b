//! Starting a worker's shim. The daemon never forks itself (a fork of a threaded process of this
//! size is slow and unsafe): it writes the spec and asks a shim zygote ([`super::zygote`]) to
//! fork `berth-shim` for the worker, with the shim's stdout on a handshake pipe.
//!
//! The daemon keeps one zygote per spawn lane (one per CPU, at most 4), each used by one spawn at
//! a time. They are started with the spawner, when the daemon's fd table is still small and the
//! daemon sits in its own cgroup (on cgroup v1 a process takes the cgroups of the thread that
//! started it); the shims they fork inherit that cgroup, as exec'd shims did. Neither way copies
//! the daemon's fd table, which holds a pidfd per live worker: a posix_spawn from the daemon
//! copies it into the child and closes it again at exec, one file at a time (1.6 ms per launch
//! with 4000 workers alive here). A zygote that died is replaced at the next spawn; where none
//! can be started, the shim is exec'd from the daemon (slower; same result: its worker's process
//! drops itself the capabilities that a zygote drops from its bounding set once, see
//! `super::creds`).

use std::fs;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};

use super::proc::{pidfd_open, pipe_cloexec};
use super::shim::{ShimSpec, SPEC_FILE};
use super::zygote::{Forked, Zygote, ZygoteError};

/// Failure to start a shim.
#[derive(Debug, thiserror::Error)]
pub enum SpawnError {
    #[error("write spec {path}: {source}")]
    Spec {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("start shim {shim}: {source}")]
    Shim {
        shim: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// A started shim: its pid, an fd that becomes readable when the shim has exited (a pidfd; a
/// fake's pipe whose write end it closes), and the read end of the handshake pipe.
#[derive(Debug)]
pub struct ShimHandle {
    pub pid: u32,
    /// Start time of the shim (clock ticks since boot), to recognise it after a daemon restart.
    pub starttime: Option<u64>,
    pub pidfd: OwnedFd,
    pub handshake: OwnedFd,
}

/// Starts shims. A trait so that services can be tested with a recording fake.
pub trait Spawner: Send + Sync {
    fn spawn(&self, dir: &Path, spec: &ShimSpec) -> Result<ShimHandle, SpawnError>;
}

/// Starts the real `berth-shim` binary, forked by zygotes (see the module docs).
#[derive(Debug)]
pub struct ShimSpawner {
    pub shim: PathBuf,
    /// What zygotes keep in their bounding set: every capability a root worker may keep.
    keep_caps: Vec<u8>,
    /// One zygote per lane; `None` until one could be started (again).
    lanes: Vec<Mutex<Option<Zygote>>>,
    next: AtomicUsize,
    /// Where zygotes and exec'd shims are moved once started, when that is not the daemon's own
    /// cgroup (under systemd: the leaf of berth's workers scope, see `sys::systemd`).
    cgroup: OnceLock<PathBuf>,
}

impl ShimSpawner {
    /// The `berth-shim` beside the running executable, or the given path. Starts the zygotes,
    /// which drop from their bounding set every capability but `keep_caps` (numbers: all that
    /// any root worker may keep; a root worker that asks for another is refused); one that
    /// cannot start is tried again at the next spawn on its lane.
    pub fn new(shim: Option<PathBuf>, keep_caps: &[u8]) -> Self {
        let shim = shim.unwrap_or_else(|| {
            std::env::current_exe()
                .ok()
                .and_then(|p| p.parent().map(|d| d.join("berth-shim")))
                .unwrap_or_else(|| PathBuf::from("berth-shim"))
        });
        let lanes = (0..crate::host::work_lanes())
            .map(|_| Mutex::new(start_zygote(&shim, keep_caps)))
            .collect();
        Self {
            shim,
            keep_caps: keep_caps.to_vec(),
            lanes,
            next: AtomicUsize::new(0),
            cgroup: OnceLock::new(),
        }
    }

    /// The pids of the zygotes running now.
    pub fn zygote_pids(&self) -> Vec<u32> {
        self.lanes
            .iter()
            .filter_map(|l| {
                l.lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .as_ref()
                    .map(Zygote::pid)
            })
            .collect()
    }

    /// From now on keeps the zygotes, and the shims they fork, in the v2 cgroup `dir` instead
    /// of the daemon's: moves the running ones there, and every one started later as it starts
    /// (before it forks anything). Set once; later calls change nothing.
    pub fn place_in(&self, dir: &Path) -> io::Result<()> {
        let dir = self.cgroup.get_or_init(|| dir.to_path_buf());
        for pid in self.zygote_pids() {
            move_to_cgroup(dir, pid)?;
        }
        Ok(())
    }

    /// Moves a zygote or shim just started into [`Self::place_in`]'s cgroup, if one is set.
    fn place(&self, pid: u32) {
        if let Some(dir) = self.cgroup.get() {
            if let Err(e) = move_to_cgroup(dir, pid) {
                tracing::warn!(pid, cgroup = %dir.display(), error = %e, "shim process left in the daemon's cgroup");
            }
        }
    }

    /// Starts the shim for `dir` with `handshake` as its stdout: forked by a lane's zygote
    /// (started again if it died), else exec'd from here.
    fn start_shim(&self, dir: &Path, handshake: OwnedFd) -> io::Result<Forked> {
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.lanes.len();
        let mut lane = self.lanes[i].lock().unwrap_or_else(|e| e.into_inner());
        for _ in 0..2 {
            if lane.is_none() {
                *lane = start_zygote(&self.shim, &self.keep_caps);
                if let Some(z) = lane.as_ref() {
                    self.place(z.pid());
                }
            }
            let Some(z) = lane.as_ref() else {
                break;
            };
            match z.spawn(dir, handshake.as_fd()) {
                Ok(f) => return Ok(f),
                Err(ZygoteError::Fork(e)) => return Err(e),
                Err(e @ ZygoteError::Gone(_)) => {
                    tracing::warn!(error = %e, zygote = z.pid(), "shim zygote lost; starting another");
                    *lane = None;
                }
                Err(ZygoteError::Lost(e)) => {
                    tracing::warn!(error = %e, zygote = z.pid(), "shim zygote lost while forking");
                    *lane = None;
                    return Err(io::Error::other(format!(
                        "shim zygote lost while forking: {e}"
                    )));
                }
            }
        }
        drop(lane);
        let pid = exec_shim(&self.shim, dir, handshake)?;
        self.place(pid);
        // The child is ours and not yet reaped (nobody waits on it), so its pid cannot be reused
        // before we hold the pidfd.
        let pidfd = pidfd_open(pid as i32)?;
        Ok(Forked {
            pid,
            starttime: crate::host::process_starttime(pid),
            pidfd,
        })
    }
}

/// Writes `pid` into the `cgroup.procs` of the v2 cgroup `dir`.
fn move_to_cgroup(dir: &Path, pid: u32) -> io::Result<()> {
    fs::write(dir.join("cgroup.procs"), pid.to_string())
}

fn start_zygote(shim: &Path, keep_caps: &[u8]) -> Option<Zygote> {
    Zygote::start(shim, keep_caps)
        .inspect_err(|e| {
            tracing::warn!(shim = %shim.display(), error = %e, "no shim zygote: shims are exec'd");
        })
        .ok()
}

impl Spawner for ShimSpawner {
    fn spawn(&self, dir: &Path, spec: &ShimSpec) -> Result<ShimHandle, SpawnError> {
        write_spec(dir, spec)?;
        let shim_err = |source| SpawnError::Shim {
            shim: self.shim.clone(),
            source,
        };
        let (hs_r, hs_w) = pipe_cloexec().map_err(shim_err)?;
        // hs_w goes with the call: only the shim holds the write end afterwards.
        let f = self.start_shim(dir, hs_w).map_err(shim_err)?;
        Ok(ShimHandle {
            pid: f.pid,
            starttime: f.starttime,
            pidfd: f.pidfd,
            handshake: hs_r,
        })
    }
}

/// Writes `spec` into the worker directory `dir` (made if missing), where the shim reads it and
/// where a restart or a daemon that lost its store finds it again. Every spawner does this.
pub fn write_spec(dir: &Path, spec: &ShimSpec) -> Result<(), SpawnError> {
    let spec_path = dir.join(SPEC_FILE);
    let spec_err = |source| SpawnError::Spec {
        path: spec_path.clone(),
        source,
    };
    fs::create_dir_all(dir).map_err(spec_err)?;
    let json = serde_json::to_vec(spec).map_err(|e| spec_err(io::Error::other(e)))?;
    // Root's alone: the spec holds the worker's environment, which often holds secrets.
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&spec_path)
        .and_then(|mut f| f.write_all(&json))
        .map_err(spec_err)
}

/// posix_spawn of the shim (no pre_exec hook, so std takes the posix_spawn path: a clone with
/// CLONE_VFORK), stdout on the handshake pipe.
fn exec_shim(shim: &Path, dir: &Path, stdout: OwnedFd) -> io::Result<u32> {
    let child = Command::new(shim)
        .arg(dir)
        .env_clear()
        .stdin(Stdio::null())
        .stdout(Stdio::from(stdout))
        // The shim reports its own failures in the handshake and exit.json.
        .stderr(Stdio::null())
        .spawn()?;
    Ok(child.id())
}
