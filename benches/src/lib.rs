//! Shared pieces of the benchmark harnesses: statistics, process memory readings, launches
//! timed as a client sees them, the floors, and crun as the peer ([`crun`]).

pub mod crun;

use std::collections::{HashMap, HashSet};
use std::fmt::Display;
use std::fs;
use std::net::{IpAddr, Ipv4Addr};
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::Command;
use std::str::FromStr;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use berth_core::ipam::Subnet;
use berth_sys::cgroup::{join_file, CgroupVersion};
use berth_sys::netns::one_queue;
use berth_tests::{pb, Client, TestNet};
use futures::TryStreamExt;
use rtnetlink::packet_route::link::{InfoData, InfoVeth};
use rtnetlink::packet_route::route::RouteScope;
use rtnetlink::{LinkUnspec, LinkVeth, RouteMessageBuilder};

/// A benchmark's command line: `--flag VALUE` pairs and bare `--switch`es. `--help` prints the
/// usage and exits; an unknown flag, a missing value or a bad number is an error that shows it.
pub struct Flags {
    values: HashMap<String, String>,
    switches: HashSet<String>,
    usage: String,
}

impl Flags {
    /// Parses `args` (without the program name). `valued` and `switches` list the flags.
    pub fn parse(usage: &str, args: &[String], valued: &[&str], switches: &[&str]) -> Result<Self> {
        let mut f = Flags {
            values: HashMap::new(),
            switches: HashSet::new(),
            usage: usage.to_owned(),
        };
        let mut it = args.iter();
        while let Some(a) = it.next() {
            match a.as_str() {
                "-h" | "--help" => {
                    println!("{usage}");
                    std::process::exit(0);
                }
                s if switches.contains(&s) => {
                    f.switches.insert(s.to_owned());
                }
                v if valued.contains(&v) => {
                    let value = it
                        .next()
                        .with_context(|| format!("{v} needs a value\n{usage}"))?;
                    f.values.insert(v.to_owned(), value.clone());
                }
                other => bail!("unknown flag {other}\n{usage}"),
            }
        }
        Ok(f)
    }

    /// Sets `into` from `--name`'s value where given.
    pub fn set<T: FromStr>(&self, name: &str, into: &mut T) -> Result<()>
    where
        T::Err: Display,
    {
        if let Some(v) = self.values.get(name) {
            *into = v
                .parse()
                .map_err(|e| anyhow::anyhow!("{name} {v}: {e}\n{}", self.usage))?;
        }
        Ok(())
    }

    /// Whether the switch `--name` was given.
    pub fn switch(&self, name: &str) -> bool {
        self.switches.contains(name)
    }
}

/// The filesystem type holding `path` (longest mount point of /proc/self/mounts that contains
/// it), e.g. `tmpfs` or `ext4`: the daemons' state directories live in the temporary directory
/// (`TMPDIR`), and file creation costs differ a lot between filesystems.
pub fn fs_type(path: &std::path::Path) -> String {
    let mounts = fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    mounts
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let (_, at, ty) = (f.next()?, f.next()?, f.next()?);
            path.starts_with(at).then(|| (at.len(), ty.to_owned()))
        })
        .max_by_key(|(len, _)| *len)
        .map_or_else(|| "unknown".to_owned(), |(_, ty)| ty)
}

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

/// `CLOCK_MONOTONIC` now in microseconds: the clock of berthd's `berth_phase` marks.
pub fn mono_us() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    (ts.tv_sec as u64) * 1_000_000 + (ts.tv_nsec as u64) / 1_000
}

/// The load averages (`/proc/loadavg`'s first three fields), to print beside figures.
pub fn loadavg() -> String {
    fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
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
    let ids = launch_ids(client, req).await?;
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

/// How many workers `client` lists as RUNNING.
pub async fn running_count(client: &Client) -> Result<usize> {
    Ok(client
        .workers()
        .list_workers(pb::ListWorkersRequest {
            statuses: vec![pb::WorkerStatus::Running as i32],
            ..Default::default()
        })
        .await?
        .into_inner()
        .workers
        .len())
}

/// Launches `req` and returns the ids of its workers, in the answer's order.
pub async fn launch_ids(client: &Client, req: pb::LaunchWorkersRequest) -> Result<Vec<String>> {
    Ok(client
        .workers()
        .launch_workers(req)
        .await?
        .into_inner()
        .workers
        .into_iter()
        .map(|w| w.id)
        .collect())
}

/// Launches `req` and, as soon as the launch answers, awaits all its workers' ends through
/// `AwaitWorkers`: the time from the launch call to the await's answer (launch → every worker
/// exited, as a client sees it). Fails if any worker did not succeed.
pub async fn launch_to_exit(
    client: &Client,
    req: pb::LaunchWorkersRequest,
    timeout_seconds: u32,
) -> Result<(Duration, Vec<String>)> {
    let t = Instant::now();
    let ids = launch_ids(client, req).await?;
    settle(client, &ids, timeout_seconds).await?;
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

/// Waits (up to 60 s) until the daemon whose metrics listen on `port` has `want` namespaces
/// ready (`berth_netns_ready`).
pub async fn wait_netns_ready(port: u16, want: usize) {
    use std::io::{Read, Write};
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        let ready = std::net::TcpStream::connect(("127.0.0.1", port))
            .ok()
            .and_then(|mut s| {
                s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").ok()?;
                let mut body = String::new();
                s.read_to_string(&mut body).ok()?;
                body.lines()
                    .find_map(|l| l.strip_prefix("berth_netns_ready "))
                    .and_then(|v| v.trim().parse::<usize>().ok())
            });
        if ready.is_some_and(|r| r >= want) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Address `offset` of `subnet`.
pub fn addr(subnet: &Subnet, offset: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(subnet.network()) + offset)
}

/// The floor of a worker network: one made the plain way (rtnetlink's async handles), on a fresh thread that holds
/// the namespace; it goes with the thread. Returns the time from unshare to the last route.
pub fn floor_once(subnet: Subnet, ip: Ipv4Addr, name: String) -> Result<Duration> {
    std::thread::spawn(move || -> Result<Duration> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        rt.block_on(async move {
            let (conn, host, _) = rtnetlink::new_connection()?;
            tokio::spawn(conn);
            let t = Instant::now();
            // SAFETY: unshare of the network namespace affects only this thread.
            if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
                bail!("unshare: {}", std::io::Error::last_os_error());
            }
            let ns = std::fs::File::open("/proc/thread-self/ns/net")?;
            let (conn, inner, _) = rtnetlink::new_connection()?;
            tokio::spawn(conn);
            inner
                .link()
                .set(LinkUnspec::new_with_index(1).up().build())
                .execute()
                .await?;
            // One queue per end, as berth asks (see `berth_sys::netns::create_veth`): the
            // least kernel work a veth pair takes.
            let peer =
                one_queue(LinkUnspec::new_with_name("eth0").setns_by_fd(ns.as_raw_fd())).build();
            host.link()
                .add(
                    one_queue(LinkVeth::new(&name, "eth0"))
                        .set_info_data(InfoData::Veth(InfoVeth::Peer(peer)))
                        .build(),
                )
                .execute()
                .await?;
            let idx = host
                .link()
                .get()
                .match_name(name.clone())
                .execute()
                .try_next()
                .await?
                .context("host end")?
                .header
                .index;
            host.link()
                .set(LinkUnspec::new_with_index(idx).up().build())
                .execute()
                .await?;
            host.route()
                .add(
                    RouteMessageBuilder::<Ipv4Addr>::new()
                        .destination_prefix(ip, 32)
                        .output_interface(idx)
                        .scope(RouteScope::Link)
                        .build(),
                )
                .execute()
                .await?;
            let e = inner
                .link()
                .get()
                .match_name("eth0")
                .execute()
                .try_next()
                .await?
                .context("eth0")?
                .header
                .index;
            inner
                .link()
                .set(LinkUnspec::new_with_index(e).up().build())
                .execute()
                .await?;
            inner.address().add(e, IpAddr::V4(ip), 32).execute().await?;
            inner
                .route()
                .add(
                    RouteMessageBuilder::<Ipv4Addr>::new()
                        .gateway(subnet.gateway())
                        .output_interface(e)
                        .onlink()
                        .build(),
                )
                .execute()
                .await?;
            Ok(t.elapsed())
        })
    })
    .join()
    .map_err(|_| anyhow::anyhow!("floor thread panicked"))?
}

/// Median of `n` worker networks made by [`floor_once`] on a test network slot of its own.
pub fn network_floor(n: usize) -> Result<Duration> {
    let own = TestNet::claim()?;
    let subnet = Subnet::parse(&own.subnet).map_err(|e| anyhow::anyhow!("{e}"))?;
    let mut v = Vec::new();
    for i in 0..n {
        v.push(floor_once(
            subnet,
            addr(&subnet, 2 + i as u32),
            format!("bf{}x{i}", std::process::id() % 10_000),
        )?);
    }
    Ok(median(&mut v))
}

/// The v1 hierarchies berth uses, as mounted here.
pub fn hierarchies() -> Vec<PathBuf> {
    ["cpu", "cpuacct", "memory", "pids", "freezer", "devices"]
        .iter()
        .map(|c| PathBuf::from("/sys/fs/cgroup").join(c))
        .filter(|p| p.join("cgroup.procs").exists())
        .collect()
}

/// cgroup create (mkdir + limits) + fork/exec of /bin/true joined before exec (through the file
/// berth's shim writes) + wait + rmdir.
/// Returns (create+limits, whole create+join+spawn+remove) medians.
pub fn floor_cgroup(n: usize) -> Result<(Duration, Duration)> {
    let roots = hierarchies();
    if roots.is_empty() {
        bail!("no cgroup v1 hierarchies (the floor harness measures v1)");
    }
    let mut create = Vec::new();
    let mut whole = Vec::new();
    for i in 0..n {
        let t = Instant::now();
        let dirs: Vec<PathBuf> = roots
            .iter()
            .map(|r| r.join(format!("berth-floor-{}-{i}", std::process::id())))
            .collect();
        for d in &dirs {
            fs::create_dir(d)?;
        }
        let w = |d: &PathBuf, f: &str, v: &str| fs::write(d.join(f), v);
        for d in &dirs {
            let ctrl = d
                .parent()
                .and_then(|p| p.file_name())
                .and_then(|s| s.to_str())
                .unwrap_or("");
            match ctrl {
                // As berth: the period stays the default, only the quota is written (each
                // write walks every CPU cgroup of the host).
                "cpu" => w(d, "cpu.cfs_quota_us", "10000")?,
                "memory" => w(d, "memory.limit_in_bytes", "134217728")?,
                "pids" => w(d, "pids.max", "4096")?,
                _ => {}
            }
        }
        create.push(t.elapsed());
        let procs: Vec<fs::File> = dirs
            .iter()
            .map(|d| {
                fs::OpenOptions::new()
                    .write(true)
                    .open(d.join(join_file(CgroupVersion::V1)))
            })
            .collect::<std::io::Result<_>>()?;
        let fds: Vec<i32> = procs.iter().map(std::os::fd::AsRawFd::as_raw_fd).collect();
        let mut cmd = Command::new("/bin/true");
        // SAFETY: the hook only calls write(2) on fds opened before fork.
        unsafe {
            cmd.pre_exec(move || {
                for fd in &fds {
                    if libc::write(*fd, b"0".as_ptr().cast(), 1) != 1 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
        let st = cmd.status()?;
        assert!(st.success());
        drop(procs);
        for d in &dirs {
            fs::remove_dir(d)?;
        }
        whole.push(t.elapsed());
    }
    Ok((median(&mut create), median(&mut whole)))
}

/// The `berth_phase` marks in a JSON log: (phase, worker or "", t_us), those after `since`.
pub fn phase_marks(log: &str, since: u64) -> Vec<(String, String, u64)> {
    log.lines()
        .filter(|l| l.contains("berth_phase"))
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["target"] == "berth_phase")
        .filter_map(|v| {
            let f = &v["fields"];
            Some((
                f["phase"].as_str()?.to_owned(),
                f["worker"].as_str().unwrap_or("").to_owned(),
                f["t_us"].as_u64()?,
            ))
        })
        .filter(|m| m.2 >= since)
        .collect()
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
