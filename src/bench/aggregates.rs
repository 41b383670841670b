//! The bench's reader of the aggregated topic: counts the pulses of the final
//! aggregates (latest revision each) and the end-to-end latency of each.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{bail, Context};
use rdkafka::consumer::BaseConsumer;
use rdkafka::Message;

use super::report::Quantiles;
use super::stats;
use crate::codec::AggregateInput;
use crate::kafka::clients::QuietEof;
use crate::pulse::time;
use crate::registry::Wait;
use crate::window::aggregate::WindowAggregate;

/// What the reader of the aggregated topic saw.
#[derive(Debug, Default)]
pub struct Seen {
    /// aggregate_id → (revision, window, pulse_count) of its latest final record.
    latest: HashMap<String, (u64, String, u64)>,
    counted: HashMap<String, u64>,
    /// (window_end ms, seconds from last_event_time to receipt), per window, of every
    /// final record.
    latency: HashMap<String, Vec<(i64, f64)>>,
    pub finals: u64,
}

impl Seen {
    fn add(&mut self, agg: &WindowAggregate, received_ms: i64) {
        if !agg.is_final {
            return;
        }
        self.finals += 1;
        let latency = (received_ms - agg.last_event_time) as f64 / 1000.0;
        self.latency.entry(agg.window.clone()).or_default().push((agg.window_end, latency));
        let previous = self.latest.get(&agg.aggregate_id).cloned();
        if previous.as_ref().is_some_and(|(r, _, _)| *r >= u64::from(agg.revision)) {
            return;
        }
        let total = self.counted.entry(agg.window.clone()).or_insert(0);
        *total = *total - previous.map_or(0, |(_, _, c)| c) + agg.pulse_count;
        self.latest.insert(agg.aggregate_id.clone(), (u64::from(agg.revision), agg.window.clone(), agg.pulse_count));
    }

    /// Distinct aggregates of `window` seen final: each had one first (revision 0)
    /// emission, which the processor's close-delay histogram counts once committed.
    pub fn aggregates(&self, window: &str) -> u64 {
        self.latest.values().filter(|(_, w, _)| w == window).count() as u64
    }

    pub fn counted(&self, window: &str) -> u64 {
        self.counted.get(window).copied().unwrap_or(0)
    }

    /// End-to-end latency of the final records of `window` whose window ended by
    /// `ended_by` (ms). The bench passes the last pulse's event time minus the grace:
    /// later windows cannot close on data (no pulse comes after them) and wait for the
    /// idle timeout instead, which a continuous stream never does.
    pub fn quantiles(&self, window: &str, ended_by: i64) -> Quantiles {
        let all = self.latency.get(window).map(Vec::as_slice).unwrap_or_default();
        let s: Vec<f64> = all.iter().filter(|(end, _)| *end <= ended_by).map(|(_, secs)| *secs).collect();
        let (p50, p99) = stats::p50_p99(&s);
        Quantiles { p50, p99, count: s.len() as u64 }
    }

    /// Final records left out of [`Self::quantiles`] with the same `ended_by`.
    pub fn trailing(&self, ended_by: i64) -> u64 {
        self.latency.values().flatten().filter(|(end, _)| *end > ended_by).count() as u64
    }
}

/// Reads final aggregates (JSON or Avro, as `input` decodes the aggregated topic)
/// until both windows count `expected` pulses or `stop` is set.
pub fn read_aggregates(c: &BaseConsumer<QuietEof>, input: &AggregateInput, expected: u64, stop: &AtomicBool)
    -> anyhow::Result<Seen> {
    let mut seen = Seen::default();
    let stopped = || stop.load(Ordering::Acquire);
    while !(seen.counted("inflight") >= expected && seen.counted("postflight") >= expected) {
        if stopped() {
            break;
        }
        match c.poll(Duration::from_millis(100)) {
            Some(Ok(m)) => {
                let received = time::now_ms();
                let agg = input
                    .decode(m.payload().unwrap_or_default(), Wait::until(&stopped))
                    .with_context(|| format!("aggregate at offset {}", m.offset()))?;
                seen.add(&agg, received);
            }
            None | Some(Err(rdkafka::error::KafkaError::PartitionEOF(_))) => {}
            Some(Err(e)) => bail!("reading aggregates: {e}"),
        }
    }
    Ok(seen)
}

#[cfg(test)]
mod tests {
    use rust_decimal::Decimal;

    use super::*;

    fn agg(id: &str, window: &str, revision: u32, count: u64, last: &str, is_final: bool) -> WindowAggregate {
        let t = |s: &str| time::parse_rfc3339_ms(s).unwrap();
        WindowAggregate {
            aggregate_id: id.into(),
            revision,
            tenant_id: "t".into(),
            product_sku: "s".into(),
            use_unit: "u".into(),
            window: window.into(),
            window_start: t("2026-11-22T10:00:00.000Z"),
            window_end: t("2026-11-22T10:00:01.000Z"),
            total_amount: Decimal::ONE,
            pulse_count: count,
            min_amount: Decimal::ONE,
            max_amount: Decimal::ONE,
            first_event_time: t(last),
            last_event_time: t(last),
            is_final,
            emitted_at: t(last),
            meter: None,
            latest: None,
        }
    }

    #[test]
    fn counts_the_latest_revision_of_each_final_aggregate() {
        let mut s = Seen::default();
        let t0 = time::parse_rfc3339_ms("2026-11-22T10:00:00.500Z").unwrap();
        let last = "2026-11-22T10:00:00.500Z";
        s.add(&agg("a", "inflight", 0, 3, last, true), t0 + 1500);
        s.add(&agg("b", "inflight", 0, 2, last, true), t0 + 1000);
        s.add(&agg("a", "inflight", 1, 4, last, true), t0 + 2000);
        s.add(&agg("a", "inflight", 0, 3, last, true), t0 + 2500); // stale duplicate
        s.add(&agg("c", "inflight", 0, 9, last, false), t0); // interim: not counted
        assert_eq!(s.counted("inflight"), 6);
        assert_eq!(s.counted("postflight"), 0);
        assert_eq!(s.finals, 4);
        let end = time::parse_rfc3339_ms("2026-11-22T10:00:01.000Z").unwrap();
        let q = s.quantiles("inflight", end);
        assert_eq!((q.p50, q.p99, q.count), (Some(1.5), Some(2.5), 4));
        // A window that ended after the cut is trailing: left out, and counted as such.
        let q = s.quantiles("inflight", end - 1);
        assert_eq!((q.p50, q.p99, q.count, s.trailing(end - 1)), (None, None, 0, 4));
    }
}
