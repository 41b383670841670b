//! `pulses check`: validates the configuration without touching Kafka.

use clap::Args;

use super::CommonArgs;

#[derive(Debug, Args)]
pub struct CheckArgs {
    #[command(flatten)]
    common: CommonArgs,
}

pub fn run(args: CheckArgs) -> anyhow::Result<()> {
    let cfg = args.common.load()?;
    println!("configuration OK\n{cfg:#?}");
    Ok(())
}
