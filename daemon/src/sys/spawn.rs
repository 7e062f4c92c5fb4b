//! Starting a worker's shim. The daemon never forks itself (a fork of a threaded process of this
//! size is slow and unsafe): it writes the spec and starts `berth-shim` by posix_spawn, with the
//! shim's stdout on a handshake pipe.
//!
//! The posix_spawn happens on a *spawn lane*: a thread of the daemon with a file descriptor table
//! of its own (`unshare(CLONE_FILES)`) that holds nothing but the lane's socket. A process's fd
//! table is copied into every child it starts and closed again at the child's exec, one file at
//! a time; the daemon's table holds a pidfd per live worker, so a spawn from it would cost time
//! in proportion to the workers alive (1.6 ms per launch with 4000 alive here). A lane's table
//! stays at a handful of entries whatever runs. Lanes get the handshake pipe's write end over a
//! socket (`SCM_RIGHTS`) and answer with the pid; the shim is still the daemon's child.

use std::fs;
use std::io::{self, IoSlice, IoSliceMut};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use nix::sys::socket::{
    recvmsg, sendmsg, socketpair, AddressFamily, ControlMessage, ControlMessageOwned, MsgFlags,
    SockFlag, SockType,
};

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

/// Starts the real `berth-shim` binary, from spawn lanes (see the module docs).
#[derive(Debug)]
pub struct ShimSpawner {
    pub shim: PathBuf,
    /// Started with the spawner, once the daemon sits in its own cgroup (on cgroup v1 each
    /// thread has its own cgroups, taken from the thread that made it).
    lanes: io::Result<Lanes>,
}

impl ShimSpawner {
    /// The `berth-shim` beside the running executable, or the given path. Starts the lanes: a
    /// daemon that cannot start threads fails its launches with the reason.
    pub fn new(shim: Option<PathBuf>) -> Self {
        let shim = shim.unwrap_or_else(|| {
            std::env::current_exe()
                .ok()
                .and_then(|p| p.parent().map(|d| d.join("berth-shim")))
                .unwrap_or_else(|| PathBuf::from("berth-shim"))
        });
        let lanes = Lanes::start(&shim, super::host::online_cpus().clamp(1, 4));
        Self { shim, lanes }
    }

    fn lanes(&self) -> io::Result<&Lanes> {
        self.lanes
            .as_ref()
            .map_err(|e| io::Error::new(e.kind(), format!("spawn lanes: {e}")))
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
        let pid = self
            .lanes()
            .and_then(|l| l.spawn(dir, hs_w))
            .map_err(shim_err)?;
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

/// The spawn lanes: one socket (this side of a socketpair) per lane thread, used by one spawn
/// at a time. Dropping them ends the threads (their sockets see end of file).
#[derive(Debug)]
struct Lanes {
    sockets: Vec<Mutex<OwnedFd>>,
    next: AtomicUsize,
}

/// Longest request: a worker directory path.
const MAX_REQUEST: usize = 8192;

impl Lanes {
    fn start(shim: &Path, n: usize) -> io::Result<Self> {
        let mut sockets = Vec::with_capacity(n);
        for i in 0..n {
            let (ours, theirs) = socketpair(
                AddressFamily::Unix,
                SockType::SeqPacket,
                None,
                SockFlag::SOCK_CLOEXEC,
            )
            .map_err(io::Error::from)?;
            let shim = shim.to_path_buf();
            let raw = theirs.as_raw_fd();
            let (tx, rx) = std::sync::mpsc::sync_channel(1);
            std::thread::Builder::new()
                .name(format!("berth-spawn-{i}"))
                .spawn(move || {
                    let private = lane_private_table(raw);
                    let _ = tx.send(private.is_ok());
                    if let Err(e) = private {
                        // Without a table of its own the lane still works, only slower.
                        tracing::warn!(error = %e, "spawn lane shares the daemon's fd table");
                    }
                    // SAFETY: `raw` is open in this thread's table: its private copy, or the
                    // shared table's entry that the starter leaves to this thread.
                    lane_serve(&shim, unsafe { OwnedFd::from_raw_fd(raw) });
                })?;
            match rx.recv() {
                // Same table: the entry is the lane's now.
                Ok(false) => std::mem::forget(theirs),
                // The lane has its own copy (or died): the daemon's table keeps none.
                _ => drop(theirs),
            }
            sockets.push(Mutex::new(ours));
        }
        Ok(Self {
            sockets,
            next: AtomicUsize::new(0),
        })
    }

    /// Starts the shim for `dir` on a lane, with `handshake` as its stdout; returns its pid.
    fn spawn(&self, dir: &Path, handshake: OwnedFd) -> io::Result<u32> {
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.sockets.len();
        let sock = self.sockets[i].lock().unwrap_or_else(|e| e.into_inner());
        let fds = [handshake.as_raw_fd()];
        let cmsg = [ControlMessage::ScmRights(&fds)];
        let path = dir.as_os_str().as_bytes();
        sendmsg::<()>(
            sock.as_raw_fd(),
            &[IoSlice::new(path)],
            &cmsg,
            MsgFlags::MSG_NOSIGNAL,
            None,
        )
        .map_err(io::Error::from)?;
        // The lane holds its own reference now; the shim's stdout must not stay open here too.
        drop(handshake);
        let mut reply = [0u8; 5];
        let got = loop {
            match nix::sys::socket::recv(sock.as_raw_fd(), &mut reply, MsgFlags::empty()) {
                Err(nix::errno::Errno::EINTR) => continue,
                r => break r.map_err(io::Error::from)?,
            }
        };
        if got != reply.len() {
            return Err(io::Error::other("spawn lane ended"));
        }
        let v = i32::from_ne_bytes([reply[1], reply[2], reply[3], reply[4]]);
        match reply[0] {
            0 => Ok(v as u32),
            _ => Err(io::Error::from_raw_os_error(v)),
        }
    }
}

/// Gives the calling thread a file descriptor table of its own and closes every entry of it but
/// stdin/stdout/stderr and `keep` (the copies only; the daemon's table is untouched).
fn lane_private_table(keep: RawFd) -> io::Result<()> {
    // SAFETY: unshare(CLONE_FILES) copies this thread's fd table; it touches no memory.
    if unsafe { libc::unshare(libc::CLONE_FILES) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let close = |from: RawFd, to: RawFd| -> io::Result<()> {
        if from > to {
            return Ok(());
        }
        // SAFETY: close_range only closes entries of this thread's private table, which no
        // other thread uses; nothing in this thread holds any of them but `keep`.
        let r = unsafe { libc::syscall(libc::SYS_close_range, from as u32, to as u32, 0u32) };
        if r != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    };
    close(3, keep - 1)?;
    close(keep + 1, RawFd::MAX)
}

/// Serves spawn requests until the daemon's end of `sock` closes: each request is a worker
/// directory with the handshake pipe's write end attached; the reply is `0 PID` or `1 ERRNO`.
fn lane_serve(shim: &Path, sock: OwnedFd) {
    let mut buf = vec![0u8; MAX_REQUEST];
    loop {
        let mut space = nix::cmsg_space!([RawFd; 1]);
        let (n, stdout) = {
            let mut iov = [IoSliceMut::new(&mut buf)];
            let msg = match recvmsg::<()>(
                sock.as_raw_fd(),
                &mut iov,
                Some(&mut space),
                MsgFlags::MSG_CMSG_CLOEXEC,
            ) {
                Ok(m) => m,
                Err(nix::errno::Errno::EINTR) => continue,
                Err(_) => return,
            };
            let mut stdout = None;
            if let Ok(cmsgs) = msg.cmsgs() {
                for c in cmsgs {
                    if let ControlMessageOwned::ScmRights(fds) = c {
                        for fd in fds {
                            // SAFETY: the kernel just installed this fd in our table for us.
                            let owned = unsafe { OwnedFd::from_raw_fd(fd) };
                            stdout.get_or_insert(owned);
                        }
                    }
                }
            }
            (msg.bytes, stdout)
        };
        if n == 0 && stdout.is_none() {
            return; // the daemon's end closed
        }
        let dir = PathBuf::from(std::ffi::OsString::from_vec(buf[..n].to_vec()));
        let reply = match stdout {
            None => Err(io::Error::other("no handshake pipe in the request")),
            Some(out) => spawn_shim(shim, &dir, out),
        };
        let mut msg = [0u8; 5];
        match reply {
            Ok(pid) => msg[1..].copy_from_slice(&(pid as i32).to_ne_bytes()),
            Err(e) => {
                msg[0] = 1;
                msg[1..].copy_from_slice(&e.raw_os_error().unwrap_or(libc::EIO).to_ne_bytes());
            }
        }
        if nix::sys::socket::send(sock.as_raw_fd(), &msg, MsgFlags::MSG_NOSIGNAL).is_err() {
            return;
        }
    }
}

/// posix_spawn of the shim (no pre_exec hook, so std takes the posix_spawn path: a clone with
/// CLONE_VFORK), stdout on the handshake pipe.
fn spawn_shim(shim: &Path, dir: &Path, stdout: OwnedFd) -> io::Result<u32> {
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
