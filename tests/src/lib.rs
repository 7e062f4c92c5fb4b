//! Test harness: starts real `berthd` daemons on Unix sockets in temporary state directories,
//! connects real gRPC clients, and cleans up every worker, cgroup and file afterwards.
//!
//! Binaries: the harness runs `cargo build --bins` once per test process (a no-op when they are
//! fresh), so `cargo test` never runs stale daemons; `BERTH_BIN_DIR` points at prebuilt ones
//! instead (the cgroup-v2 guest does that).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
pub use berth_client::{pb, Client};

pub mod cluster;
pub mod users;

/// Whether the tests run as root (needed for cgroups and namespaces).
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Factor applied to the harness's timeouts, from `BERTH_TEST_TIMEOUT_SCALE` (default 1). The
/// cgroup-v2 tier (tests/vm) raises it: there the tests run under emulation, several times slower.
pub fn timeout_scale() -> f64 {
    static SCALE: OnceLock<f64> = OnceLock::new();
    *SCALE.get_or_init(|| {
        std::env::var("BERTH_TEST_TIMEOUT_SCALE")
            .ok()
            .and_then(|s| s.trim().parse::<f64>().ok())
            .filter(|s| s.is_finite() && *s >= 1.0)
            .unwrap_or(1.0)
    })
}

/// `d` multiplied by [`timeout_scale`].
pub fn scaled(d: Duration) -> Duration {
    d.mul_f64(timeout_scale())
}

/// Returns early from a test that needs root, with a clear line.
#[macro_export]
macro_rules! require_root {
    () => {
        if !$crate::is_root() {
            eprintln!("skipped: needs root (cgroups, namespaces); run the tests as root");
            return;
        }
    };
}

/// A test that finds something it needs missing (a tool, a kernel feature): it is skipped with
/// `reason`, except under CI as root (`CI=true`), where the machine is meant to have it and a
/// skip would pass a test that never ran.
pub fn cannot_run(reason: &str) {
    let ci = std::env::var("CI").is_ok_and(|v| v == "true" || v == "1");
    assert!(
        !(ci && is_root()),
        "CI (root, CI=true) cannot run this test: {reason}"
    );
    eprintln!("skipped: {reason}");
}

/// Whether `program` is on `PATH`; if not, [`cannot_run`] says so.
pub fn have(program: &str) -> bool {
    let found = std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|d| d.join(program).is_file()));
    if !found {
        cannot_run(&format!("{program} is not installed"));
    }
    found
}

/// Directory holding `berthd`, `berth-shim` and `berth`, built if needed.
pub fn bin_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        if let Some(d) = std::env::var_os("BERTH_BIN_DIR") {
            return PathBuf::from(d);
        }
        // target/<profile>/deps/<test binary> → target/<profile>
        let exe = std::env::current_exe().expect("current_exe");
        let dir = exe
            .parent()
            .and_then(|d| {
                if d.ends_with("deps") {
                    d.parent()
                } else {
                    Some(d)
                }
            })
            .expect("test binary directory")
            .to_path_buf();
        let release = dir.file_name().is_some_and(|n| n == "release");
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut cmd = Command::new(cargo);
        cmd.args([
            "build",
            "--quiet",
            "--bins",
            "-p",
            "berth-host",
            "-p",
            "berth-scheduler",
            "-p",
            "berth-client",
        ]);
        if release {
            cmd.arg("--release");
        }
        let ws = Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .expect("workspace root");
        let st = cmd.current_dir(ws).status().expect("run cargo build");
        assert!(st.success(), "cargo build --bins failed");
        dir
    })
}

/// Path of a berth binary.
pub fn bin(name: &str) -> PathBuf {
    bin_dir().join(name)
}

/// Whether `nobody` can enter the workspace: clients send their current directory as the
/// workers' workdir, and the tests run in the workspace.
fn workspace_reachable_by_nobody() -> bool {
    static REACHABLE: OnceLock<bool> = OnceLock::new();
    *REACHABLE.get_or_init(|| {
        let ws = Path::new(env!("CARGO_MANIFEST_DIR"));
        let Ok(Some(nobody)) = berth_sys::users::by_name("nobody") else {
            return true;
        };
        berth_sys::users::as_user(&nobody, || {
            berth_sys::users::eaccess(ws, libc::X_OK)
                && berth_sys::users::eaccess(&ws.join("../client"), libc::X_OK)
        })
        .unwrap_or(true)
    })
}

/// `worker_user = "root"` where root's workers could not enter the workspace as `nobody` (a
/// checkout under a private directory): they still run without capabilities and with
/// no_new_privs. Tests that configure `worker_user` themselves (the security tests) keep theirs.
fn root_worker_user_if_needed(config: &str) -> &'static str {
    if config.contains("worker_user") || workspace_reachable_by_nobody() {
        return "";
    }
    static SAID: std::sync::Once = std::sync::Once::new();
    SAID.call_once(|| {
        eprintln!(
            "note: `nobody` cannot enter this checkout; test daemons run root's workers as root \
             (without capabilities) instead of as worker_user"
        )
    });
    "worker_user = \"root\"\n"
}

/// The hard `RLIMIT_NOFILE` a worker gets by default: systemd's 524288, or less where this
/// process's own hard limit is lower (the daemon cannot raise it then either).
pub fn worker_nofile_hard() -> u64 {
    const CAP_SYS_RESOURCE: u32 = 24;
    let can_raise = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("CapEff:"))
                .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        })
        .is_some_and(|caps| caps & (1 << CAP_SYS_RESOURCE) != 0);
    if can_raise {
        return 524_288;
    }
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct it is given.
    unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) };
    lim.rlim_max.min(524_288)
}

/// What systemd gives berthd (`OOMScoreAdjust=-900`, `LimitNOFILE=1048576`), given to a daemon
/// the tests start, so that a worker that inherited the daemon's values instead of getting its
/// own would be seen.
pub fn as_systemd_runs_it(cmd: &mut Command) {
    use std::os::unix::process::CommandExt;
    // SAFETY: the hook runs in the forked child before exec and makes only async-signal-safe
    // syscalls (open, write, close, setpriority, setrlimit) on a static path and stack values;
    // it allocates nothing. Failures are ignored: a non-root test run cannot lower its
    // oom_score_adj or its nice value.
    unsafe {
        cmd.pre_exec(|| {
            let fd = libc::open(
                c"/proc/self/oom_score_adj".as_ptr(),
                libc::O_WRONLY | libc::O_CLOEXEC,
            );
            if fd >= 0 {
                libc::write(fd, b"-900".as_ptr().cast(), 4);
                libc::close(fd);
            }
            // The unit's Nice=-5.
            libc::setpriority(libc::PRIO_PROCESS, 0, -5);
            // 2^20 files where the hard limit allows (root without CAP_SYS_RESOURCE, as in some
            // containers, cannot raise it): far from a worker's 1024 either way.
            let mut lim = libc::rlimit {
                rlim_cur: 0,
                rlim_max: 0,
            };
            libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
            let want = libc::rlimit {
                rlim_cur: 1 << 20,
                rlim_max: 1 << 20,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &want) != 0 {
                lim.rlim_cur = lim.rlim_max;
                libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
            }
            Ok(())
        });
    }
}

/// Options of a test daemon.
#[derive(Debug, Clone, Default)]
pub struct DaemonOptions {
    /// Extra TOML appended to the generated config.
    pub config: String,
    /// Also listen on TCP (a free loopback port).
    pub tcp: bool,
    /// Further listen addresses (as `listen` in the config takes them).
    pub listen: Vec<String>,
    /// Extra command-line flags.
    pub args: Vec<String>,
    /// Network namespaces the daemon keeps ready (`netns_pool`); default 4.
    pub netns_pool: Option<usize>,
    /// Put the daemon's state dir on a tmpfs of this many bytes of its own (root only), to
    /// see what the daemon does when its filesystem is full. Unmounted when the daemon drops.
    pub state_tmpfs: Option<u64>,
    /// Extra environment of the daemon process.
    pub env: Vec<(String, String)>,
    /// Run the daemon in this network namespace (a `/run/netns/NAME` file), entered with
    /// setns before exec as `nsenter --net=` does (`ip netns exec` would also remount /sys and
    /// hide the cgroup mounts).
    pub netns: Option<PathBuf>,
    /// The worker subnet instead of the claimed slot's.
    pub subnet: Option<String>,
}

/// The worker network of one test daemon: a bridge name and a /19 of 10.224.0.0/11 of its own,
/// claimed through a lock file so that daemons of concurrent test processes never share one.
#[derive(Debug)]
pub struct TestNet {
    pub slot: u32,
    pub bridge: String,
    pub subnet: String,
    lock: PathBuf,
}

/// Directory of the network slot lock files.
const NET_SLOTS_DIR: &str = "/tmp/berth-netslots";
const NET_SLOTS: u32 = 256;

impl TestNet {
    /// Claims a free slot: `/tmp/berth-netslots/<slot>` holds the claiming process's pid; the
    /// slot of a process that is gone is taken over.
    pub fn claim() -> Result<Self> {
        use std::io::Write as _;
        use std::sync::atomic::{AtomicU32, Ordering};
        static NEXT: AtomicU32 = AtomicU32::new(0);
        std::fs::create_dir_all(NET_SLOTS_DIR)?;
        let start = (std::process::id() * 7 + NEXT.fetch_add(1, Ordering::Relaxed)) % NET_SLOTS;
        for k in 0..NET_SLOTS * 2 {
            let slot = (start + k) % NET_SLOTS;
            let lock = Path::new(NET_SLOTS_DIR).join(slot.to_string());
            match std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&lock)
            {
                Ok(mut f) => {
                    write!(f, "{}", std::process::id())?;
                    let net = Self {
                        slot,
                        bridge: format!("bt{slot}"),
                        subnet: format!("10.{}.{}.0/19", 224 + slot / 8, (slot % 8) * 32),
                        lock,
                    };
                    // What a killed test run may have left on this slot.
                    net.remove_host_side();
                    return Ok(net);
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    let owner = std::fs::read_to_string(&lock)
                        .ok()
                        .and_then(|t| t.trim().parse::<i32>().ok());
                    // SAFETY: kill(2) with signal 0 only checks that the process exists.
                    let alive = owner.is_some_and(|p| unsafe { libc::kill(p, 0) } == 0);
                    if owner.is_some() && !alive {
                        let _ = std::fs::remove_file(&lock);
                    }
                }
                Err(e) => return Err(e.into()),
            }
        }
        bail!("no free test network slot in {NET_SLOTS_DIR}")
    }

    /// The gateway address (the host's address on the subnet).
    pub fn gateway(&self) -> String {
        let base = self.subnet.trim_end_matches(".0/19");
        format!("{base}.1")
    }

    /// Removes the bridge and the subnet's policy rules (what the daemon leaves by design).
    pub fn remove_host_side(&self) {
        let quiet = |args: &[&str]| {
            Command::new("ip")
                .args(args)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        };
        if is_root() {
            quiet(&["link", "del", &self.bridge]);
            for _ in 0..8 {
                if !quiet(&["rule", "del", "from", &self.subnet]) {
                    break;
                }
            }
        }
    }
}

impl Drop for TestNet {
    fn drop(&mut self) {
        self.remove_host_side();
        let _ = std::fs::remove_file(&self.lock);
    }
}

/// A running test daemon. Dropping it stops the daemon and kills and removes every worker it
/// left, so a failing test leaks nothing.
#[derive(Debug)]
pub struct Daemon {
    child: Option<Child>,
    pub name: String,
    pub dir: PathBuf,
    _tmp: Option<tempfile::TempDir>,
    pub socket: PathBuf,
    pub tcp: Option<String>,
    pub config_path: PathBuf,
    pub log_path: PathBuf,
    /// The daemon's own bridge and subnet.
    pub net: TestNet,
    /// The state dir is a tmpfs this harness mounted.
    state_mounted: bool,
    /// Extra environment of the daemon process (kept for restarts).
    env: Vec<(String, String)>,
    /// The network namespace it runs in (kept for restarts).
    pub netns: Option<PathBuf>,
}

/// A free TCP port on loopback (bound then released), below the kernel's ephemeral range: a
/// port that `bind(0)` hands out is also one that any outgoing connection may take as its local
/// port between its release here and the daemon's bind (a CI run lost a host daemon's start to
/// "Address already in use" that way, with the scheduler's connections in flight). Below the
/// range, only an explicit bind can take it: another test's pick of the same port in that
/// instant.
pub fn free_port() -> u16 {
    use std::hash::{BuildHasher, Hasher};
    const LOW: u16 = 10_000;
    let below = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|t| t.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32_768);
    if below > LOW + 1_000 {
        let seed = std::collections::hash_map::RandomState::new();
        for i in 0..200u32 {
            let mut h = seed.build_hasher();
            h.write_u32(i);
            let port = LOW + (h.finish() % u64::from(below - LOW)) as u16;
            if let Ok(l) = std::net::TcpListener::bind(("127.0.0.1", port)) {
                return l.local_addr().expect("local addr").port();
            }
        }
    }
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind port 0");
    l.local_addr().expect("local addr").port()
}

fn unique_name() -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    format!(
        "t{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

impl Daemon {
    pub async fn start() -> Result<Self> {
        Self::start_with(DaemonOptions::default()).await
    }

    pub async fn start_with(opts: DaemonOptions) -> Result<Self> {
        let tmp = tempfile::Builder::new().prefix("berth-test-").tempdir()?;
        let dir = tmp.path().to_path_buf();
        // Other users reach the socket in here (the socket's own mode decides who may connect);
        // the daemon keeps its state dir inside private.
        std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
        let name = unique_name();
        let socket = dir.join("berthd.sock");
        let tcp = opts.tcp.then(|| format!("127.0.0.1:{}", free_port()));
        let mut listen = vec![format!("\"unix:{}\"", socket.display())];
        if let Some(t) = &tcp {
            listen.push(format!("\"{t}\""));
        }
        listen.extend(opts.listen.iter().map(|l| format!("\"{l}\"")));
        let net = TestNet::claim()?;
        let config = format!(
            "name = \"{name}\"\nstate_dir = \"{}\"\nlisten = [{}]\nmetrics_listen = \"\"\n\
             bridge = \"{}\"\nsubnet = \"{}\"\nnetns_pool = {}\n{}{}\n",
            dir.join("state").display(),
            listen.join(", "),
            net.bridge,
            opts.subnet.as_deref().unwrap_or(&net.subnet),
            opts.netns_pool.unwrap_or(4),
            root_worker_user_if_needed(&opts.config),
            opts.config
        );
        let config_path = dir.join("berthd.toml");
        std::fs::write(&config_path, config)?;
        if let Some(bytes) = opts.state_tmpfs {
            mount_tmpfs(&dir.join("state"), bytes)?;
        }
        let mut d = Self {
            child: None,
            name,
            dir: dir.clone(),
            _tmp: Some(tmp),
            socket,
            tcp,
            config_path,
            log_path: dir.join("berthd.log"),
            net,
            state_mounted: opts.state_tmpfs.is_some(),
            env: opts.env.clone(),
            netns: opts.netns.clone(),
        };
        d.spawn(&opts.args).await?;
        Ok(d)
    }

    async fn spawn(&mut self, args: &[String]) -> Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)?;
        let mut cmd = Command::new(bin("berthd"));
        as_systemd_runs_it(&mut cmd);
        // Open until the spawn is done: the child enters it between fork and exec.
        let _ns = match &self.netns {
            Some(path) => {
                let f = std::fs::File::open(path)
                    .with_context(|| format!("open network namespace {}", path.display()))?;
                let fd = std::os::fd::AsRawFd::as_raw_fd(&f);
                // SAFETY: setns is async-signal-safe; fd stays open until after the spawn.
                unsafe {
                    std::os::unix::process::CommandExt::pre_exec(&mut cmd, move || {
                        if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                            return Err(std::io::Error::last_os_error());
                        }
                        Ok(())
                    });
                }
                Some(f)
            }
            None => None,
        };
        let child = cmd
            .arg("--config")
            .arg(&self.config_path)
            .args(args)
            .env(
                "BERTH_LOG",
                "info,berth_host=debug,berth_server=debug,berth_scheduler=debug,berth_sys=debug",
            )
            // After the default: a daemon's own BERTH_LOG (a benchmark's) wins.
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("start berthd")?;
        self.child = Some(child);
        self.wait_ready().await
    }

    async fn wait_ready(&mut self) -> Result<()> {
        let deadline = Instant::now() + scaled(Duration::from_secs(20));
        loop {
            if let Some(c) = self.child.as_mut() {
                if let Some(st) = c.try_wait()? {
                    bail!("berthd exited with {st} during start:\n{}", self.log());
                }
            }
            if let Ok(c) = Client::connect(&self.addr()).await {
                let mut h = c.host();
                if h.get_host_info(pb::GetHostInfoRequest {}).await.is_ok() {
                    return Ok(());
                }
            }
            if Instant::now() > deadline {
                bail!(
                    "berthd did not answer within {:?}:\n{}",
                    scaled(Duration::from_secs(20)),
                    self.log()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The daemon's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// `unix:PATH` of the daemon's socket.
    pub fn addr(&self) -> String {
        format!("unix:{}", self.socket.display())
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    pub async fn client(&self) -> Result<Client> {
        Ok(Client::connect(&self.addr()).await?)
    }

    /// Directory of the daemon's state (worker specs and output).
    pub fn state_dir(&self) -> PathBuf {
        self.dir.join("state")
    }

    /// Sends `signal` to the daemon and waits for it to exit.
    pub fn stop_daemon(&mut self, signal: i32) -> Option<std::process::ExitStatus> {
        let mut c = self.child.take()?;
        // SAFETY: kill(2) with a pid we spawned and a signal number.
        unsafe { libc::kill(c.id() as i32, signal) };
        let deadline = Instant::now() + scaled(Duration::from_secs(20));
        loop {
            if let Ok(Some(st)) = c.try_wait() {
                return Some(st);
            }
            if Instant::now() > deadline {
                let _ = c.kill();
                return c.wait().ok();
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Starts the daemon again on the same config and state.
    pub async fn restart(&mut self, args: &[String]) -> Result<()> {
        self.spawn(args).await
    }

    /// Runs another `berthd` on this daemon's config (and so its state dir and sockets) with
    /// `args`, for at most 20 s (scaled); returns its exit code (`None`: it was still running
    /// and was killed) and everything it wrote.
    pub async fn run_another(&self, args: &[&str]) -> Result<(Option<i32>, String)> {
        let out_path = self.dir.join(format!("another-{}.log", unique_name()));
        let out = std::fs::File::create(&out_path)?;
        let mut child = Command::new(bin("berthd"))
            .arg("--config")
            .arg(&self.config_path)
            .args(args)
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .context("start another berthd")?;
        let deadline = Instant::now() + scaled(Duration::from_secs(20));
        let code = loop {
            if let Some(st) = child.try_wait()? {
                break st.code();
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        Ok((code, std::fs::read_to_string(&out_path).unwrap_or_default()))
    }

    /// Cgroup directories of this daemon's subtree (one per hierarchy).
    pub fn cgroup_subtrees(&self) -> Vec<PathBuf> {
        find_dirs(
            Path::new("/sys/fs/cgroup"),
            &format!("berth-{}", self.name),
            6,
        )
    }

    /// Worker cgroups that exist now, across hierarchies (deduplicated by worker id). The
    /// cgroups a v1 daemon keeps ready (`_ready_<random>`) are no worker's.
    pub fn worker_cgroups(&self) -> Vec<String> {
        let mut ids: Vec<String> = Vec::new();
        for sub in self.cgroup_subtrees() {
            if let Ok(rd) = std::fs::read_dir(&sub) {
                for e in rd.flatten() {
                    if e.file_type().is_ok_and(|t| t.is_dir()) {
                        let n = e.file_name().to_string_lossy().into_owned();
                        if !n.starts_with("_ready_") && !ids.contains(&n) {
                            ids.push(n);
                        }
                    }
                }
            }
        }
        ids
    }

    /// The directories of worker `id`'s cgroup that exist now (one per v1 hierarchy, one on v2).
    pub fn worker_cgroup_dirs(&self, id: &str) -> Vec<PathBuf> {
        self.cgroup_subtrees()
            .into_iter()
            .map(|s| s.join(id))
            .filter(|p| p.is_dir())
            .collect()
    }

    /// The first of worker `id`'s cgroup directories that has `file` (v1 and v2 alike).
    pub fn worker_cgroup_file(&self, id: &str, file: &str) -> Option<PathBuf> {
        self.worker_cgroup_dirs(id)
            .into_iter()
            .map(|p| p.join(file))
            .find(|p| p.exists())
    }

    /// Processes in worker `id`'s cgroup now, across hierarchies.
    pub fn worker_cgroup_procs(&self, id: &str) -> Vec<u32> {
        let mut all: Vec<u32> = self
            .worker_cgroup_dirs(id)
            .iter()
            .filter_map(|d| std::fs::read_to_string(d.join("cgroup.procs")).ok())
            .flat_map(|t| {
                t.split_whitespace()
                    .filter_map(|p| p.parse().ok())
                    .collect::<Vec<u32>>()
            })
            .collect();
        all.sort_unstable();
        all.dedup();
        all
    }

    /// Kills every process in this daemon's worker cgroups and removes them (test clean-up).
    pub fn kill_all_workers(&self) {
        // A frozen or throttled task does not die of SIGKILL (a test may fail at any point).
        for id in self.worker_cgroups() {
            for (file, value) in [
                ("freezer.state", "THAWED"),
                ("cgroup.freeze", "0"),
                ("cpu.cfs_quota_us", "-1"),
                ("cpu.max", "max"),
            ] {
                if let Some(f) = self.worker_cgroup_file(&id, file) {
                    let _ = std::fs::write(f, value);
                }
            }
        }
        for sub in self.cgroup_subtrees() {
            for _ in 0..100 {
                let procs = procs_under(&sub);
                if procs.is_empty() {
                    break;
                }
                for p in procs {
                    // SAFETY: kill(2) with integers.
                    unsafe { libc::kill(p, libc::SIGKILL) };
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        for sub in self.cgroup_subtrees() {
            if let Ok(rd) = std::fs::read_dir(&sub) {
                for e in rd.flatten() {
                    if e.file_type().is_ok_and(|t| t.is_dir()) {
                        let _ = std::fs::remove_dir(e.path());
                    }
                }
            }
            let _ = std::fs::remove_dir(&sub);
        }
    }
}

impl Daemon {
    /// This daemon's `berth-shim` processes: each works in its worker's directory under the
    /// daemon's state dir (`ls -l /proc/<pid>/cwd` in README).
    pub fn shims(&self) -> Vec<u32> {
        let state = self.state_dir();
        processes_named("berth-shim")
            .into_iter()
            .filter(|p| {
                std::fs::read_link(format!("/proc/{p}/cwd")).is_ok_and(|c| c.starts_with(&state))
            })
            .collect()
    }

    /// Worker network namespace files of this daemon (`<state>/netns/<id>`).
    pub fn netns_files(&self) -> Vec<String> {
        std::fs::read_dir(self.state_dir().join("netns"))
            .map(|rd| {
                rd.flatten()
                    .filter_map(|e| e.file_name().into_string().ok())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Unmounts and removes every worker namespace file left (test clean-up): the namespaces,
    /// their veths and routes go once their processes are gone.
    pub fn remove_worker_networks(&self) {
        let dir = self.state_dir().join("netns");
        for id in self.netns_files() {
            let p = dir.join(&id);
            if let Ok(c) = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()) {
                // SAFETY: c is a valid NUL-terminated path.
                unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
            }
            let _ = std::fs::remove_file(&p);
        }
        // The daemon keeps the files on a tmpfs of its own, which outlives it while worker
        // networks are left (the daemon unmounts it itself otherwise: see `Drop`).
        if self.netns_mounted() {
            unmount(&dir);
        }
    }

    /// Whether `<state>/netns` is a mount point (the daemon's tmpfs for namespace files).
    pub fn netns_mounted(&self) -> bool {
        is_mount_point(&self.state_dir().join("netns"))
    }
}

/// Whether `dir` is a mount point: on another device than its parent.
pub fn is_mount_point(dir: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    let (Ok(d), Some(Ok(p))) = (std::fs::metadata(dir), dir.parent().map(std::fs::metadata)) else {
        return false;
    };
    d.dev() != p.dev()
}

/// Host ends of worker veths that exist now, as (link name, worker id): the daemon labels each
/// with the alias `berth:<worker id>`; one made on demand is also named `bv<worker id>`. Ready
/// namespaces' pairs (`bq…`, no alias yet) are not listed.
pub fn worker_veths() -> Vec<(String, String)> {
    let Ok(rd) = std::fs::read_dir("/sys/class/net") else {
        return vec![];
    };
    rd.flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .filter_map(|n| {
            let alias =
                std::fs::read_to_string(format!("/sys/class/net/{n}/ifalias")).unwrap_or_default();
            let id = alias
                .trim()
                .strip_prefix("berth:")
                .or_else(|| n.strip_prefix("bv"))?
                .to_owned();
            Some((n, id))
        })
        .collect()
}

/// The host end of worker `id`'s veth, if it exists.
pub fn veth_of(id: &str) -> Option<String> {
    worker_veths()
        .into_iter()
        .find(|(_, w)| w == id)
        .map(|(n, _)| n)
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let stopped = self.stop_daemon(libc::SIGTERM);
        // README: the netns tmpfs "is unmounted when the daemon stops with no worker network
        // left". The harness unmounts it only where worker networks are left, so a daemon that
        // forgets fails the test that dropped it.
        let mount_left = stopped.is_some_and(|s| s.success())
            && self.netns_files().is_empty()
            && self.netns_mounted();
        // Shims (which outlive the daemon by design) end once their workers are killed.
        self.kill_all_workers();
        self.remove_worker_networks();
        // Give shims a moment to write their exit records and leave.
        std::thread::sleep(Duration::from_millis(50));
        if self.state_mounted {
            unmount(&self.state_dir());
        }
        if mount_left && !std::thread::panicking() {
            panic!(
                "berthd stopped with no worker network left but left its netns tmpfs mounted on \
                 {}/netns",
                self.state_dir().display()
            );
        }
    }
}

/// Mounts a tmpfs of `bytes` (mode 0700) on `dir`, made if needed.
pub fn mount_tmpfs(dir: &Path, bytes: u64) -> Result<()> {
    std::fs::create_dir_all(dir)?;
    let target = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes())?;
    let data = std::ffi::CString::new(format!("size={bytes},mode=0700"))?;
    // SAFETY: valid NUL-terminated strings that outlive the call.
    let rc = unsafe {
        libc::mount(
            c"tmpfs".as_ptr(),
            target.as_ptr(),
            c"tmpfs".as_ptr(),
            0,
            data.as_ptr().cast(),
        )
    };
    if rc != 0 {
        bail!(
            "mount a tmpfs on {}: {}",
            dir.display(),
            std::io::Error::last_os_error()
        );
    }
    Ok(())
}

/// Detaches whatever is mounted on `dir` (test clean-up).
pub fn unmount(dir: &Path) {
    if let Ok(c) = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes()) {
        // SAFETY: c is a valid NUL-terminated path.
        unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
    }
}

/// Writes `path` until its filesystem has not one byte left for it; returns how many bytes
/// it took.
pub fn fill_filesystem(path: &Path) -> Result<u64> {
    use std::io::Write;
    let mut f = std::fs::File::create(path)?;
    let mut total = 0u64;
    let mut chunk = 64 << 10;
    while chunk > 0 {
        match f.write(&vec![0u8; chunk]) {
            Ok(n) => {
                total += n as u64;
                if n < chunk {
                    chunk /= 2;
                }
            }
            Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => chunk /= 2,
            Err(e) => return Err(e.into()),
        }
    }
    Ok(total)
}

fn procs_under(dir: &Path) -> Vec<i32> {
    let mut out = Vec::new();
    if let Ok(t) = std::fs::read_to_string(dir.join("cgroup.procs")) {
        out.extend(t.split_whitespace().filter_map(|p| p.parse::<i32>().ok()));
    }
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                out.extend(procs_under(&e.path()));
            }
        }
    }
    out
}

/// Directories named `name` under `root`, at most `depth` levels down.
pub fn find_dirs(root: &Path, name: &str, depth: usize) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir(root) else {
        return out;
    };
    for e in rd.flatten() {
        if !e.file_type().is_ok_and(|t| t.is_dir()) {
            continue;
        }
        let p = e.path();
        if e.file_name() == name {
            out.push(p);
        } else if depth > 0 {
            out.extend(find_dirs(&p, name, depth - 1));
        }
    }
    out
}

/// A launch request with small defaults (0.1 CPU, 128 MiB) running `command`.
pub fn command_request(n: u32, command: &[&str]) -> pb::LaunchWorkersRequest {
    pb::LaunchWorkersRequest {
        n,
        cpu: 0.1,
        memory_gb: 0.125,
        command: command.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    }
}

/// A launch request running python `code`.
pub fn python_request(n: u32, code: &str) -> pb::LaunchWorkersRequest {
    pb::LaunchWorkersRequest {
        n,
        cpu: 0.5,
        memory_gb: 0.25,
        code: code.to_owned(),
        ..Default::default()
    }
}

/// Whole output of one worker's stream (waits until it has ended).
pub async fn output_of(client: &Client, id: &str, stream: pb::Stream) -> Result<Vec<u8>> {
    let mut s = client
        .workers()
        .stream_output(pb::StreamOutputRequest {
            ids: vec![id.to_owned()],
            follow: true,
            from_start: true,
            streams: vec![stream as i32],
            ..Default::default()
        })
        .await?
        .into_inner();
    let mut out = Vec::new();
    while let Some(chunk) = s.message().await? {
        anyhow::ensure!(
            chunk.offset == out.len() as u64,
            "offset {} after {} bytes",
            chunk.offset,
            out.len()
        );
        out.extend_from_slice(&chunk.data);
    }
    Ok(out)
}

/// What worker `id` has written to stdout so far (no follow).
pub async fn stdout_now(client: &Client, id: &str) -> Vec<u8> {
    let mut s = client
        .workers()
        .stream_output(pb::StreamOutputRequest {
            ids: vec![id.to_owned()],
            follow: false,
            from_start: true,
            streams: vec![pb::Stream::Stdout as i32],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut out = Vec::new();
    while let Some(chunk) = s.message().await.unwrap() {
        out.extend_from_slice(&chunk.data);
    }
    out
}

/// The CPU worker `id` used in `windows` windows of 1 s, in cores: (floor, ceiling) of each.
/// The daemon reads the counter somewhere between a call's start and its end, so a window lies
/// between the shortest span (end of one call to start of the next) and the longest (start to
/// end). On a busy machine a call can take a large part of a second: check a ceiling on the
/// first list (used over the longest span) and a floor on the second (over the shortest), so
/// the calls' own time never counts for or against the worker. The worker must stay RUNNING.
pub async fn cpu_windows(client: &Client, id: &str, windows: usize) -> (Vec<f64>, Vec<f64>) {
    let sample = || async {
        let t0 = Instant::now();
        let w = worker_now(client, id).await;
        assert_eq!(w.status(), pb::WorkerStatus::Running, "{w:?}");
        (w.cpu_seconds, t0, Instant::now())
    };
    let mut prev = sample().await;
    let (mut low, mut high) = (Vec::new(), Vec::new());
    for _ in 0..windows {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let now = sample().await;
        let used = now.0 - prev.0;
        low.push(used / (now.2 - prev.1).as_secs_f64());
        high.push(used / (now.1 - prev.2).as_secs_f64());
        prev = now;
    }
    (low, high)
}

/// Every worker `client` lists (an empty ListWorkers).
pub async fn list_all(client: &Client) -> Vec<pb::Worker> {
    client
        .workers()
        .list_workers(pb::ListWorkersRequest::default())
        .await
        .unwrap()
        .into_inner()
        .workers
}

/// One worker's record as List shows it now.
pub async fn worker_now(client: &Client, id: &str) -> pb::Worker {
    client
        .workers()
        .list_workers(pb::ListWorkersRequest {
            ids: vec![id.to_owned()],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .workers
        .remove(0)
}

/// Awaits completion of `ids` (60 s, [`scaled`]) and returns every worker, reached or failed, by id order.
pub async fn await_all(client: &Client, ids: &[String]) -> Result<Vec<pb::Worker>> {
    let r = client
        .workers()
        .await_workers(pb::AwaitWorkersRequest {
            ids: ids.to_vec(),
            timeout_seconds: Some(scaled(Duration::from_secs(60)).as_secs() as u32),
            ..Default::default()
        })
        .await?
        .into_inner();
    let mut all: Vec<pb::Worker> = r.workers.into_iter().chain(r.failures).collect();
    all.sort_by_key(|w| ids.iter().position(|i| *i == w.id));
    Ok(all)
}

/// State letter and parent pid of every process, from `/proc/<pid>/stat`.
fn process_table() -> Vec<(u32, char, u32)> {
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return vec![];
    };
    rd.flatten()
        .filter_map(|e| {
            let pid = e.file_name().to_str()?.parse::<u32>().ok()?;
            let stat = std::fs::read_to_string(e.path().join("stat")).ok()?;
            let (_, rest) = stat.rsplit_once(')')?;
            let mut f = rest.split_whitespace();
            let state = f.next()?.chars().next()?;
            Some((pid, state, f.next()?.parse().ok()?))
        })
        .collect()
}

/// CPU time (user and system) process `pid` has used so far, from `/proc/<pid>/stat`.
pub fn cpu_time_of(pid: u32) -> Option<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (_, rest) = stat.rsplit_once(')')?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    // Fields 14 and 15 (utime, stime) in clock ticks; `rest` starts at field 3.
    let ticks: u64 = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    Some(Duration::from_millis(ticks * 1000 / hz))
}

/// Zombie processes whose parent is `ppid`.
pub fn zombies_of(ppid: u32) -> usize {
    process_table()
        .iter()
        .filter(|(_, state, parent)| *state == 'Z' && *parent == ppid)
        .count()
}

/// Zombies among the children of `pid` and of its children: the daemon reaps its zygotes, the
/// zygotes reap the shims they forked.
pub fn zombies_under(pid: u32) -> usize {
    let table = process_table();
    let children: Vec<u32> = table
        .iter()
        .filter(|(_, _, parent)| *parent == pid)
        .map(|(p, _, _)| *p)
        .collect();
    table
        .iter()
        .filter(|(_, state, parent)| *state == 'Z' && (*parent == pid || children.contains(parent)))
        .count()
}

/// Live children of `ppid` whose command name is `comm` (a daemon's `berth-zygote`s).
pub fn children_named(ppid: u32, comm: &str) -> Vec<u32> {
    process_table()
        .into_iter()
        .filter(|(pid, state, parent)| {
            *parent == ppid
                && *state != 'Z'
                && std::fs::read_to_string(format!("/proc/{pid}/comm"))
                    .is_ok_and(|c| c.trim() == comm)
        })
        .map(|(pid, _, _)| pid)
        .collect()
}

/// Whether process `pid` has a handler for `signal` (`SigCgt` of `/proc/<pid>/status`).
pub fn catches_signal(pid: u32, signal: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("SigCgt:"))
                .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        })
        .is_some_and(|mask| mask & (1 << (signal - 1)) != 0)
}

/// The parent of `pid`.
pub fn parent_of(pid: u32) -> Option<u32> {
    process_table()
        .into_iter()
        .find(|(p, _, _)| *p == pid)
        .map(|(_, _, parent)| parent)
}

/// Processes whose command name is `comm`.
pub fn processes_named(comm: &str) -> Vec<u32> {
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return vec![];
    };
    rd.flatten()
        .filter_map(|e| e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()))
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim() == comm)
        })
        .collect()
}

/// Live processes (zombies excluded) whose environment holds `name=value`. Every worker starts
/// with `BERTH_WORKER_ID=<id>`, so this finds what is left of a worker even after its cgroup is
/// gone.
pub fn processes_with_env(name: &str, value: &str) -> Vec<u32> {
    let needle = format!("{name}={value}");
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return vec![];
    };
    rd.flatten()
        .filter_map(|e| e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()))
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/environ"))
                .is_ok_and(|env| env.split(|b| *b == 0).any(|kv| kv == needle.as_bytes()))
        })
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
                s.rsplit_once(')')
                    .is_some_and(|(_, r)| !r.trim_start().starts_with(['Z', 'X']))
            })
        })
        .collect()
}

/// Launches `req`; panics with the status if the server refuses it.
pub async fn launch(c: &Client, req: pb::LaunchWorkersRequest) -> Vec<pb::Worker> {
    c.workers()
        .launch_workers(req)
        .await
        .unwrap_or_else(|s| panic!("launch refused: {s:?}"))
        .into_inner()
        .workers
}

/// The ids of `ws`, in order.
pub fn ids_of(ws: &[pb::Worker]) -> Vec<String> {
    ws.iter().map(|w| w.id.clone()).collect()
}

/// The host's `HostInfo`.
pub async fn host_info(c: &Client) -> pb::HostInfo {
    c.host()
        .get_host_info(pb::GetHostInfoRequest {})
        .await
        .unwrap()
        .into_inner()
}

/// Awaits `ids` until RUNNING (30 s, scaled); panics if any is not.
pub async fn await_running(c: &Client, ids: &[String]) -> Vec<pb::Worker> {
    let r = c
        .workers()
        .await_workers(pb::AwaitWorkersRequest {
            ids: ids.to_vec(),
            wait_for_completion: Some(false),
            timeout_seconds: Some(scaled(Duration::from_secs(30)).as_secs() as u32),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(r.failures.is_empty(), "not running: {:?}", r.failures);
    r.workers
}

/// Closes session `id` (its workers get `grace_seconds` between SIGTERM and SIGKILL); returns
/// the workers it stopped.
pub async fn close_session(c: &Client, id: &str, grace_seconds: u32) -> Vec<pb::Worker> {
    c.workers()
        .close_session(pb::CloseSessionRequest {
            session_id: id.to_owned(),
            grace_seconds: Some(grace_seconds),
        })
        .await
        .unwrap()
        .into_inner()
        .stopped
}

/// Opens a session with a lease of `ttl_seconds`.
pub async fn open_session(c: &Client, ttl_seconds: u32) -> pb::Session {
    c.workers()
        .open_session(pb::OpenSessionRequest {
            ttl_seconds,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
}
