//! Operations against a real broker and the real binary: /metrics counts exactly what
//! was sent, /readyz waits for the restore, /healthz answers.

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use common::agg::*;
use common::http::{get, scrape};
use common::*;

fn value(m: &BTreeMap<String, f64>, series: &str) -> f64 {
    *m.get(series).unwrap_or_else(|| panic!("no series {series} in /metrics:\n{m:#?}"))
}

#[test]
fn metrics_count_what_was_sent_and_readyz_waits_for_the_restore() {
    // One source partition keeps event-time order into every grouped partition: no
    // pulse arrives after its window closed, so there are no corrections.
    const GROUPED_PARTITIONS: i32 = PARTITIONS;
    let t = Topics::create_with("ops", 1, GROUPED_PARTITIONS);
    // No wall-clock closing: every output comes from event time, so the counts are
    // final once the input is committed.
    let config = config("1h", "1h");

    // The input: 240 valid pulses (4 tenants, 20 s of event time, 10 min ago), 6 of
    // them re-sent (same pulse_id: duplicates), and invalid records per reason.
    let base = (now_ms() / 60_000 - 10) * 60_000;
    let valid: Vec<P> = (0..240i64)
        .map(|i| P {
            id: format!("ops-{i}"),
            tenant: format!("tenant-{}", i % 4),
            sku: "compute.vcpu".into(),
            unit: "vCPU-s".into(),
            amount: rust_decimal::Decimal::new(i + 1, 2),
            at: base + i * 83,
        })
        .collect();
    let resent: Vec<P> = valid.iter().step_by(40).cloned().collect();
    type Invalid = (&'static str, usize, fn(usize) -> String);
    let invalid: [Invalid; 4] = [
        ("invalid_json", 2, |i| format!("{{broken {i}")),
        ("missing_field", 3, |i| format!(r#"{{"pulse_id":"m{i}","product_sku":"s","use_unit":"u","used_amount":"1"}}"#)),
        ("negative_amount", 4, |i| {
            format!(r#"{{"pulse_id":"n{i}","tenant_id":"t","product_sku":"s","use_unit":"u","used_amount":"-{i}.5"}}"#)
        }),
        ("bad_timestamp", 1, |i| {
            format!(r#"{{"pulse_id":"b{i}","tenant_id":"t","product_sku":"s","use_unit":"u","used_amount":"1","timestamp":"noon {i}"}}"#)
        }),
    ];
    let mut records: Vec<(Option<Vec<u8>>, Vec<u8>)> = valid.iter().chain(&resent).map(|p| (None, p.json())).collect();
    for (_, n, make) in &invalid {
        records.extend((0..*n).map(|i| (None, make(i).into_bytes())));
    }
    produce(&t.source, &records);
    let sent_valid = (valid.len() + resent.len()) as f64;
    let sent_invalid: usize = invalid.iter().map(|(_, n, _)| n).sum();

    let mut p = Proc::run(&t, &config, &[]);
    let addr = p.http_addr();
    assert_eq!(get(&addr, "/healthz"), Some((200, "ok\n".into())));
    wait_pipeline_done(&t);
    let aggregates = read_all(&t.aggregated).len() as f64;
    assert!(aggregates > 0.0, "windows closed by event time");

    let m = scrape(&addr);
    let s = |stage: &str, topic: &str| format!("{{stage=\"{stage}\",topic=\"{topic}\"}}");
    assert_eq!(value(&m, &format!("pulses_records_consumed_total{}", s("group", &t.source))), sent_valid + sent_invalid as f64);
    assert_eq!(value(&m, &format!("pulses_records_produced_total{}", s("group", &t.grouped))), sent_valid);
    assert_eq!(value(&m, &format!("pulses_records_consumed_total{}", s("aggregate", &t.grouped))), sent_valid);
    assert_eq!(value(&m, &format!("pulses_records_produced_total{}", s("aggregate", &t.aggregated))), aggregates);
    assert_eq!(value(&m, "pulses_duplicates_total"), resent.len() as f64);
    for reason in ["invalid_json", "missing_field", "negative_amount", "bad_timestamp", "invalid_amount", "invalid_field", "field_too_long", "unknown_schema"] {
        let want = invalid.iter().find(|(r, _, _)| *r == reason).map_or(0, |(_, n, _)| *n);
        let series = format!("pulses_dlq_records_total{{topic=\"{}\",reason=\"{reason}\"}}", t.dlq);
        assert_eq!(value(&m, &series), want as f64, "{reason}");
    }
    assert_eq!(read_all(&t.dlq).len(), sent_invalid);
    assert!(value(&m, "pulses_transactions_total{stage=\"group\",outcome=\"committed\"}") >= 1.0);
    assert!(value(&m, "pulses_transactions_total{stage=\"aggregate\",outcome=\"committed\"}") >= 1.0);
    assert_eq!(value(&m, "pulses_transactions_total{stage=\"aggregate\",outcome=\"aborted\"}"), 0.0);
    // Every final aggregate is timed once its transaction committed. Polled: the
    // histograms are updated just after the commit the test waited for.
    let out: Vec<serde_json::Value> = read_all(&t.aggregated).iter().map(Record::json).collect();
    let finals = out.iter().filter(|v| v["final"] == true).count() as f64;
    assert!(out.iter().all(|v| v["revision"] == 0), "in-order input: no corrections");
    let sum = |m: &BTreeMap<String, f64>, family: &str| -> f64 {
        m.iter().filter(|(k, _)| k.starts_with(&format!("{family}_count"))).map(|(_, v)| v).sum()
    };
    wait_for("every final aggregate timed", DEADLINE, || {
        let m = scrape(&addr);
        let (delay, e2e) = (sum(&m, "pulses_window_close_delay_seconds"), sum(&m, "pulses_end_to_end_latency_seconds"));
        assert!(delay <= finals && e2e <= finals, "{delay} / {e2e} timed, {finals} finals");
        (delay == finals && e2e == finals).then_some(())
    });
    let m = scrape(&addr);
    assert!(value(&m, "pulses_end_to_end_latency_seconds_count{window=\"inflight\"}") > 0.0);
    assert_eq!(value(&m, "pulses_corrections_total"), 0.0);
    assert_eq!(value(&m, "pulses_ready"), 1.0);
    // Every transaction's Kafka part is timed once, and every stage commit is timed
    // (polled: a commit may be between its count and its timing at a scrape).
    wait_until("commit and transaction timings", DEADLINE, || {
        let m = scrape(&addr);
        for stage in ["group", "aggregate"] {
            let v = |series: String| value(&m, &series);
            let outcomes = v(format!("pulses_transactions_total{{stage=\"{stage}\",outcome=\"committed\"}}"))
                + v(format!("pulses_transactions_total{{stage=\"{stage}\",outcome=\"aborted\"}}"));
            let timed = v(format!("pulses_transaction_duration_seconds_count{{stage=\"{stage}\"}}"));
            let commits = v(format!("pulses_commit_duration_seconds_count{{stage=\"{stage}\"}}"));
            if timed != outcomes || timed == 0.0 || commits < timed {
                return Err(format!("{stage}: {outcomes} transactions, {timed} timed, {commits} commits timed"));
            }
        }
        Ok(())
    });
    // Lag comes from librdkafka statistics every 5 s: a series per partition, and once
    // the pipeline is done each is 0, or 1 where the partition ends in a transaction
    // marker (committed offsets point past the last record, before its marker).
    wait_until("consumer lag series, caught up", DEADLINE, || {
        let m = scrape(&addr);
        let lags = |stage: &str| -> Vec<(String, f64)> {
            m.iter().filter(|(k, _)| k.starts_with(&format!("pulses_consumer_lag{{stage=\"{stage}\""))).map(|(k, v)| (k.clone(), *v)).collect()
        };
        let (group, aggregate) = (lags("group"), lags("aggregate"));
        let caught_up = group.iter().chain(&aggregate).all(|(_, v)| (0.0..=1.0).contains(v));
        if group.len() == 1 && aggregate.len() == GROUPED_PARTITIONS as usize && caught_up {
            Ok(())
        } else {
            Err(format!("{group:?} {aggregate:?}"))
        }
    });

    // Restart on fresh state: the new replica restores every store from the changelog,
    // and /readyz must not say ready before that is done.
    assert!(p.terminate(Duration::from_secs(60)).success());
    let changelog: Vec<Record> = read_all(&format!("{}-windows-changelog", t.app));
    let changelog_records = changelog.iter().filter(|r| r.key.is_some()).count() as f64;
    assert!(changelog_records > 0.0);

    let started = Instant::now();
    let p2 = Proc::run(&t, &config, &[]);
    let addr = p2.http_addr();
    let mut not_ready = Vec::new();
    let ready_metrics = wait_for("/readyz to turn 200", DEADLINE, || match get(&addr, "/readyz") {
        Some((200, _)) => Some(scrape(&addr)),
        Some((503, body)) => {
            not_ready.push(body);
            None
        }
        other => panic!("unexpected /readyz answer {other:?}"),
    });
    assert!(!not_ready.is_empty(), "/readyz was never observed not ready");
    assert!(not_ready.iter().all(|b| b.starts_with("not ready: ")), "{not_ready:?}");
    // Each partition's restore polls the changelog for a while: that phase is seen.
    assert!(not_ready.iter().any(|b| b.contains("restoring state of partitions")), "{not_ready:?}");
    // Scraped right after the first 200: the restore was complete by then.
    assert_eq!(value(&ready_metrics, "pulses_restored_records_total"), changelog_records);
    for partition in 0..GROUPED_PARTITIONS {
        assert_eq!(value(&ready_metrics, &format!("pulses_restore_done{{partition=\"{partition}\"}}")), 1.0);
    }
    eprintln!(
        "restored {changelog_records} changelog records; ready after {:?}; {} not-ready answers first: {:?}",
        started.elapsed(),
        not_ready.len(),
        not_ready.iter().collect::<std::collections::BTreeSet<_>>()
    );
}

fn contains(haystack: &[u8], needle: &str) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle.as_bytes())
}

/// A few valid pulses, processed by a replica started with `extra` flags; returns the
/// replica's log after a clean SIGTERM.
fn process_a_few_pulses(name: &str, extra: &[&str]) -> String {
    let t = Topics::create(name, 1);
    let at = now_ms() - 60_000;
    let pulses: Vec<P> = (0..20i64)
        .map(|i| P { id: format!("{name}-{i}"), tenant: format!("t{}", i % 3), sku: "s".into(), unit: "u".into(), amount: 1.into(), at: at + i * 100 })
        .collect();
    produce_pulses(&t.source, &pulses);
    let mut p = Proc::run(&t, &config("1h", "1h"), extra);
    wait_pipeline_done(&t);
    assert!(p.terminate(Duration::from_secs(60)).success(), "clean exit");
    p.log()
}

#[test]
fn spans_arrive_at_an_otlp_collector() {
    let (url, requests) = common::collector::start();
    let log = process_a_few_pulses("otlp", &["--otlp-endpoint", &url]);
    assert!(log.contains("exporting traces and metrics over OTLP/HTTP"), "{log}");
    // Flushed on shutdown at the latest.
    let requests = requests.lock().unwrap().clone();
    let traces: Vec<&Vec<u8>> = requests.iter().filter(|(p, _)| p == "/v1/traces").map(|(_, b)| b).collect();
    assert!(!traces.is_empty(), "no POST /v1/traces; got {:?}", requests.iter().map(|(p, b)| (p, b.len())).collect::<Vec<_>>());
    let all: Vec<u8> = traces.iter().flat_map(|b| b.iter().copied()).collect();
    for needle in ["pulses", "transaction", "batch", "stage", "group", "aggregate", "partition", "records"] {
        assert!(contains(&all, needle), "span data lacks {needle:?}");
    }
    let metrics: Vec<u8> = requests.iter().filter(|(p, _)| p == "/v1/metrics").flat_map(|(_, b)| b.iter().copied()).collect();
    assert!(contains(&metrics, "pulses.records.consumed"), "metrics exported on shutdown");
    eprintln!("collector got {} trace requests ({} bytes), {} metrics bytes", traces.len(), all.len(), metrics.len());
}

fn assert_no_otel_complaint(log: &str) {
    assert!(log.contains("stage 2 (aggregate) stopped"), "{log}");
    for line in log.lines() {
        let lower = line.to_lowercase();
        let complaint = line.contains("ERROR") || line.contains("WARN");
        let otel = ["otel", "otlp", "opentelemetry", "/v1/traces", "/v1/metrics"].iter().any(|w| lower.contains(w));
        assert!(!(complaint && otel), "{line}");
    }
}

#[test]
fn without_an_endpoint_nothing_about_otel_is_logged() {
    assert!(std::env::var_os("OTEL_EXPORTER_OTLP_ENDPOINT").is_none(), "the test environment sets an endpoint");
    let log = process_a_few_pulses("nootlp", &[]);
    assert_no_otel_complaint(&log);
    assert!(!log.contains("OTLP"), "no exporter without an endpoint");
}

#[test]
fn without_a_collector_listening_no_error_is_logged() {
    // A port that was free a moment ago: nothing listens there.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let log = process_a_few_pulses("deadotlp", &["--otlp-endpoint", &format!("http://127.0.0.1:{port}")]);
    assert!(log.contains("exporting traces and metrics over OTLP/HTTP"), "{log}");
    assert_no_otel_complaint(&log);
}
