//! The per-worker shim: a small process between the daemon and a worker that outlives the daemon.
//!
//! The daemon writes the worker's [`ShimSpec`] to `<worker dir>/spec.json` and starts
//! `berth-shim <worker dir>` with its stdout on a handshake pipe: forked by a zygote
//! ([`super::zygote`]), or exec'd where there is none. The shim puts itself in its own
//! session, becomes a child subreaper and starts the worker inside the worker's cgroup and network
//! namespace, so the program's first instruction already runs inside both. On cgroup v2 the
//! kernel creates the process in its cgroup (`clone3(CLONE_INTO_CGROUP)`, see `spawn_in_cgroup`);
//! on v1, and where clone3 is refused, the child joins the cgroup before exec. The network
//! namespace the child joins before exec. It reports `ok <pid> <start µs>` or `err <message>` on
//! the handshake pipe and then has no channel to the daemon at all: the worker's output goes
//! through pipes held by the shim into rotated files ([`crate::output`]), and its exit status goes
//! to `<worker dir>/exit.json`. So a crash, kill or upgrade of the daemon loses neither output nor
//! exit status.
//!
//! When the spec has credentials ([`WorkerCreds`]), the child also switches to the worker's user,
//! groups, limits and capabilities before exec, in the order `super::creds` explains; without
//! them (a spec from an older daemon) the worker keeps the shim's identity.
//!
//! When the worker's main process ends, the shim kills whatever else is left in the cgroup
//! (no grandchild outlives its worker), drains the pipes, writes `exit.json` and exits.

use std::ffi::CString;
use std::fs;
use std::io::{self, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::cgroup::WorkerCgroup;
use crate::output::{dropped_bytes, record_dropped, Rotation, SegmentWriter, StreamKind};

use super::creds::{current_rlimit, Caps, ChildCreds, KernelRlimit, WorkerCreds};
use super::proc::{child_signals, drain_signals, pidfd_open, pipe_cloexec, poll_in};

use berth_core::launch::SOURCE_FD;

/// Everything the shim needs to start one worker.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ShimSpec {
    pub worker_id: String,
    /// Absolute path of the program to exec.
    pub program: PathBuf,
    /// argv, including argv[0].
    pub argv: Vec<String>,
    /// The whole environment, in order.
    pub env: Vec<(String, String)>,
    pub workdir: PathBuf,
    pub cgroup: WorkerCgroup,
    /// Network namespace to join (a bind-mounted nsfs file), when the worker has its own.
    pub netns: Option<PathBuf>,
    pub rotation: Rotation,
    /// The daemon's record of the worker at launch, opaque to the shim: what a daemon that lost
    /// its state store recovers the worker from.
    #[serde(default)]
    pub meta: serde_json::Value,
    /// Who the worker runs as; `None` (and in specs of older daemons): the shim's identity, root
    /// with every capability.
    #[serde(default)]
    pub creds: Option<WorkerCreds>,
    /// Code too long for the command line, which the worker's interpreter reads from
    /// `/proc/self/fd/3` (its argv names that path): the shim puts it in a memfd that the worker's
    /// process finds open on [`SOURCE_FD`] after its exec. A memfd is readable by the worker's
    /// user, as no file of the daemon's private state dir is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    /// The code is in the worker directory's [`SOURCE_FILE`] instead (`source` is `None`): a
    /// hard link to the one copy every worker of the launch shares, so that a launch of `n`
    /// workers writes its code once, not `n` times.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub source_file: bool,
}

/// Where a worker's directory holds its launch's code when the spec says `source_file`.
pub const SOURCE_FILE: &str = "source";

/// How a worker ended, as the shim recorded it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExitRecord {
    pub pid: u32,
    pub exit_code: Option<i32>,
    pub signal: Option<i32>,
    /// Set when the program never ran (exec or cgroup join failed).
    pub spawn_error: Option<String>,
    /// When the program started (its exec succeeded), in microseconds since the Unix epoch;
    /// `None` when it never ran, or from an older shim.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at_us: Option<u64>,
    /// When the shim saw the end, in microseconds since the Unix epoch; `None` from an older
    /// shim, which wrote only `finished_at_ms`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at_us: Option<u64>,
    /// The same in milliseconds.
    pub finished_at_ms: u64,
}

impl ExitRecord {
    /// When the worker's program started, by the shim's clock.
    pub fn started_at(&self) -> Option<SystemTime> {
        self.started_at_us.map(time_of_us)
    }

    /// When the shim saw the worker end, by its clock (the same as the start's, so never
    /// before it).
    pub fn finished_at(&self) -> SystemTime {
        self.finished_at_us.map_or_else(
            || UNIX_EPOCH + Duration::from_millis(self.finished_at_ms),
            time_of_us,
        )
    }

    /// A record whose end is `now_us`.
    fn ended(now_us: u64) -> Self {
        Self {
            finished_at_us: Some(now_us),
            finished_at_ms: now_us / 1000,
            ..Default::default()
        }
    }
}

/// What a shim reports once its worker runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Handshake {
    /// The worker's main process.
    pub pid: u32,
    /// When its exec succeeded, by the shim's clock; `None` from a shim that reports only the
    /// pid.
    pub started_at: Option<SystemTime>,
}

/// A time in microseconds since the Unix epoch, as shims report them.
fn time_of_us(us: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_micros(us)
}

pub const SPEC_FILE: &str = "spec.json";
pub const EXIT_FILE: &str = "exit.json";
/// Made (empty) by a shim as it starts: a daemon that died before it heard of the shim tells by
/// it a worker whose shim ran, and vanished, from one whose shim was never forked.
pub const STARTED_FILE: &str = "shim.started";

/// Marks the worker in `dir` as taken up by its shim (see [`STARTED_FILE`]).
pub fn mark_started(dir: &Path) -> io::Result<()> {
    fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(false)
        .open(dir.join(STARTED_FILE))
        .map(drop)
}

/// Reads the exit record the shim left in `dir`, if it wrote one.
pub fn read_exit(dir: &Path) -> io::Result<Option<ExitRecord>> {
    match fs::read(dir.join(EXIT_FILE)) {
        Ok(b) => serde_json::from_slice(&b)
            .map(Some)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// Parses one handshake line: `ok <pid> <start µs>` (`ok <pid>` from an older shim) or
/// `err <message>`.
pub fn parse_handshake(line: &str) -> Result<Handshake, String> {
    let line = line.trim_end();
    if let Some(rest) = line.strip_prefix("ok ") {
        let bad = || format!("bad handshake from shim: {line:?}");
        let mut fields = rest.split(' ');
        let pid = fields.next().and_then(|p| p.parse().ok()).ok_or_else(bad)?;
        let started_at = match fields.next() {
            None => None,
            Some(us) => Some(time_of_us(us.parse().map_err(|_| bad())?)),
        };
        if fields.next().is_some() {
            return Err(bad());
        }
        return Ok(Handshake { pid, started_at });
    }
    if let Some(msg) = line.strip_prefix("err ") {
        return Err(msg.to_owned());
    }
    Err(if line.is_empty() {
        "shim exited before starting the worker".to_owned()
    } else {
        format!("bad handshake from shim: {line:?}")
    })
}

/// Microseconds since the Unix epoch.
fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

fn write_atomic(path: &Path, data: &[u8]) -> io::Result<()> {
    let tmp = path.with_extension("tmp");
    // No fsync: the record must survive the daemon's death, not the machine's (a machine crash
    // ends the worker too), and a rename is atomic for every process that reads it.
    let mut f = fs::File::create(&tmp)?;
    f.write_all(data)?;
    fs::rename(&tmp, path)
}

fn cstr(s: impl AsRef<[u8]>, what: &str) -> io::Result<CString> {
    CString::new(s.as_ref().to_vec())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, format!("NUL byte in {what}")))
}

fn open_cloexec(path: &Path, flags: i32) -> io::Result<OwnedFd> {
    let c = cstr(path.as_os_str().as_bytes(), "path")?;
    // SAFETY: c is a valid NUL-terminated string.
    let fd = unsafe { libc::open(c.as_ptr(), flags | libc::O_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::other(format!(
            "open {}: {}",
            path.display(),
            io::Error::last_os_error()
        )));
    }
    // SAFETY: open succeeded; the fd is ours.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Where a child failed before exec, reported through the exec-error pipe.
#[repr(u8)]
#[derive(Clone, Copy)]
enum Stage {
    JoinCgroup = 1,
    JoinNetns = 2,
    Workdir = 3,
    Exec = 4,
    Setup = 5,
    OomScore = 6,
    Rlimits = 7,
    Capabilities = 8,
    Identity = 9,
    NoNewPrivs = 10,
    Source = 11,
}

fn stage_name(b: u8) -> &'static str {
    match b {
        1 => "join cgroup",
        2 => "join network namespace",
        3 => "enter workdir",
        4 => "exec",
        6 => "set oom_score_adj",
        7 => "set resource limits",
        8 => "drop capabilities",
        9 => "switch user",
        10 => "set no_new_privs",
        11 => "put the code on fd 3",
        _ => "prepare",
    }
}

/// Runs the shim of the worker in `dir` (an exec'd shim); returns the process exit code.
pub(super) fn run_dir(dir: &Path) -> i32 {
    run_dir_with(dir, None)
}

/// Runs the shim of the worker in `dir` that a zygote forked with `bounding` as its bounding set
/// (what the zygote left itself, and so its shims: nothing changes it between the two); returns
/// the process exit code.
pub(super) fn run_forked(dir: &Path, bounding: u64) -> i32 {
    run_dir_with(dir, Some(bounding))
}

/// [`run_dir`], with the shim's bounding set where its zygote told it.
fn run_dir_with(dir: &Path, bounding: Option<u64>) -> i32 {
    // The shim works in its worker's directory: that is how a daemon that lost its state store
    // recognises it among the processes (`scan_shims` in berth-host's `supervisor::recovery`).
    // Paths stay absolute, so nothing else depends on it.
    let dir = std::path::absolute(dir).unwrap_or_else(|_| dir.to_path_buf());
    let _ = std::env::set_current_dir(&dir);
    let dir = dir.as_path();
    match run(dir, bounding) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("berth-shim {}: {e}", dir.display());
            1
        }
    }
}

fn handshake(msg: &str) {
    let mut out = io::stdout().lock();
    let _ = out.write_all(msg.as_bytes());
    let _ = out.flush();
    drop(out);
    // Nothing else goes to the daemon: point stdout at /dev/null so the pipe closes.
    if let Ok(null) = open_cloexec(Path::new("/dev/null"), libc::O_WRONLY) {
        // SAFETY: both fds are valid; dup2 replaces fd 1 atomically.
        unsafe { libc::dup2(null.as_raw_fd(), 1) };
    }
}

fn run(dir: &Path, bounding: Option<u64>) -> io::Result<()> {
    let spec: ShimSpec = match fs::read(dir.join(SPEC_FILE)).and_then(|b| {
        serde_json::from_slice(&b).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
    }) {
        Ok(s) => s,
        Err(e) => {
            let msg = format!("read {}: {e}", dir.join(SPEC_FILE).display());
            return never_started(dir, msg, None);
        }
    };
    // Needs an inode, no data block: a full disk does not stop it.
    let _ = mark_started(dir);
    // SAFETY: setsid and prctl take plain integers; the shim is single-threaded here.
    unsafe {
        libc::setsid();
        libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0);
        // Stray terminal signals must not end the shim: the worker would lose its output.
        libc::signal(libc::SIGINT, libc::SIG_IGN);
        libc::signal(libc::SIGHUP, libc::SIG_IGN);
        libc::signal(libc::SIGPIPE, libc::SIG_IGN);
        // SIGCHLD is read from a signalfd (see `supervise`); blocked from here on, none is lost
        // before it exists. The worker unblocks it before exec.
        let mut chld: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut chld);
        libc::sigaddset(&mut chld, libc::SIGCHLD);
        libc::sigprocmask(libc::SIG_BLOCK, &chld, std::ptr::null_mut());
    }
    match start_worker(dir, &spec, bounding) {
        Ok(started) => {
            handshake(&format!("ok {} {}\n", started.pid, started.started_at_us));
            supervise(dir, &spec, started)
        }
        Err(msg) => never_started(dir, msg, Some(&spec.cgroup)),
    }
}

/// Reports a worker that never ran: on the handshake pipe and in its exit record. Whatever the
/// child left in `cgroup` (nothing, normally) goes with it.
fn never_started(dir: &Path, msg: String, cgroup: Option<&WorkerCgroup>) -> io::Result<()> {
    handshake(&format!("err {msg}\n"));
    if let Some(cg) = cgroup {
        let _ = cg.kill_all(Duration::from_secs(5));
    }
    record_exit(
        dir,
        ExitRecord {
            spawn_error: Some(msg),
            ..ExitRecord::ended(now_us())
        },
    )
}

struct Started {
    pid: i32,
    /// When the exec succeeded (µs since the Unix epoch).
    started_at_us: u64,
    stdout: OwnedFd,
    stderr: OwnedFd,
    writers: [SegmentWriter; 2],
}

/// Starts the worker of `spec`. `bounding` is the shim's bounding set where its zygote told it:
/// the worker's process then drops only what is left there and not its to keep (normally
/// nothing). Without it (an exec'd shim, whose set is the daemon's, whole) it drops every
/// capability it does not keep: reading the set first (42 `PR_CAPBSET_READ`, 10–15 µs) would
/// spare none of those drops.
fn start_worker(dir: &Path, spec: &ShimSpec, bounding: Option<u64>) -> Result<Started, String> {
    let setup = |e: io::Error| e.to_string();
    let mut writers = [
        SegmentWriter::open(&dir.join(StreamKind::Stdout.dir_name()), spec.rotation)
            .map_err(setup)?,
        SegmentWriter::open(&dir.join(StreamKind::Stderr.dir_name()), spec.rotation)
            .map_err(setup)?,
    ];
    if spec.creds.as_ref().is_some_and(|c| c.pooled) {
        // Its files exist before its claim, so its followers read its first line as soon as
        // it is written (see `output::Tail`). Else they come with the first write.
        for w in &mut writers {
            let _ = w.start();
        }
    }
    let program = cstr(spec.program.as_os_str().as_bytes(), "program").map_err(setup)?;
    let argv: Vec<CString> = spec
        .argv
        .iter()
        .map(|a| cstr(a, "argv"))
        .collect::<io::Result<_>>()
        .map_err(setup)?;
    let envp: Vec<CString> = spec
        .env
        .iter()
        .map(|(k, v)| cstr(format!("{k}={v}"), "env"))
        .collect::<io::Result<_>>()
        .map_err(setup)?;
    let workdir = cstr(spec.workdir.as_os_str().as_bytes(), "workdir").map_err(setup)?;
    let creds = match &spec.creds {
        Some(c) => Some(
            ChildCreds::prepare(c)
                .and_then(|c| match bounding {
                    Some(present) => c.for_bounding_set(present),
                    None => Ok(c),
                })
                .map_err(|e| format!("credentials: {e}"))?
                .without_inherited_limits(current_rlimit),
        ),
        None => None,
    };
    let mut argv_p: Vec<*const libc::c_char> = argv.iter().map(|c| c.as_ptr()).collect();
    argv_p.push(std::ptr::null());
    let mut envp_p: Vec<*const libc::c_char> = envp.iter().map(|c| c.as_ptr()).collect();
    envp_p.push(std::ptr::null());

    let netns = match &spec.netns {
        Some(p) => Some(open_cloexec(p, libc::O_RDONLY).map_err(setup)?),
        None => None,
    };
    let shared;
    let code = match &spec.source {
        Some(code) => Some(code),
        None if spec.source_file => {
            let path = dir.join(SOURCE_FILE);
            shared = fs::read_to_string(&path)
                .map_err(|e| format!("code on fd 3: read {}: {e}", path.display()))?;
            Some(&shared)
        }
        None => None,
    };
    let source = match code {
        Some(code) => Some(source_memfd(code).map_err(|e| format!("code on fd 3: {e}"))?),
        None => None,
    };
    let devnull = open_cloexec(Path::new("/dev/null"), libc::O_RDWR).map_err(setup)?;
    let (out_r, out_w) = pipe_cloexec().map_err(setup)?;
    let (err_r, err_w) = pipe_cloexec().map_err(setup)?;
    let (ee_r, mut ee_w) = pipe_cloexec().map_err(setup)?;
    if source.is_some() && ee_w.as_raw_fd() == SOURCE_FD {
        // The child puts the code on that fd just before its exec, where a failed exec still
        // has to be reported.
        ee_w = fd_above(&ee_w, SOURCE_FD).map_err(setup)?;
    }
    let child = ChildArgs {
        procs: &[],
        netns: netns.as_ref().map(|f| f.as_raw_fd()),
        devnull: devnull.as_raw_fd(),
        out: out_w.as_raw_fd(),
        err: err_w.as_raw_fd(),
        ee: ee_w.as_raw_fd(),
        workdir: workdir.as_ptr(),
        program: program.as_ptr(),
        argv: argv_p.as_ptr(),
        envp: envp_p.as_ptr(),
        creds: creds.as_ref(),
        source: source.as_ref().map(|f| f.as_raw_fd()),
    };
    let pid = spawn_in_cgroup(&spec.cgroup, child)?;
    drop((out_w, err_w, ee_w, netns, source));
    let mut buf = [0u8; 5];
    let n = read_full(ee_r.as_raw_fd(), &mut buf);
    if n >= 5 {
        let errno = i32::from_ne_bytes([buf[1], buf[2], buf[3], buf[4]]);
        let mut status = 0;
        // SAFETY: pid is our child; status is a valid out-pointer.
        unsafe { libc::waitpid(pid, &mut status, 0) };
        let what = match (buf[0], &spec.creds) {
            (4, _) => format!("exec {}", spec.program.display()),
            (3, _) => format!("enter workdir {}", spec.workdir.display()),
            (9, Some(c)) => format!(
                "switch to uid {} gid {} groups {:?}",
                c.uid, c.gid, c.groups
            ),
            (8, Some(c)) => format!("drop capabilities (keeping {:?})", c.keep_caps),
            (b, _) => stage_name(b).to_owned(),
        };
        return Err(format!("{what}: {}", io::Error::from_raw_os_error(errno)));
    }
    // The exec-error pipe closed without a word: the exec has just succeeded.
    Ok(Started {
        pid,
        started_at_us: now_us(),
        stdout: out_r,
        stderr: err_r,
        writers,
    })
}

/// A sealed memfd (close-on-exec) holding `code`. Its inode is mode 0777 as every memfd's, so
/// the worker's user can open it again through `/proc/self/fd/3`.
fn source_memfd(code: &str) -> io::Result<OwnedFd> {
    // SAFETY: memfd_create reads the NUL-terminated name and takes integer flags.
    let fd = unsafe {
        libc::memfd_create(
            c"berth-code".as_ptr(),
            libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: memfd_create succeeded; the fd is ours alone.
    let mut file = fs::File::from(unsafe { OwnedFd::from_raw_fd(fd) });
    file.write_all(code.as_bytes())?;
    // The code stays as launched: neither the worker nor anyone else can change it.
    let seals = libc::F_SEAL_SEAL | libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_WRITE;
    // SAFETY: fcntl on an open fd with integer arguments.
    if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_ADD_SEALS, seals) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(OwnedFd::from(file))
}

/// A close-on-exec duplicate of `fd` on a descriptor above `above`.
fn fd_above(fd: &OwnedFd, above: RawFd) -> io::Result<OwnedFd> {
    // SAFETY: fcntl on an open fd with integer arguments; the new fd is ours.
    let new = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_DUPFD_CLOEXEC, above + 1) };
    if new < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: F_DUPFD_CLOEXEC succeeded; the fd is ours alone.
    Ok(unsafe { OwnedFd::from_raw_fd(new) })
}

fn read_full(fd: RawFd, buf: &mut [u8]) -> usize {
    let mut got = 0;
    while got < buf.len() {
        // SAFETY: the pointer and length describe the unfilled tail of buf.
        let n = unsafe { libc::read(fd, buf[got..].as_mut_ptr().cast(), buf.len() - got) };
        if n > 0 {
            got += n as usize;
        } else if n < 0 && io::Error::last_os_error().raw_os_error() == Some(libc::EINTR) {
            continue;
        } else {
            break;
        }
    }
    got
}

/// What the worker's process needs between its clone and its exec; every pointer is into memory
/// the shim prepared before, which stays untouched until the exec.
#[derive(Clone, Copy)]
struct ChildArgs<'a> {
    /// The cgroup files the child writes `0` to before anything else (empty when it was created
    /// in its cgroup).
    procs: &'a [RawFd],
    netns: Option<RawFd>,
    devnull: RawFd,
    out: RawFd,
    err: RawFd,
    ee: RawFd,
    workdir: *const libc::c_char,
    program: *const libc::c_char,
    argv: *const *const libc::c_char,
    envp: *const *const libc::c_char,
    /// Who the worker becomes before exec; `None`: the shim's identity.
    creds: Option<&'a ChildCreds>,
    /// The memfd holding the worker's code, to put on [`SOURCE_FD`] (the shim's copy is
    /// close-on-exec, the worker's not).
    source: Option<RawFd>,
}

/// Set once the kernel refused clone3 into a cgroup (see [`clone3_refused`]): later starts in
/// this shim skip the attempt and join through `cgroup.procs`. A shim starts one worker, so this
/// mostly says which way it went.
static CLONE3_REFUSED: AtomicBool = AtomicBool::new(false);

/// Starts the worker's process (`child`; its join list is filled in here) inside `cgroup` and
/// returns its pid, or the message the handshake reports.
///
/// [`WorkerCgroup::clone_into_dir`] decides the way. On v2 the process is created in the cgroup
/// by [`clone_into_cgroup`]: no migration, so no `cgroup.procs` write and no RCU grace period
/// (8–50 ms) for a launch that comes alone. Where the kernel refuses clone3 (older than 5.7, or
/// a seccomp filter such as Docker's default, which answers ENOSYS), it falls back to the way v1
/// always goes: [`spawn_child`], whose child writes `0` to the join files before exec.
fn spawn_in_cgroup(cgroup: &WorkerCgroup, child: ChildArgs<'_>) -> Result<i32, String> {
    let setup = |e: io::Error| e.to_string();
    if let Some(dir) = cgroup.clone_into_dir() {
        if !CLONE3_REFUSED.load(Ordering::Relaxed) {
            let dir_fd = open_cloexec(dir, libc::O_RDONLY | libc::O_DIRECTORY).map_err(setup)?;
            let child = ChildArgs {
                procs: &[],
                ..child
            };
            match clone_into_cgroup(dir_fd.as_raw_fd(), &child) {
                Ok(pid) => return Ok(pid),
                Err(e) if clone3_refused(&e) => CLONE3_REFUSED.store(true, Ordering::Relaxed),
                // The fork itself failed, as a clone would have.
                Err(e) if matches!(e.raw_os_error(), Some(libc::EAGAIN | libc::ENOMEM)) => {
                    return Err(format!("clone: {e}"));
                }
                // The cgroup refused the process (EBUSY: it has children with controllers,
                // EOPNOTSUPP: an invalid threaded domain, ...), as a `cgroup.procs` write would.
                Err(e) => return Err(format!("{}: {e}", stage_name(Stage::JoinCgroup as u8))),
            }
        }
    }
    // The child is a process with one thread, so moving that thread is moving the process; see
    // `join_file` for why it does not move the thread group.
    let procs: Vec<OwnedFd> = cgroup
        .join_files()
        .iter()
        .map(|p| open_cloexec(p, libc::O_WRONLY))
        .collect::<io::Result<_>>()
        .map_err(setup)?;
    let procs_raw: Vec<RawFd> = procs.iter().map(|f| f.as_raw_fd()).collect();
    spawn_child(&ChildArgs {
        procs: &procs_raw,
        ..child
    })
    .map_err(|e| format!("clone: {e}"))
}

/// Whether clone3 failed because this kernel (or a seccomp filter) does not offer what
/// [`clone_into_cgroup`] asks for, rather than because of the cgroup: ENOSYS (no clone3, or a
/// filter), E2BIG (a clone3 without the `cgroup` field, 5.3–5.6), EINVAL (CLONE_INTO_CGROUP
/// unknown), EPERM (a filter that denies it). A genuine EPERM of the cgroup comes back from the
/// fallback's `cgroup.procs` write too.
fn clone3_refused(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::ENOSYS | libc::E2BIG | libc::EINVAL | libc::EPERM)
    )
}

/// `struct clone_args` of `<linux/sched.h>` up to its `cgroup` field (Linux 5.7); every field is
/// an `__aligned_u64`.
#[repr(C, align(8))]
#[derive(Default)]
struct CloneArgs {
    flags: u64,
    pidfd: u64,
    child_tid: u64,
    parent_tid: u64,
    exit_signal: u64,
    stack: u64,
    stack_size: u64,
    tls: u64,
    set_tid: u64,
    set_tid_size: u64,
    cgroup: u64,
}

/// `CLONE_ARGS_SIZE_VER2`: the size of [`CloneArgs`], which clone3 takes as its version.
const CLONE_ARGS_SIZE_VER2: usize = 88;
const _: () = assert!(std::mem::size_of::<CloneArgs>() == CLONE_ARGS_SIZE_VER2);
/// Create the child in the cgroup `clone_args.cgroup` refers to (Linux 5.7).
const CLONE_INTO_CGROUP: u64 = 0x2_0000_0000;

/// Starts the worker's process with `clone3(CLONE_INTO_CGROUP | CLONE_VFORK)`, in the cgroup
/// whose directory `cgroup_dir` is open: the kernel creates it there (taking
/// `cgroup_threadgroup_rwsem` for reading only), so at no instant does it run outside. Fork
/// semantics, not posix_spawn's: without CLONE_VM the child runs on a copy of the shim's memory
/// (a clone3 with CLONE_VM would need a stack switched to in assembly), and CLONE_VFORK still
/// suspends the shim until the child has exec'd or exited. Returns the child's pid, or clone3's
/// error (see [`clone3_refused`]); `args.procs` should be empty.
fn clone_into_cgroup(cgroup_dir: RawFd, args: &ChildArgs<'_>) -> io::Result<i32> {
    let cl = CloneArgs {
        flags: CLONE_INTO_CGROUP | libc::CLONE_VFORK as u64,
        exit_signal: libc::SIGCHLD as u64,
        cgroup: cgroup_dir as u64,
        ..CloneArgs::default()
    };
    // SAFETY: clone3 reads `cl` (valid, CLONE_ARGS_SIZE_VER2 bytes) and nothing else: no stack,
    // no pidfd or tid pointers. Without CLONE_VM the child gets a copy of the caller's memory and
    // returns from this call on its own copy of this stack, like a fork, so nothing it does can
    // touch the shim's memory. Only the calling thread exists in the child; the shim has no other,
    // and the child takes no lock anyway (child_exec makes raw syscalls only, no allocation).
    let ret = unsafe {
        libc::syscall(
            libc::SYS_clone3,
            &cl as *const CloneArgs,
            CLONE_ARGS_SIZE_VER2,
        )
    };
    if ret == 0 {
        // SAFETY: this is the fresh child (clone3 returned 0), on its own copy of the shim's
        // memory, where every fd and pointer of `args` is as the shim prepared it; child_exec
        // never returns.
        unsafe { child_exec(args) }
    }
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(ret as i32)
}

/// Stack of the worker's process until its exec (it makes a handful of raw syscalls).
const CHILD_STACK: usize = 64 * 1024;

/// Starts the worker's process as posix_spawn does (on v1, and on v2 where clone3 is refused):
/// `clone(CLONE_VM | CLONE_VFORK)`, on a stack of its own, the shim suspended until the child has
/// exec'd or exited. Unlike fork, nothing of the shim's memory is copied (no page tables to copy,
/// no copy-on-write faults afterwards, none to tear down at the exec). Returns the child's pid.
fn spawn_child(args: &ChildArgs<'_>) -> io::Result<i32> {
    extern "C" fn entry(arg: *mut libc::c_void) -> libc::c_int {
        // SAFETY: `arg` is the ChildArgs that spawn_child passed, alive while the parent is
        // suspended (CLONE_VFORK), and this runs in the fresh child.
        unsafe { child_exec(&*(arg as *const ChildArgs<'_>)) }
    }
    let mut stack = vec![0u8; CHILD_STACK];
    // The stack grows down from its 16-byte aligned top.
    let top = (stack.as_mut_ptr() as usize + stack.len()) & !15;
    // SAFETY: prctl with integer arguments only.
    let dumpable = unsafe { libc::prctl(libc::PR_GET_DUMPABLE, 0, 0, 0, 0) };
    // SAFETY: the child runs `entry` on `stack`, which outlives it: with CLONE_VFORK this thread
    // (the shim's only one) sleeps until the child has exec'd or exited, and only then `stack`
    // and `args` may go. The child shares the shim's memory but writes none of it except its own
    // stack and errno (read by nobody until the child is gone); its signal dispositions are its
    // own (no CLONE_SIGHAND), and child_exec restores them and the mask before exec.
    let pid = unsafe {
        libc::clone(
            entry,
            top as *mut libc::c_void,
            libc::CLONE_VM | libc::CLONE_VFORK | libc::SIGCHLD,
            (args as *const ChildArgs<'_>).cast_mut().cast(),
        )
    };
    drop(stack);
    if pid < 0 {
        return Err(io::Error::last_os_error());
    }
    // A change of uid makes the memory it runs in non-dumpable (fs.suid_dumpable), and the child
    // ran in the shim's until its exec: the shim's own /proc files would stay root's, and it would
    // not dump core.
    // SAFETY: prctl with integer arguments only; the child has exec'd or exited (CLONE_VFORK).
    unsafe {
        if args.creds.is_some() && libc::prctl(libc::PR_GET_DUMPABLE, 0, 0, 0, 0) != dumpable {
            libc::prctl(libc::PR_SET_DUMPABLE, dumpable as libc::c_ulong, 0, 0, 0);
        }
    }
    Ok(pid)
}

/// The child between clone and exec: raw syscalls only.
///
/// # Safety
/// Must be called in a freshly cloned child; all pointers must be valid NUL-terminated strings
/// or NULL-terminated arrays of them.
unsafe fn child_exec(a: &ChildArgs<'_>) -> ! {
    let ee = a.ee;
    let fail = |stage: Stage| -> ! {
        // SAFETY: errno location is thread-local and valid; write/_exit are async-signal-safe.
        unsafe {
            let errno = *libc::__errno_location();
            let e = errno.to_ne_bytes();
            let msg = [stage as u8, e[0], e[1], e[2], e[3]];
            libc::write(ee, msg.as_ptr().cast(), msg.len());
            libc::_exit(127)
        }
    };
    // SAFETY: raw syscalls on fds and pointers the caller guarantees valid (see above).
    unsafe {
        for &fd in a.procs {
            if libc::write(fd, b"0".as_ptr().cast(), 1) != 1 {
                fail(Stage::JoinCgroup);
            }
        }
        if let Some(ns) = a.netns {
            if libc::setns(ns, libc::CLONE_NEWNET) != 0 {
                fail(Stage::JoinNetns);
            }
        }
        if libc::setsid() < 0 {
            fail(Stage::Setup);
        }
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigprocmask(libc::SIG_SETMASK, &set, std::ptr::null_mut());
        for sig in [libc::SIGINT, libc::SIGHUP, libc::SIGPIPE] {
            libc::signal(sig, libc::SIG_DFL);
        }
        if libc::dup2(a.devnull, 0) < 0 || libc::dup2(a.out, 1) < 0 || libc::dup2(a.err, 2) < 0 {
            fail(Stage::Setup);
        }
        if let Some(c) = a.creds {
            if let Err(stage) = apply_creds(c) {
                fail(stage);
            }
        }
        // As the worker's user, when it has one.
        if libc::chdir(a.workdir) != 0 {
            fail(Stage::Workdir);
        }
        // Last, as nothing after it may use that fd: the exec-error pipe is never on it (see
        // start_worker). dup2 leaves the copy without FD_CLOEXEC, but does nothing where the
        // memfd is on that fd already.
        if let Some(fd) = a.source {
            let placed = if fd == SOURCE_FD {
                libc::fcntl(fd, libc::F_SETFD, 0) == 0
            } else {
                libc::dup2(fd, SOURCE_FD) == SOURCE_FD
            };
            if !placed {
                fail(Stage::Source);
            }
        }
        libc::execve(a.program, a.argv, a.envp);
        fail(Stage::Exec)
    }
}

/// The worker's credentials, applied in the child in the order `super::creds` explains. On
/// failure returns the stage right after the failing syscall, errno still its.
///
/// # Safety
/// As [`child_exec`]: raw syscalls only, no allocation, no lock.
unsafe fn apply_creds(c: &ChildCreds) -> Result<(), Stage> {
    let errno = || {
        // SAFETY: the errno location of this thread is always valid.
        unsafe { *libc::__errno_location() }
    };
    // SAFETY: raw syscalls on pointers into `c` (alive and untouched until the exec) and on
    // this stack.
    unsafe {
        // Opened here: /proc/self is whoever opens it.
        let fd = libc::open(
            c"/proc/self/oom_score_adj".as_ptr(),
            libc::O_WRONLY | libc::O_CLOEXEC,
        );
        if fd < 0 {
            return Err(Stage::OomScore);
        }
        let text = c.oom_score_adj_text();
        if libc::write(fd, text.as_ptr().cast(), text.len()) < 0 {
            return Err(Stage::OomScore);
        }
        libc::close(fd);
        for (resource, limit) in &c.rlimits {
            if !set_rlimit_closest(*resource, limit) {
                return Err(Stage::Rlimits);
            }
        }
        libc::umask(c.umask);
        // Before the capabilities go: lowering it (under a daemon run at a higher one) needs
        // CAP_SYS_NICE. A failure costs only priority.
        libc::setpriority(libc::PRIO_PROCESS, 0, c.nice);
        // What the shim has and the worker may not keep: under a zygote, nothing.
        for cap in Caps(c.drop_bounding) {
            if libc::prctl(libc::PR_CAPBSET_DROP, libc::c_ulong::from(cap), 0, 0, 0) != 0 {
                // Past the last capability this kernel knows (cap_last_cap), where the shim was
                // not told its set.
                if errno() == libc::EINVAL {
                    break;
                }
                return Err(Stage::Capabilities);
            }
        }
        // The capset below leaves of the ambient set only what is both permitted and
        // inheritable: for a worker that keeps nothing, nothing.
        let clear_ambient = libc::PR_CAP_AMBIENT_CLEAR_ALL as libc::c_ulong;
        if c.keep != 0
            && libc::prctl(libc::PR_CAP_AMBIENT, clear_ambient, 0, 0, 0) != 0
            && errno() != libc::EINVAL
        {
            return Err(Stage::Capabilities);
        }
        // Raw syscalls: glibc's wrappers signal every thread they know of to change its ids too,
        // and the threads this child knows of are the shim's.
        if libc::syscall(libc::SYS_setgroups, c.groups.len(), c.groups.as_ptr()) != 0 {
            return Err(Stage::Identity);
        }
        if libc::syscall(libc::SYS_setresgid, c.gid, c.gid, c.gid) != 0 {
            return Err(Stage::Identity);
        }
        if libc::syscall(libc::SYS_setresuid, c.uid, c.uid, c.uid) != 0 {
            return Err(Stage::Identity);
        }
        let mut header = c.cap_header();
        let data = c.cap_data();
        if libc::syscall(libc::SYS_capset, &mut header as *mut _, data.as_ptr()) != 0 {
            return Err(Stage::Capabilities);
        }
        if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 {
            return Err(Stage::NoNewPrivs);
        }
    }
    Ok(())
}

/// Sets one resource limit; where raising its hard limit is refused (no CAP_SYS_RESOURCE, or
/// above `fs.nr_open`), sets the closest it may: both limits lowered to the current hard one,
/// as systemd does. Returns false, errno set, when even that fails.
///
/// # Safety
/// As [`child_exec`]: raw syscalls only.
unsafe fn set_rlimit_closest(resource: libc::c_int, want: &KernelRlimit) -> bool {
    let none = std::ptr::null_mut::<KernelRlimit>();
    // SAFETY: prlimit64 on this process, reading `want` and writing `now`, both valid.
    unsafe {
        if libc::syscall(libc::SYS_prlimit64, 0, resource, want as *const _, none) == 0 {
            return true;
        }
        if *libc::__errno_location() != libc::EPERM {
            return false;
        }
        let mut now = KernelRlimit { cur: 0, max: 0 };
        if libc::syscall(libc::SYS_prlimit64, 0, resource, none, &mut now as *mut _) != 0 {
            return false;
        }
        if now.max == u64::MAX {
            // Nothing was out of reach: refused for another reason.
            *libc::__errno_location() = libc::EPERM;
            return false;
        }
        let closest = KernelRlimit {
            cur: want.cur.min(now.max),
            max: want.max.min(now.max),
        };
        let closest_p = &closest as *const KernelRlimit;
        closest == now || libc::syscall(libc::SYS_prlimit64, 0, resource, closest_p, none) == 0
    }
}

fn set_nonblocking(fd: RawFd) {
    // SAFETY: fcntl on an open fd with integer flags.
    unsafe {
        let fl = libc::fcntl(fd, libc::F_GETFL);
        libc::fcntl(fd, libc::F_SETFL, fl | libc::O_NONBLOCK);
    }
}

/// How long the shim keeps draining output after the worker's processes are gone; only a
/// process that left the cgroup could still hold the pipes.
const DRAIN_LIMIT: Duration = Duration::from_secs(5);

fn supervise(dir: &Path, spec: &ShimSpec, mut s: Started) -> io::Result<()> {
    let main_pid = s.pid;
    let pidfd = pidfd_open(main_pid).ok();
    // The end of the worker and of orphans reparented to us (we are a subreaper) both raise
    // SIGCHLD, so while the worker runs the shim sleeps until output or a child's end: no
    // periodic wake-ups, which thousands of idle shims would add up.
    let sigchld = child_signals();
    let fds = [s.stdout.as_raw_fd(), s.stderr.as_raw_fd()];
    for fd in fds {
        set_nonblocking(fd);
    }
    let mut open = [true, true];
    let mut main_status: Option<i32> = None;
    let mut drain_deadline: Option<Instant> = None;
    let mut buf = vec![0u8; 64 * 1024];
    // Counted over all runs of the worker (a restart starts a new shim in the same directory).
    let mut dropped = dropped_bytes(dir);
    loop {
        let mut pfds: Vec<libc::pollfd> = Vec::with_capacity(4);
        for (i, fd) in fds.iter().enumerate() {
            if open[i] {
                pfds.push(poll_in(*fd));
            }
        }
        if main_status.is_none() {
            if let Some(p) = &pidfd {
                pfds.push(poll_in(p.as_raw_fd()));
            }
        }
        if let Some(f) = &sigchld {
            pfds.push(poll_in(f.as_raw_fd()));
        }
        let timeout = match (main_status, &sigchld) {
            (Some(_), _) => 100,
            (None, Some(_)) => -1,
            (None, None) => 1000,
        };
        // SAFETY: pfds is a valid slice of pollfd for the duration of the call.
        unsafe { libc::poll(pfds.as_mut_ptr(), pfds.len() as libc::nfds_t, timeout) };
        if let Some(f) = &sigchld {
            drain_signals(f.as_raw_fd());
        }
        for i in 0..2 {
            if !open[i] {
                continue;
            }
            loop {
                // SAFETY: buf is valid for buf.len() bytes.
                let n = unsafe { libc::read(fds[i], buf.as_mut_ptr().cast(), buf.len()) };
                if n > 0 {
                    // A full disk must not kill the worker: drop output rather than block, and
                    // say how much in the worker's directory, where the daemon reads it.
                    if let Err(e) = s.writers[i].write(&buf[..n as usize]) {
                        dropped += e.bytes;
                        let _ = record_dropped(dir, dropped);
                    }
                    continue;
                }
                if n == 0 {
                    open[i] = false;
                }
                break;
            }
        }
        // Reap the main process and any orphan that was reparented to us (we are a subreaper).
        loop {
            let mut status = 0;
            // SAFETY: status is a valid out-pointer.
            let pid = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
            if pid <= 0 {
                break;
            }
            if pid == main_pid {
                main_status = Some(status);
            }
        }
        if main_status.is_some() && drain_deadline.is_none() {
            // The worker is over: nothing of it may outlive it.
            let _ = spec.cgroup.kill_all(Duration::from_secs(10));
            drain_deadline = Some(Instant::now() + DRAIN_LIMIT);
        }
        if let (Some(status), Some(deadline)) = (main_status, drain_deadline) {
            if (!open[0] && !open[1]) || Instant::now() >= deadline {
                let (exit_code, signal) = decode_status(status);
                return record_exit(
                    dir,
                    ExitRecord {
                        pid: main_pid as u32,
                        exit_code,
                        signal,
                        spawn_error: None,
                        started_at_us: Some(s.started_at_us),
                        ..ExitRecord::ended(now_us())
                    },
                );
            }
        }
    }
}

/// Splits a wait status into (exit code, signal).
pub fn decode_status(status: i32) -> (Option<i32>, Option<i32>) {
    if libc::WIFEXITED(status) {
        (Some(libc::WEXITSTATUS(status)), None)
    } else if libc::WIFSIGNALED(status) {
        (None, Some(libc::WTERMSIG(status)))
    } else {
        (None, None)
    }
}

fn record_exit(dir: &Path, rec: ExitRecord) -> io::Result<()> {
    let json = serde_json::to_vec(&rec).map_err(io::Error::other)?;
    write_atomic(&dir.join(EXIT_FILE), &json)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handshake_lines() {
        assert_eq!(
            parse_handshake("ok 1234 1700000000123456\n"),
            Ok(Handshake {
                pid: 1234,
                started_at: Some(UNIX_EPOCH + Duration::from_micros(1_700_000_000_123_456))
            })
        );
        assert_eq!(
            parse_handshake("ok 1234\n"),
            Ok(Handshake {
                pid: 1234,
                started_at: None
            })
        );
        for bad in ["ok 1234 soon", "ok 1234 1 2", "ok  1"] {
            assert!(
                parse_handshake(bad).unwrap_err().contains("bad handshake"),
                "{bad}"
            );
        }
        assert_eq!(
            parse_handshake("err exec /x: No such file or directory\n"),
            Err("exec /x: No such file or directory".to_owned())
        );
        assert!(parse_handshake("").unwrap_err().contains("exited before"));
        assert!(parse_handshake("ok abc")
            .unwrap_err()
            .contains("bad handshake"));
    }

    #[test]
    fn exit_records_with_and_without_a_start() {
        // What an older shim wrote: the end in milliseconds only.
        let old = r#"{"pid":7,"exit_code":0,"signal":null,"spawn_error":null,"finished_at_ms":5}"#;
        let r: ExitRecord = serde_json::from_str(old).unwrap();
        assert_eq!(r.started_at(), None);
        assert_eq!(r.finished_at(), UNIX_EPOCH + Duration::from_millis(5));
        let r = ExitRecord {
            pid: 7,
            started_at_us: Some(3_000_250),
            ..ExitRecord::ended(5_000_999)
        };
        assert_eq!(r.finished_at_ms, 5_000);
        let back: ExitRecord = serde_json::from_slice(&serde_json::to_vec(&r).unwrap()).unwrap();
        assert_eq!(back, r);
        assert_eq!(
            back.started_at(),
            Some(UNIX_EPOCH + Duration::from_micros(3_000_250))
        );
        assert_eq!(
            back.finished_at(),
            UNIX_EPOCH + Duration::from_micros(5_000_999)
        );
    }

    #[test]
    fn clone_args_is_clone_args_size_ver2() {
        assert_eq!(std::mem::size_of::<CloneArgs>(), CLONE_ARGS_SIZE_VER2);
        assert_eq!(std::mem::align_of::<CloneArgs>(), 8);
        assert_eq!(std::mem::offset_of!(CloneArgs, exit_signal), 32);
        assert_eq!(std::mem::offset_of!(CloneArgs, cgroup), 80);
    }

    #[test]
    fn only_a_refused_clone3_falls_back() {
        for errno in [libc::ENOSYS, libc::E2BIG, libc::EINVAL, libc::EPERM] {
            assert!(
                clone3_refused(&io::Error::from_raw_os_error(errno)),
                "{errno}"
            );
        }
        for errno in [libc::EBUSY, libc::EOPNOTSUPP, libc::ENOENT, libc::EAGAIN] {
            assert!(
                !clone3_refused(&io::Error::from_raw_os_error(errno)),
                "{errno}"
            );
        }
    }

    /// Whether this kernel offers clone3 with CLONE_INTO_CGROUP (5.7) to this process. A seccomp
    /// filter may refuse clone3 (ENOSYS, as container runtimes' default profiles do): a clone3
    /// with no arguments at all tells, as the kernel refuses it with EINVAL while a filter
    /// answers first. So the check runs under a filter that lets clone3 through too.
    fn clone_into_cgroup_expected() -> bool {
        // SAFETY: uname fills the zeroed struct it is given.
        let release = unsafe {
            let mut u: libc::utsname = std::mem::zeroed();
            libc::uname(&mut u);
            std::ffi::CStr::from_ptr(u.release.as_ptr())
                .to_string_lossy()
                .into_owned()
        };
        let mut v = release
            .split(|c: char| !c.is_ascii_digit())
            .map(|n| n.parse::<u32>().unwrap_or(0));
        let (major, minor) = (v.next().unwrap_or(0), v.next().unwrap_or(0));
        // SAFETY: clone3 with a null pointer and size 0 creates nothing: the kernel checks the
        // size (below CLONE_ARGS_SIZE_VER0: EINVAL) before it reads anything.
        let r = unsafe { libc::syscall(libc::SYS_clone3, std::ptr::null::<u8>(), 0usize) };
        let errno = io::Error::last_os_error().raw_os_error();
        assert_eq!(r, -1, "clone3 with no arguments succeeded");
        (major, minor) >= (5, 7) && errno == Some(libc::EINVAL)
    }

    /// Starts `cat /proc/self/cgroup` the way the shim starts a worker, in `cgroup`; returns
    /// what it printed.
    fn cgroup_seen_by_a_worker(cgroup: &WorkerCgroup) -> String {
        let c = |s: &str| CString::new(s).unwrap();
        let (program, argv0, arg, workdir) =
            (c("/bin/cat"), c("cat"), c("/proc/self/cgroup"), c("/"));
        let argv = [argv0.as_ptr(), arg.as_ptr(), std::ptr::null()];
        let envp = [std::ptr::null()];
        let devnull = open_cloexec(Path::new("/dev/null"), libc::O_RDWR).unwrap();
        let (out_r, out_w) = pipe_cloexec().unwrap();
        let (ee_r, ee_w) = pipe_cloexec().unwrap();
        let child = ChildArgs {
            procs: &[],
            netns: None,
            devnull: devnull.as_raw_fd(),
            out: out_w.as_raw_fd(),
            err: devnull.as_raw_fd(),
            ee: ee_w.as_raw_fd(),
            workdir: workdir.as_ptr(),
            program: program.as_ptr(),
            argv: argv.as_ptr(),
            envp: envp.as_ptr(),
            creds: None,
            source: None,
        };
        let pid = spawn_in_cgroup(cgroup, child).unwrap();
        drop((out_w, ee_w));
        let mut ee = [0u8; 5];
        assert_eq!(read_full(ee_r.as_raw_fd(), &mut ee), 0, "the exec failed");
        let mut out = vec![0u8; 64 * 1024];
        let n = read_full(out_r.as_raw_fd(), &mut out);
        let mut status = 0;
        // SAFETY: pid is our child; status is a valid out-pointer.
        assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
        assert_eq!(decode_status(status), (Some(0), None));
        String::from_utf8_lossy(&out[..n]).into_owned()
    }

    /// Real kernel, root only: a worker's process runs in its cgroup from its first instruction:
    /// on v2 created there by clone3 (the cgroup2 hierarchy of the hybrid layout works too),
    /// with no fallback where the kernel offers it; on v1 joined through `tasks`.
    #[test]
    fn worker_process_starts_in_its_cgroup() {
        use crate::cgroup::{
            join_in_hierarchy, parse_mountinfo, parse_proc_cgroup, CgroupVersion, Controller,
        };
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("skipped: needs root (cgroups)");
            return;
        }
        let mounts = parse_mountinfo(&fs::read_to_string("/proc/self/mountinfo").unwrap());
        let own = parse_proc_cgroup(&fs::read_to_string("/proc/self/cgroup").unwrap());
        let name = format!("berth-shimtest-{}", std::process::id());
        let mut tried = 0;
        if let Some(m) = mounts.iter().find(|m| m.version == CgroupVersion::V2) {
            let (_, own_path) = own.iter().find(|(c, _)| c.is_empty()).unwrap();
            let dir = join_in_hierarchy(m, own_path).join(&name);
            fs::create_dir(&dir).unwrap();
            let cg = WorkerCgroup {
                version: CgroupVersion::V2,
                dirs: vec![(Controller::Unified, dir)],
            };
            let want = format!("0::{}/{name}", own_path.trim_end_matches('/'));
            let seen = cgroup_seen_by_a_worker(&cg);
            let refused = CLONE3_REFUSED.load(Ordering::Relaxed);
            // The fallback (what a kernel that refuses clone3 gets) ends in the same place. Only
            // this test touches CLONE3_REFUSED.
            CLONE3_REFUSED.store(true, Ordering::Relaxed);
            let seen_fallback = cgroup_seen_by_a_worker(&cg);
            CLONE3_REFUSED.store(refused, Ordering::Relaxed);
            // A cgroup that refuses the process is not a refused clone3: a removed one (ENOENT,
            // ENODEV on older kernels).
            let dir_fd = open_cloexec(&cg.dirs[0].1, libc::O_RDONLY | libc::O_DIRECTORY).unwrap();
            cg.remove().unwrap();
            let (_, out_w) = pipe_cloexec().unwrap();
            let none = [std::ptr::null()];
            let gone = ChildArgs {
                procs: &[],
                netns: None,
                devnull: out_w.as_raw_fd(),
                out: out_w.as_raw_fd(),
                err: out_w.as_raw_fd(),
                ee: out_w.as_raw_fd(),
                workdir: c"/".as_ptr(),
                program: c"/bin/true".as_ptr(),
                argv: none.as_ptr(),
                envp: none.as_ptr(),
                creds: None,
                source: None,
            };
            let into_removed = clone_into_cgroup(dir_fd.as_raw_fd(), &gone);
            assert!(seen.lines().any(|l| l == want), "v2: {seen:?}, want {want}");
            assert!(
                seen_fallback.lines().any(|l| l == want),
                "v2 fallback: {seen_fallback:?}, want {want}"
            );
            if clone_into_cgroup_expected() {
                assert!(!refused, "clone3 into the cgroup was refused: fell back");
                let e = into_removed.expect_err("clone3 into a removed cgroup");
                assert!(!clone3_refused(&e), "{e}");
            }
            eprintln!(
                "v2: {}; the fallback joined through cgroup.procs",
                if refused {
                    "clone3 refused, joined through cgroup.procs"
                } else {
                    "created in the cgroup by clone3"
                }
            );
            tried += 1;
        }
        let pids = |(c, _): &&(Vec<String>, String)| c.iter().any(|x| x == "pids");
        if let (Some(m), Some((_, own_path))) = (
            mounts.iter().find(|m| {
                m.version == CgroupVersion::V1 && m.controllers.iter().any(|c| c == "pids")
            }),
            own.iter().find(pids),
        ) {
            let dir = join_in_hierarchy(m, own_path).join(&name);
            fs::create_dir(&dir).unwrap();
            let cg = WorkerCgroup {
                version: CgroupVersion::V1,
                dirs: vec![(Controller::Pids, dir)],
            };
            let seen = cgroup_seen_by_a_worker(&cg);
            cg.remove().unwrap();
            let want = format!(":pids:{}/{name}", own_path.trim_end_matches('/'));
            assert!(
                seen.lines().any(|l| l.ends_with(&want)),
                "v1: {seen:?}, want {want}"
            );
            eprintln!("v1: joined through tasks");
            tried += 1;
        }
        if tried == 0 {
            crate::cannot_run("neither cgroup2 nor the v1 pids controller is mounted");
        }
    }

    #[test]
    fn a_spec_without_creds_parses() {
        let spec = ShimSpec {
            worker_id: "w1".into(),
            program: "/bin/true".into(),
            argv: vec!["true".into()],
            env: vec![],
            workdir: "/".into(),
            cgroup: WorkerCgroup {
                version: crate::cgroup::CgroupVersion::V2,
                dirs: vec![],
            },
            netns: None,
            rotation: Rotation {
                segment_bytes: 1 << 20,
                segments: 2,
            },
            meta: serde_json::Value::Null,
            creds: None,
            source: None,
            source_file: false,
        };
        // What an older daemon wrote: no `creds` key at all.
        let mut old = serde_json::to_value(&spec).unwrap();
        assert!(old.as_object_mut().unwrap().remove("creds").is_some());
        let back: ShimSpec = serde_json::from_value(old).unwrap();
        assert_eq!(back, spec);
        let spec = ShimSpec {
            creds: Some(nobody()),
            ..spec
        };
        let back: ShimSpec = serde_json::from_slice(&serde_json::to_vec(&spec).unwrap()).unwrap();
        assert_eq!(back, spec);
    }

    /// Whether this process runs as root, or a line saying the test is skipped.
    fn is_root(what: &str) -> bool {
        // SAFETY: geteuid has no preconditions.
        let root = unsafe { libc::geteuid() } == 0;
        if !root {
            eprintln!("skipped: needs root ({what})");
        }
        root
    }

    /// The tests that start workers with credentials change process-wide state (limits,
    /// oom_score_adj, and, through a CLONE_VM child, dumpability): one at a time.
    static CREDS_TESTS: std::sync::Mutex<()> = std::sync::Mutex::new(());

    fn nobody() -> WorkerCreds {
        WorkerCreds {
            uid: 65534,
            gid: 65534,
            groups: vec![65534],
            keep_caps: vec![],
            rlimits: crate::launcher::default_rlimits(),
            umask: 0o022,
            oom_score_adj: 0,
            pooled: false,
        }
    }

    /// A cgroup for each way a worker's process starts, both of which run `child_exec`: clone3
    /// into a v2 cgroup where cgroup2 is mounted, and clone(CLONE_VM) that joins a v1 pids
    /// cgroup (or, where there is none, no cgroup at all). Removed on drop.
    struct TestCgroups(Vec<(&'static str, WorkerCgroup)>);

    impl TestCgroups {
        fn new(tag: &str) -> Self {
            use crate::cgroup::{
                join_in_hierarchy, parse_mountinfo, parse_proc_cgroup, CgroupVersion, Controller,
            };
            let mounts = parse_mountinfo(&fs::read_to_string("/proc/self/mountinfo").unwrap());
            let own = parse_proc_cgroup(&fs::read_to_string("/proc/self/cgroup").unwrap());
            let name = format!("berth-credstest-{tag}-{}", std::process::id());
            let mut ways = Vec::new();
            if let (Some(m), Some((_, own_path))) = (
                mounts.iter().find(|m| m.version == CgroupVersion::V2),
                own.iter().find(|(c, _)| c.is_empty()),
            ) {
                let dir = join_in_hierarchy(m, own_path).join(&name);
                fs::create_dir(&dir).unwrap();
                let cg = WorkerCgroup {
                    version: CgroupVersion::V2,
                    dirs: vec![(Controller::Unified, dir)],
                };
                ways.push(("clone3 into a v2 cgroup", cg));
            }
            let pids = |(c, _): &&(Vec<String>, String)| c.iter().any(|x| x == "pids");
            let v1 = match (
                mounts.iter().find(|m| {
                    m.version == CgroupVersion::V1 && m.controllers.iter().any(|c| c == "pids")
                }),
                own.iter().find(pids),
            ) {
                (Some(m), Some((_, own_path))) => {
                    let dir = join_in_hierarchy(m, own_path).join(&name);
                    fs::create_dir(&dir).unwrap();
                    vec![(Controller::Pids, dir)]
                }
                _ => vec![],
            };
            let cg = WorkerCgroup {
                version: CgroupVersion::V1,
                dirs: v1,
            };
            ways.push(("clone(CLONE_VM), joining v1", cg));
            Self(ways)
        }
    }

    impl Drop for TestCgroups {
        fn drop(&mut self) {
            for (_, cg) in &self.0 {
                let _ = cg.remove();
            }
        }
    }

    /// (exit code, signal), as [`decode_status`] returns them.
    type ExitOf = (Option<i32>, Option<i32>);

    /// Starts `argv` the way the shim starts a worker (`start_worker`) and reads its stdout to
    /// the end; returns it and the exit status, or the start's error.
    fn run_worker(
        cgroup: &WorkerCgroup,
        argv: &[&str],
        workdir: &Path,
        creds: Option<WorkerCreds>,
    ) -> Result<(String, ExitOf), String> {
        run_spec(&worker_spec(cgroup, argv, workdir, creds), None)
    }

    /// The spec of a worker that runs `argv` in `cgroup` and `workdir`, as `creds`.
    fn worker_spec(
        cgroup: &WorkerCgroup,
        argv: &[&str],
        workdir: &Path,
        creds: Option<WorkerCreds>,
    ) -> ShimSpec {
        ShimSpec {
            worker_id: "w".into(),
            program: argv[0].into(),
            argv: argv.iter().map(|a| a.to_string()).collect(),
            env: vec![("PATH".into(), "/usr/bin:/bin".into())],
            workdir: workdir.into(),
            cgroup: cgroup.clone(),
            netns: None,
            rotation: Rotation {
                segment_bytes: 1 << 20,
                segments: 2,
            },
            meta: serde_json::Value::Null,
            creds,
            source: None,
            source_file: false,
        }
    }

    /// [`run_worker`] of a whole spec, by a shim whose zygote told it its bounding set is
    /// `bounding` (`None`: as an exec'd shim).
    fn run_spec(spec: &ShimSpec, bounding: Option<u64>) -> Result<(String, ExitOf), String> {
        let dir = tempfile::tempdir().unwrap();
        let started = start_worker(dir.path(), spec, bounding)?;
        let mut out = vec![0u8; 256 * 1024];
        let n = read_full(started.stdout.as_raw_fd(), &mut out);
        let mut status = 0;
        // SAFETY: the pid is our child; status is a valid out-pointer.
        let reaped = unsafe { libc::waitpid(started.pid, &mut status, 0) };
        assert_eq!(reaped, started.pid);
        Ok((
            String::from_utf8_lossy(&out[..n]).into_owned(),
            decode_status(status),
        ))
    }

    /// The fields of a `/proc/<pid>/status` line.
    fn status_field<'a>(status: &'a str, key: &str) -> Vec<&'a str> {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
            .unwrap_or_else(|| panic!("no {key} in {status}"))
            .split_whitespace()
            .collect()
    }

    fn cap_set(status: &str, key: &str) -> u64 {
        u64::from_str_radix(status_field(status, key)[0], 16).unwrap()
    }

    fn dumpable() -> i32 {
        // SAFETY: prctl with integer arguments only.
        unsafe { libc::prctl(libc::PR_GET_DUMPABLE, 0, 0, 0, 0) }
    }

    /// What a worker prints about itself: its status, soft and hard NOFILE, umask and
    /// oom_score_adj, one per line after the status.
    const SELF_REPORT: [&str; 3] = [
        "/bin/sh",
        "-c",
        "cat /proc/self/status; ulimit -n; ulimit -Hn; umask; cat /proc/self/oom_score_adj",
    ];

    /// This process's oom_score_adj and RLIMIT_NOFILE changed to what a shim has, so that a
    /// worker that inherited them would show it; restored on drop.
    struct ShimLike {
        oom: String,
        nofile: libc::rlimit,
        /// The hard limit a worker asking for 524288 gets: that, where this process may raise a
        /// hard limit, else this process's (lowering it is all it may do).
        worker_hard: u64,
    }

    impl ShimLike {
        fn set() -> Self {
            let oom = fs::read_to_string("/proc/self/oom_score_adj").unwrap();
            // -900 as the daemon's shims, which needs CAP_SYS_RESOURCE; any other value than 0
            // shows inheritance as well.
            if fs::write("/proc/self/oom_score_adj", "-900").is_err() {
                eprintln!("no CAP_SYS_RESOURCE: this process at oom_score_adj 500, not -900");
                fs::write("/proc/self/oom_score_adj", "500").unwrap();
            }
            let nr_open: u64 = fs::read_to_string("/proc/sys/fs/nr_open")
                .map_or(1_048_576, |s| s.trim().parse().unwrap());
            let mut nofile = libc::rlimit {
                rlim_cur: 0,
                rlim_max: 0,
            };
            let raised = libc::rlimit {
                rlim_cur: 65_536,
                rlim_max: nr_open.min(1_048_576),
            };
            // SAFETY: getrlimit/setrlimit on valid structs.
            let hard = unsafe {
                libc::getrlimit(libc::RLIMIT_NOFILE, &mut nofile);
                if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                    raised.rlim_max
                } else {
                    // Soft at hard: still not what a worker gets.
                    let at_hard = libc::rlimit {
                        rlim_cur: nofile.rlim_max,
                        ..nofile
                    };
                    libc::setrlimit(libc::RLIMIT_NOFILE, &at_hard);
                    eprintln!(
                        "cannot raise RLIMIT_NOFILE's hard limit: this process at {0}/{0}",
                        nofile.rlim_max
                    );
                    nofile.rlim_max
                }
            };
            Self {
                oom,
                nofile,
                // Where the worker may not reach 524288 (this process could not raise its own
                // hard limit, or fs.nr_open is lower), it gets the closest: this process's.
                worker_hard: hard.min(524_288),
            }
        }
    }

    impl Drop for ShimLike {
        fn drop(&mut self) {
            let _ = fs::write("/proc/self/oom_score_adj", self.oom.trim());
            // SAFETY: setrlimit reads a valid struct.
            unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &self.nofile) };
        }
    }

    /// Real kernel, root only: a worker with credentials runs as its user, with no capability
    /// in any set, no_new_privs, systemd's NOFILE limits, its umask and oom_score_adj, none of
    /// them the shim's; on both ways a worker's process starts.
    #[test]
    fn worker_runs_as_its_user_without_privileges() {
        if !is_root("switches users") {
            return;
        }
        let _one = CREDS_TESTS.lock().unwrap_or_else(|e| e.into_inner());
        let cgroups = TestCgroups::new("nobody");
        let shim = ShimLike::set();
        let was_dumpable = dumpable();
        for (way, cg) in &cgroups.0 {
            let (out, status) = run_worker(cg, &SELF_REPORT, Path::new("/"), Some(nobody()))
                .unwrap_or_else(|e| panic!("{way}: {e}"));
            assert_eq!(status, (Some(0), None), "{way}: {out}");
            for key in ["Uid", "Gid"] {
                assert_eq!(status_field(&out, key), ["65534"; 4], "{way}: {key}");
            }
            assert_eq!(status_field(&out, "Groups"), ["65534"], "{way}");
            for key in ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"] {
                assert_eq!(cap_set(&out, key), 0, "{way}: {key}");
            }
            assert_eq!(status_field(&out, "NoNewPrivs"), ["1"], "{way}");
            let tail: Vec<&str> = out.lines().rev().take(4).collect();
            let hard = shim.worker_hard.to_string();
            assert_eq!(tail, ["0", "0022", hard.as_str(), "1024"], "{way}: {out}");
            // The CLONE_VM child's switch made the shim's memory non-dumpable; it is again.
            assert_eq!(dumpable(), was_dumpable, "{way}");
            eprintln!("{way}: runs as nobody, NOFILE 1024/{hard}");
        }
        drop(shim);
    }

    /// Real kernel, root only: a root worker keeps exactly the capabilities it is given, in the
    /// bounding set too, and no_new_privs.
    #[test]
    fn root_worker_keeps_only_its_capabilities() {
        if !is_root("capabilities") {
            return;
        }
        let _one = CREDS_TESTS.lock().unwrap_or_else(|e| e.into_inner());
        let cgroups = TestCgroups::new("root");
        let root = WorkerCreds {
            uid: 0,
            gid: 0,
            groups: vec![],
            keep_caps: vec![10],
            ..nobody()
        };
        for (way, cg) in &cgroups.0 {
            let (out, _) = run_worker(cg, &SELF_REPORT, Path::new("/"), Some(root.clone()))
                .unwrap_or_else(|e| panic!("{way}: {e}"));
            assert_eq!(status_field(&out, "Uid"), ["0"; 4], "{way}");
            for key in ["CapInh", "CapPrm", "CapEff", "CapBnd"] {
                assert_eq!(cap_set(&out, key), 0x400, "{way}: {key}");
            }
            assert_eq!(cap_set(&out, "CapAmb"), 0, "{way}");
            assert_eq!(status_field(&out, "NoNewPrivs"), ["1"], "{way}");
        }
    }

    /// A new network namespace, held by the returned fd (the thread that made it is gone).
    fn new_netns() -> io::Result<OwnedFd> {
        std::thread::spawn(|| {
            // SAFETY: unshare moves this thread alone into a new network namespace.
            if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
                return Err(io::Error::last_os_error());
            }
            open_cloexec(Path::new("/proc/thread-self/ns/net"), libc::O_RDONLY)
        })
        .join()
        .unwrap()
    }

    /// Raises `cap` in this thread's inheritable and ambient sets (as a daemon started with
    /// systemd's AmbientCapabilities= has it), for a worker to show that it does not inherit it.
    fn raise_ambient(cap: u8) {
        let mut header = super::super::creds::CapHeader {
            version: 0x2008_0522,
            pid: 0,
        };
        let mut data = [super::super::creds::CapData {
            effective: 0,
            permitted: 0,
            inheritable: 0,
        }; 2];
        let word = usize::from(cap / 32);
        // SAFETY: capget/capset of this thread with a v3 header and two words of data; prctl
        // with integer arguments.
        unsafe {
            let h = &mut header as *mut super::super::creds::CapHeader;
            assert_eq!(libc::syscall(libc::SYS_capget, h, data.as_mut_ptr()), 0);
            data[word].inheritable |= 1 << (cap % 32);
            assert_eq!(libc::syscall(libc::SYS_capset, h, data.as_ptr()), 0);
            let raise = libc::PR_CAP_AMBIENT_RAISE as libc::c_ulong;
            let r = libc::prctl(libc::PR_CAP_AMBIENT, raise, libc::c_ulong::from(cap), 0, 0);
            assert_eq!(r, 0, "{}", io::Error::last_os_error());
        }
    }

    /// Real kernel, root only: a shim whose bounding set its zygote shrank to what root workers
    /// may keep (here CAP_NET_BIND_SERVICE), told that set or not (as an exec'd shim), still starts
    /// a worker in its cgroup and network namespace as another user, with no capability left in
    /// any set; a root worker keeps exactly its own in each, and one that asks for more is
    /// refused before the clone. Told the set, the worker's process drops only what is left
    /// (nothing, or for nobody CAP_NET_BIND_SERVICE). No ambient capability of the shim's
    /// reaches either. Capabilities are a thread's: the thread that shrinks its bounding set
    /// stands for the zygote and its shim.
    #[test]
    fn a_zygotes_shim_drops_only_what_is_left() {
        use super::super::creds::{shrink_bounding_set, ChildCreds, CredsError};
        use std::os::unix::fs::MetadataExt;
        if !is_root("capabilities") {
            return;
        }
        let _one = CREDS_TESTS.lock().unwrap_or_else(|e| e.into_inner());
        let cgroups = TestCgroups::new("zygote");
        let netns = match new_netns() {
            Ok(fd) => Some(fd),
            Err(e) => {
                eprintln!("no network namespace ({e}): workers stay in this one");
                None
            }
        };
        let netns_path = netns
            .as_ref()
            .map(|fd| PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd())));
        let net_link = match &netns_path {
            Some(p) => format!("net:[{}]", fs::metadata(p).unwrap().ino()),
            None => fs::read_link("/proc/self/ns/net")
                .unwrap()
                .to_string_lossy()
                .into_owned(),
        };
        let report = [
            "/bin/sh",
            "-c",
            "cat /proc/self/status; readlink /proc/self/ns/net; cat /proc/self/cgroup",
        ];
        let nbs = 1u64 << 10;
        let root = WorkerCreds {
            uid: 0,
            gid: 0,
            groups: vec![],
            keep_caps: vec![10],
            ..nobody()
        };
        std::thread::scope(|s| {
            s.spawn(|| {
                let before = fs::read_to_string("/proc/thread-self/status").unwrap();
                assert_ne!(cap_set(&before, "CapBnd") & nbs, 0, "{before}");
                raise_ambient(10);
                let bounding = shrink_bounding_set(nbs);
                let shrunk = fs::read_to_string("/proc/thread-self/status").unwrap();
                assert_eq!(bounding, nbs);
                assert_eq!(cap_set(&shrunk, "CapBnd"), nbs);
                assert_eq!(cap_set(&shrunk, "CapAmb"), nbs);
                // The bounding set limits execs only: what the shim may do is intact.
                for key in ["CapPrm", "CapEff"] {
                    assert_eq!(cap_set(&shrunk, key), cap_set(&before, key), "{key}");
                }
                // What each worker's process still drops.
                let prepared = |c: &WorkerCreds| {
                    ChildCreds::prepare(c)
                        .and_then(|c| c.for_bounding_set(bounding))
                        .map(|c| c.drop_bounding)
                };
                assert_eq!(prepared(&nobody()), Ok(nbs));
                assert_eq!(prepared(&root), Ok(0));
                let more = WorkerCreds {
                    keep_caps: vec![10, 12, 21],
                    ..root.clone()
                };
                assert_eq!(
                    prepared(&more),
                    Err(CredsError::NotInBoundingSet(vec![12, 21]))
                );
                for (way, cg) in &cgroups.0 {
                    let name = cg.dirs.first().map(|(_, d)| d.file_name().unwrap());
                    // As a forked shim (told its set) and as an exec'd one (not told).
                    for told in [Some(bounding), None] {
                        let run = |creds: &WorkerCreds| {
                            let spec = ShimSpec {
                                netns: netns_path.clone(),
                                ..worker_spec(cg, &report, Path::new("/"), Some(creds.clone()))
                            };
                            let (out, status) = run_spec(&spec, told)
                                .unwrap_or_else(|e| panic!("{way}, told {told:?}: {e}"));
                            assert_eq!(status, (Some(0), None), "{way}: {out}");
                            assert!(out.lines().any(|l| l == net_link), "{way}: {out}");
                            if let Some(name) = name {
                                let name = format!("/{}", name.to_string_lossy());
                                assert!(out.lines().any(|l| l.ends_with(&name)), "{way}: {out}");
                            }
                            out
                        };
                        let out = run(&nobody());
                        for key in ["Uid", "Gid"] {
                            assert_eq!(status_field(&out, key), ["65534"; 4], "{way}: {key}");
                        }
                        for key in ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"] {
                            assert_eq!(cap_set(&out, key), 0, "{way}: {key}");
                        }
                        let out = run(&root);
                        assert_eq!(status_field(&out, "Uid"), ["0"; 4], "{way}");
                        for key in ["CapInh", "CapPrm", "CapEff", "CapBnd"] {
                            assert_eq!(cap_set(&out, key), nbs, "{way}: {key}");
                        }
                        assert_eq!(cap_set(&out, "CapAmb"), 0, "{way}");
                        assert_eq!(status_field(&out, "NoNewPrivs"), ["1"], "{way}");
                    }
                    let spec = worker_spec(cg, &["/bin/true"], Path::new("/"), Some(more.clone()));
                    assert_eq!(
                        run_spec(&spec, Some(bounding)).unwrap_err(),
                        "credentials: capabilities [12, 21] to keep are not in the shim's \
                         bounding set"
                    );
                    eprintln!("{way}: a zygote's shim starts workers as nobody and as root");
                }
            });
        });
    }

    /// Real kernel, root only: the workdir is entered as the worker's user, so one only root
    /// may enter fails the start, at that stage.
    #[test]
    fn workdir_is_entered_as_the_user() {
        if !is_root("switches users") {
            return;
        }
        let _one = CREDS_TESTS.lock().unwrap_or_else(|e| e.into_inner());
        let cgroups = TestCgroups::new("workdir");
        let private = tempfile::tempdir().unwrap();
        fs::set_permissions(
            private.path(),
            std::os::unix::fs::PermissionsExt::from_mode(0o700),
        )
        .unwrap();
        for (way, cg) in &cgroups.0 {
            let err = run_worker(cg, &["/bin/true"], private.path(), Some(nobody())).unwrap_err();
            assert_eq!(
                err,
                format!(
                    "enter workdir {}: Permission denied (os error 13)",
                    private.path().display()
                ),
                "{way}"
            );
            // Root still enters it.
            assert!(run_worker(cg, &["/bin/true"], private.path(), None).is_ok());
        }
    }

    /// Real kernel, root only: a spec without credentials runs its worker as the shim, root
    /// with the shim's capabilities (what every worker got before credentials).
    #[test]
    fn without_creds_the_worker_keeps_the_shims_identity() {
        if !is_root("compares with root") {
            return;
        }
        let _one = CREDS_TESTS.lock().unwrap_or_else(|e| e.into_inner());
        let cgroups = TestCgroups::new("none");
        let own = fs::read_to_string("/proc/self/status").unwrap();
        for (way, cg) in &cgroups.0 {
            let (out, status) = run_worker(cg, &SELF_REPORT, Path::new("/"), None).unwrap();
            assert_eq!(status, (Some(0), None), "{way}");
            assert_eq!(status_field(&out, "Uid"), ["0"; 4], "{way}");
            for key in ["CapPrm", "CapEff", "CapBnd", "NoNewPrivs"] {
                assert_eq!(
                    status_field(&out, key),
                    status_field(&own, key),
                    "{way}: {key}"
                );
            }
        }
    }

    /// Real kernel, root only: code too long for a command line reaches the worker on fd 3,
    /// open across its exec, readable by its user (nobody) through /proc/self/fd/3, and sealed.
    #[test]
    fn code_on_fd_3_is_read_by_the_workers_user() {
        if !is_root("switches users") {
            return;
        }
        let _one = CREDS_TESTS.lock().unwrap_or_else(|e| e.into_inner());
        let cgroups = TestCgroups::new("source");
        // 1 MiB of shell: a comment line, then what it prints.
        let code = format!(
            "#{}\necho \"$(id -u) $(wc -c < /proc/self/fd/3)\"\n(echo x >> /proc/self/fd/3) 2>/dev/null || echo sealed\n",
            "x".repeat(1 << 20)
        );
        for (way, cg) in &cgroups.0 {
            let argv = ["/bin/sh", "/proc/self/fd/3"];
            let spec = ShimSpec {
                source: Some(code.clone()),
                ..worker_spec(cg, &argv, Path::new("/"), Some(nobody()))
            };
            let (out, status) = run_spec(&spec, None).unwrap_or_else(|e| panic!("{way}: {e}"));
            assert_eq!(status, (Some(0), None), "{way}: {out}");
            assert_eq!(out, format!("65534 {}\nsealed\n", code.len()), "{way}");
        }
    }

    /// Not a check: what credentials add to a worker's start (to its exec), on each way a
    /// worker's process starts, by a zygote's shim (the bounding set shrunk to nothing, and told
    /// it) and by an exec'd one (the whole set, not told). Medians of 200 starts of /bin/true with
    /// and 200 without credentials, interleaved, after 20 of each to warm up. Run alone:
    /// `cargo test --release -p berth-sys --lib time_worker_start_with_creds -- --ignored
    /// --nocapture`
    #[test]
    #[ignore = "timing, not a check: run alone with --ignored --nocapture"]
    fn time_worker_start_with_creds() {
        if !is_root("switches users") {
            return;
        }
        let _one = CREDS_TESTS.lock().unwrap_or_else(|e| e.into_inner());
        let cgroups = TestCgroups::new("timing");
        let shim = ShimLike::set();
        let median = |v: &mut Vec<f64>| {
            v.sort_by(f64::total_cmp);
            v[v.len() / 2]
        };
        for zygote in [true, false] {
            // Capabilities are a thread's: a fresh one for each kind of shim.
            std::thread::scope(|s| {
                s.spawn(|| {
                    let bounding = zygote.then(|| super::super::creds::shrink_bounding_set(0));
                    let dir = tempfile::tempdir().unwrap();
                    for (way, cg) in &cgroups.0 {
                        let mut spec = worker_spec(cg, &["/bin/true"], Path::new("/"), None);
                        let mut times = [vec![], vec![]];
                        for i in 0..440 {
                            let with = i % 2;
                            spec.creds = (with == 1).then(nobody);
                            let t = Instant::now();
                            let started = start_worker(dir.path(), &spec, bounding).unwrap();
                            let took = t.elapsed();
                            let mut status = 0;
                            // SAFETY: the pid is our child; status is a valid out-pointer.
                            unsafe { libc::waitpid(started.pid, &mut status, 0) };
                            if i >= 40 {
                                times[with].push(took.as_secs_f64() * 1e6);
                            }
                        }
                        let (without, with) = (median(&mut times[0]), median(&mut times[1]));
                        eprintln!(
                            "{}, {way}: {without:.1} µs without creds, {with:.1} µs with: \
                             +{:.1} µs",
                            if zygote {
                                "zygote's shim"
                            } else {
                                "exec'd shim"
                            },
                            with - without
                        );
                    }
                });
            });
        }
        drop(shim);
    }

    #[test]
    fn wait_status_decoding() {
        assert_eq!(decode_status(7 << 8), (Some(7), None));
        assert_eq!(decode_status(9), (None, Some(9)));
        assert_eq!(decode_status(0), (Some(0), None));
    }
}
