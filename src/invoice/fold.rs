//! A tenant's charges of one period, folded into invoice lines.
//!
//! The ledger charges each aggregate `round(price(q1)) − round(price(q0))` for the
//! period quantity it moves from `q0` to `q1` ([`crate::rate::ledger`]), and every charge
//! carries the period quantity and amount after it. So the charges of a sku and unit
//! add up to the rounded price of the period's quantity, and the last one (in log
//! order) states that same total. The fold sums the charges and checks the sums against
//! the last charge's running totals: an invoice is only built when both agree, so an
//! invoice can never disagree with the ledger.

use std::collections::BTreeMap;

use rust_decimal::Decimal;

use super::records::{invoice_id, Billed, Covered, Invoice, Kind, Line};
use super::{InvoiceError, Mismatch};
use crate::rate::pricing::TierLine;
use crate::rate::records::Charge;

/// One sku and unit: the sums of its charges, and the ledger's totals after the last.
#[derive(Debug, Clone, Default)]
struct LineFold {
    summed: Billed,
    ledger: Billed,
    tiers: Vec<TierLine>,
}

/// A tenant's charges of one period, in log order.
#[derive(Debug, Clone)]
pub struct PeriodCharges {
    pub tenant_id: String,
    pub period: String,
    currency: Option<String>,
    lines: BTreeMap<(String, String), LineFold>,
    count: u64,
    /// The latest charge by (rated_at, charge_id).
    last: Option<(i64, String)>,
}

impl PeriodCharges {
    pub fn new(tenant_id: &str, period: &str) -> Self {
        Self { tenant_id: tenant_id.to_owned(), period: period.to_owned(), currency: None, lines: BTreeMap::new(), count: 0, last: None }
    }

    /// Adds the next charge of the tenant's period (the caller filters by both).
    pub fn add(&mut self, c: &Charge) -> Result<(), InvoiceError> {
        match &self.currency {
            None => self.currency = Some(c.currency.clone()),
            Some(first) if *first != c.currency => {
                return Err(InvoiceError::MixedCurrencies {
                    tenant: self.tenant_id.clone(),
                    period: self.period.clone(),
                    first: first.clone(),
                    second: c.currency.clone(),
                })
            }
            Some(_) => {}
        }
        let line = self.lines.entry((c.product_sku.clone(), c.use_unit.clone())).or_default();
        let overflow = || InvoiceError::Overflow(format!("{}'s {}/{} charges", c.tenant_id, c.product_sku, c.use_unit));
        line.summed.quantity = line.summed.quantity.checked_add(c.quantity_delta).ok_or_else(overflow)?;
        line.summed.amount = line.summed.amount.checked_add(c.amount).ok_or_else(overflow)?;
        line.ledger = Billed { quantity: c.period_quantity, amount: c.period_amount };
        line.tiers.clone_from(&c.tiers);
        self.count += 1;
        if self.last.as_ref().is_none_or(|(at, id)| (c.rated_at, &c.charge_id) > (*at, id)) {
            self.last = Some((c.rated_at, c.charge_id.clone()));
        }
        Ok(())
    }

    pub fn count(&self) -> u64 {
        self.count
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    pub fn currency(&self) -> Option<&str> {
        self.currency.as_deref()
    }

    /// The charges covered, all of them.
    pub fn covered(&self) -> Covered {
        let (at, id) = self.last.clone().unwrap_or_default();
        Covered { count: self.count, last_charge_id: id, last_rated_at: at }
    }

    /// The lines, by sku and unit, once every line's sums agree with the ledger.
    pub fn lines(&self) -> Result<Vec<Line>, InvoiceError> {
        self.lines
            .iter()
            .map(|((sku, unit), l)| {
                if l.summed != l.ledger {
                    return Err(InvoiceError::LedgerMismatch(Box::new(Mismatch {
                        tenant: self.tenant_id.clone(),
                        period: self.period.clone(),
                        sku: sku.clone(),
                        unit: unit.clone(),
                        summed_quantity: l.summed.quantity,
                        summed_amount: l.summed.amount,
                        ledger_quantity: l.ledger.quantity,
                        ledger_amount: l.ledger.amount,
                    })));
                }
                Ok(Line {
                    product_sku: sku.clone(),
                    use_unit: unit.clone(),
                    quantity: l.summed.quantity,
                    tiers: l.tiers.clone(),
                    amount: l.summed.amount,
                    billed_before: None,
                })
            })
            .collect()
    }

    /// The invoice these charges make, numbered `number` by `issuer`.
    pub fn invoice(&self, issuer: &str, number: u64, bounds: (i64, i64), issued_at: i64) -> Result<Invoice, InvoiceError> {
        let lines = self.lines()?;
        let subtotal = sum(lines.iter().map(|l| l.amount), &self.tenant_id)?;
        Ok(Invoice {
            invoice_id: invoice_id(&self.tenant_id, &self.period),
            kind: Kind::Invoice,
            adjusts: None,
            adjustment: None,
            rerating_job: None,
            issuer: issuer.to_owned(),
            number,
            tenant_id: self.tenant_id.clone(),
            period: self.period.clone(),
            period_start: bounds.0,
            period_end: bounds.1,
            currency: self.currency.clone().unwrap_or_default(),
            lines,
            subtotal,
            total: subtotal,
            charges: self.covered(),
            issued_at,
        })
    }
}

/// An exact sum of amounts.
pub(super) fn sum(amounts: impl Iterator<Item = Decimal>, tenant: &str) -> Result<Decimal, InvoiceError> {
    let mut total = Decimal::ZERO;
    for a in amounts {
        total = total.checked_add(a).ok_or_else(|| InvoiceError::Overflow(format!("{tenant}'s invoice total")))?;
    }
    Ok(total)
}

#[cfg(test)]
mod tests;
