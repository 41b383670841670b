//! What a re-rating changes: per tenant, period, sku and unit, the amount billed (the
//! live charges) against the amount re-rated (the job's charges), exactly.

use std::collections::BTreeMap;

use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

use crate::rate::records::Charge;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiffLine {
    pub tenant_id: String,
    pub period: String,
    pub product_sku: String,
    pub use_unit: String,
    pub currency: String,
    #[serde(with = "rust_decimal::serde::str")]
    pub billed_quantity: Decimal,
    #[serde(with = "rust_decimal::serde::str")]
    pub billed_amount: Decimal,
    #[serde(with = "rust_decimal::serde::str")]
    pub rerated_quantity: Decimal,
    #[serde(with = "rust_decimal::serde::str")]
    pub rerated_amount: Decimal,
    /// Re-rated minus billed: what applying the job would add (negative: credit).
    #[serde(with = "rust_decimal::serde::str")]
    pub difference: Decimal,
}

type Key = (String, String, String, String);

/// The diff of `billed` and `rerated` charges (each of the job's scope), by tenant,
/// period, sku and unit; every key either side has, unchanged ones included.
pub fn diff<'a>(billed: impl IntoIterator<Item = &'a Charge>, rerated: impl IntoIterator<Item = &'a Charge>) -> Result<Vec<DiffLine>, String> {
    let mut sums: BTreeMap<Key, ([Decimal; 4], String)> = BTreeMap::new();
    let mut add = |c: &Charge, side: usize| -> Result<(), String> {
        let key = (c.tenant_id.clone(), c.period.clone(), c.product_sku.clone(), c.use_unit.clone());
        let (s, currency) = sums.entry(key).or_insert_with(|| ([Decimal::ZERO; 4], c.currency.clone()));
        if *currency != c.currency {
            return Err(format!(
                "{}'s {}/{} in {} is billed in {} and re-rated in {}: a diff needs one currency",
                c.tenant_id, c.product_sku, c.use_unit, c.period, currency, c.currency
            ));
        }
        let overflow = || format!("{}'s {} sums left the range of an exact decimal", c.tenant_id, c.period);
        s[side] = s[side].checked_add(c.quantity_delta).ok_or_else(overflow)?;
        s[side + 1] = s[side + 1].checked_add(c.amount).ok_or_else(overflow)?;
        Ok(())
    };
    for c in billed {
        add(c, 0)?;
    }
    for c in rerated {
        add(c, 2)?;
    }
    Ok(sums
        .into_iter()
        .map(|((tenant_id, period, product_sku, use_unit), (s, currency))| DiffLine {
            tenant_id,
            period,
            product_sku,
            use_unit,
            currency,
            billed_quantity: s[0],
            billed_amount: s[1],
            rerated_quantity: s[2],
            rerated_amount: s[3],
            difference: s[3] - s[1],
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use std::str::FromStr;

    use super::*;

    fn charge(tenant: &str, sku: &str, quantity: &str, amount: &str, currency: &str) -> Charge {
        let d = |s: &str| Decimal::from_str(s).unwrap();
        Charge {
            charge_id: format!("{tenant}-{sku}-{amount}"),
            tenant_id: tenant.into(),
            product_sku: sku.into(),
            use_unit: "GB".into(),
            window: "minute".into(),
            window_start: 0,
            window_end: 60_000,
            aggregate_id: "a".into(),
            revision: 0,
            quantity: d(quantity),
            quantity_delta: d(quantity),
            amount: d(amount),
            currency: currency.into(),
            period: "2026-11".into(),
            period_quantity: d(quantity),
            period_amount: d(amount),
            tiers: vec![],
            balance_after: d(amount),
            rated_at: 0,
        }
    }

    #[test]
    fn the_diff_is_rerated_minus_billed_per_line() {
        let billed = [charge("acme", "storage", "60", "6.000", "USD"), charge("acme", "storage", "70", "6.400", "USD"), charge("globex", "egress", "1", "0.010", "USD")];
        let rerated = [charge("acme", "storage", "130", "11.700", "USD"), charge("globex", "egress", "1", "0.010", "USD")];
        let d = diff(&billed, &rerated).unwrap();
        let rows: Vec<_> = d.iter().map(|l| (l.tenant_id.as_str(), l.billed_amount.to_string(), l.rerated_amount.to_string(), l.difference.to_string())).collect();
        assert_eq!(rows, vec![("acme", "12.400".into(), "11.700".into(), "-0.700".into()), ("globex", "0.010".into(), "0.010".into(), "0.000".into())]);
        assert_eq!((d[0].billed_quantity.to_string(), d[0].rerated_quantity.to_string()), ("130".into(), "130".into()));
        assert!(diff(&billed, &[charge("acme", "storage", "1", "1", "EUR")]).unwrap_err().contains("one currency"));
    }
}
