//! Corrections after an invoice was issued (a late pulse's revision, an applied
//! re-rating) never change it: the difference between what the period's charges add
//! up to now and what was billed (the invoice plus its earlier adjustments) is issued
//! as a credit note (less owed) or a debit note (more owed) referencing the invoice.

use std::collections::BTreeMap;

use super::fold::{sum, PeriodCharges};
use super::records::{adjustment_id, rerating_note_id, Billed, Covered, Invoice, Kind, Line};
use super::InvoiceError;

/// What `documents` (an invoice and its adjustments) billed, per sku and unit.
pub fn billed<'a>(documents: impl IntoIterator<Item = &'a Invoice>) -> BTreeMap<(String, String), Billed> {
    let mut out: BTreeMap<(String, String), Billed> = BTreeMap::new();
    for d in documents {
        for l in &d.lines {
            let b = out.entry((l.product_sku.clone(), l.use_unit.clone())).or_default();
            b.quantity += l.quantity;
            b.amount += l.amount;
        }
    }
    out
}

/// The adjustment that brings `invoice` and its `earlier` adjustments to what `now`
/// adds up to, numbered `number` by `issuer`; none when nothing changed.
pub fn adjustment(
    invoice: &Invoice,
    earlier: &[&Invoice],
    now: &PeriodCharges,
    issuer: &str,
    number: u64,
    issued_at: i64,
) -> Result<Option<Invoice>, InvoiceError> {
    if let Some(c) = now.currency().filter(|c| *c != invoice.currency) {
        return Err(InvoiceError::MixedCurrencies {
            tenant: invoice.tenant_id.clone(),
            period: invoice.period.clone(),
            first: invoice.currency.clone(),
            second: c.to_owned(),
        });
    }
    let before = billed(std::iter::once(invoice).chain(earlier.iter().copied()));
    let current: BTreeMap<(String, String), Line> =
        now.lines()?.into_iter().map(|l| ((l.product_sku.clone(), l.use_unit.clone()), l)).collect();
    let mut keys: Vec<&(String, String)> = before.keys().chain(current.keys()).collect();
    keys.sort();
    keys.dedup();
    let mut lines = Vec::new();
    for key in keys {
        let was = before.get(key).copied().unwrap_or_default();
        let (quantity, amount, tiers) = match current.get(key) {
            Some(l) => (l.quantity, l.amount, l.tiers.clone()),
            None => (Default::default(), Default::default(), Vec::new()),
        };
        if quantity == was.quantity && amount == was.amount {
            continue;
        }
        lines.push(Line {
            product_sku: key.0.clone(),
            use_unit: key.1.clone(),
            quantity: quantity - was.quantity,
            tiers,
            amount: amount - was.amount,
            billed_before: Some(was),
        });
    }
    if lines.is_empty() {
        return Ok(None);
    }
    let n = u32::try_from(earlier.len() + 1).unwrap_or(u32::MAX);
    let counted: u64 = std::iter::once(invoice).chain(earlier.iter().copied()).map(|d| d.charges.count).sum();
    let all = now.covered();
    Ok(Some(Invoice {
        invoice_id: adjustment_id(&invoice.tenant_id, &invoice.period, n),
        adjustment: Some(n),
        charges: Covered { count: all.count.saturating_sub(counted), ..all },
        ..note_on(invoice, lines, issuer, number, issued_at)?
    }))
}

/// The note applying re-rating job `job_id` to `invoice`'s period: `lines` are the
/// job's differences per sku and unit (re-rated minus billed), numbered `number` by
/// `issuer`. It covers no charge: it changes prices, not usage.
pub fn rerating_note(
    invoice: &Invoice,
    job_id: &str,
    currency: &str,
    lines: Vec<Line>,
    issuer: &str,
    number: u64,
    issued_at: i64,
) -> Result<Invoice, InvoiceError> {
    Ok(Invoice {
        invoice_id: rerating_note_id(&invoice.tenant_id, &invoice.period, job_id),
        rerating_job: Some(job_id.to_owned()),
        currency: currency.to_owned(),
        ..note_on(invoice, lines, issuer, number, issued_at)?
    })
}

/// A credit or debit note of `lines` on `invoice`, numbered `number` by `issuer`; the
/// callers give it its id and say what it adjusts for.
fn note_on(invoice: &Invoice, lines: Vec<Line>, issuer: &str, number: u64, issued_at: i64) -> Result<Invoice, InvoiceError> {
    let total = sum(lines.iter().map(|l| l.amount), &invoice.tenant_id)?;
    Ok(Invoice {
        invoice_id: String::new(),
        kind: Kind::of_adjustment(total),
        adjusts: Some(invoice.invoice_id.clone()),
        adjustment: None,
        rerating_job: None,
        issuer: issuer.to_owned(),
        number,
        tenant_id: invoice.tenant_id.clone(),
        period: invoice.period.clone(),
        period_start: invoice.period_start,
        period_end: invoice.period_end,
        currency: invoice.currency.clone(),
        lines,
        subtotal: total,
        total,
        charges: Covered { count: 0, last_charge_id: String::new(), last_rated_at: issued_at },
        issued_at,
    })
}
