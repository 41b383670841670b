//! What `pulses serve` counts, as prometheus-client metrics: requests by route, method
//! and status, their latency, pulses accepted and rejected, and producer errors.

use std::sync::Arc;
use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::middleware::Next;
use axum::response::Response;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub route: String,
    pub method: String,
    pub status: u16,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabels {
    pub route: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: String,
}

type LatencyFamily = Family<RouteLabels, Histogram, fn() -> Histogram>;

/// The serve metrics; clones share the same series.
#[derive(Debug, Clone)]
pub struct ServeMetrics {
    pub requests: Family<RequestLabels, Counter>,
    pub latency: LatencyFamily,
    pub pulses_accepted: Counter,
    /// CloudEvents `POST /api/v1/events` answered 204 for.
    pub events_accepted: Counter,
    pub pulses_rejected: Family<ReasonLabels, Counter>,
    pub producer_errors: Counter,
    pub in_flight: Gauge,
}

/// The views' lags and reads, read at scrape time.
#[derive(Debug)]
struct ViewMetrics(Arc<super::view::UsageView>, Arc<super::view::ChargesView>);

impl prometheus_client::collector::Collector for ViewMetrics {
    fn encode(&self, mut e: prometheus_client::encoding::DescriptorEncoder) -> std::fmt::Result {
        use prometheus_client::encoding::EncodeMetric;
        use prometheus_client::metrics::counter::ConstCounter;
        use prometheus_client::metrics::gauge::ConstGauge;
        let as_of = self.0.as_of();
        let lag = ConstGauge::new(as_of.lag);
        lag.encode(e.encode_descriptor("pulses_view_lag", "Aggregate records the usage view has yet to read (all partitions).", None, lag.metric_type())?)?;
        let at = ConstGauge::new(as_of.updated_at_ms as f64 / 1000.0);
        at.encode(e.encode_descriptor("pulses_view_updated_at_seconds", "When the usage view's lag was last measured (Unix time).", None, at.metric_type())?)?;
        let read = ConstCounter::new(self.0.records_read.load(std::sync::atomic::Ordering::Relaxed));
        read.encode(e.encode_descriptor("pulses_view_records_read", "Aggregate records the usage view read since this process started (a restart resumes from stored positions).", None, read.metric_type())?)?;
        let lag = ConstGauge::new(self.1.as_of().lag);
        lag.encode(e.encode_descriptor("pulses_charges_view_lag", "Charge records the charges view has yet to read (all partitions).", None, lag.metric_type())?)?;
        let mut memory = e.encode_descriptor(
            "pulses_view_memory_bytes",
            "Memory a view's RocksDB store holds, by view and kind: memtables and block cache (bounded by configuration), table readers' index and filter blocks (grow with the data).",
            None,
            prometheus_client::metrics::MetricType::Gauge,
        )?;
        for (view, kinds) in [("usage", self.0.memory()), ("charges", self.1.memory())] {
            for (kind, bytes) in kinds {
                let labels = [("view", view), ("kind", kind)];
                ConstGauge::new(bytes as i64).encode(memory.encode_family(&labels)?)?;
            }
        }
        Ok(())
    }
}

fn latency_histogram() -> Histogram {
    // 1 ms to about 16 s.
    Histogram::new(exponential_buckets(0.001, 2.0, 15))
}

impl ServeMetrics {
    /// New metrics, registered in `registry`.
    pub fn register(registry: &mut Registry, view: Arc<super::view::UsageView>, charges: Arc<super::view::ChargesView>) -> Self {
        let m = Self {
            requests: Family::default(),
            latency: Family::new_with_constructor(latency_histogram as fn() -> Histogram),
            pulses_accepted: Counter::default(),
            events_accepted: Counter::default(),
            pulses_rejected: Family::default(),
            producer_errors: Counter::default(),
            in_flight: Gauge::default(),
        };
        registry.register("pulses_http_requests", "HTTP requests answered, by route template, method and status.", m.requests.clone());
        registry.register("pulses_http_request_duration_seconds", "Time to answer an HTTP request, by route template.", m.latency.clone());
        registry.register("pulses_http_requests_in_flight", "HTTP requests being answered now.", m.in_flight.clone());
        registry.register(
            "pulses_ingest_pulses_accepted",
            "Pulses POST /v1/pulses answered 202 for: the broker acknowledged each.",
            m.pulses_accepted.clone(),
        );
        registry.register(
            "pulses_ingest_events_accepted",
            "CloudEvents POST /api/v1/events answered 204 for: the broker acknowledged each.",
            m.events_accepted.clone(),
        );
        registry.register(
            "pulses_ingest_pulses_rejected",
            "Invalid pulses POST /v1/pulses refused (400), by reason (the DLQ reasons).",
            m.pulses_rejected.clone(),
        );
        registry.register(
            "pulses_ingest_producer_errors",
            "Requests answered 503 because the broker did not acknowledge their pulses (failed, or not in time).",
            m.producer_errors.clone(),
        );
        registry.register_collector(Box::new(ViewMetrics(view, charges)));
        m
    }
}

/// Middleware: counts and times every request under its route template.
pub async fn track(State(metrics): State<Arc<ServeMetrics>>, request: Request, next: Next) -> Response {
    let route = request.extensions().get::<MatchedPath>().map_or("unmatched", |p| p.as_str()).to_owned();
    let method = request.method().as_str().to_owned();
    let started = Instant::now();
    metrics.in_flight.inc();
    let response = next.run(request).await;
    metrics.in_flight.dec();
    metrics.latency.get_or_create(&RouteLabels { route: route.clone() }).observe(started.elapsed().as_secs_f64());
    metrics.requests.get_or_create(&RequestLabels { route, method, status: response.status().as_u16() }).inc();
    response
}
