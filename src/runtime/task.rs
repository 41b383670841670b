//! Tasks: one per assigned input partition, like Kafka Streams' StreamTask. A task owns
//! the offset to commit next and the stage's state for that partition (stage 2: its
//! store and window operator); every task of the stage thread writes through the
//! thread's one producer ([`RecordCollector`]). [`Tasks`], the task manager, creates,
//! restores, commits and closes them for the stage's loop ([`super::stream_thread`]).

use std::collections::BTreeMap;

use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::message::OwnedMessage;
use rdkafka::TopicPartitionList;

use super::StageError;
pub use crate::kafka::batch::Committed;
use crate::runtime::record_collector::RecordCollector;

/// Whether a task processes records yet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Bringing its state up to date (its partition is paused meanwhile).
    Restoring,
    Running,
}

/// One assigned input partition.
pub struct Task<S> {
    pub partition: i32,
    /// The next input offset to commit: the record after the last one handled, once
    /// one was since the last commit.
    next_offset: Option<i64>,
    /// The input offset the last commit named (at first: the committed offset the
    /// task resumed from). Re-sent with every commit while nothing new was handled, so
    /// every transaction carries the group's generation check.
    position: Option<i64>,
    /// The committed offset consumption resumed from, to tell a backlog from an idle
    /// partition.
    pub resumed_at: Option<i64>,
    phase: Phase,
    /// Records that arrived while restoring (librdkafka may have fetched some before
    /// the partition was paused): handled first once running.
    early: Vec<OwnedMessage>,
    /// The stage's state for this partition.
    pub state: S,
}

impl<S> Task<S> {
    /// The record at `offset` is handled: commit past it next.
    pub fn consumed(&mut self, offset: i64) {
        self.next_offset = Some(offset + 1);
    }

    /// The offset a commit now names for this task, and whether it moved.
    fn commit_offset(&self) -> (Option<i64>, bool) {
        (self.next_offset.or(self.position), self.next_offset.is_some())
    }
}

/// The task manager: the tasks of the partitions assigned to one stage consumer, and
/// the stage thread's producer.
pub struct Tasks<S> {
    topic: String,
    pub outputs: RecordCollector,
    tasks: BTreeMap<i32, Task<S>>,
}

impl<S> Tasks<S> {
    /// No tasks yet, for input `topic`.
    pub fn new(topic: &str, outputs: RecordCollector) -> Self {
        Self { topic: topic.to_owned(), outputs, tasks: BTreeMap::new() }
    }

    pub fn len(&self) -> usize {
        self.tasks.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tasks.is_empty()
    }

    fn contains(&self, partition: i32) -> bool {
        self.tasks.contains_key(&partition)
    }

    /// The running task of `partition`, with the thread's producer to send through.
    pub fn running(&mut self, partition: i32) -> Option<(&RecordCollector, &mut Task<S>)> {
        let task = self.tasks.get_mut(&partition).filter(|t| t.phase == Phase::Running)?;
        Some((&self.outputs, task))
    }

    /// The task of `partition`, restoring or running, with the thread's producer.
    pub fn task(&mut self, partition: i32) -> Option<(&RecordCollector, &mut Task<S>)> {
        Some((&self.outputs, self.tasks.get_mut(&partition)?))
    }

    /// Every running task, with the thread's producer to send through.
    pub fn all_running(&mut self) -> (&RecordCollector, impl Iterator<Item = &mut Task<S>>) {
        (&self.outputs, self.tasks.values_mut().filter(|t| t.phase == Phase::Running))
    }

    /// Every task, restoring or running.
    pub fn iter_mut(&mut self) -> impl Iterator<Item = &mut Task<S>> {
        self.tasks.values_mut()
    }

    /// Partitions whose task is restoring.
    pub fn restoring(&self) -> Vec<i32> {
        self.tasks.values().filter(|t| t.phase == Phase::Restoring).map(|t| t.partition).collect()
    }

    /// Takes over `partitions`: reads what the group committed for them (read_committed
    /// asks for stable offsets, so a pending offset commit of a previous owner's open
    /// transaction is decided first), then opens each task's state with `open`. A task
    /// that starts [`Phase::Restoring`] has its partition paused until it runs.
    pub fn assign<C: ConsumerContext>(
        &mut self,
        consumer: &BaseConsumer<C>,
        partitions: &[i32],
        mut open: impl FnMut(i32, &Committed) -> Result<(Phase, S), StageError>,
    ) -> Result<(), StageError> {
        let new: Vec<i32> = partitions.iter().copied().filter(|p| !self.contains(*p)).collect();
        let committed = crate::kafka::batch::committed(consumer, &self.topic, &new);
        for partition in new {
            let committed = committed.get(&partition).cloned().unwrap_or_default();
            let (phase, state) = open(partition, &committed)?;
            if phase == Phase::Restoring {
                consumer.pause(&self.one(partition))?;
            }
            let task = Task {
                partition,
                next_offset: None,
                position: committed.offset,
                resumed_at: committed.offset,
                phase,
                early: Vec::new(),
                state,
            };
            self.tasks.insert(partition, task);
        }
        Ok(())
    }

    /// A restoring task is up to date: it runs, records that arrived meanwhile are
    /// returned for handling, and its partition is fetched again.
    pub fn run<C: ConsumerContext>(&mut self, consumer: &BaseConsumer<C>, partition: i32) -> Result<Vec<OwnedMessage>, StageError> {
        let Some(task) = self.tasks.get_mut(&partition) else { return Ok(Vec::new()) };
        task.phase = Phase::Running;
        let early = std::mem::take(&mut task.early);
        consumer.resume(&self.one(partition))?;
        Ok(early)
    }

    /// Keeps a record that arrived for a restoring task; false if `partition` has no
    /// task (not ours: its owner reads it from the committed offset).
    pub fn hold_early(&mut self, partition: i32, msg: OwnedMessage) -> bool {
        match self.tasks.get_mut(&partition) {
            Some(task) => {
                task.early.push(msg);
                true
            }
            None => false,
        }
    }

    /// Removes the tasks of `partitions` (after their last commit) and hands their
    /// states back.
    pub fn close(&mut self, partitions: &[i32]) -> Vec<(i32, S)> {
        partitions.iter().filter_map(|p| Some((*p, self.tasks.remove(p)?.state))).collect()
    }

    /// Commits the outputs of every running task with their offsets in one
    /// transaction, then lets `write_state` record each task's local state with where
    /// its tracked topic (changelog) now ends, then (at_least_once) commits the offsets.
    /// Returns whether offsets were committed.
    pub fn commit<C: ConsumerContext>(
        &mut self,
        consumer: &BaseConsumer<C>,
        mut write_state: impl FnMut(&mut Task<S>, Option<i64>) -> Result<(), StageError>,
    ) -> Result<bool, StageError> {
        let mut offsets = BTreeMap::new();
        let mut advanced = false;
        for task in self.tasks.values().filter(|t| t.phase == Phase::Running) {
            let (offset, moved) = task.commit_offset();
            if let Some(offset) = offset {
                offsets.insert(task.partition, offset);
            }
            advanced |= moved;
        }
        let durable = self.outputs.commit(consumer, &self.topic, offsets, advanced)?;
        for task in self.tasks.values_mut().filter(|t| t.phase == Phase::Running) {
            write_state(task, durable.tracked_next(task.partition))?;
        }
        let committed = self.outputs.confirm(consumer, &self.topic, durable)?;
        for task in self.tasks.values_mut().filter(|t| t.phase == Phase::Running) {
            if let Some(next) = task.next_offset.take() {
                task.position = Some(next);
            }
        }
        Ok(committed)
    }

    fn one(&self, partition: i32) -> TopicPartitionList {
        let mut tpl = TopicPartitionList::with_capacity(1);
        tpl.add_partition(&self.topic, partition);
        tpl
    }
}
