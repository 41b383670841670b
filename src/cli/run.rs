//! `pulses run`: the processor, stage 1 (group) and stage 2 (aggregate).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::{anyhow, Context};
use clap::{Args, ValueEnum};

use super::CommonArgs;
use crate::config::Config;
use crate::kafka::admin::ensure_topics;
use crate::ops::metrics::Metrics;
use crate::stage::{self, StageError};

#[derive(Debug, Args)]
pub struct RunArgs {
    #[command(flatten)]
    common: CommonArgs,
    /// Which stages this process runs, comma-separated: `group` (source.pulses →
    /// tenant.grouped.pulses + DLQ) and `aggregate` (grouped → windowed aggregates)
    #[arg(long, env = "PULSES_STAGES", value_delimiter = ',', default_value = "group,aggregate")]
    stages: Vec<StageName>,
    /// Partitions for topics pulses creates when they do not exist yet (grouped, DLQ,
    /// aggregated, late); existing topics are never changed
    #[arg(long, env = "PULSES_DEFAULT_PARTITIONS", default_value_t = 6, value_name = "N")]
    default_partitions: i32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum StageName {
    Group,
    Aggregate,
}

type StageFn = fn(&Config, &AtomicBool, Arc<Metrics>) -> Result<(), StageError>;

pub fn run(args: RunArgs) -> anyhow::Result<()> {
    let cfg = args.common.load()?;
    let rt = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    let shutdown = super::shutdown_on_signal(&rt);
    let t = &cfg.topics;
    let n = args.default_partitions;
    rt.block_on(ensure_topics(&cfg, &[(&t.grouped, n), (&t.dlq, n), (&t.aggregated, n), (&t.late, n)]))
        .context("creating output topics")?;
    let metrics = Arc::new(Metrics::default());
    let mut threads = Vec::new();
    for stage in dedup(&args.stages) {
        let (name, f): (&str, StageFn) = match stage {
            StageName::Group => ("group", stage::group::run),
            StageName::Aggregate => ("aggregate", stage::aggregate::run),
        };
        let (cfg, shutdown, metrics) = (cfg.clone(), Arc::clone(&shutdown), Arc::clone(&metrics));
        let handle = std::thread::Builder::new()
            .name(format!("stage-{name}"))
            .spawn(move || {
                let result = f(&cfg, &shutdown, metrics);
                // A failed stage stops the others: better a restart than half a pipeline.
                shutdown.store(true, Ordering::Release);
                result
            })
            .with_context(|| format!("starting stage {name}"))?;
        threads.push((name, handle));
    }
    let mut first_error = None;
    for (name, handle) in threads {
        let result = handle.join().map_err(|_| anyhow!("stage {name} panicked"))?;
        if let Err(e) = result {
            first_error.get_or_insert(anyhow::Error::new(e).context(format!("stage {name}")));
        }
    }
    first_error.map_or(Ok(()), Err)
}

fn dedup(stages: &[StageName]) -> Vec<StageName> {
    let mut out = Vec::new();
    for s in stages {
        if !out.contains(s) {
            out.push(*s);
        }
    }
    out
}
