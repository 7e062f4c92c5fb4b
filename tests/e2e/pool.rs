//! End-to-end tests of the warm interpreter pool (`[kernels.python3] pool_size`, `preload`):
//! a pooled worker is what a cold one is (argv, `__name__`, environment, cwd, ids, limits, every
//! thread's credentials), its memory limit holds, the pool refills, launches that set a
//! start-time variable or another network mode start cold, `pool_size = 0` is cold, and
//! nothing of the pool outlives the daemon (stop, restart, kill -9).

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use berth_tests::{
    await_all, ids_of, launch, list_all, output_of, pb, require_root, scaled, worker_veths, Daemon,
    DaemonOptions,
};
use serde_json::Value;

/// What a worker tells of itself: one JSON line.
const PROBE: &str = r#"
import json, os, sys
def cg():
    r = {}
    for line in open('/proc/self/cgroup'):
        _, ctrls, path = line.rstrip('\n').split(':', 2)
        roots = ['/sys/fs/cgroup/' + ctrls] + ['/sys/fs/cgroup/' + c for c in ctrls.split(',') if c]
        roots += ['/sys/fs/cgroup/unified', '/sys/fs/cgroup']
        for root in roots:
            for f in ('cpu.cfs_quota_us', 'memory.limit_in_bytes', 'cpu.max', 'memory.max'):
                p = root + path + '/' + f
                if f not in r and os.path.isfile(p):
                    r[f] = open(p).read().strip()
    return r
def threads():
    t = []
    for tid in sorted(os.listdir('/proc/self/task')):
        s = {}
        for line in open('/proc/self/task/%s/status' % tid):
            k, _, v = line.partition(':')
            if k in ('Uid', 'Gid', 'Groups', 'CapInh', 'CapPrm', 'CapEff', 'CapBnd', 'CapAmb', 'NoNewPrivs', 'Seccomp'):
                s[k] = v.strip()
        t.append(s)
    return t
m = os.umask(0)
os.umask(m)
print(json.dumps({
    'argv': sys.argv,
    'name': __name__,
    'main': sorted(k for k in globals() if k.startswith('__')),
    'env': dict(os.environ),
    'cwd': os.getcwd(),
    'ids': [os.getresuid(), os.getresgid(), sorted(os.getgroups())],
    'umask': m,
    'cg': cg(),
    'threads': threads(),
    'path': sys.path,
    'flags': str(sys.flags),
    'limits': open('/proc/self/limits').read(),
    'oom': open('/proc/self/oom_score_adj').read().strip(),
    'nice': os.getpriority(os.PRIO_PROCESS, 0),
}))
"#;

fn pool_config(size: usize, preload: &[&str]) -> DaemonOptions {
    let preload: Vec<String> = preload.iter().map(|m| format!("\"{m}\"")).collect();
    DaemonOptions {
        config: format!(
            "worker_user = \"nobody\"\n[kernels.python3]\npool_size = {size}\npreload = [{}]\n",
            preload.join(", ")
        ),
        ..Default::default()
    }
}

fn probe_request(code: &str) -> pb::LaunchWorkersRequest {
    pb::LaunchWorkersRequest {
        n: 1,
        cpu: 0.5,
        memory_gb: 0.25,
        code: code.to_owned(),
        workdir: "/tmp".into(),
        env: [("MY_VAR".to_owned(), "x y".to_owned())].into(),
        ..Default::default()
    }
}

/// This daemon's ready pooled interpreters, as (pid, worker id): each holds its claim FIFO open.
fn ready_pooled(d: &Daemon) -> Vec<(u32, String)> {
    let workers = d.state_dir().join("workers");
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return out;
    };
    for e in rd.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        if std::fs::read_to_string(format!("/proc/{pid}/comm"))
            .map_or(true, |c| !c.starts_with("python3"))
        {
            continue;
        }
        let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            if let Ok(target) = std::fs::read_link(fd.path()) {
                if target.starts_with(&workers) && target.file_name().is_some_and(|n| n == "claim")
                {
                    let id = target
                        .parent()
                        .and_then(Path::file_name)
                        .map(|n| n.to_string_lossy().into_owned())
                        .unwrap_or_default();
                    out.push((pid, id));
                }
            }
        }
    }
    out
}

/// Every process of this daemon's pool: python3 processes whose cwd or cmdline names its state dir.
fn pool_processes(d: &Daemon) -> Vec<u32> {
    let state = d.state_dir();
    let needle = state.to_string_lossy().into_owned();
    berth_tests::processes_named("python3")
        .into_iter()
        .filter(|p| {
            std::fs::read(format!("/proc/{p}/cmdline"))
                .is_ok_and(|c| String::from_utf8_lossy(&c).contains(&needle))
        })
        .collect()
}

/// Worker directories that still hold the pool marker.
fn pool_dirs(d: &Daemon) -> Vec<String> {
    std::fs::read_dir(d.state_dir().join("workers"))
        .map(|rd| {
            rd.flatten()
                .filter(|e| e.path().join("pool").exists())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

async fn wait_ready(d: &Daemon, n: usize) -> Vec<(u32, String)> {
    let deadline = Instant::now() + scaled(Duration::from_secs(60));
    loop {
        let r = ready_pooled(d);
        if r.len() == n {
            return r;
        }
        assert!(
            Instant::now() < deadline,
            "{} pooled workers ready, not {n}:\n{}",
            r.len(),
            d.log()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + scaled(Duration::from_secs(30));
    while !done() {
        assert!(Instant::now() < deadline, "never: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn run_probe(d: &Daemon, req: pb::LaunchWorkersRequest) -> (pb::Worker, Value) {
    let c = d.client().await.unwrap();
    let ws = launch(&c, req).await;
    let id = ws[0].id.clone();
    let done = await_all(&c, std::slice::from_ref(&id)).await.unwrap();
    let out = output_of(&c, &id, pb::Stream::Stdout).await.unwrap();
    let err = output_of(&c, &id, pb::Stream::Stderr).await.unwrap();
    assert_eq!(
        done[0].status(),
        pb::WorkerStatus::Succeeded,
        "{:?}\nstderr: {}",
        done[0],
        String::from_utf8_lossy(&err)
    );
    let v: Value = serde_json::from_slice(&out).unwrap_or_else(|e| {
        panic!(
            "{e}: {}\nstderr: {}",
            String::from_utf8_lossy(&out),
            String::from_utf8_lossy(&err)
        )
    });
    (done[0].clone(), v)
}

/// The variables that name the worker itself or its host's bridge (another daemon's here).
const OWN: [&str; 4] = [
    "BERTH_WORKER_ID",
    "BERTH_WORKER_IP",
    "BERTH_MASTER_IP",
    "CDSW_MASTER_IP",
];

fn same_but_own(pooled: &Value, cold: &Value) {
    for key in [
        "argv", "name", "main", "cwd", "ids", "umask", "cg", "path", "flags", "limits", "oom",
        "nice",
    ] {
        assert_eq!(pooled[key], cold[key], "{key} differs");
    }
    let env = |v: &Value| -> BTreeMap<String, String> {
        serde_json::from_value(v["env"].clone()).unwrap()
    };
    let (p, c) = (env(pooled), env(cold));
    assert_eq!(
        p.keys().collect::<Vec<_>>(),
        c.keys().collect::<Vec<_>>(),
        "environment names differ"
    );
    for (k, v) in &p {
        if !OWN.contains(&k.as_str()) {
            assert_eq!(Some(v), c.get(k), "{k} differs");
        }
    }
    assert!(p.keys().all(|k| !k.contains("POOL")), "{p:?}");
    assert_eq!(p["MY_VAR"], "x y");
    // A cold worker's threads: all as its main thread, no capability, no_new_privs.
    for v in [pooled, cold] {
        let threads = v["threads"].as_array().unwrap();
        for t in threads {
            assert_eq!(t, &threads[0], "threads differ: {threads:?}");
            assert_eq!(t["CapEff"], "0000000000000000");
            assert_eq!(t["CapPrm"], "0000000000000000");
            assert_eq!(t["CapInh"], "0000000000000000");
            assert_eq!(t["CapAmb"], "0000000000000000");
            assert_eq!(t["NoNewPrivs"], "1");
        }
    }
    assert_eq!(pooled["threads"][0], cold["threads"][0]);
    assert_eq!(
        pooled["threads"].as_array().map(Vec::len),
        cold["threads"].as_array().map(Vec::len),
        "thread counts differ"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_pooled_worker_is_what_a_cold_one_is() {
    require_root!();
    let pooled = Daemon::start_with(pool_config(1, &[])).await.unwrap();
    let cold = Daemon::start_with(pool_config(0, &[])).await.unwrap();
    wait_ready(&pooled, 1).await;
    // Code.
    let (pw, pv) = run_probe(&pooled, probe_request(PROBE)).await;
    let (cw, cv) = run_probe(&cold, probe_request(PROBE)).await;
    assert!(pw.pooled, "{pw:?}");
    assert!(!cw.pooled, "pool_size = 0 starts cold: {cw:?}");
    assert_eq!(pv["argv"], serde_json::json!(["-c"]));
    assert_eq!(pv["name"], "__main__");
    assert_eq!(pv["cwd"], "/tmp");
    assert_eq!(pv["ids"][0][0], 65534, "runs as nobody: {}", pv["ids"]);
    assert!(!pw.ip_address.is_empty(), "a pooled worker has its address");
    same_but_own(&pv, &cv);
    // A script.
    let dir = tempfile::Builder::new()
        .prefix("berth-pool-")
        .tempdir_in("/tmp")
        .unwrap();
    std::fs::set_permissions(
        dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let script = dir.path().join("probe.py");
    std::fs::write(&script, PROBE).unwrap();
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    let script_req = || pb::LaunchWorkersRequest {
        code: String::new(),
        script: script.to_string_lossy().into_owned(),
        ..probe_request("")
    };
    wait_ready(&pooled, 1).await;
    let (pw, pv) = run_probe(&pooled, script_req()).await;
    let (_, cv) = run_probe(&cold, script_req()).await;
    assert!(pw.pooled);
    assert_eq!(pv["argv"], serde_json::json!([script.to_string_lossy()]));
    same_but_own(&pv, &cv);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_numpy_preload_waits_with_one_thread_and_runs_as_cold() {
    require_root!();
    if std::process::Command::new("/usr/bin/python3")
        .args(["-c", "import numpy"])
        .status()
        .map_or(true, |s| !s.success())
    {
        berth_tests::cannot_run("python3-numpy is not installed (apt-get install python3-numpy)");
        return;
    }
    let pooled = Daemon::start_with(pool_config(1, &["numpy"]))
        .await
        .unwrap();
    let cold = Daemon::start_with(pool_config(0, &[])).await.unwrap();
    let ready = wait_ready(&pooled, 1).await;
    // The preload ran with BLAS and OpenMP threads capped at 1: the interpreter waits with its
    // one thread, whose bounding set and capabilities the claim empties.
    let tasks = std::fs::read_dir(format!("/proc/{}/task", ready[0].0))
        .unwrap()
        .count();
    assert_eq!(tasks, 1);
    let code = format!("import numpy\nnumpy.ones((200, 200)) @ numpy.ones((200, 200))\n{PROBE}");
    let (pw, pv) = run_probe(&pooled, probe_request(&code)).await;
    let (_, cv) = run_probe(&cold, probe_request(&code)).await;
    assert!(pw.pooled);
    // What the preload set for itself is gone again.
    assert!(
        pv["env"].get("OPENBLAS_NUM_THREADS").is_none(),
        "{}",
        pv["env"]
    );
    same_but_own(&pv, &cv);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_pooled_worker_s_memory_limit_holds() {
    require_root!();
    let d = Daemon::start_with(pool_config(1, &[])).await.unwrap();
    wait_ready(&d, 1).await;
    let c = d.client().await.unwrap();
    let ws = launch(
        &c,
        pb::LaunchWorkersRequest {
            n: 1,
            cpu: 0.5,
            memory_gb: 0.125,
            code: "b = bytearray(400 << 20)\nfor i in range(0, len(b), 4096): b[i] = 1\nprint('survived')"
                .into(),
            ..Default::default()
        },
    )
    .await;
    assert!(ws[0].pooled, "{:?}", ws[0]);
    let done = await_all(&c, &ids_of(&ws)).await.unwrap();
    assert_eq!(done[0].status(), pb::WorkerStatus::Failed, "{:?}", done[0]);
    assert_eq!(done[0].reason, "OOMKilled", "{:?}", done[0]);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_pool_of_four_refills() {
    require_root!();
    let d = Daemon::start_with(pool_config(4, &[])).await.unwrap();
    let c = d.client().await.unwrap();
    let first = wait_ready(&d, 4).await;
    // Idle pooled workers hold memory on the host's books, and are no one's workers.
    let info = berth_tests::host_info(&c).await;
    assert!(
        info.allocated.as_ref().is_some_and(|a| a.memory_gb > 0.0),
        "{info:?}"
    );
    assert!(list_all(&c).await.is_empty());
    let mut taken = Vec::new();
    for round in 0..2 {
        for i in 0..4 {
            let ws = launch(&c, berth_tests::python_request(1, &format!("print({i})"))).await;
            assert!(ws[0].pooled, "round {round}, launch {i}: {:?}", ws[0]);
            let done = await_all(&c, &ids_of(&ws)).await.unwrap();
            assert_eq!(
                done[0].status(),
                pb::WorkerStatus::Succeeded,
                "{:?}",
                done[0]
            );
            let out = output_of(&c, &ws[0].id, pb::Stream::Stdout).await.unwrap();
            assert_eq!(out, format!("{i}\n").as_bytes());
            taken.push(ws[0].id.clone());
        }
        wait_ready(&d, 4).await;
    }
    // The first four were the ones ready at the start.
    let mut a: Vec<String> = first.into_iter().map(|(_, id)| id).collect();
    a.sort();
    let mut b = taken[..4].to_vec();
    b.sort();
    assert_eq!(a, b);
    assert_eq!(list_all(&c).await.len(), 8);
}

#[tokio::test(flavor = "multi_thread")]
async fn start_time_variables_and_other_networks_start_cold() {
    require_root!();
    let d = Daemon::start_with(pool_config(1, &[])).await.unwrap();
    let c = d.client().await.unwrap();
    wait_ready(&d, 1).await;
    for (what, req) in [
        (
            "PYTHONPATH",
            pb::LaunchWorkersRequest {
                env: [("PYTHONPATH".to_owned(), "/opt/x".to_owned())].into(),
                ..berth_tests::python_request(1, "import sys; print('/opt/x' in sys.path)")
            },
        ),
        (
            "OMP_NUM_THREADS",
            pb::LaunchWorkersRequest {
                env: [("OMP_NUM_THREADS".to_owned(), "1".to_owned())].into(),
                ..berth_tests::python_request(1, "print(True)")
            },
        ),
        (
            "host network",
            pb::LaunchWorkersRequest {
                network: pb::NetworkMode::Host as i32,
                ..berth_tests::python_request(1, "print(True)")
            },
        ),
        (
            "memory below the pooled worker's",
            pb::LaunchWorkersRequest {
                memory_gb: 0.001,
                ..berth_tests::python_request(1, "print(True)")
            },
        ),
    ] {
        let ws = launch(&c, req).await;
        assert!(!ws[0].pooled, "{what}: {:?}", ws[0]);
        let done = await_all(&c, &ids_of(&ws)).await.unwrap();
        if what != "memory below the pooled worker's" {
            let out = output_of(&c, &ws[0].id, pb::Stream::Stdout).await.unwrap();
            assert_eq!(out, b"True\n", "{what}: {:?}", done[0]);
        }
    }
    // The pooled worker is still there, for a launch that matches.
    assert_eq!(ready_pooled(&d).len(), 1);
    let ws = launch(&c, berth_tests::python_request(1, "print(1)")).await;
    assert!(ws[0].pooled);
}

#[tokio::test(flavor = "multi_thread")]
async fn nothing_of_the_pool_outlives_the_daemon() {
    require_root!();
    let mut d = Daemon::start_with(pool_config(2, &[])).await.unwrap();
    let before = wait_ready(&d, 2).await;
    let ids: Vec<String> = before.iter().map(|(_, id)| id.clone()).collect();
    let held = |d: &Daemon| {
        let veths: Vec<String> = worker_veths()
            .into_iter()
            .filter(|(_, id)| ids.contains(id))
            .map(|(n, _)| n)
            .collect();
        (
            d.worker_cgroups().len(),
            d.netns_files().len(),
            pool_processes(d).len(),
            pool_dirs(d).len(),
            veths.len(),
        )
    };
    assert_eq!(held(&d), (2, 2, 2, 2, 2));
    // A clean stop ends the idle pool with everything it held.
    d.stop_daemon(libc::SIGTERM);
    // The kernel frees a namespace (and with it the veth pair) a moment after its last
    // reference goes.
    wait_for("the pool's veths go with their namespaces", || {
        held(&d).4 == 0
    })
    .await;
    assert_eq!(held(&d), (0, 0, 0, 0, 0));
    assert!(d.shims().is_empty(), "{:?}", d.shims());
    // A restart builds it again.
    d.restart(&[]).await.unwrap();
    let again = wait_ready(&d, 2).await;
    assert!(again.iter().all(|(_, id)| !ids.contains(id)));
    // A daemon killed outright leaves its pool; the next one removes it and builds a new one.
    let ids: Vec<String> = again.iter().map(|(_, id)| id.clone()).collect();
    d.stop_daemon(libc::SIGKILL);
    // Their claim FIFOs lost their writer: the idle interpreters end by themselves; their
    // cgroups, namespaces and directories are left for the next daemon.
    wait_for("the idle interpreters end", || {
        pool_processes(&d).is_empty()
    })
    .await;
    assert_eq!(pool_dirs(&d).len(), 2);
    assert_eq!(d.netns_files().len(), 2);
    d.restart(&[]).await.unwrap();
    let third = wait_ready(&d, 2).await;
    assert!(third.iter().all(|(_, id)| !ids.contains(id)));
    wait_for("the old pool gone", || {
        worker_veths().iter().all(|(_, id)| !ids.contains(id))
            && d.worker_cgroups().len() == 2
            && d.netns_files().len() == 2
            && pool_processes(&d).len() == 2
            && pool_dirs(&d).len() == 2
    })
    .await;
    let c = d.client().await.unwrap();
    assert!(list_all(&c).await.is_empty(), "no pooled worker is listed");
    d.stop_daemon(libc::SIGTERM);
    assert_eq!(
        (
            d.worker_cgroups().len(),
            d.netns_files().len(),
            pool_processes(&d).len()
        ),
        (0, 0, 0)
    );
}

/// The nice value of process `pid` (field 19 of its stat line).
fn nice_of(pid: u32) -> i64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after_comm = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or_default();
    // Fields from the state (3) on: nice is the 19th field, the 17th after the comm.
    after_comm
        .split_whitespace()
        .nth(16)
        .and_then(|n| n.parse().ok())
        .unwrap_or(i64::MIN)
}

/// Idle pooled interpreters wait at the pool's low priority (a refill yields the CPUs to the
/// workers running), and a launch whose records the store refuses (a full state dir) runs
/// nothing of its code: its pooled worker is ended, not claimed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_pooled_workers_wait_at_low_priority_and_a_refused_launch_runs_nothing() {
    require_root!();
    let d = Daemon::start_with(DaemonOptions {
        state_tmpfs: Some(8 << 20),
        ..pool_config(4, &[])
    })
    .await
    .unwrap();
    let ready = wait_ready(&d, 4).await;
    for (pid, _) in &ready {
        assert_eq!(
            nice_of(*pid),
            19,
            "an idle pooled interpreter waits at nice 19"
        );
    }
    let c = d.client().await.unwrap();
    let marks = tempfile::Builder::new()
        .prefix("berth-pool-refused-")
        .tempdir_in("/tmp")
        .unwrap();
    std::fs::set_permissions(
        marks.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o777),
    )
    .unwrap();
    let filler = d.state_dir().join("filler");
    assert!(berth_tests::fill_filesystem(&filler).unwrap() > 0);
    let mut answered = Vec::new();
    let mut refused = 0;
    // The first four take the pool's workers; the store refuses some (redb may find room
    // in its file for the first), and the spec of a worker that is not refused may find none.
    for i in 0..4 {
        let mark = marks.path().join(i.to_string());
        let req = pb::LaunchWorkersRequest {
            code: format!("open({:?}, 'w').close()", mark.to_string_lossy()),
            ..probe_request("")
        };
        match c.workers().launch_workers(req).await {
            Ok(r) => answered.push((mark, r.into_inner().workers.remove(0))),
            Err(st) => {
                assert_eq!(st.code(), tonic::Code::Unavailable, "{st:?}");
                refused += 1;
                tokio::time::sleep(Duration::from_millis(500)).await;
                assert!(!mark.exists(), "a refused launch ran its code");
            }
        }
    }
    eprintln!(
        "full state dir: {refused} pooled launches refused, {} answered",
        answered.len()
    );
    assert!(refused > 0, "the full state dir refused no launch");
    for (mark, w) in &answered {
        let done = await_all(&c, std::slice::from_ref(&w.id)).await.unwrap();
        // One that ran may still end FAILED: its shim cannot record its end on the full disk.
        let succeeded = done
            .first()
            .is_some_and(|w| w.status() == pb::WorkerStatus::Succeeded);
        assert!(
            !succeeded || mark.exists(),
            "{w:?} succeeded without its code"
        );
    }
    // The refused launches' pooled workers are gone, with everything they held; the pool
    // refills once there is room again.
    std::fs::remove_file(&filler).unwrap();
    wait_ready(&d, 4).await;
    wait_for(
        "the pool's own cgroups, namespaces and interpreters alone are left",
        || {
            d.worker_cgroups().len() == 4
                && d.netns_files().len() == 4
                && pool_processes(&d).len() == 4
        },
    )
    .await;
}
