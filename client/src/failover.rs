//! Calls over a list of addresses (scheduler replicas) that move on to the next replica when
//! the one in use cannot be reached, also in the middle of a call, and run the call again there.
//! Only calls that may run twice go through it: reads, keep-alives, stops, and launches, which
//! carry a `request_id` (one is made for a launch that has none), so that a launch retried on
//! another replica gets the workers of the first instead of launching again.

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

use crate::{pb, Client, ClientError, TlsFiles};

/// How long a call keeps trying the replicas before it gives up, by default.
pub const DEFAULT_PATIENCE: Duration = Duration::from_secs(30);

/// How long a call that failed midway waits before it runs again on the next replica.
const SETTLE: Duration = Duration::from_millis(250);

/// A client of a list of replicas; see the module documentation.
#[derive(Debug)]
pub struct Failover {
    addrs: Vec<String>,
    tls: TlsFiles,
    /// The replica in use (its index in `addrs`) and its connection.
    current: tokio::sync::Mutex<Option<(usize, Client)>>,
    patience: Duration,
}

/// Whether a failed call says that the replica could not be reached or has gone, rather than
/// answering: the call can run again on another replica.
pub fn is_unreachable(s: &tonic::Status) -> bool {
    // The connection itself failed (a status made from a transport error carries it).
    let from_transport = std::error::Error::source(s)
        .is_some_and(|e| e.downcast_ref::<tonic::transport::Error>().is_some());
    if from_transport {
        return true;
    }
    match s.code() {
        tonic::Code::Unavailable => true,
        // A connection that broke in the middle of a call (the server was killed).
        tonic::Code::Unknown | tonic::Code::Internal => {
            let m = s.message().to_ascii_lowercase();
            [
                "transport error",
                "connection",
                "broken pipe",
                "stream closed",
            ]
            .iter()
            .any(|k| m.contains(k))
        }
        _ => false,
    }
}

/// A fresh `request_id` for a launch: unique for this caller (time, process, count).
pub fn new_request_id() -> String {
    static COUNT: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    format!(
        "{nanos:x}-{:x}-{:x}",
        std::process::id(),
        COUNT.fetch_add(1, Ordering::Relaxed)
    )
}

impl Failover {
    /// A client of the comma-separated `addr` list; nothing is dialled yet.
    pub fn new(addr: &str, tls: TlsFiles) -> Result<Self, ClientError> {
        tls.check()?;
        let addrs: Vec<String> = addr
            .split(',')
            .map(str::trim)
            .filter(|a| !a.is_empty())
            .map(str::to_owned)
            .collect();
        if addrs.is_empty() {
            return Err(ClientError::Address {
                addr: addr.to_owned(),
                message: "no address given".into(),
            });
        }
        Ok(Self {
            addrs,
            tls,
            current: tokio::sync::Mutex::new(None),
            patience: DEFAULT_PATIENCE,
        })
    }

    /// How long a call keeps trying the replicas (default [`DEFAULT_PATIENCE`]).
    pub fn with_patience(mut self, patience: Duration) -> Self {
        self.patience = patience;
        self
    }

    /// The address of the replica in use, if one is connected.
    pub async fn current_addr(&self) -> Option<String> {
        self.current
            .lock()
            .await
            .as_ref()
            .map(|(i, _)| self.addrs[*i].clone())
    }

    /// The connection in use, or one to the first replica from `from` on that answers.
    async fn connection(&self, from: usize) -> Result<(usize, Client), ClientError> {
        let mut cur = self.current.lock().await;
        if let Some((i, c)) = cur.as_ref() {
            return Ok((*i, c.clone()));
        }
        let mut last = None;
        for k in 0..self.addrs.len() {
            let i = (from + k) % self.addrs.len();
            match Client::connect_one(&self.addrs[i], &self.tls).await {
                Ok(c) => {
                    *cur = Some((i, c.clone()));
                    return Ok((i, c));
                }
                Err(e) if e.is_misconfigured() => return Err(e),
                Err(e) => last = Some(e),
            }
        }
        Err(last.expect("the list is not empty"))
    }

    /// Leaves replica `i` (unless another call already did): the next call connects afresh,
    /// starting from the replica after it.
    async fn leave(&self, i: usize) -> usize {
        let mut cur = self.current.lock().await;
        if cur.as_ref().is_some_and(|(j, _)| *j == i) {
            *cur = None;
        }
        (i + 1) % self.addrs.len()
    }

    /// Runs `call` on the replica in use; when the replica cannot be reached or goes away
    /// during the call, runs it again on the next one, until one answers or the patience is
    /// spent. `call` must be safe to run twice.
    pub async fn call<T, F, Fut>(&self, mut call: F) -> Result<T, tonic::Status>
    where
        F: FnMut(Client) -> Fut,
        Fut: Future<Output = Result<T, tonic::Status>>,
    {
        let deadline = Instant::now() + self.patience;
        let mut from = 0;
        let mut tried = 0usize;
        loop {
            let failed = match self.connection(from).await {
                Ok((i, client)) => match call(client).await {
                    Ok(v) => return Ok(v),
                    Err(s) if is_unreachable(&s) => {
                        from = self.leave(i).await;
                        // The call may have been carried out before the replica went: give the
                        // hosts' reports of it time to reach the other replicas, which find a
                        // launch's retry by them.
                        tokio::time::sleep(SETTLE).await;
                        s
                    }
                    Err(s) => return Err(s),
                },
                Err(e) if e.is_misconfigured() => {
                    return Err(tonic::Status::invalid_argument(e.to_string()))
                }
                Err(e) => tonic::Status::unavailable(e.to_string()),
            };
            tried += 1;
            if Instant::now() >= deadline {
                return Err(failed);
            }
            if tried.is_multiple_of(self.addrs.len()) {
                // Every replica failed once: wait a little before the next round.
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }

    /// `LaunchWorkers`, with a `request_id` made for it where it has none, so that a retry on
    /// another replica gets the first launch's workers instead of launching again.
    pub async fn launch(
        &self,
        mut req: pb::LaunchWorkersRequest,
    ) -> Result<Vec<pb::Worker>, tonic::Status> {
        if req.request_id.is_empty() {
            req.request_id = new_request_id();
        }
        self.call(|c| {
            let req = req.clone();
            async move { Ok(c.workers().launch_workers(req).await?.into_inner().workers) }
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_counts_as_unreachable() {
        assert!(is_unreachable(&tonic::Status::unavailable("no")));
        assert!(is_unreachable(&tonic::Status::unknown(
            "transport error: connection reset"
        )));
        assert!(!is_unreachable(&tonic::Status::unknown("boom")));
        assert!(!is_unreachable(&tonic::Status::invalid_argument(
            "n: connection"
        )));
        assert!(!is_unreachable(&tonic::Status::not_found("x")));
    }

    #[test]
    fn request_ids_differ() {
        let a = new_request_id();
        let b = new_request_id();
        assert_ne!(a, b);
        assert!(a.len() <= 128);
    }

    /// Nothing listens on the first two addresses: the call lands on the third, and stays there.
    #[tokio::test]
    async fn a_call_moves_on_to_the_replica_that_answers() {
        let free = || {
            std::net::TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .to_string()
        };
        let (dead1, dead2) = (free(), free());
        let live = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let live_addr = live.local_addr().unwrap().to_string();
        let health = tonic_health::server::health_reporter().1;
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(health)
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(live)),
        );
        let f = Failover::new(&format!("{dead1},{dead2},{live_addr}"), TlsFiles::default())
            .unwrap()
            .with_patience(Duration::from_secs(5));
        let check = |c: Client| async move {
            tonic_health::pb::health_client::HealthClient::new(c.channel())
                .check(tonic_health::pb::HealthCheckRequest::default())
                .await
                .map(|r| r.into_inner().status)
        };
        assert_eq!(f.call(check).await.unwrap(), 1);
        assert_eq!(f.current_addr().await.as_deref(), Some(live_addr.as_str()));
        // A call that the server answers with an error is not retried elsewhere.
        let calls = AtomicU64::new(0);
        let err = f
            .call(|_| {
                calls.fetch_add(1, Ordering::Relaxed);
                async { Err::<(), _>(tonic::Status::not_found("x")) }
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::NotFound);
        assert_eq!(calls.load(Ordering::Relaxed), 1);
        // With nothing left to answer, it gives up after its patience.
        let f = Failover::new(&format!("{dead1},{dead2}"), TlsFiles::default())
            .unwrap()
            .with_patience(Duration::from_millis(300));
        let t = Instant::now();
        let err = f.call(check).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::Unavailable);
        assert!(t.elapsed() < Duration::from_secs(3));
    }
}
