//! The host supervisor and its gRPC face: wiring of core to sys and to tonic.

pub mod front;
pub mod grpc;
pub mod host;
pub mod host_workers;
pub mod member;
pub mod metrics;
pub mod scheduler;
pub mod server;
pub mod workers;

use std::future::Future;

use tracing::Instrument as _;

/// Spawns `task` inside `span`, so that every line it logs carries the span's fields (a worker's
/// id and session, a host's name): one worker's story can be read from the logs.
pub(crate) fn spawn_in<F>(span: tracing::Span, task: F) -> tokio::task::JoinHandle<F::Output>
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    tokio::spawn(task.instrument(span))
}

/// The span of a task that looks after one worker.
pub(crate) fn worker_span(id: &str, session: Option<&str>) -> tracing::Span {
    tracing::info_span!("worker", id = %id, session = session.unwrap_or(""))
}
