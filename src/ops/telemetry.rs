//! Logs and traces. Logs go to stderr, human-readable or JSON. When an OTLP endpoint is
//! configured (`--otlp-endpoint` / `OTEL_EXPORTER_OTLP_ENDPOINT`), spans (one per batch
//! and per transaction, not per record) and the main counters are also exported over
//! OTLP/HTTP (protobuf) to `<endpoint>/v1/traces` and `<endpoint>/v1/metrics`. Without
//! one, nothing OpenTelemetry runs: no exporter, no threads, no log lines.

use std::sync::Arc;
use std::time::Duration;

use opentelemetry::metrics::Meter;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry::KeyValue;
use opentelemetry_otlp::{Protocol, WithExportConfig};
use opentelemetry_sdk::metrics::{PeriodicReader, SdkMeterProvider};
use opentelemetry_sdk::trace::SdkTracerProvider;
use opentelemetry_sdk::Resource;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

use super::metrics::{get, Metrics};
use crate::pulse::RejectReason;

/// How often metrics are pushed over OTLP.
const METRICS_INTERVAL: Duration = Duration::from_secs(10);
/// Longest an OTLP request may take.
const EXPORT_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("OTLP exporter for {endpoint}: {source}")]
    Exporter { endpoint: String, source: opentelemetry_otlp::ExporterBuildError },
}

/// Keeps the exporters alive; dropping it flushes what is buffered.
#[derive(Default)]
pub struct Telemetry {
    tracer: Option<SdkTracerProvider>,
    meter: Option<SdkMeterProvider>,
}

impl Telemetry {
    /// Whether spans and metrics are exported.
    pub fn exporting(&self) -> bool {
        self.tracer.is_some()
    }

}

/// Exports the counters of `metrics` (read at each export) over OTLP when [`init`]
/// set up an exporter; does nothing otherwise.
pub fn export_metrics(metrics: &Arc<Metrics>) {
    if EXPORTING.load(std::sync::atomic::Ordering::Acquire) {
        register_instruments(&opentelemetry::global::meter("pulses"), metrics);
    }
}

/// Set once [`init`] installed the OTLP exporters.
static EXPORTING: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

impl Drop for Telemetry {
    fn drop(&mut self) {
        if let Some(t) = self.tracer.take() {
            let _ = t.shutdown();
        }
        if let Some(m) = self.meter.take() {
            let _ = m.shutdown();
        }
    }
}

/// Installs the global subscriber: the log layer (`json` or text) filtered by RUST_LOG
/// (default `info`), plus the OpenTelemetry layer when `otlp_endpoint` is set.
pub fn init(json: bool, otlp_endpoint: Option<&str>) -> Result<Telemetry, TelemetryError> {
    use std::io::IsTerminal;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    // Colours only for a person at a terminal, never into files or log pipelines.
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr).with_ansi(std::io::stderr().is_terminal());
    let logs = if json { fmt.json().boxed() } else { fmt.boxed() };
    let mut telemetry = Telemetry::default();
    let otel = match otlp_endpoint.map(str::trim).filter(|e| !e.is_empty()) {
        Some(endpoint) => {
            let (tracer, meter) = providers(endpoint)?;
            let layer = tracing_opentelemetry::layer().with_tracer(tracer.tracer("pulses"));
            opentelemetry::global::set_meter_provider(meter.clone());
            EXPORTING.store(true, std::sync::atomic::Ordering::Release);
            telemetry = Telemetry { tracer: Some(tracer), meter: Some(meter) };
            Some(layer)
        }
        None => None,
    };
    // A second init (tests calling main twice) keeps the first subscriber.
    let _ = tracing_subscriber::registry().with(filter).with(logs).with(otel).try_init();
    if let Some(endpoint) = otlp_endpoint.filter(|_| telemetry.exporting()) {
        tracing::info!(endpoint, "exporting traces and metrics over OTLP/HTTP");
    }
    Ok(telemetry)
}

fn providers(endpoint: &str) -> Result<(SdkTracerProvider, SdkMeterProvider), TelemetryError> {
    let base = endpoint.trim_end_matches('/');
    let err = |source| TelemetryError::Exporter { endpoint: base.to_owned(), source };
    let resource = Resource::builder().with_service_name(service_name()).build();
    let spans = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_protocol(Protocol::HttpBinary)
        .with_endpoint(format!("{base}/v1/traces"))
        .with_timeout(EXPORT_TIMEOUT)
        .build()
        .map_err(err)?;
    let tracer = SdkTracerProvider::builder().with_batch_exporter(spans).with_resource(resource.clone()).build();
    let metrics = opentelemetry_otlp::MetricExporter::builder()
        .with_http()
        .with_protocol(Protocol::HttpBinary)
        .with_endpoint(format!("{base}/v1/metrics"))
        .with_timeout(EXPORT_TIMEOUT)
        .build()
        .map_err(err)?;
    let reader = PeriodicReader::builder(metrics).with_interval(METRICS_INTERVAL).build();
    let meter = SdkMeterProvider::builder().with_reader(reader).with_resource(resource).build();
    Ok((tracer, meter))
}

/// `OTEL_SERVICE_NAME` if set, else `pulses`.
fn service_name() -> String {
    std::env::var("OTEL_SERVICE_NAME").ok().filter(|s| !s.is_empty()).unwrap_or_else(|| "pulses".into())
}

/// Observable instruments over the process counters: read at each export, so the
/// stages pay nothing extra.
fn register_instruments(meter: &Meter, metrics: &Arc<Metrics>) {
    let m = Arc::clone(metrics);
    let _ = meter
        .u64_observable_counter("pulses.records.consumed")
        .with_description("Records read from the stage's input topic")
        .with_callback(move |o| {
            o.observe(get(&m.group.consumed), &[KeyValue::new("stage", "group")]);
            o.observe(get(&m.aggregate.consumed), &[KeyValue::new("stage", "aggregate")]);
        })
        .build();
    let m = Arc::clone(metrics);
    let _ = meter
        .u64_observable_counter("pulses.records.produced")
        .with_description("Records a stage wrote to its main output topic")
        .with_callback(move |o| {
            o.observe(get(&m.group.grouped), &[KeyValue::new("stage", "group")]);
            o.observe(get(&m.aggregate.emitted), &[KeyValue::new("stage", "aggregate")]);
        })
        .build();
    let m = Arc::clone(metrics);
    let _ = meter
        .u64_observable_counter("pulses.dlq.records")
        .with_description("Invalid records sent to the DLQ, by reason")
        .with_callback(move |o| {
            for (reason, c) in RejectReason::ALL.iter().zip(&m.group.dlq) {
                o.observe(get(c), &[KeyValue::new("reason", reason.as_str())]);
            }
        })
        .build();
    let m = Arc::clone(metrics);
    let _ = meter
        .u64_observable_counter("pulses.aggregate.events")
        .with_description("Stage-2 events: late pulses, duplicates, corrections")
        .with_callback(move |o| {
            let a = &m.aggregate;
            o.observe(get(&a.late), &[KeyValue::new("event", "late")]);
            o.observe(get(&a.duplicates), &[KeyValue::new("event", "duplicate")]);
            o.observe(get(&a.corrections), &[KeyValue::new("event", "correction")]);
        })
        .build();
    let m = Arc::clone(metrics);
    let _ = meter
        .i64_observable_gauge("pulses.consumer.lag")
        .with_description("Records between a partition's committed offset and its end")
        .with_callback(move |o| {
            if let Ok(lag) = m.ops.lag.lock() {
                for ((stage, topic, partition), n) in lag.iter() {
                    let attrs = [
                        KeyValue::new("stage", stage.clone()),
                        KeyValue::new("topic", topic.clone()),
                        KeyValue::new("partition", i64::from(*partition)),
                    ];
                    o.observe(*n, &attrs);
                }
            }
        })
        .build();
}
