//! Cluster networking on the scheduler's side: each host's worker subnet must be its own (a
//! host whose subnet overlaps another's is refused), and every beat's answer carries the
//! cluster's peers so that each host routes to the others' subnets (berthd's `peers` module).
//!
//! Subnets are the hosts' own (`berthd --subnet`), not assigned from a cluster range: the host's
//! config stays authoritative, the scheduler keeps no state for it, and a restarted scheduler or
//! another replica reaches the same verdicts from the same beats.

use berth_core::error::{Error, Result};
use berth_core::ipam::Subnet;
use berth_proto::v1 as pb;

/// Whether two subnets share an address.
pub fn overlap(a: &Subnet, b: &Subnet) -> bool {
    a.contains(b.network()) || b.contains(a.network())
}

/// Refuses `subnet` of host `name` if it is malformed or overlaps the subnet of another host in
/// `others` (name, subnet; the host's own entry and hosts without a subnet are passed over).
pub fn check_subnet<'a>(
    name: &str,
    subnet: &str,
    others: impl IntoIterator<Item = (&'a str, &'a str)>,
) -> Result<()> {
    if subnet.is_empty() {
        return Ok(());
    }
    let own = Subnet::parse(subnet).map_err(|e| Error::invalid("info.subnet", e.to_string()))?;
    for (other, theirs) in others.into_iter() {
        if other == name || theirs.is_empty() {
            continue;
        }
        let Ok(t) = Subnet::parse(theirs) else {
            continue;
        };
        if overlap(&own, &t) {
            return Err(Error::invalid(
                "info.subnet",
                format!(
                    "{subnet} of host {name} overlaps {theirs} of host {other}: every host of a \
                     cluster needs a worker subnet of its own (set berthd's `subnet`; \
                     `berth hosts remove {other}` if {other} is gone for good)"
                ),
            ));
        }
    }
    Ok(())
}

/// FNV-1a, stable across processes and builds, so that replicas agree on a list's version.
#[derive(Debug)]
struct Fnv(u64);

impl Fnv {
    fn new() -> Self {
        Self(0xcbf2_9ce4_8422_2325)
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 ^= u64::from(*b);
            self.0 = self.0.wrapping_mul(0x0000_0100_0000_01b3);
        }
        // A separator, so that ("ab", "c") and ("a", "bc") differ.
        self.0 ^= 0xff;
        self.0 = self.0.wrapping_mul(0x0000_0100_0000_01b3);
    }
}

/// The version of a peer list given as (name, address, subnet, state) in name order; never 0.
pub fn version<'a>(peers: impl IntoIterator<Item = (&'a str, &'a str, &'a str, i32)>) -> u64 {
    let mut h = Fnv::new();
    for (name, address, subnet, state) in peers {
        h.write(name.as_bytes());
        h.write(address.as_bytes());
        h.write(subnet.as_bytes());
        h.write(&state.to_le_bytes());
    }
    h.0.max(1)
}

/// The peer list of (name, address, subnet, state) in name order.
pub fn list<'a>(
    peers: impl IntoIterator<Item = (&'a str, &'a str, &'a str, i32)> + Clone,
) -> pb::PeerList {
    pb::PeerList {
        version: version(peers.clone()),
        peers: peers
            .into_iter()
            .map(|(name, address, subnet, state)| pb::Peer {
                name: name.to_owned(),
                address: address.to_owned(),
                subnet: subnet.to_owned(),
                state,
            })
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(t: &str) -> Subnet {
        Subnet::parse(t).unwrap()
    }

    #[test]
    fn overlaps_are_containment_either_way() {
        assert!(overlap(&s("10.1.0.0/16"), &s("10.1.2.0/24")));
        assert!(overlap(&s("10.1.2.0/24"), &s("10.1.0.0/16")));
        assert!(overlap(&s("10.1.0.0/16"), &s("10.1.0.0/16")));
        assert!(!overlap(&s("10.1.0.0/16"), &s("10.2.0.0/16")));
        assert!(!overlap(&s("10.224.0.0/19"), &s("10.224.32.0/19")));
        assert!(overlap(&s("10.224.0.0/18"), &s("10.224.32.0/19")));
    }

    #[test]
    fn a_subnet_overlapping_another_host_is_refused_naming_both() {
        let others = [
            ("a", "10.1.0.0/16"),
            ("b", ""),
            ("c", "10.3.0.0/16"),
            ("d", "garbage"),
        ];
        assert!(check_subnet("n", "10.2.0.0/16", others).is_ok());
        assert!(check_subnet("n", "", others).is_ok());
        // Its own entry is no conflict.
        assert!(check_subnet("a", "10.1.0.0/16", others).is_ok());
        let e = check_subnet("n", "10.3.128.0/17", others).unwrap_err();
        let Error::InvalidArgument { field, message } = e else {
            panic!("{e:?}")
        };
        assert_eq!(field, "info.subnet");
        assert!(
            message.contains("host n") && message.contains("host c"),
            "{message}"
        );
        assert!(message.contains("10.3.0.0/16"), "{message}");
        let e = check_subnet("n", "10.3.0.1/16", others).unwrap_err();
        assert!(matches!(e, Error::InvalidArgument { ref field, .. } if field == "info.subnet"));
    }

    #[test]
    fn versions_follow_the_list() {
        let one = [("a", "10.0.0.1:1", "10.1.0.0/16", 1)];
        let v = version(one);
        assert_ne!(v, 0);
        assert_eq!(v, version(one));
        assert_ne!(v, version([("a", "10.0.0.2:1", "10.1.0.0/16", 1)]));
        assert_ne!(v, version([("a", "10.0.0.1:1", "10.1.0.0/16", 3)]));
        assert_ne!(v, version([("a", "10.0.0.1:", "110.1.0.0/16", 1)]));
        assert_ne!(v, version([]));
        let l = list(one);
        assert_eq!(l.version, v);
        assert_eq!(l.peers.len(), 1);
        assert_eq!(l.peers[0].subnet, "10.1.0.0/16");
    }
}
