//! A test cluster: a real `berth-scheduler` on a loopback port and real `berthd` hosts that
//! join it with `--scheduler`, each with its own state dir, bridge and subnet.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::{bin, free_port, pb, scaled, Client, Daemon, DaemonOptions, TestNet};

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
        Self::start_listening(&[], extra, tls).await
    }

    /// [`Self::start_with`], also listening on `more` (`HOST:PORT`); `addr` stays loopback.
    pub async fn start_listening(
        more: &[String],
        extra: &str,
        tls: berth_client::TlsFiles,
    ) -> Result<Self> {
        let tmp = tempfile::Builder::new()
            .prefix("berth-sched-test-")
            .tempdir()?;
        let addr = format!("127.0.0.1:{}", free_port());
        let listen: Vec<String> = std::iter::once(&addr)
            .chain(more)
            .map(|a| format!("\"{a}\""))
            .collect();
        let config = format!(
            "listen = [{}]\nstate_dir = \"{}\"\nmetrics_listen = \"\"\n\
             heartbeat_seconds = {HEARTBEAT_SECONDS}\nhost_down_seconds = {}\n{extra}\n",
            listen.join(", "),
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

/// A test "LAN": a bridge in the root network namespace with an address, and network
/// namespaces plugged into it, one veth each (`eth0` inside, an address of the LAN, no default
/// route: nothing leaves the machine). Names come from a claimed [`TestNet`] slot (`bt<slot>`
/// for the bridge, `bt<slot>-<n>` for namespaces, `bt<slot>h<n>` for their veths' outer ends),
/// and the LAN is that slot's subnet. Dropping it deletes the namespaces (and with them what is
/// in them) and the bridge.
#[derive(Debug)]
pub struct Lan {
    pub net: TestNet,
    /// Namespaces made, by name.
    pub namespaces: Vec<String>,
}

impl Lan {
    pub fn new() -> Result<Self> {
        let net = TestNet::claim()?;
        let lan = Self {
            net,
            namespaces: Vec::new(),
        };
        // What a killed run left on this slot.
        for ns in lan.leftover_namespaces() {
            let _ = ip(&["netns", "del", &ns]);
        }
        ip(&["link", "add", &lan.net.bridge, "type", "bridge"])?;
        // A bridge whose address was never set takes the lowest of its ports' as they join: a
        // host plugged in later could change the scheduler's MAC under the others' ARP entries,
        // and their beats went nowhere until the entries aged (a host DOWN for the rest of the
        // test). Setting it, to what it is, keeps it.
        let mac = std::fs::read_to_string(format!("/sys/class/net/{}/address", lan.net.bridge))?;
        ip(&["link", "set", &lan.net.bridge, "address", mac.trim()])?;
        ip(&[
            "addr",
            "add",
            &format!("{}/{}", lan.address(1), lan.prefix()),
            "dev",
            &lan.net.bridge,
        ])?;
        ip(&["link", "set", &lan.net.bridge, "up"])?;
        Ok(lan)
    }

    fn prefix(&self) -> &str {
        self.net.subnet.rsplit_once('/').map_or("24", |(_, p)| p)
    }

    /// Address `n` of the LAN (1 is the root namespace's, on the bridge).
    pub fn address(&self, n: u32) -> String {
        let base: std::net::Ipv4Addr = self
            .net
            .subnet
            .split('/')
            .next()
            .unwrap_or_default()
            .parse()
            .unwrap_or(std::net::Ipv4Addr::UNSPECIFIED);
        std::net::Ipv4Addr::from(u32::from(base) + n).to_string()
    }

    /// Namespaces named after this slot that exist now.
    pub fn leftover_namespaces(&self) -> Vec<String> {
        let prefix = format!("{}-", self.net.bridge);
        std::fs::read_dir("/run/netns")
            .map(|rd| {
                rd.flatten()
                    .filter_map(|e| e.file_name().into_string().ok())
                    .filter(|n| n.starts_with(&prefix))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Makes namespace `bt<slot>-<n>` on the LAN at address `n`; returns its name.
    pub fn add_namespace(&mut self, n: u32) -> Result<String> {
        let name = format!("{}-{n}", self.net.bridge);
        let outer = format!("{}h{n}", self.net.bridge);
        ip(&["netns", "add", &name])?;
        self.namespaces.push(name.clone());
        ip(&[
            "link", "add", &outer, "type", "veth", "peer", "name", "eth0", "netns", &name,
        ])?;
        ip(&["link", "set", &outer, "master", &self.net.bridge, "up"])?;
        let inside = |args: &[&str]| -> Result<()> {
            let mut full = vec!["-n", name.as_str()];
            full.extend_from_slice(args);
            ip(&full)
        };
        inside(&["link", "set", "lo", "up"])?;
        inside(&[
            "addr",
            "add",
            &format!("{}/{}", self.address(n), self.prefix()),
            "dev",
            "eth0",
        ])?;
        inside(&["link", "set", "eth0", "up"])?;
        Ok(name)
    }

    /// The file of namespace `name` (for `DaemonOptions::netns` and `nsenter --net=`).
    pub fn path(name: &str) -> PathBuf {
        PathBuf::from("/run/netns").join(name)
    }

    /// Runs `args` in namespace `name` (`nsenter --net=`) and returns its stdout.
    pub fn run_in(name: &str, args: &[&str]) -> Result<String> {
        let out = Command::new("nsenter")
            .arg(format!("--net={}", Self::path(name).display()))
            .args(args)
            .output()
            .context("nsenter")?;
        if !out.status.success() {
            bail!(
                "{args:?} in {name}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

impl Drop for Lan {
    fn drop(&mut self) {
        for ns in self.namespaces.drain(..) {
            let _ = ip(&["netns", "del", &ns]);
        }
        // TestNet's drop deletes the bridge.
    }
}

/// `ip ARGS`, failing with its stderr.
pub fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip").args(args).output().context("ip")?;
    if !out.status.success() {
        bail!("ip {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}
