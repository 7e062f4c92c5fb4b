//! Requests built from the command line. Pure: whatever the process state adds (the current
//! directory) comes in as a parameter.

use std::path::Path;

use super::args::{AwaitArgs, LaunchArgs, ListArgs, LogsArgs, Restart, StopArgs};
use crate::pb;

/// The `LaunchWorkersRequest` of `berth launch`; a relative or absent `--workdir` is taken
/// from `cwd`, an empty one is left to the server.
pub fn launch(a: &LaunchArgs, cwd: &Path) -> pb::LaunchWorkersRequest {
    let workdir = match &a.workdir {
        Some(d) if d.is_empty() => String::new(),
        // Collecting the components drops `.` ones: `--workdir .` is the directory itself.
        Some(d) => cwd
            .join(d)
            .components()
            .collect::<std::path::PathBuf>()
            .to_string_lossy()
            .into_owned(),
        None => cwd.to_string_lossy().into_owned(),
    };
    let restart = match a.restart {
        Restart::Never if a.max_restarts == 0 => None,
        Restart::Never => Some(pb::RestartPolicy {
            mode: pb::restart_policy::Mode::Never as i32,
            max_restarts: a.max_restarts,
            ..Default::default()
        }),
        Restart::OnFailure => Some(pb::RestartPolicy {
            mode: pb::restart_policy::Mode::OnFailure as i32,
            max_restarts: a.max_restarts,
            ..Default::default()
        }),
    };
    pb::LaunchWorkersRequest {
        n: a.n,
        cpu: a.cpu,
        memory_gb: a.memory,
        nvidia_gpu: a.gpus,
        kernel: a.kernel.clone().unwrap_or_default(),
        script: a.script.clone().unwrap_or_default(),
        code: a.code.clone().unwrap_or_default(),
        command: a.command.clone(),
        env: a.env.iter().cloned().collect(),
        session_id: a.session.clone().unwrap_or_default(),
        workdir,
        master_ip: a.master_ip.clone().unwrap_or_default(),
        network: pb::NetworkMode::from(a.network) as i32,
        restart,
        labels: a.labels.iter().cloned().collect(),
        constraints: a.constraints.iter().cloned().collect(),
        placement: pb::Placement::from(a.placement) as i32,
        request_id: a.request_id.clone().unwrap_or_default(),
        run_as_root: a.run_as_root,
    }
}

pub fn list(a: &ListArgs) -> pb::ListWorkersRequest {
    pb::ListWorkersRequest {
        session_id: a.session.clone().unwrap_or_default(),
        ids: a.ids.clone(),
        statuses: a
            .status
            .iter()
            .map(|s| pb::WorkerStatus::from(*s) as i32)
            .collect(),
    }
}

/// `wait_for_completion` is sent only with `--running`, the timeout only when given, so the
/// server's defaults (completion, 60 s) apply otherwise.
pub fn await_workers(a: &AwaitArgs) -> pb::AwaitWorkersRequest {
    pb::AwaitWorkersRequest {
        ids: a.ids.clone(),
        session_id: a.session.clone().unwrap_or_default(),
        wait_for_completion: a.running.then_some(false),
        timeout_seconds: a.timeout,
    }
}

pub fn stop(a: &StopArgs) -> pb::StopWorkersRequest {
    pb::StopWorkersRequest {
        ids: a.ids.clone(),
        session_id: a.session.clone().unwrap_or_default(),
        all: a.all,
        grace_seconds: a.grace,
    }
}

pub fn logs(a: &LogsArgs) -> pb::StreamOutputRequest {
    let streams = if a.stdout {
        vec![pb::Stream::Stdout as i32]
    } else if a.stderr {
        vec![pb::Stream::Stderr as i32]
    } else {
        Vec::new()
    };
    pb::StreamOutputRequest {
        ids: a.ids.clone(),
        session_id: a.session.clone().unwrap_or_default(),
        follow: a.follow || a.new_workers,
        from_start: !a.tail,
        streams,
        new_workers: a.new_workers,
    }
}

/// Number of distinct ids among `ids`.
pub fn distinct(ids: &[String]) -> usize {
    let mut v: Vec<&String> = ids.iter().collect();
    v.sort();
    v.dedup();
    v.len()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::args::{Cli, Command};
    use clap::Parser;

    fn launch_args(args: &[&str]) -> LaunchArgs {
        let cli = Cli::try_parse_from(["berth", "launch"].iter().chain(args.iter())).unwrap();
        match cli.command {
            Command::Launch(a) => *a,
            c => panic!("{c:?}"),
        }
    }

    #[test]
    fn launch_request_defaults() {
        let r = launch(
            &launch_args(&["--", "/bin/true"]),
            Path::new("/home/u/proj"),
        );
        assert_eq!(
            r,
            pb::LaunchWorkersRequest {
                n: 1,
                cpu: 1.0,
                memory_gb: 1.0,
                command: vec!["/bin/true".into()],
                workdir: "/home/u/proj".into(),
                ..Default::default()
            }
        );
    }

    #[test]
    fn launch_request_fields() {
        let a = launch_args(&[
            "-n",
            "2",
            "--cpu",
            "0.5",
            "--memory",
            "2",
            "--gpus",
            "1",
            "--kernel",
            "r",
            "--script",
            "job.R",
            "--env",
            "A=1",
            "--env",
            "A=2",
            "--session",
            "s1",
            "--workdir",
            "sub/dir",
            "--master-ip",
            "10.0.0.1",
            "--network",
            "host",
            "--label",
            "k=v",
            "--constraint",
            "gpu=a100",
            "--placement",
            "spread",
            "--restart",
            "on-failure",
            "--max-restarts",
            "3",
            "--request-id",
            "retry-7",
            "--run-as-root",
        ]);
        let r = launch(&a, Path::new("/cwd"));
        assert_eq!(r.request_id, "retry-7");
        assert!(r.run_as_root);
        assert_eq!((r.n, r.cpu, r.memory_gb, r.nvidia_gpu), (2, 0.5, 2.0, 1));
        assert_eq!((r.kernel.as_str(), r.script.as_str()), ("r", "job.R"));
        assert!(r.code.is_empty() && r.command.is_empty());
        assert_eq!(r.env.len(), 1);
        assert_eq!(r.env["A"], "2", "the last --env of a name wins");
        assert_eq!(r.session_id, "s1");
        assert_eq!(r.workdir, "/cwd/sub/dir");
        assert_eq!(r.master_ip, "10.0.0.1");
        assert_eq!(r.network(), pb::NetworkMode::Host);
        assert_eq!(r.labels["k"], "v");
        assert_eq!(r.constraints["gpu"], "a100");
        assert_eq!(r.placement(), pb::Placement::Spread);
        let p = r.restart.unwrap();
        assert_eq!(p.mode(), pb::restart_policy::Mode::OnFailure);
        assert_eq!(p.max_restarts, 3);
    }

    #[test]
    fn launch_workdir() {
        let cwd = Path::new("/cwd");
        let wd = |args: &[&str]| launch(&launch_args(args), cwd).workdir;
        assert_eq!(wd(&["--workdir", "/abs"]), "/abs");
        assert_eq!(wd(&["--workdir", ""]), "");
        assert_eq!(wd(&["--workdir", "."]), "/cwd");
        assert_eq!(wd(&["--workdir", "./a/./b"]), "/cwd/a/b");
        assert_eq!(wd(&[]), "/cwd");
    }

    #[test]
    fn await_defaults_are_the_servers() {
        let a = AwaitArgs {
            ids: vec![],
            session: None,
            running: false,
            timeout: None,
        };
        assert_eq!(await_workers(&a), pb::AwaitWorkersRequest::default());
        let r = await_workers(&AwaitArgs {
            ids: vec!["a".into()],
            session: Some("s".into()),
            running: true,
            timeout: Some(0),
        });
        assert_eq!(r.wait_for_completion, Some(false));
        assert_eq!(r.timeout_seconds, Some(0));
        assert_eq!(
            (r.ids, r.session_id),
            (vec!["a".to_owned()], "s".to_owned())
        );
    }

    #[test]
    fn logs_request() {
        let mut a = LogsArgs {
            ids: vec!["a".into()],
            session: None,
            follow: true,
            stdout: false,
            stderr: false,
            tail: false,
            new_workers: false,
        };
        let r = logs(&a);
        assert!(r.follow && r.from_start && r.streams.is_empty() && !r.new_workers);
        a.tail = true;
        a.stderr = true;
        let r = logs(&a);
        assert!(!r.from_start);
        assert_eq!(r.streams, [pb::Stream::Stderr as i32]);
        // A session's new workers are followed.
        a.ids.clear();
        a.session = Some("s".into());
        a.follow = false;
        a.new_workers = true;
        let r = logs(&a);
        assert!(r.follow && r.new_workers && r.session_id == "s");
    }

    #[test]
    fn list_and_stop_requests() {
        let r = list(&ListArgs {
            ids: vec!["a".into()],
            session: None,
            status: vec![super::super::args::StatusArg::Running],
        });
        assert_eq!(r.statuses, [pb::WorkerStatus::Running as i32]);
        let r = stop(&StopArgs {
            ids: vec![],
            session: None,
            all: true,
            grace: Some(2),
        });
        assert!(r.all && r.ids.is_empty() && r.session_id.is_empty());
        assert_eq!(r.grace_seconds, Some(2));
    }

    #[test]
    fn distinct_ids() {
        let ids = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(distinct(&ids(&[])), 0);
        assert_eq!(distinct(&ids(&["a", "a"])), 1);
        assert_eq!(distinct(&ids(&["b", "a", "b"])), 2);
    }
}
