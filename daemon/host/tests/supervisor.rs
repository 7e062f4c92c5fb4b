//! The supervisor's decisions on fakes: a real `Host` over fake cgroups, a fake launcher and a
//! fake network ([`berth_sys::fake`], `FakeNetns`), so each behaviour is checked in
//! milliseconds, without root. What the kernel does for real is the e2e tests' part
//! (`tests/e2e`); here it is what the supervisor asks and decides: what it starts, signals,
//! kills and frees, which status and reason it records, when it restarts.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use berth_core::admission::Capacity;
use berth_core::error::Error;
use berth_core::ipam::Subnet;
use berth_core::launch::{self, LaunchRequest, NetworkMode, RestartPolicy};
use berth_core::limits::ExecLimits;
use berth_core::worker::{Selector, WorkerRecord, WorkerStatus};
use berth_host::supervisor::{Host, HostOptions, KernelEntry, LaunchAs};
use berth_sys::fake::{Behaviour, FakeEvent, FakeWorld};
use berth_sys::gpu::{FakeGpus, GpuMonitor};
use berth_sys::launcher::{ShimSpec, SPEC_FILE};
use berth_sys::netns::FakeNetns;

const GIB: u64 = 1 << 30;

/// A supervisor of a host with 4 CPUs, 8 GiB, 10 worker slots, 2 fake GPUs and a /28 of
/// worker addresses, over the fakes of `world`.
struct Fixture {
    host: Host,
    world: FakeWorld,
    net: Arc<FakeNetns>,
    _dir: tempfile::TempDir,
}

fn fake_net() -> Arc<FakeNetns> {
    Arc::new(FakeNetns {
        subnet: Some(Subnet::parse("10.99.0.0/28").unwrap()),
        ..Default::default()
    })
}

/// The supervisor of the fixture's host, with its state under `dir` and records in `store`.
fn fake_host(
    dir: &std::path::Path,
    world: &FakeWorld,
    net: &Arc<FakeNetns>,
    store: Option<berth_sys::store::StoreWriter>,
) -> Host {
    let mut opts = HostOptions::with_defaults(
        "fake",
        dir,
        Capacity {
            cpu: 4.0,
            memory_bytes: 8 * GIB,
            workers: 10,
        },
    );
    opts.stop_grace = Duration::from_millis(200);
    opts.kill_limit = Duration::from_secs(1);
    Host::with_network(
        opts,
        world.cgroups(),
        world.spawner(),
        store,
        Arc::new(FakeGpus::new("fake", 2)),
        GpuMonitor::idle(),
        net.clone(),
    )
}

fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let world = FakeWorld::new();
    let net = fake_net();
    let host = fake_host(dir.path(), &world, &net, None);
    host.start_background();
    Fixture {
        host,
        world,
        net,
        _dir: dir,
    }
}

fn request(n: u32) -> LaunchRequest {
    LaunchRequest {
        n,
        cpu: 1.0,
        memory_gb: 1.0,
        command: vec!["/bin/true".into()],
        network: NetworkMode::Bridge,
        ..Default::default()
    }
}

impl Fixture {
    async fn launch(&self, req: LaunchRequest) -> Result<Vec<String>, Error> {
        let spec = launch::validate(&req, |k| self.host.knows_kernel(k))?;
        let ws = self.host.launch(spec, LaunchAs::default()).await?;
        Ok(ws.into_iter().map(|w| w.id).collect())
    }

    /// Waits until every one of `ids` has ended (at most 5 s); returns their records.
    async fn ended(&self, ids: &[String]) -> Vec<WorkerRecord> {
        let out = self
            .host
            .await_workers(ids.to_vec(), None, true, Some(Duration::from_secs(5)))
            .await
            .unwrap();
        let mut all: Vec<WorkerRecord> = out.reached.into_iter().chain(out.failures).collect();
        all.sort_by_key(|w| ids.iter().position(|i| *i == w.id));
        assert!(
            all.iter().all(|w| w.status.is_terminal()),
            "not ended: {all:?}"
        );
        all
    }

    async fn running(&self, ids: &[String]) {
        let out = self
            .host
            .await_workers(ids.to_vec(), None, false, Some(Duration::from_secs(5)))
            .await
            .unwrap();
        assert_eq!(
            out.reached.len(),
            ids.len(),
            "not running: {:?}",
            out.failures
        );
    }

    /// What is held for workers: CPU, memory, slots, GPUs, addresses, namespaces and cgroups.
    fn held(&self) -> (f64, u64, u32, u32, usize, usize, usize) {
        let v = self.host.view();
        (
            v.allocated.cpu,
            v.allocated.memory_bytes,
            v.allocated.workers,
            v.gpu_allocated,
            v.ip_leases,
            self.net.live.lock().unwrap().len(),
            self.world.cgroup_ids().len(),
        )
    }
}

fn signals_of(events: &[FakeEvent], id: &str) -> Vec<i32> {
    events
        .iter()
        .filter_map(|e| match e {
            FakeEvent::Signalled(w, s) if w == id => Some(*s),
            _ => None,
        })
        .collect()
}

#[tokio::test]
async fn a_launch_starts_every_worker_and_their_ends_free_everything() {
    let f = fixture();
    let mut req = request(3);
    req.nvidia_gpu = 0;
    let ids = f.launch(req).await.unwrap();
    f.running(&ids).await;
    assert_eq!(f.world.running(), {
        let mut s = ids.clone();
        s.sort();
        s
    });
    assert_eq!(f.held(), (3.0, 3 * GIB, 3, 0, 3, 3, 3));
    for (k, id) in ids.iter().enumerate() {
        assert!(f.world.exit(id, k as i32));
    }
    let ws = f.ended(&ids).await;
    let got: Vec<(WorkerStatus, Option<i32>)> =
        ws.iter().map(|w| (w.status, w.exit_code)).collect();
    assert_eq!(
        got,
        vec![
            (WorkerStatus::Succeeded, Some(0)),
            (WorkerStatus::Failed, Some(1)),
            (WorkerStatus::Failed, Some(2)),
        ]
    );
    assert_eq!(f.held(), (0.0, 0, 0, 0, 0, 0, 0), "everything freed");
}

#[tokio::test]
async fn a_launch_that_does_not_fit_changes_nothing() {
    let f = fixture();
    let mut req = request(5);
    req.cpu = 1.0; // 5 cores of 4
    match f.launch(req).await {
        Err(Error::ResourceExhausted(m)) => assert!(m.contains("cpu"), "{m}"),
        other => panic!("expected RESOURCE_EXHAUSTED, got {other:?}"),
    }
    let mut req = request(2);
    req.nvidia_gpu = 2; // 4 GPUs of 2
    assert!(matches!(
        f.launch(req).await,
        Err(Error::ResourceExhausted(_))
    ));
    assert_eq!(f.held(), (0.0, 0, 0, 0, 0, 0, 0));
    assert!(f.world.events().is_empty(), "nothing asked of the host");
}

#[tokio::test]
async fn gpus_are_held_exclusively_and_given_back() {
    let f = fixture();
    let mut req = request(2);
    req.nvidia_gpu = 1;
    let ids = f.launch(req).await.unwrap();
    f.running(&ids).await;
    assert_eq!(f.held().3, 2);
    let mut more = request(1);
    more.nvidia_gpu = 1;
    assert!(matches!(
        f.launch(more).await,
        Err(Error::ResourceExhausted(_))
    ));
    for id in &ids {
        f.world.exit(id, 0);
    }
    f.ended(&ids).await;
    assert_eq!(f.held().3, 0);
}

#[tokio::test]
async fn stop_sends_sigterm_and_kills_the_cgroup_only_after_the_grace() {
    let f = fixture();
    let obeys = f.launch(request(1)).await.unwrap();
    f.running(&obeys).await;
    f.world.set_default(Behaviour {
        ignores_sigterm: true,
        ..Default::default()
    });
    let stubborn = f.launch(request(1)).await.unwrap();
    f.running(&stubborn).await;

    let t = Instant::now();
    let stopped = f
        .host
        .stop(
            Selector::Ids(vec![obeys[0].clone(), stubborn[0].clone()]),
            Some(Duration::from_millis(300)),
            "stopped",
        )
        .await
        .unwrap();
    let took = t.elapsed();
    assert_eq!(stopped.len(), 2);
    assert!(stopped
        .iter()
        .all(|w| w.status == WorkerStatus::Stopped && w.reason == "stopped"));
    let ev = f.world.events();
    assert_eq!(signals_of(&ev, &obeys[0]), vec![libc::SIGTERM]);
    assert!(!ev.contains(&FakeEvent::Killed(obeys[0].clone())));
    assert_eq!(signals_of(&ev, &stubborn[0]), vec![libc::SIGTERM]);
    assert!(ev.contains(&FakeEvent::Killed(stubborn[0].clone())));
    assert!(
        took >= Duration::from_millis(300),
        "killed before the grace: {took:?}"
    );
    assert!(took < Duration::from_secs(3), "{took:?}");
    assert_eq!(f.held(), (0.0, 0, 0, 0, 0, 0, 0));
    // Idempotent: a second stop changes nothing and signals nobody.
    let again = f
        .host
        .stop(Selector::Ids(obeys.clone()), None, "stopped")
        .await
        .unwrap();
    assert_eq!(again[0].status, WorkerStatus::Stopped);
    assert_eq!(signals_of(&f.world.events(), &obeys[0]).len(), 1);
}

/// A worker whose processes survive SIGKILL (uninterruptible sleep) makes the stop an error that
/// names it, after the kill limit and not before; the others of the same stop are stopped. The
/// kills in between are paced, not a busy loop, and a later stop tries again.
#[tokio::test]
async fn a_worker_that_survives_its_kill_fails_the_stop() {
    let f = fixture();
    let obeys = f.launch(request(1)).await.unwrap();
    f.running(&obeys).await;
    f.world.set_default(Behaviour {
        unkillable: true,
        ..Default::default()
    });
    let stuck = f.launch(request(1)).await.unwrap();
    f.running(&stuck).await;
    let both = Selector::Ids(vec![obeys[0].clone(), stuck[0].clone()]);
    let kills = |f: &Fixture| {
        f.world
            .events()
            .iter()
            .filter(|e| **e == FakeEvent::Killed(stuck[0].clone()))
            .count()
    };

    let t = Instant::now();
    let err = f
        .host
        .stop(both.clone(), Some(Duration::from_millis(100)), "stopped")
        .await
        .unwrap_err();
    let took = t.elapsed();
    let Error::Internal(msg) = &err else {
        panic!("not INTERNAL: {err:?}");
    };
    assert!(
        msg.contains(&stuck[0]) && msg.contains("could not be ended") && msg.contains("1 process"),
        "{msg}"
    );
    assert!(!msg.contains(&obeys[0]), "{msg}");
    // Grace (0.1 s) and kill limit (1 s), and not much more.
    assert!(
        took >= Duration::from_millis(1100),
        "gave up early: {took:?}"
    );
    assert!(took < Duration::from_secs(3), "{took:?}");
    let killed = kills(&f);
    assert!(
        (1..=6).contains(&killed),
        "{killed} kills in 1 s: paced, not a busy loop"
    );
    let ws = f.host.list(&Default::default()).await.unwrap();
    let status = |id: &str| ws.iter().find(|w| w.id == id).unwrap().status;
    assert_eq!(status(&obeys[0]), WorkerStatus::Stopped);
    assert_eq!(status(&stuck[0]), WorkerStatus::Running);

    // Stopped again: killed again, and again an error.
    let again = f
        .host
        .stop(both.clone(), Some(Duration::ZERO), "stopped")
        .await;
    assert!(matches!(again, Err(Error::Internal(_))), "{again:?}");
    assert!(kills(&f) > killed);

    // Once it ends, a stop is a success.
    f.world.exit(&stuck[0], 0);
    let ended = f.ended(&stuck).await;
    assert_eq!(ended[0].status, WorkerStatus::Stopped, "{ended:?}");
    let done = f.host.stop(both, None, "stopped").await.unwrap();
    assert!(done.iter().all(|w| w.status == WorkerStatus::Stopped));
    assert_eq!(f.held(), (0.0, 0, 0, 0, 0, 0, 0));
}

#[tokio::test]
async fn on_failure_restarts_with_exponential_back_off_up_to_the_limit() {
    let f = fixture();
    f.world.set_default(Behaviour {
        exit_at_once: Some(3),
        ..Default::default()
    });
    let mut req = request(1);
    req.restart = RestartPolicy {
        on_failure: true,
        max_restarts: 2,
        backoff_initial_ms: 100,
        backoff_max_ms: 10_000,
    };
    let ids = f.launch(req).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    let w = loop {
        let w = f.ended(&ids).await.remove(0);
        if w.restarts == 2 || Instant::now() > deadline {
            break w;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(
        (w.status, w.exit_code, w.restarts),
        (WorkerStatus::Failed, Some(3), 2)
    );
    let starts = f.world.starts(&ids[0]);
    assert_eq!(starts.len(), 3, "one start and two restarts");
    let gaps: Vec<Duration> = starts.windows(2).map(|p| p[1] - p[0]).collect();
    assert!(gaps[0] >= Duration::from_millis(100), "{gaps:?}");
    assert!(
        gaps[1] >= Duration::from_millis(200),
        "back-off doubles: {gaps:?}"
    );
    // Each run had a cgroup of its own; none is left.
    let created = f
        .world
        .events()
        .iter()
        .filter(|e| matches!(e, FakeEvent::CgroupCreated(i) if *i == ids[0]))
        .count();
    assert_eq!(created, 3);
    assert_eq!(f.held(), (0.0, 0, 0, 0, 0, 0, 0));
}

#[tokio::test]
async fn a_worker_that_succeeds_is_not_restarted() {
    let f = fixture();
    let mut req = request(1);
    req.restart = RestartPolicy {
        on_failure: true,
        max_restarts: 5,
        backoff_initial_ms: 10,
        backoff_max_ms: 100,
    };
    let ids = f.launch(req).await.unwrap();
    f.running(&ids).await;
    f.world.exit(&ids[0], 0);
    let w = f.ended(&ids).await.remove(0);
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!((w.status, w.restarts), (WorkerStatus::Succeeded, 0));
    assert_eq!(f.world.starts(&ids[0]).len(), 1);
}

#[tokio::test]
async fn a_lapsed_session_stops_its_workers_and_only_those() {
    let f = fixture();
    let s = f
        .host
        .open_session(1, BTreeMap::new(), None, "")
        .await
        .unwrap();
    let mut req = request(2);
    req.session_id = s.id.clone();
    let in_session = f.launch(req).await.unwrap();
    let outside = f.launch(request(1)).await.unwrap();
    f.running(&in_session).await;
    f.running(&outside).await;
    let t = Instant::now();
    let ws = f.ended(&in_session).await;
    assert!(t.elapsed() < Duration::from_secs(4), "{:?}", t.elapsed());
    assert!(ws
        .iter()
        .all(|w| w.status == WorkerStatus::Stopped && w.reason == "session ended"));
    assert_eq!(f.world.running(), outside, "the other worker runs on");
    assert!(matches!(
        f.host.keep_alive(&s.id).await,
        Err(Error::NotFound(_))
    ));
    // An ended session takes no new workers.
    let mut req = request(1);
    req.session_id = s.id;
    assert!(matches!(f.launch(req).await, Err(Error::NotFound(_))));
    f.world.exit(&outside[0], 0);
    f.ended(&outside).await;
}

#[tokio::test]
async fn keep_alive_holds_a_session_past_its_ttl() {
    let f = fixture();
    let s = f
        .host
        .open_session(1, BTreeMap::new(), None, "")
        .await
        .unwrap();
    let mut req = request(1);
    req.session_id = s.id.clone();
    let ids = f.launch(req).await.unwrap();
    f.running(&ids).await;
    for _ in 0..6 {
        tokio::time::sleep(Duration::from_millis(300)).await;
        f.host.keep_alive(&s.id).await.unwrap();
    }
    assert_eq!(f.world.running(), ids, "renewed: still running after 1.8 s");
    let stopped = f
        .host
        .close_session(&s.id, Some(Duration::ZERO))
        .await
        .unwrap();
    assert_eq!(stopped.len(), 1);
    assert_eq!(f.ended(&ids).await[0].reason, "session ended");
}

#[tokio::test]
async fn an_oom_kill_is_reported_as_such() {
    let f = fixture();
    f.world.set_default(Behaviour {
        oom: true,
        ..Default::default()
    });
    let ids = f.launch(request(1)).await.unwrap();
    let w = f.ended(&ids).await.remove(0);
    assert_eq!(w.status, WorkerStatus::Failed);
    assert_eq!(w.reason, "OOMKilled");
    assert_eq!(w.signal, Some(libc::SIGKILL));
}

#[tokio::test]
async fn a_worker_whose_shim_cannot_start_it_fails_and_frees_what_it_held() {
    let f = fixture();
    f.world.set_default(Behaviour {
        spawn_error: Some("exec /bin/true: permission denied".into()),
        ..Default::default()
    });
    let ids = f.launch(request(2)).await.unwrap();
    for id in &ids {
        // The shim of a worker that never ran exits without an exit record.
        assert!(!f.world.exit(id, 0), "never running");
    }
    // Its "pidfd" closes with the handle: drop is the shim's exit.
    let ws = f.ended(&ids).await;
    for w in &ws {
        assert_eq!(w.status, WorkerStatus::Failed, "{w:?}");
        assert!(w.reason.starts_with("spawn failed"), "{}", w.reason);
    }
    assert_eq!(f.held(), (0.0, 0, 0, 0, 0, 0, 0));
}

#[tokio::test]
async fn a_launch_of_more_workers_than_the_host_holds_makes_nothing() {
    let f = fixture();
    // 2^32 - 1: once an id and a record per worker were made before admission looked at n.
    match f.launch(request(u32::MAX)).await {
        Err(Error::ResourceExhausted(m)) => {
            assert!(m.contains("limits.max_workers_per_launch"), "{m}")
        }
        other => panic!("expected RESOURCE_EXHAUSTED, got {other:?}"),
    }
    // Within the cap of one launch, past the slots.
    match f.launch(request(11)).await {
        Err(Error::ResourceExhausted(m)) => {
            assert_eq!(m, "workers: 11 requested, 10 of 10 slots free")
        }
        other => panic!("expected RESOURCE_EXHAUSTED, got {other:?}"),
    }
    assert_eq!(f.held(), (0.0, 0, 0, 0, 0, 0, 0));
    assert!(f.world.events().is_empty(), "nothing asked of the host");
    assert_eq!(f.host.metrics().launch_refusals.load(Ordering::Relaxed), 2);
}

/// A fixture whose host runs the `python3` kernel as `/usr/bin/python3 -u`, with an exec limit
/// of `arg_max` bytes.
fn kernel_fixture(arg_max: usize) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let world = FakeWorld::new();
    let net = fake_net();
    let mut opts = HostOptions::with_defaults(
        "fake",
        dir.path(),
        Capacity {
            cpu: 4.0,
            memory_bytes: 8 * GIB,
            workers: 10,
        },
    );
    opts.kernels = vec![KernelEntry {
        name: "python3".into(),
        invocation: Some(launch::KernelInvocation {
            interpreter: "/usr/bin/python3".into(),
            args: vec!["-u".into()],
            code_flag: "-c".into(),
        }),
        candidates: vec!["/usr/bin/python3".into()],
        pool_size: 0,
        preload: Vec::new(),
    }];
    opts.exec = ExecLimits { arg_max };
    let host = Host::with_network(
        opts,
        world.cgroups(),
        world.spawner(),
        None,
        Arc::new(FakeGpus::new("fake", 0)),
        GpuMonitor::idle(),
        net.clone(),
    );
    Fixture {
        host,
        world,
        net,
        _dir: dir,
    }
}

impl Fixture {
    /// The spec the shim of worker `id` was given.
    fn spec_of(&self, id: &str) -> ShimSpec {
        let bytes = std::fs::read(self.host.worker_dir(id).join(SPEC_FILE)).unwrap();
        serde_json::from_slice(&bytes).unwrap()
    }
}

#[tokio::test]
async fn code_too_long_for_the_command_line_goes_by_fd_and_the_rest_stays() {
    let f = kernel_fixture(2 << 20);
    let code_req = |code: &str| LaunchRequest {
        command: vec![],
        code: code.into(),
        network: NetworkMode::Host,
        ..request(1)
    };
    let small = f.launch(code_req("print(1)")).await.unwrap();
    let spec = f.spec_of(&small[0]);
    assert_eq!(spec.argv, ["/usr/bin/python3", "-u", "-c", "print(1)"]);
    assert_eq!(spec.source, None);

    // Past 64 KiB: the interpreter reads /proc/self/fd/3, and the record does not hold the code.
    let long = format!("#{}\n", "x".repeat(64 << 10));
    let big = f.launch(code_req(&long)).await.unwrap();
    let spec = f.spec_of(&big[0]);
    assert_eq!(spec.argv, ["/usr/bin/python3", "-u", "/proc/self/fd/3"]);
    // Written once for the launch, linked into the worker's directory, not in the spec.
    assert_eq!((spec.source.as_deref(), spec.source_file), (None, true));
    let shared = f
        .host
        .worker_dir(&big[0])
        .join(berth_sys::launcher::SOURCE_FILE);
    assert_eq!(std::fs::read_to_string(shared).unwrap(), long);
    let rec = f.host.snapshot(&Default::default()).unwrap();
    let rec = rec.iter().find(|w| w.id == big[0]).unwrap();
    assert_eq!(rec.command, spec.argv);

    // Within 64 KiB, but the command line with the env would not fit the exec limit: by fd.
    let f = kernel_fixture(200 << 10);
    let mut req = code_req(&"#".repeat(60 << 10));
    req.env = (0..3)
        .map(|i| (format!("V{i}"), "v".repeat(60 << 10)))
        .collect();
    let ids = f.launch(req.clone()).await.unwrap();
    assert_eq!(f.spec_of(&ids[0]).argv.last().unwrap(), "/proc/self/fd/3");
    // An env that does not fit even so is refused, naming it, and nothing is made.
    req.env.insert("V3".into(), "v".repeat(60 << 10));
    let events = f.world.events().len();
    match f.launch(req).await {
        Err(Error::InvalidArgument { field, message }) => {
            assert_eq!(field, "env");
            assert!(message.contains("ARG_MAX"), "{message}");
        }
        other => panic!("expected INVALID_ARGUMENT, got {other:?}"),
    }
    assert_eq!(f.world.events().len(), events, "nothing asked of the host");
    assert_eq!(f.held().2, 1, "only the first launch's worker");
}

/// A daemon that dies leaves its workers to the next: one that ended meanwhile gets its real
/// end from its exit record, one whose processes still run is followed until they end, and one
/// of which nothing is left is LOST; the next daemon kills none of them.
#[test]
fn a_restarted_daemon_picks_up_each_worker_the_right_way() {
    use berth_host::supervisor::open_store;
    use berth_sys::store::StoreWriter;

    let dir = tempfile::tempdir().unwrap();
    let world = FakeWorld::new();
    let net = fake_net();
    let (store, origin) = open_store(dir.path(), false).unwrap();
    let store = Arc::new(store);
    let (writer, writer_thread) = StoreWriter::start_shared(store.clone());
    let host = |rt: &tokio::runtime::Runtime| {
        let _enter = rt.enter();
        fake_host(dir.path(), &world, &net, Some(writer.clone()))
    };

    // The first daemon launches three workers, then dies with its runtime: no shutdown.
    let first = tokio::runtime::Runtime::new().unwrap();
    let h1 = host(&first);
    let ids = first.block_on(async {
        let spec = launch::validate(&request(3), |_| false).unwrap();
        let ids: Vec<String> = h1
            .launch(spec, LaunchAs::default())
            .await
            .unwrap()
            .into_iter()
            .map(|w| w.id)
            .collect();
        let out = h1
            .await_workers(ids.clone(), None, false, Some(Duration::from_secs(5)))
            .await
            .unwrap();
        assert_eq!(out.reached.len(), 3);
        ids
    });
    drop(h1);
    first.shutdown_background();
    let (ended, orphan, gone) = (&ids[0], &ids[1], &ids[2]);
    assert!(world.exit(ended, 3), "ends while no daemon runs");
    assert!(world.vanish(gone));

    let second = tokio::runtime::Runtime::new().unwrap();
    let h2 = host(&second);
    second.block_on(async {
        let report = h2.recover(&store, &origin).await.unwrap();
        assert_eq!(
            (
                report.ended_while_down,
                report.lost,
                report.adopted,
                report.unaccounted
            ),
            (1, 1, 0, 0),
            "{report:?}"
        );
        let by_id = |id: &str| {
            let id = id.to_owned();
            let h2 = h2.clone();
            async move {
                h2.await_workers(vec![id], None, false, Some(Duration::ZERO))
                    .await
                    .unwrap()
            }
        };
        let e = by_id(ended).await.failures.remove(0);
        assert_eq!(
            (e.status, e.exit_code),
            (WorkerStatus::Failed, Some(3)),
            "{e:?}"
        );
        let g = by_id(gone).await.failures.remove(0);
        assert_eq!(g.status, WorkerStatus::Lost, "{g:?}");
        assert!(g.reason.contains("exit status unknown"), "{}", g.reason);
        let o = by_id(orphan).await.reached.remove(0);
        assert_eq!(o.status, WorkerStatus::Running, "{o:?}");
        assert!(o.reason.starts_with("unsupervised"), "{}", o.reason);
        // Nothing was killed: the orphan's processes run on until they end by themselves.
        assert_eq!(world.running(), vec![orphan.clone()]);
        assert!(!world
            .events()
            .iter()
            .any(|e| matches!(e, FakeEvent::Killed(_) | FakeEvent::Signalled(..))));
        world.exit(orphan, 0);
        let o = h2
            .await_workers(
                vec![orphan.clone()],
                None,
                true,
                Some(Duration::from_secs(5)),
            )
            .await
            .unwrap()
            .failures
            .remove(0);
        assert_eq!(o.status, WorkerStatus::Lost, "{o:?}");
        assert!(o.reason.contains("unsupervised"), "{}", o.reason);
    });
    drop(h2);
    second.shutdown_background();
    writer.stop();
    writer_thread.join().unwrap();
    assert!(world.cgroup_ids().is_empty(), "{:?}", world.cgroup_ids());
}

/// The fixture's host over a state store that fails on demand.
fn fixture_with_store() -> (Fixture, Arc<berth_sys::fake::FakeStore>) {
    let dir = tempfile::tempdir().unwrap();
    let world = FakeWorld::new();
    let net = fake_net();
    let store = Arc::new(berth_sys::fake::FakeStore::open(
        &dir.path().join("state.redb"),
    ));
    // The writer ends with the host (its last sender).
    let (writer, _) = berth_sys::store::StoreWriter::start_shared(store.clone());
    let host = fake_host(dir.path(), &world, &net, Some(writer));
    host.start_background();
    let f = Fixture {
        host,
        world,
        net,
        _dir: dir,
    };
    (f, store)
}

/// Worker records in the store, by id.
fn stored_workers(store: &berth_sys::fake::FakeStore) -> BTreeMap<String, WorkerRecord> {
    let (all, bad) = store
        .store()
        .load::<WorkerRecord>(berth_sys::store::Table::Workers)
        .unwrap();
    assert!(bad.is_empty());
    all.into_iter().collect()
}

fn unavailable(r: Result<impl std::fmt::Debug, Error>, what: &str) -> String {
    match r {
        Err(Error::Unavailable(m)) => {
            assert!(m.contains("no room"), "{what}: says why: {m}");
            m
        }
        other => panic!("{what}: expected UNAVAILABLE, got {other:?}"),
    }
}

#[tokio::test]
async fn a_launch_the_store_refuses_is_unavailable_and_leaves_nothing_behind() {
    let (f, store) = fixture_with_store();
    store.fail(Some("no room"));
    let mut req = request(2);
    req.nvidia_gpu = 1;
    unavailable(f.launch(req).await, "launch");
    assert_eq!(
        f.held(),
        (0.0, 0, 0, 0, 0, 0, 0),
        "the admission is given back"
    );
    assert!(f.world.events().is_empty(), "no process of it ever ran");
    assert!(f.host.list(&Default::default()).await.unwrap().is_empty());
    // Once the store takes writes, launches go on; only they are recorded.
    store.fail(None);
    let ids = f.launch(request(1)).await.unwrap();
    f.running(&ids).await;
    assert_eq!(
        stored_workers(&store).into_keys().collect::<Vec<_>>(),
        ids,
        "the refused launch left no record"
    );
    f.world.exit(&ids[0], 0);
    f.ended(&ids).await;
}

#[tokio::test]
async fn a_stop_or_close_the_store_refuses_signals_nothing() {
    let (f, store) = fixture_with_store();
    let s = f
        .host
        .open_session(60, BTreeMap::new(), None, "")
        .await
        .unwrap();
    let mut req = request(1);
    req.session_id = s.id.clone();
    let ids = f.launch(req).await.unwrap();
    f.running(&ids).await;
    store.fail(Some("no room"));
    unavailable(
        f.host
            .stop(Selector::Ids(ids.clone()), Some(Duration::ZERO), "stopped")
            .await,
        "stop",
    );
    unavailable(
        f.host.close_session(&s.id, Some(Duration::ZERO)).await,
        "close",
    );
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(f.world.running(), ids, "still running");
    assert!(signals_of(&f.world.events(), &ids[0]).is_empty());
    let w = &f.host.list(&Default::default()).await.unwrap()[0];
    assert_eq!((w.status, &w.stop_reason), (WorkerStatus::Running, &None));
    // The session is still open: it takes renewals once the store does.
    store.fail(None);
    f.host.keep_alive(&s.id).await.unwrap();
    let stopped = f
        .host
        .close_session(&s.id, Some(Duration::ZERO))
        .await
        .unwrap();
    assert_eq!(stopped[0].status, WorkerStatus::Stopped);
    // The stop and the end are durable.
    let rec = &stored_workers(&store)[&ids[0]];
    assert_eq!(
        (rec.status, rec.stop_reason.as_deref()),
        (WorkerStatus::Stopped, Some("session ended"))
    );
}

#[tokio::test]
async fn renewals_the_store_refuses_do_not_hold_a_lease() {
    let (f, store) = fixture_with_store();
    let s = f
        .host
        .open_session(1, BTreeMap::new(), None, "")
        .await
        .unwrap();
    let mut req = request(1);
    req.session_id = s.id.clone();
    let ids = f.launch(req).await.unwrap();
    f.running(&ids).await;
    store.fail(Some("no room"));
    unavailable(
        f.host.open_session(60, BTreeMap::new(), None, "").await,
        "open",
    );
    // Every renewal is refused: the lease lapses at its time, as if none had come.
    let t = Instant::now();
    while f.world.running() == ids && t.elapsed() < Duration::from_secs(4) {
        unavailable(f.host.keep_alive(&s.id).await, "keep-alive");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let w = f.ended(&ids).await.remove(0);
    assert_eq!(
        (w.status, w.reason.as_str()),
        (WorkerStatus::Stopped, "session ended")
    );
    assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
}

#[tokio::test]
async fn facts_the_store_refuses_are_written_once_it_takes_them() {
    let (f, store) = fixture_with_store();
    let ids = f.launch(request(1)).await.unwrap();
    f.running(&ids).await;
    store.fail(Some("no room"));
    // The worker ends while the store refuses: memory follows the fact at once...
    f.world.exit(&ids[0], 3);
    let w = f.ended(&ids).await.remove(0);
    assert_eq!(w.exit_code, Some(3));
    assert!(!stored_workers(&store)[&ids[0]].status.is_terminal());
    // ...and the store once it can, without anyone asking.
    store.fail(None);
    let t = Instant::now();
    while !stored_workers(&store)[&ids[0]].status.is_terminal() {
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "the end never written"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(stored_workers(&store)[&ids[0]], w);
}

/// A launch retried with its `request_id` by the same owner gets the first launch's workers,
/// also when the retries race it, and nothing more is made; another owner's id is its own; a
/// retry asking for another count is refused naming `request_id`, changing nothing.
#[tokio::test]
async fn a_retried_launch_gets_its_first_workers_and_makes_nothing() {
    let f = fixture();
    let as_owner = |owner: &str| LaunchAs {
        owner: owner.into(),
        ..Default::default()
    };
    let launch = |n: u32, id: &str, owner: &str| {
        let spec = launch::validate(
            &LaunchRequest {
                request_id: id.into(),
                cpu: 0.5,
                command: vec!["/bin/sleep".into(), "30".into()],
                ..request(n)
            },
            |k| f.host.knows_kernel(k),
        )
        .unwrap();
        let host = f.host.clone();
        let who = as_owner(owner);
        async move {
            host.launch(spec, who)
                .await
                .map(|ws| ws.into_iter().map(|w| w.id).collect::<Vec<_>>())
        }
    };
    let first = launch(2, "r1", "alice").await.unwrap();
    let held = f.held();
    let (a, b, c) = tokio::join!(
        launch(2, "r1", "alice"),
        launch(2, "r1", "alice"),
        launch(2, "r1", "alice")
    );
    for again in [a, b, c] {
        assert_eq!(again.unwrap(), first, "the same workers, in launch order");
    }
    assert_eq!(f.held(), held, "nothing more held or made");
    let e = launch(3, "r1", "alice").await.unwrap_err();
    assert!(
        matches!(&e, Error::InvalidArgument { field, .. } if field == "request_id"),
        "{e:?}"
    );
    assert_eq!(f.held(), held);
    // Bob's r1 is not alice's; a launch without an id is always new.
    let bobs = launch(2, "r1", "bob").await.unwrap();
    assert!(bobs.iter().all(|id| !first.contains(id)));
    let anon1 = launch(1, "", "alice").await.unwrap();
    let anon2 = launch(1, "", "alice").await.unwrap();
    assert_ne!(anon1, anon2);
    assert_eq!(f.held().2, 2 + 2 + 1 + 1);
    // The id is kept with the workers: a restarted daemon answers retries the same way (the
    // e2e tier restarts a real one).
    let recs = f
        .host
        .list(&berth_core::worker::Filter {
            ids: first.clone(),
            ..Default::default()
        })
        .await
        .unwrap();
    assert!(recs.iter().all(|r| r.request_id.as_deref() == Some("r1")));
}
