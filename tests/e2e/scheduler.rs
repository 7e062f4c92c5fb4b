//! A real berth-scheduler with three real berthd hosts on this machine (distinct ports, state
//! dirs, bridges and subnets): placement over hosts, refusal of what cannot fit, the union of
//! the hosts' workers, sessions over hosts, a host killed and returning, a scheduler restarted.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use berth_tests::cluster::{start_host, start_host_with, SchedulerNode};
use berth_tests::{
    await_running, command_request, ids_of, launch, output_of, pb, require_root, scaled, Client,
    Daemon,
};

/// A scheduler and three hosts of 2 cores and 2 GiB each, all READY.
async fn three_hosts() -> (SchedulerNode, Vec<Daemon>) {
    let s = SchedulerNode::start().await.unwrap();
    let mut hosts = Vec::new();
    for _ in 0..3 {
        hosts.push(start_host(&s, 2.0, 2.0).await.unwrap());
    }
    let names: Vec<&str> = hosts.iter().map(|h| h.name.as_str()).collect();
    s.wait_hosts(&names, pb::HostState::Ready).await.unwrap();
    (s, hosts)
}

fn sleepers(n: u32) -> pb::LaunchWorkersRequest {
    pb::LaunchWorkersRequest {
        cpu: 1.0,
        memory_gb: 0.25,
        ..command_request(n, &["sleep", "600"])
    }
}

/// (id → (host, status)) of what `c` lists.
async fn listing(c: &Client) -> BTreeMap<String, (String, i32)> {
    berth_tests::list_all(c)
        .await
        .into_iter()
        .map(|w| (w.id, (w.host, w.status)))
        .collect()
}

/// The same, read from every host directly.
async fn union_of(hosts: &[Daemon]) -> BTreeMap<String, (String, i32)> {
    let mut out = BTreeMap::new();
    for h in hosts {
        out.extend(listing(&h.client().await.unwrap()).await);
    }
    out
}

/// Polls until the scheduler lists what the hosts hold (its view follows their events).
async fn until_union(c: &Client, hosts: &[Daemon]) -> BTreeMap<String, (String, i32)> {
    let deadline = Instant::now() + scaled(Duration::from_secs(15));
    loop {
        let (mine, theirs) = (listing(c).await, union_of(hosts).await);
        if mine == theirs {
            return mine;
        }
        assert!(
            Instant::now() < deadline,
            "scheduler lists {mine:#?}\nhosts hold {theirs:#?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_launch_spans_hosts_and_the_listing_is_their_union() {
    require_root!();
    let (s, hosts) = three_hosts().await;
    let c = s.client().await.unwrap();
    // Four one-core workers on two-core hosts: bin-packing fills two hosts.
    let ws = launch(&c, sleepers(4)).await;
    assert_eq!(ws.len(), 4);
    let used: BTreeSet<String> = ws.iter().map(|w| w.host.clone()).collect();
    assert_eq!(used.len(), 2, "{ws:#?}");
    let running = await_running(&c, &ids_of(&ws)).await;
    assert!(running.iter().all(|w| !w.ip_address.is_empty()));
    let both = until_union(&c, &hosts).await;
    assert_eq!(both.len(), 4);

    // Output and completion through the scheduler, from whichever host ran it.
    let echo = launch(
        &c,
        pb::LaunchWorkersRequest {
            cpu: 0.5,
            ..command_request(1, &["sh", "-c", "echo from $BERTH_WORKER_ID"])
        },
    )
    .await
    .remove(0);
    let out = output_of(&c, &echo.id, pb::Stream::Stdout).await.unwrap();
    assert_eq!(out, format!("from {}\n", echo.id).into_bytes());
    let done = c
        .workers()
        .await_workers(pb::AwaitWorkersRequest {
            ids: vec![echo.id.clone()],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(done.workers.len(), 1, "{done:?}");

    let stopped = c
        .workers()
        .stop_workers(pb::StopWorkersRequest {
            all: true,
            grace_seconds: Some(0),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .workers;
    assert!(stopped
        .iter()
        .all(|w| w.status != pb::WorkerStatus::Running as i32));
    until_union(&c, &hosts).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_launch_that_cannot_fit_is_refused_whole() {
    require_root!();
    let (s, hosts) = three_hosts().await;
    let c = s.client().await.unwrap();
    let err = c.workers().launch_workers(sleepers(7)).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::ResourceExhausted, "{err:?}");
    assert!(err.message().contains("cpu"), "{}", err.message());
    assert!(
        union_of(&hosts).await.is_empty(),
        "nothing started anywhere"
    );
    // Constraints no host carries.
    let mut req = sleepers(1);
    req.constraints.insert("gpu".into(), "h100".into());
    let err = c.workers().launch_workers(req).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::ResourceExhausted, "{err:?}");
    // Bad input is refused by the scheduler as a host would, naming the field.
    let err = c
        .workers()
        .launch_workers(pb::LaunchWorkersRequest {
            cpu: -1.0,
            ..sleepers(1)
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(err.message().starts_with("cpu"), "{}", err.message());
    // Six fit exactly.
    assert_eq!(launch(&c, sleepers(6)).await.len(), 6);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_on_the_scheduler_ends_workers_on_every_host() {
    require_root!();
    let (s, hosts) = three_hosts().await;
    let c = s.client().await.unwrap();
    let session = berth_tests::open_session(&c, 60).await;
    let ws = launch(
        &c,
        pb::LaunchWorkersRequest {
            session_id: session.id.clone(),
            ..sleepers(5)
        },
    )
    .await;
    let used: BTreeSet<String> = ws.iter().map(|w| w.host.clone()).collect();
    assert_eq!(used.len(), 3);
    await_running(&c, &ids_of(&ws)).await;
    c.workers()
        .keep_alive(pb::KeepAliveRequest {
            session_id: session.id.clone(),
        })
        .await
        .unwrap();
    berth_tests::close_session(&c, &session.id, 1).await;
    for h in &hosts {
        for (id, (_, status)) in listing(&h.client().await.unwrap()).await {
            assert_eq!(
                status,
                pb::WorkerStatus::Stopped as i32,
                "{id} on {}",
                h.name
            );
        }
    }
    let err = c
        .workers()
        .launch_workers(pb::LaunchWorkersRequest {
            session_id: session.id.clone(),
            ..sleepers(1)
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_host_goes_down_its_workers_lost_and_its_return_reconciles() {
    require_root!();
    let (s, mut hosts) = three_hosts().await;
    let c = s.client().await.unwrap();
    let ws = launch(&c, sleepers(2)).await;
    let ws = await_running(&c, &ids_of(&ws)).await;
    let victim = hosts
        .iter()
        .position(|h| h.name == ws[0].host)
        .expect("placed on a test host");
    let before = until_union(&c, &hosts).await;
    hosts[victim].stop_daemon(libc::SIGKILL);
    s.wait_hosts(&[hosts[victim].name.as_str()], pb::HostState::Down)
        .await
        .unwrap();
    let deadline = Instant::now() + scaled(Duration::from_secs(15));
    loop {
        let l = c
            .workers()
            .list_workers(pb::ListWorkersRequest {
                ids: ids_of(&ws),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .workers;
        if l.iter()
            .all(|w| w.status == pb::WorkerStatus::Lost as i32 && w.reason == "host lost")
        {
            break;
        }
        assert!(Instant::now() < deadline, "not LOST: {l:#?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Nothing is placed on the DOWN host meanwhile.
    let other = launch(&c, sleepers(1)).await.remove(0);
    assert_ne!(other.host, hosts[victim].name);

    // It comes back: its workers ran on under their shims and are RUNNING again, same pids.
    hosts[victim].restart(&[]).await.unwrap();
    s.wait_hosts(&[hosts[victim].name.as_str()], pb::HostState::Ready)
        .await
        .unwrap();
    let after = until_union(&c, &hosts).await;
    for w in &ws {
        assert_eq!(after[&w.id].1, pb::WorkerStatus::Running as i32);
    }
    assert_eq!(after.len(), before.len() + 1, "no worker runs twice");
    let again = await_running(&c, &ids_of(&ws)).await;
    for (a, b) in again.iter().zip(&ws) {
        assert_eq!(a.pid, b.pid);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_scheduler_rebuilds_the_same_view() {
    require_root!();
    let (mut s, hosts) = three_hosts().await;
    let c = s.client().await.unwrap();
    let ws = launch(&c, sleepers(5)).await;
    await_running(&c, &ids_of(&ws)).await;
    // Drain the host that has a core left (two hosts are full): the drain is then the only
    // thing that keeps the next worker off it.
    let roomy = hosts
        .iter()
        .position(|h| ws.iter().filter(|w| w.host == h.name).count() == 1)
        .expect("a host with one worker");
    let hosts: Vec<Daemon> = {
        let mut hosts = hosts;
        hosts.swap(0, roomy);
        hosts
    };
    c.cluster()
        .drain_host(pb::DrainHostRequest {
            name: hosts[0].name.clone(),
        })
        .await
        .unwrap();
    let before = until_union(&c, &hosts).await;
    s.stop(libc::SIGKILL);
    s.restart().await.unwrap();
    let c = s.client().await.unwrap();
    s.wait_hosts(&[&hosts[1].name, &hosts[2].name], pb::HostState::Ready)
        .await
        .unwrap();
    s.wait_hosts(&[&hosts[0].name], pb::HostState::Draining)
        .await
        .unwrap();
    let after = until_union(&c, &hosts).await;
    assert_eq!(after, before);
    // The drain outlived the restart: the one free core is on the drained host, so a one-core
    // worker fits nowhere.
    let err = c.workers().launch_workers(sleepers(1)).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::ResourceExhausted, "{err:?}");
    assert_eq!(union_of(&hosts).await, after, "nothing started anywhere");
    // Undrained, the host takes it.
    c.cluster()
        .undrain_host(pb::UndrainHostRequest {
            name: hosts[0].name.clone(),
        })
        .await
        .unwrap();
    s.wait_hosts(&[&hosts[0].name], pb::HostState::Ready)
        .await
        .unwrap();
    let w = launch(&c, sleepers(1)).await.remove(0);
    assert_eq!(w.host, hosts[0].name);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn berth_hosts_drain_and_undrain_show_the_cluster() {
    require_root!();
    let (s, hosts) = three_hosts().await;
    let berth = |args: &[&str]| {
        std::process::Command::new(berth_tests::bin("berth"))
            .args(["--addr", &s.addr])
            .args(args)
            .output()
            .unwrap()
    };
    let line_of = |text: &str, name: &str| {
        text.lines()
            .find(|l| l.contains(name))
            .unwrap_or_else(|| panic!("{name} missing from:\n{text}"))
            .to_owned()
    };
    let out = berth(&["hosts"]);
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    for h in &hosts {
        assert!(line_of(&text, &h.name).contains("ready"), "{text}");
    }
    let out = berth(&["drain", &hosts[1].name]);
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        line_of(&text, &hosts[1].name).contains("draining"),
        "{text}"
    );
    let out = berth(&["--json", "hosts"]);
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let states: Vec<(String, String)> = doc["hosts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| {
            (
                h["info"]["name"].as_str().unwrap().to_owned(),
                h["state"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    assert!(
        states.contains(&(hosts[1].name.clone(), "HOST_STATE_DRAINING".into())),
        "{states:?}"
    );
    // The drain is what the placement sees, not only what `hosts` shows: four one-core workers
    // fill the two other hosts, and a fifth fits nowhere.
    let c = s.client().await.unwrap();
    let ws = launch(&c, sleepers(4)).await;
    assert!(ws.iter().all(|w| w.host != hosts[1].name), "{ws:#?}");
    let err = c.workers().launch_workers(sleepers(1)).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::ResourceExhausted, "{err:?}");
    let out = berth(&["undrain", &hosts[1].name]);
    assert!(out.status.success(), "{out:?}");
    assert!(
        line_of(&String::from_utf8_lossy(&out.stdout), &hosts[1].name).contains("ready"),
        "{out:?}"
    );
    let ws = launch(&c, sleepers(2)).await;
    assert!(ws.iter().all(|w| w.host == hosts[1].name), "{ws:#?}");
    let out = berth(&["drain", "no-such-host"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("NOT_FOUND"),
        "{out:?}"
    );
    // A host daemon serves no cluster: the CLI says where to point it.
    let out = std::process::Command::new(berth_tests::bin("berth"))
        .args(["--addr", &hosts[0].addr(), "hosts"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("berth-scheduler"),
        "{out:?}"
    );
}

/// Spread placement end to end (one worker per host where bin-packing would fill one), and a
/// scheduler session's lease: `KeepAlive` through the scheduler renews it on every host, and
/// once nobody renews it, it lapses on every host and their workers end with `session ended`.
/// A session follower through the scheduler (`new_workers`) gets the lines of the workers the
/// session launches on every host after the call, those of hosts it reaches later too, and its
/// stream ends when the session is closed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_follower_on_the_scheduler_hears_every_host() {
    require_root!();
    let (s, _hosts) = three_hosts().await;
    let c = s.client().await.unwrap();
    let session = berth_tests::open_session(&c, 60).await;
    let mut stream = c
        .workers()
        .stream_output(pb::StreamOutputRequest {
            session_id: session.id.clone(),
            follow: true,
            new_workers: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let echo = |n: u32, word: &str| pb::LaunchWorkersRequest {
        session_id: session.id.clone(),
        placement: pb::Placement::Spread as i32,
        cpu: 0.1,
        memory_gb: 0.1,
        ..command_request(
            n,
            &["/bin/sh", "-c", &format!("echo {word}-$BERTH_WORKER_ID")],
        )
    };
    let mut lines = BTreeSet::new();
    for word in ["first", "second"] {
        let ws = launch(&c, echo(3, word)).await;
        let used: BTreeSet<&str> = ws.iter().map(|w| w.host.as_str()).collect();
        assert_eq!(used.len(), 3, "spread over the three hosts: {ws:#?}");
        let want: BTreeSet<String> = ws.iter().map(|w| format!("{word}-{}", w.id)).collect();
        let deadline = Instant::now() + scaled(Duration::from_secs(20));
        while !want.is_subset(&lines) {
            let left = deadline.saturating_duration_since(Instant::now());
            let ch = tokio::time::timeout(left, stream.message())
                .await
                .unwrap_or_else(|_| panic!("lines {want:?} not all seen: {lines:?}"))
                .unwrap()
                .expect("the stream ended while the session was open");
            for l in String::from_utf8_lossy(&ch.data).lines() {
                lines.insert(l.to_owned());
            }
        }
    }
    berth_tests::close_session(&c, &session.id, 1).await;
    tokio::time::timeout(scaled(Duration::from_secs(20)), async {
        while stream.message().await.unwrap().is_some() {}
    })
    .await
    .expect("the scheduler's session stream did not end with the session");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spread_and_a_scheduler_session_lease_on_every_host() {
    require_root!();
    let s = SchedulerNode::start().await.unwrap();
    let mut hosts = Vec::new();
    for _ in 0..2 {
        hosts.push(start_host(&s, 2.0, 2.0).await.unwrap());
    }
    let names: Vec<&str> = hosts.iter().map(|h| h.name.as_str()).collect();
    s.wait_hosts(&names, pb::HostState::Ready).await.unwrap();
    let c = s.client().await.unwrap();
    let ttl = scaled(Duration::from_secs(3)).as_secs().max(3) as u32;
    let session = berth_tests::open_session(&c, ttl).await;
    let ws = launch(
        &c,
        pb::LaunchWorkersRequest {
            session_id: session.id.clone(),
            placement: pb::Placement::Spread as i32,
            ..sleepers(2)
        },
    )
    .await;
    let used: BTreeSet<String> = ws.iter().map(|w| w.host.clone()).collect();
    assert_eq!(used.len(), 2, "spread: one per host: {ws:#?}");
    await_running(&c, &ids_of(&ws)).await;
    // Renewed through the scheduler for three leases: every host keeps its workers.
    let until = Instant::now() + Duration::from_secs(3 * u64::from(ttl));
    while Instant::now() < until {
        c.workers()
            .keep_alive(pb::KeepAliveRequest {
                session_id: session.id.clone(),
            })
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    for h in &hosts {
        for (id, (_, status)) in listing(&h.client().await.unwrap()).await {
            assert_eq!(
                status,
                pb::WorkerStatus::Running as i32,
                "{id} on {}",
                h.name
            );
        }
    }
    // Nobody renews it: it lapses on every host.
    let deadline =
        Instant::now() + scaled(Duration::from_secs(20)) + Duration::from_secs(ttl.into());
    for h in &hosts {
        let hc = h.client().await.unwrap();
        loop {
            let l = hc
                .workers()
                .list_workers(pb::ListWorkersRequest::default())
                .await
                .unwrap()
                .into_inner()
                .workers;
            if l.iter().all(|w| {
                w.status == pb::WorkerStatus::Stopped as i32 && w.reason == "session ended"
            }) {
                break;
            }
            assert!(Instant::now() < deadline, "not ended on {}: {l:#?}", h.name);
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// A host that lacks the launch's interpreter is skipped, even where it is the one bin-packing
/// would fill first; a command needs no interpreter and may go there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_without_the_kernel_is_skipped() {
    require_root!();
    let s = SchedulerNode::start().await.unwrap();
    let bare = start_host_with(
        &s,
        2.0,
        2.0,
        "[labels]\nrole = \"bare\"\n[kernels.python3]\ncandidates = [\"/nonexistent/python3\"]\n",
    )
    .await
    .unwrap();
    let full = start_host(&s, 2.0, 2.0).await.unwrap();
    s.wait_hosts(&[&bare.name, &full.name], pb::HostState::Ready)
        .await
        .unwrap();
    let bare_name = bare.name.clone();
    let hosts = [bare, full];
    let c = s.client().await.unwrap();
    // A command (no interpreter needed) pinned to the bare host makes it the fuller one:
    // bin-packing would choose it first.
    let mut pinned = pb::LaunchWorkersRequest {
        cpu: 0.5,
        ..sleepers(1)
    };
    pinned.constraints.insert("role".into(), "bare".into());
    let first = launch(&c, pinned).await.remove(0);
    assert_eq!(first.host, bare_name, "{first:?}");
    until_union(&c, &hosts).await;
    let py = launch(
        &c,
        pb::LaunchWorkersRequest {
            n: 1,
            cpu: 0.25,
            memory_gb: 0.125,
            code: "import time; time.sleep(600)".into(),
            ..Default::default()
        },
    )
    .await
    .remove(0);
    assert_ne!(py.host, first.host, "python3 placed on a host without it");
    // Without the kernel check it would have gone there: a command does.
    let cmd = launch(
        &c,
        pb::LaunchWorkersRequest {
            cpu: 0.5,
            ..sleepers(1)
        },
    )
    .await
    .remove(0);
    assert_eq!(cmd.host, first.host, "bin-packing fills the fuller host");
}

/// `hosts.json`: a scheduler restarted while a host is gone lists that host at once, and sees
/// it DOWN when it never beats again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_that_never_returns_after_a_scheduler_restart_is_down() {
    require_root!();
    let mut s = SchedulerNode::start().await.unwrap();
    let mut host = start_host(&s, 2.0, 2.0).await.unwrap();
    s.wait_hosts(&[&host.name], pb::HostState::Ready)
        .await
        .unwrap();
    host.stop_daemon(libc::SIGKILL);
    s.stop(libc::SIGKILL);
    s.restart().await.unwrap();
    let listed = s.hosts().await.unwrap();
    assert!(
        listed
            .iter()
            .any(|h| h.info.as_ref().is_some_and(|i| i.name == host.name)),
        "the restarted scheduler forgot {}: {listed:#?}",
        host.name
    );
    s.wait_hosts(&[&host.name], pb::HostState::Down)
        .await
        .unwrap();
}

/// `advertise`: the address a host gives the scheduler (`HostInfo.address`, where the scheduler
/// calls it) instead of its first TCP listen address; here a second listener of its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_is_reached_at_its_advertised_address() {
    require_root!();
    let s = SchedulerNode::start().await.unwrap();
    let advertised = format!("127.0.0.1:{}", berth_tests::free_port());
    let host = Daemon::start_with(berth_tests::DaemonOptions {
        tcp: true,
        listen: vec![advertised.clone()],
        config: format!(
            "scheduler = \"{}\"\nadvertise = \"{advertised}\"\n[resources]\ncpu = 2.0\nmemory_gb = 2.0\n",
            s.addr
        ),
        ..Default::default()
    })
    .await
    .unwrap();
    s.wait_hosts(&[&host.name], pb::HostState::Ready)
        .await
        .unwrap();
    let listed = s.hosts().await.unwrap();
    let info = listed
        .iter()
        .filter_map(|h| h.info.as_ref())
        .find(|i| i.name == host.name)
        .expect("the host is listed");
    assert_eq!(info.address, advertised, "{info:?}");
    assert_ne!(Some(&info.address), host.tcp.as_ref());
    // The scheduler reaches it there: a launch, its listing and its output go through.
    let c = s.client().await.unwrap();
    let w = launch(
        &c,
        pb::LaunchWorkersRequest {
            cpu: 0.5,
            ..command_request(1, &["sh", "-c", "echo advertised"])
        },
    )
    .await
    .remove(0);
    assert_eq!(w.host, host.name);
    let out = output_of(&c, &w.id, pb::Stream::Stdout).await.unwrap();
    assert_eq!(out, b"advertised\n");
}
