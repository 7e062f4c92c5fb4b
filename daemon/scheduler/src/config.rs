//! berth-scheduler's configuration: embedded defaults, overridden by a TOML file, overridden by
//! flags. `berth-scheduler --print-config` shows the effective configuration with every key;
//! systemd/berth-scheduler.toml documents them.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use berth_server::config::{ConfigError, DaemonArgs, DaemonConfig};

/// The whole configuration of a scheduler node. Every key has a default (see `Default`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SchedulerConfig {
    /// gRPC listen addresses: `HOST:PORT` or `unix:PATH`. Hosts and clients both call here.
    pub listen: Vec<String>,
    /// Where the scheduler remembers its hosts' addresses (a hint; the hosts hold the rest).
    pub state_dir: PathBuf,
    /// Prometheus `/metrics` address; empty turns it off.
    pub metrics_listen: String,
    /// Seconds between two beats of a host (told to the hosts).
    pub heartbeat_seconds: f64,
    /// A host whose beats stop this long is DOWN and its workers LOST (`host lost`).
    pub host_down_seconds: f64,
    /// Placements tried for one launch when hosts refuse their part.
    pub launch_attempts: u32,
    /// `text` or `json` logs.
    pub log_format: String,
    /// Group whose members may connect to the Unix sockets (mode 0660); when it does not
    /// exist, the sockets are 0600 (root only).
    pub socket_group: String,
    /// Members of this group see and stop every worker and drain hosts, as root does.
    pub admin_group: String,
    /// The owner name of callers with no proven identity (`insecure_plaintext`).
    pub worker_user: String,
    /// Allow plaintext gRPC and metrics beyond loopback; callers and hosts there are taken for
    /// whoever they say they are. Never on a shared network.
    pub insecure_plaintext: bool,
    /// TLS of the listeners and of the calls to hosts; a host's certificate name is its name.
    pub tls: berth_server::identity::TlsConfig,
    /// Certificate name → local user name.
    pub users: std::collections::BTreeMap<String, String>,
    /// Caps on one launch request, checked before it is placed.
    pub limits: berth_core::limits::LaunchLimits,
    /// Load limits of the gRPC listeners: calls in flight, their time, streams per connection.
    pub load: berth_server::limits::RequestLimits,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        Self {
            listen: vec!["127.0.0.1:7400".into()],
            state_dir: PathBuf::from("/var/lib/berth-scheduler"),
            metrics_listen: "127.0.0.1:7401".into(),
            heartbeat_seconds: 2.0,
            host_down_seconds: 10.0,
            launch_attempts: 3,
            log_format: "text".into(),
            socket_group: "berth".into(),
            admin_group: "berth-admin".into(),
            worker_user: "nobody".into(),
            insecure_plaintext: false,
            tls: Default::default(),
            users: Default::default(),
            limits: Default::default(),
            load: Default::default(),
        }
    }
}

impl DaemonConfig for SchedulerConfig {
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
        if !(self.heartbeat_seconds.is_finite() && (0.05..=60.0).contains(&self.heartbeat_seconds))
        {
            return bad("heartbeat_seconds", "must be between 0.05 and 60");
        }
        if !(self.host_down_seconds.is_finite()
            && self.host_down_seconds >= 2.0 * self.heartbeat_seconds)
        {
            return bad(
                "host_down_seconds",
                "must be at least two heartbeat intervals",
            );
        }
        if self.launch_attempts == 0 {
            return bad("launch_attempts", "must be at least 1");
        }
        if self.log_format != "text" && self.log_format != "json" {
            return bad("log_format", "must be text or json");
        }
        if let Some(key) = self.limits.zero_cap() {
            return bad(key, "must be at least 1");
        }
        if let Some(key) = self.load.zero_limit() {
            return bad(key, "must be at least 1");
        }
        berth_server::identity::check_tls_config(&self.tls)
    }
}

impl SchedulerConfig {
    /// What the listeners need to protect themselves and to know their callers.
    pub fn security(&self) -> berth_server::front::Security {
        use berth_server::identity::{AccessConfig, Policy};
        berth_server::front::Security {
            tls: self.tls.clone(),
            insecure_plaintext: self.insecure_plaintext,
            socket_group: self.socket_group.clone(),
            policy: Policy::new(AccessConfig {
                admin_group: self.admin_group.clone(),
                worker_user: self.worker_user.clone(),
                insecure_plaintext: self.insecure_plaintext,
                users: self.users.clone(),
                // Nobody speaks for others to a scheduler.
                trusted_schedulers: Vec::new(),
            }),
        }
    }

    /// The TLS material the scheduler presents to hosts.
    pub fn client_tls(&self) -> berth_client::TlsFiles {
        let some = |p: &std::path::Path| (!p.as_os_str().is_empty()).then(|| p.to_path_buf());
        berth_client::TlsFiles {
            ca: some(self.tls.server_ca()),
            cert: some(&self.tls.cert),
            key: some(&self.tls.key),
        }
    }
}

impl SchedulerConfig {
    pub fn heartbeat(&self) -> Duration {
        Duration::from_secs_f64(self.heartbeat_seconds)
    }

    pub fn host_down_after(&self) -> Duration {
        Duration::from_secs_f64(self.host_down_seconds)
    }
}

/// Command line of berth-scheduler. Flags override the config file, which overrides the
/// defaults.
#[derive(Debug, Clone, Default, clap::Parser)]
#[command(
    name = "berth-scheduler",
    version,
    about = "berth scheduler node: places, tracks and stops workers over many berthd hosts"
)]
pub struct SchedulerArgs {
    /// TOML configuration file.
    #[arg(long, env = "BERTH_SCHEDULER_CONFIG")]
    pub config: Option<PathBuf>,
    /// gRPC listen address, HOST:PORT or unix:PATH (repeatable).
    #[arg(long)]
    pub listen: Vec<String>,
    /// Directory for the scheduler's own files.
    #[arg(long)]
    pub state_dir: Option<PathBuf>,
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
}

impl DaemonArgs for SchedulerArgs {
    type Config = SchedulerConfig;

    fn config_file(&self) -> Option<&Path> {
        self.config.as_deref()
    }

    fn print_config(&self) -> bool {
        self.print_config
    }

    fn apply(&self, cfg: &mut SchedulerConfig) {
        if !self.listen.is_empty() {
            cfg.listen = self.listen.clone();
        }
        if let Some(v) = &self.state_dir {
            cfg.state_dir = v.clone();
        }
        if let Some(v) = &self.metrics_listen {
            cfg.metrics_listen = v.clone();
        }
        if let Some(v) = &self.log_format {
            cfg.log_format = v.clone();
        }
        self.security.apply(&mut cfg.socket_group, &mut cfg.tls);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_documented_file_is_the_defaults() {
        let text = include_str!("../../../systemd/berth-scheduler.toml");
        let cfg: SchedulerConfig = toml::from_str(text).unwrap();
        assert_eq!(cfg, SchedulerConfig::default());
        cfg.validate().unwrap();
    }

    #[test]
    fn bad_values_name_their_key() {
        let cfg = SchedulerConfig {
            host_down_seconds: 1.0,
            ..Default::default()
        };
        let e = cfg.validate().unwrap_err().to_string();
        assert!(e.contains("host_down_seconds"), "{e}");
        let e = toml::from_str::<SchedulerConfig>("nope = 1").unwrap_err();
        assert!(e.to_string().contains("nope"), "{e}");
    }
}
