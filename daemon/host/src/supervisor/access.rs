//! Who may touch what on this host, and as whom workers run. Every session and worker belongs
//! to the caller that made it; a caller who is not an admin (root, or a member of
//! `admin_group`) sees and acts on its own only, and naming another's is PERMISSION_DENIED.
//! A worker runs as its caller's user, or as `worker_user` for root and callers without a local
//! account; root workers only where the host allows them and for root or an admin.

use berth_core::error::{Error, Result};
use berth_server::identity::Caller;
use berth_sys::launcher::{Rlimit, WorkerCreds};
use berth_sys::users::Account;

use super::Host;

/// What the workers of this host keep and may ask for (from the configuration).
#[derive(Debug, Clone, Default)]
pub struct WorkerPrivileges {
    /// The account of `worker_user`, resolved at start; `None` when it does not exist (launches
    /// that would run as it are refused).
    pub worker_user: Option<Account>,
    /// The name configured, for the message when it does not exist.
    pub worker_user_name: String,
    /// `allow_root_workers`.
    pub allow_root: bool,
    /// Capabilities root workers keep (numbers).
    pub root_caps: Vec<u8>,
    /// Resource limits every worker starts with.
    pub rlimits: Vec<Rlimit>,
}

/// Who a launch is for and whom its workers run as.
#[derive(Debug, Clone, Default)]
pub struct LaunchAs {
    /// The caller's address, the default `BERTH_MASTER_IP`.
    pub addr: Option<std::net::IpAddr>,
    /// Recorded as the workers' owner.
    pub owner: String,
    /// The account the workers run as; `None`: the daemon's own identity, unchanged (only code
    /// inside the daemon and its tests launch so; every request names an account).
    pub account: Option<Account>,
}

impl WorkerPrivileges {
    /// The credentials of a worker that runs as `a`.
    pub fn creds(&self, a: &Account) -> WorkerCreds {
        WorkerCreds {
            uid: a.uid,
            gid: a.gid,
            groups: a.groups.clone(),
            keep_caps: if a.uid == 0 {
                self.root_caps.clone()
            } else {
                Vec::new()
            },
            rlimits: self.rlimits.clone(),
            umask: 0o022,
            oom_score_adj: 0,
            pooled: false,
        }
    }
}

fn root_account() -> Account {
    Account {
        name: "root".into(),
        uid: 0,
        gid: 0,
        groups: vec![0],
        home: "/root".into(),
        shell: "/bin/sh".into(),
    }
}

impl Host {
    /// Whom the workers of `caller`'s launch run as (see the module docs).
    pub fn run_as(&self, caller: &Caller, run_as_root: bool) -> Result<LaunchAs> {
        let p = &self.inner.opts.privileges;
        let account = if run_as_root {
            if !caller.admin {
                return Err(Error::PermissionDenied(
                    "run_as_root: only root or a member of admin_group may ask for root workers"
                        .into(),
                ));
            }
            if !p.allow_root {
                return Err(Error::PermissionDenied(
                    "run_as_root: this host does not run root workers (allow_root_workers = false)"
                        .into(),
                ));
            }
            root_account()
        } else {
            match &caller.account {
                Some(a) if a.uid != 0 => a.clone(),
                _ => p.worker_user.clone().ok_or_else(|| {
                    Error::FailedPrecondition(format!(
                        "worker_user {:?}: no such user on this host",
                        p.worker_user_name
                    ))
                })?,
            }
        };
        Ok(LaunchAs {
            addr: caller.addr,
            owner: caller.owner.clone(),
            account: Some(account),
        })
    }

    /// Refuses (PERMISSION_DENIED) when `caller` names a session or a worker of another user;
    /// unknown ones are left to the call itself (NOT_FOUND).
    pub fn authorize(&self, caller: &Caller, ids: &[String], session: Option<&str>) -> Result<()> {
        if caller.admin {
            return Ok(());
        }
        if let Some(s) = session {
            if let Some(owner) = self.inner.sessions().get(s).map(|s| s.owner.clone()) {
                caller.check_owns(&owner, &format!("session {s}"))?;
            }
        }
        let st = self.inner.lock();
        for id in ids {
            if let Some(e) = st.workers.get(id) {
                caller.check_owns(&e.rec.owner, &format!("worker {id}"))?;
            }
        }
        Ok(())
    }

    /// The ids of `owner`'s workers: what a selection that names none means for a caller who
    /// is not an admin.
    pub fn ids_of_owner(&self, owner: &str) -> Vec<String> {
        let st = self.inner.lock();
        let mut ws: Vec<_> = st
            .workers
            .values()
            .filter(|e| e.rec.owner == owner)
            .map(|e| (e.seq, e.rec.id.clone()))
            .collect();
        ws.sort();
        ws.into_iter().map(|(_, id)| id).collect()
    }
}
