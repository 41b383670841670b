//! Decoding the stages' input: JSON or Avro, told apart by the wire format.

use std::sync::Arc;

use super::{Registry, RegistryError, Wait};
use crate::pulse::avro;
use crate::pulse::json::decode_grouped;
use crate::pulse::validate::{normalise, validate, RecordContext};
use crate::pulse::wire::{self, Wire};
use crate::pulse::{GroupedPulse, RejectReason, Rejection};

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
            Err(e @ RegistryError::Prepare(_)) => return Err(e),
            Err(e) => return Ok(Err(Rejection::new(RejectReason::UnknownSchema, e.to_string()))),
        };
        Ok(avro::decode_record(&schema.parsed, body)
            .and_then(|value| avro::pulse_from_record(&schema.parsed, value))
            .and_then(|pulse| normalise(pulse.raw(), ctx)))
    }
}

/// Why stage 2 cannot read a grouped record.
#[derive(Debug, thiserror::Error)]
pub enum GroupedError {
    /// Not a grouped pulse: set aside (late topic), the stage goes on.
    #[error("{0}")]
    Invalid(String),
    /// The registry is unavailable: the stage stops uncommitted rather than skip a pulse.
    #[error(transparent)]
    Registry(RegistryError),
}

/// Stage 2's decoder of `tenant.grouped.pulses` values.
#[derive(Debug)]
pub struct GroupedInput {
    registry: Option<Arc<Registry>>,
}

impl GroupedInput {
    pub fn new(registry: Option<Arc<Registry>>) -> Self {
        Self { registry }
    }

    pub fn decode(&self, bytes: &[u8], wait: Wait<'_>) -> Result<GroupedPulse, GroupedError> {
        let invalid = |e: &dyn std::fmt::Display| GroupedError::Invalid(e.to_string());
        match wire::detect(bytes).map_err(|r| invalid(&r.detail))? {
            Wire::Json(json) => decode_grouped(json).map_err(|e| invalid(&e)),
            Wire::Avro { schema_id, body } => {
                let Some(registry) = &self.registry else {
                    return Err(invalid(&format!("Avro grouped pulse (schema id {schema_id}) but no schema registry is configured")));
                };
                let schema = registry.schema(schema_id, wait).map_err(|e| match e {
                    RegistryError::Refused(d) => GroupedError::Invalid(d),
                    e => GroupedError::Registry(e),
                })?;
                let value = avro::decode_record(&schema.parsed, body).map_err(|r| invalid(&r.detail))?;
                avro::grouped_from_value(value).map_err(|e| invalid(&e))
            }
        }
    }
}
