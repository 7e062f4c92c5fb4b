//! Every effect on the Linux host, each behind a small trait or a module with pure parsers:
//! cgroups, spawning shims, worker output files and their change notifications, host facts.

pub mod cgroup;
pub mod clock;
pub mod devbpf;
pub mod fake;
pub mod gpu;
pub mod host;
pub mod launcher;
pub mod netns;
pub mod notify;
pub mod output;
pub mod peer;
pub mod routes;
pub mod state_lock;
pub mod store;
pub mod systemd;
pub mod users;

use std::os::fd::{AsRawFd, BorrowedFd};
use std::path::Path;

/// The type (`statfs` magic) of the file system that holds `path`.
pub(crate) fn fs_magic(path: &Path) -> Option<i64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).ok()?;
    // SAFETY: c is a valid NUL-terminated path and st a valid out-pointer.
    unsafe {
        let mut st: libc::statfs = std::mem::zeroed();
        (libc::statfs(c.as_ptr(), &mut st) == 0).then_some(st.f_type as i64)
    }
}

/// The type (`statfs` magic) of the file system that holds the open file `fd`.
pub(crate) fn fd_fs_magic(fd: BorrowedFd<'_>) -> Option<i64> {
    // SAFETY: fstatfs writes into the zeroed statfs we own; fd is open for the borrow.
    unsafe {
        let mut st: libc::statfs = std::mem::zeroed();
        (libc::fstatfs(fd.as_raw_fd(), &mut st) == 0).then_some(st.f_type as i64)
    }
}

/// A real-kernel test that finds what it needs missing: skipped with `reason`, except under CI
/// as root (`CI=true`), where the machine is meant to have it and a skip would hide a break
/// (discovery that fails, a controller gone).
#[cfg(test)]
pub(crate) fn cannot_run(reason: &str) {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let ci = std::env::var("CI").is_ok_and(|v| v == "true" || v == "1");
    assert!(
        !(root && ci),
        "CI (root, CI=true) cannot run this test: {reason}"
    );
    eprintln!("skipped: {reason}");
}
