//! Metering one CloudEvent: one grouped pulse per meter that reads its type, keyed so
//! the window operator counts it as the meter says ([`super::key`]).
//!
//! An event is metered by all its meters or by none: a value one of them cannot read
//! sends the whole event to the DLQ (reason `invalid_meter_value`, the detail names the
//! meter), so fixing the meter and replaying counts it everywhere once.

use rust_decimal::Decimal;
use serde_json::value::RawValue;

use super::event::CloudEvent;
use super::key::MeterKey;
use super::path::Found;
use super::{Aggregation, Meter, Meters};
use crate::pulse::validate::{exact_decimal, json_decimal, RecordContext, RejectReason, Rejection};
use crate::pulse::{ids, GroupedPulse, SourceRef};

/// The grouped pulses a CloudEvent record's JSON becomes (stage 1 and replay alike).
pub fn meter_record(meters: &Meters, json: &[u8], ctx: &RecordContext<'_>) -> Result<Vec<GroupedPulse>, Rejection> {
    meter_event(meters, &CloudEvent::decode(json)?, ctx)
}

/// The grouped pulses `event` becomes: none when no meter reads its type (it stays in
/// the source topic; a replay with such a meter counts it).
pub fn meter_event(meters: &Meters, event: &CloudEvent<'_>, ctx: &RecordContext<'_>) -> Result<Vec<GroupedPulse>, Rejection> {
    let mut out = Vec::new();
    let mut object_id = None;
    for meter in meters.of_type(&event.kind) {
        let event_time = match event.time_ms.or(ctx.record_time_ms) {
            Some(t) => t,
            None => return Err(Rejection::new(RejectReason::BadTimestamp, "no time in the event and none on the record")),
        };
        let reading = read(meter, event)?;
        let object_id = object_id.get_or_insert_with(|| ids::object_id(ctx.topic, ctx.partition, ctx.offset));
        out.push(GroupedPulse {
            object_id: ids::stable_hash(&[object_id, &meter.slug]),
            pulse_id: pulse_id(&meter.slug, event),
            tenant_id: event.subject.clone(),
            product_sku: meter.slug.clone(),
            use_unit: reading.key.to_unit(),
            used_amount: reading.amount,
            event_time,
            attributes: None,
            source: SourceRef { topic: ctx.topic.to_owned(), partition: ctx.partition, offset: ctx.offset },
            latest_id: (meter.aggregation == Aggregation::Latest).then(|| event.id.to_string()),
        });
    }
    Ok(out)
}

/// The de-duplication id of `event` in `meter`'s windows: its `source` and `id`
/// (CloudEvents' identity), per meter, so two meters of one type both count it.
pub fn pulse_id(slug: &str, event: &CloudEvent<'_>) -> String {
    ids::stable_hash(&["cloudevent", slug, &event.source, &event.id])
}

/// What one meter reads from one event.
#[derive(Debug, Clone, PartialEq)]
pub struct Reading {
    pub key: MeterKey,
    /// What the event adds to the window: its value, or 1 for `count` and `unique_count`.
    pub amount: Decimal,
}

/// Reads `meter`'s value and group-by values from `event`.
pub fn read(meter: &Meter, event: &CloudEvent<'_>) -> Result<Reading, Rejection> {
    let bad = |why: String| Rejection::new(RejectReason::InvalidMeterValue, format!("meter {}: {why}", meter.slug));
    let find = |path: &super::JsonPath| match event.data {
        Some(data) => path.find(data),
        None => Found::Missing,
    };
    let mut group_by = std::collections::BTreeMap::new();
    for (name, path) in &meter.group_by {
        if let Found::Value(v) = find(path) {
            group_by.insert(name.clone(), group_value(v));
        }
    }
    let value = match &meter.value_property {
        Some(path) if meter.aggregation.needs_value() => match find(path) {
            Found::Value(v) => Some(v),
            Found::Missing => return Err(bad(format!("{path} is missing or null in data"))),
        },
        _ => None,
    };
    let (amount, distinct) = match (meter.aggregation, value) {
        (Aggregation::Count, _) | (_, None) => (Decimal::ONE, None),
        (Aggregation::UniqueCount, Some(v)) => (Decimal::ONE, Some(distinct_value(v).map_err(|e| bad(format!("{}: {e}", meter_path(meter))))?)),
        (_, Some(v)) => (number(v).map_err(|e| bad(format!("{}: {e}", meter_path(meter))))?, None),
    };
    Ok(Reading { key: MeterKey { aggregation: meter.aggregation, group_by, value: distinct }, amount })
}

fn meter_path(meter: &Meter) -> String {
    meter.value_property.as_ref().map(|p| p.to_string()).unwrap_or_default()
}

/// A value as an exact decimal, read as pulses' amounts are ([`json_decimal`]).
pub fn number(v: &RawValue) -> Result<Decimal, String> {
    json_decimal(v).map_err(|why| format!("{}: {why}", v.get().chars().take(40).collect::<String>()))
}

/// A group-by value as text: a string's content, anything else its JSON text.
fn group_value(v: &RawValue) -> String {
    let text = v.get();
    if text.starts_with('"') {
        serde_json::from_str::<String>(text).unwrap_or_else(|_| text.to_owned())
    } else {
        text.to_owned()
    }
}

/// What `unique_count` counts: a string's content, or a number's exact value
/// (normalised, so `5`, `5.0` and `"5"` are one value), or `true` / `false`.
fn distinct_value(v: &RawValue) -> Result<String, String> {
    let text = v.get();
    if text.starts_with('"') {
        let s: String = serde_json::from_str(text).map_err(|e| e.to_string())?;
        return Ok(match exact_decimal(s.trim()) {
            Ok(d) if !s.trim().is_empty() => d.normalize().to_string(),
            _ => s,
        });
    }
    if text == "true" || text == "false" {
        return Ok(text.to_owned());
    }
    number(v).map(|d| d.normalize().to_string()).map_err(|_| format!("{} is not a string, number or boolean", text.chars().take(40).collect::<String>()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meters(toml_text: &str) -> Meters {
        #[derive(serde::Deserialize)]
        struct F {
            meters: Meters,
        }
        toml::from_str::<F>(toml_text).unwrap().meters
    }

    const METERS: &str = r#"
[[meters]]
slug = "tokens"
event_type = "prompt"
aggregation = "sum"
value_property = "$.tokens"
group_by = { model = "$.model" }

[[meters]]
slug = "users"
event_type = "prompt"
aggregation = "unique_count"
value_property = "$.user"

[[meters]]
slug = "last_price"
event_type = "prompt"
aggregation = "latest"
value_property = "$.price"

[[meters]]
slug = "logins"
event_type = "login"
aggregation = "count"
"#;

    const CTX: RecordContext<'static> = RecordContext { topic: "source.pulses", partition: 2, offset: 40, record_time_ms: Some(5) };

    fn event(data: &str) -> String {
        format!(r#"{{"specversion":"1.0","id":"e1","source":"s","type":"prompt","subject":"acme","time":"2026-12-07T00:00:00Z","data":{data}}}"#)
    }

    #[test]
    fn one_pulse_per_meter_of_the_type() {
        let m = meters(METERS);
        let text = event(r#"{"tokens":"6.51E-7","model":"gpt-4","user":5.0,"price":0.10}"#);
        let e = CloudEvent::decode(text.as_bytes()).unwrap();
        let out = meter_event(&m, &e, &CTX).unwrap();
        assert_eq!(out.len(), 3);
        assert_eq!(out[0].used_amount.to_string(), "0.000000651");
        assert_eq!(out[0].use_unit, r#"{"aggregation":"sum","group_by":{"model":"gpt-4"}}"#);
        assert_eq!((out[1].used_amount, out[1].use_unit.as_str()), (Decimal::ONE, r#"{"aggregation":"unique_count","group_by":{},"value":"5"}"#));
        assert_eq!((out[2].used_amount.to_string().as_str(), out[2].latest_id.as_deref()), ("0.10", Some("e1")));
        assert!(out.iter().all(|p| p.tenant_id == "acme" && p.event_time == 1_796_601_600_000));
        let ids: std::collections::HashSet<_> = out.iter().map(|p| p.pulse_id.clone()).collect();
        assert_eq!(ids.len(), 3, "each meter de-duplicates the event on its own");
        assert!(meter_event(&m, &CloudEvent::decode(event("{}").replace("prompt", "other").as_bytes()).unwrap(), &CTX).unwrap().is_empty());
    }

    #[test]
    fn a_value_a_meter_cannot_read_rejects_the_event_naming_the_meter() {
        let m = meters(METERS);
        for (data, meter) in [
            (r#"{"model":"x","user":"u","price":1}"#, "tokens"),
            (r#"{"tokens":"lots","user":"u","price":1}"#, "tokens"),
            (r#"{"tokens":1,"user":{"id":1},"price":1}"#, "users"),
            (r#"{"tokens":1,"user":"u","price":null}"#, "last_price"),
        ] {
            let text = event(data);
            let r = meter_event(&m, &CloudEvent::decode(text.as_bytes()).unwrap(), &CTX).unwrap_err();
            assert_eq!(r.reason, RejectReason::InvalidMeterValue);
            assert!(r.detail.starts_with(&format!("meter {meter}:")), "{}", r.detail);
        }
    }

    #[test]
    fn count_needs_no_data_and_falls_back_on_the_record_time() {
        let m = meters(METERS);
        let text = r#"{"specversion":"1.0","id":"e1","source":"s","type":"login","subject":"acme"}"#;
        let out = meter_event(&m, &CloudEvent::decode(text.as_bytes()).unwrap(), &CTX).unwrap();
        assert_eq!((out.len(), out[0].used_amount, out[0].event_time), (1, Decimal::ONE, 5));
    }
}
