//! Inputs shared by the benchmarks: seeded stub pulses, as the source topic carries
//! them (JSON) and as stage 2 receives them (validated).

#![allow(dead_code)] // each bench uses part of it

use pulses::bench::stats::status_bytes;
use pulses::pulse::validate::RecordContext;
use pulses::pulse::{validate, GroupedPulse};
use pulses::stub::{Generator, StubSpec};

/// 2026-11-22T10:00:00Z, the event time of the first pulse.
pub const START_MS: i64 = 1_795_341_600_000;

/// The hot-path load (`hot_path`, `window_floor`): pulses per measured iteration, 5,000
/// per second of event time, so an iteration spans 10 s and the 1 s windows of its
/// first 4 s close in it (with the default 5 s grace): about 6,400 final aggregates,
/// one per 8 pulses.
pub const HOT_PATH_PULSES: usize = 50_000;
pub const HOT_PATH_PER_SECOND: f64 = 5_000.0;

/// `n` JSON pulses from 200 tenants and 8 products, `per_second` of event time apart
/// (so windows keep closing), each with a distinct pulse_id.
pub fn json_pulses(n: usize, per_second: f64) -> Vec<Vec<u8>> {
    let mut g = Generator::new(StubSpec { tenants: 200, skus: 8, seed: 7, rate: Some(per_second), start_time_ms: Some(START_MS) });
    (0..n).map(|_| g.next_pulse(START_MS).to_json()).collect()
}

/// Where bench records claim to come from.
pub fn context(offset: i64) -> RecordContext<'static> {
    RecordContext { topic: "source.pulses", partition: 0, offset, record_time_ms: None }
}

/// The same pulses, validated as stage 1 would hand them to stage 2.
pub fn grouped_pulses(n: usize, per_second: f64) -> Vec<GroupedPulse> {
    json_pulses(n, per_second)
        .iter()
        .enumerate()
        .map(|(i, json)| validate(json, &context(i as i64)).expect("stub pulses are valid"))
        .collect()
}

/// Peak resident set size of this process so far (VmHWM), in MiB.
pub fn peak_rss_mib() -> f64 {
    proc_status_mib("VmHWM")
}

/// A `kB` field of /proc/self/status (`VmHWM`, `VmRSS`), in MiB.
pub fn proc_status_mib(field: &str) -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status_bytes(&status, field).map_or(f64::NAN, |b| b as f64 / (1024.0 * 1024.0))
}
