//! Re-adoption benchmark (issue: sessions, durable state and daemon restarts).
//!
//! Launches `--workers` long-running workers, measures the memory of what outlives the daemon
//! (the per-worker `berth-shim`: RSS and PSS, medians), kills berthd with SIGKILL, starts it again
//! and measures its start-up time until it answers gRPC with every worker re-adopted.
//!
//! Run as root from a release build: `target/release/berth-bench-readopt [--workers 1000]`.

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use berth_benches::{rss_pss_kib, running_count, Flags};
use berth_tests::{command_request, pb, Daemon, DaemonOptions};

fn median(mut v: Vec<u64>) -> u64 {
    v.sort_unstable();
    v.get(v.len() / 2).copied().unwrap_or(0)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    if !berth_tests::is_root() {
        bail!("needs root (cgroups)");
    }
    let mut workers: u32 = 1000;
    let args: Vec<String> = std::env::args().skip(1).collect();
    Flags::parse(
        "usage: berth-bench-readopt [--workers N]",
        &args,
        &["--workers"],
        &[],
    )?
    .set("--workers", &mut workers)?;
    let mut d = Daemon::start_with(DaemonOptions {
        config: "[resources]\nmax_workers = 8192\n".into(),
        ..Default::default()
    })
    .await?;
    let c = d.client().await?;
    let mut ids = Vec::new();
    while (ids.len() as u32) < workers {
        let n = (workers - ids.len() as u32).min(200);
        let req = pb::LaunchWorkersRequest {
            cpu: 0.001,
            memory_gb: 0.01,
            ..command_request(n, &["/bin/sleep", "3600"])
        };
        let r = c.workers().launch_workers(req).await?.into_inner();
        ids.extend(r.workers.into_iter().map(|w| w.id));
    }
    let r = c
        .workers()
        .await_workers(pb::AwaitWorkersRequest {
            ids: ids.clone(),
            wait_for_completion: Some(false),
            timeout_seconds: Some(300),
            ..Default::default()
        })
        .await?
        .into_inner();
    if !r.failures.is_empty() {
        bail!("{} workers did not start", r.failures.len());
    }
    // This daemon's shims only (each works in a worker dir under its state dir).
    let shims = d.shims();
    let (rss, pss): (Vec<u64>, Vec<u64>) = shims.iter().map(|p| rss_pss_kib(*p)).unzip();
    let daemon_rss = berth_benches::rss_kib(d.pid().context("pid")?);
    drop(c);

    d.stop_daemon(libc::SIGKILL);
    let t = Instant::now();
    d.restart(&[]).await?;
    let ready = t.elapsed();
    let c = d.client().await?;
    let listed = running_count(&c).await?;
    let log = d.log();
    let took_ms = log
        .lines()
        .rfind(|l| l.contains("recovered state"))
        .and_then(|l| l.split("took_ms").nth(1))
        .map(|s| s.chars().filter(|c| c.is_ascii_digit()).collect::<String>())
        .unwrap_or_default();

    println!("# berth re-adoption benchmark: {workers} workers (/bin/sleep)");
    println!();
    println!("| measurement | value |");
    println!("| --- | --- |");
    println!("| shims alive | {} |", shims.len());
    println!("| shim RSS, median | {} KiB |", median(rss.clone()));
    println!("| shim PSS, median | {} KiB |", median(pss.clone()));
    println!(
        "| all shims together: RSS / PSS | {} / {} MiB |",
        rss.iter().sum::<u64>() / 1024,
        pss.iter().sum::<u64>() / 1024
    );
    println!("| berthd RSS with {workers} live workers | {daemon_rss} KiB |");
    println!(
        "| restart → answering gRPC with all re-adopted | {:.1} ms |",
        ready.as_secs_f64() * 1e3
    );
    println!("| of which recovery (daemon's own measure) | {took_ms} ms |");
    println!("| RUNNING after restart | {listed} of {workers} |");

    c.workers()
        .stop_workers(pb::StopWorkersRequest {
            all: true,
            grace_seconds: Some(5),
            ..Default::default()
        })
        .await?;
    tokio::time::sleep(Duration::from_millis(200)).await;
    Ok(())
}
