//! The hot path, piece by piece, without a broker (issue 8). Each benchmark reports
//! pulses/s as criterion's throughput (elements/s):
//!
//! - `window_core`: the window operator over the in-memory store, on pre-decoded
//!   pulses: dedupe, assignment to the 4 default windows, exact sums, closes;
//! - `decode_validate`: source.pulses JSON bytes → validated grouped pulse;
//! - `decode_aggregate`: both of the above in turn, JSON bytes to window totals;
//! - `stage2_step`: the operator over a real RocksDB partition store, one WriteBatch
//!   commit per 5,000 pulses, as stage 2 does per poll.
//!
//!     cargo bench --bench hot_path
//!     cargo bench --bench hot_path -- window_core      # one of them

#[path = "common/mod.rs"]
mod common;

use std::sync::Arc;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use pulses::pulse::validate;
use pulses::state::{PartitionStore, StoreResources};
use pulses::window::memory::MemoryStore;
use pulses::window::{Output, WindowOperator, WindowSettings};

use common::{HOT_PATH_PER_SECOND as PER_SECOND, HOT_PATH_PULSES as PULSES};

/// Pulses per store commit in `stage2_step` (stage 2 commits once per poll batch).
const COMMIT_EVERY: usize = 5_000;

/// A fresh operator over the in-memory store, with an output buffer.
fn in_memory(settings: &Arc<WindowSettings>) -> (WindowOperator, MemoryStore, Vec<Output>) {
    let mut store = MemoryStore::default();
    let op = WindowOperator::restore(Arc::clone(settings), &mut store).expect("restore");
    (op, store, Vec::with_capacity(1024))
}

fn window_core(c: &mut Criterion) {
    let pulses = common::grouped_pulses(PULSES, PER_SECOND);
    let settings = Arc::new(WindowSettings::default());
    let mut g = c.benchmark_group("window_core");
    g.throughput(Throughput::Elements(PULSES as u64));
    g.bench_function("memory_store", |b| {
        b.iter_batched(
            || in_memory(&settings),
            |(mut op, mut store, mut out)| {
                let mut emitted = 0;
                for p in &pulses {
                    op.process(p, 0, &mut store, &mut out).expect("process");
                    emitted += out.len();
                    out.clear();
                }
                op.flush(&mut store).expect("flush");
                assert!(emitted > PULSES / 10, "windows close during an iteration: {emitted} aggregates");
                (op, store)
            },
            BatchSize::PerIteration,
        )
    });
    g.finish();
}

fn decode_validate(c: &mut Criterion) {
    let json = common::json_pulses(PULSES, PER_SECOND);
    let mut g = c.benchmark_group("decode_validate");
    g.throughput(Throughput::Elements(PULSES as u64));
    g.bench_function("json", |b| {
        b.iter(|| {
            let mut valid = 0usize;
            for (i, bytes) in json.iter().enumerate() {
                valid += usize::from(validate(bytes, &common::context(i as i64)).is_ok());
            }
            assert_eq!(valid, PULSES);
        })
    });
    g.finish();
}

fn decode_aggregate(c: &mut Criterion) {
    let json = common::json_pulses(PULSES, PER_SECOND);
    let settings = Arc::new(WindowSettings::default());
    let mut g = c.benchmark_group("decode_aggregate");
    g.throughput(Throughput::Elements(PULSES as u64));
    g.bench_function("json_memory_store", |b| {
        b.iter_batched(
            || in_memory(&settings),
            |(mut op, mut store, mut out)| {
                for (i, bytes) in json.iter().enumerate() {
                    let p = validate(bytes, &common::context(i as i64)).expect("stub pulses are valid");
                    op.process(&p, 0, &mut store, &mut out).expect("process");
                    out.clear();
                }
                op.flush(&mut store).expect("flush");
                (op, store)
            },
            BatchSize::PerIteration,
        )
    });
    g.finish();
}

fn stage2_step(c: &mut Criterion) {
    let pulses = common::grouped_pulses(PULSES, PER_SECOND);
    let settings = Arc::new(WindowSettings::default());
    let resources = StoreResources::new(128 << 20);
    let mut g = c.benchmark_group("stage2_step");
    g.throughput(Throughput::Elements(PULSES as u64));
    g.sample_size(10);
    g.bench_function("rocksdb", |b| {
        b.iter_batched(
            || {
                let dir = tempfile::tempdir().expect("tempdir");
                let mut store = PartitionStore::open(dir.path(), &resources).expect("open store");
                let op = WindowOperator::restore(Arc::clone(&settings), &mut store).expect("restore");
                (dir, op, store, Vec::with_capacity(1024))
            },
            |(dir, mut op, mut store, mut out)| {
                for batch in pulses.chunks(COMMIT_EVERY) {
                    for p in batch {
                        op.process(p, 0, &mut store, &mut out).expect("process");
                        out.clear();
                    }
                    op.flush(&mut store).expect("flush");
                    store.commit(None).expect("commit");
                }
                (dir, op, store)
            },
            BatchSize::PerIteration,
        )
    });
    g.finish();
}

criterion_group!(benches, window_core, decode_validate, decode_aggregate, stage2_step);
criterion_main!(benches);
