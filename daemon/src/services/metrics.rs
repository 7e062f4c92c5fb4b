//! Prometheus text exposition of a host's workers over plain HTTP (`GET /metrics`).

use std::fmt::Write as _;
use std::sync::atomic::Ordering;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use super::host::{Host, LATENCY_BUCKETS};

/// Renders the metrics of `host` in the Prometheus text format.
pub async fn render(host: &Host) -> String {
    let mut s = String::new();
    let m = host.metrics();
    let _ = writeln!(
        s,
        "# HELP berth_workers Workers known to this host, by status."
    );
    let _ = writeln!(s, "# TYPE berth_workers gauge");
    for (status, n) in host.status_counts() {
        let _ = writeln!(s, "berth_workers{{status=\"{}\"}} {n}", status.as_str());
    }
    let counters = [
        (
            "berth_launches_total",
            "Accepted launch requests.",
            &m.launches,
        ),
        (
            "berth_launch_refusals_total",
            "Launches refused for lack of resources.",
            &m.launch_refusals,
        ),
        (
            "berth_workers_started_total",
            "Workers that reached RUNNING.",
            &m.workers_started,
        ),
        (
            "berth_spawn_failures_total",
            "Workers that failed to start.",
            &m.spawn_failures,
        ),
    ];
    for (name, help, v) in counters {
        let _ = writeln!(
            s,
            "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}",
            v.load(Ordering::Relaxed)
        );
    }
    let _ = writeln!(
        s,
        "# HELP berth_launch_latency_seconds Admission to RUNNING."
    );
    let _ = writeln!(s, "# TYPE berth_launch_latency_seconds histogram");
    let mut cum = 0;
    for (i, b) in LATENCY_BUCKETS.iter().enumerate() {
        cum += m.latency_buckets[i].load(Ordering::Relaxed);
        let _ = writeln!(s, "berth_launch_latency_seconds_bucket{{le=\"{b}\"}} {cum}");
    }
    cum += m.latency_buckets[LATENCY_BUCKETS.len()].load(Ordering::Relaxed);
    let _ = writeln!(
        s,
        "berth_launch_latency_seconds_bucket{{le=\"+Inf\"}} {cum}"
    );
    let _ = writeln!(
        s,
        "berth_launch_latency_seconds_sum {}",
        m.latency_sum_us.load(Ordering::Relaxed) as f64 / 1e6
    );
    let _ = writeln!(s, "berth_launch_latency_seconds_count {cum}");
    let v = host.view();
    let gib = crate::core::launch::GIB;
    let _ = writeln!(
        s,
        "# HELP berth_capacity Allocatable resources.\n# TYPE berth_capacity gauge"
    );
    let _ = writeln!(s, "berth_capacity{{resource=\"cpu\"}} {}", v.capacity.cpu);
    let _ = writeln!(
        s,
        "berth_capacity{{resource=\"memory_gb\"}} {}",
        v.capacity.memory_bytes as f64 / gib
    );
    let _ = writeln!(
        s,
        "berth_capacity{{resource=\"workers\"}} {}",
        v.capacity.workers
    );
    let _ = writeln!(s, "berth_capacity{{resource=\"gpus\"}} {}", v.gpu_capacity);
    let _ = writeln!(s, "berth_capacity{{resource=\"ips\"}} {}", v.ip_capacity);
    let _ = writeln!(
        s,
        "# HELP berth_allocated Resources held by live workers.\n# TYPE berth_allocated gauge"
    );
    let _ = writeln!(s, "berth_allocated{{resource=\"cpu\"}} {}", v.allocated.cpu);
    let _ = writeln!(
        s,
        "berth_allocated{{resource=\"memory_gb\"}} {}",
        v.allocated.memory_bytes as f64 / gib
    );
    let _ = writeln!(
        s,
        "berth_allocated{{resource=\"workers\"}} {}",
        v.allocated.workers
    );
    let _ = writeln!(
        s,
        "berth_allocated{{resource=\"gpus\"}} {}",
        v.gpu_allocated
    );
    let _ = writeln!(s, "berth_allocated{{resource=\"ips\"}} {}", v.ip_leases);
    let _ = writeln!(
        s,
        "# HELP berth_netns_ready Network namespaces made ahead for bridge-mode workers.\n# TYPE berth_netns_ready gauge\nberth_netns_ready {}",
        v.netns_ready
    );
    if let Ok(live) = host
        .list(&crate::core::worker::Filter {
            statuses: vec![crate::core::worker::WorkerStatus::Running],
            ..Default::default()
        })
        .await
    {
        let _ = writeln!(s, "# HELP berth_worker_cpu_seconds CPU time of a running worker.\n# TYPE berth_worker_cpu_seconds gauge");
        for w in &live {
            let _ = writeln!(
                s,
                "berth_worker_cpu_seconds{{worker=\"{}\"}} {}",
                w.id, w.cpu_seconds
            );
        }
        let _ = writeln!(s, "# HELP berth_worker_memory_peak_bytes Peak memory of a running worker.\n# TYPE berth_worker_memory_peak_bytes gauge");
        for w in &live {
            let _ = writeln!(
                s,
                "berth_worker_memory_peak_bytes{{worker=\"{}\"}} {}",
                w.id, w.memory_peak_bytes
            );
        }
        let _ = writeln!(s, "# HELP berth_worker_gpu_memory_used_bytes GPU memory used by a running worker's processes.\n# TYPE berth_worker_gpu_memory_used_bytes gauge");
        for w in live.iter().filter(|w| !w.gpu_uuids.is_empty()) {
            let _ = writeln!(
                s,
                "berth_worker_gpu_memory_used_bytes{{worker=\"{}\"}} {}",
                w.id, w.gpu_memory_used_bytes
            );
        }
    }
    render_gpus(&mut s, &v);
    s
}

/// Per-GPU gauges: telemetry, who holds each GPU, and processes outside any live worker.
fn render_gpus(s: &mut String, v: &super::host::HostView) {
    let gauges: [(&str, &str); 5] = [
        (
            "berth_gpu_utilization_percent",
            "Percent of time a kernel ran on the GPU over the last sample period.",
        ),
        ("berth_gpu_memory_used_bytes", "GPU memory in use."),
        ("berth_gpu_memory_total_bytes", "GPU memory installed."),
        (
            "berth_gpu_allocated",
            "1 while a worker holds the GPU (label worker), else 0.",
        ),
        (
            "berth_gpu_stray_processes",
            "Compute processes on the GPU that belong to no live worker of this host.",
        ),
    ];
    for (i, (name, help)) in gauges.iter().enumerate() {
        let _ = writeln!(s, "# HELP {name} {help}\n# TYPE {name} gauge");
        for g in &v.gpus {
            let labels = format!("gpu=\"{}\",uuid=\"{}\"", g.device.index, g.device.uuid);
            let sample = g.sample.as_ref();
            let _ = match i {
                0 => writeln!(
                    s,
                    "{name}{{{labels}}} {}",
                    sample.map_or(0, |x| x.utilization_percent)
                ),
                1 => writeln!(
                    s,
                    "{name}{{{labels}}} {}",
                    sample.map_or(0, |x| x.memory_used_bytes)
                ),
                2 => writeln!(s, "{name}{{{labels}}} {}", g.device.memory_total_bytes),
                3 => writeln!(
                    s,
                    "{name}{{{labels},worker=\"{}\"}} {}",
                    g.holder.as_deref().unwrap_or(""),
                    u8::from(g.holder.is_some())
                ),
                _ => writeln!(s, "{name}{{{labels}}} {}", g.stray_pids.len()),
            };
        }
    }
}

/// Serves `/metrics` on `listener` until `shutdown`, each answer rendered by `render`.
pub async fn serve_with<F, Fut>(listener: TcpListener, render: F, shutdown: CancellationToken)
where
    F: Fn() -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = String> + Send + 'static,
{
    let render = std::sync::Arc::new(render);
    loop {
        let (mut conn, _) = tokio::select! {
            c = listener.accept() => match c {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, "metrics accept");
                    continue;
                }
            },
            _ = shutdown.cancelled() => return,
        };
        let render = render.clone();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 4096];
            let mut n = 0;
            // Read the request head (bounded); only the request line matters.
            while n < buf.len() {
                match tokio::time::timeout(
                    std::time::Duration::from_secs(5),
                    conn.read(&mut buf[n..]),
                )
                .await
                {
                    Ok(Ok(0)) | Err(_) | Ok(Err(_)) => break,
                    Ok(Ok(k)) => {
                        n += k;
                        if buf[..n].windows(4).any(|w| w == b"\r\n\r\n") {
                            break;
                        }
                    }
                }
            }
            let head = String::from_utf8_lossy(&buf[..n]);
            let path = head.split_whitespace().nth(1).unwrap_or("");
            let (status, body) = if path == "/metrics" || path.starts_with("/metrics?") {
                ("200 OK", render().await)
            } else {
                ("404 Not Found", "not found; try /metrics\n".to_owned())
            };
            let resp = format!(
                "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = conn.write_all(resp.as_bytes()).await;
        });
    }
}
