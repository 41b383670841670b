//! The RocksDB [`WindowStore`]. Writes of a batch are kept in an in-memory overlay (so
//! reads within the batch see them) and reach disk in one atomic, key-ordered
//! `WriteBatch` at [`PartitionStore::commit`], which the stage calls once its
//! transaction committed.
//!
//! Key layout (one byte of prefix, then big-endian fields so keys sort by time):
//! - `m`                                 → watermark (JSON)
//! - `w`                                 → window slot table (JSON; see [`crate::window::slots`])
//! - `o` window start tenant\0sku\0unit   → open window state (JSON)
//! - `c` end window start tenant\0sku\0unit → closed window within retention (JSON)
//! - `d` tenant\0pulse_id                 → stream time it was counted at (sortable, 8 bytes)
//! - `x` at tenant\0pulse_id              → (empty) expiry index of `d`
//! - `k`                                 → next changelog offset this store reflects
//! - `l` key                             → an entry of `pulses rate`'s ledger (its own
//!   key layout, see `rate::ledger`; [`PartitionStore::entry`])
//!
//! Every committed write except `x` (derived from `d`) and `k` is also a record of the
//! stage's changelog topic ([`PartitionStore::changes`]), so another replica can
//! rebuild the store ([`crate::state::changelog`]). `k` is written in the same atomic
//! batch as the data, so a store always knows exactly which changelog tail it lacks.
//!
//! Identifiers never contain NUL (validation allows `[A-Za-z0-9._:-]` only).

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rocksdb::{Cache, IteratorMode, Options, ReadOptions, WriteBatch, WriteBufferManager, DB};

use crate::window::aggregate::GroupKey;
use crate::window::slots::WindowId;
use crate::window::store::{Bucket, WindowKey, WindowState, WindowStore};
use crate::window::watermark::Watermark;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("rocksdb at {path}: {source}")]
    Rocks { path: PathBuf, source: rocksdb::Error },
    #[error("corrupt state at {path}: {detail}")]
    Corrupt { path: PathBuf, detail: String },
    /// A value could not be encoded: the batch holding it must not commit.
    #[error("cannot encode {what} for the state at {path}: {detail}")]
    Encode { path: PathBuf, what: &'static str, detail: String },
}

/// Memory shared by all partition stores of a process, so RSS is bounded by
/// configuration rather than by the number of assigned partitions.
#[derive(Clone)]
pub struct StoreResources {
    cache: Cache,
    write_buffers: Arc<WriteBufferManager>,
}

impl StoreResources {
    /// One budget of `memory_bytes` for the block cache, index and filter blocks and
    /// all memtables (charged to the cache), so state memory does not grow with the
    /// amount of data on disk.
    pub fn new(memory_bytes: usize) -> Self {
        let cache = Cache::new_lru_cache(memory_bytes);
        let write_buffers =
            Arc::new(WriteBufferManager::new_write_buffer_manager_with_cache(memory_bytes / 4, false, cache.clone()));
        Self { cache, write_buffers }
    }
}

/// The state store of one input partition.
pub struct PartitionStore {
    db: DB,
    path: PathBuf,
    /// Writes of the current batch, the last of each key: `None` is a delete. The
    /// batch written at commit is built from it.
    overlay: HashMap<Vec<u8>, Option<Vec<u8>>>,
    /// The open-window keys among them, in order, for reading a bucket's range.
    overlay_open: BTreeSet<Vec<u8>>,
    /// Closed windows and dedupe entries up to these bounds are already purged, so
    /// purging never rescans tombstones.
    purged_closed: Option<i64>,
    expired_seen: Option<i64>,
    /// The changelog position the store reflects (read at open, kept by `commit`), so
    /// unchanged positions are not rewritten.
    position: Option<i64>,
}

impl PartitionStore {
    pub fn open(path: &Path, resources: &StoreResources) -> Result<Self, StoreError> {
        std::fs::create_dir_all(path).map_err(|e| StoreError::Corrupt { path: path.to_owned(), detail: e.to_string() })?;
        let mut opts = Options::default();
        opts.create_if_missing(true);
        opts.set_write_buffer_manager(&resources.write_buffers);
        opts.set_write_buffer_size(16 << 20);
        opts.set_compression_type(rocksdb::DBCompressionType::Lz4);
        // Compaction reads each input file with this readahead, outside the budgeted
        // cache; RocksDB's 2 MiB default made every compaction a burst of RSS.
        opts.set_compaction_readahead_size(256 << 10);
        // Most dedupe lookups are for a pulse_id never seen: a bloom filter over the
        // memtable answers them without walking its skip list (about 6% of stage 2's CPU).
        opts.set_memtable_whole_key_filtering(true);
        opts.set_memtable_prefix_bloom_ratio(0.1);
        let mut block = rocksdb::BlockBasedOptions::default();
        block.set_block_cache(&resources.cache);
        block.set_bloom_filter(10.0, false);
        // Index and filter blocks live in the (bounded) cache, not beside it, and are
        // partitioned: a lookup loads one small partition, not a whole file's filter
        // (whole-file filters thrashed the cache and re-read gigabytes per second).
        block.set_cache_index_and_filter_blocks(true);
        block.set_pin_l0_filter_and_index_blocks_in_cache(true);
        block.set_index_type(rocksdb::BlockBasedIndexType::TwoLevelIndexSearch);
        block.set_partition_filters(true);
        block.set_metadata_block_size(4096);
        block.set_pin_top_level_index_and_filter(true);
        opts.set_block_based_table_factory(&block);
        let db = DB::open(&opts, path).map_err(|source| StoreError::Rocks { path: path.to_owned(), source })?;
        let position = match db.get(POSITION_KEY).map_err(|source| StoreError::Rocks { path: path.to_owned(), source })? {
            None => None,
            Some(b) => Some(unsortable(&b).ok_or_else(|| StoreError::Corrupt {
                path: path.to_owned(),
                detail: "unreadable changelog position".into(),
            })?),
        };
        Ok(Self {
            db,
            path: path.to_owned(),
            overlay: HashMap::new(),
            overlay_open: BTreeSet::new(),
            purged_closed: None,
            expired_seen: None,
            position,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The writes of the current batch as changelog records (key, value; `None` is a
    /// tombstone): the last write of each key, without derived keys.
    pub fn changes(&self) -> impl Iterator<Item = (&[u8], Option<&[u8]>)> {
        self.overlay.iter().filter(|(k, _)| k.first() != Some(&b'x')).map(|(k, v)| (k.as_slice(), v.as_deref()))
    }

    /// The changelog offset this store has applied up to (exclusive), if any.
    pub fn changelog_position(&self) -> Option<i64> {
        self.position
    }

    /// Writes the buffered batch atomically, with the changelog offset it brings the
    /// store to (when its changes went to a changelog). Not fsynced per batch: after a
    /// machine crash the WAL plus the changelog tail after the recorded position (read
    /// on the next open) restore the state.
    pub fn commit(&mut self, changelog_next: Option<i64>) -> Result<(), StoreError> {
        let moved = changelog_next.is_some() && changelog_next != self.position;
        if !moved && self.overlay.is_empty() {
            return Ok(());
        }
        // In key order: RocksDB's memtable inserts keys that follow the previous one
        // without searching its skip list again, and dedupe ids are random; inserted as
        // they came, the write took most of stage 2's commit (docs/performance.md).
        let mut writes: Vec<(&Vec<u8>, &Option<Vec<u8>>)> = self.overlay.iter().collect();
        writes.sort_unstable_by(|a, b| a.0.cmp(b.0));
        let mut batch = WriteBatch::default();
        for (key, value) in writes {
            match value {
                Some(v) => batch.put(key, v),
                None => batch.delete(key),
            }
        }
        if let (true, Some(next)) = (moved, changelog_next) {
            batch.put(POSITION_KEY, sortable(next));
        }
        self.db.write(batch).map_err(|e| self.rocks(e))?;
        if moved {
            self.position = changelog_next;
        }
        self.overlay.clear();
        self.overlay_open.clear();
        Ok(())
    }

    /// Applies one changelog record (from [`Self::changes`] of this partition's
    /// previous owner) to the current batch, maintaining the derived `x` index.
    pub fn apply_change(&mut self, key: &[u8], value: Option<&[u8]>) -> Result<(), StoreError> {
        match key.first() {
            Some(b'd') => {
                // The value is the sortable stream time the id was counted at; anything
                // else would make a malformed expiry key.
                if value.is_some_and(|at| at.len() != 8) {
                    return Err(self.corrupt("changelog dedupe record whose value is not 8 bytes"));
                }
                let old = self.get(key)?;
                if let Some(old) = old.as_deref() {
                    if value != Some(old) {
                        self.delete(expiry_key_from_seen(key, old));
                    }
                }
                match value {
                    Some(at) => {
                        self.put(expiry_key_from_seen(key, at), Vec::new());
                        self.put(key.to_vec(), at.to_vec());
                    }
                    None => self.delete(key.to_vec()),
                }
            }
            Some(&(b'm' | b'w' | b'o' | b'c' | LEDGER)) => match value {
                Some(v) => self.put(key.to_vec(), v.to_vec()),
                None => self.delete(key.to_vec()),
            },
            _ => return Err(self.corrupt(format!("changelog record with an unknown key {:?}", String::from_utf8_lossy(key)))),
        }
        Ok(())
    }

    /// The ledger entry `key` (see the key layout), with this batch's writes.
    pub fn entry(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        self.get(&ledger_key(key))
    }

    /// Writes the ledger entry `key` into the current batch.
    pub fn put_entry(&mut self, key: &[u8], value: Vec<u8>) {
        self.put(ledger_key(key), value);
    }

    /// Where this store's memory goes, from RocksDB's own accounting (bytes): the
    /// block cache (shared by all stores), memtables, and table readers (index and
    /// filter blocks held outside the cache).
    pub fn memory_report(&self) -> String {
        let prop = |name: &str| self.db.property_int_value(name).ok().flatten().unwrap_or(0) >> 20;
        format!(
            "block cache {} MiB (pinned {} MiB), memtables {} MiB, table readers {} MiB, live SST {} MiB",
            prop("rocksdb.block-cache-usage"),
            prop("rocksdb.block-cache-pinned-usage"),
            prop("rocksdb.cur-size-all-mem-tables"),
            prop("rocksdb.estimate-table-readers-mem"),
            prop("rocksdb.live-sst-files-size"),
        )
    }

    /// Re-writes `key`'s current value (or its absence) into the current batch, so the
    /// next commit sends it to the changelog again, overriding uncommitted records of
    /// the key that a reader of the changelog might otherwise apply.
    pub fn rewrite(&mut self, key: &[u8]) -> Result<(), StoreError> {
        match self.get(key)? {
            Some(v) => self.put(key.to_vec(), v),
            None => self.delete(key.to_vec()),
        }
        Ok(())
    }

    /// Writes a consistent snapshot of the committed store to `dest` (which must not
    /// exist): hard links of the SST files plus a fresh manifest, RocksDB's checkpoint.
    pub fn snapshot(&self, dest: &Path) -> Result<(), StoreError> {
        let cp = rocksdb::checkpoint::Checkpoint::new(&self.db).map_err(|e| self.rocks(e))?;
        cp.create_checkpoint(dest).map_err(|e| self.rocks(e))
    }

    fn rocks(&self, source: rocksdb::Error) -> StoreError {
        StoreError::Rocks { path: self.path.clone(), source }
    }

    fn corrupt(&self, detail: impl Into<String>) -> StoreError {
        StoreError::Corrupt { path: self.path.clone(), detail: detail.into() }
    }

    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        if let Some(v) = self.overlay.get(key) {
            return Ok(v.clone());
        }
        self.db.get(key).map_err(|e| self.rocks(e))
    }

    fn put(&mut self, key: Vec<u8>, value: Vec<u8>) {
        self.note_open(&key);
        self.overlay.insert(key, Some(value));
    }

    fn delete(&mut self, key: Vec<u8>) {
        self.note_open(&key);
        self.overlay.insert(key, None);
    }

    fn note_open(&mut self, key: &[u8]) {
        if key.first() == Some(&b'o') && !self.overlay_open.contains(key) {
            self.overlay_open.insert(key.to_vec());
        }
    }

    /// Visits the keys in `[from, to)` with their values as the current batch has
    /// them (committed keys it changed are skipped or replaced), in no particular order.
    /// Only open-window keys are tracked that way, so the span must hold only those.
    fn visit_open_span(&self, from: Vec<u8>, to: Vec<u8>, mut visit: impl FnMut(&[u8], &[u8]) -> Result<(), StoreError>) -> Result<(), StoreError> {
        // Committed keys the batch wrote are visited from the batch below.
        self.for_each_committed(&from, &to, |k, v| if self.overlay_open.contains(k) { Ok(()) } else { visit(k, v) })?;
        for k in self.overlay_open.range(from..to) {
            if let Some(Some(v)) = self.overlay.get(k) {
                visit(k, v)?;
            }
        }
        Ok(())
    }

    /// Visits the committed keys in `[from, to)` with their values, in key order.
    fn for_each_committed(&self, from: &[u8], to: &[u8], mut visit: impl FnMut(&[u8], &[u8]) -> Result<(), StoreError>) -> Result<(), StoreError> {
        let mut ro = ReadOptions::default();
        ro.set_iterate_lower_bound(from.to_vec());
        ro.set_iterate_upper_bound(to.to_vec());
        for item in self.db.iterator_opt(IteratorMode::Start, ro) {
            let (k, v) = item.map_err(|e| self.rocks(e))?;
            visit(&k, &v)?;
        }
        Ok(())
    }

    /// The keys in `[from, to)`, committed or written by the current batch (a key may
    /// appear twice; one the batch deleted may still appear): what to delete there.
    fn keys_in_span(&self, from: &[u8], to: &[u8]) -> Result<Vec<Vec<u8>>, StoreError> {
        let mut keys = Vec::new();
        self.for_each_committed(from, to, |k, _| {
            keys.push(k.to_vec());
            Ok(())
        })?;
        let in_span = |k: &[u8]| k >= from && k < to;
        keys.extend(self.overlay.iter().filter(|(k, v)| v.is_some() && in_span(k)).map(|(k, _)| k.clone()));
        Ok(keys)
    }

    /// Deletes every key in `[from, to)`, on disk and in the current batch.
    fn delete_span(&mut self, from: Vec<u8>, to: Vec<u8>) -> Result<(), StoreError> {
        for k in self.keys_in_span(&from, &to)? {
            self.delete(k);
        }
        Ok(())
    }

    /// Whether the current batch deletes an open window of `bucket`.
    fn batch_deletes_in(&self, bucket: Bucket) -> bool {
        let from = open_bucket_prefix(bucket);
        let Some(to) = after_prefix(&from) else { return true };
        self.overlay_open.range(from..to).any(|k| matches!(self.overlay.get(k), Some(None)))
    }

    /// Whether `bucket` holds an open window, as the current batch has it.
    fn has_open_window_in(&self, bucket: Bucket) -> Result<bool, StoreError> {
        let from = open_bucket_prefix(bucket);
        let to = after_prefix(&from).ok_or_else(|| self.corrupt("open-window bucket at the end of the key space"))?;
        let mut any = false;
        self.visit_open_span(from, to, |_, _| {
            any = true;
            Ok(())
        })?;
        Ok(any)
    }

    fn decode_state(&self, bytes: &[u8]) -> Result<WindowState, StoreError> {
        serde_json::from_slice(bytes).map_err(|e| self.corrupt(format!("window state: {e}")))
    }

    /// Puts `value` as JSON, or fails the batch: never an empty or partial value.
    fn put_json(&mut self, key: Vec<u8>, what: &'static str, value: &impl serde::Serialize) -> Result<(), StoreError> {
        let bytes = serde_json::to_vec(value)
            .map_err(|e| StoreError::Encode { path: self.path.clone(), what, detail: e.to_string() })?;
        self.put(key, bytes);
        Ok(())
    }
}

/// Big-endian encoding of an i64 that sorts like the number (sign bit flipped).
fn sortable(v: i64) -> [u8; 8] {
    ((v as u64) ^ (1 << 63)).to_be_bytes()
}

fn unsortable(b: &[u8]) -> Option<i64> {
    Some((u64::from_be_bytes(b.get(..8)?.try_into().ok()?) ^ (1 << 63)) as i64)
}

fn push_group(k: &mut Vec<u8>, g: &GroupKey) {
    k.extend_from_slice(g.tenant_id().as_bytes());
    k.push(0);
    k.extend_from_slice(g.product_sku().as_bytes());
    k.push(0);
    k.extend_from_slice(g.use_unit().as_bytes());
}

fn open_key(w: &WindowKey) -> Vec<u8> {
    let mut k = open_bucket_prefix(w.bucket());
    push_group(&mut k, &w.key);
    k
}

/// `o` window start end: the prefix every open-window key of `b` shares.
fn open_bucket_prefix(b: Bucket) -> Vec<u8> {
    let mut k = Vec::with_capacity(64);
    k.push(b'o');
    k.extend_from_slice(&b.window.to_be_bytes());
    k.extend_from_slice(&sortable(b.start));
    k.extend_from_slice(&sortable(b.end));
    k
}

/// The bucket of an `o` key.
fn parse_open_bucket(k: &[u8]) -> Option<Bucket> {
    let window = u16::from_be_bytes(k.get(1..3)?.try_into().ok()?);
    let start = unsortable(k.get(3..11)?)?;
    let end = unsortable(k.get(11..19)?)?;
    Some(Bucket { end, window, start })
}

/// The first key after every key starting with `prefix` (none: no such key).
fn after_prefix(prefix: &[u8]) -> Option<Vec<u8>> {
    let mut k = prefix.to_vec();
    while let Some(last) = k.pop() {
        if last < u8::MAX {
            k.push(last + 1);
            return Some(k);
        }
    }
    None
}

fn closed_key(w: &WindowKey) -> Vec<u8> {
    let mut k = Vec::with_capacity(64);
    k.push(b'c');
    k.extend_from_slice(&sortable(w.end));
    k.extend_from_slice(&w.window.to_be_bytes());
    k.extend_from_slice(&sortable(w.start));
    push_group(&mut k, &w.key);
    k
}

fn seen_key(tenant: &str, pulse_id: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(2 + tenant.len() + pulse_id.len());
    k.push(b'd');
    k.extend_from_slice(tenant.as_bytes());
    k.push(0);
    k.extend_from_slice(pulse_id.as_bytes());
    k
}

/// The `x` key of a `d` key (`d` tenant\0pulse_id) whose value is the sortable `at`.
fn expiry_key_from_seen(seen: &[u8], at: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(seen.len() + at.len());
    k.push(b'x');
    k.extend_from_slice(at);
    k.extend_from_slice(&seen[1..]);
    k
}

fn expiry_key(at: i64, tenant: &str, pulse_id: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(10 + tenant.len() + pulse_id.len());
    k.push(b'x');
    k.extend_from_slice(&sortable(at));
    k.extend_from_slice(tenant.as_bytes());
    k.push(0);
    k.extend_from_slice(pulse_id.as_bytes());
    k
}

fn prefixed_time(prefix: u8, t: i64) -> Vec<u8> {
    let mut k = vec![prefix];
    k.extend_from_slice(&sortable(t));
    k
}

/// Parses an `o` key back into its window key.
fn parse_open_key(k: &[u8]) -> Option<WindowKey> {
    let bucket = parse_open_bucket(k)?;
    let mut parts = k.get(19..)?.split(|b| *b == 0).map(|p| String::from_utf8(p.to_vec()).ok());
    let key = GroupKey::new(parts.next()??, parts.next()??, parts.next()??);
    Some(WindowKey::new(bucket, Arc::new(key)))
}

const WATERMARK_KEY: &[u8] = b"m";
const WINDOW_IDS_KEY: &[u8] = b"w";
const POSITION_KEY: &[u8] = b"k";
/// The prefix of ledger entries.
const LEDGER: u8 = b'l';

fn ledger_key(key: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(key.len() + 1);
    k.push(LEDGER);
    k.extend_from_slice(key);
    k
}

impl WindowStore for PartitionStore {
    type Error = StoreError;

    fn load_watermark(&mut self) -> Result<Option<Watermark>, StoreError> {
        match self.get(WATERMARK_KEY)? {
            None => Ok(None),
            Some(b) => serde_json::from_slice(&b).map(Some).map_err(|e| self.corrupt(format!("watermark: {e}"))),
        }
    }

    fn put_watermark(&mut self, w: &Watermark) -> Result<(), StoreError> {
        self.put_json(WATERMARK_KEY.to_vec(), "the watermark", w)
    }

    fn load_window_ids(&mut self) -> Result<Option<Vec<WindowId>>, StoreError> {
        match self.get(WINDOW_IDS_KEY)? {
            None => Ok(None),
            Some(b) => serde_json::from_slice(&b).map(Some).map_err(|e| self.corrupt(format!("window slot table: {e}"))),
        }
    }

    fn put_window_ids(&mut self, ids: &[WindowId]) -> Result<(), StoreError> {
        self.put_json(WINDOW_IDS_KEY.to_vec(), "the window slot table", &ids)
    }

    /// Visits one key per bucket: after reading a key's bucket it seeks past the
    /// bucket, so the cost is the number of buckets, not of open windows.
    fn open_buckets(&mut self) -> Result<Vec<Bucket>, StoreError> {
        let mut committed = Vec::new();
        let mut it = self.db.raw_iterator();
        it.seek(b"o");
        while let Some(k) = it.key().filter(|k| k.first() == Some(&b'o')) {
            let bucket = parse_open_bucket(k).ok_or_else(|| self.corrupt("unreadable open-window key"))?;
            committed.push(bucket);
            match after_prefix(&open_bucket_prefix(bucket)) {
                Some(next) => it.seek(next),
                None => break,
            }
        }
        it.status().map_err(|e| self.rocks(e))?;
        drop(it);
        let mut buckets = BTreeSet::new();
        for bucket in committed {
            // The current batch may have deleted every committed window of the bucket
            // (closing it): then it is open only if a window of it is left.
            if !self.batch_deletes_in(bucket) || self.has_open_window_in(bucket)? {
                buckets.insert(bucket);
            }
        }
        for (k, v) in self.overlay_open.iter().map(|k| (k, self.overlay.get(k))) {
            if let Some(Some(_)) = v {
                buckets.insert(parse_open_bucket(k).ok_or_else(|| self.corrupt("unreadable open-window key"))?);
            }
        }
        Ok(buckets.into_iter().collect())
    }

    fn get_open(&mut self, k: &WindowKey) -> Result<Option<WindowState>, StoreError> {
        match self.get(&open_key(k))? {
            None => Ok(None),
            Some(b) => self.decode_state(&b).map(Some),
        }
    }

    fn open_in(&mut self, bucket: Bucket) -> Result<Vec<(WindowKey, WindowState)>, StoreError> {
        let from = open_bucket_prefix(bucket);
        let to = after_prefix(&from).ok_or_else(|| self.corrupt("open-window bucket at the end of the key space"))?;
        let mut out = Vec::new();
        self.visit_open_span(from, to, |k, v| {
            let key = parse_open_key(k).ok_or_else(|| self.corrupt("unreadable open-window key"))?;
            out.push((key, self.decode_state(v)?));
            Ok(())
        })?;
        Ok(out)
    }

    fn put_open(&mut self, k: &WindowKey, s: &WindowState) -> Result<(), StoreError> {
        self.put_json(open_key(k), "an open window", s)
    }

    fn delete_open(&mut self, k: &WindowKey) -> Result<(), StoreError> {
        self.delete(open_key(k));
        Ok(())
    }

    fn get_closed(&mut self, k: &WindowKey) -> Result<Option<WindowState>, StoreError> {
        match self.get(&closed_key(k))? {
            None => Ok(None),
            Some(b) => self.decode_state(&b).map(Some),
        }
    }

    fn put_closed(&mut self, k: &WindowKey, s: &WindowState) -> Result<(), StoreError> {
        self.put_json(closed_key(k), "a closed window", s)
    }

    fn purge_closed(&mut self, end_at_most: i64) -> Result<(), StoreError> {
        if self.purged_closed.is_some_and(|p| p >= end_at_most) {
            return Ok(());
        }
        let from = self.purged_closed.map_or_else(|| b"c".to_vec(), |p| prefixed_time(b'c', p.saturating_add(1)));
        self.delete_span(from, prefixed_time(b'c', end_at_most.saturating_add(1)))?;
        self.purged_closed = Some(end_at_most);
        Ok(())
    }

    fn seen(&mut self, tenant: &str, pulse_id: &str) -> Result<bool, StoreError> {
        Ok(self.get(&seen_key(tenant, pulse_id))?.is_some())
    }

    fn mark_seen(&mut self, tenant: &str, pulse_id: &str, at: i64) -> Result<(), StoreError> {
        self.put(seen_key(tenant, pulse_id), sortable(at).to_vec());
        self.put(expiry_key(at, tenant, pulse_id), Vec::new());
        Ok(())
    }

    fn expire_seen(&mut self, at_most: i64) -> Result<(), StoreError> {
        if self.expired_seen.is_some_and(|p| p >= at_most) {
            return Ok(());
        }
        let from = self.expired_seen.map_or_else(|| b"x".to_vec(), |p| prefixed_time(b'x', p.saturating_add(1)));
        let to = prefixed_time(b'x', at_most.saturating_add(1));
        // Collect the expired index entries first, then delete them and their `d` keys.
        for x in self.keys_in_span(&from, &to)? {
            let mut d = Vec::with_capacity(x.len() - 8);
            d.push(b'd');
            d.extend_from_slice(&x[9..]);
            // Only forget the id if it was not seen again later (a later `x` entry).
            if self.get(&d)?.as_deref() == Some(&x[1..9]) {
                self.delete(d);
            }
            self.delete(x);
        }
        self.expired_seen = Some(at_most);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::window::aggregate::Accumulator;
    use rust_decimal::Decimal;

    fn key(start: i64) -> WindowKey {
        let g = GroupKey::new("acme", "s.k-u:1", "GB");
        WindowKey { end: start + 1000, window: 2, start, key: Arc::new(g) }
    }

    #[test]
    fn state_survives_reopen_and_purges() {
        let dir = tempfile::tempdir().unwrap();
        let res = StoreResources::new(16 << 20);
        let st = WindowState::new(Accumulator::first(Decimal::new(125, 1), 7));
        {
            let mut s = PartitionStore::open(dir.path(), &res).unwrap();
            s.put_open(&key(-5_000), &st).unwrap();
            s.put_closed(&key(1_000), &st).unwrap();
            s.put_closed(&key(9_000), &st).unwrap();
            s.mark_seen("acme", "p1", 100).unwrap();
            s.put_watermark(&Watermark { current: 42, last_input_wall_ms: 1, last_input_watermark: 42 }).unwrap();
            assert!(s.seen("acme", "p1").unwrap(), "reads see the uncommitted batch");
            s.commit(None).unwrap();
        }
        let mut s = PartitionStore::open(dir.path(), &res).unwrap();
        assert_eq!(s.open_buckets().unwrap(), vec![key(-5_000).bucket()]);
        assert_eq!(s.open_in(key(-5_000).bucket()).unwrap(), vec![(key(-5_000), st.clone())]);
        assert_eq!(s.get_open(&key(-5_000)).unwrap(), Some(st.clone()));
        assert_eq!(s.get_open(&key(-4_000)).unwrap(), None);
        assert_eq!(s.load_watermark().unwrap().map(|w| w.current), Some(42));
        assert!(s.seen("acme", "p1").unwrap());
        assert!(!s.seen("acme", "p2").unwrap());
        s.purge_closed(2_000).unwrap(); // key(1_000) ends at 2_000
        assert_eq!(s.get_closed(&key(1_000)).unwrap(), None);
        assert_eq!(s.get_closed(&key(9_000)).unwrap(), Some(st));
        s.expire_seen(100).unwrap();
        assert!(!s.seen("acme", "p1").unwrap());
        s.commit(None).unwrap();
    }

    /// A bucket's open windows: the committed ones with the current batch's writes over
    /// them; buckets are found one seek each.
    #[test]
    fn open_windows_by_bucket_see_the_current_batch() {
        let dir = tempfile::tempdir().unwrap();
        let res = StoreResources::new(16 << 20);
        let mut s = PartitionStore::open(dir.path(), &res).unwrap();
        let in_bucket = |tenant: &str, start: i64| {
            WindowKey { end: start + 1000, window: 2, start, key: Arc::new(GroupKey::new(tenant, "s", "u")) }
        };
        let st = |n: i64| WindowState::new(Accumulator::first(Decimal::new(n, 0), n));
        for (i, t) in ["a", "b", "c"].iter().enumerate() {
            s.put_open(&in_bucket(t, 0), &st(i as i64)).unwrap();
            s.put_open(&in_bucket(t, 1_000), &st(10)).unwrap();
        }
        s.put_open(&WindowKey { window: 3, ..in_bucket("a", 0) }, &st(20)).unwrap();
        s.commit(None).unwrap();
        s.delete_open(&in_bucket("b", 0)).unwrap();
        s.put_open(&in_bucket("c", 0), &st(7)).unwrap();
        s.put_open(&in_bucket("d", 0), &st(8)).unwrap();
        let mut got: Vec<(String, WindowState)> =
            s.open_in(in_bucket("a", 0).bucket()).unwrap().into_iter().map(|(k, v)| (k.key.tenant_id().to_owned(), v)).collect();
        got.sort_by(|a, b| a.0.cmp(&b.0));
        assert_eq!(got, vec![("a".into(), st(0)), ("c".into(), st(7)), ("d".into(), st(8))]);
        let buckets = s.open_buckets().unwrap();
        let expected = vec![in_bucket("a", 0).bucket(), WindowKey { window: 3, ..in_bucket("a", 0) }.bucket(), in_bucket("a", 1_000).bucket()];
        assert_eq!(buckets, expected);
    }

    /// Replaying a store's changes into an empty store rebuilds it, `x` index included.
    #[test]
    fn changes_rebuild_a_store() {
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let res = StoreResources::new(16 << 20);
        let st = WindowState::new(Accumulator::first(Decimal::new(3, 0), 1));
        let mut src = PartitionStore::open(a.path(), &res).unwrap();
        let mut dst = PartitionStore::open(b.path(), &res).unwrap();
        let replay = |src: &mut PartitionStore, dst: &mut PartitionStore, next: i64| {
            let changes: Vec<(Vec<u8>, Option<Vec<u8>>)> =
                src.changes().map(|(k, v)| (k.to_vec(), v.map(<[u8]>::to_vec))).collect();
            assert!(changes.iter().all(|(k, _)| k[0] != b'x'), "derived keys stay out of the changelog");
            for (k, v) in &changes {
                dst.apply_change(k, v.as_deref()).unwrap();
            }
            src.commit(Some(next)).unwrap();
            dst.commit(Some(next)).unwrap();
        };
        let window_ids = vec![WindowId { name: "minute".into(), size_ms: 60_000 }];
        src.put_window_ids(&window_ids).unwrap();
        src.put_open(&key(0), &st).unwrap();
        src.mark_seen("acme", "p1", 100).unwrap();
        src.mark_seen("acme", "p2", 200).unwrap();
        replay(&mut src, &mut dst, 3);
        assert_eq!(src.changes().count(), 0, "commit clears the batch");
        src.mark_seen("acme", "p1", 300).unwrap(); // seen again later: its expiry moves
        src.delete_open(&key(0)).unwrap();
        src.put_closed(&key(0), &st).unwrap();
        replay(&mut src, &mut dst, 7);
        dst.expire_seen(250).unwrap(); // p2 expires; p1 (now at 300) stays
        assert!(dst.seen("acme", "p1").unwrap());
        assert!(!dst.seen("acme", "p2").unwrap());
        assert_eq!(dst.open_buckets().unwrap(), vec![]);
        assert_eq!(dst.get_closed(&key(0)).unwrap(), Some(st));
        assert_eq!(dst.changelog_position(), Some(7));
        assert_eq!(dst.load_window_ids().unwrap(), Some(window_ids), "the slot table moves with the state");
        assert!(dst.apply_change(b"zzz", None).is_err(), "unknown keys are corruption, not ignored");
        assert!(dst.apply_change(b"dacme\0p9", Some(b"")).is_err(), "a malformed dedupe value is corruption");
    }
}

/// The window operator's scenarios ([`crate::window::tests`]) over this store,
/// committed after every flush, as over the in-memory store.
#[cfg(test)]
mod operator_scenarios_on_rocksdb {
    use super::{PartitionStore, StoreResources};
    use crate::window::tests::TestStore;

    fn rocks_store() -> TestStore<PartitionStore> {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = PartitionStore::open(dir.path(), &StoreResources::new(16 << 20)).expect("open store");
        TestStore { store, keep: Box::new(dir), commit: |s| s.commit(None).expect("commit") }
    }

    crate::window::tests::operator_scenarios!(rocks_store);
}
