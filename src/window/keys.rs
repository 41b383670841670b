//! Group keys under small numbers, for the window cache ([`super::cache`]).

use std::sync::Arc;

use hashbrown::hash_table::{self, HashTable};

use super::aggregate::{GroupKey, GroupKeyRef};
use super::store::{Bucket, WindowKey};

/// A group key's index in the [`KeyTable`].
pub(super) type GroupId = u32;

/// The group keys in use, each under a small number: the cache is keyed by that
/// number, so after one hash probe and string compare per pulse its windows are found
/// without touching a string or an atomic reference count (`Arc` counts were a third
/// of the operator's own time when the cache was keyed by `Arc<GroupKey>`).
#[derive(Default)]
pub(super) struct KeyTable {
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
    pub(super) fn intern(&mut self, group: GroupKeyRef<'_>) -> GroupId {
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
    pub(super) fn find(&self, key: &GroupKey) -> Option<GroupId> {
        let group = key.borrowed();
        self.index.find(group.hash_code(), |&id| holds(&self.slots, id, group)).copied()
    }

    /// The key of a live id (one with a cached window, or interned since the last sweep).
    pub(super) fn key(&self, id: GroupId) -> &Arc<GroupKey> {
        match &self.slots[id as usize].key {
            Some(key) => key,
            None => unreachable!("group id {id} is free but still in use"),
        }
    }

    /// The store's key of the window of group `id` in `bucket`.
    pub(super) fn window_key(&self, bucket: Bucket, id: GroupId) -> WindowKey {
        WindowKey::new(bucket, Arc::clone(self.key(id)))
    }

    pub(super) fn window_added(&mut self, id: GroupId) {
        self.slots[id as usize].windows += 1;
    }

    pub(super) fn window_removed(&mut self, id: GroupId) {
        let slot = &mut self.slots[id as usize];
        debug_assert!(slot.windows > 0, "group id {id} loses a window it does not have");
        slot.windows = slot.windows.saturating_sub(1);
    }

    /// Ids in use: those of cached windows, and those interned since the last sweep.
    pub(super) fn live(&self) -> usize {
        self.slots.len() - self.free.len()
    }

    /// Frees the ids of groups without cached windows, once the table has grown enough.
    /// Only between pulses, with no group id held outside the cache.
    pub(super) fn sweep_if_grown(&mut self) {
        let live = self.live();
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
        self.after_sweep = self.live();
    }
}

/// Whether slot `id` holds the key `group`.
fn holds(slots: &[KeySlot], id: GroupId, group: GroupKeyRef<'_>) -> bool {
    slots[id as usize].key.as_deref().is_some_and(|k| group.matches(k))
}

