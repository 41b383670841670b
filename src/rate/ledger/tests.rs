//! Hand-computed money: every expected value below is worked out in the comment next
//! to it, not taken from the code.

use std::collections::BTreeMap;
use std::str::FromStr;

use rust_decimal::Decimal;

use super::*;
use crate::window::aggregate::{Accumulator, GroupKey};

fn d(s: &str) -> Decimal {
    Decimal::from_str(s).unwrap()
}

const MIN: i64 = 60_000;
/// 2026-11-22T10:00:00Z
const T0: i64 = 1_795_341_600_000;

fn book(extra: &str) -> PriceBook {
    PriceBook::from_toml(&format!(
        r#"
currency = "USD"
{extra}
[[prices]]
product_sku = "api.requests"
use_unit = "request"
model = "flat"
unit_price = "0.001"

[[prices]]
product_sku = "storage"
use_unit = "GB"
model = "graduated"
tiers = [{{ up_to = "100", unit_price = "0.10" }}, {{ up_to = "1000", unit_price = "0.08" }}, {{ unit_price = "0.05" }}]

[[prices]]
product_sku = "egress"
use_unit = "GB"
model = "volume"
tiers = [{{ up_to = "100", unit_price = "0.10" }}, {{ up_to = "1000", unit_price = "0.08" }}, {{ unit_price = "0.05" }}]

[[prices]]
product_sku = "odd"
use_unit = "unit"
model = "flat"
unit_price = "0.0015"
"#
    ))
    .unwrap()
}

fn agg(sku: &str, unit: &str, start: i64, total: &str, revision: u32) -> WindowAggregate {
    let key = GroupKey::new("one", sku, unit);
    let acc = Accumulator::first(d(total), start);
    WindowAggregate::new(&key, "minute", start, start + MIN, &acc, revision, true, start + MIN)
}

struct World {
    book: PriceBook,
    state: BTreeMap<String, String>,
    charges: Vec<Charge>,
    alerts: Vec<Alert>,
}

impl World {
    fn new(extra: &str) -> Self {
        Self { book: book(extra), state: BTreeMap::new(), charges: Vec::new(), alerts: Vec::new() }
    }

    /// Rates one aggregate as its own committed batch.
    fn rate(&mut self, a: &WindowAggregate) -> Rated {
        let mut ledger = Ledger::default();
        let rated = ledger.rate(&mut self.state, &self.book, a, 0).unwrap();
        self.state.extend(ledger.take_writes());
        if let Rated::Charged { charge, alerts } = &rated {
            self.charges.push(charge.clone());
            self.alerts.extend(alerts.iter().cloned());
        }
        rated
    }

    fn sum(&self) -> Decimal {
        self.charges.iter().map(|c| c.amount).sum()
    }

    fn balance(&mut self, period: &str) -> Decimal {
        Ledger::default().balance(&mut self.state, "one", period).unwrap()
    }
}

const SCALE3: &str = "rounding = { scale = 3, mode = \"half_even\" }\nthresholds = [\"0.020\"]";
const SCALE2: &str = "rounding = { scale = 2, mode = \"half_even\" }";

#[test]
fn flat_seed_scenario_three_hundred_requests_cost_thirty_cents() {
    let mut w = World::new(SCALE3);
    // Two minute windows: 200 + 100 requests at 0.001 = 0.200 + 0.100.
    w.rate(&agg("api.requests", "request", T0, "200", 0));
    w.rate(&agg("api.requests", "request", T0 + MIN, "100", 0));
    assert_eq!(w.charges.iter().map(|c| c.amount).collect::<Vec<_>>(), vec![d("0.200"), d("0.100")]);
    assert_eq!(w.sum(), d("0.300"));
    assert_eq!(w.sum().to_string(), "0.300");
    assert_eq!(w.balance("2026-11"), d("0.300"));
    assert_eq!(w.alerts.len(), 1, "0.020 crossed once, by the first charge");
    assert_eq!((w.alerts[0].threshold, w.alerts[0].balance), (d("0.020"), d("0.200")));
    assert_eq!(w.alerts[0].charge_id, w.charges[0].charge_id);
}

#[test]
fn rounding_is_applied_to_the_total_not_per_charge() {
    let mut w = World::new(SCALE2);
    // Ten aggregates of 1 unit at 0.0015: cumulative exact 0.0015 k; rounded to cents
    // (half even): k=1..3 → 0.00, k=4 → 0.006 → 0.01, ..., k=10 → 0.015 → 0.02 (tie,
    // 1 is odd → 2). Per-charge rounding would have charged 10 × round(0.0015) = 0.00.
    for k in 0..10 {
        w.rate(&agg("odd", "unit", T0 + k * MIN, "1", 0));
    }
    assert_eq!(w.sum(), d("0.02"));
    let amounts: Vec<String> = w.charges.iter().map(|c| c.amount.to_string()).collect();
    // round(0.0015k): 0,0,0,0.01,0.01,0.01,0.01,0.01,0.01,0.02 → deltas:
    assert_eq!(amounts, ["0.00", "0.00", "0.00", "0.01", "0.00", "0.00", "0.00", "0.00", "0.00", "0.01"]);
}

#[test]
fn rounding_modes_change_the_total_as_expected() {
    // 7 units at 0.0015 = 0.0105 exactly.
    for (mode, want) in [("half_even", "0.01"), ("half_up", "0.01"), ("up", "0.02"), ("down", "0.01")] {
        let mut w = World::new(&format!("rounding = {{ scale = 2, mode = \"{mode}\" }}"));
        w.rate(&agg("odd", "unit", T0, "7", 0));
        assert_eq!(w.sum(), d(want), "{mode}");
    }
    // 5 units = 0.0075: a tie at 3 places for scale 3 → half_even 0.008 (7 odd), half_down 0.007.
    for (mode, want) in [("half_even", "0.008"), ("half_down", "0.007"), ("half_up", "0.008")] {
        let mut w = World::new(&format!("rounding = {{ scale = 3, mode = \"{mode}\" }}"));
        w.rate(&agg("odd", "unit", T0, "5", 0));
        assert_eq!(w.sum(), d(want), "{mode}");
    }
}

#[test]
fn graduated_across_a_tier_boundary_and_a_correction() {
    let mut w = World::new(SCALE2);
    // 100 GB: all in tier 1 = 10.00.
    w.rate(&agg("storage", "GB", T0, "100", 0));
    assert_eq!(w.charges[0].amount, d("10.00"));
    // Correction to 150 GB: 100 × 0.10 + 50 × 0.08 = 14.00; delta 4.00.
    let r = w.rate(&agg("storage", "GB", T0, "150", 1));
    let Rated::Charged { charge, .. } = r else { panic!("{r:?}") };
    assert_eq!((charge.quantity, charge.quantity_delta, charge.amount), (d("150"), d("50"), d("4.00")));
    assert_eq!(charge.tiers.iter().map(|t| (t.tier, t.quantity)).collect::<Vec<_>>(), vec![(1, d("100")), (2, d("50"))]);
    assert_ne!(charge.charge_id, w.charges[0].charge_id);
    // Another window adds 900 GB: period 1050 = 10 + 72 + 50 × 0.05 = 84.50; delta 70.50.
    w.rate(&agg("storage", "GB", T0 + MIN, "900", 0));
    assert_eq!(w.charges[2].amount, d("70.50"));
    assert_eq!(w.balance("2026-11"), d("84.50"));
    assert_eq!(w.sum(), d("84.50"));
}

#[test]
fn volume_reprices_every_unit_when_the_total_crosses_a_tier() {
    let mut w = World::new(SCALE2);
    // 60 GB at 0.10 = 6.00; +50 → 110 GB all at 0.08 = 8.80; delta 2.80.
    w.rate(&agg("egress", "GB", T0, "60", 0));
    w.rate(&agg("egress", "GB", T0 + MIN, "50", 0));
    assert_eq!(w.charges.iter().map(|c| c.amount).collect::<Vec<_>>(), vec![d("6.00"), d("2.80")]);
    // Boundary: a correction of the second window to 40 → total 100, tier 1: 10.00; delta +1.20.
    w.rate(&agg("egress", "GB", T0 + MIN, "40", 1));
    assert_eq!(w.charges[2].amount, d("1.20"));
    assert_eq!(w.charges[2].quantity_delta, d("-10"));
    assert_eq!(w.balance("2026-11"), d("10.00"));
}

#[test]
fn a_correction_makes_the_balance_equal_the_corrected_total() {
    let mut w = World::new(SCALE3);
    // 30 requests = 0.030 (crosses 0.020), corrected down to 10 = 0.010, then up to 25 = 0.025.
    w.rate(&agg("api.requests", "request", T0, "30", 0));
    w.rate(&agg("api.requests", "request", T0, "10", 1));
    assert_eq!(w.charges[1].amount, d("-0.020"));
    assert_eq!(w.balance("2026-11"), d("0.010"));
    w.rate(&agg("api.requests", "request", T0, "25", 2));
    assert_eq!(w.balance("2026-11"), d("0.025"));
    assert_eq!(w.sum(), d("0.025"));
    // Crossed upwards twice: two alerts, same alert_id (an upsert downstream).
    assert_eq!(w.alerts.len(), 2);
    assert_eq!(w.alerts[0].alert_id, w.alerts[1].alert_id);
}

#[test]
fn redelivered_and_stale_revisions_charge_nothing() {
    let mut w = World::new(SCALE3);
    w.rate(&agg("api.requests", "request", T0, "30", 1));
    assert_eq!(w.rate(&agg("api.requests", "request", T0, "30", 1)), Rated::AlreadyCharged { charged_revision: 1 });
    assert_eq!(w.rate(&agg("api.requests", "request", T0, "99", 0)), Rated::AlreadyCharged { charged_revision: 1 });
    assert_eq!(w.charges.len(), 1);
    assert_eq!(w.balance("2026-11"), d("0.030"));
}

#[test]
fn order_does_not_change_the_total() {
    // Graduated, 3 dp half_up: 33.3333 + 66.6667 + 0.0005 GB.
    let aggs = [("33.3333", 0), ("66.6667", 1), ("0.0005", 2)];
    let mut totals = Vec::new();
    for order in [[0, 1, 2], [2, 1, 0], [1, 2, 0]] {
        let mut w = World::new("rounding = { scale = 3, mode = \"half_up\" }");
        for i in order {
            let (q, k) = aggs[i];
            w.rate(&agg("storage", "GB", T0 + k * MIN, q, 0));
        }
        totals.push(w.sum());
    }
    // Total 100.0005 GB = 100 × 0.10 + 0.0005 × 0.08 = 10.00004 → 10.000.
    assert_eq!(totals, vec![d("10.000"); 3]);
}

#[test]
fn periods_are_calendar_months_of_the_window_start() {
    let mut w = World::new(SCALE3);
    let dec1 = 1_796_083_200_000; // 2026-12-01T00:00:00Z
    w.rate(&agg("api.requests", "request", dec1 - MIN, "10", 0));
    w.rate(&agg("api.requests", "request", dec1, "20", 0));
    assert_eq!((w.charges[0].period.as_str(), w.charges[1].period.as_str()), ("2026-11", "2026-12"));
    assert_eq!((w.balance("2026-11"), w.balance("2026-12")), (d("0.010"), d("0.020")));
    // Each month's balance starts at 0: the 0.020 threshold fires in December only.
    assert_eq!(w.alerts.iter().map(|a| a.period.as_str()).collect::<Vec<_>>(), vec!["2026-12"]);
}

#[test]
fn one_charge_can_cross_several_thresholds_and_unpriced_is_reported() {
    let mut w = World::new("rounding = { scale = 2, mode = \"half_even\" }\nthresholds = [\"1\", \"5\", \"50\"]");
    w.rate(&agg("storage", "GB", T0, "60", 0)); // 6.00: crosses 1 and 5
    assert_eq!(w.alerts.iter().map(|a| a.threshold).collect::<Vec<_>>(), vec![d("1"), d("5")]);
    assert_eq!(w.rate(&agg("nothing", "GB", T0, "1", 0)), Rated::Unpriced);
}
