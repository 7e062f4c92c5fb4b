//! Sessions, durable state and daemon restarts: workers end with their session, and nothing is
//! lost when berthd dies — no worker, no exit status, no byte of output.

#![allow(clippy::cloned_ref_to_slice_refs)]

use std::collections::HashMap;
use std::time::{Duration, Instant};

use berth_tests::{await_running, launch};
use berth_tests::{command_request, pb, require_root, Client, Daemon, DaemonOptions};
use berth_tests::{open_session, scaled};

/// A lease of `secs` seconds, stretched by the harness's timeout scale: a lease a test expects
/// to stay alive while it works (or a client renews it) must outlast slow machines too.
fn ttl_secs(secs: u64) -> u32 {
    berth_tests::scaled(Duration::from_secs(secs)).as_secs() as u32
}

fn status(w: &pb::Worker) -> pb::WorkerStatus {
    pb::WorkerStatus::try_from(w.status).unwrap_or(pb::WorkerStatus::Unspecified)
}

async fn list(c: &Client) -> HashMap<String, pb::Worker> {
    berth_tests::list_all(c)
        .await
        .into_iter()
        .map(|w| (w.id.clone(), w))
        .collect()
}

/// A worker that prints `n` numbered lines, one every `every_ms`, then exits 0.
fn printer(lines: u32, every_ms: u32) -> pb::LaunchWorkersRequest {
    command_request(
        1,
        &[
            "/bin/sh",
            "-c",
            &format!(
                "i=0; while [ $i -lt {lines} ]; do echo line-$i; i=$((i+1)); sleep {}; done",
                every_ms as f64 / 1000.0
            ),
        ],
    )
}

fn expected_lines(n: u32) -> Vec<u8> {
    (0..n)
        .flat_map(|i| format!("line-{i}\n").into_bytes())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_lease_lapses_and_stops_its_workers() {
    require_root!();
    let d = Daemon::start().await.unwrap();
    let c = d.client().await.unwrap();
    // 2 s, longer where the tests run slower: the keep-alive below must come before it lapses.
    let ttl = scaled(Duration::from_secs(2));
    let s = open_session(&c, ttl.as_secs() as u32).await;
    assert!(s.expires_at.is_some());
    let ws = launch(
        &c,
        pb::LaunchWorkersRequest {
            session_id: s.id.clone(),
            ..command_request(2, &["/bin/sleep", "600"])
        },
    )
    .await;
    let ids: Vec<String> = ws.iter().map(|w| w.id.clone()).collect();
    assert!(ws.iter().all(|w| w.session_id == s.id));
    await_running(&c, &ids).await;
    // One keep-alive proves renewal works; then silence.
    c.workers()
        .keep_alive(pb::KeepAliveRequest {
            session_id: s.id.clone(),
        })
        .await
        .unwrap();
    let t = Instant::now();
    let all = berth_tests::await_all(&c, &ids).await.unwrap();
    let took = t.elapsed();
    for w in &all {
        assert_eq!(status(w), pb::WorkerStatus::Stopped, "{w:?}");
        assert_eq!(w.reason, "session ended");
    }
    // TTL + grace (sleep dies on SIGTERM at once) + slack.
    assert!(took < ttl * 3, "stopped after {took:?}");
    let err = c
        .workers()
        .keep_alive(pb::KeepAliveRequest {
            session_id: s.id.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound);
    let err = c
        .workers()
        .launch_workers(pb::LaunchWorkersRequest {
            session_id: s.id.clone(),
            ..command_request(1, &["/bin/true"])
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound);
    assert!(err.message().contains("session"), "{}", err.message());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_session_stops_only_its_workers() {
    require_root!();
    let d = Daemon::start().await.unwrap();
    let c = d.client().await.unwrap();
    let s = open_session(&c, 60).await;
    let mine = launch(
        &c,
        pb::LaunchWorkersRequest {
            session_id: s.id.clone(),
            ..command_request(2, &["/bin/sleep", "600"])
        },
    )
    .await;
    let other = launch(&c, command_request(1, &["/bin/sleep", "600"])).await;
    let mut all: Vec<String> = mine.iter().map(|w| w.id.clone()).collect();
    all.push(other[0].id.clone());
    await_running(&c, &all).await;
    let closed = c
        .workers()
        .close_session(pb::CloseSessionRequest {
            session_id: s.id.clone(),
            grace_seconds: Some(1),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(closed.stopped.len(), 2);
    assert!(closed
        .stopped
        .iter()
        .all(|w| status(w) == pb::WorkerStatus::Stopped && w.reason == "session ended"));
    let now = list(&c).await;
    assert_eq!(status(&now[&other[0].id]), pb::WorkerStatus::Running);
    let err = c
        .workers()
        .close_session(pb::CloseSessionRequest {
            session_id: s.id,
            grace_seconds: None,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound);
    let err = c
        .workers()
        .keep_alive(pb::KeepAliveRequest {
            session_id: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(err.message().contains("session_id"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_killed_mid_session_ends_its_workers() {
    require_root!();
    let d = Daemon::start().await.unwrap();
    let c = d.client().await.unwrap();
    let ttl = ttl_secs(2);
    let s = open_session(&c, ttl).await;
    let ws = launch(
        &c,
        pb::LaunchWorkersRequest {
            session_id: s.id.clone(),
            ..command_request(1, &["/bin/sleep", "600"])
        },
    )
    .await;
    // The client: a separate process renewing the lease every 0.5 s (the CLI's --attach does the
    // same), killed with SIGKILL.
    let mut keeper = std::process::Command::new(env!("CARGO_BIN_EXE_berth-session-keeper"))
        .args([d.addr(), s.id.clone()])
        .spawn()
        .unwrap();
    tokio::time::sleep(Duration::from_secs(2 * u64::from(ttl))).await;
    let now = list(&c).await;
    assert_eq!(
        status(&now[&ws[0].id]),
        pb::WorkerStatus::Running,
        "kept alive past the TTL"
    );
    // SAFETY: kill(2) on the keeper's pid.
    unsafe { libc::kill(keeper.id() as i32, libc::SIGKILL) };
    let _ = keeper.wait();
    let t = Instant::now();
    let all = berth_tests::await_all(&c, &[ws[0].id.clone()])
        .await
        .unwrap();
    assert_eq!(status(&all[0]), pb::WorkerStatus::Stopped);
    assert_eq!(all[0].reason, "session ended");
    let bound = Duration::from_secs(u64::from(ttl)) + berth_tests::scaled(Duration::from_secs(4));
    assert!(t.elapsed() < bound, "{:?}", t.elapsed());
}

/// Every selector call by `session_id`, each as its gRPC code: List, Await, Stop, StreamOutput,
/// Watch.
async fn session_calls(c: &Client, session: &str) -> Vec<(&'static str, tonic::Code)> {
    fn code<T>(r: Result<T, tonic::Status>) -> tonic::Code {
        r.err().map_or(tonic::Code::Ok, |s| s.code())
    }
    let w = c.workers();
    let sid = || session.to_owned();
    vec![
        (
            "ListWorkers",
            code(
                w.clone()
                    .list_workers(pb::ListWorkersRequest {
                        session_id: sid(),
                        ..Default::default()
                    })
                    .await,
            ),
        ),
        (
            "AwaitWorkers",
            code(
                w.clone()
                    .await_workers(pb::AwaitWorkersRequest {
                        session_id: sid(),
                        timeout_seconds: Some(5),
                        ..Default::default()
                    })
                    .await,
            ),
        ),
        (
            "StopWorkers",
            code(
                w.clone()
                    .stop_workers(pb::StopWorkersRequest {
                        session_id: sid(),
                        grace_seconds: Some(0),
                        ..Default::default()
                    })
                    .await,
            ),
        ),
        (
            "StreamOutput",
            code(
                w.clone()
                    .stream_output(pb::StreamOutputRequest {
                        session_id: sid(),
                        from_start: true,
                        ..Default::default()
                    })
                    .await,
            ),
        ),
        (
            "WatchWorkers",
            code(
                w.clone()
                    .watch_workers(pb::WatchWorkersRequest {
                        session_id: sid(),
                        initial: true,
                        ..Default::default()
                    })
                    .await,
            ),
        ),
    ]
}

async fn session_workers(c: &Client, session: &str) -> Vec<pb::Worker> {
    c.workers()
        .list_workers(pb::ListWorkersRequest {
            session_id: session.to_owned(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .workers
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ended_session_stays_known_with_its_workers() {
    require_root!();
    let mut d = Daemon::start().await.unwrap();
    let mut c = d.client().await.unwrap();
    let s = open_session(&c, 60).await;
    let ws = launch(
        &c,
        pb::LaunchWorkersRequest {
            session_id: s.id.clone(),
            ..command_request(1, &["/bin/sh", "-c", "echo hi; exec sleep 600"])
        },
    )
    .await;
    await_running(&c, &[ws[0].id.clone()]).await;
    // One that ended without ever having workers, and one whose lease lapsed (with a worker,
    // whose stop says when the daemon saw the lease lapse).
    let empty = open_session(&c, 60).await;
    let lapsed = open_session(&c, 3).await;
    let lapsed_worker = launch(
        &c,
        pb::LaunchWorkersRequest {
            session_id: lapsed.id.clone(),
            ..command_request(1, &["sleep", "600"])
        },
    )
    .await
    .remove(0);
    c.workers()
        .close_session(pb::CloseSessionRequest {
            session_id: empty.id.clone(),
            grace_seconds: None,
        })
        .await
        .unwrap();
    c.workers()
        .close_session(pb::CloseSessionRequest {
            session_id: s.id.clone(),
            grace_seconds: Some(0),
        })
        .await
        .unwrap();
    // Until the daemon has seen the lease lapse: its worker is stopped for it.
    let deadline = Instant::now() + berth_tests::scaled(Duration::from_secs(15));
    loop {
        let w = session_workers(&c, &lapsed.id).await;
        assert_eq!(w.len(), 1, "{w:?}");
        if status(&w[0]) == pb::WorkerStatus::Stopped {
            assert_eq!(w[0].id, lapsed_worker.id);
            assert_eq!(w[0].reason, "session ended", "{w:?}");
            break;
        }
        assert!(Instant::now() < deadline, "the lease never lapsed: {w:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for round in ["before a restart", "after a restart"] {
        for id in [&s.id, &empty.id, &lapsed.id] {
            for (call, code) in session_calls(&c, id).await {
                assert_eq!(
                    code,
                    tonic::Code::Ok,
                    "{call} of ended session {id} {round}"
                );
            }
        }
        let mine = session_workers(&c, &s.id).await;
        assert_eq!(mine.len(), 1, "{round}: {mine:?}");
        assert_eq!(status(&mine[0]), pb::WorkerStatus::Stopped, "{round}");
        assert_eq!(mine[0].reason, "session ended", "{round}");
        assert!(session_workers(&c, &empty.id).await.is_empty(), "{round}");
        // Ended is ended: no renewal, no launch, no second close.
        let err = c
            .workers()
            .launch_workers(pb::LaunchWorkersRequest {
                session_id: s.id.clone(),
                ..command_request(1, &["/bin/true"])
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::NotFound, "{round}");
        for id in [&s.id, &empty.id, &lapsed.id] {
            let err = c
                .workers()
                .keep_alive(pb::KeepAliveRequest {
                    session_id: id.clone(),
                })
                .await
                .unwrap_err();
            assert_eq!(err.code(), tonic::Code::NotFound, "{round}");
        }
        if round == "before a restart" {
            drop(c);
            d.stop_daemon(libc::SIGTERM);
            d.restart(&[]).await.unwrap();
            c = d.client().await.unwrap();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ended_session_is_forgotten_with_its_workers() {
    require_root!();
    let d = Daemon::start_with(DaemonOptions {
        config: "[retention]\nfinished_seconds = 1\nsweep_seconds = 1\n".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    let c = d.client().await.unwrap();
    let s = open_session(&c, 60).await;
    let open = open_session(&c, 60).await;
    let w = launch(
        &c,
        pb::LaunchWorkersRequest {
            session_id: s.id.clone(),
            ..command_request(1, &["/bin/true"])
        },
    )
    .await
    .remove(0);
    berth_tests::await_all(&c, &[w.id.clone()]).await.unwrap();
    c.workers()
        .close_session(pb::CloseSessionRequest {
            session_id: s.id.clone(),
            grace_seconds: None,
        })
        .await
        .unwrap();
    let deadline = Instant::now() + berth_tests::scaled(Duration::from_secs(15));
    loop {
        let r = c
            .workers()
            .list_workers(pb::ListWorkersRequest {
                session_id: s.id.clone(),
                ..Default::default()
            })
            .await;
        match r {
            Err(e) => {
                assert_eq!(e.code(), tonic::Code::NotFound, "{e:?}");
                assert!(e.message().contains("session_id"), "{e:?}");
                break;
            }
            Ok(_) => {
                assert!(Instant::now() < deadline, "ended session still known");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
    for (call, code) in session_calls(&c, &s.id).await {
        assert_eq!(code, tonic::Code::NotFound, "{call}");
    }
    // An open session is never forgotten, with or without workers.
    assert!(session_workers(&c, &open.id).await.is_empty());
}

/// Asserts created_at ≤ started_at ≤ finished_at of an ended worker.
#[track_caller]
fn assert_in_order(w: &pb::Worker) {
    let times = [&w.created_at, &w.started_at, &w.finished_at].map(|t| {
        let t = t.as_ref().unwrap_or_else(|| panic!("time missing: {w:?}"));
        (t.seconds, t.nanos)
    });
    let [c, s, f] = times;
    assert!(c <= s && s <= f, "times out of order: {w:?}");
}

/// Runs the kill-and-restart scenario with `signal` (SIGKILL: crash; SIGTERM: graceful).
async fn restart_loses_nothing(signal: i32) {
    let mut d = Daemon::start().await.unwrap();
    let c = d.client().await.unwrap();
    // A printer that outlives the downtime, one that exits 7 during it, one that ends before.
    let long = launch(&c, printer(40, 100)).await.remove(0);
    let seven = launch(
        &c,
        command_request(1, &["/bin/sh", "-c", "echo bye; sleep 1; exit 7"]),
    )
    .await
    .remove(0);
    let quick = launch(&c, command_request(1, &["/bin/sh", "-c", "echo quick"]))
        .await
        .remove(0);
    await_running(&c, &[long.id.clone(), seven.id.clone()]).await;
    berth_tests::await_all(&c, &[quick.id.clone()])
        .await
        .unwrap();
    let before = list(&c).await;
    let long_pid = before[&long.id].pid;
    assert!(long_pid > 0);
    drop(c);
    let zygotes = berth_tests::children_named(d.pid().unwrap(), "berth-zygote");
    assert!(!zygotes.is_empty());
    let seven_shim = berth_tests::parent_of(before[&seven.id].pid).expect("shim of `seven`");
    d.stop_daemon(signal);
    // The daemon's zygotes end with it; the shims they forked go on (the long worker below).
    // `seven` ends while the daemon is down: its shim records the exit and leaves.
    let gone = |p: u32| {
        let state = std::fs::read_to_string(format!("/proc/{p}/stat")).unwrap_or_default();
        state.is_empty() || state.contains(") Z ")
    };
    let deadline = Instant::now() + berth_tests::scaled(Duration::from_secs(10));
    while !(zygotes.iter().all(|z| gone(*z)) && gone(seven_shim)) {
        assert!(
            Instant::now() < deadline,
            "zygotes {zygotes:?} outlived their daemon, or the shim {seven_shim} of `seven` \
             never ended"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        !gone(before[&long.id].pid),
        "the long worker ended during the downtime"
    );
    d.restart(&[]).await.unwrap();
    let c = d.client().await.unwrap();
    let after = list(&c).await;
    assert_eq!(
        status(&after[&long.id]),
        pb::WorkerStatus::Running,
        "{:?}",
        after[&long.id]
    );
    assert_eq!(after[&long.id].pid, long_pid, "same process, re-adopted");
    // Start times are the shims' own, kept across the restart; ends never come before them.
    for w in [&long, &seven] {
        assert_eq!(
            after[&w.id].started_at, before[&w.id].started_at,
            "{:?}",
            after[&w.id]
        );
    }
    assert_in_order(&after[&seven.id]);
    assert_in_order(&after[&quick.id]);
    assert_eq!(
        status(&after[&seven.id]),
        pb::WorkerStatus::Failed,
        "{:?}",
        after[&seven.id]
    );
    assert_eq!(after[&seven.id].exit_code, Some(7));
    assert_eq!(status(&after[&quick.id]), pb::WorkerStatus::Succeeded);
    let done = berth_tests::await_all(&c, &[long.id.clone()])
        .await
        .unwrap();
    assert_eq!(
        status(&done[0]),
        pb::WorkerStatus::Succeeded,
        "{:?}",
        done[0]
    );
    assert_eq!(done[0].started_at, before[&long.id].started_at);
    assert_in_order(&done[0]);
    let out = berth_tests::output_of(&c, &long.id, pb::Stream::Stdout)
        .await
        .unwrap();
    assert_eq!(out, expected_lines(40), "every line exactly once");
    assert_eq!(
        berth_tests::output_of(&c, &seven.id, pb::Stream::Stdout)
            .await
            .unwrap(),
        b"bye\n"
    );
    assert!(
        d.worker_cgroups().is_empty(),
        "cgroups left: {:?}",
        d.worker_cgroups()
    );
    let info = c
        .host()
        .get_host_info(pb::GetHostInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.allocated.unwrap().workers, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn daemon_killed_with_sigkill_loses_nothing() {
    require_root!();
    restart_loses_nothing(libc::SIGKILL).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_restart_loses_nothing() {
    require_root!();
    restart_loses_nothing(libc::SIGTERM).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_lease_keeps_counting_across_a_restart() {
    require_root!();
    let mut d = Daemon::start().await.unwrap();
    let c = d.client().await.unwrap();
    // The lease must outlast the kill and the restart, which take long on a slow machine.
    let s = open_session(&c, scaled(Duration::from_secs(5)).as_secs() as u32).await;
    let w = launch(
        &c,
        pb::LaunchWorkersRequest {
            session_id: s.id.clone(),
            ..command_request(1, &["/bin/sleep", "600"])
        },
    )
    .await
    .remove(0);
    await_running(&c, &[w.id.clone()]).await;
    // Renewed just before the crash: the whole TTL is left for the downtime.
    c.workers()
        .keep_alive(pb::KeepAliveRequest {
            session_id: s.id.clone(),
        })
        .await
        .unwrap();
    drop(c);
    d.stop_daemon(libc::SIGKILL);
    tokio::time::sleep(Duration::from_secs(1)).await;
    d.restart(&[]).await.unwrap();
    let c = d.client().await.unwrap();
    // Still the same session, still alive, renewable.
    c.workers()
        .keep_alive(pb::KeepAliveRequest {
            session_id: s.id.clone(),
        })
        .await
        .unwrap();
    let all = berth_tests::await_all(&c, &[w.id.clone()]).await.unwrap();
    assert_eq!(status(&all[0]), pb::WorkerStatus::Stopped);
    assert_eq!(all[0].reason, "session ended");
}

/// Kills the daemon, damages its store with `damage`, restarts: live workers must still be there.
async fn survives_store_damage(
    damage: impl FnOnce(&std::path::Path),
) -> (Daemon, Client, String, u32) {
    let mut d = Daemon::start().await.unwrap();
    let c = d.client().await.unwrap();
    let w = launch(&c, printer(30, 100)).await.remove(0);
    await_running(&c, &[w.id.clone()]).await;
    let pid = list(&c).await[&w.id].pid;
    drop(c);
    d.stop_daemon(libc::SIGKILL);
    damage(&d.state_dir().join("state.redb"));
    d.restart(&[]).await.unwrap();
    let c = d.client().await.unwrap();
    (d, c, w.id, pid)
}

/// Whether process `pid` is alive.
fn alive(pid: u32) -> bool {
    // SAFETY: kill(pid, 0) only checks existence.
    unsafe { libc::kill(pid as i32, 0) == 0 }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_berthd_on_the_same_state_dir_refuses_and_the_first_serves_on() {
    require_root!();
    let d = Daemon::start().await.unwrap();
    let c = d.client().await.unwrap();
    let w = launch(&c, command_request(1, &["/bin/sleep", "600"]))
        .await
        .remove(0);
    await_running(&c, &[w.id.clone()]).await;
    let pid = list(&c).await[&w.id].pid;
    let cgroups = d.worker_cgroups();
    let store = std::fs::read(d.state_dir().join("state.redb")).unwrap();

    // Same config: same state dir, same socket, same cgroup subtree.
    let (code, out) = d.run_another(&[]).await.unwrap();
    assert_eq!(code, Some(1), "refused at once:\n{out}");
    let said = format!(
        "state dir {} is in use by berthd pid {}",
        d.state_dir().display(),
        d.pid().unwrap()
    );
    assert!(out.contains(&said), "says whose it is: {said:?}\n{out}");
    // It stopped before cgroups, the store or sockets: it touched nothing of the first's.
    for later in [
        "cgroups ready",
        "state store",
        "listening",
        "recovered state",
    ] {
        assert!(!out.contains(later), "went as far as {later:?}:\n{out}");
    }
    // --recover too is refused: it must never move a store that another daemon has open.
    let (code, out) = d.run_another(&["--recover"]).await.unwrap();
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains(&said), "{out}");
    assert_eq!(
        std::fs::read(d.state_dir().join("state.redb")).unwrap(),
        store,
        "the store is the first's, untouched"
    );

    // The first serves on: its socket, its worker, new launches.
    let c = d.client().await.unwrap();
    let now = list(&c).await;
    assert_eq!(status(&now[&w.id]), pb::WorkerStatus::Running);
    assert_eq!(now[&w.id].pid, pid);
    assert!(alive(pid));
    assert_eq!(d.worker_cgroups(), cgroups);
    let more = launch(&c, command_request(1, &["/bin/true"])).await;
    let done = berth_tests::await_all(&c, &berth_tests::ids_of(&more))
        .await
        .unwrap();
    assert_eq!(status(&done[0]), pb::WorkerStatus::Succeeded);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_store_stops_start_up_until_recover_takes_the_workers_over() {
    require_root!();
    let mut d = Daemon::start().await.unwrap();
    let c = d.client().await.unwrap();
    // One that prints across the downtime, one in a session, one whose spec will be lost too.
    let plain = launch(&c, printer(60, 100)).await.remove(0);
    let s = open_session(&c, ttl_secs(60)).await;
    let sessioned = launch(
        &c,
        pb::LaunchWorkersRequest {
            session_id: s.id.clone(),
            ..command_request(1, &["/bin/sleep", "600"])
        },
    )
    .await
    .remove(0);
    let nameless = launch(&c, command_request(1, &["/bin/sleep", "600"]))
        .await
        .remove(0);
    let ids = [plain.id.clone(), sessioned.id.clone(), nameless.id.clone()];
    await_running(&c, &ids).await;
    let before = list(&c).await;
    drop(c);
    d.stop_daemon(libc::SIGKILL);
    let store = d.state_dir().join("state.redb");
    let garbage = vec![0xa5u8; 64 * 1024];
    std::fs::write(&store, &garbage).unwrap();
    std::fs::remove_file(
        d.state_dir()
            .join("workers")
            .join(&nameless.id)
            .join("spec.json"),
    )
    .unwrap();

    // Start-up stops, says why and what to do, and touches nothing.
    let err = d.restart(&[]).await.unwrap_err().to_string();
    assert!(err.contains("is corrupt"), "{err}");
    assert!(err.contains("berthd --recover"), "{err}");
    assert_eq!(std::fs::read(&store).unwrap(), garbage, "left as it was");
    for id in &ids {
        assert!(
            alive(before[id].pid),
            "worker {id} killed by a refused start"
        );
    }

    d.restart(&["--recover".into()]).await.unwrap();
    let c = d.client().await.unwrap();
    let moved: Vec<String> = std::fs::read_dir(d.state_dir())
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| n.starts_with("state.corrupt-"))
        .collect();
    assert_eq!(moved.len(), 1, "the damaged store is kept aside");
    let now = list(&c).await;
    for w in [&plain, &sessioned] {
        assert_eq!(
            status(&now[&w.id]),
            pb::WorkerStatus::Running,
            "{:?}",
            now[&w.id]
        );
        assert_eq!(
            now[&w.id].pid, before[&w.id].pid,
            "the same process, adopted"
        );
        assert_eq!(now[&w.id].owner, before[&w.id].owner);
    }
    assert_eq!(now[&sessioned.id].session_id, s.id);
    let log = d.log();
    assert!(
        log.contains("--recover: worker adopted from its spec"),
        "each is logged"
    );
    // The session is back, with a lease its client renews, and ends as sessions do.
    c.workers()
        .keep_alive(pb::KeepAliveRequest {
            session_id: s.id.clone(),
        })
        .await
        .unwrap();
    let closed = c
        .workers()
        .close_session(pb::CloseSessionRequest {
            session_id: s.id.clone(),
            grace_seconds: Some(1),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(closed.stopped.len(), 1);
    assert_eq!(status(&closed.stopped[0]), pb::WorkerStatus::Stopped);
    // The worker nothing accounts for (no record, no spec: no owner, no session) is stopped.
    let gone = berth_tests::await_all(&c, &[nameless.id.clone()])
        .await
        .unwrap()
        .remove(0);
    assert_eq!(status(&gone), pb::WorkerStatus::Stopped, "{gone:?}");
    assert!(gone.reason.starts_with("unaccounted for"), "{gone:?}");
    assert!(!alive(before[&nameless.id].pid));
    // Nothing of the plain worker's output was lost.
    let done = berth_tests::await_all(&c, &[plain.id.clone()])
        .await
        .unwrap();
    assert_eq!(status(&done[0]), pb::WorkerStatus::Succeeded);
    assert_eq!(
        berth_tests::output_of(&c, &plain.id, pb::Stream::Stdout)
            .await
            .unwrap(),
        expected_lines(60)
    );
    // And the new store is the store from now on: a plain restart opens it.
    drop(c);
    d.stop_daemon(libc::SIGTERM);
    d.restart(&[]).await.unwrap();
    let c = d.client().await.unwrap();
    let now = list(&c).await;
    assert_eq!(status(&now[&plain.id]), pb::WorkerStatus::Succeeded);
}

/// One launch into a full state dir, as the client heard of it.
#[derive(Debug)]
enum Told {
    Launched(Vec<pb::Worker>),
    Refused(tonic::Status),
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_state_dir_refuses_launches_clearly_and_keeps_what_it_told() {
    require_root!();
    let mut d = Daemon::start_with(DaemonOptions {
        state_tmpfs: Some(2 << 20),
        netns_pool: Some(0),
        ..Default::default()
    })
    .await
    .unwrap();
    let c = d.client().await.unwrap();
    let tiny = |i: usize| pb::LaunchWorkersRequest {
        cpu: 0.01,
        memory_gb: 0.01,
        labels: [("try".to_string(), i.to_string())].into(),
        ..command_request(1, &["/bin/sleep", "600"])
    };
    let first = launch(&c, tiny(0)).await;
    let filler = d.state_dir().join("filler");
    let filled = berth_tests::fill_filesystem(&filler).unwrap();
    assert!(filled > 0);

    let mut told = Vec::new();
    for i in 1..=40 {
        let t = match c.workers().launch_workers(tiny(i)).await {
            Ok(r) => Told::Launched(r.into_inner().workers),
            Err(st) => {
                assert_eq!(st.code(), tonic::Code::Unavailable, "{st:?}");
                assert!(
                    st.message().contains("not recorded in the state store")
                        && st.message().contains("No space left on device"),
                    "says why: {}",
                    st.message()
                );
                Told::Refused(st)
            }
        };
        told.push((i, t));
    }
    let refused = told
        .iter()
        .filter(|(_, t)| matches!(t, Told::Refused(_)))
        .count();
    assert!(refused > 0, "a full state dir refused nothing: {told:?}");
    let failed_to_start = told
        .iter()
        .filter_map(|(_, t)| match t {
            Told::Launched(ws) => Some(ws),
            Told::Refused(_) => None,
        })
        .flatten()
        .filter(|w| status(w) == pb::WorkerStatus::Failed)
        .count();
    eprintln!(
        "full state dir: {refused} launches refused, {} launched ({failed_to_start} workers did \
         not start)",
        told.len() - refused
    );
    // The daemon serves on while full.
    assert!(!list(&c).await.is_empty());

    drop(c);
    d.stop_daemon(libc::SIGKILL);
    // A restart on the still full filesystem either comes up or says why it cannot.
    if let Err(e) = d.restart(&[]).await {
        let e = e.to_string();
        assert!(e.contains("No space left on device"), "{e}");
        eprintln!("full state dir: the restart stopped, saying why");
        std::fs::remove_file(&filler).unwrap();
        d.restart(&[]).await.unwrap();
    } else {
        std::fs::remove_file(&filler).unwrap();
    }
    let c = d.client().await.unwrap();
    let now = list(&c).await;
    let mut expected = 1;
    assert!(now.contains_key(&first[0].id));
    for (i, t) in &told {
        let with_label: Vec<&pb::Worker> = now
            .values()
            .filter(|w| w.labels.get("try") == Some(&i.to_string()))
            .collect();
        match t {
            Told::Refused(st) => {
                assert!(
                    with_label.is_empty(),
                    "launch {i} was refused ({st:?}) yet exists"
                )
            }
            Told::Launched(ws) => {
                expected += ws.len();
                for w in ws {
                    let after = now
                        .get(&w.id)
                        .unwrap_or_else(|| panic!("launch {i} was told {w:?}: lost"));
                    if status(w) != pb::WorkerStatus::Pending
                        && status(w) != pb::WorkerStatus::Starting
                        && status(w) != pb::WorkerStatus::Running
                    {
                        assert!(
                            !matches!(
                                status(after),
                                pb::WorkerStatus::Pending
                                    | pb::WorkerStatus::Starting
                                    | pb::WorkerStatus::Running
                            ),
                            "told ended, now {after:?}"
                        );
                    }
                }
            }
        }
    }
    assert_eq!(
        now.len(),
        expected,
        "nothing more than what was told: {now:?}"
    );
    // With room again, launches are recorded again.
    let more = launch(&c, tiny(99)).await;
    await_running(&c, &berth_tests::ids_of(&more)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_store_and_spec_lists_the_worker_as_unaccounted() {
    require_root!();
    let (d, c, id, pid) = survives_store_damage(|p| {
        std::fs::remove_file(p).unwrap();
    })
    .await;
    let now = list(&c).await;
    assert_eq!(status(&now[&id]), pb::WorkerStatus::Running);
    assert_eq!(now[&id].pid, pid);
    // Now lose the worker's own spec as well: the daemon cannot account for it, but lists it.
    let spec = d.state_dir().join("workers").join(&id).join("spec.json");
    let mut d = d;
    drop(c);
    d.stop_daemon(libc::SIGKILL);
    std::fs::remove_file(d.state_dir().join("state.redb")).unwrap();
    std::fs::remove_file(&spec).unwrap();
    d.restart(&[]).await.unwrap();
    let c = d.client().await.unwrap();
    let now = list(&c).await;
    let w = now.get(&id).expect("the live worker is listed");
    assert!(w.reason.starts_with("unaccounted for"), "{w:?}");
    assert_eq!(status(w), pb::WorkerStatus::Running);
    let stopped = c
        .workers()
        .stop_workers(pb::StopWorkersRequest {
            ids: vec![id.clone()],
            grace_seconds: Some(1),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(status(&stopped.workers[0]), pb::WorkerStatus::Stopped);
    // SAFETY: kill(pid, 0) only checks existence.
    assert_ne!(
        // SAFETY: kill(pid, 0) only checks existence.
        unsafe { libc::kill(pid as i32, 0) },
        0,
        "the process is gone"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_failure_restarts_with_backoff_then_gives_up() {
    require_root!();
    let d = Daemon::start().await.unwrap();
    let c = d.client().await.unwrap();
    let w = launch(
        &c,
        pb::LaunchWorkersRequest {
            restart: Some(pb::RestartPolicy {
                mode: pb::restart_policy::Mode::OnFailure as i32,
                max_restarts: 2,
                backoff_initial_ms: 100,
                backoff_max_ms: 1000,
            }),
            ..command_request(1, &["/bin/sh", "-c", "echo run; exit 3"])
        },
    )
    .await
    .remove(0);
    let t = Instant::now();
    let all = berth_tests::await_all(&c, &[w.id.clone()]).await.unwrap();
    assert_eq!(status(&all[0]), pb::WorkerStatus::Failed, "{:?}", all[0]);
    assert_eq!(all[0].restarts, 2);
    assert_eq!(all[0].exit_code, Some(3));
    // Back-off: 100 ms then 200 ms.
    assert!(
        t.elapsed() >= Duration::from_millis(300),
        "{:?}",
        t.elapsed()
    );
    let out = berth_tests::output_of(&c, &w.id, pb::Stream::Stdout)
        .await
        .unwrap();
    assert_eq!(out, b"run\nrun\nrun\n", "three runs, one output stream");
    // A worker that succeeds is not restarted; a stopped one neither.
    let ok = launch(
        &c,
        pb::LaunchWorkersRequest {
            restart: Some(pb::RestartPolicy {
                mode: pb::restart_policy::Mode::OnFailure as i32,
                max_restarts: 5,
                ..Default::default()
            }),
            ..command_request(1, &["/bin/true"])
        },
    )
    .await
    .remove(0);
    let all = berth_tests::await_all(&c, &[ok.id.clone()]).await.unwrap();
    assert_eq!(
        (status(&all[0]), all[0].restarts),
        (pb::WorkerStatus::Succeeded, 0)
    );
    assert!(d.worker_cgroups().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ended_workers_are_forgotten_past_retention() {
    require_root!();
    let d = Daemon::start_with(DaemonOptions {
        config: "[retention]\nmax_finished = 2\nsweep_seconds = 1\n".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    let c = d.client().await.unwrap();
    let ws = launch(&c, command_request(5, &["/bin/sh", "-c", "echo x"])).await;
    assert_eq!(ws.len(), 5);
    // No AwaitWorkers on the five: the sweep may forget the first to end before a slow machine
    // gets to ask. Two kept means all five have ended (two ended ones are kept, live ones are
    // never forgotten); the files of the other three go right after their records.
    let dirs = || {
        std::fs::read_dir(d.state_dir().join("workers"))
            .unwrap()
            .count()
    };
    let deadline = Instant::now() + scaled(Duration::from_secs(10));
    loop {
        let kept = list(&c).await;
        if kept.len() <= 2 && dirs() <= 2 {
            assert_eq!(kept.len(), 2, "{kept:?}");
            for w in kept.values() {
                assert_eq!(status(w), pb::WorkerStatus::Succeeded, "{w:?}");
            }
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{} ended workers still kept, {} worker directories",
            kept.len(),
            dirs()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(dirs(), 2, "files of forgotten workers are removed");
}

/// README: records are written before the client hears success. A daemon killed (SIGKILL) the
/// moment an `OpenSession`, a launch or a stop has answered knows each of them after a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_was_answered_survives_a_crash_right_after_the_answer() {
    require_root!();
    let mut d = Daemon::start().await.unwrap();
    let c = d.client().await.unwrap();
    let session = open_session(&c, ttl_secs(60)).await;
    drop(c);
    d.stop_daemon(libc::SIGKILL);
    d.restart(&[]).await.unwrap();
    let c = d.client().await.unwrap();
    c.workers()
        .keep_alive(pb::KeepAliveRequest {
            session_id: session.id.clone(),
        })
        .await
        .expect("the session opened just before the crash");

    let ws = launch(
        &c,
        pb::LaunchWorkersRequest {
            session_id: session.id.clone(),
            ..command_request(3, &["sleep", "600"])
        },
    )
    .await;
    drop(c);
    d.stop_daemon(libc::SIGKILL);
    d.restart(&[]).await.unwrap();
    let c = d.client().await.unwrap();
    let ids: Vec<String> = ws.iter().map(|w| w.id.clone()).collect();
    let known = c
        .workers()
        .list_workers(pb::ListWorkersRequest {
            ids: ids.clone(),
            ..Default::default()
        })
        .await
        .expect("the workers launched just before the crash")
        .into_inner()
        .workers;
    assert_eq!(known.len(), 3, "{known:?}");
    assert!(
        known.iter().all(|w| w.session_id == session.id),
        "{known:?}"
    );

    let stopped = c
        .workers()
        .stop_workers(pb::StopWorkersRequest {
            ids: ids.clone(),
            grace_seconds: Some(0),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .workers;
    drop(c);
    d.stop_daemon(libc::SIGKILL);
    d.restart(&[]).await.unwrap();
    let c = d.client().await.unwrap();
    let after = list(&c).await;
    for w in &stopped {
        assert_eq!(after[&w.id].status, w.status, "{:?}", after[&w.id]);
        assert_eq!(after[&w.id].reason, w.reason, "{:?}", after[&w.id]);
        assert_eq!(
            after[&w.id].finished_at, w.finished_at,
            "{:?}",
            after[&w.id]
        );
    }
}

/// README: at start-up a shim is recognised by its pid *and* its start time. A worker whose shim
/// and process were killed while berthd was down, and whose shim's pid another process took
/// meanwhile (pid reuse), is LOST with "exit status unknown", not adopted through the stranger.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_process_that_took_a_dead_shims_pid_is_not_taken_for_it() {
    require_root!();
    let mut d = Daemon::start().await.unwrap();
    let c = d.client().await.unwrap();
    let w = launch(&c, command_request(1, &["sleep", "600"]))
        .await
        .remove(0);
    let w = await_running(&c, std::slice::from_ref(&w.id))
        .await
        .remove(0);
    let shim = berth_tests::parent_of(w.pid).expect("the worker's shim");
    drop(c);
    d.stop_daemon(libc::SIGKILL);
    // The shim first: killed after its worker, it may see the worker's end and write its exit
    // record first (a CI run in the slow cgroup-v2 guest did), and the worker is then rightly
    // reported as killed, not lost.
    for p in [shim, w.pid] {
        // SAFETY: kill(2) with integers.
        unsafe { libc::kill(p as i32, libc::SIGKILL) };
    }
    let deadline = Instant::now() + scaled(Duration::from_secs(10));
    while std::path::Path::new(&format!("/proc/{shim}")).exists() {
        if Instant::now() > deadline {
            berth_tests::cannot_run(&format!("shim {shim} was never reaped (no reaping init)"));
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Take the shim's pid: the next pid the kernel gives is ns_last_pid + 1 (other processes
    // of the machine may race for it: try again).
    let mut impostor = None;
    for _ in 0..200 {
        let _ = std::fs::write("/proc/sys/kernel/ns_last_pid", (shim - 1).to_string());
        let mut child = std::process::Command::new("sleep")
            .arg("600")
            .spawn()
            .unwrap();
        if child.id() == shim {
            impostor = Some(child);
            break;
        }
        let _ = child.kill();
        let _ = child.wait();
    }
    let Some(mut impostor) = impostor else {
        berth_tests::cannot_run(&format!("pid {shim} could not be taken again"));
        return;
    };
    d.restart(&[]).await.unwrap();
    let c = d.client().await.unwrap();
    let after = list(&c).await;
    let _ = impostor.kill();
    let _ = impostor.wait();
    let w = &after[&w.id];
    assert_eq!(status(w), pb::WorkerStatus::Lost, "{w:?}");
    assert!(w.reason.contains("exit status unknown"), "{w:?}");
}
