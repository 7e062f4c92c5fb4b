//! Pooled interpreters: the Python that a pooled worker runs before its claim, how it is given
//! its worker, and the credentials it waits with.
//!
//! A pooled worker is an ordinary shim (see `super::shim`) whose program is the kernel's
//! interpreter running [`BOOTSTRAP`]. Its process starts as uid 0 with every capability gone
//! but CAP_SETUID and CAP_SETGID ([`pool_creds`]): dropped from the bounding set, from the
//! permitted and effective sets, kept out of the inheritable and ambient sets, and with
//! `no_new_privs` set, all before the exec, so every thread the interpreter or a preloaded
//! library starts (OpenBLAS starts its workers at import) inherits exactly that. The bootstrap
//! imports the preload list with its output on /dev/null, then blocks opening the FIFO
//! [`CLAIM_FIFO`] of its worker directory for reading. The daemon's open of the write end
//! returns at that moment: the worker is ready. At the claim the daemon writes a [`PoolClaim`]
//! and closes; the bootstrap switches groups, gid and uid with `os.setgroups`/`os.setresgid`/
//! `os.setresuid` (the kernel clears the permitted and effective capabilities as the uids leave
//! 0), having emptied its bounding set first (`PR_CAPBSET_DROP` of the three, the last needing
//! CAP_SETPCAP), then takes the request's umask, environment, working directory, `sys.argv` and
//! a fresh `__main__`, gets its stdout and stderr back and runs the code.
//!
//! # Every thread
//!
//! Bounding sets and capabilities are per thread, so the claim must find the interpreter with
//! one thread: the preload runs with `OPENBLAS_NUM_THREADS`, `OMP_NUM_THREADS`, `MKL_NUM_THREADS`
//! and their kin at 1 where the pool's environment does not set them (BLAS libraries read them
//! once, when they load), and they are unset again after it; an interpreter that has more than
//! one thread after its preload ends itself (exit 4) and the pool is not made: launches start
//! cold, and the daemon logs why. After the switch, a loaded OpenBLAS (found before the claim) is
//! given back the thread count a cold start would have
//! (`openblas_set_num_threads(openblas_get_num_procs())`); its threads start then, from the one
//! thread, with the user's credentials. (glibc's `setxid` broadcast would carry the uid and gid
//! switch to other threads, but not the bounding set.)
//!
//! # What the claim costs
//!
//! Whatever can be done before the claim is: the OpenBLAS lookup (a read of `/proc/self/maps`,
//! 0.3 ms), one `compile()` (CPython's first call of it costs 0.6 ms, every later one µs), and
//! a first `json.loads` and ctypes call of `prctl` (`PR_CAPBSET_READ`, which changes nothing),
//! whose first calls cost 40 and 50 µs more than later ones, so that a claim runs about 0.5 ms
//! of Python before the user's code (1.5 ms before).

use std::ffi::CString;
use std::io::{self, Write};
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use serde::Serialize;

use super::creds::{Rlimit, WorkerCreds};

/// The FIFO in a pooled worker's directory on which it waits for its claim.
pub const CLAIM_FIFO: &str = "claim";

/// Present in the directory of a pooled worker that no launch has taken yet: a daemon that
/// starts finds by it what a predecessor's pool left (and removes it).
pub const POOL_MARKER: &str = "pool";

/// The nice value a pooled interpreter starts and imports its preload list at: a refill runs
/// beside launches, and on a small host its interpreter's start (10 ms of CPU for a bare
/// Python, 100 ms with numpy) would otherwise take the CPU from the worker just claimed. At its
/// claim the daemon gives it the nice value a cold worker has ([`restore_priority`]).
pub const POOL_NICE: libc::c_int = 19;

/// Gives the (single-threaded: it was checked at its preload) pooled interpreter `pid` the nice
/// value of every worker, [`super::creds::WORKER_NICE`]. Needs CAP_SYS_NICE (the daemon's).
pub fn restore_priority(pid: u32) -> io::Result<()> {
    // SAFETY: setpriority takes plain integers.
    if unsafe {
        libc::setpriority(
            libc::PRIO_PROCESS,
            pid as libc::id_t,
            super::creds::WORKER_NICE,
        )
    } != 0
    {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// CAP_SETGID, CAP_SETUID and CAP_SETPCAP: what a pooled interpreter keeps until its claim, to
/// switch to its user and to empty its bounding set then.
pub const POOL_CAPS: [u8; 3] = [6, 7, 8];

/// The Python a pooled interpreter runs: `python3 [args] -c BOOTSTRAP FIFO PRELOAD GIVEN`, where
/// PRELOAD is a comma-separated module list and GIVEN the comma-separated names of the
/// variables the daemon started it with (what else its `os.environ` holds, the interpreter
/// added itself: PEP 538's `LC_CTYPE`, which a cold start adds too).
pub const BOOTSTRAP: &str = r#"
def _berth_pool():
    import os, sys
    fifo, preload, given = sys.argv[1], sys.argv[2], set(sys.argv[3].split(','))
    added = {k: v for k, v in os.environ.items() if k not in given}
    out, err = os.dup(1), os.dup(2)
    null = os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 1)
    os.dup2(null, 2)
    os.close(null)
    sys.dont_write_bytecode = True
    threads = ('OPENBLAS_NUM_THREADS', 'GOTO_NUM_THREADS', 'OMP_NUM_THREADS', 'MKL_NUM_THREADS',
               'BLIS_NUM_THREADS', 'NUMEXPR_NUM_THREADS', 'VECLIB_MAXIMUM_THREADS')
    capped = [k for k in threads if k not in os.environ]
    for k in capped:
        os.environ[k] = '1'
    import importlib
    for m in filter(None, preload.split(',')):
        try:
            importlib.import_module(m)
        except BaseException as e:
            os.write(err, ('berth pool: preload %s: %r\n' % (m, e)).encode())
            os._exit(3)
    for k in capped:
        del os.environ[k]
    if len(os.listdir('/proc/self/task')) != 1:
        os.write(err, b'berth pool: the preload started threads; it cannot be pooled\n')
        os._exit(4)
    import json, ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    blas = []
    if 'OPENBLAS_NUM_THREADS' in capped and 'OMP_NUM_THREADS' in capped:
        for lib in sorted(set(l.split()[-1] for l in open('/proc/self/maps') if 'openblas' in l)):
            try:
                b = ctypes.CDLL(lib)
                blas.append((b.openblas_set_num_threads, b.openblas_get_num_procs))
            except (OSError, AttributeError):
                pass
    compile('pass', '<string>', 'exec', dont_inherit=True)
    json.loads('{"a": [["b", "c"]], "d": 1, "e": null}')
    prctl = libc.prctl
    prctl(23, 6, 0, 0, 0)
    fd = os.open(fifo, os.O_RDONLY)
    data = b''
    while True:
        b = os.read(fd, 1 << 16)
        if not b:
            break
        data += b
    os.close(fd)
    if not data:
        os._exit(0)
    c = json.loads(data)
    del data
    sys.dont_write_bytecode = bool(sys.flags.dont_write_bytecode)
    def fail(what, e):
        os.write(err, ('berth: %s: %s\n' % (what, e)).encode())
        os._exit(127)
    for cap in (6, 7, 8):
        if prctl(24, cap, 0, 0, 0) != 0:
            fail('drop capability %d from the bounding set' % cap, os.strerror(ctypes.get_errno()))
    try:
        os.setgroups(c['groups'])
        os.setresgid(c['gid'], c['gid'], c['gid'])
        os.setresuid(c['uid'], c['uid'], c['uid'])
    except OSError as e:
        fail('switch to uid %d gid %d groups %r' % (c['uid'], c['gid'], c['groups']), e)
    os.umask(c['umask'])
    for set_threads, procs in blas:
        set_threads(procs())
    os.environ.clear()
    for k, v in c['env']:
        os.environ[k] = v
    for k, v in added.items():
        os.environ.setdefault(k, v)
    try:
        os.chdir(c['cwd'])
    except OSError as e:
        fail('enter workdir %s' % c['cwd'], e)
    import site
    site.USER_BASE = site.USER_SITE = None
    if site.ENABLE_USER_SITE:
        user_site = site.getusersitepackages()
        if os.path.isdir(user_site) and user_site not in sys.path:
            at = next((i for i, p in enumerate(sys.path) if p.endswith(('-packages',))), len(sys.path))
            before = list(sys.path)
            site.addsitedir(user_site)
            new = [p for p in sys.path if p not in before]
            sys.path[:] = before[:at] + new + before[at:]
    script = c.get('script')
    sys.argv[:] = c['argv']
    sys.orig_argv[:] = c['orig_argv']
    if script is not None:
        sys.path[0] = os.path.dirname(os.path.realpath(script))
    import types
    main = types.ModuleType('__main__')
    old = sys.modules['__main__'].__dict__
    for k in ('__builtins__', '__loader__', '__annotations__'):
        if k in old:
            main.__dict__[k] = old[k]
    main.__dict__['__spec__'] = None
    main.__dict__['__package__'] = None
    sys.modules['__main__'] = main
    os.dup2(out, 1)
    os.dup2(err, 2)
    os.close(out)
    os.close(err)
    if script is not None:
        main.__file__ = script
        main.__cached__ = None
        with open(script, 'rb') as f:
            src = f.read()
        name = script
    else:
        src = c['code']
        name = '<string>'
    del c, old
    try:
        code = compile(src, name, 'exec', dont_inherit=True)
        del src
        exec(code, main.__dict__)
    except SystemExit:
        raise
    except BaseException as e:
        tb = e.__traceback__.tb_next if e.__traceback__ is not None else None
        sys.excepthook(type(e), e, tb)
        sys.exit(1)
_berth_pool()
"#;

/// What a pooled worker is given at its claim.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PoolClaim {
    pub uid: u32,
    pub gid: u32,
    pub groups: Vec<u32>,
    pub umask: u32,
    /// The whole environment, in order, as a cold worker's exec would get it.
    pub env: Vec<(String, String)>,
    pub cwd: String,
    /// `sys.argv` as a cold start sets it: `["-c"]` for code, `[script]` for a script.
    pub argv: Vec<String>,
    /// The whole command line of a cold start (`sys.orig_argv`).
    pub orig_argv: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub code: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub script: Option<String>,
}

/// The credentials a pooled interpreter waits with: uid 0, [`POOL_CAPS`] alone in
/// its bounding, permitted and effective sets (none inheritable), `no_new_privs`, and the
/// workers' resource limits and umask.
pub fn pool_creds(rlimits: Vec<Rlimit>) -> WorkerCreds {
    WorkerCreds {
        uid: 0,
        gid: 0,
        groups: Vec::new(),
        keep_caps: POOL_CAPS.to_vec(),
        rlimits,
        umask: 0o022,
        oom_score_adj: 0,
        pooled: true,
    }
}

fn cpath(path: &Path) -> io::Result<CString> {
    CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL byte in path"))
}

/// Makes the claim FIFO (root's alone) and the pool marker in the worker directory `dir`.
pub fn prepare_dir(dir: &Path) -> io::Result<()> {
    std::fs::create_dir_all(dir)?;
    std::fs::write(dir.join(POOL_MARKER), b"")?;
    let fifo = dir.join(CLAIM_FIFO);
    let _ = std::fs::remove_file(&fifo);
    let c = cpath(&fifo)?;
    // SAFETY: c is a valid NUL-terminated path.
    if unsafe { libc::mkfifo(c.as_ptr(), 0o600) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Opens the write end of `dir`'s claim FIFO: blocks until the pooled interpreter has imported
/// its preload list and opened the read end (or [`release_opener`] did).
pub fn await_ready(dir: &Path) -> io::Result<OwnedFd> {
    let c = cpath(&dir.join(CLAIM_FIFO))?;
    // SAFETY: c is a valid NUL-terminated path; the fd is ours.
    let fd = unsafe { libc::open(c.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: open succeeded; nobody else owns the fd.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Lets an [`await_ready`] that waits on `dir` return (its interpreter died before it was
/// ready): opens the read end for a moment.
pub fn release_opener(dir: &Path) {
    if let Ok(c) = cpath(&dir.join(CLAIM_FIFO)) {
        // SAFETY: c is a valid NUL-terminated path; a non-blocking read open of a FIFO returns
        // at once, and the fd is closed right away.
        unsafe {
            let fd = libc::open(
                c.as_ptr(),
                libc::O_RDONLY | libc::O_NONBLOCK | libc::O_CLOEXEC,
            );
            if fd >= 0 {
                std::thread::sleep(std::time::Duration::from_millis(20));
                libc::close(fd);
            }
        }
    }
}

/// Gives the pooled interpreter waiting on `fifo` (the fd [`await_ready`] returned) its claim.
pub fn send_claim(fifo: OwnedFd, claim: &PoolClaim) -> io::Result<()> {
    let json = serde_json::to_vec(claim).map_err(io::Error::other)?;
    let mut f = std::fs::File::from(fifo);
    f.write_all(&json)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_claim_as_the_bootstrap_reads_it() {
        let c = PoolClaim {
            uid: 1000,
            gid: 1000,
            groups: vec![1000, 27],
            umask: 0o022,
            env: vec![("PATH".into(), "/usr/bin".into())],
            cwd: "/tmp".into(),
            argv: vec!["-c".into()],
            orig_argv: vec![
                "/usr/bin/python3".into(),
                "-u".into(),
                "-c".into(),
                "print(1)".into(),
            ],
            code: Some("print(1)".into()),
            script: None,
        };
        let v: serde_json::Value = serde_json::to_value(&c).unwrap();
        assert_eq!(v["env"][0][0], "PATH");
        assert_eq!(v["groups"][1], 27);
        assert!(v.get("script").is_none());
        let p = pool_creds(vec![]);
        assert_eq!(
            (p.uid, p.keep_caps.as_slice(), p.pooled),
            (0, &[6u8, 7, 8][..], true)
        );
        p.validate().unwrap();
    }

    #[test]
    fn a_fifo_hands_the_claim_over() {
        let dir = tempfile::tempdir().unwrap();
        prepare_dir(dir.path()).unwrap();
        assert!(dir.path().join(POOL_MARKER).exists());
        let fifo = dir.path().join(CLAIM_FIFO);
        let reader = std::thread::spawn(move || std::fs::read(fifo).unwrap());
        let w = await_ready(dir.path()).unwrap();
        let c = PoolClaim {
            uid: 1,
            gid: 1,
            groups: vec![],
            umask: 0,
            env: vec![],
            cwd: "/".into(),
            argv: vec![],
            orig_argv: vec![],
            code: None,
            script: None,
        };
        send_claim(w, &c).unwrap();
        let got = reader.join().unwrap();
        assert_eq!(got, serde_json::to_vec(&c).unwrap());
    }
}
