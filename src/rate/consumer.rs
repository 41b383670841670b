//! `pulses rate`: the consumer around the [`Ledger`].
//!
//! A consumer group (`<group_id>.rate`, `read_committed`) on the aggregated topic takes
//! the final records of one window size. Each batch's charges and alerts and its
//! consumed offsets commit in one Kafka transaction (the [`StageOutputs`] of the
//! processor, transactional id `<application_id>-rate-<process id>`); only then are the
//! ledger's writes and the new positions written to RocksDB, in one atomic batch.
//!
//! A crash between the commit and the RocksDB write leaves the state behind the
//! committed offsets. At start the consumer compares both and re-applies the records in
//! between to the ledger (their charges were already committed, so nothing is
//! produced): the state always reflects exactly the committed input.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::BaseRecord;
use rdkafka::{Message, Offset, TopicPartitionList};

use super::ledger::{Ledger, LedgerError, Rated};
use super::price_book::PriceBook;
use super::store::{RateStore, RateStoreError};
use crate::codec::{AggregateInput, InputError};
use crate::config::Config;
use crate::kafka::batch::poll_batch;
use crate::kafka::clients;
use crate::kafka::startup::{self, Retriable};
use crate::kafka::reader::{PartitionsToEnd, Range, ReadError};
use crate::kafka::txn::{StageOutputs, TxnError};
use crate::pulse::time::now_ms;
use crate::registry::{Registry, RegistryError, Wait};
use crate::state::instance::{self, InstanceError};

#[derive(Debug, thiserror::Error)]
pub enum RateError {
    #[error("kafka: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    #[error(transparent)]
    Read(#[from] ReadError),
    #[error(transparent)]
    Output(#[from] TxnError),
    #[error(transparent)]
    Store(#[from] RateStoreError),
    #[error(transparent)]
    Ledger(#[from] LedgerError),
    #[error("cannot create the state dir {0}")]
    StateDir(String),
    #[error("catching the state up with the committed offsets: {0}")]
    CatchUp(String),
    /// The schema registry did not answer for an Avro aggregate: stopped uncommitted,
    /// so the aggregate is rated after a restart rather than skipped.
    #[error(transparent)]
    Registry(#[from] RegistryError),
    #[error(transparent)]
    Instance(#[from] InstanceError),
}

impl Retriable for RateError {
    fn is_retriable(&self) -> bool {
        match self {
            Self::Kafka(e) | Self::Read(ReadError::Kafka(e)) => e.is_retriable(),
            Self::Output(e) => e.is_retriable(),
            _ => false,
        }
    }
}

/// What `pulses rate` reads, prices and writes.
#[derive(Debug, Clone)]
pub struct RateSettings {
    pub book: PriceBook,
    /// The window size whose final records are rated (e.g. `minute`).
    pub window: String,
    pub charges_topic: String,
    pub alerts_topic: String,
}

/// Counters of one run, printed at exit.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct RateSummary {
    pub read: u64,
    pub charges: u64,
    pub alerts: u64,
    /// Not final, or of another window size.
    pub ignored: u64,
    pub already_charged: u64,
    pub unpriced: u64,
    /// Priced beyond what an exact decimal holds (logged as errors).
    pub unrateable: u64,
    pub undecodable: u64,
    pub caught_up: u64,
}

/// How long librdkafka calls outside the batch loop may take.
const TIMEOUT: Duration = Duration::from_secs(30);

/// Rates until `shutdown` is set, then commits and leaves the group.
pub fn run(cfg: &Config, settings: &RateSettings, shutdown: &AtomicBool) -> Result<RateSummary, RateError> {
    let topic = cfg.topics.aggregated.clone();
    let group = rate_group_id(cfg);
    let state_path = cfg.state_dir.join("rate");
    std::fs::create_dir_all(&cfg.state_dir).map_err(|e| RateError::StateDir(format!("{}: {e}", cfg.state_dir.display())))?;
    let mut store = RateStore::open(&state_path)?;
    let (transactional_id, _claim) = instance::transactional_id(cfg, "rate")?;
    let no_probe = |_| {};
    let outputs = startup::retry("initialising the transactional producer", cfg.startup_timeout, &no_probe, || {
        StageOutputs::new(cfg, "rate", &transactional_id, None)
    })?;
    // Aggregates are JSON or Avro (output_format), told apart per record.
    let input = AggregateInput::aggregates(Registry::from_config(&cfg.schema_registry)?.map(Arc::new));
    let stop = || shutdown.load(Ordering::Acquire);
    let wait = Wait::until(&stop);
    let consumer: BaseConsumer = clients::group_consumer(cfg, &group).create()?;
    let caught_up = startup::retry("catching up with the committed offsets", cfg.startup_timeout, &no_probe, || {
        catch_up(cfg, settings, &input, wait, &consumer, &mut store)
    })?;
    let mut summary = RateSummary { caught_up, ..Default::default() };
    consumer.subscribe(&[topic.as_str()])?;
    tracing::info!(input = %topic, group = %group, window = %settings.window, charges = %settings.charges_topic,
        alerts = %settings.alerts_topic, currency = %settings.book.currency, state = %state_path.display(),
        caught_up = summary.caught_up, "rating consumer started");

    // Input partition → the next offset to commit, for the partitions read since the
    // last commit.
    let mut offsets: BTreeMap<i32, i64> = BTreeMap::new();
    let (mut last_log, mut logged_read) = (Instant::now(), 0);
    while !shutdown.load(Ordering::Acquire) {
        let mut ledger = Ledger::default();
        let polled = poll_batch(&consumer, 1_000, Duration::from_millis(100), |msg| {
            let out = rate_one(settings, &input, wait, &mut ledger, &mut store, msg.payload().unwrap_or(&[]), &mut summary)?;
            for (topic, key, value) in out {
                outputs.send(BaseRecord::to(topic).key(&key).payload(&value))?;
            }
            offsets.insert(msg.partition(), msg.offset() + 1);
            Ok::<_, RateError>(())
        });
        match polled {
            // Shutdown while waiting for the registry: the batch stays uncommitted.
            Err(RateError::Registry(RegistryError::Interrupted)) => break,
            Err(e) => return Err(e),
            Ok(_) => {}
        }
        let writes = ledger.take_writes();
        if !offsets.is_empty() {
            let durable = outputs.commit(&consumer, &topic, offsets.clone(), true)?;
            store.write(&writes, &offsets)?;
            outputs.confirm(&consumer, &topic, durable)?;
            offsets.clear();
        }
        if last_log.elapsed() >= Duration::from_secs(10) && summary.read != logged_read {
            tracing::info!(?summary, "rating progress");
            (last_log, logged_read) = (Instant::now(), summary.read);
        }
    }
    consumer.unsubscribe();
    tracing::info!(?summary, "rating consumer stopped");
    Ok(summary)
}

/// The consumer group of `pulses rate`: `<group_id>.rate`.
pub fn rate_group_id(cfg: &Config) -> String {
    format!("{}.rate", cfg.group_id.as_deref().unwrap_or(&cfg.application_id))
}

/// (topic, key, value) records to produce.
type Produce<'a> = Vec<(&'a str, String, Vec<u8>)>;

/// Rates one aggregate record; what to produce for it.
#[allow(clippy::too_many_arguments)]
fn rate_one<'a>(
    settings: &'a RateSettings,
    input: &AggregateInput,
    wait: Wait<'_>,
    ledger: &mut Ledger,
    store: &mut RateStore,
    payload: &[u8],
    summary: &mut RateSummary,
) -> Result<Produce<'a>, RateError> {
    summary.read += 1;
    let agg = match input.decode(payload, wait) {
        Ok(a) => a,
        Err(InputError::Registry(e)) => return Err(e.into()),
        Err(InputError::Invalid(e)) => {
            // Not an aggregate: nothing to bill. Logged loudly and counted, not hidden.
            tracing::error!("undecodable aggregate record skipped: {e}");
            summary.undecodable += 1;
            return Ok(Vec::new());
        }
    };
    if !agg.is_final || agg.window != settings.window {
        summary.ignored += 1;
        return Ok(Vec::new());
    }
    let mut out = Vec::new();
    let rated = match ledger.rate(store, &settings.book, &agg, now_ms()) {
        Err(LedgerError::Overflow(e)) => {
            // A quantity × price beyond exact decimals: never rounded, never retried
            // forever; logged and counted for a person to look at.
            tracing::error!(aggregate_id = %agg.aggregate_id, revision = agg.revision, "not charged: {e}");
            summary.unrateable += 1;
            return Ok(Vec::new());
        }
        other => other?,
    };
    match rated {
        Rated::Charged { charge, alerts } => {
            summary.charges += 1;
            summary.alerts += alerts.len() as u64;
            out.push((settings.charges_topic.as_str(), charge.tenant_id.clone(), charge.to_json().map_err(LedgerError::Encode)?));
            for a in alerts {
                tracing::info!(tenant = %a.tenant_id, period = %a.period, threshold = %a.threshold, balance = %a.balance,
                    "spend threshold reached");
                out.push((settings.alerts_topic.as_str(), a.tenant_id.clone(), a.to_json().map_err(LedgerError::Encode)?));
            }
        }
        Rated::AlreadyCharged { charged_revision } => {
            tracing::debug!(aggregate_id = %agg.aggregate_id, revision = agg.revision, charged_revision, "already charged");
            summary.already_charged += 1;
        }
        Rated::Unpriced => {
            tracing::warn!(aggregate_id = %agg.aggregate_id, sku = %agg.product_sku, unit = %agg.use_unit,
                "no price in the price book: aggregate not charged");
            summary.unpriced += 1;
        }
    }
    Ok(out)
}

/// Re-applies the records between the state's positions and the group's committed
/// offsets (a crash after a commit, before the state write; or a lost state dir), so
/// the ledger reflects exactly the committed input. Returns how many were re-applied.
fn catch_up(
    cfg: &Config,
    settings: &RateSettings,
    input: &AggregateInput,
    wait: Wait<'_>,
    group: &BaseConsumer,
    store: &mut RateStore,
) -> Result<u64, RateError> {
    let topic = &cfg.topics.aggregated;
    let md = group.fetch_metadata(Some(topic), TIMEOUT)?;
    let partitions: Vec<i32> = md.topics().first().map(|t| t.partitions().iter().map(|p| p.id()).collect()).unwrap_or_default();
    let mut tpl = TopicPartitionList::new();
    for p in &partitions {
        tpl.add_partition(topic, *p);
    }
    let committed = group.committed_offsets(tpl, TIMEOUT)?;
    let mut ranges = BTreeMap::new();
    for e in committed.elements() {
        let Offset::Offset(end) = e.offset() else { continue };
        let from = store.position(e.partition())?.unwrap_or(0);
        if from < end {
            ranges.insert(e.partition(), (from, end));
        }
    }
    if ranges.is_empty() {
        return Ok(0);
    }
    tracing::warn!(?ranges, "state is behind the committed offsets; re-applying those records");
    let group_id = format!("{}.catch-up", rate_group_id(cfg));
    let reads = ranges.iter().map(|(p, (from, end))| (*p, Range { from: *from, end: Some(*end) })).collect();
    let mut reader = PartitionsToEnd::open(cfg, &group_id, "rating catch-up", topic, reads, None)?;
    let mut ledger = Ledger::default();
    let mut summary = RateSummary::default();
    let started = Instant::now();
    while !reader.is_done() {
        if started.elapsed() > Duration::from_secs(600) {
            let at: BTreeMap<i32, Option<i64>> = ranges.keys().map(|p| (*p, reader.position(*p))).collect();
            return Err(RateError::CatchUp(format!("not done after 10 minutes: at {at:?} of {ranges:?}")));
        }
        if let Some(m) = reader.next(Duration::from_millis(500))? {
            rate_one(settings, input, wait, &mut ledger, store, m.payload().unwrap_or(&[]), &mut summary)?;
        }
    }
    // Every record before each committed offset is applied (a committed offset may
    // point past a transaction marker): the state is at the committed offsets.
    let positions: BTreeMap<i32, i64> = ranges.iter().map(|(p, (_, end))| (*p, *end)).collect();
    store.write(&ledger.take_writes(), &positions)?;
    Ok(summary.read)
}
