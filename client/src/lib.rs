//! Rust client of the berth.v1 API. One address, `HOST:PORT`, `http://HOST:PORT` or
//! `unix:PATH`, reaches a host daemon or a scheduler alike.

use std::path::PathBuf;

use berth_proto::v1::cluster_client::ClusterClient;
use berth_proto::v1::host_client::HostClient;
use berth_proto::v1::workers_client::WorkersClient;
use hyper_util::rt::TokioIo;
use tonic::transport::{Channel, Endpoint, Uri};

pub use berth_proto::v1 as pb;

pub mod cli;

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
}

/// A connection to a berth server, with one accessor per service.
#[derive(Debug, Clone)]
pub struct Client {
    channel: Channel,
}

impl Client {
    /// Connects to `addr` (`HOST:PORT`, `http://HOST:PORT` or `unix:PATH`).
    pub async fn connect(addr: &str) -> Result<Self, ClientError> {
        let channel = if let Some(path) = addr.strip_prefix("unix:") {
            let path = PathBuf::from(path.trim_start_matches("//"));
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
        } else {
            let uri = if addr.contains("://") {
                addr.to_owned()
            } else {
                format!("http://{addr}")
            };
            let ep = Endpoint::from_shared(uri).map_err(|e| ClientError::Address {
                addr: addr.to_owned(),
                message: e.to_string(),
            })?;
            ep.tcp_nodelay(true).connect().await
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
