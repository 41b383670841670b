//! The records of `tenant.invoices` (compacted): invoices and the credit and debit
//! notes that adjust them. All JSON with exact decimal strings, like the charges.
//!
//! Keys: `tenant_id|period` for the invoice, `tenant_id|period|adjustment|<n>` for its
//! n-th adjustment. A tenant's documents all sit in one partition (chosen from the
//! tenant, as Kafka's partitioner would choose it for the key `tenant_id`), whose one
//! issuer numbers them gap-free.

use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

use crate::pulse::{ids, time};
use crate::rate::pricing::TierLine;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    Invoice,
    /// An adjustment that lowers what the tenant owes for the period.
    CreditNote,
    /// An adjustment that raises it.
    DebitNote,
}

impl Kind {
    /// The kind of an adjustment whose total is `total`: less owed is a credit note.
    pub fn of_adjustment(total: Decimal) -> Self {
        if total.is_sign_negative() && !total.is_zero() {
            Kind::CreditNote
        } else {
            Kind::DebitNote
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Invoice => "invoice",
            Kind::CreditNote => "credit_note",
            Kind::DebitNote => "debit_note",
        }
    }
}

/// One sku and unit of a document.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Line {
    pub product_sku: String,
    pub use_unit: String,
    /// The quantity billed (an adjustment: the change).
    #[serde(with = "rust_decimal::serde::str")]
    pub quantity: Decimal,
    /// How the period's whole quantity is priced, tier by tier (unrounded amounts, with
    /// unit prices), as the ledger priced it.
    pub tiers: Vec<TierLine>,
    /// The amount billed, rounded as the price book rounds (an adjustment: the change).
    #[serde(with = "rust_decimal::serde::str")]
    pub amount: Decimal,
    /// An adjustment's line: what was billed for this sku and unit before it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub billed_before: Option<Billed>,
}

/// A quantity and the amount billed for it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Billed {
    #[serde(with = "rust_decimal::serde::str")]
    pub quantity: Decimal,
    #[serde(with = "rust_decimal::serde::str")]
    pub amount: Decimal,
}

/// Which charges a document covers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Covered {
    /// Charges of the period it includes (an adjustment: those after the documents before it).
    pub count: u64,
    /// The latest of them (by rating time, then id).
    pub last_charge_id: String,
    #[serde(with = "time::rfc3339_ms")]
    pub last_rated_at: i64,
}

/// An invoice, or a credit or debit note adjusting one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Invoice {
    /// Deterministic: `hash(invoice|tenant|period)`, or `hash(adjustment|tenant|period|n)`.
    pub invoice_id: String,
    pub kind: Kind,
    /// A credit or debit note: the invoice it adjusts, and its place among that
    /// invoice's adjustments (1, 2, …).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub adjusts: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub adjustment: Option<u32>,
    /// A note issued by applying a re-rating job's diff: that job's id. Such notes
    /// stand beside the charge-driven adjustments, which never count them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rerating_job: Option<String>,
    /// Who numbered it: one issuer per partition of `tenant.invoices` (`P00`, `P01`, …).
    pub issuer: String,
    /// Gap-free per issuer, from 1.
    pub number: u64,
    pub tenant_id: String,
    /// `YYYY-MM`, a UTC calendar month.
    pub period: String,
    #[serde(with = "time::rfc3339_ms")]
    pub period_start: i64,
    #[serde(with = "time::rfc3339_ms")]
    pub period_end: i64,
    pub currency: String,
    /// By sku, then unit.
    pub lines: Vec<Line>,
    #[serde(with = "rust_decimal::serde::str")]
    pub subtotal: Decimal,
    /// The subtotal: pulses adds no tax.
    #[serde(with = "rust_decimal::serde::str")]
    pub total: Decimal,
    pub charges: Covered,
    #[serde(with = "time::rfc3339_ms")]
    pub issued_at: i64,
}

pub fn invoice_id(tenant: &str, period: &str) -> String {
    ids::stable_hash(&["invoice", tenant, period])
}

pub fn adjustment_id(tenant: &str, period: &str, n: u32) -> String {
    ids::stable_hash(&["adjustment", tenant, period, &n.to_string()])
}

/// The record key of the invoice of `tenant` for `period`.
pub fn invoice_key(tenant: &str, period: &str) -> String {
    format!("{tenant}|{period}")
}

/// The record key of the note applying re-rating job `job` to `tenant`'s `period`.
pub fn rerating_note_key(tenant: &str, period: &str, job: &str) -> String {
    format!("{}|rerating|{job}", invoice_key(tenant, period))
}

pub fn rerating_note_id(tenant: &str, period: &str, job: &str) -> String {
    ids::stable_hash(&["rerating", tenant, period, job])
}

/// The name of partition `partition`'s issuer.
pub fn issuer(partition: i32) -> String {
    format!("P{partition:02}")
}

impl Invoice {
    /// Its record key in `tenant.invoices`.
    pub fn key(&self) -> String {
        match (&self.rerating_job, self.adjustment) {
            (Some(job), _) => rerating_note_key(&self.tenant_id, &self.period, job),
            (None, None) => invoice_key(&self.tenant_id, &self.period),
            (None, Some(n)) => format!("{}|adjustment|{n}", invoice_key(&self.tenant_id, &self.period)),
        }
    }

    /// `P03-000017`: the issuer and number, as printed.
    pub fn display_number(&self) -> String {
        format!("{}-{:06}", self.issuer, self.number)
    }

    pub fn to_json(&self) -> Result<Vec<u8>, serde_json::Error> {
        serde_json::to_vec(self)
    }
}
