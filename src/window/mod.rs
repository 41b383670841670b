//! Event-time windows: the pure core of stage 2 (no Kafka, no RocksDB).
//!
//! - [`assign`]: which tumbling window an event time falls in;
//! - [`watermark`]: per-partition stream time, and its idle advance;
//! - [`aggregate`]: the exact accumulator and the emitted aggregate record;
//! - [`slots`]: which configured window each stored window belongs to, across
//!   configuration changes;
//! - [`operator`]: the window operator that ties them together over a [`WindowStore`],
//!   through a write-back cache of open windows (`cache`, `keys`).
//!
//! Semantics (SPEC §4): a window `[start, end)` closes when the watermark reaches
//! `end + grace` and is emitted once with `final: true`. A pulse for a closed window
//! still within `end + retention` re-emits it with `revision + 1`; a pulse beyond
//! retention for any window goes to the late topic and is counted in none, so every
//! window size always sums to the same total.

pub mod aggregate;
pub mod assign;
mod cache;
mod keys;
#[cfg(any(test, feature = "bench-doubles"))]
pub mod memory;
pub mod operator;
pub mod slots;
pub mod store;
pub mod watermark;

use std::time::Duration;

use serde::Deserialize;

pub use aggregate::{Accumulator, GroupKey, WindowAggregate};
pub use operator::{Output, RestoreError, WindowOperator};
pub use store::WindowStore;

/// When a window is emitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EmitMode {
    /// Once, on close (`final: true`), plus corrections.
    Final,
    /// Also non-final interim records at most every `update_interval` while open.
    Updates,
}

/// One named tumbling window size.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WindowSpec {
    pub name: String,
    #[serde(deserialize_with = "crate::pulse::time::duration")]
    pub size: Duration,
    #[serde(default = "default_emit")]
    pub emit: EmitMode,
}

fn default_emit() -> EmitMode {
    EmitMode::Final
}

impl WindowSpec {
    pub fn new(name: &str, size_ms: u64, emit: EmitMode) -> Self {
        Self { name: name.to_owned(), size: Duration::from_millis(size_ms), emit }
    }

    pub fn size_ms(&self) -> i64 {
        self.size.as_millis() as i64
    }

    /// The SPEC §4 defaults: inflight 1s, postflight 10s, minute 1m, hour 1h.
    pub fn defaults() -> Vec<WindowSpec> {
        vec![
            Self::new("inflight", 1_000, EmitMode::Final),
            Self::new("postflight", 10_000, EmitMode::Final),
            Self::new("minute", 60_000, EmitMode::Final),
            Self::new("hour", 3_600_000, EmitMode::Final),
        ]
    }
}

/// Timing rules of the window operator, all in milliseconds of event time except
/// `idle_timeout` and `update_interval`, which are wall-clock.
#[derive(Debug, Clone, PartialEq)]
pub struct WindowSettings {
    pub windows: Vec<WindowSpec>,
    pub grace_ms: i64,
    pub retention_ms: i64,
    pub idle_timeout_ms: i64,
    pub dedupe_horizon_ms: i64,
    pub update_interval_ms: i64,
}

impl Default for WindowSettings {
    fn default() -> Self {
        Self {
            windows: WindowSpec::defaults(),
            grace_ms: 5_000,
            retention_ms: 3_600_000,
            idle_timeout_ms: 30_000,
            dedupe_horizon_ms: 86_400_000,
            update_interval_ms: 1_000,
        }
    }
}

#[cfg(test)]
pub(crate) mod tests;
