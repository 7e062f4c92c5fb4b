//! A test cluster: a real `berth-scheduler` on a loopback port and real `berthd` hosts that
//! join it with `--scheduler`, each with its own state dir, bridge and subnet.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::{bin, free_port, pb, scaled, Client, Daemon, DaemonOptions};

/// Beat interval of the test scheduler (fast, so tests do not wait).
pub const HEARTBEAT_SECONDS: f64 = 0.2;

/// Seconds without beats before a test host is DOWN.
pub fn host_down_seconds() -> f64 {
    scaled(Duration::from_secs(2)).as_secs_f64()
}

/// A running `berth-scheduler`. Dropping it stops it.
#[derive(Debug)]
pub struct SchedulerNode {
    child: Option<Child>,
    _tmp: tempfile::TempDir,
    pub addr: String,
    pub config_path: PathBuf,
    pub log_path: PathBuf,
    /// What clients present to it (empty: plaintext).
    pub tls: berth_client::TlsFiles,
}

impl SchedulerNode {
    pub async fn start() -> Result<Self> {
        Self::start_with("", berth_client::TlsFiles::default()).await
    }

    /// A scheduler with `extra` TOML in its config, reached with `tls` (its `[tls]` must match).
    pub async fn start_with(extra: &str, tls: berth_client::TlsFiles) -> Result<Self> {
        let tmp = tempfile::Builder::new()
            .prefix("berth-sched-test-")
            .tempdir()?;
        let addr = format!("127.0.0.1:{}", free_port());
        let config = format!(
            "listen = [\"{addr}\"]\nstate_dir = \"{}\"\nmetrics_listen = \"\"\n\
             heartbeat_seconds = {HEARTBEAT_SECONDS}\nhost_down_seconds = {}\n{extra}\n",
            tmp.path().join("state").display(),
            host_down_seconds(),
        );
        let config_path = tmp.path().join("scheduler.toml");
        std::fs::write(&config_path, config)?;
        let mut s = Self {
            child: None,
            log_path: tmp.path().join("scheduler.log"),
            _tmp: tmp,
            addr,
            config_path,
            tls,
        };
        s.spawn().await?;
        Ok(s)
    }

    async fn spawn(&mut self) -> Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)?;
        let child = Command::new(bin("berth-scheduler"))
            .arg("--config")
            .arg(&self.config_path)
            .env(
                "BERTH_LOG",
                "info,berth_host=debug,berth_server=debug,berth_scheduler=debug,berth_sys=debug",
            )
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("start berth-scheduler")?;
        self.child = Some(child);
        let deadline = Instant::now() + scaled(Duration::from_secs(20));
        loop {
            if let Some(st) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                bail!("berth-scheduler exited with {st}:\n{}", self.log());
            }
            if let Ok(c) = Client::connect_with(&self.addr, &self.tls).await {
                if c.cluster()
                    .list_hosts(pb::ListHostsRequest {})
                    .await
                    .is_ok()
                {
                    return Ok(());
                }
            }
            if Instant::now() > deadline {
                bail!("berth-scheduler did not answer:\n{}", self.log());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    pub async fn client(&self) -> Result<Client> {
        Ok(Client::connect_with(&self.addr, &self.tls).await?)
    }

    /// Sends `signal` and waits for the scheduler to exit.
    pub fn stop(&mut self, signal: i32) {
        if let Some(mut c) = self.child.take() {
            // SAFETY: kill(2) with a pid we spawned and a signal number.
            unsafe { libc::kill(c.id() as i32, signal) };
            let _ = c.wait();
        }
    }

    /// The scheduler's pid while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Starts it again on the same config and state dir.
    pub async fn restart(&mut self) -> Result<()> {
        self.spawn().await
    }

    /// Hosts as the scheduler lists them.
    pub async fn hosts(&self) -> Result<Vec<pb::ClusterHost>> {
        Ok(self
            .client()
            .await?
            .cluster()
            .list_hosts(pb::ListHostsRequest {})
            .await?
            .into_inner()
            .hosts)
    }

    /// Waits until `names` are all in `state` (20 s, scaled).
    pub async fn wait_hosts(&self, names: &[&str], state: pb::HostState) -> Result<()> {
        let deadline = Instant::now() + scaled(Duration::from_secs(20));
        loop {
            let hosts = self.hosts().await.unwrap_or_default();
            let ok = names.iter().all(|n| {
                hosts.iter().any(|h| {
                    h.state == state as i32 && h.info.as_ref().is_some_and(|i| i.name == *n)
                })
            });
            if ok {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("hosts {names:?} not {state:?}: {hosts:#?}\n{}", self.log());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for SchedulerNode {
    fn drop(&mut self) {
        self.stop(libc::SIGTERM);
    }
}

/// A host daemon of `cpu` cores and `memory_gb` GiB joined to `scheduler`.
pub async fn start_host(scheduler: &SchedulerNode, cpu: f64, memory_gb: f64) -> Result<Daemon> {
    start_host_with(scheduler, cpu, memory_gb, "").await
}

/// [`start_host`] with `tables` (TOML tables, after `[resources]`) in its config.
pub async fn start_host_with(
    scheduler: &SchedulerNode,
    cpu: f64,
    memory_gb: f64,
    tables: &str,
) -> Result<Daemon> {
    Daemon::start_with(DaemonOptions {
        tcp: true,
        config: format!(
            "scheduler = \"{}\"\n[resources]\ncpu = {cpu:.1}\nmemory_gb = {memory_gb:.1}\n{tables}",
            scheduler.addr
        ),
        ..Default::default()
    })
    .await
}
