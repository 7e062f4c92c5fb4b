//! Two scheduler replicas over the same real hosts (`berthd --scheduler a,b` beats to both):
//! a client with both addresses launches a stream of workers in a session and renews it; the
//! replica it uses is killed with SIGKILL in the middle. Launches and keep-alives go on through
//! the other within 5 s, no worker is launched twice and none is lost, and the session is the
//! same session after the failover (closing it stops every worker).

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use berth_client::Failover;
use berth_tests::cluster::{SchedulerNode, HEARTBEAT_SECONDS};
use berth_tests::{command_request, pb, require_root, scaled, Daemon, DaemonOptions};

/// A host of 4 cores joined to every replica of `schedulers`.
async fn host_of(schedulers: &[&SchedulerNode]) -> Daemon {
    let list: Vec<&str> = schedulers.iter().map(|s| s.addr.as_str()).collect();
    Daemon::start_with(DaemonOptions {
        tcp: true,
        config: format!(
            "scheduler = \"{}\"\n[resources]\ncpu = 4.0\nmemory_gb = 4.0\n",
            list.join(",")
        ),
        ..Default::default()
    })
    .await
    .unwrap()
}

/// Every worker the hosts hold, asked of each host itself (as root: all of them).
async fn on_hosts(hosts: &[Daemon]) -> Vec<pb::Worker> {
    let mut all = Vec::new();
    for h in hosts {
        all.extend(berth_tests::list_all(&h.client().await.unwrap()).await);
    }
    all
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_killed_mid_stream_loses_nothing_and_launches_nothing_twice() {
    require_root!();
    let mut a = SchedulerNode::start().await.unwrap();
    let b = SchedulerNode::start().await.unwrap();
    let hosts = vec![host_of(&[&a, &b]).await, host_of(&[&a, &b]).await];
    let names: Vec<String> = hosts.iter().map(|h| h.name.clone()).collect();
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    a.wait_hosts(&names, pb::HostState::Ready).await.unwrap();
    b.wait_hosts(&names, pb::HostState::Ready).await.unwrap();

    let client = Failover::new(&format!("{},{}", a.addr, b.addr), Default::default()).unwrap();
    let session = client
        .call(|c| async move {
            c.workers()
                .open_session(pb::OpenSessionRequest {
                    ttl_seconds: 10,
                    ..Default::default()
                })
                .await
                .map(|r| r.into_inner())
        })
        .await
        .unwrap();
    assert_eq!(
        client.current_addr().await.as_deref(),
        Some(a.addr.as_str())
    );

    // The stream: one launch after another, each of one sleeper in the session, with its own
    // request id; a keep-alive between launches.
    let total = 24;
    let kill_after = 8;
    let mut got: BTreeMap<String, String> = BTreeMap::new(); // request id -> worker id
    let mut killed_at = None;
    let mut first_launch_after = None;
    let mut first_keepalive_after = None;
    for i in 0..total {
        if i == kill_after {
            // Killed while this launch is on its way: it may or may not have been carried out
            // on a host before the replica died.
            let pid = a.pid().unwrap() as i32;
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(3));
                // SAFETY: kill(2) of the scheduler this test started.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            });
            killed_at = Some(Instant::now());
        }
        let rid = format!("ha-{i}");
        let req = pb::LaunchWorkersRequest {
            request_id: rid.clone(),
            session_id: session.id.clone(),
            cpu: 0.05,
            memory_gb: 0.03,
            network: pb::NetworkMode::Host as i32,
            ..command_request(1, &["/bin/sleep", "600"])
        };
        let ws = client
            .launch(req)
            .await
            .unwrap_or_else(|s| panic!("{rid}: {s:?}"));
        assert_eq!(ws.len(), 1, "{rid}");
        if let (Some(k), None) = (killed_at, first_launch_after) {
            first_launch_after = Some(k.elapsed());
        }
        got.insert(rid, ws[0].id.clone());
        let sid = session.id.clone();
        client
            .call(|c| {
                let sid = sid.clone();
                async move {
                    c.workers()
                        .keep_alive(pb::KeepAliveRequest { session_id: sid })
                        .await
                }
            })
            .await
            .unwrap_or_else(|s| panic!("keep-alive after {i}: {s:?}"));
        if let (Some(k), None) = (killed_at, first_keepalive_after) {
            first_keepalive_after = Some(k.elapsed());
        }
    }
    a.stop(libc::SIGKILL);
    assert_eq!(
        client.current_addr().await.as_deref(),
        Some(b.addr.as_str())
    );
    let answered_by_b = b
        .log()
        .matches("a retried launch gets the workers another replica launched")
        .count();
    eprintln!("FIGURE ha: launches b answered from a's records: {answered_by_b}");
    let launch_gap = first_launch_after.unwrap();
    let keepalive_gap = first_keepalive_after.unwrap();
    eprintln!(
        "FIGURE ha: after SIGKILL of the replica in use: next launch answered in {:.1} ms, next \
         keep-alive in {:.1} ms",
        launch_gap.as_secs_f64() * 1e3,
        keepalive_gap.as_secs_f64() * 1e3
    );
    assert!(launch_gap < Duration::from_secs(5), "{launch_gap:?}");
    assert!(keepalive_gap < Duration::from_secs(5), "{keepalive_gap:?}");

    // What the hosts hold: each launch's worker exactly once, running; nothing else of ours.
    let all = on_hosts(&hosts).await;
    let mut by_request: BTreeMap<String, Vec<&pb::Worker>> = BTreeMap::new();
    for w in &all {
        let (base, _) = berth_core::launch::split_attempt(&w.request_id);
        by_request.entry(base.to_owned()).or_default().push(w);
    }
    let mut twice = 0;
    let mut lost = 0;
    for (rid, id) in &got {
        let ws = by_request.get(rid).cloned().unwrap_or_default();
        twice += ws.len().saturating_sub(1);
        match ws.iter().find(|w| &w.id == id) {
            Some(w) if w.status == pb::WorkerStatus::Running as i32 => {}
            _ => lost += 1,
        }
    }
    eprintln!("FIGURE ha: {total} launches, {twice} launched twice, {lost} lost");
    assert_eq!((twice, lost), (0, 0), "{by_request:#?}");
    assert_eq!(all.len(), total, "nothing but the stream's workers");

    // The session is one session: renewed past its ttl through b, and closing it stops all.
    tokio::time::sleep(scaled(Duration::from_secs_f64(HEARTBEAT_SECONDS * 5.0))).await;
    let sid = session.id.clone();
    let closed = client
        .call(|c| {
            let sid = sid.clone();
            async move {
                c.workers()
                    .close_session(pb::CloseSessionRequest {
                        session_id: sid,
                        grace_seconds: Some(0),
                    })
                    .await
                    .map(|r| r.into_inner().stopped)
            }
        })
        .await
        .unwrap();
    let closed: BTreeSet<String> = closed.into_iter().map(|w| w.id).collect();
    let want: BTreeSet<String> = got.values().cloned().collect();
    assert_eq!(closed, want);
    let deadline = Instant::now() + scaled(Duration::from_secs(20));
    loop {
        let all = on_hosts(&hosts).await;
        if all
            .iter()
            .all(|w| w.status == pb::WorkerStatus::Stopped as i32)
        {
            break;
        }
        assert!(Instant::now() < deadline, "still running: {all:#?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
