//! What `pulses bench` reports, as JSON (serde) and as a plain-text table.

use serde::Serialize;

/// The whole benchmark: settings, the broker-alone baseline and one run per guarantee.
#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    pub pulses_version: String,
    /// CPUs the processor could use (`available_parallelism`).
    pub nproc: usize,
    pub pulses: u64,
    /// The producer's pace in pulses/s; None: as fast as the broker takes them.
    pub rate: Option<f64>,
    pub partitions: i32,
    pub tenants: usize,
    pub skus: usize,
    pub grace_ms: u64,
    pub idle_timeout_ms: u64,
    pub broker: Option<BrokerBaseline>,
    pub runs: Vec<ModeReport>,
}

/// How fast the broker alone takes the same pulses in and hands them out.
#[derive(Debug, Clone, Serialize)]
pub struct BrokerBaseline {
    /// The bench's producer alone, to a fresh topic, until every delivery is acknowledged.
    pub produce_pulses_per_s: f64,
    /// A plain read_committed consumer reading that topic from offset 0 to its end.
    pub consume_pulses_per_s: f64,
}

/// p50/p99 and how many observations they come from.
#[derive(Debug, Clone, Copy, Serialize, PartialEq)]
pub struct Quantiles {
    pub p50: Option<f64>,
    pub p99: Option<f64>,
    pub count: u64,
}

/// One run of both stages under one processing guarantee.
#[derive(Debug, Clone, Serialize)]
pub struct ModeReport {
    pub guarantee: String,
    /// Prefix of this run's topics and application id.
    pub run_id: String,
    pub produced: u64,
    /// The producer's rate while pulses ran beside it.
    pub produce_pulses_per_s: f64,
    /// First pulse sent → stage 2 has read every pulse and committed the batch holding
    /// the last one.
    pub processing_seconds: f64,
    pub throughput_pulses_per_s: f64,
    /// Seconds, per final `inflight` (1 s) aggregate: seen by a read_committed reader
    /// minus its last_event_time (= produce time of its newest pulse). Only windows
    /// that close on data (ended at least the grace before the last pulse).
    pub end_to_end_inflight_s: Quantiles,
    /// The same for the `postflight` (10 s) window.
    pub end_to_end_postflight_s: Quantiles,
    /// Final records of the trailing windows, left out of the end-to-end latencies:
    /// no pulse comes after them, so they close on the idle timeout.
    pub trailing_finals: u64,
    /// Seconds, from the processor's `pulses_window_close_delay_seconds{window="inflight"}`
    /// histogram, interpolated inside its buckets.
    pub close_delay_inflight_s: Quantiles,
    pub close_delay_postflight_s: Quantiles,
    /// User + system CPU of the `pulses run` process from ready to the end of processing.
    pub cpu_seconds: f64,
    pub cpu_seconds_per_million: f64,
    /// The same for the broker process over the same interval (with `--broker-pid`).
    pub broker_cpu_seconds_per_million: Option<f64>,
    /// VmHWM of the `pulses run` process at the end.
    pub peak_rss_mib: f64,
    /// Sum of pulse_count over the latest revision of every final aggregate, per window.
    pub counted_inflight: u64,
    pub counted_postflight: u64,
    /// Both windows count exactly the produced pulses.
    pub all_counted: bool,
    pub final_aggregates: u64,
    pub corrections: u64,
    pub late: u64,
    pub dlq: u64,
}

fn secs(v: Option<f64>) -> String {
    v.map_or_else(|| "-".to_owned(), |s| format!("{s:.3}"))
}

/// The report as an aligned text table, one column per guarantee.
pub fn render_table(r: &BenchReport) -> String {
    let mut rows: Vec<(String, Vec<String>)> = Vec::new();
    let mut row = |name: &str, f: &dyn Fn(&ModeReport) -> String| {
        rows.push((name.to_owned(), r.runs.iter().map(f).collect()));
    };
    row("guarantee", &|m| m.guarantee.clone());
    row("pulses produced", &|m| m.produced.to_string());
    row("producer rate (pulses/s)", &|m| format!("{:.0}", m.produce_pulses_per_s));
    row("throughput (pulses/s)", &|m| format!("{:.0}", m.throughput_pulses_per_s));
    row("processing time (s)", &|m| format!("{:.2}", m.processing_seconds));
    row("end-to-end 1s p50 / p99 (s)", &|m| format!("{} / {}", secs(m.end_to_end_inflight_s.p50), secs(m.end_to_end_inflight_s.p99)));
    row("end-to-end 10s p50 / p99 (s)", &|m| {
        format!("{} / {}", secs(m.end_to_end_postflight_s.p50), secs(m.end_to_end_postflight_s.p99))
    });
    row("trailing finals (not in e2e)", &|m| m.trailing_finals.to_string());
    row("window close 1s p50 / p99 (s)", &|m| {
        format!("{} / {}", secs(m.close_delay_inflight_s.p50), secs(m.close_delay_inflight_s.p99))
    });
    row("window close 10s p50 / p99 (s)", &|m| {
        format!("{} / {}", secs(m.close_delay_postflight_s.p50), secs(m.close_delay_postflight_s.p99))
    });
    row("CPU s per million pulses", &|m| format!("{:.2}", m.cpu_seconds_per_million));
    row("broker CPU s per million", &|m| m.broker_cpu_seconds_per_million.map_or_else(|| "-".to_owned(), |c| format!("{c:.2}")));
    row("peak RSS (MiB)", &|m| format!("{:.1}", m.peak_rss_mib));
    row("final aggregates", &|m| m.final_aggregates.to_string());
    row("all pulses counted", &|m| format!("{} ({} / {})", m.all_counted, m.counted_inflight, m.counted_postflight));
    row("corrections / late / dlq", &|m| format!("{} / {} / {}", m.corrections, m.late, m.dlq));
    let name_w = rows.iter().map(|(n, _)| n.len()).max().unwrap_or(0);
    let col_w = rows.iter().flat_map(|(_, c)| c.iter().map(String::len)).max().unwrap_or(0);
    let mut out = format!(
        "pulses bench {}: {} pulses {}, {} partitions, {} tenants x {} skus, grace {} ms, {} CPUs\n",
        r.pulses_version,
        r.pulses,
        r.rate.map_or_else(|| "as fast as possible".to_owned(), |x| format!("at {x:.0}/s")),
        r.partitions,
        r.tenants,
        r.skus,
        r.grace_ms,
        r.nproc
    );
    if let Some(b) = &r.broker {
        out.push_str(&format!(
            "broker alone: produce {:.0} pulses/s, consume {:.0} pulses/s\n",
            b.produce_pulses_per_s, b.consume_pulses_per_s
        ));
    }
    for (name, cells) in rows {
        out.push_str(&format!("{name:<name_w$}"));
        for c in cells {
            out.push_str(&format!("  {c:>col_w$}"));
        }
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn q(p50: f64, p99: f64) -> Quantiles {
        Quantiles { p50: Some(p50), p99: Some(p99), count: 3 }
    }

    fn mode(name: &str) -> ModeReport {
        ModeReport {
            guarantee: name.to_owned(),
            run_id: format!("bench-1-{name}"),
            produced: 2000,
            produce_pulses_per_s: 50_000.0,
            processing_seconds: 0.5,
            throughput_pulses_per_s: 4000.0,
            end_to_end_inflight_s: q(1.2, 1.8),
            end_to_end_postflight_s: q(1.5, 2.0),
            trailing_finals: 4,
            close_delay_inflight_s: q(0.05, 0.2),
            close_delay_postflight_s: Quantiles { p50: None, p99: None, count: 0 },
            cpu_seconds: 1.0,
            cpu_seconds_per_million: 500.0,
            broker_cpu_seconds_per_million: None,
            peak_rss_mib: 80.25,
            counted_inflight: 2000,
            counted_postflight: 2000,
            all_counted: true,
            final_aggregates: 12,
            corrections: 0,
            late: 0,
            dlq: 0,
        }
    }

    #[test]
    fn table_has_a_column_per_guarantee_and_every_figure() {
        let r = BenchReport {
            pulses_version: "0.1.0".into(),
            nproc: 2,
            pulses: 2000,
            rate: Some(1000.0),
            partitions: 6,
            tenants: 10,
            skus: 4,
            grace_ms: 1000,
            idle_timeout_ms: 2000,
            broker: Some(BrokerBaseline { produce_pulses_per_s: 90_000.0, consume_pulses_per_s: 300_000.0 }),
            runs: vec![mode("exactly_once"), mode("at_least_once")],
        };
        let t = render_table(&r);
        assert!(t.starts_with("pulses bench 0.1.0: 2000 pulses at 1000/s, 6 partitions"), "{t}");
        assert!(t.contains("broker alone: produce 90000 pulses/s, consume 300000 pulses/s"), "{t}");
        let line = |p: &str| t.lines().find(|l| l.starts_with(p)).unwrap_or_default().to_owned();
        assert!(line("guarantee").contains("exactly_once") && line("guarantee").contains("at_least_once"), "{t}");
        assert!(line("throughput").ends_with("4000"), "{t}");
        assert!(line("end-to-end 1s").contains("1.200 / 1.800"), "{t}");
        assert!(line("window close 10s").contains("- / -"), "{t}");
        assert!(line("peak RSS").contains("80.2") || line("peak RSS").contains("80.3"), "{t}");
        assert!(line("all pulses counted").contains("true (2000 / 2000)"), "{t}");
        // Same width for every line of the table body.
        let widths: Vec<usize> = t.lines().skip(2).map(str::len).collect();
        assert!(widths.windows(2).all(|w| w[0] == w[1]), "{t}");

        let json: serde_json::Value = serde_json::to_value(&r).unwrap();
        assert_eq!(json["runs"][1]["guarantee"], "at_least_once");
        assert_eq!(json["runs"][0]["end_to_end_inflight_s"]["p99"], 1.8);
        assert_eq!(json["broker"]["produce_pulses_per_s"], 90_000.0);
    }
}
