//! One writer at a time for one partition, decided by Kafka: the holder of a
//! transactional id. Taking the id (`init_transactions`) fences any earlier holder and
//! finishes its open transaction, committed or aborted; the new holder then reads the
//! partition to its end and knows everything committed there before it decides what to
//! write. A holder fenced while it works fails to commit, takes the id again and reads
//! again. The invoice issuers ([`super::issuer`]) and the re-rating jobs' decider
//! ([`super::rerating`]) are such writers.

use std::collections::BTreeMap;
use std::time::Duration;

use rdkafka::consumer::Consumer;
use rdkafka::producer::{BaseRecord, Producer};
use rdkafka::Message;

use super::closing::reader_config;
use super::BillingError;
use crate::config::Config;
use crate::kafka::clients::{self, DeliveryTracker, TrackedProducer};
use crate::kafka::reader::{PartitionsToEnd, Range};

const TXN_TIMEOUT: Duration = Duration::from_secs(30);
/// Attempts before giving up (each after being fenced or failing).
pub const ATTEMPTS: u32 = 5;

/// Takes `transactional_id`: a producer whose earlier holders are fenced.
pub fn take(cfg: &Config, transactional_id: &str) -> Result<TrackedProducer, BillingError> {
    let producer = clients::transactional_producer(cfg, transactional_id, DeliveryTracker::default())?;
    producer.init_transactions(TXN_TIMEOUT)?;
    Ok(producer)
}

/// A record's key and value.
pub type KeyValue = (Vec<u8>, Vec<u8>);

/// Every committed record of `topic[partition]`, in order.
pub fn read_to_end(cfg: &Config, topic: &str, partition: i32, name: &'static str) -> Result<Vec<KeyValue>, BillingError> {
    let mut reader = PartitionsToEnd::open(&reader_config(cfg), name, topic, BTreeMap::new(), Some(Duration::from_secs(60)))?;
    let (low, high) = reader.consumer().fetch_watermarks(topic, partition, Duration::from_secs(10))?;
    reader.assign(BTreeMap::from([(partition, Range { from: low, end: Some(high) })]))?;
    let mut out = Vec::new();
    while !reader.is_done() {
        let Some(msg) = reader.next(Duration::from_millis(500))? else { continue };
        out.push((msg.key().unwrap_or_default().to_vec(), msg.payload().unwrap_or_default().to_vec()));
    }
    Ok(out)
}

/// Writes `records` (key, value) to `topic[partition]` in one transaction of `producer`.
pub fn commit(producer: &TrackedProducer, topic: &str, partition: i32, records: &[(String, Vec<u8>)]) -> Result<(), BillingError> {
    producer.begin_transaction()?;
    for (key, value) in records {
        let record = BaseRecord::to(topic).partition(partition).key(key).payload(value);
        if let Err(e) = clients::send_with_backpressure(producer, record) {
            let _ = producer.abort_transaction(TXN_TIMEOUT);
            return Err(e.into());
        }
    }
    // Delivered first: commit_transaction's own wait for deliveries is slower (see
    // runtime::record_collector).
    if let Err(e) = clients::flush(producer, TXN_TIMEOUT).and_then(|()| producer.commit_transaction(TXN_TIMEOUT)) {
        let _ = producer.abort_transaction(TXN_TIMEOUT);
        return Err(e.into());
    }
    Ok(())
}

/// Writes one record to partition 0 of `topic` with a plain (idempotent) producer and
/// waits until the broker has it: the jobs' progress, the invoices' layout record.
pub fn send_one(producer: &TrackedProducer, topic: &str, key: &str, value: &[u8]) -> Result<(), BillingError> {
    producer.send(BaseRecord::to(topic).partition(0).key(key).payload(value)).map_err(|(e, _)| BillingError::Kafka(e))?;
    clients::flush(producer, TXN_TIMEOUT)?;
    Ok(())
}

/// Runs `attempt` until it succeeds, at most [`ATTEMPTS`] times, backing off between.
pub fn retrying<T>(what: &str, mut attempt: impl FnMut() -> Result<T, BillingError>) -> Result<T, BillingError> {
    let mut n = 0;
    loop {
        n += 1;
        match attempt() {
            Ok(v) => return Ok(v),
            Err(e @ (BillingError::Conflict { .. } | BillingError::BadRequest(_) | BillingError::NotFound(_))) => return Err(e),
            Err(e) if n < ATTEMPTS => {
                tracing::warn!(attempt = n, "{what}: {e}; taking the id again and re-reading");
                std::thread::sleep(Duration::from_millis(200 * u64::from(n)));
            }
            Err(e) => return Err(e),
        }
    }
}
