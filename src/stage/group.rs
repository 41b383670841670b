//! Stage 1, grouping: `source.pulses` → `tenant.grouped.pulses` (+ DLQ).
//!
//! This is where a pulse enters. Each record is validated ([`crate::pulse::validate`]);
//! a valid pulse is re-keyed by `tenant_id` and written to the grouped topic, anything
//! else goes to the DLQ with its original bytes and the reason. A batch's outputs and
//! its consumed offsets commit together ([`crate::kafka::txn`]: one transaction per
//! input partition under exactly_once; flush, then offsets, under at_least_once), also
//! before partitions are revoked, so a rebalance re-processes nothing.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, Rebalance};
use rdkafka::producer::BaseRecord;
use rdkafka::{ClientContext, Message};

use super::StageError;
use crate::config::Config;
use crate::kafka::batch::{poll_batch, FailureSlot, PendingOffsets};
use crate::kafka::clients;
use crate::kafka::dlq;
use crate::kafka::txn::StageOutputs;
use crate::ops::lag;
use crate::ops::metrics::{self, GroupMetrics, Metrics};
use crate::pulse::avro::{grouped_to_value, GROUPED_SCHEMA};
use crate::pulse::json::encode_grouped;
use crate::pulse::validate::RecordContext;
use crate::registry::{OutputCodec, PulseInput, Registry, RegistryError, Wait};

/// Runs stage 1 until `shutdown` is set, then commits and leaves the group.
pub fn run(cfg: &Config, shutdown: &AtomicBool, metrics: Arc<Metrics>) -> Result<(), StageError> {
    let registry = Registry::from_config(&cfg.schema_registry)?.map(Arc::new);
    let stop = || shutdown.load(Ordering::Acquire);
    let codec = OutputCodec::new(cfg.output_format, registry.as_deref(), &cfg.topics.grouped, GROUPED_SCHEMA,
        cfg.schema_registry.auto_register, Wait::until(&stop))?;
    let io = GroupIo { input: PulseInput::new(registry), codec };
    let context = GroupContext {
        outputs: StageOutputs::new(cfg, "group", None)?.with_metrics(Arc::clone(&metrics)),
        source_topic: cfg.topics.source.clone(),
        pending: PendingOffsets::default(),
        failure: FailureSlot::default(),
        metrics: Arc::clone(&metrics),
    };
    let consumer: BaseConsumer<GroupContext> =
        lag::with_statistics(clients::consumer_config(cfg, &cfg.group_stage_group_id())).create_with_context(context)?;
    consumer.subscribe(&[cfg.topics.source.as_str()])?;
    tracing::info!(source = %cfg.topics.source, grouped = %cfg.topics.grouped, dlq = %cfg.topics.dlq,
        group = %cfg.group_stage_group_id(), guarantee = cfg.processing_guarantee.as_str(), "stage 1 (group) started");

    let m = &metrics.group;
    let ctx = consumer.context();
    while !shutdown.load(Ordering::Acquire) {
        let polled = poll_batch(&consumer, cfg.group.max_batch, cfg.group.max_batch_wait, |msg| {
            // Nothing stays in an open transaction while the registry is waited for.
            let commit = || ctx.commit(&consumer).map_err(|e| e.to_string());
            group_one(cfg, &io, &ctx.outputs, msg, m, Wait { stop: &stop, before: &commit })?;
            ctx.pending.record(msg.partition(), msg.offset());
            Ok::<_, StageError>(())
        });
        let records = match polled {
            // Shutdown while waiting for the registry: that record stays uncommitted.
            Err(StageError::Registry(RegistryError::Interrupted)) => break,
            other => other?,
        };
        ctx.failure.take()?;
        let _span = (records > 0).then(|| tracing::info_span!("batch", stage = "group", records).entered());
        ctx.commit(&consumer)?;
    }
    ctx.commit(&consumer)?;
    consumer.unsubscribe();
    tracing::info!(consumed = metrics::get(&m.consumed), grouped = metrics::get(&m.grouped),
        dlq = m.dlq_total(), "stage 1 (group) stopped");
    Ok(())
}

/// How stage 1 reads pulses and writes grouped pulses.
struct GroupIo {
    input: PulseInput,
    codec: OutputCodec,
}

/// Validates one record and enqueues its output: a grouped pulse or a DLQ record.
fn group_one(
    cfg: &Config,
    io: &GroupIo,
    outputs: &StageOutputs,
    msg: &impl Message,
    m: &GroupMetrics,
    wait: Wait<'_>,
) -> Result<(), StageError> {
    metrics::add(&m.consumed, 1);
    let payload = msg.payload().unwrap_or(&[]);
    let ctx = RecordContext {
        topic: msg.topic(),
        partition: msg.partition(),
        offset: msg.offset(),
        record_time_ms: msg.timestamp().to_millis(),
    };
    match io.input.decode(payload, &ctx, wait)? {
        Ok(pulse) => {
            let value = io.codec.encode(|| encode_grouped(&pulse), || grouped_to_value(&pulse))?;
            outputs.send(ctx.partition, BaseRecord::to(&cfg.topics.grouped).key(&pulse.tenant_id).payload(&value))?;
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
            outputs.send(ctx.partition, record)?;
            metrics::add(m.dlq_for(rejection.reason), 1);
        }
    }
    Ok(())
}

/// Consumer context holding the offsets handled but not yet committed, so they can be
/// committed both at the end of a batch and from the revoke callback.
struct GroupContext {
    outputs: StageOutputs,
    source_topic: String,
    pending: PendingOffsets,
    failure: FailureSlot<StageError>,
    metrics: Arc<Metrics>,
}

impl GroupContext {
    /// Commits the enqueued outputs with the offsets behind them. A failure stops the
    /// stage before the offsets move: the records are consumed again.
    fn commit(&self, consumer: &BaseConsumer<Self>) -> Result<(), StageError> {
        let pending = self.pending.take();
        if pending.is_empty() {
            return Ok(());
        }
        if self.outputs.commit(consumer, &self.source_topic, &pending, |_| Ok::<_, StageError>(()))? {
            metrics::add(&self.metrics.group.commits, 1);
        }
        Ok(())
    }
}

impl ClientContext for GroupContext {
    fn stats(&self, statistics: rdkafka::Statistics) {
        lag::record(&self.metrics, "group", &statistics);
    }
}

impl ConsumerContext for GroupContext {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Revoke(tpl) => {
                tracing::info!(partitions = tpl.count(), "partitions revoked; committing handled records first");
                if let Err(e) = self.commit(consumer) {
                    self.failure.set(e);
                }
                for elem in tpl.elements() {
                    self.outputs.revoke(elem.partition());
                }
            }
            Rebalance::Assign(tpl) => {
                // Before any record is read: fence the partitions' previous owners.
                for elem in tpl.elements() {
                    if let Err(e) = self.outputs.assign(elem.partition()) {
                        self.failure.set(e.into());
                    }
                }
                tracing::info!(partitions = tpl.count(), "partitions assigned");
                self.metrics.ops.readiness.joined("group");
            }
            Rebalance::Error(e) => tracing::warn!("rebalance error: {e}"),
        }
    }
}
