//! JSON codec for pulses. Decoding borrows from the record bytes where it can and keeps
//! `used_amount` and `timestamp` as raw JSON text, so a number like `12.50` reaches
//! [`rust_decimal`] digit for digit instead of passing through an `f64`.

use std::borrow::Cow;

use serde::Deserialize;
use serde_json::value::RawValue;

use super::{Attributes, GroupedPulse, RejectReason, Rejection};

/// A pulse as a producer wrote it, before validation. Field names of the original Go
/// ingestor (`used_ammount`, `use_unity`) are accepted as aliases (SPEC §3).
#[derive(Debug, Deserialize)]
pub struct RawPulse<'a> {
    #[serde(borrow, default)]
    pub pulse_id: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    pub tenant_id: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    pub product_sku: Option<Cow<'a, str>>,
    #[serde(borrow, default, alias = "use_unity")]
    pub use_unit: Option<Cow<'a, str>>,
    #[serde(borrow, default, alias = "used_ammount")]
    pub used_amount: Option<&'a RawValue>,
    #[serde(borrow, default)]
    pub timestamp: Option<&'a RawValue>,
    #[serde(default)]
    pub attributes: Option<Attributes>,
}

/// Decodes the JSON value of a `source.pulses` record.
///
/// Malformed JSON (or anything but an object) is `invalid_json`; well-formed JSON with a
/// field of the wrong type (say `"tenant_id": 7`) is `invalid_field`.
pub fn decode_pulse(bytes: &[u8]) -> Result<RawPulse<'_>, Rejection> {
    let first = bytes.iter().find(|b| !b.is_ascii_whitespace());
    if first != Some(&b'{') {
        return Err(Rejection::new(RejectReason::InvalidJson, "expected a JSON object"));
    }
    // Validated as UTF-8 at once (SIMD, with an ASCII fast path) rather than string by
    // string as serde_json does for bytes: 8% of decoding.
    let text = std::str::from_utf8(bytes).map_err(|e| Rejection::new(RejectReason::InvalidJson, format!("not UTF-8: {e}")))?;
    serde_json::from_str(text).map_err(|e| {
        let reason = match e.classify() {
            serde_json::error::Category::Data => RejectReason::InvalidField,
            _ => RejectReason::InvalidJson,
        };
        Rejection::new(reason, e.to_string())
    })
}

/// Encodes a grouped pulse as the JSON value written to `tenant.grouped.pulses`.
pub fn encode_grouped(p: &GroupedPulse) -> Result<Vec<u8>, serde_json::Error> {
    serde_json::to_vec(p)
}

/// Decodes a record of `tenant.grouped.pulses`.
pub fn decode_grouped(bytes: &[u8]) -> Result<GroupedPulse, serde_json::Error> {
    serde_json::from_slice(bytes)
}
