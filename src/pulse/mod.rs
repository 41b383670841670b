//! The pulse model: what a producer sends (`RawPulse`, decoded in [`json`] or
//! [`avro`], told apart by [`wire`]), what
//! validation makes of it ([`validate`]) and what stage 1 writes to the grouped topic
//! ([`GroupedPulse`]). Plain types only: no Kafka, no RocksDB.

pub mod avro;
pub mod ids;
pub mod json;
pub mod time;
pub mod validate;
pub mod wire;

use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

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
    pub attributes: Option<serde_json::Map<String, serde_json::Value>>,
    pub source: SourceRef,
}
