//! Whether the stage upstream of a topic still has an old backlog.
//!
//! Stage 2 calls a partition idle when nothing arrived on it for `idle_timeout` and
//! nothing is waiting in it ([`super::backlog`]). That is not enough after downtime:
//! the backlog is then in `source.pulses`, not yet grouped, and stage 1 may take longer
//! than `idle_timeout` to start forwarding it (fencing, restoring, a busy machine). If
//! stage 2 idled meanwhile, its watermarks would jump to the wall clock and the backlog
//! would arrive behind closed windows. So stage 2 also asks: has stage 1's group
//! committed every source record that was already there `idle_timeout` ago? Until it
//! has, no grouped partition is idle. Under steady flow stage 1 commits within its
//! batch wait, far inside `idle_timeout`, so quiet partitions still close on time.
//!
//! Stage 1 may run in another process (`--stages`), so the answer comes from the
//! broker (stage 1's committed offsets and the source partitions' ends), asked by a
//! thread of its own so a slow broker never stalls the poll loop.

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::{KafkaError, KafkaResult};
use rdkafka::types::RDKafkaErrorCode;

use super::batch::committed;
use super::clients;
use crate::config::Config;

/// One look at the source: each partition's first offset and end (its last stable
/// offset, the end a read_committed stage 1 can read to).
type Ends = BTreeMap<i32, (i64, i64)>;

/// Tells stage 2 whether stage 1 still has an old backlog; watched by a background
/// thread, stopped on drop.
pub struct UpstreamWatch {
    behind: Arc<AtomicBool>,
    /// Dropped to stop the thread: its wait between looks ends at once.
    stop: Option<mpsc::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl UpstreamWatch {
    /// Watches consumer group `group` reading `topic`: behind while it has not committed
    /// the records that were in `topic` `horizon` ago (stage 2's idle timeout).
    pub fn start(cfg: &Config, topic: &str, group: &str, horizon: Duration) -> KafkaResult<Self> {
        let consumer: BaseConsumer = clients::observer(cfg, group).create()?;
        // Unknown counts as behind, like an unknown partition end in `backlog`.
        let behind = Arc::new(AtomicBool::new(true));
        let (stop, stopped) = mpsc::channel();
        let looker = Looker { consumer, topic: topic.to_owned(), history: EndHistory::new(horizon) };
        let b = Arc::clone(&behind);
        let thread = std::thread::Builder::new()
            .name("upstream-watch".into())
            .spawn(move || looker.run(&b, &stopped, look_interval(horizon)))
            .map_err(|e| KafkaError::ClientCreation(format!("starting the upstream watch: {e}")))?;
        Ok(Self { behind, stop: Some(stop), thread: Some(thread) })
    }

    /// Stage 1 still has source records older than the horizon to forward (or the
    /// broker could not be asked yet).
    pub fn is_behind(&self) -> bool {
        self.behind.load(Ordering::Acquire)
    }
}

impl Drop for UpstreamWatch {
    /// Tells the thread to stop and leaves it to finish alone: a look may be blocked
    /// in a broker request for up to 30 s (a group it may not describe answers
    /// nothing), and the stage it served must not wait for that to stop.
    fn drop(&mut self) {
        drop(self.stop.take());
        drop(self.thread.take());
    }
}

/// How often to look: a quarter of the horizon, so the hold lifts soon after stage 1
/// caught up, within bounds that keep the broker queries cheap.
fn look_interval(horizon: Duration) -> Duration {
    (horizon / 4).clamp(Duration::from_millis(100), Duration::from_secs(5))
}

/// The thread's side: the client and what it has seen.
struct Looker {
    consumer: BaseConsumer,
    topic: String,
    history: EndHistory,
}

impl Looker {
    fn run(mut self, behind: &AtomicBool, stopped: &mpsc::Receiver<()>, interval: Duration) {
        let mut failing = false;
        loop {
            let started = Instant::now();
            match self.look(started) {
                Ok(b) => {
                    if failing {
                        tracing::info!(topic = %self.topic, "upstream backlog can be read again");
                    }
                    failing = false;
                    behind.store(b, Ordering::Release);
                }
                Err(e) => {
                    // Not knowing holds windows open (late, never wrong); say so once.
                    if !failing {
                        tracing::warn!(topic = %self.topic,
                            "cannot read the upstream backlog, idle partitions wait until it can be read: {e}");
                    }
                    failing = true;
                    behind.store(true, Ordering::Release);
                }
            }
            // Until the next look, or until the watch is dropped.
            if stopped.recv_timeout(interval.saturating_sub(started.elapsed())) != Err(RecvTimeoutError::Timeout) {
                return;
            }
        }
    }

    /// One look: the source's ends now, then what stage 1 committed.
    fn look(&mut self, now: Instant) -> KafkaResult<bool> {
        const TIMEOUT: Duration = Duration::from_secs(5);
        let metadata = self.consumer.fetch_metadata(Some(&self.topic), TIMEOUT)?;
        let Some(topic) = metadata.topics().first() else { return Ok(false) };
        match topic.error().map(RDKafkaErrorCode::from) {
            // No source topic: nothing upstream to wait for.
            Some(RDKafkaErrorCode::UnknownTopicOrPartition) => return Ok(false),
            Some(code) => return Err(KafkaError::MetadataFetch(code)),
            None => {}
        }
        let mut ends = Ends::new();
        for p in topic.partitions() {
            let (low, end) = self.consumer.fetch_watermarks(&self.topic, p.id(), TIMEOUT)?;
            ends.insert(p.id(), (low, end));
        }
        // Ends first, offsets second: a commit between the two only makes it less behind.
        let partitions: Vec<i32> = ends.keys().copied().collect();
        let offsets = committed(&self.consumer, &self.topic, &partitions);
        self.history.record(now, ends);
        let committed: BTreeMap<i32, Option<i64>> = offsets.into_iter().map(|(p, c)| (p, c.offset)).collect();
        Ok(self.history.reference().is_some_and(|reference| has_old_backlog(reference, &committed)))
    }
}

/// Source ends seen over the last horizon, to compare stage 1's progress with the ends
/// it had a horizon ago.
#[derive(Debug)]
struct EndHistory {
    horizon: Duration,
    looks: VecDeque<(Instant, Ends)>,
}

impl EndHistory {
    fn new(horizon: Duration) -> Self {
        Self { horizon, looks: VecDeque::new() }
    }

    fn record(&mut self, at: Instant, ends: Ends) {
        self.looks.push_back((at, ends));
        // Keep the newest look at least a horizon old, and everything after it.
        while self.looks.len() > 1 && self.looks.get(1).is_some_and(|(t, _)| at.duration_since(*t) >= self.horizon) {
            self.looks.pop_front();
        }
    }

    /// The ends to hold stage 1 to: the newest look a horizon old, or, while the watch
    /// is younger than that, its first look (after a restart the whole backlog found
    /// then must be read before anything idles).
    fn reference(&self) -> Option<&Ends> {
        self.looks.front().map(|(_, ends)| ends)
    }
}

/// The decision: some partition's committed offset (or, with nothing committed, its
/// first offset, where stage 1 starts) is behind the end it had at the reference look.
fn has_old_backlog(reference: &Ends, committed: &BTreeMap<i32, Option<i64>>) -> bool {
    reference.iter().any(|(p, &(low, end))| {
        let next = committed.get(p).copied().flatten().unwrap_or(low);
        next < end
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ends(e: &[(i32, i64, i64)]) -> Ends {
        e.iter().map(|&(p, low, end)| (p, (low, end))).collect()
    }

    #[test]
    fn behind_until_stage_1_committed_the_old_ends() {
        let reference = ends(&[(0, 0, 100), (1, 0, 50)]);
        let at = |a: Option<i64>, b: Option<i64>| BTreeMap::from([(0, a), (1, b)]);
        assert!(has_old_backlog(&reference, &at(Some(99), Some(50))));
        assert!(!has_old_backlog(&reference, &at(Some(100), Some(50))));
        assert!(!has_old_backlog(&reference, &at(Some(140), Some(70))), "newer records are not an old backlog");
        assert!(has_old_backlog(&reference, &at(None, Some(50))), "nothing committed: from the first offset");
        assert!(!has_old_backlog(&ends(&[(0, 100, 100)]), &BTreeMap::from([(0, None)])), "an empty partition");
        assert!(!has_old_backlog(&Ends::new(), &BTreeMap::new()), "no partitions, no backlog");
    }

    #[test]
    fn the_reference_is_the_newest_look_a_horizon_old() {
        let t0 = Instant::now();
        let s = Duration::from_secs;
        let mut h = EndHistory::new(s(2));
        h.record(t0, ends(&[(0, 0, 10)]));
        h.record(t0 + s(1), ends(&[(0, 0, 20)]));
        assert_eq!(h.reference(), Some(&ends(&[(0, 0, 10)])), "younger than the horizon: the first look");
        h.record(t0 + s(2), ends(&[(0, 0, 30)]));
        h.record(t0 + s(3), ends(&[(0, 0, 40)]));
        assert_eq!(h.reference(), Some(&ends(&[(0, 0, 20)])), "the look at t0+1 is 2 s old");
        h.record(t0 + s(10), ends(&[(0, 0, 50)]));
        assert_eq!(h.reference(), Some(&ends(&[(0, 0, 40)])), "gaps keep the newest old-enough look");
        assert_eq!(h.looks.len(), 2);
    }

    #[test]
    fn looks_are_a_quarter_of_the_horizon_within_bounds() {
        assert_eq!(look_interval(Duration::from_secs(2)), Duration::from_millis(500));
        assert_eq!(look_interval(Duration::from_millis(100)), Duration::from_millis(100));
        assert_eq!(look_interval(Duration::from_secs(3600)), Duration::from_secs(5));
    }
}
