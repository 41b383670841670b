//! Stage 1 against a real broker: grouping, DLQ, kcat, restart, SIGTERM.

mod common;

use std::collections::{HashMap, HashSet};
use std::process::Command;
use std::time::Duration;

use common::*;

/// Only stage 1 runs in these tests.
const GROUP_ONLY: &[&str] = &["--stages", "group"];

fn stub(topics: &Topics, args: &[&str]) {
    let status = Command::new(pulses_bin()).arg("stub").args(topics.flags()).args(args).status().expect("run stub");
    assert!(status.success(), "pulses stub failed");
}

#[test]
fn ten_thousand_stub_pulses_are_grouped_by_tenant() {
    let t = Topics::create("group10k", PARTITIONS);
    stub(&t, &["--count", "10000", "--tenants", "25", "--skus", "6", "--seed", "7"]);
    // The input, read back as the producer wrote it: the independent expectation.
    let input = read_all(&t.source);
    assert_eq!(input.len(), 10_000);
    let expected: HashMap<String, (String, String)> = input
        .iter()
        .map(|r| {
            let v = r.json();
            (v["pulse_id"].as_str().unwrap().to_owned(), (v["tenant_id"].as_str().unwrap().to_owned(), v["used_amount"].as_str().unwrap().to_owned()))
        })
        .collect();
    assert_eq!(expected.len(), 10_000, "stub pulse_ids are unique");

    let _p = Proc::run(&t, "", GROUP_ONLY);
    wait_all_committed(&format!("{}.group", t.app), &t.source);
    let grouped = read_all(&t.grouped);
    assert_eq!(grouped.len(), 10_000);
    let mut partition_of: HashMap<String, i32> = HashMap::new();
    let mut ids = HashSet::new();
    for r in &grouped {
        let v = r.json();
        let tenant = v["tenant_id"].as_str().unwrap();
        assert_eq!(r.key_str(), tenant, "key is the tenant_id");
        assert_eq!(*partition_of.entry(tenant.to_owned()).or_insert(r.partition), r.partition, "{tenant} in one partition");
        let id = v["pulse_id"].as_str().unwrap();
        let (want_tenant, want_amount) = &expected[id];
        assert_eq!((tenant, v["used_amount"].as_str().unwrap()), (want_tenant.as_str(), want_amount.as_str()));
        assert!(ids.insert(id.to_owned()), "pulse {id} grouped twice");
    }
    assert_eq!(partition_of.len(), 25);
    assert_eq!(read_all(&t.dlq).len(), 0);
}

#[test]
fn invalid_records_go_to_the_dlq_with_their_reason() {
    let t = Topics::create("dlq", PARTITIONS);
    let long = "x".repeat(129);
    type Kind = (&'static str, Box<dyn Fn(usize) -> String>);
    let kinds: Vec<Kind> = vec![
        ("invalid_json", Box::new(|i| format!("{{not json {i}"))),
        ("missing_field", Box::new(|i| format!(r#"{{"pulse_id":"m{i}","product_sku":"s","use_unit":"u","used_amount":"1"}}"#))),
        ("negative_amount", Box::new(|i| format!(r#"{{"pulse_id":"n{i}","tenant_id":"t","product_sku":"s","use_unit":"u","used_amount":"-{i}.5"}}"#))),
        ("invalid_amount", Box::new(|i| format!(r#"{{"pulse_id":"a{i}","tenant_id":"t","product_sku":"s","use_unit":"u","used_amount":"{i},5"}}"#))),
        ("bad_timestamp", Box::new(|i| format!(r#"{{"pulse_id":"b{i}","tenant_id":"t","product_sku":"s","use_unit":"u","used_amount":"1","timestamp":"day {i}"}}"#))),
        ("field_too_long", Box::new(move |i| format!(r#"{{"pulse_id":"l{i}","tenant_id":"{long}","product_sku":"s","use_unit":"u","used_amount":"1"}}"#))),
    ];
    let mut records = Vec::new();
    let mut valid = 0;
    let mut expected_reason: HashMap<Vec<u8>, &str> = HashMap::new();
    for i in 0..50 {
        for (reason, make) in &kinds {
            let key = format!("bad-{reason}-{i}").into_bytes();
            expected_reason.insert(key.clone(), reason);
            records.push((Some(key), make(i).into_bytes()));
            let ok = format!(r#"{{"pulse_id":"v{valid}","tenant_id":"tenant-{}","product_sku":"api.requests","use_unit":"requests","used_amount":{valid}}}"#, valid % 7);
            records.push((None, ok.into_bytes()));
            valid += 1;
        }
    }
    produce(&t.source, &records);

    let _p = Proc::run(&t, "", GROUP_ONLY);
    wait_all_committed(&format!("{}.group", t.app), &t.source);
    let dlq = read_all(&t.dlq);
    assert_eq!(dlq.len(), 300);
    let mut per_reason: HashMap<String, usize> = HashMap::new();
    let originals: HashMap<Vec<u8>, Vec<u8>> = records.iter().filter_map(|(k, v)| k.clone().map(|k| (k, v.clone()))).collect();
    for r in &dlq {
        let key = r.key.clone().expect("DLQ keeps the original key");
        assert_eq!(r.headers["error.reason"], expected_reason[&key], "reason of {}", r.key_str());
        assert_eq!(r.value, originals[&key], "DLQ keeps the original bytes");
        assert!(!r.headers["error.detail"].is_empty());
        assert_eq!(r.headers["source.topic"], t.source);
        assert!(r.headers["source.offset"].parse::<i64>().is_ok());
        *per_reason.entry(r.headers["error.reason"].clone()).or_default() += 1;
    }
    assert_eq!(per_reason.len(), 6);
    assert!(per_reason.values().all(|n| *n == 50), "{per_reason:?}");
    let grouped = read_all(&t.grouped);
    assert_eq!(grouped.len(), valid);
    let ids: HashSet<String> = grouped.iter().map(|r| r.json()["pulse_id"].as_str().unwrap().to_owned()).collect();
    assert_eq!(ids, (0..valid).map(|i| format!("v{i}")).collect());
}

#[test]
fn a_pulse_produced_with_kcat_arrives_grouped() {
    let t = Topics::create("kcat", 1);
    // The README's example, verbatim but for the topic, with Debian's kcat.
    let pulse = r#"{"pulse_id":"kcat-1","tenant_id":"acme","product_sku":"storage.standard","used_amount":"12.5","use_unit":"GB","timestamp":"2026-11-22T10:00:00.123Z"}"#;
    let mut child = Command::new("kcat")
        .args(["-P", "-b", &bootstrap(), "-t", &t.source])
        .stdin(std::process::Stdio::piped())
        .spawn()
        .expect("run kcat");
    use std::io::Write;
    child.stdin.take().unwrap().write_all(format!("{pulse}\n").as_bytes()).unwrap();
    assert!(child.wait().unwrap().success(), "kcat -P failed");

    let _p = Proc::run(&t, "", GROUP_ONLY);
    let grouped = wait_for("the kcat pulse grouped", DEADLINE, || {
        let r = read_all(&t.grouped);
        (!r.is_empty()).then_some(r)
    });
    assert_eq!(grouped.len(), 1);
    let v = grouped[0].json();
    assert_eq!((v["pulse_id"].as_str(), v["used_amount"].as_str(), v["event_time"].as_str()), (Some("kcat-1"), Some("12.5"), Some("2026-11-22T10:00:00.123Z")));
    assert_eq!(grouped[0].key_str(), "acme");
}

#[test]
fn sigterm_commits_and_restart_does_not_re_emit() {
    let t = Topics::create("restart", PARTITIONS);
    let batch = |from: usize, n: usize| -> Vec<(Option<Vec<u8>>, Vec<u8>)> {
        (from..from + n)
            .map(|i| (None, format!(r#"{{"pulse_id":"r{i}","tenant_id":"t{}","product_sku":"s","use_unit":"u","used_amount":"0.1"}}"#, i % 5).into_bytes()))
            .collect()
    };
    produce(&t.source, &batch(0, 500));
    let mut p = Proc::run(&t, "", GROUP_ONLY);
    wait_for("500 grouped", DEADLINE, || (read_all(&t.grouped).len() >= 500).then_some(()));
    let started = std::time::Instant::now();
    let status = p.terminate(Duration::from_secs(10));
    assert!(status.success(), "exit status {status:?}");
    assert!(started.elapsed() < Duration::from_secs(10));
    // Offsets were committed on the way out: all of the source, without waiting.
    let committed = committed(&format!("{}.group", t.app), &t.source);
    let ends = end_offsets(&t.source);
    for (part, end) in &ends {
        assert_eq!(committed.get(part).copied().unwrap_or(0), *end, "partition {part} committed to its end");
    }
    let state = p.into_state();

    produce(&t.source, &batch(500, 200));
    let _p2 = Proc::run_in(&t, "", GROUP_ONLY, state);
    wait_all_committed(&format!("{}.group", t.app), &t.source);
    let grouped = read_all(&t.grouped);
    let ids: Vec<String> = grouped.iter().map(|r| r.json()["pulse_id"].as_str().unwrap().to_owned()).collect();
    let distinct: HashSet<&String> = ids.iter().collect();
    assert_eq!(distinct.len(), 700);
    assert_eq!(ids.len(), 700, "nothing re-emitted after the restart");
}

#[test]
fn help_describes_every_flag() {
    let commands = ["run", "stub", "check", "rate", "replay", "topology"];
    for args in std::iter::once(vec!["--help"]).chain(commands.iter().map(|c| vec![*c, "--help"])) {
        let out = Command::new(pulses_bin()).args(&args).output().expect("run --help");
        assert!(out.status.success());
        let text = String::from_utf8(out.stdout).unwrap();
        assert!(text.contains("Usage: pulses"), "{args:?}: {text}");
        if args.len() == 1 {
            for c in commands {
                assert!(text.contains(&format!("\n  {c} ")), "pulses --help lists {c}: {text}");
            }
        } else {
            for flag in ["--bootstrap-servers", "--application-id", "--state-dir", "--http-addr", "--source-topic", "--config"] {
                assert!(text.contains(flag), "{args:?} lacks {flag}");
            }
        }
    }
}
