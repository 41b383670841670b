//! What the window operator needs from its state store, as a trait over plain types,
//! with an in-memory implementation for tests and benchmarks. The RocksDB store
//! ([`crate::state`]) implements the same trait.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::hash::BuildHasher;
use std::sync::Arc;

use hashbrown::hash_table::{self, HashTable};
use serde::{Deserialize, Serialize};

use super::aggregate::{Accumulator, GroupKey};
use super::slots::WindowId;
use super::watermark::Watermark;

/// Identifies one window of one group: its window size's slot ([`super::slots`]), its
/// `[start, end)` and the group key.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct WindowKey {
    pub end: i64,
    pub window: u16,
    pub start: i64,
    pub key: Arc<GroupKey>,
}

impl WindowKey {
    pub fn new(bucket: Bucket, key: Arc<GroupKey>) -> Self {
        Self { end: bucket.end, window: bucket.window, start: bucket.start, key }
    }

    pub fn bucket(&self) -> Bucket {
        Bucket { end: self.end, window: self.window, start: self.start }
    }
}

/// One window size's `[start, end)`: the windows of every group in it close together.
/// Orders by `end` first, like [`WindowKey`], so buckets sort in closing order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Bucket {
    pub end: i64,
    /// The window size's slot in the store's slot table ([`super::slots`]), not its
    /// position in the configuration, which may change between runs.
    pub window: u16,
    pub start: i64,
}

/// The state of one window.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WindowState {
    pub acc: Accumulator,
    /// Revision the next emitted record of this window gets.
    pub next_revision: u32,
    /// Changed since the last interim update (emit = "updates").
    pub updated_since_emit: bool,
    /// Wall-clock time of the last interim update.
    pub last_emit_wall_ms: i64,
}

impl WindowState {
    pub fn new(acc: Accumulator) -> Self {
        Self { acc, next_revision: 0, updated_since_emit: true, last_emit_wall_ms: i64::MIN }
    }
}

/// Durable state of one input partition's windows. Writes may be buffered until the
/// owner commits them; reads must see earlier writes of the same batch. A write that
/// fails (a value that cannot be encoded, a store that cannot take it) is an error of
/// the batch: the caller must not commit it.
pub trait WindowStore {
    type Error: std::error::Error + Send + Sync + 'static;

    fn load_watermark(&mut self) -> Result<Option<Watermark>, Self::Error>;
    fn put_watermark(&mut self, w: &Watermark) -> Result<(), Self::Error>;
    /// The slot table ([`super::slots`]); None if the store never had one.
    fn load_window_ids(&mut self) -> Result<Option<Vec<WindowId>>, Self::Error>;
    fn put_window_ids(&mut self, ids: &[WindowId]) -> Result<(), Self::Error>;
    /// The buckets holding at least one open window, for restoring the operator
    /// (which keeps only some open windows in memory; the store has all of them).
    fn open_buckets(&mut self) -> Result<Vec<Bucket>, Self::Error>;
    fn get_open(&mut self, k: &WindowKey) -> Result<Option<WindowState>, Self::Error>;
    /// Every open window of `bucket` (in no particular order), for closing it.
    fn open_in(&mut self, bucket: Bucket) -> Result<Vec<(WindowKey, WindowState)>, Self::Error>;
    fn put_open(&mut self, k: &WindowKey, s: &WindowState) -> Result<(), Self::Error>;
    fn delete_open(&mut self, k: &WindowKey) -> Result<(), Self::Error>;
    /// A closed window still within retention.
    fn get_closed(&mut self, k: &WindowKey) -> Result<Option<WindowState>, Self::Error>;
    fn put_closed(&mut self, k: &WindowKey, s: &WindowState) -> Result<(), Self::Error>;
    /// Forgets closed windows with `end <= end_at_most`.
    fn purge_closed(&mut self, end_at_most: i64) -> Result<(), Self::Error>;
    /// Whether `pulse_id` of `tenant` was already counted.
    fn seen(&mut self, tenant: &str, pulse_id: &str) -> Result<bool, Self::Error>;
    /// Remembers `pulse_id` as counted at stream time `at`.
    fn mark_seen(&mut self, tenant: &str, pulse_id: &str, at: i64) -> Result<(), Self::Error>;
    /// Forgets pulse_ids marked at a stream time `<= at_most`.
    fn expire_seen(&mut self, at_most: i64) -> Result<(), Self::Error>;
}

/// A [`WindowStore`] in plain maps: for unit tests and benchmarks.
#[derive(Debug, Default)]
pub struct MemoryStore {
    watermark: Option<Watermark>,
    window_ids: Option<Vec<WindowId>>,
    /// Group keys carry their hash, so a fast mixer is enough (as in the operator).
    open: hashbrown::HashMap<WindowKey, WindowState, foldhash::fast::RandomState>,
    closed: BTreeMap<WindowKey, WindowState>,
    seen: SeenIds,
}

/// Counted pulse_ids: a hash table whose entries keep their hash (a pulse's id is
/// hashed once per lookup, never again on growth) and an expiry queue of marks.
#[derive(Debug, Default)]
struct SeenIds {
    table: HashTable<SeenId>,
    hasher: foldhash::fast::RandomState,
    /// Every mark (time and hash) in marking order, for expiry. Marks are made at the
    /// watermark, which never decreases, so this is also time order.
    order: VecDeque<(i64, u64)>,
}

/// A counted pulse_id of a tenant and when it was marked.
#[derive(Debug)]
struct SeenId {
    hash: u64,
    at: i64,
    /// Tenant and pulse_id joined, in one allocation.
    text: Box<str>,
    tenant_len: usize,
}

impl SeenId {
    fn is(&self, hash: u64, tenant: &str, pulse_id: &str) -> bool {
        self.hash == hash && self.text.split_at(self.tenant_len) == (tenant, pulse_id)
    }
}

impl SeenIds {
    fn hash(&self, tenant: &str, pulse_id: &str) -> u64 {
        self.hasher.hash_one((tenant, pulse_id))
    }

    fn contains(&self, tenant: &str, pulse_id: &str) -> bool {
        let hash = self.hash(tenant, pulse_id);
        self.table.find(hash, |id| id.is(hash, tenant, pulse_id)).is_some()
    }

    fn mark(&mut self, tenant: &str, pulse_id: &str, at: i64) {
        let hash = self.hash(tenant, pulse_id);
        match self.table.entry(hash, |id| id.is(hash, tenant, pulse_id), |id| id.hash) {
            hash_table::Entry::Occupied(mut e) => e.get_mut().at = at,
            hash_table::Entry::Vacant(e) => {
                let mut text = String::with_capacity(tenant.len() + pulse_id.len());
                text.push_str(tenant);
                text.push_str(pulse_id);
                e.insert(SeenId { hash, at, text: text.into_boxed_str(), tenant_len: tenant.len() });
            }
        }
        self.order.push_back((at, hash));
    }

    fn expire(&mut self, at_most: i64) {
        while let Some(&(at, hash)) = self.order.front().filter(|(at, _)| *at <= at_most) {
            self.order.pop_front();
            // A mark superseded by a later one of the same id finds nothing. Two ids with
            // the same hash and mark time expire together, so which one goes first does
            // not matter.
            if let Ok(e) = self.table.find_entry(hash, |id| id.hash == hash && id.at == at) {
                e.remove();
            }
        }
    }
}

impl MemoryStore {
    pub fn closed_len(&self) -> usize {
        self.closed.len()
    }

    pub fn seen_len(&self) -> usize {
        self.seen.table.len()
    }

    pub fn open_len(&self) -> usize {
        self.open.len()
    }
}

impl WindowStore for MemoryStore {
    type Error = std::convert::Infallible;

    fn load_watermark(&mut self) -> Result<Option<Watermark>, Self::Error> {
        Ok(self.watermark)
    }
    fn put_watermark(&mut self, w: &Watermark) -> Result<(), Self::Error> {
        self.watermark = Some(*w);
        Ok(())
    }
    fn load_window_ids(&mut self) -> Result<Option<Vec<WindowId>>, Self::Error> {
        Ok(self.window_ids.clone())
    }
    fn put_window_ids(&mut self, ids: &[WindowId]) -> Result<(), Self::Error> {
        self.window_ids = Some(ids.to_vec());
        Ok(())
    }
    fn open_buckets(&mut self) -> Result<Vec<Bucket>, Self::Error> {
        let buckets: BTreeSet<Bucket> = self.open.keys().map(WindowKey::bucket).collect();
        Ok(buckets.into_iter().collect())
    }
    fn get_open(&mut self, k: &WindowKey) -> Result<Option<WindowState>, Self::Error> {
        Ok(self.open.get(k).cloned())
    }
    fn open_in(&mut self, bucket: Bucket) -> Result<Vec<(WindowKey, WindowState)>, Self::Error> {
        Ok(self.open.iter().filter(|(k, _)| k.bucket() == bucket).map(|(k, v)| (k.clone(), v.clone())).collect())
    }
    fn put_open(&mut self, k: &WindowKey, s: &WindowState) -> Result<(), Self::Error> {
        self.open.insert(k.clone(), s.clone());
        Ok(())
    }
    fn delete_open(&mut self, k: &WindowKey) -> Result<(), Self::Error> {
        self.open.remove(k);
        Ok(())
    }
    fn get_closed(&mut self, k: &WindowKey) -> Result<Option<WindowState>, Self::Error> {
        Ok(self.closed.get(k).cloned())
    }
    fn put_closed(&mut self, k: &WindowKey, s: &WindowState) -> Result<(), Self::Error> {
        self.closed.insert(k.clone(), s.clone());
        Ok(())
    }
    fn purge_closed(&mut self, end_at_most: i64) -> Result<(), Self::Error> {
        // WindowKey orders by `end` first.
        self.closed.retain(|k, _| k.end > end_at_most);
        Ok(())
    }
    fn seen(&mut self, tenant: &str, pulse_id: &str) -> Result<bool, Self::Error> {
        Ok(self.seen.contains(tenant, pulse_id))
    }
    fn mark_seen(&mut self, tenant: &str, pulse_id: &str, at: i64) -> Result<(), Self::Error> {
        self.seen.mark(tenant, pulse_id, at);
        Ok(())
    }
    fn expire_seen(&mut self, at_most: i64) -> Result<(), Self::Error> {
        self.seen.expire(at_most);
        Ok(())
    }
}
