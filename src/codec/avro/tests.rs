use std::str::FromStr;

use apache_avro::schema::Schema;
use apache_avro::types::Value;
use rust_decimal::Decimal;

use super::*;
use crate::pulse::validate::{normalise, validate, RecordContext};

const CTX: RecordContext<'static> =
    RecordContext { topic: "source.pulses", partition: 2, offset: 7, record_time_ms: Some(1_000) };

fn pulse_schema() -> Schema {
    Schema::parse_str(PULSE_SCHEMA).unwrap()
}

/// Encodes `fields` with `schema`, decodes and validates them like stage 1 does.
fn through(schema: &Schema, fields: Vec<(&str, Value)>) -> Result<GroupedPulse, Rejection> {
    let record = Value::Record(fields.into_iter().map(|(k, v)| (k.to_owned(), v)).collect());
    let bytes = write_datum(schema, record).expect("test record matches its schema");
    let value = decode_record(schema, &bytes)?;
    let pulse = pulse_from_record(schema, value)?;
    normalise(pulse.raw(), &CTX)
}

fn some(v: Value) -> Value {
    Value::Union(1, Box::new(v))
}
fn none() -> Value {
    Value::Union(0, Box::new(Value::Null))
}
fn s(x: &str) -> Value {
    Value::String(x.to_owned())
}

fn spec_pulse(amount: &str) -> Vec<(&'static str, Value)> {
    vec![
        ("pulse_id", some(s("p1"))),
        ("tenant_id", s("acme")),
        ("product_sku", s("storage.standard")),
        ("use_unit", s("GB")),
        ("used_amount", s(amount)),
        ("timestamp", some(Value::TimestampMillis(1_795_341_600_123))),
        ("attributes", some(Value::Map([("region".to_owned(), s("eu-west-1"))].into()))),
    ]
}

#[test]
fn avro_pulse_equals_the_json_pulse() {
    let avro = through(&pulse_schema(), spec_pulse("12.50")).unwrap();
    let json = validate(
        br#"{"pulse_id":"p1","tenant_id":"acme","product_sku":"storage.standard","used_amount":"12.50",
            "use_unit":"GB","timestamp":"2026-11-22T10:00:00.123Z","attributes":{"region":"eu-west-1"}}"#,
        &CTX,
    )
    .unwrap();
    assert_eq!(avro, json);
    assert_eq!(avro.used_amount.to_string(), "12.50");
}

#[test]
fn optional_fields_default_like_json() {
    let mut fields = spec_pulse("3");
    fields[0].1 = none();
    fields[5].1 = none();
    fields[6].1 = none();
    let p = through(&pulse_schema(), fields).unwrap();
    assert_eq!(p.pulse_id, p.object_id);
    assert_eq!(p.event_time, 1_000);
    assert_eq!(p.attributes, None);
}

#[test]
fn validation_reasons_are_the_json_ones() {
    let mut neg = spec_pulse("-1.5");
    assert_eq!(through(&pulse_schema(), neg.clone()).unwrap_err().reason, RejectReason::NegativeAmount);
    neg[4].1 = s("12,5");
    assert_eq!(through(&pulse_schema(), neg.clone()).unwrap_err().reason, RejectReason::InvalidAmount);
    neg[4].1 = s("1");
    neg[1].1 = s("a b");
    assert_eq!(through(&pulse_schema(), neg).unwrap_err().reason, RejectReason::InvalidField);
}

/// A producer's own schema: Go-ingestor names, decimal bytes, a long amount, no pulse_id.
#[test]
fn liberal_producer_schemas() {
    let producer = |amount_type: &str| {
        Schema::parse_str(&format!(
            r#"{{"type":"record","name":"P","fields":[
                {{"name":"tenant_id","type":"string"}},{{"name":"product_sku","type":"string"}},
                {{"name":"use_unity","type":"string"}},{{"name":"used_ammount","type":{amount_type}}},
                {{"name":"timestamp","type":"long"}}]}}"#
        ))
        .unwrap()
    };
    let base = |amount: Value| {
        vec![
            ("tenant_id", s("t")),
            ("product_sku", s("sku")),
            ("use_unity", s("requests")),
            ("used_ammount", amount),
            ("timestamp", Value::Long(5_000)),
        ]
    };
    let dec = producer(r#"{"type":"bytes","logicalType":"decimal","precision":20,"scale":3}"#);
    // 12345 unscaled at scale 3 = 12.345, big-endian two's complement.
    let p = through(&dec, base(Value::Decimal(apache_avro::Decimal::from(12345i64.to_be_bytes().to_vec())))).unwrap();
    assert_eq!((p.used_amount.to_string().as_str(), p.use_unit.as_str(), p.event_time), ("12.345", "requests", 5_000));
    let neg = through(&dec, base(Value::Decimal(apache_avro::Decimal::from((-5i64).to_be_bytes().to_vec()))));
    assert_eq!(neg.unwrap_err().reason, RejectReason::NegativeAmount);

    let fixed = producer(r#"{"type":"fixed","name":"Amount","size":8,"logicalType":"decimal","precision":18,"scale":2}"#);
    let p = through(&fixed, base(Value::Decimal(apache_avro::Decimal::from(1250i64.to_be_bytes().to_vec())))).unwrap();
    assert_eq!(p.used_amount.to_string(), "12.50");

    let long = producer(r#""long""#);
    assert_eq!(through(&long, base(Value::Long(42))).unwrap().used_amount, Decimal::from(42));

    let double = producer(r#""double""#);
    let err = through(&double, base(Value::Double(0.1))).unwrap_err();
    assert_eq!(err.reason, RejectReason::InvalidAmount);
    assert!(err.detail.contains("floating-point"), "{}", err.detail);

    // A field of the wrong type is invalid_field, as `"tenant_id": 7` is in JSON.
    let numeric_tenant = Schema::parse_str(
        r#"{"type":"record","name":"P","fields":[{"name":"tenant_id","type":"long"},
            {"name":"product_sku","type":"string"},{"name":"use_unit","type":"string"},{"name":"used_amount","type":"string"}]}"#,
    )
    .unwrap();
    let fields = vec![("tenant_id", Value::Long(7)), ("product_sku", s("s")), ("use_unit", s("u")), ("used_amount", s("1"))];
    assert_eq!(through(&numeric_tenant, fields).unwrap_err().reason, RejectReason::InvalidField);
}

#[test]
fn decimal_bytes_are_exact() {
    assert_eq!(decimal_from_twos_complement(&[0x04, 0xd2], 2).unwrap(), Decimal::from_str("12.34").unwrap());
    assert_eq!(decimal_from_twos_complement(&[0xff], 0).unwrap(), Decimal::from(-1));
    assert_eq!(decimal_from_twos_complement(&[], 5).unwrap(), Decimal::ZERO);
    // Sign extension beyond 16 bytes is fine; real magnitude beyond 96 bits is refused.
    let mut long = vec![0u8; 20];
    long[19] = 7;
    assert_eq!(decimal_from_twos_complement(&long, 1).unwrap(), Decimal::from_str("0.7").unwrap());
    long[0] = 1;
    assert!(decimal_from_twos_complement(&long, 1).is_err());
    assert!(decimal_from_twos_complement(&[1], 40).is_err());
}

#[test]
fn corrupt_bodies_are_invalid_avro() {
    let schema = pulse_schema();
    let record = Value::Record(spec_pulse("1").into_iter().map(|(k, v)| (k.to_owned(), v)).collect());
    let good = write_datum(&schema, record).unwrap();
    for bad in [&good[..good.len() / 2], &[0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01][..], &[]] {
        assert_eq!(decode_record(&schema, bad).unwrap_err().reason, RejectReason::InvalidAvro, "{bad:?}");
    }
    let mut trailing = good.clone();
    trailing.push(0);
    assert_eq!(decode_record(&schema, &trailing).unwrap_err().reason, RejectReason::InvalidAvro);
    let not_record = Schema::parse_str(r#""string""#).unwrap();
    let bytes = write_datum(&not_record, s("x")).unwrap();
    assert_eq!(decode_record(&not_record, &bytes).unwrap_err().reason, RejectReason::InvalidAvro);
}

#[test]
fn grouped_and_aggregate_round_trip() {
    let grouped = Schema::parse_str(GROUPED_SCHEMA).unwrap();
    let p = through(&pulse_schema(), spec_pulse("0.0001")).unwrap();
    let bytes = write_datum(&grouped, grouped_to_value(&p)).unwrap();
    let back = grouped_from_value(decode_record(&grouped, &bytes).unwrap()).unwrap();
    assert_eq!(back, p);
}

#[test]
fn shipped_schemas_are_compatible() {
    check::check_texts(PULSE_SCHEMA, GROUPED_SCHEMA, AGGREGATE_SCHEMA).unwrap();
    check::check_dir(&std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("schemas")).unwrap();
}

#[test]
fn incompatible_schemas_are_reported() {
    let err = |p: &str, g: &str, a: &str| check::check_texts(p, g, a).unwrap_err().to_string();
    assert!(err("{", GROUPED_SCHEMA, AGGREGATE_SCHEMA).contains("pulse.avsc is not a valid Avro schema"));
    // The grouped pulse loses a pulse field.
    let no_sku = GROUPED_SCHEMA.replace(r#"{"name": "product_sku", "type": "string"},"#, "");
    assert!(err(PULSE_SCHEMA, &no_sku, AGGREGATE_SCHEMA).contains("no field product_sku"));
    // A pulse field the grouped pulse cannot hold.
    let long_unit = PULSE_SCHEMA.replace(r#""name": "use_unit", "type": "string""#, r#""name": "use_unit", "type": "long""#);
    assert!(err(&long_unit, GROUPED_SCHEMA, AGGREGATE_SCHEMA).contains("field use_unit cannot hold"));
    // The aggregate schema and the code's aggregate disagree.
    let renamed = AGGREGATE_SCHEMA.replace(r#""name": "pulse_count""#, r#""name": "count""#);
    assert!(err(PULSE_SCHEMA, GROUPED_SCHEMA, &renamed).contains("missing [\"pulse_count\"]"));
    let float_total = AGGREGATE_SCHEMA.replace(r#""name": "total_amount", "type": "string""#, r#""name": "total_amount", "type": "double""#);
    assert!(err(PULSE_SCHEMA, GROUPED_SCHEMA, &float_total).contains("does not encode"));
}
