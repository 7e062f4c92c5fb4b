//! End-to-end launch benchmark (issue 19, part 1): the launch figure as a client sees it.
//!
//! In one run, rounds interleaved so that a busy machine's drift hits all alike:
//! - **berth**: `LaunchWorkers` of `--batch` (200) `/bin/true` workers (cpu 0.01, memory
//!   0.01 GiB, bridge mode: own network namespace and address) through a gRPC client (berth's
//!   Rust client on the daemon's unix socket), then `AwaitWorkers` for their completion, sent as
//!   soon as the launch answers; per worker = (launch call → await answer) / batch. Two daemons
//!   (release build, `target/release/berthd`): one as shipped (namespace pool of 32, filled
//!   before each round: the first 32 namespaces pre-made, the rest made during the launch) and
//!   one with no pool (every namespace made cold during the launch, like crun's);
//! - **crun**: `crun run` of `/bin/true`, one container at a time, in its own network, PID, IPC,
//!   UTS and mount namespaces and a cgroup with the same limits; per container = (the first
//!   `crun run` call → the last one's exit) / runs, same count as the batch. Cold. crun does its
//!   own set-up inside the container's cgroup, so at 0.01 of a core its CFS quota throttles crun
//!   itself (tens of ms per container); it is measured a second time with a quota of one core,
//!   and the ratio against that faster crun is the one to judge berth by;
//! - **the floor**: fork+exec+wait of `/bin/true` joined to a fresh cgroup (create in each v1
//!   hierarchy, limits, join before exec, rmdir) plus one worker network made the plain way in
//!   process (unshare, veth with its peer inside, address, routes): the kernel work a bridge-mode
//!   worker cannot do without; the limit to approach.
//!
//! Ratios: berth / crun (target ≤ 0.25) and berth / floor, each the median over the rounds of
//! the round's own ratio.
//!
//! Then, unless `--phases 0`: a per-phase breakdown of `--phases` more launches of the same
//! batch on a third daemon that logs the `berth_phase` marks (`BERTH_LOG=info,berth_phase=debug`,
//! JSON lines; see `berth_host::phase`), with the client's own marks on the same clock
//! (`CLOCK_MONOTONIC`). Logging every mark costs that daemon a little; the headline figure comes
//! from the daemons that do not log them.
//!
//! Run as root from a release build: `cargo build --release -p berth-benches -p berth-host
//! -p berth-scheduler --bins && target/release/berth-bench-e2e [--batch 200] [--rounds 5]`.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use berth_benches::{
    crun, floor_cgroup, fs_type, launch_ids, launch_to_exit, loadavg, median, mono_us, ms,
    network_floor, settle, wait_netns_ready, Flags,
};
use berth_tests::{command_request, pb, Client, Daemon, DaemonOptions};

const CPU: f64 = 0.01;
const MEMORY_GB: f64 = 0.01;
const PIDS_MAX: u64 = 4096;
/// The namespace pool berthd ships with (`netns_pool`).
const SHIPPED_POOL: usize = 32;
const SETTLE_WITHIN_S: u32 = 300;

struct Opts {
    batch: u32,
    rounds: usize,
    floor_runs: usize,
    phases: usize,
}

fn parse_opts(args: &[String]) -> Result<Opts> {
    let mut o = Opts {
        batch: 200,
        rounds: 5,
        floor_runs: 40,
        phases: 3,
    };
    let f = Flags::parse(
        "usage: berth-bench-e2e [--batch N] [--rounds N] [--floor-runs N] [--phases N]",
        args,
        &["--batch", "--rounds", "--floor-runs", "--phases"],
        &[],
    )?;
    f.set("--batch", &mut o.batch)?;
    f.set("--rounds", &mut o.rounds)?;
    f.set("--floor-runs", &mut o.floor_runs)?;
    f.set("--phases", &mut o.phases)?;
    Ok(o)
}

fn request(n: u32) -> pb::LaunchWorkersRequest {
    pb::LaunchWorkersRequest {
        cpu: CPU,
        memory_gb: MEMORY_GB,
        network: pb::NetworkMode::Bridge as i32,
        ..command_request(n, &["/bin/true"])
    }
}

/// A daemon for this benchmark with namespace pool `pool`, its metrics on a port of its own;
/// `phases`: it logs the phase marks as JSON.
async fn daemon(pool: usize, phases: bool) -> Result<(Daemon, u16)> {
    let mport = berth_tests::free_port();
    let mut args = vec!["--metrics-listen".into(), format!("127.0.0.1:{mport}")];
    let log = if phases {
        args.extend(["--log-format".into(), "json".into()]);
        "info,berth_phase=debug"
    } else {
        "info"
    };
    let d = Daemon::start_with(DaemonOptions {
        config: format!(
            "[resources]\nmax_workers = 4096\ncpu = 64.0\nmemory_gb = 64.0\n[worker]\npids_max = {PIDS_MAX}\n"
        ),
        netns_pool: Some(pool),
        args,
        env: vec![("BERTH_LOG".into(), log.into())],
        ..Default::default()
    })
    .await?;
    Ok((d, mport))
}

/// One round of a daemon: its pool refilled first, then the batch; per-worker time.
async fn berth_round(c: &Client, mport: u16, pool: usize, n: u32) -> Result<Duration> {
    wait_netns_ready(mport, pool).await;
    let (t, _) = launch_to_exit(c, request(n), SETTLE_WITHIN_S).await?;
    Ok(t / n)
}

fn ratio_median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

fn main() -> Result<()> {
    crun::bench_main(parse_opts, run)
}

async fn run(o: Opts) -> Result<()> {
    crun::check()?;
    println!(
        "# berth end-to-end launch benchmark (pid {}, {} CPUs, kernel {}, state dirs in {} on {}, \
         load {})",
        std::process::id(),
        std::thread::available_parallelism()?.get(),
        std::fs::read_to_string("/proc/sys/kernel/osrelease")?.trim(),
        std::env::temp_dir().display(),
        fs_type(&std::env::temp_dir()),
        loadavg(),
    );
    let n = o.batch;
    let limits = crun::Limits {
        cpu: CPU,
        memory_bytes: (MEMORY_GB * (1u64 << 30) as f64) as u64,
        pids: PIDS_MAX,
    };
    let (shipped, sport) = daemon(SHIPPED_POOL, false).await?;
    let (cold, cport) = daemon(0, false).await?;
    let (sc, cc) = (shipped.client().await?, cold.client().await?);
    // Warm-up: page cache, connections, the first namespaces.
    for c in [&sc, &cc] {
        launch_to_exit(c, request(5), SETTLE_WITHIN_S).await?;
    }

    let unthrottled = crun::Limits { cpu: 1.0, ..limits };
    let (mut b_shipped, mut b_cold, mut crun_mean, mut crun_median, mut floors) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let (mut crun1_mean, mut r_crun1, mut r_cold_crun1) = (Vec::new(), Vec::new(), Vec::new());
    let (mut r_crun, mut r_floor, mut r_cold_crun, mut r_cold_floor) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for round in 0..o.rounds {
        let s = berth_round(&sc, sport, SHIPPED_POOL, n).await?;
        let c = berth_round(&cc, cport, 0, n).await?;
        let cr = tokio::task::spawn_blocking(move || {
            crun::measure(n as usize, 0, 1, limits, &["/bin/true"])
        })
        .await??;
        let cr1 = tokio::task::spawn_blocking(move || {
            crun::measure(n as usize, 0, 1, unthrottled, &["/bin/true"])
        })
        .await??;
        let runs = o.floor_runs;
        let fl = tokio::task::spawn_blocking(move || -> Result<Duration> {
            Ok(floor_cgroup(runs)?.1 + network_floor(runs)?)
        })
        .await??;
        println!(
            "round {round}: berth {} (pool {SHIPPED_POOL}), {} (no pool); crun {} (cpu {CPU}), {} \
             (cpu 1); floor {}; load {}",
            ms(s),
            ms(c),
            ms(cr.serial_mean),
            ms(cr1.serial_mean),
            ms(fl),
            loadavg()
        );
        let f = |a: Duration, b: Duration| a.as_secs_f64() / b.as_secs_f64();
        r_crun.push(f(s, cr.serial_mean));
        r_floor.push(f(s, fl));
        r_cold_crun.push(f(c, cr.serial_mean));
        r_cold_floor.push(f(c, fl));
        r_crun1.push(f(s, cr1.serial_mean));
        r_cold_crun1.push(f(c, cr1.serial_mean));
        crun1_mean.push(cr1.serial_mean);
        b_shipped.push(s);
        b_cold.push(c);
        crun_mean.push(cr.serial_mean);
        crun_median.push(cr.serial_median);
        floors.push(fl);
    }
    let ship_rss = berth_benches::rss_kib(shipped.pid().context("daemon pid")?);
    drop((sc, cc));
    drop((shipped, cold));

    println!();
    println!(
        "| measurement (medians over {} rounds) | per worker |",
        o.rounds
    );
    println!("| --- | --- |");
    println!(
        "| berth, pool of {SHIPPED_POOL} (as shipped): LaunchWorkers of {n} → AwaitWorkers answered, ÷ {n} | {} |",
        ms(median(&mut b_shipped))
    );
    println!(
        "| berth, no pool (every namespace cold): LaunchWorkers of {n} → AwaitWorkers answered, ÷ {n} | {} |",
        ms(median(&mut b_cold))
    );
    println!(
        "| crun run /bin/true one at a time, same limits, own netns+pidns+mntns+cgroup: first call → last exit, ÷ {n} | {} |",
        ms(median(&mut crun_mean))
    );
    println!(
        "| crun run, the same runs' median (call → exit) | {} |",
        ms(median(&mut crun_median))
    );
    println!(
        "| crun run, the same but a quota of 1 core (crun's own set-up not throttled): first call → last exit, ÷ {n} | {} |",
        ms(median(&mut crun1_mean))
    );
    println!(
        "| floor: cgroup create+limits+join before exec + fork/exec/wait /bin/true + rmdir, + one worker network ({} runs each) | {} |",
        o.floor_runs,
        ms(median(&mut floors))
    );
    println!();
    println!(
        "ratio berth (pool {SHIPPED_POOL}) / crun with a 1-core quota = {:.3}  (target ≤ 0.25); \
         no pool: {:.3}",
        ratio_median(r_crun1),
        ratio_median(r_cold_crun1)
    );
    println!(
        "ratio berth (pool {SHIPPED_POOL}) / crun with the same limits (throttled) = {:.3}; no \
         pool: {:.3}",
        ratio_median(r_crun),
        ratio_median(r_cold_crun)
    );
    println!(
        "ratio berth (pool {SHIPPED_POOL}) / floor = {:.2}; no pool: {:.2}",
        ratio_median(r_floor),
        ratio_median(r_cold_floor)
    );
    println!(
        "berthd (pool {SHIPPED_POOL}) RSS at the end: {ship_rss} KiB; load {}",
        loadavg()
    );

    if o.phases > 0 {
        phases(n, o.phases).await?;
    }
    Ok(())
}

/// The client's marks of one launch (µs, `CLOCK_MONOTONIC`).
struct ClientMarks {
    sent: u64,
    launch_answer: u64,
    await_answer: u64,
}

/// Launch-wide marks, in the order they come.
const LAUNCH_MARKS: [&str; 5] = ["received", "prepared", "admitted", "durable", "answered"];
/// Per-worker marks, in the order they come.
const WORKER_MARKS: [&str; 8] = [
    "net",
    "cgroup",
    "spawned",
    "running",
    "shim_exited",
    "cgroup_removed",
    "net_released",
    "published",
];

/// Per-phase breakdown of `rounds` launches of `n` on a daemon that logs the marks.
async fn phases(n: u32, rounds: usize) -> Result<()> {
    let (d, mport) = daemon(SHIPPED_POOL, true).await?;
    let c = d.client().await?;
    launch_to_exit(&c, request(5), SETTLE_WITHIN_S).await?;
    // [mark] → per-round values (ms since the client's call): launch-wide; per worker first /
    // median / last; and per-worker phase lengths.
    let mut at: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    let mut worker_at: BTreeMap<String, [Vec<f64>; 3]> = BTreeMap::new();
    let mut lengths: BTreeMap<String, (Vec<f64>, Vec<f64>)> = BTreeMap::new();
    let mut totals = Vec::new();
    for _ in 0..rounds {
        wait_netns_ready(mport, SHIPPED_POOL).await;
        let sent = mono_us();
        let t = Instant::now();
        let ids = launch_ids(&c, request(n)).await?;
        let launch_answer = mono_us();
        settle(&c, &ids, SETTLE_WITHIN_S).await?;
        let cm = ClientMarks {
            sent,
            launch_answer,
            await_answer: mono_us(),
        };
        totals.push(t.elapsed() / n);
        // The daemon writes its log lines before it answers; give the writer a moment anyway.
        tokio::time::sleep(Duration::from_millis(200)).await;
        let ms_of = |t: u64| (t as f64 - cm.sent as f64) / 1e3;
        let all = berth_benches::phase_marks(&d.log(), cm.sent);
        let mine: std::collections::HashSet<&String> = ids.iter().collect();
        let mut per: HashMap<&str, HashMap<&str, u64>> = HashMap::new();
        let mut launch: HashMap<&str, u64> = HashMap::new();
        for (phase, worker, t) in &all {
            if worker.is_empty() {
                // The first of each launch-wide mark after the call: this launch's (and the
                // await's).
                launch.entry(phase.as_str()).or_insert(*t);
            } else if mine.contains(worker) {
                per.entry(worker.as_str())
                    .or_default()
                    .insert(phase.as_str(), *t);
            }
        }
        if per.len() != n as usize {
            bail!(
                "phase marks for {} of {n} workers (is berthd a release build with the marks?)",
                per.len()
            );
        }
        for m in LAUNCH_MARKS
            .iter()
            .chain(&["await_received", "await_woken"])
        {
            let v = launch.get(m).map_or(f64::NAN, |t| ms_of(*t));
            at.entry((*m).to_owned()).or_default().push(v);
        }
        at.entry("client: launch answered".into())
            .or_default()
            .push(ms_of(cm.launch_answer));
        at.entry("client: await answered".into())
            .or_default()
            .push(ms_of(cm.await_answer));
        for m in WORKER_MARKS {
            let mut v: Vec<f64> = per
                .values()
                .filter_map(|p| p.get(m).map(|t| ms_of(*t)))
                .collect();
            v.sort_by(f64::total_cmp);
            let e = worker_at.entry(m.to_owned()).or_default();
            e[0].push(v.first().copied().unwrap_or(f64::NAN));
            e[1].push(v.get(v.len() / 2).copied().unwrap_or(f64::NAN));
            e[2].push(v.last().copied().unwrap_or(f64::NAN));
        }
        // Per-worker phase lengths: from the previous mark (for the first, the launch's
        // "durable") to this one.
        let durable = launch.get("durable").copied();
        for (i, m) in WORKER_MARKS.iter().enumerate() {
            let mut v: Vec<f64> = per
                .values()
                .filter_map(|p| {
                    let from = if i == 0 {
                        durable?
                    } else {
                        *p.get(WORKER_MARKS[i - 1])?
                    };
                    Some((p.get(m)?.saturating_sub(from)) as f64 / 1e3)
                })
                .collect();
            let sum: f64 = v.iter().sum();
            v.sort_by(f64::total_cmp);
            let e = lengths.entry((*m).to_owned()).or_default();
            e.0.push(v.get(v.len() / 2).copied().unwrap_or(f64::NAN));
            e.1.push(sum / f64::from(n));
        }
    }
    // The gRPC floor under "received" and under the answer's way back: a trivial call's round
    // trip on the same client and daemon.
    let mut trivial = Vec::new();
    for _ in 0..60 {
        let t = Instant::now();
        c.host().get_host_info(pb::GetHostInfoRequest {}).await?;
        trivial.push(t.elapsed());
    }
    drop(c);
    drop(d);

    let med = |v: &[f64]| ratio_median(v.to_vec());
    println!();
    println!(
        "## Phases of a launch of {n} (daemon logging its marks; medians over {rounds} launches; \
         per worker over the whole call → await answer: {})",
        ms(median(&mut totals))
    );
    println!();
    println!("| launch-wide mark | ms after the client's LaunchWorkers call |");
    println!("| --- | --- |");
    let label: HashMap<&str, &str> = [
        ("received", "received: request decoded, caller known (RPC)"),
        (
            "prepared",
            "prepared: validated, filesystem checks as the user",
        ),
        ("admitted", "admitted: room, addresses, records in memory"),
        ("durable", "durable: the records' store commit"),
        ("answered", "answered: every shim spawned, answer built"),
        ("await_received", "AwaitWorkers received"),
        ("await_woken", "AwaitWorkers woken: every worker ended"),
    ]
    .into_iter()
    .collect();
    for m in LAUNCH_MARKS
        .iter()
        .chain(&["await_received", "await_woken"])
        .map(|s| (*s).to_owned())
        .chain([
            "client: launch answered".into(),
            "client: await answered".into(),
        ])
    {
        let name = label.get(m.as_str()).copied().unwrap_or(m.as_str());
        println!("| {name} | {:.3} |", med(&at[&m]));
    }
    println!(
        "(a trivial call's round trip on the same client and daemon, GetHostInfo, median of 60: \
         {}: the gRPC part of \"received\" and of the answer's way back)",
        ms(median(&mut trivial))
    );
    println!();
    let what: HashMap<&str, &str> = [
        (
            "net",
            "netns/IP: its network ready (made, or from the pool)",
        ),
        ("cgroup", "cgroup: created, limits written"),
        ("spawned", "spawn: a zygote forked its shim"),
        ("running", "exec: the shim's handshake (program exec'd)"),
        (
            "shim_exited",
            "run + exit: the shim exited (exit record written)",
        ),
        (
            "cgroup_removed",
            "exit report: usage read, cgroup killed + removed",
        ),
        (
            "net_released",
            "exit report: namespace removed, address freed",
        ),
        ("published", "exit report: end recorded, watchers told"),
    ]
    .into_iter()
    .collect();
    println!(
        "| per-worker phase (from the previous mark; the first from `durable`) | median length | \
         sum over workers ÷ {n} | first / median / last worker reached it (ms after the call) |"
    );
    println!("| --- | --- | --- | --- |");
    for m in WORKER_MARKS {
        let (l, s) = &lengths[m];
        let w = &worker_at[m];
        println!(
            "| {} | {:.3} ms | {:.3} ms | {:.1} / {:.1} / {:.1} |",
            what[m],
            med(l),
            med(s),
            med(&w[0]),
            med(&w[1]),
            med(&w[2])
        );
    }
    println!(
        "(phases of different workers overlap: spawns run in up to 4 lanes, exits are handled \
         concurrently, so the sums exceed the wall time)"
    );
    Ok(())
}
