//! Stage 2, aggregation: `tenant.grouped.pulses` → `tenant.aggregated.pulses.amount`
//! (+ `tenant.late.pulses`).
//!
//! This is where a pulse is counted. Each assigned partition is a task with its own
//! RocksDB store and [`WindowOperator`] ([`crate::runtime::task`]). On assignment a task reads
//! what the group committed for the partition, opens its store (seeded from a
//! checkpoint if the live store is gone) and restores the changelog tail, stepped by the
//! loop between polls ([`crate::runtime::stream_thread`]) while its partition is paused. At every
//! commit (`commit_interval`): each task's state changes go to the changelog, then the
//! outputs, changelog records and consumed offsets of all tasks commit together
//! ([`crate::runtime::record_collector`]), and only then is each local store written, recording the
//! changelog offset it now reflects. A crash anywhere leaves local state at or behind
//! the committed changelog, never ahead of it, so a restore is always exact.

use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::BaseRecord;
use rdkafka::Message;

use crate::runtime::commit::CommitSettings;
use crate::runtime::stream_thread::{self as runtime, LoopSettings, RecordReader, Stage, StageConsumer};
use crate::runtime::task::{Committed, Phase, Task, Tasks};
use super::topology::{AggregateWiring, Topology};
use crate::runtime::StageError;
use crate::codec::avro::{aggregate_to_value, grouped_to_value, AGGREGATE_SCHEMA, GROUPED_SCHEMA};
use crate::codec::{GroupedInput, InputError, OutputCodec};
use crate::config::Config;
use crate::kafka::backlog;
use crate::kafka::upstream::UpstreamWatch;
use crate::runtime::record_collector::RecordCollector;
use crate::ops::memory::HeapTrimmer;
use crate::ops::metrics::{self, Metrics, RestoreProgress};
use crate::pulse::json::encode_grouped;
use crate::pulse::time::now_ms;
use crate::pulse::GroupedPulse;
use crate::registry::{Registry, Wait};
use crate::runtime::state_manager::{StateSpec, TaskState};
use crate::state::changelog;
use crate::state::instance;
use crate::state::PartitionStore;
use crate::window::{Output, RestoreError, WindowOperator, WindowSettings};

/// Header of a late-topic record saying why it was not counted.
pub const H_LATE_REASON: &str = "late.reason";

/// Runs stage 2 until `shutdown` is set, then commits, checkpoints and leaves the group.
pub fn run(cfg: &Config, shutdown: &AtomicBool, metrics: Arc<Metrics>) -> Result<(), StageError> {
    let Topology { aggregate: wiring, group: upstream_wiring, .. } = Topology::of(cfg);
    let registry = Registry::from_config(&cfg.schema_registry)?.map(Arc::new);
    let stop = || shutdown.load(std::sync::atomic::Ordering::Acquire);
    let codec = OutputCodec::new(cfg.output_format, registry.as_deref(), &wiring.aggregated, AGGREGATE_SCHEMA,
        cfg.schema_registry.auto_register, Wait::until(&stop))?;
    // Late pulses are grouped pulses, written in the output format like the grouped topic.
    let late_codec = OutputCodec::new(cfg.output_format, registry.as_deref(), &wiring.late, GROUPED_SCHEMA,
        cfg.schema_registry.auto_register, Wait::until(&stop))?;
    let state = StateSpec::new(cfg, &wiring.changelog, &wiring.input, &wiring.state_dir, &wiring.checkpoint_dir, cfg.aggregate.state_memory_mib << 20);
    let (transactional_id, _claim) = instance::transactional_id(cfg, wiring.name)?;
    let outputs = RecordCollector::new(cfg, wiring.name, &transactional_id, Some(state.tracked()))?
        .with_metrics(Arc::clone(&metrics));
    let reader = GroupedIo { input: GroupedInput::grouped(registry), metrics: Arc::clone(&metrics) };
    let upstream = UpstreamWatch::start(cfg, &upstream_wiring.input, &upstream_wiring.consumer_group, cfg.aggregate.idle_timeout)?;
    let stage = Aggregating {
        codec,
        late_codec,
        wiring: wiring.clone(),
        settings: Arc::new(cfg.window_settings()),
        state,
        open_window_cache: cfg.aggregate.open_window_cache,
        finals: Vec::new(),
        upstream,
        trimmer: HeapTrimmer::default(),
        metrics: Arc::clone(&metrics),
    };
    tracing::info!(grouped = %wiring.input, aggregated = %wiring.aggregated, late = %wiring.late,
        changelog = %wiring.changelog, group = %wiring.consumer_group, windows = wiring.windows.len(),
        guarantee = cfg.processing_guarantee.as_str(), "stage 2 (aggregate) started");
    let batch = (cfg.aggregate.max_batch, cfg.aggregate.max_batch_wait);
    let commit = CommitSettings::of(cfg);
    let settings = LoopSettings { input: &wiring.input, consumer_group: &wiring.consumer_group, max_batch: batch, commit };
    runtime::run(cfg, settings, shutdown, Arc::clone(&metrics), outputs, reader, stage)?;
    let m = &metrics.aggregate;
    tracing::info!(consumed = metrics::get(&m.consumed), emitted = metrics::get(&m.emitted),
        late = metrics::get(&m.late), duplicates = metrics::get(&m.duplicates), "stage 2 (aggregate) stopped");
    Ok(())
}

/// A grouped-topic record as stage 2 sees it.
enum GroupedRecord {
    Pulse(GroupedPulse),
    /// Not ours, or corrupt: set aside on the late topic with its bytes and why.
    Invalid { error: String, key: Option<Vec<u8>>, payload: Vec<u8> },
}

/// How stage 2 reads grouped pulses (JSON or Avro, told apart per record).
struct GroupedIo {
    input: GroupedInput,
    metrics: Arc<Metrics>,
}

impl RecordReader for GroupedIo {
    type Record = GroupedRecord;

    fn read<M: Message>(&self, msg: &M, wait: Wait<'_>) -> Result<GroupedRecord, StageError> {
        metrics::add(&self.metrics.aggregate.consumed, 1);
        let payload = msg.payload().unwrap_or(&[]);
        match self.input.decode(payload, wait) {
            Ok(pulse) => Ok(GroupedRecord::Pulse(pulse)),
            // Not counting a valid pulse would be wrong: stop uncommitted, re-read on restart.
            Err(InputError::Registry(e)) => Err(e.into()),
            Err(e) => {
                tracing::error!(partition = msg.partition(), offset = msg.offset(), "undecodable grouped pulse: {e}");
                Ok(GroupedRecord::Invalid { error: e.to_string(), key: msg.key().map(<[u8]>::to_vec), payload: payload.to_vec() })
            }
        }
    }
}

/// One assigned partition: its state (store, changelog, checkpoints), and its window
/// operator once the store is restored.
struct WindowTask {
    state: TaskState,
    op: Option<Box<WindowOperator>>,
}

impl WindowTask {
    fn running(&mut self) -> Option<(&mut WindowOperator, &mut PartitionStore)> {
        Some((self.op.as_deref_mut()?, self.state.store()))
    }
}

/// Stage 2's part of the loop: each task counts its partition's pulses into windows.
struct Aggregating {
    /// Values of the aggregated topic, and of the late topic.
    codec: OutputCodec,
    late_codec: OutputCodec,
    /// Its topics, consumer group and store directories ([`Topology`]).
    wiring: AggregateWiring,
    settings: Arc<WindowSettings>,
    /// Where its tasks' stores live and how they restore.
    state: StateSpec,
    /// Open windows cached in memory, divided among the running tasks.
    open_window_cache: usize,
    /// Final aggregates emitted since the last commit, for the latency histograms.
    finals: Vec<FinalEmitted>,
    /// Whether stage 1 still has an old source backlog: then nothing here is idle.
    upstream: UpstreamWatch,
    trimmer: HeapTrimmer,
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

impl Stage for Aggregating {
    type State = WindowTask;
    type Record = GroupedRecord;
    const NAME: &'static str = "aggregate";

    /// Opens the partition's state and starts restoring it ([`TaskState::open`]).
    fn open(&mut self, partition: i32, committed: &Committed) -> Result<(Phase, WindowTask), StageError> {
        let state = TaskState::open(&self.state, partition, committed)?;
        self.report(partition, state.progress());
        Ok((Phase::Restoring, WindowTask { state, op: None }))
    }

    /// Restores for about `budget`; once the store is up to date the window operator
    /// is rebuilt from it and the task runs.
    fn restore(&mut self, outputs: &RecordCollector, task: &mut Task<WindowTask>, budget: Duration) -> Result<bool, StageError> {
        let partition = task.partition;
        let WindowTask { state, op } = &mut task.state;
        if op.is_some() {
            return Ok(true);
        }
        let stepped = state.restore(outputs, budget)?;
        self.report(partition, state.progress());
        let Some(stats) = stepped else { return Ok(false) };
        metrics::add(&self.metrics.aggregate.restored_records, stats.records);
        let restored = WindowOperator::restore(Arc::clone(&self.settings), state.store()).map_err(|e| match e {
            RestoreError::Store(e) => StageError::Store(e),
            RestoreError::Windows(source) => StageError::Windows { partition, source },
        })?;
        tracing::info!(partition, path = %state.paths().live.display(), from_checkpoint = state.seeded(),
            changelog_from = stats.from_offset, changelog_to = stats.to_offset, restored_records = stats.records,
            uncommitted_records = stats.uncommitted,
            restore_ms = stats.elapsed.as_millis() as u64, open_buckets = restored.open_buckets(),
            watermark = restored.watermark().current, "state store restored");
        *op = Some(Box::new(restored));
        Ok(true)
    }

    /// Divides `open_window_cache` evenly among the running tasks' operators, so
    /// memory does not grow with the number of partitions a replica owns.
    fn tasks_changed(&mut self, tasks: &mut Tasks<WindowTask>) {
        let each = self.open_window_cache / tasks.len().max(1);
        let (_, running) = tasks.all_running();
        for task in running {
            if let Some((op, _)) = task.state.running() {
                op.set_cache_capacity(each);
            }
        }
    }

    fn process(&mut self, tasks: &mut Tasks<WindowTask>, partition: i32, offset: i64, record: GroupedRecord)
        -> Result<(), StageError> {
        let Some((outputs, task)) = tasks.running(partition) else { return Ok(()) };
        let mut emitted = Vec::new();
        match record {
            GroupedRecord::Pulse(pulse) => {
                if let Some((op, store)) = task.state.running() {
                    op.process(&pulse, now_ms(), store, &mut emitted)?;
                }
            }
            GroupedRecord::Invalid { error, key, payload } => {
                let headers = OwnedHeaders::new()
                    .insert(Header { key: H_LATE_REASON, value: Some("invalid_grouped_pulse") })
                    .insert(Header { key: "error.detail", value: Some(error.as_str()) });
                let mut late = BaseRecord::to(&self.wiring.late).payload(&payload).headers(headers);
                if let Some(key) = &key {
                    late = late.key(key);
                }
                outputs.send(late)?;
                metrics::add(&self.metrics.aggregate.late, 1);
            }
        }
        self.emit(outputs, emitted)?;
        task.consumed(offset);
        Ok(())
    }

    /// Lets time act on every running task: idle watermarks advance (unless records
    /// of the partition are still waiting to be read, or stage 1 has not yet forwarded
    /// an old source backlog that may belong to any partition), interim updates are due.
    fn punctuate(&mut self, tasks: &mut Tasks<WindowTask>, consumer: &StageConsumer) -> Result<(), StageError> {
        let (outputs, running) = tasks.all_running();
        let running: Vec<&mut Task<WindowTask>> = running.collect();
        let resumed_at = running.iter().filter_map(|t| Some((t.partition, t.resumed_at?))).collect();
        let behind = backlog::partitions_behind(consumer, &self.wiring.input, &resumed_at);
        let upstream_behind = self.upstream.is_behind();
        let now = now_ms();
        for task in running {
            let mut emitted = Vec::new();
            if let Some((op, store)) = task.state.running() {
                op.on_time(now, upstream_behind || behind.contains(&task.partition), store, &mut emitted)?;
            }
            self.emit(outputs, emitted)?;
        }
        Ok(())
    }

    /// Each running task's state changes go to the changelog, in its transaction.
    fn prepare_commit(&mut self, tasks: &mut Tasks<WindowTask>) -> Result<(), StageError> {
        let (outputs, running) = tasks.all_running();
        let mut changes = 0;
        for task in running {
            let Some((op, store)) = task.state.running() else { continue };
            op.flush(store)?;
            changes += task.state.state.send_changes(outputs)?;
        }
        metrics::add(&self.metrics.aggregate.changelog_records, changes);
        Ok(())
    }

    /// The outputs are durable: the local store is written, recording the changelog
    /// offset it now reflects.
    fn write_state(&mut self, task: &mut Task<WindowTask>, changelog_next: Option<i64>) -> Result<(), StageError> {
        task.state.state.commit(changelog_next)
    }

    fn committed(&mut self, offsets: bool) {
        if offsets {
            metrics::add(&self.metrics.aggregate.commits, 1);
        }
        // The finals emitted so far are committed now: time their latencies.
        let now = now_ms();
        let ops = &self.metrics.ops;
        for f in self.finals.drain(..) {
            if !f.correction {
                ops.close_delay.observe_ms(&f.window, now - f.emitted_at);
            }
            ops.end_to_end.observe_ms(&f.window, now - f.last_event_time);
        }
    }

    /// Writes a checkpoint of every running task whose last one is
    /// `checkpoint_interval` old (of every one when `closing`).
    fn maintain(&mut self, tasks: &mut Tasks<WindowTask>, closing: bool) -> Result<(), StageError> {
        let (_, running) = tasks.all_running();
        for task in running {
            let WindowTask { state, op: Some(op) } = &mut task.state else { continue };
            let Some(took) = state.checkpoint(self.wiring.checkpoint_interval, closing, op.watermark().current)? else { continue };
            metrics::add(&self.metrics.aggregate.checkpoints, 1);
            metrics::add(&self.metrics.aggregate.checkpoint_ms, took.as_millis() as u64);
            self.metrics.ops.checkpoint_duration.observe(took.as_secs_f64());
            tracing::debug!(partition = task.partition, took_ms = took.as_millis() as u64, "checkpoint written");
        }
        self.trimmer.maybe_trim();
        Ok(())
    }
}

impl Aggregating {
    /// Produces what `task`'s operator emitted, and counts it.
    fn emit(&mut self, outputs: &RecordCollector, emitted: Vec<Output>) -> Result<(), StageError> {
        let m = &self.metrics.aggregate;
        for out in emitted {
            match out {
                Output::Aggregate { record, correction } => {
                    let value = self.codec.encode(|| record.to_json(), || aggregate_to_value(&record))?;
                    outputs.send(BaseRecord::to(&self.wiring.aggregated).key(&record.tenant_id).payload(&value))?;
                    metrics::add(&m.emitted, 1);
                    if correction {
                        metrics::add(&m.corrections, 1);
                    }
                    if record.is_final {
                        self.finals.push(FinalEmitted {
                            window: record.window.clone(),
                            emitted_at: record.emitted_at,
                            last_event_time: record.last_event_time,
                            correction,
                        });
                    }
                }
                Output::Late { pulse, reason } => {
                    let value = self.late_codec.encode(|| encode_grouped(&pulse), || grouped_to_value(&pulse))?;
                    let headers = OwnedHeaders::new().insert(Header { key: H_LATE_REASON, value: Some(reason.as_str()) });
                    outputs.send(BaseRecord::to(&self.wiring.late).key(&pulse.tenant_id).payload(&value).headers(headers))?;
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

    /// Publishes a restore's progress on the gauges.
    fn report(&self, partition: i32, p: changelog::Progress) {
        let progress = RestoreProgress { restored: p.read, to_restore: p.to_read.unwrap_or(p.read), done: p.done };
        self.metrics.ops.set_restore(partition, progress);
    }
}
