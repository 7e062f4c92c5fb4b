//! The configuration path both daemons share: embedded defaults, a TOML file over them, flags
//! over that ([`DaemonConfig`], [`DaemonArgs`]), and why a configuration is refused.

use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::Serialize;

/// Why a configuration was refused; each message names the file or the key.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("read config {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("parse config {path}: {source}")]
    Parse {
        path: PathBuf,
        #[source]
        source: Box<toml::de::Error>,
    },
    #[error("config key {key}: {message}")]
    Invalid { key: &'static str, message: String },
}

/// A daemon's configuration: embedded defaults, a TOML file over them, flags over that. The one
/// loading path of berthd (berth-host's `Config`) and berth-scheduler (its `SchedulerConfig`).
pub trait DaemonConfig: Sized + Default + Serialize + DeserializeOwned {
    /// Checks values that TOML types cannot.
    fn validate(&self) -> Result<(), ConfigError>;

    /// `text` or `json`.
    fn log_format(&self) -> &str;

    /// Fills in what a file leaves out beyond serde's defaults (berthd: the default kernels
    /// beside the ones a file names).
    fn complete(&mut self) {}

    /// Parses TOML text over the defaults.
    fn from_toml(text: &str) -> Result<Self, ConfigError> {
        let mut cfg: Self = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: PathBuf::new(),
            source: Box::new(e),
        })?;
        cfg.complete();
        cfg.validate()?;
        Ok(cfg)
    }

    /// Reads a TOML file over the defaults.
    fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_toml(&text).map_err(|e| match e {
            ConfigError::Parse { source, .. } => ConfigError::Parse {
                path: path.to_path_buf(),
                source,
            },
            other => other,
        })
    }

    /// The effective configuration as TOML.
    fn to_toml(&self) -> String {
        toml::to_string_pretty(self).unwrap_or_default()
    }
}

/// A daemon's command line: the configuration file it names and the flags over it.
pub trait DaemonArgs: clap::Parser {
    type Config: DaemonConfig;

    fn config_file(&self) -> Option<&Path>;

    /// `--print-config`: print the effective configuration and exit.
    fn print_config(&self) -> bool;

    /// Sets what the flags given say over `cfg`.
    fn apply(&self, cfg: &mut Self::Config);

    /// The configuration these flags select.
    fn load(&self) -> Result<Self::Config, ConfigError> {
        let mut cfg = match self.config_file() {
            Some(p) => Self::Config::from_file(p)?,
            None => Self::Config::default(),
        };
        self.apply(&mut cfg);
        cfg.validate()?;
        Ok(cfg)
    }
}

/// The security flags both daemons take (API.md, "Who may do what").
#[derive(Debug, Clone, Default, clap::Args)]
pub struct SecurityArgs {
    /// Group whose members may connect to the Unix sockets (0660).
    #[arg(long)]
    pub socket_group: Option<String>,
    /// TLS certificate (PEM) of the TCP listeners; with it every TCP listener serves TLS.
    #[arg(long)]
    pub tls_cert: Option<std::path::PathBuf>,
    /// TLS private key (PEM).
    #[arg(long)]
    pub tls_key: Option<std::path::PathBuf>,
    /// CA (PEM) that signs client certificates; set, a client certificate is required.
    #[arg(long)]
    pub tls_client_ca: Option<std::path::PathBuf>,
}

impl SecurityArgs {
    /// Sets what the flags given say over a configuration's keys.
    pub fn apply(&self, socket_group: &mut String, tls: &mut crate::identity::TlsConfig) {
        if let Some(v) = &self.socket_group {
            socket_group.clone_from(v);
        }
        if let Some(v) = &self.tls_cert {
            tls.cert.clone_from(v);
        }
        if let Some(v) = &self.tls_key {
            tls.key.clone_from(v);
        }
        if let Some(v) = &self.tls_client_ca {
            tls.client_ca.clone_from(v);
        }
    }
}
