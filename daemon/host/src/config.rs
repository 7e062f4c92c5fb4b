//! berthd's configuration: embedded defaults, overridden by a TOML file, overridden by flags.
//! `berthd --print-config` shows the effective configuration with every key.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

pub use berth_server::config::{ConfigError, DaemonArgs, DaemonConfig};

/// Failure to load the configuration.
/// The whole configuration of a host daemon. Every key has a default (see `Default`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Host name reported to clients and the scheduler; empty means the kernel's hostname.
    pub name: String,
    /// gRPC listen addresses: `HOST:PORT` or `unix:PATH`.
    pub listen: Vec<String>,
    /// Worker records, specs and output live here.
    pub state_dir: PathBuf,
    /// Prometheus `/metrics` address; empty turns it off.
    pub metrics_listen: String,
    /// Worker bridge name and subnet (bridge networking).
    pub bridge: String,
    pub subnet: String,
    /// Let bridge-mode workers reach beyond this host (masquerading, set up once at start-up
    /// with nft or iptables). Off: they reach each other and the host only.
    pub egress: bool,
    /// Network namespaces kept ready for bridge-mode workers (each holds ~0.3 MiB of kernel
    /// memory): a launch of up to this many workers takes ready ones (~0.1 ms each) instead of
    /// making them (~1 ms each, serialised in the kernel). 0 makes every one on demand.
    pub netns_pool: usize,
    /// GPU backend: `nvml`, `none`, `fake:N`, or `auto` (NVML when it loads).
    pub gpus: String,
    /// Seconds between two GPU telemetry samples (utilization, memory, processes).
    pub gpu_telemetry_seconds: f64,
    /// Scheduler to register with; empty means standalone.
    pub scheduler: String,
    /// Where the scheduler and clients reach this daemon (`HostInfo.address`, `HOST:PORT` or
    /// `unix:PATH`); empty means the first TCP listen address.
    pub advertise: String,
    /// Free labels of this host (scheduler constraints match them).
    pub labels: BTreeMap<String, String>,
    /// `text` or `json` logs.
    pub log_format: String,
    pub resources: ResourcesConfig,
    pub worker: WorkerConfig,
    pub output: OutputConfig,
    pub cgroup: CgroupConfig,
    pub retention: RetentionConfig,
    /// Caps on one launch request, checked before anything is allocated for it.
    pub limits: berth_core::limits::LaunchLimits,
    /// Load limits of the gRPC listeners: calls in flight, their time, streams per connection.
    pub load: berth_server::limits::RequestLimits,
    /// Interpreters by kernel name. `python3` and `r` are always defined.
    pub kernels: BTreeMap<String, KernelConfig>,
    /// Path of the `berth-shim` binary; empty means beside `berthd`.
    pub shim: PathBuf,
    /// Group whose members may connect to the Unix sockets (mode 0660); when it does not
    /// exist, the sockets are 0600 (root only).
    pub socket_group: String,
    /// Members of this group see and stop every worker, as root does.
    pub admin_group: String,
    /// Workers of root, of unmapped certificate names and of anonymous callers run as this user.
    pub worker_user: String,
    /// Root or an admin may ask for root workers (`run_as_root`).
    pub allow_root_workers: bool,
    /// Capabilities root workers keep, by name (e.g. "CAP_NET_BIND_SERVICE"); default none.
    pub root_worker_capabilities: Vec<String>,
    /// Allow plaintext gRPC and metrics beyond loopback; callers there are taken for whoever
    /// they say they are. Never on a shared network.
    pub insecure_plaintext: bool,
    /// Identities whose forwarded caller this host accepts: certificate names, or `uid:N` for a
    /// scheduler on this host.
    pub trusted_schedulers: Vec<String>,
    /// TLS of the TCP listeners and of the calls to the scheduler.
    pub tls: berth_server::identity::TlsConfig,
    /// Certificate name → local user name (unmapped names run workers as `worker_user`).
    pub users: BTreeMap<String, String>,
    /// `--recover` only, never in a file: a state store that cannot be opened is moved aside
    /// and the live workers are taken over from their own files (see `berthd --help`).
    #[serde(skip)]
    pub recover: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ResourcesConfig {
    /// Allocatable CPU cores; 0 means every online CPU.
    pub cpu: f64,
    /// Allocatable memory in GiB; 0 means total memory less `reserved_memory_gb`.
    pub memory_gb: f64,
    /// Memory kept for the host itself when `memory_gb` is 0.
    pub reserved_memory_gb: f64,
    /// Most workers alive at once.
    pub max_workers: u32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WorkerConfig {
    /// Task (process and thread) limit of each worker's cgroup.
    pub pids_max: u64,
    /// Working directory of workers that ask for none.
    pub workdir: PathBuf,
    /// Default seconds between SIGTERM and SIGKILL when stopping.
    pub stop_grace_seconds: u32,
    /// `PATH` of workers, also used to find `command[0]`.
    pub path: String,
    /// Variables every worker gets (the request's `env` overrides them).
    pub env: BTreeMap<String, String>,
    /// Resource limits of workers, by name without `RLIMIT_` (e.g. `NOFILE = [1024, 524288]`,
    /// soft and hard; -1 is unlimited). Default: systemd's defaults for services, not the
    /// daemon's own limits.
    pub rlimits: BTreeMap<String, [i64; 2]>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OutputConfig {
    /// Size of one output segment file.
    pub segment_bytes: u64,
    /// Segments kept per stream; the cap is `segment_bytes × segments` per stream.
    pub segments: u32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CgroupConfig {
    /// Parent cgroup of this daemon's subtree, as a path inside each hierarchy; empty means the
    /// daemon's own cgroup (what systemd's `Delegate=yes` hands it).
    pub parent: String,
    /// Worker cgroups kept ready, made and given their CPU quota ahead of need (cgroup v1 only,
    /// which can rename a cgroup): a launch renames one (~0.1 ms) instead of making it, and so
    /// never pays the quota write, which walks every CPU cgroup of the host (~1–2 ms with 4000
    /// workers). 0 makes every one on demand.
    pub pool: usize,
}

impl Default for CgroupConfig {
    fn default() -> Self {
        Self {
            parent: String::new(),
            pool: 32,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RetentionConfig {
    /// Ended workers (record and output) are removed this many seconds after they ended...
    /// An ended session is kept while any of its workers is, and at least this long after its
    /// end; until then it can be named by `session_id`, afterwards it is NOT_FOUND.
    pub finished_seconds: u64,
    /// ...or once more than this many ended workers are kept, oldest first.
    pub max_finished: usize,
    /// How often ended workers are checked against these limits.
    pub sweep_seconds: u64,
}

impl Default for RetentionConfig {
    fn default() -> Self {
        Self {
            finished_seconds: 24 * 3600,
            max_finished: 10_000,
            sweep_seconds: 30,
        }
    }
}

/// How one kernel's interpreter is found and run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct KernelConfig {
    /// Interpreter paths or names (searched in `worker.path`); the first that exists wins.
    pub candidates: Vec<String>,
    /// Arguments before the source.
    pub args: Vec<String>,
    /// Flag that introduces inline code.
    pub code_flag: String,
    /// Interpreters kept started ahead of need, each in its own cgroup and network namespace
    /// (`python3` only; see README, "The warm interpreter pool"). 0: every worker starts cold.
    pub pool_size: usize,
    /// Modules the pooled interpreters import before they wait (e.g. `["numpy"]`).
    pub preload: Vec<String>,
}

impl Default for KernelConfig {
    fn default() -> Self {
        Self {
            candidates: Vec::new(),
            args: Vec::new(),
            code_flag: "-c".into(),
            pool_size: 0,
            preload: Vec::new(),
        }
    }
}

/// Most pooled interpreters one kernel may keep.
pub const MAX_POOL_SIZE: usize = 256;

/// Whether `name` is a dotted Python module name (`numpy`, `os.path`).
fn module_name(name: &str) -> bool {
    !name.is_empty()
        && name.split('.').all(|part| {
            let mut c = part.chars();
            c.next()
                .is_some_and(|f| f.is_ascii_alphabetic() || f == '_')
                && c.all(|x| x.is_ascii_alphanumeric() || x == '_')
        })
}

fn default_kernels() -> BTreeMap<String, KernelConfig> {
    BTreeMap::from([
        (
            "python3".to_owned(),
            KernelConfig {
                // The system interpreter first: shims such as pyenv's cost ~80 ms per start.
                candidates: vec![
                    "/usr/bin/python3".into(),
                    "/usr/local/bin/python3".into(),
                    "python3".into(),
                ],
                args: vec!["-u".into()],
                code_flag: "-c".into(),
                ..KernelConfig::default()
            },
        ),
        (
            "r".to_owned(),
            KernelConfig {
                candidates: vec![
                    "/usr/bin/Rscript".into(),
                    "/usr/local/bin/Rscript".into(),
                    "Rscript".into(),
                ],
                args: vec![],
                code_flag: "-e".into(),
                ..KernelConfig::default()
            },
        ),
    ])
}

impl Default for Config {
    fn default() -> Self {
        Self {
            name: String::new(),
            listen: vec![
                "127.0.0.1:7300".into(),
                "unix:/run/berth/berthd.sock".into(),
            ],
            state_dir: PathBuf::from("/var/lib/berth"),
            metrics_listen: "127.0.0.1:7301".into(),
            bridge: "berth0".into(),
            subnet: "10.213.0.0/16".into(),
            egress: false,
            netns_pool: 32,
            gpus: "auto".into(),
            gpu_telemetry_seconds: 5.0,
            scheduler: String::new(),
            advertise: String::new(),
            labels: BTreeMap::new(),
            log_format: "text".into(),
            resources: ResourcesConfig::default(),
            worker: WorkerConfig::default(),
            output: OutputConfig::default(),
            cgroup: CgroupConfig::default(),
            retention: RetentionConfig::default(),
            limits: Default::default(),
            load: Default::default(),
            kernels: default_kernels(),
            shim: PathBuf::new(),
            socket_group: "berth".into(),
            admin_group: "berth-admin".into(),
            worker_user: "nobody".into(),
            allow_root_workers: false,
            root_worker_capabilities: Vec::new(),
            insecure_plaintext: false,
            trusted_schedulers: vec!["uid:0".into()],
            tls: Default::default(),
            users: BTreeMap::new(),
            recover: false,
        }
    }
}

impl Default for ResourcesConfig {
    fn default() -> Self {
        Self {
            cpu: 0.0,
            memory_gb: 0.0,
            reserved_memory_gb: 0.5,
            max_workers: 4096,
        }
    }
}

impl Default for WorkerConfig {
    fn default() -> Self {
        Self {
            pids_max: 4096,
            workdir: PathBuf::from("/"),
            stop_grace_seconds: 10,
            path: "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into(),
            env: BTreeMap::new(),
            rlimits: BTreeMap::from([("NOFILE".to_owned(), [1024, 524288])]),
        }
    }
}

impl Default for OutputConfig {
    fn default() -> Self {
        Self {
            segment_bytes: 16 << 20,
            segments: 4,
        }
    }
}

impl DaemonConfig for Config {
    fn complete(&mut self) {
        for (k, v) in default_kernels() {
            let entry = self.kernels.entry(k).or_insert_with(|| v.clone());
            // `[kernels.python3]` with only `pool_size`/`preload`: the built-in interpreter.
            if entry.candidates.is_empty() {
                entry.candidates = v.candidates;
                entry.args = v.args;
                entry.code_flag = v.code_flag;
            }
        }
    }

    fn log_format(&self) -> &str {
        &self.log_format
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let bad = |key, message: &str| {
            Err(ConfigError::Invalid {
                key,
                message: message.into(),
            })
        };
        if self.listen.is_empty() {
            return bad("listen", "needs at least one address");
        }
        if !self.resources.cpu.is_finite() || self.resources.cpu < 0.0 {
            return bad("resources.cpu", "must be a number >= 0");
        }
        if !self.resources.memory_gb.is_finite() || self.resources.memory_gb < 0.0 {
            return bad("resources.memory_gb", "must be a number >= 0");
        }
        if self.worker.pids_max == 0 {
            return bad("worker.pids_max", "must be at least 1");
        }
        if !self.worker.workdir.is_absolute() {
            return bad("worker.workdir", "must be an absolute path");
        }
        if self.output.segment_bytes < 4096 {
            return bad("output.segment_bytes", "must be at least 4096");
        }
        if self.output.segments == 0 {
            return bad("output.segments", "must be at least 1");
        }
        if !self.name.is_empty() && !berth_core::is_valid_id(&self.name) {
            return bad("name", "may hold only letters, digits and '-'");
        }
        if let Err(e) = berth_sys::gpu::GpuBackendSpec::parse(&self.gpus) {
            return Err(ConfigError::Invalid {
                key: "gpus",
                message: e.to_string(),
            });
        }
        if !self.gpu_telemetry_seconds.is_finite() || self.gpu_telemetry_seconds < 0.1 {
            return bad("gpu_telemetry_seconds", "must be a number >= 0.1");
        }
        if let Err(e) = berth_core::ipam::Subnet::parse(&self.subnet) {
            return Err(ConfigError::Invalid {
                key: "subnet",
                message: e.to_string(),
            });
        }
        if !berth_sys::netns::valid_link_name(&self.bridge) {
            return bad(
                "bridge",
                "must be a link name: 1 to 15 characters, no '/', ':' or spaces",
            );
        }
        if self.log_format != "text" && self.log_format != "json" {
            return bad("log_format", "must be text or json");
        }
        if let Some(key) = self.load.zero_limit() {
            return bad(key, "must be at least 1");
        }
        for c in &self.root_worker_capabilities {
            if berth_sys::launcher::cap_number(c).is_none() {
                return Err(ConfigError::Invalid {
                    key: "root_worker_capabilities",
                    message: format!("{c:?} is not a capability name"),
                });
            }
        }
        for (name, [soft, hard]) in &self.worker.rlimits {
            if rlimit_resource(name).is_none() {
                return Err(ConfigError::Invalid {
                    key: "worker.rlimits",
                    message: format!("{name:?} is not a resource limit (NOFILE, NPROC, CORE, ...)"),
                });
            }
            let lim = |v: i64| if v < 0 { u64::MAX } else { v as u64 };
            if lim(*soft) > lim(*hard) {
                return Err(ConfigError::Invalid {
                    key: "worker.rlimits",
                    message: format!(
                        "{name}: the soft limit {soft} is above the hard limit {hard}"
                    ),
                });
            }
        }
        if let Some(key) = self.limits.zero_cap() {
            return bad(key, "must be at least 1");
        }
        berth_server::identity::check_tls_config(&self.tls)?;
        if self.worker_user.is_empty() {
            return bad("worker_user", "must name a user");
        }
        for (name, k) in &self.kernels {
            if k.pool_size > 0 && name != "python3" {
                return Err(ConfigError::Invalid {
                    key: "kernels.*.pool_size",
                    message: format!(
                        "kernel {name:?}: only the python3 kernel has a pool (pool_size must be 0)"
                    ),
                });
            }
            if k.pool_size > MAX_POOL_SIZE {
                return Err(ConfigError::Invalid {
                    key: "kernels.python3.pool_size",
                    message: format!("{} is more than {MAX_POOL_SIZE}", k.pool_size),
                });
            }
            if let Some(m) = k.preload.iter().find(|m| !module_name(m)) {
                return Err(ConfigError::Invalid {
                    key: "kernels.python3.preload",
                    message: format!("{m:?} is not a module name (such as numpy or os.path)"),
                });
            }
            if !k.preload.is_empty() && name != "python3" {
                return Err(ConfigError::Invalid {
                    key: "kernels.*.preload",
                    message: format!("kernel {name:?}: only the python3 kernel preloads modules"),
                });
            }
        }
        Ok(())
    }
}

/// The `RLIMIT_*` number of a limit named without its prefix (`NOFILE`, `nproc`).
pub fn rlimit_resource(name: &str) -> Option<i32> {
    let r = match name.to_ascii_uppercase().trim_start_matches("RLIMIT_") {
        "AS" => libc::RLIMIT_AS,
        "CORE" => libc::RLIMIT_CORE,
        "CPU" => libc::RLIMIT_CPU,
        "DATA" => libc::RLIMIT_DATA,
        "FSIZE" => libc::RLIMIT_FSIZE,
        "LOCKS" => libc::RLIMIT_LOCKS,
        "MEMLOCK" => libc::RLIMIT_MEMLOCK,
        "MSGQUEUE" => libc::RLIMIT_MSGQUEUE,
        "NICE" => libc::RLIMIT_NICE,
        "NOFILE" => libc::RLIMIT_NOFILE,
        "NPROC" => libc::RLIMIT_NPROC,
        "RSS" => libc::RLIMIT_RSS,
        "RTPRIO" => libc::RLIMIT_RTPRIO,
        "RTTIME" => libc::RLIMIT_RTTIME,
        "SIGPENDING" => libc::RLIMIT_SIGPENDING,
        "STACK" => libc::RLIMIT_STACK,
        _ => return None,
    };
    Some(r as i32)
}

/// Command line of berthd. Flags override the config file, which overrides the defaults.
#[derive(Debug, Clone, Default, clap::Parser)]
#[command(
    name = "berthd",
    version,
    about = "berth host daemon: runs workers in their own cgroups and answers gRPC"
)]
pub struct Args {
    /// TOML configuration file.
    #[arg(long, env = "BERTHD_CONFIG")]
    pub config: Option<PathBuf>,
    /// gRPC listen address, HOST:PORT or unix:PATH (repeatable).
    #[arg(long)]
    pub listen: Vec<String>,
    /// Directory for worker records and output.
    #[arg(long)]
    pub state_dir: Option<PathBuf>,
    /// Host name.
    #[arg(long)]
    pub name: Option<String>,
    /// Worker bridge name.
    #[arg(long)]
    pub bridge: Option<String>,
    /// Worker subnet (CIDR).
    #[arg(long)]
    pub subnet: Option<String>,
    /// GPU backend: nvml, none, fake:N or auto.
    #[arg(long)]
    pub gpus: Option<String>,
    /// Scheduler address to register with.
    #[arg(long)]
    pub scheduler: Option<String>,
    /// Address the scheduler reaches this daemon at (default: first TCP listen address).
    #[arg(long)]
    pub advertise: Option<String>,
    /// Prometheus metrics address; "" turns it off.
    #[arg(long)]
    pub metrics_listen: Option<String>,
    /// Log format: text or json.
    #[arg(long)]
    pub log_format: Option<String>,
    #[command(flatten)]
    pub security: berth_server::config::SecurityArgs,
    /// Print the effective configuration as TOML and exit.
    #[arg(long)]
    pub print_config: bool,
    /// Start although the state store cannot be opened (it is damaged): move it aside, start
    /// with an empty one, and take over every live worker from its own files. Workers with a
    /// readable spec are adopted (owner, session, claims; a session without a record gets a new
    /// lease of 10 minutes that its client renews), live workers without one are stopped; each
    /// is logged. Refused while another process has the store open.
    #[arg(long)]
    pub recover: bool,
}

impl DaemonArgs for Args {
    type Config = Config;

    fn config_file(&self) -> Option<&Path> {
        self.config.as_deref()
    }

    fn print_config(&self) -> bool {
        self.print_config
    }

    fn apply(&self, cfg: &mut Config) {
        if !self.listen.is_empty() {
            cfg.listen = self.listen.clone();
        }
        if let Some(v) = &self.state_dir {
            cfg.state_dir = v.clone();
        }
        if let Some(v) = &self.name {
            cfg.name = v.clone();
        }
        if let Some(v) = &self.bridge {
            cfg.bridge = v.clone();
        }
        if let Some(v) = &self.subnet {
            cfg.subnet = v.clone();
        }
        if let Some(v) = &self.gpus {
            cfg.gpus = v.clone();
        }
        if let Some(v) = &self.scheduler {
            cfg.scheduler = v.clone();
        }
        if let Some(v) = &self.advertise {
            cfg.advertise = v.clone();
        }
        if let Some(v) = &self.metrics_listen {
            cfg.metrics_listen = v.clone();
        }
        if let Some(v) = &self.log_format {
            cfg.log_format = v.clone();
        }
        self.security.apply(&mut cfg.socket_group, &mut cfg.tls);
        cfg.recover = self.recover;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn empty_file_is_the_defaults() {
        assert_eq!(Config::from_toml("").unwrap(), Config::default());
    }

    #[test]
    fn defaults_roundtrip_through_toml() {
        let text = Config::default().to_toml();
        assert_eq!(Config::from_toml(&text).unwrap(), Config::default());
    }

    #[test]
    fn the_pool_keys() {
        let c = Config::from_toml(
            "[kernels.python3]\npool_size = 4\npreload = [\"numpy\", \"os.path\"]\n",
        )
        .unwrap();
        let p = &c.kernels["python3"];
        assert_eq!((p.pool_size, p.preload.len()), (4, 2));
        // The interpreter settings stay the built-in ones.
        assert_eq!(p.args, ["-u"]);
        assert!(p.candidates.iter().any(|c| c == "/usr/bin/python3"));
        assert_eq!(Config::default().kernels["python3"].pool_size, 0);
        let shown = c.to_toml();
        assert!(
            shown.contains("pool_size = 4") && shown.contains("preload = ["),
            "{shown}"
        );
        for (text, key, says) in [
            (
                "[kernels.r]\npool_size = 2\n",
                "kernels.*.pool_size",
                "only the python3",
            ),
            (
                "[kernels.python3]\npool_size = 100000\n",
                "kernels.python3.pool_size",
                "more than",
            ),
            (
                "[kernels.python3]\npreload = [\"numpy; import os\"]\n",
                "kernels.python3.preload",
                "not a module name",
            ),
            (
                "[kernels.python3]\npreload = [\"\"]\n",
                "kernels.python3.preload",
                "not a module name",
            ),
            (
                "[kernels.python3]\npreload = [\"1abc\"]\n",
                "kernels.python3.preload",
                "not a module name",
            ),
        ] {
            match Config::from_toml(text) {
                Err(ConfigError::Invalid { key: k, message }) => {
                    assert_eq!(k, key, "{text}");
                    assert!(message.contains(says), "{text}: {message}");
                }
                other => panic!("{text}: {other:?}"),
            }
        }
        assert!(matches!(
            Config::from_toml("[kernels.python3]\npool_size = -1\n"),
            Err(ConfigError::Parse { .. })
        ));
    }

    #[test]
    fn a_kernel_entry_keeps_the_others() {
        let c =
            Config::from_toml("[kernels.julia]\ncandidates = [\"julia\"]\ncode_flag = \"-e\"\n")
                .unwrap();
        assert!(c.kernels.contains_key("python3") && c.kernels.contains_key("r"));
        assert_eq!(c.kernels["julia"].code_flag, "-e");
    }

    #[test]
    fn unknown_keys_and_bad_values_are_refused() {
        assert!(matches!(
            Config::from_toml("listn = []"),
            Err(ConfigError::Parse { .. })
        ));
        assert!(matches!(
            Config::from_toml("[worker]\npids_max = 0"),
            Err(ConfigError::Invalid {
                key: "worker.pids_max",
                ..
            })
        ));
        assert!(matches!(
            Config::from_toml("name = \"a/b\""),
            Err(ConfigError::Invalid { key: "name", .. })
        ));
        for bad_gpus in ["gpus = \"cuda\"", "gpus = \"fake:0\""] {
            assert!(
                matches!(
                    Config::from_toml(bad_gpus),
                    Err(ConfigError::Invalid { key: "gpus", .. })
                ),
                "{bad_gpus}"
            );
        }
        assert!(matches!(
            Config::from_toml("gpu_telemetry_seconds = 0.0"),
            Err(ConfigError::Invalid {
                key: "gpu_telemetry_seconds",
                ..
            })
        ));
        for (bad, key) in [
            ("subnet = \"10.213.0.0\"", "subnet"),
            ("subnet = \"10.213.0.1/16\"", "subnet"),
            ("bridge = \"a-very-long-bridge-name\"", "bridge"),
        ] {
            assert!(
                matches!(Config::from_toml(bad), Err(ConfigError::Invalid { key: k, .. }) if k == key),
                "{bad}"
            );
        }
        assert!(matches!(
            Config::from_toml("[limits]\nmax_env_vars = 0"),
            Err(ConfigError::Invalid {
                key: "limits.max_env_vars",
                ..
            })
        ));
        assert_eq!(
            Config::from_toml("gpus = \"fake:4\"").unwrap().gpus,
            "fake:4"
        );
        assert!(matches!(
            Config::from_toml("[load]\nmax_concurrent_requests = 0"),
            Err(ConfigError::Invalid {
                key: "load.max_concurrent_requests",
                ..
            })
        ));
        let l = Config::from_toml("[load]\nrequest_timeout_seconds = 0")
            .unwrap()
            .load;
        assert_eq!(l.timeout(), None, "0 is no time limit");
    }

    #[test]
    fn flags_override_file() {
        let a = Args {
            listen: vec!["127.0.0.1:0".into()],
            name: Some("h1".into()),
            ..Default::default()
        };
        let c = a.load().unwrap();
        assert_eq!(c.listen, vec!["127.0.0.1:0"]);
        assert_eq!(c.name, "h1");
        assert_eq!(c.state_dir, PathBuf::from("/var/lib/berth"));
    }
}

#[cfg(test)]
mod example_file {
    use super::*;

    /// systemd/berthd.toml documents every key with its default: it must parse to the defaults.
    #[test]
    fn example_config_is_the_defaults() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../systemd/berthd.toml");
        assert_eq!(Config::from_file(&path).unwrap(), Config::default());
    }
}
