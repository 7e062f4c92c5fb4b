//! The load limits of the shared gRPC front (both daemons serve through it), over real gRPC on a
//! Unix socket, with a backend whose calls take as long as each test needs: a burst past
//! `max_concurrent_requests` is refused at once while leases renew and awaits go on; a short
//! call past `request_timeout_seconds` is DEADLINE_EXCEEDED (a stop gets its grace on top); a
//! connection carries at most `max_streams_per_connection` calls at once.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use berth_client::{pb, Client};
use berth_core::error::{Error, Result};
use berth_core::worker::{Filter, Selector};
use berth_server::front::{bind_all, GrpcFront, Security};
use berth_server::identity::{AccessConfig, Policy};
use berth_server::limits::RequestLimits;
use berth_server::workers::{
    AwaitAnswer, AwaitRequest, Caller, ItemStream, WatchStream, WorkersBackend,
};
use tokio::sync::{mpsc, Semaphore};
use tokio_util::sync::CancellationToken;
use tonic::Code;

/// The sending end of a watch that never ends.
type WatchFeed = mpsc::Sender<std::result::Result<pb::WorkerEvent, tonic::Status>>;

/// A backend whose lists wait for a permit of `gate` (the test hands them out), whose lists of a
/// session named "slow" and stops take `slow`, and whose awaits and watches never end.
#[derive(Clone)]
struct Scripted {
    gate: Arc<Semaphore>,
    listing: Arc<AtomicUsize>,
    slow: Duration,
    watches: Arc<Mutex<Vec<WatchFeed>>>,
}

impl Scripted {
    fn new(slow: Duration) -> Self {
        Self {
            gate: Arc::new(Semaphore::new(0)),
            listing: Arc::default(),
            slow,
            watches: Arc::default(),
        }
    }
}

fn session(id: &str) -> pb::Session {
    pb::Session {
        id: id.to_owned(),
        ..Default::default()
    }
}

#[tonic::async_trait]
impl WorkersBackend for Scripted {
    async fn open_session(
        &self,
        _: &Caller,
        _: Option<String>,
        _: u32,
        _: BTreeMap<String, String>,
    ) -> Result<pb::Session> {
        Ok(session("s1"))
    }

    async fn keep_alive(&self, _: &Caller, session_id: &str) -> Result<pb::Session> {
        Ok(session(session_id))
    }

    async fn close_session(&self, _: &Caller, _: &str, _: Option<u32>) -> Result<Vec<pb::Worker>> {
        Ok(Vec::new())
    }

    async fn launch(&self, _: &Caller, _: pb::LaunchWorkersRequest) -> Result<Vec<pb::Worker>> {
        Err(Error::Unimplemented("launch".into()))
    }

    async fn list(&self, _: &Caller, filter: &Filter) -> Result<Vec<pb::Worker>> {
        if filter.session_id.as_deref() == Some("slow") {
            tokio::time::sleep(self.slow).await;
            return Ok(Vec::new());
        }
        if filter.session_id.as_deref() == Some("gated") {
            self.listing.fetch_add(1, Ordering::SeqCst);
            let _p = self.gate.acquire().await;
            self.listing.fetch_sub(1, Ordering::SeqCst);
        }
        Ok(Vec::new())
    }

    async fn await_workers(&self, _: &Caller, _: AwaitRequest) -> Result<AwaitAnswer> {
        tokio::time::sleep(self.slow).await;
        Ok(AwaitAnswer::default())
    }

    async fn stop(&self, _: &Caller, _: Selector, _: Option<u32>) -> Result<Vec<pb::Worker>> {
        tokio::time::sleep(self.slow).await;
        Ok(Vec::new())
    }

    async fn output(
        &self,
        _: &Caller,
        _: pb::StreamOutputRequest,
    ) -> Result<ItemStream<pb::OutputChunk>> {
        Err(Error::Unimplemented("output".into()))
    }

    async fn watch(&self, _: &Caller, _: Filter, _: bool) -> Result<WatchStream> {
        let (tx, rx) = mpsc::channel(1);
        self.watches.lock().unwrap().push(tx);
        Ok(tokio_stream::wrappers::ReceiverStream::new(rx))
    }
}

/// Serves `backend` under `limits` on a Unix socket in `dir`; returns its address.
async fn serve(
    dir: &std::path::Path,
    limits: RequestLimits,
    backend: Scripted,
    shutdown: CancellationToken,
) -> String {
    let addr = format!("unix:{}", dir.join("front.sock").display());
    let security = Security {
        tls: Default::default(),
        insecure_plaintext: false,
        socket_group: String::new(),
        policy: Policy::new(AccessConfig::default()),
    };
    let listeners = bind_all(std::slice::from_ref(&addr), &security)
        .await
        .unwrap();
    let front = GrpcFront::serve(listeners, &security, &limits, backend, &[], |r| r, shutdown)
        .await
        .unwrap();
    // Lives as long as the test's runtime; the token ends it.
    std::mem::forget(front);
    addr
}

fn list_of(session: &str) -> pb::ListWorkersRequest {
    pb::ListWorkersRequest {
        session_id: session.into(),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_past_the_limit_is_refused_at_once_while_leases_renew() {
    let dir = tempfile::tempdir().unwrap();
    let backend = Scripted::new(Duration::from_secs(3600));
    let shutdown = CancellationToken::new();
    let limits = RequestLimits {
        max_concurrent_requests: 4,
        ..Default::default()
    };
    let addr = serve(dir.path(), limits, backend.clone(), shutdown.clone()).await;
    let one = Client::connect(&addr).await.unwrap();
    let other = Client::connect(&addr).await.unwrap();

    // The client's one channel carries an await without a timeout and fills every slot.
    let mut w = one.workers();
    let waiting = tokio::spawn(async move {
        w.await_workers(pb::AwaitWorkersRequest {
            timeout_seconds: Some(0),
            ..Default::default()
        })
        .await
    });
    let mut held = Vec::new();
    for _ in 0..4 {
        let mut w = one.workers();
        held.push(tokio::spawn(async move {
            w.list_workers(list_of("gated")).await
        }));
    }
    let t = Instant::now();
    while backend.listing.load(Ordering::SeqCst) < 4 {
        assert!(t.elapsed() < Duration::from_secs(10), "the lists never ran");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }

    // A burst on both connections: every call is refused, and at once.
    let burst: Vec<_> = (0..64)
        .map(|i| {
            let c = if i % 2 == 0 { &one } else { &other };
            let mut w = c.workers();
            tokio::spawn(async move {
                let t = Instant::now();
                let r = w.list_workers(list_of("")).await;
                (r.map(|_| ()), t.elapsed())
            })
        })
        .collect();
    let mut slowest = Duration::ZERO;
    for b in burst {
        let (r, took) = b.await.unwrap();
        let e = r.expect_err("a call past the limit must be refused");
        assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
        assert!(e.message().contains("max_concurrent_requests"), "{e:?}");
        slowest = slowest.max(took);
    }
    assert!(
        slowest < Duration::from_secs(1),
        "refusals took up to {slowest:?}: they must not queue"
    );
    let mut s = one.workers();
    let e = s
        .open_session(pb::OpenSessionRequest::default())
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted);

    // The lease renews on the same busy channel, and quickly.
    let t = Instant::now();
    let renewed = one
        .workers()
        .keep_alive(pb::KeepAliveRequest {
            session_id: "s1".into(),
        })
        .await
        .expect("KeepAlive must not be refused by the limit");
    assert_eq!(renewed.into_inner().id, "s1");
    assert!(t.elapsed() < Duration::from_secs(1), "{:?}", t.elapsed());
    assert!(!waiting.is_finished(), "the await goes on");

    // Slots free again once the held calls end.
    backend.gate.add_permits(4);
    for h in held {
        h.await.unwrap().expect("a held call completes");
    }
    one.workers()
        .list_workers(list_of(""))
        .await
        .expect("a call within the limit runs");
    waiting.abort();
    shutdown.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_past_its_time_is_deadline_exceeded() {
    let dir = tempfile::tempdir().unwrap();
    // Every slow call takes 3 s.
    let backend = Scripted::new(Duration::from_secs(3));
    let shutdown = CancellationToken::new();
    let limits = RequestLimits {
        max_concurrent_requests: 1,
        request_timeout_seconds: 1,
        ..Default::default()
    };
    let addr = serve(dir.path(), limits, backend, shutdown.clone()).await;
    let c = Client::connect(&addr).await.unwrap();

    let t = Instant::now();
    let e = c
        .workers()
        .list_workers(list_of("slow"))
        .await
        .expect_err("a 3 s list under a 1 s limit");
    let took = t.elapsed();
    assert_eq!(e.code(), Code::DeadlineExceeded, "{e:?}");
    assert!(e.message().contains("request_timeout_seconds"), "{e:?}");
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_millis(2500),
        "answered after {took:?}"
    );
    // Its work goes on to its end, and keeps its slot until then (the limit is 1).
    let e = c.workers().list_workers(list_of("")).await.unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    tokio::time::sleep(Duration::from_millis(2500)).await;
    c.workers().list_workers(list_of("")).await.unwrap();

    // A stop may take its grace period on top of the limit.
    c.workers()
        .stop_workers(pb::StopWorkersRequest {
            all: true,
            grace_seconds: Some(5),
            ..Default::default()
        })
        .await
        .expect("a 3 s stop with a 5 s grace is within its time");
    // Awaits are not timed by the limit (their own timeout_seconds is).
    c.workers()
        .await_workers(pb::AwaitWorkersRequest {
            timeout_seconds: Some(0),
            ..Default::default()
        })
        .await
        .expect("a 3 s await is not cut at 1 s");
    shutdown.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_carries_at_most_its_streams() {
    let dir = tempfile::tempdir().unwrap();
    let backend = Scripted::new(Duration::from_secs(3600));
    let shutdown = CancellationToken::new();
    let limits = RequestLimits {
        max_streams_per_connection: 2,
        ..Default::default()
    };
    let addr = serve(dir.path(), limits, backend.clone(), shutdown.clone()).await;
    let one = Client::connect(&addr).await.unwrap();
    let other = Client::connect(&addr).await.unwrap();
    let mut streams = Vec::new();
    for _ in 0..2 {
        let s = one
            .workers()
            .watch_workers(pb::WatchWorkersRequest::default())
            .await
            .unwrap()
            .into_inner();
        streams.push(s);
    }
    // A third call on that connection waits for a stream to end...
    let mut w = one.workers();
    let mut third = tokio::spawn(async move { w.list_workers(list_of("")).await });
    assert!(
        tokio::time::timeout(Duration::from_millis(500), &mut third)
            .await
            .is_err(),
        "a third call ran beside two open streams"
    );
    // ...while another connection is served.
    other.workers().list_workers(list_of("")).await.unwrap();
    drop(streams.pop());
    tokio::time::timeout(Duration::from_secs(5), third)
        .await
        .expect("the third call runs once a stream ended")
        .unwrap()
        .unwrap();
    shutdown.cancel();
}
