//! Decoding what pulses reads: source pulses, and the records it wrote itself (grouped
//! pulses, aggregates); JSON or Avro, told apart by the wire format.

use std::sync::Arc;

use super::avro;
use crate::registry::{Registry, RegistryError, Wait};
use crate::pulse::json::decode_grouped;
use crate::pulse::validate::{normalise, validate, RecordContext};
use crate::pulse::wire::{self, Wire};
use crate::pulse::{GroupedPulse, RejectReason, Rejection};
use crate::rate::records::Charge;
use crate::window::WindowAggregate;

/// Stage 1's decoder of `source.pulses` values.
#[derive(Debug)]
pub struct PulseInput {
    registry: Option<Arc<Registry>>,
}

impl PulseInput {
    pub fn new(registry: Option<Arc<Registry>>) -> Self {
        Self { registry }
    }

    /// Decodes and validates one value: a pulse, or why it goes to the DLQ. While the
    /// registry is down this blocks (bounded, see [`super::retry`]);
    /// `Err(RegistryError::Interrupted)` means shutdown began meanwhile and the record
    /// was not handled (it must not be committed).
    pub fn decode(
        &self,
        bytes: &[u8],
        ctx: &RecordContext<'_>,
        wait: Wait<'_>,
    ) -> Result<Result<GroupedPulse, Rejection>, RegistryError> {
        let (schema_id, body, registry) = match (wire::detect(bytes), &self.registry) {
            (Ok(Wire::Avro { schema_id, body }), Some(registry)) => (schema_id, body, registry),
            // JSON, a truncated header, or Avro without a registry (unknown_schema).
            _ => return Ok(validate(bytes, ctx)),
        };
        let schema = match registry.schema(schema_id, wait) {
            Ok(schema) => schema,
            Err(RegistryError::Interrupted) => return Err(RegistryError::Interrupted),
            Err(e @ RegistryError::Unavailable { .. }) => {
                return Ok(Err(Rejection::new(RejectReason::RegistryUnavailable, e.to_string())))
            }
            Err(RegistryError::WouldWait) => return Err(RegistryError::WouldWait),
            Err(e) => return Ok(Err(Rejection::new(RejectReason::UnknownSchema, e.to_string()))),
        };
        Ok(avro::decode_record(&schema.parsed, body)
            .and_then(|value| avro::pulse_from_record(&schema.parsed, value))
            .and_then(|pulse| normalise(pulse.raw(), ctx)))
    }
}

/// Why a record pulses wrote (a grouped pulse, an aggregate) cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum InputError {
    /// Not such a record: set aside or counted, visibly; the reader goes on.
    #[error("{0}")]
    Invalid(String),
    /// The registry is unavailable: the reader stops uncommitted rather than skip a
    /// record that may count.
    #[error(transparent)]
    Registry(RegistryError),
}

/// The decoder of a topic pulses writes in its `output_format` (JSON, or Avro in the
/// Confluent wire format): stage 2 reads grouped pulses with it, `pulses rate`
/// aggregates. The wire format of each value decides, so a topic written in JSON and
/// then in Avro (an `output_format` change) reads whole.
pub struct RecordInput<T> {
    registry: Option<Arc<Registry>>,
    what: &'static str,
    json: fn(&[u8]) -> Result<T, String>,
    avro: fn(apache_avro::types::Value) -> Result<T, avro::ReadError>,
}

impl<T> std::fmt::Debug for RecordInput<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RecordInput").field("what", &self.what).field("registry", &self.registry.is_some()).finish()
    }
}

/// Stage 2's decoder of `tenant.grouped.pulses` values.
pub type GroupedInput = RecordInput<GroupedPulse>;
/// `pulses rate`'s decoder of `tenant.aggregated.pulses.amount` values.
pub type AggregateInput = RecordInput<WindowAggregate>;

impl RecordInput<GroupedPulse> {
    pub fn grouped(registry: Option<Arc<Registry>>) -> Self {
        Self {
            registry,
            what: "grouped pulse",
            json: |b| decode_grouped(b).map_err(|e| e.to_string()),
            avro: avro::grouped_from_value,
        }
    }
}

impl RecordInput<WindowAggregate> {
    pub fn aggregates(registry: Option<Arc<Registry>>) -> Self {
        Self {
            registry,
            what: "aggregate",
            json: |b| WindowAggregate::from_json(b).map_err(|e| e.to_string()),
            avro: avro::aggregate_from_value,
        }
    }
}

/// The charges view's decoder of `tenant.rated.charges` values: JSON, the only format
/// `pulses rate` writes.
pub type ChargeInput = RecordInput<Charge>;

impl RecordInput<Charge> {
    pub fn charges() -> Self {
        Self {
            registry: None,
            what: "charge",
            json: |b| serde_json::from_slice(b).map_err(|e| e.to_string()),
            avro: |_| Err(avro::ReadError("charges are written in JSON only".into())),
        }
    }
}

/// `pulses serve`'s decoder of `tenant.invoices` values (JSON only, as `pulses invoice`
/// writes them).
pub type InvoiceInput = RecordInput<crate::invoice::Invoice>;

impl RecordInput<crate::invoice::Invoice> {
    pub fn invoices() -> Self {
        Self {
            registry: None,
            what: "invoice",
            json: |b| serde_json::from_slice(b).map_err(|e| e.to_string()),
            avro: |_| Err(avro::ReadError("invoices are written in JSON only".into())),
        }
    }
}

impl<T> RecordInput<T> {
    pub fn decode(&self, bytes: &[u8], wait: Wait<'_>) -> Result<T, InputError> {
        let invalid = |e: &dyn std::fmt::Display| InputError::Invalid(e.to_string());
        match wire::detect(bytes).map_err(|r| invalid(&r.detail))? {
            Wire::Json(json) => (self.json)(json).map_err(|e| invalid(&e)),
            Wire::Avro { schema_id, body } => {
                let Some(registry) = &self.registry else {
                    return Err(invalid(&format!(
                        "Avro {} (schema id {schema_id}) but no schema registry is configured",
                        self.what
                    )));
                };
                let schema = registry.schema(schema_id, wait).map_err(|e| match e {
                    RegistryError::Refused(d) => InputError::Invalid(d),
                    e => InputError::Registry(e),
                })?;
                let value = avro::decode_record(&schema.parsed, body).map_err(|r| invalid(&r.detail))?;
                (self.avro)(value).map_err(|e| invalid(&e))
            }
        }
    }
}
