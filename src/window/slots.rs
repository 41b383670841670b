//! Which configured window a stored window belongs to.
//!
//! Stored state names a window size by a small number, its slot, so keys stay short.
//! The slot table (slot → name and size) is stored with the state, and goes to its
//! changelog like any other state, so a slot keeps meaning the same window across
//! restarts and replicas. When `[[windows]]` entries are reordered, added or removed
//! between two runs, each configured window finds its slot by name and size (a new
//! one gets a new slot); what cannot be mapped without mislabelling a window is refused
//! with [`WindowsChanged`], which says what changed. A slot is never reused, so closed
//! windows of a removed size (purged by retention) can never be read as another size.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

use super::WindowSpec;

/// A window size's identity in stored state: its name and size.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WindowId {
    pub name: String,
    pub size_ms: i64,
}

impl WindowId {
    pub fn of(spec: &WindowSpec) -> Self {
        Self { name: spec.name.clone(), size_ms: spec.size_ms() }
    }
}

/// The slots of one store, resolved against the configured windows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WindowSlots {
    /// The stored table with the configured windows new to it appended; index = slot.
    table: Vec<WindowId>,
    /// Slot of each configured window, in configuration order.
    of_config: Vec<u16>,
    /// Configured window of each slot (`None`: no longer configured).
    config_of: Vec<Option<usize>>,
    /// The table differs from the stored one (or none was stored): write it.
    changed: bool,
}

/// One reason the configured windows cannot take over the stored state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WindowChange {
    /// Same name, another size: its aggregate ids (derived from name and start) would
    /// be those of windows of the old size already emitted and billed.
    Resized { name: String, stored_ms: i64, configured_ms: i64 },
    /// No longer configured, with open windows not yet emitted.
    RemovedWhileOpen { name: String, size_ms: i64, open_buckets: usize, last_end: i64 },
    /// Open windows under a slot the table does not name (state written by a pulses
    /// without slot tables after windows were removed, or damaged).
    UnknownSlot { slot: u16, open_buckets: usize },
}

/// The configured windows cannot take over the stored state without mislabelling or
/// losing windows; nothing was changed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct WindowsChanged(pub Vec<WindowChange>);

impl fmt::Display for WindowsChanged {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "the configured [[windows]] do not match the stored window state")?;
        for change in &self.0 {
            match change {
                WindowChange::Resized { name, stored_ms, configured_ms } => write!(
                    f,
                    "; window {name:?} is configured as {} but the state holds it as {}: a window keeps its size as \
                     long as its name (aggregate ids derive from the name and window start, so a resized window would \
                     reuse the ids of windows already emitted and billed). Give the new size a new name, or set {name:?} \
                     back to {}",
                    size(*configured_ms),
                    size(*stored_ms),
                    size(*stored_ms)
                )?,
                WindowChange::RemovedWhileOpen { name, size_ms, open_buckets, last_end } => write!(
                    f,
                    "; window {name:?} ({}) is no longer configured but the state holds {open_buckets} open window \
                     bucket(s) of it, not yet emitted (the last ends at {}). Configure it again until they are \
                     emitted, then remove it",
                    size(*size_ms),
                    crate::pulse::time::format_ms(*last_end)
                )?,
                WindowChange::UnknownSlot { slot, open_buckets } => write!(
                    f,
                    "; the state holds {open_buckets} open window bucket(s) of window slot {slot}, which no stored \
                     window name accounts for (written before slots were named, after a window was removed?)"
                )?,
            }
        }
        Ok(())
    }
}

/// "1h", "10s", "1500ms".
fn size(ms: i64) -> String {
    match ms {
        ms if ms % 3_600_000 == 0 => format!("{}h", ms / 3_600_000),
        ms if ms % 60_000 == 0 => format!("{}m", ms / 60_000),
        ms if ms % 1_000 == 0 => format!("{}s", ms / 1_000),
        ms => format!("{ms}ms"),
    }
}

impl WindowSlots {
    /// Slots for `windows` over a fresh store.
    pub fn fresh(windows: &[WindowSpec]) -> Self {
        Self::from_table(windows.iter().map(WindowId::of).collect(), windows, true)
    }

    /// Maps the configured `windows` onto the `stored` table. `open` lists the open
    /// buckets in the store by slot and end. A store written before slot tables
    /// (`stored` = None) numbered windows by their configuration order then, which is
    /// assumed to be today's.
    pub fn resolve(
        windows: &[WindowSpec],
        stored: Option<Vec<WindowId>>,
        open: impl IntoIterator<Item = (u16, i64)>,
    ) -> Result<Self, WindowsChanged> {
        let (mut table, mut changed) = match stored {
            Some(t) => (t, false),
            None => (windows.iter().map(WindowId::of).collect(), true),
        };
        let mut problems = Vec::new();
        for spec in windows {
            let id = WindowId::of(spec);
            match table.iter().find(|t| t.name == id.name) {
                Some(t) if t.size_ms != id.size_ms => problems.push(WindowChange::Resized {
                    name: id.name.clone(),
                    stored_ms: t.size_ms,
                    configured_ms: id.size_ms,
                }),
                Some(_) => {}
                None => {
                    table.push(id);
                    changed = true;
                }
            }
        }
        let slots = Self::from_table(table, windows, changed);
        // Open buckets per slot that no configured window takes over.
        let mut orphans: BTreeMap<u16, (usize, i64)> = BTreeMap::new();
        for (slot, end) in open {
            if slots.config_index(slot).is_none() {
                let e = orphans.entry(slot).or_insert((0, i64::MIN));
                *e = (e.0 + 1, e.1.max(end));
            }
        }
        for (slot, (open_buckets, last_end)) in orphans {
            problems.push(match slots.table.get(slot as usize) {
                Some(id) => WindowChange::RemovedWhileOpen { name: id.name.clone(), size_ms: id.size_ms, open_buckets, last_end },
                None => WindowChange::UnknownSlot { slot, open_buckets },
            });
        }
        if slots.table.len() > usize::from(u16::MAX) + 1 {
            // Never in practice: every distinct name ever configured takes one slot.
            problems.push(WindowChange::UnknownSlot { slot: u16::MAX, open_buckets: 0 });
        }
        if problems.is_empty() {
            Ok(slots)
        } else {
            Err(WindowsChanged(problems))
        }
    }

    /// Maps each configured window to the slot of the same name and size. One that has
    /// none (resized: [`Self::resolve`] refuses it) maps to no slot and takes none over.
    fn from_table(table: Vec<WindowId>, windows: &[WindowSpec], changed: bool) -> Self {
        let mut config_of = vec![None; table.len()];
        let mut of_config = Vec::with_capacity(windows.len());
        for (i, spec) in windows.iter().enumerate() {
            match table.iter().position(|t| t.name == spec.name && t.size_ms == spec.size_ms()) {
                Some(slot) => {
                    config_of[slot] = Some(i);
                    of_config.push(slot as u16);
                }
                None => of_config.push(u16::MAX),
            }
        }
        Self { table, of_config, config_of, changed }
    }

    /// The slot of the `i`-th configured window.
    pub fn slot(&self, i: usize) -> u16 {
        self.of_config[i]
    }

    /// The configured window of `slot`, if it still is configured.
    pub fn config_index(&self, slot: u16) -> Option<usize> {
        self.config_of.get(slot as usize).copied().flatten()
    }

    /// The name of `slot`'s window (configured or not).
    pub fn name(&self, slot: u16) -> &str {
        self.table.get(slot as usize).map_or("", |id| id.name.as_str())
    }

    /// The table to store, if it is not stored yet (taken once).
    pub fn take_changed(&mut self) -> Option<&[WindowId]> {
        std::mem::take(&mut self.changed).then_some(self.table.as_slice())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::window::EmitMode;

    fn spec(name: &str, ms: u64) -> WindowSpec {
        WindowSpec::new(name, ms, EmitMode::Final)
    }

    fn id(name: &str, ms: i64) -> WindowId {
        WindowId { name: name.into(), size_ms: ms }
    }

    #[test]
    fn a_fresh_store_numbers_windows_in_configuration_order() {
        let mut s = WindowSlots::fresh(&[spec("minute", 60_000), spec("hour", 3_600_000)]);
        assert_eq!((s.slot(0), s.slot(1)), (0, 1));
        assert_eq!(s.take_changed(), Some(&[id("minute", 60_000), id("hour", 3_600_000)][..]));
        assert_eq!(s.take_changed(), None, "written once");
    }

    #[test]
    fn reordered_and_added_windows_keep_their_slots() {
        let stored = vec![id("inflight", 1_000), id("minute", 60_000), id("hour", 3_600_000)];
        let config = [spec("hour", 3_600_000), spec("day", 86_400_000), spec("inflight", 1_000), spec("minute", 60_000)];
        let mut s = WindowSlots::resolve(&config, Some(stored), [(0, 5_000), (2, 3_600_000)]).unwrap();
        assert_eq!((0..4).map(|i| s.slot(i)).collect::<Vec<_>>(), vec![2, 3, 0, 1]);
        assert_eq!((s.name(0), s.name(1), s.name(2), s.name(3)), ("inflight", "minute", "hour", "day"));
        assert_eq!(s.config_index(3), Some(1));
        assert_eq!(s.take_changed().map(<[_]>::len), Some(4), "the new slot is stored");
        let unchanged = WindowSlots::resolve(&config[..1], Some(vec![id("hour", 3_600_000)]), []);
        assert_eq!(unchanged.map(|mut s| s.take_changed().is_none()), Ok(true));
    }

    #[test]
    fn a_removed_window_without_open_windows_keeps_its_slot_unused() {
        let stored = vec![id("inflight", 1_000), id("minute", 60_000)];
        let s = WindowSlots::resolve(&[spec("minute", 60_000)], Some(stored.clone()), [(1, 60_000)]).unwrap();
        assert_eq!((s.slot(0), s.config_index(0), s.name(0)), (1, None, "inflight"));
        // Added again later: the same slot, so its closed windows are its own again.
        let s = WindowSlots::resolve(&[spec("minute", 60_000), spec("inflight", 1_000)], Some(stored), []).unwrap();
        assert_eq!((s.slot(0), s.slot(1)), (1, 0));
    }

    #[test]
    fn resizing_a_name_or_removing_a_window_with_open_windows_is_refused() {
        let stored = vec![id("inflight", 1_000), id("minute", 60_000)];
        let err = WindowSlots::resolve(&[spec("minute", 120_000)], Some(stored), [(0, 2_000), (0, 3_000), (1, 60_000)]).unwrap_err();
        assert_eq!(err.0, vec![
            WindowChange::Resized { name: "minute".into(), stored_ms: 60_000, configured_ms: 120_000 },
            WindowChange::RemovedWhileOpen { name: "inflight".into(), size_ms: 1_000, open_buckets: 2, last_end: 3_000 },
            WindowChange::RemovedWhileOpen { name: "minute".into(), size_ms: 60_000, open_buckets: 1, last_end: 60_000 },
        ]);
        let text = err.to_string();
        for part in ["\"minute\" is configured as 2m but the state holds it as 1m", "\"inflight\" (1s) is no longer configured",
            "2 open window bucket(s)", "1970-01-01T00:00:03.000Z"] {
            assert!(text.contains(part), "{part:?} in {text}");
        }
    }

    #[test]
    fn a_store_without_a_table_is_read_in_todays_order() {
        let config = [spec("a", 1_000), spec("b", 10_000)];
        let mut s = WindowSlots::resolve(&config, None, [(1, 10_000)]).unwrap();
        assert_eq!((s.slot(0), s.slot(1)), (0, 1));
        assert!(s.take_changed().is_some(), "the table is stored from now on");
        let err = WindowSlots::resolve(&config, None, [(2, 10_000)]).unwrap_err();
        assert_eq!(err.0, vec![WindowChange::UnknownSlot { slot: 2, open_buckets: 1 }]);
    }
}
