//! Protobuf and the domain, both ways: workers, sessions, launch requests, statuses; the
//! domain error becomes a `Status` in one place ([`to_status`]).

use std::collections::BTreeMap;

use berth_proto::v1 as pb;
use tonic::Status;

use berth_core::error::Error;
use berth_core::launch::{LaunchRequest, NetworkMode, RestartPolicy};
use berth_core::worker::{WorkerRecord, WorkerStatus};

/// The one place where a domain error becomes a gRPC status (the code API.md gives for it).
pub fn to_status(e: Error) -> Status {
    let msg = e.to_string();
    match e {
        Error::InvalidArgument { .. } => Status::invalid_argument(msg),
        Error::ResourceExhausted(_) => Status::resource_exhausted(msg),
        Error::FailedPrecondition(_) => Status::failed_precondition(msg),
        Error::NotFound(_) => Status::not_found(msg),
        Error::Unavailable(_) => Status::unavailable(msg),
        Error::Unimplemented(_) => Status::unimplemented(msg),
        Error::Unauthenticated(_) => Status::unauthenticated(msg),
        Error::PermissionDenied(_) => Status::permission_denied(msg),
        Error::Internal(_) => Status::internal(msg),
    }
}

pub fn ts(t: std::time::SystemTime) -> prost_types::Timestamp {
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

pub fn status_from_pb(v: i32, field: &str) -> Result<WorkerStatus, Error> {
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
        memory_gb: w.memory_bytes as f64 / berth_core::launch::GIB,
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
        owner: w.owner.clone(),
        user: w.user.clone(),
        pooled: w.pooled,
        output_dropped_bytes: w.output_dropped_bytes,
        request_id: w.request_id.clone().unwrap_or_default(),
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
        request_id: r.request_id,
    })
}

/// `StreamOutputRequest.streams`, each a known stream, each once (in the order first named).
pub fn streams_from_pb(streams: &[i32]) -> Result<Vec<pb::Stream>, Error> {
    let mut out = Vec::new();
    for (i, s) in streams.iter().enumerate() {
        match pb::Stream::try_from(*s) {
            Ok(s @ (pb::Stream::Stdout | pb::Stream::Stderr)) => {
                if !out.contains(&s) {
                    out.push(s);
                }
            }
            _ => {
                return Err(Error::invalid(
                    format!("streams[{i}]"),
                    format!("unknown stream {s}"),
                ))
            }
        }
    }
    Ok(out)
}

/// The protobuf view of a session.
pub fn session_to_pb(s: &berth_core::session::Session) -> pb::Session {
    pb::Session {
        id: s.id.clone(),
        ttl_seconds: s.ttl.as_secs() as u32,
        expires_at: Some(ts(s.expires_at)),
        created_at: Some(ts(s.created_at)),
        labels: s.labels.clone().into_iter().collect(),
        owner: s.owner.clone(),
    }
}
