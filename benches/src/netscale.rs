//! Worker network benchmark (issue: worker networks).
//!
//! Measures, in one run:
//! - the floor: one worker network made the plain way in process with rtnetlink's async API
//!   (unshare, lo up, veth with its peer created inside as eth0, host route, address, default
//!   route), on a fresh thread per network;
//! - berth's own primitive (`sys::netns::HostNetwork`: the same plus bind mount, IPv6 off,
//!   forwarding, neighbour entry; batched requests) create + remove, without a daemon;
//! - `crun run` of /bin/true in its own network, PID and mount namespaces and a cgroup with the
//!   workers' limits, one at a time and a batch over the CPUs, each from the `crun run` call to
//!   its exit, cold (crun runs in a private mount namespace where the hybrid host's cgroup2
//!   controller list is hidden: crun refuses hybrid hosts otherwise; see `berth_benches::crun`);
//! - berthd (release build): launch → RUNNING of one bridge-mode /bin/true worker; per-worker
//!   time in a batch of 200 /bin/true workers (bridge and host mode) from the `LaunchWorkers`
//!   call to the `AwaitWorkers` answer that all exited (the span of crun's figure; berth's
//!   namespace pool, `--pool`, is full before each batch: pre-made namespaces, where crun's are
//!   cold); per-worker launch → RUNNING of a batch of 200 sleepers (no crun figure over that
//!   span: `crun run` returns at exit); and launch → RUNNING of worker 1, 1000, 2000
//!   and 4000 with every earlier worker alive (sleeping), each beside the kernel's own floor at
//!   that scale (cgroup create + CPU quota + join + /bin/true + rmdir: a quota write walks every
//!   CPU cgroup of the host, so this floor grows with the workers alive whatever berth does).
//!
//! Run as root from a release build: `cargo build --release -p berth-benches -p berth-host -p berth-scheduler
//! --bins && target/release/berth-bench-net [--workers 4000] [--single 50] [--rounds 3]`.

#![allow(clippy::type_complexity)]

use std::fs;
use std::time::{Duration, Instant};

use anyhow::Result;
use berth_benches::{
    addr, floor_cgroup, floor_once, fs_type, launch_to_exit, launch_to_running, median, ms, settle,
    wait_netns_ready, Flags,
};

/// How long a launch may take to be all RUNNING, and to finish (thousands of live workers).
const RUNNING_WITHIN: Duration = Duration::from_secs(120);
const SETTLE_WITHIN_S: u32 = 300;
use berth_core::ipam::Subnet;
use berth_sys::netns::{HostNetwork, NetConfig, Netns, WorkerNet};
use berth_tests::{command_request, pb, Daemon, DaemonOptions, TestNet};

struct Opts {
    workers: u32,
    single: usize,
    rounds: usize,
    batch: u32,
    floor: usize,
    pool: usize,
    /// Fill the host with host-network workers instead (to tell network costs from others).
    scale_host: bool,
}

fn parse_opts(args: &[String]) -> Result<Opts> {
    let mut o = Opts {
        workers: 4000,
        single: 50,
        rounds: 3,
        batch: 200,
        floor: 200,
        pool: 256,
        scale_host: false,
    };
    let f = Flags::parse(
        "usage: berth-bench-net [--workers N] [--single N] [--rounds N] [--batch N] [--floor N] \
         [--pool N] [--scale-host]",
        args,
        &[
            "--workers",
            "--single",
            "--rounds",
            "--batch",
            "--floor",
            "--pool",
        ],
        &["--scale-host"],
    )?;
    f.set("--workers", &mut o.workers)?;
    f.set("--single", &mut o.single)?;
    f.set("--rounds", &mut o.rounds)?;
    f.set("--batch", &mut o.batch)?;
    f.set("--floor", &mut o.floor)?;
    f.set("--pool", &mut o.pool)?;
    o.scale_host = f.switch("--scale-host");
    Ok(o)
}

/// berth's primitive without a daemon: create + remove of a routed worker network, one at a
/// time; then the create time of network k with every earlier one alive, at each of `marks`.
fn berth_primitive(
    net: &TestNet,
    n: usize,
    marks: &[u32],
) -> Result<(Duration, Duration, Vec<(u32, Duration)>)> {
    let dir = tempfile::tempdir()?;
    let subnet = Subnet::parse(&net.subnet).map_err(|e| anyhow::anyhow!("{e}"))?;
    let h = HostNetwork::start(NetConfig {
        dir: dir.path().join("netns"),
        bridge: net.bridge.clone(),
        subnet,
        egress: false,
        threads: 1,
        pool: 0,
    })?;
    let mut create = Vec::new();
    let mut remove = Vec::new();
    for i in 0..n {
        let id = format!("bench{i:07}");
        let t = Instant::now();
        h.create(
            &id,
            WorkerNet::Routed {
                ip: addr(&subnet, 4000 + i as u32),
            },
        )?;
        create.push(t.elapsed());
        let t = Instant::now();
        h.remove(&id)?;
        remove.push(t.elapsed());
    }
    // Scale: keep every network; probe 5 creates at each mark.
    let mut alive = Vec::new();
    let mut at_marks = Vec::new();
    let make = |k: usize| -> Result<(String, Duration)> {
        let id = format!("benchs{k:06}");
        let t = Instant::now();
        h.create(
            &id,
            WorkerNet::Routed {
                ip: addr(&subnet, 2 + k as u32),
            },
        )?;
        Ok((id, t.elapsed()))
    };
    for m in marks {
        let target = m.saturating_sub(3) as usize;
        while alive.len() < target {
            alive.push(make(alive.len())?.0);
        }
        let mut v = Vec::new();
        for _ in 0..5 {
            let (id, t) = make(alive.len())?;
            alive.push(id);
            v.push(t);
        }
        at_marks.push((*m, median(&mut v)));
    }
    for id in &alive {
        h.remove(id)?;
    }
    drop(h);
    // The kernel frees them in the background: wait, so that it does not disturb what follows.
    let deadline = Instant::now() + Duration::from_secs(180);
    while Instant::now() < deadline
        && berth_tests::worker_veths()
            .iter()
            .any(|(_, w)| w.starts_with("bench"))
    {
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok((median(&mut create), median(&mut remove), at_marks))
}

/// berth's primitive taking a ready namespace (pool of `n`, filled first): create + remove.
fn berth_primitive_ready(net: &TestNet, n: usize) -> Result<Duration> {
    let dir = tempfile::tempdir()?;
    let subnet = Subnet::parse(&net.subnet).map_err(|e| anyhow::anyhow!("{e}"))?;
    let h = HostNetwork::start(NetConfig {
        dir: dir.path().join("netns"),
        bridge: net.bridge.clone(),
        subnet,
        egress: false,
        threads: 1,
        pool: n,
    })?;
    let deadline = Instant::now() + Duration::from_secs(60);
    while h.ready() < n && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut create = Vec::new();
    let mut ids = Vec::new();
    for i in 0..n {
        let id = format!("benchr{i:06}");
        let t = Instant::now();
        h.create(
            &id,
            WorkerNet::Routed {
                ip: addr(&subnet, 6000 + i as u32),
            },
        )?;
        create.push(t.elapsed());
        ids.push(id);
    }
    for id in &ids {
        h.remove(id)?;
    }
    Ok(median(&mut create))
}

/// Each worker's limits, and each crun container's.
const CPU: f64 = 0.01;
const MEMORY_GB: f64 = 0.01;
const PIDS_MAX: u64 = 64;

fn request(n: u32, mode: pb::NetworkMode, command: &[&str]) -> pb::LaunchWorkersRequest {
    pb::LaunchWorkersRequest {
        cpu: CPU,
        memory_gb: MEMORY_GB,
        network: mode as i32,
        ..command_request(n, command)
    }
}

fn main() -> Result<()> {
    berth_benches::crun::bench_main(parse_opts, run)
}

async fn run(o: Opts) -> Result<()> {
    println!(
        "# berth worker network benchmark (pid {}, {} CPUs, kernel {}, state of berth and crun \
         in {} on {})",
        std::process::id(),
        std::thread::available_parallelism()?.get(),
        fs::read_to_string("/proc/sys/kernel/osrelease")?.trim(),
        std::env::temp_dir().display(),
        fs_type(&std::env::temp_dir()),
    );
    // Floors, on a test network slot of their own (its bridge and rules go with it).
    let own = TestNet::claim()?;
    let subnet = Subnet::parse(&own.subnet).map_err(|e| anyhow::anyhow!("{e}"))?;
    let mut floor = Vec::new();
    for i in 0..o.floor {
        floor.push(floor_once(
            subnet,
            addr(&subnet, 2 + i as u32),
            format!("bf{}x{i}", std::process::id() % 10_000),
        )?);
    }
    let floor = median(&mut floor);
    let marks: Vec<u32> = [1, 1000, 2000, 4000]
        .into_iter()
        .filter(|m| *m <= o.workers)
        .chain((o.workers > 4000).then_some(o.workers))
        .collect();
    let (prim_create, prim_remove, _) = berth_primitive(&own, o.floor, &[])?;
    let prim_ready = berth_primitive_ready(&own, o.batch as usize)?;
    let crun = berth_benches::crun::measure(
        (o.batch as usize).min(100),
        o.batch as usize,
        std::thread::available_parallelism()?.get(),
        berth_benches::crun::Limits {
            cpu: CPU,
            memory_bytes: (MEMORY_GB * (1u64 << 30) as f64) as u64,
            pids: PIDS_MAX,
        },
        &["/bin/true"],
    );
    if let Err(e) = &crun {
        println!("crun not measured: {e:#}");
    }

    let mport = berth_tests::free_port();
    let d = Daemon::start_with(DaemonOptions {
        config: format!(
            "[resources]\nmax_workers = {}\ncpu = 64.0\nmemory_gb = 64.0\n[worker]\npids_max = {PIDS_MAX}\n",
            o.workers + 1000
        ),
        netns_pool: Some(o.pool),
        args: vec!["--metrics-listen".into(), format!("127.0.0.1:{mport}")],
        ..Default::default()
    })
    .await?;
    let pool_full = || wait_netns_ready(mport, o.pool);
    let client = d.client().await?;
    let trueb = |n, mode| request(n, mode, &["/bin/true"]);
    let (_, ids) =
        launch_to_running(&client, trueb(5, pb::NetworkMode::Bridge), RUNNING_WITHIN).await?;
    settle(&client, &ids, SETTLE_WITHIN_S).await?;
    let mut single = Vec::new();
    for _ in 0..o.single {
        pool_full().await;
        let (t, ids) =
            launch_to_running(&client, trueb(1, pb::NetworkMode::Bridge), RUNNING_WITHIN).await?;
        single.push(t);
        settle(&client, &ids, SETTLE_WITHIN_S).await?;
    }
    let single = median(&mut single);
    // Batches of /bin/true (launch while the previous workers' ends are handled) and of
    // sleepers (launch alone; stopped after each round, untimed).
    let batch = |mode, sleep: bool| {
        let client = client.clone();
        let n = o.batch;
        let rounds = o.rounds;
        let d = &d;
        let pool_full = &pool_full;
        async move {
            let mut per = Vec::new();
            for _ in 0..rounds {
                let req = if sleep {
                    request(n, mode, &["/bin/sleep", "3600"])
                } else {
                    trueb(n, mode)
                };
                pool_full().await;
                // Sleepers: launch → RUNNING; /bin/true: launch → AwaitWorkers says all exited.
                let (t, ids) = if sleep {
                    launch_to_running(&client, req, RUNNING_WITHIN).await?
                } else {
                    launch_to_exit(&client, req, SETTLE_WITHIN_S).await?
                };
                per.push(t / n);
                if sleep {
                    client
                        .workers()
                        .stop_workers(pb::StopWorkersRequest {
                            ids: ids.clone(),
                            grace_seconds: Some(0),
                            ..Default::default()
                        })
                        .await?;
                    let deadline = Instant::now() + Duration::from_secs(60);
                    while !d.netns_files().is_empty() && Instant::now() < deadline {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                    // Let the kernel free the namespaces before the next round.
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
            Ok::<_, anyhow::Error>(median(&mut per))
        }
    };
    let batch_bridge = batch(pb::NetworkMode::Bridge, false).await?;
    let batch_host = batch(pb::NetworkMode::Host, false).await?;
    let sleepers_bridge = batch(pb::NetworkMode::Bridge, true).await?;
    let sleepers_host = batch(pb::NetworkMode::Host, true).await?;

    // Scale: sleeping workers fill the host; probes of single launches at the marks.
    let scale_mode = if o.scale_host {
        pb::NetworkMode::Host
    } else {
        pb::NetworkMode::Bridge
    };
    let sleeper = |n| request(n, scale_mode, &["/bin/sleep", "3600"]);
    let mut alive: Vec<String> = Vec::new();
    let mut probes = Vec::new();
    let mut fills: Vec<(usize, Duration)> = Vec::new();
    const PROBES: u32 = 15;
    for m in &marks {
        let target = m.saturating_sub(PROBES / 2 + 1) as usize;
        while alive.len() < target {
            let n = ((target - alive.len()) as u32).min(o.batch);
            let at = alive.len();
            let (t, ids) = launch_to_running(&client, sleeper(n), RUNNING_WITHIN).await?;
            if n == o.batch {
                fills.push((at, t / n));
            }
            alive.extend(ids);
        }
        // What a fill leaves to the kernel (RCU callbacks, namespace set-up of the pool) settles
        // before the probes, which are about the launch path, not about that.
        tokio::time::sleep(Duration::from_secs(2)).await;
        let mut v = Vec::new();
        for _ in 0..PROBES {
            pool_full().await;
            let (t, ids) = launch_to_running(&client, sleeper(1), RUNNING_WITHIN).await?;
            v.push(t);
            alive.extend(ids);
        }
        // The kernel's part at this scale, measured the same way as the launch bench's floor:
        // a CPU quota write walks every CPU cgroup of the host.
        let (_, cg_floor) = tokio::task::spawn_blocking(|| floor_cgroup(PROBES as usize)).await??;
        probes.push((*m, alive.len(), median(&mut v), cg_floor));
    }
    // This daemon's workers' veths only (another daemon's on the machine are not its count).
    let mine: std::collections::HashSet<&String> = alive.iter().collect();
    let host_veths = berth_tests::worker_veths()
        .iter()
        .filter(|(_, w)| mine.contains(w))
        .count();
    let t = Instant::now();
    client
        .workers()
        .stop_workers(pb::StopWorkersRequest {
            all: true,
            grace_seconds: Some(0),
            ..Default::default()
        })
        .await?;
    let stop_all = t.elapsed();
    let deadline = Instant::now() + Duration::from_secs(300);
    while !d.netns_files().is_empty() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let gone = t.elapsed();
    drop(client);
    drop(d);
    // The kernel frees the daemon's namespaces in the background; then the primitive alone at
    // the same scale.
    let deadline = Instant::now() + Duration::from_secs(180);
    while Instant::now() < deadline
        && berth_tests::worker_veths()
            .iter()
            .any(|(_, w)| mine.contains(w))
    {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (_, _, prim_marks) = berth_primitive(&own, 0, &marks)?;
    drop(own);

    println!();
    println!("| measurement | median |");
    println!("| --- | --- |");
    println!(
        "| floor: unshare + veth (peer inside) + addr + routes, rtnetlink async, in process ({} runs) | {} |",
        o.floor,
        ms(floor)
    );
    println!(
        "| berth netns primitive: create (+ bind mount, IPv6 off, forwarding, neighbour), no daemon | {} |",
        ms(prim_create)
    );
    println!(
        "| berth netns primitive: remove (unmount; the kernel frees the rest) | {} |",
        ms(prim_remove)
    );
    println!(
        "| berth netns primitive: create from a ready namespace (pool of {}) | {} |",
        o.batch,
        ms(prim_ready)
    );
    for (m, t) in &prim_marks {
        println!(
            "| berth netns primitive: create network {m} with every earlier one alive (median of 5) | {} |",
            ms(*t)
        );
    }
    match &crun {
        Ok(c) => {
            println!(
                "| crun run /bin/true, netns + pidns + mntns + cgroup, one at a time: call → exit, median / total ÷ runs | {} / {} |",
                ms(c.serial_median),
                ms(c.serial_mean)
            );
            println!(
                "| crun run /bin/true, per container in a batch of {} over {} CPUs: call → exit | {} |",
                o.batch,
                std::thread::available_parallelism()?.get(),
                ms(c.batch_per)
            );
        }
        Err(_) => println!("| crun | not measured |"),
    }
    println!(
        "| berth: launch → RUNNING, 1 bridge worker ({} runs) | {} |",
        o.single,
        ms(single)
    );
    println!(
        "| berth: per-worker time in a batch of {} /bin/true, launch → all exited (bridge: namespace + address) | {} |",
        o.batch,
        ms(batch_bridge)
    );
    println!(
        "| berth: per-worker time in a batch of {} /bin/true, launch → all exited (host network, for reference) | {} |",
        o.batch,
        ms(batch_host)
    );
    println!(
        "| berth: per-worker time in a batch of {} sleepers, launch → all RUNNING (bridge) | {} |",
        o.batch,
        ms(sleepers_bridge)
    );
    println!(
        "| berth: per-worker time in a batch of {} sleepers, launch → all RUNNING (host network) | {} |",
        o.batch,
        ms(sleepers_host)
    );
    for (m, n, t, cg) in &probes {
        println!(
            "| berth: launch → RUNNING of worker {m} ({} alive before it; median of {PROBES}) | {} |",
            n - PROBES as usize,
            ms(*t)
        );
        println!(
            "| floor beside it: cgroup create + quota + join + /bin/true + rmdir ({n} alive) | {} |",
            ms(*cg)
        );
    }
    for (at, t) in fills
        .iter()
        .filter(|(at, _)| *at == 0 || *at >= fills.last().map_or(0, |l| l.0))
    {
        println!(
            "| berth: per-worker time in a batch of {} with {at} alive | {} |",
            o.batch,
            ms(*t)
        );
    }
    println!(
        "| berth: stop all {} workers (call) / until every namespace is gone | {} / {} |",
        alive.len(),
        ms(stop_all),
        ms(gone)
    );
    println!();
    println!("this daemon's worker veths on the host at the peak: {host_veths}");
    if let Ok(c) = crun {
        println!(
            "ratio berth per worker in a batch of {} (bridge) / crun one at a time (total ÷ runs), \
             both /bin/true from the call to exit (berth: namespaces pre-made by its pool; crun: \
             cold) = {:.3}  (target ≤ 0.25)",
            o.batch,
            batch_bridge.as_secs_f64() / c.serial_mean.as_secs_f64(),
        );
        println!(
            "ratio berth per worker in a batch of {} (bridge) / crun per container in a batch over \
             the CPUs, both call → exit = {:.3}",
            o.batch,
            batch_bridge.as_secs_f64() / c.batch_per.as_secs_f64()
        );
    }
    println!(
        "ratio berth single bridge launch → RUNNING (namespace from the pool) / the network floor \
         (one network made cold, no process) = {:.2}",
        single.as_secs_f64() / floor.as_secs_f64()
    );
    if let (Some(first), Some(last)) = (probes.first(), probes.last()) {
        let grew = |a: Duration, b: Duration| (b.as_secs_f64() - a.as_secs_f64()) * 1e3;
        println!(
            "launch of worker {} / worker {} = {:.2} (must not climb): {:+.3} ms, of which the \
             kernel's cgroup floor {:+.3} ms",
            last.0,
            first.0,
            last.2.as_secs_f64() / first.2.as_secs_f64(),
            grew(first.2, last.2),
            grew(first.3, last.3),
        );
        if let (Some(p1), Some(pn)) = (prim_marks.first(), prim_marks.last()) {
            println!(
                "the network primitive alone, network {} vs {}: {:+.3} ms",
                pn.0,
                p1.0,
                grew(p1.1, pn.1)
            );
        }
    }
    Ok(())
}
