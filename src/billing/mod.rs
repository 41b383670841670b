//! Issuing invoices (SPEC §9): the I/O around [`crate::invoice`]. `pulses invoice` and
//! `POST /v1/invoices` both call [`issue`]:
//!
//! 1. [`closing`]: is the period closed on the tenant's partitions (every window final,
//!    every final aggregate charged)? If not, the tenant's outcome is `period_open`.
//! 2. [`charges`]: the period's charges, folded per tenant and checked against the
//!    ledger's running totals.
//! 3. [`issuer`]: one fenced transaction per partition of `tenant.invoices` issues each
//!    invoice once, numbered gap-free.

pub mod charges;
pub mod closing;
pub mod fenced;
pub mod issuer;
pub mod rerating;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use rdkafka::error::KafkaError;
use rust_decimal::Decimal;
use serde::Serialize;

use crate::config::Config;
use crate::invoice::closing::is_closed;
use crate::invoice::Invoice;
use crate::kafka::admin::partition_count;
use crate::kafka::partitioner::partition_of;
use crate::kafka::reader::ReadError;
use crate::pulse::time::format_ms;
use crate::rate::period;

#[derive(Debug, thiserror::Error)]
pub enum BillingError {
    /// The request itself is wrong (a period that is no `YYYY-MM`, a bad tenant id).
    #[error("{0}")]
    BadRequest(String),
    #[error("kafka: {0}")]
    Kafka(#[from] KafkaError),
    #[error("reading: {0}")]
    Read(#[from] ReadError),
    #[error("{0}")]
    Corrupt(String),
    #[error(transparent)]
    Admin(#[from] crate::kafka::admin::AdminError),
    /// Refused by a decision made in log order (an overlapping re-rating job, a job
    /// not in the state asked for): a 409 with `code`, never retried.
    #[error("{detail}")]
    Conflict { code: &'static str, detail: String, job_id: Option<String> },
    #[error("{0}")]
    NotFound(String),
}

/// What to issue.
#[derive(Debug, Clone)]
pub struct Request {
    /// `YYYY-MM`.
    pub period: String,
    /// One tenant, or every tenant with charges in the period.
    pub tenant: Option<String>,
    /// Also issue adjustments for corrections after an invoice was issued.
    pub adjustments: bool,
}

/// What happened for one tenant.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum Outcome {
    /// This run issued it (an invoice, or with `adjustments` a credit or debit note).
    Issued(Box<Invoice>),
    /// The invoice was issued before (by another run, replica or process).
    /// `adjustment_pending`: the total of corrections since, not yet issued.
    AlreadyIssued { invoice_id: String, number: String, adjustment_pending: Option<Decimal> },
    /// The period is not closed for the tenant yet: what is still open.
    PeriodOpen { reason: String },
    /// The tenant has no charges in the period.
    NothingToBill,
    /// The charges cannot make an invoice (they disagree with the ledger, or mix
    /// currencies): nothing was issued.
    Failed { reason: String },
}

#[derive(Debug, Clone, Serialize)]
pub struct TenantOutcome {
    pub tenant_id: String,
    #[serde(flatten)]
    pub outcome: Outcome,
}

/// A run's outcomes and how long its steps took.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub period: String,
    pub outcomes: Vec<TenantOutcome>,
    pub charges_read: u64,
    pub closing_ms: u64,
    pub charges_ms: u64,
    pub issue_ms: u64,
    /// Per issued document: its transaction's start to commit (ms), p50/p99/max.
    pub latency_ms: [f64; 3],
}

impl Report {
    pub fn count(&self, what: fn(&Outcome) -> bool) -> usize {
        self.outcomes.iter().filter(|o| what(&o.outcome)).count()
    }
}

/// One issuer's outcomes and its documents' latencies.
type IssuerResult = Result<(Vec<TenantOutcome>, Vec<Duration>), BillingError>;

/// Partition counts of the topics billing reads.
struct Layout {
    grouped: i32,
    aggregated: i32,
    charges: i32,
    invoices: i32,
}

impl Layout {
    fn read(cfg: &Config) -> Result<Self, BillingError> {
        let count = |topic: &str| partition_count(cfg, topic);
        let t = &cfg.topics;
        Ok(Self { grouped: count(&t.grouped)?, aggregated: count(&t.aggregated)?, charges: count(&t.charges)?, invoices: count(&t.invoices)? })
    }
}

/// Issues what `req` asks for. Per-tenant problems are outcomes; an error is a failure
/// of the run itself (Kafka unreachable, a topic missing).
pub fn issue(cfg: &Config, req: &Request) -> Result<Report, BillingError> {
    let bounds = period::bounds(&req.period).map_err(BillingError::BadRequest)?;
    if let Some(t) = &req.tenant {
        check_tenant(t)?;
    }
    let layout = Layout::read(cfg)?;
    check_invoices_layout(cfg, layout.invoices)?;
    let only = |n: i32| -> Vec<i32> {
        match &req.tenant {
            Some(t) => vec![partition_of(t.as_bytes(), n)],
            None => (0..n).collect(),
        }
    };

    // 1. Closing: every window final, then every final aggregate charged.
    let started = Instant::now();
    let grace_ms = cfg.aggregate.grace.as_millis() as i64;
    let mut open: BTreeMap<(char, i32), String> = BTreeMap::new();
    for (g, watermark) in closing::stage2_watermarks(cfg, &only(layout.grouped))? {
        if !watermark.is_some_and(|w| is_closed(w, bounds.1, grace_ms)) {
            let at = watermark.map_or("none recorded yet".to_owned(), format_ms);
            open.insert(('g', g), format!(
                "windows still open: stage 2's watermark of {}[{g}] is {at}; {} closes at {} (period end + grace {} ms)",
                cfg.topics.grouped, req.period, format_ms(bounds.1 + grace_ms), grace_ms));
        }
    }
    for (a, rated) in closing::rated_through(cfg, &only(layout.aggregated))? {
        if let closing::Rated::Behind { at, end } = rated {
            let at = at.map_or("nothing committed".to_owned(), |o| format!("offset {o}"));
            open.insert(('a', a), format!("final aggregates not charged yet: pulses rate is at {at} of {end} on {}[{a}]", cfg.topics.aggregated));
        }
    }
    let closing_ms = started.elapsed().as_millis() as u64;
    // What is still open on `tenant`'s partitions.
    let still_open = |tenant: &str| -> Vec<String> {
        let t = tenant.as_bytes();
        [('g', partition_of(t, layout.grouped)), ('a', partition_of(t, layout.aggregated))].iter().filter_map(|k| open.get(k).cloned()).collect()
    };
    let report = |outcomes, charges_read, charges_ms, issue_ms, latencies| Report {
        period: req.period.clone(),
        outcomes,
        charges_read,
        closing_ms,
        charges_ms,
        issue_ms,
        latency_ms: percentiles(latencies),
    };
    if let Some(t) = req.tenant.as_deref().filter(|t| !still_open(t).is_empty()) {
        // One tenant whose period is open: its charges need not be read.
        let outcome = Outcome::PeriodOpen { reason: still_open(t).join("; ") };
        return Ok(report(vec![TenantOutcome { tenant_id: t.to_owned(), outcome }], 0, 0, 0, Vec::new()));
    }

    // 2. The period's charges.
    let started = Instant::now();
    let (mut folds, charges_read) = charges::read(cfg, &only(layout.charges), &req.period, bounds.0, req.tenant.as_deref())?;
    let charges_ms = started.elapsed().as_millis() as u64;
    if let Some(t) = &req.tenant {
        folds.entry(t.clone()).or_insert_with(|| Ok(crate::invoice::PeriodCharges::new(t, &req.period)));
    }

    // 3. Issue, per invoices partition.
    let started = Instant::now();
    let mut outcomes = Vec::new();
    let mut work: BTreeMap<i32, Vec<issuer::Work>> = BTreeMap::new();
    for (tenant, fold) in folds {
        let open_here = still_open(&tenant);
        let outcome = match fold {
            _ if !open_here.is_empty() => Some(Outcome::PeriodOpen { reason: open_here.join("; ") }),
            Err(e) => Some(Outcome::Failed { reason: e.to_string() }),
            Ok(f) if f.is_empty() => Some(Outcome::NothingToBill),
            Ok(charges) => {
                work.entry(partition_of(tenant.as_bytes(), layout.invoices)).or_default().push(issuer::Work { tenant_id: tenant.clone(), charges });
                None
            }
        };
        if let Some(outcome) = outcome {
            outcomes.push(TenantOutcome { tenant_id: tenant, outcome });
        }
    }
    // The issuers of different partitions share nothing: they work side by side.
    let issued: Vec<IssuerResult> = std::thread::scope(|s| {
        let handles: Vec<_> = work
            .iter()
            .map(|(partition, work)| {
                s.spawn(move || {
                    let mut latencies = Vec::new();
                    issuer::issue(cfg, *partition, &req.period, bounds, req.adjustments, work, &mut latencies).map(|o| (o, latencies))
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap_or_else(|_| Err(BillingError::Corrupt("an issuer thread panicked".into())))).collect()
    });
    let mut latencies = Vec::new();
    for result in issued {
        let (o, l) = result?;
        outcomes.extend(o);
        latencies.extend(l);
    }
    outcomes.sort_by(|a, b| a.tenant_id.cmp(&b.tenant_id));
    Ok(report(outcomes, charges_read, charges_ms, started.elapsed().as_millis() as u64, latencies))
}

/// A tenant id as a pulse's `tenant_id` must be (stage 1's own check).
pub fn check_tenant(t: &str) -> Result<(), BillingError> {
    crate::pulse::validate::identifier("tenant_id", Some(t)).map(drop).map_err(|r| BillingError::BadRequest(r.detail))
}

/// p50, p99 and max of `latencies`, in ms (nearest rank, as `pulses bench` reports).
fn percentiles(latencies: Vec<Duration>) -> [f64; 3] {
    let ms: Vec<f64> = latencies.iter().map(|d| d.as_secs_f64() * 1e3).collect();
    [0.5, 0.99, 1.0].map(|q| crate::bench::stats::percentile(&ms, q).unwrap_or(0.0))
}

/// Runs an admin call from synchronous code: on the runtime this thread is in (a
/// blocking task of `pulses serve`), else on a runtime of its own (the CLI, a job's
/// thread).
pub(super) fn admin_blocking<T>(call: impl std::future::Future<Output = Result<T, crate::kafka::admin::AdminError>>) -> Result<T, BillingError> {
    let result = match tokio::runtime::Handle::try_current() {
        Ok(rt) => rt.block_on(call),
        Err(_) => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| BillingError::Corrupt(format!("starting a runtime: {e}")))?
            .block_on(call),
    };
    Ok(result?)
}

/// Creates `tenant.invoices` (compacted) if missing, with as many partitions as the
/// charges topic, which `pulses rate` creates.
pub async fn ensure_invoices_topic(cfg: &Config) -> Result<(), crate::kafka::admin::AdminError> {
    use crate::kafka::admin::{ensure_topics, partition_count, TopicSpec, COMPACTED};
    let n = partition_count(cfg, &cfg.topics.charges)?;
    ensure_topics(cfg, &[TopicSpec { name: &cfg.topics.invoices, partitions: n, configs: COMPACTED }]).await
}

/// A tenant's documents live in the partition Kafka's partitioner gives it, so the
/// invoices topic's partition count must never change: with partitions added, a
/// tenant's issuer would be one that never saw its earlier invoices. The count is
/// recorded at the first run and every run compares it before issuing anything.
pub(super) fn check_invoices_layout(cfg: &Config, partitions: i32) -> Result<(), BillingError> {
    use crate::kafka::admin::{ensure_topics, TopicSpec, COMPACTED};
    let topic = cfg.invoices_layout_topic();
    // Created when first issuing, so a serve replica that never issues needs no ACL for it.
    admin_blocking(ensure_topics(cfg, &[TopicSpec { name: &topic, partitions: 1, configs: COMPACTED }]))?;
    let recorded = fenced::read_to_end(cfg, &topic, 0, "invoices layout")?
        .into_iter()
        .rev()
        .find_map(|(_, v)| serde_json::from_slice::<serde_json::Value>(&v).ok()?["partitions"].as_i64());
    match recorded {
        Some(n) if n == i64::from(partitions) => Ok(()),
        Some(n) => Err(BillingError::Corrupt(format!(
            "{} has {partitions} partitions, but its invoices were issued with {n}: partitions were added, so tenants \
             moved between issuers that never saw their earlier invoices; nothing is issued (restore {n} partitions)",
            cfg.topics.invoices
        ))),
        None => {
            let producer = crate::kafka::clients::tracked_producer(cfg, crate::kafka::clients::DeliveryTracker::default())?;
            let value = serde_json::json!({ "partitions": partitions }).to_string().into_bytes();
            fenced::send_one(&producer, &topic, "layout", &value)
        }
    }
}
