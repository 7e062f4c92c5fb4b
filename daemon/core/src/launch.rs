//! Launch requests: validation of what a client asked for, the argv a kernel runs, and the
//! environment every worker starts with.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// How a worker is networked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum NetworkMode {
    /// Own network namespace and address on the host's worker bridge.
    #[default]
    Bridge,
    /// The host's network namespace.
    Host,
    /// Own network namespace with loopback only.
    None,
}

/// What happens when a worker fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct RestartPolicy {
    pub on_failure: bool,
    pub max_restarts: u32,
    pub backoff_initial_ms: u32,
    pub backoff_max_ms: u32,
}

/// A launch as the client asked for it, before validation.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LaunchRequest {
    pub n: u32,
    pub cpu: f64,
    pub memory_gb: f64,
    pub nvidia_gpu: u32,
    pub kernel: String,
    pub script: String,
    pub code: String,
    pub command: Vec<String>,
    pub env: BTreeMap<String, String>,
    pub session_id: String,
    pub workdir: String,
    pub master_ip: String,
    pub network: NetworkMode,
    pub restart: RestartPolicy,
    pub labels: BTreeMap<String, String>,
    pub request_id: String,
}

/// What a worker runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Program {
    /// An interpreter of the host's kernel table with inline code.
    Code { kernel: String, code: String },
    /// An interpreter with a source file (absolute, resolved against the workdir).
    Script { kernel: String, path: PathBuf },
    /// Any program; argv[0] is resolved through `PATH` at admission.
    Command(Vec<String>),
}

impl Program {
    /// Kernel name for `Worker.kernel` (empty for commands).
    pub fn kernel(&self) -> &str {
        match self {
            Program::Code { kernel, .. } | Program::Script { kernel, .. } => kernel,
            Program::Command(_) => "",
        }
    }
}

/// A launch that passed validation.
#[derive(Debug, Clone, PartialEq)]
pub struct LaunchSpec {
    pub n: u32,
    pub cpu: f64,
    pub memory_bytes: u64,
    pub nvidia_gpu: u32,
    pub program: Program,
    pub env: BTreeMap<String, String>,
    pub session_id: Option<String>,
    /// Absolute; `None` means the host's default workdir.
    pub workdir: Option<PathBuf>,
    pub master_ip: Option<IpAddr>,
    pub network: NetworkMode,
    pub restart: RestartPolicy,
    pub labels: BTreeMap<String, String>,
    /// A retry of the same caller's launch with this id, within [`RETRY_WINDOW`], gets the
    /// first launch's workers back.
    pub request_id: Option<String>,
}

/// How long a launch's `request_id` makes a retry of it return the same workers.
pub const RETRY_WINDOW: std::time::Duration = std::time::Duration::from_secs(600);

/// The refusal of a retry (`request_id`) that asks for `n` workers where the first launch of
/// that id, within [`RETRY_WINDOW`], had `first`.
pub fn retry_of_another_size(request_id: &str, first: usize, n: u32) -> Error {
    Error::invalid(
        "request_id",
        format!(
            "{request_id:?} was used within the last {} minutes by a launch of {first} workers; \
             this one asks for {n}",
            RETRY_WINDOW.as_secs() / 60
        ),
    )
}

/// The longest `request_id`, in bytes (not counting a scheduler's attempt suffix).
pub const MAX_REQUEST_ID_BYTES: usize = 128;

/// One placement attempt of a launch through a scheduler, as the suffix the scheduler adds to
/// the caller's `request_id` for the hosts says it: `~N.TTTTTTTT`, the launch's worker count and
/// a random token of 8 hex digits. A retry through another replica finds the attempts in the
/// hosts' records: one with all `n` of its workers is the launch the caller was not told of.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Attempt {
    /// The workers of the whole launch (on every host of the attempt).
    pub n: u32,
    pub token: u32,
}

impl Attempt {
    /// A fresh attempt of a launch of `n` workers.
    pub fn new(n: u32) -> Self {
        Self {
            n,
            token: rand::random(),
        }
    }
}

/// Splits a scheduler's attempt suffix off a `request_id`: the caller's id, and the attempt
/// when the id carries one.
pub fn split_attempt(id: &str) -> (&str, Option<Attempt>) {
    let parsed = id.rsplit_once('~').and_then(|(base, suffix)| {
        let (n, token) = suffix.split_once('.')?;
        if n.is_empty() || !n.bytes().all(|b| b.is_ascii_digit()) || token.len() != 8 {
            return None;
        }
        let attempt = Attempt {
            n: n.parse().ok()?,
            token: u32::from_str_radix(token, 16).ok()?,
        };
        Some((base, attempt))
    });
    match parsed {
        Some((base, a)) => (base, Some(a)),
        None => (id, None),
    }
}

/// The `request_id` a scheduler gives the hosts for one placement attempt of a launch.
pub fn with_attempt(id: &str, attempt: Attempt) -> String {
    format!("{id}~{}.{:08x}", attempt.n, attempt.token)
}

/// Checks a `request_id`: at most [`MAX_REQUEST_ID_BYTES`] (a scheduler's attempt suffix not
/// counted where `attempt_allowed`), no control characters.
pub fn check_request_id(id: &str, attempt_allowed: bool) -> Result<(), Error> {
    let base = if attempt_allowed {
        split_attempt(id).0
    } else {
        id
    };
    if base.len() > MAX_REQUEST_ID_BYTES {
        return Err(Error::invalid(
            "request_id",
            format!(
                "{} bytes, past the limit of {MAX_REQUEST_ID_BYTES}",
                base.len()
            ),
        ));
    }
    if id.chars().any(char::is_control) {
        return Err(Error::invalid(
            "request_id",
            "must not contain control characters",
        ));
    }
    Ok(())
}

pub const GIB: f64 = 1024.0 * 1024.0 * 1024.0;

/// Names under which the interpreter of a kernel is configured.
pub const DEFAULT_KERNEL: &str = "python3";

fn has_nul(s: &str) -> bool {
    s.contains('\0')
}

/// Validates `req` against the kernel names this host knows. Every error names its field.
pub fn validate(req: &LaunchRequest, known_kernel: impl Fn(&str) -> bool) -> Result<LaunchSpec> {
    if req.n == 0 {
        return Err(Error::invalid("n", "must be at least 1"));
    }
    if !req.cpu.is_finite() || req.cpu <= 0.0 {
        return Err(Error::invalid(
            "cpu",
            format!("must be a finite number > 0, got {}", req.cpu),
        ));
    }
    if !req.memory_gb.is_finite() || req.memory_gb <= 0.0 {
        return Err(Error::invalid(
            "memory_gb",
            format!("must be a finite number > 0, got {}", req.memory_gb),
        ));
    }
    let memory_bytes = req.memory_gb * GIB;
    if memory_bytes < 4096.0 {
        return Err(Error::invalid(
            "memory_gb",
            "must be at least one page (4 KiB)",
        ));
    }
    if memory_bytes >= u64::MAX as f64 {
        return Err(Error::invalid("memory_gb", "is too large"));
    }
    for (k, v) in &req.env {
        if k.is_empty() {
            return Err(Error::invalid("env", "a variable name is empty"));
        }
        if k.contains('=') || has_nul(k) {
            return Err(Error::invalid(
                "env",
                format!("variable name {k:?} holds '=' or NUL"),
            ));
        }
        if has_nul(v) {
            return Err(Error::invalid(
                format!("env[{k}]"),
                "value holds a NUL byte",
            ));
        }
    }
    if has_nul(&req.code) {
        return Err(Error::invalid("code", "holds a NUL byte"));
    }
    if has_nul(&req.script) {
        return Err(Error::invalid("script", "holds a NUL byte"));
    }
    if let Some(i) = req.command.iter().position(|a| has_nul(a)) {
        return Err(Error::invalid(format!("command[{i}]"), "holds a NUL byte"));
    }
    if has_nul(&req.workdir) {
        return Err(Error::invalid("workdir", "holds a NUL byte"));
    }
    if has_nul(&req.kernel) {
        return Err(Error::invalid("kernel", "holds a NUL byte"));
    }
    let workdir = if req.workdir.is_empty() {
        None
    } else if !req.workdir.starts_with('/') {
        return Err(Error::invalid(
            "workdir",
            format!("must be an absolute path, got {:?}", req.workdir),
        ));
    } else {
        Some(PathBuf::from(&req.workdir))
    };
    let has_source = !req.code.is_empty() || !req.script.is_empty();
    let program = if !req.command.is_empty() {
        if has_source {
            let f = if req.script.is_empty() {
                "code"
            } else {
                "script"
            };
            return Err(Error::invalid(f, "cannot be set together with command"));
        }
        if !req.kernel.is_empty() {
            return Err(Error::invalid(
                "kernel",
                "cannot be set together with command",
            ));
        }
        if req.command[0].is_empty() {
            return Err(Error::invalid("command[0]", "is empty"));
        }
        Program::Command(req.command.clone())
    } else {
        let kernel = if req.kernel.is_empty() {
            DEFAULT_KERNEL
        } else {
            req.kernel.as_str()
        };
        if !known_kernel(kernel) {
            return Err(Error::invalid(
                "kernel",
                format!("unknown kernel {kernel:?}"),
            ));
        }
        if !req.script.is_empty() {
            let p = Path::new(&req.script);
            let path = match (p.is_absolute(), &workdir) {
                (true, _) => p.to_path_buf(),
                (false, Some(w)) => w.join(p),
                // Resolved against the host's default workdir by the service.
                (false, None) => p.to_path_buf(),
            };
            Program::Script {
                kernel: kernel.to_owned(),
                path,
            }
        } else if !req.code.is_empty() {
            Program::Code {
                kernel: kernel.to_owned(),
                code: req.code.clone(),
            }
        } else {
            return Err(Error::invalid(
                "code",
                "nothing to run: set code, script or command",
            ));
        }
    };
    let master_ip = if req.master_ip.is_empty() {
        None
    } else {
        Some(req.master_ip.trim().parse::<IpAddr>().map_err(|_| {
            Error::invalid(
                "master_ip",
                format!("{:?} is not an IP address", req.master_ip),
            )
        })?)
    };
    let session_id = (!req.session_id.is_empty()).then(|| req.session_id.clone());
    if req.restart.backoff_max_ms > 0 && req.restart.backoff_max_ms < req.restart.backoff_initial_ms
    {
        return Err(Error::invalid(
            "restart.backoff_max_ms",
            "must not be below restart.backoff_initial_ms",
        ));
    }
    if req.restart.on_failure && req.restart.max_restarts == 0 {
        return Err(Error::invalid(
            "restart.max_restarts",
            "must be at least 1 with ON_FAILURE",
        ));
    }
    check_request_id(&req.request_id, true)?;
    let request_id = (!req.request_id.is_empty()).then(|| req.request_id.clone());
    Ok(LaunchSpec {
        n: req.n,
        cpu: req.cpu,
        memory_bytes: memory_bytes as u64,
        nvidia_gpu: req.nvidia_gpu,
        program,
        env: req.env.clone(),
        session_id,
        workdir,
        master_ip,
        network: req.network,
        restart: req.restart,
        labels: req.labels.clone(),
        request_id,
    })
}

impl RestartPolicy {
    /// Delay before restart number `attempt` (1-based): the initial delay doubled per earlier
    /// restart, capped at the maximum.
    pub fn backoff(&self, attempt: u32) -> std::time::Duration {
        let initial = u64::from(if self.backoff_initial_ms == 0 {
            1000
        } else {
            self.backoff_initial_ms
        });
        let max = u64::from(if self.backoff_max_ms == 0 {
            60_000
        } else {
            self.backoff_max_ms
        });
        let shift = attempt.saturating_sub(1).min(32);
        std::time::Duration::from_millis(
            initial.saturating_mul(1u64 << shift).min(max.max(initial)),
        )
    }

    /// Whether a worker that failed after `restarts` restarts runs again.
    pub fn should_restart(&self, restarts: u32) -> bool {
        self.on_failure && restarts < self.max_restarts
    }
}

/// How a kernel's interpreter is invoked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelInvocation {
    pub interpreter: PathBuf,
    /// Arguments before the source (`-u` for unbuffered python output).
    pub args: Vec<String>,
    /// Flag that introduces inline code (`-c` for python, `-e` for R).
    pub code_flag: String,
}

/// The argv of a kernel program.
pub fn kernel_argv(inv: &KernelInvocation, program: &Program) -> Vec<String> {
    let mut argv = vec![inv.interpreter.to_string_lossy().into_owned()];
    argv.extend(inv.args.iter().cloned());
    match program {
        Program::Code { code, .. } => {
            argv.push(inv.code_flag.clone());
            argv.push(code.clone());
        }
        Program::Script { path, .. } => argv.push(path.to_string_lossy().into_owned()),
        Program::Command(c) => return c.clone(),
    }
    argv
}

/// The descriptor on which a worker whose code is too long for its command line finds that
/// code: the shim puts it in a memfd there, open across the exec.
pub const SOURCE_FD: i32 = 3;

/// The path by which the interpreter reads that code.
pub const SOURCE_PATH: &str = "/proc/self/fd/3";

/// The argv of a kernel whose code reaches it through [`SOURCE_FD`]: the interpreter runs
/// [`SOURCE_PATH`] as a script, as it would a file.
pub fn kernel_argv_from_fd(inv: &KernelInvocation) -> Vec<String> {
    let mut argv = vec![inv.interpreter.to_string_lossy().into_owned()];
    argv.extend(inv.args.iter().cloned());
    argv.push(SOURCE_PATH.into());
    argv
}

/// Variables that describe the worker to itself; user `env` cannot override them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerIdentity<'a> {
    pub worker_id: &'a str,
    pub session_id: Option<&'a str>,
    pub master_ip: IpAddr,
    pub worker_ip: Option<IpAddr>,
    pub gpu_uuids: &'a [String],
}

/// The environment of a worker: the host's base, then the request's, then berth's own, which
/// always win. Sorted by name; no duplicates.
pub fn worker_env(
    base: &BTreeMap<String, String>,
    user: &BTreeMap<String, String>,
    id: &WorkerIdentity<'_>,
) -> Vec<(String, String)> {
    let mut env = base.clone();
    for (k, v) in user {
        if k.starts_with("BERTH_") || k == "CDSW_MASTER_IP" {
            continue;
        }
        env.insert(k.clone(), v.clone());
    }
    // A user-supplied CUDA_VISIBLE_DEVICES must not widen what the device cgroup allows.
    for k in [
        "CUDA_VISIBLE_DEVICES",
        "NVIDIA_VISIBLE_DEVICES",
        "CUDA_DEVICE_ORDER",
    ] {
        env.remove(k);
    }
    env.insert("BERTH_WORKER_ID".into(), id.worker_id.into());
    if let Some(s) = id.session_id {
        env.insert("BERTH_SESSION_ID".into(), s.into());
    }
    env.insert("BERTH_MASTER_IP".into(), id.master_ip.to_string());
    env.insert("CDSW_MASTER_IP".into(), id.master_ip.to_string());
    if let Some(ip) = id.worker_ip {
        env.insert("BERTH_WORKER_IP".into(), ip.to_string());
    }
    if id.gpu_uuids.is_empty() {
        // No GPU: make CUDA see none rather than guess.
        env.insert("CUDA_VISIBLE_DEVICES".into(), String::new());
        env.insert("NVIDIA_VISIBLE_DEVICES".into(), "void".into());
    } else {
        let list = id.gpu_uuids.join(",");
        env.insert("CUDA_VISIBLE_DEVICES".into(), list.clone());
        env.insert("NVIDIA_VISIBLE_DEVICES".into(), list);
        env.insert("CUDA_DEVICE_ORDER".into(), "PCI_BUS_ID".into());
    }
    env.into_iter().collect()
}

/// `BERTH_MASTER_IP` of a launch: the request's `master_ip`, else the caller's address, and
/// where the caller is on loopback (or a Unix socket) the address that reaches the host from a
/// worker (the bridge gateway; loopback for workers in the host's namespace).
pub fn master_ip(
    requested: Option<IpAddr>,
    caller: Option<IpAddr>,
    host_from_worker: IpAddr,
) -> IpAddr {
    if let Some(ip) = requested {
        return ip;
    }
    match caller {
        Some(ip) if !ip.is_loopback() && !ip.is_unspecified() => match ip {
            // An IPv4 peer seen on a dual-stack socket.
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
            v4 => v4,
        },
        _ => host_from_worker,
    }
}

/// The address at which a worker of `mode` reaches its host: the bridge gateway for a worker
/// with its own address, `host_mode` (loopback) for one in the host's namespace, and loopback
/// too for an isolated one, which reaches nothing else.
pub fn host_from_worker(mode: NetworkMode, gateway: Option<IpAddr>, host_mode: IpAddr) -> IpAddr {
    match (mode, gateway) {
        (NetworkMode::Bridge, Some(gw)) => gw,
        _ => host_mode,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok_req() -> LaunchRequest {
        LaunchRequest {
            n: 2,
            cpu: 0.5,
            memory_gb: 0.25,
            code: "print(1)".into(),
            ..Default::default()
        }
    }

    fn field_of(r: Result<LaunchSpec>) -> String {
        match r {
            Err(Error::InvalidArgument { field, .. }) => field,
            other => panic!("expected InvalidArgument, got {other:?}"),
        }
    }

    #[test]
    fn invalid_requests_name_their_field() {
        let known = |k: &str| k == "python3" || k == "r";
        type Mutation = Box<dyn Fn(&mut LaunchRequest)>;
        let cases: Vec<(&str, Mutation)> = vec![
            ("n", Box::new(|r| r.n = 0)),
            ("cpu", Box::new(|r| r.cpu = 0.0)),
            ("cpu", Box::new(|r| r.cpu = -1.0)),
            ("cpu", Box::new(|r| r.cpu = f64::NAN)),
            ("cpu", Box::new(|r| r.cpu = f64::INFINITY)),
            ("memory_gb", Box::new(|r| r.memory_gb = 0.0)),
            ("memory_gb", Box::new(|r| r.memory_gb = f64::NAN)),
            ("memory_gb", Box::new(|r| r.memory_gb = 1e30)),
            ("request_id", Box::new(|r| r.request_id = "x".repeat(129))),
            ("request_id", Box::new(|r| r.request_id = "a\nb".into())),
            (
                "env",
                Box::new(|r| {
                    r.env.insert(String::new(), "x".into());
                }),
            ),
            (
                "env",
                Box::new(|r| {
                    r.env.insert("A=B".into(), "x".into());
                }),
            ),
            (
                "env",
                Box::new(|r| {
                    r.env.insert("A\0".into(), "x".into());
                }),
            ),
            (
                "env[A]",
                Box::new(|r| {
                    r.env.insert("A".into(), "x\0y".into());
                }),
            ),
            ("code", Box::new(|r| r.code = "a\0b".into())),
            ("script", Box::new(|r| r.script = "a\0b".into())),
            (
                "command[1]",
                Box::new(|r| {
                    r.code.clear();
                    r.command = vec!["/bin/echo".into(), "a\0".into()];
                }),
            ),
            ("code", Box::new(|r| r.command = vec!["/bin/true".into()])),
            ("code", Box::new(|r| r.code.clear())),
            ("kernel", Box::new(|r| r.kernel = "julia".into())),
            ("master_ip", Box::new(|r| r.master_ip = "not-an-ip".into())),
            ("workdir", Box::new(|r| r.workdir = "relative/dir".into())),
            (
                "restart.max_restarts",
                Box::new(|r| r.restart.on_failure = true),
            ),
        ];
        for (field, mutate) in cases {
            let mut r = ok_req();
            mutate(&mut r);
            assert_eq!(field_of(validate(&r, known)), field, "{r:?}");
        }
    }

    #[test]
    fn script_wins_over_code_and_resolves_against_workdir() {
        let mut r = ok_req();
        r.script = "train.py".into();
        r.workdir = "/proj".into();
        let s = validate(&r, |_| true).unwrap();
        assert_eq!(
            s.program,
            Program::Script {
                kernel: "python3".into(),
                path: "/proj/train.py".into()
            }
        );
        assert_eq!(s.memory_bytes, 256 * 1024 * 1024);
    }

    #[test]
    fn command_runs_without_kernel() {
        let mut r = ok_req();
        r.code.clear();
        r.command = vec!["/bin/true".into()];
        let s = validate(&r, |_| false).unwrap();
        assert_eq!(s.program, Program::Command(vec!["/bin/true".into()]));
    }

    #[test]
    fn kernel_argv_shapes() {
        let inv = KernelInvocation {
            interpreter: "/usr/bin/python3".into(),
            args: vec!["-u".into()],
            code_flag: "-c".into(),
        };
        let code = Program::Code {
            kernel: "python3".into(),
            code: "print(1)".into(),
        };
        assert_eq!(
            kernel_argv(&inv, &code),
            ["/usr/bin/python3", "-u", "-c", "print(1)"]
        );
        let script = Program::Script {
            kernel: "python3".into(),
            path: "/p/a.py".into(),
        };
        assert_eq!(
            kernel_argv(&inv, &script),
            ["/usr/bin/python3", "-u", "/p/a.py"]
        );
        assert_eq!(
            kernel_argv_from_fd(&inv),
            ["/usr/bin/python3", "-u", "/proc/self/fd/3"]
        );
    }

    #[test]
    fn berth_variables_win_over_user_env() {
        let base = BTreeMap::from([("PATH".to_string(), "/usr/bin".to_string())]);
        let user = BTreeMap::from([
            ("BERTH_WORKER_ID".to_string(), "evil".to_string()),
            ("CDSW_MASTER_IP".to_string(), "1.2.3.4".to_string()),
            ("CUDA_VISIBLE_DEVICES".to_string(), "0,1,2".to_string()),
            ("MY_VAR".to_string(), "1".to_string()),
        ]);
        let gpus = vec!["GPU-a".to_string()];
        let id = WorkerIdentity {
            worker_id: "w1",
            session_id: Some("s1"),
            master_ip: "10.0.0.1".parse().unwrap(),
            worker_ip: Some("10.0.0.9".parse().unwrap()),
            gpu_uuids: &gpus,
        };
        let env: BTreeMap<_, _> = worker_env(&base, &user, &id).into_iter().collect();
        assert_eq!(env["BERTH_WORKER_ID"], "w1");
        assert_eq!(env["BERTH_SESSION_ID"], "s1");
        assert_eq!(env["BERTH_MASTER_IP"], "10.0.0.1");
        assert_eq!(env["CDSW_MASTER_IP"], "10.0.0.1");
        assert_eq!(env["BERTH_WORKER_IP"], "10.0.0.9");
        assert_eq!(env["CUDA_VISIBLE_DEVICES"], "GPU-a");
        assert_eq!(env["CUDA_DEVICE_ORDER"], "PCI_BUS_ID");
        assert_eq!(env["MY_VAR"], "1");
        assert_eq!(env["PATH"], "/usr/bin");
    }

    #[test]
    fn restart_backoff_doubles_and_caps() {
        let p = RestartPolicy {
            on_failure: true,
            max_restarts: 3,
            backoff_initial_ms: 100,
            backoff_max_ms: 350,
        };
        let ms = |a| p.backoff(a).as_millis();
        assert_eq!(
            (ms(1), ms(2), ms(3), ms(4), ms(40)),
            (100, 200, 350, 350, 350)
        );
        assert!(p.should_restart(2) && !p.should_restart(3));
        assert_eq!(RestartPolicy::default().backoff(1).as_millis(), 1000);
        assert!(!RestartPolicy::default().should_restart(0));
    }

    #[test]
    fn host_from_worker_per_mode() {
        let gw: IpAddr = "10.213.0.1".parse().unwrap();
        let lo: IpAddr = "127.0.0.1".parse().unwrap();
        assert_eq!(host_from_worker(NetworkMode::Bridge, Some(gw), lo), gw);
        assert_eq!(host_from_worker(NetworkMode::Host, Some(gw), lo), lo);
        assert_eq!(host_from_worker(NetworkMode::None, Some(gw), lo), lo);
        assert_eq!(host_from_worker(NetworkMode::Bridge, None, lo), lo);
        // A caller on loopback gets the gateway in bridge workers, loopback in host workers.
        let caller = Some(lo);
        let bridge = host_from_worker(NetworkMode::Bridge, Some(gw), lo);
        assert_eq!(master_ip(None, caller, bridge), gw);
        let host = host_from_worker(NetworkMode::Host, Some(gw), lo);
        assert_eq!(master_ip(None, caller, host), lo);
    }

    #[test]
    fn master_ip_rules() {
        let gw: IpAddr = "10.213.0.1".parse().unwrap();
        let req: IpAddr = "192.0.2.7".parse().unwrap();
        let peer: IpAddr = "198.51.100.3".parse().unwrap();
        assert_eq!(master_ip(Some(req), Some(peer), gw), req);
        assert_eq!(master_ip(None, Some(peer), gw), peer);
        assert_eq!(master_ip(None, Some("127.0.0.1".parse().unwrap()), gw), gw);
        assert_eq!(master_ip(None, Some("::1".parse().unwrap()), gw), gw);
        assert_eq!(master_ip(None, None, gw), gw);
        assert_eq!(
            master_ip(None, Some("::ffff:198.51.100.3".parse().unwrap()), gw),
            peer
        );
    }

    #[test]
    fn attempts_round_trip_and_leave_other_ids_whole() {
        let a = Attempt {
            n: 12,
            token: 0xdead_beef,
        };
        let id = with_attempt("job-7~x", a);
        assert_eq!(id, "job-7~x~12.deadbeef");
        assert_eq!(split_attempt(&id), ("job-7~x", Some(a)));
        for plain in [
            "job",
            "a~b",
            "a~1.dead",
            "a~.deadbeef",
            "a~x.deadbeef",
            "a~1.deadbeefa",
        ] {
            assert_eq!(split_attempt(plain), (plain, None), "{plain}");
        }
        // The caller's 128 bytes are allowed with an attempt after them, not past them.
        let long = "x".repeat(MAX_REQUEST_ID_BYTES);
        assert!(check_request_id(&with_attempt(&long, a), true).is_ok());
        assert!(check_request_id(&with_attempt(&long, a), false).is_err());
        assert!(check_request_id(&format!("{long}y"), true).is_err());
    }
}
