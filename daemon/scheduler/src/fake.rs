//! In-process simulated hosts behind [`HostApi`]: thousands of them cost a few MB, so the
//! scheduler's membership, placement, tracking and failure handling are tested (and benchmarked)
//! at cluster scale without thousands of daemons. A fake admits launches as a host does (all or
//! nothing against its capacity), runs every worker at once, and keeps sessions; it can be told
//! to refuse launches or to be unreachable.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use berth_proto::v1 as pb;
use tokio::sync::broadcast;
use tokio_stream::wrappers::BroadcastStream;

use super::hosts::{Connector, HostApi, ItemStream};
use super::view::is_terminal;
use berth_core::error::{Error, Result};

#[derive(Debug, Default)]
struct FakeState {
    workers: BTreeMap<String, pb::Worker>,
    /// Each session and when its lease lapses (renewed by every keep-alive, as on a host).
    sessions: HashMap<String, (pb::Session, Instant)>,
    /// What the schedulers told this host, kept and told back as a real host does.
    draining: bool,
    drain_version: u64,
    removed: BTreeMap<String, u64>,
}

/// One simulated host daemon.
#[derive(Debug)]
pub struct FakeHost {
    name: String,
    capacity: pb::Resources,
    labels: BTreeMap<String, String>,
    state: Mutex<FakeState>,
    events: broadcast::Sender<pb::Worker>,
    /// Launches answer RESOURCE_EXHAUSTED (as a host whose capacity the scheduler overrated).
    pub refuse_launches: AtomicBool,
    /// Every call answers UNAVAILABLE (a host that died).
    pub unreachable: AtomicBool,
    pub launch_calls: AtomicU64,
    /// Launches that carried a `request_id`.
    pub launches_with_request_id: AtomicU64,
    next_id: AtomicU64,
}

impl FakeHost {
    pub fn new(name: &str, capacity: pb::Resources, labels: BTreeMap<String, String>) -> Self {
        let (events, _) = broadcast::channel(4096);
        Self {
            name: name.to_owned(),
            capacity,
            labels,
            state: Mutex::new(FakeState::default()),
            events,
            refuse_launches: AtomicBool::new(false),
            unreachable: AtomicBool::new(false),
            launch_calls: AtomicU64::new(0),
            launches_with_request_id: AtomicU64::new(0),
            next_id: AtomicU64::new(1),
        }
    }

    fn state(&self) -> MutexGuard<'_, FakeState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn reachable(&self) -> Result<()> {
        if self.unreachable.load(Ordering::Relaxed) {
            Err(Error::Unavailable(format!(
                "host {} cannot be reached",
                self.name
            )))
        } else {
            Ok(())
        }
    }

    fn allocated(st: &FakeState) -> pb::Resources {
        let mut a = pb::Resources::default();
        for w in st.workers.values().filter(|w| !is_terminal(w.status)) {
            a.cpu += w.cpu;
            a.memory_gb += w.memory_gb;
            a.gpus += w.nvidia_gpu;
            a.workers += 1;
        }
        a
    }

    /// What the host would send in a beat.
    pub fn host_info(&self) -> pb::HostInfo {
        let st = self.state();
        pb::HostInfo {
            name: self.name.clone(),
            labels: self.labels.clone().into_iter().collect(),
            capacity: Some(self.capacity),
            allocated: Some(Self::allocated(&st)),
            address: format!("fake:{}", self.name),
            kernels: vec![pb::Kernel {
                name: "python3".into(),
                path: "/usr/bin/python3".into(),
                available: true,
            }],
            ..Default::default()
        }
    }

    /// A beat of this host, with what the schedulers told it so far.
    pub fn beat(&self, sequence: u64) -> pb::HeartbeatRequest {
        self.lapse();
        let info = self.host_info();
        let st = self.state();
        pb::HeartbeatRequest {
            info: Some(info),
            draining: st.draining,
            leaving: false,
            sequence,
            drain_version: st.drain_version,
            peers_version: 0,
            removed: st
                .removed
                .iter()
                .map(|(name, at)| pb::RemovedHost {
                    name: name.clone(),
                    at_ms: *at,
                })
                .collect(),
        }
    }

    /// Takes a scheduler's answer to a beat as a real host does: the newer drain, every removal.
    pub fn take_answer(&self, r: &pb::HeartbeatResponse) {
        let mut st = self.state();
        if r.drain_version > st.drain_version {
            st.drain_version = r.drain_version;
            st.draining = r.state == pb::HostState::Draining as i32;
        }
        for h in &r.removed {
            berth_core::removals::record(&mut st.removed, &h.name, h.at_ms);
        }
    }

    /// Beats to `scheduler` and takes its answer.
    pub fn beat_to(&self, scheduler: &crate::Scheduler, sequence: u64) -> Result<()> {
        let r = scheduler.heartbeat(self.beat(sequence))?;
        self.take_answer(&r);
        Ok(())
    }

    /// Ends the sessions whose lease lapsed, and stops their workers, as a host does.
    pub fn lapse(&self) {
        let now = Instant::now();
        let lapsed: Vec<String> = {
            let mut st = self.state();
            let ids: Vec<String> = st
                .sessions
                .iter()
                .filter(|(_, (_, until))| *until <= now)
                .map(|(id, _)| id.clone())
                .collect();
            for id in &ids {
                st.sessions.remove(id);
            }
            ids
        };
        for id in lapsed {
            self.stop_where(|w| w.session_id == id, "session lease expired");
        }
    }

    /// Every worker the host holds.
    pub fn workers(&self) -> Vec<pb::Worker> {
        self.lapse();
        self.state().workers.values().cloned().collect()
    }

    /// Ends a worker by itself (exit code 0).
    pub fn finish(&self, id: &str) {
        let w = {
            let mut st = self.state();
            let Some(w) = st.workers.get_mut(id) else {
                return;
            };
            w.status = pb::WorkerStatus::Succeeded as i32;
            w.exit_code = Some(0);
            w.finished_at = Some(SystemTime::now().into());
            w.clone()
        };
        let _ = self.events.send(w);
    }

    fn stop_where(&self, pick: impl Fn(&pb::Worker) -> bool, reason: &str) -> Vec<pb::Worker> {
        let (all, changed) = {
            let mut st = self.state();
            let mut all = Vec::new();
            let mut changed = Vec::new();
            for w in st.workers.values_mut().filter(|w| pick(w)) {
                if !is_terminal(w.status) {
                    w.status = pb::WorkerStatus::Stopped as i32;
                    w.reason = reason.to_owned();
                    w.finished_at = Some(SystemTime::now().into());
                    changed.push(w.clone());
                }
                all.push(w.clone());
            }
            (all, changed)
        };
        for w in changed {
            let _ = self.events.send(w);
        }
        all
    }
}

#[tonic::async_trait]
impl HostApi for FakeHost {
    async fn launch(&self, req: pb::LaunchWorkersRequest) -> Result<Vec<pb::Worker>> {
        self.reachable()?;
        self.launch_calls.fetch_add(1, Ordering::Relaxed);
        if !req.request_id.is_empty() {
            self.launches_with_request_id
                .fetch_add(1, Ordering::Relaxed);
        }
        if self.refuse_launches.load(Ordering::Relaxed) {
            return Err(Error::ResourceExhausted(format!(
                "host {}: cpu: told to refuse",
                self.name
            )));
        }
        let out = {
            let mut st = self.state();
            if !req.session_id.is_empty() && !st.sessions.contains_key(&req.session_id) {
                return Err(Error::NotFound(format!(
                    "session {} not found or ended",
                    req.session_id
                )));
            }
            let a = Self::allocated(&st);
            let n = f64::from(req.n);
            if a.cpu + n * req.cpu > self.capacity.cpu + 1e-9 {
                return Err(Error::ResourceExhausted("cpu: short".into()));
            }
            if a.memory_gb + n * req.memory_gb > self.capacity.memory_gb + 1e-9 {
                return Err(Error::ResourceExhausted("memory: short".into()));
            }
            if a.gpus + req.n * req.nvidia_gpu > self.capacity.gpus {
                return Err(Error::ResourceExhausted("gpus: short".into()));
            }
            if a.workers + req.n > self.capacity.workers {
                return Err(Error::ResourceExhausted("workers: short".into()));
            }
            let now = Some(prost_types::Timestamp::from(SystemTime::now()));
            let mut out = Vec::new();
            for _ in 0..req.n {
                let k = self.next_id.fetch_add(1, Ordering::Relaxed);
                let w = pb::Worker {
                    id: format!("{}w{k}", self.name.replace(['.', '_'], "-")),
                    session_id: req.session_id.clone(),
                    host: self.name.clone(),
                    status: pb::WorkerStatus::Running as i32,
                    cpu: req.cpu,
                    memory_gb: req.memory_gb,
                    nvidia_gpu: req.nvidia_gpu,
                    command: req.command.clone(),
                    labels: req.labels.clone(),
                    request_id: req.request_id.clone(),
                    owner: crate::hosts::current_owner(),
                    created_at: now,
                    started_at: now,
                    ..Default::default()
                };
                st.workers.insert(w.id.clone(), w.clone());
                out.push(w);
            }
            out
        };
        for w in &out {
            let _ = self.events.send(w.clone());
        }
        Ok(out)
    }

    async fn list(&self, req: pb::ListWorkersRequest) -> Result<Vec<pb::Worker>> {
        self.reachable()?;
        Ok(self
            .state()
            .workers
            .values()
            .filter(|w| req.session_id.is_empty() || w.session_id == req.session_id)
            .filter(|w| req.ids.is_empty() || req.ids.contains(&w.id))
            .cloned()
            .collect())
    }

    async fn stop(&self, req: pb::StopWorkersRequest) -> Result<Vec<pb::Worker>> {
        self.reachable()?;
        Ok(self.stop_where(
            |w| {
                req.all
                    || req.ids.contains(&w.id)
                    || (!req.session_id.is_empty() && w.session_id == req.session_id)
            },
            "stopped",
        ))
    }

    async fn open_session(&self, req: pb::OpenSessionRequest) -> Result<pb::Session> {
        self.reachable()?;
        self.lapse();
        let owner = crate::hosts::current_owner();
        let mut st = self.state();
        if let Some((held, until)) = st.sessions.get_mut(&req.id) {
            if !owner.is_empty() && held.owner != owner {
                return Err(Error::PermissionDenied(format!(
                    "session {} belongs to another user",
                    req.id
                )));
            }
            *until = Instant::now() + Duration::from_secs(u64::from(held.ttl_seconds));
            return Ok(held.clone());
        }
        let s = pb::Session {
            id: req.id.clone(),
            ttl_seconds: req.ttl_seconds,
            labels: req.labels,
            owner,
            ..Default::default()
        };
        let until = Instant::now() + Duration::from_secs(u64::from(req.ttl_seconds));
        st.sessions.insert(req.id, (s.clone(), until));
        Ok(s)
    }

    async fn keep_alive(&self, session_id: &str) -> Result<pb::Session> {
        self.reachable()?;
        self.lapse();
        let owner = crate::hosts::current_owner();
        let mut st = self.state();
        let (held, until) = st
            .sessions
            .get_mut(session_id)
            .ok_or_else(|| Error::NotFound(format!("session {session_id} not found or ended")))?;
        if !owner.is_empty() && held.owner != owner {
            return Err(Error::PermissionDenied(format!(
                "session {session_id} belongs to another user"
            )));
        }
        *until = Instant::now() + Duration::from_secs(u64::from(held.ttl_seconds));
        Ok(held.clone())
    }

    async fn close_session(&self, req: pb::CloseSessionRequest) -> Result<Vec<pb::Worker>> {
        self.reachable()?;
        if self.state().sessions.remove(&req.session_id).is_none() {
            return Err(Error::NotFound(format!(
                "session {} not found or ended",
                req.session_id
            )));
        }
        Ok(self.stop_where(|w| w.session_id == req.session_id, "session ended"))
    }

    async fn watch(&self) -> Result<ItemStream<pb::Worker>> {
        self.reachable()?;
        let name = self.name.clone();
        Ok(Box::pin(futures::StreamExt::map(
            BroadcastStream::new(self.events.subscribe()),
            move |r| r.map_err(|e| Error::Unavailable(format!("host {name}: {e}"))),
        )))
    }

    async fn output(&self, _req: pb::StreamOutputRequest) -> Result<ItemStream<pb::OutputChunk>> {
        self.reachable()?;
        Ok(Box::pin(futures::stream::empty()))
    }

    async fn info(&self) -> Result<pb::HostInfo> {
        self.reachable()?;
        Ok(self.host_info())
    }
}

/// Hands out the fake host of each name, made on first use with `capacity`.
#[derive(Debug)]
pub struct FakeCluster {
    hosts: Mutex<BTreeMap<String, Arc<FakeHost>>>,
}

impl FakeCluster {
    pub fn new() -> Arc<Self> {
        Arc::new(Self {
            hosts: Mutex::new(BTreeMap::new()),
        })
    }

    fn hosts(&self) -> MutexGuard<'_, BTreeMap<String, Arc<FakeHost>>> {
        self.hosts.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Adds a host to the simulated cluster.
    pub fn add(
        &self,
        name: &str,
        capacity: pb::Resources,
        labels: BTreeMap<String, String>,
    ) -> Arc<FakeHost> {
        let h = Arc::new(FakeHost::new(name, capacity, labels));
        self.hosts().insert(name.to_owned(), h.clone());
        h
    }

    pub fn get(&self, name: &str) -> Option<Arc<FakeHost>> {
        self.hosts().get(name).cloned()
    }

    pub fn all(&self) -> Vec<Arc<FakeHost>> {
        self.hosts().values().cloned().collect()
    }
}

/// The connector of a [`FakeCluster`] (a host it does not hold is unreachable).
#[derive(Debug)]
pub struct FakeConnector(pub Arc<FakeCluster>);

impl Connector for FakeConnector {
    fn connect(&self, name: &str, _address: &str) -> Arc<dyn HostApi> {
        match self.0.get(name) {
            Some(h) => h,
            None => {
                let h = Arc::new(FakeHost::new(
                    name,
                    pb::Resources::default(),
                    BTreeMap::new(),
                ));
                h.unreachable.store(true, Ordering::Relaxed);
                h
            }
        }
    }
}
