//! Stage-2 memory and throughput: streams N pulses (default 10M) through the window
//! operator over a real RocksDB store, with event time advancing so windows rotate,
//! and reports peak RSS at 1M and at N pulses. Bounded memory means the two peaks stay
//! within 20% of each other.
//!
//!     cargo bench --bench stage2_memory            # 10M pulses
//!     PULSES_BENCH_PULSES=2000000 cargo bench --bench stage2_memory
//!     PULSES_BENCH_STATE_MIB=64 cargo bench --bench stage2_memory   # state budget
//!     PULSES_BENCH_WINDOW_CACHE=1000000 cargo bench --bench stage2_memory  # open windows in memory
//!     PULSES_BENCH_PULSES=2000000 PULSES_BENCH_TENANTS=250000 cargo bench --bench stage2_memory
//!                                                 # 1M open keys (250k tenants × 4 SKUs)

#[path = "common/mod.rs"]
mod common;

use std::str::FromStr;
use std::sync::Arc;
use std::time::Instant;

use common::{peak_rss_mib, proc_status_mib};
use pulses::ops::memory::{heap_report, HeapTrimmer};
use pulses::pulse::{GroupedPulse, SourceRef};
use pulses::state::{PartitionStore, StoreResources};
use pulses::window::operator::DEFAULT_CACHE_WINDOWS;
use pulses::window::{Output, WindowOperator, WindowSettings, WindowStore};
use rust_decimal::Decimal;

fn main() {
    let total: u64 = std::env::var("PULSES_BENCH_PULSES").ok().and_then(|v| v.parse().ok()).unwrap_or(10_000_000);
    let tenants: u64 = std::env::var("PULSES_BENCH_TENANTS").ok().and_then(|v| v.parse().ok()).unwrap_or(500);
    let skus = ["storage.standard", "compute.vcpu", "api.requests", "network.egress"];
    let dir = tempfile::tempdir().expect("tempdir");
    // The state memory budget (`aggregate.state_memory_mib`, default 128).
    let budget_mib: usize = std::env::var("PULSES_BENCH_STATE_MIB").ok().and_then(|v| v.parse().ok()).unwrap_or(128);
    let resources = StoreResources::new(budget_mib << 20);
    let mut store = PartitionStore::open(dir.path(), &resources).expect("open store");
    let settings = Arc::new(WindowSettings { retention_ms: 60_000, ..WindowSettings::default() });
    let mut op = WindowOperator::restore(settings, &mut store).expect("restore");
    // Open windows held in memory (`aggregate.open_window_cache`, default 250,000).
    let cache: usize = std::env::var("PULSES_BENCH_WINDOW_CACHE").ok().and_then(|v| v.parse().ok()).unwrap_or(DEFAULT_CACHE_WINDOWS);
    op.set_cache_capacity(cache);
    // As stage 2 does after each commit.
    let mut trimmer = HeapTrimmer::default();
    let base = common::START_MS;
    let mut out = Vec::new();
    let mut emitted = 0u64;
    let started = Instant::now();
    let mut rss_1m = f64::NAN;
    let amount = Decimal::from_str("0.125").unwrap_or_default();
    let mut pulse = GroupedPulse {
        object_id: String::new(),
        pulse_id: String::new(),
        tenant_id: String::new(),
        product_sku: String::new(),
        use_unit: "unit".into(),
        used_amount: amount,
        event_time: base,
        attributes: None,
        source: SourceRef { topic: "bench".into(), partition: 0, offset: 0 },
        latest_id: None,
    };
    for i in 0..total {
        pulse.pulse_id = format!("p{i}");
        pulse.tenant_id = format!("tenant-{}", i % tenants);
        pulse.product_sku = skus[(i / tenants) as usize % skus.len()].into();
        // 2,000 pulses per second of event time: windows keep rotating.
        pulse.event_time = base + (i / 2) as i64;
        op.process(&pulse, 0, &mut store, &mut out).expect("process");
        emitted += out.iter().filter(|o| matches!(o, Output::Aggregate { .. })).count() as u64;
        out.clear();
        if i % 5_000 == 4_999 {
            op.flush(&mut store).expect("flush");
            store.commit(None).expect("commit");
            trimmer.maybe_trim();
        }
        if i + 1 == 1_000_000 {
            rss_1m = peak_rss_mib();
        }
        if (i + 1) % 1_000_000 == 0 {
            eprintln!(
                "stage2_memory: {:>3}M pulses, peak RSS {:.1} MiB (now {:.1}), {:.0} s; {}; {}",
                (i + 1) / 1_000_000,
                peak_rss_mib(),
                proc_status_mib("VmRSS"),
                started.elapsed().as_secs_f64(),
                store.memory_report(),
                heap_report()
            );
        }
    }
    op.flush(&mut store).expect("flush");
    store.commit(None).expect("commit");
    let secs = started.elapsed().as_secs_f64();
    let rss_end = peak_rss_mib();
    println!("stage2_memory: {total} pulses in {secs:.1} s = {:.0} pulses/s (one core), {emitted} aggregates emitted", total as f64 / secs);
    println!("stage2_memory: state memory budget {budget_mib} MiB");
    println!("stage2_memory: peak RSS at 1M pulses {rss_1m:.1} MiB, at {total} pulses {rss_end:.1} MiB ({:+.1}%)", (rss_end / rss_1m - 1.0) * 100.0);
    let open: usize = store.open_buckets().expect("buckets").into_iter().map(|b| store.open_in(b).expect("open windows").len()).sum();
    println!("stage2_memory: open windows at end {open}, {} of them cached (capacity {cache})", op.cached_windows());
}
