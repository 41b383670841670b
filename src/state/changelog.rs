//! The changelog of a stage's stores (stage 2's windows: `<application_id>-windows-changelog`;
//! `pulses rate`'s ledger: `<application_id>-rate-ledger-changelog`), compacted,
//! partition `p` holding the changes of input partition `p`'s store (like a Kafka
//! Streams changelog). Records are written inside the same transaction
//! as the outputs and offsets they belong to ([`crate::runtime::record_collector`]), so the committed
//! changelog is always the state behind the committed outputs.
//!
//! Restoring reads the changelog from the store's recorded position to its end, with
//! `read_committed`, and applies it. A store with local state (a restart) reads only
//! the tail; a store without (a partition new to this replica) reads it all.
//!
//! Every commit of the input offsets carries the changelog's end at that commit
//! (metadata `changelog=<offset>`). Records after the last committed end belong to
//! transactions that never committed (the previous owner died or was fenced): the
//! restore does not apply them, and re-writes the current value of every key they
//! touched into the next commit. Under exactly_once, `read_committed` already hides
//! them and nothing is re-written. Under at_least_once nothing is transactional: a
//! replica that dies between writing changelog records and committing its offsets
//! leaves records its successor must not apply, since it processes their input again;
//! this keeps the state exactly the one behind the committed offsets, and a later
//! restore that reads those records sees them overwritten.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::consumer::Consumer;
use rdkafka::error::KafkaError;
use rdkafka::Message;

use super::store::{PartitionStore, StoreError};
use crate::config::Config;
use crate::kafka::reader::{PartitionsToEnd, Range, ReadError};

/// Records applied between two intermediate commits during a long restore, so an
/// interrupted restore resumes instead of starting over.
const RESTORE_COMMIT_EVERY: u64 = 50_000;
/// A restore that receives nothing (not even end-of-partition) this long fails loudly
/// rather than stalling the replica forever.
const RESTORE_STALL: Duration = Duration::from_secs(120);

#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    #[error("kafka: {0}")]
    Kafka(#[from] KafkaError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("changelog {topic}[{partition}] sent nothing for {}s at offset {offset}", RESTORE_STALL.as_secs())]
    Stalled { topic: String, partition: i32, offset: i64 },
}

impl From<ReadError> for RestoreError {
    fn from(e: ReadError) -> Self {
        match e {
            ReadError::Kafka(e) => Self::Kafka(e),
            ReadError::Stalled { topic, partition, offset, .. } => Self::Stalled { topic, partition, offset },
        }
    }
}

/// What a restore did, for logs, metrics and tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RestoreStats {
    /// Changelog offset the restore started from (the store's recorded position).
    pub from_offset: i64,
    /// Changelog offset the store now reflects.
    pub to_offset: i64,
    /// Changelog records applied.
    pub records: u64,
    /// Records after the last committed end: not applied, their keys re-written.
    pub uncommitted: u64,
    pub elapsed: Duration,
}

/// The changelog position protocol: every commit of a partition's input offsets carries,
/// as the offset's commit metadata, where the partition's changelog ended at that commit
/// (`changelog=<next offset>`); a restore reads it back to know which changelog records
/// were committed. Written and read only through this type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChangelogEnd(pub i64);

impl ChangelogEnd {
    const PREFIX: &'static str = "changelog=";

    /// The commit metadata saying the changelog ends at `next` after this commit.
    pub fn metadata(next: i64) -> String {
        format!("{}{next}", Self::PREFIX)
    }

    /// The changelog end a committed offset's metadata names, if it names one.
    pub fn parse(metadata: &str) -> Option<Self> {
        metadata.strip_prefix(Self::PREFIX)?.parse().ok().map(Self)
    }
}

/// The client settings of changelog readers (group `<application_id>.restore`, named,
/// never joined).
pub fn restore_client(cfg: &Config) -> ClientConfig {
    crate::kafka::clients::reader(cfg, &format!("{}.restore", cfg.application_id))
}

/// How far a running restore got: for the restore-progress gauges.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Progress {
    /// Records read so far.
    pub read: u64,
    /// Offsets from the start position to the end the restore reads to, if known
    /// (the committed end, else the partition's high watermark).
    pub to_read: Option<u64>,
    pub done: bool,
}

/// A running restore of one store (of grouped-topic partition `partition`) from its
/// changelog partition, stepped by the stage's loop between polls ([`Self::step`]) so
/// a long restore never keeps the consumer from polling (`max.poll.interval.ms`).
/// Start it only after fencing the partition's previous owner, so no open transaction
/// of a zombie can still commit behind the end it reads to.
pub struct ChangelogRestore {
    partition: i32,
    reader: PartitionsToEnd,
    /// The changelog end named by the partition's committed input offset (none:
    /// unknown, trust `read_committed` to the end).
    committed_end: Option<i64>,
    from_offset: i64,
    /// The offset after the last record read.
    position: i64,
    read: u64,
    to_read: Option<u64>,
    records: u64,
    /// Keys of records after the committed end: re-written with the committed state.
    uncommitted: Vec<Vec<u8>>,
    started: Instant,
}

impl ChangelogRestore {
    /// Starts reading changelog `topic` from `store`'s recorded position, with a reader
    /// of `client`'s settings ([`restore_client`]).
    pub fn start(client: &ClientConfig, topic: &str, partition: i32, store: &PartitionStore, committed_end: Option<i64>)
        -> Result<Self, RestoreError> {
        let from_offset = store.changelog_position().unwrap_or(0);
        let ranges = BTreeMap::from([(partition, Range { from: from_offset, end: None })]);
        let reader = PartitionsToEnd::open(client, "changelog restore", topic, ranges, Some(RESTORE_STALL))?;
        let end = committed_end.or_else(|| {
            // Only for the progress gauge: an approximate end is fine (the restore
            // itself reads to end-of-partition).
            reader.consumer().fetch_watermarks(topic, partition, Duration::from_secs(10)).ok().map(|(_, high)| high)
        });
        Ok(Self {
            partition,
            reader,
            committed_end,
            from_offset,
            position: from_offset,
            read: 0,
            to_read: end.map(|e| e.saturating_sub(from_offset).max(0) as u64),
            records: 0,
            uncommitted: Vec::new(),
            started: Instant::now(),
        })
    }

    /// How far the restore got.
    pub fn progress(&self) -> Progress {
        Progress { read: self.read, to_read: self.to_read, done: self.reader.is_done() }
    }

    /// Applies changelog records to `store` for about `budget`; once the changelog's
    /// end is reached, finishes the store (see the module docs on uncommitted records)
    /// and says what the whole restore did.
    pub fn step(&mut self, store: &mut PartitionStore, budget: Duration) -> Result<Option<RestoreStats>, RestoreError> {
        let deadline = Instant::now() + budget;
        while !self.reader.is_done() {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(None);
            }
            let Some(msg) = self.reader.next(left.min(Duration::from_millis(500)))? else { continue };
            self.read += 1;
            self.position = msg.offset() + 1;
            let Some(key) = msg.key() else {
                tracing::warn!(partition = self.partition, offset = msg.offset(), "changelog record without a key skipped");
                continue;
            };
            if self.committed_end.is_some_and(|end| msg.offset() >= end) {
                self.uncommitted.push(key.to_vec());
                continue;
            }
            store.apply_change(key, msg.payload())?;
            self.records += 1;
            if self.records.is_multiple_of(RESTORE_COMMIT_EVERY) {
                store.commit(Some(self.position))?;
            }
        }
        store.commit(Some(self.position))?;
        if !self.uncommitted.is_empty() {
            tracing::warn!(partition = self.partition, records = self.uncommitted.len(), committed_end = self.committed_end,
                "changelog records of uncommitted transactions were delivered (the broker does not hide aborted \
                 transactions); not applied, their keys are re-written with the committed state");
        }
        for key in &self.uncommitted {
            store.rewrite(key)?;
        }
        Ok(Some(RestoreStats {
            from_offset: self.from_offset,
            to_offset: self.position,
            records: self.records,
            uncommitted: self.uncommitted.len() as u64,
            elapsed: self.started.elapsed(),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commit_metadata_round_trips() {
        assert_eq!(ChangelogEnd::metadata(1234), "changelog=1234");
        assert_eq!(ChangelogEnd::parse(&ChangelogEnd::metadata(1234)), Some(ChangelogEnd(1234)));
        assert_eq!(ChangelogEnd::parse(""), None);
        assert_eq!(ChangelogEnd::parse("changelog=x"), None);
        assert_eq!(ChangelogEnd::parse("something else"), None);
    }
}
