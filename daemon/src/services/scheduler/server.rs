//! Assembles a scheduler node from its configuration and serves it: `berth.v1.Workers`,
//! `berth.v1.Cluster` and `berth.v1.Membership` with health and reflection on every listen
//! address, metrics over HTTP, and one shutdown path.

use std::fmt::Write as _;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use berth_proto::v1 as pb;
use tokio_util::sync::CancellationToken;

use crate::scheduler_config::SchedulerConfig;
use crate::services::front::{bind_all, serve_metrics, GrpcFront};
use crate::services::server::DaemonError;

use super::grpc::{SchedulerCluster, SchedulerMembership};
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

    let cluster = pb::cluster_server::ClusterServer::new(SchedulerCluster {
        scheduler: scheduler.clone(),
    });
    let membership = pb::membership_server::MembershipServer::new(SchedulerMembership {
        scheduler: scheduler.clone(),
    });
    let front = GrpcFront::serve(
        listeners,
        scheduler.clone(),
        &["berth.v1.Cluster", "berth.v1.Membership"],
        |router| {
            router
                .add_service(cluster.clone())
                .add_service(membership.clone())
        },
        shutdown.clone(),
    )
    .await?;
    let s = scheduler.clone();
    serve_metrics(
        &cfg.metrics_listen,
        move || {
            let s = s.clone();
            async move { render_metrics(&s) }
        },
        shutdown.clone(),
    )
    .await?;
    tracing::info!("scheduler ready");

    shutdown.cancelled().await;
    tracing::info!("shutting down; hosts and their workers keep running");
    scheduler.shutdown();
    front.drain().await
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
