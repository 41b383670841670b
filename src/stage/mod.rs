//! The processing stages. Each wraps the pure core (`pulse`, `window`) with Kafka I/O:
//! stage 1 ([`group`]) validates and re-keys, in event-time order ([`order`]), stage 2
//! ([`aggregate`]) counts.

pub mod aggregate;
pub mod group;
pub mod order;

/// Why a stage stopped with an error. Bad *input* is never one of these: it goes to the
/// DLQ. These are infrastructure failures after which committing could lose pulses.
#[derive(Debug, thiserror::Error)]
pub enum StageError {
    #[error("kafka: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    #[error(transparent)]
    Output(#[from] crate::kafka::txn::TxnError),
    #[error("restoring partition {partition} from the changelog: {source}")]
    Restore { partition: i32, source: crate::state::RestoreError },
    #[error("state store: {0}")]
    Store(#[from] crate::state::StoreError),
    #[error("checkpoint: {0}")]
    Checkpoint(#[from] crate::state::CheckpointError),
    #[error("a stage lock was poisoned by a panic")]
    Poisoned,
    #[error("topic setup: {0}")]
    Admin(#[from] crate::kafka::admin::AdminError),
    #[error(transparent)]
    Registry(#[from] crate::registry::RegistryError),
    #[error(transparent)]
    Encode(#[from] crate::registry::output::EncodeError),
}
