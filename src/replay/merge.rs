//! Merging the source partitions of a bounded replay in record-timestamp order.
//!
//! The live pipeline sees partitions interleaved roughly as they were written; a replay
//! that read one partition ahead of another would push the watermark past the other
//! partition's pulses and turn them into corrections, or into late pulses. So a record
//! is handed out only when every partition still open has one buffered, and it is the
//! one with the smallest (timestamp, partition, offset): the watermark then never runs
//! ahead of any partition.

use std::collections::{BTreeMap, VecDeque};

/// Per-partition buffers of records waiting for their turn.
#[derive(Debug)]
pub struct Merge<T> {
    queues: BTreeMap<i32, Queue<T>>,
}

#[derive(Debug)]
struct Queue<T> {
    items: VecDeque<(i64, i64, T)>,
    /// No more records will come for this partition.
    finished: bool,
}

impl<T> Merge<T> {
    /// A merge over `partitions`, all open.
    pub fn new(partitions: impl IntoIterator<Item = i32>) -> Self {
        let queues = partitions.into_iter().map(|p| (p, Queue { items: VecDeque::new(), finished: false })).collect();
        Self { queues }
    }

    /// Buffers a record of `partition` (records of a partition arrive in offset order).
    pub fn push(&mut self, partition: i32, timestamp: i64, offset: i64, item: T) {
        if let Some(q) = self.queues.get_mut(&partition) {
            q.items.push_back((timestamp, offset, item));
        }
    }

    /// Says that `partition` has no more records.
    pub fn finish(&mut self, partition: i32) {
        if let Some(q) = self.queues.get_mut(&partition) {
            q.finished = true;
        }
    }

    pub fn is_finished(&self, partition: i32) -> bool {
        self.queues.get(&partition).is_none_or(|q| q.finished)
    }

    /// Records buffered for `partition`.
    pub fn buffered(&self, partition: i32) -> usize {
        self.queues.get(&partition).map_or(0, |q| q.items.len())
    }

    /// The next record in order, if it is known yet: None while an open partition has
    /// nothing buffered (its next record could be earlier) or when all is done.
    pub fn pop(&mut self) -> Option<(i32, T)> {
        let mut best: Option<(i64, i32, i64)> = None;
        for (&p, q) in &self.queues {
            match q.items.front() {
                None if q.finished => continue,
                None => return None,
                Some(&(ts, offset, _)) => {
                    if best.is_none_or(|b| (ts, p, offset) < b) {
                        best = Some((ts, p, offset));
                    }
                }
            }
        }
        let (_, p, _) = best?;
        self.queues.get_mut(&p).and_then(|q| q.items.pop_front()).map(|(_, _, item)| (p, item))
    }

    /// Every partition finished and drained.
    pub fn is_done(&self) -> bool {
        self.queues.values().all(|q| q.finished && q.items.is_empty())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hands_out_in_timestamp_order_only_when_every_open_partition_has_a_record() {
        let mut m = Merge::new([0, 1]);
        m.push(0, 10, 0, "a10");
        m.push(0, 30, 1, "a30");
        assert_eq!(m.pop(), None, "partition 1 may still deliver something earlier");
        m.push(1, 20, 0, "b20");
        assert_eq!(m.pop(), Some((0, "a10")));
        assert_eq!(m.pop(), Some((1, "b20")));
        assert_eq!(m.pop(), None);
        m.finish(1);
        assert_eq!(m.pop(), Some((0, "a30")));
        assert!(!m.is_done());
        m.finish(0);
        assert!(m.is_done());
    }

    #[test]
    fn ties_go_to_the_lower_partition_then_offset() {
        let mut m = Merge::new([0, 1]);
        m.push(1, 5, 7, "b");
        m.push(0, 5, 9, "a");
        m.finish(0);
        m.finish(1);
        assert_eq!((m.pop(), m.pop(), m.pop()), (Some((0, "a")), Some((1, "b")), None));
    }
}
