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

/// A session and its lease. Times are wall-clock, so a lease keeps counting across a restart of
/// the daemon.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Session {
    pub id: String,
    pub ttl: Duration,
    pub created_at: SystemTime,
    pub expires_at: SystemTime,
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
            owner: String::new(),
            ended_at: None,
        })
    }

    /// Session `id` of `owner` again, open from `now` with a lease of [`REINSTATED_TTL`]: its
    /// record was lost, its workers live on. Its labels and its own TTL went with the record.
    pub fn reinstated(id: String, owner: String, now: SystemTime) -> Self {
        Self {
            id,
            ttl: REINSTATED_TTL,
            created_at: now,
            expires_at: now + REINSTATED_TTL,
            labels: BTreeMap::new(),
            owner,
            ended_at: None,
        }
    }

    /// Whether the lease has lapsed at `now`.
    pub fn expired(&self, now: SystemTime) -> bool {
        now >= self.expires_at
    }

    /// Whether the session is open at `now`: not ended, and its lease has not lapsed. Only an
    /// open session takes workers and renewals.
    pub fn is_open(&self, now: SystemTime) -> bool {
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
