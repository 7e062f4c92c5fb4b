//! The clocks leases are measured on: the wall clock, and the kernel's `CLOCK_BOOTTIME` with the
//! boot id that says which boot a reading belongs to. Behind [`Clock`], so that tests can step
//! the wall clock of a supervisor without touching the machine's.

use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use berth_core::session::{BootTime, LeaseNow};

/// Where the kernel tells its random boot id, new at every boot.
pub const BOOT_ID_PATH: &str = "/proc/sys/kernel/random/boot_id";

/// Now, on the clocks a lease is measured on.
pub trait Clock: Send + Sync + std::fmt::Debug {
    fn now(&self) -> LeaseNow;
}

/// The host's clocks.
#[derive(Debug, Clone)]
pub struct SystemClock {
    /// `None` where the kernel does not tell (leases then fall back to the wall clock).
    boot_id: Option<String>,
}

impl SystemClock {
    /// The host's clocks, with the boot id read once from [`BOOT_ID_PATH`].
    pub fn new() -> Self {
        Self::with_boot_id_file(Path::new(BOOT_ID_PATH))
    }

    /// The host's clocks, with the boot id read from `path`.
    pub fn with_boot_id_file(path: &Path) -> Self {
        let boot_id = std::fs::read_to_string(path)
            .ok()
            .and_then(|t| parse_boot_id(&t));
        if boot_id.is_none() {
            tracing::warn!(path = %path.display(), "no boot id: session leases use the wall clock");
        }
        Self { boot_id }
    }
}

impl Default for SystemClock {
    fn default() -> Self {
        Self::new()
    }
}

impl Clock for SystemClock {
    fn now(&self) -> LeaseNow {
        LeaseNow {
            wall: SystemTime::now(),
            boot: self.boot_id.as_ref().and_then(|id| {
                boottime().map(|since_boot| BootTime {
                    boot_id: id.clone(),
                    since_boot,
                })
            }),
        }
    }
}

/// `CLOCK_BOOTTIME` now.
pub fn boottime() -> Option<Duration> {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: ts is a valid, writable timespec.
    if unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) } != 0 {
        return None;
    }
    Some(Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32))
}

/// The boot id in the kernel's text (a UUID and a newline), lower case; `None` unless it is one.
pub fn parse_boot_id(text: &str) -> Option<String> {
    let id = text.trim();
    let groups: Vec<&str> = id.split('-').collect();
    let shape = [8, 4, 4, 4, 12];
    let ok = groups.len() == shape.len()
        && groups
            .iter()
            .zip(shape)
            .all(|(g, n)| g.len() == n && g.bytes().all(|b| b.is_ascii_hexdigit()));
    ok.then(|| id.to_ascii_lowercase())
}

/// A clock for tests: the wall clock and the boot clock move only when told, and the wall clock
/// can be stepped alone (as an NTP step or an operator's `date -s` would).
#[derive(Debug)]
pub struct FakeClock {
    now: Mutex<LeaseNow>,
}

impl FakeClock {
    /// A clock at the host's wall time, `since_boot` into boot `boot_id`.
    pub fn new(boot_id: &str, since_boot: Duration) -> Self {
        Self {
            now: Mutex::new(LeaseNow {
                wall: SystemTime::now(),
                boot: Some(BootTime {
                    boot_id: boot_id.to_owned(),
                    since_boot,
                }),
            }),
        }
    }

    fn with<T>(&self, f: impl FnOnce(&mut LeaseNow) -> T) -> T {
        f(&mut self.now.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// Time passes: both clocks move on by `d`.
    pub fn advance(&self, d: Duration) {
        self.with(|n| {
            n.wall += d;
            if let Some(b) = &mut n.boot {
                b.since_boot += d;
            }
        })
    }

    /// The wall clock alone jumps by `d` forward (`back` false) or back.
    pub fn step_wall(&self, d: Duration, back: bool) {
        self.with(|n| {
            n.wall = if back { n.wall - d } else { n.wall + d };
        })
    }

    /// A reboot: a new boot id and a boot clock from `since_boot`; the wall clock goes on.
    pub fn reboot(&self, boot_id: &str, since_boot: Duration) {
        self.with(|n| {
            n.boot = Some(BootTime {
                boot_id: boot_id.to_owned(),
                since_boot,
            })
        })
    }
}

impl Clock for FakeClock {
    fn now(&self) -> LeaseNow {
        self.with(|n| n.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boot_ids_parse() {
        let cases: &[(&str, Option<&str>)] = &[
            (
                "5b2e1f3c-8a4d-4c9e-9f1a-0123456789ab\n",
                Some("5b2e1f3c-8a4d-4c9e-9f1a-0123456789ab"),
            ),
            (
                "5B2E1F3C-8A4D-4C9E-9F1A-0123456789AB",
                Some("5b2e1f3c-8a4d-4c9e-9f1a-0123456789ab"),
            ),
            ("", None),
            ("5b2e1f3c-8a4d-4c9e-9f1a", None),
            ("5b2e1f3c-8a4d-4c9e-9f1a-0123456789ag", None),
            ("5b2e1f3c8a4d4c9e9f1a0123456789ab", None),
        ];
        for (text, want) in cases {
            assert_eq!(parse_boot_id(text).as_deref(), *want, "{text:?}");
        }
    }

    #[test]
    fn the_system_clock_reads_this_boot() {
        let c = SystemClock::new();
        let a = c.now();
        let b = c.now();
        let (Some(x), Some(y)) = (a.boot, b.boot) else {
            panic!("no boot clock on this host");
        };
        assert_eq!(x.boot_id, y.boot_id);
        assert!(y.since_boot >= x.since_boot);
        assert!(x.since_boot > Duration::ZERO);
        assert!(SystemClock::with_boot_id_file(Path::new("/nonexistent"))
            .now()
            .boot
            .is_none());
    }
}
