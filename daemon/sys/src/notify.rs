//! Change notifications of directories: one inotify instance watches many directories and
//! tells, in batches read without blocking, which changed; a [`Doorbell`] (an eventfd) wakes
//! the thread that waits on it for other news. What the daemon's output followers wake on: the
//! shim's writes to a worker's segment files show here, with no channel between the two.

use std::ffi::{CString, OsStr, OsString};
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::time::Duration;

/// A file in a watched directory was written.
pub const MODIFY: u32 = libc::IN_MODIFY;
/// A file or directory was created in a watched directory.
pub const CREATE: u32 = libc::IN_CREATE;
/// A file or directory was moved into a watched directory.
pub const MOVED_TO: u32 = libc::IN_MOVED_TO;
/// The watched directory itself was deleted.
pub const DELETE_SELF: u32 = libc::IN_DELETE_SELF;
/// Only watch the path if it is a directory.
pub const ONLYDIR: u32 = libc::IN_ONLYDIR;
/// The event is about a directory.
pub const ISDIR: u32 = libc::IN_ISDIR;
/// The watch is gone (removed, or its directory deleted); its id may be given out again.
pub const IGNORED: u32 = libc::IN_IGNORED;
/// Events were lost: the queue overflowed. Everything watched may have changed.
pub const Q_OVERFLOW: u32 = libc::IN_Q_OVERFLOW;

/// The id of one watch of an [`Inotify`] instance (a watch descriptor).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct WatchId(pub i32);

/// One change, as inotify reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    /// Which watch; -1 with [`Q_OVERFLOW`].
    pub watch: WatchId,
    pub mask: u32,
    /// The name of the file in the watched directory the event is about, if any.
    pub name: Option<OsString>,
}

/// Size of `struct inotify_event` without its name.
const HEADER: usize = 16;

/// The events in `buf`, as a read of an inotify fd fills it: headers of 16 bytes (wd, mask,
/// cookie, len) each followed by `len` bytes of NUL-padded name. A truncated tail is ignored.
pub fn parse_events(buf: &[u8]) -> Vec<Event> {
    let mut out = Vec::new();
    let mut rest = buf;
    while rest.len() >= HEADER {
        let word = |i: usize| [rest[i], rest[i + 1], rest[i + 2], rest[i + 3]];
        let wd = i32::from_ne_bytes(word(0));
        let mask = u32::from_ne_bytes(word(4));
        let len = u32::from_ne_bytes(word(12)) as usize;
        let Some(raw) = rest.get(HEADER..HEADER + len) else {
            break;
        };
        let name = raw.split(|b| *b == 0).next().unwrap_or_default();
        out.push(Event {
            watch: WatchId(wd),
            mask,
            name: (!name.is_empty()).then(|| OsStr::from_bytes(name).to_owned()),
        });
        rest = &rest[HEADER + len..];
    }
    out
}

/// An inotify instance, non-blocking and close-on-exec. Watches are added and removed from any
/// thread; events are read by one.
#[derive(Debug)]
pub struct Inotify {
    fd: OwnedFd,
}

impl Inotify {
    pub fn new() -> io::Result<Self> {
        // SAFETY: inotify_init1 takes flags and returns a new fd or -1.
        let fd = unsafe { libc::inotify_init1(libc::IN_NONBLOCK | libc::IN_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: inotify_init1 succeeded, so fd is open and owned by nobody else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(Self { fd })
    }

    /// Watches `path` for the events of `mask`. Watching a path already watched gives the same
    /// id (with the new mask). `ENOENT` when it does not exist, `ENOSPC` past the user's
    /// `fs.inotify.max_user_watches`.
    pub fn add_watch(&self, path: &Path, mask: u32) -> io::Result<WatchId> {
        let c = CString::new(path.as_os_str().as_bytes())
            .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        // SAFETY: the fd is an inotify instance and c a NUL-terminated path alive for the call.
        let wd = unsafe { libc::inotify_add_watch(self.fd.as_raw_fd(), c.as_ptr(), mask) };
        if wd < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(WatchId(wd))
    }

    /// Removes a watch; an [`IGNORED`] event for it follows.
    pub fn remove_watch(&self, watch: WatchId) -> io::Result<()> {
        // SAFETY: inotify_rm_watch takes an fd and an integer.
        if unsafe { libc::inotify_rm_watch(self.fd.as_raw_fd(), watch.0) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// The events queued now (none when there are none), read with `buf` (at least 4 KiB, so
    /// that any one event fits).
    pub fn read_events(&self, buf: &mut [u8]) -> io::Result<Vec<Event>> {
        let mut out = Vec::new();
        loop {
            // SAFETY: buf is valid for buf.len() bytes; the fd is non-blocking.
            let n = unsafe { libc::read(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
            if n < 0 {
                let e = io::Error::last_os_error();
                return match e.kind() {
                    io::ErrorKind::WouldBlock => Ok(out),
                    io::ErrorKind::Interrupted => continue,
                    _ => Err(e),
                };
            }
            if n == 0 {
                return Ok(out);
            }
            out.extend(parse_events(&buf[..n as usize]));
        }
    }
}

impl AsFd for Inotify {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

/// Wakes a thread that waits on it (an eventfd): rung from anywhere, cleared by the waiter.
#[derive(Debug)]
pub struct Doorbell {
    fd: OwnedFd,
}

impl Doorbell {
    pub fn new() -> io::Result<Self> {
        // SAFETY: eventfd takes an initial value and flags and returns a new fd or -1.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: eventfd succeeded, so fd is open and owned by nobody else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(Self { fd })
    }

    pub fn ring(&self) {
        let one = 1u64.to_ne_bytes();
        // SAFETY: writes 8 bytes from a valid buffer to an eventfd; a full counter (EAGAIN)
        // still leaves it readable, which is all a ring means.
        unsafe { libc::write(self.fd.as_raw_fd(), one.as_ptr().cast(), one.len()) };
    }

    /// Clears the rings so far.
    pub fn clear(&self) {
        let mut v = [0u8; 8];
        // SAFETY: reads 8 bytes into a valid buffer from a non-blocking eventfd.
        unsafe { libc::read(self.fd.as_raw_fd(), v.as_mut_ptr().cast(), v.len()) };
    }
}

impl AsFd for Doorbell {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

/// Blocks until one of `fds` is readable or `timeout` passes (a signal counts as a wake);
/// returns which are readable. For a thread of its own, never an async one.
pub fn wait_readable(fds: &[BorrowedFd<'_>], timeout: Duration) -> Vec<bool> {
    let mut pfds: Vec<libc::pollfd> = fds
        .iter()
        .map(|fd| libc::pollfd {
            fd: fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    let ms = i32::try_from(timeout.as_millis()).unwrap_or(i32::MAX);
    // SAFETY: pfds is a valid slice of pollfd for the duration of the call.
    let n = unsafe { libc::poll(pfds.as_mut_ptr(), pfds.len() as libc::nfds_t, ms) };
    if n <= 0 {
        return vec![false; fds.len()];
    }
    pfds.iter().map(|p| p.revents != 0).collect()
}

impl Event {
    /// Whether the event names `name`.
    pub fn is_named(&self, name: &str) -> bool {
        self.name.as_deref() == Some(OsStr::new(name))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Builds the bytes of one event as the kernel writes it (for tests of parsers and readers).
    fn encode_event(wd: i32, mask: u32, name: &str) -> Vec<u8> {
        let mut padded = name.as_bytes().to_vec();
        if !name.is_empty() {
            padded.push(0);
            while !padded.len().is_multiple_of(16) {
                padded.push(0);
            }
        }
        let mut v = Vec::with_capacity(HEADER + padded.len());
        v.extend_from_slice(&wd.to_ne_bytes());
        v.extend_from_slice(&mask.to_ne_bytes());
        v.extend_from_slice(&0u32.to_ne_bytes());
        v.extend_from_slice(&(padded.len() as u32).to_ne_bytes());
        v.extend(padded);
        v
    }

    #[test]
    fn events_parse_from_the_kernels_layout() {
        let mut buf = encode_event(3, MODIFY, "00000000000000000000.log");
        buf.extend(encode_event(1, CREATE | ISDIR, "stdout"));
        buf.extend(encode_event(-1, Q_OVERFLOW, ""));
        buf.extend(encode_event(7, IGNORED, ""));
        // A truncated tail (cannot happen with a buffer that fits an event) is dropped.
        buf.extend(&encode_event(9, MODIFY, "x")[..10]);
        let ev = parse_events(&buf);
        assert_eq!(
            ev,
            vec![
                Event {
                    watch: WatchId(3),
                    mask: MODIFY,
                    name: Some("00000000000000000000.log".into())
                },
                Event {
                    watch: WatchId(1),
                    mask: CREATE | ISDIR,
                    name: Some("stdout".into())
                },
                Event {
                    watch: WatchId(-1),
                    mask: Q_OVERFLOW,
                    name: None
                },
                Event {
                    watch: WatchId(7),
                    mask: IGNORED,
                    name: None
                },
            ]
        );
        assert!(ev[1].is_named("stdout"));
        assert!(parse_events(&[]).is_empty());
    }

    #[test]
    fn a_write_in_a_watched_directory_is_seen() {
        let d = tempfile::tempdir().unwrap();
        let n = Inotify::new().unwrap();
        let w = n.add_watch(d.path(), MODIFY | CREATE | ONLYDIR).unwrap();
        assert_eq!(
            n.add_watch(d.path(), MODIFY | CREATE | ONLYDIR).unwrap(),
            w,
            "one watch per directory"
        );
        let mut buf = vec![0u8; 4096];
        assert!(n.read_events(&mut buf).unwrap().is_empty());
        std::fs::write(d.path().join("a.log"), b"x").unwrap();
        let ready = wait_readable(&[n.as_fd()], Duration::from_secs(5));
        assert_eq!(ready, vec![true]);
        let ev = n.read_events(&mut buf).unwrap();
        assert!(ev
            .iter()
            .any(|e| e.watch == w && e.mask & CREATE != 0 && e.is_named("a.log")));
        assert!(ev.iter().any(|e| e.watch == w && e.mask & MODIFY != 0));
        n.remove_watch(w).unwrap();
        let ev = n.read_events(&mut buf).unwrap();
        assert!(
            ev.iter().any(|e| e.watch == w && e.mask & IGNORED != 0),
            "{ev:?}"
        );
        assert_eq!(
            n.add_watch(&d.path().join("nope"), MODIFY)
                .unwrap_err()
                .kind(),
            io::ErrorKind::NotFound
        );
    }

    #[test]
    fn a_doorbell_wakes_its_waiter_until_cleared() {
        let b = Doorbell::new().unwrap();
        assert_eq!(
            wait_readable(&[b.as_fd()], Duration::from_millis(1)),
            vec![false]
        );
        b.ring();
        b.ring();
        assert_eq!(
            wait_readable(&[b.as_fd()], Duration::from_secs(5)),
            vec![true]
        );
        b.clear();
        assert_eq!(
            wait_readable(&[b.as_fd()], Duration::from_millis(1)),
            vec![false]
        );
    }
}
