//! Where a bounded replay starts and ends in each source partition.

use std::collections::BTreeMap;
use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{Offset, TopicPartitionList};

use super::ReplayError;
use crate::kafka::clients::QuietEof;

const TIMEOUT: Duration = Duration::from_secs(30);


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

/// Per partition, the log end now (the high watermark): where the replay stops at the
/// latest, so records produced while it runs are not chased.
pub fn end_offsets(consumer: &BaseConsumer<QuietEof>, topic: &str, partitions: &[i32]) -> Result<BTreeMap<i32, i64>, ReplayError> {
    let mut ends = BTreeMap::new();
    for p in partitions {
        let (_, high) = consumer.fetch_watermarks(topic, *p, TIMEOUT)?;
        ends.insert(*p, high.max(0));
    }
    Ok(ends)
}
