//! What the rating consumer writes: charges (`tenant.rated.charges`) and threshold
//! alerts (`tenant.usage.alerts`), both JSON with exact decimal strings. Their ids are
//! deterministic, so a re-sent record upserts instead of double-counting downstream.

use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

use super::pricing::TierLine;
use crate::pulse::{ids, time};

/// One charge: the money a new or corrected aggregate adds to (or, for a downward
/// correction, removes from) a tenant's bill.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Charge {
    /// `hash(aggregate_id|revision)`: one charge per aggregate revision.
    pub charge_id: String,
    pub tenant_id: String,
    pub product_sku: String,
    pub use_unit: String,
    pub window: String,
    #[serde(with = "time::rfc3339_ms")]
    pub window_start: i64,
    #[serde(with = "time::rfc3339_ms")]
    pub window_end: i64,
    pub aggregate_id: String,
    pub revision: u32,
    /// This aggregate's total quantity (its `total_amount`).
    #[serde(with = "rust_decimal::serde::str")]
    pub quantity: Decimal,
    /// Quantity added by this revision (new total − previously charged total).
    #[serde(with = "rust_decimal::serde::str")]
    pub quantity_delta: Decimal,
    /// Money this charge adds: rounded price of the period quantity after, minus before.
    #[serde(with = "rust_decimal::serde::str")]
    pub amount: Decimal,
    pub currency: String,
    /// Billing period: the UTC calendar month of `window_start`, `YYYY-MM`.
    pub period: String,
    /// The tenant's quantity of this sku and unit in the period, after this charge.
    #[serde(with = "rust_decimal::serde::str")]
    pub period_quantity: Decimal,
    /// The rounded price of `period_quantity`: what this sku and unit cost so far.
    #[serde(with = "rust_decimal::serde::str")]
    pub period_amount: Decimal,
    /// Tier breakdown of `period_quantity` (unrounded amounts).
    pub tiers: Vec<TierLine>,
    /// The tenant's spend in the period (all skus), after this charge.
    #[serde(with = "rust_decimal::serde::str")]
    pub balance_after: Decimal,
    #[serde(with = "time::rfc3339_ms")]
    pub rated_at: i64,
}

/// A tenant's period spend reached a threshold of the price book.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Alert {
    /// `hash(tenant|period|threshold)`: one alert per crossing.
    pub alert_id: String,
    pub tenant_id: String,
    pub period: String,
    pub currency: String,
    #[serde(with = "rust_decimal::serde::str")]
    pub threshold: Decimal,
    /// The balance that reached it.
    #[serde(with = "rust_decimal::serde::str")]
    pub balance: Decimal,
    /// The charge that made the balance reach it.
    pub charge_id: String,
    #[serde(with = "time::rfc3339_ms")]
    pub crossed_at: i64,
}

pub fn charge_id(aggregate_id: &str, revision: u32) -> String {
    ids::stable_hash(&["charge", aggregate_id, &revision.to_string()])
}

pub fn alert_id(tenant: &str, period: &str, threshold: Decimal) -> String {
    ids::stable_hash(&["alert", tenant, period, &threshold.normalize().to_string()])
}

impl Charge {
    pub fn to_json(&self) -> Result<Vec<u8>, serde_json::Error> {
        serde_json::to_vec(self)
    }
}

impl Alert {
    pub fn to_json(&self) -> Result<Vec<u8>, serde_json::Error> {
        serde_json::to_vec(self)
    }
}
