//! The gRPC face of the host supervisor: protobuf in, domain requests to [`Host`], domain
//! results and errors out. tonic types stop here; `Error` becomes `Status` in one place.

use std::collections::BTreeMap;
use std::pin::Pin;
use std::time::Duration;

use berth_proto::v1 as pb;
use futures::Stream;
use tokio::sync::{broadcast, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use crate::core::launch::{LaunchRequest, NetworkMode, RestartPolicy};
use crate::core::worker::{WorkerRecord, WorkerStatus};
use crate::error::Error;
use crate::sys::output::StreamKind;

use super::host::{Filter, Host, OutputRequest, Selector};

/// The one place where a domain error becomes a gRPC status (the code API.md gives for it).
pub fn to_status(e: Error) -> Status {
    {
        let msg = e.to_string();
        match e {
            Error::InvalidArgument { .. } => Status::invalid_argument(msg),
            Error::ResourceExhausted(_) => Status::resource_exhausted(msg),
            Error::FailedPrecondition(_) => Status::failed_precondition(msg),
            Error::NotFound(_) => Status::not_found(msg),
            Error::Unavailable(_) => Status::unavailable(msg),
            Error::Unimplemented(_) => Status::unimplemented(msg),
            Error::Internal(_) => Status::internal(msg),
        }
    }
}

fn ts(t: std::time::SystemTime) -> prost_types::Timestamp {
    prost_types::Timestamp::from(t)
}

pub fn status_to_pb(s: WorkerStatus) -> pb::WorkerStatus {
    match s {
        WorkerStatus::Pending => pb::WorkerStatus::Pending,
        WorkerStatus::Starting => pb::WorkerStatus::Starting,
        WorkerStatus::Running => pb::WorkerStatus::Running,
        WorkerStatus::Succeeded => pb::WorkerStatus::Succeeded,
        WorkerStatus::Failed => pb::WorkerStatus::Failed,
        WorkerStatus::Stopped => pb::WorkerStatus::Stopped,
        WorkerStatus::Lost => pb::WorkerStatus::Lost,
    }
}

pub(crate) fn status_from_pb(v: i32, field: &str) -> Result<WorkerStatus, Error> {
    match pb::WorkerStatus::try_from(v) {
        Ok(pb::WorkerStatus::Pending) => Ok(WorkerStatus::Pending),
        Ok(pb::WorkerStatus::Starting) => Ok(WorkerStatus::Starting),
        Ok(pb::WorkerStatus::Running) => Ok(WorkerStatus::Running),
        Ok(pb::WorkerStatus::Succeeded) => Ok(WorkerStatus::Succeeded),
        Ok(pb::WorkerStatus::Failed) => Ok(WorkerStatus::Failed),
        Ok(pb::WorkerStatus::Stopped) => Ok(WorkerStatus::Stopped),
        Ok(pb::WorkerStatus::Lost) => Ok(WorkerStatus::Lost),
        _ => Err(Error::invalid(field, format!("unknown worker status {v}"))),
    }
}

fn network_to_pb(n: NetworkMode) -> pb::NetworkMode {
    match n {
        NetworkMode::Bridge => pb::NetworkMode::Bridge,
        NetworkMode::Host => pb::NetworkMode::Host,
        NetworkMode::None => pb::NetworkMode::None,
    }
}

/// The protobuf view of a worker.
pub fn worker_to_pb(w: &WorkerRecord) -> pb::Worker {
    pb::Worker {
        id: w.id.clone(),
        session_id: w.session_id.clone().unwrap_or_default(),
        host: w.host.clone(),
        ip_address: w.ip_address.map(|i| i.to_string()).unwrap_or_default(),
        status: status_to_pb(w.status) as i32,
        cpu: w.cpu,
        memory_gb: w.memory_bytes as f64 / crate::core::launch::GIB,
        nvidia_gpu: w.nvidia_gpu,
        gpu_uuids: w.gpu_uuids.clone(),
        kernel: w.kernel.clone(),
        command: w.command.clone(),
        pid: w.pid.unwrap_or(0),
        exit_code: w.exit_code,
        signal: w.signal,
        reason: w.reason.clone(),
        restarts: w.restarts,
        labels: w.labels.clone().into_iter().collect(),
        created_at: Some(ts(w.created_at)),
        started_at: w.started_at.map(ts),
        finished_at: w.finished_at.map(ts),
        cpu_seconds: w.cpu_seconds,
        memory_peak_bytes: w.memory_peak_bytes,
        workdir: w.workdir.to_string_lossy().into_owned(),
        network: network_to_pb(w.network) as i32,
        gpu_memory_used_bytes: w.gpu_memory_used_bytes,
    }
}

/// The domain view of a launch request; enum values outside the contract are refused.
pub fn launch_from_pb(r: pb::LaunchWorkersRequest) -> Result<LaunchRequest, Error> {
    let network = match pb::NetworkMode::try_from(r.network) {
        Ok(pb::NetworkMode::Bridge) => NetworkMode::Bridge,
        Ok(pb::NetworkMode::Host) => NetworkMode::Host,
        Ok(pb::NetworkMode::None) => NetworkMode::None,
        Err(_) => {
            return Err(Error::invalid(
                "network",
                format!("unknown network mode {}", r.network),
            ))
        }
    };
    let restart = match r.restart {
        None => RestartPolicy::default(),
        Some(p) => match pb::restart_policy::Mode::try_from(p.mode) {
            Ok(pb::restart_policy::Mode::Never) => RestartPolicy::default(),
            Ok(pb::restart_policy::Mode::OnFailure) => RestartPolicy {
                on_failure: true,
                max_restarts: p.max_restarts,
                backoff_initial_ms: p.backoff_initial_ms,
                backoff_max_ms: p.backoff_max_ms,
            },
            Err(_) => {
                return Err(Error::invalid(
                    "restart.mode",
                    format!("unknown restart mode {}", p.mode),
                ))
            }
        },
    };
    if pb::Placement::try_from(r.placement).is_err() {
        return Err(Error::invalid(
            "placement",
            format!("unknown placement {}", r.placement),
        ));
    }
    Ok(LaunchRequest {
        n: r.n,
        cpu: r.cpu,
        memory_gb: r.memory_gb,
        nvidia_gpu: r.nvidia_gpu,
        kernel: r.kernel,
        script: r.script,
        code: r.code,
        command: r.command,
        env: r.env.into_iter().collect::<BTreeMap<_, _>>(),
        session_id: r.session_id,
        workdir: r.workdir,
        master_ip: r.master_ip,
        network,
        restart,
        labels: r.labels.into_iter().collect(),
    })
}

pub(crate) fn check_ids(ids: &[String], field: &str) -> Result<(), Error> {
    for (i, id) in ids.iter().enumerate() {
        if !crate::core::is_valid_id(id) {
            return Err(Error::invalid(
                format!("{field}[{i}]"),
                format!("{id:?} is not a worker id"),
            ));
        }
    }
    Ok(())
}

pub(crate) fn check_session_id(id: &str) -> Result<(), Error> {
    if id.is_empty() {
        return Err(Error::invalid("session_id", "is required"));
    }
    if !crate::core::is_valid_id(id) {
        return Err(Error::invalid(
            "session_id",
            format!("{id:?} is not a session id"),
        ));
    }
    Ok(())
}

/// A `session_id` filter: empty means none, anything else must be a well-formed id.
pub(crate) fn check_optional_session_id(id: &str) -> Result<(), Error> {
    if id.is_empty() {
        Ok(())
    } else {
        check_session_id(id)
    }
}

/// The protobuf view of a session.
pub fn session_to_pb(s: &crate::core::session::Session) -> pb::Session {
    pb::Session {
        id: s.id.clone(),
        ttl_seconds: s.ttl.as_secs() as u32,
        expires_at: Some(ts(s.expires_at)),
        created_at: Some(ts(s.created_at)),
        labels: s.labels.clone().into_iter().collect(),
    }
}

/// `AwaitWorkersRequest.timeout_seconds`: unset is 60 s, 0 is none.
pub(crate) fn await_timeout(seconds: Option<u32>) -> Option<Duration> {
    match seconds {
        None => Some(Duration::from_secs(60)),
        Some(0) => None,
        Some(s) => Some(Duration::from_secs(u64::from(s))),
    }
}

/// What a `StopWorkersRequest` selects: exactly one of ids, session_id and all.
pub(crate) fn stop_selector(r: &pb::StopWorkersRequest) -> Result<Selector, Error> {
    check_ids(&r.ids, "ids")?;
    check_optional_session_id(&r.session_id)?;
    let selectors =
        usize::from(!r.ids.is_empty()) + usize::from(!r.session_id.is_empty()) + usize::from(r.all);
    match selectors {
        0 => Err(Error::invalid(
            "ids",
            "name the workers to stop: ids, session_id, or all = true",
        )),
        1 if r.all => Ok(Selector::All),
        1 if !r.ids.is_empty() => Ok(Selector::Ids(r.ids.clone())),
        1 => Ok(Selector::Session(r.session_id.clone())),
        _ => Err(Error::invalid(
            "all",
            "set only one of ids, session_id and all",
        )),
    }
}

pub(crate) fn opt_session(s: String) -> Option<String> {
    (!s.is_empty()).then_some(s)
}

fn filter_from(session_id: String, ids: Vec<String>, statuses: Vec<i32>) -> Result<Filter, Error> {
    check_ids(&ids, "ids")?;
    let statuses = statuses
        .into_iter()
        .enumerate()
        .map(|(i, s)| status_from_pb(s, &format!("statuses[{i}]")))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Filter {
        session_id: opt_session(session_id),
        ids,
        statuses,
    })
}

/// `berth.v1.Workers` served by a host daemon.
#[derive(Debug, Clone)]
pub struct WorkersService {
    pub host: Host,
}

pub(crate) type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl pb::workers_server::Workers for WorkersService {
    async fn open_session(
        &self,
        request: Request<pb::OpenSessionRequest>,
    ) -> Result<Response<pb::Session>, Status> {
        let r = request.into_inner();
        let id = if r.id.is_empty() {
            None
        } else if crate::core::is_valid_id(&r.id) {
            Some(r.id)
        } else {
            return Err(to_status(Error::invalid(
                "id",
                format!("{:?} is not a session id", r.id),
            )));
        };
        let s = self
            .host
            .open_session(r.ttl_seconds, r.labels.into_iter().collect(), id)
            .await
            .map_err(to_status)?;
        Ok(Response::new(session_to_pb(&s)))
    }

    async fn keep_alive(
        &self,
        request: Request<pb::KeepAliveRequest>,
    ) -> Result<Response<pb::Session>, Status> {
        let r = request.into_inner();
        check_session_id(&r.session_id).map_err(to_status)?;
        let s = self.host.keep_alive(&r.session_id).map_err(to_status)?;
        Ok(Response::new(session_to_pb(&s)))
    }

    async fn close_session(
        &self,
        request: Request<pb::CloseSessionRequest>,
    ) -> Result<Response<pb::CloseSessionResponse>, Status> {
        let r = request.into_inner();
        check_session_id(&r.session_id).map_err(to_status)?;
        let grace = r.grace_seconds.map(|s| Duration::from_secs(u64::from(s)));
        let stopped = self
            .host
            .close_session(&r.session_id, grace)
            .await
            .map_err(to_status)?;
        Ok(Response::new(pb::CloseSessionResponse {
            stopped: stopped.iter().map(worker_to_pb).collect(),
        }))
    }

    async fn launch_workers(
        &self,
        request: Request<pb::LaunchWorkersRequest>,
    ) -> Result<Response<pb::LaunchWorkersResponse>, Status> {
        let caller = request.remote_addr().map(|a| a.ip());
        let req = launch_from_pb(request.into_inner()).map_err(to_status)?;
        let spec = crate::core::launch::validate(&req, |k| self.host.knows_kernel(k))
            .map_err(to_status)?;
        let workers = self.host.launch(spec, caller).await.map_err(to_status)?;
        Ok(Response::new(pb::LaunchWorkersResponse {
            workers: workers.iter().map(worker_to_pb).collect(),
        }))
    }

    async fn list_workers(
        &self,
        request: Request<pb::ListWorkersRequest>,
    ) -> Result<Response<pb::ListWorkersResponse>, Status> {
        let r = request.into_inner();
        let filter = filter_from(r.session_id, r.ids, r.statuses).map_err(to_status)?;
        let workers = self.host.list(&filter).await.map_err(to_status)?;
        Ok(Response::new(pb::ListWorkersResponse {
            workers: workers.iter().map(worker_to_pb).collect(),
        }))
    }

    async fn await_workers(
        &self,
        request: Request<pb::AwaitWorkersRequest>,
    ) -> Result<Response<pb::AwaitWorkersResponse>, Status> {
        let r = request.into_inner();
        check_ids(&r.ids, "ids").map_err(to_status)?;
        let completion = r.wait_for_completion.unwrap_or(true);
        let timeout = await_timeout(r.timeout_seconds);
        let out = self
            .host
            .await_workers(r.ids, opt_session(r.session_id), completion, timeout)
            .await
            .map_err(to_status)?;
        Ok(Response::new(pb::AwaitWorkersResponse {
            workers: out.reached.iter().map(worker_to_pb).collect(),
            failures: out.failures.iter().map(worker_to_pb).collect(),
        }))
    }

    async fn stop_workers(
        &self,
        request: Request<pb::StopWorkersRequest>,
    ) -> Result<Response<pb::StopWorkersResponse>, Status> {
        let r = request.into_inner();
        let sel = stop_selector(&r).map_err(to_status)?;
        let grace = r.grace_seconds.map(|s| Duration::from_secs(u64::from(s)));
        let workers = self
            .host
            .stop(sel, grace, "stopped")
            .await
            .map_err(to_status)?;
        Ok(Response::new(pb::StopWorkersResponse {
            workers: workers.iter().map(worker_to_pb).collect(),
        }))
    }

    type StreamOutputStream = BoxStream<pb::OutputChunk>;

    async fn stream_output(
        &self,
        request: Request<pb::StreamOutputRequest>,
    ) -> Result<Response<Self::StreamOutputStream>, Status> {
        let r = request.into_inner();
        check_ids(&r.ids, "ids").map_err(to_status)?;
        let streams = r
            .streams
            .iter()
            .enumerate()
            .map(|(i, s)| match pb::Stream::try_from(*s) {
                Ok(pb::Stream::Stdout) => Ok(StreamKind::Stdout),
                Ok(pb::Stream::Stderr) => Ok(StreamKind::Stderr),
                _ => Err(Error::invalid(
                    format!("streams[{i}]"),
                    format!("unknown stream {s}"),
                )),
            })
            .collect::<Result<Vec<_>, _>>()
            .map_err(to_status)?;
        let rx = self
            .host
            .output(OutputRequest {
                ids: r.ids,
                session_id: opt_session(r.session_id),
                follow: r.follow,
                from_start: r.from_start,
                streams,
            })
            .map_err(to_status)?;
        let stream = futures::StreamExt::map(ReceiverStream::new(rx), |item| {
            item.map(|p| pb::OutputChunk {
                worker_id: p.worker_id,
                stream: match p.stream {
                    StreamKind::Stdout => pb::Stream::Stdout as i32,
                    StreamKind::Stderr => pb::Stream::Stderr as i32,
                },
                data: p.data,
                offset: p.offset,
            })
            .map_err(to_status)
        });
        Ok(Response::new(Box::pin(stream)))
    }

    type WatchWorkersStream = BoxStream<pb::WorkerEvent>;

    async fn watch_workers(
        &self,
        request: Request<pb::WatchWorkersRequest>,
    ) -> Result<Response<Self::WatchWorkersStream>, Status> {
        let r = request.into_inner();
        let filter = filter_from(r.session_id, r.ids, r.statuses).map_err(to_status)?;
        let filter_again = filter.clone();
        // Subscribe before the snapshot, so no change falls between them.
        let events = self.host.subscribe();
        let initial = if r.initial {
            self.host.snapshot(&filter).map_err(to_status)?
        } else {
            // Still check that named ids and the session exist (without copying every record:
            // a watch of all workers of a host with thousands would copy them all).
            self.host.check_filter(&filter).map_err(to_status)?;
            Vec::new()
        };
        let host = self.host.clone();
        let rx = spawn_watch(
            initial,
            events,
            move |w| filter.matches(w).then(|| worker_to_pb(w)),
            move || host.snapshot(&filter_again).ok(),
            self.host.shutdown_token(),
        );
        Ok(Response::new(Box::pin(rx)))
    }
}

/// The stream of a `WatchWorkers` call: `initial` first, then every change that `select` keeps
/// (and turns into its protobuf), until the client goes or `shutdown`. A reader too slow for
/// the broadcast gets the current state of everything it watches (`snapshot`) instead of the
/// changes it missed. Serves hosts and the scheduler alike.
pub(crate) fn spawn_watch<T, S, N>(
    initial: Vec<T>,
    mut events: broadcast::Receiver<T>,
    select: S,
    snapshot: N,
    shutdown: tokio_util::sync::CancellationToken,
) -> ReceiverStream<Result<pb::WorkerEvent, Status>>
where
    T: Clone + Send + 'static,
    S: Fn(&T) -> Option<pb::Worker> + Send + 'static,
    N: Fn() -> Option<Vec<T>> + Send + 'static,
{
    let (tx, rx) = mpsc::channel::<Result<pb::WorkerEvent, Status>>(256);
    tokio::spawn(async move {
        let send = |w: pb::Worker| Ok(pb::WorkerEvent { worker: Some(w) });
        let first: Vec<pb::Worker> = initial.iter().filter_map(&select).collect();
        for w in first {
            if tx.send(send(w)).await.is_err() {
                return;
            }
        }
        loop {
            let ev = tokio::select! {
                ev = events.recv() => ev,
                _ = tx.closed() => return,
                _ = shutdown.cancelled() => return,
            };
            let batch: Vec<pb::Worker> = match ev {
                Ok(w) => select(&w).into_iter().collect(),
                Err(broadcast::error::RecvError::Lagged(_)) => match snapshot() {
                    Some(now) => now.iter().filter_map(&select).collect(),
                    None => return,
                },
                Err(broadcast::error::RecvError::Closed) => return,
            };
            for w in batch {
                if tx.send(send(w)).await.is_err() {
                    return;
                }
            }
        }
    });
    ReceiverStream::new(rx)
}

/// `berth.v1.Host` served by a host daemon.
#[derive(Debug, Clone)]
pub struct HostService {
    pub host: Host,
    /// Where clients reach this daemon (first TCP listen address).
    pub address: String,
}

#[tonic::async_trait]
impl pb::host_server::Host for HostService {
    async fn get_host_info(
        &self,
        _r: Request<pb::GetHostInfoRequest>,
    ) -> Result<Response<pb::HostInfo>, Status> {
        Ok(Response::new(host_info(&self.host, &self.address)))
    }
}

/// What a host daemon tells about itself: `GetHostInfo`, and every heartbeat to a scheduler.
pub fn host_info(host: &Host, address: &str) -> pb::HostInfo {
    let v = host.view();
    let gib = crate::core::launch::GIB;
    pb::HostInfo {
        name: v.name,
        version: crate::VERSION.to_owned(),
        labels: v.labels.into_iter().collect(),
        capacity: Some(pb::Resources {
            cpu: v.capacity.cpu,
            memory_gb: v.capacity.memory_bytes as f64 / gib,
            gpus: v.gpu_capacity,
            workers: v.capacity.workers,
            addresses: v.ip_capacity,
        }),
        allocated: Some(pb::Resources {
            cpu: v.allocated.cpu,
            memory_gb: v.allocated.memory_bytes as f64 / gib,
            gpus: v.gpu_allocated,
            workers: v.allocated.workers,
            addresses: u32::try_from(v.ip_leases).unwrap_or(u32::MAX),
        }),
        gpus: v
            .gpus
            .iter()
            .map(|g| pb::Gpu {
                uuid: g.device.uuid.clone(),
                index: g.device.index,
                name: g.device.name.clone(),
                memory_total_bytes: g.device.memory_total_bytes,
                memory_used_bytes: g.sample.as_ref().map_or(0, |s| s.memory_used_bytes),
                utilization_percent: g.sample.as_ref().map_or(0, |s| s.utilization_percent),
                pci_bus_id: g.device.pci_bus_id.clone(),
                mig_enabled: g.device.mig_enabled,
                worker_id: g.holder.clone().unwrap_or_default(),
                minor_number: g.device.minor_number,
            })
            .collect(),
        subnet: v.subnet,
        cgroup_version: v.cgroup_version.number(),
        address: address.to_owned(),
        kernels: v
            .kernels
            .iter()
            .map(|k| pb::Kernel {
                name: k.name.clone(),
                path: k
                    .invocation
                    .as_ref()
                    .map(|i| i.interpreter.to_string_lossy().into_owned())
                    .unwrap_or_default(),
                available: k.invocation.is_some(),
            })
            .collect(),
        gpu_backend: v.gpu_backend.into(),
        started_at: Some(ts(v.started_at)),
    }
}
