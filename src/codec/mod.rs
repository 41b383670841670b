//! How pulses' records look on each topic, read and written the same way by every
//! stage and command (the stages, replay, rate): JSON, or Avro in the Confluent wire
//! format through the schema registry ([`crate::registry`]).
//!
//! - [`input`]: source pulses (decoded, then validated: stage 1, replay) and the
//!   records pulses wrote itself: grouped pulses (stage 2) and aggregates (`pulses
//!   rate`); the wire format of each value decides, so a topic written in JSON and
//!   later in Avro reads whole.
//! - [`output`]: a topic's values in `output_format` (grouped, aggregated, late and
//!   replay topics), Avro registered under `<topic>-value`.
//! - [`avro`]: the Avro mapping of pulses, grouped pulses and aggregates, and the
//!   checks of `schemas/*.avsc` (`pulses check`).

pub mod avro;
pub mod input;
pub mod output;

pub use input::{AggregateInput, ChargeInput, InvoiceInput, GroupedInput, InputError, PulseInput, RecordInput};
pub use output::OutputCodec;
