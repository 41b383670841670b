//! Stage 1, grouping: `source.pulses` → `tenant.grouped.pulses` (+ DLQ).
//!
//! This is where a pulse enters. Each record is validated ([`crate::pulse::validate`]);
//! a valid pulse is re-keyed by `tenant_id` and written to the grouped topic, anything
//! else goes to the DLQ with its original bytes and the reason. Outputs and consumed
//! offsets commit together every `commit_interval` ([`crate::runtime::record_collector`]: one
//! transaction of the thread's producer under exactly_once; flush, then offsets, under
//! at_least_once), also before partitions are revoked, so a rebalance re-processes
//! nothing.
//!
//! Outputs leave in event-time order across the assigned source partitions
//! ([`super::order`]), so stage 2's watermarks do not run ahead of a lagging one.

use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use rdkafka::message::OwnedHeaders;
use rdkafka::producer::BaseRecord;
use rdkafka::Message;

use super::order::InputOrder;
use crate::runtime::commit::CommitSettings;
use crate::runtime::stream_thread::{self as runtime, LoopSettings, RecordReader, Stage, StageConsumer};
use crate::runtime::task::{Committed, Phase, Tasks};
use super::topology::{GroupWiring, Topology};
use crate::runtime::StageError;
use crate::codec::avro::{grouped_to_value, GROUPED_SCHEMA};
use crate::codec::{OutputCodec, PulseInput};
use crate::config::Config;
use crate::kafka::dlq;
use crate::runtime::record_collector::RecordCollector;
use crate::ops::metrics::{self, GroupMetrics, Metrics};
use crate::pulse::json::encode_grouped;
use crate::meter::apply::meter_record;
use crate::meter::event;
use crate::meter::Meters;
use crate::pulse::validate::{RecordContext, RejectReason, Rejection};
use crate::registry::{Registry, Wait};
use crate::state::instance;

/// Runs stage 1 until `shutdown` is set, then commits and leaves the group.
pub fn run(cfg: &Config, shutdown: &AtomicBool, metrics: Arc<Metrics>) -> Result<(), StageError> {
    let registry = Registry::from_config(&cfg.schema_registry)?.map(Arc::new);
    let stop = || shutdown.load(std::sync::atomic::Ordering::Acquire);
    let wiring = Topology::of(cfg).group;
    let codec = OutputCodec::new(cfg.output_format, registry.as_deref(), &wiring.grouped, GROUPED_SCHEMA,
        cfg.schema_registry.auto_register, Wait::until(&stop))?;
    let reader = GroupIo { input: PulseInput::new(registry), codec, metrics: Arc::clone(&metrics), meters: cfg.meters.clone() };
    let (transactional_id, _claim) = instance::transactional_id(cfg, wiring.name)?;
    let outputs = RecordCollector::new(cfg, wiring.name, &transactional_id, None)?.with_metrics(Arc::clone(&metrics));
    let stage = Grouping { order: InputOrder::new(&wiring.input), wiring: wiring.clone(), metrics: Arc::clone(&metrics) };
    tracing::info!(source = %wiring.input, grouped = %wiring.grouped, dlq = %wiring.dlq, group = %wiring.consumer_group,
        guarantee = cfg.processing_guarantee.as_str(), "stage 1 (group) started");
    let batch = (cfg.group.max_batch, cfg.group.max_batch_wait);
    let commit = CommitSettings::of(cfg);
    let settings = LoopSettings { input: &wiring.input, consumer_group: &wiring.consumer_group, max_batch: batch, commit };
    runtime::run(cfg, settings, shutdown, Arc::clone(&metrics), outputs, reader, stage)?;
    let m = &metrics.group;
    tracing::info!(consumed = metrics::get(&m.consumed), grouped = metrics::get(&m.grouped),
        dlq = m.dlq_total(), "stage 1 (group) stopped");
    Ok(())
}

/// How stage 1 reads pulses and writes grouped pulses.
struct GroupIo {
    input: PulseInput,
    codec: OutputCodec,
    metrics: Arc<Metrics>,
    /// What CloudEvents are counted as ([`crate::meter`]).
    meters: Meters,
}

impl RecordReader for GroupIo {
    type Record = (i64, Routed);

    fn read<M: Message>(&self, msg: &M, wait: Wait<'_>) -> Result<(i64, Routed), StageError> {
        route(self, msg, &self.metrics.group, wait)
    }
}

/// A validated record's output, held until its turn ([`InputOrder`]).
enum Routed {
    Grouped { tenant_id: String, value: Vec<u8> },
    /// A CloudEvent: one grouped record per meter that reads its type (none: it is
    /// only counted in the metrics).
    Metered(Vec<(String, Vec<u8>)>),
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
    // Not a pulse: a CloudEvent, if it says so (checked only now, so pulses pay nothing).
    let decoded = match io.input.decode(payload, &ctx, wait)? {
        Err(_) if event::is_cloud_event(payload) => {
            return meter(io, payload, &ctx, m).map(|routed| routed.unwrap_or_else(|r| to_dlq(msg, &ctx, payload, r)));
        }
        decoded => decoded,
    };
    Ok(match decoded {
        Ok(pulse) => {
            let value = io.codec.encode(|| encode_grouped(&pulse), || grouped_to_value(&pulse))?;
            (pulse.event_time, Routed::Grouped { tenant_id: pulse.tenant_id, value })
        }
        Err(rejection) => to_dlq(msg, &ctx, payload, rejection),
    })
}

/// A rejected record's way to the DLQ, with its reason in the headers.
fn to_dlq(msg: &impl Message, ctx: &RecordContext<'_>, payload: &[u8], rejection: Rejection) -> (i64, Routed) {
    tracing::debug!(reason = %rejection.reason, detail = %rejection.detail, partition = ctx.partition,
        offset = ctx.offset, "record rejected");
    let headers = dlq::headers(&rejection, ctx.topic, ctx.partition, ctx.offset);
    (i64::MIN, Routed::Dlq { reason: rejection.reason, key: msg.key().map(<[u8]>::to_vec), payload: payload.to_vec(), headers })
}

/// Meters a CloudEvent: its grouped records (by the event's time), or why it cannot be.
fn meter(io: &GroupIo, payload: &[u8], ctx: &RecordContext<'_>, m: &GroupMetrics)
    -> Result<Result<(i64, Routed), Rejection>, StageError> {
    let pulses = match meter_record(&io.meters, payload, ctx) {
        Ok(p) => p,
        Err(r) => return Ok(Err(r)),
    };
    metrics::add(if pulses.is_empty() { &m.events_unmetered } else { &m.events_metered }, 1);
    let event_time = pulses.first().map_or(i64::MIN, |p| p.event_time);
    let mut records = Vec::with_capacity(pulses.len());
    for pulse in pulses {
        let value = io.codec.encode(|| encode_grouped(&pulse), || grouped_to_value(&pulse))?;
        records.push((pulse.tenant_id, value));
    }
    Ok(Ok((event_time, Routed::Metered(records))))
}

/// Enqueues a routed record's output.
fn send(wiring: &GroupWiring, outputs: &RecordCollector, routed: Routed, m: &GroupMetrics) -> Result<(), StageError> {
    match routed {
        Routed::Grouped { tenant_id, value } => {
            outputs.send(BaseRecord::to(&wiring.grouped).key(&tenant_id).payload(&value))?;
            metrics::add(&m.grouped, 1);
        }
        Routed::Metered(records) => {
            for (tenant_id, value) in &records {
                outputs.send(BaseRecord::to(&wiring.grouped).key(tenant_id).payload(value))?;
            }
            metrics::add(&m.grouped, records.len() as u64);
        }
        Routed::Dlq { reason, key, payload, headers } => {
            let mut record = BaseRecord::to(&wiring.dlq).payload(&payload).headers(headers);
            if let Some(key) = &key {
                record = record.key(key);
            }
            outputs.send(record)?;
            metrics::add(m.dlq_for(reason), 1);
        }
    }
    Ok(())
}

/// Stage 1's part of the loop: its tasks hold nothing but their producer and offset;
/// the records read but not yet sent are held across partitions, in event-time order
/// ([`InputOrder`], like the PartitionGroup of a Kafka Streams task).
struct Grouping {
    /// Its topics and consumer group ([`Topology`]).
    wiring: GroupWiring,
    order: InputOrder<Routed>,
    metrics: Arc<Metrics>,
}

impl Stage for Grouping {
    type State = ();
    type Record = (i64, Routed);
    const NAME: &'static str = "group";

    fn open(&mut self, partition: i32, committed: &Committed) -> Result<(Phase, ()), StageError> {
        self.order.assign([partition], committed.offset.map(|o| (partition, o)).into_iter().collect());
        Ok((Phase::Running, ()))
    }

    fn process(&mut self, _tasks: &mut Tasks<()>, partition: i32, offset: i64, (event_time, routed): (i64, Routed))
        -> Result<(), StageError> {
        self.order.hold(partition, offset, event_time, routed);
        Ok(())
    }

    /// Sends what may go now, in event-time order ([`InputOrder::release`]).
    fn punctuate(&mut self, tasks: &mut Tasks<()>, consumer: &StageConsumer) -> Result<(), StageError> {
        let (wiring, m) = (&self.wiring, &self.metrics.group);
        self.order.release(consumer, |partition, offset, routed| {
            // Held records of a partition leave with its task (`closed`), so this has one.
            let Some((outputs, task)) = tasks.running(partition) else { return Ok(()) };
            send(wiring, outputs, routed, m)?;
            task.consumed(offset);
            Ok::<_, StageError>(())
        })
    }

    fn committed(&mut self, offsets: bool) {
        if offsets {
            metrics::add(&self.metrics.group.commits, 1);
        }
    }

    fn closed(&mut self, closed: Vec<(i32, ())>) {
        let dropped = self.order.revoke(closed.into_iter().map(|(p, ())| p));
        if dropped > 0 {
            // Uncommitted: the partitions' next owner reads them again.
            tracing::info!(records = dropped, "held records of revoked partitions dropped");
        }
    }
}
