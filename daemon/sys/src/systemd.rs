//! berth under systemd on cgroup v2: the transient scope that holds shims and workers.
//!
//! A `Delegate=yes` service may not give its own cgroup children with controllers and also get
//! new processes from systemd: cgroup v2 puts no process into a cgroup whose children have
//! controllers, and systemd before 254 (no `DelegateSubgroup=`) starts every new main process
//! in the service's cgroup itself. So a restart of `berthd.service` whose cgroup held the
//! worker cgroups failed with `status=219/CGROUP`. As Slurm (`slurmstepd.scope`) and
//! containerd's systemd cgroup driver do, berth asks systemd over D-Bus for a scope of its own,
//! [`WORKERS_SCOPE`], with `Delegate=yes`, beside the service in the same slice: the shims (and
//! the zygotes that fork them) live in its leaf, the worker cgroups below it, and the service's
//! cgroup stays a plain leaf that systemd can always start a daemon in. The scope lives as long
//! as a process in it does, so it outlives a daemon restart with the workers, and a new daemon
//! finds it and moves its zygotes in.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The scope of every berth daemon's shims and workers on this host (each daemon's worker
/// cgroups are `berth-<name>` in it).
pub const WORKERS_SCOPE: &str = "berth-workers.scope";

/// How long systemd may take to run the scope's start job after accepting it.
const PLACED_WITHIN: Duration = Duration::from_secs(10);

/// Why the workers' scope could not be had.
#[derive(Debug, thiserror::Error)]
pub enum ScopeError {
    /// The system bus could not be reached.
    #[error("cannot reach systemd on the system bus: {0}")]
    Bus(#[source] zbus::Error),
    /// systemd refused to start the scope.
    #[error("systemd refused to start {unit}: {source}")]
    Start {
        unit: String,
        #[source]
        source: zbus::Error,
    },
    /// A new scope needs a process to hold, and none was given.
    #[error("no process to start {unit} with")]
    NoProcess { unit: String },
    /// The start job was accepted, but the processes did not reach the scope's cgroup.
    #[error("{unit}: pid {pid} was not moved into {cgroup} within {waited:?}")]
    NotPlaced {
        unit: String,
        pid: u32,
        cgroup: String,
        waited: Duration,
    },
}

/// Whether systemd is this host's init (sd_booted(3): `/run/systemd/system` exists).
pub fn booted() -> bool {
    Path::new("/run/systemd/system").is_dir()
}

/// The cgroup (a path inside the v2 hierarchy) of [`WORKERS_SCOPE`] for a daemon whose own
/// cgroup is `own`, and the slice it goes in: beside the daemon's service, in its slice.
/// `None` unless `own` is a service's cgroup (`/system.slice/berthd.service`) or the
/// `supervisor` leaf of one (a berthd started with `DelegateSubgroup=supervisor`).
pub fn scope_for(own: &str) -> Option<(String, String)> {
    let own = own.trim_end_matches('/');
    let own = own
        .strip_suffix(&format!("/{}", crate::cgroup::V2_LEAF))
        .unwrap_or(own);
    let (parent, unit) = own.rsplit_once('/')?;
    if !unit.ends_with(".service") {
        return None;
    }
    let slice = match parent.rsplit_once('/') {
        Some((_, "")) | None => "-.slice",
        Some((_, s)) if s.ends_with(".slice") => s,
        Some(_) => return None,
    };
    Some((format!("{parent}/{WORKERS_SCOPE}"), slice.to_owned()))
}

/// The v2 cgroup of `pid`, as /proc/PID/cgroup names it.
fn cgroup_of(pid: u32) -> Option<String> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    crate::cgroup::parse_proc_cgroup(&text)
        .into_iter()
        .find(|(c, _)| c.is_empty())
        .map(|(_, p)| p)
}

/// Whether the scope exists now: its cgroup (`cgroup`, inside the hierarchy mounted at
/// `mount`) is there with a process somewhere below it.
fn scope_alive(mount: &Path, cgroup: &str) -> bool {
    let events = mount
        .join(cgroup.trim_start_matches('/'))
        .join("cgroup.events");
    std::fs::read_to_string(events).is_ok_and(|t| t.lines().any(|l| l == "populated 1"))
}

/// Makes sure [`WORKERS_SCOPE`] runs, with cgroup `cgroup` in `slice` (from [`scope_for`]):
/// when it does not, starts it over D-Bus with `Delegate=yes` holding `pids` (the zygotes),
/// and waits until systemd has moved them in. Returns the scope's cgroup path. A scope that
/// still holds an earlier daemon's shims is taken as it is.
pub async fn ensure_scope(
    mount: &Path,
    cgroup: &str,
    slice: &str,
    pids: &[u32],
) -> Result<String, ScopeError> {
    if scope_alive(mount, cgroup) {
        return Ok(cgroup.to_owned());
    }
    let unit = WORKERS_SCOPE.to_owned();
    let Some(&first) = pids.first() else {
        return Err(ScopeError::NoProcess { unit });
    };
    let conn = zbus::Connection::system().await.map_err(ScopeError::Bus)?;
    use zbus::zvariant::Value;
    let props: Vec<(&str, Value<'_>)> = vec![
        (
            "Description",
            Value::from("berth workers and their shims (outlive berthd restarts)"),
        ),
        ("Slice", Value::from(slice)),
        ("Delegate", Value::from(true)),
        ("PIDs", Value::from(pids.to_vec())),
        // Worker cgroups have their own pids limits; systemd's default would cap them all.
        ("TasksMax", Value::from(u64::MAX)),
    ];
    let aux: Vec<(&str, Vec<(&str, Value<'_>)>)> = Vec::new();
    let body = (unit.as_str(), "fail", props, aux);
    let start = || {
        conn.call_method(
            Some("org.freedesktop.systemd1"),
            "/org/freedesktop/systemd1",
            Some("org.freedesktop.systemd1.Manager"),
            "StartTransientUnit",
            &body,
        )
    };
    let exists = |e: &zbus::Error| {
        matches!(e, zbus::Error::MethodError(name, _, _)
            if name.as_str() == "org.freedesktop.systemd1.UnitExists")
    };
    match start().await {
        Ok(_) => {}
        // Still loaded without processes: failed (a worker's OOM kill can fail it), or not yet
        // collected. A failed unit stays until reset; then the name is free again.
        Err(e) if exists(&e) => {
            tracing::info!(unit = %unit, "workers' scope loaded but empty: reset and started anew");
            let _ = conn
                .call_method(
                    Some("org.freedesktop.systemd1"),
                    "/org/freedesktop/systemd1",
                    Some("org.freedesktop.systemd1.Manager"),
                    "ResetFailedUnit",
                    &(unit.as_str(),),
                )
                .await;
            tokio::time::sleep(Duration::from_millis(100)).await;
            start().await.map_err(|source| ScopeError::Start {
                unit: unit.clone(),
                source,
            })?;
        }
        Err(source) => return Err(ScopeError::Start { unit, source }),
    }
    // The start job runs after the call returns: wait for the move of the first process.
    let since = Instant::now();
    loop {
        if cgroup_of(first).is_some_and(|c| c == cgroup || c.starts_with(&format!("{cgroup}/"))) {
            return Ok(cgroup.to_owned());
        }
        if since.elapsed() > PLACED_WITHIN {
            return Err(ScopeError::NotPlaced {
                unit,
                pid: first,
                cgroup: cgroup.to_owned(),
                waited: since.elapsed(),
            });
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// The mount point of the unified hierarchy in this process's mount namespace.
pub fn unified_mount() -> Option<PathBuf> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    crate::cgroup::parse_mountinfo(&text)
        .into_iter()
        .find(|m| m.version == crate::cgroup::CgroupVersion::V2)
        .map(|m| m.mount_point)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_scope_goes_beside_the_service_in_its_slice() {
        let s = |a: &str, b: &str| Some((a.to_owned(), b.to_owned()));
        for (own, want) in [
            (
                "/system.slice/berthd.service",
                s("/system.slice/berth-workers.scope", "system.slice"),
            ),
            (
                "/system.slice/berthd.service/supervisor",
                s("/system.slice/berth-workers.scope", "system.slice"),
            ),
            (
                "/a.slice/a-b.slice/berthd.service",
                s("/a.slice/a-b.slice/berth-workers.scope", "a-b.slice"),
            ),
            ("/berthd.service", s("/berth-workers.scope", "-.slice")),
            ("/", None),
            ("/user.slice/user-0.slice/session-1.scope", None),
            ("/system.slice/berthd.service/berth-h", None),
            ("/x/berthd.service", None),
        ] {
            assert_eq!(scope_for(own), want, "{own}");
        }
    }
}
