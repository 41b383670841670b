//! A period's charges, read from `tenant.rated.charges` (read_committed) and folded per
//! tenant ([`PeriodCharges`]), in log order: the order the ledger wrote them in.
//!
//! A charge is produced after its window closed, so its record time is after the
//! window's start; reading starts at the first record stamped [`LOOKBACK`] before the
//! period (offsets for times), not at the start of the topic's history. The fold
//! checks every line against the ledger's running totals, so a charge missed for any
//! reason stops the invoice instead of under-billing it.

use std::collections::BTreeMap;
use std::time::Duration;

use rdkafka::Message;

use super::closing::reader_config;
use super::BillingError;
use crate::config::Config;
use crate::invoice::{InvoiceError, PeriodCharges};
use crate::kafka::admin::partition_ids;
use crate::kafka::reader::{PartitionsToEnd, Range};
use crate::replay::bounds::{end_offsets, start_offsets};
use crate::replay::ReplayError;
use crate::rate::records::Charge;

/// How far before the period's start reading begins: a margin for clocks.
const LOOKBACK: Duration = Duration::from_secs(7 * 86_400);

/// What reading found: each tenant's fold, or why it cannot be invoiced.
pub type Folds = BTreeMap<String, Result<PeriodCharges, InvoiceError>>;

/// Reads `partitions` of the charges topic up to their ends now, folding the charges of
/// `period` (starting at `period_start`) of `tenant` (or of every tenant).
pub fn read(cfg: &Config, partitions: &[i32], period: &str, period_start: i64, tenant: Option<&str>) -> Result<(Folds, u64), BillingError> {
    let mut folds: Folds = BTreeMap::new();
    let read = for_each(cfg, partitions, period_start, |charge| {
        if charge.period != period || tenant.is_some_and(|t| t != charge.tenant_id) {
            return;
        }
        let fold = folds.entry(charge.tenant_id.clone()).or_insert_with(|| Ok(PeriodCharges::new(&charge.tenant_id, period)));
        if let Ok(f) = fold {
            if let Err(e) = f.add(&charge) {
                *fold = Err(e);
            }
        }
    })?;
    Ok((folds, read))
}

/// Hands every charge of `partitions` (all of them when empty) stamped from
/// [`LOOKBACK`] before `from_ms` up to the partitions' ends now to `f`, in log order per
/// partition; the records read.
pub fn for_each(cfg: &Config, partitions: &[i32], from_ms: i64, mut f: impl FnMut(Charge)) -> Result<u64, BillingError> {
    let topic = &cfg.topics.charges;
    let mut reader = PartitionsToEnd::open(&reader_config(cfg), "invoice charges", topic, BTreeMap::new(), Some(Duration::from_secs(60)))?;
    let partitions = if partitions.is_empty() { partition_ids(cfg, topic)? } else { partitions.to_vec() };
    let from_ms = from_ms.saturating_sub(LOOKBACK.as_millis() as i64);
    let bounds = |e: ReplayError| BillingError::Corrupt(format!("the charges' offsets: {e}"));
    let starts = start_offsets(reader.consumer(), topic, &partitions, from_ms).map_err(bounds)?;
    let ends = end_offsets(reader.consumer(), topic, &partitions).map_err(bounds)?;
    // No record stamped after the lookback's start: nothing of the period.
    let ranges = ends.iter().map(|(p, end)| (*p, Range { from: starts.get(p).copied().flatten().unwrap_or(*end), end: Some(*end) })).collect();
    reader.assign(ranges)?;
    let mut read = 0u64;
    while !reader.is_done() {
        let Some(msg) = reader.next(Duration::from_millis(500))? else { continue };
        read += 1;
        let Some(payload) = msg.payload() else { continue };
        match serde_json::from_slice::<Charge>(payload) {
            Ok(c) => f(c),
            // Not a charge pulses wrote; a charge it cannot read would break the fold's
            // check against the ledger, which names the tenant.
            Err(e) => tracing::error!(partition = msg.partition(), offset = msg.offset(), "an undecodable charge record skipped: {e}"),
        }
    }
    Ok(read)
}
