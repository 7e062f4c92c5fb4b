//! Sessions and their leases: open, renew, close, and the end of those that lapse.

use std::collections::HashSet;
use std::collections::{BTreeMap, HashMap};
use std::sync::MutexGuard;
use std::time::{Duration, SystemTime};

use berth_core::error::{Error, Result};
use berth_core::session::Session;
use berth_core::worker::{Selector, WorkerRecord};
use berth_sys::store::{Op, Table};

use super::events::unavailable;
use super::{Host, Inner};

impl Host {
    /// Opens a session whose lease lasts `ttl_seconds` (0: the default 30 s), under `id` when
    /// given (a scheduler opens one session id on every host it places on). A session of that id
    /// that is still open is renewed instead. The session exists once its record is durable.
    pub async fn open_session(
        &self,
        ttl_seconds: u32,
        labels: BTreeMap<String, String>,
        id: Option<String>,
        owner: &str,
    ) -> Result<Session> {
        if let Some(id) = &id {
            let known = self.inner.sessions().get(id).map(|s| s.owner.clone());
            if let Some(o) = known {
                if o != owner {
                    return Err(Error::PermissionDenied(format!(
                        "session {id} belongs to another user"
                    )));
                }
                return self.keep_alive(id).await;
            }
        }
        let mut s = Session::open(
            id.unwrap_or_else(berth_core::new_id),
            ttl_seconds,
            labels,
            self.inner.opts.clock.now(),
        )?;
        s.owner = owner.to_owned();
        if let Some(store) = &self.inner.store {
            store
                .commit(vec![Op::put(Table::Sessions, &s.id, &s)])
                .await
                .map_err(unavailable)?;
        }
        self.inner.sessions().insert(s.id.clone(), s.clone());
        tracing::info!(session = %s.id, ttl_s = s.ttl.as_secs(), "session opened");
        Ok(s)
    }

    /// Renews a session's lease; NOT_FOUND once it has ended. The lease is longer only once the
    /// renewal is durable: a renewal the store refuses is UNAVAILABLE and changes nothing.
    pub async fn keep_alive(&self, id: &str) -> Result<Session> {
        let slot = self.inner.slot().await;
        let now = self.inner.opts.clock.now();
        let gone = || Error::NotFound(format!("session {id} not found or ended"));
        let (renewed, committed) = {
            let sessions = self.inner.sessions();
            let mut s = sessions
                .get(id)
                .filter(|s| s.is_open(&now))
                .cloned()
                .ok_or_else(gone)?;
            s.renew(now);
            // Queued under the sessions lock: the session's end, if it comes, is queued after.
            let committed = slot.map(|sl| sl.commit(vec![Op::put(Table::Sessions, &s.id, &s)]));
            (s, committed)
        };
        if let Some(c) = committed {
            c.durable().await.map_err(unavailable)?;
        }
        let mut sessions = self.inner.sessions();
        match sessions.get_mut(id) {
            Some(s) if s.ended_at.is_none() => {
                s.keep_later_lease(&renewed);
                Ok(s.clone())
            }
            // It ended while the renewal was written; the end's record follows it.
            _ => Err(gone()),
        }
    }

    /// Ends a session and stops all its workers (reason `session ended`). The end is durable
    /// before any worker is signalled; an end the store refuses is UNAVAILABLE and the session
    /// stays open.
    pub async fn close_session(
        &self,
        id: &str,
        grace: Option<Duration>,
    ) -> Result<Vec<WorkerRecord>> {
        let slot = self.inner.slot().await;
        let now = self.inner.opts.clock.now().wall;
        // A lease that lapsed a moment ago, before the expiry task saw it, still ends here.
        let (ended, committed) = {
            let sessions = self.inner.sessions();
            let Some(mut s) = sessions.get(id).filter(|s| s.ended_at.is_none()).cloned() else {
                return Err(Error::NotFound(format!("session {id} not found or ended")));
            };
            s.end(now);
            let committed = slot.map(|sl| sl.commit(vec![Op::put(Table::Sessions, &s.id, &s)]));
            (s, committed)
        };
        if let Some(c) = committed {
            c.durable().await.map_err(unavailable)?;
        }
        // Ended here, unless its lease lapsed meanwhile and the expiry task ended it: then that
        // end stands, and stopping again is harmless.
        if let Some(s) = self.inner.sessions().get_mut(id) {
            if s.ended_at.is_none() {
                s.ended_at = ended.ended_at;
            }
        }
        self.inner.session_ended();
        tracing::info!(session = %id, "session closed");
        self.stop_workers(
            Selector::Session(id.to_owned()),
            grace,
            "session ended",
            false,
        )
        .await
    }

    /// Records the end of session `s` (ended already in memory: its lease lapsed) and stops its
    /// workers. The ended session stays known, in memory and in the store, while its workers are
    /// kept.
    pub(super) async fn end_session(
        &self,
        s: &Session,
        grace: Option<Duration>,
    ) -> Result<Vec<WorkerRecord>> {
        self.inner
            .submit(vec![Op::put(Table::Sessions, &s.id, s)])
            .await;
        tracing::info!(session = %s.id, "session ended");
        self.stop_workers(
            Selector::Session(s.id.clone()),
            grace,
            "session ended",
            false,
        )
        .await
    }

    pub(super) async fn expire_sessions(&self) {
        loop {
            let now = self.inner.opts.clock.now();
            let expired: Vec<Session> = {
                let mut sessions = self.inner.sessions();
                sessions
                    .values_mut()
                    .filter(|s| s.ended_at.is_none() && s.expired(&now))
                    .filter_map(|s| s.end(now.wall).then(|| s.clone()))
                    .collect()
            };
            if !expired.is_empty() {
                self.inner.session_ended();
            }
            for s in expired {
                tracing::info!(session = %s.id, "session lease lapsed");
                let host = self.clone();
                let span = tracing::info_span!("session_end", session = %s.id);
                berth_server::spawn_in(span, async move {
                    let _ = host.end_session(&s, None).await;
                });
            }
            let next = {
                let sessions = self.inner.sessions();
                sessions
                    .values()
                    .filter(|s| s.ended_at.is_none())
                    .map(|s| s.remaining(&now))
                    .min()
                    .unwrap_or(Duration::from_secs(1))
                    .clamp(Duration::from_millis(50), Duration::from_secs(1))
            };
            tokio::select! {
                _ = tokio::time::sleep(next) => {}
                _ = self.inner.shutdown.cancelled() => return,
            }
        }
    }

    /// Forgets ended sessions that no kept worker belongs to any more, once they ended longer
    /// than the retention of ended workers ago, or beyond as many as ended workers are kept
    /// (oldest first). Returns their ids.
    pub(super) fn forget_ended_sessions(&self, now: SystemTime) -> Vec<String> {
        let in_use: HashSet<String> = {
            let st = self.inner.lock();
            st.workers
                .values()
                .filter_map(|e| e.rec.session_id.clone())
                .collect()
        };
        let opts = &self.inner.opts;
        let mut sessions = self.inner.sessions();
        let mut idle: Vec<(SystemTime, String)> = sessions
            .values()
            .filter(|s| !in_use.contains(&s.id))
            .filter_map(|s| s.ended_at.map(|e| (e, s.id.clone())))
            .collect();
        idle.sort();
        let excess = idle.len().saturating_sub(opts.retain_finished_max);
        let doomed: Vec<String> = idle
            .into_iter()
            .enumerate()
            .filter(|(i, (_, id))| {
                *i < excess
                    || sessions
                        .get(id)
                        .is_some_and(|s| s.forgettable(now, opts.retain_finished_for))
            })
            .map(|(_, (_, id))| id)
            .collect();
        for id in &doomed {
            sessions.remove(id);
        }
        doomed
    }
}

impl Inner {
    /// Tells session followers that some session ended.
    fn session_ended(&self) {
        self.session_ends.send_modify(|n| *n += 1);
    }

    /// Whether session `id` is known and has not ended.
    pub(super) fn session_open(&self, id: &str) -> bool {
        self.sessions()
            .get(id)
            .is_some_and(|s| s.ended_at.is_none())
    }

    /// NOT_FOUND unless `id` is an open session.
    pub(super) fn check_session(&self, id: &str) -> Result<()> {
        self.lock_open_session(id).map(drop)
    }

    /// The sessions, locked, if `id` is open: it stays open while the guard is held. Take the
    /// state lock only after this one, never the other way round.
    pub(super) fn lock_open_session(
        &self,
        id: &str,
    ) -> Result<MutexGuard<'_, HashMap<String, Session>>> {
        let sessions = self.sessions();
        match sessions.get(id) {
            Some(s) if s.is_open(self.opts.clock.now()) => Ok(sessions),
            _ => Err(Error::NotFound(format!("session {id} not found or ended"))),
        }
    }

    /// NOT_FOUND unless this daemon knows session `id`: open, or ended with its workers (or its
    /// end) still kept. Call without the state lock held.
    pub(super) fn check_known_session(&self, id: &str) -> Result<()> {
        let recorded = self.sessions().contains_key(id);
        if recorded {
            return Ok(());
        }
        // A session whose record is gone (a store recovered from the workers' own files) is
        // still known by the workers launched into it.
        let st = self.lock();
        if st
            .workers
            .values()
            .any(|e| e.rec.session_id.as_deref() == Some(id))
        {
            return Ok(());
        }
        Err(Error::NotFound(format!(
            "session_id: session {id} not found"
        )))
    }

    pub(super) fn sessions(&self) -> MutexGuard<'_, HashMap<String, Session>> {
        self.sessions.lock().unwrap_or_else(|p| p.into_inner())
    }
}
