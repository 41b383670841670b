//! `/metrics` of `pulses run` in the Prometheus text format (version 0.0.4), encoded
//! by `prometheus-client`. The stages count in plain atomics ([`Metrics`]), cheap on
//! the hot path; this collector reads them at scrape time, as a Kafka Streams metrics
//! reporter reads its sensors.

use std::sync::Arc;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

use super::metrics::{get, HistogramSnapshot, Metrics, TxnOutcome};
use crate::config::Config;
use crate::pulse::RejectReason;

/// The content type Prometheus expects for this format.
pub use prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

/// Renders every metric of `registry`.
pub fn render(registry: &Registry) -> String {
    let mut out = String::new();
    // Writing into a String cannot fail; a collector's error would be a bug of ours.
    if let Err(e) = prometheus_client::encoding::prometheus_text::encode(&mut out, registry) {
        tracing::error!("encoding /metrics: {e}");
    }
    out
}

/// A registry holding the pipeline's metrics.
pub fn pipeline_registry(metrics: Arc<Metrics>, cfg: &Config) -> Registry {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(PipelineMetrics { metrics, cfg: Arc::new(cfg.clone()) }));
    registry
}

/// The stages' counters, gauges and histograms. `cfg` names the topics in the labels.
#[derive(Debug)]
struct PipelineMetrics {
    metrics: Arc<Metrics>,
    cfg: Arc<Config>,
}

type Labels<'a> = Vec<(&'static str, &'a str)>;

/// Encodes one family: a name (counters without their `_total`, which the encoder
/// adds), its help, its kind and its samples.
fn family<'a>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    kind: MetricType,
    samples: impl IntoIterator<Item = (Labels<'a>, i64)>,
) -> std::fmt::Result {
    let mut metric = encoder.encode_descriptor(name, help, None, kind)?;
    for (labels, value) in samples {
        let family = metric.encode_family(&labels)?;
        match kind {
            MetricType::Counter => ConstCounter::new(value.max(0) as u64).encode(family)?,
            _ => ConstGauge::new(value).encode(family)?,
        }
    }
    Ok(())
}

/// One histogram family, a series per value of one label: a non-empty value becomes
/// `label="…"`; an empty one, a series without labels.
fn histograms(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    label: &'static str,
    series: &[(String, HistogramSnapshot)],
) -> std::fmt::Result {
    let mut metric = encoder.encode_descriptor(name, help, None, MetricType::Histogram)?;
    for (value, h) in series {
        let labels: Labels<'_> = if value.is_empty() { vec![] } else { vec![(label, value.as_str())] };
        // The snapshot's buckets are cumulative; the encoder wants each bucket's own count.
        let mut below = 0;
        let buckets: Vec<(f64, u64)> = h
            .buckets
            .iter()
            .map(|&(bound, cumulative)| (bound, cumulative - std::mem::replace(&mut below, cumulative)))
            .collect();
        metric.encode_family(&labels)?.encode_histogram::<Labels<'_>>(h.sum_seconds, h.count, &buckets, None)?;
    }
    Ok(())
}

fn n(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

impl Collector for PipelineMetrics {
    fn encode(&self, mut e: DescriptorEncoder) -> std::fmt::Result {
        let (m, cfg) = (&self.metrics, &self.cfg);
        let (g, a, ops) = (&m.group, &m.aggregate, &m.ops);
        let t = &cfg.topics;
        use MetricType::{Counter, Gauge};

        family(&mut e, "pulses_records_consumed", "Records read from the stage's input topic.", Counter, [
            (vec![("stage", "group"), ("topic", t.source.as_str())], n(get(&g.consumed))),
            (vec![("stage", "aggregate"), ("topic", t.grouped.as_str())], n(get(&a.consumed))),
        ])?;
        family(&mut e, "pulses_records_produced",
            "Records a stage wrote to its main output topic (grouped pulses; window aggregates, interim, final and corrections).",
            Counter, [
                (vec![("stage", "group"), ("topic", t.grouped.as_str())], n(get(&g.grouped))),
                (vec![("stage", "aggregate"), ("topic", t.aggregated.as_str())], n(get(&a.emitted))),
            ])?;
        family(&mut e, "pulses_cloudevents", "CloudEvents read by stage 1: metered (counted by at least one meter) or unmetered (no meter reads their type).", Counter, [
            (vec![("outcome", "metered")], n(get(&g.events_metered))),
            (vec![("outcome", "unmetered")], n(get(&g.events_unmetered))),
        ])?;
        family(&mut e, "pulses_dlq_records", "Invalid records sent to the DLQ, by error.reason.", Counter,
            RejectReason::ALL.iter().zip(&g.dlq).map(|(reason, c)| (vec![("topic", t.dlq.as_str()), ("reason", reason.as_str())], n(get(c)))))?;
        family(&mut e, "pulses_late_records", "Pulses sent to the late topic (counted in no window).", Counter,
            [(vec![("topic", t.late.as_str())], n(get(&a.late)))])?;
        family(&mut e, "pulses_corrections", "Aggregates re-emitted with revision + 1 after a late pulse.", Counter,
            [(vec![], n(get(&a.corrections)))])?;
        family(&mut e, "pulses_duplicates", "Pulses not counted again: their pulse_id was already counted for the tenant.", Counter,
            [(vec![], n(get(&a.duplicates)))])?;
        let changelog = cfg.changelog_topic();
        family(&mut e, "pulses_changelog_records", "State changes written to the changelog topic.", Counter,
            [(vec![("topic", changelog.as_str())], n(get(&a.changelog_records)))])?;
        family(&mut e, "pulses_offset_commits", "Batches whose input offsets were committed.", Counter, [
            (vec![("stage", "group")], n(get(&g.commits))),
            (vec![("stage", "aggregate")], n(get(&a.commits))),
        ])?;

        let txns = ops.transactions.lock().map(|t| t.clone()).unwrap_or_default();
        let outcomes = ["group", "aggregate"].into_iter().flat_map(|stage| {
            [TxnOutcome::Committed, TxnOutcome::Aborted].into_iter().map(move |o| (stage, o))
        });
        let mut samples: Vec<(Labels<'_>, i64)> = Vec::new();
        for ((stage, outcome), v) in txns.iter() {
            samples.push((vec![("stage", stage.as_str()), ("outcome", outcome.as_str())], n(*v)));
        }
        for (stage, outcome) in outcomes.filter(|(s, o)| !txns.contains_key(&(s.to_string(), *o))) {
            samples.push((vec![("stage", stage), ("outcome", outcome.as_str())], 0));
        }
        family(&mut e, "pulses_transactions",
            "Kafka transactions (exactly_once), by stage and outcome: committed, or aborted (a step failed, or a revoked partition's transaction was open).",
            Counter, samples)?;

        let restarts = ops.stage_restarts.lock().map(|r| r.clone()).unwrap_or_default();
        family(&mut e, "pulses_stage_restarts",
            "Times a stage failed on Kafka (broker outage, lost group membership, failed transaction) and was replaced in-process; its uncommitted work was redone from the last commit.",
            Counter, ["group", "aggregate"].map(|s| (vec![("stage", s)], n(restarts.get(s).copied().unwrap_or(0)))))?;

        let lag = ops.lag.lock().map(|l| l.clone()).unwrap_or_default();
        let partitions: Vec<String> = lag.keys().map(|(_, _, p)| p.to_string()).collect();
        family(&mut e, "pulses_consumer_lag",
            "Records the stage still has to read in a partition: its last stable offset minus the stage's position (librdkafka statistics, every 5 s; -1 unknown).",
            Gauge, lag.iter().zip(&partitions).map(|(((stage, topic, _), v), p)| {
                (vec![("stage", stage.as_str()), ("topic", topic.as_str()), ("partition", p.as_str())], *v)
            }))?;

        histograms(&mut e, "pulses_window_close_delay_seconds",
            "Wall-clock time from the moment stage 2 saw a partition's watermark pass window_end + grace (and emitted the \
             final aggregate) to the commit of the transaction that published it. Revision 0 only.",
            "window", &ops.close_delay.snapshot())?;
        histograms(&mut e, "pulses_end_to_end_latency_seconds",
            "Commit wall time of a final aggregate (revisions included) minus its last_event_time: how long after the \
             newest pulse it counts the result is readable downstream. Includes the window size and grace.",
            "window", &ops.end_to_end.snapshot())?;
        histograms(&mut e, "pulses_checkpoint_duration_seconds", "Time to write one partition's checkpoint (RocksDB snapshot).",
            "", &[(String::new(), ops.checkpoint_duration.snapshot())])?;
        histograms(&mut e, "pulses_commit_duration_seconds",
            "A stage's commit, during which it processes nothing: its state changes handed to the producer, the \
             Kafka part (pulses_transaction_duration_seconds), then its local state written.",
            "stage", &ops.commit_duration.snapshot())?;
        histograms(&mut e, "pulses_transaction_duration_seconds",
            "The Kafka part of a stage's commit: outputs flushed, offsets sent, transaction committed (exactly_once), \
             or outputs flushed (at_least_once; its offsets commit after the local state).",
            "stage", &ops.transaction_duration.snapshot())?;

        family(&mut e, "pulses_restored_records", "Changelog records applied while restoring stores.", Counter,
            [(vec![], n(get(&a.restored_records)))])?;
        let restore = ops.restore.lock().map(|r| r.clone()).unwrap_or_default();
        let partitions: Vec<String> = restore.keys().map(i32::to_string).collect();
        let per_partition = |f: fn(&super::metrics::RestoreProgress) -> u64| {
            restore.values().zip(&partitions).map(move |(r, p)| (vec![("partition", p.as_str())], n(f(r))))
        };
        family(&mut e, "pulses_restore_records_restored", "Changelog records read by the latest restore of a partition's store.",
            Gauge, per_partition(|r| r.restored))?;
        family(&mut e, "pulses_restore_records_to_restore",
            "Changelog offsets the latest restore of a partition's store has to read (includes transaction markers).",
            Gauge, per_partition(|r| r.to_restore))?;
        family(&mut e, "pulses_restore_done", "1 once the latest restore of a partition's store finished.", Gauge,
            per_partition(|r| u64::from(r.done)))?;

        family(&mut e, "pulses_ready", "1 when /readyz answers 200: stages joined, assigned stores restored.", Gauge,
            [(vec![], i64::from(ops.readiness.status().is_ok()))])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::metrics::add;

    #[test]
    fn renders_counters_with_labels_help_and_type() {
        let m = Arc::new(Metrics::default());
        add(&m.group.consumed, 7);
        add(m.group.dlq_for(RejectReason::NegativeAmount), 2);
        m.ops.close_delay.observe_ms("minute", 120);
        m.ops.commit_duration.observe("aggregate", std::time::Duration::from_millis(30));
        let text = render(&pipeline_registry(Arc::clone(&m), &Config::default()));
        assert!(text.contains("# TYPE pulses_records_consumed_total counter\n"), "{text}");
        assert!(text.contains("pulses_records_consumed_total{stage=\"group\",topic=\"source.pulses\"} 7\n"));
        assert!(text.contains("pulses_dlq_records_total{topic=\"source.pulses.dlq\",reason=\"negative_amount\"} 2\n"));
        assert!(text.contains("pulses_dlq_records_total{topic=\"source.pulses.dlq\",reason=\"invalid_json\"} 0\n"));
        assert!(text.contains("pulses_transactions_total{stage=\"aggregate\",outcome=\"aborted\"} 0\n"));
        assert!(text.contains("pulses_window_close_delay_seconds_bucket{window=\"minute\",le=\"0.1\"} 0\n"), "{text}");
        assert!(text.contains("pulses_window_close_delay_seconds_bucket{window=\"minute\",le=\"0.25\"} 1\n"));
        assert!(text.contains("pulses_window_close_delay_seconds_bucket{window=\"minute\",le=\"+Inf\"} 1\n"));
        assert!(text.contains("pulses_window_close_delay_seconds_count{window=\"minute\"} 1\n"));
        assert!(text.contains("pulses_commit_duration_seconds_bucket{stage=\"aggregate\",le=\"0.01\"} 0\n"), "{text}");
        assert!(text.contains("pulses_commit_duration_seconds_bucket{stage=\"aggregate\",le=\"0.05\"} 1\n"));
        assert!(text.contains("pulses_commit_duration_seconds_sum{stage=\"aggregate\"} 0.03\n"));
        assert!(text.contains("pulses_ready 0\n"));
        // Every sample line belongs to a family declared before it.
        let mut declared = std::collections::HashSet::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                declared.insert(rest.split(' ').next().unwrap().to_owned());
            } else if !line.starts_with('#') {
                let name = line.split(['{', ' ']).next().unwrap();
                let family = name.trim_end_matches("_bucket").trim_end_matches("_sum").trim_end_matches("_count");
                assert!(declared.contains(name) || declared.contains(family), "undeclared {line}");
            }
        }
    }
}
