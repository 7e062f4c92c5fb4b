//! A host daemon's membership in a scheduler (`berthd --scheduler ADDR[,ADDR…]`): one heartbeat
//! every interval the scheduler asks for, each carrying the host's whole `HostInfo`, to every
//! replica of the list, each on its own. The protocol is described in
//! proto/berth/v1/internal.proto. Beats never stop the daemon: a scheduler that cannot be
//! reached is retried, and said once in the log, not at every beat.

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use berth_core::removals;
use berth_proto::v1 as pb;
use tokio_util::sync::CancellationToken;

use crate::info::host_info;
use crate::supervisor::Host;

/// Beat interval until the scheduler says otherwise.
const FIRST_INTERVAL: Duration = Duration::from_secs(2);
/// How long one beat may take before it counts as missed.
const BEAT_TIMEOUT: Duration = Duration::from_secs(5);

/// What the schedulers last said of this host and the cluster: reported back on every beat to
/// every replica, so that a scheduler that restarted learns it again and what one replica was
/// told reaches the others.
#[derive(Debug, Default)]
pub struct Membership {
    held: Mutex<Held>,
    /// Routes to the cluster's other hosts, fed by every answer (`None`: no worker network).
    peers: Option<Arc<crate::peers::Peers>>,
}

#[derive(Debug, Default)]
struct Held {
    draining: bool,
    /// When `draining` was last changed (the changing replica's clock, ms): the newer wins.
    drain_version: u64,
    /// Hosts removed from the cluster, by when (ms since the epoch).
    removed: removals::Removals,
}

impl Membership {
    pub fn with_peers(peers: Option<Arc<crate::peers::Peers>>) -> Self {
        Self {
            peers,
            ..Default::default()
        }
    }

    fn held(&self) -> std::sync::MutexGuard<'_, Held> {
        self.held.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn draining(&self) -> bool {
        self.held().draining
    }

    /// A beat carrying what this host holds.
    fn beat(&self, info: pb::HostInfo, leaving: bool, sequence: u64) -> pb::HeartbeatRequest {
        let held = self.held();
        pb::HeartbeatRequest {
            info: Some(info),
            draining: held.draining,
            leaving,
            sequence,
            drain_version: held.drain_version,
            peers_version: self.peers_version(),
            removed: held
                .removed
                .iter()
                .map(|(name, at)| pb::RemovedHost {
                    name: name.clone(),
                    at_ms: *at,
                })
                .collect(),
        }
    }

    /// Takes a replica's answer: its drain where it is newer than the one held, its removals.
    /// Returns the drain when it changed.
    fn take(&self, r: &pb::HeartbeatResponse) -> Option<bool> {
        let mut held = self.held();
        let draining = r.state == pb::HostState::Draining as i32;
        let mut changed = None;
        if r.drain_version > held.drain_version || (r.drain_version == 0 && held.drain_version == 0)
        {
            // A scheduler that predates drain versions (0) is taken at its word, as before.
            if held.draining != draining {
                changed = Some(draining);
            }
            held.draining = draining;
            held.drain_version = r.drain_version;
        }
        for h in r.removed.iter().take(removals::MAX) {
            removals::record(&mut held.removed, &h.name, h.at_ms);
        }
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        removals::prune(&mut held.removed, now);
        changed
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

/// The replicas of a `--scheduler` list.
pub fn replicas(list: &str) -> Vec<String> {
    list.split(',')
        .map(str::trim)
        .filter(|a| !a.is_empty())
        .map(str::to_owned)
        .collect()
}

/// Beats to one replica until `shutdown`, then sends a last beat with `leaving` set.
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
            // Bounded as a beat is: a connect whose SYNs go nowhere (an address gone, a stale
            // neighbour entry) would otherwise wait out the kernel's retries, about two minutes.
            let connect = berth_client::Client::connect_with(&scheduler, &tls);
            match tokio::time::timeout(BEAT_TIMEOUT, connect).await {
                Ok(Ok(c)) => {
                    client = Some(pb::membership_client::MembershipClient::new(c.channel()))
                }
                failed => {
                    if !failing {
                        let error = match failed {
                            Ok(Err(e)) => e.to_string(),
                            _ => format!("no connection within {BEAT_TIMEOUT:?}"),
                        };
                        tracing::warn!(scheduler = %scheduler, error = %error, "scheduler unreachable; retrying");
                        failing = true;
                    }
                }
            }
        }
        if let Some(c) = client.as_mut() {
            sequence += 1;
            let req = state.beat(host_info(&host, &address), false, sequence);
            match tokio::time::timeout(BEAT_TIMEOUT, c.heartbeat(req)).await {
                Ok(Ok(r)) => {
                    let r = r.into_inner();
                    if failing || sequence == 1 {
                        tracing::info!(scheduler = %scheduler, "registered with the scheduler");
                        failing = false;
                    }
                    if let Some(draining) = state.take(&r) {
                        tracing::info!(draining, scheduler = %scheduler, "scheduler changed this host's state");
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
        let req = state.beat(host_info(&host, &address), true, sequence + 1);
        let _ = tokio::time::timeout(Duration::from_secs(1), c.heartbeat(req)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(draining: bool, version: u64, removed: &[(&str, u64)]) -> pb::HeartbeatResponse {
        pb::HeartbeatResponse {
            interval_ms: 1000,
            state: if draining {
                pb::HostState::Draining
            } else {
                pb::HostState::Ready
            } as i32,
            drain_version: version,
            peers: None,
            removed: removed
                .iter()
                .map(|(n, at)| pb::RemovedHost {
                    name: (*n).into(),
                    at_ms: *at,
                })
                .collect(),
        }
    }

    /// The newer drain wins whichever replica tells it; an older answer (a replica that has not
    /// heard yet) changes nothing; removals are kept and told back on every beat.
    #[test]
    fn the_newer_drain_wins_and_removals_are_told_on() {
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64;
        let m = Membership::default();
        assert_eq!(m.take(&answer(true, now, &[("gone", now)])), Some(true));
        assert_eq!(m.take(&answer(false, now - 5, &[])), None, "stale");
        assert!(m.draining());
        let beat = m.beat(pb::HostInfo::default(), false, 7);
        assert!(beat.draining);
        assert_eq!(beat.drain_version, now);
        assert_eq!(beat.removed.len(), 1);
        assert_eq!(beat.removed[0].name, "gone");
        assert_eq!(m.take(&answer(false, now + 1, &[])), Some(false));
        // A removal past a day is forgotten.
        m.take(&answer(false, now + 1, &[("old", now - 25 * 3600 * 1000)]));
        let names: Vec<String> = m
            .beat(pb::HostInfo::default(), false, 8)
            .removed
            .into_iter()
            .map(|r| r.name)
            .collect();
        assert_eq!(names, ["gone"]);
    }
}
