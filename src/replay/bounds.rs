//! Where a bounded replay starts and ends in each source partition.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::{Offset, TopicPartitionList};

use super::ReplayError;
use crate::kafka::clients::QuietEof;

const TIMEOUT: Duration = Duration::from_secs(30);

/// The partitions of `topic`.
pub fn partitions(consumer: &BaseConsumer<QuietEof>, topic: &str) -> Result<Vec<i32>, ReplayError> {
    let md = consumer.fetch_metadata(Some(topic), TIMEOUT)?;
    match md.topics().first() {
        Some(t) if t.error().is_none() && !t.partitions().is_empty() => Ok(t.partitions().iter().map(|p| p.id()).collect()),
        _ => Err(ReplayError::Setup(format!("topic {topic} does not exist"))),
    }
}

/// Per partition, the first offset whose record timestamp is at or after `from_ms`
/// (Kafka's offsets-for-time); None when no record is that recent.
pub fn start_offsets(consumer: &BaseConsumer<QuietEof>, topic: &str, partitions: &[i32], from_ms: i64) -> Result<BTreeMap<i32, Option<i64>>, ReplayError> {
    let mut tpl = TopicPartitionList::new();
    for p in partitions {
        tpl.add_partition_offset(topic, *p, Offset::Offset(from_ms))?;
    }
    let found = consumer.offsets_for_times(tpl, TIMEOUT)?;
    let mut out = BTreeMap::new();
    for e in found.elements() {
        let start = match e.offset() {
            Offset::Offset(o) => Some(o),
            Offset::Beginning => Some(0),
            Offset::End => None,
            other => return Err(ReplayError::Setup(format!("offsets-for-time of partition {}: {other:?}", e.partition()))),
        };
        out.insert(e.partition(), start);
    }
    Ok(out)
}

/// Per partition, the log end now: where the replay stops at the latest. Read as the
/// position at end-of-partition from the reported high watermark minus one, so a
/// broker that under-reports the high watermark (Nisshi 0.7.0-pre.2 with multi-record
/// batches) is corrected by the fetch path; on Kafka this reads at most one record.
pub fn end_offsets(reader: &BaseConsumer<QuietEof>, topic: &str, partitions: &[i32]) -> Result<BTreeMap<i32, i64>, ReplayError> {
    let mut tpl = TopicPartitionList::new();
    let mut ends = BTreeMap::new();
    for p in partitions {
        let (low, high) = reader.fetch_watermarks(topic, *p, TIMEOUT)?;
        tpl.add_partition_offset(topic, *p, Offset::Offset((high - 1).max(low).max(0)))?;
        ends.insert(*p, high.max(0));
    }
    reader.assign(&tpl)?;
    let mut open: Vec<i32> = partitions.to_vec();
    let started = Instant::now();
    while !open.is_empty() {
        if started.elapsed() > Duration::from_secs(120) {
            return Err(ReplayError::Setup(format!("no end-of-partition from partitions {open:?} within 2 minutes")));
        }
        match reader.poll(Duration::from_millis(200)) {
            Some(Ok(m)) => {
                use rdkafka::Message;
                let e = ends.entry(m.partition()).or_insert(0);
                *e = (*e).max(m.offset() + 1);
            }
            Some(Err(KafkaError::PartitionEOF(p))) => {
                let pos = reader.position()?;
                if let Some(Offset::Offset(o)) = pos.find_partition(topic, p).map(|e| e.offset()) {
                    let e = ends.entry(p).or_insert(0);
                    *e = (*e).max(o);
                }
                open.retain(|x| *x != p);
            }
            Some(Err(e)) => tracing::warn!("reading partition ends: {e}"),
            None => {}
        }
    }
    reader.unassign()?;
    Ok(ends)
}
