//! `pulses bench` end to end against the local broker: both guarantees run, every
//! produced pulse is counted, the figures are present and sane. No timing thresholds.

mod common;

use std::collections::BTreeMap;
use std::process::Command;

use common::*;

#[test]
fn bench_reports_both_guarantees_and_counts_every_pulse() {
    let work = tempfile::tempdir().expect("tempdir");
    let out = Command::new(pulses_bin())
        // Paced over 3 s, so some 1 s windows close on data (the trailing ones, closed
        // by the idle timeout, are left out of the end-to-end latencies).
        .args(["bench", "--pulses", "3000", "--rate", "1000", "--guarantee", "both", "--format", "json", "--keep-topics"])
        .args(["--bootstrap-servers", &bootstrap(), "--work-dir", &work.path().display().to_string()])
        .current_dir(work.path())
        .env_remove("PULSES_CONFIG")
        .output()
        .expect("run pulses bench");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "pulses bench failed:\n{stderr}");
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON report on stdout");

    assert_eq!(report["pulses"], 3000);
    assert_eq!(report["partitions"], 6);
    assert!(report["nproc"].as_u64().unwrap() >= 1);
    assert_eq!(report["pulses_version"], env!("CARGO_PKG_VERSION"));
    assert!(report["broker"]["produce_pulses_per_s"].as_f64().unwrap() > 0.0);
    assert!(report["broker"]["consume_pulses_per_s"].as_f64().unwrap() > 0.0);
    let runs = report["runs"].as_array().expect("runs");
    let modes: Vec<&str> = runs.iter().map(|r| r["guarantee"].as_str().unwrap()).collect();
    assert_eq!(modes, ["exactly_once", "at_least_once"]);

    for r in runs {
        let mode = r["guarantee"].as_str().unwrap();
        assert_eq!(r["produced"], 3000, "{mode}");
        assert_eq!(r["counted_inflight"], 3000, "{mode}");
        assert_eq!(r["counted_postflight"], 3000, "{mode}");
        assert_eq!(r["all_counted"], true, "{mode}");
        assert_eq!((r["late"].as_u64(), r["dlq"].as_u64()), (Some(0), Some(0)), "{mode}");
        assert!(r["throughput_pulses_per_s"].as_f64().unwrap() > 0.0, "{mode}");
        assert!(r["cpu_seconds_per_million"].as_f64().unwrap() > 0.0, "{mode}");
        assert!(r["peak_rss_mib"].as_f64().unwrap() > 1.0, "{mode}");
        for q in ["end_to_end_inflight_s", "close_delay_inflight_s", "close_delay_postflight_s"] {
            let (p50, p99) = (r[q]["p50"].as_f64(), r[q]["p99"].as_f64());
            let (p50, p99) = (p50.unwrap_or_else(|| panic!("{mode} {q}: {r}")), p99.unwrap());
            assert!(p50 >= 0.0 && p50 <= p99, "{mode} {q}: {p50} > {p99}");
            assert!(r[q]["count"].as_u64().unwrap() > 0, "{mode} {q}");
        }
        // Every final record is in an end-to-end latency or among the trailing ones (a
        // 10 s window rarely closes on data within 3 s).
        let count = |q: &str| r[q]["count"].as_u64().unwrap();
        assert_eq!(
            count("end_to_end_inflight_s") + count("end_to_end_postflight_s") + r["trailing_finals"].as_u64().unwrap(),
            r["final_aggregates"].as_u64().unwrap(),
            "{mode}: {r}"
        );

        // Independently of the bench's own reader: the kept aggregated topic's final
        // postflight aggregates (latest revision per aggregate_id) count every pulse.
        let topic = format!("{}.aggregated", r["run_id"].as_str().unwrap());
        let mut latest: BTreeMap<String, (u64, u64)> = BTreeMap::new();
        for rec in read_all(&topic) {
            let v = rec.json();
            if v["final"] == true && v["window"] == "postflight" {
                let (rev, count) = (v["revision"].as_u64().unwrap(), v["pulse_count"].as_u64().unwrap());
                let e = latest.entry(v["aggregate_id"].as_str().unwrap().to_owned()).or_insert((rev, count));
                if rev >= e.0 {
                    *e = (rev, count);
                }
            }
        }
        assert_eq!(latest.values().map(|(_, c)| c).sum::<u64>(), 3000, "{mode}: {topic}");
    }
}
