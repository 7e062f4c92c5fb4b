//! The scheduler against simulated hosts in process: membership, all-or-nothing placement over
//! thousands of hosts, refusals and roll-back, lost hosts, sessions, restarts, concurrency.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use berth_proto::v1 as pb;

use berth_server::identity::Caller;

use super::fake::{FakeCluster, FakeConnector, FakeHost};
use super::view::{Filter, HOST_LOST};
use super::*;

fn res(cpu: f64, memory_gb: f64, gpus: u32, workers: u32) -> pb::Resources {
    pb::Resources {
        cpu,
        memory_gb,
        gpus,
        workers,
        addresses: 0,
    }
}

fn opts() -> SchedulerOptions {
    SchedulerOptions {
        heartbeat: Duration::from_millis(100),
        host_down_after: Duration::from_millis(400),
        // Launches of thousands of workers over the simulated hosts.
        limits: LaunchLimits {
            max_workers_per_launch: 10_000,
            ..Default::default()
        },
        ..Default::default()
    }
}

/// A scheduler with `n` simulated hosts of `cap` that have each beaten once.
fn cluster(n: usize, cap: pb::Resources) -> (Scheduler, Arc<FakeCluster>) {
    let fakes = FakeCluster::new();
    for i in 0..n {
        fakes.add(&format!("h{i:05}"), cap, BTreeMap::new());
    }
    let s = Scheduler::new(opts(), Arc::new(FakeConnector(fakes.clone())));
    s.start();
    for h in fakes.all() {
        s.heartbeat(h.beat(1)).unwrap();
    }
    (s, fakes)
}

fn launch(n: u32, cpu: f64) -> pb::LaunchWorkersRequest {
    pb::LaunchWorkersRequest {
        n,
        cpu,
        memory_gb: 0.5,
        command: vec!["/bin/true".into()],
        ..Default::default()
    }
}

/// Every host of `fakes` beats every 100 ms until the handle is aborted.
fn keep_beating(s: &Scheduler, fakes: &Arc<FakeCluster>) -> tokio::task::JoinHandle<()> {
    let s = s.clone();
    let fakes = fakes.clone();
    tokio::spawn(async move {
        for seq in 2.. {
            for h in fakes.all() {
                s.heartbeat(h.beat(seq)).unwrap();
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
}

/// Of the two hosts `h00000` and `h00001`: `host`, and the other one.
fn quiet_and_other(host: &str) -> (&'static str, &'static str) {
    if host == "h00000" {
        ("h00000", "h00001")
    } else {
        ("h00001", "h00000")
    }
}

/// Host `name` of `fakes` alone beats every 100 ms until the handle is aborted.
fn keep_beating_one(
    s: &Scheduler,
    fakes: &Arc<FakeCluster>,
    name: &str,
) -> tokio::task::JoinHandle<()> {
    let s = s.clone();
    let h = fakes.get(name).unwrap();
    tokio::spawn(async move {
        for seq in 2.. {
            s.heartbeat(h.beat(seq)).unwrap();
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
}

async fn synced(s: &Scheduler) {
    for _ in 0..500 {
        if s.synced() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("the scheduler never read every host");
}

fn running_on(h: &FakeHost) -> usize {
    h.workers()
        .iter()
        .filter(|w| w.status == pb::WorkerStatus::Running as i32)
        .count()
}

fn ids(ws: &[pb::Worker]) -> BTreeSet<String> {
    ws.iter().map(|w| w.id.clone()).collect()
}

fn union_of_hosts(fakes: &FakeCluster) -> BTreeSet<String> {
    fakes.all().iter().flat_map(|h| ids(&h.workers())).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousands_of_hosts_take_a_launch_whole_or_not_at_all() {
    let (s, fakes) = cluster(2000, res(4.0, 8.0, 0, 16));
    synced(&s).await;
    let ws = s.launch(launch(500, 2.0), None).await.unwrap();
    assert_eq!(ws.len(), 500);
    assert_eq!(ids(&ws).len(), 500, "ids are unique");
    for h in fakes.all() {
        assert!(
            running_on(&h) <= 2,
            "{} is over its 4 cores",
            h.host_info().name
        );
    }
    let listed = s.list(&Filter::default()).unwrap();
    assert_eq!(ids(&listed), union_of_hosts(&fakes));

    // 2000 hosts hold 4000 such workers; 500 run: 3501 more cannot fit, and nothing starts.
    let before = union_of_hosts(&fakes);
    let err = s.launch(launch(3501, 2.0), None).await.unwrap_err();
    assert!(matches!(err, Error::ResourceExhausted(_)), "{err}");
    assert_eq!(union_of_hosts(&fakes), before);
    // Exactly what is left fits.
    let ws = s.launch(launch(3500, 2.0), None).await.unwrap();
    assert_eq!(ws.len(), 3500);
    assert_eq!(s.list(&Filter::default()).unwrap().len(), 4000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_that_refuses_is_replaced_by_another() {
    let (s, fakes) = cluster(3, res(4.0, 8.0, 0, 16));
    let first = s.launch(launch(1, 1.0), None).await.unwrap();
    let busy = fakes.get(&first[0].host).unwrap();
    // The host the scheduler would fill next lies about its room.
    busy.refuse_launches.store(true, Ordering::Relaxed);
    let ws = s.launch(launch(2, 1.0), None).await.unwrap();
    assert_eq!(ws.len(), 2);
    assert!(ws.iter().all(|w| w.host != busy.host_info().name));
    assert_eq!(running_on(&busy), 1, "nothing new on the refusing host");
    assert!(s.metrics().placement_retries.load(Ordering::Relaxed) >= 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refusal_rolls_back_the_part_that_started() {
    let (s, fakes) = cluster(2, res(2.0, 8.0, 0, 16));
    // Both hosts are needed; one refuses, the other has started its half.
    let h1 = fakes.get("h00001").unwrap();
    h1.refuse_launches.store(true, Ordering::Relaxed);
    let err = s.launch(launch(4, 1.0), None).await.unwrap_err();
    assert!(
        matches!(err, Error::ResourceExhausted(ref m) if m.contains("h00001")),
        "{err}"
    );
    for h in fakes.all() {
        assert_eq!(
            running_on(&h),
            0,
            "{} runs a half launch",
            h.host_info().name
        );
    }
    // And its room is free again.
    h1.refuse_launches.store(false, Ordering::Relaxed);
    assert_eq!(s.launch(launch(4, 1.0), None).await.unwrap().len(), 4);
}

/// README: a host that cannot be reached makes the scheduler roll back the parts that started
/// and place again without it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_host_is_rolled_back_and_replaced() {
    let (s, fakes) = cluster(3, res(2.0, 8.0, 0, 16));
    // Bin-packing fills the host that already runs a worker first: the next launch of three
    // takes its free core and two of another host's.
    let first = s.launch(launch(1, 1.0), None).await.unwrap();
    let dead = fakes.get(&first[0].host).unwrap();
    dead.unreachable.store(true, Ordering::Relaxed);
    let ws = s.launch(launch(3, 1.0), None).await.unwrap();
    assert_eq!(ws.len(), 3);
    assert!(ws.iter().all(|w| w.host != first[0].host), "{ws:#?}");
    assert!(s.metrics().placement_retries.load(Ordering::Relaxed) >= 1);
    // The part that started on the reachable host in the first placement was stopped: what runs
    // is the first worker and the three the client got, nothing more.
    let placed = ids(&ws);
    let mut running = BTreeSet::new();
    for h in fakes.all() {
        for w in h.workers() {
            if w.status == pb::WorkerStatus::Running as i32 {
                running.insert(w.id);
            } else {
                assert!(!placed.contains(&w.id), "{w:?}");
                assert_eq!(w.status, pb::WorkerStatus::Stopped as i32, "{w:?}");
            }
        }
    }
    let want: BTreeSet<String> = placed
        .iter()
        .cloned()
        .chain([first[0].id.clone()])
        .collect();
    assert_eq!(running, want);
    let stopped: usize = fakes
        .all()
        .iter()
        .map(|h| h.workers().len() - running_on(h))
        .sum();
    assert!(
        stopped >= 1,
        "the first placement never reached a second host"
    );
}

/// README: at most `launch_attempts` placements, then the launch is refused whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn launch_attempts_bounds_the_placements_tried() {
    let fakes = FakeCluster::new();
    for i in 0..5 {
        fakes.add(&format!("h{i:05}"), res(1.0, 8.0, 0, 16), BTreeMap::new());
    }
    let s = Scheduler::new(
        SchedulerOptions {
            launch_attempts: 3,
            ..opts()
        },
        Arc::new(FakeConnector(fakes.clone())),
    );
    s.start();
    for h in fakes.all() {
        s.heartbeat(h.beat(1)).unwrap();
        h.refuse_launches.store(true, Ordering::Relaxed);
    }
    let err = s.launch(launch(1, 1.0), None).await.unwrap_err();
    assert!(matches!(err, Error::ResourceExhausted(_)), "{err}");
    let calls = |fakes: &FakeCluster| -> u64 {
        fakes
            .all()
            .iter()
            .map(|h| h.launch_calls.load(Ordering::Relaxed))
            .sum()
    };
    assert_eq!(
        calls(&fakes),
        3,
        "one host asked per attempt, three attempts"
    );
    // Every host unreachable: refused as UNAVAILABLE, after as many attempts.
    for h in fakes.all() {
        h.refuse_launches.store(false, Ordering::Relaxed);
        h.unreachable.store(true, Ordering::Relaxed);
    }
    let retries = s.metrics().placement_retries.load(Ordering::Relaxed);
    let err = s.launch(launch(1, 1.0), None).await.unwrap_err();
    assert!(matches!(err, Error::Unavailable(_)), "{err}");
    assert_eq!(
        s.metrics().placement_retries.load(Ordering::Relaxed) - retries,
        2,
        "three placements: two retries"
    );
    assert!(fakes.all().iter().all(|h| running_on(h) == 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_launches_never_overcommit_a_host() {
    let (s, fakes) = cluster(20, res(64.0, 64.0, 0, 4));
    let tasks: Vec<_> = (0..100)
        .map(|_| {
            let s = s.clone();
            tokio::spawn(async move { s.launch(launch(1, 1.0), None).await })
        })
        .collect();
    let mut ok = 0;
    let mut refused = 0;
    for t in tasks {
        match t.await.unwrap() {
            Ok(_) => ok += 1,
            Err(Error::ResourceExhausted(_)) => refused += 1,
            Err(e) => panic!("{e}"),
        }
    }
    assert_eq!((ok, refused), (80, 20));
    let calls: u64 = fakes
        .all()
        .iter()
        .map(|h| h.launch_calls.load(Ordering::Relaxed))
        .sum();
    assert_eq!(calls, 80, "no host was asked for more than it had room for");
    assert!(fakes.all().iter().all(|h| running_on(h) == 4));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_host_goes_down_and_its_workers_come_back_with_it() {
    let (s, fakes) = cluster(2, res(4.0, 8.0, 0, 16));
    synced(&s).await;
    let mut req = launch(1, 4.0);
    req.constraints.clear();
    let w = s.launch(req, None).await.unwrap().remove(0);
    let (quiet, other) = quiet_and_other(&w.host);
    // Only the other host keeps beating.
    let beating = keep_beating_one(&s, &fakes, other);
    let mut lost = None;
    for _ in 0..100 {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let l = s.list(&Filter::default()).unwrap();
        if l[0].status == pb::WorkerStatus::Lost as i32 {
            lost = Some(l[0].clone());
            break;
        }
    }
    let lost = lost.expect("the worker of a silent host is LOST");
    assert_eq!(lost.reason, HOST_LOST);
    let states: BTreeMap<String, i32> = s
        .list_hosts()
        .into_iter()
        .map(|h| (h.info.unwrap().name, h.state))
        .collect();
    assert_eq!(states[quiet], pb::HostState::Down as i32);
    assert_eq!(states[other], pb::HostState::Ready as i32);
    // Nothing is placed on a DOWN host.
    let err = s.launch(launch(1, 4.0), None).await;
    assert_eq!(err.unwrap().remove(0).host, other);

    // It beats again: the worker still runs there, and is RUNNING again, not launched twice.
    s.heartbeat(fakes.get(quiet).unwrap().beat(50)).unwrap();
    let mut back = false;
    for _ in 0..100 {
        tokio::time::sleep(Duration::from_millis(20)).await;
        let l = s.list(&Filter {
            ids: vec![w.id.clone()],
            ..Default::default()
        });
        if l.unwrap()[0].status == pb::WorkerStatus::Running as i32 {
            back = true;
            break;
        }
    }
    assert!(back, "the returning host's worker is RUNNING again");
    assert_eq!(running_on(&fakes.get(quiet).unwrap()), 1);
    beating.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_scheduler_rebuilds_the_same_view() {
    let (s, fakes) = cluster(5, res(4.0, 8.0, 0, 16));
    s.launch(launch(7, 1.0), None).await.unwrap();
    s.set_draining("h00002", true).await.unwrap();
    let before: BTreeMap<String, (String, i32)> = s
        .list(&Filter::default())
        .unwrap()
        .into_iter()
        .map(|w| (w.id, (w.host, w.status)))
        .collect();
    s.shutdown();

    let s2 = Scheduler::new(opts(), Arc::new(FakeConnector(fakes.clone())));
    s2.start();
    for h in fakes.all() {
        let mut beat = h.beat(9);
        // What the first scheduler told the host, the host tells the new one.
        beat.draining = beat.info.as_ref().unwrap().name == "h00002";
        s2.heartbeat(beat).unwrap();
    }
    synced(&s2).await;
    let after: BTreeMap<String, (String, i32)> = s2
        .list(&Filter::default())
        .unwrap()
        .into_iter()
        .map(|w| (w.id, (w.host, w.status)))
        .collect();
    assert_eq!(after, before);
    let draining: Vec<String> = s2
        .list_hosts()
        .into_iter()
        .filter(|h| h.state == pb::HostState::Draining as i32)
        .map(|h| h.info.unwrap().name)
        .collect();
    assert_eq!(draining, vec!["h00002"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn draining_hosts_take_no_new_workers() {
    let (s, _fakes) = cluster(2, res(4.0, 8.0, 0, 16));
    s.set_draining("h00000", true).await.unwrap();
    let ws = s.launch(launch(4, 1.0), None).await.unwrap();
    assert!(ws.iter().all(|w| w.host == "h00001"));
    let err = s.launch(launch(1, 1.0), None).await.unwrap_err();
    assert!(matches!(err, Error::ResourceExhausted(_)), "{err}");
    s.set_draining("h00000", false).await.unwrap();
    assert_eq!(
        s.launch(launch(1, 1.0), None).await.unwrap()[0].host,
        "h00000"
    );
    assert!(matches!(
        s.set_draining("nope", true).await,
        Err(Error::NotFound(_))
    ));
    assert!(matches!(
        s.set_draining("", true).await,
        Err(Error::InvalidArgument { .. })
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_ends_its_workers_on_every_host() {
    let (s, fakes) = cluster(2, res(1.0, 8.0, 0, 16));
    let session = s
        .open_session(None, 60, Default::default(), "alice")
        .await
        .unwrap();
    let mut req = launch(2, 1.0);
    req.session_id = session.id.clone();
    let ws = s.launch(req, None).await.unwrap();
    let hosts: BTreeSet<String> = ws.iter().map(|w| w.host.clone()).collect();
    assert_eq!(hosts.len(), 2, "one core each: both hosts");
    s.keep_alive(&session.id).await.unwrap();
    let stopped = s.close_session(&session.id, Some(0)).await.unwrap();
    assert_eq!(stopped.len(), 2);
    for h in fakes.all() {
        assert!(h
            .workers()
            .iter()
            .all(|w| w.status == pb::WorkerStatus::Stopped as i32 && w.reason == "session ended"));
    }
    assert!(matches!(
        s.keep_alive(&session.id).await,
        Err(Error::NotFound(_))
    ));
    let mut req = launch(1, 1.0);
    req.session_id = session.id.clone();
    assert!(matches!(s.launch(req, None).await, Err(Error::NotFound(_))));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lapsed_session_ends_its_workers() {
    let (s, fakes) = cluster(1, res(4.0, 8.0, 0, 16));
    let session = s
        .open_session(None, 1, Default::default(), "alice")
        .await
        .unwrap();
    let beating = keep_beating(&s, &fakes);
    let mut req = launch(2, 1.0);
    req.session_id = session.id.clone();
    s.launch(req, None).await.unwrap();
    let h = fakes.get("h00000").unwrap();
    for _ in 0..60 {
        tokio::time::sleep(Duration::from_millis(50)).await;
        if running_on(&h) == 0 {
            beating.abort();
            return;
        }
    }
    panic!("workers of a lapsed session still run");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn await_and_stop_span_hosts() {
    let (s, fakes) = cluster(3, res(1.0, 8.0, 0, 16));
    let ws = s.launch(launch(3, 1.0), None).await.unwrap();
    let (running, failures) = s
        .await_workers(ids(&ws).into_iter().collect(), None, false, None)
        .await
        .unwrap();
    assert_eq!((running.len(), failures.len()), (3, 0));
    for w in &ws[..2] {
        fakes.get(&w.host).unwrap().finish(&w.id);
    }
    let (done, pending) = s
        .await_workers(
            ids(&ws).into_iter().collect(),
            None,
            true,
            Some(Duration::from_millis(300)),
        )
        .await
        .unwrap();
    assert_eq!((done.len(), pending.len()), (2, 1), "the third still runs");
    let stopped = s
        .stop(Selector::Ids(vec![ws[2].id.clone()]), Some(0))
        .await
        .unwrap();
    assert_eq!(stopped[0].status, pb::WorkerStatus::Stopped as i32);
    assert!(matches!(
        s.stop(Selector::Ids(vec!["nosuchworker".into()]), None)
            .await,
        Err(Error::NotFound(_))
    ));
    assert!(matches!(
        s.list(&Filter {
            session_id: Some("nosuchsession".into()),
            ..Default::default()
        }),
        Err(Error::NotFound(_))
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_beats_name_their_field() {
    let (s, _) = cluster(0, res(1.0, 1.0, 0, 1));
    let e = s.heartbeat(pb::HeartbeatRequest::default()).unwrap_err();
    assert!(matches!(e, Error::InvalidArgument { ref field, .. } if field == "info"));
    let mut beat = FakeHost::new("ok", res(1.0, 1.0, 0, 1), BTreeMap::new()).beat(1);
    beat.info.as_mut().unwrap().name = "../x".into();
    let e = s.heartbeat(beat.clone()).unwrap_err();
    assert!(matches!(e, Error::InvalidArgument { ref field, .. } if field == "info.name"));
    beat.info.as_mut().unwrap().name = "ok".into();
    beat.info.as_mut().unwrap().address.clear();
    let e = s.heartbeat(beat).unwrap_err();
    assert!(matches!(e, Error::InvalidArgument { ref field, .. } if field == "info.address"));
    assert!(
        s.list_hosts().is_empty(),
        "a refused beat registers nothing"
    );
    // With no host at all, a launch is UNAVAILABLE.
    assert!(matches!(
        s.launch(launch(1, 1.0), None).await,
        Err(Error::Unavailable(_))
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spread_uses_many_hosts_and_binpack_few() {
    let (s, _fakes) = cluster(8, res(8.0, 8.0, 0, 16));
    let packed = s.launch(launch(8, 1.0), None).await.unwrap();
    let hosts: BTreeSet<String> = packed.iter().map(|w| w.host.clone()).collect();
    assert_eq!(hosts.len(), 1, "bin-pack fills one host");
    let mut req = launch(7, 1.0);
    req.placement = pb::Placement::Spread as i32;
    let spread = s.launch(req, None).await.unwrap();
    let hosts: BTreeSet<String> = spread.iter().map(|w| w.host.clone()).collect();
    assert_eq!(hosts.len(), 7, "spread puts one on each of the other hosts");
    assert!(!hosts.contains(&packed[0].host), "the full host is skipped");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn constraints_and_gpus_choose_the_host() {
    let fakes = FakeCluster::new();
    fakes.add("cpu-a", res(16.0, 64.0, 0, 16), BTreeMap::new());
    fakes.add(
        "gpu-a",
        res(16.0, 64.0, 2, 16),
        [("zone".to_owned(), "b".to_owned())].into(),
    );
    let s = Scheduler::new(opts(), Arc::new(FakeConnector(fakes.clone())));
    s.start();
    for h in fakes.all() {
        s.heartbeat(h.beat(1)).unwrap();
    }
    let mut req = launch(1, 1.0);
    req.nvidia_gpu = 2;
    assert_eq!(s.launch(req.clone(), None).await.unwrap()[0].host, "gpu-a");
    // Both GPUs are held: a third is short, and the refusal names GPUs.
    req.nvidia_gpu = 1;
    let err = s.launch(req, None).await.unwrap_err();
    assert!(
        matches!(err, Error::ResourceExhausted(ref m) if m.contains("gpu")),
        "{err}"
    );
    let mut req = launch(1, 1.0);
    req.constraints.insert("zone".into(), "b".into());
    assert_eq!(s.launch(req.clone(), None).await.unwrap()[0].host, "gpu-a");
    req.constraints.insert("zone".into(), "c".into());
    let err = s.launch(req, None).await.unwrap_err();
    assert!(
        matches!(err, Error::ResourceExhausted(ref m) if m.contains("zone=c")),
        "{err}"
    );
    // A kernel no host has is refused by name before placement.
    let err = s
        .launch(
            pb::LaunchWorkersRequest {
                n: 1,
                cpu: 1.0,
                memory_gb: 1.0,
                kernel: "julia".into(),
                code: "1".into(),
                ..Default::default()
            },
            None,
        )
        .await
        .unwrap_err();
    assert!(
        matches!(err, Error::InvalidArgument { ref field, .. } if field == "kernel"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bounds_come_before_placement() {
    // Hosts that claim room for any number of workers: only the bounds stand in the way.
    let (s, fakes) = cluster(2, res(1e9, 1e9, 0, u32::MAX));
    let err = s.launch(launch(u32::MAX, 0.001), None).await.unwrap_err();
    assert!(
        matches!(&err, Error::ResourceExhausted(m) if m.contains("max_workers_per_launch")),
        "{err}"
    );
    // An env past the cap is refused naming it, before any host hears of it.
    let mut big_env = launch(1, 0.1);
    big_env.env = (0..200_000)
        .map(|i| (format!("V{i}"), "x".into()))
        .collect();
    let err = s.launch(big_env, None).await.unwrap_err();
    assert!(
        matches!(&err, Error::InvalidArgument { field, message } if field == "env" && message.contains("max_env_vars")),
        "{err}"
    );
    assert!(union_of_hosts(&fakes).is_empty(), "nothing launched");

    // Past the slots of every host together, however the cluster is used.
    let (s, fakes) = cluster(2, res(4.0, 8.0, 0, 16));
    let err = s.launch(launch(33, 0.1), None).await.unwrap_err();
    assert_eq!(
        err,
        Error::ResourceExhausted(
            "workers: 33 requested, more than the 32 slots of all 2 hosts together".into()
        )
    );
    assert!(union_of_hosts(&fakes).is_empty(), "nothing launched");
    assert_eq!(s.launch(launch(32, 0.1), None).await.unwrap().len(), 32);
}

/// A retried launch (the same caller, the same `request_id`) gets the first launch's workers
/// and launches nothing, also when the retries come together; another caller's same id, or no
/// id, launches anew; a retry asking for another count is refused naming `request_id`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_launch_gets_its_first_workers_and_launches_nothing() {
    let (s, fakes) = cluster(3, res(4.0, 8.0, 0, 16));
    synced(&s).await;
    let with_id = |n: u32, id: &str| pb::LaunchWorkersRequest {
        request_id: id.into(),
        ..launch(n, 0.5)
    };
    let alice = Caller {
        owner: "alice".into(),
        principal: berth_server::identity::Principal::User("alice".into()),
        ..Caller::daemon()
    };
    let first = hosts::as_caller(&alice, s.launch(with_id(4, "r1"), None))
        .await
        .unwrap();
    assert_eq!(first.len(), 4);
    let calls = |fakes: &FakeCluster| -> u64 {
        fakes
            .all()
            .iter()
            .map(|h| h.launch_calls.load(Ordering::Relaxed))
            .sum()
    };
    let after_first = calls(&fakes);
    // Together: one waits for the other; both get the first launch's workers.
    let (a, b) = tokio::join!(
        hosts::as_caller(&alice, s.launch(with_id(4, "r1"), None)),
        hosts::as_caller(&alice, s.launch(with_id(4, "r1"), None)),
    );
    let order = |ws: &[pb::Worker]| ws.iter().map(|w| w.id.clone()).collect::<Vec<_>>();
    assert_eq!(order(&a.unwrap()), order(&first), "in launch order");
    assert_eq!(order(&b.unwrap()), order(&first));
    assert_eq!(union_of_hosts(&fakes), ids(&first), "nothing else launched");
    assert_eq!(calls(&fakes), after_first, "no host was asked again");
    // The hosts are given the id with the attempt: a host's own retry handling never answers
    // another attempt, and another replica finds the launch in their records.
    assert_eq!(
        fakes
            .all()
            .iter()
            .map(|h| h.launches_with_request_id.load(Ordering::Relaxed))
            .sum::<u64>(),
        after_first
    );
    for w in &first {
        let (base, attempt) = berth_core::launch::split_attempt(&w.request_id);
        assert_eq!((base, attempt.map(|a| a.n)), ("r1", Some(4)), "{w:?}");
    }

    let err = hosts::as_caller(&alice, s.launch(with_id(2, "r1"), None))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, Error::InvalidArgument { field, .. } if field == "request_id"),
        "{err:?}"
    );
    // Another caller's id is its own; a launch without an id is always new.
    let bob = Caller {
        owner: "bob".into(),
        principal: berth_server::identity::Principal::User("bob".into()),
        ..Caller::daemon()
    };
    let theirs = hosts::as_caller(&bob, s.launch(with_id(4, "r1"), None))
        .await
        .unwrap();
    assert!(ids(&theirs).is_disjoint(&ids(&first)));
    s.launch(launch(1, 0.5), None).await.unwrap();
    s.launch(launch(1, 0.5), None).await.unwrap();
    assert_eq!(union_of_hosts(&fakes).len(), 4 + 4 + 2);
    assert!(s.inner.retries.is_empty(), "no gate is kept");
}

/// `RemoveHost` forgets a DOWN host for good: it is no longer listed, placed on, followed or
/// remembered in `hosts.json`, and its workers stay listed as LOST; a host that is up, an
/// unknown name and an empty one are refused and change nothing. A removed host that beats
/// again joins again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_down_host_is_removed_for_good_and_an_up_one_is_not() {
    let dir = tempfile::tempdir().unwrap();
    let fakes = FakeCluster::new();
    for name in ["h00000", "h00001"] {
        fakes.add(name, res(4.0, 8.0, 0, 16), BTreeMap::new());
    }
    let s = Scheduler::new(
        SchedulerOptions {
            state_dir: Some(dir.path().to_owned()),
            ..opts()
        },
        Arc::new(FakeConnector(fakes.clone())),
    );
    s.start();
    for h in fakes.all() {
        s.heartbeat(h.beat(1)).unwrap();
    }
    synced(&s).await;
    let gone = s.launch(launch(1, 4.0), None).await.unwrap().remove(0);
    let (quiet, other) = quiet_and_other(&gone.host);
    let beating = keep_beating_one(&s, &fakes, other);
    let state_of = |name: &str| {
        s.list_hosts()
            .into_iter()
            .find(|h| h.info.as_ref().unwrap().name == name)
            .map(|h| h.state)
    };
    // Up, unknown or unnamed: refused.
    let e = s.remove_host(other).await.unwrap_err();
    assert!(matches!(e, Error::FailedPrecondition(_)), "{e:?}");
    assert!(matches!(
        s.remove_host("nope").await.unwrap_err(),
        Error::NotFound(_)
    ));
    assert!(matches!(
        s.remove_host("").await.unwrap_err(),
        Error::InvalidArgument { .. }
    ));
    for _ in 0..100 {
        if state_of(quiet) == Some(pb::HostState::Down as i32) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(state_of(quiet), Some(pb::HostState::Down as i32));
    let (removed, lost) = s.remove_host(quiet).await.unwrap();
    assert_eq!(removed.info.unwrap().name, quiet);
    assert_eq!(lost, 1);
    assert_eq!(state_of(quiet), None, "no longer listed");
    assert_eq!(state_of(other), Some(pb::HostState::Ready as i32));
    let remembered = std::fs::read_to_string(dir.path().join("hosts.json")).unwrap();
    assert!(!remembered.contains(quiet), "{remembered}");
    assert!(remembered.contains(other), "{remembered}");
    let w = s
        .list(&Filter {
            ids: vec![gone.id.clone()],
            ..Default::default()
        })
        .unwrap()
        .remove(0);
    assert_eq!(w.status, pb::WorkerStatus::Lost as i32);
    // Placement knows only the other host now.
    for _ in 0..3 {
        let w = s.launch(launch(1, 1.0), None).await.unwrap().remove(0);
        assert_eq!(w.host, other);
    }
    // It comes back: it joins again, as any new host.
    s.heartbeat(fakes.get(quiet).unwrap().beat(60)).unwrap();
    assert_eq!(state_of(quiet), Some(pb::HostState::Ready as i32));
    beating.abort();
}

/// Two replicas over the same hosts, as `berthd --scheduler a,b` beats to both: a launch made
/// through one and retried through the other (the caller failed over before the answer) gets the
/// same workers and launches nothing; an attempt that never became whole (the first replica died
/// mid-launch) is stopped and the retry launches anew; a drain and a removal made through one
/// replica reach the other through the hosts' beats; a removed host that beats again joins again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_share_retries_drains_and_removals_through_the_hosts() {
    let fakes = FakeCluster::new();
    for i in 0..3 {
        fakes.add(&format!("h{i:05}"), res(4.0, 8.0, 0, 16), BTreeMap::new());
    }
    let a = Scheduler::new(opts(), Arc::new(FakeConnector(fakes.clone())));
    let b = Scheduler::new(opts(), Arc::new(FakeConnector(fakes.clone())));
    a.start();
    b.start();
    let beat_all = |seq: u64, skip: &[&str]| {
        for h in fakes.all() {
            if skip.contains(&h.host_info().name.as_str()) {
                continue;
            }
            h.beat_to(&a, seq).unwrap();
            h.beat_to(&b, seq).unwrap();
        }
    };
    beat_all(1, &[]);
    synced(&a).await;
    synced(&b).await;
    let alice = Caller {
        owner: "alice".into(),
        principal: berth_server::identity::Principal::User("alice".into()),
        ..Caller::daemon()
    };
    let with_id = |n: u32, id: &str| pb::LaunchWorkersRequest {
        request_id: id.into(),
        placement: pb::Placement::Spread as i32,
        ..launch(n, 0.5)
    };
    let calls = || -> u64 {
        fakes
            .all()
            .iter()
            .map(|h| h.launch_calls.load(Ordering::Relaxed))
            .sum()
    };

    // Through a, retried through b once b's view has the workers (the hosts' events).
    let first = hosts::as_caller(&alice, a.launch(with_id(3, "job-1"), None))
        .await
        .unwrap();
    let on_b = |ids: &BTreeSet<String>| {
        b.list(&Filter::default())
            .unwrap()
            .iter()
            .filter(|w| ids.contains(&w.id))
            .count()
    };
    let want = ids(&first);
    for _ in 0..500 {
        if on_b(&want) == want.len() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let before = calls();
    let again = hosts::as_caller(&alice, b.launch(with_id(3, "job-1"), None))
        .await
        .unwrap();
    assert_eq!(ids(&again), want, "the same workers");
    assert_eq!(calls(), before, "no host asked to launch again");
    // Bob's same id is his own; another count is refused naming the field.
    let bob = Caller {
        owner: "bob".into(),
        principal: berth_server::identity::Principal::User("bob".into()),
        ..Caller::daemon()
    };
    let bobs = hosts::as_caller(&bob, b.launch(with_id(3, "job-1"), None))
        .await
        .unwrap();
    assert!(ids(&bobs).is_disjoint(&want));
    let err = hosts::as_caller(&alice, b.launch(with_id(2, "job-1"), None))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, Error::InvalidArgument { field, .. } if field == "request_id"),
        "{err:?}"
    );

    // A replica died after one host of a 3-host attempt launched: simulated by launching one
    // worker of an attempt of 3 straight on a host, as that replica would have.
    let partial_id =
        berth_core::launch::with_attempt("job-2", berth_core::launch::Attempt { n: 3, token: 7 });
    let orphan = hosts::as_caller(&alice, async {
        fakes
            .get("h00000")
            .unwrap()
            .launch(pb::LaunchWorkersRequest {
                request_id: partial_id.clone(),
                ..launch(1, 0.5)
            })
            .await
    })
    .await
    .unwrap();
    let orphan_id = orphan[0].id.clone();
    for _ in 0..500 {
        if b.list(&Filter::default())
            .unwrap()
            .iter()
            .any(|w| w.id == orphan_id)
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let fresh = hosts::as_caller(&alice, b.launch(with_id(3, "job-2"), None))
        .await
        .unwrap();
    assert_eq!(fresh.len(), 3);
    assert!(!ids(&fresh).contains(&orphan_id));
    let orphan_now = fakes
        .get("h00000")
        .unwrap()
        .workers()
        .into_iter()
        .find(|w| w.id == orphan_id)
        .unwrap();
    assert_eq!(
        orphan_now.status,
        pb::WorkerStatus::Stopped as i32,
        "the attempt nobody was told of is stopped"
    );

    // A drain through a reaches b through the host's next beats (and is not undone by b).
    a.set_draining("h00001", true).await.unwrap();
    beat_all(2, &[]);
    beat_all(3, &[]);
    let state_on = |s: &Scheduler, name: &str| {
        s.list_hosts()
            .into_iter()
            .find(|h| h.info.as_ref().is_some_and(|i| i.name == name))
            .map(|h| h.state)
    };
    assert_eq!(state_on(&a, "h00001"), Some(pb::HostState::Draining as i32));
    assert_eq!(state_on(&b, "h00001"), Some(pb::HostState::Draining as i32));
    // Undrained through b, later: the newer change wins on both.
    tokio::time::sleep(Duration::from_millis(5)).await;
    b.set_draining("h00001", false).await.unwrap();
    beat_all(4, &[]);
    beat_all(5, &[]);
    assert_eq!(state_on(&a, "h00001"), Some(pb::HostState::Ready as i32));
    assert_eq!(state_on(&b, "h00001"), Some(pb::HostState::Ready as i32));

    // h00002 stops beating: DOWN on both; removed through a, b forgets it too.
    let mut seq = 6;
    for _ in 0..100 {
        if state_on(&a, "h00002") == Some(pb::HostState::Down as i32)
            && state_on(&b, "h00002") == Some(pb::HostState::Down as i32)
        {
            break;
        }
        beat_all(seq, &["h00002"]);
        seq += 1;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    a.remove_host("h00002").await.unwrap();
    assert_eq!(state_on(&a, "h00002"), None);
    assert!(state_on(&b, "h00002").is_some(), "b has not heard yet");
    beat_all(seq, &["h00002"]);
    beat_all(seq + 1, &["h00002"]);
    assert_eq!(state_on(&b, "h00002"), None, "told by the hosts");
    // It comes back: it joins both again, and the removal told on no longer forgets it.
    beat_all(seq + 2, &[]);
    beat_all(seq + 3, &[]);
    assert!(state_on(&a, "h00002").is_some());
    assert!(state_on(&b, "h00002").is_some());

    // A session opened through a, with no worker yet, is known to b: renewed, launched into
    // and closed through it; another user cannot adopt it.
    let session = hosts::as_caller(
        &alice,
        a.open_session(None, 60, Default::default(), "alice"),
    )
    .await
    .unwrap();
    let err = hosts::as_caller(&bob, b.keep_alive(&session.id))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::NotFound(_)), "{err:?}");
    let renewed = hosts::as_caller(&alice, b.keep_alive(&session.id))
        .await
        .unwrap();
    assert_eq!(renewed.owner, "alice");
    let mut req = launch(2, 0.5);
    req.session_id = session.id.clone();
    let in_session = hosts::as_caller(&alice, b.launch(req, None)).await.unwrap();
    let closed = hosts::as_caller(&alice, b.close_session(&session.id, Some(0)))
        .await
        .unwrap();
    assert_eq!(ids(&closed), ids(&in_session));
    a.shutdown();
    b.shutdown();
}

/// A beat of a simulated host with worker subnet `subnet`, telling the peer list it holds.
fn beat_with_subnet(h: &FakeHost, sequence: u64, subnet: &str, known: u64) -> pb::HeartbeatRequest {
    let mut b = h.beat(sequence);
    let info = b.info.as_mut().unwrap();
    info.subnet = subnet.into();
    info.address = format!("192.0.2.{}:7300", info.name.as_bytes()[0]);
    b.peers_version = known;
    b
}

/// Cluster networking: an overlapping subnet is refused (INVALID_ARGUMENT naming
/// `info.subnet` and the other host) and the host is never listed; the answer carries every
/// host with a subnet, only when the host's version is stale, DOWN hosts stay listed, and
/// RemoveHost takes a host out of the list.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subnets_are_distinct_and_peers_follow_the_hosts() {
    let fakes = FakeCluster::new();
    for n in ["a", "b", "c", "nonet"] {
        fakes.add(n, res(2.0, 2.0, 0, 8), BTreeMap::new());
    }
    let s = Scheduler::new(opts(), Arc::new(FakeConnector(fakes.clone())));
    s.start();
    let h = |n: &str| fakes.get(n).unwrap();
    let r = s
        .heartbeat(beat_with_subnet(&h("a"), 1, "10.1.0.0/16", 0))
        .unwrap();
    let first = r.peers.expect("a stale version gets the list");
    assert_eq!(first.peers.len(), 1);
    // Current: left out.
    let r = s
        .heartbeat(beat_with_subnet(&h("a"), 2, "10.1.0.0/16", first.version))
        .unwrap();
    assert!(r.peers.is_none());
    // A host without a subnet is no peer and changes nothing.
    s.heartbeat(h("nonet").beat(1)).unwrap();
    let r = s
        .heartbeat(beat_with_subnet(&h("a"), 3, "10.1.0.0/16", first.version))
        .unwrap();
    assert!(r.peers.is_none());
    // b joins: a's next answer has both.
    s.heartbeat(beat_with_subnet(&h("b"), 1, "10.2.0.0/16", 0))
        .unwrap();
    let two = s
        .heartbeat(beat_with_subnet(&h("a"), 4, "10.1.0.0/16", first.version))
        .unwrap()
        .peers
        .expect("the list changed");
    let names: Vec<&str> = two.peers.iter().map(|p| p.name.as_str()).collect();
    assert_eq!(names, ["a", "b"]);
    assert_eq!(two.peers[1].subnet, "10.2.0.0/16");
    // c overlaps a: refused, never listed.
    let e = s
        .heartbeat(beat_with_subnet(&h("c"), 1, "10.1.128.0/17", 0))
        .unwrap_err();
    let Error::InvalidArgument { field, message } = &e else {
        panic!("{e:?}")
    };
    assert_eq!(field, "info.subnet");
    assert!(message.contains("host a"), "{message}");
    assert!(s
        .list_hosts()
        .iter()
        .all(|x| x.info.as_ref().unwrap().name != "c"));
    // b goes DOWN: still a peer (state DOWN); removed: gone from the list.
    let b_down = async {
        for _ in 0..100 {
            let st = s
                .list_hosts()
                .into_iter()
                .find(|x| x.info.as_ref().unwrap().name == "b")
                .map(|x| x.state);
            if st == Some(pb::HostState::Down as i32) {
                return true;
            }
            s.heartbeat(beat_with_subnet(&h("a"), 5, "10.1.0.0/16", 0))
                .unwrap();
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        false
    };
    assert!(b_down.await, "b never DOWN");
    let down = s
        .heartbeat(beat_with_subnet(&h("a"), 6, "10.1.0.0/16", two.version))
        .unwrap()
        .peers
        .expect("b's state changed");
    assert_eq!(down.peers.len(), 2);
    assert_eq!(down.peers[1].state, pb::HostState::Down as i32);
    s.remove_host("b").await.unwrap();
    let after = s
        .heartbeat(beat_with_subnet(&h("a"), 7, "10.1.0.0/16", down.version))
        .unwrap()
        .peers
        .expect("b removed");
    assert_eq!(after.peers.len(), 1);
    assert_eq!(
        after.version, first.version,
        "the same list, the same version"
    );
    // Still overlapping a; with a subnet of its own, c joins.
    s.heartbeat(beat_with_subnet(&h("c"), 2, "10.1.128.0/17", 0))
        .unwrap_err();
    s.heartbeat(beat_with_subnet(&h("c"), 3, "10.3.0.0/16", 0))
        .unwrap();
}
