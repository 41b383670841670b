//! `pulses bench`: end-to-end benchmark against the broker (see [`crate::bench`]).

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Args, ValueEnum};

use super::CommonArgs;
use crate::bench::driver::{self, Plan};
use crate::bench::report::{render_table, BenchReport};
use crate::config::{parse_duration, Guarantee};

pub const LONG_ABOUT: &str = "\
End-to-end benchmark against the broker. For each processing guarantee it creates fresh
topics (bench-<unix ms>-<guarantee>.source/.grouped/.aggregated/.dlq/.late and the
changelog), starts a child `pulses run` with both stages, waits until it is ready, then
produces N stub pulses (as fast as the broker takes them, or paced with --rate; event
time = record time = produce time) while the processor runs, and reads the final aggregates with a
read_committed consumer until both windows (inflight 1s, postflight 10s) count all N.

Reported per guarantee: throughput (N / first pulse sent -> stage 2 has read all N and
committed the batch holding the last one), end-to-end latency p50/p99 (a final
aggregate seen by the reader minus its last_event_time; only windows that close on
data, i.e. that ended at least the grace before the last pulse: the trailing ones wait
for the idle timeout and are counted apart), window-close delay p50/p99
(the processor's pulses_window_close_delay_seconds histogram, interpolated), CPU
seconds per million pulses (user+sys of the `pulses run` process from ready to the end
of processing) and its peak RSS (VmHWM). Before the runs, the broker alone: the same
producer to a fresh topic, and a plain consumer reading it back.

Topics are deleted afterwards unless --keep-topics. Linux only (/proc).";

#[derive(Debug, Args)]
pub struct BenchArgs {
    #[command(flatten)]
    common: CommonArgs,
    /// Pulses to produce per run
    #[arg(long, default_value_t = 1_000_000, value_name = "N")]
    pulses: u64,
    /// Produce at this many pulses per second (a latency run below the sustainable
    /// throughput) [default: as fast as the broker takes them, a burst]
    #[arg(long, value_name = "PULSES_PER_S")]
    rate: Option<f64>,
    /// Process id of the broker, when it runs on this machine: its CPU time over the
    /// same interval is reported too
    #[arg(long, value_name = "PID")]
    broker_pid: Option<u32>,
    /// Distinct tenants of the stub pulses
    #[arg(long, default_value_t = 10)]
    tenants: usize,
    /// Distinct (product_sku, use_unit) products of the stub pulses
    #[arg(long, default_value_t = 4)]
    skus: usize,
    /// Partitions of every bench topic
    #[arg(long, default_value_t = 6, value_name = "N")]
    partitions: i32,
    /// Which processing guarantee(s) to run
    #[arg(long, value_name = "MODE", default_value = "both")]
    guarantee: Which,
    /// Grace of the windows in the processor's configuration (the SPEC default 5s would
    /// add 4 s to every end-to-end latency)
    #[arg(long, default_value = "1s", value_parser = parse_duration, value_name = "DURATION")]
    grace: Duration,
    /// Idle timeout of the processor: after the last pulse, trailing windows close this
    /// long later
    #[arg(long, default_value = "2s", value_parser = parse_duration, value_name = "DURATION")]
    idle_timeout: Duration,
    /// Give up a run (or the broker baseline) after this long
    #[arg(long, default_value = "10m", value_parser = parse_duration, value_name = "DURATION")]
    timeout: Duration,
    /// Skip the broker-alone baseline (produce and consume without pulses)
    #[arg(long)]
    no_baseline: bool,
    /// Keep the bench topics instead of deleting them
    #[arg(long)]
    keep_topics: bool,
    /// What stdout gets: the table or the JSON report
    #[arg(long, value_name = "FORMAT", default_value = "table")]
    format: Format,
    /// Also write the JSON report to this file
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
    /// Directory for the processor's state and log (removed after a successful run)
    /// [default: the system temp directory]
    #[arg(long, value_name = "DIR")]
    work_dir: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Which {
    #[value(name = "exactly_once")]
    ExactlyOnce,
    #[value(name = "at_least_once")]
    AtLeastOnce,
    Both,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Format {
    Table,
    Json,
}

pub fn run(args: BenchArgs) -> anyhow::Result<()> {
    if args.pulses == 0 || args.partitions < 1 {
        bail!("--pulses and --partitions must be at least 1");
    }
    if matches!(args.rate, Some(r) if !(r > 0.0 && r.is_finite())) {
        bail!("--rate must be a positive number of pulses per second");
    }
    let plan = Plan {
        cfg: args.common.load()?,
        pulses: args.pulses,
        rate: args.rate,
        broker_pid: args.broker_pid,
        tenants: args.tenants,
        skus: args.skus,
        partitions: args.partitions,
        grace: args.grace,
        idle_timeout: args.idle_timeout,
        timeout: args.timeout,
        keep_topics: args.keep_topics,
        exe: std::env::current_exe().context("locating the pulses binary")?,
        work_dir: args.work_dir.clone().unwrap_or_else(std::env::temp_dir),
    };
    super::connect(&plan.cfg, &|_| {})?;
    let broker = if args.no_baseline {
        None
    } else {
        eprintln!("bench: broker alone, {} pulses", plan.pulses);
        Some(driver::broker_baseline(&plan).context("broker baseline")?)
    };
    let modes = match args.guarantee {
        Which::ExactlyOnce => vec![Guarantee::ExactlyOnce],
        Which::AtLeastOnce => vec![Guarantee::AtLeastOnce],
        Which::Both => vec![Guarantee::ExactlyOnce, Guarantee::AtLeastOnce],
    };
    let mut runs = Vec::new();
    for g in modes {
        eprintln!("bench: {}, {} pulses", g.as_str(), plan.pulses);
        runs.push(driver::run_mode(&plan, g).with_context(|| format!("{} run", g.as_str()))?);
    }
    let report = BenchReport {
        pulses_version: env!("CARGO_PKG_VERSION").to_owned(),
        nproc: std::thread::available_parallelism().map_or(1, |n| n.get()),
        pulses: plan.pulses,
        rate: plan.rate,
        partitions: plan.partitions,
        tenants: plan.tenants,
        skus: plan.skus,
        grace_ms: plan.grace.as_millis() as u64,
        idle_timeout_ms: plan.idle_timeout.as_millis() as u64,
        broker,
        runs,
    };
    let json = serde_json::to_string_pretty(&report)?;
    if let Some(path) = &args.json {
        std::fs::write(path, &json).with_context(|| format!("writing {}", path.display()))?;
    }
    match args.format {
        Format::Table => print!("{}", render_table(&report)),
        Format::Json => println!("{json}"),
    }
    if let Some(bad) = report.runs.iter().find(|r| !r.all_counted) {
        bail!("{}: final aggregates count {} (1s) and {} (10s) pulses, not {}", bad.guarantee, bad.counted_inflight, bad.counted_postflight, bad.produced);
    }
    Ok(())
}
