//! Stage 2, aggregation: `tenant.grouped.pulses` → `tenant.aggregated.pulses.amount`
//! (+ `tenant.late.pulses`).
//!
//! This is where a pulse is counted. Each assigned partition is a task with its own
//! RocksDB store and [`WindowOperator`]. On assignment a task fences the partition's
//! previous owner, opens its store (seeded from a checkpoint if the live store is
//! gone) and restores the changelog tail. After every batch: each task's state changes
//! go to the changelog, then outputs, changelog and consumed offsets commit together
//! ([`crate::kafka::txn`]), and only then is the local store written, recording the
//! changelog offset it now reflects. A crash anywhere leaves local state at or behind
//! the committed changelog, never ahead of it, so a restore is always exact.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, Rebalance};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::BaseRecord;
use rdkafka::{ClientContext, Message, TopicPartitionList};

use super::StageError;
use super::topology::{AggregateWiring, Topology};
use crate::codec::avro::{aggregate_to_value, grouped_to_value, AGGREGATE_SCHEMA, GROUPED_SCHEMA};
use crate::codec::{GroupedInput, InputError, OutputCodec};
use crate::config::Config;
use crate::kafka::backlog;
use crate::kafka::batch::{log_offset, poll_batch, FailureSlot, PendingOffsets, COMMITTED_TIMEOUT};
use crate::kafka::clients;
use crate::kafka::txn::StageOutputs;
use crate::ops::lag;
use crate::ops::memory::HeapTrimmer;
use crate::ops::metrics::{self, Metrics, RestoreProgress};
use crate::pulse::json::encode_grouped;
use crate::pulse::time::now_ms;
use crate::registry::{Registry, RegistryError, Wait};
use crate::state::{changelog, checkpoint, PartitionStore, StorePaths, StoreResources};
use crate::window::{Output, RestoreError, WindowOperator, WindowSettings};

/// Header of a late-topic record saying why it was not counted.
pub const H_LATE_REASON: &str = "late.reason";

/// One assigned input partition: its store, its window operator, its checkpoint.
struct Task {
    store: PartitionStore,
    op: WindowOperator,
    paths: StorePaths,
    last_checkpoint: Instant,
    /// The committed offset consumption resumed from at assignment (none: nothing
    /// committed, or opened without one), to tell a backlog from an idle partition.
    resumed_at: Option<i64>,
}

/// Runs stage 2 until `shutdown` is set, then commits, checkpoints and leaves the group.
pub fn run(cfg: &Config, shutdown: &AtomicBool, metrics: Arc<Metrics>) -> Result<(), StageError> {
    let wiring = Topology::of(cfg).aggregate;
    let registry = Registry::from_config(&cfg.schema_registry)?.map(Arc::new);
    let stop = || shutdown.load(Ordering::Acquire);
    let codec = OutputCodec::new(cfg.output_format, registry.as_deref(), &wiring.aggregated, AGGREGATE_SCHEMA,
        cfg.schema_registry.auto_register, Wait::until(&stop))?;
    // Late pulses are grouped pulses, written in the output format like the grouped topic.
    let late_codec = OutputCodec::new(cfg.output_format, registry.as_deref(), &wiring.late, GROUPED_SCHEMA,
        cfg.schema_registry.auto_register, Wait::until(&stop))?;
    let context = AggregateContext {
        input: GroupedInput::grouped(registry),
        codec,
        late_codec,
        cfg: cfg.clone(),
        settings: Arc::new(cfg.window_settings()),
        resources: StoreResources::new(cfg.aggregate.state_memory_mib << 20),
        outputs: StageOutputs::new(cfg, wiring.name, Some(changelog::tracking(&wiring.changelog)))?
            .with_metrics(Arc::clone(&metrics)),
        wiring: wiring.clone(),
        tasks: Mutex::new(BTreeMap::new()),
        pending: PendingOffsets::default(),
        failure: FailureSlot::default(),
        finals: Mutex::new(Vec::new()),
        metrics,
    };
    let consumer: BaseConsumer<AggregateContext> =
        clients::stage_consumer(cfg, &wiring.consumer_group).create_with_context(context)?;
    consumer.subscribe(&[wiring.input.as_str()])?;
    tracing::info!(grouped = %wiring.input, aggregated = %wiring.aggregated, late = %wiring.late,
        changelog = %wiring.changelog, group = %wiring.consumer_group, windows = wiring.windows.len(),
        guarantee = cfg.processing_guarantee.as_str(), "stage 2 (aggregate) started");

    let ctx = consumer.context();
    let mut trimmer = HeapTrimmer::default();
    while !shutdown.load(Ordering::Acquire) {
        let polled = poll_batch(&consumer, cfg.aggregate.max_batch, cfg.aggregate.max_batch_wait, |msg| {
            // Nothing stays in an open transaction while the registry is waited for.
            let commit = || ctx.commit(&consumer).map_err(|e| e.to_string());
            ctx.aggregate_one(msg, Wait { stop: &stop, before: &commit })
        });
        let records = match polled {
            // Shutdown while waiting for the registry: that record stays uncommitted.
            Err(StageError::Registry(RegistryError::Interrupted)) => break,
            other => other?,
        };
        ctx.failure.take()?;
        let _span = (records > 0).then(|| tracing::info_span!("batch", stage = "aggregate", records).entered());
        ctx.on_time(&consumer)?;
        ctx.commit(&consumer)?;
        ctx.checkpoint(false)?;
        trimmer.maybe_trim();
    }
    ctx.commit(&consumer)?;
    ctx.checkpoint(true)?;
    consumer.unsubscribe();
    let m = &ctx.metrics.aggregate;
    tracing::info!(consumed = metrics::get(&m.consumed), emitted = metrics::get(&m.emitted),
        late = metrics::get(&m.late), duplicates = metrics::get(&m.duplicates), "stage 2 (aggregate) stopped");
    Ok(())
}

/// Consumer context owning the tasks, so the rebalance callbacks can commit and
/// close them (revoke) or fence, open and restore them (assign).
struct AggregateContext {
    cfg: Config,
    input: GroupedInput,
    /// Values of the aggregated topic, and of the late topic.
    codec: OutputCodec,
    late_codec: OutputCodec,
    /// Its topics, consumer group and store directories ([`Topology`]).
    wiring: AggregateWiring,
    settings: Arc<WindowSettings>,
    resources: StoreResources,
    outputs: StageOutputs,
    tasks: Mutex<BTreeMap<i32, Task>>,
    pending: PendingOffsets,
    failure: FailureSlot<StageError>,
    /// Final aggregates emitted since the last commit, for the latency histograms.
    finals: Mutex<Vec<FinalEmitted>>,
    metrics: Arc<Metrics>,
}

/// What the latency histograms need of a final aggregate until its commit.
struct FinalEmitted {
    window: String,
    /// When the operator emitted it (saw the watermark pass window_end + grace).
    emitted_at: i64,
    last_event_time: i64,
    correction: bool,
}

impl AggregateContext {
    fn aggregate_one(&self, msg: &impl Message, wait: Wait<'_>) -> Result<(), StageError> {
        let m = &self.metrics.aggregate;
        metrics::add(&m.consumed, 1);
        let partition = msg.partition();
        let payload = msg.payload().unwrap_or(&[]);
        let mut outputs = Vec::new();
        match self.input.decode(payload, wait) {
            // Not counting a valid pulse would be wrong: stop uncommitted, re-read on restart.
            Err(InputError::Registry(e)) => return Err(e.into()),
            Ok(pulse) => {
                let mut tasks = self.tasks.lock().map_err(|_| StageError::Poisoned)?;
                if !tasks.contains_key(&partition) {
                    // Normally opened on assignment; open here if a callback was missed.
                    tasks.insert(partition, self.open_task(partition, None)?);
                    self.share_window_cache(&mut tasks);
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
                let mut record = BaseRecord::to(&self.wiring.late).payload(payload).headers(headers);
                if let Some(key) = msg.key() {
                    record = record.key(key);
                }
                self.outputs.send(partition, record)?;
                metrics::add(&m.late, 1);
            }
        }
        self.emit(partition, outputs)?;
        self.pending.record(partition, msg.offset());
        Ok(())
    }

    /// Produces what the operator of `partition` emitted, and counts it.
    fn emit(&self, partition: i32, outputs: Vec<Output>) -> Result<(), StageError> {
        let m = &self.metrics.aggregate;
        for out in outputs {
            match out {
                Output::Aggregate { record, correction } => {
                    let value = self.codec.encode(|| record.to_json(), || aggregate_to_value(&record))?;
                    self.outputs.send(
                        partition,
                        BaseRecord::to(&self.wiring.aggregated).key(&record.tenant_id).payload(&value),
                    )?;
                    metrics::add(&m.emitted, 1);
                    if correction {
                        metrics::add(&m.corrections, 1);
                    }
                    if record.is_final {
                        if let Ok(mut f) = self.finals.lock() {
                            f.push(FinalEmitted {
                                window: record.window.clone(),
                                emitted_at: record.emitted_at,
                                last_event_time: record.last_event_time,
                                correction,
                            });
                        }
                    }
                }
                Output::Late { pulse, reason } => {
                    let value = self.late_codec.encode(|| encode_grouped(&pulse), || grouped_to_value(&pulse))?;
                    let headers = OwnedHeaders::new().insert(Header { key: H_LATE_REASON, value: Some(reason.as_str()) });
                    self.outputs.send(
                        partition,
                        BaseRecord::to(&self.wiring.late).key(&pulse.tenant_id).payload(&value).headers(headers),
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

    /// Lets time act on every task: idle watermarks advance (unless records of the
    /// partition are still waiting to be read), interim updates are due.
    fn on_time(&self, consumer: &BaseConsumer<Self>) -> Result<(), StageError> {
        let mut due = Vec::new();
        {
            let mut tasks = self.tasks.lock().map_err(|_| StageError::Poisoned)?;
            let resumed_at = tasks.iter().filter_map(|(&p, t)| Some((p, t.resumed_at?))).collect();
            let behind = backlog::partitions_behind(consumer, &self.wiring.input, &resumed_at);
            let now = now_ms();
            for (&partition, task) in tasks.iter_mut() {
                let mut outputs = Vec::new();
                task.op.on_time(now, behind.contains(&partition), &mut task.store, &mut outputs)?;
                if !outputs.is_empty() {
                    due.push((partition, outputs));
                }
            }
        }
        for (partition, outputs) in due {
            self.emit(partition, outputs)?;
        }
        Ok(())
    }

    /// Fences the partition's previous owner, then opens its store and restores it up
    /// to the changelog end its committed offset names (read from `consumer`, after the
    /// fence, so no zombie can commit behind it; see [`changelog::restore`]).
    fn open_task(&self, partition: i32, consumer: Option<&BaseConsumer<Self>>) -> Result<Task, StageError> {
        self.outputs.assign(partition)?;
        let committed = consumer.map(|c| self.committed(c, partition)).unwrap_or_default();
        let w = &self.wiring;
        let paths = StorePaths::new(&w.state_dir, &w.checkpoint_dir, &w.input, partition);
        let (mut store, seeded) = checkpoint::open_store(&paths, &self.resources)?;
        let ops = &self.metrics.ops;
        let stats = changelog::restore_with_progress(&self.cfg, partition, &mut store, committed.changelog_end, &mut |p| {
            let progress = RestoreProgress { restored: p.read, to_restore: p.to_read.unwrap_or(p.read), done: p.done };
            ops.set_restore(partition, progress);
        })
        .map_err(|source| StageError::Restore { partition, source })?;
        ops.readiness.restored(partition);
        self.outputs.set_tracked_position(partition, stats.to_offset)?;
        metrics::add(&self.metrics.aggregate.restored_records, stats.records);
        let op = WindowOperator::restore(Arc::clone(&self.settings), &mut store).map_err(|e| match e {
            RestoreError::Store(e) => StageError::Store(e),
            RestoreError::Windows(source) => StageError::Windows { partition, source },
        })?;
        tracing::info!(partition, path = %paths.live.display(), from_checkpoint = seeded,
            changelog_from = stats.from_offset, changelog_to = stats.to_offset, restored_records = stats.records,
            uncommitted_records = stats.uncommitted,
            restore_ms = stats.elapsed.as_millis() as u64, open_buckets = op.open_buckets(),
            watermark = op.watermark().current, "state store restored");
        Ok(Task { store, op, paths, last_checkpoint: Instant::now(), resumed_at: committed.offset })
    }

    /// Divides `open_window_cache` evenly among the assigned partitions' operators, so
    /// memory does not grow with the number of partitions a replica owns.
    fn share_window_cache(&self, tasks: &mut BTreeMap<i32, Task>) {
        let each = self.cfg.aggregate.open_window_cache / tasks.len().max(1);
        for task in tasks.values_mut() {
            task.op.set_cache_capacity(each);
        }
    }

    /// State changes to the changelog; then outputs, changelog and offsets commit
    /// together; then the local stores are written (see the module docs).
    fn commit(&self, consumer: &BaseConsumer<Self>) -> Result<(), StageError> {
        let offsets = self.pending.take();
        let mut tasks = self.tasks.lock().map_err(|_| StageError::Poisoned)?;
        let mut changes = 0;
        for (&partition, task) in tasks.iter_mut() {
            task.op.flush(&mut task.store)?;
            for (key, value) in task.store.changes() {
                let record = BaseRecord::<[u8], [u8]>::to(&self.wiring.changelog).key(key).partition(partition);
                self.outputs.send(partition, match value {
                    Some(v) => record.payload(v),
                    None => record,
                })?;
                changes += 1;
            }
        }
        metrics::add(&self.metrics.aggregate.changelog_records, changes);
        let committed = self.outputs.commit(consumer, &self.wiring.input, &offsets, |changelog_next| {
            for (&partition, task) in tasks.iter_mut() {
                task.store.commit(changelog_next(partition))?;
            }
            Ok::<_, StageError>(())
        })?;
        if committed {
            metrics::add(&self.metrics.aggregate.commits, 1);
        }
        drop(tasks);
        self.observe_committed_finals();
        Ok(())
    }

    /// The finals emitted so far are committed now: time their latencies.
    fn observe_committed_finals(&self) {
        let finals = self.finals.lock().map(|mut f| std::mem::take(&mut *f)).unwrap_or_default();
        let now = now_ms();
        let ops = &self.metrics.ops;
        for f in finals {
            if !f.correction {
                ops.close_delay.observe_ms(&f.window, now - f.emitted_at);
            }
            ops.end_to_end.observe_ms(&f.window, now - f.last_event_time);
        }
    }

    /// Writes a checkpoint of every task whose last one is `checkpoint_interval` old
    /// (of every task when `all`). Call right after [`Self::commit`].
    fn checkpoint(&self, all: bool) -> Result<(), StageError> {
        let mut tasks = self.tasks.lock().map_err(|_| StageError::Poisoned)?;
        for (&partition, task) in tasks.iter_mut() {
            if !all && task.last_checkpoint.elapsed() < self.cfg.checkpoint_interval {
                continue;
            }
            let took = checkpoint::write(&task.paths, &task.store, partition, task.op.watermark().current)?;
            task.last_checkpoint = Instant::now();
            metrics::add(&self.metrics.aggregate.checkpoints, 1);
            metrics::add(&self.metrics.aggregate.checkpoint_ms, took.as_millis() as u64);
            self.metrics.ops.checkpoint_duration.observe(took.as_secs_f64());
            tracing::debug!(partition, took_ms = took.as_millis() as u64, "checkpoint written");
        }
        Ok(())
    }
}

impl AggregateContext {
    /// `partition`'s committed input offset and the changelog end its metadata names.
    fn committed(&self, consumer: &BaseConsumer<Self>, partition: i32) -> Committed {
        let mut tpl = TopicPartitionList::with_capacity(1);
        tpl.add_partition(&self.wiring.input, partition);
        match consumer.committed_offsets(tpl, COMMITTED_TIMEOUT) {
            Ok(committed) => committed.elements().first().map_or_else(Committed::default, |e| Committed {
                offset: log_offset(e.offset()),
                changelog_end: changelog::ChangelogEnd::parse(e.metadata()).map(|end| end.0),
            }),
            Err(e) => {
                tracing::warn!(partition, "cannot read the committed offset ({e}); restoring to the changelog end");
                Committed::default()
            }
        }
    }
}

/// What the group committed for one input partition.
#[derive(Debug, Default)]
struct Committed {
    offset: Option<i64>,
    /// The changelog end the commit metadata names (none: restore to the changelog end).
    changelog_end: Option<i64>,
}

impl ClientContext for AggregateContext {
    fn stats(&self, statistics: rdkafka::Statistics) {
        lag::record(&self.metrics, "aggregate", &statistics);
    }
}

impl ConsumerContext for AggregateContext {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Revoke(tpl) => {
                tracing::info!(partitions = tpl.count(), "partitions revoked; committing and closing their stores");
                if let Err(e) = self.commit(consumer) {
                    self.failure.set(e);
                }
                if let Ok(mut tasks) = self.tasks.lock() {
                    for elem in tpl.elements() {
                        tasks.remove(&elem.partition());
                        self.outputs.revoke(elem.partition());
                        self.metrics.ops.readiness.restored(elem.partition());
                    }
                    self.share_window_cache(&mut tasks);
                }
            }
            Rebalance::Assign(tpl) => {
                // Before any record is read: fence the previous owners, restore state.
                tracing::info!(partitions = tpl.count(), "partitions assigned; restoring their stores");
                self.metrics.ops.readiness.restoring(tpl.elements().iter().map(|e| e.partition()));
                for elem in tpl.elements() {
                    let partition = elem.partition();
                    let exists = self.tasks.lock().map(|t| t.contains_key(&partition)).unwrap_or(false);
                    if exists {
                        self.metrics.ops.readiness.restored(partition);
                        continue;
                    }
                    match self.open_task(partition, Some(consumer)) {
                        Ok(task) => {
                            if let Ok(mut tasks) = self.tasks.lock() {
                                tasks.insert(partition, task);
                                self.share_window_cache(&mut tasks);
                            }
                        }
                        Err(e) => self.failure.set(e),
                    }
                }
                self.metrics.ops.readiness.joined("aggregate");
            }
            Rebalance::Error(e) => tracing::warn!("rebalance error: {e}"),
        }
    }
}
