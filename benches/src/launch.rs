//! Launch benchmark of the host daemon (issue: host daemon core).
//!
//! Measures, in one run and beside their floors, for host-network and bridge-mode workers (rounds
//! of the two interleaved, so that drift of a busy machine hits both alike):
//! - launch → RUNNING latency of one `/bin/true` worker (median over `--single` runs), right after
//!   the previous one ended and after `--gap-ms` of quiet (a launch that comes alone: on cgroup v1
//!   a join through `cgroup.procs` then waits for an RCU grace period, one right after another
//!   does not);
//! - per-worker time of a batch of `--batch` workers (launch call to the last RUNNING, divided by
//!   the batch size; median over `--rounds` rounds). Each round first measures the floors again
//!   (`--floor-runs` of each), and its ratio is taken against them: on a machine whose load comes
//!   and goes, floors measured once at the start say little about a batch minutes later;
//! - the floors: fork+exec+wait of /bin/true; cgroup create (same hierarchies and limits as
//!   berth) + join before exec (the way berth joins) + rmdir; and one worker network made the
//!   plain way in process (rtnetlink), which a bridge-mode worker needs on top. Host-network
//!   workers compare with the cgroup floor, bridge-mode workers with the cgroup floor plus the
//!   network floor;
//! - daemon RSS idle and after `--finished` finished workers.
//!
//! These are the narrower figures: berth's stop at RUNNING (the shim's handshake after exec) and
//! its bridge-mode workers take namespaces from the daemon's pool (4 here), while the floors run
//! cold to the exit of /bin/true; so the ratios are not like for like. `berth-bench-e2e` has the
//! client's figure (launch → every worker exited, beside crun and the floor over that span).
//!
//! Run as root from a release build: `cargo run --release -p berth-benches --bin berth-bench-launch`.

use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use berth_benches::{
    floor_cgroup, fs_type, hierarchies, launch_to_running, median, ms, network_floor, rss_kib,
    settle, Flags,
};

/// How long a launch may take to be all RUNNING, and to finish.
const RUNNING_WITHIN: Duration = Duration::from_secs(60);
const SETTLE_WITHIN_S: u32 = 120;
use berth_tests::{command_request, pb, Daemon, DaemonOptions};

struct Opts {
    single: usize,
    batch: u32,
    rounds: usize,
    finished: u32,
    gap_ms: u64,
    floor_runs: usize,
}

fn parse_opts() -> Result<Opts> {
    let mut o = Opts {
        single: 100,
        batch: 200,
        rounds: 5,
        finished: 1000,
        gap_ms: 100,
        floor_runs: 30,
    };
    let args: Vec<String> = std::env::args().skip(1).collect();
    let f = Flags::parse(
        "usage: berth-bench-launch [--single N] [--batch N] [--rounds N] [--finished N] \
         [--gap-ms N] [--floor-runs N]",
        &args,
        &[
            "--single",
            "--batch",
            "--rounds",
            "--finished",
            "--gap-ms",
            "--floor-runs",
        ],
        &[],
    )?;
    f.set("--single", &mut o.single)?;
    f.set("--batch", &mut o.batch)?;
    f.set("--rounds", &mut o.rounds)?;
    f.set("--finished", &mut o.finished)?;
    f.set("--gap-ms", &mut o.gap_ms)?;
    f.set("--floor-runs", &mut o.floor_runs)?;
    Ok(o)
}

/// fork+exec+wait of /bin/true.
fn floor_spawn(n: usize) -> Duration {
    let mut v: Vec<Duration> = (0..n)
        .map(|_| {
            let t = Instant::now();
            let st = Command::new("/bin/true").status().expect("spawn /bin/true");
            assert!(st.success());
            t.elapsed()
        })
        .collect();
    median(&mut v)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    if !berth_tests::is_root() {
        bail!("needs root (cgroups)");
    }
    let o = parse_opts()?;
    println!(
        "# berth launch benchmark (pid {}, {} CPUs, state dir in {} on {})",
        std::process::id(),
        std::thread::available_parallelism()?.get(),
        std::env::temp_dir().display(),
        fs_type(&std::env::temp_dir()),
    );

    let fork = floor_spawn(o.single.max(50));
    let (cg_create, cg_whole) = floor_cgroup(o.single.max(50))?;
    let net = network_floor(o.single.max(50))?;
    let net_whole = cg_whole + net;

    let d = Daemon::start_with(DaemonOptions {
        config: "[resources]\nmax_workers = 4096\n".into(),
        ..Default::default()
    })
    .await?;
    let pid = d.pid().context("daemon pid")?;
    let client = d.client().await?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let rss_idle = rss_kib(pid);

    let req = |n, mode: pb::NetworkMode| pb::LaunchWorkersRequest {
        cpu: 0.01,
        memory_gb: 0.0625,
        network: mode as i32,
        ..command_request(n, &["/bin/true"])
    };
    const MODES: [(pb::NetworkMode, &str); 2] = [
        (pb::NetworkMode::Host, "host network"),
        (pb::NetworkMode::Bridge, "bridge"),
    ];
    // Warm-up (page cache, first connections).
    for (mode, _) in MODES {
        let (_, ids) = launch_to_running(&client, req(5, mode), RUNNING_WITHIN).await?;
        settle(&client, &ids, SETTLE_WITHIN_S).await?;
    }

    // [mode][0: right after the previous, 1: after the gap]
    let mut single = [[Vec::new(), Vec::new()], [Vec::new(), Vec::new()]];
    for _ in 0..o.single {
        for gap in [false, true] {
            for (i, (mode, _)) in MODES.iter().enumerate() {
                if gap {
                    tokio::time::sleep(Duration::from_millis(o.gap_ms)).await;
                }
                let (t, ids) = launch_to_running(&client, req(1, *mode), RUNNING_WITHIN).await?;
                single[i][usize::from(gap)].push(t);
                settle(&client, &ids, SETTLE_WITHIN_S).await?;
            }
        }
    }
    let mut per_worker = [Vec::new(), Vec::new()];
    let mut batch_total = [Vec::new(), Vec::new()];
    // Floors of each round ([cgroup, cgroup + network]) and the round's ratios against them.
    let mut round_floors = [Vec::new(), Vec::new()];
    let mut ratios: [Vec<f64>; 2] = [Vec::new(), Vec::new()];
    for _ in 0..o.rounds {
        let (_, cg) = floor_cgroup(o.floor_runs)?;
        let floors = [cg, cg + network_floor(o.floor_runs)?];
        for (i, (mode, _)) in MODES.iter().enumerate() {
            let (t, ids) = launch_to_running(&client, req(o.batch, *mode), RUNNING_WITHIN).await?;
            batch_total[i].push(t);
            per_worker[i].push(t / o.batch);
            round_floors[i].push(floors[i]);
            ratios[i].push((t / o.batch).as_secs_f64() / floors[i].as_secs_f64());
            settle(&client, &ids, SETTLE_WITHIN_S).await?;
        }
    }
    // Finished workers held in the daemon's memory.
    let mut launched = 2 * ((2 * o.single + 5) as u32 + o.batch * o.rounds as u32);
    while launched < o.finished {
        let n = (o.finished - launched).min(200);
        let (_, ids) =
            launch_to_running(&client, req(n, pb::NetworkMode::Bridge), RUNNING_WITHIN).await?;
        settle(&client, &ids, SETTLE_WITHIN_S).await?;
        launched += n;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let rss_finished = rss_kib(pid);

    let single_m = single.each_mut().map(|s| s.each_mut().map(|v| median(v)));
    let per_m = per_worker.each_mut().map(|v| median(v));
    let total_m = batch_total.each_mut().map(|v| median(v));
    let round_floor_m = round_floors.each_mut().map(|v| median(v));
    let ratio_m = ratios.each_mut().map(|v| {
        v.sort_by(f64::total_cmp);
        v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
    });
    let floors = [cg_whole, net_whole];
    println!();
    println!("| measurement | median |");
    println!("| --- | --- |");
    println!("| floor: fork+exec+wait /bin/true | {} |", ms(fork));
    println!(
        "| floor: cgroup create + limits ({} hierarchies) | {} |",
        hierarchies().len(),
        ms(cg_create)
    );
    println!(
        "| floor: cgroup create + join before exec + /bin/true + rmdir | {} |",
        ms(cg_whole)
    );
    println!(
        "| floor: one worker network (unshare, veth with its peer inside, address, routes) | {} |",
        ms(net)
    );
    println!(
        "| floor: cgroup floor + worker network (a bridge-mode worker) | {} |",
        ms(net_whole)
    );
    for (i, (_, name)) in MODES.iter().enumerate() {
        println!(
            "| berth ({name}): launch → RUNNING, 1 worker right after the previous ({} runs) | {} |",
            o.single,
            ms(single_m[i][0])
        );
        println!(
            "| berth ({name}): launch → RUNNING, 1 worker after {} ms of quiet ({} runs) | {} |",
            o.gap_ms,
            o.single,
            ms(single_m[i][1])
        );
        println!(
            "| berth ({name}): batch of {} launch → all RUNNING ({} rounds) | {} |",
            o.batch,
            o.rounds,
            ms(total_m[i])
        );
        println!(
            "| berth ({name}): per-worker time in a batch of {} | {} |",
            o.batch,
            ms(per_m[i])
        );
        println!(
            "| floor of the {name} batches, measured before each round ({} runs each) | {} |",
            o.floor_runs,
            ms(round_floor_m[i])
        );
    }
    println!();
    for (i, (_, name)) in MODES.iter().enumerate() {
        let floor = if i == 0 {
            "cgroup create+join+fork/exec"
        } else {
            "cgroup create+join+fork/exec + worker network"
        };
        println!(
            "ratio {name}: batch per-worker (launch → RUNNING) / floor ({floor}, cold, to exit) = \
             {:.2}  (target ≤ 2; median over the rounds, each against the floor measured just \
             before it)",
            ratio_m[i]
        );
        println!(
            "ratio {name}: single launch (→ RUNNING) / the same floor = {:.2} (right after), {:.2} \
             (after quiet)",
            single_m[i][0].as_secs_f64() / floors[i].as_secs_f64(),
            single_m[i][1].as_secs_f64() / floors[i].as_secs_f64()
        );
    }
    println!(
        "berthd RSS: idle {} KiB; after {} finished workers {} KiB",
        rss_idle, launched, rss_finished
    );
    Ok(())
}
