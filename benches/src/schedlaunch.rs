//! End-to-end launch latency through the scheduler vs direct to a host (issue: scheduler node).
//!
//! One `berth-scheduler` and one `berthd` joined to it, release binaries, on this machine. The
//! same launch (`/bin/true`, bridge network) goes alternately straight to the host and through
//! the scheduler, so both see the same noise; reported: median launch → RUNNING for single
//! workers and per-worker time for batches, and the scheduler's overhead beside the direct path.
//!
//! Run as root from a release build:
//! `cargo run --release -p berth-benches --bin berth-bench-sched [-- --single N --batch N --rounds N]`.

use std::time::Duration;

use anyhow::{bail, Result};
use berth_benches::{launch_to_running, median, ms, settle, Flags};
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
    Ok(())
}
