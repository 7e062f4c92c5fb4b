//! The cluster's other hosts, as this host routes to them: each heartbeat answer that carries
//! the scheduler's peer list ([`Peers::take`]) makes the routes, rules and masquerade exceptions
//! of [`berth_sys::routes`] match it. Desired state, idempotent: the whole list every time, so
//! any scheduler replica may feed it, in any order, and a list already applied costs nothing.
//!
//! Peers are left out (and said once in the log) where a route would be wrong: this host
//! itself, a host without a worker subnet, one whose subnet overlaps this host's, one whose
//! address is loopback or this host's own (hosts sharing one network namespace, as in tests,
//! reach each other's workers through their bridges already), and one whose address does not
//! resolve to IPv4.

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr, ToSocketAddrs};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use berth_core::ipam::Subnet;
use berth_proto::v1 as pb;
use berth_sys::routes::{ClusterNet, PeerRoute};

/// This host's routes to its peers.
#[derive(Debug)]
pub struct Peers {
    name: String,
    /// This host's own address (the host of its advertised address), never a next hop.
    own: Option<IpAddr>,
    net: ClusterNet,
    /// The version of the list last applied, sent back with each beat.
    version: AtomicU64,
    /// What was last applied, and the peers said to be left out.
    last: tokio::sync::Mutex<Option<Vec<PeerRoute>>>,
    skipped: Mutex<BTreeSet<String>>,
}

/// The host part of an address as `HostInfo.address` has it (`HOST:PORT`, `[V6]:PORT`,
/// `http(s)://HOST:PORT`); `None` for `unix:PATH`.
pub fn address_host(address: &str) -> Option<&str> {
    if address.starts_with("unix:") {
        return None;
    }
    let a = address
        .strip_prefix("http://")
        .or_else(|| address.strip_prefix("https://"))
        .unwrap_or(address);
    let a = a.split('/').next().unwrap_or(a);
    let host = match a.rsplit_once(':') {
        Some((h, port)) if port.chars().all(|c| c.is_ascii_digit()) => h,
        _ => a,
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    (!host.is_empty()).then_some(host)
}

/// The routes `peers` call for on host `name` (subnet `own_subnet`, address `own`), and why
/// each peer left out is: `resolve` turns a host name into an address.
pub fn desired(
    name: &str,
    own_subnet: &Subnet,
    own: Option<IpAddr>,
    peers: &[pb::Peer],
    resolve: impl Fn(&str) -> Option<Ipv4Addr>,
) -> (Vec<PeerRoute>, Vec<(String, String)>) {
    let mut routes = Vec::new();
    let mut skipped = Vec::new();
    let mut skip = |p: &pb::Peer, why: String| skipped.push((p.name.clone(), why));
    for p in peers {
        if p.name == name || p.subnet.is_empty() {
            continue;
        }
        let subnet = match Subnet::parse(&p.subnet) {
            Ok(s) => s,
            Err(e) => {
                skip(p, e.to_string());
                continue;
            }
        };
        if subnet.contains(own_subnet.network()) || own_subnet.contains(subnet.network()) {
            skip(
                p,
                format!("its subnet {subnet} overlaps this host's {own_subnet}"),
            );
            continue;
        }
        let Some(host) = address_host(&p.address) else {
            skip(p, format!("address {:?} has no IP host", p.address));
            continue;
        };
        let via = match host.parse::<IpAddr>() {
            Ok(IpAddr::V4(v4)) => Some(v4),
            Ok(IpAddr::V6(v6)) => v6.to_ipv4_mapped(),
            Err(_) => resolve(host),
        };
        let Some(via) = via else {
            skip(p, format!("address {:?} has no IPv4 address", p.address));
            continue;
        };
        if via.is_loopback() || via.is_unspecified() || own == Some(IpAddr::V4(via)) {
            // Same network namespace: its bridge's subnet route is here already.
            skip(p, format!("address {via} is this host's own"));
            continue;
        }
        routes.push(PeerRoute::new(&subnet, via));
    }
    routes.sort();
    (routes, skipped)
}

fn resolve(host: &str) -> Option<Ipv4Addr> {
    (host, 0)
        .to_socket_addrs()
        .ok()?
        .find_map(|a| match a.ip() {
            IpAddr::V4(v4) => Some(v4),
            IpAddr::V6(_) => None,
        })
}

impl Peers {
    /// The peer routes of host `name`, advertised at `address`, on `net`.
    pub fn new(name: &str, address: &str, net: ClusterNet) -> Self {
        let own = address_host(address).and_then(|h| h.parse().ok());
        Self {
            name: name.to_owned(),
            own,
            net,
            version: AtomicU64::new(0),
            last: tokio::sync::Mutex::new(None),
            skipped: Mutex::new(BTreeSet::new()),
        }
    }

    /// The version of the peer list applied last (0: none yet).
    pub fn version(&self) -> u64 {
        self.version.load(Ordering::Relaxed)
    }

    /// Takes a heartbeat answer's peer list (`None`: unchanged) and applies it.
    pub async fn take(&self, list: Option<&pb::PeerList>) {
        let Some(list) = list else {
            return;
        };
        let mut last = self.last.lock().await;
        let (name, subnet, own) = (self.name.clone(), self.net.subnet, self.own);
        let peers = list.peers.clone();
        let computed =
            tokio::task::spawn_blocking(move || desired(&name, &subnet, own, &peers, resolve))
                .await;
        let Ok((routes, skipped)) = computed else {
            return;
        };
        {
            let mut said = self.skipped.lock().unwrap_or_else(|p| p.into_inner());
            for (peer, why) in &skipped {
                if said.insert(format!("{peer}: {why}")) {
                    tracing::info!(peer = %peer, reason = %why, "no route to this peer");
                }
            }
        }
        if last.as_ref() == Some(&routes) {
            self.version.store(list.version, Ordering::Relaxed);
            return;
        }
        let net = self.net.clone();
        let want = routes.clone();
        let started = std::time::Instant::now();
        match tokio::task::spawn_blocking(move || net.apply(&want)).await {
            Ok(Ok(a)) => {
                tracing::info!(
                    peers = routes.len(),
                    took_ms = started.elapsed().as_millis() as u64,
                    put = a.put,
                    removed = a.removed,
                    rules_added = a.rules_added,
                    rules_removed = a.rules_removed,
                    "cluster routes updated"
                );
                for f in &a.failures {
                    // Each is retried when the list next changes (or the daemon restarts).
                    tracing::warn!(what = %f.what, error = %f.error, "cluster route not made (peers must share this host's L2 segment: no overlay is built)");
                }
                *last = Some(routes);
                self.version.store(list.version, Ordering::Relaxed);
            }
            // Asked again with the next beat: the version stays.
            Ok(Err(e)) => tracing::warn!(error = %e, "cluster routes not updated; retrying"),
            Err(e) => tracing::warn!(error = %e, "cluster routes not updated; retrying"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(name: &str, address: &str, subnet: &str) -> pb::Peer {
        pb::Peer {
            name: name.into(),
            address: address.into(),
            subnet: subnet.into(),
            state: pb::HostState::Ready as i32,
        }
    }

    #[test]
    fn address_hosts() {
        assert_eq!(address_host("10.0.0.1:7300"), Some("10.0.0.1"));
        assert_eq!(
            address_host("http://gpu-1.example:7300"),
            Some("gpu-1.example")
        );
        assert_eq!(address_host("https://10.0.0.2:7300/"), Some("10.0.0.2"));
        assert_eq!(
            address_host("[::ffff:10.0.0.3]:7300"),
            Some("::ffff:10.0.0.3")
        );
        assert_eq!(address_host("10.0.0.4"), Some("10.0.0.4"));
        assert_eq!(address_host("unix:/run/berth.sock"), None);
    }

    #[test]
    fn peers_become_routes_and_the_unroutable_are_said() {
        let own = Subnet::parse("10.1.0.0/16").unwrap();
        let peers = [
            peer("me", "192.0.2.1:7300", "10.1.0.0/16"),
            peer("b", "192.0.2.2:7300", "10.2.0.0/16"),
            peer("c", "c.example:7300", "10.3.0.0/16"),
            peer("nonet", "192.0.2.4:7300", ""),
            peer("local", "127.0.0.1:7301", "10.5.0.0/16"),
            peer("twin", "192.0.2.1:7302", "10.6.0.0/16"),
            peer("over", "192.0.2.7:7300", "10.1.128.0/17"),
            peer("unix", "unix:/x.sock", "10.8.0.0/16"),
            peer("nowhere", "gone.example:1", "10.9.0.0/16"),
            peer("bad", "192.0.2.10:1", "10.10.0.1/16"),
        ];
        let resolve = |h: &str| (h == "c.example").then(|| Ipv4Addr::new(192, 0, 2, 3));
        let (routes, skipped) = desired("me", &own, "192.0.2.1".parse().ok(), &peers, resolve);
        let s = |t: &str| Subnet::parse(t).unwrap();
        assert_eq!(
            routes,
            [
                PeerRoute::new(&s("10.2.0.0/16"), "192.0.2.2".parse().unwrap()),
                PeerRoute::new(&s("10.3.0.0/16"), "192.0.2.3".parse().unwrap()),
            ]
        );
        let names: Vec<&str> = skipped.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(
            names,
            ["local", "twin", "over", "unix", "nowhere", "bad"],
            "{skipped:?}"
        );
    }
}
