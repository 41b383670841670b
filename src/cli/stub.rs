//! `pulses stub`: produces synthetic pulses (see [`crate::stub`]).

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Args;
use rdkafka::producer::{BaseRecord, Producer};

use super::CommonArgs;
use crate::config::parse_duration;
use crate::kafka::clients::{self, send_with_backpressure, tracked_producer, DeliveryTracker};
use crate::codec::avro;
use crate::pulse::{time, wire};
use crate::config::OutputFormat;
use crate::registry::{Registry, Wait};
use crate::stub::{Generator, StubSpec};

#[derive(Debug, Args)]
pub struct StubArgs {
    #[command(flatten)]
    common: CommonArgs,
    /// Number of distinct tenants (tenant-000, tenant-001, ...)
    #[arg(long, default_value_t = 10)]
    tenants: usize,
    /// Number of distinct (product_sku, use_unit) products
    #[arg(long, default_value_t = 4)]
    skus: usize,
    /// Pulses per second [default: as fast as the broker takes them]
    #[arg(long)]
    rate: Option<f64>,
    /// Stop after this many pulses
    #[arg(long, conflicts_with = "duration")]
    count: Option<u64>,
    /// Stop after this long, e.g. 30s or 5m
    #[arg(long, value_parser = parse_duration)]
    duration: Option<Duration>,
    /// Random seed: the same seed produces the same pulses and pulse_ids
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Pin event times (RFC 3339): pulse i gets START + i/RATE, making runs fully
    /// reproducible; the Kafka record timestamp is always the event time [default:
    /// event time = now, minus up to 0.5 s of jitter]
    #[arg(long, value_name = "START", value_parser = parse_start)]
    start_time: Option<i64>,
    /// Value format: `json`, or `avro` (Confluent wire format; registers
    /// schemas/pulse.avsc under `<source-topic>-value`, needs --schema-registry-url)
    #[arg(long, value_name = "FORMAT", default_value = "json")]
    format: OutputFormat,
}

fn parse_start(s: &str) -> Result<i64, String> {
    time::parse_rfc3339_ms(s).ok_or_else(|| format!("{s:?} is not RFC 3339, e.g. 2026-11-22T10:00:00Z"))
}

pub fn run(args: StubArgs) -> anyhow::Result<()> {
    if args.count.is_none() && args.duration.is_none() {
        bail!("say how many pulses: --count N or --duration D");
    }
    if matches!(args.rate, Some(r) if !(r > 0.0 && r.is_finite())) {
        bail!("--rate must be a positive number of pulses per second");
    }
    let cfg = args.common.load()?;
    super::connect(&cfg, &|_| {})?;
    let rt = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    let shutdown = super::shutdown_on_signal(&rt);
    let avro_schema = match args.format {
        OutputFormat::Json => None,
        OutputFormat::Avro => {
            let registry = Registry::from_config(&cfg.schema_registry)?
                .context("--format avro needs a schema registry: --schema-registry-url or [schema_registry] url")?;
            let stop = || shutdown.load(Ordering::Acquire);
            let s = registry
                .value_schema(&cfg.topics.source, avro::PULSE_SCHEMA, cfg.schema_registry.auto_register, Wait::until(&stop))
                .context("registering schemas/pulse.avsc")?;
            eprintln!("stub: Avro pulses with schema id {} (subject {}-value)", s.id, cfg.topics.source);
            Some((s.id, s.parsed.clone()))
        }
    };
    let producer = tracked_producer(&cfg, DeliveryTracker::default()).context("creating the producer")?;
    let mut gen = Generator::new(StubSpec {
        tenants: args.tenants,
        skus: args.skus,
        seed: args.seed,
        rate: args.rate,
        start_time_ms: args.start_time,
    });
    let started = Instant::now();
    let mut sent: u64 = 0;
    loop {
        if args.count.is_some_and(|c| sent >= c)
            || args.duration.is_some_and(|d| started.elapsed() >= d)
            || shutdown.load(Ordering::Acquire)
        {
            break;
        }
        if let Some(rate) = args.rate {
            // Pace against the schedule, not the previous send, so the rate holds.
            let offset = Duration::from_secs_f64(sent as f64 / rate);
            if args.duration.is_some_and(|d| offset >= d) {
                break;
            }
            let due = started + offset;
            if let Some(wait) = due.checked_duration_since(Instant::now()) {
                std::thread::sleep(wait);
            }
        }
        let pulse = gen.next_pulse(time::now_ms());
        let value = match &avro_schema {
            None => pulse.to_json(),
            Some((id, schema)) => wire::confluent(*id, &avro::write_datum(schema, pulse.to_avro()).context("encoding a pulse")?),
        };
        // Record time = event time, so `pulses replay --from/--to` (offsets-for-time)
        // selects the pulses of that event-time range.
        let record = BaseRecord::to(&cfg.topics.source).key(&pulse.pulse_id).payload(&value).timestamp(pulse.timestamp);
        send_with_backpressure(&producer, record)?;
        sent += 1;
    }
    clients::flush(&producer, Duration::from_secs(120)).context("flushing the producer")?;
    let failed = producer.context().failed();
    let secs = started.elapsed().as_secs_f64();
    eprintln!(
        "stub: produced {} pulses to {} in {secs:.2} s ({:.0} pulses/s)",
        sent - failed,
        cfg.topics.source,
        (sent - failed) as f64 / secs.max(1e-9)
    );
    if failed > 0 {
        bail!("{failed} pulses could not be delivered: {}", producer.context().last_error().unwrap_or_default());
    }
    Ok(())
}
