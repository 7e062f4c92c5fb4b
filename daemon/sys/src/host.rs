//! Facts about the host read from /proc and the filesystem: memory, CPUs, executables.

use std::fs;
use std::path::{Path, PathBuf};

/// `MemTotal` of `/proc/meminfo` text, in bytes.
pub fn parse_meminfo_total(text: &str) -> Option<u64> {
    text.lines().find_map(|l| {
        let rest = l.strip_prefix("MemTotal:")?;
        let kb: u64 = rest.trim().trim_end_matches("kB").trim().parse().ok()?;
        Some(kb * 1024)
    })
}

/// Total memory of the host in bytes.
pub fn memory_total_bytes() -> u64 {
    fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|t| parse_meminfo_total(&t))
        .unwrap_or(0)
}

/// CPUs this process may run on.
pub fn online_cpus() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

/// How many lanes the daemon's parallel work takes (spawn lanes and their zygotes, namespace
/// threads, pool refills): one per CPU, at most 4.
pub fn work_lanes() -> usize {
    online_cpus().clamp(1, 4)
}

/// The kernel's limit on argv and environment together for a program this process execs
/// (`sysconf(_SC_ARG_MAX)`: a quarter of its stack limit); 128 KiB where it says nothing.
pub fn arg_max() -> usize {
    // SAFETY: sysconf takes an integer and reads process limits; it has no memory effects.
    let n = unsafe { libc::sysconf(libc::_SC_ARG_MAX) };
    usize::try_from(n)
        .ok()
        .filter(|&n| n > 0)
        .unwrap_or(128 * 1024)
}

/// Whether `path` is a regular file this thread may execute.
pub fn is_executable(path: &Path) -> bool {
    // Checked with this thread's identity: inside `users::as_user`, as the worker's user would.
    fs::metadata(path).is_ok_and(|m| m.is_file()) && crate::users::eaccess(path, libc::X_OK)
}

/// Resolves a program name the way execvp would: a name with a `/` is taken as is (relative to
/// `cwd`), anything else is searched in `path_var`.
pub fn resolve_program(name: &str, path_var: &str, cwd: &Path) -> Option<PathBuf> {
    if name.contains('/') {
        let p = cwd.join(name);
        return is_executable(&p).then_some(p);
    }
    path_var
        .split(':')
        .filter(|d| !d.is_empty())
        .map(|d| Path::new(d).join(name))
        .find(|p| is_executable(p))
}

/// The host's name from the kernel.
pub fn hostname() -> String {
    fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_owned())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "localhost".into())
}

/// Start time of `pid` in clock ticks since boot (field 22 of `/proc/<pid>/stat`); with the pid
/// it identifies a process even after the pid is recycled.
pub fn parse_stat_starttime(stat: &str) -> Option<u64> {
    // The command name may hold spaces and parentheses: fields restart after the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// Command name and state letter (`R`, `S`, `D`, `Z`, …) of a process, from its
/// `/proc/<pid>/stat`.
pub fn parse_stat_state(stat: &str) -> Option<(String, char)> {
    let open = stat.find('(')?;
    let close = stat.rfind(')')?;
    let comm = stat.get(open + 1..close)?.to_owned();
    let state = stat[close + 1..]
        .split_whitespace()
        .next()?
        .chars()
        .next()?;
    Some((comm, state))
}

/// How many processes `pids` are, and the first few of them with their command names and
/// states (`D`: uninterruptible sleep, which not even SIGKILL ends): what an error about
/// processes that would not die tells.
pub fn describe_processes(pids: &[i32]) -> String {
    const SHOWN: usize = 5;
    let shown: Vec<String> = pids
        .iter()
        .take(SHOWN)
        .map(|pid| {
            match fs::read_to_string(format!("/proc/{pid}/stat"))
                .ok()
                .and_then(|s| parse_stat_state(&s))
            {
                Some((comm, state)) => format!("{pid} {comm} ({state})"),
                None => format!("{pid} (gone)"),
            }
        })
        .collect();
    let more = if pids.len() > SHOWN { ", …" } else { "" };
    let noun = if pids.len() == 1 {
        "process"
    } else {
        "processes"
    };
    format!("{} {noun}: {}{more}", pids.len(), shown.join(", "))
}

/// Start time of a live process, see [`parse_stat_starttime`].
pub fn process_starttime(pid: u32) -> Option<u64> {
    fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| parse_stat_starttime(&s))
}

/// Resident and proportional set size of a process, in bytes, from `/proc/<pid>/smaps_rollup`.
pub fn parse_smaps_rollup(text: &str) -> (u64, u64) {
    let kb = |key: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|r| r.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .unwrap_or(0)
            * 1024
    };
    (kb("Rss:"), kb("Pss:"))
}

/// Whether this process runs with root's effective uid.
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// The name of this process's effective user as workers that keep the daemon's identity run as
/// it: `root`, or `uid:N` (no passwd lookup: this is called on async threads).
pub fn current_user_name() -> String {
    // SAFETY: geteuid has no preconditions and cannot fail.
    match unsafe { libc::geteuid() } {
        0 => "root".into(),
        uid => format!("uid:{uid}"),
    }
}

/// Processes that hold `path` open, as (pid, command name), from `/proc/<pid>/fd`: who has a
/// file that refuses to be opened twice.
pub fn processes_with_open(path: &Path) -> Vec<(u32, String)> {
    let want = fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
    let Ok(rd) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for e in rd.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(fds) = fs::read_dir(e.path().join("fd")) else {
            continue;
        };
        if fds
            .flatten()
            .any(|fd| fs::read_link(fd.path()).is_ok_and(|t| t == want))
        {
            let comm = fs::read_to_string(e.path().join("comm")).unwrap_or_default();
            out.push((pid, comm.trim().to_owned()));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn meminfo() {
        let t = "MemTotal:       24605604 kB\nMemFree:        23000000 kB\n";
        assert_eq!(parse_meminfo_total(t), Some(24605604 * 1024));
        assert_eq!(parse_meminfo_total("MemFree: 1 kB"), None);
    }

    #[test]
    fn stat_starttime_with_odd_comm() {
        let stat = "1234 (my (odd) prog) S 1 1234 1234 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 987654 1000 10";
        assert_eq!(parse_stat_starttime(stat), Some(987654));
        assert_eq!(
            parse_stat_state(stat),
            Some(("my (odd) prog".to_owned(), 'S'))
        );
        assert_eq!(
            parse_stat_state("77 (sh) D 1 77 77 0 -1"),
            Some(("sh".to_owned(), 'D'))
        );
        assert_eq!(parse_stat_state("77 (sh"), None);
        assert_eq!(parse_stat_state(""), None);
        assert_eq!(parse_stat_starttime("garbage"), None);
    }

    #[test]
    fn smaps() {
        let t = "00400000-ffffffff ---p 00000000 00:00 0 [rollup]\nRss:                1200 kB\nPss:                 300 kB\n";
        assert_eq!(parse_smaps_rollup(t), (1200 * 1024, 300 * 1024));
    }

    #[test]
    fn resolve_in_path() {
        assert_eq!(
            resolve_program("sh", "/nonexistent:/bin", Path::new("/")),
            Some(PathBuf::from("/bin/sh"))
        );
        assert_eq!(
            resolve_program("no-such-program-x", "/bin:/usr/bin", Path::new("/")),
            None
        );
        assert_eq!(
            resolve_program("/bin/sh", "", Path::new("/")),
            Some(PathBuf::from("/bin/sh"))
        );
        assert_eq!(
            resolve_program("./sh", "", Path::new("/bin")),
            Some(PathBuf::from("/bin/./sh"))
        );
    }
}
