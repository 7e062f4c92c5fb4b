//! The gRPC front shared by berthd and berth-scheduler: listeners bound before anything is
//! served, `berth.v1.Workers` over the server's [`WorkersBackend`] beside its other services,
//! health and reflection on every listen address, metrics over HTTP, and one way to drain.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use berth_proto::v1 as pb;
use futures::StreamExt;
use tokio::net::{TcpListener, UnixListener};
use tokio::task::JoinHandle;
use tokio_stream::wrappers::{TcpListenerStream, UnixListenerStream};
use tokio_util::sync::CancellationToken;
use tonic::transport::server::Router;
use tonic_health::ServingStatus;

use crate::identity::{IdentifiedTcp, Policy, TlsConfig};
use crate::limits::{self, LoadLimitLayer, RequestLimits};
use crate::metrics::MetricsSource;
use crate::workers::{WorkersBackend, WorkersService};

/// How a daemon's listeners protect themselves: its TLS material, whether plaintext beyond
/// loopback is allowed, the group of its Unix sockets, and who its callers are.
#[derive(Debug, Clone)]
pub struct Security {
    pub tls: TlsConfig,
    pub insecure_plaintext: bool,
    /// Group that may connect to the Unix sockets (mode 0660); when it does not exist, the
    /// sockets are 0600 (root only).
    pub socket_group: String,
    pub policy: std::sync::Arc<Policy>,
}

impl Security {
    /// The server TLS configuration of the TCP listeners, when `[tls]` gives a certificate.
    pub fn server_tls(&self) -> Result<Option<tonic::transport::ServerTlsConfig>, ServeError> {
        use tonic::transport::{Certificate, Identity, ServerTlsConfig};
        if !self.tls.enabled() {
            return Ok(None);
        }
        let read = |what: &str, p: &std::path::Path| {
            std::fs::read(p).map_err(|e| ServeError::Tls(format!("{what} {}: {e}", p.display())))
        };
        let identity =
            Identity::from_pem(read("cert", &self.tls.cert)?, read("key", &self.tls.key)?);
        let mut c = ServerTlsConfig::new().identity(identity);
        if !self.tls.client_ca.as_os_str().is_empty() {
            c = c
                .client_ca_root(Certificate::from_pem(read(
                    "client_ca",
                    &self.tls.client_ca,
                )?))
                .client_auth_optional(false);
        }
        Ok(Some(c))
    }
}

/// Failure to listen or to serve.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("listen on {addr}: {source}")]
    Listen {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("reflection: {0}")]
    Reflection(String),
    #[error(
        "listen on {addr}: a plaintext listener beyond loopback would let anyone on the network \
         act without proving who they are; configure [tls] (cert, key, client_ca), listen on \
         loopback or a Unix socket, or set insecure_plaintext = true"
    )]
    Insecure { addr: String },
    #[error("tls: {0}")]
    Tls(String),
    #[error("serve {addr}: {source}")]
    Serve {
        addr: String,
        #[source]
        source: tonic::transport::Error,
    },
}

/// Largest request a server decodes: a launch carries code and environment.
const MAX_REQUEST_BYTES: usize = 64 << 20;

/// The router of a daemon's listeners: every service under the [`LoadLimitLayer`].
pub type FrontRouter =
    Router<tower::layer::util::Stack<LoadLimitLayer, tower::layer::util::Identity>>;

/// The gRPC servers of a daemon, one per listen address, and their health.
pub struct GrpcFront {
    health: tonic_health::server::HealthReporter,
    services: Vec<&'static str>,
    servers: Vec<JoinHandle<Result<(), ServeError>>>,
}

impl std::fmt::Debug for GrpcFront {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GrpcFront")
            .field("services", &self.services)
            .field("servers", &self.servers.len())
            .finish()
    }
}

impl GrpcFront {
    /// Serves `berth.v1.Workers` over `backend` and the services `add` puts on a router (named
    /// in `more`, for health and reflection) on every listener, until `shutdown`, under
    /// `limits` (one count of calls in flight for all the listeners).
    pub async fn serve<B, F>(
        listeners: Vec<(String, BoundListener)>,
        security: &Security,
        limits: &RequestLimits,
        backend: B,
        more: &[&'static str],
        add: F,
        shutdown: CancellationToken,
    ) -> Result<Self, ServeError>
    where
        B: WorkersBackend + Clone,
        F: Fn(FrontRouter) -> FrontRouter,
    {
        let mut services = vec!["berth.v1.Workers"];
        services.extend_from_slice(more);
        let (health, health_svc) = tonic_health::server::health_reporter();
        for s in &services {
            health.set_service_status(*s, ServingStatus::Serving).await;
        }
        let (refl_v1, refl_v1alpha) = reflection(&services)?;
        let workers = pb::workers_server::WorkersServer::new(WorkersService::new(
            backend,
            security.policy.clone(),
        ))
        .max_decoding_message_size(MAX_REQUEST_BYTES);
        let tls = security.server_tls()?;
        let short = limits::short_calls(berth_proto::FILE_DESCRIPTOR_SET)
            .map_err(|e| ServeError::Reflection(format!("berth.v1 descriptors: {e}")))?;
        let load = LoadLimitLayer::new(limits, short);
        let mut servers = Vec::new();
        for (addr, l) in listeners {
            let mut builder = tonic::transport::Server::builder()
                .max_concurrent_streams(limits.max_streams_per_connection)
                .layer(load.clone());
            if let (Some(t), true) = (&tls, l.is_tcp()) {
                builder = builder
                    .tls_config(t.clone())
                    .map_err(|e| ServeError::Tls(e.to_string()))?;
            }
            let router = builder
                .add_service(health_svc.clone())
                .add_service(refl_v1.clone())
                .add_service(refl_v1alpha.clone())
                .add_service(workers.clone());
            servers.push(spawn_serve(addr, l, add(router), shutdown.clone()));
        }
        Ok(Self {
            health,
            services,
            servers,
        })
    }

    /// Says "not serving" to health checks, then waits for the servers to drain (they stop
    /// taking calls when the shutdown token they were given is cancelled).
    pub async fn drain(self) -> Result<(), ServeError> {
        for s in &self.services {
            self.health
                .set_service_status(*s, ServingStatus::NotServing)
                .await;
        }
        drain_servers(self.servers).await
    }
}

/// Serves the metrics of `source` over HTTP at `addr` (empty: not at all) until `shutdown`.
/// Like every plaintext listener, only on loopback unless `insecure_plaintext`.
pub async fn serve_metrics<S: MetricsSource>(
    addr: &str,
    insecure_plaintext: bool,
    source: S,
    shutdown: CancellationToken,
) -> Result<(), ServeError> {
    if addr.is_empty() {
        return Ok(());
    }
    let err = |source| ServeError::Listen {
        addr: addr.to_owned(),
        source,
    };
    let l = TcpListener::bind(addr).await.map_err(err)?;
    let local = l.local_addr().map_err(err)?;
    if !insecure_plaintext && !berth_sys::peer::is_loopback(local.ip()) {
        return Err(ServeError::Insecure {
            addr: addr.to_owned(),
        });
    }
    tracing::info!(listen = %addr, "serving metrics");
    crate::spawn_in(
        tracing::info_span!("metrics"),
        crate::metrics::serve(l, source, shutdown),
    );
    Ok(())
}

/// A listen address of the configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenAddr {
    Tcp(String),
    Unix(PathBuf),
}

impl ListenAddr {
    pub fn parse(s: &str) -> Self {
        match s.strip_prefix("unix:") {
            Some(p) => ListenAddr::Unix(PathBuf::from(p)),
            None => ListenAddr::Tcp(s.to_owned()),
        }
    }
}

enum Bound {
    Tcp(TcpListener, SocketAddr),
    Unix(UnixListener, PathBuf),
}

/// Binds every address before anything is served, so a taken port fails the start at once. A
/// plaintext TCP listener beyond loopback is refused unless `security` allows it; Unix sockets
/// are made 0660 with group `socket_group` (0600 when that group does not exist).
pub async fn bind_all(
    addrs: &[String],
    security: &Security,
) -> Result<Vec<(String, BoundListener)>, ServeError> {
    let mut out = Vec::new();
    for a in addrs {
        let err = |source| ServeError::Listen {
            addr: a.clone(),
            source,
        };
        let b = match ListenAddr::parse(a) {
            ListenAddr::Tcp(t) => {
                let l = TcpListener::bind(&t).await.map_err(err)?;
                let local = l.local_addr().map_err(err)?;
                if !security.tls.enabled()
                    && !security.insecure_plaintext
                    && !berth_sys::peer::is_loopback(local.ip())
                {
                    return Err(ServeError::Insecure { addr: a.clone() });
                }
                if security.insecure_plaintext && !berth_sys::peer::is_loopback(local.ip()) {
                    tracing::warn!(
                        listen = %local,
                        "INSECURE: plaintext gRPC beyond loopback (insecure_plaintext = true): \
                         anyone who reaches this address is taken for whoever they claim to be"
                    );
                }
                Bound::Tcp(l, local)
            }
            ListenAddr::Unix(p) => {
                if let Some(dir) = p.parent() {
                    std::fs::create_dir_all(dir).map_err(err)?;
                }
                // A socket file left by a previous run; refuse if something still answers on it.
                if std::os::unix::net::UnixStream::connect(&p).is_ok() {
                    return Err(err(std::io::Error::new(
                        std::io::ErrorKind::AddrInUse,
                        "another daemon answers on this socket",
                    )));
                }
                let _ = std::fs::remove_file(&p);
                let l = UnixListener::bind(&p).map_err(err)?;
                socket_permissions(&p, &security.socket_group).map_err(err)?;
                Bound::Unix(l, p)
            }
        };
        out.push((a.clone(), BoundListener(b)));
    }
    Ok(out)
}

/// Mode 0660 and group `group` on the socket at `path`, or 0600 when there is no such group.
fn socket_permissions(path: &std::path::Path, group: &str) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let gid = if group.is_empty() {
        None
    } else {
        berth_sys::users::group_gid(group).map_err(std::io::Error::other)?
    };
    match gid {
        Some(gid) => {
            std::os::unix::fs::chown(path, None, Some(gid))?;
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))
        }
        None => {
            tracing::warn!(
                socket = %path.display(),
                group,
                "socket_group does not exist: the socket is 0600, for root only \
                 (create the group, or set socket_group, to let users in)"
            );
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        }
    }
}

/// A bound listener, ready to serve.
pub struct BoundListener(Bound);

impl BoundListener {
    pub fn is_tcp(&self) -> bool {
        matches!(self.0, Bound::Tcp(..))
    }

    /// `host:port` for TCP (with the real port when 0 was asked), `unix:path` otherwise.
    pub fn display(&self) -> String {
        match &self.0 {
            Bound::Tcp(_, a) => a.to_string(),
            Bound::Unix(_, p) => format!("unix:{}", p.display()),
        }
    }
}

impl std::fmt::Debug for BoundListener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.display())
    }
}

/// Server reflection v1 and v1alpha (grpcurl 1.8 asks for v1alpha) listing `services` and the
/// health service; the descriptor set holds every berth.v1 file.
pub fn reflection(
    services: &[&str],
) -> Result<
    (
        tonic_reflection::server::v1::ServerReflectionServer<
            impl tonic_reflection::server::v1::ServerReflection,
        >,
        tonic_reflection::server::v1alpha::ServerReflectionServer<
            impl tonic_reflection::server::v1alpha::ServerReflection,
        >,
    ),
    ServeError,
> {
    let builder = || {
        let mut b = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(berth_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .with_service_name("grpc.health.v1.Health");
        for s in services {
            b = b.with_service_name(*s);
        }
        b
    };
    let v1 = builder()
        .build_v1()
        .map_err(|e| ServeError::Reflection(e.to_string()))?;
    let v1alpha = builder()
        .build_v1alpha()
        .map_err(|e| ServeError::Reflection(e.to_string()))?;
    Ok((v1, v1alpha))
}

/// Serves `router` on one bound listener until `shutdown` (a Unix socket file is removed after).
pub fn spawn_serve(
    addr: String,
    l: BoundListener,
    router: FrontRouter,
    shutdown: CancellationToken,
) -> tokio::task::JoinHandle<Result<(), ServeError>> {
    tracing::info!(listen = %l.display(), "serving gRPC");
    let signal = async move { shutdown.cancelled().await };
    crate::spawn_in(
        tracing::info_span!("grpc", listen = %l.display()),
        async move {
            let res = match l.0 {
                Bound::Tcp(t, _) => {
                    // Each connection's loopback peer is looked up once, as it is accepted.
                    let incoming = TcpListenerStream::new(t).then(|s| async move {
                        match s {
                            Ok(s) => {
                                let _ = s.set_nodelay(true);
                                Ok(IdentifiedTcp::accept(s).await)
                            }
                            Err(e) => Err(e),
                        }
                    });
                    router.serve_with_incoming_shutdown(incoming, signal).await
                }
                Bound::Unix(u, p) => {
                    let r = router
                        .serve_with_incoming_shutdown(UnixListenerStream::new(u), signal)
                        .await;
                    let _ = std::fs::remove_file(p);
                    r
                }
            };
            res.map_err(|source| ServeError::Serve { addr, source })
        },
    )
}

/// Waits for the gRPC servers to drain, at most 3 s: a client that never answers the GOAWAY
/// ping must not hold the shutdown for long.
pub async fn drain_servers(
    servers: Vec<tokio::task::JoinHandle<Result<(), ServeError>>>,
) -> Result<(), ServeError> {
    let mut result = Ok(());
    match tokio::time::timeout(Duration::from_secs(3), futures::future::join_all(servers)).await {
        Ok(results) => {
            for r in results.into_iter().flatten() {
                if let Err(e) = r {
                    result = Err(e);
                }
            }
        }
        Err(_) => tracing::warn!("gRPC connections did not drain within 3 s"),
    }
    result
}
