//! `pulses run`: the processor, stage 1 (group) and stage 2 (aggregate).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::{anyhow, bail, Context};
use clap::{Args, ValueEnum};

use super::CommonArgs;
use crate::config::{Config, Guarantee};
use crate::kafka::admin::{ensure_topics, partition_count, TopicSpec, COMPACTED, DEFAULT_PARTITIONS};
use crate::kafka::startup;
use crate::ops::{http, prometheus};
use crate::ops::metrics::Metrics;
use crate::stage::topology::Topology;
use crate::runtime::{self, StageError};
use crate::stage;

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
    #[arg(long, env = "PULSES_DEFAULT_PARTITIONS", default_value_t = DEFAULT_PARTITIONS, value_name = "N")]
    default_partitions: i32,
    /// `exactly_once`: outputs, state changes and input offsets commit in one Kafka
    /// transaction; `at_least_once`: a crash may re-emit records handled since the last
    /// commit [config default: exactly_once]
    #[arg(long, env = "PULSES_PROCESSING_GUARANTEE", value_name = "MODE")]
    processing_guarantee: Option<Guarantee>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum StageName {
    Group,
    Aggregate,
}

type StageFn = fn(&Config, &AtomicBool, Arc<Metrics>) -> Result<(), StageError>;

pub fn run(args: RunArgs) -> anyhow::Result<()> {
    let mut cfg = args.common.load()?;
    if let Some(g) = args.processing_guarantee {
        cfg.processing_guarantee = g;
    }
    let rt = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    let shutdown = super::shutdown_on_signal(&rt);
    // First, so probes answer (not ready) while topics are set up.
    let metrics = Arc::new(Metrics::default());
    serve_http(&rt, &cfg, &metrics)?;
    crate::ops::telemetry::export_metrics(&metrics);
    let t = &cfg.topics;
    let n = args.default_partitions;
    let plain = |name| TopicSpec { name, partitions: n, configs: &[] };
    let waiting = |why| metrics.ops.readiness.waiting_for_broker(why);
    super::connect(&cfg, &waiting)?;
    startup::retry("creating output topics", cfg.startup_timeout, &waiting, || {
        rt.block_on(ensure_topics(&cfg, &[plain(&t.grouped), plain(&t.dlq), plain(&t.aggregated), plain(&t.late)]))
    })
    .context("creating output topics")?;
    let stages = dedup(&args.stages);
    if stages.contains(&StageName::Aggregate) {
        ensure_changelog(&rt, &cfg, &waiting)?;
    }
    metrics.ops.readiness.expect_stages(stages.iter().map(|s| s.name()));
    let mut threads = Vec::new();
    for stage in stages {
        let name = stage.name();
        let f: StageFn = match stage {
            StageName::Group => stage::group::run,
            StageName::Aggregate => stage::aggregate::run,
        };
        let (cfg, shutdown, metrics) = (cfg.clone(), Arc::clone(&shutdown), Arc::clone(&metrics));
        let handle = std::thread::Builder::new()
            .name(format!("stage-{name}"))
            .spawn(move || {
                let topology = Topology::of(&cfg);
                let (input, group) = match stage {
                    StageName::Group => (&topology.group.input, &topology.group.consumer_group),
                    StageName::Aggregate => (&topology.aggregate.input, &topology.aggregate.consumer_group),
                };
                let identity = runtime::Identity {
                    cfg: &cfg,
                    input,
                    consumer_group: group,
                    transactional_ids: format!("{}-{name}-", cfg.application_id),
                };
                let result =
                    runtime::supervise(name, &identity, &shutdown, &metrics, || f(&cfg, &shutdown, Arc::clone(&metrics)));
                // A stage failed beyond repair stops the others: better a restart than
                // half a pipeline.
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

/// Creates stage 2's changelog topic with one partition per grouped partition
/// (partition p restores store p), and refuses a mismatch.
fn ensure_changelog(rt: &tokio::runtime::Runtime, cfg: &Config, waiting: &dyn Fn(Option<String>)) -> anyhow::Result<()> {
    let wiring = Topology::of(cfg).aggregate;
    let (grouped, changelog) = (&wiring.input, &wiring.changelog);
    let grouped_partitions = startup::retry("reading the grouped topic", cfg.startup_timeout, waiting, || partition_count(cfg, grouped))
        .context("reading the grouped topic")?;
    startup::retry("creating the changelog topic", cfg.startup_timeout, waiting, || {
        rt.block_on(ensure_topics(cfg, &[TopicSpec { name: changelog, partitions: grouped_partitions, configs: COMPACTED }]))
    })
    .context("creating the changelog topic")?;
    let changelog_partitions = partition_count(cfg, changelog).context("reading the changelog topic")?;
    if changelog_partitions != grouped_partitions {
        bail!("changelog topic {changelog} has {changelog_partitions} partitions but {grouped} has {grouped_partitions}; \
               they must match (delete the changelog to rebuild it, or use a new application id)");
    }
    Ok(())
}

impl StageName {
    fn name(self) -> &'static str {
        match self {
            Self::Group => "group",
            Self::Aggregate => "aggregate",
        }
    }
}

/// Starts `/metrics`, `/healthz` and `/readyz` on `http_addr`; failing to bind stops
/// the start (a replica nobody can probe would be restarted by Kubernetes anyway).
fn serve_http(rt: &tokio::runtime::Runtime, cfg: &Config, metrics: &Arc<Metrics>) -> anyhow::Result<()> {
    let listener = rt.block_on(http::bind(&cfg.http_addr))?;
    if let Some(addr) = http::local_addr(&listener) {
        tracing::info!(%addr, "HTTP endpoint listening on http://{addr} (/metrics /healthz /readyz)");
    }
    let registry = Arc::new(prometheus::pipeline_registry(Arc::clone(metrics), cfg));
    let readiness = Arc::clone(metrics);
    let app = http::ops_only(http::Ops { registry, ready: Arc::new(move || readiness.ops.readiness.status()) });
    // Until the process exits: probes answer while the stages stop.
    rt.spawn(async move {
        if let Err(e) = http::serve(listener, app, std::future::pending()).await {
            tracing::error!("HTTP endpoint stopped: {e}");
        }
    });
    Ok(())
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
