//! `pulses rate` (SPEC §5), a stage on the shared runtime: final window aggregates in,
//! money out.
//!
//! A consumer group (`<group_id>.rate`, `read_committed`) on the aggregated topic; each
//! assigned partition is a task whose ledger ([`Ledger`]) lives in its own RocksDB store
//! with a changelog (`<application_id>-rate-ledger-changelog`), restored when the
//! partition moves ([`TaskState`]). The aggregated topic is keyed by tenant, so all of a
//! tenant's balances live in one partition's ledger, and any number of replicas can
//! share the group. Charges, alerts, ledger changes and consumed offsets commit in the
//! thread's one transaction; only then is the local store written.
//!
//! A partition whose changelog holds nothing while the group committed offsets for it
//! (an upgrade from the single local ledger of earlier versions, or a deleted
//! changelog) has its ledger rebuilt first: the aggregated records before the committed
//! offset are re-applied without producing anything (their charges were committed), and
//! the rebuilt ledger goes to the changelog with the next commit.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::producer::BaseRecord;
use rdkafka::Message;

use super::topology::RateWiring;
use crate::codec::{AggregateInput, InputError};
use crate::config::Config;
use crate::kafka::clients;
use crate::kafka::reader::{PartitionsToEnd, Range};
use crate::runtime::record_collector::RecordCollector;
use crate::ops::metrics::Metrics;
use crate::pulse::time::now_ms;
use crate::rate::ledger::{Kv, LedgerError};
use crate::rate::{Ledger, PriceBook, Rated};
use crate::registry::{Registry, Wait};
use crate::runtime::commit::CommitSettings;
use crate::runtime::state_manager::{StateSpec, TaskState};
use crate::runtime::stream_thread::{self as runtime, LoopSettings, RecordReader, Stage, StageConsumer};
use crate::runtime::task::{Committed, Phase, Task, Tasks};
use crate::runtime::StageError;
use crate::state::{instance, PartitionStore, StoreError};
use crate::window::WindowAggregate;

/// What `pulses rate` reads and prices.
#[derive(Debug, Clone)]
pub struct RateSettings {
    pub book: PriceBook,
    /// The window size whose final records are rated (e.g. `minute`).
    pub window: String,
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
    /// Ledger changes restored from the changelog.
    pub restored: u64,
    /// Aggregated records re-applied to rebuild a ledger without a changelog.
    pub rebuilt: u64,
}

/// The ledger store's memory budget: the ledger holds a few keys per tenant, sku and
/// aggregate of the partition.
const LEDGER_MEMORY: usize = 64 << 20;
/// Records per batch, and how long a batch may wait for them.
const MAX_BATCH: (usize, Duration) = (1_000, Duration::from_millis(100));
/// The ledger entry recording that a rebuild re-applied the aggregated records before
/// the offset it holds (so the changelog is never empty after one).
const REBUILT_KEY: &str = "r|rebuilt-to";

/// Rates until `shutdown` is set, then commits and leaves the group. Counts into
/// `summary` (kept across replacements of a failed stage).
pub fn run(cfg: &Config, settings: &RateSettings, shutdown: &AtomicBool, metrics: Arc<Metrics>, summary: &mut RateSummary)
    -> Result<(), StageError> {
    let wiring = RateWiring::of(cfg);
    let registry = Registry::from_config(&cfg.schema_registry)?.map(Arc::new);
    let state = StateSpec::new(cfg, &wiring.changelog, &wiring.input, &wiring.state_dir, &wiring.checkpoint_dir, LEDGER_MEMORY);
    let (transactional_id, _claim) = instance::transactional_id(cfg, wiring.name)?;
    let outputs = RecordCollector::new(cfg, wiring.name, &transactional_id, Some(state.tracked()))?
        .with_metrics(Arc::clone(&metrics));
    // Aggregates are JSON or Avro (output_format), told apart per record.
    let reader = AggregateReader { input: AggregateInput::aggregates(registry.clone()) };
    tracing::info!(input = %wiring.input, group = %wiring.consumer_group, window = %settings.window,
        charges = %wiring.charges, alerts = %wiring.alerts, changelog = %wiring.changelog,
        currency = %settings.book.currency, state = %wiring.state_dir.display(), "rating consumer started");
    let loop_settings = LoopSettings {
        input: &wiring.input,
        consumer_group: &wiring.consumer_group,
        max_batch: MAX_BATCH,
        commit: CommitSettings::of(cfg),
    };
    let stage = Rating {
        settings: settings.clone(),
        state,
        rebuild_client: clients::reader(cfg, &format!("{}.rebuild", wiring.consumer_group)),
        summary,
        shutdown,
        rebuild_input: AggregateInput::aggregates(registry),
        last_log: (Instant::now(), 0),
        wiring: wiring.clone(),
    };
    runtime::run(cfg, loop_settings, shutdown, metrics, outputs, reader, stage)
}

/// An aggregated-topic record as the rating stage sees it.
enum AggregateRecord {
    Aggregate(Box<WindowAggregate>),
    /// Not an aggregate: nothing to bill. Logged loudly and counted, not hidden.
    Undecodable,
}

struct AggregateReader {
    input: AggregateInput,
}

impl RecordReader for AggregateReader {
    type Record = AggregateRecord;

    fn read<M: Message>(&self, msg: &M, wait: Wait<'_>) -> Result<AggregateRecord, StageError> {
        decode(&self.input, msg, wait)
    }
}

fn decode<M: Message>(input: &AggregateInput, msg: &M, wait: Wait<'_>) -> Result<AggregateRecord, StageError> {
    match input.decode(msg.payload().unwrap_or(&[]), wait) {
        Ok(agg) => Ok(AggregateRecord::Aggregate(Box::new(agg))),
        // Skipping a valid aggregate would lose money: stop uncommitted, rated after a restart.
        Err(InputError::Registry(e)) => Err(e.into()),
        Err(InputError::Invalid(e)) => {
            tracing::error!(partition = msg.partition(), offset = msg.offset(), "undecodable aggregate record skipped: {e}");
            Ok(AggregateRecord::Undecodable)
        }
    }
}

/// One assigned partition: its ledger store, and its rebuild while one runs.
struct LedgerTask {
    state: TaskState,
    rebuild: Option<PartitionsToEnd>,
}

/// The ledger's view of a task's store.
struct LedgerStore<'a>(&'a mut PartitionStore);

impl Kv for LedgerStore<'_> {
    type Error = StoreError;
    fn get(&mut self, key: &str) -> Result<Option<String>, StoreError> {
        Ok(self.0.entry(key.as_bytes())?.map(|v| String::from_utf8_lossy(&v).into_owned()))
    }
}

/// The rating stage's part of the loop.
struct Rating<'a> {
    settings: RateSettings,
    wiring: RateWiring,
    /// Where its tasks' ledgers live and how they restore.
    state: StateSpec,
    /// The client settings of a ledger rebuild's reader of the aggregated topic.
    rebuild_client: ClientConfig,
    summary: &'a mut RateSummary,
    shutdown: &'a AtomicBool,
    /// How a rebuild decodes the aggregates it re-applies.
    rebuild_input: AggregateInput,
    /// When progress was last logged, and `summary.read` then.
    last_log: (Instant, u64),
}

impl Stage for Rating<'_> {
    type State = LedgerTask;
    type Record = AggregateRecord;
    const NAME: &'static str = "rate";

    fn open(&mut self, partition: i32, committed: &Committed) -> Result<(Phase, LedgerTask), StageError> {
        let state = TaskState::open(&self.state, partition, committed)?;
        Ok((Phase::Restoring, LedgerTask { state, rebuild: None }))
    }

    /// Restores the ledger from its changelog, then rebuilds it from the aggregated
    /// topic if the changelog had nothing while offsets were committed.
    fn restore(&mut self, outputs: &RecordCollector, task: &mut Task<LedgerTask>, budget: Duration) -> Result<bool, StageError> {
        let deadline = Instant::now() + budget;
        let partition = task.partition;
        let LedgerTask { state, rebuild } = &mut task.state;
        if state.is_restoring() {
            let Some(stats) = state.restore(outputs, budget)? else { return Ok(false) };
            self.summary.restored += stats.records;
            tracing::info!(partition, changelog_to = stats.to_offset, restored_records = stats.records,
                restore_ms = stats.elapsed.as_millis() as u64, "ledger restored");
            match task.resumed_at.filter(|end| *end > 0 && stats.to_offset == 0) {
                None => return Ok(true),
                Some(end) => {
                    tracing::warn!(partition, to_offset = end,
                        "the ledger's changelog is empty but offsets were committed: rebuilding it from the aggregated \
                         topic (re-applying the records before the committed offset, producing nothing)");
                    let reads = BTreeMap::from([(partition, Range { from: 0, end: Some(end) })]);
                    *rebuild = Some(PartitionsToEnd::open(&self.rebuild_client, "ledger rebuild", &self.wiring.input, reads, None)
                        .map_err(|e| StageError::Restore { partition, source: e.into() })?);
                }
            }
        }
        let Some(reader) = rebuild else { return Ok(true) };
        let stop = || self.shutdown.load(Ordering::Acquire);
        while !reader.is_done() {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(false);
            }
            let msg = reader.next(left.min(Duration::from_millis(500)))
                .map_err(|e| StageError::Restore { partition, source: e.into() })?;
            let Some(msg) = msg else { continue };
            let record = decode(&self.rebuild_input, &msg, Wait::until(&stop))?;
            self.summary.rebuilt += 1;
            let mut quiet = RateSummary::default();
            rate_one(&self.settings, state.store(), record, &mut quiet)?;
        }
        let end = task.resumed_at.unwrap_or(0);
        state.store().put_entry(REBUILT_KEY.as_bytes(), end.to_string().into_bytes());
        tracing::info!(partition, to_offset = end, "ledger rebuilt from the aggregated topic");
        *rebuild = None;
        Ok(true)
    }

    fn process(&mut self, tasks: &mut Tasks<LedgerTask>, partition: i32, offset: i64, record: AggregateRecord)
        -> Result<(), StageError> {
        let Some((outputs, task)) = tasks.running(partition) else { return Ok(()) };
        let produce = rate_one(&self.settings, task.state.state.store(), record, self.summary)?;
        for (topic, key, value) in produce {
            let topic = match topic {
                Sink::Charges => &self.wiring.charges,
                Sink::Alerts => &self.wiring.alerts,
            };
            outputs.send(BaseRecord::to(topic).key(&key).payload(&value))?;
        }
        task.consumed(offset);
        Ok(())
    }

    fn punctuate(&mut self, _tasks: &mut Tasks<LedgerTask>, _consumer: &StageConsumer) -> Result<(), StageError> {
        let (at, read) = self.last_log;
        if at.elapsed() >= Duration::from_secs(10) && self.summary.read != read {
            tracing::info!(summary = ?self.summary, "rating progress");
            self.last_log = (Instant::now(), self.summary.read);
        }
        Ok(())
    }

    /// Each running task's ledger changes go to the changelog, in the transaction.
    fn prepare_commit(&mut self, tasks: &mut Tasks<LedgerTask>) -> Result<(), StageError> {
        let (outputs, running) = tasks.all_running();
        for task in running {
            task.state.state.send_changes(outputs)?;
        }
        Ok(())
    }

    fn write_state(&mut self, task: &mut Task<LedgerTask>, changelog_next: Option<i64>) -> Result<(), StageError> {
        task.state.state.commit(changelog_next)
    }
}

/// Where a rated record goes.
enum Sink {
    Charges,
    Alerts,
}

/// Rates one aggregate record into `store`'s ledger; what to produce for it.
fn rate_one(settings: &RateSettings, store: &mut PartitionStore, record: AggregateRecord, summary: &mut RateSummary)
    -> Result<Vec<(Sink, String, Vec<u8>)>, StageError> {
    summary.read += 1;
    let agg = match record {
        AggregateRecord::Aggregate(agg) => agg,
        AggregateRecord::Undecodable => {
            summary.undecodable += 1;
            return Ok(Vec::new());
        }
    };
    // Meters' windows (SPEC §10) are answered by the meter API, not priced.
    if !agg.is_final || agg.window != settings.window || agg.meter.is_some() {
        summary.ignored += 1;
        return Ok(Vec::new());
    }
    let mut ledger = Ledger::default();
    let rated = match ledger.rate(&mut LedgerStore(store), &settings.book, &agg, now_ms()) {
        Err(LedgerError::Overflow(e)) => {
            // A quantity × price beyond exact decimals: never rounded, never retried
            // forever; logged and counted for a person to look at.
            tracing::error!(aggregate_id = %agg.aggregate_id, revision = agg.revision, "not charged: {e}");
            summary.unrateable += 1;
            return Ok(Vec::new());
        }
        other => other?,
    };
    for (key, value) in ledger.take_writes() {
        store.put_entry(key.as_bytes(), value.into_bytes());
    }
    let mut out = Vec::new();
    match rated {
        Rated::Charged { charge, alerts } => {
            summary.charges += 1;
            summary.alerts += alerts.len() as u64;
            out.push((Sink::Charges, charge.tenant_id.clone(), charge.to_json().map_err(LedgerError::Encode)?));
            for a in alerts {
                tracing::info!(tenant = %a.tenant_id, period = %a.period, threshold = %a.threshold, balance = %a.balance,
                    "spend threshold reached");
                out.push((Sink::Alerts, a.tenant_id.clone(), a.to_json().map_err(LedgerError::Encode)?));
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

/// The single local ledger of versions before the per-partition stores; no longer read
/// (each partition's ledger is rebuilt from the aggregated topic instead). Warned about
/// at start so the operator can delete it.
pub fn warn_about_old_ledger(cfg: &Config) {
    let old = cfg.state_dir.join("rate");
    if old.join("CURRENT").exists() {
        tracing::warn!(path = %old.display(),
            "a ledger of an earlier pulses version is here and no longer used: the ledger now lives per partition \
             with a changelog, rebuilt from the aggregated topic where none exists yet; this directory can be deleted");
    }
}
