//! `pulses topology`: prints what `pulses run` with the same configuration runs.

use clap::{Args, ValueEnum};

use super::CommonArgs;
use crate::stage::topology::{self, Topology};

#[derive(Debug, Args)]
pub struct TopologyArgs {
    #[command(flatten)]
    common: CommonArgs,
    /// `text` for people; `mermaid` for a flowchart to paste into Markdown (```mermaid)
    #[arg(long, value_enum, default_value = "text")]
    format: Format,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Format {
    Text,
    Mermaid,
}

pub fn run(args: TopologyArgs) -> anyhow::Result<()> {
    let cfg = args.common.load()?;
    let out = match args.format {
        Format::Text => topology::text(&Topology::of(&cfg)),
        Format::Mermaid => topology::mermaid(&Topology::of(&cfg)),
    };
    print!("{out}");
    Ok(())
}
