//! berth-scheduler's metrics: hosts by state, workers by status, launches and their refusals,
//! placement retries, host losses. Served by `berth_server::metrics`.

use std::fmt;

use berth_proto::v1 as pb;
use berth_server::metrics::{counter, gauge, sample, MetricsSource};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::DescriptorEncoder;

use crate::Scheduler;

impl MetricsSource for Scheduler {
    type Collector = SchedulerCollector;

    // Everything the scheduler shows is in memory: nothing to wait for.
    async fn collector(&self) -> SchedulerCollector {
        SchedulerCollector(self.clone())
    }
}

/// The metrics of a scheduler, read from it while encoding.
#[derive(Debug)]
pub struct SchedulerCollector(Scheduler);

impl Collector for SchedulerCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> fmt::Result {
        let s = &self.0;
        let mut hosts = gauge(&mut enc, "berth_scheduler_hosts", "Hosts by state.")?;
        for (state, n) in s.host_counts() {
            let name = pb::HostState::try_from(state).map_or("unknown", |s| s.as_str_name());
            sample(&mut hosts, [("state", name)], n)?;
        }
        let mut workers = gauge(
            &mut enc,
            "berth_scheduler_workers",
            "Workers on all hosts, by status.",
        )?;
        for (status, n) in s.status_counts() {
            let name = pb::WorkerStatus::try_from(status).map_or("unknown", |s| s.as_str_name());
            sample(&mut workers, [("status", name)], n)?;
        }
        let m = s.metrics();
        counter(
            &mut enc,
            "berth_scheduler_launches",
            "Launch requests.",
            &m.launches,
        )?;
        counter(
            &mut enc,
            "berth_scheduler_launch_refusals",
            "Launch requests refused whole.",
            &m.launch_refusals,
        )?;
        counter(
            &mut enc,
            "berth_scheduler_placement_retries",
            "Placements tried again after a host refused its part.",
            &m.placement_retries,
        )?;
        counter(
            &mut enc,
            "berth_scheduler_workers_launched",
            "Workers launched on hosts.",
            &m.workers_launched,
        )?;
        counter(
            &mut enc,
            "berth_scheduler_host_losses",
            "Times a DOWN host's workers were marked LOST.",
            &m.hosts_lost,
        )
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::sync::atomic::Ordering;
    use std::sync::Arc;

    use berth_server::metrics::{encode, family, help_of};

    use super::*;
    use crate::fake::{FakeCluster, FakeConnector};
    use crate::SchedulerOptions;

    #[tokio::test]
    async fn a_scheduler_s_metrics_keep_their_names_and_types() {
        let fakes = FakeCluster::new();
        let cap = pb::Resources {
            cpu: 1.0,
            memory_gb: 1.0,
            workers: 1,
            ..Default::default()
        };
        fakes.add("h1", cap, BTreeMap::new());
        let s = Scheduler::new(
            SchedulerOptions::default(),
            Arc::new(FakeConnector(fakes.clone())),
        );
        s.start();
        for h in fakes.all() {
            s.heartbeat(h.beat(1)).unwrap();
        }
        s.metrics()
            .placement_retries
            .fetch_add(2, Ordering::Relaxed);
        let text = encode(s.collector().await).unwrap();
        assert_eq!(
            family(&text, "berth_scheduler_hosts"),
            [
                "# TYPE berth_scheduler_hosts gauge",
                "berth_scheduler_hosts{state=\"HOST_STATE_READY\"} 1",
            ],
            "{text}"
        );
        assert_eq!(
            family(&text, "berth_scheduler_placement_retries_total"),
            [
                "# TYPE berth_scheduler_placement_retries_total counter",
                "berth_scheduler_placement_retries_total 2",
            ],
            "{text}"
        );
        assert_eq!(
            help_of(&text, "berth_scheduler_host_losses_total"),
            "Times a DOWN host's workers were marked LOST."
        );
        let types: Vec<&str> = text
            .lines()
            .filter_map(|l| l.strip_prefix("# TYPE "))
            .collect();
        assert_eq!(
            types,
            [
                "berth_scheduler_hosts gauge",
                "berth_scheduler_workers gauge",
                "berth_scheduler_launches_total counter",
                "berth_scheduler_launch_refusals_total counter",
                "berth_scheduler_placement_retries_total counter",
                "berth_scheduler_workers_launched_total counter",
                "berth_scheduler_host_losses_total counter",
            ]
        );
        s.shutdown();
    }
}
