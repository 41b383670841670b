//! Stage 2, aggregation: `tenant.grouped.pulses` → `tenant.aggregated.pulses.amount`
//! (+ `tenant.late.pulses`).
//!
//! This is where a pulse is counted. Each assigned partition is a task with its own
//! RocksDB store and [`WindowOperator`]. After every batch, in this order: outputs are
//! delivered, then state is written, then offsets are committed. A crash between two
//! steps therefore re-processes input against state that either lacks it (outputs are
//! re-emitted with the same aggregate_id and revision: idempotent downstream) or
//! already has it (its pulse_ids are known: not counted twice).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{BaseRecord, Producer};
use rdkafka::{ClientContext, Message, Offset, TopicPartitionList};

use super::StageError;
use crate::config::Config;
use crate::kafka::clients::{self, send_with_backpressure, TrackedProducer};
use crate::ops::metrics::{self, Metrics};
use crate::pulse::json::{decode_grouped, encode_grouped};
use crate::pulse::time::now_ms;
use crate::state::{PartitionStore, StoreResources};
use crate::window::{Output, WindowOperator, WindowSettings};

const FLUSH_TIMEOUT: Duration = Duration::from_secs(120);
/// Header of a late-topic record saying why it was not counted.
pub const H_LATE_REASON: &str = "late.reason";

/// One assigned input partition: its store and its window operator.
struct Task {
    store: PartitionStore,
    op: WindowOperator,
}

/// Runs stage 2 until `shutdown` is set, then commits and leaves the group.
pub fn run(cfg: &Config, shutdown: &AtomicBool, metrics: Arc<Metrics>) -> Result<(), StageError> {
    let producer = Arc::new(clients::tracked_producer(cfg)?);
    let context = AggregateContext {
        cfg: cfg.clone(),
        settings: Arc::new(cfg.window_settings()),
        resources: StoreResources::new(cfg.aggregate.state_memory_mib << 20),
        producer,
        tasks: Mutex::new(BTreeMap::new()),
        pending: Mutex::new(BTreeMap::new()),
        failure: Mutex::new(None),
        metrics,
    };
    let consumer: BaseConsumer<AggregateContext> =
        clients::consumer_config(cfg, &cfg.aggregate_stage_group_id()).create_with_context(context)?;
    consumer.subscribe(&[cfg.topics.grouped.as_str()])?;
    tracing::info!(grouped = %cfg.topics.grouped, aggregated = %cfg.topics.aggregated, late = %cfg.topics.late,
        group = %cfg.aggregate_stage_group_id(), windows = cfg.windows.len(), "stage 2 (aggregate) started");

    let max_wait = cfg.aggregate.max_batch_wait;
    while !shutdown.load(Ordering::Acquire) {
        let started = Instant::now();
        let mut n = 0;
        while n < cfg.aggregate.max_batch {
            let Some(left) = max_wait.checked_sub(started.elapsed()) else { break };
            match consumer.poll(left) {
                None => break,
                Some(Err(e)) => tracing::warn!("consumer: {e}"),
                Some(Ok(msg)) => {
                    consumer.context().aggregate_one(&msg)?;
                    n += 1;
                }
            }
        }
        consumer.context().take_failure()?;
        consumer.context().on_time()?;
        consumer.context().commit(&consumer)?;
    }
    consumer.context().commit(&consumer)?;
    consumer.unsubscribe();
    let m = &consumer.context().metrics.aggregate;
    tracing::info!(consumed = metrics::get(&m.consumed), emitted = metrics::get(&m.emitted),
        late = metrics::get(&m.late), duplicates = metrics::get(&m.duplicates), "stage 2 (aggregate) stopped");
    Ok(())
}

/// Consumer context owning the tasks, so the rebalance callbacks can commit and
/// close them (revoke) or open and restore them (assign).
struct AggregateContext {
    cfg: Config,
    settings: Arc<WindowSettings>,
    resources: StoreResources,
    producer: Arc<TrackedProducer>,
    tasks: Mutex<BTreeMap<i32, Task>>,
    /// partition → next offset to consume, for records handled since the last commit.
    pending: Mutex<BTreeMap<i32, i64>>,
    failure: Mutex<Option<StageError>>,
    metrics: Arc<Metrics>,
}

impl AggregateContext {
    fn aggregate_one(&self, msg: &impl Message) -> Result<(), StageError> {
        let m = &self.metrics.aggregate;
        metrics::add(&m.consumed, 1);
        let partition = msg.partition();
        let payload = msg.payload().unwrap_or(&[]);
        let mut outputs = Vec::new();
        match decode_grouped(payload) {
            Ok(pulse) => {
                let mut tasks = self.tasks.lock().map_err(|_| StageError::Poisoned)?;
                if !tasks.contains_key(&partition) {
                    // Normally opened on assignment; open here if a callback was missed.
                    tasks.insert(partition, self.open_task(partition)?);
                }
                if let Some(task) = tasks.get_mut(&partition) {
                    task.op.process(&pulse, now_ms(), &mut task.store, &mut outputs)?;
                }
            }
            Err(e) => {
                // Not ours, or corrupt: set aside, visibly, rather than stall or drop.
                tracing::error!(partition, offset = msg.offset(), "undecodable grouped pulse: {e}");
                let headers = OwnedHeaders::new()
                    .insert(Header { key: H_LATE_REASON, value: Some("invalid_grouped_pulse") })
                    .insert(Header { key: "error.detail", value: Some(e.to_string().as_str()) });
                let mut record = BaseRecord::to(&self.cfg.topics.late).payload(payload).headers(headers);
                if let Some(key) = msg.key() {
                    record = record.key(key);
                }
                send_with_backpressure(&self.producer, record)?;
                metrics::add(&m.late, 1);
            }
        }
        self.emit(outputs)?;
        if let Ok(mut p) = self.pending.lock() {
            p.insert(partition, msg.offset() + 1);
        }
        Ok(())
    }

    /// Produces what the operator emitted, and counts it.
    fn emit(&self, outputs: Vec<Output>) -> Result<(), StageError> {
        let m = &self.metrics.aggregate;
        for out in outputs {
            match out {
                Output::Aggregate { record, correction } => {
                    let value = record.to_json();
                    send_with_backpressure(
                        &self.producer,
                        BaseRecord::to(&self.cfg.topics.aggregated).key(&record.tenant_id).payload(&value),
                    )?;
                    metrics::add(&m.emitted, 1);
                    if correction {
                        metrics::add(&m.corrections, 1);
                    }
                }
                Output::Late { pulse, reason } => {
                    let value = encode_grouped(&pulse);
                    let headers = OwnedHeaders::new().insert(Header { key: H_LATE_REASON, value: Some(reason.as_str()) });
                    send_with_backpressure(
                        &self.producer,
                        BaseRecord::to(&self.cfg.topics.late).key(&pulse.tenant_id).payload(&value).headers(headers),
                    )?;
                    metrics::add(&m.late, 1);
                }
                Output::Duplicate { pulse } => {
                    tracing::debug!(tenant = %pulse.tenant_id, pulse_id = %pulse.pulse_id, "duplicate pulse not counted");
                    metrics::add(&m.duplicates, 1);
                }
            }
        }
        Ok(())
    }

    /// Lets time act on every task: idle watermarks advance, interim updates are due.
    fn on_time(&self) -> Result<(), StageError> {
        let mut outputs = Vec::new();
        {
            let mut tasks = self.tasks.lock().map_err(|_| StageError::Poisoned)?;
            let now = now_ms();
            for task in tasks.values_mut() {
                task.op.on_time(now, &mut task.store, &mut outputs);
            }
        }
        self.emit(outputs)
    }

    fn open_task(&self, partition: i32) -> Result<Task, StageError> {
        let path = self
            .cfg
            .state_dir
            .join(&self.cfg.application_id)
            .join(format!("{}-{partition}", self.cfg.topics.grouped));
        let mut store = PartitionStore::open(&path, &self.resources)?;
        let op = WindowOperator::restore(Arc::clone(&self.settings), &mut store)?;
        tracing::info!(partition, path = %path.display(), open_windows = op.open_windows(),
            watermark = op.watermark().current, "state store opened");
        Ok(Task { store, op })
    }

    fn take_failure(&self) -> Result<(), StageError> {
        match self.failure.lock().ok().and_then(|mut f| f.take()) {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Outputs delivered → state written → offsets committed (see the module docs).
    fn commit(&self, consumer: &BaseConsumer<Self>) -> Result<(), StageError> {
        self.producer.flush(FLUSH_TIMEOUT)?;
        let failed = self.producer.context().failed();
        if failed > 0 {
            return Err(StageError::Delivery(failed, self.producer.context().last_error().unwrap_or_default()));
        }
        {
            let mut tasks = self.tasks.lock().map_err(|_| StageError::Poisoned)?;
            for task in tasks.values_mut() {
                task.op.flush(&mut task.store)?;
                task.store.commit()?;
            }
        }
        let pending = match self.pending.lock() {
            Ok(mut p) if !p.is_empty() => std::mem::take(&mut *p),
            _ => return Ok(()),
        };
        let mut tpl = TopicPartitionList::with_capacity(pending.len());
        for (partition, next) in &pending {
            tpl.add_partition_offset(&self.cfg.topics.grouped, *partition, Offset::Offset(*next))?;
        }
        match consumer.commit(&tpl, CommitMode::Sync) {
            Ok(()) => metrics::add(&self.metrics.aggregate.commits, 1),
            Err(e) => tracing::warn!("offset commit failed, records will be re-processed (deduplicated): {e}"),
        }
        Ok(())
    }

    fn fail(&self, e: StageError) {
        tracing::error!("{e}");
        if let Ok(mut f) = self.failure.lock() {
            f.get_or_insert(e);
        }
    }
}

impl ClientContext for AggregateContext {}

impl ConsumerContext for AggregateContext {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(tpl) = rebalance {
            tracing::info!(partitions = tpl.count(), "partitions revoked; committing and closing their stores");
            if let Err(e) = self.commit(consumer) {
                self.fail(e);
                return;
            }
            if let Ok(mut tasks) = self.tasks.lock() {
                for elem in tpl.elements() {
                    tasks.remove(&elem.partition());
                }
            }
        }
    }

    fn post_rebalance(&self, _: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(tpl) = rebalance {
            tracing::info!(partitions = tpl.count(), "partitions assigned; opening their stores");
            for elem in tpl.elements() {
                let partition = elem.partition();
                let exists = self.tasks.lock().map(|t| t.contains_key(&partition)).unwrap_or(false);
                if exists {
                    continue;
                }
                match self.open_task(partition) {
                    Ok(task) => {
                        if let Ok(mut tasks) = self.tasks.lock() {
                            tasks.insert(partition, task);
                        }
                    }
                    Err(e) => self.fail(e),
                }
            }
        }
    }
}
