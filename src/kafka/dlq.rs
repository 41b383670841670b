//! The dead-letter record format (SPEC §3): the original key and bytes, and headers
//! that say why and where from, so an operator can fix and re-send the record.

use rdkafka::message::{Header, OwnedHeaders};

use crate::pulse::Rejection;

pub const H_REASON: &str = "error.reason";
pub const H_DETAIL: &str = "error.detail";
pub const H_TOPIC: &str = "source.topic";
pub const H_PARTITION: &str = "source.partition";
pub const H_OFFSET: &str = "source.offset";

/// Headers of the DLQ record for `rejection` of the record at topic/partition/offset.
pub fn headers(rejection: &Rejection, topic: &str, partition: i32, offset: i64) -> OwnedHeaders {
    let partition = partition.to_string();
    let offset = offset.to_string();
    OwnedHeaders::new_with_capacity(5)
        .insert(Header { key: H_REASON, value: Some(rejection.reason.as_str()) })
        .insert(Header { key: H_DETAIL, value: Some(rejection.detail.as_str()) })
        .insert(Header { key: H_TOPIC, value: Some(topic) })
        .insert(Header { key: H_PARTITION, value: Some(partition.as_str()) })
        .insert(Header { key: H_OFFSET, value: Some(offset.as_str()) })
}
