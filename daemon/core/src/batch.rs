//! Admission of a whole launch: CPU, memory and worker slots ([`Ledger`]), GPUs ([`GpuLedger`])
//! and worker addresses ([`Ipam`]) for every worker of the batch, or nothing for any.

use std::net::Ipv4Addr;

use crate::admission::{Claim, Ledger};
use crate::error::Result;
use crate::gpus::{self, GpuLedger};
use crate::ipam::Ipam;

/// What the host holds for one batch: whatever it keeps it keeps for every worker.
#[derive(Debug)]
pub struct Books<'a> {
    pub ledger: &'a mut Ledger,
    pub gpus: &'a mut GpuLedger,
    pub ips: &'a mut Ipam,
}

/// What each worker of an admitted batch was given, in the order of its ids.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    pub gpu_uuids: Vec<Vec<String>>,
    /// An address each, for workers with their own network; empty otherwise.
    pub ips: Vec<Ipv4Addr>,
}

/// Admits workers `ids`, each with `claim`, `gpus_each` GPUs and (with `own_address`) an
/// address: all of them or none. A refusal says what was short and leaves the books as they were.
pub fn admit(
    books: Books<'_>,
    ids: &[String],
    claim: Claim,
    gpus_each: u32,
    own_address: bool,
) -> Result<Grant> {
    let n = u32::try_from(ids.len()).unwrap_or(u32::MAX);
    // Addresses are checked first: they are the one thing that is not claimed together below.
    books.ips.check(if own_address { n } else { 0 })?;
    let gpu_uuids = gpus::admit(books.ledger, books.gpus, ids, claim, gpus_each)?;
    let ips = if own_address {
        match books.ips.allocate(ids) {
            Ok(ips) => ips,
            Err(e) => {
                // Unreachable after the check above; never keep claims of refused workers.
                release(books, ids);
                return Err(e);
            }
        }
    } else {
        Vec::new()
    };
    Ok(Grant { gpu_uuids, ips })
}

/// Gives back everything `ids` hold.
pub fn release(books: Books<'_>, ids: &[String]) {
    for id in ids {
        books.ledger.release(id);
        books.gpus.release(id);
        books.ips.release(id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::admission::Capacity;
    use crate::error::Error;
    use crate::ipam::Subnet;

    struct Host {
        ledger: Ledger,
        gpus: GpuLedger,
        ips: Ipam,
    }

    impl Host {
        /// 4 CPUs, 8 GiB, 10 slots, 2 GPUs, 5 worker addresses (a /29 less gateway and ends).
        fn new() -> Self {
            let uuids: Vec<String> = vec!["GPU-0".into(), "GPU-1".into()];
            Self {
                ledger: Ledger::new(Capacity {
                    cpu: 4.0,
                    memory_bytes: 8 << 30,
                    workers: 10,
                }),
                gpus: GpuLedger::new(uuids, vec![vec![0, 10], vec![10, 0]]),
                ips: Ipam::new(Some(Subnet::parse("10.1.0.0/29").unwrap())),
            }
        }

        fn books(&mut self) -> Books<'_> {
            Books {
                ledger: &mut self.ledger,
                gpus: &mut self.gpus,
                ips: &mut self.ips,
            }
        }

        fn held(&self) -> (f64, u32, u32, usize) {
            let a = self.ledger.allocated();
            (a.cpu, a.workers, self.gpus.allocated(), self.ips.leased())
        }
    }

    fn ids(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("w{i}")).collect()
    }

    const ONE: Claim = Claim {
        cpu: 1.0,
        memory_bytes: 1 << 30,
    };

    #[test]
    fn a_batch_that_fits_gets_everything_and_gives_it_back() {
        let mut h = Host::new();
        let g = admit(h.books(), &ids(2), ONE, 1, true).unwrap();
        assert_eq!(g.gpu_uuids.len(), 2);
        assert_ne!(g.gpu_uuids[0], g.gpu_uuids[1], "GPUs are exclusive");
        assert_eq!(g.ips.len(), 2);
        assert_eq!(h.held(), (2.0, 2, 2, 2));
        release(h.books(), &ids(2));
        assert_eq!(h.held(), (0.0, 0, 0, 0));
    }

    #[test]
    fn a_refused_batch_holds_nothing_whatever_was_short() {
        let mut h = Host::new();
        // CPU short: 5 of 4.
        assert!(matches!(
            admit(h.books(), &ids(5), ONE, 0, false),
            Err(Error::ResourceExhausted(m)) if m.contains("cpu")
        ));
        // GPUs short: 3 of 2.
        assert!(matches!(
            admit(h.books(), &ids(3), ONE, 1, false),
            Err(Error::ResourceExhausted(_))
        ));
        // Addresses short: 6 of 5, though CPU would fit at 0.5 each.
        let half = Claim {
            cpu: 0.5,
            memory_bytes: 1 << 20,
        };
        assert!(admit(h.books(), &ids(6), half, 0, true).is_err());
        assert_eq!(h.held(), (0.0, 0, 0, 0));
        // The same six without addresses fit.
        admit(h.books(), &ids(6), half, 0, false).unwrap();
        assert_eq!(h.held(), (3.0, 6, 0, 0));
    }
}
