//! `pulses check`: validates the configuration and the Avro schemas without touching
//! Kafka or the schema registry.

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;

use super::CommonArgs;
use crate::codec::avro::{self, check as schemas};

#[derive(Debug, Args)]
pub struct CheckArgs {
    #[command(flatten)]
    common: CommonArgs,
    /// Directory of Avro schemas to check (pulse.avsc, grouped_pulse.avsc,
    /// window_aggregate.avsc, any other *.avsc) besides the copies built into the binary
    /// [default: schemas when it exists]
    #[arg(long, value_name = "DIR")]
    schemas: Option<PathBuf>,
}

pub fn run(args: CheckArgs) -> anyhow::Result<()> {
    let cfg = args.common.load()?;
    schemas::check_texts(avro::PULSE_SCHEMA, avro::GROUPED_SCHEMA, avro::AGGREGATE_SCHEMA)
        .context("the schemas built into this binary")?;
    let dir = args.schemas.or_else(|| Some(PathBuf::from("schemas")).filter(|d| d.is_dir()));
    if let Some(dir) = &dir {
        schemas::check_dir(dir).with_context(|| format!("schemas in {}", dir.display()))?;
    }
    let checked = dir.map(|d| format!(" (and {})", d.display())).unwrap_or_default();
    println!("schemas OK: built-in pulse, grouped_pulse, window_aggregate{checked}");
    println!("configuration OK\n{cfg:#?}");
    Ok(())
}
