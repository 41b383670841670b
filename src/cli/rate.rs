//! `pulses rate`: the reference rating consumer (see [`crate::rate`]).

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;

use super::CommonArgs;
use crate::kafka::admin::{ensure_topics, partition_count, TopicSpec};
use crate::kafka::startup;
use crate::rate::consumer::{self, RateSettings};
use crate::rate::PriceBook;

/// The long `--help` text of the command.
pub const LONG_ABOUT: &str = "\
    Reads the final aggregates of one window size from the aggregated topic (consumer group \
    `<group_id>.rate`, read_committed), prices them with the price book, and writes charges and \
    spend-threshold alerts. A higher revision of an aggregate is charged the difference to what was \
    charged before; a re-delivered revision is charged nothing. Balances are per tenant and UTC \
    calendar month. Charges, alerts and consumed offsets commit in one transaction; state lives in \
    `<state_dir>/rate`. Run one instance per application id.\n\nAggregates whose (product_sku, \
    use_unit) has no price in the book are logged as warnings and counted in the exit summary, not \
    charged. Charge and alert records are described in the README.";

#[derive(Debug, Args)]
pub struct RateArgs {
    #[command(flatten)]
    common: CommonArgs,
    /// Price book: prices per (product_sku, use_unit), currency, rounding, thresholds
    #[arg(long, env = "PULSES_PRICE_BOOK", value_name = "FILE", default_value = "topology/price-book.toml")]
    price_book: PathBuf,
    /// Window size whose final records are rated (a `[[windows]]` name)
    #[arg(long, env = "PULSES_RATE_WINDOW", value_name = "NAME", default_value = "minute")]
    window: String,
    /// Topic charges are written to [config default: tenant.rated.charges]
    #[arg(long, env = "PULSES_CHARGES_TOPIC", value_name = "TOPIC")]
    charges_topic: Option<String>,
    /// Topic threshold alerts are written to [config default: tenant.usage.alerts]
    #[arg(long, env = "PULSES_ALERTS_TOPIC", value_name = "TOPIC")]
    alerts_topic: Option<String>,
}

pub fn run(args: RateArgs) -> anyhow::Result<()> {
    let mut cfg = args.common.load()?;
    if let Some(t) = args.charges_topic {
        cfg.topics.charges = t;
    }
    if let Some(t) = args.alerts_topic {
        cfg.topics.alerts = t;
    }
    cfg.check()?;
    let book = PriceBook::from_file(&args.price_book)?;
    if !cfg.windows.iter().any(|w| w.name == args.window) {
        let names: Vec<&str> = cfg.windows.iter().map(|w| w.name.as_str()).collect();
        anyhow::bail!("--window {:?} is not a configured window ({})", args.window, names.join(", "));
    }
    let rt = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    let shutdown = super::shutdown_on_signal(&rt);
    let no_probe = |_| {};
    let n = startup::retry("reading the aggregated topic", cfg.startup_timeout, &no_probe, || {
        partition_count(&cfg, &cfg.topics.aggregated)
    })
    .context("reading the aggregated topic")?;
    let t = &cfg.topics;
    let spec = |name| TopicSpec { name, partitions: n, configs: &[] };
    startup::retry("creating the output topics", cfg.startup_timeout, &no_probe, || {
        rt.block_on(ensure_topics(&cfg, &[spec(&t.charges), spec(&t.alerts)]))
    })
    .context("creating the output topics")?;
    let settings = RateSettings { book, window: args.window, charges_topic: t.charges.clone(), alerts_topic: t.alerts.clone() };
    let s = consumer::run(&cfg, &settings, &shutdown)?;
    eprintln!(
        "rate: read {} aggregates, wrote {} charges and {} alerts ({} not final or other windows, {} already charged, \
         {} unpriced, {} beyond exact decimals, {} undecodable; {} re-applied at start)",
        s.read, s.charges, s.alerts, s.ignored, s.already_charged, s.unpriced, s.unrateable, s.undecodable, s.caught_up
    );
    Ok(())
}
