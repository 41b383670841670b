//! Stage 1, grouping: `source.pulses` → `tenant.grouped.pulses` (+ DLQ).
//!
//! This is where a pulse enters. Each record is validated ([`crate::pulse::validate`]);
//! a valid pulse is re-keyed by `tenant_id` and written to the grouped topic, anything
//! else goes to the DLQ with its original bytes and the reason. Offsets are committed
//! only after every output of the batch is acknowledged (at-least-once), and also
//! before partitions are revoked, so a rebalance re-processes as little as possible.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance};
use rdkafka::producer::{BaseRecord, Producer};
use rdkafka::{ClientContext, Message, Offset, TopicPartitionList};

use super::StageError;
use crate::config::Config;
use crate::kafka::clients::{self, send_with_backpressure, TrackedProducer};
use crate::kafka::dlq;
use crate::ops::metrics::{self, GroupMetrics, Metrics};
use crate::pulse::json::encode_grouped;
use crate::pulse::validate::{validate, RecordContext};

/// How long a commit waits for outstanding deliveries before the stage gives up.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(120);

/// Runs stage 1 until `shutdown` is set, then commits and leaves the group.
pub fn run(cfg: &Config, shutdown: &AtomicBool, metrics: Arc<Metrics>) -> Result<(), StageError> {
    let producer = Arc::new(clients::tracked_producer(cfg)?);
    let context = GroupContext {
        producer: Arc::clone(&producer),
        source_topic: cfg.topics.source.clone(),
        pending: Mutex::new(BTreeMap::new()),
        failure: Mutex::new(None),
        metrics: Arc::clone(&metrics),
    };
    let consumer: BaseConsumer<GroupContext> =
        clients::consumer_config(cfg, &cfg.group_stage_group_id()).create_with_context(context)?;
    consumer.subscribe(&[cfg.topics.source.as_str()])?;
    tracing::info!(source = %cfg.topics.source, grouped = %cfg.topics.grouped, dlq = %cfg.topics.dlq,
        group = %cfg.group_stage_group_id(), "stage 1 (group) started");

    let m = &metrics.group;
    let max_wait = cfg.group.max_batch_wait;
    while !shutdown.load(Ordering::Acquire) {
        let started = Instant::now();
        let mut n = 0;
        while n < cfg.group.max_batch {
            let Some(left) = max_wait.checked_sub(started.elapsed()) else { break };
            match consumer.poll(left) {
                None => break,
                Some(Err(e)) => tracing::warn!("consumer: {e}"),
                Some(Ok(msg)) => {
                    group_one(cfg, &producer, &msg, m)?;
                    consumer.context().record_done(msg.partition(), msg.offset());
                    n += 1;
                }
            }
        }
        consumer.context().take_failure()?;
        consumer.context().commit_pending(&consumer)?;
    }
    consumer.context().commit_pending(&consumer)?;
    consumer.unsubscribe();
    tracing::info!(consumed = metrics::get(&m.consumed), grouped = metrics::get(&m.grouped),
        dlq = m.dlq_total(), "stage 1 (group) stopped");
    Ok(())
}

/// Validates one record and enqueues its output: a grouped pulse or a DLQ record.
fn group_one(cfg: &Config, producer: &TrackedProducer, msg: &impl Message, m: &GroupMetrics) -> Result<(), StageError> {
    metrics::add(&m.consumed, 1);
    let payload = msg.payload().unwrap_or(&[]);
    let ctx = RecordContext {
        topic: msg.topic(),
        partition: msg.partition(),
        offset: msg.offset(),
        record_time_ms: msg.timestamp().to_millis(),
    };
    match validate(payload, &ctx) {
        Ok(pulse) => {
            let value = encode_grouped(&pulse);
            send_with_backpressure(producer, BaseRecord::to(&cfg.topics.grouped).key(&pulse.tenant_id).payload(&value))?;
            metrics::add(&m.grouped, 1);
        }
        Err(rejection) => {
            tracing::debug!(reason = %rejection.reason, detail = %rejection.detail, partition = ctx.partition,
                offset = ctx.offset, "pulse rejected");
            let headers = dlq::headers(&rejection, ctx.topic, ctx.partition, ctx.offset);
            let mut record = BaseRecord::to(&cfg.topics.dlq).payload(payload).headers(headers);
            if let Some(key) = msg.key() {
                record = record.key(key);
            }
            send_with_backpressure(producer, record)?;
            metrics::add(m.dlq_for(rejection.reason), 1);
        }
    }
    Ok(())
}

/// Consumer context holding the offsets handled but not yet committed, so they can be
/// committed both at the end of a batch and from the revoke callback.
struct GroupContext {
    producer: Arc<TrackedProducer>,
    source_topic: String,
    /// partition → next offset to consume.
    pending: Mutex<BTreeMap<i32, i64>>,
    /// A failure inside a rebalance callback, surfaced by the poll loop.
    failure: Mutex<Option<StageError>>,
    metrics: Arc<Metrics>,
}

impl GroupContext {
    fn record_done(&self, partition: i32, offset: i64) {
        if let Ok(mut p) = self.pending.lock() {
            p.insert(partition, offset + 1);
        }
    }

    fn take_failure(&self) -> Result<(), StageError> {
        match self.failure.lock().ok().and_then(|mut f| f.take()) {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Waits for every enqueued output, then commits the offsets behind them. A failed
    /// delivery stops the stage before the commit: the records are consumed again.
    fn commit_pending(&self, consumer: &BaseConsumer<Self>) -> Result<(), StageError> {
        let pending = match self.pending.lock() {
            Ok(mut p) if !p.is_empty() => std::mem::take(&mut *p),
            _ => return Ok(()),
        };
        self.producer.flush(FLUSH_TIMEOUT)?;
        let failed = self.producer.context().failed();
        if failed > 0 {
            let last = self.producer.context().last_error().unwrap_or_default();
            return Err(StageError::Delivery(failed, last));
        }
        let mut tpl = TopicPartitionList::with_capacity(pending.len());
        for (partition, next) in &pending {
            tpl.add_partition_offset(&self.source_topic, *partition, Offset::Offset(*next))?;
        }
        match consumer.commit(&tpl, CommitMode::Sync) {
            Ok(()) => metrics::add(&self.metrics.group.commits, 1),
            // Lost the partitions (rebalance): their new owner re-reads from the last
            // committed offset. Duplicates in the grouped topic, never loss.
            Err(e) => tracing::warn!("offset commit failed, records will be re-processed: {e}"),
        }
        Ok(())
    }
}

impl ClientContext for GroupContext {}

impl ConsumerContext for GroupContext {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(tpl) = rebalance {
            tracing::info!(partitions = tpl.count(), "partitions revoked; committing handled records first");
            if let Err(e) = self.commit_pending(consumer) {
                if let Ok(mut f) = self.failure.lock() {
                    *f = Some(e);
                }
            }
        }
    }

    fn post_rebalance(&self, _: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(tpl) = rebalance {
            tracing::info!(partitions = tpl.count(), "partitions assigned");
        }
    }
}
