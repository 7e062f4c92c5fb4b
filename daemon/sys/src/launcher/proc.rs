//! Process primitives the daemon's launcher and the shim share: pipes, pidfds, reaping, and
//! waiting for a child's end on a signalfd.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::time::{Duration, Instant};

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

/// Sends `signal` to the process `pidfd` refers to (never to a process that recycled its pid).
pub fn pidfd_kill(pidfd: BorrowedFd<'_>, signal: i32) -> io::Result<()> {
    // SAFETY: pidfd_send_signal takes an fd, a signal number, no siginfo and no flags.
    let r = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            pidfd.as_raw_fd(),
            signal,
            std::ptr::null::<libc::siginfo_t>(),
            0,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Reaps `pid` if it is our child and has exited, and returns its wait status then; harmless
/// otherwise.
pub fn reap(pid: u32) -> Option<i32> {
    let mut status = 0;
    // SAFETY: status is a valid out-pointer; WNOHANG never blocks.
    let reaped = unsafe { libc::waitpid(pid as i32, &mut status, libc::WNOHANG) };
    (reaped == pid as i32 && pid > 0).then_some(status)
}

/// `struct pidfd_info` of `<linux/pidfd.h>` (Linux 6.15+), the fields up to its first size.
#[repr(C)]
#[derive(Default)]
struct PidfdInfo {
    mask: u64,
    cgroupid: u64,
    /// pid, tgid, ppid, ruid, rgid, euid, egid, suid, sgid, fsuid, fsgid.
    ids: [u32; 11],
    exit_code: i32,
    coredump_mask: u32,
    spare: u32,
}

/// `PIDFD_GET_INFO`: `_IOWR(0xFF, 11, struct pidfd_info)`.
const PIDFD_GET_INFO: u64 =
    (3 << 30) | ((std::mem::size_of::<PidfdInfo>() as u64) << 16) | (0xFF << 8) | 11;
const PIDFD_INFO_EXIT: u64 = 1 << 3;

/// What the kernel says of the end of the process `pidfd` refers to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PidfdExit {
    /// Its wait status (the process has been reaped, by whichever parent).
    Status(i32),
    /// Not reaped yet.
    NotYet,
    /// This kernel cannot tell (before 6.15), or `pidfd` is no pidfd.
    Unknown,
}

/// The wait status of the process of `pidfd` once its parent has reaped it, whoever that parent
/// is (`PIDFD_GET_INFO` with `PIDFD_INFO_EXIT`).
pub fn pidfd_exit(pidfd: BorrowedFd<'_>) -> PidfdExit {
    let mut info = PidfdInfo {
        mask: PIDFD_INFO_EXIT,
        ..Default::default()
    };
    // SAFETY: info is a valid, writable pidfd_info of the size the request number encodes.
    let r = unsafe {
        libc::ioctl(
            pidfd.as_raw_fd(),
            PIDFD_GET_INFO as _,
            &mut info as *mut PidfdInfo,
        )
    };
    if r != 0 {
        return match io::Error::last_os_error().raw_os_error() {
            // Gone from the pid table before it was reaped: only a reap tells more.
            Some(libc::ESRCH) => PidfdExit::NotYet,
            _ => PidfdExit::Unknown,
        };
    }
    if info.mask & PIDFD_INFO_EXIT != 0 {
        PidfdExit::Status(info.exit_code)
    } else {
        PidfdExit::NotYet
    }
}

/// How a process that has exited ended, from its pid and a pidfd on it: reaped here if it is our
/// child (an exec'd shim), else as the kernel tells once its parent (a zygote) has reaped it,
/// waiting up to `wait` for that. `None` where nothing tells (an older kernel).
pub fn exit_status(pid: u32, pidfd: Option<BorrowedFd<'_>>, wait: Duration) -> Option<i32> {
    if let Some(status) = reap(pid) {
        return Some(status);
    }
    let pidfd = pidfd?;
    let deadline = Instant::now() + wait;
    loop {
        match pidfd_exit(pidfd) {
            PidfdExit::Status(s) => return Some(s),
            PidfdExit::Unknown => return None,
            PidfdExit::NotYet if Instant::now() >= deadline => return None,
            PidfdExit::NotYet => std::thread::sleep(Duration::from_millis(5)),
        }
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::BufRead;
    use std::os::fd::AsFd;
    use std::process::{Command, Stdio};

    #[test]
    // The child is reaped by `exit_status`, the function under test.
    #[allow(clippy::zombie_processes)]
    fn the_end_of_our_own_child_is_reaped_here() {
        let child = Command::new("sleep").arg("30").spawn().unwrap();
        let pid = child.id();
        let pidfd = pidfd_open(pid as i32).unwrap();
        // SAFETY: pid is our child, not yet reaped.
        unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        let start = Instant::now();
        let status = loop {
            if let Some(s) = exit_status(pid, Some(pidfd.as_fd()), Duration::ZERO) {
                break s;
            }
            assert!(start.elapsed() < Duration::from_secs(5), "never ended");
            std::thread::sleep(Duration::from_millis(5));
        };
        assert!(libc::WIFSIGNALED(status));
        assert_eq!(libc::WTERMSIG(status), libc::SIGKILL);
    }

    #[test]
    fn the_end_of_another_s_child_is_told_by_its_pidfd() {
        // A shell's child, as a shim is a zygote's: the shell reaps it, not us.
        let mut sh = Command::new("sh")
            .args(["-c", "sleep 30 & echo $!; wait; sleep 2"])
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        std::io::BufReader::new(sh.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let pid: u32 = line.trim().parse().unwrap();
        let pidfd = pidfd_open(pid as i32).unwrap();
        // SAFETY: a plain kill of the process we just started (through the shell).
        unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        if pidfd_exit(pidfd.as_fd()) == PidfdExit::Unknown {
            eprintln!("skipped: this kernel has no PIDFD_INFO_EXIT");
        } else {
            let status = exit_status(pid, Some(pidfd.as_fd()), Duration::from_secs(5));
            assert_eq!(status.map(|s| libc::WTERMSIG(s)), Some(libc::SIGKILL));
        }
        let _ = sh.kill();
        let _ = sh.wait();
    }
}
