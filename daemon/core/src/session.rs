//! Sessions: a lease that a client keeps alive; when it lapses or is closed, the session ends and
//! every worker launched into it is stopped. An ended session is still known (its workers can be
//! listed, awaited and stopped by `session_id`) until it is forgotten with them.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Lease length when the client asks for none.
pub const DEFAULT_TTL: Duration = Duration::from_secs(30);
/// Longest lease a client may ask for.
pub const MAX_TTL: Duration = Duration::from_secs(24 * 3600);
/// Lease of a session reinstated at start-up for live workers whose session record was lost (a
/// store moved aside by `berthd --recover`): long enough for a client that renews at any usual
/// pace to find its session again, short enough that the workers of a client that is gone end.
pub const REINSTATED_TTL: Duration = Duration::from_secs(600);

/// A reading of the kernel's `CLOCK_BOOTTIME`: time since the boot `boot_id` (the kernel's
/// random boot id), suspend included. Unlike the wall clock it never steps; it means nothing
/// on another boot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BootTime {
    pub boot_id: String,
    pub since_boot: Duration,
}

/// Now, on the clocks a lease is measured on: the wall clock, and the boot clock where the host
/// has one (`None`: leases fall back to the wall clock).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseNow {
    pub wall: SystemTime,
    pub boot: Option<BootTime>,
}

impl From<SystemTime> for LeaseNow {
    fn from(wall: SystemTime) -> Self {
        Self { wall, boot: None }
    }
}

impl From<&LeaseNow> for LeaseNow {
    fn from(now: &LeaseNow) -> Self {
        now.clone()
    }
}

/// A session and its lease. The lease is measured on the boot clock ([`BootTime`]), so that a
/// step of the wall clock changes nothing and the lease keeps counting across a restart of the
/// daemon (down longer than the lease: it ends at start-up); after a reboot, when the boot clock
/// of the record means nothing, on the wall clock (`expires_at`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Session {
    pub id: String,
    pub ttl: Duration,
    pub created_at: SystemTime,
    /// The lease's end by the wall clock, as clients are told it.
    pub expires_at: SystemTime,
    /// The lease's end on `CLOCK_BOOTTIME` of the boot it names: what decides on that boot.
    /// `None` in records of older daemons and where the host has no boot clock.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deadline: Option<BootTime>,
    pub labels: BTreeMap<String, String>,
    /// The user name of the caller that opened it: who may keep it alive, close it and launch
    /// into it.
    #[serde(default)]
    pub owner: String,
    /// When the session ended (closed or lapsed); `None` while it is open.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ended_at: Option<SystemTime>,
}

impl Session {
    /// A new session whose lease starts at `now`. `ttl_seconds` 0 means [`DEFAULT_TTL`].
    pub fn open(
        id: String,
        ttl_seconds: u32,
        labels: BTreeMap<String, String>,
        now: impl Into<LeaseNow>,
    ) -> Result<Self> {
        let now = now.into();
        let ttl = if ttl_seconds == 0 {
            DEFAULT_TTL
        } else {
            Duration::from_secs(u64::from(ttl_seconds))
        };
        if ttl > MAX_TTL {
            return Err(Error::invalid(
                "ttl_seconds",
                format!("must be at most {} s, got {ttl_seconds}", MAX_TTL.as_secs()),
            ));
        }
        Ok(Self {
            id,
            ttl,
            created_at: now.wall,
            expires_at: now.wall + ttl,
            deadline: deadline_after(&now, ttl),
            labels,
            owner: String::new(),
            ended_at: None,
        })
    }

    /// Session `id` of `owner` again, open from `now` with a lease of [`REINSTATED_TTL`]: its
    /// record was lost, its workers live on. Its labels and its own TTL went with the record.
    pub fn reinstated(id: String, owner: String, now: impl Into<LeaseNow>) -> Self {
        let now = now.into();
        Self {
            id,
            ttl: REINSTATED_TTL,
            created_at: now.wall,
            expires_at: now.wall + REINSTATED_TTL,
            deadline: deadline_after(&now, REINSTATED_TTL),
            labels: BTreeMap::new(),
            owner,
            ended_at: None,
        }
    }

    /// How long the lease has left at `now`: on the boot clock where the deadline is of the
    /// boot `now` reads, else on the wall clock.
    pub fn remaining(&self, now: impl Into<LeaseNow>) -> Duration {
        let now = now.into();
        match (&self.deadline, &now.boot) {
            (Some(d), Some(b)) if d.boot_id == b.boot_id => {
                d.since_boot.saturating_sub(b.since_boot)
            }
            _ => self.expires_at.duration_since(now.wall).unwrap_or_default(),
        }
    }

    /// Whether the lease has lapsed at `now`.
    pub fn expired(&self, now: impl Into<LeaseNow>) -> bool {
        self.remaining(now).is_zero()
    }

    /// Whether the session is open at `now`: not ended, and its lease has not lapsed. Only an
    /// open session takes workers and renewals.
    pub fn is_open(&self, now: impl Into<LeaseNow>) -> bool {
        self.ended_at.is_none() && !self.expired(now)
    }

    /// Ends the session at `now`; returns false if it had ended already.
    pub fn end(&mut self, now: SystemTime) -> bool {
        if self.ended_at.is_some() {
            return false;
        }
        self.ended_at = Some(now);
        true
    }

    /// Whether an ended session may be forgotten at `now`, once `retain` has passed since it
    /// ended (the caller checks that none of its workers is still kept).
    pub fn forgettable(&self, now: SystemTime, retain: Duration) -> bool {
        self.ended_at
            .is_some_and(|e| now.duration_since(e).unwrap_or_default() >= retain)
    }

    /// Renews the lease from `now`.
    pub fn renew(&mut self, now: impl Into<LeaseNow>) {
        let now = now.into();
        self.expires_at = now.wall + self.ttl;
        self.deadline = deadline_after(&now, self.ttl);
    }

    /// Takes the lease of `other` (the same session, renewed elsewhere) where it ends later.
    pub fn keep_later_lease(&mut self, other: &Session) {
        let later = match (&self.deadline, &other.deadline) {
            (Some(a), Some(b)) if a.boot_id == b.boot_id => b.since_boot > a.since_boot,
            _ => other.expires_at > self.expires_at,
        };
        if later {
            self.expires_at = other.expires_at;
            self.deadline = other.deadline.clone();
        }
    }
}

/// The boot-clock deadline `ttl` after `now`, where `now` has a boot clock.
fn deadline_after(now: &LeaseNow, ttl: Duration) -> Option<BootTime> {
    now.boot.as_ref().map(|b| BootTime {
        boot_id: b.boot_id.clone(),
        since_boot: b.since_boot + ttl,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lease_lapses_and_renews() {
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1000);
        let mut s = Session::open("s".into(), 5, BTreeMap::new(), t0).unwrap();
        assert!(!s.expired(t0 + Duration::from_secs(4)));
        assert!(s.expired(t0 + Duration::from_secs(5)));
        s.renew(t0 + Duration::from_secs(4));
        assert!(!s.expired(t0 + Duration::from_secs(8)));
        assert_eq!(
            Session::open("d".into(), 0, BTreeMap::new(), t0)
                .unwrap()
                .ttl,
            DEFAULT_TTL
        );
        assert!(matches!(
            Session::open("x".into(), u32::MAX, BTreeMap::new(), t0),
            Err(Error::InvalidArgument { field, .. }) if field == "ttl_seconds"
        ));
    }

    #[test]
    fn ending_is_once_and_closes_the_session() {
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1000);
        let secs = |s| t0 + Duration::from_secs(s);
        let mut s = Session::open("s".into(), 10, BTreeMap::new(), t0).unwrap();
        assert!(s.is_open(secs(1)));
        assert!(!s.is_open(secs(10)), "a lapsed lease is not open");
        assert!(
            !s.forgettable(secs(100), Duration::ZERO),
            "open sessions stay"
        );
        assert!(s.end(secs(2)));
        assert!(!s.end(secs(3)), "ends once");
        assert_eq!(s.ended_at, Some(secs(2)));
        assert!(!s.is_open(secs(2)));
        assert!(!s.forgettable(secs(5), Duration::from_secs(5)));
        assert!(s.forgettable(secs(7), Duration::from_secs(5)));
    }

    fn at(wall_s: u64, boot: &str, boot_s: u64) -> LeaseNow {
        LeaseNow {
            wall: SystemTime::UNIX_EPOCH + Duration::from_secs(wall_s),
            boot: Some(BootTime {
                boot_id: boot.into(),
                since_boot: Duration::from_secs(boot_s),
            }),
        }
    }

    #[test]
    fn a_lease_is_measured_on_the_boot_clock_of_its_boot() {
        const DAY: u64 = 24 * 3600;
        // Opened at wall 1000 s, 50 s after boot "a", for 30 s.
        let mut s = Session::open("s".into(), 30, BTreeMap::new(), at(1000, "a", 50)).unwrap();
        // (now, expired, remaining s): steps of the wall clock change nothing on boot "a".
        let cases: &[(LeaseNow, bool, u64)] = &[
            (at(1010, "a", 60), false, 20),
            (at(1010 + DAY, "a", 60), false, 20),
            (at(1010 - 900, "a", 60), false, 20),
            (at(1000 + DAY, "a", 80), true, 0),
            (at(1000, "a", 80), true, 0),
            (at(1000, "a", 90), true, 0),
            // Another boot (a reboot): the wall clock decides.
            (at(1010, "b", 5), false, 20),
            (at(1030, "b", 5), true, 0),
            (at(1100, "b", 5), true, 0),
            // A daemon without a boot clock: the wall clock too.
            (
                LeaseNow::from(SystemTime::UNIX_EPOCH + Duration::from_secs(1029)),
                false,
                1,
            ),
        ];
        for (now, expired, left) in cases {
            assert_eq!(s.expired(now), *expired, "{now:?}");
            assert_eq!(s.remaining(now), Duration::from_secs(*left), "{now:?}");
        }
        // A renewal a day later by the wall clock, 10 s later by the boot clock.
        s.renew(at(1000 + DAY, "a", 60));
        assert_eq!(s.remaining(at(0, "a", 70)), Duration::from_secs(20));
        assert_eq!(
            s.expires_at,
            SystemTime::UNIX_EPOCH + Duration::from_secs(1030 + DAY)
        );
        // The later of two leases of one boot is the boot clock's, whatever the wall said.
        let mut older = Session::open("s".into(), 30, BTreeMap::new(), at(5000, "a", 55)).unwrap();
        older.keep_later_lease(&s);
        assert_eq!(older.deadline, s.deadline);
        let mut newer = s.clone();
        newer.renew(at(0, "a", 65));
        s.keep_later_lease(&newer);
        assert_eq!(s.deadline, newer.deadline);
    }

    #[test]
    fn records_without_an_end_read_as_open() {
        // What an earlier daemon stored: no `ended_at` field.
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1000);
        let s = Session::open("s".into(), 10, BTreeMap::new(), t0).unwrap();
        let mut v = serde_json::to_value(&s).unwrap();
        assert!(v.get("ended_at").is_none());
        v.as_object_mut().unwrap().remove("ended_at");
        let back: Session = serde_json::from_value(v).unwrap();
        assert_eq!(back, s);
        let mut ended = s.clone();
        ended.end(t0);
        let back: Session = serde_json::from_slice(&serde_json::to_vec(&ended).unwrap()).unwrap();
        assert_eq!(back.ended_at, Some(t0));
    }
}
