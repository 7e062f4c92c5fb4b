//! The scheduler's view of every worker on every host: built only from what the hosts report
//! (their `ListWorkers` and `WatchWorkers`), so a restarted scheduler rebuilds it whole. Pure
//! data; the rules that order reports from one host live here and are unit-tested.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::time::SystemTime;

use berth_proto::v1 as pb;

use berth_core::error::{Error, Result};

/// `reason` of the workers of a host that stopped beating.
pub const HOST_LOST: &str = "host lost";

pub use berth_core::worker::Filter;
use berth_core::worker::WorkerStatus;

/// The status of a worker as a host reported it; `None` for a value outside the contract.
fn status_of(status: i32) -> Option<WorkerStatus> {
    berth_server::convert::status_from_pb(status, "status").ok()
}

/// Whether a worker in this status has ended.
pub fn is_terminal(status: i32) -> bool {
    status_of(status).is_some_and(WorkerStatus::is_terminal)
}

/// Whether `filter` selects `w`, a worker as its host reported it.
pub fn selects(filter: &Filter, w: &pb::Worker) -> bool {
    let session = (!w.session_id.is_empty()).then_some(w.session_id.as_str());
    filter.owns(&w.owner) && filter.selects(&w.id, session, status_of(w.status))
}

/// How far along its life a status is; reports never move a worker back within one run.
fn rank(status: i32) -> u8 {
    match pb::WorkerStatus::try_from(status) {
        Ok(pb::WorkerStatus::Pending) => 1,
        Ok(pb::WorkerStatus::Starting) => 2,
        Ok(pb::WorkerStatus::Running) => 3,
        Ok(
            pb::WorkerStatus::Succeeded
            | pb::WorkerStatus::Failed
            | pb::WorkerStatus::Stopped
            | pb::WorkerStatus::Lost,
        ) => 4,
        _ => 0,
    }
}

/// Whether a host's report `new` replaces what the view holds. Reports of one host can arrive out
/// of order (a listing read while events were already queued), so a report that would move a
/// worker back in the same run is stale. The scheduler's own `host lost` verdict yields to any
/// report of the host itself.
pub fn supersedes(new: &pb::Worker, old: &pb::Worker) -> bool {
    if old.status == pb::WorkerStatus::Lost as i32 && old.reason == HOST_LOST {
        return true;
    }
    if new.restarts != old.restarts {
        return new.restarts > old.restarts;
    }
    rank(new.status) >= rank(old.status)
}

/// A worker and the host that runs it.
#[derive(Debug, Clone)]
pub struct Tracked {
    pub host: String,
    pub worker: pb::Worker,
}

#[derive(Debug, Default)]
pub struct View {
    workers: HashMap<String, Tracked>,
    by_host: HashMap<String, HashSet<String>>,
    /// The workers of each (owner, caller's `request_id`), whatever attempt made them.
    by_request: HashMap<(String, String), HashSet<String>>,
}

/// The (owner, caller's `request_id`) a worker was launched under, if any.
fn request_key(w: &pb::Worker) -> Option<(String, String)> {
    if w.request_id.is_empty() {
        return None;
    }
    let (base, _) = berth_core::launch::split_attempt(&w.request_id);
    Some((w.owner.clone(), base.to_owned()))
}

impl View {
    pub fn len(&self) -> usize {
        self.workers.len()
    }

    pub fn is_empty(&self) -> bool {
        self.workers.is_empty()
    }

    pub fn get(&self, id: &str) -> Option<&Tracked> {
        self.workers.get(id)
    }

    /// Takes a report of `host` when it is newer than what the view holds; returns the stored
    /// worker when the view changed.
    pub fn apply(&mut self, host: &str, w: pb::Worker) -> Option<pb::Worker> {
        if let Some(t) = self.workers.get_mut(&w.id) {
            if !supersedes(&w, &t.worker) {
                return None;
            }
            if t.host != host {
                // Ids are unique per cluster; a second host with the same id is a bug elsewhere,
                // and the newest report wins.
                if let Some(ids) = self.by_host.get_mut(&t.host) {
                    ids.remove(&w.id);
                }
                t.host = host.to_owned();
                self.by_host
                    .entry(host.to_owned())
                    .or_default()
                    .insert(w.id.clone());
            }
            if t.worker == w {
                return None;
            }
            t.worker = w.clone();
            return Some(w);
        }
        self.by_host
            .entry(host.to_owned())
            .or_default()
            .insert(w.id.clone());
        if let Some(key) = request_key(&w) {
            self.by_request.entry(key).or_default().insert(w.id.clone());
        }
        self.workers.insert(
            w.id.clone(),
            Tracked {
                host: host.to_owned(),
                worker: w.clone(),
            },
        );
        Some(w)
    }

    /// Takes a whole listing of `host`: applies every worker in it and forgets the ended
    /// workers the host no longer holds (its retention removed them). Unfinished workers missing
    /// from the listing are kept: they may have been launched after the listing was read.
    pub fn replace_host(&mut self, host: &str, listing: Vec<pb::Worker>) -> Vec<pb::Worker> {
        let listed: HashSet<String> = listing.iter().map(|w| w.id.clone()).collect();
        let mut changed: Vec<pb::Worker> = listing
            .into_iter()
            .filter_map(|w| self.apply(host, w))
            .collect();
        let gone: Vec<String> = self
            .by_host
            .get(host)
            .map(|ids| {
                ids.iter()
                    .filter(|id| !listed.contains(*id))
                    .filter(|id| {
                        self.workers
                            .get(*id)
                            .is_some_and(|t| is_terminal(t.worker.status))
                    })
                    .cloned()
                    .collect()
            })
            .unwrap_or_default();
        for id in gone {
            self.remove(&id);
        }
        changed.sort_by(|a, b| a.id.cmp(&b.id));
        changed
    }

    fn remove(&mut self, id: &str) {
        if let Some(t) = self.workers.remove(id) {
            if let Some(ids) = self.by_host.get_mut(&t.host) {
                ids.remove(id);
            }
            if let Some(key) = request_key(&t.worker) {
                if let Some(ids) = self.by_request.get_mut(&key) {
                    ids.remove(id);
                    if ids.is_empty() {
                        self.by_request.remove(&key);
                    }
                }
            }
        }
    }

    /// The workers `owner` launched with `request_id` (the caller's id, any attempt).
    pub fn launched_with(&self, owner: &str, request_id: &str) -> Vec<Tracked> {
        self.by_request
            .get(&(owner.to_owned(), request_id.to_owned()))
            .into_iter()
            .flatten()
            .filter_map(|id| self.workers.get(id).cloned())
            .collect()
    }

    /// Every unfinished worker of `host` becomes LOST (`host lost`); returns them.
    pub fn mark_host_lost(&mut self, host: &str, now: SystemTime) -> Vec<pb::Worker> {
        let Some(ids) = self.by_host.get(host) else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for id in ids {
            if let Some(t) = self.workers.get_mut(id) {
                if !is_terminal(t.worker.status) {
                    t.worker.status = pb::WorkerStatus::Lost as i32;
                    t.worker.reason = HOST_LOST.to_owned();
                    t.worker.finished_at = Some(prost_types::Timestamp::from(now));
                    out.push(t.worker.clone());
                }
            }
        }
        out.sort_by(|a, b| a.id.cmp(&b.id));
        out
    }

    /// How many workers the view holds of `host`.
    pub fn count_on(&self, host: &str) -> usize {
        self.by_host.get(host).map_or(0, |ids| ids.len())
    }

    /// The workers `filter` selects, oldest first. A named id the view does not hold is
    /// NOT_FOUND, as on a host.
    pub fn select(&self, filter: &Filter) -> Result<Vec<Tracked>> {
        let mut out: Vec<Tracked> = if filter.ids.is_empty() {
            self.workers
                .values()
                .filter(|t| selects(filter, &t.worker))
                .cloned()
                .collect()
        } else {
            let mut seen = HashSet::new();
            let mut v = Vec::new();
            for id in &filter.ids {
                let t = self
                    .workers
                    .get(id)
                    .ok_or_else(|| Error::NotFound(format!("worker {id} not found")))?;
                if seen.insert(id) && selects(filter, &t.worker) {
                    v.push(t.clone());
                }
            }
            v
        };
        out.sort_by(|a, b| {
            let key = |t: &Tracked| {
                t.worker
                    .created_at
                    .as_ref()
                    .map(|c| (c.seconds, c.nanos))
                    .unwrap_or_default()
            };
            key(a)
                .cmp(&key(b))
                .then_with(|| a.worker.id.cmp(&b.worker.id))
        });
        Ok(out)
    }

    /// Hosts that hold workers of `session_id`.
    pub fn session_hosts(&self, session_id: &str) -> BTreeSet<String> {
        self.workers
            .values()
            .filter(|t| t.worker.session_id == session_id)
            .map(|t| t.host.clone())
            .collect()
    }

    /// Ids of the workers `host` holds.
    pub fn host_workers(&self, host: &str) -> usize {
        self.by_host.get(host).map_or(0, HashSet::len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pb::WorkerStatus as S;

    fn w(id: &str, status: S) -> pb::Worker {
        pb::Worker {
            id: id.into(),
            status: status as i32,
            ..Default::default()
        }
    }

    #[test]
    fn reports_never_move_a_worker_back() {
        let mut v = View::default();
        assert!(v.apply("h", w("a", S::Running)).is_some());
        assert!(v.apply("h", w("a", S::Starting)).is_none());
        assert_eq!(v.get("a").unwrap().worker.status, S::Running as i32);
        assert!(v.apply("h", w("a", S::Succeeded)).is_some());
        assert!(v.apply("h", w("a", S::Running)).is_none());
        // The same report twice changes nothing.
        assert!(v.apply("h", w("a", S::Succeeded)).is_none());
    }

    #[test]
    fn a_restart_starts_a_new_run() {
        let mut v = View::default();
        v.apply("h", w("a", S::Failed));
        let mut again = w("a", S::Pending);
        again.restarts = 1;
        assert!(v.apply("h", again).is_some());
        assert_eq!(v.get("a").unwrap().worker.status, S::Pending as i32);
        // A late report of the first run does not undo the restart.
        assert!(v.apply("h", w("a", S::Failed)).is_none());
    }

    #[test]
    fn lost_hosts_lose_unfinished_workers_and_get_them_back() {
        let mut v = View::default();
        v.apply("h1", w("a", S::Running));
        v.apply("h1", w("b", S::Succeeded));
        v.apply("h2", w("c", S::Running));
        let lost = v.mark_host_lost("h1", SystemTime::now());
        assert_eq!(lost.len(), 1);
        assert_eq!(lost[0].id, "a");
        assert_eq!(lost[0].reason, HOST_LOST);
        assert_eq!(v.get("b").unwrap().worker.status, S::Succeeded as i32);
        assert_eq!(v.get("c").unwrap().worker.status, S::Running as i32);
        // The host returns and says the worker still runs.
        assert!(v.apply("h1", w("a", S::Running)).is_some());
        assert_eq!(v.get("a").unwrap().worker.status, S::Running as i32);
    }

    #[test]
    fn a_listing_forgets_retired_workers_only() {
        let mut v = View::default();
        v.apply("h", w("old", S::Succeeded));
        v.apply("h", w("new", S::Pending));
        v.apply("g", w("other", S::Succeeded));
        let changed = v.replace_host("h", vec![w("kept", S::Running)]);
        assert_eq!(changed.len(), 1);
        assert!(v.get("old").is_none(), "retired by the host");
        assert!(v.get("new").is_some(), "may be newer than the listing");
        assert!(v.get("other").is_some(), "another host's");
        assert_eq!(v.host_workers("h"), 2);
    }

    #[test]
    fn select_filters_and_names_unknown_ids() {
        let mut v = View::default();
        let mut a = w("a", S::Running);
        a.session_id = "s".into();
        v.apply("h1", a);
        v.apply("h2", w("b", S::Failed));
        let f = Filter {
            session_id: Some("s".into()),
            ..Default::default()
        };
        assert_eq!(v.select(&f).unwrap().len(), 1);
        let f = Filter {
            statuses: vec![WorkerStatus::Failed],
            ..Default::default()
        };
        assert_eq!(v.select(&f).unwrap()[0].worker.id, "b");
        let f = Filter {
            ids: vec!["zz".into()],
            ..Default::default()
        };
        assert!(matches!(v.select(&f), Err(Error::NotFound(m)) if m.contains("zz")));
        assert_eq!(
            v.session_hosts("s").into_iter().collect::<Vec<_>>(),
            vec!["h1"]
        );
    }
}
