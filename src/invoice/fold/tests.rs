//! Invoices from charges the real ledger wrote; expected money is worked out by hand
//! (unit tests) or by an independent piecewise formula (property test).

use std::collections::BTreeMap;
use std::str::FromStr;

use proptest::prelude::*;
use rust_decimal::Decimal;

use super::*;
use crate::invoice::adjust::adjustment;
use crate::rate::{Ledger, PriceBook, Rated};
use crate::window::aggregate::{Accumulator, GroupKey};
use crate::window::WindowAggregate;

fn d(s: &str) -> Decimal {
    Decimal::from_str(s).unwrap()
}

const HOUR: i64 = 3_600_000;
/// 2026-11-01T00:00:00Z and 2026-12-01T00:00:00Z.
const NOV: (i64, i64) = (1_793_491_200_000, 1_796_083_200_000);

const BOOK: &str = r#"
currency = "EUR"
rounding = { scale = 2, mode = "half_even" }

[[prices]]
product_sku = "vcpu"
use_unit = "hour"
model = "graduated"
tiers = [{ up_to = "100", unit_price = "0.04" }, { up_to = "1000", unit_price = "0.03" }, { unit_price = "0.025" }]

[[prices]]
product_sku = "storage"
use_unit = "GB"
model = "flat"
unit_price = "0.0125"
"#;

/// Rates aggregates with the real ledger, one committed batch each, keeping the charges.
struct Rater {
    book: PriceBook,
    state: BTreeMap<String, String>,
    charges: Vec<Charge>,
    at: i64,
}

impl Rater {
    fn new() -> Self {
        Self { book: PriceBook::from_toml(BOOK).unwrap(), state: BTreeMap::new(), charges: Vec::new(), at: NOV.1 }
    }

    fn rate(&mut self, sku: &str, unit: &str, hour: i64, total: &str, revision: u32) {
        let key = GroupKey::new("acme", sku, unit);
        let start = NOV.0 + hour * HOUR;
        let a = WindowAggregate::new(&key, "hour", start, start + HOUR, &Accumulator::first(d(total), start), revision, true, start + HOUR);
        let mut ledger = Ledger::default();
        self.at += 1;
        let rated = ledger.rate(&mut self.state, &self.book, &a, self.at).unwrap();
        self.state.extend(ledger.take_writes());
        if let Rated::Charged { charge, .. } = rated {
            self.charges.push(charge);
        }
    }

    fn fold(&self) -> PeriodCharges {
        let mut p = PeriodCharges::new("acme", "2026-11");
        for c in &self.charges {
            p.add(c).unwrap();
        }
        p
    }
}

#[test]
fn an_invoice_bills_each_line_at_the_rounded_price_of_its_period_quantity() {
    let mut r = Rater::new();
    // vcpu: 60 + 70 + 900 = 1030 hours: 100 × 0.04 + 900 × 0.03 + 30 × 0.025 = 4 + 27 + 0.75 = 31.75.
    r.rate("vcpu", "hour", 0, "60", 0);
    r.rate("vcpu", "hour", 1, "70", 0);
    r.rate("vcpu", "hour", 2, "900", 0);
    // storage: 10.5 + 0.3 = 10.8 GB at 0.0125 = 0.135 → 0.14 (half even: 0.135 → 0.14).
    r.rate("storage", "GB", 0, "10.5", 0);
    r.rate("storage", "GB", 1, "0.3", 0);
    let inv = r.fold().invoice("P03", 17, NOV, NOV.1 + 1).unwrap();
    assert_eq!(inv.display_number(), "P03-000017");
    assert_eq!(inv.kind, Kind::Invoice);
    assert_eq!(inv.currency, "EUR");
    let lines: Vec<_> = inv.lines.iter().map(|l| (l.product_sku.as_str(), l.quantity, l.amount)).collect();
    assert_eq!(lines, vec![("storage", d("10.8"), d("0.14")), ("vcpu", d("1030"), d("31.75"))]);
    let vcpu_tiers: Vec<_> = inv.lines[1].tiers.iter().map(|t| (t.tier, t.quantity, t.unit_price)).collect();
    assert_eq!(vcpu_tiers, vec![(1, d("100"), d("0.04")), (2, d("900"), d("0.03")), (3, d("30"), d("0.025"))]);
    assert_eq!((inv.subtotal, inv.total), (d("31.89"), d("31.89")));
    assert_eq!(inv.charges.count, 5);
    assert_eq!(inv.charges.last_charge_id, r.charges[4].charge_id);
    assert_eq!(inv.invoice_id, crate::invoice::records::invoice_id("acme", "2026-11"));
}

#[test]
fn a_missing_charge_stops_the_invoice() {
    let mut r = Rater::new();
    r.rate("vcpu", "hour", 0, "60", 0);
    r.rate("vcpu", "hour", 1, "70", 0);
    let mut p = PeriodCharges::new("acme", "2026-11");
    p.add(&r.charges[1]).unwrap(); // the first was never read
    let err = p.invoice("P00", 1, NOV, 0).unwrap_err();
    assert!(matches!(err, InvoiceError::LedgerMismatch(ref m) if m.sku == "vcpu"), "{err}");
    // A duplicated charge is caught the same way.
    let mut p = r.fold();
    p.add(&r.charges[1]).unwrap();
    assert!(p.lines().is_err());
}

#[test]
fn charges_in_two_currencies_make_no_invoice() {
    let mut r = Rater::new();
    r.rate("vcpu", "hour", 0, "60", 0);
    let mut other = r.charges[0].clone();
    other.currency = "USD".into();
    let mut p = r.fold();
    assert!(matches!(p.add(&other), Err(InvoiceError::MixedCurrencies { .. })));
}

#[test]
fn corrections_after_issue_become_debit_and_credit_notes() {
    let mut r = Rater::new();
    r.rate("vcpu", "hour", 0, "60", 0);
    r.rate("storage", "GB", 0, "100", 0);
    // vcpu 60 × 0.04 = 2.40; storage 100 × 0.0125 = 1.25.
    let inv = r.fold().invoice("P01", 1, NOV, 0).unwrap();
    assert_eq!(inv.total, d("3.65"));
    assert!(adjustment(&inv, &[], &r.fold(), "P01", 2, 0).unwrap().is_none(), "nothing changed");

    // A late pulse: hour 0's vcpu goes 60 → 110: 100 × 0.04 + 10 × 0.03 = 4.30, 1.90 more.
    r.rate("vcpu", "hour", 0, "110", 1);
    let debit = adjustment(&inv, &[], &r.fold(), "P01", 2, 0).unwrap().unwrap();
    assert_eq!(debit.kind, Kind::DebitNote);
    assert_eq!((debit.adjusts.as_deref(), debit.adjustment, debit.number), (Some(inv.invoice_id.as_str()), Some(1), 2));
    assert_eq!(debit.lines.len(), 1, "storage did not change");
    let l = &debit.lines[0];
    assert_eq!((l.quantity, l.amount), (d("50"), d("1.90")));
    assert_eq!(l.billed_before.map(|b| (b.quantity, b.amount)), Some((d("60"), d("2.40"))));
    assert_eq!((debit.total, debit.charges.count), (d("1.90"), 1));

    // Then storage is corrected down 100 → 20: 0.25, 1.00 less.
    r.rate("storage", "GB", 0, "20", 1);
    let credit = adjustment(&inv, &[&debit], &r.fold(), "P01", 3, 0).unwrap().unwrap();
    assert_eq!(credit.kind, Kind::CreditNote);
    assert_eq!(credit.adjustment, Some(2));
    assert_eq!(credit.lines.iter().map(|l| (l.product_sku.as_str(), l.amount)).collect::<Vec<_>>(), vec![("storage", d("-1.00"))]);
    assert_eq!(credit.total, d("-1.00"));
    assert_ne!(credit.invoice_id, debit.invoice_id);
    // Invoice plus notes: what the charges add up to now, 4.30 + 0.25.
    assert_eq!(inv.total + debit.total + credit.total, d("4.55"));
    assert_eq!(r.charges.iter().map(|c| c.amount).sum::<Decimal>(), d("4.55"));
}

/// The graduated vcpu price of `q`, rounded half-even to cents: written out piecewise,
/// independently of `rate::pricing`.
fn vcpu_price(q: Decimal) -> Decimal {
    let t1 = q.min(d("100"));
    let t2 = (q.min(d("1000")) - d("100")).max(Decimal::ZERO);
    let t3 = (q - d("1000")).max(Decimal::ZERO);
    (t1 * d("0.04") + t2 * d("0.03") + t3 * d("0.025")).round_dp(2)
}

proptest! {
    /// Whatever the windows, revisions and their order, the invoice bills each sku the
    /// rounded price of its final period quantity, and its total is the charges' sum.
    #[test]
    fn the_invoice_is_the_price_of_the_final_quantities(
        updates in prop::collection::vec((0i64..48, 0u32..3, 0u64..200_000, any::<bool>()), 1..60),
    ) {
        let mut r = Rater::new();
        // The latest revision rated of each (sku, hour): what the period finally holds.
        let mut finals: BTreeMap<(bool, i64), (u32, Decimal)> = BTreeMap::new();
        for (hour, revision, centi, is_vcpu) in updates {
            let q = Decimal::new(centi as i64, 2);
            let sku = if is_vcpu { "vcpu" } else { "storage" };
            let unit = if is_vcpu { "hour" } else { "GB" };
            r.rate(sku, unit, hour, &q.to_string(), revision);
            let e = finals.entry((is_vcpu, hour)).or_insert((revision, q));
            if revision > e.0 { *e = (revision, q); }
        }
        let inv = r.fold().invoice("P00", 1, NOV, 0).unwrap();
        let total_of = |vcpu: bool| finals.iter().filter(|((v, _), _)| *v == vcpu).map(|(_, (_, q))| *q).sum::<Decimal>();
        for l in &inv.lines {
            let vcpu = l.product_sku == "vcpu";
            prop_assert_eq!(l.quantity, total_of(vcpu));
            let expected = if vcpu { vcpu_price(l.quantity) } else { (l.quantity * d("0.0125")).round_dp(2) };
            prop_assert_eq!(l.amount, expected);
        }
        prop_assert_eq!(inv.total, r.charges.iter().map(|c| c.amount).sum::<Decimal>());
        prop_assert_eq!(inv.charges.count, r.charges.len() as u64);
    }
}
