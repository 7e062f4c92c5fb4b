//! `berth.v1.Workers`, written once over any [`WorkersBackend`]: the host supervisor and the
//! scheduler both serve it through [`WorkersService`]. Requests are checked here (ids, session
//! ids, filters, stop selectors, enum values) so that a client cannot tell the two servers apart
//! by their errors; a backend gets checked requests and the [`Caller`], and answers with
//! protobuf workers. Domain errors become statuses in one place, [`to_status`].

use std::collections::BTreeMap;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use berth_proto::v1 as pb;
use futures::Stream;
use tokio::sync::{broadcast, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use berth_core::error::{Error, Result};
use berth_core::worker::{Filter, Selector};

use crate::convert::{status_from_pb, streams_from_pb, to_status};
pub use crate::identity::Caller;
use crate::identity::Policy;
use crate::limits::CallBudget;

/// A stream of items a backend answers with; its errors become statuses at the edge.
pub type ItemStream<T> = Pin<Box<dyn Stream<Item = Result<T>> + Send + 'static>>;

/// The events of a `WatchWorkers` call (see [`spawn_watch`]).
pub type WatchStream = ReceiverStream<Result<pb::WorkerEvent, Status>>;

/// A checked `AwaitWorkersRequest`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AwaitRequest {
    /// Empty: every worker of `session_id`, or every worker when that is none too.
    pub ids: Vec<String>,
    pub session_id: Option<String>,
    /// Wait until every worker has ended (true) or runs (false).
    pub completion: bool,
    /// None: no timeout.
    pub timeout: Option<Duration>,
}

/// What an await found: every requested worker is in exactly one list.
#[derive(Debug, Clone, Default)]
pub struct AwaitAnswer {
    pub workers: Vec<pb::Worker>,
    pub failures: Vec<pb::Worker>,
}

/// What serves `berth.v1.Workers`: a host's supervisor or the scheduler over many hosts.
#[tonic::async_trait]
pub trait WorkersBackend: Send + Sync + 'static {
    /// Opens session `id` (a scheduler opens its sessions on hosts under its own id), or a new
    /// one when it is none.
    async fn open_session(
        &self,
        caller: &Caller,
        id: Option<String>,
        ttl_seconds: u32,
        labels: BTreeMap<String, String>,
    ) -> Result<pb::Session>;

    async fn keep_alive(&self, caller: &Caller, session_id: &str) -> Result<pb::Session>;

    /// Ends the session and stops its workers; returns them.
    async fn close_session(
        &self,
        caller: &Caller,
        session_id: &str,
        grace_seconds: Option<u32>,
    ) -> Result<Vec<pb::Worker>>;

    async fn launch(
        &self,
        caller: &Caller,
        request: pb::LaunchWorkersRequest,
    ) -> Result<Vec<pb::Worker>>;

    async fn list(&self, caller: &Caller, filter: &Filter) -> Result<Vec<pb::Worker>>;

    async fn await_workers(&self, caller: &Caller, request: AwaitRequest) -> Result<AwaitAnswer>;

    async fn stop(
        &self,
        caller: &Caller,
        selector: Selector,
        grace_seconds: Option<u32>,
    ) -> Result<Vec<pb::Worker>>;

    /// `request` has been checked: its ids, session id and streams are well formed.
    async fn output(
        &self,
        caller: &Caller,
        request: pb::StreamOutputRequest,
    ) -> Result<ItemStream<pb::OutputChunk>>;

    /// The workers `filter` selects, as they change (and as they are first, with `initial`).
    async fn watch(&self, caller: &Caller, filter: Filter, initial: bool) -> Result<WatchStream>;

    /// The grace period of a stop that names none: a stop or a session's close may take that
    /// long beyond the server's request timeout.
    fn default_stop_grace(&self) -> Duration {
        Duration::from_secs(10)
    }
}

/// `berth.v1.Workers` over `B`.
#[derive(Debug, Clone)]
pub struct WorkersService<B> {
    backend: B,
    policy: Arc<Policy>,
}

impl<B> WorkersService<B> {
    /// Serves `backend`; `policy` says who each request's caller is.
    pub fn new(backend: B, policy: Arc<Policy>) -> Self {
        Self { backend, policy }
    }

    async fn caller<T>(&self, request: &Request<T>) -> Result<Caller, Status> {
        self.policy.caller(request).await.map_err(to_status)
    }
}

impl<B: WorkersBackend> WorkersService<B> {
    /// A stop waits for its workers to end, SIGKILL coming after the grace period: the call's
    /// time limit (see [`crate::limits`]) grows by that period.
    fn allow_grace<T>(&self, request: &Request<T>, grace_seconds: Option<u32>) {
        if let Some(budget) = request.extensions().get::<Arc<CallBudget>>() {
            let grace = grace_seconds.map_or_else(
                || self.backend.default_stop_grace(),
                |s| Duration::from_secs(u64::from(s)),
            );
            budget.allow_extra(grace);
        }
    }
}

/// Worker ids named in `field`: at most [`berth_core::limits::MAX_IDS`], each well formed (an
/// id this server could have made); returned each once, in the order first named.
pub(crate) fn check_ids(ids: Vec<String>, field: &str) -> Result<Vec<String>> {
    if let Some((i, id)) = ids
        .iter()
        .take(berth_core::limits::MAX_IDS + 1)
        .enumerate()
        .find(|(_, id)| !berth_core::is_valid_id(id))
    {
        return Err(Error::invalid(
            format!("{field}[{i}]"),
            format!("{id:?} is not a worker id"),
        ));
    }
    berth_core::limits::dedup_ids(ids, field)
}

/// A required `session_id`.
pub(crate) fn check_session_id(id: &str) -> Result<()> {
    if id.is_empty() {
        return Err(Error::invalid("session_id", "is required"));
    }
    if !berth_core::is_valid_id(id) {
        return Err(Error::invalid(
            "session_id",
            format!("{id:?} is not a session id"),
        ));
    }
    Ok(())
}

/// `StreamOutputRequest.new_workers` follows a session: it needs `session_id` and `follow`, and
/// takes no `ids`.
fn check_new_workers(r: &pb::StreamOutputRequest) -> Result<()> {
    if !r.new_workers {
        return Ok(());
    }
    let why = if r.session_id.is_empty() {
        "needs session_id: the new workers are those of a session"
    } else if !r.follow {
        "needs follow: new workers come while the stream is open"
    } else if !r.ids.is_empty() {
        "takes the session's workers, not ids"
    } else {
        return Ok(());
    };
    Err(Error::invalid("new_workers", why))
}

/// An optional `session_id` (a filter): empty means none, anything else must be well formed.
fn optional_session_id(id: String) -> Result<Option<String>> {
    if id.is_empty() {
        Ok(None)
    } else {
        check_session_id(&id)?;
        Ok(Some(id))
    }
}

/// `AwaitWorkersRequest.timeout_seconds`: unset is 60 s, 0 is none.
fn await_timeout(seconds: Option<u32>) -> Option<Duration> {
    match seconds {
        None => Some(Duration::from_secs(60)),
        Some(0) => None,
        Some(s) => Some(Duration::from_secs(u64::from(s))),
    }
}

/// What a `StopWorkersRequest` selects: exactly one of ids, session_id and all.
fn stop_selector(r: pb::StopWorkersRequest) -> Result<Selector> {
    let ids = check_ids(r.ids, "ids")?;
    optional_session_id(r.session_id.clone())?;
    let selectors =
        usize::from(!ids.is_empty()) + usize::from(!r.session_id.is_empty()) + usize::from(r.all);
    match selectors {
        0 => Err(Error::invalid(
            "ids",
            "name the workers to stop: ids, session_id, or all = true",
        )),
        1 if r.all => Ok(Selector::All),
        1 if !ids.is_empty() => Ok(Selector::Ids(ids)),
        1 => Ok(Selector::Session(r.session_id)),
        _ => Err(Error::invalid(
            "all",
            "set only one of ids, session_id and all",
        )),
    }
}

/// A `ListWorkers`/`WatchWorkers` filter.
fn filter_from(session_id: String, ids: Vec<String>, statuses: Vec<i32>) -> Result<Filter> {
    let ids = check_ids(ids, "ids")?;
    let session_id = optional_session_id(session_id)?;
    let mut unique = Vec::new();
    for (i, s) in statuses.into_iter().enumerate() {
        let s = status_from_pb(s, &format!("statuses[{i}]"))?;
        if !unique.contains(&s) {
            unique.push(s);
        }
    }
    let statuses = unique;
    Ok(Filter {
        session_id,
        ids,
        statuses,
        owner: None,
    })
}

type StatusStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl<B: WorkersBackend + Clone> pb::workers_server::Workers for WorkersService<B> {
    async fn open_session(
        &self,
        request: Request<pb::OpenSessionRequest>,
    ) -> Result<Response<pb::Session>, Status> {
        let caller = self.caller(&request).await?;
        let r = request.into_inner();
        let id = if r.id.is_empty() {
            None
        } else if berth_core::is_valid_id(&r.id) {
            Some(r.id)
        } else {
            let e = Error::invalid("id", format!("{:?} is not a session id", r.id));
            return Err(to_status(e));
        };
        let labels = r.labels.into_iter().collect();
        let s = self
            .backend
            .open_session(&caller, id, r.ttl_seconds, labels)
            .await
            .map_err(to_status)?;
        Ok(Response::new(s))
    }

    async fn keep_alive(
        &self,
        request: Request<pb::KeepAliveRequest>,
    ) -> Result<Response<pb::Session>, Status> {
        let caller = self.caller(&request).await?;
        let r = request.into_inner();
        check_session_id(&r.session_id).map_err(to_status)?;
        let s = self.backend.keep_alive(&caller, &r.session_id).await;
        Ok(Response::new(s.map_err(to_status)?))
    }

    async fn close_session(
        &self,
        request: Request<pb::CloseSessionRequest>,
    ) -> Result<Response<pb::CloseSessionResponse>, Status> {
        let caller = self.caller(&request).await?;
        self.allow_grace(&request, request.get_ref().grace_seconds);
        let r = request.into_inner();
        check_session_id(&r.session_id).map_err(to_status)?;
        let stopped = self
            .backend
            .close_session(&caller, &r.session_id, r.grace_seconds)
            .await
            .map_err(to_status)?;
        Ok(Response::new(pb::CloseSessionResponse { stopped }))
    }

    async fn launch_workers(
        &self,
        request: Request<pb::LaunchWorkersRequest>,
    ) -> Result<Response<pb::LaunchWorkersResponse>, Status> {
        let caller = self.caller(&request).await?;
        let workers = self
            .backend
            .launch(&caller, request.into_inner())
            .await
            .map_err(to_status)?;
        Ok(Response::new(pb::LaunchWorkersResponse { workers }))
    }

    async fn list_workers(
        &self,
        request: Request<pb::ListWorkersRequest>,
    ) -> Result<Response<pb::ListWorkersResponse>, Status> {
        let caller = self.caller(&request).await?;
        let r = request.into_inner();
        let filter = filter_from(r.session_id, r.ids, r.statuses).map_err(to_status)?;
        let workers = self.backend.list(&caller, &filter).await;
        Ok(Response::new(pb::ListWorkersResponse {
            workers: workers.map_err(to_status)?,
        }))
    }

    async fn await_workers(
        &self,
        request: Request<pb::AwaitWorkersRequest>,
    ) -> Result<Response<pb::AwaitWorkersResponse>, Status> {
        let caller = self.caller(&request).await?;
        let r = request.into_inner();
        let req = AwaitRequest {
            ids: check_ids(r.ids, "ids").map_err(to_status)?,
            session_id: optional_session_id(r.session_id).map_err(to_status)?,
            completion: r.wait_for_completion.unwrap_or(true),
            timeout: await_timeout(r.timeout_seconds),
        };
        let a = self
            .backend
            .await_workers(&caller, req)
            .await
            .map_err(to_status)?;
        Ok(Response::new(pb::AwaitWorkersResponse {
            workers: a.workers,
            failures: a.failures,
        }))
    }

    async fn stop_workers(
        &self,
        request: Request<pb::StopWorkersRequest>,
    ) -> Result<Response<pb::StopWorkersResponse>, Status> {
        let caller = self.caller(&request).await?;
        self.allow_grace(&request, request.get_ref().grace_seconds);
        let r = request.into_inner();
        let grace_seconds = r.grace_seconds;
        let sel = stop_selector(r).map_err(to_status)?;
        let workers = self
            .backend
            .stop(&caller, sel, grace_seconds)
            .await
            .map_err(to_status)?;
        Ok(Response::new(pb::StopWorkersResponse { workers }))
    }

    type StreamOutputStream = StatusStream<pb::OutputChunk>;

    async fn stream_output(
        &self,
        request: Request<pb::StreamOutputRequest>,
    ) -> Result<Response<Self::StreamOutputStream>, Status> {
        let caller = self.caller(&request).await?;
        let mut r = request.into_inner();
        r.ids = check_ids(std::mem::take(&mut r.ids), "ids").map_err(to_status)?;
        optional_session_id(r.session_id.clone()).map_err(to_status)?;
        check_new_workers(&r).map_err(to_status)?;
        r.streams = streams_from_pb(&r.streams)
            .map_err(to_status)?
            .into_iter()
            .map(|s| s as i32)
            .collect();
        let stream = self.backend.output(&caller, r).await.map_err(to_status)?;
        Ok(Response::new(Box::pin(futures::StreamExt::map(
            stream,
            |c| c.map_err(to_status),
        ))))
    }

    type WatchWorkersStream = WatchStream;

    async fn watch_workers(
        &self,
        request: Request<pb::WatchWorkersRequest>,
    ) -> Result<Response<Self::WatchWorkersStream>, Status> {
        let caller = self.caller(&request).await?;
        let r = request.into_inner();
        let filter = filter_from(r.session_id, r.ids, r.statuses).map_err(to_status)?;
        let events = self.backend.watch(&caller, filter, r.initial).await;
        Ok(Response::new(events.map_err(to_status)?))
    }
}

/// The stream of a `WatchWorkers` call: `initial` first, then every change that `select` keeps
/// (and turns into its protobuf), until the client goes or `shutdown`. A reader too slow for
/// the broadcast gets the current state of everything it watches (`snapshot`) instead of the
/// changes it missed. Serves hosts and the scheduler alike.
pub fn spawn_watch<T, S, N>(
    initial: Vec<T>,
    mut events: broadcast::Receiver<T>,
    select: S,
    snapshot: N,
    shutdown: tokio_util::sync::CancellationToken,
) -> WatchStream
where
    T: Clone + Send + 'static,
    S: Fn(&T) -> Option<pb::Worker> + Send + 'static,
    N: Fn() -> Option<Vec<T>> + Send + 'static,
{
    let (tx, rx) = mpsc::channel::<Result<pb::WorkerEvent, Status>>(256);
    crate::spawn_in(tracing::info_span!("watch"), async move {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn stop(ids: &[&str], session: &str, all: bool) -> pb::StopWorkersRequest {
        pb::StopWorkersRequest {
            ids: ids.iter().map(|s| s.to_string()).collect(),
            session_id: session.into(),
            all,
            ..Default::default()
        }
    }

    fn field(r: Result<impl std::fmt::Debug>) -> String {
        match r {
            Err(Error::InvalidArgument { field, .. }) => field,
            other => panic!("expected InvalidArgument, got {other:?}"),
        }
    }

    #[test]
    fn stop_takes_exactly_one_selector() {
        assert_eq!(field(stop_selector(stop(&[], "", false))), "ids");
        assert_eq!(field(stop_selector(stop(&["abc123"], "", true))), "all");
        assert_eq!(field(stop_selector(stop(&["no/pe"], "", false))), "ids[0]");
        assert_eq!(field(stop_selector(stop(&[], "../x", false))), "session_id");
        assert_eq!(stop_selector(stop(&[], "", true)).unwrap(), Selector::All);
        assert_eq!(
            stop_selector(stop(&[], "s1234", false)).unwrap(),
            Selector::Session("s1234".into())
        );
    }

    #[test]
    fn filters_are_checked_field_by_field() {
        assert_eq!(
            field(filter_from("".into(), vec!["".into()], vec![])),
            "ids[0]"
        );
        assert_eq!(
            field(filter_from("a b".into(), vec![], vec![])),
            "session_id"
        );
        assert_eq!(
            field(filter_from("".into(), vec![], vec![3, 99])),
            "statuses[1]"
        );
        let f = filter_from("s1".into(), vec!["w1".into()], vec![3]).unwrap();
        assert_eq!(f.session_id.as_deref(), Some("s1"));
        assert!(f.selects(
            "w1",
            Some("s1"),
            Some(berth_core::worker::WorkerStatus::Running)
        ));
        assert!(!f.selects("w1", None, Some(berth_core::worker::WorkerStatus::Running)));
    }

    #[test]
    fn ids_are_listed_once_and_capped() {
        let ids = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(
            stop_selector(stop(&["w1", "w2", "w1"], "", false)).unwrap(),
            Selector::Ids(ids(&["w1", "w2"]))
        );
        let f = filter_from("".into(), ids(&["w2", "w1", "w2"]), vec![3, 3, 4, 3]).unwrap();
        assert_eq!(f.ids, ids(&["w2", "w1"]));
        assert_eq!(f.statuses.len(), 2);
        let many = vec!["w1".to_string(); berth_core::limits::MAX_IDS + 1];
        assert_eq!(field(filter_from("".into(), many, vec![])), "ids");
        // A malformed id is named before the count.
        let mut bad = vec!["w1".to_string(); berth_core::limits::MAX_IDS + 1];
        bad[3] = "../x".into();
        assert_eq!(field(check_ids(bad, "ids")), "ids[3]");
    }

    #[test]
    fn await_timeout_defaults() {
        assert_eq!(await_timeout(None), Some(Duration::from_secs(60)));
        assert_eq!(await_timeout(Some(0)), None);
        assert_eq!(await_timeout(Some(5)), Some(Duration::from_secs(5)));
    }
}
