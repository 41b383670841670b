//! The usage view: a local RocksDB copy of `tenant.aggregated.pulses.amount` (every
//! partition, `read_committed`), holding the latest revision of each window aggregate,
//! final or interim. Every serve replica holds all of it, as Kafka Streams holds a
//! GlobalKTable, so any replica answers any usage or quota question.
//!
//! Keys sort for the queries: `a` tenant ∅ window ∅ start ∅ sku ∅ unit, with `start`
//! as 8 big-endian bytes (sign bit flipped), so one tenant's windows of one size are
//! one range in start order. The read position of each partition (`o` partition) is
//! written in the same batch as the records it covers: a restart resumes there
//! instead of reading the topic again.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::{Message, Offset, TopicPartitionList};
use rocksdb::{Direction, IteratorMode, Options, WriteBatch, DB};

use crate::codec::{AggregateInput, InputError};
use crate::config::Config;
use crate::kafka::clients::{self, QuietEof};
use crate::registry::{Registry, Wait};
use crate::window::WindowAggregate;

#[derive(Debug, thiserror::Error)]
pub enum ViewError {
    #[error("usage view at {path}: {source}")]
    Store { path: PathBuf, source: rocksdb::Error },
    #[error("usage view: kafka: {0}")]
    Kafka(#[from] KafkaError),
    #[error("usage view: {0}")]
    Setup(String),
}

impl crate::kafka::startup::Retriable for ViewError {
    /// A broker not up yet, or an aggregates topic just created and not yet in the
    /// metadata; not a local store that cannot open.
    fn is_retriable(&self) -> bool {
        match self {
            Self::Kafka(e) => e.is_retriable(),
            Self::Setup(_) => true,
            Self::Store { .. } => false,
        }
    }
}

/// How current the view is: records it has yet to read, and when that was measured.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AsOf {
    pub lag: i64,
    pub updated_at_ms: i64,
    /// It has read every partition to the end it had when the view started.
    pub caught_up: bool,
}

/// The view's store and status.
pub struct UsageView {
    db: DB,
    path: PathBuf,
    as_of: Mutex<AsOf>,
    /// Records read since this process started (a restart resumes, so few).
    pub records_read: std::sync::atomic::AtomicU64,
}

const AGGREGATE: u8 = b'a';
const OFFSET: u8 = b'o';

/// The store key of `a`'s window.
fn key(tenant: &str, window: &str, start: i64, sku: &str, unit: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(tenant.len() + window.len() + sku.len() + unit.len() + 14);
    k.push(AGGREGATE);
    k.extend_from_slice(tenant.as_bytes());
    k.push(0);
    k.extend_from_slice(window.as_bytes());
    k.push(0);
    k.extend_from_slice(&((start as u64) ^ (1 << 63)).to_be_bytes());
    k.extend_from_slice(sku.as_bytes());
    k.push(0);
    k.extend_from_slice(unit.as_bytes());
    k
}

/// The prefix of every key of `tenant`'s `window` windows.
fn range_prefix(tenant: &str, window: &str) -> Vec<u8> {
    let mut k = vec![AGGREGATE];
    k.extend_from_slice(tenant.as_bytes());
    k.push(0);
    k.extend_from_slice(window.as_bytes());
    k.push(0);
    k
}

fn offset_key(partition: i32) -> [u8; 5] {
    let p = partition.to_be_bytes();
    [OFFSET, p[0], p[1], p[2], p[3]]
}

impl std::fmt::Debug for UsageView {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UsageView").field("path", &self.path).field("as_of", &self.as_of()).finish()
    }
}

impl UsageView {
    pub fn open(path: &Path) -> Result<Self, ViewError> {
        let mut opts = Options::default();
        opts.create_if_missing(true);
        let db = DB::open(&opts, path).map_err(|source| ViewError::Store { path: path.to_owned(), source })?;
        Ok(Self { db, path: path.to_owned(), as_of: Mutex::new(AsOf::default()), records_read: Default::default() })
    }

    fn store_err(&self, source: rocksdb::Error) -> ViewError {
        ViewError::Store { path: self.path.clone(), source }
    }

    /// Where each partition's reading resumes.
    pub fn positions(&self) -> Result<BTreeMap<i32, i64>, ViewError> {
        let mut out = BTreeMap::new();
        for item in self.db.iterator(IteratorMode::From(&[OFFSET], Direction::Forward)) {
            let (k, v) = item.map_err(|e| self.store_err(e))?;
            if k.first() != Some(&OFFSET) {
                break;
            }
            if let (Ok(p), Ok(next)) = (<[u8; 4]>::try_from(&k[1..]), <[u8; 8]>::try_from(&v[..])) {
                out.insert(i32::from_be_bytes(p), i64::from_be_bytes(next));
            }
        }
        Ok(out)
    }

    /// Applies a batch of aggregates read from the topic, keeping the latest revision
    /// of each window, with the positions after them, atomically.
    pub fn apply(&self, aggregates: Vec<WindowAggregate>, positions: &BTreeMap<i32, i64>) -> Result<(), ViewError> {
        let mut latest: BTreeMap<Vec<u8>, WindowAggregate> = BTreeMap::new();
        for a in aggregates {
            let k = key(&a.tenant_id, &a.window, a.window_start, &a.product_sku, &a.use_unit);
            let newer = match latest.get(&k) {
                Some(held) => a.revision >= held.revision,
                None => match self.db.get(&k).map_err(|e| self.store_err(e))? {
                    Some(stored) => serde_json::from_slice::<WindowAggregate>(&stored).map_or(true, |s| a.revision >= s.revision),
                    None => true,
                },
            };
            if newer {
                latest.insert(k, a);
            }
        }
        let mut batch = WriteBatch::default();
        for (k, a) in &latest {
            let v = serde_json::to_vec(a).map_err(|e| ViewError::Setup(format!("encoding an aggregate: {e}")))?;
            batch.put(k, v);
        }
        for (p, next) in positions {
            batch.put(offset_key(*p), next.to_be_bytes());
        }
        self.db.write(batch).map_err(|e| self.store_err(e))
    }

    /// `tenant`'s aggregates of `window` whose start is in `[from, to)`, by start.
    pub fn windows(&self, tenant: &str, window: &str, from: i64, to: i64) -> Result<Vec<WindowAggregate>, ViewError> {
        let prefix = range_prefix(tenant, window);
        let mut first = prefix.clone();
        first.extend_from_slice(&((from as u64) ^ (1 << 63)).to_be_bytes());
        let mut out = Vec::new();
        for item in self.db.iterator(IteratorMode::From(&first, Direction::Forward)) {
            let (k, v) = item.map_err(|e| self.store_err(e))?;
            if !k.starts_with(&prefix) {
                break;
            }
            match serde_json::from_slice::<WindowAggregate>(&v) {
                Ok(a) if a.window_start >= to => break,
                Ok(a) => out.push(a),
                Err(e) => tracing::warn!("usage view: an undecodable stored aggregate skipped: {e}"),
            }
        }
        Ok(out)
    }

    pub fn as_of(&self) -> AsOf {
        self.as_of.lock().map(|a| *a).unwrap_or_default()
    }

    fn set_as_of(&self, lag: i64, caught_up: bool) {
        if let Ok(mut a) = self.as_of.lock() {
            *a = AsOf { lag, updated_at_ms: crate::pulse::time::now_ms(), caught_up: a.caught_up || caught_up };
        }
    }
}

/// How often the lag is measured.
const LAG_EVERY: Duration = Duration::from_millis(500);

/// Reads the aggregated topic into `view` until `stop`, on a thread of its own.
pub fn follow(cfg: &Config, view: Arc<UsageView>, stop: Arc<AtomicBool>) -> Result<std::thread::JoinHandle<()>, ViewError> {
    let topic = cfg.topics.aggregated.clone();
    let mut config = clients::reader(cfg, &format!("{}.usage-view", cfg.application_id));
    // A fetch parked at the broker may wait out fetch.wait.max.ms (librdkafka: 500 ms)
    // before a committed transaction's records reach a read_committed reader: with
    // 50 ms, a correction is in the view well within SPEC §8's second.
    config.set("fetch.wait.max.ms", "50");
    let consumer: BaseConsumer<QuietEof> = config.create_with_context(QuietEof { reader: "usage-view" })?;
    let metadata = consumer.fetch_metadata(Some(&topic), Duration::from_secs(30))?;
    let partitions: Vec<i32> = metadata.topics().iter().flat_map(|t| t.partitions()).map(|p| p.id()).collect();
    if partitions.is_empty() {
        return Err(ViewError::Setup(format!("topic {topic} has no partitions (does it exist?)")));
    }
    let resume = view.positions()?;
    let mut tpl = TopicPartitionList::new();
    for p in &partitions {
        let from = resume.get(p).map_or(Offset::Beginning, |o| Offset::Offset(*o));
        tpl.add_partition_offset(&topic, *p, from)?;
    }
    consumer.assign(&tpl)?;
    tracing::info!(%topic, ?resume, "usage view resumes from its stored positions");
    let registry = Registry::from_config(&cfg.schema_registry).map_err(|e| ViewError::Setup(e.to_string()))?.map(Arc::new);
    let input = AggregateInput::aggregates(registry);
    std::thread::Builder::new()
        .name("usage-view".into())
        .spawn(move || {
            let mut follower = Follower { consumer, topic, partitions, positions: resume, at_end: Default::default(), last_lag: None };
            while !stop.load(Ordering::Acquire) {
                if let Err(e) = follower.step(&view, &input, &stop) {
                    tracing::error!("{e}; retrying in 1 s");
                    std::thread::sleep(Duration::from_secs(1));
                }
            }
        })
        .map_err(|e| ViewError::Setup(format!("starting the usage view: {e}")))
}

struct Follower {
    consumer: BaseConsumer<QuietEof>,
    topic: String,
    partitions: Vec<i32>,
    positions: BTreeMap<i32, i64>,
    at_end: std::collections::BTreeSet<i32>,
    last_lag: Option<Instant>,
}

impl Follower {
    /// Reads what is there (up to a batch), applies it, and now and then measures the lag.
    fn step(&mut self, view: &UsageView, input: &AggregateInput, stop: &AtomicBool) -> Result<(), ViewError> {
        let mut batch = Vec::new();
        let mut moved = BTreeMap::new();
        let mut read = 0;
        // Waits for the first record only: what has arrived is applied at once.
        let mut wait = Duration::from_millis(50);
        while batch.len() < 5_000 {
            let polled = self.consumer.poll(std::mem::replace(&mut wait, Duration::ZERO));
            match polled {
                Some(Ok(msg)) => {
                    read += 1;
                    moved.insert(msg.partition(), msg.offset() + 1);
                    let Some(payload) = msg.payload() else { continue };
                    let stopping = || stop.load(Ordering::Acquire);
                    match input.decode(payload, Wait::until(&stopping)) {
                        Ok(a) => batch.push(a),
                        Err(InputError::Invalid(e)) => {
                            tracing::error!(partition = msg.partition(), offset = msg.offset(), "usage view: not an aggregate, skipped: {e}");
                        }
                        // Stay on this record: undo what this batch read of its partition.
                        Err(InputError::Registry(e)) => {
                            moved.insert(msg.partition(), msg.offset());
                            self.consumer.seek(&self.topic, msg.partition(), Offset::Offset(msg.offset()), Duration::from_secs(10))?;
                            view.apply(batch, &moved)?;
                            self.positions.extend(moved);
                            return Err(ViewError::Setup(format!("schema registry: {e}")));
                        }
                    }
                }
                Some(Err(KafkaError::PartitionEOF(p))) => {
                    self.at_end.insert(p);
                }
                Some(Err(e)) => tracing::warn!("usage view: {e}"),
                None => break,
            }
        }
        view.records_read.fetch_add(read, Ordering::Relaxed);
        if !moved.is_empty() {
            view.apply(batch, &moved)?;
            self.positions.extend(moved);
        }
        if self.last_lag.is_none_or(|t| t.elapsed() >= LAG_EVERY) {
            self.last_lag = Some(Instant::now());
            // The consumer's position, not the offset after the last record: it also
            // steps over transaction markers, which are never handed out.
            let position = self.consumer.position()?;
            let mut lag = 0;
            for p in &self.partitions {
                // A read_committed client is told the last stable offset.
                let (_, end) = self.consumer.fetch_watermarks(&self.topic, *p, Duration::from_secs(5))?;
                let at = match position.find_partition(&self.topic, *p).map(|e| e.offset()) {
                    Some(Offset::Offset(o)) => o,
                    _ => self.positions.get(p).copied().unwrap_or(0),
                };
                lag += (end - at).max(0);
            }
            view.set_as_of(lag, self.at_end.len() >= self.partitions.len());
        }
        Ok(())
    }
}
