//! Pricing: quantity → exact amount with a per-tier breakdown, for the three models of
//! the price book. Pure functions over rust_decimal; rounding is applied by the caller
//! to cumulative amounts (see [`super::ledger`]), never tier by tier.

use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

use super::price_book::{Model, Tier};

/// The arithmetic left rust_decimal's range: refused, never rounded away.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("pricing {quantity} overflows an exact decimal")]
pub struct Overflow {
    pub quantity: Decimal,
}

/// The units of one tier and what they cost (unrounded).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TierLine {
    /// 1-based tier number in the price book.
    pub tier: usize,
    #[serde(with = "rust_decimal::serde::str")]
    pub quantity: Decimal,
    #[serde(with = "rust_decimal::serde::str")]
    pub unit_price: Decimal,
    #[serde(with = "rust_decimal::serde::str")]
    pub amount: Decimal,
}

/// The exact (unrounded) price of `quantity` units, with its tier breakdown.
/// Tier bounds are inclusive: with `up_to = 100`, unit 100 is in the first tier.
pub fn price(model: &Model, quantity: Decimal) -> Result<(Decimal, Vec<TierLine>), Overflow> {
    let overflow = || Overflow { quantity };
    let line = |tier, quantity: Decimal, unit_price: Decimal| {
        let amount = quantity.checked_mul(unit_price).ok_or_else(overflow)?;
        Ok(TierLine { tier, quantity, unit_price, amount })
    };
    let lines: Vec<TierLine> = match model {
        Model::Flat { unit_price } => vec![line(1, quantity, *unit_price)?],
        Model::Graduated { tiers } => {
            let mut lines = Vec::new();
            let mut below = Decimal::ZERO;
            for (i, t) in tiers.iter().enumerate() {
                if quantity <= below && i > 0 {
                    break;
                }
                let top = t.up_to.map_or(quantity, |u| u.min(quantity));
                lines.push(line(i + 1, (top - below).max(Decimal::ZERO), t.unit_price)?);
                below = top;
            }
            lines
        }
        Model::Volume { tiers } => {
            let (i, t) = volume_tier(tiers, quantity);
            vec![line(i + 1, quantity, t.unit_price)?]
        }
    };
    let mut total = Decimal::ZERO;
    for l in &lines {
        total = total.checked_add(l.amount).ok_or_else(overflow)?;
    }
    Ok((total, lines))
}

/// The tier the whole quantity falls in: the first whose `up_to` is at least it.
fn volume_tier(tiers: &[Tier], quantity: Decimal) -> (usize, &Tier) {
    let i = tiers.iter().position(|t| t.up_to.is_none_or(|u| quantity <= u)).unwrap_or(tiers.len().saturating_sub(1));
    (i, &tiers[i])
}

#[cfg(test)]
mod tests {
    use std::str::FromStr;

    use super::*;

    fn d(s: &str) -> Decimal {
        Decimal::from_str(s).unwrap()
    }

    fn tiers() -> Vec<Tier> {
        // 0–100 at 0.10, 100–1000 at 0.08, beyond at 0.05.
        vec![
            Tier { up_to: Some(d("100")), unit_price: d("0.10") },
            Tier { up_to: Some(d("1000")), unit_price: d("0.08") },
            Tier { up_to: None, unit_price: d("0.05") },
        ]
    }

    fn amount(model: &Model, q: &str) -> Decimal {
        price(model, d(q)).unwrap().0
    }

    #[test]
    fn flat_is_quantity_times_price() {
        let m = Model::Flat { unit_price: d("0.001") };
        assert_eq!(amount(&m, "300"), d("0.3"));
        assert_eq!(amount(&m, "0"), d("0"));
        assert_eq!(amount(&m, "12.5"), d("0.0125"));
    }

    #[test]
    fn graduated_prices_each_unit_in_its_tier() {
        let m = Model::Graduated { tiers: tiers() };
        assert_eq!(amount(&m, "50"), d("5")); // 50 × 0.10
        assert_eq!(amount(&m, "100"), d("10")); // boundary: all in tier 1
        assert_eq!(amount(&m, "100.5"), d("10.04")); // 10 + 0.5 × 0.08
        assert_eq!(amount(&m, "1000"), d("82")); // 10 + 900 × 0.08
        assert_eq!(amount(&m, "1500"), d("107")); // 10 + 72 + 500 × 0.05
        let (_, lines) = price(&m, d("1500")).unwrap();
        let q: Vec<_> = lines.iter().map(|l| (l.tier, l.quantity, l.amount)).collect();
        assert_eq!(q, vec![(1, d("100"), d("10")), (2, d("900"), d("72")), (3, d("500"), d("25"))]);
        let (_, lines) = price(&m, d("40")).unwrap();
        assert_eq!(lines.len(), 1, "untouched tiers are not listed");
    }

    #[test]
    fn volume_prices_all_units_at_the_reached_tier() {
        let m = Model::Volume { tiers: tiers() };
        assert_eq!(amount(&m, "100"), d("10")); // boundary: tier 1, 100 × 0.10
        assert_eq!(amount(&m, "101"), d("8.08")); // tier 2: 101 × 0.08, cheaper than 100 units
        assert_eq!(amount(&m, "1000"), d("80"));
        assert_eq!(amount(&m, "1000.001"), d("50.00005"));
        let (_, lines) = price(&m, d("101")).unwrap();
        assert_eq!(lines, vec![TierLine { tier: 2, quantity: d("101"), unit_price: d("0.08"), amount: d("8.08") }]);
    }

    #[test]
    fn overflow_is_an_error() {
        let m = Model::Flat { unit_price: d("1000000000") };
        assert!(price(&m, Decimal::MAX).is_err());
    }
}
