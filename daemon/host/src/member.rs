//! A host daemon's membership in a scheduler (`berthd --scheduler ADDR`): one heartbeat every
//! interval the scheduler asks for, each carrying the host's whole `HostInfo`. The protocol is
//! described in proto/berth/v1/internal.proto. Beats never stop the daemon: a scheduler that
//! cannot be reached is retried, and said once in the log, not at every beat.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use berth_proto::v1 as pb;
use tokio_util::sync::CancellationToken;

use crate::info::host_info;
use crate::supervisor::Host;

/// Beat interval until the scheduler says otherwise.
const FIRST_INTERVAL: Duration = Duration::from_secs(2);
/// How long one beat may take before it counts as missed.
const BEAT_TIMEOUT: Duration = Duration::from_secs(5);

/// What the scheduler last said of this host; reported back on every beat so that a scheduler
/// that restarted learns it again.
#[derive(Debug, Default)]
pub struct Membership {
    draining: AtomicBool,
    /// Routes to the cluster's other hosts, fed by every answer (`None`: no worker network).
    peers: Option<Arc<crate::peers::Peers>>,
}

impl Membership {
    pub fn with_peers(peers: Option<Arc<crate::peers::Peers>>) -> Self {
        Self {
            peers,
            ..Default::default()
        }
    }

    pub fn draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    /// The version of the peer list this host has applied.
    pub fn peers_version(&self) -> u64 {
        self.peers.as_ref().map_or(0, |p| p.version())
    }

    /// Hands an answer's peer list (if any) to the route manager, on a task of its own: route
    /// work never delays the next beat. Lists are applied in the order they came (the manager's
    /// lock is fair), and the version reported is the one applied last.
    pub fn take_peers(&self, list: Option<&pb::PeerList>) {
        if let (Some(p), Some(list)) = (&self.peers, list) {
            let (p, list) = (p.clone(), list.clone());
            tokio::spawn(async move { p.take(Some(&list)).await });
        }
    }
}

/// Beats until `shutdown`, then sends a last beat with `leaving` set.
pub async fn run(
    host: Host,
    address: String,
    scheduler: String,
    tls: berth_client::TlsFiles,
    state: Arc<Membership>,
    shutdown: CancellationToken,
) {
    let mut interval = FIRST_INTERVAL;
    let mut sequence = 0u64;
    let mut client: Option<pb::membership_client::MembershipClient<tonic::transport::Channel>> =
        None;
    let mut failing = false;
    loop {
        if client.is_none() {
            match berth_client::Client::connect_with(&scheduler, &tls).await {
                Ok(c) => client = Some(pb::membership_client::MembershipClient::new(c.channel())),
                Err(e) => {
                    if !failing {
                        tracing::warn!(scheduler = %scheduler, error = %e, "scheduler unreachable; retrying");
                        failing = true;
                    }
                }
            }
        }
        if let Some(c) = client.as_mut() {
            sequence += 1;
            let req = pb::HeartbeatRequest {
                info: Some(host_info(&host, &address)),
                draining: state.draining(),
                leaving: false,
                sequence,
                peers_version: state.peers_version(),
            };
            match tokio::time::timeout(BEAT_TIMEOUT, c.heartbeat(req)).await {
                Ok(Ok(r)) => {
                    let r = r.into_inner();
                    if failing || sequence == 1 {
                        tracing::info!(scheduler = %scheduler, "registered with the scheduler");
                        failing = false;
                    }
                    let draining = r.state == pb::HostState::Draining as i32;
                    if state.draining.swap(draining, Ordering::Relaxed) != draining {
                        tracing::info!(draining, "scheduler changed this host's state");
                    }
                    interval = Duration::from_millis(u64::from(r.interval_ms.clamp(100, 60_000)));
                    state.take_peers(r.peers.as_ref());
                }
                Ok(Err(status)) => {
                    if !failing {
                        tracing::warn!(scheduler = %scheduler, error = %status.message(), code = ?status.code(), "heartbeat refused; retrying");
                        failing = true;
                    }
                    // A fresh connection next time: the old one may be to a dead scheduler.
                    client = None;
                }
                Err(_) => {
                    if !failing {
                        tracing::warn!(scheduler = %scheduler, "heartbeat timed out; retrying");
                        failing = true;
                    }
                    client = None;
                }
            }
        }
        let wait = if failing {
            interval.min(Duration::from_secs(1))
        } else {
            interval
        };
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = shutdown.cancelled() => break,
        }
    }
    if let Some(mut c) = client {
        let req = pb::HeartbeatRequest {
            info: Some(host_info(&host, &address)),
            draining: state.draining(),
            leaving: true,
            sequence: sequence + 1,
            peers_version: state.peers_version(),
        };
        let _ = tokio::time::timeout(Duration::from_secs(1), c.heartbeat(req)).await;
    }
}
