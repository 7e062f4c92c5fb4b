//! Output followers benchmark (issue: hardening, load limits).
//!
//! Opens `--followers` `StreamOutput` follows (from the start, following) spread over `--workers`
//! idle workers, on connections of at most 1000 streams each, and measures what they cost
//! berthd while nothing is written: its CPU (utime + stime from /proc) over `--seconds`, and its
//! RSS. Then, with all of them still open, a worker prints a line holding the time every
//! `--interval-ms` for `--seconds`, and one follower of it measures each line's delay from
//! write to arrival (median, p99). Last, every worker is stopped and the time until every
//! follow has ended is taken.
//!
//! Run as root from a release build: `target/release/berth-bench-follow [--followers 10000]`.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use berth_benches::{launch_ids, Flags};
use berth_tests::{command_request, pb, python_request, Client, Daemon, DaemonOptions};

/// utime + stime of process `pid`, in seconds.
fn cpu_seconds(pid: u32) -> Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let rest = &stat[stat.rfind(')').context("stat")? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = f[11].parse::<u64>()? + f[12].parse::<u64>()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Ok(ticks as f64 / hz)
}

fn now_secs() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// berthd's CPU over `d`, in percent of one core.
async fn cpu_percent_over(pid: u32, d: Duration) -> Result<f64> {
    let (c0, t0) = (cpu_seconds(pid)?, Instant::now());
    tokio::time::sleep(d).await;
    Ok((cpu_seconds(pid)? - c0) / t0.elapsed().as_secs_f64() * 100.0)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    if !berth_tests::is_root() {
        bail!("needs root (cgroups)");
    }
    let (mut followers, mut workers, mut seconds, mut interval_ms): (usize, usize, u64, u64) =
        (10_000, 100, 60, 200);
    let args: Vec<String> = std::env::args().skip(1).collect();
    let flags = Flags::parse(
        "usage: berth-bench-follow [--followers N] [--workers N] [--seconds S] [--interval-ms MS]",
        &args,
        &["--followers", "--workers", "--seconds", "--interval-ms"],
        &[],
    )?;
    flags.set("--followers", &mut followers)?;
    flags.set("--workers", &mut workers)?;
    flags.set("--seconds", &mut seconds)?;
    flags.set("--interval-ms", &mut interval_ms)?;
    let d = Daemon::start_with(DaemonOptions {
        config: "[resources]\nmax_workers = 8192\n".into(),
        ..Default::default()
    })
    .await?;
    let pid = d.pid().context("pid")?;
    let c = d.client().await?;
    let idle = pb::LaunchWorkersRequest {
        cpu: 0.001,
        memory_gb: 0.01,
        ..command_request(
            workers as u32,
            &["/bin/sh", "-c", "echo ready; exec sleep 3600"],
        )
    };
    let ids = launch_ids(&c, idle).await?;
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
    let cpu_before = cpu_percent_over(pid, Duration::from_secs(5)).await?;

    // The follows, each on an idle worker, 1000 to a connection.
    let mut channels: Vec<Client> = Vec::new();
    for _ in 0..followers.div_ceil(1000) {
        channels.push(d.client().await?);
    }
    let started = Arc::new(AtomicUsize::new(0));
    let t = Instant::now();
    let mut follows = Vec::with_capacity(followers);
    for i in 0..followers {
        let mut w = channels[i / 1000].workers();
        let id = ids[i % ids.len()].clone();
        let started = started.clone();
        follows.push(tokio::spawn(async move {
            let mut s = w
                .stream_output(pb::StreamOutputRequest {
                    ids: vec![id],
                    follow: true,
                    from_start: true,
                    ..Default::default()
                })
                .await?
                .into_inner();
            s.message().await?.context("no first line")?;
            started.fetch_add(1, Ordering::Relaxed);
            while s.message().await?.is_some() {}
            anyhow::Ok(Instant::now())
        }));
    }
    while started.load(Ordering::Relaxed) < followers {
        if t.elapsed() > Duration::from_secs(600) {
            bail!(
                "{} of {followers} follows started within 600 s",
                started.load(Ordering::Relaxed)
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let opened = t.elapsed();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss = berth_benches::rss_kib(pid);
    let idle_cpu = cpu_percent_over(pid, Duration::from_secs(seconds)).await?;

    // One worker writes a line every interval; one follower of it times each line.
    let lines = (seconds * 1000 / interval_ms.max(1)).max(1);
    let code = format!(
        "import time\nfor i in range({lines}):\n    time.sleep({})\n    \
         print('%.6f' % time.time(), flush=True)\n",
        interval_ms as f64 / 1000.0
    );
    let ticker = c
        .workers()
        .launch_workers(python_request(1, &code))
        .await?
        .into_inner()
        .workers
        .remove(0);
    let mut s = c
        .workers()
        .stream_output(pb::StreamOutputRequest {
            ids: vec![ticker.id.clone()],
            follow: true,
            from_start: true,
            streams: vec![pb::Stream::Stdout as i32],
            ..Default::default()
        })
        .await?
        .into_inner();
    let (c0, t0) = (cpu_seconds(pid)?, Instant::now());
    let mut delays = Vec::new();
    let mut pending = String::new();
    while let Some(ch) = s.message().await? {
        let at = now_secs();
        pending.push_str(&String::from_utf8_lossy(&ch.data));
        while let Some(nl) = pending.find('\n') {
            let line: String = pending.drain(..=nl).collect();
            let written: f64 = line.trim().parse().context("a ticker line")?;
            delays.push((at - written) * 1000.0);
        }
    }
    let busy_cpu = (cpu_seconds(pid)? - c0) / t0.elapsed().as_secs_f64() * 100.0;
    // The interpreter's start delays the first lines; the rest is the steady state.
    let mut steady: Vec<f64> = delays.iter().skip(5).copied().collect();
    steady.sort_by(f64::total_cmp);

    // Every worker ends: every follow ends.
    let t = Instant::now();
    c.workers()
        .stop_workers(pb::StopWorkersRequest {
            all: true,
            grace_seconds: Some(5),
            ..Default::default()
        })
        .await?;
    let mut last = t;
    for f in follows {
        last = last.max(f.await??);
    }
    let ended = last - t;

    println!("# berth output followers benchmark: {followers} follows of {workers} idle workers");
    println!();
    println!("| measurement | value |");
    println!("| --- | --- |");
    println!("| berthd CPU before any follow (5 s) | {cpu_before:.2} % |");
    println!("| {followers} follows opened, first line in each | {opened:.1?} |");
    println!(
        "| berthd RSS with {followers} follows | {} MiB |",
        rss / 1024
    );
    println!("| berthd CPU, {followers} idle follows, over {seconds} s | {idle_cpu:.2} % |");
    println!(
        "| line delay, write → follower, {} lines every {interval_ms} ms: median | {:.2} ms |",
        steady.len(),
        percentile(&steady, 0.5)
    );
    println!(
        "| line delay: p99 / max | {:.2} / {:.2} ms |",
        percentile(&steady, 0.99),
        percentile(&steady, 1.0)
    );
    println!("| berthd CPU while the line follower runs | {busy_cpu:.2} % |");
    println!("| stop of every worker → every follow ended | {ended:.1?} |");
    tokio::time::sleep(Duration::from_millis(200)).await;
    Ok(())
}
