//! The window operator of one input partition: dedupe, assign, aggregate, close,
//! correct, purge. Like Flink's window operator, it is driven by records and by time
//! (the idle advance and interim updates); unlike it, it has no I/O of its own: state
//! goes through a [`WindowStore`] and results come back as [`Output`]s.

use std::sync::Arc;

use super::aggregate::{GroupKey, GroupKeyRef, Sample, WindowAggregate};
use super::assign::window_bounds;
use super::cache::{Closing, WindowCache, WindowRef};
use super::keys::GroupId;
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

/// Open windows a fresh operator keeps in memory until told otherwise
/// ([`WindowOperator::set_cache_capacity`]).
pub const DEFAULT_CACHE_WINDOWS: usize = 250_000;

/// Window state of one input partition.
///
/// Open windows live in the store, under a bounded write-back cache of them
/// (`window::cache`: Kafka Streams' record cache over its RocksDB window store, Flink's
/// RocksDB state backend); closed windows within retention and the counted pulse ids
/// are read and written in the store directly.
pub struct WindowOperator {
    settings: Arc<WindowSettings>,
    /// The store's slot of each configured window, and back.
    slots: WindowSlots,
    watermark: Watermark,
    windows: WindowCache,
    watermark_dirty: bool,
    /// The bounds of the last pulse's windows, and the closed windows counting it
    /// corrects (written once all its windows took it): reused from pulse to pulse.
    bounds: Vec<(i64, i64)>,
    corrections: Vec<(WindowKey, WindowState)>,
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
        Ok(Self {
            settings,
            slots,
            watermark,
            windows: WindowCache::new(buckets, DEFAULT_CACHE_WINDOWS),
            watermark_dirty: false,
            bounds: Vec::new(),
            corrections: Vec::new(),
        })
    }

    /// How many open windows to keep in memory (at least one); beyond it the least
    /// recently used are evicted at the next [`flush`](Self::flush).
    pub fn set_cache_capacity(&mut self, windows: usize) {
        self.windows.set_capacity(windows);
    }

    pub fn watermark(&self) -> &Watermark {
        &self.watermark
    }

    /// Open windows held in memory (all open windows are in the store after a flush).
    pub fn cached_windows(&self) -> usize {
        self.windows.cached_windows()
    }

    /// Group keys held in memory: those of cached windows, and those interned since
    /// the last sweep.
    pub fn group_keys(&self) -> usize {
        self.windows.group_keys()
    }

    /// Buckets (window size and bounds) with at least one open window.
    pub fn open_buckets(&self) -> usize {
        self.windows.open_buckets()
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
        let group = self.windows.intern(GroupKeyRef::new(&pulse.tenant_id, &pulse.product_sku, &pulse.use_unit));
        let counted = self.count(pulse, group, store);
        if !matches!(counted, Ok(true)) {
            self.windows.undo_changes();
            self.corrections.clear();
            counted?;
            out.push(Output::Late { pulse: pulse.clone(), reason: LateReason::InexactSum });
            return Ok(());
        }
        self.watermark.observe(pulse.event_time, wall_ms);
        self.watermark_dirty = true;
        store.mark_seen(&pulse.tenant_id, &pulse.pulse_id, self.watermark.current)?;
        self.windows.keep_changes();
        for (key, mut state) in self.corrections.drain(..) {
            // Re-emit the closed window with the next revision.
            let record = record(&self.slots, key.bucket(), &key.key, &state, true, wall_ms);
            out.push(Output::Aggregate { record, correction: true });
            state.next_revision += 1;
            store.put_closed(&key, &state)?;
        }
        self.close_ready(wall_ms, store, out)
    }

    /// Adds `pulse` to each of its windows (bounds in `self.bounds`): open ones through
    /// the cache (pending there), closed ones as corrections to write. False if a sum
    /// would be inexact (the caller then undoes the changes, as it does on an error).
    fn count<S: WindowStore>(&mut self, pulse: &GroupedPulse, group: GroupId, store: &mut S) -> Result<bool, S::Error> {
        let sample = Sample::of(pulse);
        let w = self.watermark.current;
        let started = self.watermark.is_started();
        let grace = self.settings.grace_ms;
        for (i, &(start, end)) in self.bounds.iter().enumerate() {
            let bucket = Bucket { end, window: self.slots.slot(i), start };
            if started && end.saturating_add(grace) <= w {
                let key = self.windows.window_key(bucket, group);
                let Some(state) = WindowState::with_pulse(store.get_closed(&key)?, sample) else { return Ok(false) };
                self.corrections.push((key, state));
                continue;
            }
            if !self.windows.add(WindowRef { bucket, group }, sample, store)? {
                return Ok(false);
            }
        }
        Ok(true)
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
        while let Some((bucket, windows)) = self.windows.close_next(end_at_most, store)? {
            self.close(bucket, windows, wall_ms, store, out)?;
        }
        Ok(())
    }

    /// Writes changed open windows and the watermark into the store, and purges state
    /// that retention and the dedupe horizon no longer need. Call before committing.
    pub fn flush<S: WindowStore>(&mut self, store: &mut S) -> Result<(), S::Error> {
        // Windows waiting for an interim update stay cached: only cached windows are
        // visited for those.
        let (s, slots) = (&self.settings, &self.slots);
        self.windows.flush(store, |bucket, st| st.updated_since_emit && emits_updates(s, slots, bucket))?;
        if self.watermark_dirty {
            store.put_watermark(&self.watermark)?;
            self.watermark_dirty = false;
            let w = self.watermark.current;
            store.purge_closed(w.saturating_sub(self.settings.retention_ms))?;
            store.expire_seen(w.saturating_sub(self.settings.dedupe_horizon_ms))?;
        }
        Ok(())
    }

    fn close_ready<S: WindowStore>(&mut self, wall_ms: i64, store: &mut S, out: &mut Vec<Output>) -> Result<(), S::Error> {
        let bound = self.watermark.current.saturating_sub(self.settings.grace_ms);
        self.close_all(bound, wall_ms, store, out)
    }

    /// Emits the final record of each window of a closing bucket and moves it to the
    /// closed windows.
    fn close<S: WindowStore>(
        &mut self,
        bucket: Bucket,
        windows: Vec<Closing>,
        wall_ms: i64,
        store: &mut S,
        out: &mut Vec<Output>,
    ) -> Result<(), S::Error> {
        for Closing { key, mut state, stored } in windows {
            out.push(Output::Aggregate { record: record(&self.slots, bucket, &key.key, &state, true, wall_ms), correction: false });
            state.next_revision += 1;
            state.updated_since_emit = false;
            if stored {
                store.delete_open(&key)?;
            }
            store.put_closed(&key, &state)?;
        }
        Ok(())
    }

    /// Interim records of `emit = "updates"` windows. Such a window is not evicted
    /// while an update is due, so the cache holds all of them.
    fn emit_updates(&mut self, wall_ms: i64, out: &mut Vec<Output>) {
        let (s, slots) = (&self.settings, &self.slots);
        if !s.windows.iter().any(|spec| spec.emit == EmitMode::Updates) {
            return;
        }
        self.windows.change_cached(
            |bucket| emits_updates(s, slots, bucket),
            |bucket, key, st| {
                if !st.updated_since_emit || wall_ms.saturating_sub(st.last_emit_wall_ms) < s.update_interval_ms {
                    return false;
                }
                out.push(Output::Aggregate { record: record(slots, bucket, key, st, false, wall_ms), correction: false });
                st.next_revision += 1;
                st.updated_since_emit = false;
                st.last_emit_wall_ms = wall_ms;
                true
            },
        );
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
