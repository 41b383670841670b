//! Reading assigned partitions of one topic up to an end: what the changelog restore
//! (its partition to its end), `pulses replay` (each source partition to its log end
//! at start) and the rating catch-up (to the group's committed offsets) all do, in one
//! loop. The reader assigns the partitions itself (it never joins a group and commits
//! nothing) and reads `read_committed` ([`super::clients::reader`]).
//!
//! A partition is finished when a record at or past its end offset arrives, when its
//! last record before the end has been handed out, when librdkafka reports the end of
//! the partition (the log may end in a transaction marker, or hold fewer records than
//! the offsets suggest), or when the caller says so ([`PartitionsToEnd::finish`]).
//! Finished partitions are paused, so nothing more is fetched for them.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::BorrowedMessage;
use rdkafka::{Message, Offset, TopicPartitionList};

use super::clients::{self, QuietEof};
use crate::config::Config;

#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("kafka: {0}")]
    Kafka(#[from] KafkaError),
    /// Nothing at all (not even the end of a partition) arrived for the stall limit.
    #[error("{topic}[{partition}] sent nothing for {}s at offset {offset}", secs)]
    Stalled { topic: String, partition: i32, offset: i64, secs: u64 },
}

/// Where one partition is read from, and up to which offset (exclusive; `None`: to the
/// end of the partition as librdkafka reports it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Range {
    pub from: i64,
    pub end: Option<i64>,
}

/// Assigned partitions of one topic, read to their ends.
pub struct PartitionsToEnd {
    consumer: BaseConsumer<QuietEof>,
    topic: String,
    ranges: BTreeMap<i32, Range>,
    /// The offset after the last record handed out, per partition.
    positions: BTreeMap<i32, i64>,
    finished: BTreeSet<i32>,
    /// Fail when nothing arrives this long (none: wait for ever, the caller decides).
    stall: Option<Duration>,
    last_event: Instant,
}

impl PartitionsToEnd {
    /// Assigns `ranges` of `topic` to a new reader with `client`'s settings
    /// ([`clients::reader`]; the stages build those once, from the config).
    pub fn open(
        client: &ClientConfig,
        name: &'static str,
        topic: &str,
        ranges: BTreeMap<i32, Range>,
        stall: Option<Duration>,
    ) -> Result<Self, ReadError> {
        let mut reader = Self::with_client(client, name, topic, stall)?;
        reader.assign(ranges)?;
        Ok(reader)
    }

    /// A reader of `topic` with nothing assigned yet, whose consumer can answer
    /// metadata questions first (where to start and end). `group_id` is named, never
    /// joined; `name` says who reads, in logs.
    pub fn new(cfg: &Config, group_id: &str, name: &'static str, topic: &str, stall: Option<Duration>) -> Result<Self, ReadError> {
        Self::with_client(&clients::reader(cfg, group_id), name, topic, stall)
    }

    fn with_client(client: &ClientConfig, name: &'static str, topic: &str, stall: Option<Duration>) -> Result<Self, ReadError> {
        let consumer: BaseConsumer<QuietEof> = client.create_with_context(QuietEof { reader: name })?;
        Ok(Self {
            consumer,
            topic: topic.to_owned(),
            ranges: BTreeMap::new(),
            positions: BTreeMap::new(),
            finished: BTreeSet::new(),
            stall,
            last_event: Instant::now(),
        })
    }

    /// Reads `ranges` (replacing any earlier assignment).
    pub fn assign(&mut self, ranges: BTreeMap<i32, Range>) -> Result<(), ReadError> {
        let mut tpl = TopicPartitionList::with_capacity(ranges.len());
        for (p, r) in &ranges {
            tpl.add_partition_offset(&self.topic, *p, Offset::Offset(r.from))?;
        }
        self.consumer.assign(&tpl)?;
        self.positions = ranges.iter().map(|(p, r)| (*p, r.from)).collect();
        self.finished.clear();
        self.last_event = Instant::now();
        let empty: Vec<i32> = ranges.iter().filter(|(_, r)| r.end.is_some_and(|e| e <= r.from)).map(|(p, _)| *p).collect();
        self.ranges = ranges;
        for p in empty {
            self.finish(p)?;
        }
        Ok(())
    }

    /// The consumer, for metadata calls (watermarks, offsets for times).
    pub fn consumer(&self) -> &BaseConsumer<QuietEof> {
        &self.consumer
    }

    /// Every partition is finished.
    pub fn is_done(&self) -> bool {
        self.finished.len() == self.ranges.len()
    }

    /// The partitions finished so far.
    pub fn finished(&self) -> impl Iterator<Item = i32> + '_ {
        self.finished.iter().copied()
    }

    /// The offset after the last record of `partition` handed out (its start before).
    pub fn position(&self, partition: i32) -> Option<i64> {
        self.positions.get(&partition).copied()
    }

    /// Reads nothing more of `partition`.
    pub fn finish(&mut self, partition: i32) -> Result<(), ReadError> {
        finish(&self.consumer, &self.topic, &mut self.finished, partition)
    }

    /// Stops fetching `partition` for now (the caller has enough of it buffered).
    pub fn pause(&self, partition: i32) -> Result<(), ReadError> {
        Ok(self.consumer.pause(&one(&self.topic, partition))?)
    }

    /// Fetches `partition` again, unless it is finished.
    pub fn resume(&self, partition: i32) -> Result<(), ReadError> {
        if !self.finished.contains(&partition) {
            self.consumer.resume(&one(&self.topic, partition))?;
        }
        Ok(())
    }

    /// The next record of an unfinished partition before its end, or none within
    /// `timeout` (or when every partition is finished). Client errors are logged:
    /// librdkafka retries them itself.
    pub fn next(&mut self, timeout: Duration) -> Result<Option<BorrowedMessage<'_>>, ReadError> {
        let deadline = Instant::now() + timeout;
        loop {
            if self.is_done() {
                return Ok(None);
            }
            match self.consumer.poll(crate::kafka::batch::poll_wait_left(deadline)) {
                None => {
                    if let Some(stall) = self.stall.filter(|s| self.last_event.elapsed() > *s) {
                        let (&partition, &offset) = self.positions.iter().find(|(p, _)| !self.finished.contains(p)).unwrap_or((&-1, &-1));
                        return Err(ReadError::Stalled { topic: self.topic.clone(), partition, offset, secs: stall.as_secs() });
                    }
                    return Ok(None);
                }
                Some(Err(KafkaError::PartitionEOF(p))) => {
                    self.last_event = Instant::now();
                    finish(&self.consumer, &self.topic, &mut self.finished, p)?;
                }
                Some(Err(e)) => tracing::warn!(topic = %self.topic, "reading to the end: {e}"),
                Some(Ok(m)) => {
                    self.last_event = Instant::now();
                    let p = m.partition();
                    let Some(range) = self.ranges.get(&p).filter(|_| !self.finished.contains(&p)) else { continue };
                    let end = range.end;
                    // The last record before the end (or one past it) finishes the partition.
                    if end.is_some_and(|e| m.offset() + 1 >= e) {
                        finish(&self.consumer, &self.topic, &mut self.finished, p)?;
                    }
                    if end.is_some_and(|e| m.offset() >= e) {
                        continue;
                    }
                    self.positions.insert(p, m.offset() + 1);
                    return Ok(Some(m));
                }
            }
            if Instant::now() >= deadline {
                return Ok(None);
            }
        }
    }
}

/// Marks `partition` finished and stops fetching it (once).
fn finish(consumer: &BaseConsumer<QuietEof>, topic: &str, finished: &mut BTreeSet<i32>, partition: i32) -> Result<(), ReadError> {
    if finished.insert(partition) {
        consumer.pause(&one(topic, partition))?;
    }
    Ok(())
}

/// A list of one partition of `topic`.
fn one(topic: &str, partition: i32) -> TopicPartitionList {
    let mut tpl = TopicPartitionList::with_capacity(1);
    tpl.add_partition(topic, partition);
    tpl
}
