//! An in-memory [`WindowStore`]: the test and bench double, built only for tests and
//! with the `bench-doubles` feature (`cargo bench --features bench-doubles`). The
//! operator scenarios run over it and over the RocksDB store alike
//! ([`super::tests`]), so it cannot drift from the real store.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::hash::BuildHasher;

use hashbrown::hash_table::{self, HashTable};

use super::slots::WindowId;
use super::store::{Bucket, WindowKey, WindowState, WindowStore};
use super::watermark::Watermark;

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
