//! Stage 1, grouping: `source.pulses` → `tenant.grouped.pulses` (+ DLQ).
//!
//! This is where a pulse enters. Each record is validated ([`crate::pulse::validate`]);
//! a valid pulse is re-keyed by `tenant_id` and written to the grouped topic, anything
//! else goes to the DLQ with its original bytes and the reason. A batch's outputs and
//! its consumed offsets commit together ([`crate::kafka::txn`]: one transaction per
//! input partition under exactly_once; flush, then offsets, under at_least_once), also
//! before partitions are revoked, so a rebalance re-processes nothing.
//!
//! Outputs leave in event-time order across the assigned source partitions
//! ([`super::order`]), so stage 2's watermarks do not run ahead of a lagging one.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, Rebalance};
use rdkafka::message::OwnedHeaders;
use rdkafka::producer::BaseRecord;
use rdkafka::{ClientContext, Message};

use super::order::{self, InputOrder};
use super::StageError;
use super::topology::{GroupWiring, Topology};
use crate::codec::avro::{grouped_to_value, GROUPED_SCHEMA};
use crate::codec::{OutputCodec, PulseInput};
use crate::config::Config;
use crate::kafka::batch::{poll_batch, FailureSlot, PendingOffsets};
use crate::kafka::clients;
use crate::kafka::dlq;
use crate::kafka::txn::StageOutputs;
use crate::ops::lag;
use crate::ops::metrics::{self, GroupMetrics, Metrics};
use crate::pulse::json::encode_grouped;
use crate::pulse::validate::{RecordContext, RejectReason};
use crate::registry::{Registry, RegistryError, Wait};

/// Runs stage 1 until `shutdown` is set, then commits and leaves the group.
pub fn run(cfg: &Config, shutdown: &AtomicBool, metrics: Arc<Metrics>) -> Result<(), StageError> {
    let registry = Registry::from_config(&cfg.schema_registry)?.map(Arc::new);
    let stop = || shutdown.load(Ordering::Acquire);
    let wiring = Topology::of(cfg).group;
    let codec = OutputCodec::new(cfg.output_format, registry.as_deref(), &wiring.grouped, GROUPED_SCHEMA,
        cfg.schema_registry.auto_register, Wait::until(&stop))?;
    let io = GroupIo { input: PulseInput::new(registry), codec };
    let context = GroupContext {
        outputs: StageOutputs::new(cfg, wiring.name, None)?.with_metrics(Arc::clone(&metrics)),
        wiring: wiring.clone(),
        pending: PendingOffsets::default(),
        failure: FailureSlot::default(),
        metrics: Arc::clone(&metrics),
        order: Mutex::new(InputOrder::new(cfg, &wiring.input)),
    };
    let consumer: BaseConsumer<GroupContext> =
        clients::stage_consumer(cfg, &wiring.consumer_group).create_with_context(context)?;
    consumer.subscribe(&[wiring.input.as_str()])?;
    tracing::info!(source = %wiring.input, grouped = %wiring.grouped, dlq = %wiring.dlq, group = %wiring.consumer_group,
        guarantee = cfg.processing_guarantee.as_str(), "stage 1 (group) started");

    let m = &metrics.group;
    let ctx = consumer.context();
    let mut more_ready = false;
    while !shutdown.load(Ordering::Acquire) {
        // Held records ready to go: take what librdkafka has, barely waiting (but
        // polling: that keeps the consumer in its group while a backlog is worked off).
        let wait = if more_ready { Duration::from_millis(1) } else { cfg.group.max_batch_wait };
        let polled = poll_batch(&consumer, cfg.group.max_batch, wait, |msg| {
            // Nothing stays held or in an open transaction while the registry is waited for.
            let commit = || ctx.release(&consumer).and_then(|_| ctx.commit(&consumer)).map_err(|e| e.to_string());
            let (event_time, routed) = route(&io, msg, m, Wait { stop: &stop, before: &commit })?;
            ctx.hold(msg.partition(), msg.offset(), event_time, routed)
        });
        let records = match polled {
            // Shutdown while waiting for the registry: that record stays uncommitted.
            Err(StageError::Registry(RegistryError::Interrupted)) => break,
            other => other?,
        };
        ctx.failure.take()?;
        let _span = (records > 0).then(|| tracing::info_span!("batch", stage = "group", records).entered());
        more_ready = ctx.release(&consumer)?;
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

/// A validated record's output, held until its turn ([`InputOrder`]).
enum Routed {
    Grouped { tenant_id: String, value: Vec<u8> },
    Dlq { reason: RejectReason, key: Option<Vec<u8>>, payload: Vec<u8>, headers: OwnedHeaders },
}

/// Validates one record and says what it becomes, with the event time that orders it
/// (a DLQ record has none: it goes as soon as the records before it in its partition).
fn route(io: &GroupIo, msg: &impl Message, m: &GroupMetrics, wait: Wait<'_>) -> Result<(i64, Routed), StageError> {
    metrics::add(&m.consumed, 1);
    let payload = msg.payload().unwrap_or(&[]);
    let ctx = RecordContext {
        topic: msg.topic(),
        partition: msg.partition(),
        offset: msg.offset(),
        record_time_ms: msg.timestamp().to_millis(),
    };
    Ok(match io.input.decode(payload, &ctx, wait)? {
        Ok(pulse) => {
            let value = io.codec.encode(|| encode_grouped(&pulse), || grouped_to_value(&pulse))?;
            (pulse.event_time, Routed::Grouped { tenant_id: pulse.tenant_id, value })
        }
        Err(rejection) => {
            tracing::debug!(reason = %rejection.reason, detail = %rejection.detail, partition = ctx.partition,
                offset = ctx.offset, "pulse rejected");
            let headers = dlq::headers(&rejection, ctx.topic, ctx.partition, ctx.offset);
            let routed = Routed::Dlq { reason: rejection.reason, key: msg.key().map(<[u8]>::to_vec), payload: payload.to_vec(), headers };
            (i64::MIN, routed)
        }
    })
}

/// Enqueues a routed record's output.
fn send(wiring: &GroupWiring, outputs: &StageOutputs, partition: i32, routed: Routed, m: &GroupMetrics) -> Result<(), StageError> {
    match routed {
        Routed::Grouped { tenant_id, value } => {
            outputs.send(partition, BaseRecord::to(&wiring.grouped).key(&tenant_id).payload(&value))?;
            metrics::add(&m.grouped, 1);
        }
        Routed::Dlq { reason, key, payload, headers } => {
            let mut record = BaseRecord::to(&wiring.dlq).payload(&payload).headers(headers);
            if let Some(key) = &key {
                record = record.key(key);
            }
            outputs.send(partition, record)?;
            metrics::add(m.dlq_for(reason), 1);
        }
    }
    Ok(())
}

/// Consumer context holding the offsets handled but not yet committed, so they can be
/// committed both at the end of a batch and from the revoke callback.
struct GroupContext {
    outputs: StageOutputs,
    /// Its topics and consumer group ([`Topology`]).
    wiring: GroupWiring,
    pending: PendingOffsets,
    failure: FailureSlot<StageError>,
    metrics: Arc<Metrics>,
    order: Mutex<InputOrder<Routed>>,
}

impl GroupContext {
    /// Holds a routed record until its turn.
    fn hold(&self, partition: i32, offset: i64, event_time: i64, routed: Routed) -> Result<(), StageError> {
        self.order.lock().map_err(|_| StageError::Poisoned)?.hold(partition, offset, event_time, routed);
        Ok(())
    }

    /// Sends what may go now, in event-time order ([`InputOrder::release`]); returns
    /// whether more could go at once.
    fn release(&self, consumer: &BaseConsumer<Self>) -> Result<bool, StageError> {
        let mut order = self.order.lock().map_err(|_| StageError::Poisoned)?;
        order.release(consumer, |partition, offset, routed| {
            send(&self.wiring, &self.outputs, partition, routed, &self.metrics.group)?;
            self.pending.record(partition, offset);
            Ok::<_, StageError>(())
        })
    }

    /// Commits the enqueued outputs with the offsets behind them. A failure stops the
    /// stage before the offsets move: the records are consumed again.
    fn commit(&self, consumer: &BaseConsumer<Self>) -> Result<(), StageError> {
        let pending = self.pending.take();
        if pending.is_empty() {
            return Ok(());
        }
        tracing::debug!(offsets = ?pending, "committing stage 1");
        if self.outputs.commit(consumer, &self.wiring.input, &pending, |_| Ok::<_, StageError>(()))? {
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
                let partitions = tpl.elements().iter().map(|e| e.partition()).collect::<Vec<_>>();
                let dropped = self.order.lock().map_or(0, |mut order| order.revoke(partitions));
                if dropped > 0 {
                    // Uncommitted: the partitions' next owner reads them again.
                    tracing::info!(records = dropped, "held records of revoked partitions dropped");
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
                let resumed_at = order::committed_offsets(consumer, tpl);
                if let Ok(mut order) = self.order.lock() {
                    order.assign(tpl.elements().iter().map(|e| e.partition()), resumed_at);
                }
                tracing::info!(partitions = tpl.count(), "partitions assigned");
                self.metrics.ops.readiness.joined("group");
            }
            Rebalance::Error(e) => tracing::warn!("rebalance error: {e}"),
        }
    }
}
