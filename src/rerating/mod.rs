//! Re-rating jobs (SPEC §9), pure: what a job is, when two jobs overlap, and the diff
//! between what was billed and what a job re-rated. Running jobs (the jobs topic, the
//! replay, the rating, applying a diff) is [`crate::billing::rerating`].
//!
//! A job re-rates whole billing periods: `from` and `to` are the first instants of UTC
//! months, so tiered prices apply to a period's whole quantity, as the ledger applies
//! them; a part of a month would restart the tiers and compare nothing.

pub mod diff;

use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

use crate::pulse::time;

pub use diff::{diff, DiffLine};

/// Tenants × time: what a job re-rates.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Scope {
    #[serde(with = "time::rfc3339_ms")]
    pub from: i64,
    #[serde(with = "time::rfc3339_ms")]
    pub to: i64,
    /// One tenant, or every tenant.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant_id: Option<String>,
}

impl Scope {
    /// A scope of whole periods, `from` before `to`.
    pub fn new(from: i64, to: i64, tenant_id: Option<String>) -> Result<Self, String> {
        if to <= from {
            return Err("`to` must be after `from`".into());
        }
        for (name, at) in [("from", from), ("to", to)] {
            let start = crate::rate::period::bounds(&crate::rate::period::of(at)).map(|b| b.0);
            if start != Ok(at) {
                return Err(format!(
                    "`{name}` {} is not the start of a billing period: re-rating works on whole UTC months (e.g. 2026-11-01T00:00:00Z)",
                    time::format_ms(at)
                ));
            }
        }
        Ok(Self { from, to, tenant_id })
    }

    /// Whether the two scopes share a tenant and an instant.
    pub fn overlaps(&self, other: &Scope) -> bool {
        let tenants = match (&self.tenant_id, &other.tenant_id) {
            (Some(a), Some(b)) => a == b,
            _ => true,
        };
        tenants && self.from < other.to && other.from < self.to
    }

    pub fn contains(&self, tenant: &str, at: i64) -> bool {
        self.from <= at && at < self.to && self.tenant_id.as_deref().is_none_or(|t| t == tenant)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    Queued,
    Running,
    Done,
    Failed,
    /// Done, and its diff issued as notes.
    Applied,
}

impl Status {
    /// A queued or running job holds its scope: an overlapping one is refused.
    pub fn holds_scope(self) -> bool {
        matches!(self, Status::Queued | Status::Running)
    }
}

/// How far a running job is.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Progress {
    /// `replaying`, `rating`, `comparing`.
    pub step: String,
    pub records_read: u64,
    pub records_total: u64,
    pub charges: u64,
}

/// A re-rating job's state: each record of the jobs topic is the whole of it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Job {
    pub job_id: String,
    pub scope: Scope,
    /// The window size whose final aggregates are rated (as `pulses rate --window`).
    pub window: String,
    /// Where the price book came from, and its text (the job runs on this, wherever).
    pub price_book_source: String,
    pub price_book: String,
    pub status: Status,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(default)]
    pub progress: Progress,
    /// The job's own topics: the replayed aggregates and their charges.
    pub aggregates_topic: String,
    pub charges_topic: String,
    #[serde(with = "time::rfc3339_ms")]
    pub created_at: i64,
    /// Written at least every few seconds while it runs: a running job whose
    /// heartbeat stopped is abandoned.
    #[serde(with = "time::rfc3339_ms")]
    pub updated_at: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub diff: Option<Vec<DiffLine>>,
    /// The sum of the diff's differences (in the job's price book's currency).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub difference: Option<Decimal>,
    /// Applied: the notes issued, and the (tenant, period)s not invoiced yet.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub notes: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_invoiced: Vec<String>,
}

impl Job {
    /// Whether it still holds its scope at `now_ms`: queued or running with a
    /// heartbeat younger than `abandoned_after_ms`.
    pub fn is_active(&self, now_ms: i64, abandoned_after_ms: i64) -> bool {
        self.status.holds_scope() && now_ms - self.updated_at < abandoned_after_ms
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOV: i64 = 1_793_491_200_000;
    const DEC: i64 = 1_796_083_200_000;
    const JAN: i64 = 1_798_761_600_000;

    #[test]
    fn scopes_are_whole_periods() {
        assert!(Scope::new(NOV, DEC, None).is_ok());
        assert!(Scope::new(NOV, JAN, Some("acme".into())).is_ok());
        assert!(Scope::new(DEC, NOV, None).unwrap_err().contains("after"));
        assert!(Scope::new(NOV + 1, DEC, None).unwrap_err().contains("not the start of a billing period"));
        assert!(Scope::new(NOV, DEC - 1, None).is_err());
    }

    #[test]
    fn scopes_overlap_when_they_share_a_tenant_and_time() {
        let s = |from, to, t: Option<&str>| Scope::new(from, to, t.map(str::to_owned)).unwrap();
        assert!(s(NOV, DEC, None).overlaps(&s(NOV, JAN, Some("acme"))));
        assert!(s(NOV, JAN, Some("acme")).overlaps(&s(DEC, JAN, Some("acme"))));
        assert!(!s(NOV, DEC, Some("acme")).overlaps(&s(NOV, DEC, Some("globex"))), "other tenants");
        assert!(!s(NOV, DEC, None).overlaps(&s(DEC, JAN, None)), "adjacent months");
        assert!(s(NOV, DEC, Some("acme")).contains("acme", DEC - 1) && !s(NOV, DEC, Some("acme")).contains("acme", DEC));
    }
}
