//! Starting a worker's shim. The daemon never forks itself (a fork of a threaded process of this
//! size is slow and unsafe): it writes the spec and starts `berth-shim` by posix_spawn, with the
//! shim's stdout on a handshake pipe.

use std::fs;
use std::io;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use super::shim::{ShimSpec, SPEC_FILE};

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

/// A started shim: its pid, a pidfd that becomes readable when it exits, and the read end of
/// the handshake pipe.
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

/// Starts the real `berth-shim` binary.
#[derive(Debug, Clone)]
pub struct ShimSpawner {
    pub shim: PathBuf,
}

impl ShimSpawner {
    /// The `berth-shim` beside the running executable, or the given path.
    pub fn new(shim: Option<PathBuf>) -> Self {
        let shim = shim.unwrap_or_else(|| {
            std::env::current_exe()
                .ok()
                .and_then(|p| p.parent().map(|d| d.join("berth-shim")))
                .unwrap_or_else(|| PathBuf::from("berth-shim"))
        });
        Self { shim }
    }
}

impl Spawner for ShimSpawner {
    fn spawn(&self, dir: &Path, spec: &ShimSpec) -> Result<ShimHandle, SpawnError> {
        let spec_path = dir.join(SPEC_FILE);
        let spec_err = |source| SpawnError::Spec {
            path: spec_path.clone(),
            source,
        };
        fs::create_dir_all(dir).map_err(spec_err)?;
        let json = serde_json::to_vec(spec).map_err(|e| spec_err(io::Error::other(e)))?;
        fs::write(&spec_path, json).map_err(spec_err)?;
        let shim_err = |source| SpawnError::Shim {
            shim: self.shim.clone(),
            source,
        };
        let (hs_r, hs_w) = pipe_cloexec().map_err(shim_err)?;
        // No pre_exec hook: std then uses posix_spawn (clone with CLONE_VFORK), which costs the
        // same whatever the daemon's size.
        let child = Command::new(&self.shim)
            .arg(dir)
            .env_clear()
            .stdin(Stdio::null())
            .stdout(Stdio::from(hs_w))
            // The shim reports its own failures in the handshake and exit.json.
            .stderr(Stdio::null())
            .spawn()
            .map_err(shim_err)?;
        let pid = child.id();
        // The child is ours and not yet reaped (nobody waits on it), so its pid cannot be reused
        // before we hold the pidfd.
        let pidfd = pidfd_open(pid as i32).map_err(shim_err)?;
        Ok(ShimHandle {
            pid,
            starttime: super::host::process_starttime(pid),
            pidfd,
            handshake: hs_r,
        })
    }
}

pub(crate) fn pipe_cloexec() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: fds is a valid array of two ints for pipe2 to fill.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: pipe2 succeeded, so both fds are open and owned by nobody else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// Opens a pidfd for `pid` (Linux ≥ 5.3).
pub fn pidfd_open(pid: i32) -> io::Result<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the syscall returned a new fd that nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// Reaps `pid` if it is our child and has exited; harmless otherwise.
pub fn reap(pid: u32) {
    let mut status = 0;
    // SAFETY: status is a valid out-pointer; WNOHANG never blocks.
    unsafe { libc::waitpid(pid as i32, &mut status, libc::WNOHANG) };
}
