//! Shim zygotes: a `berth-shim --zygote` process, started once, forks every worker's shim.
//!
//! Exec'ing `berth-shim` for each worker maps a large binary, runs the dynamic loader and the
//! Rust runtime's start-up before the shim does anything (0.88 ms of CPU from exec to exit here,
//! against 0.43 ms for `/bin/true`, `perf stat -r 300`). A fork of a small single-threaded process
//! that has done all that already costs a fraction of it: its page tables are few and its file
//! mappings are shared, not copied. So the daemon keeps one zygote per spawn lane and asks it
//! for each shim.
//!
//! A zygote is started as `berth-shim --zygote --keep-caps=10,12` (the capabilities root workers
//! may keep, by number, maybe none) and first drops every other capability from its bounding set,
//! once for all the shims it forks, and tells them the set left (see `super::creds`): their
//! workers' processes drop at most what it kept. Without `--keep-caps` it drops nothing.
//!
//! Protocol, on a `SOCK_SEQPACKET` socket pair whose other end is the zygote's stdin:
//! - request: the worker directory's path, with the handshake pipe's write end attached
//!   (`SCM_RIGHTS`); it becomes the shim's stdout, as with an exec'd shim;
//! - reply: `0`, the shim's pid (i32) and start time (u64 clock ticks since boot; `u64::MAX`
//!   when unknown) with a pidfd of the shim attached, or `1` and an errno (i32).
//!
//! The zygote opens the pidfd and reads the start time before it can have reaped the shim, so
//! neither can refer to a recycled pid. It reaps its children as they end (SIGCHLD through a
//! signalfd) and exits when the daemon's end of the socket closes, also when the daemon is
//! killed; the shims then go on as they did under the daemon, reparented to the nearest
//! subreaper. The zygote calls itself `berth-zygote`; a forked shim takes back the name
//! `berth-shim` and, where it may (CAP_SYS_RESOURCE), the command line `berth-shim <worker dir>`
//! of an exec'd one. Every shim works in its worker's directory, by which a daemon that lost its
//! state store finds it.

use std::ffi::OsString;
use std::io::{self, IoSlice, IoSliceMut};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::socket::{
    recvmsg, sendmsg, socketpair, AddressFamily, ControlMessage, ControlMessageOwned, MsgFlags,
    SockFlag, SockType,
};

/// The argument that makes `berth-shim` a zygote.
pub const ZYGOTE_ARG: &str = "--zygote";

/// The argument after [`ZYGOTE_ARG`] that names what the zygote keeps in its bounding set.
const KEEP_CAPS_ARG: &str = "--keep-caps=";

/// Longest request: a worker directory path.
const MAX_REQUEST: usize = 8192;
/// `0`, pid, start time.
const REPLY_LEN: usize = 1 + 4 + 8;

/// How long the daemon waits for a zygote's answer (a fork: well under a millisecond, seconds on
/// a host thrashing under load) before it takes the zygote for lost: a stopped or wedged zygote
/// must not hold a spawn thread, and its lane, for ever.
pub const ANSWER_TIMEOUT: Duration = Duration::from_secs(10);

/// A shim the zygote forked.
#[derive(Debug)]
pub struct Forked {
    pub pid: u32,
    /// Start time of the shim (clock ticks since boot), read before it could be reaped.
    pub starttime: Option<u64>,
    /// A pidfd of the shim, readable once it has exited.
    pub pidfd: OwnedFd,
}

/// Why a zygote did not fork a shim.
#[derive(Debug, thiserror::Error)]
pub enum ZygoteError {
    /// The zygote's fork (or pidfd) failed with this error: a new zygote would fare no better.
    #[error("fork shim: {0}")]
    Fork(#[source] io::Error),
    /// The zygote is gone and never had the request: start a new one and ask it.
    #[error("shim zygote: {0}")]
    Gone(#[source] io::Error),
    /// The zygote took the request but gave no answer (it died, or broke the protocol): start a
    /// new one, but do not ask again, since a shim may have been forked.
    #[error("shim zygote: {0}")]
    Lost(#[source] io::Error),
}

/// The daemon's end of one zygote. Dropping it ends the zygote (it sees end of file) and reaps
/// it.
#[derive(Debug)]
pub struct Zygote {
    sock: OwnedFd,
    child: Child,
}

impl Zygote {
    /// Starts `shim --zygote --keep-caps=...` with the new socket pair's other end as its stdin;
    /// it keeps `keep_caps` (numbers) in its bounding set, and drops the rest.
    pub fn start(shim: &Path, keep_caps: &[u8]) -> io::Result<Self> {
        Self::start_with(shim, keep_caps, ANSWER_TIMEOUT)
    }

    /// [`Zygote::start`], waiting at most `answer_timeout` for each answer of the zygote.
    pub fn start_with(shim: &Path, keep_caps: &[u8], answer_timeout: Duration) -> io::Result<Self> {
        let (ours, theirs) = socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        )
        .map_err(io::Error::from)?;
        // Every receive from the zygote is bounded (`spawn` reads EAGAIN at the timeout).
        let tv = libc::timeval {
            tv_sec: answer_timeout.as_secs() as libc::time_t,
            tv_usec: answer_timeout.subsec_micros() as libc::suseconds_t,
        };
        // SAFETY: tv is a valid timeval of the size passed; `ours` is an open socket.
        let r = unsafe {
            libc::setsockopt(
                ours.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&tv as *const libc::timeval).cast(),
                std::mem::size_of::<libc::timeval>() as libc::socklen_t,
            )
        };
        if r != 0 {
            return Err(io::Error::last_os_error());
        }
        let child = Command::new(shim)
            .arg(ZYGOTE_ARG)
            .arg(keep_caps_arg(keep_caps))
            .env_clear()
            .stdin(Stdio::from(theirs))
            .stdout(Stdio::null())
            // Shims report their own failures in the handshake and exit.json.
            .stderr(Stdio::null())
            .spawn()?;
        Ok(Self { sock: ours, child })
    }

    /// The zygote's pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Forks the shim for `dir`, with `handshake` as its stdout (the caller closes its own copy
    /// before it reads the other end). Blocks until the zygote answers (a fork: well under a
    /// millisecond), at most the answer timeout: then the zygote is [`ZygoteError::Lost`].
    pub fn spawn(&self, dir: &Path, handshake: BorrowedFd<'_>) -> Result<Forked, ZygoteError> {
        let gone = |e: nix::errno::Errno| ZygoteError::Gone(io::Error::from(e));
        let lost = |e: io::Error| ZygoteError::Lost(e);
        let fds = [handshake.as_raw_fd()];
        sendmsg::<()>(
            self.sock.as_raw_fd(),
            &[IoSlice::new(dir.as_os_str().as_bytes())],
            &[ControlMessage::ScmRights(&fds)],
            MsgFlags::MSG_NOSIGNAL,
            None,
        )
        .map_err(gone)?;
        let mut reply = [0u8; REPLY_LEN];
        let mut space = nix::cmsg_space!([RawFd; 1]);
        let (n, pidfd) = loop {
            let mut iov = [IoSliceMut::new(&mut reply)];
            match recvmsg::<()>(
                self.sock.as_raw_fd(),
                &mut iov,
                Some(&mut space),
                MsgFlags::MSG_CMSG_CLOEXEC,
            ) {
                Err(nix::errno::Errno::EINTR) => continue,
                Err(nix::errno::Errno::EAGAIN) => {
                    return Err(lost(io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!("no answer from the zygote (pid {})", self.pid()),
                    )))
                }
                Err(e) => return Err(lost(io::Error::from(e))),
                Ok(msg) => break (msg.bytes, received_fd(&msg)),
            }
        };
        match (n, reply[0], pidfd) {
            (REPLY_LEN, 0, Some(pidfd)) => {
                let pid = i32::from_ne_bytes(reply[1..5].try_into().unwrap_or_default());
                let st = u64::from_ne_bytes(reply[5..13].try_into().unwrap_or_default());
                Ok(Forked {
                    pid: pid as u32,
                    starttime: (st != u64::MAX).then_some(st),
                    pidfd,
                })
            }
            (5.., 1, _) => {
                let errno = i32::from_ne_bytes(reply[1..5].try_into().unwrap_or_default());
                Err(ZygoteError::Fork(io::Error::from_raw_os_error(errno)))
            }
            (0, _, _) => Err(lost(io::Error::other("the zygote ended"))),
            _ => Err(lost(io::Error::other(format!(
                "bad reply from the zygote ({n} bytes)"
            )))),
        }
    }
}

impl Drop for Zygote {
    fn drop(&mut self) {
        // End of file on its socket ends the zygote; reap it. It exits at once unless stopped,
        // and a stopped one is killed rather than waited for.
        let _ = nix::sys::socket::shutdown(self.sock.as_raw_fd(), nix::sys::socket::Shutdown::Both);
        let deadline = Instant::now() + Duration::from_secs(1);
        while Instant::now() < deadline {
            if !matches!(self.child.try_wait(), Ok(None)) {
                return;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The first fd attached to `msg`; any others are closed.
fn received_fd(msg: &nix::sys::socket::RecvMsg<'_, '_, ()>) -> Option<OwnedFd> {
    let mut first = None;
    for c in msg.cmsgs().ok()? {
        if let ControlMessageOwned::ScmRights(fds) = c {
            for fd in fds {
                // SAFETY: the kernel just installed this fd in our table for us.
                let owned = unsafe { OwnedFd::from_raw_fd(fd) };
                first.get_or_insert(owned);
            }
        }
    }
    first
}

/// `--keep-caps=` and the capabilities, comma-separated.
fn keep_caps_arg(caps: &[u8]) -> String {
    let numbers: Vec<String> = caps.iter().map(u8::to_string).collect();
    format!("{KEEP_CAPS_ARG}{}", numbers.join(","))
}

/// The capabilities `--keep-caps=` names among a zygote's arguments (after `--zygote`), a bit
/// per number; `None` without it (a zygote started by an older daemon) or when it does not
/// parse: that zygote drops nothing, and each worker's process drops all it must itself.
fn parse_keep_caps(args: &[OsString]) -> Option<u64> {
    let list = args
        .iter()
        .find_map(|a| a.to_str()?.strip_prefix(KEEP_CAPS_ARG))?;
    let caps: Vec<u8> = list
        .split(',')
        .filter(|n| !n.is_empty())
        .map(str::parse)
        .collect::<Result<_, _>>()
        .ok()?;
    super::creds::cap_bits(&caps)
}

/// Entry point of `berth-shim --zygote`: serves fork requests on stdin until it closes, then
/// returns the exit code. Forked children never return from here: each runs its shim and exits.
pub fn serve() -> i32 {
    // SAFETY: fd 0 is the daemon's socket (see `Zygote::start`); nothing else in this process
    // owns it.
    let sock = unsafe { OwnedFd::from_raw_fd(0) };
    let args: Vec<OsString> = std::env::args_os().collect();
    let argv0 = args
        .first()
        .cloned()
        .unwrap_or_else(|| OsString::from("berth-shim"));
    // Once for every shim it will fork, whose workers then have nothing left to drop. Its own
    // permitted and effective sets, and so its shims', stay whole.
    let bounding =
        parse_keep_caps(args.get(2..).unwrap_or_default()).map(super::creds::shrink_bounding_set);
    // Whatever the daemon's own parent left open without close-on-exec would reach every shim
    // and worker: the zygote keeps its stdio only.
    // SAFETY: close_range closes fds of this single-threaded process that nothing here uses.
    unsafe { libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32) };
    // Nor does it hold the daemon's working directory busy.
    let _ = std::env::set_current_dir("/");
    let comm = own_comm();
    set_comm(b"berth-zygote");
    // SIGCHLD is read from a signalfd; blocked from here on (forked shims block it anyway).
    block_sigchld();
    let sigchld = super::proc::child_signals();
    let mut buf = vec![0u8; MAX_REQUEST];
    loop {
        let mut pfds = vec![super::proc::poll_in(sock.as_raw_fd())];
        if let Some(f) = &sigchld {
            pfds.push(super::proc::poll_in(f.as_raw_fd()));
        }
        // Without a signalfd, children are reaped at least every second.
        let timeout = if sigchld.is_some() { -1 } else { 1000 };
        // SAFETY: pfds is a valid slice of pollfd for the duration of the call.
        unsafe { libc::poll(pfds.as_mut_ptr(), pfds.len() as libc::nfds_t, timeout) };
        if let Some(f) = &sigchld {
            super::proc::drain_signals(f.as_raw_fd());
        }
        reap_children();
        if pfds[0].revents == 0 {
            continue;
        }
        let (n, handshake) = {
            let mut space = nix::cmsg_space!([RawFd; 1]);
            let mut iov = [IoSliceMut::new(&mut buf)];
            match recvmsg::<()>(
                sock.as_raw_fd(),
                &mut iov,
                Some(&mut space),
                MsgFlags::MSG_CMSG_CLOEXEC | MsgFlags::MSG_DONTWAIT,
            ) {
                Ok(msg) => (msg.bytes, received_fd(&msg)),
                Err(nix::errno::Errno::EINTR | nix::errno::Errno::EAGAIN) => continue,
                Err(_) => break,
            }
        };
        let Some(handshake) = handshake else {
            if n == 0 {
                break; // the daemon's end closed
            }
            reply_err(&sock, libc::EINVAL);
            continue;
        };
        let dir = PathBuf::from(OsString::from_vec(buf[..n].to_vec()));
        let close_in_child = [sigchld.as_ref().map_or(-1, |f| f.as_raw_fd())];
        match fork_shim(&dir, handshake, &close_in_child, &argv0, &comm, bounding) {
            Ok((pid, pidfd)) => {
                let st = crate::host::process_starttime(pid as u32).unwrap_or(u64::MAX);
                let mut msg = [0u8; REPLY_LEN];
                msg[1..5].copy_from_slice(&pid.to_ne_bytes());
                msg[5..13].copy_from_slice(&st.to_ne_bytes());
                let fds = [pidfd.as_raw_fd()];
                let sent = sendmsg::<()>(
                    sock.as_raw_fd(),
                    &[IoSlice::new(&msg)],
                    &[ControlMessage::ScmRights(&fds)],
                    MsgFlags::MSG_NOSIGNAL,
                    None,
                );
                if sent.is_err() {
                    break;
                }
            }
            Err(e) => reply_err(&sock, e.raw_os_error().unwrap_or(libc::EIO)),
        }
    }
    0
}

fn reply_err(sock: &OwnedFd, errno: i32) {
    let mut msg = [1u8, 0, 0, 0, 0];
    msg[1..].copy_from_slice(&errno.to_ne_bytes());
    let _ = nix::sys::socket::send(sock.as_raw_fd(), &msg, MsgFlags::MSG_NOSIGNAL);
}

/// Forks the shim for `dir`; returns its pid and a pidfd. The child closes `close` (the
/// zygote's own fds besides its socket on fd 0), takes `handshake` as stdout, renames itself
/// and runs the shim, told the zygote's `bounding` set where the zygote shrank it.
fn fork_shim(
    dir: &Path,
    handshake: OwnedFd,
    close: &[RawFd],
    argv0: &OsString,
    comm: &[u8],
    bounding: Option<u64>,
) -> io::Result<(i32, OwnedFd)> {
    // SAFETY: the zygote is single-threaded, so the child is a complete copy of it and may do
    // anything the zygote could (allocate, take locks): no other thread held one at the fork.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(io::Error::last_os_error());
    }
    if pid == 0 {
        // SAFETY: fds of the child's own table only. /dev/null replaces the zygote's socket on
        // fd 0 (closed if it cannot be opened), as an exec'd shim has it: the shim's stdio
        // must stay taken, or the files it opens later would land on 0..2. dup2 puts the
        // handshake pipe on fd 1 (without close-on-exec); the original goes with `handshake`.
        unsafe {
            for &fd in close {
                if fd >= 0 {
                    libc::close(fd);
                }
            }
            let null = libc::open(c"/dev/null".as_ptr(), libc::O_RDWR | libc::O_CLOEXEC);
            if null < 0 || libc::dup2(null, 0) < 0 {
                libc::close(0);
            }
            if null > 0 {
                libc::close(null);
            }
            libc::dup2(handshake.as_raw_fd(), 1);
        }
        drop(handshake);
        set_comm(comm);
        let mut cmdline = argv0.as_bytes().to_vec();
        cmdline.push(0);
        cmdline.extend_from_slice(dir.as_os_str().as_bytes());
        cmdline.push(0);
        // For `ps` only (it needs CAP_SYS_RESOURCE): a daemon finds its shims by their working
        // directory, which every shim sets to its worker's.
        let _ = set_cmdline(cmdline);
        std::process::exit(match bounding {
            Some(b) => super::shim::run_forked(dir, b),
            None => super::shim::run_dir(dir),
        });
    }
    drop(handshake);
    match super::proc::pidfd_open(pid) {
        Ok(fd) => Ok((pid, fd)),
        Err(e) => {
            // Without a pidfd the daemon could not watch it: end it (the shim has not reported
            // yet, so no worker is lost; its process, if any, dies with its cgroup's kill).
            // SAFETY: pid is our child, not yet reaped.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            Err(e)
        }
    }
}

/// Reaps every child that has ended.
fn reap_children() {
    loop {
        let mut status = 0;
        // SAFETY: status is a valid out-pointer; WNOHANG never blocks.
        if unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) } <= 0 {
            return;
        }
    }
}

fn block_sigchld() {
    // SAFETY: sigset operations on a local set; the process is single-threaded.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGCHLD);
        libc::sigprocmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
    }
}

/// This process's name (`/proc/self/comm`), as the exec gave it.
fn own_comm() -> Vec<u8> {
    let mut name = [0u8; 16];
    // SAFETY: PR_GET_NAME writes at most 16 bytes, NUL included, into `name`.
    unsafe { libc::prctl(libc::PR_GET_NAME, name.as_mut_ptr(), 0, 0, 0) };
    let len = name.iter().position(|b| *b == 0).unwrap_or(name.len());
    name[..len].to_vec()
}

/// Sets this process's name (truncated to 15 bytes).
fn set_comm(name: &[u8]) {
    let mut c = [0u8; 16];
    let n = name.len().min(15);
    c[..n].copy_from_slice(&name[..n]);
    // SAFETY: `c` is NUL-terminated and 16 bytes long, as PR_SET_NAME reads.
    unsafe { libc::prctl(libc::PR_SET_NAME, c.as_ptr(), 0, 0, 0) };
}

/// Points `/proc/self/cmdline` at `args` (NUL-separated and -terminated), which stays allocated
/// for the life of the process. Needs CAP_SYS_RESOURCE.
fn set_cmdline(args: Vec<u8>) -> io::Result<()> {
    let args = args.leak();
    let start = args.as_ptr() as libc::c_ulong;
    let end = start + args.len() as libc::c_ulong;
    let set = |what: libc::c_int, v: libc::c_ulong| -> io::Result<()> {
        // SAFETY: PR_SET_MM only records the address; `args` is leaked, so it stays valid.
        let r = unsafe { libc::prctl(libc::PR_SET_MM, what as libc::c_ulong, v, 0, 0) };
        if r != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    };
    // The kernel wants start ≤ end after each step: which goes first depends on where the new
    // range lies against the old.
    set(libc::PR_SET_MM_ARG_START, start)
        .and_then(|()| set(libc::PR_SET_MM_ARG_END, end))
        .or_else(|_| {
            set(libc::PR_SET_MM_ARG_END, end).and_then(|()| set(libc::PR_SET_MM_ARG_START, start))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keep_caps_travel_in_the_zygotes_arguments() {
        let parsed = |caps: &[u8]| parse_keep_caps(&[OsString::from(keep_caps_arg(caps))]);
        assert_eq!(keep_caps_arg(&[10, 12]), "--keep-caps=10,12");
        assert_eq!(keep_caps_arg(&[]), "--keep-caps=");
        assert_eq!(parsed(&[10, 12]), Some(1 << 10 | 1 << 12));
        assert_eq!(parsed(&[40, 0]), Some(1 << 40 | 1));
        // Keep nothing: drop every capability.
        assert_eq!(parsed(&[]), Some(0));
        // Without the argument (an older daemon), or with one that does not parse: drop nothing.
        let args = |a: &[&str]| parse_keep_caps(&a.iter().map(OsString::from).collect::<Vec<_>>());
        assert_eq!(args(&[]), None);
        assert_eq!(args(&["--other"]), None);
        assert_eq!(args(&["--keep-caps"]), None);
        assert_eq!(args(&["--keep-caps=10,x"]), None);
        assert_eq!(args(&["--keep-caps=64"]), None);
        assert_eq!(args(&["--keep-caps=-1"]), None);
        assert_eq!(args(&["--other", "--keep-caps=21"]), Some(1 << 21));
    }

    #[test]
    fn a_zygote_that_never_answers_is_lost_at_the_timeout() {
        use std::os::fd::AsFd as _;
        use std::os::unix::fs::PermissionsExt as _;
        let d = tempfile::tempdir().unwrap();
        // Takes requests (its stdin is the socket) and never answers one.
        let mute = d.path().join("mute-zygote");
        std::fs::write(&mute, "#!/bin/sh\nexec sleep 60\n").unwrap();
        std::fs::set_permissions(&mute, std::fs::Permissions::from_mode(0o755)).unwrap();
        let z = Zygote::start_with(&mute, &[], Duration::from_millis(200)).unwrap();
        let (_r, w) = super::super::proc::pipe_cloexec().unwrap();
        let start = Instant::now();
        let err = z.spawn(d.path(), w.as_fd()).unwrap_err();
        let waited = start.elapsed();
        assert!(
            matches!(&err, ZygoteError::Lost(e) if e.kind() == io::ErrorKind::TimedOut),
            "{err:?}"
        );
        assert!(waited >= Duration::from_millis(200), "{waited:?}");
        assert!(waited < Duration::from_secs(5), "{waited:?}");
        let started = Instant::now();
        drop(z);
        // Dropping it ends the mute zygote (killed after its second of grace).
        assert!(started.elapsed() < Duration::from_secs(3));
    }
}
