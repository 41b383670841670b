//! The I/O of `pulses bench`: fresh topics, a child `pulses run`, a producer of stub
//! pulses, a read_committed reader of the aggregates and a `/metrics` poller.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::{BaseRecord, Producer};
use rdkafka::{Offset, TopicPartitionList};

use super::aggregates::read_aggregates;
pub use super::plan::{Plan, RunTopics};
use super::processor::{cpu_seconds_of, Processor};
use super::report::{BrokerBaseline, ModeReport, Quantiles};
use super::stats;
use crate::config::{Config, Guarantee};
use crate::kafka::admin::{ensure_topics, TopicSpec};
use crate::kafka::clients::{self, send_with_backpressure, tracked_producer, DeliveryTracker, QuietEof};
use crate::pulse::time;
use crate::stub::{Generator, StubSpec};

/// A run id unique to this moment: `bench-<unix ms>-<what>`.
pub fn run_id(what: &str) -> String {
    format!("bench-{}-{what}", time::now_ms())
}

fn block_on<F: std::future::Future>(f: F) -> anyhow::Result<F::Output> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().context("starting a runtime")?;
    Ok(rt.block_on(f))
}

fn create_topics(cfg: &Config, names: &[&str], partitions: i32) -> anyhow::Result<()> {
    let specs: Vec<TopicSpec<'_>> = names.iter().map(|name| TopicSpec { name, partitions, configs: &[] }).collect();
    block_on(ensure_topics(cfg, &specs))?.context("creating the bench topics")
}

fn delete_topics(cfg: &Config, names: &[String]) {
    use rdkafka::admin::{AdminClient, AdminOptions};
    let Ok(admin) = clients::admin(cfg).create::<AdminClient<rdkafka::client::DefaultClientContext>>() else { return };
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    if let Ok(Err(e)) = block_on(admin.delete_topics(&names, &AdminOptions::new())) {
        tracing::warn!("deleting bench topics: {e}");
    }
}

/// Produces the plan's pulses to `topic`, paced at its rate or as fast as the broker
/// takes them; event time = record timestamp = the moment each pulse is handed to
/// the producer. Returns (first send, all acknowledged, event time of the last pulse).
fn produce(plan: &Plan, topic: &str, stop: &AtomicBool) -> anyhow::Result<(Instant, Instant, i64)> {
    let producer = tracked_producer(&plan.cfg, DeliveryTracker::default()).context("creating the producer")?;
    let mut gen = Generator::new(StubSpec { tenants: plan.tenants, skus: plan.skus, seed: 42, rate: None, start_time_ms: None });
    let first = Instant::now();
    let mut last_ms = 0;
    for i in 0..plan.pulses {
        if stop.load(Ordering::Acquire) {
            bail!("stopped while producing");
        }
        if let Some(rate) = plan.rate {
            // Pace against the schedule, not the previous send, so the rate holds.
            let due = first + Duration::from_secs_f64(i as f64 / rate);
            if let Some(wait) = due.checked_duration_since(Instant::now()) {
                std::thread::sleep(wait);
            }
        }
        let now = time::now_ms();
        last_ms = now;
        let mut pulse = gen.next_pulse(now);
        pulse.timestamp = now; // no stub jitter: event time is the produce time
        let value = pulse.to_json();
        let record = BaseRecord::to(topic).key(&pulse.pulse_id).payload(&value).timestamp(now);
        send_with_backpressure(&producer, record)?;
    }
    clients::flush(&producer, Duration::from_secs(120)).context("flushing the producer")?;
    let failed = producer.context().failed();
    if failed > 0 {
        bail!("{failed} pulses could not be delivered: {}", producer.context().last_error().unwrap_or_default());
    }
    Ok((first, Instant::now(), last_ms))
}

/// A read_committed consumer of all partitions of `topic` from their beginning.
/// Readers stop on counts; the ends of partitions they pass are not errors.
fn reader(cfg: &Config, topic: &str, partitions: i32) -> anyhow::Result<BaseConsumer<QuietEof>> {
    let c: BaseConsumer<QuietEof> =
        clients::reader(cfg, &format!("{topic}.bench-reader")).create_with_context(QuietEof { reader: "bench" })?;
    let mut tpl = TopicPartitionList::new();
    for p in 0..partitions {
        tpl.add_partition_offset(topic, p, Offset::Beginning)?;
    }
    c.assign(&tpl)?;
    Ok(c)
}

/// The broker alone: produce the pulses to a fresh topic, then read them all back.
pub fn broker_baseline(plan: &Plan) -> anyhow::Result<BrokerBaseline> {
    let topic = format!("{}.source", run_id("broker"));
    create_topics(&plan.cfg, &[&topic], plan.partitions)?;
    let (first, acked, _) = produce(plan, &topic, &AtomicBool::new(false))?;
    let produce_rate = stats::rate(plan.pulses, (acked - first).as_secs_f64());
    let c = reader(&plan.cfg, &topic, plan.partitions)?;
    let started = Instant::now();
    let mut read = 0u64;
    while read < plan.pulses {
        if started.elapsed() > plan.timeout {
            bail!("reading {topic} back timed out after {read} records");
        }
        match c.poll(Duration::from_millis(200)) {
            Some(Ok(_)) => read += 1,
            Some(Err(rdkafka::error::KafkaError::PartitionEOF(_))) => {}
            Some(Err(e)) => bail!("reading {topic}: {e}"),
            None => {}
        }
    }
    let consume_rate = stats::rate(read, started.elapsed().as_secs_f64());
    if !plan.keep_topics {
        delete_topics(&plan.cfg, &[topic]);
    }
    Ok(BrokerBaseline { produce_pulses_per_s: produce_rate, consume_pulses_per_s: consume_rate })
}


fn histogram_quantiles(samples: &[stats::Sample], window: &str) -> Quantiles {
    let (buckets, count) = stats::histogram(samples, "pulses_window_close_delay_seconds", window);
    Quantiles {
        p50: stats::histogram_quantile(&buckets, count, 0.5),
        p99: stats::histogram_quantile(&buckets, count, 0.99),
        count,
    }
}

/// One run of both stages under `guarantee` on fresh topics.
pub fn run_mode(plan: &Plan, guarantee: Guarantee) -> anyhow::Result<ModeReport> {
    let t = RunTopics::new(run_id(&guarantee.as_str().replace('_', "-")));
    let dir = plan.work_dir.join(&t.id);
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let names = [&t.source, &t.grouped, &t.aggregated, &t.dlq, &t.late].map(String::as_str);
    create_topics(&plan.cfg, &names, plan.partitions)?;
    let mut proc = Processor::start(plan, &t, guarantee, &dir)?;
    proc.wait_ready(plan.timeout)?;
    let result = measure(plan, &t, &mut proc);
    proc.stop();
    if !plan.keep_topics {
        delete_topics(&plan.cfg, &t.all());
    }
    if result.is_ok() {
        let _ = std::fs::remove_dir_all(&dir);
    }
    let mut report = result?;
    report.guarantee = guarantee.as_str().to_owned();
    Ok(report)
}

/// Produces, waits for the processing and the final aggregates, and measures.
fn measure(plan: &Plan, t: &RunTopics, proc: &mut Processor) -> anyhow::Result<ModeReport> {
    let n = plan.pulses;
    let stop = Arc::new(AtomicBool::new(false));
    let reader_consumer = reader(&plan.cfg, &t.aggregated, plan.partitions)?;
    let cpu_ready = proc.cpu_seconds()?;
    let broker_cpu = |pid: Option<u32>| pid.map(cpu_seconds_of).transpose();
    let broker_ready = broker_cpu(plan.broker_pid)?;
    let (reader_stop, producer_stop) = (Arc::clone(&stop), Arc::clone(&stop));
    // Aggregates are read as `pulses rate` reads them: JSON or Avro, per record.
    let registry = crate::registry::Registry::from_config(&plan.cfg.schema_registry)?.map(Arc::new);
    let input = crate::codec::AggregateInput::aggregates(registry);
    let reading = std::thread::spawn(move || read_aggregates(&reader_consumer, &input, n, &reader_stop));
    let producing = {
        let (plan, topic) = (plan.clone(), t.source.clone());
        std::thread::spawn(move || produce(&plan, &topic, &producer_stop))
    };
    let outcome = watch_processing(plan, proc, &stop);
    let cpu_done = proc.cpu_seconds();
    let broker_done = broker_cpu(plan.broker_pid);
    let produced = producing.join().map_err(|_| anyhow!("the producer panicked"))?;
    let (done_at, first_sent, acked, last_event_ms) = match (outcome, produced) {
        (Ok(done), Ok((first, acked, last))) => (done, first, acked, last),
        (Err(e), _) | (_, Err(e)) => {
            stop.store(true, Ordering::Release);
            let _ = reading.join();
            return Err(e);
        }
    };
    let cpu = cpu_done? - cpu_ready;
    let broker_cpu = broker_done?.zip(broker_ready).map(|(done, ready)| stats::per_million(done - ready, n));
    // The final aggregates come once the watermark (or the idle timeout) closes the last windows.
    let deadline = Instant::now() + plan.timeout;
    let seen = loop {
        if reading.is_finished() {
            break reading.join().map_err(|_| anyhow!("the reader panicked"))??;
        }
        if Instant::now() > deadline {
            stop.store(true, Ordering::Release);
        }
        proc.exited()?;
        std::thread::sleep(Duration::from_millis(50));
    };
    // A reader can see a final record before the processor has timed it: under
    // at_least_once outputs are visible once delivered, and the close delay is
    // observed after the offset commit that follows. Scrape once every first emission
    // the reader saw is in the histogram (bounded: then report what is there).
    let timed = |samples: &[stats::Sample]| {
        ["inflight", "postflight"].iter().all(|w| {
            stats::histogram(samples, "pulses_window_close_delay_seconds", w).1 >= seen.aggregates(w)
        })
    };
    let scrape_deadline = Instant::now() + Duration::from_secs(10);
    let samples = loop {
        let samples = proc.metrics()?;
        if timed(&samples) || Instant::now() > scrape_deadline {
            break samples;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let processing = (done_at - first_sent).as_secs_f64();
    // Windows that can close on data: a later pulse is past their end + grace.
    let ended_by = last_event_ms - plan.grace.as_millis() as i64;
    let (inflight, postflight) = (seen.counted("inflight"), seen.counted("postflight"));
    Ok(ModeReport {
        guarantee: String::new(),
        run_id: t.id.clone(),
        produced: n,
        produce_pulses_per_s: stats::rate(n, (acked - first_sent).as_secs_f64()),
        processing_seconds: processing,
        throughput_pulses_per_s: stats::rate(n, processing),
        end_to_end_inflight_s: seen.quantiles("inflight", ended_by),
        end_to_end_postflight_s: seen.quantiles("postflight", ended_by),
        trailing_finals: seen.trailing(ended_by),
        close_delay_inflight_s: histogram_quantiles(&samples, "inflight"),
        close_delay_postflight_s: histogram_quantiles(&samples, "postflight"),
        cpu_seconds: cpu,
        cpu_seconds_per_million: stats::per_million(cpu, n),
        broker_cpu_seconds_per_million: broker_cpu,
        peak_rss_mib: proc.peak_rss_mib()?,
        counted_inflight: inflight,
        counted_postflight: postflight,
        all_counted: inflight == n && postflight == n,
        final_aggregates: seen.finals,
        corrections: stats::sample_value(&samples, "pulses_corrections_total", &[]) as u64,
        late: stats::sample_value(&samples, "pulses_late_records_total", &[]) as u64,
        dlq: stats::sample_value(&samples, "pulses_dlq_records_total", &[]) as u64,
    })
}

/// Polls `/metrics` every 50 ms until stage 2 has read all pulses and committed the
/// batch holding the last one: the first poll where its consumed counter has reached
/// N and its commit counter has moved since the last poll that saw fewer than N.
fn watch_processing(plan: &Plan, proc: &mut Processor, stop: &AtomicBool) -> anyhow::Result<Instant> {
    let started = Instant::now();
    let mut commits_before_last = None;
    loop {
        if stop.load(Ordering::Acquire) {
            bail!("stopped");
        }
        if started.elapsed() > plan.timeout {
            stop.store(true, Ordering::Release);
            bail!("stage 2 did not process {} pulses within {:?} (log: {})", plan.pulses, plan.timeout, proc.log.display());
        }
        if let Err(e) = proc.exited() {
            stop.store(true, Ordering::Release);
            return Err(e);
        }
        let now = Instant::now();
        let s = proc.metrics()?;
        let consumed = stats::sample_value(&s, "pulses_records_consumed_total", &[("stage", "aggregate")]) as u64;
        let commits = stats::sample_value(&s, "pulses_offset_commits_total", &[("stage", "aggregate")]) as u64;
        if consumed < plan.pulses {
            commits_before_last = Some(commits);
        } else if commits_before_last.is_none_or(|c| commits > c) {
            return Ok(now);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}
