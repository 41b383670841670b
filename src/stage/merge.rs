//! Merging input partitions in event-time order.
//!
//! A watermark is the highest event time seen, so a reader that runs one partition
//! ahead of another pushes it past the other partition's pulses and turns them into
//! corrections, or late pulses. Replay (bounded, record timestamps) and stage 1 (live,
//! pulse event times, so the grouped topic stays in order) hand out a record only when
//! every partition that may still deliver an earlier one has one buffered, and then the
//! one with the smallest (timestamp, partition, offset).

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

impl<T> Default for Queue<T> {
    fn default() -> Self {
        Self { items: VecDeque::new(), finished: false }
    }
}

impl<T> Default for Merge<T> {
    fn default() -> Self {
        Self::new([])
    }
}

/// What [`Merge::next`] found.
#[derive(Debug, PartialEq)]
pub enum Next<T> {
    /// The next record in order.
    Item { partition: i32, timestamp: i64, item: T },
    /// Nothing can go yet: this open partition has nothing buffered and its next record
    /// could be earlier than every buffered one.
    Wait(i32),
    /// Nothing buffered.
    Empty,
}

impl<T> Merge<T> {
    /// A merge over `partitions`, all open.
    pub fn new(partitions: impl IntoIterator<Item = i32>) -> Self {
        Self { queues: partitions.into_iter().map(|p| (p, Queue::default())).collect() }
    }

    /// Takes `partition` in (assigned): from now on an empty buffer of it holds others back.
    pub fn add(&mut self, partition: i32) {
        self.queues.entry(partition).or_default();
    }

    /// Lets `partition` go (revoked), dropping what it had buffered; returns how many.
    pub fn remove(&mut self, partition: i32) -> usize {
        self.queues.remove(&partition).map_or(0, |q| q.items.len())
    }

    /// Buffers a record of `partition` (records of a partition arrive in offset order).
    pub fn push(&mut self, partition: i32, timestamp: i64, offset: i64, item: T) {
        self.queues.entry(partition).or_default().items.push_back((timestamp, offset, item));
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

    /// Partitions taken in, with how many records each has buffered.
    pub fn partitions(&self) -> impl Iterator<Item = (i32, usize)> + '_ {
        self.queues.iter().map(|(&p, q)| (p, q.items.len()))
    }

    /// The next record in order, if it is known yet: None while an open partition has
    /// nothing buffered (its next record could be earlier) or when all is done.
    pub fn pop(&mut self) -> Option<(i32, T)> {
        match self.next(|_| false) {
            Next::Item { partition, item, .. } => Some((partition, item)),
            _ => None,
        }
    }

    /// The next record in order. An open partition with nothing buffered holds
    /// everything back unless `skip_empty` says it may be passed over (it has nothing
    /// waiting to be read, or was waited for long enough).
    pub fn next(&mut self, skip_empty: impl Fn(i32) -> bool) -> Next<T> {
        let mut best: Option<(i64, i32, i64)> = None;
        for (&p, q) in &self.queues {
            match q.items.front() {
                None if q.finished || skip_empty(p) => continue,
                None => return Next::Wait(p),
                Some(&(ts, offset, _)) => {
                    if best.is_none_or(|b| (ts, p, offset) < b) {
                        best = Some((ts, p, offset));
                    }
                }
            }
        }
        match best {
            None => Next::Empty,
            Some((_, p, _)) => match self.queues.get_mut(&p).and_then(|q| q.items.pop_front()) {
                Some((timestamp, _, item)) => Next::Item { partition: p, timestamp, item },
                None => Next::Empty,
            },
        }
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

    #[test]
    fn live_partitions_come_and_go_and_may_be_passed_over() {
        let mut m = Merge::new([0, 1]);
        m.push(0, 10, 0, "a10");
        m.push(0, 40, 1, "a40");
        assert_eq!(m.next(|_| false), Next::Wait(1), "partition 1 may deliver something earlier");
        assert_eq!(m.next(|p| p == 1), Next::Item { partition: 0, timestamp: 10, item: "a10" }, "1 has nothing waiting");
        m.push(1, 20, 0, "b20");
        assert_eq!(m.next(|_| false), Next::Item { partition: 1, timestamp: 20, item: "b20" });
        assert_eq!(m.remove(0), 1, "a revoked partition's buffer is dropped");
        assert_eq!(m.next(|_| true), Next::Empty);
        m.add(2);
        assert_eq!(m.next(|_| false), Next::Wait(1));
        assert_eq!(m.partitions().collect::<Vec<_>>(), vec![(1, 0), (2, 0)]);
    }
}
