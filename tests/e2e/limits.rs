//! End-to-end tests of the bounds a request is checked against before anything is made for it:
//! the number of workers of a launch, the sizes of its program and environment (`[limits]`), the
//! kernel's exec limits, and the ids one request may name. Also that code too long for a command
//! line still runs, handed to the interpreter on a file descriptor.

use std::time::Duration;

use berth_tests::{
    await_all, command_request, host_info, ids_of, launch, output_of, pb, python_request,
    require_root, Client, Daemon, DaemonOptions,
};
use tonic::Code;

async fn daemon_with(config: &str) -> Daemon {
    Daemon::start_with(DaemonOptions {
        config: config.to_owned(),
        ..Default::default()
    })
    .await
    .unwrap()
}

/// The launch is refused with `code`; returns the message.
async fn refused(c: &Client, req: pb::LaunchWorkersRequest, code: Code) -> String {
    match c.workers().launch_workers(req).await {
        Ok(r) => panic!("launch admitted: {:?}", ids_of(&r.into_inner().workers)),
        Err(s) => {
            assert_eq!(s.code(), code, "{s:?}");
            s.message().to_owned()
        }
    }
}

/// Nothing was admitted: no worker listed, none accounted, no worker directory made.
async fn nothing_admitted(d: &Daemon, c: &Client) {
    let listed = c
        .workers()
        .list_workers(pb::ListWorkersRequest::default())
        .await
        .unwrap()
        .into_inner()
        .workers;
    assert!(listed.is_empty(), "{listed:?}");
    assert_eq!(host_info(c).await.allocated.unwrap().workers, 0);
    let dirs = std::fs::read_dir(d.state_dir().join("workers"))
        .map(|r| r.count())
        .unwrap_or(0);
    assert_eq!(dirs, 0, "worker directories were made");
}

/// The daemon is alive and serves: a small launch runs to its end.
async fn still_serving(d: &Daemon, c: &Client) {
    assert!(
        std::fs::metadata(format!("/proc/{}", d.pid().unwrap())).is_ok(),
        "berthd is gone:\n{}",
        d.log()
    );
    let ws = launch(c, command_request(1, &["/bin/true"])).await;
    let done = await_all(c, &ids_of(&ws)).await.unwrap();
    assert_eq!(
        done[0].status,
        pb::WorkerStatus::Succeeded as i32,
        "{done:?}"
    );
}

/// `n = 2^32 - 1` once killed berthd (an id and a record per worker were made before admission
/// looked at `n`); now it is refused at once, whole, and the daemon serves on. So is an `n` past
/// `max_workers_per_launch` that the slots would hold.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_launch_of_more_workers_than_the_host_holds_is_refused_first() {
    require_root!();
    let d =
        daemon_with("[resources]\nmax_workers = 64\n[limits]\nmax_workers_per_launch = 16\n").await;
    let c = d.client().await.unwrap();
    let m = refused(
        &c,
        command_request(u32::MAX, &["/bin/true"]),
        Code::ResourceExhausted,
    )
    .await;
    assert!(
        m.contains("4294967295") && m.contains("max_workers_per_launch"),
        "{m}"
    );
    nothing_admitted(&d, &c).await;
    // Within the slots, past the cap of one launch.
    let m = refused(
        &c,
        command_request(17, &["/bin/true"]),
        Code::ResourceExhausted,
    )
    .await;
    assert_eq!(
        m,
        "workers: 17 requested in one launch, at most 16 (limits.max_workers_per_launch)"
    );
    // Within the cap, past the free slots.
    let d2 = daemon_with("[resources]\nmax_workers = 4\n").await;
    let c2 = d2.client().await.unwrap();
    let m = refused(
        &c2,
        command_request(u32::MAX, &["/bin/true"]),
        Code::ResourceExhausted,
    )
    .await;
    assert!(m.contains("max_workers_per_launch"), "{m}");
    let m = refused(
        &c2,
        command_request(5, &["/bin/true"]),
        Code::ResourceExhausted,
    )
    .await;
    assert_eq!(m, "workers: 5 requested, 4 of 4 slots free");
    nothing_admitted(&d2, &c2).await;
    still_serving(&d, &c).await;
    still_serving(&d2, &c2).await;
}

/// An env far past the kernel's exec limit (200,000 variables) was admitted and every worker
/// then FAILED with "Argument list too long"; now it is refused at admission, naming `env` and
/// the cap. Past the caps raised, the kernel's own limit refuses it, naming `env` too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_env_past_the_limits_is_refused_naming_env() {
    require_root!();
    let d = daemon_with("").await;
    let c = d.client().await.unwrap();
    let mut req = command_request(2, &["/bin/true"]);
    req.env = (0..200_000)
        .map(|i| (format!("V{i}"), "x".into()))
        .collect();
    let m = refused(&c, req, Code::InvalidArgument).await;
    assert!(
        m.starts_with("env: 200000 variables") && m.contains("limits.max_env_vars"),
        "{m}"
    );
    nothing_admitted(&d, &c).await;

    let d = daemon_with("[limits]\nmax_env_bytes = 16777216\n").await;
    let c = d.client().await.unwrap();
    // 100 variables of 64 KiB: within every cap and each within the kernel's limit on one
    // variable, but 6.4 MiB together, past ARG_MAX (a quarter of the stack limit, 6 MiB at most).
    let mut req = command_request(1, &["/bin/true"]);
    req.env = (0..100)
        .map(|i| (format!("V{i}"), "x".repeat(64 << 10)))
        .collect();
    let m = refused(&c, req, Code::InvalidArgument).await;
    assert!(m.starts_with("env: ") && m.contains("ARG_MAX"), "{m}");
    nothing_admitted(&d, &c).await;
    // A variable past the kernel's limit on one string.
    let mut req = command_request(1, &["/bin/true"]);
    req.env.insert("BIG".into(), "v".repeat(128 << 10));
    let m = refused(&c, req, Code::InvalidArgument).await;
    assert!(
        m.starts_with("env[BIG]: ") && m.contains("MAX_ARG_STRLEN"),
        "{m}"
    );
    nothing_admitted(&d, &c).await;
    still_serving(&d, &c).await;
}

/// An argv string over 128 KiB: refused naming `command[i]`, by the configured cap and, with
/// the cap raised, by the kernel's MAX_ARG_STRLEN (the worker would fail to exec otherwise).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_argument_past_the_limits_is_refused_naming_it() {
    require_root!();
    let long = "a".repeat(200 << 10);
    let d = daemon_with("").await;
    let c = d.client().await.unwrap();
    let m = refused(
        &c,
        command_request(1, &["/bin/echo", "hi", &long]),
        Code::InvalidArgument,
    )
    .await;
    assert!(
        m.starts_with("command[2]: 204800 bytes") && m.contains("limits.max_command_arg_bytes"),
        "{m}"
    );
    nothing_admitted(&d, &c).await;

    let d = daemon_with("[limits]\nmax_command_arg_bytes = 1048576\n").await;
    let c = d.client().await.unwrap();
    let m = refused(
        &c,
        command_request(1, &["/bin/echo", "hi", &long]),
        Code::InvalidArgument,
    )
    .await;
    assert!(
        m.starts_with("command[2]: 204800 bytes") && m.contains("MAX_ARG_STRLEN"),
        "{m}"
    );
    nothing_admitted(&d, &c).await;
    // Just within the kernel's limit (its NUL makes 128 KiB), it runs.
    let fits = "a".repeat((128 << 10) - 1);
    let ws = launch(&c, command_request(1, &["/bin/echo", "-n", &fits])).await;
    let done = await_all(&c, &ids_of(&ws)).await.unwrap();
    assert_eq!(
        done[0].status,
        pb::WorkerStatus::Succeeded as i32,
        "{done:?}"
    );
    let out = output_of(&c, &ws[0].id, pb::Stream::Stdout).await.unwrap();
    assert_eq!(out.len(), fits.len());
}

/// 1 MiB of Python code, past what one argument may hold, runs: the interpreter reads it from
/// /proc/self/fd/3 (a memfd the worker's user, nobody here, can read), prints its own length, and
/// the worker's record holds that path, not the megabyte. Code that fits keeps `-c`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn code_past_the_command_line_reaches_the_interpreter_by_fd() {
    require_root!();
    let d = daemon_with("").await;
    let c = d.client().await.unwrap();
    let head = "import sys\nsrc = open(sys.argv[0], 'rb').read()\nprint(len(src), sys.argv)\n";
    let code = format!("{head}#{}\n", "x".repeat((1 << 20) - head.len() - 2));
    assert_eq!(code.len(), 1 << 20);
    let big = launch(&c, python_request(2, &code)).await;
    let small = launch(&c, python_request(1, "import sys; print(sys.argv)")).await;
    let done = await_all(&c, &ids_of(&big)).await.unwrap();
    for w in &done {
        assert_eq!(w.status, pb::WorkerStatus::Succeeded as i32, "{w:?}");
        assert_eq!(w.user, "nobody");
        assert_eq!(
            w.command.last().map(String::as_str),
            Some("/proc/self/fd/3")
        );
        assert!(w.command.iter().all(|a| a.len() < 4096), "{:?}", w.command);
        let out = output_of(&c, &w.id, pb::Stream::Stdout).await.unwrap();
        assert_eq!(
            String::from_utf8_lossy(&out),
            format!("{} ['/proc/self/fd/3']\n", 1 << 20)
        );
    }
    let done = await_all(&c, &ids_of(&small)).await.unwrap();
    assert_eq!(done[0].status, pb::WorkerStatus::Succeeded as i32);
    let n = done[0].command.len();
    assert_eq!(
        done[0].command[n - 2..],
        ["-c", "import sys; print(sys.argv)"]
    );
    let out = output_of(&c, &done[0].id, pb::Stream::Stdout)
        .await
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out), "['-c']\n");
    // Past the cap on code, refused naming it.
    let too_big = "#".repeat((4 << 20) + 1);
    let m = refused(&c, python_request(1, &too_big), Code::InvalidArgument).await;
    assert!(
        m.starts_with("code: ") && m.contains("limits.max_code_bytes"),
        "{m}"
    );
}

/// Ids named twice are answered once (await, list, stop, output); more than 10,000 are refused
/// naming `ids`; a stream named twice is streamed once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ids_are_deduplicated_and_capped() {
    require_root!();
    let d = daemon_with("").await;
    let c = d.client().await.unwrap();
    let ws = launch(&c, command_request(2, &["/bin/echo", "once"])).await;
    let (a, b) = (ws[0].id.clone(), ws[1].id.clone());
    let twice = vec![a.clone(), b.clone(), a.clone(), a.clone()];
    let r = c
        .workers()
        .await_workers(pb::AwaitWorkersRequest {
            ids: twice.clone(),
            timeout_seconds: Some(60),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.workers.len() + r.failures.len(), 2, "{r:?}");
    let listed = c
        .workers()
        .list_workers(pb::ListWorkersRequest {
            ids: twice.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .workers;
    assert_eq!(listed.len(), 2);
    let mut s = c
        .workers()
        .stream_output(pb::StreamOutputRequest {
            ids: vec![a.clone(), a.clone()],
            from_start: true,
            streams: vec![pb::Stream::Stdout as i32; 3],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut out = Vec::new();
    while let Some(chunk) = tokio::time::timeout(Duration::from_secs(30), s.message())
        .await
        .unwrap()
        .unwrap()
    {
        out.extend_from_slice(&chunk.data);
    }
    assert_eq!(String::from_utf8_lossy(&out), "once\n");
    let stopped = c
        .workers()
        .stop_workers(pb::StopWorkersRequest {
            ids: twice,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .workers;
    assert_eq!(stopped.len(), 2);

    // Past the cap: refused naming ids, whatever the ids (these are unknown ones).
    let many: Vec<String> = (0..10_001).map(|i| format!("w{i:011}")).collect();
    let e = c
        .workers()
        .list_workers(pb::ListWorkersRequest {
            ids: many.clone(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(e.message().starts_with("ids: 10001 ids"), "{}", e.message());
    let e = c
        .workers()
        .await_workers(pb::AwaitWorkersRequest {
            ids: many,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    // As many as the cap, named twice over: listed once each.
    let mut cap: Vec<String> = vec![a.clone(); 5_000];
    cap.extend(vec![b.clone(); 5_000]);
    let listed = c
        .workers()
        .list_workers(pb::ListWorkersRequest {
            ids: cap,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .workers;
    assert_eq!(listed.len(), 2);
}
