//! The ledger: turns final window aggregates into charges, keeps per-tenant running
//! balances and raises threshold alerts. Pure: state is read through [`Kv`] and the
//! batch's writes are kept in [`Ledger::writes`] for the I/O layer to persist.
//!
//! Principle (exact and order-independent): for each (tenant, sku, unit, period) the
//! ledger keeps the total quantity rated, and the amount charged for it always equals
//! `round(price(total))`. An aggregate moving that total from `q0` to `q1` is charged
//! `round(price(q1)) − round(price(q0))`, so the charges telescope to the exact rounded
//! price of the total whatever their order. A higher revision of an aggregate replaces
//! the quantity of the revision charged before it (delta = new − old); a revision at or
//! below the one already charged is a re-delivery and charges nothing.

use std::collections::BTreeMap;
use std::str::FromStr;

use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

use super::price_book::PriceBook;
use super::pricing::{price, Overflow};
use super::records::{alert_id, charge_id, Alert, Charge};
use crate::window::WindowAggregate;

/// Read access to the ledger's persisted state (RocksDB in production, a map in tests).
pub trait Kv {
    type Error: std::error::Error + Send + Sync + 'static;
    fn get(&mut self, key: &str) -> Result<Option<String>, Self::Error>;
}

impl Kv for BTreeMap<String, String> {
    type Error = std::convert::Infallible;
    fn get(&mut self, key: &str) -> Result<Option<String>, Self::Error> {
        Ok(BTreeMap::get(self, key).cloned())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    #[error("ledger state: {0}")]
    Store(Box<dyn std::error::Error + Send + Sync>),
    #[error("ledger state key {key} holds an unreadable value: {value}")]
    Corrupt { key: String, value: String },
    #[error(transparent)]
    Overflow(#[from] Overflow),
    /// A state value could not be encoded: the batch must not commit.
    #[error("encoding ledger state: {0}")]
    Encode(#[from] serde_json::Error),
}

/// What rating one aggregate did.
#[derive(Debug, Clone, PartialEq, Eq)]
// Returned once per aggregate and consumed at once, never stored: a box would only add
// an allocation per charge.
#[allow(clippy::large_enum_variant)]
pub enum Rated {
    /// A charge (possibly of 0 when a correction did not change the quantity), and the
    /// alerts for thresholds it made the balance reach.
    Charged { charge: Charge, alerts: Vec<Alert> },
    /// This revision (or a later one) of the aggregate was already charged.
    AlreadyCharged { charged_revision: u32 },
    /// The price book has no price for the aggregate's (sku, unit).
    Unpriced,
}

/// What was charged for one aggregate: its revision and quantity.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
struct Charged {
    revision: u32,
    #[serde(with = "rust_decimal::serde::str")]
    quantity: Decimal,
}

/// The ledger of one batch: reads through to a [`Kv`], buffers writes.
#[derive(Debug, Default)]
pub struct Ledger {
    writes: BTreeMap<String, String>,
}

impl Ledger {
    /// Rates one final aggregate at wall-clock `now_ms`.
    pub fn rate<S: Kv>(&mut self, store: &mut S, book: &PriceBook, agg: &WindowAggregate, now_ms: i64) -> Result<Rated, LedgerError> {
        let charged_key = format!("a|{}", agg.aggregate_id);
        let before: Option<Charged> = self.read_json(store, &charged_key)?;
        if let Some(c) = before.filter(|c| c.revision >= agg.revision) {
            return Ok(Rated::AlreadyCharged { charged_revision: c.revision });
        }
        let Some(model) = book.model(&agg.product_sku, &agg.use_unit) else { return Ok(Rated::Unpriced) };
        let overflow = || Overflow { quantity: agg.total_amount };
        let period = super::period::of(agg.window_start);
        let old_quantity = before.map_or(Decimal::ZERO, |c| c.quantity);
        let quantity_delta = agg.total_amount.checked_sub(old_quantity).ok_or_else(overflow)?;

        let usage_key = format!("u|{}|{}|{}|{}", agg.tenant_id, agg.product_sku, agg.use_unit, period);
        let q0 = self.read_decimal(store, &usage_key)?;
        let q1 = q0.checked_add(quantity_delta).ok_or_else(overflow)?;
        let round = |q| price(model, q).map(|(amount, lines)| (book.rounding.apply(amount), lines));
        let (a0, _) = round(q0)?;
        let (a1, tiers) = round(q1)?;
        let amount = a1.checked_sub(a0).ok_or_else(overflow)?;

        let balance_key = format!("b|{}|{}", agg.tenant_id, period);
        let b0 = self.read_decimal(store, &balance_key)?;
        let b1 = b0.checked_add(amount).ok_or_else(overflow)?;

        let charge = Charge {
            charge_id: charge_id(&agg.aggregate_id, agg.revision),
            tenant_id: agg.tenant_id.clone(),
            product_sku: agg.product_sku.clone(),
            use_unit: agg.use_unit.clone(),
            window: agg.window.clone(),
            window_start: agg.window_start,
            window_end: agg.window_end,
            aggregate_id: agg.aggregate_id.clone(),
            revision: agg.revision,
            quantity: agg.total_amount,
            quantity_delta,
            amount,
            currency: book.currency.clone(),
            period: period.clone(),
            period_quantity: q1,
            period_amount: a1,
            tiers,
            balance_after: b1,
            rated_at: now_ms,
        };
        let alerts = book
            .thresholds
            .iter()
            .filter(|t| b0 < **t && **t <= b1)
            .map(|t| Alert {
                alert_id: alert_id(&agg.tenant_id, &period, *t),
                tenant_id: agg.tenant_id.clone(),
                period: period.clone(),
                currency: book.currency.clone(),
                threshold: *t,
                balance: b1,
                charge_id: charge.charge_id.clone(),
                crossed_at: now_ms,
            })
            .collect();

        let charged = Charged { revision: agg.revision, quantity: agg.total_amount };
        self.writes.insert(charged_key, serde_json::to_string(&charged)?);
        self.writes.insert(usage_key, q1.to_string());
        self.writes.insert(balance_key, b1.to_string());
        Ok(Rated::Charged { charge, alerts })
    }

    /// The state written since the last [`Self::take_writes`] (key → value).
    pub fn writes(&self) -> &BTreeMap<String, String> {
        &self.writes
    }

    /// Takes the buffered writes, for the I/O layer to persist after its commit.
    pub fn take_writes(&mut self) -> BTreeMap<String, String> {
        std::mem::take(&mut self.writes)
    }

    /// Forgets the buffered writes (the batch they belong to was not committed).
    pub fn discard(&mut self) {
        self.writes.clear();
    }

    /// A tenant's spend in a period, as the ledger (with this batch's writes) sees it.
    pub fn balance<S: Kv>(&self, store: &mut S, tenant: &str, period: &str) -> Result<Decimal, LedgerError> {
        self.read_decimal(store, &format!("b|{tenant}|{period}"))
    }

    fn read<S: Kv>(&self, store: &mut S, key: &str) -> Result<Option<String>, LedgerError> {
        match self.writes.get(key) {
            Some(v) => Ok(Some(v.clone())),
            None => store.get(key).map_err(|e| LedgerError::Store(Box::new(e))),
        }
    }

    fn read_decimal<S: Kv>(&self, store: &mut S, key: &str) -> Result<Decimal, LedgerError> {
        match self.read(store, key)? {
            None => Ok(Decimal::ZERO),
            Some(v) => Decimal::from_str(&v).map_err(|_| LedgerError::Corrupt { key: key.to_owned(), value: v }),
        }
    }

    fn read_json<S: Kv, T: for<'de> Deserialize<'de>>(&self, store: &mut S, key: &str) -> Result<Option<T>, LedgerError> {
        match self.read(store, key)? {
            None => Ok(None),
            Some(v) => serde_json::from_str(&v).map(Some).map_err(|_| LedgerError::Corrupt { key: key.to_owned(), value: v }),
        }
    }
}

#[cfg(test)]
mod tests;
