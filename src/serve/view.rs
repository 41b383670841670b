//! The views: local RocksDB copies of a topic (every partition, `read_committed`), one
//! record per key. Every serve replica holds all of each, as Kafka Streams holds a
//! GlobalKTable, so any replica answers any question.
//!
//! - the usage view, of `tenant.aggregated.pulses.amount`: the latest revision of each
//!   window aggregate, final or interim. Keys `a` tenant ∅ window ∅ start sku ∅ unit;
//! - the charges view, of `tenant.rated.charges`: every charge once (a re-sent charge
//!   has the same `charge_id`). Keys `c` tenant ∅ start charge_id.
//!
//! - the invoices view, of `tenant.invoices`: every invoice, credit and debit note.
//!   Keys `i` tenant ∅ period start document id, and `n` document id → that key.
//!
//! `start` is 8 big-endian bytes (sign bit flipped), so one tenant's records sort by
//! window start and a time range is one scan. The read position of each partition
//! (`o` partition) is written in the same batch as the records it covers: a restart
//! resumes there instead of reading the topic again.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::{Message, Offset, TopicPartitionList};
use rocksdb::{BlockBasedOptions, Cache, Direction, IteratorMode, Options, WriteBatch, DB};

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::codec::{AggregateInput, InputError, RecordInput};
use crate::config::Config;
use crate::kafka::clients::{self, QuietEof};
use crate::ops::memory::HeapTrimmer;
use crate::invoice::Invoice;
use crate::rate::records::Charge;
use crate::registry::{Registry, Wait};
use crate::window::WindowAggregate;

#[derive(Debug, thiserror::Error)]
pub enum ViewError {
    #[error("view at {path}: {source}")]
    Store { path: PathBuf, source: rocksdb::Error },
    #[error("view: kafka: {0}")]
    Kafka(#[from] KafkaError),
    #[error("view: {0}")]
    Setup(String),
}

/// A record a view keeps: where it is stored, and whether it replaces the one held
/// under the same key.
pub trait Viewed: Serialize + DeserializeOwned + Send + Sync + 'static {
    /// What the view is called in logs and thread names.
    const NAME: &'static str;
    fn key(&self) -> Vec<u8>;
    fn replaces(&self, held: &Self) -> bool;
    /// A second key that finds the record (written as alias → key), if any.
    fn alias(&self) -> Option<Vec<u8>> {
        None
    }
}

impl Viewed for WindowAggregate {
    const NAME: &'static str = "usage-view";
    /// A pulse's window under `a` tenant ∅ window ∅ start sku ∅ unit; a meter's window
    /// under `m` slug ∅ window ∅ subject ∅ start unit, so a meter query scans one
    /// subject's windows of one size in a time range, and usage never sees them.
    fn key(&self) -> Vec<u8> {
        if self.meter.is_some() {
            let mut k = range_prefix(METER, &[&self.product_sku, &self.window, &self.tenant_id]);
            k.extend_from_slice(&ordered(self.window_start));
            k.extend_from_slice(self.use_unit.as_bytes());
            return k;
        }
        let mut k = range_prefix(AGGREGATE, &[&self.tenant_id, &self.window]);
        k.extend_from_slice(&ordered(self.window_start));
        for (i, part) in [&self.product_sku, &self.use_unit].into_iter().enumerate() {
            if i > 0 {
                k.push(0);
            }
            k.extend_from_slice(part.as_bytes());
        }
        k
    }
    /// The latest revision wins; a re-delivered one is the same record.
    fn replaces(&self, held: &Self) -> bool {
        self.revision >= held.revision
    }
}

impl Viewed for Charge {
    const NAME: &'static str = "charges-view";
    fn key(&self) -> Vec<u8> {
        let mut k = range_prefix(CHARGE, &[&self.tenant_id]);
        k.extend_from_slice(&ordered(self.window_start));
        k.extend_from_slice(self.charge_id.as_bytes());
        k
    }
    /// A charge id names one aggregate revision's charge: a re-sent one is equal.
    fn replaces(&self, _held: &Self) -> bool {
        true
    }
}

impl Viewed for Invoice {
    const NAME: &'static str = "invoices-view";
    fn key(&self) -> Vec<u8> {
        let mut k = range_prefix(INVOICE, &[&self.tenant_id]);
        k.extend_from_slice(&ordered(self.period_start));
        k.extend_from_slice(self.invoice_id.as_bytes());
        k
    }
    /// Issued documents never change: the latest record of a key is the document.
    fn replaces(&self, _held: &Self) -> bool {
        true
    }
    fn alias(&self) -> Option<Vec<u8>> {
        Some(invoice_alias(&self.invoice_id))
    }
}

fn invoice_alias(id: &str) -> Vec<u8> {
    let mut k = vec![INVOICE_ID];
    k.extend_from_slice(id.as_bytes());
    k
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

/// A view's store and status.
pub struct View<T> {
    db: DB,
    /// The store's block cache, to report what it holds.
    cache: Cache,
    path: PathBuf,
    as_of: Mutex<AsOf>,
    /// Records read since this process started (a restart resumes, so few).
    pub records_read: std::sync::atomic::AtomicU64,
    kept: std::marker::PhantomData<fn() -> T>,
}

/// The usage view: window aggregates.
pub type UsageView = View<WindowAggregate>;
/// The charges view: charges.
pub type ChargesView = View<Charge>;
/// The invoices view: invoices and their adjustments.
pub type InvoicesView = View<Invoice>;

const AGGREGATE: u8 = b'a';
const METER: u8 = b'm';
const CHARGE: u8 = b'c';
const OFFSET: u8 = b'o';
const INVOICE: u8 = b'i';
const INVOICE_ID: u8 = b'n';

/// A time as key bytes that sort as the times do.
fn ordered(ms: i64) -> [u8; 8] {
    ((ms as u64) ^ (1 << 63)).to_be_bytes()
}

/// The prefix of every key of `kind` whose leading parts are `parts`.
fn range_prefix(kind: u8, parts: &[&str]) -> Vec<u8> {
    let mut k = vec![kind];
    for part in parts {
        k.extend_from_slice(part.as_bytes());
        k.push(0);
    }
    k
}

fn offset_key(partition: i32) -> [u8; 5] {
    let p = partition.to_be_bytes();
    [OFFSET, p[0], p[1], p[2], p[3]]
}

impl<T: Viewed> std::fmt::Debug for View<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct(T::NAME).field("path", &self.path).field("as_of", &self.as_of()).finish()
    }
}

/// The memtable size of each view's store: with two memtables per view and three views
/// (usage, charges, invoices), at most 48 MiB of serve's memory is memtables.
const VIEW_WRITE_BUFFER_BYTES: usize = 8 << 20;
/// The block cache of each view's store: 16 MiB more per view.
const VIEW_BLOCK_CACHE_BYTES: usize = 16 << 20;

impl<T: Viewed> View<T> {
    pub fn open(path: &Path) -> Result<Self, ViewError> {
        let mut opts = Options::default();
        opts.create_if_missing(true);
        // A view holds one row per window or charge; RocksDB's default 64 MiB memtables
        // (two per view) would make up most of serve's memory for no read it needs.
        opts.set_write_buffer_size(VIEW_WRITE_BUFFER_BYTES);
        opts.set_max_write_buffer_number(2);
        // The block cache is what reads fill: sized here so serve's memory has a stated
        // bound. Index blocks stay outside it (they are small, one per file); inside a
        // cache this small, scans evicted them and serve's CPU doubled under load.
        let mut table = BlockBasedOptions::default();
        let cache = Cache::new_lru_cache(VIEW_BLOCK_CACHE_BYTES);
        table.set_block_cache(&cache);
        opts.set_block_based_table_factory(&table);
        let db = DB::open(&opts, path).map_err(|source| ViewError::Store { path: path.to_owned(), source })?;
        let as_of = Mutex::new(AsOf::default());
        Ok(Self { db, cache, path: path.to_owned(), as_of, records_read: Default::default(), kept: std::marker::PhantomData })
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

    /// Applies a batch of records read from the topic, each replacing the one held
    /// under its key if it should, with the positions after them, atomically.
    pub fn apply(&self, records: Vec<T>, positions: &BTreeMap<i32, i64>) -> Result<(), ViewError> {
        let mut latest: BTreeMap<Vec<u8>, T> = BTreeMap::new();
        for r in records {
            let k = r.key();
            let newer = match latest.get(&k) {
                Some(held) => r.replaces(held),
                None => match self.db.get(&k).map_err(|e| self.store_err(e))? {
                    Some(stored) => serde_json::from_slice::<T>(&stored).map_or(true, |s| r.replaces(&s)),
                    None => true,
                },
            };
            if newer {
                latest.insert(k, r);
            }
        }
        let mut batch = WriteBatch::default();
        for (k, r) in &latest {
            let v = serde_json::to_vec(r).map_err(|e| ViewError::Setup(format!("encoding a {} record: {e}", T::NAME)))?;
            batch.put(k, v);
            if let Some(alias) = r.alias() {
                batch.put(alias, k);
            }
        }
        for (p, next) in positions {
            batch.put(offset_key(*p), next.to_be_bytes());
        }
        self.db.write(batch).map_err(|e| self.store_err(e))
    }

    /// The records under `prefix` whose key's start (the 8 bytes after the prefix)
    /// is in `[from, to)`, by start.
    fn range(&self, prefix: &[u8], from: i64, to: i64) -> Result<Vec<T>, ViewError> {
        let mut first = prefix.to_vec();
        first.extend_from_slice(&ordered(from));
        let end = ordered(to);
        let mut out = Vec::new();
        for item in self.db.iterator(IteratorMode::From(&first, Direction::Forward)) {
            let (k, v) = item.map_err(|e| self.store_err(e))?;
            if !k.starts_with(prefix) || k.get(prefix.len()..prefix.len() + 8).is_none_or(|start| start >= &end[..]) {
                break;
            }
            match serde_json::from_slice::<T>(&v) {
                Ok(r) => out.push(r),
                Err(e) => tracing::warn!("{}: an undecodable stored record skipped: {e}", T::NAME),
            }
        }
        Ok(out)
    }

    /// What the store holds in memory, by kind: memtables (bounded by the write buffer
    /// settings), the block cache (bounded by its capacity) and the table readers'
    /// index and filter blocks (outside the cache: they grow with the data on disk).
    pub fn memory(&self) -> [(&'static str, u64); 3] {
        let property = |name: &str| self.db.property_int_value(name).ok().flatten().unwrap_or(0);
        [
            ("memtables", property("rocksdb.cur-size-all-mem-tables")),
            ("block_cache", self.cache.get_usage() as u64),
            ("table_readers", property("rocksdb.estimate-table-readers-mem")),
        ]
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

impl UsageView {
    /// `tenant`'s aggregates of `window` whose start is in `[from, to)`, by start.
    pub fn windows(&self, tenant: &str, window: &str, from: i64, to: i64) -> Result<Vec<WindowAggregate>, ViewError> {
        self.range(&range_prefix(AGGREGATE, &[tenant, window]), from, to)
    }
}

impl UsageView {
    /// Meter `slug`'s windows of `window` for `subject` whose start is in `[from, to)`,
    /// by start.
    pub fn meter_windows(&self, slug: &str, window: &str, subject: &str, from: i64, to: i64) -> Result<Vec<WindowAggregate>, ViewError> {
        self.range(&range_prefix(METER, &[slug, window, subject]), from, to)
    }

    /// The subjects meter `slug` has windows of `window` for: one seek per subject (each
    /// seek skips the rest of the subject's keys).
    pub fn meter_subjects(&self, slug: &str, window: &str) -> Result<Vec<String>, ViewError> {
        let prefix = range_prefix(METER, &[slug, window]);
        let mut subjects = Vec::new();
        let mut seek = prefix.clone();
        loop {
            let Some(item) = self.db.iterator(IteratorMode::From(&seek, Direction::Forward)).next() else { break };
            let (k, _) = item.map_err(|e| self.store_err(e))?;
            let Some(rest) = k.strip_prefix(prefix.as_slice()) else { break };
            let Some(end) = rest.iter().position(|b| *b == 0) else { break };
            subjects.push(String::from_utf8_lossy(&rest[..end]).into_owned());
            // `subject` then 0x01 sorts after every `subject ∅ …` key and before the next subject.
            seek.truncate(prefix.len());
            seek.extend_from_slice(&rest[..end]);
            seek.push(1);
        }
        Ok(subjects)
    }
}

impl ChargesView {
    /// `tenant`'s charges of windows whose start is in `[from, to)`, by start.
    pub fn charges(&self, tenant: &str, from: i64, to: i64) -> Result<Vec<Charge>, ViewError> {
        self.range(&range_prefix(CHARGE, &[tenant]), from, to)
    }
}

impl InvoicesView {
    /// `tenant`'s documents of periods starting in `[from, to)`, by period start.
    pub fn invoices(&self, tenant: &str, from: i64, to: i64) -> Result<Vec<Invoice>, ViewError> {
        self.range(&range_prefix(INVOICE, &[tenant]), from, to)
    }

    /// The document `id`, if the view holds it.
    pub fn get(&self, id: &str) -> Result<Option<Invoice>, ViewError> {
        let Some(key) = self.db.get(invoice_alias(id)).map_err(|e| self.store_err(e))? else { return Ok(None) };
        match self.db.get(key).map_err(|e| self.store_err(e))? {
            Some(v) => Ok(serde_json::from_slice(&v).ok()),
            None => Ok(None),
        }
    }
}

/// How often the lag is measured.
const LAG_EVERY: Duration = Duration::from_millis(500);

/// Reads `topic` into `view` with `input` until `stop`, on a thread of its own.
pub fn follow<T: Viewed>(
    cfg: &Config,
    topic: &str,
    view: Arc<View<T>>,
    input: RecordInput<T>,
    stop: Arc<AtomicBool>,
) -> Result<std::thread::JoinHandle<()>, ViewError> {
    let topic = topic.to_owned();
    // A prompt reader: a correction is in the view well within SPEC §8's second.
    let config = clients::prompt_reader(cfg, &format!("{}.{}", cfg.application_id, T::NAME));
    let consumer: BaseConsumer<QuietEof> = config.create_with_context(QuietEof { reader: T::NAME })?;
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
    tracing::info!(%topic, ?resume, "{} resumes from its stored positions", T::NAME);
    std::thread::Builder::new()
        .name(T::NAME.into())
        .spawn(move || {
            let mut follower = Follower { consumer, topic, partitions, positions: resume, at_end: Default::default(), last_lag: None };
            // The view's RocksDB flushes and compactions free memory in glibc's arenas
            // that serve would otherwise keep (as stage 2's store does: ops::memory).
            let mut trimmer = HeapTrimmer::default();
            while !stop.load(Ordering::Acquire) {
                if let Err(e) = follower.step(&view, &input, &stop) {
                    tracing::error!("{e}; retrying in 1 s");
                    std::thread::sleep(Duration::from_secs(1));
                }
                trimmer.maybe_trim();
            }
        })
        .map_err(|e| ViewError::Setup(format!("starting the {}: {e}", T::NAME)))
}

/// The usage view's decoder: aggregates in JSON or Avro, as stage 2 writes them.
pub fn aggregate_input(cfg: &Config) -> Result<AggregateInput, ViewError> {
    let registry = Registry::from_config(&cfg.schema_registry).map_err(|e| ViewError::Setup(e.to_string()))?.map(Arc::new);
    Ok(AggregateInput::aggregates(registry))
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
    fn step<T: Viewed>(&mut self, view: &View<T>, input: &RecordInput<T>, stop: &AtomicBool) -> Result<(), ViewError> {
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
                            tracing::error!(partition = msg.partition(), offset = msg.offset(), "{}: an undecodable record skipped: {e}", T::NAME);
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
                Some(Err(e)) => tracing::warn!("{}: {e}", T::NAME),
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
