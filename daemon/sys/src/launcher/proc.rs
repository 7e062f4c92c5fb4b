//! Process primitives the daemon's launcher and the shim share: pipes, pidfds, reaping, and
//! waiting for a child's end on a signalfd.

use std::io;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};

pub(super) fn pipe_cloexec() -> io::Result<(OwnedFd, OwnedFd)> {
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

/// A signalfd for SIGCHLD (blocked since `run`), non-blocking; `None` where the kernel refuses.
pub(super) fn child_signals() -> Option<OwnedFd> {
    // SAFETY: sigset operations on a local set; signalfd returns a new fd or -1.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGCHLD);
        let fd = libc::signalfd(-1, &set, libc::SFD_NONBLOCK | libc::SFD_CLOEXEC);
        // SAFETY: signalfd succeeded; the fd is ours.
        (fd >= 0).then(|| OwnedFd::from_raw_fd(fd))
    }
}

/// A `poll` entry that waits for `fd` to become readable.
pub(super) fn poll_in(fd: RawFd) -> libc::pollfd {
    libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    }
}

/// Reads every pending signal from the signalfd `fd` (they only say "look again").
pub(super) fn drain_signals(fd: RawFd) {
    let mut info = [0u8; 128 * 8];
    // SAFETY: info is valid for its length; the fd is non-blocking.
    while unsafe { libc::read(fd, info.as_mut_ptr().cast(), info.len()) } > 0 {}
}
