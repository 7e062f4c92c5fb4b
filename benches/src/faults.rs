//! Fault-injection run (issue 16): `--rounds` times, launches of `--workers` workers in all (in
//! launches of `--batch`) are under way when berthd gets a SIGKILL at a random moment; then
//! berthd starts again on the same state and the run checks what it finds:
//!
//! - every launch the client was told succeeded has all its workers, each running (a
//!   `sleep`) or ended with the status its exit code gives (`sh -c 'exit K'`: SUCCEEDED for 0,
//!   FAILED with exit code K otherwise);
//! - a launch whose answer the kill cut off exists whole or not at all (all-or-nothing), and
//!   where it exists, its workers are as above, or FAILED as never started where berthd died
//!   after the launch's records were durable but before it wrote that worker's spec (counted
//!   apart: the client was never told of them);
//! - nothing else exists: no worker of a launch never made, no worker cgroup without its worker;
//! - once the round's workers are stopped, no cgroup, network namespace, veth or process of any
//!   of them is left.
//!
//! Every check that fails counts as lost; the run's answer is the total (must be 0). Half of
//! the launches run in their own network namespace (bridge), half on the host network.
//!
//! Run as root from a release build, while nothing else is busy:
//! `target/release/berth-bench-faults [--rounds 20] [--workers 200] [--batch 20] [--seed N]`.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Result};
use berth_benches::Flags;
use berth_tests::{pb, Client, Daemon, DaemonOptions};

/// The label that names the launch a worker belongs to.
const LABEL: &str = "fault-launch";

/// What a launch's workers do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// Run until stopped.
    Sleep,
    /// Exit at once with this code.
    Exit(i32),
}

/// One launch the client attempted.
#[derive(Debug)]
struct Attempt {
    label: String,
    n: u32,
    kind: Kind,
    /// The ids the daemon answered with; `None` when the answer never came.
    acked: Option<Vec<String>>,
}

/// A small xorshift generator: the kill moments need no more.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

fn request(label: &str, n: u32, kind: Kind, bridge: bool) -> pb::LaunchWorkersRequest {
    let command: Vec<String> = match kind {
        Kind::Sleep => vec!["/bin/sleep".into(), "3600".into()],
        Kind::Exit(k) => vec!["/bin/sh".into(), "-c".into(), format!("exit {k}")],
    };
    pb::LaunchWorkersRequest {
        n,
        cpu: 0.001,
        memory_gb: 0.01,
        command,
        network: if bridge {
            pb::NetworkMode::Bridge
        } else {
            pb::NetworkMode::Host
        } as i32,
        labels: BTreeMap::from([(LABEL.to_owned(), label.to_owned())])
            .into_iter()
            .collect(),
        ..Default::default()
    }
}

/// Launches `total` workers in launches of `batch`, one after another, until done or until the
/// daemon stops answering; returns every attempt.
async fn launch_round(c: Client, round: u32, total: u32, batch: u32) -> Vec<Attempt> {
    let mut out = Vec::new();
    let mut made = 0;
    let mut k: u32 = 0;
    while made < total {
        let n = batch.min(total - made);
        let kind = match k % 3 {
            0 => Kind::Sleep,
            1 => Kind::Exit(0),
            _ => Kind::Exit(3 + (k % 5) as i32),
        };
        let label = format!("r{round}-l{k}");
        let req = request(&label, n, kind, k.is_multiple_of(2));
        let r = c.workers().launch_workers(req).await;
        let acked = r
            .ok()
            .map(|r| r.into_inner().workers.into_iter().map(|w| w.id).collect());
        let failed = acked.is_none();
        out.push(Attempt {
            label,
            n,
            kind,
            acked,
        });
        if failed {
            break;
        }
        made += n;
        k += 1;
    }
    out
}

async fn list_all(c: &Client) -> Result<Vec<pb::Worker>> {
    Ok(c.workers()
        .list_workers(pb::ListWorkersRequest::default())
        .await?
        .into_inner()
        .workers)
}

/// Waits for `ids` (running for `completion` false, ended otherwise); returns every worker.
async fn await_ids(c: &Client, ids: &[String], completion: bool) -> Result<Vec<pb::Worker>> {
    if ids.is_empty() {
        return Ok(Vec::new());
    }
    let r = c
        .workers()
        .await_workers(pb::AwaitWorkersRequest {
            ids: ids.to_vec(),
            wait_for_completion: Some(completion),
            timeout_seconds: Some(120),
            ..Default::default()
        })
        .await?
        .into_inner();
    Ok(r.workers.into_iter().chain(r.failures).collect())
}

#[derive(Debug, Default)]
struct Tally {
    attempts: usize,
    acked_launches: usize,
    acked_workers: usize,
    cut_found_whole: usize,
    cut_absent: usize,
    cut_never_started: usize,
    workers_checked: usize,
    lost: usize,
    problems: Vec<String>,
}

impl Tally {
    fn lose(&mut self, what: String) {
        self.lost += 1;
        if self.problems.len() < 50 {
            self.problems.push(what);
        }
    }
}

/// Whether worker `w` is FAILED because berthd died before it started it.
fn never_started(w: &pb::Worker) -> bool {
    w.status == pb::WorkerStatus::Failed as i32
        && w.reason
            .contains("berthd stopped before it started the worker")
}

/// Whether worker `w` of a launch of `kind` is where it should be.
fn right_end(kind: Kind, w: &pb::Worker) -> bool {
    match kind {
        Kind::Sleep => w.status == pb::WorkerStatus::Running as i32,
        Kind::Exit(0) => w.status == pb::WorkerStatus::Succeeded as i32 && w.exit_code == Some(0),
        Kind::Exit(k) => w.status == pb::WorkerStatus::Failed as i32 && w.exit_code == Some(k),
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    if !berth_tests::is_root() {
        bail!("needs root (cgroups, namespaces)");
    }
    let (mut rounds, mut workers, mut batch): (u32, u32, u32) = (20, 200, 20);
    let mut seed: u64 = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos() as u64
        | 1;
    let mut max_delay_ms: u64 = 0;
    let args: Vec<String> = std::env::args().skip(1).collect();
    let f = Flags::parse(
        "usage: berth-bench-faults [--rounds 20] [--workers 200] [--batch 20] [--seed N] \
         [--max-delay-ms MS (default: the time one round's launches take undisturbed)]",
        &args,
        &[
            "--rounds",
            "--workers",
            "--batch",
            "--seed",
            "--max-delay-ms",
        ],
        &[],
    )?;
    f.set("--rounds", &mut rounds)?;
    f.set("--workers", &mut workers)?;
    f.set("--batch", &mut batch)?;
    f.set("--seed", &mut seed)?;
    f.set("--max-delay-ms", &mut max_delay_ms)?;
    let batch = batch.max(1);
    println!("seed {seed}");
    let mut rng = Rng(seed);
    let mut d = Daemon::start_with(DaemonOptions {
        config: "[resources]\nmax_workers = 8192\n".into(),
        ..Default::default()
    })
    .await?;

    // How long one round's launches take undisturbed: the kills fall within it.
    if max_delay_ms == 0 {
        let c = d.client().await?;
        let t = Instant::now();
        let attempts = launch_round(c.clone(), 9999, workers, batch).await;
        max_delay_ms = t.elapsed().as_millis().max(1) as u64;
        let ids: Vec<String> = attempts
            .into_iter()
            .flat_map(|a| a.acked.unwrap_or_default())
            .collect();
        c.workers()
            .stop_workers(pb::StopWorkersRequest {
                ids,
                grace_seconds: Some(0),
                ..Default::default()
            })
            .await?;
        println!("undisturbed: {workers} workers launched in {max_delay_ms} ms");
    }

    let mut total = Tally::default();
    let mut known: HashSet<String> = HashSet::new();
    let mut ever: HashMap<String, String> = HashMap::new(); // worker id → launch label
    let mut labels_attempted: HashSet<String> = HashSet::new();
    let run = Instant::now();
    for round in 0..rounds {
        let mut t = Tally::default();
        let c = d.client().await?;
        let delay = Duration::from_millis(rng.next() % max_delay_ms);
        let launcher = tokio::spawn(launch_round(c, round, workers, batch));
        tokio::time::sleep(delay).await;
        d.stop_daemon(libc::SIGKILL);
        let attempts = launcher.await?;
        let restart = Instant::now();
        d.restart(&[]).await?;
        let restart_ms = restart.elapsed().as_millis();
        let c = d.client().await?;
        for a in &attempts {
            labels_attempted.insert(a.label.clone());
        }

        // What the daemon knows, by launch.
        let listed = list_all(&c).await?;
        let mut by_label: HashMap<String, Vec<pb::Worker>> = HashMap::new();
        for w in &listed {
            match w.labels.get(LABEL) {
                Some(l) if labels_attempted.contains(l) || l.starts_with("r9999-") => {
                    by_label.entry(l.clone()).or_default().push(w.clone());
                }
                other => t.lose(format!("worker {} of no launch made ({other:?})", w.id)),
            }
        }
        let mut to_await: Vec<(Kind, bool, Vec<String>)> = Vec::new();
        for a in &attempts {
            t.attempts += 1;
            let found = by_label.get(&a.label).cloned().unwrap_or_default();
            let found_ids: HashSet<String> = found.iter().map(|w| w.id.clone()).collect();
            match &a.acked {
                Some(ids) => {
                    t.acked_launches += 1;
                    t.acked_workers += ids.len();
                    for id in ids {
                        if !found_ids.contains(id) {
                            t.lose(format!(
                                "worker {id} of acknowledged launch {} missing",
                                a.label
                            ));
                        }
                    }
                    if found_ids.len() != ids.len() {
                        t.lose(format!(
                            "launch {}: {} workers acknowledged, {} found",
                            a.label,
                            ids.len(),
                            found_ids.len()
                        ));
                    }
                }
                None if found.is_empty() => t.cut_absent += 1,
                None if found.len() == a.n as usize => t.cut_found_whole += 1,
                None => t.lose(format!(
                    "launch {} cut off by the kill: {} of {} workers exist",
                    a.label,
                    found.len(),
                    a.n
                )),
            }
            to_await.push((a.kind, a.acked.is_some(), found_ids.into_iter().collect()));
        }
        // Each where it should be: sleepers running, the others ended with their code.
        for (kind, acked, ids) in &to_await {
            let ws = await_ids(&c, ids, *kind != Kind::Sleep).await?;
            for w in &ws {
                t.workers_checked += 1;
                if !acked && never_started(w) {
                    t.cut_never_started += 1;
                } else if !right_end(*kind, w) {
                    t.lose(format!(
                        "worker {} ({kind:?}): status {:?}, exit code {:?}, reason {:?}",
                        w.id,
                        pb::WorkerStatus::try_from(w.status),
                        w.exit_code,
                        w.reason
                    ));
                }
            }
        }
        // No cgroup without its live worker.
        let listed = list_all(&c).await?;
        let live: HashSet<String> = listed
            .iter()
            .filter(|w| {
                w.status == pb::WorkerStatus::Running as i32
                    || w.status == pb::WorkerStatus::Starting as i32
                    || w.status == pb::WorkerStatus::Pending as i32
            })
            .map(|w| w.id.clone())
            .collect();
        for cg in d.worker_cgroups() {
            if !live.contains(&cg) {
                t.lose(format!("cgroup {cg} without a live worker"));
            }
        }
        for w in &listed {
            known.insert(w.id.clone());
            if let Some(l) = w.labels.get(LABEL) {
                ever.insert(w.id.clone(), l.clone());
            }
        }
        // Stop the round's workers: nothing of any of them may be left.
        c.workers()
            .stop_workers(pb::StopWorkersRequest {
                all: true,
                grace_seconds: Some(0),
                ..Default::default()
            })
            .await?;
        // The kernel tears network namespaces (and their veths) down on its own time: what is
        // still there after 10 s is left over.
        let deadline = Instant::now() + Duration::from_secs(10);
        let leftovers = loop {
            let mut left = Vec::new();
            for id in d.worker_cgroups() {
                left.push(format!("cgroup {id} left after the stop"));
            }
            for ns in d.netns_files() {
                left.push(format!("network namespace {ns} left after the stop"));
            }
            for (veth, w) in berth_tests::worker_veths() {
                if known.contains(&w) {
                    left.push(format!("veth {veth} of {w} left after the stop"));
                }
            }
            for id in &live {
                let procs = d.worker_cgroup_procs(id);
                if !procs.is_empty() {
                    left.push(format!("processes {procs:?} of {id} left after the stop"));
                }
            }
            if left.is_empty() || Instant::now() >= deadline {
                break left;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        for l in leftovers {
            t.lose(l);
        }
        println!(
            "round {round:2}: kill after {:5} ms; launches {:2} ({:2} acknowledged, {} cut off: \
             {} whole, {} absent; {} of their workers never started); {:3} workers checked; \
             restart {restart_ms} ms; lost {}",
            delay.as_millis(),
            t.attempts,
            t.acked_launches,
            t.attempts - t.acked_launches,
            t.cut_found_whole,
            t.cut_absent,
            t.cut_never_started,
            t.workers_checked,
            t.lost
        );
        for p in &t.problems {
            println!("    {p}");
        }
        total.attempts += t.attempts;
        total.acked_launches += t.acked_launches;
        total.acked_workers += t.acked_workers;
        total.cut_found_whole += t.cut_found_whole;
        total.cut_absent += t.cut_absent;
        total.cut_never_started += t.cut_never_started;
        total.workers_checked += t.workers_checked;
        total.lost += t.lost;
    }
    println!(
        "{rounds} rounds in {:.0} s: {} launches ({} acknowledged with {} workers; {} cut off by \
         the kill: {} found whole, {} absent, {} of their workers never started), {} workers \
         checked, {} workers ever listed; lost {}",
        run.elapsed().as_secs_f64(),
        total.attempts,
        total.acked_launches,
        total.acked_workers,
        total.attempts - total.acked_launches,
        total.cut_found_whole,
        total.cut_absent,
        total.cut_never_started,
        total.workers_checked,
        ever.len(),
        total.lost
    );
    if total.lost > 0 {
        bail!("{} faults lost something", total.lost);
    }
    Ok(())
}
