//! The consume-process-commit loop pieces every stage shares: polling a bounded batch,
//! remembering handled offsets, and committing them.

use std::collections::BTreeMap;
use std::sync::Mutex;
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

/// Polls until `max` records were handled or `max_wait` has passed, handing each
/// record to `handle`. Consumer errors (broker hiccups) are logged, not fatal:
/// librdkafka retries them itself.
pub fn poll_batch<C, E>(
    consumer: &BaseConsumer<C>,
    max: usize,
    max_wait: Duration,
    mut handle: impl FnMut(&BorrowedMessage<'_>) -> Result<(), E>,
) -> Result<usize, E>
where
    C: ConsumerContext,
{
    let started = Instant::now();
    let mut n = 0;
    while n < max {
        let Some(left) = max_wait.checked_sub(started.elapsed()) else { break };
        match consumer.poll(left) {
            None => break,
            Some(Err(e)) => tracing::warn!("consumer: {e}"),
            Some(Ok(msg)) => {
                handle(&msg)?;
                n += 1;
            }
        }
    }
    Ok(n)
}

/// Offsets of records handled but not yet committed: partition → next offset.
/// Shared with rebalance callbacks, hence the lock.
#[derive(Debug, Default)]
pub struct PendingOffsets(Mutex<BTreeMap<i32, i64>>);

impl PendingOffsets {
    pub fn record(&self, partition: i32, offset: i64) {
        if let Ok(mut p) = self.0.lock() {
            p.insert(partition, offset + 1);
        }
    }

    pub fn take(&self) -> BTreeMap<i32, i64> {
        self.0.lock().map(|mut p| std::mem::take(&mut *p)).unwrap_or_default()
    }
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

/// The first error raised inside a rebalance callback (which cannot return one),
/// for the poll loop to surface.
#[derive(Debug)]
pub struct FailureSlot<E>(Mutex<Option<E>>);

impl<E> Default for FailureSlot<E> {
    fn default() -> Self {
        Self(Mutex::new(None))
    }
}

impl<E: std::fmt::Display> FailureSlot<E> {
    pub fn set(&self, e: E) {
        tracing::error!("{e}");
        if let Ok(mut f) = self.0.lock() {
            f.get_or_insert(e);
        }
    }

    pub fn take(&self) -> Result<(), E> {
        match self.0.lock().ok().and_then(|mut f| f.take()) {
            Some(e) => Err(e),
            None => Ok(()),
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
