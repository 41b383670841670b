//! Issuing exactly once. Each partition of `tenant.invoices` has one issuer: the holder
//! of the transactional id `<application_id>-invoice-<partition>`. Taking the id
//! (`init_transactions`) fences any earlier holder and finishes its open transaction,
//! committed or aborted; the new holder then reads the partition to its end and knows
//! every document issued there, so it numbers the next one gap-free and never issues
//! a second invoice for a tenant and period. A holder fenced while it works (another
//! run, another replica) fails to commit, takes the id back, reads again, and finds
//! what the other one issued: `invoice_already_exists`. A run killed with SIGKILL
//! leaves an open transaction that the next holder aborts, so nothing half-issued is
//! ever visible, and its numbers are given again.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use rdkafka::consumer::Consumer;
use rdkafka::producer::{BaseRecord, Producer};
use rdkafka::Message;

use super::closing::reader_config;
use super::{BillingError, Outcome, TenantOutcome};
use crate::config::Config;
use crate::invoice::adjust::adjustment;
use crate::invoice::records::{invoice_key, issuer};
use crate::invoice::{Invoice, PeriodCharges};
use crate::kafka::clients::{self, DeliveryTracker};
use crate::kafka::reader::{PartitionsToEnd, Range};
use crate::pulse::time::now_ms;

const TXN_TIMEOUT: Duration = Duration::from_secs(30);
/// Documents per transaction: a killed run loses at most this much work.
const PER_TRANSACTION: usize = 200;
/// Attempts at a partition before giving up (each after being fenced or failing).
const ATTEMPTS: u32 = 5;

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
    let mut attempt = 0;
    loop {
        attempt += 1;
        match issue_once(cfg, &transactional_id, partition, period, bounds, adjustments, work, &mut ours, latencies) {
            Ok(outcomes) => return Ok(outcomes),
            Err(e) if attempt < ATTEMPTS => {
                tracing::warn!(partition, attempt, "issuing invoices: {e}; taking the issuer id again and re-reading");
                std::thread::sleep(Duration::from_millis(200 * u64::from(attempt)));
            }
            Err(e) => return Err(e),
        }
    }
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
    let producer = clients::transactional_producer(cfg, transactional_id, DeliveryTracker::default())?;
    producer.init_transactions(TXN_TIMEOUT)?;
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
        producer.begin_transaction()?;
        for (_, doc) in &pending {
            let key = doc.key();
            let value = doc.to_json().map_err(|e| BillingError::Corrupt(format!("encoding an invoice: {e}")))?;
            let mut record = BaseRecord::to(topic).partition(partition).key(&key).payload(&value);
            // The local queue is far larger than a transaction's documents.
            while let Err((e, back)) = producer.send(record) {
                if !matches!(e.rdkafka_error_code(), Some(rdkafka::types::RDKafkaErrorCode::QueueFull)) {
                    let _ = producer.abort_transaction(TXN_TIMEOUT);
                    return Err(e.into());
                }
                record = back;
                producer.poll(Duration::from_millis(10));
            }
        }
        // Delivered first: commit_transaction's own wait for deliveries is slower (see
        // runtime::record_collector).
        if let Err(e) = clients::flush(&producer, TXN_TIMEOUT).and_then(|()| producer.commit_transaction(TXN_TIMEOUT)) {
            let _ = producer.abort_transaction(TXN_TIMEOUT);
            return Err(e.into());
        }
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
    let mut reader = PartitionsToEnd::open(&reader_config(cfg), "invoice issuer", topic, BTreeMap::new(), Some(Duration::from_secs(60)))?;
    let (low, high) = reader.consumer().fetch_watermarks(topic, partition, Duration::from_secs(10))?;
    reader.assign(BTreeMap::from([(partition, Range { from: low, end: Some(high) })]))?;
    let mut docs = BTreeMap::new();
    let mut numbers = BTreeSet::new();
    while !reader.is_done() {
        let Some(msg) = reader.next(Duration::from_millis(500))? else { continue };
        match msg.payload().map(serde_json::from_slice::<Invoice>) {
            Some(Ok(doc)) => {
                numbers.insert(doc.number);
                docs.insert(doc.key(), doc);
            }
            Some(Err(e)) => tracing::error!(partition, offset = msg.offset(), "{topic}: a record that is no invoice skipped: {e}"),
            None => {}
        }
    }
    let last = numbers.last().copied().unwrap_or(0);
    if last != numbers.len() as u64 {
        tracing::error!(partition, last, documents = numbers.len(), "{topic}[{partition}]'s numbers have gaps: were records deleted?");
    }
    Ok(Ledger { docs, next_number: last + 1 })
}
