//! The host supervisor as a [`WorkersBackend`]: checked requests in, domain calls to [`Host`],
//! its records out as protobuf workers. Who may do what is decided here, before the call (see
//! `supervisor::access`): named sessions and workers must be the caller's (or the caller an
//! admin), and a selection that names none means the caller's own.

use std::collections::BTreeMap;
use std::time::Duration;

use berth_proto::v1 as pb;
use tokio_stream::wrappers::ReceiverStream;

use berth_core::error::Result;
use berth_core::worker::{Filter, Selector};
use berth_sys::output::StreamKind;

use crate::supervisor::{Host, OutputRequest};
use berth_server::convert::{launch_from_pb, session_to_pb, streams_from_pb, worker_to_pb};
use berth_server::workers::{
    spawn_watch, AwaitAnswer, AwaitRequest, Caller, ItemStream, WatchStream, WorkersBackend,
};

/// `filter` as `caller` may use it: named sessions and workers must be its own, and it sees only
/// its own workers unless it is an admin.
fn own(caller: &Caller, host: &Host, filter: &Filter) -> Result<Filter> {
    host.authorize(caller, &filter.ids, filter.session_id.as_deref())?;
    let mut f = filter.clone();
    if !caller.admin {
        f.owner = Some(caller.owner.clone());
    }
    Ok(f)
}

fn seconds(s: Option<u32>) -> Option<Duration> {
    s.map(|s| Duration::from_secs(u64::from(s)))
}

fn workers_to_pb(ws: &[berth_core::worker::WorkerRecord]) -> Vec<pb::Worker> {
    ws.iter().map(worker_to_pb).collect()
}

#[tonic::async_trait]
impl WorkersBackend for Host {
    async fn open_session(
        &self,
        caller: &Caller,
        id: Option<String>,
        ttl_seconds: u32,
        labels: BTreeMap<String, String>,
    ) -> Result<pb::Session> {
        let s = Host::open_session(self, ttl_seconds, labels, id, &caller.owner).await?;
        Ok(session_to_pb(&s))
    }

    async fn keep_alive(&self, caller: &Caller, session_id: &str) -> Result<pb::Session> {
        self.authorize(caller, &[], Some(session_id))?;
        Ok(session_to_pb(&Host::keep_alive(self, session_id).await?))
    }

    async fn close_session(
        &self,
        caller: &Caller,
        session_id: &str,
        grace_seconds: Option<u32>,
    ) -> Result<Vec<pb::Worker>> {
        self.authorize(caller, &[], Some(session_id))?;
        let stopped = Host::close_session(self, session_id, seconds(grace_seconds)).await?;
        Ok(workers_to_pb(&stopped))
    }

    async fn launch(
        &self,
        caller: &Caller,
        request: pb::LaunchWorkersRequest,
    ) -> Result<Vec<pb::Worker>> {
        crate::phase!("received");
        let run_as_root = request.run_as_root;
        let req = launch_from_pb(request)?;
        berth_core::limits::check_sizes(&req, self.limits())?;
        let spec = berth_core::launch::validate(&req, |k| self.knows_kernel(k))?;
        self.authorize(caller, &[], spec.session_id.as_deref())?;
        let who = self.run_as(caller, run_as_root)?;
        let workers = Host::launch(self, spec, who).await?;
        crate::phase!("answered");
        Ok(workers_to_pb(&workers))
    }

    async fn list(&self, caller: &Caller, filter: &Filter) -> Result<Vec<pb::Worker>> {
        let filter = own(caller, self, filter)?;
        Ok(workers_to_pb(&Host::list(self, &filter).await?))
    }

    async fn await_workers(&self, caller: &Caller, r: AwaitRequest) -> Result<AwaitAnswer> {
        crate::phase!("await_received");
        self.authorize(caller, &r.ids, r.session_id.as_deref())?;
        let ids = if r.ids.is_empty() && r.session_id.is_none() && !caller.admin {
            // "Every worker" is every worker of the caller's.
            let own = self.ids_of_owner(&caller.owner);
            if own.is_empty() {
                return Ok(AwaitAnswer::default());
            }
            own
        } else {
            r.ids
        };
        let out = Host::await_workers(self, ids, r.session_id, r.completion, r.timeout).await?;
        crate::phase!("await_woken");
        Ok(AwaitAnswer {
            workers: workers_to_pb(&out.reached),
            failures: workers_to_pb(&out.failures),
        })
    }

    async fn stop(
        &self,
        caller: &Caller,
        selector: Selector,
        grace_seconds: Option<u32>,
    ) -> Result<Vec<pb::Worker>> {
        let selector = match selector {
            Selector::Ids(ids) => {
                self.authorize(caller, &ids, None)?;
                Selector::Ids(ids)
            }
            Selector::Session(s) => {
                self.authorize(caller, &[], Some(&s))?;
                Selector::Session(s)
            }
            // `all` is all of the caller's own.
            Selector::All if !caller.admin => {
                let own = self.ids_of_owner(&caller.owner);
                if own.is_empty() {
                    return Ok(Vec::new());
                }
                Selector::Ids(own)
            }
            Selector::All => Selector::All,
        };
        let workers = Host::stop(self, selector, seconds(grace_seconds), "stopped").await?;
        Ok(workers_to_pb(&workers))
    }

    async fn output(
        &self,
        caller: &Caller,
        r: pb::StreamOutputRequest,
    ) -> Result<ItemStream<pb::OutputChunk>> {
        let session = (!r.session_id.is_empty()).then_some(r.session_id.as_str());
        self.authorize(caller, &r.ids, session)?;
        let rx = Host::output(
            self,
            OutputRequest {
                ids: r.ids,
                session_id: (!r.session_id.is_empty()).then_some(r.session_id),
                follow: r.follow,
                from_start: r.from_start,
                new_workers: r.new_workers,
                streams: streams_from_pb(&r.streams)?
                    .into_iter()
                    .map(|s| match s {
                        pb::Stream::Stderr => StreamKind::Stderr,
                        _ => StreamKind::Stdout,
                    })
                    .collect(),
            },
        )?;
        Ok(Box::pin(futures::StreamExt::map(
            ReceiverStream::new(rx),
            |item| {
                item.map(|p| pb::OutputChunk {
                    worker_id: p.worker_id,
                    stream: match p.stream {
                        StreamKind::Stdout => pb::Stream::Stdout as i32,
                        StreamKind::Stderr => pb::Stream::Stderr as i32,
                    },
                    data: p.data,
                    offset: p.offset,
                })
            },
        )))
    }

    fn default_stop_grace(&self) -> Duration {
        Host::stop_grace(self)
    }

    async fn watch(&self, caller: &Caller, filter: Filter, initial: bool) -> Result<WatchStream> {
        let filter = own(caller, self, &filter)?;
        // Subscribe before the snapshot, so no change falls between them.
        let events = self.subscribe();
        let first = if initial {
            self.snapshot(&filter)?
        } else {
            // Still check that named ids and the session exist (without copying every record:
            // a watch of all workers of a host with thousands would copy them all).
            self.check_filter(&filter)?;
            Vec::new()
        };
        let host = self.clone();
        let again = filter.clone();
        Ok(spawn_watch(
            first,
            events,
            move |w| filter.matches(w).then(|| worker_to_pb(w)),
            move || host.snapshot(&again).ok(),
            self.shutdown_token(),
        ))
    }
}
