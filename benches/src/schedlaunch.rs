//! End-to-end launch latency through the scheduler vs direct to a host (issue: scheduler node).
//!
//! One `berth-scheduler` and one `berthd` joined to it, release binaries, on this machine. The
//! same launch (`/bin/true`, bridge network) goes alternately straight to the host and through
//! the scheduler, so both see the same noise; reported: median launch → RUNNING for single
//! workers and per-worker time for batches, and the scheduler's overhead beside the direct path.
//!
//! Placements per second, end to end through gRPC beside the in-process placer (issue 20): the
//! same batches' `LaunchWorkers` call → its answer (the scheduler has placed every worker, the
//! host has admitted them, recorded them and started their shims), workers ÷ that time, through
//! the scheduler and direct; and, measured in the same run, `berth_core::placement::Placer`
//! alone (what the scheduler runs under its lock: place + reserve of a launch of the same size on
//! one host of the same capacity, then release), in process, one thread, no gRPC, no host call.
//! `berth-bench-placement` measures that placer on 1,000 and 10,000 simulated hosts.
//!
//! Run as root from a release build:
//! `cargo run --release -p berth-benches --bin berth-bench-sched [-- --single N --batch N --rounds N]`.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use berth_benches::{launch_ids, launch_to_running, loadavg, median, ms, settle, Flags};
use berth_core::placement::{Amount, Ask, Placer, Strategy};
use berth_tests::cluster::{start_host, SchedulerNode};
use berth_tests::{command_request, pb, Client};

const RUNNING_WITHIN: Duration = Duration::from_secs(60);

struct Opts {
    single: usize,
    batch: u32,
    rounds: usize,
}

fn parse_opts() -> Result<Opts> {
    let mut o = Opts {
        single: 60,
        batch: 50,
        rounds: 5,
    };
    let args: Vec<String> = std::env::args().skip(1).collect();
    let f = Flags::parse(
        "usage: berth-bench-sched [--single N] [--batch N] [--rounds N]",
        &args,
        &["--single", "--batch", "--rounds"],
        &[],
    )?;
    f.set("--single", &mut o.single)?;
    f.set("--batch", &mut o.batch)?;
    f.set("--rounds", &mut o.rounds)?;
    Ok(o)
}

async fn once(c: &Client, n: u32) -> Result<Duration> {
    let (d, ids) = launch_to_running(c, command_request(n, &["/bin/true"]), RUNNING_WITHIN).await?;
    settle(c, &ids, 120).await?;
    Ok(d)
}

/// A batch's `LaunchWorkers` call → answer (placed, admitted and started), then its end.
async fn answered(c: &Client, n: u32) -> Result<Duration> {
    let t = Instant::now();
    let ids = launch_ids(c, command_request(n, &["/bin/true"])).await?;
    let d = t.elapsed();
    settle(c, &ids, 120).await?;
    Ok(d)
}

/// Workers per second of the placer alone: launches of `n` workers as `command_request` asks
/// them, placed and reserved on one host of `cpu` cores and `memory_gb`, then released.
fn placer_rate(n: u32, cpu: f64, memory_gb: f64, launches: u32) -> f64 {
    let req = command_request(n, &["/bin/true"]);
    let per = Amount::from_units(req.cpu, req.memory_gb, 0, 1);
    let mut p = Placer::new();
    p.upsert(
        "host",
        Amount::from_units(cpu, memory_gb, 0, 100_000),
        Amount::ZERO,
        BTreeMap::new(),
        true,
    );
    let none = BTreeMap::new();
    let t = Instant::now();
    let mut placed = 0u64;
    for _ in 0..launches {
        let ask = Ask {
            n,
            per_worker: per,
            constraints: &none,
            strategy: Strategy::BinPack,
        };
        if let Ok(picks) = p.reserve(&ask) {
            placed += u64::from(n);
            for (h, count) in picks {
                p.release(&h, per, count);
            }
        }
    }
    placed as f64 / t.elapsed().as_secs_f64()
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    if !berth_tests::is_root() {
        bail!("needs root (cgroups, namespaces)");
    }
    let o = parse_opts()?;
    let sched = SchedulerNode::start().await?;
    let host = start_host(&sched, 64.0, 64.0).await?;
    sched
        .wait_hosts(&[host.name.as_str()], pb::HostState::Ready)
        .await?;
    let direct = host.client().await?;
    let via = sched.client().await?;
    // Warm both paths (connections, namespace pool, page cache).
    for _ in 0..3 {
        once(&direct, 1).await?;
        once(&via, 1).await?;
    }

    let (mut d1, mut s1) = (Vec::new(), Vec::new());
    for _ in 0..o.single {
        d1.push(once(&direct, 1).await?);
        s1.push(once(&via, 1).await?);
    }
    let (mut db, mut sb) = (Vec::new(), Vec::new());
    for _ in 0..o.rounds {
        db.push(once(&direct, o.batch).await? / o.batch);
        sb.push(once(&via, o.batch).await? / o.batch);
    }
    let (mut da, mut sa) = (Vec::new(), Vec::new());
    for _ in 0..o.rounds {
        da.push(answered(&direct, o.batch).await?);
        sa.push(answered(&via, o.batch).await?);
    }
    let (da, sa) = (median(&mut da), median(&mut sa));
    let inproc = placer_rate(o.batch, 64.0, 64.0, 20_000);
    let (d1, s1, db, sb) = (
        median(&mut d1),
        median(&mut s1),
        median(&mut db),
        median(&mut sb),
    );
    println!("launch -> RUNNING, /bin/true, bridge network; medians; one scheduler, one host");
    println!(
        "  single worker ({} runs):  direct {}  via scheduler {}  (+{}, {:.2}x)",
        o.single,
        ms(d1),
        ms(s1),
        ms(s1.saturating_sub(d1)),
        s1.as_secs_f64() / d1.as_secs_f64()
    );
    println!(
        "  batch of {} ({} rounds), per worker:  direct {}  via scheduler {}  ({:.2}x)",
        o.batch,
        o.rounds,
        ms(db),
        ms(sb),
        sb.as_secs_f64() / db.as_secs_f64()
    );
    let rate = |d: Duration| f64::from(o.batch) / d.as_secs_f64();
    println!(
        "placements/s, batches of {} ({} rounds, medians; load {}):",
        o.batch,
        o.rounds,
        loadavg()
    );
    println!(
        "  end to end through gRPC, LaunchWorkers call → answer (placed, admitted, shims started):  \
         via scheduler {:.0}/s ({} per batch)  direct to the host {:.0}/s ({})",
        rate(sa),
        ms(sa),
        rate(da),
        ms(da)
    );
    println!(
        "  in process, the scheduler's placer alone (place + reserve + release, one thread, one \
         host): {inproc:.0}/s"
    );
    Ok(())
}
