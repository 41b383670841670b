//! Process-wide counters. Stages update them lock-free; `/metrics` and the end-of-run
//! summaries read them.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

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
    /// CloudEvents read, by whether a meter counted them (SPEC §10): metered events
    /// became one grouped record per meter; unmetered ones match no meter's type and
    /// stay in the source topic only (a replay with such a meter counts them).
    pub events_metered: AtomicU64,
    pub events_unmetered: AtomicU64,
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
    /// Latencies, lag, transactions, restore progress and readiness (issue 7).
    pub ops: OpsMetrics,
}

/// Upper bounds (seconds) for latencies from milliseconds to hours: window-close
/// delay is normally below a second, end-to-end latency includes the window size.
pub const LATENCY_BUCKETS: &[f64] =
    &[0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0, 7200.0];
/// Upper bounds (seconds) for a checkpoint (a RocksDB snapshot of one partition).
pub const CHECKPOINT_BUCKETS: &[f64] = &[0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0];

/// A histogram with fixed upper bounds, updated lock-free.
#[derive(Debug)]
pub struct Histogram {
    bounds: &'static [f64],
    /// Non-cumulative: `buckets[i]` counts observations in (bounds[i-1], bounds[i]];
    /// the last one counts those above every bound.
    buckets: Vec<AtomicU64>,
    count: AtomicU64,
    sum_micros: AtomicU64,
}

/// A histogram read at one moment: cumulative bucket counts (as Prometheus wants them).
#[derive(Debug, Clone, PartialEq)]
pub struct HistogramSnapshot {
    pub buckets: Vec<(f64, u64)>,
    pub count: u64,
    pub sum_seconds: f64,
}

impl Histogram {
    pub fn new(bounds: &'static [f64]) -> Self {
        Self {
            bounds,
            buckets: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            count: AtomicU64::new(0),
            sum_micros: AtomicU64::new(0),
        }
    }

    /// Records one observation; negative values (clock skew) count as 0.
    pub fn observe(&self, seconds: f64) {
        let s = if seconds.is_finite() { seconds.max(0.0) } else { 0.0 };
        let i = self.bounds.iter().position(|b| s <= *b).unwrap_or(self.bounds.len());
        self.buckets[i].fetch_add(1, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_micros.fetch_add((s * 1e6) as u64, Ordering::Relaxed);
    }

    pub fn observe_ms(&self, ms: i64) {
        self.observe(ms as f64 / 1000.0);
    }

    pub fn snapshot(&self) -> HistogramSnapshot {
        let mut acc = 0;
        let mut buckets = Vec::with_capacity(self.bounds.len());
        for (b, c) in self.bounds.iter().zip(&self.buckets) {
            acc += c.load(Ordering::Relaxed);
            buckets.push((*b, acc));
        }
        HistogramSnapshot {
            buckets,
            count: self.count.load(Ordering::Relaxed),
            sum_seconds: self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6,
        }
    }
}

/// Histograms by one label value (the window name), created on first use.
#[derive(Debug)]
pub struct LabeledHistograms {
    bounds: &'static [f64],
    by_label: Mutex<BTreeMap<String, Arc<Histogram>>>,
}

impl LabeledHistograms {
    pub fn new(bounds: &'static [f64]) -> Self {
        Self { bounds, by_label: Mutex::new(BTreeMap::new()) }
    }

    pub fn observe_ms(&self, label: &str, ms: i64) {
        if let Some(h) = self.histogram(label) {
            h.observe_ms(ms);
        }
    }

    pub fn observe(&self, label: &str, elapsed: std::time::Duration) {
        if let Some(h) = self.histogram(label) {
            h.observe(elapsed.as_secs_f64());
        }
    }

    fn histogram(&self, label: &str) -> Option<Arc<Histogram>> {
        let mut m = self.by_label.lock().ok()?;
        Some(match m.get(label) {
            Some(h) => Arc::clone(h),
            None => Arc::clone(m.entry(label.to_owned()).or_insert_with(|| Arc::new(Histogram::new(self.bounds)))),
        })
    }

    pub fn snapshot(&self) -> Vec<(String, HistogramSnapshot)> {
        let Ok(m) = self.by_label.lock() else { return Vec::new() };
        m.iter().map(|(k, h)| (k.clone(), h.snapshot())).collect()
    }
}

/// How far a stage-2 partition's restore got, in changelog offsets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RestoreProgress {
    /// Changelog records read so far.
    pub restored: u64,
    /// Changelog offsets between the store's position and the end read to
    /// (includes transaction markers, so `restored` may end a little below it).
    pub to_restore: u64,
    pub done: bool,
}

/// A transaction's outcome, for `pulses_transactions_total{outcome}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum TxnOutcome {
    Committed,
    Aborted,
}

impl TxnOutcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Committed => "committed",
            Self::Aborted => "aborted",
        }
    }
}

/// Consumer lag of one assigned partition: (stage, topic, partition) → records behind.
pub type LagKey = (String, String, i32);

/// What an operator watches beyond the plain counters.
#[derive(Debug)]
pub struct OpsMetrics {
    /// By window: the watermark passed window_end + grace (the final record was
    /// emitted) → the transaction holding that record committed.
    pub close_delay: LabeledHistograms,
    /// By window: last_event_time of a final aggregate → its commit.
    pub end_to_end: LabeledHistograms,
    pub checkpoint_duration: Histogram,
    /// By stage: a commit of the stage loop, which blocks it (state changes handed to
    /// the producer, the transaction or flush, the local state write).
    pub commit_duration: LabeledHistograms,
    /// By stage: the Kafka part of it (flush, offsets, transaction commit).
    pub transaction_duration: LabeledHistograms,
    pub transactions: Mutex<BTreeMap<(String, TxnOutcome), u64>>,
    /// By stage: times a failed stage was replaced in-process (see `runtime::supervise`).
    pub stage_restarts: Mutex<BTreeMap<String, u64>>,
    pub lag: Mutex<BTreeMap<LagKey, i64>>,
    pub restore: Mutex<BTreeMap<i32, RestoreProgress>>,
    pub readiness: crate::ops::health::Readiness,
}

impl Default for OpsMetrics {
    fn default() -> Self {
        Self {
            close_delay: LabeledHistograms::new(LATENCY_BUCKETS),
            end_to_end: LabeledHistograms::new(LATENCY_BUCKETS),
            checkpoint_duration: Histogram::new(CHECKPOINT_BUCKETS),
            commit_duration: LabeledHistograms::new(CHECKPOINT_BUCKETS),
            transaction_duration: LabeledHistograms::new(CHECKPOINT_BUCKETS),
            transactions: Mutex::new(BTreeMap::new()),
            stage_restarts: Mutex::new(BTreeMap::new()),
            lag: Mutex::new(BTreeMap::new()),
            restore: Mutex::new(BTreeMap::new()),
            readiness: Default::default(),
        }
    }
}

impl OpsMetrics {
    pub fn count_stage_restart(&self, stage: &str) {
        if let Ok(mut r) = self.stage_restarts.lock() {
            *r.entry(stage.to_owned()).or_insert(0) += 1;
        }
    }

    pub fn count_transaction(&self, stage: &str, outcome: TxnOutcome) {
        if let Ok(mut t) = self.transactions.lock() {
            *t.entry((stage.to_owned(), outcome)).or_insert(0) += 1;
        }
    }

    /// Replaces the lag of every partition of `stage` with `lags` (topic, partition, lag):
    /// a revoked partition's series disappears.
    pub fn set_lag(&self, stage: &str, lags: impl IntoIterator<Item = (String, i32, i64)>) {
        if let Ok(mut l) = self.lag.lock() {
            l.retain(|(s, _, _), _| s != stage);
            for (topic, partition, lag) in lags {
                l.insert((stage.to_owned(), topic, partition), lag);
            }
        }
    }

    pub fn set_restore(&self, partition: i32, progress: RestoreProgress) {
        if let Ok(mut r) = self.restore.lock() {
            r.insert(partition, progress);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative() {
        let h = Histogram::new(&[0.1, 1.0]);
        for s in [0.05, 0.1, 0.5, 3.0, -1.0] {
            h.observe(s);
        }
        let snap = h.snapshot();
        assert_eq!(snap.buckets, vec![(0.1, 3), (1.0, 4)]);
        assert_eq!(snap.count, 5);
        assert!((snap.sum_seconds - 3.65).abs() < 1e-9);
    }

    #[test]
    fn lag_of_a_stage_is_replaced_whole() {
        let m = OpsMetrics::default();
        m.set_lag("group", [("t".to_owned(), 0, 5), ("t".to_owned(), 1, 7)]);
        m.set_lag("aggregate", [("g".to_owned(), 0, 1)]);
        m.set_lag("group", [("t".to_owned(), 1, 2)]);
        let l = m.lag.lock().unwrap();
        assert_eq!(l.len(), 2);
        assert_eq!(l[&("group".to_owned(), "t".to_owned(), 1)], 2);
    }
}
