//! Per-partition watermark: the highest event time seen (stream time), advanced with
//! the wall clock when the partition goes idle so trailing windows still close.

use serde::{Deserialize, Serialize};

/// Watermark state of one input partition. Persisted with the partition's store.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Watermark {
    /// Current watermark (ms). `i64::MIN` until the first record.
    pub current: i64,
    /// Wall-clock time of the last record (ms).
    pub last_input_wall_ms: i64,
    /// The watermark right after the last record.
    pub last_input_watermark: i64,
}

impl Default for Watermark {
    fn default() -> Self {
        Self { current: i64::MIN, last_input_wall_ms: i64::MIN, last_input_watermark: i64::MIN }
    }
}

impl Watermark {
    pub fn is_started(&self) -> bool {
        self.current != i64::MIN
    }

    /// A record with `event_ms` arrived at `wall_ms`.
    pub fn observe(&mut self, event_ms: i64, wall_ms: i64) {
        self.current = self.current.max(event_ms);
        self.last_input_wall_ms = wall_ms;
        self.last_input_watermark = self.current;
    }

    /// Records are known to be waiting for this partition (a backlog, or a restart after
    /// downtime): it is behind, not idle, so the idle clock starts again at `wall_ms`.
    pub fn hold(&mut self, wall_ms: i64) {
        self.last_input_wall_ms = self.last_input_wall_ms.max(wall_ms);
    }

    /// Idle advance: once no record arrived for `idle_timeout_ms`, stream time moves on
    /// with the wall clock, from where the last record left it (so producer clock skew
    /// does not matter) and at least to `now - idle_timeout` (so old, replayed data
    /// also closes). Returns whether the watermark moved.
    pub fn advance_idle(&mut self, wall_ms: i64, idle_timeout_ms: i64) -> bool {
        if !self.is_started() || wall_ms.saturating_sub(self.last_input_wall_ms) < idle_timeout_ms {
            return false;
        }
        let elapsed = wall_ms.saturating_sub(self.last_input_wall_ms);
        let target = self.last_input_watermark.saturating_add(elapsed).max(wall_ms - idle_timeout_ms);
        if target > self.current {
            self.current = target;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn highest_event_time_wins() {
        let mut w = Watermark::default();
        assert!(!w.is_started());
        w.observe(5_000, 100);
        w.observe(3_000, 101); // out of order: no step back
        assert_eq!(w.current, 5_000);
    }

    #[test]
    fn idle_advance_only_after_timeout() {
        let mut w = Watermark::default();
        assert!(!w.advance_idle(1_000_000, 30_000), "never-started partitions stay put");
        w.observe(10_000, 1_000_000);
        assert!(!w.advance_idle(1_029_999, 30_000));
        assert_eq!(w.current, 10_000);
        assert!(w.advance_idle(1_030_000, 30_000));
        // max(last watermark + elapsed, now - idle) = max(40_000, 1_000_000)
        assert_eq!(w.current, 1_000_000);
        let mut skewed = Watermark::default();
        skewed.observe(5_000_000, 1_000_000); // producer clock ahead of ours
        assert!(skewed.advance_idle(1_040_000, 30_000));
        assert_eq!(skewed.current, 5_040_000);
    }

    #[test]
    fn a_partition_with_records_waiting_is_not_idle() {
        let mut w = Watermark::default();
        w.observe(10_000, 1_000_000);
        // Records are waiting from 1_000_000 to 1_050_000 (e.g. the replica was down).
        w.hold(1_050_000);
        assert!(!w.advance_idle(1_050_000, 30_000), "the idle clock restarted");
        assert!(!w.advance_idle(1_079_999, 30_000));
        assert_eq!(w.current, 10_000);
        assert!(w.advance_idle(1_080_000, 30_000), "idle once nothing arrived for the timeout after the hold");
        // max(last watermark + elapsed since the hold, now - idle) = max(40_000, 1_050_000)
        assert_eq!(w.current, 1_050_000);
    }
}
