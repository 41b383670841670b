//! `pulses replay`: re-computes window aggregates from `source.pulses` for a time range
//! (SPEC §4, re-rating), with the live code: the same decoding and validation, JSON and
//! Avro ([`PulseInput`]), the same [`WindowOperator`] over the same RocksDB store type,
//! the same aggregate ids, and the same output encoding ([`OutputCodec`], in
//! `output_format`, Avro under the replay topic's own subject).
//!
//! - Input: each source partition from the offset Kafka's offsets-for-time gives for
//!   T0 up to the log end at start ([`bounds`]), or up to its first record with a
//!   timestamp ≥ T1 + `retention`: a pulse of a window inside [T0, T1) produced after
//!   T1 still corrected the live window if it came within retention, so it is read
//!   too. Windows are chosen by event time, never by record time. Partitions are
//!   *assigned*, never subscribed, and no offset is committed: the live consumer
//!   groups are not touched. Records are merged across partitions in timestamp order
//!   ([`crate::stage::merge`]).
//! - State: a fresh RocksDB store in a temporary directory under the state dir,
//!   deleted at exit.
//! - Output: final aggregates of windows inside [T0, T1) only (a window starting
//!   before T0 may lack pulses read before the start offset; one ending after T1 is
//!   incomplete). At the end of the input the watermark jumps to T1 (to +∞ without
//!   `--to`), closing every window that ends by then. Written by a plain idempotent
//!   producer: a replay is a bounded batch job whose output is deterministic (same ids,
//!   revisions and totals), so after a failure it is simply run again and the
//!   duplicates upsert.

pub mod bounds;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::message::OwnedMessage;
use rdkafka::producer::{BaseRecord, Producer};
use rdkafka::Message;

use crate::codec::avro::{aggregate_to_value, AGGREGATE_SCHEMA};
use crate::codec::{OutputCodec, PulseInput};
use crate::config::Config;
use crate::kafka::clients::{self, send_with_backpressure, DeliveryTracker, TrackedProducer};
use crate::kafka::reader::{PartitionsToEnd, Range};
use crate::pulse::RejectReason;
use crate::pulse::time::now_ms;
use crate::meter::apply::meter_record;
use crate::pulse::validate::RecordContext;
use crate::registry::{Registry, RegistryError, Wait};
use crate::stage::merge::Merge;
use crate::state::{PartitionStore, StoreResources};
use crate::window::{Output, RestoreError, WindowOperator};

#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    #[error("kafka: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    #[error(transparent)]
    Read(#[from] crate::kafka::reader::ReadError),
    #[error("state store: {0}")]
    Store(#[from] crate::state::StoreError),
    #[error("{0}")]
    Setup(String),
    #[error(transparent)]
    Admin(#[from] crate::kafka::admin::AdminError),
    #[error("{0} aggregate(s) could not be delivered: {1}")]
    Delivery(u64, String),
    #[error("interrupted before the end of the input; the output topic holds a partial replay")]
    Interrupted,
    #[error(transparent)]
    Registry(#[from] RegistryError),
    #[error(transparent)]
    Encode(#[from] crate::codec::output::EncodeError),
    /// An Avro pulse could not be decoded for want of the registry: a replay that went
    /// on would silently miss it.
    #[error("source record {partition}/{offset}: {detail}; stopped rather than replay without it")]
    RegistryUnavailable { partition: i32, offset: i64, detail: String },
}

/// What to replay.
#[derive(Debug, Clone)]
pub struct ReplaySettings {
    /// T0: record timestamps (epoch ms) to start from.
    pub from_ms: i64,
    /// T1: exclusive end; None replays to the log end and closes every window.
    pub to_ms: Option<i64>,
    pub output_topic: String,
    /// Least time between two calls of the progress callback.
    pub progress_every: Duration,
}

/// Counters of one replay.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ReplaySummary {
    pub partitions: usize,
    /// Source records read (valid or not).
    pub read: u64,
    /// Invalid records (the live pipeline sent them to the DLQ; a replay only counts them).
    pub rejected: u64,
    pub duplicates: u64,
    /// Pulses beyond retention (the live pipeline sent them to the late topic).
    pub late: u64,
    /// Final aggregates written to the output topic.
    pub written: u64,
    /// Closed windows not written because they are not inside [T0, T1).
    pub outside: u64,
}

/// Most records buffered per partition before it is paused.
const MAX_BUFFERED: usize = 20_000;
/// Records between two writes of the temporary store (bounds its memory).
const FLUSH_EVERY: u64 = 20_000;

/// Deletes the temporary state directory, however the replay ends.
struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_dir_all(&self.0) {
            tracing::warn!(path = %self.0.display(), "cannot delete the replay state: {e}");
        }
    }
}

/// Runs one bounded replay; `progress` is called every `progress_every` with
/// (records read, records to read at most, aggregates written).
pub fn run(
    cfg: &Config,
    s: &ReplaySettings,
    shutdown: &AtomicBool,
    mut progress: impl FnMut(u64, u64, u64),
) -> Result<ReplaySummary, ReplayError> {
    let topic = cfg.topics.source.as_str();
    let stop = || shutdown.load(Ordering::Acquire);
    let registry = Registry::from_config(&cfg.schema_registry)?.map(Arc::new);
    let codec = OutputCodec::new(cfg.output_format, registry.as_deref(), &s.output_topic, AGGREGATE_SCHEMA,
        cfg.schema_registry.auto_register, Wait::until(&stop))?;
    let io = ReplayIo { input: PulseInput::new(registry), codec, wait: Wait::until(&stop) };
    let settings = Arc::new(cfg.window_settings());
    // Late pulses of windows before T1 are read up to T1 + retention (record time).
    let read_before = s.to_ms.map(|to| to.saturating_add(settings.retention_ms));
    let mut reader = PartitionsToEnd::new(cfg, &format!("{}.replay", cfg.application_id), "replay", topic, None)?;
    let partitions = crate::kafka::admin::partition_ids(cfg, topic).map_err(|e| match e {
        crate::kafka::admin::AdminError::Missing(_) => ReplayError::Setup(format!("topic {topic} does not exist")),
        e => ReplayError::Admin(e),
    })?;
    let starts = bounds::start_offsets(reader.consumer(), topic, &partitions, s.from_ms)?;
    let ends = bounds::end_offsets(reader.consumer(), topic, &partitions)?;
    let mut ranges: BTreeMap<i32, (i64, i64)> = BTreeMap::new();
    for (p, start) in &starts {
        if let (Some(start), Some(end)) = (start, ends.get(p)) {
            if start < end {
                ranges.insert(*p, (*start, *end));
            }
        }
    }
    tracing::info!(topic, ?ranges, from = s.from_ms, to = ?s.to_ms, read_before = ?read_before, output = %s.output_topic,
        "replay bounds");
    let total: u64 = ranges.values().map(|(a, b)| (b - a) as u64).sum();

    let tmp = TempDir(cfg.state_dir.join(format!("replay-{}-{}", std::process::id(), now_ms())));
    let mut store = PartitionStore::open(&tmp.0, &StoreResources::new(cfg.aggregate.state_memory_mib << 20))?;
    let mut op = WindowOperator::restore(settings, &mut store).map_err(|e| match e {
        RestoreError::Store(e) => ReplayError::Store(e),
        RestoreError::Windows(e) => ReplayError::Setup(e.to_string()),
    })?;
    op.set_cache_capacity(cfg.aggregate.open_window_cache);
    let producer = clients::tracked_producer(cfg, DeliveryTracker::default())?;
    let mut sum = ReplaySummary { partitions: ranges.len(), ..Default::default() };

    reader.assign(ranges.iter().map(|(p, (from, end))| (*p, Range { from: *from, end: Some(*end) })).collect())?;
    let mut merge: Merge<OwnedMessage> = Merge::new(ranges.keys().copied());
    let mut paused: Vec<i32> = Vec::new();
    let mut last_progress = Instant::now();
    while !merge.is_done() {
        if shutdown.load(Ordering::Acquire) {
            return Err(ReplayError::Interrupted);
        }
        if let Some(m) = reader.next(Duration::from_millis(100))? {
            let (p, offset, ts) = (m.partition(), m.offset(), m.timestamp().to_millis());
            if read_before.is_some_and(|end| ts.is_some_and(|ts| ts >= end)) {
                // Past T1 + retention: nothing more of this partition is read.
                reader.finish(p)?;
            } else {
                merge.push(p, ts.unwrap_or(i64::MIN), offset, m.detach());
                if merge.buffered(p) >= MAX_BUFFERED && !paused.contains(&p) {
                    reader.pause(p)?;
                    paused.push(p);
                }
            }
        }
        // Partitions read to their end (offset, end of partition, or T1 + retention).
        for p in reader.finished() {
            merge.finish(p);
        }
        while let Some((p, m)) = merge.pop() {
            replay_one(cfg, s, &io, &m, p, &mut op, &mut store, &producer, &mut sum)?;
            if sum.read.is_multiple_of(FLUSH_EVERY) {
                op.flush(&mut store)?;
                store.commit(None)?;
            }
        }
        for p in std::mem::take(&mut paused) {
            if merge.buffered(p) < MAX_BUFFERED / 2 {
                reader.resume(p)?;
            } else {
                paused.push(p);
            }
        }
        if last_progress.elapsed() >= s.progress_every {
            progress(sum.read, total, sum.written);
            last_progress = Instant::now();
        }
    }
    // End of the bounded input: stream time jumps to T1.
    let mut outs = Vec::new();
    op.close_all(s.to_ms.unwrap_or(i64::MAX), now_ms(), &mut store, &mut outs)?;
    emit(s, &io.codec, outs, &producer, &mut sum)?;
    clients::flush(&producer, Duration::from_secs(120))?;
    let failed = producer.context().failed();
    if failed > 0 {
        return Err(ReplayError::Delivery(failed, producer.context().last_error().unwrap_or_default()));
    }
    drop(store);
    drop(tmp);
    Ok(sum)
}

/// How a replay decodes source pulses and encodes aggregates: as the live stages do.
struct ReplayIo<'a> {
    input: PulseInput,
    codec: OutputCodec,
    wait: Wait<'a>,
}

/// One source record through stage 1's validation and stage 2's operator.
#[allow(clippy::too_many_arguments)]
fn replay_one(
    cfg: &Config,
    s: &ReplaySettings,
    io: &ReplayIo<'_>,
    m: &OwnedMessage,
    partition: i32,
    op: &mut WindowOperator,
    store: &mut PartitionStore,
    producer: &TrackedProducer,
    sum: &mut ReplaySummary,
) -> Result<(), ReplayError> {
    sum.read += 1;
    let ctx = RecordContext {
        topic: &cfg.topics.source,
        partition,
        offset: m.offset(),
        record_time_ms: m.timestamp().to_millis(),
    };
    let mut outs = Vec::new();
    let payload = m.payload().unwrap_or(&[]);
    match io.input.decode(payload, &ctx, io.wait) {
        Err(RegistryError::Interrupted) => return Err(ReplayError::Interrupted),
        Err(e) => return Err(e.into()),
        Ok(Ok(pulse)) => op.process(&pulse, now_ms(), store, &mut outs)?,
        Ok(Err(rejection)) if rejection.reason == RejectReason::RegistryUnavailable => {
            return Err(ReplayError::RegistryUnavailable { partition, offset: m.offset(), detail: rejection.detail });
        }
        // A CloudEvent: metered by the meters configured now (SPEC §10: re-metering).
        Ok(Err(_)) if crate::meter::event::is_cloud_event(payload) => match meter_record(&cfg.meters, payload, &ctx) {
            Ok(pulses) => {
                for pulse in &pulses {
                    op.process(pulse, now_ms(), store, &mut outs)?;
                }
            }
            Err(_) => sum.rejected += 1,
        },
        Ok(Err(_)) => sum.rejected += 1,
    }
    emit(s, &io.codec, outs, producer, sum)
}

/// Writes the aggregates inside [T0, T1) and counts the rest.
fn emit(
    s: &ReplaySettings,
    codec: &OutputCodec,
    outs: Vec<Output>,
    producer: &TrackedProducer,
    sum: &mut ReplaySummary,
) -> Result<(), ReplayError> {
    for out in outs {
        match out {
            Output::Aggregate { record, .. } => {
                if record.window_start < s.from_ms || s.to_ms.is_some_and(|to| record.window_end > to) {
                    sum.outside += 1;
                    continue;
                }
                let value = codec.encode(|| record.to_json(), || aggregate_to_value(&record))?;
                send_with_backpressure(producer, BaseRecord::to(&s.output_topic).key(&record.tenant_id).payload(&value))?;
                sum.written += 1;
            }
            Output::Late { .. } => sum.late += 1,
            Output::Duplicate { .. } => sum.duplicates += 1,
        }
    }
    Ok(())
}
