//! `pulses serve` (SPEC §8): the HTTP front door for services that do not speak Kafka.
//! It keeps no state Kafka does not hold, so any number of replicas can run behind a
//! load balancer.
//!
//! - [`ingest`]: `POST /v1/pulses`, where a pulse enters over HTTP;
//! - [`view`]: the usage and charges views, every replica's copies of the aggregates
//!   and charges topics;
//! - [`usage`]: `GET /v1/usage` (alias `GET /v1/aggregations`), `POST /v1/quota/check`,
//!   `GET /v1/me`, from the usage view;
//! - [`charges`]: `GET /v1/charges`, from the charges view;
//! - [`openmeter`]: OpenMeter's events and meters API over CloudEvents (SPEC §10);
//! - [`quota`]: the quota file and the check (pure);
//! - [`dashboard`]: `GET /`, the usage dashboard, embedded;
//! - [`keys`]: what an API key is and how its secret is checked (pure);
//! - [`key_table`]: the keys topic, written by `pulses keys`, followed by every replica;
//! - [`metrics`]: requests, latency, pulses accepted and rejected, the view's lag;
//! - [`error`]: the JSON error answers.

pub mod charges;
pub mod dashboard;
pub mod error;
pub mod ingest;
pub mod invoice_page;
pub mod invoices;
pub mod key_table;
pub mod keys;
pub mod metrics;
pub mod openmeter;
pub mod quota;
pub mod rerating;
pub mod usage;
pub mod view;

use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use axum::http::HeaderMap;
use axum::routing::{get, post};
use axum::Router;
use prometheus_client::registry::Registry;
use rdkafka::producer::FutureProducer;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::codec::{ChargeInput, InvoiceInput};
use crate::config::{Config, ServeSettings};
use crate::kafka::admin::{ensure_topics, TopicSpec, DEFAULT_PARTITIONS};
use crate::kafka::clients;
use crate::kafka::startup;
use crate::ops::http::{self, Ops};
use error::ApiError;
use key_table::KeyTable;
use keys::Caller;
use metrics::ServeMetrics;
use quota::QuotaStore;
use view::{ChargesView, InvoicesView, UsageView};

/// API key header.
pub const API_KEY_HEADER: &str = "x-api-key";

/// What every request handler shares.
pub struct App {
    pub cfg: Arc<Config>,
    pub settings: ServeSettings,
    pub keys: Arc<KeyTable>,
    pub producer: FutureProducer,
    pub metrics: Arc<ServeMetrics>,
    pub limits: Limits,
    pub view: Arc<UsageView>,
    pub charges: Arc<ChargesView>,
    pub invoices: Arc<InvoicesView>,
    pub quotas: QuotaStore,
    /// The finest configured window: quotas sum it.
    pub finest_window: String,
}

impl App {
    /// Who the request's `X-API-Key` (or `Authorization: Bearer <secret>`, which
    /// OpenMeter's clients send) acts for; 401 if nobody.
    pub fn authenticate(&self, headers: &HeaderMap) -> Result<Caller, ApiError> {
        let bearer = || {
            let value = headers.get(axum::http::header::AUTHORIZATION)?.to_str().unwrap_or("");
            let (scheme, secret) = value.split_once(' ')?;
            Some(if scheme.eq_ignore_ascii_case("bearer") { secret.trim() } else { "" })
        };
        let secret = headers.get(API_KEY_HEADER).map(|v| v.to_str().unwrap_or("")).or_else(bearer);
        keys::authenticate(secret, |id| self.keys.get(id)).map_err(|why| {
            tracing::debug!("API key refused: {why}");
            ApiError::unauthorized(format!("a valid {API_KEY_HEADER} header is required ({why})"))
        })
    }
}

/// Bounds on the work in flight: requests, and the bytes of their bodies. Beyond
/// either, a request gets 429 at once instead of waiting in memory.
pub struct Limits {
    requests: Arc<Semaphore>,
    bytes: Arc<Semaphore>,
    max_bytes: usize,
}

impl Limits {
    pub fn new(requests: usize, bytes: usize) -> Self {
        Self { requests: Arc::new(Semaphore::new(requests)), bytes: Arc::new(Semaphore::new(bytes)), max_bytes: bytes }
    }

    /// A place for one more request, held until it is answered.
    pub fn admit(&self) -> Result<OwnedSemaphorePermit, ApiError> {
        Arc::clone(&self.requests)
            .try_acquire_owned()
            .map_err(|_| ApiError::too_many_requests("too many requests in flight; retry shortly"))
    }

    /// `n` bytes of the in-flight budget, held until the request is answered.
    pub fn reserve_bytes(&self, n: usize) -> Result<OwnedSemaphorePermit, ApiError> {
        let n = u32::try_from(n.min(self.max_bytes)).unwrap_or(u32::MAX);
        Arc::clone(&self.bytes)
            .try_acquire_many_owned(n)
            .map_err(|_| ApiError::too_many_requests("too many request bytes in flight; retry shortly"))
    }
}

/// The routes of `pulses serve`, with the operational ones, counted by `metrics`.
pub fn router(app: Arc<App>, ops: Ops) -> Router {
    let admitted = Arc::clone(&app);
    let api = Router::new()
        .route("/v1/pulses", post(ingest::post_pulses))
        .route("/v1/usage", get(usage::get_usage))
        .route("/v1/aggregations", get(usage::get_usage))
        .route("/v1/charges", get(charges::get_charges))
        .route("/v1/invoices", get(invoices::list_invoices).post(invoices::post_invoices))
        .route("/v1/invoices/{id}", get(invoices::get_invoice))
        .route("/v1/rerating-jobs", post(rerating::post_job))
        .route("/v1/rerating-jobs/{id}", get(rerating::get_job))
        .route("/v1/rerating-jobs/{id}/apply", post(rerating::apply_job))
        .route("/v1/quota/check", post(usage::post_quota_check))
        .route("/v1/me", get(usage::get_me))
        .route("/api/v1/events", post(openmeter::post_events))
        .route("/api/v1/meters", get(openmeter::list_meters))
        .route("/api/v1/meters/{slug}", get(openmeter::get_meter))
        .route("/api/v1/meters/{slug}/query", get(openmeter::query_meter))
        .with_state(Arc::clone(&app))
        // Every API request holds a place among those in flight while it is answered.
        .layer(axum::middleware::from_fn(move |request: axum::extract::Request, next: axum::middleware::Next| {
            let admitted = Arc::clone(&admitted);
            async move {
                match admitted.limits.admit() {
                    Ok(_place) => next.run(request).await,
                    Err(e) => axum::response::IntoResponse::into_response(e),
                }
            }
        }));
    api.merge(http::ops_routes(ops))
        .merge(dashboard::routes())
        .fallback(|| async { ApiError::new(axum::http::StatusCode::NOT_FOUND, "not_found", "no such route; see SPEC §8") })
        .layer(axum::middleware::from_fn_with_state(Arc::clone(&app.metrics), metrics::track))
}

/// The ingest producer: idempotent, acks=all, giving up on a record after the ack
/// timeout (the client has had its 503 by then).
pub fn producer(cfg: &Config, settings: &ServeSettings) -> Result<FutureProducer, rdkafka::error::KafkaError> {
    let mut c = clients::producer_config(cfg);
    c.set("message.timeout.ms", settings.ack_timeout.as_millis().to_string());
    c.create()
}

/// A registry with the serve metrics, and whether the process is ready: keys loaded
/// and both views caught up with their topics.
pub fn registry(keys: &Arc<KeyTable>, view: &Arc<UsageView>, charges: &Arc<ChargesView>) -> (Registry, Arc<ServeMetrics>, http::ReadyCheck) {
    let mut registry = Registry::default();
    let metrics = Arc::new(ServeMetrics::register(&mut registry, Arc::clone(view), Arc::clone(charges)));
    let (table, view, charges) = (Arc::clone(keys), Arc::clone(view), Arc::clone(charges));
    let ready: http::ReadyCheck = Arc::new(move || match (table.caught_up(), view.as_of().caught_up, charges.as_of().caught_up) {
        (true, true, true) => Ok(()),
        (false, _, _) => Err("loading API keys".into()),
        (_, false, _) => Err("reading the aggregates into the usage view".into()),
        (_, _, false) => Err("reading the charges into the charges view".into()),
    });
    (registry, metrics, ready)
}

/// Runs the server on `listener` until `shutdown`; then finishes the requests in
/// flight, flushes the producer and stops following the keys and the aggregates.
pub async fn run(
    cfg: Arc<Config>,
    settings: ServeSettings,
    listener: tokio::net::TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    use anyhow::Context;
    // A broker still coming up (or not up yet) is waited for, up to startup_timeout.
    let (c, within, no_probe): (&Config, _, &(dyn Fn(Option<String>) + Sync)) = (&cfg, cfg.startup_timeout, &|_| {});
    startup::retry_async("creating the API key topic", within, no_probe, || key_table::ensure_topic(c)).await?;
    // POST /v1/pulses writes the source topic: a principal that may not even see it
    // would take no pulse, so it is refused here rather than on every request. (A
    // source topic not created yet is no reason to wait.)
    if let Err(crate::kafka::admin::AdminError::Denied(d)) = crate::kafka::admin::partition_count(c, &c.topics.source) {
        return Err(crate::kafka::security::Denied { operation: "Write".into(), ..d }.into());
    }
    // The views read the aggregates and charges topics: a serve started before `pulses
    // run` or `pulses rate` ever ran creates them, as those would (an existing topic is
    // left as it is).
    let viewed = [
        TopicSpec { name: &c.topics.aggregated, partitions: DEFAULT_PARTITIONS, configs: &[] },
        TopicSpec { name: &c.topics.charges, partitions: DEFAULT_PARTITIONS, configs: &[] },
    ];
    startup::retry_async("creating the aggregates and charges topics", within, no_probe, || ensure_topics(c, &viewed))
        .await
        .with_context(|| format!("creating {} and {}", c.topics.aggregated, c.topics.charges))?;
    startup::retry_async("creating the invoices topic", within, no_probe, || crate::billing::ensure_invoices_topic(c))
        .await
        .with_context(|| format!("creating {}", c.topics.invoices))?;
    let quotas = QuotaStore::open(settings.quotas.clone())?;
    let finest_window = cfg.windows.iter().min_by_key(|w| w.size_ms()).map(|w| w.name.clone()).context("no windows configured")?;
    std::fs::create_dir_all(&cfg.state_dir).with_context(|| format!("creating {}", cfg.state_dir.display()))?;
    let view = Arc::new(UsageView::open(&cfg.state_dir.join("serve-view"))?);
    let charges = Arc::new(ChargesView::open(&cfg.state_dir.join("serve-charges-view"))?);
    let invoices = Arc::new(InvoicesView::open(&cfg.state_dir.join("serve-invoices-view"))?);
    let keys = Arc::new(KeyTable::default());
    let stop = Arc::new(AtomicBool::new(false));
    let followers = [
        startup::retry_async("reading the API key topic", within, no_probe, || async {
            key_table::follow(c, Arc::clone(&keys), Arc::clone(&stop))
        })
        .await?,
        startup::retry_async("reading the aggregates topic", within, no_probe, || async {
            view::follow(c, &c.topics.aggregated, Arc::clone(&view), view::aggregate_input(c)?, Arc::clone(&stop))
        })
        .await?,
        startup::retry_async("reading the charges topic", within, no_probe, || async {
            view::follow(c, &c.topics.charges, Arc::clone(&charges), ChargeInput::charges(), Arc::clone(&stop))
        })
        .await?,
        startup::retry_async("reading the invoices topic", within, no_probe, || async {
            view::follow(c, &c.topics.invoices, Arc::clone(&invoices), InvoiceInput::invoices(), Arc::clone(&stop))
        })
        .await?,
    ];
    let (registry, metrics, ready) = registry(&keys, &view, &charges);
    let producer = producer(&cfg, &settings).context("creating the ingest producer")?;
    let limits = Limits::new(settings.max_in_flight_requests, settings.max_in_flight_bytes);
    let app = Arc::new(App { cfg, settings, keys, producer, metrics, limits, view, charges, invoices, quotas, finest_window });
    let reloads = tokio::spawn(reload_quotas(Arc::clone(&app)));
    let ops = Ops { registry: Arc::new(registry), ready };
    http::serve(listener, router(Arc::clone(&app), ops), shutdown).await.context("serving HTTP")?;
    reloads.abort();
    tracing::info!("HTTP server stopped; flushing the producer");
    let flushed = {
        let producer = app.producer.clone();
        let within = app.settings.ack_timeout;
        tokio::task::spawn_blocking(move || clients::flush(&producer, within)).await
    };
    stop.store(true, std::sync::atomic::Ordering::Release);
    let _ = tokio::task::spawn_blocking(move || followers.map(|f| f.join())).await;
    match flushed {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(anyhow::anyhow!("flushing the ingest producer: {e}")),
        Err(e) => Err(anyhow::anyhow!("flushing the ingest producer: {e}")),
    }
}

/// Reloads the quota file when it changes (looked at every second) or on SIGHUP.
async fn reload_quotas(app: Arc<App>) {
    use tokio::signal::unix::{signal, SignalKind};
    let mut hup = signal(SignalKind::hangup()).ok();
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
    loop {
        let hangup = async {
            match hup.as_mut() {
                Some(h) => h.recv().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = tick.tick() => app.quotas.reload_if_changed(),
            _ = hangup => {
                tracing::info!("SIGHUP: reloading quotas");
                app.quotas.reload();
            }
        }
    }
}
