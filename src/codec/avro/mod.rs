//! Avro ↔ pulse model mapping (SPEC §6). Pure: schemas and values in, values out; the
//! registry lookups live in [`crate::registry`].
//!
//! Input is read with the *writer's* schema (from the registry) and mapped by field name,
//! so any producer schema with the right field names works. Amounts stay exact: a decimal
//! string, an int/long, or `bytes`/`fixed` with the `decimal` logical type (scaled
//! exactly); `float`/`double` are refused as `invalid_amount`. The mapped fields then go
//! through the very same [`normalise`](crate::pulse::validate::normalise) as JSON, so rules,
//! reasons and ids are identical for both formats.
//!
//! Our own schemas (`schemas/*.avsc`, compiled in) carry amounts as decimal strings and
//! times as `timestamp-millis` longs.

use std::io::Read;

use apache_avro::schema::{RecordSchema, Schema};
use apache_avro::types::Value;
use rust_decimal::Decimal;
use serde_json::value::RawValue;

use crate::pulse::json::RawPulse;
use crate::pulse::{Attributes, GroupedPulse, RejectReason, Rejection, SourceRef};
use crate::window::WindowAggregate;

/// `schemas/pulse.avsc`: what producers write to `source.pulses`.
pub const PULSE_SCHEMA: &str = include_str!("../../../schemas/pulse.avsc");
/// `schemas/grouped_pulse.avsc`: the value of `tenant.grouped.pulses`.
pub const GROUPED_SCHEMA: &str = include_str!("../../../schemas/grouped_pulse.avsc");
/// `schemas/window_aggregate.avsc`: the value of `tenant.aggregated.pulses.amount`.
pub const AGGREGATE_SCHEMA: &str = include_str!("../../../schemas/window_aggregate.avsc");

/// Decodes one Avro datum written with `schema`. Undecodable bytes, trailing bytes and
/// anything but a record are `invalid_avro`.
pub fn decode_record(schema: &Schema, body: &[u8]) -> Result<Value, Rejection> {
    let invalid = |why: String| Rejection::new(RejectReason::InvalidAvro, why);
    let mut reader = body;
    let value = read_datum(schema, &mut reader).map_err(|e| invalid(format!("does not decode with its schema: {e}")))?;
    let mut rest = [0u8; 1];
    if reader.read(&mut rest).unwrap_or(0) > 0 {
        return Err(invalid(format!("{} bytes left after the datum", reader.len() + 1)));
    }
    match value {
        Value::Record(_) => Ok(value),
        other => Err(invalid(format!("expected a record, got {:?}", apache_avro::schema::SchemaKind::from(&other)))),
    }
}

/// One Avro datum (no container header) written with `schema`, as a generic value.
pub fn read_datum(schema: &Schema, reader: &mut impl Read) -> Result<Value, apache_avro::Error> {
    apache_avro::reader::datum::GenericDatumReader::builder(schema).build()?.read_value(reader)
}

/// Encodes `value` as one Avro datum of `schema`; fails if the value does not match.
pub fn write_datum(schema: &Schema, value: Value) -> Result<Vec<u8>, apache_avro::Error> {
    apache_avro::writer::datum::GenericDatumWriter::builder(schema).build()?.write_value_to_vec(value)
}

/// A pulse mapped out of an Avro record, owning the text that [`RawPulse`] borrows.
#[derive(Debug, Default)]
pub struct AvroPulse {
    pulse_id: Option<String>,
    tenant_id: Option<String>,
    product_sku: Option<String>,
    use_unit: Option<String>,
    used_amount: Option<Box<RawValue>>,
    timestamp: Option<Box<RawValue>>,
    attributes: Option<Attributes>,
}

impl AvroPulse {
    /// The pulse in the shape the JSON decoder produces, for the shared validation.
    pub fn raw(&self) -> RawPulse<'_> {
        RawPulse {
            pulse_id: self.pulse_id.as_deref().map(Into::into),
            tenant_id: self.tenant_id.as_deref().map(Into::into),
            product_sku: self.product_sku.as_deref().map(Into::into),
            use_unit: self.use_unit.as_deref().map(Into::into),
            used_amount: self.used_amount.as_deref(),
            timestamp: self.timestamp.as_deref(),
            attributes: self.attributes.clone(),
        }
    }
}

/// Maps a decoded record (written with `schema`) to a pulse. Field names and the Go
/// ingestor's aliases are the JSON ones; a field of the wrong type is `invalid_field`
/// (`invalid_amount`, `bad_timestamp` for those two), as in JSON.
pub fn pulse_from_record(schema: &Schema, value: Value) -> Result<AvroPulse, Rejection> {
    let (Schema::Record(record), Value::Record(fields)) = (schema, value) else {
        return Err(Rejection::new(RejectReason::InvalidAvro, "the writer schema is not a record"));
    };
    let mut out = AvroPulse::default();
    for (name, value) in fields {
        let field_schema = field_schema(record, &name);
        let (schema, value) = unwrap_union(field_schema, value);
        match name.as_str() {
            "pulse_id" => out.pulse_id = string_field(&name, value)?,
            "tenant_id" => out.tenant_id = string_field(&name, value)?,
            "product_sku" => out.product_sku = string_field(&name, value)?,
            "use_unit" | "use_unity" => out.use_unit = string_field(&name, value)?,
            "used_amount" | "used_ammount" => out.used_amount = amount_field(schema, value)?,
            "timestamp" => out.timestamp = timestamp_field(value)?,
            "attributes" => out.attributes = attributes_field(value)?,
            _ => {}
        }
    }
    Ok(out)
}

fn field_schema<'s>(record: &'s RecordSchema, name: &str) -> Option<&'s Schema> {
    record.lookup.get(name).and_then(|i| record.fields.get(*i)).map(|f| &f.schema)
}

/// A union value with the schema of the branch it holds.
fn unwrap_union(schema: Option<&Schema>, value: Value) -> (Option<&Schema>, Value) {
    match (schema, value) {
        (Some(Schema::Union(u)), Value::Union(i, inner)) => (u.variants().get(i as usize), *inner),
        (s, Value::Union(_, inner)) => (s, *inner),
        (s, v) => (s, v),
    }
}

fn raw_json(text: String) -> Box<RawValue> {
    // `text` is always well-formed JSON built here (a quoted string or an integer).
    RawValue::from_string(text).unwrap_or_default()
}

fn string_field(name: &str, value: Value) -> Result<Option<String>, Rejection> {
    match value {
        Value::Null => Ok(None),
        Value::String(s) | Value::Enum(_, s) => Ok(Some(s)),
        other => Err(Rejection::new(RejectReason::InvalidField, format!("{name} must be a string, is Avro {}", kind(&other)))),
    }
}

fn amount_field(schema: Option<&Schema>, value: Value) -> Result<Option<Box<RawValue>>, Rejection> {
    let invalid = |why: String| Rejection::new(RejectReason::InvalidAmount, format!("used_amount: {why}"));
    let exact = |d: Decimal| Ok(Some(raw_json(serde_json::Value::String(d.to_string()).to_string())));
    match value {
        Value::Null => Ok(None),
        Value::String(s) => Ok(Some(raw_json(serde_json::Value::String(s).to_string()))),
        Value::Int(n) => Ok(Some(raw_json(n.to_string()))),
        Value::Long(n) => Ok(Some(raw_json(n.to_string()))),
        Value::Float(_) | Value::Double(_) => Err(invalid(format!(
            "Avro {} is a binary floating-point number and cannot hold amounts exactly; use a decimal string, \
             int/long or the decimal logical type",
            kind(&value)
        ))),
        Value::Decimal(d) => {
            let Some(Schema::Decimal(ds)) = schema else {
                return Err(invalid("decimal value without a decimal schema".into()));
            };
            let bytes: Vec<u8> = Vec::try_from(&d).map_err(|e| invalid(e.to_string()))?;
            exact(decimal_from_twos_complement(&bytes, ds.scale).map_err(invalid)?)
        }
        Value::BigDecimal(b) => {
            let text = b.to_string();
            let d = if text.contains(['e', 'E']) { Decimal::from_scientific(&text) } else { Decimal::from_str_exact(&text) };
            exact(d.map_err(|e| invalid(format!("{text}: {e}")))?)
        }
        other => Err(invalid(format!("Avro {} is not an amount", kind(&other)))),
    }
}

/// The exact value of an Avro decimal: big-endian two's-complement unscaled bytes and
/// the schema's scale.
pub fn decimal_from_twos_complement(bytes: &[u8], scale: usize) -> Result<Decimal, String> {
    if bytes.is_empty() {
        return Ok(Decimal::ZERO);
    }
    // Sign-extend to 16 bytes; longer values must be pure sign extension.
    let negative = bytes[0] & 0x80 != 0;
    let fill = if negative { 0xff } else { 0 };
    let (head, tail) = bytes.split_at(bytes.len().saturating_sub(16));
    if head.iter().any(|b| *b != fill) {
        return Err(format!("decimal of {} bytes is too large for an exact amount", bytes.len()));
    }
    let mut buf = [fill; 16];
    buf[16 - tail.len()..].copy_from_slice(tail);
    let unscaled = i128::from_be_bytes(buf);
    let scale = u32::try_from(scale).map_err(|_| format!("decimal scale {scale} is too large"))?;
    Decimal::try_from_i128_with_scale(unscaled, scale).map_err(|e| format!("decimal {unscaled}e-{scale}: {e}"))
}

fn timestamp_field(value: Value) -> Result<Option<Box<RawValue>>, Rejection> {
    let ms = match value {
        Value::Null => return Ok(None),
        Value::String(s) => return Ok(Some(raw_json(serde_json::Value::String(s).to_string()))),
        Value::Long(ms) | Value::TimestampMillis(ms) | Value::LocalTimestampMillis(ms) => ms,
        Value::Int(ms) => i64::from(ms),
        // Event times are kept to the millisecond, like RFC 3339 input with more digits.
        Value::TimestampMicros(us) | Value::LocalTimestampMicros(us) => us.div_euclid(1_000),
        Value::TimestampNanos(ns) | Value::LocalTimestampNanos(ns) => ns.div_euclid(1_000_000),
        other => {
            return Err(Rejection::new(RejectReason::BadTimestamp, format!("timestamp is Avro {}, not a time", kind(&other))))
        }
    };
    Ok(Some(raw_json(ms.to_string())))
}

fn attributes_field(value: Value) -> Result<Option<Attributes>, Rejection> {
    let bad = |why: String| Rejection::new(RejectReason::InvalidField, format!("attributes: {why}"));
    match value {
        Value::Null => Ok(None),
        Value::Map(m) => {
            let mut out = serde_json::Map::new();
            for (k, v) in m {
                out.insert(k, serde_json::Value::try_from(v).map_err(|e| bad(e.to_string()))?);
            }
            Attributes::from_map(&out).map(Some).map_err(|e| bad(e.to_string()))
        }
        other => Err(bad(format!("must be a map, is Avro {}", kind(&other)))),
    }
}

fn kind(v: &Value) -> String {
    format!("{:?}", apache_avro::schema::SchemaKind::from(v)).to_lowercase()
}

/// A grouped pulse as a `grouped_pulse.avsc` record. Non-string attribute values are
/// stored as their JSON text (the schema's attributes are a string map).
pub fn grouped_to_value(p: &GroupedPulse) -> Value {
    let attributes = match &p.attributes {
        None => Value::Union(0, Box::new(Value::Null)),
        // Attributes are a JSON object by construction: reading them cannot fail.
        Some(attributes) => Value::Union(
            1,
            Box::new(Value::Map(
                attributes
                    .to_map()
                    .unwrap_or_default()
                    .iter()
                    .map(|(k, v)| {
                        let s = match v {
                            serde_json::Value::String(s) => s.clone(),
                            other => other.to_string(),
                        };
                        (k.clone(), Value::String(s))
                    })
                    .collect(),
            )),
        ),
    };
    Value::Record(vec![
        ("object_id".into(), Value::String(p.object_id.clone())),
        ("pulse_id".into(), Value::String(p.pulse_id.clone())),
        ("tenant_id".into(), Value::String(p.tenant_id.clone())),
        ("product_sku".into(), Value::String(p.product_sku.clone())),
        ("use_unit".into(), Value::String(p.use_unit.clone())),
        ("used_amount".into(), Value::String(p.used_amount.to_string())),
        ("event_time".into(), Value::TimestampMillis(p.event_time)),
        ("attributes".into(), attributes),
        (
            "source".into(),
            Value::Record(vec![
                ("topic".into(), Value::String(p.source.topic.clone())),
                ("partition".into(), Value::Int(p.source.partition)),
                ("offset".into(), Value::Long(p.source.offset)),
            ]),
        ),
    ])
}

/// A window aggregate as a `window_aggregate.avsc` record.
pub fn aggregate_to_value(a: &WindowAggregate) -> Value {
    Value::Record(vec![
        ("aggregate_id".into(), Value::String(a.aggregate_id.clone())),
        ("revision".into(), Value::Long(i64::from(a.revision))),
        ("tenant_id".into(), Value::String(a.tenant_id.clone())),
        ("product_sku".into(), Value::String(a.product_sku.clone())),
        ("use_unit".into(), Value::String(a.use_unit.clone())),
        ("window".into(), Value::String(a.window.clone())),
        ("window_start".into(), Value::TimestampMillis(a.window_start)),
        ("window_end".into(), Value::TimestampMillis(a.window_end)),
        ("total_amount".into(), Value::String(a.total_amount.to_string())),
        ("pulse_count".into(), Value::Long(i64::try_from(a.pulse_count).unwrap_or(i64::MAX))),
        ("min_amount".into(), Value::String(a.min_amount.to_string())),
        ("max_amount".into(), Value::String(a.max_amount.to_string())),
        ("first_event_time".into(), Value::TimestampMillis(a.first_event_time)),
        ("last_event_time".into(), Value::TimestampMillis(a.last_event_time)),
        ("final".into(), Value::Boolean(a.is_final)),
        ("emitted_at".into(), Value::TimestampMillis(a.emitted_at)),
    ])
}

/// Why a record of ours (grouped pulse, aggregate) could not be read back.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ReadError(pub String);

/// Named fields of a decoded record, taken out one by one.
struct Fields(Vec<(String, Value)>);

impl Fields {
    fn of(value: Value) -> Result<Self, ReadError> {
        match value {
            Value::Record(f) => Ok(Self(f)),
            _ => Err(ReadError("not a record".into())),
        }
    }

    fn take(&mut self, name: &str) -> Result<Value, ReadError> {
        let i = self.0.iter().position(|(n, _)| n == name).ok_or_else(|| ReadError(format!("{name} is missing")))?;
        Ok(match self.0.swap_remove(i).1 {
            Value::Union(_, v) => *v,
            v => v,
        })
    }

    fn string(&mut self, name: &str) -> Result<String, ReadError> {
        match self.take(name)? {
            Value::String(s) => Ok(s),
            v => Err(ReadError(format!("{name} is Avro {}, not a string", kind(&v)))),
        }
    }

    fn decimal(&mut self, name: &str) -> Result<Decimal, ReadError> {
        let s = self.string(name)?;
        Decimal::from_str_exact(&s).map_err(|e| ReadError(format!("{name} {s:?}: {e}")))
    }

    fn long(&mut self, name: &str) -> Result<i64, ReadError> {
        match self.take(name)? {
            Value::Long(n) | Value::TimestampMillis(n) => Ok(n),
            Value::Int(n) => Ok(i64::from(n)),
            v => Err(ReadError(format!("{name} is Avro {}, not a long", kind(&v)))),
        }
    }

    fn int<T: TryFrom<i64>>(&mut self, name: &str) -> Result<T, ReadError> {
        let n = self.long(name)?;
        T::try_from(n).map_err(|_| ReadError(format!("{name} {n} is out of range")))
    }
}

/// Reads a `grouped_pulse.avsc` record (stage 2's Avro input).
pub fn grouped_from_value(value: Value) -> Result<GroupedPulse, ReadError> {
    let mut f = Fields::of(value)?;
    let attributes = match f.take("attributes")? {
        Value::Null => None,
        Value::Map(m) => {
            let map = m
                .into_iter()
                .map(|(k, v)| match v {
                    Value::String(s) => Ok((k, serde_json::Value::String(s))),
                    v => Err(ReadError(format!("attribute {k} is Avro {}, not a string", kind(&v)))),
                })
                .collect::<Result<_, _>>()?;
            Some(Attributes::from_map(&map).map_err(|e| ReadError(format!("attributes: {e}")))?)
        }
        v => return Err(ReadError(format!("attributes is Avro {}, not a map", kind(&v)))),
    };
    let mut source = Fields::of(f.take("source")?)?;
    Ok(GroupedPulse {
        object_id: f.string("object_id")?,
        pulse_id: f.string("pulse_id")?,
        tenant_id: f.string("tenant_id")?,
        product_sku: f.string("product_sku")?,
        use_unit: f.string("use_unit")?,
        used_amount: f.decimal("used_amount")?,
        event_time: f.long("event_time")?,
        attributes,
        source: SourceRef { topic: source.string("topic")?, partition: source.int("partition")?, offset: source.long("offset")? },
        latest_id: None,
    })
}

/// Reads a `window_aggregate.avsc` record (for consumers and tests).
pub fn aggregate_from_value(value: Value) -> Result<WindowAggregate, ReadError> {
    let mut f = Fields::of(value)?;
    Ok(WindowAggregate {
        aggregate_id: f.string("aggregate_id")?,
        revision: f.int("revision")?,
        tenant_id: f.string("tenant_id")?,
        product_sku: f.string("product_sku")?,
        use_unit: f.string("use_unit")?,
        window: f.string("window")?,
        window_start: f.long("window_start")?,
        window_end: f.long("window_end")?,
        total_amount: f.decimal("total_amount")?,
        pulse_count: f.int("pulse_count")?,
        min_amount: f.decimal("min_amount")?,
        max_amount: f.decimal("max_amount")?,
        first_event_time: f.long("first_event_time")?,
        last_event_time: f.long("last_event_time")?,
        is_final: match f.take("final")? {
            Value::Boolean(b) => b,
            v => return Err(ReadError(format!("final is Avro {}, not a boolean", kind(&v)))),
        },
        emitted_at: f.long("emitted_at")?,
        meter: None,
        latest: None,
    })
    .map(|mut a| {
        a.meter = crate::meter::key::MeterOf::of(&a.product_sku, &a.use_unit);
        a
    })
}

pub mod check;

#[cfg(test)]
mod tests;
