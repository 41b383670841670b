//! Pulses, expected aggregates and aggregate readers shared by the stage-2 tests.
//! Expected aggregates come from a plain fold over a test's own input, never from the
//! code under test.

use std::collections::{BTreeMap, HashSet};
use std::str::FromStr;

use rust_decimal::Decimal;

use super::*;

pub const SECOND: i64 = 1_000;

pub fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as i64
}

pub fn rfc3339(ms: i64) -> String {
    chrono::DateTime::<chrono::Utc>::from_timestamp_millis(ms).unwrap().to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

#[derive(Clone, Debug)]
pub struct P {
    pub id: String,
    pub tenant: String,
    pub sku: String,
    pub unit: String,
    pub amount: Decimal,
    pub at: i64,
}

impl P {
    pub fn json(&self) -> Vec<u8> {
        format!(
            r#"{{"pulse_id":"{}","tenant_id":"{}","product_sku":"{}","use_unit":"{}","used_amount":"{}","timestamp":"{}"}}"#,
            self.id, self.tenant, self.sku, self.unit, self.amount, rfc3339(self.at)
        )
        .into_bytes()
    }
}

pub fn produce_pulses(topic: &str, pulses: &[P]) {
    produce(topic, &pulses.iter().map(|p| (None, p.json())).collect::<Vec<_>>());
}

pub type AggKey = (String, String, String, String, i64); // tenant, sku, unit, window, start

#[derive(Debug, Clone, PartialEq)]
pub struct Expect {
    pub total: Decimal,
    pub count: u64,
    pub min: Decimal,
    pub max: Decimal,
}

/// The independent expectation: fold the counted pulses into tumbling windows.
pub fn fold(pulses: &[P], windows: &[(&str, i64)], closed_before: i64) -> BTreeMap<AggKey, Expect> {
    let mut out: BTreeMap<AggKey, Expect> = BTreeMap::new();
    for p in pulses {
        for (name, size) in windows {
            let start = p.at - p.at.rem_euclid(*size);
            if start + size > closed_before {
                continue;
            }
            let e = out
                .entry((p.tenant.clone(), p.sku.clone(), p.unit.clone(), name.to_string(), start))
                .or_insert(Expect { total: Decimal::ZERO, count: 0, min: p.amount, max: p.amount });
            e.total += p.amount;
            e.count += 1;
            e.min = e.min.min(p.amount);
            e.max = e.max.max(p.amount);
        }
    }
    out
}

/// Latest revision of every final aggregate, keyed like [`fold`]; asserts no
/// (aggregate_id, revision) pair was emitted twice.
pub fn latest_finals(topic: &str) -> (BTreeMap<AggKey, (u32, Expect)>, usize) {
    let mut seen = HashSet::new();
    let mut latest: BTreeMap<AggKey, (u32, Expect)> = BTreeMap::new();
    let records = read_all(topic);
    for r in &records {
        let v = r.json();
        let id = v["aggregate_id"].as_str().unwrap().to_owned();
        let rev = v["revision"].as_u64().unwrap() as u32;
        assert!(seen.insert((id, rev)), "(aggregate_id, revision) emitted twice: {v}");
        assert_eq!(r.key_str(), v["tenant_id"].as_str().unwrap());
        if !v["final"].as_bool().unwrap() {
            continue;
        }
        let (key, e) = aggregate_of(&v);
        if latest.get(&key).is_none_or(|(r, _)| *r < rev) {
            latest.insert(key, (rev, e));
        }
    }
    (latest, records.len())
}

/// The key and values of one aggregate record (SPEC §3 JSON).
pub fn aggregate_of(v: &serde_json::Value) -> (AggKey, Expect) {
    let start = chrono::DateTime::parse_from_rfc3339(v["window_start"].as_str().unwrap()).unwrap().timestamp_millis();
    let key = (
        v["tenant_id"].as_str().unwrap().to_owned(),
        v["product_sku"].as_str().unwrap().to_owned(),
        v["use_unit"].as_str().unwrap().to_owned(),
        v["window"].as_str().unwrap().to_owned(),
        start,
    );
    let d = |f: &str| Decimal::from_str(v[f].as_str().unwrap()).unwrap();
    let e = Expect { total: d("total_amount"), count: v["pulse_count"].as_u64().unwrap(), min: d("min_amount"), max: d("max_amount") };
    (key, e)
}

pub const WINDOWS: &[(&str, i64)] = &[("inflight", SECOND), ("postflight", 10 * SECOND), ("minute", 60 * SECOND)];

pub fn config(retention: &str, idle_timeout: &str) -> String {
    format!(
        r#"
[aggregate]
grace = "5s"
retention = "{retention}"
idle_timeout = "{idle_timeout}"
max_batch_wait = "50ms"

[[windows]]
name = "inflight"
size = "1s"

[[windows]]
name = "postflight"
size = "10s"

[[windows]]
name = "minute"
size = "1m"
"#
    )
}

pub fn wait_pipeline_done(t: &Topics) {
    wait_all_committed(&format!("{}.group", t.app), &t.source);
    wait_all_committed(&format!("{}.aggregate", t.app), &t.grouped);
}

/// Waits for every window of `counted` closed before `closed_before` to be emitted,
/// then asserts the finals equal the fold exactly.
pub fn assert_exact(t: &Topics, counted: &[P], closed_before: i64) {
    let expected = fold(counted, WINDOWS, closed_before);
    wait_for("every expected window emitted", DEADLINE, || {
        let (got, _) = latest_finals(&t.aggregated);
        expected.keys().all(|k| got.contains_key(k)).then_some(())
    });
    let (got, emitted) = latest_finals(&t.aggregated); // also: no (aggregate_id, revision) twice
    let got: BTreeMap<AggKey, Expect> = got.into_iter().map(|(k, (_, e))| (k, e)).collect();
    for (k, e) in &expected {
        assert_eq!(got.get(k), Some(e), "aggregate {k:?}");
    }
    assert_eq!(got.len(), expected.len(), "no unexpected final aggregates ({emitted} records)");
}

/// Start of the UTC calendar day / month holding `ms`, computed here independently.
pub fn day_start(ms: i64) -> i64 {
    use chrono::{TimeZone, Utc};
    let d = Utc.timestamp_millis_opt(ms).unwrap().date_naive();
    d.and_hms_opt(0, 0, 0).unwrap().and_utc().timestamp_millis()
}

pub fn month_start(ms: i64) -> i64 {
    use chrono::{Datelike, TimeZone, Utc};
    let d = Utc.timestamp_millis_opt(ms).unwrap().date_naive().with_day(1).unwrap();
    d.and_hms_opt(0, 0, 0).unwrap().and_utc().timestamp_millis()
}

/// `per_tenant` rounds of one compute.vcpu pulse per tenant, `step_ms` apart (tenant t
/// `t` ms later), amounts of three decimals cycling through 89 values.
pub fn vcpu_pulses(prefix: &str, tenants: usize, per_tenant: i64, base: i64, step_ms: i64) -> Vec<P> {
    (0..per_tenant)
        .flat_map(|i| {
            (0..tenants).map(move |t| P {
                id: format!("{prefix}-{t}-{i}"),
                tenant: format!("tenant-{t}"),
                sku: "compute.vcpu".into(),
                unit: "vcpu-s".into(),
                amount: Decimal::new(i % 89 + t as i64 + 1, 3),
                at: base + i * step_ms + t as i64,
            })
        })
        .collect()
}
