//! Whether a billing period is closed, read from what the pipeline committed to Kafka:
//!
//! 1. **Every window of the period is final.** Stage 2 records each partition's
//!    watermark in its state changelog (key `m`, [`crate::state::store`]), committed in
//!    the same transaction as the final aggregates that watermark released. Once the
//!    committed watermark of the tenant's partition reaches `period_end + grace`, every
//!    final aggregate of the period is in the aggregated topic ([`crate::invoice::closing`]).
//! 2. **Every final aggregate of it is charged.** `pulses rate` commits its consumed
//!    offsets in the transaction that writes the charges; once its committed offset of
//!    the tenant's aggregated partition has passed the partition's end as it was after
//!    step 1 (or only transaction markers lie between), every charge of the period is in
//!    the charges topic.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::Message;

use super::BillingError;
use crate::config::Config;
use crate::kafka::{batch, clients};
use crate::kafka::reader::{PartitionsToEnd, Range};
use crate::window::watermark::Watermark;

const METADATA_TIMEOUT: Duration = Duration::from_secs(10);
/// How long to wait for `pulses rate` to charge what is already final (it commits
/// every 100 ms when it keeps up).
const RATED_WAIT: Duration = Duration::from_secs(20);
/// A reader that receives nothing this long fails rather than hangs.
const STALL: Duration = Duration::from_secs(60);
/// Changelog records read back from the end, in turn, to find the latest watermark.
const TAIL_STEPS: [i64; 3] = [2_000, 100_000, i64::MAX];

/// The committed watermark of each of stage 2's `partitions`, from the tail of its
/// changelog; `None` where stage 2 has recorded none.
pub fn stage2_watermarks(cfg: &Config, partitions: &[i32]) -> Result<BTreeMap<i32, Option<i64>>, BillingError> {
    let topic = cfg.changelog_topic();
    let mut reader = PartitionsToEnd::open(&reader_config(cfg), "invoice closing", &topic, BTreeMap::new(), Some(STALL))?;
    let mut bounds = BTreeMap::new();
    for p in partitions {
        bounds.insert(*p, reader.consumer().fetch_watermarks(&topic, *p, METADATA_TIMEOUT)?);
    }
    let mut found: BTreeMap<i32, Option<i64>> = BTreeMap::new();
    for back in TAIL_STEPS {
        // The partitions without a watermark yet whose tail can still grow.
        let ranges: BTreeMap<i32, Range> = bounds
            .iter()
            .filter(|(p, _)| !found.contains_key(p))
            .map(|(p, (low, high))| (*p, Range { from: high.saturating_sub(back).max(*low), end: Some(*high) }))
            .collect();
        if ranges.is_empty() {
            break;
        }
        let whole: Vec<i32> = ranges.iter().filter(|(p, r)| r.from == bounds[*p].0).map(|(p, _)| *p).collect();
        reader.assign(ranges)?;
        let mut latest: BTreeMap<i32, Vec<u8>> = BTreeMap::new();
        while !reader.is_done() {
            if let Some(msg) = reader.next(Duration::from_millis(500))? {
                if msg.key() == Some(b"m".as_slice()) {
                    latest.insert(msg.partition(), msg.payload().map(<[u8]>::to_vec).unwrap_or_default());
                }
            }
        }
        for (p, value) in latest {
            let w: Watermark = serde_json::from_slice(&value)
                .map_err(|e| BillingError::Corrupt(format!("{topic}[{p}]'s watermark record: {e}")))?;
            found.insert(p, Some(w.current));
        }
        for p in whole {
            found.entry(p).or_insert(None);
        }
    }
    Ok(found)
}

/// Where `pulses rate` stands on one aggregated partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rated {
    /// Everything committed to the partition up to `end` is charged.
    Through { end: i64 },
    /// Its committed offset is `at` (none: it has committed nothing), `end` is needed.
    Behind { at: Option<i64>, end: i64 },
}

/// Waits (a bounded time) until `pulses rate` has charged everything committed to the
/// aggregated topic's `partitions` now.
pub fn rated_through(cfg: &Config, partitions: &[i32]) -> Result<BTreeMap<i32, Rated>, BillingError> {
    let topic = &cfg.topics.aggregated;
    let rate_group = crate::stage::topology::RateWiring::of(cfg).consumer_group;
    let observer: BaseConsumer = clients::observer(cfg, &rate_group).create()?;
    let mut ends = BTreeMap::new();
    for p in partitions {
        let (_, end) = observer.fetch_watermarks(topic, *p, METADATA_TIMEOUT)?;
        ends.insert(*p, end);
    }
    let deadline = Instant::now() + RATED_WAIT;
    loop {
        // Asked again while a fresh broker's coordinator loads; unreadable counts as
        // nothing committed, so the period stays open rather than billed early.
        let committed: BTreeMap<i32, i64> =
            batch::committed(&observer, topic, partitions).into_iter().filter_map(|(p, c)| Some((p, c.offset?))).collect();
        // Behind its end by offsets: is anything but markers in between?
        let gaps: BTreeMap<i32, Range> = ends
            .iter()
            .filter_map(|(p, end)| committed.get(p).filter(|at| **at < *end).map(|at| (*p, Range { from: *at, end: Some(*end) })))
            .collect();
        let unrated = with_records(cfg, topic, gaps)?;
        let mut out = BTreeMap::new();
        for (p, end) in &ends {
            let at = committed.get(p).copied();
            let through = match at {
                Some(_) => !unrated.contains(p),
                None => *end == 0,
            };
            out.insert(*p, if through { Rated::Through { end: *end } } else { Rated::Behind { at, end: *end } });
        }
        if out.values().all(|r| matches!(r, Rated::Through { .. })) || Instant::now() >= deadline {
            return Ok(out);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The partitions of `ranges` holding a committed record in their range (the others
/// hold only the markers of transactions, or records of aborted ones).
fn with_records(cfg: &Config, topic: &str, ranges: BTreeMap<i32, Range>) -> Result<BTreeSet<i32>, BillingError> {
    let mut found = BTreeSet::new();
    if ranges.is_empty() {
        return Ok(found);
    }
    let mut reader = PartitionsToEnd::open(&reader_config(cfg), "invoice closing", topic, ranges, Some(STALL))?;
    while !reader.is_done() {
        let Some(p) = reader.next(Duration::from_millis(500))?.map(|m| m.partition()) else { continue };
        found.insert(p);
        reader.finish(p)?;
    }
    Ok(found)
}

/// Billing's readers: [`clients::prompt_reader`]s of partitions to their ends (a
/// partition ending in a transaction marker would otherwise cost a 500 ms empty fetch).
pub(super) fn reader_config(cfg: &Config) -> rdkafka::config::ClientConfig {
    clients::prompt_reader(cfg, &group(cfg))
}

/// The group id billing's readers name (never joined).
pub(super) fn group(cfg: &Config) -> String {
    format!("{}.invoice", cfg.application_id)
}
