//! Readiness: a replica is ready (`/readyz` 200) once every stage it runs has joined
//! its consumer group and every stage-2 partition assigned to it has restored its
//! store. Before that it would answer with stale or missing state, so a load balancer
//! or a rolling update must wait for it. Liveness (`/healthz`) needs nothing: if the
//! HTTP task answers, the process is alive.

use std::collections::BTreeSet;
use std::sync::Mutex;

/// What a replica waits for before it is ready.
#[derive(Debug, Default)]
pub struct Readiness {
    inner: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    /// Stages this process runs; empty until `pulses run` says which.
    expected: BTreeSet<String>,
    /// Stages whose consumer received an assignment (possibly empty) from the group.
    joined: BTreeSet<String>,
    /// Stage-2 partitions assigned but not restored yet.
    restoring: BTreeSet<i32>,
    /// A start-up step waiting for the broker, and why ([`crate::kafka::startup`]).
    broker: Option<String>,
}

impl Readiness {
    /// A start-up step waits for the broker (`Some(why)`), or no longer does.
    pub fn waiting_for_broker(&self, why: Option<String>) {
        if let Ok(mut s) = self.inner.lock() {
            s.broker = why;
        }
    }

    /// Declares the stages this process runs.
    pub fn expect_stages<'a>(&self, stages: impl IntoIterator<Item = &'a str>) {
        if let Ok(mut s) = self.inner.lock() {
            s.expected.extend(stages.into_iter().map(str::to_owned));
        }
    }

    /// A stage got its assignment from the group (after any restore it needs).
    pub fn joined(&self, stage: &str) {
        if let Ok(mut s) = self.inner.lock() {
            s.joined.insert(stage.to_owned());
        }
    }

    /// A stage left its group to be replaced after a failure: not ready until it joins
    /// again. Stage 2's partitions restore again in the replacement.
    pub fn left(&self, stage: &str) {
        if let Ok(mut s) = self.inner.lock() {
            s.joined.remove(stage);
            if stage == "aggregate" {
                s.restoring.clear();
            }
        }
    }

    /// Partitions about to be restored: not ready until each is [`Self::restored`].
    pub fn restoring(&self, partitions: impl IntoIterator<Item = i32>) {
        if let Ok(mut s) = self.inner.lock() {
            s.restoring.extend(partitions);
        }
    }

    /// A partition's restore finished, or the partition was revoked before it did.
    pub fn restored(&self, partition: i32) {
        if let Ok(mut s) = self.inner.lock() {
            s.restoring.remove(&partition);
        }
    }

    /// `Ok` when ready, else what it still waits for (the `/readyz` body).
    pub fn status(&self) -> Result<(), String> {
        let Ok(s) = self.inner.lock() else { return Err("internal lock poisoned".into()) };
        if let Some(why) = &s.broker {
            return Err(format!("waiting for the broker: {why}"));
        }
        if s.expected.is_empty() {
            return Err("starting".into());
        }
        let waiting: Vec<&str> = s.expected.iter().filter(|e| !s.joined.contains(*e)).map(String::as_str).collect();
        let mut why = Vec::new();
        if !waiting.is_empty() {
            why.push(format!("waiting for a group assignment: {}", waiting.join(", ")));
        }
        if !s.restoring.is_empty() {
            let parts: Vec<String> = s.restoring.iter().map(i32::to_string).collect();
            why.push(format!("restoring state of partitions {}", parts.join(", ")));
        }
        if why.is_empty() {
            Ok(())
        } else {
            Err(why.join("; "))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_only_when_all_stages_joined_and_restored() {
        let r = Readiness::default();
        assert_eq!(r.status(), Err("starting".into()));
        r.waiting_for_broker(Some("creating topics: broker down".into()));
        assert_eq!(r.status(), Err("waiting for the broker: creating topics: broker down".into()));
        r.waiting_for_broker(None);
        r.expect_stages(["group", "aggregate"]);
        r.joined("group");
        assert!(r.status().unwrap_err().contains("aggregate"));
        r.restoring([0, 2]);
        r.joined("aggregate");
        assert_eq!(r.status(), Err("restoring state of partitions 0, 2".into()));
        r.restored(0);
        r.restored(2);
        assert_eq!(r.status(), Ok(()));
    }
}
