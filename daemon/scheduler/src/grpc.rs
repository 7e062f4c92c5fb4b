//! The scheduler's gRPC face: the scheduler as a [`WorkersBackend`] (served by the same
//! `berth.v1.Workers` as a host, so requests are checked once for both), `berth.v1.Cluster` and
//! `berth.v1.Membership`.

use std::collections::BTreeMap;
use std::sync::Arc;

use berth_proto::v1 as pb;
use tonic::{Request, Response, Status};

use berth_server::convert::to_status;
use berth_server::identity::{Policy, Principal};

use berth_core::error::Result;
use berth_core::worker::{Filter, Selector};
use berth_server::workers::{
    spawn_watch, AwaitAnswer, AwaitRequest, Caller, ItemStream, WatchStream, WorkersBackend,
};

use super::hosts::as_caller;
use super::view::selects;
use super::Scheduler;

/// Refuses (PERMISSION_DENIED) when `caller` names a session or a worker of another user;
/// unknown ones are left to the call itself (NOT_FOUND).
fn authorize(s: &Scheduler, caller: &Caller, ids: &[String], session: Option<&str>) -> Result<()> {
    if caller.admin {
        return Ok(());
    }
    if let Some(id) = session {
        if let Some(owner) = s.session_owner(id) {
            caller.check_owns(&owner, &format!("session {id}"))?;
        }
    }
    for (id, owner) in s.worker_owners(ids) {
        caller.check_owns(&owner, &format!("worker {id}"))?;
    }
    Ok(())
}

/// `filter` as `caller` may use it: named sessions and workers its own, and only its own
/// workers unless it is an admin.
fn own(s: &Scheduler, caller: &Caller, filter: &Filter) -> Result<Filter> {
    authorize(s, caller, &filter.ids, filter.session_id.as_deref())?;
    let mut f = filter.clone();
    if !caller.admin {
        f.owner = Some(caller.owner.clone());
    }
    Ok(f)
}

/// The ids of `caller`'s own workers: what a selection that names none means for a caller who
/// is not an admin.
fn own_ids(s: &Scheduler, caller: &Caller) -> Result<Vec<String>> {
    let f = Filter {
        owner: Some(caller.owner.clone()),
        ..Default::default()
    };
    Ok(Scheduler::list(s, &f)?.into_iter().map(|w| w.id).collect())
}

#[tonic::async_trait]
impl WorkersBackend for Scheduler {
    async fn open_session(
        &self,
        caller: &Caller,
        id: Option<String>,
        ttl_seconds: u32,
        labels: BTreeMap<String, String>,
    ) -> Result<pb::Session> {
        as_caller(
            caller,
            Scheduler::open_session(self, id, ttl_seconds, labels, &caller.owner),
        )
        .await
    }

    async fn keep_alive(&self, caller: &Caller, session_id: &str) -> Result<pb::Session> {
        authorize(self, caller, &[], Some(session_id))?;
        as_caller(caller, Scheduler::keep_alive(self, session_id)).await
    }

    async fn close_session(
        &self,
        caller: &Caller,
        session_id: &str,
        grace_seconds: Option<u32>,
    ) -> Result<Vec<pb::Worker>> {
        authorize(self, caller, &[], Some(session_id))?;
        as_caller(
            caller,
            Scheduler::close_session(self, session_id, grace_seconds),
        )
        .await
    }

    async fn launch(
        &self,
        caller: &Caller,
        request: pb::LaunchWorkersRequest,
    ) -> Result<Vec<pb::Worker>> {
        if !request.session_id.is_empty() {
            authorize(self, caller, &[], Some(&request.session_id))?;
        }
        // The hosts decide whom the workers run as, from the caller forwarded to them.
        as_caller(caller, Scheduler::launch(self, request, caller.addr)).await
    }

    async fn list(&self, caller: &Caller, filter: &Filter) -> Result<Vec<pb::Worker>> {
        Scheduler::list(self, &own(self, caller, filter)?)
    }

    async fn await_workers(&self, caller: &Caller, r: AwaitRequest) -> Result<AwaitAnswer> {
        authorize(self, caller, &r.ids, r.session_id.as_deref())?;
        let ids = if r.ids.is_empty() && r.session_id.is_none() && !caller.admin {
            let own = own_ids(self, caller)?;
            if own.is_empty() {
                return Ok(AwaitAnswer::default());
            }
            own
        } else {
            r.ids
        };
        let (workers, failures) =
            Scheduler::await_workers(self, ids, r.session_id, r.completion, r.timeout).await?;
        Ok(AwaitAnswer { workers, failures })
    }

    async fn stop(
        &self,
        caller: &Caller,
        selector: Selector,
        grace_seconds: Option<u32>,
    ) -> Result<Vec<pb::Worker>> {
        let selector = match selector {
            Selector::Ids(ids) => {
                authorize(self, caller, &ids, None)?;
                Selector::Ids(ids)
            }
            Selector::Session(s) => {
                authorize(self, caller, &[], Some(&s))?;
                Selector::Session(s)
            }
            Selector::All if !caller.admin => {
                let own = own_ids(self, caller)?;
                if own.is_empty() {
                    return Ok(Vec::new());
                }
                Selector::Ids(own)
            }
            Selector::All => Selector::All,
        };
        as_caller(caller, Scheduler::stop(self, selector, grace_seconds)).await
    }

    async fn output(
        &self,
        caller: &Caller,
        request: pb::StreamOutputRequest,
    ) -> Result<ItemStream<pb::OutputChunk>> {
        let session = (!request.session_id.is_empty()).then_some(request.session_id.as_str());
        authorize(self, caller, &request.ids, session)?;
        // As the caller on the hosts too: each host checks again whose the workers are.
        Ok(Box::pin(
            as_caller(caller, Scheduler::output(self, request)).await?,
        ))
    }

    async fn watch(&self, caller: &Caller, filter: Filter, initial: bool) -> Result<WatchStream> {
        let filter = own(self, caller, &filter)?;
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
    pub policy: Arc<Policy>,
}

impl SchedulerCluster {
    /// Changing the cluster (drain, undrain, remove) is for root and admins.
    async fn check_admin<T>(&self, request: &Request<T>, what: &str) -> Result<(), Status> {
        let c = self.policy.caller(request).await.map_err(to_status)?;
        if c.admin {
            Ok(())
        } else {
            Err(Status::permission_denied(format!(
                "{what}: only root or a member of admin_group may change the cluster"
            )))
        }
    }
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
        self.check_admin(&request, "DrainHost").await?;
        let name = request.into_inner().name;
        Ok(Response::new(
            self.scheduler
                .set_draining(&name, true)
                .await
                .map_err(to_status)?,
        ))
    }

    async fn remove_host(
        &self,
        request: Request<pb::RemoveHostRequest>,
    ) -> Result<Response<pb::RemoveHostResponse>, Status> {
        self.check_admin(&request, "RemoveHost").await?;
        let name = request.into_inner().name;
        let (host, workers_lost) = self.scheduler.remove_host(&name).await.map_err(to_status)?;
        Ok(Response::new(pb::RemoveHostResponse {
            host: Some(host),
            workers_lost,
        }))
    }

    async fn undrain_host(
        &self,
        request: Request<pb::UndrainHostRequest>,
    ) -> Result<Response<pb::ClusterHost>, Status> {
        self.check_admin(&request, "UndrainHost").await?;
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
    pub policy: Arc<Policy>,
}

/// Whether `peer` may speak for host `name`: a host's certificate must carry its name (no host
/// takes over another's); over a Unix socket or loopback, only root (hosts run as root); without
/// proven identity (`insecure_plaintext`), anyone.
fn may_be_host(peer: &Principal, name: &str) -> Result<(), Status> {
    match peer {
        Principal::Cert(c) if c == name => Ok(()),
        Principal::Cert(c) => Err(Status::permission_denied(format!(
            "info.name: {name:?} is not the name in this host's certificate ({c:?})"
        ))),
        Principal::Uid(0) | Principal::Anonymous => Ok(()),
        other => Err(Status::permission_denied(format!(
            "info.name: {other} may not join as a host (only root or a host certificate)"
        ))),
    }
}

#[tonic::async_trait]
impl pb::membership_server::Membership for SchedulerMembership {
    async fn heartbeat(
        &self,
        request: Request<pb::HeartbeatRequest>,
    ) -> Result<Response<pb::HeartbeatResponse>, Status> {
        let caller = self.policy.caller(&request).await.map_err(to_status)?;
        let name = request
            .get_ref()
            .info
            .as_ref()
            .map(|i| i.name.clone())
            .unwrap_or_default();
        may_be_host(&caller.principal, &name)?;
        Ok(Response::new(
            self.scheduler
                .heartbeat(request.into_inner())
                .map_err(to_status)?,
        ))
    }
}
