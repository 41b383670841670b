//! The processing stages. Each wraps the pure core (`pulse`, `window`) with Kafka I/O:
//! stage 1 ([`group`]) validates and re-keys, stage 2 ([`aggregate`]) counts.

pub mod aggregate;
pub mod group;

/// Why a stage stopped with an error. Bad *input* is never one of these: it goes to the
/// DLQ. These are infrastructure failures after which committing could lose pulses.
#[derive(Debug, thiserror::Error)]
pub enum StageError {
    #[error("kafka: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    #[error("{0} record(s) could not be delivered ({1}); offsets were not committed past them")]
    Delivery(u64, String),
    #[error("state store: {0}")]
    Store(#[from] crate::state::StoreError),
    #[error("a stage lock was poisoned by a panic")]
    Poisoned,
    #[error("topic setup: {0}")]
    Admin(#[from] crate::kafka::admin::AdminError),
}

/// Waits for every enqueued output; fails if any delivery failed, so the caller does
/// not commit offsets past a lost record.
pub(crate) fn flush_outputs(producer: &crate::kafka::clients::TrackedProducer) -> Result<(), StageError> {
    use rdkafka::producer::Producer;
    producer.flush(FLUSH_TIMEOUT)?;
    let failed = producer.context().failed();
    if failed > 0 {
        return Err(StageError::Delivery(failed, producer.context().last_error().unwrap_or_default()));
    }
    Ok(())
}

/// How long a commit waits for outstanding deliveries before the stage gives up.
const FLUSH_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(120);
