//! Validation and normalisation of pulses (SPEC §3): the rules a record must pass to be
//! counted, and the machine-readable reason it is sent to the DLQ when it does not.

use std::borrow::Cow;
use std::fmt;
use std::str::FromStr;

use rust_decimal::Decimal;
use serde_json::value::RawValue;

use super::json::{decode_pulse, RawPulse};
use super::wire::{self, Wire};
use super::{ids, time, GroupedPulse, SourceRef};

/// Why a record was rejected: the `error.reason` header of its DLQ record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RejectReason {
    /// Not JSON, or not a JSON object.
    InvalidJson,
    /// A required field is absent or null.
    MissingField,
    /// A field has the wrong type or characters outside `[A-Za-z0-9._:-]`, or is empty.
    InvalidField,
    /// An identifier is longer than 128 characters.
    FieldTooLong,
    /// `used_amount` is not an exact decimal number.
    InvalidAmount,
    /// `used_amount` is below zero.
    NegativeAmount,
    /// `timestamp` is neither RFC 3339 nor epoch milliseconds, or out of range.
    BadTimestamp,
    /// Avro wire format whose schema cannot be resolved (the registry does not know the
    /// id, or no registry is configured).
    UnknownSchema,
    /// Avro wire format whose bytes do not decode with their schema, or not to a record.
    InvalidAvro,
    /// Avro wire format whose schema could not be fetched: the registry stayed
    /// unreachable for the whole retry budget (`schema_registry.retry_max`).
    RegistryUnavailable,
    /// A CloudEvent whose value a meter cannot read: missing, null, or not a number
    /// (SPEC §10); the detail names the meter.
    InvalidMeterValue,
}

impl RejectReason {
    pub const ALL: [RejectReason; 11] = [
        Self::InvalidJson,
        Self::MissingField,
        Self::InvalidField,
        Self::FieldTooLong,
        Self::InvalidAmount,
        Self::NegativeAmount,
        Self::BadTimestamp,
        Self::UnknownSchema,
        Self::InvalidAvro,
        Self::RegistryUnavailable,
        Self::InvalidMeterValue,
    ];

    /// The stable machine code used in the `error.reason` header and in metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::InvalidJson => "invalid_json",
            Self::MissingField => "missing_field",
            Self::InvalidField => "invalid_field",
            Self::FieldTooLong => "field_too_long",
            Self::InvalidAmount => "invalid_amount",
            Self::NegativeAmount => "negative_amount",
            Self::BadTimestamp => "bad_timestamp",
            Self::UnknownSchema => "unknown_schema",
            Self::InvalidAvro => "invalid_avro",
            Self::RegistryUnavailable => "registry_unavailable",
            Self::InvalidMeterValue => "invalid_meter_value",
        }
    }
}

impl fmt::Display for RejectReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A record that cannot be counted: the reason code and a human-readable detail.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    pub reason: RejectReason,
    pub detail: String,
}

impl Rejection {
    pub fn new(reason: RejectReason, detail: impl Into<String>) -> Self {
        Self { reason, detail: detail.into() }
    }
}

/// Where a record came from and the Kafka timestamp to fall back on.
#[derive(Debug, Clone, Copy)]
pub struct RecordContext<'a> {
    pub topic: &'a str,
    pub partition: i32,
    pub offset: i64,
    /// The Kafka record timestamp in epoch ms, if the record has one.
    pub record_time_ms: Option<i64>,
}

/// Longest accepted identifier (tenant_id, product_sku, use_unit).
pub const MAX_ID_LEN: usize = 128;
/// Longest accepted pulse_id: free-form (UUIDs, ULIDs, producer ids), but bounded.
pub const MAX_PULSE_ID_LEN: usize = 256;

/// Decodes and validates one `source.pulses` value into a grouped pulse, without a
/// schema registry (Avro input goes through [`crate::registry::PulseInput`]).
pub fn validate(bytes: &[u8], ctx: &RecordContext<'_>) -> Result<GroupedPulse, Rejection> {
    match wire::detect(bytes)? {
        Wire::Json(json) => normalise(decode_pulse(json)?, ctx),
        // Avro input needs a schema registry; without one the schema id cannot be resolved.
        Wire::Avro { schema_id, .. } => Err(Rejection::new(
            RejectReason::UnknownSchema,
            format!("Avro wire format (magic byte 0, schema id {schema_id}) but no schema registry is configured"),
        )),
    }
}

/// Applies the SPEC §3 rules to a decoded pulse.
pub fn normalise(raw: RawPulse<'_>, ctx: &RecordContext<'_>) -> Result<GroupedPulse, Rejection> {
    let tenant_id = identifier("tenant_id", raw.tenant_id.as_deref())?;
    let product_sku = identifier("product_sku", raw.product_sku.as_deref())?;
    let use_unit = identifier("use_unit", raw.use_unit.as_deref())?;
    let used_amount = amount(raw.used_amount)?;
    let event_time = timestamp(raw.timestamp, ctx.record_time_ms)?;
    let object_id = ids::object_id(ctx.topic, ctx.partition, ctx.offset);
    let pulse_id = match raw.pulse_id.as_deref() {
        None => object_id.clone(),
        Some("") => return Err(Rejection::new(RejectReason::InvalidField, "pulse_id is empty")),
        Some(id) if id.chars().count() > MAX_PULSE_ID_LEN => {
            return Err(Rejection::new(
                RejectReason::FieldTooLong,
                format!("pulse_id is longer than {MAX_PULSE_ID_LEN} characters"),
            ))
        }
        Some(id) => id.to_owned(),
    };
    Ok(GroupedPulse {
        object_id,
        pulse_id,
        tenant_id,
        product_sku,
        use_unit,
        used_amount,
        event_time,
        attributes: raw.attributes,
        source: SourceRef { topic: ctx.topic.to_owned(), partition: ctx.partition, offset: ctx.offset },
        latest_id: None,
    })
}

/// Checks an identifier field (tenant_id, product_sku, use_unit): present, non-empty,
/// at most [`MAX_ID_LEN`], of the allowed characters.
pub fn identifier(field: &str, value: Option<&str>) -> Result<String, Rejection> {
    let v = value.ok_or_else(|| Rejection::new(RejectReason::MissingField, format!("{field} is required")))?;
    if v.is_empty() {
        return Err(Rejection::new(RejectReason::InvalidField, format!("{field} is empty")));
    }
    if v.len() > MAX_ID_LEN {
        return Err(Rejection::new(
            RejectReason::FieldTooLong,
            format!("{field} has {} characters, at most {MAX_ID_LEN} are allowed", v.chars().count()),
        ));
    }
    // Every allowed character is ASCII: bytes are checked, the offending char is named.
    let allowed = |b: u8| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-');
    if let Some(at) = v.bytes().position(|b| !allowed(b)) {
        let bad = v.get(at..).and_then(|rest| rest.chars().next()).unwrap_or(char::REPLACEMENT_CHARACTER);
        return Err(Rejection::new(
            RejectReason::InvalidField,
            format!("{field} contains {bad:?}; allowed are A-Z a-z 0-9 . _ : -"),
        ));
    }
    Ok(v.to_owned())
}

/// Parses `used_amount` exactly: a JSON number's literal text or a decimal string.
pub fn amount(raw: Option<&RawValue>) -> Result<Decimal, Rejection> {
    let raw = raw.ok_or_else(|| Rejection::new(RejectReason::MissingField, "used_amount is required"))?;
    let text = raw.get();
    let mut value = json_decimal(raw)
        .map_err(|why| Rejection::new(RejectReason::InvalidAmount, format!("used_amount {text}: {why}")))?;
    if value.is_sign_negative() {
        if !value.is_zero() {
            return Err(Rejection::new(RejectReason::NegativeAmount, format!("used_amount {value} is negative")));
        }
        value.set_sign_positive(true);
    }
    Ok(value)
}

/// A JSON value as an exact decimal: a number's literal text, or a decimal string (as
/// pulses' `used_amount` and meters' values are written); why not, otherwise.
pub fn json_decimal(raw: &RawValue) -> Result<Decimal, String> {
    let text = raw.get();
    if text.starts_with('"') {
        let s = json_string(text).ok_or("not a string")?;
        exact_decimal(s.trim())
    } else if text.starts_with(|c: char| c == '-' || c.is_ascii_digit()) {
        exact_decimal(text)
    } else {
        Err("must be a JSON number or a decimal string".into())
    }
}

/// A decimal in plain (`0.000000651`) or exponent notation (`6.51E-7`, `1E+3`,
/// `6.51e-07`), exactly or not at all: Java's `BigDecimal.toString()` and Python's
/// `str(Decimal)` write small amounts with an exponent, in strings as in numbers.
/// `Decimal::from_scientific` would round a mantissa of more than 28 digits; here it
/// is an error, like any value that does not fit in 28 digits of scale.
pub fn exact_decimal(text: &str) -> Result<Decimal, String> {
    let Some((mantissa, exponent)) = text.split_once(['e', 'E']) else {
        return Decimal::from_str_exact(text).map_err(|e| e.to_string());
    };
    let mut value = Decimal::from_str_exact(mantissa).map_err(|e| e.to_string())?;
    let exponent: i64 = exponent.parse().map_err(|_| format!("exponent {exponent:?} is not an integer"))?;
    let too_small = || format!("more than {} decimal places", Decimal::MAX_SCALE);
    let scale = i64::from(value.scale()) - exponent;
    if scale > i64::from(Decimal::MAX_SCALE) {
        return Err(too_small());
    }
    if scale >= 0 {
        value.set_scale(scale as u32).map_err(|_| too_small())?;
        return Ok(value);
    }
    // A positive exponent beyond the mantissa's decimals: multiply by 10^-scale.
    value.set_scale(0).map_err(|_| too_small())?;
    let power = u32::try_from(-scale).ok().filter(|p| *p <= 28).ok_or("too large")?;
    value.checked_mul(Decimal::from_i128_with_scale(10i128.pow(power), 0)).ok_or_else(|| "too large".to_owned())
}

/// Parses `timestamp` (RFC 3339 or epoch ms), defaulting to the Kafka record time.
pub fn timestamp(raw: Option<&RawValue>, record_time_ms: Option<i64>) -> Result<i64, Rejection> {
    let bad = |why: String| Rejection::new(RejectReason::BadTimestamp, why);
    let ms = match raw {
        None => record_time_ms.ok_or_else(|| bad("no timestamp in the pulse and none on the record".into()))?,
        Some(raw) => {
            let text = raw.get();
            if text.starts_with('"') {
                let s = json_string(text).ok_or_else(|| bad(format!("timestamp {text} is not a string")))?;
                if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) {
                    i64::from_str(&s).map_err(|_| bad(format!("timestamp {s:?} is out of range")))?
                } else {
                    time::parse_rfc3339_ms(&s)
                        .ok_or_else(|| bad(format!("timestamp {s:?} is neither RFC 3339 nor epoch milliseconds")))?
                }
            } else {
                i64::from_str(text).map_err(|_| bad(format!("timestamp {text} is not an integer of epoch milliseconds")))?
            }
        }
    };
    if !(0..=time::MAX_RFC3339_MS).contains(&ms) {
        return Err(bad(format!("timestamp {ms} ms is outside 1970..9999")));
    }
    Ok(ms)
}

/// The content of a JSON string literal: borrowed unless it has escapes to resolve
/// (serde's `Cow<str>` always copies).
fn json_string(text: &str) -> Option<Cow<'_, str>> {
    match text.strip_prefix('"').and_then(|t| t.strip_suffix('"')) {
        Some(inner) if !inner.contains(['\\', '"']) => Some(Cow::Borrowed(inner)),
        _ => serde_json::from_str::<String>(text).ok().map(Cow::Owned),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CTX: RecordContext<'static> =
        RecordContext { topic: "source.pulses", partition: 2, offset: 7, record_time_ms: Some(1_000) };

    fn ok(json: &str) -> GroupedPulse {
        validate(json.as_bytes(), &CTX).expect("valid pulse")
    }

    fn reason(json: &[u8]) -> RejectReason {
        validate(json, &CTX).expect_err("invalid pulse").reason
    }

    const BASE: &str = r#""tenant_id":"acme","product_sku":"storage.standard","use_unit":"GB""#;

    #[test]
    fn accepts_spec_example_and_keeps_decimals_exact() {
        let p = ok(r#"{"pulse_id":"p1","tenant_id":"acme","product_sku":"storage.standard",
            "used_amount":"12.50","use_unit":"GB","timestamp":"2026-11-22T10:00:00.123Z",
            "attributes":{"region":"eu-west-1"}}"#);
        assert_eq!(p.used_amount.to_string(), "12.50");
        assert_eq!(p.event_time, 1_795_341_600_123);
        assert_eq!(p.attributes.as_ref().map(|a| a.json()), Some(r#"{"region":"eu-west-1"}"#));
        assert_eq!(p.pulse_id, "p1");
        assert_eq!(p.source, SourceRef { topic: "source.pulses".into(), partition: 2, offset: 7 });
        assert_eq!(p.object_id, ids::object_id("source.pulses", 2, 7));
    }

    #[test]
    fn number_amounts_are_not_floats() {
        let p = ok(&format!(r#"{{{BASE},"used_amount":0.1000000000000000055511151231}}"#));
        assert_eq!(p.used_amount.to_string(), "0.1000000000000000055511151231");
        // More digits than an exact decimal holds: refused, never rounded.
        let err = validate(format!(r#"{{{BASE},"used_amount":0.1000000000000000055511151231257827}}"#).as_bytes(), &CTX);
        assert_eq!(err.unwrap_err().reason, RejectReason::InvalidAmount);
        let p = ok(&format!(r#"{{{BASE},"used_amount":1.5e3}}"#));
        assert_eq!(p.used_amount, Decimal::from(1500));
        let p = ok(&format!(r#"{{{BASE},"used_amount":-0}}"#));
        assert!(p.used_amount.is_zero() && p.used_amount.is_sign_positive());
    }

    #[test]
    fn exponent_notation_is_exact_in_strings_and_numbers() {
        // As Java's BigDecimal.toString(), Python's str(Decimal), Go's and JavaScript's
        // JSON encoders write them.
        for (written, exact) in [
            (r#""6.51E-7""#, "0.000000651"),  // BigDecimal("0.000000651").toString(), str(Decimal(...))
            (r#""1E+3""#, "1000"),            // BigDecimal("1E+3"), str(Decimal("1000").normalize())
            (r#""1.2E+4""#, "12000"),
            (r#""0E-8""#, "0.00000000"),      // str(Decimal("0.00000000"))
            (r#""-0E-2""#, "0.00"),
            (r#""12.5e0""#, "12.5"),
            ("6.51e-7", "0.000000651"),       // JavaScript JSON.stringify(6.51e-7)
            ("6.51e-07", "0.000000651"),      // Go encoding/json
            ("1e21", "1000000000000000000000"), // JavaScript JSON.stringify(1e21)
            (r#""1.0000000000000000000000000001E-0""#, "1.0000000000000000000000000001"),
        ] {
            let p = ok(&format!(r#"{{{BASE},"used_amount":{written}}}"#));
            assert_eq!(p.used_amount.to_string(), exact, "{written}");
        }
        // Never rounded: more digits than fit are refused, not approximated.
        for written in [r#""1E-29""#, r#""1.00000000000000000000000000001E-1""#, r#""1E+29""#, r#""1E""#, r#""E5""#, r#""1E+-2""#] {
            assert_eq!(reason(format!(r#"{{{BASE},"used_amount":{written}}}"#).as_bytes()), RejectReason::InvalidAmount, "{written}");
        }
        assert_eq!(reason(format!(r#"{{{BASE},"used_amount":"-6.51E-7"}}"#).as_bytes()), RejectReason::NegativeAmount);
    }

    #[test]
    fn exponent_notation_equals_the_plain_decimal_it_stands_for() {
        // An independent spelling: shift the decimal point by hand in the digit string.
        let mut n = 0u64;
        for digits in ["7", "651", "100", "123456789", "5000"] {
            for point in 0..=digits.len() {
                for exp in -12i32..=12 {
                    let mantissa = if point == digits.len() { digits.to_owned() } else { format!("{}.{}", &digits[..point], &digits[point..]) };
                    let mantissa = if mantissa.starts_with('.') { format!("0{mantissa}") } else { mantissa };
                    let frac = (digits.len() - point) as i32 - exp; // decimal places of the value
                    let plain = if frac <= 0 {
                        format!("{digits}{}", "0".repeat((-frac) as usize))
                    } else {
                        let f = frac as usize;
                        let padded = format!("{}{digits}", "0".repeat(f.saturating_sub(digits.len()) + 1));
                        format!("{}.{}", &padded[..padded.len() - f], &padded[padded.len() - f..])
                    };
                    let want = Decimal::from_str_exact(&plain).unwrap();
                    for written in [format!("{mantissa}E{exp:+}"), format!("{mantissa}e{exp}")] {
                        let got = exact_decimal(&written).unwrap_or_else(|e| panic!("{written}: {e}"));
                        assert_eq!(got, want, "{written} is {plain}");
                        assert_eq!(got.scale(), want.scale(), "{written} keeps the scale of {plain}");
                        n += 1;
                    }
                }
            }
        }
        assert!(n > 1_000);
    }

    #[test]
    fn string_fields_with_json_escapes_are_unescaped() {
        let p = ok(&format!(r#"{{{BASE},"used_amount":"1\u002e5","timestamp":"2026-11-22T10:00:00\u002e123Z"}}"#));
        assert_eq!((p.used_amount.to_string().as_str(), p.event_time), ("1.5", 1_795_341_600_123));
        assert_eq!(reason(format!(r#"{{{BASE},"used_amount":"1\"5"}}"#).as_bytes()), RejectReason::InvalidAmount);
    }

    #[test]
    fn go_ingestor_aliases_are_accepted() {
        let p = ok(r#"{"tenant_id":"t","product_sku":"s","use_unity":"requests","used_ammount":3}"#);
        assert_eq!((p.use_unit.as_str(), p.used_amount), ("requests", Decimal::from(3)));
    }

    #[test]
    fn timestamps_default_to_record_time_and_accept_epoch_ms() {
        assert_eq!(ok(&format!(r#"{{{BASE},"used_amount":1}}"#)).event_time, 1_000);
        assert_eq!(ok(&format!(r#"{{{BASE},"used_amount":1,"timestamp":1795341600123}}"#)).event_time, 1_795_341_600_123);
        assert_eq!(ok(&format!(r#"{{{BASE},"used_amount":1,"timestamp":"1795341600123"}}"#)).event_time, 1_795_341_600_123);
        let no_record_time = RecordContext { record_time_ms: None, ..CTX };
        let err = validate(format!(r#"{{{BASE},"used_amount":1}}"#).as_bytes(), &no_record_time).unwrap_err();
        assert_eq!(err.reason, RejectReason::BadTimestamp);
    }

    #[test]
    fn a_bad_identifier_names_its_first_bad_character() {
        let err = validate(r#"{"tenant_id":"acmé-1 x","product_sku":"s","use_unit":"u","used_amount":1}"#.as_bytes(), &CTX).unwrap_err();
        assert_eq!(err.reason, RejectReason::InvalidField);
        assert!(err.detail.starts_with("tenant_id contains 'é';"), "{}", err.detail);
    }

    #[test]
    fn missing_pulse_id_is_deterministic_from_the_source_position() {
        let a = ok(&format!(r#"{{{BASE},"used_amount":1}}"#));
        assert_eq!(a.pulse_id, a.object_id);
    }

    #[test]
    fn each_invalid_kind_has_its_reason() {
        let long = "x".repeat(129);
        let cases: Vec<(Vec<u8>, RejectReason)> = vec![
            (b"not json".to_vec(), RejectReason::InvalidJson),
            (b"{\"tenant_id\":".to_vec(), RejectReason::InvalidJson),
            (b"[1,2]".to_vec(), RejectReason::InvalidJson),
            (b"".to_vec(), RejectReason::InvalidJson),
            (vec![0xff, 0xfe], RejectReason::InvalidJson),
            (br#"{"product_sku":"s","use_unit":"u","used_amount":1}"#.to_vec(), RejectReason::MissingField),
            (br#"{"tenant_id":null,"product_sku":"s","use_unit":"u","used_amount":1}"#.to_vec(), RejectReason::MissingField),
            (format!(r#"{{{BASE}}}"#).into_bytes(), RejectReason::MissingField),
            (br#"{"tenant_id":7,"product_sku":"s","use_unit":"u","used_amount":1}"#.to_vec(), RejectReason::InvalidField),
            (br#"{"tenant_id":"a b","product_sku":"s","use_unit":"u","used_amount":1}"#.to_vec(), RejectReason::InvalidField),
            (br#"{"tenant_id":"","product_sku":"s","use_unit":"u","used_amount":1}"#.to_vec(), RejectReason::InvalidField),
            (format!(r#"{{"tenant_id":"{long}","product_sku":"s","use_unit":"u","used_amount":1}}"#).into_bytes(), RejectReason::FieldTooLong),
            (format!(r#"{{{BASE},"used_amount":1,"attributes":["region"]}}"#).into_bytes(), RejectReason::InvalidField),
            (format!(r#"{{{BASE},"used_amount":1,"attributes":"eu"}}"#).into_bytes(), RejectReason::InvalidField),
            (format!(r#"{{{BASE},"used_amount":1,"attributes":{{"region":}}}}"#).into_bytes(), RejectReason::InvalidJson),
            (format!(r#"{{{BASE},"used_amount":"-1.5"}}"#).into_bytes(), RejectReason::NegativeAmount),
            (format!(r#"{{{BASE},"used_amount":-0.01}}"#).into_bytes(), RejectReason::NegativeAmount),
            (format!(r#"{{{BASE},"used_amount":"12,5"}}"#).into_bytes(), RejectReason::InvalidAmount),
            (format!(r#"{{{BASE},"used_amount":"NaN"}}"#).into_bytes(), RejectReason::InvalidAmount),
            (format!(r#"{{{BASE},"used_amount":true}}"#).into_bytes(), RejectReason::InvalidAmount),
            (format!(r#"{{{BASE},"used_amount":1e400}}"#).into_bytes(), RejectReason::InvalidAmount),
            (format!(r#"{{{BASE},"used_amount":"99999999999999999999999999999999"}}"#).into_bytes(), RejectReason::InvalidAmount),
            (format!(r#"{{{BASE},"used_amount":1,"timestamp":"yesterday"}}"#).into_bytes(), RejectReason::BadTimestamp),
            (format!(r#"{{{BASE},"used_amount":1,"timestamp":1.5}}"#).into_bytes(), RejectReason::BadTimestamp),
            (format!(r#"{{{BASE},"used_amount":1,"timestamp":-5}}"#).into_bytes(), RejectReason::BadTimestamp),
            (vec![0, 0, 0, 0, 1, 2], RejectReason::UnknownSchema),
            (vec![0, 0, 1], RejectReason::InvalidAvro),
        ];
        for (input, want) in cases {
            assert_eq!(reason(&input), want, "input {:?}", String::from_utf8_lossy(&input));
        }
    }
}
