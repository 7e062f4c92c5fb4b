//! How the scheduler talks to one host daemon: the [`HostApi`] trait, its gRPC implementation
//! over the host's own `berth.v1.Workers` and `berth.v1.Host` services, and the [`Connector`]
//! that makes one per registered host. Tests put thousands of in-process fakes behind the same
//! trait.

use std::sync::Arc;

use berth_proto::v1 as pb;
use futures::StreamExt;
use tonic::Code;

use berth_core::error::{Error, Result};
use berth_server::identity::{Caller, CALLER_HEADER};

pub use berth_server::workers::ItemStream;

/// The caller a scheduler request serves: as [`CALLER_HEADER`] says it to hosts, and the owner
/// name the hosts record for it.
#[derive(Debug, Clone)]
struct Forwarded {
    header: String,
    owner: String,
}

tokio::task_local! {
    static CALLER: Forwarded;
}

/// Runs `f` (a request's work, in the request's task) with every call it makes to a host
/// carrying `caller` in [`CALLER_HEADER`]: the host records it as the owner of what it makes and
/// runs its workers as that user. Calls outside (the scheduler's own watches, listings and
/// lease renewals) speak for the scheduler itself: for the whole cluster, as root
/// ([`ITSELF`]), which a host accepts only from a scheduler it trusts (`trusted_schedulers`).
pub async fn as_caller<F: std::future::Future>(caller: &Caller, f: F) -> F::Output {
    let fwd = Forwarded {
        header: caller.forward(),
        owner: caller.owner.clone(),
    };
    CALLER.scope(fwd, f).await
}

/// The caller the current request serves, as forwarded to hosts; empty outside a request.
pub fn current_caller() -> String {
    CALLER.try_with(|c| c.header.clone()).unwrap_or_default()
}

/// The owner name of the caller the current request serves; empty outside a request.
pub fn current_owner() -> String {
    CALLER.try_with(|c| c.owner.clone()).unwrap_or_default()
}

/// Who the scheduler's own calls speak for. Said outright rather than left out: a host that
/// cannot prove who the scheduler is (`insecure_plaintext`, a peer beyond loopback without a
/// certificate) would take a call without it for `worker_user`'s, and show the scheduler's
/// follow none of the other callers' workers (they stayed STARTING in its view).
pub const ITSELF: &str = "uid:0";

/// A request to a host, with the caller it serves: the request's, or the scheduler itself.
fn forwarded<T>(msg: T) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    let header = CALLER
        .try_with(|c| c.header.clone())
        .unwrap_or_else(|_| ITSELF.to_owned());
    if let Ok(v) = tonic::metadata::MetadataValue::try_from(header.as_str()) {
        r.metadata_mut().insert(CALLER_HEADER, v);
    }
    r
}

/// The calls the scheduler makes on a host daemon. Errors keep the host's gRPC code (a host's
/// INVALID_ARGUMENT stays one) and name the host where that helps the caller.
#[tonic::async_trait]
pub trait HostApi: Send + Sync + 'static {
    async fn launch(&self, req: pb::LaunchWorkersRequest) -> Result<Vec<pb::Worker>>;
    async fn list(&self, req: pb::ListWorkersRequest) -> Result<Vec<pb::Worker>>;
    async fn stop(&self, req: pb::StopWorkersRequest) -> Result<Vec<pb::Worker>>;
    async fn open_session(&self, req: pb::OpenSessionRequest) -> Result<pb::Session>;
    async fn keep_alive(&self, session_id: &str) -> Result<pb::Session>;
    async fn close_session(&self, req: pb::CloseSessionRequest) -> Result<Vec<pb::Worker>>;
    /// Every worker change on the host from now on (`WatchWorkers` with no filter).
    async fn watch(&self) -> Result<ItemStream<pb::Worker>>;
    async fn output(&self, req: pb::StreamOutputRequest) -> Result<ItemStream<pb::OutputChunk>>;
    async fn info(&self) -> Result<pb::HostInfo>;
}

/// Makes the [`HostApi`] of a host from the address it registered with.
pub trait Connector: Send + Sync + 'static {
    fn connect(&self, name: &str, address: &str) -> Arc<dyn HostApi>;
}

/// Host connections over gRPC, dialled on first use and redialled after a transport failure,
/// over TLS where the scheduler has TLS material (its certificate is its identity to the hosts).
#[derive(Debug, Default)]
pub struct GrpcConnector {
    pub tls: berth_client::TlsFiles,
}

impl Connector for GrpcConnector {
    fn connect(&self, name: &str, address: &str) -> Arc<dyn HostApi> {
        Arc::new(GrpcHost {
            name: name.to_owned(),
            address: address.to_owned(),
            tls: self.tls.clone(),
            client: tokio::sync::Mutex::new(None),
        })
    }
}

/// One host daemon reached over gRPC.
#[derive(Debug)]
pub struct GrpcHost {
    name: String,
    address: String,
    tls: berth_client::TlsFiles,
    client: tokio::sync::Mutex<Option<berth_client::Client>>,
}

impl GrpcHost {
    async fn client(&self) -> Result<berth_client::Client> {
        let mut slot = self.client.lock().await;
        if let Some(c) = slot.as_ref() {
            return Ok(c.clone());
        }
        let c = berth_client::Client::connect_with(&self.address, &self.tls)
            .await
            .map_err(|e| Error::Unavailable(format!("host {}: {e}", self.name)))?;
        *slot = Some(c.clone());
        Ok(c)
    }

    /// Turns a host's status into the scheduler's error; a broken connection is dropped so the
    /// next call dials again.
    async fn fail(&self, s: tonic::Status) -> Error {
        if matches!(
            s.code(),
            Code::Unavailable | Code::Unknown | Code::Cancelled
        ) {
            *self.client.lock().await = None;
        }
        error_from_status(&self.name, &s)
    }
}

/// The scheduler's error for a status a host answered: the code is kept, the host named where
/// the message would otherwise not say which host refused.
pub fn error_from_status(host: &str, s: &tonic::Status) -> Error {
    let msg = s.message();
    match s.code() {
        Code::InvalidArgument => match msg.split_once(": ") {
            Some((field, rest)) => Error::invalid(field, rest),
            None => Error::invalid("request", msg),
        },
        Code::ResourceExhausted => Error::ResourceExhausted(format!("host {host}: {msg}")),
        Code::FailedPrecondition => Error::FailedPrecondition(format!("host {host}: {msg}")),
        Code::NotFound => Error::NotFound(msg.to_owned()),
        Code::PermissionDenied => Error::PermissionDenied(format!("host {host}: {msg}")),
        Code::Unauthenticated => Error::Unauthenticated(format!("host {host}: {msg}")),
        Code::Unimplemented => Error::Unimplemented(format!("host {host}: {msg}")),
        Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled | Code::Unknown => {
            Error::Unavailable(format!("host {host} cannot be reached: {msg}"))
        }
        _ => Error::Internal(format!("host {host}: {msg}")),
    }
}

#[tonic::async_trait]
impl HostApi for GrpcHost {
    async fn launch(&self, req: pb::LaunchWorkersRequest) -> Result<Vec<pb::Worker>> {
        match self
            .client()
            .await?
            .workers()
            .launch_workers(forwarded(req))
            .await
        {
            Ok(r) => Ok(r.into_inner().workers),
            Err(s) => Err(self.fail(s).await),
        }
    }

    async fn list(&self, req: pb::ListWorkersRequest) -> Result<Vec<pb::Worker>> {
        match self
            .client()
            .await?
            .workers()
            .list_workers(forwarded(req))
            .await
        {
            Ok(r) => Ok(r.into_inner().workers),
            Err(s) => Err(self.fail(s).await),
        }
    }

    async fn stop(&self, req: pb::StopWorkersRequest) -> Result<Vec<pb::Worker>> {
        match self
            .client()
            .await?
            .workers()
            .stop_workers(forwarded(req))
            .await
        {
            Ok(r) => Ok(r.into_inner().workers),
            Err(s) => Err(self.fail(s).await),
        }
    }

    async fn open_session(&self, req: pb::OpenSessionRequest) -> Result<pb::Session> {
        match self
            .client()
            .await?
            .workers()
            .open_session(forwarded(req))
            .await
        {
            Ok(r) => Ok(r.into_inner()),
            Err(s) => Err(self.fail(s).await),
        }
    }

    async fn keep_alive(&self, session_id: &str) -> Result<pb::Session> {
        let req = pb::KeepAliveRequest {
            session_id: session_id.to_owned(),
        };
        match self
            .client()
            .await?
            .workers()
            .keep_alive(forwarded(req))
            .await
        {
            Ok(r) => Ok(r.into_inner()),
            Err(s) => Err(self.fail(s).await),
        }
    }

    async fn close_session(&self, req: pb::CloseSessionRequest) -> Result<Vec<pb::Worker>> {
        match self
            .client()
            .await?
            .workers()
            .close_session(forwarded(req))
            .await
        {
            Ok(r) => Ok(r.into_inner().stopped),
            Err(s) => Err(self.fail(s).await),
        }
    }

    async fn watch(&self) -> Result<ItemStream<pb::Worker>> {
        let req = pb::WatchWorkersRequest::default();
        match self
            .client()
            .await?
            .workers()
            .watch_workers(forwarded(req))
            .await
        {
            Ok(r) => {
                let name = self.name.clone();
                Ok(Box::pin(r.into_inner().filter_map(move |ev| {
                    let out = match ev {
                        Ok(ev) => ev.worker.map(Ok),
                        Err(s) => Some(Err(error_from_status(&name, &s))),
                    };
                    futures::future::ready(out)
                })))
            }
            Err(s) => Err(self.fail(s).await),
        }
    }

    async fn output(&self, req: pb::StreamOutputRequest) -> Result<ItemStream<pb::OutputChunk>> {
        match self
            .client()
            .await?
            .workers()
            .stream_output(forwarded(req))
            .await
        {
            Ok(r) => {
                let name = self.name.clone();
                Ok(Box::pin(
                    r.into_inner()
                        .map(move |c| c.map_err(|s| error_from_status(&name, &s))),
                ))
            }
            Err(s) => Err(self.fail(s).await),
        }
    }

    async fn info(&self) -> Result<pb::HostInfo> {
        match self
            .client()
            .await?
            .host()
            .get_host_info(forwarded(pb::GetHostInfoRequest {}))
            .await
        {
            Ok(r) => Ok(r.into_inner()),
            Err(s) => Err(self.fail(s).await),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_statuses_keep_their_code_and_name_the_host() {
        let e = error_from_status("h1", &tonic::Status::invalid_argument("cpu: must be > 0"));
        assert_eq!(e, Error::invalid("cpu", "must be > 0"));
        let e = error_from_status("h1", &tonic::Status::resource_exhausted("memory: short"));
        assert_eq!(e, Error::ResourceExhausted("host h1: memory: short".into()));
        let e = error_from_status("h2", &tonic::Status::unavailable("connection refused"));
        assert!(matches!(e, Error::Unavailable(m) if m.contains("h2")));
        let e = error_from_status("h2", &tonic::Status::not_found("worker x not found"));
        assert_eq!(e, Error::NotFound("worker x not found".into()));
    }
}
