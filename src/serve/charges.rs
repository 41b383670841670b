//! `GET /v1/charges` (SPEC §9): a tenant's charges, from the replica's charges view
//! ([`super::view`]), with exact totals per sku and unit and overall.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::extract::{Query, State};
use axum::http::HeaderMap;
use axum::Json;
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

use super::error::ApiError;
use super::usage::{read_view, tenant_of, timestamp, AsOf};
use super::App;
use crate::rate::period;
use crate::rate::records::Charge;

#[derive(Debug, Deserialize)]
pub struct ChargesQuery {
    tenant_id: Option<String>,
    /// A billing period, `YYYY-MM`: charges of windows starting in it.
    period: Option<String>,
    from: Option<String>,
    to: Option<String>,
    product_sku: Option<String>,
    use_unit: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct Charges {
    pub tenant_id: String,
    pub period: Option<String>,
    pub as_of: AsOf,
    /// By window start.
    pub charges: Vec<Charge>,
    /// By sku, unit and currency.
    pub totals: Vec<SkuTotal>,
    /// By currency: what the charges add up to.
    pub total: Vec<CurrencyTotal>,
}

/// The exact sums of one sku and unit's charges.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SkuTotal {
    pub product_sku: String,
    pub use_unit: String,
    pub currency: String,
    /// The quantity the charges priced: the sum of their `quantity_delta`.
    #[serde(with = "rust_decimal::serde::str")]
    pub quantity: Decimal,
    #[serde(with = "rust_decimal::serde::str")]
    pub amount: Decimal,
    pub charges: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CurrencyTotal {
    pub currency: String,
    #[serde(with = "rust_decimal::serde::str")]
    pub amount: Decimal,
    pub charges: u64,
}

/// Totals by sku, unit and currency, and by currency; None if a sum does not fit an
/// exact decimal.
pub fn totals(charges: &[Charge]) -> Option<(Vec<SkuTotal>, Vec<CurrencyTotal>)> {
    let mut by_sku: BTreeMap<(&str, &str, &str), (Decimal, Decimal, u64)> = BTreeMap::new();
    let mut by_currency: BTreeMap<&str, (Decimal, u64)> = BTreeMap::new();
    for c in charges {
        let t = by_sku.entry((&c.product_sku, &c.use_unit, &c.currency)).or_insert((Decimal::ZERO, Decimal::ZERO, 0));
        t.0 = t.0.checked_add(c.quantity_delta)?;
        t.1 = t.1.checked_add(c.amount)?;
        t.2 += 1;
        let t = by_currency.entry(&c.currency).or_insert((Decimal::ZERO, 0));
        t.0 = t.0.checked_add(c.amount)?;
        t.1 += 1;
    }
    let skus = by_sku
        .into_iter()
        .map(|((sku, unit, currency), (quantity, amount, charges))| SkuTotal {
            product_sku: sku.into(),
            use_unit: unit.into(),
            currency: currency.into(),
            quantity,
            amount,
            charges,
        })
        .collect();
    let currencies = by_currency.into_iter().map(|(currency, (amount, charges))| CurrencyTotal { currency: currency.into(), amount, charges }).collect();
    Some((skus, currencies))
}

/// `GET /v1/charges`.
pub async fn get_charges(State(app): State<Arc<App>>, headers: HeaderMap, Query(q): Query<ChargesQuery>) -> Result<Json<Charges>, ApiError> {
    let caller = app.authenticate(&headers)?;
    let tenant = tenant_of(&caller, q.tenant_id.as_deref())?;
    let (mut from, mut to) = (timestamp("from", q.from.as_deref(), i64::MIN)?, timestamp("to", q.to.as_deref(), i64::MAX)?);
    if let Some(p) = &q.period {
        let (start, end) = period::bounds(p).map_err(|e| ApiError::bad_request("invalid_parameter", format!("period: {e}")))?;
        (from, to) = (from.max(start), to.min(end));
    }
    if from > to {
        return Err(ApiError::bad_request("invalid_parameter", "`to` is before `from`"));
    }
    let (view, t) = (Arc::clone(&app.charges), tenant.clone());
    let mut charges = read_view(move || view.charges(&t, from, to)).await?;
    charges.retain(|c| q.product_sku.as_ref().is_none_or(|s| *s == c.product_sku) && q.use_unit.as_ref().is_none_or(|u| *u == c.use_unit));
    let (totals, total) = totals(&charges).ok_or_else(|| ApiError::internal("a total does not fit an exact decimal"))?;
    Ok(Json(Charges { tenant_id: tenant, period: q.period, as_of: app.charges.as_of().into(), charges, totals, total }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn charge(sku: &str, currency: &str, delta: &str, amount: &str) -> Charge {
        Charge {
            charge_id: format!("{sku}{delta}{amount}"),
            tenant_id: "acme".into(),
            product_sku: sku.into(),
            use_unit: "GB".into(),
            window: "hour".into(),
            window_start: 0,
            window_end: 3_600_000,
            aggregate_id: "a".into(),
            revision: 0,
            quantity: delta.parse().unwrap(),
            quantity_delta: delta.parse().unwrap(),
            amount: amount.parse().unwrap(),
            currency: currency.into(),
            period: "1970-01".into(),
            period_quantity: Decimal::ZERO,
            period_amount: Decimal::ZERO,
            tiers: vec![],
            balance_after: Decimal::ZERO,
            rated_at: 0,
        }
    }

    #[test]
    fn totals_are_exact_sums_by_sku_and_by_currency() {
        let c = [charge("disk", "EUR", "10.5", "1.05"), charge("disk", "EUR", "-0.5", "-0.05"), charge("vm", "EUR", "2", "0.10"), charge("vm", "USD", "1", "0.07")];
        let (skus, total) = totals(&c).unwrap();
        let row = |s: &SkuTotal| (s.product_sku.clone(), s.currency.clone(), s.quantity.to_string(), s.amount.to_string(), s.charges);
        assert_eq!(
            skus.iter().map(row).collect::<Vec<_>>(),
            vec![
                ("disk".into(), "EUR".into(), "10.0".into(), "1.00".into(), 2),
                ("vm".into(), "EUR".into(), "2".into(), "0.10".into(), 1),
                ("vm".into(), "USD".into(), "1".into(), "0.07".into(), 1),
            ]
        );
        assert_eq!(total.iter().map(|t| (t.currency.as_str(), t.amount.to_string(), t.charges)).collect::<Vec<_>>(), vec![("EUR", "1.10".into(), 3), ("USD", "0.07".into(), 1)]);
        let huge = "79228162514264337593543950335";
        assert!(totals(&[charge("d", "EUR", "1", huge), charge("d", "EUR", "1", "1")]).is_none(), "overflow is refused, not rounded");
    }
}
