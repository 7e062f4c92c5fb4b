//! The scheduler node: host daemons beat in (membership), launches are placed on the hosts that
//! fit (all-or-nothing, [`berth_core::placement`]), and the workers of every host are tracked
//! from the hosts' own event streams and stopped through them.
//!
//! The scheduler holds nothing the hosts do not: worker records, sessions and draining are all
//! kept by the hosts, so a restarted scheduler rebuilds the same view from their beats and
//! listings. `hosts.json` in the state dir only remembers where the hosts were, so that the view
//! is rebuilt before their next beat and a host that never returns is seen to be DOWN.

pub mod config;
pub mod daemon;
pub mod fake;
pub mod grpc;
pub mod hosts;
pub mod metrics;
pub mod peers;
pub mod view;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use berth_proto::v1 as pb;
use futures::StreamExt;
use tokio::sync::{broadcast, watch};
use tokio_util::sync::CancellationToken;

use berth_core::error::{Error, Result};
use berth_core::launch::Program;
use berth_core::limits::{self, LaunchLimits};
use berth_core::placement::{Amount, Ask, Placer, Strategy};
use berth_core::removals;
use berth_core::session::Session;

use berth_core::worker::Selector;

use hosts::{Connector, HostApi, ItemStream};
use view::{is_terminal, Filter, Tracked, View};

/// Label a host carries for each kernel it can run; a kernel launch is constrained to it.
pub fn kernel_label(kernel: &str) -> String {
    format!("berth.kernel/{kernel}")
}

/// How the scheduler runs.
#[derive(Debug, Clone)]
pub struct SchedulerOptions {
    /// Beat interval asked of the hosts.
    pub heartbeat: Duration,
    /// A host whose beats stop this long is DOWN and its workers LOST.
    pub host_down_after: Duration,
    /// Placements tried for one launch when hosts refuse (stale view, unreachable host).
    pub launch_attempts: u32,
    /// Longest a host may take to answer a launch.
    pub host_call_timeout: Duration,
    /// Where `hosts.json` is kept; `None` keeps nothing.
    pub state_dir: Option<PathBuf>,
    /// Caps on one launch request (`[limits]`).
    pub limits: LaunchLimits,
}

impl Default for SchedulerOptions {
    fn default() -> Self {
        Self {
            heartbeat: Duration::from_secs(2),
            host_down_after: Duration::from_secs(10),
            launch_attempts: 3,
            host_call_timeout: Duration::from_secs(60),
            state_dir: None,
            limits: LaunchLimits::default(),
        }
    }
}

/// Resources of launches sent to a host and not yet seen in its beats.
#[derive(Debug, Clone)]
struct Pending {
    id: u64,
    amount: Amount,
    /// The first beat sequence whose `allocated` includes it; `None` while the launch is in flight.
    settled_by: Option<u64>,
}

struct HostEntry {
    info: pb::HostInfo,
    state: pb::HostState,
    /// The operator's intent, kept while the host is down.
    drained: bool,
    /// When `drained` was last changed (ms since the epoch, see `Membership` 6.): the higher of
    /// the host's and this replica's wins.
    drain_version: u64,
    last_seen: SystemTime,
    seen_at: Instant,
    /// Its unfinished workers were marked LOST for this outage.
    lost_marked: bool,
    sequence: u64,
    /// A beat has come since this entry was made (a restored entry has none yet).
    sequence_seen: bool,
    api: Arc<dyn HostApi>,
    follower: CancellationToken,
    /// The view has read this host's listing since it (re)connected.
    synced: bool,
    pending: Vec<Pending>,
}

struct State {
    hosts: BTreeMap<String, HostEntry>,
    placer: Placer,
    /// Hosts removed from the cluster (through this replica or another, as the hosts told it),
    /// by when (ms since the epoch); told to every host for [`removals::MEMORY`].
    removed: removals::Removals,
    /// Hosts whose beats are refused for an overlapping subnet (logged once each).
    subnet_refused: BTreeSet<String>,
    /// The peer list of the beats' answers, made again after any change of a host's address,
    /// subnet or state, or of the hosts.
    peer_list: Option<Arc<pb::PeerList>>,
}

/// Up hosts a session is opened on when it opens, so that every replica can find it.
const SESSION_HOMES: usize = 2;

/// Now, in ms since the epoch.
fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn ms_of(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// A host as `hosts.json` remembers it.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct RememberedHost {
    address: String,
    draining: bool,
    #[serde(default)]
    drain_version: u64,
}

struct SchedSession {
    session: Session,
    /// Hosts the session was opened on.
    hosts: BTreeSet<String>,
}

/// Counters for `/metrics`.
#[derive(Debug, Default)]
pub struct SchedulerMetrics {
    pub launches: AtomicU64,
    pub launch_refusals: AtomicU64,
    pub placement_retries: AtomicU64,
    pub workers_launched: AtomicU64,
    pub hosts_lost: AtomicU64,
}

/// A caller (as forwarded to hosts) and a launch's `request_id`.
type RetryKey = (String, String);

struct Inner {
    opts: SchedulerOptions,
    connector: Arc<dyn Connector>,
    state: Mutex<State>,
    view: Mutex<View>,
    events: broadcast::Sender<pb::Worker>,
    changed: watch::Sender<u64>,
    sessions: Mutex<HashMap<String, SchedSession>>,
    next_pending: AtomicU64,
    /// One launch at a time per (caller, `request_id`).
    retries: berth_server::gates::Gates<RetryKey>,
    /// The workers of each (caller, `request_id`) launched within the retry window, by when.
    launched: Mutex<HashMap<RetryKey, (Instant, Vec<String>)>>,
    /// Serialises writers of `hosts.json`.
    save_lock: Mutex<()>,
    metrics: SchedulerMetrics,
    shutdown: CancellationToken,
}

/// The scheduler: cheap to clone, every clone the same scheduler.
#[derive(Clone)]
pub struct Scheduler {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Scheduler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Scheduler")
            .field("hosts", &self.state().hosts.len())
            .field("workers", &self.view().len())
            .finish()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Resources of the protobuf in the placer's integer units.
fn amount_of(r: Option<&pb::Resources>) -> Amount {
    let r = r.cloned().unwrap_or_default();
    Amount::from_units(r.cpu, r.memory_gb, r.gpus, r.workers)
}

/// Tells the placer what `e` has free now: the host's last beat plus launches it has not
/// reported yet.
fn sync_placer(placer: &mut Placer, name: &str, e: &HostEntry) {
    let capacity = amount_of(e.info.capacity.as_ref());
    let allocated = e
        .pending
        .iter()
        .fold(amount_of(e.info.allocated.as_ref()), |a, p| {
            a.saturating_add(p.amount)
        });
    let mut labels: BTreeMap<String, String> = e.info.labels.clone().into_iter().collect();
    for k in e.info.kernels.iter().filter(|k| k.available) {
        labels.insert(kernel_label(&k.name), "available".into());
    }
    placer.upsert(
        name,
        capacity,
        allocated,
        labels,
        e.state == pb::HostState::Ready,
    );
}

/// A host name as a scheduler accepts it: what a DNS name or a berthd `--name` can be.
fn valid_host_name(n: &str) -> bool {
    !n.is_empty()
        && n.len() <= 253
        && n.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

impl Scheduler {
    pub fn new(opts: SchedulerOptions, connector: Arc<dyn Connector>) -> Self {
        let (events, _) = broadcast::channel(8192);
        let (changed, _) = watch::channel(0);
        Self {
            inner: Arc::new(Inner {
                opts,
                connector,
                state: Mutex::new(State {
                    hosts: BTreeMap::new(),
                    placer: Placer::new(),
                    removed: BTreeMap::new(),
                    subnet_refused: BTreeSet::new(),
                    peer_list: None,
                }),
                view: Mutex::new(View::default()),
                events,
                changed,
                sessions: Mutex::new(HashMap::new()),
                next_pending: AtomicU64::new(1),
                retries: Default::default(),
                launched: Mutex::new(HashMap::new()),
                save_lock: Mutex::new(()),
                metrics: SchedulerMetrics::default(),
                shutdown: CancellationToken::new(),
            }),
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        lock(&self.inner.state)
    }

    fn view(&self) -> MutexGuard<'_, View> {
        lock(&self.inner.view)
    }

    fn sessions(&self) -> MutexGuard<'_, HashMap<String, SchedSession>> {
        lock(&self.inner.sessions)
    }

    pub fn metrics(&self) -> &SchedulerMetrics {
        &self.inner.metrics
    }

    pub fn shutdown_token(&self) -> CancellationToken {
        self.inner.shutdown.clone()
    }

    /// Stops the background duties and every host follower.
    pub fn shutdown(&self) {
        self.inner.shutdown.cancel();
    }

    /// Starts the duties that run on their own: DOWN detection and session expiry. Hosts
    /// remembered in the state dir are followed at once.
    pub fn start(&self) {
        self.restore_hosts();
        let s = self.clone();
        berth_server::spawn_in(tracing::info_span!("host_watch"), async move {
            s.watch_hosts().await
        });
    }

    // ---- membership ----

    /// A host's beat: registers it the first time, refreshes what it has, and answers the
    /// state the scheduler holds for it.
    pub fn heartbeat(&self, req: pb::HeartbeatRequest) -> Result<pb::HeartbeatResponse> {
        let info = req
            .info
            .ok_or_else(|| Error::invalid("info", "is required"))?;
        if !valid_host_name(&info.name) {
            return Err(Error::invalid(
                "info.name",
                format!("{:?} is not a host name", info.name),
            ));
        }
        if info.address.is_empty() {
            return Err(Error::invalid(
                "info.address",
                "is required: where the scheduler reaches the host",
            ));
        }
        let name = info.name.clone();
        let mut remember = false;
        let (state, drain_version, removed, forgotten, peers) = {
            let mut guard = self.state();
            let st = &mut *guard;
            // A host whose workers' subnet overlaps another's is not registered: its routes
            // would take the other's traffic.
            let others = st
                .hosts
                .iter()
                .map(|(n, e)| (n.as_str(), e.info.subnet.as_str()));
            if let Err(e) = peers::check_subnet(&name, &info.subnet, others) {
                if st.subnet_refused.insert(name.clone()) {
                    tracing::warn!(host = %name, subnet = %info.subnet, error = %e, "host refused: its subnet overlaps another host's");
                }
                return Err(e);
            }
            if st.subnet_refused.remove(&name) {
                tracing::info!(host = %name, subnet = %info.subnet, "host's subnet accepted");
            }
            let forgotten = self.take_removals(st, &name, &req.removed);
            if !forgotten.is_empty() {
                st.peer_list = None;
            }
            let e = match st.hosts.get_mut(&name) {
                Some(e) => e,
                None => {
                    tracing::info!(host = %name, address = %info.address, "host joined");
                    remember = true;
                    let e = self.new_entry(&name, &info.address, req.draining);
                    st.hosts.entry(name.clone()).or_insert(e)
                }
            };
            if req.drain_version > e.drain_version {
                // Another replica (or this one before a restart) changed it later.
                if e.drained != req.draining {
                    tracing::info!(host = %name, draining = req.draining, "host drain changed through another replica");
                    remember = true;
                }
                e.drained = req.draining;
                e.drain_version = req.drain_version;
            }
            if e.info.address != info.address && !e.info.address.is_empty() {
                tracing::info!(host = %name, address = %info.address, "host moved");
                e.follower.cancel();
                e.api = self.inner.connector.connect(&name, &info.address);
                e.follower = self.follow(&name, e.api.clone());
                e.synced = false;
                remember = true;
            }
            if req.sequence <= e.sequence {
                // The daemon restarted: what it reports now is all it holds.
                e.pending.retain(|p| p.settled_by.is_none());
            }
            e.sequence = req.sequence;
            e.pending
                .retain(|p| p.settled_by.is_none_or(|s| s > req.sequence));
            // Only hosts with a subnet are peers (hosts without, like simulated ones, change
            // nothing: a join of thousands does not rebuild the list thousands of times).
            let was_peer = !e.info.subnet.is_empty();
            if (e.info.address != info.address || e.info.subnet != info.subnet)
                && (was_peer || !info.subnet.is_empty())
            {
                st.peer_list = None;
            }
            e.info = info;
            e.last_seen = SystemTime::now();
            e.seen_at = Instant::now();
            let was = e.state;
            if req.leaving {
                e.state = pb::HostState::Down;
                tracing::info!(host = %name, "host leaving");
            } else {
                e.state = if e.drained {
                    pb::HostState::Draining
                } else {
                    pb::HostState::Ready
                };
                if was == pb::HostState::Down && e.sequence_seen {
                    // Read the host afresh: what still runs there replaces the LOST verdict.
                    tracing::info!(host = %name, "host is back");
                    e.follower.cancel();
                    e.follower = self.follow(&name, e.api.clone());
                    e.synced = false;
                }
                e.lost_marked = false;
                e.sequence_seen = true;
            }
            if e.state != was && !e.info.subnet.is_empty() {
                st.peer_list = None;
            }
            sync_placer(&mut st.placer, &name, e);
            let out = (e.state, e.drain_version);
            // A host that beats again after its removal has joined again.
            st.removed.remove(&name);
            let removed = st
                .removed
                .iter()
                .map(|(name, at)| pb::RemovedHost {
                    name: name.clone(),
                    at_ms: *at,
                })
                .collect();
            // Hosts with a worker subnet (the others need no route); the list goes out only when
            // the host lacks this version of it.
            let entries = st
                .hosts
                .iter()
                .filter(|(_, e)| !e.info.subnet.is_empty())
                .map(|(n, e)| {
                    (
                        n.as_str(),
                        e.info.address.as_str(),
                        e.info.subnet.as_str(),
                        e.state as i32,
                    )
                });
            let list = st
                .peer_list
                .get_or_insert_with(|| Arc::new(peers::list(entries)))
                .clone();
            let peers = (list.version != req.peers_version).then(|| (*list).clone());
            (out.0, out.1, removed, forgotten, peers)
        };
        for name in forgotten {
            self.forget_host(&name);
        }
        if remember {
            drop(self.save_hosts());
        }
        Ok(pb::HeartbeatResponse {
            interval_ms: self.inner.opts.heartbeat.as_millis() as u32,
            state: match state {
                pb::HostState::Draining => pb::HostState::Draining,
                _ => pb::HostState::Ready,
            } as i32,
            drain_version,
            removed,
            peers,
        })
    }

    /// Takes the removals a host (`from`) tells of: each of a host this replica holds as DOWN
    /// whose last beat came before the removal forgets it (returned, to be forgotten in the
    /// view too); the rest are remembered and told on. Drops removals past [`removals::MEMORY`].
    fn take_removals(&self, st: &mut State, from: &str, told: &[pb::RemovedHost]) -> Vec<String> {
        let now = now_ms();
        let oldest = removals::oldest(now);
        let mut forgotten = Vec::new();
        for r in told.iter().take(removals::MAX) {
            if r.at_ms < oldest || r.name == from || !valid_host_name(&r.name) {
                continue;
            }
            if let Some(e) = st.hosts.get(&r.name) {
                if e.state != pb::HostState::Down || ms_of(e.last_seen) >= r.at_ms {
                    // It beat here after that removal: it has joined again.
                    continue;
                }
                let e = st.hosts.remove(&r.name).expect("looked up above");
                st.placer.remove(&r.name);
                e.follower.cancel();
                tracing::info!(host = %r.name, "host removed through another replica");
                forgotten.push(r.name.clone());
            }
            removals::record(&mut st.removed, &r.name, r.at_ms);
        }
        removals::prune(&mut st.removed, now);
        forgotten
    }

    /// The view's side of forgetting a removed host: its unfinished workers are LOST.
    fn forget_host(&self, name: &str) {
        let lost = self.view().mark_host_lost(name, SystemTime::now());
        self.publish(lost);
        drop(self.save_hosts());
    }

    fn new_entry(&self, name: &str, address: &str, drained: bool) -> HostEntry {
        let api = self.inner.connector.connect(name, address);
        HostEntry {
            info: pb::HostInfo {
                name: name.to_owned(),
                address: address.to_owned(),
                ..Default::default()
            },
            state: pb::HostState::Down,
            drained,
            drain_version: 0,
            last_seen: SystemTime::UNIX_EPOCH,
            seen_at: Instant::now(),
            lost_marked: false,
            sequence: 0,
            sequence_seen: false,
            follower: self.follow(name, api.clone()),
            api,
            synced: false,
            pending: Vec::new(),
        }
    }

    fn hosts_file(&self) -> Option<PathBuf> {
        self.inner
            .opts
            .state_dir
            .as_ref()
            .map(|d| d.join("hosts.json"))
    }

    /// Remembers where the hosts are and which drain (a hint for the next start, written at
    /// once so that a drain survives a crash before the host's next beat; the hosts hold the
    /// rest, and their own `draining` where this file is missing).
    fn save_hosts(&self) -> tokio::task::JoinHandle<()> {
        let s = self.clone();
        tokio::task::spawn_blocking(move || {
            let Some(path) = s.hosts_file() else {
                return;
            };
            // The latest state, whichever save runs last.
            let _guard = lock(&s.inner.save_lock);
            let map: BTreeMap<String, RememberedHost> = s
                .state()
                .hosts
                .iter()
                .map(|(n, e)| {
                    (
                        n.clone(),
                        RememberedHost {
                            address: e.info.address.clone(),
                            draining: e.drained,
                            drain_version: e.drain_version,
                        },
                    )
                })
                .collect();
            let tmp = path.with_extension("json.tmp");
            let res = serde_json::to_vec_pretty(&map)
                .map_err(std::io::Error::other)
                .and_then(|b| std::fs::write(&tmp, b))
                .and_then(|()| std::fs::rename(&tmp, &path));
            if let Err(e) = res {
                tracing::warn!(path = %path.display(), error = %e, "cannot remember hosts");
            }
        })
    }

    fn restore_hosts(&self) {
        let Some(path) = self.hosts_file() else {
            return;
        };
        let map: BTreeMap<String, RememberedHost> = match std::fs::read(&path) {
            Ok(b) => match serde_json::from_slice(&b) {
                Ok(m) => m,
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e, "ignoring unreadable hosts file");
                    return;
                }
            },
            Err(_) => return,
        };
        let mut st = self.state();
        for (name, h) in map {
            if valid_host_name(&name) && !st.hosts.contains_key(&name) {
                let mut e = self.new_entry(&name, &h.address, h.draining);
                e.drain_version = h.drain_version;
                st.hosts.insert(name, e);
            }
        }
        if !st.hosts.is_empty() {
            tracing::info!(
                hosts = st.hosts.len(),
                "following the hosts known before the restart"
            );
        }
    }

    /// Follows one host's worker events until `cancel`: its `WatchWorkers`, then a listing,
    /// then every event; again from the start whenever the stream breaks.
    fn follow(&self, name: &str, api: Arc<dyn HostApi>) -> CancellationToken {
        let cancel = self.inner.shutdown.child_token();
        let token = cancel.clone();
        let s = self.clone();
        let name = name.to_owned();
        let span = tracing::info_span!("host_follow", host = %name);
        berth_server::spawn_in(span, async move {
            let mut backoff = Duration::from_millis(100);
            loop {
                let connected = tokio::select! {
                    r = s.sync_host(&name, &api) => r,
                    _ = token.cancelled() => return,
                };
                match connected {
                    Ok(mut stream) => {
                        backoff = Duration::from_millis(100);
                        loop {
                            let ev = tokio::select! {
                                ev = stream.next() => ev,
                                _ = token.cancelled() => return,
                            };
                            match ev {
                                Some(Ok(w)) => s.record(&name, vec![w]),
                                Some(Err(e)) => {
                                    tracing::debug!(host = %name, error = %e, "event stream broke");
                                    break;
                                }
                                None => break,
                            }
                        }
                        s.set_synced(&name, false);
                    }
                    Err(e) => tracing::debug!(host = %name, error = %e, "cannot follow host"),
                }
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = token.cancelled() => return,
                }
                backoff = (backoff * 2).min(Duration::from_secs(1));
            }
        });
        cancel
    }

    async fn sync_host(
        &self,
        name: &str,
        api: &Arc<dyn HostApi>,
    ) -> Result<ItemStream<pb::Worker>> {
        let stream = api.watch().await?;
        let listing = api.list(pb::ListWorkersRequest::default()).await?;
        let n = listing.len();
        let changed = self.view().replace_host(name, listing);
        self.publish(changed);
        self.set_synced(name, true);
        tracing::debug!(host = %name, workers = n, "host view synced");
        Ok(stream)
    }

    fn set_synced(&self, name: &str, synced: bool) {
        if let Some(e) = self.state().hosts.get_mut(name) {
            e.synced = synced;
        }
    }

    /// Takes host reports into the view and tells watchers what changed.
    fn record(&self, host: &str, workers: Vec<pb::Worker>) {
        let changed: Vec<pb::Worker> = {
            let mut v = self.view();
            workers
                .into_iter()
                .filter_map(|w| v.apply(host, w))
                .collect()
        };
        self.publish(changed);
    }

    fn publish(&self, changed: Vec<pb::Worker>) {
        if changed.is_empty() {
            return;
        }
        for w in changed {
            let _ = self.inner.events.send(w);
        }
        self.inner.changed.send_modify(|n| *n += 1);
    }

    /// Marks hosts DOWN when their beats stop, their workers LOST, and ends lapsed sessions.
    async fn watch_hosts(&self) {
        let tick = (self.inner.opts.host_down_after / 10)
            .clamp(Duration::from_millis(50), Duration::from_millis(500));
        loop {
            tokio::select! {
                _ = tokio::time::sleep(tick) => {}
                _ = self.inner.shutdown.cancelled() => return,
            }
            let mut lost = Vec::new();
            {
                let mut guard = self.state();
                let st = &mut *guard;
                for (name, e) in st.hosts.iter_mut() {
                    let silent = e.seen_at.elapsed() >= self.inner.opts.host_down_after;
                    if !silent {
                        continue;
                    }
                    if e.state != pb::HostState::Down {
                        tracing::warn!(host = %name, "host DOWN: heartbeats stopped");
                        e.state = pb::HostState::Down;
                        if !e.info.subnet.is_empty() {
                            st.peer_list = None;
                        }
                        sync_placer(&mut st.placer, name, e);
                    }
                    if !e.lost_marked {
                        e.lost_marked = true;
                        lost.push(name.clone());
                    }
                }
            }
            for name in lost {
                let workers = self.view().mark_host_lost(&name, SystemTime::now());
                if !workers.is_empty() {
                    self.inner
                        .metrics
                        .hosts_lost
                        .fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(host = %name, workers = workers.len(), "workers of a DOWN host are LOST");
                }
                self.publish(workers);
            }
            self.expire_sessions().await;
        }
    }

    // ---- cluster ----

    fn cluster_host(e: &HostEntry) -> pb::ClusterHost {
        pb::ClusterHost {
            info: Some(e.info.clone()),
            state: e.state as i32,
            last_seen: (e.last_seen > SystemTime::UNIX_EPOCH)
                .then(|| prost_types::Timestamp::from(e.last_seen)),
        }
    }

    /// Every host, by name.
    pub fn list_hosts(&self) -> Vec<pb::ClusterHost> {
        self.state()
            .hosts
            .values()
            .map(Self::cluster_host)
            .collect()
    }

    /// Whether every READY or DRAINING host's workers are in the view (after a start, the view
    /// is whole once this holds).
    pub fn synced(&self) -> bool {
        self.state()
            .hosts
            .values()
            .all(|e| e.state == pb::HostState::Down || e.synced)
    }

    /// No new placements on `name` (`drain`), or again (`!drain`). Its workers keep running.
    pub async fn set_draining(&self, name: &str, drain: bool) -> Result<pb::ClusterHost> {
        let out = self.set_draining_now(name, drain)?;
        let _ = self.save_hosts().await;
        Ok(out)
    }

    fn set_draining_now(&self, name: &str, drain: bool) -> Result<pb::ClusterHost> {
        if name.is_empty() {
            return Err(Error::invalid("name", "is required"));
        }
        let mut guard = self.state();
        let st = &mut *guard;
        let e = st
            .hosts
            .get_mut(name)
            .ok_or_else(|| Error::NotFound(format!("host {name} not found")))?;
        e.drained = drain;
        e.drain_version = (e.drain_version + 1).max(now_ms());
        if !e.info.subnet.is_empty() {
            st.peer_list = None;
        }
        if e.state != pb::HostState::Down {
            e.state = if drain {
                pb::HostState::Draining
            } else {
                pb::HostState::Ready
            };
        }
        sync_placer(&mut st.placer, name, e);
        tracing::info!(host = %name, draining = drain, "host drain changed");
        Ok(Self::cluster_host(e))
    }

    /// Forgets `name`, a DOWN host gone for good: no placement, no follow, not remembered in
    /// `hosts.json`. Its workers stay listed as LOST. Returns the host as it was and how many
    /// workers it had. A host that beats again joins again.
    pub async fn remove_host(&self, name: &str) -> Result<(pb::ClusterHost, u32)> {
        if name.is_empty() {
            return Err(Error::invalid("name", "is required"));
        }
        let removed = {
            let mut guard = self.state();
            let st = &mut *guard;
            let e = st
                .hosts
                .get(name)
                .ok_or_else(|| Error::NotFound(format!("host {name} not found")))?;
            if e.state != pb::HostState::Down {
                return Err(Error::FailedPrecondition(format!(
                    "host {name} is {} (beat {:.0?} ago): only a DOWN host can be removed; stop \
                     its berthd (or drain it first to move work away)",
                    e.state.as_str_name(),
                    e.seen_at.elapsed()
                )));
            }
            let e = st.hosts.remove(name).expect("looked up above");
            if !e.info.subnet.is_empty() {
                st.peer_list = None;
            }
            st.placer.remove(name);
            e.follower.cancel();
            // Told to every host, which tell the other replicas.
            st.removed
                .insert(name.to_owned(), now_ms().max(ms_of(e.last_seen) + 1));
            Self::cluster_host(&e)
        };
        let lost = self.view().mark_host_lost(name, SystemTime::now());
        self.publish(lost);
        let workers = self.view().count_on(name);
        let _ = self.save_hosts().await;
        tracing::info!(host = %name, workers, "host removed");
        Ok((removed, workers as u32))
    }

    fn api_of(&self, host: &str) -> Option<(Arc<dyn HostApi>, pb::HostState)> {
        self.state()
            .hosts
            .get(host)
            .map(|e| (e.api.clone(), e.state))
    }

    /// Whether some host knows the kernel `name` (available or not: a host that lacks the
    /// interpreter is left out by placement, and the error says so).
    fn knows_kernel(&self, name: &str) -> bool {
        self.state()
            .hosts
            .values()
            .any(|e| e.info.kernels.iter().any(|k| k.name == name))
    }

    // ---- sessions ----

    /// Opens a session on the scheduler and on its home hosts ([`SESSION_HOMES`] up hosts,
    /// chosen by the id), where any replica finds it; it is opened on each host where workers
    /// land too. Calls to the hosts carry the caller, who owns the session there.
    pub async fn open_session(
        &self,
        id: Option<String>,
        ttl_seconds: u32,
        labels: BTreeMap<String, String>,
        owner: &str,
    ) -> Result<pb::Session> {
        let id = id.unwrap_or_else(berth_core::new_id);
        let (out, request) = {
            let mut sessions = self.sessions();
            if let Some(s) = sessions.get_mut(&id) {
                if s.session.owner != owner {
                    return Err(Error::PermissionDenied(format!(
                        "session {id} belongs to another user"
                    )));
                }
                s.session.renew(SystemTime::now());
                return Ok(session_to_pb(&s.session));
            }
            let mut session = Session::open(id.clone(), ttl_seconds, labels, SystemTime::now())?;
            session.owner = owner.to_owned();
            let out = session_to_pb(&session);
            let request = pb::OpenSessionRequest {
                ttl_seconds: session.ttl.as_secs() as u32,
                labels: session.labels.clone().into_iter().collect(),
                id: id.clone(),
            };
            sessions.insert(
                id.clone(),
                SchedSession {
                    session,
                    hosts: BTreeSet::new(),
                },
            );
            (out, request)
        };
        let homes = self.session_homes(&id);
        let opened = futures::future::join_all(homes.iter().map(|(h, api)| {
            let request = request.clone();
            async move { (h.clone(), api.open_session(request).await) }
        }))
        .await;
        let mut at = BTreeSet::new();
        for (h, r) in opened {
            match r {
                Ok(_) => {
                    at.insert(h);
                }
                Err(e) => {
                    tracing::warn!(session = %id, host = %h, error = %e, "cannot open a session on its home host")
                }
            }
        }
        if let Some(s) = self.sessions().get_mut(&id) {
            s.hosts.extend(at);
        }
        tracing::info!(session = %id, "session opened");
        Ok(out)
    }

    /// The home hosts of a session: the [`SESSION_HOMES`] up hosts that rank first for its id
    /// (rendezvous hashing, so that the set moves little as hosts come and go).
    fn session_homes(&self, id: &str) -> Vec<(String, Arc<dyn HostApi>)> {
        use std::hash::{Hash, Hasher};
        let rank = |host: &str| {
            let mut h = std::collections::hash_map::DefaultHasher::new();
            (id, host).hash(&mut h);
            h.finish()
        };
        let st = self.state();
        let mut up: Vec<(u64, &String, &HostEntry)> = st
            .hosts
            .iter()
            .filter(|(_, e)| e.state != pb::HostState::Down)
            .map(|(n, e)| (rank(n), n, e))
            .collect();
        up.sort_by_key(|u| std::cmp::Reverse(u.0));
        up.into_iter()
            .take(SESSION_HOMES)
            .map(|(_, n, e)| (n.clone(), e.api.clone()))
            .collect()
    }

    /// Renews a session here and on every host it reached. A session this scheduler does not
    /// hold (it restarted) is looked for on the hosts that run its workers.
    pub async fn keep_alive(&self, id: &str) -> Result<pb::Session> {
        let known = {
            let mut sessions = self.sessions();
            match sessions.get_mut(id) {
                Some(s) if !s.session.expired(SystemTime::now()) => {
                    s.session.renew(SystemTime::now());
                    Some((session_to_pb(&s.session), s.hosts.clone()))
                }
                _ => None,
            }
        };
        let hosts: BTreeSet<String> = match &known {
            Some((_, h)) => h.clone(),
            None => {
                // Opened through another replica: its workers' hosts hold it, or its homes; a
                // session whose homes have changed since is looked for on every up host.
                let mut h = self.view().session_hosts(id);
                if h.is_empty() {
                    h = self.up_hosts();
                }
                h
            }
        };
        let renewed = futures::future::join_all(hosts.iter().map(|h| async move {
            let Some((api, state)) = self.api_of(h) else {
                return (h.clone(), None);
            };
            if state == pb::HostState::Down {
                return (h.clone(), None);
            }
            (h.clone(), api.keep_alive(id).await.ok())
        }))
        .await;
        if let Some((s, _)) = known {
            return Ok(s);
        }
        // Adopt the session from the hosts that still hold it.
        let live: Vec<(String, pb::Session)> = renewed
            .into_iter()
            .filter_map(|(h, s)| s.map(|s| (h, s)))
            .collect();
        let Some((_, first)) = live.first() else {
            return Err(Error::NotFound(format!("session {id} not found or ended")));
        };
        let mut session = Session::open(
            id.to_owned(),
            first.ttl_seconds,
            first.labels.clone().into_iter().collect(),
            SystemTime::now(),
        )?;
        session.owner = first.owner.clone();
        let out = session_to_pb(&session);
        self.sessions().insert(
            id.to_owned(),
            SchedSession {
                session,
                hosts: live.into_iter().map(|(h, _)| h).collect(),
            },
        );
        tracing::info!(session = %id, "session adopted from its hosts");
        Ok(out)
    }

    /// Every host not DOWN.
    fn up_hosts(&self) -> BTreeSet<String> {
        self.state()
            .hosts
            .iter()
            .filter(|(_, e)| e.state != pb::HostState::Down)
            .map(|(n, _)| n.clone())
            .collect()
    }

    /// Ends a session and stops its workers on every host.
    pub async fn close_session(&self, id: &str, grace: Option<u32>) -> Result<Vec<pb::Worker>> {
        if !self.sessions().contains_key(id) && self.view().session_hosts(id).is_empty() {
            // Opened through another replica and without workers yet: held by its homes.
            self.keep_alive(id).await?;
        }
        let held = self.sessions().remove(id);
        let mut hosts = self.view().session_hosts(id);
        if held.is_none() && hosts.is_empty() {
            return Err(Error::NotFound(format!("session {id} not found or ended")));
        }
        if let Some(s) = held {
            hosts.extend(s.hosts);
        }
        tracing::info!(session = %id, hosts = hosts.len(), "session closed");
        self.end_session_on(id, &hosts, grace).await
    }

    async fn end_session_on(
        &self,
        id: &str,
        hosts: &BTreeSet<String>,
        grace: Option<u32>,
    ) -> Result<Vec<pb::Worker>> {
        let results = futures::future::join_all(hosts.iter().map(|h| async move {
            let Some((api, state)) = self.api_of(h) else {
                return (h.clone(), Ok(Vec::new()));
            };
            if state == pb::HostState::Down {
                return (h.clone(), Ok(Vec::new()));
            }
            let r = api
                .close_session(pb::CloseSessionRequest {
                    session_id: id.to_owned(),
                    grace_seconds: grace,
                })
                .await;
            (h.clone(), r)
        }))
        .await;
        let mut first_err = None;
        for (h, r) in results {
            match r {
                Ok(ws) => self.record(&h, ws),
                // Its lease there had already lapsed: the host stopped the workers itself.
                Err(Error::NotFound(_)) => {}
                Err(e) => {
                    tracing::warn!(host = %h, session = %id, error = %e, "cannot end session on host");
                    first_err.get_or_insert(e);
                }
            }
        }
        if let Some(e) = first_err {
            return Err(e);
        }
        let f = Filter {
            session_id: Some(id.to_owned()),
            ..Default::default()
        };
        Ok(self
            .view()
            .select(&f)?
            .into_iter()
            .map(|t| t.worker)
            .collect())
    }

    /// Forgets the sessions whose lease lapsed here. Their hosts end them by their own leases,
    /// which this replica renewed with its own; a session renewed through another replica
    /// lives on there, and is adopted again if a keep-alive comes here.
    async fn expire_sessions(&self) {
        let now = SystemTime::now();
        let mut sessions = self.sessions();
        sessions.retain(|id, s| {
            let live = !s.session.expired(now);
            if !live {
                tracing::info!(session = %id, "session lease lapsed");
            }
            live
        });
    }

    /// Whether this scheduler holds session `id` open.
    fn session_open(&self, id: &str) -> bool {
        self.sessions()
            .get(id)
            .is_some_and(|s| !s.session.expired(SystemTime::now()))
    }

    /// Whether a session id is one this scheduler holds or whose workers it sees.
    fn session_known(&self, id: &str) -> bool {
        self.sessions().contains_key(id) || !self.view().session_hosts(id).is_empty()
    }

    /// The owner of session `id`: as this scheduler holds it, else as its workers say.
    pub fn session_owner(&self, id: &str) -> Option<String> {
        if let Some(s) = self.sessions().get(id) {
            return Some(s.session.owner.clone());
        }
        let first = self
            .view()
            .select(&Filter {
                session_id: Some(id.to_owned()),
                ..Default::default()
            })
            .ok()?
            .into_iter()
            .next();
        first.map(|t| t.worker.owner)
    }

    /// The owner of each of `ids` the view holds (unknown ones are left out).
    pub fn worker_owners(&self, ids: &[String]) -> Vec<(String, String)> {
        let view = self.view();
        ids.iter()
            .filter_map(|id| view.get(id).map(|t| (id.clone(), t.worker.owner.clone())))
            .collect()
    }

    fn require_session(&self, id: &str) -> Result<()> {
        if self.session_known(id) {
            Ok(())
        } else {
            Err(Error::NotFound(format!("session {id} not found")))
        }
    }

    // ---- workers ----

    /// Places and launches `req`'s workers, all or none. `caller` is the client's address, the
    /// workers' master unless the request names one.
    pub async fn launch(
        &self,
        mut req: pb::LaunchWorkersRequest,
        caller: Option<IpAddr>,
    ) -> Result<Vec<pb::Worker>> {
        // A retry (the same caller, the same request id) waits for the first launch and gets its
        // workers: from what this replica launched, else from the hosts' records of them as the
        // view holds them (another replica launched it, and the caller failed over before the
        // answer). The hosts are given the id with a suffix per placement attempt, so that an
        // attempt rolled back on one host never answers a retry.
        let request_id = std::mem::take(&mut req.request_id);
        let _gate = if request_id.is_empty() {
            None
        } else {
            berth_core::launch::check_request_id(&request_id, false)?;
            let key = (hosts::current_caller(), request_id.clone());
            let gate = self.inner.retries.enter(key.clone()).await;
            if let Some(first) = self.launched_as(&key, req.n)? {
                tracing::info!(%request_id, workers = first.len(), "a retried launch gets its first launch's workers");
                return Ok(first);
            }
            if let Some(first) = self.launched_elsewhere(&request_id, req.n).await? {
                tracing::info!(%request_id, workers = first.len(), "a retried launch gets the workers another replica launched");
                let ids = first.iter().map(|w| w.id.clone()).collect();
                lock(&self.inner.launched).insert(key.clone(), (Instant::now(), ids));
                return Ok(first);
            }
            Some((gate, key))
        };
        self.inner.metrics.launches.fetch_add(1, Ordering::Relaxed);
        let res = self.launch_inner(&mut req, caller, &request_id).await;
        if let (Ok(ws), Some((_, key))) = (&res, &_gate) {
            let ids = ws.iter().map(|w| w.id.clone()).collect();
            lock(&self.inner.launched).insert(key.clone(), (Instant::now(), ids));
        }
        match &res {
            Ok(ws) => {
                self.inner
                    .metrics
                    .workers_launched
                    .fetch_add(ws.len() as u64, Ordering::Relaxed);
            }
            Err(_) => {
                self.inner
                    .metrics
                    .launch_refusals
                    .fetch_add(1, Ordering::Relaxed);
            }
        }
        res
    }

    /// The workers that the caller launched with this request id within the retry window, as
    /// the view has them now; `None` when there are none.
    fn launched_as(&self, key: &RetryKey, n: u32) -> Result<Option<Vec<pb::Worker>>> {
        let ids = {
            let mut launched = lock(&self.inner.launched);
            launched.retain(|_, (at, _)| at.elapsed() < berth_core::launch::RETRY_WINDOW);
            match launched.get(key) {
                Some((_, ids)) => ids.clone(),
                None => return Ok(None),
            }
        };
        if ids.len() != n as usize {
            return Err(berth_core::launch::retry_of_another_size(
                &key.1,
                ids.len(),
                n,
            ));
        }
        let known = self.view().select(&Filter {
            ids: ids.clone(),
            ..Default::default()
        })?;
        // In launch order.
        let mut known: HashMap<String, pb::Worker> = known
            .into_iter()
            .map(|t| (t.worker.id.clone(), t.worker))
            .collect();
        Ok(Some(ids.iter().filter_map(|id| known.remove(id)).collect()))
    }

    /// A launch of `request_id` by the current caller that the hosts' records show whole (all
    /// the workers of one placement attempt, made within the retry window): what another replica
    /// launched before the caller failed over, or this one before it restarted. Attempts that
    /// never became whole (a replica died mid-launch, or rolled them back) are stopped where
    /// anything of them still runs: nobody was told of them.
    async fn launched_elsewhere(
        &self,
        request_id: &str,
        n: u32,
    ) -> Result<Option<Vec<pb::Worker>>> {
        let owner = hosts::current_owner();
        let now = SystemTime::now();
        let mut attempts: BTreeMap<u32, (u32, Vec<Tracked>)> = BTreeMap::new();
        for t in self.view().launched_with(&owner, request_id) {
            let (_, Some(a)) = berth_core::launch::split_attempt(&t.worker.request_id) else {
                continue;
            };
            let made = t
                .worker
                .created_at
                .as_ref()
                .and_then(|c| SystemTime::try_from(*c).ok())
                .unwrap_or(now);
            if now.duration_since(made).unwrap_or_default() >= berth_core::launch::RETRY_WINDOW {
                continue;
            }
            attempts
                .entry(a.token)
                .or_insert((a.n, Vec::new()))
                .1
                .push(t);
        }
        let mut whole = None;
        let mut partial: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for (want, ts) in attempts.into_values() {
            if ts.len() == want as usize && whole.is_none() {
                whole = Some((want, ts));
                continue;
            }
            for t in ts {
                if !is_terminal(t.worker.status) {
                    partial.entry(t.host).or_default().push(t.worker.id);
                }
            }
        }
        for (host, ids) in partial {
            tracing::info!(%request_id, host = %host, workers = ids.len(), "stopping a launch attempt that never became whole");
            self.rollback(&host, ids).await;
        }
        let Some((want, mut ts)) = whole else {
            return Ok(None);
        };
        if want != n {
            return Err(berth_core::launch::retry_of_another_size(
                request_id,
                want as usize,
                n,
            ));
        }
        ts.sort_by(|a, b| a.worker.id.cmp(&b.worker.id));
        Ok(Some(ts.into_iter().map(|t| t.worker).collect()))
    }

    async fn launch_inner(
        &self,
        req: &mut pb::LaunchWorkersRequest,
        caller: Option<IpAddr>,
        request_id: &str,
    ) -> Result<Vec<pb::Worker>> {
        let parsed = berth_server::convert::launch_from_pb(req.clone())?;
        let lim = &self.inner.opts.limits;
        limits::check_sizes(&parsed, lim)?;
        let spec = berth_core::launch::validate(&parsed, |k| self.knows_kernel(k))?;
        {
            // Bounds before work: a launch no placement could ever hold goes no further. (Where
            // no host has joined, placement says so.)
            let st = self.state();
            if !st.hosts.is_empty() {
                let slots = st
                    .hosts
                    .values()
                    .map(|e| u64::from(e.info.capacity.as_ref().map_or(0, |c| c.workers)))
                    .sum();
                limits::check_cluster_workers(
                    spec.n,
                    lim.max_workers_per_launch,
                    st.hosts.len(),
                    slots,
                )?;
            }
        }
        let session = match &spec.session_id {
            Some(id) => {
                if !self.sessions().contains_key(id) {
                    // Opened through another replica: adopted from its hosts, or NOT_FOUND.
                    self.keep_alive(id).await?;
                }
                let s = self.sessions().get(id).map(|s| s.session.clone());
                match s {
                    Some(s) if !s.expired(SystemTime::now()) => Some(s),
                    _ => return Err(Error::NotFound(format!("session {id} not found or ended"))),
                }
            }
            None => None,
        };
        let mut constraints: BTreeMap<String, String> =
            req.constraints.clone().into_iter().collect();
        match &spec.program {
            Program::Code { kernel, .. } | Program::Script { kernel, .. } => {
                constraints.insert(kernel_label(kernel), "available".into());
            }
            Program::Command(_) => {}
        }
        let strategy = if req.placement == pb::Placement::Spread as i32 {
            Strategy::Spread
        } else {
            Strategy::BinPack
        };
        let per_worker = Amount {
            cpu_milli: (spec.cpu * 1000.0).ceil() as u64,
            memory_bytes: spec.memory_bytes,
            gpus: spec.nvidia_gpu,
            workers: 1,
        };
        // The hosts see the scheduler as their caller: tell them who the master really is.
        if req.master_ip.is_empty() {
            if let Some(ip) = caller.filter(|ip| !ip.is_loopback()) {
                req.master_ip = ip.to_string();
            }
        }
        req.constraints.clear();
        let mut refused: BTreeMap<String, Error> = BTreeMap::new();
        for attempt in 0..self.inner.opts.launch_attempts.max(1) {
            if attempt > 0 {
                self.inner
                    .metrics
                    .placement_retries
                    .fetch_add(1, Ordering::Relaxed);
            }
            let ask = Ask {
                n: spec.n,
                per_worker,
                constraints: &constraints,
                strategy,
            };
            let plan = self.reserve(&ask, &refused)?;
            if !request_id.is_empty() {
                req.request_id = berth_core::launch::with_attempt(
                    request_id,
                    berth_core::launch::Attempt::new(spec.n),
                );
            }
            let results = futures::future::join_all(
                plan.iter()
                    .map(|(host, k, _)| self.launch_on(host, *k, req, session.as_ref())),
            )
            .await;
            let ok = results.iter().all(|r| r.is_ok());
            if ok {
                let mut out = Vec::new();
                let mut placed = BTreeSet::new();
                for ((host, _, pending), r) in plan.iter().zip(results) {
                    let ws = r?;
                    self.settle(host, *pending, true);
                    self.record(host, ws.clone());
                    placed.insert(host.clone());
                    out.extend(ws);
                }
                if let Some(s) = &session {
                    if let Some(held) = self.sessions().get_mut(&s.id) {
                        held.hosts.extend(placed);
                    }
                }
                tracing::info!(
                    workers = out.len(),
                    hosts = plan.len(),
                    attempt,
                    "launch placed"
                );
                return Ok(out);
            }
            // Roll back what did start, so the client sees all or nothing.
            let mut fatal = None;
            for ((host, _, pending), r) in plan.iter().zip(results) {
                match r {
                    Ok(ws) => {
                        let ids: Vec<String> = ws.iter().map(|w| w.id.clone()).collect();
                        self.rollback(host, ids).await;
                        self.settle(host, *pending, false);
                    }
                    Err(e) => {
                        self.settle(host, *pending, false);
                        tracing::info!(host = %host, error = %e, attempt, "host refused its part of a launch");
                        match e {
                            Error::ResourceExhausted(_) | Error::Unavailable(_) => {
                                refused.insert(host.clone(), e);
                            }
                            other => {
                                fatal.get_or_insert(other);
                            }
                        }
                    }
                }
            }
            if let Some(e) = fatal {
                return Err(e);
            }
        }
        Err(refusal(&refused, "no placement left after hosts refused"))
    }

    /// Chooses hosts for `ask` and holds its resources there until the launch is answered.
    fn reserve(
        &self,
        ask: &Ask<'_>,
        refused: &BTreeMap<String, Error>,
    ) -> Result<Vec<(String, u32, u64)>> {
        let mut guard = self.state();
        let st = &mut *guard;
        if st.hosts.is_empty() {
            return Err(Error::Unavailable(
                "no host has joined this scheduler".into(),
            ));
        }
        // Hosts that refused this launch sit out its next placements.
        for name in refused.keys() {
            st.placer.set_schedulable(name, false);
        }
        let placed = st.placer.place(ask);
        for name in refused.keys() {
            if let Some(e) = st.hosts.get(name) {
                st.placer
                    .set_schedulable(name, e.state == pb::HostState::Ready);
            }
        }
        let plan = placed.map_err(|short| {
            if refused.is_empty() {
                Error::ResourceExhausted(short.to_string())
            } else {
                refusal(refused, &short.to_string())
            }
        })?;
        let mut out = Vec::with_capacity(plan.len());
        for (name, k) in plan {
            let id = self.inner.next_pending.fetch_add(1, Ordering::Relaxed);
            if let Some(e) = st.hosts.get_mut(&name) {
                e.pending.push(Pending {
                    id,
                    amount: ask.per_worker.times(k),
                    settled_by: None,
                });
                sync_placer(&mut st.placer, &name, e);
            }
            out.push((name, k, id));
        }
        Ok(out)
    }

    /// A launch on `host` was answered: its resources stay held until the host's beats include
    /// them (`launched`), or are freed now.
    fn settle(&self, host: &str, pending: u64, launched: bool) {
        let mut guard = self.state();
        let st = &mut *guard;
        if let Some(e) = st.hosts.get_mut(host) {
            if launched {
                // Beat `sequence + 1` may have left before the launch; `sequence + 2` cannot.
                let by = e.sequence + 2;
                if let Some(p) = e.pending.iter_mut().find(|p| p.id == pending) {
                    p.settled_by = Some(by);
                }
            } else {
                e.pending.retain(|p| p.id != pending);
            }
            sync_placer(&mut st.placer, host, e);
        }
    }

    async fn launch_on(
        &self,
        host: &str,
        n: u32,
        req: &pb::LaunchWorkersRequest,
        session: Option<&Session>,
    ) -> Result<Vec<pb::Worker>> {
        let (api, _) = self
            .api_of(host)
            .ok_or_else(|| Error::Unavailable(format!("host {host} left")))?;
        let timeout = self.inner.opts.host_call_timeout;
        let call = async {
            if let Some(s) = session {
                api.open_session(pb::OpenSessionRequest {
                    ttl_seconds: s.ttl.as_secs() as u32,
                    labels: s.labels.clone().into_iter().collect(),
                    id: s.id.clone(),
                })
                .await?;
            }
            let mut r = req.clone();
            r.n = n;
            api.launch(r).await
        };
        match tokio::time::timeout(timeout, call).await {
            Ok(r) => r,
            Err(_) => Err(Error::Unavailable(format!(
                "host {host} did not answer the launch within {} s",
                timeout.as_secs()
            ))),
        }
    }

    async fn rollback(&self, host: &str, ids: Vec<String>) {
        let Some((api, _)) = self.api_of(host) else {
            return;
        };
        let req = pb::StopWorkersRequest {
            ids,
            grace_seconds: Some(0),
            ..Default::default()
        };
        match api.stop(req).await {
            Ok(ws) => self.record(host, ws),
            Err(e) => {
                tracing::error!(host = %host, error = %e, "cannot roll back a partial launch")
            }
        }
    }

    /// Workers `filter` selects, oldest first.
    pub fn list(&self, filter: &Filter) -> Result<Vec<pb::Worker>> {
        if let Some(s) = &filter.session_id {
            self.require_session(s)?;
        }
        Ok(self
            .view()
            .select(filter)?
            .into_iter()
            .map(|t| t.worker)
            .collect())
    }

    /// Every change of a worker from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<pb::Worker> {
        self.inner.events.subscribe()
    }

    /// Waits as a host's `AwaitWorkers` does, over the workers of every host.
    pub async fn await_workers(
        &self,
        ids: Vec<String>,
        session_id: Option<String>,
        completion: bool,
        timeout: Option<Duration>,
    ) -> Result<(Vec<pb::Worker>, Vec<pb::Worker>)> {
        let mut changes = self.inner.changed.subscribe();
        let filter = Filter {
            session_id,
            ids,
            ..Default::default()
        };
        let selected: Vec<String> = self.list(&filter)?.into_iter().map(|w| w.id).collect();
        let deadline = timeout.map(|t| tokio::time::Instant::now() + t);
        let reached = |w: &pb::Worker| {
            w.status == pb::WorkerStatus::Succeeded as i32
                || (!completion && w.status == pb::WorkerStatus::Running as i32)
        };
        loop {
            changes.borrow_and_update();
            let snapshot: Vec<pb::Worker> = {
                let v = self.view();
                selected
                    .iter()
                    .filter_map(|id| v.get(id).map(|t| t.worker.clone()))
                    .collect()
            };
            let settled = snapshot.iter().all(|w| reached(w) || is_terminal(w.status));
            let timed_out = deadline.is_some_and(|d| tokio::time::Instant::now() >= d);
            if settled || timed_out || self.inner.shutdown.is_cancelled() {
                return Ok(snapshot.into_iter().partition(|w| reached(w)));
            }
            let wait = changes.changed();
            let cancelled = self.inner.shutdown.cancelled();
            match deadline {
                Some(d) => tokio::select! {
                    _ = wait => {}
                    _ = tokio::time::sleep_until(d) => {}
                    _ = cancelled => {}
                },
                None => tokio::select! {
                    _ = wait => {}
                    _ = cancelled => {}
                },
            }
        }
    }

    /// Stops the selected workers through their hosts. Workers of a DOWN host are returned as
    /// the view holds them (LOST); a host that cannot be reached makes the call UNAVAILABLE
    /// after every other host has stopped its part (stopping again is harmless).
    pub async fn stop(&self, sel: Selector, grace: Option<u32>) -> Result<Vec<pb::Worker>> {
        let (calls, filter): (Vec<(String, pb::StopWorkersRequest)>, Filter) = match sel {
            Selector::Ids(ids) => {
                let f = Filter {
                    ids: ids.clone(),
                    ..Default::default()
                };
                let mut by_host: BTreeMap<String, Vec<String>> = BTreeMap::new();
                for t in self.view().select(&f)? {
                    if !is_terminal(t.worker.status) {
                        by_host.entry(t.host).or_default().push(t.worker.id);
                    }
                }
                let calls = by_host
                    .into_iter()
                    .map(|(h, ids)| {
                        (
                            h,
                            pb::StopWorkersRequest {
                                ids,
                                grace_seconds: grace,
                                ..Default::default()
                            },
                        )
                    })
                    .collect();
                (calls, f)
            }
            Selector::Session(id) => {
                self.require_session(&id)?;
                let mut hosts = self.view().session_hosts(&id);
                if let Some(s) = self.sessions().get(&id) {
                    hosts.extend(s.hosts.iter().cloned());
                }
                let calls = hosts
                    .into_iter()
                    .map(|h| {
                        (
                            h,
                            pb::StopWorkersRequest {
                                session_id: id.clone(),
                                grace_seconds: grace,
                                ..Default::default()
                            },
                        )
                    })
                    .collect();
                (
                    calls,
                    Filter {
                        session_id: Some(id),
                        ..Default::default()
                    },
                )
            }
            Selector::All => {
                let hosts: Vec<String> = self.state().hosts.keys().cloned().collect();
                let calls = hosts
                    .into_iter()
                    .map(|h| {
                        (
                            h,
                            pb::StopWorkersRequest {
                                all: true,
                                grace_seconds: grace,
                                ..Default::default()
                            },
                        )
                    })
                    .collect();
                (calls, Filter::default())
            }
        };
        let results = futures::future::join_all(calls.into_iter().map(|(h, r)| async move {
            let Some((api, state)) = self.api_of(&h) else {
                return (h, Ok(Vec::new()));
            };
            if state == pb::HostState::Down {
                return (h, Ok(Vec::new()));
            }
            let res = api.stop(r).await;
            (h, res)
        }))
        .await;
        let mut unreachable = None;
        for (h, r) in results {
            match r {
                Ok(ws) => self.record(&h, ws),
                // A session the host never held, or ids it already retired.
                Err(Error::NotFound(_)) => {}
                Err(e) => {
                    tracing::warn!(host = %h, error = %e, "cannot stop workers on host");
                    unreachable.get_or_insert(e);
                }
            }
        }
        if let Some(e) = unreachable {
            return Err(e);
        }
        Ok(self
            .view()
            .select(&filter)?
            .into_iter()
            .map(|t| t.worker)
            .collect())
    }

    /// Output of the selected workers, from their hosts, merged into one stream.
    pub async fn output(
        &self,
        req: pb::StreamOutputRequest,
    ) -> Result<ItemStream<pb::OutputChunk>> {
        let calls: Vec<(String, pb::StreamOutputRequest)> = if !req.ids.is_empty() {
            let f = Filter {
                ids: req.ids.clone(),
                ..Default::default()
            };
            let mut by_host: BTreeMap<String, Vec<String>> = BTreeMap::new();
            for Tracked { host, worker } in self.view().select(&f)? {
                by_host.entry(host).or_default().push(worker.id);
            }
            by_host
                .into_iter()
                .map(|(h, ids)| {
                    (
                        h,
                        pb::StreamOutputRequest {
                            ids,
                            session_id: String::new(),
                            ..req.clone()
                        },
                    )
                })
                .collect()
        } else if req.new_workers {
            return self.session_output(req).await;
        } else if !req.session_id.is_empty() {
            self.require_session(&req.session_id)?;
            self.view()
                .session_hosts(&req.session_id)
                .into_iter()
                .map(|h| (h, req.clone()))
                .collect()
        } else {
            return Err(Error::invalid("ids", "name the workers: ids or session_id"));
        };
        let mut streams = Vec::new();
        for (h, r) in calls {
            if let Some(s) = self.host_output(&h, r).await? {
                streams.push(s);
            }
        }
        Ok(Box::pin(futures::stream::select_all(streams)))
    }

    /// A session's output with `new_workers`: a host stream (itself with `new_workers`) from
    /// every host the session is open on or has workers on, and from each host it reaches
    /// later, from the start there (every worker of it on that host is new), until the session
    /// has ended and every host stream with it.
    async fn session_output(
        &self,
        req: pb::StreamOutputRequest,
    ) -> Result<ItemStream<pb::OutputChunk>> {
        let id = req.session_id.clone();
        self.require_session(&id)?;
        // Subscribed first: a worker placed meanwhile shows in the events or in the view.
        let mut events = self.subscribe();
        let mut hosts = self.view().session_hosts(&id);
        if let Some(s) = self.sessions().get(&id) {
            hosts.extend(s.hosts.iter().cloned());
        }
        let mut streams = Vec::new();
        for h in &hosts {
            if let Some(s) = self.host_output(h, req.clone()).await? {
                streams.push(s);
            }
        }
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        let sched = self.clone();
        berth_server::spawn_in(
            tracing::info_span!("session_output", session = %id),
            async move {
                use futures::StreamExt;
                let mut merged = futures::stream::select_all(streams);
                let later = pb::StreamOutputRequest {
                    from_start: true,
                    ..req
                };
                loop {
                    let idle = merged.is_empty();
                    tokio::select! {
                        chunk = merged.next(), if !idle => {
                            let Some(chunk) = chunk else { continue };
                            if tx.send(chunk).await.is_err() {
                                return;
                            }
                        }
                        ev = events.recv() => {
                            let fresh = match ev {
                                Ok(w) if w.session_id == id && !hosts.contains(&w.host) => {
                                    vec![w.host]
                                }
                                Ok(_) => continue,
                                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => sched
                                    .view()
                                    .session_hosts(&id)
                                    .into_iter()
                                    .filter(|h| !hosts.contains(h))
                                    .collect(),
                                Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                            };
                            for h in fresh {
                                hosts.insert(h.clone());
                                match sched.host_output(&h, later.clone()).await {
                                    Ok(Some(s)) => merged.push(s),
                                    Ok(None) => {}
                                    Err(e) => {
                                        let _ = tx.send(Err(e)).await;
                                        return;
                                    }
                                }
                            }
                        }
                        // Every host stream has ended: so has the session, unless it reaches more
                        // hosts (the events say so) or its ends there were not yet seen here.
                        _ = tokio::time::sleep(std::time::Duration::from_secs(1)), if idle => {
                            if !sched.session_open(&id) {
                                return;
                            }
                        }
                        _ = tx.closed() => return,
                        _ = sched.inner.shutdown.cancelled() => return,
                    }
                    if merged.is_empty() && !sched.session_open(&id) {
                        return;
                    }
                }
            },
        );
        Ok(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx)))
    }

    /// `req` on host `h`; `None` where the host is unknown here or does not hold the session.
    async fn host_output(
        &self,
        h: &str,
        req: pb::StreamOutputRequest,
    ) -> Result<Option<ItemStream<pb::OutputChunk>>> {
        let Some((api, _)) = self.api_of(h) else {
            return Ok(None);
        };
        match api.output(req).await {
            Ok(s) => Ok(Some(s)),
            Err(Error::NotFound(_)) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Workers by status, for `/metrics`.
    pub fn status_counts(&self) -> BTreeMap<i32, usize> {
        let mut out = BTreeMap::new();
        for t in self.view().select(&Filter::default()).unwrap_or_default() {
            *out.entry(t.worker.status).or_insert(0) += 1;
        }
        out
    }

    /// Hosts by state, for `/metrics`.
    pub fn host_counts(&self) -> BTreeMap<i32, usize> {
        let mut out = BTreeMap::new();
        for e in self.state().hosts.values() {
            *out.entry(e.state as i32).or_insert(0) += 1;
        }
        out
    }
}

/// RESOURCE_EXHAUSTED (or UNAVAILABLE when no host could be reached) after hosts refused.
fn refusal(refused: &BTreeMap<String, Error>, what: &str) -> Error {
    let detail: Vec<String> = refused.values().map(ToString::to_string).collect();
    let all_unreachable = refused.values().all(|e| matches!(e, Error::Unavailable(_)));
    let msg = format!("{what}; refused by: {}", detail.join("; "));
    if all_unreachable {
        Error::Unavailable(msg)
    } else {
        Error::ResourceExhausted(msg)
    }
}

fn session_to_pb(s: &Session) -> pb::Session {
    berth_server::convert::session_to_pb(s)
}

#[cfg(test)]
mod tests;
