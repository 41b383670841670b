//! Invoices (SPEC §9): what a tenant owes for a billing period, built from the period's
//! charges so that invoice and ledger can never disagree. Pure: no Kafka here; issuing
//! (the period's closing, the fenced transaction) is [`crate::billing`].
//!
//! - [`records`]: the invoice, credit-note and debit-note records of `tenant.invoices`;
//! - [`fold`]: a tenant's charges of a period folded into invoice lines, checked
//!   against the ledger's own running totals;
//! - [`adjust`]: what a correction after issue changes, as an adjustment's lines;
//! - [`closing`]: when a period is closed (every window of it final).

pub mod adjust;
pub mod closing;
pub mod fold;
pub mod records;

pub use fold::PeriodCharges;
pub use records::{Invoice, Kind, Line};

/// Why an invoice cannot be built from a period's charges. Each one stops the tenant's
/// invoice: billing a total the ledger does not back would be wrong about money.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvoiceError {
    /// The ledger changed currency inside a period (its price book did).
    #[error("tenant {tenant} has charges in {first} and in {second} in {period}: one invoice has one currency")]
    MixedCurrencies { tenant: String, period: String, first: String, second: String },
    /// The charges do not add up to the ledger's running totals they carry: a charge is
    /// missing, duplicated or out of order.
    #[error(
        "tenant {}'s charges of {}/{} in {} add up to {} for {}, but the ledger's last charge says {} for {}",
        .0.tenant, .0.sku, .0.unit, .0.period, .0.summed_quantity, .0.summed_amount, .0.ledger_quantity, .0.ledger_amount
    )]
    LedgerMismatch(Box<Mismatch>),
    #[error("a sum of {0} left the range of an exact decimal")]
    Overflow(String),
}

/// Where a tenant's charges and the ledger disagree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mismatch {
    pub tenant: String,
    pub period: String,
    pub sku: String,
    pub unit: String,
    pub summed_quantity: rust_decimal::Decimal,
    pub summed_amount: rust_decimal::Decimal,
    pub ledger_quantity: rust_decimal::Decimal,
    pub ledger_amount: rust_decimal::Decimal,
}
