//! End-to-end tests of faults the daemon survives and reports: a full disk under a worker's
//! output (the worker keeps running, the dropped bytes are counted in `output_dropped_bytes`
//! and the stream's offsets jump over them), and a shim killed under its running worker (the
//! worker's cgroup is killed, and the worker is LOST with "shim died (signal 9)").
//!
//! Everything here holds on cgroup v1 and v2 (the v2 tier runs this binary too); durations go
//! through [`scaled`].

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use berth_tests::{
    await_all, await_running, ids_of, launch, parent_of, pb, python_request, require_root, scaled,
    worker_now as get, Client, Daemon,
};

/// Polls worker `id` until `done` holds of it (within `limit`, scaled); returns it then.
async fn wait_for(
    c: &Client,
    id: &str,
    limit: Duration,
    what: &str,
    done: impl Fn(&pb::Worker) -> bool,
) -> pb::Worker {
    let deadline = Instant::now() + scaled(limit);
    loop {
        let w = get(c, id).await;
        if done(&w) {
            return w;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: not within {limit:?}: {w:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until `path` exists (within `limit`, scaled).
async fn wait_for_file(path: &Path, limit: Duration) {
    let deadline = Instant::now() + scaled(limit);
    while !path.exists() {
        assert!(
            Instant::now() < deadline,
            "{} not made within {limit:?}",
            path.display()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A tmpfs mounted for a test, detached when dropped (also when the test fails).
struct Mount(PathBuf);

impl Drop for Mount {
    fn drop(&mut self) {
        berth_tests::unmount(&self.0);
    }
}

/// Every chunk of a stream's output from the start: (offset, data) in order.
async fn chunks(c: &Client, id: &str) -> Vec<(u64, Vec<u8>)> {
    let mut s = c
        .workers()
        .stream_output(pb::StreamOutputRequest {
            ids: vec![id.to_owned()],
            follow: false,
            from_start: true,
            streams: vec![pb::Stream::Stdout as i32],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut out = Vec::new();
    while let Some(chunk) = s.message().await.unwrap() {
        out.push((chunk.offset, chunk.data));
    }
    out
}

/// A worker whose stdout directory sits on a full tmpfs writes 100 lines while it is full: the
/// shim's writes fail for real (ENOSPC), the worker keeps running, `output_dropped_bytes` says
/// exactly how much was lost; once there is room again its next lines are kept at offsets after
/// the gap, so a reader from the start sees the jump, and the worker succeeds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_drops_output_and_the_worker_keeps_running() {
    require_root!();
    let d = Daemon::start().await.unwrap();
    let c = d.client().await.unwrap();
    // Where the test tells the worker when to write (the worker may run as another user).
    let signals = tempfile::Builder::new()
        .prefix("berth-faults-")
        .tempdir()
        .unwrap();
    std::fs::set_permissions(
        signals.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o777),
    )
    .unwrap();
    let code = r#"
import os, sys, time
d = os.environ["SIGNALS"]
def wait(name):
    while not os.path.exists(os.path.join(d, name)):
        time.sleep(0.01)
wait("full")
for i in range(100):
    sys.stdout.write("dropped %04d " % i + "x" * 86 + "\n")
    sys.stdout.flush()
open(os.path.join(d, "written"), "w").close()
wait("room")
for i in range(10):
    sys.stdout.write("kept %d\n" % i)
    sys.stdout.flush()
"#;
    let mut req = python_request(1, code);
    req.env.insert(
        "SIGNALS".into(),
        signals.path().to_string_lossy().into_owned(),
    );
    let ws = launch(&c, req).await;
    let id = ids_of(&ws).remove(0);
    await_running(&c, std::slice::from_ref(&id)).await;

    // The worker has written nothing yet, so its shim has no output file open: the stream's
    // directory becomes a tmpfs of its own, filled to the last byte.
    let out_dir = d.state_dir().join("workers").join(&id).join("stdout");
    std::fs::create_dir_all(&out_dir).unwrap();
    berth_tests::mount_tmpfs(&out_dir, 64 << 10).unwrap();
    let _mount = Mount(out_dir.clone());
    let filler = out_dir.join("filler");
    let filled = berth_tests::fill_filesystem(&filler).unwrap();
    assert!(filled > 0);

    std::fs::write(signals.path().join("full"), "").unwrap();
    wait_for_file(&signals.path().join("written"), Duration::from_secs(20)).await;
    const DROPPED: u64 = 100 * 100;
    let w = wait_for(&c, &id, Duration::from_secs(10), "dropped counted", |w| {
        w.output_dropped_bytes >= DROPPED
    })
    .await;
    assert_eq!(w.output_dropped_bytes, DROPPED, "{w:?}");
    assert_eq!(w.status, pb::WorkerStatus::Running as i32, "{w:?}");
    assert!(
        d.log().contains("worker output dropped"),
        "not logged:\n{}",
        d.log()
    );

    // Room again: what comes next is kept, after the gap.
    std::fs::remove_file(&filler).unwrap();
    std::fs::write(signals.path().join("room"), "").unwrap();
    let end = await_all(&c, std::slice::from_ref(&id)).await.unwrap();
    let w = &end[0];
    assert_eq!(w.status, pb::WorkerStatus::Succeeded as i32, "{w:?}");
    assert_eq!(w.output_dropped_bytes, DROPPED, "{w:?}");

    let kept: String = (0..10).map(|i| format!("kept {i}\n")).collect();
    let got = chunks(&c, &id).await;
    // Offsets never go back and never overlap; the first kept byte is where the dropped ones
    // would have ended.
    let mut pos = 0;
    let mut data = Vec::new();
    for (offset, bytes) in &got {
        assert!(*offset >= pos, "offset {offset} before {pos}: {got:?}");
        pos = offset + bytes.len() as u64;
        data.extend_from_slice(bytes);
    }
    assert_eq!(got.first().map(|c| c.0), Some(DROPPED), "{got:?}");
    assert_eq!(String::from_utf8_lossy(&data), kept);
    assert_eq!(pos, DROPPED + kept.len() as u64);
}

/// Whether this kernel tells how a process that is not our child ended (`PIDFD_INFO_EXIT`,
/// Linux 6.15): then the reason names the signal that killed the shim.
fn kernel_tells_exit_status() -> bool {
    let me = berth_sys::launcher::pidfd_open(std::process::id() as i32).unwrap();
    berth_sys::launcher::pidfd_exit(std::os::fd::AsFd::as_fd(&me))
        != berth_sys::launcher::PidfdExit::Unknown
}

/// A `kill -9` of a running worker's shim: the worker (which would otherwise run on, its output
/// going nowhere) is killed with its cgroup, and is LOST with "shim died (signal 9)"; nothing of
/// it is left. The daemon goes on serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shim_killed_leaves_its_worker_lost_and_killed() {
    require_root!();
    let d = Daemon::start().await.unwrap();
    let c = d.client().await.unwrap();
    let ws = launch(
        &c,
        berth_tests::command_request(1, &["sh", "-c", "sleep 1000 & wait"]),
    )
    .await;
    let id = ids_of(&ws).remove(0);
    let w = await_running(&c, std::slice::from_ref(&id)).await.remove(0);
    let worker_pid = w.pid;
    let shim = parent_of(worker_pid).expect("the worker's parent");
    let comm = std::fs::read_to_string(format!("/proc/{shim}/comm")).unwrap();
    assert_eq!(comm.trim(), "berth-shim", "parent of the worker: {shim}");
    // The shell and its `sleep` (forked a moment after the worker runs: wait for it).
    let t = Instant::now();
    let procs = loop {
        let procs = d.worker_cgroup_procs(&id);
        if procs.len() >= 2 {
            break procs;
        }
        assert!(
            t.elapsed() < scaled(Duration::from_secs(5)),
            "worker processes: {procs:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };

    // SAFETY: kill(2) of the shim found above.
    assert_eq!(unsafe { libc::kill(shim as i32, libc::SIGKILL) }, 0);
    let end = await_all(&c, std::slice::from_ref(&id)).await.unwrap();
    let w = &end[0];
    assert_eq!(w.status, pb::WorkerStatus::Lost as i32, "{w:?}");
    if kernel_tells_exit_status() {
        assert_eq!(w.reason, "shim died (signal 9)", "{w:?}");
    } else {
        assert!(w.reason.starts_with("shim died ("), "{w:?}");
    }
    // The worker's processes went before the end was recorded.
    for pid in procs {
        let alive = std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
            s.rsplit_once(')')
                .is_some_and(|(_, r)| !r.trim_start().starts_with(['Z', 'X']))
        });
        assert!(!alive, "worker process {pid} still alive");
    }
    assert!(
        !d.worker_cgroups().contains(&id),
        "cgroup of {id} left: {:?}",
        d.worker_cgroups()
    );
    // The daemon serves on: another worker runs and ends as it should.
    let ws = launch(&c, berth_tests::command_request(1, &["true"])).await;
    let end = await_all(&c, &ids_of(&ws)).await.unwrap();
    assert_eq!(end[0].status, pb::WorkerStatus::Succeeded as i32);
}

/// Code past the command line is written once for a launch, not once per worker: every
/// worker's directory holds a hard link to one file, their specs do not hold the code, and each
/// worker runs it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_launch_s_long_code_is_stored_once_for_all_its_workers() {
    require_root!();
    let d = Daemon::start().await.unwrap();
    let c = d.client().await.unwrap();
    let head = "import sys; print(len(open(sys.argv[0]).read()))\n";
    let code = format!("{head}#{}\n", "x".repeat((256 << 10) - head.len() - 2));
    let ws = launch(&c, python_request(3, &code)).await;
    let ids = ids_of(&ws);
    for w in await_all(&c, &ids).await.unwrap() {
        assert_eq!(w.status, pb::WorkerStatus::Succeeded as i32, "{w:?}");
        let out = berth_tests::output_of(&c, &w.id, pb::Stream::Stdout)
            .await
            .unwrap();
        assert_eq!(String::from_utf8_lossy(&out), format!("{}\n", 256 << 10));
    }
    use std::os::unix::fs::MetadataExt as _;
    let files: Vec<std::fs::Metadata> = ids
        .iter()
        .map(|id| std::fs::metadata(d.state_dir().join("workers").join(id).join("source")).unwrap())
        .collect();
    assert!(files.iter().all(|m| m.ino() == files[0].ino()), "one file");
    assert_eq!(files[0].nlink(), 3);
    assert_eq!(files[0].len(), 256 << 10);
    for id in &ids {
        let spec = d.state_dir().join("workers").join(id).join("spec.json");
        let len = std::fs::metadata(&spec).unwrap().len();
        assert!(len < 64 << 10, "{} holds {len} bytes", spec.display());
    }
}
