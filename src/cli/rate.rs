//! `pulses rate`: the reference rating consumer (see [`crate::rate`]).

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use clap::Args;

use super::CommonArgs;
use crate::kafka::admin::{ensure_topics, partition_count, TopicSpec, COMPACTED};
use crate::kafka::startup;
use crate::ops::metrics::Metrics;
use crate::rate::PriceBook;
use crate::runtime;
use crate::stage::rate::{self as rating, RateSettings, RateSummary};
use crate::stage::topology::RateWiring;

/// The long `--help` text of the command.
pub const LONG_ABOUT: &str = "\
    Reads the final aggregates of one window size from the aggregated topic (consumer group \
    `<group_id>.rate`, read_committed), prices them with the price book, and writes charges and \
    spend-threshold alerts. A higher revision of an aggregate is charged the difference to what was \
    charged before; a re-delivered revision is charged nothing. Balances are per tenant and UTC \
    calendar month. Any number of instances can run in the group: each assigned partition keeps its \
    ledger in a RocksDB store under `<state_dir>/<application_id>.rate/`, backed by the compacted \
    changelog `<application_id>-rate-ledger-changelog` (created with the aggregated topic's \
    partitions) and restored from it when the partition moves. Charges, alerts, ledger changes and \
    consumed offsets commit in one transaction per commit interval.\n\nAggregates whose (product_sku, \
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
    super::connect(&cfg, &no_probe)?;
    let n = startup::retry("reading the aggregated topic", cfg.startup_timeout, &no_probe, || {
        partition_count(&cfg, &cfg.topics.aggregated)
    })
    .context("reading the aggregated topic")?;
    let wiring = RateWiring::of(&cfg);
    let topics = [
        TopicSpec { name: &wiring.charges, partitions: n, configs: &[] },
        TopicSpec { name: &wiring.alerts, partitions: n, configs: &[] },
        TopicSpec { name: &wiring.changelog, partitions: n, configs: COMPACTED },
    ];
    startup::retry("creating the output topics", cfg.startup_timeout, &no_probe, || rt.block_on(ensure_topics(&cfg, &topics)))
        .context("creating the output topics")?;
    rating::warn_about_old_ledger(&cfg);
    let settings = RateSettings { book, window: args.window };
    let metrics = Arc::new(Metrics::default());
    let mut s = RateSummary::default();
    let identity = runtime::Identity {
        cfg: &cfg,
        input: &wiring.input,
        consumer_group: &wiring.consumer_group,
        transactional_ids: format!("{}-{}-", cfg.application_id, wiring.name),
    };
    runtime::supervise(wiring.name, &identity, &shutdown, &metrics, || {
        rating::run(&cfg, &settings, &shutdown, Arc::clone(&metrics), &mut s)
    })?;
    eprintln!(
        "rate: read {} aggregates, wrote {} charges and {} alerts ({} not final or other windows, {} already charged, \
         {} unpriced, {} beyond exact decimals, {} undecodable; {} ledger changes restored, {} aggregates re-applied \
         to rebuild a ledger)",
        s.read, s.charges, s.alerts, s.ignored, s.already_charged, s.unpriced, s.unrateable, s.undecodable, s.restored,
        s.rebuilt
    );
    Ok(())
}
