//! The consume-process-commit pieces every group consumer shares: polling a bounded
//! batch, reading what the group committed, and committing offsets.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext};
use rdkafka::error::KafkaResult;
use rdkafka::message::BorrowedMessage;
use rdkafka::{Offset, TopicPartitionList};

/// How long reading a group's committed offsets (at assignment) may take.
pub const COMMITTED_TIMEOUT: Duration = Duration::from_secs(30);

/// The offset if it names a position in the log; none for "beginning", "end",
/// "invalid" (nothing committed, nothing consumed yet) and the like.
pub fn log_offset(offset: Offset) -> Option<i64> {
    match offset {
        Offset::Offset(o) => Some(o),
        _ => None,
    }
}

/// Polls until `max` records arrived or `max_wait` has passed, and returns them for
/// the caller to process after the poll. The stages wait up to their commit's due time:
/// their outputs become visible only at the commit anyway, and one batch per commit
/// costs far less CPU at low rates than handing over whatever each poll finds (measured
/// at 10,000 pulses/s: 37 against 59 CPU s per million, docs/performance.md). Consumer
/// errors (broker hiccups) are logged, not fatal: librdkafka retries them itself. A
/// refused authorization is returned: no retry grants an ACL.
pub fn poll_batch<C: ConsumerContext>(
    consumer: &BaseConsumer<C>,
    max: usize,
    max_wait: Duration,
) -> KafkaResult<Vec<BorrowedMessage<'_>>> {
    let deadline = Instant::now() + max_wait;
    let mut batch = Vec::new();
    while batch.len() < max && Instant::now() < deadline {
        match consumer.poll(poll_wait_left(deadline)) {
            None => break,
            Some(Err(e)) if e.rdkafka_error_code().is_some_and(crate::kafka::startup::is_authorization_code) => return Err(e),
            Some(Err(e)) => tracing::warn!("consumer: {e}"),
            Some(Ok(msg)) => batch.push(msg),
        }
    }
    Ok(batch)
}

/// What is left until `deadline` as a poll timeout: whole milliseconds, rounded up, so
/// the poll returns after the deadline, not just before it. rdkafka hands librdkafka a
/// poll's timeout truncated to milliseconds and, while any time is left, polls again:
/// a wait ending in a fraction of a millisecond spun for it (perf: an idle `pulses run`
/// spent 60% of its CPU in `clock_gettime` there), and a loop woken just before its
/// deadline would turn again for the rest.
pub fn poll_wait_left(deadline: Instant) -> Duration {
    let left = deadline.saturating_duration_since(Instant::now());
    let ms = left.as_nanos().div_ceil(1_000_000);
    Duration::from_millis(u64::try_from(ms).unwrap_or(u64::MAX))
}

/// Commits `offsets` of `topic` synchronously, each with the commit metadata
/// `metadata(partition)` gives. A failure (the partitions moved to another member in a
/// rebalance) is logged: their new owner re-reads from the last committed offset, so
/// the cost is re-processing, never loss. Returns success.
pub fn commit_offsets<C: ConsumerContext>(
    consumer: &BaseConsumer<C>,
    topic: &str,
    offsets: &BTreeMap<i32, i64>,
    metadata: &dyn Fn(i32) -> Option<String>,
) -> KafkaResult<bool> {
    if offsets.is_empty() {
        return Ok(true);
    }
    let tpl = offsets_list(topic, offsets, metadata)?;
    match consumer.commit(&tpl, CommitMode::Sync) {
        Ok(()) => Ok(true),
        Err(e) => {
            tracing::warn!("offset commit failed, the records will be re-processed: {e}");
            Ok(false)
        }
    }
}

/// What the group committed for a partition.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Committed {
    /// The committed offset consumption resumes from (none: nothing committed).
    pub offset: Option<i64>,
    /// The commit's metadata (stage 2: where its changelog ended).
    pub metadata: String,
}

/// What the group committed for `partitions` of `topic`. A failure to ask is logged
/// and answered with nothing committed (callers then restore to the end and read from
/// the group's reset position, as librdkafka itself will).
pub fn committed<C: ConsumerContext>(consumer: &BaseConsumer<C>, topic: &str, partitions: &[i32]) -> BTreeMap<i32, Committed> {
    if partitions.is_empty() {
        return BTreeMap::new();
    }
    let mut tpl = TopicPartitionList::with_capacity(partitions.len());
    for &p in partitions {
        tpl.add_partition(topic, p);
    }
    // A coordinator that is moving or still loading (a fresh broker) answers
    // NOT_COORDINATOR for a while: asked again until the timeout.
    let started = Instant::now();
    let deadline = started + COMMITTED_TIMEOUT;
    let mut asked = consumer.committed_offsets(tpl.clone(), COMMITTED_TIMEOUT);
    while let Err(e) = &asked {
        if !super::startup::Retriable::is_retriable(e) || Instant::now() >= deadline {
            break;
        }
        tracing::debug!(topic, "committed offsets not readable yet, asking again: {e}");
        std::thread::sleep(Duration::from_millis(200));
        asked = consumer.committed_offsets(tpl.clone(), deadline.saturating_duration_since(Instant::now()));
    }
    let waited = started.elapsed();
    if waited >= Duration::from_secs(1) {
        tracing::warn!(topic, ?partitions, waited_ms = waited.as_millis() as u64, "reading the committed offsets was slow");
    }
    match asked {
        Ok(committed) => committed
            .elements()
            .iter()
            .map(|e| (e.partition(), Committed { offset: log_offset(e.offset()), metadata: e.metadata().to_owned() }))
            .collect(),
        Err(e) => {
            tracing::warn!(topic, ?partitions, "cannot read the committed offsets: {e}");
            BTreeMap::new()
        }
    }
}

/// A list of `offsets` of `topic` with per-partition commit metadata.
pub fn offsets_list(
    topic: &str,
    offsets: &BTreeMap<i32, i64>,
    metadata: &dyn Fn(i32) -> Option<String>,
) -> KafkaResult<TopicPartitionList> {
    let mut tpl = TopicPartitionList::with_capacity(offsets.len());
    for (&partition, &next) in offsets {
        let mut elem = tpl.add_partition(topic, partition);
        elem.set_offset(Offset::Offset(next))?;
        if let Some(m) = metadata(partition) {
            elem.set_metadata(m);
        }
    }
    Ok(tpl)
}
