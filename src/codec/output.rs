//! Encoding the stages' output values in the configured `output_format`.

use apache_avro::schema::Schema;
use apache_avro::types::Value;

use super::avro;
use crate::config::OutputFormat;
use crate::pulse::wire;
use crate::registry::{Registry, RegistryError, Wait};

/// How one output topic's values are written.
#[derive(Debug)]
pub enum OutputCodec {
    Json,
    /// Confluent wire format with the schema registered for the topic.
    Avro { schema_id: u32, schema: Schema },
}

/// An output value could not be encoded: nothing is written for it, and the batch
/// holding it fails (never an empty or partial value).
#[derive(Debug, thiserror::Error)]
pub enum EncodeError {
    #[error("encoding a JSON value: {0}")]
    Json(#[from] serde_json::Error),
    /// The value does not fit the topic's registered schema.
    #[error("encoding an Avro value for schema id {schema_id}: {detail}")]
    Avro { schema_id: u32, detail: String },
}

impl OutputCodec {
    /// The codec for values of `topic`. With Avro this registers `schema` (or looks up the
    /// subject's latest version) once, at start, waiting out a registry outage within
    /// the retry budget; afterwards encoding needs no registry.
    pub fn new(
        format: OutputFormat,
        registry: Option<&Registry>,
        topic: &str,
        schema: &str,
        auto_register: bool,
        wait: Wait<'_>,
    ) -> Result<Self, RegistryError> {
        match (format, registry) {
            (OutputFormat::Json, _) => Ok(Self::Json),
            (OutputFormat::Avro, None) => Err(RegistryError::Setup("output_format avro needs a schema registry url".into())),
            (OutputFormat::Avro, Some(r)) => {
                let registered = r.value_schema(topic, schema, auto_register, wait)?;
                tracing::info!(topic, subject = %format!("{topic}-value"), schema_id = registered.id, "Avro output schema");
                Ok(Self::Avro { schema_id: registered.id, schema: registered.parsed.clone() })
            }
        }
    }

    /// The value bytes: `json()` or the Confluent framing of `avro()`.
    pub fn encode(
        &self,
        json: impl FnOnce() -> Result<Vec<u8>, serde_json::Error>,
        avro: impl FnOnce() -> Value,
    ) -> Result<Vec<u8>, EncodeError> {
        match self {
            Self::Json => Ok(json()?),
            Self::Avro { schema_id, schema } => avro::write_datum(schema, avro())
                .map(|datum| wire::confluent(*schema_id, &datum))
                .map_err(|e| EncodeError::Avro { schema_id: *schema_id, detail: e.to_string() }),
        }
    }
}
