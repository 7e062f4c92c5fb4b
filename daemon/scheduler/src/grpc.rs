//! The scheduler's gRPC face: the scheduler as a [`WorkersBackend`] (served by the same
//! `berth.v1.Workers` as a host, so requests are checked once for both), `berth.v1.Cluster` and
//! `berth.v1.Membership`.

use std::collections::BTreeMap;

use berth_proto::v1 as pb;
use tonic::{Request, Response, Status};

use berth_server::convert::to_status;

use berth_core::error::Result;
use berth_core::worker::{Filter, Selector};
use berth_server::workers::{
    spawn_watch, AwaitAnswer, AwaitRequest, Caller, ItemStream, WatchStream, WorkersBackend,
};

use super::view::selects;
use super::Scheduler;

#[tonic::async_trait]
impl WorkersBackend for Scheduler {
    async fn open_session(
        &self,
        _caller: &Caller,
        id: Option<String>,
        ttl_seconds: u32,
        labels: BTreeMap<String, String>,
    ) -> Result<pb::Session> {
        Scheduler::open_session(self, id, ttl_seconds, labels)
    }

    async fn keep_alive(&self, _caller: &Caller, session_id: &str) -> Result<pb::Session> {
        Scheduler::keep_alive(self, session_id).await
    }

    async fn close_session(
        &self,
        _caller: &Caller,
        session_id: &str,
        grace_seconds: Option<u32>,
    ) -> Result<Vec<pb::Worker>> {
        Scheduler::close_session(self, session_id, grace_seconds).await
    }

    async fn launch(
        &self,
        caller: &Caller,
        request: pb::LaunchWorkersRequest,
    ) -> Result<Vec<pb::Worker>> {
        Scheduler::launch(self, request, caller.addr).await
    }

    async fn list(&self, _caller: &Caller, filter: &Filter) -> Result<Vec<pb::Worker>> {
        Scheduler::list(self, filter)
    }

    async fn await_workers(&self, _caller: &Caller, r: AwaitRequest) -> Result<AwaitAnswer> {
        let (workers, failures) =
            Scheduler::await_workers(self, r.ids, r.session_id, r.completion, r.timeout).await?;
        Ok(AwaitAnswer { workers, failures })
    }

    async fn stop(
        &self,
        _caller: &Caller,
        selector: Selector,
        grace_seconds: Option<u32>,
    ) -> Result<Vec<pb::Worker>> {
        Scheduler::stop(self, selector, grace_seconds).await
    }

    async fn output(
        &self,
        _caller: &Caller,
        request: pb::StreamOutputRequest,
    ) -> Result<ItemStream<pb::OutputChunk>> {
        Ok(Box::pin(Scheduler::output(self, request).await?))
    }

    async fn watch(&self, _caller: &Caller, filter: Filter, initial: bool) -> Result<WatchStream> {
        // Subscribe before the snapshot, so no change falls between them.
        let events = self.subscribe();
        let snapshot = Scheduler::list(
            self,
            &Filter {
                statuses: vec![],
                ..filter.clone()
            },
        )?;
        let first: Vec<pb::Worker> = if initial {
            snapshot
                .into_iter()
                .filter(|w| selects(&filter, w))
                .collect()
        } else {
            Vec::new()
        };
        let scheduler = self.clone();
        let again = filter.clone();
        Ok(spawn_watch(
            first,
            events,
            move |w: &pb::Worker| selects(&filter, w).then(|| w.clone()),
            move || Scheduler::list(&scheduler, &again).ok(),
            self.shutdown_token(),
        ))
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
