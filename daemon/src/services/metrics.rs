//! The Prometheus metrics of berthd and berth-scheduler, served over HTTP at `GET /metrics`.
//!
//! Nothing is registered ahead of time: each scrape asks the daemon ([`MetricsSource`]) for a
//! prometheus-client [`Collector`] over its live state (worker counts, the daemon's own atomic
//! counters, capacity, usage of running workers, GPU telemetry), which is encoded in the
//! Prometheus text format 0.0.4, the format `/metrics` has always had (no OpenMetrics `# EOF`,
//! counters described under their `_total` name). Both daemons' metrics are defined here, so
//! the names operators rely on sit in one file.

use std::fmt;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};

use axum::extract::State;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use berth_proto::v1 as pb;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{
    prometheus_text, DescriptorEncoder, EncodeGaugeValue, EncodeLabelSet, EncodeMetric,
    MetricEncoder, NoLabelSet,
};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use super::host::{Host, HostView, LATENCY_BUCKETS};
use super::scheduler::Scheduler;
use crate::core::worker::{Filter, WorkerRecord, WorkerStatus};

/// A daemon whose state `/metrics` shows.
pub trait MetricsSource: Clone + Send + Sync + 'static {
    /// What one scrape encodes.
    type Collector: Collector;

    /// The collector of one scrape, with whatever must be awaited already gathered: encoding is
    /// synchronous.
    fn collector(&self) -> impl Future<Output = Self::Collector> + Send;
}

/// Encodes `collector` in the Prometheus text format.
pub fn encode(collector: impl Collector) -> Result<String, fmt::Error> {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(collector));
    let mut out = String::new();
    prometheus_text::encode(&mut out, &registry)?;
    Ok(out)
}

/// Serves `GET /metrics` from `source` on `listener` until `shutdown`; any other path is 404.
pub async fn serve<S: MetricsSource>(
    listener: TcpListener,
    source: S,
    shutdown: CancellationToken,
) {
    let app = axum::Router::new()
        .route("/metrics", axum::routing::get(scrape::<S>))
        .fallback(|| async { (StatusCode::NOT_FOUND, "not found; try /metrics\n") })
        .layer(axum::middleware::map_response(close_after))
        .with_state(source);
    if let Err(e) = axum::serve(listener, app)
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await
    {
        tracing::warn!(error = %e, "metrics server");
    }
}

async fn scrape<S: MetricsSource>(State(source): State<S>) -> Response {
    match encode(source.collector().await) {
        Ok(body) => (
            [(header::CONTENT_TYPE, prometheus_text::CONTENT_TYPE)],
            body,
        )
            .into_response(),
        Err(e) => {
            tracing::warn!(error = %e, "encode metrics");
            StatusCode::INTERNAL_SERVER_ERROR.into_response()
        }
    }
}

/// One answer per connection, as `/metrics` always did: scripts read the answer to EOF.
async fn close_after(mut r: Response) -> Response {
    r.headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    r
}

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
    let gib = crate::core::launch::GIB;
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
    let gpu = |g: &super::host::GpuView| {
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

/// A counter read from one of the daemon's atomics; `name` without `_total`, which the encoder
/// appends.
fn counter(enc: &mut DescriptorEncoder, name: &str, help: &str, v: &AtomicU64) -> fmt::Result {
    ConstCounter::new(v.load(Ordering::Relaxed)).encode(enc.encode_descriptor(
        name,
        help,
        None,
        MetricType::Counter,
    )?)
}

/// The family of gauge `name`; its samples follow.
fn gauge<'a>(
    enc: &'a mut DescriptorEncoder,
    name: &'a str,
    help: &str,
) -> Result<MetricEncoder<'a>, fmt::Error> {
    enc.encode_descriptor(name, help, None, MetricType::Gauge)
}

/// One labelled sample of a gauge family.
fn sample(
    family: &mut MetricEncoder,
    labels: impl EncodeLabelSet,
    v: impl EncodeGaugeValue,
) -> fmt::Result {
    family.encode_family(&labels)?.encode_gauge(&v)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::sync::Arc;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;
    use crate::core::admission::Capacity;
    use crate::services::host::HostOptions;
    use crate::services::scheduler::fake::{FakeCluster, FakeConnector};
    use crate::services::scheduler::SchedulerOptions;
    use crate::sys::gpu::{FakeGpus, GpuMonitor};

    fn host() -> Host {
        let capacity = Capacity {
            cpu: 4.0,
            memory_bytes: 8 << 30,
            workers: 16,
        };
        let dir = std::env::temp_dir().join("berth-metrics-test");
        let world = crate::sys::fake::FakeWorld::new();
        Host::with_gpus(
            HostOptions::with_defaults("m1", &dir, capacity),
            world.cgroups(),
            world.spawner(),
            None,
            Arc::new(FakeGpus::new("m1", 2)),
            GpuMonitor::idle(),
        )
    }

    /// The `# TYPE` line and the samples of family `name` (under its `# HELP`).
    fn family<'a>(text: &'a str, name: &str) -> Vec<&'a str> {
        let head = format!("# HELP {name} ");
        text.lines()
            .skip_while(|l| !l.starts_with(&head))
            .skip(1)
            .take_while(|l| !l.starts_with("# HELP"))
            .collect()
    }

    fn help_of<'a>(text: &'a str, name: &str) -> &'a str {
        let head = format!("# HELP {name} ");
        text.lines()
            .find_map(|l| l.strip_prefix(head.as_str()))
            .unwrap_or_else(|| panic!("no {name} in\n{text}"))
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
        let uuid = crate::sys::gpu::fake_uuid("m1", 1);
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

    /// The whole answer to `request`, read to EOF (the server closes after one answer).
    async fn ask(addr: std::net::SocketAddr, request: &str) -> String {
        let mut c = tokio::net::TcpStream::connect(addr).await.unwrap();
        c.write_all(request.as_bytes()).await.unwrap();
        let mut out = String::new();
        tokio::time::timeout(
            std::time::Duration::from_secs(10),
            c.read_to_string(&mut out),
        )
        .await
        .expect("the server closes the connection after its answer")
        .unwrap();
        out
    }

    #[tokio::test]
    async fn metrics_are_served_at_their_path_only_until_shutdown() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let shutdown = CancellationToken::new();
        let server = tokio::spawn(serve(l, host(), shutdown.clone()));

        let ok = ask(addr, "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").await;
        assert!(ok.starts_with("HTTP/1.1 200 OK\r\n"), "{ok}");
        assert!(
            ok.contains("content-type: text/plain; version=0.0.4; charset=utf-8\r\n"),
            "{ok}"
        );
        assert!(ok.contains("\nberth_launches_total 0\n"), "{ok}");
        let query = ask(addr, "GET /metrics?x=1 HTTP/1.0\r\n\r\n").await;
        assert!(query.starts_with("HTTP/1.0 200 OK\r\n"), "{query}");
        let missing = ask(addr, "GET /nope HTTP/1.1\r\nHost: x\r\n\r\n").await;
        assert!(
            missing.starts_with("HTTP/1.1 404 Not Found\r\n"),
            "{missing}"
        );
        assert!(missing.ends_with("not found; try /metrics\n"), "{missing}");

        shutdown.cancel();
        tokio::time::timeout(std::time::Duration::from_secs(5), server)
            .await
            .expect("the server stops at shutdown")
            .unwrap();
    }
}
