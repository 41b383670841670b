//! Checks of the Avro schemas (`pulses check`): each parses, the grouped pulse can hold
//! every field of the input pulse, and the grouped-pulse and aggregate schemas have
//! exactly the fields of the JSON records the code writes, with types the code's values
//! encode to and decode from unchanged.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use apache_avro::schema::Schema;
use apache_avro::schema_compatibility::SchemaCompatibility;
use rust_decimal::Decimal;

use super::{aggregate_from_value, aggregate_to_value, grouped_from_value, grouped_to_value};
use crate::pulse::{Attributes, GroupedPulse, SourceRef};
use crate::window::WindowAggregate;

/// The schema files pulses uses, in `schemas/`.
pub const FILES: [&str; 3] = ["pulse.avsc", "grouped_pulse.avsc", "window_aggregate.avsc"];

/// What is wrong with a schema set.
#[derive(Debug, thiserror::Error)]
pub enum SchemaError {
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{name} is not a valid Avro schema: {source}")]
    Parse { name: String, source: Box<apache_avro::Error> },
    #[error("{name}: {detail}")]
    Incompatible { name: String, detail: String },
}

fn incompatible(name: &str, detail: impl Into<String>) -> SchemaError {
    SchemaError::Incompatible { name: name.into(), detail: detail.into() }
}

/// Checks the three schema files of `dir`, plus that any other `*.avsc` there parses.
pub fn check_dir(dir: &Path) -> Result<(), SchemaError> {
    let read = |path: PathBuf| std::fs::read_to_string(&path).map_err(|source| SchemaError::Read { path, source });
    let [p, g, a] = FILES.map(|f| dir.join(f));
    check_texts(&read(p)?, &read(g)?, &read(a)?)?;
    let entries = std::fs::read_dir(dir).map_err(|source| SchemaError::Read { path: dir.into(), source })?;
    for entry in entries.flatten() {
        let path = entry.path();
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.ends_with(".avsc") && !FILES.contains(&name.as_str()) {
            parse(&name, &read(path)?)?;
        }
    }
    Ok(())
}

/// Checks the texts of `pulse.avsc`, `grouped_pulse.avsc` and `window_aggregate.avsc`.
pub fn check_texts(pulse: &str, grouped: &str, aggregate: &str) -> Result<(), SchemaError> {
    let [pn, gn, an] = FILES;
    let pulse = parse(pn, pulse)?;
    let grouped = parse(gn, grouped)?;
    let aggregate = parse(an, aggregate)?;
    grouped_holds_pulse(&pulse, &grouped)?;
    let sample = sample_grouped();
    same_fields(gn, &grouped, &serde_json::to_value(&sample).unwrap_or_default())?;
    round_trips(gn, &grouped, grouped_to_value(&sample), |v| grouped_from_value(v).map(|g| g == sample))?;
    let agg = sample_aggregate();
    same_fields(an, &aggregate, &serde_json::to_value(&agg).unwrap_or_default())?;
    round_trips(an, &aggregate, aggregate_to_value(&agg), |v| aggregate_from_value(v).map(|a| a == agg))?;
    Ok(())
}

fn parse(name: &str, text: &str) -> Result<Schema, SchemaError> {
    let schema = Schema::parse_str(text).map_err(|e| SchemaError::Parse { name: name.into(), source: Box::new(e) })?;
    match schema {
        Schema::Record(_) => Ok(schema),
        _ => Err(incompatible(name, "must be a record schema")),
    }
}

/// Every pulse field has a grouped field of the same name (`timestamp` → `event_time`)
/// that can read its non-null values.
fn grouped_holds_pulse(pulse: &Schema, grouped: &Schema) -> Result<(), SchemaError> {
    let (Schema::Record(p), Schema::Record(g)) = (pulse, grouped) else { return Ok(()) };
    for field in &p.fields {
        let target = if field.name == "timestamp" { "event_time" } else { field.name.as_str() };
        let Some(gf) = g.lookup.get(target).and_then(|i| g.fields.get(*i)) else {
            return Err(incompatible(FILES[1], format!("has no field {target} for pulse field {}", field.name)));
        };
        SchemaCompatibility::can_read(non_null(&field.schema), non_null(&gf.schema)).map_err(|e| {
            incompatible(FILES[1], format!("field {target} cannot hold pulse field {}: {e}", field.name))
        })?;
    }
    Ok(())
}

/// The schema without its `null` branch (optional input fields are filled by stage 1).
fn non_null(schema: &Schema) -> &Schema {
    match schema {
        Schema::Union(u) => {
            let rest: Vec<&Schema> = u.variants().iter().filter(|s| **s != Schema::Null).collect();
            if rest.len() == 1 { rest[0] } else { schema }
        }
        s => s,
    }
}

/// The record's field names are exactly the keys of the code's JSON form.
fn same_fields(name: &str, schema: &Schema, json: &serde_json::Value) -> Result<(), SchemaError> {
    let Schema::Record(r) = schema else { return Ok(()) };
    let avro: BTreeSet<&str> = r.fields.iter().map(|f| f.name.as_str()).collect();
    let code: BTreeSet<&str> = json.as_object().map(|o| o.keys().map(String::as_str).collect()).unwrap_or_default();
    if avro != code {
        let missing: Vec<_> = code.difference(&avro).collect();
        let extra: Vec<_> = avro.difference(&code).collect();
        return Err(incompatible(name, format!("fields differ from the JSON record: missing {missing:?}, unknown {extra:?}")));
    }
    Ok(())
}

/// The code's value encodes with the schema and decodes back unchanged.
fn round_trips(
    name: &str,
    schema: &Schema,
    value: apache_avro::types::Value,
    same: impl FnOnce(apache_avro::types::Value) -> Result<bool, super::ReadError>,
) -> Result<(), SchemaError> {
    let bytes = super::write_datum(schema, value).map_err(|e| incompatible(name, format!("the code's record does not encode: {e}")))?;
    let back = super::read_datum(schema, &mut bytes.as_slice())
        .map_err(|e| incompatible(name, format!("the code's record does not decode: {e}")))?;
    match same(back) {
        Ok(true) => Ok(()),
        Ok(false) => Err(incompatible(name, "the code's record changes in an Avro round trip")),
        Err(e) => Err(incompatible(name, format!("the code cannot read the record back: {e}"))),
    }
}

fn sample_grouped() -> GroupedPulse {
    let mut attributes = serde_json::Map::new();
    attributes.insert("region".into(), "eu-west-1".into());
    GroupedPulse {
        object_id: "o".into(),
        pulse_id: "p".into(),
        tenant_id: "acme".into(),
        product_sku: "storage.standard".into(),
        use_unit: "GB".into(),
        used_amount: Decimal::new(1250, 2),
        event_time: 1_795_341_600_123,
        attributes: Attributes::from_map(&attributes).ok(),
        source: SourceRef { topic: "source.pulses".into(), partition: 2, offset: 7 },
        latest_id: None,
    }
}

fn sample_aggregate() -> WindowAggregate {
    use crate::window::{Accumulator, GroupKey};
    let key = GroupKey::new("acme", "storage.standard", "GB");
    let mut acc = Accumulator::first(Decimal::new(1250, 2), 1_795_341_600_123);
    let _ = acc.add(Decimal::new(5, 1), 1_795_341_600_500);
    WindowAggregate::new(&key, "minute", 1_795_341_600_000, 1_795_341_660_000, &acc, 3, true, 1_795_341_666_000)
}
