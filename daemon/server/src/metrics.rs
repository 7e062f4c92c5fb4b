//! The Prometheus metrics of berthd and berth-scheduler, served over HTTP at `GET /metrics`.
//!
//! Nothing is registered ahead of time: each scrape asks the daemon ([`MetricsSource`]) for a
//! prometheus-client [`Collector`] over its live state (worker counts, the daemon's own atomic
//! counters, capacity, usage of running workers, GPU telemetry), which is encoded in the
//! Prometheus text format 0.0.4, the format `/metrics` has always had (no OpenMetrics `# EOF`,
//! counters described under their `_total` name). Each daemon defines its own
//! collector (berth-host's `metrics`, berth-scheduler's `metrics`) with these helpers.

use std::fmt;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};

use axum::extract::State;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{
    prometheus_text, DescriptorEncoder, EncodeGaugeValue, EncodeLabelSet, EncodeMetric,
    MetricEncoder,
};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

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

/// A counter read from one of the daemon's atomics; `name` without `_total`, which the encoder
/// appends.
pub fn counter(enc: &mut DescriptorEncoder, name: &str, help: &str, v: &AtomicU64) -> fmt::Result {
    ConstCounter::new(v.load(Ordering::Relaxed)).encode(enc.encode_descriptor(
        name,
        help,
        None,
        MetricType::Counter,
    )?)
}

/// The family of gauge `name`; its samples follow.
pub fn gauge<'a>(
    enc: &'a mut DescriptorEncoder,
    name: &'a str,
    help: &str,
) -> Result<MetricEncoder<'a>, fmt::Error> {
    enc.encode_descriptor(name, help, None, MetricType::Gauge)
}

/// One labelled sample of a gauge family.
pub fn sample(
    family: &mut MetricEncoder,
    labels: impl EncodeLabelSet,
    v: impl EncodeGaugeValue,
) -> fmt::Result {
    family.encode_family(&labels)?.encode_gauge(&v)
}

/// The `# TYPE` line and the samples of family `name` (under its `# HELP`), for tests of
/// collectors.
pub fn family<'a>(text: &'a str, name: &str) -> Vec<&'a str> {
    let head = format!("# HELP {name} ");
    text.lines()
        .skip_while(|l| !l.starts_with(&head))
        .skip(1)
        .take_while(|l| !l.starts_with("# HELP"))
        .collect()
}

/// The help text of family `name`, for tests of collectors.
pub fn help_of<'a>(text: &'a str, name: &str) -> &'a str {
    let head = format!("# HELP {name} ");
    text.lines()
        .find_map(|l| l.strip_prefix(head.as_str()))
        .unwrap_or_else(|| panic!("no {name} in\n{text}"))
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    /// A daemon with one counter.
    #[derive(Clone)]
    struct One;

    #[derive(Debug)]
    struct OneCollector;

    impl Collector for OneCollector {
        fn encode(&self, mut enc: DescriptorEncoder) -> fmt::Result {
            counter(
                &mut enc,
                "berth_launches",
                "Accepted launch requests.",
                &AtomicU64::new(0),
            )
        }
    }

    impl MetricsSource for One {
        type Collector = OneCollector;

        async fn collector(&self) -> OneCollector {
            OneCollector
        }
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
        let server = tokio::spawn(serve(l, One, shutdown.clone()));

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
