//! Sessions: a lease that a client keeps alive; when it lapses or is closed, the session ends and
//! every worker launched into it is stopped.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Lease length when the client asks for none.
pub const DEFAULT_TTL: Duration = Duration::from_secs(30);
/// Longest lease a client may ask for.
pub const MAX_TTL: Duration = Duration::from_secs(24 * 3600);

/// A session and its lease. Times are wall-clock, so a lease keeps counting across a restart of
/// the daemon.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Session {
    pub id: String,
    pub ttl: Duration,
    pub created_at: SystemTime,
    pub expires_at: SystemTime,
    pub labels: BTreeMap<String, String>,
}

impl Session {
    /// A new session whose lease starts at `now`. `ttl_seconds` 0 means [`DEFAULT_TTL`].
    pub fn open(
        id: String,
        ttl_seconds: u32,
        labels: BTreeMap<String, String>,
        now: SystemTime,
    ) -> Result<Self> {
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
            created_at: now,
            expires_at: now + ttl,
            labels,
        })
    }

    /// Whether the lease has lapsed at `now`.
    pub fn expired(&self, now: SystemTime) -> bool {
        now >= self.expires_at
    }

    /// Renews the lease from `now`.
    pub fn renew(&mut self, now: SystemTime) {
        self.expires_at = now + self.ttl;
    }
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
}
