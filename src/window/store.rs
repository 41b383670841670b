//! What the window operator needs from its state store, as a trait over plain types.
//! The RocksDB store ([`crate::state`]) implements it; so does the in-memory test and
//! bench double ([`super::memory`]).

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::aggregate::{Accumulator, GroupKey, Sample};
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

    /// `state` with pulse `s` added (a new window's state if there is none), or None
    /// if the sum would be inexact.
    pub fn with_pulse(state: Option<Self>, s: Sample<'_>) -> Option<Self> {
        let Some(mut st) = state else { return Some(Self::new(Accumulator::of_sample(s))) };
        st.add_pulse(s).then_some(st)
    }

    /// Adds a pulse; false, with the state unchanged, if the sum would be inexact.
    pub fn add_pulse(&mut self, s: Sample<'_>) -> bool {
        if self.acc.add_sample(s).is_err() {
            return false;
        }
        self.updated_since_emit = true;
        true
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
