//! `pulses replay`: bounded re-computation of aggregates (see [`crate::replay`]).

use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Args;

use super::CommonArgs;
use crate::config::parse_duration;
use crate::kafka::admin::{ensure_topics, partition_count, TopicSpec};
use crate::kafka::startup;
use crate::pulse::time;
use crate::replay::{self, ReplaySettings};

/// The long `--help` text of the command.
pub const LONG_ABOUT: &str = "\
    Re-processes the source topic from T0 (Kafka offsets-for-time on record timestamps) to the end \
    of each partition at start, or to its first record with a timestamp at or after T1 + retention \
    (late pulses that corrected live windows are read too), with the live decoding (JSON and Avro), \
    validation, windows, de-duplication and aggregate ids, and fresh temporary state (deleted at \
    exit); windows are chosen by event time. Writes the final aggregates of every window inside \
    [T0, T1) to the replay topic, in output_format like the live aggregates: \
    windows that start before T0 or end after T1 are not written. At the end of the input the \
    watermark jumps to T1 (without --to, to infinity), closing every window that ends by then. \
    Partitions are assigned, not subscribed, and no offset is committed: the live consumer groups \
    are untouched. Prints a progress line on stderr every --progress-interval and a summary \
    (pulses read, aggregates written, elapsed) on stdout at the end.";

#[derive(Debug, Args)]
pub struct ReplayArgs {
    #[command(flatten)]
    common: CommonArgs,
    /// T0: start of the replay, RFC 3339 (2026-11-22T10:00:00Z) or epoch milliseconds
    #[arg(long, value_name = "T0", value_parser = parse_time)]
    from: i64,
    /// T1: exclusive end, RFC 3339 or epoch milliseconds [default: the log end at start]
    #[arg(long, value_name = "T1", value_parser = parse_time)]
    to: Option<i64>,
    /// Topic the aggregates are written to; created if missing, with the partition count
    /// of the aggregated topic [config default: tenant.aggregated.pulses.amount.replay]
    #[arg(long, env = "PULSES_REPLAY_TOPIC", value_name = "TOPIC")]
    output_topic: Option<String>,
    /// Compute only these configured windows, comma-separated (e.g. minute,hour)
    /// [default: every `[[windows]]` entry]
    #[arg(long, value_delimiter = ',', value_name = "NAMES")]
    windows: Vec<String>,
    /// Time between two progress lines on stderr, e.g. 5s or 1m
    #[arg(long, value_name = "DURATION", value_parser = parse_duration, default_value = "5s")]
    progress_interval: Duration,
}

/// RFC 3339 or epoch milliseconds.
fn parse_time(s: &str) -> Result<i64, String> {
    if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) {
        return s.parse().map_err(|_| format!("{s:?} is too large for epoch milliseconds"));
    }
    time::parse_rfc3339_ms(s).ok_or_else(|| format!("{s:?} is neither RFC 3339 (2026-11-22T10:00:00Z) nor epoch milliseconds"))
}

pub fn run(args: ReplayArgs) -> anyhow::Result<()> {
    let mut cfg = args.common.load()?;
    if let Some(t) = args.output_topic {
        cfg.topics.replay = t;
    }
    if !args.windows.is_empty() {
        for name in &args.windows {
            if !cfg.windows.iter().any(|w| &w.name == name) {
                bail!("--windows: {name:?} is not a configured window");
            }
        }
        cfg.windows.retain(|w| args.windows.contains(&w.name));
    }
    if args.to.is_some_and(|to| to <= args.from) {
        bail!("--to must be after --from");
    }
    if [&cfg.topics.source, &cfg.topics.aggregated, &cfg.topics.grouped].contains(&&cfg.topics.replay) {
        bail!("the replay topic {} is a live topic; choose another --output-topic", cfg.topics.replay);
    }
    cfg.check()?;
    let rt = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    let shutdown = super::shutdown_on_signal(&rt);
    let no_probe = |_| {};
    super::connect(&cfg, &no_probe)?;
    let partitions = startup::retry("reading the aggregated (or source) topic", cfg.startup_timeout, &no_probe, || {
        match partition_count(&cfg, &cfg.topics.aggregated) {
            // Not allowed to see it is not the same as not there: say so.
            Err(denied @ crate::kafka::admin::AdminError::Denied(_)) => Err(denied),
            Ok(n) => Ok(n),
            Err(_) => partition_count(&cfg, &cfg.topics.source),
        }
    })
    .context("reading the partition count of the aggregated (or source) topic")?;
    let replay_topic = [TopicSpec { name: &cfg.topics.replay, partitions, configs: &[] }];
    startup::retry("creating the replay topic", cfg.startup_timeout, &no_probe, || rt.block_on(ensure_topics(&cfg, &replay_topic)))
        .context("creating the replay topic")?;
    let settings = ReplaySettings {
        from_ms: args.from,
        to_ms: args.to,
        output_topic: cfg.topics.replay.clone(),
        progress_every: args.progress_interval,
    };
    let started = Instant::now();
    let progress = |read: u64, total: u64, written: u64| {
        let pct = if total == 0 { 100.0 } else { read as f64 * 100.0 / total as f64 };
        eprintln!("replay: {read} of at most {total} records read ({pct:.0}%), {written} aggregates written, {:.0} s",
            started.elapsed().as_secs_f64());
    };
    let s = replay::run(&cfg, &settings, &shutdown, progress)?;
    println!(
        "replay: read {} pulses from {} partitions of {} ({} invalid, {} duplicates, {} late), wrote {} aggregates to {} \
         ({} windows outside [T0, T1) not written) in {:.2} s",
        s.read, s.partitions, cfg.topics.source, s.rejected, s.duplicates, s.late, s.written, cfg.topics.replay, s.outside,
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::parse_time;

    #[test]
    fn times_are_rfc3339_or_epoch_milliseconds() {
        assert_eq!(parse_time("2026-11-22T10:00:00Z"), Ok(1_795_341_600_000));
        assert_eq!(parse_time("2026-11-22T11:00:00.5+01:00"), Ok(1_795_341_600_500));
        assert_eq!(parse_time("1795341600000"), Ok(1_795_341_600_000));
        assert!(parse_time("yesterday").is_err());
        assert!(parse_time("").is_err());
        assert!(parse_time("99999999999999999999").is_err());
    }
}
