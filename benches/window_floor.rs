//! The floor under `window_core` on this machine (issue 8): the same pulses through the
//! least that exact windowed sums with dedupe must do, without the operator's
//! guarantees. Not product code: a bound, to tell what the operator costs from what the
//! memory system costs. Each reports pulses/s as criterion's throughput (elements/s):
//!
//! - `windows`: a group's number from a hash map of group hashes (no compare of the key
//!   text), then its accumulator in each of the 4 default window sizes, in one hash map,
//!   added exactly; no closes, no records, no store;
//! - `dedupe`: only an exact dedupe set of (tenant_id, pulse_id);
//! - `windows_dedupe`: both, as `window_core` must.
//!
//!     cargo bench --bench window_floor

#[path = "common/mod.rs"]
mod common;

use std::hash::BuildHasher;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use hashbrown::{hash_map::Entry, HashMap, HashSet};
use pulses::pulse::GroupedPulse;
use pulses::window::aggregate::Accumulator;
use pulses::window::WindowSettings;

use common::{HOT_PATH_PER_SECOND as PER_SECOND, HOT_PATH_PULSES as PULSES};

type FastHash = foldhash::fast::RandomState;

/// Group numbers by group hash, and accumulators by (window end, window size, group).
#[derive(Default)]
struct Windows {
    groups: HashMap<u64, u32, FastHash>,
    sums: HashMap<(i64, u16, u32), Accumulator, FastHash>,
}

impl Windows {
    fn count(&mut self, p: &GroupedPulse, sizes: &[i64], hasher: &FastHash) {
        let next = self.groups.len() as u32;
        let group = *self.groups.entry(hasher.hash_one((&p.tenant_id, &p.product_sku, &p.use_unit))).or_insert(next);
        for (i, size) in sizes.iter().enumerate() {
            let end = p.event_time - p.event_time.rem_euclid(*size) + size;
            match self.sums.entry((end, i as u16, group)) {
                Entry::Occupied(mut e) => {
                    // The stub's amounts never make an inexact sum.
                    let _ = e.get_mut().add(p.used_amount, p.event_time);
                }
                Entry::Vacant(e) => {
                    e.insert(Accumulator::first(p.used_amount, p.event_time));
                }
            }
        }
    }
}

/// Whether `p` is new, remembering it.
fn first_time(seen: &mut HashSet<(String, String), FastHash>, p: &GroupedPulse) -> bool {
    seen.insert((p.tenant_id.clone(), p.pulse_id.clone()))
}

fn floor(c: &mut Criterion) {
    let pulses = common::grouped_pulses(PULSES, PER_SECOND);
    let sizes: Vec<i64> = WindowSettings::default().windows.iter().map(|w| w.size_ms()).collect();
    let hasher = FastHash::default();
    let mut g = c.benchmark_group("window_floor");
    g.throughput(Throughput::Elements(PULSES as u64));
    g.bench_function("windows", |b| {
        b.iter_batched(
            Windows::default,
            |mut w| {
                pulses.iter().for_each(|p| w.count(p, &sizes, &hasher));
                assert!(w.sums.len() > PULSES / 10);
                w
            },
            BatchSize::PerIteration,
        )
    });
    g.bench_function("dedupe", |b| {
        b.iter_batched(
            HashSet::default,
            |mut seen| {
                let new = pulses.iter().filter(|p| first_time(&mut seen, p)).count();
                assert_eq!(new, PULSES);
                seen
            },
            BatchSize::PerIteration,
        )
    });
    g.bench_function("windows_dedupe", |b| {
        b.iter_batched(
            || (Windows::default(), HashSet::default()),
            |(mut w, mut seen)| {
                for p in &pulses {
                    if first_time(&mut seen, p) {
                        w.count(p, &sizes, &hasher);
                    }
                }
                assert_eq!(seen.len(), PULSES);
                (w, seen)
            },
            BatchSize::PerIteration,
        )
    });
    g.finish();
}

criterion_group!(benches, floor);
criterion_main!(benches);
