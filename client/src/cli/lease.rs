//! Holding a session while `berth launch --attach` runs: the lease is renewed from a thread of its
//! own, and the signals that end the CLI are caught so that it can close the session first.
//!
//! The renewals have their own thread, runtime and connection because the CLI's own thread can
//! block for as long as its reader wants: writing the workers' output into a full pipe (a paused
//! pager) blocks it, and the workers must not lose their session while the CLI is alive.

use std::time::Duration;

use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::oneshot;

use super::Server;
use crate::{pb, Client};

/// Lease of the session that `launch --attach` opens when none is given.
pub const DEFAULT_TTL_SECS: u32 = 10;

/// How often a lease of `ttl` is renewed: three times per lease, so that one lost renewal (or
/// two) does not end the session.
pub fn renew_every(ttl: Duration) -> Duration {
    (ttl / 3).max(Duration::from_millis(100))
}

/// How soon a renewal that failed for a reason other than the session's end is tried again.
fn retry_after(every: Duration) -> Duration {
    every.min(Duration::from_secs(1))
}

/// A session kept alive by a background thread until this is dropped.
#[derive(Debug)]
pub struct Lease {
    /// Dropping it stops the renewals.
    _stop: oneshot::Sender<()>,
    /// Why the renewals stopped on their own: the server no longer knows the session (it was
    /// closed by someone else, or its lease lapsed while the CLI was stopped).
    ended: std::sync::mpsc::Receiver<tonic::Status>,
}

impl Lease {
    /// Renews session `id` on `server` every [`renew_every`]`(ttl)`.
    pub fn keep(server: &Server, id: &str, ttl: Duration) -> std::io::Result<Self> {
        let (stop_tx, stop_rx) = oneshot::channel();
        let (ended_tx, ended) = std::sync::mpsc::channel();
        let (server, id) = (server.clone(), id.to_owned());
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        std::thread::Builder::new()
            .name("berth-lease".into())
            .spawn(move || {
                rt.block_on(async move {
                    tokio::select! {
                        _ = stop_rx => {}
                        ended = renew(&server, &id, renew_every(ttl)) => {
                            let _ = ended_tx.send(ended);
                        }
                    }
                });
            })?;
        Ok(Self {
            _stop: stop_tx,
            ended,
        })
    }

    /// The server's answer when it stopped knowing the session, if it did.
    pub fn ended(&self) -> Option<tonic::Status> {
        self.ended.try_recv().ok()
    }
}

/// Renews the lease until the server says the session is gone; returns that answer. Any other
/// failure (the server restarting, a network hiccup) is retried.
pub(crate) async fn renew(server: &Server, id: &str, every: Duration) -> tonic::Status {
    let mut client: Option<Client> = None;
    let mut wait = every;
    loop {
        tokio::time::sleep(wait).await;
        wait = retry_after(every);
        if client.is_none() {
            client = server.connect().await.ok();
        }
        let Some(c) = &client else { continue };
        let mut workers = c.workers();
        let call = workers.keep_alive(pb::KeepAliveRequest {
            session_id: id.to_owned(),
        });
        match tokio::time::timeout(every, call).await {
            Ok(Ok(_)) => wait = every,
            Ok(Err(s)) if s.code() == tonic::Code::NotFound => return s,
            // Connect afresh next time: the server may have restarted.
            Ok(Err(_)) | Err(_) => client = None,
        }
    }
}

/// A signal that ends `berth` early.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    /// SIGINT: Ctrl-C.
    Interrupt,
    /// SIGTERM.
    Terminate,
    /// SIGHUP: the terminal went away.
    Hangup,
}

impl Signal {
    pub fn number(self) -> u8 {
        match self {
            Signal::Hangup => 1,
            Signal::Interrupt => 2,
            Signal::Terminate => 15,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Signal::Hangup => "SIGHUP",
            Signal::Interrupt => "SIGINT",
            Signal::Terminate => "SIGTERM",
        }
    }
}

/// SIGINT, SIGTERM and SIGHUP, caught from the moment this is made: one that comes before
/// [`Signals::recv`] is polled is kept for it.
#[derive(Debug)]
pub struct Signals {
    interrupt: tokio::signal::unix::Signal,
    terminate: tokio::signal::unix::Signal,
    hangup: tokio::signal::unix::Signal,
}

impl Signals {
    pub fn catch() -> std::io::Result<Self> {
        Ok(Self {
            interrupt: signal(SignalKind::interrupt())?,
            terminate: signal(SignalKind::terminate())?,
            hangup: signal(SignalKind::hangup())?,
        })
    }

    /// The next of the signals.
    pub async fn recv(&mut self) -> Signal {
        tokio::select! {
            _ = self.interrupt.recv() => Signal::Interrupt,
            _ = self.terminate.recv() => Signal::Terminate,
            _ = self.hangup.recv() => Signal::Hangup,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::pki::Pki;

    #[test]
    fn renewals_come_three_times_a_lease() {
        let s = Duration::from_secs;
        assert_eq!(renew_every(s(30)), s(10));
        assert_eq!(renew_every(s(10)), Duration::from_nanos(3_333_333_333));
        assert_eq!(renew_every(s(1)), Duration::from_nanos(333_333_333));
        assert_eq!(renew_every(Duration::ZERO), Duration::from_millis(100));
        assert_eq!(retry_after(s(10)), s(1));
        let short = Duration::from_millis(333);
        assert_eq!(retry_after(short), short);
    }

    #[test]
    fn signals_exit_as_shells_report_them() {
        let exits: Vec<(u8, &str)> = [Signal::Hangup, Signal::Interrupt, Signal::Terminate]
            .iter()
            .map(|s| (s.number(), s.name()))
            .collect();
        assert_eq!(exits, [(1, "SIGHUP"), (2, "SIGINT"), (15, "SIGTERM")]);
    }

    /// A lease renews against a real (in-process) server until dropped, over mutual TLS when
    /// the server is given with TLS material, and reports the end of a session the server no
    /// longer knows.
    #[tokio::test(flavor = "current_thread")]
    async fn renews_until_dropped_and_reports_an_ended_session() {
        use std::sync::atomic::{AtomicU32, Ordering};
        use std::sync::Arc;

        #[derive(Default)]
        struct Renewals {
            count: AtomicU32,
            /// Renewals that came with a client certificate.
            certified: AtomicU32,
            /// Answer NOT_FOUND from this renewal on.
            gone_after: u32,
        }
        /// A server of nothing but KeepAlive.
        struct KeepAliveOnly(Arc<Renewals>);
        #[tonic::async_trait]
        impl pb::workers_server::Workers for KeepAliveOnly {
            async fn keep_alive(
                &self,
                r: tonic::Request<pb::KeepAliveRequest>,
            ) -> Result<tonic::Response<pb::Session>, tonic::Status> {
                if r.peer_certs().is_some_and(|c| !c.is_empty()) {
                    self.0.certified.fetch_add(1, Ordering::SeqCst);
                }
                let n = self.0.count.fetch_add(1, Ordering::SeqCst) + 1;
                if self.0.gone_after > 0 && n > self.0.gone_after {
                    return Err(tonic::Status::not_found("session s1 not found or ended"));
                }
                Ok(tonic::Response::new(pb::Session {
                    id: r.into_inner().session_id,
                    ..Default::default()
                }))
            }
            async fn open_session(
                &self,
                _: tonic::Request<pb::OpenSessionRequest>,
            ) -> Result<tonic::Response<pb::Session>, tonic::Status> {
                Err(tonic::Status::unimplemented(""))
            }
            async fn close_session(
                &self,
                _: tonic::Request<pb::CloseSessionRequest>,
            ) -> Result<tonic::Response<pb::CloseSessionResponse>, tonic::Status> {
                Err(tonic::Status::unimplemented(""))
            }
            async fn launch_workers(
                &self,
                _: tonic::Request<pb::LaunchWorkersRequest>,
            ) -> Result<tonic::Response<pb::LaunchWorkersResponse>, tonic::Status> {
                Err(tonic::Status::unimplemented(""))
            }
            async fn list_workers(
                &self,
                _: tonic::Request<pb::ListWorkersRequest>,
            ) -> Result<tonic::Response<pb::ListWorkersResponse>, tonic::Status> {
                Err(tonic::Status::unimplemented(""))
            }
            async fn await_workers(
                &self,
                _: tonic::Request<pb::AwaitWorkersRequest>,
            ) -> Result<tonic::Response<pb::AwaitWorkersResponse>, tonic::Status> {
                Err(tonic::Status::unimplemented(""))
            }
            async fn stop_workers(
                &self,
                _: tonic::Request<pb::StopWorkersRequest>,
            ) -> Result<tonic::Response<pb::StopWorkersResponse>, tonic::Status> {
                Err(tonic::Status::unimplemented(""))
            }
            type StreamOutputStream =
                futures::stream::Empty<Result<pb::OutputChunk, tonic::Status>>;
            async fn stream_output(
                &self,
                _: tonic::Request<pb::StreamOutputRequest>,
            ) -> Result<tonic::Response<Self::StreamOutputStream>, tonic::Status> {
                Err(tonic::Status::unimplemented(""))
            }
            type WatchWorkersStream =
                futures::stream::Empty<Result<pb::WorkerEvent, tonic::Status>>;
            async fn watch_workers(
                &self,
                _: tonic::Request<pb::WatchWorkersRequest>,
            ) -> Result<tonic::Response<Self::WatchWorkersStream>, tonic::Status> {
                Err(tonic::Status::unimplemented(""))
            }
        }

        /// Serves `r`, over TLS requiring a client certificate with `pki`.
        async fn serve(r: Arc<Renewals>, pki: Option<&Pki>) -> Server {
            let (incoming, port) = crate::pki::listen().await;
            let mut builder = match pki {
                Some(p) => p.server(),
                None => tonic::transport::Server::builder(),
            };
            tokio::spawn(
                builder
                    .add_service(pb::workers_server::WorkersServer::new(KeepAliveOnly(r)))
                    .serve_with_incoming(incoming),
            );
            Server {
                addr: format!("127.0.0.1:{port}"),
                tls: pki.map(Pki::client).unwrap_or_default(),
            }
        }

        let ttl = Duration::from_millis(300);
        let pki = Pki::new();
        let kept = Arc::new(Renewals::default());
        let server = serve(kept.clone(), Some(&pki)).await;
        let lease = Lease::keep(&server, "s1", ttl).unwrap();
        tokio::time::sleep(Duration::from_millis(800)).await;
        let n = kept.count.load(Ordering::SeqCst);
        assert!(n >= 3, "{n} renewals in 0.8 s, every 0.1 s");
        assert_eq!(
            kept.certified.load(Ordering::SeqCst),
            n,
            "every renewal presents the client certificate"
        );
        assert!(lease.ended().is_none());
        drop(lease);
        tokio::time::sleep(Duration::from_millis(300)).await;
        let after = kept.count.load(Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(400)).await;
        assert_eq!(
            kept.count.load(Ordering::SeqCst),
            after,
            "renewed after drop"
        );

        let gone = Arc::new(Renewals {
            gone_after: 2,
            ..Default::default()
        });
        let server = serve(gone.clone(), None).await;
        let lease = Lease::keep(&server, "s1", ttl).unwrap();
        tokio::time::sleep(Duration::from_millis(800)).await;
        let status = lease.ended().expect("the end of the session is reported");
        assert_eq!(status.code(), tonic::Code::NotFound);
        assert_eq!(
            gone.count.load(Ordering::SeqCst),
            3,
            "no renewal after NOT_FOUND"
        );
    }
}
