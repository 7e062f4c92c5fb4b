//! Assembles a scheduler node from its configuration and serves it: `berth.v1.Workers`,
//! `berth.v1.Cluster` and `berth.v1.Membership` with health and reflection on every listen
//! address, metrics over HTTP, and one shutdown path.

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
    serve_metrics(&cfg.metrics_listen, scheduler.clone(), shutdown.clone()).await?;
    tracing::info!("scheduler ready");

    shutdown.cancelled().await;
    tracing::info!("shutting down; hosts and their workers keep running");
    scheduler.shutdown();
    front.drain().await
}
