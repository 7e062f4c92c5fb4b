//! Assembles a scheduler node from its configuration and serves it: `berth.v1.Workers`,
//! `berth.v1.Cluster` and `berth.v1.Membership` with health and reflection on every listen
//! address, metrics over HTTP, and one shutdown path.

use std::fmt::Write as _;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use berth_proto::v1 as pb;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::scheduler_config::SchedulerConfig;
use crate::services::server::{bind_all, drain_servers, reflection, spawn_serve, DaemonError};

use super::grpc::{SchedulerCluster, SchedulerMembership, SchedulerWorkers};
use super::hosts::GrpcConnector;
use super::{Scheduler, SchedulerOptions};

/// Runs a scheduler until `shutdown`.
pub async fn run(cfg: SchedulerConfig, shutdown: CancellationToken) -> Result<(), DaemonError> {
    std::fs::create_dir_all(&cfg.state_dir).map_err(|source| DaemonError::StateDir {
        path: cfg.state_dir.clone(),
        source,
    })?;
    let listeners = bind_all(&cfg.listen).await?;
    let scheduler = Scheduler::new(
        SchedulerOptions {
            heartbeat: cfg.heartbeat(),
            host_down_after: cfg.host_down_after(),
            launch_attempts: cfg.launch_attempts,
            state_dir: Some(cfg.state_dir.clone()),
            ..Default::default()
        },
        Arc::new(GrpcConnector),
    );
    scheduler.start();

    let (health, health_svc) = tonic_health::server::health_reporter();
    health
        .set_serving::<pb::workers_server::WorkersServer<SchedulerWorkers>>()
        .await;
    health
        .set_serving::<pb::cluster_server::ClusterServer<SchedulerCluster>>()
        .await;
    let (refl_v1, refl_v1alpha) = reflection(&[
        "berth.v1.Workers",
        "berth.v1.Cluster",
        "berth.v1.Membership",
    ])?;
    let workers = pb::workers_server::WorkersServer::new(SchedulerWorkers {
        scheduler: scheduler.clone(),
    })
    .max_decoding_message_size(64 << 20);
    let cluster = pb::cluster_server::ClusterServer::new(SchedulerCluster {
        scheduler: scheduler.clone(),
    });
    let membership = pb::membership_server::MembershipServer::new(SchedulerMembership {
        scheduler: scheduler.clone(),
    });
    let mut servers = Vec::new();
    for (addr, l) in listeners {
        let router = tonic::transport::Server::builder()
            .add_service(health_svc.clone())
            .add_service(refl_v1.clone())
            .add_service(refl_v1alpha.clone())
            .add_service(workers.clone())
            .add_service(cluster.clone())
            .add_service(membership.clone());
        servers.push(spawn_serve(addr, l, router, shutdown.clone()));
    }
    if !cfg.metrics_listen.is_empty() {
        let l = TcpListener::bind(&cfg.metrics_listen)
            .await
            .map_err(|source| DaemonError::Listen {
                addr: cfg.metrics_listen.clone(),
                source,
            })?;
        tracing::info!(listen = %cfg.metrics_listen, "serving metrics");
        let s = scheduler.clone();
        tokio::spawn(crate::services::metrics::serve_with(
            l,
            move || {
                let s = s.clone();
                async move { render_metrics(&s) }
            },
            shutdown.clone(),
        ));
    }
    tracing::info!("scheduler ready");

    shutdown.cancelled().await;
    tracing::info!("shutting down; hosts and their workers keep running");
    health
        .set_not_serving::<pb::workers_server::WorkersServer<SchedulerWorkers>>()
        .await;
    scheduler.shutdown();
    drain_servers(servers).await
}

fn status_name(s: i32) -> &'static str {
    pb::WorkerStatus::try_from(s).map_or("unknown", |s| s.as_str_name())
}

/// The scheduler's metrics in the Prometheus text format.
pub fn render_metrics(s: &Scheduler) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "# HELP berth_scheduler_hosts Hosts by state.");
    let _ = writeln!(out, "# TYPE berth_scheduler_hosts gauge");
    for (state, n) in s.host_counts() {
        let name = pb::HostState::try_from(state).map_or("unknown", |s| s.as_str_name());
        let _ = writeln!(out, "berth_scheduler_hosts{{state=\"{name}\"}} {n}");
    }
    let _ = writeln!(
        out,
        "# HELP berth_scheduler_workers Workers on all hosts, by status."
    );
    let _ = writeln!(out, "# TYPE berth_scheduler_workers gauge");
    for (status, n) in s.status_counts() {
        let _ = writeln!(
            out,
            "berth_scheduler_workers{{status=\"{}\"}} {n}",
            status_name(status)
        );
    }
    let m = s.metrics();
    for (name, help, v) in [
        (
            "berth_scheduler_launches_total",
            "Launch requests.",
            &m.launches,
        ),
        (
            "berth_scheduler_launch_refusals_total",
            "Launch requests refused whole.",
            &m.launch_refusals,
        ),
        (
            "berth_scheduler_placement_retries_total",
            "Placements tried again after a host refused its part.",
            &m.placement_retries,
        ),
        (
            "berth_scheduler_workers_launched_total",
            "Workers launched on hosts.",
            &m.workers_launched,
        ),
        (
            "berth_scheduler_host_losses_total",
            "Times a DOWN host's workers were marked LOST.",
            &m.hosts_lost,
        ),
    ] {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} counter");
        let _ = writeln!(out, "{name} {}", v.load(Ordering::Relaxed));
    }
    out
}
