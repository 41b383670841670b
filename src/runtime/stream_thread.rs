//! The loop every stage runs, like Kafka Streams' StreamThread: poll a batch, hand each
//! record to its partition's task, let time act, commit when the commit interval is due
//! ([`CommitPolicy`]), and between polls act on rebalances and step restoring tasks. A
//! stage says only what is its own ([`Stage`]: how a task opens, restores, processes,
//! commits its state); the loop owns the consumer, the tasks ([`Tasks`]), the thread's
//! producer ([`RecordCollector`]) and the order of things.
//!
//! Poll, then process: a poll only collects a batch of records. Decoding (and waiting
//! for the schema registry), processing, punctuation and commits all run in the loop
//! after it. Nothing runs inside an rdkafka callback: the rebalance callback records
//! ([`super::rebalance`]), and this loop commits and closes revoked tasks, then opens
//! and restores assigned ones. A record that needs the registry while it does not
//! answer is read twice: the first read refuses to wait, the loop commits the work so
//! far (no transaction stays open during the wait), and the second read waits. A restore is stepped for at most
//! [`RESTORE_BUDGET`] between polls, so however long it takes, the consumer keeps
//! polling (within `max.poll.interval.ms`) and the other partitions keep flowing.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::Receiver;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::Message;

use super::commit::{CommitPolicy, CommitSettings};
use super::rebalance::{Rebalance, StageContext};
use super::task::{Committed, Phase, Task, Tasks};
use super::StageError;
use crate::config::Config;
use crate::kafka::batch::poll_batch;
use crate::kafka::clients;
use crate::runtime::record_collector::{RecordCollector, TxnError};
use crate::ops::metrics::Metrics;
use crate::registry::{RegistryError, Wait};

/// The stage consumer.
pub type StageConsumer = BaseConsumer<StageContext>;

/// How long restoring tasks may run between two polls.
pub const RESTORE_BUDGET: Duration = Duration::from_millis(200);
/// The poll wait while tasks restore: short, so restoring goes on.
const POLL_WHILE_RESTORING: Duration = Duration::from_millis(10);

/// How a record of the input topic becomes what the stage processes. Kept apart from
/// the [`Stage`] so decoding can wait out a registry outage while the loop commits the
/// stage's work so far ([`Wait::before`]).
pub trait RecordReader {
    type Record;
    fn read<M: Message>(&self, msg: &M, wait: Wait<'_>) -> Result<Self::Record, StageError>;
}

/// What a stage does with its tasks; the loop ([`run`]) decides when.
pub trait Stage {
    /// A task's own state (beyond its output and offsets).
    type State;
    type Record;
    /// The stage's name in logs, metrics and readiness ("group", "aggregate").
    const NAME: &'static str;

    /// Opens the state of newly assigned `partition`, given what the group committed
    /// for it. A task that needs its state restored first starts [`Phase::Restoring`].
    fn open(&mut self, partition: i32, committed: &Committed) -> Result<(Phase, Self::State), StageError>;

    /// Restores a restoring task for about `budget`; true once it can run.
    fn restore(&mut self, _outputs: &RecordCollector, _task: &mut Task<Self::State>, _budget: Duration) -> Result<bool, StageError> {
        Ok(true)
    }

    /// The tasks changed (assigned, running, revoked).
    fn tasks_changed(&mut self, _tasks: &mut Tasks<Self::State>) {}

    /// Handles the record at `offset` of a running task's `partition`.
    fn process(&mut self, tasks: &mut Tasks<Self::State>, partition: i32, offset: i64, record: Self::Record)
        -> Result<(), StageError>;

    /// Lets time act after a batch.
    fn punctuate(&mut self, tasks: &mut Tasks<Self::State>, consumer: &StageConsumer) -> Result<(), StageError>;

    /// Before a commit: hand the tasks' pending state changes to their outputs.
    fn prepare_commit(&mut self, _tasks: &mut Tasks<Self::State>) -> Result<(), StageError> {
        Ok(())
    }

    /// After the outputs are durable: write a task's local state, recording where its
    /// tracked topic (changelog) ends.
    fn write_state(&mut self, _task: &mut Task<Self::State>, _tracked_next: Option<i64>) -> Result<(), StageError> {
        Ok(())
    }

    /// A commit finished; `offsets`: offsets were committed.
    fn committed(&mut self, _offsets: bool) {}

    /// After a commit: housekeeping such as checkpoints (of every task when `closing`).
    fn maintain(&mut self, _tasks: &mut Tasks<Self::State>, _closing: bool) -> Result<(), StageError> {
        Ok(())
    }

    /// Tasks were closed (revoked, or the stage stops); their states are handed back.
    fn closed(&mut self, _closed: Vec<(i32, Self::State)>) {}
}

/// Where a stage's loop reads, how much per batch, and how often it commits.
pub struct LoopSettings<'a> {
    pub input: &'a str,
    pub consumer_group: &'a str,
    /// Records per batch at most, and how long a batch may wait for them.
    pub max_batch: (usize, Duration),
    pub commit: CommitSettings,
}
/// Runs `stage` over the partitions of `settings.input` its consumer group assigns,
/// until `shutdown` is set; then commits, closes its tasks and leaves the group.
pub fn run<S, R>(
    cfg: &Config,
    settings: LoopSettings<'_>,
    shutdown: &AtomicBool,
    metrics: Arc<Metrics>,
    outputs: RecordCollector,
    reader: R,
    mut stage: S,
) -> Result<(), StageError>
where
    S: Stage,
    R: RecordReader<Record = S::Record>,
{
    let (context, inbox) = StageContext::new(S::NAME, Arc::clone(&metrics));
    let consumer: StageConsumer = clients::stage_consumer(cfg, settings.consumer_group).create_with_context(context)?;
    // Dropped before the consumer: closing it applies its last rebalance at once.
    let _closing = Closing { consumer: &consumer, inbox: &inbox };
    consumer.subscribe(&[settings.input])?;
    let mut tasks = Tasks::new(settings.input, outputs);
    let stop = || shutdown.load(Ordering::Acquire);
    let mut policy = CommitPolicy::new(settings.commit, Instant::now());
    while !stop() {
        if on_rebalances(&consumer, &inbox, &mut stage, &mut tasks, &metrics)? {
            policy.committed(Instant::now());
        }
        let restoring = step_restores(&consumer, &reader, &mut stage, &mut tasks, &metrics, &stop)?;
        let wait = match restoring {
            true => POLL_WHILE_RESTORING,
            false => settings.max_batch.1.min(policy.until_due(Instant::now())),
        };
        // Poll, then process: nothing of the stage runs inside the poll.
        let batch = poll_batch(&consumer, settings.max_batch.0, wait)?;
        if let Some((code, reason)) = consumer.context().refused() {
            return Err(StageError::Refused { code, reason });
        }
        let records = batch.len();
        let mut interrupted = false;
        for msg in &batch {
            if tasks.running(msg.partition()).is_none() {
                if !tasks.hold_early(msg.partition(), msg.detach()) {
                    tracing::debug!(partition = msg.partition(), offset = msg.offset(), "record of a partition not owned; skipped");
                }
                continue;
            }
            let record = match read(&reader, msg, &stop) {
                Read::Record(record) => Ok(record),
                // The registry is down: commit the work so far, so no transaction stays
                // open while it is waited for, then wait.
                Read::CommitFirst => {
                    stage.punctuate(&mut tasks, &consumer)?;
                    commit(&consumer, &mut stage, &mut tasks, &metrics)?;
                    policy.committed(Instant::now());
                    reader.read(msg, Wait::until(&stop))
                }
                Read::Failed(e) => Err(e),
            };
            match record {
                // Shutdown while waiting for the registry: that record stays uncommitted.
                Err(StageError::Registry(RegistryError::Interrupted)) => {
                    interrupted = true;
                    break;
                }
                record => stage.process(&mut tasks, msg.partition(), msg.offset(), record?)?,
            }
        }
        drop(batch);
        if interrupted {
            break;
        }
        let _span = (records > 0).then(|| tracing::info_span!("batch", stage = S::NAME, records).entered());
        policy.handled(records);
        stage.punctuate(&mut tasks, &consumer)?;
        if policy.due(Instant::now()).is_some() {
            commit(&consumer, &mut stage, &mut tasks, &metrics)?;
            policy.committed(Instant::now());
            stage.maintain(&mut tasks, false)?;
        }
    }
    commit(&consumer, &mut stage, &mut tasks, &metrics)?;
    stage.maintain(&mut tasks, true)?;
    let all: Vec<i32> = tasks.iter_mut().map(|t| t.partition).collect();
    stage.closed(tasks.close(&all));
    consumer.unsubscribe();
    Ok(())
}

/// When the loop ends, however it ends: rebalances apply at once from now on (as
/// closing the consumer needs), and those recorded but not acted on are applied, so
/// librdkafka is not left waiting for them. The tasks are gone or go uncommitted.
struct Closing<'a> {
    consumer: &'a StageConsumer,
    inbox: &'a Receiver<Rebalance>,
}

impl Drop for Closing<'_> {
    fn drop(&mut self) {
        self.consumer.context().close();
        while let Ok(rebalance) = self.inbox.try_recv() {
            if let Err(e) = rebalance.apply(self.consumer) {
                tracing::warn!("applying a rebalance while closing: {e}");
            }
        }
    }
}

/// What reading a record came to.
enum Read<R> {
    Record(R),
    /// Decoding needs the schema registry, which does not answer: the loop commits
    /// first, then reads again, waiting.
    CommitFirst,
    Failed(StageError),
}

/// Reads `msg` without waiting for the registry: a read that would wait comes back as
/// [`Read::CommitFirst`].
fn read<R: RecordReader, M: Message>(reader: &R, msg: &M, stop: &dyn Fn() -> bool) -> Read<R::Record> {
    match reader.read(msg, Wait::not_yet(stop)) {
        Ok(record) => Read::Record(record),
        Err(StageError::Registry(RegistryError::WouldWait)) => Read::CommitFirst,
        Err(e) => Read::Failed(e),
    }
}

/// Commits the running tasks: their state changes to their outputs, outputs and
/// offsets together, then their local state.
fn commit<S: Stage>(consumer: &StageConsumer, stage: &mut S, tasks: &mut Tasks<S::State>, metrics: &Metrics) -> Result<(), StageError> {
    let started = Instant::now();
    stage.prepare_commit(tasks)?;
    let offsets = tasks.commit(consumer, |task, tracked_next| stage.write_state(task, tracked_next))?;
    stage.committed(offsets);
    metrics.ops.commit_duration.observe(S::NAME, started.elapsed());
    Ok(())
}

/// Acts on the rebalances the callback recorded: a revocation commits (unless the
/// partitions are already lost) and closes the tasks before librdkafka is told; an
/// assignment is applied, then its tasks are opened. Returns whether it committed.
///
/// Lost partitions cannot commit (the group moved on). Their uncommitted outputs share
/// the thread's open transaction with the other tasks' (one producer per thread), so
/// with a transaction open the whole of it is aborted and the stage fails (recoverably):
/// its replacement redoes every task's work since the last commit, as Kafka Streams
/// closes all its tasks dirty when some are lost under exactly-once.
fn on_rebalances<S: Stage>(
    consumer: &StageConsumer,
    inbox: &Receiver<Rebalance>,
    stage: &mut S,
    tasks: &mut Tasks<S::State>,
    metrics: &Metrics,
) -> Result<bool, StageError> {
    let mut any_commit = false;
    while let Ok(rebalance) = inbox.try_recv() {
        let partitions = rebalance.partitions();
        match &rebalance {
            Rebalance::Revoked { lost, .. } => {
                let committed = if *lost && tasks.outputs.in_transaction() {
                    tracing::warn!(stage = S::NAME, ?partitions, "partitions lost with a transaction open");
                    tasks.outputs.abort("partitions lost");
                    Err(TxnError::LostInTransaction(partitions.clone()).into())
                } else if *lost {
                    tracing::warn!(stage = S::NAME, ?partitions, "partitions lost; their uncommitted work is dropped");
                    Ok(())
                } else {
                    tracing::info!(stage = S::NAME, ?partitions, "partitions revoked; committing and closing their tasks");
                    any_commit = true;
                    commit(consumer, stage, tasks, metrics)
                };
                // A task revoked while restoring no longer holds readiness back.
                for p in tasks.restoring().into_iter().filter(|p| partitions.contains(p)) {
                    metrics.ops.readiness.restored(p);
                }
                let closed = tasks.close(&partitions);
                stage.closed(closed);
                stage.tasks_changed(tasks);
                // Applied even after a failed commit: the stage stops, and closing its
                // consumer must not wait for this rebalance.
                rebalance.apply(consumer)?;
                committed?;
            }
            Rebalance::Assigned(_) => {
                rebalance.apply(consumer)?;
                tasks.assign(consumer, &partitions, |p, committed| stage.open(p, committed))?;
                let restoring = tasks.restoring();
                tracing::info!(stage = S::NAME, ?partitions, ?restoring, "partitions assigned");
                metrics.ops.readiness.restoring(restoring);
                stage.tasks_changed(tasks);
                metrics.ops.readiness.joined(S::NAME);
            }
        }
    }
    Ok(any_commit)
}

/// Steps every restoring task for its share of [`RESTORE_BUDGET`]; a task that is up
/// to date starts running, first handling the records that arrived meanwhile. Returns
/// whether tasks are still restoring.
fn step_restores<S, R>(
    consumer: &StageConsumer,
    reader: &R,
    stage: &mut S,
    tasks: &mut Tasks<S::State>,
    metrics: &Metrics,
    stop: &dyn Fn() -> bool,
) -> Result<bool, StageError>
where
    S: Stage,
    R: RecordReader<Record = S::Record>,
{
    let restoring = tasks.restoring();
    if restoring.is_empty() {
        return Ok(false);
    }
    let budget = RESTORE_BUDGET / restoring.len() as u32;
    let mut still = false;
    for partition in restoring {
        let Some((outputs, task)) = tasks.task(partition) else { continue };
        if !stage.restore(outputs, task, budget)? {
            still = true;
            continue;
        }
        let early = tasks.run(consumer, partition)?;
        metrics.ops.readiness.restored(partition);
        stage.tasks_changed(tasks);
        for msg in early {
            let record = reader.read(&msg, Wait::until(stop))?;
            stage.process(tasks, partition, msg.offset(), record)?;
        }
    }
    Ok(still)
}
