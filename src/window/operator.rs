//! The window operator of one input partition: dedupe, assign, aggregate, close,
//! correct, purge. Like Flink's window operator, it is driven by records and by time
//! (the idle advance and interim updates); unlike it, it has no I/O of its own: state
//! goes through a [`WindowStore`] and results come back as [`Output`]s.

use std::collections::BTreeMap;
use std::sync::Arc;

use hashbrown::hash_map::{self, HashMap};

use super::aggregate::{Accumulator, GroupKey, GroupKeyRef, WindowAggregate};
use super::assign::window_bounds;
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

/// The hasher of the operator's maps: their keys carry a precomputed hash
/// ([`GroupKey`]), so a fast non-cryptographic mixer is enough (SipHash was the top
/// hotspot of the operator).
type FastHash = foldhash::fast::RandomState;

/// Open windows a fresh operator keeps in memory until told otherwise
/// ([`WindowOperator::set_cache_capacity`]).
pub const DEFAULT_CACHE_WINDOWS: usize = 250_000;

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

/// The open windows of one bucket that are held in memory, by group.
#[derive(Default)]
struct OpenBucket {
    cached: HashMap<Arc<GroupKey>, Cached, FastHash>,
    /// Every open window of the bucket is cached (it opened in this operator and lost
    /// none to eviction): lookups that miss and closing need not read the store.
    all_cached: bool,
}

/// The group keys in use, one shared key per group: a pulse finds its key with one
/// string compare, and then its windows in the cache by pointer (an `Arc` equal to
/// itself needs no string compare), instead of comparing strings once per window.
#[derive(Default)]
struct KeyInterner {
    keys: hashbrown::HashSet<Arc<GroupKey>, FastHash>,
    /// Keys after the last sweep: the next sweep waits until the set has grown by a
    /// quarter, so sweeping costs O(1) per key interned and dead keys stay few (every
    /// pulse may bring a new group: with a million open keys, a doubling held 37 MiB).
    after_sweep: usize,
}

impl KeyInterner {
    fn intern(&mut self, group: GroupKeyRef<'_>) -> Arc<GroupKey> {
        Arc::clone(self.keys.get_or_insert_with(&group, |g| Arc::new(g.to_key())))
    }

    /// Forgets keys nothing else holds (their windows closed or were evicted).
    fn sweep_if_grown(&mut self) {
        if self.keys.len() >= self.after_sweep + (self.after_sweep / 4).max(1024) {
            self.keys.retain(|k| Arc::strong_count(k) > 1);
            self.after_sweep = self.keys.len();
        }
    }
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
    watermark: Watermark,
    /// Every bucket with an open window (in closing order), with those of its windows
    /// that are cached; the others are only in the store.
    open: BTreeMap<Bucket, OpenBucket>,
    cached: usize,
    capacity: usize,
    /// Cached windows whose `dirty` flag was set since the last flush.
    dirty: Vec<WindowKey>,
    flushes: u32,
    watermark_dirty: bool,
    /// The windows one pulse updates, reused from pulse to pulse.
    updates: Vec<Update>,
    keys: KeyInterner,
}

/// A window one pulse changes: its key, its new state, whether the window was closed
/// (a correction) and whether the store already has it.
struct Update {
    key: WindowKey,
    state: WindowState,
    closed: bool,
    stored: bool,
}

impl WindowOperator {
    /// Restores the operator from `store` (an empty store gives a fresh operator). Open
    /// windows stay in the store until a pulse or closing needs them.
    pub fn restore<S: WindowStore>(settings: Arc<WindowSettings>, store: &mut S) -> Result<Self, S::Error> {
        let watermark = store.load_watermark()?.unwrap_or_default();
        let open = store.open_buckets()?.into_iter().map(|b| (b, OpenBucket::default())).collect();
        Ok(Self {
            settings,
            watermark,
            open,
            cached: 0,
            capacity: DEFAULT_CACHE_WINDOWS,
            dirty: Vec::new(),
            flushes: 0,
            watermark_dirty: false,
            updates: Vec::new(),
            keys: KeyInterner::default(),
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
        let w = self.watermark.current;
        let started = self.watermark.is_started();
        let s = &self.settings;
        // Counted in every window or in none, so all window sizes sum to the same total.
        if started && s.windows.iter().any(|spec| window_bounds(pulse.event_time, spec.size_ms()).1.saturating_add(s.retention_ms) <= w) {
            out.push(Output::Late { pulse: pulse.clone(), reason: LateReason::BeyondRetention });
            return Ok(());
        }
        let key = self.keys.intern(GroupKeyRef::new(&pulse.tenant_id, &pulse.product_sku, &pulse.use_unit));
        let mut updates = std::mem::take(&mut self.updates);
        updates.clear();
        for (i, spec) in s.windows.iter().enumerate() {
            let (start, end) = window_bounds(pulse.event_time, spec.size_ms());
            let k = WindowKey { end, window: i as u16, start, key: Arc::clone(&key) };
            let closed = started && end.saturating_add(s.grace_ms) <= w;
            let (state, stored) = if closed { (store.get_closed(&k)?, true) } else { self.lookup_open(&k, store)? };
            let state = match state {
                None => WindowState::new(Accumulator::first(pulse.used_amount, pulse.event_time)),
                Some(mut st) => {
                    // All windows or none: on a refusal the states changed so far are
                    // copies in `updates`, dropped here.
                    if st.acc.add(pulse.used_amount, pulse.event_time).is_err() {
                        out.push(Output::Late { pulse: pulse.clone(), reason: LateReason::InexactSum });
                        self.updates = updates;
                        return Ok(());
                    }
                    st.updated_since_emit = true;
                    st
                }
            };
            updates.push(Update { key: k, state, closed, stored });
        }
        self.watermark.observe(pulse.event_time, wall_ms);
        self.watermark_dirty = true;
        store.mark_seen(&pulse.tenant_id, &pulse.pulse_id, self.watermark.current);
        for Update { key: k, mut state, closed, stored } in updates.drain(..) {
            if closed {
                // A correction: re-emit the closed window with the next revision.
                out.push(Output::Aggregate { record: self.record(&k, &state, true, wall_ms), correction: true });
                state.next_revision += 1;
                store.put_closed(&k, &state);
                continue;
            }
            let bucket = self.open.entry(k.bucket()).or_insert_with(|| OpenBucket { all_cached: true, ..Default::default() });
            match bucket.cached.entry(Arc::clone(&k.key)) {
                hash_map::Entry::Occupied(mut e) => {
                    let c = e.get_mut();
                    c.state = state;
                    if c.touch(self.flushes) {
                        self.dirty.push(k);
                    }
                }
                hash_map::Entry::Vacant(e) => {
                    e.insert(Cached { state, dirty: true, stored, used: self.flushes });
                    self.cached += 1;
                    self.dirty.push(k);
                }
            }
        }
        self.updates = updates;
        self.close_ready(wall_ms, store, out)
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
        for k in self.dirty.drain(..) {
            // Closed windows are gone from the cache (and were written when closed).
            if let Some(c) = self.open.get_mut(&k.bucket()).and_then(|b| b.cached.get_mut(&k.key)) {
                if c.dirty {
                    store.put_open(&k, &c.state);
                    c.dirty = false;
                    c.stored = true;
                }
            }
        }
        if self.watermark_dirty {
            store.put_watermark(&self.watermark);
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

    /// An open window's state (from the cache, else the store) and whether the store
    /// has it. A window missing from a bucket that is all cached, or from every bucket,
    /// needs no store lookup: the common case of a pulse opening a new window.
    fn lookup_open<S: WindowStore>(&self, k: &WindowKey, store: &mut S) -> Result<(Option<WindowState>, bool), S::Error> {
        let Some(bucket) = self.open.get(&k.bucket()) else { return Ok((None, false)) };
        if let Some(c) = bucket.cached.get(&k.key) {
            return Ok((Some(c.state.clone()), c.stored));
        }
        if bucket.all_cached {
            return Ok((None, false));
        }
        let state = store.get_open(k)?;
        let stored = state.is_some();
        Ok((state, stored))
    }

    /// Drops the least recently used clean windows down to three quarters of the
    /// capacity (so eviction does not run on every flush). Windows waiting for an
    /// interim update stay: only cached windows are visited for those.
    fn evict(&mut self) {
        let target = self.capacity - self.capacity / 4;
        let s = &self.settings;
        let evictable = |b: &Bucket, c: &Cached| {
            !c.dirty && !(c.state.updated_since_emit && s.windows[b.window as usize].emit == EmitMode::Updates)
        };
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
        for (b, m) in self.open.iter_mut() {
            let before = evicted;
            m.cached.retain(|_, c| {
                let evict = evicted < excess && evictable(b, c) && age(c.used) >= youngest_evicted;
                evicted += usize::from(evict);
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
                match cached.remove(&k.key) {
                    Some(c) => windows.push((k.key, c.state, true)),
                    None => windows.push((k.key, state, true)),
                }
            }
        }
        windows.extend(cached.into_iter().map(|(key, c)| (key, c.state, c.stored)));
        windows.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        for (key, mut state, stored) in windows {
            let k = WindowKey::new(bucket, key);
            out.push(Output::Aggregate { record: self.record(&k, &state, true, wall_ms), correction: false });
            state.next_revision += 1;
            state.updated_since_emit = false;
            if stored {
                store.delete_open(&k);
            }
            store.put_closed(&k, &state);
        }
        Ok(())
    }

    /// Interim records of `emit = "updates"` windows. Such a window is not evicted
    /// while an update is due, so the cache holds all of them.
    fn emit_updates(&mut self, wall_ms: i64, out: &mut Vec<Output>) {
        let s = Arc::clone(&self.settings);
        for (bucket, open) in self.open.iter_mut() {
            let spec = &s.windows[bucket.window as usize];
            if spec.emit != EmitMode::Updates {
                continue;
            }
            for (key, c) in open.cached.iter_mut() {
                let st = &mut c.state;
                if !st.updated_since_emit || wall_ms.saturating_sub(st.last_emit_wall_ms) < s.update_interval_ms {
                    continue;
                }
                out.push(Output::Aggregate {
                    record: WindowAggregate::new(key, &spec.name, bucket.start, bucket.end, &st.acc, st.next_revision, false, wall_ms),
                    correction: false,
                });
                st.next_revision += 1;
                st.updated_since_emit = false;
                st.last_emit_wall_ms = wall_ms;
                if c.touch(self.flushes) {
                    self.dirty.push(WindowKey::new(*bucket, Arc::clone(key)));
                }
            }
        }
    }

    fn record(&self, k: &WindowKey, st: &WindowState, is_final: bool, wall_ms: i64) -> WindowAggregate {
        let name = &self.settings.windows[k.window as usize].name;
        WindowAggregate::new(&k.key, name, k.start, k.end, &st.acc, st.next_revision, is_final, wall_ms)
    }
}
