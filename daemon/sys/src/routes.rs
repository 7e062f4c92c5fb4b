//! Routes to the other hosts of a cluster: each host's worker subnet is reached via that host's
//! address, on-link (hosts on one L2 segment; across routers an overlay would be needed, and
//! none is built). Given the whole list of peers, [`ClusterNet::apply`] makes the kernel match
//! it: routes added, changed (a host that moved) and removed (a host gone), in the main table
//! with protocol [`ROUTE_PROTOCOL`] (`ip route show proto 190`), which marks them as berthd's.
//!
//! With egress off, the policy rules that keep worker traffic in (netns.rs) get one
//! `from SUBNET to DEST lookup main` rule per peer subnet and peer address, of the same
//! protocol, so workers reach the cluster and nothing else. With egress on, the nft table's
//! `cluster` set lists the same destinations, which are not masqueraded: a worker sees its
//! peer's real address.
//!
//! Nothing here is removed when berthd stops: workers outlive a daemon restart and keep talking
//! across hosts; the next daemon's first peer list replaces what is stale, and a daemon started
//! without a scheduler removes everything of [`ROUTE_PROTOCOL`].

use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::net::{IpAddr, Ipv4Addr};

use rtnetlink::packet_core::{NLM_F_CREATE, NLM_F_REPLACE};
use rtnetlink::packet_route::route::{
    RouteAddress, RouteAttribute, RouteMessage, RouteProtocol, RouteType,
};
use rtnetlink::packet_route::rule::{RuleAction, RuleAttribute, RuleMessage};
use rtnetlink::packet_route::{AddressFamily, RouteNetlinkMessage};
use rtnetlink::RouteMessageBuilder;

use berth_core::ipam::Subnet;

use crate::netns::{Rtnl, RULE_PRIORITY};

/// Protocol number of the routes and rules berthd makes for its cluster (unassigned in
/// `/etc/iproute2/rt_protos`).
pub const ROUTE_PROTOCOL: u8 = 190;

/// A destination: network and prefix length.
pub type Dest = (Ipv4Addr, u8);

/// One peer's route: its subnet via its address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct PeerRoute {
    pub subnet: Dest,
    pub via: Ipv4Addr,
}

impl PeerRoute {
    pub fn new(subnet: &Subnet, via: Ipv4Addr) -> Self {
        Self {
            subnet: (subnet.network(), subnet.prefix()),
            via,
        }
    }
}

/// What [`plan`] says to do: routes to add or replace, destinations to remove.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Plan {
    pub put: Vec<PeerRoute>,
    pub remove: Vec<Dest>,
}

impl Plan {
    pub fn is_empty(&self) -> bool {
        self.put.is_empty() && self.remove.is_empty()
    }
}

/// The changes that make `current` (destination → next hop) into `desired`. A destination
/// listed twice in `desired` takes its first next hop.
pub fn plan(current: &BTreeMap<Dest, Ipv4Addr>, desired: &[PeerRoute]) -> Plan {
    let mut want: BTreeMap<Dest, Ipv4Addr> = BTreeMap::new();
    for r in desired {
        want.entry(r.subnet).or_insert(r.via);
    }
    Plan {
        put: want
            .iter()
            .filter(|(d, via)| current.get(d) != Some(via))
            .map(|(d, via)| PeerRoute {
                subnet: *d,
                via: *via,
            })
            .collect(),
        remove: current
            .keys()
            .filter(|d| !want.contains_key(d))
            .copied()
            .collect(),
    }
}

/// What the cluster's workers may reach past their own subnet: every peer's subnet and address.
pub fn destinations(routes: &BTreeMap<Dest, Ipv4Addr>) -> Vec<Dest> {
    let set: BTreeSet<Dest> = routes
        .iter()
        .flat_map(|(d, via)| [*d, (*via, 32)])
        .collect();
    set.into_iter().collect()
}

/// The routes of [`ROUTE_PROTOCOL`] in the main table (destination → next hop).
pub(crate) fn current_routes(nl: &mut Rtnl) -> io::Result<BTreeMap<Dest, Ipv4Addr>> {
    let mut get = RouteMessage::default();
    get.header.address_family = AddressFamily::Inet;
    let mut found = BTreeMap::new();
    for m in nl.dump(RouteNetlinkMessage::GetRoute(get))? {
        let RouteNetlinkMessage::NewRoute(r) = m else {
            continue;
        };
        if r.header.protocol != RouteProtocol::Other(ROUTE_PROTOCOL)
            || r.header.table != libc::RT_TABLE_MAIN
        {
            continue;
        }
        let mut dst = None;
        let mut via = None;
        for a in &r.attributes {
            match a {
                RouteAttribute::Destination(RouteAddress::Inet(d)) => dst = Some(*d),
                RouteAttribute::Gateway(RouteAddress::Inet(g)) => via = Some(*g),
                _ => {}
            }
        }
        if let (Some(d), Some(g)) = (dst, via) {
            found.insert((d, r.header.destination_prefix_length), g);
        }
    }
    Ok(found)
}

/// The rules of [`ROUTE_PROTOCOL`] from `subnet` (their destinations).
fn current_rules(nl: &mut Rtnl, subnet: &Subnet) -> io::Result<BTreeSet<Dest>> {
    let mut get = RuleMessage::default();
    get.header.family = AddressFamily::Inet;
    let mut found = BTreeSet::new();
    for m in nl.dump(RouteNetlinkMessage::GetRule(get))? {
        let RouteNetlinkMessage::NewRule(r) = m else {
            continue;
        };
        let ours = r
            .attributes
            .contains(&RuleAttribute::Protocol(RouteProtocol::Other(
                ROUTE_PROTOCOL,
            )));
        let from = r
            .attributes
            .contains(&RuleAttribute::Source(IpAddr::V4(subnet.network())))
            && r.header.src_len == subnet.prefix();
        if !ours || !from {
            continue;
        }
        for a in &r.attributes {
            if let RuleAttribute::Destination(IpAddr::V4(d)) = a {
                found.insert((*d, r.header.dst_len));
            }
        }
    }
    Ok(found)
}

fn route_message(r: &PeerRoute) -> RouteMessage {
    RouteMessageBuilder::<Ipv4Addr>::new()
        .destination_prefix(r.subnet.0, r.subnet.1)
        .gateway(r.via)
        .protocol(RouteProtocol::Other(ROUTE_PROTOCOL))
        .kind(RouteType::Unicast)
        .build()
}

fn delete_message(d: &Dest) -> RouteMessage {
    let mut m = RouteMessageBuilder::<Ipv4Addr>::new()
        .destination_prefix(d.0, d.1)
        .protocol(RouteProtocol::Other(ROUTE_PROTOCOL))
        .build();
    // Any scope: the kernel matches the route by destination, table and protocol.
    m.header.scope = rtnetlink::packet_route::route::RouteScope::NoWhere;
    m
}

/// `from SUBNET to DEST lookup main`, of [`ROUTE_PROTOCOL`], at the priority of the rule that
/// keeps worker-to-worker traffic in (before the `unreachable` one).
fn rule_message(subnet: &Subnet, d: &Dest) -> RuleMessage {
    let mut r = RuleMessage::default();
    r.header.family = AddressFamily::Inet;
    r.header.src_len = subnet.prefix();
    r.header.dst_len = d.1;
    r.header.table = libc::RT_TABLE_MAIN;
    r.header.action = RuleAction::ToTable;
    r.attributes.push(RuleAttribute::Priority(RULE_PRIORITY));
    r.attributes
        .push(RuleAttribute::Source(IpAddr::V4(subnet.network())));
    r.attributes
        .push(RuleAttribute::Destination(IpAddr::V4(d.0)));
    r.attributes
        .push(RuleAttribute::Table(u32::from(libc::RT_TABLE_MAIN)));
    r.attributes
        .push(RuleAttribute::Protocol(RouteProtocol::Other(
            ROUTE_PROTOCOL,
        )));
    r
}

/// A route or rule that could not be made, and why.
#[derive(Debug)]
pub struct Failure {
    pub what: String,
    pub error: io::Error,
}

/// What [`ClusterNet::apply`] did.
#[derive(Debug, Default)]
pub struct Applied {
    /// Routes added or changed.
    pub put: usize,
    pub removed: usize,
    pub rules_added: usize,
    pub rules_removed: usize,
    /// What failed; the rest was done.
    pub failures: Vec<Failure>,
}

/// A host's side of cluster routing.
#[derive(Debug, Clone)]
pub struct ClusterNet {
    pub bridge: String,
    pub subnet: Subnet,
    pub egress: bool,
}

impl ClusterNet {
    /// Makes the routes, rules and masquerade exceptions match `desired`. Blocking. An error
    /// means nothing could be read or done (no netlink); single failures are in the result.
    pub fn apply(&self, desired: &[PeerRoute]) -> io::Result<Applied> {
        let mut nl = Rtnl::open()?;
        let current = current_routes(&mut nl)?;
        let p = plan(&current, desired);
        let mut out = Applied::default();
        if !desired.is_empty() {
            // Workers of other hosts reach this host's workers through it.
            crate::netns::write_sysctl("/proc/sys/net/ipv4/ip_forward", "1")?;
        }
        let mut msgs: Vec<(RouteNetlinkMessage, u16)> = Vec::new();
        let mut whats = Vec::new();
        for r in &p.put {
            msgs.push((
                RouteNetlinkMessage::NewRoute(route_message(r)),
                NLM_F_CREATE | NLM_F_REPLACE,
            ));
            whats.push((
                true,
                format!("route {}/{} via {}", r.subnet.0, r.subnet.1, r.via),
            ));
        }
        for d in &p.remove {
            msgs.push((RouteNetlinkMessage::DelRoute(delete_message(d)), 0));
            whats.push((false, format!("remove route {}/{}", d.0, d.1)));
        }
        for ((put, what), reply) in whats.into_iter().zip(nl.batch(&msgs)) {
            match reply.take() {
                Ok(()) if put => out.put += 1,
                Ok(()) => out.removed += 1,
                // Gone already.
                Err(e) if !put && e.raw_os_error() == Some(libc::ESRCH) => out.removed += 1,
                Err(error) => out.failures.push(Failure { what, error }),
            }
        }
        // What the workers may reach: the destinations of the routes that now exist.
        let now = current_routes(&mut nl)?;
        let dests = destinations(&now);
        let rules = current_rules(&mut nl, &self.subnet)?;
        let wanted: BTreeSet<Dest> = if self.egress {
            BTreeSet::new()
        } else {
            dests.iter().copied().collect()
        };
        let mut msgs = Vec::new();
        let mut whats = Vec::new();
        for d in wanted.difference(&rules) {
            msgs.push((
                RouteNetlinkMessage::NewRule(rule_message(&self.subnet, d)),
                NLM_F_CREATE,
            ));
            whats.push((
                true,
                format!("rule from {} to {}/{}", self.subnet, d.0, d.1),
            ));
        }
        for d in rules.difference(&wanted) {
            msgs.push((
                RouteNetlinkMessage::DelRule(rule_message(&self.subnet, d)),
                0,
            ));
            whats.push((
                false,
                format!("remove rule from {} to {}/{}", self.subnet, d.0, d.1),
            ));
        }
        for ((add, what), reply) in whats.into_iter().zip(nl.batch(&msgs)) {
            match reply.take() {
                Ok(()) if add => out.rules_added += 1,
                Ok(()) => out.rules_removed += 1,
                Err(error) => out.failures.push(Failure { what, error }),
            }
        }
        if self.egress {
            if let Err(error) = crate::netns::setup_egress(&self.bridge, &self.subnet, &dests) {
                out.failures.push(Failure {
                    what: "masquerade exceptions (nft)".into(),
                    error,
                });
            }
        }
        Ok(out)
    }

    /// The routes of [`ROUTE_PROTOCOL`] in this network namespace. Blocking.
    pub fn routes(&self) -> io::Result<BTreeMap<Dest, Ipv4Addr>> {
        current_routes(&mut Rtnl::open()?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(s: &str) -> Dest {
        let (a, p) = s.split_once('/').unwrap();
        (a.parse().unwrap(), p.parse().unwrap())
    }

    fn r(s: &str, via: &str) -> PeerRoute {
        PeerRoute {
            subnet: d(s),
            via: via.parse().unwrap(),
        }
    }

    #[test]
    fn plan_adds_changes_and_removes() {
        let current: BTreeMap<Dest, Ipv4Addr> = [
            (d("10.1.0.0/16"), "192.0.2.1".parse().unwrap()),
            (d("10.2.0.0/16"), "192.0.2.2".parse().unwrap()),
            (d("10.3.0.0/16"), "192.0.2.3".parse().unwrap()),
        ]
        .into();
        let desired = [
            // Kept.
            r("10.1.0.0/16", "192.0.2.1"),
            // Moved.
            r("10.2.0.0/16", "192.0.2.20"),
            // Joined.
            r("10.4.0.0/16", "192.0.2.4"),
            // Listed twice: the first wins.
            r("10.4.0.0/16", "192.0.2.44"),
        ];
        let p = plan(&current, &desired);
        assert_eq!(
            p.put,
            [
                r("10.2.0.0/16", "192.0.2.20"),
                r("10.4.0.0/16", "192.0.2.4")
            ]
        );
        assert_eq!(p.remove, [d("10.3.0.0/16")]);
        // Applied, nothing is left to do: idempotent.
        let after: BTreeMap<Dest, Ipv4Addr> =
            desired[..3].iter().map(|r| (r.subnet, r.via)).collect();
        assert!(plan(&after, &desired).is_empty());
        // An empty list removes everything.
        let p = plan(&after, &[]);
        assert!(p.put.is_empty());
        assert_eq!(p.remove.len(), 3);
    }

    #[test]
    fn destinations_are_subnets_and_addresses() {
        let routes: BTreeMap<Dest, Ipv4Addr> = [
            (d("10.1.0.0/16"), "192.0.2.1".parse().unwrap()),
            (d("10.2.0.0/16"), "192.0.2.1".parse().unwrap()),
        ]
        .into();
        assert_eq!(
            destinations(&routes),
            [d("10.1.0.0/16"), d("10.2.0.0/16"), d("192.0.2.1/32")]
        );
    }

    /// In a network namespace of its own (a thread's): routes and rules made, changed and
    /// removed on a real kernel, each apply idempotent.
    #[test]
    fn apply_makes_the_kernel_match_the_list() {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            crate::cannot_run("needs root (a network namespace)");
            return;
        }
        std::thread::spawn(|| {
            // SAFETY: unshare affects only this thread, which never returns to a pool.
            assert_eq!(unsafe { libc::unshare(libc::CLONE_NEWNET) }, 0);
            let sh = |cmd: &str| {
                let st = std::process::Command::new("sh").args(["-c", cmd]).status().unwrap();
                assert!(st.success(), "{cmd}");
            };
            sh("ip link add lan0 type veth peer name lan1 && ip addr add 192.0.2.1/24 dev lan0 && ip link set lan0 up && ip link set lan1 up");
            let net = ClusterNet {
                bridge: "btest".into(),
                subnet: Subnet::parse("10.40.0.0/16").unwrap(),
                egress: false,
            };
            let t = std::time::Instant::now();
            let a = net
                .apply(&[r("10.50.0.0/16", "192.0.2.2"), r("10.60.0.0/16", "192.0.2.3")])
                .unwrap();
            assert!(a.failures.is_empty(), "{a:?}");
            assert_eq!((a.put, a.rules_added), (2, 4), "{a:?}");
            assert!(t.elapsed() < std::time::Duration::from_secs(2), "{:?}", t.elapsed());
            let routes = net.routes().unwrap();
            assert_eq!(routes.len(), 2);
            assert_eq!(routes[&d("10.50.0.0/16")], "192.0.2.2".parse::<Ipv4Addr>().unwrap());
            // Again: nothing to do.
            let a = net
                .apply(&[r("10.50.0.0/16", "192.0.2.2"), r("10.60.0.0/16", "192.0.2.3")])
                .unwrap();
            assert_eq!((a.put, a.removed, a.rules_added, a.rules_removed), (0, 0, 0, 0));
            // One moves, one leaves; a next hop off the segment fails alone.
            let a = net
                .apply(&[r("10.50.0.0/16", "192.0.2.9"), r("10.70.0.0/16", "198.51.100.1")])
                .unwrap();
            assert_eq!((a.put, a.removed), (1, 1), "{a:?}");
            assert_eq!(a.failures.len(), 1, "{a:?}");
            let routes = net.routes().unwrap();
            assert_eq!(routes.len(), 1);
            assert_eq!(routes[&d("10.50.0.0/16")], "192.0.2.9".parse::<Ipv4Addr>().unwrap());
            let mut nl = Rtnl::open().unwrap();
            let rules = current_rules(&mut nl, &net.subnet).unwrap();
            assert_eq!(
                rules.into_iter().collect::<Vec<_>>(),
                [d("10.50.0.0/16"), d("192.0.2.9/32")]
            );
            // Empty: all gone.
            net.apply(&[]).unwrap();
            assert!(net.routes().unwrap().is_empty());
            assert!(current_rules(&mut nl, &net.subnet).unwrap().is_empty());
        })
        .join()
        .unwrap();
    }

    #[test]
    fn rules_carry_the_protocol_and_both_prefixes() {
        let s = Subnet::parse("10.9.0.0/20").unwrap();
        let m = rule_message(&s, &d("10.10.0.0/16"));
        assert_eq!((m.header.src_len, m.header.dst_len), (20, 16));
        assert_eq!(m.header.action, RuleAction::ToTable);
        assert!(m
            .attributes
            .contains(&RuleAttribute::Protocol(RouteProtocol::Other(190))));
    }
}
