//! Scale through gRPC (issue 18): one real `berth-scheduler` with 1,000 simulated hosts and
//! 100,000 workers.
//!
//! The scheduler is the real release binary, a separate process on a loopback port (plaintext,
//! its state dir in a temp dir). The 1,000 hosts live in this process: each is a tonic server on
//! its own loopback port serving what the scheduler calls on a host (`berth.v1.Workers`:
//! LaunchWorkers, ListWorkers, StopWorkers, WatchWorkers, OpenSession, KeepAlive, CloseSession,
//! StreamOutput; the forwarded caller header is honoured), backed by the scheduler's in-memory
//! `berth_scheduler::fake::FakeHost` (workers are RUNNING at once, no process is started), and
//! each beats to the scheduler over its own connection (`berth.v1.Membership/Heartbeat`) at the
//! interval the scheduler answers.
//!
//! Measured through a gRPC client (`berth_client::Client`) on the scheduler, in one run:
//! - launches of `--batch` workers (`/bin/true`, 0.25 cores, 0.5 GiB; a host holds 128, so 100,000 fill 78 % of 1,000 hosts) until
//!   `--workers` are placed: per launch, the time from the LaunchWorkers call to its answer
//!   (every worker RUNNING on its fake host, as the answer says); bin-pack first, then spread;
//!   placements/s from the median launch and overall;
//! - one ListWorkers of every worker through the scheduler;
//! - StopWorkers `all` through the scheduler: time until answered, and until every fake host
//!   holds no running worker;
//! - the scheduler process's RSS and CPU seconds (user + system) from /proc.
//!
//! Beside them: Nomad's published C1M/C2M rates, and how our span differs. The in-process
//! placement core alone is `berth-bench-placement`.
//!
//! Run as root from a release build:
//! `cargo build --release -p berth-scheduler -p berth-benches --bins &&
//!  target/release/berth-bench-cluster [--hosts 1000 --workers 100000 --batch 1000]`.

use std::collections::BTreeMap;
use std::pin::Pin;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use berth_benches::{median, ms, rss_kib, running_count, Flags};
use berth_client::Client;
use berth_core::error::Error;
use berth_proto::v1 as pb;
use berth_scheduler::fake::FakeHost;
use berth_scheduler::hosts::{as_caller, HostApi};
use berth_server::identity::{Caller, Principal, CALLER_HEADER};
use futures::{Stream, StreamExt};
use tonic::{Request, Response, Status};

/// Nomad's published end-to-end rates (containers/s): C1M and C2M.
const NOMAD_C1M: f64 = 3_750.0;
const NOMAD_C2M: f64 = 1_500.0;

struct Opts {
    hosts: usize,
    workers: u32,
    batch: u32,
}

fn parse_opts() -> Result<Opts> {
    let mut o = Opts {
        hosts: 1000,
        workers: 100_000,
        batch: 1000,
    };
    let args: Vec<String> = std::env::args().skip(1).collect();
    let f = Flags::parse(
        "usage: berth-bench-cluster [--hosts N] [--workers N] [--batch N]",
        &args,
        &["--hosts", "--workers", "--batch"],
        &[],
    )?;
    f.set("--hosts", &mut o.hosts)?;
    f.set("--workers", &mut o.workers)?;
    f.set("--batch", &mut o.batch)?;
    if o.batch == 0 || o.workers == 0 || o.hosts == 0 {
        bail!("--hosts, --workers and --batch must be at least 1");
    }
    Ok(o)
}

/// One simulated host's `berth.v1.Workers`, over its [`FakeHost`].
struct SimHost(Arc<FakeHost>);

fn status(e: Error) -> Status {
    berth_server::convert::to_status(e)
}

/// The caller a scheduler forwarded (`user:NAME`), as the fake records owners.
fn forwarded<T>(r: &Request<T>) -> Option<Caller> {
    let v = r.metadata().get(CALLER_HEADER)?.to_str().ok()?;
    let name = v.strip_prefix("user:").unwrap_or(v).to_owned();
    Some(Caller {
        addr: None,
        principal: Principal::User(name.clone()),
        owner: name,
        admin: false,
        account: None,
    })
}

/// Runs `f` as the request's forwarded caller, if any.
async fn serve<T, F: std::future::Future>(r: &Request<T>, f: F) -> F::Output {
    match forwarded(r) {
        Some(c) => as_caller(&c, f).await,
        None => f.await,
    }
}

type Boxed<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl pb::workers_server::Workers for SimHost {
    async fn open_session(
        &self,
        r: Request<pb::OpenSessionRequest>,
    ) -> Result<Response<pb::Session>, Status> {
        let out = serve(&r, self.0.open_session(r.get_ref().clone())).await;
        out.map(Response::new).map_err(status)
    }

    async fn keep_alive(
        &self,
        r: Request<pb::KeepAliveRequest>,
    ) -> Result<Response<pb::Session>, Status> {
        let out = serve(&r, self.0.keep_alive(&r.get_ref().session_id)).await;
        out.map(Response::new).map_err(status)
    }

    async fn close_session(
        &self,
        r: Request<pb::CloseSessionRequest>,
    ) -> Result<Response<pb::CloseSessionResponse>, Status> {
        let out = serve(&r, self.0.close_session(r.get_ref().clone())).await;
        out.map(|stopped| Response::new(pb::CloseSessionResponse { stopped }))
            .map_err(status)
    }

    async fn launch_workers(
        &self,
        r: Request<pb::LaunchWorkersRequest>,
    ) -> Result<Response<pb::LaunchWorkersResponse>, Status> {
        let out = serve(&r, self.0.launch(r.get_ref().clone())).await;
        out.map(|workers| Response::new(pb::LaunchWorkersResponse { workers }))
            .map_err(status)
    }

    async fn list_workers(
        &self,
        r: Request<pb::ListWorkersRequest>,
    ) -> Result<Response<pb::ListWorkersResponse>, Status> {
        let out = serve(&r, self.0.list(r.get_ref().clone())).await;
        out.map(|workers| Response::new(pb::ListWorkersResponse { workers }))
            .map_err(status)
    }

    async fn await_workers(
        &self,
        _r: Request<pb::AwaitWorkersRequest>,
    ) -> Result<Response<pb::AwaitWorkersResponse>, Status> {
        Err(Status::unimplemented(
            "AwaitWorkers: the scheduler does not call it on hosts",
        ))
    }

    async fn stop_workers(
        &self,
        r: Request<pb::StopWorkersRequest>,
    ) -> Result<Response<pb::StopWorkersResponse>, Status> {
        let out = serve(&r, self.0.stop(r.get_ref().clone())).await;
        out.map(|workers| Response::new(pb::StopWorkersResponse { workers }))
            .map_err(status)
    }

    type StreamOutputStream = Boxed<pb::OutputChunk>;

    async fn stream_output(
        &self,
        r: Request<pb::StreamOutputRequest>,
    ) -> Result<Response<Self::StreamOutputStream>, Status> {
        let s = serve(&r, self.0.output(r.get_ref().clone()))
            .await
            .map_err(status)?;
        Ok(Response::new(Box::pin(s.map(|c| c.map_err(status)))))
    }

    type WatchWorkersStream = Boxed<pb::WorkerEvent>;

    async fn watch_workers(
        &self,
        _r: Request<pb::WatchWorkersRequest>,
    ) -> Result<Response<Self::WatchWorkersStream>, Status> {
        let s = self.0.watch().await.map_err(status)?;
        Ok(Response::new(Box::pin(s.map(|w| {
            w.map(|w| pb::WorkerEvent { worker: Some(w) })
                .map_err(status)
        }))))
    }
}

/// Serves `host` on a loopback port; returns its address.
async fn serve_host(host: Arc<FakeHost>) -> Result<String> {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = l.local_addr()?.to_string();
    let incoming = tokio_stream::wrappers::TcpListenerStream::new(l);
    tokio::spawn(async move {
        let r = tonic::transport::Server::builder()
            .add_service(pb::workers_server::WorkersServer::new(SimHost(host)))
            .serve_with_incoming(incoming)
            .await;
        if let Err(e) = r {
            eprintln!("simulated host server: {e}");
        }
    });
    Ok(addr)
}

/// Set when the run is over and the scheduler is stopped before the simulated hosts.
static STOPPING: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Beats `host` (reachable at `addr`) to the scheduler at `sched` forever, at the interval the
/// scheduler answers.
async fn beat_forever(host: Arc<FakeHost>, addr: String, sched: String) {
    let mut client = loop {
        match Client::connect(&sched).await {
            Ok(c) => break pb::membership_client::MembershipClient::new(c.channel()),
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    };
    let mut seq = 0;
    loop {
        seq += 1;
        let mut beat = host.beat(seq);
        if let Some(info) = beat.info.as_mut() {
            info.address = addr.clone();
        }
        let wait = match client.heartbeat(beat).await {
            Ok(r) => {
                let r = r.into_inner();
                host.take_answer(&r);
                Duration::from_millis(u64::from(r.interval_ms.max(50)))
            }
            Err(e) => {
                // Once the run is over the scheduler goes first: the beats' errors are expected.
                if !STOPPING.load(std::sync::atomic::Ordering::Relaxed) {
                    eprintln!("beat: {e}");
                }
                Duration::from_millis(500)
            }
        };
        tokio::time::sleep(wait).await;
    }
}

/// The scheduler process; killed when dropped.
struct Scheduler {
    child: Child,
    _tmp: tempfile::TempDir,
    addr: String,
    log: std::path::PathBuf,
}

impl Drop for Scheduler {
    fn drop(&mut self) {
        STOPPING.store(true, std::sync::atomic::Ordering::Relaxed);
        // SAFETY: kill(2) with the pid of a child we spawned and have not reaped.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let _ = self.child.wait();
    }
}

impl Scheduler {
    async fn start(max_per_launch: u32) -> Result<Self> {
        let exe = std::env::current_exe()?;
        let bin = exe.parent().context("exe dir")?.join("berth-scheduler");
        if !bin.exists() {
            bail!(
                "{} is missing: cargo build --release -p berth-scheduler --bins",
                bin.display()
            );
        }
        let tmp = tempfile::Builder::new()
            .prefix("berth-bench-cluster-")
            .tempdir()?;
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0")?;
            l.local_addr()?.port()
        };
        let addr = format!("127.0.0.1:{port}");
        let config = format!(
            "listen = [\"{addr}\"]\nstate_dir = \"{}\"\nmetrics_listen = \"\"\n\
             heartbeat_seconds = 2.0\nhost_down_seconds = 10.0\n\
             [limits]\nmax_workers_per_launch = {max_per_launch}\n",
            tmp.path().join("state").display(),
        );
        let config_path = tmp.path().join("scheduler.toml");
        std::fs::write(&config_path, config)?;
        let log = tmp.path().join("scheduler.log");
        let out = std::fs::File::create(&log)?;
        let child = Command::new(&bin)
            .arg("--config")
            .arg(&config_path)
            .env("BERTH_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .context("start berth-scheduler")?;
        let mut s = Self {
            child,
            _tmp: tmp,
            addr,
            log,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(st) = s.child.try_wait()? {
                bail!("berth-scheduler exited with {st}:\n{}", s.log());
            }
            if let Ok(c) = Client::connect(&s.addr).await {
                if c.cluster()
                    .list_hosts(pb::ListHostsRequest {})
                    .await
                    .is_ok()
                {
                    return Ok(s);
                }
            }
            if Instant::now() > deadline {
                bail!("berth-scheduler did not answer:\n{}", s.log());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }
}

/// CPU seconds (user + system) used by `pid` so far.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces) start after the last ')'.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // utime and stime are fields 14 and 15 of stat(5); `rest` starts at field 3.
    // SAFETY: sysconf with a valid name has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    (ticks(11) + ticks(12)) / hz.max(1.0)
}

/// Raises RLIMIT_NOFILE's soft limit to `want` (or the hard limit, raising that too as root).
fn raise_nofile(want: u64) -> Result<()> {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we pass.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) } != 0 {
        bail!("getrlimit: {}", std::io::Error::last_os_error());
    }
    if r.rlim_cur >= want {
        return Ok(());
    }
    let hard = r.rlim_max;
    r.rlim_cur = want;
    r.rlim_max = r.rlim_max.max(want);
    // SAFETY: setrlimit reads the struct we pass.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &r) } == 0 {
        return Ok(());
    }
    // Not allowed past the hard limit here: take the hard limit.
    r.rlim_cur = hard.min(want);
    r.rlim_max = hard;
    eprintln!("RLIMIT_NOFILE: {want} refused, using the hard limit {hard}");
    // SAFETY: setrlimit reads the struct we pass.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &r) } != 0 {
        bail!(
            "setrlimit RLIMIT_NOFILE to {want}: {}",
            std::io::Error::last_os_error()
        );
    }
    Ok(())
}

fn launch_request(n: u32, placement: pb::Placement) -> pb::LaunchWorkersRequest {
    pb::LaunchWorkersRequest {
        n,
        cpu: 0.25,
        memory_gb: 0.5,
        command: vec!["/bin/true".into()],
        placement: placement as i32,
        ..Default::default()
    }
}

fn running_on_hosts(hosts: &[Arc<FakeHost>]) -> usize {
    hosts
        .iter()
        .map(|h| {
            h.workers()
                .iter()
                .filter(|w| w.status == pb::WorkerStatus::Running as i32)
                .count()
        })
        .sum()
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    let o = parse_opts()?;
    raise_nofile(65_536)?;
    let mut sched = Scheduler::start(o.batch.max(1024)).await?;
    let pid = sched.pid();
    let cpu0 = cpu_seconds(pid);
    let t_join = Instant::now();

    // Each host holds 128 workers of 0.25 cores and 0.5 GiB (cpu and memory run out together).
    // Not 100: the scheduler holds a launch's resources until the host's second beat after it
    // (a beat in flight may not include it), so in a burst faster than the beats it counts
    // recent launches twice for up to one beat, and a cluster filled to the last worker that
    // fast refuses the end of it (RESOURCE_EXHAUSTED) until the beats catch up.
    let capacity = pb::Resources {
        cpu: 32.0,
        memory_gb: 64.0,
        gpus: 0,
        workers: 128,
        ..Default::default()
    };
    let mut hosts = Vec::with_capacity(o.hosts);
    let mut names = Vec::with_capacity(o.hosts);
    for i in 0..o.hosts {
        let name = format!("sim-{i:04}");
        let h = Arc::new(FakeHost::new(&name, capacity, BTreeMap::new()));
        let addr = serve_host(h.clone()).await?;
        tokio::spawn(beat_forever(h.clone(), addr, sched.addr.clone()));
        hosts.push(h);
        names.push(name);
    }
    let client = Client::connect(&sched.addr).await?;
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let listed = client
            .cluster()
            .list_hosts(pb::ListHostsRequest {})
            .await?
            .into_inner()
            .hosts;
        let ready = listed
            .iter()
            .filter(|h| h.state == pb::HostState::Ready as i32)
            .count();
        if ready == o.hosts {
            break;
        }
        if Instant::now() > deadline {
            bail!(
                "{ready} of {} hosts READY after 120 s:\n{}",
                o.hosts,
                sched.log()
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let joined = t_join.elapsed();
    // Let the scheduler's watches and first listings of every host settle.
    tokio::time::sleep(Duration::from_secs(3)).await;

    // Launches: bin-pack for the first half, spread for the rest.
    let mut per_launch = Vec::new();
    let mut placed = 0u32;
    let t_all = Instant::now();
    while placed < o.workers {
        let n = o.batch.min(o.workers - placed);
        let placement = if placed < o.workers / 2 {
            pb::Placement::Binpack
        } else {
            pb::Placement::Spread
        };
        let t = Instant::now();
        let r = client
            .workers()
            .launch_workers(launch_request(n, placement))
            .await
            .map_err(|e| {
                anyhow::anyhow!(
                    "launch after {placed} placed: {e}\nberth-scheduler {}; its log:\n{}",
                    match sched.child.try_wait() {
                        Ok(Some(st)) => format!("exited with {st}"),
                        _ => "still running".to_owned(),
                    },
                    sched.log()
                )
            })?
            .into_inner();
        let d = t.elapsed();
        let running = r
            .workers
            .iter()
            .filter(|w| w.status == pb::WorkerStatus::Running as i32)
            .count();
        if running != n as usize {
            bail!("a launch of {n} answered {running} RUNNING");
        }
        per_launch.push(d);
        placed += n;
    }
    let all_launch = t_all.elapsed();
    let on_hosts = running_on_hosts(&hosts);
    if on_hosts != placed as usize {
        bail!("{on_hosts} workers RUNNING on the hosts, {placed} placed");
    }
    let (first, last) = (per_launch[0], per_launch[per_launch.len() - 1]);
    let launches = per_launch.len();
    let med = median(&mut per_launch);
    let max = per_launch[per_launch.len() - 1];
    let rss_full = rss_kib(pid);

    // One listing of every worker.
    let t = Instant::now();
    let listed = client
        .workers()
        .list_workers(pb::ListWorkersRequest::default())
        .await?
        .into_inner()
        .workers;
    let list_time = t.elapsed();
    let list_bytes = prost::Message::encoded_len(&pb::ListWorkersResponse {
        workers: listed.clone(),
    });
    if listed.len() != placed as usize {
        bail!("listed {} workers, {placed} placed", listed.len());
    }

    // Stop them all.
    let t = Instant::now();
    let stopped = client
        .workers()
        .stop_workers(pb::StopWorkersRequest {
            all: true,
            grace_seconds: Some(0),
            ..Default::default()
        })
        .await?
        .into_inner()
        .workers;
    let stop_answer = t.elapsed();
    let deadline = Instant::now() + Duration::from_secs(120);
    while running_on_hosts(&hosts) > 0 {
        if Instant::now() > deadline {
            bail!("workers still RUNNING on the hosts 120 s after the stop");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let stop_hosts = t.elapsed();
    // And until the scheduler's own view has them all ended.
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let live = running_count(&client).await?;
        if live == 0 {
            break;
        }
        if Instant::now() > deadline {
            bail!("the scheduler still lists {live} RUNNING 120 s after the stop");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let stop_view = t.elapsed();
    let cpu = cpu_seconds(pid) - cpu0;
    let rss_end = rss_kib(pid);

    let rate = |n: f64, d: Duration| n / d.as_secs_f64();
    println!(
        "berth-scheduler (release, one process) with {} simulated hosts over real gRPC on loopback",
        o.hosts
    );
    println!(
        "  hosts READY after {:.2} s (1 beat / 2 s each)",
        joined.as_secs_f64()
    );
    println!(
        "  {launches} launches of {} workers (/bin/true, 0.25 cpu, 0.5 GiB; bin-pack then spread) \
         to {placed} RUNNING:",
        o.batch
    );
    println!(
        "    per launch (call -> answer, all RUNNING): median {}  first {}  last {}  max {}",
        ms(med),
        ms(first),
        ms(last),
        ms(max)
    );
    println!(
        "    placements/s: {:.0} (median launch)  {:.0} (overall, {:.2} s for all)",
        rate(f64::from(o.batch), med),
        rate(f64::from(placed), all_launch),
        all_launch.as_secs_f64()
    );
    println!(
        "  ListWorkers of all {}: {} ({:.1} MiB answer)",
        listed.len(),
        ms(list_time),
        list_bytes as f64 / f64::from(1u32 << 20)
    );
    println!(
        "  StopWorkers all ({} answered): answer {}  every host stopped {}  scheduler lists none RUNNING {}",
        stopped.len(),
        ms(stop_answer),
        ms(stop_hosts),
        ms(stop_view)
    );
    println!(
        "  scheduler process: RSS {:.0} MiB with {placed} workers, {:.0} MiB at the end; \
         CPU {:.1} s (user+sys) over the run",
        rss_full as f64 / 1024.0,
        rss_end as f64 / 1024.0,
        cpu
    );
    println!(
        "reference: Nomad C1M ≈{NOMAD_C1M:.0} containers/s, C2M ≈{NOMAD_C2M:.0} containers/s \
         (job submitted -> containers running on real hosts, real cluster); ours: {:.2}x and \
         {:.2}x of them (overall rate)",
        rate(f64::from(placed), all_launch) / NOMAD_C1M,
        rate(f64::from(placed), all_launch) / NOMAD_C2M
    );
    println!(
        "  span differs: our hosts are simulated in one process on the same machine as the \
         scheduler (no container or process start, no network between machines); our span is \
         LaunchWorkers request -> every worker RUNNING in the scheduler's answer"
    );
    println!(
        "  the placement core alone, in process: see berth-bench-placement (1,000 hosts, \
         100,000 workers)"
    );
    Ok(())
}
