//! The window operator's cache of open windows, a layer over its [`WindowStore`], as
//! Kafka Streams keeps a record cache over its RocksDB window store.
//!
//! Write back: a pulse changes a cached window in memory; the change reaches the
//! store at [`WindowCache::flush`], before a commit. Beyond its capacity the least
//! recently used clean windows are evicted, so memory is bounded by the capacity, not
//! by the number of open keys. It also knows every bucket with an open window (cached
//! or only stored), in closing order, so closing needs no scan of the store.

use std::collections::{btree_map, BTreeMap};

use hashbrown::hash_map::{self, HashMap};

use super::aggregate::{GroupKey, GroupKeyRef, Sample};
use super::keys::{GroupId, KeyTable};
use super::store::{Bucket, WindowKey, WindowState, WindowStore};

/// The hasher of the cache's maps: their keys are small numbers, so a fast
/// non-cryptographic mixer is enough.
type FastHash = foldhash::fast::RandomState;

/// One window: a group's window in a bucket.
#[derive(Debug, Clone, Copy)]
pub(super) struct WindowRef {
    pub bucket: Bucket,
    pub group: GroupId,
}

/// An open window held in memory.
#[derive(Debug)]
struct Cached {
    state: WindowState,
    /// Changed since the last [`flush`](WindowCache::flush) wrote it to the store.
    dirty: bool,
    /// The store has a version of it (so closing must delete it there).
    stored: bool,
    /// The flush count when it was last used, for evicting the least recently used.
    used: u32,
}

impl Cached {
    /// Marks it used at flush count `flushes` and changed; true if it was clean until
    /// now (so it must join the cache's list of windows to write).
    fn touch(&mut self, flushes: u32) -> bool {
        self.used = flushes;
        !std::mem::replace(&mut self.dirty, true)
    }
}

/// The open windows of one bucket that are held in memory, by group. One map per
/// bucket, not one for all: a bucket's map is freed when it closes, and many small
/// maps waste less than one large one whose size doubles (30 MiB at a million keys).
#[derive(Default)]
struct OpenBucket {
    cached: HashMap<GroupId, Cached, FastHash>,
    /// Every open window of the bucket is cached (it opened in this cache and lost
    /// none to eviction): lookups that miss and closing need not read the store.
    all_cached: bool,
}

/// A change a pulse made to one cached window, kept until all the pulse's windows
/// took it ([`WindowCache::keep_changes`]) or one refused it
/// ([`WindowCache::undo_changes`]).
enum Pending {
    /// A cached window, updated in place; `prior` is what it was.
    Updated { at: WindowRef, prior: Prior },
    /// A window newly in the cache (new, or read from the store), in a bucket that
    /// opened for it if `new_bucket`.
    Cached { at: WindowRef, new_bucket: bool },
}

/// A cached window as it was before a pulse changed it.
struct Prior {
    state: WindowState,
    dirty: bool,
    used: u32,
}

/// An open window being closed: its last state, and whether the store holds a
/// version of it (to delete).
pub(super) struct Closing {
    pub key: WindowKey,
    pub state: WindowState,
    pub stored: bool,
}

/// The open windows of one input partition: those in memory, and the buckets of all.
pub(super) struct WindowCache {
    /// Every bucket with an open window (in closing order), with those of its windows
    /// that are cached; the others are only in the store.
    open: BTreeMap<Bucket, OpenBucket>,
    /// Windows cached in all buckets, and how many may be (beyond it, evict).
    cached: usize,
    capacity: usize,
    /// Cached windows whose `dirty` flag was set since the last flush.
    dirty: Vec<WindowRef>,
    flushes: u32,
    keys: KeyTable,
    /// The changes of the pulse being counted.
    pending: Vec<Pending>,
}

impl WindowCache {
    /// A cache of nothing yet over a store whose open windows are in `buckets`.
    pub fn new(buckets: Vec<Bucket>, capacity: usize) -> Self {
        Self {
            open: buckets.into_iter().map(|b| (b, OpenBucket::default())).collect(),
            cached: 0,
            capacity: capacity.max(1),
            dirty: Vec::new(),
            flushes: 0,
            keys: KeyTable::default(),
            pending: Vec::new(),
        }
    }

    pub fn set_capacity(&mut self, windows: usize) {
        self.capacity = windows.max(1);
    }

    /// Open windows held in memory.
    pub fn cached_windows(&self) -> usize {
        self.cached
    }

    /// Group keys held in memory.
    pub fn group_keys(&self) -> usize {
        self.keys.live()
    }

    /// Buckets with at least one open window.
    pub fn open_buckets(&self) -> usize {
        self.open.len()
    }

    /// The id windows of `group` are cached under, for the pulse being counted.
    pub fn intern(&mut self, group: GroupKeyRef<'_>) -> GroupId {
        self.keys.intern(group)
    }

    /// The store's key of the window of group `id` in `bucket`.
    pub fn window_key(&self, bucket: Bucket, id: GroupId) -> WindowKey {
        self.keys.window_key(bucket, id)
    }

    /// Adds pulse `sample` to the open window `at`: in place if
    /// cached, else read from the store (or new) into the cache. False, with nothing
    /// changed, if the sum would be inexact. The change is pending until
    /// [`keep_changes`](Self::keep_changes) or [`undo_changes`](Self::undo_changes).
    #[inline]
    pub fn add<S: WindowStore>(&mut self, at: WindowRef, sample: Sample<'_>, store: &mut S) -> Result<bool, S::Error> {
        let (open, new_bucket) = match self.open.entry(at.bucket) {
            btree_map::Entry::Occupied(e) => (e.into_mut(), false),
            btree_map::Entry::Vacant(e) => (e.insert(OpenBucket { all_cached: true, ..Default::default() }), true),
        };
        match open.cached.entry(at.group) {
            hash_map::Entry::Occupied(mut e) => {
                let c = e.get_mut();
                let prior = Prior { state: c.state.clone(), dirty: c.dirty, used: c.used };
                if !c.state.add_pulse(sample) {
                    return Ok(false);
                }
                c.touch(self.flushes);
                self.pending.push(Pending::Updated { at, prior });
            }
            hash_map::Entry::Vacant(e) => {
                // Not cached: the store has it only if its bucket is not all cached.
                let stored = if open.all_cached { None } else { store.get_open(&self.keys.window_key(at.bucket, at.group))? };
                let in_store = stored.is_some();
                let Some(state) = WindowState::with_pulse(stored, sample) else {
                    if new_bucket {
                        self.open.remove(&at.bucket);
                    }
                    return Ok(false);
                };
                e.insert(Cached { state, dirty: true, stored: in_store, used: self.flushes });
                self.pending.push(Pending::Cached { at, new_bucket });
            }
        }
        Ok(true)
    }

    /// Keeps the pending changes: their windows are written at the next flush.
    #[inline]
    pub fn keep_changes(&mut self) {
        for change in self.pending.drain(..) {
            match change {
                Pending::Updated { at, prior } => {
                    if !prior.dirty {
                        self.dirty.push(at);
                    }
                }
                Pending::Cached { at, .. } => {
                    self.dirty.push(at);
                    self.cached += 1;
                    self.keys.window_added(at.group);
                }
            }
        }
    }

    /// Undoes the pending changes, newest first.
    pub fn undo_changes(&mut self) {
        while let Some(change) = self.pending.pop() {
            match change {
                Pending::Updated { at, prior } => {
                    if let Some(c) = self.cached_mut(at) {
                        (c.state, c.dirty, c.used) = (prior.state, prior.dirty, prior.used);
                    }
                }
                Pending::Cached { at, new_bucket } => {
                    if new_bucket {
                        self.open.remove(&at.bucket);
                    } else if let Some(open) = self.open.get_mut(&at.bucket) {
                        open.cached.remove(&at.group);
                    }
                }
            }
        }
    }

    /// Changes every cached window of the buckets `of_bucket` picks with `change`
    /// (which says whether it changed the window; those are written at the next flush).
    pub fn change_cached(
        &mut self,
        of_bucket: impl Fn(&Bucket) -> bool,
        mut change: impl FnMut(Bucket, &GroupKey, &mut WindowState) -> bool,
    ) {
        for (bucket, open) in self.open.iter_mut().filter(|(b, _)| of_bucket(b)) {
            for (&group, c) in open.cached.iter_mut() {
                if change(*bucket, self.keys.key(group), &mut c.state) && c.touch(self.flushes) {
                    self.dirty.push(WindowRef { bucket: *bucket, group });
                }
            }
        }
    }

    /// Writes the changed windows into the store; then, beyond the capacity, evicts
    /// least recently used clean windows that are not `pinned`. Call before committing.
    pub fn flush<S: WindowStore>(&mut self, store: &mut S, pinned: impl Fn(&Bucket, &WindowState) -> bool) -> Result<(), S::Error> {
        for at in self.dirty.drain(..) {
            // Closed windows are gone from the cache (and were written when closed).
            if let Some(c) = self.open.get_mut(&at.bucket).and_then(|o| o.cached.get_mut(&at.group)) {
                if c.dirty {
                    store.put_open(&self.keys.window_key(at.bucket, at.group), &c.state)?;
                    c.dirty = false;
                    c.stored = true;
                }
            }
        }
        self.flushes = self.flushes.wrapping_add(1);
        if self.cached > self.capacity {
            self.evict(pinned);
        }
        self.keys.sweep_if_grown();
        Ok(())
    }

    /// Drops the least recently used clean windows down to three quarters of the
    /// capacity (so eviction does not run on every flush). Pinned windows stay.
    fn evict(&mut self, pinned: impl Fn(&Bucket, &WindowState) -> bool) {
        let target = self.capacity - self.capacity / 4;
        let evictable = |b: &Bucket, c: &Cached| !c.dirty && !pinned(b, &c.state);
        let mut used: Vec<u32> =
            self.open.iter().flat_map(|(b, m)| m.cached.values().filter(|c| evictable(b, c)).map(|c| c.used)).collect();
        let excess = self.cached.saturating_sub(target).min(used.len());
        if excess == 0 {
            return;
        }
        // `used` counts flushes and may wrap; the age since now orders correctly.
        let now = self.flushes;
        let age = |u: u32| now.wrapping_sub(u);
        used.sort_unstable_by_key(|u| std::cmp::Reverse(age(*u)));
        let youngest_evicted = age(used[excess - 1]);
        let mut evicted = 0;
        let keys = &mut self.keys;
        for (b, m) in self.open.iter_mut() {
            let before = evicted;
            m.cached.retain(|&group, c| {
                let evict = evicted < excess && evictable(b, c) && age(c.used) >= youngest_evicted;
                if evict {
                    evicted += 1;
                    keys.window_removed(group);
                }
                !evict
            });
            if evicted > before {
                m.all_cached = false;
                if m.cached.capacity() > 2 * m.cached.len().max(8) {
                    m.cached.shrink_to_fit();
                }
            }
        }
        self.cached -= evicted;
    }

    /// Takes the first bucket in closing order if it ends by `end_at_most`, with every
    /// open window of it (cached ones as cached, the others from the store) in
    /// group-key order.
    pub fn close_next<S: WindowStore>(
        &mut self,
        end_at_most: i64,
        store: &mut S,
    ) -> Result<Option<(Bucket, Vec<Closing>)>, S::Error> {
        let Some(first) = self.open.first_entry() else { return Ok(None) };
        if first.key().end > end_at_most {
            return Ok(None);
        }
        let (bucket, OpenBucket { mut cached, all_cached }) = first.remove_entry();
        self.cached -= cached.len();
        let mut windows: Vec<Closing> = Vec::with_capacity(cached.len());
        if !all_cached {
            for (key, state) in store.open_in(bucket)? {
                // The cache has the newer state of the windows it holds.
                let newer = self.keys.find(&key.key).and_then(|group| cached.remove(&group).inspect(|_| self.keys.window_removed(group)));
                windows.push(Closing { key, state: newer.map_or(state, |c| c.state), stored: true });
            }
        }
        for (group, c) in cached {
            self.keys.window_removed(group);
            windows.push(Closing { key: self.keys.window_key(bucket, group), state: c.state, stored: c.stored });
        }
        windows.sort_unstable_by(|a, b| a.key.key.cmp(&b.key.key));
        Ok(Some((bucket, windows)))
    }

    fn cached_mut(&mut self, at: WindowRef) -> Option<&mut Cached> {
        self.open.get_mut(&at.bucket)?.cached.get_mut(&at.group)
    }
}
