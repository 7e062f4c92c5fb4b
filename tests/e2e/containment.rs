//! End-to-end tests of containment: a fork bomb, a memory hog and a CPU hog in a worker are each
//! held by their cgroup (pids limit, OOM kill, CPU quota) and stopped within `grace + 2 s`, with
//! nothing of them left — no process, no cgroup — when `StopWorkers` answers; a bomb whose main
//! process ends is ended by the shim just as well.
//!
//! Each bomb ignores SIGTERM, so its end is the work of the SIGKILL of its cgroup, and is then
//! held to 0.1 % of a core (the test writes the quota as root), the state that 2,000 tasks under
//! a quota of half a core reach on a busy host: hundreds of tasks that share so little CPU take
//! minutes to all reach the freezer, which is where a kill that waits for the freeze, or does
//! not thaw after it, never ends.
//!
//! The tests load the CPU, so they run one at a time. Everything here holds on cgroup v1 and v2
//! (the v2 tier runs this binary too); durations go through [`scaled`].

use std::time::{Duration, Instant};

use berth_tests::{
    await_all, cpu_time_of, ids_of, launch, pb, processes_with_env, require_root, scaled,
    timeout_scale, worker_now as get, Client, Daemon, DaemonOptions,
};
use tokio::sync::Mutex;

/// Held by every test: each one loads the CPU.
static ONE_AT_A_TIME: Mutex<()> = Mutex::const_new(());

/// The grace period of every stop here.
const GRACE: Duration = Duration::from_secs(1);

/// The pids limit of the daemons here: a bomb fills it in a few seconds.
const PIDS_MAX: u64 = 512;

/// Every task of it forks two more and spins; SIGTERM and fork errors are ignored.
const SPINNING_BOMB: &str =
    "exec 2>/dev/null; trap '' TERM; bomb() { bomb | bomb & while :; do :; done; }; bomb";

/// `secs` seconds, stretched by the harness's timeout scale.
fn within(secs: f64) -> Duration {
    scaled(Duration::from_secs_f64(secs))
}

/// The longest a stop may take: the grace period, then 2 s to kill and report.
fn stop_limit() -> Duration {
    GRACE + within(2.0)
}

async fn daemon() -> Daemon {
    Daemon::start_with(DaemonOptions {
        config: format!("[worker]\npids_max = {PIDS_MAX}\n"),
        ..Default::default()
    })
    .await
    .unwrap()
}

fn request(cpu: f64, memory_gb: f64, command: &[&str]) -> pb::LaunchWorkersRequest {
    pb::LaunchWorkersRequest {
        n: 1,
        cpu,
        memory_gb,
        command: command.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    }
}

async fn launch_one(c: &Client, req: pb::LaunchWorkersRequest) -> pb::Worker {
    let ws = launch(c, req).await;
    assert_eq!(ws.len(), 1);
    let ids = ids_of(&ws);
    let r = c
        .workers()
        .await_workers(pb::AwaitWorkersRequest {
            ids: ids.clone(),
            wait_for_completion: Some(false),
            timeout_seconds: Some(within(30.0).as_secs() as u32),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(r.failures.is_empty(), "not running: {:?}", r.failures);
    get(c, &ids[0]).await
}

/// Reads a number from worker `id`'s cgroup file `file`, or a `key` of it (flat-keyed files).
fn cgroup_number(d: &Daemon, id: &str, file: &str, key: Option<&str>) -> Option<u64> {
    let text = std::fs::read_to_string(d.worker_cgroup_file(id, file)?).ok()?;
    match key {
        None => text.trim().parse().ok(),
        Some(k) => text.lines().find_map(|l| {
            let (name, v) = l.split_once(' ')?;
            (name == k).then(|| v.trim().parse().ok()).flatten()
        }),
    }
}

/// Waits until worker `id` has hit its pids limit (a fork refused: `max` of `pids.events`) and
/// holds nearly as many tasks; returns its task count then.
async fn wait_for_pids_max(d: &Daemon, id: &str) -> u64 {
    let deadline = Instant::now() + within(60.0);
    loop {
        let refused = cgroup_number(d, id, "pids.events", Some("max")).unwrap_or(0);
        let current = cgroup_number(d, id, "pids.current", None).unwrap_or(0);
        if refused > 0 && current >= PIDS_MAX * 9 / 10 {
            return current;
        }
        assert!(
            Instant::now() < deadline,
            "the bomb never hit pids.max {PIDS_MAX}: {current} tasks, {refused} forks refused"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Holds worker `id` to 0.1 % of a core (1 ms a second), as root behind the daemon's back.
fn throttle(d: &Daemon, id: &str) {
    match d.worker_cgroup_file(id, "cpu.cfs_quota_us") {
        Some(quota) => {
            std::fs::write(&quota, "1000").unwrap();
            std::fs::write(quota.with_file_name("cpu.cfs_period_us"), "1000000").unwrap();
        }
        None => {
            let max = d.worker_cgroup_file(id, "cpu.max").expect("cpu.max");
            std::fs::write(max, "1000 1000000").unwrap();
        }
    }
}

/// The stop of worker `id` with [`GRACE`]: its answer and how long it took.
async fn stop(c: &Client, id: &str) -> (Result<pb::Worker, tonic::Status>, Duration) {
    let t = Instant::now();
    let r = c
        .workers()
        .stop_workers(pb::StopWorkersRequest {
            ids: vec![id.to_owned()],
            grace_seconds: Some(GRACE.as_secs() as u32),
            ..Default::default()
        })
        .await
        .map(|r| r.into_inner().workers.remove(0));
    (r, t.elapsed())
}

/// What is left of worker `id`: its live processes (found by the `BERTH_WORKER_ID` every one of
/// them inherits, wherever it is) and whether its cgroup still exists.
fn leftovers(d: &Daemon, id: &str) -> (Vec<u32>, bool) {
    (
        processes_with_env("BERTH_WORKER_ID", id),
        d.worker_cgroups().iter().any(|w| w == id),
    )
}

/// Stops worker `id` and checks that it is gone, all of it, when the stop answers, within
/// [`stop_limit`] and not before the grace period.
async fn stop_and_check_gone(d: &Daemon, c: &Client, id: &str, what: &str) -> Duration {
    let daemon_pid = d.pid().unwrap();
    let cpu0 = cpu_time_of(daemon_pid).unwrap_or_default();
    let (r, took) = stop(c, id).await;
    let (procs, cgroup) = leftovers(d, id);
    let daemon_cpu = cpu_time_of(daemon_pid)
        .unwrap_or_default()
        .saturating_sub(cpu0);
    eprintln!(
        "{what}: stopped in {took:?} (grace {GRACE:?}); berthd used {daemon_cpu:?} of CPU; \
         left: {} processes, cgroup {cgroup}",
        procs.len()
    );
    let w = r.unwrap_or_else(|s| panic!("{what}: stop failed: {s:?}"));
    assert_eq!(w.status(), pb::WorkerStatus::Stopped, "{what}: {w:?}");
    assert_eq!(w.reason, "stopped", "{what}");
    assert!(
        procs.is_empty(),
        "{what}: {} processes alive when the stop answered",
        procs.len()
    );
    assert!(!cgroup, "{what}: the worker's cgroup is still there");
    assert!(took >= GRACE, "{what}: killed before the grace: {took:?}");
    assert!(
        took <= stop_limit(),
        "{what}: stop took {took:?}, more than {:?}",
        stop_limit()
    );
    // Killing a cgroup is a few rounds of reads and signals, with sleeps between them.
    assert!(
        daemon_cpu <= took / 2,
        "{what}: berthd used {daemon_cpu:?} of CPU in a stop of {took:?}"
    );
    took
}

/// A fork bomb of spinning shells fills its pids limit and no more; held to 0.1 % of a core and
/// deaf to SIGTERM, it is stopped within the grace period and 2 s, nothing of it left when the
/// stop answers. Before the kill thawed after every round and lifted the quota, it was never
/// stopped: the stop answered OK after 16 s with the worker RUNNING.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fork_bomb_hits_pids_max_and_is_stopped_within_grace() {
    require_root!();
    let _one = ONE_AT_A_TIME.lock().await;
    let d = daemon().await;
    let c = d.client().await.unwrap();
    let w = launch_one(&c, request(0.5, 0.5, &["/bin/sh", "-c", SPINNING_BOMB])).await;
    let t = Instant::now();
    let tasks = wait_for_pids_max(&d, &w.id).await;
    eprintln!("fork bomb: at pids.max {:?} after its start", t.elapsed());
    let current = cgroup_number(&d, &w.id, "pids.current", None).unwrap();
    assert!(
        current <= PIDS_MAX,
        "{current} tasks above pids.max {PIDS_MAX}"
    );
    throttle(&d, &w.id);
    tokio::time::sleep(Duration::from_millis(500)).await;
    eprintln!("fork bomb: {tasks} tasks at pids.max {PIDS_MAX}, then held to 0.1 % of a core");
    // The daemon keeps answering meanwhile.
    assert_eq!(get(&c, &w.id).await.status(), pb::WorkerStatus::Running);
    stop_and_check_gone(&d, &c, &w.id, "fork bomb").await;
    let info = c
        .host()
        .get_host_info(pb::GetHostInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.allocated.unwrap().workers, 0);
}

/// When a worker's main process ends, its shim kills whatever is left in its cgroup: a bomb
/// whose main process exits at once, and a bomb at its pids limit, held to 0.1 % of a core, whose
/// main process then exits. Nothing is left of either once the worker is reported ended.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bomb_whose_main_process_ends_leaves_nothing() {
    require_root!();
    let _one = ONE_AT_A_TIME.lock().await;
    let d = daemon().await;
    let c = d.client().await.unwrap();

    // The main process starts the bomb and exits at once.
    let t = Instant::now();
    let ws = launch(
        &c,
        request(
            0.5,
            0.5,
            &["/bin/sh", "-c", &format!("({SPINNING_BOMB}) & exit 0")],
        ),
    )
    .await;
    let ended = await_all(&c, &ids_of(&ws)).await.unwrap().remove(0);
    let took = t.elapsed();
    let (procs, cgroup) = leftovers(&d, &ended.id);
    eprintln!(
        "bomb, main exits at once: ended {:?} in {took:?} after the launch; left: {} processes, \
         cgroup {cgroup}",
        ended.status(),
        procs.len()
    );
    assert_eq!(ended.status(), pb::WorkerStatus::Succeeded, "{ended:?}");
    assert!(procs.is_empty(), "{} bomb processes survived", procs.len());
    assert!(!cgroup, "the worker's cgroup is still there");
    assert!(took <= within(5.0), "ended {took:?} after its launch");

    // The bomb fills its pids limit under a main process that waits on a FIFO (a `read`: no
    // fork, which the limit would refuse); held to 0.1 %, the main process is told to exit. It
    // could not run to do so at 0.1 % among hundreds of spinning tasks, so on v1 it first leaves
    // the worker's CPU cgroup (its other cgroups it keeps); on v2 there is one cgroup, and the
    // bomb keeps its quota of half a core.
    let fifo = d.dir.join("exit-now");
    let c_fifo = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: c_fifo is a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c_fifo.as_ptr(), 0o666) }, 0);
    std::fs::set_permissions(&fifo, std::os::unix::fs::PermissionsExt::from_mode(0o666)).unwrap();
    let main = format!("({SPINNING_BOMB}) & read go < {}; exit 0", fifo.display());
    let w = launch_one(&c, request(0.5, 0.5, &["/bin/sh", "-c", &main])).await;
    let tasks = wait_for_pids_max(&d, &w.id).await;
    let held = match d.worker_cgroup_file(&w.id, "cpu.cfs_quota_us") {
        Some(quota) => {
            let parent = quota.parent().and_then(|d| d.parent()).unwrap();
            std::fs::write(parent.join("cgroup.procs"), w.pid.to_string()).unwrap();
            throttle(&d, &w.id);
            tokio::time::sleep(Duration::from_millis(500)).await;
            "0.1 % of a core"
        }
        None => "half a core",
    };
    let t = Instant::now();
    let told = tokio::task::spawn_blocking(move || std::fs::write(fifo, "go\n"));
    tokio::time::timeout(within(5.0), told)
        .await
        .expect("the main process never opened the FIFO")
        .unwrap()
        .unwrap();
    let ended = await_all(&c, std::slice::from_ref(&w.id))
        .await
        .unwrap()
        .remove(0);
    let took = t.elapsed();
    let (procs, cgroup) = leftovers(&d, &w.id);
    eprintln!(
        "bomb of {tasks} tasks held to {held}, main exits: ended {:?} ({}) {took:?} after it was \
         told; left: {} processes, cgroup {cgroup}",
        ended.status(),
        ended.reason,
        procs.len()
    );
    assert_eq!(ended.status(), pb::WorkerStatus::Succeeded, "{ended:?}");
    assert!(procs.is_empty(), "{} bomb processes survived", procs.len());
    assert!(!cgroup, "the worker's cgroup is still there");
    // The main process itself needs its share of 1 ms a second to exit.
    assert!(
        took <= within(5.0),
        "ended {took:?} after its main process was told"
    );
}

/// A memory hog is OOM-killed at its limit and reported as `OOMKilled`, and the child it left is
/// killed with it; a hog that keeps allocating again at its limit (each one OOM-killed, the next
/// started) is stopped within the grace period and 2 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_memory_hog_is_oom_killed_and_stopped() {
    require_root!();
    let _one = ONE_AT_A_TIME.lock().await;
    let d = daemon().await;
    let c = d.client().await.unwrap();
    const HOG: &str = "import subprocess\n\
        subprocess.Popen(['sleep', '1000'])\n\
        b = bytearray(512 << 20)\n\
        for i in range(0, len(b), 4096):\n\
        \x20   b[i] = 1\n\
        print('survived')\n";
    let python = "/usr/bin/python3";
    let ws = launch(&c, request(0.5, 0.0625, &[python, "-c", HOG])).await;
    let w = await_all(&c, &ids_of(&ws)).await.unwrap().remove(0);
    let (procs, cgroup) = leftovers(&d, &w.id);
    assert_eq!(w.status(), pb::WorkerStatus::Failed, "{w:?}");
    assert_eq!(w.reason, "OOMKilled", "{w:?}");
    assert_eq!(w.signal, Some(libc::SIGKILL), "{w:?}");
    assert!(
        w.memory_peak_bytes <= (64 << 20) + (1 << 20),
        "peak {} above the 64 MiB limit",
        w.memory_peak_bytes
    );
    assert!(procs.is_empty(), "the hog's child survived: {procs:?}");
    assert!(!cgroup, "the worker's cgroup is still there");

    // Hog after hog at the limit, deaf to SIGTERM (an ignored signal stays ignored across exec).
    let again = format!(
        "trap '' TERM; while :; do {python} -c \"{}\"; done",
        "b = bytearray(512 << 20)\nfor i in range(0, len(b), 4096): b[i] = 1"
    );
    let w = launch_one(&c, request(0.5, 0.0625, &["/bin/sh", "-c", &again])).await;
    let deadline = Instant::now() + within(30.0);
    let oom_kills = || {
        cgroup_number(&d, &w.id, "memory.oom_control", Some("oom_kill"))
            .or_else(|| cgroup_number(&d, &w.id, "memory.events", Some("oom_kill")))
            .unwrap_or(0)
    };
    while oom_kills() < 2 {
        assert!(Instant::now() < deadline, "no OOM kill of the hogs");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stop_and_check_gone(&d, &c, &w.id, "memory hogs").await;
}

/// Four busy loops, deaf to SIGTERM, use no more than their quota of half a core, then are
/// stopped within the grace period and 2 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cpu_hog_is_held_to_its_quota_and_stopped() {
    require_root!();
    let _one = ONE_AT_A_TIME.lock().await;
    let d = daemon().await;
    let c = d.client().await.unwrap();
    let hog = "trap '' TERM; for i in 1 2 3; do while :; do :; done & done; while :; do :; done";
    let w = launch_one(&c, request(0.5, 0.125, &["/bin/sh", "-c", hog])).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    // The ceiling on the longest span between two reads of the counter, the floor on the
    // shortest (`cpu_windows`).
    let (low, high) = berth_tests::cpu_windows(&c, &w.id, 3).await;
    eprintln!("cpu hog: {low:.3?} to {high:.3?} cores in 1 s windows, quota 0.5");
    let most = low.iter().copied().fold(0.0, f64::max);
    assert!(
        most <= 0.575,
        "used {most:.3} cores with cpu = 0.5: {low:.3?}"
    );
    let best = high.iter().copied().fold(0.0, f64::max);
    let floor = if timeout_scale() > 1.0 { 0.25 } else { 0.35 };
    assert!(best >= floor, "never got near its 0.5 cores: {high:.3?}");
    stop_and_check_gone(&d, &c, &w.id, "cpu hog").await;
}
