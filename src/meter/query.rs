//! Answering a meter query (OpenMeter's `GET /api/v1/meters/{slug}/query`) from stored
//! windows, exactly or not at all.
//!
//! Every pulse and event is counted in every configured window size, so any of them
//! can answer a query whose windows are unions of its windows. [`plan`] picks the
//! coarsest stored size that does: `from`, `to` and every boundary of the asked
//! windows (MINUTE, HOUR, DAY in the asked time zone) must fall on its boundaries.
//! None does (DAY in a +05:30 zone when only hourly windows are kept): an error that
//! says why, never an approximation. [`fold`] then folds the stored windows into rows
//! per aggregation: sums and counts add, min and max compare, `avg` divides the sums
//! at the end, `unique_count` counts the distinct values found (each value has its own
//! windows, [`super::key`]), `latest` takes the greatest (time, id).

use std::collections::{BTreeMap, BTreeSet};

use chrono::{DateTime, NaiveDateTime, TimeZone, Timelike, Utc};
use chrono_tz::Tz;
use rust_decimal::{Decimal, RoundingStrategy};

use super::Aggregation;
use crate::pulse::decimal::exact_add;

/// Decimal places of an `avg` (half to even): sum / count is rarely a finite decimal.
pub const AVG_SCALE: u32 = 10;
/// Most rows one query may ask for (windows × subjects × groups are bounded by data;
/// this bounds the windows walked to check the boundaries).
pub const MAX_WINDOWS: i64 = 100_000;

/// OpenMeter's window sizes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WindowSize {
    Minute,
    Hour,
    Day,
}

impl std::str::FromStr for WindowSize {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "MINUTE" => Ok(Self::Minute),
            "HOUR" => Ok(Self::Hour),
            "DAY" => Ok(Self::Day),
            other => Err(format!("windowSize {other:?} is not one of MINUTE, HOUR, DAY")),
        }
    }
}

impl WindowSize {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Minute => "MINUTE",
            Self::Hour => "HOUR",
            Self::Day => "DAY",
        }
    }

    /// The start of the window of this size, in `tz`, that holds `ms`.
    fn floor(self, tz: Tz, ms: i64) -> Option<i64> {
        let local = tz.timestamp_millis_opt(ms).single()?.naive_local();
        let start = match self {
            Self::Minute => local.with_second(0)?.with_nanosecond(0)?,
            Self::Hour => local.with_minute(0)?.with_second(0)?.with_nanosecond(0)?,
            Self::Day => local.date().and_hms_opt(0, 0, 0)?,
        };
        let at = to_instant(tz, start)?;
        // A local start that does not exist (a DST gap) resolves after `ms` at worst.
        Some(at.min(ms))
    }

    /// The start of the window after the one starting at `start`.
    fn next(self, tz: Tz, start: i64) -> Option<i64> {
        let local = tz.timestamp_millis_opt(start).single()?.naive_local();
        let next = match self {
            Self::Minute => local + chrono::Duration::minutes(1),
            Self::Hour => local + chrono::Duration::hours(1),
            Self::Day => {
                let d = local.date().succ_opt()?;
                d.and_hms_opt(0, 0, 0)?
            }
        };
        let at = to_instant(tz, next)?;
        (at > start).then_some(at).or_else(|| Some(start + 60_000))
    }
}

/// The instant of a local time: the earlier of two (DST fold), or the first instant
/// after a gap.
fn to_instant(tz: Tz, local: NaiveDateTime) -> Option<i64> {
    match tz.from_local_datetime(&local) {
        chrono::LocalResult::Single(t) => Some(t.timestamp_millis()),
        chrono::LocalResult::Ambiguous(a, _) => Some(a.timestamp_millis()),
        chrono::LocalResult::None => {
            // In a gap: step forward a minute at a time (gaps are at most a few hours).
            let mut l = local;
            for _ in 0..(24 * 60) {
                l += chrono::Duration::minutes(1);
                if let Some(t) = tz.from_local_datetime(&l).earliest() {
                    return Some(t.timestamp_millis());
                }
            }
            None
        }
    }
}

/// What a query asks (its parameters, parsed).
#[derive(Debug, Clone, PartialEq)]
pub struct Query {
    pub from: Option<i64>,
    pub to: Option<i64>,
    pub window_size: Option<WindowSize>,
    pub time_zone: Tz,
    /// Only these subjects (all when empty); asking for subjects groups by subject.
    pub subjects: Vec<String>,
    /// Group-by names to split rows by (`subject` among them groups by subject).
    pub group_by: Vec<String>,
    pub filter_group_by: BTreeMap<String, String>,
}

impl Default for Query {
    fn default() -> Self {
        Self {
            from: None,
            to: None,
            window_size: None,
            time_zone: Tz::UTC,
            subjects: Vec::new(),
            group_by: Vec::new(),
            filter_group_by: BTreeMap::new(),
        }
    }
}

impl Query {
    fn by_subject(&self) -> bool {
        !self.subjects.is_empty() || self.group_by.iter().any(|g| g == "subject")
    }
}

/// A stored window size: its configured name and length.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredSize {
    pub name: String,
    pub size_ms: i64,
}

/// Why a query cannot be answered exactly.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Inexact(pub String);

/// The stored sizes that could answer `q`, coarsest first: those on whose boundaries
/// `from` and `to` fall. Boundaries of the asked windows are checked by [`check`] once
/// the range is known.
pub fn candidates(q: &Query, stored: &[StoredSize]) -> Result<Vec<StoredSize>, Inexact> {
    if let (Some(f), Some(t)) = (q.from, q.to) {
        if f >= t {
            return Err(Inexact("from must be before to".into()));
        }
    }
    let mut sizes: Vec<StoredSize> = stored.iter().filter(|s| s.size_ms > 0).cloned().collect();
    sizes.sort_by_key(|s| std::cmp::Reverse(s.size_ms));
    let on = |s: &StoredSize, t: Option<i64>| t.is_none_or(|t| t.rem_euclid(s.size_ms) == 0);
    let fit: Vec<StoredSize> = sizes.iter().filter(|s| on(s, q.from) && on(s, q.to)).cloned().collect();
    if fit.is_empty() {
        return Err(Inexact(format!(
            "from and to must fall on the boundaries of a stored window ({}): the stored windows cannot answer {}..{} exactly",
            describe(&sizes),
            q.from.map_or("-".into(), crate::pulse::time::format_ms),
            q.to.map_or("-".into(), crate::pulse::time::format_ms),
        )));
    }
    Ok(fit)
}

fn describe(sizes: &[StoredSize]) -> String {
    sizes.iter().map(|s| format!("{} = {} s", s.name, s.size_ms as f64 / 1000.0)).collect::<Vec<_>>().join(", ")
}

/// Checks that every boundary of the asked windows within `[from, to)` is a boundary
/// of `size`, so each asked window is a union of stored ones.
pub fn check(q: &Query, size: &StoredSize, from: i64, to: i64) -> Result<(), Inexact> {
    let Some(ws) = q.window_size else { return Ok(()) };
    let tz = q.time_zone;
    let mut b = ws.floor(tz, from).ok_or_else(|| Inexact(format!("{from} is out of the time zone's range")))?;
    let mut n = 0;
    while b < to {
        if b > from && b.rem_euclid(size.size_ms) != 0 {
            return Err(Inexact(format!(
                "windowSize {} in {} starts a window at {}, inside the stored {} window there; the stored windows cannot answer it exactly",
                ws.as_str(), tz.name(), crate::pulse::time::format_ms(b), size.name
            )));
        }
        n += 1;
        if n > MAX_WINDOWS {
            return Err(Inexact(format!("more than {MAX_WINDOWS} {} windows asked: narrow from..to", ws.as_str())));
        }
        b = ws.next(tz, b).ok_or_else(|| Inexact("a window boundary out of the time zone's range".into()))?;
    }
    Ok(())
}

/// One stored window of a meter, as the query reads it.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredWindow {
    pub subject: String,
    pub start: i64,
    pub end: i64,
    pub group_by: BTreeMap<String, String>,
    /// `unique_count`: the value this window counted.
    pub value: Option<String>,
    pub total: Decimal,
    pub count: u64,
    pub min: Decimal,
    pub max: Decimal,
    /// `latest`: (event time, event id, value).
    pub latest: Option<(i64, String, Decimal)>,
}

/// One row of the answer.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    pub window_start: i64,
    pub window_end: i64,
    pub subject: Option<String>,
    pub group_by: BTreeMap<String, Option<String>>,
    pub value: Decimal,
}

/// A row's window bounds, subject (when grouped by subject) and group-by values.
type RowKey = (i64, i64, Option<String>, Vec<Option<String>>);

#[derive(Default)]
struct Fold {
    total: Decimal,
    count: u64,
    min: Option<Decimal>,
    max: Option<Decimal>,
    distinct: BTreeSet<String>,
    latest: Option<(i64, String, Decimal)>,
}

/// Folds `windows` (of one stored size that [`check`] accepted, starts in the asked
/// range) into the answer's rows, ordered by window, subject and group.
pub fn fold(q: &Query, aggregation: Aggregation, windows: &[StoredWindow], from: i64, to: i64) -> Result<Vec<Row>, Inexact> {
    let mut rows: BTreeMap<RowKey, Fold> = BTreeMap::new();
    let names: Vec<&String> = q.group_by.iter().filter(|g| *g != "subject").collect();
    for w in windows {
        if w.count == 0 || w.start < from || w.start >= to {
            continue;
        }
        if !q.subjects.is_empty() && !q.subjects.contains(&w.subject) {
            continue;
        }
        if q.filter_group_by.iter().any(|(k, v)| w.group_by.get(k) != Some(v)) {
            continue;
        }
        let (start, end) = match q.window_size {
            None => (from, to),
            Some(ws) => {
                let s = ws.floor(q.time_zone, w.start).ok_or_else(|| Inexact("a window out of the time zone's range".into()))?;
                let e = ws.next(q.time_zone, s).ok_or_else(|| Inexact("a window out of the time zone's range".into()))?;
                (s, e)
            }
        };
        let subject = q.by_subject().then(|| w.subject.clone());
        let groups = names.iter().map(|n| w.group_by.get(*n).cloned()).collect();
        let f = rows.entry((start, end, subject, groups)).or_default();
        f.total = exact_add(f.total, w.total)
            .ok_or_else(|| Inexact(format!("the sum of {} and {} does not fit an exact decimal", f.total, w.total)))?;
        f.count += w.count;
        f.min = Some(f.min.map_or(w.min, |m| m.min(w.min)));
        f.max = Some(f.max.map_or(w.max, |m| m.max(w.max)));
        if let Some(v) = &w.value {
            f.distinct.insert(v.clone());
        }
        if let Some(l) = &w.latest {
            if f.latest.as_ref().is_none_or(|held| (held.0, &held.1) < (l.0, &l.1)) {
                f.latest = Some(l.clone());
            }
        }
    }
    let mut out = Vec::with_capacity(rows.len());
    for ((start, end, subject, groups), f) in rows {
        let value = match aggregation {
            Aggregation::Sum => f.total,
            Aggregation::Count => Decimal::from(f.count),
            Aggregation::Avg => f
                .total
                .checked_div(Decimal::from(f.count))
                .ok_or_else(|| Inexact("avg: the division overflowed".into()))?
                .round_dp_with_strategy(AVG_SCALE, RoundingStrategy::MidpointNearestEven)
                .normalize(),
            Aggregation::Min => f.min.unwrap_or_default(),
            Aggregation::Max => f.max.unwrap_or_default(),
            Aggregation::UniqueCount => Decimal::from(f.distinct.len() as u64),
            Aggregation::Latest => match f.latest {
                Some((_, _, v)) => v,
                None => continue,
            },
        };
        let group_by = names.iter().map(|n| (*n).clone()).zip(groups).collect();
        out.push(Row { window_start: start, window_end: end, subject, group_by, value });
    }
    Ok(out)
}

/// `ms` as OpenMeter writes times: RFC 3339, UTC, seconds.
pub fn rfc3339(ms: i64) -> String {
    DateTime::<Utc>::from_timestamp_millis(ms).map_or_else(|| ms.to_string(), |t| {
        if t.timestamp_subsec_millis() == 0 {
            t.format("%Y-%m-%dT%H:%M:%SZ").to_string()
        } else {
            t.format("%Y-%m-%dT%H:%M:%S%.3fZ").to_string()
        }
    })
}

/// Parses an IANA time zone name (`windowTimeZone`).
pub fn time_zone(name: &str) -> Result<Tz, String> {
    name.parse::<Tz>().map_err(|_| format!("windowTimeZone {name:?} is not an IANA time zone"))
}

#[cfg(test)]
mod tests;
