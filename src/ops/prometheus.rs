//! `/metrics` in the Prometheus text exposition format (version 0.0.4), written by
//! hand: a few dozen series do not need a metrics framework.

use std::fmt::Write;

use super::metrics::{get, HistogramSnapshot, Metrics, TxnOutcome};
use crate::config::Config;
use crate::pulse::RejectReason;

/// The content type Prometheus expects for this format.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Renders every metric of the process. `cfg` names the topics in the labels.
pub fn render(m: &Metrics, cfg: &Config) -> String {
    let mut out = Exposition::default();
    let (g, a, ops) = (&m.group, &m.aggregate, &m.ops);
    let t = &cfg.topics;

    out.family("pulses_records_consumed_total", "counter", "Records read from the stage's input topic.");
    out.sample("pulses_records_consumed_total", &[("stage", "group"), ("topic", &t.source)], get(&g.consumed));
    out.sample("pulses_records_consumed_total", &[("stage", "aggregate"), ("topic", &t.grouped)], get(&a.consumed));

    out.family("pulses_records_produced_total", "counter",
        "Records a stage wrote to its main output topic (grouped pulses; window aggregates, interim, final and corrections).");
    out.sample("pulses_records_produced_total", &[("stage", "group"), ("topic", &t.grouped)], get(&g.grouped));
    out.sample("pulses_records_produced_total", &[("stage", "aggregate"), ("topic", &t.aggregated)], get(&a.emitted));

    out.family("pulses_dlq_records_total", "counter", "Invalid records sent to the DLQ, by error.reason.");
    for (reason, c) in RejectReason::ALL.iter().zip(&g.dlq) {
        out.sample("pulses_dlq_records_total", &[("topic", &t.dlq), ("reason", reason.as_str())], get(c));
    }

    out.family("pulses_late_records_total", "counter", "Pulses sent to the late topic (counted in no window).");
    out.sample("pulses_late_records_total", &[("topic", &t.late)], get(&a.late));
    out.family("pulses_corrections_total", "counter", "Aggregates re-emitted with revision + 1 after a late pulse.");
    out.sample("pulses_corrections_total", &[], get(&a.corrections));
    out.family("pulses_duplicates_total", "counter", "Pulses not counted again: their pulse_id was already counted for the tenant.");
    out.sample("pulses_duplicates_total", &[], get(&a.duplicates));
    out.family("pulses_changelog_records_total", "counter", "State changes written to the changelog topic.");
    out.sample("pulses_changelog_records_total", &[("topic", &cfg.changelog_topic())], get(&a.changelog_records));

    out.family("pulses_offset_commits_total", "counter", "Batches whose input offsets were committed.");
    out.sample("pulses_offset_commits_total", &[("stage", "group")], get(&g.commits));
    out.sample("pulses_offset_commits_total", &[("stage", "aggregate")], get(&a.commits));

    out.family("pulses_transactions_total", "counter", "Kafka transactions (exactly_once), by stage and outcome: committed, or aborted (a step failed, or a revoked partition's transaction was open).");
    if let Ok(txns) = ops.transactions.lock() {
        for ((stage, outcome), n) in txns.iter() {
            out.sample("pulses_transactions_total", &[("stage", stage), ("outcome", outcome.as_str())], *n);
        }
        for stage in ["group", "aggregate"] {
            for outcome in [TxnOutcome::Committed, TxnOutcome::Aborted] {
                if !txns.contains_key(&(stage.to_owned(), outcome)) {
                    out.sample("pulses_transactions_total", &[("stage", stage), ("outcome", outcome.as_str())], 0);
                }
            }
        }
    }

    out.family("pulses_stage_restarts_total", "counter",
        "Times a stage failed on Kafka (broker outage, lost group membership, failed transaction) and was replaced in-process; its uncommitted work was redone from the last commit.");
    if let Ok(restarts) = ops.stage_restarts.lock() {
        for stage in ["group", "aggregate"] {
            out.sample("pulses_stage_restarts_total", &[("stage", stage)], restarts.get(stage).copied().unwrap_or(0));
        }
    }

    out.family("pulses_consumer_lag", "gauge",
        "Records the stage still has to read in a partition: its last stable offset minus the stage's position (librdkafka statistics, every 5 s; -1 unknown).");
    if let Ok(lag) = ops.lag.lock() {
        for ((stage, topic, partition), n) in lag.iter() {
            out.sample_i("pulses_consumer_lag", &[("stage", stage), ("topic", topic), ("partition", &partition.to_string())], *n);
        }
    }

    out.histograms("pulses_window_close_delay_seconds",
        "Wall-clock time from the moment stage 2 saw a partition's watermark pass window_end + grace (and emitted the \
         final aggregate) to the commit of the transaction that published it. Revision 0 only.",
        &ops.close_delay.snapshot());
    out.histograms("pulses_end_to_end_latency_seconds",
        "Commit wall time of a final aggregate (revisions included) minus its last_event_time: how long after the \
         newest pulse it counts the result is readable downstream. Includes the window size and grace.",
        &ops.end_to_end.snapshot());
    out.histograms("pulses_checkpoint_duration_seconds", "Time to write one partition's checkpoint (RocksDB snapshot).",
        &[(String::new(), ops.checkpoint_duration.snapshot())]);

    out.family("pulses_restored_records_total", "counter", "Changelog records applied while restoring stores.");
    out.sample("pulses_restored_records_total", &[], get(&a.restored_records));
    if let Ok(restore) = ops.restore.lock() {
        out.family("pulses_restore_records_restored", "gauge", "Changelog records read by the latest restore of a partition's store.");
        for (p, r) in restore.iter() {
            out.sample("pulses_restore_records_restored", &[("partition", &p.to_string())], r.restored);
        }
        out.family("pulses_restore_records_to_restore", "gauge",
            "Changelog offsets the latest restore of a partition's store has to read (includes transaction markers).");
        for (p, r) in restore.iter() {
            out.sample("pulses_restore_records_to_restore", &[("partition", &p.to_string())], r.to_restore);
        }
        out.family("pulses_restore_done", "gauge", "1 once the latest restore of a partition's store finished.");
        for (p, r) in restore.iter() {
            out.sample("pulses_restore_done", &[("partition", &p.to_string())], u64::from(r.done));
        }
    }

    out.family("pulses_ready", "gauge", "1 when /readyz answers 200: stages joined, assigned stores restored.");
    out.sample("pulses_ready", &[], u64::from(ops.readiness.status().is_ok()));
    out.text
}

/// The text being written.
#[derive(Default)]
struct Exposition {
    text: String,
}

impl Exposition {
    fn family(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.text, "# HELP {name} {}", help.replace('\\', "\\\\").replace('\n', "\\n"));
        let _ = writeln!(self.text, "# TYPE {name} {kind}");
    }

    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: u64) {
        self.line(name, labels, &value.to_string());
    }

    fn sample_i(&mut self, name: &str, labels: &[(&str, &str)], value: i64) {
        self.line(name, labels, &value.to_string());
    }

    fn line(&mut self, name: &str, labels: &[(&str, &str)], value: &str) {
        self.text.push_str(name);
        if !labels.is_empty() {
            self.text.push('{');
            for (i, (k, v)) in labels.iter().enumerate() {
                if i > 0 {
                    self.text.push(',');
                }
                let v = v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n");
                let _ = write!(self.text, "{k}=\"{v}\"");
            }
            self.text.push('}');
        }
        let _ = writeln!(self.text, " {value}");
    }

    /// One histogram family; a non-empty label value becomes `window="…"`.
    fn histograms(&mut self, name: &str, help: &str, series: &[(String, HistogramSnapshot)]) {
        self.family(name, "histogram", help);
        for (window, h) in series {
            let base: Vec<(&str, &str)> = if window.is_empty() { vec![] } else { vec![("window", window.as_str())] };
            for (bound, n) in &h.buckets {
                let le = bound.to_string();
                let mut labels = base.clone();
                labels.push(("le", &le));
                self.sample(&format!("{name}_bucket"), &labels, *n);
            }
            let mut labels = base.clone();
            labels.push(("le", "+Inf"));
            self.sample(&format!("{name}_bucket"), &labels, h.count);
            self.line(&format!("{name}_sum"), &base, &h.sum_seconds.to_string());
            self.sample(&format!("{name}_count"), &base, h.count);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::metrics::add;

    #[test]
    fn renders_counters_with_labels_help_and_type() {
        let m = Metrics::default();
        add(&m.group.consumed, 7);
        add(m.group.dlq_for(RejectReason::NegativeAmount), 2);
        m.ops.close_delay.observe_ms("minute", 120);
        let text = render(&m, &Config::default());
        assert!(text.contains("# TYPE pulses_records_consumed_total counter\n"));
        assert!(text.contains("pulses_records_consumed_total{stage=\"group\",topic=\"source.pulses\"} 7\n"));
        assert!(text.contains("pulses_dlq_records_total{topic=\"source.pulses.dlq\",reason=\"negative_amount\"} 2\n"));
        assert!(text.contains("pulses_dlq_records_total{topic=\"source.pulses.dlq\",reason=\"invalid_json\"} 0\n"));
        assert!(text.contains("pulses_window_close_delay_seconds_bucket{window=\"minute\",le=\"0.1\"} 0\n"));
        assert!(text.contains("pulses_window_close_delay_seconds_bucket{window=\"minute\",le=\"0.25\"} 1\n"));
        assert!(text.contains("pulses_window_close_delay_seconds_count{window=\"minute\"} 1\n"));
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
