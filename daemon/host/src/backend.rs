//! The host supervisor as a [`WorkersBackend`]: checked requests in, domain calls to [`Host`],
//! its records out as protobuf workers.

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
        _caller: &Caller,
        id: Option<String>,
        ttl_seconds: u32,
        labels: BTreeMap<String, String>,
    ) -> Result<pb::Session> {
        let s = Host::open_session(self, ttl_seconds, labels, id).await?;
        Ok(session_to_pb(&s))
    }

    async fn keep_alive(&self, _caller: &Caller, session_id: &str) -> Result<pb::Session> {
        Ok(session_to_pb(&Host::keep_alive(self, session_id)?))
    }

    async fn close_session(
        &self,
        _caller: &Caller,
        session_id: &str,
        grace_seconds: Option<u32>,
    ) -> Result<Vec<pb::Worker>> {
        let stopped = Host::close_session(self, session_id, seconds(grace_seconds)).await?;
        Ok(workers_to_pb(&stopped))
    }

    async fn launch(
        &self,
        caller: &Caller,
        request: pb::LaunchWorkersRequest,
    ) -> Result<Vec<pb::Worker>> {
        let req = launch_from_pb(request)?;
        let spec = berth_core::launch::validate(&req, |k| self.knows_kernel(k))?;
        let workers = Host::launch(self, spec, caller.addr).await?;
        Ok(workers_to_pb(&workers))
    }

    async fn list(&self, _caller: &Caller, filter: &Filter) -> Result<Vec<pb::Worker>> {
        Ok(workers_to_pb(&Host::list(self, filter).await?))
    }

    async fn await_workers(&self, _caller: &Caller, r: AwaitRequest) -> Result<AwaitAnswer> {
        let out = Host::await_workers(self, r.ids, r.session_id, r.completion, r.timeout).await?;
        Ok(AwaitAnswer {
            workers: workers_to_pb(&out.reached),
            failures: workers_to_pb(&out.failures),
        })
    }

    async fn stop(
        &self,
        _caller: &Caller,
        selector: Selector,
        grace_seconds: Option<u32>,
    ) -> Result<Vec<pb::Worker>> {
        let workers = Host::stop(self, selector, seconds(grace_seconds), "stopped").await?;
        Ok(workers_to_pb(&workers))
    }

    async fn output(
        &self,
        _caller: &Caller,
        r: pb::StreamOutputRequest,
    ) -> Result<ItemStream<pb::OutputChunk>> {
        let rx = Host::output(
            self,
            OutputRequest {
                ids: r.ids,
                session_id: (!r.session_id.is_empty()).then_some(r.session_id),
                follow: r.follow,
                from_start: r.from_start,
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

    async fn watch(&self, _caller: &Caller, filter: Filter, initial: bool) -> Result<WatchStream> {
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
