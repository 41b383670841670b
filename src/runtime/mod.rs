//! What every stage runs, shaped like Kafka Streams' runtime: the loop of a stage thread
//! ([`stream_thread`], its StreamThread), when it commits ([`commit`]), a task per
//! assigned input partition and the task manager ([`task`]), rebalances recorded by the
//! consumer's callback and acted on by the loop ([`rebalance`]), a task's store,
//! changelog and checkpoints ([`state_manager`]), the thread's one producer, its
//! transactions and delivery tracking ([`record_collector`]), and [`supervise`], which
//! replaces a stage that failed on Kafka. The stages themselves are in
//! [`crate::stage`].

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::ops::metrics::Metrics;

pub mod commit;
pub mod rebalance;
pub mod record_collector;
pub mod state_manager;
pub mod stream_thread;
pub mod task;

/// Why a stage stopped with an error. Bad *input* is never one of these: it goes to the
/// DLQ. These are infrastructure failures after which committing could lose pulses.
#[derive(Debug, thiserror::Error)]
pub enum StageError {
    #[error("kafka: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    #[error(transparent)]
    Output(#[from] crate::runtime::record_collector::TxnError),
    #[error("restoring partition {partition} from the changelog: {source}")]
    Restore { partition: i32, source: crate::state::RestoreError },
    #[error("state store: {0}")]
    Store(#[from] crate::state::StoreError),
    /// The configured windows cannot take over the partition's stored windows.
    #[error("partition {partition}: {source}")]
    Windows { partition: i32, source: crate::window::slots::WindowsChanged },
    #[error("checkpoint: {0}")]
    Checkpoint(#[from] crate::state::CheckpointError),
    #[error("topic setup: {0}")]
    Admin(#[from] crate::kafka::admin::AdminError),
    #[error(transparent)]
    Registry(#[from] crate::registry::RegistryError),
    #[error(transparent)]
    Encode(#[from] crate::codec::output::EncodeError),
    /// `pulses rate`'s ledger could not read its state or encode a record.
    #[error(transparent)]
    Ledger(#[from] crate::rate::ledger::LedgerError),
    /// The replica's identity in its state dir (its process id, or a second process
    /// on the same state dir).
    #[error(transparent)]
    Instance(#[from] crate::state::instance::InstanceError),
    /// The broker refused a request of the stage's consumer (`reason`, as librdkafka
    /// reported it); [`supervise`] names it as [`StageError::Denied`].
    #[error("kafka: {reason}")]
    Refused { code: rdkafka::types::RDKafkaErrorCode, reason: String },
    /// The broker's authorizer refused an operation: who, what, on which resource.
    #[error(transparent)]
    Denied(#[from] crate::kafka::security::Denied),
}

/// What a stage's authorization errors name (see [`StageError::named`]).
pub struct Identity<'a> {
    pub cfg: &'a crate::config::Config,
    pub input: &'a str,
    pub consumer_group: &'a str,
    /// The prefix of the stage's transactional ids (`<application_id>-<stage>-`).
    pub transactional_ids: String,
}

impl StageError {
    /// Whether replacing the stage can get past this: a Kafka-side failure (the broker
    /// down or restarted, the group membership lost, a transaction that could not
    /// commit, a delivery that timed out). Everything uncommitted is redone from the
    /// last commit by the replacement, so nothing is lost or counted twice. Local
    /// failures (the state store, a checkpoint, topic setup, the registry, encoding)
    /// and bugs are not: the process stops.
    pub fn is_recoverable(&self) -> bool {
        use crate::runtime::record_collector::TxnError;
        use crate::state::RestoreError;
        if self.authorization().is_some() {
            // No replacement is granted an ACL the stage lacks.
            return false;
        }
        match self {
            Self::Kafka(_) => true,
            Self::Output(e) => {
                matches!(
                    e,
                    TxnError::Kafka(_)
                        | TxnError::Delivery(..)
                        | TxnError::Transaction { .. }
                        | TxnError::NoGroupMetadata
                        | TxnError::AfterFailedCommit
                        | TxnError::LostInTransaction(_)
                )
            }
            Self::Restore { source, .. } => matches!(source, RestoreError::Kafka(_) | RestoreError::Stalled { .. }),
            Self::Store(_) | Self::Windows { .. } | Self::Checkpoint(_) | Self::Admin(_) | Self::Registry(_)
            | Self::Encode(_) | Self::Instance(_) | Self::Ledger(_) | Self::Refused { .. } | Self::Denied(_) => false,
        }
    }

    /// The authorization code of this error, if the broker's authorizer refused what
    /// the stage asked: its consumer's subscription or group, its producer's
    /// transactional id, a delivery, or the offsets sent to its transaction.
    pub fn authorization(&self) -> Option<rdkafka::types::RDKafkaErrorCode> {
        use crate::kafka::startup::is_authorization_code;
        use crate::runtime::record_collector::TxnError;
        use rdkafka::types::RDKafkaErrorCode;
        let code = match self {
            Self::Kafka(e) | Self::Output(TxnError::Kafka(e) | TxnError::Transaction { source: e, .. }) => e.rdkafka_error_code(),
            // librdkafka's delivery report names the code in words only.
            Self::Output(TxnError::Delivery(_, text)) if text.contains("AuthorizationFailed") => {
                Some(RDKafkaErrorCode::TopicAuthorizationFailed)
            }
            Self::Refused { code, .. } => Some(*code),
            _ => None,
        };
        code.filter(|c| is_authorization_code(*c))
    }

    /// This error, an authorization failure said as [`StageError::Denied`]: the
    /// principal, the operation and the resource of `stage` it concerns.
    pub fn named(self, stage: &Identity<'_>) -> StageError {
        use crate::kafka::security::Denied;
        use rdkafka::types::RDKafkaErrorCode::*;
        let Some(code) = self.authorization() else { return self };
        let detail = self.to_string();
        let cfg = stage.cfg;
        StageError::Denied(match code {
            GroupAuthorizationFailed => Denied::new(cfg, "Read", format!("consumer group {}", stage.consumer_group), detail),
            TransactionalIdAuthorizationFailed => {
                Denied::new(cfg, "Write", format!("transactional ids starting with {}", stage.transactional_ids), detail)
            }
            TopicAuthorizationFailed => Denied::of_topic(cfg, &detail, ("Read", stage.input)),
            _ => Denied::new(cfg, "use", "the cluster", detail),
        })
    }
}

/// Backoff before the first replacement of a failed stage; it doubles while the
/// replacements keep failing soon, up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_secs(1);
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// A stage that ran this long before failing starts over from [`FIRST_BACKOFF`].
const HEALTHY_RUN: Duration = Duration::from_secs(60);

/// Runs `stage` until it returns or shutdown, replacing it in-process after a failure
/// it can recover from ([`StageError::is_recoverable`]), like Kafka Streams replacing
/// a failed stream thread: a broker restart or a lost group membership should not
/// need a process restart. The failed stage has dropped its consumer, producer and
/// stores, so its replacement starts from the committed offsets, the committed state
/// (local store and changelog) and a fresh transactional producer of the same id that
/// fences any leftover transaction. Any other error is returned, and the process stops.
pub fn supervise<F>(name: &str, identity: &Identity<'_>, shutdown: &AtomicBool, metrics: &Metrics, mut stage: F) -> Result<(), StageError>
where
    F: FnMut() -> Result<(), StageError>,
{
    let mut backoff = FIRST_BACKOFF;
    loop {
        let started = Instant::now();
        let error = match stage() {
            Ok(()) => return Ok(()),
            Err(e) if shutdown.load(Ordering::Acquire) || !e.is_recoverable() => return Err(e.named(identity)),
            Err(e) => e,
        };
        if started.elapsed() >= HEALTHY_RUN {
            backoff = FIRST_BACKOFF;
        }
        metrics.ops.readiness.left(name);
        metrics.ops.count_stage_restart(name);
        tracing::warn!(stage = name, error = %error, backoff_ms = backoff.as_millis() as u64,
            "stage failed on Kafka; replacing it (uncommitted work is redone from the last commit)");
        let resume = Instant::now() + backoff;
        while Instant::now() < resume {
            if shutdown.load(Ordering::Acquire) {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}
