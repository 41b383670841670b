//! The window operator of one input partition: dedupe, assign, aggregate, close,
//! correct, purge. Like Flink's window operator, it is driven by records and by time
//! (the idle advance and interim updates); unlike it, it has no I/O of its own: state
//! goes through a [`WindowStore`] and results come back as [`Output`]s.

use std::collections::{btree_map, BTreeMap};
use std::sync::Arc;

use hashbrown::hash_map::{self, HashMap};
use hashbrown::hash_table::{self, HashTable};
use rust_decimal::Decimal;

use super::aggregate::{Accumulator, GroupKey, GroupKeyRef, WindowAggregate};
use super::assign::window_bounds;
use super::slots::{WindowSlots, WindowsChanged};
use super::store::{Bucket, WindowKey, WindowState, WindowStore};
use super::watermark::Watermark;
use super::{EmitMode, WindowSettings};
use crate::pulse::GroupedPulse;

/// What processing produced, for the I/O layer to write and count.
#[derive(Debug, Clone, PartialEq)]
pub enum Output {
    /// A window aggregate: interim, final, or a correction (`revision > 0`, final).
    Aggregate { record: WindowAggregate, correction: bool },
    /// A pulse that is counted in no window, and why.
    Late { pulse: GroupedPulse, reason: LateReason },
    /// A pulse_id already counted for this tenant.
    Duplicate { pulse: GroupedPulse },
}

/// Why a pulse went to the late topic instead of a window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LateReason {
    /// Its window closed more than `retention` ago.
    BeyondRetention,
    /// Adding it would make a total inexact (beyond rust_decimal's precision).
    InexactSum,
}

impl LateReason {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::BeyondRetention => "beyond_retention",
            Self::InexactSum => "inexact_sum",
        }
    }
}

/// Why an operator could not be restored from its store.
#[derive(Debug, thiserror::Error)]
pub enum RestoreError<E: std::error::Error + 'static> {
    #[error(transparent)]
    Store(E),
    /// The configured windows cannot take over the stored ones ([`super::slots`]).
    #[error(transparent)]
    Windows(#[from] WindowsChanged),
}

/// The hasher of the operator's maps: their keys are small numbers, so a fast
/// non-cryptographic mixer is enough.
type FastHash = foldhash::fast::RandomState;

/// Open windows a fresh operator keeps in memory until told otherwise
/// ([`WindowOperator::set_cache_capacity`]).
pub const DEFAULT_CACHE_WINDOWS: usize = 250_000;

/// A group key's index in the operator's [`KeyTable`].
type GroupId = u32;

/// One window: a group's window in a bucket.
#[derive(Debug, Clone, Copy)]
struct WindowRef {
    bucket: Bucket,
    group: GroupId,
}

/// An open window held in memory.
#[derive(Debug)]
struct Cached {
    state: WindowState,
    /// Changed since the last [`flush`](WindowOperator::flush) wrote it to the store.
    dirty: bool,
    /// The store has a version of it (so closing must delete it there).
    stored: bool,
    /// The flush count when it was last used, for evicting the least recently used.
    used: u32,
}

impl Cached {
    /// Marks it used at flush count `flushes` and changed; true if it was clean until
    /// now (so it must join the operator's list of windows to write).
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
    /// Every open window of the bucket is cached (it opened in this operator and lost
    /// none to eviction): lookups that miss and closing need not read the store.
    all_cached: bool,
}

/// The group keys in use, each under a small number: the cache is keyed by that
/// number, so after one hash probe and string compare per pulse its windows are found
/// without touching a string or an atomic reference count (`Arc` counts were a third
/// of the operator's own time when the cache was keyed by `Arc<GroupKey>`).
#[derive(Default)]
struct KeyTable {
    /// Ids, hashed by their key's [`GroupKey::hash_code`].
    index: HashTable<GroupId>,
    slots: Vec<KeySlot>,
    /// Ids of freed slots, for reuse.
    free: Vec<GroupId>,
    /// Keys in use after the last sweep: the next sweep waits until there are a quarter
    /// more, so sweeping costs O(1) per key and dead keys stay few (every pulse may
    /// bring a new group: with a million open keys, a doubling held 37 MiB).
    after_sweep: usize,
}

#[derive(Default)]
struct KeySlot {
    /// None while the slot is free.
    key: Option<Arc<GroupKey>>,
    /// Cached windows of the group; a slot at zero is freed by the next sweep.
    windows: u32,
}

impl KeyTable {
    /// The id of `group`, giving it one if it has none.
    fn intern(&mut self, group: GroupKeyRef<'_>) -> GroupId {
        let slots = &mut self.slots;
        let entry = self.index.entry(
            group.hash_code(),
            |&id| holds(slots, id, group),
            |&id| slots[id as usize].key.as_deref().map_or(0, GroupKey::hash_code),
        );
        match entry {
            hash_table::Entry::Occupied(e) => *e.get(),
            hash_table::Entry::Vacant(e) => {
                let key = Some(Arc::new(group.to_key()));
                let id = match self.free.pop() {
                    Some(id) => {
                        slots[id as usize] = KeySlot { key, windows: 0 };
                        id
                    }
                    None => {
                        slots.push(KeySlot { key, windows: 0 });
                        (slots.len() - 1) as GroupId
                    }
                };
                e.insert(id);
                id
            }
        }
    }

    /// The id of `key` if it has one.
    fn find(&self, key: &GroupKey) -> Option<GroupId> {
        let group = key.borrowed();
        self.index.find(group.hash_code(), |&id| holds(&self.slots, id, group)).copied()
    }

    /// The key of a live id (one with a cached window, or interned since the last sweep).
    fn key(&self, id: GroupId) -> &Arc<GroupKey> {
        match &self.slots[id as usize].key {
            Some(key) => key,
            None => unreachable!("group id {id} is free but still in use"),
        }
    }

    /// The store's key of the window of group `id` in `bucket`.
    fn window_key(&self, bucket: Bucket, id: GroupId) -> WindowKey {
        WindowKey::new(bucket, Arc::clone(self.key(id)))
    }

    fn window_added(&mut self, id: GroupId) {
        self.slots[id as usize].windows += 1;
    }

    fn window_removed(&mut self, id: GroupId) {
        let slot = &mut self.slots[id as usize];
        debug_assert!(slot.windows > 0, "group id {id} loses a window it does not have");
        slot.windows = slot.windows.saturating_sub(1);
    }

    /// Frees the ids of groups without cached windows, once the table has grown enough.
    /// Only between pulses, with no [`WindowRef`] held outside the cache.
    fn sweep_if_grown(&mut self) {
        let live = self.slots.len() - self.free.len();
        if live < self.after_sweep + (self.after_sweep / 4).max(1024) {
            return;
        }
        for (id, slot) in self.slots.iter_mut().enumerate() {
            let Some(key) = slot.key.as_deref() else { continue };
            if slot.windows == 0 {
                let id = id as GroupId;
                if let Ok(e) = self.index.find_entry(key.hash_code(), |&i| i == id) {
                    e.remove();
                }
                slot.key = None;
                self.free.push(id);
            }
        }
        self.after_sweep = self.slots.len() - self.free.len();
    }
}

/// Whether slot `id` holds the key `group`.
fn holds(slots: &[KeySlot], id: GroupId, group: GroupKeyRef<'_>) -> bool {
    slots[id as usize].key.as_deref().is_some_and(|k| group.matches(k))
}

/// Window state of one input partition.
///
/// Open windows live in the store; the operator holds a bounded cache of them (write
/// back: changes reach the store at [`flush`](Self::flush), and the least recently
/// used clean windows are evicted beyond its capacity), and, for every bucket with an
/// open window, its bounds in closing order, so closing needs no scan of the cache.
/// Memory is then bounded by the capacity, not by the number of open keys: Kafka
/// Streams' record cache over its RocksDB window store, Flink's RocksDB state backend.
pub struct WindowOperator {
    settings: Arc<WindowSettings>,
    /// The store's slot of each configured window, and back.
    slots: WindowSlots,
    watermark: Watermark,
    /// Every bucket with an open window (in closing order), with those of its windows
    /// that are cached; the others are only in the store.
    open: BTreeMap<Bucket, OpenBucket>,
    /// Windows cached in all buckets, and how many may be (beyond it, evict).
    cached: usize,
    capacity: usize,
    /// Cached windows whose `dirty` flag was set since the last flush.
    dirty: Vec<WindowRef>,
    flushes: u32,
    watermark_dirty: bool,
    keys: KeyTable,
    /// The bounds of the last pulse's windows, and what counting it changed: reused
    /// from pulse to pulse.
    bounds: Vec<(i64, i64)>,
    changes: Vec<Change>,
}

/// One window a pulse changed, kept until all its windows took it (then the change is
/// committed) or one refused it (then every change is undone).
enum Change {
    /// A cached window, updated in place; `prior` is what it was.
    Updated { at: WindowRef, prior: Prior },
    /// A window newly in the cache (new, or read from the store), in a bucket that
    /// opened for it if `new_bucket`.
    Cached { at: WindowRef, new_bucket: bool },
    /// A closed window: a correction, written when committed.
    Corrected { key: WindowKey, state: WindowState },
}

/// A cached window as it was before a pulse changed it.
struct Prior {
    state: WindowState,
    dirty: bool,
    used: u32,
}

impl WindowOperator {
    /// Restores the operator from `store` (an empty store gives a fresh operator). Open
    /// windows stay in the store until a pulse or closing needs them. The stored
    /// windows are mapped onto the configured ones by name and size, or refused
    /// ([`RestoreError::Windows`]); a slot table that changed is written to the store's
    /// current batch, so it commits (and reaches the changelog) with the next batch.
    pub fn restore<S: WindowStore>(settings: Arc<WindowSettings>, store: &mut S) -> Result<Self, RestoreError<S::Error>> {
        let watermark = store.load_watermark().map_err(RestoreError::Store)?.unwrap_or_default();
        let buckets = store.open_buckets().map_err(RestoreError::Store)?;
        let stored = store.load_window_ids().map_err(RestoreError::Store)?;
        let mut slots = WindowSlots::resolve(&settings.windows, stored, buckets.iter().map(|b| (b.window, b.end)))?;
        if let Some(table) = slots.take_changed() {
            store.put_window_ids(table).map_err(RestoreError::Store)?;
        }
        let open = buckets.into_iter().map(|b| (b, OpenBucket::default())).collect();
        Ok(Self {
            settings,
            slots,
            watermark,
            open,
            cached: 0,
            capacity: DEFAULT_CACHE_WINDOWS,
            dirty: Vec::new(),
            flushes: 0,
            watermark_dirty: false,
            keys: KeyTable::default(),
            bounds: Vec::new(),
            changes: Vec::new(),
        })
    }

    /// How many open windows to keep in memory (at least one); beyond it the least
    /// recently used are evicted at the next [`flush`](Self::flush).
    pub fn set_cache_capacity(&mut self, windows: usize) {
        self.capacity = windows.max(1);
    }

    pub fn watermark(&self) -> &Watermark {
        &self.watermark
    }

    /// Open windows held in memory (all open windows are in the store after a flush).
    pub fn cached_windows(&self) -> usize {
        self.cached
    }

    /// Group keys held in memory: those of cached windows, and those interned since
    /// the last sweep.
    pub fn group_keys(&self) -> usize {
        self.keys.slots.len() - self.keys.free.len()
    }

    /// Buckets (window size and bounds) with at least one open window.
    pub fn open_buckets(&self) -> usize {
        self.open.len()
    }

    /// Counts one grouped pulse at wall-clock `wall_ms`.
    pub fn process<S: WindowStore>(
        &mut self,
        pulse: &GroupedPulse,
        wall_ms: i64,
        store: &mut S,
        out: &mut Vec<Output>,
    ) -> Result<(), S::Error> {
        if store.seen(&pulse.tenant_id, &pulse.pulse_id)? {
            out.push(Output::Duplicate { pulse: pulse.clone() });
            return Ok(());
        }
        let s = &self.settings;
        // Consecutive pulses mostly fall in the same windows: the last bounds are kept
        // while the event time is inside them (a compare instead of a division).
        let t = pulse.event_time;
        self.bounds.resize(s.windows.len(), (0, 0));
        for ((start, end), spec) in self.bounds.iter_mut().zip(&s.windows) {
            if !(*start <= t && t < *end) {
                (*start, *end) = window_bounds(t, spec.size_ms());
            }
        }
        // Counted in every window or in none, so all window sizes sum to the same total.
        let w = self.watermark.current;
        if self.watermark.is_started() && self.bounds.iter().any(|(_, end)| end.saturating_add(s.retention_ms) <= w) {
            out.push(Output::Late { pulse: pulse.clone(), reason: LateReason::BeyondRetention });
            return Ok(());
        }
        let group = self.keys.intern(GroupKeyRef::new(&pulse.tenant_id, &pulse.product_sku, &pulse.use_unit));
        let mut changes = std::mem::take(&mut self.changes);
        let counted = self.count(pulse, group, store, &mut changes);
        if !matches!(counted, Ok(true)) {
            self.undo(&mut changes);
            self.changes = changes;
            counted?;
            out.push(Output::Late { pulse: pulse.clone(), reason: LateReason::InexactSum });
            return Ok(());
        }
        self.watermark.observe(pulse.event_time, wall_ms);
        self.watermark_dirty = true;
        store.mark_seen(&pulse.tenant_id, &pulse.pulse_id, self.watermark.current)?;
        for change in changes.drain(..) {
            match change {
                Change::Updated { at, prior } => {
                    if !prior.dirty {
                        self.dirty.push(at);
                    }
                }
                Change::Cached { at, .. } => {
                    self.dirty.push(at);
                    self.cached += 1;
                    self.keys.window_added(at.group);
                }
                Change::Corrected { key, mut state } => {
                    // Re-emit the closed window with the next revision.
                    let record = record(&self.slots, key.bucket(), &key.key, &state, true, wall_ms);
                    out.push(Output::Aggregate { record, correction: true });
                    state.next_revision += 1;
                    store.put_closed(&key, &state)?;
                }
            }
        }
        self.changes = changes;
        self.close_ready(wall_ms, store, out)
    }

    /// Adds `pulse` to each of its windows (bounds in `self.bounds`): cached windows in
    /// place, others into the cache, closed ones as corrections to write. Every change
    /// goes into `changes`; false if a sum would be inexact (the caller then undoes
    /// them, as it does on an error).
    fn count<S: WindowStore>(
        &mut self,
        pulse: &GroupedPulse,
        group: GroupId,
        store: &mut S,
        changes: &mut Vec<Change>,
    ) -> Result<bool, S::Error> {
        let (amount, event_ms) = (pulse.used_amount, pulse.event_time);
        let w = self.watermark.current;
        let started = self.watermark.is_started();
        let grace = self.settings.grace_ms;
        for (i, &(start, end)) in self.bounds.iter().enumerate() {
            let bucket = Bucket { end, window: self.slots.slot(i), start };
            if started && end.saturating_add(grace) <= w {
                let key = self.keys.window_key(bucket, group);
                let Some(state) = with_pulse(store.get_closed(&key)?, amount, event_ms) else { return Ok(false) };
                changes.push(Change::Corrected { key, state });
                continue;
            }
            let at = WindowRef { bucket, group };
            let (open, new_bucket) = match self.open.entry(bucket) {
                btree_map::Entry::Occupied(e) => (e.into_mut(), false),
                btree_map::Entry::Vacant(e) => (e.insert(OpenBucket { all_cached: true, ..Default::default() }), true),
            };
            match open.cached.entry(group) {
                hash_map::Entry::Occupied(mut e) => {
                    let c = e.get_mut();
                    let prior = Prior { state: c.state.clone(), dirty: c.dirty, used: c.used };
                    if !add_pulse(&mut c.state, amount, event_ms) {
                        return Ok(false);
                    }
                    c.touch(self.flushes);
                    changes.push(Change::Updated { at, prior });
                }
                hash_map::Entry::Vacant(e) => {
                    // Not cached: the store has it only if its bucket is not all cached.
                    let stored = if open.all_cached {
                        None
                    } else {
                        store.get_open(&self.keys.window_key(bucket, group))?
                    };
                    let in_store = stored.is_some();
                    let Some(state) = with_pulse(stored, amount, event_ms) else { return Ok(false) };
                    e.insert(Cached { state, dirty: true, stored: in_store, used: self.flushes });
                    changes.push(Change::Cached { at, new_bucket });
                }
            }
        }
        Ok(true)
    }

    /// Undoes the changes of a pulse that was not counted, newest first.
    fn undo(&mut self, changes: &mut Vec<Change>) {
        while let Some(change) = changes.pop() {
            match change {
                Change::Updated { at, prior } => {
                    if let Some(c) = cached_mut(&mut self.open, at) {
                        (c.state, c.dirty, c.used) = (prior.state, prior.dirty, prior.used);
                    }
                }
                Change::Cached { at, new_bucket } => {
                    if new_bucket {
                        self.open.remove(&at.bucket);
                    } else if let Some(open) = self.open.get_mut(&at.bucket) {
                        open.cached.remove(&at.group);
                    }
                }
                Change::Corrected { .. } => {}
            }
        }
    }

    /// Time passes without input: advance an idle partition's watermark, emit due
    /// interim updates, and close what is ready. `input_waiting`: the caller knows of
    /// records of this partition not yet processed. Such a partition is behind, not
    /// idle, whatever the wall clock says: advancing it would close windows its backlog
    /// still belongs to (after downtime, beyond retention: the late topic).
    pub fn on_time<S: WindowStore>(
        &mut self,
        wall_ms: i64,
        input_waiting: bool,
        store: &mut S,
        out: &mut Vec<Output>,
    ) -> Result<(), S::Error> {
        if input_waiting {
            self.watermark.hold(wall_ms);
        } else if self.watermark.advance_idle(wall_ms, self.settings.idle_timeout_ms) {
            self.watermark_dirty = true;
            self.close_ready(wall_ms, store, out)?;
        }
        self.emit_updates(wall_ms, out);
        Ok(())
    }

    /// Closes every open window (bounded replay at end of input, or tests).
    pub fn close_all<S: WindowStore>(
        &mut self,
        end_at_most: i64,
        wall_ms: i64,
        store: &mut S,
        out: &mut Vec<Output>,
    ) -> Result<(), S::Error> {
        while let Some(first) = self.open.first_entry() {
            if first.key().end > end_at_most {
                break;
            }
            let (bounds, bucket) = first.remove_entry();
            self.close(bounds, bucket, wall_ms, store, out)?;
        }
        Ok(())
    }

    /// Writes changed open windows and the watermark into the store, and purges state
    /// that retention and the dedupe horizon no longer need. Call before committing.
    pub fn flush<S: WindowStore>(&mut self, store: &mut S) -> Result<(), S::Error> {
        for at in self.dirty.drain(..) {
            // Closed windows are gone from the cache (and were written when closed).
            if let Some(c) = cached_mut(&mut self.open, at) {
                if c.dirty {
                    store.put_open(&self.keys.window_key(at.bucket, at.group), &c.state)?;
                    c.dirty = false;
                    c.stored = true;
                }
            }
        }
        if self.watermark_dirty {
            store.put_watermark(&self.watermark)?;
            self.watermark_dirty = false;
            let w = self.watermark.current;
            store.purge_closed(w.saturating_sub(self.settings.retention_ms))?;
            store.expire_seen(w.saturating_sub(self.settings.dedupe_horizon_ms))?;
        }
        self.flushes = self.flushes.wrapping_add(1);
        if self.cached > self.capacity {
            self.evict();
        }
        self.keys.sweep_if_grown();
        Ok(())
    }

    /// Drops the least recently used clean windows down to three quarters of the
    /// capacity (so eviction does not run on every flush). Windows waiting for an
    /// interim update stay: only cached windows are visited for those.
    fn evict(&mut self) {
        let target = self.capacity - self.capacity / 4;
        let (s, slots) = (&self.settings, &self.slots);
        // Clean, and no interim update due.
        let evictable = |b: &Bucket, c: &Cached| !(c.dirty || c.state.updated_since_emit && emits_updates(s, slots, b));
        let mut used: Vec<u32> =
            self.open.iter().flat_map(|(b, m)| m.cached.values().filter(move |c| evictable(b, c)).map(|c| c.used)).collect();
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

    fn close_ready<S: WindowStore>(&mut self, wall_ms: i64, store: &mut S, out: &mut Vec<Output>) -> Result<(), S::Error> {
        let bound = self.watermark.current.saturating_sub(self.settings.grace_ms);
        self.close_all(bound, wall_ms, store, out)
    }

    /// Emits the final record of every open window of `bucket` (cached ones as cached,
    /// the others from the store), in group-key order, and moves them to the closed
    /// windows.
    fn close<S: WindowStore>(
        &mut self,
        bucket: Bucket,
        open: OpenBucket,
        wall_ms: i64,
        store: &mut S,
        out: &mut Vec<Output>,
    ) -> Result<(), S::Error> {
        let OpenBucket { mut cached, all_cached } = open;
        self.cached -= cached.len();
        let mut windows: Vec<(Arc<GroupKey>, WindowState, bool)> = Vec::with_capacity(cached.len());
        if !all_cached {
            for (k, state) in store.open_in(bucket)? {
                // The cache has the newer state of the windows it holds.
                let newer = self.keys.find(&k.key).and_then(|group| cached.remove(&group).inspect(|_| self.keys.window_removed(group)));
                windows.push((k.key, newer.map_or(state, |c| c.state), true));
            }
        }
        for (group, c) in cached {
            self.keys.window_removed(group);
            windows.push((Arc::clone(self.keys.key(group)), c.state, c.stored));
        }
        windows.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        for (key, mut state, stored) in windows {
            let k = WindowKey::new(bucket, key);
            out.push(Output::Aggregate { record: record(&self.slots, bucket, &k.key, &state, true, wall_ms), correction: false });
            state.next_revision += 1;
            state.updated_since_emit = false;
            if stored {
                store.delete_open(&k)?;
            }
            store.put_closed(&k, &state)?;
        }
        Ok(())
    }

    /// Interim records of `emit = "updates"` windows. Such a window is not evicted
    /// while an update is due, so the cache holds all of them.
    fn emit_updates(&mut self, wall_ms: i64, out: &mut Vec<Output>) {
        let s = &self.settings;
        if !s.windows.iter().any(|spec| spec.emit == EmitMode::Updates) {
            return;
        }
        for (bucket, open) in self.open.iter_mut() {
            if !emits_updates(s, &self.slots, bucket) {
                continue;
            }
            for (&group, c) in open.cached.iter_mut() {
                let st = &mut c.state;
                if !st.updated_since_emit || wall_ms.saturating_sub(st.last_emit_wall_ms) < s.update_interval_ms {
                    continue;
                }
                let record = record(&self.slots, *bucket, self.keys.key(group), st, false, wall_ms);
                out.push(Output::Aggregate { record, correction: false });
                st.next_revision += 1;
                st.updated_since_emit = false;
                st.last_emit_wall_ms = wall_ms;
                if c.touch(self.flushes) {
                    self.dirty.push(WindowRef { bucket: *bucket, group });
                }
            }
        }
    }
}

/// The record of the window of `key` in `bucket`, in state `st`. The window's name is
/// the one its slot was stored with.
fn record(slots: &WindowSlots, bucket: Bucket, key: &GroupKey, st: &WindowState, is_final: bool, wall_ms: i64) -> WindowAggregate {
    WindowAggregate::new(key, slots.name(bucket.window), bucket.start, bucket.end, &st.acc, st.next_revision, is_final, wall_ms)
}

/// Whether `bucket`'s windows emit interim updates (`emit = "updates"`).
fn emits_updates(settings: &WindowSettings, slots: &WindowSlots, bucket: &Bucket) -> bool {
    slots.config_index(bucket.window).and_then(|i| settings.windows.get(i)).is_some_and(|w| w.emit == EmitMode::Updates)
}

/// A cached window.
fn cached_mut(open: &mut BTreeMap<Bucket, OpenBucket>, at: WindowRef) -> Option<&mut Cached> {
    open.get_mut(&at.bucket)?.cached.get_mut(&at.group)
}

/// `state` with a pulse of `amount` at `event_ms` added (a new window's state if there
/// is none), or None if the sum would be inexact.
fn with_pulse(state: Option<WindowState>, amount: Decimal, event_ms: i64) -> Option<WindowState> {
    let Some(mut st) = state else { return Some(WindowState::new(Accumulator::first(amount, event_ms))) };
    add_pulse(&mut st, amount, event_ms).then_some(st)
}

/// Adds a pulse to `st`; false, with `st` unchanged, if the sum would be inexact.
fn add_pulse(st: &mut WindowState, amount: Decimal, event_ms: i64) -> bool {
    if st.acc.add(amount, event_ms).is_err() {
        return false;
    }
    st.updated_since_emit = true;
    true
}
