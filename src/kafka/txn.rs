//! Exactly-once plumbing: which producer writes a stage's outputs, and how a batch of
//! them commits together with the consumed offsets.
//!
//! `exactly_once`: one transactional producer per owned input partition, with the
//! transactional id `<application_id>-<stage>-<partition>`. A partition's outputs, its
//! changelog records (stage 2) and its consumed offsets commit in one transaction.
//! Because the id belongs to the *partition*, not to the process, the next owner's
//! `init_transactions` fences the previous owner (a replica that was killed, paused or
//! dropped from the group) and aborts its open transaction before anything of that
//! partition is read or restored. That needs nothing from the broker beyond the basic
//! transaction protocol (no group-generation checks, KIP-447), so it holds on every
//! Kafka-compatible broker that implements transactions.
//!
//! With a tracked topic (stage 2's changelog), each committed offset carries metadata
//! naming where the partition's changelog ends after that commit, written by the
//! tracked topic's owner ([`Tracked::metadata`]; the state module's `ChangelogEnd`). A
//! restore treats changelog records beyond it as uncommitted.
//!
//! `at_least_once`: one shared idempotent producer. Outputs are flushed, then state is
//! written, then offsets are committed: a crash in between re-processes the records
//! since the last commit and may emit their outputs again.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, ConsumerGroupMetadata};
use rdkafka::error::KafkaError;
use rdkafka::producer::{BaseRecord, Producer};

use super::batch::{commit_offsets, offsets_list};
use super::clients::{self, send_with_backpressure, DeliveryTracker, TrackedProducer};
use crate::config::{Config, Guarantee};
use crate::ops::metrics::{Metrics, TxnOutcome};

/// How long a transaction call (init, send offsets, commit, abort) may take.
const TXN_TIMEOUT: Duration = Duration::from_secs(60);
/// How long an at-least-once flush waits for outstanding deliveries.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(120);

#[derive(Debug, thiserror::Error)]
pub enum TxnError {
    #[error("kafka: {0}")]
    Kafka(#[from] KafkaError),
    #[error("{0} record(s) could not be delivered ({1}); offsets were not committed past them")]
    Delivery(u64, String),
    #[error("transaction of partition {partition} failed to {step}: {source}")]
    Transaction { partition: i32, step: &'static str, source: KafkaError },
    #[error("the consumer has no group metadata (not in a group yet)")]
    NoGroupMetadata,
    #[error("an earlier commit of this stage failed; what it processed since its last commit is discarded, not committed")]
    AfterFailedCommit,
}

/// A topic whose delivered offsets a stage's commits report (stage 2's changelog).
#[derive(Debug, Clone)]
pub struct Tracked {
    pub topic: String,
    /// The commit metadata saying the topic's partition ends at the given next offset.
    pub metadata: fn(i64) -> String,
}

/// The producers of one stage of one replica: the shared one under at_least_once, and
/// what every task's own producer ([`TaskOutput`]) is created with under exactly_once.
/// Owned by the stage's loop; a task owns its [`TaskOutput`].
pub struct StageOutputs {
    cfg: Config,
    stage: &'static str,
    /// Topic whose delivered offsets are tracked (stage 2's changelog).
    tracked: Option<Tracked>,
    /// at_least_once: the one producer.
    shared: Option<TrackedProducer>,
    /// Where transaction outcomes are counted, if anywhere.
    metrics: Option<Arc<Metrics>>,
    /// Set by the first failed commit. From then on nothing is sent or committed:
    /// the stage's in-memory work since its last commit (window state, held records)
    /// went with the aborted outputs, and committing it later would commit state
    /// without its outputs. The stage is replaced and redoes that work from the last
    /// commit (Kafka Streams closes its tasks dirty for the same reason).
    failed: AtomicBool,
}

/// One input partition's way out: its own transactional producer under exactly_once,
/// the stage's shared producer under at_least_once. Owned by the partition's task.
pub struct TaskOutput {
    partition: i32,
    /// exactly_once: the partition's transactional producer.
    txn: Option<PartitionProducer>,
}

struct PartitionProducer {
    producer: TrackedProducer,
    in_transaction: bool,
}

/// What one task brings to a commit: its output and the next input offset to commit
/// (none: nothing consumed since the last commit).
pub struct CommitUnit<'a> {
    pub output: &'a mut TaskOutput,
    pub next_offset: Option<i64>,
}

/// Outputs made durable by [`StageOutputs::commit`]: where each partition's tracked
/// topic ends now, for the caller to record in its local state before
/// [`StageOutputs::confirm`].
#[must_use = "at_least_once commits the offsets only in StageOutputs::confirm"]
pub struct Durable {
    tracked_next: BTreeMap<i32, i64>,
    /// at_least_once: the offsets still to commit.
    offsets: BTreeMap<i32, i64>,
    committed: bool,
}

impl Durable {
    /// The offset after partition `partition`'s last delivered tracked record.
    pub fn tracked_next(&self, partition: i32) -> Option<i64> {
        self.tracked_next.get(&partition).copied()
    }
}

impl StageOutputs {
    /// `stage` names the transactional ids; `tracked` is the topic whose delivered
    /// offsets [`Self::commit`] reports (stage 2's changelog).
    pub fn new(cfg: &Config, stage: &'static str, tracked: Option<Tracked>) -> Result<Self, TxnError> {
        let shared = match cfg.processing_guarantee {
            Guarantee::AtLeastOnce => Some(clients::tracked_producer(cfg, tracker(&tracked))?),
            Guarantee::ExactlyOnce => None,
        };
        Ok(Self { cfg: cfg.clone(), stage, tracked, shared, metrics: None, failed: AtomicBool::new(false) })
    }

    /// Counts committed and aborted transactions in `metrics`.
    pub fn with_metrics(mut self, metrics: Arc<Metrics>) -> Self {
        self.metrics = Some(metrics);
        self
    }

    fn count(&self, outcome: TxnOutcome) {
        if let Some(m) = &self.metrics {
            m.ops.count_transaction(self.stage, outcome);
        }
    }

    /// Takes ownership of `partition`. Under exactly_once this creates its
    /// transactional producer and fences any previous owner, aborting that owner's open
    /// transaction; call it before reading or restoring anything of the partition.
    pub fn assign(&self, partition: i32) -> Result<TaskOutput, TxnError> {
        if self.shared.is_some() {
            return Ok(TaskOutput { partition, txn: None });
        }
        let id = transactional_id(&self.cfg.application_id, self.stage, partition);
        let producer = clients::transactional_producer(&self.cfg, &id, tracker(&self.tracked))?;
        let started = std::time::Instant::now();
        producer
            .init_transactions(TXN_TIMEOUT)
            .map_err(|source| TxnError::Transaction { partition, step: "initialise (fence the previous owner)", source })?;
        tracing::debug!(partition, transactional_id = %id, elapsed_ms = started.elapsed().as_millis() as u64,
            "transactional producer ready");
        Ok(TaskOutput { partition, txn: Some(PartitionProducer { producer, in_transaction: false }) })
    }

    /// Records that the tracked topic's partition of `output` already holds data up
    /// to `next` (a restored store's position), so commits name at least that end.
    pub fn set_tracked_position(&self, output: &TaskOutput, next: i64) {
        self.producer(output).context().advance_to(output.partition, next);
    }

    /// Gives up a partition. Call after its last [`Self::commit`]; an open transaction
    /// is aborted (its input will be consumed again by the next owner).
    pub fn revoke(&self, output: TaskOutput) {
        let partition = output.partition;
        if let Some(p) = output.txn.filter(|p| p.in_transaction) {
            tracing::warn!(partition, "aborting an uncommitted transaction of a revoked partition");
            if let Err(e) = p.producer.abort_transaction(TXN_TIMEOUT) {
                tracing::warn!(partition, "abort failed (the next owner's fencing aborts it): {e}");
            }
            self.count(TxnOutcome::Aborted);
        }
    }

    /// Enqueues `record` as an output of `output`'s input partition.
    pub fn send<K, P>(&self, output: &mut TaskOutput, record: BaseRecord<'_, K, P, ()>) -> Result<(), TxnError>
    where
        K: rdkafka::message::ToBytes + ?Sized,
        P: rdkafka::message::ToBytes + ?Sized,
    {
        self.check_not_failed()?;
        if let Some(p) = &mut output.txn {
            p.begin(output.partition)?;
        }
        Ok(send_with_backpressure(self.producer(output), record)?)
    }

    fn producer<'a>(&'a self, output: &'a TaskOutput) -> &'a TrackedProducer {
        match (&output.txn, &self.shared) {
            (Some(p), _) => &p.producer,
            (None, Some(shared)) => shared,
            // A TaskOutput without a transaction exists only when StageOutputs has a shared producer.
            (None, None) => unreachable!("a task output without a producer"),
        }
    }

    /// Makes every output enqueued so far durable, together with the units' offsets
    /// (of `topic`). exactly_once: each unit's transaction commits (outputs and
    /// offsets). at_least_once: the shared producer is flushed; the offsets commit in
    /// [`Self::confirm`], after the caller has written its local state with the
    /// tracked positions [`Durable`] reports.
    pub fn commit<'a, C: ConsumerContext>(
        &self,
        consumer: &BaseConsumer<C>,
        topic: &str,
        units: impl IntoIterator<Item = CommitUnit<'a>>,
    ) -> Result<Durable, TxnError> {
        self.check_not_failed()?;
        let mut durable = Durable { tracked_next: BTreeMap::new(), offsets: BTreeMap::new(), committed: false };
        if let Some(shared) = &self.shared {
            self.failing(clients::flush(shared, FLUSH_TIMEOUT).map_err(TxnError::from))?;
            let failed = shared.context().failed();
            if failed > 0 {
                return Err(self.fail(TxnError::Delivery(failed, shared.context().last_error().unwrap_or_default())));
            }
            for unit in units {
                let partition = unit.output.partition;
                if let Some(next) = shared.context().next_offset(partition) {
                    durable.tracked_next.insert(partition, next);
                }
                if let Some(next) = unit.next_offset {
                    durable.offsets.insert(partition, next);
                }
            }
            return Ok(durable);
        }
        let mut units: Vec<CommitUnit<'a>> = units.into_iter().collect();
        let group = match units.iter().any(|u| u.next_offset.is_some()) {
            true => Some(consumer.group_metadata().ok_or(TxnError::NoGroupMetadata)?),
            false => None,
        };
        let due: Vec<(i32, &mut PartitionProducer, Option<i64>)> = units
            .iter_mut()
            .filter_map(|u| {
                let partition = u.output.partition;
                let p = u.output.txn.as_mut()?;
                (u.next_offset.is_some() || p.in_transaction).then_some((partition, p, u.next_offset))
            })
            .collect();
        // Each partition's transaction holds only its own outputs, changelog records and
        // input offset, so they commit side by side: one round of broker round trips
        // per commit instead of one per partition (a 1M-pulse drain spent a third of
        // its time waiting for six commits in a row).
        let commit = |(partition, p, next): (i32, &mut PartitionProducer, Option<i64>)| {
            let _span = tracing::info_span!("transaction", stage = self.stage, partition, next_offset = next).entered();
            let result = self.commit_one(group.as_ref(), topic, partition, p, next);
            self.count(if result.is_ok() { TxnOutcome::Committed } else { TxnOutcome::Aborted });
            result.map(|()| next.is_some())
        };
        let results: Vec<Result<bool, TxnError>> = if due.len() <= 1 {
            due.into_iter().map(commit).collect()
        } else {
            std::thread::scope(|s| {
                let commit = &commit;
                let threads: Vec<_> = due.into_iter().map(|d| s.spawn(move || commit(d))).collect();
                threads.into_iter().map(|t| t.join().unwrap_or_else(|e| std::panic::resume_unwind(e))).collect()
            })
        };
        for result in results {
            durable.committed |= self.failing(result)?;
        }
        for unit in &units {
            let partition = unit.output.partition;
            if let Some(next) = unit.output.txn.as_ref().and_then(|p| p.producer.context().next_offset(partition)) {
                durable.tracked_next.insert(partition, next);
            }
        }
        Ok(durable)
    }

    /// Finishes a [`Self::commit`] once local state is written: at_least_once commits
    /// the offsets now. Returns whether offsets were committed.
    pub fn confirm<C: ConsumerContext>(&self, consumer: &BaseConsumer<C>, topic: &str, durable: Durable) -> Result<bool, TxnError> {
        let Some(shared) = &self.shared else { return Ok(durable.committed) };
        if durable.offsets.is_empty() {
            return Ok(false);
        }
        let metadata = |p| self.commit_metadata(shared.context().next_offset(p));
        self.failing(commit_offsets(consumer, topic, &durable.offsets, &metadata).map_err(TxnError::from))
    }

    /// Refuses to send or commit after a failed commit (see the `failed` field).
    fn check_not_failed(&self) -> Result<(), TxnError> {
        if self.failed.load(Ordering::Acquire) {
            return Err(TxnError::AfterFailedCommit);
        }
        Ok(())
    }

    /// Remembers for good that a commit failed, and returns why.
    fn fail(&self, e: TxnError) -> TxnError {
        self.failed.store(true, Ordering::Release);
        e
    }

    /// Passes `result` through, remembering a failure for good.
    fn failing<T>(&self, result: Result<T, TxnError>) -> Result<T, TxnError> {
        result.map_err(|e| self.fail(e))
    }

    /// Commits one partition's open transaction with its input offset `next`.
    fn commit_one(
        &self,
        group: Option<&ConsumerGroupMetadata>,
        topic: &str,
        partition: i32,
        p: &mut PartitionProducer,
        next: Option<i64>,
    ) -> Result<(), TxnError> {
        p.begin(partition)?;
        // Deliver first: the changelog end is then known for the metadata, and
        // commit_transaction's own wait for deliveries took about 100 ms (stage 1's
        // commits in `pulses bench`) where this one takes a few.
        if let Err(source) = clients::flush(&p.producer, TXN_TIMEOUT) {
            return Err(p.abort_after(partition, "flush", source));
        }
        if let Some(next) = next {
            let group = group.ok_or(TxnError::NoGroupMetadata)?;
            let metadata = |_| self.commit_metadata(p.producer.context().next_offset(partition));
            let tpl = offsets_list(topic, &BTreeMap::from([(partition, next)]), &metadata)?;
            if let Err(source) = p.producer.send_offsets_to_transaction(&tpl, group, TXN_TIMEOUT) {
                return Err(p.abort_after(partition, "send offsets", source));
            }
        }
        if let Err(source) = p.producer.commit_transaction(TXN_TIMEOUT) {
            return Err(p.abort_after(partition, "commit", source));
        }
        p.in_transaction = false;
        Ok(())
    }

    /// The commit metadata naming the tracked topic's end; none if nothing is known
    /// (a restore then reads to the end of the changelog).
    fn commit_metadata(&self, tracked_next: Option<i64>) -> Option<String> {
        Some((self.tracked.as_ref()?.metadata)(tracked_next?))
    }
}

impl PartitionProducer {
    fn begin(&mut self, partition: i32) -> Result<(), TxnError> {
        if !self.in_transaction {
            self.producer
                .begin_transaction()
                .map_err(|source| TxnError::Transaction { partition, step: "begin", source })?;
            self.in_transaction = true;
        }
        Ok(())
    }

    /// Aborts the open transaction after `step` failed, and returns the error: the
    /// stage stops, and its input since the last commit is consumed again.
    fn abort_after(&mut self, partition: i32, step: &'static str, source: KafkaError) -> TxnError {
        if let Err(e) = self.producer.abort_transaction(TXN_TIMEOUT) {
            tracing::warn!(partition, "abort after a failed {step} also failed: {e}");
        }
        self.in_transaction = false;
        TxnError::Transaction { partition, step, source }
    }
}

/// The transactional id of `stage`'s producer for input `partition`:
/// `<application_id>-<stage>-<partition>`.
pub fn transactional_id(application_id: &str, stage: &str, partition: impl std::fmt::Display) -> String {
    format!("{application_id}-{stage}-{partition}")
}

fn tracker(tracked: &Option<Tracked>) -> DeliveryTracker {
    tracked.as_ref().map_or_else(DeliveryTracker::default, |t| DeliveryTracker::tracking(&t.topic))
}
