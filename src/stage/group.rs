//! Stage 1, grouping: `source.pulses` → `tenant.grouped.pulses` (+ DLQ).
//!
//! This is where a pulse enters. Each record is validated ([`crate::pulse::validate`]);
//! a valid pulse is re-keyed by `tenant_id` and written to the grouped topic, anything
//! else goes to the DLQ with its original bytes and the reason. Offsets are committed
//! only after every output of the batch is acknowledged (at-least-once), and also
//! before partitions are revoked, so a rebalance re-processes as little as possible.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, Rebalance};
use rdkafka::producer::BaseRecord;
use rdkafka::{ClientContext, Message};

use super::{flush_outputs, StageError};
use crate::config::Config;
use crate::kafka::batch::{commit_offsets, poll_batch, FailureSlot, PendingOffsets};
use crate::kafka::clients::{self, send_with_backpressure, TrackedProducer};
use crate::kafka::dlq;
use crate::ops::metrics::{self, GroupMetrics, Metrics};
use crate::pulse::json::encode_grouped;
use crate::pulse::validate::{validate, RecordContext};

/// Runs stage 1 until `shutdown` is set, then commits and leaves the group.
pub fn run(cfg: &Config, shutdown: &AtomicBool, metrics: Arc<Metrics>) -> Result<(), StageError> {
    let producer = Arc::new(clients::tracked_producer(cfg)?);
    let context = GroupContext {
        producer: Arc::clone(&producer),
        source_topic: cfg.topics.source.clone(),
        pending: PendingOffsets::default(),
        failure: FailureSlot::default(),
        metrics: Arc::clone(&metrics),
    };
    let consumer: BaseConsumer<GroupContext> =
        clients::consumer_config(cfg, &cfg.group_stage_group_id()).create_with_context(context)?;
    consumer.subscribe(&[cfg.topics.source.as_str()])?;
    tracing::info!(source = %cfg.topics.source, grouped = %cfg.topics.grouped, dlq = %cfg.topics.dlq,
        group = %cfg.group_stage_group_id(), "stage 1 (group) started");

    let m = &metrics.group;
    let ctx = consumer.context();
    while !shutdown.load(Ordering::Acquire) {
        poll_batch(&consumer, cfg.group.max_batch, cfg.group.max_batch_wait, |msg| {
            group_one(cfg, &producer, msg, m)?;
            ctx.pending.record(msg.partition(), msg.offset());
            Ok::<_, StageError>(())
        })?;
        ctx.failure.take()?;
        ctx.commit(&consumer)?;
    }
    ctx.commit(&consumer)?;
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
    pending: PendingOffsets,
    failure: FailureSlot<StageError>,
    metrics: Arc<Metrics>,
}

impl GroupContext {
    /// Waits for every enqueued output, then commits the offsets behind them. A failed
    /// delivery stops the stage before the commit: the records are consumed again.
    fn commit(&self, consumer: &BaseConsumer<Self>) -> Result<(), StageError> {
        let pending = self.pending.take();
        if pending.is_empty() {
            return Ok(());
        }
        flush_outputs(&self.producer)?;
        if commit_offsets(consumer, &self.source_topic, &pending)? {
            metrics::add(&self.metrics.group.commits, 1);
        }
        Ok(())
    }
}

impl ClientContext for GroupContext {}

impl ConsumerContext for GroupContext {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(tpl) = rebalance {
            tracing::info!(partitions = tpl.count(), "partitions revoked; committing handled records first");
            if let Err(e) = self.commit(consumer) {
                self.failure.set(e);
            }
        }
    }

    fn post_rebalance(&self, _: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(tpl) = rebalance {
            tracing::info!(partitions = tpl.count(), "partitions assigned");
        }
    }
}
