//! When a stage thread commits: every `commit_interval`, or once `commit_max_records`
//! input records were handled, besides rebalances and shutdown (Kafka Streams'
//! `commit.interval.ms`). Pure: the loop ([`super::stream_thread`]) asks it.

use std::time::{Duration, Instant};

use crate::config::Config;

/// When the loop commits besides rebalances and shutdown (`[stage]` in the config).
#[derive(Debug, Clone, Copy)]
pub struct CommitSettings {
    /// The longest processed work waits for its commit.
    pub interval: Duration,
    /// The most input records one commit (transaction) carries.
    pub max_records: usize,
}

impl CommitSettings {
    pub fn of(cfg: &Config) -> Self {
        Self { interval: cfg.stage.commit_interval, max_records: cfg.stage.commit_max_records }
    }
}

/// Why a commit is due.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CommitDue {
    /// `commit_interval` passed since the last commit, with work to commit.
    Interval,
    /// `commit_max_records` input records were handled since the last commit.
    Bound,
}

/// Decides when the loop commits, like Kafka Streams' `commit.interval.ms`: a batch is
/// processed as soon as it is polled, and its work commits once the interval has
/// passed or the record bound is reached. Rebalances and shutdown commit regardless
/// (the loop calls [`Self::committed`] after those too, restarting the interval).
#[derive(Debug, Clone)]
pub struct CommitPolicy {
    settings: CommitSettings,
    last: Instant,
    records: usize,
}

impl CommitPolicy {
    pub fn new(settings: CommitSettings, now: Instant) -> Self {
        Self { settings, last: now, records: 0 }
    }

    /// `n` input records were handled.
    pub fn handled(&mut self, n: usize) {
        self.records += n;
    }

    /// Whether to commit now. The interval also commits work that consumed no new
    /// records (windows closed by time, held records released).
    pub fn due(&self, now: Instant) -> Option<CommitDue> {
        if self.records >= self.settings.max_records {
            Some(CommitDue::Bound)
        } else if now.saturating_duration_since(self.last) >= self.settings.interval {
            Some(CommitDue::Interval)
        } else {
            None
        }
    }

    /// How long until the interval is due: the longest a poll may wait.
    pub fn until_due(&self, now: Instant) -> Duration {
        self.settings.interval.saturating_sub(now.saturating_duration_since(self.last))
    }

    /// A commit happened (due, or for a rebalance or shutdown).
    pub fn committed(&mut self, now: Instant) {
        self.last = now;
        self.records = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    fn policy(t0: Instant) -> CommitPolicy {
        CommitPolicy::new(CommitSettings { interval: 100 * MS, max_records: 1_000 }, t0)
    }

    #[test]
    fn the_interval_makes_a_commit_due_and_bounds_the_poll_wait() {
        let t0 = Instant::now();
        let mut p = policy(t0);
        assert_eq!(p.due(t0), None);
        assert_eq!(p.until_due(t0 + 30 * MS), 70 * MS);
        p.handled(10);
        assert_eq!(p.due(t0 + 99 * MS), None, "a batch is processed at once, committed later");
        assert_eq!(p.due(t0 + 100 * MS), Some(CommitDue::Interval));
        assert_eq!(p.until_due(t0 + 250 * MS), Duration::ZERO);
        p.committed(t0 + 250 * MS);
        assert_eq!(p.due(t0 + 300 * MS), None);
        assert_eq!(p.due(t0 + 350 * MS), Some(CommitDue::Interval), "also with no new records: time closes windows");
    }

    #[test]
    fn the_record_bound_makes_a_commit_due_before_the_interval() {
        let t0 = Instant::now();
        let mut p = policy(t0);
        p.handled(600);
        assert_eq!(p.due(t0 + MS), None);
        p.handled(400);
        assert_eq!(p.due(t0 + MS), Some(CommitDue::Bound));
        p.committed(t0 + 2 * MS);
        assert_eq!(p.due(t0 + 3 * MS), None, "the bound counts from the last commit");
    }

    #[test]
    fn a_commit_for_a_rebalance_or_shutdown_restarts_the_interval_and_the_count() {
        let t0 = Instant::now();
        let mut p = policy(t0);
        p.handled(999);
        // A revocation (or shutdown) commits at 60 ms, before anything was due.
        assert_eq!(p.due(t0 + 60 * MS), None);
        p.committed(t0 + 60 * MS);
        p.handled(1);
        assert_eq!(p.due(t0 + 150 * MS), None, "interval counted from the rebalance commit");
        assert_eq!(p.due(t0 + 160 * MS), Some(CommitDue::Interval));
        assert_eq!(p.until_due(t0 + 60 * MS), 100 * MS);
    }
}
