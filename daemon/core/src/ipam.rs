//! Worker address management: the host's worker subnet, its gateway (the first host address,
//! held by the host), and which live worker leases which of the other addresses. A launch gets
//! an address for every bridge-mode worker or none at all; an address is never leased to two
//! live workers, and is reused after its worker has ended. Addresses are handed out next-fit
//! (after the last one given), so a just-freed address is reused as late as possible: the
//! kernel tears a worker's namespace down asynchronously, and a late reuse keeps its old route
//! and veth out of the new worker's way.

use std::collections::HashMap;
use std::fmt;
use std::net::Ipv4Addr;

use crate::error::{Error, Result};

/// Failure to parse a subnet.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SubnetError {
    #[error("subnet {0:?}: not of the form A.B.C.D/N")]
    Syntax(String),
    #[error("subnet {0:?}: prefix length must be between 8 and 30")]
    Prefix(String),
    #[error("subnet {text:?}: host bits are set (did you mean {network}?)")]
    HostBits { text: String, network: String },
}

/// An IPv4 subnet for workers, e.g. `10.213.0.0/16`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Subnet {
    network: Ipv4Addr,
    prefix: u8,
}

impl Subnet {
    /// Parses `A.B.C.D/N`, with `8 <= N <= 30` and no host bits set.
    pub fn parse(text: &str) -> std::result::Result<Self, SubnetError> {
        let (addr, len) = text
            .trim()
            .split_once('/')
            .ok_or_else(|| SubnetError::Syntax(text.to_owned()))?;
        let addr: Ipv4Addr = addr
            .parse()
            .map_err(|_| SubnetError::Syntax(text.to_owned()))?;
        let prefix: u8 = len
            .parse()
            .map_err(|_| SubnetError::Syntax(text.to_owned()))?;
        if !(8..=30).contains(&prefix) {
            return Err(SubnetError::Prefix(text.to_owned()));
        }
        let mask = u32::MAX << (32 - prefix);
        let network = Ipv4Addr::from(u32::from(addr) & mask);
        if network != addr {
            return Err(SubnetError::HostBits {
                text: text.to_owned(),
                network: format!("{network}/{prefix}"),
            });
        }
        Ok(Self { network, prefix })
    }

    pub fn network(&self) -> Ipv4Addr {
        self.network
    }

    pub fn prefix(&self) -> u8 {
        self.prefix
    }

    fn size(&self) -> u32 {
        1u32 << (32 - self.prefix)
    }

    /// The host's address on the subnet: the first host address.
    pub fn gateway(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.network) + 1)
    }

    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        let mask = u32::MAX << (32 - self.prefix);
        u32::from(ip) & mask == u32::from(self.network)
    }

    /// Addresses workers can get: every host address but the gateway.
    pub fn worker_addresses(&self) -> u32 {
        self.size() - 3
    }

    /// Offset of `ip` from the network address, if it may be a worker's.
    fn worker_offset(&self, ip: Ipv4Addr) -> Option<u32> {
        if !self.contains(ip) {
            return None;
        }
        let off = u32::from(ip) - u32::from(self.network);
        (off >= 2 && off < self.size() - 1).then_some(off)
    }
}

impl fmt::Display for Subnet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix)
    }
}

/// Why a lease could not be restored as it was.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RestoreConflict {
    /// The address is not a worker address of this subnet (the subnet changed).
    OutsideSubnet,
    /// Another worker holds it already.
    HeldBy(String),
}

/// The leases of one subnet.
#[derive(Debug, Clone)]
pub struct Ipam {
    subnet: Option<Subnet>,
    by_worker: HashMap<String, Ipv4Addr>,
    /// Holder of each leased address, by offset in the subnet.
    by_offset: HashMap<u32, String>,
    /// Offset after which the next search starts.
    cursor: u32,
}

impl Ipam {
    /// Leases of `subnet`; `None` means this host hands out no addresses.
    pub fn new(subnet: Option<Subnet>) -> Self {
        Self {
            subnet,
            by_worker: HashMap::new(),
            by_offset: HashMap::new(),
            cursor: 1,
        }
    }

    pub fn subnet(&self) -> Option<Subnet> {
        self.subnet
    }

    /// Addresses leased now.
    pub fn leased(&self) -> usize {
        self.by_worker.len()
    }

    /// Addresses free now.
    pub fn free(&self) -> u32 {
        self.subnet
            .map(|s| s.worker_addresses() - self.by_worker.len() as u32)
            .unwrap_or(0)
    }

    /// The address leased to `worker`.
    pub fn lease(&self, worker: &str) -> Option<Ipv4Addr> {
        self.by_worker.get(worker).copied()
    }

    /// Checks that `n` addresses are free, changing nothing; the error says what is short.
    pub fn check(&self, n: u32) -> Result<()> {
        if n == 0 {
            return Ok(());
        }
        let Some(subnet) = self.subnet else {
            return Err(Error::ResourceExhausted(format!(
                "ips: {n} requested, but this host has no worker subnet"
            )));
        };
        let free = self.free();
        if n > free {
            return Err(Error::ResourceExhausted(format!(
                "ips: {n} requested, {free} of {} addresses of {subnet} free",
                subnet.worker_addresses()
            )));
        }
        Ok(())
    }

    /// Leases one address to each of `workers`, or none at all.
    pub fn allocate(&mut self, workers: &[String]) -> Result<Vec<Ipv4Addr>> {
        self.check(workers.len() as u32)?;
        let Some(subnet) = self.subnet else {
            return Ok(Vec::new());
        };
        let size = subnet.size();
        let mut out = Vec::with_capacity(workers.len());
        for w in workers {
            if let Some(ip) = self.by_worker.get(w) {
                out.push(*ip);
                continue;
            }
            // check() guarantees a free offset exists, so this finds one within a lap.
            let mut off = self.cursor;
            loop {
                off += 1;
                if off >= size - 1 {
                    off = 2;
                }
                if !self.by_offset.contains_key(&off) {
                    break;
                }
            }
            self.cursor = off;
            let ip = Ipv4Addr::from(u32::from(subnet.network()) + off);
            self.by_offset.insert(off, w.clone());
            self.by_worker.insert(w.clone(), ip);
            out.push(ip);
        }
        Ok(out)
    }

    /// Takes over a lease that exists on the host already (a worker re-adopted after a daemon
    /// restart). The address stays with its first holder on conflict.
    pub fn restore(
        &mut self,
        worker: &str,
        ip: Ipv4Addr,
    ) -> std::result::Result<(), RestoreConflict> {
        let off = self
            .subnet
            .and_then(|s| s.worker_offset(ip))
            .ok_or(RestoreConflict::OutsideSubnet)?;
        match self.by_offset.get(&off) {
            Some(holder) if holder == worker => Ok(()),
            Some(holder) => Err(RestoreConflict::HeldBy(holder.clone())),
            None => {
                if let Some(old) = self.by_worker.insert(worker.to_owned(), ip) {
                    if let Some(o) = self.subnet.and_then(|s| s.worker_offset(old)) {
                        self.by_offset.remove(&o);
                    }
                }
                self.by_offset.insert(off, worker.to_owned());
                // Hand out what follows the restored leases first.
                self.cursor = self.cursor.max(off);
                Ok(())
            }
        }
    }

    /// Frees the lease of `worker`; idempotent.
    pub fn release(&mut self, worker: &str) -> Option<Ipv4Addr> {
        let ip = self.by_worker.remove(worker)?;
        if let Some(off) = self.subnet.and_then(|s| s.worker_offset(ip)) {
            self.by_offset.remove(&off);
        }
        Some(ip)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(n: usize, p: &str) -> Vec<String> {
        (0..n).map(|i| format!("{p}{i}")).collect()
    }

    fn ipam(s: &str) -> Ipam {
        Ipam::new(Some(Subnet::parse(s).unwrap()))
    }

    #[test]
    fn subnets_parse_and_refuse() {
        let s = Subnet::parse("10.213.0.0/16").unwrap();
        assert_eq!(s.gateway(), Ipv4Addr::new(10, 213, 0, 1));
        assert_eq!(s.worker_addresses(), 65533);
        assert_eq!(s.to_string(), "10.213.0.0/16");
        assert!(s.contains(Ipv4Addr::new(10, 213, 255, 254)));
        assert!(!s.contains(Ipv4Addr::new(10, 214, 0, 1)));
        #[allow(clippy::type_complexity)]
        let table: [(&str, fn(&SubnetError) -> bool); 6] = [
            ("10.213.0.0", |e| matches!(e, SubnetError::Syntax(_))),
            ("10.213.0/16", |e| matches!(e, SubnetError::Syntax(_))),
            ("10.213.0.0/x", |e| matches!(e, SubnetError::Syntax(_))),
            ("10.213.0.0/31", |e| matches!(e, SubnetError::Prefix(_))),
            ("10.0.0.0/7", |e| matches!(e, SubnetError::Prefix(_))),
            ("10.213.0.1/16", |e| {
                matches!(e, SubnetError::HostBits { .. })
            }),
        ];
        for (text, want) in table {
            let e = Subnet::parse(text).unwrap_err();
            assert!(want(&e), "{text}: {e}");
        }
        assert!(Subnet::parse("10.213.0.1/16")
            .unwrap_err()
            .to_string()
            .contains("10.213.0.0/16"));
    }

    #[test]
    fn never_the_gateway_network_or_broadcast() {
        let mut a = ipam("192.168.7.0/29");
        // .0 network, .1 gateway, .7 broadcast: .2 to .6 remain.
        let got = a.allocate(&ids(5, "w")).unwrap();
        let last: Vec<u8> = got.iter().map(|ip| ip.octets()[3]).collect();
        assert_eq!(last, [2, 3, 4, 5, 6]);
        assert_eq!(a.free(), 0);
    }

    #[test]
    fn all_or_nothing_and_exhaustion_names_ips() {
        let mut a = ipam("10.0.0.0/29");
        a.allocate(&ids(3, "a")).unwrap();
        let e = a.allocate(&ids(3, "b")).unwrap_err();
        match e {
            Error::ResourceExhausted(m) => {
                assert!(m.starts_with("ips: 3 requested, 2 of 5"), "{m}")
            }
            other => panic!("{other:?}"),
        }
        // Nothing of the refused launch was leased.
        assert_eq!(a.leased(), 3);
        assert!(a.lease("b0").is_none());
        assert!(a.check(2).is_ok() && a.check(0).is_ok());
    }

    #[test]
    fn no_subnet_means_no_addresses() {
        let mut a = Ipam::new(None);
        assert!(a.check(0).is_ok());
        let e = a.allocate(&ids(1, "w")).unwrap_err();
        assert!(e.to_string().starts_with("ips: "), "{e}");
    }

    #[test]
    fn unique_while_live_reused_after_release_late() {
        let mut a = ipam("10.1.0.0/28"); // 13 worker addresses
        let first = a.allocate(&ids(13, "w")).unwrap();
        let set: std::collections::HashSet<_> = first.iter().collect();
        assert_eq!(set.len(), 13);
        assert_eq!(a.release("w4"), Some(first[4]));
        assert_eq!(a.release("w4"), None);
        // The only free address is reused.
        assert_eq!(a.allocate(&["x".to_string()]).unwrap(), vec![first[4]]);
        // Next-fit: after freeing two, the one after the cursor comes first.
        a.release("w1");
        a.release("w9");
        let next = a.allocate(&["y".to_string()]).unwrap()[0];
        assert_eq!(next, first[9]);
        // Allocating for a worker that holds a lease returns that lease.
        assert_eq!(a.allocate(&["y".to_string()]).unwrap()[0], next);
    }

    #[test]
    fn churn_never_double_leases() {
        let mut a = ipam("10.2.0.0/26");
        let mut live: Vec<String> = Vec::new();
        let mut n = 0;
        for round in 0..500 {
            if round % 3 == 2 && !live.is_empty() {
                let w = live.remove(round % live.len());
                a.release(&w);
            } else if a.free() > 0 {
                let w = format!("w{n}");
                n += 1;
                a.allocate(std::slice::from_ref(&w)).unwrap();
                live.push(w);
            }
            let ips: std::collections::HashSet<_> =
                live.iter().map(|w| a.lease(w).unwrap()).collect();
            assert_eq!(ips.len(), live.len(), "round {round}");
            assert_eq!(a.leased(), live.len());
        }
    }

    #[test]
    fn restore_takes_over_and_reports_conflicts() {
        let mut a = ipam("10.3.0.0/24");
        let ip = Ipv4Addr::new(10, 3, 0, 77);
        a.restore("w1", ip).unwrap();
        assert_eq!(a.restore("w1", ip), Ok(()));
        assert_eq!(
            a.restore("w2", ip),
            Err(RestoreConflict::HeldBy("w1".into()))
        );
        for bad in [
            Ipv4Addr::new(10, 4, 0, 5),
            Ipv4Addr::new(10, 3, 0, 1),
            Ipv4Addr::new(10, 3, 0, 255),
        ] {
            assert_eq!(a.restore("w3", bad), Err(RestoreConflict::OutsideSubnet));
        }
        // New leases never collide with restored ones and start after them.
        let got = a.allocate(&ids(2, "n")).unwrap();
        assert_eq!(
            got,
            [Ipv4Addr::new(10, 3, 0, 78), Ipv4Addr::new(10, 3, 0, 79)]
        );
    }
}
