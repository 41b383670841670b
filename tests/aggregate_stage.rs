//! Stage 2 against a real broker: windows, grace, corrections, retention, dedupe, idle.
//! Expected aggregates are computed here by a plain fold over the test's own input.

mod common;

use std::collections::{BTreeMap, HashSet};
use std::time::{Duration, Instant};

use common::agg::*;
use common::*;
use rust_decimal::Decimal;

#[test]
fn scripted_dataset_matches_an_independent_fold() {
    let t = Topics::create("scripted", 1); // one source partition: input order is kept
    let base = (now_ms() / 60_000 - 10) * 60_000; // a minute boundary, 10 minutes ago
    let tenants = ["t-a", "t-b", "t-c", "t-d"];
    let skus = ["storage.standard", "compute.vcpu", "api.requests"];
    let units = ["GB", "vCPU-s"];
    let mut keys: Vec<(&str, &str, &str)> = Vec::new();
    for t in tenants {
        for s in skus {
            for u in units {
                keys.push((t, s, u));
            }
        }
    }
    let pulse = |id: String, k: &(&str, &str, &str), amount: Decimal, at: i64| P {
        id,
        tenant: k.0.into(),
        sku: k.1.into(),
        unit: k.2.into(),
        amount,
        at,
    };

    // Phase A: 20 pulses per key over the first minute, then every 10th moved five
    // places later: out of order by well under the 5 s grace.
    let mut a: Vec<P> = Vec::new();
    for (ki, k) in keys.iter().enumerate() {
        for i in 0..20i64 {
            let amount = Decimal::new(i * 1000 + (ki as i64 * 7) % 1000 + 1, 3);
            a.push(pulse(format!("A-{ki}-{i}"), k, amount, base + i * 2_900 + ki as i64 * 37));
        }
    }
    a.sort_by_key(|p| p.at);
    for i in (0..a.len() - 6).step_by(10) {
        let p = a.remove(i);
        a.insert(i + 5, p);
    }
    let dup_a: Vec<P> = a.iter().step_by(23).cloned().collect();
    // Phase B: one pulse per tenant at base + 70 s closes every window of phase A.
    let push1: Vec<P> = tenants.iter().map(|t| pulse(format!("B-{t}"), &(*t, "clock", "tick"), Decimal::ONE, base + 70 * SECOND)).collect();
    // Phase C: late after grace, within the 30 s retention: corrections (revision 1+).
    let c: Vec<P> = keys.iter().enumerate().step_by(2)
        .map(|(ki, k)| pulse(format!("C-{ki}"), k, Decimal::new(5, 1), base + 45 * SECOND + ki as i64 * 400))
        .collect();
    // Phase D: stream time to base + 200 s; then pulses for base + 10 s are beyond
    // retention (late topic); duplicates of phase C are not counted again.
    let push2: Vec<P> = tenants.iter().map(|t| pulse(format!("D-{t}"), &(*t, "clock", "tick"), Decimal::ONE, base + 200 * SECOND)).collect();
    let beyond: Vec<P> = keys.iter().enumerate().take(12)
        .map(|(ki, k)| pulse(format!("X-{ki}"), k, Decimal::new(99, 0), base + 10 * SECOND + ki as i64))
        .collect();

    let mut input = Vec::new();
    for phase in [&a, &dup_a, &push1, &c, &push2, &beyond, &c] {
        input.extend(phase.iter().cloned());
    }
    produce_pulses(&t.source, &input);
    let _p = Proc::run(&t, &config("30s", "1h"), &[]);
    wait_pipeline_done(&t);

    let counted: Vec<P> = a.iter().chain(&push1).chain(&c).chain(&push2).cloned().collect();
    let closed_before = base + 200 * SECOND - 5 * SECOND; // watermark - grace
    let expected = fold(&counted, WINDOWS, closed_before);
    let (got, emitted) = latest_finals(&t.aggregated);
    let got_values: BTreeMap<AggKey, Expect> = got.iter().map(|(k, (_, e))| (k.clone(), e.clone())).collect();
    for (k, e) in &expected {
        assert_eq!(got_values.get(k), Some(e), "aggregate {k:?}");
    }
    assert_eq!(got_values.len(), expected.len(), "no unexpected final aggregates ({emitted} records)");
    let corrected: Vec<_> = got.iter().filter(|(_, (rev, _))| *rev >= 1).collect();
    assert!(!corrected.is_empty(), "phase C corrected closed windows");
    let size = |w: &str| WINDOWS.iter().find(|(n, _)| *n == w).map(|(_, s)| *s).unwrap();
    for (k, _) in &corrected {
        let touched = c.iter().any(|p| (&p.tenant, &p.sku, &p.unit) == (&k.0, &k.1, &k.2) && p.at >= k.4 && p.at < k.4 + size(&k.3));
        assert!(touched, "only windows holding a phase C pulse are corrected: {k:?}");
    }

    let late = read_all(&t.late);
    let late_ids: HashSet<String> = late.iter().map(|r| r.json()["pulse_id"].as_str().unwrap().to_owned()).collect();
    assert_eq!(late.len(), beyond.len());
    assert_eq!(late_ids, beyond.iter().map(|p| p.id.clone()).collect());
    assert!(late.iter().all(|r| r.headers["late.reason"] == "beyond_retention"));
}

#[test]
fn seed_scenario_ten_per_second_for_thirty_seconds() {
    let t = Topics::create("seed", 1);
    let base = (now_ms() / 60_000 - 5) * 60_000;
    let pulses: Vec<P> = (0..300)
        .map(|i| P { id: format!("s{i}"), tenant: "acme".into(), sku: "api.requests".into(), unit: "requests".into(), amount: Decimal::ONE, at: base + i * 100 })
        .collect();
    produce_pulses(&t.source, &pulses);
    // Nothing pushes the watermark: the idle advance closes the windows.
    let _p = Proc::run(&t, &config("1h", "2s"), &[]);
    let got = wait_for("seed windows closed", DEADLINE, || {
        let (got, _) = latest_finals(&t.aggregated);
        let n = |w: &str| got.keys().filter(|k| k.3 == w).count();
        (n("inflight") == 30 && n("postflight") == 3 && n("minute") == 1).then_some(got)
    });
    for ((.., window, _), (rev, e)) in &got {
        let want = match window.as_str() {
            "inflight" => 10,
            "postflight" => 100,
            _ => 300,
        };
        assert_eq!((e.count, e.total, *rev), (want, Decimal::from(want), 0), "{window}");
    }
}

#[test]
fn idle_partitions_close_trailing_windows_in_time() {
    let t = Topics::create("idle", PARTITIONS);
    let _p = Proc::run(&t, &config("1h", "5s"), &[]);
    // Live pulses: event time = now, 8 tenants, for 3 s.
    let mut pulses = Vec::new();
    let start = now_ms();
    let mut i = 0;
    while now_ms() < start + 3_000 {
        let at = now_ms();
        pulses.push(P { id: format!("i{i}"), tenant: format!("t{}", i % 8), sku: "api.requests".into(), unit: "requests".into(), amount: Decimal::new(i + 1, 2), at });
        produce_pulses(&t.source, &pulses[pulses.len() - 1..]);
        i += 1;
    }
    let input_end = Instant::now();
    let expected = fold(&pulses, WINDOWS, i64::MAX);
    // idle_timeout + grace + the longest window, plus slack for the group join.
    let bound = Duration::from_secs(5 + 5 + 60 + 30);
    let got = wait_for("trailing windows closed by idle advance", bound, || {
        let (got, _) = latest_finals(&t.aggregated);
        expected.keys().all(|k| got.contains_key(k)).then_some(got)
    });
    eprintln!("trailing windows closed {:?} after input ended", input_end.elapsed());
    for (k, e) in &expected {
        assert_eq!(&got[k].1, e, "{k:?}");
    }
    let total: u64 = got.iter().filter(|(k, _)| k.3 == "postflight").map(|(_, (_, e))| e.count).sum();
    assert_eq!(total, pulses.len() as u64);
}

/// `[[windows]]` with its stored windows' config `windows`, windows of `extra` first.
fn windows_config(windows: &[(&str, &str)]) -> String {
    let mut cfg = "[aggregate]\ngrace = \"5s\"\nretention = \"1h\"\nidle_timeout = \"1h\"\nmax_batch_wait = \"50ms\"\n".to_owned();
    for (name, size) in windows {
        cfg.push_str(&format!("\n[[windows]]\nname = \"{name}\"\nsize = \"{size}\"\n"));
    }
    cfg
}

/// Windows reordered and one added across a SIGTERM restart: every window keeps its
/// name and its exact total (the stored state names windows by name and size, not by
/// their place in the configuration); a window resized under its name is refused at
/// start with what changed.
#[test]
fn reordered_and_added_windows_keep_their_names_and_totals_across_a_restart() {
    let t = Topics::create("windows-reordered", PARTITIONS);
    let base = (now_ms() / 60_000 - 20) * 60_000;
    let tenants = 12;
    let pulse = |i: i64, at: i64| P {
        id: format!("w{i}"),
        tenant: format!("t{}", i % tenants),
        sku: "api.requests".into(),
        unit: "requests".into(),
        amount: Decimal::new(i % 97 + 1, 2),
        at,
    };
    // 90 s of event time before the restart, 90 s after, 4 pulses a second.
    let first: Vec<P> = (0..360).map(|i| pulse(i, base + i * 250)).collect();
    let second: Vec<P> = (360..720).map(|i| pulse(i, base + i * 250)).collect();
    // One pulse per tenant at 240 s closes every window ending by 235 s in every partition.
    let push: Vec<P> = (0..tenants).map(|i| pulse(10_000 + i, base + 240 * SECOND)).collect();

    let before = windows_config(&[("inflight", "1s"), ("postflight", "10s"), ("minute", "1m")]);
    produce_pulses(&t.source, &first);
    let mut live = Proc::run(&t, &before, &[]);
    wait_pipeline_done(&t);
    assert!(live.terminate(DEADLINE).success(), "clean exit on SIGTERM");

    let after = windows_config(&[("minute", "1m"), ("quarter", "15s"), ("postflight", "10s"), ("inflight", "1s")]);
    let live = Proc::run_in(&t, &after, &[], live.into_state());
    produce_pulses(&t.source, &second);
    produce_pulses(&t.source, &push);
    let all: Vec<P> = first.iter().chain(&second).chain(&push).cloned().collect();
    let after_restart: Vec<P> = second.iter().chain(&push).cloned().collect();
    let closed_before = base + 235 * SECOND;
    let mut expected = fold(&all, WINDOWS, closed_before);
    // The added window counts from the restart on; its windows start at 90 s or later.
    expected.extend(fold(&after_restart, &[("quarter", 15 * SECOND)], closed_before));
    wait_pipeline_done(&t);
    let finals = wait_for("every expected window final", DEADLINE, || {
        let (finals, _) = latest_finals(&t.aggregated);
        (finals.len() >= expected.len()).then_some(finals)
    });
    let got: BTreeMap<AggKey, Expect> = finals.into_iter().map(|(k, (_, e))| (k, e)).collect();
    let wrong: Vec<_> = expected.iter().filter(|(k, e)| got.get(*k) != Some(*e)).take(5).collect();
    assert!(wrong.is_empty(), "{} of {} windows wrong or missing, e.g. {wrong:?}", expected.iter().filter(|(k, e)| got.get(*k) != Some(*e)).count(), expected.len());
    let unexpected: Vec<_> = got.keys().filter(|k| !expected.contains_key(*k)).take(5).collect();
    assert!(unexpected.is_empty(), "windows nobody expected: {unexpected:?}");
    eprintln!("{} final windows exact across the reordering restart", expected.len());

    // Resized under its name: refused at start, saying what changed.
    let mut live = live;
    assert!(live.terminate(DEADLINE).success());
    let resized = windows_config(&[("minute", "2m"), ("quarter", "15s"), ("postflight", "10s"), ("inflight", "1s")]);
    let mut refused = Proc::run_in(&t, &resized, &[], live.into_state());
    produce_pulses(&t.source, &[pulse(20_000, base + 250 * SECOND)]);
    let status = wait_for("pulses to refuse the resized window", DEADLINE, || refused.child.try_wait().expect("try_wait"));
    assert!(!status.success());
    let log = refused.log();
    assert!(log.contains("window \\\"minute\\\" is configured as 2m but the state holds it as 1m")
        || log.contains("window \"minute\" is configured as 2m but the state holds it as 1m"), "{log}");
}
