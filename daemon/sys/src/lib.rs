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
