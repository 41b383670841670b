//! The registry outage policy, pure: exponential backoff within a budget per outage, then
//! fail fast with one probe per `max_backoff` until the registry answers again.
//!
//! Why DLQ after the budget rather than pausing forever: a consumer must never stall
//! indefinitely on an external service (SPEC §3), and the DLQ record keeps the original
//! bytes for a re-drive. Within the budget nothing is lost and nothing is DLQ'd.

use std::time::{Duration, Instant};

/// Backoff settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    pub initial: Duration,
    pub max_backoff: Duration,
    /// Longest an outage is waited out before records fail fast.
    pub budget: Duration,
}

/// What to do after a failed attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Wait this long, then try again.
    Retry(Duration),
    /// The outage outlasted the budget: give up on this record.
    GiveUp,
}

/// The state of the current outage, if any.
#[derive(Debug, Default)]
pub struct Outage {
    state: Option<State>,
}

#[derive(Debug, Clone, Copy)]
struct State {
    since: Instant,
    next_delay: Duration,
    last_attempt: Instant,
}

impl Outage {
    /// Records a failed attempt at `now` and says what to do next.
    pub fn failed(&mut self, policy: &RetryPolicy, now: Instant) -> Step {
        let s = self.state.get_or_insert(State { since: now, next_delay: policy.initial, last_attempt: now });
        s.last_attempt = now;
        let elapsed = now.saturating_duration_since(s.since);
        if elapsed >= policy.budget {
            return Step::GiveUp;
        }
        let delay = s.next_delay.min(policy.budget - elapsed);
        s.next_delay = (s.next_delay * 2).min(policy.max_backoff);
        Step::Retry(delay)
    }

    /// The registry answered: the outage is over.
    pub fn ended(&mut self) {
        self.state = None;
    }

    /// Whether a request is worth making at `now`: always, except after the budget ran
    /// out, when one probe per `max_backoff` checks for recovery and the rest fail fast.
    pub fn may_attempt(&self, policy: &RetryPolicy, now: Instant) -> bool {
        match self.state {
            None => true,
            Some(s) => {
                now.saturating_duration_since(s.since) < policy.budget
                    || now.saturating_duration_since(s.last_attempt) >= policy.max_backoff
            }
        }
    }

    /// How long the current outage has lasted.
    pub fn duration(&self, now: Instant) -> Option<Duration> {
        self.state.map(|s| now.saturating_duration_since(s.since))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const P: RetryPolicy =
        RetryPolicy { initial: Duration::from_millis(100), max_backoff: Duration::from_secs(1), budget: Duration::from_secs(3) };

    #[test]
    fn backs_off_exponentially_within_the_budget_then_gives_up() {
        let t0 = Instant::now();
        let mut o = Outage::default();
        let ms = Duration::from_millis;
        let mut now = t0;
        let mut delays = Vec::new();
        while let Step::Retry(d) = o.failed(&P, now) {
            delays.push(d.as_millis());
            now += d;
        }
        assert_eq!(delays, vec![100, 200, 400, 800, 1000, 500]);
        assert_eq!(now - t0, ms(3000));
        // Budget spent: fail fast, one probe per max_backoff.
        assert!(!o.may_attempt(&P, now + ms(999)));
        assert!(o.may_attempt(&P, now + ms(1000)));
        assert_eq!(o.failed(&P, now + ms(1000)), Step::GiveUp);
        assert!(!o.may_attempt(&P, now + ms(1500)));
        o.ended();
        assert!(o.may_attempt(&P, now + ms(1500)));
        assert_eq!(o.failed(&P, now + ms(1500)), Step::Retry(ms(100)), "a new outage has a new budget");
    }
}
