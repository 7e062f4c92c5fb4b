//! Shared pieces of the benchmark harnesses: statistics and process memory readings.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use berth_tests::{pb, Client};

/// Median of `v` (sorts it).
pub fn median(v: &mut [Duration]) -> Duration {
    if v.is_empty() {
        return Duration::ZERO;
    }
    v.sort_unstable();
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2
    }
}

/// Milliseconds with three decimals.
pub fn ms(d: Duration) -> String {
    format!("{:.3} ms", d.as_secs_f64() * 1e3)
}

/// Resident set size of `pid` in KiB (VmRSS).
pub fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|r| r.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

/// (Rss, Pss) of `pid` in KiB from smaps_rollup.
pub fn rss_pss_kib(pid: u32) -> (u64, u64) {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).unwrap_or_default();
    let kb = |key: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|r| r.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .unwrap_or(0)
    };
    (kb("Rss:"), kb("Pss:"))
}

/// Launches `req` and returns the time from the call to the last worker's RUNNING event.
/// Fails when they are not all RUNNING within `within`.
pub async fn launch_to_running(
    client: &Client,
    req: pb::LaunchWorkersRequest,
    within: Duration,
) -> Result<(Duration, Vec<String>)> {
    let n = req.n as usize;
    let mut watch = client
        .workers()
        .watch_workers(pb::WatchWorkersRequest::default())
        .await?
        .into_inner();
    let t = Instant::now();
    let ids: Vec<String> = client
        .workers()
        .launch_workers(req)
        .await?
        .into_inner()
        .workers
        .into_iter()
        .map(|w| w.id)
        .collect();
    let wanted: HashSet<&String> = ids.iter().collect();
    let mut running = HashSet::new();
    while running.len() < n {
        let ev = tokio::time::timeout(within, watch.message())
            .await
            .with_context(|| format!("no RUNNING within {within:?}"))??
            .context("watch ended")?;
        let w = ev.worker.context("event without worker")?;
        if !wanted.contains(&w.id) {
            continue;
        }
        if w.status == pb::WorkerStatus::Running as i32 {
            running.insert(w.id);
        } else if w.status == pb::WorkerStatus::Failed as i32 && w.started_at.is_none() {
            bail!("worker {} failed to start: {}", w.id, w.reason);
        }
    }
    Ok((t.elapsed(), ids))
}

/// Awaits `ids` to completion (at most `timeout_seconds`); fails if any of them failed.
pub async fn settle(client: &Client, ids: &[String], timeout_seconds: u32) -> Result<()> {
    let r = client
        .workers()
        .await_workers(pb::AwaitWorkersRequest {
            ids: ids.to_vec(),
            timeout_seconds: Some(timeout_seconds),
            ..Default::default()
        })
        .await?
        .into_inner();
    if !r.failures.is_empty() {
        bail!(
            "{} workers failed: {:?}",
            r.failures.len(),
            r.failures[0].reason
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians() {
        let d = Duration::from_millis;
        assert_eq!(median(&mut [d(3), d(1), d(2)]), d(2));
        assert_eq!(
            median(&mut [d(4), d(1), d(2), d(3)]),
            Duration::from_micros(2500)
        );
        assert_eq!(median(&mut []), Duration::ZERO);
    }
}
