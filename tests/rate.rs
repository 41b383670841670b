//! `pulses rate` against a real broker: the metering seed scenario end to end, and a
//! correction charged as a delta. Expected money is computed by hand in the comments.

mod common;

use common::agg::*;
use common::rating::*;
use common::*;
use rust_decimal::Decimal;

#[test]
fn seed_scenario_three_hundred_requests_earn_thirty_cents_and_one_alert() {
    let t = Topics::create("rate-seed", 1);
    // 10 requests per second for 30 s from 40 s past a minute: postflight windows
    // [40,50) [50,60) [60,70) hold 100 each; minute windows hold 200 and 100.
    let base = (now_ms() / 60_000 - 5) * 60_000 + 40 * SECOND;
    let pulses: Vec<P> = (0..300)
        .map(|i| P { id: format!("r{i}"), tenant: "one".into(), sku: "api.requests".into(), unit: "request".into(), amount: Decimal::ONE, at: base + i * 100 })
        .collect();
    produce_pulses(&t.source, &pulses);
    let cfg = config("1h", "2s");
    let _run = Proc::run(&t, &cfg, &[]);
    let rate = start_rate(&t, &cfg, tempfile::tempdir().unwrap(), None);

    // 300 × $0.001 = $0.300 exactly: 0.200 for the first minute, 0.100 for the second.
    wait_for("charges summing to 0.300", DEADLINE, || {
        (amounts(&rate.charges).iter().map(|(_, a)| *a).sum::<Decimal>() == d("0.300")).then_some(())
    });
    wait_all_committed(&format!("{}.rate", t.app), &t.aggregated);
    let charges = amounts(&rate.charges);
    let total: Decimal = charges.iter().map(|(_, a)| *a).sum();
    assert_eq!(total, d("0.300"));
    assert_eq!(total.to_string(), "0.300");
    let mut got: Vec<Decimal> = charges.iter().map(|(_, a)| *a).collect();
    got.sort();
    assert_eq!(got, vec![d("0.100"), d("0.200")], "one charge per minute window");

    let alerts = read_all(&rate.alerts);
    assert_eq!(alerts.len(), 1, "the 0.020 threshold fires exactly once");
    let a = alerts[0].json();
    assert_eq!((a["tenant_id"].as_str(), d(a["threshold"].as_str().unwrap())), (Some("one"), d("0.020")));

    let (finals, _) = latest_finals(&t.aggregated);
    let post: Vec<u64> = finals.iter().filter(|(k, _)| k.3 == "postflight").map(|(_, (_, e))| e.count).collect();
    assert_eq!(post, vec![100, 100, 100], "3 postflight aggregates of 100 requests");
}

#[test]
fn a_correction_is_charged_as_a_delta_and_redeliveries_charge_nothing() {
    let t = Topics::create("rate-fix", 1);
    let m = (now_ms() / 60_000 - 10) * 60_000;
    produce(&t.aggregated, &[
        aggregate("two", m, "80", 0, false),      // interim: not rated
        aggregate("two", m, "100", 0, true),      // 100 GB × 0.10 = 10.000
        aggregate("two", m, "100", 0, true),      // re-delivery: nothing
        aggregate("two", m, "150", 1, true),      // 10 + 50 × 0.08 = 14.000: delta 4.000
        aggregate("two", m, "100", 0, true),      // stale revision: nothing
    ]);
    let cfg = config("1h", "2s");
    let rate = start_rate(&t, &cfg, tempfile::tempdir().unwrap(), None);
    let group = format!("{}.rate", t.app);
    wait_all_committed(&group, &t.aggregated);
    let charges: Vec<serde_json::Value> = read_all(&rate.charges).iter().map(|r| r.json()).collect();
    let got: Vec<(u64, Decimal, Decimal, Decimal)> = charges.iter()
        .map(|c| (c["revision"].as_u64().unwrap(), d(c["quantity_delta"].as_str().unwrap()), d(c["amount"].as_str().unwrap()), d(c["balance_after"].as_str().unwrap())))
        .collect();
    assert_eq!(got, vec![(0, d("100"), d("10.000"), d("10.000")), (1, d("50"), d("4.000"), d("14.000"))]);
    assert_eq!(read_all(&rate.alerts).len(), 1, "0.020 crossed once");

    // Restart with the same state and a redelivered correction: nothing new. Then lose
    // the state dir: the ledger is restored from its changelog, still nothing new.
    let Rating { charges: ct, alerts: at, mut proc } = rate;
    assert!(proc.terminate(DEADLINE).success());
    let state = proc.into_state();
    produce(&t.aggregated, &[aggregate("two", m, "150", 1, true)]);
    let rate = start_rate(&t, &cfg, state, Some((&ct, &at)));
    wait_all_committed(&group, &t.aggregated);
    let Rating { mut proc, .. } = rate;
    assert!(proc.terminate(DEADLINE).success());
    produce(&t.aggregated, &[aggregate("two", m, "160", 2, true)]); // 14 + 10 × 0.08 = 14.800: delta 0.800
    let fresh = tempfile::tempdir().unwrap();
    let rate = start_rate(&t, &cfg, fresh, Some((&ct, &at)));
    wait_all_committed(&group, &t.aggregated);
    let charges: Vec<serde_json::Value> = read_all(&ct).iter().map(|r| r.json()).collect();
    assert_eq!(charges.len(), 3, "{charges:?}");
    assert_eq!((d(charges[2]["amount"].as_str().unwrap()), d(charges[2]["balance_after"].as_str().unwrap())), (d("0.800"), d("14.800")));
    let log = rate.proc.log();
    // Partition 0 holds the one tenant: its ledger (3 keys: the aggregate's charged
    // revision, the sku's period quantity, the balance) comes back from the changelog.
    let restored = log.lines().find(|l| l.contains("ledger restored partition=0 ")).expect("partition 0 restored");
    assert!(!restored.contains("restored_records=0 "), "the lost state was restored from the changelog: {restored}");
    assert!(!log.contains("rebuilding"), "the changelog had the ledger: no rebuild from the aggregated topic");
}

/// The same pulses through the pipeline with `output_format = "avro"` and with JSON,
/// each rated by `pulses rate`: the same charges, and the money computed by hand.
#[test]
fn avro_aggregates_are_billed_exactly_as_json_ones() {
    use common::registry::RegistryDouble;
    let reg = RegistryDouble::start();
    let base = (now_ms() / 60_000 - 10) * 60_000;
    // 600 requests over 54 s of one minute, 3 tenants, 1 to 5 requests each.
    let mut pulses: Vec<P> = (0..600i64)
        .map(|i| P { id: format!("a{i}"), tenant: format!("t{}", i % 3), sku: "api.requests".into(), unit: "request".into(),
            amount: Decimal::from(i % 5 + 1), at: base + i * 90 })
        .collect();
    // One unpriced pulse per tenant at 70 s closes the minute in every partition.
    pulses.extend((0..3).map(|i| P { id: format!("push{i}"), tenant: format!("t{i}"), sku: "clock".into(), unit: "tick".into(),
        amount: Decimal::ONE, at: base + 70 * SECOND }));
    // By hand: tenant k has the requests i ≡ k (mod 3), i % 5 + 1 each; $0.001 apiece.
    let mut want: Vec<(String, Decimal)> = (0..3)
        .map(|k| {
            let requests: i64 = (0..600).filter(|i| i % 3 == k).map(|i| i % 5 + 1).sum();
            (format!("t{k}"), Decimal::from(requests) * d("0.001"))
        })
        .collect();
    want.sort();
    assert_eq!(want.iter().map(|(_, a)| *a).sum::<Decimal>(), d("1.800"), "600 requests of 1 to 5: 1,800 × $0.001");

    for format in ["avro", "json"] {
        let t = Topics::create(&format!("rate-{format}"), 1);
        produce_pulses(&t.source, &pulses);
        let cfg = format!("output_format = \"{format}\"\n{}\n[schema_registry]\nurl = \"{}\"\n", config("1h", "1h"), reg.url);
        let _run = Proc::run(&t, &cfg, &[]);
        wait_pipeline_done(&t);
        if format == "avro" {
            let aggregates = read_all(&t.aggregated);
            assert!(!aggregates.is_empty() && aggregates.iter().all(|r| r.value.first() == Some(&0)), "Avro aggregates");
        }
        let rate = start_rate(&t, &cfg, tempfile::tempdir().unwrap(), None);
        // The finals are all written (the pipeline committed everything): rated once committed.
        wait_all_committed(&format!("{}.rate", t.app), &t.aggregated);
        let mut got: Vec<(String, Decimal)> = read_all(&rate.charges).iter()
            .map(|r| { let v = r.json(); (v["tenant_id"].as_str().unwrap().to_owned(), d(v["amount"].as_str().unwrap())) })
            .collect();
        got.sort();
        assert_eq!(got, want, "{format}: one charge per tenant for its minute");
        assert!(!rate.proc.log().contains("undecodable"), "{format}: every aggregate decoded");
    }
}
