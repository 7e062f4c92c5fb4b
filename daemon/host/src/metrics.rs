//! berthd's metrics: workers by status, launches, the launch latency histogram, capacity and
//! what is allocated, usage of running workers, GPUs. Served by `berth_server::metrics`.

use std::fmt;
use std::sync::atomic::Ordering;

use berth_core::worker::{Filter, WorkerRecord, WorkerStatus};
use berth_server::metrics::{counter, gauge, sample, MetricsSource};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;

use crate::supervisor::{Host, HostView, LATENCY_BUCKETS};

impl MetricsSource for Host {
    type Collector = HostCollector;

    async fn collector(&self) -> HostCollector {
        // Usage of running workers comes from cgroup files, read off the async threads.
        let running = self
            .list(&Filter {
                statuses: vec![WorkerStatus::Running],
                ..Default::default()
            })
            .await
            .ok();
        HostCollector {
            host: self.clone(),
            running,
        }
    }
}

/// The metrics of a host daemon: its own counters and state, read while encoding, and its
/// running workers with their usage.
#[derive(Debug)]
pub struct HostCollector {
    host: Host,
    /// `None` when they could not be listed: their families are then left out.
    running: Option<Vec<WorkerRecord>>,
}

impl Collector for HostCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> fmt::Result {
        let mut workers = gauge(
            &mut enc,
            "berth_workers",
            "Workers known to this host, by status.",
        )?;
        for (status, n) in self.host.status_counts() {
            sample(&mut workers, [("status", status.as_str())], n)?;
        }
        let m = self.host.metrics();
        counter(
            &mut enc,
            "berth_launches",
            "Accepted launch requests.",
            &m.launches,
        )?;
        counter(
            &mut enc,
            "berth_launch_refusals",
            "Launches refused for lack of resources.",
            &m.launch_refusals,
        )?;
        counter(
            &mut enc,
            "berth_workers_started",
            "Workers that reached RUNNING.",
            &m.workers_started,
        )?;
        counter(
            &mut enc,
            "berth_spawn_failures",
            "Workers that failed to start.",
            &m.spawn_failures,
        )?;
        // The host counts per bucket (the last one past every bound); the encoder accumulates
        // them and writes the +Inf bucket from the total.
        let per_bucket: Vec<(f64, u64)> = LATENCY_BUCKETS
            .iter()
            .zip(&m.latency_buckets)
            .map(|(b, n)| (*b, n.load(Ordering::Relaxed)))
            .collect();
        let count = m
            .latency_buckets
            .iter()
            .map(|n| n.load(Ordering::Relaxed))
            .sum();
        enc.encode_descriptor(
            "berth_launch_latency_seconds",
            "Admission to RUNNING.",
            None,
            MetricType::Histogram,
        )?
        .encode_histogram::<NoLabelSet>(
            m.latency_sum_us.load(Ordering::Relaxed) as f64 / 1e6,
            count,
            &per_bucket,
            None,
        )?;

        let v = self.host.view();
        encode_resources(&mut enc, &v)?;
        let mut netns = gauge(
            &mut enc,
            "berth_netns_ready",
            "Network namespaces made ahead for bridge-mode workers.",
        )?;
        netns.encode_gauge(&v.netns_ready)?;
        if let Some(running) = &self.running {
            encode_running(&mut enc, running)?;
        }
        encode_gpus(&mut enc, &v)
    }
}

/// `berth_capacity` and `berth_allocated`, by resource.
fn encode_resources(enc: &mut DescriptorEncoder, v: &HostView) -> fmt::Result {
    let gib = berth_core::launch::GIB;
    let mut cap = gauge(enc, "berth_capacity", "Allocatable resources.")?;
    sample(&mut cap, [("resource", "cpu")], v.capacity.cpu)?;
    let memory_gb = v.capacity.memory_bytes as f64 / gib;
    sample(&mut cap, [("resource", "memory_gb")], memory_gb)?;
    sample(&mut cap, [("resource", "workers")], v.capacity.workers)?;
    sample(&mut cap, [("resource", "gpus")], v.gpu_capacity)?;
    sample(&mut cap, [("resource", "ips")], v.ip_capacity)?;
    let mut alloc = gauge(enc, "berth_allocated", "Resources held by live workers.")?;
    sample(&mut alloc, [("resource", "cpu")], v.allocated.cpu)?;
    let memory_gb = v.allocated.memory_bytes as f64 / gib;
    sample(&mut alloc, [("resource", "memory_gb")], memory_gb)?;
    sample(&mut alloc, [("resource", "workers")], v.allocated.workers)?;
    sample(&mut alloc, [("resource", "gpus")], v.gpu_allocated)?;
    sample(&mut alloc, [("resource", "ips")], v.ip_leases)
}

/// Usage gauges of running workers, labelled by worker.
fn encode_running(enc: &mut DescriptorEncoder, running: &[WorkerRecord]) -> fmt::Result {
    let worker = |w: &WorkerRecord| [("worker", w.id.clone())];
    let mut cpu = gauge(
        enc,
        "berth_worker_cpu_seconds",
        "CPU time of a running worker.",
    )?;
    for w in running {
        sample(&mut cpu, worker(w), w.cpu_seconds)?;
    }
    let mut peak = gauge(
        enc,
        "berth_worker_memory_peak_bytes",
        "Peak memory of a running worker.",
    )?;
    for w in running {
        sample(&mut peak, worker(w), w.memory_peak_bytes)?;
    }
    let mut gpu_mem = gauge(
        enc,
        "berth_worker_gpu_memory_used_bytes",
        "GPU memory used by a running worker's processes.",
    )?;
    for w in running.iter().filter(|w| !w.gpu_uuids.is_empty()) {
        sample(&mut gpu_mem, worker(w), w.gpu_memory_used_bytes)?;
    }
    Ok(())
}

/// Per-GPU gauges: telemetry, who holds each GPU, and processes outside any live worker.
fn encode_gpus(enc: &mut DescriptorEncoder, v: &HostView) -> fmt::Result {
    let gpu = |g: &crate::supervisor::GpuView| {
        [
            ("gpu", g.device.index.to_string()),
            ("uuid", g.device.uuid.clone()),
        ]
    };
    let mut util = gauge(
        enc,
        "berth_gpu_utilization_percent",
        "Percent of time a kernel ran on the GPU over the last sample period.",
    )?;
    for g in &v.gpus {
        let pct = g.sample.as_ref().map_or(0, |s| s.utilization_percent);
        sample(&mut util, gpu(g), pct)?;
    }
    let mut used = gauge(enc, "berth_gpu_memory_used_bytes", "GPU memory in use.")?;
    for g in &v.gpus {
        let bytes = g.sample.as_ref().map_or(0, |s| s.memory_used_bytes);
        sample(&mut used, gpu(g), bytes)?;
    }
    let mut total = gauge(enc, "berth_gpu_memory_total_bytes", "GPU memory installed.")?;
    for g in &v.gpus {
        sample(&mut total, gpu(g), g.device.memory_total_bytes)?;
    }
    let mut held = gauge(
        enc,
        "berth_gpu_allocated",
        "1 while a worker holds the GPU (label worker), else 0.",
    )?;
    for g in &v.gpus {
        let [index, uuid] = gpu(g);
        let holder = ("worker", g.holder.clone().unwrap_or_default());
        sample(
            &mut held,
            [index, uuid, holder],
            u32::from(g.holder.is_some()),
        )?;
    }
    let mut stray = gauge(
        enc,
        "berth_gpu_stray_processes",
        "Compute processes on the GPU that belong to no live worker of this host.",
    )?;
    for g in &v.gpus {
        sample(&mut stray, gpu(g), g.stray_pids.len())?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use berth_core::admission::Capacity;
    use berth_server::metrics::{encode, family};
    use berth_sys::gpu::{FakeGpus, GpuMonitor};

    use super::*;
    use crate::supervisor::HostOptions;

    fn host() -> Host {
        let capacity = Capacity {
            cpu: 4.0,
            memory_bytes: 8 << 30,
            workers: 16,
        };
        let dir = std::env::temp_dir().join("berth-metrics-test");
        let world = berth_sys::fake::FakeWorld::new();
        Host::with_gpus(
            HostOptions::with_defaults("m1", &dir, capacity),
            world.cgroups(),
            world.spawner(),
            None,
            Arc::new(FakeGpus::new("m1", 2)),
            GpuMonitor::idle(),
        )
    }

    #[tokio::test]
    async fn a_host_s_metrics_keep_their_names_types_and_values() {
        let h = host();
        let m = h.metrics();
        m.launches.fetch_add(3, Ordering::Relaxed);
        m.latency_buckets[0].fetch_add(1, Ordering::Relaxed);
        m.latency_buckets[3].fetch_add(2, Ordering::Relaxed);
        m.latency_buckets[LATENCY_BUCKETS.len()].fetch_add(1, Ordering::Relaxed);
        m.latency_sum_us.fetch_add(7_500_000, Ordering::Relaxed);
        let text = encode(h.collector().await).unwrap();

        assert_eq!(
            family(&text, "berth_launches_total"),
            [
                "# TYPE berth_launches_total counter",
                "berth_launches_total 3"
            ],
            "{text}"
        );
        assert_eq!(
            family(&text, "berth_launch_latency_seconds"),
            [
                "# TYPE berth_launch_latency_seconds histogram",
                "berth_launch_latency_seconds_bucket{le=\"0.001\"} 1",
                "berth_launch_latency_seconds_bucket{le=\"0.002\"} 1",
                "berth_launch_latency_seconds_bucket{le=\"0.005\"} 1",
                "berth_launch_latency_seconds_bucket{le=\"0.01\"} 3",
                "berth_launch_latency_seconds_bucket{le=\"0.02\"} 3",
                "berth_launch_latency_seconds_bucket{le=\"0.05\"} 3",
                "berth_launch_latency_seconds_bucket{le=\"0.1\"} 3",
                "berth_launch_latency_seconds_bucket{le=\"0.25\"} 3",
                "berth_launch_latency_seconds_bucket{le=\"1\"} 3",
                "berth_launch_latency_seconds_bucket{le=\"5\"} 3",
                "berth_launch_latency_seconds_bucket{le=\"+Inf\"} 4",
                "berth_launch_latency_seconds_sum 7.5",
                "berth_launch_latency_seconds_count 4",
            ],
            "{text}"
        );
        let workers = family(&text, "berth_workers");
        assert_eq!(workers[0], "# TYPE berth_workers gauge");
        assert!(workers.contains(&"berth_workers{status=\"RUNNING\"} 0"));
        assert_eq!(
            family(&text, "berth_capacity"),
            [
                "# TYPE berth_capacity gauge",
                "berth_capacity{resource=\"cpu\"} 4.0",
                "berth_capacity{resource=\"memory_gb\"} 8.0",
                "berth_capacity{resource=\"workers\"} 16",
                "berth_capacity{resource=\"gpus\"} 2",
                "berth_capacity{resource=\"ips\"} 0",
            ],
            "{text}"
        );
        let uuid = berth_sys::gpu::fake_uuid("m1", 1);
        assert!(
            family(&text, "berth_gpu_allocated").contains(
                &format!("berth_gpu_allocated{{gpu=\"1\",uuid=\"{uuid}\",worker=\"\"}} 0").as_str()
            ),
            "{text}"
        );
        // Every family, each once, in the order berthd has always exposed them.
        let names: Vec<&str> = text
            .lines()
            .filter_map(|l| l.strip_prefix("# TYPE "))
            .collect();
        assert_eq!(
            names,
            [
                "berth_workers gauge",
                "berth_launches_total counter",
                "berth_launch_refusals_total counter",
                "berth_workers_started_total counter",
                "berth_spawn_failures_total counter",
                "berth_launch_latency_seconds histogram",
                "berth_capacity gauge",
                "berth_allocated gauge",
                "berth_netns_ready gauge",
                "berth_worker_cpu_seconds gauge",
                "berth_worker_memory_peak_bytes gauge",
                "berth_worker_gpu_memory_used_bytes gauge",
                "berth_gpu_utilization_percent gauge",
                "berth_gpu_memory_used_bytes gauge",
                "berth_gpu_memory_total_bytes gauge",
                "berth_gpu_allocated gauge",
                "berth_gpu_stray_processes gauge",
            ]
        );
        assert!(!text.contains("# EOF"), "{text}");
    }
}
