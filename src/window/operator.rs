//! The window operator of one input partition: dedupe, assign, aggregate, close,
//! correct, purge. Like Flink's window operator, it is driven by records and by time
//! (the idle advance and interim updates); unlike it, it has no I/O of its own: state
//! goes through a [`WindowStore`] and results come back as [`Output`]s.

use std::collections::hash_map::Entry;
use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::Arc;

use super::aggregate::{exact_add, Accumulator, GroupKey, WindowAggregate};
use super::assign::window_bounds;
use super::store::{WindowKey, WindowState, WindowStore};
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

/// Window state of one input partition.
pub struct WindowOperator {
    settings: Arc<WindowSettings>,
    watermark: Watermark,
    open: HashMap<WindowKey, WindowState, FastHash>,
    /// Open windows in closing order (`WindowKey` sorts by `end` first).
    by_end: BTreeSet<WindowKey>,
    /// Open windows changed since the last [`flush`](Self::flush).
    dirty: HashSet<WindowKey, FastHash>,
    watermark_dirty: bool,
    /// The windows one pulse updates, reused from pulse to pulse.
    updates: Vec<(WindowKey, WindowState, bool)>,
}

impl WindowOperator {
    /// Restores the operator from `store` (an empty store gives a fresh operator).
    pub fn restore<S: WindowStore>(settings: Arc<WindowSettings>, store: &mut S) -> Result<Self, S::Error> {
        let watermark = store.load_watermark()?.unwrap_or_default();
        let open: HashMap<_, _, FastHash> = store.load_open()?.into_iter().collect();
        let by_end = open.keys().cloned().collect();
        Ok(Self { settings, watermark, open, by_end, dirty: HashSet::default(), watermark_dirty: false, updates: Vec::new() })
    }

    pub fn watermark(&self) -> &Watermark {
        &self.watermark
    }

    pub fn open_windows(&self) -> usize {
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
        let key = Arc::new(GroupKey::new(pulse.tenant_id.as_str(), pulse.product_sku.as_str(), pulse.use_unit.as_str()));
        let mut updates = std::mem::take(&mut self.updates);
        updates.clear();
        for (i, spec) in s.windows.iter().enumerate() {
            let (start, end) = window_bounds(pulse.event_time, spec.size_ms());
            let k = WindowKey { end, window: i as u16, start, key: Arc::clone(&key) };
            let closed = started && end.saturating_add(s.grace_ms) <= w;
            let state = if closed { store.get_closed(&k)? } else { self.open.get(&k).cloned() };
            let state = match state {
                None => WindowState::new(Accumulator::first(pulse.used_amount, pulse.event_time)),
                Some(mut st) => {
                    if exact_add(st.acc.total, pulse.used_amount).is_none() {
                        out.push(Output::Late { pulse: pulse.clone(), reason: LateReason::InexactSum });
                        self.updates = updates;
                        return Ok(());
                    }
                    // Checked just above, so this cannot fail.
                    let _ = st.acc.add(pulse.used_amount, pulse.event_time);
                    st.updated_since_emit = true;
                    st
                }
            };
            updates.push((k, state, closed));
        }
        self.watermark.observe(pulse.event_time, wall_ms);
        self.watermark_dirty = true;
        store.mark_seen(&pulse.tenant_id, &pulse.pulse_id, self.watermark.current);
        for (k, mut state, closed) in updates.drain(..) {
            if closed {
                // A correction: re-emit the closed window with the next revision.
                out.push(Output::Aggregate { record: self.record(&k, &state, true, wall_ms), correction: true });
                state.next_revision += 1;
                store.put_closed(&k, &state);
                continue;
            }
            match self.open.entry(k) {
                Entry::Occupied(mut e) => {
                    if !self.dirty.contains(e.key()) {
                        self.dirty.insert(e.key().clone());
                    }
                    *e.get_mut() = state;
                }
                Entry::Vacant(e) => {
                    self.by_end.insert(e.key().clone());
                    self.dirty.insert(e.key().clone());
                    e.insert(state);
                }
            }
        }
        self.updates = updates;
        self.close_ready(wall_ms, store, out);
        Ok(())
    }

    /// Time passes without input: advance an idle partition's watermark, emit due
    /// interim updates, and close what is ready. `input_waiting`: the caller knows of
    /// records of this partition not yet processed. Such a partition is behind, not
    /// idle, whatever the wall clock says: advancing it would close windows its backlog
    /// still belongs to (after downtime, beyond retention: the late topic).
    pub fn on_time<S: WindowStore>(&mut self, wall_ms: i64, input_waiting: bool, store: &mut S, out: &mut Vec<Output>) {
        if input_waiting {
            self.watermark.hold(wall_ms);
        } else if self.watermark.advance_idle(wall_ms, self.settings.idle_timeout_ms) {
            self.watermark_dirty = true;
            self.close_ready(wall_ms, store, out);
        }
        self.emit_updates(wall_ms, out);
    }

    /// Closes every open window (bounded replay at end of input, or tests).
    pub fn close_all<S: WindowStore>(&mut self, end_at_most: i64, wall_ms: i64, store: &mut S, out: &mut Vec<Output>) {
        while let Some(k) = self.by_end.first().cloned() {
            if k.end > end_at_most {
                break;
            }
            self.close(k, wall_ms, store, out);
        }
    }

    /// Writes changed open windows and the watermark into the store, and purges state
    /// that retention and the dedupe horizon no longer need. Call before committing.
    pub fn flush<S: WindowStore>(&mut self, store: &mut S) -> Result<(), S::Error> {
        for k in self.dirty.drain() {
            if let Some(st) = self.open.get(&k) {
                store.put_open(&k, st);
            }
        }
        if self.watermark_dirty {
            store.put_watermark(&self.watermark);
            self.watermark_dirty = false;
            let w = self.watermark.current;
            store.purge_closed(w.saturating_sub(self.settings.retention_ms))?;
            store.expire_seen(w.saturating_sub(self.settings.dedupe_horizon_ms))?;
        }
        Ok(())
    }

    fn close_ready<S: WindowStore>(&mut self, wall_ms: i64, store: &mut S, out: &mut Vec<Output>) {
        let bound = self.watermark.current.saturating_sub(self.settings.grace_ms);
        self.close_all(bound, wall_ms, store, out);
    }

    fn close<S: WindowStore>(&mut self, k: WindowKey, wall_ms: i64, store: &mut S, out: &mut Vec<Output>) {
        self.by_end.remove(&k);
        self.dirty.remove(&k);
        if let Some(mut state) = self.open.remove(&k) {
            out.push(Output::Aggregate { record: self.record(&k, &state, true, wall_ms), correction: false });
            state.next_revision += 1;
            state.updated_since_emit = false;
            store.delete_open(&k);
            store.put_closed(&k, &state);
        }
    }

    fn emit_updates(&mut self, wall_ms: i64, out: &mut Vec<Output>) {
        let s = Arc::clone(&self.settings);
        for (k, st) in self.open.iter_mut() {
            let spec = &s.windows[k.window as usize];
            if spec.emit != EmitMode::Updates
                || !st.updated_since_emit
                || wall_ms.saturating_sub(st.last_emit_wall_ms) < s.update_interval_ms
            {
                continue;
            }
            out.push(Output::Aggregate {
                record: WindowAggregate::new(&k.key, &spec.name, k.start, k.end, &st.acc, st.next_revision, false, wall_ms),
                correction: false,
            });
            st.next_revision += 1;
            st.updated_since_emit = false;
            st.last_emit_wall_ms = wall_ms;
            self.dirty.insert(k.clone());
        }
    }

    fn record(&self, k: &WindowKey, st: &WindowState, is_final: bool, wall_ms: i64) -> WindowAggregate {
        let name = &self.settings.windows[k.window as usize].name;
        WindowAggregate::new(&k.key, name, k.start, k.end, &st.acc, st.next_revision, is_final, wall_ms)
    }
}
