//! The pulse model: what a producer sends (`RawPulse`, decoded in [`json`] or in Avro
//! by [`crate::codec::avro`], told apart by [`wire`]), what
//! validation makes of it ([`validate`]) and what stage 1 writes to the grouped topic
//! ([`GroupedPulse`]). Plain types only: no Kafka, no RocksDB.

pub mod decimal;
pub mod ids;
pub mod json;
pub mod time;
pub mod validate;
pub mod wire;

use std::fmt;

use rust_decimal::Decimal;
use serde::{Deserialize, Deserializer, Serialize};
use serde_json::value::RawValue;

pub use validate::{validate, Rejection, RejectReason};

/// Where a record was read from. Stage 1 derives the deterministic `object_id` (and the
/// fallback `pulse_id`) from it, so a replay of the same input reproduces both.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourceRef {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
}

/// A validated, normalised pulse as written to `tenant.grouped.pulses` (SPEC §3).
///
/// Amounts are exact decimals, serialised as strings so no JSON reader turns them into
/// floats; `event_time` is epoch milliseconds in memory and RFC 3339 (ms, UTC) on the wire.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GroupedPulse {
    pub object_id: String,
    pub pulse_id: String,
    pub tenant_id: String,
    pub product_sku: String,
    pub use_unit: String,
    #[serde(with = "rust_decimal::serde::str")]
    pub used_amount: Decimal,
    #[serde(with = "time::rfc3339_ms")]
    pub event_time: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attributes: Option<Attributes>,
    pub source: SourceRef,
    /// A `latest` meter's event id ([`crate::meter`]): its windows keep the value of the
    /// event with the greatest time, ties broken by this id. Absent for pulses.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latest_id: Option<String>,
}

/// A pulse's free-form `attributes`: a JSON object, kept as its JSON text. pulses only
/// carries them through, so they are checked to be an object but not parsed into a
/// map (which cost three allocations per pulse, a tenth of decoding).
#[derive(Clone, Serialize)]
#[serde(transparent)]
pub struct Attributes(Box<RawValue>);

impl Attributes {
    pub fn from_map(map: &serde_json::Map<String, serde_json::Value>) -> Result<Self, serde_json::Error> {
        serde_json::value::to_raw_value(map).map(Self)
    }

    pub fn to_map(&self) -> Result<serde_json::Map<String, serde_json::Value>, serde_json::Error> {
        serde_json::from_str(self.0.get())
    }

    /// The JSON text, as the producer wrote it.
    pub fn json(&self) -> &str {
        self.0.get()
    }
}

impl<'de> Deserialize<'de> for Attributes {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let raw = Box::<RawValue>::deserialize(d)?;
        if raw.get().starts_with('{') {
            Ok(Self(raw))
        } else {
            Err(serde::de::Error::custom(format!("attributes must be a JSON object, not {}", raw.get())))
        }
    }
}

/// Equal when they hold the same object, however it is spaced.
impl PartialEq for Attributes {
    fn eq(&self, other: &Self) -> bool {
        self.json() == other.json() || matches!((self.to_map(), other.to_map()), (Ok(a), Ok(b)) if a == b)
    }
}

impl fmt::Debug for Attributes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.json())
    }
}
