//! The stage consumer's context. Its rebalance callback only records what was assigned
//! or revoked; the stage's loop ([`super::stream_thread`]) acts on it between polls: commits
//! and closes revoked tasks, then tells librdkafka the assignment changed, then opens
//! and restores the new tasks. So no stage state has to live behind locks for
//! the callback's sake, and a long restore runs in the loop, which keeps polling.
//!
//! librdkafka waits for the application to apply a rebalance (`assign`/`unassign`)
//! before it rejoins the group, so the loop's commit of revoked partitions still runs
//! under the generation that owned them, as a commit inside the callback would.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, Sender};
use std::sync::{mpsc, Arc};

use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, RebalanceProtocol};
use rdkafka::error::KafkaResult;
use rdkafka::types::RDKafkaRespErr;
use rdkafka::{ClientContext, TopicPartitionList};

use crate::ops::lag;
use crate::ops::metrics::Metrics;

/// A change of the consumer's assignment, as the rebalance callback saw it.
#[derive(Debug)]
pub enum Rebalance {
    /// Partitions to take over.
    Assigned(TopicPartitionList),
    /// Partitions to give up; `lost`: the group already gave them to another member
    /// (a missed session), so nothing of theirs may be committed.
    Revoked { partitions: TopicPartitionList, lost: bool },
}

impl Rebalance {
    /// The partitions it names.
    pub fn partitions(&self) -> Vec<i32> {
        let tpl = match self {
            Self::Assigned(tpl) | Self::Revoked { partitions: tpl, .. } => tpl,
        };
        tpl.elements().iter().map(|e| e.partition()).collect()
    }

    /// Tells librdkafka the assignment changed: call once the loop has acted on it
    /// (revoked tasks committed and closed; assigned ones about to open).
    pub fn apply<C: ConsumerContext>(&self, consumer: &BaseConsumer<C>) -> KafkaResult<()> {
        apply(consumer, self)
    }
}

fn apply<C: ConsumerContext>(consumer: &BaseConsumer<C>, rebalance: &Rebalance) -> KafkaResult<()> {
    let cooperative = matches!(consumer.rebalance_protocol(), RebalanceProtocol::Cooperative);
    match rebalance {
        Rebalance::Assigned(tpl) if cooperative => consumer.incremental_assign(tpl),
        Rebalance::Assigned(tpl) => consumer.assign(tpl),
        Rebalance::Revoked { partitions, .. } if cooperative => consumer.incremental_unassign(partitions),
        Rebalance::Revoked { .. } => consumer.unassign(),
    }
}

/// The context of a stage's consumer: records rebalances for the loop, and reports
/// consumer statistics (lag).
pub struct StageContext {
    stage: &'static str,
    metrics: Arc<Metrics>,
    /// The loop's inbox.
    inbox: Sender<Rebalance>,
    /// The loop has stopped (shutdown or failure): rebalances are applied at once, as
    /// closing the consumer needs, and nothing is committed (the loop committed what
    /// it could before).
    closing: AtomicBool,
    /// The first request of this consumer the broker's authorizer refused (the
    /// subscription's topic, the group): the loop stops on it.
    refused: std::sync::Mutex<Option<(rdkafka::types::RDKafkaErrorCode, String)>>,
}

impl StageContext {
    /// A context for `stage`, and the loop's end of its inbox.
    pub fn new(stage: &'static str, metrics: Arc<Metrics>) -> (Self, Receiver<Rebalance>) {
        let (tx, rx) = mpsc::channel();
        (Self { stage, metrics, inbox: tx, closing: AtomicBool::new(false), refused: Default::default() }, rx)
    }

    /// What the broker's authorizer refused, if anything (see [`Self::refused`]).
    pub fn refused(&self) -> Option<(rdkafka::types::RDKafkaErrorCode, String)> {
        self.refused.lock().ok().and_then(|r| r.clone())
    }

    /// From now on rebalances apply at once (the loop no longer reads the inbox).
    pub fn close(&self) {
        self.closing.store(true, Ordering::Release);
    }
}

impl ClientContext for StageContext {
    fn stats(&self, statistics: rdkafka::Statistics) {
        lag::record(&self.metrics, self.stage, &statistics);
    }

    fn error(&self, error: rdkafka::error::KafkaError, reason: &str) {
        tracing::error!(stage = self.stage, "consumer: {error}: {reason}");
        if let Some(code) = error.rdkafka_error_code().filter(|c| crate::kafka::startup::is_authorization_code(*c)) {
            if let Ok(mut refused) = self.refused.lock() {
                refused.get_or_insert((code, reason.to_owned()));
            }
        }
    }
}

impl ConsumerContext for StageContext {
    fn rebalance(&self, consumer: &BaseConsumer<Self>, err: RDKafkaRespErr, tpl: &mut TopicPartitionList) {
        let rebalance = match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => Rebalance::Assigned(tpl.clone()),
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => {
                Rebalance::Revoked { partitions: tpl.clone(), lost: consumer.assignment_lost() }
            }
            other => {
                tracing::warn!(stage = self.stage, "rebalance error: {other:?}");
                return;
            }
        };
        tracing::debug!(stage = self.stage, ?rebalance, "rebalance recorded");
        if !self.closing.load(Ordering::Acquire) {
            match self.inbox.send(rebalance) {
                Ok(()) => return,
                // The loop is gone: apply it here, as closing needs.
                Err(mpsc::SendError(r)) => return self.apply_now(consumer, &r),
            }
        }
        self.apply_now(consumer, &rebalance);
    }
}

impl StageContext {
    fn apply_now(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance) {
        if let Err(e) = apply(consumer, rebalance) {
            tracing::warn!(stage = self.stage, "applying a rebalance while closing: {e}");
        }
    }
}
