//! A task's state manager, like Kafka Streams' ProcessorStateManager: it owns the
//! task's RocksDB store, the store's changelog (restore, changelog writes, the
//! changelog position) and its checkpoints. A stage sees only the store
//! ([`TaskState::store`]); what goes to the changelog and when the store is written
//! follow one order, the same for every stage with state (stage 2's windows,
//! `pulses rate`'s ledger):
//!
//! 1. open: the store is opened (seeded from a checkpoint if the live copy is gone)
//!    and a restore starts from its recorded changelog position to the end the
//!    partition's committed offset names (see [`crate::state::changelog`]);
//! 2. restore: stepped by the loop between polls until the changelog's end;
//! 3. at every commit: the store's batch goes to the changelog inside the thread's
//!    transaction ([`TaskState::send_changes`]), and only once that transaction is
//!    committed is the batch written locally with the changelog offset it reflects
//!    ([`TaskState::commit`]). Local state is never ahead of the committed changelog.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::producer::BaseRecord;

use super::task::Committed;
use super::StageError;
use super::record_collector::{RecordCollector, Tracked};
use crate::config::Config;
use crate::state::changelog::{self, ChangelogEnd, ChangelogRestore, Progress, RestoreStats};
use crate::state::{checkpoint, PartitionStore, StorePaths, StoreResources};

/// Where a stage's task stores live and how they restore: built once per stage from
/// its wiring ([`crate::stage::topology`]), shared by its tasks.
pub struct StateSpec {
    /// The stores' changelog topic (partition p = the store of input partition p).
    pub changelog: String,
    /// The input topic the stores are named after (`<input>-<partition>`).
    pub input: String,
    pub state_dir: PathBuf,
    pub checkpoint_dir: PathBuf,
    /// Memory shared by all the stage's stores.
    pub resources: StoreResources,
    /// The changelog readers' client settings.
    pub restore_client: ClientConfig,
}

impl StateSpec {
    /// The stores of `input`'s partitions under `state_dir` (checkpoints under
    /// `checkpoint_dir`), with `changelog`, sharing `memory_bytes`.
    pub fn new(cfg: &Config, changelog: &str, input: &str, state_dir: &Path, checkpoint_dir: &Path, memory_bytes: usize) -> Self {
        Self {
            changelog: changelog.to_owned(),
            input: input.to_owned(),
            state_dir: state_dir.to_owned(),
            checkpoint_dir: checkpoint_dir.to_owned(),
            resources: StoreResources::new(memory_bytes),
            restore_client: changelog::restore_client(cfg),
        }
    }
}

impl StateSpec {
    /// How the stage's commits name where each changelog partition ends (the
    /// [`ChangelogEnd`] protocol): give it to the thread's [`RecordCollector`].
    pub fn tracked(&self) -> Tracked {
        Tracked { topic: self.changelog.clone(), metadata: ChangelogEnd::metadata }
    }
}

/// The state of one task: its store, and its restore while one runs.
pub struct TaskState {
    partition: i32,
    store: PartitionStore,
    paths: StorePaths,
    /// The store's changelog topic (partition = the task's input partition).
    changelog: String,
    /// Catching up with the changelog; `None` once the store is up to date.
    restore: Option<Box<ChangelogRestore>>,
    /// How the finished restore ended, for its last progress report.
    restored: Option<Progress>,
    last_checkpoint: Instant,
    /// The store was seeded from a checkpoint (its live copy was gone).
    seeded: bool,
}

impl TaskState {
    /// Opens `partition`'s store and starts restoring it from its changelog to the end
    /// its committed offset names (a stable offset: no previous owner's pending commit
    /// can still move it).
    pub fn open(spec: &StateSpec, partition: i32, committed: &Committed) -> Result<Self, StageError> {
        let paths = StorePaths::new(&spec.state_dir, &spec.checkpoint_dir, &spec.input, partition);
        let (store, seeded) = checkpoint::open_store(&paths, &spec.resources)?;
        let committed_end = ChangelogEnd::parse(&committed.metadata).map(|end| end.0);
        let restore = ChangelogRestore::start(&spec.restore_client, &spec.changelog, partition, &store, committed_end)
            .map_err(|source| StageError::Restore { partition, source })?;
        Ok(Self {
            partition,
            store,
            paths,
            changelog: spec.changelog.clone(),
            restore: Some(Box::new(restore)),
            restored: None,
            last_checkpoint: Instant::now(),
            seeded,
        })
    }

    /// How far the restore got (once finished: how it ended).
    pub fn progress(&self) -> Progress {
        self.restore.as_ref().map_or_else(|| self.restored.unwrap_or(Progress { read: 0, to_read: Some(0), done: true }), |r| r.progress())
    }

    /// Applies changelog records for about `budget`. Returns what the whole restore
    /// did on the step that finishes it; `None` while it goes on (or after it ended).
    /// A finished restore tells the thread's producer where the changelog partition
    /// ends, so the next commit names at least that end.
    pub fn restore(&mut self, outputs: &RecordCollector, budget: Duration) -> Result<Option<RestoreStats>, StageError> {
        let partition = self.partition;
        let Some(restore) = &mut self.restore else { return Ok(None) };
        let stepped = restore.step(&mut self.store, budget).map_err(|source| StageError::Restore { partition, source })?;
        if let Some(stats) = stepped {
            outputs.set_tracked_position(partition, stats.to_offset);
            self.restored = Some(restore.progress());
            self.restore = None;
        }
        Ok(stepped)
    }

    pub fn is_restoring(&self) -> bool {
        self.restore.is_some()
    }

    /// The store, for the stage to read and write (writes stay in its batch until
    /// [`Self::commit`]).
    pub fn store(&mut self) -> &mut PartitionStore {
        &mut self.store
    }

    pub fn paths(&self) -> &StorePaths {
        &self.paths
    }

    pub fn seeded(&self) -> bool {
        self.seeded
    }

    /// Sends the store's batch to the changelog, in the thread's open transaction.
    /// Returns how many records it sent.
    pub fn send_changes(&self, outputs: &RecordCollector) -> Result<u64, StageError> {
        let mut sent = 0;
        for (key, value) in self.store.changes() {
            let record = BaseRecord::<[u8], [u8]>::to(&self.changelog).key(key).partition(self.partition);
            outputs.send(match value {
                Some(v) => record.payload(v),
                None => record,
            })?;
            sent += 1;
        }
        Ok(sent)
    }

    /// The transaction holding the changes is committed: writes the store's batch,
    /// recording the changelog offset it now reflects.
    pub fn commit(&mut self, changelog_next: Option<i64>) -> Result<(), StageError> {
        Ok(self.store.commit(changelog_next)?)
    }

    /// Writes a checkpoint when the last one is `every` old (always when `closing`),
    /// recording `watermark_ms` beside it. Returns how long it took, if it wrote one.
    pub fn checkpoint(&mut self, every: Duration, closing: bool, watermark_ms: i64) -> Result<Option<Duration>, StageError> {
        if self.restore.is_some() || (!closing && self.last_checkpoint.elapsed() < every) {
            return Ok(None);
        }
        let took = checkpoint::write(&self.paths, &self.store, self.partition, watermark_ms)?;
        self.last_checkpoint = Instant::now();
        Ok(Some(took))
    }
}
