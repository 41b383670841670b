//! The price book (`topology/price-book.toml`): what one unit of each (product_sku,
//! use_unit) costs, the currency, how amounts are rounded, and the spend thresholds
//! that raise alerts. Parsed and checked here; priced in [`super::pricing`].

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use rust_decimal::{Decimal, RoundingStrategy};
use serde::Deserialize;

/// Why a price book cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum PriceBookError {
    #[error("cannot read price book {path}: {err}")]
    Read { path: PathBuf, err: std::io::Error },
    #[error("price book {path} is not valid TOML: {err}")]
    Parse { path: PathBuf, err: toml::de::Error },
    #[error("invalid price book: {0}")]
    Invalid(String),
}

/// How a quantity becomes money.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Model {
    /// Every unit at one price.
    Flat { unit_price: Decimal },
    /// Each unit at the price of the tier it falls in (like income tax brackets).
    Graduated { tiers: Vec<Tier> },
    /// Every unit at the price of the tier the *total* quantity falls in.
    Volume { tiers: Vec<Tier> },
}

/// One price tier: units up to and including `up_to` (None: no upper bound).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Tier {
    #[serde(default, with = "rust_decimal::serde::str_option")]
    pub up_to: Option<Decimal>,
    #[serde(with = "rust_decimal::serde::str")]
    pub unit_price: Decimal,
}

/// Rounding of charged amounts: to `scale` decimal places with `mode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rounding {
    pub scale: u32,
    pub mode: RoundingMode,
}

/// The rounding modes a price book may name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RoundingMode {
    /// Banker's rounding: a tie goes to the even digit (0.125 → 0.12).
    HalfEven,
    /// A tie goes away from zero (0.125 → 0.13).
    HalfUp,
    /// A tie goes towards zero (0.125 → 0.12).
    HalfDown,
    /// Always away from zero (0.121 → 0.13).
    Up,
    /// Always towards zero, truncation (0.129 → 0.12).
    Down,
}

impl RoundingMode {
    pub fn strategy(self) -> RoundingStrategy {
        match self {
            Self::HalfEven => RoundingStrategy::MidpointNearestEven,
            Self::HalfUp => RoundingStrategy::MidpointAwayFromZero,
            Self::HalfDown => RoundingStrategy::MidpointTowardZero,
            Self::Up => RoundingStrategy::AwayFromZero,
            Self::Down => RoundingStrategy::ToZero,
        }
    }
}

impl Rounding {
    pub fn apply(&self, amount: Decimal) -> Decimal {
        let mut r = amount.round_dp_with_strategy(self.scale, self.mode.strategy());
        // Always show `scale` places, so 0.3 is written 0.300 at scale 3.
        r.rescale(self.scale);
        r
    }
}

/// A checked price book.
#[derive(Debug, Clone, PartialEq)]
pub struct PriceBook {
    pub currency: String,
    pub rounding: Rounding,
    /// Ascending, distinct, positive.
    pub thresholds: Vec<Decimal>,
    prices: BTreeMap<(String, String), Model>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBook {
    currency: String,
    rounding: RawRounding,
    #[serde(default)]
    thresholds: Vec<String>,
    #[serde(default)]
    prices: Vec<RawPrice>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRounding {
    scale: u32,
    mode: RoundingMode,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPrice {
    product_sku: String,
    use_unit: String,
    model: RawModel,
    #[serde(default, with = "rust_decimal::serde::str_option")]
    unit_price: Option<Decimal>,
    #[serde(default)]
    tiers: Vec<Tier>,
}

#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(rename_all = "snake_case")]
enum RawModel {
    Flat,
    Graduated,
    Volume,
}

impl PriceBook {
    pub fn from_file(path: &Path) -> Result<Self, PriceBookError> {
        let text = std::fs::read_to_string(path).map_err(|err| PriceBookError::Read { path: path.to_owned(), err })?;
        let raw: RawBook = toml::from_str(&text).map_err(|err| PriceBookError::Parse { path: path.to_owned(), err })?;
        Self::check(raw)
    }

    pub fn from_toml(text: &str) -> Result<Self, PriceBookError> {
        let raw: RawBook =
            toml::from_str(text).map_err(|err| PriceBookError::Parse { path: PathBuf::from("<text>"), err })?;
        Self::check(raw)
    }

    /// The model of a (product_sku, use_unit); None if the book has no price for it.
    pub fn model(&self, sku: &str, unit: &str) -> Option<&Model> {
        self.prices.get(&(sku.to_owned(), unit.to_owned()))
    }

    fn check(raw: RawBook) -> Result<Self, PriceBookError> {
        let invalid = |m: String| Err(PriceBookError::Invalid(m));
        if raw.currency.len() != 3 || !raw.currency.chars().all(|c| c.is_ascii_uppercase()) {
            return invalid(format!("currency {:?} must be an ISO 4217 code such as USD", raw.currency));
        }
        if raw.rounding.scale > 12 {
            return invalid(format!("rounding.scale {} is more than 12 decimal places", raw.rounding.scale));
        }
        let mut thresholds = Vec::new();
        for t in &raw.thresholds {
            let v = Decimal::from_str(t).map_err(|e| PriceBookError::Invalid(format!("threshold {t:?}: {e}")))?;
            if v <= Decimal::ZERO || thresholds.last().is_some_and(|last| *last >= v) {
                return invalid(format!("thresholds must be positive and ascending; {t} is not"));
            }
            thresholds.push(v);
        }
        let mut prices = BTreeMap::new();
        for p in raw.prices {
            let what = format!("price of ({}, {})", p.product_sku, p.use_unit);
            let model = match (p.model, p.unit_price, p.tiers.is_empty()) {
                (RawModel::Flat, Some(unit_price), true) => {
                    if unit_price < Decimal::ZERO {
                        return invalid(format!("{what}: unit_price is negative"));
                    }
                    Model::Flat { unit_price }
                }
                (RawModel::Flat, _, _) => return invalid(format!("{what}: model flat needs unit_price and no tiers")),
                (m @ (RawModel::Graduated | RawModel::Volume), None, false) => {
                    check_tiers(&what, &p.tiers)?;
                    match m {
                        RawModel::Graduated => Model::Graduated { tiers: p.tiers },
                        _ => Model::Volume { tiers: p.tiers },
                    }
                }
                (_, _, _) => return invalid(format!("{what}: tiered models need tiers and no unit_price")),
            };
            if prices.insert((p.product_sku, p.use_unit), model).is_some() {
                return invalid(format!("{what} is listed twice"));
            }
        }
        Ok(Self {
            currency: raw.currency,
            rounding: Rounding { scale: raw.rounding.scale, mode: raw.rounding.mode },
            thresholds,
            prices,
        })
    }
}

/// Tiers: ascending positive bounds, non-negative prices, the last one unbounded (so
/// every quantity has a price).
fn check_tiers(what: &str, tiers: &[Tier]) -> Result<(), PriceBookError> {
    let invalid = |m: String| Err(PriceBookError::Invalid(format!("{what}: {m}")));
    let mut prev = Decimal::ZERO;
    for (i, t) in tiers.iter().enumerate() {
        if t.unit_price < Decimal::ZERO {
            return invalid(format!("tier {} has a negative unit_price", i + 1));
        }
        match (t.up_to, i + 1 == tiers.len()) {
            (None, true) => {}
            (None, false) => return invalid(format!("only the last tier may omit up_to (tier {})", i + 1)),
            (Some(_), true) => return invalid("the last tier must omit up_to, so every quantity has a price".into()),
            (Some(u), false) if u <= prev => return invalid(format!("tier {} up_to {u} is not above {prev}", i + 1)),
            (Some(u), false) => prev = u,
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shipped_price_book_parses() {
        let book = PriceBook::from_file(Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/topology/price-book.toml"))).unwrap();
        assert_eq!(book.currency, "USD");
        assert!(matches!(book.model("api.requests", "request"), Some(Model::Flat { .. })));
        // The re-rating example: the same skus, changed prices.
        let changed = PriceBook::from_file(Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/topology/price-book-2027.toml"))).unwrap();
        assert_eq!(changed.prices.keys().collect::<Vec<_>>(), book.prices.keys().collect::<Vec<_>>());
        assert!(matches!(changed.model("api.requests", "request"), Some(Model::Flat { unit_price }) if unit_price.to_string() == "0.0009"));
    }

    #[test]
    fn bad_books_are_refused_with_a_reason() {
        let head = "currency = \"USD\"\nrounding = { scale = 2, mode = \"half_even\" }\n";
        let bad = [
            ("currency = \"usd\"\nrounding = { scale = 2, mode = \"half_even\" }", "ISO 4217"),
            ("currency = \"USD\"\nrounding = { scale = 2, mode = \"nearest\" }", "not valid TOML"),
            (&format!("{head}thresholds = [\"10\", \"5\"]"), "ascending"),
            (&format!("{head}[[prices]]\nproduct_sku = \"a\"\nuse_unit = \"u\"\nmodel = \"flat\""), "needs unit_price"),
            (&format!("{head}[[prices]]\nproduct_sku = \"a\"\nuse_unit = \"u\"\nmodel = \"volume\"\ntiers = [{{ up_to = \"10\", unit_price = \"1\" }}]"), "last tier"),
            (&format!("{head}[[prices]]\nproduct_sku = \"a\"\nuse_unit = \"u\"\nmodel = \"graduated\"\ntiers = [{{ up_to = \"10\", unit_price = \"1\" }}, {{ up_to = \"5\", unit_price = \"1\" }}, {{ unit_price = \"1\" }}]"), "not above"),
            (&format!("{head}[[prices]]\nproduct_sku = \"a\"\nuse_unit = \"u\"\nmodel = \"flat\"\nunit_price = \"1\"\n[[prices]]\nproduct_sku = \"a\"\nuse_unit = \"u\"\nmodel = \"flat\"\nunit_price = \"2\""), "twice"),
            (&format!("{head}[[prices]]\nproduct_sku = \"a\"\nuse_unit = \"u\"\nmodel = \"flat\"\nunit_price = \"-1\""), "negative"),
        ];
        for (text, why) in bad {
            let err = PriceBook::from_toml(text).unwrap_err().to_string();
            assert!(err.contains(why), "{text}\n→ {err} (wanted {why:?})");
        }
    }

    #[test]
    fn rounding_modes_on_ties_and_non_ties() {
        let d = |s: &str| Decimal::from_str(s).unwrap();
        let r = |mode| Rounding { scale: 2, mode };
        assert_eq!(r(RoundingMode::HalfEven).apply(d("0.125")), d("0.12"));
        assert_eq!(r(RoundingMode::HalfEven).apply(d("0.135")), d("0.14"));
        assert_eq!(r(RoundingMode::HalfUp).apply(d("0.125")), d("0.13"));
        assert_eq!(r(RoundingMode::HalfDown).apply(d("0.125")), d("0.12"));
        assert_eq!(r(RoundingMode::HalfDown).apply(d("0.1251")), d("0.13"));
        assert_eq!(r(RoundingMode::Up).apply(d("0.121")), d("0.13"));
        assert_eq!(r(RoundingMode::Down).apply(d("0.129")), d("0.12"));
        assert_eq!(r(RoundingMode::Down).apply(d("3")).to_string(), "3.00");
    }
}
