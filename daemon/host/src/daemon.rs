//! Assembles a host daemon from its configuration and serves it: gRPC on every listen address
//! (TCP and Unix sockets) with health and reflection, metrics over HTTP, and one shutdown path.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use berth_proto::v1 as pb;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use berth_core::admission::Capacity;
use berth_core::ipam::Subnet;
use berth_core::launch::{KernelInvocation, GIB};
use berth_core::limits::ExecLimits;
use berth_sys::cgroup::{CgroupFs, Cgroups};
use berth_sys::gpu::{self, GpuBackendSpec, GpuMonitor};
use berth_sys::host as hostfs;
use berth_sys::launcher::{Rlimit, ShimSpawner};
use berth_sys::netns::{HostNetwork, NetConfig, Netns, NoNetwork};
use berth_sys::output::Rotation;
use berth_sys::state_lock::{LockError, StateDirLock};
use berth_sys::store::{StoreError, StoreWriter};

use crate::info::HostService;
use crate::supervisor::{Host, HostOptions, KernelEntry, WorkerPrivileges};
use berth_server::front::{bind_all, serve_metrics, GrpcFront, Security};
use berth_server::identity::{AccessConfig, Policy};
use berth_server::ServeError;

/// Failure to start or run the daemon.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error("state dir {path}: {source}")]
    StateDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Cgroup(#[from] berth_sys::cgroup::CgroupError),
    #[error(transparent)]
    Gpu(#[from] berth_sys::gpu::GpuError),
    #[error("start GPU telemetry: {0}")]
    GpuTelemetry(std::io::Error),
    #[error(transparent)]
    StateDirInUse(#[from] LockError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(
        "{0}; start `berthd --recover` to move it aside and take over the live workers from \
         their own files (the sessions and records in it are lost)"
    )]
    StoreUnreadable(#[source] StoreError),
    #[error(transparent)]
    Serve(#[from] ServeError),
}

/// Resolves the kernel table: the first candidate of each that exists.
pub fn resolve_kernels(cfg: &Config) -> Vec<KernelEntry> {
    cfg.kernels
        .iter()
        .map(|(name, k)| {
            let found = k.candidates.iter().find_map(|c| {
                hostfs::resolve_program(c, &cfg.worker.path, std::path::Path::new("/"))
            });
            KernelEntry {
                name: name.clone(),
                invocation: found.map(|interpreter| KernelInvocation {
                    interpreter,
                    args: k.args.clone(),
                    code_flag: k.code_flag.clone(),
                }),
                candidates: k.candidates.clone(),
                pool_size: k.pool_size,
                preload: k.preload.clone(),
            }
        })
        .collect()
}

/// The supervisor's options from a configuration.
pub fn host_options(cfg: &Config) -> HostOptions {
    let name = if cfg.name.is_empty() {
        hostfs::hostname()
    } else {
        cfg.name.clone()
    };
    let cpu = if cfg.resources.cpu > 0.0 {
        cfg.resources.cpu
    } else {
        hostfs::online_cpus() as f64
    };
    let memory_bytes = if cfg.resources.memory_gb > 0.0 {
        (cfg.resources.memory_gb * GIB) as u64
    } else {
        hostfs::memory_total_bytes().saturating_sub((cfg.resources.reserved_memory_gb * GIB) as u64)
    };
    // HOME, USER and LOGNAME come from the account each worker runs as.
    let mut base_env: BTreeMap<String, String> = ["LANG", "LC_ALL", "TZ"]
        .iter()
        .filter_map(|k| std::env::var(k).ok().map(|v| ((*k).to_owned(), v)))
        .collect();
    base_env.extend(cfg.worker.env.clone());
    HostOptions {
        name,
        state_dir: cfg.state_dir.clone(),
        capacity: Capacity {
            cpu,
            memory_bytes,
            workers: cfg.resources.max_workers,
        },
        pids_max: cfg.worker.pids_max,
        default_workdir: cfg.worker.workdir.clone(),
        worker_path: cfg.worker.path.clone(),
        base_env,
        kernels: resolve_kernels(cfg),
        rotation: Rotation {
            segment_bytes: cfg.output.segment_bytes,
            segments: cfg.output.segments,
        },
        stop_grace: Duration::from_secs(u64::from(cfg.worker.stop_grace_seconds)),
        kill_limit: crate::supervisor::DEFAULT_KILL_LIMIT,
        host_from_worker: std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST),
        subnet: cfg.subnet.clone(),
        labels: cfg.labels.clone(),
        retain_finished_for: Duration::from_secs(cfg.retention.finished_seconds),
        retain_finished_max: cfg.retention.max_finished,
        retention_sweep: Duration::from_secs(cfg.retention.sweep_seconds.max(1)),
        privileges: WorkerPrivileges {
            worker_user: None,
            worker_user_name: cfg.worker_user.clone(),
            allow_root: cfg.allow_root_workers,
            root_caps: cfg
                .root_worker_capabilities
                .iter()
                .filter_map(|c| berth_sys::launcher::cap_number(c))
                .collect(),
            rlimits: cfg
                .worker
                .rlimits
                .iter()
                .filter_map(|(name, [soft, hard])| {
                    let lim = |v: i64| if v < 0 { u64::MAX } else { v as u64 };
                    crate::config::rlimit_resource(name).map(|resource| Rlimit {
                        resource,
                        soft: lim(*soft),
                        hard: lim(*hard),
                    })
                })
                .collect(),
        },
        limits: cfg.limits,
        exec: exec_limits(cfg),
        clock: Arc::new(berth_sys::clock::SystemClock::new()),
    }
}

/// The exec limits of the workers: this process's (`sysconf(_SC_ARG_MAX)`, which workers
/// inherit), or what the stack limit `worker.rlimits` gives them says.
fn exec_limits(cfg: &Config) -> ExecLimits {
    let stack = cfg
        .worker
        .rlimits
        .iter()
        .find(|(name, _)| crate::config::rlimit_resource(name) == Some(libc::RLIMIT_STACK as i32))
        .map(|(_, [soft, _])| u64::try_from(*soft).unwrap_or(u64::MAX));
    match stack {
        Some(soft) => ExecLimits::for_stack(soft),
        None => ExecLimits {
            arg_max: hostfs::arg_max().min(berth_core::limits::ARG_MAX_CEILING),
        },
    }
}

/// What both daemons' listeners need to know to protect themselves, from berthd's config.
pub fn security(cfg: &Config) -> Security {
    Security {
        tls: cfg.tls.clone(),
        insecure_plaintext: cfg.insecure_plaintext,
        socket_group: cfg.socket_group.clone(),
        policy: Policy::new(AccessConfig {
            admin_group: cfg.admin_group.clone(),
            worker_user: cfg.worker_user.clone(),
            insecure_plaintext: cfg.insecure_plaintext,
            users: cfg.users.clone(),
            trusted_schedulers: cfg.trusted_schedulers.clone(),
        }),
    }
}

/// The TLS material berthd presents to its scheduler (its certificate names the host).
fn client_tls(cfg: &Config) -> berth_client::TlsFiles {
    let [ca, cert, key] = cfg.tls.client_files();
    berth_client::TlsFiles { ca, cert, key }
}

/// Takes the state dir for this daemon (made, private, if it does not exist): nothing else in
/// it is touched before.
fn lock_state_dir(dir: &std::path::Path) -> Result<StateDirLock, DaemonError> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|source| DaemonError::StateDir {
            path: dir.to_path_buf(),
            source,
        })?;
    Ok(StateDirLock::acquire(dir)?)
}

/// The state dir, private to root: spec records hold the workers' environments (which often
/// hold secrets), and output is served only through the API, to its owner.
fn private_state_dir(dir: &std::path::Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(dir.join("workers"))?;
    for d in [dir.to_path_buf(), dir.join("workers")] {
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o700))?;
    }
    Ok(())
}

/// Finds or makes this daemon's cgroup subtree. Under systemd on cgroup v2 (berthd run as a
/// service, no `[cgroup] parent`) that is in berth's transient `Delegate=yes` scope beside the
/// service (`sys::systemd`), where the zygotes, and so the shims, move too: the service's own
/// cgroup then never has children, and systemd can start a new daemon in it at every restart.
/// Elsewhere, or when the scope cannot be had (logged), it is below the daemon's own cgroup.
async fn place_cgroups(
    subtree: String,
    parent: Option<String>,
    pool: usize,
    spawner: &Arc<ShimSpawner>,
) -> Result<Result<CgroupFs, berth_sys::cgroup::CgroupError>, tokio::task::JoinError> {
    use berth_sys::systemd;
    let own = if parent.is_none() && systemd::booted() {
        tokio::task::spawn_blocking(CgroupFs::unified_own_path)
            .await?
            .ok()
            .flatten()
    } else {
        None
    };
    let scope = own.as_deref().and_then(systemd::scope_for);
    if let (Some((cgroup, slice)), Some(mount)) = (scope, systemd::unified_mount()) {
        match systemd::ensure_scope(&mount, &cgroup, &slice, &spawner.zygote_pids()).await {
            Ok(scope) => {
                let spawner = spawner.clone();
                return tokio::task::spawn_blocking(move || {
                    let made = CgroupFs::in_delegated(&subtree, &scope)?;
                    if let Some(leaf) = made.shim_leaf() {
                        if let Err(e) = spawner.place_in(leaf) {
                            tracing::warn!(cgroup = %leaf.display(), error = %e, "zygotes not moved into the workers' scope");
                        }
                    }
                    tracing::info!(scope = %scope, "workers and shims in systemd scope {}", systemd::WORKERS_SCOPE);
                    Ok(made.with_pool(pool))
                })
                .await;
            }
            Err(e) => tracing::warn!(
                error = %e,
                "workers stay below berthd's own cgroup: a restart of the service fails on \
                 systemd before 254 (status=219/CGROUP) while they live"
            ),
        }
    }
    tokio::task::spawn_blocking(move || {
        CgroupFs::discover(&subtree, parent.as_deref()).map(|c| c.with_pool(pool))
    })
    .await
}

/// Runs a host daemon until `shutdown` is cancelled. Workers keep running afterwards: they live
/// under their shims, not under the daemon.
pub async fn run(cfg: Config, shutdown: CancellationToken) -> Result<(), DaemonError> {
    let mut opts = host_options(&cfg);
    let joined = |e: tokio::task::JoinError| DaemonError::StateDir {
        path: cfg.state_dir.clone(),
        source: std::io::Error::other(e),
    };
    // One daemon per state dir, before anything else: a second one stops here and touches
    // nothing of the first's (its cgroups, sockets, store and files). Held until `run` returns.
    let dir = cfg.state_dir.clone();
    let _state_dir_lock = tokio::task::spawn_blocking(move || lock_state_dir(&dir))
        .await
        .map_err(joined)??;
    let state_err = |source| DaemonError::StateDir {
        path: cfg.state_dir.clone(),
        source,
    };
    private_state_dir(&cfg.state_dir).map_err(state_err)?;
    // The store next: one that cannot be opened stops start-up before any cgroup or socket is
    // touched (with `--recover`, a damaged one is moved aside instead).
    let state_dir = cfg.state_dir.clone();
    let recover = cfg.recover;
    let (store, origin) =
        tokio::task::spawn_blocking(move || crate::supervisor::open_store(&state_dir, recover))
            .await
            .map_err(joined)?
            .map_err(|e| match e {
                e @ StoreError::InUse { .. } => DaemonError::Store(e),
                e @ (StoreError::Corrupt { .. } | StoreError::Db { .. }) => {
                    DaemonError::StoreUnreadable(e)
                }
                e => DaemonError::Store(e),
            })?;
    let security = security(&cfg);
    opts.privileges.worker_user = security.policy.account_by_name(&cfg.worker_user).await;
    if opts.privileges.worker_user.is_none() {
        tracing::error!(
            worker_user = %cfg.worker_user,
            "worker_user does not exist: launches by root and by callers without a local \
             account are refused until it does"
        );
    }
    // The zygotes first: under systemd they are what the workers' scope is started with.
    // A pooled interpreter keeps CAP_SETUID, CAP_SETGID and CAP_SETPCAP until its claim, so with a pool the
    // zygotes keep them in their bounding set too (each cold worker drops them from its own).
    let mut zygote_caps = opts.privileges.root_caps.clone();
    if opts.kernels.iter().any(|k| k.pool_size > 0) {
        zygote_caps.extend(berth_sys::launcher::pool::POOL_CAPS);
    }
    let spawner = Arc::new(ShimSpawner::new(
        (!cfg.shim.as_os_str().is_empty()).then(|| cfg.shim.clone()),
        &zygote_caps,
    ));
    let parent = (!cfg.cgroup.parent.is_empty()).then(|| cfg.cgroup.parent.clone());
    let subtree = format!("berth-{}", opts.name);
    let cgroups = place_cgroups(subtree, parent, cfg.cgroup.pool, &spawner)
        .await
        .map_err(|e| DaemonError::StateDir {
            path: cfg.state_dir.clone(),
            source: std::io::Error::other(e),
        })??;
    tracing::info!(cgroups = %cgroups.describe(), "cgroups ready");
    for k in &opts.kernels {
        match &k.invocation {
            Some(i) => {
                tracing::info!(kernel = %k.name, interpreter = %i.interpreter.display(), "kernel available")
            }
            None => {
                tracing::warn!(kernel = %k.name, looked_for = ?k.candidates, "kernel not installed")
            }
        }
    }
    let cgroups: Arc<dyn Cgroups> = Arc::new(cgroups);
    let listeners = bind_all(&cfg.listen, &security).await?;
    let address = if cfg.advertise.is_empty() {
        listeners
            .iter()
            .find(|(_, l)| l.is_tcp())
            .map(|(_, l)| l.display())
            .unwrap_or_default()
    } else {
        cfg.advertise.clone()
    };
    let store = Arc::new(store);
    let (writer, writer_thread) = StoreWriter::start_shared(store.clone());
    // NVML is loaded (dlopen) and queried off the async threads, and sampled on its own thread.
    let gpu_spec = GpuBackendSpec::parse(&cfg.gpus)?;
    let gpu_period = Duration::from_secs_f64(cfg.gpu_telemetry_seconds);
    let gpu_host = opts.name.clone();
    let gpu_subtree = format!("berth-{}", opts.name);
    let (opened, monitor) = tokio::task::spawn_blocking(move || {
        let opened = gpu::open(gpu_spec, &gpu_host)?;
        let monitor = GpuMonitor::start(opened.gpus.clone(), gpu_period, gpu_subtree)
            .map_err(DaemonError::GpuTelemetry)?;
        Ok::<_, DaemonError>((opened, monitor))
    })
    .await
    .map_err(|e| DaemonError::StateDir {
        path: cfg.state_dir.clone(),
        source: std::io::Error::other(e),
    })??;
    tracing::info!(
        backend = opened.gpus.backend(),
        gpus = opened.gpus.devices().len(),
        "GPUs: {}",
        opened.note
    );
    let net = start_network(&cfg).await;
    let net_of_host = net.clone();
    let host = Host::with_network(
        opts,
        cgroups,
        spawner,
        Some(writer.clone()),
        opened.gpus,
        monitor,
        net,
    );
    let started = std::time::Instant::now();
    match host.recover(&store, &origin).await {
        Ok(r) => tracing::info!(
            adopted = r.adopted,
            ended_while_down = r.ended_while_down,
            lost = r.lost,
            unaccounted = r.unaccounted,
            stopped_unaccounted = r.stopped_unaccounted,
            kept = r.kept,
            sessions = r.sessions,
            sessions_reinstated = r.sessions_reinstated,
            bad_records = r.bad_records.len(),
            took_ms = started.elapsed().as_millis() as u64,
            "recovered state"
        ),
        Err(e) => tracing::error!(error = %e, "recovery failed; starting with what was recovered"),
    }
    host.start_background();
    host.start_gpu_watch(gpu_period);
    tracing::info!(
        name = %host.name(),
        capacity = ?host.view().capacity,
        "host ready"
    );

    let hostsvc = pb::host_server::HostServer::new(HostService {
        host: host.clone(),
        address: address.clone(),
    });
    let front = GrpcFront::serve(
        listeners,
        &security,
        &cfg.load,
        host.clone(),
        &["berth.v1.Host"],
        |router| router.add_service(hostsvc.clone()),
        shutdown.clone(),
    )
    .await?;
    serve_metrics(
        &cfg.metrics_listen,
        cfg.insecure_plaintext,
        host.clone(),
        shutdown.clone(),
    )
    .await?;
    let membership = Arc::new(crate::member::Membership::with_peers(
        cluster_routes(&cfg, &net_of_host, &address, host.name()).await,
    ));
    // Stops beating at shutdown, with a last `leaving` beat; awaited so that beat goes out.
    let beats: Vec<_> = crate::member::replicas(&cfg.scheduler)
        .into_iter()
        .map(|scheduler| {
            tracing::info!(scheduler = %scheduler, advertise = %address, "joining a scheduler");
            berth_server::spawn_in(
                tracing::info_span!("membership", scheduler = %scheduler),
                crate::member::run(
                    host.clone(),
                    address.clone(),
                    scheduler,
                    client_tls(&cfg),
                    membership.clone(),
                    shutdown.clone(),
                ),
            )
        })
        .collect();
    let serving = host.view();
    berth_server::notify::ready(&format!(
        "serving: {} workers, {} cpu of {} allocated",
        serving.allocated.workers, serving.allocated.cpu, serving.capacity.cpu
    ));
    berth_server::notify::install_wedge_hook();
    {
        let host = host.clone();
        berth_server::notify::spawn_watchdog(
            move || {
                let host = host.clone();
                async move {
                    // The supervisor's state, read on a blocking thread: a wedged supervisor or an
                    // exhausted blocking pool withholds the ping.
                    tokio::task::spawn_blocking(move || host.status_counts())
                        .await
                        .is_ok()
                }
            },
            shutdown.clone(),
        );
    }

    shutdown.cancelled().await;
    if !beats.is_empty() {
        let _ =
            tokio::time::timeout(Duration::from_secs(2), futures::future::join_all(beats)).await;
    }
    tracing::info!("shutting down; workers keep running under their shims");
    berth_server::notify::stopping();
    host.shutdown();
    // Idle pooled workers are no user's: they end with the daemon.
    host.stop_pool().await;
    let result = front.drain().await.map_err(DaemonError::from);
    let h = host.clone();
    let _ = tokio::task::spawn_blocking(move || h.cleanup_subtree()).await;
    writer.stop();
    let _ = tokio::task::spawn_blocking(move || writer_thread.join()).await;
    result
}

/// The route manager to the cluster's other hosts, where workers have a network of their own.
/// A daemon without a scheduler removes the cluster routes a predecessor left.
async fn cluster_routes(
    cfg: &Config,
    net: &Arc<dyn Netns>,
    address: &str,
    name: &str,
) -> Option<Arc<crate::peers::Peers>> {
    if net.unavailable().is_some() {
        return None;
    }
    let subnet = net.subnet()?;
    let cluster = berth_sys::routes::ClusterNet {
        bridge: cfg.bridge.clone(),
        subnet,
        egress: cfg.egress,
    };
    if cfg.scheduler.is_empty() {
        let c = cluster.clone();
        match tokio::task::spawn_blocking(move || {
            let stale = c.routes()?;
            if stale.is_empty() {
                return Ok(None);
            }
            c.apply(&[]).map(Some)
        })
        .await
        {
            Ok(Ok(Some(a))) => {
                tracing::info!(
                    removed = a.removed,
                    "no scheduler: cluster routes of an earlier run removed"
                )
            }
            Ok(Ok(None)) => {}
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "cluster routes of an earlier run not removed")
            }
            Err(e) => tracing::warn!(error = %e, "cluster routes of an earlier run not removed"),
        }
        return None;
    }
    Some(Arc::new(crate::peers::Peers::new(name, address, cluster)))
}

/// The host side of worker networks (bridge, gateway, rules, egress) and its namespace threads.
/// Where it cannot be set up, the daemon still runs host-mode workers and refuses the others
/// with the reason.
async fn start_network(cfg: &Config) -> Arc<dyn Netns> {
    let dir = cfg.state_dir.join("netns");
    let unavailable = |reason: String| -> Arc<dyn Netns> {
        tracing::error!(reason = %reason, "worker networks unavailable; only host-mode workers can run");
        Arc::new(NoNetwork {
            reason,
            dir: dir.clone(),
        })
    };
    let subnet = match Subnet::parse(&cfg.subnet) {
        Ok(s) => s,
        Err(e) => return unavailable(e.to_string()),
    };
    let ncfg = NetConfig {
        dir: dir.clone(),
        bridge: cfg.bridge.clone(),
        subnet,
        egress: cfg.egress,
        threads: hostfs::work_lanes(),
        pool: cfg.netns_pool,
    };
    match tokio::task::spawn_blocking(move || HostNetwork::start(ncfg)).await {
        Ok(Ok(n)) => Arc::new(n),
        Ok(Err(e)) => unavailable(e.to_string()),
        Err(e) => unavailable(format!("start: {e}")),
    }
}
