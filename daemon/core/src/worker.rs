//! The worker record and its state machine.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::PathBuf;
use std::time::SystemTime;

use serde::{Deserialize, Serialize};

use super::launch::{NetworkMode, RestartPolicy};

/// Where a worker is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum WorkerStatus {
    /// Admitted; resources are held; nothing started yet.
    Pending,
    /// The shim is starting it.
    Starting,
    Running,
    Succeeded,
    Failed,
    Stopped,
    Lost,
}

/// Which workers a list, watch or await is about: one type for the host's records and the
/// scheduler's view alike (each matches its own representation through [`Filter::selects`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Filter {
    pub session_id: Option<String>,
    pub ids: Vec<String>,
    pub statuses: Vec<WorkerStatus>,
    /// Only the workers of this owner (a caller who is not an admin sees only its own).
    pub owner: Option<String>,
}

impl Filter {
    /// Whether a worker with this id, session and status is selected. `status` is `None` for a
    /// status outside the contract, which only a filter on no status selects.
    pub fn selects(
        &self,
        id: &str,
        session_id: Option<&str>,
        status: Option<WorkerStatus>,
    ) -> bool {
        self.session_id
            .as_deref()
            .is_none_or(|s| session_id == Some(s))
            && (self.ids.is_empty() || self.ids.iter().any(|i| i == id))
            && (self.statuses.is_empty() || status.is_some_and(|s| self.statuses.contains(&s)))
    }

    pub fn matches(&self, w: &WorkerRecord) -> bool {
        self.owns(&w.owner) && self.selects(&w.id, w.session_id.as_deref(), Some(w.status))
    }

    /// Whether a worker of `owner` passes the owner restriction.
    pub fn owns(&self, owner: &str) -> bool {
        self.owner.as_deref().is_none_or(|o| o == owner)
    }
}

/// Which workers a stop is about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Selector {
    Ids(Vec<String>),
    Session(String),
    All,
}

impl WorkerStatus {
    /// Whether the worker has ended for good.
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            WorkerStatus::Succeeded
                | WorkerStatus::Failed
                | WorkerStatus::Stopped
                | WorkerStatus::Lost
        )
    }

    pub fn as_str(self) -> &'static str {
        match self {
            WorkerStatus::Pending => "PENDING",
            WorkerStatus::Starting => "STARTING",
            WorkerStatus::Running => "RUNNING",
            WorkerStatus::Succeeded => "SUCCEEDED",
            WorkerStatus::Failed => "FAILED",
            WorkerStatus::Stopped => "STOPPED",
            WorkerStatus::Lost => "LOST",
        }
    }

    pub const ALL: [WorkerStatus; 7] = [
        WorkerStatus::Pending,
        WorkerStatus::Starting,
        WorkerStatus::Running,
        WorkerStatus::Succeeded,
        WorkerStatus::Failed,
        WorkerStatus::Stopped,
        WorkerStatus::Lost,
    ];
}

/// Everything known about one worker; also what the state store keeps.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorkerRecord {
    pub id: String,
    pub session_id: Option<String>,
    pub host: String,
    pub ip_address: Option<IpAddr>,
    pub status: WorkerStatus,
    pub cpu: f64,
    pub memory_bytes: u64,
    pub nvidia_gpu: u32,
    pub gpu_uuids: Vec<String>,
    pub kernel: String,
    pub command: Vec<String>,
    pub workdir: PathBuf,
    pub network: NetworkMode,
    pub restart: RestartPolicy,
    pub pid: Option<u32>,
    pub exit_code: Option<i32>,
    pub signal: Option<i32>,
    pub reason: String,
    pub restarts: u32,
    pub labels: BTreeMap<String, String>,
    pub created_at: SystemTime,
    pub started_at: Option<SystemTime>,
    pub finished_at: Option<SystemTime>,
    pub cpu_seconds: f64,
    pub memory_peak_bytes: u64,
    /// Set once a stop was asked for; the worker then ends STOPPED whatever its exit.
    pub stop_reason: Option<String>,
    /// The shim supervising the current run, identified by pid and start time (clock ticks since
    /// boot) so that a recycled pid is never mistaken for it.
    #[serde(default)]
    pub shim_pid: Option<u32>,
    #[serde(default)]
    pub shim_starttime: Option<u64>,
    /// GPU memory the worker's processes use now (live, like `cpu_seconds`; 0 when unknown).
    #[serde(default)]
    pub gpu_memory_used_bytes: u64,
    /// The user name of the caller that launched the worker: who may see and stop it. Empty in
    /// records written before owners existed, which only root and admins see.
    #[serde(default)]
    pub owner: String,
    /// The user the worker runs as.
    #[serde(default)]
    pub user: String,
    /// The launch's `request_id`: a retry of it by the same owner gets this worker back.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
    /// Bytes of the worker's output that could not be kept (a full disk, an I/O error); the
    /// stream's offsets jump over them.
    #[serde(default)]
    pub output_dropped_bytes: u64,
    /// Started from a warm interpreter pool rather than cold.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub pooled: bool,
}

impl WorkerRecord {
    /// A worker just admitted on `host`: PENDING, nothing started, no usage yet. Callers fill in
    /// what the launch asked for.
    pub fn pending(id: String, host: String, created_at: SystemTime) -> Self {
        Self {
            id,
            session_id: None,
            host,
            ip_address: None,
            status: WorkerStatus::Pending,
            cpu: 0.0,
            memory_bytes: 0,
            nvidia_gpu: 0,
            gpu_uuids: Vec::new(),
            kernel: String::new(),
            command: Vec::new(),
            workdir: PathBuf::new(),
            network: NetworkMode::default(),
            restart: RestartPolicy::default(),
            pid: None,
            exit_code: None,
            signal: None,
            reason: String::new(),
            restarts: 0,
            labels: BTreeMap::new(),
            created_at,
            started_at: None,
            finished_at: None,
            cpu_seconds: 0.0,
            memory_peak_bytes: 0,
            stop_reason: None,
            shim_pid: None,
            shim_starttime: None,
            gpu_memory_used_bytes: 0,
            owner: String::new(),
            user: String::new(),
            request_id: None,
            output_dropped_bytes: 0,
            pooled: false,
        }
    }
}

/// How the worker's main process ended, as the shim saw it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Exit {
    pub exit_code: Option<i32>,
    pub signal: Option<i32>,
    pub spawn_error: Option<String>,
    /// The kernel's OOM killer killed a process of the worker's cgroup.
    pub oom_killed: bool,
    /// Nobody saw the end (the worker ran on after its shim died): the worker is LOST with this
    /// reason, unless a stop was asked for.
    pub unseen: Option<String>,
}

/// Name of a signal for people (`SIGKILL`), or its number.
pub fn signal_name(sig: i32) -> String {
    let name = match sig {
        1 => "SIGHUP",
        2 => "SIGINT",
        3 => "SIGQUIT",
        4 => "SIGILL",
        6 => "SIGABRT",
        7 => "SIGBUS",
        8 => "SIGFPE",
        9 => "SIGKILL",
        11 => "SIGSEGV",
        13 => "SIGPIPE",
        14 => "SIGALRM",
        15 => "SIGTERM",
        _ => return format!("signal {sig}"),
    };
    name.to_owned()
}

/// The final status and reason of a worker that ended with `exit`.
pub fn final_state(exit: &Exit, stop_reason: Option<&str>) -> (WorkerStatus, String) {
    if let Some(err) = &exit.spawn_error {
        return match stop_reason {
            Some(r) => (WorkerStatus::Stopped, r.to_owned()),
            None => (WorkerStatus::Failed, format!("spawn failed: {err}")),
        };
    }
    if let Some(r) = stop_reason {
        return (WorkerStatus::Stopped, r.to_owned());
    }
    if let Some(r) = &exit.unseen {
        return (WorkerStatus::Lost, r.clone());
    }
    if exit.oom_killed {
        return (WorkerStatus::Failed, "OOMKilled".to_owned());
    }
    match (exit.exit_code, exit.signal) {
        (Some(0), _) => (WorkerStatus::Succeeded, "exited with code 0".to_owned()),
        (Some(c), _) => (WorkerStatus::Failed, format!("exited with code {c}")),
        (None, Some(s)) => (
            WorkerStatus::Failed,
            format!("killed by {}", signal_name(s)),
        ),
        (None, None) => (
            WorkerStatus::Failed,
            "ended; exit status unknown".to_owned(),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exit(code: Option<i32>, sig: Option<i32>, oom: bool) -> Exit {
        Exit {
            exit_code: code,
            signal: sig,
            spawn_error: None,
            oom_killed: oom,
            unseen: None,
        }
    }

    #[test]
    fn final_states() {
        use WorkerStatus::*;
        let cases: &[(Exit, Option<&str>, WorkerStatus, &str)] = &[
            (
                exit(Some(0), None, false),
                None,
                Succeeded,
                "exited with code 0",
            ),
            (
                exit(Some(7), None, false),
                None,
                Failed,
                "exited with code 7",
            ),
            (exit(None, Some(9), true), None, Failed, "OOMKilled"),
            (
                exit(None, Some(9), false),
                None,
                Failed,
                "killed by SIGKILL",
            ),
            (
                exit(None, Some(15), false),
                Some("stopped"),
                Stopped,
                "stopped",
            ),
            (
                exit(Some(0), None, false),
                Some("session ended"),
                Stopped,
                "session ended",
            ),
            (
                Exit {
                    unseen: Some("ended unsupervised".into()),
                    ..Default::default()
                },
                None,
                Lost,
                "ended unsupervised",
            ),
            (
                Exit {
                    unseen: Some("ended unsupervised".into()),
                    ..Default::default()
                },
                Some("stopped"),
                Stopped,
                "stopped",
            ),
            (
                Exit {
                    spawn_error: Some("exec /x: ENOENT".into()),
                    ..Default::default()
                },
                None,
                Failed,
                "spawn failed: exec /x: ENOENT",
            ),
        ];
        for (e, stop, status, reason) in cases {
            assert_eq!(
                final_state(e, *stop),
                (*status, reason.to_string()),
                "{e:?} {stop:?}"
            );
        }
    }

    #[test]
    fn terminal_statuses() {
        let terminal: Vec<_> = WorkerStatus::ALL
            .iter()
            .filter(|s| s.is_terminal())
            .collect();
        assert_eq!(terminal.len(), 4);
        assert!(!WorkerStatus::Running.is_terminal());
    }
}
