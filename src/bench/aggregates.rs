//! The bench's reader of the aggregated topic: counts the pulses of the final
//! aggregates (latest revision each) and the end-to-end latency of each.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use rdkafka::consumer::BaseConsumer;
use rdkafka::Message;

use super::report::Quantiles;
use super::stats;
use crate::pulse::time;
use crate::kafka::clients::QuietEof;

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
    fn add(&mut self, v: &serde_json::Value, received_ms: i64) -> anyhow::Result<()> {
        if v["final"].as_bool() != Some(true) {
            return Ok(());
        }
        let field = |k: &str| v[k].as_str().ok_or_else(|| anyhow!("aggregate without {k}: {v}"));
        let id = field("aggregate_id")?.to_owned();
        let window = field("window")?.to_owned();
        let ms = |k: &str| field(k).and_then(|t| time::parse_rfc3339_ms(t).ok_or_else(|| anyhow!("bad {k}: {v}")));
        let (last, end) = (ms("last_event_time")?, ms("window_end")?);
        let revision = v["revision"].as_u64().unwrap_or(0);
        let count = v["pulse_count"].as_u64().ok_or_else(|| anyhow!("aggregate without pulse_count: {v}"))?;
        self.finals += 1;
        self.latency.entry(window.clone()).or_default().push((end, (received_ms - last) as f64 / 1000.0));
        let previous = self.latest.get(&id).cloned();
        if previous.as_ref().is_some_and(|(r, _, _)| *r >= revision) {
            return Ok(());
        }
        let total = self.counted.entry(window.clone()).or_insert(0);
        *total = *total - previous.map_or(0, |(_, _, c)| c) + count;
        self.latest.insert(id, (revision, window, count));
        Ok(())
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

/// Reads final aggregates until both windows count `expected` pulses or `stop` is set.
pub fn read_aggregates(c: &BaseConsumer<QuietEof>, expected: u64, stop: &AtomicBool) -> anyhow::Result<Seen> {
    let mut seen = Seen::default();
    while !(seen.counted("inflight") >= expected && seen.counted("postflight") >= expected) {
        if stop.load(Ordering::Acquire) {
            break;
        }
        match c.poll(Duration::from_millis(100)) {
            Some(Ok(m)) => {
                let received = time::now_ms();
                let v: serde_json::Value = serde_json::from_slice(m.payload().unwrap_or_default())
                    .with_context(|| format!("aggregate at offset {} is not JSON", m.offset()))?;
                seen.add(&v, received)?;
            }
            None | Some(Err(rdkafka::error::KafkaError::PartitionEOF(_))) => {}
            Some(Err(e)) => bail!("reading aggregates: {e}"),
        }
    }
    Ok(seen)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn agg(id: &str, window: &str, revision: u64, count: u64, last: &str) -> serde_json::Value {
        serde_json::json!({"aggregate_id": id, "window": window, "revision": revision, "pulse_count": count,
                           "last_event_time": last, "window_end": "2026-11-22T10:00:01.000Z", "final": true})
    }

    #[test]
    fn counts_the_latest_revision_of_each_final_aggregate() {
        let mut s = Seen::default();
        let t0 = time::parse_rfc3339_ms("2026-11-22T10:00:00.500Z").unwrap();
        s.add(&agg("a", "inflight", 0, 3, "2026-11-22T10:00:00.500Z"), t0 + 1500).unwrap();
        s.add(&agg("b", "inflight", 0, 2, "2026-11-22T10:00:00.500Z"), t0 + 1000).unwrap();
        s.add(&agg("a", "inflight", 1, 4, "2026-11-22T10:00:00.500Z"), t0 + 2000).unwrap();
        s.add(&agg("a", "inflight", 0, 3, "2026-11-22T10:00:00.500Z"), t0 + 2500).unwrap(); // stale duplicate
        s.add(&serde_json::json!({"final": false, "window": "inflight"}), t0).unwrap();
        assert_eq!(s.counted("inflight"), 6);
        assert_eq!(s.counted("postflight"), 0);
        assert_eq!(s.finals, 4);
        let end = time::parse_rfc3339_ms("2026-11-22T10:00:01.000Z").unwrap();
        let q = s.quantiles("inflight", end);
        assert_eq!((q.p50, q.p99, q.count), (Some(1.5), Some(2.5), 4));
        // A window that ended after the cut is trailing: left out, and counted as such.
        let q = s.quantiles("inflight", end - 1);
        assert_eq!((q.p50, q.p99, q.count, s.trailing(end - 1)), (None, None, 0, 4));
        assert!(s.add(&serde_json::json!({"final": true, "window": "inflight"}), t0).is_err());
    }

}
