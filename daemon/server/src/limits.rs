//! Load limits of the gRPC front, the same in berthd and berth-scheduler: how many short unary
//! calls run at once, how long one may take, and how many streams one connection may carry.
//!
//! An overloaded server answers at once instead of queueing without bound: a short call past
//! `max_concurrent_requests` is RESOURCE_EXHAUSTED before it runs, and one that runs longer than
//! `request_timeout_seconds` is DEADLINE_EXCEEDED. The calls that wait by design are left alone:
//! streams, `AwaitWorkers` (its own `timeout_seconds`, 0 = none), and the leases, `KeepAlive` and
//! a host's `Heartbeat`, which must renew however busy the server is. Which calls are short is
//! read from the berth.v1 descriptors (every unary method), so a new unary method is limited
//! unless it is named in [`WAITING_CALLS`].
//!
//! A call that hits its timeout is answered, but the work it started finishes on its own task
//! and keeps its slot until then (a launch is never dropped half-way): DEADLINE_EXCEEDED means,
//! as gRPC says, that the call may still take effect.

use std::collections::HashSet;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::Semaphore;
use tonic::codegen::http;
use tonic::Status;

/// The load limits of a daemon's gRPC listeners (`[load]` of its configuration).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RequestLimits {
    /// Short unary calls (everything but streams, `AwaitWorkers`, `KeepAlive` and `Heartbeat`)
    /// running at once, over all connections; one more is RESOURCE_EXHAUSTED at once.
    pub max_concurrent_requests: u32,
    /// Seconds a short unary call may run before it is DEADLINE_EXCEEDED (`StopWorkers` and
    /// `CloseSession` get their grace period on top); 0 = no limit.
    pub request_timeout_seconds: u32,
    /// Streams (calls) open at once on one HTTP/2 connection (`SETTINGS_MAX_CONCURRENT_STREAMS`):
    /// a client's further calls on that connection wait for one to end.
    pub max_streams_per_connection: u32,
}

impl Default for RequestLimits {
    fn default() -> Self {
        Self {
            max_concurrent_requests: 256,
            request_timeout_seconds: 60,
            max_streams_per_connection: 1024,
        }
    }
}

impl RequestLimits {
    /// The key of a limit that would let nothing through, if any.
    pub fn zero_limit(&self) -> Option<&'static str> {
        if self.max_concurrent_requests == 0 {
            Some("load.max_concurrent_requests")
        } else if self.max_streams_per_connection == 0 {
            Some("load.max_streams_per_connection")
        } else {
            None
        }
    }

    /// The time limit of a short call; `None` when there is none.
    pub fn timeout(&self) -> Option<Duration> {
        (self.request_timeout_seconds > 0)
            .then(|| Duration::from_secs(u64::from(self.request_timeout_seconds)))
    }
}

/// Unary calls that wait by design, and so are neither counted nor timed: an await ends when
/// its workers do (or at its own timeout), and the leases must renew however busy the server is.
pub const WAITING_CALLS: &[&str] = &[
    "/berth.v1.Workers/AwaitWorkers",
    "/berth.v1.Workers/KeepAlive",
    "/berth.v1.Membership/Heartbeat",
];

/// The gRPC paths (`/package.Service/Method`) of the short unary calls among the services of
/// the encoded descriptor set `descriptors`: every unary method but [`WAITING_CALLS`].
pub fn short_calls(descriptors: &[u8]) -> Result<Vec<String>, prost::DecodeError> {
    use prost::Message as _;
    let set = prost_types::FileDescriptorSet::decode(descriptors)?;
    let mut out = Vec::new();
    for file in &set.file {
        for service in &file.service {
            for m in &service.method {
                if m.client_streaming() || m.server_streaming() {
                    continue;
                }
                let path = format!("/{}.{}/{}", file.package(), service.name(), m.name());
                if !WAITING_CALLS.contains(&path.as_str()) {
                    out.push(path);
                }
            }
        }
    }
    out.sort();
    Ok(out)
}

/// More time a call may take beyond `request_timeout_seconds`, which its handler declares as
/// it learns it (the grace period of a stop). The limit layer puts one in every short call's
/// request extensions.
#[derive(Debug, Default)]
pub struct CallBudget {
    extra_ms: AtomicU64,
}

impl CallBudget {
    /// Allows this call `extra` more than the server's request timeout (the largest extra
    /// asked for counts).
    pub fn allow_extra(&self, extra: Duration) {
        let ms = u64::try_from(extra.as_millis()).unwrap_or(u64::MAX);
        self.extra_ms.fetch_max(ms, Ordering::Relaxed);
    }

    fn extra(&self) -> Duration {
        Duration::from_millis(self.extra_ms.load(Ordering::Relaxed))
    }
}

struct Shared {
    permits: Arc<Semaphore>,
    max: u32,
    timeout: Option<Duration>,
    short: HashSet<String>,
}

/// The tower layer that puts [`RequestLimits`] on every service of a server; one layer (one
/// count of calls in flight) serves all the listeners of a daemon.
#[derive(Clone)]
pub struct LoadLimitLayer {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for LoadLimitLayer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoadLimitLayer")
            .field("max", &self.shared.max)
            .field("timeout", &self.shared.timeout)
            .field("short_calls", &self.shared.short.len())
            .finish()
    }
}

impl LoadLimitLayer {
    /// Limits the calls named in `short` (gRPC paths) to `limits`.
    pub fn new(limits: &RequestLimits, short: impl IntoIterator<Item = String>) -> Self {
        let max = limits.max_concurrent_requests.max(1);
        Self {
            shared: Arc::new(Shared {
                permits: Arc::new(Semaphore::new(max as usize)),
                max,
                timeout: limits.timeout(),
                short: short.into_iter().collect(),
            }),
        }
    }

    /// Short calls running now.
    pub fn in_flight(&self) -> usize {
        self.shared.max as usize - self.shared.permits.available_permits()
    }
}

impl<S> tower::Layer<S> for LoadLimitLayer {
    type Service = LoadLimit<S>;

    fn layer(&self, inner: S) -> Self::Service {
        LoadLimit {
            inner,
            shared: self.shared.clone(),
        }
    }
}

/// A service under a [`LoadLimitLayer`].
#[derive(Clone)]
pub struct LoadLimit<S> {
    inner: S,
    shared: Arc<Shared>,
}

impl<S> std::fmt::Debug for LoadLimit<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LoadLimit")
    }
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

impl<S, B> tower::Service<http::Request<B>> for LoadLimit<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<tonic::body::Body>>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<B>) -> Self::Future {
        // The service that was made ready serves this call; a clone waits for the next.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        if !self.shared.short.contains(req.uri().path()) {
            return Box::pin(inner.call(req));
        }
        let Ok(permit) = self.shared.permits.clone().try_acquire_owned() else {
            let max = self.shared.max;
            tracing::debug!(path = %req.uri().path(), max, "call refused: server busy");
            let busy = Status::resource_exhausted(format!(
                "server busy: {max} calls in progress (load.max_concurrent_requests); \
                 retry with back-off"
            ));
            return Box::pin(std::future::ready(Ok(busy.into_http())));
        };
        let budget = Arc::new(CallBudget::default());
        req.extensions_mut().insert(budget.clone());
        let path = req.uri().path().to_owned();
        // Its own task: a call past its time is answered while its work finishes (and keeps
        // its slot), rather than being dropped half-way.
        let fut = inner.call(req);
        let work = crate::spawn_in(tracing::Span::current(), async move {
            let r = fut.await;
            drop(permit);
            r
        });
        let Some(timeout) = self.shared.timeout else {
            return Box::pin(async move { joined(work.await) });
        };
        Box::pin(async move {
            let start = tokio::time::Instant::now();
            tokio::pin!(work);
            loop {
                let deadline = start + timeout + budget.extra();
                tokio::select! {
                    r = &mut work => return joined(r),
                    _ = tokio::time::sleep_until(deadline) => {
                        if start + timeout + budget.extra() > deadline {
                            continue;
                        }
                        let took = start.elapsed();
                        tracing::warn!(path, ?took, "call past its time limit");
                        return Ok(Status::deadline_exceeded(format!(
                            "{path} took longer than {} s (load.request_timeout_seconds)",
                            (timeout + budget.extra()).as_secs()
                        ))
                        .into_http());
                    }
                }
            }
        })
    }
}

fn joined<T, E>(
    r: Result<Result<http::Response<T>, E>, tokio::task::JoinError>,
) -> Result<http::Response<T>, E>
where
    T: Default,
{
    match r {
        Ok(r) => r,
        Err(e) => Ok(Status::internal(format!("call failed: {e}")).into_http()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_calls_are_the_unary_ones_that_do_not_wait() {
        let short = short_calls(berth_proto::FILE_DESCRIPTOR_SET).unwrap();
        for p in [
            "/berth.v1.Workers/OpenSession",
            "/berth.v1.Workers/CloseSession",
            "/berth.v1.Workers/LaunchWorkers",
            "/berth.v1.Workers/ListWorkers",
            "/berth.v1.Workers/StopWorkers",
            "/berth.v1.Host/GetHostInfo",
            "/berth.v1.Cluster/ListHosts",
            "/berth.v1.Cluster/DrainHost",
        ] {
            assert!(short.iter().any(|s| s == p), "{p} in {short:?}");
        }
        for p in WAITING_CALLS.iter().chain(&[
            "/berth.v1.Workers/StreamOutput",
            "/berth.v1.Workers/WatchWorkers",
        ]) {
            assert!(!short.iter().any(|s| s == p), "{p} in {short:?}");
        }
    }

    #[test]
    fn zero_limits_are_named() {
        let l = RequestLimits {
            max_concurrent_requests: 0,
            ..Default::default()
        };
        assert_eq!(l.zero_limit(), Some("load.max_concurrent_requests"));
        assert_eq!(RequestLimits::default().zero_limit(), None);
        let none = RequestLimits {
            request_timeout_seconds: 0,
            ..Default::default()
        };
        assert_eq!(none.timeout(), None);
        assert_eq!(
            RequestLimits::default().timeout(),
            Some(Duration::from_secs(60))
        );
    }

    #[test]
    fn a_budget_keeps_the_largest_extra() {
        let b = CallBudget::default();
        b.allow_extra(Duration::from_secs(10));
        b.allow_extra(Duration::from_secs(3));
        assert_eq!(b.extra(), Duration::from_secs(10));
    }
}
