//! Scenario tests of the window operator. Each scenario is generic over the store and
//! runs as a test over the in-memory store here and over the RocksDB store in
//! [`crate::state::store`] ([`operator_scenarios`]), so the test double cannot drift
//! from the real store.

use std::str::FromStr;
use std::sync::Arc;

use rust_decimal::Decimal;

use super::operator::{LateReason, Output, WindowOperator};
use super::slots::WindowId;
use super::aggregate::GroupKey;
use super::memory::MemoryStore;
use super::store::{Bucket, WindowKey, WindowState, WindowStore};
use super::watermark::Watermark;
use super::{EmitMode, WindowSettings, WindowSpec};
use crate::pulse::{GroupedPulse, SourceRef};

fn settings() -> Arc<WindowSettings> {
    Arc::new(WindowSettings {
        windows: vec![WindowSpec::new("inflight", 1_000, EmitMode::Final), WindowSpec::new("postflight", 10_000, EmitMode::Final)],
        grace_ms: 5_000,
        retention_ms: 60_000,
        idle_timeout_ms: 30_000,
        dedupe_horizon_ms: 120_000,
        update_interval_ms: 1_000,
    })
}

fn pulse(id: &str, tenant: &str, amount: &str, event_ms: i64) -> GroupedPulse {
    GroupedPulse {
        object_id: format!("o-{id}"),
        pulse_id: id.into(),
        tenant_id: tenant.into(),
        product_sku: "api.requests".into(),
        use_unit: "requests".into(),
        used_amount: Decimal::from_str(amount).unwrap(),
        event_time: event_ms,
        attributes: None,
        source: SourceRef { topic: "t".into(), partition: 0, offset: 0 },
        latest_id: None,
    }
}

/// A store for one scenario: the store, what must live as long as it (a temporary
/// directory), and what makes a flush durable (a RocksDB store's commit).
pub(crate) struct TestStore<S> {
    pub store: S,
    pub keep: Box<dyn std::any::Any>,
    pub commit: fn(&mut S),
}

/// A fresh in-memory store.
pub(crate) fn memory_store() -> TestStore<MemoryStore> {
    TestStore { store: MemoryStore::default(), keep: Box::new(()), commit: |_| {} }
}

struct Harness<S: WindowStore> {
    op: WindowOperator,
    store: S,
    out: Vec<Output>,
    commit: fn(&mut S),
    _keep: Box<dyn std::any::Any>,
}

impl<S: WindowStore> Harness<S> {
    fn new(settings: Arc<WindowSettings>, t: TestStore<S>) -> Self {
        let TestStore { mut store, keep, commit } = t;
        let op = WindowOperator::restore(settings, &mut store).unwrap();
        Self { op, store, out: Vec::new(), commit, _keep: keep }
    }

    /// Counts `p`, then flushes and commits, as stage 2 does after a batch.
    fn send(&mut self, p: GroupedPulse) {
        self.op.process(&p, 0, &mut self.store, &mut self.out).unwrap();
        self.op.flush(&mut self.store).unwrap();
        (self.commit)(&mut self.store);
    }

    /// (window, start, revision, total, count, final) of emitted aggregates, drained.
    fn aggregates(&mut self) -> Vec<(String, i64, u32, String, u64, bool)> {
        let mut v = Vec::new();
        for o in self.out.drain(..) {
            if let Output::Aggregate { record: r, .. } = o {
                v.push((r.window, r.window_start, r.revision, r.total_amount.to_string(), r.pulse_count, r.is_final));
            }
        }
        v
    }
}

fn agg(w: &str, start: i64, rev: u32, total: &str, count: u64) -> (String, i64, u32, String, u64, bool) {
    (w.into(), start, rev, total.into(), count, true)
}

pub(crate) fn window_closes_only_when_watermark_passes_end_plus_grace<S: WindowStore>(new: &dyn Fn() -> TestStore<S>) {
    let mut h = Harness::new(settings(), new());
    h.send(pulse("a", "t1", "1.5", 100));
    h.send(pulse("b", "t1", "2.5", 999));
    h.send(pulse("c", "t1", "1", 5_999)); // watermark 5_999 < 1_000 + 5_000
    assert_eq!(h.aggregates(), vec![]);
    h.send(pulse("d", "t1", "1", 6_000)); // reaches end + grace: [0, 1000) closes
    assert_eq!(h.aggregates(), vec![agg("inflight", 0, 0, "4.0", 2)]);
}

pub(crate) fn out_of_order_within_grace_counts_in_its_window<S: WindowStore>(new: &dyn Fn() -> TestStore<S>) {
    let mut h = Harness::new(settings(), new());
    h.send(pulse("a", "t1", "1", 500));
    h.send(pulse("b", "t1", "1", 4_000));
    h.send(pulse("c", "t1", "2", 700)); // behind the watermark, but within grace
    h.send(pulse("d", "t1", "1", 6_000));
    assert_eq!(h.aggregates(), vec![agg("inflight", 0, 0, "3", 2)]);
}

pub(crate) fn late_after_grace_emits_a_correction_with_next_revision<S: WindowStore>(new: &dyn Fn() -> TestStore<S>) {
    let mut h = Harness::new(settings(), new());
    h.send(pulse("a", "t1", "1", 500));
    h.send(pulse("b", "t1", "1", 16_000)); // closes [0,1000) and postflight [0,10000)
    assert_eq!(h.aggregates(), vec![agg("inflight", 0, 0, "1", 1), agg("postflight", 0, 0, "1", 1)]);
    h.send(pulse("c", "t1", "0.25", 900)); // late, within retention
    assert_eq!(h.aggregates(), vec![agg("inflight", 0, 1, "1.25", 2), agg("postflight", 0, 1, "1.25", 2)]);
    h.send(pulse("d", "t1", "0.25", 901));
    assert_eq!(h.aggregates(), vec![agg("inflight", 0, 2, "1.50", 3), agg("postflight", 0, 2, "1.50", 3)]);
}

pub(crate) fn beyond_retention_goes_to_late_and_is_counted_nowhere<S: WindowStore>(new: &dyn Fn() -> TestStore<S>) {
    let mut h = Harness::new(settings(), new());
    h.send(pulse("a", "t1", "1", 500));
    h.send(pulse("b", "t1", "1", 70_000)); // watermark 70s; [0,1000) + 60s retention passed
    h.aggregates();
    h.send(pulse("c", "t1", "7", 500));
    assert!(matches!(&h.out[..], [Output::Late { reason: LateReason::BeyondRetention, pulse }] if pulse.pulse_id == "c"));
    // postflight [0,10000) + 60 s = 70 s: also beyond retention, so no window counts it.
    let inflight = WindowKey { end: 1_000, window: 0, start: 0, key: Arc::new(GroupKey::new("t1", "api.requests", "requests")) };
    assert_eq!(h.store.get_closed(&inflight).unwrap(), None, "closed windows past retention are purged");
}

pub(crate) fn duplicates_are_counted_once_until_the_horizon_expires<S: WindowStore>(new: &dyn Fn() -> TestStore<S>) {
    let mut h = Harness::new(settings(), new());
    h.send(pulse("a", "t1", "1", 500));
    h.send(pulse("a", "t1", "1", 500));
    assert!(matches!(h.out.last(), Some(Output::Duplicate { .. })));
    h.out.clear();
    h.send(pulse("a", "t2", "1", 500)); // same id, other tenant: a different pulse
    assert!(h.out.is_empty(), "counted, not a duplicate: {:?}", h.out);
    h.out.clear();
    h.send(pulse("x", "t1", "1", 200_000)); // horizon 120 s: "a" (seen at 500) expires
    assert!(!h.store.seen("t1", "a").unwrap() && h.store.seen("t1", "x").unwrap(), "only \"x\" is remembered");
    h.out.clear();
    h.send(pulse("a", "t1", "1", 199_500));
    assert!(!h.out.iter().any(|o| matches!(o, Output::Duplicate { .. })));
}

pub(crate) fn idle_partition_closes_trailing_windows<S: WindowStore>(new: &dyn Fn() -> TestStore<S>) {
    let mut h = Harness::new(settings(), new());
    h.op.process(&pulse("a", "t1", "1", 1_000_000), 1_000_000, &mut h.store, &mut h.out).unwrap();
    h.op.on_time(1_029_000, false, &mut h.store, &mut h.out).unwrap();
    assert_eq!(h.aggregates(), vec![]);
    h.op.on_time(1_030_000, false, &mut h.store, &mut h.out).unwrap(); // idle: watermark → 1_030_000
    assert_eq!(h.aggregates(), vec![agg("inflight", 1_000_000, 0, "1", 1), agg("postflight", 1_000_000, 0, "1", 1)]);
}

pub(crate) fn a_partition_with_a_backlog_does_not_idle_close<S: WindowStore>(new: &dyn Fn() -> TestStore<S>) {
    let mut h = Harness::new(settings(), new());
    h.op.process(&pulse("a", "t1", "1", 1_000_000), 1_000_000, &mut h.store, &mut h.out).unwrap();
    // Records wait (downtime, or a backlog behind other partitions) well past the idle timeout.
    h.op.on_time(1_030_000, true, &mut h.store, &mut h.out).unwrap();
    h.op.on_time(5_000_000, true, &mut h.store, &mut h.out).unwrap();
    assert_eq!(h.aggregates(), vec![], "nothing closes while input waits");
    // The backlog is read: its pulse counts in the window it belongs to, on time.
    h.op.process(&pulse("b", "t1", "2", 1_000_500), 5_000_100, &mut h.store, &mut h.out).unwrap();
    h.op.on_time(5_029_000, false, &mut h.store, &mut h.out).unwrap();
    assert_eq!(h.aggregates(), vec![], "idle only a full timeout after the last record");
    h.op.on_time(5_030_100, false, &mut h.store, &mut h.out).unwrap();
    assert_eq!(h.aggregates(), vec![agg("inflight", 1_000_000, 0, "3", 2), agg("postflight", 1_000_000, 0, "3", 2)]);
}

pub(crate) fn updates_mode_emits_interim_records_then_one_final<S: WindowStore>(new: &dyn Fn() -> TestStore<S>) {
    let mut s = (*settings()).clone();
    s.windows = vec![WindowSpec::new("postflight", 10_000, EmitMode::Updates)];
    let mut h = Harness::new(Arc::new(s), new());
    h.op.process(&pulse("a", "t1", "1", 100), 0, &mut h.store, &mut h.out).unwrap();
    h.op.on_time(0, false, &mut h.store, &mut h.out).unwrap();
    h.op.on_time(500, false, &mut h.store, &mut h.out).unwrap(); // nothing changed: no update
    h.op.process(&pulse("b", "t1", "2", 200), 600, &mut h.store, &mut h.out).unwrap();
    h.op.on_time(700, false, &mut h.store, &mut h.out).unwrap(); // changed, but within update_interval
    h.op.on_time(1_000, false, &mut h.store, &mut h.out).unwrap();
    h.op.process(&pulse("c", "t1", "1", 15_000), 1_100, &mut h.store, &mut h.out).unwrap();
    let got = h.aggregates();
    assert_eq!(
        got,
        vec![
            ("postflight".into(), 0, 0, "1".into(), 1, false),
            ("postflight".into(), 0, 1, "3".into(), 2, false),
            ("postflight".into(), 0, 2, "3".into(), 2, true),
        ]
    );
}

pub(crate) fn restored_operator_continues_where_it_stopped<S: WindowStore>(new: &dyn Fn() -> TestStore<S>) {
    let mut h = Harness::new(settings(), new());
    h.send(pulse("a", "t1", "1", 500));
    h.send(pulse("b", "t1", "2", 800));
    // A new operator over the same store (a restart) keeps open windows and dedupe.
    let mut op = WindowOperator::restore(settings(), &mut h.store).unwrap();
    assert_eq!(op.watermark().current, 800);
    assert_eq!((op.open_buckets(), op.cached_windows()), (2, 0), "open windows stay in the store until needed");
    op.process(&pulse("a", "t1", "1", 500), 0, &mut h.store, &mut h.out).unwrap();
    assert!(matches!(h.out.last(), Some(Output::Duplicate { .. })));
    op.process(&pulse("c", "t1", "1", 6_000), 0, &mut h.store, &mut h.out).unwrap();
    assert_eq!(h.aggregates(), vec![agg("inflight", 0, 0, "3", 2)]);
}

pub(crate) fn inexact_sum_goes_to_late_in_no_window<S: WindowStore>(new: &dyn Fn() -> TestStore<S>) {
    let mut h = Harness::new(settings(), new());
    h.send(pulse("a", "t1", "1000000000000000000", 500));
    h.send(pulse("b", "t1", "0.0000000000000000000000000001", 600));
    assert!(matches!(h.out.last(), Some(Output::Late { reason: LateReason::InexactSum, .. })));
    h.out.clear();
    h.send(pulse("c", "t1", "1", 16_000));
    assert_eq!(
        h.aggregates(),
        vec![agg("inflight", 0, 0, "1000000000000000000", 1), agg("postflight", 0, 0, "1000000000000000000", 1)]
    );
}

pub(crate) fn a_pulse_refused_by_a_later_window_is_undone_in_the_earlier_ones<S: WindowStore>(new: &dyn Fn() -> TestStore<S>) {
    let mut h = Harness::new(settings(), new());
    h.send(pulse("a", "t1", "1000000000000000000", 500));
    // Fits a new inflight window, not the postflight one: in no window, no new bucket.
    h.send(pulse("b", "t1", "0.0000000000000000000000000001", 1_500));
    assert!(matches!(h.out.last(), Some(Output::Late { reason: LateReason::InexactSum, .. })));
    assert_eq!(h.op.open_buckets(), 2);
    h.send(pulse("c", "t1", "1", 1_600));
    h.send(pulse("d", "t1", "2", 1_700));
    // Fits the cached inflight window, not the postflight one: that window is restored.
    h.send(pulse("e", "t1", "0.0000000000000000000000000001", 1_800));
    assert!(matches!(h.out.last(), Some(Output::Late { reason: LateReason::InexactSum, .. })));
    h.out.clear();
    h.send(pulse("f", "t1", "1", 16_000));
    assert_eq!(
        h.aggregates(),
        vec![
            agg("inflight", 0, 0, "1000000000000000000", 1),
            agg("inflight", 1_000, 0, "3", 2),
            agg("postflight", 0, 0, "1000000000000000003", 3)
        ]
    );
}

/// A stream with many groups, out-of-order and late pulses, duplicates and idle time,
/// for comparing operators: (pulse, wall clock) in arrival order.
fn busy_stream() -> Vec<(GroupedPulse, i64)> {
    let mut v = Vec::new();
    for i in 0..3_000i64 {
        let tenant = format!("t{}", (i * 7) % 400);
        // Mostly ascending event time with a jittered tail and a late pulse every 97th.
        let event = if i % 97 == 0 { i * 20 - 9_000 } else { i * 20 - (i % 5) * 300 };
        let id = if i % 89 == 0 { format!("p{}", i - 1) } else { format!("p{i}") };
        v.push((pulse(&id, &tenant, &format!("0.{}", i % 10 + 1), event.max(0)), 1_000_000 + i * 3));
    }
    v
}

/// Runs `stream` through an operator whose cache holds `capacity` windows, flushing
/// every `flush_every` pulses and letting time pass (idle closes) at the end.
fn run_with_cache<S: WindowStore>(
    t: TestStore<S>,
    settings: Arc<WindowSettings>,
    capacity: usize,
    flush_every: usize,
    stream: &[(GroupedPulse, i64)],
) -> (Vec<Output>, usize) {
    let TestStore { mut store, keep: _keep, commit } = t;
    let mut op = WindowOperator::restore(settings, &mut store).unwrap();
    op.set_cache_capacity(capacity);
    let mut out = Vec::new();
    let mut most_cached = 0;
    for (i, (p, wall)) in stream.iter().enumerate() {
        op.process(p, *wall, &mut store, &mut out).unwrap();
        if i % 50 == 49 {
            op.on_time(*wall, false, &mut store, &mut out).unwrap();
        }
        if i % flush_every == flush_every - 1 {
            op.flush(&mut store).unwrap();
            commit(&mut store);
            most_cached = most_cached.max(op.cached_windows());
        }
    }
    op.on_time(10_000_000, false, &mut store, &mut out).unwrap();
    op.flush(&mut store).unwrap();
    assert_eq!(store.open_buckets().unwrap(), vec![], "every window closed in the end");
    (out, most_cached)
}

pub(crate) fn a_small_window_cache_changes_memory_not_results<S: WindowStore>(new: &dyn Fn() -> TestStore<S>) {
    let stream = busy_stream();
    let (unbounded, most) = run_with_cache(new(), settings(), usize::MAX, 100, &stream);
    assert!(most > 100, "the stream keeps many windows open at once: {most}");
    let finals = unbounded.iter().filter(|o| matches!(o, Output::Aggregate { record, .. } if record.is_final)).count();
    let corrections = unbounded.iter().filter(|o| matches!(o, Output::Aggregate { correction: true, .. })).count();
    assert!(finals > 500 && corrections > 10, "finals {finals}, corrections {corrections}");
    for capacity in [1, 7, 60] {
        let (bounded, most) = run_with_cache(new(), settings(), capacity, 100, &stream);
        // After a flush the cache is at most its capacity (eviction brings it to 3/4).
        assert!(most <= capacity, "capacity {capacity}: {most} windows cached after a flush");
        assert_eq!(bounded.len(), unbounded.len(), "capacity {capacity}");
        let first_difference = bounded.iter().zip(&unbounded).position(|(a, b)| a != b);
        assert_eq!(first_difference, None, "capacity {capacity}: the same records in the same order");
    }
}

pub(crate) fn evicting_keeps_windows_with_an_interim_update_due<S: WindowStore>(new: &dyn Fn() -> TestStore<S>) {
    let mut s = (*settings()).clone();
    s.windows.push(WindowSpec::new("minute", 60_000, EmitMode::Updates));
    let s = Arc::new(s);
    let stream = busy_stream();
    let (unbounded, _) = run_with_cache(new(), Arc::clone(&s), usize::MAX, 70, &stream);
    let interim = unbounded.iter().filter(|o| matches!(o, Output::Aggregate { record, .. } if !record.is_final)).count();
    assert!(interim > 100, "interim updates: {interim}");
    let (bounded, _) = run_with_cache(new(), s, 5, 70, &stream);
    // Interim updates due at the same moment come in map order: compare as sets.
    let sorted = |v: Vec<Output>| {
        let mut v: Vec<String> = v.into_iter().map(|o| format!("{o:?}")).collect();
        v.sort();
        v
    };
    let (bounded, unbounded) = (sorted(bounded), sorted(unbounded));
    assert_eq!(bounded.len(), unbounded.len());
    assert!(bounded == unbounded, "first difference: {:?}", bounded.iter().zip(&unbounded).find(|(a, b)| a != b));
}

pub(crate) fn keys_of_closed_windows_are_forgotten<S: WindowStore>(new: &dyn Fn() -> TestStore<S>) {
    let mut h = Harness::new(settings(), new());
    h.op.set_cache_capacity(1);
    // Each group's windows are evicted after its first pulse and read back from the
    // store for its second (then kept), so they close from the store and the cache.
    for round in 0..2 {
        for g in 0..3_000 {
            h.send(pulse(&format!("p{round}-{g}"), &format!("t{g}"), "1", 100 + round));
        }
        h.op.set_cache_capacity(usize::MAX);
    }
    assert_eq!(h.op.cached_windows(), 2 * 3_000);
    // Past retention: every window closes; new groups make the table sweep.
    for g in 0..3_000 {
        h.send(pulse(&format!("q{g}"), &format!("u{g}"), "1", 100_000));
    }
    let finals = h.aggregates().iter().filter(|a| a.1 == 0 && a.5).count();
    assert_eq!(finals, 2 * 3_000, "every group's inflight and postflight window closed");
    assert!(h.op.group_keys() <= 3_000 + 1_024, "keys of closed windows stay: {}", h.op.group_keys());
}

/// `[[windows]]` reordered, one added, across a restart over the same store: every
/// stored window keeps its name (and so its aggregate id) and its total; the added
/// window counts from its first pulse on.
pub(crate) fn reordered_and_added_windows_keep_their_names_and_totals_across_a_restart<S: WindowStore>(new: &dyn Fn() -> TestStore<S>) {
    let mut h = Harness::new(settings(), new()); // inflight 1s, postflight 10s
    h.send(pulse("a", "t1", "1", 500));
    h.send(pulse("b", "t1", "2", 1_500));
    let mut reordered = (*settings()).clone();
    reordered.windows = vec![
        WindowSpec::new("postflight", 10_000, EmitMode::Final),
        WindowSpec::new("minute", 60_000, EmitMode::Final),
        WindowSpec::new("inflight", 1_000, EmitMode::Final),
    ];
    let mut op = WindowOperator::restore(Arc::new(reordered), &mut h.store).unwrap();
    op.process(&pulse("c", "t1", "4", 2_500), 0, &mut h.store, &mut h.out).unwrap();
    op.process(&pulse("d", "t1", "8", 70_000), 0, &mut h.store, &mut h.out).unwrap();
    let mut got = h.aggregates();
    got.sort();
    assert_eq!(got, vec![
        agg("inflight", 0, 0, "1", 1),
        agg("inflight", 1_000, 0, "2", 1),
        agg("inflight", 2_000, 0, "4", 1),
        agg("minute", 0, 0, "4", 1),
        agg("postflight", 0, 0, "7", 3),
    ]);
}

/// A window resized under its name, or removed with windows still open, is refused at
/// restore with what changed; the store is left as it was.
pub(crate) fn a_resized_window_or_one_removed_while_open_is_refused<S: WindowStore>(new: &dyn Fn() -> TestStore<S>) {
    let mut h = Harness::new(settings(), new());
    h.send(pulse("a", "t1", "1", 500));
    let mut resized = (*settings()).clone();
    resized.windows[1] = WindowSpec::new("postflight", 15_000, EmitMode::Final);
    let Err(err) = WindowOperator::restore(Arc::new(resized), &mut h.store) else { panic!("a resized window was accepted") };
    assert!(err.to_string().contains("\"postflight\" is configured as 15s but the state holds it as 10s"), "{err}");
    let mut removed = (*settings()).clone();
    removed.windows.remove(0);
    let Err(err) = WindowOperator::restore(Arc::new(removed), &mut h.store) else { panic!("open windows of a removed window were dropped") };
    assert!(err.to_string().contains("\"inflight\" (1s) is no longer configured but the state holds 1 open window bucket(s)"), "{err}");
    // The original configuration still restores everything.
    let mut op = WindowOperator::restore(settings(), &mut h.store).unwrap();
    op.process(&pulse("b", "t1", "2", 20_000), 0, &mut h.store, &mut h.out).unwrap();
    assert_eq!(h.aggregates(), vec![agg("inflight", 0, 0, "1", 1), agg("postflight", 0, 0, "1", 1)]);
}

/// Declares every operator scenario as a `#[test]` over the stores `$new` makes
/// (`fn() -> TestStore<S>`).
macro_rules! operator_scenarios {
    ($new:path) => {
        #[test]
        fn window_closes_only_when_watermark_passes_end_plus_grace() {
            $crate::window::tests::window_closes_only_when_watermark_passes_end_plus_grace(&$new)
        }
        #[test]
        fn out_of_order_within_grace_counts_in_its_window() {
            $crate::window::tests::out_of_order_within_grace_counts_in_its_window(&$new)
        }
        #[test]
        fn late_after_grace_emits_a_correction_with_next_revision() {
            $crate::window::tests::late_after_grace_emits_a_correction_with_next_revision(&$new)
        }
        #[test]
        fn beyond_retention_goes_to_late_and_is_counted_nowhere() {
            $crate::window::tests::beyond_retention_goes_to_late_and_is_counted_nowhere(&$new)
        }
        #[test]
        fn duplicates_are_counted_once_until_the_horizon_expires() {
            $crate::window::tests::duplicates_are_counted_once_until_the_horizon_expires(&$new)
        }
        #[test]
        fn idle_partition_closes_trailing_windows() {
            $crate::window::tests::idle_partition_closes_trailing_windows(&$new)
        }
        #[test]
        fn a_partition_with_a_backlog_does_not_idle_close() {
            $crate::window::tests::a_partition_with_a_backlog_does_not_idle_close(&$new)
        }
        #[test]
        fn updates_mode_emits_interim_records_then_one_final() {
            $crate::window::tests::updates_mode_emits_interim_records_then_one_final(&$new)
        }
        #[test]
        fn restored_operator_continues_where_it_stopped() {
            $crate::window::tests::restored_operator_continues_where_it_stopped(&$new)
        }
        #[test]
        fn inexact_sum_goes_to_late_in_no_window() {
            $crate::window::tests::inexact_sum_goes_to_late_in_no_window(&$new)
        }
        #[test]
        fn a_pulse_refused_by_a_later_window_is_undone_in_the_earlier_ones() {
            $crate::window::tests::a_pulse_refused_by_a_later_window_is_undone_in_the_earlier_ones(&$new)
        }
        #[test]
        fn a_small_window_cache_changes_memory_not_results() {
            $crate::window::tests::a_small_window_cache_changes_memory_not_results(&$new)
        }
        #[test]
        fn evicting_keeps_windows_with_an_interim_update_due() {
            $crate::window::tests::evicting_keeps_windows_with_an_interim_update_due(&$new)
        }
        #[test]
        fn keys_of_closed_windows_are_forgotten() {
            $crate::window::tests::keys_of_closed_windows_are_forgotten(&$new)
        }
        #[test]
        fn reordered_and_added_windows_keep_their_names_and_totals_across_a_restart() {
            $crate::window::tests::reordered_and_added_windows_keep_their_names_and_totals_across_a_restart(&$new)
        }
        #[test]
        fn a_resized_window_or_one_removed_while_open_is_refused() {
            $crate::window::tests::a_resized_window_or_one_removed_while_open_is_refused(&$new)
        }
    };
}
pub(crate) use operator_scenarios;

mod on_the_memory_store {
    super::operator_scenarios!(super::memory_store);
}

/// A store whose writes fail once `refuse` is set, over the in-memory store.
#[derive(Default)]
struct RefusingStore {
    inner: MemoryStore,
    refuse: bool,
}

#[derive(Debug, thiserror::Error)]
#[error("write refused")]
struct WriteRefused;

/// The value of a result that cannot fail (the in-memory store's).
fn infallible<T>(r: Result<T, std::convert::Infallible>) -> T {
    match r {
        Ok(v) => v,
        Err(never) => match never {},
    }
}

impl RefusingStore {
    fn write(&self) -> Result<(), WriteRefused> {
        if self.refuse { Err(WriteRefused) } else { Ok(()) }
    }
}

impl WindowStore for RefusingStore {
    type Error = WriteRefused;
    fn load_watermark(&mut self) -> Result<Option<Watermark>, WriteRefused> {
        Ok(infallible(self.inner.load_watermark()))
    }
    fn put_watermark(&mut self, w: &Watermark) -> Result<(), WriteRefused> {
        self.write()?;
        infallible(self.inner.put_watermark(w));
        Ok(())
    }
    fn load_window_ids(&mut self) -> Result<Option<Vec<WindowId>>, WriteRefused> {
        Ok(infallible(self.inner.load_window_ids()))
    }
    fn put_window_ids(&mut self, ids: &[WindowId]) -> Result<(), WriteRefused> {
        self.write()?;
        infallible(self.inner.put_window_ids(ids));
        Ok(())
    }
    fn open_buckets(&mut self) -> Result<Vec<Bucket>, WriteRefused> {
        Ok(infallible(self.inner.open_buckets()))
    }
    fn get_open(&mut self, k: &WindowKey) -> Result<Option<WindowState>, WriteRefused> {
        Ok(infallible(self.inner.get_open(k)))
    }
    fn open_in(&mut self, bucket: Bucket) -> Result<Vec<(WindowKey, WindowState)>, WriteRefused> {
        Ok(infallible(self.inner.open_in(bucket)))
    }
    fn put_open(&mut self, k: &WindowKey, s: &WindowState) -> Result<(), WriteRefused> {
        self.write()?;
        infallible(self.inner.put_open(k, s));
        Ok(())
    }
    fn delete_open(&mut self, k: &WindowKey) -> Result<(), WriteRefused> {
        self.write()?;
        infallible(self.inner.delete_open(k));
        Ok(())
    }
    fn get_closed(&mut self, k: &WindowKey) -> Result<Option<WindowState>, WriteRefused> {
        Ok(infallible(self.inner.get_closed(k)))
    }
    fn put_closed(&mut self, k: &WindowKey, s: &WindowState) -> Result<(), WriteRefused> {
        self.write()?;
        infallible(self.inner.put_closed(k, s));
        Ok(())
    }
    fn purge_closed(&mut self, end_at_most: i64) -> Result<(), WriteRefused> {
        self.write()?;
        infallible(self.inner.purge_closed(end_at_most));
        Ok(())
    }
    fn seen(&mut self, tenant: &str, pulse_id: &str) -> Result<bool, WriteRefused> {
        Ok(infallible(self.inner.seen(tenant, pulse_id)))
    }
    fn mark_seen(&mut self, tenant: &str, pulse_id: &str, at: i64) -> Result<(), WriteRefused> {
        self.write()?;
        infallible(self.inner.mark_seen(tenant, pulse_id, at));
        Ok(())
    }
    fn expire_seen(&mut self, at_most: i64) -> Result<(), WriteRefused> {
        self.write()?;
        infallible(self.inner.expire_seen(at_most));
        Ok(())
    }
}

/// A write the store refuses is an error of the batch (the caller then commits
/// nothing), never a value silently left out.
#[test]
fn a_refused_store_write_fails_the_flush_and_the_pulse() {
    let mut store = RefusingStore::default();
    let mut op = WindowOperator::restore(settings(), &mut store).unwrap();
    let mut out = Vec::new();
    op.process(&pulse("a", "t1", "1", 500), 0, &mut store, &mut out).unwrap();
    store.refuse = true;
    assert!(op.flush(&mut store).is_err(), "an open window that could not be written fails the flush");
    // A pulse is written too (its dedupe mark, the windows it closes): refused, it fails.
    assert!(op.process(&pulse("b", "t1", "1", 20_000), 0, &mut store, &mut out).is_err());
}
