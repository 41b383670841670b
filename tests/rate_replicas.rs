//! Two `pulses rate` replicas in one group, one killed with SIGKILL mid-stream and
//! restarted: every final aggregate revision is charged exactly once and every
//! tenant's balance is exact. Its own binary: a kill -9 test with several replicas.

mod common;

use std::collections::{BTreeMap, BTreeSet};

use common::agg::*;
use common::rating::*;
use common::*;
use rust_decimal::Decimal;

const TENANTS: usize = 40;
const MINUTES: i64 = 30;

/// The price book's graduated storage price, written out independently of pulses:
/// $0.10 per GB up to 100 GB in the period, $0.08 beyond.
fn storage_price(gb: i64) -> Decimal {
    let gb = Decimal::from(gb);
    let hundred = Decimal::from(100);
    gb.min(hundred) * d("0.10") + (gb - hundred).max(Decimal::ZERO) * d("0.08")
}

#[test]
fn two_replicas_one_killed_charge_every_revision_once_with_exact_balances() {
    let t = Topics::create("rate-replicas", 1);
    // 40 tenants × 30 minute windows, all within this UTC month (one billing period).
    let base = month_start(now_ms()) + 10 * 60 * SECOND;
    let tenant = |i: usize| format!("r{i:02}");
    let gb = |i: usize, m: i64| (i as i64 * 7 + m * 3) % 11 + 1;
    let mut records = Vec::new();
    // (aggregate_id, revision) produced; the final quantity per tenant.
    let mut revisions: BTreeSet<(String, u32)> = BTreeSet::new();
    let mut total_gb: BTreeMap<String, i64> = BTreeMap::new();
    for m in 0..MINUTES {
        for i in 0..TENANTS {
            let start = base + m * 60 * SECOND;
            let q = gb(i, m);
            records.push(aggregate(&tenant(i), start, &q.to_string(), 0, true));
            revisions.insert((format!("agg-{}-{start}", tenant(i)), 0));
            let mut last = q;
            if (i as i64 + m) % 3 == 0 {
                // A correction: revision 1 with 2 GB more, and a re-delivery of revision 0.
                last = q + 2;
                records.push(aggregate(&tenant(i), start, &last.to_string(), 1, true));
                revisions.insert((format!("agg-{}-{start}", tenant(i)), 1));
                records.push(aggregate(&tenant(i), start, &q.to_string(), 0, true));
            }
            *total_gb.entry(tenant(i)).or_default() += last;
        }
    }
    let chunks: Vec<_> = records.chunks(records.len() / 10 + 1).collect();
    let cfg = config("1h", "1h");
    let (charges, alerts) = (format!("{}.charges", t.app), format!("{}.alerts", t.app));
    create_topics(&[(&charges, 3), (&alerts, 3)]);
    let outputs = Some((charges.as_str(), alerts.as_str()));
    let a = start_rate(&t, &cfg, tempfile::tempdir().unwrap(), outputs);
    let b = start_rate(&t, &cfg, tempfile::tempdir().unwrap(), outputs);
    let group = format!("{}.rate", t.app);
    wait_for("both replicas to own partitions", DEADLINE, || {
        (a.proc.log().contains("partitions assigned") && b.proc.log().contains("partitions assigned")).then_some(())
    });

    let mut a = a;
    for (i, chunk) in chunks.iter().enumerate() {
        produce(&t.aggregated, chunk);
        if i == 3 {
            // A has committed charges (a read_committed reader sees some), and has more in flight.
            wait_for("charges committed before the kill", DEADLINE, || (!read_all(&charges).is_empty()).then_some(()));
            let Rating { mut proc, .. } = a;
            proc.kill9();
            let state = proc.into_state();
            a = start_rate(&t, &cfg, state, outputs);
        }
    }
    wait_all_committed(&group, &t.aggregated);

    let charged: Vec<serde_json::Value> = read_all(&charges).iter().map(|r| r.json()).collect();
    let mut seen: BTreeSet<(String, u32)> = BTreeSet::new();
    for c in &charged {
        let id = (c["aggregate_id"].as_str().unwrap().to_owned(), c["revision"].as_u64().unwrap() as u32);
        assert!(seen.insert(id.clone()), "{id:?} charged twice");
    }
    assert_eq!(seen.len(), revisions.len(), "every final revision charged exactly once (1,200 aggregates, 400 corrections)");
    assert_eq!(seen, revisions);

    let mut amount: BTreeMap<String, Decimal> = BTreeMap::new();
    let mut balance: BTreeMap<String, Decimal> = BTreeMap::new();
    for c in &charged {
        let tenant = c["tenant_id"].as_str().unwrap().to_owned();
        *amount.entry(tenant.clone()).or_default() += d(c["amount"].as_str().unwrap());
        let after = d(c["balance_after"].as_str().unwrap());
        let b = balance.entry(tenant).or_default();
        *b = (*b).max(after);
    }
    let want: BTreeMap<String, Decimal> = total_gb.iter().map(|(t, gb)| (t.clone(), storage_price(*gb))).collect();
    assert_eq!(amount, want, "each tenant's charges add up to the price of its period's GB");
    assert_eq!(balance, want, "each tenant's balance ends at the price of its period's GB");
    assert_eq!(want.len(), TENANTS);

    let alerted: Vec<String> = read_all(&alerts).iter().map(|r| r.json()["tenant_id"].as_str().unwrap().to_owned()).collect();
    assert_eq!(alerted.len(), TENANTS, "the 0.020 threshold crossed once per tenant: {alerted:?}");
    assert_eq!(alerted.iter().collect::<BTreeSet<_>>().len(), TENANTS);

    let restarted = a.proc.log();
    let life2 = restarted.rsplit("rating consumer started").next().unwrap_or_default();
    assert!(life2.contains("ledger restored"), "the restarted replica restored its ledgers:\n{life2}");
    assert!(a.proc.terminate(DEADLINE).success());
    let mut b = b;
    assert!(b.proc.terminate(DEADLINE).success());
}
