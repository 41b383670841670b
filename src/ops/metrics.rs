//! Process-wide counters. Stages update them lock-free; `/metrics` and the end-of-run
//! summaries read them.

use std::sync::atomic::{AtomicU64, Ordering};

use crate::pulse::RejectReason;

/// Counters of stage 1 (grouping).
#[derive(Debug, Default)]
pub struct GroupMetrics {
    /// Records read from the source topic.
    pub consumed: AtomicU64,
    /// Grouped pulses produced.
    pub grouped: AtomicU64,
    /// Records sent to the DLQ, by [`RejectReason`] (index into `RejectReason::ALL`).
    pub dlq: [AtomicU64; RejectReason::ALL.len()],
    /// Offset commits that succeeded.
    pub commits: AtomicU64,
}

impl GroupMetrics {
    pub fn dlq_total(&self) -> u64 {
        self.dlq.iter().map(|c| c.load(Ordering::Relaxed)).sum()
    }

    pub fn dlq_for(&self, reason: RejectReason) -> &AtomicU64 {
        let i = RejectReason::ALL.iter().position(|r| *r == reason).unwrap_or(0);
        &self.dlq[i]
    }
}

/// Adds `n` to a counter.
pub fn add(counter: &AtomicU64, n: u64) {
    counter.fetch_add(n, Ordering::Relaxed);
}

/// Reads a counter.
pub fn get(counter: &AtomicU64) -> u64 {
    counter.load(Ordering::Relaxed)
}

/// Counters of stage 2 (windowed aggregation).
#[derive(Debug, Default)]
pub struct AggregateMetrics {
    /// Grouped pulses read.
    pub consumed: AtomicU64,
    /// Aggregate records produced (interim, final and corrections).
    pub emitted: AtomicU64,
    /// Of those, corrections of closed windows (revision > 0 after a late pulse).
    pub corrections: AtomicU64,
    /// Pulses sent to the late topic.
    pub late: AtomicU64,
    /// Pulses not counted again because their pulse_id was already counted.
    pub duplicates: AtomicU64,
    /// Offset commits that succeeded.
    pub commits: AtomicU64,
    /// Changelog records sent (state changes).
    pub changelog_records: AtomicU64,
    /// Changelog records applied while restoring stores.
    pub restored_records: AtomicU64,
    /// Checkpoints written, and the total milliseconds they took.
    pub checkpoints: AtomicU64,
    pub checkpoint_ms: AtomicU64,
}

/// All counters of one process.
#[derive(Debug, Default)]
pub struct Metrics {
    pub group: GroupMetrics,
    pub aggregate: AggregateMetrics,
}
