//! Time to a Python worker's first line (issue 19: the warm interpreter pool).
//!
//! From `LaunchWorkers` to the first output line at a gRPC client that follows the worker's
//! stdout (`StreamOutput`, follow, from the start), for `--launches` launches one after another
//! (each right after the previous one's first line), of `print(1)` and of `import numpy;
//! print(1)`: on a daemon with a pool of `--pool` (`[kernels.python3] pool_size`; preload none
//! for `print(1)`, `numpy` for the other) and on one without (cold). Beside them, the floor:
//! `/usr/bin/python3 -c CODE` spawned bare, to its first line on a pipe, as many times, and a
//! fork of an interpreter with and without numpy imported (what a fork server's refill would
//! cost, against an interpreter's start: see [`FORK_TIMER`]). Also
//! what one idle pooled worker holds (its cgroup's memory and its interpreter's RSS/PSS), with
//! and without numpy preloaded.
//!
//! Each pooled and cold series runs twice, with the client following in either way: a
//! `StreamOutput` of the worker opened once the launch is answered (as `berth logs -f ID`), and
//! one `StreamOutput` of a session with `new_workers`, open before the launches, which are made
//! in that session (as a notebook session shows its workers' output): there a first line can
//! come before the launch's answer.
//!
//! With `--phases N` instead: where a pooled `print(1)` launch's time goes, as the median time
//! after the call of each of berthd's `berth_phase` marks (see `berth_host::phase`) over N
//! launches, each with the pool refilled (`--session`: followed by a session follower);
//! `BERTH_BENCH_MARKS=1` also prints every launch's marks. With `--back-to-back`: only the
//! back-to-back series with a session follower, pooled, for both lines (quick A/B runs of two
//! builds through `BERTH_BIN_DIR`); with `--phases N` too, the marks of those of N back-to-back
//! launches that the pool served (`--pause MS` between a launch's end and the next: what the
//! previous worker's exit and teardown cost the next one).
//!
//! With the Python client's venv (`tests/clients/setup.sh`, or `--python PATH`), also the Python
//! client's view: `launch_workers` in a session → the first line printed in the calling process.
//!
//! Needs root and Debian's numpy (`apt-get install python3-numpy`). Run from a release build:
//! `target/release/berth-bench-firstline [--launches 200] [--pool 4] [--phases N [--session]
//! [--pause MS]] [--back-to-back]`.

use std::io::BufRead;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use berth_benches::{mono_us, ms, phase_marks, rss_pss_kib, Flags};
use berth_tests::{pb, Client, Daemon, DaemonOptions};

/// The Python client's view: `launch_workers` (show_output on, in a session) → the worker's
/// first line printed in the calling process (`sys.stdout` replaced by a tap), per launch.
/// Args: address, launches, code; prints one line per launch: `<seconds> <pooled 0|1>`.
const PYTHON_CLIENT: &str = r#"
import sys, threading, time
import berth

addr, n, code = sys.argv[1], int(sys.argv[2]), sys.argv[3]
out = sys.stdout
printed = threading.Event()
at = [0.0]

class Tap:
    def write(self, text):
        if "] 1\n" in text and not printed.is_set():
            at[0] = time.perf_counter()
            printed.set()
        return len(text)

    def flush(self):
        pass

sys.stdout = Tap()
client = berth.Client(addr, show_output=True)
session = client.session(ttl=3600)
for _ in range(n):
    printed.clear()
    t0 = time.perf_counter()
    ws = session.launch_workers(n=1, cpu=1.0, memory=0.25, code=code)
    if not printed.wait(60):
        raise SystemExit("no first line within 60 s")
    session.await_workers(ws)
    out.write(f"{at[0] - t0:.6f} {int(ws[0]['pooled'])}\n")
    out.flush()
session.close()
client.close()
"#;

/// The Python client's series (see [`PYTHON_CLIENT`]) of `n` launches of `code` against `d`,
/// run by `python` (a venv with berth installed): (pooled, cold) first-line times.
fn python_series(
    python: &Path,
    d: &Daemon,
    code: &str,
    n: usize,
) -> Result<(Vec<Duration>, Vec<Duration>)> {
    let out = Command::new(python)
        .args(["-c", PYTHON_CLIENT, &d.addr(), &n.to_string(), code])
        .stderr(Stdio::inherit())
        .output()?;
    if !out.status.success() {
        bail!("the Python client's series failed: {}", out.status);
    }
    let (mut pooled, mut cold) = (Vec::new(), Vec::new());
    for l in String::from_utf8_lossy(&out.stdout).lines() {
        let (t, p) = l.split_once(' ').context("a line of the Python series")?;
        let t = Duration::from_secs_f64(t.parse()?);
        if p == "1" {
            pooled.push(t);
        } else {
            cold.push(t);
        }
    }
    Ok((pooled, cold))
}

const PRINT: &str = "print(1)";
const NUMPY: &str = "import numpy; print(1)";
/// Each line measured, with the pool's preload list for it (TOML).
const LINES: [(&str, &str); 2] = [(PRINT, ""), (NUMPY, "\"numpy\"")];

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn summary(name: &str, mut v: Vec<Duration>, extra: &str) {
    v.sort();
    println!(
        "{name:<34} p50 {:>9}  p99 {:>9}  (n={}{extra})",
        ms(percentile(&v, 0.5)),
        ms(percentile(&v, 0.99)),
        v.len()
    );
}

/// The summary of a back-to-back series: all its launches, those from the pool, the cold ones.
fn back_to_back(pooled: Vec<Duration>, cold: Vec<Duration>) {
    let all: Vec<Duration> = pooled.iter().chain(&cold).copied().collect();
    let n_pooled = pooled.len();
    summary(
        "   back to back, all",
        all,
        &format!(", {n_pooled} from the pool"),
    );
    if !pooled.is_empty() {
        summary("     of which from the pool", pooled, "");
    }
    if !cold.is_empty() {
        summary("     of which cold (pool empty)", cold, "");
    }
}

/// Forks `n` children of one `/usr/bin/python3` that imported `preload` and times each fork to
/// the child's first write on a pipe: what a refill from a fork server (one preloaded
/// interpreter that forks each pooled worker) would cost at least, against an interpreter's
/// start. The figures come from the interpreter's `perf_counter`, one per line, in µs.
const FORK_TIMER: &str = r#"
import os, sys, time
for m in filter(None, sys.argv[2].split(',')):
    __import__(m)
for _ in range(int(sys.argv[1])):
    r, w = os.pipe()
    t0 = time.perf_counter()
    pid = os.fork()
    if pid == 0:
        os.write(w, b'x')
        os._exit(0)
    os.read(r, 1)
    t1 = time.perf_counter()
    os.waitpid(pid, 0)
    os.close(r)
    os.close(w)
    print(round((t1 - t0) * 1e6))
"#;

/// See [`FORK_TIMER`].
fn forks(preload: &str, n: usize) -> Result<Vec<Duration>> {
    let out = Command::new("/usr/bin/python3")
        .args(["-c", FORK_TIMER, &n.to_string(), preload])
        .stderr(Stdio::inherit())
        .output()?;
    if !out.status.success() {
        bail!("fork timer: {}", out.status);
    }
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| Ok(Duration::from_micros(l.trim().parse()?)))
        .collect()
}

/// `/usr/bin/python3 -u -c CODE` to its first stdout line, bare.
fn bare(code: &str, n: usize) -> Result<Vec<Duration>> {
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let t0 = Instant::now();
        let mut child = Command::new("/usr/bin/python3")
            .args(["-u", "-c", code])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()?;
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().context("stdout")?).read_line(&mut line)?;
        out.push(t0.elapsed());
        if line.trim() != "1" {
            bail!("bare python printed {line:?}");
        }
        child.wait()?;
    }
    Ok(out)
}

/// Ready pooled interpreters of `d` (each holds its claim FIFO open), by pid.
fn ready_pooled(d: &Daemon) -> Vec<u32> {
    let workers = d.state_dir().join("workers");
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        if !std::fs::read_to_string(format!("/proc/{pid}/comm"))
            .is_ok_and(|c| c.starts_with("python3"))
        {
            continue;
        }
        let holds = std::fs::read_dir(format!("/proc/{pid}/fd"))
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|fd| std::fs::read_link(fd.path()).ok())
            .any(|t| t.starts_with(&workers) && t.file_name().is_some_and(|n| n == "claim"));
        if holds {
            out.push(pid);
        }
    }
    out
}

async fn wait_ready(d: &Daemon, n: usize) -> Result<Vec<u32>> {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let r = ready_pooled(d);
        if r.len() >= n {
            return Ok(r);
        }
        if Instant::now() > deadline {
            bail!("{} of {n} pooled workers ready:\n{}", r.len(), d.log());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// How the client follows a launch's output.
enum Follower {
    /// `StreamOutput` of the worker, opened once the launch is answered (`berth logs -f ID`).
    AfterAnswer,
    /// One `StreamOutput` of a session with `new_workers`, open before the launches (what a
    /// notebook session keeps open): each launch is made in that session, and its first line
    /// may come before its answer.
    Session(SessionFollower),
}

/// A session's follower: its reader task sends the arrival of each worker's first line.
struct SessionFollower {
    session: String,
    lines: tokio::sync::mpsc::UnboundedReceiver<(String, Instant)>,
}

impl Follower {
    /// A session follower with `session`, else one opened after each answer.
    async fn new(c: &Client, session: bool) -> Result<Self> {
        if !session {
            return Ok(Self::AfterAnswer);
        }
        let session = berth_tests::open_session(c, 24 * 3600).await.id;
        let mut s = c
            .workers()
            .stream_output(pb::StreamOutputRequest {
                session_id: session.clone(),
                follow: true,
                from_start: true,
                new_workers: true,
                streams: vec![pb::Stream::Stdout as i32],
                ..Default::default()
            })
            .await?
            .into_inner();
        let (tx, lines) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            let mut seen = std::collections::HashSet::new();
            while let Ok(Some(chunk)) = s.message().await {
                let at = Instant::now();
                if chunk.data.contains(&b'\n')
                    && seen.insert(chunk.worker_id.clone())
                    && tx.send((chunk.worker_id, at)).is_err()
                {
                    return;
                }
            }
        });
        Ok(Self::Session(SessionFollower { session, lines }))
    }
}

/// One launch of `code`: the time to its first line, the time to the answer of LaunchWorkers,
/// and whether it came from the pool.
async fn first_line(
    c: &Client,
    code: &str,
    follower: &mut Follower,
) -> Result<(Duration, Duration, bool)> {
    let (first, answered, pooled, _, _) = first_line_marked(c, code, follower).await?;
    Ok((first, answered, pooled))
}

/// `first_line`, with the client's `CLOCK_MONOTONIC` at the call (µs, the clock of berthd's
/// phase marks).
async fn first_line_marked(
    c: &Client,
    code: &str,
    follower: &mut Follower,
) -> Result<(Duration, Duration, bool, u64, String)> {
    let req = pb::LaunchWorkersRequest {
        n: 1,
        cpu: 1.0,
        memory_gb: 0.25,
        code: code.into(),
        session_id: match follower {
            Follower::Session(f) => f.session.clone(),
            Follower::AfterAnswer => String::new(),
        },
        ..Default::default()
    };
    let sent = mono_us();
    let t0 = Instant::now();
    let w = c
        .workers()
        .launch_workers(req)
        .await?
        .into_inner()
        .workers
        .pop()
        .context("no worker")?;
    let answered = t0.elapsed();
    if let Follower::Session(f) = follower {
        let (id, at) = tokio::time::timeout(Duration::from_secs(60), f.lines.recv())
            .await
            .context("no first line within 60 s")?
            .context("the session's stream ended")?;
        if id != w.id {
            bail!("a first line of {id} while {} was launched", w.id);
        }
        // Untimed, as below.
        berth_tests::await_all(c, std::slice::from_ref(&w.id)).await?;
        return Ok((at.duration_since(t0), answered, w.pooled, sent, w.id));
    }
    let mut s = c
        .workers()
        .stream_output(pb::StreamOutputRequest {
            ids: vec![w.id.clone()],
            follow: true,
            from_start: true,
            streams: vec![pb::Stream::Stdout as i32],
            ..Default::default()
        })
        .await?
        .into_inner();
    while let Some(chunk) = s.message().await? {
        if chunk.data.contains(&b'\n') {
            let first = t0.elapsed();
            // Untimed: the next launch comes once this one has ended (a whole CPU each, so
            // neither a quota nor the host's capacity shapes the figure).
            drop(s);
            berth_tests::await_all(c, std::slice::from_ref(&w.id)).await?;
            return Ok((first, answered, w.pooled, sent, w.id));
        }
    }
    bail!("worker {} ended without a line", w.id)
}

/// `n` launches of `code` one after another; with `full`, each waits until the pool holds `full`
/// ready workers again. Returns the times of the launches served from the pool and of the others.
async fn series(
    d: &Daemon,
    code: &str,
    n: usize,
    full: Option<usize>,
    session: bool,
) -> Result<(Vec<Duration>, Vec<Duration>, Vec<Duration>)> {
    let c = d.client().await?;
    let mut follower = Follower::new(&c, session).await?;
    let (mut pooled, mut cold, mut answers) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..n {
        if let Some(k) = full {
            wait_ready(d, k).await?;
        }
        let (t, a, p) = first_line(&c, code, &mut follower).await?;
        if p {
            pooled.push(t);
            answers.push(a);
        } else {
            cold.push(t);
        }
    }
    Ok((pooled, cold, answers))
}

fn daemon_options(pool: usize, preload: &str) -> DaemonOptions {
    DaemonOptions {
        // As shipped: the test harness's default logs every launch at debug level.
        env: vec![("BERTH_LOG".into(), "info".into())],
        config: format!(
            "worker_user = \"nobody\"\n[resources]\nmax_workers = 8192\n[retention]\nmax_finished = 100000\n\
             [kernels.python3]\npool_size = {pool}\npreload = [{preload}]\n"
        ),
        ..Default::default()
    }
}

/// Memory one idle pooled worker holds: its cgroup's, and its interpreter's RSS and PSS (KiB).
fn idle_memory(d: &Daemon, pids: &[u32]) -> (u64, u64, u64) {
    let (mut cg, mut rss, mut pss) = (0, 0, 0);
    for &pid in pids {
        let (r, p) = rss_pss_kib(pid);
        rss += r;
        pss += p;
        let id = cgroup_of(pid).unwrap_or_default();
        for file in ["memory.usage_in_bytes", "memory.current"] {
            if let Some(f) = d.worker_cgroup_file(&id, file) {
                if let Ok(t) = std::fs::read_to_string(f) {
                    cg += t.trim().parse::<u64>().unwrap_or(0) / 1024;
                    break;
                }
            }
        }
    }
    let n = pids.len().max(1) as u64;
    (cg / n, rss / n, pss / n)
}

/// The worker id of process `pid`: the last part of its cgroup path.
fn cgroup_of(pid: u32) -> Option<String> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    text.lines()
        .filter_map(|l| l.rsplit(':').next())
        .filter_map(|p| {
            Path::new(p)
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
        })
        .find(|n| berth_core::is_valid_id(n) && n.len() == 12)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    if !berth_tests::is_root() {
        bail!("needs root (cgroups, network namespaces)");
    }
    let (mut launches, mut pool, mut phases, mut pause_ms): (usize, usize, usize, u64) =
        (200, 4, 0, 0);
    let args: Vec<String> = std::env::args().skip(1).collect();
    let flags = Flags::parse(
        "usage: berth-bench-firstline [--launches N] [--pool N] [--python PATH] [--phases N [--session] [--pause MS]] [--back-to-back]",
        &args,
        &["--launches", "--pool", "--phases", "--python", "--pause"],
        &["--session", "--back-to-back"],
    )?;
    // The Python client's venv, as tests/clients/setup.sh makes it.
    let mut python = std::path::PathBuf::from("target/client-venv/bin/python");
    flags.set("--python", &mut python)?;
    let session = flags.switch("--session");
    flags.set("--launches", &mut launches)?;
    flags.set("--pool", &mut pool)?;
    flags.set("--phases", &mut phases)?;
    flags.set("--pause", &mut pause_ms)?;
    let only_back_to_back = flags.switch("--back-to-back");
    if phases > 0 {
        let pause = Duration::from_millis(pause_ms);
        return phase_breakdown(pool, phases, session, !only_back_to_back, pause).await;
    }
    if only_back_to_back {
        return back_to_back_only(pool, launches).await;
    }
    let numpy = Command::new("/usr/bin/python3")
        .args(["-c", "import numpy"])
        .status()
        .is_ok_and(|s| s.success());
    if !numpy {
        bail!("numpy is missing: apt-get install -y python3-numpy");
    }
    println!("first line of a python3 worker, LaunchWorkers → first stdout line at a follower");
    println!("{launches} launches one after another, pool of {pool}; bare = python3 -u -c CODE spawned here\n");
    summary("bare  print(1)", bare(PRINT, launches)?, "");
    summary("bare  import numpy; print(1)", bare(NUMPY, launches)?, "");
    summary("fork  python3 (to the child run)", forks("", launches)?, "");
    summary("fork  python3 with numpy", forks("numpy", launches)?, "");

    for (code, preload) in LINES {
        let d = Daemon::start_with(daemon_options(pool, preload)).await?;
        let pids = wait_ready(&d, pool).await?;
        let (cg, rss, pss) = idle_memory(&d, &pids);
        for (session, how) in [
            (false, "follower opened after the answer"),
            (true, "session follower (new_workers)"),
        ] {
            println!("pool  {code}, {how}:");
            let (pooled, cold, _) = series(&d, code, launches, None, session).await?;
            back_to_back(pooled, cold);
            let (full, _, answers) = series(&d, code, launches, Some(pool), session).await?;
            summary("   each with the pool refilled", full, "");
            summary("     its LaunchWorkers answer", answers, "");
        }
        if python.exists() {
            println!("pool  {code}, the Python client (launch_workers → line printed):");
            let (pooled, cold) = python_series(&python, &d, code, launches)?;
            back_to_back(pooled, cold);
        } else {
            println!(
                "(no {}: the Python client's series skipped; tests/clients/setup.sh makes it)",
                python.display()
            );
        }
        println!(
            "  idle pooled worker (preload [{preload}]): cgroup {:.1} MiB, RSS {:.1} MiB, PSS {:.1} MiB",
            cg as f64 / 1024.0,
            rss as f64 / 1024.0,
            pss as f64 / 1024.0
        );
    }
    let d = Daemon::start_with(daemon_options(0, "")).await?;
    for code in [PRINT, NUMPY] {
        for (session, how) in [(false, "after the answer"), (true, "session follower")] {
            let (pooled, cold, _) = series(&d, code, launches, None, session).await?;
            anyhow::ensure!(pooled.is_empty(), "pool_size = 0 starts cold");
            summary(&format!("cold  {code}, {how}"), cold, "");
        }
    }
    Ok(())
}

/// The issue's series alone, for A/B runs of two builds (`BERTH_BIN_DIR`): `n` launches back to
/// back with a session follower, for `print(1)` and the numpy line, each on a fresh daemon with
/// a full pool of `pool`.
async fn back_to_back_only(pool: usize, n: usize) -> Result<()> {
    for (code, preload) in LINES {
        let d = Daemon::start_with(daemon_options(pool, preload)).await?;
        wait_ready(&d, pool).await?;
        println!("pool  {code}, session follower (new_workers):");
        let (pooled, cold, _) = series(&d, code, n, None, true).await?;
        back_to_back(pooled, cold);
    }
    Ok(())
}

/// Where a pooled `print(1)` launch's time goes: `n` launches, each with the pool refilled, on a
/// daemon that logs its `berth_phase` marks; the median time of each mark after the call.
async fn phase_breakdown(
    pool: usize,
    n: usize,
    session: bool,
    refilled: bool,
    pause: Duration,
) -> Result<()> {
    let mut opts = daemon_options(pool, "");
    opts.env = vec![("BERTH_LOG".into(), "info,berth_phase=debug".into())];
    opts.args = vec!["--log-format".into(), "json".into()];
    let d = Daemon::start_with(opts).await?;
    let c = d.client().await?;
    let mut follower = Follower::new(&c, session).await?;
    let mut at: std::collections::BTreeMap<String, Vec<u64>> = Default::default();
    let mut launches = 0;
    for k in 0..n {
        // Back to back, only the first launch finds the pool full.
        if refilled || k == 0 {
            wait_ready(&d, pool).await?;
        }
        tokio::time::sleep(pause).await;
        let (first, answered, pooled, sent, id) =
            first_line_marked(&c, PRINT, &mut follower).await?;
        if !pooled {
            continue;
        }
        launches += 1;
        // This launch's marks (a refill's name the worker being made).
        let marks: Vec<_> = phase_marks(&d.log(), sent)
            .into_iter()
            .filter(|m| m.1.is_empty() || m.1 == id)
            .collect();
        let mut seen = std::collections::HashSet::new();
        if std::env::var_os("BERTH_BENCH_MARKS").is_some() {
            println!(
                "launch at {sent} µs (CLOCK_MONOTONIC), first line +{} µs",
                first.as_micros()
            );
            for (phase, w, t) in marks.iter().filter(|m| m.2 < sent + 20_000) {
                println!("    +{:>6} µs {phase} {w}", t - sent);
            }
        }
        for (phase, _, t) in marks {
            // The first of each mark after the call (one its worker marks again counts once).
            if seen.insert(phase.clone()) && t < sent + 1_000_000 {
                at.entry(phase).or_default().push(t - sent);
            }
        }
        at.entry("~ client: answer".into())
            .or_default()
            .push(answered.as_micros() as u64);
        at.entry("~ client: first line".into())
            .or_default()
            .push(first.as_micros() as u64);
    }
    let how = if refilled {
        "each with the pool refilled"
    } else {
        "back to back"
    };
    println!(
        "phase marks of {launches} pooled print(1) launches, {how} (median µs after the call)"
    );
    let mut rows: Vec<(u64, String, usize)> = at
        .into_iter()
        .map(|(k, mut v)| {
            v.sort_unstable();
            (v[v.len() / 2], k, v.len())
        })
        .collect();
    rows.sort();
    for (t, k, count) in rows {
        println!("  {t:>6} µs  {k} (n={count})");
    }
    Ok(())
}
