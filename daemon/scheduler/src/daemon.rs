//! Assembles a scheduler node from its configuration and serves it: `berth.v1.Workers`,
//! `berth.v1.Cluster` and `berth.v1.Membership` with health and reflection on every listen
//! address, metrics over HTTP, and one shutdown path.

use std::sync::Arc;

use berth_proto::v1 as pb;
use tokio_util::sync::CancellationToken;

use berth_server::front::{bind_all, serve_metrics, GrpcFront};
use berth_server::ServeError;

use crate::config::SchedulerConfig;
use crate::grpc::{SchedulerCluster, SchedulerMembership};
use crate::hosts::GrpcConnector;
use crate::{Scheduler, SchedulerOptions};

/// Failure to start or run the scheduler.
#[derive(Debug, thiserror::Error)]
pub enum SchedulerError {
    #[error("state dir {path}: {source}")]
    StateDir {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Serve(#[from] ServeError),
}

/// Runs a scheduler until `shutdown`.
pub async fn run(cfg: SchedulerConfig, shutdown: CancellationToken) -> Result<(), SchedulerError> {
    std::fs::create_dir_all(&cfg.state_dir).map_err(|source| SchedulerError::StateDir {
        path: cfg.state_dir.clone(),
        source,
    })?;
    let security = cfg.security();
    let listeners = bind_all(&cfg.listen, &security).await?;
    let scheduler = Scheduler::new(
        SchedulerOptions {
            heartbeat: cfg.heartbeat(),
            host_down_after: cfg.host_down_after(),
            launch_attempts: cfg.launch_attempts,
            state_dir: Some(cfg.state_dir.clone()),
            limits: cfg.limits,
            ..Default::default()
        },
        Arc::new(GrpcConnector {
            tls: cfg.client_tls(),
        }),
    );
    scheduler.start();

    let cluster = pb::cluster_server::ClusterServer::new(SchedulerCluster {
        scheduler: scheduler.clone(),
        policy: security.policy.clone(),
    });
    let membership = pb::membership_server::MembershipServer::new(SchedulerMembership {
        scheduler: scheduler.clone(),
        policy: security.policy.clone(),
    });
    let front = GrpcFront::serve(
        listeners,
        &security,
        &cfg.load,
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
    serve_metrics(
        &cfg.metrics_listen,
        cfg.insecure_plaintext,
        scheduler.clone(),
        shutdown.clone(),
    )
    .await?;
    tracing::info!("scheduler ready");
    berth_server::notify::ready("serving");
    berth_server::notify::install_wedge_hook();
    {
        let scheduler = scheduler.clone();
        berth_server::notify::spawn_watchdog(
            move || {
                let scheduler = scheduler.clone();
                // The scheduler's view, read on a blocking thread.
                async move {
                    tokio::task::spawn_blocking(move || scheduler.list_hosts().len())
                        .await
                        .is_ok()
                }
            },
            shutdown.clone(),
        );
    }

    shutdown.cancelled().await;
    tracing::info!("shutting down; hosts and their workers keep running");
    berth_server::notify::stopping();
    scheduler.shutdown();
    Ok(front.drain().await?)
}
