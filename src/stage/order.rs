//! Stage 1's output order: records of the assigned source partitions go out in event-time
//! order across partitions, as far as that order is known.
//!
//! Stage 2's watermark is the highest event time of a grouped partition, and a grouped
//! partition mixes every source partition. librdkafka hands out a fetch's worth of one
//! partition at a time, so forwarding records as they come would let one source
//! partition's backlog run ahead of another's by far more than the grace: stage 2 would
//! close windows before the other's pulses arrive, and re-emit them as corrections.
//! So records are held ([`Merge`]) until every partition that still has records to read
//! has one held, then the earliest goes.

use std::collections::{BTreeSet, HashMap};
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::error::KafkaError;
use rdkafka::TopicPartitionList;

use crate::kafka::backlog;
use super::merge::{Merge, Next};

/// Records held per source partition before its fetching pauses.
const HELD_PER_PARTITION: usize = 10_000;
/// How long a partition that has records to read but delivers none (say, a source
/// transaction held open) may hold the others back.
const STARVE_MAX: Duration = Duration::from_secs(2);

/// Records read but not yet sent, per source partition, and what decides when they go.
pub struct InputOrder<T> {
    topic: String,
    merge: Merge<(i64, T)>,
    /// Partition → the committed offset it resumed from at assignment.
    resumed_at: HashMap<i32, i64>,
    /// Partition → since when the release has waited for it (records to read, none held).
    starved_since: HashMap<i32, Instant>,
    /// Partitions paused because they hold [`HELD_PER_PARTITION`] records.
    paused: BTreeSet<i32>,
}

impl<T> InputOrder<T> {
    /// Order for the partitions of `topic`. The stage thread's one producer keeps it
    /// on the way out (under exactly_once too: one transaction holds every partition's
    /// records, in the order they were sent).
    pub fn new(topic: &str) -> Self {
        Self {
            topic: topic.to_owned(),
            merge: Merge::default(),
            resumed_at: HashMap::new(),
            starved_since: HashMap::new(),
            paused: BTreeSet::new(),
        }
    }

    /// Partitions assigned, resuming from these committed offsets.
    pub fn assign(&mut self, partitions: impl IntoIterator<Item = i32>, resumed_at: HashMap<i32, i64>) {
        for p in partitions {
            self.merge.add(p);
        }
        self.resumed_at.extend(resumed_at);
    }

    /// Partitions revoked: what they held is dropped, uncommitted, for their next owner
    /// to read again. Returns how many records that was.
    pub fn revoke(&mut self, partitions: impl IntoIterator<Item = i32>) -> usize {
        let mut dropped = 0;
        for p in partitions {
            dropped += self.merge.remove(p);
            self.resumed_at.remove(&p);
            self.starved_since.remove(&p);
            self.paused.remove(&p);
        }
        dropped
    }

    /// Holds the record at `offset` of `partition` until its turn. `event_time`
    /// `i64::MIN`: it goes as soon as the records before it in its partition.
    pub fn hold(&mut self, partition: i32, offset: i64, event_time: i64, item: T) {
        self.merge.push(partition, event_time, offset, (offset, item));
        self.starved_since.remove(&partition);
    }

    /// Hands held records to `send` (partition, offset, record) in event-time order. A
    /// partition with records still to read and none held stops the release, for at
    /// most [`STARVE_MAX`]. Pauses fetching of partitions holding too much and resumes
    /// the others.
    pub fn release<C: ConsumerContext, E: From<KafkaError>>(
        &mut self,
        consumer: &BaseConsumer<C>,
        mut send: impl FnMut(i32, i64, T) -> Result<(), E>,
    ) -> Result<(), E> {
        let behind = backlog::partitions_behind(consumer, &self.topic, &self.resumed_at);
        let now = Instant::now();
        let starved_since = &mut self.starved_since;
        loop {
            let starved = |p: i32| starved_since.get(&p).is_some_and(|t| now.duration_since(*t) >= STARVE_MAX);
            match self.merge.next(|p| !behind.contains(&p) || starved(p)) {
                Next::Item { partition, item: (offset, item), .. } => send(partition, offset, item)?,
                Next::Wait(p) => {
                    starved_since.entry(p).or_insert_with(|| {
                        tracing::debug!(partition = p, "holding records: this partition has records to read, none held");
                        now
                    });
                    break;
                }
                Next::Empty => break,
            }
        }
        for (p, held) in self.merge.partitions().collect::<Vec<_>>() {
            let pause = held >= HELD_PER_PARTITION;
            if pause != self.paused.contains(&p) {
                let mut tpl = TopicPartitionList::with_capacity(1);
                tpl.add_partition(&self.topic, p);
                if pause {
                    consumer.pause(&tpl)?;
                    self.paused.insert(p);
                } else {
                    // Fetching resumes after the last record handed to us.
                    consumer.resume(&tpl)?;
                    self.paused.remove(&p);
                }
            }
        }
        Ok(())
    }
}
