//! Worker networks: a network namespace per worker, bind-mounted on a file so that it outlives
//! the thread that made it and the daemon itself, and joined by the shim's child before exec.
//!
//! Bridge-mode workers are **routed**, not bridged: each gets a veth pair whose worker end is
//! created directly inside its namespace as `eth0` (one request; moving a veth costs 20 ms),
//! with the worker's address as a /32, a permanent neighbour entry and a default route to the
//! host end; the host end carries no address, only a /32 route to the worker (source: the
//! gateway) and forwarding. Neither end generates an IPv6 link-local address, so neither
//! sends neighbour discovery, and the host end has IPv6 off altogether (else each adds a route
//! to the host's IPv6 table, which the kernel walks on every link change). Per-link settings go
//! through netlink, never /proc/sys inside a namespace: with thousands of namespaces a
//! /proc/sys/net lookup there costs milliseconds. The one exception, IPv6 off on the host end
//! (no netlink attribute sets it), is a host-namespace write made mostly by the pool thread. So
//! workers reach each other and the host through the host's routing
//! table, and no Linux bridge with its 1023-port limit and neighbour-discovery floods sits in
//! the path: the cost of a launch does not grow with the number of workers. The daemon's bridge
//! exists all the same, without ports: it holds the gateway address and the subnet route, and
//! names this daemon's network.
//!
//! With egress off (the default), two policy rules keep worker traffic inside the subnet and
//! the host: `from SUBNET to SUBNET lookup main`, then `from SUBNET unreachable`. With egress on,
//! the rules go and one `nft` (or `iptables`) command at start-up masquerades the subnet.
//!
//! Everything runs in process over rtnetlink (never one `ip` process per worker), on dedicated
//! threads that never return to a shared pool: a thread `unshare`s into the new namespace,
//! bind-mounts it, opens a netlink socket there and `setns`es back; the veth is created from the
//! host side with the peer's `IFLA_NET_NS_FD` set. Requests go out batched over a blocking
//! socket: one `sendmsg` carries every message of a step.
//!
//! Making a namespace and a veth pair costs ~1 ms of kernel work that does not run in parallel
//! (it is serialised on the rtnl lock), so a pool thread keeps `pool` namespaces ready while no
//! launch is in progress: loopback up, the pair made (host end `bq<random>`, down). A launch
//! takes one, bind-mounts it, labels the host end and sets addresses and routes
//! in two batched requests (~0.1 ms). Ready namespaces are held by fds only and die with the
//! daemon.
//!
//! Removal is an unmount and an unlink: the namespace dies with its last process, taking its
//! `eth0`, the host end of the pair and the route through it along (deleting a veth explicitly
//! costs ~40 ms).

use std::collections::HashSet;
use std::ffi::CString;
use std::fs;
use std::io::{self, Write as _};
use std::net::{IpAddr, Ipv4Addr};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};

use rtnetlink::packet_core::{
    NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_CREATE, NLM_F_DUMP, NLM_F_EXCL,
    NLM_F_REPLACE, NLM_F_REQUEST,
};
use rtnetlink::packet_route::link::{
    AfSpecInet, AfSpecInet6, AfSpecUnspec, In6AddrGenMode, InetDevConf, InfoData, InfoVeth,
    LinkAttribute, LinkMessage,
};
use rtnetlink::packet_route::neighbour::{
    NeighbourAddress, NeighbourAttribute, NeighbourMessage, NeighbourState,
};
use rtnetlink::packet_route::route::RouteScope;
use rtnetlink::packet_route::rule::{RuleAction, RuleAttribute, RuleMessage};
use rtnetlink::packet_route::{AddressFamily, RouteNetlinkMessage};
use rtnetlink::{
    AddressMessageBuilder, LinkBridge, LinkMessageBuilder, LinkUnspec, LinkVeth,
    RouteMessageBuilder,
};

use berth_core::ipam::Subnet;

use crate::fs_magic;

/// MAC address of every host end of a worker veth. Each pair is its own link, so one address
/// serves all of them, and each worker's neighbour entry for its gateway is known in advance.
pub const HOST_END_MAC: [u8; 6] = [0xee, 0xee, 0xee, 0xee, 0xee, 0xee];

/// Prefix of the host end of a worker veth made on demand: `bv` + the worker id (14 characters).
pub const HOST_END_PREFIX: &str = "bv";

/// Prefix of the host end of a veth made ahead in a ready namespace: `bq` + 12 random
/// characters. It keeps its name when a worker gets it (a rename re-registers the link's sysfs
/// and sysctl entries: ~0.2 ms); the alias names the worker.
pub const READY_END_PREFIX: &str = "bq";

/// Prefix of the alias (`ip link` shows it) of the host end of every worker veth: `berth:` +
/// the worker id.
pub const HOST_END_ALIAS_PREFIX: &str = "berth:";

/// Priority of the rule that keeps worker-to-worker traffic routed; the next one refuses
/// everything else from the subnet when egress is off.
pub const RULE_PRIORITY: u32 = 32000;

/// What network a worker gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WorkerNet {
    /// Its own namespace with loopback only.
    Isolated,
    /// Its own namespace with `eth0` at `ip`, routed through the host.
    Routed { ip: Ipv4Addr },
}

/// Failure of a network operation; says on what, at which step, and why.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("network of worker {id}: {step}: {source}")]
    Worker {
        id: String,
        step: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("host network {bridge}: {step}: {source}")]
    Host {
        bridge: String,
        step: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("worker networks unavailable: {0}")]
    Unavailable(String),
}

/// Worker network namespaces of one daemon. A trait so that the supervisor can be tested with a
/// recording fake.
pub trait Netns: Send + Sync {
    /// Why workers cannot get their own network on this host, if they cannot.
    fn unavailable(&self) -> Option<String>;
    /// The subnet and gateway of bridge-mode workers.
    fn subnet(&self) -> Option<Subnet>;
    /// The nsfs file that worker `id`'s namespace is bind-mounted on.
    fn path(&self, id: &str) -> PathBuf;
    /// Starts making worker `id`'s namespace and network; on error nothing of it is left. A
    /// batch submits every worker's network first and waits for each just before its spawn, so
    /// the namespace threads work ahead of the spawns.
    fn begin(&self, id: &str, net: WorkerNet) -> PendingNet;
    /// Makes worker `id`'s namespace and network and waits for it.
    fn create(&self, id: &str, net: WorkerNet) -> Result<PathBuf, NetError> {
        self.begin(id, net).wait()
    }
    /// Whether worker `id`'s namespace exists.
    fn exists(&self, id: &str) -> bool;
    /// Removes worker `id`'s namespace; its veth pair and host route go with it. Idempotent.
    fn remove(&self, id: &str) -> Result<(), NetError>;
    /// Ids of the workers that have a namespace file (mounted or left half-made).
    fn list(&self) -> Vec<String>;
    /// Namespaces made ahead of need, ready for bridge-mode workers.
    fn ready(&self) -> usize {
        0
    }
}

/// A worker network being made. Dropped without [`PendingNet::wait`], what was made is removed.
#[derive(Debug)]
pub struct PendingNet(Option<PendingInner>);

#[derive(Debug)]
enum PendingInner {
    Ready(Result<PathBuf, NetError>),
    Waiting {
        id: String,
        rx: mpsc::Receiver<Result<PathBuf, NetError>>,
    },
}

impl PendingNet {
    pub fn ready(r: Result<PathBuf, NetError>) -> Self {
        Self(Some(PendingInner::Ready(r)))
    }

    /// Blocks until the network is made (or has failed).
    pub fn wait(mut self) -> Result<PathBuf, NetError> {
        match self.0.take() {
            Some(PendingInner::Ready(r)) => r,
            Some(PendingInner::Waiting { rx, .. }) => rx.recv().unwrap_or_else(|_| {
                Err(NetError::Unavailable(
                    "namespace threads have stopped".into(),
                ))
            }),
            None => Err(NetError::Unavailable("network already taken".into())),
        }
    }
}

impl Drop for PendingNet {
    fn drop(&mut self) {
        match self.0.take() {
            Some(PendingInner::Ready(Ok(path))) => {
                let id = path
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default();
                let _ = remove_ns_file(&id, &path);
            }
            // Made after all: the namespace thread removes it when its reply finds no reader.
            // Made already: it waits in the channel.
            Some(PendingInner::Waiting { id, rx }) => {
                drop(rx.try_recv().map(|r| r.map(|p| remove_ns_file(&id, &p))));
            }
            _ => {}
        }
    }
}

/// How a host's worker network is set up.
#[derive(Debug, Clone)]
pub struct NetConfig {
    /// Where worker namespaces are bind-mounted (`<state dir>/netns`).
    pub dir: PathBuf,
    pub bridge: String,
    pub subnet: Subnet,
    /// Masquerade worker traffic leaving the subnet (one nft/iptables command at start-up).
    pub egress: bool,
    /// Dedicated namespace threads.
    pub threads: usize,
    /// Namespaces kept ready (loopback up, veth pair made) for bridge-mode launches: making
    /// one costs ~1 ms of mostly serialised kernel work, taking a ready one ~0.1 ms.
    pub pool: usize,
}

/// Name of the host end of worker `id`'s veth.
pub fn host_end_name(id: &str) -> String {
    let mut n = format!("{HOST_END_PREFIX}{id}");
    n.truncate(15);
    n
}

/// Checks a link name the way the kernel does (1 to 15 bytes, no '/', ':' or whitespace).
pub fn valid_link_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 15
        && name != "."
        && name != ".."
        && !name
            .bytes()
            .any(|b| b == b'/' || b == b':' || b.is_ascii_whitespace() || b == 0)
}

/// The nft table name of the daemon whose bridge is `bridge`.
pub fn nft_table(bridge: &str) -> String {
    format!(
        "berth_{}",
        bridge.replace(|c: char| !c.is_ascii_alphanumeric(), "_")
    )
}

/// The nft script that masquerades `subnet` leaving it, except to the cluster's destinations
/// (`cluster`: the other hosts' subnets and addresses, as network and prefix length), which
/// see the workers' real addresses. Idempotent and atomic: it replaces its own table.
pub fn nft_egress_script(bridge: &str, subnet: &Subnet, cluster: &[(Ipv4Addr, u8)]) -> String {
    let table = nft_table(bridge);
    let elements = if cluster.is_empty() {
        String::new()
    } else {
        let list: Vec<String> = cluster.iter().map(|(n, p)| format!("{n}/{p}")).collect();
        format!("\t\telements = {{ {} }}\n", list.join(", "))
    };
    format!(
        "table ip {table} {{}}\n\
         delete table ip {table}\n\
         table ip {table} {{\n\
         \tset cluster {{\n\
         \t\ttype ipv4_addr\n\
         \t\tflags interval\n\
         \t\tauto-merge\n\
         {elements}\
         \t}}\n\
         \tchain postrouting {{\n\
         \t\ttype nat hook postrouting priority 100; policy accept;\n\
         \t\tip saddr {subnet} ip daddr @cluster accept\n\
         \t\tip saddr {subnet} ip daddr != {subnet} masquerade\n\
         \t}}\n\
         }}\n"
    )
}

/// Worker networks that are not available on this host (no privileges, not configured):
/// host-mode workers still run.
#[derive(Debug, Clone)]
pub struct NoNetwork {
    pub reason: String,
    pub dir: PathBuf,
}

impl Netns for NoNetwork {
    fn unavailable(&self) -> Option<String> {
        Some(self.reason.clone())
    }
    fn subnet(&self) -> Option<Subnet> {
        None
    }
    fn path(&self, id: &str) -> PathBuf {
        self.dir.join(id)
    }
    fn begin(&self, _: &str, _: WorkerNet) -> PendingNet {
        PendingNet::ready(Err(NetError::Unavailable(self.reason.clone())))
    }
    fn exists(&self, id: &str) -> bool {
        is_nsfs(&self.path(id))
    }
    fn remove(&self, id: &str) -> Result<(), NetError> {
        remove_ns_file(id, &self.path(id))
    }
    fn list(&self) -> Vec<String> {
        list_dir(&self.dir)
    }
}

/// A recording fake: namespaces are names in a set.
#[derive(Debug, Default)]
pub struct FakeNetns {
    pub subnet: Option<Subnet>,
    pub live: Mutex<HashSet<String>>,
    /// Every create and remove, in order: `+id` / `-id`.
    pub log: Mutex<Vec<String>>,
    /// Creating this worker's network fails.
    pub fail_for: Mutex<Option<String>>,
}

impl Netns for FakeNetns {
    fn unavailable(&self) -> Option<String> {
        None
    }
    fn subnet(&self) -> Option<Subnet> {
        self.subnet
    }
    fn path(&self, id: &str) -> PathBuf {
        PathBuf::from("/fake/netns").join(id)
    }
    fn begin(&self, id: &str, _: WorkerNet) -> PendingNet {
        if self.fail_for.lock().unwrap().as_deref() == Some(id) {
            return PendingNet::ready(Err(NetError::Worker {
                id: id.into(),
                step: "create veth",
                source: io::Error::from_raw_os_error(libc::EPERM),
            }));
        }
        self.live.lock().unwrap().insert(id.into());
        self.log.lock().unwrap().push(format!("+{id}"));
        PendingNet::ready(Ok(self.path(id)))
    }
    fn exists(&self, id: &str) -> bool {
        self.live.lock().unwrap().contains(id)
    }
    fn remove(&self, id: &str) -> Result<(), NetError> {
        if self.live.lock().unwrap().remove(id) {
            self.log.lock().unwrap().push(format!("-{id}"));
        }
        Ok(())
    }
    fn list(&self) -> Vec<String> {
        self.live.lock().unwrap().iter().cloned().collect()
    }
}

struct Job {
    id: String,
    net: WorkerNet,
    reply: mpsc::SyncSender<Result<PathBuf, NetError>>,
}

/// The real worker networks of one host: its bridge, its rules, and a few dedicated threads
/// that make namespaces.
pub struct HostNetwork {
    cfg: NetConfig,
    jobs: Mutex<Option<mpsc::Sender<Job>>>,
    pool: Arc<Pool>,
}

/// A namespace made ahead of need: loopback up and a veth pair whose worker end is `eth0`
/// inside and whose host end is `bq<random>`, both down. Held by its fd only (no bind mount),
/// so it dies with the daemon.
struct Ready {
    ns: OwnedFd,
    inner: Rtnl,
    host_end: String,
    host_index: u32,
    eth0: u32,
}

/// The ready namespaces and what the refill thread waits on.
struct Pool {
    target: usize,
    ready: Mutex<Vec<Ready>>,
    /// Jobs submitted and not done: refilling yields to launches.
    in_flight: std::sync::atomic::AtomicUsize,
    changed: std::sync::Condvar,
    stop: std::sync::atomic::AtomicBool,
}

impl Pool {
    fn take(&self) -> Option<Ready> {
        let r = self.ready.lock().unwrap_or_else(|p| p.into_inner()).pop();
        self.changed.notify_all();
        r
    }

    fn len(&self) -> usize {
        self.ready.lock().unwrap_or_else(|p| p.into_inner()).len()
    }
}

impl std::fmt::Debug for HostNetwork {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostNetwork")
            .field("bridge", &self.cfg.bridge)
            .field("subnet", &self.cfg.subnet.to_string())
            .finish()
    }
}

impl HostNetwork {
    /// Sets up the host side (bridge with the gateway address, rules, egress) and starts the
    /// namespace threads. Blocking.
    pub fn start(cfg: NetConfig) -> Result<Self, NetError> {
        let host_err = |step: &'static str| {
            let bridge = cfg.bridge.clone();
            move |source: io::Error| NetError::Host {
                bridge: bridge.clone(),
                step,
                source,
            }
        };
        if !valid_link_name(&cfg.bridge) {
            return Err(host_err("check name")(io::Error::new(
                io::ErrorKind::InvalidInput,
                "not a valid link name (1 to 15 characters, no '/', ':' or spaces)",
            )));
        }
        fs::create_dir_all(&cfg.dir).map_err(host_err("create namespace dir"))?;
        mount_namespace_fs(&cfg.dir);
        let mut nl = Rtnl::open().map_err(host_err("open netlink"))?;
        setup_host(&mut nl, &cfg).map_err(|(step, e)| host_err(step)(e))?;
        let host_ns = fs::File::open("/proc/thread-self/ns/net")
            .map(OwnedFd::from)
            .map_err(host_err("open host namespace"))?;
        let host_ns = Arc::new(host_ns);
        let (tx, rx) = mpsc::channel::<Job>();
        let rx = Arc::new(Mutex::new(rx));
        let pool = Arc::new(Pool {
            target: cfg.pool,
            ready: Mutex::new(Vec::new()),
            in_flight: Default::default(),
            changed: Default::default(),
            stop: Default::default(),
        });
        for i in 0..cfg.threads.max(1) {
            spawn_ns_thread(i, cfg.clone(), host_ns.clone(), rx.clone(), pool.clone())
                .map_err(host_err("start namespace thread"))?;
        }
        if cfg.pool > 0 {
            spawn_refill_thread(cfg.clone(), host_ns.clone(), pool.clone())
                .map_err(host_err("start namespace thread"))?;
        }
        tracing::info!(
            bridge = %cfg.bridge,
            subnet = %cfg.subnet,
            gateway = %cfg.subnet.gateway(),
            egress = cfg.egress,
            pool = cfg.pool,
            "worker network ready (routed /32 veths)"
        );
        Ok(Self {
            cfg,
            jobs: Mutex::new(Some(tx)),
            pool,
        })
    }

    pub fn config(&self) -> &NetConfig {
        &self.cfg
    }
}

impl Drop for HostNetwork {
    fn drop(&mut self) {
        // Closing the queue ends the threads; the ready namespaces go with the pool.
        self.jobs.lock().unwrap_or_else(|p| p.into_inner()).take();
        self.pool
            .stop
            .store(true, std::sync::atomic::Ordering::SeqCst);
        self.pool.changed.notify_all();
        // A daemon that leaves no worker network behind leaves no mount either.
        release_namespace_fs(&self.cfg.dir);
    }
}

impl Netns for HostNetwork {
    fn unavailable(&self) -> Option<String> {
        None
    }

    fn subnet(&self) -> Option<Subnet> {
        Some(self.cfg.subnet)
    }

    fn path(&self, id: &str) -> PathBuf {
        self.cfg.dir.join(id)
    }

    fn begin(&self, id: &str, net: WorkerNet) -> PendingNet {
        let (reply, rx) = mpsc::sync_channel(1);
        let gone = || NetError::Unavailable("namespace threads have stopped".into());
        let jobs = self.jobs.lock().unwrap_or_else(|p| p.into_inner());
        let Some(tx) = jobs.as_ref() else {
            return PendingNet::ready(Err(gone()));
        };
        let job = Job {
            id: id.to_owned(),
            net,
            reply,
        };
        self.pool
            .in_flight
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        match tx.send(job) {
            Ok(()) => PendingNet(Some(PendingInner::Waiting {
                id: id.to_owned(),
                rx,
            })),
            Err(_) => PendingNet::ready(Err(gone())),
        }
    }

    fn exists(&self, id: &str) -> bool {
        is_nsfs(&self.path(id))
    }

    fn remove(&self, id: &str) -> Result<(), NetError> {
        remove_ns_file(id, &self.path(id))
    }

    fn list(&self) -> Vec<String> {
        list_dir(&self.cfg.dir)
    }

    fn ready(&self) -> usize {
        self.pool.len()
    }
}

fn list_dir(dir: &Path) -> Vec<String> {
    fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .filter_map(|e| e.file_name().into_string().ok())
                .filter(|n| berth_core::is_valid_id(n))
                .collect()
        })
        .unwrap_or_default()
}

/// Whether `path` is a mounted namespace file.
pub fn is_nsfs(path: &Path) -> bool {
    const NSFS_MAGIC: i64 = 0x6e73_6673;
    fs_magic(path) == Some(NSFS_MAGIC)
}

const TMPFS_MAGIC: i64 = 0x0102_1994;

/// Puts the namespace files on a tmpfs of their own, mounted on `dir` unless it is one already.
/// Each worker's file is made at its launch and removed at its end: on a disk file system that
/// is an inode allocated and freed per worker, and an ext4 without a journal then scans past
/// every inode freed in the last minutes at each allocation (1.7 ms per worker here with workers
/// ending around it). A tmpfs outlives the daemon as the files on it must (workers keep their
/// namespaces across a restart); namespaces end at a reboot anyway. Files a predecessor left on
/// the disk are never hidden: with any in `dir` it stays as it is. Where the mount is refused
/// (a container without the right), the files stay on the disk.
fn mount_namespace_fs(dir: &Path) {
    let empty = fs::read_dir(dir).is_ok_and(|mut rd| rd.next().is_none());
    if !empty || fs_magic(dir) == Some(TMPFS_MAGIC) {
        return;
    }
    let Ok(c) = CString::new(dir.as_os_str().as_bytes()) else {
        return;
    };
    // SAFETY: every argument is a valid NUL-terminated string; tmpfs reads its options as text.
    let r = unsafe {
        libc::mount(
            c"berth-netns".as_ptr(),
            c.as_ptr(),
            c"tmpfs".as_ptr(),
            libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
            c"mode=0700".as_ptr().cast(),
        )
    };
    if r != 0 {
        tracing::warn!(
            dir = %dir.display(),
            error = %io::Error::last_os_error(),
            "namespace files stay on the state dir's file system (no tmpfs)"
        );
    }
}

/// Unmounts the tmpfs of [`mount_namespace_fs`] from `dir` once no namespace file is left on it.
fn release_namespace_fs(dir: &Path) {
    if fs_magic(dir) != Some(TMPFS_MAGIC) || !list_dir(dir).is_empty() {
        return;
    }
    if let Ok(c) = CString::new(dir.as_os_str().as_bytes()) {
        // SAFETY: c is a valid NUL-terminated path.
        unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
    }
}

fn remove_ns_file(id: &str, path: &Path) -> Result<(), NetError> {
    let err = |step, source| NetError::Worker {
        id: id.to_owned(),
        step,
        source,
    };
    let c = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| err("path", io::Error::from(io::ErrorKind::InvalidInput)))?;
    // MNT_DETACH: a process that still has the file open (a shim between open and setns) keeps
    // its reference; the namespace then dies with the last one.
    // SAFETY: c is a valid NUL-terminated path.
    if unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) } != 0 {
        let e = io::Error::last_os_error();
        // EINVAL: not a mount point (a half-made namespace); ENOENT: already gone.
        if !matches!(e.raw_os_error(), Some(libc::EINVAL) | Some(libc::ENOENT)) {
            return Err(err("unmount namespace", e));
        }
    }
    match fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(err("remove namespace file", e)),
    }
}

fn spawn_ns_thread(
    i: usize,
    cfg: NetConfig,
    host_ns: Arc<OwnedFd>,
    rx: Arc<Mutex<mpsc::Receiver<Job>>>,
    pool: Arc<Pool>,
) -> io::Result<()> {
    std::thread::Builder::new()
        .name(format!("berth-netns-{i}"))
        .spawn(move || {
            let mut host = match Rtnl::open() {
                Ok(s) => s,
                Err(e) => {
                    tracing::error!(error = %e, "namespace thread: netlink socket");
                    return;
                }
            };
            loop {
                let job = {
                    let rx = rx.lock().unwrap_or_else(|p| p.into_inner());
                    match rx.recv() {
                        Ok(j) => j,
                        Err(_) => return,
                    }
                };
                let ready = match job.net {
                    WorkerNet::Routed { .. } => pool.take(),
                    WorkerNet::Isolated => None,
                };
                let assigned = match (ready, job.net) {
                    (Some(r), WorkerNet::Routed { ip }) => {
                        match assign_ready(&cfg, &mut host, r, &job.id, ip) {
                            Ok(path) => Some(Ok(path)),
                            Err(e) => {
                                // Something took the ready pair apart: make one on demand.
                                tracing::warn!(error = %e, "ready namespace unusable; making one");
                                None
                            }
                        }
                    }
                    _ => None,
                };
                let (res, healthy) = match assigned {
                    Some(r) => (r, true),
                    None => make_worker_net(&cfg, &host_ns, &mut host, &job.id, job.net),
                };
                if let Err(mpsc::SendError(Ok(path))) = job.reply.send(res) {
                    // Nobody waits for it any more: it must not outlive the request.
                    let _ = remove_ns_file(&job.id, &path);
                }
                pool.in_flight
                    .fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
                pool.changed.notify_all();
                if !healthy {
                    // This thread is stuck in a worker's namespace: never reuse it. A fresh one
                    // takes its place.
                    tracing::error!(
                        thread = i,
                        "namespace thread could not return to the host namespace; replacing it"
                    );
                    if let Err(e) =
                        spawn_ns_thread(i, cfg.clone(), host_ns.clone(), rx.clone(), pool.clone())
                    {
                        tracing::error!(error = %e, "namespace thread not replaced");
                    }
                    return;
                }
            }
        })
        .map(|_| ())
}

/// The thread that keeps the pool of ready namespaces full, while no launch is in progress.
fn spawn_refill_thread(cfg: NetConfig, host_ns: Arc<OwnedFd>, pool: Arc<Pool>) -> io::Result<()> {
    use std::sync::atomic::Ordering;
    std::thread::Builder::new()
        .name("berth-netns-pool".into())
        .spawn(move || {
            let mut host = match Rtnl::open() {
                Ok(s) => s,
                Err(e) => {
                    tracing::error!(error = %e, "namespace pool thread: netlink socket");
                    return;
                }
            };
            let mut failures = 0u32;
            loop {
                {
                    let guard = pool.ready.lock().unwrap_or_else(|p| p.into_inner());
                    if pool.stop.load(Ordering::SeqCst) {
                        return;
                    }
                    if guard.len() >= pool.target || pool.in_flight.load(Ordering::SeqCst) > 0 {
                        let _ = pool
                            .changed
                            .wait_timeout(guard, std::time::Duration::from_millis(50));
                        continue;
                    }
                }
                match make_ready(&host_ns, &mut host) {
                    Ok(r) => {
                        failures = 0;
                        pool.ready
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .push(r);
                    }
                    Err((step, e, healthy)) => {
                        failures += 1;
                        if failures == 1 {
                            tracing::warn!(step, error = %e, "ready namespace not made");
                        }
                        if !healthy {
                            tracing::error!("namespace pool thread could not return to the host namespace; replacing it");
                            if let Err(e) = spawn_refill_thread(cfg.clone(), host_ns.clone(), pool.clone()) {
                                tracing::error!(error = %e, "namespace pool thread not replaced");
                            }
                            return;
                        }
                        std::thread::sleep(std::time::Duration::from_millis(
                            (100u64 << failures.min(6)).min(5_000),
                        ));
                    }
                }
            }
        })
        .map(|_| ())
}

/// Makes a ready namespace (see [`Ready`]). The error says whether the thread is back in the
/// host namespace.
fn make_ready(
    host_ns: &OwnedFd,
    host: &mut Rtnl,
) -> Result<Ready, (&'static str, io::Error, bool)> {
    // SAFETY: unshare with a namespace flag affects only the calling thread's network namespace.
    if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
        return Err(("unshare", io::Error::last_os_error(), true));
    }
    let inside = (|| -> StepResult<(OwnedFd, Rtnl)> {
        let ns = at(
            "open namespace",
            fs::File::open("/proc/thread-self/ns/net").map(OwnedFd::from),
        )?;
        let nl = at("open netlink", Rtnl::open())?;
        Ok((ns, nl))
    })();
    // SAFETY: host_ns is an open nsfs fd of the daemon's network namespace.
    if unsafe { libc::setns(host_ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err((
            "return to the host namespace",
            io::Error::last_os_error(),
            false,
        ));
    }
    let (ns, mut inner) = inside.map_err(|(s, e)| (s, e, true))?;
    let host_end = berth_core::ready_name(READY_END_PREFIX);
    let built = (|| -> StepResult<(u32, u32)> {
        at("bring lo up", inner.one(lo_up(), 0))?;
        create_veth(host, &mut inner, &host_end, &ns)
    })();
    match built {
        Ok((host_index, eth0)) => Ok(Ready {
            ns,
            inner,
            host_end,
            host_index,
            eth0,
        }),
        // Dropping the fd and the socket frees the namespace and the pair with it.
        Err((s, e)) => Err((s, e, true)),
    }
}

/// Gives a ready namespace to worker `id` at `ip`: bind mount, host end labelled and up
/// with its route, eth0 up with the address, neighbour entry and default route.
fn assign_ready(
    cfg: &NetConfig,
    host: &mut Rtnl,
    mut r: Ready,
    id: &str,
    ip: Ipv4Addr,
) -> Result<PathBuf, NetError> {
    let path = cfg.dir.join(id);
    let fail = |step: &'static str, source: io::Error| NetError::Worker {
        id: id.to_owned(),
        step,
        source,
    };
    if is_nsfs(&path) {
        return Err(fail(
            "create namespace",
            io::Error::from_raw_os_error(libc::EEXIST),
        ));
    }
    fs::File::create(&path).map_err(|e| fail("create namespace file", e))?;
    let res = (|| -> StepResult<()> {
        let src =
            CString::new(format!("/proc/thread-self/fd/{}", r.ns.as_raw_fd())).map_err(|_| {
                (
                    "bind-mount namespace",
                    io::Error::from(io::ErrorKind::InvalidInput),
                )
            })?;
        bind_mount_namespace(&src, &path)?;
        configure_addresses(cfg, host, &mut r.inner, r.host_index, id, r.eth0, ip)
    })();
    match res {
        Ok(()) => Ok(path),
        Err((step, e)) => {
            let _ = remove_ns_file(id, &path);
            tracing::debug!(ready = %r.host_end, "ready namespace dropped after a failed assignment");
            Err(fail(step, e))
        }
    }
}

pub(crate) fn write_sysctl(path: &str, value: &str) -> io::Result<()> {
    match fs::OpenOptions::new().write(true).open(path) {
        Ok(mut f) => f.write_all(value.as_bytes()),
        // No IPv6 in this kernel: nothing to turn off.
        Err(e) if e.kind() == io::ErrorKind::NotFound && path.contains("/ipv6/") => Ok(()),
        Err(e) => Err(io::Error::new(e.kind(), format!("{path}: {e}"))),
    }
}

type StepResult<T> = Result<T, (&'static str, io::Error)>;

fn at<T>(step: &'static str, r: io::Result<T>) -> StepResult<T> {
    r.map_err(|e| (step, e))
}

/// Creates the bridge (or reuses it) with the gateway address, up; the subnet's rules; egress.
fn setup_host(nl: &mut Rtnl, cfg: &NetConfig) -> StepResult<()> {
    let gw = cfg.subnet.gateway();
    let bridge = LinkBridge::new(&cfg.bridge).build();
    match nl.one(
        RouteNetlinkMessage::NewLink(bridge),
        NLM_F_CREATE | NLM_F_EXCL,
    ) {
        Ok(()) => tracing::info!(bridge = %cfg.bridge, "bridge created"),
        Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {
            tracing::info!(bridge = %cfg.bridge, "bridge exists; reusing it")
        }
        Err(e) => return Err(("create bridge", e)),
    }
    at(
        "turn IPv6 off",
        write_sysctl(
            &format!("/proc/sys/net/ipv6/conf/{}/disable_ipv6", cfg.bridge),
            "1",
        ),
    )?;
    let index = at("find bridge", nl.link_index(&cfg.bridge))?;
    let addr = AddressMessageBuilder::<Ipv4Addr>::new()
        .index(index)
        .address(gw, cfg.subnet.prefix())
        .build();
    match nl.one(
        RouteNetlinkMessage::NewAddress(addr),
        NLM_F_CREATE | NLM_F_EXCL,
    ) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {}
        Err(e) => return Err(("add gateway address", e)),
    }
    at(
        "bring bridge up",
        nl.one(
            RouteNetlinkMessage::SetLink(LinkUnspec::new_with_index(index).up().build()),
            0,
        ),
    )?;
    // Worker-to-worker traffic stays routed; without egress, nothing else leaves the subnet.
    let within = rule(&cfg.subnet, RULE_PRIORITY, true);
    let refuse = rule(&cfg.subnet, RULE_PRIORITY + 1, false);
    add_ignoring_exists(nl, RouteNetlinkMessage::NewRule(within)).map_err(|e| ("add rule", e))?;
    if cfg.egress {
        // A rule left by an earlier run without egress.
        #[allow(clippy::while_let_loop)]
        loop {
            match nl.one(RouteNetlinkMessage::DelRule(refuse.clone()), 0) {
                Ok(()) => continue,
                Err(_) => break,
            }
        }
        // The cluster's destinations a predecessor routed to stay unmasqueraded.
        let cluster =
            crate::routes::destinations(&crate::routes::current_routes(nl).unwrap_or_default());
        at(
            "set up egress",
            setup_egress(&cfg.bridge, &cfg.subnet, &cluster),
        )?;
    } else {
        add_ignoring_exists(nl, RouteNetlinkMessage::NewRule(refuse))
            .map_err(|e| ("add rule", e))?;
    }
    Ok(())
}

fn add_ignoring_exists(nl: &mut Rtnl, msg: RouteNetlinkMessage) -> io::Result<()> {
    match nl.one(msg, NLM_F_CREATE | NLM_F_EXCL) {
        Err(e) if e.raw_os_error() != Some(libc::EEXIST) => Err(e),
        _ => Ok(()),
    }
}

/// `from SUBNET [to SUBNET] lookup main | unreachable`.
fn rule(subnet: &Subnet, priority: u32, within: bool) -> RuleMessage {
    let mut r = RuleMessage::default();
    r.header.family = AddressFamily::Inet;
    r.header.src_len = subnet.prefix();
    r.attributes.push(RuleAttribute::Priority(priority));
    r.attributes
        .push(RuleAttribute::Source(IpAddr::V4(subnet.network())));
    if within {
        r.header.dst_len = subnet.prefix();
        r.header.table = libc::RT_TABLE_MAIN;
        r.header.action = RuleAction::ToTable;
        r.attributes
            .push(RuleAttribute::Destination(IpAddr::V4(subnet.network())));
        r.attributes
            .push(RuleAttribute::Table(u32::from(libc::RT_TABLE_MAIN)));
    } else {
        r.header.action = RuleAction::Unreachable;
    }
    r
}

/// Forwarding for replies, and masquerading of what leaves the subnet except to `cluster`: one
/// command, at start-up and whenever the cluster's destinations change.
pub(crate) fn setup_egress(
    cfg_bridge: &str,
    subnet: &Subnet,
    cluster: &[(Ipv4Addr, u8)],
) -> io::Result<()> {
    write_sysctl("/proc/sys/net/ipv4/ip_forward", "1")?;
    let script = nft_egress_script(cfg_bridge, subnet, cluster);
    let nft = std::process::Command::new("nft")
        .args(["-f", "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut c| {
            if let Some(mut i) = c.stdin.take() {
                i.write_all(script.as_bytes())?;
            }
            c.wait_with_output()
        });
    match nft {
        Ok(out) if out.status.success() => return Ok(()),
        Ok(out) => {
            return Err(io::Error::other(format!(
                "nft: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            )))
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(io::Error::other(format!("nft: {e}"))),
    }
    if !cluster.is_empty() {
        tracing::warn!("no nft: traffic to the cluster's other hosts is masqueraded too (iptables exceptions are not made)");
    }
    let s = subnet.to_string();
    let rule = ["-s", &s, "!", "-d", &s, "-j", "MASQUERADE"];
    let ipt = |op: &str| {
        std::process::Command::new("iptables")
            .args(["-w", "-t", "nat", op, "POSTROUTING"])
            .args(rule)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
    };
    match ipt("-C") {
        Ok(st) if st.success() => Ok(()),
        Ok(_) => match ipt("-A") {
            Ok(st) if st.success() => Ok(()),
            Ok(st) => Err(io::Error::other(format!("iptables -A: {st}"))),
            Err(e) => Err(io::Error::other(format!("iptables: {e}"))),
        },
        Err(e) => Err(io::Error::other(format!(
            "neither nft nor iptables can be run: {e}"
        ))),
    }
}

/// Makes worker `id`'s namespace and network on the calling (dedicated) thread. Returns whether
/// the thread is back in the host namespace, i.e. fit for the next job.
fn make_worker_net(
    cfg: &NetConfig,
    host_ns: &OwnedFd,
    host: &mut Rtnl,
    id: &str,
    net: WorkerNet,
) -> (Result<PathBuf, NetError>, bool) {
    let path = cfg.dir.join(id);
    let fail = |step: &'static str, source: io::Error| NetError::Worker {
        id: id.to_owned(),
        step,
        source,
    };
    if is_nsfs(&path) {
        return (
            Err(fail(
                "create namespace",
                io::Error::from_raw_os_error(libc::EEXIST),
            )),
            true,
        );
    }
    if let Err(e) = fs::File::create(&path) {
        return (Err(fail("create namespace file", e)), true);
    }
    // In the new namespace: everything that needs to be done from inside.
    let inside = enter_new_namespace(&path);
    // Back to the host, whatever happened.
    // SAFETY: host_ns is an open nsfs fd of the daemon's network namespace.
    let back = unsafe { libc::setns(host_ns.as_raw_fd(), libc::CLONE_NEWNET) } == 0;
    let cleanup = |e: NetError| {
        let _ = remove_ns_file(id, &path);
        e
    };
    if !back {
        let e = io::Error::last_os_error();
        return (Err(cleanup(fail("return to the host namespace", e))), false);
    }
    let (ns_fd, mut inner) = match inside {
        Ok(v) => v,
        Err((step, e)) => return (Err(cleanup(fail(step, e))), true),
    };
    let res = match net {
        WorkerNet::Isolated => at("bring lo up", inner.one(lo_up(), 0)),
        WorkerNet::Routed { ip } => configure_routed(cfg, host, &mut inner, &ns_fd, id, ip),
    };
    drop(inner);
    drop(ns_fd);
    match res {
        Ok(()) => (Ok(path), true),
        Err((step, e)) => (Err(cleanup(fail(step, e))), true),
    }
}

/// unshare, bind-mount, open a netlink socket inside.
fn enter_new_namespace(path: &Path) -> StepResult<(OwnedFd, Rtnl)> {
    // SAFETY: unshare with a namespace flag affects only the calling thread's network namespace.
    if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
        return Err(("unshare", io::Error::last_os_error()));
    }
    let ns = at(
        "open namespace",
        fs::File::open("/proc/thread-self/ns/net").map(OwnedFd::from),
    )?;
    let nl = at("open netlink", Rtnl::open())?;
    bind_mount_namespace(c"/proc/thread-self/ns/net", path)?;
    Ok((ns, nl))
}

/// Bind-mounts the namespace file `src` onto `dst`, so the namespace outlives its creator.
fn bind_mount_namespace(src: &std::ffi::CStr, dst: &Path) -> StepResult<()> {
    let dst = CString::new(dst.as_os_str().as_bytes()).map_err(|_| {
        (
            "bind-mount namespace",
            io::Error::from(io::ErrorKind::InvalidInput),
        )
    })?;
    // SAFETY: both paths are valid NUL-terminated strings; a bind mount takes no data.
    let rc = unsafe {
        libc::mount(
            src.as_ptr(),
            dst.as_ptr(),
            std::ptr::null(),
            libc::MS_BIND,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(("bind-mount namespace", io::Error::last_os_error()));
    }
    Ok(())
}

/// IPv6 address generation off (no link-local address: no neighbour discovery, DAD or router
/// solicitations from the link), and IPv4 forwarding of what arrives on it, if `forwarding`.
/// Through netlink rather than /proc/sys: with thousands of namespaces, every /proc/sys/net
/// path lookup walks dentries of every namespace and costs milliseconds.
fn link_conf(index: u32, forwarding: bool) -> RouteNetlinkMessage {
    let mut spec = vec![AfSpecUnspec::Inet6(vec![AfSpecInet6::AddrGenMode(
        In6AddrGenMode::None,
    )])];
    if forwarding {
        let mut conf = InetDevConf::default();
        conf.forwarding = 1;
        spec.insert(
            0,
            AfSpecUnspec::Inet(vec![AfSpecInet::DevConfRequest(conf)]),
        );
    }
    let mut m = LinkUnspec::new_with_index(index).build();
    m.attributes.push(LinkAttribute::AfSpecUnspec(spec));
    RouteNetlinkMessage::SetLink(m)
}

fn lo_up() -> RouteNetlinkMessage {
    RouteNetlinkMessage::SetLink(LinkUnspec::new_with_index(1).up().build())
}

/// The veth pair (worker end created inside as eth0), host route, worker address and routes.
fn configure_routed(
    cfg: &NetConfig,
    host: &mut Rtnl,
    inner: &mut Rtnl,
    ns_fd: &OwnedFd,
    id: &str,
    ip: Ipv4Addr,
) -> StepResult<()> {
    let host_end = host_end_name(id);
    let (index, eth0) = create_veth(host, inner, &host_end, ns_fd)?;
    configure_addresses(cfg, host, inner, index, id, eth0, ip)
}

/// Asks for one TX and one RX queue on the link `b` makes (each end of a veth pair). Left out,
/// the kernel makes one per possible CPU and then cuts each end's TX queues down to one, which
/// waits for an RCU grace period under the rtnl lock (`synchronize_net` in
/// `netif_set_real_num_tx_queues`): two grace periods per pair, during which no other
/// namespace, link or route of the host can change.
pub fn one_queue<T>(b: LinkMessageBuilder<T>) -> LinkMessageBuilder<T> {
    b.append_extra_attribute(LinkAttribute::NumTxQueues(1))
        .append_extra_attribute(LinkAttribute::NumRxQueues(1))
}

/// Creates the veth pair `host_end` ⇄ eth0 with eth0 made directly inside the namespace `ns`
/// (down: a veth end cannot be brought up before its pair is complete). Returns the link
/// indexes of the host end and of eth0.
fn create_veth(
    host: &mut Rtnl,
    inner: &mut Rtnl,
    host_end: &str,
    ns: &OwnedFd,
) -> StepResult<(u32, u32)> {
    let peer: LinkMessage =
        one_queue(LinkUnspec::new_with_name("eth0").setns_by_fd(ns.as_raw_fd())).build();
    let veth = one_queue(LinkVeth::new(host_end, "eth0").address(HOST_END_MAC.to_vec()))
        .set_info_data(InfoData::Veth(InfoVeth::Peer(peer)))
        .build();
    at(
        "create veth",
        host.one(
            RouteNetlinkMessage::NewLink(veth),
            NLM_F_CREATE | NLM_F_EXCL,
        ),
    )?;
    let index = at("find host end", host.link_index(host_end))?;
    // IPv6 off on the host end before it comes up: an IPv6 device gets a multicast route
    // (ff00::/8) in the host's table, and every link change on the host walks the whole IPv6
    // table, so with thousands of workers each launch and exit paid for every other worker's
    // route. There is no netlink attribute for it; the calling thread is in the host namespace.
    at(
        "turn IPv6 off on the host end",
        write_sysctl(
            &format!("/proc/sys/net/ipv6/conf/{host_end}/disable_ipv6"),
            "1",
        ),
    )?;
    let eth0 = at("find eth0", inner.link_index("eth0"))?;
    Ok((index, eth0))
}

/// The last step of a routed worker network, made on demand or taken ready: the host end up
/// (its alias naming worker `id`) with the /32 route to the worker, and inside lo and eth0 up,
/// the address, the gateway's neighbour entry and the default route. Two batches.
fn configure_addresses(
    cfg: &NetConfig,
    host: &mut Rtnl,
    inner: &mut Rtnl,
    host_index: u32,
    id: &str,
    eth0: u32,
    ip: Ipv4Addr,
) -> StepResult<()> {
    let gw = cfg.subnet.gateway();
    let up = LinkUnspec::new_with_index(host_index)
        .up()
        .alias(format!("{HOST_END_ALIAS_PREFIX}{id}"));
    let to_worker = RouteMessageBuilder::<Ipv4Addr>::new()
        .destination_prefix(ip, 32)
        .output_interface(host_index)
        .pref_source(gw)
        .scope(RouteScope::Link)
        .build();
    // Before up: no IPv6 (no link-local address, so no neighbour discovery), and forwarding of
    // what the worker sends. REPLACE: the route of a worker that had this address may outlive
    // it briefly (the kernel frees namespaces asynchronously).
    let host_side = host.batch(&[
        (link_conf(host_index, true), 0),
        (RouteNetlinkMessage::SetLink(up.build()), 0),
        (
            RouteNetlinkMessage::NewRoute(to_worker),
            NLM_F_CREATE | NLM_F_REPLACE,
        ),
    ]);
    for (step, r) in [
        "configure host end",
        "bring host end up",
        "add route to worker",
    ]
    .into_iter()
    .zip(host_side)
    {
        at(step, r.take())?;
    }
    let addr = AddressMessageBuilder::<Ipv4Addr>::new()
        .index(eth0)
        .address(ip, 32)
        .build();
    let default = RouteMessageBuilder::<Ipv4Addr>::new()
        .gateway(gw)
        .output_interface(eth0)
        .onlink()
        .build();
    let inside = inner.batch(&[
        (lo_up(), 0),
        (link_conf(eth0, false), 0),
        (
            RouteNetlinkMessage::SetLink(LinkUnspec::new_with_index(eth0).up().build()),
            0,
        ),
        (
            RouteNetlinkMessage::NewAddress(addr),
            NLM_F_CREATE | NLM_F_EXCL,
        ),
        (
            RouteNetlinkMessage::NewNeighbour(gateway_neighbour(eth0, gw)),
            NLM_F_CREATE | NLM_F_REPLACE,
        ),
        (
            RouteNetlinkMessage::NewRoute(default),
            NLM_F_CREATE | NLM_F_EXCL,
        ),
    ]);
    let steps = [
        "bring lo up",
        "configure eth0",
        "bring eth0 up",
        "add worker address",
        "add gateway neighbour",
        "add default route",
    ];
    for (step, r) in steps.into_iter().zip(inside) {
        at(step, r.take())?;
    }
    Ok(())
}

/// The worker's permanent neighbour entry for its gateway: no ARP needed, whatever the host's
/// `arp_ignore`.
fn gateway_neighbour(eth0: u32, gw: Ipv4Addr) -> NeighbourMessage {
    let mut n = NeighbourMessage::default();
    n.header.family = AddressFamily::Inet;
    n.header.ifindex = eth0;
    n.header.state = NeighbourState::Permanent;
    n.attributes
        .push(NeighbourAttribute::Destination(NeighbourAddress::Inet(gw)));
    n.attributes
        .push(NeighbourAttribute::LinkLayerAddress(HOST_END_MAC.to_vec()));
    n
}

/// One result of a batch; `take` turns it into an io::Result once.
pub(crate) struct Reply(Option<io::Error>);

impl Reply {
    pub(crate) fn take(self) -> io::Result<()> {
        match self.0 {
            None => Ok(()),
            Some(e) => Err(e),
        }
    }
}

/// A blocking rtnetlink socket that sends batches of requests in one `sendmsg` and collects
/// their acknowledgements.
pub(crate) struct Rtnl {
    fd: rtnetlink::sys::Socket,
    seq: u32,
    buf: Vec<u8>,
}

impl Rtnl {
    /// A socket in the calling thread's network namespace.
    pub(crate) fn open() -> io::Result<Self> {
        let sock = rtnetlink::sys::Socket::new(rtnetlink::sys::protocols::NETLINK_ROUTE)?;
        // Every request is acknowledged at once; a reply that never comes must not hold a
        // namespace thread forever.
        let timeout = libc::timeval {
            tv_sec: 10,
            tv_usec: 0,
        };
        // SAFETY: setsockopt with a valid timeval of the size given, on an open socket.
        unsafe {
            libc::setsockopt(
                sock.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&timeout as *const libc::timeval).cast(),
                std::mem::size_of::<libc::timeval>() as u32,
            )
        };
        // Errors carry only the header of the failed request, not all of it.
        let _ = sock.set_cap_ack(true);
        let _ = sock.set_ext_ack(false);
        Ok(Self {
            fd: sock,
            seq: 0,
            buf: vec![0; 64 * 1024],
        })
    }

    pub(crate) fn one(&mut self, msg: RouteNetlinkMessage, flags: u16) -> io::Result<()> {
        let mut r = self.batch(&[(msg, flags)]);
        r.pop()
            .map(Reply::take)
            .unwrap_or_else(|| Err(io::Error::other("no reply")))
    }

    /// Sends every message at once (each with `NLM_F_REQUEST | NLM_F_ACK | flags`) and returns
    /// one result per message, in order. The kernel handles them in order and goes on after a
    /// failed one.
    pub(crate) fn batch(&mut self, msgs: &[(RouteNetlinkMessage, u16)]) -> Vec<Reply> {
        let first = self.seq.wrapping_add(1);
        let mut out = Vec::new();
        for (m, flags) in msgs {
            self.seq = self.seq.wrapping_add(1);
            let mut header = NetlinkHeader::default();
            header.flags = NLM_F_REQUEST | NLM_F_ACK | flags;
            header.sequence_number = self.seq;
            let mut nl = NetlinkMessage::new(header, NetlinkPayload::InnerMessage(m.clone()));
            nl.finalize();
            let start = out.len();
            out.resize(start + nl.buffer_len(), 0);
            nl.serialize(&mut out[start..]);
        }
        let mut replies: Vec<Option<Reply>> = msgs.iter().map(|_| None).collect();
        if let Err(e) = self.send_all(&out) {
            return msgs
                .iter()
                .map(|_| Reply(Some(io::Error::new(e.kind(), e.to_string()))))
                .collect();
        }
        let mut pending = msgs.len();
        while pending > 0 {
            let n = match self.recv() {
                Ok(n) => n,
                Err(e) => {
                    return replies
                        .into_iter()
                        .map(|r| {
                            r.unwrap_or_else(|| {
                                Reply(Some(io::Error::new(e.kind(), e.to_string())))
                            })
                        })
                        .collect()
                }
            };
            let mut off = 0;
            while off + 16 <= n {
                let len = u32::from_ne_bytes(self.buf[off..off + 4].try_into().unwrap_or_default())
                    as usize;
                if len < 16 || off + len > n {
                    break;
                }
                let seq =
                    u32::from_ne_bytes(self.buf[off + 8..off + 12].try_into().unwrap_or_default());
                let i = seq.wrapping_sub(first) as usize;
                if let Ok(msg) =
                    NetlinkMessage::<RouteNetlinkMessage>::deserialize(&self.buf[off..off + len])
                {
                    if let (NetlinkPayload::Error(e), Some(slot)) =
                        (&msg.payload, replies.get_mut(i))
                    {
                        if slot.is_none() {
                            *slot = Some(Reply(e.code.map(|_| e.to_io())));
                            pending -= 1;
                        }
                    }
                }
                off += (len + 3) & !3;
            }
        }
        replies
            .into_iter()
            .map(|r| r.unwrap_or(Reply(None)))
            .collect()
    }

    /// Every object a dump request `msg` (`GetRoute`, `GetRule`, ...) returns.
    pub(crate) fn dump(
        &mut self,
        msg: RouteNetlinkMessage,
    ) -> io::Result<Vec<RouteNetlinkMessage>> {
        self.seq = self.seq.wrapping_add(1);
        let mut header = NetlinkHeader::default();
        header.flags = NLM_F_REQUEST | NLM_F_DUMP;
        header.sequence_number = self.seq;
        let mut nl = NetlinkMessage::new(header, NetlinkPayload::InnerMessage(msg));
        nl.finalize();
        let mut out = vec![0; nl.buffer_len()];
        nl.serialize(&mut out);
        self.send_all(&out)?;
        let mut found = Vec::new();
        loop {
            let n = self.recv()?;
            let mut off = 0;
            while off + 16 <= n {
                let len = u32::from_ne_bytes(self.buf[off..off + 4].try_into().unwrap_or_default())
                    as usize;
                if len < 16 || off + len > n {
                    break;
                }
                let seq =
                    u32::from_ne_bytes(self.buf[off + 8..off + 12].try_into().unwrap_or_default());
                // One this crate cannot parse is passed over: not one of ours to manage.
                if let (true, Ok(m)) = (
                    seq == self.seq,
                    NetlinkMessage::<RouteNetlinkMessage>::deserialize(&self.buf[off..off + len]),
                ) {
                    match m.payload {
                        NetlinkPayload::Done(_) => return Ok(found),
                        NetlinkPayload::Error(e) if e.code.is_some() => return Err(e.to_io()),
                        NetlinkPayload::InnerMessage(inner) => found.push(inner),
                        _ => {}
                    }
                }
                off += (len + 3) & !3;
            }
        }
    }

    /// The index of link `name`.
    fn link_index(&mut self, name: &str) -> io::Result<u32> {
        self.seq = self.seq.wrapping_add(1);
        let mut header = NetlinkHeader::default();
        header.flags = NLM_F_REQUEST;
        header.sequence_number = self.seq;
        let mut get = LinkMessage::default();
        get.attributes.push(LinkAttribute::IfName(name.to_owned()));
        let mut nl = NetlinkMessage::new(
            header,
            NetlinkPayload::InnerMessage(RouteNetlinkMessage::GetLink(get)),
        );
        nl.finalize();
        let mut out = vec![0; nl.buffer_len()];
        nl.serialize(&mut out);
        self.send_all(&out)?;
        loop {
            let n = self.recv()?;
            let msg = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&self.buf[..n])
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
            if msg.header.sequence_number != self.seq {
                continue;
            }
            return match msg.payload {
                NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewLink(l)) => Ok(l.header.index),
                NetlinkPayload::Error(e) if e.code.is_some() => Err(e.to_io()),
                other => Err(io::Error::other(format!(
                    "unexpected reply to a link query: {other:?}"
                ))),
            };
        }
    }

    fn send_all(&self, data: &[u8]) -> io::Result<()> {
        let mut addr: libc::sockaddr_nl =
            // SAFETY: sockaddr_nl is plain data; all-zero is a valid value.
            unsafe { std::mem::zeroed() };
        addr.nl_family = libc::AF_NETLINK as u16;
        loop {
            // SAFETY: data and addr are valid for the given lengths.
            let rc = unsafe {
                libc::sendto(
                    self.fd.as_raw_fd(),
                    data.as_ptr().cast(),
                    data.len(),
                    0,
                    (&addr as *const libc::sockaddr_nl).cast(),
                    std::mem::size_of::<libc::sockaddr_nl>() as u32,
                )
            };
            if rc >= 0 {
                return Ok(());
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
    }

    fn recv(&mut self) -> io::Result<usize> {
        loop {
            // SAFETY: buf is valid for its length.
            let rc = unsafe {
                libc::recv(
                    self.fd.as_raw_fd(),
                    self.buf.as_mut_ptr().cast(),
                    self.buf.len(),
                    0,
                )
            };
            if rc >= 0 {
                return Ok(rc as usize);
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn link_names() {
        assert_eq!(host_end_name("abcdefghijkl"), "bvabcdefghijkl");
        assert!(host_end_name("abcdefghijklmnop").len() <= 15);
        for ok in ["berth0", "bt123-4", "a"] {
            assert!(valid_link_name(ok), "{ok}");
        }
        for bad in ["", "a/b", "a b", "a:b", "0123456789abcdef", ".", ".."] {
            assert!(!valid_link_name(bad), "{bad:?}");
        }
    }

    #[test]
    fn egress_script_names_subnet_and_table() {
        let s = nft_egress_script("berth0", &Subnet::parse("10.213.0.0/16").unwrap(), &[]);
        assert!(s.contains("table ip berth_berth0 {"), "{s}");
        assert!(s.contains("delete table ip berth_berth0"), "{s}");
        assert!(
            s.contains("ip saddr 10.213.0.0/16 ip daddr != 10.213.0.0/16 masquerade"),
            "{s}"
        );
        assert!(!s.contains("elements"), "{s}");
        let s = nft_egress_script(
            "bt-1.x",
            &Subnet::parse("10.9.0.0/24").unwrap(),
            &[
                ("10.10.0.0".parse().unwrap(), 24),
                ("192.0.2.7".parse().unwrap(), 32),
            ],
        );
        assert!(s.contains("berth_bt_1_x"), "{s}");
        assert!(
            s.contains("elements = { 10.10.0.0/24, 192.0.2.7/32 }"),
            "{s}"
        );
        assert!(
            s.contains("ip saddr 10.9.0.0/24 ip daddr @cluster accept"),
            "{s}"
        );
    }

    #[test]
    fn rules_select_the_subnet() {
        let s = Subnet::parse("10.9.0.0/20").unwrap();
        let within = rule(&s, RULE_PRIORITY, true);
        assert_eq!(within.header.action, RuleAction::ToTable);
        assert_eq!((within.header.src_len, within.header.dst_len), (20, 20));
        let refuse = rule(&s, RULE_PRIORITY + 1, false);
        assert_eq!(refuse.header.action, RuleAction::Unreachable);
        assert_eq!(refuse.header.dst_len, 0);
        assert!(refuse
            .attributes
            .contains(&RuleAttribute::Source("10.9.0.0".parse().unwrap())));
    }

    #[test]
    fn fake_records_creates_and_removes() {
        let f = FakeNetns::default();
        f.create("w1", WorkerNet::Isolated).unwrap();
        assert!(f.exists("w1"));
        f.remove("w1").unwrap();
        f.remove("w1").unwrap();
        assert_eq!(*f.log.lock().unwrap(), ["+w1", "-w1"]);
    }
}
