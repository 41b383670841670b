//! The record collector of a stage thread (Kafka Streams' RecordCollector): the thread's
//! one producer, its open transaction and delivery tracking, and how the outputs of all
//! its tasks commit together with their consumed offsets.
//!
//! `exactly_once` (Kafka Streams' EOS v2, KIP-447): one transactional producer per stage
//! thread, with the transactional id `<application_id>-<stage>-<process id>`, the process
//! id being stable per replica (kept in its state dir, see `state::instance`). Every task
//! of the thread writes its outputs and changelog records into the producer's open
//! transaction, and a commit sends the input offsets of all of them with the consumer's
//! group metadata before committing. So:
//! - a restarted replica fences its previous incarnation at start (`init_transactions`
//!   on the same id aborts whatever that incarnation left open);
//! - a zombie (a replica that was paused or cut off while its partitions moved) is
//!   fenced by the group coordinator: its offsets carry an old generation, the
//!   transaction cannot commit and is aborted. Every transaction carries the offsets of
//!   every running task (re-sent unchanged when a task consumed nothing), so none can
//!   commit outputs or changelog records without that check. The new owner reads the
//!   committed offsets with `require_stable` (librdkafka does under read_committed),
//!   so it waits for a zombie's pending offset commit to be decided before restoring.
//!
//! With a tracked topic (stage 2's changelog), each committed offset carries metadata
//! naming where the partition's changelog ends after that commit, written by the
//! tracked topic's owner ([`Tracked::metadata`]; the state module's `ChangelogEnd`). A
//! restore treats changelog records beyond it as uncommitted.
//!
//! `at_least_once`: the same one producer, idempotent, not transactional. Outputs are
//! flushed, then state is written, then offsets are committed: a crash in between
//! re-processes the records since the last commit and may emit their outputs again.

use std::cell::Cell;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::error::KafkaError;
use rdkafka::producer::{BaseRecord, Producer};

use crate::kafka::batch::{commit_offsets, offsets_list};
use crate::kafka::clients::{self, send_with_backpressure, DeliveryTracker, TrackedProducer};
use crate::config::{Config, Guarantee};
use crate::ops::metrics::{Metrics, TxnOutcome};

/// How long a transaction call (init, send offsets, commit, abort) may take.
const TXN_TIMEOUT: Duration = Duration::from_secs(60);
/// A transaction commit that takes this long is logged with where its time went.
const SLOW_COMMIT: Duration = Duration::from_secs(1);
/// How long an at-least-once flush waits for outstanding deliveries.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(120);

#[derive(Debug, thiserror::Error)]
pub enum TxnError {
    #[error("kafka: {0}")]
    Kafka(#[from] KafkaError),
    #[error("{0} record(s) could not be delivered ({1}); offsets were not committed past them")]
    Delivery(u64, String),
    #[error("transaction of stage {stage} failed to {step}: {source}")]
    Transaction { stage: &'static str, step: &'static str, source: KafkaError },
    #[error("the consumer has no group metadata (not in a group yet)")]
    NoGroupMetadata,
    #[error("an earlier commit of this stage failed; what it processed since its last commit is discarded, not committed")]
    AfterFailedCommit,
    #[error("partitions {0:?} were lost with a transaction open; the stage starts over from its last commit")]
    LostInTransaction(Vec<i32>),
}

impl crate::kafka::startup::Retriable for TxnError {
    fn is_retriable(&self) -> bool {
        match self {
            Self::Kafka(e) | Self::Transaction { source: e, .. } => e.is_retriable(),
            _ => false,
        }
    }
}

/// A topic whose delivered offsets a stage's commits report (stage 2's changelog).
#[derive(Debug, Clone)]
pub struct Tracked {
    pub topic: String,
    /// The commit metadata saying the topic's partition ends at the given next offset.
    pub metadata: fn(i64) -> String,
}

/// The one producer of a stage thread and its open transaction: every task of the
/// thread sends through it, and [`Self::commit`] commits all of their outputs with all
/// of their offsets. Owned by the stage's loop.
pub struct RecordCollector {
    stage: &'static str,
    /// Topic whose delivered offsets are tracked (stage 2's changelog).
    tracked: Option<Tracked>,
    producer: TrackedProducer,
    /// exactly_once: the producer is transactional.
    transactional: bool,
    /// A transaction is open (exactly_once): something was sent since the last commit.
    in_transaction: Cell<bool>,
    /// Where transaction outcomes are counted, if anywhere.
    metrics: Option<Arc<Metrics>>,
    /// Set by the first failed commit. From then on nothing is sent or committed:
    /// the stage's in-memory work since its last commit (window state, held records)
    /// went with the aborted outputs, and committing it later would commit state
    /// without its outputs. The stage is replaced and redoes that work from the last
    /// commit (Kafka Streams closes its tasks dirty for the same reason).
    failed: Cell<bool>,
}

/// Outputs made durable by [`RecordCollector::commit`]: where each partition's tracked
/// topic ends now, for the caller to record in its local state before
/// [`RecordCollector::confirm`].
#[must_use = "at_least_once commits the offsets only in RecordCollector::confirm"]
pub struct Durable {
    tracked_next: HashMap<i32, i64>,
    /// at_least_once: the offsets still to commit.
    offsets: BTreeMap<i32, i64>,
    /// exactly_once: the offsets went in the committed transaction.
    committed: bool,
}

impl Durable {
    /// The offset after partition `partition`'s last delivered tracked record.
    pub fn tracked_next(&self, partition: i32) -> Option<i64> {
        self.tracked_next.get(&partition).copied()
    }
}

impl RecordCollector {
    /// The producer of `stage`: under exactly_once transactional with
    /// `transactional_id` (which fences the previous producer of that id: call it before
    /// the stage reads or restores anything), else idempotent. `tracked` is the topic
    /// whose delivered offsets [`Self::commit`] reports (stage 2's changelog).
    pub fn new(cfg: &Config, stage: &'static str, transactional_id: &str, tracked: Option<Tracked>) -> Result<Self, TxnError> {
        let tracker = tracked.as_ref().map_or_else(DeliveryTracker::default, |t| DeliveryTracker::tracking(&t.topic));
        let transactional = cfg.processing_guarantee == Guarantee::ExactlyOnce;
        let producer = match transactional {
            false => clients::tracked_producer(cfg, tracker)?,
            true => {
                let producer = clients::transactional_producer(cfg, transactional_id, tracker)?;
                let started = std::time::Instant::now();
                producer
                    .init_transactions(TXN_TIMEOUT)
                    .map_err(|source| TxnError::Transaction { stage, step: "initialise (fence the previous incarnation)", source })?;
                tracing::info!(stage, transactional_id, elapsed_ms = started.elapsed().as_millis() as u64,
                    "transactional producer ready");
                producer
            }
        };
        Ok(Self {
            stage,
            tracked,
            producer,
            transactional,
            in_transaction: Cell::new(false),
            metrics: None,
            failed: Cell::new(false),
        })
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

    /// The Kafka part of a commit took since `started`.
    fn timed(&self, started: std::time::Instant) {
        if let Some(m) = &self.metrics {
            m.ops.transaction_duration.observe(self.stage, started.elapsed());
        }
    }

    /// Whether a transaction is open: records were sent since the last commit.
    pub fn in_transaction(&self) -> bool {
        self.in_transaction.get()
    }

    /// Records that the tracked topic's `partition` already holds data up to `next`
    /// (a restored store's position), so commits name at least that end.
    pub fn set_tracked_position(&self, partition: i32, next: i64) {
        self.producer.context().advance_to(partition, next);
    }

    /// Aborts the open transaction, if any, and refuses to go on (partitions were lost
    /// with it open, or the stage stops uncommitted): the stage is replaced and redoes
    /// its uncommitted work from the last commit.
    pub fn abort(&self, why: &str) {
        if self.in_transaction.get() {
            tracing::warn!(stage = self.stage, "aborting the open transaction: {why}");
            if let Err(e) = self.producer.abort_transaction(TXN_TIMEOUT) {
                tracing::warn!(stage = self.stage, "abort failed (the transaction times out on the broker): {e}");
            }
            self.in_transaction.set(false);
            self.count(TxnOutcome::Aborted);
        }
        self.failed.set(true);
    }

    /// Enqueues `record` in the open transaction (opening one if needed).
    pub fn send<K, P>(&self, record: BaseRecord<'_, K, P, ()>) -> Result<(), TxnError>
    where
        K: rdkafka::message::ToBytes + ?Sized,
        P: rdkafka::message::ToBytes + ?Sized,
    {
        self.check_not_failed()?;
        self.begin()?;
        Ok(send_with_backpressure(&self.producer, record)?)
    }

    fn begin(&self) -> Result<(), TxnError> {
        if self.transactional && !self.in_transaction.get() {
            self.producer
                .begin_transaction()
                .map_err(|source| TxnError::Transaction { stage: self.stage, step: "begin", source })?;
            self.in_transaction.set(true);
        }
        Ok(())
    }

    /// Makes every output enqueued so far durable, together with `offsets` (of `topic`:
    /// the next offset of every running task; `advanced`: some moved since the last
    /// commit). exactly_once: one transaction commits the outputs and the offsets, the
    /// offsets sent with the consumer's group metadata. at_least_once: the producer is
    /// flushed; the offsets commit in [`Self::confirm`], after the caller has written
    /// its local state with the tracked positions [`Durable`] reports.
    pub fn commit<C: ConsumerContext>(
        &self,
        consumer: &BaseConsumer<C>,
        topic: &str,
        offsets: BTreeMap<i32, i64>,
        advanced: bool,
    ) -> Result<Durable, TxnError> {
        self.check_not_failed()?;
        let started = std::time::Instant::now();
        if !self.transactional {
            self.failing(clients::flush(&self.producer, FLUSH_TIMEOUT).map_err(TxnError::from))?;
            self.timed(started);
            let ctx = self.producer.context();
            if ctx.failed() > 0 {
                return Err(self.fail(TxnError::Delivery(ctx.failed(), ctx.last_error().unwrap_or_default())));
            }
            let offsets = if advanced { offsets } else { BTreeMap::new() };
            return Ok(Durable { tracked_next: ctx.next_offsets(), offsets, committed: false });
        }
        if !self.in_transaction.get() && !advanced {
            return Ok(Durable { tracked_next: self.producer.context().next_offsets(), offsets: BTreeMap::new(), committed: false });
        }
        let _span = tracing::info_span!("transaction", stage = self.stage, partitions = offsets.len()).entered();
        let result = self.commit_transaction(consumer, topic, &offsets);
        self.count(if result.is_ok() { TxnOutcome::Committed } else { TxnOutcome::Aborted });
        self.timed(started);
        self.failing(result)?;
        Ok(Durable { tracked_next: self.producer.context().next_offsets(), offsets: BTreeMap::new(), committed: !offsets.is_empty() })
    }

    /// Commits the open transaction (opening one for offsets alone) with `offsets`.
    fn commit_transaction<C: ConsumerContext>(
        &self,
        consumer: &BaseConsumer<C>,
        topic: &str,
        offsets: &BTreeMap<i32, i64>,
    ) -> Result<(), TxnError> {
        self.begin()?;
        let started = std::time::Instant::now();
        // Deliver first: the changelog ends are then known for the metadata, and
        // commit_transaction's own wait for deliveries took about 100 ms (stage 1's
        // commits in `pulses bench`) where this one takes a few.
        if let Err(source) = clients::flush(&self.producer, TXN_TIMEOUT) {
            return Err(self.abort_after("flush", source));
        }
        let flushed = started.elapsed();
        if !offsets.is_empty() {
            let Some(group) = consumer.group_metadata() else {
                self.abort("the consumer has no group metadata");
                return Err(TxnError::NoGroupMetadata);
            };
            let metadata = |p| self.commit_metadata(p);
            let tpl = offsets_list(topic, offsets, &metadata)?;
            if let Err(source) = self.producer.send_offsets_to_transaction(&tpl, &group, TXN_TIMEOUT) {
                return Err(self.abort_after("send offsets", source));
            }
        } else {
            // No task has an offset yet (new partitions, nothing consumed): all such a
            // transaction can hold is state derived from no input (stage 2 records its
            // windows configuration when it opens a store), which a zombie may commit
            // harmlessly. Everything derived from input carries that input's offsets.
            tracing::debug!(stage = self.stage, "committing a transaction without input offsets");
        }
        let offsets_sent = started.elapsed();
        if let Err(source) = self.producer.commit_transaction(TXN_TIMEOUT) {
            return Err(self.abort_after("commit", source));
        }
        self.in_transaction.set(false);
        // A commit blocks the stage's loop: one this slow eats into max.poll.interval.ms.
        if started.elapsed() >= SLOW_COMMIT {
            tracing::warn!(stage = self.stage, flush_ms = flushed.as_millis() as u64,
                send_offsets_ms = (offsets_sent - flushed).as_millis() as u64,
                commit_ms = (started.elapsed() - offsets_sent).as_millis() as u64, "slow transaction commit");
        }
        Ok(())
    }

    /// Finishes a [`Self::commit`] once local state is written: at_least_once commits
    /// the offsets now. Returns whether offsets were committed.
    pub fn confirm<C: ConsumerContext>(&self, consumer: &BaseConsumer<C>, topic: &str, durable: Durable) -> Result<bool, TxnError> {
        if self.transactional {
            return Ok(durable.committed);
        }
        if durable.offsets.is_empty() {
            return Ok(false);
        }
        let metadata = |p| self.commit_metadata(p);
        self.failing(commit_offsets(consumer, topic, &durable.offsets, &metadata).map_err(TxnError::from))
    }

    /// Refuses to send or commit after a failed commit (see the `failed` field).
    fn check_not_failed(&self) -> Result<(), TxnError> {
        if self.failed.get() {
            return Err(TxnError::AfterFailedCommit);
        }
        Ok(())
    }

    /// Remembers for good that a commit failed, and returns why.
    fn fail(&self, e: TxnError) -> TxnError {
        self.failed.set(true);
        e
    }

    /// Passes `result` through, remembering a failure for good.
    fn failing<T>(&self, result: Result<T, TxnError>) -> Result<T, TxnError> {
        result.map_err(|e| self.fail(e))
    }

    /// Aborts the open transaction after `step` failed, and returns the error: the
    /// stage stops, and its input since the last commit is consumed again.
    fn abort_after(&self, step: &'static str, source: KafkaError) -> TxnError {
        if let Err(e) = self.producer.abort_transaction(TXN_TIMEOUT) {
            tracing::warn!(stage = self.stage, "abort after a failed {step} also failed: {e}");
        }
        self.in_transaction.set(false);
        TxnError::Transaction { stage: self.stage, step, source }
    }

    /// The commit metadata naming where the tracked topic's `partition` ends; none if
    /// nothing is known (a restore then reads to the end of the changelog).
    fn commit_metadata(&self, partition: i32) -> Option<String> {
        let tracked = self.tracked.as_ref()?;
        Some((tracked.metadata)(self.producer.context().next_offset(partition)?))
    }
}
