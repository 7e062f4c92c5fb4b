//! crun, the peer of berth's launches: `crun run` of a program in its own network, PID, IPC,
//! UTS and mount namespaces and a cgroup with CPU, memory and pids limits, timed from the start
//! of the `crun run` process to its exit (so crun's own exec and set-up are in it, as the
//! client's request is in berth's figures).
//!
//! crun runs in a helper process of its own, the benchmark binary again started with
//! [`HELPER_FLAG`] in a private mount namespace: there the hybrid host's cgroup2 controller list
//! is hidden (crun refuses hybrid hosts otherwise) and the host's `/` is bound read-only as the
//! containers' rootfs. Each benchmark's `main` is [`bench_main`], which hands its arguments to
//! [`helper_main`] first.

use std::fs;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::median;

/// The first argument that makes a benchmark binary the crun helper.
pub const HELPER_FLAG: &str = "--crun-helper";

/// The limits of each container (as berth's worker gets them).
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Cores (the CFS quota over a 100 ms period).
    pub cpu: f64,
    pub memory_bytes: u64,
    pub pids: u64,
}

/// What one helper run measured.
#[derive(Debug, Clone, Copy, Default)]
pub struct Times {
    /// Median of the one-at-a-time runs.
    pub serial_median: Duration,
    /// Total of the one-at-a-time runs divided by their number (the like of berth's
    /// total-of-a-batch / batch size).
    pub serial_mean: Duration,
    /// Per container in a batch spread over lanes (zero when no batch was asked for).
    pub batch_per: Duration,
}

/// Runs the crun helper if `args` (without the program name) start with [`HELPER_FLAG`];
/// `None` when they do not (the benchmark goes on as itself).
pub fn helper_main(args: &[String]) -> Option<Result<()>> {
    (args.first().map(String::as_str) == Some(HELPER_FLAG)).then(|| helper(&args[1..]))
}

/// The `main` of a benchmark that measures crun beside berth: the crun helper when the
/// arguments ask for it ([`helper_main`]), else root checked, the options parsed and `run` on a
/// runtime of two worker threads.
pub fn bench_main<O, F>(
    parse_opts: impl FnOnce(&[String]) -> Result<O>,
    run: impl FnOnce(O) -> F,
) -> Result<()>
where
    F: std::future::Future<Output = Result<()>>,
{
    let args: Vec<String> = std::env::args().skip(1).collect();
    if let Some(helper) = helper_main(&args) {
        return helper;
    }
    if !berth_tests::is_root() {
        bail!("needs root (cgroups, namespaces)");
    }
    let o = parse_opts(&args)?;
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?
        .block_on(run(o))
}

/// The helper: `SERIAL BATCH LANES BUNDLES_DIR`. Prints `median_us mean_us batch_us`.
fn helper(args: &[String]) -> Result<()> {
    let [serial, batch, lanes, bundles] = args else {
        bail!("usage: {HELPER_FLAG} SERIAL BATCH LANES BUNDLES_DIR");
    };
    let (serial, batch, lanes): (usize, usize, usize) =
        (serial.parse()?, batch.parse()?, lanes.parse()?);
    let bundles = PathBuf::from(bundles);
    let rootfs = bundles.join("rootfs");
    let c = |s: &str| std::ffi::CString::new(s).unwrap();
    // SAFETY: plain mount(2) calls with valid NUL-terminated strings, in this process's private
    // mount namespace (entered before exec).
    unsafe {
        let none = std::ptr::null();
        if libc::mount(
            none,
            c("/").as_ptr(),
            none,
            libc::MS_REC | libc::MS_PRIVATE,
            std::ptr::null(),
        ) != 0
        {
            bail!("make / private: {}", std::io::Error::last_os_error());
        }
        let ctl = "/sys/fs/cgroup/unified/cgroup.controllers";
        if Path::new(ctl).exists() {
            let empty = bundles.join("empty");
            fs::write(&empty, "")?;
            let e = c(empty.to_str().unwrap());
            if libc::mount(
                e.as_ptr(),
                c(ctl).as_ptr(),
                none,
                libc::MS_BIND,
                std::ptr::null(),
            ) != 0
            {
                bail!("hide {ctl}: {}", std::io::Error::last_os_error());
            }
        }
        let r = c(rootfs.to_str().unwrap());
        if libc::mount(
            c("/").as_ptr(),
            r.as_ptr(),
            none,
            libc::MS_BIND,
            std::ptr::null(),
        ) != 0
        {
            bail!("bind / for the rootfs: {}", std::io::Error::last_os_error());
        }
    }
    let run = |lane: usize, i: usize| -> Result<Duration> {
        let t = Instant::now();
        // crun's state beside berth's: both under TMPDIR, so that both pay the same
        // filesystem (crun's default, /run/crun, is tmpfs on most hosts but not on all).
        let st = Command::new("crun")
            .arg("--root")
            .arg(bundles.join("crun-state"))
            .args(["run", "--bundle"])
            .arg(bundles.join(format!("lane{lane}")))
            .arg(format!("berth-bench-{}-{lane}-{i}", std::process::id()))
            .stdin(Stdio::null())
            .status()?;
        if !st.success() {
            bail!("crun run: {st}");
        }
        Ok(t.elapsed())
    };
    run(0, 999_999)?;
    let mut single = Vec::new();
    let t = Instant::now();
    for i in 0..serial {
        single.push(run(0, i)?);
    }
    let mean = t.elapsed() / serial.max(1) as u32;
    let mut batch_per = Duration::ZERO;
    if batch > 0 {
        let lanes = lanes.clamp(1, batch);
        let t = Instant::now();
        std::thread::scope(|s| -> Result<()> {
            let hs: Vec<_> = (0..lanes)
                .map(|lane| {
                    let run = &run;
                    s.spawn(move || -> Result<()> {
                        for i in (lane..batch).step_by(lanes) {
                            run(lane, 1_000_000 + i)?;
                        }
                        Ok(())
                    })
                })
                .collect();
            for h in hs {
                h.join().map_err(|_| anyhow::anyhow!("lane panicked"))??;
            }
            Ok(())
        })?;
        batch_per = t.elapsed() / batch as u32;
    }
    println!(
        "{} {} {}",
        median(&mut single).as_micros(),
        mean.as_micros(),
        batch_per.as_micros()
    );
    Ok(())
}

/// The cgroup parent of this process's containers (under each hierarchy's root).
fn cgroup_parent() -> String {
    format!("berth-crun-bench-{}", std::process::id())
}

/// Writes one OCI bundle per lane running `args` (rootfs: the host's / bound read-only, /proc,
/// a tmpfs /dev; network, PID, IPC, UTS and mount namespaces; a cgroup with `limits`).
fn bundles(dir: &Path, lanes: usize, limits: Limits, args: &[&str]) -> Result<()> {
    fs::create_dir_all(dir.join("rootfs"))?;
    for lane in 0..lanes {
        let b = dir.join(format!("lane{lane}"));
        fs::create_dir_all(&b)?;
        let config = serde_json::json!({
            "ociVersion": "1.0.0",
            "process": {
                "terminal": false,
                "user": {"uid": 0, "gid": 0},
                "args": args,
                "env": ["PATH=/usr/bin:/bin"],
                "cwd": "/",
                "noNewPrivileges": true
            },
            "root": {"path": dir.join("rootfs"), "readonly": true},
            "hostname": "w",
            "mounts": [
                {"destination": "/proc", "type": "proc", "source": "proc"},
                {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
                 "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]}
            ],
            "linux": {
                "cgroupsPath": format!("/{}/lane{lane}", cgroup_parent()),
                "resources": {
                    "memory": {"limit": limits.memory_bytes},
                    "cpu": {"quota": (limits.cpu * 100_000.0).round() as i64, "period": 100_000},
                    "pids": {"limit": limits.pids}
                },
                "namespaces": [
                    {"type": "pid"}, {"type": "network"}, {"type": "ipc"},
                    {"type": "uts"}, {"type": "mount"}
                ]
            }
        });
        fs::write(b.join("config.json"), serde_json::to_vec_pretty(&config)?)?;
    }
    Ok(())
}

/// Whether crun is installed; the error says how to install it.
pub fn check() -> Result<()> {
    Command::new("crun")
        .arg("--version")
        .output()
        .map(|_| ())
        .context("crun is not installed (apt-get install -y crun)")
}

/// Runs `args` in `serial` containers one at a time, then (where `batch` > 0) in `batch`
/// containers over `lanes` lanes at once, each with `limits`; returns their times.
pub fn measure(
    serial: usize,
    batch: usize,
    lanes: usize,
    limits: Limits,
    args: &[&str],
) -> Result<Times> {
    check()?;
    let lanes = lanes.max(1);
    let dir = tempfile::tempdir()?;
    bundles(dir.path(), lanes, limits, args)?;
    let mut cmd = Command::new(std::env::current_exe()?);
    cmd.arg(HELPER_FLAG)
        .arg(serial.to_string())
        .arg(batch.to_string())
        .arg(lanes.to_string())
        .arg(dir.path());
    // SAFETY: between fork and exec the child only calls unshare(2).
    unsafe {
        cmd.pre_exec(|| {
            if libc::unshare(libc::CLONE_NEWNS) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let out = cmd.output()?;
    // crun makes the cgroup in every hierarchy it finds (v1 controllers, name=systemd, the v2
    // mount of a hybrid host, or the v2 root).
    for ctrl in [
        "cpu",
        "cpuacct",
        "memory",
        "pids",
        "freezer",
        "devices",
        "blkio",
        "cpuset",
        "systemd",
        "unified",
        "net_cls",
        "net_prio",
        "perf_event",
        "hugetlb",
        "rdma",
        "misc",
        "",
    ] {
        let base = Path::new("/sys/fs/cgroup").join(ctrl).join(cgroup_parent());
        if let Ok(rd) = fs::read_dir(&base) {
            for e in rd.flatten() {
                let _ = fs::remove_dir(e.path());
            }
        }
        let _ = fs::remove_dir(base);
    }
    if !out.status.success() {
        bail!(
            "crun helper: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let v: Vec<u64> = text
        .split_whitespace()
        .filter_map(|s| s.parse().ok())
        .collect();
    let [median_us, mean_us, batch_us] = v[..] else {
        bail!("crun helper printed {text:?}");
    };
    Ok(Times {
        serial_median: Duration::from_micros(median_us),
        serial_mean: Duration::from_micros(mean_us),
        batch_per: Duration::from_micros(batch_us),
    })
}
