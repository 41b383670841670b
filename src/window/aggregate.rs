//! The exact accumulator of one window and the aggregate record it becomes (SPEC §3).

use std::cmp::Ordering;
use std::hash::{Hash, Hasher};

use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

use crate::meter::key::MeterOf;
use crate::pulse::decimal::exact_add;
use crate::pulse::{ids, time};

/// What windows are grouped by.
///
/// Its hash is computed once, when the key is made (the operator's key table and
/// every store map use it instead of hashing the three strings again). Keys order by
/// that hash first (then by content, so the order is total): only ties
/// between windows with the same bounds reach it, and it spares them string compares.
/// The hash has a fixed seed, so the order is the same in every process.
///
/// The three parts live in one allocation: finding a pulse's key reads one string.
#[derive(Debug, Clone)]
pub struct GroupKey {
    /// tenant_id, product_sku and use_unit, joined.
    text: Box<str>,
    /// Where product_sku and use_unit start in `text`.
    sku_at: usize,
    unit_at: usize,
    hash: u64,
}

impl GroupKey {
    pub fn new(tenant_id: impl AsRef<str>, product_sku: impl AsRef<str>, use_unit: impl AsRef<str>) -> Self {
        GroupKeyRef::new(tenant_id.as_ref(), product_sku.as_ref(), use_unit.as_ref()).to_key()
    }

    pub fn tenant_id(&self) -> &str {
        self.content().0
    }

    pub fn product_sku(&self) -> &str {
        self.content().1
    }

    pub fn use_unit(&self) -> &str {
        self.content().2
    }

    /// The hash computed when the key was made (equal keys, owned or borrowed, have
    /// equal hashes).
    pub fn hash_code(&self) -> u64 {
        self.hash
    }

    /// This key, borrowed.
    pub fn borrowed(&self) -> GroupKeyRef<'_> {
        let (tenant_id, product_sku, use_unit) = self.content();
        GroupKeyRef { tenant_id, product_sku, use_unit, hash: self.hash }
    }

    fn content(&self) -> (&str, &str, &str) {
        let (tenant, rest) = self.text.split_at(self.sku_at);
        let (sku, unit) = rest.split_at(self.unit_at - self.sku_at);
        (tenant, sku, unit)
    }

    /// Whether this is the key of `content` hashed to `hash` (the hash first: it
    /// spares string compares between different keys).
    fn is(&self, hash: u64, content: (&str, &str, &str)) -> bool {
        self.hash == hash && self.content() == content
    }
}

/// The hash of a group key: foldhash with a fixed seed, so it is the same in every
/// process (it orders keys) and costs a fraction of SipHash (which was 5% of counting).
fn group_hash(tenant_id: &str, product_sku: &str, use_unit: &str) -> u64 {
    use std::hash::BuildHasher;
    const SEED: foldhash::fast::FixedState = foldhash::fast::FixedState::with_seed(0x7075_6c73_6573_6b79);
    SEED.hash_one((tenant_id, product_sku, use_unit))
}

/// A [`GroupKey`] borrowed from a pulse: finds the pulse's key without allocating one,
/// which only a group seen for the first time needs.
#[derive(Debug, Clone, Copy)]
pub struct GroupKeyRef<'a> {
    tenant_id: &'a str,
    product_sku: &'a str,
    use_unit: &'a str,
    hash: u64,
}

impl<'a> GroupKeyRef<'a> {
    pub fn new(tenant_id: &'a str, product_sku: &'a str, use_unit: &'a str) -> Self {
        Self { tenant_id, product_sku, use_unit, hash: group_hash(tenant_id, product_sku, use_unit) }
    }

    /// The hash [`GroupKey::hash_code`] of the owned key gives.
    pub fn hash_code(&self) -> u64 {
        self.hash
    }

    /// Whether `key` is this key.
    pub fn matches(&self, key: &GroupKey) -> bool {
        key.is(self.hash, (self.tenant_id, self.product_sku, self.use_unit))
    }

    pub fn to_key(self) -> GroupKey {
        let mut text = String::with_capacity(self.tenant_id.len() + self.product_sku.len() + self.use_unit.len());
        text.push_str(self.tenant_id);
        text.push_str(self.product_sku);
        text.push_str(self.use_unit);
        let sku_at = self.tenant_id.len();
        GroupKey { text: text.into_boxed_str(), sku_at, unit_at: sku_at + self.product_sku.len(), hash: self.hash }
    }
}

impl PartialEq for GroupKey {
    fn eq(&self, other: &Self) -> bool {
        self.is(other.hash, other.content())
    }
}

impl Eq for GroupKey {}

impl Hash for GroupKey {
    fn hash<H: Hasher>(&self, state: &mut H) {
        state.write_u64(self.hash);
    }
}

impl Ord for GroupKey {
    fn cmp(&self, other: &Self) -> Ordering {
        self.hash.cmp(&other.hash).then_with(|| self.content().cmp(&other.content()))
    }
}

impl PartialOrd for GroupKey {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

/// Sum, count, min, max and event-time span of the pulses in one window.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Accumulator {
    pub total: Decimal,
    pub count: u64,
    pub min: Decimal,
    pub max: Decimal,
    pub first_event_time: i64,
    pub last_event_time: i64,
    /// A `latest` meter's window only ([`crate::meter`]): the value of the event with
    /// the greatest time, ties broken by the greater event id. Boxed: pulses' windows
    /// never have one and stay as small as before.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latest: Option<Box<Latest>>,
}

/// The latest value a window saw, and which event it came from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Latest {
    #[serde(with = "time::rfc3339_ms")]
    pub event_time: i64,
    pub id: String,
    #[serde(with = "rust_decimal::serde::str")]
    pub value: Decimal,
}

impl Latest {
    /// Whether an event at `event_ms` with `id` is later than this one (the order is
    /// total and the same in every process, so replicas and replays agree).
    pub fn is_before(&self, event_ms: i64, id: &str) -> bool {
        (self.event_time, self.id.as_str()) < (event_ms, id)
    }
}

/// One pulse as a window takes it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sample<'a> {
    pub amount: Decimal,
    pub event_ms: i64,
    /// Set for a `latest` meter's event: its id ([`crate::pulse::GroupedPulse::latest_id`]).
    pub latest_id: Option<&'a str>,
}

impl<'a> Sample<'a> {
    pub fn of(pulse: &'a crate::pulse::GroupedPulse) -> Self {
        Self { amount: pulse.used_amount, event_ms: pulse.event_time, latest_id: pulse.latest_id.as_deref() }
    }
}

/// Adding would lose digits: the total no longer fits rust_decimal's 96-bit mantissa
/// at the scale the amounts need. Never rounded silently.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("adding {amount} to {total} does not fit an exact decimal")]
pub struct InexactSum {
    pub total: Decimal,
    pub amount: Decimal,
}

impl Accumulator {
    pub fn first(amount: Decimal, event_ms: i64) -> Self {
        Self { total: amount, count: 1, min: amount, max: amount, first_event_time: event_ms, last_event_time: event_ms, latest: None }
    }

    /// The accumulator of a window whose first pulse is `s`.
    pub fn of_sample(s: Sample<'_>) -> Self {
        let mut acc = Self::first(s.amount, s.event_ms);
        if let Some(id) = s.latest_id {
            acc.latest = Some(Box::new(Latest { event_time: s.event_ms, id: id.to_owned(), value: s.amount }));
        }
        acc
    }

    /// Adds `s` exactly, or refuses (the accumulator is then unchanged).
    pub fn add_sample(&mut self, s: Sample<'_>) -> Result<(), InexactSum> {
        self.add(s.amount, s.event_ms)?;
        if let Some(id) = s.latest_id {
            match &mut self.latest {
                Some(l) if !l.is_before(s.event_ms, id) => {}
                slot => *slot = Some(Box::new(Latest { event_time: s.event_ms, id: id.to_owned(), value: s.amount })),
            }
        }
        Ok(())
    }

    /// Sums exactly, or refuses (the accumulator is then unchanged).
    pub fn add(&mut self, amount: Decimal, event_ms: i64) -> Result<(), InexactSum> {
        let total = exact_add(self.total, amount).ok_or(InexactSum { total: self.total, amount })?;
        self.total = total;
        self.count += 1;
        // As `Ord::min` / `Ord::max` choose between equal values of different scales
        // (1.0 and 1.00): the older minimum, the newer maximum.
        if compare(amount, self.min).is_lt() {
            self.min = amount;
        }
        if compare(amount, self.max).is_ge() {
            self.max = amount;
        }
        self.first_event_time = self.first_event_time.min(event_ms);
        self.last_event_time = self.last_event_time.max(event_ms);
        Ok(())
    }
}

/// Orders two decimals, by their mantissas when they share a scale.
fn compare(a: Decimal, b: Decimal) -> Ordering {
    if a.scale() == b.scale() {
        a.mantissa().cmp(&b.mantissa())
    } else {
        a.cmp(&b)
    }
}

/// One emitted window aggregate: the value of `tenant.aggregated.pulses.amount`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WindowAggregate {
    pub aggregate_id: String,
    pub revision: u32,
    pub tenant_id: String,
    pub product_sku: String,
    pub use_unit: String,
    pub window: String,
    #[serde(with = "time::rfc3339_ms")]
    pub window_start: i64,
    #[serde(with = "time::rfc3339_ms")]
    pub window_end: i64,
    #[serde(with = "rust_decimal::serde::str")]
    pub total_amount: Decimal,
    pub pulse_count: u64,
    #[serde(with = "rust_decimal::serde::str")]
    pub min_amount: Decimal,
    #[serde(with = "rust_decimal::serde::str")]
    pub max_amount: Decimal,
    #[serde(with = "time::rfc3339_ms")]
    pub first_event_time: i64,
    #[serde(with = "time::rfc3339_ms")]
    pub last_event_time: i64,
    #[serde(rename = "final")]
    pub is_final: bool,
    #[serde(with = "time::rfc3339_ms")]
    pub emitted_at: i64,
    /// A meter's window (SPEC §10): the meter's slug, aggregation and group-by values
    /// (and, for `unique_count`, the value counted), read from its sku and unit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub meter: Option<MeterOf>,
    /// A `latest` meter's window: the latest value and its event.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latest: Option<Latest>,
}

impl WindowAggregate {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        key: &GroupKey,
        window: &str,
        start: i64,
        end: i64,
        acc: &Accumulator,
        revision: u32,
        is_final: bool,
        emitted_at: i64,
    ) -> Self {
        Self {
            aggregate_id: ids::aggregate_id(key.tenant_id(), key.product_sku(), key.use_unit(), window, start),
            revision,
            tenant_id: key.tenant_id().to_owned(),
            product_sku: key.product_sku().to_owned(),
            use_unit: key.use_unit().to_owned(),
            window: window.to_owned(),
            window_start: start,
            window_end: end,
            total_amount: acc.total,
            pulse_count: acc.count,
            min_amount: acc.min,
            max_amount: acc.max,
            first_event_time: acc.first_event_time,
            last_event_time: acc.last_event_time,
            is_final,
            emitted_at,
            meter: MeterOf::of(key.product_sku(), key.use_unit()),
            latest: acc.latest.as_deref().cloned(),
        }
    }

    pub fn to_json(&self) -> Result<Vec<u8>, serde_json::Error> {
        serde_json::to_vec(self)
    }

    pub fn from_json(bytes: &[u8]) -> Result<Self, serde_json::Error> {
        serde_json::from_slice(bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::str::FromStr;

    fn d(s: &str) -> Decimal {
        Decimal::from_str(s).unwrap()
    }

    #[test]
    fn point_one_ten_times_is_exactly_one() {
        let mut acc = Accumulator::first(d("0.1"), 0);
        for i in 1..10 {
            acc.add(d("0.1"), i).unwrap();
        }
        assert_eq!(acc.total, d("1.0"));
        assert_eq!(acc.total.to_string(), "1.0");
        assert_eq!(acc.count, 10);
    }

    #[test]
    fn sums_and_comparisons_agree_with_rust_decimal() {
        let amounts = ["0", "1", "0.1", "0.10", "12.50", "12.5", "79228162514264337593543950334", "7922816251426433759354395033.5", "0.0000000000000000000000000001"];
        for a in amounts.map(d) {
            for b in amounts.map(d) {
                let general = a.checked_add(b).filter(|s| s.scale() >= a.scale().max(b.scale()));
                let fast = exact_add(a, b);
                assert_eq!(fast.map(|s| s.to_string()), general.map(|s| s.to_string()), "{a} + {b}");
                assert_eq!(compare(a, b), a.cmp(&b), "{a} <=> {b}");
            }
        }
    }

    #[test]
    fn equal_extremes_keep_the_older_minimum_and_the_newer_maximum() {
        let mut acc = Accumulator::first(d("1.0"), 0);
        acc.add(d("1.00"), 1).unwrap();
        assert_eq!((acc.min.to_string().as_str(), acc.max.to_string().as_str()), ("1.0", "1.00"));
    }

    #[test]
    fn min_max_and_span() {
        let mut acc = Accumulator::first(d("5"), 100);
        acc.add(d("0.5"), 50).unwrap();
        acc.add(d("9.0"), 200).unwrap();
        assert_eq!((acc.min, acc.max, acc.first_event_time, acc.last_event_time), (d("0.5"), d("9.0"), 50, 200));
    }

    #[test]
    fn latest_keeps_the_greatest_time_then_the_greatest_id() {
        let s = |v: &str, ms: i64, id: &'static str| Sample { amount: d(v), event_ms: ms, latest_id: Some(id) };
        let mut acc = Accumulator::of_sample(s("1", 10, "b"));
        for sample in [s("2", 5, "z"), s("3", 10, "a"), s("4", 10, "c"), s("5", 9, "zz")] {
            acc.add_sample(sample).unwrap();
        }
        let l = acc.latest.as_deref().unwrap();
        assert_eq!((l.value, l.event_time, l.id.as_str()), (d("4"), 10, "c"));
        assert_eq!(acc.count, 5);
        let plain = Accumulator::of_sample(Sample { amount: d("1"), event_ms: 1, latest_id: None });
        assert!(plain.latest.is_none());
        assert!(!serde_json::to_string(&plain).unwrap().contains("latest"));
    }

    #[test]
    fn inexact_sums_are_refused_not_rounded() {
        let mut acc = Accumulator::first(d("1000000000000000000"), 0);
        let before = acc.clone();
        let err = acc.add(d("0.0000000000000000000000000001"), 1).unwrap_err();
        assert_eq!(err.total, before.total);
        assert_eq!(acc, before);
        assert!(exact_add(Decimal::MAX, Decimal::ONE).is_none());
    }

    #[test]
    fn a_borrowed_key_matches_its_owned_key() {
        let owned = GroupKey::new("acme", "storage.standard", "GB");
        let borrowed = GroupKeyRef::new("acme", "storage.standard", "GB");
        assert!(borrowed.matches(&owned));
        assert_eq!(borrowed.hash_code(), owned.hash_code());
        assert_eq!(borrowed.to_key(), owned);
        assert!(owned.borrowed().matches(&owned));
        assert_eq!((owned.tenant_id(), owned.product_sku(), owned.use_unit()), ("acme", "storage.standard", "GB"));
        assert!(!GroupKeyRef::new("acme", "storage.standardGB", "").matches(&owned));
        assert!(!GroupKeyRef::new("acme", "storage.standard", "TB").matches(&owned));
    }

    #[test]
    fn aggregate_json_matches_spec_shape() {
        let key = GroupKey::new("acme", "storage.standard", "GB");
        let acc = Accumulator::first(d("12.5"), 1_795_341_600_123);
        let agg = WindowAggregate::new(&key, "minute", 1_795_341_600_000, 1_795_341_660_000, &acc, 0, true, 1_795_341_666_000);
        let v: serde_json::Value = serde_json::from_slice(&agg.to_json().unwrap()).unwrap();
        assert_eq!(v["window_start"], "2026-11-22T10:00:00.000Z");
        assert_eq!(v["window_end"], "2026-11-22T10:01:00.000Z");
        assert_eq!(v["total_amount"], "12.5");
        assert_eq!(v["final"], true);
        assert_eq!(v["pulse_count"], 1);
        assert_eq!(WindowAggregate::from_json(&agg.to_json().unwrap()).unwrap(), agg);
    }
}
