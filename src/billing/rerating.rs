//! Re-rating jobs (SPEC §9), the I/O around [`crate::rerating`]:
//!
//! - **Deciding** ([`submit`]): the jobs' log is one partition,
//!   `<application_id>.rerating-jobs` (compacted, key `job_id`, each record the whole
//!   job). Its one decider is the holder of the transactional id
//!   `<application_id>-rerating-jobs` ([`super::fenced`]): it reads the log to its end
//!   and accepts a job only if no queued or running job overlaps its scope, in one
//!   transaction, so two replicas (or a replica and the CLI) never both accept
//!   overlapping jobs; the second gets `rerating_in_progress` naming the first. A
//!   running job that stopped writing its heartbeat for [`ABANDONED_AFTER`] (its
//!   process died) no longer holds its scope, and the decider marks it failed.
//! - **Running** ([`run`]): the replay of the scope (the live code, [`crate::replay`])
//!   into the job's own aggregates topic, those final aggregates of the job's window
//!   rated with the job's price book by a fresh ledger into the job's own charges
//!   topic, then the diff against the live charges of the same scope. Never the live
//!   topics. Progress and heartbeat go to the log every few seconds.
//! - **Applying** ([`apply`]): an explicit step; per tenant and period with a
//!   difference, a credit or debit note referencing the invoice, issued once by the
//!   invoices partition's issuer. Periods not invoiced yet are listed, not billed.

use std::collections::BTreeMap;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::consumer::Consumer;
use rdkafka::producer::BaseRecord;
use rdkafka::Message;

use super::issuer::{issue_notes, Note, NoteOutcome};
use super::{admin_blocking, charges, closing::reader_config, fenced, BillingError};
use crate::codec::AggregateInput;
use crate::config::Config;
use crate::invoice::records::Billed;
use crate::invoice::Line;
use crate::kafka::admin::{ensure_topics, partition_count, partition_ids, TopicSpec, COMPACTED};
use crate::kafka::clients::{self, DeliveryTracker, TrackedProducer};
use crate::kafka::partitioner::partition_of;
use crate::kafka::reader::{PartitionsToEnd, Range};
use crate::pulse::time::{format_ms, now_ms};
use crate::rate::{Ledger, PriceBook, Rated};
use crate::registry::{Registry, Wait};
use crate::replay::{self, ReplaySettings};
use crate::rerating::{diff, Job, Progress, Scope, Status};

/// A running job whose heartbeat is older than this was abandoned.
pub const ABANDONED_AFTER: Duration = Duration::from_secs(120);
/// How often a running job writes its progress (its heartbeat).
const HEARTBEAT: Duration = Duration::from_secs(5);

/// What to re-rate, as asked.
#[derive(Debug, Clone)]
pub struct JobRequest {
    pub scope: Scope,
    pub window: String,
    pub price_book_source: String,
    /// The price book's text, already checked to parse.
    pub price_book: String,
}

/// Why a job request is refused before any job exists.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    /// A time, scope, tenant or window that is not right.
    #[error("{0}")]
    Invalid(String),
    /// The price book cannot be read or does not parse.
    #[error("{0}")]
    PriceBook(String),
}

impl JobRequest {
    /// The job asked for, checked against `cfg`: whole periods, a configured window
    /// [default: minute, as `pulses rate`], a price book that parses (a file, or a name:
    /// `topology/<name>.toml`).
    pub fn parse(
        cfg: &Config,
        from: &str,
        to: &str,
        tenant_id: Option<String>,
        price_book: Option<&str>,
        window: Option<String>,
    ) -> Result<JobRequest, RequestError> {
        use RequestError::{Invalid, PriceBook as Book};
        let time = |name: &str, v: &str| crate::pulse::time::parse_rfc3339_ms(v).ok_or_else(|| Invalid(format!("{name}={v:?} is not an RFC 3339 time")));
        if let Some(t) = &tenant_id {
            super::check_tenant(t).map_err(|e| Invalid(e.to_string()))?;
        }
        let scope = Scope::new(time("from", from)?, time("to", to)?, tenant_id).map_err(Invalid)?;
        let window = window.unwrap_or_else(|| "minute".into());
        if !cfg.windows.iter().any(|w| w.name == window) {
            return Err(Invalid(format!("window {window:?} is not configured")));
        }
        let source = match price_book {
            None => "topology/price-book.toml".to_owned(),
            Some(p) if p.contains('/') || p.ends_with(".toml") => p.to_owned(),
            Some(name) => format!("topology/{name}.toml"),
        };
        let text = std::fs::read_to_string(&source).map_err(|e| Book(format!("price book {source}: {e}")))?;
        PriceBook::from_toml(&text).map_err(|e| Book(format!("price book {source} does not parse: {e}")))?;
        Ok(JobRequest { scope, window, price_book_source: source, price_book: text })
    }
}

/// Every job in the log, latest state of each. The log is created when jobs are first
/// used, so a serve replica that never re-rates needs no ACL for it.
fn jobs(cfg: &Config) -> Result<BTreeMap<String, Job>, BillingError> {
    admin_blocking(ensure_topics(cfg, &[TopicSpec { name: &cfg.rerating_jobs_topic(), partitions: 1, configs: COMPACTED }]))?;
    let mut out = BTreeMap::new();
    for (_, value) in fenced::read_to_end(cfg, &cfg.rerating_jobs_topic(), 0, "rerating jobs")? {
        match serde_json::from_slice::<Job>(&value) {
            Ok(job) => {
                out.insert(job.job_id.clone(), job);
            }
            Err(e) => tracing::error!("{}: a record that is no job skipped: {e}", cfg.rerating_jobs_topic()),
        }
    }
    Ok(out)
}

/// The job `job_id`, as the log has it now.
pub fn get(cfg: &Config, job_id: &str) -> Result<Option<Job>, BillingError> {
    Ok(jobs(cfg)?.remove(job_id))
}

fn encode(job: &Job) -> Result<(String, Vec<u8>), BillingError> {
    serde_json::to_vec(job).map(|v| (job.job_id.clone(), v)).map_err(|e| BillingError::Corrupt(format!("encoding a job: {e}")))
}

fn decider_id(cfg: &Config) -> String {
    format!("{}-rerating-jobs", cfg.application_id)
}

/// Accepts `req` as a queued job, unless a queued or running job overlaps its scope
/// (`BillingError::Conflict` naming it).
pub fn submit(cfg: &Config, req: &JobRequest) -> Result<Job, BillingError> {
    let topic = cfg.rerating_jobs_topic();
    fenced::retrying("deciding on a re-rating job", || {
        let producer = fenced::take(cfg, &decider_id(cfg))?;
        let now = now_ms();
        let mut writes = Vec::new();
        for job in jobs(cfg)?.into_values() {
            if job.is_active(now, ABANDONED_AFTER.as_millis() as i64) {
                if job.scope.overlaps(&req.scope) {
                    return Err(BillingError::Conflict {
                        code: "rerating_in_progress",
                        detail: format!("re-rating job {} ({}) overlaps this scope", job.job_id, describe(&job.scope)),
                        job_id: Some(job.job_id),
                    });
                }
            } else if job.status.holds_scope() {
                let reason = format!("abandoned: no heartbeat since {}", format_ms(job.updated_at));
                writes.push(encode(&Job { status: Status::Failed, reason: Some(reason), updated_at: now, ..job })?);
            }
        }
        let job_id = uuid::Uuid::new_v4().to_string();
        let job = Job {
            aggregates_topic: format!("{}.rerating.{job_id}.aggregated", cfg.application_id),
            charges_topic: format!("{}.rerating.{job_id}.charges", cfg.application_id),
            job_id,
            scope: req.scope.clone(),
            window: req.window.clone(),
            price_book_source: req.price_book_source.clone(),
            price_book: req.price_book.clone(),
            status: Status::Queued,
            reason: None,
            progress: Progress::default(),
            created_at: now,
            updated_at: now,
            diff: None,
            difference: None,
            notes: Vec::new(),
            not_invoiced: Vec::new(),
        };
        writes.push(encode(&job)?);
        fenced::commit(&producer, &topic, 0, &writes)?;
        Ok(job)
    })
}

fn describe(s: &Scope) -> String {
    format!("{} to {}, {}", format_ms(s.from), format_ms(s.to), s.tenant_id.as_deref().unwrap_or("every tenant"))
}

/// Writes a job's state to the log (progress, heartbeat, outcome): plain idempotent
/// writes of the job's own runner, read in log order.
struct StatusWriter {
    producer: TrackedProducer,
    topic: String,
    last: Instant,
}

impl StatusWriter {
    fn new(cfg: &Config) -> Result<Self, BillingError> {
        Ok(Self { producer: clients::tracked_producer(cfg, DeliveryTracker::default())?, topic: cfg.rerating_jobs_topic(), last: Instant::now() })
    }

    fn write(&mut self, job: &mut Job) -> Result<(), BillingError> {
        job.updated_at = now_ms();
        let (key, value) = encode(job)?;
        fenced::send_one(&self.producer, &self.topic, &key, &value)?;
        self.last = Instant::now();
        Ok(())
    }

    /// Writes progress when a heartbeat is due.
    fn beat(&mut self, job: &mut Job) {
        if self.last.elapsed() >= HEARTBEAT {
            if let Err(e) = self.write(job) {
                tracing::warn!(job = %job.job_id, "writing the job's progress: {e}");
            }
        }
    }
}

/// Runs an accepted job to its end (done or failed), writing its state as it goes;
/// returns the final state.
pub fn run(cfg: &Config, mut job: Job, shutdown: &AtomicBool) -> Result<Job, BillingError> {
    let mut status = StatusWriter::new(cfg)?;
    job.status = Status::Running;
    status.write(&mut job)?;
    match run_steps(cfg, &mut job, &mut status, shutdown) {
        Ok(()) => job.status = Status::Done,
        Err(e) => {
            tracing::error!(job = %job.job_id, "re-rating job failed: {e}");
            job.status = Status::Failed;
            job.reason = Some(e.to_string());
        }
    }
    status.write(&mut job)?;
    Ok(job)
}

fn run_steps(cfg: &Config, job: &mut Job, status: &mut StatusWriter, shutdown: &AtomicBool) -> Result<(), BillingError> {
    let book = PriceBook::from_toml(&job.price_book).map_err(|e| BillingError::BadRequest(format!("the price book: {e}")))?;
    let mut replay_cfg = cfg.clone();
    replay_cfg.windows.retain(|w| w.name == job.window);
    if replay_cfg.windows.is_empty() {
        return Err(BillingError::BadRequest(format!("window {:?} is not configured", job.window)));
    }
    let partitions = partition_count(cfg, &cfg.topics.aggregated)?;
    let own = [
        TopicSpec { name: &job.aggregates_topic, partitions, configs: &[] },
        TopicSpec { name: &job.charges_topic, partitions, configs: &[] },
    ];
    admin_blocking(ensure_topics(cfg, &own))?;

    // 1. The scope's aggregates, recomputed by the live code into the job's topic.
    job.progress.step = "replaying".into();
    replay_cfg.topics.replay = job.aggregates_topic.clone();
    let settings = ReplaySettings {
        from_ms: job.scope.from,
        to_ms: Some(job.scope.to),
        output_topic: job.aggregates_topic.clone(),
        progress_every: HEARTBEAT,
    };
    let replayed = replay::run(&replay_cfg, &settings, shutdown, |read, total, _| {
        job.progress.records_read = read;
        job.progress.records_total = total;
        status.beat(job);
    })
    .map_err(|e| BillingError::Corrupt(format!("replaying: {e}")))?;
    tracing::info!(job = %job.job_id, read = replayed.read, aggregates = replayed.written, "re-rating job: replayed");

    // 2. Its final aggregates of the job's window, rated by a fresh ledger.
    job.progress.step = "rating".into();
    let rerated = rate(cfg, job, &book, status)?;
    job.progress.charges = rerated.len() as u64;

    // 3. Against what the live charges billed for the same scope.
    job.progress.step = "comparing".into();
    status.beat(job);
    let mut billed = Vec::new();
    let scope = job.scope.clone();
    let window = job.window.clone();
    let only = match &scope.tenant_id {
        Some(t) => vec![partition_of(t.as_bytes(), partition_count(cfg, &cfg.topics.charges)?)],
        None => Vec::new(),
    };
    charges::for_each(cfg, &only, scope.from, |c| {
        if c.window == window && scope.contains(&c.tenant_id, c.window_start) {
            billed.push(c);
        }
    })?;
    let lines = diff(&billed, &rerated).map_err(BillingError::Corrupt)?;
    job.difference = Some(lines.iter().map(|l| l.difference).sum());
    job.diff = Some(lines);
    Ok(())
}

/// Rates the job's replayed final aggregates with `book`, writes the charges to the
/// job's charges topic and returns them.
fn rate(cfg: &Config, job: &mut Job, book: &PriceBook, status: &mut StatusWriter) -> Result<Vec<crate::rate::records::Charge>, BillingError> {
    let registry = Registry::from_config(&cfg.schema_registry).map_err(|e| BillingError::Corrupt(e.to_string()))?.map(Arc::new);
    let input = AggregateInput::aggregates(registry);
    let mut reader = PartitionsToEnd::open(&reader_config(cfg), "rerating", &job.aggregates_topic, BTreeMap::new(), Some(Duration::from_secs(60)))?;
    let mut ranges = BTreeMap::new();
    for p in partition_ids(cfg, &job.aggregates_topic)? {
        let (low, high) = reader.consumer().fetch_watermarks(&job.aggregates_topic, p, Duration::from_secs(10))?;
        ranges.insert(p, Range { from: low, end: Some(high) });
    }
    reader.assign(ranges)?;
    let producer = clients::tracked_producer(cfg, DeliveryTracker::default())?;
    let mut ledger_state: BTreeMap<String, String> = BTreeMap::new();
    let mut out = Vec::new();
    let never = || false;
    while !reader.is_done() {
        let Some(msg) = reader.next(Duration::from_millis(500))? else { continue };
        job.progress.records_read += 1;
        let agg = match input.decode(msg.payload().unwrap_or_default(), Wait::until(&never)) {
            Ok(a) => a,
            Err(e) => return Err(BillingError::Corrupt(format!("a replayed aggregate: {e}"))),
        };
        if !agg.is_final || agg.window != job.window || !job.scope.contains(&agg.tenant_id, agg.window_start) {
            continue;
        }
        let mut ledger = Ledger::default();
        let rated = ledger.rate(&mut ledger_state, book, &agg, now_ms()).map_err(|e| BillingError::Corrupt(e.to_string()))?;
        ledger_state.extend(ledger.take_writes());
        if let Rated::Charged { charge, .. } = rated {
            let value = charge.to_json().map_err(|e| BillingError::Corrupt(e.to_string()))?;
            clients::send_with_backpressure(&producer, BaseRecord::to(&job.charges_topic).key(&charge.tenant_id).payload(&value))?;
            out.push(charge);
        }
        status.beat(job);
    }
    clients::flush(&producer, Duration::from_secs(60))?;
    Ok(out)
}

/// Applies a done job's diff: a note per tenant and period with a difference, on top of
/// its invoice. Refused (`Conflict`) unless the job is done.
pub fn apply(cfg: &Config, job_id: &str) -> Result<Job, BillingError> {
    let mut job = get(cfg, job_id)?.ok_or_else(|| BillingError::NotFound(format!("no re-rating job {job_id:?}")))?;
    let refuse = |code, detail: String| Err(BillingError::Conflict { code, detail, job_id: Some(job_id.to_owned()) });
    match job.status {
        Status::Done => {}
        Status::Applied => return refuse("already_applied", format!("job {job_id} was applied: notes {}", job.notes.join(", "))),
        other => return refuse("job_not_done", format!("job {job_id} is {other:?}, not done: only a done job's diff can be applied")),
    }
    let invoices = partition_count(cfg, &cfg.topics.invoices)?;
    super::check_invoices_layout(cfg, invoices)?;
    let mut notes: BTreeMap<i32, Vec<Note>> = BTreeMap::new();
    let mut by_period: BTreeMap<(String, String), Note> = BTreeMap::new();
    for l in job.diff.iter().flatten().filter(|l| !l.difference.is_zero() || l.billed_quantity != l.rerated_quantity) {
        let note = by_period.entry((l.tenant_id.clone(), l.period.clone())).or_insert_with(|| Note {
            tenant_id: l.tenant_id.clone(),
            period: l.period.clone(),
            job_id: job_id.to_owned(),
            currency: l.currency.clone(),
            lines: Vec::new(),
        });
        note.lines.push(Line {
            product_sku: l.product_sku.clone(),
            use_unit: l.use_unit.clone(),
            quantity: l.rerated_quantity - l.billed_quantity,
            tiers: Vec::new(),
            amount: l.difference,
            billed_before: Some(Billed { quantity: l.billed_quantity, amount: l.billed_amount }),
        });
    }
    for ((tenant, _), note) in by_period {
        notes.entry(partition_of(tenant.as_bytes(), invoices)).or_default().push(note);
    }
    for (partition, notes) in &notes {
        for (note, outcome) in notes.iter().zip(issue_notes(cfg, *partition, notes)?) {
            match outcome {
                NoteOutcome::Issued(id) | NoteOutcome::IssuedBefore(id) => job.notes.push(id),
                NoteOutcome::NotInvoiced => job.not_invoiced.push(format!("{}|{}", note.tenant_id, note.period)),
            }
        }
    }
    job.status = Status::Applied;
    StatusWriter::new(cfg)?.write(&mut job)?;
    Ok(job)
}
