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

use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, Rebalance};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::BaseRecord;
use rdkafka::{ClientContext, Message};

use super::{flush_outputs, StageError};
use crate::config::Config;
use crate::kafka::batch::{commit_offsets, poll_batch, FailureSlot, PendingOffsets};
use crate::kafka::clients::{self, send_with_backpressure, TrackedProducer};
use crate::ops::metrics::{self, Metrics};
use crate::pulse::json::{decode_grouped, encode_grouped};
use crate::pulse::time::now_ms;
use crate::state::{PartitionStore, StoreResources};
use crate::window::{Output, WindowOperator, WindowSettings};

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
        pending: PendingOffsets::default(),
        failure: FailureSlot::default(),
        metrics,
    };
    let consumer: BaseConsumer<AggregateContext> =
        clients::consumer_config(cfg, &cfg.aggregate_stage_group_id()).create_with_context(context)?;
    consumer.subscribe(&[cfg.topics.grouped.as_str()])?;
    tracing::info!(grouped = %cfg.topics.grouped, aggregated = %cfg.topics.aggregated, late = %cfg.topics.late,
        group = %cfg.aggregate_stage_group_id(), windows = cfg.windows.len(), "stage 2 (aggregate) started");

    let ctx = consumer.context();
    while !shutdown.load(Ordering::Acquire) {
        poll_batch(&consumer, cfg.aggregate.max_batch, cfg.aggregate.max_batch_wait, |msg| ctx.aggregate_one(msg))?;
        ctx.failure.take()?;
        ctx.on_time()?;
        ctx.commit(&consumer)?;
    }
    ctx.commit(&consumer)?;
    consumer.unsubscribe();
    let m = &ctx.metrics.aggregate;
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
    pending: PendingOffsets,
    failure: FailureSlot<StageError>,
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
        self.pending.record(partition, msg.offset());
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

    /// Outputs delivered → state written → offsets committed (see the module docs).
    fn commit(&self, consumer: &BaseConsumer<Self>) -> Result<(), StageError> {
        flush_outputs(&self.producer)?;
        {
            let mut tasks = self.tasks.lock().map_err(|_| StageError::Poisoned)?;
            for task in tasks.values_mut() {
                task.op.flush(&mut task.store)?;
                task.store.commit()?;
            }
        }
        if commit_offsets(consumer, &self.cfg.topics.grouped, &self.pending.take())? {
            metrics::add(&self.metrics.aggregate.commits, 1);
        }
        Ok(())
    }
}

impl ClientContext for AggregateContext {}

impl ConsumerContext for AggregateContext {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(tpl) = rebalance {
            tracing::info!(partitions = tpl.count(), "partitions revoked; committing and closing their stores");
            if let Err(e) = self.commit(consumer) {
                self.failure.set(e);
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
                    Err(e) => self.failure.set(e),
                }
            }
        }
    }
}
