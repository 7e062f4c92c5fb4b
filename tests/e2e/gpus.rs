//! End-to-end tests of GPUs: a real berthd with the fake backend (`--gpus fake:4`), real workers
//! and the real device cgroup (v1 `devices.deny` or the v2 eBPF filter, whichever the host
//! has). Enforcement is checked against real device numbers: char nodes 195:N made in a temp
//! dir, which a worker may open (ENXIO: no driver behind them) or not (EPERM).

use std::collections::BTreeMap;
use std::ffi::CString;
use std::io::{Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::time::{Duration, Instant};

use berth_sys::gpu::fake_uuid;
use berth_tests::{await_running, host_info, ids_of, launch};
use berth_tests::{command_request, pb, require_root, scaled, Client, Daemon, DaemonOptions};
use tonic::Code;

/// A daemon with four fake GPUs, sampling them every 0.2 s.
async fn gpu_daemon(extra_args: &[&str]) -> Daemon {
    let mut args: Vec<String> = vec!["--gpus".into(), "fake:4".into()];
    args.extend(extra_args.iter().map(|s| s.to_string()));
    Daemon::start_with(DaemonOptions {
        config: "gpu_telemetry_seconds = 0.2\n[resources]\ncpu = 4.0\nmemory_gb = 4.0\n".into(),
        args,
        ..Default::default()
    })
    .await
    .unwrap()
}

fn gpu_request(n: u32, gpus: u32, command: &[&str]) -> pb::LaunchWorkersRequest {
    pb::LaunchWorkersRequest {
        nvidia_gpu: gpus,
        ..command_request(n, command)
    }
}

async fn list_all(c: &Client) -> Vec<pb::Worker> {
    c.workers()
        .list_workers(pb::ListWorkersRequest::default())
        .await
        .unwrap()
        .into_inner()
        .workers
}

async fn stop(c: &Client, ids: &[String]) {
    c.workers()
        .stop_workers(pb::StopWorkersRequest {
            ids: ids.to_vec(),
            grace_seconds: Some(0),
            ..Default::default()
        })
        .await
        .unwrap();
}

fn allocated_gpus(h: &pb::HostInfo) -> u32 {
    h.allocated.as_ref().map_or(0, |a| a.gpus)
}

/// UUID → holder (empty when free), from HostInfo.
fn holders(h: &pb::HostInfo) -> BTreeMap<String, String> {
    h.gpus
        .iter()
        .map(|g| (g.uuid.clone(), g.worker_id.clone()))
        .collect()
}

/// Polls `f` until it returns `Some`, for at most `limit` (scaled).
async fn eventually<T, F, Fut>(limit: Duration, mut f: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + scaled(limit);
    loop {
        if let Some(v) = f().await {
            return Some(v);
        }
        if Instant::now() > deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inventory_is_in_host_info() {
    require_root!();
    let d = gpu_daemon(&[]).await;
    let c = d.client().await.unwrap();
    let h = host_info(&c).await;
    assert_eq!(h.gpu_backend, "fake");
    assert_eq!(h.capacity.as_ref().unwrap().gpus, 4);
    assert_eq!(allocated_gpus(&h), 0);
    assert_eq!(h.gpus.len(), 4);
    for (i, g) in h.gpus.iter().enumerate() {
        // Fake GPUs are the daemon's own: named after its host name, stable across restarts.
        assert_eq!(g.uuid, fake_uuid(&d.name, i as u32));
        assert_eq!((g.index, g.minor_number), (i as u32, i as u32));
        assert_eq!(g.name, "berth fake GPU");
        assert_eq!(g.memory_total_bytes, 16 << 30);
        assert!(g.memory_used_bytes > 0 && g.memory_used_bytes < g.memory_total_bytes);
        assert!(!g.pci_bus_id.is_empty());
        assert!(!g.mig_enabled);
        assert!(g.worker_id.is_empty());
    }
    assert!(
        d.log().contains("fake backend: 4 GPU(s)"),
        "start-up log says what was found:\n{}",
        d.log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claims_are_exclusive_all_or_nothing_and_freed() {
    require_root!();
    let d = gpu_daemon(&[]).await;
    let c = d.client().await.unwrap();
    let sleep = ["/bin/sleep", "60"];

    // Two workers of two GPUs each: disjoint UUIDs, every GPU held.
    let a = launch(&c, gpu_request(1, 2, &sleep)).await;
    let b = launch(&c, gpu_request(1, 2, &sleep)).await;
    let (a, b) = (&a[0], &b[0]);
    assert_eq!((a.nvidia_gpu, a.gpu_uuids.len()), (2, 2), "{a:?}");
    assert_eq!(b.gpu_uuids.len(), 2, "{b:?}");
    assert!(a.gpu_uuids.iter().all(|u| !b.gpu_uuids.contains(u)));
    let h = host_info(&c).await;
    assert_eq!(allocated_gpus(&h), 4);
    let held = holders(&h);
    for u in &a.gpu_uuids {
        assert_eq!(held[u], a.id);
    }
    for u in &b.gpu_uuids {
        assert_eq!(held[u], b.id);
    }
    // Close GPUs go together: the fake topology pairs 0-1 and 2-3.
    let mut pairs = [a.gpu_uuids.clone(), b.gpu_uuids.clone()];
    for p in &mut pairs {
        p.sort();
    }
    pairs.sort();
    assert_eq!(
        pairs[0],
        vec![h.gpus[0].uuid.clone(), h.gpus[1].uuid.clone()]
    );

    // A third launch is refused and changes nothing.
    let before = list_all(&c).await.len();
    let err = c
        .workers()
        .launch_workers(gpu_request(1, 1, &sleep))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert!(
        err.message()
            .contains("gpus: 1 × 1 = 1 requested, 0 of 4 free"),
        "{}",
        err.message()
    );
    assert_eq!(list_all(&c).await.len(), before);
    assert_eq!(holders(&host_info(&c).await), held);

    // Free two, then n = 3 × 2 GPUs with 2 free is refused whole; 1 × 2 fits and gets them.
    stop(&c, std::slice::from_ref(&a.id)).await;
    let h = host_info(&c).await;
    assert_eq!(allocated_gpus(&h), 2, "claims freed when the worker ended");
    let err = c
        .workers()
        .launch_workers(gpu_request(3, 2, &sleep))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted);
    assert!(
        err.message()
            .contains("gpus: 3 × 2 = 6 requested, 2 of 4 free"),
        "{}",
        err.message()
    );
    assert_eq!(
        list_all(&c).await.len(),
        before,
        "no worker of the refused launch"
    );
    assert_eq!(allocated_gpus(&host_info(&c).await), 2);
    let again = launch(&c, gpu_request(1, 2, &sleep)).await;
    let mut got = again[0].gpu_uuids.clone();
    got.sort();
    let mut freed = a.gpu_uuids.clone();
    freed.sort();
    assert_eq!(got, freed);
    stop(&c, &[b.id.clone(), again[0].id.clone()]).await;
    assert_eq!(allocated_gpus(&host_info(&c).await), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn all_or_nothing_with_every_gpu_free() {
    require_root!();
    let d = gpu_daemon(&[]).await;
    let c = d.client().await.unwrap();
    let err = c
        .workers()
        .launch_workers(gpu_request(3, 2, &["/bin/true"]))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted);
    assert!(
        err.message()
            .contains("gpus: 3 × 2 = 6 requested, 4 of 4 free"),
        "{}",
        err.message()
    );
    assert!(list_all(&c).await.is_empty());
    assert!(
        d.worker_cgroups().is_empty(),
        "no cgroup of a refused launch"
    );
    assert_eq!(allocated_gpus(&host_info(&c).await), 0);

    // Workers that end on their own free their GPUs too.
    let ws = launch(&c, gpu_request(2, 2, &["/bin/true"])).await;
    let all = berth_tests::await_all(&c, &ids_of(&ws)).await.unwrap();
    assert!(all
        .iter()
        .all(|w| w.status == pb::WorkerStatus::Succeeded as i32));
    assert_eq!(allocated_gpus(&host_info(&c).await), 0);
    assert!(holders(&host_info(&c).await).values().all(|w| w.is_empty()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_see_their_gpus_in_the_environment() {
    require_root!();
    let d = gpu_daemon(&[]).await;
    let c = d.client().await.unwrap();
    let show = [
        "/bin/sh",
        "-c",
        "echo \"CVD=${CUDA_VISIBLE_DEVICES-unset}\"; echo \"NVD=${NVIDIA_VISIBLE_DEVICES-unset}\"; \
         echo \"ORDER=${CUDA_DEVICE_ORDER-unset}\"",
    ];
    let mut with = gpu_request(1, 2, &show);
    // A request cannot widen what it was given.
    with.env
        .insert("CUDA_VISIBLE_DEVICES".into(), "0,1,2,3".into());
    let w = launch(&c, with).await.remove(0);
    let none = launch(&c, gpu_request(1, 0, &show)).await.remove(0);
    berth_tests::await_all(&c, &[w.id.clone(), none.id.clone()])
        .await
        .unwrap();
    let out = |id: String| {
        let c = c.clone();
        async move {
            String::from_utf8(
                berth_tests::output_of(&c, &id, pb::Stream::Stdout)
                    .await
                    .unwrap(),
            )
            .unwrap()
        }
    };
    let list = w.gpu_uuids.join(",");
    assert_eq!(
        out(w.id.clone()).await,
        format!("CVD={list}\nNVD={list}\nORDER=PCI_BUS_ID\n")
    );
    assert_eq!(out(none.id.clone()).await, "CVD=\nNVD=void\nORDER=unset\n");
}

/// Character device nodes `195:minor` in a temporary directory, removed on drop.
struct DeviceNodes {
    dir: tempfile::TempDir,
}

impl DeviceNodes {
    fn new(minors: &[u32]) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("berth-gpu-nodes-")
            .tempdir()
            .unwrap();
        for m in minors {
            let p = dir.path().join(format!("nvidia{m}"));
            let c = CString::new(p.as_os_str().as_bytes()).unwrap();
            // SAFETY: c is a valid NUL-terminated path; the rest are integers.
            let r =
                unsafe { libc::mknod(c.as_ptr(), libc::S_IFCHR | 0o666, libc::makedev(195, *m)) };
            assert_eq!(
                r,
                0,
                "mknod {}: {}",
                p.display(),
                std::io::Error::last_os_error()
            );
            // As /dev/nvidia* are (mknod's mode is cut by the umask): workers run as `nobody`,
            // and only the device cgroup may stand between them and a node.
            std::fs::set_permissions(&p, std::os::unix::fs::PermissionsExt::from_mode(0o666))
                .unwrap();
        }
        std::fs::set_permissions(
            dir.path(),
            std::os::unix::fs::PermissionsExt::from_mode(0o755),
        )
        .unwrap();
        Self { dir }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }
}

/// A worker program that opens every `nvidia*` node of `dir` and prints `minor errno-name`
/// per node, sorted (`OK` when the open succeeds).
fn probe_code(dir: &Path) -> String {
    format!(
        "import os, errno\n\
         d = {:?}\n\
         for n in sorted(os.listdir(d), key=lambda s: int(s[6:])):\n\
         \x20   try:\n\
         \x20       os.close(os.open(os.path.join(d, n), os.O_RDWR))\n\
         \x20       r = 'OK'\n\
         \x20   except OSError as e:\n\
         \x20       r = errno.errorcode.get(e.errno, str(e.errno))\n\
         \x20   print(n[6:], r)\n",
        dir.display().to_string()
    )
}

fn parse_probe(out: &str) -> BTreeMap<u32, String> {
    out.lines()
        .filter_map(|l| {
            let (m, r) = l.split_once(' ')?;
            Some((m.parse().ok()?, r.to_owned()))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn device_cgroup_allows_only_the_held_gpus() {
    require_root!();
    if !Path::new("/usr/bin/python3").exists() && !Path::new("/usr/local/bin/python3").exists() {
        berth_tests::cannot_run("needs python3 for the device probe");
        return;
    }
    let nodes = DeviceNodes::new(&[0, 1, 2, 3, 255]);
    let d = gpu_daemon(&[]).await;
    let c = d.client().await.unwrap();
    let code = probe_code(nodes.path());
    let req = |gpus: u32| pb::LaunchWorkersRequest {
        n: 1,
        cpu: 0.2,
        memory_gb: 0.25,
        nvidia_gpu: gpus,
        code: code.clone(),
        ..Default::default()
    };
    let one = launch(&c, req(1)).await.remove(0);
    let two = launch(&c, req(2)).await.remove(0);
    let none = launch(&c, req(0)).await.remove(0);
    let ids = vec![one.id.clone(), two.id.clone(), none.id.clone()];
    let all = berth_tests::await_all(&c, &ids).await.unwrap();
    for w in &all {
        assert_eq!(w.status, pb::WorkerStatus::Succeeded as i32, "{w:?}");
    }
    let h = host_info(&c).await;
    let minor_of = |uuid: &str| h.gpus.iter().find(|g| g.uuid == uuid).unwrap().minor_number;
    for w in [&one, &two, &none] {
        let out = berth_tests::output_of(&c, &w.id, pb::Stream::Stdout)
            .await
            .unwrap();
        let got = parse_probe(&String::from_utf8_lossy(&out));
        let held: Vec<u32> = w.gpu_uuids.iter().map(|u| minor_of(u)).collect();
        let mut want = BTreeMap::new();
        for m in 0..4 {
            // Held: the cgroup lets the open through to the (absent) driver.
            let r = if held.contains(&m) { "ENXIO" } else { "EPERM" };
            want.insert(m, r.to_string());
        }
        // nvidiactl stays open to everyone.
        want.insert(255, "ENXIO".to_string());
        assert_eq!(got, want, "worker holding minors {held:?}");
    }
    drop(nodes);
}

/// `text` without terminal colour sequences (the daemon's text logs have them).
fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(ch) = chars.next() {
        if ch == '\x1b' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(ch);
        }
    }
    out
}

/// GET /metrics from `addr`.
fn metrics(addr: &str) -> String {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let mut body = String::new();
    let _ = s.read_to_string(&mut body);
    body
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn telemetry_attributes_gpu_processes_to_workers_and_reports_strays() {
    require_root!();
    let metrics_addr = format!("127.0.0.1:{}", berth_tests::free_port());
    let d = gpu_daemon(&["--metrics-listen", &metrics_addr]).await;
    let c = d.client().await.unwrap();
    // The fake driver counts a process as a GPU user while its CUDA_VISIBLE_DEVICES names the GPU.
    let w = launch(&c, gpu_request(1, 1, &["/bin/sleep", "60"]))
        .await
        .remove(0);
    await_running(&c, std::slice::from_ref(&w.id)).await;
    let uuid = w.gpu_uuids[0].clone();
    let used = eventually(Duration::from_secs(10), || {
        let c = c.clone();
        let id = w.id.clone();
        async move {
            let ws = c
                .workers()
                .list_workers(pb::ListWorkersRequest {
                    ids: vec![id],
                    ..Default::default()
                })
                .await
                .ok()?
                .into_inner()
                .workers;
            let b = ws.first()?.gpu_memory_used_bytes;
            (b > 0).then_some(b)
        }
    })
    .await;
    assert_eq!(
        used,
        Some(64 << 20),
        "the worker's GPU memory, from its process"
    );
    let h = host_info(&c).await;
    let g = h.gpus.iter().find(|g| g.uuid == uuid).unwrap();
    assert!(g.utilization_percent > 0, "{g:?}");
    assert_eq!(g.worker_id, w.id);
    let idle = h.gpus.iter().find(|g| g.uuid != uuid).unwrap();
    assert_eq!(idle.utilization_percent, 0);
    assert!(g.memory_used_bytes > idle.memory_used_bytes);

    // A process on a GPU that no live worker accounts for is reported, not ignored.
    let free_uuid = h
        .gpus
        .iter()
        .find(|g| g.worker_id.is_empty())
        .unwrap()
        .uuid
        .clone();
    let mut stray = std::process::Command::new("/bin/sleep")
        .arg("60")
        .env("CUDA_VISIBLE_DEVICES", &free_uuid)
        .spawn()
        .unwrap();
    let stray_pid = stray.id();
    let logged = eventually(Duration::from_secs(10), || {
        let log = strip_ansi(&d.log());
        async move {
            log.lines()
                .any(|l| {
                    l.contains("GPU process outside any live worker")
                        && l.contains(&format!("pid={stray_pid}"))
                })
                .then_some(())
        }
    })
    .await;
    let m = metrics(&metrics_addr);
    let _ = stray.kill();
    let _ = stray.wait();
    assert!(logged.is_some(), "stray process logged:\n{}", d.log());
    let idx = h.gpus.iter().find(|g| g.uuid == free_uuid).unwrap().index;
    assert!(
        m.contains(&format!(
            "berth_gpu_stray_processes{{gpu=\"{idx}\",uuid=\"{free_uuid}\"}} 1"
        )),
        "{m}"
    );
    assert!(
        m.contains(&format!(
            "berth_worker_gpu_memory_used_bytes{{worker=\"{}\"}} {}",
            w.id,
            64 << 20
        )),
        "{m}"
    );
    assert!(m.contains("berth_capacity{resource=\"gpus\"} 4"), "{m}");
    assert!(m.contains("berth_allocated{resource=\"gpus\"} 1"), "{m}");
    stop(&c, std::slice::from_ref(&w.id)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claims_survive_a_daemon_restart() {
    require_root!();
    let mut d = gpu_daemon(&[]).await;
    let c = d.client().await.unwrap();
    let w = launch(&c, gpu_request(1, 3, &["/bin/sleep", "60"]))
        .await
        .remove(0);
    await_running(&c, std::slice::from_ref(&w.id)).await;
    d.stop_daemon(libc::SIGTERM);
    d.restart(&["--gpus".to_string(), "fake:4".to_string()])
        .await
        .unwrap();
    let c = d.client().await.unwrap();
    let h = host_info(&c).await;
    assert_eq!(allocated_gpus(&h), 3, "{h:?}");
    let held = holders(&h);
    for u in &w.gpu_uuids {
        assert_eq!(held[u], w.id, "re-adopted worker keeps {u}");
    }
    let err = c
        .workers()
        .launch_workers(gpu_request(1, 2, &["/bin/true"]))
        .await
        .unwrap_err();
    assert!(
        err.message()
            .contains("gpus: 1 × 2 = 2 requested, 1 of 4 free"),
        "{}",
        err.message()
    );
    stop(&c, std::slice::from_ref(&w.id)).await;
    assert_eq!(allocated_gpus(&host_info(&c).await), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarts_keep_the_same_gpus_and_their_isolation() {
    require_root!();
    let nodes = DeviceNodes::new(&[0, 1, 2, 3]);
    let d = gpu_daemon(&[]).await;
    let c = d.client().await.unwrap();
    // Every run prints its GPUs and which GPU nodes the device cgroup lets it open (an allowed
    // open still fails, with ENXIO: no driver), then fails.
    let script = format!(
        "echo \"run $CUDA_VISIBLE_DEVICES\"; for n in 0 1 2 3; do \
         case \"$(LC_ALL=C; (exec 3<>{}/nvidia$n) 2>&1)\" in \
         *'not permitted'*) echo \"$n denied\";; *) echo \"$n allowed\";; esac; done; exit 1",
        nodes.path().display()
    );
    let mut req = gpu_request(1, 2, &["/bin/sh", "-c", &script]);
    req.restart = Some(pb::RestartPolicy {
        mode: pb::restart_policy::Mode::OnFailure as i32,
        max_restarts: 2,
        backoff_initial_ms: 100,
        backoff_max_ms: 200,
    });
    let w = launch(&c, req).await.remove(0);
    let all = berth_tests::await_all(&c, std::slice::from_ref(&w.id))
        .await
        .unwrap();
    assert_eq!(
        all[0].status,
        pb::WorkerStatus::Failed as i32,
        "{:?}",
        all[0]
    );
    assert_eq!(all[0].restarts, 2);
    assert_eq!(all[0].gpu_uuids, w.gpu_uuids, "same claim across restarts");
    let out = String::from_utf8(
        berth_tests::output_of(&c, &w.id, pb::Stream::Stdout)
            .await
            .unwrap(),
    )
    .unwrap();
    let mut line = format!("run {}\n", w.gpu_uuids.join(","));
    for n in 0..4 {
        let held = w
            .gpu_uuids
            .iter()
            .any(|u| u.ends_with(&format!("{n:012x}")));
        line += &format!("{n} {}\n", if held { "allowed" } else { "denied" });
    }
    assert_eq!(
        out,
        line.repeat(3),
        "every run: same GPUs, same device rules"
    );
    assert_eq!(
        allocated_gpus(&host_info(&c).await),
        0,
        "freed after the last run"
    );
    drop(nodes);
}
