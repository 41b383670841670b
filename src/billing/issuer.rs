//! Issuing exactly once. Each partition of `tenant.invoices` has one issuer: the holder
//! of the transactional id `<application_id>-invoice-<partition>` ([`super::fenced`]).
//! Having read the partition to its end, the issuer knows every document issued there,
//! so it numbers the next one gap-free and never issues a second invoice for a tenant
//! and period. A holder fenced while it works (another run, another replica) fails to
//! commit, takes the id back, reads again, and finds what the other one issued:
//! `invoice_already_exists`. A run killed with SIGKILL leaves an open transaction that
//! the next holder aborts, so nothing half-issued is ever visible, and its numbers are
//! given again.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use super::{fenced, BillingError, Outcome, TenantOutcome};
use crate::config::Config;
use crate::invoice::adjust::{adjustment, rerating_note};
use crate::invoice::records::{invoice_key, issuer};
use crate::invoice::{Invoice, PeriodCharges};
use crate::pulse::time::now_ms;

/// Documents per transaction: a killed run loses at most this much work.
const PER_TRANSACTION: usize = 200;

/// What one issuer is asked to do: tenants of its partition with their period's charges.
pub struct Work {
    pub tenant_id: String,
    pub charges: PeriodCharges,
}

/// The documents of one partition, by key.
struct Ledger {
    docs: BTreeMap<String, Invoice>,
    next_number: u64,
}

impl Ledger {
    /// The invoice of a tenant's period and its adjustments so far (in order).
    fn of(&self, tenant: &str, period: &str) -> Option<(&Invoice, Vec<&Invoice>)> {
        let key = invoice_key(tenant, period);
        let invoice = self.docs.get(&key)?;
        let adjustments = (1..).map_while(|n| self.docs.get(&format!("{key}|adjustment|{n}"))).collect();
        Some((invoice, adjustments))
    }
}

/// Issues the invoices (and, with `adjustments`, the adjustments) of `work` in
/// partition `partition`, appending each tenant's outcome and each issued document's
/// latency (from the start of its transaction to its commit).
pub fn issue(
    cfg: &Config,
    partition: i32,
    period: &str,
    bounds: (i64, i64),
    adjustments: bool,
    work: &[Work],
    latencies: &mut Vec<Duration>,
) -> Result<Vec<TenantOutcome>, BillingError> {
    let transactional_id = format!("{}-invoice-{partition}", cfg.application_id);
    // Documents this run committed, so a retry after being fenced reports them as issued.
    let mut ours: BTreeMap<String, Invoice> = BTreeMap::new();
    fenced::retrying(&format!("issuing invoices in partition {partition}"), || {
        issue_once(cfg, &transactional_id, partition, period, bounds, adjustments, work, &mut ours, latencies)
    })
}

#[allow(clippy::too_many_arguments)]
fn issue_once(
    cfg: &Config,
    transactional_id: &str,
    partition: i32,
    period: &str,
    bounds: (i64, i64),
    adjustments: bool,
    work: &[Work],
    ours: &mut BTreeMap<String, Invoice>,
    latencies: &mut Vec<Duration>,
) -> Result<Vec<TenantOutcome>, BillingError> {
    let producer = fenced::take(cfg, transactional_id)?;
    let mut ledger = read_partition(cfg, partition)?;
    let name = issuer(partition);
    let topic = &cfg.topics.invoices;
    let mut outcomes = Vec::with_capacity(work.len());
    for chunk in work.chunks(PER_TRANSACTION) {
        let started = Instant::now();
        let mut pending: Vec<(usize, Invoice)> = Vec::new();
        for w in chunk {
            let (outcome, doc) = decide(&ledger, &name, period, bounds, adjustments, w, ours)?;
            if let Some(doc) = doc {
                ledger.next_number += 1;
                pending.push((outcomes.len(), doc));
            }
            outcomes.push(TenantOutcome { tenant_id: w.tenant_id.clone(), outcome });
        }
        if pending.is_empty() {
            continue;
        }
        let records = pending
            .iter()
            .map(|(_, doc)| doc.to_json().map(|v| (doc.key(), v)))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| BillingError::Corrupt(format!("encoding an invoice: {e}")))?;
        fenced::commit(&producer, topic, partition, &records)?;
        let took = started.elapsed();
        for (i, doc) in pending {
            latencies.push(took);
            ours.insert(doc.key(), doc.clone());
            ledger.docs.insert(doc.key(), doc.clone());
            outcomes[i].outcome = Outcome::Issued(Box::new(doc));
        }
    }
    Ok(outcomes)
}

/// One tenant's outcome, and the document to issue for it if any (numbered next).
fn decide(
    ledger: &Ledger,
    issuer: &str,
    period: &str,
    bounds: (i64, i64),
    adjustments: bool,
    w: &Work,
    ours: &BTreeMap<String, Invoice>,
) -> Result<(Outcome, Option<Invoice>), BillingError> {
    let issued_at = now_ms();
    let number = ledger.next_number;
    let Some((invoice, earlier)) = ledger.of(&w.tenant_id, period) else {
        return match w.charges.invoice(issuer, number, bounds, issued_at) {
            Ok(doc) => Ok((Outcome::Issued(Box::new(doc.clone())), Some(doc))),
            Err(e) => Ok((Outcome::Failed { reason: e.to_string() }, None)),
        };
    };
    let pending = match adjustment(invoice, &earlier, &w.charges, issuer, number, issued_at) {
        Ok(a) => a,
        Err(e) => return Ok((Outcome::Failed { reason: e.to_string() }, None)),
    };
    // What this run itself committed before a retry is issued, not pre-existing.
    let last = earlier.last().copied().unwrap_or(invoice);
    if pending.is_none() {
        if let Some(doc) = ours.get(&last.key()) {
            return Ok((Outcome::Issued(Box::new(doc.clone())), None));
        }
    }
    match pending {
        Some(doc) if adjustments => Ok((Outcome::Issued(Box::new(doc.clone())), Some(doc))),
        pending => Ok((
            Outcome::AlreadyIssued {
                invoice_id: invoice.invoice_id.clone(),
                number: invoice.display_number(),
                adjustment_pending: pending.map(|a| a.total),
            },
            None,
        )),
    }
}

/// Every document of `partition`, read to its end after this issuer took its id.
fn read_partition(cfg: &Config, partition: i32) -> Result<Ledger, BillingError> {
    let topic = &cfg.topics.invoices;
    let mut docs = BTreeMap::new();
    let mut numbers = BTreeSet::new();
    for (_, value) in fenced::read_to_end(cfg, topic, partition, "invoice issuer")? {
        match serde_json::from_slice::<Invoice>(&value) {
            Ok(doc) => {
                numbers.insert(doc.number);
                docs.insert(doc.key(), doc);
            }
            Err(e) => tracing::error!(partition, "{topic}: a record that is no invoice skipped: {e}"),
        }
    }
    let last = numbers.last().copied().unwrap_or(0);
    if last != numbers.len() as u64 {
        tracing::error!(partition, last, documents = numbers.len(), "{topic}[{partition}]'s numbers have gaps: were records deleted?");
    }
    Ok(Ledger { docs, next_number: last + 1 })
}

/// A re-rating job's difference for one tenant and period, to issue as a note.
pub struct Note {
    pub tenant_id: String,
    pub period: String,
    pub job_id: String,
    pub currency: String,
    /// Per sku and unit: the change in quantity and amount (re-rated minus billed),
    /// with what was billed before.
    pub lines: Vec<crate::invoice::Line>,
}

/// What issuing a note did: its id (now or before), or that the period has no invoice.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NoteOutcome {
    Issued(String),
    IssuedBefore(String),
    NotInvoiced,
}

/// Issues `notes` (all of invoices partition `partition`) in one fenced transaction:
/// each once (its key names the job), referencing the period's invoice.
pub fn issue_notes(cfg: &Config, partition: i32, notes: &[Note]) -> Result<Vec<NoteOutcome>, BillingError> {
    let transactional_id = format!("{}-invoice-{partition}", cfg.application_id);
    fenced::retrying(&format!("issuing re-rating notes in partition {partition}"), || {
        let producer = fenced::take(cfg, &transactional_id)?;
        let mut ledger = read_partition(cfg, partition)?;
        let mut outcomes = Vec::with_capacity(notes.len());
        let mut records = Vec::new();
        for n in notes {
            let key = crate::invoice::records::rerating_note_key(&n.tenant_id, &n.period, &n.job_id);
            if let Some(doc) = ledger.docs.get(&key) {
                outcomes.push(NoteOutcome::IssuedBefore(doc.invoice_id.clone()));
                continue;
            }
            let Some(invoice) = ledger.docs.get(&invoice_key(&n.tenant_id, &n.period)) else {
                outcomes.push(NoteOutcome::NotInvoiced);
                continue;
            };
            let doc = match rerating_note(invoice, &n.job_id, &n.currency, n.lines.clone(), &issuer(partition), ledger.next_number, now_ms()) {
                Ok(doc) => doc,
                Err(e) => return Err(BillingError::Corrupt(e.to_string())),
            };
            ledger.next_number += 1;
            let value = doc.to_json().map_err(|e| BillingError::Corrupt(format!("encoding a note: {e}")))?;
            records.push((key.clone(), value));
            outcomes.push(NoteOutcome::Issued(doc.invoice_id.clone()));
            ledger.docs.insert(key, doc);
        }
        if !records.is_empty() {
            fenced::commit(&producer, &cfg.topics.invoices, partition, &records)?;
        }
        Ok(outcomes)
    })
}
