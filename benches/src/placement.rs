//! Placement throughput benchmark (issue: the scheduler).
//!
//! Workers placed per second by the scheduler's placement core (`core::placement::Placer`),
//! single-threaded, with 1,000 and with 10,000 simulated hosts and 100,000 workers, bin-pack
//! and spread. Each launch is placed and its room allocated (`Placer::reserve`), as the
//! scheduler does under its lock. Hosts are heterogeneous (16, 32 and 64 cores, 64 to 512 GiB,
//! some with 8 GPUs; zone, rack, disk and GPU labels); launches are of mixed sizes (mostly 1 to 8
//! workers, some up to 32, some asking for GPUs, some with label constraints). Launches that do
//! not fit count in the time but not in the workers placed.
//!
//! Two mixes of worker sizes: **mixed** (0.1–0.5 cores, 256 MiB–2 GiB: CPU runs out first)
//! and **memory-bound** (0.1 cores, 2–6 GiB: memory runs out first; with 1,000 hosts most of
//! its launches are refused, which times the refusal path).
//!
//! Two variants: **fill** places 100,000 workers into an empty cluster (with 1,000 hosts it
//! ends near full, so later launches are refused and bin-pack reads past full hosts); **churn**
//! keeps at most 50,000 workers live, releasing the oldest launches as it goes.
//!
//! berth's target is 20,000 workers/s on one core. This is the placement core alone, in
//! process, on one thread: no gRPC, no host calls, no workers started. It is not comparable
//! with a cluster's end-to-end rate (Nomad's C1M placed about 3,750 containers/s with 5
//! servers, C2M about 1,500/s, each from job submission to running containers), so no ratio to
//! those is printed; `berth-bench-sched` measures launches through the scheduler end to end.
//!
//! Run from a release build: `cargo run --release -p berth-benches --bin berth-bench-placement
//! [-- --runs 5]`.

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

use anyhow::Result;
use berth_benches::{median, Flags};
use berth_core::placement::{Amount, Ask, Placer, Strategy};

/// Workers placed in each run.
const WORKERS: u32 = 100_000;
/// Live workers kept by the churn variant.
const CHURN_LIVE: u32 = 50_000;
/// berth's target, workers per second on one core.
const TARGET: f64 = 20_000.0;
const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;

/// xorshift64*: the same cluster and launches on every run.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    fn pick<T: Copy>(&mut self, from: &[T]) -> T {
        from[self.below(from.len() as u64) as usize]
    }
}

/// Hosts in a rack.
const RACK: u64 = 40;

struct SimHost {
    name: String,
    capacity: Amount,
    labels: BTreeMap<String, String>,
}

fn labels(pairs: &[(&str, String)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.clone()))
        .collect()
}

/// `count` hosts: half 16 cores / 64 GiB, 30% 32 / 128, 15% 64 / 512, 5% 64 / 512 with 8 GPUs;
/// 256 worker slots each.
fn cluster(count: u64, rng: &mut Rng) -> Vec<SimHost> {
    (0..count)
        .map(|i| {
            let roll = rng.below(100);
            let (cores, gib, gpus) = match roll {
                0..50 => (16, 64, 0),
                50..80 => (32, 128, 0),
                80..95 => (64, 512, 0),
                _ => (64, 512, 8),
            };
            let mut l = labels(&[
                ("zone", format!("z{}", i % 3)),
                ("rack", format!("r{}", i / RACK)),
            ]);
            if rng.below(2) == 0 {
                l.insert("disk".into(), "ssd".into());
            }
            if gpus > 0 {
                l.insert("gpu".into(), "a100".into());
            }
            SimHost {
                name: format!("host-{i:05}"),
                capacity: Amount {
                    cpu_milli: cores * 1000,
                    memory_bytes: gib * GIB,
                    gpus,
                    workers: 256,
                },
                labels: l,
            }
        })
        .collect()
}

struct Launch {
    n: u32,
    per_worker: Amount,
    constraints: BTreeMap<String, String>,
}

/// What the workers ask for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mix {
    /// 0.1–0.5 cores and 256 MiB–2 GiB: CPU runs out first on most hosts.
    Mixed,
    /// 0.1 cores and 2–6 GiB: memory runs out first, so bin-pack's order (by free CPU) puts
    /// hosts without memory first: the case the index's per-chunk maxima are for.
    MemoryBound,
}

/// Launches adding up to `WORKERS` workers: 90% of 1–8 workers, 10% of 9–32; 1% ask a GPU
/// per worker (4 cores, 32 GiB; half of them constrained to gpu=a100); otherwise as `mix` says.
/// Constraints: 10% a zone, 5% disk=ssd, 2% zone and disk, 3% one rack.
fn launches(hosts: u64, mix: Mix, rng: &mut Rng) -> Vec<Launch> {
    let mut out = Vec::new();
    let mut total = 0;
    while total < WORKERS {
        let n = if rng.below(10) < 9 {
            1 + rng.below(8)
        } else {
            9 + rng.below(24)
        } as u32;
        let n = n.min(WORKERS - total);
        total += n;
        let gpu = rng.below(100) == 0;
        let per_worker = if gpu {
            Amount::worker(4000, 32 * GIB, 1)
        } else if mix == Mix::MemoryBound {
            Amount::worker(100, rng.pick(&[2 * GIB, 4 * GIB, 6 * GIB]), 0)
        } else {
            Amount::worker(
                rng.pick(&[100, 100, 200, 250, 500]),
                rng.pick(&[256 * MIB, 512 * MIB, GIB, 2 * GIB]),
                0,
            )
        };
        let zone = format!("z{}", rng.below(3));
        let constraints = match (gpu, rng.below(100)) {
            (true, r) if r < 50 => labels(&[("gpu", "a100".into())]),
            (true, _) => BTreeMap::new(),
            (false, 0..10) => labels(&[("zone", zone)]),
            (false, 10..15) => labels(&[("disk", "ssd".into())]),
            (false, 15..17) => labels(&[("zone", zone), ("disk", "ssd".into())]),
            (false, 17..20) => labels(&[("rack", format!("r{}", rng.below(hosts / RACK)))]),
            _ => BTreeMap::new(),
        };
        out.push(Launch {
            n,
            per_worker,
            constraints,
        });
    }
    out
}

/// One run's results.
struct Run {
    elapsed: Duration,
    placed: u64,
    refused: u64,
    /// Time of each launch (place + allocate, or the refusal).
    per_launch: Vec<Duration>,
    /// Distinct hosts used per placed launch, summed.
    hosts_used: u64,
}

/// A placed launch the churn variant will release: its hosts and counts, what each worker
/// holds, and how many workers.
type LiveLaunch = (Vec<(String, u32)>, Amount, u32);

fn build(hosts: &[SimHost]) -> Placer {
    let mut p = Placer::new();
    for h in hosts {
        p.upsert(&h.name, h.capacity, Amount::ZERO, h.labels.clone(), true);
    }
    p
}

fn run(hosts: &[SimHost], launches: &[Launch], strategy: Strategy, churn: bool) -> Run {
    let mut p = build(hosts);
    let mut live: VecDeque<LiveLaunch> = VecDeque::new();
    let mut live_workers = 0;
    let mut r = Run {
        elapsed: Duration::ZERO,
        placed: 0,
        refused: 0,
        per_launch: Vec::with_capacity(launches.len()),
        hosts_used: 0,
    };
    let start = Instant::now();
    for l in launches {
        let t = Instant::now();
        if churn {
            while live_workers + l.n > CHURN_LIVE {
                let Some((picks, per, n)) = live.pop_front() else {
                    break;
                };
                for (host, count) in &picks {
                    p.release(host, per, *count);
                }
                live_workers -= n;
            }
        }
        let ask = Ask {
            n: l.n,
            per_worker: l.per_worker,
            constraints: &l.constraints,
            strategy,
        };
        match p.reserve(&ask) {
            Ok(picks) => {
                r.placed += u64::from(l.n);
                r.hosts_used += picks.len() as u64;
                if churn {
                    live_workers += l.n;
                    live.push_back((picks, l.per_worker, l.n));
                }
            }
            Err(_) => r.refused += 1,
        }
        r.per_launch.push(t.elapsed());
    }
    r.elapsed = start.elapsed();
    r
}

fn quantile(v: &mut [Duration], q: f64) -> Duration {
    if v.is_empty() {
        return Duration::ZERO;
    }
    v.sort_unstable();
    v[((v.len() - 1) as f64 * q).round() as usize]
}

/// Prints the rows of one cluster size and mix: both strategies, fill and churn.
fn table_rows(mix: Mix, host_count: u64, runs: usize) {
    let mut rng = Rng(0x5eed_0000 + host_count);
    let hosts = cluster(host_count, &mut rng);
    let launches = launches(host_count, mix, &mut rng);
    let mut builds: Vec<Duration> = (0..runs)
        .map(|_| {
            let t = Instant::now();
            let p = build(&hosts);
            let d = t.elapsed();
            assert_eq!(p.len(), hosts.len());
            d
        })
        .collect();
    let build_time = median(&mut builds);
    for strategy in [Strategy::BinPack, Strategy::Spread] {
        for churn in [false, true] {
            let mut results: Vec<Run> = (0..runs)
                .map(|_| run(&hosts, &launches, strategy, churn))
                .collect();
            let first = &results[0];
            let (placed, refused, hosts_used) = (first.placed, first.refused, first.hosts_used);
            for r in &results {
                // Deterministic: every run places the same.
                assert_eq!((r.placed, r.refused), (placed, refused));
            }
            let mut times: Vec<Duration> = results.iter().map(|r| r.elapsed).collect();
            let t = median(&mut times);
            let mut per_launch: Vec<Duration> = results
                .iter_mut()
                .flat_map(|r| std::mem::take(&mut r.per_launch))
                .collect();
            let p50 = quantile(&mut per_launch, 0.5);
            let p99 = quantile(&mut per_launch, 0.99);
            let rate = placed as f64 / t.as_secs_f64();
            println!(
                "| {} | {host_count} | {} | {} | {} ({refused}) | {placed} | {:.2} | {:.1} ms | \
                 {:.0} | {:.1} | {:.1} / {:.1} µs | {:.1} ms |",
                match mix {
                    Mix::Mixed => "mixed",
                    Mix::MemoryBound => "memory-bound",
                },
                match strategy {
                    Strategy::BinPack => "bin-pack",
                    Strategy::Spread => "spread",
                },
                if churn {
                    "churn (≤ 50k live)"
                } else {
                    "fill"
                },
                launches.len(),
                hosts_used as f64 / (launches.len() as u64 - refused).max(1) as f64,
                t.as_secs_f64() * 1e3,
                rate,
                rate / TARGET,
                p50.as_secs_f64() * 1e6,
                p99.as_secs_f64() * 1e6,
                build_time.as_secs_f64() * 1e3,
            );
        }
    }
}

fn main() -> Result<()> {
    let mut runs: usize = 5;
    let args: Vec<String> = std::env::args().skip(1).collect();
    Flags::parse(
        "usage: berth-bench-placement [--runs N]",
        &args,
        &["--runs"],
        &[],
    )?
    .set("--runs", &mut runs)?;
    if cfg!(debug_assertions) {
        eprintln!("warning: a debug build; run with --release for figures");
    }
    println!(
        "placement of {WORKERS} workers by the placement core in process (no gRPC, no host \
         calls), place + allocate per launch, one thread, median of {runs} runs"
    );
    println!();
    println!(
        "| mix | hosts | strategy | variant | launches (refused) | workers placed | hosts per \
         launch | median time | workers/s | × 20k target | launch p50 / p99 | build |"
    );
    println!("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |");
    for mix in [Mix::Mixed, Mix::MemoryBound] {
        for host_count in [1_000u64, 10_000] {
            table_rows(mix, host_count, runs);
        }
    }
    Ok(())
}
