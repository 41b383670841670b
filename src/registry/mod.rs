//! Confluent Schema Registry access (SPEC §6): `schema_registry_converter`'s async client
//! and caches, driven from the synchronous stage threads through a private
//! current-thread runtime, with the outage policy of [`retry`].
//!
//! Errors are classified once, here: transport errors and HTTP 5xx are an outage (retried
//! within `retry_max`, then `registry_unavailable`); anything else the registry answers
//! for a schema id (404, an unparsable or non-Avro schema) is `unknown_schema`, not
//! retried. Resolved schemas are cached for the life of the stage (ids are immutable).

pub mod access;
pub mod retry;

use std::sync::{Arc, Mutex};
use std::time::Instant;

use schema_registry_converter::async_impl::avro::{AvroDecoder, AvroEncoder};
use schema_registry_converter::async_impl::schema_registry::SrSettings;
use schema_registry_converter::avro_common::AvroSchema;
use schema_registry_converter::error::SRCError;
use schema_registry_converter::schema_registry_common::{SchemaType, SubjectNameStrategy, SuppliedSchema};

use retry::{Outage, RetryPolicy, Step};
use crate::config::SchemaRegistryConfig;

/// Why a registry operation failed.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("schema registry client setup: {0}")]
    Setup(String),
    /// The registry answered, and the answer is no (404, bad schema): not retried.
    #[error("schema registry: {0}")]
    Refused(String),
    /// No answer (or 5xx) for the whole retry budget.
    #[error("schema registry unavailable for {secs:.1} s: {detail}")]
    Unavailable { secs: f64, detail: String },
    /// The stage is shutting down; the record was not handled.
    #[error("interrupted by shutdown while waiting for the schema registry")]
    Interrupted,
    /// The registry does not answer and the caller may not wait yet
    /// ([`Wait::may_wait`]): it commits its work first, then asks again, waiting.
    #[error("the schema registry does not answer; the caller commits before waiting")]
    WouldWait,
}

/// How a caller waits out a registry outage.
#[derive(Clone, Copy)]
pub struct Wait<'a> {
    /// Turns true when the caller shuts down: stop waiting ([`RegistryError::Interrupted`]).
    pub stop: &'a dyn Fn() -> bool,
    /// Whether to wait out an outage at all. A stage's first read may not
    /// ([`RegistryError::WouldWait`]): it commits the work done so far (no Kafka
    /// transaction stays open past `transaction.timeout.ms` during the wait), then reads
    /// again, waiting.
    pub may_wait: bool,
}

impl<'a> Wait<'a> {
    /// Waits out an outage until `stop`.
    pub fn until(stop: &'a dyn Fn() -> bool) -> Self {
        Self { stop, may_wait: true }
    }

    /// Answers [`RegistryError::WouldWait`] where it would wait.
    pub fn not_yet(stop: &'a dyn Fn() -> bool) -> Self {
        Self { stop, may_wait: false }
    }
}

/// A registry client for one stage thread.
pub struct Registry {
    rt: tokio::runtime::Runtime,
    decoder: AvroDecoder,
    encoder: AvroEncoder,
    policy: RetryPolicy,
    outage: Mutex<Outage>,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry").field("policy", &self.policy).finish_non_exhaustive()
    }
}

impl Registry {
    /// A client for `cfg.url`, or `None` when no registry is configured.
    pub fn from_config(cfg: &SchemaRegistryConfig) -> Result<Option<Self>, RegistryError> {
        let Some(url) = cfg.url.as_deref() else { return Ok(None) };
        let ca = access::ca_certificates(cfg)?;
        let settings = || {
            let client = access::client_builder(&ca);
            let mut builder = SrSettings::new_builder(url.trim_end_matches('/').to_owned());
            builder.set_timeout(cfg.request_timeout);
            if let (Some(user), Some(password)) = (&cfg.basic_auth_username, &cfg.basic_auth_password) {
                builder.set_basic_authorization(user, Some(password.expose()));
            }
            builder.build_with(client).map_err(|e| RegistryError::Setup(e.to_string()))
        };
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| RegistryError::Setup(format!("async runtime: {e}")))?;
        Ok(Some(Self {
            rt,
            decoder: AvroDecoder::new(settings()?),
            encoder: AvroEncoder::new(settings()?),
            policy: RetryPolicy {
                initial: cfg.retry_initial_backoff,
                max_backoff: cfg.retry_max_backoff,
                budget: cfg.retry_max,
            },
            outage: Mutex::new(Outage::default()),
        }))
    }

    /// The writer schema of `id` (cached after the first fetch).
    pub fn schema(&self, id: u32, wait: Wait<'_>) -> Result<Arc<AvroSchema>, RegistryError> {
        self.with_retry(wait, || {
            let r = self.rt.block_on(self.decoder.get_schema(id));
            if r.as_ref().is_err_and(is_server_error) {
                // The converter caches non-retriable errors, 5xx other than 502/503 among
                // them; an outage must not stick.
                self.decoder.remove_errors_from_cache();
            }
            r
        })
        .map_err(|e| match e {
            RegistryError::Refused(detail) => RegistryError::Refused(format!("schema id {id}: {detail}")),
            e => e,
        })
    }

    /// The schema and id for values of `topic` (subject `<topic>-value`): `schema`
    /// registered (or found already registered) when `auto_register`, else the subject's
    /// latest version.
    pub fn value_schema(
        &self,
        topic: &str,
        schema: &str,
        auto_register: bool,
        wait: Wait<'_>,
    ) -> Result<Arc<AvroSchema>, RegistryError> {
        let subject = format!("{topic}-value");
        self.with_retry(wait, || {
            let strategy = if auto_register {
                SubjectNameStrategy::TopicNameStrategyWithSchema(
                    topic.to_owned(),
                    false,
                    SuppliedSchema::new(None, SchemaType::Avro, schema.to_owned()),
                )
            } else {
                SubjectNameStrategy::TopicNameStrategy(topic.to_owned(), false)
            };
            let r = self.rt.block_on(self.encoder.get_schema_and_id(&subject, strategy));
            if r.as_ref().is_err_and(is_server_error) {
                self.encoder.remove_errors_from_cache();
            }
            r
        })
        .map_err(|e| match e {
            RegistryError::Refused(detail) => RegistryError::Refused(format!("subject {subject}: {detail}")),
            e => e,
        })
    }

    /// Runs `attempt` under the outage policy.
    fn with_retry<T>(&self, wait: Wait<'_>, mut attempt: impl FnMut() -> Result<T, SRCError>) -> Result<T, RegistryError> {
        let mut retrying = false;
        loop {
            // A call arriving during a long outage fails fast unless a probe is due; a
            // retry after a backoff always asks.
            let may = retrying
                || self.outage.lock().map(|o| o.may_attempt(&self.policy, Instant::now())).unwrap_or(true);
            let failure = if may {
                match attempt() {
                    Ok(v) => {
                        if let Ok(mut o) = self.outage.lock() {
                            if let Some(d) = o.duration(Instant::now()) {
                                tracing::info!(secs = d.as_secs_f64(), "schema registry reachable again");
                            }
                            o.ended();
                        }
                        return Ok(v);
                    }
                    Err(e) if is_outage(&e) => describe(&e),
                    Err(e) => return Err(RegistryError::Refused(describe(&e))),
                }
            } else {
                "no answer since the retry budget ran out (next probe after retry_max_backoff)".to_owned()
            };
            let now = Instant::now();
            let (step, secs) = match self.outage.lock() {
                Ok(mut o) => (o.failed(&self.policy, now), o.duration(now).unwrap_or_default().as_secs_f64()),
                Err(_) => (Step::GiveUp, 0.0),
            };
            match step {
                Step::GiveUp => return Err(RegistryError::Unavailable { secs, detail: failure }),
                Step::Retry(delay) => {
                    tracing::warn!(retry_in_ms = delay.as_millis() as u64, outage_secs = secs, "schema registry: {failure}");
                    if (wait.stop)() {
                        return Err(RegistryError::Interrupted);
                    }
                    if !wait.may_wait {
                        return Err(RegistryError::WouldWait);
                    }
                    std::thread::sleep(delay);
                    retrying = true;
                }
            }
        }
    }
}

/// Transport errors (the converter marks them retriable, as it does 502/503), any
/// other 5xx, and 401/403: the registry is down or overloaded, or refuses pulses'
/// credentials, which is not the record's fault; none of them may send a record to
/// the DLQ before the outage budget is spent.
fn is_outage(e: &SRCError) -> bool {
    e.retriable || is_server_error(e) || is_credentials_error(e)
}

fn is_credentials_error(e: &SRCError) -> bool {
    e.error.contains("failed with status 401") || e.error.contains("failed with status 403")
}

fn is_server_error(e: &SRCError) -> bool {
    e.error.contains("failed with status 5")
}

fn describe(e: &SRCError) -> String {
    let hint = if is_credentials_error(e) {
        " (check schema_registry.basic_auth_username and basic_auth_password)"
    } else {
        ""
    };
    match &e.cause {
        Some(c) => format!("{}{hint} ({c})", e.error),
        None => format!("{}{hint}", e.error),
    }
}
