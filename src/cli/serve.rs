//! `pulses serve`: the HTTP API of SPEC §8 (ingest today) and the operational routes.

use std::sync::Arc;

use anyhow::Context;
use clap::Args;

use super::CommonArgs;
use crate::ops::http;

pub const LONG_ABOUT: &str = "\
Serve the HTTP API (SPEC §8) and the usage dashboard (GET /). POST /v1/pulses takes one pulse or a JSON array of up to
10,000 (5 MiB), checks each as stage 1 does, and answers 202 only once the broker has
acknowledged every one (idempotent producer, acks=all); 503 with Retry-After if it does
not within serve.ack_timeout (retry with the same pulse_ids: they are de-duplicated
downstream). Requests need an X-API-Key from `pulses keys create`; a tenant key may only
write its own tenant's pulses. Also serves /metrics, /healthz and /readyz (ready once the
API keys are loaded). SIGTERM stops accepting, finishes the requests in flight, flushes
the producer and exits 0.

GET /v1/usage (also GET /v1/aggregations) and POST /v1/quota/check answer from this
replica's copy of the aggregates topic (RocksDB under --state-dir/serve-view, resumed
from its stored positions after a restart); GET /v1/charges from its copy of the charges
topic (--state-dir/serve-charges-view); /readyz waits until both have caught up. Quotas
come from --quotas FILE. Settings: the [serve] section of the config file.

OpenMeter's API over the configured [[meters]] (SPEC §10): POST /api/v1/events takes
CloudEvents (application/cloudevents+json, application/cloudevents-batch+json or
application/json; all or nothing, 204 once acknowledged), GET /api/v1/meters[/{slug}]
lists them and GET /api/v1/meters/{slug}/query answers from, to, windowSize
(MINUTE|HOUR|DAY), windowTimeZone, subject, groupBy and filterGroupBy exactly from the
stored windows, or 400 inexact_query. Keys also as Authorization: Bearer <secret>.";

#[derive(Debug, Args)]
pub struct ServeArgs {
    #[command(flatten)]
    common: CommonArgs,
    /// Quota file (see topology/quotas.toml), reloaded when it changes or on SIGHUP
    /// [config: serve.quotas; default: none, every quota check is allowed]
    #[arg(long, env = "PULSES_QUOTAS", value_name = "FILE")]
    quotas: Option<std::path::PathBuf>,
}

pub fn run(args: ServeArgs) -> anyhow::Result<()> {
    let mut cfg = args.common.load()?;
    // `--http-addr` (or PULSES_HTTP_ADDR) wins over the [serve] section's address.
    let addr = args.common.http_addr.clone().unwrap_or_else(|| cfg.serve.http_addr.clone());
    cfg.http_addr.clone_from(&addr);
    if let Some(q) = args.quotas {
        cfg.serve.quotas = Some(q);
    }
    let settings = cfg.serve.clone();
    super::connect(&cfg, &|_| {})?;
    let rt = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    rt.block_on(async move {
        let listener = http::bind(&addr).await?;
        if let Some(addr) = http::local_addr(&listener) {
            tracing::info!(%addr, "HTTP endpoint listening on http://{addr} (POST /v1/pulses, /metrics /healthz /readyz)");
        }
        crate::serve::run(Arc::new(cfg), settings, listener, super::terminated()).await
    })?;
    tracing::info!("serve stopped");
    Ok(())
}
