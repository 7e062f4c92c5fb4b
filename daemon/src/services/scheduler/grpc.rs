//! The scheduler's gRPC face: `berth.v1.Workers` (the same API as a host, over every host),
//! `berth.v1.Cluster` and `berth.v1.Membership`. Requests are checked as a host checks them, so
//! a client cannot tell the two servers apart by their errors.

use berth_proto::v1 as pb;
use tonic::{Request, Response, Status};

use crate::services::grpc::to_status;

use crate::error::Error;
use crate::services::grpc::{
    await_timeout, check_ids, check_optional_session_id, check_session_id, opt_session,
    spawn_watch, status_from_pb, stop_selector, BoxStream,
};

use super::view::Filter;
use super::Scheduler;

/// A `ListWorkers`/`WatchWorkers` filter, checked as a host checks it.
fn filter_from(session_id: String, ids: Vec<String>, statuses: Vec<i32>) -> Result<Filter, Error> {
    check_ids(&ids, "ids")?;
    check_optional_session_id(&session_id)?;
    for (i, s) in statuses.iter().enumerate() {
        status_from_pb(*s, &format!("statuses[{i}]"))?;
    }
    Ok(Filter {
        session_id: opt_session(session_id),
        ids,
        statuses,
    })
}

/// `berth.v1.Workers` served by the scheduler.
#[derive(Debug, Clone)]
pub struct SchedulerWorkers {
    pub scheduler: Scheduler,
}

#[tonic::async_trait]
impl pb::workers_server::Workers for SchedulerWorkers {
    async fn open_session(
        &self,
        request: Request<pb::OpenSessionRequest>,
    ) -> Result<Response<pb::Session>, Status> {
        Ok(Response::new(
            self.scheduler
                .open_session(request.into_inner())
                .map_err(to_status)?,
        ))
    }

    async fn keep_alive(
        &self,
        request: Request<pb::KeepAliveRequest>,
    ) -> Result<Response<pb::Session>, Status> {
        let r = request.into_inner();
        check_session_id(&r.session_id).map_err(to_status)?;
        Ok(Response::new(
            self.scheduler
                .keep_alive(&r.session_id)
                .await
                .map_err(to_status)?,
        ))
    }

    async fn close_session(
        &self,
        request: Request<pb::CloseSessionRequest>,
    ) -> Result<Response<pb::CloseSessionResponse>, Status> {
        let r = request.into_inner();
        check_session_id(&r.session_id).map_err(to_status)?;
        let stopped = self
            .scheduler
            .close_session(&r.session_id, r.grace_seconds)
            .await
            .map_err(to_status)?;
        Ok(Response::new(pb::CloseSessionResponse { stopped }))
    }

    async fn launch_workers(
        &self,
        request: Request<pb::LaunchWorkersRequest>,
    ) -> Result<Response<pb::LaunchWorkersResponse>, Status> {
        let caller = request.remote_addr().map(|a| a.ip());
        let workers = self
            .scheduler
            .launch(request.into_inner(), caller)
            .await
            .map_err(to_status)?;
        Ok(Response::new(pb::LaunchWorkersResponse { workers }))
    }

    async fn list_workers(
        &self,
        request: Request<pb::ListWorkersRequest>,
    ) -> Result<Response<pb::ListWorkersResponse>, Status> {
        let r = request.into_inner();
        let filter = filter_from(r.session_id, r.ids, r.statuses).map_err(to_status)?;
        Ok(Response::new(pb::ListWorkersResponse {
            workers: self.scheduler.list(&filter).map_err(to_status)?,
        }))
    }

    async fn await_workers(
        &self,
        request: Request<pb::AwaitWorkersRequest>,
    ) -> Result<Response<pb::AwaitWorkersResponse>, Status> {
        let r = request.into_inner();
        check_ids(&r.ids, "ids").map_err(to_status)?;
        check_optional_session_id(&r.session_id).map_err(to_status)?;
        let (workers, failures) = self
            .scheduler
            .await_workers(
                r.ids,
                opt_session(r.session_id),
                r.wait_for_completion.unwrap_or(true),
                await_timeout(r.timeout_seconds),
            )
            .await
            .map_err(to_status)?;
        Ok(Response::new(pb::AwaitWorkersResponse {
            workers,
            failures,
        }))
    }

    async fn stop_workers(
        &self,
        request: Request<pb::StopWorkersRequest>,
    ) -> Result<Response<pb::StopWorkersResponse>, Status> {
        let r = request.into_inner();
        let sel = stop_selector(&r).map_err(to_status)?;
        let workers = self
            .scheduler
            .stop(sel, r.grace_seconds)
            .await
            .map_err(to_status)?;
        Ok(Response::new(pb::StopWorkersResponse { workers }))
    }

    type StreamOutputStream = BoxStream<pb::OutputChunk>;

    async fn stream_output(
        &self,
        request: Request<pb::StreamOutputRequest>,
    ) -> Result<Response<Self::StreamOutputStream>, Status> {
        let r = request.into_inner();
        check_ids(&r.ids, "ids").map_err(to_status)?;
        check_optional_session_id(&r.session_id).map_err(to_status)?;
        let stream = self.scheduler.output(r).await.map_err(to_status)?;
        Ok(Response::new(Box::pin(futures::StreamExt::map(
            stream,
            |c| c.map_err(to_status),
        ))))
    }

    type WatchWorkersStream = BoxStream<pb::WorkerEvent>;

    async fn watch_workers(
        &self,
        request: Request<pb::WatchWorkersRequest>,
    ) -> Result<Response<Self::WatchWorkersStream>, Status> {
        let r = request.into_inner();
        let filter = filter_from(r.session_id, r.ids, r.statuses).map_err(to_status)?;
        // Subscribe before the snapshot, so no change falls between them.
        let events = self.scheduler.subscribe();
        let snapshot = self
            .scheduler
            .list(&Filter {
                statuses: vec![],
                ..filter.clone()
            })
            .map_err(to_status)?;
        let initial: Vec<pb::Worker> = if r.initial {
            snapshot.into_iter().filter(|w| filter.matches(w)).collect()
        } else {
            Vec::new()
        };
        let scheduler = self.scheduler.clone();
        let select_filter = filter.clone();
        let rx = spawn_watch(
            initial,
            events,
            move |w: &pb::Worker| select_filter.matches(w).then(|| w.clone()),
            move || scheduler.list(&filter).ok(),
            self.scheduler.shutdown_token(),
        );
        Ok(Response::new(Box::pin(rx)))
    }
}

/// `berth.v1.Cluster` served by the scheduler.
#[derive(Debug, Clone)]
pub struct SchedulerCluster {
    pub scheduler: Scheduler,
}

#[tonic::async_trait]
impl pb::cluster_server::Cluster for SchedulerCluster {
    async fn list_hosts(
        &self,
        _r: Request<pb::ListHostsRequest>,
    ) -> Result<Response<pb::ListHostsResponse>, Status> {
        Ok(Response::new(pb::ListHostsResponse {
            hosts: self.scheduler.list_hosts(),
        }))
    }

    async fn drain_host(
        &self,
        request: Request<pb::DrainHostRequest>,
    ) -> Result<Response<pb::ClusterHost>, Status> {
        let name = request.into_inner().name;
        Ok(Response::new(
            self.scheduler
                .set_draining(&name, true)
                .await
                .map_err(to_status)?,
        ))
    }

    async fn undrain_host(
        &self,
        request: Request<pb::UndrainHostRequest>,
    ) -> Result<Response<pb::ClusterHost>, Status> {
        let name = request.into_inner().name;
        Ok(Response::new(
            self.scheduler
                .set_draining(&name, false)
                .await
                .map_err(to_status)?,
        ))
    }
}

/// `berth.v1.Membership` served by the scheduler, called by host daemons.
#[derive(Debug, Clone)]
pub struct SchedulerMembership {
    pub scheduler: Scheduler,
}

#[tonic::async_trait]
impl pb::membership_server::Membership for SchedulerMembership {
    async fn heartbeat(
        &self,
        request: Request<pb::HeartbeatRequest>,
    ) -> Result<Response<pb::HeartbeatResponse>, Status> {
        Ok(Response::new(
            self.scheduler
                .heartbeat(request.into_inner())
                .map_err(to_status)?,
        ))
    }
}
