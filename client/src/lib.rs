//! Rust client of the berth.v1 API. One address, `HOST:PORT`, `http://HOST:PORT`,
//! `https://HOST:PORT` or `unix:PATH`, reaches a host daemon or a scheduler alike; with
//! [`TlsFiles`], a `HOST:PORT` is reached over TLS.

use std::path::PathBuf;

use berth_proto::v1::cluster_client::ClusterClient;
use berth_proto::v1::host_client::HostClient;
use berth_proto::v1::workers_client::WorkersClient;
use hyper_util::rt::TokioIo;
use tonic::transport::{Channel, Endpoint, Uri};

pub use berth_proto::v1 as pb;
pub use failover::Failover;
pub use tls::{Target, TlsFiles};

pub mod cli;
pub mod failover;
#[cfg(test)]
mod pki;
mod tls;

/// Default address when neither `--addr` nor `BERTH_ADDR` is given.
pub const DEFAULT_ADDR: &str = "127.0.0.1:7300";

/// Failure to reach a berth server.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("invalid address {addr:?}: {message}")]
    Address { addr: String, message: String },
    #[error("connect to {addr}: {source}")]
    Connect {
        addr: String,
        #[source]
        source: tonic::transport::Error,
    },
    /// A client certificate without its key, or a key without its certificate.
    #[error("{given} is given without {missing}: a client certificate goes with its key")]
    TlsIncomplete {
        given: &'static str,
        missing: &'static str,
    },
    /// TLS without a CA to check the server's certificate against (this client carries no
    /// system CA store).
    #[error(
        "TLS to {addr} needs the CA certificate that signs the server's: --tls-ca (BERTH_TLS_CA)"
    )]
    TlsNoCa { addr: String },
    /// A file of [`TlsFiles`] that cannot be read, or holds no PEM block of its kind.
    #[error("cannot read {what} {}: {source}", .path.display())]
    TlsFile {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// TLS material that rustls refuses (a key it cannot parse).
    #[error("TLS material for {addr}: {source}")]
    Tls {
        addr: String,
        #[source]
        source: tonic::transport::Error,
    },
}

impl ClientError {
    /// Whether the failure lies in what the caller gave (the address, the TLS files) rather
    /// than in reaching the server: retrying cannot mend it.
    pub fn is_misconfigured(&self) -> bool {
        !matches!(self, ClientError::Connect { .. })
    }
}

/// A connection to a berth server, with one accessor per service.
#[derive(Debug, Clone)]
pub struct Client {
    channel: Channel,
}

impl Client {
    /// Connects to `addr` (`HOST:PORT`, `http://HOST:PORT` or `unix:PATH`) in plaintext.
    pub async fn connect(addr: &str) -> Result<Self, ClientError> {
        Self::connect_with(addr, &TlsFiles::default()).await
    }

    /// Connects over TLS when `tls` is not empty (a `HOST:PORT` address then means https;
    /// `unix:` addresses never use TLS, an explicit `http://` neither), plaintext otherwise.
    /// `https://` is TLS in any case, and needs `tls.ca`.
    ///
    /// `addr` may be a comma-separated list (scheduler replicas): each is tried in turn and the
    /// first that answers is used; an address or TLS file that is wrong fails at once.
    pub async fn connect_with(addr: &str, tls: &TlsFiles) -> Result<Self, ClientError> {
        tls.check()?;
        let list: Vec<&str> = addr
            .split(',')
            .map(str::trim)
            .filter(|a| !a.is_empty())
            .collect();
        if list.is_empty() {
            return Err(ClientError::Address {
                addr: addr.to_owned(),
                message: "no address given".into(),
            });
        }
        let mut last = None;
        for a in list {
            match Self::connect_one(a, tls).await {
                Ok(c) => return Ok(c),
                Err(e) if e.is_misconfigured() => return Err(e),
                Err(e) => last = Some(e),
            }
        }
        Err(last.expect("at least one address was tried"))
    }

    async fn connect_one(addr: &str, tls: &TlsFiles) -> Result<Self, ClientError> {
        let channel = match Target::parse(addr, !tls.is_empty())? {
            Target::Unix(path) => {
                // The URI is required by the HTTP/2 layer but never dialled.
                Endpoint::from_static("http://localhost")
                    .connect_with_connector(tower::service_fn(move |_: Uri| {
                        let path = path.clone();
                        async move {
                            Ok::<_, std::io::Error>(TokioIo::new(
                                tokio::net::UnixStream::connect(path).await?,
                            ))
                        }
                    }))
                    .await
            }
            Target::Tcp { uri, tls: secure } => {
                let mut ep = Endpoint::from_shared(uri)
                    .map_err(|e| ClientError::Address {
                        addr: addr.to_owned(),
                        message: e.to_string(),
                    })?
                    .tcp_nodelay(true);
                if secure {
                    // The server's name is the address's host (an IP address is checked
                    // against the certificate's IP SANs).
                    ep = ep
                        .tls_config(tls.client_config(addr).await?)
                        .map_err(|source| ClientError::Tls {
                            addr: addr.to_owned(),
                            source,
                        })?;
                }
                ep.connect().await
            }
        }
        .map_err(|source| ClientError::Connect {
            addr: addr.to_owned(),
            source,
        })?;
        Ok(Self { channel })
    }

    /// The address from `BERTH_ADDR`, else [`DEFAULT_ADDR`].
    pub fn default_addr() -> String {
        std::env::var("BERTH_ADDR").unwrap_or_else(|_| DEFAULT_ADDR.to_owned())
    }

    pub fn workers(&self) -> WorkersClient<Channel> {
        WorkersClient::new(self.channel.clone()).max_decoding_message_size(64 << 20)
    }

    pub fn host(&self) -> HostClient<Channel> {
        HostClient::new(self.channel.clone())
    }

    pub fn cluster(&self) -> ClusterClient<Channel> {
        ClusterClient::new(self.channel.clone())
    }

    pub fn channel(&self) -> Channel {
        self.channel.clone()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::health_client::HealthClient;
    use tonic_health::pb::health_server::HealthServer;
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::server::{HealthReporter, HealthService};

    use super::*;
    use crate::cli::error_chain;
    use crate::pki::{self, Pki};

    /// The client certificates (DER) that the server saw, one entry per call.
    type Seen = Arc<Mutex<Vec<Vec<Vec<u8>>>>>;

    /// `grpc.health.v1.Health` on loopback over TLS, requiring a client certificate signed by
    /// the CA of `pki`; records the peer certificates of every call that gets through.
    async fn serve(pki: &Pki) -> (String, Seen) {
        let seen = Seen::default();
        let record = seen.clone();
        let health = HealthServer::with_interceptor(
            HealthService::from_health_reporter(HealthReporter::new()),
            move |req: tonic::Request<()>| {
                let certs = req
                    .peer_certs()
                    .map(|c| c.iter().map(|d| d.to_vec()).collect())
                    .unwrap_or_default();
                record.lock().unwrap().push(certs);
                Ok(req)
            },
        );
        let (incoming, port) = pki::listen().await;
        tokio::spawn(
            pki.server()
                .add_service(health)
                .serve_with_incoming(incoming),
        );
        (format!("127.0.0.1:{port}"), seen)
    }

    async fn check(c: &Client) -> Result<ServingStatus, tonic::Status> {
        let r = HealthClient::new(c.channel())
            .check(HealthCheckRequest {
                service: String::new(),
            })
            .await?;
        Ok(r.into_inner().status())
    }

    /// Connects and makes one call; the failure of either, as text.
    async fn call(addr: &str, tls: &TlsFiles) -> Result<ServingStatus, String> {
        let c = Client::connect_with(addr, tls)
            .await
            .map_err(|e| error_chain(&e))?;
        check(&c).await.map_err(|s| s.to_string())
    }

    #[tokio::test]
    async fn mutual_tls_with_ca_certificate_and_key() {
        let pki = Pki::new();
        let (addr, seen) = serve(&pki).await;
        let port = addr.rsplit(':').next().unwrap();
        // By IP address (checked against the IP SAN), by name, and with the scheme written.
        let addrs = [
            addr.clone(),
            format!("localhost:{port}"),
            format!("https://127.0.0.1:{port}"),
        ];
        for a in &addrs {
            assert_eq!(
                call(a, &pki.client()).await,
                Ok(ServingStatus::Serving),
                "{a}"
            );
        }
        let seen = seen.lock().unwrap();
        assert_eq!(seen.len(), addrs.len());
        for certs in seen.iter() {
            assert_eq!(
                certs.first(),
                Some(&pki.client_der),
                "the server sees alice's certificate"
            );
        }
    }

    /// A list of addresses (replicas): the first that answers is used, in order; a wrong
    /// address in it fails at once; none answering names the last tried.
    #[tokio::test]
    async fn a_list_of_addresses_fails_over_to_the_first_that_answers() {
        let pki = Pki::new();
        let (addr, seen) = serve(&pki).await;
        // A port nobody listens on: bound, then closed.
        let dead = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            format!("127.0.0.1:{}", l.local_addr().unwrap().port())
        };
        assert_eq!(
            call(&format!("{dead}, {addr}"), &pki.client()).await,
            Ok(ServingStatus::Serving)
        );
        assert_eq!(seen.lock().unwrap().len(), 1);
        let e = Client::connect_with(&format!("{dead},{dead}"), &pki.client())
            .await
            .unwrap_err();
        assert!(
            matches!(&e, ClientError::Connect { addr, .. } if *addr == dead),
            "{e:?}"
        );
        let e = Client::connect_with(&format!("http://bad host:1,{addr}"), &pki.client())
            .await
            .unwrap_err();
        assert!(e.is_misconfigured(), "{e:?}");
        assert!(Client::connect_with(" , ", &pki.client()).await.is_err());
    }

    #[tokio::test]
    async fn a_server_that_requires_a_certificate_refuses_a_client_without_one() {
        let pki = Pki::new();
        let (addr, seen) = serve(&pki).await;
        let ca_only = TlsFiles {
            ca: Some(pki.ca.clone()),
            ..Default::default()
        };
        let r = call(&addr, &ca_only).await;
        assert!(r.is_err(), "{r:?}");
        // Nor does plaintext get through.
        let r = call(&addr, &TlsFiles::default()).await;
        assert!(r.is_err(), "{r:?}");
        assert!(seen.lock().unwrap().is_empty(), "a call got through");
    }

    #[tokio::test]
    async fn a_server_whose_certificate_another_ca_signed_is_refused() {
        let pki = Pki::new();
        let (addr, seen) = serve(&pki).await;
        let wrong_ca = TlsFiles {
            ca: Some(pki.other_ca.clone()),
            ..pki.client()
        };
        let e = Client::connect_with(&addr, &wrong_ca).await.unwrap_err();
        assert!(matches!(e, ClientError::Connect { .. }), "{e:?}");
        assert!(!e.is_misconfigured());
        let text = error_chain(&e);
        assert!(text.contains("UnknownIssuer"), "{text}");
        assert!(seen.lock().unwrap().is_empty());
    }

    #[tokio::test]
    async fn tls_material_that_cannot_work_fails_before_connecting() {
        let pki = Pki::new();
        // Nothing listens there: these fail before any connection is tried.
        let addr = "127.0.0.1:1";
        let cert_only = TlsFiles {
            ca: Some(pki.ca.clone()),
            cert: Some(pki.client_cert.clone()),
            key: None,
        };
        let e = Client::connect_with(addr, &cert_only).await.unwrap_err();
        assert!(matches!(e, ClientError::TlsIncomplete { .. }), "{e:?}");
        assert!(e.is_misconfigured());
        assert!(e.to_string().contains("--tls-key (BERTH_TLS_KEY)"), "{e}");
        // A key file that holds no key is named.
        let bad_key = TlsFiles {
            key: Some(pki.ca.clone()),
            ..pki.client()
        };
        let e = Client::connect_with(addr, &bad_key).await.unwrap_err();
        assert!(matches!(e, ClientError::TlsFile { .. }), "{e:?}");
        assert!(e.to_string().contains(pki.ca.to_str().unwrap()), "{e}");
        let e = Client::connect_with("https://127.0.0.1:1", &TlsFiles::default())
            .await
            .unwrap_err();
        assert!(matches!(e, ClientError::TlsNoCa { .. }), "{e:?}");
    }

    #[tokio::test]
    async fn unix_sockets_and_http_addresses_stay_plaintext() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("berthd.sock");
        let unix = tokio::net::UnixListener::bind(&path).unwrap();
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(tonic_health::server::health_reporter().1)
                .serve_with_incoming(tokio_stream::wrappers::UnixListenerStream::new(unix)),
        );
        let (tcp, port) = pki::listen().await;
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(tonic_health::server::health_reporter().1)
                .serve_with_incoming(tcp),
        );
        let tls = Pki::new().client();
        for addr in [
            format!("unix:{}", path.display()),
            format!("http://127.0.0.1:{port}"),
        ] {
            assert_eq!(
                call(&addr, &tls).await,
                Ok(ServingStatus::Serving),
                "{addr}"
            );
        }
        // Where TLS material makes HOST:PORT mean https, a plaintext server is not reached.
        assert!(call(&format!("127.0.0.1:{port}"), &tls).await.is_err());
        assert_eq!(
            call(&format!("127.0.0.1:{port}"), &TlsFiles::default()).await,
            Ok(ServingStatus::Serving)
        );
    }
}
